"""`flashjax generate`, and the sampling step of `flashjax train-and-sample`.

Both run `run_generate`: the checkpoint loaded by `flashjax.models.generate.load_model`,
then `flashjax.serving.generate.stream_text` (paged KV cache, jitted on-device
decode loop), the shared sampler `flashjax.serving.sampling` and the shared
detokenizer (`tokenizer.stream_decoder()`, a `flashjax.serving.detokenizer.Detokenizer`).
There is no other generation path behind a command: the dense-cache loop
(`flashjax.models.generate.DenseCacheSampler`) is only a benchmark peer
(`python benchmarks/generate.py --peers dense`), and `--engine dense` says so.

The arguments are those of `flashjax.models.cli_args.add_generate_arguments`
plus `--block-size`, `--kv-cache-dtype` and `--stream-every`. Importing this module stays cheap
(argparse only); jax loads when the command runs.
"""

from __future__ import annotations

import argparse
import sys

ENGINE_DENSE_REMOVED = (
    "--engine dense was removed: `flashjax generate` has one generation path (the paged KV "
    "cache, flashjax.serving.generate). The dense-cache loop is a benchmark peer: "
    "python benchmarks/generate.py --peers paged dense")


def add_generate_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from flashjax.models.cli_args import add_generate_arguments as add_model_args

    add_model_args(p)
    p.add_argument("--block-size", type=int, default=16, help="paged KV cache block size (default 16)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "bf16", "fp16", "fp32", "fp8"), default="auto",
                   help="KV cache dtype: auto (the model's compute dtype, default), bf16, fp16, fp32, or fp8 "
                        "(float8_e4m3fn pages with a float32 scale per token and KV head)")
    p.add_argument("--stream-every", type=int, default=8, metavar="N",
                   help="decode N tokens on the device between text updates (default 8)")
    # Removed option: `paged` (the only path) is accepted for old scripts, `dense` is an error.
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    return p


def generate_main(args: argparse.Namespace) -> int:
    d = dict(vars(args))
    engine = d.pop("engine", None)
    if engine not in (None, "paged"):
        msg = ENGINE_DENSE_REMOVED if engine == "dense" else f"unknown --engine {engine!r}; the option was removed"
        print(f"flashjax generate: error: {msg}", file=sys.stderr)
        return 2
    try:
        run_generate(d, stream=sys.stdout)
    except (ValueError, FileNotFoundError) as e:
        print(f"flashjax generate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def sampling_params(d: dict):
    """The SamplingParams of a command's options. A missing option takes the commands'
    default (flashjax.models.cli_args: temperature 0.8, top-k 50, top-p off, seed 0);
    top_k / top_p given as None mean no limit, temperature None the default."""
    from flashjax.models.cli_args import DEFAULT_TEMPERATURE, DEFAULT_TOP_K
    from flashjax.serving.sampling import SamplingParams

    temperature = d.get("temperature")
    top_k = d.get("top_k", DEFAULT_TOP_K)
    top_p = d.get("top_p")
    seed = d.get("seed")
    return SamplingParams(
        temperature=DEFAULT_TEMPERATURE if temperature is None else float(temperature),
        top_k=0 if top_k is None else int(top_k),
        top_p=1.0 if top_p is None else float(top_p),
        seed=0 if seed is None else int(seed),
    )


def run_generate(d: dict, stream=None) -> str:
    """Load the checkpoint, print the prompt and stream the continuation; returns it.

    `d`: checkpoint, and optionally prompt, max_new_tokens, temperature, top_k,
    top_p, seed, attention, dtype, block_size, kv_cache_dtype, stream_every (the
    options of `flashjax generate`). Raises ValueError / FileNotFoundError on bad input.
    """
    from flashjax.models.cli_args import DEFAULT_MAX_NEW_TOKENS
    from flashjax.models.generate import load_model
    from flashjax.serving.generate import stream_text

    sampling = sampling_params(d)
    max_new = d.get("max_new_tokens")
    max_new = DEFAULT_MAX_NEW_TOKENS if max_new is None else max_new
    model, tok, _ = load_model(d["checkpoint"], attention=d.get("attention"), dtype=d.get("dtype"))
    prompt = d.get("prompt") or ""
    if stream is not None and prompt:
        stream.write(prompt)
        stream.flush()
    pieces = []
    for piece in stream_text(model, tok, prompt, max_new, sampling,
                             chunk_tokens=int(d.get("stream_every") or 8),
                             block_size=int(d.get("block_size") or 16),
                             kv_cache_dtype=d.get("kv_cache_dtype")):
        pieces.append(piece)
        if stream is not None:
            stream.write(piece)
            stream.flush()
    if stream is not None:
        stream.write("\n")
        stream.flush()
    return "".join(pieces)
