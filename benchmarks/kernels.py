"""Per-kernel device time of flash attention's forward, dQ and dK/dV kernels, by tile config.

    python benchmarks/kernels.py             # GPU: causal, 12 heads, head_dim 64, 1k/4k/16k (~1 min)
    python benchmarks/kernels.py --quick     # tiny shapes on CPU: a smoke test of this script
    python benchmarks/kernels.py --configs default previous --shapes 4x4096x12x64

For each shape it runs one jitted forward+backward (bf16, causal) per tile
config and reads every kernel's device time from a `jax.profiler` trace
(mean over --reps steps): `fwd` = flashjax_fwd, `dq` = flashjax_bwd_dq,
`dkdv` = flashjax_bwd_dkdv, `other` = everything else of ours (dO.O, casts).
cuDNN's kernels (`jax.nn.dot_product_attention(implementation="cudnn")`) are
profiled in the same run as the peer. Each config's gradients are compared
with the default config's (max abs difference). On CPU there are no device
kernels: the cells then hold only the wall time of a step (median of
untraced steps, also recorded on GPU).

Configs: `default` = flashjax.BlockSizes() as shipped; `previous` = the
head_dim-64 tiles before 2026-11-26 (128x128 forward, 128x64 backward for both
kernels); or a JSON object of BlockSizes fields.
Results: benchmarks/results/kernels-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NAMED = {
    "default": {},
    "previous": dict(block_q=128, block_k=128, num_warps=4, num_stages=3,
                     block_q_bwd=128, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=2,
                     block_q_dq=128, block_k_dq=64, num_warps_dq=4, num_stages_dq=2),
}
SHAPES = ("16x1024x12x64", "4x4096x12x64", "1x16384x12x64")
QUICK_SHAPES = ("1x64x2x32",)
KERNELS = {"flashjax_fwd": "fwd", "flashjax_bwd_dq": "dq", "flashjax_bwd_dkdv": "dkdv"}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 4 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--shapes: expected BATCHxSEQxHEADSxHEAD_DIM, got {text!r}")
    return vals


def parse_config(text: str):
    """A --configs entry -> (name, overrides, flashjax.BlockSizes)."""
    if text in NAMED:
        cfg = NAMED[text]
    else:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError:
            cfg = None
        if not isinstance(cfg, dict):
            raise SystemExit(f"--configs: {text!r} is neither one of {sorted(NAMED)} nor a JSON object")
    return text, cfg, common.block_sizes(cfg, f"--configs: {text!r}")


def device_kernel_us(fn, args, reps: int) -> tuple[dict, float]:
    """Mean device time per call of each kernel name (GPU, traced), and the median wall ms
    of untraced calls."""
    import jax
    from jax.profiler import ProfileData

    jax.block_until_ready(fn(*args))
    walls = []
    for _ in range(max(reps, 3)):  # outside the trace: the profiler slows the host down
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - t0)
    wall_ms = sorted(walls)[len(walls) // 2] * 1e3
    trace_dir = tempfile.mkdtemp(prefix="flashjax-kernels-")
    with jax.profiler.trace(trace_dir):
        for _ in range(reps):
            jax.block_until_ready(fn(*args))
    totals: dict = collections.defaultdict(float)
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if files:
        for plane in ProfileData.from_file(files[0]).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if "stream" not in line.name.lower():
                    continue
                for ev in line.events:
                    totals[ev.name] += ev.duration_ns / 1e3 / reps
    return dict(totals), wall_ms


def grad_fn(peer: str, blocks, do):
    import jax
    import jax.numpy as jnp

    import flashjax

    def loss(q, k, v):
        if peer == "cudnn":
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        else:
            o = flashjax.flash_attention(q, k, v, causal=True, block_sizes=blocks,
                                         implementation="triton")  # the tiles are Triton's
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure_shape(shape, configs, reps: int, with_cudnn: bool) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from flashjax._backend import resolve_interpret

    b, s, h, d = shape
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in keys)
    row: dict = {"batch": b, "seq": s, "heads": h, "head_dim": d, "causal": True, "peers": {}}
    ref = None
    for name, _, blocks in configs:
        try:
            fn = grad_fn("flash", blocks, do)
            grads = fn(q, k, v)
            totals, wall = device_kernel_us(fn, (q, k, v), reps)
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            row["peers"][name] = {"error": common.describe_error(exc)}
            continue
        by_kernel: dict = collections.defaultdict(float)
        for kname, us in totals.items():
            by_kernel[KERNELS.get(kname, "other")] += us
        cell = {"block_sizes": dataclasses.asdict(blocks.resolved(d, resolve_interpret(None))),
                "wall_ms": wall, "kernels_us": dict(by_kernel)}
        if ref is None:
            ref = grads
            cell["max_abs_diff_vs_first"] = 0.0
        else:
            cell["max_abs_diff_vs_first"] = max(
                float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32)))) for a, r in zip(grads, ref))
        row["peers"][name] = cell
    if with_cudnn:
        try:
            fn = grad_fn("cudnn", None, do)
            totals, wall = device_kernel_us(fn, (q, k, v), reps)
            row["peers"]["cudnn"] = {"wall_ms": wall, "kernels_us": totals}
        except Exception as exc:  # noqa: BLE001
            row["peers"]["cudnn"] = {"error": common.describe_error(exc)}
    return row


def table(data: dict) -> str:
    names = list(data["configs"])
    headers = ["batch x seq x heads x d"]
    for n in names:
        headers += [f"{n} fwd / dq / dkdv (all) µs"]
    headers += ["cudnn kernels µs (all)"] if data["with_cudnn"] else []
    headers += [f"{n} wall ms" for n in names]
    rows = []
    for r in data["results"]:
        line = [f"{r['batch']} x {r['seq']} x {r['heads']} x {r['head_dim']}"]
        for n in names:
            c = r["peers"].get(n, {})
            if "error" in c:
                line.append(c["error"][:40])
            elif c.get("kernels_us"):
                ku = c["kernels_us"]
                line.append(" / ".join(f"{ku.get(x, 0):.0f}" for x in ("fwd", "dq", "dkdv"))
                            + f" ({sum(ku.values()):.0f})")
            else:
                line.append("- (no device kernels)")
        if data["with_cudnn"]:
            c = r["peers"].get("cudnn", {})
            line.append(c["error"][:40] if "error" in c else f"{sum(c['kernels_us'].values()):.0f}")
        for n in names:
            c = r["peers"].get(n, {})
            line.append("-" if "error" in c else f"{c['wall_ms']:.2f}")
        rows.append(line)
    return common.markdown_table(headers, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--shapes", nargs="+", type=parse_shape,
                   help=f"BATCHxSEQxHEADSxHEAD_DIM (default: {' '.join(SHAPES)})")
    p.add_argument("--configs", nargs="+", default=["default", "previous"],
                   help="named configs (default, previous) or JSON BlockSizes overrides")
    p.add_argument("--reps", type=int, default=3, help="profiled steps per cell (default 3)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/kernels-<device>-<date>.json)")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"--reps must be at least 1, got {args.reps}")

    import jax

    configs = [parse_config(c) for c in args.configs]
    shapes = args.shapes or [parse_shape(s) for s in (QUICK_SHAPES if args.quick else SHAPES)]
    info = common.env_info()
    with_cudnn = jax.default_backend() == "gpu"
    data = {**info, "benchmark": "kernels", "quick": args.quick, "dtype": "bfloat16", "reps": args.reps,
            "configs": {n: c for n, c, _ in configs}, "with_cudnn": with_cudnn,
            "note": "device time per call from jax.profiler (GPU stream events), mean over reps",
            "results": []}
    path = args.out or common.results_path("kernels", info["device"], quick=args.quick)
    print(f"kernel profile on {info['device']}: configs {[n for n, _, _ in configs]}", flush=True)
    for shape in shapes:
        data["results"].append(measure_shape(shape, configs, args.reps, with_cudnn))
        common.write_json(data, path)
        print(f"  {shape} done", flush=True)
    print()
    print(table(data))
    print(f"\nwrote {common.write_json(data, path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
