"""Training-step benchmark of the Flax GPT: flash vs cuDNN vs XLA attention.

    python benchmarks/train.py            # GPT-2 124M, seq 1k/4k/16k, ~4 min on an H100
    python benchmarks/train.py --quick    # tiny model on CPU: a smoke test of this script

For each sequence length (1024, 4096, 16384) and attention implementation
(flash = flashjax.flash_attention, cudnn = jax.nn.dot_product_attention
implementation="cudnn", xla = plain XLA attention materialising the scores), it
compiles one full optimizer step of the `gpt2` preset (AdamW, clipping,
bf16 compute, fp32 parameters; max_seq_len raised to the sequence length) with
a constant 16384 tokens per step (batch = 16384 // seq), on random tokens, and
measures:

  * step time (median of --reps steps after --warmup) and tokens/s;
  * model TFLOP/s: (6 * params_without_embeddings + 6 * n_layer * seq * d_model)
    FLOPs per token (causal attention counted once, half of the full square);
  * memory: XLA's compiled memory analysis of the step (temporaries + arguments
    + outputs - aliased/donated) and the device's peak bytes in use.

A configuration that does not fit or fails is recorded as "OOM" / "error: ..." in
its cell and the run goes on. Prints a Markdown table and writes
benchmarks/results/train-<device>-<date>.json (device, versions, config, results).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

IMPLS = ("flash", "cudnn", "xla")
SEQS = (1024, 4096, 16384)
TOKENS = 16384
QUICK = dict(seqs=(64, 128), tokens=256, overrides=dict(n_layer=2, d_model=64, n_head=2, vocab_size=256))


def flops_per_token(cfg, seq: int) -> float:
    n = cfg.param_count() - cfg.vocab_size * cfg.d_model * (1 if cfg.tied else 2)
    if cfg.family == "gpt2":
        n -= cfg.max_seq_len * cfg.d_model
    return 6.0 * n + 6.0 * cfg.n_layer * seq * cfg.d_model


def measure(impl: str, seq: int, args, mem_limit) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from flashjax.models.config import config_from_preset
    from flashjax.models.gpt import GPT
    from flashjax.models.train import TrainArgs, make_optimizer, make_train_step

    overrides = dict(args.overrides)
    overrides.update(attention=impl, dtype=args.dtype, max_seq_len=max(seq, 16), remat=args.remat)
    cfg = config_from_preset(args.preset, **overrides)
    batch = max(1, args.tokens // seq)
    cell: dict = {"batch": batch, "seq": seq, "attention": impl}
    t0 = time.perf_counter()
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    del model
    tx, _ = make_optimizer(
        TrainArgs(lr=6e-4, warmup=10, min_lr_ratio=0.1, weight_decay=0.1, clip=1.0, b1=0.9, b2=0.95), 1000
    )
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (1, batch, seq), dtype=np.int32)
    y = rng.integers(0, cfg.vocab_size, (1, batch, seq), dtype=np.int32)
    x, y = jax.device_put(x), jax.device_put(y)
    compiled = step.lower(params, opt_state, x, y).compile()
    cell["compile_s"] = round(time.perf_counter() - t0, 1)
    mem = common.compiled_memory(compiled)
    if mem:
        need = mem.get("temp_bytes", 0) + mem.get("argument_bytes", 0) + mem.get("output_bytes", 0) - mem.get(
            "alias_bytes", 0
        )
        cell["memory"] = mem
        cell["compiled_bytes"] = need
        if mem_limit and need > mem_limit:
            cell["error"] = f"OOM (needs {need / 2**30:.1f} GiB)"
            return cell
    for _ in range(args.warmup):
        params, opt_state, m = compiled(params, opt_state, x, y)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        params, opt_state, m = compiled(params, opt_state, x, y)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    loss = float(m["loss"])
    if not math.isfinite(loss):
        cell["error"] = f"error: loss is {loss}"
        return cell
    step_s = float(np.median(times))
    tokens = batch * seq
    cell.update(
        step_ms=step_s * 1e3, min_step_ms=min(times) * 1e3, reps=args.reps, tokens_per_s=tokens / step_s,
        tflops=flops_per_token(cfg, seq) * tokens / step_s / 1e12, loss=loss,
    )
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            cell["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    except Exception:  # noqa: BLE001 - CPU
        pass
    return cell


def run(args) -> tuple[dict, str]:
    import jax

    from flashjax.models.config import config_from_preset

    info = common.env_info()
    mem_limit = info.get("device_memory_bytes")
    base = config_from_preset(args.preset, **args.overrides, dtype=args.dtype, remat=args.remat)
    data = {
        **info,
        "benchmark": "train_step",
        "config": {
            "preset": args.preset, "overrides": args.overrides, "model": base.to_dict(),
            "params": base.param_count(), "tokens_per_step": args.tokens, "dtype": args.dtype,
            "param_dtype": base.param_dtype, "remat": args.remat, "optimizer": "AdamW(6e-4) + clip 1.0",
            "warmup": args.warmup, "reps": args.reps, "seqs": list(args.seqs), "attention": list(args.attention),
            "note": "max_seq_len = seq for each run; random tokens; memory = XLA compiled memory analysis",
        },
        "results": [],
    }
    path = args.out or common.results_path("train", info["device"], quick=args.quick)
    print(f"train-step benchmark on {info['device']} ({jax.default_backend()}), jax {jax.__version__}: "
          f"{args.preset} ({base.param_count() / 1e6:.1f}M params), {args.tokens} tokens/step, {args.dtype}",
          flush=True)
    for seq in args.seqs:
        for impl in args.attention:
            t0 = time.perf_counter()
            try:
                cell = measure(impl, seq, args, mem_limit)
            except Exception as exc:  # noqa: BLE001 - recorded in the table
                cell = {"batch": max(1, args.tokens // seq), "seq": seq, "attention": impl,
                        "error": common.describe_error(exc)}
            cell["wall_s"] = round(time.perf_counter() - t0, 1)
            data["results"].append(cell)
            print(f"  seq {seq:>6} {impl:<6} {_cell(cell)}  ({cell['wall_s']}s)", flush=True)
            common.write_json(data, path)  # partial results survive a crash
            gc.collect()
            jax.clear_caches()
    return data, str(common.write_json(data, path))


def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if b is not None else "-"


def _cell(c: dict) -> str:
    if "error" in c:
        return c["error"] if c["error"].startswith("OOM") else c["error"][:60]
    return f"{c['tokens_per_s']:,.0f} tok/s, {c['step_ms']:.1f} ms, {_gib(c.get('compiled_bytes'))} GiB"


def table(data: dict) -> str:
    impls = list(dict.fromkeys(c["attention"] for c in data["results"]))
    seqs = list(dict.fromkeys(c["seq"] for c in data["results"]))
    by = {(c["seq"], c["attention"]): c for c in data["results"]}
    headers = ["seq x batch"] + [f"{i} tok/s" for i in impls] + [f"{i} GiB" for i in impls]
    rows = []
    for s in seqs:
        row = [f"{s} x {by[(s, impls[0])]['batch']}"]
        for i in impls:
            c = by.get((s, i), {})
            row.append("OOM" if str(c.get("error", "")).startswith("OOM") else
                       (c.get("error", "-")[:40] if "error" in c else f"{c['tokens_per_s']:,.0f}"))
        for i in impls:
            c = by.get((s, i), {})
            row.append("-" if "error" in c else _gib(c.get("compiled_bytes")))
        rows.append(row)
    return common.markdown_table(headers, rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and sequences: a CPU smoke test")
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--seqs", type=lambda s: tuple(int(x) for x in s.split(",")), help="comma-separated")
    p.add_argument("--attention", type=lambda s: tuple(s.split(",")), default=IMPLS, help="comma-separated subset")
    p.add_argument("--tokens", type=int, help=f"tokens per step (default {TOKENS})")
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16; float32 with --quick)")
    p.add_argument("--remat", action="store_true", help="rematerialise each block")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", help="JSON path (default benchmarks/results/train-<device>-<date>.json)")
    args = p.parse_args(argv)
    args.overrides = dict(QUICK["overrides"]) if args.quick else {}
    args.seqs = args.seqs or (QUICK["seqs"] if args.quick else SEQS)
    args.tokens = args.tokens or (QUICK["tokens"] if args.quick else TOKENS)
    args.dtype = args.dtype or ("float32" if args.quick else "bfloat16")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.reps = args.reps if args.reps is not None else (2 if args.quick else 8)
    for impl in args.attention:
        if impl not in IMPLS:
            p.error(f"unknown attention {impl!r}; choose from {', '.join(IMPLS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    data, path = run(args)
    print()
    print(table(data))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
