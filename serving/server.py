"""OpenAI-compatible HTTP server over the continuous-batching engine.

    flashjax serve --checkpoint runs/nano [--host 127.0.0.1] [--port 8000]

Endpoints (FastAPI + uvicorn; the engine steps in a background thread so the
event loop stays responsive):

    POST /v1/completions        prompt: a string or a list of token ids, or a batch (a list
                                of strings or of token-id lists; choice index = prompt * n + j)
    POST /v1/chat/completions   messages: [{"role", "content"}] (the tokenizer's chat
                                template if it has one, else a plain "role: content" form)
    GET  /v1/models, GET /health, GET /metrics (Prometheus text), GET / (a chat page)

OpenAI parameters honoured (both POSTs unless marked): model (the served name, else 404
model_not_found), max_tokens / max_completion_tokens, temperature, top_p, seed (none: fresh
randomness), stop, n, stream, stream_options.include_usage (a last chunk with the usage and no
choices), presence_penalty, frequency_penalty, logit_bias (token-id strings -> [-100, 100]),
logprobs (completions: 0..5 alternatives, the legacy object; chat: logprobs: true +
top_logprobs 0..20), echo (completions; not with logprobs), best_of (sample best_of
candidates, return the n with the highest summed log-probability; not with stream),
response_format (text; json_object / json_schema by grammar-constrained decoding, llguidance:
`_Service.response_format_grammar` is the one place it is decided); user, metadata,
safety_identifier, prompt_cache_key are accepted and have no effect. Refused with a 400
naming the field: tools, tool_choice, parallel_tool_calls, functions, function_call, suffix,
audio, modalities other than ["text"], prediction, web_search_options, reasoning_effort,
verbosity, store: true, service_tier other than auto/default. Extensions: top_k, ignore_eos,
stop_token_ids, beam_width (beam search: deterministic, ignores temperature/top_p/top_k/seed,
refuses penalties, logprobs and JSON output; the engine cuts beams at stop strings), use_beam_search (vLLM:
beam width = beam_width, best_of or max(2, n)). Other fields are ignored.
`stream: true` answers with server-sent events, one JSON
chunk per `data:` line, ending with `data: [DONE]`. A client that disconnects
cancels its request (its KV blocks are freed at once).

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`:
400 for malformed JSON, wrong types, invalid or out-of-range values (every
number that reaches the device must fit its int32/float32 array) and prompts
over the context length; 429 when the engine's waiting queue is full; 503 if
the engine failed.

The event loop does no heavy work: request bodies over `max_body_bytes`
(default 4 MiB; `flashjax serve --max-body-bytes`) get a 413 before they are
read in full, prompt text longer than `max_prompt_chars` (default 32 characters
per token of context) a 400 before it is tokenized, and tokenization and chat
templating run in worker threads.

If the engine dies (its thread sets `engine.engine_error`, or the thread is
gone), `/health` answers 503 with the cause, the cause is logged, and
`flashjax serve` shuts down with exit status 1 so that a supervisor restarts it.
"""



import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
ENGINE_SWITCH_INTERVAL_S = 0.0005  # sys.setswitchinterval while serving (see run_server)
RETRY_AFTER_SECONDS = 1  # the Retry-After of a 429 (queue full): the queue drains at decode speed
CHARS_PER_TOKEN_LIMIT = 32  # default max_prompt_chars = this * the context length
COMPLETION_MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions' logprobs
CHAT_MAX_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs (the engine's MAX_LOGPROBS)
MAX_BATCH_PROMPTS = 64  # prompts in one /v1/completions request
INT32_MAX = 2**31 - 1

__all__ = ["create_app", "add_serve_arguments", "serve_main", "run_server", "ApiError", "chat_prompt"]

log = logging.getLogger("flashjax.serving.server")



class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message, param=None, code=None):
    return ApiError(400, message, param=param, code=code)


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float (JSON allows any number of digits)
        return False


def _get(body: dict, name: str, kind, default=None, *, nullable=True, param: str | None = None):
    """Typed field: kind is 'int' | 'num' | 'bool' | 'str'; bools are not ints. param: its name in errors."""
    if name not in body or (body[name] is None and nullable):
        return default
    v = body[name]
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "num": isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
    }[kind]
    if not ok:
        what = {"int": "an integer", "num": "a number", "bool": "a boolean", "str": "a string"}[kind]
        param = param or name
        raise _bad(f"'{param}' must be {what}, got {json.dumps(v)[:80]}", param=param, code="invalid_type")
    return v


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _lp(x: float) -> float:
    """A log-probability for JSON (no -Infinity: OpenAI writes -9999.0 for impossible tokens)."""
    return float(x) if math.isfinite(x) else -9999.0


def _none_or_empty(v) -> bool:
    return v in ([], {}, "")


# OpenAI parameters this server cannot honour: (name, allowed value test, why). A value that
# passes the test (besides null) asks for nothing the server does not do. Unknown fields
# (not OpenAI's, not this server's extensions) are ignored, as before.
_TOOLS = [
    ("tools", _none_or_empty, "no tool calling: the model answers in text"),
    ("tool_choice", lambda v: v == "none", "no tool calling: the model answers in text"),
    ("parallel_tool_calls", lambda v: False, "no tool calling: the model answers in text"),
    ("functions", _none_or_empty, "no function calling: the model answers in text"),
    ("function_call", lambda v: v == "none", "no function calling: the model answers in text"),
]
_UNSUPPORTED_COMPLETIONS = _TOOLS + [
    ("suffix", lambda v: v == "", "no insertion / fill-in-the-middle"),
]
_UNSUPPORTED_CHAT = _TOOLS + [
    ("audio", lambda v: False, "text output only"),
    ("modalities", lambda v: v == ["text"], "text output only: modalities [\"text\"]"),
    ("prediction", lambda v: False, "no predicted outputs"),
    ("web_search_options", lambda v: False, "no web search"),
    ("reasoning_effort", lambda v: False, "not a reasoning model"),
    ("verbosity", lambda v: False, "no verbosity control"),
    ("store", lambda v: v is False, "completions are not stored"),
    ("service_tier", lambda v: v in ("auto", "default"), "one service tier: \"auto\" / \"default\""),
]


@dataclasses.dataclass
class _Plan:
    """A request's options beyond the engine's RequestParams (from `_Service.plan`)."""

    chat: bool
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    n: int  # choices per prompt
    best_of: int | None  # OpenAI best_of > n: sample this many candidates, return the n most likely
    beam_width: int  # > 1: beam search (extension)
    logprobs: int | None  # alternatives per token to return (None: no logprobs)
    echo: bool  # completions: the prompt text before each choice's text
    grammar: str | None  # response_format json_object / json_schema: the grammar the output follows
    names: dict  # RequestParams field -> the request field errors name


def _check_text(text: str, param: str) -> None:
    """A 400 for text that is not valid Unicode (JSON lets a string hold a lone surrogate, "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(f"'{param}' is not valid Unicode: {e.reason} (character {e.start}, "
                   f"{text[e.start]!r})", param=param, code="invalid_value") from None


def _param_of(err: Exception, names) -> str | None:
    """The field a ValueError names: its messages start with the field ("top_k must be ...")."""
    words = str(err).split(maxsplit=1)
    first = words[0].rstrip(":,") if words else ""
    return first if first in names else None


def chat_prompt(tokenizer, messages) -> str:
    """Render chat messages: the tokenizer's chat template, else a plain fallback."""
    if getattr(tokenizer, "chat_template", None):
        try:
            from flashjax.models.hf import apply_chat_template
            return apply_chat_template(tokenizer, messages, add_generation_prompt=True)
        except ImportError:
            pass
    parts = [f"{m['role']}: {m['content']}\n" for m in messages]
    return "".join(parts) + "assistant:"


class _Service:
    def __init__(self, engine, tokenizer, model_name: str, max_prompt_chars: int | None = None):
        self.engine = engine
        self.max_prompt_chars = max_prompt_chars or CHARS_PER_TOKEN_LIMIT * engine.max_len
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_names = (model_name,)  # the ids GET /v1/models lists; `model` must be one of them
        self._token_texts: dict[int, str] = {}
        self.created = int(time.time())
        self.http_counts: dict[str, int] = {}
        self.engine_failure: str | None = None  # why the engine cannot serve, once it is known

    def check_engine(self) -> str | None:
        """The engine's failure (logged once, with its traceback), or None while it is alive."""
        if self.engine_failure is not None:
            return self.engine_failure
        err = getattr(self.engine, "engine_error", None)
        thread = getattr(self.engine, "_thread", None)
        if err is not None:
            cause = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else str(err)
        elif thread is not None and not thread.is_alive():
            cause = "the engine thread has stopped"
        else:
            return None
        self.engine_failure = cause
        exc_info = (type(err), err, err.__traceback__) if isinstance(err, BaseException) else None
        log.error("the engine failed, the server cannot serve any more requests: %s", cause, exc_info=exc_info)
        return cause

    def require_engine(self) -> None:
        cause = self.check_engine()
        if cause is not None:
            raise ApiError(503, f"engine failed: {cause}", type="server_error", code="engine_error")

    # -- request parsing ---------------------------------------------------------
    def check_model(self, body: dict) -> None:
        """404 model_not_found for a `model` this server does not serve (absent/null: the served one)."""
        name = body.get("model")
        if name is not None and name not in self.model_names:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                           f"{', '.join(repr(m) for m in self.model_names)} (GET /v1/models).",
                           param="model", code="model_not_found")

    @staticmethod
    def response_format_grammar(body: dict) -> str | None:
        """The one place `response_format` is decided: None for text, else the grammar the
        output must follow (json_object / json_schema: structured output, llguidance)."""
        rf = body.get("response_format")
        if rf is None:
            return None
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "text":
            return None
        if kind not in ("json_object", "json_schema"):
            raise _bad("'response_format' must be an object {\"type\": \"text\" | \"json_object\" | "
                       "\"json_schema\"}", param="response_format", code="invalid_value")
        from flashjax.serving.guided import grammar_for_response_format

        try:
            return grammar_for_response_format(rf)
        except ImportError as e:
            raise _bad(f"response_format {{\"type\": \"{kind}\"}}: structured output is not available on this "
                       f"server ({e})", param="response_format", code="unsupported_value") from None
        except ValueError as e:
            raise _bad(str(e), param="response_format", code="invalid_value") from None

    @staticmethod
    def check_unsupported(body: dict, chat: bool) -> None:
        """400 naming an OpenAI parameter this server cannot honour (None / its no-op value are fine)."""
        for name, allowed, why in _UNSUPPORTED_CHAT if chat else _UNSUPPORTED_COMPLETIONS:
            v = body.get(name)
            if v is not None and not allowed(v):
                raise _bad(f"'{name}' is not supported by this server ({why})", param=name,
                           code="unsupported_parameter")
        for name in ("user", "safety_identifier", "prompt_cache_key"):  # identifiers: accepted, no effect
            _get(body, name, "str", None)
        if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
            raise _bad("'metadata' must be an object", param="metadata", code="invalid_type")

    def plan(self, body: dict, chat: bool) -> _Plan:
        """What the client asked for beyond the engine's RequestParams (validated; 400 names the field)."""
        self.check_unsupported(body, chat)
        stream = _get(body, "stream", "bool", False)
        so = body.get("stream_options")
        include_usage = False
        if so is not None:
            if not isinstance(so, dict):
                raise _bad("'stream_options' must be an object", param="stream_options", code="invalid_type")
            if not stream:
                raise _bad("'stream_options' is only allowed when 'stream' is true", param="stream_options",
                           code="invalid_value")
            include_usage = bool(_get(so, "include_usage", "bool", False, param="stream_options.include_usage"))
            _get(so, "include_obfuscation", "bool", None, param="stream_options.include_obfuscation")
        n = _get(body, "n", "int", 1)
        if not 1 <= n <= INT32_MAX:
            raise _bad(f"'n' must be an integer in [1, 2**31), got {n}", param="n", code="invalid_value")
        names = {"logprobs": "top_logprobs" if chat else "logprobs", "grammar": "response_format"}
        # logprobs: completions take an int (0..5 alternatives); chat takes logprobs: bool + top_logprobs
        if chat:
            want = _get(body, "logprobs", "bool", False)
            top = _get(body, "top_logprobs", "int", None)
            if top is not None and not 0 <= top <= CHAT_MAX_LOGPROBS:
                raise _bad(f"'top_logprobs' must be an integer in [0, {CHAT_MAX_LOGPROBS}], got {top}",
                           param="top_logprobs", code="invalid_value")
            if top is not None and not want:
                raise _bad("'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
            logprobs = (top or 0) if want else None
            echo = False
        else:
            logprobs = _get(body, "logprobs", "int", None)
            if logprobs is not None and not 0 <= logprobs <= COMPLETION_MAX_LOGPROBS:
                raise _bad(f"'logprobs' must be an integer in [0, {COMPLETION_MAX_LOGPROBS}], got {logprobs}",
                           param="logprobs", code="invalid_value")
            echo = _get(body, "echo", "bool", False)
            if echo and logprobs is not None:
                raise _bad("'echo' with 'logprobs' would need the prompt's log-probabilities, which this "
                           "server does not compute; send one or the other", param="echo",
                           code="unsupported_value")
        # Beam search (extension): beam_width, or vLLM's use_beam_search (width: beam_width,
        # best_of or max(2, n)). Otherwise best_of is OpenAI's: sample best_of candidates, return
        # the n with the highest summed token log-probability.
        beam_width = _get(body, "beam_width", "int", None)
        best_of = _get(body, "best_of", "int", None)
        beam_source = "beam_width"
        if _get(body, "use_beam_search", "bool", False):
            if beam_width is None:
                beam_width, beam_source = (best_of, "best_of") if best_of is not None else (max(2, n), "n")
            best_of = None
        beam = beam_width is not None and beam_width > 1
        if best_of is not None:
            if beam:
                raise _bad("'best_of' (sampled candidates ranked by log-probability) cannot be combined with "
                           "beam search ('beam_width')", param="best_of", code="invalid_value")
            if not 1 <= best_of <= INT32_MAX:
                raise _bad(f"'best_of' must be an integer >= 1, got {best_of}", param="best_of", code="invalid_value")
            if n > best_of:
                raise _bad(f"'n' ({n}) must be <= 'best_of' ({best_of})", param="n", code="invalid_value")
            if stream:
                raise _bad("'best_of' cannot be used with 'stream' (the candidates are ranked once they are "
                           "complete)", param="best_of", code="invalid_value")
            if best_of == n:
                best_of = None  # every candidate is returned: nothing to rank
        names["n"] = "best_of" if best_of is not None else "n"
        names["beam_width"] = beam_source if beam else "beam_width"
        if beam:
            for name in ("presence_penalty", "frequency_penalty"):
                if _get(body, name, "num", 0) != 0:
                    raise _bad(f"'{name}' is not applied by beam search; leave it out or use sampling",
                               param=name, code="unsupported_value")
            if logprobs is not None:
                raise _bad("beam search does not return per-token logprobs", param=names["logprobs"],
                           code="unsupported_value")
            if body.get("response_format") is not None and body["response_format"] != {"type": "text"}:
                raise _bad("structured output (response_format) cannot be combined with beam search",
                           param="response_format", code="unsupported_value")
        rf = body.get("response_format")
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") in ("text", "json_object", "json_schema")):
            self.response_format_grammar(body)  # the 400 (the grammar itself is built off the loop: run)
        return _Plan(chat=chat, stream=stream, include_usage=include_usage, n=n, best_of=best_of,
                     beam_width=beam_width if beam_width is not None else 1, logprobs=logprobs, echo=echo,
                     grammar=None, names=names)

    def logit_bias(self, body: dict) -> tuple:
        bias = body.get("logit_bias")
        if bias is None:
            return ()
        if not isinstance(bias, dict):
            raise _bad("'logit_bias' must be an object mapping token ids (as strings) to numbers in [-100, 100]",
                       param="logit_bias", code="invalid_type")
        vocab = self.engine.config.vocab_size
        out = []
        for k, v in bias.items():
            key = k.strip() if isinstance(k, str) else ""
            if not key.isdigit() or not key.isascii():
                raise _bad(f"'logit_bias' keys must be token ids (non-negative integers as strings), got {k!r}",
                           param="logit_bias", code="invalid_value")
            t = int(key)
            if t >= vocab:
                raise _bad(f"'logit_bias': token id {t} is outside the vocabulary [0, {vocab})",
                           param="logit_bias", code="invalid_value")
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) and -100 <= v <= 100):
                raise _bad(f"'logit_bias' values must be numbers in [-100, 100], got {json.dumps(v)[:40]} "
                           f"for token {t}", param="logit_bias", code="invalid_value")
            out.append((t, float(v)))
        return tuple(out)

    def params(self, body: dict, prompt_len: int, plan: _Plan | None = None, prompt_param: str | None = None):
        from flashjax.serving.engine import RequestParams

        if plan is None:
            plan = self.plan(body, "messages" in body)
        ctx = self.engine.max_len
        max_tokens = _get(body, "max_tokens", "int", None)
        if max_tokens is None:
            max_tokens = _get(body, "max_completion_tokens", "int", None)
        if max_tokens is None:
            max_tokens = max(1, min(16 if not plan.chat else ctx - prompt_len, ctx - prompt_len))
        if max_tokens < 1:
            raise _bad(f"'max_tokens' must be >= 1, got {max_tokens}", param="max_tokens")
        if prompt_len >= ctx:
            raise _bad(f"This model's maximum context length is {ctx} tokens; the prompt has {prompt_len}.",
                       param=prompt_param or ("messages" if plan.chat else "prompt"),
                       code="context_length_exceeded")
        if prompt_len + max_tokens > ctx:
            raise _bad(f"This model's maximum context length is {ctx} tokens; the prompt ({prompt_len}) plus "
                       f"max_tokens ({max_tokens}) exceed it.", param="max_tokens", code="context_length_exceeded")
        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stop = tuple(stop)
        else:
            raise _bad("'stop' must be a string or a list of strings", param="stop", code="invalid_type")
        for s in stop:
            _check_text(s, "stop")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
            raise _bad("'stop_token_ids' must be a list of integers", param="stop_token_ids", code="invalid_type")
        sampling_n = plan.best_of if plan.best_of is not None else plan.n
        logprobs = plan.logprobs
        if plan.best_of is not None and logprobs is None:
            logprobs = 0  # the candidates are ranked by their tokens' log-probabilities
        kw = dict(
            temperature=_get(body, "temperature", "num", 1.0),
            top_p=_get(body, "top_p", "num", 1.0),
            top_k=_get(body, "top_k", "int", 0),
            # no seed: fresh randomness for every request (a fixed default made every answer the same)
            seed=_get(body, "seed", "int", None),
            max_tokens=max_tokens, stop=stop, stop_token_ids=tuple(stop_ids),
            ignore_eos=_get(body, "ignore_eos", "bool", False),
            n=sampling_n, beam_width=plan.beam_width, logprobs=logprobs,
            presence_penalty=_get(body, "presence_penalty", "num", 0.0),
            frequency_penalty=_get(body, "frequency_penalty", "num", 0.0),
            logit_bias=self.logit_bias(body), grammar=plan.grammar,
        )
        if kw["top_k"] == -1:
            kw["top_k"] = 0
        if kw["seed"] is None:
            kw["seed"] = secrets.randbits(32)  # any seed in RequestParams' range [0, 2**32)
        if not kw["ignore_eos"]:  # HF tokenizers may have several end-of-turn ids (Llama 3)
            extra = [t for t in (getattr(self.tokenizer, "stop_ids", None) or ()) if t not in stop_ids]
            kw["stop_token_ids"] = tuple(stop_ids) + tuple(extra)
        try:
            params = RequestParams(**kw)
        except ValueError as e:
            raise _bad(str(e), param=plan.names.get(_param_of(e, kw), _param_of(e, kw)),
                       code="invalid_value") from None
        slots = getattr(self.engine, "max_seqs", None)
        if isinstance(slots, int) and params.num_seqs > slots:
            field = plan.names["beam_width" if params.beam_width > 1 else "n"]
            raise _bad(f"'{field}' asks for {params.num_seqs} sequences at once; this server runs at most {slots}",
                       param=field, code="invalid_value")
        return params

    # -- responses ----------------------------------------------------------------
    def token_text(self, t: int) -> str:
        """A token's text, decoded on its own (cached)."""
        s = self._token_texts.get(t)
        if s is None:
            s = self.tokenizer.decode([t]) if self.tokenizer is not None else ""
            if len(self._token_texts) < 1 << 20:
                self._token_texts[t] = s
        return s

    def token_bytes(self, t: int) -> list[int]:
        raw = getattr(self.tokenizer, "decode_bytes", None)  # byte-level tokenizers know a token's bytes
        b = raw([t]) if raw is not None else self.token_text(t).encode("utf-8", "replace")
        return list(b)

    def completion_logprobs(self, ids, lps, offset: int) -> tuple[dict, int]:
        """The legacy /v1/completions logprobs object for these tokens; text offsets start at `offset`."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, (lp, alts) in zip(ids, lps or ()):
            s = self.token_text(t)
            top = {}
            for a, alp in alts:
                top.setdefault(self.token_text(a), _lp(alp))
            top.setdefault(s, _lp(lp))  # OpenAI: the sampled token is always there (up to logprobs + 1)
            out["tokens"].append(s)
            out["token_logprobs"].append(_lp(lp))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(s)
        return out, offset

    def chat_logprobs(self, ids, lps) -> dict:
        """The chat `logprobs` object ({"content": [...], "refusal": None}) for these tokens."""
        content = [{"token": self.token_text(t), "logprob": _lp(lp), "bytes": self.token_bytes(t),
                    "top_logprobs": [{"token": self.token_text(a), "logprob": _lp(alp),
                                      "bytes": self.token_bytes(a)} for a, alp in alts]}
                   for t, (lp, alts) in zip(ids, lps or ())]
        return {"content": content, "refusal": None}

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise _bad("this server has no tokenizer: send the prompt as a list of token ids", param="prompt")
        return list(self.tokenizer.encode(text))

    def check_chars(self, n: int, param: str) -> None:
        """Refuse text far too long for the context before spending time tokenizing it."""
        if n > self.max_prompt_chars:
            raise _bad(f"the prompt has {n} characters; this server takes at most {self.max_prompt_chars} "
                       f"(the model's context is {self.engine.max_len} tokens)", param=param,
                       code="context_length_exceeded")

    def completion_prompts(self, body) -> list[tuple[list[int], str | None, str]]:
        """/v1/completions' prompts as (token ids, text for echo, param for errors), one per prompt.

        `prompt` is a string, a list of token ids, or a batch: a list of strings or of token-id
        lists. Tokenizes (and decodes token-id prompts for echo): call it off the event loop.
        """
        p = body.get("prompt")
        if "prompt" not in body or p is None:
            raise _bad("'prompt' is required", param="prompt", code="missing_field")
        if isinstance(p, str) or (isinstance(p, list) and p and all(_is_token(t) for t in p)):
            items = [p]
        elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            items = list(p)
        elif isinstance(p, list) and p and all(isinstance(x, list) and x and all(_is_token(t) for t in x)
                                               for x in p):
            items = list(p)
        else:
            raise _bad("'prompt' must be a string, a non-empty list of token ids, or a non-empty list of "
                       "either (a batch)", param="prompt", code="invalid_type")
        if len(items) > MAX_BATCH_PROMPTS:
            raise _bad(f"'prompt' holds {len(items)} prompts; this server takes at most {MAX_BATCH_PROMPTS} "
                       "in one request", param="prompt", code="invalid_value")
        echo = bool(body.get("echo"))
        out = []
        for item in items:
            if isinstance(item, str):
                self.check_chars(len(item), "prompt")
                _check_text(item, "prompt")
        for item in items:
            if isinstance(item, str):
                ids = self.encode(item)
                if not ids:
                    ids = [getattr(self.tokenizer, "eot_id", 0) or 0]
                out.append((ids, item, "prompt"))
            else:
                vocab = self.engine.config.vocab_size
                bad = [t for t in item if not 0 <= t < vocab]
                if bad:
                    raise _bad(f"token id {bad[0]} in 'prompt' is outside the vocabulary [0, {vocab})",
                               param="prompt")
                text = self.tokenizer.decode(list(item)) if echo and self.tokenizer is not None else None
                out.append((list(item), text, "prompt"))
        return out

    def chat_prompt_ids(self, body) -> list[int]:
        """Token ids of the rendered chat (templates and tokenizes: call it off the event loop)."""
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _bad("'messages' must be a non-empty list of {role, content} objects", param="messages",
                       code="invalid_type" if "messages" in body else "missing_field")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
            content = m.get("content")
            if content is None and m["role"] == "assistant":
                content = ""  # an assistant turn that only called tools (content: null, tool_calls: [...])
            if isinstance(content, list):  # content parts: text only
                texts = []
                for j, part in enumerate(content):
                    where = f"messages[{i}].content[{j}]"
                    if not isinstance(part, dict) or part.get("type") != "text":
                        kind = part.get("type") if isinstance(part, dict) else None
                        raise _bad(f"{where} must be a text part {{\"type\": \"text\", \"text\": ...}}"
                                   + (f"; this model does not take {kind!r} parts" if isinstance(kind, str) else ""),
                                   param=where, code="invalid_type" if kind is None else "invalid_value")
                    if not isinstance(part.get("text"), str):
                        raise _bad(f"{where}.text must be a string, got {json.dumps(part.get('text'))[:80]}",
                                   param=f"{where}.text", code="invalid_type")
                    texts.append(part["text"])
                content = "".join(texts)
            if not isinstance(content, str):
                raise _bad(f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}].content", code="invalid_type")
            _check_text(m["role"], f"messages[{i}].role")
            _check_text(content, f"messages[{i}].content")
            clean.append({"role": m["role"], "content": content})
        self.check_chars(sum(len(m["content"]) + len(m["role"]) for m in clean), "messages")
        if getattr(self.tokenizer, "chat_template", None):
            # The template writes its own BOS: take its ids without adding special tokens again.
            from flashjax.models.hf import apply_chat_template

            return list(apply_chat_template(self.tokenizer, clean, add_generation_prompt=True, tokenize=True))
        return self.encode(chat_prompt(self.tokenizer, clean))

    # -- metrics ------------------------------------------------------------------
    def metrics_text(self) -> str:
        s = self.engine.stats()
        lines = []

        def metric(name, kind, help_, value):
            if value is None:
                return
            lines.append(f"# HELP flashjax_{name} {help_}")
            lines.append(f"# TYPE flashjax_{name} {kind}")
            lines.append(f"flashjax_{name} {float(value):.6g}")

        metric("requests_running", "gauge", "Sequences in the running batch.", s["running"])
        metric("requests_waiting", "gauge", "Requests waiting to be scheduled.", s["waiting"])
        metric("requests_swapped", "gauge", "Requests swapped out to host memory.", s["swapped"])
        metric("kv_blocks_used", "gauge", "KV cache blocks referenced by sequences.", s["kv_blocks_used"])
        metric("kv_blocks_free", "gauge", "KV cache blocks on the free stack.", s["kv_blocks_free"])
        metric("kv_blocks_cached", "gauge", "Unreferenced KV blocks kept by the prefix cache.", s["kv_blocks_cached"])
        metric("kv_blocks_total", "gauge", "KV cache blocks in the pool.", s["kv_blocks_total"])
        metric("kv_utilization", "gauge", "Tokens stored / capacity of the blocks in use.", s["kv_utilization"])
        metric("prefix_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache / prompt tokens.",
               s["prefix_cache_hit_rate"])
        metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache.",
               s["prefix_cache_hit_tokens"])
        metric("requests_total", "counter", "Requests accepted.", s["requests_total"])
        metric("requests_finished_total", "counter", "Requests finished.", s["requests_finished"])
        metric("requests_cancelled_total", "counter", "Requests cancelled.", s["requests_cancelled"])
        metric("requests_rejected_total", "counter", "Requests rejected (queue full).", s["requests_rejected"])
        metric("preemptions_total", "counter", "Sequences preempted for KV blocks.", s["preemptions"])
        metric("prompt_tokens_total", "counter", "Tokens prefilled.", s["prefill_tokens"])
        metric("generation_tokens_total", "counter", "Tokens decoded.", s["decode_tokens"])
        metric("engine_steps_total", "counter", "Engine iterations.", s["steps"])
        metric("compiles_total", "counter", "Jitted functions traced.", s["compiles"])
        for key, name in (("ttft", "time_to_first_token_seconds"), ("tpot", "time_per_output_token_seconds")):
            for q in ("p50", "p99"):
                v = s[f"{key}_{q}"]
                if v is not None:
                    if f"# TYPE flashjax_{name} summary" not in lines:
                        lines.append(f"# HELP flashjax_{name} {key.upper()} quantiles.")
                        lines.append(f"# TYPE flashjax_{name} summary")
                    lines.append(f'flashjax_{name}{{quantile="{int(q[1:]) / 100}"}} {v:.6g}')
        for code, n in sorted(self.http_counts.items()):
            lines.append(f'flashjax_http_responses_total{{code="{code}"}} {n}')
        return "\n".join(lines) + "\n"


def create_app(engine, tokenizer=None, *, model_name: str = "flashjax", start_engine: bool = True,
               on_engine_failure=None, engine_watch_interval: float = 0.25,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_chars: int | None = None):
    """The FastAPI app. Starts `engine`'s background thread (unless start_engine=False).

    max_body_bytes: larger request bodies get a 413. max_prompt_chars: longer
    prompt text gets a 400 before it is tokenized (default: 32 per context token).

    While the app runs, a task checks the engine every `engine_watch_interval`
    seconds; when it has failed, the cause is logged and `on_engine_failure(cause)`
    is called once (`run_server` passes one that shuts the server down). It can
    also be set later as `app.state.on_engine_failure`.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.requests import ClientDisconnect

    from flashjax.serving.engine import QueueFullError

    svc = _Service(engine, tokenizer, model_name, max_prompt_chars)
    tasks: set = set()

    async def watch_engine():
        while svc.check_engine() is None:
            await asyncio.sleep(engine_watch_interval)
        callback = app.state.on_engine_failure
        if callback is not None:
            callback(svc.engine_failure)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        watcher = asyncio.ensure_future(watch_engine())
        try:
            yield
        finally:
            watcher.cancel()

    app = FastAPI(title="flashjax", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = svc
    app.state.on_engine_failure = on_engine_failure
    if start_engine:
        engine.start()

    def error_response(err: ApiError):
        svc.http_counts[str(err.status)] = svc.http_counts.get(str(err.status), 0) + 1
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return error_response(err)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        # A bug, not the client's fault: still an OpenAI-shaped JSON answer (Starlette logs the traceback).
        return error_response(ApiError(500, f"internal server error: {type(exc).__name__}: {exc}"[:500],
                                       type="server_error", code="internal_error"))

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return error_response(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request, exc):
        return error_response(ApiError(405, f"method {request.method} not allowed on {request.url.path}",
                                       code="method_not_allowed"))

    @app.get("/health")
    async def health():
        svc.require_engine()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": svc.created, "owned_by": "flashjax",
            "max_model_len": engine.max_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(svc.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        from flashjax.serving.chat_page import PAGE
        import html
        return HTMLResponse(PAGE.replace("{{MODEL}}", html.escape(model_name)))

    def too_large():
        return ApiError(413, f"the request body is larger than this server's limit of {max_body_bytes} bytes",
                        code="request_too_large")

    async def read_body(request: Request) -> bytes:
        """The body, refused with a 413 as soon as it is known to be over the limit."""
        try:
            declared = int(request.headers.get("content-length", ""))
        except ValueError:
            declared = None
        if declared is not None and declared > max_body_bytes:
            raise too_large()
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise too_large()
                chunks.append(chunk)
        except ClientDisconnect:  # gone before it finished sending: nobody to answer
            raise ApiError(499, "client disconnected while sending the request body", code="client_closed") from None
        return b"".join(chunks)

    async def read_json(request: Request) -> dict:
        raw = await read_body(request)
        try:
            # a large body's parse (up to max_body_bytes) would stall every other connection
            body = json.loads(raw) if len(raw) < 65536 else await asyncio.to_thread(json.loads, raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", code="invalid_json")
        if "model" in body and body["model"] is not None and not isinstance(body["model"], str):
            raise _bad("'model' must be a string", param="model", code="invalid_type")
        return body

    async def finish_or_cancel(request: Request, handles) -> bool:
        """Wait until every handle has finished or the client has gone, whichever is
        first (both are awaited events: no polling). If the client went first, the
        handles are cancelled and this returns False."""
        async def finished():
            for h in handles:
                await h.wait_async()

        async def gone():  # the body is read by now, so the next message is the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass

        waits = [asyncio.ensure_future(finished()), asyncio.ensure_future(gone())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
        if waits[0].done() and not waits[0].cancelled():
            return True
        for h in handles:
            h.cancel()
        return False

    async def run(request: Request, chat: bool):
        svc.require_engine()
        body = await read_json(request)
        svc.check_model(body)
        plan = svc.plan(body, chat)
        if body.get("response_format") is not None:  # a JSON schema's grammar can take a while: off the loop
            plan.grammar = await asyncio.to_thread(svc.response_format_grammar, body)
        # tokenization (and chat templating) can take seconds for a long prompt: not on the loop
        if chat:
            ids = await asyncio.to_thread(svc.chat_prompt_ids, body)
            prompts = [(ids, None, "messages")]
        else:
            prompts = await asyncio.to_thread(svc.completion_prompts, body)
        params = [svc.params(body, len(ids), plan, prompt_param=where) for ids, _, where in prompts]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        handles = []

        def add_all():
            for k, ((ids, _, _), p) in enumerate(zip(prompts, params)):
                handles.append(engine.add_request(ids, p, request_id=rid if len(prompts) == 1 else f"{rid}-{k}"))
        try:
            if plan.grammar is None:
                add_all()
            else:  # the engine checks (compiles) the grammar: not on the loop
                await asyncio.to_thread(add_all)
        except QueueFullError as e:
            for h in handles:
                h.cancel()
            raise ApiError(429, str(e), type="rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except ValueError as e:  # the engine's own checks (e.g. top_k above the vocabulary)
            for h in handles:
                h.cancel()
            fields = [f.name for f in dataclasses.fields(params[0])]
            name = _param_of(e, fields)
            if name is None and "slots" in str(e):  # "the request needs N sequences; the engine has M slots"
                name = "beam_width" if params[0].beam_width > 1 else "n"
            if name is None and plan.grammar is not None and ("grammar" in str(e) or "structured" in str(e)):
                name = "grammar"  # "the grammar is invalid: ...", "structured output needs a tokenizer ..."
            raise _bad(str(e), param=plan.names.get(name, name) or prompts[0][2], code="invalid_value") from None
        created = int(time.time())
        if plan.stream:
            # cancel as soon as the client hangs up, whatever the ASGI server does
            task = asyncio.ensure_future(finish_or_cancel(request, handles))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return StreamingResponse(sse(handles, prompts, plan, rid, created),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # non-streaming: wait, cancelling if the client goes away
        if not await finish_or_cancel(request, handles):
            raise ApiError(499, "client disconnected", code="client_closed")
        for h in handles:
            if h.error is not None:
                raise ApiError(503, str(h.error), type="server_error", code="engine_error")
        choices = []
        ntok = cached = 0
        for k, h in enumerate(handles):
            res = h.result()
            cached += res.num_cached_prompt_tokens
            outs = []
            for o in res.outputs:
                ids, text, reason = o.token_ids, o.text, o.finish_reason  # beams come cut at stop strings
                ntok += len(ids)
                outs.append((ids, text, reason, o.logprobs))
            if plan.best_of is not None:  # OpenAI's best_of: the n candidates with the highest log-probability
                order = sorted(range(len(outs)), key=lambda j: -sum(lp for lp, _ in outs[j][3] or ()))
                outs = [outs[j] for j in order[: plan.n]]
            for j, (ids, text, reason, lps) in enumerate(outs):
                index = k * plan.n + j
                if chat:
                    choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                    "finish_reason": reason,
                                    "logprobs": None if plan.logprobs is None else svc.chat_logprobs(ids, lps)})
                else:
                    echo = prompts[k][1] if plan.echo else None
                    lp = None if plan.logprobs is None else svc.completion_logprobs(ids, lps, 0)[0]
                    choices.append({"index": index, "text": (echo or "") + text, "token_ids": ids,
                                    "finish_reason": reason, "logprobs": lp})
        nprompt = sum(len(ids) for ids, _, _ in prompts)
        svc.http_counts["200"] = svc.http_counts.get("200", 0) + 1
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": nprompt, "completion_tokens": ntok, "total_tokens": nprompt + ntok,
                          "prompt_tokens_details": {"cached_tokens": cached}}}

    async def events(handles):
        """(handle number, event) from every handle, as they come."""
        if len(handles) == 1:
            async for ev in handles[0].aiter():
                yield 0, ev
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(k, h):
            try:
                async for ev in h.aiter():
                    q.put_nowait((k, ev))
            finally:
                q.put_nowait((k, None))

        pumps = [asyncio.ensure_future(pump(k, h)) for k, h in enumerate(handles)]
        try:
            left = len(pumps)
            while left:
                k, ev = await q.get()
                if ev is None:
                    left -= 1
                else:
                    yield k, ev
        finally:
            for t in pumps:
                t.cancel()

    async def sse(handles, prompts, plan: _Plan, rid, created):
        chat = plan.chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if plan.include_usage else {}
        finished = False

        def chunk(choice):
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                          "choices": [choice], **extra}) + "\n\n"
        try:
            ntok = 0
            offsets: dict[int, int] = {}  # choice index -> text offset of its next token (logprobs)
            for k, (_, echo, _) in enumerate(prompts):
                for j in range(plan.n):
                    if chat:
                        yield chunk({"index": j, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None})
                    elif plan.echo and echo:
                        yield chunk({"index": k * plan.n + j, "text": echo, "token_ids": [],
                                     "finish_reason": None, "logprobs": None})
            async for k, ev in events(handles):
                ids, text, reason = ev.token_ids, ev.text, ev.finish_reason
                ntok += len(ids)
                index = k * plan.n + ev.index
                if chat:
                    lp = None if plan.logprobs is None else svc.chat_logprobs(ids, ev.logprobs)
                    choice = {"index": index, "delta": {"content": text} if text else {}, "logprobs": lp,
                              "finish_reason": reason}
                else:
                    lp = None
                    if plan.logprobs is not None:
                        lp, offsets[index] = svc.completion_logprobs(ids, ev.logprobs, offsets.get(index, 0))
                    choice = {"index": index, "text": text, "token_ids": ids, "finish_reason": reason,
                              "logprobs": lp}
                yield chunk(choice)
            errors = [h.error for h in handles if h.error is not None]
            if errors:
                err = ApiError(503, str(errors[0]), type="server_error", code="engine_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            elif plan.include_usage:
                nprompt = sum(len(ids) for ids, _, _ in prompts)
                cached = sum(h.cached_prompt_tokens for h in handles)
                usage = {"prompt_tokens": nprompt, "completion_tokens": ntok, "total_tokens": nprompt + ntok,
                         "prompt_tokens_details": {"cached_tokens": cached}}
                yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                             "choices": [], "usage": usage}) + "\n\n"
            finished = True
            svc.http_counts["200"] = svc.http_counts.get("200", 0) + 1
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - a bug mid-stream: the 200 is sent, so say it in the stream
            log.exception("request %s failed while streaming", rid)
            err = ApiError(500, f"internal server error: {type(e).__name__}: {e}"[:500], type="server_error",
                           code="internal_error")
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            if not finished:  # the client went away (the generator was cancelled/closed)
                for h in handles:
                    h.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    return app


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


KV_CACHE_DTYPES = ("auto", "bf16", "fp16", "fp32", "fp8")  # --kv-cache-dtype (flashjax.kv_cache.resolve_cache_dtype)


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--checkpoint", required=True, help="a `flashjax train` run/checkpoint dir or a Hugging Face model dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", default=None, help="the model id the API reports (default: the directory name)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks in the pool (default: 8 full contexts)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--max-seqs", type=int, default=8, help="batch slots (default 8)")
    p.add_argument("--max-num-batched-tokens", type=int, default=256, help="per-step token budget (default 256)")
    p.add_argument("--prefill-rows", type=int, default=4, help="prefill rows per step (default 4)")
    p.add_argument("--max-waiting", type=int, default=256, help="queue bound; past it requests get 429 (default 256)")
    p.add_argument("--max-body-bytes", type=_positive_int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help=f"larger request bodies get a 413 (default {DEFAULT_MAX_BODY_BYTES}, 4 MiB)")
    p.add_argument("--preemption", choices=["recompute", "swap"], default="recompute",
                   help="what to do with preempted sequences (default recompute)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    p.add_argument("--attention", default=None, help="override the model's attention implementation")
    p.add_argument("--dtype", default=None, help="override the compute dtype")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="KV cache dtype: auto (the model's compute dtype, default), bf16, fp16, fp32, or fp8 "
                        "(float8_e4m3fn pages with a float32 scale per token and KV head: about half the "
                        "memory of bf16 per token)")
    return p


def load_for_serving(path: str, *, attention=None, dtype=None):
    """(model, tokenizer, name) from a flashjax checkpoint or a Hugging Face directory."""
    name = Path(path).resolve().name
    try:
        from flashjax.models import hf
        if hf.looks_like_hf_dir(path):
            model, tok, _ = hf.load_pretrained(path, dtype=dtype, attention=attention or "auto")
            return model, tok, name
    except ImportError:
        pass
    from flashjax.models.generate import load_model
    model, tok, _ = load_model(path, attention=attention, dtype=dtype)
    return model, tok, name


def build_engine(model, tokenizer, args) -> Any:
    from flashjax.serving.engine import Engine

    bs = args.block_size
    per_seq = -(-model.config.max_seq_len // bs)
    return Engine(model, tokenizer=tokenizer, num_blocks=args.num_blocks or per_seq * max(args.max_seqs, 8),
                  max_seqs=args.max_seqs, block_size=bs, max_num_batched_tokens=args.max_num_batched_tokens,
                  prefill_rows=args.prefill_rows, preemption_mode=args.preemption,
                  prefix_caching=not args.no_prefix_caching, max_waiting=args.max_waiting,
                  kv_cache_dtype=getattr(args, "kv_cache_dtype", None))


def run_server(app, host: str, port: int) -> int:
    """Serve `app` (from create_app) with uvicorn until it is stopped; the exit status.

    0 after a normal shutdown (SIGINT/SIGTERM). If the engine fails, the server
    shuts itself down (the cause is logged) and this returns 1, so that a
    supervisor restarts the process.
    """
    import sys

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    # The engine thread and the event loop share the interpreter lock. After waiting
    # for the device the engine thread must get the lock back before it can dispatch
    # the next step; by default a busy loop thread keeps it for up to 5 ms.
    sys.setswitchinterval(ENGINE_SWITCH_INTERVAL_S)

    def on_engine_failure(cause):
        server.should_exit = True

    app.state.on_engine_failure = on_engine_failure
    try:
        server.run()  # returns after SIGINT/SIGTERM once open requests are answered
    finally:
        app.state.service.engine.stop()  # finish the steps in flight, end the engine thread
    cause = app.state.service.engine_failure
    if cause is not None:
        print(f"flashjax serve: error: the engine failed ({cause}); shutting down with status 1",
              file=sys.stderr, flush=True)
        return 1
    return 0


def serve_main(args: argparse.Namespace) -> int:
    import sys

    try:
        model, tok, name = load_for_serving(args.checkpoint, attention=args.attention, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"flashjax serve: error: {e}", file=sys.stderr)
        return 2
    engine = build_engine(model, tok, args)
    print("flashjax serve: compiling the engine's steps...", flush=True)
    engine.warmup()
    app = create_app(engine, tok, model_name=args.model_name or name,
                     max_body_bytes=getattr(args, "max_body_bytes", DEFAULT_MAX_BODY_BYTES))
    print(f"flashjax serve: {name} on http://{args.host}:{args.port} (chat page at /, API at /v1)", flush=True)
    try:
        return run_server(app, args.host, args.port)
    finally:
        engine.stop()
