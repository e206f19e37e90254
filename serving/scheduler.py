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

`BlockManager` mirrors the functional allocator's state
(`flashjax.kv_cache.KVCacheState`) in numpy. The engine hands it to the jitted
step as a `KVCacheState` (the runner allocates new blocks there with
`kv_cache.append_batch`) and copies the result back. On top of it the host
keeps the *prefix cache*: a full block is keyed by the hash chain of its tokens
(hash of the parent block's key and its own token ids); when its last user
releases it, a keyed block is not returned to the free stack but kept,
evictable, in LRU order, and a later prompt with the same prefix reattaches
it (refcount + 1). Evicted (least recently used first) only when the free
stack runs short.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import numbers
import time
from typing import Any, Callable, Sequence

import numpy as np

from flashjax import kv_cache
from flashjax.serving.sampling import MAX_SEED, SamplingParams, validate_sampling

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

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p, self.seed)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if self.beam_width > 1 and self.n > self.beam_width:
            raise ValueError(f"n ({self.n}) must be <= beam_width ({self.beam_width}) for beam search")

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
    output: list[int] = dataclasses.field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache (= the slot's length)
    hashes: list[int] = dataclasses.field(default_factory=list)  # keys of its cached full blocks
    fork_pending: bool = False  # n > 1: fork into n sequences once the prompt is cached
    reserved_slots: list[int] = dataclasses.field(default_factory=list)  # for its fork
    swap: Any = None  # (host pages, num_cached) while swapped out
    finish_reason: str | None = None
    text: str = ""  # detokenized output (stop strings cut)
    sent_text: int = 0  # characters already streamed
    sent_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    beam_score: float = 0.0

    @property
    def context(self) -> list[int]:
        return self.prompt + self.output

    @property
    def context_len(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Context tokens not yet in the cache (1 = ready to decode its last token)."""
        return self.context_len - self.num_cached

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


# --------------------------------------------------------------------------
# Host mirror of the allocator + prefix cache
# --------------------------------------------------------------------------


def block_hashes(tokens: Sequence[int], block_size: int, limit_blocks: int | None = None,
                 start: int = 0, parent: int | None = None) -> list[int]:
    """Hash chain keys of the full blocks of `tokens` (block i's key covers tokens[: (i+1)*bs])."""
    n = len(tokens) // block_size if limit_blocks is None else min(limit_blocks, len(tokens) // block_size)
    out = []
    h = parent
    for i in range(start, n):
        h = hash((h, tuple(int(t) for t in tokens[i * block_size:(i + 1) * block_size])))
        out.append(h)
    return out


class BlockManager:
    """numpy mirror of a `KVCacheState` plus the prefix cache (see the module doc)."""

    def __init__(self, num_blocks: int, max_seqs: int, max_blocks_per_seq: int, block_size: int,
                 *, prefix_caching: bool = True):
        st = kv_cache.init_state(num_blocks, max_seqs, max_blocks_per_seq, block_size)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_seqs = max_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.prefix_caching = prefix_caching
        self.tables = np.array(st.block_tables)
        self.lengths = np.array(st.lengths)
        self.active = np.array(st.active)
        self.refcounts = np.array(st.refcounts)
        self.free = list(np.array(st.free_stack))  # top of the stack = the end
        self.evictable: collections.OrderedDict[int, int] = collections.OrderedDict()  # block -> key, LRU first
        self.key_to_block: dict[int, int] = {}
        self.block_key: dict[int, int] = {}
        self.free_slots = list(range(max_seqs - 1, -1, -1))

    # -- counts ------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_available(self) -> int:
        """Blocks a sequence can get: free plus evictable cached ones."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return int((self.refcounts > 0).sum())

    def blocks_for(self, length: int, add: int) -> int:
        bs = self.block_size
        return -(-(length + add) // bs) - (-(-length // bs))

    # -- device round trip ----------------------------------------------------
    def to_state(self, host: bool = False):
        """The allocator state as a KVCacheState: device arrays, or numpy copies
        with host=True (for passing straight to a jitted step)."""
        import jax.numpy as jnp

        put = np.array if host else jnp.asarray
        stack = np.zeros((self.num_blocks,), np.int32)
        stack[: len(self.free)] = self.free
        return kv_cache.KVCacheState(
            free_stack=put(stack), num_free=put(np.int32(len(self.free))),
            block_tables=put(self.tables), lengths=put(self.lengths),
            active=put(self.active), refcounts=put(self.refcounts),
            status=put(np.int32(kv_cache.OK)), block_size=self.block_size)

    def from_state(self, host: dict) -> None:
        """Adopt the state arrays a step returned (already on the host)."""
        self.tables = np.array(host["block_tables"])
        self.lengths = np.array(host["lengths"])
        self.active = np.array(host["active"])
        self.refcounts = np.array(host["refcounts"])
        self.free = list(np.array(host["free_stack"])[: int(host["num_free"])])

    # -- slots -----------------------------------------------------------------
    def take_slot(self, activate: bool = True) -> int:
        slot = self.free_slots.pop()
        assert not self.active[slot]
        self.active[slot] = activate  # an empty active sequence: the runner continues it
        self.lengths[slot] = 0
        return slot

    def activate(self, slot: int) -> None:
        self.active[slot] = True

    def ensure_free(self, n: int) -> bool:
        """Evict LRU cached blocks until n are on the free stack; False if impossible."""
        while len(self.free) < n and self.evictable:
            blk, key = self.evictable.popitem(last=False)
            self._forget(blk)
            self.free.append(blk)
        return len(self.free) >= n

    def _forget(self, blk: int) -> None:
        key = self.block_key.pop(blk, None)
        if key is not None and self.key_to_block.get(key) == blk:
            del self.key_to_block[key]

    def _pop_block(self) -> int:
        if not self.ensure_free(1):
            raise RuntimeError("out of KV blocks")
        return self.free.pop()

    def release(self, slot: int) -> None:
        """Free a sequence's slot; its keyed blocks stay cached (evictable)."""
        if not self.active[slot]:
            self.free_slots.append(slot)
            return
        nblk = -(-int(self.lengths[slot]) // self.block_size)
        row = self.tables[slot, :nblk].tolist()
        for blk in reversed(row):  # the tail of a chain is evicted first
            self.refcounts[blk] -= 1
            if self.refcounts[blk] == 0:
                if self.prefix_caching and blk in self.block_key:
                    self.evictable[blk] = self.block_key[blk]
                    self.evictable.move_to_end(blk, last=False)
                else:
                    self._forget(blk)
                    self.free.append(blk)
        self.tables[slot] = -1
        self.lengths[slot] = 0
        self.active[slot] = False
        self.free_slots.append(slot)

    def match_prefix(self, tokens: Sequence[int]) -> list[int]:
        """Cached blocks holding the longest cached prefix of tokens (leaving >= 1 token uncached)."""
        if not self.prefix_caching:
            return []
        limit = (len(tokens) - 1) // self.block_size
        blocks = []
        for key in block_hashes(tokens, self.block_size, limit):
            blk = self.key_to_block.get(key)
            if blk is None:
                break
            blocks.append(blk)
        return blocks

    def attach(self, slot: int, blocks: list[int]) -> None:
        """Start `slot` with these (full, cached) blocks as its leading blocks."""
        for i, blk in enumerate(blocks):
            if self.refcounts[blk] == 0:
                self.evictable.pop(blk, None)
            self.refcounts[blk] += 1
            self.tables[slot, i] = blk
        self.lengths[slot] = len(blocks) * self.block_size

    def register(self, req: Request) -> None:
        """Key the full blocks of a running sequence (after a step wrote them)."""
        if not self.prefix_caching or req.slot < 0:
            return
        full = req.num_cached // self.block_size
        if full <= len(req.hashes):
            return
        ctx = req.context
        parent = req.hashes[-1] if req.hashes else None
        keys = block_hashes(ctx, self.block_size, full, start=len(req.hashes), parent=parent)
        for i, key in enumerate(keys, start=len(req.hashes)):
            blk = int(self.tables[req.slot, i])
            if key not in self.key_to_block and blk not in self.block_key:
                self.key_to_block[key] = blk
                self.block_key[blk] = key
        req.hashes.extend(keys)

    def allocate_exact(self, slot: int, length: int) -> list[int]:
        """Give `slot` fresh blocks for `length` tokens (swap-in). Caller checked availability."""
        nblk = -(-length // self.block_size)
        self.ensure_free(nblk)
        blocks = [self._pop_block() for _ in range(nblk)]
        for i, blk in enumerate(blocks):
            self.refcounts[blk] += 1
            self.tables[slot, i] = blk
        self.lengths[slot] = length
        return blocks

    def fork(self, src: int, dst: int) -> tuple[int, int] | None:
        """dst shares src's full blocks; a partial last block is copied. Returns (src, dst) page copy."""
        length = int(self.lengths[src])
        bs = self.block_size
        nblk = -(-length // bs)
        full = length // bs
        for i in range(full):
            blk = int(self.tables[src, i])
            self.refcounts[blk] += 1
            self.tables[dst, i] = blk
        self.lengths[dst] = length
        if nblk > full:
            new = self._pop_block()
            self.refcounts[new] += 1
            self.tables[dst, full] = new
            return int(self.tables[src, full]), new
        return None

    def check(self) -> None:
        """Invariants (tests): every block is free, cached-evictable or referenced, exactly once."""
        state = self.to_state()
        free = set(self.free)
        ev = set(self.evictable)
        assert not (free & ev), "a block is both free and cached"
        assert len(free) == len(self.free), "a block is on the free stack twice"
        counts = np.zeros(self.num_blocks, np.int64)
        for s in range(self.max_seqs):
            if self.active[s]:
                n = -(-int(self.lengths[s]) // self.block_size)
                counts[self.tables[s, :n]] += 1
                assert (self.tables[s, n:] == -1).all()
            else:
                assert (self.tables[s] == -1).all() and self.lengths[s] == 0
        assert (counts == self.refcounts).all(), "refcounts disagree with the tables"
        used = set(np.nonzero(self.refcounts)[0].tolist())
        assert not (used & (free | ev)), "a referenced block is free or evictable"
        assert len(used) + len(free) + len(ev) == self.num_blocks, "a block is lost"
        del state


# --------------------------------------------------------------------------
# Scheduler
# --------------------------------------------------------------------------


@dataclasses.dataclass
class SchedulePlan:
    decodes: list[Request]
    prefills: list[tuple[Request, int]]  # (request, chunk tokens)
    preempted: list[Request]
    forks: list[Request]  # group leaders to fork before running

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Decides each step's batch (see the module doc). The engine applies the plan."""

    def __init__(self, blocks: BlockManager, *, max_num_batched_tokens: int, prefill_rows: int,
                 max_chunk: int, preemption_mode: str = "recompute",
                 preempt: Callable[[Request], None] | None = None,
                 admit: Callable[[Request, int], bool] | None = None):
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {preemption_mode!r}")
        self.blocks = blocks
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.prefill_rows = int(prefill_rows)
        self.max_chunk = int(max_chunk)
        self.preemption_mode = preemption_mode
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._preempt = preempt
        self._admit = admit

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

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _room(self, length: int, free_blocks: int) -> int:
        """Most tokens a sequence of `length` can grow by with `free_blocks` new blocks."""
        bs = self.blocks.block_size
        in_last = (-length) % bs
        return in_last + free_blocks * bs

    def schedule(self) -> SchedulePlan:
        bm = self.blocks
        preempted: list[Request] = []
        forks: list[Request] = []
        running = sorted(self.running, key=lambda r: r.order)

        def decode_need(rs):
            need = 0
            for r in rs:
                if r.pending == 1:
                    need += bm.blocks_for(r.num_cached, 1)
                    if r.fork_pending:
                        need += (r.params.n - 1) * (2 if r.num_cached % bm.block_size else 1)
            return need

        # 1. Decodes (and pending forks); preempt the newest while blocks are short.
        while running and decode_need(running) > bm.num_available:
            victim = running[-1]  # newest
            self._preempt(victim)
            preempted.append(victim)
            running = sorted(self.running, key=lambda r: r.order)
        for r in running:
            if r.fork_pending and r.pending == 1:
                forks.append(r)
        decodes = [r for r in running if r.pending == 1]
        committed = decode_need(running)
        budget = self.max_num_batched_tokens - sum(r.params.n if r.fork_pending else 1 for r in decodes)

        # 2. Chunked prefill of running sequences, oldest first.
        prefills: list[tuple[Request, int]] = []

        def plan_chunk(r: Request, avail: int, budget: int) -> tuple[int, int]:
            want = r.pending - (1 if r.fork_pending else 0)
            c = min(want, budget, self.max_chunk, self._room(r.num_cached, avail))
            if c <= 0:
                return 0, 0
            return c, bm.blocks_for(r.num_cached, c)

        def take_chunk(r):
            nonlocal committed, budget
            c, nb = plan_chunk(r, bm.num_available - committed, budget)
            if c > 0:
                prefills.append((r, c))
                committed += nb
                budget -= c

        for r in running:
            if r.pending <= 1 or len(prefills) >= self.prefill_rows or budget <= 0:
                continue
            take_chunk(r)

        # 3. Admit waiting requests (FCFS) into free slots.
        while self.waiting and budget > 0 and len(prefills) < self.prefill_rows:
            r = self.waiting[0]
            need_slots = r.params.num_seqs if r.fork_pending else 1
            if len(bm.free_slots) < need_slots:
                break
            if not self._admit(r, bm.num_available - committed):
                break
            self.waiting.popleft()
            r.status = RequestStatus.RUNNING
            self.running.append(r)
            if r.pending == 1:  # swapped-in, or fully cached but the last token
                if r.fork_pending:
                    forks.append(r)
                    committed += (r.params.n - 1) * 2
                decodes.append(r)
                budget -= r.params.n if r.fork_pending else 1
                committed += bm.blocks_for(r.num_cached, 1)
                continue
            take_chunk(r)
        if not decodes and not prefills and self.running and not preempted:
            # Nothing fits: free room by preempting the newest (never the only one).
            cands = sorted(self.running, key=lambda r: r.order)
            if len(cands) > 1:
                victim = cands[-1]
                self._preempt(victim)
                preempted.append(victim)
        return SchedulePlan(decodes=decodes, prefills=prefills, preempted=preempted, forks=forks)
