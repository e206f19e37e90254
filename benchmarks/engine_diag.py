"""Where an engine decode step's time goes (a diagnostic, not a headline benchmark).

    python benchmarks/engine_diag.py --preset llama-1b --batch 64

Times, on the same random-weight model and prompts: the device step alone (K decode
steps of every row in one call, calls dispatched back to back), and the engine run
to completion with overlap on/off and several K, with the engine's host timing
breakdown (plan, dispatch, wait for the device, deliver). Prints one JSON line per
measurement and writes them, with the device and versions, to
benchmarks/results/engine_diag-<device>-<date>.json (`--out` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def device_idle(log_dir, lo=0.25, hi=0.9):
    """The device's idle share of a traced run: kernel intervals on the GPU streams of the
    newest perfetto_trace.json.gz under `log_dir`, their union over the stretch from
    `lo` to `hi` of the GPU span (the steady decode part; prefill is at the start)."""
    import glob
    import gzip

    files = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        return {"idle_error": f"no perfetto_trace.json.gz under {log_dir}"}
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if "GPU" in n.upper() and "HOST" not in n.upper()}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu}
    spans = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and e.get("dur", 0) > 0]
    # XLA's per-executable line ("XLA Modules"): one span per device call; the gaps
    # between them are the idle time *between* steps (kernel launch gaps inside a
    # step count as busy there, and as idle in the kernel-level figure)
    modules = [e for e in spans if "module" in threads.get((e["pid"], e["tid"]), "").lower()]
    kernels = [e for e in spans if "module" not in threads.get((e["pid"], e["tid"]), "").lower()]
    if not kernels:
        return {"idle_error": "no GPU kernel events", "processes": sorted(set(names.values()))}
    t0 = min(e["ts"] for e in kernels)
    t1 = max(e["ts"] + e["dur"] for e in kernels)
    s0, s1 = t0 + lo * (t1 - t0), t0 + hi * (t1 - t0)

    def union(evs):
        busy, cur_a, cur_b = 0.0, None, None
        for a_, b_ in sorted((e["ts"], e["ts"] + e["dur"]) for e in evs):
            a_, b_ = max(a_, s0), min(b_, s1)
            if b_ <= a_:
                continue
            if cur_b is None or a_ > cur_b:
                if cur_b is not None:
                    busy += cur_b - cur_a
                cur_a, cur_b = a_, b_
            else:
                cur_b = max(cur_b, b_)
        return busy + (cur_b - cur_a if cur_b is not None else 0.0)

    busy = union(kernels)
    out = {"trace": files[-1], "stretch_ms": (s1 - s0) / 1e3, "kernel_busy_ms": busy / 1e3,
           "kernel_idle_frac": 1 - busy / (s1 - s0), "gpu_processes": sorted(names[p] for p in gpu),
           "gpu_threads": sorted(set(threads.values())),
           "idle_by_gap_us": idle_gaps(kernels, s0, s1)}
    if modules:
        mbusy = union(modules)
        out.update(module_busy_ms=mbusy / 1e3, between_steps_idle_frac=1 - mbusy / (s1 - s0),
                   between_steps_method="XLA Modules line: gaps between device calls")
    else:
        # GPU traces may have no per-executable line (none on the H200 of 2026-12-02). Then
        # the idle time between device calls is estimated from the kernel gaps themselves:
        # inside one call the next kernel is already queued (launch gaps of a few us), a
        # gap of BETWEEN_CALLS_GAP_US or more means the device waited for the host.
        long_idle = sum(v["idle_ms"] for k, v in out["idle_by_gap_us"].items()
                        if float(k.split("-")[0].rstrip("+")) >= BETWEEN_CALLS_GAP_US)
        out.update(between_steps_idle_frac=long_idle * 1e3 / (s1 - s0),
                   between_steps_method=f"kernel gaps >= {BETWEEN_CALLS_GAP_US:g} us (no XLA Modules line)")
    return out


# Kernel gaps at least this long count as waits for the host (see device_idle).
BETWEEN_CALLS_GAP_US = 50.0
GAP_BUCKETS_US = (0.0, 5.0, 20.0, 50.0, 200.0, 1000.0)


def idle_gaps(kernels, s0, s1):
    """Idle time between consecutive busy stretches of the kernel timeline (clipped to
    [s0, s1], in trace microseconds), bucketed by gap length:
    {"0-5": {"gaps": n, "idle_ms": t}, ..., "1000+": {...}}."""
    iv = sorted((max(e["ts"], s0), min(e["ts"] + e["dur"], s1)) for e in kernels)
    iv = [(a, b) for a, b in iv if b > a]
    gaps, end = [], None
    for a, b in iv:
        if end is not None and a > end:
            gaps.append(a - end)
        end = b if end is None else max(end, b)
    edges = list(GAP_BUCKETS_US)
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]:g}+"]
    out = {lb: {"gaps": 0, "idle_ms": 0.0} for lb in labels}
    for g in gaps:
        i = max(j for j, lo in enumerate(edges) if g >= lo)
        out[labels[i]]["gaps"] += 1
        out[labels[i]]["idle_ms"] += g / 1e3
    return out


def main(argv=None):
    import jax
    import numpy as np

    from flashjax.models.config import config_from_preset
    from flashjax.models.gpt import build_model
    from flashjax.serving import step as S
    from flashjax.serving.engine import Engine, RequestParams

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--variants", default="8:1,8:0,32:1,1:1", help="K:overlap,...")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/engine_diag-<device>-<date>.json)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also trace one more run of the first variant with jax.profiler into DIR and "
                         "report the device's idle share of the steady decode stretch")
    a = ap.parse_args(argv)
    data = {**common.env_info(), "benchmark": "engine_diag", "config": vars(a), "lines": []}
    path = a.out or common.results_path("engine_diag", data["device"])

    def emit(line):
        print(json.dumps(line), flush=True)
        data["lines"].append(line)
        common.write_json(data, path)
    cfg = config_from_preset(a.preset, dtype="bfloat16", param_dtype="bfloat16")
    model = build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (a.batch, a.prompt_len)).tolist()
    bs = 16
    per_seq = -(-(a.prompt_len + a.new_tokens) // bs) + 1
    for v in a.variants.split(","):
        K, ov = (int(x) for x in v.split(":"))
        eng = Engine(model, num_blocks=per_seq * a.batch + 8, max_seqs=a.batch, block_size=bs,
                     max_num_batched_tokens=4096 + a.batch, prefill_rows=32, max_chunk=128, chunk_buckets=(128,),
                     prefix_caching=False, decode_steps=K, overlap=bool(ov))
        eng.warmup()
        params = RequestParams(temperature=0, max_tokens=a.new_tokens, ignore_eos=True)
        eng.generate(prompts[:2], RequestParams(temperature=0, max_tokens=4, ignore_eos=True))
        # device step alone: every row live for K steps (blocks handed out by hand)
        if K > 1 or v == a.variants.split(",")[0]:
            sl = S.SlotBatch(a.batch, eng.max_blocks_per_seq)
            for s in range(a.batch):
                sl.ints[s, S.LENGTH] = a.prompt_len
                sl.ints[s, S.ACTIVE] = 1
                sl.ints[s, S.N_STEPS] = K
                sl.ints[s, S.EOS] = -1
                sl.tables[s, :per_seq - 1] = np.arange(s * (per_seq - 1), (s + 1) * (per_seq - 1))
            full = sl.arrays()
            width = next(w for w in eng.table_buckets if w >= per_seq)
            for name, arr in (("full_tables", full), (f"tables_{width}", dict(full, tables=full["tables"][:, :width]))):
                jax.block_until_ready(eng.runner.run(arr, None, steps=K))
                t0 = time.perf_counter()
                outs = [eng.runner.run(arr, None, steps=K) for _ in range(10)]
                jax.block_until_ready(outs)
                dev = (time.perf_counter() - t0) / 10 / K
                emit({"variant": v, name + "_device_step_ms": dev * 1e3})
        eng.host_timing.clear()
        c0 = eng.stats_counters["device_calls"]
        t0 = time.perf_counter()
        hs = [eng.add_request(p, params) for p in prompts]
        eng.run_until_done()
        total = time.perf_counter() - t0
        assert all(len(h.result().outputs[0].token_ids) == a.new_tokens for h in hs)
        emit({"variant": v, "total_s": total, "tok_s": a.batch * a.new_tokens / total,
              "calls": eng.stats_counters["device_calls"] - c0,
              **{k: round(x, 4) for k, x in eng.host_timing.items()}})
        if a.profile and v == a.variants.split(",")[0]:
            hs = [eng.add_request(p, params) for p in prompts]
            jax.profiler.start_trace(a.profile, create_perfetto_trace=True)
            eng.run_until_done()
            jax.profiler.stop_trace()
            emit({"variant": v, "profile": a.profile, **device_idle(a.profile)})
        eng.pages = None
        del eng
    print(f"results: {common.write_json(data, path)}")


if __name__ == "__main__":
    sys.exit(main())
