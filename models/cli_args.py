"""argparse options of `flashjax train`, `generate` and `train-and-sample`.

Only argparse here (no jax, flax or model imports), so `flashjax --help` stays fast.
"""

from __future__ import annotations

import argparse

DEFAULT_MAX_BYTES = 3_000_000  # default corpus cap (flashjax.models.data uses this)

# Sampling defaults of `flashjax generate` and `flashjax train-and-sample` (one generation
# path: flashjax.serving.cli.run_generate, which also falls back to these).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 50  # 0: no limit
DEFAULT_MAX_NEW_TOKENS = 100

# The main job: nano GPT on the standard library, sized for ~2-4 minutes on 2 CPU cores.
MAIN_JOB_DEFAULTS = dict(
    preset="nano", steps=300, batch_size=16, seq_len=128, out="runs/nano-stdlib",
    prompt="def ", max_new_tokens=200,
)


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`flashjax train` options. Defaults are None: train() fills them in (from the checkpoint on --resume)."""
    p.add_argument("--preset", help="model preset: nano, llama-nano, gpt2, llama-1b, llama-7b (default nano)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a model config field, e.g. --set n_layer=2 --set attention=xla (repeatable)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    p.add_argument("--out", help="run directory for the checkpoint, metrics.jsonl and loss.png (default runs/<preset>)")
    p.add_argument("--data", help="text file or directory to train on (default: the Python standard library's *.py)")
    p.add_argument("--max-bytes", type=int, help=f"corpus size cap in bytes, 0 for none (default {DEFAULT_MAX_BYTES})")
    p.add_argument("--val-fraction", type=float, help="fraction of tokens held out for validation (default 0.05)")
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step, all micro-batches together (default 16)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default min(256, max_seq_len))")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (gradient accumulation, default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3 for width <= 512, else 6e-4)")
    p.add_argument("--min-lr-ratio", type=float, help="final / peak learning rate of the cosine decay (default 0.1)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default min(100, steps/10))")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--clip", type=float, help="global gradient-norm clip (default 1.0)")
    p.add_argument("--seed", type=int, help="seed of the initialisation and the data order (default 0)")
    p.add_argument("--eval-interval", type=int, help="steps between validation passes (default steps/5)")
    p.add_argument("--eval-batches", type=int, help="batches per validation pass (default 4)")
    p.add_argument("--ckpt-interval", type=int, help="steps between checkpoints (default steps/4)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="discard a checkpoint already in --out and start over")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or summary lines")
    p.add_argument("--stop-at", type=int, help=argparse.SUPPRESS)  # simulate an interruption (tests)
    return p


def add_sampling_arguments(p: argparse.ArgumentParser, *,
                           max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> argparse.ArgumentParser:
    """Sampling options shared by `generate` and `train-and-sample` (flashjax.serving.sampling semantics)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"tokens to sample (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"sampling temperature, 0 for greedy (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"sample among the k likeliest tokens, 0 for all (default {DEFAULT_TOP_K})")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default off)")
    return p


def add_generate_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`flashjax generate` options."""
    p.add_argument("--checkpoint", required=True,
                   help="run directory of `flashjax train` (or its checkpoint/), or a Hugging Face model directory "
                        "(config.json, *.safetensors, tokenizer.json: GPT-2, Llama, Mistral)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--attention", choices=["flash", "xla", "cudnn", "auto"],
                   help="attention for the prompt pass (default: the checkpoint's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="parameter and compute dtype (default: the checkpoint's)")
    return p


def add_main_job_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`flashjax train-and-sample`: the train options with the main job's defaults, plus sampling."""
    d = MAIN_JOB_DEFAULTS
    add_train_arguments(p)
    p.set_defaults(preset=d["preset"], steps=d["steps"], batch_size=d["batch_size"], seq_len=d["seq_len"],
                   out=d["out"], overwrite=True)  # the main job starts afresh each time (--resume continues)
    p.add_argument("--prompt", default=d["prompt"], help=f"text to continue after training (default {d['prompt']!r})")
    add_sampling_arguments(p, max_new_tokens=d["max_new_tokens"])
    p.add_argument("--sample-seed", type=int, default=0, help="sampling seed (default 0)")
    return p
