"""Every benchmark script runs end to end in its --quick mode (tiny shapes, CPU) and
writes the JSON it promises: the device, versions and a measurement of each peer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run_quick(name, tmp_path, *extra):
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_attention_quick(tmp_path):
    data, stdout = run_quick("attention", tmp_path)
    assert data["device"] and data["versions"]["jax"]
    ours = [r for r in data["results"] if r["peer"] == "flashjax"]
    assert ours and all(r["fwd"]["ms"] > 0 and r["fwd_bwd"]["ms"] > 0 for r in ours)
    checked = [r for r in ours if r.get("headline")]  # accuracy is checked at the headline shape
    assert checked and all(r["max_abs_err_vs_reference"] < 0.05 for r in checked)
    assert {r["peer"] for r in data["results"]} >= {"flashjax", "xla"}
    assert "TFLOP/s" in stdout
    # JAX's Mosaic GPU op runs only on Hopper in float16: on CPU, and in this bf16 run on
    # a GPU, each of its cells must say so rather than crash the run or hold a number.
    mgpu = [r for r in data["results"] if r["peer"] == "pallas_mgpu"]
    assert mgpu and all(r[m]["error"].startswith("unsupported: ") for r in mgpu for m in ("fwd", "fwd_bwd"))
    assert all(("Hopper" in r["fwd"]["error"]) or ("float16 only" in r["fwd"]["error"]) for r in mgpu)


def test_attention_results_by_dtype():
    """bf16 is the main table; a float16 run gets its own file prefix and README section,
    and the newest-'attention' lookup never picks it up."""
    sys.path.insert(0, str(BENCH))
    try:
        import attention
        import common
    finally:
        sys.path.remove(str(BENCH))
    assert attention.results_kind("bfloat16") == "attention"
    assert attention.results_kind("float16") == "attention_float16"
    path = common.results_path(attention.results_kind("float16"), "NVIDIA H100 80GB HBM3")
    assert path.name.startswith("attention_float16-") and path.suffix == ".json"
    assert all(not p.name.startswith("attention_") for p in [common.latest_json("attention")] if p)
    readme = (BENCH.parent / "README.md").read_text()
    for kind in ("attention", "attention_float16"):
        assert f"<!-- bench:{kind}:start -->" in readme and f"<!-- bench:{kind}:end -->" in readme


def test_decode_quick(tmp_path):
    data, _ = run_quick("decode", tmp_path)
    assert data["device"] and data["results"]
    for row in data["results"]:
        for peer in ("ours_paged", "ours_contiguous"):
            cell = row["peers"][peer]
            assert cell["ms"] > 0 and cell["max_abs_err_vs_xla"] < 0.05, (peer, cell)
        # the FP8 cache: exact against its dequantized values, within e4m3 rounding of the bf16
        # cache, and GB/s counted in logical bf16 bytes while it holds about half of them
        for peer in ("ours_paged_fp8", "ours_contiguous_fp8"):
            cell = row["peers"][peer]
            assert cell["ms"] > 0 and cell["max_abs_err_vs_dequantized"] < 0.01, (peer, cell)
            assert 1e-3 < cell["max_abs_err_vs_xla"] < 0.1, (peer, cell)
            assert cell["tb_s"] == pytest.approx(row["kv_bytes"] / (cell["ms"] * 1e-3) / 1e12)
            assert cell["physical_kv_bytes"] / row["kv_bytes"] == pytest.approx((32 + 4) / 64)
        assert set(row["fp8_speedup"]) == {"ours_paged_fp8", "ours_contiguous_fp8"}


def test_kv_fp8_quick(tmp_path):
    # the cheapest run: two caches, no engine (the engine on FP8 is tests/test_kv_fp8.py's)
    data, stdout = run_quick("kv_fp8", tmp_path, "--no-engine", "--caches", "bf16", "fp8", "--batch", "2",
                             "--new-tokens", "4")
    assert data["device"] and data["config"]["comparisons"] == ["fp8 vs bf16"]
    [m] = data["models"]
    tf = m["teacher_forced"]["fp8_vs_bf16"]
    assert tf["positions"] == 2 * (16 + 4 - 1)
    assert 1e-4 < tf["rel_l2_mean"] < 0.1 and 0 < tf["kl_mean"] < 0.01 and tf["top1"] >= 0.5, tf
    assert m["greedy_loop"]["fp8_vs_bf16"]["agree"] >= 0.5  # the one-jit loop on an FP8 cache
    mem = m["memory"]["kv_bytes_per_token"]
    assert mem["fp8"] / mem["bf16"] == (16 + 4) / 32  # head_dim 16 + a float32 scale, vs 2 bytes each
    assert "fp8 vs bf16" in stdout


def test_decode_sweep_quick(tmp_path):
    out = tmp_path / "sweep.json"
    r = subprocess.run([sys.executable, str(BENCH / "decode.py"), "--sweep", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    cells = data["results"]
    assert cells and all(c.get("ms", 0) > 0 for c in cells if "error" not in c), cells
    assert not [c for c in cells if "error" in c], cells


def test_train_quick(tmp_path):
    data, _ = run_quick("train", tmp_path)
    impls = {r["attention"] for r in data["results"] if r.get("tokens_per_s")}
    assert {"flash", "xla"} <= impls, data["results"]


def test_kernels_quick(tmp_path):
    data, stdout = run_quick("kernels", tmp_path)
    assert data["device"] and data["versions"]["jax"] and set(data["configs"]) == {"default", "previous"}
    [row] = data["results"]
    for name in ("default", "previous"):
        cell = row["peers"][name]
        assert cell["wall_ms"] > 0 and cell["max_abs_diff_vs_first"] < 0.05, cell
    assert row["peers"]["previous"]["block_sizes"]["block_q_bwd"] == 128  # the named config took effect
    assert row["peers"]["default"]["block_sizes"] != row["peers"]["previous"]["block_sizes"]
    assert "fwd / dq / dkdv (all)" in stdout


def test_generate_quick(tmp_path):
    data, stdout = run_quick("generate", tmp_path, "--peers", "paged", "engine", "dense")
    peers = {(r["batch"], r["peer"]) for r in data["results"] if "error" not in r}
    assert {p for _, p in peers} == {"paged", "engine", "dense"}, data["results"]
    assert "tok/s" in stdout and "e2e / paged loop" in stdout
    engine = [r for r in data["results"] if r["peer"] == "engine"]
    assert all(r["agree"] == data["config"]["new_tokens"] and r["device_calls"] > 0 for r in engine), engine


def test_engine_diag_runs_and_writes_json(tmp_path):
    out = tmp_path / "diag.json"
    r = subprocess.run([sys.executable, str(BENCH / "engine_diag.py"), "--preset", "llama-nano", "--batch", "2",
                        "--prompt-len", "8", "--new-tokens", "6", "--variants", "4:1", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "engine_diag" and data["device"]
    run = [x for x in data["lines"] if "total_s" in x]
    assert run and run[0]["calls"] > 0 and {"plan_s", "dispatch_s", "wait_s", "deliver_s"} <= set(run[0])


def test_serve_quick(tmp_path):
    data, stdout = run_quick("serve", tmp_path, "--no-hf")
    (run,) = data["runs"]
    s = run["server"]
    assert s["ok"] == s["requests"] == 12 and s["output_tokens"] > 0
    assert 0 < s["kv_utilization_mean"] <= 1.0
    assert run["static_batching"]["throughput_tok_s"] > 0
    assert "server tok/s" in stdout


def test_attention_sweep_rejects_a_malformed_shape(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "attention.py"), "--sweep", "--quick", "--sweep-shape", "1,64,2",
                        "--out", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "--sweep-shape must be batch,seq,heads,head_dim, got '1,64,2'" in r.stderr


def test_serve_sharegpt_workload_is_seeded_and_bounded():
    sys.path.insert(0, str(BENCH))
    try:
        import serve
    finally:
        sys.path.remove(str(BENCH))
    a = serve.workload(500, 10.0, 3, None, None, 1000, "sharegpt")
    b = serve.workload(500, 10.0, 3, None, None, 1000, "sharegpt")
    assert a == b  # same seed, same requests
    p = [len(r["prompt"]) for r in a]
    o = [r["max_tokens"] for r in a]
    assert 4 <= min(p) and max(p) <= 1024 and 4 <= min(o) and max(o) <= 512
    assert 120 < sum(p) / len(p) < 200 and 220 < sum(o) / len(o) < 330  # ShareGPT-like means
    arrivals = [r["arrival"] for r in a]
    assert arrivals == sorted(arrivals) and 30 < arrivals[-1] < 70  # ~500 / 10 per second
    assert all(1 <= t < 1000 for r in a for t in r["prompt"])


def test_bad_benchmark_options_are_named():
    for script, args, msg in (("serve", ["--lengths", "bogus"], "invalid choice: 'bogus'"),
                              ("decode", ["--rounds", "0"], "--rounds must be at least 1, got 0"),
                              ("kernels", ["--shapes", "1x64x2"], "expected BATCHxSEQxHEADSxHEAD_DIM, got '1x64x2'"),
                              ("kernels", ["--reps", "0"], "--reps must be at least 1, got 0")):
        r = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and msg in r.stderr, (script, r.stderr[-2000:])


def test_decode_per_call_time_is_the_chain_slope():
    """A fixed per-executable cost cancels: chains of 16 and 64 calls of 50 us
    each plus 200 us of launch-and-wait give 50 us per call."""
    sys.path.insert(0, str(BENCH))
    try:
        import decode
    finally:
        sys.path.remove(str(BENCH))
    t = lambda n: 0.2 + n * 0.05  # ms
    assert abs(decode.per_call_ms(t(16), 16, t(64), 64) - 0.05) < 1e-12
    # noise that makes the slope non-positive: fall back to wall time per call
    assert decode.per_call_ms(3.3, 16, 3.2, 64) == 3.2 / 64
    assert decode.per_call_ms(1.0, 1, 1.0, 1) == 1.0  # one chain only (interpret mode)


def test_decode_chain_cycles_through_kv_copies():
    """Call i of a timing chain reads KV copy i % copies; small caches get
    enough copies to stream ROTATE_BYTES, large ones (and interpret mode) one."""
    import jax.numpy as jnp

    sys.path.insert(0, str(BENCH))
    try:
        import decode
    finally:
        sys.path.remove(str(BENCH))
    seen = []
    fn = lambda q, k, v, ln: q * 0 + k * v + ln  # noqa: E731 - which copy a call read
    q, ln = jnp.zeros(()), jnp.zeros(())
    sets = [(jnp.float32(1.0), jnp.float32(2.0)), (jnp.float32(3.0), jnp.float32(4.0))]
    for chain, want in ((1, 2.0), (2, 12.0), (3, 2.0), (4, 12.0)):
        out = decode.chained(fn, chain, copies=2)(q, *sets[0], *sets[1], ln)
        seen.append(float(out))
    assert seen == [2.0, 12.0, 2.0, 12.0]
    assert decode.kv_copies(decode.ROTATE_BYTES, False) == 1
    assert decode.kv_copies(4 * 2**20, False) == 64
    assert decode.kv_copies(100 * 2**20, False) == 3
    assert decode.kv_copies(4 * 2**20, True) == 1


def test_kernels_rejects_unknown_configs():
    for cfg, msg in (("nope", "'nope' is neither one of ['default', 'previous'] nor a JSON object"),
                     ('{"block_qq": 16}', "does not fit flashjax.BlockSizes")):
        r = subprocess.run([sys.executable, str(BENCH / "kernels.py"), "--quick", "--configs", cfg],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and msg in r.stderr, (cfg, r.stderr[-2000:])


def test_attention_sweep_rejects_an_unknown_field(tmp_path):
    cfgs = tmp_path / "cfgs.json"
    cfgs.write_text('[{"block_qq": 16}]')
    r = subprocess.run([sys.executable, str(BENCH / "attention.py"), "--sweep", "--quick", "--sweep-configs", str(cfgs)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--sweep: a config does not fit flashjax.BlockSizes" in r.stderr, r.stderr[-2000:]


def test_mgpu_peer_names_what_it_cannot_run(monkeypatch):
    """The Mosaic GPU peer refuses, with its reason, a backend that is not a GPU, a GPU
    that is not Hopper, and a dtype other than float16 (before any kernel is built)."""
    import jax
    import jax.numpy as jnp
    import pytest

    sys.path.insert(0, str(BENCH))
    try:
        import attention
    finally:
        sys.path.remove(str(BENCH))

    class Device:
        def __init__(self, cc):
            self.compute_capability = cc

    make = lambda: attention.make_attention("pallas_mgpu", causal=True, sm_scale=0.125)  # noqa: E731
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    with pytest.raises(NotImplementedError, match="needs an NVIDIA Hopper GPU"):
        make()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [Device("8.0")])
    with pytest.raises(NotImplementedError, match=r"needs a Hopper GPU \(sm_90, wgmma\); this one is sm_8.0"):
        make()
    monkeypatch.setattr(jax, "devices", lambda *a: [Device("9.0")])
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="float16 only .* got bfloat16"):
        make()(q, q, q)


def test_train_benchmark_rejects_bad_counts(capsys):
    """--reps and --rounds below 1 (or --warmup below 0) are argument errors naming the
    option, not a crash after minutes of compiling; unknown attention names likewise."""
    import pytest

    sys.path.insert(0, str(BENCH))
    try:
        import train
    finally:
        sys.path.remove(str(BENCH))
    for argv, msg in ((["--rounds", "0"], "--rounds must be at least 1, got 0"),
                      (["--reps", "-2"], "--reps must be at least 1, got -2"),
                      (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
                      (["--attention", "flash,triton"], "unknown attention 'triton'")):
        with pytest.raises(SystemExit):
            train.parse_args(["--quick", *argv])
        assert msg in capsys.readouterr().err
    args = train.parse_args(["--quick", "--warmup", "0"])
    assert (args.warmup, args.reps, args.rounds) == (0, 2, 2)


def test_engine_diag_device_idle_reads_a_trace(tmp_path):
    """The idle figure of engine_diag --profile on a synthetic trace with known gaps."""
    import gzip
    import importlib.util

    spec = importlib.util.spec_from_file_location("engine_diag", BENCH / "engine_diag.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ev = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "XLA Modules"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "Stream #7"}}]
    for i in range(10):  # calls of 100 us every 125 us; kernels fill 80 us of each (the stretch ends with the last kernel, at 1221 us)
        ev.append({"ph": "X", "pid": 1, "tid": 1, "ts": 125 * i, "dur": 100, "name": "jit_step"})
        ev += [{"ph": "X", "pid": 1, "tid": 2, "ts": 125 * i + 20 * j, "dur": 16, "name": "k"} for j in range(5)]
    ev.append({"ph": "X", "pid": 2, "tid": 9, "ts": 0, "dur": 5000, "name": "host"})  # not the device
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    out = mod.device_idle(str(tmp_path), lo=0.0, hi=1.0)
    assert abs(out["between_steps_idle_frac"] - (1 - 996 / 1221)) < 1e-6, out
    assert abs(out["kernel_idle_frac"] - (1 - 800 / 1221)) < 1e-6, out


def test_structured_quick(tmp_path):
    """Constrained (JSON schema) vs unconstrained decoding of the same token counts: both
    modes timed, every constrained response valid, the engine's grammar counters filled."""
    pytest.importorskip("llguidance")
    data, stdout = run_quick("structured", tmp_path)
    assert data["benchmark"] == "structured" and data["device"] and data["versions"]["llguidance"]
    assert data["all_valid"] and data["config"]["tokenizer"]["vocab_size"] == data["config"]["model"]["vocab_size"]
    [cell] = data["results"]
    con, unc = cell["constrained"], cell["unconstrained"]
    assert cell["validity"]["percent"] == 100.0 and not cell["validity"]["invalid"]
    assert set(cell["validity"]["by_schema"]) == set(data["config"]["schemas"]) and len(data["config"]["schemas"]) >= 5
    assert cell["tokens_matched"] and con["output_tokens"] == unc["output_tokens"] > 0
    assert con["finish_reasons"] == {"stop": con["requests"]}
    # one mask per constrained token, each step read back at once; the unconstrained run
    # computes none and runs multi-step calls
    assert con["grammar_masks"] == con["output_tokens"] and con["multi_step_calls"] == 0
    assert con["host_s"]["grammar_mask_s"] > 0 and con["host_s"]["grammar_consume_s"] > 0
    assert unc["grammar_masks"] == 0 and unc["host_s"]["grammar_mask_s"] == 0 and unc["multi_step_calls"] > 0
    assert con["compiles"] == unc["compiles"] == 0
    assert cell["tok_s_ratio"] == pytest.approx(con["tok_s"] / unc["tok_s"])
    assert "tok/s vs unconstrained" in stdout


def test_structured_validator_rejects_what_it_must():
    """The benchmark's own validator (used when jsonschema is not installed) and the
    response check: cut responses, non-JSON and schema violations are invalid."""
    sys.path.insert(0, str(BENCH))
    try:
        import structured
    finally:
        sys.path.remove(str(BENCH))
    S = structured.SCHEMAS
    good = {"id": "ORD-1234", "items": [{"sku": "ABC12", "qty": 3, "price": 999.81}], "paid": False}
    assert structured.check_response(json.dumps(good), "stop", S["order"]) == []
    assert structured.check_response(json.dumps(good), "length", S["order"])  # cut by max_tokens
    assert structured.check_response('{"id": "ORD-1234", ', "stop", S["order"])
    for bad in ({**good, "id": "ORD-12"}, {**good, "extra": 1}, {**good, "items": []},
                {**good, "items": [{"sku": "ABC12", "qty": 3, "price": 1.005}]},
                {**good, "items": [{"sku": "ABC12", "qty": 100, "price": 1}]}, {**good, "paid": 0}):
        assert structured.validate(bad, S["order"]), bad
    ev = {"title": "x", "date": "2024-02-30", "time": "12:00", "location": {"lat": 1, "lon": 2}, "tags": []}
    assert structured.validate(ev, S["event"]) == ["$.date: '2024-02-30' is not a date"]
    assert structured.validate({**ev, "date": "2024-02-29"}, S["event"]) == []
    assert structured.validate({"status": "open", "priority": "low", "assignee": None, "labels": ["bug"]},
                               S["ticket"]) == []
    assert structured.validate({"status": "done", "priority": "low", "assignee": 3, "labels": []}, S["ticket"])
    with pytest.raises(ValueError, match="not implemented"):
        structured.validate([1], {"type": "array", "uniqueItems": True})


def test_structured_tokenizer_fills_the_vocabulary():
    """A preset's tokenizer has exactly the model's ids: when BPE stops short (a small corpus)
    special `<|unused_N|>` tokens fill the rest, and a JSON grammar never allows them."""
    pytest.importorskip("llguidance")
    import numpy as np

    from flashjax.serving.guided import GrammarBackend, grammar_for_response_format

    sys.path.insert(0, str(BENCH))
    try:
        import structured
    finally:
        sys.path.remove(str(BENCH))
    tok, info = structured.preset_tokenizer(4000, 32 << 10)
    assert tok.vocab_size == info["vocab_size"] == 4000 and info["padding_special_tokens"] > 0
    assert tok.decode([3999]) == f"<|unused_{info['padding_special_tokens'] - 1}|>"
    backend = GrammarBackend(tok, vocab_size=4000, eos_id=tok.eot_id)
    grammar = grammar_for_response_format({"type": "json_schema", "json_schema": {"schema": structured.SCHEMAS["ticket"]}})
    row = np.zeros(backend.words, np.int32)
    backend.fill(backend.matcher(grammar), row)
    allowed = np.unpackbits(row.view(np.uint8), bitorder="little")[:4000]
    assert allowed.sum() >= 1 and not allowed[info["bpe_vocab"]:].any()
