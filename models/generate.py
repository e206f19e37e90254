"""Loading a model for generation, and the dense-KV-cache loop kept as a benchmark peer.

`load_model(path)` gives (model, tokenizer, config) from a `flashjax train` run
or a Hugging Face model directory. Text generation itself has one path, the
paged KV cache with its on-device decode loop: `flashjax.serving.generate`
(`generate`, `generate_stream`, `stream_text`), which `flashjax generate` and
`flashjax train-and-sample` both run through `flashjax.serving.cli.run_generate`.

`DenseCacheSampler` is not behind any command: it is the plain peer that
`benchmarks/generate.py` ("dense") and `benchmarks/hf_decode.py` ("ours_dense")
time against the paged loop. One jitted prefill over the prompt (the model's own
causal attention, writing K/V into a [layers, batch, max_len, kv_heads, head_dim]
cache) and one jitted single-token step (attention over the cache prefix), run
from Python. It drives the model through `GPT.forward(attend=...)`, the same hook
the paged runner uses, and samples with the shared sampler
(`flashjax.serving.sampling.sample`, keys `row_keys(seed, i)` for the i-th new
token), so for the same logits and seed it draws the tokens the paged loop draws.
"""

from __future__ import annotations

import dataclasses
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
from flashjax.serving.sampling import GREEDY, SamplingParams, row_keys, sample, stack_params


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


class DenseCacheSampler:
    """Jitted prefill and decode steps for one model with a dense KV cache (a benchmark peer).

    `sampling`: a `flashjax.serving.sampling.SamplingParams` for every row (None:
    greedy), or its fields as keywords (`DenseCacheSampler(model, temperature=0)`).
    """

    def __init__(self, model: GPT, sampling: SamplingParams | None = None, **fields):
        if fields:
            if sampling is not None:
                raise ValueError("pass either sampling=SamplingParams(...) or its fields as keywords, not both")
            sampling = SamplingParams(**fields)
        if sampling is None:
            sampling = GREEDY
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        self.config = model.config
        self.graphdef, self.params = nnx.split(model)
        self.sampling = sampling
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("max_len",))
        self._step = jax.jit(self._step_impl, donate_argnums=(1,))

    def init_cache(self, batch: int, max_len: int):
        c = self.config
        shape = (c.n_layer, batch, max_len, c.kv_heads, c.head_dim)
        dt = jnp.dtype(c.dtype)
        return jnp.zeros(shape, dt), jnp.zeros(shape, dt)

    def _prefill_impl(self, params, tokens, sp, *, max_len: int):
        """The prompt's K/V into a fresh cache; samples new token 0 (keys row_keys(seed, 0))."""
        model = nnx.merge(self.graphdef, params)
        b, s = tokens.shape
        cache = self.init_cache(b, max_len)

        def attend(i, q, k, v, state):
            kc, vc = state
            kc = jax.lax.dynamic_update_slice(kc, k[None].astype(kc.dtype), (i, 0, 0, 0, 0))
            vc = jax.lax.dynamic_update_slice(vc, v[None].astype(vc.dtype), (i, 0, 0, 0, 0))
            return model.blocks[i].attn.attend(q, k, v), (kc, vc)

        logits, cache = model.forward(tokens, attend=attend, state=cache, last_only=True)
        return sample(logits[:, -1], sp, row_keys(sp.seed, 0)), cache

    def _step_impl(self, params, cache, token, pos, sp, step):
        """token [b] at position pos (scalar) -> (new token number `step` [b], cache)."""
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
        return sample(logits[:, -1], sp, row_keys(sp.seed, step)), cache

    def generate(self, prompt_ids, max_new_tokens: int, *, seed: int | None = None,
                 stop_id: int | None = None) -> Iterator[np.ndarray]:
        """Yield sampled ids, [batch] per step. `prompt_ids`: [seq] or [batch, seq] ints.

        `seed` replaces the sampling seed for this call (every row uses it, as
        `flashjax.serving.generate` does with one SamplingParams for the batch).
        """
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
        params = self.sampling if seed is None else dataclasses.replace(self.sampling, seed=seed)
        sp = stack_params(params, b)
        tok, cache = self._prefill(self.params, jnp.asarray(tokens), sp, max_len=cache_len)
        for i in range(max_new_tokens):
            out = np.asarray(tok)
            yield out
            if stop_id is not None and np.all(out == stop_id):
                return
            if i + 1 == max_new_tokens:
                return
            tok, cache = self._step(self.params, cache, tok, jnp.int32(s + i), sp, jnp.int32(i + 1))
