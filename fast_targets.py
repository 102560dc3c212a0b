"""The discrete targets of training: which FAST tokenizer (openpi's universal one, or one fitted
on the data), whether its ids fit the model's vocabulary, how many target slots a chunk needs.

pi0-FAST learns to write an action chunk as FAST tokens; pi0.5's co-training (train.py
--fast-targets 1) gives its VLM the same tokens as a next-token target. Both map FAST ids into the
top of the PaliGemma vocabulary (fast_tokenizer.fast_to_paligemma), as openpi does.
"""

import math
import os

import numpy as np

from fast_tokenizer import NUM_SKIPPED, FASTTokenizer, fast_vocab_room


def fit_tokenizer(ds, transforms, vocab_size, seed=0, max_chunks=4000):
    """A FAST tokenizer fitted on (a random subset of) a dataset's chunks as the model sees them."""
    rows = np.random.default_rng(seed).choice(len(ds), size=min(len(ds), max_chunks), replace=False)
    return FASTTokenizer.fit(transforms.action_chunks(ds, rows), vocab_size=vocab_size, progress=False)


def target_length(fast, datasets, transforms, max_tokens):
    """Target slots for pi0.5's FAST tokens: the longest chunk of every dataset + "|" EOS, with
    25% headroom, at most max_tokens (a longer chunk is then an error naming both). Every chunk is
    measured, so no chunk met late in a long run can be longer than planned. Padding every sample
    to the cap instead would triple the VLM's sequence for nothing."""
    longest = 0
    for ds, t in zip(datasets, transforms):
        for start in range(0, len(ds), 4096):
            chunks = t.action_chunks(ds, np.arange(start, min(len(ds), start + 4096)))
            longest = max(longest, max(len(fast.encode(c, clip=True)) for c in chunks) + 2)
    if longest > max_tokens:
        raise ValueError(f"the longest action chunk needs {longest} FAST target slots (its tokens, then '|' "
                         f"and EOS), --max-fast-tokens is {max_tokens}: raise it")
    return min(max_tokens, int(math.ceil(longest * 1.25)))


def tokenizer_source(given, init, cfg, sp, out):
    """Where the FAST tokenizer of the discrete targets comes from -> (path, its name in the
    checkpoint): `given` (train.py --fast-tokenizer); else `init`'s own (a converted pi0-FAST
    carries openpi's universal one); else, for a model whose prompt tokenizer leaves room in its
    vocabulary (the built-in task), one fitted on the data (`--fast-tokenizer fit` asks for that
    anywhere). openpi always trains with the universal tokenizer: a PaliGemma-vocabulary model
    without one is an error."""
    if given is None and init:
        given = next((p for p in (os.path.join(init, f) for f in ("fast_tokenizer", "fast_tokenizer.json"))
                      if os.path.exists(p)), None)
    if given is None and sp.vocab_size() >= cfg.vocab_size:
        raise ValueError("openpi trains pi0-FAST (and pi0.5's FAST targets) with the universal FAST tokenizer: pass "
                         "--fast-tokenizer DIR (physical-intelligence/fast: tokenizer.json + processor_config.json), "
                         "or --fast-tokenizer fit to fit one on your data (its ids then mean what the base model never saw)")
    if given in (None, "fit"):
        return os.path.join(out, "fast_tokenizer.json"), "fast_tokenizer.json"
    if not os.path.exists(given):
        raise FileNotFoundError(f"--fast-tokenizer {given}: no such file or directory (a fast-tokenizer JSON file, or "
                                f"an HF directory with tokenizer.json + processor_config.json)")
    return given, "fast_tokenizer" if os.path.isdir(given) else "fast_tokenizer.json"


def check_room(fast, cfg, sp, path):
    """FAST ids count down from the top of the model's vocabulary (fast_tokenizer.fast_to_paligemma):
    they must fit in it and, unless the prompt tokenizer spans it (PaliGemma's, whose top ids are
    <loc> tokens a prompt never uses, as in openpi), stay clear of the prompt's pieces."""
    spans = sp.vocab_size() >= cfg.vocab_size  # then FAST ids may take any id below the skipped <seg> tokens
    room = cfg.vocab_size - NUM_SKIPPED - 1 if spans else fast_vocab_room(cfg.vocab_size, sp.vocab_size(), cfg.vocab_size)
    if fast.vocab_size > room:
        raise ValueError(f"FAST tokenizer {path} has {fast.vocab_size} ids, the model's vocabulary of {cfg.vocab_size} "
                         f"has room for {room} above the prompt tokenizer's {sp.vocab_size()} pieces: fit a smaller one "
                         f"(--fast-tokenizer fit fits {min(room, 1024)} ids to the data)")
    return fast
