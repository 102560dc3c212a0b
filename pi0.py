"""pi0: a vision-language-action flow-matching policy (https://arxiv.org/abs/2410.24164).

The model, in one breath: PaliGemma reads the camera images and the prompt (the "prefix"); a
smaller Gemma "action expert" reads one state token and C noisy action tokens (the "suffix") and,
attending to the prefix through shared attention (paligemma.py), predicts the velocity that moves
the noisy chunk towards the robot's real action chunk. Sampling integrates that velocity from pure
noise (t = 1) to actions (t = 0) with 10 Euler steps; the prefix is computed once and cached.
The sampler has one mode; what steers it (real-time chunking, classifier-free guidance) wraps
its velocity from outside (guidance.py).

Token layout and attention (ar = 1 starts a new causal block, see paligemma.make_attn_mask):

    [ img_0 ... img_V | prompt ]  [ state | act_1 ... act_C ]
      ar 0 ............. 0          1       1     0 ... 0
    - the prefix sees only the prefix (so it can be cached once per observation),
    - the state token sees the prefix and itself,
    - action tokens see everything, and each other bidirectionally.

Conventions follow openpi's JAX code, not the paper: t = 1 is noise, t = 0 is data;
x_t = t * noise + (1 - t) * actions; the network predicts u = noise - actions.

Axis legend (paligemma.py's): B batch, V views, I image tokens per view, P prefix tokens,
T suffix tokens, C chunk (action horizon), A action dim, W width.
"""

import math
import time as timer
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from paligemma import (GEMMA_PRESETS, PALIGEMMA_VOCAB_SIZE, SIGLIP_PRESETS, Gemma, GemmaConfig,
                       KVCache, SigLIP, SiglipConfig, count_params, embed_prefix, keep_fp32, make_attn_mask,
                       make_positions, random_batch, transformer_flops, vision_flops)


# ----------------------------------------------------------------------------------------------
# Config and presets

@dataclass
class Pi0Config:
    vision: SiglipConfig = field(default_factory=lambda: SIGLIP_PRESETS["so400m"])
    llm: GemmaConfig = field(default_factory=lambda: GEMMA_PRESETS["gemma_2b"])
    expert: GemmaConfig = field(default_factory=lambda: GEMMA_PRESETS["gemma_300m"])
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    action_dim: int = 32        # A: state and actions are zero-padded to this width
    action_horizon: int = 50    # C: actions predicted per call
    max_token_len: int = 48     # prompt length in tokens (padded / truncated)
    cameras: tuple = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # order of views
    flow_loss_weight: float = 1.0  # weight of the flow-matching loss in "loss"
    ce_loss_weight: float = 1.0    # weight of a discrete-target cross-entropy (pi0.5 co-training)
    model: str = "pi0"          # which model file builds this config (models.py's registry)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["vision"] = SiglipConfig(**d["vision"])
        d["llm"], d["expert"] = GemmaConfig(**d["llm"]), GemmaConfig(**d["expert"])
        d["cameras"] = tuple(d["cameras"])
        return cls(**d)


CONFIGS = {
    "full": Pi0Config(),  # openpi's pi0: So400m + Gemma 2B + Gemma 300M expert, ~3.3B params
    "tiny": Pi0Config(vision=SIGLIP_PRESETS["tiny"], llm=GEMMA_PRESETS["tiny_llm"],
                      expert=GEMMA_PRESETS["tiny_expert"], vocab_size=1024, action_dim=8,
                      action_horizon=6, max_token_len=16),
}


# ----------------------------------------------------------------------------------------------
# Flow matching: the time embedding, the training distribution of (noise, t), the straight path

def posemb_sincos(t, width, min_period=4e-3, max_period=4.0):
    """Sine-cosine embedding of a time per example, or per token: t (B,) or (B, C) -> (..., width),
    sin half first.

    Periods are spaced geometrically from min_period to max_period, so the embedding resolves
    both tiny and large differences of t. Computed in fp32 in openpi's order of operations.
    """
    if width % 2:
        raise ValueError(f"time embedding width must be even, got {width}")
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float32, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    x = t.float()[..., None] * (1.0 / period * 2 * math.pi)  # (..., width/2)
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


def sample_noise_and_time(shape, generator=None, device=None):
    """Noise (B, C, A) ~ N(0, 1) and time (B,) ~ Beta(1.5, 1) * 0.999 + 0.001, as openpi draws them.

    Beta(1.5, 1) has density ~ t^0.5 (it favours the noisy end); it is drawn by inverting its CDF
    t^1.5, i.e. u^(1/1.5) for u ~ U(0, 1), so a seeded generator gives the same t on any device.
    """
    noise = torch.randn(shape, generator=generator, device=device)
    u = torch.rand(shape[0], generator=generator, device=device)
    return noise, u ** (1 / 1.5) * 0.999 + 0.001


def interpolate(actions, noise, time):
    """The straight path from data (t = 0) to noise (t = 1) and its velocity, openpi's convention:
    x_t = t * noise + (1 - t) * actions, u_t = dx_t/dt = noise - actions. (B, C, A); time (B,),
    or (B, C) per step (training-time real-time chunking)."""
    t = time[:, None, None] if time.dim() == 1 else time[..., None]
    return t * noise + (1 - t) * actions, noise - actions


def free_steps(delay, horizon):
    """(B, C) bool: the steps after each example's committed prefix of delay[b] steps."""
    return torch.arange(horizon, device=delay.device)[None, :] >= delay[:, None]


def committed_prefix_time(time, delay, horizon):
    """Training-time real-time chunking (Black et al., arXiv 2512.05964): the first delay[b] steps
    of example b are actions already committed, given clean, at t = 0. time (B,), delay (B,) int
    -> per-step time (B, C) and the mask (B, C) of the steps still to predict."""
    free = free_steps(delay, horizon)
    return torch.where(free, time[:, None], torch.zeros_like(time[:, None])), free


def valid_steps(batch):
    """(B, C) float: 1 for an action step with any real dim (not past the episode's end, and
    the sample has actions at all), else 0. The loss then weighs every dim of a valid step."""
    return batch["action_masks"].any(-1).float()


def euler_times(num_steps):
    """The times the sampler visits: 1, 1 - 1/n, ... accumulated in float32 as openpi does.

    Python floats (not tensors) so the sampling loop never waits on the device.
    """
    dt, t, times = np.float32(-1.0 / num_steps), np.float32(1.0), []
    for _ in range(num_steps):
        times.append(float(t))
        t = np.float32(t + dt)
    return times, float(dt)


def euler(velocity, x, num_steps):
    """The sampler's one loop: x <- x + dt v(x, t) from noise (t = 1) to actions (t = 0).
    velocity(x, t) gets t as a Python float, so no step waits on the device."""
    times, dt = euler_times(num_steps)
    for t in times:
        x = x + dt * velocity(x, t)
    return x


# ----------------------------------------------------------------------------------------------
# The model

class Pi0(nn.Module):
    state_token = True  # the suffix starts with one state token (pi0.5 writes the state as text)

    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.cfg = cfg
        W = cfg.expert.width
        self.vision = SigLIP(cfg.vision, out_width=cfg.llm.width)
        self.llm = Gemma([cfg.llm, cfg.expert], cfg.vocab_size, cond_widths=self.cond_widths())
        self.action_in_proj = keep_fp32(nn.Linear(cfg.action_dim, W))  # fp32 even when served in bf16
        self.action_out_proj = keep_fp32(nn.Linear(W, cfg.action_dim))
        self.build_time_conditioning()

    # pi0.5 (pi05.py) overrides the four methods below: that is the whole architectural diff.
    def cond_widths(self):
        return None  # pi0: plain RMSNorm in both experts

    def build_time_conditioning(self):
        W = self.cfg.expert.width
        self.state_proj = nn.Linear(self.cfg.action_dim, W)
        # the action-time MLP fuses each action token with the time embedding
        self.action_time_mlp_in = nn.Linear(2 * W, W)
        self.action_time_mlp_out = nn.Linear(W, W)

    def embed_actions(self, x_t, t):
        """Noisy actions fused with their time: x_t (B, C, A), t (B,) or per token (B, C) ->
        action tokens (B, C, W)."""
        B, C, _ = x_t.shape
        actions = self.project_actions(x_t)  # (B, C, W)
        time_emb = posemb_sincos(t, actions.shape[-1]).to(actions.dtype)  # (B, W) or (B, C, W)
        time_emb = time_emb if t.dim() == 2 else time_emb[:, None, :].expand(B, C, -1)
        h = torch.cat([actions, time_emb], dim=-1)  # (B, C, 2W)
        return self.action_time_mlp_out(F.silu(self.action_time_mlp_in(h)))  # swish in between only

    def time_conditioning(self, t):
        """The adaRMS condition of the expert's norms for times t (B,): none in pi0, whose time
        enters through the action-time MLP above."""
        return None

    # -- pieces shared by pi0 and pi0.5 --------------------------------------------------------

    def embed_state(self, state):
        """(B, A) normalized, padded state -> pi0's state token (B, 1, W)."""
        return self.state_proj(state)[:, None, :]

    def project_actions(self, x_t):
        with torch.autocast(x_t.device.type, enabled=False):  # action projections stay fp32
            return self.action_in_proj(x_t.float())

    def velocity_from(self, suffix_out):
        """The last C suffix outputs -> predicted velocity (B, C, A), in fp32."""
        with torch.autocast(suffix_out.device.type, enabled=False):
            return self.action_out_proj(suffix_out[:, -self.cfg.action_horizon:].float())

    def embed_prefix(self, batch, image_tokens=None):
        """Images then prompt -> tokens (B, P, W), input mask (B, P), ar mask (P,) all zero.

        image_tokens (B, V*I, W): the vision tower's output, when it already ran (infer.py
        times the two apart); by default it runs here.
        """
        V = batch["image_masks"].shape[1]
        if V != len(self.cfg.cameras):
            raise ValueError(f"batch has {V} views, the config expects "
                             f"{len(self.cfg.cameras)} ({', '.join(self.cfg.cameras)})")
        tokens, mask = embed_prefix(self.vision, self.llm, batch, image_tokens)
        ar = torch.zeros(tokens.shape[1], dtype=torch.bool, device=tokens.device)
        return tokens, mask, ar

    def embed_suffix(self, state, x_t, t):
        """pi0's state token (if the model has one) + the action tokens: tokens (B, T, W), input
        mask (B, T), ar mask (T,). The state starts a block (the prefix cannot see it), the
        actions start another one (the state cannot see them)."""
        actions = self.embed_actions(x_t, t)  # (B, C, W)
        B, C, _ = actions.shape
        tokens = torch.cat([self.embed_state(state), actions], dim=1) if self.state_token else actions
        n_state = int(self.state_token)
        mask = torch.ones(B, n_state + C, dtype=torch.bool, device=x_t.device)
        ar = torch.tensor([1] * n_state + [1] + [0] * (C - 1), dtype=torch.bool, device=x_t.device)
        return tokens, mask, ar

    # -- training ------------------------------------------------------------------------------

    def velocity(self, batch, x_t, t):
        """One joint pass over prefix + suffix (the training path): v_t (B, C, A)."""
        prefix, prefix_mask, prefix_ar = self.embed_prefix(batch)
        suffix, suffix_mask, suffix_ar = self.embed_suffix(batch["state"], x_t, t)
        mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        ar = torch.cat([prefix_ar, suffix_ar])
        _, suffix_out = self.llm([prefix, suffix], make_positions(mask), make_attn_mask(mask, ar),
                                 conds=[None, self.time_conditioning(t)])
        return self.velocity_from(suffix_out)

    def flow_error(self, v_t, u_t, steps):
        """(v - u)^2 per example and step, (B, C), on the steps that count: openpi's mean over all
        action dims. Padded dims stay in (their target is 0, as in openpi): the sampler integrates
        every dim, and a dim whose velocity was never trained drifts off the path it had in
        training and corrupts the real dims through the attention (a tiny pi0.5 on the built-in
        task: 24-30% success with padded dims left out of the loss). Padded *steps*
        (batch["action_masks"] all False on that step, past the episode's end) give 0."""
        return (v_t - u_t).pow(2).mean(-1) * steps  # (B, C)

    def flow_inputs(self, batch, noise, time, delay):
        """(x_t, u_t, per-step time or time, the steps that count (B, C)) for the flow loss.
        delay (B,) int: training-time real-time chunking, the first delay[b] steps are given clean
        at t = 0 and leave the loss."""
        actions = batch["actions"]
        if noise is None or time is None:
            noise, time = sample_noise_and_time(actions.shape, device=actions.device)
        steps = valid_steps(batch) if "action_masks" in batch else torch.ones(actions.shape[:2], device=actions.device)
        if delay is not None:
            time, free = committed_prefix_time(time, delay, actions.shape[1])
            steps = steps * free
        x_t, u_t = interpolate(actions, noise, time)
        return x_t, u_t, time, steps

    def compute_loss(self, batch, noise=None, time=None, delay=None):
        """The flow-matching loss, per example and step: {"flow": (B, C), "flow_steps": (B, C) the
        steps that count} (openpi's compute_loss). noise (B, C, A) and time (B,) can be given
        (tests, train.py); otherwise they are drawn. delay: see flow_inputs."""
        x_t, u_t, t, steps = self.flow_inputs(batch, noise, time, delay)
        return {"flow": self.flow_error(self.velocity(batch, x_t, t), u_t, steps), "flow_steps": steps}

    def loss_weights(self):
        """How forward's terms add up to "loss" (train.py weighs its micro-batches term by term)."""
        return {"flow": self.cfg.flow_loss_weight, "ce": self.cfg.ce_loss_weight}

    def forward(self, batch, noise=None, time=None, delay=None):
        """Training entry point: a dict of scalar losses; "loss" is the one to minimise.

        Each term of compute_loss is a mean over its valid entries: "flow" over the action steps
        of batch["action_masks"] (all steps without it, and not a committed prefix), "ce" (pi0.5)
        over batch["target_masks"]; "loss" weighs them by the config's loss weights.
        """
        per = self.compute_loss(batch, noise, time, delay)
        steps = per["flow_steps"]
        losses = {"flow": per["flow"].sum() / steps.sum().clamp(min=1)}
        losses["loss"] = losses["flow"]
        if "ce" in per:  # pi0.5 co-training: the weighted sum of both terms
            tokens = batch["target_masks"].to(per["ce"].dtype)
            losses["ce"] = (per["ce"] * tokens).sum() / tokens.sum().clamp(min=1)
            losses["loss"] = self.cfg.flow_loss_weight * losses["flow"] + self.cfg.ce_loss_weight * losses["ce"]
        return losses

    # -- sampling ------------------------------------------------------------------------------

    def action_layout(self, prefix_mask):
        """How the C action tokens attend to a cache holding the prefix (and pi0's state token
        after it): mask (B, C, M) [query, key] over the valid prefix tokens, the state token and
        every action token; positions (B, C) continuing after the valid prefix (and state)."""
        B, P = prefix_mask.shape
        C, n_state = self.cfg.action_horizon, int(self.state_token)
        mask = torch.cat([prefix_mask[:, None, :].expand(B, C, P),
                          prefix_mask.new_ones(B, C, n_state + C)], dim=2)  # (B, C, P + n_state + C)
        positions = prefix_mask.sum(-1, keepdim=True) + n_state + torch.arange(C, device=prefix_mask.device)
        return mask, positions

    def prefill(self, batch, image_tokens=None, cache=None):
        """Everything that stays the same while the actions are denoised, once per observation:
        images + prompt into a KV cache, then pi0's state token (it sees the prefix and itself,
        never the actions, and pi0's norms do not depend on the time: its keys and values are the
        same at every step). -> (cache, layout): the cache keeps those tokens and has room for the
        C action tokens; layout = action_layout, how they attend to it.
        image_tokens: the vision tower's output when it already ran; cache: one to reuse (infer.py's
        static cache)."""
        prefix, prefix_mask, prefix_ar = self.embed_prefix(batch, image_tokens)
        B, P = prefix_mask.shape
        if cache is None:
            cache = KVCache(P + int(self.state_token) + self.cfg.action_horizon)
        cache.length = 0
        self.llm([prefix, None], make_positions(prefix_mask), make_attn_mask(prefix_mask, prefix_ar), cache=cache)
        cache.length = P  # kept: every denoising step attends to it
        if self.state_token:  # at the position after the valid prefix tokens; sees them and itself
            mask = torch.cat([prefix_mask, prefix_mask.new_ones(B, 1)], dim=1)[:, None]  # (B, 1, P + 1)
            self.llm([None, self.embed_state(batch["state"])], prefix_mask.sum(-1, keepdim=True), mask, cache=cache)
            cache.length += 1
        return cache, self.action_layout(prefix_mask)

    def denoise_step(self, x_t, t, cache, layout, mods=None):
        """The velocity at (x_t, t) (B, C, A) for action tokens that attend to a prefilled cache.
        They are written after the kept tokens and not kept: the next step writes over them.
        t: a Python float (the Euler loop's) or a tensor, (B,) or per token (B, C). mods: the
        expert's norm modulations for this time when precomputed (infer.py does it once per Euler
        time); by default the layers compute them from the time."""
        if not torch.is_tensor(t):
            t = torch.full((x_t.shape[0],), t, dtype=torch.float32, device=x_t.device)
        mask, positions = layout
        conds = None if mods is not None else [None, self.time_conditioning(t)]
        _, out = self.llm([None, self.embed_actions(x_t, t)], positions, mask, conds=conds, cache=cache, mods=mods)
        return self.velocity_from(out)

    def cost(self, batch_size, prefix_len, num_steps=10):
        """Analytic cost of sampling: per phase, forward FLOPs and weight elements read (a batch
        reads each weight once: vision and prefix once, the expert and the KV cache every step).
        Training is about 3x the forward FLOPs of num_steps=1 (one pass, then its backward)."""
        cfg, B, P, C = self.cfg, batch_size, prefix_len, self.cfg.action_horizon
        g, e, V = cfg.llm, cfg.expert, len(cfg.cameras)
        vlm, expert = count_params(self.llm.expert(0)), count_params(self.llm.expert(1))
        S = P + int(self.state_token) + C  # keys each action token sees
        flops = {"vision": B * vision_flops(cfg.vision, count_params(self.vision), V),
                 "prefix": B * transformer_flops(vlm, P, P, g.num_heads * g.head_dim, g.depth),
                 "denoise": num_steps * B * transformer_flops(expert, C, S, e.num_heads * e.head_dim, e.depth)}
        kv = 2 * g.depth * B * S * g.num_kv_heads * g.head_dim
        weights = {"vision": count_params(self.vision), "prefix": vlm, "denoise": num_steps * (expert + kv)}
        return flops, weights

    @torch.no_grad()
    def sample_actions(self, batch, noise=None, num_steps=10, guide=None):
        """Integrate the velocity from noise (t = 1) to actions (t = 0): (B, C, A), normalized.

        The prefix runs once (prefill); each Euler step runs only the action expert over the C
        action tokens. guide: a wrapper of the velocity that steers the sample (guidance.py: real-
        time chunking, committed steps, classifier-free guidance); noise (B, C, A), drawn if None.
        """
        B = batch["state"].shape[0]
        shape = (B, self.cfg.action_horizon, self.cfg.action_dim)
        x = torch.randn(shape, device=batch["state"].device) if noise is None else noise.float()
        cache, layout = self.prefill(batch)
        velocity = lambda x_t, t: self.denoise_step(x_t, t, cache.for_step(), layout)
        return euler(velocity if guide is None else guide(velocity), x, num_steps)


# ----------------------------------------------------------------------------------------------
# Prompt format (openpi's PaligemmaTokenizer for pi0)

def pad_tokens(ids, max_len, condition=None):
    """Right-pad ids with 0 to max_len -> (tokens int64, mask bool). Too long: truncate, warn, as
    openpi does; but a prompt with a condition is an error, as the cut would take the condition
    with it (a conditioned and an unconditioned prompt would tokenize the same)."""
    if len(ids) > max_len and condition is not None:
        raise ValueError(f"prompt with condition {condition!r} has {len(ids)} tokens, over max_token_len={max_len}: "
                         f"the condition would be cut off; raise it (train.py --max-token-len)")
    if len(ids) > max_len:
        warnings.warn(f"prompt has {len(ids)} tokens, truncated to max_token_len={max_len}")
        ids = ids[:max_len]
    tokens = np.zeros(max_len, dtype=np.int64)
    tokens[:len(ids)] = ids
    return tokens, np.arange(max_len) < len(ids)


def tokenize_prompt(sp, prompt, max_len, condition=None):
    """pi0's prompt: BOS + cleaned text, then "\\n" encoded on its own ("start of answer").

    sp is a sentencepiece.SentencePieceProcessor (PaliGemma's tokenizer for real checkpoints).
    condition: text the policy is conditioned on (e.g. RECAP's "Advantage: positive"), on its own
    line after the task.
    """
    clean = prompt.strip().replace("_", " ").replace("\n", " ")
    if condition is not None:
        clean = f"{clean}\n{condition}"
    return pad_tokens(sp.encode(clean, add_bos=True) + sp.encode("\n"), max_len, condition)


def prompt_tokenizer(cfg, sp):
    """(prompt, normalized state, condition) -> (ids, mask): pi0's prompt has no state."""
    return lambda prompt, state, condition=None: tokenize_prompt(sp, prompt, cfg.max_token_len, condition)


if __name__ == "__main__":
    # Build the tiny pi0, compute a loss, sample a chunk, and report shapes, sizes and timing.
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = Pi0(cfg).eval()
    batch = random_batch(cfg, B=2, actions=True)
    print(f"params: vision {count_params(model.vision):,}  llm+expert {count_params(model.llm):,}  "
          f"total {count_params(model):,}")
    print(f"loss {model(batch)['loss'].item():.4f}")
    t0 = timer.perf_counter()
    actions = model.sample_actions(batch, num_steps=10)
    print(f"sampled actions {tuple(actions.shape)} in {1000 * (timer.perf_counter() - t0):.1f} ms")
