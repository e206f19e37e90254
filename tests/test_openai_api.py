"""OpenAI API parameters of the server (flashjax.serving.server) over real HTTP on loopback:
logprobs, echo, stream_options, penalties, logit_bias, best_of, beam search, model names,
batch prompts and the parameters the server refuses; then the official `openai` client.

A tiny random model with the byte-level test tokenizer of test_server (ids 0..255 are bytes).
"""

from __future__ import annotations

import json
import math

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")

from test_server import CTX, ByteTokenizer, _sse, _start  # noqa: E402

from flashjax.models.config import config_from_preset  # noqa: E402
from flashjax.models.gpt import build_model  # noqa: E402
from flashjax.serving.engine import Engine  # noqa: E402
from flashjax.serving.server import MAX_BATCH_PROMPTS, create_app  # noqa: E402

SLOTS = 4
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


@pytest.fixture(scope="module")
def served():
    """(base url, engine) of a server on loopback."""
    cfg = config_from_preset("nano", n_layer=2, d_model=64, n_head=4, vocab_size=260, max_seq_len=CTX,
                             attention="xla", init_std=0.3)
    engine = Engine(build_model(cfg, 0), tokenizer=ByteTokenizer(), num_blocks=64, max_seqs=SLOTS, block_size=8,
                    max_num_batched_tokens=32, prefill_rows=2, max_chunk=16, chunk_buckets=(16,), max_waiting=64)
    app = create_app(engine, ByteTokenizer(), model_name="tiny")
    url, srv, th = _start(app)
    r = httpx.post(f"{url}{COMP}", json={"prompt": "warm up", "max_tokens": 3, "temperature": 0}, timeout=300)
    assert r.status_code == 200, r.text
    yield url, engine
    srv.should_exit = True
    th.join(10)
    engine.stop()
    assert engine.blocks.num_used == 0


@pytest.fixture(scope="module")
def base(served):
    return served[0]


def post(base, path, body, status=200):
    r = httpx.post(f"{base}{path}", json=body, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def stream(base, path, body):
    """The JSON chunks of a streamed answer (checks the closing [DONE])."""
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=120) as s:
        assert s.status_code == 200, s.read()
        events = _sse(s.iter_lines())
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def bad(base, path, body, param, status=400):
    err = post(base, path, body, status)["error"]
    assert err["param"] == param and err["message"], err
    return err


def tok(t):  # the test tokenizer's text of one id
    return ByteTokenizer().decode([t])


HI = {"prompt": "hi", "max_tokens": 8, "ignore_eos": True}
CHAT_HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "ignore_eos": True}


# -- logprobs ----------------------------------------------------------------------


def test_completion_logprobs(base):
    r = post(base, COMP, {**HI, "logprobs": 2, "temperature": 0})
    c = r["choices"][0]
    lp = c["logprobs"]
    ids = c["token_ids"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["tokens"] == [tok(t) for t in ids]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == len(ids) == 8
    offset = 0
    for s, x, top, off in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]):
        assert x <= 0 and off == offset
        offset += len(s)
        assert 1 <= len(top) <= 3 and top[s] == x  # the sampled token is always there (up to logprobs + 1)
        assert all(v <= 0 for v in top.values())
        # greedy: the sampled token is the most likely one
        assert math.isclose(x, max(top.values()), abs_tol=1e-5)
    # logprobs=0: the sampled token's log-probability only
    lp0 = post(base, COMP, {**HI, "logprobs": 0, "temperature": 0})["choices"][0]["logprobs"]
    assert lp0["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert all(list(top) == [s] for s, top in zip(lp0["tokens"], lp0["top_logprobs"]))
    # without logprobs: null
    assert post(base, COMP, HI)["choices"][0]["logprobs"] is None


def test_completion_logprobs_streamed_equal_non_streamed(base):
    body = {**HI, "logprobs": 3, "seed": 7, "temperature": 1.0, "n": 2}
    whole = post(base, COMP, body)["choices"]
    chunks = stream(base, COMP, body)
    for i, c in enumerate(whole):
        parts = [ch["choices"][0] for ch in chunks if ch["choices"][0]["index"] == i]
        assert [t for p in parts for t in p["token_ids"]] == c["token_ids"]
        merged = {k: [x for p in parts if p["logprobs"] for x in p["logprobs"][k]] for k in c["logprobs"]}
        assert merged["tokens"] == c["logprobs"]["tokens"]
        assert merged["text_offset"] == c["logprobs"]["text_offset"]
        assert merged["token_logprobs"] == pytest.approx(c["logprobs"]["token_logprobs"], abs=1e-5)


def test_chat_logprobs(base):
    r = post(base, CHAT, {**CHAT_HI, "logprobs": True, "top_logprobs": 3, "seed": 1})
    c = r["choices"][0]
    content = c["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 6
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["logprob"] <= 0 and all(isinstance(b, int) and 0 <= b < 256 for b in e["bytes"])
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
        assert len(e["top_logprobs"]) == 3
        lps = [a["logprob"] for a in e["top_logprobs"]]
        assert lps == sorted(lps, reverse=True) and all(set(a) == {"token", "logprob", "bytes"} for a in e["top_logprobs"])
        assert e["logprob"] <= lps[0] + 1e-5
    # logprobs without top_logprobs: the tokens, no alternatives
    r0 = post(base, CHAT, {**CHAT_HI, "logprobs": True, "seed": 1})["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in r0] == [e["token"] for e in content] and all(e["top_logprobs"] == [] for e in r0)
    assert post(base, CHAT, CHAT_HI)["choices"][0]["logprobs"] is None
    # streamed: the same entries, one chunk's tokens at a time
    chunks = stream(base, CHAT, {**CHAT_HI, "logprobs": True, "top_logprobs": 3, "seed": 1})
    streamed = [e for ch in chunks for c in ch["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-5)


@pytest.mark.parametrize("extra,param", [
    ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": 2}, "logprobs"),  # chat: a boolean
])
def test_chat_logprobs_bad(base, extra, param):
    bad(base, CHAT, {**CHAT_HI, **extra}, param)


@pytest.mark.parametrize("value", [6, -1, True, 1.5, "2"])
def test_completion_logprobs_bad(base, value):
    bad(base, COMP, {**HI, "logprobs": value}, "logprobs")


# -- echo, stream_options ---------------------------------------------------------


def test_echo(base):
    r = post(base, COMP, {**HI, "echo": True, "seed": 3})
    plain = post(base, COMP, {**HI, "seed": 3})
    assert r["choices"][0]["text"] == "hi" + plain["choices"][0]["text"]
    assert r["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    r = post(base, COMP, {**HI, "prompt": [104, 105], "echo": True, "seed": 3})  # token ids: their text
    assert r["choices"][0]["text"] == "hi" + plain["choices"][0]["text"]
    chunks = stream(base, COMP, {**HI, "echo": True, "seed": 3})
    assert chunks[0]["choices"][0]["text"] == "hi" and chunks[0]["choices"][0]["token_ids"] == []
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hi" + plain["choices"][0]["text"]
    err = bad(base, COMP, {**HI, "echo": True, "logprobs": 1}, "echo")
    assert "logprobs" in err["message"]
    bad(base, COMP, {**HI, "echo": "yes"}, "echo")


@pytest.mark.parametrize("path,body", [(COMP, HI), (CHAT, CHAT_HI)], ids=["completions", "chat"])
def test_stream_include_usage(base, path, body):
    body = {**body, "seed": 5, "n": 2}
    whole = post(base, path, body)
    chunks = stream(base, path, {**body, "stream_options": {"include_usage": True}})
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"] is not None
    u = last["usage"]
    assert u["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert u["completion_tokens"] == whole["usage"]["completion_tokens"] == 2 * body["max_tokens"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert all(c["usage"] is None for c in chunks[:-1])
    # without include_usage: no usage chunk, no usage key
    chunks = stream(base, path, {**body, "stream_options": {"include_usage": False}})
    assert all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)
    bad(base, path, {**body, "stream_options": {"include_usage": True}}, "stream_options")  # without stream
    bad(base, path, {**body, "stream": True, "stream_options": True}, "stream_options")
    bad(base, path, {**body, "stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage")


# -- penalties and logit_bias -----------------------------------------------------


def test_penalties_change_greedy_repetition(base):
    body = {**HI, "temperature": 0, "max_tokens": 12}

    def ids(extra):
        return post(base, COMP, {**body, **extra})["choices"][0]["token_ids"]

    plain = ids({})
    assert len(set(plain)) < len(plain), "the greedy baseline should repeat itself"
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = ids(extra)
        assert penalized != plain, extra
        assert len(set(penalized)) > len(set(plain)), extra
    assert ids({"presence_penalty": 0, "frequency_penalty": 0}) == plain
    assert ids({"presence_penalty": -2.0, "frequency_penalty": -2.0}) != plain


def test_penalties_reach_chat(base):
    """Penalties change the distribution once a token was generated (its log-probabilities show it)."""
    body = {**CHAT_HI, "temperature": 0, "logprobs": True}

    def lps(extra):
        return [e["logprob"] for e in post(base, CHAT, {**body, **extra})["choices"][0]["logprobs"]["content"]]

    plain = lps({})
    for extra in ({"frequency_penalty": 1.5}, {"presence_penalty": 1.5}):
        pen = lps(extra)
        assert pen[0] == pytest.approx(plain[0], abs=1e-5)  # nothing generated yet
        assert pen[1:] != pytest.approx(plain[1:], abs=1e-4), extra


@pytest.mark.parametrize("extra,param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"presence_penalty": "high"}, "presence_penalty"), ({"frequency_penalty": 1e400}, "frequency_penalty"),
    ({"logit_bias": {"260": 5}}, "logit_bias"), ({"logit_bias": {"99999999999": 5}}, "logit_bias"),
    ({"logit_bias": {"-1": 5}}, "logit_bias"), ({"logit_bias": {"abc": 5}}, "logit_bias"),
    ({"logit_bias": {"65": 101}}, "logit_bias"), ({"logit_bias": {"65": "x"}}, "logit_bias"),
    ({"logit_bias": {"65": 10**400}}, "logit_bias"), ({"logit_bias": [[65, 1]]}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(260)} | {"0": 1}}, None),  # 260 entries: fine
])
def test_penalty_and_bias_values(base, extra, param):
    body = json.dumps({**HI, "max_tokens": 2, **extra})
    r = httpx.post(f"{base}{COMP}", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    if param is None:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("path,body", [(COMP, HI), (CHAT, CHAT_HI)], ids=["completions", "chat"])
def test_logit_bias_forces_and_bans(base, path, body):
    r = post(base, path, {**body, "logit_bias": {"65": 100}, "temperature": 1.0})
    c = r["choices"][0]
    assert (c["token_ids"] == [65] * body["max_tokens"]) if path == COMP else (c["message"]["content"] == "A" * 6)
    if path == COMP:
        greedy = post(base, COMP, {**HI, "temperature": 0})["choices"][0]["token_ids"]
        banned = post(base, COMP, {**HI, "temperature": 0, "logit_bias": {str(greedy[0]): -100}})
        assert banned["choices"][0]["token_ids"][0] != greedy[0]


# -- best_of and beam search ------------------------------------------------------


def test_best_of_returns_the_most_likely_candidates(base):
    body = {**HI, "seed": 11, "temperature": 1.2}
    r = post(base, COMP, {**body, "n": 2, "best_of": 4})
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in r["choices"])  # not asked for
    assert r["usage"]["completion_tokens"] == 4 * 8  # every candidate counts
    # the candidates are n=4 samples with the same seed: rank them by summed log-probability
    cands = post(base, COMP, {**body, "n": 4, "logprobs": 0})["choices"]
    ranked = sorted(cands, key=lambda c: -sum(c["logprobs"]["token_logprobs"]))
    assert [c["token_ids"] for c in r["choices"]] == [c["token_ids"] for c in ranked[:2]]
    # with logprobs, they are returned too
    r = post(base, COMP, {**body, "n": 1, "best_of": 4, "logprobs": 1})
    assert r["choices"][0]["token_ids"] == ranked[0]["token_ids"]
    assert r["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(ranked[0]["logprobs"]["token_logprobs"])


def test_best_of_samples_and_respects_stop_strings(base):
    """The issue's reproduction: best_of ran beam search (greedy, stop strings ignored)."""
    body = {"prompt": "def main(", "max_tokens": 12, "ignore_eos": True, "best_of": 2, "logit_bias": {"46": 100},
            "stop": [".."]}
    r = post(base, COMP, body)
    c = r["choices"][0]
    assert c["text"] == "" and c["finish_reason"] == "stop" and c["token_ids"] == [46, 46]
    texts = {tuple(post(base, COMP, {**HI, "best_of": 2, "temperature": 1.5})["choices"][0]["token_ids"])
             for _ in range(4)}
    assert len(texts) > 1, "best_of draws fresh samples without a seed"


@pytest.mark.parametrize("extra,param", [
    ({"best_of": 2, "stream": True}, "best_of"),
    ({"n": 3, "best_of": 2}, "n"),
    ({"best_of": SLOTS + 1}, "best_of"),
    ({"best_of": 0}, "best_of"),
    ({"best_of": 2, "beam_width": 2}, "best_of"),
    ({"beam_width": 2, "presence_penalty": 1}, "presence_penalty"),
    ({"beam_width": 2, "frequency_penalty": -1}, "frequency_penalty"),
    ({"beam_width": 2, "logprobs": 1}, "logprobs"),
    ({"use_beam_search": True, "best_of": SLOTS + 1}, "best_of"),
    ({"use_beam_search": True, "n": SLOTS + 1}, "n"),
    ({"use_beam_search": "yes"}, "use_beam_search"),
])
def test_best_of_and_beam_bad(base, extra, param):
    bad(base, COMP, {**HI, **extra}, param)


def test_beam_search_parameters_and_stop_strings(base):
    body = {**HI, "n": 2, "logit_bias": {"65": 3}}
    a = post(base, COMP, {**body, "beam_width": 3})["choices"]
    b = post(base, COMP, {**body, "use_beam_search": True, "best_of": 3})["choices"]
    assert [c["token_ids"] for c in a] == [c["token_ids"] for c in b] and len(a) == 2
    for c in a:
        assert c["finish_reason"] == "length" and len(c["token_ids"]) == 8
    # beam search is deterministic: temperature and seed change nothing
    c2 = post(base, COMP, {**body, "beam_width": 3, "temperature": 1.7, "seed": 5})["choices"]
    assert [c["token_ids"] for c in c2] == [c["token_ids"] for c in a]
    # a stop string cuts each beam where sampling would
    text = a[0]["text"]
    stop = next(ch for ch in text[1:] if ch.isascii() and ch.isprintable())
    for streamed in (False, True):
        if streamed:
            chunks = stream(base, COMP, {**body, "beam_width": 3, "stop": [stop]})
            cut = {ch["choices"][0]["index"]: ch["choices"][0] for ch in chunks}
            cut = [cut[i] for i in range(2)]
        else:
            cut = post(base, COMP, {**body, "beam_width": 3, "stop": [stop]})["choices"]
        for full, c in zip(a, cut):
            if stop in full["text"]:
                assert c["text"] == full["text"][: full["text"].index(stop)] and c["finish_reason"] == "stop"
                assert c["token_ids"] == full["token_ids"][: len(c["token_ids"])]
                assert len(c["token_ids"]) < len(full["token_ids"]) or full["text"].endswith(stop)
            else:
                assert c["text"] == full["text"] and c["finish_reason"] == "length"


# -- model names --------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [(COMP, HI), (CHAT, CHAT_HI)], ids=["completions", "chat"])
def test_model_names(base, path, body):
    listed = [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
    for name in listed + [None]:
        post(base, path, {**body, "max_tokens": 1, "model": name})
    post(base, path, {k: v for k, v in {**body, "max_tokens": 1}.items() if k != "model"})
    err = post(base, path, {**body, "model": "gpt-4o"}, 404)["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4o" in err["message"]
    assert err["type"] == "invalid_request_error"
    bad(base, path, {**body, "model": 5}, "model")


# -- batch prompts --------------------------------------------------------------------


def test_batch_prompts_non_streamed(base):
    prompts = ["hi", "hello there", "x"]
    body = {"max_tokens": 5, "ignore_eos": True, "seed": 21, "n": 2, "temperature": 1.0}
    r = post(base, COMP, {**body, "prompt": prompts})
    assert [c["index"] for c in r["choices"]] == list(range(6))
    singles = [post(base, COMP, {**body, "prompt": p}) for p in prompts]
    for k, s in enumerate(singles):  # prompt-major: choice k * n + j is prompt k's sample j
        for j in range(2):
            assert r["choices"][k * 2 + j]["token_ids"] == s["choices"][j]["token_ids"], (k, j)
    assert r["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert r["usage"]["completion_tokens"] == 30
    # token-id prompts: a batch of lists, and one list
    ids = [list(p.encode()) for p in prompts]
    r2 = post(base, COMP, {**body, "prompt": ids})
    assert [c["token_ids"] for c in r2["choices"]] == [c["token_ids"] for c in r["choices"]]
    r3 = post(base, COMP, {**body, "prompt": ids[1]})
    assert [c["token_ids"] for c in r3["choices"]] == [c["token_ids"] for c in singles[1]["choices"]]
    # echo and best_of apply per prompt
    r4 = post(base, COMP, {**body, "prompt": prompts, "echo": True, "n": 1, "best_of": 2})
    assert len(r4["choices"]) == 3 and all(c["text"].startswith(p) for c, p in zip(r4["choices"], prompts))


def test_batch_prompts_streamed(base):
    prompts = ["hi", "hello there", "x"]
    body = {"max_tokens": 5, "ignore_eos": True, "seed": 21, "n": 2, "temperature": 1.0, "prompt": prompts,
            "logprobs": 1}
    whole = post(base, COMP, body)
    chunks = stream(base, COMP, {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1]["usage"]["completion_tokens"] == 30 and chunks[-1]["choices"] == []
    for c in whole["choices"]:
        parts = [ch["choices"][0] for ch in chunks[:-1] if ch["choices"][0]["index"] == c["index"]]
        assert [t for p in parts for t in p["token_ids"]] == c["token_ids"]
        assert "".join(p["text"] for p in parts) == c["text"]
        assert [s for p in parts for s in p["logprobs"]["tokens"]] == c["logprobs"]["tokens"]
        assert parts[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("prompt", [
    [], [[]], ["a", [1, 2]], [[1, 2], "a"], [1, [2]], [[1, 2], [3, 999]], ["ok", "y" * (CTX + 5)], [None],
    [True, 1], ["a"] * (MAX_BATCH_PROMPTS + 1), {"text": "hi"}, None,
])
def test_batch_prompts_bad(base, prompt):
    bad(base, COMP, {"prompt": prompt, "max_tokens": 2}, "prompt")


def test_batch_prompts_refused_whole_when_the_queue_fills(served, monkeypatch):
    """A queue that fills in the middle of a batch: 429, and the prompts already queued are cancelled."""
    base, engine = served
    from flashjax.serving.engine import QueueFullError

    real = engine.add_request
    added = []

    def add_request(*args, **kwargs):
        if len(added) == 2:
            raise QueueFullError("the queue is full (test)")
        added.append(real(*args, **kwargs))
        return added[-1]

    monkeypatch.setattr(engine, "add_request", add_request)
    r = httpx.post(f"{base}{COMP}", json={"prompt": ["a", "b", "c"], "max_tokens": 40, "ignore_eos": True},
                   timeout=60)
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
    assert len(added) == 2 and all(h.finished and h.cancelled for h in added)
    monkeypatch.undo()
    r = post(base, COMP, {"prompt": ["a", "b"], "max_tokens": 1})
    assert len(r["choices"]) == 2


# -- refused and accepted parameters ---------------------------------------------------


@pytest.mark.parametrize("path,extra,param", [
    (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
    (CHAT, {"response_format": {"type": "xml"}}, "response_format"),
    (CHAT, {"response_format": "json"}, "response_format"),
    (COMP, {"response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    (CHAT, {"tool_choice": "auto"}, "tool_choice"),
    (CHAT, {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    (CHAT, {"parallel_tool_calls": True}, "parallel_tool_calls"),
    (CHAT, {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    (CHAT, {"function_call": "auto"}, "function_call"),
    (COMP, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (COMP, {"suffix": "}"}, "suffix"),
    (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (CHAT, {"modalities": ["text", "audio"]}, "modalities"),
    (CHAT, {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    (CHAT, {"web_search_options": {}}, "web_search_options"),
    (CHAT, {"reasoning_effort": "low"}, "reasoning_effort"),
    (CHAT, {"verbosity": "low"}, "verbosity"),
    (CHAT, {"store": True}, "store"),
    (CHAT, {"service_tier": "flex"}, "service_tier"),
    (CHAT, {"user": 5}, "user"),
    (CHAT, {"metadata": "x"}, "metadata"),
])
def test_unsupported_parameters_are_400(base, path, extra, param):
    body = CHAT_HI if path == CHAT else HI
    err = bad(base, path, {**body, **extra}, param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("path,extra", [
    (CHAT, {"response_format": {"type": "text"}}), (CHAT, {"response_format": None}),
    (CHAT, {"tools": []}), (CHAT, {"tool_choice": "none"}), (CHAT, {"tools": None, "tool_choice": None}),
    (CHAT, {"modalities": ["text"]}), (CHAT, {"store": False}), (CHAT, {"service_tier": "auto"}),
    (CHAT, {"user": "u-1", "metadata": {"k": "v"}, "safety_identifier": "s", "prompt_cache_key": "p"}),
    (COMP, {"suffix": None}), (COMP, {"suffix": ""}), (COMP, {"user": "u-1"}),
    (COMP, {"some_unknown_field": 1}), (CHAT, {"some_unknown_field": {"a": 1}}),  # unknown fields: ignored
    (CHAT, {"stream_options": None}), (COMP, {"echo": False}),
])
def test_accepted_parameters(base, path, extra):
    body = CHAT_HI if path == CHAT else HI
    post(base, path, {**body, "max_tokens": 2, **extra})


# -- the official openai client --------------------------------------------------------


@pytest.fixture(scope="module")
def client(base):
    openai = pytest.importorskip("openai", reason="the test extra's openai client is not installed")
    with openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def test_openai_client_completions(client):
    import openai

    r = client.completions.create(model="tiny", prompt="hi", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == 2
    # streamed, with the usage chunk
    chunks = list(client.completions.create(model="tiny", prompt="hi", max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    # logprobs
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=4, logprobs=2, seed=1,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    # n, seed, stop
    a = client.completions.create(model="tiny", prompt="hi", max_tokens=5, n=2, seed=42, temperature=1.0,
                                  extra_body={"ignore_eos": True})
    b = client.completions.create(model="tiny", prompt="hi", max_tokens=5, n=2, seed=42, temperature=1.0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=10, logit_bias={"65": 100}, stop=["AAA"])
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3
    # logit_bias forces a token; penalties change a greedy repetition
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=5, logit_bias={"66": 100})
    assert r.choices[0].text == "BBBBB"
    plain = client.completions.create(model="tiny", prompt="hi", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    pen = client.completions.create(model="tiny", prompt="hi", max_tokens=12, temperature=0,
                                    presence_penalty=2.0, frequency_penalty=2.0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    assert pen != plain
    # best_of, batch prompts
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=4, best_of=3, n=2, seed=3)
    assert len(r.choices) == 2
    r = client.completions.create(model="tiny", prompt=["hi", "yo"], max_tokens=3, n=2, seed=3,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.usage.completion_tokens == 12
    r = client.completions.create(model="tiny", prompt=[[104, 105], [121, 111]], max_tokens=2)
    assert len(r.choices) == 2
    # errors
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, suffix="x")
    assert e.value.param == "suffix"


def test_openai_client_chat(client):
    import openai

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    text = r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    # logprobs
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, logprobs=True, top_logprobs=2,
                                       seed=9, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    assert all(isinstance(e.bytes, list) for e in content)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, logprobs=True,
                                                 top_logprobs=2, seed=9, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    # n, seed, stop
    a = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, n=2, seed=4,
                                       extra_body={"ignore_eos": True})
    b = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, n=2, seed=4,
                                       extra_body={"ignore_eos": True})
    assert len(a.choices) == 2 and [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, logit_bias={"65": 100},
                                       stop="AA")
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "stop"
    # penalties
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].message.content
    pen = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                         frequency_penalty=2.0, extra_body={"ignore_eos": True})
    assert pen.choices[0].message.content != plain
    # errors
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, top_logprobs=3)
    assert e.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert e.value.param == "tools"
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_stream_replay_keeps_logprobs(served):
    """A stream that starts after tokens arrived replays them with their logprobs (handles.aiter)."""
    import asyncio

    from flashjax.serving.engine import RequestParams

    _, engine = served
    h = engine.add_request([104, 105], RequestParams(max_tokens=3, logprobs=2, ignore_eos=True, n=2))
    assert h.wait(120)

    async def collect():
        return [ev async for ev in h.aiter()]

    events = asyncio.run(collect())
    out = h.result().outputs
    assert sorted(ev.index for ev in events) == [0, 1]
    for ev in events:
        assert ev.token_ids == out[ev.index].token_ids and len(ev.logprobs) == 3
        assert ev.logprobs == out[ev.index].logprobs


# -- structured output (response_format) ---------------------------------------------


@pytest.fixture(scope="module")
def json_server():
    """A server whose tokenizer is a trained byte-level BPE (llguidance needs a `tokenizers` one)."""
    pytest.importorskip("llguidance", reason="structured output needs llguidance (the serve extra)")
    from flashjax.models.tokenizer import Tokenizer

    docs = ['{"name": "rex", "kind": "dog", "age": 3}', '{"ok": true, "scores": [1.5, 2], "inner": {"x": 4}}',
            "def main():\n    return 0\n"] * 20
    tok = Tokenizer.train(docs, 300)
    cfg = config_from_preset("nano", n_layer=2, d_model=64, n_head=4, vocab_size=tok.vocab_size, max_seq_len=128,
                             attention="xla", init_std=0.3)
    engine = Engine(build_model(cfg, 0), tokenizer=tok, num_blocks=64, max_seqs=4, block_size=8,
                    max_num_batched_tokens=64, prefill_rows=2, max_chunk=32, chunk_buckets=(32,))
    url, srv, th = _start(create_app(engine, tok, model_name="json"))
    yield url
    srv.should_exit = True
    th.join(10)
    engine.stop()
    assert engine.blocks.num_used == 0


def test_structured_output_over_http(json_server):
    from test_guided import SCHEMAS, _valid

    base = json_server
    msgs = [{"role": "user", "content": "a pet"}]
    for schema in SCHEMAS:
        rf = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
        r = post(base, CHAT, {"messages": msgs, "max_tokens": 100, "n": 2, "seed": 1, "response_format": rf})
        for c in r["choices"]:
            assert c["finish_reason"] == "stop" and _valid(json.loads(c["message"]["content"]), schema), c
        chunks = stream(base, CHAT, {"messages": msgs, "max_tokens": 100, "seed": 1, "response_format": rf})
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
        assert _valid(json.loads(text), schema) and text == r["choices"][0]["message"]["content"]
    # completions take it too; json_object gives an object
    r = post(base, COMP, {"prompt": "data: ", "max_tokens": 100, "seed": 2, "response_format": {"type": "json_object"}})
    c = r["choices"][0]
    assert c["text"].startswith("{") and (c["finish_reason"] == "length" or isinstance(json.loads(c["text"]), dict))
    for rf in ({"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 5}},
               {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}):
        bad(base, CHAT, {"messages": msgs, "max_tokens": 5, "response_format": rf}, "response_format")
    bad(base, COMP, {"prompt": "x", "max_tokens": 5, "beam_width": 2, "response_format": {"type": "json_object"}},
        "response_format")


def test_structured_output_with_the_openai_client(json_server):
    openai = pytest.importorskip("openai")
    from test_guided import SCHEMAS, _valid

    schema = SCHEMAS[0]
    with openai.OpenAI(base_url=f"{json_server}/v1", api_key="x", max_retries=0, timeout=120) as client:
        for seed in range(3):
            r = client.chat.completions.create(
                model="json", messages=[{"role": "user", "content": "a pet"}], max_tokens=100, seed=seed,
                response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}})
            assert _valid(json.loads(r.choices[0].message.content), schema)
