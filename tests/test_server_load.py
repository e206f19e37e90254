"""Load-and-fault test of the OpenAI-compatible server (issue 18's target).

At least 1,000 requests over real HTTP on loopback, 32 in flight, drawn by a seeded RNG
from: valid completions and chats (streamed or not, n = 1..2, stop strings, seeds,
logprobs, penalties, logit_bias, best_of, echo, batch prompts, include_usage; beam search
once the engine bug below is fixed),
every class of malformed request the issue lists (and a few more), client disconnects
(mid-stream, before the headers, while a non-streamed request waits) and explicit cancels
(the engine's `cancel` by request id while the server streams it, and in-process
`add_request` + `handle.cancel()`). The engine has 6 slots and a KV pool too small for them
all, so sequences are preempted, and a waiting queue of 8, so valid requests get 429s: a
429 is retried (with a short jittered pause) until the request is served.

Checked: every valid request ends complete (finish_reason set, max_tokens tokens for a
`length` stop, logprobs for every token, no stop string in the text), every invalid one gets
its 4xx with an OpenAI-shaped JSON error naming the field; afterwards nothing runs or waits,
no KV block is referenced (the prefix cache may keep unreferenced ones), the block manager's
invariants hold, /health is 200, the engine thread is alive with no error, no 5xx was
answered and nothing was logged at ERROR.

The tests at the end reproduce, each on its own, the bugs this load found (fixed since).

Seed: FLASHJAX_LOAD_SEED (default 18); the seed and the counts per class are printed.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import random
import time

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")

from flashjax.models.config import config_from_preset  # noqa: E402
from flashjax.models.gpt import build_model  # noqa: E402
from flashjax.serving.engine import Engine, QueueFullError  # noqa: E402
from flashjax.serving.scheduler import RequestParams  # noqa: E402
from flashjax.serving.server import chat_prompt, create_app  # noqa: E402
from test_server import ByteTokenizer, _sse, _start  # noqa: E402

CTX = 64
VOCAB = 260
SLOTS = 6
BLOCK = 8
MAX_WAITING = 8
MAX_BODY = 1 << 16  # a small body limit: an oversized body is cheap to send
N_REQUESTS = 1000
IN_FLIGHT = 32
LOAD_TIMEOUT = 75  # seconds for the whole load phase
SEED = int(os.environ.get("FLASHJAX_LOAD_SEED", "18"))

CHARS = list("abcdefghijklmnopqrstuvwxyz     .,\n") + ["é", "ß", "日本", "🙂"]
STOPS = ["e", "a", " ", ["xy", "o"], "\n", "é", ["日", "q"]]

A = object()  # "any param" in an expected error



def _text(rng, max_bytes):
    """Random text (some multi-byte UTF-8) of 1..max_bytes UTF-8 bytes."""
    target = rng.randint(1, max_bytes)
    out = ""
    while True:
        c = rng.choice(CHARS)
        if len((out + c).encode()) > target:
            return out or "x"
        out += c


# ---------------------------------------------------------------------------------------------
# valid requests
# ---------------------------------------------------------------------------------------------

def _valid(rng, chat):
    """(path, body) of a valid request; the body also says what to expect of the answer."""
    stream = rng.random() < 0.5
    body = {"max_tokens": rng.randint(1, 8), "stream": stream, "ignore_eos": rng.random() < 0.75}
    if rng.random() < 0.5:
        body["model"] = "tiny"
    body["temperature"] = rng.choice([0, 0, 0.5, 1.0, 1.7])
    if rng.random() < 0.5:
        body["seed"] = rng.randrange(2**32)
    beam = rng.random() < 0.05
    n = 2 if rng.random() < 0.3 else 1
    if n > 1:
        body["n"] = n
    if beam:
        body["beam_width"] = 2
    if rng.random() < 0.3:
        body["stop"] = rng.choice(STOPS)
    if not beam:
        if rng.random() < 0.25:
            body["top_k"] = rng.choice([-1, 0, 1, 5, 50, VOCAB])
        if rng.random() < 0.25:
            body["top_p"] = rng.choice([0.1, 0.5, 0.9, 1.0])
        if rng.random() < 0.15:
            body["presence_penalty"] = rng.uniform(-2, 2)
            body["frequency_penalty"] = rng.uniform(-2, 2)
        if rng.random() < 0.15:
            body["logit_bias"] = {str(rng.randrange(VOCAB)): rng.uniform(-100, 100) for _ in range(rng.randint(1, 3))}
        if rng.random() < 0.3:
            if chat:
                body["logprobs"] = True
                if rng.random() < 0.7:
                    body["top_logprobs"] = rng.randint(0, 5)
            else:
                body["logprobs"] = rng.randint(0, 5)
        if not stream and n == 1 and rng.random() < 0.15:
            body["best_of"] = 2
        if rng.random() < 0.05:
            body["stop_token_ids"] = [rng.randrange(VOCAB)]
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if chat:
        msgs = [{"role": "user", "content": _text(rng, 20)}]
        if rng.random() < 0.2:
            msgs = [{"role": "system", "content": _text(rng, 6)}] + msgs
        if rng.random() < 0.2:
            msgs[-1]["content"] = [{"type": "text", "text": _text(rng, 8)}, {"type": "text", "text": _text(rng, 8)}]
        body["messages"] = msgs
        return "/v1/chat/completions", body
    r = rng.random()
    if r < 0.65:
        body["prompt"] = _text(rng, 40)
    elif r < 0.8:
        body["prompt"] = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]
    elif r < 0.95:
        body["prompt"] = [_text(rng, 30) for _ in range(2)]  # a batch: 2 prompts x n choices
    else:
        body["prompt"] = ""  # an empty string is a valid prompt (the end-of-text token)
    if not stream and "logprobs" not in body and rng.random() < 0.15:
        body["echo"] = True
    return "/v1/completions", body


def _ntok(text):
    return max(1, len(text.encode()))  # ByteTokenizer; an empty prompt is the end-of-text token


def _chat_len(msgs):
    clean = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
              else "".join(p["text"] for p in m["content"])} for m in msgs]
    return len(chat_prompt(ByteTokenizer(), clean).encode())


def _check_tokens(body, ntok, reason, where):
    mt = body["max_tokens"]
    assert reason in ("length", "stop"), (where, reason)
    assert 0 <= ntok <= mt, (where, ntok, mt)
    if reason == "length":
        assert ntok == mt, (where, ntok, mt)
    if body["ignore_eos"] and not body.get("stop") and not body.get("stop_token_ids"):
        assert reason == "length", (where, reason)


def _stops(body):
    s = body.get("stop")
    return [] if s is None else [s] if isinstance(s, str) else s


def _nprompts(body):
    p = body.get("prompt")
    return len(p) if isinstance(p, list) and p and isinstance(p[0], str) else 1


def _check_valid_json(body, j, chat):
    n = body.get("n", 1)
    nchoices = _nprompts(body) * n
    assert j["object"] == ("chat.completion" if chat else "text_completion"), j
    assert j["model"] == "tiny"
    choices = j["choices"]
    assert sorted(c["index"] for c in choices) == list(range(nchoices)), j
    total = 0
    counted = not chat or bool(body.get("logprobs"))  # the choice's token count is known
    for c in choices:
        where = f"choice {c['index']}"
        if chat:
            assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str), c
            text = c["message"]["content"]
            if body.get("logprobs"):
                lp = c["logprobs"]["content"]
                ntok = len(lp)
                assert all(len(e["top_logprobs"]) == body.get("top_logprobs", 0) for e in lp), c
        else:
            ntok = len(c["token_ids"])
            text = c["text"]
            if body.get("echo"):
                p = body["prompt"]
                echo = p[c["index"] // n] if isinstance(p, list) and p and isinstance(p[0], str) else p
                if isinstance(echo, str):
                    assert text.startswith(echo), (c, echo)
                    text = text[len(echo):]
            if body.get("logprobs") is not None:
                assert len(c["logprobs"]["tokens"]) == ntok == len(c["logprobs"]["token_logprobs"]), c
        if counted:
            _check_tokens(body, ntok, c["finish_reason"], where)
            total += ntok
        else:
            assert c["finish_reason"] in ("length", "stop"), c
        for s in _stops(body):
            assert s not in text, (s, text, body)
    u = j["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    if not body.get("best_of"):  # best_of's usage counts every candidate
        if counted:
            assert u["completion_tokens"] == total, (u, total)
        elif body["ignore_eos"] and not _stops(body) and not body.get("stop_token_ids"):
            assert u["completion_tokens"] == nchoices * body["max_tokens"], (u, body)
        else:
            assert u["completion_tokens"] <= nchoices * body["max_tokens"], (u, body)


def _check_valid_stream(body, events, chat):
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    usage = None
    if body.get("stream_options", {}).get("include_usage"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"], chunks[-1]
        usage = chunks.pop()["usage"]
        assert all(c["usage"] is None for c in chunks)
    nchoices = _nprompts(body) * body.get("n", 1)
    toks = collections.defaultdict(int)
    texts = collections.defaultdict(str)
    lps = collections.defaultdict(int)
    reasons = collections.defaultdict(list)
    for c in chunks:
        assert c["object"] == ("chat.completion.chunk" if chat else "text_completion") and len(c["choices"]) == 1
        ch = c["choices"][0]
        i = ch["index"]
        assert not reasons[i] or reasons[i][-1] is None, ("a chunk after the finish", c)
        reasons[i].append(ch["finish_reason"])
        if chat:
            texts[i] += ch["delta"].get("content") or ""
            if ch["logprobs"] is not None:
                lps[i] += len(ch["logprobs"]["content"])
        else:
            toks[i] += len(ch["token_ids"])
            texts[i] += ch["text"]
            if ch["logprobs"] is not None:
                assert len(ch["logprobs"]["tokens"]) == len(ch["token_ids"])
    assert sorted(reasons) == list(range(nchoices)), (reasons, body)
    total = 0
    for i in range(nchoices):
        reason = reasons[i][-1]
        assert reason is not None, (i, reasons[i], body)
        if not chat:
            _check_tokens(body, toks[i], reason, f"stream choice {i}")
            total += toks[i]
        elif body.get("logprobs"):
            _check_tokens(body, lps[i], reason, f"stream choice {i}")
            total += lps[i]
        else:
            assert reason in ("length", "stop")
        for s in _stops(body):
            assert s not in texts[i], (s, texts[i], body)
    if usage is not None:
        if not chat or body.get("logprobs"):
            assert usage["completion_tokens"] == total, (usage, total)
        elif body["ignore_eos"] and not _stops(body) and not body.get("stop_token_ids"):
            assert usage["completion_tokens"] == nchoices * body["max_tokens"], (usage, body)


# ---------------------------------------------------------------------------------------------
# malformed requests: name -> rng -> (method, path, content bytes or an async iterator, status, param, code)
# ---------------------------------------------------------------------------------------------

C, CH = "/v1/completions", "/v1/chat/completions"


def _msg(rng):
    return [{"role": "user", "content": _text(rng, 10)}]


def _j(body):
    return json.dumps(body).encode()  # json.dumps writes NaN / Infinity and escapes lone surrogates


def _p(rng, **kw):
    return _j({"prompt": _text(rng, 10), "max_tokens": 2, **kw})


def _m(rng, **kw):
    return _j({"messages": _msg(rng), "max_tokens": 2, **kw})


def _either(rng, **kw):
    """(path, body): a completion or a chat request with these fields."""
    return (C, _p(rng, **kw)) if rng.random() < 0.5 else (CH, _m(rng, **kw))


def _chunked(data):
    async def gen():  # no Content-Length: the limit must hold while the body streams in
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]
    return gen


INVALID = {
    "bad_json": lambda r: ("POST", r.choice([C, CH]), b'{"prompt": "hi", "max_tokens": 2', 400, None, "invalid_json"),
    "not_utf8": lambda r: ("POST", C, b'{"prompt": "\xff\xfe"}', 400, None, "invalid_json"),
    "not_an_object": lambda r: ("POST", r.choice([C, CH]), b"[1, 2]", 400, None, "invalid_json"),
    "type_temperature": lambda r: ("POST", C, _p(r, temperature="hot"), 400, "temperature", "invalid_type"),
    "type_max_tokens_bool": lambda r: ("POST", CH, _m(r, max_tokens=True), 400, "max_tokens", "invalid_type"),
    "type_stream": lambda r: ("POST", C, _p(r, stream="yes"), 400, "stream", "invalid_type"),
    "type_stop": lambda r: ("POST", C, _p(r, stop=3), 400, "stop", "invalid_type"),
    "type_model": lambda r: ("POST", CH, _m(r, model=5), 400, "model", "invalid_type"),
    "type_messages": lambda r: ("POST", CH, _j({"messages": "hi"}), 400, "messages", "invalid_type"),
    "top_k_int32": lambda r: ("POST", *_either(r, top_k=2**31), 400, "top_k", "invalid_value"),
    "top_k_above_vocab": lambda r: ("POST", C, _p(r, top_k=VOCAB + 1), 400, "top_k", "invalid_value"),
    "seed_2_64": lambda r: ("POST", C, _p(r, seed=2**64), 400, "seed", "invalid_value"),
    "n_int32": lambda r: ("POST", C, _p(r, n=2**31), 400, "n", "invalid_value"),
    "max_tokens_huge": lambda r: ("POST", CH, _m(r, max_tokens=10**30), 400, "max_tokens", A),
    "max_tokens_negative": lambda r: ("POST", *_either(r, max_tokens=-5), 400, "max_tokens", A),
    "temperature_nan": lambda r: ("POST", C, _p(r, temperature=float("nan")), 400, "temperature", A),
    "temperature_inf": lambda r: ("POST", CH, _m(r, temperature=r.choice([float("inf"), float("-inf")])),
                                  400, "temperature", A),
    "temperature_10e400": lambda r: ("POST", C, _p(r, temperature=10**400), 400, "temperature", A),
    "top_p_nan": lambda r: ("POST", C, _p(r, top_p=float("nan")), 400, "top_p", A),
    "surrogate_prompt": lambda r: ("POST", C, _j({"prompt": "a\ud800b", "max_tokens": 2}), 400, "prompt",
                                   "invalid_value"),
    "surrogate_chat": lambda r: ("POST", CH, _j({"messages": [{"role": "user", "content": "a\ud800b"}]}), 400,
                                 "messages[0].content", "invalid_value"),
    "surrogate_stop": lambda r: ("POST", C, _p(r, stop="\udfff"), 400, "stop", "invalid_value"),
    "content_part_text_5": lambda r: ("POST", CH, _j({"messages": [{"role": "user", "content": [
        {"type": "text", "text": 5}]}]}), 400, "messages[0].content[0].text", "invalid_type"),
    "content_part_image": lambda r: ("POST", CH, _j({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "messages[0].content[0]", "invalid_value"),
    "unknown_model": lambda r: ("POST", *_either(r, model="gpt-9"), 404, "model", "model_not_found"),
    "oversized_body": lambda r: ("POST", r.choice([C, CH]), _j({"prompt": "x" * (MAX_BODY + 10)}), 413, None,
                                 "request_too_large"),
    "oversized_chunked": lambda r: ("POST", C, _chunked(_j({"prompt": "x" * (2 * MAX_BODY)})), 413, None,
                                    "request_too_large"),
    "tools": lambda r: ("POST", CH, _m(r, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools",
                        "unsupported_parameter"),
    "tools_completions": lambda r: ("POST", C, _p(r, tools=[{"type": "function"}]), 400, "tools",
                                    "unsupported_parameter"),
    "suffix": lambda r: ("POST", C, _p(r, suffix="end"), 400, "suffix", "unsupported_parameter"),
    "best_of_below_n": lambda r: ("POST", C, _p(r, n=2, best_of=1), 400, "n", "invalid_value"),
    "best_of_stream": lambda r: ("POST", C, _p(r, best_of=2, stream=True), 400, "best_of", "invalid_value"),
    "logit_bias_value": lambda r: ("POST", *_either(r, logit_bias={"5": r.choice([101, -100.5, 1e9])}), 400,
                                   "logit_bias", "invalid_value"),
    "logit_bias_token": lambda r: ("POST", C, _p(r, logit_bias={str(VOCAB): 1}), 400, "logit_bias", "invalid_value"),
    "logit_bias_key": lambda r: ("POST", CH, _m(r, logit_bias={"x": 1}), 400, "logit_bias", "invalid_value"),
    "empty_prompt_list": lambda r: ("POST", C, _j({"prompt": [], "max_tokens": 2}), 400, "prompt", "invalid_type"),
    "empty_messages": lambda r: ("POST", CH, _j({"messages": [], "max_tokens": 2}), 400, "messages", "invalid_type"),
    "missing_prompt": lambda r: ("POST", C, _j({"max_tokens": 2}), 400, "prompt", "missing_field"),
    "prompt_over_context": lambda r: ("POST", C, _j({"prompt": "y" * (CTX + r.randint(0, 50))}), 400, "prompt",
                                      "context_length_exceeded"),
    "prompt_plus_max_tokens": lambda r: ("POST", C, _j({"prompt": "y" * 40, "max_tokens": 30}), 400, "max_tokens",
                                         "context_length_exceeded"),
    "prompt_too_many_chars": lambda r: ("POST", CH, _j({"messages": [{"role": "user", "content": "z" * 5000}]}),
                                        400, "messages", "context_length_exceeded"),
    "token_outside_vocab": lambda r: ("POST", C, _j({"prompt": [1, 2, 99999]}), 400, "prompt", A),
    "n_above_slots": lambda r: ("POST", C, _p(r, n=SLOTS + 1), 400, "n", "invalid_value"),
    "stop_empty": lambda r: ("POST", C, _p(r, stop=""), 400, "stop", "invalid_value"),
    "stop_token_ids_negative": lambda r: ("POST", C, _p(r, stop_token_ids=[-1]), 400, "stop_token_ids", A),
    "stream_options_no_stream": lambda r: ("POST", CH, _m(r, stream_options={"include_usage": True}), 400,
                                           "stream_options", "invalid_value"),
    "top_logprobs_no_logprobs": lambda r: ("POST", CH, _m(r, top_logprobs=2), 400, "top_logprobs", "invalid_value"),
    "logprobs_6": lambda r: ("POST", C, _p(r, logprobs=6), 400, "logprobs", "invalid_value"),
    "echo_with_logprobs": lambda r: ("POST", C, _p(r, echo=True, logprobs=1), 400, "echo", "unsupported_value"),
    "response_format_xml": lambda r: ("POST", CH, _m(r, response_format={"type": "xml"}), 400, "response_format",
                                      "invalid_value"),
    "no_such_route": lambda r: ("POST", "/v1/nope", b"{}", 404, None, "not_found"),
    "wrong_method": lambda r: ("GET", r.choice([C, CH]), None, 405, None, "method_not_allowed"),
}

DISCONNECTS = ("disconnect_mid_stream", "disconnect_before_headers", "disconnect_non_stream")
CANCELS = ("cancel_stream_by_id", "cancel_engine_handle")


def _plan(rng):
    """N_REQUESTS kinds: every invalid / disconnect / cancel class at least 3 times, the rest drawn at random."""
    kinds = [k for k in list(INVALID) + list(DISCONNECTS) + list(CANCELS) for _ in range(3)]
    while len(kinds) < N_REQUESTS:
        r = rng.random()
        if r < 0.55:
            kinds.append(rng.choice(["valid_completion", "valid_chat"]))
        elif r < 0.83:
            kinds.append(rng.choice(list(INVALID)))
        elif r < 0.95:
            kinds.append(rng.choice(DISCONNECTS))
        else:
            kinds.append(rng.choice(CANCELS))
    rng.shuffle(kinds)
    return kinds


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def loaded_server():
    cfg = config_from_preset("nano", n_layer=1, d_model=32, n_head=2, vocab_size=VOCAB, max_seq_len=CTX,
                             attention="xla", init_std=0.3)
    # 6 slots of up to 9 blocks each share a 12-block pool: sequences preempt each other
    engine = Engine(build_model(cfg, 0), tokenizer=ByteTokenizer(), num_blocks=12, max_seqs=SLOTS, block_size=BLOCK,
                    max_num_batched_tokens=32, prefill_rows=2, max_chunk=16, chunk_buckets=(16,),
                    max_waiting=MAX_WAITING)
    app = create_app(engine, ByteTokenizer(), model_name="tiny", max_body_bytes=MAX_BODY)
    base, srv, th = _start(app)
    yield base, engine, app
    srv.should_exit = True
    th.join(10)
    engine.stop()


async def _post_until_served(c, path, body, counts, stream=False):
    """POST until the answer is not a 429 (the queue was full): the response (a stream: open, unread)."""
    for _ in range(2000):
        req = c.build_request("POST", path, content=_j(body), headers={"Content-Type": "application/json"})
        r = await c.send(req, stream=stream)
        if r.status_code != 429:
            return r
        await r.aread()
        assert r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1, r.text
        if stream:
            await r.aclose()
        counts["429_retried"] += 1
        await asyncio.sleep(random.uniform(0.02, 0.15))  # Retry-After is 1 s; a test can be keener
    raise AssertionError(f"still 429 after 2000 tries: {body}")


async def _read_sse(r):
    return _sse([line async for line in r.aiter_lines()])


async def _one(c, kind, rng, engine, counts):
    if kind.startswith("valid_"):
        chat = kind == "valid_chat"
        path, body = _valid(rng, chat)
        for f in ("stream", "n", "best_of", "stop", "seed", "logprobs", "echo", "stream_options", "logit_bias",
                  "presence_penalty", "top_k", "top_p", "beam_width"):
            v = body.get(f)
            if v is not None and v is not False:
                counts[f"+{kind}:{f}"] += 1
        if isinstance(body.get("prompt"), list) and body["prompt"] and isinstance(body["prompt"][0], str):
            counts[f"+{kind}:batch"] += 1
        if body["stream"]:
            r = await _post_until_served(c, path, body, counts, stream=True)
            try:
                assert r.status_code == 200, (r.status_code, (await r.aread())[:500], body)
                _check_valid_stream(body, await _read_sse(r), chat)
            finally:
                await r.aclose()
        else:
            r = await _post_until_served(c, path, body, counts)
            assert r.status_code == 200, (r.status_code, r.text[:500], body)
            _check_valid_json(body, r.json(), chat)
        return
    if kind in INVALID:
        method, path, content, status, param, code = INVALID[kind](rng)
        if callable(content):
            content = content()
        r = await c.request(method, path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (kind, r.status_code, r.text[:300])
        assert r.headers["content-type"].startswith("application/json"), (kind, r.headers)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (kind, err)
        assert err["type"] == "invalid_request_error", (kind, err)
        assert param is A or err["param"] == param, (kind, err)
        assert code is A or err["code"] == code, (kind, err)
        return
    chat = rng.random() < 0.5
    body = {"max_tokens": rng.randint(20, 36), "ignore_eos": True, "temperature": rng.choice([0, 1.0])}
    if rng.random() < 0.3:
        body["n"] = 2
    if chat:
        body["messages"] = [{"role": "user", "content": _text(rng, 6)}]
        path = CH
    else:
        body["prompt"] = _text(rng, 20)
        path = C
    if kind == "disconnect_mid_stream":  # hang up after the first chunk
        r = await _post_until_served(c, path, {**body, "stream": True}, counts, stream=True)
        try:
            assert r.status_code == 200, r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
        finally:
            await r.aclose()
    elif kind == "disconnect_before_headers":  # give up while queued or prefilling
        try:
            await asyncio.wait_for(c.post(path, json={**body, "stream": True}), rng.uniform(0.001, 0.05))
        except asyncio.TimeoutError:
            pass
    elif kind == "disconnect_non_stream":  # a non-streamed request the client gives up on
        try:
            await asyncio.wait_for(c.post(path, json=body), rng.uniform(0.005, 0.3))
        except asyncio.TimeoutError:
            pass
    elif kind == "cancel_stream_by_id":  # the engine cancels a request the server is streaming
        r = await _post_until_served(c, path, {**body, "stream": True}, counts, stream=True)
        try:
            assert r.status_code == 200, r.status_code
            lines = r.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    rid = json.loads(line[6:])["id"]
                    break
            counts["cancel_found"] += await asyncio.to_thread(engine.cancel, rid)
            rest = _sse([line async for line in lines])  # the stream still ends properly
            assert rest and rest[-1] == "[DONE]", rest[-3:]
            assert all("error" not in json.loads(e) for e in rest[:-1]), rest
        finally:
            await r.aclose()
    elif kind == "cancel_engine_handle":  # an in-process client of the same engine cancels its request
        params = RequestParams(max_tokens=body["max_tokens"], ignore_eos=True, n=body.get("n", 1),
                               temperature=body["temperature"], seed=rng.randrange(2**32))
        prompt = list(_text(rng, 20).encode())
        while True:
            try:
                h = await asyncio.to_thread(engine.add_request, prompt, params)
                break
            except QueueFullError:
                counts["429_retried"] += 1
                await asyncio.sleep(rng.uniform(0.02, 0.15))
        await asyncio.sleep(rng.uniform(0, 0.2))
        await asyncio.to_thread(h.cancel)
        assert await asyncio.to_thread(h.wait, 30), "a cancelled handle did not finish"
    else:
        raise AssertionError(kind)


def _stats_idle(engine):
    s = engine.stats()
    return s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_used"] == 0 and not engine.handles


def _metrics(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


@pytest.mark.slow
def test_load_and_faults(loaded_server, caplog):
    base, engine, app = loaded_server
    rng = random.Random(SEED)
    kinds = _plan(rng)
    assert len(kinds) >= 1000
    seeds = [rng.randrange(2**63) for _ in kinds]
    counts: collections.Counter = collections.Counter()
    failures: list = []
    t0 = time.monotonic()
    # warm up (compiles): a prefill, decodes with and without filtering, logprobs and penalties
    with httpx.Client(base_url=base, timeout=120) as c:
        for extra in ({}, {"top_k": 5, "top_p": 0.9, "logprobs": 2}, {"presence_penalty": 1.0, "logit_bias": {"1": 5}}):
            r = c.post(C, json={"prompt": "warm up", "max_tokens": 12, "ignore_eos": True, **extra})
            assert r.status_code == 200, r.text
    t_warm = time.monotonic() - t0

    async def main():
        sem = asyncio.Semaphore(IN_FLIGHT)
        limits = httpx.Limits(max_connections=IN_FLIGHT * 2, max_keepalive_connections=IN_FLIGHT)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:
            async def run(i, kind):
                async with sem:
                    try:
                        await _one(c, kind, random.Random(seeds[i]), engine, counts)
                        counts[kind] += 1
                    except Exception as e:  # noqa: BLE001 - collected, reported together
                        failures.append((i, kind, repr(e)[:800]))
            await asyncio.gather(*(run(i, k) for i, k in enumerate(kinds)))

    with caplog.at_level(logging.WARNING):
        asyncio.run(asyncio.wait_for(main(), LOAD_TIMEOUT))
        t_load = time.monotonic() - t0 - t_warm

        # the pool and the queues return to idle (disconnects are noticed within ~50 ms)
        deadline = time.monotonic() + 20
        while not _stats_idle(engine):
            assert time.monotonic() < deadline, f"the engine did not return to idle: {engine.stats()}"
            time.sleep(0.05)
        stats = engine.stats()
        with engine._lock:
            engine.blocks.check()
            assert engine.blocks.num_used == 0
            assert not engine.scheduler.running and not engine.scheduler.waiting
        with httpx.Client(base_url=base, timeout=60) as c:
            assert c.get("/health").status_code == 200
            m = _metrics(c.get("/metrics").text)
            assert m["flashjax_requests_running"] == m["flashjax_requests_waiting"] == 0, m
            assert m["flashjax_kv_blocks_used"] == 0, m
            # and it still serves
            r = c.post(C, json={"prompt": "after the storm", "max_tokens": 5, "ignore_eos": True, "temperature": 0})
            assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 5, r.text
    while not _stats_idle(engine):
        time.sleep(0.02)
    assert engine.engine_error is None
    assert engine._thread is not None and engine._thread.is_alive()
    http = app.state.service.http_counts
    summary = {k: counts[k] for k in sorted(counts)}
    print(f"\nload seed {SEED}: {len(kinds)} requests in {t_load:.1f} s (+{t_warm:.1f} s warm-up); "
          f"preemptions {stats['preemptions']}, rejected (429) {stats['requests_rejected']}, "
          f"cancelled {stats['requests_cancelled']}; server answers {dict(sorted(http.items()))}\n{summary}")
    assert not failures, f"{len(failures)} failures (seed {SEED}), first ones: {failures[:5]}"
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert not errors, [rec.getMessage()[:300] for rec in errors[:5]]
    assert not {k: v for k, v in http.items() if k.startswith("5")}, http
    # the load exercised what it is meant to
    assert sum(v for k, v in counts.items() if k in kinds) == len(kinds)
    assert stats["preemptions"] > 0 and stats["requests_rejected"] > 0 and counts["429_retried"] > 0, stats
    assert stats["requests_cancelled"] > 0, stats


def test_client_gone_while_sending_its_body_is_not_a_500(caplog):
    """Declare 100 bytes, send 12, hang up: no 500 is counted and nothing is logged at ERROR."""
    import socket

    cfg = config_from_preset("nano", n_layer=1, d_model=32, n_head=2, vocab_size=VOCAB, max_seq_len=CTX,
                             attention="xla")
    engine = Engine(build_model(cfg, 0), tokenizer=ByteTokenizer(), num_blocks=16, max_seqs=2, block_size=8)
    app = create_app(engine, ByteTokenizer(), model_name="tiny")
    base, srv, th = _start(app)
    try:
        with caplog.at_level(logging.WARNING):
            port = int(base.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\": \"")
                time.sleep(0.2)
            deadline = time.monotonic() + 10
            while not app.state.service.http_counts and time.monotonic() < deadline:
                time.sleep(0.05)
            assert httpx.get(f"{base}/health").status_code == 200
        http = app.state.service.http_counts
        errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert "500" not in http, http
        assert not errors, errors
    finally:
        srv.should_exit = True
        th.join(10)
        engine.stop()


def _tight_engine(cached=None):
    """12 blocks of 8 tokens; `cached` (a prompt) is run first; two 36-token requests then take
    10 blocks (5 each) once prefilled."""
    cfg = config_from_preset("nano", n_layer=1, d_model=32, n_head=2, vocab_size=VOCAB, max_seq_len=CTX,
                             attention="xla")
    engine = Engine(build_model(cfg, 0), tokenizer=ByteTokenizer(), num_blocks=12, max_seqs=6, block_size=BLOCK,
                    decode_steps=1)
    greedy = dict(ignore_eos=True, temperature=0)
    if cached is not None:
        engine.generate([cached], RequestParams(max_tokens=1, **greedy))
    a = engine.add_request([97] * 36, RequestParams(max_tokens=20, **greedy))
    b = engine.add_request([98] * 36, RequestParams(max_tokens=20, **greedy))
    while min(len(a.token_ids[0]), len(b.token_ids[0])) < 1:
        engine.step()
    return engine, greedy


def _run(engine, known):
    """run_until_done; a RuntimeError other than the known bug's is a plain failure (not the xfail)."""
    try:
        engine.run_until_done(max_steps=500)
    except RuntimeError as e:
        if known not in str(e):
            raise AssertionError(f"not the known bug ({known!r}): {e!r}") from e
        raise


def test_n2_fork_of_a_cached_prompt_under_block_pressure():
    """Was: admitted and forked in one step without room for its extra sequences' blocks
    ('scheduler bug: step needs 2 blocks, 1 available' killed the engine thread)."""
    engine, greedy = _tight_engine(cached=[99] * 8)  # [99] * 8 stays as a cached block
    assert (engine.blocks.num_used, engine.blocks.num_free, len(engine.blocks.evictable)) == (10, 1, 1)
    h = engine.add_request([99] * 9, RequestParams(max_tokens=2, n=2, **greedy))
    _run(engine, "scheduler bug")
    assert h.finish_reasons == ["length", "length"]
    engine.blocks.check()


def test_beam_fork_under_block_pressure():
    """Was: beam_step forked beams with no block reserved for it ('out of KV blocks')."""
    engine, greedy = _tight_engine()
    h = engine.add_request([99] * 12, RequestParams(max_tokens=4, beam_width=2, **greedy))  # the last 2 blocks
    _run(engine, "out of KV blocks")
    assert h.finish_reasons == ["length"]
    engine.blocks.check()
