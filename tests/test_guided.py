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

