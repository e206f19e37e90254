"""Where an engine decode step's time goes (a diagnostic, not a headline benchmark).

    python benchmarks/engine_diag.py --preset llama-1b --batch 64

Times, on the same random-weight model and prompts: the device step alone (K decode
steps of every row in one call, calls dispatched back to back), and the engine run
to completion with overlap on/off and several K, with the engine's host timing
breakdown (plan, dispatch, wait for the device, deliver). Prints one JSON line per
measurement and writes them, with the device and versions, to
benchmarks/results/engine_diag-<device>-<date>.json (`--out` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None):
    import jax
    import numpy as np

    from flashjax.models.config import config_from_preset
    from flashjax.models.gpt import build_model
    from flashjax.serving import step as S
    from flashjax.serving.engine import Engine, RequestParams

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--variants", default="8:1,8:0,32:1,1:1", help="K:overlap,...")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/engine_diag-<device>-<date>.json)")
    a = ap.parse_args(argv)
    data = {**common.env_info(), "benchmark": "engine_diag", "config": vars(a), "lines": []}
    path = a.out or common.results_path("engine_diag", data["device"])

    def emit(line):
        print(json.dumps(line), flush=True)
        data["lines"].append(line)
        common.write_json(data, path)
    cfg = config_from_preset(a.preset, dtype="bfloat16", param_dtype="bfloat16")
    model = build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (a.batch, a.prompt_len)).tolist()
    bs = 16
    per_seq = -(-(a.prompt_len + a.new_tokens) // bs) + 1
    for v in a.variants.split(","):
        K, ov = (int(x) for x in v.split(":"))
        eng = Engine(model, num_blocks=per_seq * a.batch + 8, max_seqs=a.batch, block_size=bs,
                     max_num_batched_tokens=4096 + a.batch, prefill_rows=32, max_chunk=128, chunk_buckets=(128,),
                     prefix_caching=False, decode_steps=K, overlap=bool(ov))
        eng.warmup()
        params = RequestParams(temperature=0, max_tokens=a.new_tokens, ignore_eos=True)
        eng.generate(prompts[:2], RequestParams(temperature=0, max_tokens=4, ignore_eos=True))
        # device step alone: every row live for K steps (blocks handed out by hand)
        if K > 1 or v == a.variants.split(",")[0]:
            sl = S.SlotBatch(a.batch, eng.max_blocks_per_seq)
            for s in range(a.batch):
                sl.ints[s, S.LENGTH] = a.prompt_len
                sl.ints[s, S.ACTIVE] = 1
                sl.ints[s, S.N_STEPS] = K
                sl.ints[s, S.EOS] = -1
                sl.tables[s, :per_seq - 1] = np.arange(s * (per_seq - 1), (s + 1) * (per_seq - 1))
            full = sl.arrays()
            width = next(w for w in eng.table_buckets if w >= per_seq)
            for name, arr in (("full_tables", full), (f"tables_{width}", dict(full, tables=full["tables"][:, :width]))):
                jax.block_until_ready(eng.runner.run(arr, None, steps=K))
                t0 = time.perf_counter()
                outs = [eng.runner.run(arr, None, steps=K) for _ in range(10)]
                jax.block_until_ready(outs)
                dev = (time.perf_counter() - t0) / 10 / K
                emit({"variant": v, name + "_device_step_ms": dev * 1e3})
        eng.host_timing.clear()
        c0 = eng.stats_counters["device_calls"]
        t0 = time.perf_counter()
        hs = [eng.add_request(p, params) for p in prompts]
        eng.run_until_done()
        total = time.perf_counter() - t0
        assert all(len(h.result().outputs[0].token_ids) == a.new_tokens for h in hs)
        emit({"variant": v, "total_s": total, "tok_s": a.batch * a.new_tokens / total,
              "calls": eng.stats_counters["device_calls"] - c0,
              **{k: round(x, 4) for k, x in eng.host_timing.items()}})
        eng.pages = None
        del eng
    print(f"results: {common.write_json(data, path)}")


if __name__ == "__main__":
    sys.exit(main())
