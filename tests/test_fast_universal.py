"""The universal FAST tokenizer's format (fast_universal.py): the GPT-2 regex split against HF
`tokenizers`' pieces, hand-made HF `physical-intelligence/fast` directories with hand-computed ids,
refused settings, and one parity test against HuggingFace `tokenizers` when it is installed. The
directories are read through load_tokenizer, the way train.py and policy.py read them."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fast_tokenizer import dct, idct
from fast_universal import BYTE_TO_CHAR, _gpt2_split, load_tokenizer


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
    tok = load_tokenizer(write_hf(tmp_path / "regex", vocab, merges, min_token=-97))
    assert tok.encode(chunk) == [2, 5, 0, 4]
    np.testing.assert_allclose(tok.decode([2, 5, 0, 4], action_dim=2), chunk, atol=1e-12)
    # without the regex the string is one word, and "` aa" merges
    flat = load_tokenizer(write_hf(tmp_path / "flat", vocab, merges, -97, use_regex=False))
    assert flat.encode(chunk) == [2, 5, 7]


def test_hf_multibyte_case(tmp_path):
    # min_token -354 as in the universal tokenizer: coefficient 0 -> chr(354) 'Ţ' = bytes C5 A2,
    # spelled 'Å¢' in the byte alphabet; +1 -> 'ţ' = C5 A3 -> 'Å£'; -354 -> chr(0) = byte 0 -> 'Ā'
    assert BYTE_TO_CHAR[0xC5] + BYTE_TO_CHAR[0xA2] == "Å¢" and BYTE_TO_CHAR[0] == "Ā"
    vocab = {"Å": 0, "¢": 1, "£": 2, "Ā": 3, "Å¢": 4, "Å¢Å¢": 5}
    tok = load_tokenizer(write_hf(tmp_path / "hf", vocab, ["Å ¢", "Å¢ Å¢"], min_token=-354))
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
            load_tokenizer(write_hf(tmp_path / name, vocab, merges, -97, **overrides))
    with pytest.raises(ValueError, match="does not match"):
        load_tokenizer(write_hf(tmp_path / "merge", vocab, ["a b"], -97))  # "ab" not in the vocab


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
    tok = load_tokenizer(path)
    for chunk, symbols in zip(chunks[:100], q[:100] - lo):
        ids = bpe.encode("".join(map(chr, symbols))).ids
        assert tok.encode(chunk) == ids
        assert tok.ids_to_symbols(ids) == [ord(c) for c in bpe.decode(ids)]
