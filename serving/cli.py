"""`flashjax generate` on the paged-KV engine (flashjax.serving.generate).

The arguments are those of `flashjax.models.cli_args.add_generate_arguments`
plus `--engine` (paged: this engine, the default; dense: the plain JAX loop
of `flashjax.models.generate`, kept as a peer) and `--block-size`. Importing
this module stays cheap (argparse only); jax loads when the command runs.
"""

from __future__ import annotations

import argparse
import sys


def add_generate_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from flashjax.models.cli_args import add_generate_arguments as add_model_args

    add_model_args(p)
    p.add_argument("--engine", choices=["paged", "dense"], default="paged",
                   help="paged: paged KV cache, jitted on-device decode loop (default); "
                        "dense: the plain JAX loop with a dense cache")
    p.add_argument("--block-size", type=int, default=16, help="paged KV cache block size (default 16)")
    p.add_argument("--stream-every", type=int, default=8, metavar="N",
                   help="decode N tokens on the device between text updates (default 8)")
    return p


def generate_main(args: argparse.Namespace) -> int:
    d = dict(vars(args))
    if d.get("engine") == "dense":
        from flashjax.models.cli import generate_main as dense_main

        for key in ("engine", "block_size", "stream_every"):
            d.pop(key, None)
        return dense_main(argparse.Namespace(**d))
    try:
        run_generate(d, stream=sys.stdout)
    except (ValueError, FileNotFoundError) as e:
        print(f"flashjax generate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def run_generate(d: dict, stream=None) -> str:
    """Load the checkpoint, print the prompt and stream the continuation; returns it."""
    from flashjax.models.generate import load_model
    from flashjax.serving.generate import stream_text
    from flashjax.serving.sampling import SamplingParams

    temperature = 0.8 if d.get("temperature") is None else float(d["temperature"])
    top_k = d.get("top_k")
    top_p = d.get("top_p")
    sampling = SamplingParams(
        temperature=temperature,
        top_k=0 if top_k is None else int(top_k),
        top_p=1.0 if top_p is None else float(top_p),
        seed=int(d.get("seed") or 0),
    )
    max_new = int(d.get("max_new_tokens") or 100)
    model, tok, _ = load_model(d["checkpoint"], attention=d.get("attention"), dtype=d.get("dtype"))
    prompt = d.get("prompt") or ""
    if stream is not None and prompt:
        stream.write(prompt)
        stream.flush()
    pieces = []
    for piece in stream_text(model, tok, prompt, max_new, sampling,
                             chunk_tokens=int(d.get("stream_every") or 8),
                             block_size=int(d.get("block_size") or 16)):
        pieces.append(piece)
        if stream is not None:
            stream.write(piece)
            stream.flush()
    if stream is not None:
        stream.write("\n")
        stream.flush()
    return "".join(pieces)
