"""A training run's checkpoints: crash-safe on disk, and a resume that repeats the uninterrupted run.

Layout: <run>/checkpoints/step_NNNNNNN/ holds model.safetensors (LoRA merged), config.json,
norm_stats.json, the tokenizers and train_state.pt (full weights, AdamW state, EMA, every
rank's RNG, the data position and the run's knobs). Each is written complete under a temporary
name, synced and published by one rename (models.write_checkpoint / models.publish); the older
one is removed only afterwards, so at any instant the newest complete checkpoint is there.
FSDP2 shards are gathered to full tensors (a collective every rank joins); rank 0 writes.
"""

import glob
import hashlib
import json
import os
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

import models
import recipes
from lora import full_state, merged_state


def full_tensor(t):
    """The whole tensor behind an FSDP2 shard (a collective), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def save_training_state(ckpt_root, model, opt, ema, loader, step, run, a):
    """Weights + everything needed to continue the exact same run, as ckpt_root/step_NNNNNNN.

    Crash-safe: the directory is written complete (weights, config, train_state.pt) under a
    temporary name, synced, and published by one rename; only then are older checkpoints
    removed (renamed to *.deleting first, so a half-removed one is never taken for complete).
    At any instant the newest complete checkpoint is under a step_* name."""
    state = full_state(model)
    opt_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * run["world"]
    if run["world"] > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    merged = merged_state(model)  # collectives: every rank takes part, rank 0 writes
    names = [n for n, _ in model.named_parameters()]
    ema_full = None if ema is None else dict(zip(names, [full_tensor(e).cpu() for e in ema]))
    if run["rank"] != 0:
        return
    os.makedirs(ckpt_root, exist_ok=True)
    path = os.path.join(ckpt_root, f"step_{step:07d}")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        models.write_checkpoint(model, tmp, norm_stats=run["transforms"][0].norm_stats, extra_files=run["files"],
                                state_dict=merged)
        torch.save({"step": step, "optimizer": opt_state, "rng": rngs, "data": loader.state_dict(), "ema": ema_full,
                    "args": recipes.as_dict(a), "data_fingerprint": run["fingerprint"], "weights": state},
                   os.path.join(tmp, "train_state.pt"))
        models.crash_point("state-written")
        models.publish(tmp, path)
    except Exception:  # disk full, say: nothing half-written stays behind, the previous checkpoint is intact
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(glob.glob(os.path.join(ckpt_root, "step_*"))):
        if old != path and re.fullmatch(r"step_\d+", os.path.basename(old)):
            os.replace(old, old + ".deleting")
            models.crash_point("old-renamed")
            shutil.rmtree(old + ".deleting")
    for stale in glob.glob(os.path.join(ckpt_root, "*.tmp-*")) + glob.glob(os.path.join(ckpt_root, "*.deleting")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a crash: never complete, never needed


def latest_checkpoint(ckpt_root):
    """The newest complete checkpoint directory under ckpt_root, or an error saying what is there."""
    done = sorted(d for d in glob.glob(os.path.join(ckpt_root, "step_*"))
                  if re.fullmatch(r"step_\d+", os.path.basename(d)))
    if not done:
        found = sorted(os.listdir(ckpt_root)) if os.path.isdir(ckpt_root) else []
        raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt_root} (found: {found or 'nothing'})")
    return done[-1]


PATH_KNOBS = ("data", "init", "tokenizer", "norm_stats", "fast_tokenizer")


def same_paths(value):
    """A path knob as compared on resume: 'my_data/' and 'my_data' are one path (what is in it is
    compared by data_fingerprint)."""
    if isinstance(value, list):
        return [same_paths(v) for v in value]
    return os.path.normpath(value) if isinstance(value, str) and value != "fit" else value


def data_fingerprint(datasets, transforms):
    """What a run trains on, by content: per dataset its episodes and frames, and a hash of the
    norm stats it is normalized with. New episodes or new stats at the same path are a change."""
    out = []
    for ds, t in zip(datasets, transforms):
        stats = {k: {s: np.asarray(v, np.float64).round(10).tolist() for s, v in d.items()}
                 for k, d in (t.norm_stats or {}).items()}
        digest = hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()[:16]
        out.append({"episodes": int(ds.num_episodes), "frames": len(ds), "norm_stats": digest})
    return out


def check_resume_args(saved, a, path, saved_data=None, data=None):
    """A changed knob that shapes the run, or changed data behind the same paths, is an error
    naming old and new, unless --resume-allow names it ("data" for the data's content)."""
    allowed = set(filter(None, a.resume_allow.replace("-", "_").split(",")))
    now = recipes.as_dict(a)
    same = lambda k, v: same_paths(v) if k in PATH_KNOBS else v
    changed = [f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {now[k]!r}" for k in recipes.resume_knobs()
               if k not in allowed and same(k, saved.get(k)) != same(k, now[k])]
    if saved_data is not None and saved_data != data and "data" not in allowed:
        changed += [f"dataset {i}'s content was {old}, now {new}" for i, (old, new) in enumerate(zip(saved_data, data))
                    if old != new] or [f"the datasets were {saved_data}, now {data}"]
    if changed:
        raise ValueError(f"--resume from {path}: " + "; ".join(changed)
                         + " (pass --resume-allow NAME,... to continue with the change anyway)")


def load_training_state(path, model, opt, ema, loader, rank, a, fingerprint=None):
    state = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=False)
    check_resume_args(state["args"], a, path, state.get("data_fingerprint"), fingerprint)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, state["weights"], options=options)
    # parameters that never had a gradient (e.g. an insulated VLM) have no AdamW state yet
    set_optimizer_state_dict(model, opt, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True, strict=False))
    if ema is not None:
        for e, (name, _) in zip(ema, model.named_parameters()):
            saved = state["ema"][name].to(e.device)
            if isinstance(e, DTensor):  # FSDP2: keep this rank's shard of the full tensor
                saved = distribute_tensor(saved, e.device_mesh, e.placements)
            e.copy_(saved)
    rng = state["rng"][rank]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    loader.load_state_dict(state["data"])
    return state["step"]
