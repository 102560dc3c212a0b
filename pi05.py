"""pi0.5: pi0 with time-conditioned norms, state as text, and knowledge insulation.

Read this file as a diff against pi0.py (https://www.pi.website/blog/pi05). Three changes to the
architecture, all as in openpi's JAX code:
  1. No state token. The normalized state is discretized into 256 bins and written into the
     prompt as text: "Task: pick up the cup, State: 12 200 128;\\nAction: ".
  2. The action tokens are action_in_proj(x_t) alone. The flow-matching time enters every norm of
     the action expert instead, through adaptive RMSNorm (scale, shift and a gated residual) fed by
     a two-layer swish MLP on the sin-cos time embedding.
  3. (openpi trains it without dropout; `dropout` on the attention and MLP outputs of both towers
     is there for who wants it, off by default.)

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

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fast_tokenizer import fast_to_paligemma
from paligemma import (GEMMA_PRESETS, SIGLIP_PRESETS, KVCache, discretize_state, make_attn_mask, make_positions,
                       random_batch)
from pi0 import Pi0, Pi0Config, pad_tokens, posemb_sincos
from pi0 import tokenize_prompt as tokenize_prompt_pi0


@dataclass
class Pi05Config(Pi0Config):
    max_token_len: int = 200            # openpi's pi0.5 prompt budget (the state is text now)
    discrete_state_input: bool = True   # False = openpi's pi05_libero: no state at all
    dropout: float = 0.0                # attention / MLP output dropout in both towers (train only):
                                        # none in openpi; train.py --dropout sets it
    knowledge_insulation: bool = False  # stop-gradient on the VLM keys/values the expert reads (not openpi's)
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

    def embed_actions(self, x_t, t):
        """The action tokens are action_in_proj(x_t) alone: the time enters the norms (adaRMS,
        time_conditioning above). x_t (B, C, A) -> (B, C, W)."""
        return self.project_actions(x_t)

    # -- training with knowledge insulation ----------------------------------------------------

    def compute_loss(self, batch, noise=None, time=None, delay=None):
        """pi0.5's losses per element: {"flow": (B, C), "flow_steps"} and, with discrete targets,
        "ce": (B, D). delay: training-time real-time chunking (Pi0.flow_inputs).

        batch may carry discrete targets that follow the prompt: "target_tokens" (B, D) int64
        (FAST action tokens in the PaliGemma vocabulary, or a text answer) with "target_masks"
        (B, D) bool. Samples without actions have all-False "action_masks". The action tokens
        see the images + prompt and each other, never the targets (they would give the answer
        away). Without knowledge insulation this is one joint pass, as openpi's compute_loss;
        with it, two (insulated_pass).
        """
        prefix, prefix_mask, prefix_ar = self.embed_prefix(batch)  # images + prompt
        seq, seq_mask, seq_ar = prefix, prefix_mask, prefix_ar
        if "target_tokens" in batch:  # the targets form a causal postfix (ar = 1 on every token)
            targets, target_masks = batch["target_tokens"], batch["target_masks"]
            seq = torch.cat([prefix, self.llm.embed_tokens(targets).to(prefix.dtype)], dim=1)
            seq_mask = torch.cat([prefix_mask, target_masks], dim=1)
            seq_ar = torch.cat([prefix_ar, torch.ones_like(targets[0], dtype=torch.bool)])
        x_t, u_t, t, steps = self.flow_inputs(batch, noise, time, delay)
        step = self.insulated_pass if self.cfg.knowledge_insulation else self.joint_pass
        vlm_out, v_t = step(seq, seq_mask, seq_ar, prefix_mask, x_t, t)
        per = dict(flow=self.flow_error(v_t, u_t, steps), flow_steps=steps)
        if "target_tokens" in batch:
            per["ce"] = self.target_nll(vlm_out, prefix_mask, targets) * target_masks
        return per

    def joint_pass(self, seq, seq_mask, seq_ar, prefix_mask, x_t, t):
        """Images + prompt (+ targets) and the action tokens in one pass -> (VLM outputs (B, S, W),
        v_t (B, C, A)). The actions attend as in sampling (action_layout: the valid prefix, then
        each other) and sit at the positions after the valid prefix."""
        B, S, P = *seq_mask.shape, prefix_mask.shape[1]
        C = self.cfg.action_horizon
        action_mask, action_positions = self.action_layout(prefix_mask)  # (B, C, P + C), (B, C)
        mask = seq_mask.new_zeros(B, S + C, S + C)
        mask[:, :S, :S] = make_attn_mask(seq_mask, seq_ar)
        mask[:, S:, :P], mask[:, S:, S:] = action_mask[:, :, :P], action_mask[:, :, P:]
        positions = torch.cat([make_positions(seq_mask), action_positions], dim=1)
        vlm_out, out = self.llm([seq, self.embed_actions(x_t, t)], positions, mask,
                                conds=[None, self.time_conditioning(t)])
        return vlm_out, self.velocity_from(out)

    def insulated_pass(self, seq, seq_mask, seq_ar, prefix_mask, x_t, t):
        """Knowledge insulation, in two passes: the VLM over seq fills a KV cache; the expert
        reads the images + prompt part of it through a stop-gradient (KVCache.prefix(detach)),
        so no gradient of the flow loss reaches the VLM."""
        vlm_cache = KVCache(seq.shape[1])
        vlm_out, _ = self.llm([seq, None], make_positions(seq_mask), make_attn_mask(seq_mask, seq_ar), cache=vlm_cache)
        cache = vlm_cache.prefix(prefix_mask.shape[1], room=self.cfg.action_horizon, detach=True)
        return vlm_out, self.denoise_step(x_t, t, cache, self.action_layout(prefix_mask))

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

def tokenize_prompt(sp, prompt, state, max_len, discrete_state=True, condition=None):
    """pi0.5's prompt: BOS + "Task: {prompt}, State: {bins};\\nAction: " (exact strings).

    state is the normalized, *unpadded* state. With discrete_state=False (pi05_libero) the
    prompt is pi0's and the state is not used at all. condition (e.g. RECAP's "Advantage:
    positive"): "{condition};\\n" between the state and "Action: ", so it conditions the actions
    and the FAST targets after them.
    """
    if not discrete_state:
        return tokenize_prompt_pi0(sp, prompt, max_len, condition)
    clean = prompt.strip().replace("_", " ").replace("\n", " ")
    bins = discretize_state(np.asarray(state, dtype=np.float64))
    return pad_tokens(sp.encode(prompt_text(clean, bins, condition), add_bos=True), max_len, condition)


def prompt_text(task, bins, condition=None):
    """The text of pi0.5's prompt for a cleaned task and the state's bins."""
    condition = "" if condition is None else f"{condition};\n"
    return f"Task: {task}, State: {' '.join(str(b) for b in bins)};\n{condition}Action: "


def target_tokenizer(cfg, sp, fast, max_tokens, too_long="truncate"):
    """Co-training targets (--fast-targets 1): (prompt, normalized state, normalized unpadded
    actions) -> {"target_tokens", "target_masks"} (D = max_tokens,): the chunk's FAST ids mapped
    into the PaliGemma vocabulary, then "|" and EOS, as openpi's pi0-FAST writes its answers (the
    prompt already ends in "Action: "). More than max_tokens: cut with a warning, or with
    too_long="error" raise."""
    end = sp.encode("|", add_eos=True)

    def targets(prompt, state, actions):
        ids = fast.encode(actions, clip=True)  # clip: an outlier is not fatal
        ids = fast_to_paligemma(np.asarray(ids), fast.vocab_size, cfg.vocab_size).tolist() + end
        if len(ids) > max_tokens:
            message = (f"a chunk needs {len(ids)} FAST target slots, the batch has {max_tokens} (measured on the "
                       f"training data at start): is this sample from another dataset?")
            if too_long != "truncate":
                raise ValueError(message)
            warnings.warn(message + " Truncated.")
            ids = ids[:max_tokens]
        tokens = np.zeros(max_tokens, np.int64)
        tokens[:len(ids)] = ids
        return {"target_tokens": tokens, "target_masks": np.arange(max_tokens) < len(ids)}
    return targets


def prompt_tokenizer(cfg, sp):
    """(prompt, normalized state, condition) -> (ids, mask), the state as text unless
    discrete_state_input=False."""
    return lambda prompt, state, condition=None: tokenize_prompt(sp, prompt, state, cfg.max_token_len,
                                                                 cfg.discrete_state_input, condition)


if __name__ == "__main__":
    # Build the tiny pi0.5, compute its loss with and without discrete targets, sample a chunk.
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = Pi05(cfg).eval()
    batch = random_batch(cfg, B=2, actions=True)
    print(f"params {sum(p.numel() for p in model.parameters()):,}; flow loss {model(batch)['loss'].item():.4f}")
    batch["target_tokens"] = torch.randint(0, cfg.vocab_size, (2, 8))
    batch["target_masks"] = torch.ones(2, 8, dtype=torch.bool)
    losses = model(batch)
    print(f"with 8 discrete targets: flow {losses['flow'].item():.4f}, ce {losses['ce'].item():.4f}")
    print(f"sampled actions {tuple(model.sample_actions(batch, num_steps=10).shape)}")
