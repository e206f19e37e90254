"""Paged KV cache: a functional block allocator plus page read/write helpers.

Layout
------
Each layer owns a pool of fixed-size KV blocks ("pages") in the layout the
decode kernel reads (`flashjax.decode.paged_decode_attention`):

    k_pages, v_pages : [kv_heads, num_blocks, block_size, head_dim]

(`init_pages(..., num_layers=L)` stacks L such pools on a leading axis; the
allocator state below is shared by all layers, since every layer stores the
same token positions.) Token `t` of sequence `s` lives in block
`block_tables[s, t // block_size]` at row `t % block_size`.

Allocator state (`KVCacheState`, a pytree; every op is a pure, jit-able
function usable inside `lax.while_loop`/`lax.scan`):

    free_stack   int32 [num_blocks]   free_stack[:num_free] are the free block
                                      ids; allocation pops from the top
                                      (index num_free-1), frees push there
    num_free     int32 []
    block_tables int32 [max_seqs, max_blocks_per_seq]; -1 = no block
    lengths      int32 [max_seqs]     tokens reserved per sequence
    active       bool  [max_seqs]
    refcounts    int32 [num_blocks]   how many table entries name the block
    status       int32 []             result of the last op (see STATUS_NAMES)
    block_size   static int

Invariants (checked by `check_invariants`): a block is either free (on the
stack, refcount 0) or referenced (refcount = number of table entries naming
it), never both; an active sequence of length n owns exactly
ceil(n / block_size) leading table entries; inactive rows are all -1 with
length 0; a block shared by several sequences (refcount > 1) is full in all
of them, so appends never write into shared blocks (`fork` copies the last
partial block: copy-on-write at fork time).

FP8 pages
---------
A cache can store its pages in `float8_e4m3fn` (`FP8`) with one float32 scale
per token and KV head:

    k_pages, v_pages   : float8_e4m3fn [kv_heads, num_blocks, block_size, head_dim]
    k_scales, v_scales : float32       [kv_heads, num_blocks, block_size]

A token's key (and value) vector of one head is stored as
x / s with s = max|x| / 448 (448 = the largest e4m3 value; `quantize_fp8`), and
read back as stored * s (`dequantize_fp8`). The scale is computed from the
token's own vector when it is written, so writing a token never touches
another token's entry: decode writes one token into a partly filled block
with no read-modify-write of the block, chunked and one-piece prefill store
identical bytes, and copy-on-write, swapping and prefix sharing move scales
with their pages. (A per-block scale would have to grow, and the block be
re-quantized, whenever a later token of the block is larger; a fixed
per-layer scale needs calibration and clips outliers.) The cost is 4 bytes
per 128-byte vector at head_dim 128 (3%): an FP8 cache is 1.94x smaller than
a bf16 one (1.88x at head_dim 64). In the decode kernel a key scale multiplies
its score column and a value scale its probability column, so a tile is only
converted to the compute dtype, never rescaled elementwise.
`init_scales`, `write_kv_fp8` and the `*scales` of `copy_blocks` handle them.

Failure is atomic: an op that cannot complete (out of blocks, a sequence
index out of range, exceeding max_blocks_per_seq, ...) returns the input state
unchanged except for `status`; no partial allocation ever happens and every
existing sequence stays intact.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "KVCacheState", "BlockCopy", "init_state", "init_pages", "allocate", "append",
    "reserve", "append_batch", "append_step", "fork", "copy_blocks", "fork_and_copy",
    "free", "free_batch", "write_kv", "gather_kv", "check_invariants", "status_name",
    "FP8", "FP8_MAX", "quantize_fp8", "dequantize_fp8", "init_scales", "write_kv_fp8",
    "resolve_cache_dtype", "CACHE_DTYPE_NAMES",
    "OK", "OUT_OF_BLOCKS", "SEQ_ACTIVE", "SEQ_INACTIVE", "SEQ_TOO_LONG", "INVALID_SEQ",
    "INVALID_ARG", "STATUS_NAMES",
]

OK = 0
OUT_OF_BLOCKS = 1  # not enough free blocks for the request
SEQ_ACTIVE = 2  # allocate/fork onto a sequence slot that is in use
SEQ_INACTIVE = 3  # append/free/fork from a slot that is not in use
SEQ_TOO_LONG = 4  # would need more than max_blocks_per_seq blocks
INVALID_SEQ = 5  # sequence index outside [0, max_seqs) (or fork src == dst)
INVALID_ARG = 6  # negative token count
STATUS_NAMES = {
    OK: "ok", OUT_OF_BLOCKS: "out of blocks", SEQ_ACTIVE: "sequence already active",
    SEQ_INACTIVE: "sequence not active", SEQ_TOO_LONG: "sequence too long",
    INVALID_SEQ: "invalid sequence index", INVALID_ARG: "invalid argument",
}


FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# Names a cache dtype may be given by (Engine(kv_cache_dtype=...), --kv-cache-dtype).
CACHE_DTYPE_NAMES = {
    "bf16": jnp.dtype(jnp.bfloat16), "bfloat16": jnp.dtype(jnp.bfloat16),
    "fp16": jnp.dtype(jnp.float16), "float16": jnp.dtype(jnp.float16),
    "fp32": jnp.dtype(jnp.float32), "float32": jnp.dtype(jnp.float32),
    "fp8": FP8, "fp8_e4m3": FP8, "float8_e4m3fn": FP8,
}


def resolve_cache_dtype(value, default, *, name: str = "kv_cache_dtype"):
    """The dtype of a KV cache from a user's choice: None or "auto" give `default`
    (the model's compute dtype); "bf16"/"bfloat16", "fp16"/"float16",
    "fp32"/"float32", "fp8"/"fp8_e4m3"/"float8_e4m3fn" (or those dtypes) name
    one. Anything else is a ValueError naming `name`."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return jnp.dtype(default)
    if isinstance(value, str):
        dt = CACHE_DTYPE_NAMES.get(value.lower())
    else:
        try:
            dt = jnp.dtype(value)
        except TypeError:
            dt = None
        if dt not in set(CACHE_DTYPE_NAMES.values()):
            dt = None
    if dt is None:
        raise ValueError(f"{name} must be 'auto' (the model's dtype), 'bf16', 'fp16', 'fp32' or 'fp8' "
                         f"(float8_e4m3fn with a scale per token and KV head), got {value!r}")
    return dt


def quantize_fp8(x):
    """x [..., head_dim] -> (float8_e4m3fn [..., head_dim], float32 scales [...]).

    Each vector x[i] is stored as x[i] / s[i] with s[i] = max|x[i]| / FP8_MAX
    (1 for an all-zero vector), so its largest entry maps to +-448 and nothing
    clips. Relative error per entry <= 2^-4 for normal values (3 mantissa bits)."""
    xf = jnp.asarray(x).astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(jnp.float32)
    vals = jnp.clip(xf / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
    return vals, scale


def dequantize_fp8(vals, scales, dtype=jnp.float32):
    """vals float8_e4m3fn [..., head_dim] * scales [...] -> dtype [..., head_dim]."""
    return (vals.astype(jnp.float32) * scales[..., None].astype(jnp.float32)).astype(dtype)


def status_name(code) -> str:
    return STATUS_NAMES.get(int(code), f"unknown status {int(code)}")


@struct.dataclass
class KVCacheState:
    free_stack: jax.Array
    num_free: jax.Array
    block_tables: jax.Array
    lengths: jax.Array
    active: jax.Array
    refcounts: jax.Array
    status: jax.Array
    block_size: int = struct.field(pytree_node=False, default=16)

    @property
    def num_blocks(self) -> int:
        return self.refcounts.shape[0]

    @property
    def max_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]

    @property
    def capacity(self) -> int:
        """Most tokens one sequence can hold."""
        return self.max_blocks_per_seq * self.block_size


class BlockCopy(NamedTuple):
    """Pages to copy (src -> dst) for copy-on-write; -1 entries mean no copy."""
    src: jax.Array
    dst: jax.Array


def init_state(num_blocks: int, max_seqs: int, max_blocks_per_seq: int,
               block_size: int = 16) -> KVCacheState:
    """An empty allocator: all blocks free, no active sequence."""
    for name, val in (("num_blocks", num_blocks), ("max_seqs", max_seqs),
                      ("max_blocks_per_seq", max_blocks_per_seq), ("block_size", block_size)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    return KVCacheState(
        # Reversed so that blocks are handed out as 0, 1, 2, ...
        free_stack=jnp.arange(num_blocks - 1, -1, -1, dtype=jnp.int32),
        num_free=jnp.asarray(num_blocks, jnp.int32),
        block_tables=jnp.full((max_seqs, max_blocks_per_seq), -1, jnp.int32),
        lengths=jnp.zeros((max_seqs,), jnp.int32),
        active=jnp.zeros((max_seqs,), bool),
        refcounts=jnp.zeros((num_blocks,), jnp.int32),
        status=jnp.asarray(OK, jnp.int32),
        block_size=int(block_size),
    )


def init_pages(num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
               dtype=jnp.bfloat16, num_layers: int | None = None):
    """Zero K and V pools [kv_heads, num_blocks, block_size, head_dim] (with a
    leading [num_layers] axis if given). An FP8 pool also needs `init_scales`."""
    shape = (kv_heads, num_blocks, block_size, head_dim)
    if num_layers is not None:
        shape = (num_layers, *shape)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def init_scales(num_blocks: int, block_size: int, kv_heads: int, num_layers: int | None = None):
    """Zero float32 K and V scales [kv_heads, num_blocks, block_size] of an FP8
    pool (with a leading [num_layers] axis if given); unwritten slots read as 0."""
    shape = (kv_heads, num_blocks, block_size)
    if num_layers is not None:
        shape = (num_layers, *shape)
    return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)


# --------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------


def _cdiv(a, b):
    return (a + b - 1) // b


def _first_error(*checks):
    """checks: (bool condition meaning 'failed', code) in priority order."""
    status = jnp.asarray(OK, jnp.int32)
    for failed, code in reversed(checks):
        status = jnp.where(failed, jnp.int32(code), status)
    return status


def _commit(old: KVCacheState, new: KVCacheState, status) -> KVCacheState:
    """`new` if status == OK, else `old`; status recorded either way."""
    ok = status == OK
    merged = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    return merged.replace(status=jnp.asarray(status, jnp.int32))


def _seq_ok(state, seq):
    seq = jnp.asarray(seq, jnp.int32)
    return (seq >= 0) & (seq < state.max_seqs)


def _grow(state: KVCacheState, add, start_mask):
    """Grow every sequence s by add[s] tokens (rows in `start_mask` start from
    an empty table). Returns (new_state, blocks_needed) without checking."""
    bs = state.block_size
    nb = state.num_blocks
    add = jnp.asarray(add, jnp.int32)
    old_len = jnp.where(start_mask, 0, state.lengths)
    new_len = old_len + add
    have = _cdiv(old_len, bs)
    need = _cdiv(new_len, bs)
    new_blocks = need - have
    total = jnp.sum(new_blocks)
    offs = jnp.cumsum(new_blocks) - new_blocks
    col = jnp.arange(state.max_blocks_per_seq, dtype=jnp.int32)[None, :]
    is_new = (col >= have[:, None]) & (col < need[:, None])
    k = offs[:, None] + col - have[:, None]
    src = jnp.clip(state.num_free - 1 - k, 0, nb - 1)
    blk = state.free_stack[src]
    tables = jnp.where(is_new, blk, state.block_tables)
    refcounts = state.refcounts.at[jnp.where(is_new, blk, nb).ravel()].add(1, mode="drop")
    new = state.replace(
        block_tables=tables, refcounts=refcounts, lengths=new_len,
        num_free=state.num_free - total,
        active=state.active | start_mask,
    )
    return new, need, total


# --------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------


def allocate(state: KVCacheState, seq, num_tokens) -> KVCacheState:
    """Start sequence `seq` (an inactive slot) with room for `num_tokens` tokens."""
    seq = jnp.asarray(seq, jnp.int32)
    num_tokens = jnp.asarray(num_tokens, jnp.int32)
    valid = _seq_ok(state, seq)
    onehot = (jnp.arange(state.max_seqs) == seq) & valid
    new, need, total = _grow(state, jnp.where(onehot, num_tokens, 0), onehot)
    status = _first_error(
        (~valid, INVALID_SEQ),
        (num_tokens < 0, INVALID_ARG),
        (jnp.any(onehot & state.active), SEQ_ACTIVE),
        (_cdiv(num_tokens, state.block_size) > state.max_blocks_per_seq, SEQ_TOO_LONG),
        (total > state.num_free, OUT_OF_BLOCKS),
    )
    return _commit(state, new, status)


def append_batch(state: KVCacheState, num_tokens) -> KVCacheState:
    """Grow every sequence s by num_tokens[s] (int32 [max_seqs]; 0 = unchanged),
    allocating blocks as block boundaries are crossed. All or nothing."""
    num_tokens = jnp.asarray(num_tokens, jnp.int32)
    if num_tokens.shape != (state.max_seqs,):
        raise ValueError(f"num_tokens must have shape [max_seqs]=({state.max_seqs},), "
                         f"got {num_tokens.shape}")
    none = jnp.zeros((state.max_seqs,), bool)
    new, need, total = _grow(state, num_tokens, none)
    status = _first_error(
        (jnp.any(num_tokens < 0), INVALID_ARG),
        (jnp.any((num_tokens > 0) & ~state.active), SEQ_INACTIVE),
        (jnp.any(need > state.max_blocks_per_seq), SEQ_TOO_LONG),
        (total > state.num_free, OUT_OF_BLOCKS),
    )
    return _commit(state, new, status)


def append(state: KVCacheState, seq, num_tokens) -> KVCacheState:
    """Grow active sequence `seq` by `num_tokens` tokens."""
    seq = jnp.asarray(seq, jnp.int32)
    num_tokens = jnp.asarray(num_tokens, jnp.int32)
    valid = _seq_ok(state, seq)
    onehot = (jnp.arange(state.max_seqs) == seq) & valid
    grown = append_batch(state, jnp.where(onehot, num_tokens, 0))
    status = _first_error(
        (~valid, INVALID_SEQ),
        (num_tokens < 0, INVALID_ARG),
        (~jnp.any(onehot & state.active), SEQ_INACTIVE),
        (grown.status != OK, grown.status),
    )
    return _commit(state, grown, status)


reserve = append


def append_step(state: KVCacheState, mask=None) -> KVCacheState:
    """Room for one more token in every active sequence (of `mask`, if given):
    the allocation of one decode step. All or nothing."""
    grow = state.active if mask is None else (state.active & jnp.asarray(mask, bool))
    return append_batch(state, grow.astype(jnp.int32))


def free_batch(state: KVCacheState, mask) -> KVCacheState:
    """Release every sequence in `mask` (bool [max_seqs]); blocks whose
    refcount drops to 0 return to the free stack. All must be active."""
    mask = jnp.asarray(mask, bool)
    if mask.shape != (state.max_seqs,):
        raise ValueError(f"mask must have shape [max_seqs]=({state.max_seqs},), got {mask.shape}")
    nb = state.num_blocks
    tables = state.block_tables
    owned = mask[:, None] & (tables >= 0)
    dec = jnp.zeros((nb,), jnp.int32).at[jnp.where(owned, tables, nb).ravel()].add(1, mode="drop")
    refcounts = state.refcounts - dec
    released = (dec > 0) & (refcounts == 0)
    pos = state.num_free + jnp.cumsum(released) - 1
    free_stack = state.free_stack.at[jnp.where(released, pos, nb)].set(
        jnp.arange(nb, dtype=jnp.int32), mode="drop")
    new = state.replace(
        free_stack=free_stack,
        num_free=state.num_free + jnp.sum(released, dtype=jnp.int32),
        block_tables=jnp.where(mask[:, None], -1, tables),
        lengths=jnp.where(mask, 0, state.lengths),
        active=state.active & ~mask,
        refcounts=refcounts,
    )
    status = _first_error((jnp.any(mask & ~state.active), SEQ_INACTIVE))
    return _commit(state, new, status)


def free(state: KVCacheState, seq) -> KVCacheState:
    """Release sequence `seq`."""
    seq = jnp.asarray(seq, jnp.int32)
    valid = _seq_ok(state, seq)
    onehot = (jnp.arange(state.max_seqs) == seq) & valid
    freed = free_batch(state, onehot)
    status = _first_error((~valid, INVALID_SEQ), (freed.status != OK, freed.status))
    return _commit(state, freed, status)


def fork(state: KVCacheState, src, dst) -> tuple[KVCacheState, BlockCopy]:
    """Make inactive slot `dst` a copy of active sequence `src`.

    Full blocks are shared (refcount + 1). If src's last block is partial,
    dst gets a fresh block for it and the returned BlockCopy names the pages
    to copy (apply it with `copy_blocks`); otherwise BlockCopy is (-1, -1).
    On failure the state is unchanged (except status) and BlockCopy is (-1, -1).
    """
    src = jnp.asarray(src, jnp.int32)
    dst = jnp.asarray(dst, jnp.int32)
    bs, nb = state.block_size, state.num_blocks
    valid = _seq_ok(state, src) & _seq_ok(state, dst) & (src != dst)
    s = jnp.clip(src, 0, state.max_seqs - 1)
    d = jnp.clip(dst, 0, state.max_seqs - 1)
    length = state.lengths[s]
    nblk = _cdiv(length, bs)
    partial = (length % bs) != 0
    row = state.block_tables[s]
    col = jnp.arange(state.max_blocks_per_seq, dtype=jnp.int32)
    last = jnp.maximum(nblk - 1, 0)
    shared = (col < nblk) & ~(partial & (col == last))
    new_blk = state.free_stack[jnp.clip(state.num_free - 1, 0, nb - 1)]
    dst_row = jnp.where(shared, row, -1)
    dst_row = jnp.where(partial & (col == last), new_blk, dst_row)
    refcounts = state.refcounts.at[jnp.where(shared, row, nb)].add(1, mode="drop")
    refcounts = refcounts.at[jnp.where(partial, new_blk, nb)].add(1, mode="drop")
    new = state.replace(
        block_tables=state.block_tables.at[d].set(dst_row),
        lengths=state.lengths.at[d].set(length),
        active=state.active.at[d].set(True),
        refcounts=refcounts,
        num_free=state.num_free - partial.astype(jnp.int32),
    )
    status = _first_error(
        (~valid, INVALID_SEQ),
        (~state.active[s], SEQ_INACTIVE),
        (state.active[d], SEQ_ACTIVE),
        (partial & (state.num_free < 1), OUT_OF_BLOCKS),
    )
    copy_ok = (status == OK) & partial
    copy = BlockCopy(jnp.where(copy_ok, row[last], -1).astype(jnp.int32),
                     jnp.where(copy_ok, new_blk, -1).astype(jnp.int32))
    return _commit(state, new, status), copy


def copy_blocks(k_pages, v_pages, copy: BlockCopy, *scales):
    """Copy pages copy.src -> copy.dst (scalars or 1-D arrays; -1 = skip) in
    pools [..., num_blocks, block_size, head_dim] (any leading axes). An FP8
    pool passes its k_scales, v_scales [..., num_blocks, block_size] too; they
    are copied alike and returned after the pages."""
    src = jnp.atleast_1d(jnp.asarray(copy.src, jnp.int32))
    dst = jnp.atleast_1d(jnp.asarray(copy.dst, jnp.int32))

    def one(pages, trailing):
        tail = (slice(None),) * trailing
        nb = pages.shape[-1 - trailing]
        ok = (src >= 0) & (dst >= 0) & (src < nb) & (dst < nb)
        vals = pages[(..., jnp.clip(src, 0, nb - 1), *tail)]
        return pages.at[(..., jnp.where(ok, dst, nb), *tail)].set(vals, mode="drop")

    return (one(k_pages, 2), one(v_pages, 2), *(one(x, 1) for x in scales))


def fork_and_copy(state, k_pages, v_pages, src, dst):
    """`fork` and apply its copy-on-write to the pages in one call."""
    state, copy = fork(state, src, dst)
    k_pages, v_pages = copy_blocks(k_pages, v_pages, copy)
    return state, k_pages, v_pages


def _write_index(k_pages, state: KVCacheState, seq_ids, positions, k, v):
    """(block, row, lead shape) of each new token for `write_kv`: dropped tokens get
    block num_blocks (out of range, dropped by the scatter)."""
    seq_ids = jnp.asarray(seq_ids, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    lead = jnp.broadcast_shapes(seq_ids.shape, positions.shape)
    kv_heads, nb, bs, head_dim = k_pages.shape
    if k.shape != (*lead, kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must have shape {(*lead, kv_heads, head_dim)} "
                         f"(token shape + [kv_heads, head_dim]), got {k.shape} and {v.shape}")
    if bs != state.block_size:
        raise ValueError(f"pages have block_size {bs}, state has {state.block_size}")
    seq = jnp.broadcast_to(seq_ids, lead).ravel()
    pos = jnp.broadcast_to(positions, lead).ravel()
    s = jnp.clip(seq, 0, state.max_seqs - 1)
    col = jnp.clip(pos // bs, 0, state.max_blocks_per_seq - 1)
    blk = state.block_tables[s, col]
    valid = ((seq >= 0) & (seq < state.max_seqs) & state.active[s] & (pos >= 0)
             & (pos < state.lengths[s]) & (blk >= 0))
    valid &= state.refcounts[jnp.clip(blk, 0, nb - 1)] == 1
    blk = jnp.where(valid, blk, nb)
    off = jnp.where(valid, pos % bs, 0)
    return blk, off


def _token_major(x, kv_heads, head_dim):
    """[..., kv_heads, head_dim] -> [kv_heads, tokens, head_dim]."""
    return x.reshape(-1, kv_heads, head_dim).swapaxes(0, 1)


def write_kv(k_pages, v_pages, state: KVCacheState, seq_ids, positions, k, v):
    """Scatter new tokens into the pages.

    k, v: [..., kv_heads, head_dim] with leading shape = broadcast shape of
    seq_ids and positions (decode: [batch]; prefill: [batch, seq] or [n]).
    Token i goes to sequence seq_ids[i] at position positions[i], which must
    already be reserved (positions < lengths, via allocate/append). Tokens of
    invalid or inactive sequences, positions outside [0, length), and writes
    into blocks shared with another sequence (refcount > 1) are dropped.
    k_pages/v_pages: [kv_heads, num_blocks, block_size, head_dim]. FP8 pages
    need their scales: use `write_kv_fp8`.
    """
    if jnp.dtype(k_pages.dtype) == FP8 or jnp.dtype(v_pages.dtype) == FP8:
        raise TypeError("k_pages/v_pages are float8_e4m3fn: write them with write_kv_fp8, which "
                        "also writes each token's scale (k_scales, v_scales)")
    kv_heads, _, _, head_dim = k_pages.shape
    blk, off = _write_index(k_pages, state, seq_ids, positions, k, v)
    kf = _token_major(k, kv_heads, head_dim).astype(k_pages.dtype)
    vf = _token_major(v, kv_heads, head_dim).astype(v_pages.dtype)
    k_pages = k_pages.at[:, blk, off, :].set(kf, mode="drop")
    v_pages = v_pages.at[:, blk, off, :].set(vf, mode="drop")
    return k_pages, v_pages


def write_kv_fp8(k_pages, v_pages, k_scales, v_scales, state: KVCacheState, seq_ids, positions, k, v):
    """`write_kv` for an FP8 pool: each new token's K and V vectors (per KV head)
    are quantized with their own scale (`quantize_fp8`) and written with it.

    k_pages, v_pages: float8_e4m3fn [kv_heads, num_blocks, block_size, head_dim];
    k_scales, v_scales: float32 [kv_heads, num_blocks, block_size]. Returns the
    four arrays. Dropped tokens as in `write_kv`."""
    for nm, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if jnp.dtype(x.dtype) != FP8:
            raise TypeError(f"{nm} must be float8_e4m3fn for write_kv_fp8, got {x.dtype}")
    kv_heads, nb, bs, head_dim = k_pages.shape
    for nm, x in (("k_scales", k_scales), ("v_scales", v_scales)):
        if tuple(x.shape) != (kv_heads, nb, bs) or jnp.dtype(x.dtype) != jnp.float32:
            raise ValueError(f"{nm} must be float32 [kv_heads, num_blocks, block_size]="
                             f"{(kv_heads, nb, bs)}, got {x.dtype} {tuple(x.shape)}")
    blk, off = _write_index(k_pages, state, seq_ids, positions, k, v)
    kq, ks = quantize_fp8(_token_major(k, kv_heads, head_dim))
    vq, vs = quantize_fp8(_token_major(v, kv_heads, head_dim))
    k_pages = k_pages.at[:, blk, off, :].set(kq, mode="drop")
    v_pages = v_pages.at[:, blk, off, :].set(vq, mode="drop")
    k_scales = k_scales.at[:, blk, off].set(ks, mode="drop")
    v_scales = v_scales.at[:, blk, off].set(vs, mode="drop")
    return k_pages, v_pages, k_scales, v_scales


def gather_kv(k_pages, v_pages, block_tables, lengths, *, max_len: int | None = None,
              k_scales=None, v_scales=None):
    """Dense copies [batch, max_len, kv_heads, head_dim] of the paged K and V
    (zeros past each length); for tests and references. With an FP8 pool's
    k_scales and v_scales the copies are dequantized, in float32."""
    kv_heads, nb, bs, head_dim = k_pages.shape
    if (k_scales is None) != (v_scales is None):
        raise ValueError("pass both k_scales and v_scales (an FP8 pool), or neither")
    block_tables = jnp.asarray(block_tables, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    batch, max_blocks = block_tables.shape
    if max_len is None:
        max_len = max_blocks * bs
    t = jnp.arange(max_len)
    col = jnp.clip(t // bs, 0, max_blocks - 1)
    blk = jnp.clip(block_tables[:, col], 0, nb - 1)  # [batch, max_len]
    valid = (t[None, :] < lengths[:, None]) & (t[None, :] < max_blocks * bs)

    def one(pages, scales):
        g = pages[:, blk, (t % bs)[None, :], :]  # [kv_heads, batch, max_len, D]
        if scales is not None:
            g = dequantize_fp8(g, scales[:, blk, (t % bs)[None, :]])
        g = jnp.moveaxis(g, 0, 2)
        return jnp.where(valid[:, :, None, None], g, jnp.zeros((), g.dtype))

    return one(k_pages, k_scales), one(v_pages, v_scales)


def check_invariants(state: KVCacheState) -> None:
    """Host-side consistency check (raises AssertionError naming the broken rule)."""
    free_stack = np.asarray(state.free_stack)
    num_free = int(state.num_free)
    tables = np.asarray(state.block_tables)
    lengths = np.asarray(state.lengths)
    active = np.asarray(state.active)
    refcounts = np.asarray(state.refcounts)
    nb, bs = state.num_blocks, state.block_size
    assert 0 <= num_free <= nb, f"num_free {num_free} outside [0, {nb}]"
    free = free_stack[:num_free]
    assert len(set(free.tolist())) == num_free, "a block is on the free stack twice"
    assert ((free >= 0) & (free < nb)).all(), "free stack holds an invalid id"
    counts = np.zeros(nb, np.int64)
    for s in range(state.max_seqs):
        row = tables[s]
        if not active[s]:
            assert lengths[s] == 0 and (row == -1).all(), f"inactive seq {s} holds blocks"
            continue
        n = -(-int(lengths[s]) // bs)
        assert n <= state.max_blocks_per_seq, f"seq {s} longer than its table"
        assert (row[:n] >= 0).all() and (row[:n] < nb).all(), f"seq {s} misses a block"
        assert (row[n:] == -1).all(), f"seq {s} holds blocks past its length"
        assert len(set(row[:n].tolist())) == n, f"seq {s} names a block twice"
        counts[row[:n]] += 1
    assert (counts == refcounts).all(), (
        f"refcounts {refcounts.tolist()} != table references {counts.tolist()}")
    assert (refcounts[free] == 0).all(), "a free block has references"
    assert int((refcounts > 0).sum()) + num_free == nb, "a block is neither free nor owned"
    # Shared blocks must be full in every sequence that names them.
    for s in range(state.max_seqs):
        if not active[s] or lengths[s] % bs == 0:
            continue
        last = tables[s][-(-int(lengths[s]) // bs) - 1]
        assert refcounts[last] == 1, f"partial last block {last} of seq {s} is shared"
