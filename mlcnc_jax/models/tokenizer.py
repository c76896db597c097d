"""CLIP's tokenizer: byte-level BPE over OpenAI's 49,408-token vocabulary, 77-token context.

The same token ids as OpenAI's `clip.tokenize` and open_clip's `SimpleTokenizer` (the
default 'lower' cleaning), without their dependencies (`ftfy`, `regex`, torch):

1. cleaning: open_clip runs `ftfy.fix_text`, then `html.unescape` twice, strips, collapses
   whitespace and lower-cases. Of ftfy's fixes this module keeps those that change clean
   text (quotes, ligatures, full-width forms, control characters, NFC normalisation);
   ftfy's mojibake repair (text decoded with the wrong codec) is left out, so a string
   such as 'cafÃ©' keeps its mojibake here where ftfy would turn it into 'café'.
2. pre-tokenisation: CLIP's pattern (contractions, runs of letters, single digits, runs of
   other non-space characters), with `regex`'s \\p{L} and \\p{N} classes built from
   `unicodedata` for Python's `re`.
3. each piece's UTF-8 bytes as printable characters (`bytes_to_unicode`), '</w>' on its
   last one, merged by the BPE ranks of the vocabulary file; the start and end tokens
   around the whole text; truncated to the context with the end token kept last.

The vocabulary file (clip_vocab/bpe_simple_vocab_16e6.txt.gz) is OpenAI's, MIT License
(clip_vocab/LICENSE); it ships with the package, nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
import sys
import unicodedata
from collections.abc import Sequence

import numpy as np

VOCAB_FILE = os.path.join(os.path.dirname(__file__), "clip_vocab", "bpe_simple_vocab_16e6.txt.gz")
CONTEXT_LENGTH = 77
# The vocabulary: 256 byte characters, the same with '</w>', 48,894 merges, 2 special tokens.
NUM_MERGES = 49152 - 256 - 2
START_TOKEN, END_TOKEN = "<start_of_text>", "<end_of_text>"


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character: printable Latin-1 bytes as themselves, the rest
    (controls, space, ...) shifted to U+0100 onwards, so BPE never sees whitespace."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _ranges(chars: list[int]) -> str:
    # A character class body of the code points, as ranges ('a-z...'), escaped for `re`.
    out, start = [], None
    for i, c in enumerate(chars):
        if start is None:
            start = c
        if i + 1 == len(chars) or chars[i + 1] != c + 1:
            out.append(re.escape(chr(start)) + ("-" + re.escape(chr(c)) if c != start else ""))
            start = None
    return "".join(out)


@functools.lru_cache(maxsize=1)
def _pattern() -> re.Pattern:
    letters, numbers = [], []
    for c in range(sys.maxunicode + 1):
        cat = unicodedata.category(chr(c))
        if cat[0] == "L":
            letters.append(c)
        elif cat[0] == "N":
            numbers.append(c)
    lc, nc = _ranges(letters), _ranges(numbers)
    return re.compile(
        f"{START_TOKEN}|{END_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[{lc}]+|[{nc}]|[^\\s{lc}{nc}]+",
        re.IGNORECASE,
    )


# ftfy's fixes that apply to text without mojibake (ftfy.chardata / ftfy.fixes).
_QUOTES = {0x02BC: "'", **{c: "'" for c in range(0x2018, 0x201C)}}
_QUOTES.update({c: '"' for c in range(0x201C, 0x2020)})
_LIGATURES = {
    c: unicodedata.normalize("NFKC", chr(c))
    for c in (
        0x132,
        0x133,
        0x149,
        *range(0x1C4, 0x1CD),
        *range(0x1F1, 0x1F4),
        *range(0xFB00, 0xFB07),
    )
}
_LIGATURES[0x149] = "\u02bcn"  # 'ŉ' as ftfy spells it (its quote is then uncurled)
_WIDTH = {0x3000: " "}
_WIDTH.update(
    {
        c: unicodedata.normalize("NFKC", chr(c))
        for c in range(0xFF01, 0xFFF0)
        if unicodedata.normalize("NFKC", chr(c)) != chr(c)
    }
)
_CONTROL = dict.fromkeys(
    [
        *range(0x00, 0x09),
        0x0B,
        *range(0x0E, 0x20),
        0x7F,
        *range(0x206A, 0x2070),
        0xFEFF,
        *range(0xFFF9, 0xFFFD),
    ]
)
_TERMINAL_ESCAPE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")


def _fix_text(text: str) -> str:
    # ftfy.fix_text without its encoding repair: repeated until nothing changes, as ftfy does.
    while True:
        before = text
        if "<" not in text:  # ftfy unescapes HTML entities only in text without tags
            text = html.unescape(text)
        text = text.translate(_LIGATURES).translate(_WIDTH).translate(_QUOTES)
        text = _TERMINAL_ESCAPE.sub("", text).translate(_CONTROL)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def clean(text: str) -> str:
    """CLIP's text cleaning: ftfy-like fixes, HTML unescaped, whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer.

    Args:
        vocab_file: the gzipped merges file (default: the one shipped with the package).
        context_length: tokens per text, start and end tokens included (CLIP: 77).

    Raises:
        FileNotFoundError: if the vocabulary file is missing.
    """

    def __init__(self, vocab_file: str = VOCAB_FILE, context_length: int = CONTEXT_LENGTH):
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(
                f"CLIP's BPE vocabulary not found: {vocab_file}. It ships with the package "
                "(mlcnc_jax/models/clip_vocab/); reinstall it (pip install -e .)."
            )
        with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # The first line is a header; the merges follow in rank order.
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [START_TOKEN, END_TOKEN]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.start_token = self.encoder[START_TOKEN]
        self.end_token = self.encoder[END_TOKEN]
        self.vocab_size = len(vocab)
        self.context_length = context_length
        self._cache: dict[str, list[str]] = {START_TOKEN: [START_TOKEN], END_TOKEN: [END_TOKEN]}

    def bpe(self, piece: str) -> list[str]:
        """The vocabulary symbols of one pre-token (already mapped by `bytes_to_unicode`)."""
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            # The adjacent pair merged earliest in training; merge all its occurrences.
            ranked = [
                (self.ranks[p], i) for i, p in enumerate(zip(word, word[1:])) if p in self.ranks
            ]
            if not ranked:
                break
            first, second = word[min(ranked)[1]], word[min(ranked)[1] + 1]
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the start and end tokens."""
        ids = []
        for piece in _pattern().findall(clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(mapped))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids (cleaned text; '</w>' as a space; special tokens as text)."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        # '</w>' is made of byte characters too: decode the bytes, then mark the word ends.
        text = bytearray(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """Token ids [N, context_length] (int32): start, text, end, zeros after.

        A text longer than the context is cut, its last token replaced by the end token,
        as CLIP does; the end token, the largest id, marks where the text's embedding is read.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), np.int32)
        for row, text in enumerate(texts):
            ids = [self.start_token, *self.encode(text), self.end_token]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.end_token
            out[row, : len(ids)] = ids
        return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The tokenizer of the shipped vocabulary (read once)."""
    return ClipTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """CLIP's token ids [N, context_length] of `texts` (see `ClipTokenizer.__call__`)."""
    return default_tokenizer()(texts, context_length)
