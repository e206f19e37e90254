"""FlashAttention for Hopper (sm_90) in Pallas's Mosaic GPU dialect: wgmma and TMA.

Forward: one program per 128 query rows of a (batch, head). Warpgroup 2 streams
key tiles of K and V through a ring of shared-memory slots with TMA; warpgroups 0
and 1 each own 64 rows and run S = Q K^T, the online softmax and O += P V with
wgmma, taking turns on the tensor cores (ping-pong) so one's exponentials hide
behind the other's matmuls. It writes O and the log2-domain log-sum-exp that the
Triton forward in :mod:`flashjax.attention` writes (+inf for a row that sees no key).

Backward: the Triton backward runs two kernels, one for dK/dV and one for dQ,
which recomputes the scores and dP: seven matmuls per tile pair. This one does
five. One program per key block of a (batch, head):

* warpgroup 2 streams query tiles (Q, dO, log-sum-exp, delta) through rings of
  shared-memory slots with TMA;
* head_dim 64 and 128 (``split="keys"``): warpgroups 0 and 1 each own 64 of the
  block's 128 keys. Per query tile each computes S^T = K Q^T, P^T, dV += P^T dO,
  dP^T = V dO^T, dS^T and dK += dS^T Q with wgmma; both then write their half of
  dS^T to shared memory, and one of them (the two alternate by tile) computes
  dQ_tile = dS K over all 128 keys and adds it into a float32 dQ in HBM with a bulk
  TMA reduction (``cp.reduce.async.bulk``) instead of element-wise atomics;
* head_dim 256 (``split="dim"``): the dK and dV accumulators of 64 keys x 256 are
  too many registers for one warpgroup, so warpgroups 0 and 1 share a block of 64
  keys and each owns half of the head dimension: each computes S^T and dP^T (full
  contraction over head_dim) and its own columns of dV, dK and dQ. That repeats
  the two score matmuls (seven instead of five per tile) but needs no exchange
  between the warpgroups.

Shared memory (227 KB per block) and registers per head_dim (bf16/f16; fwd: Q/O
staging + K/V rings; bwd: K, V, Q ring, dO ring, dS^T, dQ staging)::

  head_dim  fwd block_k x stages  fwd smem   bwd layout             bwd smem
  64        128 x 2               80 KB      keys, 128 keys, 2+2    128 KB
  128       128 x 2               160 KB     keys, 128 keys, 2+2    225 KB
  256       64 x 2                192 KB     dim, 64 keys, 2+1      208 KB

(block_k must be a multiple of 64, wgmma's K for P V; head_dim 128 also fits a
3-stage ring, 224 KB, and 256 a 128 x 1 one: `FwdConfig`/`BwdConfig` take them.)

(fwd accumulators per compute warpgroup: 64 x head_dim float32 = head_dim / 2
registers per thread plus the 64 x block_k score tile; bwd ``keys``: dK and dV of
64 x head_dim float32, ``dim``: 64 x 128 each.) dK and dV leave through the K and V
buffers, the dS^T buffer or the dQ staging, so they cost no extra shared memory.

With GQA a backward program takes the query heads of its KV head in turn and sums
their dK/dV in registers (written once, in the input dtype); only when that leaves
fewer than two programs per SM are the heads split over programs that write float32
partial sums (``BwdConfig.head_splits``). K and V are never repeated in HBM.

Both cover causal (bottom-right aligned when the lengths differ) or full attention,
sliding windows (``window``: keys up to ``left`` before and ``right`` after the
bottom-right aligned diagonal, as in :mod:`flashjax.attention`), logit soft-capping
(``softcap * tanh(s / softcap)``), head_dim 64/128/256, bf16/f16, any GQA grouping;
no padding, segments or block-sparsity. The mask geometry is
:mod:`flashjax._attention_common`'s, shared with the Triton kernels: a program
visits only the tiles its band can see (`common.tile_ranges`: the forward's key
tiles, the backward's query tiles), runs the tiles all its rows see in full without
any mask and masks only the band's edge tiles (`common.visible`). Soft-cap costs one
tanh per score: the forward folds its factor ``softcap * log2 e`` into exp2's
argument as it does the scale, and the backward folds the cap's derivative
``1 - tanh^2`` into P before the dV and dP matmuls (`common.scores_log2`,
`common.softcap_grad`). Lengths (:func:`length_padding`):

* q_len and kv_len multiples of 8 (TMA views rows as tiles of 8): taken as they are.
  A tail tile is masked (the forward masks keys at or past kv_len; TMA reads past the
  end as zeros and drops writes past it), so nothing is padded or copied;
* other lengths, causal or a window: padded with zero rows to multiples of 8 (a copy
  of q, k and v, and a slice of the outputs), laid out so that the result is exact:
  keys at the end, queries as many at the end plus the rest in front, so that every
  real query keeps its bottom-right diagonal and its window. The kernels mask only
  keys past the array, so a padded key must be hidden by the mask itself: it is when
  the window ends at the diagonal (right side 0, as causal does), and there is none
  when kv_len is a multiple of 8; a window with keys right of the diagonal and a
  kv_len off 8 cannot be padded exactly, so `supports` refuses it;
* other lengths, full attention: queries padded at the end when kv_len is a
  multiple of 8; a kv_len that is not cannot be padded exactly (a zero key would get
  softmax weight in every row), so `supports` refuses it.

`supports` is the one table of what the Hopper path does not take (each limit with
the reason that ``flash_attention(..., implementation="mosaic")`` raises);
:mod:`flashjax.attention`'s ``"auto"`` uses the Triton kernels for those calls.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flashjax import _attention_common as common
from flashjax import _backend
from flashjax.reference import normalize_window

WG_ROWS = 64  # rows per compute warpgroup: wgmma's M
COMPUTE_WGS = 2
BLOCK_Q = WG_ROWS  # query rows per backward step (wgmma M for dQ)
HEAD_DIMS = (64, 128, 256)  # the kernels' head dims
# The head dims `supports` accepts, so that flash_attention's "auto" takes these kernels
# (set it back to (64,) to keep 128 and 256 on the Triton kernels).
SUPPORTED_HEAD_DIMS = HEAD_DIMS


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    block_k: int = 128  # keys per step (a multiple of 64: wgmma's K for P V)
    stages: int = 2  # depth of the K/V ring
    # Where the softmax row sum goes relative to the ping-pong hand-over: "before" it,
    # "pinned" before it behind an optimization barrier, or "after" it (overlapping
    # the other warpgroup's matmuls). jax's attention_mgpu found "pinned" faster up to
    # head_dim 128 and "after" above.
    row_sum: str = "before"


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    split: str = "keys"  # "keys": each compute warpgroup owns 64 keys; "dim": half of head_dim
    q_stages: int = 2  # depth of the Q (+ lse) ring
    do_stages: int = 2  # depth of the dO (+ delta) ring
    # GQA: programs per KV head and key block. Each takes group // head_splits query
    # heads in turn, summing their dK/dV in registers; with more than one split each
    # writes float32 partial sums that are added up afterwards. None: the fewest splits
    # that still give every SM two programs.
    head_splits: int | None = None


FWD_CONFIGS = {64: FwdConfig(128, 2), 128: FwdConfig(128, 2, "pinned"),
               256: FwdConfig(64, 2, "after")}
BWD_CONFIGS = {64: BwdConfig("keys", 2, 2), 128: BwdConfig("keys", 2, 2),
               256: BwdConfig("dim", 2, 1)}

# The kernels take q_len and kv_len that are multiples of this as they are (the last
# tile masked); `length_padding` says how other lengths are padded, when they can be.
LENGTH_MULTIPLE = 8


def _plgpu():
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 (GPU-only dialect)

    return plgpu


def _cdiv(a, b):
    return -(-a // b)


def _vary_like(x, like):
    """Give a kernel output the varying manual axes of the input it corresponds to.

    Inside `jax.shard_map` (with its default check_vma) a Mosaic GPU kernel's results
    carry no manual axes, while custom_vjp and shard_map expect q's own (`{V:model}`)."""
    return _backend.vary_over(x, _backend.varying_axes(like))


def _produce(n_steps, copies):
    """The producer warpgroup's loop: fill the ring slots for each step t.

    ``copies(t)`` lists ``(stages, free barriers or None, gmem source, smem ring,
    ready barriers)`` in issue order; slot ``t % stages`` of each ring is filled, and
    once that ring has wrapped (t >= stages) a copy with free barriers first waits
    for the compute warpgroups' arrival on its slot."""
    plgpu = _plgpu()
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, n_steps)
    def _(t):
        for stages, free, src, ring, ready in copies(t):
            slot = lax.rem(t, jnp.int32(stages))
            if free is not None:
                pl.when(t >= stages)(lambda free=free, slot=slot: plgpu.barrier_wait(free.at[slot]))
            plgpu.copy_gmem_to_smem(src, ring.at[slot], ready.at[slot])


def _rendezvous(barrier):
    """Both compute warpgroups reach this point (a barrier with COMPUTE_WGS arrivals)."""
    plgpu = _plgpu()
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


def _tiles(plgpu, dtype):
    """smem transforms of a [rows, cols] tile: 128-byte swizzled rows of 128 bytes."""
    cols = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(128))


def _bounds(causal: bool, window) -> tuple[int, int]:
    """(left, right): keys a query sees before and after its bottom-right aligned
    diagonal, -1 unbounded (`common.visible`'s geometry). Causal is right = 0; `window`
    is `flash_attention`'s (an int, a (left, right) pair or None; `normalize_window`)."""
    win = normalize_window(window, causal)
    if win is None:
        return -1, (0 if causal else -1)
    return win


def length_padding(q_len: int, kv_len: int, causal: bool,
                   window=None) -> tuple[int, int, int] | None:
    """Zero rows that make these lengths ones the kernels take, with the same result:
    (query rows in front, query rows after, key rows after); (0, 0, 0) when both are
    multiples of LENGTH_MULTIPLE (nothing padded or copied). None when no padding is
    exact: a kv_len not a multiple of LENGTH_MULTIPLE where a query may see keys to the
    right of its diagonal (full attention, or a window with a right side > 0).

    The forward masks keys at or past the key array's end only (TMA zero-fills there),
    so a zero key padded into the array is visible unless the mask hides it. Causal and
    windows are aligned bottom-right: query i sits at key i + kv_len - q_len and sees
    keys j with -left <= j - (i + kv_len - q_len) <= right (causal: right = 0). With pk
    keys after the real ones, c query rows after and a in front, real query i sits at
    row a + i of q_len + a + c, at key a + i + (kv_len + pk) - (q_len + a + c), that is
    i + kv_len - q_len + (pk - c): with c = pk every real query keeps its diagonal, so
    its window over the real keys is exact, and with right = 0 no real query sees a
    padded key (i + kv_len - q_len < kv_len). a rounds the query rows up to a multiple;
    those rows (zero queries) sit before the first real one and are cut off. Full
    attention: every query sees every key, so only query rows can be padded (after the
    real ones).

    Padded rows change nothing else: their outputs are cut off, so their dO and delta
    are zero and the backward gives them log-sum-exp +inf (P = 0); padded keys are zero
    and their dK, dV are cut off.
    """
    m = LENGTH_MULTIPLE
    pk = -kv_len % m
    left, right = _bounds(causal, window)
    if left >= 0 or right >= 0:  # aligned bottom-right: keep every real query's diagonal
        if pk and right != 0:
            return None
        return -(q_len + pk) % m, pk, pk
    if pk:
        return None
    return 0, -q_len % m, 0


def _lengths_limit(c) -> str | None:
    """Why these lengths cannot be padded exactly (`length_padding`), or None."""
    q_len, kv_len = c["q_len"], c["kv_len"]
    if length_padding(q_len, kv_len, c["causal"], c["window"]) is not None:
        return None
    left, right = _bounds(c["causal"], c["window"])
    if left < 0 and right < 0:
        return (f"lengths {q_len}/{kv_len}: full attention needs a kv_len that is a multiple "
                f"of {LENGTH_MULTIPLE} (a padded zero key would get softmax weight; causal pads "
                f"exactly)")
    return (f"lengths {q_len}/{kv_len} with window {(left, right)}: a window with keys right "
            f"of the diagonal needs a kv_len that is a multiple of {LENGTH_MULTIPLE} (a padded "
            f"zero key would be inside it; windows with right side 0, causal ones, pad exactly)")


# What the Hopper path does not take: one row per limit, (what, the reason for a call
# or None). `supports` returns the first reason: flash_attention's "auto" then takes the
# Triton kernels, and implementation="mosaic" raises a ValueError naming it.
_LIMITS = (
    ("dtype", lambda c: None if jnp.dtype(c["dtype"]) in (jnp.dtype(jnp.bfloat16),
                                                          jnp.dtype(jnp.float16))
     else f"dtype {jnp.dtype(c['dtype']).name} (bf16/f16 only)"),
    ("head_dim", lambda c: None if c["head_dim"] in SUPPORTED_HEAD_DIMS
     else f"head_dim {c['head_dim']} ({'/'.join(map(str, SUPPORTED_HEAD_DIMS))} only)"),
    ("lengths", _lengths_limit),
    ("masked", lambda c: "padding/segment masks (q_lengths, kv_lengths, segment_ids)"
     if c["masked"] else None),
    ("sparse", lambda c: "block-sparsity (block_mask)" if c["sparse"] else None),
)


def supports(*, q_len, kv_len, head_dim, dtype, causal, window, softcap, masked,
             sparse) -> str | None:
    """None when the kernels run the call exactly; otherwise the reason they cannot
    (the first row of `_LIMITS` that refuses it). Lengths that are not multiples of
    LENGTH_MULTIPLE are run padded (`length_padding`) where that is exact. `window` is
    `flash_attention`'s (None, an int or a (left, right) pair); any window and soft-cap
    run, so `softcap` only completes the description of the call."""
    call = dict(q_len=q_len, kv_len=kv_len, head_dim=head_dim, dtype=dtype, causal=causal,
                window=window, softcap=softcap, masked=masked, sparse=sparse)
    for _, why in _LIMITS:
        reason = why(call)
        if reason is not None:
            return reason
    return None


def _check_shapes(q, k, v, causal, window):
    """The padding `length_padding` gives these lengths, after checking the shapes."""
    batch, q_len, heads, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim {d}: the sm90 kernels take {HEAD_DIMS}")
    if k.shape != (batch, kv_len, kv_heads, d) or v.shape != k.shape or heads % kv_heads:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}")
    pad = length_padding(q_len, kv_len, causal, window)
    if pad is None:
        raise ValueError(
            f"lengths {q_len}/{kv_len}: full attention, or a window with keys right of the "
            f"diagonal, needs kv_len a multiple of {LENGTH_MULTIPLE} (the sm90 kernels mask "
            f"only keys past the array)")
    return pad


def _pad_rows(x, front: int, back: int, axis: int = 1, value=0):
    """x with `front` and `back` rows of `value` added along `axis` (x itself if none)."""
    if not front and not back:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (front, back)
    return jnp.pad(x, widths, constant_values=value)


def _cut_rows(x, front: int, n: int, axis: int = 1):
    """Rows [front, front + n) of x along `axis` (x itself if that is all of it)."""
    if front == 0 and x.shape[axis] == n:
        return x
    return lax.slice_in_dim(x, front, front + n, axis=axis)


def _query_range(k0, block_k: int, q_band, q_len: int, n_qt: int):
    """The backward's query tiles for the keys [k0, k0 + block_k) (`common.tile_ranges`
    under `common.query_band`): (lo, full_lo, full_hi, hi), tiles [lo, hi) visited,
    those outside [full_lo, full_hi) the band's masked edges. Static ints (all tiles,
    none masked) without a band. Query rows past q_len need no mask: TMA reads them as
    zeros (dO and delta 0: they add nothing), and keys past kv_len none either: their
    K rows are zeros (nothing added to dQ) and their dK, dV rows are dropped."""
    if q_band == (None, None):
        return 0, 0, n_qt, n_qt
    return common.tile_ranges(k0, block_k, BLOCK_Q, q_band, q_len, n_qt, mask_tail=False)


def _query_tiles_of_head(step, g, carry, *, ranges, q_band):
    """The backward's loop over the query tiles of query head h0 + g that see the key
    block (both dK/dV kernels): step t takes query tile lo + t; the band's edge tiles
    (below full_lo: the causal diagonal or a window's right side; from full_hi: a
    window's left side) are masked, the tiles between are not."""
    lo, full_lo, full_hi, hi = ranges
    return common.visit_band(functools.partial(step, g=g), carry, 0, full_lo - lo,
                             full_hi - lo, hi - lo, low_edge=q_band[0] is not None,
                             high_edge=q_band[1] is not None)


def forward(q, k, v, *, causal: bool, sm_scale: float, window=None,
            softcap: float | None = None, poison: bool = False, config: FwdConfig | None = None):
    """O and the log2-domain log-sum-exp [batch, heads, q_len] (float32) of attention.

    One program per 128 query rows of a (batch, head): warpgroups 0 and 1 each own 64
    rows and run S = Q K^T, the online softmax and O += P V with wgmma; warpgroup 2
    streams key tiles of K and V through a ring of shared-memory slots with TMA.
    The two compute warpgroups take turns on the tensor cores (ping-pong): one issues
    its matmuls while the other runs its softmax (a rendezvous barrier orders them),
    so the exponentials hide behind the other warpgroup's wgmma.

    Causal and sliding-window masks are aligned bottom-right (query i sees keys <= i +
    kv_len - q_len; `window` as `flash_attention` takes it: `normalize_window`): a
    CTA visits only the key tiles its rows can see, masks only the tiles on the band's
    edges and runs the tiles all its rows see in full without a mask. softcap: scores
    softcap * tanh(s * sm_scale / softcap), one tanh per score (its factor softcap *
    log2 e folds into exp2's argument as sm_scale does without it).
    Lengths that are not a multiple of the tiles are masked in the last tile (TMA
    reads past the end as zeros and drops writes past it). Lengths that are not
    multiples of LENGTH_MULTIPLE are padded as `length_padding` says (ValueError where
    that is not exact). A row that sees no key gets O = 0 and log-sum-exp +inf.
    """
    qa, qc, kc = _check_shapes(q, k, v, causal, window)
    if qa or qc or kc:  # lengths off LENGTH_MULTIPLE: the exact padded layout
        q_len, kv_len = q.shape[1], k.shape[1]
        o, lse = forward(_pad_rows(q, qa, qc), _pad_rows(k, 0, kc), _pad_rows(v, 0, kc),
                         causal=causal, sm_scale=sm_scale, window=window, softcap=softcap,
                         poison=poison, config=config)
        return _cut_rows(o, qa, q_len), _cut_rows(lse, qa, q_len, axis=2)
    plgpu = _plgpu()
    batch, q_len, heads, d = q.shape
    kv_len = k.shape[1]
    group = heads // k.shape[2]
    dtype = q.dtype
    cfg = config or FWD_CONFIGS[d]
    bk, stages = cfg.block_k, cfg.stages
    rows_per_cta = WG_ROWS * COMPUTE_WGS
    n_qb = _cdiv(q_len, rows_per_cta)
    n_kv, n_kv_full = _cdiv(kv_len, bk), kv_len // bk
    kv_tail = kv_len % bk != 0
    off = kv_len - q_len  # bottom-right alignment: query i sits at key i + off
    left, right = _bounds(causal, window)
    k_band = common.key_band(off, left, right)  # keys [i + a, i + b] visible from query i
    empty_rows = right >= 0 and off + right < 0  # rows that see no key at all
    # Scores in log2 units are s * scale_log2: s the raw q.k, or with soft-cap its tanh.
    scale_log2 = common.log2_scale(float(sm_scale), softcap)
    fold_scale = scale_log2 > 0  # max(s) * c is max(s * c) only for c > 0
    tr = _tiles(plgpu, dtype)
    row_vec = plgpu.Layout.WGMMA.reduce(1)

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref, smem, bars):
        q_smem, k_smem, v_smem = smem
        q_bar, k_bar, v_bar, k_free, v_free, turn = bars
        rendezvous = functools.partial(_rendezvous, turn)
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        qc = lax.axis_index("q")
        if causal:  # heaviest query blocks launch first
            qc = (n_qb - 1) - qc
        wg = lax.axis_index("wg")
        kh = lax.div(h, jnp.int32(group))
        r0 = qc * rows_per_cta
        if k_band != (None, None):
            # The key tiles [lo, hi) some row of the CTA sees (both warpgroups run the same
            # steps); those every row sees in full, [full_lo, full_hi), skip the mask.
            lo, full_lo, full_hi, hi = common.tile_ranges(
                r0, rows_per_cta, bk, k_band, kv_len, n_kv, mask_tail=True)
        else:  # full attention: every tile, only a tail tile masked
            lo, full_lo, full_hi, hi = 0, 0, n_kv_full, n_kv

        def kv_tiles(t):  # step t: key tile lo + t
            keys = pl.ds((lo + t) * bk, bk)
            return [(stages, k_free, k_ref.at[b, keys, kh], k_smem, k_bar),
                    (stages, v_free, v_ref.at[b, keys, kh], v_smem, v_bar)]

        pl.when(wg == COMPUTE_WGS)(lambda: _produce(hi - lo, kv_tiles))

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q0 = r0 + wg * WG_ROWS
            rows = pl.ds(q0, WG_ROWS)
            q_tile = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_tile, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            # Warpgroup 0 issues its first matmul before warpgroup 1 does.
            pl.when(wg == 1)(rendezvous)

            def step(t, carry, masked: bool):  # key tile t
                acc, m, l = carry
                slot = lax.rem(t - lo, jnp.int32(stages))
                plgpu.barrier_wait(k_bar.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
                    rendezvous()  # the other warpgroup may issue its matmuls now
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if softcap is not None:  # s becomes tanh(s * sm_scale / softcap)
                    s = common.softcap_tanh(s, sm_scale, softcap)
                if not fold_scale:
                    s = s * scale_log2
                if masked:  # after any scaling: -inf times a scale <= 0 is not -inf
                    k_pos = t * bk + plgpu.broadcasted_iota(
                        jnp.int32, (WG_ROWS, bk), 1, layout=plgpu.Layout.WGMMA)
                    q_pos = None  # query positions on the key axis (+ off): for the band
                    if k_band != (None, None):
                        q_pos = (q0 + off) + plgpu.broadcasted_iota(
                            jnp.int32, (WG_ROWS, bk), 0, layout=plgpu.Layout.WGMMA)
                    visible = common.visible(q_pos, k_pos, left=left, right=right,
                                             kv_len=kv_len if kv_tail else None)
                    s = jnp.where(visible, s, -jnp.inf)
                # m is kept in scaled log2 units. With a positive scale it folds into
                # exp2's argument: one fused multiply-add per score instead of two ops.
                if fold_scale:
                    m_new = jnp.maximum(m, s.max(axis=1) * scale_log2)
                else:
                    m_new = jnp.maximum(m, s.max(axis=1))
                # A row with no visible key yet keeps m = -inf: use 0 there so that
                # exp2 gives 0 rather than NaN (only masked tiles can do that).
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2((s * scale_log2 if fold_scale else s)
                             - lax.broadcast_in_dim(m_use, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                l = l * alpha
                if cfg.row_sum != "after":
                    l = l + p.sum(axis=1)
                    if cfg.row_sum == "pinned":  # keep the compiler from sinking it
                        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                # Softmax done; wait until the other one has issued its matmuls.
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(turn)
                if cfg.row_sum == "after":  # overlaps the other warpgroup's matmuls
                    l = l + p.sum(axis=1)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = (
                plgpu.layout_cast(jnp.zeros((WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), row_vec),
                plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), row_vec),
            )
            carry = common.visit_band(step, carry, lo, full_lo, full_hi, hi,
                                      low_edge=k_band[0] is not None,
                                      high_edge=k_band[1] is not None or kv_tail)
            pl.when(wg == 0)(rendezvous)  # balances warpgroup 1's first one
            acc, m, l = carry
            if empty_rows:  # O = 0 and lse = +inf where no key was seen
                live = l > 0.0
                l = jnp.where(live, l, 1.0)
                lse = jnp.where(live, m + jnp.log2(l), jnp.inf)
            else:
                lse = m + jnp.log2(l)
            q_tile[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, rows, h])
            lse_ref.at[b, h, rows][...] = lse  # straight from registers: 64 floats
            plgpu.wait_smem_to_gmem(0)

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
        smem = (
            plgpu.SMEM((COMPUTE_WGS, WG_ROWS, d), dtype, transforms=tr),  # Q, then O
            plgpu.SMEM((stages, bk, d), dtype, transforms=tr),  # K ring
            plgpu.SMEM((stages, bk, d), dtype, transforms=tr),  # V ring
        )
        bars = (
            plgpu.Barrier(num_barriers=COMPUTE_WGS),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # ping-pong turns
        )
        pl.run_scoped(lambda *scoped: body(q_ref, k_ref, v_ref, o_ref, lse_ref, *scoped),
                      smem, bars, collective_axes="wg")

    o_type = jax.ShapeDtypeStruct(q.shape, dtype)
    # The log-sum-exp is written in whole 64-row pieces; the padding is cut off below.
    lse_pad = n_qb * rows_per_cta
    lse_type = jax.ShapeDtypeStruct((batch, heads, lse_pad), jnp.float32)
    if poison:
        refs = (jax.new_ref(jnp.full(o_type.shape, jnp.nan, dtype)),
                jax.new_ref(jnp.full(lse_type.shape, jnp.nan, jnp.float32)))
        outs, out_type = refs, ()
    else:
        outs, out_type = (), [o_type, lse_type]
    res = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(heads, n_qb, batch),
        grid_names=("heads", "q", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, *outs)
    o, lse = (refs[0][...], refs[1][...]) if poison else res
    if lse_pad != q_len:
        lse = lse[:, :, :q_len]
    return _vary_like(o, q), _vary_like(lse, q)


def backward(q, k, v, do, lse2, delta, *, causal: bool, sm_scale: float, window=None,
             softcap: float | None = None, poison: bool = False,
             config: BwdConfig | None = None):
    """dQ, dK, dV of softmax(q k^T * sm_scale) v (under the causal or window mask, with
    the scores soft-capped when softcap is set, as in `forward`).

    q, do: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    lse2: [batch, heads, q_len] float32 log-sum-exp of the scaled scores in log2 units
    (as the forward writes it: +inf for a row that sees no key); delta: [batch, heads,
    q_len] float32 rowsum(dO * O).
    poison: dK/dV start as NaN buffers (a testing aid: an unwritten row stays NaN).
    Lengths that are not multiples of LENGTH_MULTIPLE are padded as in `forward`
    (`length_padding`); the padded query rows get log-sum-exp +inf, so they add nothing.
    A program visits only the query tiles that see its key block (the band's edge tiles
    masked), as the forward visits key tiles. With soft-cap dS carries the cap's
    derivative 1 - tanh^2 (`common.softcap_grad`).
    """
    qa, qc, kc = _check_shapes(q, k, v, causal, window)
    if qa or qc or kc:
        q_len, kv_len = q.shape[1], k.shape[1]
        rows = lambda x: _pad_rows(x, qa, qc)  # noqa: E731
        dq, dk, dv = backward(rows(q), _pad_rows(k, 0, kc), _pad_rows(v, 0, kc), rows(do),
                              _pad_rows(lse2, qa, qc, axis=2, value=jnp.inf),
                              _pad_rows(delta, qa, qc, axis=2), causal=causal,
                              sm_scale=sm_scale, window=window, softcap=softcap,
                              poison=poison, config=config)
        return _cut_rows(dq, qa, q_len), _cut_rows(dk, 0, kv_len), _cut_rows(dv, 0, kv_len)
    d = q.shape[-1]
    cfg = config or BWD_CONFIGS[d]
    left, right = _bounds(causal, window)
    kw = dict(left=left, right=right, softcap=softcap, sm_scale=sm_scale, poison=poison, cfg=cfg)
    if cfg.split == "keys":
        return _backward_keys(q, k, v, do, lse2, delta, **kw)
    if cfg.split == "dim":
        return _backward_dim(q, k, v, do, lse2, delta, **kw)
    raise ValueError(f"BwdConfig.split {cfg.split!r}")


def _p_and_dsfactor(s_t, lse, *, sm_scale, softcap, masked, key_pos, q_pos, left, right):
    """A backward tile's P^T (from the raw S^T = K Q^T and the saved log2 log-sum-exp,
    zero where masked) and P^T times the soft-cap's derivative (P^T itself without
    soft-cap): dS^T is the latter times (dP^T - delta). Folding the derivative in here
    keeps the tanh from staying live through the dV and dP matmuls."""
    s2, tanh_t = common.scores_log2(s_t, sm_scale, softcap)
    p_t = jnp.exp2(s2 - lse)
    if masked:
        p_t = jnp.where(common.visible(q_pos(), key_pos(), left=left, right=right), p_t, 0.0)
    return p_t, common.softcap_grad(p_t, tanh_t)


def _head_splits(cfg: BwdConfig, *, batch, kv_heads, group, n_kb) -> int:
    if cfg.head_splits is not None:
        if group % cfg.head_splits:
            raise ValueError(f"head_splits {cfg.head_splits} must divide the GQA group {group}")
        return cfg.head_splits
    want = 2 * _backend.num_multiprocessors()
    for splits in range(1, group + 1):
        if group % splits == 0 and batch * kv_heads * splits * n_kb >= want:
            return splits
    return group


def _bwd_heads(splits: int, group: int):
    """In a backward program: the first query head it takes, and its dK/dV head."""
    hs = lax.axis_index("heads")
    kh = lax.div(hs, jnp.int32(splits))
    h0 = kh * group + lax.rem(hs, jnp.int32(splits)) * (group // splits)
    return kh, h0, hs


def _bwd_outputs(q, k, splits, poison):
    """dQ's float32 accumulator and dK/dV: in k's dtype with one split, else float32
    partial sums [batch, kv_len, kv_heads * splits, head_dim]."""
    batch, kv_len, kv_heads, d = k.shape
    out_dtype = k.dtype if splits == 1 else jnp.float32
    dkv_type = jax.ShapeDtypeStruct((batch, kv_len, kv_heads * splits, d), out_dtype)
    dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    if poison:
        refs = (jax.new_ref(jnp.full(dkv_type.shape, jnp.nan, out_dtype)),
                jax.new_ref(jnp.full(dkv_type.shape, jnp.nan, out_dtype)))
        return out_dtype, dq_acc, refs, refs, ()
    return out_dtype, dq_acc, None, (), [dkv_type, dkv_type]


def _bwd_finish(q, k, v, dq_acc, dk, dv, sm_scale, splits):
    batch, kv_len, kv_heads, d = k.shape
    dq = (dq_acc[...] * sm_scale).astype(q.dtype)
    if splits > 1:
        shape = (batch, kv_len, kv_heads, splits, d)
        dk = dk.reshape(shape).sum(axis=3)
        dv = dv.reshape(shape).sum(axis=3)
    return (_vary_like(dq, q), _vary_like(dk.astype(k.dtype), k),
            _vary_like(dv.astype(v.dtype), v))


def _backward_keys(q, k, v, do, lse2, delta, *, left, right, softcap, sm_scale, poison,
                   cfg: BwdConfig):
    """head_dim <= 128: each compute warpgroup owns 64 of the program's 128 keys."""
    plgpu = _plgpu()
    batch, q_len, heads, d = q.shape
    kv_len = k.shape[1]
    group = heads // k.shape[2]
    dtype = q.dtype
    block_k = WG_ROWS * COMPUTE_WGS
    n_qt, n_kb = _cdiv(q_len, BLOCK_Q), _cdiv(kv_len, block_k)
    off = kv_len - q_len
    q_band = common.query_band(off, left, right)  # queries [y + a, y + b] see key y
    qs, dos = cfg.q_stages, cfg.do_stages
    tr = _tiles(plgpu, dtype)
    f32_tr = _tiles(plgpu, jnp.float32)
    wgmma_row = plgpu.Layout.WGMMA.reduce(0)  # a [BLOCK_Q] vector along S^T's columns
    # With GQA each query head writes its own dK/dV (float32), summed over the group after.
    splits = _head_splits(cfg, batch=batch, kv_heads=k.shape[2], group=group, n_kb=n_kb)
    hpc = group // splits  # query heads per program
    out_dtype, dq_acc, refs, outs, out_type = _bwd_outputs(q, k, splits, poison)

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref,
             smem, bars):
        k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, lse_smem, delta_smem = smem
        (k_bar, v_bar, q_bar, do_bar, lse_bar, delta_bar, q_free, do_free, ds_ready, ds_free,
         done) = bars
        b = lax.axis_index("batch")
        kb = lax.axis_index("kv")
        wg = lax.axis_index("wg")
        kh, h0, h_out = _bwd_heads(splits, group)
        k0 = kb * block_k
        ranges = _query_range(k0, block_k, q_band, q_len, n_qt)
        first = ranges[0]
        n_steps = ranges[3] - first

        def q_tiles(u):  # step u: query tile t of head h0 + g
            g = lax.div(u, n_steps) if hpc > 1 else 0
            t = u - g * n_steps
            h = h0 + g
            rows = pl.ds((first + t) * BLOCK_Q, BLOCK_Q)
            return [(qs, q_free, q_ref.at[b, rows, h], q_smem, q_bar),
                    (qs, None, lse_ref.at[b, h, rows], lse_smem, lse_bar),
                    (dos, do_free, do_ref.at[b, rows, h], do_smem, do_bar),
                    (dos, None, delta_ref.at[b, h, rows], delta_smem, delta_bar)]

        pl.when(wg == COMPUTE_WGS)(lambda: _produce(hpc * n_steps, q_tiles))

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            own = pl.ds(wg * WG_ROWS, WG_ROWS)
            key_rows = pl.ds(k0 + wg * WG_ROWS, WG_ROWS)
            plgpu.copy_gmem_to_smem(k_ref.at[b, key_rows, kh], k_smem.at[own], k_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[b, key_rows, kh], v_smem.at[own], v_bar.at[wg])
            for w in range(COMPUTE_WGS):  # dQ reads both halves of K
                plgpu.barrier_wait(k_bar.at[w])
            plgpu.barrier_wait(v_bar.at[wg])
            k_own = k_smem.at[own]
            v_own = v_smem.at[own]
            zeros = plgpu.layout_cast(jnp.zeros((WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)

            def step(t, carry, masked: bool, g):
                dk_acc, dv_acc = carry
                u = g * n_steps + t  # the step's place in the rings
                h = h0 + g
                q_slot = lax.rem(u, jnp.int32(qs))
                do_slot = lax.rem(u, jnp.int32(dos))
                q_tile = first + t
                plgpu.barrier_wait(q_bar.at[q_slot])
                plgpu.barrier_wait(lse_bar.at[q_slot])

                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, k_own, q_smem.at[q_slot].transpose((1, 0)))
                    return acc_ref[...]

                s_t = pl.run_scoped(scores, plgpu.ACC((WG_ROWS, BLOCK_Q), jnp.float32))
                lse = plgpu.load(lse_smem.at[q_slot], layout=wgmma_row)
                p_t, pg_t = _p_and_dsfactor(
                    s_t, lax.broadcast_in_dim(lse, (WG_ROWS, BLOCK_Q), [1]), sm_scale=sm_scale,
                    softcap=softcap, masked=masked, left=left, right=right,
                    key_pos=lambda: (k0 + wg * WG_ROWS) + plgpu.broadcasted_iota(
                        jnp.int32, (WG_ROWS, BLOCK_Q), 0, layout=plgpu.Layout.WGMMA),
                    q_pos=lambda: (q_tile * BLOCK_Q + off) + plgpu.broadcasted_iota(
                        jnp.int32, (WG_ROWS, BLOCK_Q), 1, layout=plgpu.Layout.WGMMA))
                plgpu.barrier_wait(do_bar.at[do_slot])

                def dv_dp(refs):
                    dv_ref_, dp_ref_ = refs
                    plgpu.wgmma(dv_ref_, p_t.astype(dtype), do_smem.at[do_slot])
                    plgpu.wgmma(dp_ref_, v_own, do_smem.at[do_slot].transpose((1, 0)))

                dv_acc, dp_t = pl.run_state(dv_dp)((plgpu.ACC.init(dv_acc), plgpu.ACC.init(
                    plgpu.layout_cast(jnp.zeros((WG_ROWS, BLOCK_Q), jnp.float32),
                                      plgpu.Layout.WGMMA))))
                plgpu.barrier_wait(delta_bar.at[do_slot])
                delta = plgpu.load(delta_smem.at[do_slot], layout=wgmma_row)
                plgpu.barrier_arrive(do_free.at[do_slot])
                ds_t = pg_t * (dp_t - lax.broadcast_in_dim(delta, (WG_ROWS, BLOCK_Q), [1]))
                ds16 = ds_t.astype(dtype)

                def dk_step(acc_ref):
                    plgpu.wgmma(acc_ref, ds16, q_smem.at[q_slot])

                dk_acc = pl.run_state(dk_step)(plgpu.ACC.init(dk_acc))
                plgpu.barrier_arrive(q_free.at[q_slot])

                # Hand this warpgroup's half of dS^T to the tile's dQ owner.
                dslot = lax.rem(u, jnp.int32(2))

                @pl.when(u >= 2)
                def _():
                    plgpu.barrier_wait(ds_free.at[dslot])

                ds_smem.at[dslot, own][...] = ds16
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready.at[dslot])

                @pl.when(dslot == wg)
                def _():
                    plgpu.barrier_wait(ds_ready.at[dslot])

                    def dq_step(acc_ref):
                        plgpu.wgmma(acc_ref, ds_smem.at[dslot].transpose((1, 0)), k_smem)
                        return acc_ref[...]

                    dq = pl.run_scoped(dq_step, plgpu.ACC((BLOCK_Q, d), jnp.float32))
                    plgpu.barrier_arrive(ds_free.at[dslot])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # dq_smem free again
                    dq_smem.at[wg][...] = dq
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(dq_smem.at[wg],
                                            dq_ref.at[b, pl.ds(q_tile * BLOCK_Q, BLOCK_Q), h],
                                            reduction_op="add")

                return dk_acc, dv_acc

            head = functools.partial(_query_tiles_of_head, step, ranges=ranges, q_band=q_band)

            carry = (zeros, zeros)
            carry = head(0, carry) if hpc == 1 else lax.fori_loop(0, hpc, head, carry)
            dk_acc, dv_acc = carry
            plgpu.wait_smem_to_gmem(0)  # this warpgroup's dQ reductions are done with dq_smem
            if out_dtype == dtype:
                # dK and dV leave through this warpgroup's rows of the K and V buffers once
                # the other warpgroup's dQ matmuls are done reading K.
                _rendezvous(done)
                k_own[...] = (dk_acc * sm_scale).astype(dtype)
                v_own[...] = dv_acc.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(k_own, dk_ref.at[b, key_rows, h_out], commit_group=False)
                plgpu.copy_smem_to_gmem(v_own, dv_ref.at[b, key_rows, h_out])
                plgpu.wait_smem_to_gmem(0)
            else:  # float32: one after the other through this warpgroup's dQ staging
                stage = dq_smem.at[wg]
                stage[...] = dk_acc * sm_scale
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(stage, dk_ref.at[b, key_rows, h_out])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                stage[...] = dv_acc
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(stage, dv_ref.at[b, key_rows, h_out])
                plgpu.wait_smem_to_gmem(0)

    def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref):
        smem = (  # the swizzled buffers first: each stays 1024-byte aligned
            plgpu.SMEM((block_k, d), dtype, transforms=tr),  # K (then dK out)
            plgpu.SMEM((block_k, d), dtype, transforms=tr),  # V (then dV out)
            plgpu.SMEM((qs, BLOCK_Q, d), dtype, transforms=tr),  # Q ring
            plgpu.SMEM((dos, BLOCK_Q, d), dtype, transforms=tr),  # dO ring
            plgpu.SMEM((2, block_k, BLOCK_Q), dtype, transforms=tr),  # dS^T, two tiles
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, d), jnp.float32, transforms=f32_tr),  # dQ tiles
            plgpu.SMEM((qs, BLOCK_Q), jnp.float32),  # lse ring
            plgpu.SMEM((dos, BLOCK_Q), jnp.float32),  # delta ring
        )
        bars = (
            plgpu.Barrier(num_barriers=COMPUTE_WGS),  # K halves
            plgpu.Barrier(num_barriers=COMPUTE_WGS),  # V halves
            plgpu.Barrier(num_barriers=qs),  # Q
            plgpu.Barrier(num_barriers=dos),  # dO
            plgpu.Barrier(num_barriers=qs),  # lse
            plgpu.Barrier(num_barriers=dos),  # delta
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=qs),  # Q slot consumed
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=dos),  # dO slot consumed
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),  # dS^T tile written
            plgpu.Barrier(num_arrivals=1, num_barriers=2),  # dS^T tile read by dQ
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # both done with K (epilogue)
        )
        pl.run_scoped(
            lambda *scoped: body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                                 dq_ref, dk_ref, dv_ref, *scoped),
            smem, bars, collective_axes="wg")

    res = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(k.shape[2] * splits, n_kb, batch),
        grid_names=("heads", "kv", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, do, lse2, delta, dq_acc, *outs)
    dk, dv = (refs[0][...], refs[1][...]) if poison else res
    return _bwd_finish(q, k, v, dq_acc, dk, dv, sm_scale, splits)


def _backward_dim(q, k, v, do, lse2, delta, *, left, right, softcap, sm_scale, poison,
                  cfg: BwdConfig):
    """head_dim 256: both compute warpgroups take the program's 64 keys, each owning
    half of the head dimension of dK, dV and dQ (so its accumulators fit in registers).
    """
    plgpu = _plgpu()
    batch, q_len, heads, d = q.shape
    kv_len = k.shape[1]
    group = heads // k.shape[2]
    dtype = q.dtype
    block_k = WG_ROWS
    half = d // COMPUTE_WGS  # head-dim columns per warpgroup
    chunk = 64  # dQ columns per TMA reduction (its float32 staging is 16 KB)
    n_qt, n_kb = _cdiv(q_len, BLOCK_Q), _cdiv(kv_len, block_k)
    off = kv_len - q_len
    q_band = common.query_band(off, left, right)  # queries [y + a, y + b] see key y
    qs, dos = cfg.q_stages, cfg.do_stages
    tr = _tiles(plgpu, dtype)
    f32_tr = _tiles(plgpu, jnp.float32)
    wgmma_row = plgpu.Layout.WGMMA.reduce(0)
    splits = _head_splits(cfg, batch=batch, kv_heads=k.shape[2], group=group, n_kb=n_kb)
    hpc = group // splits  # query heads per program
    out_dtype, dq_acc, refs, outs, out_type = _bwd_outputs(q, k, splits, poison)

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref,
             smem, bars):
        k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, lse_smem, delta_smem = smem
        (kv_bar, q_bar, do_bar, lse_bar, delta_bar, q_free, do_free) = bars
        b = lax.axis_index("batch")
        kb = lax.axis_index("kv")
        wg = lax.axis_index("wg")
        kh, h0, h_out = _bwd_heads(splits, group)
        k0 = kb * block_k
        key_rows = pl.ds(k0, block_k)
        ranges = _query_range(k0, block_k, q_band, q_len, n_qt)
        first = ranges[0]
        n_steps = ranges[3] - first

        def q_tiles(u):  # step u: query tile t of head h0 + g
            g = lax.div(u, n_steps) if hpc > 1 else 0
            t = u - g * n_steps
            h = h0 + g
            rows = pl.ds((first + t) * BLOCK_Q, BLOCK_Q)
            return [(qs, q_free, q_ref.at[b, rows, h], q_smem, q_bar),
                    (qs, None, lse_ref.at[b, h, rows], lse_smem, lse_bar),
                    (dos, do_free, do_ref.at[b, rows, h], do_smem, do_bar),
                    (dos, None, delta_ref.at[b, h, rows], delta_smem, delta_bar)]

        pl.when(wg == COMPUTE_WGS)(lambda: _produce(hpc * n_steps, q_tiles))

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            c0 = wg * half
            cols = pl.ds(c0, half)
            # Warpgroup 0 fetches K, warpgroup 1 V; both read all of both.
            @pl.when(wg == 0)
            def _():
                plgpu.copy_gmem_to_smem(k_ref.at[b, key_rows, kh], k_smem, kv_bar.at[0])

            @pl.when(wg == 1)
            def _():
                plgpu.copy_gmem_to_smem(v_ref.at[b, key_rows, kh], v_smem, kv_bar.at[1])

            plgpu.barrier_wait(kv_bar.at[0])
            plgpu.barrier_wait(kv_bar.at[1])
            zeros = plgpu.layout_cast(jnp.zeros((block_k, half), jnp.float32),
                                      plgpu.Layout.WGMMA)
            ds_own = ds_smem.at[wg]
            stage = dq_smem.at[wg]

            def step(t, carry, masked: bool, g):
                dk_acc, dv_acc = carry
                u = g * n_steps + t  # the step's place in the rings
                h = h0 + g
                q_slot = lax.rem(u, jnp.int32(qs))
                do_slot = lax.rem(u, jnp.int32(dos))
                q_tile = first + t
                plgpu.barrier_wait(q_bar.at[q_slot])
                plgpu.barrier_wait(lse_bar.at[q_slot])

                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, k_smem, q_smem.at[q_slot].transpose((1, 0)))
                    return acc_ref[...]

                s_t = pl.run_scoped(scores, plgpu.ACC((block_k, BLOCK_Q), jnp.float32))
                lse = plgpu.load(lse_smem.at[q_slot], layout=wgmma_row)
                p_t, pg_t = _p_and_dsfactor(
                    s_t, lax.broadcast_in_dim(lse, (block_k, BLOCK_Q), [1]), sm_scale=sm_scale,
                    softcap=softcap, masked=masked, left=left, right=right,
                    key_pos=lambda: k0 + plgpu.broadcasted_iota(
                        jnp.int32, (block_k, BLOCK_Q), 0, layout=plgpu.Layout.WGMMA),
                    q_pos=lambda: (q_tile * BLOCK_Q + off) + plgpu.broadcasted_iota(
                        jnp.int32, (block_k, BLOCK_Q), 1, layout=plgpu.Layout.WGMMA))
                plgpu.barrier_wait(do_bar.at[do_slot])

                def dv_dp(refs):
                    dv_ref_, dp_ref_ = refs
                    plgpu.wgmma(dv_ref_, p_t.astype(dtype), do_smem.at[do_slot, :, cols])
                    plgpu.wgmma(dp_ref_, v_smem, do_smem.at[do_slot].transpose((1, 0)))

                dv_acc, dp_t = pl.run_state(dv_dp)((plgpu.ACC.init(dv_acc), plgpu.ACC.init(
                    plgpu.layout_cast(jnp.zeros((block_k, BLOCK_Q), jnp.float32),
                                      plgpu.Layout.WGMMA))))
                plgpu.barrier_wait(delta_bar.at[do_slot])
                delta = plgpu.load(delta_smem.at[do_slot], layout=wgmma_row)
                plgpu.barrier_arrive(do_free.at[do_slot])
                ds_t = pg_t * (dp_t - lax.broadcast_in_dim(delta, (block_k, BLOCK_Q), [1]))
                ds16 = ds_t.astype(dtype)

                def dk_step(acc_ref):
                    plgpu.wgmma(acc_ref, ds16, q_smem.at[q_slot, :, cols])

                dk_acc = pl.run_state(dk_step)(plgpu.ACC.init(dk_acc))
                plgpu.barrier_arrive(q_free.at[q_slot])

                # dQ[:, own columns] = dS K[:, own columns], in chunks of 64 columns,
                # each added into the float32 dQ in HBM by a bulk TMA reduction.
                ds_own[...] = ds16  # the previous tile's dQ matmuls are done with it
                plgpu.commit_smem()
                for c in range(half // chunk):
                    def dq_step(acc_ref, c=c):
                        plgpu.wgmma(acc_ref, ds_own.transpose((1, 0)),
                                    k_smem.at[:, pl.ds(c0 + c * chunk, chunk)])
                        return acc_ref[...]

                    dq = pl.run_scoped(dq_step, plgpu.ACC((BLOCK_Q, chunk), jnp.float32))
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # staging free again
                    stage[...] = dq
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        stage, dq_ref.at[b, pl.ds(q_tile * BLOCK_Q, BLOCK_Q), h,
                                         pl.ds(c0 + c * chunk, chunk)],
                        reduction_op="add")
                return dk_acc, dv_acc

            head = functools.partial(_query_tiles_of_head, step, ranges=ranges, q_band=q_band)

            carry = (zeros, zeros)
            carry = head(0, carry) if hpc == 1 else lax.fori_loop(0, hpc, head, carry)
            dk_acc, dv_acc = carry
            plgpu.wait_smem_to_gmem(0)
            # dK and dV leave 64 columns at a time (a TMA source must be contiguous in
            # shared memory) through this warpgroup's dS^T buffer, or its float32 dQ
            # staging when they are float32 (GQA).
            out = ds_own if out_dtype == dtype else stage
            for acc, ref, scale in ((dk_acc, dk_ref, sm_scale), (dv_acc, dv_ref, None)):
                for c in range(half // chunk):
                    part = acc[:, c * chunk:(c + 1) * chunk]
                    if scale is not None:
                        part = part * scale
                    out[...] = part.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out, ref.at[b, key_rows, h_out, pl.ds(c0 + c * chunk, chunk)])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.wait_smem_to_gmem(0)

    def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref):
        smem = (
            plgpu.SMEM((block_k, d), dtype, transforms=tr),  # K
            plgpu.SMEM((block_k, d), dtype, transforms=tr),  # V
            plgpu.SMEM((qs, BLOCK_Q, d), dtype, transforms=tr),  # Q ring
            plgpu.SMEM((dos, BLOCK_Q, d), dtype, transforms=tr),  # dO ring
            plgpu.SMEM((COMPUTE_WGS, block_k, BLOCK_Q), dtype, transforms=tr),  # dS^T each
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, chunk), jnp.float32, transforms=f32_tr),  # dQ
            plgpu.SMEM((qs, BLOCK_Q), jnp.float32),  # lse ring
            plgpu.SMEM((dos, BLOCK_Q), jnp.float32),  # delta ring
        )
        bars = (
            plgpu.Barrier(num_barriers=2),  # K, V
            plgpu.Barrier(num_barriers=qs),  # Q
            plgpu.Barrier(num_barriers=dos),  # dO
            plgpu.Barrier(num_barriers=qs),  # lse
            plgpu.Barrier(num_barriers=dos),  # delta
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=qs),  # Q slot consumed
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=dos),  # dO slot consumed
        )
        pl.run_scoped(
            lambda *scoped: body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                                 dq_ref, dk_ref, dv_ref, *scoped),
            smem, bars, collective_axes="wg")

    res = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(k.shape[2] * splits, n_kb, batch),
        grid_names=("heads", "kv", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, do, lse2, delta, dq_acc, *outs)
    dk, dv = (refs[0][...], refs[1][...]) if poison else res
    return _bwd_finish(q, k, v, dq_acc, dk, dv, sm_scale, splits)
