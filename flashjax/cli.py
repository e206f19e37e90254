"""The `flashjax` command line.

Subcommands are registered in `SUBCOMMANDS` below. Each entry names a cheap
function that adds the subcommand's arguments and a "package.module:function"
target that is imported only when that subcommand runs. The target is called
with the parsed `argparse.Namespace` and returns an exit status (None means 0).

To add a subcommand (e.g. `train`, `generate`, `serve`), append to SUBCOMMANDS:
    Subcommand("train", "one-line help", "flashjax.models.cli_args:add_train_arguments",
               "flashjax.models.cli:train_main")
The arguments function (a callable, or a "module:function" string imported when
the parser is built) must only call argparse: importing its module must stay
cheap (no jax/flax/model imports at its top level), since every `flashjax`
invocation builds all subparsers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | str | None
    target: str  # "package.module:function", imported lazily
    description: str | None = None


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 1 on CPU, 4 on GPU)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: 256 on CPU, 4096 on GPU)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default: 4 on CPU, 16 on GPU)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads, divides --heads (default: = heads)")
    p.add_argument("--head-dim", type=int, default=None, help="head dimension (default: 64 on CPU, 128 on GPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="input dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal (GPT-style) mask (default: on)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 3 on CPU, 20 on GPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the inputs")


# Tolerances on max |flash - reference| for the demo's pass/fail line.
_DEMO_ATOL = {"float32": 1e-3, "bfloat16": 6e-2, "float16": 1e-2}


def run_demo(args: argparse.Namespace) -> int:
    import statistics
    import time

    import jax
    import jax.numpy as jnp

    import flashjax
    from flashjax import _backend

    gpu = _backend.on_gpu()
    batch = args.batch or (4 if gpu else 1)
    seq = args.seq or (4096 if gpu else 256)
    heads = args.heads or (16 if gpu else 4)
    kv_heads = args.kv_heads or heads
    head_dim = args.head_dim or (128 if gpu else 64)
    dtype_name = args.dtype or ("bfloat16" if gpu else "float32")
    reps = args.reps or (20 if gpu else 3)
    if heads % kv_heads:
        print(f"error: --kv-heads {kv_heads} must divide --heads {heads}", file=sys.stderr)
        return 2
    dtype = jnp.dtype(dtype_name)

    interpret = _backend.resolve_interpret(None)
    if interpret:
        mode = f"Pallas interpret mode on {jax.default_backend().upper()} (no GPU: slow, for checking only)"
    else:
        mode = f"compiled Pallas kernel on GPU ({_backend.gpu_name()})"
    print(f"flashjax {flashjax.__version__} demo | jax {jax.__version__} | backend: {jax.default_backend()}")
    print(f"mode: {mode}")
    print(f"shapes: q [{batch}, {seq}, {heads}, {head_dim}], k/v [{batch}, {seq}, {kv_heads}, {head_dim}], "
          f"{dtype_name}, causal={args.causal}")

    kq, kk, kv = jax.random.split(jax.random.key(args.seed), 3)
    q = jax.random.normal(kq, (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, seq, kv_heads, head_dim), dtype)

    flash = jax.jit(lambda q, k, v: flashjax.flash_attention(q, k, v, causal=args.causal))
    ref = jax.jit(lambda q, k, v: flashjax.attention_reference(q, k, v, causal=args.causal))

    t0 = time.perf_counter()
    out = jax.block_until_ready(flash(q, k, v))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(flash(q, k, v))
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)

    expected = jax.block_until_ready(ref(q, k, v))
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - expected.astype(jnp.float32))))
    flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if args.causal else 1.0)

    print(f"flash_attention: first call (compile + run) {first * 1e3:.1f} ms; "
          f"median of {reps} runs {median * 1e3:.3f} ms ({flops / median / 1e12:.3g} TFLOP/s)")
    atol = _DEMO_ATOL[dtype_name]
    ok = err <= atol and out.dtype == q.dtype and out.shape == q.shape
    print(f"max |flash - reference| = {err:.3e} (tolerance {atol:g} for {dtype_name}): "
          f"{'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# Registry: (name, help, arguments function, lazy target). Hooks for later
# subcommands, added here by their owners, e.g.:
#   Subcommand("train",    "...", "flashjax.models.cli_args:add_train_arguments", "flashjax.models.cli:train_main")
#   Subcommand("generate", "...", "flashjax.models.cli_args:add_generate_arguments", "flashjax.models.cli:generate_main")
#   Subcommand("serve",    "...", "flashjax.serving.<module>:<add_args>", "flashjax.serving.<module>:<main>")
# ---------------------------------------------------------------------------

SUBCOMMANDS: list[Subcommand] = [
    Subcommand(
        "demo",
        "run flash_attention on random inputs, check it against the reference, time it",
        _demo_args,
        "flashjax.cli:run_demo",
        description=(
            "Runs flashjax.flash_attention on random inputs (small on CPU, "
            "bigger on GPU), compares it to flashjax.attention_reference, and "
            "prints the max error, the mode that ran and the timing."
        ),
    ),
    Subcommand(
        "train",
        "train (or --resume) a GPT on the Python stdlib or --data",
        "flashjax.models.cli_args:add_train_arguments",
        "flashjax.models.cli:train_main",
        description=(
            "Trains a Flax GPT (preset nano, llama-nano, gpt2, llama-1b or llama-7b; --set field=value "
            "overrides) with a byte-level BPE tokenizer trained on the corpus. Writes an atomic "
            "Orbax checkpoint, metrics.jsonl and loss.png to --out; --resume continues exactly."
        ),
    ),
    Subcommand(
        "generate",
        "sample text from a `flashjax train` checkpoint",
        "flashjax.serving.cli:add_generate_arguments",
        "flashjax.serving.cli:generate_main",
        description=(
            "Streams a sampled continuation of --prompt: paged KV cache, flash prefill and a "
            "jitted on-device decode loop (flashjax.serving.generate), sampled by "
            "flashjax.serving.sampling (defaults: temperature 0.8, top-k 50, top-p off, seed 0). "
            "`flashjax train-and-sample` samples through this same path."
        ),
    ),
    Subcommand(
        "serve",
        "serve a checkpoint over an OpenAI-compatible HTTP API (and a chat page at /)",
        "flashjax.serving.server:add_serve_arguments",
        "flashjax.serving.server:serve_main",
        description=(
            "Runs the continuous-batching engine (paged KV cache, chunked prefill, prefix caching, "
            "preemption) behind FastAPI + uvicorn: POST /v1/completions and /v1/chat/completions "
            "(stream: true for server-sent events), GET /v1/models, /health, /metrics and a chat page "
            "at /. Binds 127.0.0.1 unless --host says otherwise. Needs the `serve` extra."
        ),
    ),
    Subcommand(
        "train-and-sample",
        "the main job: train the nano GPT on the stdlib (~3 min on CPU), then sample from 'def '",
        "flashjax.models.cli_args:add_main_job_arguments",
        "flashjax.models.cli:main_job",
        description=(
            "Trains the nano preset on the running Python's standard library sources for a few "
            "minutes (all `flashjax train` options apply), then prints a sampled completion of --prompt "
            "through the same path and defaults as `flashjax generate` (--sample-seed is its --seed)."
        ),
    ),
]


def _version() -> str:
    from flashjax import __version__

    return __version__


def build_parser(subcommands: list[Subcommand] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashjax",
        description="IO-aware attention for JAX in Pallas, plus a small Flax GPT and serving stack.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--compilation-cache", metavar="DIR", default=None,
        help=("folder of the persistent XLA compilation cache, or 'off' (default: "
              f"${CACHE_ENV}, else ~/.cache/flashjax/xla unless JAX_COMPILATION_CACHE_DIR is "
              "set); a second run of the same model skips most of its compile"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for cmd in subcommands if subcommands is not None else SUBCOMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        add_arguments = cmd.add_arguments
        if isinstance(add_arguments, str):
            add_arguments = _resolve(add_arguments)
        if add_arguments is not None:
            add_arguments(p)
        p.set_defaults(_target=cmd.target)
    return parser


# The persistent XLA compilation cache the `flashjax` command turns on, unless
# JAX_COMPILATION_CACHE_DIR is already set or the user says otherwise: compiled
# executables (Pallas kernels included) are stored on disk, so a second
# `flashjax serve` of the same model skips most of its warm-up compile (a
# 32-layer llama-7b engine compiled for 200 s on an H200).
CACHE_ENV = "FLASHJAX_COMPILATION_CACHE"


def default_cache_dir(environ=None) -> str:
    import os

    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flashjax", "xla")


def compilation_cache_dir(option: str | None, environ=None) -> str | None:
    """Where the `flashjax` command keeps its compilation cache: None for none.
    `option` is --compilation-cache (a folder, or "off"); then FLASHJAX_COMPILATION_CACHE;
    then, unless JAX_COMPILATION_CACHE_DIR already chooses for jax, the default
    folder under XDG_CACHE_HOME (~/.cache/flashjax/xla)."""
    import os

    environ = os.environ if environ is None else environ
    choice = option if option is not None else environ.get(CACHE_ENV)
    if choice is not None:
        return None if choice.strip().lower() in ("off", "0", "none", "") else choice
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None  # jax reads it itself
    return default_cache_dir(environ)


def enable_compilation_cache(path: str | None) -> None:
    if path is None:
        return
    import os

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        print(f"flashjax: compilation cache off ({path} cannot be created: {exc})", file=sys.stderr)
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)


def _resolve(target: str) -> Callable:
    module_name, _, func_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, func_name)


def main(argv: list[str] | None = None, *, subcommands: list[Subcommand] | None = None) -> int:
    parser = build_parser(subcommands)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\nerror: a command is needed (e.g. `flashjax demo`)", file=sys.stderr)
        return 2
    target = args._target
    del args._target
    enable_compilation_cache(compilation_cache_dir(args.compilation_cache))
    del args.compilation_cache
    try:
        func = _resolve(target)
    except (ImportError, AttributeError) as exc:
        print(f"flashjax {args.command}: cannot load {target}: {exc}", file=sys.stderr)
        return 1
    status = func(args)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
