"""FAST tokenizer: the DCT against its formula, lossless BPE, the quantization error bound, our
file format and CLI, loud failures on garbage tokens, and the PaliGemma id mapping. All offline,
numpy only. The HF universal tokenizer's format is tested in test_fast_universal.py."""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fast_tokenizer import FASTTokenizer, dct, fast_to_paligemma, idct, main, paligemma_to_fast, smooth_chunks


@pytest.fixture(scope="module")
def fitted():
    """A tokenizer fitted on smooth chunks (C=16, A=3), and held-out chunks to test it on."""
    train, test = smooth_chunks(600, chunk=16, action_dim=3, seed=0), smooth_chunks(50, 16, 3, seed=1)
    return FASTTokenizer.fit(train, vocab_size=256, progress=False), test


def test_dct_matches_formula_and_inverts():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 16):
        x = rng.normal(size=(n, 3))
        # orthonormal DCT-II written out: X_k = s_k sum_t x_t cos(pi (2t + 1) k / 2n)
        ref = np.zeros_like(x)
        for k in range(n):
            s = math.sqrt((1 if k == 0 else 2) / n)
            for t in range(n):
                ref[k] += s * x[t] * math.cos(math.pi * (2 * t + 1) * k / (2 * n))
        np.testing.assert_allclose(dct(x), ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(idct(dct(x)), x, rtol=0, atol=1e-12)
    y = rng.normal(size=(4, 10, 3))  # (N, C, A): the time axis is 1
    np.testing.assert_allclose(dct(y, axis=1)[2], dct(y[2]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(idct(dct(y, axis=1), axis=1), y, rtol=0, atol=1e-12)


def test_bpe_is_lossless_on_symbols(fitted):
    tok, test = fitted
    rough = np.random.default_rng(2).uniform(-0.5, 0.5, (20, 16, 3))  # not smooth: many symbols
    for chunk in [*test, *rough]:
        symbols = tok.chunk_to_symbols(chunk)
        assert tok.ids_to_symbols(tok.encode(chunk)) == symbols.tolist()


def test_round_trip_error_is_bounded_by_the_quantization_step(fitted):
    tok, test = fitted
    c = test.shape[1]
    for chunk in test:
        out = tok.decode(tok.encode(chunk))
        # each coefficient is off by at most half a step; the orthonormal DCT keeps L2 norms, so a
        # (C,) column is off by at most 0.5 * sqrt(C) / scale
        assert np.abs(dct(out) - dct(chunk)).max() <= 0.5 / tok.scale + 1e-9
        assert np.linalg.norm(out - chunk, axis=0).max() <= 0.5 * math.sqrt(c) / tok.scale + 1e-9


def test_fit_compresses_smooth_trajectories(fitted):
    tok, test = fitted
    assert tok.vocab_size > len(tok.base)  # merges were learned
    mean = np.mean([len(tok.encode(x)) for x in test])
    assert mean < test.shape[1] * test.shape[2] / 3, mean  # 48 coefficients -> well under 16 tokens


def test_save_load_gives_identical_ids(fitted, tmp_path):
    tok, test = fitted
    tok.save(tmp_path / "fast.json")
    again = FASTTokenizer.load(str(tmp_path / "fast.json"))
    assert (again.min_token, again.scale, again.time_horizon, again.action_dim) == \
        (tok.min_token, tok.scale, 16, 3)
    for chunk in test:
        assert again.encode(chunk) == tok.encode(chunk)


def test_cli_fit_on_npy(tmp_path, capsys):
    np.save(tmp_path / "chunks.npy", smooth_chunks(100, 8, 2))
    main(["fit", "--data", str(tmp_path / "chunks.npy"), "--out", str(tmp_path / "t.json"),
          "--vocab-size", "128"])
    assert "compression" in capsys.readouterr().out
    assert FASTTokenizer.load(str(tmp_path / "t.json")).vocab_size <= 128


# -- garbage never turns into a silent zero chunk ------------------------------------------------

def test_garbage_tokens_raise_or_are_flagged(fitted):
    tok, test = fitted
    ids = tok.encode(test[0])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode(ids + [tok.vocab_size])
    with pytest.raises(ValueError, match="expected 16 x 3"):
        tok.decode(ids[:-1])  # a sequence cut short, e.g. by the decoding-step limit
    free = FASTTokenizer(tok.vocab, [], tok.base, min_token=tok.min_token)  # no chunk shape fixed
    assert free.decode([0] * 6, action_dim=3).shape == (2, 3)
    with pytest.raises(ValueError, match="multiple of action_dim=3"):
        free.decode([0] * 7, action_dim=3)
    chunk, valid = tok.decode(ids, strict=False)
    assert valid and np.abs(chunk - test[0]).max() < 0.5
    chunk, valid = tok.decode(ids[: len(ids) // 2] + [10**6], strict=False)
    assert not valid and chunk.shape == (16, 3)
    assert np.abs(chunk).max() > 0  # the low frequencies survive: a best effort, not zeros
    with pytest.raises(ValueError, match="outside"):
        tok.encode(test[0] * 100)  # not normalized
    assert len(tok.encode(test[0] * 100, clip=True)) > 0
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(np.full((16, 3), np.nan))
    with pytest.raises(ValueError, match="action_dim"):
        tok.encode(np.zeros((16, 4)))


# -- PaliGemma ids ------------------------------------------------------------------------------

def test_paligemma_mapping():
    ids = np.arange(2048)
    pg = fast_to_paligemma(ids, 2048, 257152)
    assert pg[0] == 257023 and pg[-1] == 257023 - 2047
    np.testing.assert_array_equal(paligemma_to_fast(pg, 2048, 257152), ids)
    assert fast_to_paligemma([0, 5], fast_vocab_size=1024, vocab_size=1000).tolist() == [871, 866]
    for bad in ([-1], [2048]):
        with pytest.raises(ValueError, match="FAST ids"):
            fast_to_paligemma(bad, 2048, 257152)
    for bad in ([257024], [257023 - 2048], [0]):
        with pytest.raises(ValueError, match="not FAST tokens"):
            paligemma_to_fast(bad, 2048, 257152)
    torch = pytest.importorskip("torch")
    assert paligemma_to_fast(fast_to_paligemma(torch.tensor([3, 7]), 2048, 257152), 2048, 257152).tolist() == [3, 7]
