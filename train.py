"""Train pi0 / pi0.5 / pi0-FAST. One process or many, one machine or several.

    python train.py --model pi05                                   # the built-in task, tiny model, CPU
    torchrun --standalone --nproc_per_node=2 train.py --model pi05
    torchrun --nproc_per_node=8 train.py --model pi05 --config full --init ckpt/pi05_base \\
        --data my_lerobot_dataset --batch-size 32 --steps 30000 --lr 2.5e-5

With no --data it trains on the built-in task of sim.py (demonstrations generated once, cached)
and ends with a closed-loop evaluation. The recipe follows openpi's JAX trainer, where the PyTorch
ports lost quality: fp32 master weights and fp32 AdamW state (bf16 only inside autocast on GPU),
AdamW b2 = 0.95, warmup + cosine LR, gradient clipping at 1, an EMA of the weights that is what
gets evaluated and exported.

The noise and flow-matching time of every sample are drawn from a generator seeded by
(seed, step) over the whole global batch, and each rank takes its own rows: so N processes compute
exactly the loss one process would on the same global batch, and a resumed run repeats the
uninterrupted one.
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
p.add_argument("--model", choices=["pi0", "pi05", "pi0_fast"], default="pi05", help="which model to train")
p.add_argument("--config", default="tiny", help="model preset: tiny (CPU demo, tests) or full (openpi's sizes)")
p.add_argument("--data", nargs="*", default=None,
               help="datasets (LeRobot dir, HDF5 file or dir), each optionally PATH:WEIGHT; none = the built-in task")
p.add_argument("--norm-stats", default=None, help="norm_stats.json to use for all datasets (default: each dataset's own)")
p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: from --init, or the built-in task's)")
p.add_argument("--init", default=None, help="checkpoint directory to start from (e.g. from convert_jax.py)")
p.add_argument("--out", default=None, help="run directory (default: runs/<model>)")
p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
p.add_argument("--batch-size", type=int, default=32, help="global batch size (all ranks, all accumulation steps)")
p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps per optimizer step")
p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (openpi fine-tuning: 2.5e-5)")
p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
p.add_argument("--end-lr-frac", type=float, default=0.1, help="final LR as a fraction of the peak (cosine decay)")
p.add_argument("--weight-decay", type=float, default=1e-10, help="AdamW weight decay (openpi: 1e-10)")
p.add_argument("--b2", type=float, default=0.95, help="AdamW beta2 (openpi: 0.95)")
p.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm")
p.add_argument("--ema", type=float, default=0.99, help="EMA decay of the weights (0 = off); the EMA is exported")
p.add_argument("--dropout", type=float, default=None, help="pi0.5 dropout (default: the config's, 0.1)")
p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
p.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state with FSDP2")
p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per Gemma layer")
p.add_argument("--freeze", default="", help="comma list of parts not to train: vision, llm (the PaliGemma expert)")
p.add_argument("--lora", default="", help="comma list of Gemma experts to train by LoRA only: llm, expert")
p.add_argument("--lora-rank", default="16,32", help="LoRA rank for llm,expert (openpi: 16 and 32; alpha = rank)")
p.add_argument("--fast", type=int, default=1, help="pi0.5: co-train the VLM on FAST tokens of the actions (knowledge insulation); pi0-FAST: always")
p.add_argument("--knowledge-insulation", type=int, default=1, help="pi0.5: stop the flow loss's gradient at the VLM")
p.add_argument("--fast-tokenizer", default=None, help="FAST tokenizer file or HF dir (default: fit one on the data)")
p.add_argument("--max-fast-tokens", type=int, default=128, help="pi0.5: most FAST target slots per sample (fewer if the data needs fewer)")
p.add_argument("--chunk", type=int, default=None, help="action horizon C (default: the config's)")
p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
p.add_argument("--num-workers", type=int, default=0, help="data loader workers per rank")
p.add_argument("--seed", type=int, default=0, help="seed of the data stream, noise, time and init")
p.add_argument("--eval-episodes", type=int, default=100, help="closed-loop episodes at the end (built-in task)")
p.add_argument("--demo-episodes", type=int, default=3000, help="built-in task: demonstrations to generate")
p.add_argument("--stop-after", type=int, default=None, help="exit after this step (to test --resume)")
args = p.parse_args() if __name__ == "__main__" else None

import data  # noqa: E402  (after argparse so --help is instant)
from infer import load_sentencepiece, prompt_function  # noqa: E402
from pi0 import save_pretrained  # noqa: E402

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


def get_lr(step, a):
    """Linear warm-up to the peak, then cosine decay to end_lr_frac * peak (openpi's schedule)."""
    if step < a.warmup:
        return a.lr * (step + 1) / (a.warmup + 1)
    progress = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    end = a.lr * a.end_lr_frac
    return end + 0.5 * (a.lr - end) * (1 + math.cos(math.pi * progress))


def draw_noise_and_time(step, global_batch, shape, seed, device):
    """Noise (G, C, A) and time (G,) for the whole global batch, a pure function of (seed, step).

    t ~ Beta(1.5, 1) by inverting its CDF t^1.5, then squeezed into [0.001, 1) as openpi does.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    noise = torch.randn((global_batch, *shape), generator=g)
    time = torch.rand(global_batch, generator=g) ** (1 / 1.5) * 0.999 + 0.001
    return noise.to(device), time.to(device)


def build_model(a):
    if a.model == "pi0":
        from pi0 import CONFIGS, Pi0 as Model
    elif a.model == "pi05":
        from pi05 import CONFIGS, Pi05 as Model
    else:
        from pi0_fast import CONFIGS, Pi0Fast as Model
    if a.init:
        with open(os.path.join(a.init, "config.json")) as f:
            cfg = type(CONFIGS["tiny"]).from_dict(json.load(f))
    else:
        cfg = CONFIGS[a.config]
    changes = {}
    if a.chunk:
        changes["action_horizon"] = a.chunk
    if a.model == "pi05":
        changes["knowledge_insulation"] = bool(a.knowledge_insulation)
        if a.dropout is not None:
            changes["dropout"] = a.dropout
    return Model, dataclasses.replace(cfg, **changes)


def main(a):
    t_start = time.time()
    ddp, rank, world, device = setup_distributed()
    torch.manual_seed(a.seed)  # the same initial weights on every rank (FSDP2 does not broadcast)
    out = a.out or os.path.join("runs", a.model)
    ckpt_dir, final_dir = os.path.join(out, "checkpoint"), os.path.join(out, "final")
    # -- data ------------------------------------------------------------------------------------
    builtin = not a.data
    paths = a.data or [os.path.join("runs", "builtin_demos")]
    if builtin:
        import sim
        if rank == 0 and not os.path.exists(os.path.join(paths[0], "tokenizer.model")):  # cached
            sim.main(["demos", "--episodes", str(a.demo_episodes), "--out", paths[0]])
        if ddp:
            dist.barrier()
    datasets, weights = [], []
    Model, cfg = build_model(a)
    roots = []  # dataset paths without their ":weight"
    for spec in paths:
        path, _, weight = spec.rpartition(":") if ":" in spec and not os.path.exists(spec) else (spec, "", "")
        roots.append(path)
        datasets.append(data.open_dataset(path, chunk_size=cfg.action_horizon))
        weights.append(float(weight) if weight else None)
    weights = None if all(w is None for w in weights) else [w or 1.0 for w in weights]
    if not a.init:  # from scratch: the model's views are the first dataset's cameras
        cfg = dataclasses.replace(cfg, cameras=tuple(datasets[0].cameras))
    tok_path = a.tokenizer or (os.path.join(a.init, "tokenizer.model") if a.init else
                               os.path.join(roots[0], "tokenizer.model"))
    sp = load_sentencepiece(tok_path)
    use_quantiles = a.model != "pi0"  # openpi: z-score for pi0, quantiles otherwise
    fast_model = a.model == "pi0_fast"  # pi0-FAST: no padding; the actions become prompt tokens
    transforms = []
    for ds, path in zip(datasets, roots):
        stats = a.norm_stats or os.path.join(path, "norm_stats.json")
        if not os.path.exists(stats):
            raise FileNotFoundError(f"{stats}: no norm stats; run `python data.py stats {path} --out {stats}`")
        transforms.append(data.Transforms(
            tokenize=fast_prefix(cfg, sp) if fast_model else prompt_function(cfg, sp),
            cameras=list(ds.cameras), norm_stats=stats,
            use_quantiles=use_quantiles, state_dim=None if fast_model else cfg.action_dim,
            action_dim=None if fast_model else cfg.action_dim,
            image_size=cfg.vision.image_size))
    fast = None
    if fast_model:
        fast = fit_or_load_fast(a, datasets, transforms, cfg, sp, rank, ddp, out)
        cfg = dataclasses.replace(cfg, fast_vocab_size=fast.vocab_size, action_dim=int(datasets[0].actions.shape[1]))
        transforms = [WithFastPrompt(t, fast, sp, cfg) for t in transforms]
        terms = {"ce": None}  # a mean per example, then over examples (openpi's)
    elif a.model == "pi05" and a.fast:
        fast = fit_or_load_fast(a, datasets, transforms, cfg, sp, rank, ddp, out)
        length = fast_target_length(a, fast, datasets, transforms)
        print0(f"FAST targets: {length} slots per sample")
        transforms = [WithFastTargets(t, fast, sp, cfg, length) for t in transforms]
        terms = {"flow": "action_masks", "ce": "target_masks"}
    else:
        terms = {"flow": "action_masks"}
        if a.model == "pi05" and cfg.knowledge_insulation:
            print0("note: knowledge insulation without --fast targets: the VLM gets no gradient at all")
    mixture = data.Mixture(datasets, transforms, weights)
    if a.batch_size % (world * a.grad_accum):
        raise ValueError(f"--batch-size {a.batch_size} must divide by world size {world} x --grad-accum {a.grad_accum}")
    micro = a.batch_size // (world * a.grad_accum)
    loader = data.Loader(mixture, micro * a.grad_accum, seed=a.seed, rank=rank, world_size=world,
                         num_workers=a.num_workers)
    # -- model and optimizer ---------------------------------------------------------------------
    model = Model(cfg)
    if a.init:
        from pi0 import from_pretrained
        model.load_state_dict(from_pretrained(a.init).state_dict())
    model.to(device)
    torch.manual_seed(a.seed + 1 + rank)  # from here on (dropout) each rank draws its own numbers
    for part in filter(None, a.freeze.split(",")):
        module = {"vision": model.vision, "llm": model.llm.experts[0]}[part]
        module.requires_grad_(False)
    if a.lora:
        ranks = dict(zip(["llm", "expert"], map(int, a.lora_rank.split(","))))
        for part in a.lora.split(","):
            expert = model.llm.experts[{"llm": 0, "expert": 1}[part]]
            add_lora(expert, ranks[part], alpha=ranks[part])
    if a.checkpointing:
        for expert in model.llm.experts:
            for layer in expert.layers:
                layer.mlp = checkpointed(layer.mlp)
    raw = model
    if a.fsdp:
        # Sharding units must be modules that are *called*: each SigLIP block is; the Gemma layers
        # are not (the joint layer is a loop in Gemma.forward, and the embedding is a method), so
        # the Gemma experts belong to the root unit. Parameters, gradients and AdamW state are all
        # sharded; only the language model's forward/backward holds its full weights at once.
        from torch.distributed.fsdp import fully_shard
        for block in model.vision.blocks:
            fully_shard(block)
        fully_shard(model)
    elif ddp:
        # pi0's last-layer prefix weights, and the whole VLM under knowledge insulation without
        # discrete targets, get no gradient from some losses: DDP must not wait for them
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    params = [p for p in raw.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, a.b2), eps=1e-8, weight_decay=a.weight_decay)
    ema = [p.detach().clone().float() for p in raw.parameters()] if a.ema > 0 else None
    weights = {"flow": getattr(cfg, "flow_loss_weight", 1.0), "ce": getattr(cfg, "ce_loss_weight", 1.0)}
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    step = 0
    if a.resume:
        step = load_training_state(ckpt_dir, raw, opt, ema, loader, rank)
        print0(f"resumed from {ckpt_dir} at step {step}")
    n_params = sum(p.numel() for p in raw.parameters())
    print0(f"model {a.model} ({a.config}): {n_params:,} params, {sum(p.numel() for p in params):,} trained; "
           f"{len(mixture):,} frames from {len(paths)} dataset(s); world {world} x micro-batch {micro} "
           f"x accum {a.grad_accum} = batch {a.batch_size}; precision {precision}; device {device}")
    # -- the loop --------------------------------------------------------------------------------
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "log.jsonl"), "a") if rank == 0 else None
    batches = iter(loader)
    t0, first_loss, last = time.perf_counter(), None, {}
    from tqdm import tqdm
    bar = tqdm(total=a.steps, initial=step, disable=rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True)
    while step < a.steps:
        lr = get_lr(step, a)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        A = (cfg.action_horizon, cfg.action_dim)
        noise, time_ = draw_noise_and_time(step, a.batch_size, A, a.seed, device)
        # this rank's rows of the global batch (data.Loader interleaves samples across ranks)
        noise, time_ = noise[rank::world], time_[rank::world]
        # Each loss term is a mean over its own valid entries (action steps for "flow", target
        # tokens for "ce"). Weigh each micro-batch's term by its share of that term's valid entries
        # in the whole global batch: the gradients (which DDP averages over ranks) are then exactly
        # those of one mean over the global batch, whatever the padding on each rank.
        counts, shares = {}, {}
        for term, key in terms.items():  # key None: the term is a mean over examples
            if key is None:
                per_example = torch.ones(len(batch["state"]), device=device)
            else:  # flow counts valid steps (every dim of one weighs the same), ce valid tokens
                mask = batch[key].any(-1) if key == "action_masks" else batch[key]
                per_example = mask.flatten(1).sum(1).float()
            counts[term] = per_example.view(a.grad_accum, micro).sum(1)
            total = counts[term].sum()
            if ddp:
                dist.all_reduce(total)
            shares[term] = counts[term] / total.clamp(min=1)  # (grad_accum,)
        sums = {}
        for m in range(a.grad_accum):
            part = slice(m * micro, (m + 1) * micro)
            mb = {k: v[part] for k, v in batch.items()}
            sync = m == a.grad_accum - 1 or not ddp or a.fsdp
            ctx = model.no_sync() if not sync else contextlib.nullcontext()
            with ctx, autocast:
                losses = model(mb, noise=noise[part], time=time_[part])
                objective = sum(weights[t] * losses[t] * shares[t][m] for t in shares)
            (objective * world).backward()
            for t in shares:
                sums[t] = sums.get(t, 0.0) + losses[t].detach().float() * shares[t][m]
        sums["loss"] = sum(weights[t] * sums[t] for t in shares)
        if not torch.isfinite(sums["loss"]):
            raise FloatingPointError(f"loss is {sums['loss'].item()} at step {step} (data position "
                                     f"{loader.position}); the last good checkpoint is in {ckpt_dir}")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, a.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for e, p_ in zip(ema, raw.parameters()):
                    e.lerp_(p_.detach().float(), 1 - a.ema)
        step += 1
        bar.update(1)
        if step % a.log_every == 0 or step == a.steps:
            if ddp:  # the shares already weigh each rank: the global value is the sum
                for k in sorted(sums):
                    dist.all_reduce(sums[k])
            dt = (time.perf_counter() - t0) / a.log_every
            last = {k: round(v.item(), 6) for k, v in sums.items()}
            first_loss = first_loss or last["loss"]
            rec = dict(step=step, lr=lr, grad_norm=round(float(grad_norm), 4), step_s=round(dt, 4),
                       samples_s=round(a.batch_size / dt, 1), **last)
            if device.type == "cuda":
                rec["mfu"] = round(estimate_mfu(raw, cfg, a.batch_size, dt), 4)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                (tqdm.write if not bar.disable else print0)(" ".join(f"{k} {v}" for k, v in rec.items()))
            t0 = time.perf_counter()
        if step % a.save_every == 0 or step == a.steps or step == a.stop_after:
            save_training_state(ckpt_dir, raw, opt, ema, loader, step, rank, world, a, sp_path=tok_path,
                                stats=transforms[0].norm_stats, fast=fast)
        if step == a.stop_after:
            print0(f"stopping after step {step} as asked (--stop-after)")
            break
    bar.close()
    if step == a.steps:
        export(final_dir, raw, ema, transforms[0], [tok_path] + extra_fast(a, fast), use_quantiles,
               datasets[0], rank)
        print0(f"loss {first_loss} -> {last.get('loss')}; exported {final_dir} (EMA weights)")
        if builtin and a.eval_episodes and rank == 0:
            import sim
            from infer import Policy
            r = sim.evaluate(Policy(final_dir), "builtin", episodes=a.eval_episodes, record=4, progress=False)
            sim.save_eval(r, out, final_dir)
            print0(f"built-in task, {r['episodes']} unseen episodes: success {r['success_rate']:.1%} "
                   f"(95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}), mean length {r['mean_length']:.1f} steps, "
                   f"{r['infer_ms_per_call']:.0f} ms per policy call; wrote {out}/eval.json and eval.gif; "
                   f"wall time {time.time() - t_start:.0f} s")
    if ddp:
        dist.destroy_process_group()


def fast_prefix(cfg, sp):
    """pi0-FAST's prompt without the answer (WithFastPrompt adds it once actions are normalized)."""
    from pi0_fast import tokenize
    return lambda prompt, state: tokenize(sp, None, prompt, state, None, cfg.max_token_len, cfg.vocab_size)[:2]


class LoRALinear(torch.nn.Linear):
    """A frozen Linear plus a trainable low-rank update: y = x W^T + (alpha / r) x A^T B^T.

    B starts at zero, so training starts from the pretrained model exactly. The frozen weight
    keeps its name ("weight"), so merging (W += (alpha / r) B A) gives the plain model back.
    """

    def __init__(self, linear, rank, alpha):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device)
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(rank, linear.in_features, device=linear.weight.device)
                                         / math.sqrt(linear.in_features))
        self.lora_b = torch.nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))
        self.scale = alpha / rank

    def forward(self, x):
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_a), self.lora_b)
        return super().forward(x) + update * self.scale

    def merged_weight(self):
        return self.weight + self.scale * (self.lora_b @ self.lora_a)


def add_lora(expert, rank, alpha):
    """LoRA on every attention and MLP projection of one Gemma expert (openpi's targets);
    its other weights (the norms) are frozen too."""
    expert.requires_grad_(False)
    for layer in expert.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            setattr(layer, name, LoRALinear(getattr(layer, name), rank, alpha))


def merged_state(model):
    """The state dict with every LoRA update merged into its weight: the plain model's names."""
    state = dict(full_state(model))
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.merged_weight().detach().cpu()
            del state[f"{name}.lora_a"], state[f"{name}.lora_b"]
    return state


class WithFastPrompt:
    """pi0-FAST training: the prompt tokens carry the answer, "Action: " + FAST tokens + "|" EOS,
    as a causal postfix with a loss mask (pi0_fast.tokenize, openpi's exact format)."""

    def __init__(self, transforms, fast, sp, cfg):
        self.transforms, self.fast, self.sp, self.cfg = transforms, fast, sp, cfg

    def __getattr__(self, name):
        return getattr(self.transforms, name)

    def __call__(self, sample):
        from pi0_fast import tokenize
        out = self.transforms(sample)
        tokens, mask, ar, loss = tokenize(self.sp, self.fast, sample["prompt"], out["state"], out["actions"],
                                          self.cfg.max_token_len, self.cfg.vocab_size, clip=True)
        out.update(tokens=tokens, token_masks=mask, token_ar_masks=ar, token_loss_masks=loss)
        return out


class WithFastTargets:
    """pi0.5 co-training: after the usual transforms, add the chunk's FAST tokens as discrete
    targets ("target_tokens", "target_masks"): FAST ids mapped into the PaliGemma vocabulary, then
    "|" and EOS, as openpi's pi0-FAST writes its answers (the prompt already ends in "Action: ")."""

    def __init__(self, transforms, fast, sp, cfg, max_tokens):
        self.transforms, self.fast, self.vocab_size, self.max_tokens = transforms, fast, cfg.vocab_size, max_tokens
        self.end = sp.encode("|", add_eos=True)

    def __getattr__(self, name):  # look like the wrapped Transforms (cameras, image_size, ...)
        return getattr(self.transforms, name)

    def __call__(self, sample):
        from fast_tokenizer import fast_to_paligemma
        out = self.transforms(sample)
        width = np.asarray(sample["actions"]).shape[-1]  # the robot's own dims, not the padding
        ids = self.fast.encode(out["actions"][:, :width], clip=True)  # clip: an outlier is not fatal
        ids = fast_to_paligemma(np.asarray(ids), self.fast.vocab_size, self.vocab_size).tolist() + self.end
        if len(ids) > self.max_tokens:
            raise ValueError(f"a chunk needs {len(ids)} FAST tokens, --max-fast-tokens is {self.max_tokens}")
        out["target_tokens"] = np.zeros(self.max_tokens, np.int64)
        out["target_tokens"][:len(ids)] = ids
        out["target_masks"] = np.arange(self.max_tokens) < len(ids)
        return out


def fit_or_load_fast(a, datasets, transforms, cfg, sp, rank, ddp, out):
    """The FAST tokenizer for pi0.5's discrete targets: given, or fitted on normalized chunks."""
    from fast_tokenizer import FASTTokenizer
    if a.fast_tokenizer:
        return FASTTokenizer.load(a.fast_tokenizer)
    path = os.path.join(out, "fast_tokenizer.json")
    if rank == 0:
        rng = np.random.default_rng(a.seed)
        ds, t = datasets[0], transforms[0]
        rows = rng.choice(len(ds), size=min(len(ds), 4000), replace=False)
        chunks, _ = ds.action_chunks(rows)
        chunks = data.normalize(chunks, t.norm_stats["actions"], t.use_quantiles, "actions")
        # FAST ids land at the top of the vocabulary: keep clear of the real text pieces
        vocab = min(1024, cfg.vocab_size - 129 - sp.vocab_size())
        os.makedirs(out, exist_ok=True)
        FASTTokenizer.fit(chunks, vocab_size=vocab, progress=False).save(path)
    if ddp:
        dist.barrier()
    fast = FASTTokenizer.load(path)
    print0(f"FAST tokenizer: vocab {fast.vocab_size}, fitted on {datasets[0].__class__.__name__} chunks -> {path}")
    return fast


def fast_target_length(a, fast, datasets, transforms):
    """Target slots for pi0.5's FAST tokens: the longest of a sample of chunks + "|" EOS, with
    25% headroom, at most --max-fast-tokens. Padding every sample to the cap would triple the VLM's
    sequence for nothing."""
    ds, t = datasets[0], transforms[0]
    rows = np.random.default_rng(a.seed).choice(len(ds), size=min(len(ds), 2000), replace=False)
    chunks = data.normalize(ds.action_chunks(rows)[0], t.norm_stats["actions"], t.use_quantiles, "actions")
    longest = max(len(fast.encode(c, clip=True)) for c in chunks) + 2
    return min(a.max_fast_tokens, int(math.ceil(longest * 1.25)))


def checkpointed(fn):
    """Recompute this function's activations in the backward pass instead of storing them."""
    from torch.utils.checkpoint import checkpoint
    return lambda *xs: checkpoint(fn, *xs, use_reentrant=False)


def estimate_mfu(model, cfg, batch, step_s):
    """Model FLOPs utilization: 6 x params x tokens per sample (each tower on its own tokens)."""
    peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "4090": 165e12, "L40": 181e12}
    name = torch.cuda.get_device_name()
    flops_peak = next((v for k, v in peak.items() if k in name), None)
    if flops_peak is None:
        return float("nan")
    views, img_tokens = len(cfg.cameras), (cfg.vision.image_size // cfg.vision.patch) ** 2
    count = lambda m: sum(p.numel() for p in m.parameters())
    flops = 6 * (count(model.vision) * views * img_tokens
                 + count(model.llm.experts[0]) * (views * img_tokens + cfg.max_token_len)
                 + count(model.llm.experts[1]) * (cfg.action_horizon + 1))
    return flops * batch / step_s / flops_peak


def full_state(model):
    """A full, unsharded CPU state dict (works for plain, DDP-wrapped and FSDP2 models)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_training_state(path, model, opt, ema, loader, step, rank, world, a, sp_path, stats, fast=None):
    """Weights + everything needed to continue the exact same run, written atomically."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    state = full_state(model)
    opt_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    merged = merged_state(model)  # collectives: every rank takes part, rank 0 writes
    names = [n for n, _ in model.named_parameters()]
    ema_full = None if ema is None else dict(zip(names, [full_tensor(e).cpu() for e in ema]))
    if rank != 0:
        return
    save_pretrained(model, path, norm_stats=stats, extra_files=[sp_path] + extra_fast(a, fast),
                    state_dict=merged)
    tmp = os.path.join(path, "train_state.pt.tmp")
    torch.save({"step": step, "optimizer": opt_state, "rng": rngs, "data": loader.state_dict(),
                "ema": ema_full,
                "args": vars(a), "weights": state}, tmp)
    os.replace(tmp, os.path.join(path, "train_state.pt"))


def load_training_state(path, model, opt, ema, loader, rank):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    state = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=False)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, state["weights"], options=options)
    # parameters that never had a gradient (e.g. an insulated VLM) have no AdamW state yet
    set_optimizer_state_dict(model, opt, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True, strict=False))
    if ema is not None:
        for e, (name, _) in zip(ema, model.named_parameters()):
            saved = state["ema"][name].to(e.device)
            if hasattr(e, "device_mesh"):  # FSDP2: keep this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor
                saved = distribute_tensor(saved, e.device_mesh, e.placements)
            e.copy_(saved)
    rng = state["rng"][rank]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    loader.load_state_dict(state["data"])
    return state["step"]


def extra_fast(a, fast):
    """The FAST tokenizer file to ship in checkpoints, if this run has one."""
    if fast is None:
        return []
    return [a.fast_tokenizer] if a.fast_tokenizer and os.path.isfile(a.fast_tokenizer) else \
        [os.path.join(a.out or os.path.join("runs", a.model), "fast_tokenizer.json")]


def full_tensor(t):
    """The whole tensor behind an FSDP2 shard (a collective), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def export(path, model, ema, transforms, files, use_quantiles, dataset, rank=0):
    """The inference checkpoint: EMA weights (if any), norm stats, tokenizer, policy.json.
    Every rank calls it (gathering FSDP shards is collective); rank 0 writes."""
    if ema is not None:
        backup = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p_, e in zip(model.parameters(), ema):
                p_.copy_(e)
    policy = {"cameras": list(transforms.cameras), "use_quantiles": use_quantiles, "delta_mask": None,
              "action_dim": int(dataset.actions.shape[1]), "state_dim": int(dataset.state.shape[1])}
    merged = merged_state(model)
    if rank == 0:
        save_pretrained(model, path, norm_stats=transforms.norm_stats, extra_files=files,
                        json_files={"policy.json": policy}, state_dict=merged)
    if ema is not None:
        with torch.no_grad():
            for p_, b in zip(model.parameters(), backup):
                p_.copy_(b)


if __name__ == "__main__":
    main(args)
