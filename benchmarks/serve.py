"""Serving benchmark: the continuous-batching server under seeded Poisson arrivals.

    python benchmarks/serve.py --quick                      # CPU smoke (tiny random model)
    python benchmarks/serve.py --preset nano --requests 200 --rate 20
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
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, results_path, write_json  # noqa: E402


def workload(n, rate, seed, prompt_lens, output_lens, vocab):
    rs = np.random.RandomState(seed)
    gaps = rs.exponential(1.0 / rate, size=n)
    arrivals = np.cumsum(gaps) - gaps[0]
    reqs = []
    for i in range(n):
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

    async with httpx.AsyncClient(base_url=base, timeout=600) as c:
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


def static_baseline(model, reqs, batch, block_size):
    """Batches of `batch` requests in arrival order; a batch starts when its last request
    has arrived and the previous batch is done; tokens arrive when the batch ends."""
    from flashjax.serving.generate import generate

    def run(group):
        return generate(model, [r["prompt"] for r in group], max(r["max_tokens"] for r in group),
                        block_size=block_size)

    run(reqs[:batch])  # compile outside the clock (same shapes are bucketed)
    clock = 0.0
    ttft, useful = [], 0
    busy = 0.0
    for i in range(0, len(reqs), batch):
        group = reqs[i:i + batch]
        start = max(clock, max(r["arrival"] for r in group))
        t = time.perf_counter()
        run(group)
        dt = time.perf_counter() - t
        busy += dt
        clock = start + dt
        ttft += [clock - r["arrival"] for r in group]
        useful += sum(r["max_tokens"] for r in group)
    return {"batch": batch, "makespan_s": clock, "throughput_tok_s": useful / clock, "busy_s": busy,
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, a dozen requests")
    p.add_argument("--preset", default="nano")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0, help="mean arrivals per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-lens", default="16,64,128,256")
    p.add_argument("--output-lens", default="32,64,128")
    p.add_argument("--max-seqs", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.requests, a.rate, a.prompt_lens, a.output_lens = 12, 4.0, "4,9,17", "4,8"
        a.max_seqs, a.block_size, a.max_num_batched_tokens = 4, 8, 32

    from flashjax.models.config import config_from_preset
    from flashjax.models.gpt import build_model
    from flashjax.serving.engine import Engine

    tok = None
    if a.checkpoint:
        from flashjax.serving.server import load_for_serving
        model, tok, _ = load_for_serving(a.checkpoint)
    elif a.quick:
        model = build_model(config_from_preset("nano", n_layer=2, d_model=64, n_head=4, vocab_size=256,
                                               max_seq_len=64, attention="xla"), 0)
    else:
        model = build_model(config_from_preset(a.preset), 0)
    cfg = model.config
    pl = [int(x) for x in a.prompt_lens.split(",")]
    ol = [int(x) for x in a.output_lens.split(",")]
    reqs = workload(a.requests, a.rate, a.seed, pl, ol, cfg.vocab_size)
    engine = None
    srv = None
    base = a.url
    if base is None:
        import uvicorn

        from flashjax.serving.server import create_app
        per_seq = -(-cfg.max_seq_len // a.block_size)
        engine = Engine(model, tokenizer=tok, num_blocks=a.num_blocks or per_seq * a.max_seqs, max_seqs=a.max_seqs,
                        block_size=a.block_size, max_num_batched_tokens=a.max_num_batched_tokens,
                        max_chunk=min(a.max_num_batched_tokens, 256), max_waiting=None)
        engine.warmup()
        app = create_app(engine, tok)
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        # warm-up: compile the step variants outside the clock
        asyncio.run(run_client(base, workload(4, 100.0, a.seed + 1, pl, ol, cfg.vocab_size)))
    res = {"env": env_info(), "args": vars(a), "server": asyncio.run(run_client(base, reqs))}
    if engine is not None:
        res["engine_stats"] = engine.stats()
    if not a.no_baselines:
        res["static_batching"] = static_baseline(model, reqs, a.max_seqs, a.block_size)
        res["hf_transformers"] = hf_baseline(model, reqs, a.max_seqs)
    if srv is not None:
        srv.should_exit = True
        engine.stop()
    out = Path(a.out) if a.out else results_path("serve", res["env"]["device"], quick=a.quick)
    write_json(res, out)
    s = res["server"]
    print(f"server: {s['ok']}/{s['requests']} ok, {s['throughput_tok_s']:.1f} tok/s, TTFT p50 {s['ttft_p50_s']:.3f}s "
          f"p99 {s['ttft_p99_s']:.3f}s, TPOT p50 {s['tpot_p50_s']}, KV util {s['kv_utilization_mean']}")
    if "static_batching" in res:
        print(f"static batching: {res['static_batching']['throughput_tok_s']:.1f} tok/s; "
              f"HF: {res['hf_transformers']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
