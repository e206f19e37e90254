"""Structured output: grammar-constrained decoding with llguidance (engine level, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llguidance")

from flashjax.models.config import config_from_preset  # noqa: E402
from flashjax.models.gpt import build_model  # noqa: E402
from flashjax.models.tokenizer import Tokenizer  # noqa: E402
from flashjax.serving.engine import Engine, RequestParams  # noqa: E402
from flashjax.serving.guided import grammar_for_response_format  # noqa: E402

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "kind": {"enum": ["cat", "dog", "fish"]},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "kind", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "scores": {"type": "array", "maxItems": 3,
                                                 "items": {"type": "integer", "minimum": 0, "maximum": 100}},
                                      "inner": {"type": "object",
                                                "properties": {"x": {"type": "integer", "minimum": -50,
                                                                     "maximum": 50}},
                                                "required": ["x"], "additionalProperties": False}},
     "required": ["ok", "scores", "inner"], "additionalProperties": False},
]


def _valid(value, schema) -> bool:
    """A small validator for the schema features used here."""
    t = schema.get("type")
    if "enum" in schema:
        return value in schema["enum"]
    if t == "object":
        if not isinstance(value, dict) or set(schema.get("required", [])) - set(value):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(schema["properties"]):
            return False
        return all(_valid(value[k], schema["properties"][k]) for k in value)
    if t == "array":
        return isinstance(value, list) and len(value) <= schema.get("maxItems", 1 << 30) and \
            all(_valid(v, schema["items"]) for v in value)
    if t == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", 1 << 30)
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool) and \
            schema.get("minimum", value) <= value <= schema.get("maximum", value)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "boolean":
        return isinstance(value, bool)
    raise AssertionError(f"schema feature not covered: {schema}")


@pytest.fixture(scope="module")
def engine():
    docs = ['{"name": "rex", "kind": "dog", "age": 3}', '{"ok": true, "scores": [1.5, 2], "inner": {"x": 4}}',
            "def main():\n    return 0\n"] * 20
    tok = Tokenizer.train(docs, 300)
    cfg = config_from_preset("nano", n_layer=2, d_model=64, n_head=4, vocab_size=tok.vocab_size,
                             max_seq_len=128, attention="xla", init_std=0.3)
    return Engine(build_model(cfg, 0), tokenizer=tok, num_blocks=64, max_seqs=4, block_size=8,
                  max_num_batched_tokens=64, prefill_rows=2, max_chunk=32, chunk_buckets=(32,))


@pytest.mark.parametrize("schema", SCHEMAS, ids=["enum-string-int", "nested-array-bool"])
def test_every_json_schema_response_parses_and_validates(engine, schema):
    tok = engine.tokenizer
    grammar = grammar_for_response_format({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    prompts = [tok.encode(p) for p in ("Answer: ", "def f(", "{", "x")]
    params = [RequestParams(temperature=1.0, seed=s, max_tokens=100, grammar=grammar) for s in range(4)]
    outs = engine.generate(prompts, params)
    for o in outs:
        text = o.outputs[0].text
        assert o.outputs[0].finish_reason == "stop", (text, o.outputs[0].finish_reason)
        assert _valid(json.loads(text), schema), text
    # unconstrained, the same random model does not write JSON
    free = engine.generate(prompts[:2], RequestParams(temperature=1.0, seed=0, max_tokens=30))
    assert not all(_parses(o.outputs[0].text) for o in free)
    assert engine.blocks.num_used == 0


def _parses(text):
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_json_object_n2_and_bad_grammar(engine):
    tok = engine.tokenizer
    grammar = grammar_for_response_format({"type": "json_object"})
    out = engine.generate([tok.encode("data: ")], RequestParams(temperature=0.8, seed=3, n=2, max_tokens=80,
                                                                grammar=grammar))[0]
    for o in out.outputs:
        # free-form objects may run to max_tokens; what was written is then a prefix of one
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:
            assert o.finish_reason == "length" and o.text.startswith("{")
    assert grammar_for_response_format({"type": "text"}) is None
    with pytest.raises(ValueError, match="response_format"):
        grammar_for_response_format({"type": "yaml"})
    with pytest.raises(ValueError, match="grammar"):
        engine.add_request([1, 2], RequestParams(grammar="this is not a grammar %%%"))
    with pytest.raises(ValueError, match="beam"):
        RequestParams(grammar=grammar, beam_width=2, n=1)
    from flashjax.serving.guided import GrammarBackend

    with pytest.raises(ValueError, match="threads must be at least 1"):
        GrammarBackend(tok, vocab_size=engine.config.vocab_size, eos_id=None, threads=0)


def test_malformed_response_formats_and_tokenizers():
    from flashjax.serving.guided import GrammarBackend

    with pytest.raises(ValueError, match="response_format must be an object"):
        grammar_for_response_format("json")
    with pytest.raises(ValueError, match="response_format.json_schema must be an object with a 'schema'"):
        grammar_for_response_format({"type": "json_schema", "json_schema": {"schema": 5}})

    class Plain:
        def decode(self, ids):
            return ""

    with pytest.raises(ValueError, match="needs a tokenizer backed by the `tokenizers` library"):
        GrammarBackend(Plain(), vocab_size=10, eos_id=None)


# ---------------------------------------------------------------------------
# Masks of many rows at once, and the split step that overlaps them with the device
# ---------------------------------------------------------------------------

def _allowed(backend, row) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:backend.vocab_size])


def _grammars():
    return [grammar_for_response_format({"type": "json_schema", "json_schema": {"schema": s}}) for s in SCHEMAS] + \
        [grammar_for_response_format({"type": "json_object"})]


@pytest.mark.parametrize("threads", [1, 3])
def test_fill_rows_equals_one_row_at_a_time(engine, threads):
    """The batch fill (on llguidance's executor; with one thread, a loop in this thread)
    writes each matcher's own mask into its own row, for matchers of different grammars at
    different states (fresh, mid-way, finished), and leaves every other row as it was."""
    from flashjax.serving.guided import GrammarBackend

    tok = engine.tokenizer
    backend = GrammarBackend(tok, vocab_size=engine.config.vocab_size, eos_id=tok.eot_id, threads=threads)
    assert (backend._executor is None) == (threads == 1)
    rng = np.random.default_rng(0)
    row = np.zeros(backend.words, np.int32)
    matchers = []
    for i, g in enumerate(_grammars() * 3):
        m = backend.matcher(g)
        for _ in range(4 * i if i < 8 else 400):  # the last one to the grammar's end
            if m.is_stopped():
                break
            backend.fill(m, row)
            assert m.consume_token(int(rng.choice(_allowed(backend, row))))
        matchers.append(m)
    assert matchers[-1].is_stopped() and not matchers[3].is_stopped()
    dest = rng.permutation(14)[:len(matchers)]
    mask = np.full((14, backend.words), 0x5A5A5A5A, np.int32)
    backend.fill_rows(list(zip(matchers, dest)), mask)
    expected = np.full_like(mask, 0x5A5A5A5A)
    for m, i in zip(matchers, dest):
        backend.fill(m, expected[i])
    np.testing.assert_array_equal(mask, expected)
    assert len({expected[i].tobytes() for i in dest}) >= 5, "the states should give different masks"
    backend.fill_rows([], mask)  # nothing to do
    for bad in ([(matchers[0], 1), (matchers[1], 1)], [(matchers[0], 1), (matchers[0], 2)], [(matchers[0], 14)]):
        with pytest.raises(ValueError, match="distinct"):
            backend.fill_rows(bad, mask)
    with pytest.raises(ValueError, match="C-contiguous int32"):
        backend.fill_rows([(matchers[0], 0)], mask[:, ::2])


def _reference_constrained_greedy(model, backend, grammar, prompt, max_tokens, eos_id):
    """No engine, no cache: the whole context through the model, the matcher's mask on the
    logits, argmax, consume; stops where the engine stops (grammar done, eos, max_tokens)."""
    import jax
    import jax.numpy as jnp

    fwd = jax.jit(lambda t, n: model(t)[0, n - 1])
    m = backend.matcher(grammar)
    row = np.zeros(backend.words, np.int32)
    ctx, out = list(prompt), []
    while len(out) < max_tokens:
        backend.fill(m, row)
        padded = np.zeros((1, model.config.max_seq_len), np.int32)
        padded[0, :len(ctx)] = ctx
        logits = np.asarray(fwd(jnp.asarray(padded), len(ctx)))
        ok = np.zeros(logits.shape, bool)
        ok[_allowed(backend, row)] = True
        t = int(np.argmax(np.where(ok, logits, -np.inf)))
        out.append(t)
        if not m.consume_token(t) or m.is_stopped() or t == eos_id:
            break
        ctx.append(t)
    return out


def _constrained_workload(tok):
    g = _grammars()
    prompts = [tok.encode(p) for p in ("Answer: ", "def f(", "{", "x", "data: ", "ok", "name: ")]
    return prompts, [RequestParams(temperature=0, max_tokens=40, grammar=g[i % 3]) for i in range(len(prompts))]


def test_constrained_greedy_equals_the_reference_as_rows_come_and_go(engine):
    """Greedy constrained output is what masking the model's own logits gives, token for
    token: seven requests on four slots (rows finish, new ones join while a step is in
    flight), then the same on a pool so small that rows are preempted (recompute and swap).
    Every mask computed is for a token delivered (none for rows that already stopped)."""
    from flax import nnx

    tok = engine.tokenizer
    model = nnx.merge(engine.runner.graphdef, engine.runner.params)
    backend = engine._grammar_backend()
    prompts, params = _constrained_workload(tok)
    ref = [_reference_constrained_greedy(model, backend, p.grammar, x, p.max_tokens, tok.eot_id)
           for x, p in zip(prompts, params)]
    assert len({len(r) for r in ref}) > 2, "rows should end at different steps"
    # the module's engine computes masks with the default threads, this one on a pool of 3
    tight = Engine(model, tokenizer=tok, num_blocks=14, max_seqs=4, block_size=8, max_num_batched_tokens=64,
                   prefill_rows=2, max_chunk=32, chunk_buckets=(32,), grammar_threads=3)
    for eng, mode in ((engine, "recompute"), (tight, "recompute"), (tight, "swap")):
        eng.preemption_mode = mode
        masks0, pre0 = eng.stats_counters["grammar_masks"], eng.stats_counters["preemptions"]
        outs = eng.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in outs] == ref, (eng is tight, mode)
        assert eng.stats_counters["grammar_masks"] - masks0 == sum(len(r) for r in ref)
        if eng is tight:
            assert eng.stats_counters["preemptions"] > pre0, "the small pool should force preemption"
            assert eng._grammar.threads == 3 and eng._grammar._executor is not None
        assert eng.blocks.num_used == 0


def test_masks_overlap_the_forward_and_skip_rows_that_stopped(engine, monkeypatch):
    """A step with grammar rows dispatches the model's forward first, then reads back the
    step in flight (its tokens advance the matchers), then computes the masks and
    dispatches sampling. A sequence cancelled while the forward runs gets no mask; the
    others go on exactly as without it."""
    tok = engine.tokenizer
    prompts, params = _constrained_workload(tok)
    prompts, params = prompts[:4], params[:4]
    alone = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    events = []
    runner = engine.runner
    for name in ("forward", "sample"):
        orig = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda *a, _f=orig, _n=name, **k: (events.append(_n), _f(*a, **k))[1])
    orig_collect = Engine._collect
    monkeypatch.setattr(Engine, "_collect", lambda self, d: (events.append("collect"), orig_collect(self, d))[1])
    victim = {}
    orig_sample = Engine._sample_guided

    def sample_guided(self, d):
        if "h" in victim and events.count("forward") == 6:  # cancelled during the drain of step 6
            assert any(r is victim["h"].seqs[0] for r in d.guided)
            self.cancel(victim["h"].request_id)
        return orig_sample(self, d)

    monkeypatch.setattr(Engine, "_sample_guided", sample_guided)
    masks0 = engine.stats_counters["grammar_masks"]
    handles = [engine.add_request(x, p) for x, p in zip(prompts, params)]
    victim["h"] = handles[2]
    engine.run_until_done()
    got = [h.result().outputs[0] for h in handles]
    assert got[2].finish_reason == "cancelled" and got[2].token_ids == alone[2][:len(got[2].token_ids)]
    assert [g.token_ids for i, g in enumerate(got) if i != 2] == [a for i, a in enumerate(alone) if i != 2]
    delivered = sum(len(g.token_ids) for g in got)
    assert engine.stats_counters["grammar_masks"] - masks0 == delivered
    # every forward is sampled before any other call; after the first, each one's sampling
    # follows a read-back of the step before it (which ran while the forward was on the device)
    assert events[0] == "forward"
    segments = []
    for e in events:
        if e == "forward":
            segments.append([])
        segments[-1].append(e)
    assert all(seg.count("sample") == 1 and "forward" not in seg[1:] for seg in segments)
    overlapped = sum(seg.index("sample") > 1 for seg in segments)  # a collect between forward and sample
    assert overlapped >= len(segments) - 2, events
    assert engine.blocks.num_used == 0


def test_sample_refuses_a_forward_that_is_not_the_open_one(engine):
    """StepRunner.sample takes only the last forward, once: sampling a stale or already
    sampled forward would apply its logits to another step's state."""
    from flashjax.serving import step as S

    run = engine.runner
    slots = S.SlotBatch(engine.max_seqs, engine.max_blocks_per_seq).arrays()
    fwd = run.forward(slots, None, decode=True)
    run.sample(fwd)
    with pytest.raises(RuntimeError, match="not the last step call's forward"):
        run.sample(fwd)
    stale = run.forward(slots, None, decode=True)
    last = run.forward(slots, None, decode=True)
    with pytest.raises(RuntimeError, match="not the last step call's forward"):
        run.sample(stale)
    run.sample(last)  # all-padding slots: nothing was written or sampled for a sequence
