"""The engine's KV block pool: the one owner of the paged cache's bookkeeping.

`BlockManager` keeps, in numpy on the host, what the functional allocator
(`flashjax.kv_cache.KVCacheState`) keeps on the device: a block table and a
length per slot, reference counts and a free stack. In the engine it is the
*only* allocator: before a step is dispatched the host gives every row the
blocks its new tokens need (`grow`), and the jitted step receives the block
tables and lengths as plain inputs and writes K/V through them; nothing comes
back from the device to be reconciled. (The one-jit `flashjax.serving.generate`
loop, which never returns to the host, threads `flashjax.kv_cache` through its
`lax.while_loop` instead.) Why the host: admission, preemption and the prefix
cache are decisions the host makes anyway, the tables are a few tens of KB per
step, and allocating ahead (a multi-step call takes K tokens' worth) keeps
allocation off the device's critical path, as vLLM v1 does with its block pool.

Ordering makes early frees safe: the device runs steps in dispatch order, so a
block freed while a step that still writes to it is in flight is written by
that step before any later step (which may hand it to another sequence) runs.

On top of it the pool keeps the *prefix cache*: a full block is keyed by the
hash chain of its tokens (hash of the parent block's key and its own token
ids); when its last user releases it, a keyed block is not returned to the free
stack but kept, evictable, in LRU order, and a later prompt with the same
prefix reattaches it (refcount + 1). Evicted (least recently used first) only
when the free stack runs short. Only blocks whose every position was written by
an already-dispatched step are keyed.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from flashjax import kv_cache

__all__ = ["BlockManager", "block_hashes"]


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
    """Host block pool (tables, lengths, refcounts, free stack) plus the prefix cache (module doc)."""

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

    def register(self, req) -> None:
        """Key the full blocks of a running sequence whose tokens are known and whose K/V
        a dispatched step writes (positions < min(num_cached, known context length))."""
        if not self.prefix_caching or req.slot < 0:
            return
        full = min(req.num_cached, req.context_len) // self.block_size
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

    def grow(self, slot: int, n: int) -> None:
        """Room for `n` more tokens in active `slot`: new blocks as block boundaries are
        crossed, length += n. The caller checked availability (`ensure_free`)."""
        if n <= 0:
            return
        length = int(self.lengths[slot])
        have = -(-length // self.block_size)
        need = -(-(length + n) // self.block_size)
        if need > self.max_blocks_per_seq:
            raise ValueError(f"slot {slot} would hold {length + n} tokens; its table has room for "
                             f"{self.max_blocks_per_seq * self.block_size}")
        for i in range(have, need):
            blk = self._pop_block()
            self.refcounts[blk] += 1
            self.tables[slot, i] = blk
        self.lengths[slot] = length + n

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
