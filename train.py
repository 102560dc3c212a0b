"""Train pi0 / pi0.5 / pi0-FAST. One process or many, one machine or several.

    python train.py --model pi05                                   # the built-in task, tiny model, CPU
    torchrun --standalone --nproc_per_node=2 train.py --model pi05
    torchrun --nproc_per_node=8 train.py --model pi05 --config full --init ckpt/pi05_base \\
        --data my_lerobot_dataset --batch-size 32 --steps 30000 --lr 2.5e-5
    torchrun --nproc_per_node=8 train.py --openpi-config pi0_aloha_pen_uncap --config full \\
        --init ckpt/pi0_base --data my_aloha_dataset     # openpi's robot transforms and recipe

The knobs are recipes.py's TrainConfig (`python train.py --help`). With no --data it trains on the
built-in task (sim.py; demonstrations generated once, cached) and ends with a closed-loop
evaluation. The recipe follows openpi's JAX trainer, where the PyTorch ports lost quality: fp32
master weights and fp32 AdamW state (bf16 only inside autocast on GPU), AdamW b2 = 0.95, warmup +
cosine LR, gradient clipping at 1, an EMA of the weights that is what gets evaluated and exported.

The noise and flow-matching time of every sample are drawn from a generator seeded by
(seed, step) over the whole global batch, and each rank takes its own rows: so N processes compute
exactly the loss one process would on the same global batch, and a resumed run repeats the
uninterrupted one.

The file reads top to bottom, one section per phase (distributed setup, data, model, the step,
export, logging), then a short main() that calls them in order. The run's crash-safe checkpoints
live in checkpoints.py, LoRA in lora.py, the knobs in recipes.py.
"""

import dataclasses
import glob
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
import fast_targets
import models
import plots
import recipes
import robots
import sim
import train_step
from checkpoints import data_fingerprint, latest_checkpoint, load_training_state, save_training_state
from cli import main_guard
from fast_tokenizer import FASTTokenizer, fast_vocab_room
from fast_universal import load_tokenizer
from loader import Loader, Mixture
from lora import apply_openpi_lora, merged_state
from paligemma import prefix_length
from policy import Policy
from readers import open_dataset

# ---------------------------------------------------------------------------------------------
# Distributed setup from torchrun's environment; rank 0 talks.


def setup_distributed():
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
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


def model_config(args):
    """The config to train: --init's config.json, or a preset; then the flags that change it."""
    cfg = models.read_config(args.init) if args.init else models.preset(args.model, args.config)
    if cfg.model != args.model:
        raise ValueError(f"--init {args.init} holds a {cfg.model} model, not --model {args.model}")
    changes = {}
    if args.openpi_config:  # its cameras, horizon, prompt length and format
        changes.update(robots.model_overrides(args.openpi_config))
        if models.spec(cfg).flow:  # openpi's model width: the robot's dims, zero-padded (32 unless the config says)
            changes.setdefault("action_dim", 32)
    if args.chunk:
        changes["action_horizon"] = args.chunk
    if args.max_token_len:
        changes["max_token_len"] = args.max_token_len
    options = {"knowledge_insulation": bool(args.knowledge_insulation), "dropout": args.dropout}
    for name, value in options.items():  # the model's own training options (pi0.5's)
        if value is not None and name in models.spec(cfg).options:
            changes[name] = value
        elif value:
            raise ValueError(f"--{name.replace('_', '-')} {value}: {cfg.model} has no such option "
                             f"(its options: {', '.join(models.spec(cfg).options) or 'none'})")
    return dataclasses.replace(cfg, **changes)


def open_datasets(args, cfg, rank, ddp):
    """-> datasets, their paths, mixture weights (None = by size). Writes the built-in demos once,
    one cache per --demo-episodes (tokenizer.model is written last: its presence means complete)."""
    cache = {"reach": "builtin", "catch": "catch"}[args.task]
    specs = args.data or [os.path.join("runs", f"{cache}_demos_{args.demo_episodes}")]
    if not args.data:
        if rank == 0 and not os.path.exists(os.path.join(specs[0], "tokenizer.model")):
            sim.main(["demos", "--task", args.task, "--episodes", str(args.demo_episodes), "--out", specs[0]])
        if ddp:
            dist.barrier()
        found = len(glob.glob(os.path.join(specs[0], "*.hdf5")))
        if found != args.demo_episodes:
            raise ValueError(f"{specs[0]} holds {found} demonstrations, not {args.demo_episodes}: remove it to "
                             f"generate them again")
    datasets, roots, weights = [], [], []
    for spec in specs:
        path, weight = recipes.parse_data_spec(spec)
        roots.append(path)
        if args.openpi_config:  # read as openpi reads it: repack, then the robot's own transforms
            datasets.append(robots.open_robot_dataset(path, args.openpi_config, cfg.action_horizon,
                                                      robots.parse_cameras(args.cameras)))
        else:
            datasets.append(open_dataset(path, chunk_size=cfg.action_horizon))
        if args.conditions:  # each frame's prompt condition, from the sidecar beside the dataset
            table = data.read_conditions(data.conditions_path(path), datasets[-1])
            datasets[-1] = data.ConditionedDataset(datasets[-1], table)
        weights.append(weight)
    # a weight of 0 stays 0 (that dataset is never drawn); datasets without one weigh 1
    weights = None if all(w is None for w in weights) else [1.0 if w is None else w for w in weights]
    return datasets, roots, weights


def camera_map(args, cfg, ds):
    """Model view -> this dataset's camera, or None (a zero image, masked), by name: --cameras,
    else the same names. A camera that feeds no view, or a view name the model lacks, is an error
    listing both sides: a wrist view in the base slot trains without a word otherwise."""
    views, cams = list(cfg.cameras), list(ds.cameras)
    if args.openpi_config:  # robots.RobotDataset already speaks in model views (--cameras mapped its input)
        return views
    if args.cameras:
        pairs = robots.parse_cameras(args.cameras)
        bad = {v: c for v, c in pairs.items() if v not in views or c not in cams}
        unused = [c for c in cams if c not in pairs.values()]
        if bad or unused:
            raise ValueError(f"--cameras {args.cameras}: the model's views are {views}, the dataset's cameras {cams}"
                             + (f"; not a view or not a camera: {bad}" if bad else "")
                             + (f"; cameras that feed no view: {unused}" if unused else ""))
        return [pairs.get(v) for v in views]
    if set(cams) <= set(views):
        return [v if v in cams else None for v in views]
    raise ValueError(f"the model's views {views} and the dataset's cameras {cams} do not match by name: "
                     "map them with --cameras VIEW=CAMERA,... (views left out are zero-filled and masked)")


def base_stats(args):
    """The base checkpoint's norm stats where openpi's config reuses them (its ALOHA pen_uncap and
    DROID fine-tunes normalize with the pretraining's `trossen` / `droid` stats), else None."""
    if args.openpi_config and robots.openpi_config(args.openpi_config).base_stats and args.init:
        path = os.path.join(args.init, "norm_stats.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: {args.openpi_config} normalizes with its base checkpoint's stats (openpi's "
                                    f"AssetsConfig); convert the base with --openpi-config, or pass --norm-stats")
        print0(f"norm stats: {path} (the base checkpoint's, as {args.openpi_config} does)")
        return path
    return None


def make_transforms(args, cfg, datasets, roots, sp, targets=None):
    """One data.Transforms per dataset: its cameras and norm stats, the model's prompt format."""
    spec = models.spec(cfg)
    width = cfg.action_dim if spec.flow else None  # pi0-FAST pads nothing
    delta_mask = robots.policy_settings(args.openpi_config)["delta_mask"] if args.openpi_config else None
    out = []
    for ds, path in zip(datasets, roots):
        stats = args.norm_stats or base_stats(args) or os.path.join(path, "norm_stats.json")
        if not os.path.exists(stats):
            how = f" --openpi-config {args.openpi_config}" if args.openpi_config else ""
            raise FileNotFoundError(f"{stats}: no norm stats; run `python data.py stats {path}{how}`")
        data.check_stats_representation(stats, delta_mask, args.openpi_config)
        out.append(data.Transforms(
            tokenize=models.prompt_tokenizer(cfg, sp), cameras=camera_map(args, cfg, ds), norm_stats=stats,
            use_quantiles=spec.quantile_norm, delta_mask=delta_mask, state_dim=width, action_dim=width,
            image_size=cfg.vision.image_size, targets=targets, mask_padded_steps=bool(args.mask_padded_steps)))
    return out


def fit_or_load_fast(args, datasets, transforms, cfg, sp, rank, ddp, out):
    """The FAST tokenizer of the discrete targets (fast_targets.tokenizer_source): read, or fitted on the
    normalized chunks of the first dataset."""
    path, _ = fast_targets.tokenizer_source(args.fast_tokenizer, args.init, cfg, sp, out)
    if path != os.path.join(out, "fast_tokenizer.json"):
        fast = load_tokenizer(path)
        print0(f"FAST tokenizer: {path}, vocab {fast.vocab_size}")
        return fast_targets.check_room(fast, cfg, sp, path)
    if rank == 0:
        # FAST ids land at the top of the vocabulary, clear of the text the prompts use
        vocab = fast_vocab_room(cfg.vocab_size, sp.vocab_size())
        os.makedirs(out, exist_ok=True)
        fast_targets.fit_tokenizer(datasets[0], transforms[0], vocab, args.seed).save(path)
    if ddp:
        dist.barrier()
    fast = FASTTokenizer.load(path)
    print0(f"FAST tokenizer: vocab {fast.vocab_size}, fitted on {datasets[0].__class__.__name__} chunks -> {path}")
    return fast_targets.check_room(fast, cfg, sp, path)


def build_data(args, cfg, rank, world, ddp, out):
    """-> (cfg, loader, transforms, datasets, FAST tokenizer or None, tokenizer path)."""
    datasets, roots, weights = open_datasets(args, cfg, rank, ddp)
    if not args.init:  # from scratch: the model's views are the first dataset's cameras
        cfg = dataclasses.replace(cfg, cameras=tuple(datasets[0].cameras))
    tok_path = args.tokenizer or os.path.join(args.init or roots[0], "tokenizer.model")
    sp = models.load_sentencepiece(tok_path)
    spec = models.spec(cfg)
    transforms = make_transforms(args, cfg, datasets, roots, sp)
    if args.rtc_max_delay and not (spec.flow and args.rtc_max_delay < cfg.action_horizon):
        raise ValueError(f"--rtc-max-delay {args.rtc_max_delay}: needs a flow-matching model (pi0, pi05) and a "
                         f"delay below the action horizon {cfg.action_horizon}")
    if args.fast_targets and spec.fast_targets is None:
        raise ValueError(f"--fast-targets 1: {cfg.model} has no discrete targets (pi0.5 has)")
    fast = None
    if spec.fast_targets_required or args.fast_targets:
        fast = fit_or_load_fast(args, datasets, transforms, cfg, sp, rank, ddp, out)
        length = None
        if spec.fast_targets_required:  # pi0-FAST: the answer tokens are the prompt's causal postfix
            cfg = dataclasses.replace(cfg, fast_vocab_size=fast.vocab_size, action_dim=int(datasets[0].actions.shape[1]))
        else:
            length = fast_targets.target_length(fast, datasets, transforms, args.max_fast_tokens)
            print0(f"FAST targets: {length} slots per sample")
        transforms = make_transforms(args, cfg, datasets, roots, sp, spec.fast_targets(cfg, sp, fast, length, args.too_long))
    elif args.knowledge_insulation:
        print0("note: knowledge insulation without --fast-targets: the VLM gets no gradient at all")
    mixture = Mixture(datasets, transforms, weights)
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} must divide by world size {world} x --grad-accum "
                         f"{args.grad_accum}")
    loader = Loader(mixture, args.batch_size // world, seed=args.seed, rank=rank, world_size=world,
                         num_workers=args.num_workers)
    return cfg, loader, transforms, datasets, fast, tok_path


# ---------------------------------------------------------------------------------------------
# Model: build or load, freeze, LoRA (lora.py), activation checkpointing, FSDP2 / DDP


def checkpointed(fn):
    """Recompute this function's activations in the backward pass instead of storing them."""
    return lambda *xs: checkpoint(fn, *xs, use_reentrant=False)


def wrap(model, fsdp=False, checkpointing=False, ddp=False):
    """The model as training runs it: per-layer activation checkpointing, and FSDP2 (one sharding
    unit per SigLIP block and per Gemma layer, all experts' weights of that layer, and the root for
    the rest: only one layer's full weights are gathered at a time) or DDP."""
    layers = list(model.vision.blocks) + list(model.llm.layers)
    if checkpointing:
        for layer in layers:
            layer.forward = checkpointed(layer.forward)
    if fsdp:
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    # pi0's last-layer prefix weights, and the whole VLM under knowledge insulation without
    # discrete targets, get no gradient from some losses: DDP must not wait for them
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if ddp else model


def build_model(args, cfg, device, ddp):
    """-> (model to call, the unwrapped model, trained parameters). Initial weights from --seed
    (the same on every rank: FSDP2 does not broadcast) or from --init."""
    torch.manual_seed(args.seed)
    model = models.build(cfg)
    if args.init:
        model.load_state_dict(models.load(args.init).state_dict())
    model.to(device)
    for part in filter(None, args.freeze.split(",")):
        {"vision": model.vision, "llm": model.llm.expert(0)}[part].requires_grad_(False)
    if args.lora:  # openpi's adapters and freeze rule (lora.py)
        ranks = dict(zip(["llm", "expert"], map(int, args.lora_rank.split(","))))
        apply_openpi_lora(model, args.lora.split(","), ranks, args.lora_init)
    return wrap(model, args.fsdp, args.checkpointing, ddp), model, [p for p in model.parameters() if p.requires_grad]


def estimate_mfu(model, cfg, batch, step_s, flops_peak=None):
    """Model FLOPs utilization: 3x the forward FLOPs of one training pass (the model's own cost
    model, attention included) per sample, against the GPU's dense bf16 peak (from its name)."""
    if flops_peak is None:
        peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "4090": 165e12, "L40": 181e12}
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        flops_peak = next((v for k, v in peak.items() if k in name), None)
    if flops_peak is None:
        return float("nan")
    P = prefix_length(cfg)
    flops, _ = model.cost(1, P, 1 if models.spec(cfg).flow else 0)
    return 3 * sum(flops.values()) * batch / step_s / flops_peak


# ---------------------------------------------------------------------------------------------
# Export: the inference checkpoint (EMA weights, policy.json), and the built-in task's evaluation


def policy_json(args, transforms, dataset, conditions):
    """What Policy needs to serve the export (models.py's checkpoint directory)."""
    if args.openpi_config:  # serves like a converted checkpoint of that config: the robot's own requests
        policy = robots.policy_settings(args.openpi_config)
    else:
        policy = {"cameras": list(transforms.cameras), "use_quantiles": transforms.use_quantiles,
                  "delta_mask": None if transforms.delta_mask is None else np.asarray(transforms.delta_mask).tolist(),
                  "action_dim": int(dataset.actions.shape[1]), "state_dim": int(dataset.state.shape[1])}
    policy["rtc_max_delay"] = args.rtc_max_delay
    if conditions:  # Policy asks for the condition the data names; cfg_beta > 1 is classifier-free guidance
        policy["condition"] = {"text": conditions, "cfg_beta": 1.0}
    return policy


def export(path, model, ema, run):
    """The inference checkpoint: EMA weights (if any), norm stats, tokenizer, policy.json.
    Every rank calls it (gathering FSDP shards is collective); rank 0 writes."""
    if ema is not None:
        backup = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p_, e in zip(model.parameters(), ema):
                p_.copy_(e)
    merged = merged_state(model)
    if run["rank"] == 0:
        models.save_pretrained(model, path, norm_stats=run["transforms"][0].norm_stats, extra_files=run["files"],
                               json_files={"policy.json": run["policy"]}, state_dict=merged)
    if ema is not None:
        with torch.no_grad():
            for p_, b in zip(model.parameters(), backup):
                p_.copy_(b)


def evaluate_builtin(args, final_dir, out, t_start):
    r = sim.evaluate(Policy(final_dir), sim.TASK_ENVS[args.task], episodes=args.eval_episodes, record=4,
                     progress=False)
    sim.save_eval(r, out, final_dir)
    print0(f"built-in task ({args.task}), {r['episodes']} unseen episodes: success {r['success_rate']:.1%} "
           f"(95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}), mean length {r['mean_length']:.1f} steps, "
           f"{r['infer_ms_per_call']:.0f} ms per policy call; wrote {out}/eval.json and eval.gif; "
           f"wall time {time.time() - t_start:.0f} s")


# ---------------------------------------------------------------------------------------------
# Logging


def log_step(log, bar, step, lr, grad_norm, sums, args, ctx, dt):
    if ctx["ddp"]:  # the shares already weigh each rank: the global value is the sum
        for k in sorted(sums):
            dist.all_reduce(sums[k])
    last = {k: round(v.item(), 6) for k, v in sums.items()}
    rec = dict(step=step, lr=lr, grad_norm=round(float(grad_norm), 4), step_s=round(dt, 4),
               samples_s=round(args.batch_size / dt, 1), **last)
    if ctx["device"].type == "cuda":
        rec["mfu"] = round(estimate_mfu(ctx["raw"], ctx["cfg"], args.batch_size, dt), 4)
    bar.set_postfix(loss=f"{last['loss']:.4f}")
    if log:
        log.write(json.dumps(rec) + "\n")
        log.flush()
        (tqdm.write if not bar.disable else print0)(" ".join(f"{k} {v}" for k, v in rec.items()))
        if ctx.get("wandb"):
            ctx["wandb"].log(rec, step=step)
    return last


def start_wandb(args, out):
    """Weights & Biases logging, as openpi, LeRobot and OpenTau do (WANDB_MODE=offline works with
    no network: the run is synced later with `wandb sync`)."""
    try:
        import wandb
    except ImportError:
        raise ImportError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project=args.wandb, config=recipes.as_dict(args), dir=out,
                      name=os.path.basename(os.path.abspath(out)))


def plot_losses(log_path, png_path):
    """The run's loss curves from log.jsonl (every term, log scale) as a PNG."""
    recs = [json.loads(line) for line in open(log_path)]
    series = [(k, [r["step"] for r in recs if k in r], [r[k] for r in recs if k in r], plots.COLOURS[-1 - i], 2)
              for i, k in enumerate(("loss", "flow", "ce")) if any(k in r for r in recs)]
    return plots.save_chart(png_path, series, "loss per step (log scale)", log=True) if len(recs) > 1 else None


# ---------------------------------------------------------------------------------------------
# main: the phases in order


def setup(args):
    """Distributed setup, data, model, optimizer and EMA -> a context dict of the run."""
    ddp, rank, world, device = setup_distributed()
    out = args.out or os.path.join("runs", args.model)
    cfg, loader, transforms, datasets, fast, tok_path = build_data(args, model_config(args), rank, world, ddp, out)
    model, raw, params = build_model(args, cfg, device, ddp)
    torch.manual_seed(args.seed + 1 + rank)  # from here on (dropout) each rank draws its own numbers
    opt = train_step.make_optimizer(params, args)
    ema = [p.detach().clone().float() for p in raw.parameters()] if args.ema > 0 else None
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    flow = models.spec(cfg).flow
    terms = {"flow": "action_masks"} if flow else {"ce": None}  # ce of pi0-FAST: a mean per example
    if flow and fast is not None:
        terms["ce"] = "target_masks"
    fast_files = [] if fast is None else [fast_targets.tokenizer_source(args.fast_tokenizer, args.init, cfg,
                                                                         models.load_sentencepiece(tok_path), out)]
    conditions = datasets[0].table["serve"] if args.conditions else None
    return dict(ddp=ddp, world=world, rank=rank, device=device, cfg=cfg, raw=raw, model=model, params=params,
                opt=opt, ema=ema, loader=loader, datasets=datasets, transforms=transforms, out=out, flow=flow,
                terms=terms, weights=raw.loss_weights(),
                precision=precision, files=[(tok_path, "tokenizer.model")] + fast_files,
                policy=policy_json(args, transforms[0], datasets[0], conditions),
                fingerprint=data_fingerprint(datasets, transforms),
                autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"))


def train_loop(args, run, step, log):
    """Steps from `step` to args.steps (or --stop-after), checkpointing as it goes -> the last step."""
    model, opt, loader, ckpt_dir = run["model"], run["opt"], run["loader"], os.path.join(run["out"], "checkpoints")
    batches, t0, last, logged = iter(loader), time.perf_counter(), {}, step
    bar = tqdm(total=args.steps, initial=step, disable=run["rank"] != 0 or not sys.stderr.isatty(), dynamic_ncols=True)
    while step < args.steps:
        lr = train_step.get_lr(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = {k: v.to(run["device"], non_blocking=True) for k, v in next(batches).items()}
        sums = train_step.train_step(args, step, model, batch, run)
        if not torch.isfinite(sums["loss"]):
            raise FloatingPointError(f"loss is {sums['loss'].item()} at step {step} (data position "
                                     f"{loader.position}); the last good checkpoint is in {ckpt_dir}")
        grad_norm = train_step.optimizer_step(run["params"], opt, args.clip)
        if run["ema"] is not None:
            train_step.update_ema(run["ema"], run["raw"], args.ema)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps or step == 1:  # step 1: a log file shows life at once
            seconds = (time.perf_counter() - t0) / (step - logged)
            last, logged, t0 = log_step(log, bar, step, lr, grad_norm, sums, args, run, seconds), step, time.perf_counter()
            run.setdefault("first_loss", last["loss"])
        if step % args.save_every == 0 or step == args.steps or step == args.stop_after:
            save_training_state(ckpt_dir, run["raw"], opt, run["ema"], loader, step, run, args)
        if step == args.stop_after:
            print0(f"stopping after step {step} as asked (--stop-after)")
            break
    bar.close()
    run["last"] = last
    return step


RUN_FILES = ("checkpoints", "final", "log.jsonl", "loss.png", "eval.json", "eval.gif", "fast_tokenizer.json")


def claim_run_dir(args):
    """A run directory belongs to one run: a fresh run into a non-empty --out is an error (it would
    delete that run's checkpoints and overwrite its final/), unless --overwrite, which removes the
    files a run writes there (rank 0). --resume continues the run that is there."""
    out = args.out or os.path.join("runs", args.model)
    there = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if args.resume or not there:
        return
    if not args.overwrite:
        raise FileExistsError(f"--out {out} already holds a run ({', '.join(there[:6])}): pass --resume to continue "
                              f"it, --overwrite to replace it, or another --out")
    if int(os.environ.get("RANK", "0")) == 0:
        for name in RUN_FILES:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)


def main(args):
    t_start = time.time()
    claim_run_dir(args)
    run = setup(args)
    out, rank = run["out"], run["rank"]
    step = 0
    if args.resume:
        resume_from = latest_checkpoint(os.path.join(out, "checkpoints"))
        step = load_training_state(resume_from, run["raw"], run["opt"], run["ema"], run["loader"], rank, args,
                                   run["fingerprint"])
        print0(f"resumed from {resume_from} at step {step}")
    n_trained = sum(p.numel() for p in run["params"])
    built = f"from {args.init}" if args.init else f"preset {args.config}"  # --config is unused with --init
    print0(f"model {args.model} ({built}): {models.count_params(run['raw']):,} params, {n_trained:,} trained; "
           f"{sum(len(d) for d in run['datasets']):,} frames from {len(run['datasets'])} dataset(s); world "
           f"{run['world']} x micro-batch {args.batch_size // (run['world'] * args.grad_accum)} x accum "
           f"{args.grad_accum} = batch {args.batch_size}; precision {run['precision']}; device {run['device']}")
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "log.jsonl"), "a") if rank == 0 else None
    run["wandb"] = start_wandb(args, out) if args.wandb and rank == 0 else None
    step = train_loop(args, run, step, log)
    if log:
        log.close()
        png = plot_losses(os.path.join(out, "log.jsonl"), os.path.join(out, "loss.png"))
        if png:
            print0(f"loss curves: {png}")
        if run["wandb"]:
            run["wandb"].finish()
    if step == args.steps:
        final_dir = os.path.join(out, "final")
        export(final_dir, run["raw"], run["ema"], run)
        print0(f"loss {run.get('first_loss')} -> {run['last'].get('loss')}; exported {final_dir} (EMA weights)")
        if not args.data and args.eval_episodes and rank == 0:
            evaluate_builtin(args, final_dir, out, t_start)
    if run["ddp"]:
        dist.destroy_process_group()


if __name__ == "__main__":
    with main_guard():
        args, given = recipes.parse_args()
        print0(f"knobs: {json.dumps({k: v for k, v in recipes.as_dict(args).items() if v not in (None, '', [])})}")
        if args.openpi_config:
            print0(recipes.describe(args, given))
        main(args)
