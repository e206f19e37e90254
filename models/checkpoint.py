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
"""

from __future__ import annotations

import json
import shutil
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
        raise ValueError(f"no checkpoint found at {path}")
    return ck


def read_config(path: str | Path) -> ModelConfig:
    ck = require_checkpoint(path)
    return ModelConfig.from_json((ck / "config.json").read_text())


def read_train_args(path: str | Path) -> dict:
    ck = require_checkpoint(path)
    f = ck / "train.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def read_step(path: str | Path) -> int:
    ck = require_checkpoint(path)
    return int(json.loads((ck / "meta.json").read_text())["step"])


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
    with ocp.StandardCheckpointer() as ckptr:
        raw = ckptr.restore((ck / "state").absolute())

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
    return Tokenizer.load(require_checkpoint(path) / TOKENIZER_FILE)
