"""Training: AdamW with warmup + cosine decay, clipping, gradient accumulation,
validation, progress bar, loss-curve PNG, atomic checkpoints and exact resume.

`train(args)` takes an argparse.Namespace (or a dict, or keyword arguments) with
the fields of `TrainArgs`; None means "the default" (or, with `resume`, the
value stored in the checkpoint).

The step itself: `make_train_step` (one device) and `make_sharded_train_step`
(over a `flashjax.mesh.make_mesh` mesh: data parallel, FSDP and tensor-parallel
attention; parameter layouts from `flashjax.models.sharding`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from flashjax.mesh import batch_sharding, use_mesh
from flashjax.models import checkpoint as ckpt
from flashjax.models.attention_ops import resolve_attention
from flashjax.models.config import (
    ModelConfig,
    config_from_preset,
    parse_overrides,
)
from flashjax.models.data import DEFAULT_MAX_BYTES, get_batch, load_corpus, split_tokens, val_batches
from flashjax.models.gpt import GPT, abstract_model
from flashjax.models.sharding import fsdp_spec, param_shardings, shard_like
from flashjax.models.tokenizer import Tokenizer, encode_documents

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"

# Arguments that fix the trajectory of a run: stored in the checkpoint and
# reused (and checked) on --resume.
TRAJECTORY_FIELDS = (
    "data", "max_bytes", "val_fraction", "batch_size", "seq_len", "grad_accum", "lr",
    "min_lr_ratio", "warmup", "weight_decay", "clip", "b1", "b2", "seed",
)


@dataclasses.dataclass
class TrainArgs:
    preset: str | None = None  # default "nano" (or the checkpoint's config on --resume)
    set: list[str] | None = None  # config overrides "field=value"
    steps: int | None = None  # default 200
    out: str | None = None  # default runs/<preset>
    data: str | None = None  # None: the standard library's *.py files
    max_bytes: int | None = None  # corpus cap, default DEFAULT_MAX_BYTES
    val_fraction: float | None = None  # default 0.05
    batch_size: int | None = None  # sequences per optimizer step (all micro-batches), default 16
    seq_len: int | None = None  # default min(256, max_seq_len)
    grad_accum: int | None = None  # micro-batches per step, default 1
    lr: float | None = None  # peak learning rate, default 3e-3 (nano-sized) / 6e-4
    min_lr_ratio: float | None = None  # final lr / peak, default 0.1
    warmup: int | None = None  # default min(100, steps // 10)
    weight_decay: float | None = None  # default 0.1
    clip: float | None = None  # global-norm clip, default 1.0
    b1: float | None = None
    b2: float | None = None
    seed: int | None = None  # default 0
    eval_interval: int | None = None  # default steps // 5
    eval_batches: int | None = None  # default 4
    ckpt_interval: int | None = None  # default steps // 4
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    stop_at: int | None = None  # stop (checkpointed) after this step: simulates an interruption


_DEFAULTS = dict(
    max_bytes=DEFAULT_MAX_BYTES, val_fraction=0.05, batch_size=16, grad_accum=1, min_lr_ratio=0.1,
    weight_decay=0.1, clip=1.0, b1=0.9, b2=0.95, seed=0, eval_batches=4,
)


def _as_train_args(args=None, **kwargs) -> TrainArgs:
    if args is None:
        d = {}
    elif isinstance(args, TrainArgs):
        d = dataclasses.asdict(args)
    elif isinstance(args, dict):
        d = dict(args)
    else:
        d = dict(vars(args))
    d.update(kwargs)
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    return TrainArgs(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------
# Optimizer and steps
# --------------------------------------------------------------------------


def make_optimizer(a: TrainArgs, steps: int):
    """(AdamW with clipping and a warmup-cosine schedule, the schedule)."""
    warmup = a.warmup
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=a.lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=a.lr * a.min_lr_ratio,
    )

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    return optax.chain(
        optax.clip_by_global_norm(a.clip),
        optax.adamw(schedule, b1=a.b1, b2=a.b2, weight_decay=a.weight_decay, mask=decay_mask),
    ), schedule


def loss_fn(graphdef, params, x, y):
    model = nnx.merge(graphdef, params)
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_train_step(graphdef, tx, *, donate: bool = True):
    """step(params, opt_state, x, y) with x, y int32 [grad_accum, micro_batch, seq]."""
    return jax.jit(train_step_fn(graphdef, tx), donate_argnums=(0, 1) if donate else ())


def train_step_fn(graphdef, tx):
    """The un-jitted train step (`make_sharded_train_step` jits it with shardings)."""
    grad_fn = jax.value_and_grad(lambda p, x, y: loss_fn(graphdef, p, x, y))

    def step(params, opt_state, x, y):
        accum = x.shape[0]
        if accum == 1:
            loss, grads = grad_fn(params, x[0], y[0])
        else:
            def body(carry, xy):
                l_sum, g_sum = carry
                l, g = grad_fn(params, *xy)
                return (l_sum + l, jax.tree.map(jnp.add, g_sum, g)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (x, y))
            loss = loss / accum
            grads = jax.tree.map(lambda g: g / accum, grads)
        gnorm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": gnorm}

    return step


def make_sharded_train_step(graphdef, tx, mesh: Mesh, params, *, donate: bool = True):
    """(step, params, opt_state) for training over `mesh` (`flashjax.mesh.make_mesh`).

    `step(params, opt_state, x, y)` takes x, y int32 [grad_accum, micro_batch,
    seq] with micro_batch divisible by data*fsdp; parameters and optimizer state
    stay sharded (FSDP over the "fsdp" axis, `flashjax.models.sharding`); the
    flash kernels run per device (`flashjax.tensor_parallel.head_sharded`).
    """
    ps = param_shardings(params, mesh)
    params = shard_like(params, ps)
    # Optimizer moments follow the same shape rule as the parameters; scalars replicate.
    fsdp = mesh.shape["fsdp"]
    os_ = jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)),
                       jax.eval_shape(tx.init, params))
    opt_state = jax.jit(tx.init, out_shardings=os_)(params)
    raw = train_step_fn(graphdef, tx)
    data = batch_sharding(mesh, 3, 1)

    def step(params, opt_state, x, y):
        with use_mesh(mesh):
            return raw(params, opt_state, x, y)

    jitted = jax.jit(step, in_shardings=(ps, os_, data, data), out_shardings=(ps, os_, None),
                     donate_argnums=(0, 1) if donate else ())
    return jitted, params, opt_state


def make_eval_step(graphdef):
    return jax.jit(lambda p, x, y: loss_fn(graphdef, p, x, y))


_OPT_FIELDS = ("lr", "min_lr_ratio", "warmup", "weight_decay", "clip", "b1", "b2")
_COMPILED: dict = {}


def _optimizer_key(a: TrainArgs) -> tuple:
    return tuple((name, getattr(a, name)) for name in _OPT_FIELDS)


def _compiled(config: ModelConfig, opt_key: tuple, steps: int):
    """(graphdef, tx, schedule, train_step, eval_step), shared by train() calls
    with the same model and optimizer in one process (so a resume in-process,
    as in the tests, reuses the compiled executables)."""
    key = (config, opt_key, steps)
    hit = _COMPILED.get(key)
    if hit is None:
        graphdef, _ = nnx.split(abstract_model(config))
        tx, schedule = make_optimizer(TrainArgs(**dict(opt_key)), steps)
        hit = (graphdef, tx, schedule, make_train_step(graphdef, tx), make_eval_step(graphdef))
        if len(_COMPILED) >= 4:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = hit
    return hit


# --------------------------------------------------------------------------
# Metrics and plot
# --------------------------------------------------------------------------


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by an interruption
    return out


def _write_metrics(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_losses(metrics: list[dict], path: Path, title: str = "") -> None:
    """Train (and validation) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    va = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if tr:
        s, l = zip(*tr)
        ax.plot(s, l, lw=1, label="train")
    if va:
        s, l = zip(*va)
        ax.plot(s, l, "o-", ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------


def _resolve(a: TrainArgs) -> tuple[TrainArgs, ModelConfig, Path, Path | None, dict]:
    """Fill defaults (from the checkpoint on --resume); returns (args, config, out, ckpt, saved_args)."""
    overrides = parse_overrides(a.set)
    out = Path(a.out) if a.out else Path("runs") / (a.preset or "nano")
    existing = ckpt.find_checkpoint(out)
    saved: dict = {}
    if existing is not None and not a.resume and not a.overwrite:
        raise ValueError(f"{out} already holds a checkpoint; pass --resume to continue it or --overwrite to start over")
    if a.resume and existing is not None:
        saved = ckpt.read_train_args(existing)
        saved_cfg = ckpt.read_config(existing)
        if a.preset is None:
            config = saved_cfg.replace(**overrides)
        else:
            config = config_from_preset(a.preset, **overrides)
        ckpt.check_config(existing, config)
        for name in TRAJECTORY_FIELDS:
            mine, theirs = getattr(a, name), saved.get(name)
            if mine is not None and name in saved and mine != theirs:
                raise ValueError(
                    f"--resume: {name}={mine!r} differs from the checkpoint's {theirs!r} (the run would not be the same)"
                )
            if mine is None and name in saved:
                setattr(a, name, theirs)
        for name in ("steps", "eval_interval", "ckpt_interval", "eval_batches"):
            if getattr(a, name) is None and saved.get(name) is not None:
                setattr(a, name, saved[name])
    else:
        if a.resume and existing is None:
            if out.exists():  # a damaged checkpoint is an error, never something to train over
                try:
                    ckpt.require_checkpoint(out)
                except ValueError as e:
                    if "not a complete checkpoint" in str(e):
                        raise ValueError(f"--resume: {e}; nothing was overwritten (repair it, or pass "
                                         f"--overwrite without --resume to start over)") from None
            print(f"note: --resume given but {out} holds no checkpoint; starting a new run", file=sys.stderr)
            a.resume = False
        config = config_from_preset(a.preset or "nano", **overrides)
        existing = None
    small = config.d_model <= 512
    for name, value in _DEFAULTS.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if a.lr is None:
        a.lr = 3e-3 if small else 6e-4
    if a.steps is None:
        a.steps = 200
    if a.seq_len is None:
        a.seq_len = min(256, config.max_seq_len)
    if a.warmup is None:
        a.warmup = min(100, a.steps // 10)
    if a.eval_interval is None:
        a.eval_interval = max(1, a.steps // 5)
    if a.ckpt_interval is None:
        a.ckpt_interval = max(1, a.steps // 4)
    if a.steps <= 0:
        raise ValueError(f"--steps must be positive, got {a.steps}")
    if a.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {a.seq_len} exceeds the model's max_seq_len {config.max_seq_len} (use --set max_seq_len=...)")
    if a.batch_size % a.grad_accum:
        raise ValueError(f"--batch-size {a.batch_size} is not a multiple of --grad-accum {a.grad_accum}")
    return a, config, out, existing, saved


def _trajectory(a: TrainArgs) -> dict:
    d = {name: getattr(a, name) for name in TRAJECTORY_FIELDS}
    d.update(steps=a.steps, eval_interval=a.eval_interval, ckpt_interval=a.ckpt_interval, eval_batches=a.eval_batches)
    return d


def prepare_data(a: TrainArgs, config: ModelConfig, tokenizer: Tokenizer | None):
    """Corpus -> (tokenizer, TokenData, fingerprint). Trains the tokenizer when none is given."""
    docs = load_corpus(a.data, a.max_bytes)
    if tokenizer is None:
        tokenizer = Tokenizer.train(docs, config.vocab_size)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}")
    tokens = encode_documents(tokenizer, docs)
    fingerprint = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
    data = split_tokens(tokens, a.val_fraction, a.seq_len)
    return tokenizer, data, fingerprint, sum(len(d.encode("utf-8")) for d in docs)


# --------------------------------------------------------------------------
# train()
# --------------------------------------------------------------------------


def train(args=None, **kwargs) -> dict[str, Any]:
    """Train (or resume) a model; returns a summary dict.

    Keys: out, checkpoint, step, losses ({step: train loss} of this call),
    val_losses ({step: val loss}), config, tokens_per_s.
    """
    a = _as_train_args(args, **kwargs)
    a, config, out, existing, saved = _resolve(a)
    say = print if a.progress else (lambda *x, **k: None)
    out.mkdir(parents=True, exist_ok=True)
    if a.overwrite and not a.resume:
        for name in (ckpt.CHECKPOINT_DIR, ".checkpoint.old", METRICS_FILE, PLOT_FILE):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    tokenizer = ckpt.load_tokenizer(existing) if existing is not None else None
    tokenizer, data, fingerprint, n_bytes = prepare_data(a, config, tokenizer)
    if saved.get("corpus_fingerprint") and saved["corpus_fingerprint"] != fingerprint:
        raise ValueError("--resume: the corpus differs from the one the checkpoint was trained on")

    graphdef, tx, schedule, train_step, eval_step = _compiled(config, _optimizer_key(a), a.steps)
    if existing is not None:
        _, params_t = nnx.split(abstract_model(config))
        opt_t = jax.eval_shape(tx.init, params_t)
        params, opt_state, start = ckpt.load_checkpoint(
            existing, params_template=params_t, opt_state_template=opt_t, config=config
        )
    else:
        model = GPT(config, rngs=nnx.Rngs(a.seed))
        _, params = nnx.split(model)
        del model
        opt_state = tx.init(params)
        start = 0

    impl = resolve_attention(config.attention, announce=False)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    micro = a.batch_size // a.grad_accum
    tokens_per_step = a.batch_size * a.seq_len
    say(
        f"model: {config.family} {n_params / 1e6:.2f}M params ({config.n_layer} layers, d={config.d_model}, "
        f"heads={config.n_head}/{config.kv_heads}, dtype={config.dtype}) | attention: {impl}"
        + (f" (auto on {jax.default_backend()})" if config.attention == "auto" else "")
    )
    say(
        f"data: {n_bytes / 1e6:.2f} MB -> {len(data.train)} train / {len(data.val)} val tokens "
        f"(vocab {tokenizer.vocab_size}) | batch {a.batch_size}x{a.seq_len} = {tokens_per_step} tokens/step"
        + (f" ({a.grad_accum} micro-batches)" if a.grad_accum > 1 else "")
    )
    if start:
        say(f"resuming from step {start} of {a.steps} ({existing})")

    metrics_path = out / METRICS_FILE
    history = [m for m in _read_metrics(metrics_path) if m.get("step", 0) <= start] if start else []
    _write_metrics(metrics_path, history)

    vbatches = val_batches(data.val, a.seq_len, micro, a.eval_batches)
    train_args = _trajectory(a)
    train_args["corpus_fingerprint"] = fingerprint
    train_args["preset"] = a.preset

    def evaluate(p):
        return float(np.mean([float(eval_step(p, x, y)) for x, y in vbatches]))

    def save(step):
        ckpt.save_checkpoint(
            out, params=params, opt_state=opt_state, step=step, config=config,
            tokenizer=tokenizer, train_args=train_args,
        )
        plot_losses(_read_metrics(metrics_path), out / PLOT_FILE, title=f"{config.family} {n_params / 1e6:.1f}M")

    losses: dict[int, float] = {}
    val_losses: dict[int, float] = {}
    end = a.steps if a.stop_at is None else min(a.steps, a.stop_at)
    bar = None
    if a.progress:
        from tqdm import tqdm

        bar = tqdm(total=a.steps, initial=start, unit="step", desc="train", dynamic_ncols=True,
                   file=sys.stderr, mininterval=0.5)
    rate_tokens, rate_time = 0, 0.0
    tok_s = float("nan")
    step = start
    mf = open(metrics_path, "a")
    t_last = None  # when the previous step's metrics were in hand

    def validates(step):
        return step % a.eval_interval == 0 or step == a.steps

    def checkpoints(step):
        return step % a.ckpt_interval == 0 or step == end

    def record(step, m):
        """Log one finished step: wait for its loss, then the metrics row, progress bar,
        validation and checkpoint (the last two only on steps whose parameters are current)."""
        nonlocal rate_tokens, rate_time, tok_s, t_last
        loss = float(m["loss"])
        now = time.perf_counter()
        if t_last is not None:  # not the first step, which includes compilation
            rate_tokens += tokens_per_step
            rate_time += now - t_last
            tok_s = rate_tokens / rate_time
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr or check the data")
        losses[step] = loss
        row = {"step": step, "loss": loss, "lr": float(schedule(step - 1)), "grad_norm": float(m["grad_norm"])}
        if math.isfinite(tok_s):
            row["tokens_per_s"] = tok_s
        if validates(step):
            val_losses[step] = row["val_loss"] = evaluate(params)
        mf.write(json.dumps(row) + "\n")
        mf.flush()
        if bar is not None:
            post = {"loss": f"{loss:.3f}"}
            if step in val_losses:
                post["val"] = f"{val_losses[step]:.3f}"
            elif val_losses:
                post["val"] = f"{val_losses[max(val_losses)]:.3f}"
            if math.isfinite(tok_s):
                post["tok/s"] = f"{tok_s:,.0f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if checkpoints(step):
            save(step)
        t_last = time.perf_counter()

    try:
        # One step stays in flight: step n's loss is read after step n + 1 is dispatched,
        # so the host's work (the batch, dispatch, logging) overlaps the device's. Steps
        # that validate or checkpoint are waited for at once, while `params` are theirs.
        pending = None
        for step in range(start + 1, end + 1):
            x, y = get_batch(data.train, a.seq_len, a.seed, step, (a.grad_accum, micro))
            params, opt_state, m = train_step(params, opt_state, x, y)
            if pending is not None:
                record(*pending)
                pending = None
            if validates(step) or checkpoints(step):
                record(step, m)
            else:
                pending = (step, m)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"\ninterrupted at step {step}; the last checkpoint in {out} is intact (continue with --resume)",
              file=sys.stderr)
        raise
    finally:
        mf.close()
    if bar is not None:
        bar.close()
    if end == start:
        say(f"nothing to do: the checkpoint is already at step {start} of {a.steps}")
    elif val_losses:
        last = max(val_losses)
        say(f"step {end}: train loss {losses[end]:.4f}, validation loss {val_losses[last]:.4f} (step {last})"
            + (f", {tok_s:,.0f} tokens/s" if math.isfinite(tok_s) else ""))
    say(f"checkpoint: {out / ckpt.CHECKPOINT_DIR} | loss curve: {out / PLOT_FILE}")
    return {
        "out": str(out),
        "checkpoint": str(out / ckpt.CHECKPOINT_DIR),
        "step": end,
        "losses": losses,
        "val_losses": val_losses,
        "config": config,
        "attention": impl,
        "tokens_per_s": tok_s,
    }
