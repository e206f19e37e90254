"""A decoder-only transformer in Flax NNX: GPT-2 style or Llama style.

`GPT(config, rngs=nnx.Rngs(0))(tokens)` maps int token ids [batch, seq] to
float32 logits [batch, seq, vocab].

External KV caches: `GPT.forward(tokens, positions, attend=fn, state=s)` runs the
same layers but hands each layer's q, k, v (after RoPE) to
`fn(layer_index, q, k, v, s) -> (o, s)` in place of the built-in causal
attention, threading any pytree `s` (a KV cache) through the layers. Decode
engines use this to write K/V into their cache and call their own kernel; the
pieces (`embed`, `blocks[i].attn.qkv`, `.attn.out`, `logits`) are public too.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

import flashjax
from flashjax.models.attention_ops import causal_attention, resolve_attention
from flashjax.models.config import ModelConfig

AttendFn = Callable[[int, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def _dtype(name: str):
    return jnp.dtype(name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def vocab_projection(spec: str, x, w):
    """einsum(spec, x, w) with float32 results (the logits), whose backward runs in x's dtype.

    Plain autodiff of a float32-output einsum hands the float32 cotangent to both
    backward matmuls, so XLA upcasts x and w and runs them in float32: for GPT-2's
    50257-token head that was 18 of a 53 ms training step on an H200. Here the
    cotangent is cast to the compute dtype first (as mixed-precision training does
    everywhere else), so both are bf16 matmuls with float32 accumulation. With
    float32 compute it is plain autodiff."""
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _vocab_projection_fwd(spec, x, w):
    return vocab_projection(spec, x, w), (x, w)


def _vocab_projection_bwd(spec, res, g):
    x, w = res
    _, vjp = jax.vjp(functools.partial(jnp.einsum, spec), x, w)
    return vjp(g.astype(jnp.result_type(x, w)))


vocab_projection.defvjp(_vocab_projection_fwd, _vocab_projection_bwd)


class Dense(nnx.Module):
    """y = x @ W (+ b), parameters in param_dtype, computed in the compute dtype."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, std: float, config: ModelConfig, rngs: nnx.Rngs):
        pdt = _dtype(config.param_dtype)
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out), pdt) * std)
        self.bias = nnx.Param(jnp.zeros((d_out,), pdt)) if bias else nnx.data(None)
        self.dtype = _dtype(config.dtype)

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, config: ModelConfig):
        pdt = _dtype(config.param_dtype)
        self.scale = nnx.Param(jnp.ones((dim,), pdt))
        self.bias = nnx.Param(jnp.zeros((dim,), pdt))
        self.eps = config.norm_eps
        self.dtype = _dtype(config.dtype)

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, config: ModelConfig):
        self.scale = nnx.Param(jnp.ones((dim,), _dtype(config.param_dtype)))
        self.eps = config.norm_eps
        self.dtype = _dtype(config.dtype)

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_tables(positions, head_dim: int, theta: float):
    """cos, sin [batch, seq, 1, head_dim // 2] in float32 for int positions [batch, seq]."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, half]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (the Llama/HF layout) on x [batch, seq, heads, head_dim]."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def sliding_window_attention(q, k, v, impl: str, window: int):
    """Causal self-attention where each query sees its last `window` positions (itself included).

    q [b, s, h, hd], k/v [b, s, kvh, hd] of the same length (Mistral's sliding window).
    """
    if impl == "flash":
        return flashjax.flash_attention(q, k, v, causal=True, window=window - 1)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(window - 1, 0),
        implementation="cudnn" if impl == "cudnn" else "xla",
    )


class Attention(nnx.Module):
    """Causal self-attention with a fused QKV projection and grouped K/V heads."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.n_head, self.kv_heads, self.head_dim = c.n_head, c.kv_heads, c.head_dim
        self.rope = c.family == "llama"
        self.rope_theta = c.rope_theta
        self.impl = resolve_attention(c.attention)
        self.window = c.sliding_window
        width = (c.n_head + 2 * c.kv_heads) * c.head_dim
        self.wqkv = Dense(c.d_model, width, bias=c.bias, std=c.init_std, config=c, rngs=rngs)
        self.wo = Dense(
            c.n_head * c.head_dim, c.d_model, bias=c.bias,
            std=c.init_std / math.sqrt(2 * c.n_layer), config=c, rngs=rngs,
        )

    def qkv(self, x, positions):
        """x [b, s, d_model], int positions [b, s] -> q [b,s,h,hd], k, v [b,s,kvh,hd] (RoPE applied)."""
        b, s, _ = x.shape
        h, kvh, hd = self.n_head, self.kv_heads, self.head_dim
        y = self.wqkv(x)
        q = y[..., : h * hd].reshape(b, s, h, hd)
        k = y[..., h * hd : (h + kvh) * hd].reshape(b, s, kvh, hd)
        v = y[..., (h + kvh) * hd :].reshape(b, s, kvh, hd)
        if self.rope:
            cos, sin = rope_tables(positions, hd, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q, k, v):
        """The built-in causal attention over these q, k, v."""
        if self.window is not None:
            return sliding_window_attention(q, k, v, self.impl, self.window)
        return causal_attention(q, k, v, self.impl)

    def out(self, o):
        b, s = o.shape[:2]
        return self.wo(o.reshape(b, s, self.n_head * self.head_dim))

    def __call__(self, x, positions):
        return self.out(self.attend(*self.qkv(x, positions)))


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.gated = c.family == "llama"
        std_out = c.init_std / math.sqrt(2 * c.n_layer)
        if self.gated:
            # gate and up projections fused into one matmul
            self.w_in = Dense(c.d_model, 2 * c.ffn_dim, bias=c.bias, std=c.init_std, config=c, rngs=rngs)
        else:
            self.w_in = Dense(c.d_model, c.ffn_dim, bias=c.bias, std=c.init_std, config=c, rngs=rngs)
        self.w_out = Dense(c.ffn_dim, c.d_model, bias=c.bias, std=std_out, config=c, rngs=rngs)

    def __call__(self, x):
        h = self.w_in(x)
        if self.gated:
            gate, up = jnp.split(h, 2, axis=-1)
            h = jax.nn.silu(gate) * up
        else:
            h = jax.nn.gelu(h, approximate=True)
        return self.w_out(h)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        norm = LayerNorm if config.family == "gpt2" else RMSNorm
        self.norm1 = norm(config.d_model, config)
        self.attn = Attention(config, rngs=rngs)
        self.norm2 = norm(config.d_model, config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, attend: Callable | None = None):
        q, k, v = self.attn.qkv(self.norm1(x), positions)
        o = self.attn.attend(q, k, v) if attend is None else attend(q, k, v)
        x = x + self.attn.out(o).astype(x.dtype)
        x = x + self.mlp(self.norm2(x)).astype(x.dtype)
        return x


def _run_block(block: Block, x, positions):
    return block(x, positions)


_remat_block = nnx.remat(_run_block)


class GPT(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        pdt = _dtype(c.param_dtype)
        self.dtype = _dtype(c.dtype)
        self.attention_impl = resolve_attention(c.attention)
        self.wte = nnx.Param(jax.random.normal(rngs.params(), (c.vocab_size, c.d_model), pdt) * c.init_std)
        if c.family == "gpt2":
            self.wpe = nnx.Param(
                jax.random.normal(rngs.params(), (c.max_seq_len, c.d_model), pdt) * (c.init_std / 2)
            )
        else:
            self.wpe = nnx.data(None)
        self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.n_layer)])
        self.norm_f = LayerNorm(c.d_model, c) if c.family == "gpt2" else RMSNorm(c.d_model, c)
        if c.tied:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = nnx.Param(
                jax.random.normal(rngs.params(), (c.d_model, c.vocab_size), pdt) * c.init_std
            )

    # Pieces -------------------------------------------------------------
    def embed(self, tokens, positions):
        x = jnp.take(self.wte[...], tokens, axis=0)
        if self.wpe is not None:
            x = x + jnp.take(self.wpe[...], positions, axis=0)
        return x.astype(self.dtype)

    def logits(self, x):
        """Final norm and vocabulary projection; float32 logits."""
        x = self.norm_f(x)
        if self.lm_head is None:
            return vocab_projection("bsd,vd->bsv", x, self.wte[...].astype(self.dtype))
        return vocab_projection("bsd,dv->bsv", x, self.lm_head[...].astype(self.dtype))

    # Forward ------------------------------------------------------------
    def forward(
        self,
        tokens,
        positions=None,
        *,
        attend: AttendFn | None = None,
        state: Any = None,
        last_only: bool = False,
    ):
        """Run the model; returns (logits, state).

        tokens [batch, seq] int; positions [batch, seq] int (default 0..seq-1).
        With `attend`, each layer i calls attend(i, q, k, v, state) -> (o, state)
        instead of the built-in causal attention. `last_only` computes logits
        for the last position only ([batch, 1, vocab]).
        """
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
        x = self.embed(tokens, positions)
        for i, block in enumerate(self.blocks):
            if attend is None:
                x = _remat_block(block, x, positions) if self.config.remat else block(x, positions)
            else:
                box = [state]

                def layer_attend(q, k, v, _i=i, _box=box):
                    o, _box[0] = attend(_i, q, k, v, _box[0])
                    return o

                x = block(x, positions, layer_attend)
                state = box[0]
        if last_only:
            x = x[:, -1:]
        return self.logits(x), state

    def __call__(self, tokens, positions=None):
        logits, _ = self.forward(tokens, positions)
        return logits


def build_model(config: ModelConfig, seed: int = 0) -> GPT:
    return GPT(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> GPT:
    """The model's structure with ShapeDtypeStruct leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
