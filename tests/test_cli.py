"""The `flashjax` command line: help at every level, errors, lazy subcommands, demo."""

from __future__ import annotations

import sys

import pytest

from flashjax import cli


def _run(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr), whether it returns or exits."""
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_top_level_help_lists_every_subcommand(capsys):
    status, out, _ = _run(["--help"], capsys)
    assert status == 0
    assert "usage: flashjax" in out
    for cmd in cli.SUBCOMMANDS:
        assert cmd.name in out


@pytest.mark.parametrize("name", [c.name for c in cli.SUBCOMMANDS])
def test_subcommand_help(name, capsys):
    status, out, _ = _run([name, "--help"], capsys)
    assert status == 0
    assert f"usage: flashjax {name}" in out


def test_version(capsys):
    import flashjax

    status, out, _ = _run(["--version"], capsys)
    assert status == 0
    assert out.strip() == f"flashjax {flashjax.__version__}"


def test_unknown_subcommand_fails_with_message(capsys):
    status, _, err = _run(["no-such-command"], capsys)
    assert status != 0
    assert "invalid choice" in err and "no-such-command" in err


def test_no_subcommand_prints_help_and_fails(capsys):
    status, _, err = _run([], capsys)
    assert status != 0
    assert "usage: flashjax" in err and "demo" in err


def test_subcommand_targets_are_imported_lazily(capsys):
    """Building the parser and --help must not import a subcommand's module."""
    fake = cli.Subcommand(
        "fake", "a registered-but-missing subcommand",
        lambda p: p.add_argument("--n", type=int, default=1),
        "flashjax_no_such_module.sub:main",
    )
    status, out, _ = _run(["fake", "--help"], capsys)  # default registry: fake is unknown
    assert status != 0
    try:
        status = cli.main(["fake", "--help"], subcommands=[*cli.SUBCOMMANDS, fake])
    except SystemExit as exc:
        status = exc.code
    assert status == 0 and "--n" in capsys.readouterr().out
    assert "flashjax_no_such_module" not in sys.modules
    status = cli.main(["fake", "--n", "2"], subcommands=[*cli.SUBCOMMANDS, fake])
    assert status == 1
    assert "cannot load flashjax_no_such_module.sub:main" in capsys.readouterr().err


def test_demo_smoke(capsys):
    status, out, err = _run(
        ["demo", "--batch", "1", "--seq", "128", "--heads", "2", "--head-dim", "32", "--reps", "1"],
        capsys,
    )
    assert status == 0, out + err
    assert "max |flash - reference|" in out and "OK" in out
    assert "mode:" in out and "ms" in out


def test_demo_rejects_bad_kv_heads(capsys):
    status, _, err = _run(["demo", "--heads", "4", "--kv-heads", "3"], capsys)
    assert status == 2 and "--kv-heads" in err


def test_generate_and_train_and_sample_share_sampling_defaults():
    """One set of sampling defaults (temperature 0.8, top-k 50, top-p off, seed 0) for
    `flashjax generate`, `flashjax train-and-sample` and run_generate's missing options."""
    import argparse

    from flashjax.models.cli_args import add_main_job_arguments
    from flashjax.serving.cli import add_generate_arguments, sampling_params
    from flashjax.serving.sampling import SamplingParams

    gen = vars(add_generate_arguments(argparse.ArgumentParser()).parse_args(["--checkpoint", "x"]))
    job = vars(add_main_job_arguments(argparse.ArgumentParser()).parse_args([]))
    keys = ("temperature", "top_k", "top_p")
    assert {k: gen[k] for k in keys} == {k: job[k] for k in keys} == dict(temperature=0.8, top_k=50, top_p=None)
    assert gen["seed"] == job["sample_seed"] == 0
    want = SamplingParams(temperature=0.8, top_k=50, top_p=1.0, seed=0)
    assert sampling_params(gen) == sampling_params({}) == want
    assert sampling_params(dict(top_k=None, top_p=None, temperature=0)) == SamplingParams(0.0, 0, 1.0, 0)
    assert "--engine" not in add_generate_arguments(argparse.ArgumentParser()).format_help()


def test_compilation_cache_choice():
    """--compilation-cache, then FLASHJAX_COMPILATION_CACHE, then jax's own variable, then
    the default folder under XDG_CACHE_HOME."""
    pick = cli.compilation_cache_dir
    env = {"XDG_CACHE_HOME": "/x"}
    assert pick(None, env) == "/x/flashjax/xla"
    assert pick("/c", env) == "/c"
    assert pick("off", {**env, cli.CACHE_ENV: "/e"}) is None
    assert pick(None, {**env, cli.CACHE_ENV: "/e"}) == "/e"
    assert pick(None, {**env, cli.CACHE_ENV: "OFF"}) is None
    assert pick(None, {**env, "JAX_COMPILATION_CACHE_DIR": "/j"}) is None  # jax uses /j itself


def test_compilation_cache_is_written(tmp_path):
    """A `flashjax` run stores its compiled executables in --compilation-cache."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("FLASHJAX_COMPILATION_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "flashjax.cli", "--compilation-cache", str(cache), "demo",
                        "--batch", "1", "--seq", "128", "--heads", "2", "--head-dim", "32", "--reps", "1"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert any(p.name.endswith("-cache") for p in cache.iterdir()), sorted(p.name for p in cache.iterdir())


def test_compilation_cache_that_cannot_be_created_is_named(tmp_path, capsys):
    """A --compilation-cache folder that cannot be made (a file is in the way) turns the
    cache off with a message naming the folder; the command still runs."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cli.enable_compilation_cache(str(blocker / "cache"))
    err = capsys.readouterr().err
    assert "compilation cache off" in err and str(blocker / "cache") in err
