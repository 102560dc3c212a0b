"""The model registry and the checkpoint directory: the one place that maps a name to a model file.

Each model file (pi0.py, pi05.py, pi0_fast.py) exports the same few names, so nothing outside this
file needs to ask which model it holds:

    Config          its dataclass; config.json is Config.to_dict(), whose "model" names the file
    Model           the nn.Module; forward(batch) -> {"loss": ..., per-term losses}
    CONFIGS         presets by name: "full" (openpi's sizes), "tiny" (tests, the built-in task)
    FLOW            True: flow matching (forward takes noise and time, sample_actions samples,
                    state and actions are zero-padded to cfg.action_dim); False: pi0-FAST
    USE_QUANTILES   openpi's normalization for that model: z-score for pi0, quantiles otherwise
    prompt_tokenizer(cfg, sp) -> tokenize(prompt, normalized state) -> (ids (L,), mask (L,))

A checkpoint directory holds:
    model.safetensors   the weights, under our parameter names
    config.json         Config.to_dict(): enough to rebuild the model
    norm_stats.json     openpi's format: {"norm_stats": {"state" | "actions": {"mean", "std", "q01", "q99"}}}
    tokenizer.model     the SentencePiece prompt tokenizer
    fast_tokenizer.json the FAST tokenizer (pi0-FAST, pi0.5 co-training)
    policy.json         how a robot's data maps onto the model: cameras, state / action widths,
                        normalization, delta-action mask, default prompt
    train_state.pt      (training checkpoints only) optimizer, EMA, step, RNG, data position
"""

import glob
import importlib
import json
import math
import os
import shutil
import signal

import numpy as np
import torch

from paligemma import count_params, fp32_param_names, load_state_strict

MODELS = ("pi0", "pi05", "pi0_fast")  # each name is also its file


def model_file(name):
    """The module of model `name` (pi0, pi05 or pi0_fast)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    return importlib.import_module(name)


def preset(name, config):
    """A model's preset config by name ("full", "tiny", ...)."""
    presets = model_file(name).CONFIGS
    if config not in presets:
        raise ValueError(f"unknown --config {config!r} for {name}: expected one of {', '.join(presets)}")
    return presets[config]


def config_from_dict(d, where="config.json"):
    """A config.json dict -> the right Config, by its "model" field."""
    if "model" not in d:
        raise ValueError(f"{where}: no \"model\" field (expected one of {', '.join(MODELS)})")
    return model_file(d["model"]).Config.from_dict(d)


def build(cfg):
    """A freshly initialised model for a config."""
    return model_file(cfg.model).Model(cfg)


def read_json(path):
    """A JSON file, or an error that names it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_config(path):
    where = os.path.join(path, "config.json")
    try:
        return config_from_dict(read_json(where), where)
    except TypeError as e:  # a field this code does not know, or one missing
        raise ValueError(f"{where}: {e}") from None


def serving_dtypes(model, dtype):
    """{parameter name: dtype} for serving in `dtype`: the precision policy's fp32 list stays fp32."""
    keep = fp32_param_names(model)
    return {name: torch.float32 if name in keep else dtype for name, _ in model.named_parameters()}


def build_meta(cfg, dtype=torch.float32):
    """The model on the meta device (no memory) and the dtype of each weight when served in
    `dtype`. load_weights then gives it real tensors, or build_empty allocates them."""
    with torch.device("meta"):
        model = build(cfg)
    return model, serving_dtypes(model, dtype)


def build_empty(cfg, dtype=torch.float32, device="cpu"):
    """A model whose weights are allocated once, directly in the serving dtypes, uninitialised
    (fill them next): no fp32 copy of a bf16 model ever exists."""
    model, dtypes = build_meta(cfg, dtype)
    for name, p in model.named_parameters():
        p.data = p.data.to(dtypes[name])  # on meta: no memory
    return model.to_empty(device=device)


def load_weights(model, weights, dtypes, device):
    """Tensors of a safetensors file, one at a time, each converted to its dtype as it is read
    (the largest in row blocks of 2^24 elements): memory holds the result plus one block."""
    from safetensors import safe_open
    state = {}
    with safe_open(weights, "pt", device="cpu") as f:
        for name in f.keys():
            dtype = dtypes.get(name, torch.float32)
            part = f.get_slice(name)
            shape = part.get_shape()
            if not shape or shape[0] * max(1, math.prod(shape[1:])) <= 2 ** 24:
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
                continue
            out = torch.empty(shape, dtype=dtype, device=device)
            rows = max(1, 2 ** 24 // max(1, math.prod(shape[1:])))
            for r in range(0, shape[0], rows):
                out[r:r + rows] = part[r:r + rows].to(dtype)
            state[name] = out
    load_state_strict(model, state, assign=True)
    return model


def load(path, device="cpu", dtype=None):
    """Rebuild any of our models from a checkpoint directory, weights loaded strictly.

    dtype None: as saved (fp32 masters, what training and the parity tests use). dtype
    torch.bfloat16: the serving precision (paligemma.py's policy): every weight is converted
    as it is read, so no fp32 copy of the model is ever resident."""
    from safetensors import SafetensorError, safe_open
    path = str(path)
    if not os.path.isdir(path):
        aside = sorted(glob.glob(f"{path.rstrip('/')}.old-*"))
        raise FileNotFoundError(f"{path}: no checkpoint directory there" + (
            f" (a complete earlier version was moved aside to {aside[-1]} by a write that did not finish: "
            "rename it back)" if aside else ""))
    cfg = read_config(path)
    weights = os.path.join(path, "model.safetensors")
    try:
        with safe_open(weights, "pt") as f:
            saved = (f.metadata() or {}).get("config")
        if saved is not None:
            now = json.loads(json.dumps(cfg.to_dict()))  # tuples as JSON lists, as saved
            changed = {k: (v, now.get(k)) for k, v in json.loads(saved).items() if now.get(k) != v}
            if changed:
                raise ValueError(f"{path}/config.json differs from the config the weights were saved with: "
                                 + ", ".join(f"{k} is {new!r}, was {old!r}" for k, (old, new) in changed.items())
                                 + "; restore config.json")
        model, dtypes = build_meta(cfg, dtype or torch.float32)
        return load_weights(model, weights, dtypes, device)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None


def prompt_tokenizer(cfg, sp):
    """The model's prompt format: tokenize(prompt, normalized state) -> (ids, mask)."""
    return model_file(cfg.model).prompt_tokenizer(cfg, sp)


def load_sentencepiece(path):
    import sentencepiece as spm
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no SentencePiece tokenizer there")
    return spm.SentencePieceProcessor(model_file=str(path))


# ----------------------------------------------------------------------------------------------
# Writing a checkpoint directory: complete under its final name, or not there at all


_crash_counts = {}


def crash_point(name):
    """Fault injection for the crash-safety test: PI_CRASH_AT=NAME:N kills this process with
    SIGKILL (no cleanup, no flush, as a power cut or the OOM killer would) the N-th time it
    passes the point NAME. A no-op otherwise."""
    target, _, nth = os.environ.get("PI_CRASH_AT", "").partition(":")
    if target == name:
        _crash_counts[name] = _crash_counts.get(name, 0) + 1
        if _crash_counts[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def fsync_path(path):
    """Flush a file's or a directory's contents (a directory: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(model, tmp, norm_stats=None, extra_files=(), json_files=None, state_dict=None):
    """Write a checkpoint directory's files into `tmp` (created empty) and sync them."""
    from safetensors.torch import save_file
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = model.cfg.to_dict()
    # the config travels inside the weights too: load() notices a config.json edited afterwards
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"config": json.dumps(config, sort_keys=True)})
    os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)  # safetensors writes it owner-only
    crash_point("weights-written")
    files = dict(json_files or {}, **{"config.json": config})
    if norm_stats is not None:
        files["norm_stats.json"] = {"norm_stats": {k: {s: np.asarray(v, np.float64).tolist() for s, v in d.items()}
                                                   for k, d in norm_stats.items()}}
    for name, obj in files.items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=2)
    for extra in extra_files:  # a path, or (path, name in the checkpoint); folders are copied whole
        src, name = extra if isinstance(extra, tuple) else (extra, os.path.basename(extra))
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(tmp, name))


def publish(tmp, path):
    """Sync tmp's files and entries, then give it its final name with one rename, then sync the
    parent so the rename itself survives a power cut. An existing `path` is replaced: it is
    renamed aside first (`path.old-<pid>`, which load() points to if we die between the two
    renames) and removed only once the new directory is in place."""
    for folder, dirs, files in os.walk(tmp, topdown=False):
        for name in files + dirs:
            fsync_path(os.path.join(folder, name))
    fsync_path(tmp)
    crash_point("before-publish")
    parent = os.path.dirname(os.path.abspath(path))
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.replace(path, old)
        crash_point("moved-aside")
    os.replace(tmp, path)
    fsync_path(parent)
    crash_point("published")
    if old:
        shutil.rmtree(old)


def save_pretrained(model, path, norm_stats=None, extra_files=(), json_files=None, state_dict=None):
    """Write a checkpoint directory atomically: model.safetensors, config.json, norm_stats.json.

    Everything goes to a temporary sibling first, is synced to disk, then one rename publishes
    it: a crash never leaves a half-written checkpoint under the final name.
    norm_stats: {"state": {"mean": ..., ...}, "actions": ...} (lists or arrays).
    extra_files: paths copied in verbatim (e.g. a tokenizer model), or (path, name) pairs;
    json_files: {name: object}.
    state_dict: the weights to write, if not model.state_dict() (e.g. LoRA merged into them).
    """
    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    write_checkpoint(model, tmp, norm_stats, extra_files, json_files, state_dict)
    publish(tmp, path)


if __name__ == "__main__":
    for name in MODELS:
        for config in model_file(name).CONFIGS:
            with torch.device("meta"):  # sizes without allocating the weights
                model = build(preset(name, config))
            print(f"{name:9s} {config:5s} {count_params(model):>14,} params")
