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

import importlib
import json
import os
import shutil

import numpy as np
import torch

from paligemma import count_params, load_state_strict

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


def read_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return config_from_dict(json.load(f), os.path.join(path, "config.json"))


def load(path, device="cpu"):
    """Rebuild any of our models from a checkpoint directory, weights loaded strictly."""
    from safetensors.torch import load_file
    model = build(read_config(path))
    load_state_strict(model, load_file(os.path.join(path, "model.safetensors"), device=str(device)))
    return model.to(device)


def prompt_tokenizer(cfg, sp):
    """The model's prompt format: tokenize(prompt, normalized state) -> (ids, mask)."""
    return model_file(cfg.model).prompt_tokenizer(cfg, sp)


def load_sentencepiece(path):
    import sentencepiece as spm
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no SentencePiece tokenizer there")
    return spm.SentencePieceProcessor(model_file=str(path))


def save_pretrained(model, path, norm_stats=None, extra_files=(), json_files=None, state_dict=None):
    """Write a checkpoint directory atomically: model.safetensors, config.json, norm_stats.json.

    Everything goes to a temporary sibling first, then one rename publishes it, so a crash
    never leaves a half-written checkpoint. An existing directory is replaced only at the end.
    norm_stats: {"state": {"mean": ..., ...}, "actions": ...} (lists or arrays).
    extra_files: paths copied in verbatim (e.g. a tokenizer model); json_files: {name: object}.
    state_dict: the weights to write, if not model.state_dict() (e.g. LoRA merged into them).
    """
    from safetensors.torch import save_file
    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, os.path.join(tmp, "model.safetensors"))
    os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)  # safetensors writes it owner-only
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(model.cfg.to_dict(), f, indent=2)
    if norm_stats is not None:
        with open(os.path.join(tmp, "norm_stats.json"), "w") as f:
            json.dump({"norm_stats": {k: {s: np.asarray(v, np.float64).tolist() for s, v in d.items()}
                                      for k, d in norm_stats.items()}}, f, indent=2)
    for extra in extra_files:
        shutil.copy(extra, tmp)
    for name, obj in (json_files or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=2)
    if os.path.exists(path):  # swap: old -> .old, new -> path, then drop the old one
        os.replace(path, f"{path}.old-{os.getpid()}")
        os.replace(tmp, path)
        shutil.rmtree(f"{path}.old-{os.getpid()}")
    else:
        os.replace(tmp, path)


if __name__ == "__main__":
    for name in MODELS:
        for config in model_file(name).CONFIGS:
            with torch.device("meta"):  # sizes without allocating the weights
                model = build(preset(name, config))
            print(f"{name:9s} {config:5s} {count_params(model):>14,} params")
