"""Output processing: sampled ids read back from the device become request
outputs. Stop conditions (end-of-text, stop ids, `max_tokens`, the context
length, stop strings), incremental detokenization (`flashjax.serving.detokenizer`,
O(new tokens) per step) and streaming events, one event per sequence per step
however many tokens the step produced.

A multi-step call or a step dispatched before the previous one was read can
produce tokens past a stop; they are dropped here, so a user never sees a
token after the one that stopped the sequence.
"""

from __future__ import annotations

import collections
import time
from typing import Sequence

from flashjax.serving.detokenizer import Detokenizer
from flashjax.serving.handles import RequestHandle, StreamEvent
from flashjax.serving.scheduler import Request, Scheduler

__all__ = ["OutputProcessor"]


class OutputProcessor:
    """Delivers tokens to requests and finishes them (frees their blocks via the scheduler)."""

    def __init__(self, scheduler: Scheduler, *, tokenizer, eos_id: int | None, max_len: int,
                 counters: collections.Counter, timing: collections.Counter | None = None):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.max_len = int(max_len)
        self.counters = counters
        # host seconds (the engine's host_timing): grammar_consume_s, the matchers' consume_token
        self.timing = collections.Counter() if timing is None else timing
        self.handles: dict[str, RequestHandle] = {}
        self.ttfts: collections.deque = collections.deque(maxlen=10000)
        self.tpots: collections.deque = collections.deque(maxlen=10000)

    def detokenizer(self, req: Request) -> Detokenizer | None:
        if self.tokenizer is None:
            return None
        return Detokenizer(self.tokenizer, stop=req.params.stop, prompt_ids=req.prompt)

    def decode_text(self, ids: Sequence[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(list(ids))

    def first_token(self, handle: RequestHandle, now: float) -> None:
        if handle.first_token_time is None:
            handle.first_token_time = now
            self.ttfts.append(now - handle.arrival)

    def deliver(self, r: Request, tokens: Sequence[int], now: float, logprobs: list | None = None) -> None:
        """Append a sequence's new tokens (in order), stop where it must, stream the rest.
        logprobs: one (logprob, [(id, logprob), ...]) per token, when the request asked."""
        handle = r.group
        self.first_token(handle, now)
        if r.first_token_time is None:
            r.first_token_time = now
        r.last_token_time = now
        p = r.params
        eos = None if p.ignore_eos else self.eos_id
        base = len(r.output)
        accepted: list[int] = []
        reason = None
        m = r.matcher
        for t in tokens:
            t = int(t)
            accepted.append(t)
            n = base + len(accepted)
            if m is not None:
                t0 = time.perf_counter()
                done = not m.consume_token(t) or m.is_stopped()
                self.timing["grammar_consume_s"] += time.perf_counter() - t0
                if done:
                    reason = "stop"  # the grammar is complete (or, never expected, refused the token)
                    break
            if t == eos or t in p.stop_token_ids:
                reason = "stop"
                break
            if n >= p.max_tokens or len(r.prompt) + n >= self.max_len:
                reason = "length"
                break
        delta = ""
        if r.detok is not None:
            # the end-of-text token ends the text; it is not part of it
            shown = accepted[:-1] if accepted and eos is not None and accepted[-1] == eos else accepted
            delta, stopped = r.detok.push(shown)
            if stopped:
                # tokens after the one that completed the stop string are not the user's
                del accepted[max(0, r.detok.num_tokens - base):]
                reason = "stop"
            elif reason is not None:
                delta += r.detok.flush()
        r.output.extend(accepted)
        handle.token_ids[r.index].extend(accepted)
        handle.texts[r.index] += delta
        lps = None
        if logprobs is not None:
            lps = list(logprobs[: len(accepted)])
            handle.logprobs[r.index].extend(lps)
        if reason is not None:
            handle.finish_reasons[r.index] = reason
        handle._emit(StreamEvent(r.index, accepted, delta, reason, lps))
        if reason is not None:
            self.finish_seq(r, reason)
            self.maybe_finish_handle(handle)

    def finish_seq(self, r: Request, reason: str, emit: bool = False) -> None:
        self.scheduler.finish(r, reason)
        if r.first_token_time is not None and len(r.output) > 1:
            self.tpots.append((r.last_token_time - r.first_token_time) / (len(r.output) - 1))
        r.group.finish_reasons[r.index] = r.group.finish_reasons[r.index] or reason
        if emit:
            r.group._emit(StreamEvent(r.index, [], "", reason))

    def maybe_finish_handle(self, handle: RequestHandle) -> None:
        if all(s.finished for s in handle.seqs) and not any(s.fork_pending for s in handle.seqs):
            self.finish_handle(handle)

    def finish_handle(self, handle: RequestHandle) -> None:
        self.counters["finished"] += 1
        self.handles.pop(handle.request_id, None)
        handle._finish()

    def fail_all(self, error: BaseException) -> None:
        for h in list(self.handles.values()):
            h.error = error
            for s in h.seqs:
                if not s.finished:
                    self.finish_seq(s, "error")
            self.finish_handle(h)
