"""Every benchmark script runs end to end in its --quick mode (tiny shapes, CPU) and
writes the JSON it promises: the device, versions and a measurement of each peer.

These test the scripts (options, peers, timing plan, JSON, printed tables), not the
kernels, so each script runs in a subprocess on jax's CPU backend even on a GPU
machine (JAX_PLATFORMS=cpu: the kernels in Pallas interpret mode at the tiny --quick
sizes, as in CI). Compiled on a GPU, the --quick runs took minutes of kernel compiles
each (benchmarks/decode.py --quick 269 s, attention.py --quick 119 s of an H200 suite
run) and proved nothing the kernel tests and the real GPU benchmark runs do not.
FLASHJAX_BENCH_TEST_PLATFORMS=cuda (any JAX_PLATFORMS value; empty: jax's own
choice) runs them on the GPU instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def bench_env(base=None) -> dict:
    """The environment of a benchmark script's subprocess (`base`, default os.environ):
    jax on the CPU backend unless FLASHJAX_BENCH_TEST_PLATFORMS says otherwise."""
    env = dict(os.environ if base is None else base)
    platforms = env.get("FLASHJAX_BENCH_TEST_PLATFORMS", "cpu")
    if platforms:
        env["JAX_PLATFORMS"] = platforms
    return env


def run_script(name, *args, timeout):
    """benchmarks/<name>.py with args, in a subprocess (see bench_env)."""
    return subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=bench_env())


def run_quick(name, tmp_path, *extra, env=None):
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(out),
                        *map(str, extra)], capture_output=True, text=True, timeout=900,
                       env=bench_env(env))
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


def attention_module():
    sys.path.insert(0, str(BENCH))
    try:
        import attention
    finally:
        sys.path.remove(str(BENCH))
    return attention


def test_attention_gqa_and_ragged_quick(tmp_path):
    """--gqa 2 gives K/V half the heads: each result records kv_heads, tables label the
    heads "2/1", flashjax and XLA measure it and JAX's bundled op says "no GQA". A seq
    that is not a multiple of 128 (120) gets the ragged check against 128."""
    data, stdout = run_quick("attention", tmp_path, "--gqa", "2", "--seqs", "120", "128", "--causal", "true",
                             "--peers", "flashjax", "xla", "pallas_mha", "--budget", "3600")
    assert data["gqa"] == 2 and data["results"]
    assert all(r["heads"] == 2 and r["kv_heads"] == 1 for r in data["results"])
    for r in data["results"]:
        for m in ("fwd", "fwd_bwd"):
            if r["peer"] == "pallas_mha":
                assert r[m]["error"].startswith("no GQA"), r
            else:
                assert r[m]["ms"] > 0, r
    [row] = data["ragged_check"]
    assert (row["seq"], row["aligned_seq"], row["kv_heads"]) == (120, 128, 1)
    assert row["fwd_ratio"] > 0 and row["fwd_bwd_ratio"] > 0
    assert "| 2/1 " in stdout and "Ragged lengths" in stdout and "Worst compile:" in stdout


def test_attention_window_and_softcap_quick(tmp_path):
    """--window and --softcap reach every peer that has them: flashjax runs both (its
    error against the windowed, soft-capped reference is small), XLA runs the window and
    says "no soft-cap" once a soft-cap is asked for, and JAX's bundled op says it has
    neither; FLOPs count only the pairs inside the window."""
    data, _ = run_quick("attention", tmp_path, "--window", "16", "--softcap", "5", "--seqs", "256",
                        "--causal", "true", "--peers", "flashjax", "xla", "pallas_mha", "--budget", "3600")
    assert (data["window"], data["softcap"]) == (16, 5.0)
    by_peer = {r["peer"]: r for r in data["results"]}
    ours = by_peer["flashjax"]
    assert ours["fwd"]["ms"] > 0 and ours["fwd_bwd"]["ms"] > 0
    assert ours["max_abs_err_vs_reference"] < 0.05
    assert by_peer["xla"]["fwd"]["error"].startswith("no soft-cap")
    assert by_peer["pallas_mha"]["fwd"]["error"].startswith("no window / soft-cap")
    b, h, d = ours["batch"], ours["heads"], ours["head_dim"]
    assert ours["forward_flops"] == 4.0 * b * h * d * (17 * 256 - 16 * 17 // 2)
    assert ours["headline"]  # the shape whose output is checked against the reference
    # the window without a soft-cap: XLA (local_window_size) runs it
    data, _ = run_quick("attention", tmp_path, "--window", "16", "--seqs", "256", "--causal", "false",
                        "--peers", "flashjax", "xla", "--budget", "3600")
    for r in data["results"]:
        assert r["fwd"]["ms"] > 0 and r["forward_flops"] == 4.0 * b * h * d * (2 * (17 * 256 - 136) - 256)
    assert data["results"][0]["max_abs_err_vs_reference"] < 0.05
    attention = attention_module()
    with pytest.raises(SystemExit):
        attention.parse_args(["--window", "-1"])
    with pytest.raises(SystemExit):
        attention.parse_args(["--softcap", "0"])


def test_attention_without_tokamax_records_it_per_cell(tmp_path):
    """A tokamax whose import fails (a stub package that raises ImportError, first on
    PYTHONPATH) makes its peers' cells say so; the other peers run and the run succeeds."""
    stub = tmp_path / "stub"
    (stub / "tokamax").mkdir(parents=True)
    (stub / "tokamax" / "__init__.py").write_text('raise ImportError("stub: no tokamax here")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(stub), os.environ.get("PYTHONPATH")]))}
    data, _ = run_quick("attention", tmp_path, "--seqs", "128", "--causal", "false",
                        "--peers", "xla", "tokamax_mosaic", "tokamax_triton", "--budget", "3600", env=env)
    by_peer = {r["peer"]: r for r in data["results"]}
    assert set(by_peer) == {"xla", "tokamax_mosaic", "tokamax_triton"}
    assert by_peer["xla"]["fwd"]["ms"] > 0 and by_peer["xla"]["fwd_bwd"]["ms"] > 0
    for peer in ("tokamax_mosaic", "tokamax_triton"):
        for m in ("fwd", "fwd_bwd"):
            assert by_peer[peer][m]["error"].startswith("tokamax not installed: ImportError: stub"), by_peer[peer]
    assert data["versions"]["tokamax"] is None and "tokamax_stub.py" in data["peers"]["tokamax_mosaic"]
    # and by default the tokamax peers are left out when it does not import
    attention = attention_module()
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import attention; "
                        "print(' '.join(attention.default_peers()))", str(BENCH)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.split() == list(attention.DEFAULT_PEERS), r.stderr[-2000:]


def _result(peer, seq, tflops, *, head_dim=128, causal=True, heads=16, kv_heads=16, compile_s=1.0):
    cell = lambda x: {"error": "OOM"} if x is None else {"ms": 1.0, "tflops": x, "compile_s": compile_s}  # noqa: E731
    return {"peer": peer, "head_dim": head_dim, "causal": causal, "seq": seq, "batch": 16384 // seq,
            "heads": heads, "kv_heads": kv_heads, "fwd": cell(tflops[0]), "fwd_bwd": cell(tflops[1])}


def test_attention_ragged_check_and_versus_best_peer():
    """ragged_check divides flashjax's TFLOP/s at a ragged seq by its TFLOP/s at the next
    multiple of 128 of the same head_dim, mask and heads (and skips seqs without one);
    versus_best divides by the best of cuDNN and tokamax that has a number."""
    attention = attention_module()
    data = {"results": [
        _result("flashjax", 4000, (360.0, 380.0)), _result("flashjax", 4096, (400.0, 400.0)),
        _result("flashjax", 1000, (100.0, None)), _result("flashjax", 1024, (200.0, 250.0)),
        _result("flashjax", 8191, (300.0, 300.0)),  # no 8192: no row
        _result("flashjax", 4000, (1.0, 1.0), kv_heads=4),  # GQA: its own 4096 is missing
        _result("flashjax", 4000, (1.0, 1.0), causal=False),
        _result("cudnn", 4000, (900.0, 900.0)),  # another peer: not in flashjax's ratio
        _result("cudnn", 4096, (500.0, 380.0)), _result("tokamax_mosaic", 4096, (450.0, 420.0), compile_s=75.0),
        _result("tokamax_triton", 4096, (None, None)), _result("xla", 4096, (900.0, 900.0)),
    ]}
    rows = {r["seq"]: r for r in attention.ragged_check(data)}
    assert set(rows) == {4000, 1000}
    assert rows[4000]["aligned_seq"] == 4096 and rows[4000]["fwd_ratio"] == 0.9 and rows[4000]["fwd_bwd_ratio"] == 0.95
    assert rows[1000]["fwd_ratio"] == 0.5 and "fwd_bwd_ratio" not in rows[1000]
    [vs] = [r for r in attention.versus_best(data) if r["seq"] == 4096]
    assert (vs["fwd_ratio"], vs["fwd_best"]) == (0.8, "cudnn")  # xla is not among the peers compared
    assert vs["fwd_bwd_ratio"] == round(400 / 420, 3) and vs["fwd_bwd_best"] == "tokamax_mosaic"
    worst = attention.worst_compile(data)
    assert (worst["compile_s"], worst["peer"], worst["over_target"]) == (75.0, "tokamax_mosaic", 2)


def test_attention_issue19_grid_shapes():
    """--grid issue19: head_dim {64,128,256} x {causal, full} x seq {1024,4096,16384} x {MHA,
    GQA 4:1} at heads*head_dim 2048 and 16384 tokens, plus seq 1000/4000/8191 (and 8192)
    at head_dim 128 causal MHA; the headline (head_dim 128, full, 16384, MHA) first."""
    attention = attention_module()
    cfgs = attention.configs(attention.parse_args(["--grid", "issue19"]))
    keys = [(c["head_dim"], c["causal"], c["seq"], c["heads"] // c["kv_heads"]) for c in cfgs]
    assert len(keys) == len(set(keys)) == 3 * 2 * 3 * 2 + 4
    grid = {(d, causal, s, g) for d in (64, 128, 256) for causal in (False, True) for s in (1024, 4096, 16384)
            for g in (1, 4)}
    ragged = {(128, True, s, 1) for s in (1000, 4000, 8191, 8192)}
    assert set(keys) == grid | ragged
    assert all(c["heads"] * c["head_dim"] == 2048 and c["batch"] == 16384 // c["seq"] for c in cfgs)
    assert keys[0] == (128, False, 16384, 1) and [c["headline"] for c in cfgs].count(True) == 1
    assert cfgs[0]["headline"] and cfgs[0]["batch"] == 1 and cfgs[0]["heads"] == 16
    # then seq 4096 at every head_dim and the ragged pairs, before the rest of 16384 and 1024
    first = keys[1:18]
    assert {k[2] for k in first} == {4096, 4000, 1000, 1024, 8191, 8192}
    assert keys.index((128, True, 8191, 1)) + 1 == keys.index((128, True, 8192, 1))
    args = attention.parse_args(["--grid", "issue19"])
    assert attention.selected_peers(args) == ["flashjax", "flashjax_triton", "cudnn", "tokamax_mosaic",
                                              "tokamax_triton"]
    part = attention.configs(attention.parse_args(["--grid", "issue19", "--head-dims", "256", "--causal", "true"]))
    assert len(part) == 6 and all(c["head_dim"] == 256 and c["causal"] for c in part)
    with pytest.raises(SystemExit):
        attention.configs(attention.parse_args(["--grid", "issue19", "--gqa", "2"]))


def test_tokamax_xprof_stub(tmp_path):
    """benchmarks/tokamax_stub.py writes an xprof package whose cli.tools has
    get_kernel_stats_tool = None (what tokamax imports), and leaves a real xprof alone."""
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, str(BENCH / "tokamax_stub.py"), str(site)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", "from xprof.cli.tools import get_kernel_stats_tool as t; print(t)"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(site)})
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr
    other = tmp_path / "other"
    (other / "xprof").mkdir(parents=True)
    (other / "xprof" / "__init__.py").write_text("# the real one\n")
    r = subprocess.run([sys.executable, str(BENCH / "tokamax_stub.py"), str(other)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is not this stub" in r.stderr
    assert (other / "xprof" / "__init__.py").read_text() == "# the real one\n"


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
    r = run_script("decode", "--sweep", "--quick", "--out", out, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    cells = data["results"]
    assert cells and all(c.get("ms", 0) > 0 for c in cells if "error" not in c), cells
    assert not [c for c in cells if "error" in c], cells


def test_decode_sweep_fp8_quick(tmp_path):
    """--sweep-fp8 (implies --sweep) times every configuration with both
    DecodeConfig.fp8_dot values, back to back, beside the bf16 kernel at its defaults,
    and summarises which fp8_dot is faster per kernel."""
    out = tmp_path / "sweep_fp8.json"
    r = subprocess.run([sys.executable, str(BENCH / "decode.py"), "--sweep-fp8", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["fp8"] and data["fp8_dots"] == ["q", "f16"]
    cells = data["results"]
    assert not [c for c in cells if "error" in c or "skipped" in c], cells
    assert {c["peer"] for c in cells if c.get("baseline")} == {"ours_paged", "ours_contiguous"}
    keys = ("peer", "num_splits", "pages_per_block", "block_k", "num_warps", "num_stages", "gather")
    by_config = {}
    for c in cells:
        if not c.get("baseline"):
            assert c["ms"] > 0 and c["peer"].endswith("_fp8"), c
            by_config.setdefault(tuple(c.get(k) for k in keys), []).append(c["fp8_dot"])
    assert by_config and all(v == ["q", "f16"] for v in by_config.values()), by_config
    summary = data["fp8_dot_summary"]
    for name in ("ours_paged_fp8", "ours_contiguous_fp8"):
        e = summary[name]
        assert set(e["best"]) == {"q", "f16"} and e["faster"] in ("q", "f16") and e["best_q_over_f16"] > 0
        assert set(e["speedup_vs_bf16_default"]) == {"q", "f16"}
        assert len(e["per_config_q_over_f16"]) == sum(k[0] == name for k in by_config)
    # the GPU sweep: 2 x (7 paged + 6 contiguous) cells, ~150 s on a GPU
    sys.path.insert(0, str(BENCH))
    try:
        import decode
    finally:
        sys.path.remove(str(BENCH))
    gpu_cells = len(decode.FP8_DOTS) * (len(decode.FP8_SWEEP)
                                        + sum(c["num_splits"] is None for c in decode.FP8_SWEEP))
    assert gpu_cells == 26


def test_decode_fp8_dot_option(tmp_path):
    """--fp8-dot picks DecodeConfig.fp8_dot for the main grid's FP8 peers (recorded in the
    JSON); "f16" is exact against the dequantized cache too."""
    data, stdout = run_quick("decode", tmp_path, "--fp8-dot", "f16", "--peers", "ours_paged_fp8",
                             "ours_contiguous_fp8", "--batches", "1", "--contexts", "256")
    assert data["fp8_dot"] == "f16" and "fp8_dot='f16'" in stdout
    [row] = data["results"]
    for peer in ("ours_paged_fp8", "ours_contiguous_fp8"):
        cell = row["peers"][peer]
        assert cell["ms"] > 0 and cell["max_abs_err_vs_dequantized"] < 0.01, (peer, cell)


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
    r = run_script("engine_diag", "--preset", "llama-nano", "--batch", "2", "--prompt-len", "8",
                   "--new-tokens", "6", "--variants", "4:1", "--out", out, timeout=900)
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
    r = run_script("attention", "--sweep", "--quick", "--sweep-shape", "1,64,2", "--out", tmp_path / "s.json",
                   timeout=300)
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
                              ("decode", ["--fp8-dot", "bf16"], "invalid choice: 'bf16'"),
                              ("attention", ["--gqa", "0"], "--gqa must be at least 1, got 0"),
                              ("kernels", ["--shapes", "1x64x2"], "expected BATCHxSEQxHEADSxHEAD_DIM, got '1x64x2'"),
                              ("kernels", ["--reps", "0"], "--reps must be at least 1, got 0")):
        r = run_script(script, *args, timeout=300)
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
        r = run_script("kernels", "--quick", "--configs", cfg, timeout=300)
        assert r.returncode == 1 and msg in r.stderr, (cfg, r.stderr[-2000:])


def test_attention_sweep_rejects_an_unknown_field(tmp_path):
    cfgs = tmp_path / "cfgs.json"
    cfgs.write_text('[{"block_qq": 16}]')
    r = run_script("attention", "--sweep", "--quick", "--sweep-configs", cfgs, timeout=300)
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
    assert out["between_steps_method"].startswith("XLA Modules")
    # 40 launch gaps of 4 us inside the calls, 9 gaps of 29 us between them
    gaps = out["idle_by_gap_us"]
    assert (gaps["0-5"]["gaps"], gaps["20-50"]["gaps"]) == (40, 9), gaps
    assert abs(gaps["0-5"]["idle_ms"] - 0.160) < 1e-9 and abs(gaps["20-50"]["idle_ms"] - 0.261) < 1e-9


def test_engine_diag_between_calls_from_kernel_gaps(tmp_path):
    """Without an XLA Modules line (the H200's traces), the idle time between device calls
    is the kernel gaps of >= 50 us; the launch gaps inside a call are not counted."""
    import gzip
    import importlib.util

    spec = importlib.util.spec_from_file_location("engine_diag", BENCH / "engine_diag.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ev = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "Stream #14(Compute)"}}]
    for i in range(4):  # calls every 1000 us: 10 kernels of 80 us with 3 us launch gaps, then a host wait
        ev += [{"ph": "X", "pid": 1, "tid": 2, "ts": 1000 * i + 83 * j, "dur": 80, "name": "k"}
               for j in range(10)]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    out = mod.device_idle(str(tmp_path), lo=0.0, hi=1.0)
    stretch = 3000 + 9 * 83 + 80  # the last kernel ends at 3827 us
    assert abs(out["kernel_idle_frac"] - (1 - 3200 / stretch)) < 1e-9, out
    # between calls: 3 gaps of 1000 - 827 = 173 us
    assert abs(out["between_steps_idle_frac"] - 3 * 173 / stretch) < 1e-9, out
    assert "kernel gaps" in out["between_steps_method"]
    assert out["idle_by_gap_us"]["0-5"]["gaps"] == 36


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
    # one mask per constrained token (none for a row that stopped in the step read back
    # while the forward ran), one decode step per call; the unconstrained run computes none
    # and runs multi-step calls
    assert con["grammar_masks"] == con["output_tokens"] and con["multi_step_calls"] == 0
    assert con["host_s"]["grammar_mask_s"] > 0 and con["host_s"]["grammar_consume_s"] > 0
    assert unc["grammar_masks"] == 0 and unc["host_s"]["grammar_mask_s"] == 0 and unc["multi_step_calls"] > 0
    assert con["compiles"] == unc["compiles"] == 0
    assert cell["tok_s_ratio"] == pytest.approx(con["tok_s"] / unc["tok_s"])
    assert cell["grammar_threads"] >= 1
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


def test_time_call_batches_short_calls():
    """common.time_call with min_sample_s: a call shorter than that runs several times
    back to back per sample and the time is divided; long calls run once per sample."""
    import time as _time

    sys.path.insert(0, str(BENCH))
    try:
        import common
    finally:
        sys.path.remove(str(BENCH))
    calls = []

    def short():
        calls.append(1)
        _time.sleep(0.002)
        return 0

    t = common.time_call(short, (), warmup=1, reps=3, min_sample_s=0.02)
    assert 5 <= t["calls_per_sample"] <= 10, t
    assert len(calls) == 1 + 1 + 3 * t["calls_per_sample"]
    assert 1.9 <= t["min_ms"] and t["ms"] < 5, t  # per call, not per sample
    t = common.time_call(short, (), warmup=0, reps=2)
    assert t["calls_per_sample"] == 1


def test_serve_table_shows_a_failed_loop_baseline():
    """A one-jit loop baseline that failed (out of memory, say) shows its error in the
    table and leaves the ratios empty instead of ending the run."""
    sys.path.insert(0, str(BENCH))
    try:
        import serve
    finally:
        sys.path.remove(str(BENCH))
    server = {"ok": 3, "requests": 3, "throughput_tok_s": 100.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2,
              "tpot_p50_s": 0.01, "tpot_p99_s": 0.02, "kv_utilization_mean": 0.5}
    run = {"preset": "tiny", "params": 1e6, "server": server,
           "static_batching": {"error": "JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory"}}
    text = serve.table([run])
    row = text.strip().splitlines()[-1]
    assert "JaxRuntimeError: RESOURCE_EXHAUSTED" in row and "| - " in row
    ok = dict(run, static_batching={"throughput_tok_s": 50.0, "step_p50_s": 0.02})
    assert "| 2.00 " in serve.table([ok]).strip().splitlines()[-1]
