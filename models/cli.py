"""Entry points of `flashjax train`, `flashjax generate` and `flashjax train-and-sample`.

Each takes the parsed argparse.Namespace and returns an exit status; user
errors (bad preset, missing corpus, mismatched checkpoint, ...) print one line
`flashjax <cmd>: error: ...` and return 2. `python -m flashjax.models` runs
them without the main `flashjax` command.

Generation has one path: `generate` and the sampling step of `train-and-sample`
both run `flashjax.serving.cli.run_generate` (paged KV cache, on-device decode
loop, `flashjax.serving.sampling`, the shared detokenizer).
"""

from __future__ import annotations

import argparse
import sys

from flashjax.models.cli_args import add_main_job_arguments, add_train_arguments
from flashjax.serving.cli import add_generate_arguments  # argparse only, like cli_args


def _fail(cmd: str, err: Exception) -> int:
    print(f"flashjax {cmd}: error: {err}", file=sys.stderr)
    return 2


def train_main(args: argparse.Namespace) -> int:
    from flashjax.models.train import train

    try:
        train(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        return _fail("train", e)
    except KeyboardInterrupt:
        return 130
    return 0


def generate_main(args: argparse.Namespace) -> int:
    """`flashjax generate` (the same function the main `flashjax` command runs)."""
    from flashjax.serving.cli import generate_main as serving_generate_main

    return serving_generate_main(args)


def main_job(args: argparse.Namespace) -> int:
    """Train the nano GPT on the standard library's sources, then sample a completion."""
    from flashjax.models.train import train

    d = dict(vars(args))
    sampling = {k: d.pop(k) for k in ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "sample_seed")}
    if not d.get("resume"):
        d["overwrite"] = True  # the main job starts a fresh run unless told to resume
    try:
        result = train(d)
        losses = result["losses"]
        if losses:
            first, last = losses[min(losses)], losses[max(losses)]
            vl = result["val_losses"]
            extra = f", validation {vl[max(vl)]:.3f}" if vl else ""
            print(f"loss fell from {first:.3f} (step {min(losses)}) to {last:.3f} (step {max(losses)}){extra}")
        print(f"\n--- sample (prompt {sampling['prompt']!r}, temperature {sampling['temperature']}) ---")
        sample_checkpoint(result["out"], sampling, stream=sys.stdout)
        print("---")
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        return _fail("train-and-sample", e)
    except KeyboardInterrupt:
        return 130
    return 0


def sample_checkpoint(checkpoint, sampling: dict, stream=None) -> str:
    """The main job's sample: `flashjax generate --checkpoint CHECKPOINT` with the main
    job's prompt, max_new_tokens, temperature, top_k, top_p and sample_seed (as --seed)."""
    from flashjax.serving.cli import run_generate

    d = {k: sampling[k] for k in ("prompt", "max_new_tokens", "temperature", "top_k", "top_p") if k in sampling}
    d.update(checkpoint=str(checkpoint), seed=sampling.get("sample_seed"))
    return run_generate(d, stream=stream)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flashjax.models", description="Train and sample the flashjax GPT.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_arguments(sub.add_parser("train", help="train (or resume) a model")).set_defaults(_fn=train_main)
    add_generate_arguments(sub.add_parser("generate", help="sample from a checkpoint")).set_defaults(_fn=generate_main)
    add_main_job_arguments(sub.add_parser("train-and-sample", help="train nano on the stdlib, then sample")).set_defaults(
        _fn=main_job
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn = args._fn
    del args._fn, args.command
    return fn(args)
