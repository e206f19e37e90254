"""Continuous-batching engine on the paged KV cache.

    engine = Engine(model, tokenizer=tok, num_blocks=512, max_seqs=16, block_size=16)
    handle = engine.add_request(prompt_ids, RequestParams(temperature=0, max_tokens=32))
    engine.run_until_done()            # or engine.start() for a background thread
    handle.result().outputs[0].token_ids

Data flows one way, each job in its own module:

    server -> Engine.add_request -> Scheduler.schedule (scheduler.py; owns the host
    block pool, blocks.py) -> plan -> StepRunner.run (step.py: one jitted call on
    the device) -> sampled ids -> OutputProcessor.deliver (output.py: stops,
    detokenizer.py, streaming) -> RequestHandle (handles.py)

Beam search is `beam.py`. This module holds the loop that drives them.

Asynchronous scheduling: `step()` plans and dispatches step n + 1 *before* it
reads step n's sampled tokens, so the host's work (planning, building the
inputs, detokenizing, streaming) runs while the device computes. The tokens a
dispatched step samples stay on the device as the next step's inputs; the host
counts them per sequence (`Request.inflight`) until it reads them one step
later. A sequence that stopped in step n has already been given a row in step
n + 1: that row is wasted and its token dropped; nobody receives it.
Preemption, swaps and beam search are planned with nothing in flight (the
engine reads the step in flight back first).

Structured output (`flashjax.serving.guided`): a step with grammar rows is one
decode step dispatched in two calls, the model's forward and then the sampling
with the rows' token masks. Between the two, while the device runs the forward,
the engine reads back the step in flight (its tokens advance the grammar
matchers) and computes the masks, all rows in one call to llguidance's thread
pool. So grammar rows overlap the host like other rows, except that every step
is planned and dispatched on its own (no multi-step calls).

Multi-step decode: when no prefill is planned and no waiting request could be
admitted, one call runs up to `decode_steps` (K, default 8) decode steps on
the device, each row stopping at its end-of-text / stop ids / `max_tokens`.
The host's per-call cost is then paid once per K tokens. A call contains no
data-dependent control flow (the K steps are a fixed-trip-count loop; sampling
picks its top-k/top-p path statically), so XLA never makes the dispatching
thread wait for the device and the host really overlaps it. K = 8 keeps streaming
smooth: at 1.5 ms per step (llama-1b, batch 64, H200) a stream receives a
chunk every ~12 ms; new arrivals wait at most one call before they are
admitted.

KV ownership: the host block pool is the only allocator the engine uses.
Blocks for every token a call will write are given out before it is
dispatched; the call receives block tables and lengths as inputs and returns
only sampled ids. (The one-jit `flashjax.serving.generate` loop keeps the
on-device functional allocator, `flashjax.kv_cache`.)

Compiles are bounded: `2 * len(chunk_buckets) + 2 * len(table_buckets)` step
variants (prefill per chunk bucket with and without a decode step; one decode
step and K decode steps per block-table width: decode-only calls pass the
tables cut to a power-of-two bucket of the longest row, from 16 blocks up, as
the decode kernel sizes its grid from the table width), plus the swap and copy
helpers; `Engine.trace_counts` counts traces. Calls with a top-k / top-p row
use a variant with a vocabulary sort, compiled on first use (`warmup()` compiles
the others). Steps with grammar rows compile, on first use, a forward per
one-step variant they stand for (as many model compiles as those) and small
model-free sampling calls (`flashjax.serving.step`).

Threading: `start()` runs steps in a daemon thread while requests exist;
`add_request` / `cancel` are thread-safe (one lock around every mutation;
released while the engine waits for the device). A cancelled request's slots
and blocks are freed at once: a step still in flight that writes to them runs
before any later step that reuses them (the device runs calls in order).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from typing import Any, Sequence

import jax
import numpy as np

from flashjax.serving import runner as R
from flashjax.serving import step as S
from flashjax.serving.beam import BeamState, beam_step
from flashjax.serving.blocks import BlockManager
from flashjax.serving.handles import (CompletionOutput, QueueFullError, RequestHandle, SequenceOutput,
                                      StreamEvent)
from flashjax.serving.output import OutputProcessor
from flashjax.serving.scheduler import Request, RequestParams, Scheduler, SchedulePlan

__all__ = ["Engine", "RequestHandle", "CompletionOutput", "SequenceOutput", "StreamEvent",
           "QueueFullError", "RequestParams"]

log = logging.getLogger("flashjax.serving")


def _pow2_buckets(max_chunk: int, smallest: int = 16) -> tuple[int, ...]:
    out = []
    b = min(smallest, max_chunk)
    while b < max_chunk:
        out.append(b)
        b *= 4
    out.append(max_chunk)
    return tuple(sorted(set(out)))


class _PlanError(RuntimeError):
    """A plan the host cannot carry out (nothing was dispatched): its requests fail, the engine goes on."""

    def __init__(self, message: str, seqs: list):
        super().__init__(message)
        self.seqs = seqs


@dataclasses.dataclass
class _Dispatched:
    """A step on the device whose sampled ids the host has not read yet."""

    out: dict | None  # None while a split step waits for its masks (`forward` set)
    prefills: list[tuple[Request, int, bool]]  # (sequence, row, samples)
    decodes: list[tuple[Request, int, int]]  # (sequence, slot, steps)
    sync: bool  # read back at once (beam search: the next step is planned on these tokens)
    forward: S.Forward | None = None  # a step with grammar rows: the model half, dispatched
    guided: list[Request] = dataclasses.field(default_factory=list)  # its rows that need a mask
    filtered: bool = False  # sampling needs the top-k / top-p variant


class Engine:
    """Iteration-level scheduled LLM engine (see the module doc).

    model: a flashjax.models GPT. tokenizer: optional (text, stop strings, eos).
    num_blocks / block_size: the KV pool; max_seqs: batch slots (decode rows).
    max_num_batched_tokens: per-step token budget (decodes count 1 each).
    prefill_rows / max_chunk / chunk_buckets: prefill shape [prefill_rows, bucket].
    preemption_mode: "recompute" or "swap". prefix_caching: reuse cached full blocks.
    max_waiting: bound on queued requests (`QueueFullError` past it; None = unbounded).
    eos_id: end-of-text id (default: the tokenizer's `eot_id`, if any).
    decode_steps: most decode steps per device call when nothing waits for prefill (K).
    overlap: dispatch step n + 1 before reading step n (False: read each step at once).
    grammar_threads: CPU threads computing a step's structured-output masks together
      (default: 80% of the CPUs, at most 32; 1: one after another in the engine's thread).
    kv_cache_dtype: the KV pages' dtype: None / "auto" (the model's compute dtype),
      "bf16", "fp16", "fp32", or "fp8" (float8_e4m3fn with one float32 scale per
      token and KV head: half the bytes of bf16 per block, so about twice the
      tokens in the same memory; see `flashjax.kv_cache`). Other values: ValueError.
    """

    def __init__(self, model, *, tokenizer=None, num_blocks: int = 256, max_seqs: int = 8,
                 block_size: int = 16, max_num_batched_tokens: int = 256, prefill_rows: int = 4,
                 max_chunk: int | None = None, chunk_buckets: Sequence[int] | None = None,
                 preemption_mode: str = "recompute", prefix_caching: bool = True,
                 max_waiting: int | None = None, eos_id: int | None = None, logprobs_k: int = 8,
                 decode_kwargs: dict | None = None, decode_steps: int = 8, overlap: bool = True,
                 kv_cache_dtype: str | None = None, grammar_threads: int | None = None):
        self.config = model.config
        self.kv_cache_dtype = R.cache_dtype(self.config, kv_cache_dtype)  # checked before anything is built
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
        if int(decode_steps) < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps!r}")
        self.decode_steps = int(decode_steps)
        self.overlap = bool(overlap)
        self.prefill_rows = int(prefill_rows)
        # widths (in blocks) of the block tables a decode-only call is compiled for
        self.table_buckets = tuple(sorted({min(self.max_blocks_per_seq, 16 << i)
                                           for i in range(max(1, self.max_blocks_per_seq.bit_length()))}))
        self.logprobs_k = min(int(logprobs_k), self.config.vocab_size)
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eot_id", None)
        self.max_waiting = max_waiting
        self.stats_counters: collections.Counter = collections.Counter()
        self.blocks = BlockManager(self.num_blocks, self.max_seqs, self.max_blocks_per_seq, self.block_size,
                                   prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens=max_num_batched_tokens,
                                   prefill_rows=self.prefill_rows, max_chunk=self.max_chunk,
                                   max_len=self.max_len, preemption_mode=preemption_mode,
                                   counters=self.stats_counters)
        self.runner = S.StepRunner(model, num_blocks=self.num_blocks, max_seqs=self.max_seqs,
                                   block_size=self.block_size, max_blocks_per_seq=self.max_blocks_per_seq,
                                   logprobs_k=self.logprobs_k, decode_kwargs=decode_kwargs,
                                   kv_cache_dtype=self.kv_cache_dtype)
        # host seconds spent planning, dispatching, waiting for the device, delivering; of
        # these, structured output's share: grammar_mask_s (llguidance computing the allowed-
        # token bitmasks, inside dispatch_s) and grammar_consume_s (matchers advancing on the
        # sampled tokens, inside deliver_s)
        self.host_timing: collections.Counter = collections.Counter()
        self.output = OutputProcessor(self.scheduler, tokenizer=tokenizer, eos_id=self.eos_id,
                                      max_len=self.max_len, counters=self.stats_counters,
                                      timing=self.host_timing)
        self.handles = self.output.handles
        self.trace_counts = self.runner.trace_counts
        self._slots = S.SlotBatch(self.max_seqs, self.max_blocks_per_seq)
        self._inflight: collections.deque[_Dispatched] = collections.deque()
        self._grammar = None  # flashjax.serving.guided.GrammarBackend, built for the first grammar
        if grammar_threads is not None and int(grammar_threads) < 1:
            raise ValueError(f"grammar_threads must be at least 1, got {grammar_threads!r}")
        self.grammar_threads = grammar_threads
        self._bias_rows: dict[int, tuple] = {}  # slot -> logit_bias its device row holds (absent: none)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.engine_error: BaseException | None = None
        self.started = time.monotonic()

    # ------------------------------------------------------------------
    # Compatibility views
    # ------------------------------------------------------------------
    @property
    def preemption_mode(self) -> str:
        return self.scheduler.preemption_mode

    @preemption_mode.setter
    def preemption_mode(self, mode: str) -> None:
        self.scheduler.preemption_mode = mode

    @property
    def pages(self):
        return self.runner.pages

    @pages.setter
    def pages(self, value) -> None:
        self.runner.pages = value

    @property
    def ttfts(self):
        return self.output.ttfts

    @property
    def tpots(self):
        return self.output.tpots

    def num_compiles(self) -> int:
        return sum(self.trace_counts.values())

    def warmup(self, *, compile_threads: int | None = None) -> None:
        """Compile every step variant now (all-padding inputs: nothing is written).

        compile_threads > 1: the variants are traced one after another, then compiled
        side by side in that many threads (XLA compiles with the GIL released). On an
        H200 that compiled llama-7b's 16 variants in 67 s instead of 200 s, but the
        saturation run right after it served 6,042 tok/s against 8,029 in an earlier
        sequential run: concurrent compiles also autotune their GEMMs concurrently, on
        a busy GPU, which may pick slower kernels; not yet separated from run-to-run
        variance, so the default stays one at a time (1)."""
        with self._lock:
            self._drain()
            empty = S.SlotBatch(self.max_seqs, self.max_blocks_per_seq).arrays()
            variants = []
            for w in self.table_buckets:
                cut = dict(empty, tables=empty["tables"][:, :w])
                variants += [(cut, None, 1), (cut, None, self.decode_steps)]
            for T in self.chunk_buckets:
                pf = S.PrefillBatch(self.prefill_rows, T).arrays()
                variants += [(empty, pf, 0), (empty, pf, 1)]
            threads = 1 if compile_threads is None else int(compile_threads)
            if threads > 1 and len(variants) > 1:
                lowered = [self.runner.lower(slots, pf, steps=steps) for slots, pf, steps in variants]
                with concurrent.futures.ThreadPoolExecutor(min(threads, len(lowered))) as pool:
                    list(pool.map(lambda low: low.compile(), lowered))
            for _ in range(2):  # twice: JAX may extend its tracing context after the first compile
                for slots, pf, steps in variants:
                    jax.block_until_ready(self.runner.run(slots, pf, steps=steps))

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
        if params.top_k > vocab:
            raise ValueError(f"top_k must be <= the vocabulary size {vocab} (0 = no limit), got {params.top_k}")
        badstop = [t for t in params.stop_token_ids if t >= vocab]
        if badstop:
            raise ValueError(f"stop_token_ids: {badstop[0]} is outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        if params.beam_width > self.logprobs_k:
            raise ValueError(f"beam_width must be <= {self.logprobs_k} (the engine's logprobs_k)")
        if params.num_seqs > self.max_seqs:
            raise ValueError(f"the request needs {params.num_seqs} sequences; the engine has {self.max_seqs} slots")
        need = -(-min(len(prompt) + params.max_tokens, self.max_len) // self.block_size) + 1
        if need * params.num_seqs > self.num_blocks and need > self.num_blocks:
            raise ValueError(f"the request needs {need} KV blocks; the pool has {self.num_blocks}")
        if params.grammar is not None:
            self._grammar_backend().check(params.grammar)
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
            req.fork_pending = params.beam_width > 1 or params.n > 1
            if params.beam_width > 1:
                handle.beam = BeamState(params.beam_width)
            else:
                req.detok = self.output.detokenizer(req)
            if params.grammar is not None:
                req.matcher = self._grammar.matcher(params.grammar)
            handle.seqs.append(req)
            self.handles[request_id] = handle
            self.scheduler.add(req)
            self.stats_counters["requests"] += 1
            self._wake.notify_all()
        return handle

    def _grammar_backend(self):
        """The structured-output backend for this engine's tokenizer (built on first use)."""
        if self._grammar is None:
            if self.tokenizer is None:
                raise ValueError("grammar (structured output) needs an engine with a tokenizer")
            from flashjax.serving.guided import GrammarBackend

            self._grammar = GrammarBackend(self.tokenizer, vocab_size=self.config.vocab_size, eos_id=self.eos_id,
                                           threads=self.grammar_threads)
        return self._grammar

    def cancel(self, request_id: str) -> bool:
        """Abort a request: its slots and blocks are freed now. False if unknown or finished."""
        with self._lock:
            handle = self.handles.get(request_id)
            if handle is None or handle.finished:
                return False
            handle.cancelled = True
            for req in list(handle.seqs):
                if not req.finished:
                    self.output.finish_seq(req, "cancelled")
            self.stats_counters["cancelled"] += 1
            self.output.finish_handle(handle)
            return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_work

    # ------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------
    def step(self) -> int:
        """Plan and dispatch one step, and read back the one before it (with `overlap`).
        Returns the number of sequences in the step dispatched (0 = nothing to dispatch)."""
        with self._lock:
            return self._step_locked()

    def _step_locked(self) -> int:
        t0 = time.perf_counter()
        plan = self.scheduler.schedule(allow_preempt=not self._inflight)
        if plan.blocked or (plan.empty and self._inflight):
            # a preemption is due, or every sequence waits for tokens in flight:
            # read the steps in flight back, then plan again
            self._drain()
            plan = self.scheduler.schedule(allow_preempt=True)
        self._apply(plan)
        if plan.empty:
            self._drain()
            return 0
        t1 = time.perf_counter()
        try:
            d = self._dispatch(plan)
        except _PlanError as e:  # never expected: fail this step's requests alone and keep serving
            log.error("engine: %s; failing the %d requests of this step", e, len({id(r.group) for r in e.seqs}))
            self.stats_counters["failed_steps"] += 1
            for handle in {id(r.group): r.group for r in e.seqs}.values():
                handle.error = RuntimeError(f"the engine could not run this request's step: {e}")
                for r in handle.seqs:
                    if not r.finished:
                        self.output.finish_seq(r, "error")
                self.output.finish_handle(handle)
            return 0
        self.host_timing["plan_s"] += t1 - t0
        self.host_timing["dispatch_s"] += time.perf_counter() - t1
        if d.forward is not None:
            # Grammar rows: the model's forward is on the device now. Meanwhile the steps in
            # flight are read back (their tokens advance the matchers), then the masks are
            # computed and the sampling half is dispatched.
            self._drain()
            t2 = time.perf_counter()
            self._sample_guided(d)
            self.host_timing["dispatch_s"] += time.perf_counter() - t2
        self._inflight.append(d)
        keep = 1 if self.overlap and not d.sync else 0
        while len(self._inflight) > keep:
            self._collect(self._inflight.popleft())
        return len(plan.decodes) + len(plan.prefills)

    def _drain(self) -> None:
        while self._inflight:
            self._collect(self._inflight.popleft())

    def _apply(self, plan: SchedulePlan) -> None:
        """The device side and the handles' side of the plan's bookkeeping changes."""
        for req, blocks in plan.swap_out:
            req.swap = (self.runner.swap_out(blocks), req.swap[1])
        for req, blocks in plan.swap_in:
            self.runner.swap_in(blocks, req.swap[0])
            req.swap = None
        self.runner.copy_blocks(plan.copies)
        for leader in plan.restarted:
            handle = leader.group
            handle.seqs = [leader]
            handle.beam = BeamState(handle.params.beam_width)
        for leader, children in plan.forked:
            for c in children:
                c.detok = self.output.detokenizer(c)
                if c.params.grammar is not None:
                    c.matcher = self._grammar.matcher(c.params.grammar)
            leader.group.seqs.extend(children)
        for r in plan.admitted:
            if r.num_preemptions == 0 and not r.output:
                r.group.cached_prompt_tokens = r.cached_prompt_tokens

    def _dispatch(self, plan: SchedulePlan) -> _Dispatched:
        bm = self.blocks
        prefills, decodes = plan.prefills, plan.decodes
        beams = any(r.params.beam_width > 1 for r in decodes)
        guided = [r for r in decodes if r.matcher is not None] + \
            [r for r, c in prefills if r.matcher is not None and r.num_cached + c == r.context_len]
        multi = (not prefills and not beams and not guided and self.decode_steps > 1
                 and not any(r.params.logprobs is not None for r in decodes)
                 and not (self.scheduler.waiting and bm.free_slots))
        steps = [1] * len(decodes)  # decode steps per row, aligned with `decodes`
        if multi:
            steps = [min(self.decode_steps, r.decode_room(self.max_len)) for r in decodes]
            multi_need = sum(bm.blocks_for(r.num_cached, k) for r, k in zip(decodes, steps))
            if max(steps) <= 1 or not bm.ensure_free(multi_need):  # no prefill here: decodes only
                multi = False
                steps = [1] * len(decodes)
        need = sum(bm.blocks_for(r.num_cached, c) for r, c in prefills)
        need += sum(bm.blocks_for(r.num_cached, k) for r, k in zip(decodes, steps))
        if not bm.ensure_free(need):
            raise _PlanError(f"the step needs {need} KV blocks, {bm.num_available} are available",
                             [r for r, _ in prefills] + list(decodes))

        sl = self._slots
        ints = sl.ints
        ints[:, S.LENGTH] = bm.lengths  # before this step's growth
        ints[:, S.ACTIVE] = bm.active
        ints[:, S.N_STEPS] = 0
        ints[:, S.USE_HOST] = 0
        ints[:, S.RESET] = 0
        pf_arrays = None
        pf_rows = []
        if prefills:
            chunk = max(c for _, c in prefills)
            T = next(b for b in self.chunk_buckets if b >= chunk)
            pf = S.PrefillBatch(self.prefill_rows, T)
            for i, (r, c) in enumerate(prefills):
                self._set_consts(r)
                pf.tokens[i, :c] = r.context[r.num_cached: r.num_cached + c]
                samples = r.num_cached + c == r.context_len
                pf.meta[i] = (r.slot, c, samples, len(r.output), len(r.prompt))
                bm.grow(r.slot, c)
                r.num_cached += c
                bm.register(r)
                if samples:
                    r.inflight += 1
                pf_rows.append((r, i, samples))
            pf_arrays = pf.arrays()
        dc_rows = []
        for r, k in zip(decodes, steps):
            s = r.slot
            self._set_consts(r)
            ints[s, S.N_STEPS] = k
            ints[s, S.STEP0] = len(r.output) + r.inflight
            if r.inflight == 0:  # the input token is known here (else it is the device's last_tok)
                ints[s, S.USE_HOST] = 1
                ints[s, S.HOST_TOK] = r.output[-1] if r.output else r.prompt[-1]
            bm.grow(s, k)
            r.num_cached += k
            r.inflight += k
            dc_rows.append((r, s, k))
        sl.tables[:] = bm.tables
        n_steps = (self.decode_steps if multi else 1) if decodes else 0
        arrays = sl.arrays()
        if not prefills:
            # Decode-only calls see block tables cut to a bucket of the longest row: the
            # decode kernel sizes its grid and KV splits from the table's width.
            widest = max(-(-int(bm.lengths[r.slot]) // self.block_size) for r in decodes)
            width = next(w for w in self.table_buckets if w >= widest)
            arrays["tables"] = arrays["tables"][:, :width]
        # top-k / top-p need a sort of the vocabulary: a variant of its own (compiled on first use)
        filtered = any(r.consts[0][S.TOP_K - S.TOP_K] > 0 or r.consts[1][S.TOP_P] < 1
                       for r in itertools.chain(decodes, (r for r, _ in prefills)))
        if guided:  # the model half now; `_sample_guided` dispatches the sampling with the masks
            fwd, out = self.runner.forward(arrays, pf_arrays, decode=bool(decodes)), None
        else:
            fwd, out = None, self.runner.run(arrays, pf_arrays, steps=n_steps, filtered=filtered)
        c = self.stats_counters
        c["steps"] += 1
        c["device_calls"] += 1
        c["device_decode_steps"] += n_steps  # decode iterations on the device (K per multi-step call)
        c["prefill_tokens"] += sum(x for _, x in prefills)
        c["decode_tokens"] += sum(k for _, _, k in dc_rows)
        c["max_decode_batch"] = max(c["max_decode_batch"], len(decodes))
        if multi:
            c["multi_step_calls"] += 1
        return _Dispatched(out, pf_rows, dc_rows, beams, fwd, guided, filtered)

    def _sample_guided(self, d: _Dispatched) -> None:
        """Compute the masks of a split step's grammar rows (their matchers have consumed every
        token read back so far: nothing of theirs is in flight) and dispatch its sampling."""
        t0 = time.perf_counter()
        mask = np.full((self.max_seqs, self._grammar.words), -1, np.int32)
        # a row whose sequence stopped in the step just read back samples a token nobody
        # receives: no mask for it (all ids allowed)
        rows = [(r.matcher, r.slot) for r in d.guided if not r.finished]
        self._grammar.fill_rows(rows, mask)
        self.host_timing["grammar_mask_s"] += time.perf_counter() - t0
        self.stats_counters["grammar_masks"] += len(rows)
        d.out = self.runner.sample(d.forward, mask, filtered=d.filtered)
        d.forward = None

    def _set_consts(self, r: Request) -> None:
        if r.consts is None:
            r.consts = S.sequence_constants(r.params, r.index, self.eos_id)
        s = r.slot
        self._slots.ints[s, S.CONST_COLS] = r.consts[0]
        self._slots.floats[s] = r.consts[1]
        if r.counts_slot != s:  # the slot's token counts (penalties) start over with this sequence
            self._slots.ints[s, S.RESET] = 1
            r.counts_slot = s
        bias = r.params.logit_bias
        if self._bias_rows.get(s, ()) != bias:  # rare: only when logit_bias is used
            self.runner.set_bias(s, bias)
            self._bias_rows[s] = bias

    def _collect(self, d: _Dispatched) -> None:
        """Read a dispatched step's sampled ids back and deliver them (lock released while waiting)."""
        assert d.out is not None, "a split step is read back before its sampling was dispatched"
        t0 = time.perf_counter()
        self._lock.release()
        try:
            host = jax.device_get(d.out)
        finally:
            self._lock.acquire()
        now = time.monotonic()
        t1 = time.perf_counter()
        self.host_timing["wait_s"] += t1 - t0
        try:
            self._deliver(d, host, now)
        finally:
            self.host_timing["deliver_s"] += time.perf_counter() - t1

    def _deliver(self, d: _Dispatched, host: dict, now: float) -> None:
        bm = self.blocks
        out = self.output
        if d.prefills:
            tok = host["prefill"]
            for r, i, samples in d.prefills:
                if r.finished:
                    continue
                if samples:
                    r.inflight -= 1
                    lp = self._logprobs(r, host, "pf_", i)
                    out.deliver(r, [int(tok[i])], now, lp)
        groups: dict[int, list] = {}
        if d.decodes:
            toks = host["decode"]
            for r, s, k in d.decodes:
                if r.finished:
                    continue
                r.inflight -= k
                if r.params.beam_width > 1:
                    W = r.params.beam_width
                    groups.setdefault(id(r.group), []).append((r, host["top_lp"][s][:W], host["top_id"][s][:W]))
                    continue
                col = toks[:k, s]
                n = int(np.argmax(col < 0)) if (col < 0).any() else k
                out.deliver(r, col[:n].tolist(), now, self._logprobs(r, host, "", s))
                if not r.finished:
                    bm.register(r)
        for items in groups.values():
            for r, _, _ in items:
                bm.register(r)
            beam_step(items, now, scheduler=self.scheduler, runner=self.runner, output=out, max_len=self.max_len)

    @staticmethod
    def _logprobs(r: Request, host: dict, prefix: str, row: int) -> list | None:
        n = r.params.logprobs
        if n is None:
            return None
        ids = host[prefix + "top_id"][row][:n].tolist()
        lps = host[prefix + "top_lp"][row][:n].tolist()
        return [(float(host[prefix + "tok_lp"][row]), list(zip(ids, lps)))]

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
                    if not self.scheduler.running and self.scheduler.waiting and not self._inflight:
                        raise RuntimeError("the engine cannot admit the next waiting request")
        with self._lock:
            self._drain()  # steps still in flight hold only finished sequences' rows

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
                while not self._stop and not (self.scheduler.has_work or self._inflight):
                    self._wake.wait(0.5)
                if self._stop:
                    try:
                        self._drain()
                    except BaseException:  # noqa: BLE001 - stopping anyway
                        pass
                    return
                try:
                    n = self._step_locked()
                except BaseException as e:  # noqa: BLE001 - fail every open request, report the engine dead
                    log.exception("engine step failed; failing every open request")
                    self.engine_error = e
                    self.stats_counters["errors"] += 1
                    self._inflight.clear()
                    self.output.fail_all(RuntimeError(f"engine step failed: {e!r}"))
                    n = 1
            if n == 0 and not self._inflight:
                time.sleep(0.002)

    # ------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            bm = self.blocks
            c = self.stats_counters
            stored = int(bm.lengths[bm.active].sum())
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
                "multi_step_calls": c["multi_step_calls"],
                "prefill_tokens": c["prefill_tokens"],
                "decode_tokens": c["decode_tokens"],
                "grammar_masks": c["grammar_masks"],
                "ttft_p50": pct(self.ttfts, 50), "ttft_p99": pct(self.ttfts, 99),
                "tpot_p50": pct(self.tpots, 50), "tpot_p99": pct(self.tpots, 99),
                "ttft_mean": float(np.mean(self.ttfts)) if self.ttfts else None,
                "tpot_mean": float(np.mean(self.tpots)) if self.tpots else None,
                "compiles": self.num_compiles(),
                "host_seconds": {k: round(v, 4) for k, v in self.host_timing.items()},
            }
