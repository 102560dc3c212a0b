"""FAST tokenizer: the DCT against its formula, lossless BPE, the quantization error bound, file
formats (ours and a hand-made HF `physical-intelligence/fast` directory, with hand-computed ids),
loud failures on garbage tokens, and the PaliGemma id mapping. All offline, numpy only; one extra
parity test runs against HuggingFace `tokenizers` when it is installed."""

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fast_tokenizer import (BYTE_TO_CHAR, FASTTokenizer, _gpt2_split, dct, fast_to_paligemma, idct,
                            main, paligemma_to_fast, smooth_chunks)


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


# -- the HF format: a ByteLevel BPE over chr(symbol), spelled in GPT-2's byte alphabet -----------

def write_hf(path, vocab, merges, min_token, scale=1, use_regex=True, **overrides):
    """A tokenizer.json + processor_config.json laid out like `physical-intelligence/fast`."""
    os.makedirs(path, exist_ok=True)
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": use_regex}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
           "normalizer": None, "pre_tokenizer": level, "post_processor": level, "decoder": level,
           "model": {"type": "BPE", "dropout": None, "unk_token": None,
                     "continuing_subword_prefix": None, "end_of_word_suffix": None,
                     "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": vocab, "merges": merges}}
    tok.update(overrides)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    with open(os.path.join(path, "processor_config.json"), "w") as f:
        json.dump({"scale": scale, "vocab_size": len(vocab), "min_token": min_token,
                   "time_horizon": None, "action_dim": None,
                   "processor_class": "UniversalActionProcessor"}, f)
    return str(path)


def test_gpt2_split_matches_tokenizers():
    # expected pieces printed by HF tokenizers 0.23 (ByteLevel, use_regex=True), decoded back to text
    cases = {
        "Hello  world's 123 \t\x1cx!!'re": ["Hello", " ", " world", "'s", " 123", " ", "\t",
                                            "\x1c", "x", "!!'", "re"],
        "a \n\nb\x1d\x1e 5\u0301\u0660": ["a", " \n", "\n", "b", "\x1d\x1e", " 5", "\u0301", "\u0660"],
        "\x00\x01 ab  ": ["\x00\x01", " ab", "  "],
        "ŢŢ\u02c2Ţ \xa0x": ["ŢŢ", "\u02c2", "Ţ", " ", "\xa0", "x"],
    }
    for text, pieces in cases.items():
        assert _gpt2_split(text) == pieces, text


def chunk_with_coefficients(q):
    """The chunk whose DCT is exactly the integer matrix q (scale 1), so the symbols are known."""
    return idct(np.asarray(q, dtype=np.float64))


def test_hf_ascii_case_with_regex_split(tmp_path):
    # min_token -97: coefficient 0 -> chr(97) 'a', +1 -> 'b', -1 -> '`', which is not a letter
    vocab = {"`": 0, "a": 1, "b": 2, "c": 3, "aa": 4, "aaaa": 5, "ab": 6, "`aa": 7}
    merges = ["a a", ["aa", "aa"], "a b", ["`", "aa"]]  # both spellings of a merge in the wild
    chunk = chunk_with_coefficients([[1, 0], [0, 0], [0, -1], [0, 0]])  # (C=4, A=2)
    # flattened frequency-major: 1 0 0 0 0 -1 0 0 -> "baaaa`aa"; the GPT-2 regex splits it into
    # "baaaa" | "`" | "aa", so the merge "` aa" cannot apply: [b, aaaa] [`] [aa]
    tok = FASTTokenizer.load(write_hf(tmp_path / "regex", vocab, merges, min_token=-97))
    assert tok.encode(chunk) == [2, 5, 0, 4]
    np.testing.assert_allclose(tok.decode([2, 5, 0, 4], action_dim=2), chunk, atol=1e-12)
    # without the regex the string is one word, and "` aa" merges
    flat = FASTTokenizer.load(write_hf(tmp_path / "flat", vocab, merges, -97, use_regex=False))
    assert flat.encode(chunk) == [2, 5, 7]


def test_hf_multibyte_case(tmp_path):
    # min_token -354 as in the universal tokenizer: coefficient 0 -> chr(354) 'Ţ' = bytes C5 A2,
    # spelled 'Å¢' in the byte alphabet; +1 -> 'ţ' = C5 A3 -> 'Å£'; -354 -> chr(0) = byte 0 -> 'Ā'
    assert BYTE_TO_CHAR[0xC5] + BYTE_TO_CHAR[0xA2] == "Å¢" and BYTE_TO_CHAR[0] == "Ā"
    vocab = {"Å": 0, "¢": 1, "£": 2, "Ā": 3, "Å¢": 4, "Å¢Å¢": 5}
    tok = FASTTokenizer.load(write_hf(tmp_path / "hf", vocab, ["Å ¢", "Å¢ Å¢"], min_token=-354))
    chunk = chunk_with_coefficients([[1, 0], [0, 0], [0, 0], [0, 0]])
    # "ţ" + 7 x "Ţ": Å £ then (Å ¢) x 7 -> Å £ Å¢ x 7 -> Å £ (Å¢Å¢) x 3 Å¢
    assert tok.encode(chunk) == [0, 2, 5, 5, 5, 4]
    np.testing.assert_allclose(tok.decode([0, 2, 5, 5, 5, 4], action_dim=2), chunk, atol=1e-12)
    low = chunk_with_coefficients([[-354, 0], [0, 0]])  # the lowest symbol, chr(0)
    # "\x00ŢŢŢ": a control char is not a letter, so the regex splits it off: [Ā] [Å¢Å¢ Å¢]
    assert tok.encode(low) == [3, 5, 4]
    np.testing.assert_allclose(tok.decode([3, 5, 4], action_dim=2), low, atol=1e-12)
    with pytest.raises(ValueError, match="outside"):  # below min_token: the reference clamps silently
        tok.encode(chunk_with_coefficients([[-355, 0], [0, 0]]))
    with pytest.raises(ValueError, match="UTF-8"):  # a lone lead byte C5
        tok.decode([0, 4], action_dim=1)
    with pytest.raises(ValueError, match="no token"):  # byte 0xC6 is not in this tiny vocab
        tok.encode(chunk_with_coefficients([[64, 0], [0, 0]]))


def test_hf_unsupported_options_raise(tmp_path):
    vocab, merges = {"a": 0, "b": 1}, []
    prefix = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    for name, overrides in [("add_prefix_space", {"pre_tokenizer": prefix}),
                            ("normalizer", {"normalizer": {"type": "NFC"}})]:
        with pytest.raises(ValueError, match=name):
            FASTTokenizer.load(write_hf(tmp_path / name, vocab, merges, -97, **overrides))
    with pytest.raises(ValueError, match="does not match"):
        FASTTokenizer.load(write_hf(tmp_path / "merge", vocab, ["a b"], -97))  # "ab" not in the vocab


def test_hf_parity_with_tokenizers_library(tmp_path):
    """Train a ByteLevel BPE exactly as the HF FAST processor's fit does, then compare ids."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.trainers import BpeTrainer
    rng = np.random.default_rng(0)
    chunks = 2 * np.tanh(np.cumsum(rng.normal(size=(800, 10, 6)) * 0.2, axis=1))  # (N, C, A)
    q = np.around(dct(chunks, axis=1) * 10).astype(int).reshape(len(chunks), -1)
    lo, hi = q.min(), q.max()
    bpe = tokenizers.ByteLevelBPETokenizer()
    trainer = BpeTrainer(vocab_size=600, min_frequency=2, show_progress=False, special_tokens=[],
                         initial_alphabet=[chr(i) for i in range(hi - lo + 1)], max_token_length=10000)
    bpe._tokenizer.train_from_iterator(("".join(map(chr, s - lo)) for s in q), trainer=trainer)
    path = write_hf(tmp_path / "trained", {}, [], min_token=int(lo), scale=10)
    bpe.save(os.path.join(path, "tokenizer.json"))  # replaces the empty one
    tok = FASTTokenizer.load(path)
    for chunk, symbols in zip(chunks[:100], q[:100] - lo):
        ids = bpe.encode("".join(map(chr, symbols))).ids
        assert tok.encode(chunk) == ids
        assert tok.ids_to_symbols(ids) == [ord(c) for c in bpe.decode(ids)]


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
    pg = fast_to_paligemma(ids)
    assert pg[0] == 257023 and pg[-1] == 257023 - 2047
    np.testing.assert_array_equal(paligemma_to_fast(pg), ids)
    assert fast_to_paligemma([0, 5], fast_vocab_size=1024, vocab_size=1000).tolist() == [871, 866]
    for bad in ([-1], [2048]):
        with pytest.raises(ValueError, match="FAST ids"):
            fast_to_paligemma(bad)
    for bad in ([257024], [257023 - 2048], [0]):
        with pytest.raises(ValueError, match="not FAST tokens"):
            paligemma_to_fast(bad)
    torch = pytest.importorskip("torch")
    assert paligemma_to_fast(fast_to_paligemma(torch.tensor([3, 7]))).tolist() == [3, 7]
