"""Sampling parameters and a jit-able, per-row sampler.

`SamplingParams` holds one request's settings and validates them on
construction (a `ValueError` names the bad field). A batch is sampled with
per-row settings held as arrays (`SamplingArrays`), so rows with different
temperatures, top-k, top-p and seeds share one compiled step:

    params = stack_params([SamplingParams(temperature=0), SamplingParams(0.8, top_k=50, seed=3)])
    ids = sample(logits, params, keys)      # logits [batch, vocab] -> int32 [batch]

Semantics per row, in this order:
  * temperature == 0: greedy (argmax of the raw logits; top_k/top_p ignored);
  * logits / temperature;
  * top_k > 0: keep the k largest (ties at the k-th value are kept too);
  * top_p < 1: keep the smallest set of most likely tokens whose probability
    (after top-k) reaches top_p; the most likely token is always kept;
  * draw from the remaining tokens with the row's key.

Keys: `sample` takes one key per row (`keys` shaped [batch]) or a single key
(split into one per row). `row_keys(seeds, step)` gives the keys the
generation loops use: `fold_in(key(seed), step)`, so a row's draws depend only
on its own seed and position, not on its batch neighbours (two rows with the
same seed and the same prompt draw the same tokens).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = ["SamplingParams", "SamplingArrays", "GREEDY", "stack_params", "sample", "row_keys",
           "validate_sampling"]

MAX_SEED = 2**32 - 1
INT32_MAX = 2**31 - 1  # ints that land in int32 device arrays must fit
MAX_TEMPERATURE = 1e4  # a finite float32 well past any useful setting (logits / t stay finite)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (OverflowError, ValueError):  # e.g. an int too big for a float
        return False


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token of one sequence.

    temperature: >= 0; 0 means greedy (argmax).
    top_k: keep the k likeliest tokens; 0 means no limit.
    top_p: nucleus mass in (0, 1]; 1 means no limit.
    seed: int in [0, 2**32); the same seed (and prompt) gives the same tokens.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def validate_sampling(temperature, top_k, top_p, seed) -> None:
    """Raise ValueError naming the first invalid field (the message starts with its name).

    Every value must fit the device array it goes into: top_k an int32, seed a
    uint32, temperature and top_p finite float32s.
    """
    if not _is_real(temperature) or not _finite(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {temperature!r}")
    if not _is_int(top_k) or not 0 <= top_k <= INT32_MAX:
        raise ValueError(f"top_k must be an integer in [0, 2**31) (0 = no limit), got {top_k!r}")
    if not _is_real(top_p) or not _finite(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = no limit), got {top_p!r}")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


GREEDY = SamplingParams(temperature=0.0)


@struct.dataclass
class SamplingArrays:
    """Per-row sampling settings (a pytree of [batch] arrays; pass it to jit as data)."""

    temperature: jax.Array  # float32
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32, 1 = off
    seed: jax.Array  # uint32

    @property
    def batch(self) -> int:
        return self.temperature.shape[0]


def stack_params(params: SamplingParams | Sequence[SamplingParams] | None, batch: int | None = None,
                 *, host: bool = False) -> SamplingArrays:
    """[batch] arrays from one SamplingParams (repeated `batch` times) or one per row.

    None means greedy. Raises ValueError if a list's length is not `batch`.
    host=True leaves the arrays in numpy (a jitted call transfers them itself,
    more cheaply than one jnp.asarray each).
    """
    if params is None:
        params = GREEDY
    if isinstance(params, SamplingArrays):
        if batch is not None and params.batch != batch:
            raise ValueError(f"sampling arrays have batch {params.batch}, expected {batch}")
        return params
    if isinstance(params, SamplingParams):
        if batch is None:
            raise ValueError("batch is needed to repeat a single SamplingParams")
        rows = [params] * batch
    else:
        rows = list(params)
        for i, p in enumerate(rows):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling[{i}] must be a SamplingParams, got {type(p).__name__}")
        if batch is not None and len(rows) != batch:
            raise ValueError(f"sampling has {len(rows)} entries but the batch has {batch} prompts")
        if not rows:
            raise ValueError("sampling is an empty list")
    put = (lambda x: x) if host else jnp.asarray
    return SamplingArrays(
        temperature=put(np.array([p.temperature for p in rows], np.float32)),
        top_k=put(np.array([p.top_k for p in rows], np.int32)),
        top_p=put(np.array([p.top_p for p in rows], np.float32)),
        seed=put(np.array([p.seed for p in rows], np.uint32)),
    )


def row_keys(seeds, step):
    """One key per row: fold_in(key(seed), step). seeds uint32 [batch], step int scalar."""
    step = jnp.asarray(step, jnp.uint32)
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(jnp.asarray(seeds, jnp.uint32))


def _filtered_logits(logits, p: SamplingArrays):
    """Temperature-scaled logits with top-k / top-p exclusions set to -inf."""
    vocab = logits.shape[-1]
    t = jnp.where(p.temperature > 0, p.temperature, 1.0)[:, None]
    scaled = logits / t
    desc = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)
    ranks = jnp.arange(vocab)[None, :]
    k = jnp.where((p.top_k > 0) & (p.top_k < vocab), p.top_k, vocab)[:, None]
    in_k = ranks < k
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    keep = in_k & (((cum - probs) < p.top_p[:, None]) | (p.top_p[:, None] >= 1.0))
    keep = keep.at[:, 0].set(True)
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def sample(logits, params: SamplingArrays, keys, *, filtered: bool | None = None):
    """Next token ids int32 [batch] from logits [batch, vocab] with per-row settings.

    `keys`: [batch] keys (one per row) or a single key.
    filtered: None: all-greedy batches skip the sort (a `lax.cond`, which on a GPU
    makes the host wait for the predicate). True / False (static): whether any row
    may use top-k / top-p. False never sorts: rows draw from softmax(logits / T)
    directly (the same draws as True gives rows with no top-k / top-p); neither
    has control flow, so a caller can dispatch it without waiting for the device.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {logits.shape}")
    batch = logits.shape[0]
    if params.temperature.shape != (batch,):
        raise ValueError(f"sampling params have batch {params.temperature.shape}, logits {batch}")
    if jnp.ndim(keys) == 0:
        keys = jax.random.split(keys, batch)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic(filt):
        draws = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, filt).astype(jnp.int32)
        return jnp.where(params.temperature > 0, draws, greedy)

    if filtered is None:
        return jax.lax.cond(jnp.all(params.temperature <= 0), lambda: greedy,
                            lambda: stochastic(_filtered_logits(logits, params)))
    if filtered:
        return stochastic(_filtered_logits(logits, params))
    t = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    return stochastic(logits / t)
