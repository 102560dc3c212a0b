"""The model registry and the checkpoint directory: the one place that maps a name to a model.

Each model declares here, once, what the rest of the project asks of it (`ModelSpec`); nothing
outside this file asks which model it holds. A checkpoint directory holds:

    model.safetensors   the weights, under our parameter names
    config.json         the config's to_dict(): enough to rebuild the model; its "model" names the spec
    norm_stats.json     openpi's format: {"norm_stats": {"state" | "actions": {"mean", "std", "q01", "q99"}}}
    tokenizer.model     the SentencePiece prompt tokenizer
    fast_tokenizer.json the FAST tokenizer (pi0-FAST, pi0.5 co-training): ours, or openpi's
    fast_tokenizer/     universal one as its HF directory
    policy.json         how a robot's data maps onto the model: cameras, state / action widths,
                        normalization, delta-action mask, default prompt, serving options
    train_state.pt      (training checkpoints only) optimizer, EMA, step, RNG, data position
"""

import glob
import json
import math
import os
import shutil
import signal
from dataclasses import dataclass
from typing import Callable

import numpy as np
import sentencepiece as spm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import pi0
import pi05
import pi0_fast
from paligemma import count_params, fp32_param_names, load_state_strict


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of the project asks of one model."""
    config: type              # its config dataclass (config.json is config.to_dict())
    model: type               # the nn.Module: forward(batch, ...) -> {"loss": ..., per-term losses}
    presets: dict             # configs by name: "full" (openpi's sizes), "tiny" (tests, the built-in task)
    flow: bool                # flow matching: forward takes noise and time, sample_actions samples, state
                              # and actions are zero-padded to cfg.action_dim; else FAST tokens (pi0-FAST)
    quantile_norm: bool       # openpi normalizes its state and actions by quantiles, else by z-score
    prompt: Callable          # (cfg, sp) -> tokenize(prompt, normalized state, condition=None) -> (ids, mask)
    fast_targets: Callable | None  # (cfg, sp, fast, max_tokens) -> (prompt, state, actions) -> FAST batch keys
    fast_targets_required: bool   # trains on FAST tokens always (pi0-FAST), or only when asked (pi0.5 --fast-targets 1)
    masks_absent_views: bool  # openpi masks a robot's absent camera out; pi0-FAST looks at its zero image
    robot_views: str          # which camera map of a robot family its openpi configs use (robots.Robot)
    options: tuple = ()       # config fields train.py's flags set (pi0.5: --knowledge-insulation, --dropout)


MODELS = {
    "pi0": ModelSpec(pi0.Pi0Config, pi0.Pi0, pi0.CONFIGS, flow=True, quantile_norm=False, prompt=pi0.prompt_tokenizer,
                     fast_targets=None, fast_targets_required=False, masks_absent_views=True, robot_views="views"),
    "pi05": ModelSpec(pi05.Pi05Config, pi05.Pi05, pi05.CONFIGS, flow=True, quantile_norm=True,
                      prompt=pi05.prompt_tokenizer, fast_targets=pi05.target_tokenizer, fast_targets_required=False,
                      masks_absent_views=True, robot_views="views", options=("knowledge_insulation", "dropout")),
    "pi0_fast": ModelSpec(pi0_fast.Pi0FastConfig, pi0_fast.Pi0Fast, pi0_fast.CONFIGS, flow=False, quantile_norm=True,
                          prompt=pi0_fast.prompt_tokenizer, fast_targets=pi0_fast.target_tokenizer,
                          fast_targets_required=True, masks_absent_views=False, robot_views="fast_views"),
}


def spec(name):
    """The ModelSpec of a model name (or of a config: its "model" field)."""
    name = getattr(name, "model", name)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    return MODELS[name]


def preset(name, config):
    """A model's preset config by name ("full", "tiny", ...)."""
    presets = spec(name).presets
    if config not in presets:
        raise ValueError(f"unknown --config {config!r} for {name}: expected one of {', '.join(presets)}")
    return presets[config]


def config_from_dict(d, where="config.json"):
    """A config.json dict -> the right config, by its "model" field."""
    if "model" not in d:
        raise ValueError(f"{where}: no \"model\" field (expected one of {', '.join(MODELS)})")
    return spec(d["model"]).config.from_dict(d)


def build(cfg):
    """A freshly initialised model for a config."""
    return spec(cfg).model(cfg)


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
    broken = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:  # one NaN weight makes every action NaN: refuse it here, not at the robot
        raise ValueError(f"{weights}: NaN or inf in {len(broken)} tensor(s): {', '.join(broken[:5])}"
                         f"{', ...' if len(broken) > 5 else ''}")
    load_state_strict(model, state, assign=True)
    return model


def load(path, device="cpu", dtype=None):
    """Rebuild any of our models from a checkpoint directory, weights loaded strictly.

    dtype None: as saved (fp32 masters, what training and the parity tests use). dtype
    torch.bfloat16: the serving precision (paligemma.py's policy): every weight is converted
    as it is read, so no fp32 copy of the model is ever resident."""
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
    """The model's prompt format: tokenize(prompt, normalized state, condition=None) -> (ids, mask)."""
    return spec(cfg).prompt(cfg, sp)


def load_sentencepiece(path):
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
    try:
        write_checkpoint(model, tmp, norm_stats, extra_files, json_files, state_dict)
        publish(tmp, path)
    except Exception:  # a failed write (disk full, a missing file) leaves nothing behind; the old copy stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    for name in MODELS:
        for config in spec(name).presets:
            with torch.device("meta"):  # sizes without allocating the weights
                model = build(preset(name, config))
            print(f"{name:9s} {config:5s} {count_params(model):>14,} params")
