"""Scaling over several GPUs: training tokens/s (data parallel and FSDP) and
tensor-parallel generation throughput for 1, 2, 4, ... devices, in one run.

    python benchmarks/parallel.py            # all visible GPUs, powers of two
    python benchmarks/parallel.py --quick    # CPU smoke test with 4 host devices

Training: GPT-2 124M preset, bf16 compute, flash attention, seq 1024, a fixed
per-device micro batch (weak scaling: tokens per step grow with devices).
Generation: the paged jitted loop with the model's heads split over devices.
Results: benchmarks/results/parallel-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--quick" in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from flashjax.mesh import describe, make_mesh  # noqa: E402
from flashjax.models import config_from_preset  # noqa: E402
from flashjax.models.gpt import GPT  # noqa: E402
from flashjax.models.train import make_sharded_train_step  # noqa: E402


def time_steps(step, params, opt, x, y, reps):
    params, opt, m = step(params, opt, x, y)
    jax.block_until_ready(m["loss"])
    params, opt, m = step(params, opt, x, y)
    jax.block_until_ready(m["loss"])
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        params, opt, m = step(params, opt, x, y)
        jax.block_until_ready(m["loss"])
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), float(m["loss"])


def train_row(cfg, devices, layout, micro, seq, reps):
    n = len(devices)
    if layout == "fsdp":
        mesh = make_mesh(data=1, fsdp=n, devices=devices)
    else:
        mesh = make_mesh(data=n, devices=devices)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-4)
    step, params, opt = make_sharded_train_step(graphdef, tx, mesh, params)
    batch = micro * n
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, batch, seq)), jnp.int32)
    y = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, batch, seq)), jnp.int32)
    dt, loss = time_steps(step, params, opt, x, y, reps)
    mem = None
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats:
        mem = stats.get("peak_bytes_in_use")
    return {"devices": n, "layout": layout, "mesh": describe(mesh), "global_batch": batch,
            "seq": seq, "step_ms": dt * 1e3, "tokens_per_s": batch * seq / dt, "loss": loss,
            "peak_bytes_device0": mem}


def generate_row(cfg, devices, batch, prompt_len, new_tokens, reps):
    """Tensor-parallel decode throughput: the model's heads split over `devices`."""
    from flashjax.serving.generate import generate

    n = len(devices)
    mesh = make_mesh(data=1, model=n, devices=devices) if n > 1 else None
    model = GPT(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    prompts = rng.integers(1, cfg.vocab_size, (batch, prompt_len)).tolist()

    def run(k):
        t = time.perf_counter()
        generate(model, prompts, k, mesh=mesh)
        return time.perf_counter() - t

    run(new_tokens), run(1)  # compile both (same buckets as the timed calls)
    full = float(np.median([run(new_tokens) for _ in range(reps)]))
    first = float(np.median([run(1) for _ in range(reps)]))
    per_step = (full - first) / max(1, new_tokens - 1)
    return {"devices": n, "layout": f"tensor parallel x{n}", "batch": batch, "prompt": prompt_len,
            "new_tokens": new_tokens, "decode_ms_per_step": per_step * 1e3,
            "decode_tokens_per_s": batch / per_step if per_step > 0 else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out")
    p.add_argument("--reps", type=int, default=None)
    a = p.parse_args(argv)
    devs = jax.devices()
    counts = [c for c in (1, 2, 4, 8) if c <= len(devs)]
    if a.quick:
        cfg = config_from_preset("nano", n_layer=2, d_model=64, n_head=4, vocab_size=128, max_seq_len=64,
                                 attention="flash", dtype="float32")
        micro, seq, reps = 2, 64, a.reps or 1
    else:
        cfg = config_from_preset("gpt2", attention="flash", dtype="bfloat16")
        micro, seq, reps = 8, 1024, a.reps or 5
    rows = []
    for n in counts:
        for layout in ("data", "fsdp"):
            if n == 1 and layout == "fsdp":
                continue
            try:
                r = train_row(cfg, devs[:n], layout, micro, seq, reps)
            except Exception as e:  # noqa: BLE001 - record, don't crash
                r = {"devices": n, "layout": layout, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(r)
            print(json.dumps(r), flush=True)
    gen_rows = []
    if a.quick:
        gcfg = config_from_preset("llama-nano", n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128,
                                  vocab_size=97, max_seq_len=64, dtype="float32")
        gb, gp, gn = 2, 8, 8
    else:
        gcfg = config_from_preset("llama-1b", dtype="bfloat16")
        gb, gp, gn = 16, 128, 128
    for n in counts:
        if gcfg.kv_heads % n:
            continue
        try:
            r = generate_row(gcfg, devs[:n], gb, gp, gn, reps)
        except Exception as e:  # noqa: BLE001
            r = {"devices": n, "layout": f"tensor parallel x{n}", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        gen_rows.append(r)
        print(json.dumps(r), flush=True)
    base = next((r["tokens_per_s"] for r in rows if r.get("devices") == 1 and "tokens_per_s" in r), None)
    lines = ["| devices | layout | global batch x seq | step ms | tokens/s | scaling vs 1 GPU |",
             "| ------- | ------ | ------------------ | ------- | -------- | ---------------- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['devices']} | {r['layout']} | | | {r['error'][:60]} | |")
            continue
        sc = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
        lines.append(f"| {r['devices']} | {r['layout']} | {r['global_batch']} x {r['seq']} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {sc} |")
    gbase = next((r["decode_tokens_per_s"] for r in gen_rows if r.get("devices") == 1
                  and r.get("decode_tokens_per_s")), None)
    lines += ["", "| devices | generation | batch | prompt + new | ms / decode step | tokens/s | scaling |",
              "| ------- | ---------- | ----- | ------------ | ---------------- | -------- | ------- |"]
    for r in gen_rows:
        if "error" in r:
            lines.append(f"| {r['devices']} | {r['layout']} | | | | {r['error'][:60]} | |")
            continue
        tps = r["decode_tokens_per_s"] or 0.0
        sc = f"{tps / gbase:.2f}x" if gbase else ""
        lines.append(f"| {r['devices']} | {r['layout']} | {r['batch']} | {r['prompt']} + {r['new_tokens']} | "
                     f"{r['decode_ms_per_step']:.2f} | {tps:,.0f} | {sc} |")
    table = "\n".join(lines)
    print(table)
    meta = {"env": common.env_info()}
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"parallel-{'quick' if a.quick else 'run'}-{time.strftime('%Y-%m-%d')}.json")
    with open(out, "w") as f:
        json.dump({"benchmark": "parallel", "device": str(devs[0].device_kind), "device_count": len(devs),
                   "versions": {"jax": jax.__version__}, "config": cfg.to_json() if hasattr(cfg, "to_json") else str(cfg),
                   "per_device_micro_batch": micro, "rows": rows, "generation_rows": gen_rows, "markdown": table, **meta}, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
