"""The causal self-attention operators the model can use, chosen by name.

All take q [batch, q_len, heads, head_dim] and k, v [batch, kv_len, kv_heads,
head_dim] (grouped-query attention without repeating K/V) and return o shaped
like q, in q's dtype.

- "flash": `flashjax.flash_attention(causal=True)` (Pallas; interpreted on CPU).
- "xla":   plain XLA attention that materialises the score matrix.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, fp16/bf16).
- "auto":  flash on a GPU, xla elsewhere.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

import flashjax
from flashjax import _backend
from flashjax.tensor_parallel import head_sharded

log = logging.getLogger("flashjax.models")

_announced: set[tuple[str, str]] = set()


def resolve_attention(name: str, *, announce: bool = True) -> str:
    """Map a configured attention name to the implementation that will run."""
    if name == "auto":
        backend = _backend.default_backend()
        impl = "flash" if _backend.on_gpu() else "xla"
        key = (name, impl)
        if announce and key not in _announced:
            _announced.add(key)
            log.info("attention='auto' picked %r (backend: %s)", impl, backend)
        return impl
    if name not in ("flash", "xla", "cudnn"):
        raise ValueError(f"unknown attention {name!r}; valid choices: flash, xla, cudnn, auto")
    return name


def xla_attention(q, k, v, *, causal: bool = True, kv_lengths=None, q_offset=None):
    """Softmax attention in plain XLA with fp32 scores and softmax.

    `q_offset` ([batch] or scalar) is the absolute position of the first query
    (default: kv_len - q_len, bottom-right aligned); `kv_lengths` ([batch])
    masks keys at or beyond it.
    """
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    scale = 1.0 / math.sqrt(d)
    qg = q.reshape(b, sq, kvh, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    mask = None
    kj = jnp.arange(sk)
    if causal:
        off = (sk - sq) if q_offset is None else jnp.asarray(q_offset)
        qi = jnp.arange(sq)
        if jnp.ndim(off) == 0:
            mask = (kj[None, :] <= (qi[:, None] + off))[None]  # [1, q, k]
        else:
            mask = kj[None, None, :] <= (qi[None, :, None] + off[:, None, None])  # [b, q, k]
    if kv_lengths is not None:
        lm = kj[None, None, :] < jnp.asarray(kv_lengths)[:, None, None]
        mask = lm if mask is None else (mask & lm)
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, sq, h, d).astype(q.dtype)


def flash_causal(q, k, v):
    return flashjax.flash_attention(q, k, v, causal=True)


def cudnn_causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _xla_causal(q, k, v):
    return xla_attention(q, k, v, causal=True)


_IMPLS = {"flash": flash_causal, "xla": _xla_causal, "cudnn": cudnn_causal}


def causal_attention(q, k, v, impl: str):
    """Causal self-attention with the (already resolved) implementation `impl`.

    Under `flashjax.mesh.use_mesh`, the kernel runs per device inside shard_map
    (batch over data/fsdp, heads over model; `flashjax.tensor_parallel.head_sharded`).
    """
    if impl not in _IMPLS:
        raise ValueError(f"unknown attention {impl!r}; valid choices: flash, xla, cudnn")
    return head_sharded(_IMPLS[impl])(q, k, v)
