"""pi0.5: pi0 with time-conditioned norms, state as text, and knowledge insulation.

Read this file as a diff against pi0.py (https://www.pi.website/blog/pi05). Three changes to the
architecture, all as in openpi's JAX code:
  1. No state token. The normalized state is discretized into 256 bins and written into the
     prompt as text: "Task: pick up the cup, State: 12 200 128;\\nAction: ".
  2. The action tokens are action_in_proj(x_t) alone. The flow-matching time enters every norm of
     the action expert instead, through adaptive RMSNorm (scale, shift and a gated residual) fed by
     a two-layer swish MLP on the sin-cos time embedding.
  3. Dropout on the attention and MLP outputs of both towers while training.

And the training recipe openpi leaves out, knowledge insulation (Driess et al. 2025,
https://arxiv.org/abs/2505.23705): in one step,
  - the VLM learns by next-token cross-entropy on *discrete* targets that follow the prompt as a
    causal postfix: the FAST tokens of the action chunk (fast_tokenizer.py, mapped into the
    PaliGemma vocabulary as pi0-FAST does), or a text answer for vision-language data;
  - the action expert learns by flow matching, attending to the VLM's keys and values of the
    images + prompt through a stop-gradient, so the flow loss cannot damage the VLM, and never to
    the discrete targets (they would give the answer away).
At inference only the expert runs: sampling is pi0's, with this suffix.

Axis legend (paligemma.py's): B batch, P prefix tokens, D discrete target tokens, C chunk, A action dim, W width.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fast_tokenizer import fast_to_paligemma
from paligemma import GEMMA_PRESETS, SIGLIP_PRESETS, KVCache, make_attn_mask, make_positions
from pi0 import Pi0, Pi0Config, indicator_text, pad_tokens, posemb_sincos
from pi0 import tokenize_prompt as tokenize_prompt_pi0


@dataclass
class Pi05Config(Pi0Config):
    max_token_len: int = 200            # openpi's pi0.5 prompt budget (the state is text now)
    discrete_state_input: bool = True   # False = openpi's pi05_libero: no state at all
    dropout: float = 0.1                # attention / MLP output dropout in both towers (train only)
    knowledge_insulation: bool = True   # stop-gradient on the VLM keys/values the expert reads
    flow_loss_weight: float = 1.0       # weight of the flow-matching MSE (OpenTau: 1, paper: ~10?)
    ce_loss_weight: float = 1.0         # weight of the discrete-target cross-entropy (OpenTau: 1)
    model: str = "pi05"

    def __post_init__(self):  # one dropout knob for both towers
        self.llm = replace(self.llm, dropout=self.dropout)
        self.expert = replace(self.expert, dropout=self.dropout)


CONFIGS = {
    "full": Pi05Config(),  # openpi's pi0.5: So400m + Gemma 2B + Gemma 300M expert
    # tiny: tests and the built-in task (whose longest prompt, state bins included, is 14 tokens)
    "tiny": Pi05Config(vision=SIGLIP_PRESETS["tiny"], llm=GEMMA_PRESETS["tiny_llm"],
                       expert=GEMMA_PRESETS["tiny_expert"], vocab_size=1024, action_dim=8,
                       action_horizon=6, max_token_len=24),
}


class Pi05(Pi0):
    state_token = False  # the state is text in the prompt

    # -- the architectural diff: four overrides of pi0 -----------------------------------------

    def cond_widths(self):
        return [None, self.cfg.expert.width]  # PaliGemma keeps plain norms; the expert's adapt

    def build_time_conditioning(self):
        W = self.cfg.expert.width
        self.time_mlp_in = nn.Linear(W, W)
        self.time_mlp_out = nn.Linear(W, W)

    def time_conditioning(self, t):
        """t (B,) or per token (B, C) -> the adaRMS condition (B, W) or (B, C, W): a two-layer MLP on
        the sin-cos embedding (a condition per token is real-time chunking's committed prefix at t = 0)."""
        cond = posemb_sincos(t, self.cfg.expert.width)  # (B, W), fp32
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(cond))))  # swish after both

    def embed_suffix(self, state, x_t, t):
        """Action tokens only; time becomes the adaRMS condition. state is unused (it is text)."""
        B, C, _ = x_t.shape
        tokens = self.project_actions(x_t)  # (B, C, W)
        cond = self.time_conditioning(t)  # (B, W), or (B, C, W) per token
        mask = torch.ones(B, C, dtype=torch.bool, device=x_t.device)
        ar = torch.tensor([1] + [0] * (C - 1), dtype=torch.bool, device=x_t.device)
        return tokens, mask, ar, cond

    # -- training with knowledge insulation ----------------------------------------------------

    def compute_loss(self, batch, noise=None, time=None, delay=None):
        """pi0.5's losses per element: {"flow": (B, C), "flow_steps"} and, with discrete targets,
        "ce": (B, D). delay: training-time real-time chunking (Pi0.flow_inputs).

        batch may carry discrete targets that follow the prompt: "target_tokens" (B, D) int64
        (FAST action tokens in the PaliGemma vocabulary, or a text answer) with "target_masks"
        (B, D) bool. Samples without actions have all-False "action_masks". Two passes:
          1. the VLM over images + prompt + targets (a causal postfix), which gives the
             cross-entropy and fills the KV cache;
          2. the expert over the noisy actions, reading only the images + prompt part of that
             cache, through a stop-gradient when cfg.knowledge_insulation.
        """
        prefix, prefix_mask, prefix_ar = self.embed_prefix(batch)  # images + prompt
        P = prefix.shape[1]
        seq, seq_mask, seq_ar = prefix, prefix_mask, prefix_ar
        has_targets = "target_tokens" in batch
        if has_targets:  # the targets form a causal postfix (ar = 1 on every token)
            targets, target_masks = batch["target_tokens"], batch["target_masks"]
            seq = torch.cat([prefix, self.llm.embed_tokens(targets).to(prefix.dtype)], dim=1)
            seq_mask = torch.cat([prefix_mask, target_masks], dim=1)
            seq_ar = torch.cat([prefix_ar, torch.ones_like(targets[0], dtype=torch.bool)])
        vlm_cache = KVCache(seq.shape[1])
        vlm_out, _ = self.llm([seq, None], make_positions(seq_mask), make_attn_mask(seq_mask, seq_ar),
                              cache=vlm_cache)
        per = {}
        if has_targets:
            per["ce"] = self.target_nll(vlm_out, prefix_mask, targets) * target_masks
        cache = vlm_cache.prefix(P, room=self.cfg.action_horizon, detach=self.cfg.knowledge_insulation)
        x_t, u_t, t, steps = self.flow_inputs(batch, noise, time, delay)
        v_t = self.denoise_step(batch.get("state"), prefix_mask, cache, x_t, t)
        return dict(per, flow=self.flow_error(v_t, u_t, steps), flow_steps=steps)

    def target_nll(self, vlm_out, prefix_mask, targets):
        """Next-token cross-entropy of each target token, (B, D).

        Target 0 is predicted by the last *real* prompt token (the prompt is right-padded, and
        a padding position must never make a prediction); target j > 0 by target j - 1.
        """
        B, P = prefix_mask.shape
        D = targets.shape[1]
        last_prompt = (P - 1 - prefix_mask.flip(1).int().argmax(1))[:, None]  # (B, 1)
        idx = torch.cat([last_prompt, P + torch.arange(D - 1, device=targets.device).expand(B, -1)], 1)
        h = vlm_out.gather(1, idx[:, :, None].expand(-1, -1, vlm_out.shape[-1]))  # (B, D, W)
        logits = self.llm.logits(h).float()  # (B, D, vocab)
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, D)


# ----------------------------------------------------------------------------------------------
# Prompt format (openpi's PaligemmaTokenizer with discrete_state_input) and discrete targets

def discretize_state(state):
    """Normalized state (about [-1, 1]) -> 256 bins, openpi's edges: values < -1 give -1."""
    return np.digitize(state, np.linspace(-1, 1, 256 + 1)[:-1]) - 1


def tokenize_prompt(sp, prompt, state, max_len, discrete_state=True, indicator=None):
    """pi0.5's prompt: BOS + "Task: {prompt}, State: {bins};\\nAction: " (exact strings).

    state is the normalized, *unpadded* state. With discrete_state=False (pi05_libero) the
    prompt is pi0's and the state is not used at all. indicator (RECAP, True / False):
    "Advantage: positive;\\n" / "negative" between the state and "Action: ", so it conditions
    the actions and the FAST targets after them.
    """
    if not discrete_state:
        return tokenize_prompt_pi0(sp, prompt, max_len, indicator)
    clean = prompt.strip().replace("_", " ").replace("\n", " ")
    bins = " ".join(str(b) for b in discretize_state(np.asarray(state, dtype=np.float64)))
    advantage = "" if indicator is None else f"{indicator_text(indicator)};\n"
    return pad_tokens(sp.encode(f"Task: {clean}, State: {bins};\n{advantage}Action: ", add_bos=True), max_len)


# ----------------------------------------------------------------------------------------------
# What the registry (models.py) reads from every model file

Config, Model = Pi05Config, Pi05
FLOW = True
USE_QUANTILES = True  # openpi normalizes pi0.5's state and actions by their 1st / 99th percentiles


def target_tokenizer(cfg, sp, fast, max_tokens):
    """Co-training targets (--fast): (prompt, normalized state, normalized unpadded actions) ->
    {"target_tokens", "target_masks"} (D = max_tokens,): the chunk's FAST ids mapped into the
    PaliGemma vocabulary, then "|" and EOS, as openpi's pi0-FAST writes its answers (the prompt
    already ends in "Action: ")."""
    end = sp.encode("|", add_eos=True)

    def targets(prompt, state, actions):
        ids = fast.encode(actions, clip=True)  # clip: an outlier is not fatal
        ids = fast_to_paligemma(np.asarray(ids), fast.vocab_size, cfg.vocab_size).tolist() + end
        if len(ids) > max_tokens:
            raise ValueError(f"a chunk needs {len(ids)} FAST target slots, the batch has {max_tokens} (measured "
                             f"on the training data at start): is this sample from another dataset?")
        tokens = np.zeros(max_tokens, np.int64)
        tokens[:len(ids)] = ids
        return {"target_tokens": tokens, "target_masks": np.arange(max_tokens) < len(ids)}
    return targets


def prompt_tokenizer(cfg, sp):
    """(prompt, normalized state, RECAP indicator) -> (ids, mask), the state as text unless
    discrete_state_input=False."""
    return lambda prompt, state, indicator=None: tokenize_prompt(sp, prompt, state, cfg.max_token_len,
                                                                 cfg.discrete_state_input, indicator)
