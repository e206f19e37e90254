"""Attention benchmark: flashjax vs. cuDNN, XLA, tokamax and JAX's bundled Pallas ops.

    python benchmarks/attention.py                 # full GPU run (~4 min on an H100)
    python benchmarks/attention.py --quick         # tiny sizes: CPU smoke test
    python benchmarks/attention.py --plot --readme # also a PNG and the README section
    python benchmarks/attention.py --dtype float16 # float16 (the only dtype of JAX's Mosaic GPU op)
    python benchmarks/attention.py --sweep         # only: time flashjax block_sizes candidates
    python benchmarks/attention.py --deterministic # also flashjax_det: the cost of deterministic=True
    python benchmarks/attention.py --gqa 4         # K/V with heads // 4 heads (GQA 4:1)
    python benchmarks/attention.py --seqs 1000 1024 # ragged lengths: seq 1000 / seq 1024 TFLOP/s
    python benchmarks/attention.py --grid issue19 --budget 420  # issue 19's grid, most important first

Measures TFLOP/s of the forward and forward+backward passes, causal and not,
bf16, over seq 512..16384 with batch*seq = 16384 tokens (batch = 16384 // seq;
the headline config batch 4, seq 4096, 16 heads, head_dim 128 is one of them),
head_dim 64 and 128 with heads*head_dim = 2048. All peers run in the same
process on the same inputs. FLOPs: forward 4*b*h*sq*sk*d (x0.5 when causal;
h counts query heads, also under GQA); forward+backward 3.5x forward. Peak
memory: XLA's compiled memory analysis (temp bytes) of each implementation's
forward+backward. A peer that fails records an error string ("OOM",
"unsupported: ...", "no GQA", "tokamax not installed: ...") in its cell and the
run goes on. Each cell also records its compile time (`compile_s`:
`jax.jit(f).lower(...).compile()`, timed apart from the runs); the summary
ends with the worst of them. `--deterministic` adds the peer `flashjax_det`
(`deterministic=True`) and a table of its time over `flashjax`'s per shape.

`--gqa N` gives K/V heads // N heads (grouped-query attention; each result
records `kv_heads`, tables show heads as "16/4"). A seq that is not a multiple
of 128 gets a ragged check when the next multiple of 128 was measured in the
same run: flashjax's TFLOP/s at the ragged length over its TFLOP/s there.

`--grid issue19` is issue 19's grid: head_dim 64/128/256 x causal/full x seq
1024/4096/16384 x MHA/GQA 4:1, plus seq 1000, 4000, 8191 (and 8192, the next
multiple of 8191) at head_dim 128 causal MHA, against flashjax_triton, cuDNN
and tokamax (Mosaic GPU and Triton), ordered most important first so that a
--budget cut drops the least important shapes (the run lists them). Its
summary: the headline beside FlashAttention-3's 600 TFLOP/s, flashjax / best
peer per shape, the ragged check and the worst compile time.

tokamax (`tokamax_mosaic`, `tokamax_triton`) is optional: default peers when
`import tokamax` works, else their cells say "tokamax not installed: ...".
tokamax imports `xprof.cli.tools` at import time (for its own profiling only);
where the xprof wheel is not installed, `python benchmarks/tokamax_stub.py DIR`
writes a stub `xprof` package into DIR (a site directory, or one put on
PYTHONPATH).
Results: benchmarks/results/attention-<device>-<date>.json (+ .png with --plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# tokamax is optional, never a dependency of flashjax. On the GPU machine it is carried as
# wheels; it imports xprof.cli.tools at import time (only for its own profiling), so where
# the 32 MB xprof wheel is not carried, benchmarks/tokamax_stub.py writes a stub for it.
TOKAMAX_NOTE = "optional: carried as wheels on the GPU machine, xprof stubbed by benchmarks/tokamax_stub.py"
PEERS = {
    "flashjax": ("flashjax.flash_attention, implementation='auto' (the Mosaic GPU kernels on Hopper "
                 "where they apply: causal/full, head_dim 64/128/256, bf16/f16, length a multiple of 128; "
                 "else Pallas Triton; interpret mode on CPU; GQA through fewer K/V heads)"),
    "flashjax_triton": "flashjax.flash_attention(implementation='triton'): the Pallas Triton kernels",
    "flashjax_det": ("flashjax.flash_attention(deterministic=True), implementation='auto': the "
                     "fixed-order backward (on Hopper the Mosaic forward with the Triton backward)"),
    "cudnn": 'jax.nn.dot_product_attention(implementation="cudnn")',
    "pallas_mha": "jax.experimental.pallas.ops.gpu.attention.mha (JAX's bundled Pallas op, default blocks)",
    "pallas_mgpu": ("jax.experimental.pallas.ops.gpu.attention_mgpu.attention (JAX's bundled Mosaic GPU "
                    "FlashAttention-3 op; Hopper, float16 only, no causal backward; q pre-multiplied by "
                    "sm_scale since the op has no scale; blocks 64x128, 2 stages, backward 64x64)"),
    "xla": 'jax.nn.dot_product_attention(implementation="xla")',
    "tokamax_mosaic": ('tokamax.dot_product_attention(implementation="mosaic") (tokamax 0.0.17\'s Mosaic GPU '
                       "kernels, default config: no autotuning; GQA through fewer K/V heads; " + TOKAMAX_NOTE + ")"),
    "tokamax_triton": ('tokamax.dot_product_attention(implementation="triton") (its Pallas Triton kernels, '
                       "default config; " + TOKAMAX_NOTE + ")"),
}
TOKAMAX_PEERS = ("tokamax_mosaic", "tokamax_triton")
# Run unless --peers names others; flashjax_det joins with --deterministic, the tokamax
# peers when tokamax imports (see default_peers()).
DEFAULT_PEERS = tuple(p for p in PEERS if p != "flashjax_det" and p not in TOKAMAX_PEERS)
# JAX's bundled ops take as many K/V heads as q heads; under GQA their cells say so
# rather than measure a repeated K/V.
NO_GQA_PEERS = ("pallas_mha", "pallas_mgpu")
MODES = ("fwd", "fwd_bwd")
MODE_LABEL = {"fwd": "forward", "fwd_bwd": "forward+backward"}
FWD_BWD_FACTOR = 3.5
# Calls shorter than this are timed several back to back per sample (common.time_call).
MIN_SAMPLE_S = 0.005

FLOPS_NOTE = {
    "fwd": "4 * batch * heads * q_len * kv_len * head_dim, times 0.5 when causal",
    "fwd_bwd": f"{FWD_BWD_FACTOR} x forward",
}

TOKENS = 16384
SEQS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (128, 64)
MODEL_WIDTH = 2048  # heads * head_dim
HEADLINE = dict(batch=4, seq=4096, heads=16, head_dim=128)

QUICK = dict(tokens=256, seqs=(128, 256), head_dims=(64,), width=128, headline=dict(batch=1, seq=256, heads=2, head_dim=64))

# Issue 19's grid (--grid issue19): at heads*head_dim = MODEL_WIDTH and TOKENS per batch,
# bf16; GQA 4:1 = 4 query heads per K/V head. The ragged seqs run at head_dim 128 causal
# MHA beside the next multiple of 128 (ragged_check() divides the two).
ISSUE19 = dict(head_dims=(128, 64, 256), seqs=(4096, 16384, 1024), gqa=(1, 4),
               ragged_seqs=(4000, 1000, 8191), ragged=dict(head_dim=128, causal=True, gqa=1))
# The headline: FlashAttention-3's figure is at seq 16k (head_dim 128, no mask): batch 1, 16 heads.
ISSUE19_HEADLINE = dict(head_dim=128, causal=False, seq=16384, gqa=1)
ISSUE19_PEERS = ("flashjax", "flashjax_triton", "cudnn", "tokamax_mosaic", "tokamax_triton")
GRIDS = ("issue19",)
ALIGN = 128  # a seq that is not a multiple of this is "ragged"
# Issue 19's targets, printed beside the numbers: FlashAttention-3's forward at head_dim
# 128 without a mask (bf16, H100; its paper); ragged TFLOP/s within 10% of the next
# multiple of 128; no compile above 60 s.
FA3_FWD_TFLOPS = 600.0
RAGGED_MIN_RATIO = 0.9
COMPILE_MAX_S = 60.0
# "flashjax / best peer" divides by the best of these (that measured the cell).
BEST_OF = ("cudnn", "tokamax_mosaic", "tokamax_triton")

# Candidate flashjax.BlockSizes overrides for --sweep (<= 12). Each is applied as
# dataclasses.replace(flashjax.BlockSizes(), **cfg), so unknown fields fail loudly.
SWEEP_CONFIGS = [
    {},
    dict(block_q=64, block_k=64, num_warps=4, num_stages=2),
    dict(block_q=64, block_k=128, num_warps=4, num_stages=2),
    dict(block_q=128, block_k=64, num_warps=4, num_stages=2),
    dict(block_q=128, block_k=64, num_warps=4, num_stages=3),
    dict(block_q=128, block_k=64, num_warps=8, num_stages=3),
    dict(block_q=128, block_k=128, num_warps=8, num_stages=2),
    dict(block_q=128, block_k=128, num_warps=8, num_stages=3),
    dict(block_q_bwd=64, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=2),
    dict(block_q_bwd=64, block_k_bwd=128, num_warps_bwd=4, num_stages_bwd=2),
    dict(block_q_bwd=128, block_k_bwd=64, num_warps_bwd=8, num_stages_bwd=2),
    dict(block_q_bwd=128, block_k_bwd=128, num_warps_bwd=8, num_stages_bwd=2),
]


# ---------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------

def _bundled_op(module: str):
    """One of JAX's bundled Pallas GPU op modules (jax.experimental.pallas.ops.gpu.<module>)."""
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(f"jax.experimental.pallas.ops.gpu.{module}")


# The Mosaic GPU op has no default tiles. 64x128 with 2 KV stages was the fastest of
# five configs (64x64/64x128/128x64, 2-4 stages) in its causal forward at head_dim 64
# and 128 on an H100 (2026-11-26); its backward (non-causal only) takes 64x64 tiles.
MGPU_TILES = dict(block_q=64, block_kv=128, max_concurrent_steps=2,
                  block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)


class PeerUnavailable(Exception):
    """A peer that cannot run a cell; its message is the cell's error as it stands
    ("no GQA: ...", "tokamax not installed: ...")."""


def tokamax_module():
    """`import tokamax`, or PeerUnavailable saying why it failed (the run goes on)."""
    try:
        import tokamax
    except ImportError as exc:
        hint = (" (tokamax imports xprof.cli.tools: benchmarks/tokamax_stub.py writes a stub)"
                if "xprof" in str(exc) else "")
        raise PeerUnavailable(f"tokamax not installed: {type(exc).__name__}: {exc}{hint}"[:200]) from exc
    except Exception as exc:  # noqa: BLE001 - e.g. a tokamax built for another jax
        raise PeerUnavailable(f"tokamax import failed: {type(exc).__name__}: {exc}"[:200]) from exc
    return tokamax


def tokamax_version() -> str | None:
    """The installed tokamax's version (None when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("tokamax")
    except metadata.PackageNotFoundError:
        return None


def window_sides(window: int | None, causal: bool) -> tuple[int, int] | None:
    """--window W as (left, right) key offsets: W keys to the left, and W to the right
    unless causal (flashjax's `window=` and jax.nn's `local_window_size` mean the same)."""
    return None if window is None else (int(window), 0 if causal else int(window))


def make_attention(peer: str, *, causal: bool, sm_scale: float, block_sizes=None, gqa: bool = False,
                   window: int | None = None, softcap: float | None = None):
    """(q, k, v) -> o for one peer; q is [batch, seq, heads, head_dim], k/v the same with
    kv_heads heads (`gqa`: fewer than q's); `window` (--window) and `softcap` (logit
    soft-capping) as flashjax.flash_attention takes them. Raises PeerUnavailable for a
    peer that cannot run here (no GQA, no window or soft-cap, tokamax missing)."""
    import jax

    if gqa and peer in NO_GQA_PEERS:
        raise PeerUnavailable("no GQA: JAX's bundled op takes as many K/V heads as q heads "
                              "(K/V are not repeated for it)")
    sides = window_sides(window, causal)
    if (window is not None or softcap is not None) and peer in ("pallas_mha", "pallas_mgpu"):
        raise PeerUnavailable("no window / soft-cap: JAX's bundled op has neither")
    if peer in TOKAMAX_PEERS:
        tokamax = tokamax_module()
        impl = peer.removeprefix("tokamax_")
        return lambda q, k, v: tokamax.dot_product_attention(
            q, k, v, scale=sm_scale, is_causal=causal, implementation=impl, local_window_size=sides,
            logits_soft_cap=softcap)
    if peer in ("flashjax", "flashjax_triton", "flashjax_det"):
        import flashjax

        extra = {} if block_sizes is None else {"block_sizes": block_sizes}
        if peer == "flashjax_triton":
            extra["implementation"] = "triton"
        if peer == "flashjax_det":
            extra["deterministic"] = True
        if sides is not None:
            extra["window"] = sides
        if softcap is not None:
            extra["softcap"] = softcap
        return lambda q, k, v: flashjax.flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, **extra)
    if peer in ("cudnn", "xla"):
        if softcap is not None:
            raise PeerUnavailable("no soft-cap: jax.nn.dot_product_attention has no logit soft-capping")
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=sm_scale, is_causal=causal, implementation=peer, local_window_size=sides)
    if peer == "pallas_mha":
        mha = _bundled_op("attention").mha
        interpret = jax.default_backend() != "gpu"
        return lambda q, k, v: mha(q, k, v, None, sm_scale=sm_scale, causal=causal, interpret=interpret)
    if peer == "pallas_mgpu":
        if jax.default_backend() != "gpu":
            raise NotImplementedError("needs an NVIDIA Hopper GPU (Mosaic GPU has no interpret mode)")
        cc = str(getattr(jax.devices()[0], "compute_capability", ""))
        if not cc.startswith("9."):
            raise NotImplementedError(f"needs a Hopper GPU (sm_90, wgmma); this one is sm_{cc or '?'}")
        am = _bundled_op("attention_mgpu")
        config = am.TuningConfig(causal=causal, **MGPU_TILES)

        def mgpu(q, k, v):
            if q.dtype != jax.numpy.float16:
                raise NotImplementedError(f"float16 only (its shared-memory tiles are float16), got {q.dtype}")
            return am.attention((q * sm_scale).astype(q.dtype), k, v, config)

        return mgpu
    raise ValueError(f"unknown peer {peer!r}")


def build(attn, mode: str):
    import jax

    if mode == "fwd":
        return attn

    def fwd_bwd(q, k, v, do):
        _, vjp = jax.vjp(attn, q, k, v)
        return vjp(do)

    return fwd_bwd


def forward_flops(batch, seq, heads, head_dim, causal, window: int | None = None) -> float:
    """Forward FLOPs: 4 * head_dim per visible (query, key) pair. Causal counts seq^2 / 2
    pairs (the usual convention); with --window W, the pairs the window leaves visible."""
    if window is None or window >= seq - 1:
        return 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    w = int(window)
    left = (w + 1) * seq - w * (w + 1) // 2  # pairs (i, j) with i - w <= j <= i
    pairs = left if causal else 2 * left - seq  # and the mirror image, the diagonal once
    return 4.0 * batch * heads * pairs * head_dim


def make_inputs(key, batch, seq, heads, head_dim, dtype, kv_heads=None):
    """q, k, v, dO: q and dO with `heads` heads, k and v with `kv_heads` (default: heads)."""
    import jax

    kq, kk, kv, kd = jax.random.split(key, 4)
    q_shape = (batch, seq, heads, head_dim)
    kv_shape = (batch, seq, kv_heads or heads, head_dim)
    return tuple(jax.random.normal(k, shape, dtype)
                 for k, shape in ((kq, q_shape), (kk, kv_shape), (kv, kv_shape), (kd, q_shape)))


def measure(attn, mode, inputs, *, flops, warmup, reps, mem_limit):
    """Compile once (AOT), read its memory analysis, time it. Returns (cell, output)."""
    import jax

    args = inputs[:3] if mode == "fwd" else inputs
    t0 = time.perf_counter()
    compiled = jax.jit(build(attn, mode)).lower(*args).compile()
    cell = {"compile_s": round(time.perf_counter() - t0, 2)}
    mem = common.compiled_memory(compiled)
    if mem:
        cell["memory"] = mem
        need = mem.get("temp_bytes", 0) + mem.get("argument_bytes", 0) + mem.get("output_bytes", 0)
        if mem_limit and need > mem_limit:
            return {**cell, "error": f"OOM (needs {need / 2**30:.1f} GiB)"}, None
    timing = common.time_call(compiled, args, warmup=warmup, reps=reps, min_sample_s=MIN_SAMPLE_S)
    out = compiled(*args) if mode == "fwd" else None
    tflops = (flops if mode == "fwd" else FWD_BWD_FACTOR * flops) / (timing["ms"] * 1e-3) / 1e12
    return {**cell, **timing, "tflops": tflops}, out


# ---------------------------------------------------------------------------
# Main benchmark
# ---------------------------------------------------------------------------

def configs(args):
    """The shapes to measure, in order: dicts of batch, seq, heads, kv_heads, head_dim,
    causal and headline (measured whatever the budget)."""
    if getattr(args, "grid", None) == "issue19":
        return issue19_configs(args)
    if args.quick:
        seqs, head_dims, tokens, width, headline = (QUICK["seqs"], QUICK["head_dims"], QUICK["tokens"],
                                                    QUICK["width"], QUICK["headline"])
    else:
        seqs, head_dims, tokens, width, headline = SEQS, HEAD_DIMS, TOKENS, MODEL_WIDTH, HEADLINE
    seqs = args.seqs or seqs
    head_dims = args.head_dims or head_dims
    gqa = getattr(args, "gqa", 1)
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    out = []
    for d in head_dims:
        heads = max(1, width // d)
        if gqa < 1 or heads % gqa:
            raise SystemExit(f"--gqa {gqa}: head_dim {d} has {heads} heads, not a multiple of {gqa}")
        for causal in causals:
            for s in seqs:
                cfg = _shape(tokens, s, heads, heads // gqa, d, causal)
                cfg["headline"] = all(cfg[k] == v for k, v in headline.items())
                out.append(cfg)
    # Headline configs first, so that they are measured whatever the budget.
    return sorted(out, key=lambda c: not c["headline"])


def _shape(tokens, seq, heads, kv_heads, head_dim, causal) -> dict:
    return dict(batch=max(1, tokens // seq), seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                causal=causal)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def issue19_configs(args) -> list[dict]:
    """Issue 19's grid (ISSUE19), most important first: seq 4096 MHA at each head_dim
    (the headline, head_dim 128 full, first), seq 4096 GQA 4:1, the ragged seqs each
    beside its next multiple of 128, then seq 16384 and 1024. --seqs, --head-dims and
    --causal keep only the shapes they name (to split the grid over several runs)."""
    if getattr(args, "gqa", 1) != 1:
        raise SystemExit("--grid issue19 measures MHA and GQA 4:1 itself; --gqa is for the default grid")
    g = ISSUE19

    def shape(d, s, causal, gqa):
        heads = MODEL_WIDTH // d
        return _shape(TOKENS, s, heads, heads // gqa, d, causal)

    first, *rest = g["seqs"]
    h = ISSUE19_HEADLINE
    order = [shape(h["head_dim"], h["seq"], h["causal"], h["gqa"])]  # the headline, then the rest
    order += [shape(d, first, causal, gqa) for gqa in g["gqa"] for d in g["head_dims"] for causal in (False, True)]
    r = g["ragged"]
    for s in g["ragged_seqs"]:
        order += [shape(r["head_dim"], s, r["causal"], r["gqa"]),
                  shape(r["head_dim"], _round_up(s, ALIGN), r["causal"], r["gqa"])]
    order += [shape(d, s, causal, gqa) for s in rest for gqa in g["gqa"] for d in g["head_dims"]
              for causal in (False, True)]
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    out, seen = [], set()
    for cfg in order:
        key = tuple(cfg.values())
        if (key in seen or cfg["causal"] not in causals or (args.seqs and cfg["seq"] not in args.seqs)
                or (args.head_dims and cfg["head_dim"] not in args.head_dims)):
            continue
        seen.add(key)
        h = ISSUE19_HEADLINE
        cfg["headline"] = (cfg["head_dim"] == h["head_dim"] and cfg["causal"] == h["causal"]
                           and cfg["seq"] == h["seq"] and cfg["heads"] == cfg["kv_heads"] * h["gqa"])
        out.append(cfg)
    if not out:
        raise SystemExit("--grid issue19: --seqs/--head-dims/--causal leave no shape")
    return out


def run_benchmark(args) -> tuple[dict, str]:
    """Runs every shape x peer x mode; returns (results, JSON path). The JSON is
    rewritten after each shape (with "partial": true) so a crash loses little."""
    import jax
    import jax.numpy as jnp

    import flashjax

    info = common.env_info()
    dtype = jnp.dtype(args.dtype)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    reps = args.reps if args.reps is not None else (2 if args.quick else 10)
    peers = selected_peers(args)
    if any(p in TOKAMAX_PEERS for p in peers):
        info["versions"]["tokamax"] = tokamax_version()
    mem_limit = info["device_memory_bytes"]
    cfgs = configs(args)
    path = args.out or common.results_path(results_kind(dtype.name), info["device"], quick=args.quick)
    print(f"# attention benchmark on {info['device']} ({info['backend']}), jax {info['versions']['jax']}, "
          f"{dtype.name}, {len(cfgs)} shapes x {len(peers)} peers x {len(MODES)} modes, "
          f"median of {reps} after {warmup} warmup; budget {args.budget:.0f} s"
          + (f"; grid {args.grid}" if args.grid else ""), flush=True)

    results = []
    grid = args.grid is not None
    data = {
        "benchmark": "attention",
        **info,
        "quick": bool(args.quick),
        "dtype": dtype.name,
        "grid": args.grid,
        "gqa": None if grid else args.gqa,
        "tokens_per_batch": (QUICK["tokens"] if args.quick and not grid else TOKENS),
        "headline": ISSUE19_HEADLINE if grid else (QUICK["headline"] if args.quick else HEADLINE),
        "flops": FLOPS_NOTE if getattr(args, "window", None) is None else {
            **FLOPS_NOTE, "fwd": "4 * batch * heads * head_dim * (query, key) pairs inside the window"},
        "window": getattr(args, "window", None),
        "softcap": getattr(args, "softcap", None),
        "timing": {"warmup": warmup, "reps": reps, "statistic": "median wall time, jax.block_until_ready",
                   "short_calls": f"calls under {MIN_SAMPLE_S * 1e3:g} ms: several back to back per sample "
                                  "(calls_per_sample), time divided",
                   "compile": "jax.jit(f).lower(...).compile(), timed separately"},
        "memory": "XLA compiled memory_analysis(): temp bytes of each implementation's jitted function",
        "peers": {p: PEERS[p] for p in peers},
        "budget_s": args.budget,
        "partial": True,
        "results": results,
    }
    oom_at = {}  # (peer, mode, head_dim, kv group, causal) -> seq of the first OOM
    start = time.perf_counter()
    total = len(cfgs) * len(peers)
    n = 0
    key = jax.random.key(0)
    ref_fn = jax.jit(lambda q, k, v, causal: flashjax.attention_reference(
        q, k, v, causal=causal, window=window_sides(getattr(args, "window", None), causal),
        softcap=getattr(args, "softcap", None)),
        static_argnums=3)
    for cfg in cfgs:
        b, s, h, kv, d, causal = (cfg[k] for k in ("batch", "seq", "heads", "kv_heads", "head_dim", "causal"))
        if time.perf_counter() - start > args.budget and not cfg["headline"]:
            # Past the budget: the whole shape is skipped, without making its inputs.
            for peer in peers:
                results.append({**cfg, "peer": peer, "dtype": dtype.name,
                                **{mode: {"error": SKIPPED} for mode in MODES}})
            n += len(peers)
            print(f"[{n:3d}/{total}] {_shape_label(cfg)} skipped: time budget", flush=True)
            continue
        sm_scale = 1.0 / math.sqrt(d)
        flops = forward_flops(b, s, h, d, causal, getattr(args, "window", None))
        inputs = make_inputs(key, b, s, h, d, dtype, kv_heads=kv)
        reference = None
        if cfg["headline"]:
            try:
                reference = ref_fn(*inputs[:3], causal)
            except Exception as exc:  # noqa: BLE001
                print(f"  (reference failed: {common.describe_error(exc)})")
        for peer in peers:
            n += 1
            entry = {**cfg, "peer": peer, "dtype": dtype.name, "forward_flops": flops}
            elapsed = time.perf_counter() - start
            try:
                attn = make_attention(peer, causal=causal, sm_scale=sm_scale, gqa=kv != h,
                                      window=getattr(args, "window", None), softcap=getattr(args, "softcap", None))
            except PeerUnavailable as exc:  # no GQA, tokamax missing: the message as it stands
                attn, load_error = None, str(exc)
            except Exception as exc:  # noqa: BLE001 - e.g. an import that fails
                attn, load_error = None, common.describe_error(exc)
            for mode in MODES:
                skey = (peer, mode, d, h // kv, causal)
                if elapsed > args.budget and not cfg["headline"]:
                    entry[mode] = {"error": SKIPPED}
                elif attn is None:
                    entry[mode] = {"error": load_error}
                elif skey in oom_at and s > oom_at[skey]:
                    entry[mode] = {"error": f"OOM (skipped: OOM at seq {oom_at[skey]})"}
                else:
                    try:
                        entry[mode], out = measure(attn, mode, inputs, flops=flops, warmup=warmup,
                                                   reps=reps, mem_limit=mem_limit)
                        if out is not None and reference is not None:
                            entry["max_abs_err_vs_reference"] = float(
                                jnp.max(jnp.abs(out.astype(jnp.float32) - reference.astype(jnp.float32))))
                        del out
                    except Exception as exc:  # noqa: BLE001 - a failing peer is a result
                        entry[mode] = {"error": common.describe_error(exc)}
                    if entry[mode].get("error", "").startswith("OOM"):
                        oom_at.setdefault(skey, s)
            results.append(entry)
            print(f"[{n:3d}/{total}] {_shape_label(entry)} {peer:<10} "
                  + " | ".join(f"{MODE_LABEL[m]} {_cell(entry[m], verbose=True)}" for m in MODES)
                  + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        del inputs, reference
        data["wall_s"] = round(time.perf_counter() - start, 1)
        data.update(summaries(data))
        common.write_json(data, path)

    data["partial"] = False
    data["wall_s"] = round(time.perf_counter() - start, 1)
    if "flashjax_det" in peers:
        data["deterministic_cost"] = deterministic_cost(data)
    data.update(summaries(data))
    return data, str(common.write_json(data, path))


SKIPPED = "skipped: time budget"


def selected_peers(args) -> list[str]:
    """--peers (default: ISSUE19_PEERS with --grid issue19, else default_peers()), plus
    flashjax and flashjax_det with --deterministic."""
    if args.peers:
        peers = list(args.peers)
    elif getattr(args, "grid", None) == "issue19":
        peers = list(ISSUE19_PEERS)  # tokamax cells say so when it does not import
    else:
        peers = default_peers()
    if getattr(args, "deterministic", False):
        peers += [p for p in ("flashjax", "flashjax_det") if p not in peers]
    return peers


def default_peers() -> list[str]:
    """DEFAULT_PEERS, plus the tokamax peers when `import tokamax` works."""
    try:
        tokamax_module()
    except PeerUnavailable:
        return list(DEFAULT_PEERS)
    return [*DEFAULT_PEERS, *TOKAMAX_PEERS]


SHAPE_FIELDS = ("head_dim", "causal", "seq", "batch", "heads", "kv_heads")


def shape_key(e: dict) -> tuple:
    """(head_dim, causal, seq, batch, heads, kv_heads) of a result; kv_heads = heads in
    results written before GQA runs."""
    return (*(e[k] for k in SHAPE_FIELDS[:5]), e.get("kv_heads", e["heads"]))


def by_shape(data: dict) -> dict[tuple, dict]:
    """{shape_key: {peer: result}}, in table order: head_dim, mask, seq, then MHA before GQA."""
    out: dict[tuple, dict] = {}
    for e in data["results"]:
        out.setdefault(shape_key(e), {})[e["peer"]] = e
    return dict(sorted(out.items(), key=lambda kv: (*kv[0][:5], -kv[0][5])))


def _shape_row(shape: tuple) -> dict:
    return dict(zip(SHAPE_FIELDS, shape))


def deterministic_cost(data: dict) -> list[dict]:
    """Per shape and mode: flashjax_det's time over flashjax's (1.0: free)."""
    rows = []
    for shape, peers in by_shape(data).items():
        base, det = peers.get("flashjax"), peers.get("flashjax_det")
        if not base or not det:
            continue
        row = _shape_row(shape)
        for mode in MODES:
            a, b = base.get(mode, {}), det.get(mode, {})
            if "ms" in a and "ms" in b:
                row[f"{mode}_ratio"] = round(b["ms"] / a["ms"], 3)
        rows.append(row)
    return rows


def ragged_check(data: dict, peer: str = "flashjax") -> list[dict]:
    """Per shape whose seq is not a multiple of ALIGN (128) and whose next multiple was
    measured in the same run (same head_dim, mask and heads): `peer`'s TFLOP/s at the
    ragged seq over its TFLOP/s at that multiple, per mode (`{mode}_ratio`; issue 19's
    target: >= RAGGED_MIN_RATIO). Both count only the FLOPs of their own lengths."""
    cells = {}
    for e in data["results"]:
        if e["peer"] == peer:
            d, causal, seq, _, h, kv = shape_key(e)
            cells[(d, causal, h, kv, seq)] = e
    rows = []
    for (d, causal, h, kv, seq), e in sorted(cells.items()):
        aligned = cells.get((d, causal, h, kv, _round_up(seq, ALIGN)))
        if seq % ALIGN == 0 or aligned is None:
            continue
        row = dict(peer=peer, head_dim=d, causal=causal, heads=h, kv_heads=kv, seq=seq, batch=e["batch"],
                   aligned_seq=aligned["seq"], aligned_batch=aligned["batch"])
        for mode in MODES:
            a, b = e.get(mode, {}), aligned.get(mode, {})
            if "tflops" in a and "tflops" in b:
                row[f"{mode}_ratio"] = round(a["tflops"] / b["tflops"], 3)
        rows.append(row)
    return rows


def versus_best(data: dict, ours: str = "flashjax", others=BEST_OF) -> list[dict]:
    """Per shape and mode: `ours` TFLOP/s over the best TFLOP/s of `others` that measured
    that cell (`{mode}_ratio`, > 1: ours is faster) and which peer that was (`{mode}_best`).
    Shapes where `ours` or all of `others` have no number are left out."""
    rows = []
    for shape, peers in by_shape(data).items():
        if ours not in peers or not any(p in peers for p in others):
            continue
        row = _shape_row(shape)
        for mode in MODES:
            theirs = [(peers[p][mode]["tflops"], p) for p in others if "tflops" in peers.get(p, {}).get(mode, {})]
            mine = peers[ours].get(mode, {}).get("tflops")
            if theirs and mine:
                best, who = max(theirs)
                row[f"{mode}_ratio"] = round(mine / best, 3)
                row[f"{mode}_best"] = who
        if any(f"{mode}_ratio" in row for mode in MODES):
            rows.append(row)
    return rows


def worst_compile(data: dict) -> dict | None:
    """The longest compile_s of any cell (peer, mode and shape), and how many cells took
    longer than COMPILE_MAX_S (issue 19's target: none)."""
    cells = [(e[m]["compile_s"], e, m) for e in data["results"] for m in MODES if "compile_s" in e.get(m, {})]
    if not cells:
        return None
    secs, e, mode = max(cells, key=lambda c: c[0])
    return {"compile_s": secs, "peer": e["peer"], "mode": mode, **_shape_row(shape_key(e)),
            "over_target": sum(c[0] > COMPILE_MAX_S for c in cells), "target_s": COMPILE_MAX_S}


def skipped_shapes(data: dict) -> list[dict]:
    """Shapes with cells the time budget skipped: the shape and the peers skipped
    ("all" when every cell of the shape was)."""
    rows = []
    for shape, peers in by_shape(data).items():
        cut = [p for p, e in peers.items() if any(e.get(m, {}).get("error") == SKIPPED for m in MODES)]
        if cut:
            rows.append({**_shape_row(shape), "peers": "all" if len(cut) == len(peers) else cut})
    return rows


def summaries(data: dict) -> dict:
    """The derived tables written into the JSON beside the results."""
    return {"versus_best_peer": versus_best(data), "ragged_check": ragged_check(data),
            "worst_compile": worst_compile(data), "skipped_shapes": skipped_shapes(data)}


def _heads_label(e: dict) -> str:
    """'16' for MHA, '16/4' for 16 query heads over 4 K/V heads."""
    kv = e.get("kv_heads", e["heads"])
    return str(e["heads"]) if kv == e["heads"] else f"{e['heads']}/{kv}"


def _shape_label(e) -> str:
    return (f"d={e['head_dim']:<3} {'causal' if e['causal'] else 'full  '} seq={e['seq']:<5} b={e['batch']:<2} "
            f"h={_heads_label(e):<5}")


def _cell(cell: dict | None, *, verbose: bool = False) -> str:
    if not cell:
        return "-"
    if "error" in cell:
        return cell["error"] if verbose else _short_error(cell["error"])
    x = cell["tflops"]
    text = f"{x:.1f}" if x >= 10 else f"{x:.3g}"
    if verbose:
        text = f"{cell['ms']:.3f} ms {text} TFLOP/s"
    return text


def _short_error(err: str) -> str:
    if err.startswith("OOM"):
        return "OOM"
    for label in ("no GQA", "tokamax not installed", "tokamax import failed", "skipped"):
        if err.startswith(label):
            return label
    return err if len(err) <= 40 else err[:39] + "…"


def _mib(cell: dict | None) -> str:
    if not cell:
        return "-"
    mem = cell.get("memory")
    if mem and "temp_bytes" in mem:
        mib = mem["temp_bytes"] / 2**20
        return f"{mib:,.0f}" if mib >= 10 else f"{mib:.2g}"
    return _short_error(cell["error"]) if "error" in cell else "-"


def tables(data: dict) -> str:
    """Markdown: headline lines (the FlashAttention-3 target first where the headline is
    head_dim 128 without a mask), flashjax / best peer, the ragged check, TFLOP/s (fwd,
    fwd+bwd), fwd+bwd temp memory and compile tables, then the worst compile time and the
    shapes the budget skipped."""
    peers = list(data["peers"])
    # Shapes the budget skipped whole are listed at the end, not as rows of "skipped".
    shapes = {shape: cells for shape, cells in by_shape(data).items()
              if not all(e.get(m, {}).get("error") == SKIPPED for e in cells.values() for m in MODES)}
    headers = ["head_dim", "mask", "seq", "batch", "heads", *peers]

    def label(shape):
        d, causal, s, b, h, kv = shape
        headline = any(e.get("headline") for e in shapes[shape].values())
        return [str(d), "causal" if causal else "full", f"**{s}**" if headline else str(s), str(b),
                _heads_label(dict(heads=h, kv_heads=kv))]

    def rows(fn, mode):
        return [[*label(shape), *(fn(cells.get(p, {}).get(mode)) for p in peers)]
                for shape, cells in shapes.items()]

    parts = []
    for shape, cells in shapes.items():
        if not any(e.get("headline") for e in cells.values()):
            continue
        d, causal, s, b, h, kv = shape
        ours = cells.get("flashjax", {}).get("fwd", {})
        if d == 128 and not causal and "tflops" in ours:
            parts.insert(0, f"Headline forward (head_dim 128, full, batch {b} x seq {s}, {data['dtype']}): "
                            f"flashjax {ours['tflops']:.1f} TFLOP/s; FlashAttention-3 target {FA3_FWD_TFLOPS:.0f} "
                            f"TFLOP/s ({ours['tflops'] / FA3_FWD_TFLOPS:.2f} of it).")
        text = []
        for p in peers:
            e = cells.get(p, {})
            err = e.get("max_abs_err_vs_reference")
            text.append(f"{p} {_cell(e.get('fwd'))} / {_cell(e.get('fwd_bwd'))}"
                        + (f" (max abs err {err:.1e})" if err is not None else ""))
        heads = f"{h} heads" if kv == h else f"{h} heads / {kv} K/V heads"
        parts.append(f"Headline (batch {b}, seq {s}, {heads}, head_dim {d}, {data['dtype']}, "
                     f"{'causal' if causal else 'full'}), TFLOP/s fwd / fwd+bwd: {', '.join(text)}.")
    vs = versus_best(data)
    if vs:
        others = [p for p in BEST_OF if p in peers]

        def ratio(r, mode):
            return f"{r[f'{mode}_ratio']:.2f} ({r[f'{mode}_best']})" if f"{mode}_ratio" in r else "-"

        parts.append(f"flashjax / best peer ({', '.join(others)}), TFLOP/s; > 1: flashjax is faster:\n\n"
                     + common.markdown_table(
                         ["head_dim", "mask", "seq", "batch", "heads", *MODE_LABEL.values()],
                         [[*label(shape_key(r)), *(ratio(r, m) for m in MODES)] for r in vs]))
    ragged = ragged_check(data)
    if ragged:
        def r_cell(r, mode):
            x = r.get(f"{mode}_ratio")
            return "-" if x is None else f"{x:.2f}" + ("" if x >= RAGGED_MIN_RATIO else " (below)")

        parts.append(f"Ragged lengths: flashjax TFLOP/s at seq / at the next multiple of {ALIGN} "
                     f"(target: >= {RAGGED_MIN_RATIO}):\n\n"
                     + common.markdown_table(
                         ["head_dim", "mask", "seq", "vs seq", "heads", *MODE_LABEL.values()],
                         [[str(r["head_dim"]), "causal" if r["causal"] else "full", str(r["seq"]),
                           str(r["aligned_seq"]), _heads_label(r), *(r_cell(r, m) for m in MODES)]
                          for r in ragged]))
    for mode, title in (("fwd", "Forward TFLOP/s"), ("fwd_bwd", "Forward+backward TFLOP/s")):
        parts.append(f"{title}:\n\n" + common.markdown_table(headers, rows(_cell, mode)))
    parts.append("Forward+backward temp memory (MiB, XLA memory analysis):\n\n"
                 + common.markdown_table(headers, rows(_mib, "fwd_bwd")))
    for mode in MODES:
        parts.append(f"Compile seconds, {MODE_LABEL[mode]} (jax.jit(f).lower(...).compile()):\n\n"
                     + common.markdown_table(headers, rows(_compile_s, mode)))
    det = data.get("deterministic_cost") or []
    if det:
        parts.append("deterministic=True: flashjax_det time / flashjax time (1.00 = free):\n\n"
                     + common.markdown_table(
                         ["head_dim", "mask", "seq", "batch", "heads", *MODE_LABEL.values()],
                         [[str(r["head_dim"]), "causal" if r["causal"] else "full", str(r["seq"]),
                           str(r["batch"]), _heads_label(r), *(f"{r[f'{m}_ratio']:.2f}" if f"{m}_ratio" in r else "-"
                                                               for m in MODES)] for r in det]))
    worst = worst_compile(data)
    if worst:
        verdict = ("none above it" if not worst["over_target"]
                   else f"{worst['over_target']} cell(s) above it")
        parts.append(f"Worst compile: {worst['compile_s']:.1f} s ({worst['peer']}, {MODE_LABEL[worst['mode']]}, "
                     f"{' '.join(_shape_label(worst).split())}); target {COMPILE_MAX_S:.0f} s: {verdict}.")
    skipped = skipped_shapes(data)
    if skipped:
        parts.append(f"Skipped by the time budget ({data.get('budget_s', '?')} s), {len(skipped)} shape(s): "
                     + "; ".join(" ".join(_shape_label(r).split())
                                 + ("" if r["peers"] == "all" else f" ({', '.join(r['peers'])})")
                                 for r in skipped) + ".")
    return "\n\n".join(parts)


def _compile_s(cell: dict | None) -> str:
    if not cell or "compile_s" not in cell:
        return _short_error(cell["error"]) if cell and "error" in cell else "-"
    return f"{cell['compile_s']:.1f}"


def results_kind(dtype: str) -> str:
    """Results file prefix and README section: bf16 is the main table, other dtypes their own
    ("attention_float16"), so that a float16 run neither overwrites nor replaces it."""
    return "attention" if dtype == "bfloat16" else f"attention_{dtype}"


def readme_section(data: dict, json_path=None) -> str:
    v = data["versions"]
    lines = [
        f"Measured {data['created'][:10]} on {data['device']} ({data['backend']}); jax {v['jax']}, "
        f"jaxlib {v['jaxlib']}, flax {v.get('flax')}; {data['dtype']}, batch*seq = {data['tokens_per_batch']} "
        f"tokens, heads*head_dim = {data['results'][0]['heads'] * data['results'][0]['head_dim'] if data['results'] else '?'}; "
        f"{data['timing']['statistic']} of {data['timing']['reps']} runs. "
        f"FLOPs: forward {data['flops']['fwd']}; forward+backward {data['flops']['fwd_bwd']}. "
        f"Bold seq = headline config.",
        "",
        "Peers: " + "; ".join(f"`{k}` = {desc}" for k, desc in data["peers"].items()) + "."
        + (" Heads 16/4: 16 query heads over 4 K/V heads (GQA, K/V not repeated); FLOPs count query heads."
           if any(e.get("kv_heads", e["heads"]) != e["heads"] for e in data["results"]) else ""),
        "",
        tables(data),
    ]
    if json_path:
        json_path = Path(json_path).resolve()
        root = common.README.parent

        def shown(p: Path) -> str:
            return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

        lines += ["", f"Raw results: `{shown(json_path)}`."]
        png = json_path.with_suffix(".png")
        if png.exists() and png.is_relative_to(root):
            lines += ["", f"![TFLOP/s vs sequence length]({shown(png)})"]
    return "\n".join(lines)


def plot(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(e["head_dim"], e["causal"]) for e in data["results"]})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7), squeeze=False)
    for col, (d, causal) in enumerate(panels):
        for row, mode in enumerate(MODES):
            ax = axes[row][col]
            groups = sorted({e["heads"] // e.get("kv_heads", e["heads"]) for e in data["results"]})
            for i, peer in enumerate(data["peers"]):
                for g in groups:  # GQA: dashed, beside the same peer's MHA line
                    pts = sorted((e["seq"], e[mode]["tflops"]) for e in data["results"]
                                 if e["peer"] == peer and e["head_dim"] == d and e["causal"] == causal
                                 and e["heads"] // e.get("kv_heads", e["heads"]) == g
                                 and "tflops" in e.get(mode, {}))
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}",
                                linestyle="-" if g == 1 else "--",
                                label=peer if g == 1 else f"{peer} (GQA {g}:1)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{MODE_LABEL[mode]}, d={d}, {'causal' if causal else 'full'}", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Attention, {data['dtype']}, {data['device']} (jax {data['versions']['jax']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Block-size sweep
# ---------------------------------------------------------------------------

def run_sweep(args) -> dict:
    import json

    import jax
    import jax.numpy as jnp

    cands = json.loads(open(args.sweep_configs).read()) if args.sweep_configs else SWEEP_CONFIGS
    if args.quick and not args.sweep_configs:
        cands = cands[:3]
    if len(cands) > 12:
        raise SystemExit(f"--sweep: {len(cands)} configs; keep it to 12 or fewer")
    # Validate all first: an unknown field must fail loudly, before any timing.
    block_sizes = [common.block_sizes(cfg, "--sweep: a config") for cfg in cands]

    info = common.env_info()
    shape = QUICK["headline"] if args.quick else HEADLINE
    if args.sweep_shape:
        try:
            vals = [int(x) for x in args.sweep_shape.split(",")]
            shape = dict(zip(("batch", "seq", "heads", "head_dim"), vals, strict=True))
        except ValueError:
            raise SystemExit(f"--sweep-shape must be batch,seq,heads,head_dim, got {args.sweep_shape!r}")
    b, s, h, d = shape["batch"], shape["seq"], shape["heads"], shape["head_dim"]
    dtype = jnp.dtype(args.dtype)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    reps = args.reps if args.reps is not None else (2 if args.quick else 10)
    inputs = make_inputs(jax.random.key(0), b, s, h, d, dtype)
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    print(f"# block_sizes sweep on {info['device']}: batch {b}, seq {s}, heads {h}, head_dim {d}, "
          f"{dtype.name}, {len(cands)} configs", flush=True)
    rows = []
    for causal in causals:
        flops = forward_flops(b, s, h, d, causal)
        for cfg, bs in zip(cands, block_sizes):
            attn = make_attention("flashjax_triton", causal=causal, sm_scale=1.0 / math.sqrt(d), block_sizes=bs)
            row = {"causal": causal, "config": cfg, "block_sizes": dataclasses.asdict(bs)}
            for mode in MODES:
                try:
                    row[mode], _ = measure(attn, mode, inputs, flops=flops, warmup=warmup, reps=reps,
                                           mem_limit=None)
                except Exception as exc:  # noqa: BLE001
                    row[mode] = {"error": common.describe_error(exc)}
            if "ms" in row["fwd"] and "ms" in row["fwd_bwd"]:
                bwd_ms = row["fwd_bwd"]["ms"] - row["fwd"]["ms"]
                row["bwd"] = {"ms": bwd_ms, "tflops": 2.5 * flops / (bwd_ms * 1e-3) / 1e12 if bwd_ms > 0 else None}
            rows.append(row)
            tail = (f"bwd {row['bwd']['ms']:.3f} ms" if "bwd" in row
                    else f"fwd+bwd {_cell(row['fwd_bwd'], verbose=True)}")
            print(f"  {'causal' if causal else 'full  '} {cfg or '(defaults)'}: "
                  f"fwd {_cell(row['fwd'], verbose=True)} | {tail}", flush=True)
    best = {}
    for causal in causals:
        for part in ("fwd", "bwd"):
            ok = [r for r in rows if r["causal"] == causal and r.get(part, {}).get("ms")]
            if ok:
                r = min(ok, key=lambda r: r[part]["ms"])
                best[f"{'causal' if causal else 'full'}_{part}"] = {"config": r["config"], "ms": r[part]["ms"]}
    print("# best:")
    for k, v in best.items():
        print(f"  {k:<12} {v['ms']:.3f} ms  {v['config'] or '(defaults)'}")
    return {"benchmark": "attention-sweep", **info, "quick": bool(args.quick), "dtype": dtype.name,
            "shape": shape, "timing": {"warmup": warmup, "reps": reps, "statistic": "median"},
            "note": "bwd = fwd_bwd - fwd; bwd TFLOP/s counts 2.5x forward FLOPs",
            "rows": rows, "best": best}


# ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--peers", nargs="+", choices=list(PEERS),
                   help=f"subset of peers (default: {' '.join(DEFAULT_PEERS)}, and {' '.join(TOKAMAX_PEERS)} "
                        "when tokamax imports)")
    p.add_argument("--deterministic", action="store_true",
                   help="also run flashjax_det (deterministic=True) beside flashjax and report "
                        "its time over flashjax's per shape")
    p.add_argument("--seqs", nargs="+", type=int,
                   help="sequence lengths (default: 512..16384); batch = 16384 // seq. A seq that is not a "
                        "multiple of 128 is compared with the next multiple when that is measured too")
    p.add_argument("--head-dims", nargs="+", type=int, help="head dims (default: 128 64)")
    p.add_argument("--causal", choices=["both", "true", "false"], default="both")
    p.add_argument("--gqa", type=int, default=1,
                   help="query heads per K/V head: K/V get heads // N heads (default 1: MHA)")
    p.add_argument("--grid", choices=GRIDS,
                   help="a preset grid: issue19 = head_dim 64/128/256 x causal/full x seq 1024/4096/16384 x "
                        "MHA/GQA 4:1 plus ragged seqs 1000/4000/8191 (head_dim 128 causal), most important "
                        f"first, peers {' '.join(ISSUE19_PEERS)} unless --peers; --seqs, --head-dims and "
                        "--causal keep a part of it")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--window", type=int,
                   help="sliding window: each query sees W keys to its left (and W to its right unless "
                        "causal), for every peer (cuDNN/XLA: local_window_size); FLOPs count the visible pairs")
    p.add_argument("--softcap", type=float,
                   help="logit soft-capping C * tanh(logits / C) for every peer that has it (not cuDNN/XLA)")
    p.add_argument("--warmup", type=int, help="warmup calls (default 3; 1 with --quick)")
    p.add_argument("--reps", type=int, help="timed calls, median reported (default 10; 2 with --quick)")
    p.add_argument("--budget", type=float, default=225.0,
                   help="seconds after which remaining non-headline shapes are skipped (default 225)")
    p.add_argument("--plot", action="store_true", help="also write a PNG of TFLOP/s vs seq")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's benchmark section from this run")
    p.add_argument("--out", help="JSON path (default benchmarks/results/attention-<device>-<date>.json)")
    p.add_argument("--sweep", action="store_true",
                   help="only time flashjax block_sizes candidates at the headline shape")
    p.add_argument("--sweep-configs", help="JSON file with a list of BlockSizes overrides (<= 12)")
    p.add_argument("--sweep-shape", help="batch,seq,heads,head_dim of the sweep (default: the headline shape)")
    args = p.parse_args(argv)
    if args.gqa < 1:
        p.error(f"--gqa must be at least 1, got {args.gqa}")
    if args.window is not None and args.window < 0:
        p.error(f"--window must be at least 0 (keys on each side), got {args.window}")
    if args.softcap is not None and not args.softcap > 0:
        p.error(f"--softcap must be > 0, got {args.softcap}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep:
        data = run_sweep(args)
        path = args.out or common.results_path("attention-sweep", data["device"], quick=args.quick)
        print(f"wrote {common.write_json(data, path)}")
        return 0
    data, path = run_benchmark(args)
    print()
    print(tables(data))
    print(f"\nwrote {path} ({data['wall_s']} s)")
    if args.plot:
        png = os.path.splitext(str(path))[0] + ".png"
        try:
            plot(data, png)
            print(f"wrote {png}")
        except Exception as exc:  # noqa: BLE001 - plotting must not lose the results
            print(f"plot failed: {common.describe_error(exc)}")
    if args.readme:
        print(f"updated {common.update_readme(readme_section(data, path), results_kind(data['dtype']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
