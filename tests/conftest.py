"""Shared test set-up.

* `rng` fixture: `rng()` gives a fresh jax.random key (`rng(n)` a tuple of n).
  Seeds come from the test's id plus a per-session seed printed in the header;
  rerun with FLASHJAX_TEST_SEED=<that seed> to reproduce a failure.
* `@pytest.mark.gpu`: skipped, with the reason, unless jax's backend is a GPU.
* Hypothesis: a small "cpu" profile by default (HYPOTHESIS_PROFILE picks another).
* Tolerances: `from helpers import tol, assert_close` (tests/helpers.py).
* GPU memory: no preallocation, and under pytest-xdist each worker may use at most
  0.9 / (number of workers) of the GPU, so `bash run.sh test -n 12` fits one GPU
  (set before jax starts a backend; values already in the environment win).
* GPU compiles: XLA's autotuning is off (`--xla_gpu_autotune_level=0` added to
  XLA_FLAGS unless they set a level): it compiles and times candidate GEMM kernels
  for every matmul of every test's references and models, CPU work that decides
  speed, not results. flashjax's own kernels (Pallas) are not autotuned by XLA.
"""

from __future__ import annotations

import os
import random


def gpu_memory_env(environ) -> None:
    """Per-process GPU settings for the test processes (the caller's values win).

    By default every jax process preallocates 75% of the GPU, so a second pytest-xdist
    worker failed with CUDA_ERROR_OUT_OF_MEMORY while creating its client. XLA's
    autotuning is off unless XLA_FLAGS already sets a level (the module docstring says why).
    """
    environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    flags = environ.get("XLA_FLAGS", "")
    if "xla_gpu_autotune_level" not in flags:
        environ["XLA_FLAGS"] = (flags + " --xla_gpu_autotune_level=0").strip()
    if environ.get("PYTEST_XDIST_WORKER"):
        try:
            workers = max(1, int(environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
        except ValueError:
            workers = 1
        environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / workers:.4g}")


gpu_memory_env(os.environ)  # before anything imports jax (the backend reads these when it starts)
# The `flashjax` command keeps a persistent compilation cache under ~/.cache by default;
# tests that call it (in-process or in subprocesses) leave the user's cache alone.
os.environ.setdefault("FLASHJAX_COMPILATION_CACHE", "off")

# No --xla_gpu_deterministic_ops here: on jax 0.11.2 it rewrites scatters in a way that
# corrupts the paged-KV updates (XLA's ScatterDeterminismExpander; cf. jax-ml/jax#27796).
# The one test that needs GPU determinism (exact resume) runs itself in a subprocess
# with the flag.

import pytest

from helpers import KeySeq, derive_seed

_ENV = "FLASHJAX_TEST_SEED"
SESSION_SEED = int(os.environ[_ENV]) if os.environ.get(_ENV) else random.SystemRandom().randrange(2**31)

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "cpu", max_examples=20, deadline=None, derandomize=False,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "gpu", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cpu"))
except ImportError:  # hypothesis is in the [test] extra; tolerate its absence
    pass


def pytest_report_header(config):
    return f"flashjax test seed: {SESSION_SEED} (reproduce with {_ENV}={SESSION_SEED})"


@pytest.fixture
def rng(request) -> KeySeq:
    return KeySeq(derive_seed(SESSION_SEED, request.node.nodeid))


def _backend() -> str:
    import jax

    return jax.default_backend()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    backend = _backend()
    if backend == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU (jax backend is {backend!r})")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and "rng" in getattr(item, "fixturenames", ()):
        report.sections.append((
            "flashjax rng",
            f"{_ENV}={SESSION_SEED} (this test's seed {derive_seed(SESSION_SEED, item.nodeid)})",
        ))
    return report


def pytest_configure(config):
    # Tests compare float32 results to float32/float64 references: on a GPU, XLA
    # would otherwise run plain fp32 matmuls as TF32 (about 1e-3 relative error).
    # Kernels under test set their own precision; this only affects XLA's dots.
    import jax

    if jax.default_backend() == "gpu":
        jax.config.update("jax_default_matmul_precision", "highest")


# FLASHJAX_PROGRESS_LOG=path: append every test's outcome and duration, and each
# failure's traceback, to `path` as soon as it is known (for runs on a remote GPU
# that may be cut off before pytest's own summary is printed).
_PROGRESS_LOG = os.environ.get("FLASHJAX_PROGRESS_LOG")


def pytest_runtest_logreport(report):
    if not _PROGRESS_LOG or (report.when != "call" and report.passed):
        return
    with open(_PROGRESS_LOG, "a") as f:
        f.write(f"{report.outcome.upper():8s} {report.duration:7.1f}s {report.when:8s} {report.nodeid}\n")
        if report.failed:
            f.write(str(report.longrepr)[-6000:] + "\n" + "-" * 80 + "\n")
