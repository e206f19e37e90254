"""FlashAttention in Pallas: a tiled forward with online softmax and a
recomputing backward, with causal, sliding-window and block-sparse skipping.

Layout follows JAX: ``q`` is ``[batch, q_len, heads, head_dim]`` and ``k``, ``v``
are ``[batch, kv_len, kv_heads, head_dim]`` with ``heads`` a multiple of
``kv_heads`` (GQA/MQA read K/V through the head index, never repeated).

Forward (FlashAttention-2): one program per (query tile, batch, head) streams
the key/value tiles it can see, keeps the running max ``m``, denominator ``l``
and un-normalised output in registers, and writes ``O`` and the row
log-sum-exp. No ``q_len x kv_len`` array ever reaches HBM.

Which key tiles a query tile visits comes from the mask geometry: a causal or
sliding-window mask bounds the tile range, and tiles wholly inside the visible
band run without any masking arithmetic; only the band's edge tiles are
masked. A block-sparse mask goes through an index list per query tile, so cost
falls with the number of live tiles.

Backward (FlashAttention-2): residuals are only Q, K, V, O and the
log-sum-exp. ``delta = rowsum(dO * O)`` is one fused XLA reduction; then one
kernel parallel over key tiles accumulates dK and dV (looping over the query
heads of its KV group and the query tiles that see it), and one kernel parallel
over query tiles accumulates dQ. Both recompute the probabilities from the
saved log-sum-exp. Splitting dQ from dK/dV avoids atomics and keeps each
accumulator in registers, and makes the backward deterministic: every dQ, dK and
dV element is summed by one program in a fixed order (key tiles in order for dQ;
the group's heads, then query tiles in order for dK/dV), so gradients are
bit-identical run to run without any XLA flag.

The mask (causal and sliding window aligned bottom-right, the padded key tail,
per-sequence lengths, segment ids) is one function,
:func:`flashjax._attention_common.visible`, that the forward, dQ and dK/dV kernels
all call; so is the soft-capped score.

Which kernels run a call is one table, :data:`IMPLEMENTATIONS`: one entry per
implementation ("mosaic": the Hopper kernels of :mod:`flashjax.attention_sm90`;
"triton": the kernels here; "xla": the plain-XLA reference) with what it supports.
``implementation="auto"`` takes the first entry that supports the call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flashjax import _attention_common as common
from flashjax import _backend, attention_sm90
from flashjax._attention_common import LN2, LOG2E, MAX_HEAD_DIM
from flashjax._backend import compute_capability, resolve_interpret
from flashjax.reference import attention_reference, normalize_window

# float32 matmuls in the compiled kernels: six bf16 tensor-core passes (each operand
# split into three bf16 pieces; the dropped cross terms are below float32's epsilon).
# Precision.HIGHEST lowers to Triton's "ieee" dot instead, which runs on CUDA cores as
# fully unrolled FMAs (tile_m * tile_n * tile_k / threads per dot and thread: 8192 at
# the 128x128 forward tile of head_dim 128), several dots per loop body and up to three
# copies of each body (masked / unmasked tiles): compiling that took seconds at head_dim
# 64 and did not finish in minutes at 128 (issue 19). Interpret mode keeps HIGHEST.
FLOAT32_DOT = lax.DotAlgorithmPreset.BF16_BF16_F32_X6


_TILE_FIELDS = ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "block_q_dq", "block_k_dq")
_DQ_DEFAULTS = {"block_q_dq": "block_q_bwd", "block_k_dq": "block_k_bwd",
                "num_warps_dq": "num_warps_bwd", "num_stages_dq": "num_stages_bwd"}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters of the kernels.

    ``None`` picks the default for the head dimension and dtype (`default_tiles`,
    one table; float32 gets smaller tiles). Every tile is clamped to the
    (power-of-two rounded) sequence length, so short inputs work as is.
    """

    block_q: int | None = None  # forward: query rows per program
    block_k: int | None = None  # forward: key rows per loop step
    block_q_bwd: int | None = None  # backward: query tile (dQ program / dK,dV loop step)
    block_k_bwd: int | None = None  # backward: key tile (dK,dV program / dQ loop step)
    num_warps: int | None = None
    num_stages: int | None = None
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None
    # The dQ kernel's own tiles and launch parameters. None: the default for the head
    # dim, or the matching *_bwd value when that one is set.
    block_q_dq: int | None = None  # dQ program's query rows
    block_k_dq: int | None = None  # dQ loop step's keys
    num_warps_dq: int | None = None
    num_stages_dq: int | None = None

    def resolved(self, head_dim: int, interpret: bool, dtype=None) -> "BlockSizes":
        """Every field set: the defaults of `default_tiles` for (head_dim, dtype), the
        fields given here on top. dtype None means a 16-bit one."""
        d = default_tiles(head_dim, dtype, interpret)
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if val is not None:
                d[f.name] = int(val)
        for name, base in _DQ_DEFAULTS.items():
            # A dQ field left as None follows its *_bwd field when that was given
            # (or has no dQ-specific default).
            if getattr(self, name) is None and (getattr(self, base) is not None or name not in d):
                d[name] = d[base]
        for name in _TILE_FIELDS:
            b = d[name]
            if b < 16 or b & (b - 1):
                raise ValueError(f"block_sizes.{name} must be a power of two >= 16, got {b}")
        return BlockSizes(**d)


# The default tiles and launch parameters: (largest head_dim, 16-bit inputs, float32
# inputs). BlockSizes fields left out follow the *_bwd ones (the dQ kernel's).
#
# 16-bit: sweeps on an H100, bf16 (benchmarks/attention.py --sweep; for head_dim 64 a
# per-kernel profile sweep, causal, 12 heads, seq 1k/4k/16k, against the earlier
# 128x128 / 128x64 tiles: forward -6..-14%, dQ -13%, dK/dV -8..-17%).
#
# float32: a float32 tile holds twice the bytes of a 16-bit one of the same shape, and
# each float32 matmul is six bf16 ones (FLOAT32_DOT) whose split operands need their own
# shared-memory copies; so the tiles are halved along the streamed axis to keep each
# loop step's loads near 32 KiB, with at most two pipeline stages. This keeps registers
# and shared memory in bounds at every head_dim and the compile short (issue 19).
_TILE_TABLE = (
    (64,
     dict(block_q=64, block_k=128, block_q_bwd=64, block_k_bwd=64,
          num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=3,
          block_q_dq=64, block_k_dq=128, num_warps_dq=4, num_stages_dq=3),
     dict(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64,
          num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)),
    (128,
     dict(block_q=128, block_k=128, block_q_bwd=64, block_k_bwd=64,
          num_warps=8, num_stages=3, num_warps_bwd=4, num_stages_bwd=2),
     dict(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32,
          num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)),
    (MAX_HEAD_DIM,
     dict(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=32,
          num_warps=8, num_stages=2, num_warps_bwd=4, num_stages_bwd=1),
     dict(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=16,
          num_warps=4, num_stages=1, num_warps_bwd=4, num_stages_bwd=1)),
)
# Interpret mode (CPU): small tiles, so that tests exercise many tiles cheaply.
_INTERPRET_TILES = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16,
                        num_warps=4, num_stages=1, num_warps_bwd=4, num_stages_bwd=1)


def default_tiles(head_dim: int, dtype=None, interpret: bool = False) -> dict:
    """The default BlockSizes fields for a (power-of-two padded) head_dim and input dtype
    (None: a 16-bit one): the one place they are chosen."""
    if interpret:
        return dict(_INTERPRET_TILES)
    wide = dtype is not None and jnp.dtype(dtype) == jnp.dtype(jnp.float32)
    for max_d, tiles16, tiles32 in _TILE_TABLE:
        if head_dim <= max_d:
            return dict(tiles32 if wide else tiles16)
    raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of one attention call (hashable: a jit/vjp static)."""

    q_len: int
    kv_len: int
    q_pad: int
    kv_pad: int
    heads: int
    kv_heads: int
    head_dim: int  # padded head dim the kernels see
    sm_scale: float
    causal: bool
    left: int  # keys visible left of the aligned diagonal; -1 unbounded
    right: int  # keys visible right of it; -1 unbounded
    softcap: float | None
    has_q_lengths: bool
    has_kv_lengths: bool
    has_segments: bool
    sparse: bool
    blocks: BlockSizes
    interpret: bool
    poison: bool
    fwd_impl: str = "triton"  # "triton" (Pallas Triton kernels) or "mosaic" (attention_sm90)
    bwd_impl: str = "triton"  # the backward's; mosaic's forward pairs with either

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def offset(self) -> int:  # bottom-right alignment: query i sits at key i + offset
        return self.kv_len - self.q_len

    @property
    def has_data_mask(self) -> bool:
        return self.has_q_lengths or self.has_kv_lengths or self.has_segments

    def k_band(self):
        """Key offsets (a, b) visible from query x: keys in [x + a, x + b] (None: unbounded)."""
        return common.key_band(self.offset, self.left, self.right)

    def q_band(self):
        """Query offsets visible from key y: queries in [y + a, y + b] (None: unbounded)."""
        return common.query_band(self.offset, self.left, self.right)


# ----------------------------------------------------------------------------
# In-kernel helpers


def _cdiv(x, t):
    return lax.div(x + (t - 1), t)


def _mask(spec, q_pos, k_pos, *, geometric: bool, q_limit=None, kv_limit=None, q_seg=None,
          kv_seg=None):
    """The kernels' one mask (`common.visible`), for a tile in either orientation.

    The data masks (per-sequence lengths, segment ids) apply to every tile; the geometry
    (band edges, the padded key tail) only where `geometric`: tiles that the band
    clipping of `common.tile_ranges` did not find wholly visible. None if nothing is masked."""
    tail = geometric and spec.kv_pad != spec.kv_len
    return common.visible(
        q_pos, k_pos, offset=spec.offset,
        left=spec.left if geometric else -1, right=spec.right if geometric else -1,
        kv_len=spec.kv_len if tail else None, q_limit=q_limit, kv_limit=kv_limit,
        q_seg=q_seg, kv_seg=kv_seg)


def _dot_precision(dtype, interpret: bool):
    """Matmul precision of the kernels' dots: FLOAT32_DOT for float32 inputs when
    compiled, exact float32 (HIGHEST) in interpret mode, the default for 16-bit ones."""
    if jnp.dtype(dtype) != jnp.dtype(jnp.float32):
        return None
    return lax.Precision.HIGHEST if interpret else FLOAT32_DOT


def _dot(spec, a, b, trans_b=False):
    """a @ b (or a @ b.T) with a float32 accumulator."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=_dot_precision(a.dtype, spec.interpret),
                           preferred_element_type=jnp.float32)


def _scores(spec, s):
    """Raw q.k -> scores in log2 units (soft-cap applied). Also returns tanh for the backward."""
    return common.scores_log2(s, spec.sm_scale, spec.softcap)


def _p_and_ds(spec, s_raw, dp, lse, delta, mask):
    """One backward tile: P and dS (before sm_scale) from the raw scores q.k and dP = dO.v,
    P recomputed from the saved log2 log-sum-exp. The dQ kernel passes [query, key] tiles
    (lse, delta shaped [bq, 1]), the dK/dV kernel [key, query] tiles ([1, bq])."""
    s, t = _scores(spec, s_raw)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp2(s - lse)
    return p, common.softcap_grad(p * (dp - delta), t)


def _unpack_aux(spec, refs):
    """Split the optional input refs (in the order _aux_inputs builds them)."""
    refs = list(refs)
    out = {}
    for name, present in (("q_len", spec.has_q_lengths), ("kv_len", spec.has_kv_lengths),
                          ("q_seg", spec.has_segments), ("kv_seg", spec.has_segments),
                          ("idx", spec.sparse), ("cnt", spec.sparse)):
        out[name] = refs.pop(0) if present else None
    return out, refs


def _visit_key_tiles(spec, aux, body, carry, *, q_start, bq, bk, n_k_tiles, q_len_b, kv_len_b):
    """Run `body(key_tile, carry, geometric)` over the key tiles a query tile sees.

    Block-sparse: the tile's index list (all masked). Otherwise the band from
    `common.tile_ranges`: masked edge tiles on either side, unmasked tiles between,
    clipped by the per-sequence lengths.
    """
    if spec.sparse:
        count = aux["cnt"][0]
        if spec.has_q_lengths:
            count = jnp.where(q_start < q_len_b, count, 0)
        return lax.fori_loop(0, count, lambda t, c: body(aux["idx"][t], c, True), carry)
    lo, full_lo, full_hi, hi = common.tile_ranges(
        q_start, bq, bk, spec.k_band(), spec.kv_len, n_k_tiles, mask_tail=True)
    if spec.has_kv_lengths:
        hi = jnp.maximum(jnp.minimum(hi, _cdiv(kv_len_b, bk)), lo)
        full_lo, full_hi = _fit_full(full_lo, full_hi, hi)
    if spec.has_q_lengths:
        hi = jnp.where(q_start < q_len_b, hi, lo)
        full_lo, full_hi = _fit_full(full_lo, full_hi, hi)
    return common.visit_band(body, carry, lo, full_lo, full_hi, hi, low_edge=spec.k_band()[0] is not None)


def _fit_full(full_lo, full_hi, hi):
    """Keep the unmasked stretch [full_lo, full_hi) inside a range whose end fell to hi."""
    full_lo = jnp.minimum(full_lo, hi)
    return full_lo, jnp.clip(full_hi, full_lo, hi)


# ----------------------------------------------------------------------------
# Forward kernel


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, spec: _Spec, bq: int, bk: int, n_k_tiles: int):
    aux, (o_ref, lse_ref) = _unpack_aux(spec, refs)
    n_q_tiles = spec.q_pad // bq
    pid = pl.program_id(0)
    qt = (n_q_tiles - 1 - pid) if spec.causal else pid  # heavy causal rows first
    q_start = qt * bq
    d = spec.head_dim
    q = q_ref[...]
    rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_len_b = aux["q_len"][0] if spec.has_q_lengths else None
    kv_len_b = aux["kv_len"][0] if spec.has_kv_lengths else None
    q_seg = aux["q_seg"][pl.ds(q_start, bq)][:, None] if spec.has_segments else None

    def body(kt, carry, geometric: bool):
        acc, m_prev, l_prev = carry
        k_start = pl.multiple_of(kt * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s, _ = _scores(spec, _dot(spec, q, k, trans_b=True))
        cols = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = _mask(spec, rows, cols, geometric=geometric, q_limit=q_len_b, kv_limit=kv_len_b,
                     q_seg=q_seg,
                     kv_seg=aux["kv_seg"][pl.ds(k_start, bk)][None, :] if spec.has_segments else None)
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        # A row with no visible key yet keeps m = -inf; use 0 there so exp2 gives 0, not NaN.
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m_prev - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(spec, p.astype(v.dtype), v)
        return acc, m_new, l_new

    carry = (jnp.zeros((bq, d), jnp.float32),
             jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = _visit_key_tiles(spec, aux, body, carry, q_start=q_start, bq=bq, bk=bk,
                             n_k_tiles=n_k_tiles, q_len_b=q_len_b, kv_len_b=kv_len_b)
    acc, m, l = carry
    live = l > 0.0
    o = acc / jnp.where(live, l, 1.0)[:, None]
    o_ref[...] = o.astype(o_ref.dtype)
    # log2-domain log-sum-exp; +inf marks a row with no visible key (its p is 0 in the backward).
    lse_ref[...] = jnp.where(live, m + jnp.log2(jnp.where(live, l, 1.0)), jnp.inf)


def _aux_inputs(spec, aux, seg_q, seg_k, batch_of):
    """Optional inputs and their BlockSpecs, in the order `_unpack_aux` reads them."""
    args, specs = [], []
    if spec.has_q_lengths:
        args.append(aux["q_lengths"])
        specs.append(pl.BlockSpec((1,), lambda *g: (batch_of(*g),)))
    if spec.has_kv_lengths:
        args.append(aux["kv_lengths"])
        specs.append(pl.BlockSpec((1,), lambda *g: (batch_of(*g),)))
    if spec.has_segments:
        args += [aux["q_segment_ids"], aux["kv_segment_ids"]]
        specs += [seg_q, seg_k]
    return args, specs


def _list_inputs(lists, row_of):
    idx, cnt = lists
    return [idx, cnt], [pl.BlockSpec((None, idx.shape[1]), lambda *g: (row_of(*g), 0)),
                        pl.BlockSpec((1,), lambda *g: (row_of(*g),))]


def _pallas(kernel, *, spec, grid, inputs, in_specs, out_specs, out_shape, warps, stages, name):
    """pallas_call; with spec.poison the outputs start as NaN buffers (aliased), so any
    element a kernel does not write stays NaN."""
    aliases = {}
    axes = _backend.varying_axes(*inputs)
    out_shape = _backend.out_types(out_shape, inputs)
    if spec.poison:
        n_in, n_out = len(inputs), len(out_shape)
        inputs = [*inputs, *[_backend.vary_over(jnp.full(s.shape, jnp.nan, s.dtype), axes)
                             for s in out_shape]]
        in_specs = [*in_specs, *out_specs]
        aliases = {n_in + i: i for i in range(n_out)}
        inner = kernel

        def kernel(*refs):
            return inner(*refs[:n_in], *refs[n_in + n_out:])

    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=spec.interpret,
        name=name,
    )(*inputs)


def _fwd_call(q, k, v, aux, spec: _Spec):
    if spec.fwd_impl == "mosaic":
        return attention_sm90.forward(q, k, v, causal=spec.causal, sm_scale=spec.sm_scale,
                                      window=(spec.left, spec.right), softcap=spec.softcap,
                                      poison=spec.poison)
    batch, _, heads, d = q.shape
    bs = spec.blocks
    bq, bk = bs.block_q, bs.block_k
    n_q_tiles, n_k_tiles = spec.q_pad // bq, spec.kv_pad // bk
    group = spec.group

    def q_tile(i, b, h):  # causal: heaviest query tiles launch first
        return (n_q_tiles - 1 - i) if spec.causal else i

    q_row = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, q_tile(i, b, h), h, 0))
    kv_all = pl.BlockSpec((None, spec.kv_pad, None, d), lambda i, b, h: (b, 0, h // group, 0))
    args, specs = _aux_inputs(
        spec, aux,
        seg_q=pl.BlockSpec((None, spec.q_pad), lambda i, b, h: (b, 0)),
        seg_k=pl.BlockSpec((None, spec.kv_pad), lambda i, b, h: (b, 0)),
        batch_of=lambda i, b, h: b)
    if spec.sparse:
        a2, s2 = _list_inputs(aux["fwd_lists"], q_tile)
        args, specs = args + a2, specs + s2
    return _pallas(
        functools.partial(_fwd_kernel, spec=spec, bq=bq, bk=bk, n_k_tiles=n_k_tiles),
        spec=spec,
        grid=(n_q_tiles, batch, heads),
        inputs=[q, k, v, *args],
        in_specs=[q_row, kv_all, kv_all, *specs],
        out_specs=[q_row, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, q_tile(i, b, h)))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, spec.q_pad), jnp.float32)],
        warps=bs.num_warps, stages=bs.num_stages, name="flashjax_fwd")


# ----------------------------------------------------------------------------
# Backward kernels


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec: _Spec,
               bq: int, bk: int, n_k_tiles: int):
    aux, (dq_ref,) = _unpack_aux(spec, refs)
    n_q_tiles = spec.q_pad // bq
    pid = pl.program_id(0)
    qt = (n_q_tiles - 1 - pid) if spec.causal else pid
    q_start = qt * bq
    rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_len_b = aux["q_len"][0] if spec.has_q_lengths else None
    kv_len_b = aux["kv_len"][0] if spec.has_kv_lengths else None
    q_seg = aux["q_seg"][pl.ds(q_start, bq)][:, None] if spec.has_segments else None

    def body(kt, dq, geometric: bool):
        k_start = pl.multiple_of(kt * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        cols = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = _mask(spec, rows, cols, geometric=geometric, q_limit=q_len_b, kv_limit=kv_len_b,
                     q_seg=q_seg,
                     kv_seg=aux["kv_seg"][pl.ds(k_start, bk)][None, :] if spec.has_segments else None)
        _, ds = _p_and_ds(spec, _dot(spec, q, k, trans_b=True), _dot(spec, do, v, trans_b=True),
                          lse[:, None], delta[:, None], mask)
        return dq + _dot(spec, ds.astype(k.dtype), k)

    dq = _visit_key_tiles(spec, aux, body, jnp.zeros((bq, spec.head_dim), jnp.float32),
                          q_start=q_start, bq=bq, bk=bk, n_k_tiles=n_k_tiles,
                          q_len_b=q_len_b, kv_len_b=kv_len_b)
    dq = dq * spec.sm_scale
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec: _Spec,
                 bq: int, bk: int, n_q_tiles: int):
    aux, (dk_ref, dv_ref) = _unpack_aux(spec, refs)
    kt = pl.program_id(0)
    k_start = kt * bk
    k = k_ref[...]
    v = v_ref[...]
    cols = k_start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)  # key positions, as rows here
    q_len_b = aux["q_len"][0] if spec.has_q_lengths else None
    kv_len_b = aux["kv_len"][0] if spec.has_kv_lengths else None
    kv_seg = aux["kv_seg"][pl.ds(k_start, bk)][:, None] if spec.has_segments else None

    def body(qt, carry, geometric: bool):
        dk, dv, g = carry
        q_start = pl.multiple_of(qt * bq, bq)
        q = q_ref[pl.ds(q_start, bq), g, :]
        do = do_ref[pl.ds(q_start, bq), g, :]
        lse = lse_ref[g, pl.ds(q_start, bq)]
        delta = delta_ref[g, pl.ds(q_start, bq)]
        rows = q_start + lax.broadcasted_iota(jnp.int32, (1, bq), 1)  # query positions
        mask = _mask(spec, rows, cols, geometric=geometric, q_limit=q_len_b, kv_limit=kv_len_b,
                     q_seg=aux["q_seg"][pl.ds(q_start, bq)][None, :] if spec.has_segments else None,
                     kv_seg=kv_seg)
        # Transposed tiles, [bk, bq]: S^T = K Q^T, dP^T = V dO^T.
        p_t, ds_t = _p_and_ds(spec, _dot(spec, k, q, trans_b=True), _dot(spec, v, do, trans_b=True),
                              lse[None, :], delta[None, :], mask)
        dv = dv + _dot(spec, p_t.astype(do.dtype), do)
        dk = dk + _dot(spec, ds_t.astype(q.dtype), q)
        return dk, dv, g

    d = spec.head_dim
    dk = jnp.zeros((bk, d), jnp.float32)
    dv = jnp.zeros((bk, d), jnp.float32)
    if spec.sparse:
        count = aux["cnt"][0]
        if spec.has_kv_lengths:
            count = jnp.where(k_start < kv_len_b, count, 0)

        def per_head(g, c):
            dk, dv = c
            dk, dv, _ = lax.fori_loop(0, count, lambda i, cc: body(aux["idx"][i], cc, True), (dk, dv, g))
            return dk, dv
    else:
        lo, full_lo, full_hi, hi = common.tile_ranges(
            k_start, bk, bq, spec.q_band(), spec.q_len, n_q_tiles, mask_tail=False)
        if spec.kv_pad != spec.kv_len:  # the key tail tile is never "full": its padding is masked
            full_hi = jnp.where(k_start + bk > spec.kv_len, full_lo, full_hi)
        if spec.has_q_lengths:
            hi = jnp.maximum(jnp.minimum(hi, _cdiv(q_len_b, bq)), lo)
            full_lo, full_hi = _fit_full(full_lo, full_hi, hi)
        if spec.has_kv_lengths:
            hi = jnp.where(k_start < kv_len_b, hi, lo)
            full_lo, full_hi = _fit_full(full_lo, full_hi, hi)
        low_edge = spec.q_band()[0] is not None

        def per_head(g, c):
            c = common.visit_band(body, (*c, g), lo, full_lo, full_hi, hi, low_edge=low_edge)
            return c[0], c[1]

    if spec.group == 1:
        dk, dv = per_head(0, (dk, dv))
    else:
        dk, dv = lax.fori_loop(0, spec.group, per_head, (dk, dv))
    dk_ref[...] = (dk * spec.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_call(q, k, v, o, lse2, do, dlse, aux, spec: _Spec):
    # delta_i = sum_d dO*O (natural units); a cotangent on the log-sum-exp folds in here.
    # Elementwise multiply + reduce (not an einsum, which XLA may run as a TF32 matmul on GPU).
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse2 = lse2.astype(jnp.float32)
    if spec.bwd_impl == "mosaic":
        return attention_sm90.backward(q, k, v, do, lse2, delta, causal=spec.causal,
                                       sm_scale=spec.sm_scale, window=(spec.left, spec.right),
                                       softcap=spec.softcap, poison=spec.poison)
    q_len, kv_len = q.shape[1], k.shape[1]
    if (q_len, kv_len) == (spec.q_pad, spec.kv_pad):
        return _bwd_triton(q, k, v, do, lse2, delta, aux, spec)
    # After the Mosaic forward (which takes the arrays unpadded): pad for the Triton tiles
    # here. Padded query rows get log-sum-exp +inf (P = 0) and zero dO and delta, so they
    # add nothing; padded keys are zero and cut off, like the Triton forward's padding.
    def rows(x, value):
        return jnp.pad(x, ((0, 0), (0, 0), (0, spec.q_pad - q_len)), constant_values=value)

    dq, dk, dv = _bwd_triton(
        _pad_seq(q, spec.q_pad, spec.head_dim), _pad_seq(k, spec.kv_pad, spec.head_dim),
        _pad_seq(v, spec.kv_pad, spec.head_dim), _pad_seq(do, spec.q_pad, spec.head_dim),
        rows(lse2, jnp.inf), rows(delta, 0.0), aux, spec)
    return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]


def _bwd_triton(q, k, v, do, lse2, delta, aux, spec: _Spec):
    """The Triton backward (dQ kernel, then dK/dV kernel) on arrays padded to the tiles."""
    batch, _, heads, d = q.shape
    kv_heads, group = spec.kv_heads, spec.group
    bs = spec.blocks
    bq, bk = bs.block_q_bwd, bs.block_k_bwd
    n_q_tiles, n_k_tiles = spec.q_pad // bq, spec.kv_pad // bk

    # dQ: one program per (query tile, batch, head), streaming the key tiles it sees;
    # its own tiles (block_q_dq x block_k_dq).
    bq_dq, bk_dq = bs.block_q_dq, bs.block_k_dq
    n_q_dq = spec.q_pad // bq_dq

    def q_tile(i, b, h):
        return (n_q_dq - 1 - i) if spec.causal else i

    q_row = pl.BlockSpec((None, bq_dq, None, d), lambda i, b, h: (b, q_tile(i, b, h), h, 0))
    l_row = pl.BlockSpec((None, None, bq_dq), lambda i, b, h: (b, h, q_tile(i, b, h)))
    kv_all = pl.BlockSpec((None, spec.kv_pad, None, d), lambda i, b, h: (b, 0, h // group, 0))
    args, specs = _aux_inputs(
        spec, aux,
        seg_q=pl.BlockSpec((None, spec.q_pad), lambda i, b, h: (b, 0)),
        seg_k=pl.BlockSpec((None, spec.kv_pad), lambda i, b, h: (b, 0)),
        batch_of=lambda i, b, h: b)
    if spec.sparse:
        a2, s2 = _list_inputs(aux["dq_lists"], q_tile)
        args, specs = args + a2, specs + s2
    [dq] = _pallas(
        functools.partial(_dq_kernel, spec=spec, bq=bq_dq, bk=bk_dq, n_k_tiles=spec.kv_pad // bk_dq),
        spec=spec,
        grid=(n_q_dq, batch, heads),
        inputs=[q, k, v, do, lse2, delta, *args],
        in_specs=[q_row, kv_all, kv_all, q_row, l_row, l_row, *specs],
        out_specs=[q_row],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        warps=bs.num_warps_dq, stages=bs.num_stages_dq, name="flashjax_bwd_dq")

    # dK, dV: one program per (key tile, batch, kv head), looping over the group's
    # query heads and the query tiles that see the key tile.
    k_row = pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h, 0))
    q_group = pl.BlockSpec((None, spec.q_pad, group, d), lambda j, b, h: (b, 0, h, 0))
    l_group = pl.BlockSpec((None, group, spec.q_pad), lambda j, b, h: (b, h, 0))
    args, specs = _aux_inputs(
        spec, aux,
        seg_q=pl.BlockSpec((None, spec.q_pad), lambda j, b, h: (b, 0)),
        seg_k=pl.BlockSpec((None, spec.kv_pad), lambda j, b, h: (b, 0)),
        batch_of=lambda j, b, h: b)
    if spec.sparse:
        a2, s2 = _list_inputs(aux["dkdv_lists"], lambda j, b, h: j)
        args, specs = args + a2, specs + s2
    dk, dv = _pallas(
        functools.partial(_dkdv_kernel, spec=spec, bq=bq, bk=bk, n_q_tiles=n_q_tiles),
        spec=spec,
        grid=(n_k_tiles, batch, kv_heads),
        inputs=[q, k, v, do, lse2, delta, *args],
        in_specs=[q_group, k_row, k_row, q_group, l_group, l_group, *specs],
        out_specs=[k_row, k_row],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        warps=bs.num_warps_bwd, stages=bs.num_stages_bwd, name="flashjax_bwd_dkdv")
    return dq, dk, dv


# ----------------------------------------------------------------------------
# custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, aux, spec):
    o, lse2 = _fwd_call(q, k, v, aux, spec)
    return o, lse2


def _flash_fwd(q, k, v, aux, spec):
    o, lse2 = _fwd_call(q, k, v, aux, spec)
    return (o, lse2), (q, k, v, o, lse2, aux)


def _flash_bwd(spec, res, cts):
    q, k, v, o, lse2, aux = res
    do, dlse2 = cts
    # lse2 is in log2 units: a cotangent on it equals LOG2E times one on the natural lse.
    dlse = None if dlse2 is None else dlse2 * LOG2E
    dq, dk, dv = _bwd_call(q, k, v, o, lse2, do, dlse, aux, spec)
    return dq, dk, dv, jax.tree.map(lambda _: None, aux)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------
# Public entry point


def _check_int_array(name, x, shape):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    return x.astype(jnp.int32)


def _sparse_lists(active):
    """active: bool [rows, cols] -> (indices of live cols first [rows, cols_pow2], counts [rows])."""
    rows, cols = active.shape
    width = max(1, pl.next_power_of_2(cols))
    order = jnp.argsort(jnp.logical_not(active), axis=1, stable=True).astype(jnp.int32)
    order = jnp.pad(order, ((0, 0), (0, width - cols)))
    return order, jnp.sum(active, axis=1).astype(jnp.int32)


def _band_tiles(n_own, own_tile, n_other, other_tile, band, other_len):
    """Static bool [n_own, n_other]: which other-axis tiles any own position of a tile can see."""
    a, b = band
    own = np.arange(n_own)[:, None] * own_tile
    oth = np.arange(n_other)[None, :] * other_tile
    ok = oth < other_len
    if a is not None:
        ok = ok & (oth + other_tile - 1 >= own + a)
    if b is not None:
        ok = ok & (oth <= own + own_tile - 1 + b)
    return ok


def _sparse_aux(spec, block_mask, sbs):
    bs = spec.blocks
    bm = jnp.asarray(block_mask).astype(bool)

    def expand(own_tile, own_pad, other_tile, other_pad, transpose):
        n_own, n_other = own_pad // own_tile, other_pad // other_tile
        own_blocks = (np.arange(n_own) * own_tile) // sbs
        other_blocks = (np.arange(n_other) * other_tile) // sbs
        if transpose:  # own axis = keys
            live = bm[:, own_blocks][other_blocks, :].T
            geo = _band_tiles(n_own, own_tile, n_other, other_tile, spec.q_band(), spec.q_len)
        else:
            live = bm[own_blocks][:, other_blocks]
            geo = _band_tiles(n_own, own_tile, n_other, other_tile, spec.k_band(), spec.kv_len)
        return _sparse_lists(jnp.logical_and(live, jnp.asarray(geo)))

    return {
        "fwd_lists": expand(bs.block_q, spec.q_pad, bs.block_k, spec.kv_pad, False),
        "dq_lists": expand(bs.block_q_dq, spec.q_pad, bs.block_k_dq, spec.kv_pad, False),
        "dkdv_lists": expand(bs.block_k_bwd, spec.kv_pad, bs.block_q_bwd, spec.q_pad, True),
    }


# ----------------------------------------------------------------------------
# Which kernels run a call: one table


@dataclasses.dataclass(frozen=True)
class Call:
    """The static facts of one `flash_attention` call that decide which kernels can run it."""

    q_len: int
    kv_len: int
    head_dim: int
    dtype: Any
    causal: bool
    window: tuple[int, int] | None  # the sliding window's (left, right) (normalize_window)
    softcap: float | None
    masked: bool  # q_lengths, kv_lengths or segment_ids
    sparse: bool  # block_mask
    deterministic: bool
    interpret: bool


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One entry of the dispatch table.

    supports(call): None when it runs the call, else what it cannot run (named in
    errors). nondeterministic: None when its backward sums dQ, dK and dV in a fixed
    order, else why not; `deterministic=True` then takes another backward or refuses.
    residuals: what its forward saves for the backward; an "auto" call may pair one
    entry's forward with another's backward when these are equal ("o+lse2": O and the
    log2-domain log-sum-exp, as both Pallas forwards write it).
    """

    name: str
    description: str
    supports: Callable[[Call], str | None]
    nondeterministic: str | None
    residuals: str


def _mosaic_supports(call: Call) -> str | None:
    if call.interpret:
        return "interpret mode (it is a compiled Mosaic GPU kernel)"
    cc = compute_capability()
    if cc != "9.0":
        return f"a GPU of compute capability {cc or 'none'} (needs 9.0, Hopper)"
    # What the kernels do not take is attention_sm90.supports's one table (_LIMITS). The
    # Triton tiles (block_sizes) play no part: the Mosaic path takes q, k and v as they
    # are (padded by attention_sm90 itself only at lengths off multiples of 8).
    return attention_sm90.supports(
        q_len=call.q_len, kv_len=call.kv_len, head_dim=call.head_dim, dtype=call.dtype,
        causal=call.causal, window=call.window, softcap=call.softcap, masked=call.masked,
        sparse=call.sparse)


def _supports_all(call: Call) -> str | None:
    return None


# "auto" takes the first entry that supports the call. "triton" supports every call
# flash_attention accepts, so "xla" (which materialises q_len x kv_len scores) only
# runs when asked for by name.
IMPLEMENTATIONS = (
    Implementation(
        "mosaic", "Pallas Mosaic GPU kernels for Hopper (flashjax.attention_sm90): wgmma, TMA, "
        "a ping-pong forward, a 5-matmul backward", _mosaic_supports,
        nondeterministic="its backward adds dQ into HBM with TMA bulk reductions, in the order "
                         "the key blocks arrive",
        residuals="o+lse2"),
    Implementation(
        "triton", "Pallas Triton kernels (this module): every option", _supports_all,
        nondeterministic=None, residuals="o+lse2"),
    Implementation(
        "xla", "flashjax.attention_reference under jax.vjp: plain XLA, quadratic memory",
        _supports_all,
        nondeterministic="XLA autotunes its matmuls at each compile and may pick other "
                         "algorithms (only --xla_gpu_deterministic_ops fixes them)",
        residuals="autodiff"),
)
_BY_NAME = {impl.name: impl for impl in IMPLEMENTATIONS}


def _why_not(impl: Implementation, call: Call, *, backward: bool) -> str | None:
    why = impl.supports(call)
    if why is None and backward and call.deterministic and impl.nondeterministic:
        why = f"deterministic=True ({impl.nondeterministic})"
    return why


def choose_implementation(implementation: str, call: Call) -> tuple[str, str]:
    """(forward, backward) implementation names for `implementation=` and a call.

    "auto": the forward of the first table entry that supports the call; its backward
    too, unless `deterministic=True` and that backward is not, then the first entry
    with the same residuals whose backward is. A name: that entry for both, or a
    ValueError naming what it does not support."""
    names = ("auto", *_BY_NAME)
    if implementation not in names:
        raise ValueError(f"implementation must be one of {names}, got {implementation!r}")
    if implementation != "auto":
        why = _why_not(_BY_NAME[implementation], call, backward=True)
        if why is not None:
            raise ValueError(f"implementation={implementation!r} cannot run this call: {why}")
        return implementation, implementation
    reasons = []
    for fwd in IMPLEMENTATIONS:
        why = _why_not(fwd, call, backward=False)
        if why is not None:
            reasons.append(f"{fwd.name}: {why}")
            continue
        for bwd in (fwd, *IMPLEMENTATIONS):
            if bwd.residuals == fwd.residuals and _why_not(bwd, call, backward=True) is None:
                return fwd.name, bwd.name
        reasons.append(f"{fwd.name}: no backward for its residuals")
    raise ValueError("no implementation runs this call: " + "; ".join(reasons))


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "window", "softcap",
                                             "sparse_block_size", "return_lse"))
def _xla_attention(q, k, v, q_lengths, kv_lengths, segment_ids, block_mask, *, return_lse, **kw):
    """The "xla" entry: the plain-XLA reference in float32, cast back to q's dtype."""
    out = attention_reference(q, k, v, q_lengths=q_lengths, kv_lengths=kv_lengths,
                              segment_ids=segment_ids, block_mask=block_mask,
                              return_lse=return_lse, **kw)
    if return_lse:
        o, lse = out
        return o.astype(q.dtype), lse
    return out.astype(q.dtype)


def _round_up(x, m):
    return -(-x // m) * m


def flash_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    q_lengths=None,
    kv_lengths=None,
    segment_ids=None,
    window=None,
    softcap: float | None = None,
    block_mask=None,
    sparse_block_size: int = 128,
    block_sizes: BlockSizes | None = None,
    return_lse: bool = False,
    implementation: str = "auto",
    deterministic: bool = False,
    interpret: bool | None = None,
    poison_outputs: bool = False,
):
    """Memory-efficient exact attention (FlashAttention-2) as Pallas kernels.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, kv_len, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
        Same dtype as ``q``: bfloat16, float16 or float32. ``head_dim`` up to
        256 (powers of two run as is; others are zero-padded).
      causal: mask keys after the query. Aligned bottom-right: query ``i``
        sits at key position ``i + kv_len - q_len`` (decode/chunked-prefill
        convention), so with ``q_len > kv_len`` the first rows see nothing.
      sm_scale: logit scale, default ``1/sqrt(head_dim)``.
      q_lengths, kv_lengths: int ``[batch]``; rows/keys at or past the length
        are padding. Padding rows give zeros.
      segment_ids: int ``[batch, seq]`` (self-attention) or a pair
        ``(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])`` for
        packed sequences; a query only sees keys of its own segment.
      window: sliding window. An int ``w`` lets a query see ``w`` keys to the
        left of its aligned position (and ``w`` to the right unless causal); a
        pair ``(left, right)`` sets both sides, ``-1`` meaning unbounded.
      softcap: logit soft-capping ``softcap * tanh(logits / softcap)``.
      block_mask: bool ``[ceil(q_len / sparse_block_size), ceil(kv_len /
        sparse_block_size)]``; False tiles are skipped entirely (block-sparse
        attention). Combined with causal/window by logical and.
      sparse_block_size: granularity of ``block_mask``; a multiple of every
        tile size in use (default 128).
      block_sizes: tile sizes and launch parameters (``BlockSizes``).
      return_lse: also return the natural-log log-sum-exp ``[batch, heads,
        q_len]`` (float32; ``-inf`` for rows that see no key). Differentiable.
      implementation: which kernels run; one entry of ``IMPLEMENTATIONS``.
        ``"triton"``: Pallas Triton kernels (every option here is supported).
        ``"mosaic"``: Pallas Mosaic GPU kernels for Hopper, wgmma and TMA, with a
        backward that reduces dQ through TMA (``flashjax.attention_sm90``; what
        ``attention_sm90.supports`` is the one table of what it does not take: it
        runs causal or full masks, sliding windows and soft-cap, head_dim
        64/128/256, bf16/f16, GQA, any q_len/kv_len with causal (or a window whose
        right side is 0), and full attention or a window reaching right of the
        diagonal with kv_len a multiple of 8; lengths that are multiples of 8 run
        unpadded (no copy of q, k, v),
        others padded exactly by fewer than 8 key and 15 query rows
        (``attention_sm90.length_padding``); ``block_sizes`` only reach a Triton
        backward paired with it). ``"xla"``: the
        plain-XLA reference (``attention_reference``, float32 inside;
        materialises the ``q_len x kv_len`` scores; ``block_sizes`` ignored).
        ``"auto"`` (default) takes the first of mosaic, triton that supports the
        call. A named implementation that cannot run the call raises a
        ``ValueError`` saying why.
      deterministic: gradients summed in a fixed order, bit-identical from run to
        run (same device, shapes and versions), without XLA flags. The Triton
        backward always is (each dQ, dK, dV element summed by one program, key or
        query tiles in order, no atomics), so it costs nothing there. The Mosaic
        backward adds dQ with TMA bulk reductions in arrival order, so with
        ``deterministic=True`` ``"auto"`` pairs the Mosaic forward with the Triton
        backward and ``"mosaic"`` raises. ``"xla"`` raises (XLA's matmul
        autotuning). The forward is deterministic on every path.
      interpret: Pallas interpret mode; ``None`` compiles on GPU and
        interprets elsewhere.
      poison_outputs: testing aid: the kernels write into NaN-filled buffers,
        so an element a kernel forgets to write shows up as NaN.

    Returns:
      ``o`` of ``q``'s shape and dtype, or ``(o, lse)`` with ``return_lse``.
      Rows that see no key are zeros, never NaN.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name} must be a 4-d array [batch, seq, heads, head_dim], "
                f"got shape {getattr(x, 'shape', type(x).__name__)}")
    batch, q_len, heads, head_dim = q.shape
    kb, kv_len, kv_heads, kd = k.shape
    if kb != batch:
        raise ValueError(f"k batch {kb} does not match q batch {batch}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
    if kd != head_dim:
        raise ValueError(f"k/v head_dim {kd} does not match q head_dim {head_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads}) for grouped-query attention")
    if head_dim > MAX_HEAD_DIM or head_dim < 1:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if q_len == 0 or kv_len == 0 or batch == 0:
        raise ValueError(f"empty input: q shape {q.shape}, k shape {k.shape}")
    dtype = jnp.dtype(q.dtype)
    if dtype not in [jnp.dtype(t) for t in common.DTYPES]:
        raise TypeError(f"q dtype must be bfloat16, float16 or float32, got {dtype}")
    for name, x in (("k", k), ("v", v)):
        if jnp.dtype(x.dtype) != dtype:
            raise TypeError(f"{name} dtype {x.dtype} does not match q dtype {dtype}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    sm_scale = float(sm_scale)
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be finite, got {sm_scale}")
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0:
            raise ValueError(f"softcap must be > 0, got {softcap}")
    win = normalize_window(window, causal)
    left, right = (-1, 0 if causal else -1) if win is None else win
    if causal and right != 0:
        right = 0

    interpret = resolve_interpret(interpret)
    d_pad = max(16, pl.next_power_of_2(head_dim))
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a flashjax.BlockSizes, got {type(block_sizes).__name__}")
    blocks = (block_sizes or BlockSizes()).resolved(d_pad, interpret, dtype)

    def clamp(b, n):
        return min(b, max(16, pl.next_power_of_2(n)))

    blocks = dataclasses.replace(blocks, **{
        name: clamp(getattr(blocks, name), q_len if name.startswith("block_q") else kv_len) for name in _TILE_FIELDS})
    sparse = block_mask is not None
    if sparse:
        sbs = int(sparse_block_size)
        for name in _TILE_FIELDS:
            if sbs % getattr(blocks, name):
                raise ValueError(
                    f"sparse_block_size {sbs} must be a multiple of block_sizes.{name}="
                    f"{getattr(blocks, name)}")
        want = (-(-q_len // sbs), -(-kv_len // sbs))
        if tuple(jnp.shape(block_mask)) != want:
            raise ValueError(
                f"block_mask must have shape {want} (ceil(q_len/{sbs}), ceil(kv_len/{sbs})), "
                f"got {tuple(jnp.shape(block_mask))}")
    q_pad = _round_up(q_len, max(blocks.block_q, blocks.block_q_bwd, blocks.block_q_dq))
    kv_pad = _round_up(kv_len, max(blocks.block_k, blocks.block_k_bwd, blocks.block_k_dq))
    call = Call(
        q_len=q_len, kv_len=kv_len, head_dim=head_dim, dtype=dtype, causal=bool(causal),
        window=win, softcap=softcap,
        masked=any(x is not None for x in (q_lengths, kv_lengths, segment_ids)),
        sparse=sparse, deterministic=bool(deterministic), interpret=interpret)
    fwd_impl, bwd_impl = choose_implementation(implementation, call)

    aux: dict[str, Any] = {}
    if q_lengths is not None:
        aux["q_lengths"] = _check_int_array("q_lengths", q_lengths, (batch,))
    if kv_lengths is not None:
        aux["kv_lengths"] = _check_int_array("kv_lengths", kv_lengths, (batch,))
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError("segment_ids must be an array or a (q_segment_ids, kv_segment_ids) pair")
            q_seg, kv_seg = segment_ids
        else:
            if q_len != kv_len:
                raise ValueError(
                    "a single segment_ids array needs q_len == kv_len; pass "
                    "(q_segment_ids, kv_segment_ids) for cross attention")
            q_seg = kv_seg = segment_ids
        q_seg = _check_int_array("q_segment_ids", q_seg, (batch, q_len))
        kv_seg = _check_int_array("kv_segment_ids", kv_seg, (batch, kv_len))
        if fwd_impl == "xla":
            aux["segment_ids"] = (q_seg, kv_seg)
        # Padding gets ids no real token has: -1 for queries, -2 for keys.
        aux["q_segment_ids"] = jnp.pad(q_seg, ((0, 0), (0, q_pad - q_len)), constant_values=-1)
        aux["kv_segment_ids"] = jnp.pad(kv_seg, ((0, 0), (0, kv_pad - kv_len)), constant_values=-2)

    if fwd_impl == "xla":
        return _xla_attention(
            q, k, v, aux.get("q_lengths"), aux.get("kv_lengths"), aux.get("segment_ids"),
            None if block_mask is None else jnp.asarray(block_mask, bool), causal=bool(causal),
            sm_scale=sm_scale, window=win, softcap=softcap,
            sparse_block_size=int(sparse_block_size), return_lse=bool(return_lse))

    spec = _Spec(
        q_len=q_len, kv_len=kv_len, q_pad=q_pad, kv_pad=kv_pad, heads=heads,
        kv_heads=kv_heads, head_dim=d_pad, sm_scale=sm_scale, causal=bool(causal),
        left=left, right=right, softcap=softcap,
        has_q_lengths=q_lengths is not None, has_kv_lengths=kv_lengths is not None,
        has_segments=segment_ids is not None, sparse=sparse, blocks=blocks,
        interpret=interpret, poison=bool(poison_outputs), fwd_impl=fwd_impl, bwd_impl=bwd_impl)
    if sparse:
        aux.update(_sparse_aux(spec, block_mask, sbs))

    return _run(q, k, v, aux, spec=spec, return_lse=bool(return_lse))


def _pad_seq(x, seq, head_dim):
    """[batch, len, heads, dim] zero-padded to `seq` rows and `head_dim` columns (x itself
    when it has them)."""
    widths = ((0, 0), (0, seq - x.shape[1]), (0, 0), (0, head_dim - x.shape[3]))
    return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("spec", "return_lse"))
def _run(q, k, v, aux, *, spec: _Spec, return_lse: bool):
    # Jitted so eager calls reuse compiled kernels (a pallas_call outside jit would be
    # re-lowered on every call); under an outer jit this simply inlines.
    q_len, head_dim = spec.q_len, q.shape[-1]
    if spec.fwd_impl == "mosaic":
        # The Mosaic kernels take the arrays as they are (head_dim 64/128/256, any
        # length; attention_sm90.length_padding); the Triton tiles' padding is for a
        # Triton backward to do itself (_bwd_call).
        o, lse2 = _flash(q, k, v, aux, spec)
    else:
        o, lse2 = _flash(_pad_seq(q, spec.q_pad, spec.head_dim), _pad_seq(k, spec.kv_pad, spec.head_dim),
                         _pad_seq(v, spec.kv_pad, spec.head_dim), aux, spec)
        o = o[:, :q_len, :, :head_dim]
        lse2 = lse2[:, :, :q_len]
    if not return_lse:
        return o
    lse = jnp.where(jnp.isinf(lse2), -jnp.inf, lse2 * LN2)
    return o, lse
