"""What every attention kernel shares: constants, the mask, the tile ranges a mask
lets a tile visit, the soft-capped scores.

Written once here and used by the forward, dQ and dK/dV kernels of
:mod:`flashjax.attention` (Pallas Triton) and of :mod:`flashjax.attention_sm90`
(Pallas Mosaic GPU). Plain ``jnp``/``lax`` on position arrays and scalars, so the
same function runs inside either kind of kernel, in interpret mode and in plain XLA.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)  # the kernels keep scores and log-sum-exp in log2 units
LN2 = math.log(2.0)
MAX_HEAD_DIM = 256
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)  # q/k/v dtypes the kernels take


def visible(q_pos, k_pos, *, offset: int = 0, left: int = -1, right: int = -1,
            kv_len: int | None = None, q_limit=None, kv_limit=None, q_seg=None, kv_seg=None):
    """Where query position ``q_pos`` sees key position ``k_pos``: the one attention mask.

    ``q_pos`` and ``k_pos`` are int arrays that broadcast against each other (``[R, 1]``
    and ``[1, C]`` for a [query, key] tile, ``[1, R]`` and ``[C, 1]`` for a transposed
    [key, query] tile); ``q_seg`` / ``kv_seg`` are the segment ids at those positions,
    shaped alike. Every condition is optional:

    * geometry, aligned bottom-right (query ``i`` sits at key ``i + offset``, ``offset =
      kv_len - q_len``, the chunked-prefill convention): keys at most ``right`` past the
      aligned diagonal and at most ``left`` before it; ``-1`` is unbounded, so causal is
      ``right=0`` and a sliding window sets ``left``;
    * ``kv_len``: the (static) real key count; keys past it are tile padding;
    * ``q_limit`` / ``kv_limit``: per-sequence lengths (scalars; padding past them);
    * ``q_seg == kv_seg``: packed sequences see only their own segment.

    Returns a bool array of the broadcast shape, or None when nothing is masked (the
    caller then skips the select).
    """
    conds = []
    if kv_len is not None:
        conds.append(k_pos < kv_len)
    if left >= 0 or right >= 0:
        # The query's aligned key position, the bounds added to it (not to the tile of
        # differences): with [R, 1] / [1, C] positions the adds are on vectors, and the
        # causal edge (right = 0) is one compare.
        diag = q_pos + offset if offset else q_pos
        if right >= 0:
            conds.append(k_pos <= (diag + right if right else diag))
        if left >= 0:
            conds.append(k_pos >= (diag - left if left else diag))
    if kv_limit is not None:
        conds.append(k_pos < kv_limit)
    if q_limit is not None:
        conds.append(q_pos < q_limit)
    if q_seg is not None:
        conds.append(q_seg == kv_seg)
    if not conds:
        return None
    mask = conds[0]
    for c in conds[1:]:
        mask = jnp.logical_and(mask, c)
    return jnp.broadcast_to(mask, jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)))


def key_band(offset: int, left: int, right: int):
    """Key offsets (a, b) visible from query position x: keys in [x + a, x + b] (a side
    None: unbounded), for the (left, right) bounds of :func:`visible`."""
    return (None if left < 0 else offset - left), (None if right < 0 else offset + right)


def query_band(offset: int, left: int, right: int):
    """Query offsets (a, b) that see key position y: queries in [y + a, y + b] (a side
    None: unbounded)."""
    return (None if right < 0 else -offset - right), (None if left < 0 else -offset + left)


def _cdiv(x, t: int):
    return lax.div(x + (t - 1), t)


def tile_ranges(start, n: int, tile: int, band, other_len: int, other_tiles: int,
                mask_tail: bool):
    """Tiles of the other axis seen by own positions [start, start + n) under ``band``
    (:func:`key_band` from a query tile, :func:`query_band` from a key tile).

    Returns (lo, full_lo, full_hi, hi), traced int32 scalars: tiles [lo, hi) are
    visited, and tiles in [full_lo, full_hi) are visible from every own position (no
    mask needed); the others are the band's edge tiles. With ``mask_tail`` a last tile
    that runs past ``other_len`` is never full.
    """
    a, b = band
    zero = jnp.int32(0)
    lo = zero if a is None else lax.div(jnp.maximum(start + a, 0), tile)
    hi = jnp.int32(other_tiles) if b is None else jnp.minimum(
        _cdiv(jnp.maximum(start + n + b, 0), tile), other_tiles)
    lo = jnp.minimum(lo, other_tiles)
    hi = jnp.maximum(hi, lo)
    full_lo = zero if a is None else _cdiv(jnp.maximum(start + n - 1 + a, 0), tile)
    full_hi = jnp.int32(other_tiles) if b is None else lax.div(jnp.maximum(start + b + 1, 0), tile)
    if mask_tail and other_len % tile:
        full_hi = jnp.minimum(full_hi, other_len // tile)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def visit_band(body, carry, lo, full_lo, full_hi, hi, *, low_edge: bool, high_edge: bool = True):
    """``body(tile, carry, masked)`` over tiles [lo, hi) as :func:`tile_ranges` splits
    them: masked below full_lo, unmasked to full_hi, masked after. A side without an edge
    (``low_edge`` / ``high_edge`` False: its masked stretch is always empty) gets no loop."""
    if low_edge:
        carry = lax.fori_loop(lo, full_lo, lambda t, c: body(t, c, True), carry)
    carry = lax.fori_loop(full_lo, full_hi, lambda t, c: body(t, c, False), carry)
    if high_edge:
        carry = lax.fori_loop(full_hi, hi, lambda t, c: body(t, c, True), carry)
    return carry


def log2_scale(sm_scale: float, softcap: float | None) -> float:
    """The factor that takes scores to log2 units: of the raw ``q . k`` (``sm_scale *
    log2 e``) or, with soft-cap, of its tanh (:func:`softcap_tanh`; ``softcap * log2 e``)."""
    return sm_scale * LOG2E if softcap is None else softcap * LOG2E


def softcap_tanh(s, sm_scale: float, softcap: float):
    """``tanh(s * sm_scale / softcap)`` of raw scores: the soft-capped score over softcap."""
    return jnp.tanh(s * (sm_scale / softcap))


def scores_log2(s, sm_scale: float, softcap: float | None):
    """Raw ``q . k`` -> scores in log2 units, soft-capped (``softcap * tanh(x / softcap)``)
    when ``softcap`` is set. Also returns the tanh (None without soft-cap), which the
    backward needs for the soft-cap's derivative (:func:`softcap_grad`)."""
    if softcap is None:
        return s * log2_scale(sm_scale, None), None
    t = softcap_tanh(s, sm_scale, softcap)
    return t * log2_scale(sm_scale, softcap), t


def softcap_grad(ds, t):
    """dS through the soft-cap: times ``1 - tanh^2``; ``ds`` itself without soft-cap."""
    return ds if t is None else ds * (1.0 - t * t)
