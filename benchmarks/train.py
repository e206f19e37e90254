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

  * step time and tokens/s: all implementations of one sequence length are compiled
    first, then timed in --rounds interleaved rounds of --reps steps each, dispatched
    back to back (the median round's time per step; `synced_step_ms` waits for each
    step instead, adding the host's dispatch time);
  * model TFLOP/s: (6 * params_without_embeddings + 6 * n_layer * seq * d_model)
    FLOPs per token (causal attention counted once, half of the full square);
  * memory: XLA's compiled memory analysis of the step (temporaries + arguments
    + outputs - aliased/donated), and the device's peak bytes in use so far in the
    process (`device_peak_bytes_so_far`: every implementation of a length is resident
    at once, so this is not one implementation's peak).

A configuration that does not fit or fails is recorded as "OOM" / "error: ..." in
its cell and the run goes on. Prints a Markdown table and writes
benchmarks/results/train-<device>-<date>.json (device, versions, config, results).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
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


def prepare(impl: str, seq: int, args, mem_limit) -> tuple[dict, object]:
    """Compile one optimizer step for `impl` at `seq`; returns (cell, steps) where
    steps(n) runs n steps back to back and returns the wall time once they are done,
    or steps is None when the configuration does not fit (cell["error"] says why)."""
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
            return cell, None
    state = {"params": params, "opt_state": opt_state, "metrics": None}

    def steps(n: int, *, sync_each: bool = False) -> float:
        t = time.perf_counter()
        for _ in range(n):
            state["params"], state["opt_state"], state["metrics"] = compiled(
                state["params"], state["opt_state"], x, y)
            if sync_each:
                jax.block_until_ready(state["metrics"]["loss"])
        jax.block_until_ready(state["metrics"]["loss"])
        return time.perf_counter() - t

    steps.state = state
    steps.flops_per_token = flops_per_token(cfg, seq)
    return cell, steps


def measure_seq(seq: int, args, mem_limit) -> list[dict]:
    """All implementations at one sequence length, timed in interleaved rounds.

    Each round runs --reps steps of every implementation in turn, dispatched back to
    back with one wait at the end (as a training loop that does not stop for each
    step's loss runs), so the figure is the device's step time, not the host's
    dispatch of ~450 parameter arrays added to it; interleaving puts any clock or
    thermal drift on all implementations alike. The step time is the median over
    --rounds rounds. `synced_step_ms` is the median of --reps steps each waited for."""
    import jax

    cells, runners = [], {}
    for impl in args.attention:
        t0 = time.perf_counter()
        try:
            cell, steps = prepare(impl, seq, args, mem_limit)
            if steps is not None:
                steps(args.warmup)
                runners[impl] = steps
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            cell = {"batch": max(1, args.tokens // seq), "seq": seq, "attention": impl,
                    "error": common.describe_error(exc)}
        cell["wall_s"] = round(time.perf_counter() - t0, 1)
        cells.append(cell)
    times: dict[str, list[float]] = {impl: [] for impl in runners}
    failed: dict[str, str] = {}
    for _ in range(args.rounds):
        for impl, steps in runners.items():
            if impl in failed:
                continue
            try:
                times[impl].append(steps(args.reps) / args.reps)
            except Exception as exc:  # noqa: BLE001 - recorded in the table
                failed[impl] = common.describe_error(exc)
    for cell in cells:
        impl = cell["attention"]
        if impl in failed:
            cell["error"] = failed[impl]
        if impl not in runners or "error" in cell:
            continue
        steps = runners[impl]
        synced = [steps(1, sync_each=True) for _ in range(args.reps)]
        loss = float(steps.state["metrics"]["loss"])
        if not math.isfinite(loss):
            cell["error"] = f"error: loss is {loss}"
            continue
        step_s = statistics.median(times[impl])
        tokens = cell["batch"] * seq
        cell.update(
            step_ms=step_s * 1e3, min_step_ms=min(times[impl]) * 1e3, round_step_ms=[t * 1e3 for t in times[impl]],
            synced_step_ms=statistics.median(synced) * 1e3, reps=args.reps, rounds=args.rounds,
            tokens_per_s=tokens / step_s, tflops=steps.flops_per_token * tokens / step_s / 1e12, loss=loss,
        )
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            for cell in cells:
                cell["device_peak_bytes_so_far"] = int(stats["peak_bytes_in_use"])
    except Exception:  # noqa: BLE001 - CPU
        pass
    runners.clear()
    return cells


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
            "warmup": args.warmup, "reps": args.reps, "rounds": args.rounds, "seqs": list(args.seqs), "attention": list(args.attention),
            "note": "max_seq_len = seq for each run; random tokens; memory = XLA compiled memory analysis",
        },
        "results": [],
    }
    path = args.out or common.results_path("train", info["device"], quick=args.quick)
    print(f"train-step benchmark on {info['device']} ({jax.default_backend()}), jax {jax.__version__}: "
          f"{args.preset} ({base.param_count() / 1e6:.1f}M params), {args.tokens} tokens/step, {args.dtype}",
          flush=True)
    for seq in args.seqs:
        for cell in measure_seq(seq, args, mem_limit):
            data["results"].append(cell)
            print(f"  seq {seq:>6} {cell['attention']:<6} {_cell(cell)}  (compiled in {cell['wall_s']}s)", flush=True)
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
    ratio = "flash" in impls and "cudnn" in impls
    headers = (["seq x batch"] + [f"{i} tok/s" for i in impls] + (["flash / cudnn"] if ratio else [])
               + [f"{i} GiB" for i in impls])
    rows = []
    for s in seqs:
        row = [f"{s} x {by[(s, impls[0])]['batch']}"]
        for i in impls:
            c = by.get((s, i), {})
            row.append("OOM" if str(c.get("error", "")).startswith("OOM") else
                       (c.get("error", "-")[:40] if "error" in c else f"{c['tokens_per_s']:,.0f}"))
        if ratio:
            f, c = by.get((s, "flash"), {}), by.get((s, "cudnn"), {})
            row.append(f"{f['tokens_per_s'] / c['tokens_per_s']:.3f}"
                       if "tokens_per_s" in f and "tokens_per_s" in c else "-")
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
    p.add_argument("--reps", type=int, default=None, help="steps per round (default 8)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/train-<device>-<date>.json)")
    args = p.parse_args(argv)
    args.overrides = dict(QUICK["overrides"]) if args.quick else {}
    args.seqs = args.seqs or (QUICK["seqs"] if args.quick else SEQS)
    args.tokens = args.tokens or (QUICK["tokens"] if args.quick else TOKENS)
    args.dtype = args.dtype or ("float32" if args.quick else "bfloat16")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.reps = args.reps if args.reps is not None else (2 if args.quick else 8)
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    for name in ("warmup", "reps", "rounds"):
        low = 0 if name == "warmup" else 1
        if getattr(args, name) < low:
            p.error(f"--{name} must be at least {low}, got {getattr(args, name)}")
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
