"""What the engine hands back for a request: a handle that streams and collects
its outputs (blocking iteration, callbacks, asyncio), and the output records.

The engine thread fills a handle (`_emit`, `_finish`); any thread or event
loop reads it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from typing import Callable

from flashjax.serving.scheduler import Request, RequestParams

__all__ = ["RequestHandle", "StreamEvent", "SequenceOutput", "CompletionOutput", "QueueFullError"]


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound (servers answer 429/503)."""


@dataclasses.dataclass
class StreamEvent:
    index: int  # choice index
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    # per token, when the request asked for logprobs: (logprob, [(alternative id, logprob), ...])
    logprobs: list | None = None


@dataclasses.dataclass
class SequenceOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    score: float | None = None  # beam search: sum of log-probabilities
    logprobs: list | None = None  # per token (logprob, [(id, logprob), ...]) when asked for


@dataclasses.dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[SequenceOutput]
    ttft: float | None
    num_cached_prompt_tokens: int = 0


class _LoopPost:
    """Hands items from the engine thread to an asyncio loop with one wake-up per burst.

    A step delivers to hundreds of handles at once; waking the loop once per item
    (`call_soon_threadsafe` writes to its self-pipe every time) costs a system call
    and a loop iteration each. Items posted while a wake-up is pending join it."""

    _lock = threading.Lock()
    _pending: dict[asyncio.AbstractEventLoop, list] = {}

    @classmethod
    def post(cls, loop: asyncio.AbstractEventLoop, fn, arg) -> None:
        with cls._lock:
            items = cls._pending.get(loop)
            if items is not None:
                items.append((fn, arg))
                return
            cls._pending[loop] = [(fn, arg)]
        try:
            loop.call_soon_threadsafe(cls._run, loop)
        except RuntimeError:  # loop closed: nobody to deliver to
            with cls._lock:
                cls._pending.pop(loop, None)

    @classmethod
    def _run(cls, loop: asyncio.AbstractEventLoop) -> None:
        with cls._lock:
            items = cls._pending.pop(loop, [])
        for fn, arg in items:
            fn(arg)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class RequestHandle:
    """What `Engine.add_request` returns: streams and collects one request's outputs.

    Iterate it (blocking) for `StreamEvent`s, `await handle.wait_async()` then `result()`,
    or use `async for ev in handle.aiter()` from an asyncio loop.
    """

    def __init__(self, engine, request_id: str, prompt: list[int], params: RequestParams,
                 callback: Callable[[StreamEvent], None] | None):
        self.engine = engine
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.callback = callback
        n = params.n
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.texts = ["" for _ in range(n)]
        self.finish_reasons: list[str | None] = [None] * n
        self.scores: list[float | None] = [None] * n
        self.logprobs: list[list] = [[] for _ in range(n)]
        self.events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.cached_prompt_tokens = 0
        self.cancelled = False
        self.error: BaseException | None = None
        self._async: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._done_futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._futures_lock = threading.Lock()
        self.seqs: list[Request] = []

    # engine side
    def _emit(self, ev: StreamEvent | None) -> None:
        self.events.put(ev)
        for loop, q in list(self._async):
            _LoopPost.post(loop, q.put_nowait, ev)
        if ev is not None and self.callback is not None:
            self.callback(ev)

    def _finish(self) -> None:
        if not self._done.is_set():
            self._done.set()
            self._emit(None)
            with self._futures_lock:
                waiting = list(self._done_futures)
            for loop, fut in waiting:
                _LoopPost.post(loop, _resolve, fut)

    # user side
    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def __iter__(self):
        while True:
            ev = self.events.get()
            if ev is None:
                return
            yield ev

    def aiter(self):
        """An async iterator of events; call from the event loop that consumes it."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        # replay what is already there
        with self.engine._lock:
            for i in range(self.params.n):
                if self.token_ids[i] or self.finish_reasons[i]:
                    lps = list(self.logprobs[i]) if self.params.logprobs is not None else None
                    q.put_nowait(StreamEvent(i, list(self.token_ids[i]), self.texts[i], self.finish_reasons[i], lps))
            if self._done.is_set():
                q.put_nowait(None)
            else:
                self._async.append((loop, q))

        async def gen():
            while True:
                ev = await q.get()
                if ev is None:
                    return
                yield ev
        return gen()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    async def wait_async(self) -> None:
        """Wait for the request to finish from an asyncio loop (no polling: the engine
        thread wakes the loop once, when the request is done)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._futures_lock:
            if self._done.is_set():
                return
            self._done_futures.append((loop, fut))
        try:
            await fut
        finally:
            with self._futures_lock:
                try:
                    self._done_futures.remove((loop, fut))
                except ValueError:
                    pass

    def result(self, timeout: float | None = None) -> CompletionOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout}s")
        if self.error is not None:
            raise self.error
        lp = self.params.logprobs is not None
        outs = [SequenceOutput(i, list(self.token_ids[i]), self.texts[i], self.finish_reasons[i], self.scores[i],
                               list(self.logprobs[i]) if lp else None)
                for i in range(self.params.n)]
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival
        return CompletionOutput(self.request_id, list(self.prompt), outs, ttft, self.cached_prompt_tokens)

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)
