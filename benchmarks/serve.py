"""Serving benchmark: the continuous-batching server under seeded Poisson arrivals.

    python benchmarks/serve.py --quick                      # CPU smoke (tiny random model)
    python benchmarks/serve.py                              # GPU: llama-1b, bf16
    python benchmarks/serve.py --preset llama-1b,llama-7b   # both sizes, one run
    python benchmarks/serve.py --checkpoint runs/nano --url http://127.0.0.1:8000   # a running server

Requests (token-id prompts, lengths drawn from a fixed distribution, outputs of a
fixed length each with ignore_eos) arrive as a Poisson process and stream from
POST /v1/completions. Reports throughput (output tokens/s), TTFT and TPOT
p50/p99, and KV utilisation (tokens stored / capacity of the blocks in use,
sampled from /metrics while the run lasts). Baselines on the same workload:
static batching (`flashjax.serving.generate.generate`, batches of --max-seqs in
arrival order, each waiting for the previous one) and Hugging Face transformers
`generate` batched (when torch + transformers are installed). JSON goes to
benchmarks/results/serve-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, results_path, write_json  # noqa: E402


# ShareGPT-like lengths: lognormals whose means match the ShareGPT statistics in
# the vLLM paper (input 161, output 338 tokens), clipped to [4, 1024] and [4, 512].
SHAREGPT = {"prompt": (4.58, 1.0, 4, 1024), "output": (5.50, 0.8, 4, 512)}


def lengths_desc(a) -> str:
    if a.lengths == "sharegpt":
        (pm, ps, plo, phi), (om, os_, olo, ohi) = SHAREGPT["prompt"], SHAREGPT["output"]
        return (f"ShareGPT-like lengths: prompt ~ lognormal(mu={pm}, sigma={ps}) clipped to [{plo}, {phi}], "
                f"output ~ lognormal(mu={om}, sigma={os_}) clipped to [{olo}, {ohi}]")
    return f"prompts drawn from {a.prompt_lens} tokens, outputs from {a.output_lens}"


def workload(n, rate, seed, prompt_lens, output_lens, vocab, dist="lists"):
    """Seeded requests: Poisson arrivals at `rate`/s; lengths from the lists
    (`dist="lists"`) or the ShareGPT-like lognormals (`dist="sharegpt"`)."""
    rs = np.random.RandomState(seed)
    gaps = rs.exponential(1.0 / rate, size=n)
    arrivals = np.cumsum(gaps) - gaps[0]
    reqs = []
    for i in range(n):
        if dist == "sharegpt":
            pl, ol = (int(np.clip(round(rs.lognormal(m, s)), lo, hi))
                      for m, s, lo, hi in (SHAREGPT["prompt"], SHAREGPT["output"]))
        else:
            pl = int(rs.choice(prompt_lens))
            ol = int(rs.choice(output_lens))
        reqs.append({"arrival": float(arrivals[i]), "prompt": rs.randint(1, vocab, size=pl).tolist(), "max_tokens": ol})
    return reqs


def pct(xs, p):
    return float(np.percentile(xs, p)) if len(xs) else None


async def run_client(base, reqs, metrics_every=0.05):
    import httpx

    results = [None] * len(reqs)
    util = []
    done = asyncio.Event()

    # No connection limit: httpx's default pool (100 connections) would queue the
    # requests past the hundredth in the client, where the server cannot see them.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as c:
        async def poll():
            while not done.is_set():
                try:
                    text = (await c.get("/metrics")).text
                    for line in text.splitlines():
                        if line.startswith("flashjax_kv_utilization "):
                            used = [ln for ln in text.splitlines() if ln.startswith("flashjax_kv_blocks_used ")]
                            if used and float(used[0].split()[1]) > 0:
                                util.append(float(line.split()[1]))
                except Exception:  # noqa: BLE001
                    pass
                await asyncio.sleep(metrics_every)

        async def one(i, r, t0):
            await asyncio.sleep(max(0.0, t0 + r["arrival"] - time.perf_counter()))
            body = {"prompt": r["prompt"], "max_tokens": r["max_tokens"], "temperature": 0, "ignore_eos": True,
                    "stream": True}
            sent = time.perf_counter()
            times = []
            async with c.stream("POST", "/v1/completions", json=body) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        k = len(json.loads(line[6:])["choices"][0].get("token_ids", []))
                        times.extend([time.perf_counter()] * k)
            results[i] = {"sent": sent, "times": times, "status": s.status_code}

        poller = asyncio.ensure_future(poll())
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, r, t0) for i, r in enumerate(reqs)))
        end = time.perf_counter()
        done.set()
        await poller
    ntok = sum(len(r["times"]) for r in results)
    ttft = [r["times"][0] - r["sent"] for r in results if r["times"]]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in results if len(r["times"]) > 1]
    return {
        "requests": len(reqs), "ok": sum(r["status"] == 200 for r in results), "output_tokens": ntok,
        "makespan_s": end - t0, "throughput_tok_s": ntok / (end - t0),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
        "kv_utilization_mean": float(np.mean(util)) if util else None,
    }


def _client_main(base, reqs, metrics_every):
    return asyncio.run(run_client(base, reqs, metrics_every))


def client(base, reqs, metrics_every=0.05):
    """Run the load generator in a process of its own, as real clients are: in the
    server's process its thousand streams would take the interpreter lock from the
    server and the engine, and the figures would measure the client."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_client_main, base, reqs, metrics_every).result()


def static_baseline(model, reqs, batch, block_size):
    """Batches of `batch` requests in arrival order; a batch starts when its last request
    has arrived and the previous batch is done; tokens arrive when the batch ends."""
    from flashjax.serving.generate import generate

    def run(group):
        return generate(model, [r["prompt"] for r in group], max(r["max_tokens"] for r in group),
                        block_size=block_size)

    run(reqs[:batch])  # compile outside the clock (same shapes are bucketed)
    clock = 0.0
    ttft, useful, step = [], 0, []
    busy = 0.0
    for i in range(0, len(reqs), batch):
        group = reqs[i:i + batch]
        start = max(clock, max(r["arrival"] for r in group))
        t = time.perf_counter()
        run(group)
        dt = time.perf_counter() - t
        busy += dt
        step.append(dt / max(r["max_tokens"] for r in group))
        clock = start + dt
        ttft += [clock - r["arrival"] for r in group]
        useful += sum(r["max_tokens"] for r in group)
    return {"batch": batch, "makespan_s": clock, "throughput_tok_s": useful / clock, "busy_s": busy,
            # the loop's time per generated token step (prefill included) at this batch:
            # what the issue's TPOT target is measured against
            "step_p50_s": pct(step, 50),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99)}


def hf_baseline(model, reqs, batch):
    try:
        import tempfile

        import torch
        import transformers

        from flashjax.models import hf
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"needs torch + transformers + flashjax.models.hf: {e}"}
    try:
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(model, d)
            tm = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        tm = tm.to(dev)
        t0 = time.perf_counter()
        ntok = 0
        for i in range(0, len(reqs), batch):
            group = reqs[i:i + batch]
            L = max(len(r["prompt"]) for r in group)
            ids = torch.zeros((len(group), L), dtype=torch.long)
            mask = torch.zeros((len(group), L), dtype=torch.long)
            for j, r in enumerate(group):  # left padding
                ids[j, L - len(r["prompt"]):] = torch.tensor(r["prompt"])
                mask[j, L - len(r["prompt"]):] = 1
            new = max(r["max_tokens"] for r in group)
            with torch.no_grad():
                tm.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                            min_new_tokens=new, do_sample=False, pad_token_id=0)
            ntok += sum(r["max_tokens"] for r in group)
        dt = time.perf_counter() - t0
        return {"batch": batch, "seconds": dt, "throughput_tok_s": ntok / dt, "note": "all requests present at t=0"}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def serve_one(model, tok, a, reqs, pl, ol, log):
    """Start the engine and a loopback server for `model`, run the workload, stop them."""
    import uvicorn

    from flashjax.serving.engine import Engine
    from flashjax.serving.server import ENGINE_SWITCH_INTERVAL_S, create_app

    cfg = model.config
    per_seq = -(-cfg.max_seq_len // a.block_size)
    engine = Engine(model, tokenizer=tok, num_blocks=a.num_blocks or per_seq * a.max_seqs, max_seqs=a.max_seqs,
                    block_size=a.block_size, max_num_batched_tokens=a.max_num_batched_tokens,
                    max_chunk=min(a.max_num_batched_tokens, 256), max_waiting=None,
                    decode_steps=a.decode_steps)
    t = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - t
    log(f"  engine compiled in {warmup_s:.1f}s")
    app = create_app(engine, tok)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    sys.setswitchinterval(ENGINE_SWITCH_INTERVAL_S)  # as `flashjax serve` does
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    try:
        # warm-up: compile the step variants outside the clock
        client(base, workload(4, 100.0, a.seed + 1, pl, ol, cfg.vocab_size, a.lengths))
        # --quick's requests live ~10 ms each: sample the KV utilisation often enough to see them
        out = client(base, reqs, 0.005 if a.quick else 0.05)
        out["engine_stats"] = engine.stats()
        out["engine_warmup_s"] = round(warmup_s, 2)  # Engine.warmup(): every step variant compiled
        return out
    finally:
        srv.should_exit = True
        engine.stop()
        thread.join(timeout=30)
        # Free the KV pool now: the baselines that follow need the memory (the
        # 7B static baseline ran out of it while the stopped engine's pool lived on).
        engine.pages = None
        gc.collect()


def fmt(x, scale=1.0, spec=".1f"):
    return "-" if x is None else format(x * scale, spec)


def table(runs) -> str:
    from common import markdown_table

    rows = []
    for r in runs:
        s = r.get("server", {})
        st = r.get("static_batching", {})
        hf = r.get("hf_transformers", {})
        rows.append([
            f"{r['preset']} ({r['params'] / 1e9:.2f}B)",
            f"{s.get('ok', '-')}/{s.get('requests', '-')}",
            fmt(s.get("throughput_tok_s"), spec=".0f"),
            f"{fmt(s.get('ttft_p50_s'), 1e3, '.0f')} / {fmt(s.get('ttft_p99_s'), 1e3, '.0f')}",
            f"{fmt(s.get('tpot_p50_s'), 1e3)} / {fmt(s.get('tpot_p99_s'), 1e3)}",
            fmt(s.get("kv_utilization_mean"), 100) + ("%" if s.get("kv_utilization_mean") is not None else ""),
            fmt(st.get("throughput_tok_s"), spec=".0f") if "throughput_tok_s" in st
            else (st.get("error") or "-")[:40],
            fmt(s["throughput_tok_s"] / st["throughput_tok_s"], spec=".2f")
            if s and "throughput_tok_s" in st else "-",
            fmt(s["tpot_p50_s"] / st["step_p50_s"], spec=".2f")
            if s and "step_p50_s" in st and s.get("tpot_p50_s") else "-",
            fmt(hf.get("throughput_tok_s"), spec=".0f") if "throughput_tok_s" in hf
            else (hf.get("skipped") or hf.get("error") or "-")[:40],
        ])
    return markdown_table(["model", "ok", "server tok/s", "TTFT p50 / p99 ms", "TPOT p50 / p99 ms", "KV util",
                           "static batching (one-jit loop) tok/s", "server / loop",
                           "TPOT p50 / loop step", "HF generate tok/s"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, a dozen requests")
    p.add_argument("--preset", default="llama-1b",
                   help="comma-separated model presets, each benchmarked in turn (default llama-1b)")
    p.add_argument("--dtype", default=None, help="parameter and compute dtype (default bfloat16; float32 with --quick)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0,
                   help="mean arrivals per second ('inf': every request at t=0, a saturation test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", choices=("lists", "sharegpt"), default="lists",
                   help="request lengths: drawn from --prompt-lens/--output-lens (default), or "
                        "ShareGPT-like lognormals (means 161 / 338 tokens as in the vLLM paper)")
    p.add_argument("--prompt-lens", default="16,64,128,256")
    p.add_argument("--output-lens", default="32,64,128")
    p.add_argument("--max-seqs", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=8, help="engine: most decode steps per device call")
    p.add_argument("--static-batch", type=int, default=None,
                   help="batch of the static-batching baseline (default --max-seqs; the one-jit loop "
                        "prefills its whole batch at once, so a 7B model needs a smaller one)")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.requests, a.rate, a.prompt_lens, a.output_lens = 12, 4.0, "4,9,17", "4,8"
        a.max_seqs, a.block_size, a.max_num_batched_tokens = 4, 8, 32
        a.preset = "tiny"
        a.lengths = "lists"
    a.dtype = a.dtype or ("float32" if a.quick else "bfloat16")

    import jax

    from flashjax.models.config import config_from_preset
    from flashjax.models.gpt import build_model

    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    pl = [int(x) for x in a.prompt_lens.split(",")]
    ol = [int(x) for x in a.output_lens.split(",")]
    res = {"env": env_info(), "args": vars(a), "runs": []}
    out = Path(a.out) if a.out else results_path("serve", res["env"]["device"], quick=a.quick)
    targets = [a.checkpoint] if a.checkpoint else a.preset.split(",")
    for name in targets:
        tok = None
        if a.checkpoint:
            from flashjax.serving.server import load_for_serving
            model, tok, _ = load_for_serving(a.checkpoint)
        elif a.quick:
            model = build_model(config_from_preset("nano", n_layer=2, d_model=64, n_head=4, vocab_size=256,
                                                   max_seq_len=64, attention="xla"), 0)
        else:
            model = build_model(config_from_preset(name, dtype=a.dtype, param_dtype=a.dtype), 0)
        cfg = model.config
        run = {"preset": name, "params": cfg.param_count(), "model": cfg.to_dict()}
        res["runs"].append(run)
        log(f"{name}: {cfg.param_count() / 1e9:.2f}B params, {a.dtype}; {a.requests} requests at {a.rate}/s")
        reqs = workload(a.requests, a.rate, a.seed, pl, ol, cfg.vocab_size, a.lengths)
        run["workload"] = {"lengths": lengths_desc(a), "prompt_tokens": sum(len(r["prompt"]) for r in reqs),
                           "output_tokens": sum(r["max_tokens"] for r in reqs)}
        if not a.no_baselines:
            # The one-jit loop first, before the engine's KV pool exists: a 7B model's loop
            # cache (60 GiB at batch 64) did not fit beside the pool the server had used.
            # A failure is recorded in its cell; the server still runs.
            try:
                run["static_batching"] = static_baseline(model, reqs, a.static_batch or a.max_seqs, a.block_size)
                log(f"  static batching: {run['static_batching']['throughput_tok_s']:.1f} tok/s")
            except Exception as e:  # noqa: BLE001 - e.g. out of device memory
                run["static_batching"] = {"error": f"{type(e).__name__}: {e}"[:500]}
                log(f"  static batching failed: {run['static_batching']['error'][:200]}")
            jax.clear_caches()
            gc.collect()
            write_json(res, out)
        if a.url:
            run["server"] = client(a.url, reqs)
        else:
            run["server"] = serve_one(model, tok, a, reqs, pl, ol, log)
        s = run["server"]
        log(f"  server: {s['ok']}/{s['requests']} ok, {s['throughput_tok_s']:.1f} tok/s, "
            f"KV util {s['kv_utilization_mean']}")
        write_json(res, out)
        if not a.no_baselines:
            if not a.no_hf:
                run["hf_transformers"] = hf_baseline(model, reqs, a.max_seqs)
                log(f"  HF generate: {run['hf_transformers']}")
                write_json(res, out)
        del model
        jax.clear_caches()
        gc.collect()
    print(f"\nServing, {res['env']['device']}: {a.requests} requests, Poisson {a.rate}/s, {lengths_desc(a)}, "
          f"{a.max_seqs} slots, block {a.block_size}, {a.dtype}")
    print(table(res["runs"]))
    print(f"wrote {write_json(res, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
