"""The universal FAST tokenizer's file format: HuggingFace's byte-level BPE, in plain Python.

`physical-intelligence/fast`, the tokenizer openpi's pi0-FAST and pi0.5 checkpoints were trained
with, is FAST (fast_tokenizer.py: DCT, quantization, BPE) whose BPE is a HuggingFace `tokenizers`
ByteLevel BPE. The DCT and the quantization are the same; what differs is the road from a chunk's
symbols to the units that BPE merges:

  1. each symbol s becomes the character chr(s), and the chunk one string;
  2. the GPT-2 regex of the ByteLevel pre-tokenizer splits the string into pieces (a run of
     letters, of numbers, of spaces, of anything else); BPE never merges across two pieces;
  3. each piece's UTF-8 bytes are its units. tokenizer.json spells them in GPT-2's byte alphabet:
     printable bytes stand for themselves, the other 68 move to chr(256), chr(257), ...

Decoding runs it backwards: the tokens' bytes, read as UTF-8, give one character per symbol.

`ByteLevel` is steps 1-3 and back, the `pretokenizer` a FASTTokenizer takes; `load` reads an HF
directory (tokenizer.json + processor_config.json) into a FASTTokenizer and refuses any setting
that would change the ids. The ids are HF's exactly (tests/test_fast_universal.py checks against
`tokenizers` when it is installed), so openpi checkpoints see the tokens they were trained on,
and neither `tokenizers` nor `regex` is needed here. `load_tokenizer(path)` reads either kind of
FAST tokenizer: an HF directory here, a JSON file of ours with FASTTokenizer.load.
"""

import json
import os
import unicodedata

from fast_tokenizer import FASTTokenizer

# ----------------------------------------------------------------------------------------------
# GPT-2's byte alphabet, in which ByteLevel vocab strings are spelled


def _bytes_to_unicode():
    """GPT-2's table byte -> printable character, in which ByteLevel vocab strings are spelled.

    Printable bytes stand for themselves. The other 68 (controls, space, 0x7f-0xa0, 0xad) move to
    chr(256), chr(257), ... in byte order, so the space byte 0x20 reads 'Ġ' and 0x00 reads 'Ā'.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


# ----------------------------------------------------------------------------------------------
# The GPT-2 regex split of the ByteLevel pre-tokenizer


def _char_class(c):
    """'L' letter, 'N' number, 's' space, 'o' other, as Oniguruma (HF tokenizers' regex) sees c.

    Its \\s is 0x09-0x0d, 0x85 and the Z* categories; Python's str.isspace() would add 0x1c-0x1f.
    Python 3.11 has Unicode 14 tables; checked equal to tokenizers 0.23 on U+0000-U+1C88.
    """
    cat = unicodedata.category(c)
    if cat[0] in "LN":
        return cat[0]
    if cat in ("Zs", "Zl", "Zp") or c in "\t\n\x0b\x0c\r\x85":
        return "s"
    return "o"


_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")


def _gpt2_split(text):
    r"""Split text like the GPT-2 regex of the ByteLevel pre-tokenizer (use_regex=True):
    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    written as a scanner, so that this file needs no `regex` package. BPE never merges across pieces.
    """
    pieces, i, n = [], 0, len(text)
    while i < n:
        if text[i] == "'":  # the English contractions come first in the alternation
            tail = next((t for t in _CONTRACTIONS if text.startswith(t, i + 1)), "")
            if tail:
                pieces.append(text[i:i + 1 + len(tail)])
                i += 1 + len(tail)
                continue
        # " ?X+" for X = letters, numbers, others: an optional plain space, then a run of one class
        k = i + 1 if text[i] == " " and i + 1 < n and _char_class(text[i + 1]) != "s" else i
        cls, j = _char_class(text[k]), k + 1
        while j < n and _char_class(text[j]) == cls:
            j += 1
        if cls == "s" and j < n and j - i > 1:
            j -= 1  # \s+(?!\S): a space run leaves its last char to prefix the next word
        pieces.append(text[i:j])
        i = j
    return pieces


# ----------------------------------------------------------------------------------------------
# The pre-tokenizer FASTTokenizer takes: symbols -> words of UTF-8 bytes, and back


class ByteLevel:
    """HF's ByteLevel pre-tokenizer and decoder, as FASTTokenizer(pretokenizer=ByteLevel(...)) uses
    them: `words` spells symbols as BPE units (bytes), `symbols` reads units back."""
    kind = "HF byte-level"  # for FASTTokenizer's repr
    max_symbol = 0xD7FF  # any chr() short of the surrogates, which have no UTF-8

    def __init__(self, use_regex=True):
        self.use_regex = use_regex  # tokenizer.json's pre_tokenizer.use_regex

    def words(self, symbols):
        """Symbols -> one list of UTF-8 bytes per GPT-2 piece (one piece without the regex)."""
        text = "".join(map(chr, symbols))  # the string the HF processor hands to its BPE
        pieces = _gpt2_split(text) if self.use_regex else [text]
        return [list(p.encode("utf-8")) for p in pieces]

    def symbols(self, units, strict=True):
        """Bytes -> symbols. Bytes that are not valid UTF-8 raise, or with strict=False are skipped."""
        if not strict:
            return [ord(c) for c in bytes(units).decode("utf-8", errors="ignore")]
        try:  # HF decodes lossily: U+FFFD would become a meaningless coefficient
            return [ord(c) for c in bytes(units).decode("utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError(f"tokens do not spell valid UTF-8: {e.reason} at byte {e.start}") from None


# ----------------------------------------------------------------------------------------------
# Reading an HF FAST processor's directory


def load(path, cls=FASTTokenizer):
    """tokenizer.json (an HF `tokenizers` ByteLevel BPE) + processor_config.json (scale etc.) ->
    a FASTTokenizer (or `cls`) with the ByteLevel pre-tokenizer and the file's vocab and merges."""
    tok_file = os.path.join(path, "tokenizer.json")
    with open(tok_file, encoding="utf-8") as f:
        tok = json.load(f)
    with open(os.path.join(path, "processor_config.json")) as f:
        proc = json.load(f)
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    post, dec = tok.get("post_processor") or {"type": "ByteLevel"}, tok.get("decoder") or {}
    # the FAST processor writes a plain ByteLevel BPE; refuse anything that would change the ids
    unsupported = [name for name, bad in [
        ("model type", model.get("type") != "BPE"),
        ("dropout", model.get("dropout") not in (None, 0)),
        ("continuing_subword_prefix", model.get("continuing_subword_prefix") not in (None, "")),
        ("end_of_word_suffix", model.get("end_of_word_suffix") not in (None, "")),
        ("ignore_merges", model.get("ignore_merges")),
        ("byte_fallback", model.get("byte_fallback")),
        ("normalizer", tok.get("normalizer") is not None),
        ("added_tokens", tok.get("added_tokens")),
        ("pre_tokenizer type", pre.get("type") != "ByteLevel"),
        ("add_prefix_space", pre.get("add_prefix_space", True)),  # decode could not undo it
        ("post_processor type", post.get("type") != "ByteLevel"),
        ("decoder type", dec.get("type") != "ByteLevel"),
    ] if bad]
    if unsupported:
        raise ValueError(f"{tok_file}: unsupported setting(s): {', '.join(unsupported)}")
    ids = model["vocab"]
    if sorted(ids.values()) != list(range(len(ids))):
        raise ValueError(f"{tok_file}: vocab ids are not 0..{len(ids) - 1}")
    # The ByteLevel decoder reads a token through the byte table when all its chars are in it.
    # The FAST trainer also put chr(0..max) in the alphabet: those decode as their own UTF-8.
    vocab = [b""] * len(ids)
    for s, i in ids.items():
        byte_level = set(s) <= CHAR_TO_BYTE.keys()
        vocab[i] = bytes(CHAR_TO_BYTE[ch] for ch in s) if byte_level else s.encode()
    merges = []
    for m in model["merges"]:
        x, y = m.split(" ") if isinstance(m, str) else m  # "a b" in older files, ["a", "b"] now
        if not {x, y, x + y} <= ids.keys() or vocab[ids[x + y]] != vocab[ids[x]] + vocab[ids[y]]:
            raise ValueError(f"{tok_file}: merge {m!r} does not match the vocab")
        merges.append((ids[x], ids[y], ids[x + y]))
    base = {b: ids[ch] for b, ch in BYTE_TO_CHAR.items() if ch in ids}
    return cls([tuple(v) for v in vocab], merges, base, scale=proc["scale"],
               min_token=proc["min_token"], time_horizon=proc.get("time_horizon"),
               action_dim=proc.get("action_dim"),
               pretokenizer=ByteLevel(pre.get("use_regex", True)))


def load_tokenizer(path):
    """A FAST tokenizer from either file format: an HF directory (`physical-intelligence/fast`,
    openpi's universal tokenizer) or a JSON file written by FASTTokenizer.save."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no FAST tokenizer there (an HF directory or a fast-tokenizer JSON file)")
    return load(path) if os.path.isdir(path) else FASTTokenizer.load(path)
