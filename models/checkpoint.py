"""Atomic Orbax checkpoints of a training run.

Layout of `OUT/checkpoint/`:
  state/        Orbax pytree: parameter and optimizer-state leaves, step
  config.json   the ModelConfig
  train.json    the training arguments that fix the run's trajectory
  tokenizer.json
  meta.json     step, leaf counts and shapes

A save writes everything under `OUT/.checkpoint.tmp/` and then swaps it in with
renames, so an interrupted save leaves the previous checkpoint intact (a crash
between the two renames leaves it at `OUT/.checkpoint.old`, which loading finds).

Loading a damaged checkpoint raises a one-line ValueError that names the file
(or, for the Orbax/TensorStore array data, the `state/` directory and the
array) and says what is wrong.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flashjax.models.config import ModelConfig, config_diff
from flashjax.models.tokenizer import TOKENIZER_FILE, Tokenizer

CHECKPOINT_DIR = "checkpoint"
_TMP = ".checkpoint.tmp"
_OLD = ".checkpoint.old"


def _leaf_dict(tree, prefix: str) -> dict[str, Any]:
    return {f"{prefix}{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def save_checkpoint(
    out_dir: str | Path,
    *,
    params,
    opt_state,
    step: int,
    config: ModelConfig,
    tokenizer: Tokenizer,
    train_args: dict | None = None,
) -> Path:
    """Write a checkpoint of the run to `out_dir/checkpoint` atomically; returns its path."""
    import orbax.checkpoint as ocp

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp, final, old = out / _TMP, out / CHECKPOINT_DIR, out / _OLD
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    p_leaves = _leaf_dict(params, "p")
    o_leaves = _leaf_dict(opt_state, "o") if opt_state is not None else {}
    state = {"params": p_leaves, "step": np.int64(step)}
    if o_leaves:
        state["opt_state"] = o_leaves
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((tmp / "state").absolute(), state)
    (tmp / "config.json").write_text(config.to_json())
    (tmp / "train.json").write_text(json.dumps(train_args or {}, indent=2, sort_keys=True))
    tokenizer.save(tmp / TOKENIZER_FILE)
    meta = {
        "step": int(step),
        "params": {k: list(v.shape) for k, v in p_leaves.items()},
        "opt_state_leaves": len(o_leaves),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    # swap in: final -> old, tmp -> final, drop old
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory for a run directory or a checkpoint directory, or None."""
    p = Path(path)
    for cand in (p, p / CHECKPOINT_DIR, p / _OLD):
        if (cand / "config.json").is_file() and (cand / "state").is_dir():
            return cand
    return None


def require_checkpoint(path: str | Path) -> Path:
    ck = find_checkpoint(path)
    if ck is None:
        p = Path(path)
        if p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.safetensors")):
            raise ValueError(f"{p} has safetensors weights but no config.json (a Hugging Face model directory "
                             "needs its config.json)")
        for cand in (p, p / CHECKPOINT_DIR, p / _OLD):  # a checkpoint with a piece missing: name it
            if cand.is_dir() and any((cand / n).exists() for n in ("config.json", "state", TOKENIZER_FILE)):
                missing = [n for n, ok in (("config.json", (cand / "config.json").is_file()),
                                           ("state/", (cand / "state").is_dir())) if not ok]
                raise ValueError(f"{cand} is not a complete checkpoint: {' and '.join(missing)} missing")
        raise ValueError(f"no checkpoint found at {path}")
    return ck


def _one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, without TensorStore's spec/source dumps."""
    text = str(err) or type(err).__name__
    text = re.split(r" \[(?:tensorstore_spec|source locations)=", text, maxsplit=1)[0]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json_object(f: Path) -> dict:
    """A checkpoint file's JSON object; ValueError naming the file and the problem."""
    if not f.is_file():
        raise ValueError(f"{f} is missing from the checkpoint")
    try:
        data = json.loads(f.read_bytes())
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{f} is not valid JSON ({_one_line(e)}): the checkpoint is damaged") from None
    except OSError as e:
        raise ValueError(f"{f} could not be read: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f} is not a JSON object (got {type(data).__name__}): the checkpoint is damaged")
    return data


def read_config(path: str | Path) -> ModelConfig:
    f = require_checkpoint(path) / "config.json"
    data = _read_json_object(f)
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f} is not a valid model config: {_one_line(e)}") from None


def read_train_args(path: str | Path) -> dict:
    ck = require_checkpoint(path)
    f = ck / "train.json"
    return _read_json_object(f) if f.is_file() else {}


def read_step(path: str | Path) -> int:
    f = require_checkpoint(path) / "meta.json"
    step = _read_json_object(f).get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{f} has no valid 'step' (got {step!r}): the checkpoint is damaged")
    return step


def check_config(path: str | Path, config: ModelConfig) -> ModelConfig:
    """Raise a one-line ValueError if the checkpoint was made with another config."""
    saved = read_config(path)
    diff = config_diff(saved, config)
    if diff:
        raise ValueError(
            f"checkpoint {path} has a different model config (checkpoint vs requested): " + "; ".join(diff)
        )
    return saved


def load_checkpoint(path: str | Path, *, params_template, opt_state_template=None, config: ModelConfig | None = None):
    """Restore (params, opt_state, step) shaped like the templates.

    Templates may hold arrays or jax.ShapeDtypeStructs. With `config`, first
    checks that the checkpoint's config matches (one-line ValueError if not).
    `opt_state` is None when no template is given.
    """
    import orbax.checkpoint as ocp

    ck = require_checkpoint(path)
    if config is not None:
        check_config(ck, config)
    state_dir = (ck / "state").absolute()
    previous_hook = _silence_late_read_callbacks()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            raw = ckptr.restore(state_dir)
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for damaged files
        # (the filter stays: the failed restore's other reads may still report after this)
        for name in ("_METADATA", "_CHECKPOINT_METADATA"):  # Orbax's JSON errors do not say which file
            if (state_dir / name).is_file():
                _read_json_object(state_dir / name)
        raise ValueError(f"{state_dir} (the checkpoint's arrays) could not be read: {_one_line(e)}") from None
    sys.unraisablehook = previous_hook  # every read has finished
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or "step" not in raw:
        raise ValueError(f"{state_dir} does not hold a flashjax training state (no params/step entries)")

    def rebuild(template, leaves: dict, what: str):
        t_leaves, treedef = jax.tree.flatten(template)
        keys = sorted(leaves)
        if len(keys) != len(t_leaves):
            raise ValueError(
                f"checkpoint {ck} does not fit this model: {len(keys)} {what} arrays saved, {len(t_leaves)} expected"
            )
        out = []
        for key, t in zip(keys, t_leaves):
            arr = leaves[key]
            if tuple(arr.shape) != tuple(t.shape):
                raise ValueError(
                    f"checkpoint {ck} does not fit this model: {what} array {key} has shape "
                    f"{tuple(arr.shape)}, expected {tuple(t.shape)}"
                )
            out.append(jax.numpy.asarray(arr, dtype=t.dtype))
        return jax.tree.unflatten(treedef, out)

    params = rebuild(params_template, raw["params"], "parameter")
    opt_state = None
    if opt_state_template is not None:
        if "opt_state" not in raw:
            raise ValueError(f"checkpoint {ck} holds no optimizer state")
        opt_state = rebuild(opt_state_template, raw["opt_state"], "optimizer-state")
    return params, opt_state, int(raw["step"])


def load_tokenizer(path: str | Path) -> Tokenizer:
    f = require_checkpoint(path) / TOKENIZER_FILE
    if not f.is_file():
        raise ValueError(f"{f} is missing from the checkpoint")
    try:
        return Tokenizer.load(f)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception type
        raise ValueError(f"{f} is not a valid tokenizer file ({_one_line(e)}): the checkpoint is damaged") from None


def _silence_late_read_callbacks():
    """Drop the "Event loop is closed" reports of a failed Orbax restore's leftover reads.

    When one array read fails, Orbax closes its event loop while TensorStore still
    has reads of the other arrays in flight; each of those finishing later calls
    `loop.call_soon_threadsafe` on the closed loop and prints a traceback through
    `sys.unraisablehook`. The real error is the one raised to the caller. Returns
    the hook that was installed before.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_flashjax_closed_loop_filter", False):
        return previous

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._flashjax_closed_loop_filter = True
    sys.unraisablehook = hook
    return previous
