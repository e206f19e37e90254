"""A plain (non-editable) `pip install .` gives working flashjax packages.

Builds the repository into a fresh virtual environment in a temp dir, offline:
`--system-site-packages` plus a .pth bridge to this test's own site-packages
let the new venv see jax & co. without downloading, and `--no-deps
--no-build-isolation` keep pip from fetching anything. Then, from another
working directory, the new venv's python must import flashjax,
flashjax.models and flashjax.serving from *its* site-packages (not this source
tree), and its `flashjax` console script must run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flashjax", "flashjax.models", "flashjax.serving")

pytestmark = pytest.mark.slow


def _setuptools_ok() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 68


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _copy_repo(dst: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "venv", "__pycache__", "*.pyc", "build", "dist", "*.egg-info",
        ".pytest_cache", ".hypothesis", "runs", "results", ".whl", ".gl",
    )
    shutil.copytree(REPO, dst, ignore=ignore)
    return dst


def test_pip_install_non_editable(tmp_path):
    if not _setuptools_ok():
        pytest.skip("setuptools>=68 is not installed in the test environment (bash run.sh installs it)")
    src = _copy_repo(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)
    py = env_dir / "bin" / "python"
    new_site = Path(subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True, env=_clean_env(),
    ).strip())
    # When this test itself runs in a venv, --system-site-packages only reaches the
    # base interpreter's packages: bridge to every site dir this process sees
    # (appended after the new venv's own; never the source tree).
    here = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")] + [
        p for p in sys.path if "-packages" in os.path.basename(p.rstrip("/"))
    ]
    here = [p for p in dict.fromkeys(here) if os.path.isdir(p) and Path(p).resolve() != REPO]
    (new_site / "_flashjax_test_deps.pth").write_text("\n".join(here) + "\n")

    cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
           "--no-deps", "--no-build-isolation", "--no-index", str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import importlib, json, sys\n"
        f"mods = {list(PACKAGES)!r}\n"
        "print(json.dumps({m: importlib.import_module(m).__file__ for m in mods}))\n"
    )
    proc = subprocess.run([py, "-c", probe], capture_output=True, text=True, env=_clean_env(), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    for mod, file in files.items():
        path = Path(file).resolve()
        assert path.is_relative_to(new_site.resolve()), f"{mod} loaded from {path}, not {new_site}"
        assert not path.is_relative_to(REPO), f"{mod} loaded from the source tree: {path}"

    script = env_dir / "bin" / "flashjax"
    assert script.exists(), "console script `flashjax` was not installed"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, env=_clean_env(), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert "usage: flashjax" in proc.stdout and "demo" in proc.stdout


@pytest.mark.parametrize("min_free_gb,want_hf", [(0, True), (10**9, False)])
def test_run_sh_leaves_hf_out_when_disk_is_short(tmp_path, min_free_gb, want_hf):
    """`bash run.sh extras`: with an interpreter that has no torch, the hf extra (torch's
    ~9 GB CUDA wheel) is chosen only with FLASHJAX_HF_MIN_FREE_GB free, else left out
    with a note that says why and how to force it."""
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copy(REPO / "run.sh", root / "run.sh")
    bare = tmp_path / "bare"  # no torch, no jax: a fresh, non-system-site set-up
    venv.EnvBuilder(with_pip=False, symlinks=True).create(bare)
    env = _clean_env() | {"PYTHON": str(bare / "bin" / "python"), "FLASHJAX_HF_MIN_FREE_GB": str(min_free_gb)}
    for k in ("FLASHJAX_EXTRAS", "FLASHJAX_SYSTEM_SITE"):
        env.pop(k, None)
    r = subprocess.run(["bash", str(root / "run.sh"), "extras"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    extras = r.stdout.strip().split(",")
    assert extras[:2] == ["test", "serve"]
    assert ("hf" in extras) == want_hf
    assert not (root / ".venv").exists()  # `extras` sets nothing up
    if want_hf:
        assert "Leaving out the hf extra" not in r.stderr
    else:
        assert "Leaving out the hf extra" in r.stderr and f"FLASHJAX_HF_MIN_FREE_GB={min_free_gb}" in r.stderr
        assert "FLASHJAX_EXTRAS=test,serve,hf" in r.stderr
