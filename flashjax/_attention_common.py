"""What every attention kernel shares: constants, the mask, the soft-capped scores.

Written once here and used by the forward, dQ and dK/dV kernels of
:mod:`flashjax.attention` (and meant for :mod:`flashjax.attention_sm90` too). Plain
``jnp`` on position arrays, so the same function runs inside Pallas Triton kernels,
in interpret mode and in plain XLA.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

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
        diff = k_pos - (q_pos + offset)
        if right >= 0:
            conds.append(diff <= right)
        if left >= 0:
            conds.append(diff >= -left)
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


def scores_log2(s, sm_scale: float, softcap: float | None):
    """Raw ``q . k`` -> scores in log2 units, soft-capped (``softcap * tanh(x / softcap)``)
    when ``softcap`` is set. Also returns the tanh (None without soft-cap), which the
    backward needs for the soft-cap's derivative (:func:`softcap_grad`)."""
    if softcap is None:
        return s * (sm_scale * LOG2E), None
    t = jnp.tanh(s * (sm_scale / softcap))
    return t * (softcap * LOG2E), t


def softcap_grad(ds, t):
    """dS through the soft-cap: times ``1 - tanh^2``; ``ds`` itself without soft-cap."""
    return ds if t is None else ds * (1.0 - t * t)
