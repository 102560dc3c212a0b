"""Steering the sampler: real-time chunking and classifier-free guidance, as velocity wrappers.

The model files hold one Euler loop (pi0.euler): x <- x + dt v(x, t), from noise (t = 1) to
actions (t = 0). Everything that steers a sample changes only the velocity, so each remedy here
is a wrapper: it takes the model's velocity(x, t) and returns another one, and any sampler (the
readable `sample_actions` or infer.py's compiled one) runs it unchanged:

    actions = model.sample_actions(batch, noise, guide=guidance.rtc(target, weights))

  rtc        inference-time real-time chunking (Black, Galliker, Levine 2025, arXiv 2506.07339):
             guide every step toward the actions of the previous chunk the robot still executes;
  committed  training-time real-time chunking (Black et al., arXiv 2512.05964): a model trained
             with train.py --rtc-max-delay is given the committed steps clean, at t = 0;
  cfg        classifier-free guidance on the flow velocity, v_u + beta (v_c - v_u), for a model
             trained with a prompt condition and its dropout (train.py --conditions).

In openpi's convention (t = 1 noise, t = 0 data) with a delay of d control steps and an
execution horizon s, the previous chunk's leftover Y = prev[s:] lines up with this chunk's first
C - s steps; a soft mask W (1 on the d frozen steps, decaying over the rest of the overlap, 0
after) says how much each step must agree with it. Inpainting with a flow (PiGDM):
    A_hat = x - t v(x)                        the one-step clean estimate
    g     = (dA_hat/dx)^T [W * (Y - A_hat)]   one vector-Jacobian product through the expert
    v_g   = v - min(beta, (t^2 + (1-t)^2) / (t (1-t))) g

Axis legend (paligemma.py's): B batch, C chunk (action horizon), A action dim.
"""

import math

import torch

from pi0 import free_steps


# ----------------------------------------------------------------------------------------------
# Inference-time real-time chunking


def rtc_mask(horizon, delay, overlap_end, schedule="exp"):
    """The soft mask W (C,): 1 on steps < delay, then (exp) c (e^c - 1) / (e - 1) with
    c = (overlap_end - i) / (overlap_end - delay + 1), 0 from overlap_end = C - s on. "linear"
    uses c alone, "hard" only the frozen steps (the paper's ablations)."""
    if not 0 <= delay <= overlap_end <= horizon:
        raise ValueError(f"need 0 <= delay ({delay}) <= overlap_end ({overlap_end}) <= horizon ({horizon})")
    i = torch.arange(horizon, dtype=torch.float32)
    c = (overlap_end - i) / (overlap_end - delay + 1)
    soft = {"exp": c * torch.expm1(c) / math.expm1(1.0), "linear": c, "hard": torch.zeros_like(c)}[schedule]
    return torch.where(i < delay, 1.0, torch.where(i < overlap_end, soft, 0.0))


def rtc_guidance_weight(t, beta):
    """min(beta, (t^2 + (1-t)^2) / (t (1-t))): symmetric in t <-> 1-t, 2 at t = 0.5; the cap beta
    (the paper's, needed with few denoising steps) also defines it at t = 0 and t = 1."""
    return beta if t <= 0 or t >= 1 else min(beta, (t * t + (1 - t) ** 2) / (t * (1 - t)))


def rtc(target, weights, beta=5.0, jacobian="full"):
    """Guidance toward `target` (B, C, A), the previous chunk's leftover aligned to this chunk,
    normalized and padded like the model's actions; `weights` (C,) (rtc_mask) or broadcastable
    to (B, C, A) (times 0 on padded action dims); the cap beta. jacobian "full" is the paper's;
    "identity" drops the Jacobian (g = W * (Y - A_hat), no backward pass)."""
    w = weights if weights.dim() == 3 else weights[None, :, None]
    if jacobian not in ("full", "identity"):
        raise ValueError(f"jacobian {jacobian!r}: 'full' (the paper's) or 'identity'")

    def wrap(velocity):
        def guided(x, t):
            with torch.set_grad_enabled(jacobian == "full"):  # the sampler runs under no_grad
                x = x.detach().requires_grad_(jacobian == "full")
                v = velocity(x, t)
                x_hat = x - t * v
                err = w.to(x_hat) * (target.to(x_hat) - x_hat)
                g = torch.autograd.grad(x_hat, x, err)[0] if jacobian == "full" else err
            return (v - rtc_guidance_weight(t, beta) * g).detach()
        return guided
    return wrap


# ----------------------------------------------------------------------------------------------
# Training-time real-time chunking: the committed steps, clean at t = 0


def committed(clean, delay):
    """For a model trained with --rtc-max-delay: the first delay[b] steps of example b are the
    actions already committed, `clean` (B, C, A) normalized like the model's. As in training the
    model sees them clean at t = 0 while the other steps are at the step's time; they follow the
    straight path to their clean value, velocity (x - clean) / t, so Euler ends on them."""
    free = free_steps(delay, clean.shape[1])[..., None]  # (B, C, 1)

    def wrap(velocity):
        def continued(x, t):
            t_tokens = torch.where(free[..., 0], t, 0.0)  # (B, C): the committed steps at t = 0
            v = velocity(torch.where(free, x, clean), t_tokens)
            return torch.where(free, v, (x - clean) / t)
        return continued
    return wrap


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance


def cfg_batch(batch):
    """The batch of 2B a cfg-guided sample runs on: every observation twice, with its
    conditioned prompt (tokens, token_masks) first and its unconditioned one (uncond_tokens,
    uncond_token_masks, data.Transforms writes them) second."""
    both = {k: torch.cat([v, v]) for k, v in batch.items() if not k.startswith("uncond_")}
    both["tokens"] = torch.cat([batch["tokens"], batch["uncond_tokens"]])
    both["token_masks"] = torch.cat([batch["token_masks"], batch["uncond_token_masks"]])
    return both


def cfg(beta):
    """v = v_uncond + beta (v_cond - v_uncond) over a cfg_batch: one Euler path per example,
    both prompts in one call. beta = 1 is plain conditioned sampling, 0 unconditioned."""
    def wrap(velocity):
        def guided(x, t):
            v_cond, v_uncond = velocity(torch.cat([x, x]), t).chunk(2)
            return v_uncond + beta * (v_cond - v_uncond)
        return guided
    return wrap
