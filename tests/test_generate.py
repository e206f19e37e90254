"""Paged-KV generation (flashjax.serving): greedy decoding equals recomputing the
full forward, chunked prefill equals one-piece prefill, seeded sampling, EOS,
bad input, and the decode loop being one compiled while_loop. The dense-cache
benchmark peer (flashjax.models.generate.DenseCacheSampler) samples with the same
sampler: its greedy and seeded tokens equal the paged loop's.

Tiny float32 models on CPU (Pallas kernels in interpret mode). Seeds are fixed
(not the session rng): exact token equality is checked, and a fixed model and
prompt set keeps that deterministic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

from flashjax import kv_cache
from flashjax.models.config import ModelConfig, config_from_preset
from flashjax.models.gpt import GPT
from flashjax.serving import generate as G
from flashjax.serving import runner as R
from flashjax.serving.sampling import GREEDY, SamplingParams, sample, stack_params

VOCAB = 97
CTX = 40
BS = 4  # block size: prompts and outputs cross several blocks
MAX_NEW = 7
# float32 logits/cache tolerance: Triton dots on a GPU may run in TF32
TOL = dict(atol=5e-3, rtol=5e-3) if jax.default_backend() == "gpu" else dict(atol=2e-5, rtol=2e-5)


def make_model(family: str) -> GPT:
    if family.startswith("llama"):
        extra = {}
        if family == "llama-window":  # Mistral-style sliding window shorter than the prompts
            if "sliding_window" not in ModelConfig.__dataclass_fields__:
                pytest.skip("this ModelConfig has no sliding_window field")
            extra = dict(sliding_window=6)
        c = config_from_preset("llama-nano", n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128,
                               vocab_size=VOCAB, max_seq_len=CTX, attention="xla", init_std=0.1,
                               tie_embeddings=False, **extra)
    else:  # head_dim 12: pages are padded to 16 for the decode kernel
        c = config_from_preset("nano", n_layer=2, d_model=48, n_head=4, vocab_size=VOCAB,
                               max_seq_len=CTX, attention="xla", init_std=0.1)
    return GPT(c, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


PROMPTS = [np.random.default_rng(1).integers(0, VOCAB, n).tolist() for n in (5, 11, 2)]


_FORWARD = {}


def full_logits(model, seqs):
    """The model's own logits for each row of `seqs` ([len_b, vocab] each), from one
    compiled forward over rows right-padded to the context length (the model is causal:
    padding after a row's last token cannot change its logits)."""
    if id(model) not in _FORWARD:
        graphdef, params = nnx.split(model)
        fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
        _FORWARD[id(model)] = (model, lambda t: fwd(params, t))
    toks = np.zeros((len(seqs), CTX), np.int32)
    for b, s in enumerate(seqs):
        toks[b, : len(s)] = s
    logits = np.asarray(_FORWARD[id(model)][1](jnp.asarray(toks)))
    return [logits[b, : len(s)] for b, s in enumerate(seqs)]


def reference_greedy(model, prompts, steps):
    """argmax(model(tokens)[:, -1]) per row, recomputing the whole forward for every token."""
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        for s, logits in zip(seqs, full_logits(model, seqs)):
            s.append(int(np.argmax(logits[-1])))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama-window"])
def test_greedy_matches_full_recompute(family, llama):
    model = llama if family == "llama" else make_model(family)
    tokens, lengths = G.generate(model, PROMPTS, MAX_NEW, block_size=BS)
    assert tokens.shape == (len(PROMPTS), MAX_NEW) and tokens.dtype == np.int32
    assert lengths.tolist() == [MAX_NEW] * len(PROMPTS)
    assert tokens.tolist() == reference_greedy(model, PROMPTS, MAX_NEW)
    # the streaming variant (host loop over jitted chunks) yields the same tokens
    if family == "llama":
        rows = [[] for _ in PROMPTS]
        for chunk in G.generate_stream(model, PROMPTS, MAX_NEW, block_size=BS, chunk_tokens=3):
            for r, new in zip(rows, chunk):
                r.extend(new)
        assert rows == tokens.tolist()


def _layer_kv(pages, state, max_len):
    return [kv_cache.gather_kv(k, v, state.block_tables, state.lengths, max_len=max_len) for k, v in pages]


def test_chunked_prefill_matches_one_piece(llama):
    model = llama
    runner = R.ModelRunner(model, num_blocks=24, max_seqs=3, block_size=BS)
    rng = np.random.default_rng(2)
    lens = [13, 6, 9]
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in lens]
    toks, lengths = R.pad_prompts(prompts, 16)

    pages, state = runner.init_cache()
    full, pages, state = runner.prefill(pages, state, toks, [0, 1, 2], lengths, all_logits=True)
    assert int(state.status) == kv_cache.OK
    kv_cache.check_invariants(state)
    for b, ref in enumerate(full_logits(model, prompts)):  # outputs equal the model's own forward
        np.testing.assert_allclose(full[b, : lens[b]], ref, **TOL)

    # Three chunks of up to 5 tokens (bucket 8), all through the continuation path: row 1
    # ends in chunk 2, row 2 only starts in chunk 2 (a new sequence inside a continuation
    # call), chunks 1 and 3 have padding rows (-1).
    pages2, state2 = runner.init_cache()
    chunks = [([0, 1, -1], [p[:5] for p in prompts[:2]] + [[]]),
              ([0, 1, 2], [prompts[0][5:10], prompts[1][5:], prompts[2][:5]]),
              ([0, -1, 2], [prompts[0][10:], [], prompts[2][5:]])]
    pieces = {0: [], 1: [], 2: []}
    for ids, parts in chunks:
        ct, cl = R.pad_prompts(parts, 8)
        logits, pages2, state2 = runner.prefill(pages2, state2, ct, ids, cl, continuation=True,
                                                all_logits=True)
        assert int(state2.status) == kv_cache.OK, kv_cache.status_name(state2.status)
        for b, s in enumerate(ids):
            if s >= 0 and cl[b]:
                pieces[s].append(np.asarray(logits[b, : cl[b]]))
    kv_cache.check_invariants(state2)
    np.testing.assert_array_equal(state2.lengths, lens)
    for s in range(3):
        np.testing.assert_allclose(np.concatenate(pieces[s]), full[s, : lens[s]], **TOL)
    for (k1, v1), (k2, v2) in zip(_layer_kv(pages, state, 16), _layer_kv(pages2, state2, 16)):
        np.testing.assert_allclose(k2, k1, **TOL)
        np.testing.assert_allclose(v2, v1, **TOL)

    # A decode step on either cache gives the same logits (and the recomputed ones).
    nxt = jnp.asarray([3, 4, 5], jnp.int32)
    d1, pages, state = runner.decode(pages, state, nxt, jnp.arange(3))
    d2, pages2, state2 = runner.decode(pages2, state2, nxt, jnp.arange(3))
    np.testing.assert_allclose(d2, d1, **TOL)
    refs = full_logits(model, [p + [int(t)] for p, t in zip(prompts, nxt)])
    for b, ref in enumerate(refs):
        np.testing.assert_allclose(d1[b], ref[-1], **TOL)


def test_seeded_sampling_reproducible_and_mixed_batch(llama):
    hot = dict(temperature=1.5, top_k=40, top_p=0.95)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[0]]
    a, _ = G.generate(llama, prompts, MAX_NEW, [SamplingParams(**hot, seed=1), SamplingParams(**hot, seed=1),
                                                 SamplingParams(**hot, seed=2)], block_size=BS)
    b, _ = G.generate(llama, prompts, MAX_NEW, SamplingParams(**hot, seed=1), block_size=BS)
    assert (a[0] == a[1]).all() and (b == a[0]).all()  # same seed: same tokens, batch-independent
    assert (a[2] != a[0]).any()  # another seed differs
    greedy, _ = G.generate(llama, PROMPTS, MAX_NEW, block_size=BS)
    mixed, _ = G.generate(llama, PROMPTS, MAX_NEW, [GREEDY, SamplingParams(**hot, seed=1), GREEDY], block_size=BS)
    assert (mixed[[0, 2]] == greedy[[0, 2]]).all()


def test_sample_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4))
    keys = jax.random.split(jax.random.key(0), 300)

    many = jax.jit(jax.vmap(lambda k, sp: sample(logits, sp, k), in_axes=(0, None)))

    def draws(p):
        return set(np.asarray(many(keys, stack_params(p, 4))).ravel().tolist())

    assert draws(SamplingParams(temperature=0)) == {0}
    assert draws(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.1)) == {0}
    assert draws(SamplingParams(temperature=5.0, top_k=1)) == {0}
    # per-row settings in one call
    sp = stack_params([GREEDY, SamplingParams(1.0, top_k=2), SamplingParams(1.0, top_p=0.1),
                       SamplingParams(1.0)], 4)
    rows = np.asarray(many(keys, sp))
    assert set(rows[:, 0]) == {0} and set(rows[:, 1]) == {0, 1} and set(rows[:, 2]) == {0}
    assert set(rows[:, 3]) == {0, 1, 2, 3}



# The dense-cache loop (flashjax.models.generate.DenseCacheSampler) is only a benchmark
# peer now, but it samples with the same sampler as the paged loop: same tokens.
HOT = dict(temperature=1.5, top_k=40, top_p=0.95)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dense_peer_greedy_equals_the_paged_loop(family, llama):
    from flashjax.models.generate import DenseCacheSampler

    model = llama if family == "llama" else make_model(family)
    paged, _ = G.generate(model, PROMPTS[:2], MAX_NEW, block_size=BS)
    sampler = DenseCacheSampler(model)  # no sampling: greedy, like the paged loop
    for b, prompt in enumerate(PROMPTS[:2]):
        dense = [int(t[0]) for t in sampler.generate(prompt, MAX_NEW)]
        assert dense == paged[b].tolist()


def test_dense_peer_seeded_draws_use_the_shared_sampler(llama):
    """A seeded temperature > 0 draw of the dense loop is `sample(logits, SamplingParams,
    row_keys(seed, i))` of the model's logits, and so equals the paged loop's draw."""
    from flashjax.models.generate import DenseCacheSampler
    from flashjax.serving.sampling import row_keys

    prompt = PROMPTS[1]
    sp = SamplingParams(**HOT, seed=5)
    got = [int(t[0]) for t in DenseCacheSampler(llama, sp).generate(prompt, MAX_NEW)]
    # the same settings as keywords, and a per-call seed, reach the same sampler
    assert [int(t[0]) for t in DenseCacheSampler(llama, **HOT).generate(prompt, MAX_NEW, seed=5)] == got
    # the logits before each new token, from a full forward over prompt + draws
    logits = full_logits(llama, [prompt + got])[0][len(prompt) - 1: -1]
    arrays = stack_params(sp, 1)
    expect = [int(sample(jnp.asarray(logits[i][None]), arrays, row_keys(arrays.seed, i))[0])
              for i in range(MAX_NEW)]
    assert got == expect
    paged, _ = G.generate(llama, [prompt], MAX_NEW, sp, block_size=BS)
    assert paged[0].tolist() == got
    other = [int(t[0]) for t in DenseCacheSampler(llama, sp).generate(prompt, MAX_NEW, seed=6)]
    assert other != got  # the seed matters
    with pytest.raises(ValueError, match="top_p"):
        DenseCacheSampler(llama, top_p=0.0)  # validated like every SamplingParams

def test_eos_stops_a_sequence(llama):
    greedy, _ = G.generate(llama, PROMPTS, MAX_NEW, block_size=BS)
    eos = int(greedy[0, 2])
    tokens, lengths = G.generate(llama, PROMPTS, MAX_NEW, eos_id=eos, pad_id=0, block_size=BS)
    for row, out, n in zip(greedy, tokens, lengths):
        hits = np.flatnonzero(row == eos)
        want = int(hits[0]) + 1 if hits.size else MAX_NEW
        assert n == want
        assert (out[:n] == row[:n]).all() and (out[n:] == 0).all()
    # every row stopping at once ends the loop early
    tokens, lengths = G.generate(llama, [PROMPTS[0]] * 3, MAX_NEW, eos_id=int(greedy[0, 0]), block_size=BS)
    assert lengths.tolist() == [1, 1, 1] and (tokens[:, 1:] == 0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, VOCAB]]), "outside the vocabulary"),
    (dict(prompts=[[1] * (CTX - 3)]), "model's context"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(sampling=[GREEDY, "hot", GREEDY]), r"sampling\[1\] must be a SamplingParams"),
    (dict(max_seqs=2), "only max_seqs=2 slots"),
    (dict(num_blocks=4), "num_blocks=4"),
    (dict(block_size=3), "block_size must be a positive power of two"),
    (dict(eos_id=VOCAB), "eos_id"),
    (dict(sampling=[GREEDY, GREEDY]), "sampling has 2 entries but the batch has 3"),
])
def test_bad_input_raises(llama, kwargs, match):
    args = dict(prompts=PROMPTS, max_new_tokens=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        G.generate(llama, **args, **({} if "block_size" in kwargs else {"block_size": BS}))


@pytest.mark.parametrize("field, kwargs", [
    ("temperature", dict(temperature=-0.5)),
    ("temperature", dict(temperature=float("nan"))),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-1)),
    ("top_k", dict(top_k=2.5)),
    ("seed", dict(seed=-1)),
    ("seed", dict(seed=2**32)),
])
def test_bad_sampling_params(field, kwargs):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


def _count_paged_decode(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        name = str(eqn.params.get("name", "")) + str(eqn.params.get("name_and_src_info", ""))
        if eqn.primitive.name == "pallas_call" and "paged_decode" in name:
            n += 1
        elif eqn.primitive.name != "pallas_call":
            for sub in jaxprs_in_params(eqn.params):
                n += _count_paged_decode(sub)
    return n


def _whiles(jaxpr):
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            out.append(eqn)
        elif eqn.primitive.name != "pallas_call":
            for sub in jaxprs_in_params(eqn.params):
                out.extend(_whiles(sub))
    return out


def test_decode_loop_is_one_compiled_while_loop(llama):
    c = llama.config
    plan = G.plan_generation(c, PROMPTS, MAX_NEW, block_size=BS)
    graphdef, params = nnx.split(llama)
    closed = jax.make_jaxpr(lambda p, *a: G._generate_jit(p, *a, **G._static(graphdef, plan)))(
        params, *G._device_args(plan))
    loops = [w for w in _whiles(closed.jaxpr) if _count_paged_decode(w.params["body_jaxpr"].jaxpr)]
    assert len(loops) == 1, "the decode steps must all run inside one while_loop"
    assert _count_paged_decode(loops[0].params["body_jaxpr"].jaxpr) == c.n_layer
    assert _count_paged_decode(closed.jaxpr) == c.n_layer  # no decode step outside the loop

    # Warm up twice: the first interpret-mode Pallas run of a process imports a jax module
    # that registers a config flag, which changes jax's trace context once.
    for _ in range(2):
        G.generate(llama, PROMPTS, MAX_NEW, block_size=BS)
    before = G.trace_count()
    # other prompt lengths and token counts in the same buckets: no new compilation
    t1, n1 = G.generate(llama, [p[:3] for p in PROMPTS], 4, block_size=BS)
    t2, n2 = G.generate(llama, [p + [1, 2] for p in PROMPTS], 9, block_size=BS)
    assert G.trace_count() == before
    assert t1.shape == (3, 4) and t2.shape == (3, 9) and n2.tolist() == [9, 9, 9]
