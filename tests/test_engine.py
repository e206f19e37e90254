"""The continuous-batching engine (flashjax.serving.engine) on a tiny random model, CPU.

One module-level engine is shared (its jitted steps compile once); its pool is
small (16 blocks of 4 tokens for 4 slots) so concurrent requests run out of
blocks and get preempted. Preemption mode and prefix caching are switched per
test on the same engine.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax.models.config import config_from_preset
from flashjax.models.gpt import build_model
from flashjax.serving.engine import Engine, QueueFullError, RequestParams

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    cfg = config_from_preset("nano", n_layer=2, d_model=64, n_head=4, vocab_size=VOCAB, max_seq_len=64,
                             attention="xla", init_std=0.3)
    return build_model(cfg, 0)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, num_blocks=16, max_seqs=4, block_size=4, max_num_batched_tokens=16,
                  prefill_rows=2, max_chunk=8, chunk_buckets=(8,), logprobs_k=4)


@pytest.fixture
def eng(engine):
    engine.preemption_mode = engine.scheduler.preemption_mode = "recompute"
    engine.blocks.prefix_caching = True
    yield engine
    assert not engine.has_unfinished()
    engine.blocks.check()
    assert engine.blocks.num_used == 0


def _prompts(n, seed=0, lo=2, hi=14):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, VOCAB, size=rs.randint(lo, hi)).tolist() for _ in range(n)]


CTX = 64  # the model fixture's max_seq_len: every reference context fits


@functools.lru_cache(maxsize=None)
def _forward_fn(model):
    """f(tokens [1, n]) -> the model's logits after the last token, from one compiled
    forward over the context right-padded to CTX (the model is causal: padding after the
    last token cannot change its logits), as tests/test_generate.py's reference does.
    Compiled once instead of once per context length (23 compiles of the model in this
    file, each an XLA GPU compile on a GPU, where test_concurrent_equals_alone_with_preemption
    took 161 s against 20 s on CPU)."""
    fwd = jax.jit(lambda t, n: model(t)[0, n - 1])

    def f(tokens):
        tokens = np.asarray(tokens)
        n = tokens.shape[1]
        assert tokens.shape[0] == 1 and 0 < n <= CTX, tokens.shape
        padded = np.zeros((1, CTX), np.int32)
        padded[:, :n] = tokens
        return fwd(jnp.asarray(padded), jnp.int32(n))

    return f


def reference_greedy(model, prompt, n):
    """No cache: the whole context through the model for every token."""
    f = _forward_fn(model)
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(jnp.argmax(f(jnp.asarray([toks])))))
    return toks[len(prompt):]


GREEDY8 = RequestParams(temperature=0, max_tokens=8)
GREEDY16 = RequestParams(temperature=0, max_tokens=16)


def test_concurrent_equals_alone_with_preemption(eng, model):
    prompts = _prompts(6, seed=1, lo=6)
    eng.blocks.prefix_caching = False
    alone = [eng.generate([p], GREEDY16)[0].outputs[0].token_ids for p in prompts]
    before = eng.stats_counters["preemptions"]
    together = [o.outputs[0].token_ids for o in eng.generate(prompts, GREEDY16)]
    assert together == alone
    assert eng.stats_counters["preemptions"] > before, "the small pool should force preemption"
    for p, out in list(zip(prompts, alone))[:2]:
        assert out == reference_greedy(model, p, 16)
    assert all(len(o) == 16 for o in alone)


def test_swap_preemption(eng):
    prompts = _prompts(6, seed=2, lo=6)
    eng.blocks.prefix_caching = False
    alone = [eng.generate([p], GREEDY16)[0].outputs[0].token_ids for p in prompts]
    eng.preemption_mode = eng.scheduler.preemption_mode = "swap"
    before = eng.stats_counters["swap_out"]
    together = [o.outputs[0].token_ids for o in eng.generate(prompts, GREEDY16)]
    assert together == alone
    assert eng.stats_counters["swap_out"] > before and eng.stats_counters["swap_in"] >= eng.stats_counters["swap_out"]


def test_prefix_cache_hits_do_not_change_outputs(eng):
    shared = list(range(1, 13))  # 3 full blocks
    prompts = [shared + [20 + i, 30 + i] for i in range(3)]
    eng.blocks.prefix_caching = False
    expected = [eng.generate([p], GREEDY8)[0].outputs[0].token_ids for p in prompts]
    eng.blocks.prefix_caching = True
    first = eng.generate([prompts[0]], GREEDY8)[0]
    hits0 = eng.stats_counters["prefix_hit_tokens"]
    prefill0 = eng.stats_counters["prefill_tokens"]
    outs = eng.generate(prompts[1:], GREEDY8)
    assert [first.outputs[0].token_ids] + [o.outputs[0].token_ids for o in outs] == expected
    assert eng.stats_counters["prefix_hit_tokens"] - hits0 == 2 * 12
    assert all(o.num_cached_prompt_tokens == 12 for o in outs)
    # only the 2 uncached prompt tokens of each were prefilled (plus a possible recompute)
    assert eng.stats_counters["prefill_tokens"] - prefill0 <= 2 * 2 + 8
    assert eng.stats()["prefix_cache_hit_rate"] > 0


def test_sampling_seeds_and_parallel_samples(eng):
    prompt = _prompts(1, seed=3)[0]
    p = RequestParams(temperature=0.9, top_k=20, top_p=0.95, seed=7, max_tokens=6)
    a = eng.generate([prompt], p)[0].outputs[0].token_ids
    b = eng.generate([prompt, _prompts(1, seed=4)[0]], [p, GREEDY8])[0].outputs[0].token_ids
    assert a == b, "a row's samples depend only on its seed, not its neighbours"
    p1 = RequestParams(temperature=0.9, top_k=20, top_p=0.95, seed=8, max_tokens=6)
    c = eng.generate([prompt], p1)[0].outputs[0].token_ids
    # n=2 forks the prompt's blocks (copy-on-write); sample i uses seed + i
    pn = RequestParams(temperature=0.9, top_k=20, top_p=0.95, seed=7, max_tokens=6, n=2)
    out = eng.generate([prompt], pn)[0]
    assert [o.token_ids for o in out.outputs] == [a, c]


def reference_beam(model, prompt, width, steps):
    f = _forward_fn(model)
    beams = [(0.0, [])]
    for _ in range(steps):
        cands = []
        for bi, (score, out) in enumerate(beams):
            lp = jax.nn.log_softmax(f(jnp.asarray([prompt + out])))
            top = np.argsort(-np.asarray(lp), kind="stable")[:width]
            for t in top:
                cands.append((score + float(lp[t]), bi, int(t), out))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        beams = [(s, out + [t]) for s, _, t, out in cands[:width]]
    return beams


def test_beam_search_matches_reference(eng, model):
    prompt = _prompts(1, seed=5, lo=5, hi=8)[0]
    out = eng.generate([prompt], RequestParams(temperature=0, max_tokens=5, beam_width=3, n=3))[0]
    ref = reference_beam(model, prompt, 3, 5)
    assert [o.token_ids for o in out.outputs] == [r[1] for r in ref]
    np.testing.assert_allclose([o.score for o in out.outputs], [r[0] for r in ref], rtol=1e-4, atol=1e-4)


def test_streaming_stop_ids_and_cancel(eng):
    prompt = _prompts(1, seed=6)[0]
    full = eng.generate([prompt], GREEDY8)[0].outputs[0].token_ids
    got = []
    h = eng.add_request(prompt, RequestParams(temperature=0, max_tokens=8, stop_token_ids=(full[3],)),
                        callback=lambda ev: got.append(ev))
    eng.run_until_done()
    res = h.result()
    stop_at = full.index(full[3]) + 1
    assert res.outputs[0].token_ids == full[:stop_at] and res.outputs[0].finish_reason == "stop"
    assert [t for ev in got for t in ev.token_ids] == full[:stop_at]
    assert got[-1].finish_reason == "stop"
    # cancellation frees the blocks at once
    h2 = eng.add_request(prompt, RequestParams(temperature=0, max_tokens=40))
    for _ in range(4):
        eng.step()
    assert eng.blocks.num_used > 0
    assert eng.cancel(h2.request_id)
    assert eng.blocks.num_used == 0 and h2.finished
    assert h2.result().outputs[0].finish_reason == "cancelled"
    assert not eng.cancel(h2.request_id)


def test_validation_and_bounded_queue(eng, model):
    with pytest.raises(ValueError, match="temperature"):
        RequestParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        RequestParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        RequestParams(top_p=0)
    with pytest.raises(ValueError, match="context length"):
        eng.add_request(list(range(64)), GREEDY8)
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request([VOCAB + 1], GREEDY8)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], GREEDY8)
    eng.max_waiting = 2
    try:
        hs = [eng.add_request([1, 2, 3], GREEDY8) for _ in range(2)]
        with pytest.raises(QueueFullError):
            eng.add_request([1, 2, 3], GREEDY8)
    finally:
        eng.max_waiting = None
    eng.run_until_done()
    assert all(h.result().outputs[0].finish_reason == "length" for h in hs)


def test_warmup_compiles_in_threads_then_requests_compile_nothing(model):
    """Engine.warmup lowers every step variant and compiles them in threads; requests
    afterwards start no XLA compile at all, and give the tokens of an engine that
    compiled its variants on first use, one at a time."""
    from jax._src import monitoring
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    compiles = []

    def listen(event, duration, **kw):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    kw = dict(num_blocks=16, max_seqs=4, block_size=4, max_num_batched_tokens=16, prefill_rows=2,
              max_chunk=8, chunk_buckets=(8,), logprobs_k=4, decode_steps=2)
    prompts = _prompts(5, seed=21, lo=3, hi=12)
    params = RequestParams(temperature=0, max_tokens=6)
    monitoring.register_event_duration_secs_listener(listen)
    try:
        warm = Engine(model, **kw)
        warm.warmup(compile_threads=3)
        assert len(compiles) >= 4, compiles  # the variants (the table buckets x 2, prefill x 2)
        compiles.clear()
        got = [o.outputs[0].token_ids for o in warm.generate(prompts, params)]
        assert compiles == [], f"{len(compiles)} compiles after warmup"
    finally:
        monitoring.unregister_event_duration_listener(listen)
    cold = Engine(model, **kw)
    assert got == [o.outputs[0].token_ids for o in cold.generate(prompts, params)]
    assert all(len(t) == 6 for t in got)


def test_background_thread_and_bounded_compiles(eng):
    # warm-up: every step variant (prefill only, prefill + decode, decode only)
    eng.generate(_prompts(3, seed=8, lo=10, hi=20), RequestParams(temperature=0, max_tokens=3))
    before = dict(eng.trace_counts)
    prompts = _prompts(10, seed=9, lo=1, hi=30)
    eng.start()
    try:
        hs = [eng.add_request(p, RequestParams(temperature=0.5 * (i % 2), seed=i, max_tokens=1 + i % 7))
              for i, p in enumerate(prompts)]
        outs = [h.result(timeout=120) for h in hs]
    finally:
        eng.stop()
    assert [len(o.outputs[0].token_ids) for o in outs] == [1 + i % 7 for i in range(10)]
    assert dict(eng.trace_counts) == before, "a varied workload must not compile anything new"
    # 4 step variants for the single chunk bucket: prefill with and without a decode step,
    # one decode step, K decode steps; each also with top-k/top-p filtering (earlier tests
    # use it) (+1: JAX registers a tracing-context config value lazily on first use, which
    # retraces once); swap out/in, block copy
    assert eng.trace_counts["step"] <= 2 * 4 + 1
    assert eng.num_compiles() <= 2 * 4 + 1 + 3, dict(eng.trace_counts)
    s = eng.stats()
    assert s["requests_finished"] >= 10 and s["ttft_p50"] is not None and s["tpot_p50"] is not None


def test_requests_from_another_thread_join_the_running_batch(eng):
    """The engine thread must not starve other threads of its lock: requests added
    while it runs (as the HTTP server does) join the running batch."""
    eng.generate(_prompts(2, seed=12, lo=3, hi=6), RequestParams(temperature=0, max_tokens=2))  # compile
    eng.stats_counters["max_decode_batch"] = 0
    eng.start()
    try:
        ps = _prompts(3, seed=11, lo=3, hi=6)
        hs = [eng.add_request(ps[0], RequestParams(temperature=0, max_tokens=50))]
        deadline = time.time() + 60
        while not hs[0].token_ids[0]:  # the first one is decoding on the engine thread
            assert time.time() < deadline
            time.sleep(0.0005)
        for p in ps[1:]:
            hs.append(eng.add_request(p, RequestParams(temperature=0, max_tokens=12)))
        outs = [h.result(timeout=120) for h in hs]
        assert [len(o.outputs[0].token_ids) for o in outs] == [50, 12, 12]
    finally:
        eng.stop()
    assert eng.stats_counters["max_decode_batch"] >= 2, eng.stats_counters


def test_cancel_while_a_step_runs_frees_blocks_after_it(eng):
    """A cancel that arrives while a step is on the device is applied when it returns."""
    eng.start()
    try:
        h = eng.add_request(_prompts(1, seed=13, lo=5, hi=8)[0], RequestParams(temperature=0, max_tokens=40))
        deadline = time.time() + 60
        while not h.token_ids[0]:
            assert time.time() < deadline
            time.sleep(0.001)
        assert eng.cancel(h.request_id)
        assert h.wait(timeout=30)
    finally:
        eng.stop()
    assert h.result().outputs[0].finish_reason == "cancelled"
    assert len(h.result().outputs[0].token_ids) < 40


def _engine_like(engine, **kw):
    """A second engine on the same model and geometry (its own compiles)."""
    args = dict(num_blocks=16, max_seqs=4, block_size=4, max_num_batched_tokens=16, prefill_rows=2,
                max_chunk=8, chunk_buckets=(8,), logprobs_k=4)
    args.update(kw)
    return Engine(nnx_model(engine), **args)


def nnx_model(engine):
    from flax import nnx
    return nnx.merge(engine.runner.graphdef, engine.runner.params)


@pytest.fixture(scope="module")
def sync_engine(engine):
    """One step per call, each read back before the next is planned: the reference."""
    return _engine_like(engine, decode_steps=1, overlap=False)


def test_async_multistep_equals_one_step_at_a_time(eng, sync_engine):
    prompts = _prompts(6, seed=21, lo=3, hi=12)
    params = [RequestParams(temperature=0, max_tokens=5 + 3 * i) for i in range(3)] + \
             [RequestParams(temperature=0.8, top_k=30, seed=i, max_tokens=9 + i) for i in range(3)]
    calls0 = eng.stats_counters["multi_step_calls"]
    fast = [o.outputs[0].token_ids for o in eng.generate(prompts, params)]
    assert eng.stats_counters["multi_step_calls"] > calls0, "the workload should use multi-step calls"
    ref = [o.outputs[0].token_ids for o in sync_engine.generate(prompts, params)]
    assert fast == ref
    assert [len(t) for t in fast] == [p.max_tokens for p in params]


def test_no_token_after_a_stop_in_multistep(eng, sync_engine):
    """EOS, stop ids and max_tokens cut exactly where one-step-at-a-time decoding cuts,
    though the device ran further in the same call or the step dispatched after it."""
    prompt = _prompts(1, seed=22, lo=4, hi=6)[0]
    full = sync_engine.generate([prompt], RequestParams(temperature=0, max_tokens=30))[0].outputs[0].token_ids
    stop_tok = full[11]
    first = full.index(stop_tok)
    got = []
    h = eng.add_request(prompt, RequestParams(temperature=0, max_tokens=30, stop_token_ids=(stop_tok,)),
                        callback=got.append)
    eng.run_until_done()
    out = h.result().outputs[0]
    assert out.token_ids == full[:first + 1] and out.finish_reason == "stop"
    assert [t for ev in got for t in ev.token_ids] == full[:first + 1]
    # the engine's end-of-text id stops like a stop id (and ignore_eos does not)
    e2 = _engine_like(eng, eos_id=stop_tok)
    assert e2.generate([prompt], RequestParams(temperature=0, max_tokens=30))[0].outputs[0].token_ids == \
        full[:first + 1]
    assert e2.generate([prompt], RequestParams(temperature=0, max_tokens=30, ignore_eos=True))[0] \
        .outputs[0].token_ids == full
    # max_tokens not a multiple of K
    h = eng.add_request(prompt, RequestParams(temperature=0, max_tokens=13), callback=got.append)
    got.clear()
    eng.run_until_done()
    assert h.result().outputs[0].token_ids == full[:13]
    assert [t for ev in got for t in ev.token_ids] == full[:13]


def test_cancel_in_the_middle_of_multistep_frees_every_block(eng):
    eng.start()
    try:
        hs = [eng.add_request(p, RequestParams(temperature=0, max_tokens=40)) for p in _prompts(3, seed=23, lo=3, hi=8)]
        deadline = time.time() + 60
        while not all(h.token_ids[0] for h in hs):
            assert time.time() < deadline
            time.sleep(0.0005)
        for h in hs:
            assert eng.cancel(h.request_id)
        assert all(h.wait(timeout=30) for h in hs)
        assert all(len(h.result().outputs[0].token_ids) < 40 for h in hs)
    finally:
        eng.stop()
    assert eng.blocks.num_used == 0 and not eng.scheduler.running


class _AsciiTokenizer:
    """ids 0..127 are ASCII bytes (the test model's whole vocabulary)."""

    eot_id = None

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        return bytes(ids)


def test_stop_strings_across_tokens_stream_exactly_the_text(eng):
    e = _engine_like(eng, tokenizer=_AsciiTokenizer())
    prompt = _prompts(1, seed=24, lo=4, hi=6)[0]
    full = e.generate([prompt], RequestParams(temperature=0, max_tokens=30))[0].outputs[0]
    text = _AsciiTokenizer().decode(full.token_ids)
    assert full.text == text
    stop = text[9:12]  # three characters from three tokens
    cut = text.find(stop)
    events = []
    h = e.add_request(prompt, RequestParams(temperature=0, max_tokens=30, stop=(stop,)), callback=events.append)
    e.run_until_done()
    out = h.result().outputs[0]
    assert out.finish_reason == "stop" and out.text == text[:cut]
    assert "".join(ev.text for ev in events) == text[:cut]
    # tokens end with the one that completed the stop string; none after it is streamed
    assert out.token_ids == full.token_ids[:cut + len(stop)]
    assert [t for ev in events for t in ev.token_ids] == out.token_ids
    # without a stop: the stream concatenates to the whole text
    events.clear()
    h = e.add_request(prompt, RequestParams(temperature=0, max_tokens=30), callback=events.append)
    e.run_until_done()
    assert "".join(ev.text for ev in events) == text == h.result().outputs[0].text


def _reference_penalized(model, prompt, n, presence=0.0, frequency=0.0, bias=None):
    """Greedy with OpenAI penalties on generated tokens and a logit bias, no cache."""
    f = _forward_fn(model)
    toks, out = list(prompt), []
    for _ in range(n):
        lg = np.asarray(f(jnp.asarray([toks])), np.float64)
        counts = np.bincount(out, minlength=lg.shape[0]).astype(np.float64)
        lg = lg - presence * (counts > 0) - frequency * counts
        for t, b in (bias or {}).items():
            lg[t] += b
        out.append(int(np.argmax(lg)))
        toks.append(out[-1])
    return out


def test_logprobs_penalties_and_logit_bias(eng, model):
    prompt = _prompts(1, seed=25, lo=4, hi=6)[0]
    out = eng.generate([prompt], RequestParams(temperature=0, max_tokens=6, logprobs=3))[0].outputs[0]
    assert out.token_ids == reference_greedy(model, prompt, 6) and len(out.logprobs) == 6
    f = _forward_fn(model)
    toks = list(prompt)
    for t, (lp, top) in zip(out.token_ids, out.logprobs):
        ref = np.asarray(jax.nn.log_softmax(f(jnp.asarray([toks]))))
        assert len(top) == 3 and top[0][0] == t
        np.testing.assert_allclose(lp, ref[t], atol=1e-4)
        np.testing.assert_allclose([x for _, x in top], np.sort(ref)[::-1][:3], atol=1e-4)
        toks.append(t)
    # without logprobs nothing is returned
    assert eng.generate([prompt], GREEDY8)[0].outputs[0].logprobs is None
    # penalties on the device equal the reference, also across multi-step calls
    p = RequestParams(temperature=0, max_tokens=14, presence_penalty=0.5, frequency_penalty=1.5)
    got = eng.generate([prompt], p)[0].outputs[0].token_ids
    assert got == _reference_penalized(model, prompt, 14, 0.5, 1.5)
    assert got != reference_greedy(model, prompt, 14), "the penalties should change this greedy run"
    # logit bias: +100 forces a token, and the slot forgets it for the next request
    forced = eng.generate([prompt], RequestParams(temperature=0, max_tokens=5, logit_bias={"17": 100}))[0]
    assert forced.outputs[0].token_ids == [17] * 5
    assert eng.generate([prompt], GREEDY8)[0].outputs[0].token_ids == reference_greedy(model, prompt, 8)
    with pytest.raises(ValueError, match="logit_bias"):
        RequestParams(logit_bias={5: 101})
    with pytest.raises(ValueError, match="presence_penalty"):
        RequestParams(presence_penalty=3)
    with pytest.raises(ValueError, match="logprobs"):
        RequestParams(logprobs=21)


def test_beam_search_respects_stop_strings(eng):
    e = _engine_like(eng, tokenizer=_AsciiTokenizer())
    prompt = _prompts(1, seed=26, lo=4, hi=6)[0]
    free = e.generate([prompt], RequestParams(temperature=0, max_tokens=12, beam_width=2, n=1))[0].outputs[0]
    text = _AsciiTokenizer().decode(free.token_ids)
    stop = text[4:6]
    out = e.generate([prompt], RequestParams(temperature=0, max_tokens=12, beam_width=2, n=2, stop=(stop,)))[0]
    for o in out.outputs:
        assert stop not in o.text
        if o.finish_reason == "stop":  # cut right after the token that completed the stop string
            full = _AsciiTokenizer().decode(o.token_ids)
            assert full.endswith(stop) and o.text == full[: -len(stop)]
    assert any(o.finish_reason == "stop" for o in out.outputs)
    assert e.blocks.num_used == 0


def test_a_step_the_host_cannot_carry_out_fails_its_requests_alone(eng, monkeypatch):
    """Never expected (the scheduler reserves what its plans need), but if a plan cannot get its
    blocks its requests fail with an error and the engine serves the next request."""
    real = eng.blocks.ensure_free
    calls = {"n": 0}

    def refuse_once(n):
        calls["n"] += 1
        return False if calls["n"] == 1 else real(n)

    monkeypatch.setattr(eng.blocks, "ensure_free", refuse_once)
    h = eng.add_request(_prompts(1, seed=27)[0], GREEDY8)
    eng.run_until_done()
    assert h.finished and h.error is not None and h.finish_reasons == ["error"]
    with pytest.raises(RuntimeError, match="could not run"):
        h.result()
    monkeypatch.setattr(eng.blocks, "ensure_free", real)
    assert eng.engine_error is None and eng.stats_counters["failed_steps"] == 1
    ok = eng.generate([_prompts(1, seed=28)[0]], GREEDY8)[0].outputs[0]
    assert ok.finish_reason == "length" and len(ok.token_ids) == 8


def test_new_validation_messages(eng, model):
    with pytest.raises(ValueError, match=r"top_k must be <= the vocabulary size 128"):
        eng.add_request([1, 2], RequestParams(top_k=VOCAB + 1))
    with pytest.raises(ValueError, match=r"stop_token_ids: 130 is outside the vocabulary \[0, 128\)"):
        eng.add_request([1, 2], RequestParams(stop_token_ids=(130,)))
    with pytest.raises(ValueError, match="grammar .*needs an engine with a tokenizer"):
        eng.add_request([1, 2], RequestParams(grammar="start: \"a\""))
    with pytest.raises(ValueError, match="decode_steps must be >= 1"):
        Engine(model, num_blocks=8, max_seqs=2, block_size=4, decode_steps=0)
    with pytest.raises(ValueError, match="logit_bias keys must be token ids"):
        RequestParams(logit_bias={"abc": 1.0})
    with pytest.raises(ValueError, match="logit_bias values must be numbers in"):
        RequestParams(logit_bias={"3": float("nan")})
    with pytest.raises(ValueError, match="frequency_penalty must be a number in"):
        RequestParams(frequency_penalty=-2.5)
    from flashjax.serving.blocks import BlockManager
    bm = BlockManager(8, 2, 2, 4)
    s = bm.take_slot()
    with pytest.raises(ValueError, match="would hold 9 tokens; its table has room for 8"):
        bm.grow(s, 9)


def test_guided_split_step_equals_the_one_call_step(model):
    """`forward` + `sample` (the split a step with grammar rows uses) sample what one
    `run` call samples from the same state: prefill, then a decode step with penalties and a
    seeded row; and with a mask, a greedy row takes the best allowed id of the forward's logits."""
    from flashjax.serving import step as S

    kw = dict(num_blocks=16, max_seqs=4, block_size=4, max_blocks_per_seq=16, logprobs_k=4)
    one, split = S.StepRunner(model, **kw), S.StepRunner(model, **kw)
    sl = S.SlotBatch(4, 16)
    prompts = {0: [5, 9, 2, 7, 1], 2: [3, 3, 8]}
    pf = S.PrefillBatch(2, 8)
    for i, (s, p) in enumerate(prompts.items()):
        sl.tables[s, :2] = [2 * i, 2 * i + 1]
        sl.ints[s, S.ACTIVE] = 1
        pf.tokens[i, :len(p)] = p
        pf.meta[i] = (s, len(p), 1, 0, len(p))
    sl.ints[:, S.RESET] = 1
    sl.floats[2, [S.TEMPERATURE, S.PRESENCE, S.FREQUENCY]] = (0.9, 0.5, 1.5)
    sl.ints[2, S.SEED] = 11

    def same(a, b):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
        np.testing.assert_array_equal(np.asarray(one.last_tok), np.asarray(split.last_tok))
        np.testing.assert_array_equal(np.asarray(one.counts), np.asarray(split.counts))

    same(one.run(sl.arrays(), pf.arrays(), steps=0), split.sample(split.forward(sl.arrays(), pf.arrays(), decode=False)))
    sl.ints[:, S.RESET] = 0
    for step in (1, 2):  # decode from the device's last tokens
        for s, p in prompts.items():
            sl.ints[s, [S.LENGTH, S.N_STEPS, S.STEP0]] = (len(p) + step - 1, 1, step)
        same(one.run(sl.arrays(), None, steps=1), split.sample(split.forward(sl.arrays(), None, decode=True)))
    # masked: slot 0 (greedy) may only take ids 3, 40 or 77
    for s, p in prompts.items():
        sl.ints[s, [S.LENGTH, S.N_STEPS, S.STEP0]] = (len(p) + 2, 1, 3)
    fwd = split.forward(sl.arrays(), None, decode=True)
    mask = np.full((4, (VOCAB + 31) // 32), -1, np.int32)
    mask[0] = 0
    for t in (3, 40, 77):
        mask[0, t // 32] |= np.int32(1 << (t % 32))
    logits = np.asarray(fwd.logits["decode"][0])
    assert int(np.argmax(logits)) not in (3, 40, 77), "the mask should change this row's token"
    out = split.sample(fwd, mask)
    assert int(out["decode"][0, 0]) == (3, 40, 77)[int(np.argmax(logits[[3, 40, 77]]))]
    # a forward is sampled once, and only before the next call
    with pytest.raises(RuntimeError, match="sampled already"):
        split.sample(fwd, mask)
    stale = split.forward(sl.arrays(), None, decode=True)
    split.run(sl.arrays(), None, steps=1)
    with pytest.raises(RuntimeError, match="not the last step call's forward"):
        split.sample(stale)
