"""The FP8 (e4m3) KV cache: quantization, the decode kernel on FP8 pages, the runner's
prefill and decode, and the engine (CPU; Pallas interpret mode).

Kernel inputs are fresh per session (the `rng` fixture; reproduce a failure with
FLASHJAX_TEST_SEED). The model tests use fixed seeds: their agreement thresholds
are measured on one tiny random model and a chaotic random model would move them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax import kv_cache as kc
from flashjax._backend import on_gpu
from flashjax.decode import DecodeConfig, decode_attention, decode_reference, paged_decode_attention

warnings.filterwarnings("ignore", category=DeprecationWarning)

FP8 = jnp.float8_e4m3fn
# Against a float32 reference computed from the *dequantized* cache: the kernel reads
# exactly those values, so only the float arithmetic differs.
TIGHT = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
# Against the *unquantized* cache (q, k, v ~ N(0, 1), head_dim 32): e4m3 keeps 3
# mantissa bits, so every stored entry is within 2^-4 (6.25%) of its value. Over 300
# seeds the output's relative L2 error was 3.1% (median) and 3.8% (max), its max abs
# error 0.06 / 0.12: the test allows 6% and 0.25. A missing or misplaced scale gives
# errors of order 1 and more.
LOOSE_REL, LOOSE_ABS = 0.06, 0.25


def _np(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


# --------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------


def test_quantize_dequantize_round_trip(rng):
    # Vectors of very different magnitudes (1e-4 .. 1e4) in one array: each has its own scale.
    mags = jnp.logspace(-4, 4, 9)[:, None, None]
    x = jax.random.normal(rng(), (9, 5, 64), jnp.float32) * mags
    vals, scales = kc.quantize_fp8(x)
    assert vals.dtype == FP8 and scales.dtype == jnp.float32 and scales.shape == (9, 5)
    back = _np(kc.dequantize_fp8(vals, scales))
    xn = np.asarray(x, np.float64)
    amax = np.abs(xn).max(-1, keepdims=True)
    # relative error <= 2^-4 for normal e4m3 values; entries below 2^-6 * scale are
    # subnormal there, with absolute spacing 2^-9 * scale (error <= half of it)
    s = amax / kc.FP8_MAX
    err = np.abs(back - xn)
    assert (err <= np.maximum(2.0 ** -4 * np.abs(xn), 2.0 ** -10 * s) * (1 + 1e-6)).all()
    assert err.max() > 0  # it did quantize
    # each vector's largest entry maps to +-448 and comes back (nothing clips)
    i = np.abs(xn).argmax(-1)
    np.testing.assert_allclose(np.take_along_axis(back, i[..., None], -1),
                               np.take_along_axis(xn, i[..., None], -1), rtol=1e-6)
    assert float(jnp.max(jnp.abs(vals.astype(jnp.float32)))) == kc.FP8_MAX
    # an all-zero vector: scale 1, zeros back
    zv, zs = kc.quantize_fp8(jnp.zeros((2, 8)))
    assert (np.asarray(zs) == 1).all() and (_np(kc.dequantize_fp8(zv, zs)) == 0).all()
    # bf16 input, bf16 output
    xb = x[4].astype(jnp.bfloat16)
    out = kc.dequantize_fp8(*kc.quantize_fp8(xb), dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(_np(out), _np(xb), rtol=2 ** -4 + 2 ** -8, atol=1e-3)


@jax.jit
def _write_fork_gather(k, v):
    """Two sequences prefilled into an FP8 pool (a third token to an inactive slot), then
    slot 1 forked from slot 0 (copy-on-write of its partial block); the dequantized dense
    caches before and after the fork."""
    hkv, d, bs = 2, 16, 4
    st = kc.init_state(num_blocks=8, max_seqs=3, max_blocks_per_seq=4, block_size=bs)
    st = kc.allocate(kc.allocate(st, 0, 6), 2, 3)
    kp, vp = kc.init_pages(8, bs, hkv, d, FP8)
    ks, vs = kc.init_scales(8, bs, hkv)
    seqs = jnp.asarray([0] * 6 + [2] * 3 + [1])  # the last token's slot is inactive: dropped
    pos = jnp.asarray(list(range(6)) + list(range(3)) + [0])
    kp, vp, ks, vs = kc.write_kv_fp8(kp, vp, ks, vs, st, seqs, pos, k, v)
    dense = kc.gather_kv(kp, vp, st.block_tables, st.lengths, k_scales=ks, v_scales=vs)
    st2, copy = kc.fork(st, 0, 1)
    kp2, vp2, ks2, vs2 = kc.copy_blocks(kp, vp, copy, ks, vs)
    forked = kc.gather_kv(kp2, vp2, st2.block_tables, st2.lengths, k_scales=ks2, v_scales=vs2)
    return dense, forked, st.status, st2.status


def test_write_kv_fp8_through_the_allocator(rng):
    hkv, d = 2, 16
    k = jax.random.normal(rng(), (10, hkv, d)) * 5
    v = jax.random.normal(rng(), (10, hkv, d))
    (kd, vd), (kd2, _), status, status2 = _write_fork_gather(k, v)
    assert int(status) == int(status2) == kc.OK
    want_k = _np(kc.dequantize_fp8(*kc.quantize_fp8(k)))
    want_v = _np(kc.dequantize_fp8(*kc.quantize_fp8(v)))
    np.testing.assert_array_equal(_np(kd[0, :6]), want_k[:6])
    np.testing.assert_array_equal(_np(vd[2, :3]), want_v[6:9])
    assert (_np(kd[1]) == 0).all()  # nothing written for the inactive slot
    np.testing.assert_array_equal(_np(kd2[1, :6]), want_k[:6])  # the fork's copy carries the scales
    kp, vp = kc.init_pages(8, 4, hkv, d, FP8)
    ks, vs = kc.init_scales(8, 4, hkv)
    st = kc.init_state(num_blocks=8, max_seqs=3, max_blocks_per_seq=4, block_size=4)
    seqs, pos = jnp.zeros((10,), jnp.int32), jnp.arange(10)
    with pytest.raises(TypeError, match="write_kv_fp8"):
        kc.write_kv(kp, vp, st, seqs, pos, k, v)
    with pytest.raises(ValueError, match=r"k_scales must be float32 \[kv_heads, num_blocks, block_size\]"):
        kc.write_kv_fp8(kp, vp, ks[:, :4], vs, st, seqs, pos, k, v)


# --------------------------------------------------------------------------
# Decode kernel on FP8 pages
# --------------------------------------------------------------------------


_quant = jax.jit(kc.quantize_fp8)
_dequant = jax.jit(kc.dequantize_fp8)
_reference = jax.jit(decode_reference, static_argnames=("softcap",))


def _paged_fp8(key, *, batch, heads, kv_heads, head_dim, bs, max_blocks, lengths, poison=False):
    """Random q and an FP8 pool (shuffled block tables, garbage table entries past each
    length); with `poison`, every slot no sequence owns holds NaN values and scales."""
    kq, kk, kv, kperm = jax.random.split(key, 4)
    need = [-(-n // bs) for n in lengths]
    nb = sum(need) + 2
    perm = np.asarray(jax.random.permutation(kperm, nb))
    tables = np.full((batch, max_blocks), 0, np.int32)
    off = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[off: off + n]
        tables[i, n:] = np.resize([-5, nb + 7, 2**30], max_blocks - n)  # never dereferenced
        off += n
    q = jax.random.normal(kq, (batch, heads, head_dim), jnp.float32)
    k = jax.random.normal(kk, (kv_heads, nb, bs, head_dim), jnp.float32)
    v = jax.random.normal(kv, (kv_heads, nb, bs, head_dim), jnp.float32)
    k8, ks = _quant(k)
    v8, vs = _quant(v)
    if poison:
        owned = np.zeros((nb, bs), bool)
        for i, n in enumerate(lengths):
            for t in range(n):
                owned[tables[i, t // bs], t % bs] = True
        bad = jnp.asarray(~owned)
        nan8 = jnp.asarray(np.nan, FP8)
        k8 = jnp.where(bad[None, :, :, None], nan8, k8)
        v8 = jnp.where(bad[None, :, :, None], nan8, v8)
        ks = jnp.where(bad[None], jnp.nan, ks)
        vs = jnp.where(bad[None], jnp.inf, vs)
    return q, (k, v), (k8, v8, ks, vs), jnp.asarray(tables), jnp.asarray(lengths, jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_len",))
def _dense(pages, tables, max_len):
    """[kv_heads, N, bs, ...] pages + tables -> [batch, max_len, kv_heads, ...]; non-finite
    values (the poison past the lengths) read as 0."""
    bs = pages.shape[2]
    t = jnp.arange(max_len)
    blk = jnp.clip(tables[:, t // bs], 0, pages.shape[1] - 1)
    g = pages[:, blk, (t % bs)[None, :]]
    return jnp.moveaxis(jnp.where(jnp.isfinite(g), g, 0.0), 0, 2)


@pytest.mark.parametrize("dtype,gather,splits,softcap", [
    (jnp.float32, "rows", 1, None),
    (jnp.float32, "pages", 3, 20.0),
    (jnp.bfloat16, "rows", 2, None),
])
def test_paged_fp8_kernel(rng, dtype, gather, splits, softcap):
    bs, max_blocks = 4, 5
    full = bs * max_blocks
    lengths = [full, 1, 2 * bs + 1, 0]
    q, (k, v), (k8, v8, ks, vs), bt, ln = _paged_fp8(
        rng(), batch=4, heads=4, kv_heads=2, head_dim=32, bs=bs, max_blocks=max_blocks,
        lengths=lengths, poison=True)
    out = paged_decode_attention(q.astype(dtype), k8, v8, bt, ln, k_scales=ks, v_scales=vs,
                                 num_splits=splits, softcap=softcap,
                                 config=DecodeConfig(paged_gather=gather))
    assert out.dtype == dtype and out.shape == q.shape
    out = _np(out)
    assert np.isfinite(out).all(), "NaN pages / scales past the lengths leaked into the output"
    assert (out[-1] == 0).all()  # length 0
    # tight: the dequantized cache, float32 reference
    kd = _dense(_dequant(k8, ks), bt, full)  # poison lies past the lengths: read as 0 there
    vd = _dense(_dequant(v8, vs), bt, full)
    ref = _np(_reference(q.astype(dtype), kd, vd, ln, softcap=softcap))
    np.testing.assert_allclose(out, ref, atol=TIGHT[dtype], rtol=TIGHT[dtype])
    # loose: the unquantized cache
    exact = _np(_reference(q, _dense(k, bt, full), _dense(v, bt, full), ln, softcap=softcap))
    rel = np.linalg.norm(out - exact) / np.linalg.norm(exact)
    assert rel < LOOSE_REL and np.abs(out - exact).max() < LOOSE_ABS, (rel, np.abs(out - exact).max())
    assert rel > 1e-3  # and it really read FP8 (the unquantized result is not what came back)


def test_contiguous_fp8_kernel(rng):
    b, L, hkv, h, d = 3, 40, 2, 4, 32
    kq, kk, kv = rng(3)
    q = jax.random.normal(kq, (b, h, d), jnp.float32)
    k = jax.random.normal(kk, (b, L, hkv, d), jnp.float32) * 4
    v = jax.random.normal(kv, (b, L, hkv, d), jnp.float32)
    ln = jnp.asarray([L, 17, 1], jnp.int32)
    k8, ks = _quant(k)
    v8, vs = _quant(v)
    ref = _np(_reference(q, k8, v8, ln, k_scales=ks, v_scales=vs))
    for layout in ("bshd", "bhsd"):
        args = (k8, v8, ks, vs)
        if layout == "bhsd":
            args = tuple(jnp.swapaxes(x, 1, 2) for x in args)
        out = _np(decode_attention(q, args[0], args[1], ln, k_scales=args[2], v_scales=args[3],
                                   kv_layout=layout, block_k=16, num_splits=2))
        np.testing.assert_allclose(out, ref, atol=TIGHT[jnp.float32], rtol=TIGHT[jnp.float32], err_msg=layout)


def test_fp8_kernel_rejects_bad_inputs():
    q = jnp.zeros((1, 2, 16), jnp.float32)
    k8 = jnp.zeros((1, 4, 4, 16), FP8)
    sc = jnp.ones((1, 4, 4), jnp.float32)
    bt = jnp.zeros((1, 2), jnp.int32)
    ln = jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match="k_scales is required: k_pages/v_pages are float8_e4m3fn"):
        paged_decode_attention(q, k8, k8, bt, ln)
    with pytest.raises(ValueError, match=r"v_scales must have shape \[kv_heads, num_blocks, block_size\]"):
        paged_decode_attention(q, k8, k8, bt, ln, k_scales=sc, v_scales=sc[:, :2])
    with pytest.raises(TypeError, match="k_scales must be float32"):
        paged_decode_attention(q, k8, k8, bt, ln, k_scales=sc.astype(jnp.bfloat16), v_scales=sc)
    with pytest.raises(TypeError, match="k_pages and v_pages must both be float8_e4m3fn"):
        paged_decode_attention(q, k8, k8.astype(jnp.float32), bt, ln, k_scales=sc, v_scales=sc)
    with pytest.raises(ValueError, match="k_scales is only for a float8_e4m3fn cache"):
        paged_decode_attention(q, k8.astype(jnp.float32), k8.astype(jnp.float32), bt, ln, k_scales=sc)
    with pytest.raises(ValueError, match=r"k_scales must have shape \[batch, kv_len, kv_heads\]"):
        decode_attention(q, jnp.zeros((1, 8, 1, 16), FP8), jnp.zeros((1, 8, 1, 16), FP8), ln,
                         k_scales=jnp.ones((1, 1, 8)), v_scales=jnp.ones((1, 8, 1)))


# --------------------------------------------------------------------------
# DecodeConfig.fp8_dot="f16": the FP8 tiles' dots in float16
# --------------------------------------------------------------------------

# "f16" against a float64 reference on the dequantized cache, by q's dtype: the output's
# own rounding for bf16 and f16 q; float32 q is rounded to float16 (11 bits) for the dot,
# so it gets float16's tolerance (errors seen: up to 1.5e-3 with |k| ~ 4).
F16_TOL = {jnp.float32: 4e-3, jnp.float16: 4e-3, jnp.bfloat16: 2e-2}
# ... and against fp8_dot="q" (each within its tolerance of the reference)
GPU = on_gpu()
F16_VS_Q = {jnp.float32: 4e-3, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}
F16 = DecodeConfig(fp8_dot="f16")
Q = DecodeConfig(fp8_dot="q")


def _deq64(vals, scales):
    """Dequantized FP8 values in float64 (exact: e4m3 x float32 fits in a double)."""
    return _np(vals) * np.asarray(scales, np.float64)[..., None]


def _gather64(pages, tables, max_len):
    """float64 [kv_heads, N, bs, D] pages + tables -> [batch, max_len, kv_heads, D]
    (table entries past a length are clipped into the pool: the reference never reads them)."""
    bs = pages.shape[2]
    t = np.arange(max_len)
    blk = np.clip(np.asarray(tables)[:, t // bs], 0, pages.shape[1] - 1)
    return np.moveaxis(pages[:, blk, (t % bs)[None, :]], 0, 2)


def _ref64(q, k, v, lengths, softcap=None):
    """float64 decode attention over dense [batch, kv_len, kv_heads, D] arrays (positions
    at or past a sequence's length, poisoned or not, are never read)."""
    q = _np(q)
    b, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, h, d))
    for i, n in enumerate(np.asarray(lengths)):
        for j in range(h):
            if n == 0:
                continue
            s = k[i, :n, j // g] @ q[i, j] / math.sqrt(d)
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            p = np.exp(s - s.max())
            out[i, j] = p @ v[i, :n, j // g] / p.sum()
    return out


def _close(name, dtype, out, ref, tol, scale=1.0):
    """out (any dtype) within tol of ref, relative to `scale` (the values' magnitude),
    and finite; prints (pytest -s) and returns the largest error in units of `scale`."""
    out = _np(out)
    assert np.isfinite(out).all(), f"{name}: non-finite output"
    err = float(np.abs(out - ref).max()) / scale
    print(f"max err {name} {jnp.dtype(dtype).name}: {err:.3g} (x {scale:g})")
    np.testing.assert_allclose(out, ref, atol=tol * scale, rtol=tol, err_msg=name)
    return err


@pytest.mark.parametrize("dtype,gather,splits,heads,kv_heads,softcap,unified_max", [
    (jnp.bfloat16, "rows", 2, 8, 2, None, None),  # GQA group 4
    (jnp.float16, "pages", 3, 6, 2, 20.0, None),  # group 3 (padded), soft cap
    (jnp.float32, "rows", 1, 4, 4, None, 1.0),  # MHA, unified max
    (jnp.bfloat16, "rows", 4, 8, 1, None, None),  # MQA, more splits than some sequences' tiles
])
def test_fp8_dot_f16_paged(rng, dtype, gather, splits, heads, kv_heads, softcap, unified_max):
    """fp8_dot="f16" on FP8 pages equals the float64 reference on the dequantized cache,
    and fp8_dot="q": ragged lengths (a full cache, 1, a partial tile holding one position,
    exactly one tile, 0), shuffled tables with garbage past each length, and NaN values /
    NaN key scales / Inf value scales in every slot no sequence owns."""
    bs, max_blocks, ppb = 4, 8, 4  # 16-token tiles
    full = bs * max_blocks
    lengths = [full, 1, 17, 0, 16]
    q, _, (k8, v8, ks, vs), bt, ln = _paged_fp8(
        rng(), batch=5, heads=heads, kv_heads=kv_heads, head_dim=32, bs=bs, max_blocks=max_blocks,
        lengths=lengths, poison=True)
    q = q.astype(dtype)
    kw = dict(k_scales=ks, v_scales=vs, num_splits=splits, pages_per_block=ppb, softcap=softcap,
              unified_max=unified_max)
    out = paged_decode_attention(q, k8, v8, bt, ln, **kw, config=dataclasses.replace(F16, paged_gather=gather))
    out_q = paged_decode_attention(q, k8, v8, bt, ln, **kw, config=dataclasses.replace(Q, paged_gather=gather))
    assert out.dtype == dtype and out.shape == q.shape
    ref = _ref64(q, _gather64(_deq64(k8, ks), bt, full), _gather64(_deq64(v8, vs), bt, full), ln, softcap)
    _close("paged", dtype, out, ref, F16_TOL[dtype])
    _close("paged f16 vs q", dtype, out, _np(out_q), F16_VS_Q[dtype])
    assert (_np(out[3]) == 0).all()  # length 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_fp8_dot_f16_contiguous(rng, dtype):
    """The same on a dense FP8 cache, both layouts, with NaN values and scales past each
    length."""
    b, L, hkv, h, d = 3, 40, 2, 4, 32
    kq, kk, kv = rng(3)
    q = jax.random.normal(kq, (b, h, d), jnp.float32).astype(dtype)
    k8, ks = _quant(jax.random.normal(kk, (b, L, hkv, d), jnp.float32) * 4)
    v8, vs = _quant(jax.random.normal(kv, (b, L, hkv, d), jnp.float32))
    ln = jnp.asarray([L, 17, 1], jnp.int32)
    ref = _ref64(q, _deq64(k8, ks), _deq64(v8, vs), ln)
    past = (jnp.arange(L)[None, :] >= ln[:, None])[:, :, None]  # [b, L, 1]
    nan8 = jnp.asarray(np.nan, FP8)
    k8, v8 = (jnp.where(past[..., None], nan8, x) for x in (k8, v8))
    ks, vs = (jnp.where(past, jnp.nan, x) for x in (ks, vs))
    for layout in ("bshd", "bhsd"):
        args = (k8, v8, ks, vs)
        if layout == "bhsd":
            args = tuple(jnp.swapaxes(x, 1, 2) for x in args)
        run = lambda cfg: decode_attention(q, args[0], args[1], ln, k_scales=args[2], v_scales=args[3],
                                           kv_layout=layout, block_k=16, num_splits=2, config=cfg)
        out = run(F16)
        _close(f"contiguous {layout}", dtype, out, ref, F16_TOL[dtype])
        _close(f"contiguous {layout} f16 vs q", dtype, out, _np(run(Q)), F16_VS_Q[dtype])


def _adversarial(key, dtype, case):
    """Dense FP8 inputs (b=2, L=40, 2 KV heads, 4 query heads, head_dim 32; lengths 40
    and 23) built to break a float16 dot that does not normalise. Returns q, the clean
    (k8, v8, ks, vs), the same with NaN values and scales past the lengths, the lengths,
    and the magnitude of the output."""
    b, L, hkv, h, d = 2, 40, 2, 4, 32
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, h, d), jnp.float32)
    k = jax.random.normal(kk, (b, L, hkv, d), jnp.float32)
    v = jax.random.normal(kv, (b, L, hkv, d), jnp.float32)
    ln = jnp.asarray([L, 23], jnp.int32)
    mag = 1.0
    if case == "large_q":
        # |q| up to 6e5 (6e4 for float16 q): past float16's 65504 (a plain float16 cast of
        # q overflows; q*k products reach 448 times that); scores of order 1e4-1e5
        # (softmax nearly one-hot).
        q = (1e4 if dtype == jnp.float16 else 1e5) * jnp.clip(q, -6.0, 6.0)
    elif case == "tiny_v":
        # values of magnitude 1e-6: value scales ~ 1e-8 (p * vs in float16 would be 0)
        v, mag = v * 1e-6, 1e-6
    elif case == "sink":
        # An attention sink: position 0 of each sequence scores ~160 (log units) above
        # the rest and holds a value vector of magnitude 1e-3, all others 1e3. So p * vs
        # is largest at position 0 although its value scale is 1e-6 of the tile's
        # largest, and the later tiles' probabilities underflow to exactly 0 (all their
        # weights are 0); the value scales of positions 16..31 are 0 too (a valid tile of
        # zero values).
        q = jnp.abs(q)
        k = k.at[:, 0].set(36.0)
        v = (v * 1e3).at[:, 0].multiply(1e-6)
        mag = 1e-3
    q = q.astype(dtype)
    k8, ks = _quant(k)
    v8, vs = _quant(v)
    if case == "sink":
        vs = vs.at[:, 16:32].set(0.0)
    past = (jnp.arange(L)[None, :] >= ln[:, None])[:, :, None]
    nan8 = jnp.asarray(np.nan, FP8)
    k8n, v8n = (jnp.where(past[..., None], nan8, x) for x in (k8, v8))
    ksn, vsn = (jnp.where(past, jnp.nan, x) for x in (ks, vs))
    return q, (k8, v8, ks, vs), (k8n, v8n, ksn, vsn), ln, mag


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_fp8_dot_f16_adversarial(rng, dtype):
    """fp8_dot="f16" keeps every float16 value in range on inputs where a plain float16
    dot would overflow (large |q|) or underflow (tiny value scales; a sink position whose
    p * vs dominates a tile whose largest value scale is 1e6 times its own), with NaN
    values and scales past the lengths: equal to the float64 reference, relative to the
    values' magnitude. "q" agrees where its own dtype can hold the values. (The cases
    share one shape: one compilation per config.)"""
    tol = F16_TOL[dtype]
    for case in ("large_q", "tiny_v", "sink"):
        q, clean, poisoned, ln, mag = _adversarial(rng(), dtype, case)
        k8, v8, ks, vs = poisoned
        ref = _ref64(q, _deq64(clean[0], clean[2]), _deq64(clean[1], clean[3]), ln)
        run = lambda cfg: decode_attention(q, k8, v8, ln, k_scales=ks, v_scales=vs, block_k=16,
                                           num_splits=2, config=cfg)
        out = run(F16)
        # float16 output: the output's own float16 rounding (subnormal below 6.1e-5)
        scale = max(mag, 2.0 ** -24 / tol) if dtype == jnp.float16 else mag
        _close(f"adversarial {case}", dtype, out, ref, tol, scale=scale)
        if not (case == "tiny_v" and dtype == jnp.float16):  # "q" with float16 q: v * vs underflows
            _close(f"adversarial {case} f16 vs q", dtype, out, _np(run(Q)), F16_VS_Q[dtype], scale=scale)


def test_fp8_dot_f16_unified_max_needs_no_float16_window(rng):
    """With unified_max, "f16" normalises the probabilities per row before the float16
    cast, so scores far above phi (exp up to e^20, past float16's 65504) stay exact
    without the fallback (unified_fallback=False), for float16 q too."""
    b, L, hkv, h, d = 2, 40, 2, 4, 32
    kq, kk, kv = rng(3)
    q = (jnp.abs(jax.random.normal(kq, (b, h, d), jnp.float32)) * 3).astype(jnp.float16)
    # position 3 scores ~20 for every head (1.5 * sum|q| / sqrt(d)), the others ~N(0, 6^2)
    k8, ks = _quant((jax.random.normal(kk, (b, L, hkv, d), jnp.float32) * 2).at[:, 3].set(1.5))
    v8, vs = _quant(jax.random.normal(kv, (b, L, hkv, d), jnp.float32))
    ln = jnp.asarray([L, 29], jnp.int32)
    ref = _ref64(q, _deq64(k8, ks), _deq64(v8, vs), ln)
    smax = max(float(np.max(_deq64(k8, ks)[i, :n, j // 2] @ _np(q)[i, j])) / math.sqrt(d)
               for i, n in enumerate([L, 29]) for j in range(h))
    assert 12 < smax < 40, smax  # beyond the float16 window (10) of phi = 0, inside float32's (40)
    cfg = dataclasses.replace(F16, unified_fallback=False)
    out = decode_attention(q, k8, v8, ln, k_scales=ks, v_scales=vs, block_k=16, num_splits=2,
                           unified_max=0.0, config=cfg)
    _close("unified_max", jnp.float16, out, ref, F16_TOL[jnp.float16])
    # the test's teeth: "q" casts exp(s - phi) to float16 unnormalised, so without the
    # fallback it overflows here
    out_q = _np(decode_attention(q, k8, v8, ln, k_scales=ks, v_scales=vs, block_k=16, num_splits=2,
                                 unified_max=0.0, config=dataclasses.replace(cfg, fp8_dot="q")))
    assert not np.allclose(out_q, ref, atol=0.1, rtol=0.1)


def test_fp8_dot_only_changes_fp8_caches():
    """fp8_dot="f16" traces another program on an FP8 cache (a kernel named *_f16dot) and
    the same program as "q" on a bf16 one; the default is "f16" on bf16 q."""
    q = jnp.zeros((2, 4, 32), jnp.bfloat16)
    kv16 = jnp.zeros((2, 32, 2, 32), jnp.bfloat16)
    kv8 = jnp.zeros((2, 32, 2, 32), FP8)
    sc = jnp.ones((2, 32, 2), jnp.float32)
    ln = jnp.full((2,), 32, jnp.int32)

    def jaxpr(cfg, fp8):
        if fp8:
            f = lambda: decode_attention(q, kv8, kv8, ln, k_scales=sc, v_scales=sc, config=cfg)
        else:
            f = lambda: decode_attention(q, kv16, kv16, ln, config=cfg)
        return str(jax.make_jaxpr(f)())

    assert jaxpr(F16, False) == jaxpr(Q, False) == jaxpr(None, False)
    f16 = jaxpr(F16, True)
    assert f16 != jaxpr(Q, True) and "_f16dot" in f16
    assert jaxpr(None, True) == f16  # the default ("auto") takes "f16" for bf16 q


# --------------------------------------------------------------------------
# The model on an FP8 cache
# --------------------------------------------------------------------------

VOCAB = 128


@functools.lru_cache(maxsize=None)
def _model(n_layer=2):
    from flashjax.models.config import config_from_preset
    from flashjax.models.gpt import build_model

    # GPT-2 family, head_dim 16; init_std 0.15: the 2-layer model's greedy continuations
    # depend on the context (no echo of the last token) without being chaotic under FP8
    # noise. The 1-layer one keeps the compile-bound tests short.
    cfg = config_from_preset("nano", n_layer=n_layer, d_model=64, n_head=4, vocab_size=VOCAB, max_seq_len=64,
                             attention="xla", init_std=0.15)
    return build_model(cfg, 0)


ROUND = {
    "fp8": lambda x: kc.dequantize_fp8(*kc.quantize_fp8(x), dtype=x.dtype),
    "bf16": lambda x: x.astype(jnp.bfloat16).astype(x.dtype),
    None: lambda x: x,
}


@functools.lru_cache(maxsize=None)
def _forward(cache=None, n_layer=2):
    """Full forward without a cache; with cache="fp8" ("bf16") every layer's K and V are
    rounded to FP8 per token and head (to bf16) before attention: what a cache of that
    dtype gives."""
    from flashjax.models.attention_ops import xla_attention

    model = _model(n_layer)
    f = ROUND[cache]
    return jax.jit(lambda t: model.forward(t, attend=lambda i, q, k, v, s: (xla_attention(q, f(k), f(v)), s))[0])


def _prompts(n, seed, lo=5, hi=14):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, VOCAB, size=rs.randint(lo, hi)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def engine():
    from flashjax.serving.engine import Engine

    # decode_steps=1: one decode variant to compile (the K-step loop repeats the same decode)
    return Engine(_model(), kv_cache_dtype="fp8", num_blocks=16, max_seqs=4, block_size=4,
                  max_num_batched_tokens=16, prefill_rows=2, max_chunk=8, chunk_buckets=(8,), logprobs_k=4,
                  decode_steps=1)


def _greedy_ref(prompt, n, cache, width=32):
    """Greedy tokens, and the log-probabilities [n, vocab] they were picked from, of the
    cache-free forward with K/V rounded as `cache` stores them (causal: the right padding
    to a fixed width, one compilation, does not change the logits of the real positions)."""
    f = _forward(cache)
    toks, lps = list(prompt), []
    for _ in range(n):
        row = np.zeros((1, width), np.int32)
        row[0, : len(toks)] = toks
        logits = f(jnp.asarray(row))[0, len(toks) - 1]
        lps.append(np.asarray(jax.nn.log_softmax(logits), np.float64))
        toks.append(int(jnp.argmax(logits)))
    return toks[len(prompt):], np.stack(lps)


def _forced_ref(prompt, tokens, cache, width=32):
    """The log-probabilities [len(tokens), vocab] of the cache-free forward (K/V rounded
    as `cache` stores them) at each of `tokens`, given the prompt and the tokens before
    it (teacher forcing: the engine's own continuation, whatever it chose)."""
    f = _forward(cache)
    row = np.zeros((1, width), np.int32)
    seq = list(prompt) + list(tokens)
    row[0, : len(seq)] = seq
    logits = f(jnp.asarray(row))[0, len(prompt) - 1: len(seq) - 1]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)


def test_engine_fp8_greedy_matches_fake_quantized_reference_and_mostly_agrees_with_bf16(engine):
    """The FP8 engine (chunked prefill over several chunks that reads earlier chunks from
    the FP8 pages, dequantized in the gather; decode through the FP8 paged kernel;
    preemption of a full pool) against a cache-free recompute whose K and V were rounded
    to FP8 per token and head, on the engine's tokens: each is the reference's greedy
    choice (or, at most twice, ties it within 1e-3 on a GPU), and log-probabilities
    within 5e-4 (the chosen token's and the top 4 alternatives', every step); on CPU
    the free-running reference gives the very same tokens. Its greedy tokens agree
    with a bf16 cache's on >= 80% of positions (8 prompts x 10 tokens: 64 of 80;
    measured 78 of 80); the bf16 cache's tokens come from the same recompute with
    bf16-rounded K and V, what a bf16 cache stores (the engine equals its recompute, as
    the FP8 half shows), which saves compiling a second engine. Guards so it cannot pass
    by accident: the pages really are FP8, the FP8 log-probabilities do differ from the
    unquantized model's, and the bf16 outputs vary (no echo of the prompt's last token,
    several distinct tokens per row)."""
    from flashjax.serving.engine import RequestParams

    assert engine.pages[0][0].dtype == FP8 and engine.pages[0][2].dtype == jnp.float32
    prompts = _prompts(8, seed=5, lo=6, hi=18)
    outs = engine.generate(prompts, RequestParams(temperature=0, max_tokens=10, logprobs=4))
    t8 = np.array([o.outputs[0].token_ids for o in outs])
    assert t8.shape == (8, 10)
    # The reference on the engine's own tokens: each one is the reference's argmax, or
    # ties it within the log-probability tolerance (a compiled float32 kernel may order
    # a near tie differently from the float32 reference; free-running references would
    # then diverge for the rest of the row); all but a tie must be exact.
    exact_gap, ties = 0.0, 0
    for o, toks, p in zip(outs, t8.tolist(), prompts):
        lps, lps_exact = _forced_ref(p, toks, "fp8"), _forced_ref(p, toks, None)
        for j, (lp, alts) in enumerate(o.outputs[0].logprobs):
            best = lps[j].max()
            assert lps[j, toks[j]] >= best - 1e-3, (j, toks[j], lps[j, toks[j]], best)
            ties += int(lps[j, toks[j]] < best)
            assert len(alts) >= 4
            for tid, got in [(toks[j], lp)] + list(alts):
                assert abs(got - lps[j, tid]) < 5e-4, (j, tid, got, lps[j, tid])
                exact_gap = max(exact_gap, abs(got - lps_exact[j, tid]))
    assert ties <= 2, ties
    if not GPU:  # interpret mode computes what the reference does: the same free-running tokens
        assert t8.tolist() == [_greedy_ref(p, 10, "fp8")[0] for p in prompts]
    assert exact_gap > 1e-3, "the FP8 cache gave the unquantized model's log-probabilities"
    t16 = np.array([_greedy_ref(p, 10, "bf16")[0] for p in prompts])
    agree = float((t8 == t16).mean())
    assert agree >= 0.8, (agree, t8, t16)
    assert np.mean([len(set(r)) for r in t16]) >= 4, t16
    assert np.mean(t16[:, 0] == np.array([pr[-1] for pr in prompts])) <= 0.5, t16  # measured 0.25
    assert engine.stats_counters["preemptions"] > 0
    assert not engine.has_unfinished() and engine.blocks.num_used == 0


def test_engine_fp8_swap_and_copy_move_scales(engine, rng):
    """Swapping blocks out and in, and copying blocks, carry every per-layer array of an
    FP8 cache (pages and scales)."""
    run = engine.runner
    run.pages = tuple(tuple(jax.random.normal(rng(), x.shape).astype(x.dtype) for x in layer)
                      for layer in run.pages)
    before = jax.device_get(run.pages)
    saved = run.swap_out(np.array([3, 5]))
    assert len(saved[0]) == 4
    run.swap_in([7, 9], saved)
    run.copy_blocks([(3, 11)])
    after = jax.device_get(run.pages)
    for lb, la in zip(before, after):
        for xb, xa in zip(lb, la):
            xb, xa = np.asarray(xb, np.float32), np.asarray(xa, np.float32)
            np.testing.assert_array_equal(xa[:, [7, 9]], xb[:, [3, 5]])
            np.testing.assert_array_equal(xa[:, 11], xb[:, 3])
    run.pages = tuple(tuple(jnp.zeros_like(x) for x in layer) for layer in run.pages)


@pytest.mark.parametrize("bad", ["int8", "fp4", 3, jnp.int32])
def test_bad_kv_cache_dtype_is_named(bad):
    from flashjax.serving.engine import Engine

    with pytest.raises(ValueError, match=r"kv_cache_dtype must be 'auto' .*'fp8'.*got"):
        Engine(_model(), num_blocks=4, max_seqs=1, block_size=4, kv_cache_dtype=bad)


def test_generate_takes_kv_cache_dtype():
    """The one-jit loop builds its cache from kv_cache_dtype (a static of its jit) and
    checks the value before compiling anything. (Its prefill and decode are the runner's,
    which the engine test above runs on FP8 pages; a full FP8 generate compiles for ~10 s
    on CPU, so it runs once, in tests/test_benchmarks.py::test_kv_fp8_quick.)"""
    from flashjax.serving.generate import generate, plan_generation

    cfg = _model(1).config
    assert plan_generation(cfg, [[1, 2]], 2, kv_cache_dtype="fp8").kv_dtype == "float8_e4m3fn"
    assert plan_generation(cfg, [[1, 2]], 2).kv_dtype == "float32"  # the model's dtype
    assert plan_generation(cfg, [[1, 2]], 2, kv_cache_dtype="bf16").kv_dtype == "bfloat16"
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        generate(_model(1), [[1, 2]], 6, kv_cache_dtype="e5m2")


def test_cli_kv_cache_dtype_choices():
    import argparse

    from flashjax.serving.cli import add_generate_arguments
    from flashjax.serving.server import add_serve_arguments

    for add, base in ((add_serve_arguments, ["--checkpoint", "x"]), (add_generate_arguments, ["--checkpoint", "x"])):
        p = add(argparse.ArgumentParser(prog="flashjax"))
        assert p.parse_args(base).kv_cache_dtype == "auto"
        assert p.parse_args(base + ["--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"
        with pytest.raises(SystemExit):
            p.parse_args(base + ["--kv-cache-dtype", "int8"])


def test_fp8_pool_is_about_half_of_bf16():
    from flashjax.models.config import config_from_preset
    from flashjax.serving import runner as R

    cfg = config_from_preset("llama-nano")  # head_dim 32
    size = lambda pages: sum(x.size * x.dtype.itemsize for layer in pages for x in layer)
    bf16 = size(R.init_pages(cfg, 8, 16, "bf16"))
    fp8 = size(R.init_pages(cfg, 8, 16, "fp8"))
    hd = R.page_head_dim(cfg.head_dim)
    assert fp8 / bf16 == pytest.approx((hd + 4) / (2 * hd))
    assert math.isclose(bf16 / fp8, 2 * hd / (hd + 4))
