"""Train pi0 / pi0.5 / pi0-FAST. One process or many, one machine or several.

    python train.py --model pi05                                   # the built-in task, tiny model, CPU
    torchrun --standalone --nproc_per_node=2 train.py --model pi05
    torchrun --nproc_per_node=8 train.py --model pi05 --config full --init ckpt/pi05_base \\
        --data my_lerobot_dataset --batch-size 32 --steps 30000 --lr 2.5e-5
    torchrun --nproc_per_node=8 train.py --openpi-config pi0_aloha_pen_uncap --config full \\
        --init ckpt/pi0_base --data my_aloha_dataset     # openpi's robot transforms and recipe (robots.py)

With no --data it trains on the built-in task of sim.py (demonstrations generated once, cached)
and ends with a closed-loop evaluation. The recipe follows openpi's JAX trainer, where the PyTorch
ports lost quality: fp32 master weights and fp32 AdamW state (bf16 only inside autocast on GPU),
AdamW b2 = 0.95, warmup + cosine LR, gradient clipping at 1, an EMA of the weights that is what
gets evaluated and exported. pi0.5 trains as openpi trains it (the flow-matching loss through the
whole network); --fast 1 adds FAST co-training of the VLM and --knowledge-insulation 1 stops the
flow loss's gradient at the VLM (Driess et al. 2025).

The noise and flow-matching time of every sample are drawn from a generator seeded by
(seed, step) over the whole global batch, and each rank takes its own rows: so N processes compute
exactly the loss one process would on the same global batch, and a resumed run repeats the
uninterrupted one.

The file reads top to bottom: the knobs, then one section per phase (distributed setup, data,
model, the step, export, logging), then a short main() that calls them in order. The run's
crash-safe checkpoints live in checkpoints.py, LoRA in lora.py.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------
# Knobs: every one of them, with what it does.
p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--model", choices=["pi0", "pi05", "pi0_fast"], default=None,
               help="which model to train (default: pi05, or the --openpi-config's)")
p.add_argument("--openpi-config", default=None, metavar="NAME",
               help="train as openpi's config NAME does (robots.py): its repack, robot transforms, deltas, cameras, "
                    "horizon and recipe (flags given explicitly win); the export serves like a converted checkpoint")
p.add_argument("--config", default="tiny", help="model preset: tiny (CPU demo, tests) or full (openpi's sizes)")
p.add_argument("--data", nargs="*", default=None,
               help="datasets (LeRobot dir, HDF5 file or dir), each optionally PATH:WEIGHT; none = the built-in task")
p.add_argument("--cameras", default=None, metavar="VIEW=CAMERA,...",
               help="which dataset camera feeds each model view, e.g. base_0_rgb=observation.images.top; views "
                    "left out are zero-filled and masked (default: same names, or the dataset's from scratch)")
p.add_argument("--norm-stats", default=None, help="norm_stats.json to use for all datasets (default: each dataset's own)")
p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: from --init, or the built-in task's)")
p.add_argument("--init", default=None, help="checkpoint directory to start from (e.g. from convert_jax.py)")
p.add_argument("--out", default=None, help="run directory (default: runs/<model>)")
p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest complete checkpoint")
p.add_argument("--resume-allow", default="", help="comma list of knobs --resume may see changed (e.g. steps,lr)")
p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2000; openpi configs: theirs)")
p.add_argument("--batch-size", type=int, default=None,
               help="global batch size, all ranks and accumulation steps (default 32; openpi configs: theirs)")
p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps per optimizer step")
p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; openpi configs: 2.5e-5 or theirs)")
p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 100; openpi configs: theirs)")
p.add_argument("--end-lr-frac", type=float, default=None,
               help="final LR as a fraction of the peak, cosine decay (default 0.1; openpi configs: theirs)")
p.add_argument("--weight-decay", type=float, default=1e-10, help="AdamW weight decay (openpi: 1e-10)")
p.add_argument("--b2", type=float, default=0.95, help="AdamW beta2 (openpi: 0.95)")
p.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm")
p.add_argument("--ema", type=float, default=None,
               help="EMA decay of the weights, 0 = off; the EMA is exported (default 0.99, 0 with --lora as openpi; "
                    "openpi configs: theirs)")
p.add_argument("--dropout", type=float, default=None, help="pi0.5 dropout (default: the config's, 0.1)")
p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
p.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state with FSDP2, per layer")
p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer (SigLIP and Gemma)")
p.add_argument("--freeze", default="", help="comma list of parts not to train: vision, llm (the PaliGemma expert)")
p.add_argument("--lora", default="", help="comma list of Gemma experts to train by LoRA only: llm, expert")
p.add_argument("--lora-rank", default="16,32", help="LoRA rank for llm,expert (openpi: 16 and 32; alpha = rank)")
p.add_argument("--lora-init", choices=["openpi", "zero"], default="openpi",
               help="LoRA factors: openpi's (both N(0, 0.01)) or zero (B = 0: training starts at the checkpoint)")
p.add_argument("--fast", type=int, default=0,
               help="pi0.5: co-train the VLM on the FAST tokens of the actions (pi0-FAST: always)")
p.add_argument("--knowledge-insulation", type=int, default=0,
               help="pi0.5: stop the flow loss's gradient at the VLM (use with --fast 1)")
p.add_argument("--fast-tokenizer", default=None, help="FAST tokenizer file or HF dir (default: fit one on the data)")
p.add_argument("--max-fast-tokens", type=int, default=128, help="pi0.5: most FAST target slots per sample (fewer if the data needs fewer)")
p.add_argument("--chunk", type=int, default=None, help="action horizon C (default: the config's)")
p.add_argument("--augment", type=int, default=None, choices=[0, 1],
               help="openpi's image augmentation in training (augment.py: crop, rotate, colour jitter); "
                    "default 1 with --data, 0 on the built-in task")
p.add_argument("--recap", type=int, default=0, choices=[0, 1],
               help="RECAP (recap.py): condition on each frame's advantage indicator, read from <data>.advantages.json")
p.add_argument("--indicator-dropout", type=float, default=0.3,
               help="RECAP: share of samples trained without the indicator (one model, conditioned and not)")
p.add_argument("--rtc-max-delay", type=int, default=0,
               help="training-time real-time chunking: a committed prefix of 0..D steps, given clean at t = 0 "
                    "(pi0 / pi0.5; 0 = off)")
p.add_argument("--rtc-prefix-share", type=float, default=1.0,
               help="training-time RTC: share of samples that get a prefix draw at all (the others train "
                    "unconditioned); below 1 the model must still read the prompt for its first chunk")
p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
p.add_argument("--num-workers", type=int, default=0, help="data loader workers per rank")
p.add_argument("--seed", type=int, default=0, help="seed of the data stream, noise, time and init")
p.add_argument("--eval-episodes", type=int, default=100, help="closed-loop episodes at the end (built-in task)")
p.add_argument("--demo-episodes", type=int, default=3000, help="built-in task: demonstrations to generate")
p.add_argument("--stop-after", type=int, default=None, help="exit after this step (to test --resume)")
p.add_argument("--wandb", default=None, help="log to Weights & Biases under this project name (pip install wandb)")
args = p.parse_args() if __name__ == "__main__" else None

import augment  # noqa: E402  (after argparse so --help is instant)
import data  # noqa: E402
import models  # noqa: E402
from checkpoints import (RESUME_MUST_MATCH, latest_checkpoint, load_training_state, merged_state,  # noqa: E402
                         save_training_state)
from lora import apply_openpi_lora  # noqa: E402
from pi0 import free_steps, sample_noise_and_time  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Knobs checked up front: a bad value stops the run before any work, saying what is allowed.


def parse_data_spec(spec):
    """"PATH" or "PATH:WEIGHT" -> (path, weight or None). A path that exists wins over a colon."""
    if ":" not in spec or os.path.exists(spec):
        return spec, None
    path, _, weight = spec.rpartition(":")
    try:
        w = float(weight)
    except ValueError:
        raise ValueError(f"--data {spec!r}: {weight!r} is not a weight (PATH:WEIGHT, WEIGHT a number >= 0); "
                         f"and {spec!r} is not a path either") from None
    if not (w >= 0 and math.isfinite(w)):
        raise ValueError(f"--data {spec!r}: the weight must be a finite number >= 0, got {weight}")
    return path, w


# Defaults of the knobs an openpi config's recipe sets (robots.recipe) when they are not given.
DEFAULTS = dict(model="pi05", augment=None, steps=2000, batch_size=32, lr=1e-3, warmup=100, end_lr_frac=0.1, ema=0.99)


def resolve_defaults(a):
    """Fill the knobs left unset: from --openpi-config's recipe, else DEFAULTS. Prints the recipe."""
    recipe = {}
    if a.openpi_config:
        import robots
        c = robots.openpi_config(a.openpi_config)
        if a.model not in (None, c.model):
            raise ValueError(f"--model {a.model}, but --openpi-config {a.openpi_config} is a {c.model}")
        recipe = dict(robots.recipe(a.openpi_config), model=c.model)
        if recipe.pop("lora", None) and not a.lora:
            a.lora = "llm,expert" if models.model_file(c.model).FLOW else "llm"
        print0(f"openpi config {a.openpi_config}: {json.dumps(recipe)} (flags given explicitly win)")
    if a.ema is None and a.lora and "ema" not in recipe:
        a.ema = 0.0  # openpi runs its LoRA configs without an EMA
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, recipe.get(k, v))
    if a.augment is None:  # openpi's recipe augments; the built-in task's figures were measured without
        a.augment = int(bool(a.data))


def validate_args(a):
    resolve_defaults(a)

    def need(ok, flag, allowed):
        if not ok:
            raise ValueError(f"{flag} {getattr(a, flag[2:].replace('-', '_'))!r}: {allowed}")
    for flag in ("--steps", "--batch-size", "--grad-accum", "--log-every", "--save-every", "--demo-episodes"):
        need(getattr(a, flag[2:].replace("-", "_")) >= 1, flag, "must be an integer >= 1")
    need(a.eval_episodes >= 0 and a.num_workers >= 0 and a.warmup >= 0, "--warmup",
         "--warmup, --eval-episodes and --num-workers must be >= 0")
    need(a.lr > 0 and math.isfinite(a.lr), "--lr", "must be a finite number > 0")
    need(0 <= a.end_lr_frac <= 1, "--end-lr-frac", "must be in [0, 1]")
    need(a.clip > 0, "--clip", "must be > 0")
    need(0 <= a.ema < 1, "--ema", "must be in [0, 1) (0 turns the EMA off)")
    need(a.dropout is None or 0 <= a.dropout < 1, "--dropout", "must be in [0, 1)")
    need(a.fast in (0, 1), "--fast", "must be 0 or 1")
    need(a.knowledge_insulation in (0, 1), "--knowledge-insulation", "must be 0 or 1")
    need(a.max_fast_tokens >= 2, "--max-fast-tokens", "must be >= 2 (the FAST tokens, then '|' and EOS)")
    need(a.chunk is None or a.chunk >= 1, "--chunk", "must be >= 1")
    need(a.rtc_max_delay >= 0, "--rtc-max-delay", "must be >= 0 (0 = off)")
    need(0 <= a.indicator_dropout < 1, "--indicator-dropout", "must be in [0, 1)")
    need(0 < a.rtc_prefix_share <= 1, "--rtc-prefix-share", "must be in (0, 1]")
    need(a.stop_after is None or a.stop_after >= 1, "--stop-after", "must be >= 1")
    need(set(filter(None, a.freeze.split(","))) <= {"vision", "llm"}, "--freeze", "a comma list of vision, llm")
    need(set(filter(None, a.lora.split(","))) <= {"llm", "expert"}, "--lora", "a comma list of llm, expert")
    ranks = a.lora_rank.split(",")
    need(len(ranks) == 2 and all(r.isdigit() and int(r) > 0 for r in ranks), "--lora-rank",
         "two positive integers, the ranks for llm,expert (e.g. 16,32)")
    if not a.init:
        models.preset(a.model, a.config)  # an unknown --config names the presets there are
    weights = [parse_data_spec(s)[1] for s in a.data or []]
    if any(w is not None for w in weights) and sum(w if w is not None else 1.0 for w in weights) <= 0:
        raise ValueError(f"--data weights {weights}: at least one dataset needs a weight > 0")
    if a.resume_allow:
        unknown = set(a.resume_allow.replace("-", "_").split(",")) - set(RESUME_MUST_MATCH)
        if unknown:
            raise ValueError(f"--resume-allow: unknown knobs {sorted(unknown)} (checked on resume: "
                             f"{', '.join(k.replace('_', '-') for k in RESUME_MUST_MATCH)})")


# ---------------------------------------------------------------------------------------------
# Distributed setup from torchrun's environment; rank 0 talks.


def setup_distributed():
    ddp = "RANK" in os.environ
    if ddp:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return ddp, rank, world, device


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


# ---------------------------------------------------------------------------------------------
# Data: datasets, openpi's transforms with the model's prompt format and targets, the mixture


def model_config(a):
    """The config to train: --init's config.json, or a preset; then the flags that change it."""
    cfg = models.read_config(a.init) if a.init else models.preset(a.model, a.config)
    if cfg.model != a.model:
        raise ValueError(f"--init {a.init} holds a {cfg.model} model, not --model {a.model}")
    changes = {}
    if a.openpi_config:  # its cameras, horizon, prompt length and format
        import robots
        changes.update(robots.model_overrides(a.openpi_config))
        if models.model_file(cfg.model).FLOW:
            changes["action_dim"] = 32  # openpi's model width: the robot's dims, zero-padded
    if a.chunk:
        changes["action_horizon"] = a.chunk
    if hasattr(cfg, "knowledge_insulation"):  # pi0.5
        changes["knowledge_insulation"] = bool(a.knowledge_insulation)
        if a.dropout is not None:
            changes["dropout"] = a.dropout
    return dataclasses.replace(cfg, **changes)


def open_datasets(a, cfg, rank, ddp):
    """-> datasets, their paths, mixture weights (None = by size). Writes the built-in demos once."""
    specs = a.data or [os.path.join("runs", "builtin_demos")]
    if not a.data:
        import sim
        if rank == 0 and not os.path.exists(os.path.join(specs[0], "tokenizer.model")):  # cached
            sim.main(["demos", "--episodes", str(a.demo_episodes), "--out", specs[0]])
        if ddp:
            dist.barrier()
    datasets, roots, weights = [], [], []
    for spec in specs:
        path, weight = parse_data_spec(spec)
        roots.append(path)
        if a.openpi_config:  # read as openpi reads it: repack, then the robot's own transforms
            import robots
            datasets.append(robots.open_robot_dataset(path, a.openpi_config, cfg.action_horizon))
        else:
            datasets.append(data.open_dataset(path, chunk_size=cfg.action_horizon))
        if a.recap:  # each frame's improvement indicator, from the sidecar recap.py wrote
            import recap
            datasets[-1] = recap.RecapDataset(datasets[-1], recap.read_advantages(recap.sidecar_path(path), datasets[-1]))
        weights.append(weight)
    # a weight of 0 stays 0 (that dataset is never drawn); datasets without one weigh 1
    weights = None if all(w is None for w in weights) else [1.0 if w is None else w for w in weights]
    return datasets, roots, weights


def camera_map(a, cfg, ds):
    """Model view -> this dataset's camera, or None (a zero image, masked), by name: --cameras,
    else the same names. A camera that feeds no view, or a view name the model lacks, is an error
    listing both sides: a wrist view in the base slot trains without a word otherwise."""
    views, cams = list(cfg.cameras), list(ds.cameras)
    if a.openpi_config:  # robots.RobotDataset already speaks in model views
        return views
    if a.cameras:
        pairs = dict(p.split("=", 1) if "=" in p else (p, "") for p in a.cameras.split(","))
        bad = {v: c for v, c in pairs.items() if v not in views or c not in cams}
        unused = [c for c in cams if c not in pairs.values()]
        if bad or unused:
            raise ValueError(f"--cameras {a.cameras}: the model's views are {views}, the dataset's cameras {cams}"
                             + (f"; not a view or not a camera: {bad}" if bad else "")
                             + (f"; cameras that feed no view: {unused}" if unused else ""))
        return [pairs.get(v) for v in views]
    if set(cams) <= set(views):
        return [v if v in cams else None for v in views]
    raise ValueError(f"the model's views {views} and the dataset's cameras {cams} do not match by name: "
                     "map them with --cameras VIEW=CAMERA,... (views left out are zero-filled and masked)")


def make_transforms(a, cfg, datasets, roots, sp, targets=None):
    """One data.Transforms per dataset: its cameras and norm stats, the model's prompt format."""
    spec = models.model_file(cfg.model)
    width = cfg.action_dim if spec.FLOW else None  # pi0-FAST pads nothing
    delta_mask = None
    if a.openpi_config:
        import robots
        delta_mask = robots.policy_settings(a.openpi_config, spec.USE_QUANTILES)["delta_mask"]
    out = []
    for ds, path in zip(datasets, roots):
        stats = a.norm_stats or os.path.join(path, "norm_stats.json")
        if not os.path.exists(stats):
            how = f" --openpi-config {a.openpi_config}" if a.openpi_config else ""
            raise FileNotFoundError(f"{stats}: no norm stats; run `python data.py stats {path}{how} --out {stats}`")
        data.check_stats_representation(stats, delta_mask)
        out.append(data.Transforms(
            tokenize=models.prompt_tokenizer(cfg, sp), cameras=camera_map(a, cfg, ds), norm_stats=stats,
            use_quantiles=spec.USE_QUANTILES, delta_mask=delta_mask, state_dim=width, action_dim=width,
            image_size=cfg.vision.image_size, targets=targets))
    return out


def model_chunks(ds, t, rows):
    """Action chunks of dataset rows as the model is trained on them: deltas (if the transforms
    take them), normalized; for fitting and sizing the FAST tokens."""
    chunks = ds.action_chunks(rows)[0]
    if t.delta_mask is not None:
        chunks = data.delta_actions(chunks, ds.state[rows], t.delta_mask)
    return data.normalize(chunks, t.norm_stats["actions"], t.use_quantiles, "actions")


def fit_or_load_fast(a, datasets, transforms, cfg, sp, rank, ddp, out):
    """The FAST tokenizer for pi0.5's discrete targets: given, or fitted on normalized chunks."""
    from fast_tokenizer import FASTTokenizer, fast_vocab_room
    if a.fast_tokenizer:
        return FASTTokenizer.load(a.fast_tokenizer)
    path = os.path.join(out, "fast_tokenizer.json")
    if rank == 0:
        rng = np.random.default_rng(a.seed)
        ds, t = datasets[0], transforms[0]
        rows = rng.choice(len(ds), size=min(len(ds), 4000), replace=False)
        chunks = model_chunks(ds, t, rows)
        # FAST ids land at the top of the vocabulary, clear of the text the prompts use
        vocab = fast_vocab_room(cfg.vocab_size, sp.vocab_size())
        os.makedirs(out, exist_ok=True)
        FASTTokenizer.fit(chunks, vocab_size=vocab, progress=False).save(path)
    if ddp:
        dist.barrier()
    fast = FASTTokenizer.load(path)
    print0(f"FAST tokenizer: vocab {fast.vocab_size}, fitted on {datasets[0].__class__.__name__} chunks -> {path}")
    return fast


def fast_target_length(a, fast, datasets, transforms):
    """Target slots for pi0.5's FAST tokens: the longest chunk of every dataset + "|" EOS, with
    25% headroom, at most --max-fast-tokens (a longer chunk is then an error naming both). Every
    chunk is measured, so no chunk met late in a long run can be longer than planned. Padding
    every sample to the cap instead would triple the VLM's sequence for nothing."""
    longest = 0
    for ds, t in zip(datasets, transforms):
        for start in range(0, len(ds), 4096):
            rows = np.arange(start, min(len(ds), start + 4096))
            chunks = model_chunks(ds, t, rows)
            longest = max(longest, max(len(fast.encode(c, clip=True)) for c in chunks) + 2)
    if longest > a.max_fast_tokens:
        raise ValueError(f"the longest action chunk needs {longest} FAST target slots (its tokens, then '|' "
                         f"and EOS), --max-fast-tokens is {a.max_fast_tokens}: raise it")
    return min(a.max_fast_tokens, int(math.ceil(longest * 1.25)))


def build_data(a, cfg, rank, world, ddp, out):
    """-> (cfg, loader, transforms, datasets, fast tokenizer or None, tokenizer path, loss terms).

    The loss terms name, for each loss the model returns, the batch key that counts its valid
    entries (None: a mean over examples): train_step weighs micro-batches by them."""
    datasets, roots, weights = open_datasets(a, cfg, rank, ddp)
    if not a.init:  # from scratch: the model's views are the first dataset's cameras
        cfg = dataclasses.replace(cfg, cameras=tuple(datasets[0].cameras))
    tok_path = a.tokenizer or os.path.join(a.init or roots[0], "tokenizer.model")
    sp = models.load_sentencepiece(tok_path)
    spec = models.model_file(cfg.model)
    transforms = make_transforms(a, cfg, datasets, roots, sp)
    fast, terms = None, {"flow": "action_masks"}
    if a.rtc_max_delay and not (spec.FLOW and a.rtc_max_delay < cfg.action_horizon):
        raise ValueError(f"--rtc-max-delay {a.rtc_max_delay}: needs a flow-matching model (pi0, pi05) and a "
                         f"delay below the action horizon {cfg.action_horizon}")
    if not spec.FLOW:  # pi0-FAST: the answer tokens are the prompt's causal postfix
        fast = fit_or_load_fast(a, datasets, transforms, cfg, sp, rank, ddp, out)
        cfg = dataclasses.replace(cfg, fast_vocab_size=fast.vocab_size, action_dim=int(datasets[0].actions.shape[1]))
        transforms = make_transforms(a, cfg, datasets, roots, sp, spec.target_tokenizer(cfg, sp, fast))
        terms = {"ce": None}  # a mean per example, then over examples (openpi's)
    elif a.fast:
        if spec.target_tokenizer is None:
            raise ValueError(f"--fast 1: {cfg.model} has no discrete targets (pi0.5 has)")
        fast = fit_or_load_fast(a, datasets, transforms, cfg, sp, rank, ddp, out)
        length = fast_target_length(a, fast, datasets, transforms)
        print0(f"FAST targets: {length} slots per sample")
        transforms = make_transforms(a, cfg, datasets, roots, sp, spec.target_tokenizer(cfg, sp, fast, length))
        terms = {"flow": "action_masks", "ce": "target_masks"}
    elif getattr(cfg, "knowledge_insulation", False):
        print0("note: knowledge insulation without --fast targets: the VLM gets no gradient at all")
    mixture = data.Mixture(datasets, transforms, weights)
    if a.batch_size % (world * a.grad_accum):
        raise ValueError(f"--batch-size {a.batch_size} must divide by world size {world} x --grad-accum {a.grad_accum}")
    loader = data.Loader(mixture, a.batch_size // world, seed=a.seed, rank=rank, world_size=world,
                         num_workers=a.num_workers)
    return cfg, loader, transforms, datasets, fast, tok_path, terms


# ---------------------------------------------------------------------------------------------
# Model: build or load, freeze, LoRA (lora.py), activation checkpointing, FSDP2 / DDP


def checkpointed(fn):
    """Recompute this function's activations in the backward pass instead of storing them."""
    from torch.utils.checkpoint import checkpoint
    return lambda *xs: checkpoint(fn, *xs, use_reentrant=False)


def build_model(a, cfg, device, ddp):
    """-> (model to call, the unwrapped model, trained parameters). Initial weights from --seed
    (the same on every rank: FSDP2 does not broadcast) or from --init."""
    torch.manual_seed(a.seed)
    model = models.build(cfg)
    if a.init:
        model.load_state_dict(models.load(a.init).state_dict())
    model.to(device)
    for part in filter(None, a.freeze.split(",")):
        {"vision": model.vision, "llm": model.llm.expert(0)}[part].requires_grad_(False)
    if a.lora:  # openpi's adapters and freeze rule (lora.py)
        ranks = dict(zip(["llm", "expert"], map(int, a.lora_rank.split(","))))
        apply_openpi_lora(model, a.lora.split(","), ranks, a.lora_init)
    layers = list(model.vision.blocks) + list(model.llm.layers)  # the per-layer units
    if a.checkpointing:
        for layer in layers:
            layer.forward = checkpointed(layer.forward)
    raw = model
    if a.fsdp:
        # one sharding unit per SigLIP block and per Gemma layer (all experts' weights of that
        # layer), and the root for the rest: parameters, gradients and AdamW state are sharded,
        # and only one layer's full weights are gathered at a time
        from torch.distributed.fsdp import fully_shard
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
    elif ddp:
        # pi0's last-layer prefix weights, and the whole VLM under knowledge insulation without
        # discrete targets, get no gradient from some losses: DDP must not wait for them
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    return model, raw, [p for p in raw.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# The step: LR schedule, noise and time, loss weighting over micro-batches and ranks, EMA


def get_lr(step, a):
    """Linear warm-up to the peak, then cosine decay to end_lr_frac * peak (openpi's schedule)."""
    if step < a.warmup:
        return a.lr * (step + 1) / (a.warmup + 1)
    progress = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    end = a.lr * a.end_lr_frac
    return end + 0.5 * (a.lr - end) * (1 + math.cos(math.pi * progress))


def draw_noise_and_time(step, global_batch, shape, seed, device):
    """Noise (G, C, A) and time (G,) for the whole global batch, a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    noise, time_ = sample_noise_and_time((global_batch, *shape), generator=g)
    return noise.to(device), time_.to(device)


def augment_images(images, step, a, cameras, rank, world):
    """openpi's augmentation (augment.py) of this rank's images; its random numbers are drawn for
    the whole global batch from (seed, step), like the noise, and each rank takes its own rows."""
    g = torch.Generator().manual_seed(a.seed * 1_000_003 + step + 3_333_333)  # apart from the noise's
    u = augment.draw(a.batch_size, len(cameras), g)
    return augment.augment(images, cameras, {k: v[rank::world] for k, v in u.items()})


def drop_indicator(batch, step, a, rank, world):
    """RECAP: a share --indicator-dropout of the samples lose their indicator (the prompt without
    it), drawn for the whole global batch from (seed, step) like the noise."""
    g = torch.Generator().manual_seed(a.seed * 1_000_003 + step + 5_555_555)
    drop = (torch.rand(a.batch_size, generator=g) < a.indicator_dropout)[rank::world].to(batch["tokens"].device)
    tokens = torch.where(drop[:, None], batch.pop("uncond_tokens"), batch["tokens"])
    masks = torch.where(drop[:, None], batch.pop("uncond_token_masks"), batch["token_masks"])
    return dict(batch, tokens=tokens, token_masks=masks)


def draw_delays(step, global_batch, max_delay, seed, device, share=1.0):
    """Training-time real-time chunking: a committed-prefix length per sample, uniform on
    {0, ..., max_delay} (0 keeps plain flow matching in the mix), a pure function of (seed, step).
    share < 1: only that share of the samples draws a prefix; the others get 0."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_777_777)  # apart from the noise's
    delay = torch.randint(0, max_delay + 1, (global_batch,), generator=g)
    if share < 1.0:  # drawn after the delays, so share = 1 keeps the numbers of runs before the flag
        delay = torch.where(torch.rand(global_batch, generator=g) < share, delay, 0)
    return delay.to(device)


def loss_shares(batch, terms, grad_accum, device, ddp, free=None):
    """Each loss term is a mean over its own valid entries (action steps for "flow", target
    tokens for "ce"). Weigh each micro-batch's term by its share of that term's valid entries
    in the whole global batch: the gradients (which DDP averages over ranks) are then exactly
    those of one mean over the global batch, whatever the padding on each rank.
    free (B, C): the steps not committed (training-time real-time chunking) -> {term: (grad_accum,) shares}."""
    shares = {}
    for term, key in terms.items():  # key None: the term is a mean over examples
        if key is None:
            per_example = torch.ones(len(batch["state"]), device=device)
        else:  # flow counts valid steps (every dim of one weighs the same), ce valid tokens
            mask = batch[key].any(-1) if key == "action_masks" else batch[key]
            if key == "action_masks" and free is not None:
                mask = mask & free
            per_example = mask.flatten(1).sum(1).float()
        counts = per_example.view(grad_accum, -1).sum(1)
        total = counts.sum()
        if ddp:
            dist.all_reduce(total)
        shares[term] = counts / total.clamp(min=1)
    return shares


def train_step(a, step, model, batch, terms, weights, flow, ctx):
    """Forward and backward over the micro-batches of one global batch -> {term: this rank's
    share of the global mean, "loss"}. The optimizer step is the caller's."""
    ddp, world, rank, device, autocast = ctx["ddp"], ctx["world"], ctx["rank"], ctx["device"], ctx["autocast"]
    cfg = ctx["cfg"]
    delay = free = None
    if flow:
        noise, time_ = draw_noise_and_time(step, a.batch_size, (cfg.action_horizon, cfg.action_dim), a.seed, device)
        # this rank's rows of the global batch (data.Loader interleaves samples across ranks)
        noise, time_ = noise[rank::world], time_[rank::world]
        if a.rtc_max_delay:
            delay = draw_delays(step, a.batch_size, a.rtc_max_delay, a.seed, device, a.rtc_prefix_share)[rank::world]
            free = free_steps(delay, cfg.action_horizon)
    if a.augment:
        batch = dict(batch, images=augment_images(batch["images"], step, a, cfg.cameras, rank, world))
    if "uncond_tokens" in batch:
        batch = drop_indicator(dict(batch), step, a, rank, world)
    shares = loss_shares(batch, terms, a.grad_accum, device, ddp, free)
    micro = len(batch["state"]) // a.grad_accum
    sums = {}
    for m in range(a.grad_accum):
        part = slice(m * micro, (m + 1) * micro)
        mb = {k: v[part] for k, v in batch.items()}
        sync = m == a.grad_accum - 1 or not ddp or a.fsdp
        with (model.no_sync() if not sync else contextlib.nullcontext()), autocast:
            if not flow:
                losses = model(mb)
            else:
                losses = model(mb, noise=noise[part], time=time_[part], delay=None if delay is None else delay[part])
            objective = sum(weights[t] * losses[t] * shares[t][m] for t in shares)
        (objective * world).backward()
        for t in shares:
            sums[t] = sums.get(t, 0.0) + losses[t].detach().float() * shares[t][m]
    sums["loss"] = sum(weights[t] * sums[t] for t in shares)
    return sums


def update_ema(ema, model, decay):
    with torch.no_grad():
        for e, p_ in zip(ema, model.parameters()):
            e.lerp_(p_.detach().float(), 1 - decay)


def estimate_mfu(model, cfg, batch, step_s, flops_peak=None):
    """Model FLOPs utilization: 3x the forward FLOPs of one training pass (the model's own cost
    model, attention included) per sample, against the GPU's dense bf16 peak (from its name)."""
    if flops_peak is None:
        peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "4090": 165e12, "L40": 181e12}
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        flops_peak = next((v for k, v in peak.items() if k in name), None)
    if flops_peak is None:
        return float("nan")
    P = len(cfg.cameras) * (cfg.vision.image_size // cfg.vision.patch) ** 2 + cfg.max_token_len
    flops, _ = model.cost(1, P, 1 if models.model_file(cfg.model).FLOW else 0)
    return 3 * sum(flops.values()) * batch / step_s / flops_peak


# ---------------------------------------------------------------------------------------------
# Export: the inference checkpoint (EMA weights, policy.json), and the built-in task's evaluation


def export(path, model, ema, run, dataset):
    """The inference checkpoint: EMA weights (if any), norm stats, tokenizer, policy.json.
    Every rank calls it (gathering FSDP shards is collective); rank 0 writes."""
    if ema is not None:
        backup = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p_, e in zip(model.parameters(), ema):
                p_.copy_(e)
    transforms = run["transforms"][0]
    policy = {"cameras": list(transforms.cameras), "use_quantiles": transforms.use_quantiles,
              "delta_mask": None if transforms.delta_mask is None else np.asarray(transforms.delta_mask).tolist(),
              "action_dim": int(dataset.actions.shape[1]), "state_dim": int(dataset.state.shape[1])}
    if run["openpi_config"]:  # serves like a converted checkpoint of that config: the robot's own requests
        import robots
        policy = robots.policy_settings(run["openpi_config"], transforms.use_quantiles)
    policy["rtc_max_delay"] = run["rtc_max_delay"]
    if run["recap"]:  # Policy asks for "positive"; cfg_beta > 1 is classifier-free guidance
        policy["recap"] = {"indicator": "positive", "cfg_beta": 1.0}
    merged = merged_state(model)
    if run["rank"] == 0:
        models.save_pretrained(model, path, norm_stats=transforms.norm_stats, extra_files=run["files"],
                               json_files={"policy.json": policy}, state_dict=merged)
    if ema is not None:
        with torch.no_grad():
            for p_, b in zip(model.parameters(), backup):
                p_.copy_(b)


def evaluate_builtin(a, final_dir, out, t_start):
    import sim
    from policy import Policy
    r = sim.evaluate(Policy(final_dir), "builtin", episodes=a.eval_episodes, record=4, progress=False)
    sim.save_eval(r, out, final_dir)
    print0(f"built-in task, {r['episodes']} unseen episodes: success {r['success_rate']:.1%} "
           f"(95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}), mean length {r['mean_length']:.1f} steps, "
           f"{r['infer_ms_per_call']:.0f} ms per policy call; wrote {out}/eval.json and eval.gif; "
           f"wall time {time.time() - t_start:.0f} s")


# ---------------------------------------------------------------------------------------------
# main: the phases in order


def log_step(log, bar, step, lr, grad_norm, sums, a, ctx, dt):
    if ctx["ddp"]:  # the shares already weigh each rank: the global value is the sum
        for k in sorted(sums):
            dist.all_reduce(sums[k])
    last = {k: round(v.item(), 6) for k, v in sums.items()}
    rec = dict(step=step, lr=lr, grad_norm=round(float(grad_norm), 4), step_s=round(dt, 4),
               samples_s=round(a.batch_size / dt, 1), **last)
    if ctx["device"].type == "cuda":
        rec["mfu"] = round(estimate_mfu(ctx["raw"], ctx["cfg"], a.batch_size, dt), 4)
    bar.set_postfix(loss=f"{last['loss']:.4f}")
    if log:
        log.write(json.dumps(rec) + "\n")
        log.flush()
        from tqdm import tqdm
        (tqdm.write if not bar.disable else print0)(" ".join(f"{k} {v}" for k, v in rec.items()))
        if ctx.get("wandb"):
            ctx["wandb"].log(rec, step=step)
    return last


def start_wandb(a, out):
    """Weights & Biases logging, as openpi, LeRobot and OpenTau do (WANDB_MODE=offline works with
    no network: the run is synced later with `wandb sync`)."""
    try:
        import wandb
    except ImportError:
        raise ImportError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project=a.wandb, config=vars(a), dir=out, name=os.path.basename(os.path.abspath(out)))


def plot_losses(log_path, png_path, width=640, height=360):
    """The run's loss curves from log.jsonl (every term, log scale) as a PNG, with pillow only."""
    from PIL import Image, ImageDraw
    recs = [json.loads(line) for line in open(log_path)]
    terms = [k for k in ("loss", "flow", "ce") if any(k in r for r in recs)]
    vals = [r[k] for r in recs for k in terms if r.get(k, 0) > 0]
    if len(recs) < 2 or not vals:
        return None
    lo, hi = math.log10(min(vals)), math.log10(max(vals)) + 1e-9
    s0, s1 = recs[0]["step"], recs[-1]["step"]
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    pad = 40
    xy = lambda s, v: (pad + (s - s0) / max(1, s1 - s0) * (width - 2 * pad),
                       height - pad - (math.log10(v) - lo) / (hi - lo) * (height - 2 * pad))
    draw.rectangle([pad, pad, width - pad, height - pad], outline=(180, 180, 180))
    colours = {"loss": (0, 0, 0), "flow": (31, 119, 180), "ce": (214, 39, 40)}
    for i, k in enumerate(terms):
        pts = [xy(r["step"], r[k]) for r in recs if r.get(k, 0) > 0]
        if len(pts) > 1:
            draw.line(pts, fill=colours[k], width=2)
        draw.text((pad + 70 * i, 10), k, fill=colours[k])
    draw.text((pad, height - pad + 8), f"step {s0}", fill="black")
    draw.text((width - pad - 70, height - pad + 8), f"step {s1}", fill="black")
    draw.text((2, pad), f"{10 ** hi:.3g}", fill="black")
    draw.text((2, height - pad - 12), f"{10 ** lo:.3g}", fill="black")
    img.save(png_path)
    return png_path


def main(a):
    t_start = time.time()
    validate_args(a)
    ddp, rank, world, device = setup_distributed()
    out = a.out or os.path.join("runs", a.model)
    ckpt_dir, final_dir = os.path.join(out, "checkpoints"), os.path.join(out, "final")
    cfg, loader, transforms, datasets, fast, tok_path, terms = build_data(a, model_config(a), rank, world, ddp, out)
    model, raw, params = build_model(a, cfg, device, ddp)
    torch.manual_seed(a.seed + 1 + rank)  # from here on (dropout) each rank draws its own numbers
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, a.b2), eps=1e-8, weight_decay=a.weight_decay)
    ema = [p.detach().clone().float() for p in raw.parameters()] if a.ema > 0 else None
    weights = {"flow": getattr(cfg, "flow_loss_weight", 1.0), "ce": getattr(cfg, "ce_loss_weight", 1.0)}
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    ctx = dict(ddp=ddp, world=world, rank=rank, device=device, cfg=cfg, raw=raw,
               autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"))
    fast_files = [] if fast is None else [a.fast_tokenizer if a.fast_tokenizer and os.path.isfile(a.fast_tokenizer)
                                          else os.path.join(out, "fast_tokenizer.json")]
    run = dict(rank=rank, world=world, transforms=transforms, files=[tok_path] + fast_files,
               rtc_max_delay=a.rtc_max_delay, openpi_config=a.openpi_config, recap=a.recap)
    step = 0
    if a.resume:
        resume_from = latest_checkpoint(ckpt_dir)
        step = load_training_state(resume_from, raw, opt, ema, loader, rank, a)
        print0(f"resumed from {resume_from} at step {step}")
    print0(f"model {a.model} ({a.config}): {models.count_params(raw):,} params, {sum(p.numel() for p in params):,} "
           f"trained; {sum(len(d) for d in datasets):,} frames from {len(datasets)} dataset(s); world {world} x micro-batch "
           f"{a.batch_size // (world * a.grad_accum)} x accum {a.grad_accum} = batch {a.batch_size}; "
           f"precision {precision}; device {device}")
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "log.jsonl"), "a") if rank == 0 else None
    ctx["wandb"] = start_wandb(a, out) if a.wandb and rank == 0 else None
    batches, flow = iter(loader), models.model_file(cfg.model).FLOW
    t0, first_loss, last = time.perf_counter(), None, {}
    from tqdm import tqdm
    bar = tqdm(total=a.steps, initial=step, disable=rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True)
    while step < a.steps:
        lr = get_lr(step, a)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        sums = train_step(a, step, model, batch, terms, weights, flow, ctx)
        if not torch.isfinite(sums["loss"]):
            raise FloatingPointError(f"loss is {sums['loss'].item()} at step {step} (data position "
                                     f"{loader.position}); the last good checkpoint is in {ckpt_dir}")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, a.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, raw, a.ema)
        step += 1
        bar.update(1)
        if step % a.log_every == 0 or step == a.steps:
            last = log_step(log, bar, step, lr, grad_norm, sums, a, ctx, (time.perf_counter() - t0) / a.log_every)
            first_loss = first_loss or last["loss"]
            t0 = time.perf_counter()
        if step % a.save_every == 0 or step == a.steps or step == a.stop_after:
            save_training_state(ckpt_dir, raw, opt, ema, loader, step, run, a)
        if step == a.stop_after:
            print0(f"stopping after step {step} as asked (--stop-after)")
            break
    bar.close()
    if log:
        log.close()
        png = plot_losses(os.path.join(out, "log.jsonl"), os.path.join(out, "loss.png"))
        if png:
            print0(f"loss curves: {png}")
        if ctx["wandb"]:
            ctx["wandb"].finish()
    if step == a.steps:
        export(final_dir, raw, ema, run, datasets[0])
        print0(f"loss {first_loss} -> {last.get('loss')}; exported {final_dir} (EMA weights)")
        if not a.data and a.eval_episodes and rank == 0:
            evaluate_builtin(a, final_dir, out, t_start)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(args)
