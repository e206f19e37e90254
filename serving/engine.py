"""Continuous-batching engine on the paged KV cache.

    engine = Engine(model, tokenizer=tok, num_blocks=512, max_seqs=16, block_size=16)
    handle = engine.add_request(prompt_ids, RequestParams(temperature=0, max_tokens=32))
    engine.run_until_done()            # or engine.start() for a background thread
    handle.result().outputs[0].token_ids

Each `step()`: the scheduler (`flashjax.serving.scheduler`) picks this
iteration's batch (decodes, prefill chunks, admissions, preemptions); the
engine applies forks / swaps, runs ONE jitted function (a chunked prefill of
up to `prefill_rows` rows padded to a chunk bucket, then a decode of all
`max_seqs` slots, each half skipped when empty; sampling with per-row
settings on the device), reads back the sampled ids and the allocator state,
and delivers tokens (handles' queues / callbacks / async iterators).

Compiles are bounded: at most `2 * len(chunk_buckets) + 1` step variants
(prefill only / prefill + decode per bucket, decode only), plus the swap and
copy helpers; `Engine.trace_counts` counts traces.

Threading: `start()` runs steps in a daemon thread while requests exist;
`add_request` / `cancel` are thread-safe (one lock around every mutation).
A cancelled request's slot and blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashjax import kv_cache
from flashjax.serving import runner as R
from flashjax.serving.sampling import GREEDY, SamplingArrays, sample, stack_params
from flashjax.serving.scheduler import BlockManager, Request, RequestParams, RequestStatus, Scheduler

__all__ = ["Engine", "RequestHandle", "CompletionOutput", "SequenceOutput", "StreamEvent",
           "QueueFullError", "RequestParams"]


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound (servers answer 429/503)."""


@dataclasses.dataclass
class StreamEvent:
    index: int  # choice index
    token_ids: list[int]
    text: str
    finish_reason: str | None = None


@dataclasses.dataclass
class SequenceOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    score: float | None = None  # beam search: sum of log-probabilities


@dataclasses.dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[SequenceOutput]
    ttft: float | None
    num_cached_prompt_tokens: int = 0


class RequestHandle:
    """What `Engine.add_request` returns: streams and collects one request's outputs.

    Iterate it (blocking) for `StreamEvent`s, `await handle.result_async()`,
    or use `async for ev in handle.aiter()` from an asyncio loop.
    """

    def __init__(self, engine: "Engine", request_id: str, prompt: list[int], params: RequestParams,
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
        self.events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.cached_prompt_tokens = 0
        self.cancelled = False
        self.error: BaseException | None = None
        self._async: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self.seqs: list[Request] = []

    # engine side
    def _emit(self, ev: StreamEvent | None) -> None:
        self.events.put(ev)
        for loop, q in list(self._async):
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:  # loop closed
                pass
        if ev is not None and self.callback is not None:
            self.callback(ev)

    def _finish(self) -> None:
        if not self._done.is_set():
            self._done.set()
            self._emit(None)

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
                    q.put_nowait(StreamEvent(i, list(self.token_ids[i]), self.texts[i], self.finish_reasons[i]))
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

    def result(self, timeout: float | None = None) -> CompletionOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout}s")
        if self.error is not None:
            raise self.error
        outs = [SequenceOutput(i, list(self.token_ids[i]), self.texts[i], self.finish_reasons[i], self.scores[i])
                for i in range(self.params.n)]
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival
        return CompletionOutput(self.request_id, list(self.prompt), outs, ttft, self.cached_prompt_tokens)

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)


def _pow2_buckets(max_chunk: int, smallest: int = 16) -> tuple[int, ...]:
    out = []
    b = min(smallest, max_chunk)
    while b < max_chunk:
        out.append(b)
        b *= 4
    out.append(max_chunk)
    return tuple(sorted(set(out)))


class Engine:
    """Iteration-level scheduled LLM engine (see the module doc).

    model: a flashjax.models GPT. tokenizer: optional (text, stop strings, eos).
    num_blocks / block_size: the KV pool; max_seqs: batch slots (decode rows).
    max_num_batched_tokens: per-step token budget (decodes count 1 each).
    prefill_rows / max_chunk / chunk_buckets: prefill shape [prefill_rows, bucket].
    preemption_mode: "recompute" or "swap". prefix_caching: reuse cached full blocks.
    max_waiting: bound on queued requests (`QueueFullError` past it; None = unbounded).
    eos_id: end-of-text id (default: the tokenizer's `eot_id`, if any).
    """

    def __init__(self, model, *, tokenizer=None, num_blocks: int = 256, max_seqs: int = 8,
                 block_size: int = 16, max_num_batched_tokens: int = 256, prefill_rows: int = 4,
                 max_chunk: int | None = None, chunk_buckets: Sequence[int] | None = None,
                 preemption_mode: str = "recompute", prefix_caching: bool = True,
                 max_waiting: int | None = None, eos_id: int | None = None, logprobs_k: int = 8,
                 decode_kwargs: dict | None = None):
        self.config = model.config
        self.tokenizer = tokenizer
        self.block_size = R.check_block_size(block_size)
        self.num_blocks = int(num_blocks)
        self.max_seqs = int(max_seqs)
        self.max_blocks_per_seq = -(-self.config.max_seq_len // self.block_size)
        self.max_len = self.config.max_seq_len
        if max_chunk is None:
            max_chunk = min(int(max_num_batched_tokens), 512)
        self.max_chunk = int(max_chunk)
        self.chunk_buckets = tuple(sorted(chunk_buckets)) if chunk_buckets else _pow2_buckets(self.max_chunk)
        if self.chunk_buckets[-1] < self.max_chunk:
            raise ValueError("the largest chunk bucket must be >= max_chunk")
        self.prefill_rows = int(prefill_rows)
        self.logprobs_k = min(int(logprobs_k), self.config.vocab_size)
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eot_id", None)
        self.max_waiting = max_waiting
        self.graphdef, self.params = nnx.split(model)
        self.pages = R.init_pages(self.config, self.num_blocks, self.block_size)
        self.blocks = BlockManager(self.num_blocks, self.max_seqs, self.max_blocks_per_seq, self.block_size,
                                   prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens=max_num_batched_tokens,
                                   prefill_rows=self.prefill_rows, max_chunk=self.max_chunk,
                                   preemption_mode=preemption_mode, preempt=self._preempt, admit=self._admit)
        self.preemption_mode = preemption_mode
        self.trace_counts: collections.Counter = collections.Counter()
        self._decode_kwargs = dict(decode_kwargs or {})
        self._step_fn = jax.jit(self._step_impl, donate_argnums=(1,),
                                static_argnames=("has_prefill", "has_decode"))
        self._gather_fn = jax.jit(self._gather_impl)
        self._scatter_fn = jax.jit(self._scatter_impl, donate_argnums=(0,))
        self._copy_fn = jax.jit(self._copy_impl, donate_argnums=(0,))
        self.handles: dict[str, RequestHandle] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._in_flight = False  # a step's results are being awaited (the lock is released)
        self._deferred_cancels: list[RequestHandle] = []
        self.engine_error: BaseException | None = None
        # counters
        self.stats_counters = collections.Counter()
        self.ttfts: collections.deque = collections.deque(maxlen=10000)
        self.tpots: collections.deque = collections.deque(maxlen=10000)
        self.started = time.monotonic()

    # ------------------------------------------------------------------
    # Jitted pieces
    # ------------------------------------------------------------------
    def _step_impl(self, params, pages, state, pf, dc, *, has_prefill, has_decode):
        self.trace_counts["step"] += 1
        model = nnx.merge(self.graphdef, params)
        out = {}
        status = jnp.asarray(kv_cache.OK, jnp.int32)

        def pick(logits, sp, steps):
            keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t.astype(jnp.uint32)))(
                sp.seed, steps)
            tok = sample(logits, sp, keys)
            lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            top_lp, top_id = jax.lax.top_k(lp, self.logprobs_k)
            tok_lp = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
            return tok, tok_lp, top_lp, top_id.astype(jnp.int32)

        if has_prefill:
            logits, pages, state = R.prefill(model, pages, state, pf["tokens"], pf["seq_ids"], pf["lengths"],
                                             continuation=True)
            status = state.status
            out["prefill"] = pick(logits, pf["sp"], pf["steps"])
        if has_decode:
            logits, pages, state = R.decode(model, pages, state, dc["tokens"], dc["seq_ids"],
                                            decode_kwargs=self._decode_kwargs or None)
            status = jnp.where(status == kv_cache.OK, state.status, status)
            out["decode"] = pick(logits, dc["sp"], dc["steps"])
        state = state.replace(status=status)
        return pages, state, out

    def _gather_impl(self, pages, idx):
        self.trace_counts["swap_out"] += 1
        nb = self.num_blocks
        i = jnp.clip(idx, 0, nb - 1)
        return tuple((k[:, i], v[:, i]) for k, v in pages)

    def _scatter_impl(self, pages, idx, data):
        self.trace_counts["swap_in"] += 1
        nb = self.num_blocks
        i = jnp.where(idx >= 0, idx, nb)
        return tuple((k.at[:, i].set(dk, mode="drop"), v.at[:, i].set(dv, mode="drop"))
                     for (k, v), (dk, dv) in zip(pages, data))

    def _copy_impl(self, pages, src, dst):
        self.trace_counts["copy"] += 1
        return tuple(kv_cache.copy_blocks(k, v, kv_cache.BlockCopy(src, dst)) for k, v in pages)

    def warmup(self) -> None:
        """Compile every step variant now (all-padding batches: nothing is written or allocated)."""
        with self._lock:
            P, S = self.prefill_rows, self.max_seqs
            sp_p, st_p = self._sampling_rows([], P)
            sp_d, st_d = self._sampling_rows([], S)
            dc = dict(tokens=jnp.zeros((S,), jnp.int32), seq_ids=jnp.full((S,), -1, jnp.int32), sp=sp_d,
                      steps=jnp.asarray(st_d))
            variants = [(None, True)]
            for T in self.chunk_buckets:
                pf = dict(tokens=jnp.zeros((P, T), jnp.int32), seq_ids=jnp.full((P,), -1, jnp.int32),
                          lengths=jnp.zeros((P,), jnp.int32), sp=sp_p, steps=jnp.asarray(st_p))
                variants += [(pf, False), (pf, True)]
            for _ in range(2):  # twice: JAX may extend its tracing context after the first compile
                for pf, has_decode in variants:
                    self.pages, state, out = self._step_fn(
                        self.params, self.pages, self.blocks.to_state(), pf, dc if has_decode else None,
                        has_prefill=pf is not None, has_decode=has_decode)
                    jax.block_until_ready(out)

    def num_compiles(self) -> int:
        return sum(self.trace_counts.values())

    # ------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------
    def add_request(self, prompt: Sequence[int], params: RequestParams | None = None, *,
                    request_id: str | None = None, callback=None) -> RequestHandle:
        """Queue a request (thread-safe). Raises ValueError for bad input, QueueFullError when full."""
        params = RequestParams() if params is None else params
        if not isinstance(params, RequestParams):
            raise ValueError(f"params must be a RequestParams, got {type(params).__name__}")
        prompt = [int(t) for t in np.asarray(prompt).reshape(-1).tolist()] if len(prompt) else []
        if not prompt:
            raise ValueError("the prompt is empty: it needs at least one token")
        vocab = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context length is {self.max_len} "
                             f"(prompt + at least one new token must fit)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        if params.beam_width > self.logprobs_k:
            raise ValueError(f"beam_width must be <= {self.logprobs_k} (the engine's logprobs_k)")
        if params.num_seqs > self.max_seqs:
            raise ValueError(f"the request needs {params.num_seqs} sequences; the engine has {self.max_seqs} slots")
        need = -(-min(len(prompt) + params.max_tokens, self.max_len) // self.block_size) + 1
        if need * params.num_seqs > self.num_blocks and need > self.num_blocks:
            raise ValueError(f"the request needs {need} KV blocks; the pool has {self.num_blocks}")
        request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
        with self._lock:
            if request_id in self.handles:
                raise ValueError(f"request id {request_id!r} is already in use")
            if self.max_waiting is not None and self.scheduler.num_waiting >= self.max_waiting:
                self.stats_counters["rejected"] += 1
                raise QueueFullError(f"the queue is full ({self.max_waiting} waiting requests)")
            handle = RequestHandle(self, request_id, prompt, params, callback)
            req = Request(request_id, list(prompt), params, index=0, group=handle)
            req.arrival = handle.arrival
            if params.beam_width > 1:
                req.fork_pending = True
                handle.beam = _BeamState(params.beam_width)
            else:
                req.fork_pending = params.n > 1
            handle.seqs.append(req)
            self.handles[request_id] = handle
            self.scheduler.add(req)
            self.stats_counters["requests"] += 1
            self._wake.notify_all()
        return handle

    def cancel(self, request_id: str) -> bool:
        """Abort a request: its slots and blocks are freed now (or, while a step runs on the
        device, as soon as it returns). False if unknown or finished."""
        with self._lock:
            handle = self.handles.get(request_id)
            if handle is None or handle.finished or (handle.cancelled and self._in_flight):
                return False
            handle.cancelled = True
            if self._in_flight:  # a step is on the device: free the blocks when it returns
                self._deferred_cancels.append(handle)
                self._wake.notify_all()
                return True
            self._cancel_now(handle)
            return True

    def _apply_deferred_cancels(self) -> None:
        while self._deferred_cancels:
            handle = self._deferred_cancels.pop(0)
            if not handle.finished:
                self._cancel_now(handle)

    def _cancel_now(self, handle: RequestHandle) -> None:
        for req in list(handle.seqs):
            if not req.finished:
                self._finish_seq(req, "cancelled", emit=False)
        self.stats_counters["cancelled"] += 1
        self._finish_handle(handle)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self.scheduler.running or self.scheduler.waiting)

    # ------------------------------------------------------------------
    # Scheduler callbacks
    # ------------------------------------------------------------------
    def _release_slots(self, req: Request) -> None:
        if req.slot >= 0:
            self.blocks.release(req.slot)
            req.slot = -1
        for s in req.reserved_slots:
            self.blocks.release(s)
        req.reserved_slots = []
        req.num_cached = 0
        req.hashes = []

    def _preempt(self, req: Request) -> None:
        self.stats_counters["preemptions"] += 1
        req.num_preemptions += 1
        self.scheduler.remove(req)
        handle = req.group
        if handle.params.beam_width > 1:  # a beam group restarts as a whole
            self._restart_beam(handle)
            return
        if self.preemption_mode == "swap" and req.num_cached > 0:
            nblk = -(-req.num_cached // self.block_size)
            idx = np.full((self.max_blocks_per_seq,), -1, np.int32)
            idx[:nblk] = self.blocks.tables[req.slot, :nblk]
            data = jax.device_get(self._gather_fn(self.pages, jnp.asarray(idx)))
            req.swap = (data, req.num_cached)
            self.stats_counters["swap_out"] += 1
            num_cached = req.num_cached
            self._release_slots(req)
            req.num_cached = num_cached
            req.status = RequestStatus.SWAPPED
        else:
            self._release_slots(req)
            req.status = RequestStatus.WAITING
        self.scheduler.requeue_front(req)

    def _admit(self, req: Request, avail: int) -> bool:
        bm = self.blocks
        if req.swap is not None:
            data, num_cached = req.swap
            nblk = -(-num_cached // self.block_size)
            if nblk + 1 > avail:
                return False
            req.slot = bm.take_slot()
            blocks = bm.allocate_exact(req.slot, num_cached)
            idx = np.full((self.max_blocks_per_seq,), -1, np.int32)
            idx[:nblk] = blocks
            self.pages = self._scatter_fn(self.pages, jnp.asarray(idx), data)
            req.swap = None
            req.num_cached = num_cached
            req.hashes = []
            bm.register(req)
            self.stats_counters["swap_in"] += 1
            return True
        ctx = req.context
        hit = bm.match_prefix(ctx)
        n_evictable = sum(1 for b in hit if bm.refcounts[b] == 0)
        hit_len = len(hit) * self.block_size
        need = bm.blocks_for(hit_len, req.pending - hit_len + req.num_cached) + n_evictable
        if need > avail:
            return False
        req.slot = bm.take_slot()
        if req.fork_pending:
            req.reserved_slots = [bm.take_slot(activate=False) for _ in range(req.params.num_seqs - 1)]
        bm.attach(req.slot, hit)
        req.num_cached = hit_len
        req.hashes = []
        bm.register(req)
        if not req.output and req.num_preemptions == 0:
            self.stats_counters["prefix_query_tokens"] += len(req.prompt)
            self.stats_counters["prefix_hit_tokens"] += hit_len
            req.group.cached_prompt_tokens = hit_len
        return True

    # ------------------------------------------------------------------
    # Forks (n > 1, beam search)
    # ------------------------------------------------------------------
    def _apply_copies(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = np.full((self.max_seqs,), -1, np.int32)
        dst = np.full((self.max_seqs,), -1, np.int32)
        for i, (s, d) in enumerate(copies):
            src[i], dst[i] = s, d
        self.pages = self._copy_fn(self.pages, jnp.asarray(src), jnp.asarray(dst))

    def _fork_group(self, leader: Request) -> list[Request]:
        """Split a leader whose prompt is cached (but its last token) into n sequences."""
        handle = leader.group
        children = []
        copies = []
        bm = self.blocks
        for i, slot in enumerate(leader.reserved_slots, start=1):
            bm.activate(slot)
            c = bm.fork(leader.slot, slot)
            if c is not None:
                copies.append(c)
            child = Request(leader.request_id, list(leader.prompt), leader.params, index=i, group=handle)
            child.arrival = leader.arrival
            child.order = leader.order
            child.slot = slot
            child.num_cached = leader.num_cached
            child.hashes = list(leader.hashes)
            child.status = RequestStatus.RUNNING
            children.append(child)
        leader.reserved_slots = []
        leader.fork_pending = False
        self._apply_copies(copies)
        handle.seqs.extend(children)
        self.scheduler.running.extend(children)
        return children

    # ------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------
    def _sampling_rows(self, reqs: list[Request | None], rows: int) -> tuple[SamplingArrays, np.ndarray]:
        params = []
        steps = np.zeros((rows,), np.int32)
        for i in range(rows):
            r = reqs[i] if i < len(reqs) else None
            if r is None or r.params.beam_width > 1:
                params.append(GREEDY)
            else:
                params.append(r.params.sampling(r.index))
            if r is not None:
                steps[i] = len(r.output)
        return stack_params(params, host=True), steps

    def step(self) -> int:
        """Run one iteration. Returns the number of sequences that took part (0 = idle)."""
        with self._lock:
            return self._step_locked()

    def _step_locked(self) -> int:
        plan = self.scheduler.schedule()
        if plan.empty:
            return 0
        bm = self.blocks
        decodes = list(plan.decodes)
        for leader in plan.forks:
            if leader.params.beam_width > 1:
                continue  # beams decode the leader first, then fork on its top tokens
            decodes.extend(self._fork_group(leader))
        prefills = plan.prefills
        # blocks the runner will allocate this step
        need = sum(bm.blocks_for(r.num_cached, c) for r, c in prefills)
        need += sum(bm.blocks_for(r.num_cached, 1) for r in decodes)
        if not bm.ensure_free(need):
            raise RuntimeError(f"scheduler bug: step needs {need} blocks, {bm.num_available} available")

        has_prefill = bool(prefills)
        has_decode = bool(decodes)
        P = self.prefill_rows
        pf = dc = None
        if has_prefill:
            chunk = max(c for _, c in prefills)
            T = next(b for b in self.chunk_buckets if b >= chunk)
            tokens = np.zeros((P, T), np.int32)
            seq_ids = np.full((P,), -1, np.int32)
            lengths = np.zeros((P,), np.int32)
            rows = []
            for i, (r, c) in enumerate(prefills):
                ctx = r.context
                tokens[i, :c] = ctx[r.num_cached: r.num_cached + c]
                seq_ids[i] = r.slot
                lengths[i] = c
                # only a chunk that reaches the end of the context samples
                rows.append(r if r.num_cached + c == r.context_len else None)
            sp, steps = self._sampling_rows(rows, P)
            # numpy inputs: the jitted call transfers them (cheaper than a jnp.asarray each)
            pf = dict(tokens=tokens, seq_ids=seq_ids, lengths=lengths, sp=sp, steps=steps)
        if has_decode:
            S = self.max_seqs
            tokens = np.zeros((S,), np.int32)
            seq_ids = np.full((S,), -1, np.int32)
            rows = [None] * S
            for r in decodes:
                tokens[r.slot] = r.context[-1]
                seq_ids[r.slot] = r.slot
                rows[r.slot] = r
            sp, steps = self._sampling_rows(rows, S)
            dc = dict(tokens=tokens, seq_ids=seq_ids, sp=sp, steps=steps)
        state = bm.to_state(host=True)
        self.pages, state, out = self._step_fn(self.params, self.pages, state, pf, dc,
                                               has_prefill=has_prefill, has_decode=has_decode)
        # The step runs on the device: let other threads (the HTTP server adding
        # requests, streaming, /metrics) take the lock meanwhile. Whatever would
        # change the block tables (a cancel) waits in _deferred_cancels until the
        # device state is back.
        self._in_flight = True
        self._lock.release()
        try:
            host_state, out = jax.device_get((
                dict(block_tables=state.block_tables, lengths=state.lengths, active=state.active,
                     refcounts=state.refcounts, free_stack=state.free_stack, num_free=state.num_free,
                     status=state.status), out))
        finally:
            self._lock.acquire()
            self._in_flight = False
        if int(host_state["status"]) != kv_cache.OK:
            raise RuntimeError(f"KV allocator failed in a step: {kv_cache.status_name(host_state['status'])}")
        bm.from_state(host_state)
        self._apply_deferred_cancels()
        now = time.monotonic()
        self.stats_counters["steps"] += 1
        self.stats_counters["prefill_tokens"] += sum(c for _, c in prefills)
        self.stats_counters["decode_tokens"] += len(decodes)
        self.stats_counters["max_decode_batch"] = max(self.stats_counters["max_decode_batch"], len(decodes))

        beam_groups: dict[int, list] = {}
        if has_prefill:
            tok, tok_lp, top_lp, top_id = out["prefill"]
            for i, (r, c) in enumerate(prefills):
                if r.finished:  # cancelled while the step ran
                    continue
                r.num_cached += c
                bm.register(r)
                if r.num_cached == r.context_len:
                    self._on_token(r, int(tok[i]), now)
        if has_decode:
            tok, tok_lp, top_lp, top_id = out["decode"]
            for r in decodes:
                if r.finished:
                    continue
                r.num_cached += 1
                bm.register(r)
                if r.params.beam_width > 1:
                    beam_groups.setdefault(id(r.group), []).append((r, top_lp[r.slot], top_id[r.slot]))
                else:
                    self._on_token(r, int(tok[r.slot]), now)
        for items in beam_groups.values():
            self._beam_step(items, now)
        return len(decodes) + len(prefills)

    # ------------------------------------------------------------------
    # Tokens, stops, finishing
    # ------------------------------------------------------------------
    def _decode_text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids)

    def _on_token(self, r: Request, token: int, now: float) -> None:
        handle = r.group
        if handle.first_token_time is None:
            handle.first_token_time = now
            self.ttfts.append(now - handle.arrival)
        if r.first_token_time is None:
            r.first_token_time = now
        r.last_token_time = now
        r.output.append(token)
        p = r.params
        reason = None
        if (not p.ignore_eos and self.eos_id is not None and token == self.eos_id) or token in p.stop_token_ids:
            reason = "stop"
        elif len(r.output) >= p.max_tokens or r.context_len >= self.max_len:
            reason = "length"
        text = self._decode_text(r.output) if self.tokenizer is not None else ""
        hold = 0
        if p.stop and self.tokenizer is not None:
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                reason = "stop"
            elif reason is None:
                hold = max(len(s) for s in p.stop) - 1
        if reason is None and text.endswith("\ufffd"):
            hold = max(hold, 1)  # an incomplete UTF-8 sequence: wait for its end
        r.text = text
        new_tokens = r.output[r.sent_tokens:]
        r.sent_tokens = len(r.output)
        upto = len(text) if reason is not None else max(r.sent_text, len(text) - hold)
        delta = text[r.sent_text:upto]
        r.sent_text = upto
        handle.token_ids[r.index] = list(r.output)
        handle.texts[r.index] = text[:upto] if reason is None else text
        if reason is not None:
            handle.finish_reasons[r.index] = reason
        handle._emit(StreamEvent(r.index, new_tokens, delta, reason))
        if reason is not None:
            self._finish_seq(r, reason, emit=False)
            if all(s.finished for s in handle.seqs) and not any(
                    s.fork_pending for s in handle.seqs):
                self._finish_handle(handle)

    def _finish_seq(self, r: Request, reason: str, emit: bool = True) -> None:
        self.scheduler.remove(r)
        self._release_slots(r)
        r.swap = None
        r.status = RequestStatus.FINISHED
        r.finish_reason = reason
        if r.first_token_time is not None and len(r.output) > 1:
            self.tpots.append((r.last_token_time - r.first_token_time) / (len(r.output) - 1))
        r.group.finish_reasons[r.index] = r.group.finish_reasons[r.index] or reason
        if emit:
            r.group._emit(StreamEvent(r.index, [], "", reason))

    def _finish_handle(self, handle: RequestHandle) -> None:
        self.stats_counters["finished"] += 1
        self.handles.pop(handle.request_id, None)
        handle._finish()

    # ------------------------------------------------------------------
    # Beam search
    # ------------------------------------------------------------------
    def _restart_beam(self, handle: RequestHandle) -> None:
        for s in handle.seqs:
            self.scheduler.remove(s)
            self._release_slots(s)
            s.status = RequestStatus.FINISHED
        leader = Request(handle.request_id, list(handle.prompt), handle.params, index=0, group=handle)
        leader.arrival = handle.arrival
        leader.order = handle.seqs[0].order
        leader.fork_pending = True
        leader.num_preemptions = 1
        handle.seqs = [leader]
        handle.beam = _BeamState(handle.params.beam_width)
        self.scheduler.requeue_front(leader)

    def _beam_step(self, items, now: float) -> None:
        """items: (beam, top logprobs, top ids) of one group's live beams, after a decode."""
        handle = items[0][0].group
        W = handle.params.beam_width
        st: _BeamState = handle.beam
        bm = self.blocks
        cands = []
        for r, lps, ids in items:
            for lp, t in zip(lps.tolist(), ids.tolist()):
                cands.append((r.beam_score + lp, r, int(t)))
        cands.sort(key=lambda c: (-c[0], c[1].index, c[2]))
        eos = None if handle.params.ignore_eos else self.eos_id
        stops = set(handle.params.stop_token_ids) | ({eos} if eos is not None else set())
        chosen = []
        for score, r, t in cands:
            if len(chosen) >= W - len(st.finished):
                break
            out = r.output + [t]
            if t in stops:
                st.finished.append((score, out, "stop"))
                if len(st.finished) >= W:
                    break
                continue
            chosen.append((score, r, t))
        if handle.first_token_time is None:
            handle.first_token_time = now
            self.ttfts.append(now - handle.arrival)
        # New beams: a parent's first child takes over its slot, further ones fork it.
        parents = [r for r, _, _ in items]
        used = collections.Counter(id(r) for _, r, _ in chosen)
        for r in parents:
            if used[id(r)] == 0:
                self.scheduler.remove(r)
                self._release_slots(r)
                r.status = RequestStatus.FINISHED
        taken = collections.Counter()
        new_beams = []
        copies = []
        orig = {id(r): list(r.output) for r in parents}
        # slots reserved by the leader are used first
        spare = [s for p in parents for s in p.reserved_slots]
        for p in parents:
            p.reserved_slots = []
        for score, r, t in chosen:
            if taken[id(r)] == 0:
                beam = r
            else:
                slot = spare.pop() if spare else bm.take_slot(activate=False)
                bm.activate(slot)
                c = bm.fork(r.slot, slot)
                if c is not None:
                    copies.append(c)
                beam = Request(r.request_id, list(r.prompt), r.params, index=0, group=handle)
                beam.arrival, beam.order = r.arrival, r.order
                beam.slot = slot
                beam.num_cached = r.num_cached
                beam.hashes = list(r.hashes)
                beam.status = RequestStatus.RUNNING
                self.scheduler.running.append(beam)
            beam.output = orig[id(r)] + [t]
            taken[id(r)] += 1
            beam.beam_score = score
            beam.fork_pending = False
            new_beams.append(beam)
        for s in spare:
            bm.release(s)
        self._apply_copies(copies)
        for b in new_beams:
            b.index = 0
        handle.seqs = [s for s in new_beams]
        done = len(st.finished) >= W or not new_beams
        if not done and len(new_beams[0].output) >= handle.params.max_tokens:
            done = True
        if not done and new_beams[0].context_len >= self.max_len:
            done = True
        if done:
            final = list(st.finished) + [(b.beam_score, list(b.output), "length") for b in new_beams]
            final.sort(key=lambda f: -f[0])
            for b in new_beams:
                self.scheduler.remove(b)
                self._release_slots(b)
                b.status = RequestStatus.FINISHED
            n = handle.params.n
            for i, (score, out, reason) in enumerate(final[:n]):
                handle.token_ids[i] = out
                handle.texts[i] = self._decode_text(out)
                handle.finish_reasons[i] = reason
                handle.scores[i] = score
                handle._emit(StreamEvent(i, out, handle.texts[i], reason))
            self._finish_handle(handle)

    # ------------------------------------------------------------------
    # Driving
    # ------------------------------------------------------------------
    def run_until_done(self, max_steps: int | None = None) -> None:
        steps = 0
        while self.has_unfinished():
            if max_steps is not None and steps >= max_steps:
                raise RuntimeError(f"not done after {max_steps} steps")
            n = self.step()
            steps += 1
            if n == 0 and self.has_unfinished():
                with self._lock:
                    if not self.scheduler.running and self.scheduler.waiting:
                        raise RuntimeError("the engine cannot admit the next waiting request")

    def generate(self, prompts: Sequence[Sequence[int]], params: RequestParams | Sequence[RequestParams] | None = None
                 ) -> list[CompletionOutput]:
        """Add all prompts, run to completion, return their outputs (in order)."""
        if params is None or isinstance(params, RequestParams):
            params = [params] * len(prompts)
        handles = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        if self._thread is None:
            self.run_until_done()
        return [h.result() for h in handles]

    def start(self) -> None:
        """Run steps in a background daemon thread (idle when there is no work)."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="flashjax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not (self.scheduler.running or self.scheduler.waiting):
                    self._wake.wait(0.5)
                if self._stop:
                    return
                try:
                    n = self._step_locked()
                except BaseException as e:  # noqa: BLE001 - fail every open request, keep serving
                    self.engine_error = e
                    self.stats_counters["errors"] += 1
                    for h in list(self.handles.values()):
                        h.error = RuntimeError(f"engine step failed: {e!r}")
                        for s in h.seqs:
                            if not s.finished:
                                self._finish_seq(s, "error", emit=False)
                        self._finish_handle(h)
                    n = 1
            if n == 0:
                time.sleep(0.005)

    # ------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            bm = self.blocks
            c = self.stats_counters
            stored = sum(int(bm.lengths[s]) for s in range(self.max_seqs) if bm.active[s])
            used = bm.num_used
            q = c["prefix_query_tokens"]

            def pct(xs, p):
                return float(np.percentile(np.asarray(xs), p)) if xs else None

            return {
                "running": self.scheduler.num_running,
                "waiting": self.scheduler.num_waiting,
                "swapped": sum(1 for r in self.scheduler.waiting if r.swap is not None),
                "kv_blocks_total": self.num_blocks,
                "kv_blocks_used": used,
                "kv_blocks_free": bm.num_free,
                "kv_blocks_cached": len(bm.evictable),
                "kv_utilization": (stored / (used * self.block_size)) if used else 0.0,
                "prefix_cache_hit_rate": (c["prefix_hit_tokens"] / q) if q else 0.0,
                "prefix_cache_hit_tokens": c["prefix_hit_tokens"],
                "prefix_cache_query_tokens": q,
                "requests_total": c["requests"],
                "requests_finished": c["finished"],
                "requests_cancelled": c["cancelled"],
                "requests_rejected": c["rejected"],
                "preemptions": c["preemptions"],
                "swap_outs": c["swap_out"],
                "steps": c["steps"],
                "prefill_tokens": c["prefill_tokens"],
                "decode_tokens": c["decode_tokens"],
                "ttft_p50": pct(self.ttfts, 50), "ttft_p99": pct(self.ttfts, 99),
                "tpot_p50": pct(self.tpots, 50), "tpot_p99": pct(self.tpots, 99),
                "ttft_mean": float(np.mean(self.ttfts)) if self.ttfts else None,
                "tpot_mean": float(np.mean(self.tpots)) if self.tpots else None,
                "compiles": self.num_compiles(),
            }


class _BeamState:
    def __init__(self, width: int):
        self.width = width
        self.finished: list[tuple[float, list[int], str]] = []
