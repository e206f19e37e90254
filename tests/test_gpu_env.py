"""conftest.py bounds each test process's GPU memory, so pytest-xdist workers share one GPU,
and turns off XLA's GPU autotuning (compile time, not results).

Checked in fresh interpreters (the settings must be in place before jax starts its
backend): no preallocation always; under xdist a memory fraction of 0.9 / workers;
--xla_gpu_autotune_level=0 appended to XLA_FLAGS; values the caller already set are kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
KEYS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def _env_after_conftest(keys=KEYS, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XLA_PYTHON_CLIENT_", "PYTEST_XDIST_")) and k != "XLA_FLAGS"}
    env.update(extra)
    code = ("import json, os, runpy, sys; sys.path.insert(0, sys.argv[1]); "
            "runpy.run_path(os.path.join(sys.argv[1], 'conftest.py')); "
            f"print(json.dumps({{k: os.environ.get(k) for k in {tuple(keys)!r}}}))")
    r = subprocess.run([sys.executable, "-c", code, str(TESTS)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("extra,want", [
    ({}, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": None}),
    ({"PYTEST_XDIST_WORKER": "gw3", "PYTEST_XDIST_WORKER_COUNT": "8"},
     {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.1125"}),
    ({"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "2"},
     {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}),
    ({"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "8", "XLA_PYTHON_CLIENT_PREALLOCATE": "true",
      "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3"},
     {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3"}),
], ids=["plain", "xdist8", "xdist2", "caller_wins"])
def test_conftest_sets_gpu_memory_env(extra, want):
    assert _env_after_conftest(**extra) == want


@pytest.mark.parametrize("flags,want", [
    (None, "--xla_gpu_autotune_level=0"),
    ("--xla_dump_to=/tmp/x", "--xla_dump_to=/tmp/x --xla_gpu_autotune_level=0"),
    ("--xla_gpu_autotune_level=4", "--xla_gpu_autotune_level=4"),
], ids=["plain", "appended", "caller_wins"])
def test_conftest_turns_off_gpu_autotuning(flags, want):
    extra = {} if flags is None else {"XLA_FLAGS": flags}
    assert _env_after_conftest(keys=("XLA_FLAGS",), **extra) == {"XLA_FLAGS": want}


def test_this_process_has_no_preallocation():
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" in os.environ
