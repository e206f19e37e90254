"""flashjax.attention_sm90 (the Hopper Mosaic GPU kernels) at head_dim 64, 128 and 256.

Without a Hopper GPU: every kernel variant lowers to the Mosaic GPU dialect for a
CUDA target, which checks its shared-memory budget (227 KB), wgmma shapes and register
layouts. On a Hopper GPU: outputs, log-sum-exp and gradients against the float32
reference, called through the kernels directly (also at the head dims `supports` does
not take yet), with lengths that are not a multiple of the tiles and q_len != kv_len
(bottom-right causal). A case there costs compiles of the kernels (on the CPU, tens of
seconds each in a parallel suite), so the cases are picked to reach every code path of
the kernels at every head dim, not the cross product of every factor: each list below
says what its cases cover.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax import attention_reference, flash_attention
from flashjax import attention_sm90 as sm90
from flashjax._backend import compute_capability
from helpers import MOSAIC_PAIRWISE_CASES, MOSAIC_PAIRWISE_IDS

HOPPER = compute_capability() == "9.0"
hopper = pytest.mark.skipif(not HOPPER, reason="the Mosaic GPU kernels need a Hopper GPU (sm_90)")
LOG2E = 1.4426950408889634
TOL = {jnp.bfloat16: (3e-2, 3e-2), jnp.float16: (4e-3, 4e-3)}
GRAD_TOL = {jnp.bfloat16: (8e-2, 8e-2), jnp.float16: (1.5e-2, 1.5e-2)}


def _lower(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


# The lowering checks are for machines without a Hopper GPU. On one, the @hopper tests below
# compile and run the kernels at every head dim, causal and full, with tails, q_len != kv_len
# and every head split, and lowering is the first step of those compiles.
lower_only = pytest.mark.skipif(HOPPER, reason="on a Hopper GPU the @hopper tests compile and run "
                                               "these kernel variants (lowering is their first step)")


@lower_only
@pytest.mark.parametrize("head_dim", sm90.HEAD_DIMS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 256, 256, 2, 2), (2, 1000, 1000, 4, 1), (1, 384, 1000, 2, 1),
                                   (1, 1000, 384, 2, 2)], ids=["mha", "gqa-tail", "q<kv", "q>kv"])
def test_sm90_kernels_lower_for_cuda(head_dim, causal, shape):
    """Forward and backward lower (no GPU needed): each fits in shared memory."""
    b, sq, sk, h, hk = shape
    q = jax.ShapeDtypeStruct((b, sq, h, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, sk, hk, head_dim), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((b, h, sq), jnp.float32)
    fwd = _lower(lambda q, k, v: sm90.forward(q, k, v, causal=causal, sm_scale=0.1), q, kv, kv)
    assert "mosaic_gpu" in fwd.as_text()
    _lower(lambda q, k, v, do, lse, delta: sm90.backward(q, k, v, do, lse, delta, causal=causal,
                                                         sm_scale=0.1), q, kv, kv, q, rows, rows)


@lower_only
@pytest.mark.parametrize("head_dim", sm90.HEAD_DIMS)
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_sm90_backward_head_splits_lower_for_cuda(head_dim, splits):
    """GQA 4:1 backward: each program takes 4 // splits query heads in turn."""
    q = jax.ShapeDtypeStruct((1, 384, 8, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 384, 2, head_dim), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((1, 8, 384), jnp.float32)
    cfg = dataclasses.replace(sm90.BWD_CONFIGS[head_dim], head_splits=splits)
    _lower(lambda q, k, v, do, lse, delta: sm90.backward(q, k, v, do, lse, delta, causal=True,
                                                         sm_scale=0.1, config=cfg),
           q, kv, kv, q, rows, rows)


def test_sm90_supports_head_dims():
    ok = dict(q_len=256, kv_len=256, dtype=jnp.bfloat16, causal=True, window=None, softcap=None,
              masked=False, sparse=False)
    for d in sm90.SUPPORTED_HEAD_DIMS:
        assert set(sm90.SUPPORTED_HEAD_DIMS) <= set(sm90.HEAD_DIMS)
        assert sm90.supports(head_dim=d, **ok) is None
    for d in (32, 96, 512):
        why = sm90.supports(head_dim=d, **ok)
        assert why is not None and f"head_dim {d}" in why


def test_sm90_length_padding_is_exact():
    """The padded layout of lengths off 8 gives every real query exactly its real keys under
    the mask the kernels apply to the padded arrays (keys past the array's end, causal
    bottom-right on the padded lengths); full attention refuses a kv_len off 8."""
    for causal in (True, False):
        for q_len in range(1, 27):
            for kv_len in range(1, 27):
                pad = sm90.length_padding(q_len, kv_len, causal)
                if pad is None:
                    assert not causal and kv_len % 8
                    assert "full attention" in sm90.supports(
                        q_len=q_len, kv_len=kv_len, head_dim=128, dtype=jnp.bfloat16,
                        causal=causal, window=None, softcap=None, masked=False, sparse=False)
                    continue
                front, back, keys = pad
                if q_len % 8 == 0 and kv_len % 8 == 0:
                    assert pad == (0, 0, 0)
                rows, cols = q_len + front + back, kv_len + keys
                assert rows % 8 == 0 and cols % 8 == 0 and keys < 8 and front + back < 15
                i, j = np.arange(rows)[:, None], np.arange(cols)[None, :]
                seen = j <= i + cols - rows if causal else np.ones((rows, cols), bool)
                real = seen[front:front + q_len]
                ri, rj = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
                want = rj <= ri + kv_len - q_len if causal else np.ones((q_len, kv_len), bool)
                assert np.array_equal(real[:, :kv_len], want), (q_len, kv_len, causal, pad)
                assert not real[:, kv_len:].any(), (q_len, kv_len, causal, pad)


def test_sm90_length_padding_is_exact_with_windows():
    """With a sliding window the padded layout keeps every real query's bottom-right
    diagonal, so the window the kernels apply to the padded arrays gives every real query
    exactly its real keys; a padded zero key stays outside it when the window's right side
    is 0 (causal) or kv_len is a multiple of 8, and otherwise length_padding refuses."""
    windows = [(3, 0), (0, 0), (5, 2), (-1, 3), (4, -1), (9, 9), 3]
    for causal in (True, False):
        for window in windows:
            left, right = sm90._bounds(causal, window)
            for q_len in range(1, 20):
                for kv_len in range(1, 20):
                    pad = sm90.length_padding(q_len, kv_len, causal, window)
                    why = sm90.supports(q_len=q_len, kv_len=kv_len, head_dim=64,
                                        dtype=jnp.bfloat16, causal=causal, window=window,
                                        softcap=None, masked=False, sparse=False)
                    what = (q_len, kv_len, causal, window, pad)
                    if pad is None:
                        assert kv_len % 8 and right != 0, what
                        assert "with window" in why, what
                        continue
                    assert why is None, what
                    front, back, keys = pad
                    rows, cols = q_len + front + back, kv_len + keys
                    assert rows % 8 == 0 and cols % 8 == 0 and keys < 8 and front + back < 15
                    diff = np.arange(cols)[None, :] - (np.arange(rows)[:, None] + cols - rows)
                    seen = (diff <= (right if right >= 0 else cols)) & (diff >= -(left if left >= 0
                                                                                  else cols))
                    real = seen[front:front + q_len]
                    rdiff = np.arange(kv_len)[None, :] - (np.arange(q_len)[:, None] + kv_len - q_len)
                    want = ((rdiff <= (right if right >= 0 else kv_len))
                            & (rdiff >= -(left if left >= 0 else kv_len)))
                    assert np.array_equal(real[:, :kv_len], want), what
                    assert not real[:, kv_len:].any(), what


# Window and soft-cap variants: (causal, window, softcap), each at every head dim. The
# forward's and both backward kernels' band edges on both sides, the mask and the tanh.
MASK_VARIANTS = [(True, 100, 2.0), (False, (40, 30), None), (False, (70, -1), 5.0),
                 (True, None, 3.0)]


@lower_only
@pytest.mark.parametrize("head_dim", sm90.HEAD_DIMS)
@pytest.mark.parametrize("causal,window,softcap", MASK_VARIANTS,
                         ids=["causal-window-cap", "window", "left-window-cap", "causal-cap"])
def test_sm90_window_softcap_lower_for_cuda(head_dim, causal, window, softcap):
    """Forward and backward with a sliding window and/or soft-cap lower (no GPU needed),
    GQA, lengths off the tiles (1001 padded to 1008 where exact)."""
    q = jax.ShapeDtypeStruct((1, 1001, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, 2, head_dim), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((1, 4, 1001), jnp.float32)
    kw = dict(causal=causal, sm_scale=0.1, window=window, softcap=softcap)
    fwd = _lower(lambda q, k, v: sm90.forward(q, k, v, **kw), q, kv, kv)
    assert "mosaic_gpu" in fwd.as_text()
    _lower(lambda q, k, v, do, lse, delta: sm90.backward(q, k, v, do, lse, delta, **kw),
           q, kv, kv, q, rows, rows)


@pytest.mark.parametrize("sq,sk,causal,kv_heads", [
    (1000, 1000, True, 4), (1000, 1000, True, 1), (384, 1024, True, 4), (200, 136, False, 4),
    (1001, 1001, True, 2), (13, 1000, True, 4), (1000, 1003, True, 1), (1001, 1000, False, 4)])
def test_flash_attention_mosaic_path_lowers_for_cuda(monkeypatch, sq, sk, causal, kv_heads):
    """flash_attention(implementation="mosaic") at lengths off the tiles, forward and
    backward, lowers for CUDA (no GPU needed; a Hopper GPU claimed): unpadded at multiples
    of 8, padded to multiples of 8 otherwise. No Triton kernel is in it."""
    from flashjax import attention as A

    monkeypatch.setattr(A, "compute_capability", lambda: "9.0")
    q = jax.ShapeDtypeStruct((1, sq, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, sk, kv_heads, 128), jnp.bfloat16)

    def loss(q, k, v):
        o = flash_attention(q, k, v, causal=causal, implementation="mosaic", interpret=False)
        return jnp.sum(o.astype(jnp.float32))

    text = _lower(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv).as_text()
    assert "mosaic_gpu" in text and "triton" not in text


def _close(got, want, tol, what):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol[0], rtol=tol[1], err_msg=what)


def _check(b, sq, sk, h, hk, d, causal, dtype, seed=0, bcfg=None, window=None, softcap=None):
    """O, log-sum-exp, dQ, dK and dV of the sm90 kernels (outputs poisoned) against the
    float32 reference. One jit holds the forward and backward kernels and one the
    reference, so a case compiles each Mosaic kernel once (on a GPU the compiles, not
    the runs, are what a case costs)."""
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v, do = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key, shape in zip(
        ks, [(b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d), (b, sq, h, d)]))
    scale = 1.0 / math.sqrt(d)

    @jax.jit
    def kernels(q, k, v, do):
        mask = dict(causal=causal, sm_scale=scale, window=window, softcap=softcap)
        o, lse2 = sm90.forward(q, k, v, poison=True, **mask)
        delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
        return (o, lse2, *sm90.backward(q, k, v, do, lse2, delta, poison=True, config=bcfg,
                                        **mask))

    @jax.jit
    def reference(q, k, v, do):
        args = [x.astype(jnp.float32) for x in (q, k, v)]
        (ro, rlse), rvjp = jax.vjp(lambda q, k, v: attention_reference(
            q, k, v, causal=causal, sm_scale=scale, window=window, softcap=softcap,
            return_lse=True), *args)
        return (ro, rlse, *rvjp((do.astype(jnp.float32), jnp.zeros_like(rlse))))

    o, lse2, dq, dk, dv = kernels(q, k, v, do)
    ro, rlse, rdq, rdk, rdv = reference(q, k, v, do)
    lse = np.where(np.isinf(np.asarray(lse2)), -np.inf, np.asarray(lse2) / LOG2E)
    _close(o, ro, TOL[dtype], "o")
    _close(lse, rlse, TOL[dtype], "lse")
    for name, g, w in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        _close(g, w, GRAD_TOL[dtype], name)


@hopper
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("causal,dtype,shape", MOSAIC_PAIRWISE_CASES, ids=MOSAIC_PAIRWISE_IDS)
def test_sm90_head_dims_match_reference(head_dim, causal, dtype, shape):
    """head_dim 128 (the forward's "pinned" row sum, the backward split by keys as at 64)
    and 256 (64-key forward tiles, the "after" row sum; the backward split by head dim,
    its own kernel), each at every pair of (causal, dtype, grouping): see
    helpers.MOSAIC_PAIRWISE_CASES (head_dim 64: tests/test_attention.py)."""
    heads, kv_heads, seq = shape
    _check(2, seq, seq, heads, kv_heads, head_dim, causal, getattr(jnp, dtype))


# Lengths off the tiles and q_len != kv_len, each head_dim at 4 of these shapes (all GQA
# 4:2, bf16): head_dim 64 and 128 run the same forward and backward code (only their tile
# configs differ), so they split the shapes between them; 256's backward is its own kernel
# and gets a set of its own. Each head dim has causal and full attention, q_len < kv_len,
# q_len > kv_len (rows that see no key: O = 0) and a masked tail tile.
TAIL_SHAPES = {  # (q_len, kv_len, causal): what it covers
    "eq-tails-causal": (1000, 1000, True),  # both lengths off the tiles, diagonal through them
    "eq-tails-full": (1000, 1000, False),  # full attention: only the last key tile masked
    "q<kv": (384, 1024, True),  # bottom-right causal, lengths on the tiles
    "q>kv": (1024, 384, True),  # the first 640 rows see no key: O = 0, lse = +inf
    "q<kv-tails": (200, 1000, True),  # bottom-right causal, both lengths off the tiles
    "tiny-q": (8, 136, True),  # one partial query tile (the second warpgroup writes nothing)
    "full-tails": (136, 200, False),  # full, unequal, both off the tiles
}
TAIL_CASES = [(64, "q<kv-tails"), (64, "q>kv"), (64, "tiny-q"), (64, "full-tails"),
              (128, "eq-tails-causal"), (128, "eq-tails-full"), (128, "q<kv"), (128, "q>kv"),
              (256, "q<kv-tails"), (256, "q>kv"), (256, "tiny-q"), (256, "full-tails")]


@hopper
@pytest.mark.parametrize("head_dim,shape", TAIL_CASES, ids=[f"{d}-{n}" for d, n in TAIL_CASES])
def test_sm90_tails_and_unequal_lengths(head_dim, shape):
    """Lengths off the tiles (masked in the last tile, no padding copies) and
    q_len != kv_len, causal aligned bottom-right (rows that see no key: O = 0)."""
    sq, sk, causal = TAIL_SHAPES[shape]
    _check(1, sq, sk, 4, 2, head_dim, causal, jnp.bfloat16, seed=1)


# The GQA backward (8 query heads on 2 KV heads) with explicit head splits. 1: one program
# per KV head takes its 4 query heads in turn (a loop over heads) and writes dK/dV in bf16;
# 2: two programs of 2 heads each (the loop, float32 partial sums); 4: one query head per
# program, float32 partials. That last is the default for GQA at these small sizes, which
# the GQA cases above take at every head dim, so here it is only at 64.
SPLIT_CASES = [(64, 1), (64, 2), (64, 4), (128, 1), (128, 2), (256, 1), (256, 2)]


@hopper
@pytest.mark.parametrize("head_dim,splits", SPLIT_CASES)
def test_sm90_backward_head_splits(head_dim, splits):
    """GQA 4:1: one program per KV head summing its 4 query heads in registers (1), or
    float32 partial sums over 2 or 4 programs: the same gradients."""
    cfg = dataclasses.replace(sm90.BWD_CONFIGS[head_dim], head_splits=splits)
    _check(2, 384, 384, 8, 2, head_dim, True, jnp.bfloat16, seed=3, bcfg=cfg)


# GQA 4:1 with one program per KV head taking its 4 query heads in turn (head_splits 1):
# the ring position of a step runs on over the heads, and with a window the number of
# query tiles a key block sees differs from block to block (some see none).
WINDOW_SPLIT_CASES = {"64-causal-window-cap": (64, True, 100, 5.0),
                      "256-window": (256, False, (60, 40), None)}


@hopper
@pytest.mark.parametrize("case", list(WINDOW_SPLIT_CASES))
def test_sm90_window_backward_one_split(case):
    head_dim, causal, window, softcap = WINDOW_SPLIT_CASES[case]
    cfg = dataclasses.replace(sm90.BWD_CONFIGS[head_dim], head_splits=1)
    _check(2, 512, 512, 8, 2, head_dim, causal, jnp.bfloat16, seed=4, bcfg=cfg, window=window,
           softcap=softcap)


@hopper
@pytest.mark.parametrize("head_dim", sm90.SUPPORTED_HEAD_DIMS)
def test_sm90_through_flash_attention(head_dim):
    ks = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(key, (2, 256, 4, head_dim), jnp.bfloat16) for key in ks)
    text = jax.jit(lambda q: flash_attention(q, k, v, causal=True)).lower(q).as_text()
    assert "mosaic_gpu" in text  # "auto" takes the Hopper kernels at this head dim
    got = flash_attention(q, k, v, causal=True, implementation="mosaic")
    want = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
    _close(got, want, TOL[jnp.bfloat16], "o")
