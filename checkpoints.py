"""A training run's checkpoints: crash-safe on disk, and a resume that repeats the uninterrupted run.

Layout: <run>/checkpoints/step_NNNNNNN/ holds model.safetensors (LoRA merged), config.json,
norm_stats.json, the tokenizers and train_state.pt (full weights, AdamW state, EMA, every
rank's RNG, the data position and the run's knobs). Each is written complete under a temporary
name, synced and published by one rename (models.write_checkpoint / models.publish); the older
one is removed only afterwards, so at any instant the newest complete checkpoint is there.
FSDP2 shards are gathered to full tensors (a collective every rank joins); rank 0 writes.
"""

import glob
import os
import re
import shutil

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
    models.write_checkpoint(model, tmp, norm_stats=run["transforms"][0].norm_stats, extra_files=run["files"],
                            state_dict=merged)
    torch.save({"step": step, "optimizer": opt_state, "rng": rngs, "data": loader.state_dict(),
                "ema": ema_full, "args": recipes.as_dict(a), "weights": state}, os.path.join(tmp, "train_state.pt"))
    models.crash_point("state-written")
    models.publish(tmp, path)
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


def check_resume_args(saved, a, path):
    """A changed knob that shapes the run is an error naming old and new, unless --resume-allow."""
    allowed = set(filter(None, a.resume_allow.replace("-", "_").split(",")))
    now = recipes.as_dict(a)
    changed = [f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {now[k]!r}" for k in recipes.resume_knobs()
               if k not in allowed and saved.get(k) != now[k]]
    if changed:
        raise ValueError(f"--resume from {path}: " + "; ".join(changed)
                         + " (pass --resume-allow NAME,... to continue with the change anyway)")


def load_training_state(path, model, opt, ema, loader, rank, a):
    state = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=False)
    check_resume_args(state["args"], a, path)
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
