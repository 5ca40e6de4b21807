"""CLIP's byte-level BPE tokenizer (docs/method.md §1).

- Text is cleaned (ftfy, HTML unescape, whitespace collapse, lower case), split into words.
- Each word's UTF-8 bytes map to printable characters, merged with the ranked BPE merges
  of `bpe_simple_vocab_16e6.txt.gz` (shipped with this package).
- `tokenize` adds the start (49406) and end (49407) ids and pads with zeros to the context.
"""
import functools
import gzip
import html
import os
from typing import List, Union

import ftfy
import regex
import torch

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


@functools.lru_cache()
def byte_to_char() -> dict:
    """{byte: char}: a reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the others (control bytes, space, ...)
    map to code points from 256 upwards,
    so a BPE token never contains whitespace or control chars.
    The dict's order (printable bytes first, then the rest) is the order of the first 256
    vocabulary entries.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def clean(text: str) -> str:
    """Text -> text: ftfy repair, HTML unescape, whitespace collapsed, lower case.

    Unescaped twice, for double-escaped text.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer:
    """Text <-> BPE token ids, in CLIP's vocabulary of 49408 entries."""

    def __init__(self, bpe_path: str = BPE_PATH):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # line 0 is a version header; CLIP uses the first 49152 - 256 - 2 merges
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        chars = list(byte_to_char().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.cache = {SOT: SOT, EOT: EOT}
        self.pattern = regex.compile(  # the special tokens, contractions, letters, digits, other
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
            r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE)
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]

    def bpe(self, word: str) -> str:
        """One byte-mapped word -> its BPE tokens, space-joined (cached)."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]  # the last symbol carries the word end
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of `best`, left to right
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        out = " ".join(parts)
        self.cache[word] = out
        return out

    def encode(self, text: str) -> List[int]:
        """Text -> token ids, without the start and end tokens."""
        b2c = byte_to_char()
        ids = []
        for word in self.pattern.findall(clean(text)):
            mapped = "".join(b2c[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[tok] for tok in self.bpe(mapped).split(" "))
        return ids

    def decode(self, ids: List[int]) -> str:
        """Token ids -> text; each word end becomes a space."""
        c2b = {c: b for b, c in byte_to_char().items()}
        text = "".join(self.decoder[i] for i in ids)
        text = bytearray(c2b[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")


@functools.lru_cache()
def get_tokenizer() -> SimpleTokenizer:
    """The package's one SimpleTokenizer, built at the first call."""
    return SimpleTokenizer()


def tokenize(texts: Union[str, List[str]], context_length: int = 77,
             truncate: bool = True) -> torch.LongTensor:
    """N texts -> token ids (N, context_length), zero padded: [SOT] + bpe(text) + [EOT].

    A text longer than the context keeps its first context_length - 1 ids and ends with EOT,
    so the pooled position (argmax of the ids) is always the last slot.
    truncate=False: such a text raises a ValueError naming it instead.
    """
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot_id] + tok.encode(text) + [tok.eot_id]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text {i} has {len(ids)} tokens, more than the context length "
                                 f"{context_length}: {text[:80]!r}")
            ids = ids[:context_length - 1] + [tok.eot_id]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def token_count(text: str) -> int:
    """Text -> its token count with the start and end tokens.

    `tokenize` cuts a text whose count exceeds the context.
    """
    return len(get_tokenizer().encode(text)) + 2
