"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on the corpus.

Every token is a sequence of bytes, so any text — and, with `encode_bytes`, any
byte string, valid UTF-8 or not — round-trips exactly:
`tok.decode(tok.encode(s)) == s` and `tok.decode_bytes(tok.encode_bytes(b)) == b`.
Saved as a standard tokenizer.json that `tokenizers.Tokenizer.from_file` loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def _byte_to_char() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (as in GPT-2).

    Printable Latin-1 bytes map to themselves; the other bytes map, in order,
    to code points from 256 upward.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_to_char()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_SURROGATE_RUN = re.compile("[\udc80-\udcff]+")


class Tokenizer:
    """A thin wrapper over a byte-level BPE `tokenizers.Tokenizer`."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.eot_id = hf.token_to_id(EOT)
        vocab = hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        added = {t.content for t in hf.get_added_tokens_decoder().values()}
        table: list[bytes] = [b""] * self.vocab_size
        for token, idx in vocab.items():
            if token in added:
                table[idx] = token.encode("utf-8")
            else:
                table[idx] = bytes(_CHAR_TO_BYTE[ch] for ch in token)
        self._id_to_bytes = table
        self._single_byte_ids = [hf.token_to_id(_BYTE_TO_CHAR[b]) for b in range(256)]

    # Training / IO --------------------------------------------------------
    @classmethod
    def train(cls, texts: Sequence[str] | Iterable[str], vocab_size: int) -> "Tokenizer":
        if vocab_size < 257 + 1:
            raise ValueError(f"vocab_size must be at least 258 for a byte-level BPE, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        texts = list(texts)
        hf.train_from_iterator(texts, trainer, length=len(texts))
        return cls(hf)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        self.hf.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"no tokenizer at {path}")
        return cls(HFTokenizer.from_file(str(path)))

    # Encoding ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts))]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode any bytes: valid UTF-8 runs with BPE, other bytes as single-byte tokens."""
        text = data.decode("utf-8", errors="surrogateescape")
        ids: list[int] = []
        pos = 0
        for m in _SURROGATE_RUN.finditer(text):
            if m.start() > pos:
                ids.extend(self.encode(text[pos : m.start()]))
            ids.extend(self._single_byte_ids[ord(ch) - 0xDC00] for ch in m.group())
            pos = m.end()
        if pos < len(text):
            ids.extend(self.encode(text[pos:]))
        return ids

    # Decoding ---------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._id_to_bytes
        return b"".join(table[int(i)] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Exact inverse of `encode` (invalid UTF-8 from sampled ids becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self, *, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()):
        """A `flashjax.serving.detokenizer.Detokenizer` for text from ids as they are generated."""
        from flashjax.serving.detokenizer import Detokenizer

        return Detokenizer(self, stop=stop, prompt_ids=prompt_ids)


def encode_documents(tok: Tokenizer, docs: Sequence[str]) -> np.ndarray:
    """All documents as one int32 stream, each followed by the end-of-text token."""
    parts = []
    eot = np.array([tok.eot_id], np.int32)
    for ids in tok.encode_batch(docs):
        parts.append(np.asarray(ids, np.int32))
        parts.append(eot)
    if not parts:
        return np.zeros((0,), np.int32)
    return np.concatenate(parts)
