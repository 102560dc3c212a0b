"""Inference: a checkpoint directory + raw robot observations -> robot actions.

`Policy` applies exactly the transforms training used (resize-with-pad, normalization, the
model's own prompt format, padding), samples a normalized action chunk, and undoes the
normalization (and delta actions) for the robot's own action width.

A checkpoint directory (see DESIGN.md) holds model.safetensors, config.json, norm_stats.json,
tokenizer.model (SentencePiece), fast_tokenizer.json (pi0-FAST / pi0.5 co-training) and
policy.json: how the robot's data maps onto the model (camera key per model view, delta-action
mask, normalization kind, the robot's state and action widths).

Not here yet: the compiled static-cache sampler, `bench` and the websocket `serve` command.
"""

import json
import os
import time

import numpy as np
import torch

import data


def load_model(path, device="cpu"):
    """Any of our models from a checkpoint directory, by the "model" field of its config.json."""
    with open(os.path.join(path, "config.json")) as f:
        kind = json.load(f).get("model")
    if kind in ("pi0", "pi05"):
        from pi0 import from_pretrained
    elif kind == "pi0_fast":
        from pi0_fast import from_pretrained
    else:
        raise ValueError(f"{path}/config.json: unknown model {kind!r} (expected pi0, pi05 or pi0_fast)")
    return from_pretrained(path).to(device).eval()


def prompt_function(cfg, sp):
    """The model's prompt format as data.Transforms wants it: (prompt, normalized state) -> ids, mask."""
    if cfg.model == "pi0":
        from pi0 import tokenize_prompt
        return lambda prompt, state: tokenize_prompt(sp, prompt, cfg.max_token_len)
    if cfg.model == "pi05":
        from pi05 import tokenize_prompt
        return lambda prompt, state: tokenize_prompt(sp, prompt, state, cfg.max_token_len,
                                                     cfg.discrete_state_input)
    raise ValueError(f"no prompt function for model {cfg.model!r}")


def load_sentencepiece(path):
    import sentencepiece as spm
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the checkpoint has no SentencePiece tokenizer")
    return spm.SentencePieceProcessor(model_file=str(path))


class Policy:
    """Raw observations -> robot actions, for one checkpoint directory.

    observation: {"images": {camera key: uint8 (H, W, 3)}, "state": (S,), "prompt": str}
    """

    def __init__(self, path, device="cpu", num_steps=10):
        self.path, self.device, self.num_steps = str(path), torch.device(device), num_steps
        self.model = load_model(self.path, self.device)
        cfg = self.model.cfg
        with open(os.path.join(self.path, "policy.json")) as f:
            self.settings = json.load(f)
        self.sp = load_sentencepiece(os.path.join(self.path, "tokenizer.model"))
        s = self.settings
        self.transforms = data.Transforms(
            tokenize=prompt_function(cfg, self.sp), cameras=s["cameras"],
            norm_stats=os.path.join(self.path, "norm_stats.json"), use_quantiles=s["use_quantiles"],
            delta_mask=s.get("delta_mask"), state_dim=cfg.action_dim, action_dim=cfg.action_dim,
            image_size=cfg.vision.image_size)

    def infer_batch(self, observations, noise=None):
        """A list of observations -> (N, C, A_robot) float32 actions."""
        samples = [self.transforms(dict(o, prompt=o.get("prompt", self.settings.get("default_prompt", ""))))
                   for o in observations]
        batch = {k: v.to(self.device) for k, v in data.collate(samples).items()}
        if noise is not None:
            noise = torch.as_tensor(noise, dtype=torch.float32, device=self.device)
        actions = self.model.sample_actions(batch, noise=noise, num_steps=self.num_steps).cpu().numpy()
        A = self.settings["action_dim"]
        actions = data.unnormalize(actions[..., :A], self.transforms.norm_stats["actions"],
                                   self.settings["use_quantiles"])
        if self.settings.get("delta_mask") is not None:
            states = np.stack([np.asarray(o["state"], np.float32) for o in observations])
            actions = np.stack([data.absolute_actions(a, s, self.settings["delta_mask"])
                                for a, s in zip(actions, states)])
        return actions.astype(np.float32)

    def infer(self, observation, noise=None):
        """One observation -> {"actions": (C, A_robot), "policy_timing": {"infer_ms": ...}}."""
        t0 = time.perf_counter()
        actions = self.infer_batch([observation], None if noise is None else np.asarray(noise)[None])
        return {"actions": actions[0], "policy_timing": {"infer_ms": 1000 * (time.perf_counter() - t0)}}
