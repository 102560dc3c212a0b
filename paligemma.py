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

Axis legend used in shape comments:
  B batch, V camera views, T tokens (of the streams in this call), S keys (cache + T),
  N query heads, K kv heads, G = N // K query heads per kv head, H head dim,
  W width, F mlp width, L layers, P patches per image.

Precision policy (the one place it is written down). Parameters are fp32 masters. On GPU the
matmuls run in bf16 under torch.autocast. These always run in fp32, as in openpi's JAX code:
  - RMSNorm / LayerNorm statistics and the (1 + scale) / shift multiply;
  - RoPE (angles and the rotation), attention logits and softmax;
  - the SigLIP patch embedding and position embedding;
  - the sin-cos time embedding and the action in/out projections (in pi0.py).
On CPU the tests run everything in fp32 and match the JAX fixtures to ~1e-5.
"""

import math
from dataclasses import dataclass

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

    def forward(self, x):  # x: (B, P, W)
        B, P, W = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(B, P, self.num_heads, -1).transpose(1, 2)  # (B, N, P, H)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        x = x + self.o_proj(attn.transpose(1, 2).reshape(B, P, W))
        # flax's nn.gelu defaults to the tanh approximation; exact erf is off by ~1e-3
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class SigLIP(nn.Module):
    """ViT encoder with no pooling, plus PaliGemma's linear projector to the language width."""

    def __init__(self, cfg: SiglipConfig, out_width: int):
        super().__init__()
        self.cfg = cfg
        num_patches = (cfg.image_size // cfg.patch) ** 2
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, cfg.width) / math.sqrt(cfg.width))
        self.blocks = nn.ModuleList(SiglipBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        # the multimodal projector; image tokens are NOT scaled by sqrt(width) afterwards
        self.head = nn.Linear(cfg.width, out_width)

    def forward(self, images):
        """images: (B, 3, H, W) float in [-1, 1] -> tokens (B, P, out_width)."""
        if images.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"SigLIP expects {self.cfg.image_size}x{self.cfg.image_size} images, "
                             f"got {tuple(images.shape[-2:])}; resize (with padding) first")
        with torch.autocast(images.device.type, enabled=False):  # the stem runs in fp32
            x = self.patch_embed(images.float())  # (B, W, h, w)
            x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, P, W), row-major patches
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, P, out_width)


# ----------------------------------------------------------------------------------------------
# Gemma building blocks

class RMSNorm(nn.Module):
    """Gemma's RMSNorm, plain or adaptive.

    Plain:    y = x / rms(x) * (1 + scale), with scale zero-initialised (Gemma stores w - 1).
    Adaptive (pi0.5's adaRMS, conditioned on the flow-matching time): a Linear on the condition
    gives (scale, shift, gate); y = x / rms(x) * (1 + scale) + shift, and the gate multiplies the
    residual branch that follows. There is no learned scale vector in the adaptive form.
    Returns (y, gate); gate is None for the plain form.
    """

    def __init__(self, width: int, cond_width: int | None = None):
        super().__init__()
        if cond_width is None:
            self.scale = nn.Parameter(torch.zeros(width))
        else:
            self.dense = nn.Linear(cond_width, 3 * width)
            nn.init.zeros_(self.dense.weight)  # zero init: starts as a plain norm with gate 0
            nn.init.zeros_(self.dense.bias)

    def forward(self, x, cond=None):  # x: (B, T, W), cond: (B, C) or None
        xf = x.float()  # statistics and the multiply in fp32
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        if not hasattr(self, "dense"):
            return (normed * (1 + self.scale.float())).to(x.dtype), None
        if cond is None:
            raise ValueError("this adaptive RMSNorm needs a conditioning vector (the time embedding)")
        scale, shift, gate = self.dense(cond)[:, None, :].chunk(3, dim=-1)  # each (B, 1, W)
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate


def rope(x, positions, base=10_000.0):
    """Rotary position embedding, split-half convention, computed in fp32.

    x: (B, T, heads, H); positions: (B, T) int. The first and second halves of each head vector
    are rotated as pairs (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), not interleaved pairs.
    """
    H = x.shape[-1]
    timescale = base ** ((2.0 / H) * torch.arange(H // 2, device=x.device, dtype=torch.float32))
    radians = positions.float()[..., None] / timescale  # (B, T, H/2)
    sin, cos = torch.sin(radians)[:, :, None, :], torch.cos(radians)[:, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention(q, k, v, mask):
    """Multi-query attention with fp32 logits and softmax.

    q: (B, T, N, H) already rotated and scaled; k, v: (B, S, K, H); mask: (B, T, S) bool.
    Returns (B, T, N*H).
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.view(B, T, K, N // K, H)  # query head n uses kv head n // G
    logits = torch.einsum("btkgh,bskh->bkgts", q.float(), k.float())  # (B, K, G, T, S)
    logits = torch.where(mask[:, None, None], logits, BIG_NEG)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.einsum("bkgts,bskh->btkgh", probs, v)  # (B, T, K, G, H)
    return out.reshape(B, T, N * H)


class GemmaLayer(nn.Module):
    """One expert's weights for one layer: norms, q/k/v/out projections, GeGLU MLP. No biases."""

    def __init__(self, cfg: GemmaConfig, cond_width: int | None = None):
        super().__init__()
        W, N, K, H = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.attn_norm = RMSNorm(W, cond_width)
        self.q_proj = nn.Linear(W, N * H, bias=False)
        self.k_proj = nn.Linear(W, K * H, bias=False)
        self.v_proj = nn.Linear(W, K * H, bias=False)
        self.o_proj = nn.Linear(N * H, W, bias=False)
        self.mlp_norm = RMSNorm(W, cond_width)
        self.gate_proj = nn.Linear(W, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(W, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, W, bias=False)

    def residual(self, x, y, gate):
        """x + gate * dropout(y); the gate (adaRMS only) scales the residual branch."""
        y = F.dropout(y, self.dropout, self.training)
        return x + y if gate is None else x + y * gate

    def mlp(self, x, cond):
        """Pre-norm GeGLU MLP with its residual: x + down(gelu(gate(h)) * up(h))."""
        h, gate = self.mlp_norm(x, cond)
        y = self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))
        return self.residual(x, y, gate)


class GemmaExpert(nn.Module):
    """All layers of one expert plus its final norm."""

    def __init__(self, cfg: GemmaConfig, cond_width: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(GemmaLayer(cfg, cond_width) for _ in range(cfg.depth))
        self.final_norm = RMSNorm(cfg.width, cond_width)


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
        self.experts = nn.ModuleList(GemmaExpert(c, w) for c, w in zip(configs, cond_widths))

    def embed_tokens(self, tokens):
        """(B, T) ids -> (B, T, W). Gemma multiplies token embeddings by sqrt(width)."""
        return self.embed(tokens) * math.sqrt(self.configs[0].width)

    def logits(self, h):
        """Next-token logits from expert-0 outputs with the tied embedding table (no scaling)."""
        return h @ self.embed.weight.t().to(h.dtype)  # (B, T, vocab)

    def forward(self, xs, positions, attn_mask, conds=None, kv_cache=None, return_kv=False,
                write_at=None):
        """Run the experts' streams through all layers with joint attention.

        xs: one entry per expert, (B, T_e, W_e) or None if that expert has no tokens in this call.
        positions: (B, T) RoPE positions of the present streams, concatenated in expert order.
        attn_mask: (B, T, S) bool [query, key], S = cached tokens + T.
        conds: per expert, the adaRMS condition (B, C) or None.
        kv_cache: per layer (k, v), post-RoPE keys and values of earlier tokens. Two uses:
          write_at=None: a read-only cache, each (B, S - T, K, H), put in front of this call's
            keys (pi0's prefix: every denoising step reads it, none changes it);
          write_at=i: a preallocated static cache, each (B, S, K, H); this call's keys are
            written in place at [i, i + T) and the whole buffer is attended to (autoregressive
            decoding, where attn_mask hides the slots not written yet).
        Returns (outs, kv): outs per expert after the final norm (None where xs was None);
          kv = per layer (k, v) of THIS call's tokens if return_kv, else None.
        """
        conds = conds or [None] * len(xs)
        present = [e for e, x in enumerate(xs) if x is not None]
        lengths = [xs[e].shape[1] for e in present]
        xs = list(xs)
        B, H = positions.shape[0], self.configs[0].head_dim
        new_kv = [] if return_kv else None
        for i in range(self.configs[0].depth):
            layers = [self.experts[e].layers[i] for e in present]
            # 1. each expert normalizes and projects its own tokens
            qs, ks, vs, gates = [], [], [], []
            for e, layer in zip(present, layers):
                h, gate = layer.attn_norm(xs[e], conds[e])
                T = h.shape[1]
                qs.append(layer.q_proj(h).view(B, T, -1, H))  # (B, T_e, N, H)
                ks.append(layer.k_proj(h).view(B, T, -1, H))  # (B, T_e, K, H)
                vs.append(layer.v_proj(h).view(B, T, -1, H))
                gates.append(gate)
            # 2. one attention over the concatenated streams (prefix first, then suffix)
            q, k, v = torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)  # (B, T, ., H)
            q = rope(q, positions) * H ** -0.5  # scale after RoPE, as openpi does
            k = rope(k, positions)
            if return_kv:
                new_kv.append((k, v))
            if kv_cache is not None and write_at is None:  # earlier tokens go in front
                k = torch.cat([kv_cache[i][0], k], dim=1)  # (B, S, K, H)
                v = torch.cat([kv_cache[i][1], v], dim=1)
            elif kv_cache is not None:  # static cache: write in place, read the whole buffer
                kv_cache[i][0][:, write_at:write_at + k.shape[1]] = k
                kv_cache[i][1][:, write_at:write_at + v.shape[1]] = v
                k, v = kv_cache[i]  # (B, S, K, H)
            out = attention(q, k, v, attn_mask)  # (B, T, N*H)
            # 3. split back; each expert applies its own output projection, residual and MLP
            for e, layer, o, gate in zip(present, layers, out.split(lengths, dim=1), gates):
                x = layer.residual(xs[e], layer.o_proj(o), gate)
                xs[e] = layer.mlp(x, conds[e])
        outs = [None] * len(xs)
        for e in present:
            outs[e], _ = self.experts[e].final_norm(xs[e], conds[e])  # the final gate is unused
        return outs, new_kv


# ----------------------------------------------------------------------------------------------
# Weight loading (shared by every model file)

def load_state_strict(model, state):
    """Load a state dict, naming every missing, unexpected or misshapen tensor (no silent init)."""
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
    model.load_state_dict(state)


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
    outs, _ = gemma([prefix, suffix], make_positions(mask), make_attn_mask(mask, ar))
    print("prefix out", tuple(outs[0].shape), "suffix out", tuple(outs[1].shape))
    print(f"params: vision {sum(p.numel() for p in vision.parameters()):,}, "
          f"gemma {sum(p.numel() for p in gemma.parameters()):,}")
