"""One training step, openpi's (its scripts/train.py train_step), the pieces train.py loops over.

    get_lr          the LR of a step: warm-up then cosine, optax's schedule in its float32 arithmetic
    step_inputs     what a step draws: flow-matching noise and time, committed-prefix lengths,
                    augmentation numbers, condition dropout; each a pure function of (seed, step)
                    drawn for the whole global batch, each rank taking its own rows
    train_step      forward and backward over the micro-batches of one global batch, every loss
                    term weighed so the gradients are those of one mean over the global batch
    optimizer_step  clip the global gradient norm at 1, AdamW (b2 0.95, weight decay on every
                    trained parameter), as optax.chain(clip_by_global_norm, adamw)
    update_ema      ema = d ema + (1 - d) params, over every parameter

tests/test_openpi_train.py holds these against openpi's own training step (its losses, gradients,
updates, parameters and EMA after a few steps of three of its configs).

Axis legend (paligemma.py's): B a rank's (micro-)batch, C chunk, A action dim; the global batch spelled out.
"""

import contextlib

import numpy as np
import torch
import torch.distributed as dist

import augment
from pi0 import free_steps, sample_noise_and_time

def get_lr(step, args):
    """openpi's schedule (optax's warmup_cosine_decay_schedule, in its float32 arithmetic): a
    linear warm-up from lr / (warmup + 1) to lr, then a cosine to end_lr_frac * lr at decay_steps
    (openpi's configs: 30k whatever the number of steps; default: the run's steps), constant after."""
    f = np.float32
    peak = f(args.lr)
    if step < args.warmup:  # (init - peak) * frac + peak, as optax's linear_schedule computes it
        init, frac = f(args.lr / (args.warmup + 1)), f(1) - f(step) / f(args.warmup)
        return float((init - peak) * frac + peak)
    span = f((args.decay_steps or args.steps) - args.warmup)
    count = min(f(step - args.warmup), span)
    cosine = f(0.5) * (f(1) + np.cos(f(np.pi) * count / max(span, f(1))))
    alpha = f(args.end_lr_frac)
    return float(peak * ((f(1) - alpha) * cosine + alpha))


def draw_noise_and_time(step, global_batch, shape, seed, device):
    """Noise (global batch, C, A) and time (global batch,), a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    noise, time_ = sample_noise_and_time((global_batch, *shape), generator=g)
    return noise.to(device), time_.to(device)


def augment_images(images, step, args, cameras, rank, world):
    """openpi's augmentation (augment.py) of this rank's images; its random numbers are drawn for
    the whole global batch from (seed, step), like the noise, and each rank takes its own rows."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 3_333_333)  # apart from the noise's
    u = augment.draw(args.batch_size, g)
    return augment.augment(images, cameras, {k: v[rank::world] for k, v in u.items()})


def drop_conditions(batch, step, args, rank, world):
    """A share --condition-dropout of the samples lose their prompt condition (the prompt without
    it), drawn for the whole global batch from (seed, step) like the noise."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 5_555_555)
    drop = (torch.rand(args.batch_size, generator=g) < args.condition_dropout)[rank::world].to(batch["tokens"].device)
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


def step_inputs(args, step, batch, cfg, flow, rank, world, device):
    """What a step draws for this rank's rows: noise, time and committed-prefix lengths (flow
    models), augmented images, dropped conditions -> (batch, model keyword arguments, free steps)."""
    kwargs, free = {}, None
    if flow:
        noise, time_ = draw_noise_and_time(step, args.batch_size, (cfg.action_horizon, cfg.action_dim), args.seed,
                                           device)
        # this rank's rows of the global batch (loader.Loader interleaves samples across ranks)
        kwargs = dict(noise=noise[rank::world], time=time_[rank::world])
        if args.rtc_max_delay:
            kwargs["delay"] = draw_delays(step, args.batch_size, args.rtc_max_delay, args.seed, device,
                                          args.rtc_prefix_share)[rank::world]
            free = free_steps(kwargs["delay"], cfg.action_horizon)
    if args.augment:
        batch = dict(batch, images=augment_images(batch["images"], step, args, cfg.cameras, rank, world))
    if "uncond_tokens" in batch:
        batch = drop_conditions(dict(batch), step, args, rank, world)
    return batch, kwargs, free


def train_step(args, step, model, batch, ctx, draws=None):
    """Forward and backward over the micro-batches of one global batch -> {term: this rank's
    share of the global mean, "loss"}. The optimizer step is the caller's. draws: this rank's
    (noise, time) to use instead of drawing them (tests feed openpi's own)."""
    ddp, world, rank = ctx["ddp"], ctx["world"], ctx["rank"]
    batch, kwargs, free = step_inputs(args, step, batch, ctx["cfg"], ctx["flow"], rank, world, ctx["device"])
    if draws is not None:
        kwargs.update(noise=draws[0], time=draws[1])
    terms, weights = ctx["terms"], ctx["weights"]
    shares = loss_shares(batch, terms, args.grad_accum, ctx["device"], ddp, free)
    micro = len(batch["state"]) // args.grad_accum
    sums = {}
    for m in range(args.grad_accum):
        part = slice(m * micro, (m + 1) * micro)
        mb = {k: v[part] for k, v in batch.items()}
        sync = m == args.grad_accum - 1 or not ddp or args.fsdp
        with (model.no_sync() if not sync else contextlib.nullcontext()), ctx["autocast"]:
            losses = model(mb, **{k: v[part] for k, v in kwargs.items()})
            objective = sum(weights[t] * losses[t] * shares[t][m] for t in shares)
        (objective * world).backward()
        for t in shares:
            sums[t] = sums.get(t, 0.0) + losses[t].detach().float() * shares[t][m]
    sums["loss"] = sum(weights[t] * sums[t] for t in shares)
    return sums


def make_optimizer(params, args):
    """openpi's AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay on every trained parameter), its
    state in fp32 like the master weights."""
    return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, args.b2), eps=1e-8, weight_decay=args.weight_decay)


def optimizer_step(params, opt, clip):
    """Clip the gradients' global norm, step, clear them -> the norm before clipping. Like
    openpi's optax step it updates every trained parameter, a zero gradient where the loss does
    not reach (pi0's last VLM layer, the VLM's final norm): weight decay and Adam's step count
    then agree with openpi's (torch's AdamW would skip a parameter whose gradient is None)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def update_ema(ema, model, decay):
    with torch.no_grad():
        for e, p_ in zip(ema, model.parameters()):
            e.lerp_(p_.detach().float(), 1 - decay)
