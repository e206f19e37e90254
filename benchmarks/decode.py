"""Decode-attention benchmark: achieved KV bandwidth of flashjax's paged and
contiguous Flash-Decoding kernel vs JAX's bundled Pallas ops and XLA.

    python benchmarks/decode.py            # full GPU run (< 5 min on an H100)
    python benchmarks/decode.py --quick    # tiny sizes, CPU smoke test (interpret mode)
    python benchmarks/decode.py --sweep    # only: time launch parameters of our kernel
                                           # at batch 1, context 32k (--sweep-batch/--sweep-context)
    python benchmarks/decode.py --sweep-fp8  # the same on an FP8 cache, each configuration
                                           # with DecodeConfig.fp8_dot "q" and "f16"

One query token per sequence, all sequences at the full context length;
GQA 32 query heads / 8 KV heads, head_dim 128, bf16, paged block size 16.
Batch in {1, 8, 32, 64, 256} x context in {1k, 4k, 16k, 32k, 128k}; shapes
whose K+V exceed --max-kv-gb (40 GB) are skipped. Bandwidth = bytes of K and V
read (batch * context * kv_heads * head_dim * 2 * itemsize) / time. Time per
call is the slope of wall time over chain length: each peer is compiled as a
chain of n and of 4n dependent calls in one jitted function (n chosen so that
n calls take ~2 ms, at most 16), and time(4n) - time(n) over 3n calls is what
one call costs on the device in a decode loop. The fixed cost of launching an
executable and waiting for it (~0.2 ms on an H100, more than a whole call at
small shapes) cancels; kernel launch gaps, and the one elementwise op that
links the calls, stay in. The wall time per call of the long chain is kept in
the JSON too (`wall_ms`). Caches smaller than 256 MiB are timed over several
copies that the chain cycles through (`kv_copies`), so that every call reads
its KV from HBM rather than from the 50 MB L2 that the previous call filled,
as in a model, where each layer's cache is read once per step. All peers of a
shape are compiled first and then timed in `--rounds` interleaved rounds of
`--reps` runs each; a cell is the median of its per-round slopes (both caches
stay resident when they fit, so the paged-vs-contiguous comparison is
interleaved too). A device copy
(read + write of a 2 GiB buffer) measured in the same run gives the HBM
bandwidth that the "% copy" columns refer to: the faster of XLA's best
elementwise copy and the driver's memcpy (through torch, when installed).

Peers (same process, same inputs; paged peers read the same page pool and
shuffled block tables, contiguous peers the same dense [batch, ctx, kv_heads,
head_dim] cache):
  ours_paged       flashjax.paged_decode_attention (defaults: auto num_splits)
  ours_contiguous  flashjax.decode_attention (same kernel body, dense cache)
  pallas_paged     jax.experimental.pallas.ops.gpu.paged_attention.paged_attention
                   (q pre-scaled by 1/sqrt(head_dim): the op does not scale logits)
  pallas_gqa       jax.experimental.pallas.ops.gpu.decode_attention.gqa
  xla              jnp.einsum over the dense cache (bf16 in, f32 accumulation)
  ours_paged_fp8   flashjax.paged_decode_attention on the same pool stored in FP8
                   (float8_e4m3fn, one float32 scale per token and KV head:
                   flashjax.kv_cache.quantize_fp8 of the bf16 pool)
  ours_contiguous_fp8  flashjax.decode_attention on the dense cache in FP8
                   (both with DecodeConfig.fp8_dot from --fp8-dot: "auto", the default,
                   is "f16" for bf16 q; "q" converts tiles to q's dtype, "f16" to float16)
A peer that fails records an error string in its cell. Every output is
checked against XLA on its first two sequences (max abs error in the JSON;
for the FP8 peers that includes the quantization error, and
`max_abs_err_vs_dequantized` compares with a float32 reference on the
dequantized cache).

Every GB/s and "% copy" is of the *logical* cache: the bytes of K and V in
--dtype (bf16), also for the FP8 peers, which read about half of that
(their cells add `physical_kv_bytes` and `physical_tb_s`: FP8 values plus
scales actually read). So an FP8 cell at twice a bf16 cell's GB/s serves the
same sequences in half the time; "fp8 x" columns are ours_paged / ours_paged_fp8
(and contiguous) time ratios.
Results: benchmarks/results/decode-<device>-<date>.json
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PEERS = {
    "ours_paged": "flashjax.paged_decode_attention (Pallas Triton, Flash-Decoding, paged)",
    "ours_contiguous": "flashjax.decode_attention (same kernel, dense [b, s, h, d] cache)",
    "pallas_paged": "jax.experimental.pallas.ops.gpu.paged_attention.paged_attention (defaults; q pre-scaled)",
    "pallas_gqa": "jax.experimental.pallas.ops.gpu.decode_attention.gqa (defaults)",
    "xla": "jnp.einsum over the dense cache (XLA)",
    "ours_paged_fp8": "flashjax.paged_decode_attention on an FP8 (e4m3) pool with per-token scales "
                      "(GB/s of the logical bf16 cache)",
    "ours_contiguous_fp8": "flashjax.decode_attention on an FP8 (e4m3) dense cache with per-token scales "
                           "(GB/s of the logical bf16 cache)",
}
# Peers by the cache they read: (peers, paged, fp8).
GROUPS = (
    (("ours_paged", "pallas_paged"), True, False),
    (("ours_contiguous", "pallas_gqa", "xla"), False, False),
    (("ours_paged_fp8",), True, True),
    (("ours_contiguous_fp8",), False, True),
)
PAGED_PEERS = GROUPS[0][0]
DENSE_PEERS = GROUPS[1][0]
FP8_PAIRS = (("ours_paged", "ours_paged_fp8"), ("ours_contiguous", "ours_contiguous_fp8"))

BATCHES = (1, 8, 32, 64, 256)
CONTEXTS = (1024, 4096, 16384, 32768, 131072)
HEADLINE = (1, 32768)  # (batch, context)
ROTATE_BYTES = 256 * 2**20  # smaller caches are timed over several copies (kv_copies)
SHAPE = dict(heads=32, kv_heads=8, head_dim=128, block_size=16)
QUICK = dict(batches=(1, 2), contexts=(256, 512), heads=4, kv_heads=2, head_dim=32, block_size=16)

# (num_splits, pages_per_block, num_warps, num_stages); None = our default.
# The contiguous kernel is swept over the num_splits=None subset only
# (block_k = pages_per_block * block_size).
SWEEP = [
    dict(num_splits=s, pages_per_block=p, num_warps=w, num_stages=st)
    for s, p, (w, st) in itertools.product(
        (None, 16, 64, 128), (4, 8), ((4, 3), (4, 4), (8, 3), (8, 4)))
]
# ... and the other way of addressing a paged tile (flashjax.DecodeConfig.paged_gather).
SWEEP += [dict(num_splits=None, pages_per_block=p, num_warps=w, num_stages=st, gather="pages")
          for p, (w, st) in itertools.product((4, 8), ((4, 3), (8, 4)))]
QUICK_SWEEP = [dict(num_splits=s, pages_per_block=p, num_warps=4, num_stages=2)
               for s in (None, 2) for p in (1, 2)] + [
    dict(num_splits=None, pages_per_block=2, num_warps=4, num_stages=2, gather="pages")]
# --sweep-fp8: each configuration with both DecodeConfig.fp8_dot values, back to back,
# plus the bf16 kernel at its defaults on the same cache. So that one run fits ~150 s
# on a GPU (2 x 13 cells of ~3 s: two chains compiled and timed), only the best bf16
# cells of the H100 sweep (benchmarks/results/decode_sweep-H100-2026-11-25.json: 8 pages
# with 8 warps / 4 stages, 16 splits of 8 pages, the default 4 pages with 4 / 3) and
# FP8's own tiles (128 and 256 tokens = 16 and 32 KiB of FP8); the contiguous kernel
# takes the num_splits=None ones.
FP8_DOTS = ("q", "f16")
FP8_SWEEP = [dict(num_splits=s, pages_per_block=p, num_warps=w, num_stages=st)
             for s, p, w, st in ((None, 4, 4, 3), (None, 8, 4, 3), (None, 8, 8, 4), (16, 8, 4, 3),
                                 (None, 16, 4, 3), (None, 16, 8, 3), (None, 16, 8, 4))]
QUICK_FP8_SWEEP = [dict(num_splits=None, pages_per_block=2, num_warps=4, num_stages=2),
                   dict(num_splits=2, pages_per_block=1, num_warps=4, num_stages=2)]


# ---------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------

def make_peer(name: str, *, interpret: bool, **kw):
    """Returns fn(q, kv_inputs..., lengths) -> [batch, heads, head_dim]."""
    import jax.numpy as jnp

    import flashjax.decode as fd

    if name == "ours_paged":
        return lambda q, kp, vp, bt, ln: fd.paged_decode_attention(q, kp, vp, bt, ln, **kw)
    if name == "ours_contiguous":
        return lambda q, k, v, ln: fd.decode_attention(q, k, v, ln, **kw)
    if name == "ours_paged_fp8":
        return lambda q, kp, vp, ks, vs, bt, ln: fd.paged_decode_attention(
            q, kp, vp, bt, ln, k_scales=ks, v_scales=vs, **kw)
    if name == "ours_contiguous_fp8":
        return lambda q, k, v, ks, vs, ln: fd.decode_attention(q, k, v, ln, k_scales=ks, v_scales=vs, **kw)
    if name == "pallas_paged":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import paged_attention as pa
        # The bundled op leaves the 1/sqrt(head_dim) logit scale to the caller; the
        # multiply fuses into the preceding elementwise op of a decode step (and of
        # the timing chain), so it adds no kernel launch.
        return lambda q, kp, vp, bt, ln: pa.paged_attention(
            q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype), kp, vp, bt, ln, interpret=interpret)
    if name == "pallas_gqa":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import decode_attention as da
        return lambda q, k, v, ln: da.gqa(q, k, v, kv_seq_len=ln, interpret=interpret)
    if name == "xla":
        def xla(q, k, v, ln):
            b, h, d = q.shape
            hkv = k.shape[2]
            qg = q.reshape(b, hkv, h // hkv, d)
            s = jnp.einsum("bhgd,bkhd->bhgk", qg, k, preferred_element_type=jnp.float32)
            s = s * (1.0 / math.sqrt(d))
            mask = jnp.arange(k.shape[1])[None, :] < ln[:, None]
            s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
            p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
            p = p / jnp.sum(p, axis=-1, keepdims=True)
            o = jnp.einsum("bhgk,bkhd->bhgd", p.astype(v.dtype), v,
                           preferred_element_type=jnp.float32)
            return o.reshape(b, h, d).astype(q.dtype)
        return xla
    raise ValueError(f"unknown peer {name!r}")


def chained(fn, chain: int, copies: int = 1):
    """`chain` dependent calls of fn in one jitted function: each call's q
    depends (numerically not at all) on the previous output, so XLA can
    neither hoist nor merge them. Arguments are (q, *kv, lengths), or with
    copies > 1 (q, *kv_1, ..., *kv_copies, lengths): call i reads KV copy
    i % copies, so a small cache is not served from L2 by the previous call."""
    import jax
    import jax.numpy as jnp

    def run(q, *rest):
        *kvs, lengths = rest
        per = len(kvs) // copies
        sets = [kvs[i * per:(i + 1) * per] for i in range(copies)]
        out = fn(q, *sets[0], lengths)
        for i in range(1, chain):
            q = q + (out * jnp.asarray(1e-30, out.dtype)).astype(q.dtype)
            out = fn(q, *sets[i % copies], lengths)
        return out

    return jax.jit(run)


def compile_chain(fn, args, chain, copies: int = 1):
    """Compile `chain` dependent calls once and run them once. Returns the
    executable, the first run's output (equal to fn(*args): the perturbation of
    q is far below its precision; for the correctness check, and a warmup) and
    the compile time in seconds."""
    import jax

    t0 = time.perf_counter()
    compiled = chained(fn, chain, copies).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    return compiled, jax.block_until_ready(compiled(*args)), compile_s


def kv_copies(nbytes: int, interpret: bool) -> int:
    """Copies of a small KV cache that the timing chain cycles through, so the
    chain streams ROTATE_BYTES (5x an H100's 50 MB L2) and every call reads
    its cache from HBM, as each layer's cache does in a model's decode step."""
    if interpret or nbytes >= ROTATE_BYTES:
        return 1
    return int(min(64, math.ceil(ROTATE_BYTES / nbytes)))


def timing_plan(nbytes: int, interpret: bool):
    """(n, 4n, copies): the two chain lengths whose slope is the time per call
    (one chain in interpret mode), and the KV copies the chains cycle through."""
    chain = 1 if interpret else pick_chain(nbytes)
    return chain, (chain if interpret else 4 * chain), kv_copies(nbytes, interpret)


def with_copies(q, kv, lengths, copies):
    """Chain arguments (q, *kv, *kv copies, lengths); copies are distinct buffers."""
    return (q, *kv, *[x.copy() for _ in range(copies - 1) for x in kv], lengths)


def compile_pair(fn, args, plan):
    """Both chains of a timing plan compiled; returns ({length: executable}, the
    short chain's first output, its compile time in s)."""
    chain, long_chain, copies = plan
    compiled, out, compile_s = compile_chain(fn, args, chain, copies)
    execs = {chain: compiled}
    if long_chain != chain:
        execs[long_chain] = compile_chain(fn, args, long_chain, copies)[0]
    return execs, out, compile_s


def time_pair(execs, args, plan, *, warmup, reps):
    """(ms per call from the slope, wall ms per call of the long chain)."""
    chain, long_chain, _ = plan
    t = {c: common.time_call(e, args, warmup=warmup, reps=reps)["ms"] for c, e in execs.items()}
    return per_call_ms(t[chain], chain, t[long_chain], long_chain), t[long_chain] / long_chain


def measure(fn, args, plan, *, warmup, reps):
    """compile_pair + time_pair for one configuration (not interleaved)."""
    execs, out, compile_s = compile_pair(fn, args, plan)
    ms, wall_ms = time_pair(execs, args, plan, warmup=max(0, warmup - 1), reps=reps)
    return {"compile_s": round(compile_s, 2), "ms": ms, "wall_ms": wall_ms, "chain": list(plan[:2]),
            "kv_copies": plan[2], "reps": reps}, out


def copy_bandwidth(nbytes: int, *, warmup, reps) -> dict:
    """Read+write bandwidth of a device copy (TB/s): the best of a few elementwise
    forms (XLA's kernels differ by dtype), so the "% copy" columns are not
    flattered by a slow copy."""
    import jax
    import jax.numpy as jnp

    forms = {
        "neg_bf16": (jnp.bfloat16, lambda x: -x),
        "add_f32": (jnp.float32, lambda x: x + 1.0),
        "xor_u32": (jnp.uint32, lambda x: x ^ jnp.uint32(1)),
    }
    best = None
    per_form = {}
    for name, (dt, f) in forms.items():
        x = jnp.ones((nbytes // jnp.dtype(dt).itemsize,), dt)
        timing = common.time_call(jax.jit(f), (x,), warmup=warmup, reps=reps)
        del x
        tb_s = 2 * nbytes / (timing["ms"] * 1e-3) / 1e12
        per_form[name] = round(tb_s, 4)
        if best is None or tb_s > best["tb_s"]:
            best = {"bytes": nbytes, "ms": timing["ms"], "tb_s": tb_s, "form": name}
    out = {**best, "forms": per_form}
    out["reference_tb_s"] = out["tb_s"]  # what "% copy" divides by: the fastest copy measured
    try:  # the driver's device-to-device memcpy, through PyTorch when it is installed
        import torch

        if torch.cuda.is_available():
            a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            b = torch.empty_like(a)
            for _ in range(max(1, warmup)):
                b.copy_(a)
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ms = []
            for _ in range(reps):
                t0.record()
                b.copy_(a)
                t1.record()
                t1.synchronize()
                ms.append(t0.elapsed_time(t1))
            del a, b
            torch.cuda.empty_cache()
            ms = sorted(ms)[len(ms) // 2]
            out["torch_memcpy_tb_s"] = 2 * nbytes / (ms * 1e-3) / 1e12
            out["reference_tb_s"] = max(out["tb_s"], out["torch_memcpy_tb_s"])
    except Exception as e:  # noqa: BLE001 - optional reference
        out["torch_memcpy_error"] = common.describe_error(e)
    return out


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def make_inputs(seed, batch, ctx, heads, kv_heads, head_dim, block_size, dtype, *, paged):
    """q, lengths and either (k_pages, v_pages, block_tables) or dense (k, v).
    The paged pool holds exactly the pages in use, in shuffled order."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(seed)
    kq, kk, kv, kp = jax.random.split(key, 4)
    q = jax.random.normal(kq, (batch, heads, head_dim), dtype)
    lengths = jnp.full((batch,), ctx, jnp.int32)
    if paged:
        pages = batch * (ctx // block_size)
        shape = (kv_heads, pages, block_size, head_dim)
        k_pages = jax.random.normal(kk, shape, dtype)
        v_pages = jax.random.normal(kv, shape, dtype)
        tables = jax.random.permutation(kp, pages).astype(jnp.int32).reshape(batch, -1)
        return q, (k_pages, v_pages, tables), lengths
    shape = (batch, ctx, kv_heads, head_dim)
    return q, (jax.random.normal(kk, shape, dtype), jax.random.normal(kv, shape, dtype)), lengths


def dense_from_paged(k_pages, v_pages, tables):
    import jax.numpy as jnp

    def one(p):  # [hkv, N, bs, (d)] -> [b, ctx, hkv, (d)]
        g = p[:, tables]  # [hkv, b, nblk, bs, (d)]
        hkv, b, nblk, bs = g.shape[:4]
        return jnp.moveaxis(g.reshape(hkv, b, nblk * bs, *g.shape[4:]), 0, 2)

    return one(k_pages), one(v_pages)


def to_fp8(kv, paged):
    """The cache of `make_inputs` in FP8: (k8, v8, k_scales, v_scales[, tables])
    (`flashjax.kv_cache.quantize_fp8`, one float32 scale per token and KV head)."""
    import jax

    from flashjax import kv_cache

    quant = jax.jit(kv_cache.quantize_fp8)
    (k8, ks), (v8, vs) = quant(kv[0]), quant(kv[1])
    return (k8, v8, ks, vs, kv[2]) if paged else (k8, v8, ks, vs)


def fp8_kv_bytes(batch, ctx, kv_heads, head_dim):
    """Bytes an FP8 cache holds for K and V: one byte per value plus a float32 scale
    per token and KV head."""
    return batch * ctx * kv_heads * (head_dim + 4) * 2


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------

def kv_bytes(batch, ctx, kv_heads, head_dim, itemsize):
    return batch * ctx * kv_heads * head_dim * 2 * itemsize


def pick_chain(est_bytes, bw_guess=2.0e12, target_s=2e-3, max_chain=16):
    """Enough chained calls that one timed call lasts ~2 ms."""
    per_call = max(est_bytes / bw_guess, 5e-6)
    return int(max(2, min(max_chain, math.ceil(target_s / per_call))))


def per_call_ms(t_short, n_short, t_long, n_long):
    """Device time of one call from the wall times of a short and a long chain
    (the executable's fixed launch-and-wait cost cancels). Falls back to the
    long chain's wall time per call if timing noise makes the slope not
    positive, and to the single chain when there is only one."""
    if n_long > n_short:
        slope = (t_long - t_short) / (n_long - n_short)
        if slope > 0:
            return slope
    return t_long / n_long


def run_config(cfg, peers, dims, dtype, *, interpret, warmup, reps, copy_tb_s, rounds=3, fp8_dot=None):
    """Time every peer at one (batch, context). All peers are compiled first and
    then timed in `rounds` interleaved rounds (each round times both chains of
    the plan, `reps` runs each; the cell reports the median of the per-round
    per-call slopes), so a slow
    stretch of the GPU is shared by all peers instead of landing on one. All
    caches (paged and dense, bf16 and FP8) stay resident when they fit in 80% of
    the device memory; otherwise each group of peers runs on its own. The FP8
    peers run with DecodeConfig(fp8_dot=fp8_dot) (None: the library's default)."""
    import statistics

    import jax
    import jax.numpy as jnp

    import flashjax.decode as fd

    b, ctx = cfg["batch"], cfg["context"]
    heads, hkv, d, bs = dims["heads"], dims["kv_heads"], dims["head_dim"], dims["block_size"]
    nbytes = kv_bytes(b, ctx, hkv, d, jnp.dtype(dtype).itemsize)  # logical: what GB/s refers to
    fp8_bytes = fp8_kv_bytes(b, ctx, hkv, d)
    plan = timing_plan(nbytes, interpret)
    # FP8 caches cycle through copies by their own (smaller) size, so they too read from HBM
    plan_fp8 = (*plan[:2], kv_copies(fp8_bytes, interpret))
    xla = jax.jit(make_peer("xla", interpret=interpret))
    mem = common.device_memory_bytes()
    groups = [(todo, paged, fp8) for group, paged, fp8 in GROUPS
              for todo in [[p for p in peers if p in group]] if todo]
    total = sum(fp8_bytes if fp8 else nbytes for _, _, fp8 in groups)
    together = interpret or (mem is not None and total <= 0.8 * mem)
    phases = [groups] if together else [[g] for g in groups]
    cells = {}

    def run_phase(phase):  # a function, so the phase's caches are freed when it returns
        ready = []  # (peer, {chain: compiled}, args, timing plan)
        for todo, is_paged, fp8 in phase:
            try:
                q, kv, lengths = make_inputs(0, b, ctx, heads, hkv, d, bs, dtype, paged=is_paged)
                # Reference for the correctness check: XLA on the first <= 2 sequences.
                n = min(b, 2)
                if is_paged:
                    kd, vd = dense_from_paged(kv[0], kv[1], kv[2][:n])
                else:
                    kd, vd = kv[0][:n], kv[1][:n]
                ref = xla(q[:n], kd, vd, lengths[:n]).astype(jnp.float32)
                ref_deq = None
                if fp8:
                    kv = to_fp8(kv, is_paged)  # the bf16 cache is freed here
                    if is_paged:
                        kd, vd = dense_from_paged(kv[0], kv[1], kv[4][:n])
                        ksd, vsd = dense_from_paged(kv[2], kv[3], kv[4][:n])
                    else:
                        kd, vd, ksd, vsd = (x[:n] for x in kv)
                    ref_deq = fd.decode_reference(q[:n], kd, vd, lengths[:n], k_scales=ksd, v_scales=vsd)
                    del ksd, vsd
                del kd, vd
            except Exception as e:  # noqa: BLE001
                for p in todo:
                    cells[p] = {"error": common.describe_error(e)}
                continue
            args = with_copies(q, kv, lengths, (plan_fp8 if fp8 else plan)[2])
            for peer in todo:
                try:
                    kw = {"config": fd.DecodeConfig(fp8_dot=fp8_dot)} if fp8 and fp8_dot else {}
                    execs, out, compile_s = compile_pair(make_peer(peer, interpret=interpret, **kw), args,
                                                         plan_fp8 if fp8 else plan)
                    err = float(jnp.max(jnp.abs(out[:n].astype(jnp.float32) - ref)))
                    cells[peer] = {"compile_s": round(compile_s, 2), "chain": list(plan[:2]),
                                   "reps": reps, "rounds": rounds, "max_abs_err_vs_xla": err}
                    if fp8:
                        cells[peer]["max_abs_err_vs_dequantized"] = float(
                            jnp.max(jnp.abs(out[:n].astype(jnp.float32) - ref_deq)))
                        cells[peer]["physical_kv_bytes"] = fp8_bytes
                        cells[peer]["kv_copies"] = plan_fp8[2]
                    del out
                    for c in execs.values():
                        for _ in range(max(0, warmup - 1)):
                            jax.block_until_ready(c(*args))
                    ready.append((peer, execs, args, plan_fp8 if fp8 else plan))
                except Exception as e:  # noqa: BLE001
                    cells[peer] = {"error": common.describe_error(e)}
                    print(f"  b={b:<4d} ctx={ctx:<6d} {peer:19s} {fmt_cell(cells[peer])}", flush=True)
            del q, kv, lengths, ref, ref_deq, args
        medians = {p: [] for p, *_ in ready}  # per-call ms of each round
        walls = {p: [] for p, *_ in ready}
        for _ in range(rounds):
            for peer, execs, args, peer_plan in ready:
                try:
                    ms, wall_ms = time_pair(execs, args, peer_plan, warmup=0, reps=reps)
                    medians[peer].append(ms)
                    walls[peer].append(wall_ms)
                except Exception as e:  # noqa: BLE001
                    cells[peer] = {"error": common.describe_error(e)}
        for peer, *_ in ready:
            cell = cells[peer]
            if "error" in cell or not medians[peer]:
                continue
            cell["ms"] = statistics.median(medians[peer])
            cell["wall_ms"] = statistics.median(walls[peer])
            cell["round_ms"] = [round(x, 5) for x in medians[peer]]
            cell["tb_s"] = nbytes / (cell["ms"] * 1e-3) / 1e12
            if "physical_kv_bytes" in cell:
                cell["physical_tb_s"] = cell["physical_kv_bytes"] / (cell["ms"] * 1e-3) / 1e12
            if copy_tb_s:
                cell["frac_copy_bw"] = cell["tb_s"] / copy_tb_s
            print(f"  b={b:<4d} ctx={ctx:<6d} {peer:19s} {fmt_cell(cell)}", flush=True)

    for phase in phases:
        run_phase(phase)
    ours = [cells.get(p, {}) for p in ("ours_paged", "ours_contiguous")]
    overhead = None
    if all("ms" in c for c in ours):
        overhead = 100.0 * (ours[0]["ms"] / ours[1]["ms"] - 1.0)
    speedup = {fp8: cells[bf]["ms"] / cells[fp8]["ms"] for bf, fp8 in FP8_PAIRS
               if "ms" in cells.get(bf, {}) and "ms" in cells.get(fp8, {})}
    return {**cfg, "kv_bytes": nbytes, "fp8_kv_bytes": fp8_bytes, "chain": list(plan[:2]),
            "kv_copies": plan[2], "interleaved": bool(together), "peers": cells,
            "paged_overhead_pct": overhead, "fp8_speedup": speedup}


def fmt_cell(cell):
    if "error" in cell:
        return cell["error"][:60]
    if "skipped" in cell:
        return f"skipped ({cell['skipped']})"
    s = f"{cell['ms'] * 1e3:9.1f} us  {cell['tb_s'] * 1e3:7.1f} GB/s"
    if "frac_copy_bw" in cell:
        s += f"  ({100 * cell['frac_copy_bw']:.0f}% copy)"
    if "physical_tb_s" in cell:
        s += f"  [read {cell['physical_tb_s'] * 1e3:.0f} GB/s]"
    if "max_abs_err_vs_xla" in cell:
        s += f"  err {cell['max_abs_err_vs_xla']:.1e}"
    return s


def table(results, peers):
    pairs = [(bf, fp8) for bf, fp8 in FP8_PAIRS if bf in peers and fp8 in peers]
    headers = (["batch", "context", "KV MB"] + [f"{p} GB/s (% copy)" for p in peers] + ["paged overhead"]
               + [f"{fp8.replace('ours_', '')} x" for _, fp8 in pairs])
    rows = []
    for r in results:
        row = [r["batch"], r["context"], f"{r['kv_bytes'] / 1e6:.0f}"]
        for p in peers:
            c = r["peers"].get(p, {})
            if "tb_s" in c:
                frac = f" ({100 * c['frac_copy_bw']:.0f}%)" if "frac_copy_bw" in c else ""
                row.append(f"{c['tb_s'] * 1e3:.0f}{frac}")
            else:
                row.append(c.get("error", c.get("skipped", "-"))[:40])
        ov = r.get("paged_overhead_pct")
        row.append("-" if ov is None else f"{ov:+.1f}%")
        for _, fp8 in pairs:
            x = r.get("fp8_speedup", {}).get(fp8)
            row.append("-" if x is None else f"{x:.2f}")
        rows.append(row)
    return common.markdown_table(headers, rows)


def run_benchmark(args) -> dict:
    import jax.numpy as jnp

    import flashjax.decode as fd
    from flashjax import _backend

    info = common.env_info()
    interpret = not _backend.on_gpu()
    dtype = jnp.dtype(args.dtype)
    dims = dict(QUICK if args.quick else SHAPE)
    batches = args.batches or (QUICK["batches"] if args.quick else BATCHES)
    contexts = args.contexts or (QUICK["contexts"] if args.quick else CONTEXTS)
    peers = args.peers or list(PEERS)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)
    reps = args.reps if args.reps is not None else (1 if args.quick else 7)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    fp8_dot = args.fp8_dot or fd.DecodeConfig().fp8_dot
    print(f"# decode benchmark on {info['device']} ({info['backend']}), jax "
          f"{info['versions']['jax']}, {dtype.name}, heads {dims['heads']}/{dims['kv_heads']}, "
          f"head_dim {dims['head_dim']}, block {dims['block_size']}, FP8 peers with fp8_dot={fp8_dot!r}",
          flush=True)
    copy = None
    if not interpret:
        copy = copy_bandwidth(2 << 30, warmup=2, reps=10)
        print(f"# device copy bandwidth (read+write): {copy['tb_s']:.3f} TB/s (XLA elementwise, best of "
              f"{copy['forms']}); driver memcpy through torch: {copy.get('torch_memcpy_tb_s', 'n/a')}; "
              f"% copy refers to {copy['reference_tb_s']:.3f} TB/s", flush=True)
    start = time.perf_counter()
    results = []
    shapes = list(itertools.product(batches, contexts))
    # The headline shape first, so the time budget never skips it.
    shapes.sort(key=lambda bc: bc != HEADLINE)
    for b, ctx in shapes:
        cfg = dict(batch=b, context=ctx)
        nbytes = kv_bytes(b, ctx, dims["kv_heads"], dims["head_dim"], dtype.itemsize)
        if nbytes > args.max_kv_gb * 1e9:
            results.append({**cfg, "kv_bytes": nbytes, "skipped": f"KV {nbytes / 1e9:.0f} GB > "
                            f"{args.max_kv_gb:.0f} GB", "peers": {}})
            continue
        if time.perf_counter() - start > args.budget:
            results.append({**cfg, "kv_bytes": nbytes, "skipped": "time budget", "peers": {}})
            continue
        results.append(run_config(cfg, peers, dims, dtype, interpret=interpret, warmup=warmup,
                                  reps=reps, copy_tb_s=copy["reference_tb_s"] if copy else None,
                                  rounds=rounds, fp8_dot=fp8_dot))
    results.sort(key=lambda r: (r["batch"], r["context"]))
    measured = [r for r in results if "skipped" not in r]
    md = table(measured, peers)
    print()
    print(md)
    skipped = [f"{r['batch']}x{r['context']} ({r['skipped']})" for r in results if "skipped" in r]
    if skipped:
        print("\nskipped: " + ", ".join(skipped))
    return {
        **info,
        "benchmark": "decode",
        "quick": bool(args.quick),
        "dtype": dtype.name,
        "fp8_dot": fp8_dot,
        "shape": dims,
        "peers_desc": {p: PEERS[p] for p in peers},
        "copy_bandwidth": copy,
        "timing": {"warmup": warmup, "reps": reps, "rounds": rounds,
                   "statistic": "median over interleaved rounds of the per-call slope (time(4n) - time(n)) / 3n of chains of n and 4n calls, each the median of reps runs"},
        "results": results,
        "markdown": md,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }


def _sweep_cell(name, make_args, plan, kw, gather, fp8_dot, *, interpret, warmup, reps, nbytes, copy):
    """Time one sweep configuration; returns its result row (an error string if it failed)."""
    import flashjax.decode as fd

    try:
        args_all = make_args()
        cfg = dict(paged_gather=gather) if fp8_dot is None else dict(paged_gather=gather, fp8_dot=fp8_dot)
        peer = make_peer(name, interpret=interpret, **kw, config=fd.DecodeConfig(**cfg))
        cell, _ = measure(peer, args_all, plan, warmup=warmup, reps=reps)
        del args_all
        cell["tb_s"] = nbytes / (cell["ms"] * 1e-3) / 1e12
        if copy:
            cell["frac_copy_bw"] = cell["tb_s"] / copy["reference_tb_s"]
    except Exception as e:  # noqa: BLE001
        cell = {"error": common.describe_error(e)}
    return cell


def _sweep_key(row):
    return tuple(row.get(k) for k in ("num_splits", "pages_per_block", "block_k", "num_warps", "num_stages",
                                      "gather"))


def fp8_dot_summary(results):
    """From an FP8 sweep's rows: per kernel, the best cell of each fp8_dot, their speed
    ratio (q's ms / f16's ms: > 1 means f16 is faster), each against the bf16 default
    (baseline rows), and per configuration the same q / f16 ratio."""
    ok = [r for r in results if "ms" in r]
    out = {}
    for name in ("ours_paged_fp8", "ours_contiguous_fp8"):
        cells = [r for r in ok if r["peer"] == name]
        if not cells:
            continue
        best = {d: min((r for r in cells if r.get("fp8_dot") == d), key=lambda r: r["ms"], default=None)
                for d in FP8_DOTS}
        base = next((r for r in ok if r.get("baseline") and r["peer"] == name.replace("_fp8", "")), None)
        entry = {"best": {d: r for d, r in best.items() if r is not None}}
        if all(best.values()):
            entry["best_q_over_f16"] = best["q"]["ms"] / best["f16"]["ms"]
            entry["faster"] = "f16" if best["f16"]["ms"] < best["q"]["ms"] else "q"
        if base:
            entry["bf16_default_ms"] = base["ms"]
            entry["speedup_vs_bf16_default"] = {d: base["ms"] / r["ms"] for d, r in best.items() if r}
        pairs = {}
        for r in cells:
            pairs.setdefault(_sweep_key(r), {})[r.get("fp8_dot")] = r["ms"]
        entry["per_config_q_over_f16"] = [
            {**dict(zip(("num_splits", "pages_per_block", "block_k", "num_warps", "num_stages", "gather"), k)),
             "q_over_f16": v["q"] / v["f16"]}
            for k, v in pairs.items() if "q" in v and "f16" in v]
        out[name] = entry
    return out


def run_sweep(args) -> dict:
    import jax.numpy as jnp

    from flashjax import _backend

    info = common.env_info()
    interpret = not _backend.on_gpu()
    dtype = jnp.dtype(args.dtype)
    dims = dict(QUICK if args.quick else SHAPE)
    b = args.sweep_batch or (1 if args.quick else 1)
    ctx = args.sweep_context or (128 if args.quick else 32768)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)
    reps = args.reps if args.reps is not None else (1 if args.quick else 7)
    nbytes = kv_bytes(b, ctx, dims["kv_heads"], dims["head_dim"], dtype.itemsize)
    fp8 = bool(args.sweep_fp8)
    plan_bf16 = plan = timing_plan(nbytes, interpret)
    if fp8:
        plan = (*plan[:2], kv_copies(fp8_kv_bytes(b, ctx, dims["kv_heads"], dims["head_dim"]), interpret))
    copy = None if interpret else copy_bandwidth(2 << 30, warmup=2, reps=10)
    print(f"# decode sweep on {info['device']}: batch {b}, context {ctx}, KV {nbytes / 1e6:.0f} MB"
          + (f" (FP8 cache, fp8_dot {' and '.join(FP8_DOTS)}; GB/s of the logical bf16 bytes)" if fp8 else "")
          + (f", copy {copy['tb_s']:.3f} TB/s (torch memcpy {copy.get('torch_memcpy_tb_s', 'n/a')})"
             if copy else ""), flush=True)
    start = time.perf_counter()
    rows, results = [], []
    if fp8:
        configs = QUICK_FP8_SWEEP if args.quick else FP8_SWEEP
        dots = FP8_DOTS
    else:
        configs = QUICK_SWEEP if args.quick else SWEEP
        dots = (None,)

    def record(name, kw, fp8_dot, cell, baseline=False):
        row = {"peer": name, **kw, **({"fp8_dot": fp8_dot} if fp8_dot else {}),
               **({"baseline": True} if baseline else {}), **cell}
        results.append(row)
        label = kw if fp8_dot is None else {**kw, "fp8_dot": fp8_dot}
        print(f"  {name:16s} {label}{' (bf16 baseline)' if baseline else ''}  {fmt_cell(cell)}", flush=True)
        rows.append([name + (" (baseline)" if baseline else ""),
                     *(str(kw.get(k)) for k in ("num_splits", "pages_per_block", "block_k", "num_warps",
                                                "num_stages", "gather")),
                     *([str(fp8_dot)] if fp8 else []), fmt_cell(cell)])

    for paged in (True, False):
        q, kv, lengths = make_inputs(0, b, ctx, dims["heads"], dims["kv_heads"], dims["head_dim"],
                                     dims["block_size"], dtype, paged=paged)
        if fp8:
            # The bf16 kernel at its defaults on the same (unquantized) cache, so one run
            # gives FP8 / bf16 speed too.
            name = "ours_paged" if paged else "ours_contiguous"
            cell = _sweep_cell(name, lambda: with_copies(q, kv, lengths, plan_bf16[2]), plan_bf16, {}, "rows",
                               None, interpret=interpret, warmup=warmup, reps=reps, nbytes=nbytes, copy=copy)
            record(name, {"gather": "rows"} if paged else {}, None, cell, baseline=True)
            kv = to_fp8(kv, paged)
        seen = set()
        for cfg in configs:
            kw = dict(cfg)
            gather = kw.pop("gather", "rows")
            if not paged and gather != "rows":
                continue
            if not paged:  # contiguous: tile = pages_per_block * block_size tokens
                if kw["num_splits"] is not None and not args.quick:
                    continue
                kw["block_k"] = kw.pop("pages_per_block") * dims["block_size"]
            key = (gather, *sorted(kw.items(), key=lambda x: x[0]))
            if key in seen:
                continue
            seen.add(key)
            name = ("ours_paged" if paged else "ours_contiguous") + ("_fp8" if fp8 else "")
            # Both fp8_dot values of a configuration back to back, so a budget cut or a
            # slow stretch of the GPU hits them alike.
            for fp8_dot in dots:
                if fp8 and time.perf_counter() - start > args.budget:
                    cell = {"skipped": "time budget"}
                else:
                    cell = _sweep_cell(name, lambda: with_copies(q, kv, lengths, plan[2]), plan, kw, gather,
                                       fp8_dot, interpret=interpret, warmup=warmup, reps=reps,
                                       nbytes=nbytes, copy=copy)
                row_kw = {**kw, "gather": gather} if paged else dict(kw)
                record(name, row_kw, fp8_dot, cell)
        del q, kv, lengths
    md = common.markdown_table(["kernel", "num_splits", "pages_per_block", "block_k", "num_warps",
                                "num_stages", "gather", *(["fp8_dot"] if fp8 else []), "result"], rows)
    print()
    print(md)
    ok = [r for r in results if "tb_s" in r and not r.get("baseline")]
    best = {}
    for name in ("ours_paged", "ours_contiguous", "ours_paged_fp8", "ours_contiguous_fp8"):
        cand = [r for r in ok if r["peer"] == name]
        if cand:
            best[name] = max(cand, key=lambda r: r["tb_s"])
            print(f"best {name}: {best[name]}")
    out = {**info, "benchmark": "decode-sweep", "quick": bool(args.quick), "dtype": dtype.name, "fp8": fp8,
           "shape": {**dims, "batch": b, "context": ctx}, "copy_bandwidth": copy,
           "results": results, "best": best, "markdown": md,
           "elapsed_s": round(time.perf_counter() - start, 1)}
    if fp8:
        out["fp8_dots"] = list(FP8_DOTS)
        out["budget_s"] = args.budget
        out["fp8_dot_summary"] = summary = fp8_dot_summary(results)
        for name, e in summary.items():
            line = f"{name}: best " + ", ".join(f"{d} {r['ms'] * 1e3:.1f} us" for d, r in e["best"].items())
            if "best_q_over_f16" in e:
                line += f"; q / f16 time {e['best_q_over_f16']:.2f} (faster: {e['faster']})"
            if "speedup_vs_bf16_default" in e:
                line += "; vs bf16 default " + ", ".join(f"{d} {x:.2f}x" for d, x in
                                                          e["speedup_vs_bf16_default"].items())
            print(line)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test, interpret mode)")
    p.add_argument("--peers", nargs="+", choices=list(PEERS), help="subset of peers (default: all)")
    p.add_argument("--batches", nargs="+", type=int, help="batch sizes (default 1 8 32 64 256)")
    p.add_argument("--contexts", nargs="+", type=int,
                   help="context lengths (default 1024 4096 16384 32768 131072)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-kv-gb", type=float, default=40.0, help="skip shapes with more K+V than this")
    p.add_argument("--warmup", type=int, help="warmup calls (default 2; 0 with --quick)")
    p.add_argument("--reps", type=int, help="timed calls, median reported (default 7; 1 with --quick)")
    p.add_argument("--rounds", type=int,
                   help="interleaved timing rounds over all peers of a shape (default 3; 1 with --quick)")
    p.add_argument("--budget", type=float, default=200.0,
                   help="seconds after which remaining shapes (with --sweep-fp8: sweep cells) are "
                        "skipped (default 200)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/decode-<device>-<date>.json)")
    p.add_argument("--sweep", action="store_true",
                   help="only time our kernel's (num_splits, pages_per_block, num_warps, num_stages)")
    p.add_argument("--sweep-batch", type=int, help="sweep batch (default 1)")
    p.add_argument("--sweep-context", type=int, help="sweep context (default 32768)")
    p.add_argument("--sweep-fp8", action="store_true",
                   help="sweep the kernels on an FP8 (e4m3) cache instead (implies --sweep; GB/s of the "
                        "logical bf16 bytes): each configuration with both DecodeConfig.fp8_dot values, "
                        "beside the bf16 kernel at its defaults")
    p.add_argument("--fp8-dot", choices=("auto", "q", "f16"),
                   help="DecodeConfig.fp8_dot of the FP8 peers of the main grid (default: the library's "
                        "default)")
    args = p.parse_args(argv)
    if args.sweep_fp8:
        args.sweep = True
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    data = run_sweep(args) if args.sweep else run_benchmark(args)
    kind = ("decode-sweep-fp8" if args.sweep_fp8 else "decode-sweep") if args.sweep else "decode"
    path = args.out or common.results_path(kind, data["device"], quick=args.quick)
    common.write_json(data, path)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
