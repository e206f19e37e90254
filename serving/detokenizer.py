"""Incremental detokenization: generated ids in, streamable text out.

    detok = Detokenizer(tokenizer, stop=["\\n\\n"], prompt_ids=prompt)
    for ids in new_ids_per_step:
        delta, stopped = detok.push(ids)    # text that is safe to show now
        send(delta)
        if stopped:
            break
    else:
        send(detok.flush())                 # EOS / length: the text still held back
    detok.text                              # everything, cut before the stop string

This is the one detokenizer of the project: the serving engine, `stream_text`
(`flashjax generate`, `flashjax train-and-sample`) and both tokenizers'
`stream_decoder()` use it. Each push costs
O(new ids) whatever the length of the sequence so far.

Text comes from one of two sources, picked by the tokenizer:

* Byte-level tokenizers (`flashjax.models.tokenizer.Tokenizer`, which has
  `decode_bytes`): every id is a run of bytes and the text is their UTF-8
  decoding, so the bytes go through an incremental UTF-8 decoder. An incomplete
  character at the end stays inside the decoder until its last byte arrives.
  The result is exactly `tokenizer.decode(all ids)`.

* Other tokenizers (`flashjax.models.hf.PretrainedTokenizer`): decoding an id on
  its own can differ from decoding it after others (SentencePiece-style '▁'
  word starts lose their space at the start of a decode; byte-fallback ids only
  form a character together), so a short window of ids is decoded. The window
  is ids[prefix:]; ids[prefix:read] were already turned into text, and their
  decoding `prefix_text` is kept. After a new id, the text it adds is
  decode(ids[prefix:])[len(prefix_text):]. While that text is empty or ends in
  U+FFFD (an incomplete character) the ids stay uncommitted and only the text
  before the trailing U+FFFDs is returned; otherwise the text is committed and
  the window moves on: prefix = read, read = the end. The window is thus the
  ids of the last commit plus those since, so it stays short. `prompt_ids`
  seeds it with the end of the prompt, so the first generated word keeps its
  leading space. If more than `MAX_PENDING` ids in a row never end in a whole
  character, they are not text (invalid bytes): they are committed as they
  decode, U+FFFD included, to keep the window bounded.

Stop strings are handled on top of either source, on the committed text. The
longest end of the not-yet-emitted text that could still grow into a stop
string (a proper prefix of one, so at most len(longest stop) - 1 characters)
is held back; everything before it is emitted. A stop string that appears
later must therefore start inside the held-back text, so each search covers
only the held-back text plus the new text, never the whole output. A stop
string counts as soon as it appears: the sequence ends at the id that completes
the first one, and the text is cut just before the earliest occurrence of any
stop string in the text at that point.
"""

from __future__ import annotations

import codecs
from typing import Sequence

__all__ = ["Detokenizer", "MAX_PENDING", "PROMPT_CONTEXT"]

# Ids of the prompt's end that seed the window (enough for a word start and a
# character split into byte-fallback ids).
PROMPT_CONTEXT = 5
# A character takes at most 4 UTF-8 bytes, so this many ids that still do not
# end in a whole character are invalid bytes, not a character still arriving.
MAX_PENDING = 8

_REPLACEMENT = "\ufffd"


class _ByteText:
    """Text of a byte-level tokenizer: its ids' bytes through an incremental UTF-8 decoder."""

    def __init__(self, tokenizer):
        self._bytes = tokenizer.decode_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self._bytes([token_id]))

    def finish(self) -> str:
        return self._utf8.decode(b"", final=True)


class _WindowText:
    """Text of any tokenizer with `decode(ids)`, from a short window of recent ids (see the module doc)."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int]):
        self._decode = tokenizer.decode
        context = prompt_ids[len(prompt_ids) - PROMPT_CONTEXT:] if len(prompt_ids) > PROMPT_CONTEXT else prompt_ids
        self._ids = [int(i) for i in context]  # the window: ids[prefix:]
        self._read = len(self._ids)  # window[:read] is already text
        self._prefix_text = self._decode(self._ids) if self._ids else ""
        self._shown = 0  # characters after prefix_text already returned from uncommitted ids

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        now = self._decode(self._ids)
        if len(self._ids) - self._read > MAX_PENDING:
            return self._commit(now)
        if now.endswith(_REPLACEMENT):
            # An incomplete character: wait for it, but what comes before it is final.
            start = len(self._prefix_text) + self._shown
            stable = len(now.rstrip(_REPLACEMENT))
            if stable <= start:
                return ""
            self._shown += stable - start
            return now[start:stable]
        if len(now) <= len(self._prefix_text):
            return ""  # nothing yet (an id that shows only with the next one)
        return self._commit(now)

    def finish(self) -> str:
        if len(self._ids) == self._read:
            return ""
        return self._commit(self._decode(self._ids))

    def _commit(self, now: str) -> str:
        """Return the new text and move the window: prefix = read, read = end."""
        new = now[len(self._prefix_text) + self._shown:]
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._shown = 0
        return new


class Detokenizer:
    """Incremental detokenization of one generated sequence, O(new tokens) per push.

    tokenizer: a `flashjax.models.tokenizer.Tokenizer` (byte-level) or a
    `flashjax.models.hf.PretrainedTokenizer` (anything with `decode(ids)`).
    stop: strings that end the sequence; the text is cut before the earliest one.
    prompt_ids: the prompt, whose last few ids give the first generated ids their
    context (a SentencePiece word's leading space); the prompt's own text is never
    part of the output. Byte-level tokenizers need no context and ignore it.

    With no stop strings, all deltas plus `flush()` equal `tokenizer.decode(ids)`
    of all pushed ids (for a window tokenizer given prompt_ids: the text those ids
    add after the prompt), and so does `text`. With stop strings, they equal the
    text of the first `num_tokens` ids cut before the earliest stop string in it.
    No delta ends inside a character.

    num_tokens: ids consumed; once stopped, the ids up to and including the one
    that completed the stop string (later ids of that push are not consumed).
    """

    def __init__(self, tokenizer, *, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()):
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.stop = stop
        self._max_hold = max((len(s) for s in stop), default=1) - 1
        if hasattr(tokenizer, "decode_bytes"):
            self._source = _ByteText(tokenizer)
        else:
            self._source = _WindowText(tokenizer, prompt_ids)
        # A model's vocabulary is often padded past its tokenizer's: ids the tokenizer
        # does not know have no text (they would crash its decode).
        vocab = getattr(tokenizer, "vocab_size", None)
        self._vocab = int(vocab) if isinstance(vocab, int) and vocab > 0 else None
        self.num_tokens = 0
        self._emitted: list[str] = []  # deltas handed out so far
        self._held = ""  # committed text not emitted yet (could start a stop string)
        self._stopped = False
        self._flushed = False

    @property
    def stopped(self) -> bool:
        """True once a stop string has appeared."""
        return self._stopped

    @property
    def text(self) -> str:
        """The whole text so far (cut at the stop string once stopped).

        Includes text held back for a possible stop string, not an incomplete
        character. Joining costs O(len(text)); stream with the deltas instead.
        """
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return (self._emitted[0] if self._emitted else "") + self._held

    def push(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Add newly generated ids. Returns (delta, stopped).

        delta is the new text that is safe to stream now; stopped is True once a
        stop string has appeared (the text is then cut before the stop string,
        delta includes everything up to that cut, ids after the one that
        completed it are not consumed, and further pushes return ("", True)).
        """
        if self._stopped:
            return "", True
        if self._flushed:
            raise RuntimeError("push() after flush(): the sequence has ended")
        out: list[str] = []
        for token_id in token_ids:
            self.num_tokens += 1
            token_id = int(token_id)
            if token_id < 0 or (self._vocab is not None and token_id >= self._vocab):
                continue
            piece = self._source.add(token_id)
            if piece and self._take(piece, out, final=False):
                break
        delta = "".join(out)
        if delta:
            self._emitted.append(delta)
        return delta, self._stopped

    def flush(self) -> str:
        """The sequence ended for another reason (EOS, length, ...): return the text still held back.

        That is the text kept for a possible stop string and, if the ids ended
        inside a character, its U+FFFD. Returns "" once stopped or flushed.
        """
        if self._stopped or self._flushed:
            return ""
        self._flushed = True
        out: list[str] = []
        self._take(self._source.finish(), out, final=True)
        delta = "".join(out)
        if delta:
            self._emitted.append(delta)
        return delta

    def _take(self, piece: str, out: list[str], *, final: bool) -> bool:
        """Add committed text; append what may be emitted to `out`. True if a stop string appeared."""
        held = self._held + piece
        if self.stop:
            # Any new occurrence starts inside `held` (see the module doc), and the
            # smallest start over all stop strings is the earliest occurrence.
            starts = [i for i in (held.find(s) for s in self.stop) if i >= 0]
            if starts:
                out.append(held[: min(starts)])
                self._held = ""
                self._stopped = True
                return True
        keep = 0 if final else self._could_start_stop(held)
        out.append(held[: len(held) - keep])
        self._held = held[len(held) - keep:]
        return False

    def _could_start_stop(self, held: str) -> int:
        """Length of the longest end of `held` that is a proper prefix of a stop string."""
        for k in range(min(len(held), self._max_hold), 0, -1):
            tail = held[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
