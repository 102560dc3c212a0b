"""Shared test helpers (tests/ and experiments/*/): openpi JAX fixtures as our batch dict, a tiny
SentencePiece model, random batches.

The fixture root comes from the environment variable JAX_REFERENCE_DIR (default: the copy under
tests/jax_reference). Every model is built from the fixture folder's own config.json, so any
folder of that layout (other seeds, batch sizes, widths, heads, horizons) is tested the same way.
"""

import json
import io
import os
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

from paligemma import GemmaConfig, SiglipConfig
from paligemma import random_batch  # noqa: F401  (the tests' random batches)

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def jax_reference_dir():
    return os.environ.get("JAX_REFERENCE_DIR", os.path.join(ROOT, "tests", "jax_reference"))


class JaxFixture:
    """One fixture folder: config, inputs, outputs and params (params.npz, openpi paths)."""

    def __init__(self, name):
        self.dir = os.path.join(jax_reference_dir(), name)
        # a missing fixture is a failure, never a skip: parity is the judge of the model code
        for f in ("config.json", "inputs.npz", "outputs.npz", "params.npz"):
            path = os.path.join(self.dir, f)
            assert os.path.exists(path), f"missing JAX fixture file {path} (set JAX_REFERENCE_DIR)"
        with open(os.path.join(self.dir, "config.json")) as f:
            self.config = json.load(f)
        self.inputs = dict(np.load(os.path.join(self.dir, "inputs.npz")))
        self.outputs = dict(np.load(os.path.join(self.dir, "outputs.npz")))
        self.params = dict(np.load(os.path.join(self.dir, "params.npz")))

    def model_config(self, config_cls):
        """Our config for this fixture, from its config.json alone."""
        c = self.config
        sig = c["siglip"]
        gemma = lambda g: GemmaConfig(**{k: g[k] for k in ("width", "depth", "mlp_dim", "num_heads",
                                                          "num_kv_heads", "head_dim")})
        kwargs = dict(
            vision=SiglipConfig(width=sig["width"], depth=sig["depth"], mlp_dim=sig["mlp_dim"],
                                num_heads=sig["num_heads"], patch=sig["patch"],
                                image_size=sig["image_size"]),
            llm=gemma(c["llm"]), vocab_size=c["vocab_size"], action_dim=c["action_dim"],
            action_horizon=c["action_horizon"], max_token_len=c["max_token_len"],
            cameras=tuple(c["cameras"]))
        if c.get("action_expert"):
            kwargs["expert"] = gemma(c["action_expert"])
        return config_cls(**kwargs)

    def batch(self, prefix=""):
        """Fixture inputs as our batch dict: views stacked in the config's camera order, NCHW."""
        x, cams = self.inputs, self.config["cameras"]
        images = np.stack([x[f"image/{c}"] for c in cams], axis=1)  # (B, V, H, W, 3)
        batch = {
            "images": torch.from_numpy(images).permute(0, 1, 4, 2, 3).contiguous(),
            "image_masks": torch.from_numpy(np.stack([x[f"{prefix}image_mask/{c}"] for c in cams], 1)),
            "state": torch.from_numpy(x["state"]),
            "tokens": torch.from_numpy(x[f"{prefix}tokenized_prompt"]).long(),
            "token_masks": torch.from_numpy(x[f"{prefix}tokenized_prompt_mask"]),
            "actions": torch.from_numpy(x["actions"]),
        }
        return batch


@pytest.fixture(scope="session")
def jax_fixture():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = JaxFixture(name)
        return cache[name]
    return get


def assert_close(actual, expected, rtol, atol, name=""):
    actual = actual.detach().cpu().numpy() if torch.is_tensor(actual) else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def train_tiny_sentencepiece(sentences, vocab_size=400):
    """A tiny SentencePiece model trained offline, shaped like PaliGemma's: pad 0, EOS 1, BOS 2,
    "\\n" a single piece, no dummy prefix, byte fallback for unseen characters."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        user_defined_symbols=["\n"], byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        hard_vocab_limit=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


@pytest.fixture(scope="session")
def tiny_sp():
    words = ["pick up the red block", "push the blue cube to the left", "reach the green ball",
             "Task: insert the peg, State: 12 128 255 0 7 64;", "Action: 1 2 3 | done"]
    return train_tiny_sentencepiece(words * 40)
