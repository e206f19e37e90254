"""Requests, host-side block bookkeeping and the iteration-level scheduler.

The engine (`flashjax.serving.engine`) runs one *step* at a time; before each
step `Scheduler.schedule()` decides, from scratch, which sequences take part:

* every running sequence whose whole context but its last token is cached
  decodes one token;
* sequences still prefilling get a chunk of their remaining context (chunked
  prefill), oldest first, within the per-step token budget
  (`max_num_batched_tokens`, decodes count 1 each) and the prefill rows;
* waiting requests are admitted (first come, first served) into free slots
  while budget, rows and KV blocks last; a prompt whose leading full blocks are
  in the prefix cache starts with those blocks attached (no prefill for them);
* if the KV blocks the decodes need are not there, the newest running
  sequences are preempted (recompute: blocks freed, the sequence goes back to
  the front of the queue and re-prefills prompt + generated tokens later;
  swap: its pages are copied to host memory and copied back on resume).

Sequences join and leave the batch at every step (Orca-style iteration-level
scheduling); shapes stay fixed (the engine pads to its row counts and chunk
buckets), so nothing recompiles per request.

The scheduler owns the engine's block pool (`flashjax.serving.blocks`):
admission, prefix-cache attachment, n > 1 forks and preemption change the pool
here and are reported in the returned `SchedulePlan`; the engine applies
their device side (page swaps and copies) and runs the step. It has no
callbacks into the engine.

Steps in flight: the engine dispatches step n + 1 before it reads step n's
sampled tokens. A sequence's `inflight` counts the tokens sampled by
dispatched steps that the host has not read yet; they count as context for
`pending` (a decoding sequence stays ready to decode: its next input token is
on the device) and against `max_tokens`. A plan that would need a preemption
is only made with nothing in flight (`schedule(allow_preempt=False)` answers
`blocked`).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import math
import numbers
import time
from typing import Any

import numpy as np

from flashjax.serving.blocks import BlockManager, block_hashes  # noqa: F401 (re-exported)
from flashjax.serving.sampling import INT32_MAX, MAX_SEED, SamplingParams, validate_sampling

__all__ = ["RequestParams", "Request", "RequestStatus", "BlockManager", "Scheduler", "SchedulePlan",
           "block_hashes"]


# --------------------------------------------------------------------------
# Request parameters
# --------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class RequestParams:
    """Per-request generation settings (validated on construction; ValueError names the field).

    temperature/top_k/top_p/seed: as `flashjax.serving.sampling.SamplingParams`.
    max_tokens: most new tokens (>= 1).
    stop: strings that end generation (need a tokenizer; not included in the text).
    stop_token_ids: token ids that end generation (included in the tokens).
    ignore_eos: keep going past the engine's end-of-text token.
    n: independent samples of the prompt (they share its KV blocks, fork + copy-on-write);
       sample i uses seed + i.
    beam_width: > 1 runs beam search of that width instead of sampling (greedy
       scores: sum of log-probabilities); returns `n` best beams (n <= beam_width).
    logprobs: None, or return each token's log-probability and the `logprobs` most
       likely alternatives (0..MAX_LOGPROBS). Log-probabilities are of the model's
       distribution after penalties and logit_bias, before temperature / top-k / top-p.
       Rows that ask for them decode one step per device call.
    presence_penalty / frequency_penalty: in [-2, 2], OpenAI's meaning: the logit of a
       token already generated drops by presence + frequency * (times generated).
    logit_bias: {token id: bias in [-100, 100]} (at most MAX_LOGIT_BIAS), added to the logits.
    grammar: None, or an llguidance grammar the output must follow (structured output;
       `flashjax.serving.guided.grammar_for_response_format` builds one from an OpenAI
       `response_format`). Needs an engine with a tokenizer and llguidance installed.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    beam_width: int = 1
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Any = ()
    grammar: str | None = None

    def __post_init__(self):
        # Every int here ends up in an int32 (seed: uint32) device array: each must fit, or a
        # request would crash the engine's step instead of being refused (the message starts
        # with the field's name).
        validate_sampling(self.temperature, self.top_k, self.top_p, self.seed)
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX:
            raise ValueError(f"max_tokens must be an integer in [1, 2**31), got {self.max_tokens!r}")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids)
        if not all(_is_int(t) and 0 <= t <= INT32_MAX for t in ids):
            raise ValueError(f"stop_token_ids must be integers in [0, 2**31), got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if not _is_int(self.n) or not 1 <= self.n <= INT32_MAX:
            raise ValueError(f"n must be an integer in [1, 2**31), got {self.n!r}")
        if not _is_int(self.beam_width) or not 1 <= self.beam_width <= INT32_MAX:
            raise ValueError(f"beam_width must be an integer in [1, 2**31), got {self.beam_width!r}")
        if self.beam_width > 1 and self.n > self.beam_width:
            raise ValueError(f"n ({self.n}) must be <= beam_width ({self.beam_width}) for beam search")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        bias = self.logit_bias
        items = list(bias.items()) if isinstance(bias, dict) else list(bias)
        if len(items) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(items)}")
        clean = []
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}")
            t, b = item
            if isinstance(t, str) and t.strip().lstrip("-").isdigit():
                t = int(t)  # JSON object keys are strings
            if not _is_int(t) or not 0 <= t <= INT32_MAX:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
            if not isinstance(b, numbers.Real) or isinstance(b, bool) or not math.isfinite(b) or not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {t}")
            clean.append((int(t), float(b)))
        object.__setattr__(self, "logit_bias", tuple(sorted(dict(clean).items())))
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar):
            raise ValueError(f"grammar must be a non-empty llguidance grammar string or None, got {self.grammar!r}")
        if self.grammar is not None and self.beam_width > 1:
            raise ValueError("grammar cannot be combined with beam search (beam_width > 1)")

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def sampling(self, index: int = 0) -> SamplingParams:
        return SamplingParams(temperature=float(self.temperature), top_k=int(self.top_k),
                              top_p=float(self.top_p), seed=(int(self.seed) + index) % (MAX_SEED + 1))

    @property
    def num_seqs(self) -> int:
        """Slots the request needs at once."""
        return self.beam_width if self.beam_width > 1 else self.n


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
MAX_LOGIT_BIAS = 300

_SEQ_COUNTER = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence the scheduler runs (a request with n > 1 becomes n of these after its fork)."""

    request_id: str
    prompt: list[int]
    params: RequestParams
    index: int = 0  # choice index within its group
    group: Any = None  # the engine's handle (collects outputs, delivers events)
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    order: int = dataclasses.field(default_factory=lambda: next(_SEQ_COUNTER))
    status: RequestStatus = RequestStatus.WAITING
    slot: int = -1
    output: list[int] = dataclasses.field(default_factory=list)  # tokens the host has read back
    inflight: int = 0  # tokens sampled by dispatched steps whose values the host has not read yet
    num_cached: int = 0  # tokens whose K/V are in the cache or written by a dispatched step
    hashes: list[int] = dataclasses.field(default_factory=list)  # keys of its cached full blocks
    fork_pending: bool = False  # n > 1: fork into n sequences once the prompt is cached
    reserved_slots: list[int] = dataclasses.field(default_factory=list)  # for its fork
    swap: Any = None  # (host pages, num_cached) while swapped out
    finish_reason: str | None = None
    cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    beam_score: float = 0.0
    detok: Any = None  # the output processor's incremental detokenizer
    consts: Any = None  # the device step's per-sequence constants (sampling settings, stop ids)
    counts_slot: int = -1  # the slot whose device token counts (penalties) belong to this sequence
    logprobs: list = dataclasses.field(default_factory=list)  # per output token, when asked for
    matcher: Any = None  # structured output: the grammar matcher (flashjax.serving.guided)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.output

    @property
    def context_len(self) -> int:
        """Known tokens: the prompt and the outputs read back so far."""
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens (known or in flight) not yet written to the cache (1 = ready to decode)."""
        return self.context_len + self.inflight - self.num_cached

    def decode_room(self, max_len: int) -> int:
        """How many more tokens the sequence may still be asked to sample."""
        total = self.context_len + self.inflight
        return max(0, min(self.params.max_tokens - len(self.output) - self.inflight, max_len - total))

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


# --------------------------------------------------------------------------
# Scheduler
# --------------------------------------------------------------------------


@dataclasses.dataclass
class SchedulePlan:
    """One step's work, and what the scheduler changed to make room for it.

    The engine applies the device side of the bookkeeping changes in this order
    before it dispatches the step: `swap_out` (copy these blocks to the host:
    they are free now and may be reused by this very step), `swap_in` (fill
    these fresh blocks from `req.swap`), `copies` (copy-on-write of forked
    partial blocks).
    """

    decodes: list[Request] = dataclasses.field(default_factory=list)
    prefills: list[tuple[Request, int]] = dataclasses.field(default_factory=list)  # (request, chunk tokens)
    preempted: list[Request] = dataclasses.field(default_factory=list)
    forked: list[tuple[Request, list[Request]]] = dataclasses.field(default_factory=list)  # leader, children
    beam_forks: list[Request] = dataclasses.field(default_factory=list)  # beam leaders ready to decode
    restarted: list[Request] = dataclasses.field(default_factory=list)  # new leaders of preempted beam groups
    swap_out: list[tuple[Request, np.ndarray]] = dataclasses.field(default_factory=list)  # (request, blocks)
    swap_in: list[tuple[Request, list[int]]] = dataclasses.field(default_factory=list)
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (src block, dst block)
    admitted: list[Request] = dataclasses.field(default_factory=list)
    blocked: bool = False  # the decodes need blocks only a preemption could free (not allowed)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Decides each step's batch and keeps the block pool in step with it (module doc).

    It owns `blocks` (a `BlockManager`): admission, prefix-cache attachment,
    forks and preemption happen here and are reported in the plan; it never
    calls back into the engine, so it can be driven and tested alone.
    """

    def __init__(self, blocks: BlockManager, *, max_num_batched_tokens: int, prefill_rows: int,
                 max_chunk: int, max_len: int, preemption_mode: str = "recompute",
                 counters: collections.Counter | None = None):
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {preemption_mode!r}")
        self.blocks = blocks
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.prefill_rows = int(prefill_rows)
        self.max_chunk = int(max_chunk)
        self.max_len = int(max_len)
        self.preemption_mode = preemption_mode
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.counters: collections.Counter = collections.Counter() if counters is None else counters

    # -- queues ------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def requeue_front(self, req: Request) -> None:
        """Preempted sequences go back ahead of newer arrivals (ordered by arrival)."""
        items = list(self.waiting)
        items.append(req)
        items.sort(key=lambda r: (r.status is not RequestStatus.SWAPPED and r.num_preemptions == 0, r.order))
        self.waiting = collections.deque(items)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        try:
            self.waiting.remove(req)
        except ValueError:
            pass

    def release(self, req: Request) -> None:
        """Give back a sequence's slot(s) and blocks (keyed blocks stay cached)."""
        bm = self.blocks
        if req.slot >= 0:
            bm.release(req.slot)
            req.slot = -1
        for s in req.reserved_slots:
            bm.release(s)
        req.reserved_slots = []
        req.num_cached = 0
        req.inflight = 0
        req.hashes = []

    def finish(self, req: Request, reason: str) -> None:
        """Take a sequence out for good (stopped, cancelled, failed)."""
        self.remove(req)
        self.release(req)
        req.swap = None
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- admission and preemption ---------------------------------------------------
    def _preempt(self, req: Request, plan: SchedulePlan) -> None:
        self.counters["preemptions"] += 1
        req.num_preemptions += 1
        plan.preempted.append(req)
        if req.params.beam_width > 1:  # a beam group restarts as a whole
            group = [s for s in self.running if s.group is req.group] + [req]
            for s in group:
                self.remove(s)
                self.release(s)
                s.status = RequestStatus.FINISHED
            leader = Request(req.request_id, list(req.prompt), req.params, index=0, group=req.group)
            leader.arrival = req.arrival
            leader.order = min(s.order for s in group)
            leader.fork_pending = True
            leader.num_preemptions = 1
            plan.restarted.append(leader)
            self.requeue_front(leader)
            return
        self.remove(req)
        # penalties count a sequence's tokens on the device, per slot: those resume by recompute
        if self.preemption_mode == "swap" and req.num_cached > 0 and not req.params.uses_penalties:
            nblk = -(-req.num_cached // self.blocks.block_size)
            plan.swap_out.append((req, self.blocks.tables[req.slot, :nblk].copy()))
            num_cached = req.num_cached
            self.release(req)
            req.num_cached = num_cached
            req.swap = (None, num_cached)  # the engine fills in the pages
            req.status = RequestStatus.SWAPPED
            self.counters["swap_out"] += 1
        else:
            self.release(req)
            req.status = RequestStatus.WAITING
        self.requeue_front(req)

    def _admit(self, req: Request, avail: int, plan: SchedulePlan) -> bool:
        bm = self.blocks
        if req.swap is not None:
            _, num_cached = req.swap
            nblk = -(-num_cached // bm.block_size)
            if nblk + 1 > avail:
                return False
            req.slot = bm.take_slot()
            plan.swap_in.append((req, bm.allocate_exact(req.slot, num_cached)))
            req.num_cached = num_cached
            req.hashes = []
            bm.register(req)
            self.counters["swap_in"] += 1
            return True
        ctx = req.context
        hit = bm.match_prefix(ctx)
        n_evictable = sum(1 for b in hit if bm.refcounts[b] == 0)
        hit_len = len(hit) * bm.block_size
        need = bm.blocks_for(hit_len, req.pending - hit_len + req.num_cached) + n_evictable
        if req.fork_pending:
            need += (req.params.num_seqs - 1) * 2  # its fork, once the prompt is cached
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
            self.counters["prefix_query_tokens"] += len(req.prompt)
            self.counters["prefix_hit_tokens"] += hit_len
            req.cached_prompt_tokens = hit_len
        return True

    def _fork(self, leader: Request, plan: SchedulePlan) -> list[Request]:
        """Split a leader whose prompt is cached (but its last token) into n sequences."""
        bm = self.blocks
        children = []
        for i, slot in enumerate(leader.reserved_slots, start=1):
            bm.activate(slot)
            c = bm.fork(leader.slot, slot)
            if c is not None:
                plan.copies.append(c)
            child = Request(leader.request_id, list(leader.prompt), leader.params, index=i, group=leader.group)
            child.arrival = leader.arrival
            child.order = leader.order
            child.slot = slot
            child.num_cached = leader.num_cached
            child.hashes = list(leader.hashes)
            child.status = RequestStatus.RUNNING
            children.append(child)
        leader.reserved_slots = []
        leader.fork_pending = False
        self.running.extend(children)
        plan.forked.append((leader, children))
        return children

    def _room(self, length: int, free_blocks: int) -> int:
        """Most tokens a sequence of `length` can grow by with `free_blocks` new blocks."""
        bs = self.blocks.block_size
        in_last = (-length) % bs
        return in_last + free_blocks * bs

    def _fork_reserve(self, r: Request) -> int:
        """Blocks a decoding sequence may take beyond its own growth this step: the forks of
        an n > 1 / beam leader (each child copies the partial last block and may grow past
        it), or a live beam's share of the next beam step's forks (one partial-block copy)."""
        if r.fork_pending:
            return (r.params.num_seqs - 1) * 2
        return 1 if r.params.beam_width > 1 else 0

    def _decodable(self, r: Request) -> bool:
        return r.pending == 1 and r.decode_room(self.max_len) > 0

    # -- the plan ----------------------------------------------------------------
    def schedule(self, *, allow_preempt: bool = True) -> SchedulePlan:
        """This step's batch. With allow_preempt=False a plan that would need a preemption
        comes back `blocked` and nothing is changed (the engine first reads back the steps
        in flight, then asks again)."""
        bm = self.blocks
        plan = SchedulePlan()
        running = sorted(self.running, key=lambda r: r.order)

        def decode_need(rs):
            need = 0
            for r in rs:
                if self._decodable(r):
                    need += bm.blocks_for(r.num_cached, 1) + self._fork_reserve(r)
            return need

        # 1. Decodes (and pending forks); preempt the newest while blocks are short.
        while running and decode_need(running) > bm.num_available:
            if not allow_preempt:
                return SchedulePlan(blocked=True)
            self._preempt(running[-1], plan)  # newest
            running = sorted(self.running, key=lambda r: r.order)
        decodes = []
        for r in running:
            if not self._decodable(r):
                continue
            if r.fork_pending and r.params.beam_width > 1:
                plan.beam_forks.append(r)  # beams decode the leader first, then fork on its top tokens
            elif r.fork_pending:
                decodes.extend(self._fork(r, plan))
            decodes.append(r)
        # blocks this step's decodes take (forks done above already took their copies)
        committed = sum(bm.blocks_for(r.num_cached, 1) + self._fork_reserve(r) for r in decodes)
        budget = self.max_num_batched_tokens - len(decodes)

        # 2. Chunked prefill of running sequences, oldest first.
        prefills: list[tuple[Request, int]] = []

        def take_chunk(r: Request) -> None:
            nonlocal committed, budget
            want = r.pending - (1 if r.fork_pending else 0)
            c = min(want, budget, self.max_chunk, self._room(r.num_cached, bm.num_available - committed))
            if c > 0:
                prefills.append((r, c))
                committed += bm.blocks_for(r.num_cached, c)
                budget -= c

        for r in running:
            if r.pending <= 1 or len(prefills) >= self.prefill_rows or budget <= 0:
                continue
            take_chunk(r)

        # 3. Admit waiting requests (FCFS) into free slots.
        while self.waiting and budget > 0 and len(prefills) < self.prefill_rows:
            r = self.waiting[0]
            if r in plan.preempted:
                break  # not back in the step that preempted it
            need_slots = r.params.num_seqs if r.fork_pending else 1
            if len(bm.free_slots) < need_slots:
                break
            if not self._admit(r, bm.num_available - committed, plan):
                break
            self.waiting.popleft()
            r.status = RequestStatus.RUNNING
            self.running.append(r)
            plan.admitted.append(r)
            if r.pending == 1:  # swapped-in, or fully cached but the last token
                committed += bm.blocks_for(r.num_cached, 1) + self._fork_reserve(r)
                if r.fork_pending and r.params.beam_width > 1:
                    plan.beam_forks.append(r)
                elif r.fork_pending:
                    kids = self._fork(r, plan)
                    decodes.extend(kids)
                    budget -= len(kids)
                decodes.append(r)
                budget -= 1
                continue
            take_chunk(r)
        if not decodes and not prefills and self.running and not plan.preempted and allow_preempt:
            # Nothing fits: free room by preempting the newest (never the only one).
            cands = sorted(self.running, key=lambda r: r.order)
            if len(cands) > 1 and not any(r.inflight for r in cands):
                self._preempt(cands[-1], plan)
        plan.decodes = decodes
        plan.prefills = prefills
        return plan
