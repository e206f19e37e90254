"""Sampling from a trained checkpoint with a dense KV cache.

A plain engine: one jitted prefill over the prompt (the model's own causal
attention, writing K/V into a [layers, batch, max_len, kv_heads, head_dim]
cache) and one jitted single-token step (attention over the cache prefix), run
from Python so text streams as it is produced. It drives the model through
`GPT.forward(attend=...)`, the same hook a paged-KV engine uses.
"""

from __future__ import annotations

import sys
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashjax.models import checkpoint as ckpt
from flashjax.models.attention_ops import xla_attention
from flashjax.models.config import ModelConfig
from flashjax.models.gpt import GPT, abstract_model
from flashjax.models.tokenizer import Tokenizer


def load_model(path, *, attention: str | None = None, dtype: str | None = None) -> tuple[GPT, Tokenizer, ModelConfig]:
    """(model, tokenizer, config) from a run directory or checkpoint directory,
    or from a Hugging Face model directory (config.json + *.safetensors + tokenizer.json).

    `attention` / `dtype` override those runtime fields of the saved config.
    """
    from flashjax.models import hf

    if hf.looks_like_hf_dir(path):
        model, tok, config = hf.load_pretrained(path, dtype=dtype, attention=attention)
        if tok is None:
            raise FileNotFoundError(f"no {hf.TOKENIZER_FILE} in {path}: generating text needs the model's tokenizer")
        return model, tok, config
    ck = ckpt.require_checkpoint(path)
    config = ckpt.read_config(ck)
    runtime = {}
    if attention:
        runtime["attention"] = attention
    if dtype:
        runtime["dtype"] = dtype
    if runtime:
        config = config.replace(**runtime)
    graphdef, params_t = nnx.split(abstract_model(config))
    params, _, _ = ckpt.load_checkpoint(ck, params_template=params_t)
    model = nnx.merge(graphdef, params)
    return model, ckpt.load_tokenizer(ck), config


def sample_logits(logits, key, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """Sample ids [batch] from float logits [batch, vocab]; temperature 0 is greedy."""
    if temperature is None or temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and 0 < top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always the top token)
        keep = (cum - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class DenseCacheSampler:
    """Jitted prefill and decode steps for one model with a dense KV cache."""

    def __init__(self, model: GPT, *, temperature=0.8, top_k=None, top_p=None):
        self.config = model.config
        self.graphdef, self.params = nnx.split(model)
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("max_len",))
        self._step = jax.jit(self._step_impl, donate_argnums=(1,))

    def init_cache(self, batch: int, max_len: int):
        c = self.config
        shape = (c.n_layer, batch, max_len, c.kv_heads, c.head_dim)
        dt = jnp.dtype(c.dtype)
        return jnp.zeros(shape, dt), jnp.zeros(shape, dt)

    def _prefill_impl(self, params, tokens, key, *, max_len: int):
        model = nnx.merge(self.graphdef, params)
        b, s = tokens.shape
        cache = self.init_cache(b, max_len)

        def attend(i, q, k, v, state):
            kc, vc = state
            kc = jax.lax.dynamic_update_slice(kc, k[None].astype(kc.dtype), (i, 0, 0, 0, 0))
            vc = jax.lax.dynamic_update_slice(vc, v[None].astype(vc.dtype), (i, 0, 0, 0, 0))
            return model.blocks[i].attn.attend(q, k, v), (kc, vc)

        logits, cache = model.forward(tokens, attend=attend, state=cache, last_only=True)
        return sample_logits(logits[:, -1], key, **self.sampling), cache

    def _step_impl(self, params, cache, token, pos, key):
        """token [b] at position pos (scalar) -> (next token [b], cache)."""
        model = nnx.merge(self.graphdef, params)
        b = token.shape[0]
        positions = jnp.full((b, 1), pos, jnp.int32)
        lengths = jnp.full((b,), pos + 1, jnp.int32)

        window = self.config.sliding_window

        def attend(i, q, k, v, state):
            kc, vc = state
            kc = jax.lax.dynamic_update_slice(kc, k[None].astype(kc.dtype), (i, 0, pos, 0, 0))
            vc = jax.lax.dynamic_update_slice(vc, v[None].astype(vc.dtype), (i, 0, pos, 0, 0))
            if window is None:
                o = xla_attention(q, kc[i], vc[i], causal=False, kv_lengths=lengths)
            else:  # keys pos - window + 1 .. pos (sliding window, Mistral)
                j = jnp.arange(kc.shape[2])
                mask = ((j <= pos) & (j > pos - window))[None, None, None, :]
                o = jax.nn.dot_product_attention(q, kc[i], vc[i], mask=mask)
            return o, (kc, vc)

        logits, cache = model.forward(token[:, None], positions, attend=attend, state=cache)
        return sample_logits(logits[:, -1], key, **self.sampling), cache

    def generate(self, prompt_ids, max_new_tokens: int, *, seed: int = 0, stop_id: int | None = None) -> Iterator[np.ndarray]:
        """Yield sampled ids, [batch] per step. `prompt_ids`: [seq] or [batch, seq] ints."""
        tokens = np.asarray(prompt_ids, np.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        b, s = tokens.shape
        max_len = self.config.max_seq_len
        if max_new_tokens <= 0:
            return
        if max_new_tokens >= max_len:
            raise ValueError(f"--max-new-tokens {max_new_tokens} must be below the model's context of {max_len} tokens")
        if s + max_new_tokens > max_len:
            tokens = tokens[:, s + max_new_tokens - max_len :]  # keep the end of the prompt
            s = tokens.shape[1]
        cache_len = s + max_new_tokens
        key = jax.random.key(seed)
        tok, cache = self._prefill(self.params, jnp.asarray(tokens), jax.random.fold_in(key, 0), max_len=cache_len)
        for i in range(max_new_tokens):
            out = np.asarray(tok)
            yield out
            if stop_id is not None and np.all(out == stop_id):
                return
            if i + 1 == max_new_tokens:
                return
            tok, cache = self._step(self.params, cache, tok, jnp.int32(s + i), jax.random.fold_in(key, i + 1))


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
    stream=None,
    stop_at_eot: bool = True,
) -> str:
    """Sample a continuation of `prompt`; writes it to `stream` as it comes; returns it."""
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = [tokenizer.eot_id]
    sampler = DenseCacheSampler(model, temperature=temperature, top_k=top_k, top_p=top_p)
    # The prompt's ids give the first new word its context (a SentencePiece leading space).
    dec = tokenizer.stream_decoder(prompt_ids=ids if prompt else ())
    pieces = []
    stop = tokenizer.eot_id if stop_at_eot else None
    for tok in sampler.generate(ids, max_new_tokens, seed=seed, stop_id=stop):
        t = int(tok[0])
        if stop is not None and t == stop:
            break
        piece, _ = dec.push([t])
        pieces.append(piece)
        if stream is not None and piece:
            stream.write(piece)
            stream.flush()
    tail = dec.flush()
    pieces.append(tail)
    if stream is not None and tail:
        stream.write(tail)
        stream.flush()
    return "".join(pieces)


def generate(args=None, **kwargs) -> str:
    """`flashjax generate`: print the prompt and stream a sampled continuation."""
    d = {} if args is None else (dict(args) if isinstance(args, dict) else dict(vars(args)))
    d.update(kwargs)
    model, tok, config = load_model(d["checkpoint"], attention=d.get("attention"), dtype=d.get("dtype"))
    prompt = d.get("prompt") or ""
    stream = d.get("stream", sys.stdout)
    if stream is not None and prompt:
        stream.write(prompt)
        stream.flush()
    text = generate_text(
        model, tok, prompt, int(d.get("max_new_tokens") or 100),
        temperature=0.8 if d.get("temperature") is None else float(d["temperature"]),
        top_k=d.get("top_k", 50),
        top_p=d.get("top_p"),
        seed=int(d.get("seed") or 0),
        stream=stream,
    )
    if stream is not None:
        stream.write("\n")
        stream.flush()
    return text
