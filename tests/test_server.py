"""The OpenAI-compatible server (flashjax.serving.server) over real HTTP on loopback.

A tiny random model with a byte-level test tokenizer; uvicorn runs in a thread,
httpx is the client; the chat page is loaded in headless Chromium when present.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import socket
import subprocess
import tempfile
import threading
import time

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")

from flashjax.models.config import config_from_preset  # noqa: E402
from flashjax.models.gpt import build_model  # noqa: E402
from flashjax.serving.engine import Engine  # noqa: E402
from flashjax.serving.server import create_app, run_server  # noqa: E402

CTX = 64


class ByteTokenizer:
    """Bytes are ids 0..255; 256 is end-of-text."""

    eot_id = 256
    vocab_size = 257

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(app):
    """Run `app` with uvicorn in a daemon thread on a free loopback port: (base url, server, thread)."""
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "uvicorn did not start"
        assert th.is_alive(), "uvicorn exited at start-up"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", srv, th


@pytest.fixture(scope="module")
def server():
    cfg = config_from_preset("nano", n_layer=2, d_model=64, n_head=4, vocab_size=260, max_seq_len=CTX,
                             attention="xla", init_std=0.3)
    engine = Engine(build_model(cfg, 0), tokenizer=ByteTokenizer(), num_blocks=48, max_seqs=4, block_size=8,
                    max_num_batched_tokens=32, prefill_rows=2, max_chunk=16, chunk_buckets=(16,),
                    max_waiting=64)
    app = create_app(engine, ByteTokenizer(), model_name="tiny")
    base, srv, th = _start(app)
    # warm up the jitted steps so timings in the tests are not compile-bound
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "warm up the engine, all variants",
                                                   "max_tokens": 3, "temperature": 0}, timeout=300)
    assert r.status_code == 200, r.text
    yield base, engine
    srv.should_exit = True
    th.join(10)
    engine.stop()


def _sse(lines):
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(line[6:])
    return events


def test_health_models_metrics(server):
    base, engine = server
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    m = httpx.get(f"{base}/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == "tiny" and m["data"][0]["max_model_len"] == CTX
    text = httpx.get(f"{base}/metrics").text
    for name in ("flashjax_requests_running", "flashjax_requests_waiting", "flashjax_kv_blocks_used",
                 "flashjax_kv_blocks_free", "flashjax_prefix_cache_hit_rate", "flashjax_time_to_first_token_seconds"):
        assert name in text
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "<script>" in page.text


def test_completion_stream_and_not(server):
    base, engine = server
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "text_completion" and j["id"].startswith("cmpl-")
    ch = j["choices"][0]
    assert len(ch["token_ids"]) == 6 and ch["finish_reason"] == "length"
    assert j["usage"] == {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15,
                          "prompt_tokens_details": {"cached_tokens": j["usage"]["prompt_tokens_details"]["cached_tokens"]}}
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = _sse(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == ch["token_ids"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ch["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # the second identical prompt's full block came from the prefix cache
    r2 = httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()
    assert r2["choices"][0]["token_ids"] == ch["token_ids"]
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == 8


def test_chat_stream_and_n(server):
    base, engine = server
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0.7, "seed": 3,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as s:
        assert s.status_code == 200
        events = _sse(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    r = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False, "n": 2}, timeout=120).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert all(c["message"]["role"] == "assistant" for c in r["choices"])
    assert r["usage"]["completion_tokens"] == 10


def test_many_concurrent_requests(server):
    base, engine = server

    async def main():
        async with httpx.AsyncClient(base_url=base, timeout=300) as c:
            async def one(i):
                body = {"prompt": f"request number {i} " * (1 + i % 3), "max_tokens": 2 + i % 5,
                        "temperature": 0, "ignore_eos": True, "stream": bool(i % 2)}
                if i % 2:
                    async with c.stream("POST", "/v1/completions", json=body) as s:
                        lines = [ln async for ln in s.aiter_lines()]
                    ev = _sse(lines)
                    assert ev[-1] == "[DONE]"
                    return sum(len(json.loads(e)["choices"][0]["token_ids"]) for e in ev[:-1])
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return len(r.json()["choices"][0]["token_ids"])
            return await asyncio.gather(*(one(i) for i in range(8)))

    counts = asyncio.run(main())
    assert counts == [2 + i % 5 for i in range(8)]
    # prefill with and without a decode step, one and K decode steps, each with and without
    # top-k / top-p filtering; +1 for JAX's one-off retrace
    assert engine.trace_counts["step"] <= 2 * 4 + 1


def test_disconnect_cancels(server):
    base, engine = server
    before = engine.stats()["requests_cancelled"]
    body = {"prompt": "a long one", "max_tokens": 50, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as s:
        it = s.iter_lines()
        for line in it:
            if line.startswith("data: "):
                break  # got the first token; hang up
    deadline = time.time() + 60
    while engine.stats()["requests_cancelled"] == before:
        assert time.time() < deadline, "the disconnect did not cancel the request"
        time.sleep(0.05)
    while engine.stats()["running"]:
        assert time.time() < deadline
        time.sleep(0.05)
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), "temperature"),
    (json.dumps({"prompt": "x", "top_p": 0}).encode(), "top_p"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": True}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "n": 0}).encode(), "n"),
    (json.dumps({"prompt": "x", "stream": "yes"}).encode(), "stream"),
    (json.dumps({"prompt": "x", "stop": 3}).encode(), "stop"),
    (json.dumps({"prompt": "y" * (CTX + 5)}).encode(), "prompt"),
    (json.dumps({"prompt": "y" * 40, "max_tokens": 40}).encode(), "max_tokens"),
    (json.dumps({"prompt": [1, 2, 99999]}).encode(), "prompt"),
    (json.dumps({"prompt": 5}).encode(), "prompt"),
    (json.dumps({"max_tokens": 3}).encode(), "prompt"),
    # each error names the field the client sent (the server has 4 slots, logprobs_k 8)
    (json.dumps({"prompt": "x", "stop_token_ids": [-1]}).encode(), "stop_token_ids"),
    (json.dumps({"prompt": "x", "n": 5}).encode(), "n"),
    (json.dumps({"prompt": "x", "best_of": 5}).encode(), "best_of"),
    (json.dumps({"prompt": "x", "best_of": 9}).encode(), "best_of"),
    (json.dumps({"prompt": "x", "best_of": 0}).encode(), "best_of"),
    (json.dumps({"prompt": "x", "beam_width": 5}).encode(), "beam_width"),
    (json.dumps({"prompt": "x", "n": 3, "best_of": 2}).encode(), "n"),
    (json.dumps({"prompt": "x", "n": 5, "use_beam_search": True}).encode(), "n"),
])
def test_bad_requests_are_400(server, body, param):
    base, _ = server
    r = httpx.post(f"{base}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_bad_chat_and_overload(server):
    base, engine = server
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": 3}]})
    assert r.status_code == 400
    engine.max_waiting = 0
    try:
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    finally:
        engine.max_waiting = 64
    assert httpx.get(f"{base}/nope").status_code == 404


# Values that must never reach the device: each is refused with a JSON 400 naming its field
# (before the range checks, top_k=2**31 killed the engine thread: OverflowError for int32).
I32 = 2**31
EXTREMES = [
    ("top_k", I32), ("top_k", 2**63), ("top_k", -2**63), ("top_k", 10**30), ("top_k", -2), ("top_k", 1e30),
    ("seed", 2**32), ("seed", 2**64), ("seed", -1), ("seed", -2**63), ("seed", 1e30),
    ("max_tokens", I32), ("max_tokens", 10**30), ("max_tokens", -2**63), ("max_tokens", 1e30),
    ("max_completion_tokens", I32),
    ("n", I32), ("n", 10**30), ("n", -2**63),
    ("beam_width", I32), ("beam_width", -I32),
    ("stop_token_ids", [I32]), ("stop_token_ids", [10**30]), ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.5]),
    ("temperature", 1e30), ("temperature", -1e30), ("temperature", float("nan")),
    ("temperature", float("inf")), ("temperature", float("-inf")), ("temperature", 10**400),
    ("top_p", 1e30), ("top_p", -1e30), ("top_p", float("nan")), ("top_p", float("inf")),
]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_extreme_values_are_400_and_the_engine_survives(server, chat):
    base, engine = server
    path = "/v1/chat/completions" if chat else "/v1/completions"
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    cases = list(EXTREMES)
    if not chat:
        cases += [("prompt", [I32]), ("prompt", [-1]), ("prompt", [10**30])]
    with httpx.Client(base_url=base, timeout=60) as c:
        for field, value in cases:
            body = {**prompt, field: value} if field == "max_completion_tokens" else {**prompt, "max_tokens": 2, field: value}
            # json.dumps writes NaN/Infinity, which Python's (and many clients') parsers accept
            r = c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (field, value, r.status_code, r.text)
            err = r.json()["error"]
            want = "max_tokens" if field == "max_completion_tokens" else field
            assert err["param"] == want and err["type"] == "invalid_request_error", (field, value, err)
        assert c.get("/health").status_code == 200
        r = c.post(path, json={**prompt, "max_tokens": 3, "temperature": 0.8, "top_k": 5, "seed": 2**32 - 1,
                               "stop_token_ids": [259], "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
    assert engine.engine_error is None


class _DyingEngine:
    """Just enough of an Engine for create_app: its thread dies (with `error`, or quietly) on `kill`."""

    max_len = CTX

    def __init__(self, error=None):
        self.engine_error = None
        self._thread = None
        self._error = error
        self.kill = threading.Event()

    def start(self):
        def loop():
            self.kill.wait(120)
            if self._error is not None:
                self.engine_error = self._error

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self, timeout=None):
        self.kill.set()


def _wait_for(pred, what, timeout=30):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize("error", [OverflowError("Python integer 2147483648 out of bounds for int32"), None],
                         ids=["engine_error", "thread_gone"])
def test_dead_engine_health_503_logged_and_reported(error, caplog):
    engine = _DyingEngine(error)
    failures = []
    app = create_app(engine, ByteTokenizer(), model_name="tiny", on_engine_failure=failures.append,
                     engine_watch_interval=0.02)
    base, srv, th = _start(app)
    try:
        with caplog.at_level(logging.ERROR, logger="flashjax.serving.server"):
            assert httpx.get(f"{base}/health").json() == {"status": "ok"}
            engine.kill.set()
            _wait_for(lambda: failures, "the server did not notice the dead engine")
            r = httpx.get(f"{base}/health")
            r2 = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        cause = "out of bounds for int32" if error else "engine thread has stopped"
        assert r.status_code == 503 and cause in r.json()["error"]["message"], r.text
        assert r.json()["error"]["code"] == "engine_error"
        assert r2.status_code == 503 and cause in r2.json()["error"]["message"]
        assert len(failures) == 1 and cause in failures[0]
        logged = [rec for rec in caplog.records if rec.name == "flashjax.serving.server"]
        assert len(logged) == 1 and logged[0].levelno == logging.ERROR and cause in logged[0].getMessage()
        if error is not None:
            assert logged[0].exc_info[1] is error  # the traceback is logged too
    finally:
        srv.should_exit = True
        th.join(10)


def test_run_server_exits_1_when_the_engine_dies(capfd):
    """`flashjax serve` runs run_server: a dead engine shuts the server down with status 1."""
    engine = _DyingEngine(RuntimeError("device step failed"))
    app = create_app(engine, ByteTokenizer(), model_name="tiny", engine_watch_interval=0.02)
    port = _free_port()
    result = []
    th = threading.Thread(target=lambda: result.append(run_server(app, "127.0.0.1", port)), daemon=True)
    th.start()
    _wait_for(lambda: _get_ok(f"http://127.0.0.1:{port}/health"), "run_server did not start")
    engine.kill.set()
    th.join(30)
    assert not th.is_alive(), "the server kept running with a dead engine"
    assert result == [1]
    assert "device step failed" in capfd.readouterr().err
    engine.stop()


def _get_ok(url):
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_body_size_limit_413(server):
    base, engine = server
    from flashjax.serving.server import DEFAULT_MAX_BODY_BYTES

    big = json.dumps({"prompt": "x" * DEFAULT_MAX_BODY_BYTES, "max_tokens": 2}).encode()
    with httpx.Client(base_url=base, timeout=60) as c:
        r = c.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text[:300]
        assert r.json()["error"]["code"] == "request_too_large"

        def chunked():  # no Content-Length: the limit holds while the body streams in
            for i in range(0, len(big), 1 << 16):
                yield big[i:i + (1 << 16)]

        r = c.post("/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
        assert c.get("/health").status_code == 200


def test_serve_max_body_bytes_option():
    import argparse

    from flashjax.serving.server import DEFAULT_MAX_BODY_BYTES, add_serve_arguments

    p = add_serve_arguments(argparse.ArgumentParser())
    assert p.parse_args(["--checkpoint", "x"]).max_body_bytes == DEFAULT_MAX_BODY_BYTES == 4 << 20
    assert p.parse_args(["--checkpoint", "x", "--max-body-bytes", "1000"]).max_body_bytes == 1000
    with pytest.raises(SystemExit):
        p.parse_args(["--checkpoint", "x", "--max-body-bytes", "0"])


class GateTokenizer(ByteTokenizer):
    """encode() of a text holding GATE blocks until `release` is set (a tokenization that takes long)."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        if "BOOM" in text:
            raise RuntimeError("the tokenizer exploded")
        if "GATE" in text:
            self.entered.set()
            self.release.wait(60)
        return super().encode(text)


@pytest.fixture
def gated(server):
    """A second app on the same engine whose tokenizer blocks on GATE: (base url, tokenizer)."""
    _, engine = server
    tok = GateTokenizer()
    app = create_app(engine, tok, model_name="tiny", max_body_bytes=1 << 20, max_prompt_chars=CTX * 4)
    base, srv, th = _start(app)
    yield base, tok
    tok.release.set()
    srv.should_exit = True
    th.join(10)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_tokenizing_does_not_block_the_event_loop(gated, chat):
    """/health answers while a prompt is being tokenized (the tokenizer is held until health has answered)."""
    base, tok = gated
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = ({"messages": [{"role": "user", "content": "GATE"}]} if chat else {"prompt": "GATE"})
    result = []
    t = threading.Thread(target=lambda: result.append(
        httpx.post(f"{base}{path}", json={**body, "max_tokens": 2}, timeout=120)), daemon=True)
    t.start()
    try:
        assert tok.entered.wait(60), "the prompt never reached the tokenizer"
        try:
            health = httpx.get(f"{base}/health", timeout=5)
        except httpx.TimeoutException:
            pytest.fail("/health did not answer while a prompt was being tokenized")
        assert health.status_code == 200
    finally:
        tok.release.set()
    t.join(120)
    assert result and result[0].status_code == 200, result and result[0].text


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_overlong_prompt_text_refused_before_tokenizing(gated, chat):
    base, tok = gated
    text = "GATE" + "y" * (CTX * 4)  # max_prompt_chars is CTX * 4 here
    body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    r = httpx.post(f"{base}{'/v1/chat/completions' if chat else '/v1/completions'}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == ("messages" if chat else "prompt")
    assert tok.calls == 0 and not tok.entered.is_set()


BAD_TEXT = [  # (body, param): invalid text and content parts are 400s naming the field, never a 500
    ({"prompt": "a\ud800b"}, "prompt"),
    ({"prompt": ["\udfff"]}, "prompt"),
    ({"prompt": "hi", "stop": "\ud800"}, "stop"),
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ({"messages": [{"role": "user\udc00", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]}, "messages[0].content[1]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": {"text": "an object"}}]}, "messages[0].content"),
]


@pytest.mark.parametrize("body,param", BAD_TEXT, ids=[p for _, p in BAD_TEXT])
def test_bad_text_is_a_json_400(server, body, param):
    base, _ = server
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    # json.dumps escapes the lone surrogate as \ud800, as a client's JSON encoder would
    r = httpx.post(f"{base}{path}", content=json.dumps({**body, "max_tokens": 2}),
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_text_content_parts_are_joined(server):
    base, _ = server
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}],
             "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    plain = {**parts, "messages": [{"role": "user", "content": "hi"}]}
    a = httpx.post(f"{base}/v1/chat/completions", json=parts, timeout=60)
    b = httpx.post(f"{base}/v1/chat/completions", json=plain, timeout=60)
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]
    assert a.json()["usage"]["prompt_tokens"] == b.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_unexpected_exception_is_a_json_500(gated, chat):
    base, _ = gated
    body = {"messages": [{"role": "user", "content": "BOOM"}]} if chat else {"prompt": "BOOM"}
    r = httpx.post(f"{base}{'/v1/chat/completions' if chat else '/v1/completions'}", json=body, timeout=60)
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "internal_error"
    assert "the tokenizer exploded" in err["message"]
    assert httpx.get(f"{base}/health").status_code == 200


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_unseeded_sampling_is_fresh_and_seeded_is_reproducible(server, chat):
    base, _ = server
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"max_tokens": 12, "temperature": 1.5, "ignore_eos": True,
            **({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})}

    def text(extra):
        r = httpx.post(f"{base}{path}", json={**body, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        return c["message"]["content"] if chat else tuple(c["token_ids"])

    unseeded = {text({}) for _ in range(4)}
    assert len(unseeded) > 1, "four unseeded requests drew the same tokens"
    assert len({text({"seed": 1234}) for _ in range(3)}) == 1
    text({"seed": None})  # null means unseeded too


def test_queue_full_429_has_retry_after(server):
    base, engine = server
    engine.max_waiting = 0
    try:
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    finally:
        engine.max_waiting = 64
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert int(r.headers["retry-after"]) >= 1


def test_assistant_content_null_with_tool_calls(server):
    base, _ = server
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "user", "content": "and?"}]
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": msgs, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": None}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _CDP:
    """Chrome DevTools Protocol over --remote-debugging-pipe (fds 3/4): no websocket library needed."""

    def __init__(self, exe, profile):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        # a tiny trampoline puts the pipe ends on fds 3 (commands in) and 4 (replies out)
        tramp = (f"import fcntl, os, sys; a = fcntl.fcntl({to_chrome_r}, fcntl.F_DUPFD, 10); "
                 f"b = fcntl.fcntl({from_chrome_w}, fcntl.F_DUPFD, 10); os.dup2(a, 3); os.dup2(b, 4); "
                 "os.execv(sys.argv[1], sys.argv[1:])")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", tramp, exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(profile, "chromium.log"), "w"), env={**os.environ, "HOME": profile},
            start_new_session=True)  # its own process group: close() ends the renderers too
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.log_path = os.path.join(profile, "chromium.log")

    def call(self, method, session=None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 65536)
                if not chunk:
                    log = self.log_path and open(self.log_path).read()[-2000:]
                    raise RuntimeError(f"chromium closed the DevTools pipe; its log ends: {log}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self):
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        os.close(self._w)
        os.close(self._r)


def test_chat_page_in_headless_chromium(server):
    """Load the chat page in real headless Chromium, send a message, wait for the streamed reply."""
    base, _ = server
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium)")
    # Chromium's helpers may still flush files into the profile as it is removed.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        cdp = _CDP(exe, profile)
        try:
            target = cdp.call("Target.createTarget", url=f"{base}/?q=hello&max_tokens=8")["targetId"]
            session = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

            def js(expr):
                return cdp.call("Runtime.evaluate", session, expression=expr, returnByValue=True)["result"].get("value")

            deadline = time.time() + 120
            while js("document.body && document.body.dataset.replies") != "1":
                assert time.time() < deadline, "no reply in the page after 120 s"
                time.sleep(0.2)
            reply = js("document.querySelector('.msg.assistant .text').textContent")
            status = js("document.getElementById('status').textContent")
            user = js("document.querySelector('.msg.user .text').textContent")
        finally:
            cdp.close()
    assert user == "hello"
    assert status == "done" and "[error" not in reply, reply
    assert reply, "the streamed reply is empty"


def test_run_server_stops_the_engine_after_shutdown(monkeypatch):
    """After uvicorn returns (SIGINT/SIGTERM, once open requests are answered), `flashjax serve`
    stops the engine: its steps in flight finish and its thread ends."""
    import types

    import uvicorn

    from flashjax.serving import server as srv

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # an immediate shutdown
    monkeypatch.setattr(sys, "setswitchinterval", lambda interval: None)
    stopped = []
    engine = types.SimpleNamespace(stop=lambda: stopped.append(True))
    app = types.SimpleNamespace(state=types.SimpleNamespace(
        service=types.SimpleNamespace(engine=engine, engine_failure=None), on_engine_failure=None))
    assert srv.run_server(app, "127.0.0.1", 0) == 0
    assert stopped == [True]
