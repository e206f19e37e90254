"""Grammar-constrained decoding (structured output) with llguidance.

    backend = GrammarBackend(tokenizer, vocab_size=config.vocab_size, eos_id=tok.eot_id)
    grammar = grammar_for_response_format({"type": "json_schema", "json_schema": {"schema": {...}}})
    backend.check(grammar)                      # ValueError naming what is wrong
    m = backend.matcher(grammar)                # one per sequence
    backend.fill(m, mask_row)                   # int32 [ceil(vocab / 32)] bitmask of allowed ids
    backend.fill_rows([(m, i), ...], mask)      # many matchers at once, into rows of mask [rows, words]
    m.consume_token(t)                          # after each sampled token

A request's grammar (`RequestParams.grammar`, an llguidance grammar string) gets a
matcher per sequence (n > 1: one per sample). The device sets the logits of the
tokens outside a constrained row's bitmask to -inf before sampling, so every
sampled token keeps the output inside the grammar.

A mask depends on the token sampled just before it, so a step with constrained rows
runs one decode step, split in two device calls (`StepRunner.forward` / `sample`,
flashjax.serving.step): the engine dispatches the model's forward, then, while the
device runs it, reads back the step before (its tokens advance the matchers), computes
every constrained row's mask in one `fill_rows` call (llguidance's thread pool, the
GIL released) and dispatches the sampling with them. So the host's work for the
masks overlaps the forward, and the next step is planned while this one is in flight
as for other rows. What does not overlap: planning the step and dispatching it (the
device waits for that between two constrained steps, where unconstrained rows
amortise it over K decode steps per call), and whatever host work exceeds the forward.
A row whose sequence stopped in the step read back meanwhile samples a token nobody
receives, with no mask.

llguidance (Microsoft's Rust grammar engine, used by vLLM and SGLang) computes
masks incrementally from a token trie in tens of microseconds per token. It is an
optional dependency (`pip install llguidance`, in the `serve` extra).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

__all__ = ["GrammarBackend", "grammar_for_response_format", "mask_words"]


def mask_words(vocab_size: int) -> int:
    return (int(vocab_size) + 31) // 32


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError("structured output needs llguidance: pip install llguidance "
                          "(or flashjax[serve])") from None
    return llguidance


def grammar_for_response_format(response_format: dict) -> str | None:
    """The llguidance grammar of an OpenAI `response_format` (None for plain text).

    {"type": "text"} -> None; {"type": "json_object"} -> any JSON object;
    {"type": "json_schema", "json_schema": {"schema": {...}, ...}} -> that schema.
    Raises ValueError naming what is malformed.
    """
    if not isinstance(response_format, dict):
        raise ValueError("response_format must be an object like {\"type\": \"json_object\"}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    ll = _llguidance()
    # fixed separators, no free whitespace: a weak model cannot pad the output with
    # whitespace until max_tokens, and the text is the usual compact-ish JSON
    style = {"whitespace_flexible": False}
    if kind == "json_object":
        return ll.grammar_from("json_schema", json.dumps({"type": "object", "x-guidance": style}))
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError("response_format.json_schema must be an object with a 'schema' object")
        schema = dict(spec.get("schema", {"type": "object"}))
        schema.setdefault("x-guidance", style)
        try:
            return ll.grammar_from("json_schema", json.dumps(schema))
        except Exception as e:  # noqa: BLE001 - llguidance's own message says what is wrong
            raise ValueError(f"response_format.json_schema.schema is not supported: {e}") from None
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


class GrammarBackend:
    """llguidance's view of one tokenizer, and matchers for grammars over it."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_id: int | None, threads: int | None = None):
        ll = _llguidance()
        hf = getattr(tokenizer, "hf", None) or getattr(tokenizer, "hf_tokenizer", None)
        if hf is None or not hasattr(hf, "to_str"):
            raise ValueError("structured output needs a tokenizer backed by the `tokenizers` library "
                             f"(got {type(tokenizer).__name__})")
        self.vocab_size = int(vocab_size)
        self.words = mask_words(vocab_size)
        kw = {} if eos_id is None else {"eos_token": int(eos_id)}
        self.tokenizer = ll.LLTokenizer(hf.to_str(), n_vocab=self.vocab_size, **kw)
        self._ll = ll
        # `fill_rows` computes a batch's masks on llguidance's thread pool (GIL released), of
        # `threads` threads (default: 80% of the CPUs this process may use, at most 32, as
        # llguidance's own default); with one thread, in the calling thread instead (a pool of
        # one would only add a hand-off to another thread)
        if threads is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = min(32, max(1, cpus * 4 // 5))
        self.threads = int(threads)
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads!r}")
        self._executor = ll.LLExecutor(self.threads) if self.threads > 1 else None

    def check(self, grammar: str) -> None:
        message = self._ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if message and not message.startswith("WARNING"):
            raise ValueError(f"the grammar is invalid: {message}")

    def matcher(self, grammar: str):
        m = self._ll.LLMatcher(self.tokenizer, grammar)
        if m.is_error():
            raise ValueError(f"the grammar is invalid: {m.get_error()}")
        return m

    def fill(self, matcher, row: np.ndarray) -> None:
        """Write the allowed-token bitmask for the matcher's next token into `row`."""
        assert row.dtype == np.int32 and row.flags["C_CONTIGUOUS"] and row.size == self.words
        matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.size * row.itemsize)

    def fill_rows(self, rows: Sequence[tuple[Any, int]], mask: np.ndarray) -> None:
        """For each (matcher, i) write the matcher's bitmask into mask[i], in one call: the
        executor's threads compute them in parallel, with the GIL released (one row, or one
        thread: in this thread). Rows not named are left as they are; no row may be named
        twice, nor a matcher."""
        if not (mask.dtype == np.int32 and mask.ndim == 2 and mask.flags["C_CONTIGUOUS"]
                and mask.flags["WRITEABLE"] and mask.shape[1] == self.words):
            raise ValueError(f"mask must be a writeable C-contiguous int32 array [rows, {self.words}]")
        rows = [(m, int(i)) for m, i in rows]
        idx = [i for _, i in rows]
        if any(not 0 <= i < mask.shape[0] for i in idx) or len(set(idx)) != len(idx) \
                or len({id(m) for m, _ in rows}) != len(rows):
            raise ValueError(f"fill_rows: rows must be distinct matchers into distinct rows of [0, {mask.shape[0]})")
        if self._executor is None or len(rows) == 1:
            for m, i in rows:
                self.fill(m, mask[i])
        elif rows:
            self._executor.unsafe_compute_mask_ptr(rows, mask.ctypes.data, self.words * 4, mask.shape[0])
