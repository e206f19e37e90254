"""Plain-XLA attention: the reference the kernels are tested against, and the
`xla` attention of the model. It materialises the full [q_len, kv_len] score
matrix, so it is only for checking and for short sequences."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def normalize_window(window, causal: bool):
    """`window` -> (left, right) key offsets around the aligned diagonal, or None.

    An int `w` means `w` keys to the left (and, when not causal, `w` to the
    right); a pair gives (left, right); -1 or None on one side is unbounded.
    """
    if window is None:
        return None
    if isinstance(window, (int, np.integer)):
        left, right = int(window), (0 if causal else int(window))
    else:
        try:
            left, right = window
        except (TypeError, ValueError):
            raise ValueError(
                f"window must be an int or a (left, right) pair, got {window!r}"
            ) from None
        left = -1 if left is None else int(left)
        right = -1 if right is None else int(right)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < -1 or right < -1:
        raise ValueError(f"window sides must be >= 0 (or -1 for unbounded), got {window!r}")
    return left, right


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    window=None,
    q_lengths=None,
    kv_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    block_mask=None,
    sparse_block_size: int = 128,
):
    """Boolean mask [batch or 1, 1, q_len, kv_len]; True where a query sees a key.

    Causal and window masks are aligned bottom-right: query i sits at key
    position i + (kv_len - q_len).
    """
    qi = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    kj = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((q_len, kv_len), bool)
    win = normalize_window(window, causal)
    if causal:
        mask &= kj <= qi
    if win is not None:
        left, right = win
        if left >= 0:
            mask &= kj >= qi - left
        if right >= 0:
            mask &= kj <= qi + right
    if block_mask is not None:
        bm = jnp.asarray(block_mask, bool)
        rows = jnp.arange(q_len) // sparse_block_size
        cols = jnp.arange(kv_len) // sparse_block_size
        mask &= bm[rows][:, cols]
    mask = mask[None, None]
    if q_lengths is not None:
        mask = mask & (jnp.arange(q_len)[None, None, :, None] < jnp.asarray(q_lengths)[:, None, None, None])
    if kv_lengths is not None:
        mask = mask & (jnp.arange(kv_len)[None, None, None, :] < jnp.asarray(kv_lengths)[:, None, None, None])
    if q_segment_ids is not None:
        same = jnp.asarray(q_segment_ids)[:, :, None] == jnp.asarray(kv_segment_ids)[:, None, :]
        mask = mask & same[:, None]
    return mask


def attention_reference(
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
    return_lse: bool = False,
    dtype=None,
):
    """Reference attention with the same arguments as `flashjax.flash_attention`.

    Computes in `dtype` (float32 by default, float64 if given under x64) and
    returns that dtype. Rows that see no key give zeros (and lse = -inf).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    dtype = dtype or (jnp.float64 if q.dtype == jnp.float64 else jnp.float32)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    group = heads // kv_heads
    qf = q.astype(dtype).reshape(batch, q_len, kv_heads, group, head_dim)
    kf, vf = k.astype(dtype), v.astype(dtype)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf, precision="highest") * sm_scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            q_seg, kv_seg = segment_ids
        else:
            q_seg = kv_seg = segment_ids
    mask = attention_mask(
        q_len, kv_len, causal=causal, window=window, q_lengths=q_lengths,
        kv_lengths=kv_lengths, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        block_mask=block_mask, sparse_block_size=sparse_block_size,
    )[:, :, None]  # [b, 1, 1, q, k]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p / jnp.where(l > 0, l, 1.0), vf, precision="highest")
    o = o.reshape(batch, q_len, heads, head_dim)
    if not return_lse:
        return o
    lse = jnp.where(l[..., 0] > 0, (m_safe + jnp.log(l))[..., 0], -jnp.inf)
    return o, lse.reshape(batch, heads, q_len)
