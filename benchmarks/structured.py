"""Structured output's cost: JSON-schema-constrained decoding vs unconstrained decoding
of the same number of tokens, on the Engine.

    python benchmarks/structured.py                     # llama-1b preset, random weights, 64 requests
    python benchmarks/structured.py --quick             # tiny model on CPU: a smoke test of this script
    python benchmarks/structured.py --batches 1 16 64   # engine slots (concurrent rows) sweep
    python benchmarks/structured.py --checkpoint DIR    # a trained model and its own tokenizer

Model: a randomly initialised `--preset` (default llama-1b, bf16) or `--checkpoint DIR`
(a flashjax run / checkpoint or a Hugging Face directory, with its tokenizer).

Tokenizer (presets): structured output needs a `tokenizers`-backed tokenizer (llguidance
reads its vocabulary), and the preset has none, so the project's byte-level BPE
(`flashjax.models.tokenizer.Tokenizer.train`, as `flashjax train` makes) is trained on
the standard library's source (`--tokenizer-bytes`, default 8 MB: about 3 s for 32k)
with the preset's `vocab_size`. It then covers the model's ids exactly: the grammar's
bitmask spans every logit, and an unconstrained row never samples an id the tokenizer
cannot decode. Should BPE run out of merges below `vocab_size` (a small corpus), the
missing ids are filled with special tokens `<|unused_N|>` (a JSON grammar never allows
them; unconstrained they decode to their names). A checkpoint's tokenizer may have fewer
ids than the model (padded vocabularies): the grammar never allows the others and the
detokenizer skips them; more ids than the model's is an error.

Random weights write no JSON by themselves, but the grammar forces valid JSON anyway,
and the mask work is what is timed: llguidance's cost per token depends on the grammar
state and the vocabulary, not on what the model believes.

Workload: `--requests` N (default 64) prompts, request i asks for schema i mod 6 (nested
objects, enums, anyOf with null, arrays of numbers with minimum / maximum / multipleOf,
arrays of objects, nested arrays, strings with maxLength / pattern / format "date"),
sampled at `--temperature` (1.0) with seed i, all added at t=0. For each batch size B in
`--batches` (default N) an engine with B slots runs them twice in the same process:

  constrained    response_format json_schema: the schema's llguidance grammar
                 (RequestParams.grammar), `--max-tokens` as a cap (a response cut by it
                 is invalid); every step with a constrained row runs one decode step,
                 dispatched as the model's forward, then the sampling with the masks, which
                 the host computes (after reading back the step before: the next mask needs
                 its token) while the device runs the forward; `--grammar-threads` CPU
                 threads compute a step's masks together (default: the engine's)
  unconstrained  the same prompts, temperature and seeds, ignore_eos and max_tokens = the
                 constrained response's length: every request generates the same number of
                 tokens as it did constrained (checked), with multi-step decode
                 (`--decode-steps` K) and host/device overlap

Both after an untimed warm-up (both modes, 5 or 10 tokens per request, which compiles the
step variants); a timed run that compiled anything is run again and that one kept.

Reported per mode: output tok/s (all tokens / wall time, prefill of the same prompts
included in both), ms per token (wall / output tokens of all rows), ms per step (wall /
device decode steps: a row's time per token), the engine's TPOT, device calls, and the
engine's host seconds (`Engine.host_timing`): `grammar_mask_s` (llguidance computing the
allowed-token bitmasks, part of dispatch_s) and `grammar_consume_s` (matchers advancing on
the sampled tokens, part of deliver_s). Validity: every constrained response must end by
the grammar (finish_reason "stop"), parse as JSON and validate against its schema, with
the `jsonschema` package when it is installed and always with the small validator below
(the keywords these schemas use; an unknown keyword is an error, not a pass). The script
exits 1 if any response is invalid.

Writes benchmarks/results/structured-<device>-<date>.json (device, versions, config,
results) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

_OBJ = {"type": "object", "additionalProperties": False}

SCHEMAS = {
    # nested object, bounded string, integer range, pattern
    "person": {**_OBJ, "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {**_OBJ, "properties": {"city": {"type": "string", "maxLength": 12},
                                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]}},
        "required": ["name", "age", "address"]},
    # enums, an array of enums, a nullable string (anyOf)
    "ticket": {**_OBJ, "properties": {
        "status": {"enum": ["open", "closed", "pending"]},
        "priority": {"type": "string", "enum": ["low", "medium", "high"]},
        "assignee": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
        "labels": {"type": "array", "items": {"enum": ["bug", "feature", "docs", "perf"]}, "maxItems": 3}},
        "required": ["status", "priority", "assignee", "labels"]},
    # numbers: an array of bounded decimals, a bounded mean, an integer count
    "measurements": {**_OBJ, "properties": {
        "unit": {"enum": ["m", "s", "kg"]},
        "values": {"type": "array", "minItems": 1, "maxItems": 6,
                   "items": {"type": "number", "minimum": -1000, "maximum": 1000, "multipleOf": 0.01}},
        "mean": {"type": "number", "minimum": -1000, "maximum": 1000, "multipleOf": 0.001},
        "count": {"type": "integer", "minimum": 1, "maximum": 6}},
        "required": ["unit", "values", "mean", "count"]},
    # an array of nested objects, patterns, prices, a boolean
    "order": {**_OBJ, "properties": {
        "id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {**_OBJ, "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
            "qty": {"type": "integer", "minimum": 1, "maximum": 99},
            "price": {"type": "number", "minimum": 0, "maximum": 10000, "multipleOf": 0.01}},
            "required": ["sku", "qty", "price"]}},
        "paid": {"type": "boolean"}},
        "required": ["id", "items", "paid"]},
    # string formats and patterns, a nested object of numbers, an array of strings
    "event": {**_OBJ, "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 16},
        "date": {"type": "string", "format": "date"},
        "time": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"},
        "location": {**_OBJ, "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90, "multipleOf": 0.0001},
            "lon": {"type": "number", "minimum": -180, "maximum": 180, "multipleOf": 0.0001}},
            "required": ["lat", "lon"]},
        "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 8}}},
        "required": ["title", "date", "time", "location", "tags"]},
    # nested arrays of integers
    "matrix": {**_OBJ, "properties": {
        "rows": {"type": "array", "minItems": 1, "maxItems": 3,
                 "items": {"type": "array", "minItems": 1, "maxItems": 3,
                           "items": {"type": "integer", "minimum": -9, "maximum": 9}}},
        "label": {"type": "string", "maxLength": 6}},
        "required": ["rows", "label"]},
}

QUICK = dict(requests=6, batches=(6,), max_tokens=160, dtype="float32", tokenizer_bytes=256 << 10,
             overrides=dict(n_layer=2, d_model=64, n_head=4, vocab_size=512, max_seq_len=256, attention="xla"))


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

_ANNOTATIONS = {"title", "description", "x-guidance", "$schema", "examples", "default"}
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value, t: str) -> bool:
    if t == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, float) and value.is_integer())
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if t not in _TYPES:
        raise ValueError(f"validator: unknown type {t!r}")
    return isinstance(value, _TYPES[t])


def validate(value, schema: dict, path: str = "$") -> list[str]:
    """Errors of `value` against `schema` (empty: valid), for the JSON Schema keywords
    SCHEMAS use; any other keyword raises ValueError (so nothing passes unchecked)."""
    unknown = set(schema) - _ANNOTATIONS - {
        "type", "enum", "const", "anyOf", "properties", "required", "additionalProperties", "items",
        "minItems", "maxItems", "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
        "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
    if unknown:
        raise ValueError(f"validator: keywords {sorted(unknown)} at {path} are not implemented")
    errs: list[str] = []
    if "anyOf" in schema:
        if all(validate(value, s, path) for s in schema["anyOf"]):
            errs.append(f"{path}: matches none of anyOf")
    if "enum" in schema and not any(value == e and type(value) is type(e) for e in schema["enum"]):
        errs.append(f"{path}: {value!r} not in enum")
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path}: {value!r} != const")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            return errs + [f"{path}: {value!r} is not of type {schema['type']}"]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errs += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties", True) is False:
            errs += [f"{path}: unexpected {k!r}" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                errs += validate(v, props[k], f"{path}.{k}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            errs.append(f"{path}: {len(value)} items")
        if "items" in schema:
            for i, v in enumerate(value):
                errs += validate(v, schema["items"], f"{path}[{i}]")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            errs.append(f"{path}: length {len(value)}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(f"{path}: {value!r} does not match {schema['pattern']!r}")
        fmt = schema.get("format")
        if fmt == "date":
            try:
                ok = bool(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value)) and datetime.date.fromisoformat(value)
            except ValueError:
                ok = False
            if not ok:
                errs.append(f"{path}: {value!r} is not a date")
        elif fmt is not None:
            raise ValueError(f"validator: format {fmt!r} at {path} is not implemented")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            errs.append(f"{path}: {value!r} out of range")
        if value <= schema.get("exclusiveMinimum", -math.inf) or value >= schema.get("exclusiveMaximum", math.inf):
            errs.append(f"{path}: {value!r} out of the exclusive range")
        if "multipleOf" in schema and not decimal_multiple(value, schema["multipleOf"]):
            errs.append(f"{path}: {value!r} is not a multiple of {schema['multipleOf']}")
    return errs


def decimal_multiple(value, step) -> bool:
    """Whether the decimal number `value` is a multiple of `step`, exactly: on the
    shortest decimals that round-trip the floats (999.81 is a multiple of 0.01; the
    float quotient 999.81 / 0.01 = 99980.99999999999 is not an integer)."""
    from decimal import Decimal

    return Decimal(repr(value)) % Decimal(repr(step)) == 0


def jsonschema_validator():
    """(name, fn(value, schema) -> errors) of the `jsonschema` package, or None if it is not installed."""
    try:
        import jsonschema
    except ImportError:
        return None
    try:
        from importlib.metadata import version
        ver = version("jsonschema")
    except Exception:  # noqa: BLE001
        ver = "?"

    def multiple_of(validator, step, instance, schema):
        if validator.is_type(instance, "number") and not decimal_multiple(instance, step):
            yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {step}")

    def check(value, schema):
        cls = jsonschema.validators.validator_for(schema)
        cls = jsonschema.validators.extend(cls, {"multipleOf": multiple_of})
        v = cls(schema, format_checker=cls.FORMAT_CHECKER)
        return [e.message for e in v.iter_errors(value)]

    return (f"jsonschema {ver} (format checked; multipleOf on exact decimals: its float test rejects "
            f"e.g. 999.81 for 0.01)"), check


def check_response(text: str, finish_reason: str, schema: dict, external=None) -> list[str]:
    """Why one constrained response is invalid (empty list: valid)."""
    if finish_reason != "stop":
        return [f"finish_reason {finish_reason!r} (cut before the grammar ended)"]
    try:
        value = json.loads(text)
    except ValueError as e:
        return [f"not JSON: {e}"]
    errs = validate(value, schema)
    if external is not None:
        errs += [f"jsonschema: {m}" for m in external(value, schema)]
    return errs


# ---------------------------------------------------------------------------
# Model and tokenizer
# ---------------------------------------------------------------------------

def preset_tokenizer(vocab_size: int, max_bytes: int):
    """A byte-level BPE with exactly `vocab_size` ids, trained on the standard library
    (padded with special `<|unused_N|>` tokens if BPE stops short). Returns (tok, info)."""
    from flashjax.models.data import load_corpus
    from flashjax.models.tokenizer import Tokenizer

    t0 = time.perf_counter()
    source = "the standard library's source"
    try:
        docs = load_corpus(max_bytes=max_bytes)
    except ValueError:  # an interpreter shipped without its .py files: this repository's text instead
        source = "this repository's text files (no standard-library source here)"
        docs = load_corpus(os.path.dirname(common.BENCH_DIR), max_bytes=max_bytes)
    tok = Tokenizer.train(docs, vocab_size)
    trained = tok.vocab_size
    if trained < vocab_size:
        hf = tok.hf
        hf.add_special_tokens([f"<|unused_{i}|>" for i in range(vocab_size - trained)])
        tok = Tokenizer(hf)
    if tok.vocab_size != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.vocab_size} ids, the model {vocab_size}")
    return tok, {"source": f"byte-level BPE (flashjax.models.tokenizer) trained on {source}",
                 "corpus_bytes": sum(len(d.encode()) for d in docs), "bpe_vocab": trained,
                 "padding_special_tokens": vocab_size - trained, "vocab_size": tok.vocab_size,
                 "train_s": round(time.perf_counter() - t0, 1)}


def load(args):
    """(model, tokenizer, tokenizer info, config description)."""
    import jax

    from flashjax.models.config import config_from_preset
    from flashjax.models.gpt import build_model

    if args.checkpoint:
        from flashjax.serving.server import load_for_serving

        model, tok, _ = load_for_serving(args.checkpoint, dtype=args.dtype)
        tv = getattr(tok, "vocab_size", None)
        if tv is not None and tv > model.config.vocab_size:
            raise SystemExit(f"the tokenizer has {tv} ids, more than the model's vocabulary {model.config.vocab_size}")
        info = {"source": f"the checkpoint's ({args.checkpoint})", "vocab_size": tv}
        return model, tok, info, {"checkpoint": args.checkpoint}
    cfg = config_from_preset(args.preset, **args.overrides, dtype=args.dtype, param_dtype=args.dtype)
    model = build_model(cfg, seed=0)
    jax.block_until_ready(jax.tree.leaves(model))
    tok, info = preset_tokenizer(cfg.vocab_size, args.tokenizer_bytes)
    return model, tok, info, {"preset": args.preset, "overrides": args.overrides,
                              "weights": "random init (seed 0)"}


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------

def workload(tok, n: int):
    """(prompt ids, schema name) per request."""
    from flashjax.serving.guided import grammar_for_response_format

    names = list(SCHEMAS)
    grammars = {k: grammar_for_response_format({"type": "json_schema", "json_schema": {"name": k, "schema": s}})
                for k, s in SCHEMAS.items()}
    reqs = []
    for i in range(n):
        name = names[i % len(names)]
        prompt = tok.encode(f"Request {i}: reply with one JSON object for the '{name}' schema.\n")
        reqs.append({"prompt": prompt, "schema": name, "grammar": grammars[name], "seed": i})
    return reqs


def run_mode(eng, reqs, params_of, *, retime: bool = True):
    """All requests at t=0, run to completion; the engine's counters and host time for it.
    A run that compiled a step variant is run once more (with retime) and that run kept."""
    for attempt in range(2):
        compiles0 = eng.num_compiles()
        c0 = dict(eng.stats_counters)
        h0 = dict(eng.host_timing)
        eng.output.tpots.clear()
        t0 = time.perf_counter()
        handles = [eng.add_request(r["prompt"], params_of(i, r)) for i, r in enumerate(reqs)]
        eng.run_until_done()
        wall = time.perf_counter() - t0
        compiles = eng.num_compiles() - compiles0
        if not compiles or not retime or attempt:
            break
    outs = [h.result().outputs[0] for h in handles]
    d = {k: eng.stats_counters[k] - c0.get(k, 0) for k in
         ("device_calls", "device_decode_steps", "multi_step_calls", "grammar_masks", "prefill_tokens")}
    host = {k: round(eng.host_timing[k] - h0.get(k, 0.0), 4) for k in
            ("plan_s", "dispatch_s", "wait_s", "deliver_s", "grammar_mask_s", "grammar_consume_s")}
    tokens = sum(len(o.token_ids) for o in outs)
    lens = [len(o.token_ids) for o in outs]
    tpots = list(eng.output.tpots)
    res = {
        "requests": len(reqs), "output_tokens": tokens, "mean_tokens": tokens / len(reqs), "max_tokens": max(lens),
        "wall_s": wall, "tok_s": tokens / wall, "ms_per_token": wall * 1e3 / tokens,
        "ms_per_step": wall * 1e3 / max(1, d["device_decode_steps"]),
        "tpot_ms_mean": sum(tpots) / len(tpots) * 1e3 if tpots else None,
        **d, "host_s": host,
        "mask_us_per_row": host["grammar_mask_s"] * 1e6 / d["grammar_masks"] if d["grammar_masks"] else None,
        "consume_us_per_token": host["grammar_consume_s"] * 1e6 / tokens if d["grammar_masks"] else None,
        "finish_reasons": dict(collections.Counter(o.finish_reason for o in outs)),
        "compiles": compiles, "retimed": attempt > 0,
    }
    return res, outs


def bench_batch(model, tok, reqs, batch: int, args, external):
    from flashjax.serving.engine import Engine, RequestParams

    cfg = model.config
    bs = args.block_size
    plen = max(len(r["prompt"]) for r in reqs)
    per_seq = -(-(plen + args.max_tokens) // bs) + 1
    chunk = 1 << max(4, (plen - 1).bit_length())
    rows = max(1, min(batch, 4096 // chunk))
    eng = Engine(model, tokenizer=tok, num_blocks=per_seq * batch + 8, max_seqs=batch, block_size=bs,
                 max_num_batched_tokens=rows * chunk + batch, prefill_rows=rows, max_chunk=chunk,
                 chunk_buckets=(chunk,), prefix_caching=False, decode_steps=args.decode_steps,
                 grammar_threads=args.grammar_threads)
    T = args.temperature

    def constrained(max_tokens):
        return lambda i, r: RequestParams(temperature=T, seed=r["seed"], grammar=r["grammar"],
                                          max_tokens=max_tokens[i] if isinstance(max_tokens, list) else max_tokens)

    def free(lengths):
        return lambda i, r: RequestParams(temperature=T, seed=r["seed"], max_tokens=lengths[i], ignore_eos=True)

    # warm-up (compiles the step variants the timed runs use): both modes over up to 2B
    # requests of 5 or 10 tokens, so that rows end at different times and waiting ones are
    # prefilled beside decoding rows (prefill + decode), a K-step call and a one-step call
    # (one token left) follow; then constrained once more, as the first variant compiled is
    # traced again after the first compile (JAX extends its tracing context then;
    # Engine.warmup runs its variants twice too)
    t0 = time.perf_counter()
    few = reqs[: min(len(reqs), 2 * batch)]
    short = [10 if i % 2 else 5 for i in range(len(few))]
    run_mode(eng, few, constrained(short), retime=False)
    run_mode(eng, few, free(short), retime=False)
    run_mode(eng, few[:batch], constrained(2), retime=False)
    warmup_s = time.perf_counter() - t0

    con, outs = run_mode(eng, reqs, constrained(args.max_tokens))
    lengths = [len(o.token_ids) for o in outs]
    unc, free_outs = run_mode(eng, reqs, free(lengths))
    matched = [len(o.token_ids) for o in free_outs] == lengths

    invalid, by_schema = [], {}
    parses_free = 0
    for i, (r, o) in enumerate(zip(reqs, outs)):
        errs = check_response(o.text, o.finish_reason, SCHEMAS[r["schema"]], external)
        s = by_schema.setdefault(r["schema"], {"total": 0, "valid": 0, "tokens": 0})
        s["total"] += 1
        s["tokens"] += len(o.token_ids)
        s["valid"] += not errs
        if errs:
            invalid.append({"request": i, "schema": r["schema"], "text": o.text[:400], "errors": errs[:5]})
        try:
            json.loads(free_outs[i].text)
            parses_free += 1
        except ValueError:
            pass
    for s in by_schema.values():
        s["mean_tokens"] = s.pop("tokens") / s["total"]
    n_valid = len(reqs) - len(invalid)
    cell = {
        "batch": batch, "warmup_s": round(warmup_s, 1), "grammar_threads": eng._grammar_backend().threads,
        "constrained": con, "unconstrained": unc,
        "tokens_matched": matched,
        "tok_s_ratio": con["tok_s"] / unc["tok_s"],
        "extra_ms_per_token": con["ms_per_token"] - unc["ms_per_token"],
        "extra_ms_per_step": con["ms_per_step"] - unc["ms_per_step"],
        "mask_ms_per_token": con["host_s"]["grammar_mask_s"] * 1e3 / con["output_tokens"],
        "mask_share_of_wall": con["host_s"]["grammar_mask_s"] / con["wall_s"],
        "validity": {"valid": n_valid, "total": len(reqs), "percent": 100.0 * n_valid / len(reqs),
                     "by_schema": by_schema, "invalid": invalid[:10]},
        "unconstrained_parses_as_json": parses_free,
        "examples": {r["schema"]: o.text for r, o in reversed(list(zip(reqs, outs)))},
    }
    eng.pages = None
    del eng
    gc.collect()
    return cell


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, CPU smoke test")
    p.add_argument("--preset", default=None, help="model preset, random weights (default llama-1b)")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="a trained model (and its tokenizer) instead")
    p.add_argument("--requests", type=int, default=None, help="requests, all at t=0 (default 64)")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="engine slots (concurrent rows) to run the requests with (default: --requests)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap on a constrained response (default 256, or what the context leaves)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", default=None, help="parameter and compute dtype (default bfloat16)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=8, help="engine: most decode steps per device call")
    p.add_argument("--grammar-threads", type=int, default=None,
                   help="engine: CPU threads computing a step's masks together (default: the engine's; 1: serial)")
    p.add_argument("--tokenizer-bytes", type=int, default=None,
                   help="standard-library bytes the presets' BPE is trained on (default 8 MB)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/structured-<device>-<date>.json)")
    args = p.parse_args(argv)
    q = QUICK if args.quick else dict(requests=64, batches=None, max_tokens=256, dtype="bfloat16",
                                      tokenizer_bytes=8 << 20, overrides={})
    args.preset = args.preset or ("nano" if args.quick else "llama-1b")
    args.requests = args.requests or q["requests"]
    args.batches = tuple(args.batches or q["batches"] or (args.requests,))
    args.max_tokens = args.max_tokens or q["max_tokens"]
    args.dtype = args.dtype or (None if args.checkpoint else q["dtype"])
    args.tokenizer_bytes = args.tokenizer_bytes or q["tokenizer_bytes"]
    args.overrides = dict(q["overrides"]) if args.quick and args.preset == "nano" else {}
    if args.requests < 1 or min(args.batches) < 1:
        p.error("--requests and --batches must be at least 1")
    if max(args.batches) > args.requests:
        p.error(f"--batches {max(args.batches)} is more than --requests {args.requests}: the slots would not fill")
    return args


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(data) -> str:
    rows = []
    for c in data["results"]:
        for mode in ("constrained", "unconstrained"):
            r = c[mode]
            v = c["validity"]
            rows.append([c["batch"], mode, r["output_tokens"], _fmt(r["wall_s"], ".2f"), _fmt(r["tok_s"], ",.0f"),
                         _fmt(r["ms_per_token"], ".3f"), _fmt(r["ms_per_step"], ".2f"), _fmt(r["tpot_ms_mean"], ".2f"),
                         r["device_calls"], _fmt(r["host_s"]["grammar_mask_s"] * 1e3, ".1f"),
                         _fmt(r["mask_us_per_row"], ".0f"),
                         f"{v['valid']}/{v['total']}" if mode == "constrained" else
                         f"({c['unconstrained_parses_as_json']} parse)",
                         _fmt(c["tok_s_ratio"], ".2f") if mode == "constrained" else "1"])
    cfg = data["config"]
    head = (f"{cfg['model_name']} ({cfg['params'] / 1e6:.1f}M params, {cfg['dtype']}), {cfg['requests']} requests "
            f"over {len(SCHEMAS)} JSON schemas at t=0, temperature {cfg['temperature']}; unconstrained = same "
            f"prompts and seeds, ignore_eos, each request's constrained length; {data['device']}")
    return head + "\n\n" + common.markdown_table(
        ["batch", "mode", "tokens", "wall s", "tok/s", "ms/token", "ms/step", "TPOT ms", "calls", "mask ms (host)",
         "mask µs/row", "valid", "tok/s vs unconstrained"], rows)


def run(args):
    import jax

    info = common.env_info()
    try:
        from importlib.metadata import version
        info["versions"]["llguidance"] = version("llguidance")
    except Exception:  # noqa: BLE001
        info["versions"]["llguidance"] = None
    t0 = time.perf_counter()
    model, tok, tok_info, source = load(args)
    cfg = model.config
    external = jsonschema_validator()
    validator = "builtin (benchmarks/structured.py: the keywords SCHEMAS use)"
    if external is not None:
        validator = f"{external[0]} and the builtin one"
    data = {
        **info,
        "benchmark": "structured",
        "config": {
            **source, "model_name": args.checkpoint or args.preset, "model": cfg.to_dict(),
            "params": cfg.param_count(), "dtype": cfg.dtype, "requests": args.requests,
            "batches": list(args.batches), "max_tokens": args.max_tokens, "temperature": args.temperature,
            "block_size": args.block_size, "decode_steps": args.decode_steps, "tokenizer": tok_info,
            "validator": validator, "load_s": round(time.perf_counter() - t0, 1),
            "schemas": SCHEMAS,
            "modes": {
                "constrained": "response_format json_schema (llguidance grammar; RequestParams.grammar), "
                               "one decode step per step: forward, then sampling with the masks the host "
                               "computes (after reading back the step before) while the forward runs",
                "unconstrained": "same prompts/seeds, ignore_eos, max_tokens = the request's constrained length; "
                                 "multi-step decode and overlap",
            },
            "timing": "one timed run per mode after an untimed warm-up (5 or 10 tokens per request, both "
                      "modes); a timed run that compiled is run again; prefill included",
        },
        "results": [],
    }
    if jax.default_backend() == "cpu":
        data["note"] = ("CPU: the paged decode kernel runs in Pallas interpret mode, whose time grows faster "
                        "than the rows; the host-side figures (grammar_mask_s, grammar_consume_s) are the "
                        "ones that carry over to a GPU, the tok/s ratios do not")
    path = args.out or common.results_path("structured", info["device"], quick=args.quick)
    reqs = workload(tok, args.requests)
    plen = max(len(r["prompt"]) for r in reqs)
    if plen + args.max_tokens > cfg.max_seq_len:
        args.max_tokens = cfg.max_seq_len - plen
        data["config"]["max_tokens"] = args.max_tokens
    data["config"]["prompt_tokens"] = {"mean": sum(len(r["prompt"]) for r in reqs) / len(reqs), "max": plen}
    print(f"structured benchmark on {info['device']} ({jax.default_backend()}), jax {jax.__version__}, "
          f"llguidance {info['versions']['llguidance']}: {data['config']['model_name']} "
          f"({cfg.param_count() / 1e6:.1f}M params, {cfg.dtype}), tokenizer {tok_info.get('vocab_size')} ids; "
          f"{args.requests} requests, max_tokens {args.max_tokens}; validator: {validator}", flush=True)
    for batch in args.batches:
        t0 = time.perf_counter()
        cell = bench_batch(model, tok, reqs, batch, args, external[1] if external else None)
        cell["wall_s"] = round(time.perf_counter() - t0, 1)
        cell["host_load_avg"] = [round(x, 1) for x in os.getloadavg()]  # a busy host inflates the CPU figures
        data["results"].append(cell)
        con, unc = cell["constrained"], cell["unconstrained"]
        print(f"  batch {batch:>3}: constrained {con['tok_s']:,.0f} tok/s ({con['ms_per_step']:.2f} ms/step, "
              f"masks {con['host_s']['grammar_mask_s'] * 1e3:.1f} ms host), unconstrained {unc['tok_s']:,.0f} tok/s "
              f"({unc['ms_per_step']:.2f} ms/step): ratio {cell['tok_s_ratio']:.2f}; valid "
              f"{cell['validity']['valid']}/{cell['validity']['total']}  ({cell['wall_s']}s)", flush=True)
        common.write_json(data, path)  # partial results survive a crash
    data["all_valid"] = all(c["validity"]["valid"] == c["validity"]["total"] and c["tokens_matched"]
                            for c in data["results"])
    return data, str(common.write_json(data, path))


def main(argv=None) -> int:
    args = parse_args(argv)
    data, path = run(args)
    print()
    print(table(data))
    print(f"\nresults: {path}")
    if not data["all_valid"]:
        for c in data["results"]:
            for bad in c["validity"]["invalid"]:
                print(f"INVALID (batch {c['batch']}): {bad}", file=sys.stderr)
            if not c["tokens_matched"]:
                print(f"batch {c['batch']}: the unconstrained run did not generate the constrained lengths",
                      file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
