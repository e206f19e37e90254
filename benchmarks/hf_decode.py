"""Decode speed of a 7B-shaped Mistral checkpoint: flashjax vs Hugging Face `generate`.

    python benchmarks/hf_decode.py           # GPU: 7B shapes, bf16 (~3 min on an H100)
    python benchmarks/hf_decode.py --quick   # tiny model on CPU (smoke test)

Model: Mistral-7B shapes (32 layers, width 4096, 32 query / 8 KV heads, FFN 14336,
vocab 32000, untied lm_head, sliding window 4096 as in v0.1), random weights, bf16.
The HF model is built with random weights directly on the GPU
(`AutoModelForCausalLM.from_config(..., dtype=torch.bfloat16)` under
`torch.device("cuda")`), saved with `save_pretrained` (safetensors), and
flashjax loads that directory with `flashjax.models.from_pretrained`, so both
run the same weights (the load time and host peak RSS are recorded too).

Batch 1, a 128-token random prompt, 128 new tokens, greedy. Engines:
  ours_paged  flashjax.serving.generate.generate: paged KV cache, flash prefill,
              the decode loop on the device (when flashjax.serving has it)
  ours_dense  flashjax.models.generate.DenseCacheSampler: dense cache, a jitted
              step per token driven from Python
  hf          transformers `generate` (do_sample=False, default dynamic cache, sdpa)
Each engine is timed generating 128 tokens and generating 1 token (prefill plus
the first token); decode tokens/s = 127 / (t_128 - t_1). Medians over --reps.

Bandwidth limit: each decoded token reads every weight once except the input
embedding table (one row), so the limit is bytes / bandwidth tokens/s, with
3.0e12 B/s (H100 HBM3 read, nominal) and with the device copy bandwidth
measured in the same run (read+write of a 2 GiB buffer, as benchmarks/decode.py).
The sliding window (4096) is longer than the 256-token context, so it changes
nothing here (from_pretrained drops it).

A step that fails records its error string in the JSON instead of a number.
Results: benchmarks/results/hf_decode-<device>-<date>.json (and a Markdown table).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
NOMINAL_BW = 3.0e12  # B/s

ENGINES = {
    "ours_paged": "flashjax.serving.generate.generate (paged KV, flash prefill, on-device decode loop)",
    "ours_dense": "flashjax.models.generate.DenseCacheSampler (dense KV, jitted step per token)",
    "hf": "transformers generate (greedy, dynamic cache, sdpa attention)",
}


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_engine(run, n_new: int, reps: int) -> dict:
    """run(n) generates n tokens (blocking) and returns them. First calls compile/warm up."""
    t0 = time.perf_counter()
    tokens = run(n_new)
    first_s = time.perf_counter() - t0
    run(1)
    full = _median_time(lambda: run(n_new), reps)
    one = _median_time(lambda: run(1), reps)
    decode = (n_new - 1) / (full - one) if full > one else float("nan")
    return {"first_call_s": round(first_s, 2), "t_full_s": full, "t_prefill_s": one,
            "decode_tok_s": decode, "ms_per_token": 1e3 / decode, "e2e_tok_s": n_new / full,
            "tokens": [int(t) for t in tokens]}


def hf_phase(hf_cfg: dict, prompt, n_new: int, reps: int, out_dir: str, *, device: str, save: bool) -> dict:
    """Build the HF model with random weights on `device`, save it, time its generate."""
    import torch
    import transformers

    res: dict = {}
    torch.manual_seed(0)
    config = transformers.MistralConfig(**hf_cfg)
    t0 = time.perf_counter()
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    res["init_s"] = round(time.perf_counter() - t0, 1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if save:
        t0 = time.perf_counter()
        model.save_pretrained(out_dir, safe_serialization=True)
        res["save_s"] = round(time.perf_counter() - t0, 1)
    ids = torch.tensor(prompt, dtype=torch.long, device=device)[None]

    def run(n):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return out[0, ids.shape[1]:].tolist()

    try:
        res["timing"] = time_engine(run, n_new, reps)
    except Exception as e:  # noqa: BLE001
        res["timing"] = common.describe_error(e)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


class RssSampler:
    """Peak resident memory (GB) of this process while active, sampled every 20 ms from /proc.

    rss: all resident pages (includes the memory-mapped checkpoint's page cache);
    anon: anonymous pages only (host buffers: what a loader allocates itself).
    """

    def __init__(self):
        import threading

        self.peak = {"rss": 0.0, "anon": 0.0}
        self.start_values = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict:
        out = {}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    key, _, val = line.partition(":")
                    if key in ("VmRSS", "RssAnon"):
                        out["rss" if key == "VmRSS" else "anon"] = int(val.split()[0]) / 2**20
        except OSError:
            pass
        return out

    def _run(self):
        while not self._stop.is_set():
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ours_phase(path: str, prompt, n_new: int, reps: int, engines: list[str]) -> dict:
    import numpy as np

    from flashjax.models import from_pretrained
    from flashjax.models.generate import DenseCacheSampler

    res: dict = {}
    ctx = len(prompt) + n_new
    import jax
    from flax import nnx

    with RssSampler() as mem:
        t0 = time.perf_counter()
        model, _ = from_pretrained(path, max_seq_len=ctx)  # dtype: the checkpoint's (bf16)
        params = jax.tree.leaves(nnx.state(model))
        jax.block_until_ready(params)
        res["load_s"] = round(time.perf_counter() - t0, 1)
    res["host_memory_gb"] = {
        "before_load": {k: round(v, 2) for k, v in mem.start_values.items()},
        "peak_during_load": {k: round(v, 2) for k, v in mem.peak.items()},
    }
    anon = mem.peak["anon"] - mem.start_values.get("anon", 0.0)
    res["config"] = model.config.to_dict()
    print(f"# from_pretrained: {res['load_s']} s, host anonymous memory +{anon:.2f} GB at peak "
          f"({model.config.dtype}, attention {model.config.attention}, sliding_window "
          f"{model.config.sliding_window})", flush=True)
    if "ours_paged" in engines:
        try:
            from flashjax.serving.generate import generate as paged_generate

            def run_paged(n):
                toks, lens = paged_generate(model, [list(prompt)], n, None)
                return np.asarray(toks)[0, : int(lens[0])].tolist()

            res["ours_paged"] = time_engine(run_paged, n_new, reps)
        except Exception as e:  # noqa: BLE001
            res["ours_paged"] = common.describe_error(e)
    if "ours_dense" in engines:
        try:
            sampler = DenseCacheSampler(model)  # greedy, the shared sampler (flashjax.serving.sampling)

            def run_dense(n):
                return [int(t[0]) for t in sampler.generate(np.asarray(prompt)[None], n)]

            res["ours_dense"] = time_engine(run_dense, n_new, reps)
        except Exception as e:  # noqa: BLE001
            res["ours_dense"] = common.describe_error(e)
    param_bytes = sum(x.size * x.dtype.itemsize for x in params)
    res["param_bytes"] = int(param_bytes)
    res["bytes_per_token"] = int(param_bytes - model.wte[...].size * model.wte[...].dtype.itemsize)
    del model, params
    return res


def copy_bandwidth(nbytes: int) -> dict:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    timing = common.time_call(jax.jit(lambda x: -x), (x,), warmup=2, reps=10)
    del x
    return {"bytes": nbytes, "ms": timing["ms"], "tb_s": 2 * nbytes / (timing["ms"] * 1e-3) / 1e12}


def agreement(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(args) -> dict:
    import numpy as np

    from flashjax import _backend

    info = common.env_info()
    for mod in ("torch", "transformers"):
        try:
            info["versions"][mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info["versions"][mod] = common.describe_error(e)
    gpu = _backend.on_gpu()
    hf_cfg = dict(QUICK if args.quick else MISTRAL_7B)
    n_prompt = args.prompt_len or (8 if args.quick else 128)
    n_new = args.new_tokens or (8 if args.quick else 128)
    reps = args.reps or (1 if args.quick else 3)
    engines = args.engines or list(ENGINES)
    prompt = np.random.RandomState(0).randint(0, hf_cfg["vocab_size"], n_prompt).tolist()
    print(f"# hf_decode on {info['device']} ({info['backend']}): Mistral "
          f"{'tiny' if args.quick else '7B'} shapes, bf16, batch 1, prompt {n_prompt}, {n_new} new tokens",
          flush=True)
    start = time.perf_counter()
    data: dict = {**info, "benchmark": "hf_decode", "quick": bool(args.quick), "hf_config": hf_cfg,
                  "prompt_len": n_prompt, "new_tokens": n_new, "batch": 1, "reps": reps,
                  "engines_desc": {e: ENGINES[e] for e in engines}}
    data["copy_bandwidth"] = copy_bandwidth(2 << 30) if gpu else None
    if data["copy_bandwidth"]:
        print(f"# device copy bandwidth (read+write): {data['copy_bandwidth']['tb_s']:.3f} TB/s", flush=True)

    tmp = tempfile.mkdtemp(prefix="hf_decode-", dir=args.tmpdir)
    try:
        try:
            hf = hf_phase(hf_cfg, prompt, n_new, reps, tmp, device="cuda" if gpu else "cpu", save=True)
        except Exception as e:  # noqa: BLE001
            hf = {"timing": common.describe_error(e)}
        data["hf"] = hf
        print(f"# hf: init {hf.get('init_s')} s, save {hf.get('save_s')} s", flush=True)
        try:
            ours = ours_phase(tmp, prompt, n_new, reps, [e for e in engines if e != "hf"])
        except Exception as e:  # noqa: BLE001
            ours = {"error": common.describe_error(e)}
        data["ours"] = ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    per_token = data["ours"].get("bytes_per_token")
    limits = {}
    if per_token:
        limits["nominal_3.0TB/s"] = NOMINAL_BW / per_token
        if data["copy_bandwidth"]:
            limits["measured_copy"] = data["copy_bandwidth"]["tb_s"] * 1e12 / per_token
    data["bandwidth_limit_tok_s"] = limits

    rows = []
    results = {"ours_paged": data["ours"].get("ours_paged"), "ours_dense": data["ours"].get("ours_dense"),
               "hf": data["hf"].get("timing")}
    hf_tokens = results["hf"].get("tokens") if isinstance(results["hf"], dict) else None
    for name in engines:
        r = results.get(name)
        if r is None:
            continue
        if isinstance(r, str):
            rows.append([name, r, "", "", "", "", ""])
            continue
        frac = r["decode_tok_s"] / limits["nominal_3.0TB/s"] if limits else float("nan")
        frac_copy = r["decode_tok_s"] / limits["measured_copy"] if "measured_copy" in limits else None
        same = agreement(r["tokens"], hf_tokens) if hf_tokens else None
        r["greedy_prefix_equal_to_hf"] = same
        rows.append([
            name, f"{r['decode_tok_s']:.1f}", f"{r['ms_per_token']:.2f}", f"{1e3 * r['t_prefill_s']:.1f}",
            f"{r['e2e_tok_s']:.1f}",
            f"{100 * frac:.0f}%" + (f" / {100 * frac_copy:.0f}%" if frac_copy is not None else ""),
            "" if same is None else f"{same}/{n_new}",
        ])
    headers = ["engine", "decode tok/s", "ms/token", "prefill+1st ms", "end-to-end tok/s",
               "% of BW limit (3.0 TB/s / copy)", "greedy = hf"]
    md = common.markdown_table(headers, rows)
    lim = ", ".join(f"{k} {v:.0f} tok/s" for k, v in limits.items())
    md += f"\n\nbandwidth limit ({per_token / 1e9:.2f} GB read per token): {lim}" if per_token else ""
    print()
    print(md)
    data["markdown"] = md
    data["elapsed_s"] = round(time.perf_counter() - start, 1)
    return data


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, CPU smoke test")
    p.add_argument("--engines", nargs="+", choices=list(ENGINES), help="subset of engines (default: all)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 128; 8 with --quick)")
    p.add_argument("--new-tokens", type=int, help="generated tokens (default 128; 8 with --quick)")
    p.add_argument("--reps", type=int, help="timed runs per measurement, median (default 3; 1 with --quick)")
    p.add_argument("--tmpdir", help="where the HF checkpoint is written (default: the system temp dir)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/hf_decode-<device>-<date>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    data = run(args)
    path = args.out or common.results_path("hf_decode", data["device"], quick=args.quick)
    common.write_json(data, path)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
