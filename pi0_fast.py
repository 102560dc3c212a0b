"""pi0-FAST: actions as words, an autoregressive VLA (https://arxiv.org/abs/2501.09747).

No action expert and no flow matching: PaliGemma alone reads the images and the prompt and then
*writes* the action chunk as text. fast_tokenizer.py turns a chunk into a few FAST tokens (DCT of
each action dimension, quantized, byte-pair encoded); openpi maps each FAST token onto a rarely
used PaliGemma token, so the language model's own vocabulary and output layer are reused.

Token layout of one training example (openpi's, exact strings):

    [ images | BOS "Task: {prompt}, State: {bins};\\n" | "Action: " FAST... "|" EOS | pad ]
      ar 0     ar 0 (bidirectional prefix)               ar 1 on every token (causal)
                                                         loss on every token

Training is next-token cross-entropy on the causal part. Inference greedily decodes from the
prefix with a preallocated KV cache; every prefix is right-aligned (padding rolled to the front)
so all examples of a batch write their next token into the same cache slot.

openpi quirks, reproduced only when asked (`openpi_positions=True`, for parity with openpi's
outputs): training uses positions arange(T), so masked cameras still consume positions, and
decoding skips one position after the prefix (openpi issue #705). By default positions are
cumsum(mask) - 1 in both, so training and decoding agree.

Axis legend (paligemma.py's): B batch, T tokens, P prefix slots, D decoded tokens, W width, C chunk,
A action dim.
"""

import time as timer
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fast_tokenizer import fast_to_paligemma, paligemma_to_fast
from paligemma import (GEMMA_PRESETS, PALIGEMMA_VOCAB_SIZE, SIGLIP_PRESETS, Gemma, GemmaConfig,
                       KVCache, SigLIP, SiglipConfig, count_params, discretize_state, embed_prefix,
                       make_attn_mask, make_positions, transformer_flops, vision_flops)

EOS, BOS, PAD = 1, 2, 0  # PaliGemma's special ids


@dataclass
class Pi0FastConfig:
    vision: SiglipConfig = field(default_factory=lambda: SIGLIP_PRESETS["so400m"])
    llm: GemmaConfig = field(default_factory=lambda: GEMMA_PRESETS["gemma_2b"])
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    action_dim: int = 32          # A: width of the chunks the FAST tokens encode
    action_horizon: int = 32      # C
    max_token_len: int = 250      # prompt + action tokens (openpi: 250; 180 for LIBERO)
    max_decoding_steps: int = 256
    fast_vocab_size: int = 2048   # size of the FAST tokenizer's vocabulary
    cameras: tuple = ("base_0_rgb", "base_1_rgb", "wrist_0_rgb")
    openpi_positions: bool = False  # reproduce openpi's training/decoding position quirks
    model: str = "pi0_fast"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d, vision=SiglipConfig(**d["vision"]), llm=GemmaConfig(**d["llm"]))
        return cls(**dict(d, cameras=tuple(d["cameras"])))


CONFIGS = {
    "full": Pi0FastConfig(),  # openpi's pi0-FAST: So400m + Gemma 2B, ~2.9B params
    "tiny": Pi0FastConfig(vision=SIGLIP_PRESETS["tiny"], llm=GEMMA_PRESETS["tiny_llm"], vocab_size=1024,
                          action_dim=8, action_horizon=6, max_token_len=64, max_decoding_steps=32,
                          fast_vocab_size=256),
}


class Pi0Fast(nn.Module):
    def __init__(self, cfg: Pi0FastConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = SigLIP(cfg.vision, out_width=cfg.llm.width)
        self.llm = Gemma([cfg.llm], cfg.vocab_size)

    def embed_inputs(self, batch):
        """Images then text -> tokens (B, T, W), input mask (B, T), ar mask (B, T): the prompt
        (and the images) bidirectional, the answer (token_ar_masks 1, training) causal."""
        tokens, mask = embed_prefix(self.vision, self.llm, batch)
        ar = batch.get("token_ar_masks", torch.zeros_like(batch["tokens"]))  # prompt only: all 0
        ar = torch.cat([torch.zeros(mask.shape[0], mask.shape[1] - ar.shape[1], dtype=ar.dtype, device=ar.device), ar], 1)
        return tokens, mask, ar

    def compute_loss(self, batch):
        """Per-example mean next-token NLL over the loss-masked text tokens, (B,)."""
        tokens, mask, ar = self.embed_inputs(batch)
        attn_mask = make_attn_mask(mask, ar)[:, :-1, :-1]  # the last token predicts nothing
        mask = mask[:, :-1]
        if self.cfg.openpi_positions:
            positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
        else:
            positions = make_positions(mask)
        (h,) = self.llm([tokens[:, :-1]], positions, attn_mask)
        targets = batch["tokens"][:, 1:]  # (B, L-1): text token i+1 is predicted at position i
        logits = self.llm.logits(h[:, -targets.shape[1]:]).float()  # only the text positions
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, L-1)
        loss_mask = batch["token_loss_masks"][:, 1:].to(nll.dtype)
        return (nll * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1)

    def loss_weights(self):
        """How forward's terms add up to "loss": the next-token cross-entropy alone."""
        return {"ce": 1.0}

    def forward(self, batch):
        """Training entry point: a dict of scalar losses; "loss" is the one to minimise."""
        loss = self.compute_loss(batch).mean()
        return {"loss": loss, "ce": loss}

    def cost(self, batch_size, prefix_len, num_steps=32):
        """Analytic cost per phase, forward FLOPs and weight elements read: vision and the prefix
        once, then num_steps decoded tokens (each reads every weight and the KV cache).
        Training is about 3x the forward FLOPs of num_steps=0."""
        cfg, B, P, D = self.cfg, batch_size, prefix_len, num_steps
        g = cfg.llm
        llm = count_params(self.llm.expert(0))
        flops = {"vision": B * vision_flops(cfg.vision, count_params(self.vision), len(cfg.cameras)),
                 "prefix": B * transformer_flops(llm, P, P, g.num_heads * g.head_dim, g.depth),
                 "decode": B * transformer_flops(llm, D, P + D, g.num_heads * g.head_dim, g.depth)}
        kv = 2 * g.depth * B * (P + D) * g.num_kv_heads * g.head_dim
        return flops, {"vision": count_params(self.vision), "prefix": llm, "decode": D * (llm + kv)}

    @torch.no_grad()
    def sample_tokens(self, batch, max_decoding_steps=None, return_logits=False):
        """Greedy decoding -> (B, D) int64 token ids, 0 after the step where all emitted EOS.

        return_logits=True also returns the (B, D, vocab) logits each token was chosen from.
        """
        D = max_decoding_steps or self.cfg.max_decoding_steps
        tokens, mask, ar = self.embed_inputs(batch)
        attn_mask = make_attn_mask(mask, ar)
        tokens, mask, attn_mask = right_align(tokens, mask, attn_mask)
        B, P = mask.shape
        prefill_len = mask.sum(-1)  # (B,) real prefix tokens
        prefix_start = P - prefill_len  # first real slot after alignment
        cache = KVCache(P + D)  # the prefix, then one slot per decoded token
        (h,) = self.llm([tokens], make_positions(mask), attn_mask, cache=cache)
        cache.length = P
        logits = self.llm.logits(h[:, -1])  # (B, vocab): the last prefix slot is real for all
        out = torch.zeros(B, D, dtype=torch.long, device=tokens.device)
        step_logits = []
        slots = torch.arange(P + D, device=tokens.device)
        skip = 1 if self.cfg.openpi_positions else 0  # openpi feeds token k at prefill_len + k + 1
        for step in range(D):
            token = logits.argmax(-1)  # (B,)
            step_logits.append(logits)
            out[:, step] = token
            if bool((token == EOS).all()):  # one host sync per token: FAST must know when to stop
                break
            # the new token sees its real prefix and every token decoded so far
            step_mask = slots[:P + step + 1] >= prefix_start[:, None]  # (B, P + step + 1)
            positions = (prefill_len + step + skip)[:, None]  # (B, 1)
            (h,) = self.llm([self.llm.embed_tokens(token[:, None])], positions, step_mask[:, None],
                            cache=cache)
            cache.length += 1  # kept: later tokens attend to it
            logits = self.llm.logits(h[:, -1])
        return (out, torch.stack(step_logits, 1)) if return_logits else out


def right_align(tokens, mask, attn_mask):
    """Roll each example's trailing padding to the front, so every prefix ends at slot P - 1.

    Assumes padding only at the end (no masked tokens in the middle), as openpi does.
    """
    B, P = mask.shape
    seqlen = (mask * torch.arange(1, P + 1, device=mask.device)).amax(-1)  # last real index + 1
    index = (torch.arange(P, device=mask.device)[None, :] + seqlen[:, None]) % P  # (B, P)
    tokens = tokens.gather(1, index[:, :, None].expand(-1, -1, tokens.shape[-1]))
    attn_mask = attn_mask.gather(1, index[:, :, None].expand(-1, -1, P)).gather(2, index[:, None, :].expand(-1, P, -1))
    return tokens, mask.gather(1, index), attn_mask


# ----------------------------------------------------------------------------------------------
# Prompt format (openpi's FASTTokenizer) and reading actions back out of decoded tokens

def tokenize(sp, fast, prompt, state, actions, max_len, vocab_size=PALIGEMMA_VOCAB_SIZE, clip=False,
             too_long="truncate"):
    """One example -> (tokens, token_mask, ar_mask, loss_mask), each (max_len,).

    prefix:  BOS + "Task: {prompt}, State: {bins};\\n"          (ar 0, no loss)
    postfix: "Action: " + FAST ids in PaliGemma + "|" + EOS    (ar 1, loss) -- only if actions
    state is the normalized, unpadded state; actions the normalized (C, A) chunk or None.
    clip=True clips DCT coefficients outside the tokenizer's range instead of raising. More than
    max_len tokens: openpi truncates with a warning (too_long="truncate"), "error" raises.
    """
    clean = prompt.lower().strip().replace("_", " ")
    bins = " ".join(str(b) for b in discretize_state(np.asarray(state, dtype=np.float64)))
    prefix = sp.encode(f"Task: {clean}, State: {bins};\n", add_bos=True)
    postfix = []
    if actions is not None:
        fast_ids = fast_to_paligemma(np.asarray(fast.encode(actions, clip=clip)), fast.vocab_size, vocab_size)
        postfix = sp.encode("Action: ") + fast_ids.tolist() + sp.encode("|", add_eos=True)
    ids = prefix + postfix
    if len(ids) > max_len:
        message = (f"{len(ids)} tokens ({len(postfix)} for the actions) exceed max_token_len={max_len}: raise it, "
                   f"or use a FAST tokenizer that compresses more")
        if too_long != "truncate":
            raise ValueError(message)
        warnings.warn(message + "; truncated, as openpi does")
    n = min(len(ids), max_len)
    pad = lambda xs: np.array(xs[:max_len] + [0] * (max_len - len(xs)))
    return (pad(ids).astype(np.int64), np.arange(max_len) < n,
            pad([0] * len(prefix) + [1] * len(postfix)).astype(np.int64),
            pad([0] * len(prefix) + [1] * len(postfix)).astype(bool))


def extract_actions(sp, fast, tokens, horizon, action_dim, vocab_size=PALIGEMMA_VOCAB_SIZE):
    """Decoded ids (D,) -> (chunk (C, A), valid). Never a silent all-zero chunk.

    The answer must read "Action: " + FAST tokens + "|". When it does not (no "Action: ", a
    non-FAST token inside, a wrong number of coefficients), valid is False and the chunk is
    the tokenizer's best effort, so the caller decides whether to act on it.
    """
    ids = [int(t) for t in tokens]
    if EOS in ids:
        ids = ids[:ids.index(EOS)]
    start, bar = sp.encode("Action: "), sp.encode("|")
    for i in range(len(ids) - len(start) + 1):
        if ids[i:i + len(start)] == start:
            body = ids[i + len(start):]
            if bar[0] in body:
                body = body[:body.index(bar[0])]
            break
    else:
        return np.zeros((horizon, action_dim), dtype=np.float32), False  # flagged, not silent
    try:
        fast_ids = paligemma_to_fast(np.asarray(body, dtype=np.int64), fast.vocab_size, vocab_size)
    except ValueError:
        return np.zeros((horizon, action_dim), dtype=np.float32), False
    chunk, valid = fast.decode(fast_ids, horizon, action_dim, strict=False)
    return chunk.astype(np.float32), valid


def target_tokenizer(cfg, sp, fast, max_tokens=None, too_long="truncate"):
    """Training tokens: (prompt, normalized state, normalized actions) -> the prompt *with* its
    answer, "Action: " + FAST tokens + "|" EOS, as a causal postfix with a loss mask
    (tokenize above, openpi's exact format); replaces the prompt-only tokens."""
    def targets(prompt, state, actions):
        tokens, mask, ar, loss = tokenize(sp, fast, prompt, state, actions, cfg.max_token_len,
                                          cfg.vocab_size, clip=True, too_long=too_long)
        return {"tokens": tokens, "token_masks": mask, "token_ar_masks": ar, "token_loss_masks": loss}
    return targets


def prompt_tokenizer(cfg, sp):
    """(prompt, normalized state) -> (ids, mask): the prompt alone; the model writes "Action: ..."."""
    return lambda prompt, state: tokenize(sp, None, prompt, state, None, cfg.max_token_len, cfg.vocab_size)[:2]


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = Pi0Fast(cfg).eval()
    B, V, R, L = 2, len(cfg.cameras), cfg.vision.image_size, cfg.max_token_len
    batch = {
        "images": torch.rand(B, V, 3, R, R) * 2 - 1,
        "image_masks": torch.ones(B, V, dtype=torch.bool),
        "tokens": torch.randint(3, cfg.vocab_size, (B, L)),
        "token_masks": torch.ones(B, L, dtype=torch.bool),
        "token_ar_masks": (torch.arange(L) >= L // 2).long().expand(B, -1),
        "token_loss_masks": (torch.arange(L) >= L // 2).expand(B, -1),
    }
    print(f"params: {sum(p.numel() for p in model.parameters()):,}")
    print(f"loss {model(batch)['loss'].item():.4f}")
    prompt = {k: v[:, :L // 2] for k, v in batch.items() if k.startswith("token")}
    t0 = timer.perf_counter()
    out = model.sample_tokens({**batch, **prompt}, max_decoding_steps=16)
    print(f"decoded tokens {tuple(out.shape)} in {1000 * (timer.perf_counter() - t0):.1f} ms")
