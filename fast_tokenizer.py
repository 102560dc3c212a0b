"""FAST: frequency-space action tokenization, from scratch in numpy (https://arxiv.org/abs/2501.09747).

pi0-FAST predicts these tokens autoregressively; pi0.5 uses them as an auxiliary co-training target.
An action chunk (C, A) becomes a short list of integer ids in three steps:
  1. DCT-II (orthonormal) along time. Smooth trajectories put nearly all their energy in a few low
     frequencies; the high-frequency coefficients are ~0.
  2. Quantize: q = round(coeff * scale). Flatten row-major over (frequency, dim), so the low
     frequencies of every dim come first, and shift by -min_token to non-negative "symbols".
  3. Byte-pair encoding of the symbols: the long runs of zero coefficients collapse into few tokens.
Decoding runs the steps backwards. The rounding is the only loss: at most 0.5/scale per coefficient.

Our own tokenizer is learned with `FASTTokenizer.fit` and kept with `save`/`load` as a small JSON
file: symbol s has id s, a whole chunk is one word, and each merge takes the next id, as in minbpe.
The same class also runs the universal tokenizer of the HF repo `physical-intelligence/fast`
(`load(directory)`): there BPE merges the UTF-8 bytes of chr(symbol), within pieces of a GPT-2
regex split. That spelling is a `pretokenizer` object, which fast_universal.py provides with the
HF file reader; this file only asks it for the words of a chunk and for the symbols of some units.

Unlike the reference processor, bad input raises: coefficients outside the tokenizer's range, unknown
ids, and token lists that do not fill the chunk. The reference clamps the first silently and turns
the others into an all-zero chunk, which makes a robot stand still with no error.

Axis legend (paligemma.py's): B chunks, C chunk length (time steps), A action dim.
"""

import argparse
import functools
import json
import math
import os
import sys
import time

import numpy as np

# ----------------------------------------------------------------------------------------------
# Orthonormal DCT along time


@functools.lru_cache(maxsize=32)
def _dct_matrix(n):
    """The (n, n) orthonormal DCT-II matrix M: coeff = M @ x. M is orthogonal, so x = M.T @ coeff."""
    k = np.arange(n)[:, None]  # frequency (rows)
    t = np.arange(n)[None, :]  # time (columns)
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * t + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)  # the constant (DC) row needs weight sqrt(1/n) to have norm 1
    m.flags.writeable = False  # the cached matrix is shared by every caller
    return m


def dct(x, axis=0):
    """Orthonormal DCT-II along `axis`, equal to scipy.fft.dct(x, axis=axis, norm="ortho")."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0)
    return np.moveaxis(np.tensordot(_dct_matrix(x.shape[0]), x, axes=1), 0, axis)


def idct(coeff, axis=0):
    """Inverse of `dct` (the orthonormal DCT-III), equal to scipy.fft.idct(..., norm="ortho")."""
    c = np.moveaxis(np.asarray(coeff, dtype=np.float64), axis, 0)
    return np.moveaxis(np.tensordot(_dct_matrix(c.shape[0]).T, c, axes=1), 0, axis)


# ----------------------------------------------------------------------------------------------
# BPE merge steps


def _merge(ids, pair, new_id):
    """Replace each non-overlapping occurrence of `pair`, left to right, by `new_id` (as in minbpe)."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _merge_array(seq, pair, new_id):
    """`_merge` vectorized over one long numpy sequence: the inner step of `fit`."""
    a, b = pair
    idx = np.flatnonzero((seq[:-1] == a) & (seq[1:] == b))
    if a == b and len(idx):  # "xxx" holds two overlapping pairs: keep every other one per run, (xx)x
        run_start = np.maximum.accumulate(np.where(np.diff(idx, prepend=-2) != 1, idx, 0))
        idx = idx[(idx - run_start) % 2 == 0]
    seq = seq.copy()
    seq[idx] = new_id
    keep = np.ones(len(seq), dtype=bool)
    keep[idx + 1] = False
    return seq[keep]


# ----------------------------------------------------------------------------------------------
# The tokenizer


class FASTTokenizer:
    """DCT + quantization + BPE. Build one with `fit` or `load`, then `encode` and `decode`.

    vocab[id] is the tuple of units the token stands for: symbols in our own tokenizers, UTF-8
    bytes in a byte-level (HF) one. merges maps a pair of ids to the merged id, in priority order.
    base maps a unit to its one-unit token.

    pretokenizer says how symbols become BPE units. None (our own tokenizers): the symbols are
    the units and a chunk is one word. Otherwise an object with `words(symbols)` -> lists of
    units (BPE never merges across two), `symbols(units, strict=True)` -> symbols (the inverse,
    raising ValueError on units that spell none; strict=False skips them), `max_symbol` (the
    largest symbol it spells) and `kind` (its name in repr): fast_universal.ByteLevel is one.
    """

    def __init__(self, vocab, merges, base, *, scale=10.0, min_token=0, time_horizon=None,
                 action_dim=None, pretokenizer=None):
        self.vocab, self.base = vocab, base
        self.merges = {(a, b): new for a, b, new in merges}  # dict order = merge rank
        self.rank = {pair: r for r, pair in enumerate(self.merges)}
        if not (math.isfinite(scale) and scale > 0):  # a coefficient is rounded to 1/scale
            raise ValueError(f"scale {scale}: must be a finite number > 0 (the DCT coefficients are rounded to 1/scale)")
        self.scale, self.min_token = float(scale), int(min_token)
        self.time_horizon, self.action_dim = time_horizon, action_dim  # None: any (universal)
        self.pretokenizer = pretokenizer
        # our own tokenizers know symbols 0..len(base)-1; a pretokenizer says its own range
        self.max_symbol = len(base) - 1 if pretokenizer is None else pretokenizer.max_symbol

    @property
    def vocab_size(self):
        return len(self.vocab)

    def __repr__(self):
        kind = "own" if self.pretokenizer is None else self.pretokenizer.kind
        return (f"FASTTokenizer({kind}, vocab {self.vocab_size}, scale {self.scale:g}, "
                f"min_token {self.min_token}, chunk {self.time_horizon}x{self.action_dim})")

    def _check_dims(self, c, a):
        dims = {"time_horizon": (self.time_horizon, c), "action_dim": (self.action_dim, a)}
        for name, (fixed, got) in dims.items():
            if fixed is not None and got is not None and fixed != got:
                raise ValueError(f"chunk has {name}={got}, but this tokenizer was fitted for {fixed}: fit one on "
                                 f"chunks of the model's shape (data.py fast DATASET --chunk-size C)")

    # -- actions <-> symbols ------------------------------------------------------------------

    def chunk_to_symbols(self, chunk, clip=False):
        """(C, A) floats -> (C*A,) ints in [0, max_symbol], frequency-major.

        A coefficient out of range raises (the usual cause: actions that are not normalized), unless
        clip=True clamps it. The reference processor always clamps at 0, silently.
        """
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"expected one action chunk of shape (C, A), got shape {chunk.shape}")
        self._check_dims(*chunk.shape)
        if not np.isfinite(chunk).all():
            raise ValueError("action chunk contains NaN or inf")
        # np.around rounds half to even, like the reference. (Our matrix DCT and scipy's FFT may
        # differ in the last bit, so a coefficient within ~1e-14 of a .5 tie could round apart.)
        q = np.around(dct(chunk, axis=0) * self.scale).astype(np.int64)  # (C, A)
        symbols = q.reshape(-1) - self.min_token  # (C*A,) row-major: frequency 0 of every dim first
        bad = np.flatnonzero((symbols < 0) | (symbols > self.max_symbol))
        if len(bad) and not clip:
            k, a = divmod(int(bad[0]), chunk.shape[1])
            raise ValueError(
                f"quantized DCT coefficient {q[k, a]} (frequency {k}, dim {a}) and {len(bad) - 1} more "
                f"are outside this tokenizer's range [{self.min_token}, "
                f"{self.min_token + self.max_symbol}]. Are the actions normalized (FAST expects about "
                f"[-1, 1])? clip=True clamps them.")
        return np.clip(symbols, 0, self.max_symbol)

    def symbols_to_chunk(self, symbols, action_dim):
        """(C*A,) symbols -> (C, A) actions: undo the shift and the scale, then the inverse DCT."""
        q = np.asarray(symbols, dtype=np.int64).reshape(-1, action_dim) + self.min_token  # (C, A)
        return idct(q / self.scale, axis=0)

    # -- symbols <-> ids ----------------------------------------------------------------------

    def _words(self, symbols):
        """Symbols -> the unit sequences that BPE runs on, one per pre-tokenized piece."""
        if self.pretokenizer is None:
            return [[int(s) for s in symbols]]  # our own tokenizer: a chunk is one word
        return self.pretokenizer.words(symbols)

    def _bpe(self, units):
        """One-unit tokens, then apply the highest-priority merge present until none is (minbpe)."""
        missing = [u for u in units if u not in self.base]
        if missing:  # HF tokenizers, with no unk token, would drop these silently
            raise ValueError(f"unit {missing[0]} has no token in the vocabulary")
        ids = [self.base[u] for u in units]
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.rank.get(p, math.inf))
            if pair not in self.rank:
                break
            ids = _merge(ids, pair, self.merges[pair])
        return ids

    def encode(self, chunk, clip=False):
        """One action chunk (C, A) -> list of token ids."""
        return [i for word in self._words(self.chunk_to_symbols(chunk, clip)) for i in self._bpe(word)]

    def ids_to_symbols(self, ids):
        """Token ids -> symbols. Raises on an unknown id, or on units that spell no symbol (HF:
        bytes that are not valid UTF-8)."""
        units = []
        for i in map(int, ids):
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i} is not in the vocabulary (size {len(self.vocab)})")
            units.extend(self.vocab[i])
        return units if self.pretokenizer is None else self.pretokenizer.symbols(units)

    def decode(self, ids, time_horizon=None, action_dim=None, strict=True):
        """Token ids -> one (C, A) chunk. C and A default to the tokenizer's fixed ones.

        strict=True raises ValueError when the ids are not a chunk. strict=False returns
        (chunk, valid): for bad ids valid is False and chunk is a best effort (unknown ids skipped,
        missing high frequencies zero, extra ones dropped), never a silent stand-in.
        """
        c = self.time_horizon if time_horizon is None else time_horizon
        a = self.action_dim if action_dim is None else action_dim
        if a is None:
            raise ValueError("decode needs action_dim: this tokenizer has none fixed, pass it")
        self._check_dims(c, a)
        if not strict:
            try:
                return self.decode(ids, c, a), True
            except ValueError:
                return self._decode_best_effort(ids, c, a), False
        symbols = self.ids_to_symbols(ids)
        if len(symbols) % a or (c is not None and len(symbols) != c * a):
            want = f"{c} x {a} = {c * a}" if c is not None else f"a multiple of action_dim={a}"
            raise ValueError(f"{len(ids)} tokens decode to {len(symbols)} coefficients, "
                             f"expected {want}")
        return self.symbols_to_chunk(symbols, a)

    def _decode_best_effort(self, ids, c, a):
        if c is None:
            raise ValueError("decode(strict=False) needs time_horizon: this tokenizer has none fixed")
        units = [u for i in map(int, ids) if 0 <= i < len(self.vocab) for u in self.vocab[i]]
        if self.pretokenizer is not None:
            units = self.pretokenizer.symbols(units, strict=False)
        rows = min(len(units) // a, c)
        symbols = np.full(c * a, -self.min_token)  # the symbol of a zero coefficient
        symbols[:rows * a] = np.clip(units[:rows * a], 0, self.max_symbol)
        return self.symbols_to_chunk(symbols, a)

    # -- learning the merges ------------------------------------------------------------------

    @classmethod
    def fit(cls, chunks, vocab_size=1024, scale=10.0, min_frequency=2, progress=True):
        """Learn a tokenizer from chunks (N, C, A), normalized as the model will see them.

        As in the reference, min_token and the symbol alphabet span the data's quantized
        coefficients, and merging stops at vocab_size or when the most frequent pair occurs fewer
        than min_frequency times. Ties go to the smallest pair of ids (HF's trainer differs).
        """
        chunks = np.asarray(chunks, dtype=np.float64)
        if chunks.ndim != 3 or not np.isfinite(chunks).all():
            raise ValueError(f"fit expects finite chunks of shape (N, C, A), got shape {chunks.shape}")
        n, c, a = chunks.shape
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale {scale}: must be a finite number > 0 (the DCT coefficients are rounded to 1/scale)")
        q = np.around(dct(chunks, axis=1) * scale).astype(np.int64).reshape(n, c * a)  # (B, C*A)
        min_token, num_symbols = int(q.min()), int(q.max() - q.min()) + 1
        if vocab_size < num_symbols:
            raise ValueError(f"vocab_size {vocab_size} < the {num_symbols} symbols in the data: "
                             f"normalize the actions (FAST expects about [-1, 1]), raise vocab_size "
                             f"or lower scale")
        # all chunks in one flat array, each followed by -1 so that no pair spans two chunks
        seq = np.concatenate([q - min_token, np.full((n, 1), -1)], axis=1).reshape(-1)
        merges = []
        for new_id in _progress(range(num_symbols, vocab_size), progress, "BPE merges"):
            left, right = seq[:-1], seq[1:]
            ok = (left >= 0) & (right >= 0)
            if not ok.any():
                break
            counts = np.bincount(left[ok] * vocab_size + right[ok])  # pair (x, y) counted at x*V + y
            best = int(counts.argmax())
            if counts[best] < min_frequency:
                break  # the pairs left are too rare to earn a token
            pair = divmod(best, vocab_size)
            seq = _merge_array(seq, pair, new_id)
            merges.append((*pair, new_id))
        vocab = [(s,) for s in range(num_symbols)]
        for x, y, _ in merges:
            vocab.append(vocab[x] + vocab[y])
        return cls(vocab, merges, {s: s for s in range(num_symbols)}, scale=scale,
                   min_token=min_token, time_horizon=c, action_dim=a)

    # -- files --------------------------------------------------------------------------------

    def save(self, path):
        """Write our JSON format: merge i (a pair of ids) creates id num_symbols + i."""
        if self.pretokenizer is not None:
            raise ValueError("a tokenizer loaded from HF files is saved by copying its directory")
        if list(self.merges.values()) != list(range(len(self.base), len(self.vocab))):
            raise ValueError("save needs merge i to create id num_symbols + i, as fit makes them")
        cfg = dict(format="fast-tokenizer", version=1, scale=self.scale, min_token=self.min_token,
                   time_horizon=self.time_horizon, action_dim=self.action_dim,
                   num_symbols=len(self.base), merges=[list(pair) for pair in self.merges])
        with open(f"{path}.tmp", "w") as f:
            json.dump(cfg, f)
        os.replace(f"{path}.tmp", path)  # atomic: a crash never leaves half a file

    @classmethod
    def load(cls, path):
        """Read our JSON file (an HF FAST processor's directory, `physical-intelligence/fast`, is
        read by fast_universal.load; fast_universal.load_tokenizer takes either)."""
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory: an HF FAST tokenizer is read with fast_universal.load")
        with open(path) as f:
            cfg = json.load(f)
        if cfg.get("format") != "fast-tokenizer" or cfg.get("version") != 1:
            raise ValueError(f"{path}: not a fast-tokenizer v1 file (for an HF one pass the directory)")
        n = cfg["num_symbols"]
        vocab, merges = [(s,) for s in range(n)], []
        for x, y in cfg["merges"]:
            if not (0 <= x < len(vocab) and 0 <= y < len(vocab)):
                raise ValueError(f"{path}: merge {len(merges)} uses id {max(x, y)} before it exists")
            merges.append((x, y, len(vocab)))
            vocab.append(vocab[x] + vocab[y])
        return cls(vocab, merges, {s: s for s in range(n)}, scale=cfg["scale"],
                   min_token=cfg["min_token"], time_horizon=cfg["time_horizon"],
                   action_dim=cfg["action_dim"])


# ----------------------------------------------------------------------------------------------
# FAST ids inside the PaliGemma vocabulary (openpi's pi0-FAST)

NUM_SKIPPED = 128  # the last 128 Gemma ids (the <seg> tokens) stay free


def fast_to_paligemma(ids, fast_vocab_size, vocab_size):
    """FAST id -> PaliGemma id, counting down from the top of the model's vocabulary of
    vocab_size ids: 257023 - id in PaliGemma's 257152.

    FAST ids 0..1023 land on <loc1023>..<loc0000>, the rest on rarely used Gemma pieces. Takes
    ints, lists, numpy arrays or torch tensors (the range check syncs a GPU tensor once).
    """
    x = np.asarray(ids) if isinstance(ids, (list, tuple, int, np.integer)) else ids  # arrays and tensors as they are
    bad = (x < 0) | (x >= fast_vocab_size)
    if bad.any():
        raise ValueError(f"FAST ids must be in [0, {fast_vocab_size}), got {x[bad].tolist()[:8]}")
    return vocab_size - 1 - NUM_SKIPPED - x


def fast_vocab_room(vocab_size, text_pieces, wanted=1024):
    """How many FAST ids a fitted tokenizer may use inside a model vocabulary of `vocab_size`
    whose prompt tokenizer has `text_pieces` pieces. FAST ids count down from the top, below the
    128 <seg> tokens. When the tokenizer fills the vocabulary (PaliGemma's 257152 pieces end in
    1024 <loc> and 128 <seg> tokens that prompts never use), they take the <loc> tokens, as
    openpi's do; a smaller tokenizer (tests, the built-in task) keeps every one of its pieces."""
    if text_pieces >= vocab_size:  # PaliGemma's tokenizer spans the vocabulary
        room = 1024  # the <loc> tokens (openpi's 2048-token universal tokenizer goes further down)
    else:
        room = vocab_size - NUM_SKIPPED - 1 - text_pieces
    if room < 2:
        raise ValueError(f"a model vocabulary of {vocab_size} leaves no room for FAST ids above the tokenizer's "
                         f"{text_pieces} pieces and below the {NUM_SKIPPED} skipped ones")
    return min(wanted, room)


def paligemma_to_fast(pg_ids, fast_vocab_size, vocab_size):
    """Inverse of `fast_to_paligemma`. Raises on a PaliGemma id outside the FAST range."""
    x = np.asarray(pg_ids) if isinstance(pg_ids, (list, tuple, int, np.integer)) else pg_ids
    top = vocab_size - 1 - NUM_SKIPPED
    bad = (x > top) | (x <= top - fast_vocab_size)
    if bad.any():
        raise ValueError(f"PaliGemma ids {x[bad].tolist()[:8]} are not FAST tokens "
                         f"(range [{top - fast_vocab_size + 1}, {top}])")
    return top - x


# ----------------------------------------------------------------------------------------------
# Command line: fit on a dataset, or a demo on synthetic trajectories


def _progress(it, enabled, desc):
    """A tqdm bar when tqdm is installed, else the bare iterable."""
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, disable=not enabled)


def smooth_chunks(n, chunk=32, action_dim=7, seed=0):
    """(N, C, A) smooth random trajectories in about [-1, 1]: three low-frequency sines per dim."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, chunk)[None, :, None, None]  # (1, C, 1, 1)
    freq, amp, phase = (rng.uniform(lo, hi, (n, 1, action_dim, 3)) for lo, hi in
                        ((0.1, 1.5), (0, 0.5), (0, 2 * np.pi)))  # cycles per chunk, amplitude, phase
    return (amp * np.sin(2 * np.pi * freq * t + phase)).sum(-1)  # (B, C, A)


def _read_chunks(path, max_chunks, norm_stats=None):
    """(N, C, A) chunks from a .npy / .npz file (a robot dataset: `python data.py fast DATASET`)."""
    if not path.endswith((".npy", ".npz")):
        raise SystemExit(f"--data {path}: expected (N, C, A) chunks in a .npy / .npz file; to fit on a dataset's "
                         f"actions as the model sees them: python data.py fast {path} --chunk-size C --out fast.json")
    # a random subset keeps fit's memory and time in check; the merges settle long before
    subset = lambda n: np.sort(np.random.default_rng(0).permutation(n)[:max_chunks])
    x = np.load(path)
    if path.endswith(".npz"):
        if "actions" not in x and len(x.files) != 1:
            raise SystemExit(f"{path}: expected an 'actions' array or just one, found {x.files}")
        x = x["actions" if "actions" in x else x.files[0]]
    chunks = np.asarray(x, dtype=np.float64)[subset(len(x))]
    if norm_stats is None:
        return chunks
    # openpi's quantile normalization, which pi0-FAST and pi0.5 apply before FAST
    with open(norm_stats) as f:
        stats = json.load(f)["norm_stats"]["actions"]
    q01, q99 = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    if len(q01) != chunks.shape[-1]:
        raise SystemExit(f"{norm_stats}: actions have {len(q01)} dims, the data {chunks.shape[-1]}")
    return (chunks - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0


def report(tok, chunks):
    """Print and return the compression ratio and round-trip max abs error of `tok` on chunks."""
    n, c, a = chunks.shape
    t0 = time.perf_counter()
    ids = [tok.encode(x) for x in chunks]
    ms = (time.perf_counter() - t0) / n * 1e3
    err = max(np.abs(tok.decode(i, c, a) - x).max() for i, x in zip(ids, chunks))
    mean = np.mean([len(i) for i in ids])
    print(f"{n} chunks of {c}x{a}: {mean:.1f} tokens per chunk (max {max(map(len, ids))}), "
          f"compression {c * a / mean:.2f}x, vocab {tok.vocab_size}, encode {ms:.2f} ms per chunk")
    bound = 0.5 * math.sqrt(c) / tok.scale
    print(f"round trip max abs error {err:.4f} (bound 0.5 * sqrt(C) / scale = {bound:.4f})")
    return c * a / mean, err


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fit a FAST action tokenizer, or run a demo.")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="learn a tokenizer from action chunks")
    fit.add_argument("--data", required=True, help="(N, C, A) chunks as .npy/.npz (a dataset's own: "
                     "python data.py fast DATASET)")
    fit.add_argument("--norm-stats", default=None, help="openpi norm_stats.json: quantile-normalize "
                     "the actions as the model will see them (else they are used as they are)")
    fit.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    fit.add_argument("--vocab-size", type=int, default=1024, help="symbols + merges")
    fit.add_argument("--scale", type=float, default=10.0, help="round DCT coefficients to 1/scale")
    fit.add_argument("--max-chunks", type=int, default=20000, help="fit on a random subset this big")
    demo = sub.add_parser("demo", help="fit on smooth synthetic trajectories and print the figures")
    demo.add_argument("--vocab-size", type=int, default=1024, help="symbols + merges")
    args = parser.parse_args(argv)

    if args.command == "fit":
        chunks = _read_chunks(args.data, args.max_chunks, args.norm_stats)
    else:
        chunks = smooth_chunks(4000, seed=0)
    t0 = time.perf_counter()
    tok = FASTTokenizer.fit(chunks, vocab_size=args.vocab_size, scale=getattr(args, "scale", 10.0))
    print(f"fitted {tok} on {len(chunks)} chunks in {time.perf_counter() - t0:.1f}s")
    report(tok, chunks[::max(1, len(chunks) // 2000)])  # about 2000 of them are plenty
    if args.command == "fit":
        tok.save(args.out)
        print(f"wrote {args.out}")
    else:
        print("held-out chunks:")
        report(tok, smooth_chunks(500, seed=1))


if __name__ == "__main__":
    try:  # a user's mistake is one line (this file stands alone: no cli.py); PI_DEBUG=1 for the traceback
        main()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("PI_DEBUG", "") not in ("", "0"):
            raise
        sys.exit(f"error: {e}")
