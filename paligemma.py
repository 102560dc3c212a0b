"""PaliGemma with action experts: the backbone shared by pi0, pi0.5 and pi0-FAST.

Two networks live here, written from raw PyTorch:

1. SigLIP, a plain Vision Transformer (https://arxiv.org/abs/2303.15343). An image becomes a grid of
   14x14 patches, each patch a token; a linear "head" projects the tokens to the language width.
2. Gemma (https://arxiv.org/abs/2403.08295) as a *list of experts that share attention*
   (pi0, https://arxiv.org/abs/2410.24164, section 3). Expert 0 is the PaliGemma language model and
   reads image + text tokens (the "prefix"); expert 1 is the small action expert and reads the
   action tokens (the "suffix"). Each expert has its own norms, projections and MLP, but in every
   layer the queries, keys and values of all experts are concatenated along the sequence and go
   through ONE attention. That is how actions look at the image and the prompt.

Axis legend, shared by every file of the project (each file's docstring lists the letters it uses):
  B batch, V camera views, R image side (pixels), I image tokens (patches) per view,
  P prefix tokens (images + prompt), L prompt tokens, D discrete target / decoded tokens,
  C chunk (action horizon), A action dim (the model's, padded), S robot state dim,
  T tokens of the streams in one call, M keys one call attends to (cache + T),
  W width, F MLP width, N query heads, K kv heads, G = N // K query heads per kv head,
  H head dim, E episodes, X frames (rows) of a dataset, Q value bins (RECAP), r a LoRA rank.
  Spelled out, never a letter: depth (layers), a camera image's height and width.

Precision policy (the one place it is written down). Training keeps fp32 master weights; on GPU
the matmuls run in bf16 under torch.autocast. These always run in fp32, as in openpi's JAX code:
  - RMSNorm / LayerNorm statistics and the (1 + scale) / shift multiply;
  - RoPE (angles and the rotation), attention logits and softmax;
  - the SigLIP patch embedding and position embedding;
  - the sin-cos time embedding and the action in/out projections (in pi0.py).
Serving in bf16 holds the weights in bf16 once (models.load(..., dtype=torch.bfloat16)), except
the parameters of that fp32 list (`fp32_param_names`): then no call casts a weight. On CPU the
tests run everything in fp32 and match the JAX fixtures to ~1e-5.
"""

import math
import re
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# openpi fills masked attention logits with this finite number, not -inf: a query row with no
# valid key (a padding token) then gets a uniform softmax and stays finite instead of NaN.
BIG_NEG = -2.3819763e38


# ----------------------------------------------------------------------------------------------
# Configs and presets

@dataclass
class SiglipConfig:
    width: int = 1152       # W of the vision transformer
    depth: int = 27         # number of encoder blocks
    mlp_dim: int = 4304     # F of the MLP
    num_heads: int = 16     # heads (head dim = width // num_heads = 72)
    patch: int = 14         # square patch size in pixels; the conv has stride = patch
    image_size: int = 224   # square input resolution; (image_size // patch)^2 tokens per image


@dataclass
class GemmaConfig:
    width: int = 2048       # W of this expert's residual stream
    depth: int = 18         # layers (all experts of one model must agree)
    mlp_dim: int = 16384    # F of the GeGLU MLP
    num_heads: int = 8      # N query heads (shared by all experts of one model)
    num_kv_heads: int = 1   # K: 1 = multi-query attention
    head_dim: int = 256     # H (shared by all experts of one model)
    dropout: float = 0.0    # dropout on the attention and MLP outputs (training only)


SIGLIP_PRESETS = {
    "so400m": SiglipConfig(),  # the real PaliGemma encoder, So400m/14 at 224px
    "tiny": SiglipConfig(width=48, depth=2, mlp_dim=96, num_heads=4, patch=14, image_size=56),
}
GEMMA_PRESETS = {
    "gemma_2b": GemmaConfig(),  # PaliGemma's language model
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096),  # pi0's action expert
    "tiny_llm": GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    "tiny_expert": GemmaConfig(width=32, depth=4, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=16),
}
PALIGEMMA_VOCAB_SIZE = 257152  # 256000 Gemma pieces + 1024 <locXXXX> + 128 <segXXX>


# ----------------------------------------------------------------------------------------------
# The batch: what every model takes (openpi's Observation, plus the training targets)


class Batch(TypedDict, total=False):
    """One plain dict of tensors, leading axis B. data.py makes it from a dataset, policy.py from
    a robot's request; the models never see raw data. State and actions are normalized and
    zero-padded to the model's action_dim (pi0-FAST: the robot's own width)."""
    images: torch.Tensor        # (B, V, 3, R, R) float32 in [-1, 1], views in cfg.cameras order
    image_masks: torch.Tensor   # (B, V) bool: False for a missing camera (its tokens are masked out)
    state: torch.Tensor         # (B, A) float32
    tokens: torch.Tensor        # (B, L) int64: the prompt in the model's format, right-padded
    token_masks: torch.Tensor   # (B, L) bool: True on real tokens
    actions: torch.Tensor       # (B, C, A) float32 (training)
    action_masks: torch.Tensor  # (B, C, A) bool: False on padded dims and steps (training)
    # model-specific training keys: pi0.5's FAST targets (target_tokens / target_masks (B, D)),
    # pi0-FAST's answer layout (token_ar_masks / token_loss_masks (B, L)), a prompt condition's
    # unconditioned prompt (uncond_tokens / uncond_token_masks (B, L))


def prefix_length(cfg):
    """Tokens in a model's prefix: every camera's image patches, then the prompt budget."""
    return len(cfg.cameras) * (cfg.vision.image_size // cfg.vision.patch) ** 2 + cfg.max_token_len


def random_batch(cfg, B=2, seed=0, actions=True):
    """A random batch for a model config (tests, benchmarks): images in [-1, 1], prompts of
    random lengths, the last view of the last example missing; actions and their masks unless
    actions=False (an observation, as sampling takes it)."""
    g = torch.Generator().manual_seed(seed)
    V, R, L = len(cfg.cameras), cfg.vision.image_size, cfg.max_token_len
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    token_masks = torch.arange(L)[None, :] < lengths[:, None]
    batch = {"images": torch.rand(B, V, 3, R, R, generator=g) * 2 - 1,
             "image_masks": torch.ones(B, V, dtype=torch.bool),
             "state": torch.randn(B, cfg.action_dim, generator=g),
             "tokens": torch.randint(3, cfg.vocab_size, (B, L), generator=g) * token_masks,
             "token_masks": token_masks}
    if V > 1:
        batch["image_masks"][-1, -1] = False
    if actions:
        batch["actions"] = torch.randn(B, cfg.action_horizon, cfg.action_dim, generator=g)
        batch["action_masks"] = torch.ones(B, cfg.action_horizon, cfg.action_dim, dtype=torch.bool)
    return batch


# ----------------------------------------------------------------------------------------------
# Attention masks and positions (big_vision's "ar mask" convention, openpi's make_attn_mask)

def make_attn_mask(input_mask, ar_mask):
    """Which tokens may attend to which.

    input_mask: (B, T) bool, True for real tokens. ar_mask: (T,) or (B, T) bool/int; a 1 starts a
    new block. Token i sees real token j iff block(j) <= block(i), where block = cumsum(ar_mask).
    All zeros = bidirectional, all ones = causal, [0..0, 1..1] = prefix-LM.
    Returns (B, T, T) bool, indexed [query, key].
    """
    ar_mask = torch.as_tensor(ar_mask, device=input_mask.device).broadcast_to(input_mask.shape)
    block = torch.cumsum(ar_mask.long(), dim=1)  # (B, T)
    causal = block[:, None, :] <= block[:, :, None]  # (B, T, T): key block <= query block
    valid = input_mask[:, None, :] & input_mask[:, :, None]  # both tokens are real
    return causal & valid


def make_positions(input_mask):
    """RoPE positions cumsum(mask) - 1: padding and masked cameras do not consume a position."""
    return torch.cumsum(input_mask.long(), dim=1) - 1  # (B, T)


# ----------------------------------------------------------------------------------------------
# SigLIP vision encoder

class SiglipBlock(nn.Module):
    """Pre-LayerNorm transformer block: x += MHA(LN(x)); x += MLP(LN(x))."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        W = cfg.width
        self.num_heads = cfg.num_heads
        # big_vision's LayerNorm uses eps 1e-6 (PyTorch's default 1e-5 is measurably different)
        self.norm1 = nn.LayerNorm(W, eps=1e-6)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(W, W), nn.Linear(W, W), nn.Linear(W, W)
        self.o_proj = nn.Linear(W, W)
        self.norm2 = nn.LayerNorm(W, eps=1e-6)
        self.fc1 = nn.Linear(W, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, W)

    def forward(self, x):  # x: (B, I, W)
        B, I, W = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(B, I, self.num_heads, -1).transpose(1, 2)  # (B, N, I, H)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        x = x + self.o_proj(attn.transpose(1, 2).reshape(B, I, W))
        # flax's nn.gelu defaults to the tanh approximation; exact erf is off by ~1e-3
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class SigLIP(nn.Module):
    """ViT encoder with no pooling, plus PaliGemma's linear projector to the language width."""

    def __init__(self, cfg: SiglipConfig, out_width: int):
        super().__init__()
        self.cfg = cfg
        num_patches = (cfg.image_size // cfg.patch) ** 2
        self.patch_embed = keep_fp32(nn.Conv2d(3, cfg.width, kernel_size=cfg.patch, stride=cfg.patch))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, cfg.width) / math.sqrt(cfg.width))
        keep_fp32(self, "pos_embed")  # the stem runs in fp32 (forward)
        self.blocks = nn.ModuleList(SiglipBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        # the multimodal projector; image tokens are NOT scaled by sqrt(width) afterwards
        self.head = nn.Linear(cfg.width, out_width)

    def forward(self, images):
        """images: (B, 3, R, R) float in [-1, 1] -> tokens (B, I, out_width)."""
        if images.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"SigLIP expects {self.cfg.image_size}x{self.cfg.image_size} images, "
                             f"got {tuple(images.shape[-2:])}; resize (with padding) first")
        with torch.autocast(images.device.type, enabled=False):  # the stem runs in fp32
            x = self.patch_embed(images.float())  # (B, W, h, w)
            x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, I, W), row-major patches
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, I, out_width)

    def embed_views(self, images):
        """(B, V, 3, R, R) -> image tokens (B, V*I, out_width): every view in one pass, in order."""
        B = images.shape[0]
        x = self(images.flatten(0, 1))  # (B*V, I, out_width)
        return x.view(B, -1, x.shape[-1])


def embed_prefix(vision, llm, batch, image_tokens=None):
    """PaliGemma's input: every view's image tokens, then the prompt's token embeddings ->
    tokens (B, V*I + L, W) and their input mask (False on a missing view's tokens and on the
    prompt's padding). image_tokens: vision.embed_views's output when it already ran."""
    image_masks = batch["image_masks"]
    B, V = image_masks.shape
    img = vision.embed_views(batch["images"]) if image_tokens is None else image_tokens  # (B, V*I, W)
    img_mask = image_masks[:, :, None].expand(B, V, img.shape[1] // V).reshape(B, -1)
    text = llm.embed_tokens(batch["tokens"]).to(img.dtype)  # (B, L, W), scaled by sqrt(W)
    return torch.cat([img, text], dim=1), torch.cat([img_mask, batch["token_masks"]], dim=1)


def discretize_state(state):
    """pi0.5's and pi0-FAST's state as text: the normalized state (about [-1, 1]) in 256 bins,
    openpi's edges (values below -1 give -1)."""
    return np.digitize(state, np.linspace(-1, 1, 256 + 1)[:-1]) - 1


# ----------------------------------------------------------------------------------------------
# Gemma building blocks

def keep_fp32(module, *names):
    """Mark parameters of `module` that stay fp32 when the model is served in bf16 (they run
    outside autocast, in fp32 arithmetic). Default: all of its direct parameters."""
    module.fp32_params = names or tuple(n for n, _ in module.named_parameters(recurse=False))
    return module


def fp32_param_names(model):
    """Names of the parameters the precision policy keeps in fp32: LayerNorm and RMSNorm scales
    and whatever keep_fp32 marked (SigLIP's stem, the action projections)."""
    out = set()
    for prefix, module in model.named_modules():
        names = vars(module)["fp32_params"] if "fp32_params" in vars(module) else \
            [n for n, _ in module.named_parameters(recurse=False)] if isinstance(module, nn.LayerNorm) else []
        out |= {f"{prefix}.{n}" if prefix else n for n in names}
    return out


class RMSNorm(nn.Module):
    """Gemma's RMSNorm, plain or adaptive, in two steps: modulation(cond), then forward(x, mod).

    Plain:    y = x / rms(x) * (1 + scale), with scale zero-initialised (Gemma stores w - 1).
    Adaptive (pi0.5's adaRMS, conditioned on the flow-matching time): a Linear on the condition
    gives (scale, shift, gate); y = x / rms(x) * (1 + scale) + shift, and the gate multiplies the
    residual branch that follows. There is no learned scale vector in the adaptive form.
    The modulation is split out because it depends on the condition alone: the fast sampler
    computes it once per Euler time instead of once per call.
    """

    def __init__(self, width: int, cond_width: int | None = None):
        super().__init__()
        self.adaptive = cond_width is not None
        if not self.adaptive:
            self.scale = nn.Parameter(torch.zeros(width))
            keep_fp32(self, "scale")  # used as 1 + scale.float(): fp32 arithmetic
        else:
            self.dense = nn.Linear(cond_width, 3 * width)
            nn.init.zeros_(self.dense.weight)  # zero init: starts as a plain norm with gate 0
            nn.init.zeros_(self.dense.bias)

    def modulation(self, cond=None):
        """(mul, shift, gate): mul = 1 + scale in fp32, (W,) or (B, 1, W); shift, gate None or (B, 1, W)."""
        if not self.adaptive:
            return 1 + self.scale.float(), None, None
        if cond is None:
            raise ValueError("this adaptive RMSNorm needs a conditioning vector (the time embedding)")
        out = self.dense(cond)  # a condition per example (B, C) or per token (B, T, C)
        scale, shift, gate = (out[:, None, :] if out.dim() == 2 else out).chunk(3, dim=-1)  # each (B, 1 or T, W)
        return 1 + scale.float(), shift.float(), gate

    def forward(self, x, mod):  # x: (B, T, W), mod: self.modulation(cond) -> (y, gate)
        mul, shift, gate = mod
        xf = x.float()  # statistics and the multiply in fp32
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * mul
        return (y if shift is None else y + shift).to(x.dtype), gate


def rope_tables(positions, head_dim, base=10_000.0):
    """RoPE's cos and sin for positions (B, T) int -> each (B, T, 1, H/2), fp32; once per call."""
    timescale = base ** ((2.0 / head_dim) * torch.arange(head_dim // 2, device=positions.device,
                                                         dtype=torch.float32))
    radians = positions.float()[..., None] / timescale  # (B, T, H/2)
    return torch.cos(radians)[:, :, None, :], torch.sin(radians)[:, :, None, :]


def rope(x, cos, sin):
    """Rotary position embedding, split-half convention, computed in fp32.

    x: (B, T, heads, H). The first and second halves of each head vector are rotated as pairs
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), not interleaved pairs.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention(q, k, v, mask):
    """Multi-query attention with fp32 logits and softmax.

    q: (B, T, N, H) already rotated and scaled; k, v: (B, M, K, H); mask: (B, T, M) bool.
    Returns (B, T, N*H).
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.view(B, T, K, N // K, H)  # query head n uses kv head n // G
    logits = torch.einsum("btkgh,bskh->bkgts", q.float(), k.float())  # (B, K, G, T, M)
    logits = torch.where(mask[:, None, None], logits, BIG_NEG)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.einsum("bkgts,bskh->btkgh", probs, v)  # (B, T, K, G, H)
    return out.reshape(B, T, N * H)


class KVCache:
    """Keys (after RoPE) and values of the tokens later calls attend to: one static cache.

    As in gpt-fast, each layer's buffers are allocated once, (B, max_len, K, H), on the first
    write (so they take the dtype the model computes in), and written in place: no torch.cat,
    fixed shapes for torch.compile and CUDA graphs. A call of T tokens writes its keys and values
    at slots [length, length + T) and its queries attend to slots [0, length + T), so the call's
    attention mask is (B, T, length + T). `length` moves only when the caller keeps the tokens
    (`cache.length += T`):
      - pi0 / pi0.5 sampling keeps the prefix; each denoising step writes its action tokens at
        the same slots after it, over the previous step's (nothing is kept);
      - pi0-FAST keeps the prefix and then every decoded token;
      - pi0.5's training (knowledge insulation) writes images + prompt + targets in the VLM pass,
        then `prefix(P, room, detach)` gives the expert pass its own cache of the first P slots.
    """

    def __init__(self, max_len):
        self.max_len, self.length = max_len, 0
        self.k, self.v = {}, {}  # layer index -> (B, max_len, K, H)

    def update(self, layer, k, v):
        """Write this call's k, v (B, T, K, H) of one layer; return that layer's (B, length + T, K, H)."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens, this call needs {end}")
        if layer not in self.k:
            self.k[layer] = k.new_zeros(k.shape[0], self.max_len, *k.shape[2:])
            self.v[layer] = v.new_zeros(v.shape[0], self.max_len, *v.shape[2:])
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def for_step(self):
        """The cache one call of a repeated step writes into: this one, or under autograd (real-
        time chunking differentiates through a denoising step) a detached copy of its kept slots,
        so that the next step's in-place writes never reach into this step's graph."""
        return self.prefix(self.length, self.max_len - self.length, detach=True) if torch.is_grad_enabled() else self

    def prefix(self, n, room, detach=False):
        """A new cache holding this one's first n slots (kept) and room for `room` more tokens.
        detach=True cuts the gradient there: pi0.5's knowledge insulation."""
        out = KVCache(n + room)
        out.length = n
        for i in self.k:
            k, v = self.k[i][:, :n], self.v[i][:, :n]
            k, v = (k.detach(), v.detach()) if detach else (k, v)
            out.k[i] = torch.cat([k, k.new_zeros(k.shape[0], room, *k.shape[2:])], dim=1)
            out.v[i] = torch.cat([v, v.new_zeros(v.shape[0], room, *v.shape[2:])], dim=1)
        return out


class ExpertLayer(nn.Module):
    """One expert's weights in one layer: norms, q/k/v/out projections, GeGLU MLP. No biases."""

    def __init__(self, cfg: GemmaConfig, cond_width: int | None = None):
        super().__init__()
        W, N, K, H = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dropout, self.head_dim = cfg.dropout, H
        self.attn_norm = RMSNorm(W, cond_width)
        self.q_proj = nn.Linear(W, N * H, bias=False)
        self.k_proj = nn.Linear(W, K * H, bias=False)
        self.v_proj = nn.Linear(W, K * H, bias=False)
        self.o_proj = nn.Linear(N * H, W, bias=False)
        self.mlp_norm = RMSNorm(W, cond_width)
        self.gate_proj = nn.Linear(W, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(W, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, W, bias=False)

    def qkv(self, x, mod):
        """Pre-norm, then q (B, T, N, H), k and v (B, T, K, H), and the adaRMS gate (or None)."""
        h, gate = self.attn_norm(x, mod)
        B, T, _ = h.shape
        split = lambda y: y.view(B, T, -1, self.head_dim)
        return split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)), gate

    def residual(self, x, y, gate):
        """x + gate * dropout(y); the gate (adaRMS only) scales the residual branch."""
        y = F.dropout(y, self.dropout, self.training)
        return x + y if gate is None else x + y * gate

    def finish(self, x, attn_out, gate, mlp_mod):
        """Output projection with its residual, then the pre-norm GeGLU MLP with its own:
        x + down(gelu(gate_proj(h)) * up_proj(h))."""
        x = self.residual(x, self.o_proj(attn_out), gate)
        h, mlp_gate = self.mlp_norm(x, mlp_mod)
        y = self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))
        return self.residual(x, y, mlp_gate)


class GemmaLayer(nn.Module):
    """One transformer layer of every expert, with ONE attention over all their tokens (openpi's
    Block). Each expert normalizes and projects its own tokens; the queries, keys and values are
    concatenated along the sequence (expert order: prefix first, then suffix) and attend once;
    the output is split back and each expert finishes with its own projection and MLP."""

    def __init__(self, configs: list[GemmaConfig], cond_widths, index: int):
        super().__init__()
        self.index, self.head_dim = index, configs[0].head_dim  # index: this layer's cache slot
        self.experts = nn.ModuleList(ExpertLayer(c, w) for c, w in zip(configs, cond_widths))

    def modulations(self, conds, present):
        """Per expert, its (attn norm, mlp norm) modulations for its condition; None if absent."""
        return [(ex.attn_norm.modulation(conds[e]), ex.mlp_norm.modulation(conds[e])) if e in present else None
                for e, ex in enumerate(self.experts)]

    def forward(self, xs, rope_cs, mask, conds, cache=None, mods=None):
        """xs: per expert (B, T_e, W_e), or None if that expert has no tokens in this call.
        rope_cs: (cos, sin) of the positions of this call's tokens (rope_tables).
        mask: (B, T, M) bool [query, key]; M = T, or cache.length + T with a cache.
        conds: per expert, the adaRMS condition (B, C) or None; or mods, this layer's
        modulations precomputed (self.modulations). They are computed here, inside the layer,
        so that an FSDP unit of one layer gathers its norms' weights when it needs them.
        Returns the new xs."""
        present = [e for e, x in enumerate(xs) if x is not None]
        mods = mods or self.modulations(conds, present)
        parts = [self.experts[e].qkv(xs[e], mods[e][0]) for e in present]
        q, k, v = (torch.cat([p[j] for p in parts], dim=1) for j in range(3))  # (B, T, ., H)
        q = rope(q, *rope_cs) * self.head_dim ** -0.5  # scale after RoPE, as openpi does
        k = rope(k, *rope_cs)
        if cache is not None:  # earlier tokens' keys and values come from the cache
            k, v = cache.update(self.index, k, v)
        out = attention(q, k, v, mask)  # (B, T, N*H)
        xs = list(xs)
        lengths = [xs[e].shape[1] for e in present]
        for e, o, (_, _, _, gate) in zip(present, out.split(lengths, dim=1), parts):
            xs[e] = self.experts[e].finish(xs[e], o, gate, mods[e][1])
        return xs


class Gemma(nn.Module):
    """Gemma experts sharing one attention per layer. Expert 0 owns the token embedding.

    configs: one GemmaConfig per expert. cond_widths: per expert, the width of the adaRMS
    condition, or None for plain RMSNorm (pi0.5: [None, expert width]).
    """

    def __init__(self, configs: list[GemmaConfig], vocab_size: int, cond_widths=None):
        super().__init__()
        first = configs[0]
        for cfg in configs[1:]:  # the joint attention needs these to agree
            for field in ("depth", "num_heads", "num_kv_heads", "head_dim"):
                if getattr(cfg, field) != getattr(first, field):
                    raise ValueError(f"all experts must share {field}: {getattr(cfg, field)} != "
                                     f"{getattr(first, field)}")
        cond_widths = cond_widths or [None] * len(configs)
        self.configs = configs
        self.embed = nn.Embedding(vocab_size, first.width)
        nn.init.normal_(self.embed.weight, std=first.width ** -0.5)
        self.layers = nn.ModuleList(GemmaLayer(configs, cond_widths, i) for i in range(first.depth))
        self.final_norms = nn.ModuleList(RMSNorm(c.width, w) for c, w in zip(configs, cond_widths))

    def expert(self, e):
        """Every module of expert e (its layers and final norm; not the embedding), for counting,
        freezing or LoRA. A view: the modules stay registered where they are."""
        return nn.ModuleList([layer.experts[e] for layer in self.layers] + [self.final_norms[e]])

    def embed_tokens(self, tokens):
        """(B, T) ids -> (B, T, W). Gemma multiplies token embeddings by sqrt(width)."""
        return self.embed(tokens) * math.sqrt(self.configs[0].width)

    def logits(self, h):
        """Next-token logits from expert-0 outputs with the tied embedding table (no scaling)."""
        return h @ self.embed.weight.t().to(h.dtype)  # (B, T, vocab)

    def modulations(self, conds, present):
        """Every norm's modulation for the present experts' conditions: per layer, per expert
        (attn, mlp); then per expert the final norm's. The fast sampler precomputes these for
        each Euler time (pi0.5's adaRMS depends on the time alone)."""
        final = [norm.modulation(conds[e]) if e in present else None for e, norm in enumerate(self.final_norms)]
        return [layer.modulations(conds, present) for layer in self.layers], final

    def forward(self, xs, positions, attn_mask, conds=None, cache=None, mods=None):
        """Run the experts' streams through all layers with joint attention.

        xs: one entry per expert, (B, T_e, W_e) or None if that expert has no tokens in this call.
        positions: (B, T) RoPE positions of the present streams, concatenated in expert order.
        attn_mask: (B, T, M) bool [query, key]; M = T, or cache.length + T with a cache.
        conds: per expert, the adaRMS condition (B, C) or None; or mods, their modulations
          precomputed (self.modulations: the fast sampler's per-step constants).
        cache: a KVCache this call writes its keys and values to and reads earlier ones from.
        Returns per expert the outputs after the final norm (None where xs was None).
        """
        conds = conds or [None] * len(xs)
        layer_mods, final_mods = mods or ([None] * len(self.layers), None)
        rope_cs = rope_tables(positions, self.configs[0].head_dim)
        for layer, m in zip(self.layers, layer_mods):
            xs = layer(xs, rope_cs, attn_mask, conds, cache, m)
        final_mods = final_mods or [norm.modulation(c) if x is not None else None
                                    for norm, c, x in zip(self.final_norms, conds, xs)]
        return [self.final_norms[e](x, final_mods[e])[0] if x is not None else None  # final gate unused
                for e, x in enumerate(xs)]


# ----------------------------------------------------------------------------------------------
# Cost model and weight loading (shared by every model file)

def count_params(module):
    return sum(p.numel() for p in module.parameters())


def transformer_flops(params, tokens, keys, attn_width, depth):
    """Forward FLOPs of `tokens` tokens through a transformer whose attention sees `keys` keys:
    2 per matmul weight per token, plus 4 * tokens * keys * width per layer for QK^T and PV."""
    return 2 * params * tokens + 4 * tokens * keys * attn_width * depth


def vision_flops(cfg: SiglipConfig, params, images):
    """SigLIP's forward FLOPs for `images` images (every patch attends to every patch)."""
    P_img = (cfg.image_size // cfg.patch) ** 2
    return images * transformer_flops(params, P_img, P_img, cfg.width, cfg.depth)


def upgrade_state_dict(state):
    """Checkpoints written before the layers held every expert (llm.experts.E.layers.I.x,
    llm.experts.E.final_norm.x) -> today's names (llm.layers.I.experts.E.x, llm.final_norms.E.x)."""
    def rename(k):
        m = re.fullmatch(r"llm\.experts\.(\d+)\.layers\.(\d+)\.(.+)", k)
        if m:
            return f"llm.layers.{m[2]}.experts.{m[1]}.{m[3]}"
        m = re.fullmatch(r"llm\.experts\.(\d+)\.final_norm\.(.+)", k)
        return f"llm.final_norms.{m[1]}.{m[2]}" if m else k
    return {rename(k): v for k, v in state.items()}


def load_state_strict(model, state, assign=False):
    """Load a state dict, naming every missing, unexpected or misshapen tensor (no silent init).
    assign=True: the model takes the given tensors (and their dtypes) instead of copying them."""
    state = upgrade_state_dict(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError("checkpoint does not fit the model:\n"
                         + "".join(f"  missing: {k}\n" for k in missing)
                         + "".join(f"  unexpected: {k}\n" for k in unexpected)
                         + "".join(f"  shape: {s}\n" for s in shapes))
    model.load_state_dict(state, assign=assign)


if __name__ == "__main__":
    # A tiny smoke run: two experts of different widths share attention.
    torch.manual_seed(0)
    llm, expert = GEMMA_PRESETS["tiny_llm"], GEMMA_PRESETS["tiny_expert"]
    gemma = Gemma([llm, expert], vocab_size=1024)
    vision = SigLIP(SIGLIP_PRESETS["tiny"], out_width=llm.width)
    img_tokens = vision(torch.rand(2, 3, 56, 56) * 2 - 1)
    prefix = torch.cat([img_tokens, gemma.embed_tokens(torch.randint(0, 1024, (2, 5)))], dim=1)
    suffix = torch.randn(2, 3, expert.width)
    mask = torch.ones(2, prefix.shape[1] + 3, dtype=torch.bool)
    ar = [0] * prefix.shape[1] + [1, 0, 0]
    outs = gemma([prefix, suffix], make_positions(mask), make_attn_mask(mask, ar))
    print("prefix out", tuple(outs[0].shape), "suffix out", tuple(outs[1].shape))
    print(f"params: vision {sum(p.numel() for p in vision.parameters()):,}, "
          f"gemma {sum(p.numel() for p in gemma.parameters()):,}")
