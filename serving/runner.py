"""Model runner on the paged KV cache: prefill and decode as pure, jit-able functions.

Cache
-----
`pages` is a tuple with one `(k_pages, v_pages)` pair per layer, each
`[kv_heads, num_blocks, block_size, page_head_dim]` in the model's compute
dtype (the layout `flashjax.paged_decode_attention` reads). Per-layer arrays
(rather than one stacked `[layers, ...]` array) let XLA update every layer's
pool in place inside `lax.while_loop`. `page_head_dim` is the head dim rounded
up to one the decode kernel supports (16, 32, ..., 256); extra columns are 0.
`state` is the allocator's `flashjax.kv_cache.KVCacheState`, shared by all
layers. `init_cache(config, ...)` builds both.

An FP8 cache (`dtype="fp8"`, see `flashjax.kv_cache.resolve_cache_dtype`)
has four arrays per layer, `(k_pages, v_pages, k_scales, v_scales)`: pages in
float8_e4m3fn and one float32 scale per token and KV head
([kv_heads, num_blocks, block_size]). Every write quantizes
(`kv_cache.write_kv_fp8`); decode hands the scales to the paged kernel, which
dequantizes as it reads; chunked prefill and the sliding-window decode
dequantize in the XLA gather of the pages (`gather_layer`), which feeds
`flash_attention` (XLA fuses gather, conversion and scaling into one pass).
Every per-layer array has the block axis second, so code that moves blocks
(swap, copy) treats the tuples alike.

Functions (pure: they take and return pages and state; `model` is the NNX
GPT, e.g. `nnx.merge(graphdef, params)` inside a jitted function):

    prefill(model, pages, state, tokens, seq_ids, lengths, *, continuation=False)
        -> (logits, pages, state)
    decode(model, pages, state, tokens, seq_ids) -> (logits, pages, state)

Shapes are fixed by the caller so an engine can bucket them: a prefill runs
`tokens [B, T]` (rows right-padded; `lengths[b]` real tokens, 0 = padding row)
for slots `seq_ids [B]` (-1 = padding row); a decode step runs `tokens [B]`
for `seq_ids [B]` (-1 = idle row). Neither depends on the lengths of the
sequences, so one compilation serves every request of a bucket.

Prefill reserves room for each row's tokens with the allocator (`append_batch`
after activating new slots), writes every layer's K/V with
`kv_cache.write_kv`, and attends with `flashjax.flash_attention`:
  * `continuation=False`: every row starts a new sequence (its slot must be
    inactive); causal attention over the chunk's own K/V.
  * `continuation=True`: a row whose slot is active continues it (chunked
    prefill: its tokens go at positions length, length+1, ...); an inactive
    slot starts fresh. Attention runs over prefix+chunk keys gathered from the
    pages, right-aligned so the bottom-right causal mask puts each query on its
    own position; keys before position 0 are masked with segment ids.
Chunked prefill gives the same cache and logits as a one-piece prefill (up to
float rounding of the different kernel tilings).

Decode grows each row by one token (`append_batch`), writes K/V and calls
`flashjax.paged_decode_attention` on the rows' block tables and lengths.

Sliding-window models (`config.sliding_window`, Mistral): prefill passes the
window to `flash_attention`; decode, which the paged kernel cannot window,
attends over the last `sliding_window` keys gathered from the pages in XLA.

Errors: an allocator failure (out of blocks, an inactive slot, a sequence
longer than its table, ...) leaves the state unchanged except `state.status`
(see `flashjax.kv_cache.STATUS_NAMES`); the outputs of such a call are
meaningless. Callers check `state.status`.

`ModelRunner` wraps these in jitted methods (pages donated) for one model.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashjax import kv_cache
from flashjax.decode import SUPPORTED_HEAD_DIMS
from flashjax.kv_cache import KVCacheState
from flashjax.tensor_parallel import tp_flash_attention, tp_paged_decode_attention

__all__ = [
    "Pages", "page_head_dim", "init_pages", "init_cache", "prefill", "decode", "gather_layer",
    "ModelRunner", "bucket", "pad_prompts", "check_block_size", "cache_dtype", "is_fp8",
]

# tuple[tuple[jax.Array, ...], ...]: per layer (k_pages, v_pages), or for an FP8
# cache (k_pages, v_pages, k_scales, v_scales)
Pages = tuple


# --------------------------------------------------------------------------
# Cache construction
# --------------------------------------------------------------------------


def page_head_dim(head_dim: int) -> int:
    """The head dim pages are stored with: the smallest supported one >= head_dim."""
    for d in SUPPORTED_HEAD_DIMS:
        if d >= head_dim:
            return d
    raise ValueError(f"head_dim {head_dim} is larger than the decode kernel supports "
                     f"({max(SUPPORTED_HEAD_DIMS)})")


def check_block_size(block_size) -> int:
    if (not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool)
            or block_size < 1 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a positive power of two, got {block_size!r}")
    return int(block_size)


def cache_dtype(config, dtype=None):
    """The page dtype of a cache for `config`: `dtype` (None or "auto": the model's
    compute dtype; "bf16", "fp16", "fp32", "fp8", or a dtype); ValueError naming
    kv_cache_dtype otherwise."""
    return kv_cache.resolve_cache_dtype(dtype, config.dtype)


def is_fp8(layer) -> bool:
    """Whether a layer's cache tuple is an FP8 one (pages + scales)."""
    return len(layer) == 4


def init_pages(config, num_blocks: int, block_size: int, dtype=None) -> Pages:
    """Zeroed per-layer (k_pages, v_pages) for `config` (a ModelConfig); with an
    FP8 `dtype`, per-layer (k_pages, v_pages, k_scales, v_scales)."""
    block_size = check_block_size(block_size)
    dtype = cache_dtype(config, dtype)
    hd = page_head_dim(config.head_dim)

    def layer():
        pages = kv_cache.init_pages(num_blocks, block_size, config.kv_heads, hd, dtype)
        if dtype == kv_cache.FP8:
            return pages + kv_cache.init_scales(num_blocks, block_size, config.kv_heads)
        return pages

    return tuple(layer() for _ in range(config.n_layer))


def init_cache(config, *, num_blocks: int, max_seqs: int, block_size: int = 16,
               max_blocks_per_seq: int | None = None, dtype=None) -> tuple[Pages, KVCacheState]:
    """(pages, allocator state). max_blocks_per_seq defaults to the model's context."""
    block_size = check_block_size(block_size)
    if max_blocks_per_seq is None:
        max_blocks_per_seq = -(-config.max_seq_len // block_size)
    state = kv_cache.init_state(num_blocks, max_seqs, max_blocks_per_seq, block_size)
    return init_pages(config, num_blocks, block_size, dtype), state


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _pad_last(x, d):
    extra = d - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def _window(config):
    """The model's sliding window (a query sees its last `window` positions), or None."""
    w = getattr(config, "sliding_window", None)
    return None if w is None or w >= config.max_seq_len else int(w)


def _window_decode(q, layer, state, seq_ids, kv_lengths, window, sm_scale):
    """Decode attention over the last `window` keys of each row, from gathered pages (XLA).

    The paged kernel has no window; a sliding-window model decodes with this instead.
    q [B, heads, d]; layer: the layer's cache tuple; returns [B, heads, d] float32.
    """
    B, h, d = q.shape
    kvh = layer[0].shape[0]
    kpos = kv_lengths[:, None] - window + jnp.arange(window, dtype=jnp.int32)[None, :]
    kk, vv = gather_layer(*layer[:2], state, seq_ids, kpos, *layer[2:])  # [B, W, kvh, d]
    qg = q.reshape(B, kvh, h // kvh, d).astype(jnp.float32)
    sc = jnp.einsum("bhgd,bwhd->bhgw", qg, kk.astype(jnp.float32)) * sm_scale
    valid = (kpos >= 0) & (kpos < kv_lengths[:, None])
    sc = jnp.where(valid[:, None, None, :], sc, -jnp.inf)
    m = jnp.max(sc, axis=-1, keepdims=True)
    p = jnp.exp(sc - jnp.where(jnp.isfinite(m), m, 0.0))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    o = jnp.einsum("bhgw,bwhd->bhgd", p, vv.astype(jnp.float32))
    return o.reshape(B, h, d)


def _clip_positions(model, positions):
    return jnp.clip(positions, 0, model.config.max_seq_len - 1).astype(jnp.int32)


def _reserve(state: KVCacheState, seq_ids, counts, *, continuation: bool, allocate: bool = True):
    """Activate new slots and grow each row's sequence by counts[b] tokens.

    Returns (state, starts): starts[b] is the row's first new position (its
    length before the call; 0 for new sequences). All or nothing.
    allocate=False: the caller's block tables already hold the blocks (a host
    block pool gave them out); only the lengths grow.
    """
    S = state.max_seqs
    seq_ids = jnp.asarray(seq_ids, jnp.int32)
    counts = jnp.asarray(counts, jnp.int32)
    live = (seq_ids >= 0) & (counts > 0)
    s = jnp.clip(seq_ids, 0, S - 1)
    was_active = state.active[s] & live
    starts = jnp.where(was_active, state.lengths[s], 0)
    new = live & ~was_active
    slot = jnp.where(live, seq_ids, S)
    dup = (slot[:, None] == slot[None, :]) & live[:, None] & live[None, :]
    dup = jnp.any(dup & ~jnp.eye(seq_ids.shape[0], dtype=bool))
    activated = state.replace(active=state.active.at[jnp.where(new, seq_ids, S)].set(True, mode="drop"))
    grow = jnp.zeros((S,), jnp.int32).at[slot].add(jnp.where(live, counts, 0), mode="drop")
    if allocate:
        grown = kv_cache.append_batch(activated, grow)
    else:
        grown = activated.replace(lengths=jnp.where(activated.active, activated.lengths, 0) + grow)
    errors = [
        (jnp.any(live & (seq_ids >= S)) | dup, kv_cache.INVALID_SEQ),
        (jnp.any(counts < 0), kv_cache.INVALID_ARG),
    ]
    if not continuation:
        errors.append((jnp.any(was_active), kv_cache.SEQ_ACTIVE))
    errors.append((grown.status != kv_cache.OK, grown.status))
    status = jnp.asarray(kv_cache.OK, jnp.int32)
    for failed, code in reversed(errors):
        status = jnp.where(failed, jnp.asarray(code, jnp.int32), status)
    ok = status == kv_cache.OK
    out = jax.tree.map(lambda a, b: jnp.where(ok, a, b), grown, state)
    return out.replace(status=status), starts


def gather_layer(k_pages, v_pages, state: KVCacheState, seq_ids, positions, k_scales=None,
                 v_scales=None, dtype=None):
    """K, V [B, P, kv_heads, page_head_dim] at `positions` [B, P] of sequences
    `seq_ids` [B]; positions outside [0, length) (or rows with seq -1) give 0.
    With an FP8 pool's k_scales / v_scales the values are dequantized, in `dtype`
    (default float32); otherwise they keep the pages' dtype."""
    kvh, nb, bs, hd = k_pages.shape
    seq_ids = jnp.asarray(seq_ids, jnp.int32)
    s = jnp.clip(seq_ids, 0, state.max_seqs - 1)
    tables = state.block_tables[s]  # [B, max_blocks]
    col = jnp.clip(positions // bs, 0, state.max_blocks_per_seq - 1)
    blk = jnp.take_along_axis(tables, col, axis=1)
    valid = ((seq_ids >= 0)[:, None] & (positions >= 0) & (positions < state.lengths[s][:, None])
             & (blk >= 0))
    blk = jnp.clip(blk, 0, nb - 1)
    off = jnp.clip(positions, 0, None) % bs

    def one(pages, scales):
        g = pages[:, blk, off, :]  # [kvh, B, P, hd]
        if scales is not None:
            g = kv_cache.dequantize_fp8(g, scales[:, blk, off], jnp.float32 if dtype is None else dtype)
        g = jnp.moveaxis(g, 0, 2)
        return jnp.where(valid[:, :, None, None], g, jnp.zeros((), g.dtype))

    return one(k_pages, k_scales), one(v_pages, v_scales)


def _write_layer(layer, state, seq_ids, positions, k, v):
    """Write new tokens' K, V into a layer's cache tuple (quantizing for FP8)."""
    if is_fp8(layer):
        return kv_cache.write_kv_fp8(*layer, state, seq_ids, positions, k, v)
    return kv_cache.write_kv(*layer, state, seq_ids, positions, k, v)


# --------------------------------------------------------------------------
# Prefill and decode
# --------------------------------------------------------------------------


def prefill(model, pages: Pages, state: KVCacheState, tokens, seq_ids, lengths, *,
            continuation: bool = False, kv_len: int | None = None, all_logits: bool = False,
            flash_kwargs: dict | None = None, allocate: bool = True):
    """Write a chunk of prompt tokens into the cache and return its logits.

    tokens: int [B, T], row b's real tokens in tokens[b, :lengths[b]].
    seq_ids: int [B] cache slots (-1: padding row); no slot twice.
    lengths: int [B] real tokens per row (0: padding row), <= T.
    continuation: see the module doc. Static.
    kv_len: (continuation only, static) keys gathered per row; must be >=
      max(prefix length) + T. Default: state.capacity + T.
    all_logits: return logits for every position [B, T, vocab] instead of
      the last real token's [B, vocab]. Static.
    allocate: False when `state.block_tables` already hold blocks for the new
      tokens (the engine's host block pool); only lengths grow. Static.

    Returns (logits float32, pages, state).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    B, T = tokens.shape
    seq_ids = jnp.asarray(seq_ids, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if seq_ids.shape != (B,) or lengths.shape != (B,):
        raise ValueError(f"seq_ids and lengths must have shape [B]=({B},), got {seq_ids.shape} "
                         f"and {lengths.shape}")
    c = model.config
    if len(pages) != c.n_layer:
        raise ValueError(f"pages has {len(pages)} layers, the model {c.n_layer}")
    hd, phd = c.head_dim, pages[0][0].shape[-1]
    lengths = jnp.clip(lengths, 0, T)
    state, starts = _reserve(state, seq_ids, lengths, continuation=continuation, allocate=allocate)
    positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    mpos = _clip_positions(model, positions)
    fk = dict(flash_kwargs or {})
    window = _window(c)
    if window is not None:
        fk.setdefault("window", window - 1)

    if continuation:
        kv_len = state.capacity + T if kv_len is None else int(kv_len)
        # key j of row b holds absolute position starts[b] + T - kv_len + j, so the
        # bottom-right causal mask (query i at key i + kv_len - T) is exact.
        kpos = starts[:, None] + (T - kv_len) + jnp.arange(kv_len, dtype=jnp.int32)[None, :]
        q_seg = jnp.zeros((B, T), jnp.int32)
        kv_seg = jnp.where(kpos >= 0, 0, 1).astype(jnp.int32)

    new_pages = list(pages)
    x = model.embed(tokens, mpos)
    for i, block in enumerate(model.blocks):
        def attend(q, k, v, _i=i):
            layer = _write_layer(new_pages[_i], state, seq_ids[:, None], positions,
                                 _pad_last(k, phd), _pad_last(v, phd))
            new_pages[_i] = layer
            if not continuation:
                return tp_flash_attention(q, k, v, causal=True, **fk)
            # FP8: dequantized (to q's dtype) in the gather
            kk, vv = gather_layer(*layer[:2], state, seq_ids, kpos, *layer[2:], dtype=q.dtype)
            kk, vv = kk[..., :hd].astype(q.dtype), vv[..., :hd].astype(q.dtype)
            return tp_flash_attention(q, kk, vv, causal=True, segment_ids=(q_seg, kv_seg), **fk)

        x = block(x, mpos, attend)
    if all_logits:
        logits = model.logits(x)
    else:
        last = jnp.clip(lengths - 1, 0, T - 1)
        x_last = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [B, 1, d]
        logits = model.logits(x_last)[:, 0]
    return logits, tuple(new_pages), state


def decode(model, pages: Pages, state: KVCacheState, tokens, seq_ids, *,
           decode_kwargs: dict | None = None, allocate: bool = True):
    """One decode step: token[b] is appended to sequence seq_ids[b] (-1: idle row).

    Returns (logits float32 [B, vocab], pages, state). Every named slot must be
    active; rows may not repeat a slot. allocate=False: the block tables
    already hold the new token's block (see `prefill`).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    seq_ids = jnp.asarray(seq_ids, jnp.int32)
    (B,) = tokens.shape
    if seq_ids.shape != (B,):
        raise ValueError(f"seq_ids must have shape [B]=({B},), got {seq_ids.shape}")
    c = model.config
    if len(pages) != c.n_layer:
        raise ValueError(f"pages has {len(pages)} layers, the model {c.n_layer}")
    hd, phd = c.head_dim, pages[0][0].shape[-1]
    S = state.max_seqs
    live = (seq_ids >= 0) & (seq_ids < S)
    s = jnp.clip(seq_ids, 0, S - 1)
    positions = jnp.where(live, state.lengths[s], 0)
    grow = jnp.zeros((S,), jnp.int32).at[jnp.where(live, seq_ids, S)].add(1, mode="drop")
    grown = kv_cache.append_batch(state, grow) if allocate else state.replace(lengths=state.lengths + grow)
    status = jnp.where(jnp.any((seq_ids >= S)), jnp.int32(kv_cache.INVALID_SEQ), grown.status)
    state = grown.replace(status=status)
    kv_lengths = jnp.where(live, state.lengths[s], 0)
    tables = state.block_tables[s]
    dk = dict(decode_kwargs or {})
    sm_scale = dk.pop("sm_scale", 1.0 / math.sqrt(hd))
    window = _window(c)

    new_pages = list(pages)
    mpos = _clip_positions(model, positions)[:, None]
    x = model.embed(tokens[:, None], mpos)
    for i, block in enumerate(model.blocks):
        def attend(q, k, v, _i=i):
            layer = _write_layer(new_pages[_i], state, seq_ids, positions,
                                 _pad_last(k[:, 0], phd), _pad_last(v[:, 0], phd))
            new_pages[_i] = layer
            qp = _pad_last(q[:, 0], phd)
            if not is_fp8(layer):  # the kernel computes in the pages' dtype (FP8: in q's)
                qp = qp.astype(layer[0].dtype)
            if window is None:
                scales = dict(k_scales=layer[2], v_scales=layer[3]) if is_fp8(layer) else {}
                o = tp_paged_decode_attention(qp, layer[0], layer[1], tables, kv_lengths,
                                              sm_scale=sm_scale, **scales, **dk)
            else:
                o = _window_decode(qp, layer, state, jnp.where(live, seq_ids, -1), kv_lengths, window,
                                   sm_scale)
            return o[..., :hd].astype(q.dtype)[:, None]

        x = block(x, mpos, attend)
    logits = model.logits(x)[:, 0]
    return logits, tuple(new_pages), state


# --------------------------------------------------------------------------
# Host helpers for fixed shapes
# --------------------------------------------------------------------------


def bucket(n: int, *, minimum: int = 16, maximum: int | None = None) -> int:
    """The power of two >= max(n, minimum), capped at `maximum` (if n fits under it)."""
    b = max(int(minimum), 1)
    while b < n:
        b *= 2
    if maximum is not None and n <= maximum:
        b = min(b, int(maximum))
    return b


def pad_prompts(prompts, length: int, rows: int | None = None, pad_id: int = 0):
    """(tokens int32 [rows, length], lengths int32 [rows]) from lists of ids; extra rows are padding."""
    rows = len(prompts) if rows is None else rows
    tokens = np.full((rows, length), pad_id, np.int32)
    lengths = np.zeros((rows,), np.int32)
    for i, p in enumerate(prompts):
        p = np.asarray(p, np.int32).reshape(-1)
        if p.size > length:
            raise ValueError(f"prompt {i} has {p.size} tokens, more than the bucket of {length}")
        tokens[i, : p.size] = p
        lengths[i] = p.size
    return tokens, lengths


# --------------------------------------------------------------------------
# Jitted runner for one model
# --------------------------------------------------------------------------


class ModelRunner:
    """Jitted prefill/decode for one model and cache geometry (pages donated).

        runner = ModelRunner(model, num_blocks=256, max_seqs=8, block_size=16)
        pages, state = runner.init_cache()
        logits, pages, state = runner.prefill(pages, state, tokens, seq_ids, lengths)
        logits, pages, state = runner.decode(pages, state, next_ids, seq_ids)

    `params` (an nnx.State) can be swapped per call (`params=`); compiled
    executables are reused for equal shapes.
    """

    def __init__(self, model, *, num_blocks: int, max_seqs: int, block_size: int = 16,
                 max_blocks_per_seq: int | None = None, dtype=None):
        self.config = model.config
        self.block_size = check_block_size(block_size)
        self.num_blocks = int(num_blocks)
        self.max_seqs = int(max_seqs)
        self.max_blocks_per_seq = (-(-self.config.max_seq_len // self.block_size)
                                   if max_blocks_per_seq is None else int(max_blocks_per_seq))
        self.dtype = cache_dtype(self.config, dtype)
        self.graphdef, self.params = nnx.split(model)
        self._prefill = jax.jit(self._prefill_impl, donate_argnums=(1,),
                                static_argnames=("continuation", "kv_len", "all_logits"))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1,))

    def init_cache(self) -> tuple[Pages, KVCacheState]:
        return init_cache(self.config, num_blocks=self.num_blocks, max_seqs=self.max_seqs,
                          block_size=self.block_size, max_blocks_per_seq=self.max_blocks_per_seq,
                          dtype=self.dtype)

    def _prefill_impl(self, params, pages, state, tokens, seq_ids, lengths, *, continuation,
                      kv_len, all_logits):
        model = nnx.merge(self.graphdef, params)
        return prefill(model, pages, state, tokens, seq_ids, lengths, continuation=continuation,
                       kv_len=kv_len, all_logits=all_logits)

    def _decode_impl(self, params, pages, state, tokens, seq_ids):
        model = nnx.merge(self.graphdef, params)
        return decode(model, pages, state, tokens, seq_ids)

    def prefill(self, pages, state, tokens, seq_ids, lengths, *, continuation: bool = False,
                kv_len: int | None = None, all_logits: bool = False, params: Any = None):
        return self._prefill(self.params if params is None else params, pages, state,
                             jnp.asarray(tokens, jnp.int32), jnp.asarray(seq_ids, jnp.int32),
                             jnp.asarray(lengths, jnp.int32), continuation=continuation,
                             kv_len=kv_len, all_logits=all_logits)

    def decode(self, pages, state, tokens, seq_ids, *, params: Any = None):
        return self._decode(self.params if params is None else params, pages, state,
                            jnp.asarray(tokens, jnp.int32), jnp.asarray(seq_ids, jnp.int32))
