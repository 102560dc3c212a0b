"""pi0: a vision-language-action flow-matching policy (https://arxiv.org/abs/2410.24164).

The model, in one breath: PaliGemma reads the camera images and the prompt (the "prefix"); a
smaller Gemma "action expert" reads one state token and C noisy action tokens (the "suffix") and,
attending to the prefix through shared attention (paligemma.py), predicts the velocity that moves
the noisy chunk towards the robot's real action chunk. Sampling integrates that velocity from pure
noise (t = 1) to actions (t = 0) with 10 Euler steps; the prefix is computed once and cached.

Token layout and attention (ar = 1 starts a new causal block, see paligemma.make_attn_mask):

    [ img_0 ... img_V | prompt ]  [ state | act_1 ... act_C ]
      ar 0 ............. 0          1       1     0 ... 0
    - the prefix sees only the prefix (so it can be cached once per observation),
    - the state token sees the prefix and itself,
    - action tokens see everything, and each other bidirectionally.

Conventions follow openpi's JAX code, not the paper: t = 1 is noise, t = 0 is data;
x_t = t * noise + (1 - t) * actions; the network predicts u = noise - actions.

Axis legend: B batch, V views, P prefix tokens, S suffix tokens, C chunk (action horizon),
A action dim, W width.
"""

import json
import math
import os
import time as timer
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from paligemma import (GEMMA_PRESETS, PALIGEMMA_VOCAB_SIZE, SIGLIP_PRESETS, Gemma, GemmaConfig,
                       SigLIP, SiglipConfig, load_state_strict, make_attn_mask, make_positions)


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
    model: str = "pi0"          # which model file builds this config (read by loaders)

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
# Time: the sine-cosine embedding and the training-time distribution

def posemb_sincos(t, width, min_period=4e-3, max_period=4.0):
    """Sine-cosine embedding of a scalar per example: t (B,) -> (B, width), sin half first.

    Periods are spaced geometrically from min_period to max_period, so the embedding resolves
    both tiny and large differences of t. Computed in fp32 in openpi's order of operations.
    """
    if width % 2:
        raise ValueError(f"time embedding width must be even, got {width}")
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float32, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    x = t.float()[:, None] * (1.0 / period * 2 * math.pi)[None, :]  # (B, width/2)
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


def sample_time(batch_size, device):
    """t ~ Beta(1.5, 1) * 0.999 + 0.001: density ~ t^0.5 favours the noisy end, t in [0.001, 1)."""
    beta = torch.distributions.Beta(torch.tensor(1.5, device=device), torch.tensor(1.0, device=device))
    return beta.sample((batch_size,)) * 0.999 + 0.001


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


# ----------------------------------------------------------------------------------------------
# The model

class Pi0(nn.Module):
    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.cfg = cfg
        W = cfg.expert.width
        self.vision = SigLIP(cfg.vision, out_width=cfg.llm.width)
        self.llm = Gemma([cfg.llm, cfg.expert], cfg.vocab_size, cond_widths=self.cond_widths())
        self.action_in_proj = nn.Linear(cfg.action_dim, W)
        self.action_out_proj = nn.Linear(W, cfg.action_dim)
        self.build_time_conditioning()

    # pi0.5 (pi05.py) overrides the three methods below: that is the whole architectural diff.
    def cond_widths(self):
        return None  # pi0: plain RMSNorm in both experts

    def build_time_conditioning(self):
        W = self.cfg.expert.width
        self.state_proj = nn.Linear(self.cfg.action_dim, W)
        # the action-time MLP fuses each action token with the time embedding
        self.action_time_mlp_in = nn.Linear(2 * W, W)
        self.action_time_mlp_out = nn.Linear(W, W)

    def embed_suffix(self, state, x_t, t):
        """State token + action tokens fused with time.

        state (B, A), x_t (B, C, A), t (B,) -> tokens (B, 1 + C, W), input mask (B, 1 + C),
        ar mask (1 + C,), adaRMS condition (None for pi0).
        """
        B, C, _ = x_t.shape
        state_token = self.state_proj(state)[:, None, :]  # (B, 1, W)
        actions = self.project_actions(x_t)  # (B, C, W)
        time_emb = posemb_sincos(t, actions.shape[-1]).to(actions.dtype)  # (B, W)
        h = torch.cat([actions, time_emb[:, None, :].expand(B, C, -1)], dim=-1)  # (B, C, 2W)
        h = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(h)))  # swish in between only
        tokens = torch.cat([state_token, h], dim=1)
        mask = torch.ones(B, 1 + C, dtype=torch.bool, device=x_t.device)
        # the state starts a block (the prefix cannot see it), the actions start another one
        ar = torch.tensor([1, 1] + [0] * (C - 1), dtype=torch.bool, device=x_t.device)
        return tokens, mask, ar, None

    # -- pieces shared by pi0 and pi0.5 --------------------------------------------------------

    def project_actions(self, x_t):
        with torch.autocast(x_t.device.type, enabled=False):  # action projections stay fp32
            return self.action_in_proj(x_t.float())

    def velocity_from(self, suffix_out):
        """The last C suffix outputs -> predicted velocity (B, C, A), in fp32."""
        with torch.autocast(suffix_out.device.type, enabled=False):
            return self.action_out_proj(suffix_out[:, -self.cfg.action_horizon:].float())

    def embed_images(self, images):
        """(B, V, 3, R, R) -> image tokens (B, V*P_img, W): all views in one pass, views in order."""
        B = images.shape[0]
        img = self.vision(images.flatten(0, 1))  # (B*V, P_img, W)
        return img.view(B, -1, img.shape[-1])

    def embed_prefix(self, batch, image_tokens=None):
        """Images then prompt -> tokens (B, P, W), input mask (B, P), ar mask (P,) all zero.

        image_tokens (B, V*P_img, W): the vision tower's output, when it already ran (infer.py
        times the two apart); by default it runs here.
        """
        image_masks = batch["image_masks"]
        B, V = image_masks.shape
        if V != len(self.cfg.cameras):
            raise ValueError(f"batch has {V} views, the config expects "
                             f"{len(self.cfg.cameras)} ({', '.join(self.cfg.cameras)})")
        img = self.embed_images(batch["images"]) if image_tokens is None else image_tokens  # (B, V*P_img, W)
        img_mask = image_masks[:, :, None].expand(B, V, img.shape[1] // V).reshape(B, -1)
        lang = self.llm.embed_tokens(batch["tokens"])  # (B, L, W), scaled by sqrt(W)
        tokens = torch.cat([img, lang.to(img.dtype)], dim=1)
        mask = torch.cat([img_mask, batch["token_masks"]], dim=1)
        ar = torch.zeros(tokens.shape[1], dtype=torch.bool, device=tokens.device)
        return tokens, mask, ar

    def velocity(self, batch, x_t, t):
        """One joint pass over prefix + suffix (the training path): v_t (B, C, A)."""
        prefix, prefix_mask, prefix_ar = self.embed_prefix(batch)
        suffix, suffix_mask, suffix_ar, cond = self.embed_suffix(batch["state"], x_t, t)
        mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        ar = torch.cat([prefix_ar, suffix_ar])
        (_, suffix_out), _ = self.llm([prefix, suffix], make_positions(mask),
                                      make_attn_mask(mask, ar), conds=[None, cond])
        return self.velocity_from(suffix_out)

    def compute_loss(self, batch, noise=None, time=None):
        """Flow-matching loss per example and step, (B, C): openpi's mean over all action dims of
        (v - u)^2. Padded dims stay in (their target is 0, as in openpi): the sampler integrates
        every dim, and a dim whose velocity was never trained drifts off the path it had in
        training and corrupts the real dims through the attention (a tiny pi0.5 on the built-in
        task: 24-30% success with padded dims left out of the loss, 86% with them in). Padded
        *steps* (batch["action_masks"] all False on that step) give 0. noise (B, C, A) and time
        (B,) can be given (tests); otherwise they are drawn.
        """
        actions = batch["actions"]
        noise = torch.randn_like(actions) if noise is None else noise
        time = sample_time(actions.shape[0], actions.device) if time is None else time
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        u_t = noise - actions
        err = (self.velocity(batch, x_t, time) - u_t).pow(2).mean(-1)  # (B, C)
        return err * valid_steps(batch) if "action_masks" in batch else err

    def forward(self, batch, noise=None, time=None):
        """Training entry point: a dict of scalar losses; "loss" is the one to minimise.

        The mean over valid steps (every step without batch["action_masks"]).
        """
        per_step = self.compute_loss(batch, noise, time)  # (B, C)
        if "action_masks" in batch:
            valid = valid_steps(batch)
            loss = per_step.sum() / valid.sum().clamp(min=1)
        else:
            loss = per_step.mean()
        return {"loss": loss, "flow": loss}

    # -- sampling ------------------------------------------------------------------------------

    def prefill(self, batch, image_tokens=None):
        """Run the prefix once: returns its input mask (B, P) and per-layer KV cache."""
        prefix, prefix_mask, prefix_ar = self.embed_prefix(batch, image_tokens)
        _, kv_cache = self.llm([prefix, None], make_positions(prefix_mask),
                               make_attn_mask(prefix_mask, prefix_ar), return_kv=True)
        return prefix_mask, kv_cache

    def denoise_step(self, state, prefix_mask, kv_cache, x_t, t):
        """Velocity at (x_t, t) for suffix tokens that attend to the cached prefix."""
        suffix, suffix_mask, suffix_ar, cond = self.embed_suffix(state, x_t, t)
        B, S = suffix_mask.shape
        # suffix queries see every valid prefix token, and the suffix by its own ar mask
        mask = torch.cat([prefix_mask[:, None, :].expand(B, S, -1),
                          make_attn_mask(suffix_mask, suffix_ar)], dim=2)  # (B, S, P + S)
        # positions continue after the valid prefix tokens
        positions = prefix_mask.sum(-1, keepdim=True) + make_positions(suffix_mask)
        (_, out), _ = self.llm([None, suffix], positions, mask, conds=[None, cond],
                               kv_cache=kv_cache)
        return self.velocity_from(out)

    @torch.no_grad()
    def sample_actions(self, batch, noise=None, num_steps=10):
        """Integrate the velocity from noise (t = 1) to actions (t = 0): (B, C, A), normalized.

        The loop runs over Python floats, so no step waits on the device.
        """
        B = batch["state"].shape[0]
        device = batch["state"].device
        shape = (B, self.cfg.action_horizon, self.cfg.action_dim)
        x = torch.randn(shape, device=device) if noise is None else noise.float()
        prefix_mask, kv_cache = self.prefill(batch)
        times, dt = euler_times(num_steps)
        for t in times:
            t_batch = torch.full((B,), t, dtype=torch.float32, device=device)
            v = self.denoise_step(batch["state"], prefix_mask, kv_cache, x, t_batch)
            x = x + dt * v
        return x


# ----------------------------------------------------------------------------------------------
# Prompt format (openpi's PaligemmaTokenizer for pi0) and checkpoints

def pad_tokens(ids, max_len):
    """Right-pad ids with 0 to max_len -> (tokens int64, mask bool). Too long: truncate, warn."""
    if len(ids) > max_len:
        warnings.warn(f"prompt has {len(ids)} tokens, truncated to max_token_len={max_len}")
        ids = ids[:max_len]
    tokens = np.zeros(max_len, dtype=np.int64)
    tokens[:len(ids)] = ids
    return tokens, np.arange(max_len) < len(ids)


def tokenize_prompt(sp, prompt, max_len):
    """pi0's prompt: BOS + cleaned text, then "\\n" encoded on its own ("start of answer").

    sp is a sentencepiece.SentencePieceProcessor (PaliGemma's tokenizer for real checkpoints).
    """
    clean = prompt.strip().replace("_", " ").replace("\n", " ")
    return pad_tokens(sp.encode(clean, add_bos=True) + sp.encode("\n"), max_len)


def save_pretrained(model, path, norm_stats=None, extra_files=(), json_files=None, state_dict=None):
    """Write a checkpoint directory atomically: model.safetensors, config.json, norm_stats.json.

    Everything goes to a temporary sibling first, then one rename publishes it, so a crash
    never leaves a half-written checkpoint. An existing directory is replaced only at the end.
    norm_stats: {"state": {"mean": ..., ...}, "actions": ...} (lists or arrays).
    extra_files: paths copied in verbatim (e.g. a tokenizer model); json_files: {name: object}.
    state_dict: the weights to write, if not model.state_dict() (e.g. LoRA merged into them).
    """
    import shutil

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


def from_pretrained(path, map_location="cpu"):
    """Rebuild a pi0 / pi0.5 model from a checkpoint directory (config.json + model.safetensors)."""
    from safetensors.torch import load_file
    with open(os.path.join(path, "config.json")) as f:
        cfg_dict = json.load(f)
    if cfg_dict.get("model") == "pi0_fast":
        from pi0_fast import from_pretrained as from_pretrained_fast
        return from_pretrained_fast(path, map_location)
    if cfg_dict.get("model") == "pi05":
        from pi05 import Pi05, Pi05Config
        model = Pi05(Pi05Config.from_dict(cfg_dict))
    elif cfg_dict.get("model") == "pi0":
        model = Pi0(Pi0Config.from_dict(cfg_dict))
    else:
        raise ValueError(f"{path}/config.json: model {cfg_dict.get('model')!r} is not pi0 or pi05")
    load_state_strict(model, load_file(os.path.join(path, "model.safetensors"), device=map_location))
    return model


if __name__ == "__main__":
    # Build the tiny pi0, compute a loss, sample a chunk, and report shapes, sizes and timing.
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = Pi0(cfg).eval()
    B, V, R = 2, len(cfg.cameras), cfg.vision.image_size
    batch = {
        "images": torch.rand(B, V, 3, R, R) * 2 - 1,
        "image_masks": torch.ones(B, V, dtype=torch.bool),
        "state": torch.randn(B, cfg.action_dim),
        "tokens": torch.randint(0, cfg.vocab_size, (B, cfg.max_token_len)),
        "token_masks": torch.ones(B, cfg.max_token_len, dtype=torch.bool),
        "actions": torch.randn(B, cfg.action_horizon, cfg.action_dim),
    }
    count = lambda m: sum(p.numel() for p in m.parameters())
    print(f"params: vision {count(model.vision):,}  llm+expert {count(model.llm):,}  "
          f"total {count(model):,}")
    print(f"loss {model(batch)['loss'].item():.4f}")
    t0 = timer.perf_counter()
    actions = model.sample_actions(batch, num_steps=10)
    print(f"sampled actions {tuple(actions.shape)} in {1000 * (timer.perf_counter() - t0):.1f} ms")
