"""The Flax GPT: configs and presets, flash vs xla attention (logits and
gradients), remat, mixed precision, the external-attention hook and the
dense-KV-cache sampler. Tiny shapes: flash runs in Pallas interpret mode on CPU."""

from __future__ import annotations

import logging

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flashjax.models.attention_ops import causal_attention, resolve_attention, xla_attention
from flashjax.models.config import ModelConfig, config_from_preset, parse_overrides
from flashjax.models.gpt import GPT

TINY = dict(n_layer=2, d_model=64, n_head=4, vocab_size=97, max_seq_len=64)
FAMILIES = {
    "gpt2": dict(preset="nano", **TINY),
    "llama": dict(preset="llama-nano", **TINY, n_kv_head=2, d_ff=96),
}


def tiny(family: str, **kw) -> ModelConfig:
    d = dict(FAMILIES[family])
    preset = d.pop("preset")
    d.update(kw)
    return config_from_preset(preset, **d)


def tokens(key, batch=2, seq=32, vocab=97):
    return jax.random.randint(key, (batch, seq), 0, vocab)


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


def test_unknown_preset_is_one_line_error_listing_presets():
    with pytest.raises(ValueError) as e:
        config_from_preset("gpt5")
    msg = str(e.value)
    assert "\n" not in msg and "'gpt5'" in msg
    for name in ("nano", "gpt2", "llama-1b"):
        assert name in msg


def test_unknown_field_is_one_line_error_listing_fields():
    with pytest.raises(ValueError) as e:
        config_from_preset("nano", n_layers=3)
    msg = str(e.value)
    assert "\n" not in msg and "'n_layers'" in msg and "n_layer" in msg and "d_model" in msg
    with pytest.raises(ValueError, match="unknown config field 'bogus'"):
        parse_overrides(["bogus=1"])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(d_model=100, n_head=3), "n_head=3 does not divide d_model=100"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head=3 does not divide n_head=4"),
        (dict(attention="fast"), "unknown attention 'fast'"),
        (dict(family="bert"), "unknown family 'bert'"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(dtype="int8"), "unknown dtype 'int8'"),
    ],
)
def test_invalid_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        config_from_preset("nano", **kw)


def test_presets_and_overrides():
    c = config_from_preset("gpt2")
    assert (c.n_layer, c.d_model, c.n_head, c.max_seq_len, c.vocab_size) == (12, 768, 12, 1024, 50257)
    assert 123e6 < c.param_count() < 126e6  # GPT-2 small: 124M
    assert config_from_preset("gpt2", vocab_size=50304).vocab_size == 50304
    big = config_from_preset("llama-1b")
    assert (big.n_layer, big.d_model, big.n_head, big.kv_heads, big.ffn_dim) == (16, 2048, 32, 8, 8192)
    assert 0.9e9 < big.param_count() < 1.3e9
    assert big.max_seq_len >= 2048
    ov = parse_overrides(["n_layer=2", "attention=xla", "remat=true", "n_kv_head=none", "rope_theta=1e4"])
    assert ov == dict(n_layer=2, attention="xla", remat=True, n_kv_head=None, rope_theta=1e4)
    c2 = ModelConfig.from_json(config_from_preset("llama-nano", **ov).to_json())
    assert c2 == config_from_preset("llama-nano", **ov)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_param_count_matches_model(family):
    c = tiny(family, tie_embeddings=(family == "gpt2"))
    m = GPT(c, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n == c.param_count()


def test_auto_attention_picks_xla_on_cpu_and_says_so(caplog):
    from flashjax.models import attention_ops

    attention_ops._announced.clear()
    with caplog.at_level(logging.INFO, logger="flashjax.models"):
        assert resolve_attention("auto") == ("flash" if jax.default_backend() == "gpu" else "xla")
    assert "attention='auto' picked" in caplog.text
    assert resolve_attention("flash") == "flash"


# --------------------------------------------------------------------------
# Forward / backward
# --------------------------------------------------------------------------


def _logits_and_grads(config, toks):
    model = GPT(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(p):
        logits = nnx.merge(graphdef, p)(toks)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), toks[:, 1:, None], axis=-1)
        return jnp.mean(ce), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_flash_matches_xla_logits_and_grads(family, rng):
    toks = tokens(rng(), seq=48)
    lf, gf = _logits_and_grads(tiny(family, attention="flash"), toks)
    lx, gx = _logits_and_grads(tiny(family, attention="xla"), toks)
    assert lf.shape == (2, 48, 97) and lf.dtype == jnp.float32
    # fp32 tolerances; on a GPU both sides may run TF32 dots, so loosen there
    loose = 100.0 if jax.default_backend() == "gpu" else 1.0
    np.testing.assert_allclose(lf, lx, atol=2e-5 * loose, rtol=2e-5 * loose)
    flat_f = jax.tree_util.tree_leaves_with_path(gf)
    flat_x = jax.tree.leaves(gx)
    for (path, a), b in zip(flat_f, flat_x):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        np.testing.assert_allclose(a, b, atol=1e-4 * scale * loose, rtol=1e-3 * loose,
                                   err_msg=jax.tree_util.keystr(path))


def test_xla_attention_matches_reference_with_gqa(rng):
    import flashjax

    kq, kk, kv = rng(3)
    q = jax.random.normal(kq, (2, 24, 4, 16))
    k = jax.random.normal(kk, (2, 24, 2, 16))
    v = jax.random.normal(kv, (2, 24, 2, 16))
    ref = flashjax.attention_reference(q, k, v, causal=True)
    np.testing.assert_allclose(xla_attention(q, k, v), ref, atol=1e-5, rtol=1e-5)
    # decode form: one query against a cache prefix
    lengths = jnp.array([7, 24])
    o = xla_attention(q[:, 6:7], k, v, causal=False, kv_lengths=lengths)
    ref7 = flashjax.attention_reference(q[:1, 6:7], k[:1, :7], v[:1, :7])
    np.testing.assert_allclose(o[:1], ref7, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama"])
def test_remat_gives_same_gradients(family, rng):
    toks = tokens(rng(), seq=16)
    l0, g0 = _logits_and_grads(tiny(family, attention="xla"), toks)
    l1, g1 = _logits_and_grads(tiny(family, attention="xla", remat=True), toks)
    np.testing.assert_allclose(l0, l1, atol=1e-6, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_compute_keeps_fp32_params(rng):
    toks = tokens(rng(), seq=16)
    c32 = tiny("llama", attention="xla")
    c16 = tiny("llama", attention="xla", dtype="bfloat16")
    m16 = GPT(c16, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16)))
    l16 = m16(toks)
    l32 = GPT(c32, rngs=nnx.Rngs(0))(toks)
    assert l16.dtype == jnp.float32
    np.testing.assert_allclose(l16, l32, atol=5e-2, rtol=5e-2)


def test_vocab_projection_backward_runs_in_the_compute_dtype(rng):
    """The logits' einsum returns float32; its backward matmuls take bf16 operands
    (not the float32 cotangent with upcast weights) and match float32 autodiff within
    bf16 tolerance; with float32 operands it is plain autodiff."""
    from flashjax.models.gpt import vocab_projection

    kx, kw, kg = rng(3)
    x = jax.random.normal(kx, (2, 8, 32))
    w = jax.random.normal(kw, (97, 32)) * 0.2
    g = jax.random.normal(kg, (2, 8, 97))
    spec = "bsd,vd->bsv"

    def grads(f, a, b):
        out, vjp = jax.vjp(f, a, b)
        return (out, *vjp(g.astype(out.dtype)))

    plain = lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)  # noqa: E731
    ours = lambda a, b: vocab_projection(spec, a, b)  # noqa: E731
    for got, want in zip(grads(ours, x, w), grads(plain, x, w)):  # float32: identical
        np.testing.assert_array_equal(got, want)
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    o16, dx16, dw16 = grads(ours, x16, w16)
    assert (o16.dtype, dx16.dtype, dw16.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
    _, dx, dw = grads(plain, x16.astype(jnp.float32), w16.astype(jnp.float32))
    for got, want in ((dx16, dx), (dw16, dw)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2 * scale, rtol=2e-2)
    # every matmul in the bf16 backward takes bf16 operands
    jaxpr = jax.make_jaxpr(lambda a, b: grads(ours, a, b))(x16, w16)
    dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) >= 3, dots  # forward, dx, dw (the custom_vjp also holds its primal)
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16, jnp.bfloat16], e


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _all_eqns(sub)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attend_hook_reproduces_the_forward(family, rng):
    """forward(attend=...) hands out q, k, v per layer; returning the causal
    attention of them must reproduce the plain call, with state threaded."""
    c = tiny(family, attention="xla")
    model = GPT(c, rngs=nnx.Rngs(0))
    toks = tokens(rng(), seq=20)
    seen = []

    def attend(i, q, k, v, state):
        assert q.shape == (2, 20, c.n_head, c.head_dim) and k.shape == (2, 20, c.kv_heads, c.head_dim)
        seen.append(i)
        return causal_attention(q, k, v, "xla"), state + 1

    logits, state = model.forward(toks, attend=attend, state=0)
    assert seen == list(range(c.n_layer)) and state == c.n_layer
    np.testing.assert_allclose(logits, model(toks), atol=1e-6, rtol=1e-6)
    last, _ = model.forward(toks, last_only=True)
    np.testing.assert_allclose(last[:, 0], logits[:, -1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dense_cache_greedy_decode_matches_full_recompute(family, rng):
    from flashjax.models.generate import DenseCacheSampler

    c = tiny(family, attention="xla")
    model = GPT(c, rngs=nnx.Rngs(3))
    prompt = [int(t) for t in tokens(rng(), batch=1, seq=5)[0]]
    sampler = DenseCacheSampler(model, temperature=0.0)
    got = [int(t[0]) for t in sampler.generate(prompt, 8)]
    # teacher-forced full forward over prompt + output: each sampled token must be
    # the argmax of the full model at the position before it
    full = model(jnp.asarray([prompt + got]))[0]
    expect = [int(t) for t in jnp.argmax(full[len(prompt) - 1 : -1], axis=-1)]
    assert got == expect
