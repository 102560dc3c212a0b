"""Training knobs as data: one TrainConfig, openpi's recipes as named instances, the command line.

Every knob train.py has is a field of `TrainConfig`, with what it does. The command line is made
from the fields (`--batch-size` is `batch_size`), and a run resolves its knobs in one place:

    the flags given  >  the openpi config's recipe (--openpi-config NAME)  >  TrainConfig's defaults

The defaults are the built-in task's (a tiny model on the CPU). `OPENPI` is openpi's TrainConfig
defaults as our knobs, and `RECIPES[name]` openpi's config `name` (values from openpi's
training/config.py, commit 15a9616): a fine-tune with --openpi-config trains as openpi trains that
config, unless a flag says otherwise. Derived values (the EMA of LoRA runs, augmentation with a
dataset) are filled in by `resolve`, and the resolved config is printed at start.
"""

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields, replace

import models
import robots


def knob(default, help, kind=None, resume=True):
    """A TrainConfig field: its default, its help, the command line's type (kind; default: the
    default's type) and whether --resume requires it unchanged (resume=False: it may change)."""
    return field(default=default, metadata={"help": help, "kind": kind or type(default), "resume": resume})


@dataclass
class TrainConfig:
    # what to train, from what
    model: str = knob("pi05", "which model: pi0, pi05, pi0_fast (default: pi05, or the --openpi-config's)")
    openpi_config: str = knob(None, "train as openpi's config NAME (robots.py): its repack, robot transforms, deltas, "
                              "cameras, horizon and recipe; the export serves like a converted checkpoint", str)
    config: str = knob("tiny", "model preset: tiny (CPU demo, tests) or full (openpi's sizes)")
    init: str = knob(None, "checkpoint directory to start from (e.g. from convert_jax.py)", str)
    data: list = knob(None, "datasets (LeRobot dir, HDF5 file or dir), each optionally PATH:WEIGHT; "
                      "none = the built-in task", list)
    cameras: str = knob(None, "which dataset camera feeds each model view, VIEW=CAMERA,... (e.g. "
                        "base_0_rgb=observation.images.top); views left out are zero-filled and masked. With "
                        "--openpi-config: the robot's camera keys, e.g. cam_high=observation.images.top", str)
    norm_stats: str = knob(None, "norm_stats.json for all datasets (default: each dataset's own)", str)
    tokenizer: str = knob(None, "SentencePiece model (default: --init's, or the built-in task's)", str)
    chunk: int = knob(None, "action horizon C (default: the config's)", int)
    max_token_len: int = knob(None, "the prompt's token budget, with pi0-FAST's answer (default: the config's)", int)
    # the schedule and the optimizer (openpi: warm-up, cosine, AdamW, clip 1, EMA)
    steps: int = knob(2000, "optimizer steps")
    batch_size: int = knob(32, "global batch size: all ranks and accumulation steps together")
    grad_accum: int = knob(1, "gradient accumulation steps per optimizer step", resume=False)
    lr: float = knob(1e-3, "peak learning rate")
    warmup: int = knob(100, "linear warm-up steps (from lr / (warmup + 1) to lr)")
    decay_steps: int = knob(None, "the step at which the cosine reaches its end (openpi: 30000 whatever --steps; "
                            "default: --steps)", int)
    end_lr_frac: float = knob(0.1, "final LR as a fraction of the peak")
    weight_decay: float = knob(1e-10, "AdamW weight decay, on every trained parameter (openpi's)")
    b2: float = knob(0.95, "AdamW beta2 (openpi's)")
    clip: float = knob(1.0, "gradient clipping by global norm")
    ema: float = knob(0.99, "EMA decay of the weights, 0 = off; the EMA is what gets exported")
    # what learns, and how
    dropout: float = knob(None, "pi0.5 dropout (default: the config's)", float)
    freeze: str = knob("", "comma list of parts not to train: vision, llm (the PaliGemma expert)")
    lora: str = knob("", "comma list of Gemma experts trained by LoRA only: llm, expert (lora.py)")
    lora_rank: str = knob("16,32", "LoRA ranks for llm,expert (openpi: 16 and 32; alpha = rank)")
    lora_init: str = knob("openpi", "LoRA factors: openpi (both N(0, 0.01)) or zero (B = 0)")
    fast_targets: int = knob(0, "pi0.5: co-train the VLM on the FAST tokens of the actions (pi0-FAST: always)")
    knowledge_insulation: int = knob(0, "pi0.5: stop the flow loss's gradient at the VLM (with --fast-targets 1)")
    fast_tokenizer: str = knob(None, "FAST tokenizer: openpi's universal one (its HF folder), a file of ours, or "
                               "'fit' (fit one on the data); default: --init's own, else fitted on the built-in task",
                               str)
    max_fast_tokens: int = knob(128, "pi0.5: most FAST target slots per sample (fewer if the data needs fewer)")
    too_long: str = knob("truncate", "a training prompt with its FAST answer longer than the model's budget: "
                         "truncate (openpi's, with a warning) or error")
    augment: int = knob(None, "openpi's image augmentation (augment.py): default 1 with --data, 0 on the "
                        "built-in task", int)
    conditions: int = knob(0, "condition the prompt on each frame's text from <data>.conditions.json (RECAP's "
                           "advantage indicator); the export serves the file's 'serve' condition")
    condition_dropout: float = knob(0.3, "share of samples trained without their condition (one model, "
                                    "conditioned and not: classifier-free guidance)")
    mask_padded_steps: int = knob(0, "leave the action steps past an episode's end out of the flow loss (openpi "
                                  "trains on them: they repeat the last action)")
    rtc_max_delay: int = knob(0, "training-time real-time chunking: a committed prefix of 0..D steps, clean at "
                              "t = 0 (pi0 / pi0.5; 0 = off)")
    rtc_prefix_share: float = knob(1.0, "training-time RTC: share of samples that draw a prefix at all")
    # the machine
    precision: str = knob(None, "autocast dtype: bf16 or fp32 (default: bf16 on GPU, fp32 on CPU)", str)
    fsdp: bool = knob(False, "shard parameters and optimizer state with FSDP2, per layer", resume=False)
    checkpointing: bool = knob(False, "activation checkpointing per layer (SigLIP and Gemma)", resume=False)
    num_workers: int = knob(0, "data loader workers per rank", resume=False)
    seed: int = knob(0, "seed of the data stream, noise, time and init")
    # the run
    out: str = knob(None, "run directory (default: runs/<model>)", str, resume=False)
    resume: bool = knob(False, "continue the run in --out from its newest complete checkpoint", resume=False)
    overwrite: bool = knob(False, "replace the run already in --out (its checkpoints, final/, log); without it a "
                           "fresh run refuses a non-empty --out", resume=False)
    resume_allow: str = knob("", "comma list of knobs --resume may see changed (e.g. steps,lr)", resume=False)
    log_every: int = knob(50, "steps between log lines", resume=False)
    save_every: int = knob(1000, "steps between checkpoints", resume=False)
    eval_episodes: int = knob(100, "closed-loop episodes at the end (built-in task)", resume=False)
    demo_episodes: int = knob(3000, "built-in task: demonstrations to generate")
    task: str = knob("reach", "the built-in task trained without --data: reach, or catch (the dynamic one)")
    stop_after: int = knob(None, "exit after this step (to test --resume)", int, resume=False)
    wandb: str = knob(None, "log to Weights & Biases under this project name (pip install wandb)", str,
                      resume=False)


# openpi's TrainConfig defaults as our knobs: CosineDecaySchedule (warm-up 1k steps to 2.5e-5, cosine
# down to 2.5e-6 at step 30k, whatever the number of steps), AdamW b2 0.95, clip 1, weight decay
# 1e-10, EMA 0.99, batch 32, 30k steps; image augmentation on
OPENPI = TrainConfig(steps=30_000, batch_size=32, lr=2.5e-5, warmup=1_000, decay_steps=30_000, end_lr_frac=0.1,
                     ema=0.99, augment=1)
_FULL_DROID = dict(batch_size=256, steps=100_000, lr=5e-5, warmup=1_000, decay_steps=1_000_000, end_lr_frac=1.0)
_RECIPES = {  # each openpi config's overrides of OPENPI
    "pi0_aloha_pen_uncap": dict(steps=20_000),
    "pi05_aloha_pen_uncap": dict(steps=20_000, batch_size=64),
    "pi0_aloha_sim": dict(steps=20_000),
    "pi05_droid_finetune": dict(steps=20_000),
    "pi05_full_droid_finetune": _FULL_DROID,
    "pi0_fast_full_droid_finetune": _FULL_DROID,
    "pi05_libero": dict(batch_size=256, lr=5e-5, warmup=10_000, decay_steps=1_000_000, end_lr_frac=1.0, ema=0.999),
    "pi0_libero_low_mem_finetune": dict(lora="llm,expert", ema=0.0),  # LoRA, no EMA
    **{name: dict(batch_size=128, steps=1_000, lr=5e-5, warmup=1_000, decay_steps=1_000_000, end_lr_frac=1.0)
       for name in ("pi05_droid_jointpos_polaris", "pi0_droid_jointpos_polaris", "pi0_droid_jointpos_100k_polaris",
                    "pi0_fast_droid_jointpos_polaris")},
    "pi0_fast_libero_low_mem_finetune": dict(lora="llm", ema=0.0),
}
RECIPES = {name: replace(OPENPI, model=c.model, openpi_config=name, **_RECIPES.get(name, {}))
           for name, c in robots.OPENPI_CONFIGS.items()}


# ----------------------------------------------------------------------------------------------
# The command line, made from the fields


def parser():
    p = argparse.ArgumentParser(description="Train pi0 / pi0.5 / pi0-FAST (train.py's docstring has examples).",
                                argument_default=argparse.SUPPRESS)  # only the flags given land in the namespace
    for f in fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), f.metadata["kind"]
        default = "" if f.default is None else f" (default: {f.default})"
        if kind is bool:
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif kind is list:
            p.add_argument(flag, nargs="*", help=f.metadata["help"])
        else:
            p.add_argument(flag, type=kind, help=f.metadata["help"] + default)
    return p


def parse_args(argv=None):
    """argv -> (the resolved TrainConfig, the names of the flags given)."""
    given = vars(parser().parse_args(argv))
    return resolve(given), set(given)


def resolve(given):
    """The knobs of a run: the flags given, over the openpi config's recipe, over the defaults."""
    if given.get("openpi_config"):
        name = given["openpi_config"]
        robots.openpi_config(name)  # an unknown name lists the known ones
        base = RECIPES[name]
        if given.get("model", base.model) != base.model:
            raise ValueError(f"--model {given['model']}, but --openpi-config {name} is a {base.model}")
    else:
        base = TrainConfig()
    cfg = replace(base, **given)
    if "ema" not in given and cfg.lora and not base.lora:
        cfg.ema = 0.0  # openpi runs its LoRA configs without an EMA
    if cfg.augment is None:  # openpi's recipe augments; the built-in task's figures were measured without
        cfg.augment = int(bool(cfg.data))
    validate(cfg)
    return cfg


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


def validate(c):
    """A bad value stops the run before any work, saying what is allowed."""
    def need(ok, name, allowed):
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(c, name)!r}: {allowed}")
    for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every", "demo_episodes"):
        need(getattr(c, name) >= 1, name, "must be an integer >= 1")
    for name in ("warmup", "eval_episodes", "num_workers"):
        need(getattr(c, name) >= 0, name, "must be >= 0")
    need(c.decay_steps is None or c.decay_steps >= 1, "decay_steps", "must be >= 1")
    need(c.lr > 0 and math.isfinite(c.lr), "lr", "must be a finite number > 0")
    need(0 <= c.end_lr_frac <= 1, "end_lr_frac", "must be in [0, 1]")
    need(c.clip > 0, "clip", "must be > 0")
    need(0 <= c.b2 < 1, "b2", "must be in [0, 1)")
    need(c.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(c.max_token_len is None or c.max_token_len >= 8, "max_token_len", "must be >= 8")
    need(0 <= c.ema < 1, "ema", "must be in [0, 1) (0 turns the EMA off)")
    need(c.dropout is None or 0 <= c.dropout < 1, "dropout", "must be in [0, 1)")
    for name in ("fast_targets", "knowledge_insulation", "conditions", "augment", "mask_padded_steps"):
        need(getattr(c, name) in (0, 1), name, "must be 0 or 1")
    need(c.max_fast_tokens >= 2, "max_fast_tokens", "must be >= 2 (the FAST tokens, then '|' and EOS)")
    need(c.chunk is None or c.chunk >= 1, "chunk", "must be >= 1")
    need(c.task in ("reach", "catch"), "task", "must be reach or catch")
    need(c.rtc_max_delay >= 0, "rtc_max_delay", "must be >= 0 (0 = off)")
    need(0 <= c.condition_dropout < 1, "condition_dropout", "must be in [0, 1)")
    need(0 < c.rtc_prefix_share <= 1, "rtc_prefix_share", "must be in (0, 1]")
    need(c.stop_after is None or c.stop_after >= 1, "stop_after", "must be >= 1")
    need(c.precision in (None, "bf16", "fp32"), "precision", "bf16 or fp32")
    need(c.too_long in ("truncate", "error"), "too_long", "truncate (openpi's) or error")
    need(c.lora_init in ("openpi", "zero"), "lora_init", "openpi (both factors N(0, 0.01)) or zero (B = 0)")
    need(set(filter(None, c.freeze.split(","))) <= {"vision", "llm"}, "freeze", "a comma list of vision, llm")
    need(set(filter(None, c.lora.split(","))) <= {"llm", "expert"}, "lora", "a comma list of llm, expert")
    ranks = c.lora_rank.split(",")
    need(len(ranks) == 2 and all(r.isdigit() and int(r) > 0 for r in ranks), "lora_rank",
         "two positive integers, the ranks for llm,expert (e.g. 16,32)")
    models.spec(c.model)  # an unknown model names the models there are
    if not c.init:
        models.preset(c.model, c.config)  # an unknown --config names the presets there are
    weights = [parse_data_spec(s)[1] for s in c.data or []]
    if any(w is not None for w in weights) and sum(w if w is not None else 1.0 for w in weights) <= 0:
        raise ValueError(f"--data weights {weights}: at least one dataset needs a weight > 0")
    unknown = set(filter(None, c.resume_allow.replace("-", "_").split(","))) - set(resume_knobs()) - {"data"}
    if unknown:
        raise ValueError(f"--resume-allow: unknown knobs {sorted(unknown)} (checked on resume: "
                         f"{', '.join(k.replace('_', '-') for k in resume_knobs())})")


def describe(cfg, given):
    """One line for the log: openpi's recipe a --openpi-config run follows, and what the flags changed."""
    if not cfg.openpi_config:
        return None
    recipe = as_dict(RECIPES[cfg.openpi_config])
    changed = {k: v for k, v in as_dict(cfg).items() if k in given and v != recipe[k]}
    keep = ("steps", "batch_size", "lr", "warmup", "decay_steps", "end_lr_frac", "clip", "ema", "weight_decay",
            "freeze", "lora", "precision")
    return (f"openpi config {cfg.openpi_config}: openpi's recipe {json.dumps({k: recipe[k] for k in keep if k in recipe})}"
            f"; changed by flags: {json.dumps(changed) if changed else 'nothing'}")


def resume_knobs():
    """The knobs a resumed run must share with the run it continues: they change its math."""
    return [f.name for f in fields(TrainConfig) if f.metadata["resume"]]


def as_dict(c):
    return dataclasses.asdict(c)
