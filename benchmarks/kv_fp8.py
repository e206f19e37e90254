"""FP8 KV cache accuracy: logit error and greedy agreement of an FP8 (e4m3) cache
against a bf16 cache (and of both against a float32 cache), same model, same prompts.

    python benchmarks/kv_fp8.py --quick                        # tiny random Llama on CPU (~1-2 min)
    python benchmarks/kv_fp8.py                                # GPU: llama-1b, random weights, bf16
    python benchmarks/kv_fp8.py --presets llama-1b llama-7b    # more presets
    python benchmarks/kv_fp8.py --checkpoint runs/nano-stdlib  # the main job's trained model (also HF dirs)

Caches: "fp32" (float32 pages: the reference), "bf16" (the serving default of a bf16
model) and "fp8" (float8_e4m3fn pages, one float32 scale per token and KV head:
`flashjax.kv_cache.quantize_fp8`). Per model:

  teacher-forced logits: the prompt is prefilled in one chunk that reads its own K/V
    back from the cache (the engine's chunked-prefill path, `continuation=True`), then
    the bf16 cache's greedy continuation is fed one decode step at a time (the paged
    decode kernel). At every position each cache's logits are compared with a reference
    cache's: max |diff|, relative L2 error of the (per-row centred) logits, KL(ref || cache)
    in nats, and top-1 agreement. Rows: bf16 vs fp32, fp8 vs fp32, fp8 vs bf16.
  greedy agreement, free running: N greedy tokens from the one-jit loop
    (`flashjax.serving.generate`, whose prefill attends to the prompt's unquantized K/V)
    and from the engine (`Engine`, chunked prefill: every attention reads the cache),
    compared with the reference cache's tokens: the fraction of positions equal
    ("agree"), the mean common prefix / N ("prefix"), and identical rows ("rows").
    Greedy runs diverge for good after the first different token, so "agree" and
    "prefix" are close; teacher-forced top-1 is the per-step rate.
  memory: KV bytes per token (all layers, padded head_dim, scales included) and how many
    more sequences fit in the same memory than with bf16.

Random weights (the preset's init_std unless --init-std) give flat, sometimes degenerate
next-token distributions: "distinct" (mean distinct tokens per greedy row of the bf16
cache) and "echo" (rows whose first new token repeats the prompt's last) say how much a
model's greedy agreement is worth. A trained checkpoint is the meaningful case.

Results: benchmarks/results/kv_fp8-<device>-<date>.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CACHES = ("fp32", "bf16", "fp8")
COMPARISONS = (("bf16", "fp32"), ("fp8", "fp32"), ("fp8", "bf16"))  # (cache, reference)
# --quick: a 2-layer llama-nano; init_std 0.1 so that its greedy tokens depend on the context
# (at the preset's 0.02 a tiny random model repeats the prompt's last token)
QUICK = dict(presets=["llama-nano"], batch=4, prompt_len=16, new_tokens=8, dtype="float32",
             overrides=dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128, vocab_size=256,
                            max_seq_len=64, init_std=0.1))
FULL = dict(presets=["llama-1b"], batch=16, prompt_len=256, new_tokens=128, dtype="bfloat16", overrides={})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random Llama, CPU smoke run")
    p.add_argument("--presets", nargs="*", default=None,
                   help="random-weight presets (default llama-1b; none with --checkpoint unless given)")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="a trained flashjax checkpoint / run dir or HF model dir (repeatable); prompts are "
                        "windows of Python standard-library source, the main job's corpus")
    p.add_argument("--batch", type=int, default=None, help="prompts (default 16; 4 with --quick)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 256; 16 with --quick)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens (default 128; 8 with --quick)")
    p.add_argument("--dtype", default=None, help="random models' parameter and compute dtype (default bfloat16; "
                                                 "float32 with --quick)")
    p.add_argument("--init-std", type=float, default=None, help="random models' init_std (default: the preset's)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size (default 16)")
    p.add_argument("--no-engine", action="store_true", help="skip the engine's greedy runs")
    p.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES),
                   help="caches to run (default all: fp32 bf16 fp8); comparisons need both of their caches")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kv_fp8-<device>-<date>.json)")
    args = p.parse_args(argv)
    d = QUICK if args.quick else FULL
    if args.presets is None:
        args.presets = [] if args.checkpoint else list(d["presets"])
    args.batch = args.batch or d["batch"]
    args.prompt_len = args.prompt_len or d["prompt_len"]
    args.new_tokens = args.new_tokens or d["new_tokens"]
    args.dtype = args.dtype or d["dtype"]
    args.overrides = dict(d["overrides"]) if args.quick else {}
    for name in ("batch", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2")
    if not args.presets and not args.checkpoint:
        p.error("nothing to measure: give --presets and/or --checkpoint")
    args.caches = [c for c in CACHES if c in args.caches]
    args.comparisons = [(c, ref) for c, ref in COMPARISONS if c in args.caches and ref in args.caches]
    if "bf16" not in args.caches:
        p.error("--caches must include bf16 (its greedy tokens are the teacher-forced continuation)")
    if not args.comparisons:
        p.error(f"--caches {' '.join(args.caches)}: nothing to compare (give two of fp32 bf16 fp8)")
    return args


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------

def _teacher_forced_impl(params, tokens, *, graphdef, prompt_len, cache, block_size):
    """Logits [B, T - 1, V] (float32) at every position but the last of `tokens` [B, T]:
    the prompt in one chunked-prefill call that reads the cache, then one decode step
    per token."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flashjax.serving import runner as R

    model = nnx.merge(graphdef, params)
    B, T = tokens.shape
    blocks = -(-T // block_size)
    pages, state = R.init_cache(model.config, num_blocks=B * blocks, max_seqs=B, block_size=block_size,
                                max_blocks_per_seq=blocks, dtype=cache)
    seq = jnp.arange(B, dtype=jnp.int32)
    logits, pages, state = R.prefill(model, pages, state, tokens[:, :prompt_len], seq,
                                     jnp.full((B,), prompt_len, jnp.int32), continuation=True,
                                     kv_len=prompt_len, all_logits=True)

    def step(carry, tok):
        pages, state = carry
        lg, pages, state = R.decode(model, pages, state, tok, seq)
        return (pages, state), lg

    (_, state), rest = jax.lax.scan(step, (pages, state), tokens[:, prompt_len:T - 1].T)
    return jnp.concatenate([logits, jnp.moveaxis(rest, 0, 1)], axis=1), state.status


def _compare_impl(x, ref):
    """Per-position errors of logits x against ref ([B, T, V] float32)."""
    import jax
    import jax.numpy as jnp

    xc = x - x.mean(-1, keepdims=True)
    rc = ref - ref.mean(-1, keepdims=True)
    lr, lx = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(x, -1)
    return {
        "max_abs": jnp.max(jnp.abs(x - ref), -1),
        "rel_l2": jnp.linalg.norm(xc - rc, axis=-1) / jnp.maximum(jnp.linalg.norm(rc, axis=-1), 1e-30),
        "kl": jnp.sum(jnp.exp(lr) * (lr - lx), -1),
        "top1": (jnp.argmax(x, -1) == jnp.argmax(ref, -1)).astype(jnp.float32),
    }


@functools.lru_cache(maxsize=None)
def _jitted():
    """(teacher_forced, compare), jitted once (jax is imported when a run starts, not at import)."""
    import jax

    return (jax.jit(_teacher_forced_impl, static_argnames=("graphdef", "prompt_len", "cache", "block_size")),
            jax.jit(_compare_impl))


def teacher_forced(model, prompts, continuation, args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, params = nnx.split(model)
    _teacher_forced, _compare = _jitted()
    tokens = jnp.asarray(np.concatenate([prompts, continuation], 1), jnp.int32)
    logits = {}
    for cache in args.caches:
        lg, status = _teacher_forced(params, tokens, graphdef=graphdef, prompt_len=prompts.shape[1],
                                     cache=cache, block_size=args.block_size)
        if int(status) != 0:
            raise RuntimeError(f"KV cache allocation failed in the {cache} run (status {int(status)})")
        logits[cache] = jax.block_until_ready(lg)
    out = {}
    for cache, ref in args.comparisons:
        m = jax.device_get(_compare(logits[cache], logits[ref]))
        out[f"{cache}_vs_{ref}"] = {
            "max_abs": float(m["max_abs"].max()), "rel_l2_mean": float(m["rel_l2"].mean()),
            "rel_l2_max": float(m["rel_l2"].max()), "kl_mean": float(m["kl"].mean()),
            "kl_max": float(m["kl"].max()), "top1": float(m["top1"].mean()),
            "positions": int(m["top1"].size),
        }
    del logits
    return out


def agreement(toks, ref):
    import numpy as np

    toks, ref = np.asarray(toks), np.asarray(ref)
    eq = toks == ref
    n = eq.shape[1]
    prefix = np.array([n if r.all() else int(np.argmin(r)) for r in eq])
    return {"agree": float(eq.mean()), "prefix": float(prefix.mean() / n), "rows": float(eq.all(1).mean()),
            "first_divergence": [int(x) for x in prefix]}


def greedy_loop(model, prompts, args):
    from flashjax.serving.generate import generate

    return {c: generate(model, prompts, args.new_tokens, block_size=args.block_size, kv_cache_dtype=c)[0]
            for c in args.caches}


def greedy_engine(model, prompts, args):
    import numpy as np

    from flashjax.serving.engine import Engine, RequestParams

    B, P = prompts.shape
    bs = args.block_size
    per_seq = -(-(P + args.new_tokens) // bs) + 1
    chunk = max(16, min(128, 1 << max(0, (P - 1).bit_length() - 1)))  # >= 2 chunks per prompt
    out = {}
    for c in args.caches:
        eng = Engine(model, kv_cache_dtype=c, num_blocks=per_seq * B + 8, max_seqs=B, block_size=bs,
                     max_num_batched_tokens=4 * chunk + B, prefill_rows=4, max_chunk=chunk, chunk_buckets=(chunk,),
                     prefix_caching=False)
        res = eng.generate([p.tolist() for p in prompts],
                           RequestParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True))
        out[c] = np.array([r.outputs[0].token_ids for r in res])
        eng.pages = None
        del eng
        gc.collect()
    return out, chunk


def memory(config, block_size):
    from flashjax.serving import runner as R

    per_token = {}
    for c in CACHES:
        pages = R.init_pages(config.replace(n_layer=1), 1, block_size, c)
        per_token[c] = config.n_layer * sum(x.size * x.dtype.itemsize for x in pages[0]) // block_size
    return {"kv_bytes_per_token": per_token,
            "sequences_vs_bf16": {c: per_token["bf16"] / per_token[c] for c in CACHES}}


def measure(name, model, prompts, args, extra):
    import numpy as np

    cfg = model.config
    t0 = time.perf_counter()
    loop = greedy_loop(model, prompts, args)
    ref_toks = loop["bf16"]
    r = {"model": name, **extra, "config": cfg.to_dict(), "params": cfg.param_count(),
         "batch": int(prompts.shape[0]), "prompt_len": int(prompts.shape[1]), "new_tokens": args.new_tokens,
         "memory": memory(cfg, args.block_size)}
    r["diversity"] = {"distinct": float(np.mean([len(set(row.tolist())) for row in ref_toks])),
                      "echo": float(np.mean(ref_toks[:, 0] == prompts[:, -1]))}
    r["greedy_loop"] = {f"{c}_vs_{ref}": agreement(loop[c], loop[ref]) for c, ref in args.comparisons}
    r["teacher_forced"] = teacher_forced(model, prompts, ref_toks, args)
    if not args.no_engine:
        eng, chunk = greedy_engine(model, prompts, args)
        r["greedy_engine"] = {f"{c}_vs_{ref}": agreement(eng[c], eng[ref]) for c, ref in args.comparisons}
        r["greedy_engine"]["chunk"] = chunk
        r["greedy_engine"]["engine_vs_loop_bf16"] = agreement(eng["bf16"], loop["bf16"])
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    return r


# ---------------------------------------------------------------------------
# Models and prompts
# ---------------------------------------------------------------------------

def random_model(preset, args):
    from flashjax.models.config import config_from_preset
    from flashjax.models.gpt import build_model

    kw = dict(args.overrides, dtype=args.dtype, param_dtype=args.dtype)
    if args.init_std is not None:
        kw["init_std"] = args.init_std
    cfg = config_from_preset(preset, **kw)
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt {args.prompt_len} + {args.new_tokens} new tokens exceed {preset}'s context "
                         f"of {cfg.max_seq_len}")
    return build_model(cfg, seed=0)


def text_prompts(tokenizer, vocab, batch, length, seed=0):
    """`batch` windows of `length` tokens of standard-library source (the main job's corpus)."""
    import numpy as np

    from flashjax.models.data import stdlib_files

    rng = np.random.default_rng(seed)
    files = stdlib_files()
    out = []
    for i in rng.permutation(len(files)):
        try:
            ids = tokenizer.encode(files[i].read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
        if len(ids) >= length:
            start = int(rng.integers(0, len(ids) - length + 1))
            window = [t if 0 <= t < vocab else 0 for t in ids[start:start + length]]
            out.append(window)
        if len(out) == batch:
            return np.asarray(out, np.int32)
    raise ValueError(f"the standard library has fewer than {batch} files of >= {length} tokens")


def table(data) -> str:
    rows = []
    for r in data["models"]:
        if "error" in r:
            rows.append([r["model"], r["error"][:60]] + [""] * 9)
            continue
        mem = r["memory"]
        for c, ref in COMPARISONS:
            key = f"{c}_vs_{ref}"
            if key not in r["teacher_forced"]:
                continue
            tf = r["teacher_forced"][key]
            gl = r["greedy_loop"][key]
            ge = r.get("greedy_engine", {}).get(key)
            rows.append([r["model"], f"{c} vs {ref}", f"{mem['kv_bytes_per_token'][c]:,}",
                         f"{mem['sequences_vs_bf16'][c]:.2f}", f"{tf['max_abs']:.3g}",
                         f"{100 * tf['rel_l2_mean']:.2f}%", f"{tf['kl_mean']:.2e}", f"{100 * tf['top1']:.1f}%",
                         f"{100 * gl['agree']:.1f}% / {100 * gl['rows']:.0f}%",
                         "-" if ge is None else f"{100 * ge['agree']:.1f}% / {100 * ge['rows']:.0f}%",
                         f"{r['diversity']['distinct']:.1f} / {r['diversity']['echo']:.2f}"])
    return common.markdown_table(
        ["model", "cache vs reference", "KV B/token", "seqs x bf16", "logit max |err|", "logit rel err",
         "KL (nats)", "top-1 (forced)", "greedy loop: agree / rows", "greedy engine: agree / rows",
         "distinct / echo"], rows)


def run(args):
    import jax
    import numpy as np

    info = common.env_info()
    data = {**info, "benchmark": "kv_fp8", "quick": bool(args.quick),
            "config": {"batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                       "block_size": args.block_size, "caches": list(args.caches), "sampling": "greedy, no EOS",
                       "comparisons": [f"{c} vs {ref}" for c, ref in args.comparisons]},
            "models": []}
    path = args.out or common.results_path("kv_fp8", info["device"], quick=args.quick)
    print(f"kv_fp8 accuracy on {info['device']} ({jax.default_backend()}), jax {jax.__version__}: batch "
          f"{args.batch}, prompt {args.prompt_len}, {args.new_tokens} greedy tokens", flush=True)
    jobs = [("preset", p) for p in args.presets] + [("checkpoint", c) for c in args.checkpoint]
    for kind, what in jobs:
        t0 = time.perf_counter()
        try:
            if kind == "preset":
                model = random_model(what, args)
                prompts = np.random.default_rng(0).integers(
                    0, model.config.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
                extra = {"weights": f"random (seed 0, init_std {model.config.init_std})", "dtype": args.dtype,
                         "prompts": "random token ids (seed 0)"}
            else:
                from flashjax.models.generate import load_model

                model, tok, _ = load_model(what)
                if args.prompt_len + args.new_tokens > model.config.max_seq_len:
                    raise ValueError(f"prompt {args.prompt_len} + {args.new_tokens} new tokens exceed the "
                                     f"checkpoint's context of {model.config.max_seq_len}")
                prompts = text_prompts(tok, model.config.vocab_size, args.batch, args.prompt_len)
                extra = {"weights": f"checkpoint {what}", "dtype": model.config.dtype,
                         "prompts": "windows of Python standard-library source"}
            r = measure(what, model, prompts, args, extra)
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            r = {"model": what, "error": common.describe_error(exc)}
        model = None
        gc.collect()
        data["models"].append(r)
        if "error" in r:
            print(f"  {what}: {r['error']}", flush=True)
        else:
            c, ref = args.comparisons[-1]  # fp8 vs bf16 when both ran
            tf = r["teacher_forced"][f"{c}_vs_{ref}"]
            print(f"  {what}: {c} vs {ref} cache: logit rel err {100 * tf['rel_l2_mean']:.2f}%, top-1 (forced) "
                  f"{100 * tf['top1']:.1f}%, greedy agreement {100 * r['greedy_loop'][f'{c}_vs_{ref}']['agree']:.1f}% "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        common.write_json(data, path)  # partial results survive a crash
    data["markdown"] = table(data)
    return data, str(common.write_json(data, path))


def main(argv=None) -> int:
    args = parse_args(argv)
    data, path = run(args)
    print()
    print(data["markdown"])
    print(f"\nresults: {path}")
    return 0 if all("error" not in r for r in data["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
