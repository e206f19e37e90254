"""Generation benchmark: decode tokens/s of the paged on-device loop vs a plain
JAX loop and Hugging Face transformers, same architecture and weights.

    python benchmarks/generate.py            # llama-1b preset, bf16, batch 1 and 16 (~3 min on an H100)
    python benchmarks/generate.py --quick    # tiny model on CPU: a smoke test of this script
    python benchmarks/generate.py --preset gpt2 --batches 1 8   # other presets / sizes

Model: a randomly initialised `--preset` (default llama-1b: 16 layers, width
2048, 32 query / 8 KV heads, head_dim 64, 32k vocab), bf16 parameters and
compute. Prompts: `--prompt-len` (128) random tokens per row; `--new-tokens`
(256) greedy tokens, no EOS (every row generates all of them).

Peers (same process, same prompts):
  paged   flashjax.serving.generate: flash prefill + paged KV cache + the whole
          decode loop in one jitted lax.while_loop (flashjax.paged_decode_attention)
  dense   flashjax.models.generate.DenseCacheSampler: jitted prefill and jitted
          one-token step (dense [L, B, len, kv_heads, d] cache, XLA attention)
          called from a Python loop, one host round trip per token; it samples
          with the paged loop's sampler (flashjax.serving.sampling)
  hf      transformers generate(): LlamaForCausalLM / GPT2LMHeadModel built
          from a config matching ours, our weights copied in, torch bf16 on the
          same GPU, do_sample=False, KV cache on; skipped (error string) if
          torch/transformers are missing

Timing (one timed run per cell, after a warm-up run that compiles):
  paged: generate(N) and generate(N/2 + 1) share one compilation (the output
         buffer is bucketed), so decode time per step = (t(N) - t(N/2+1)) /
         (N/2 - 1); prefill = t(N) - (N-1) * step.
  dense: the loop yields each token; prefill = time to the first token,
         step = (total - first) / (N - 1).
  hf:    prefill = generate(max_new_tokens=1); step = (t(N) - prefill) / (N - 1).
decode tok/s = batch / step; end-to-end tok/s = batch * N / total. "agree" is
how many leading greedy tokens of row 0 equal the paged engine's (bf16
rounding differs between implementations, so long greedy runs diverge).

Writes benchmarks/results/generate-<device>-<date>.json (device, versions,
config, results) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PEERS = {
    "paged": "flashjax.serving.generate (paged KV, flash prefill, on-device while_loop decode)",
    "engine": "flashjax.serving.engine.Engine (continuous batching, async multi-step decode), same prompts at t=0",
    "dense": "flashjax.models.generate.DenseCacheSampler (dense KV, jitted step, Python loop)",
    "hf": "transformers generate() (torch, same architecture and weights)",
}
QUICK = dict(preset="llama-nano", batches=(1, 2), prompt_len=16, new_tokens=8, dtype="float32",
             overrides=dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128, vocab_size=256,
                            max_seq_len=64))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, CPU smoke test")
    p.add_argument("--preset", default=None, help="model preset (default llama-1b)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 16)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 256)")
    p.add_argument("--dtype", default=None, help="parameter and compute dtype (default bfloat16)")
    p.add_argument("--block-size", type=int, default=16, help="paged KV block size (default 16)")
    p.add_argument("--decode-steps", type=int, default=8, help="engine: most decode steps per device call")
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generate-<device>-<date>.json)")
    args = p.parse_args(argv)
    q = QUICK if args.quick else dict(preset="llama-1b", batches=(1, 16), prompt_len=128, new_tokens=256,
                                      dtype="bfloat16", overrides={})
    args.preset = args.preset or q["preset"]
    args.batches = tuple(args.batches or q["batches"])
    args.prompt_len = args.prompt_len or q["prompt_len"]
    args.new_tokens = args.new_tokens or q["new_tokens"]
    args.dtype = args.dtype or q["dtype"]
    args.overrides = dict(q["overrides"]) if args.preset == q["preset"] else {}
    if args.new_tokens < 4:
        p.error("--new-tokens must be >= 4")
    return args


# ---------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------

def _cell(batch, peer, prefill_s, step_s, total_s, n, tokens0, ref0, **extra):
    agree = None
    if ref0 is not None and tokens0 is not None:
        agree = 0
        for a, b in zip(tokens0, ref0):
            if int(a) != int(b):
                break
            agree += 1
    return {"batch": batch, "peer": peer, "prefill_ms": prefill_s * 1e3,
            "step_ms": step_s * 1e3 if step_s > 0 else None,
            "decode_tok_s": batch / step_s if step_s > 0 else None, "total_s": total_s,
            "e2e_tok_s": batch * n / total_s, "agree": agree, **extra}


def bench_paged(model, prompts, n, args, ref0=None):
    import numpy as np

    from flashjax.serving import generate as G

    half = n // 2 + 1

    def run(m):
        t0 = time.perf_counter()
        toks, lens = G.generate(model, prompts, m, block_size=args.block_size)
        return time.perf_counter() - t0, toks, lens

    t_compile, _, _ = run(n)
    traces = G.trace_count()
    t_full, toks, lens = run(n)
    t_half, _, _ = run(half)
    if G.trace_count() != traces:  # a one-off retrace (jax config registered late): time again
        t_full, toks, lens = run(n)
        t_half, _, _ = run(half)
    assert (np.asarray(lens) == n).all(), lens
    step = (t_full - t_half) / (n - half)
    prefill = max(t_full - (n - 1) * step, 0.0)
    return _cell(len(prompts), "paged", prefill, step, t_full, n, toks[0], ref0,
                 compile_s=t_compile - t_full, method="t(N) - t(N/2+1), one compilation"), toks[0]


def bench_engine(model, prompts, n, args, ref0=None):
    """flashjax.serving.engine.Engine on the same prompts, all present at t=0 (run_until_done)."""
    from flashjax.serving.engine import Engine, RequestParams

    batch, plen = prompts.shape
    bs = args.block_size
    per_seq = -(-(plen + n) // bs) + 1
    chunk = 1 << max(4, (plen - 1).bit_length())
    rows = max(1, min(batch, 4096 // chunk))
    eng = Engine(model, num_blocks=per_seq * batch + 8, max_seqs=batch, block_size=bs,
                 max_num_batched_tokens=rows * chunk + batch, prefill_rows=rows, max_chunk=chunk,
                 chunk_buckets=(chunk,), prefix_caching=False, decode_steps=args.decode_steps)
    params = RequestParams(temperature=0, max_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    eng.warmup()
    eng.generate([p.tolist() for p in prompts[:2]], RequestParams(temperature=0, max_tokens=4, ignore_eos=True))
    compile_s = time.perf_counter() - t0
    calls0 = eng.stats_counters["device_calls"]
    t0 = time.perf_counter()
    m0 = time.monotonic()
    handles = [eng.add_request(p.tolist(), params) for p in prompts]
    eng.run_until_done()
    total = time.perf_counter() - t0
    outs = [h.result() for h in handles]
    assert all(len(o.outputs[0].token_ids) == n for o in outs)
    first = max(h.first_token_time for h in handles) - m0
    step = (total - first) / (n - 1)
    calls = eng.stats_counters["device_calls"] - calls0
    row0 = outs[0].outputs[0].token_ids
    eng.pages = None
    return _cell(batch, "engine", first, step, total, n, row0, ref0, compile_s=compile_s, device_calls=calls,
                 decode_steps=args.decode_steps,
                 method="Engine.run_until_done, all requests at t=0; step = (total - last first token) / (N-1)"), row0


def bench_dense(model, prompts, n, args, ref0=None):
    import numpy as np

    from flashjax.models.generate import DenseCacheSampler

    sampler = DenseCacheSampler(model)  # greedy, the shared sampler (flashjax.serving.sampling)
    ids = np.asarray(prompts, np.int32)

    def run():
        t0 = time.perf_counter()
        out = []
        first = None
        for tok in sampler.generate(ids, n):
            out.append(tok)
            if first is None:
                first = time.perf_counter() - t0
        return first, time.perf_counter() - t0, np.stack(out, 1)

    _, t_compile, _ = run()
    first, total, toks = run()
    step = (total - first) / (n - 1)
    return _cell(len(prompts), "dense", first, step, total, n, toks[0], ref0,
                 compile_s=t_compile - total, method="Python loop, time to first token + per-step"), toks[0]


def _hf_model(model, torch_dtype, device):
    """A transformers model with our config and weights."""
    import numpy as np
    import torch
    import transformers

    c = model.config

    def t(x, transpose=False):
        a = np.asarray(x[...], np.float32)
        return torch.from_numpy(np.ascontiguousarray(a.T if transpose else a))

    if c.family == "llama":
        hc = transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
            num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
            head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta,
            rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tied, attention_bias=c.bias, mlp_bias=c.bias)
        with torch.device(device):  # random init on the GPU: fast; our weights replace it
            hf = transformers.LlamaForCausalLM(hc)
        h, kvh, hd, ff = c.n_head, c.kv_heads, c.head_dim, c.ffn_dim
        sd = {"model.embed_tokens.weight": t(model.wte), "model.norm.weight": t(model.norm_f.scale)}
        if not c.tied:
            sd["lm_head.weight"] = t(model.lm_head, transpose=True)
        for i, blk in enumerate(model.blocks):
            p = f"model.layers.{i}."
            w = np.asarray(blk.attn.wqkv.kernel[...], np.float32)
            sd[p + "self_attn.q_proj.weight"] = torch.from_numpy(np.ascontiguousarray(w[:, : h * hd].T))
            sd[p + "self_attn.k_proj.weight"] = torch.from_numpy(np.ascontiguousarray(w[:, h * hd:(h + kvh) * hd].T))
            sd[p + "self_attn.v_proj.weight"] = torch.from_numpy(np.ascontiguousarray(w[:, (h + kvh) * hd:].T))
            sd[p + "self_attn.o_proj.weight"] = t(blk.attn.wo.kernel, transpose=True)
            w = np.asarray(blk.mlp.w_in.kernel[...], np.float32)
            sd[p + "mlp.gate_proj.weight"] = torch.from_numpy(np.ascontiguousarray(w[:, :ff].T))
            sd[p + "mlp.up_proj.weight"] = torch.from_numpy(np.ascontiguousarray(w[:, ff:].T))
            sd[p + "mlp.down_proj.weight"] = t(blk.mlp.w_out.kernel, transpose=True)
            sd[p + "input_layernorm.weight"] = t(blk.norm1.scale)
            sd[p + "post_attention_layernorm.weight"] = t(blk.norm2.scale)
    else:
        if c.kv_heads != c.n_head or not c.tied:
            raise NotImplementedError("GPT2LMHeadModel needs n_kv_head == n_head and tied embeddings")
        hc = transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layer,
            n_head=c.n_head, n_inner=c.ffn_dim, layer_norm_epsilon=c.norm_eps,
            activation_function="gelu_new")
        with torch.device(device):
            hf = transformers.GPT2LMHeadModel(hc)
        sd = {"transformer.wte.weight": t(model.wte), "transformer.wpe.weight": t(model.wpe),
              "transformer.ln_f.weight": t(model.norm_f.scale), "transformer.ln_f.bias": t(model.norm_f.bias)}
        for i, blk in enumerate(model.blocks):
            p = f"transformer.h.{i}."
            for ours, theirs in ((blk.norm1, "ln_1"), (blk.norm2, "ln_2")):
                sd[p + theirs + ".weight"] = t(ours.scale)
                sd[p + theirs + ".bias"] = t(ours.bias)
            for ours, theirs in ((blk.attn.wqkv, "attn.c_attn"), (blk.attn.wo, "attn.c_proj"),
                                 (blk.mlp.w_in, "mlp.c_fc"), (blk.mlp.w_out, "mlp.c_proj")):
                sd[p + theirs + ".weight"] = t(ours.kernel)  # Conv1D weights are [in, out] like ours
                sd[p + theirs + ".bias"] = t(ours.bias)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") and "attn.bias" not in m
               and "masked_bias" not in m and "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    hf = hf.to(device=device, dtype=torch_dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def bench_hf(model, prompts, n, args, ref0=None):
    import numpy as np
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    key = (id(model), device, dt)
    if _HF_CACHE.get("key") != key:
        _HF_CACHE.clear()
        _HF_CACHE.update(key=key, model=_hf_model(model, dt, device))
    hf = _HF_CACHE["model"]
    ids = torch.as_tensor(np.asarray(prompts, np.int64), device=device)
    mask = torch.ones_like(ids)

    def run(m):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=m, min_new_tokens=m,
                              do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out[:, ids.shape[1]:].cpu().numpy()

    run(min(n, 8))  # warm-up
    prefill, _ = run(1)
    total, toks = run(n)
    step = (total - prefill) / (n - 1)
    return _cell(len(prompts), "hf", prefill, step, total, n, toks[0], ref0,
                 method="generate(1) for prefill, generate(N) total",
                 versions={"torch": torch.__version__, "transformers": transformers.__version__},
                 torch_device=torch.cuda.get_device_name() if device == "cuda" else "cpu"), toks[0]


_HF_CACHE: dict = {}
BENCH = {"paged": bench_paged, "engine": bench_engine, "dense": bench_dense, "hf": bench_hf}


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(data) -> str:
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append([r["batch"], r["peer"], r["error"], "", "", "", "", "", ""])
            continue
        base = next((x for x in data["results"] if x["batch"] == r["batch"] and x["peer"] == "paged"
                     and "error" not in x), None)
        ratio = (r["e2e_tok_s"] / base["e2e_tok_s"]) if base else None
        rows.append([r["batch"], r["peer"], _fmt(r["decode_tok_s"], ",.0f"), _fmt(r["step_ms"], ".2f"),
                     _fmt(r["prefill_ms"], ".1f"), _fmt(r["e2e_tok_s"], ",.0f"), _fmt(r.get("compile_s"), ".1f"),
                     "-" if r.get("agree") is None else f"{r['agree']}/{data['config']['new_tokens']}",
                     _fmt(ratio, ".2f")])
    c = data["config"]
    head = (f"{c['preset']} ({c['params'] / 1e6:.0f}M params, {c['dtype']}), prompt {c['prompt_len']}, "
            f"{c['new_tokens']} new tokens, greedy; {data['device']}")
    return head + "\n\n" + common.markdown_table(
        ["batch", "peer", "decode tok/s", "ms/step", "prefill ms", "end-to-end tok/s", "compile s", "agree",
         "e2e / paged loop"], rows)


def run(args):
    import jax
    import numpy as np

    from flashjax.models.config import config_from_preset
    from flashjax.models.gpt import build_model

    info = common.env_info()
    for mod in ("torch", "transformers"):
        try:
            info["versions"][mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional peers
            info["versions"][mod] = None
    cfg = config_from_preset(args.preset, **args.overrides, dtype=args.dtype, param_dtype=args.dtype)
    t0 = time.perf_counter()
    model = build_model(cfg, seed=0)
    jax.block_until_ready(jax.tree.leaves(model))
    build_s = time.perf_counter() - t0
    data = {
        **info,
        "benchmark": "generate",
        "config": {
            "preset": args.preset, "overrides": args.overrides, "model": cfg.to_dict(), "params": cfg.param_count(),
            "dtype": args.dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "batches": list(args.batches), "block_size": args.block_size, "sampling": "greedy, no EOS",
            "weights": "random init (seed 0), copied into the HF model", "build_s": round(build_s, 1),
            "peers": {k: PEERS[k] for k in args.peers},
        },
        "results": [],
    }
    path = args.out or common.results_path("generate", info["device"], quick=args.quick)
    print(f"generate benchmark on {info['device']} ({jax.default_backend()}), jax {jax.__version__}: "
          f"{args.preset} ({cfg.param_count() / 1e6:.0f}M params, {args.dtype}, built in {build_s:.1f}s), "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens", flush=True)
    rng = np.random.default_rng(0)
    for batch in args.batches:
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        ref0 = None
        for peer in args.peers:
            t0 = time.perf_counter()
            try:
                cell, row0 = BENCH[peer](model, prompts, args.new_tokens, args, ref0)
                if peer == "paged":
                    ref0 = row0
            except Exception as exc:  # noqa: BLE001 - recorded in the table
                cell = {"batch": batch, "peer": peer, "error": common.describe_error(exc)}
            cell["wall_s"] = round(time.perf_counter() - t0, 1)
            data["results"].append(cell)
            msg = cell.get("error") or (
                f"decode {_fmt(cell['decode_tok_s'], ',.0f')} tok/s ({_fmt(cell['step_ms'], '.2f')} ms/step), "
                f"prefill {_fmt(cell['prefill_ms'], '.1f')} ms, e2e {_fmt(cell['e2e_tok_s'], ',.0f')} tok/s")
            print(f"  batch {batch:>3} {peer:<6} {msg}  ({cell['wall_s']}s)", flush=True)
            common.write_json(data, path)  # partial results survive a crash
            gc.collect()
    return data, str(common.write_json(data, path))


def main(argv=None) -> int:
    args = parse_args(argv)
    data, path = run(args)
    print()
    print(table(data))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
