"""Training on CPU with tiny models: the loss falls, resume is exact,
checkpoints refuse another config, gradient accumulation, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from flashjax.models import checkpoint as ckpt
from flashjax.models.config import config_from_preset
from flashjax.models.gpt import GPT
from flashjax.models.train import train

TINY_SET = ["n_layer=1", "d_model=32", "n_head=2", "vocab_size=300", "max_seq_len=64", "attention=xla"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small, learnable text: templated Python-ish lines."""
    rng = np.random.default_rng(0)
    names = ["alpha", "beta", "gamma", "delta", "count", "value", "index", "total"]
    lines = []
    for _ in range(1500):
        a, b = rng.choice(names, 2)
        lines.append(f"def {a}_{b}(x):\n    return x + {int(rng.integers(10))}\n")
    path = tmp_path_factory.mktemp("corpus") / "code.txt"
    path.write_text("".join(lines))
    return path


STEPS = 30  # every train() below uses this schedule, so the compiled step is shared


def tiny_args(corpus, out, **kw):
    d = dict(preset="nano", set=list(TINY_SET), data=str(corpus), out=str(out), batch_size=8, seq_len=32,
             steps=STEPS, lr=1e-2, warmup=3, eval_interval=10, eval_batches=1, ckpt_interval=100, progress=False)
    d.update(kw)
    return d


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, train(tiny_args(corpus, out))


def test_loss_falls(full_run):
    out, r = full_run
    losses = [r["losses"][s] for s in sorted(r["losses"])]
    assert losses[0] > 5.0  # ~ln(300) at init
    assert np.mean(losses[-5:]) < losses[0] - 2.0, losses
    assert r["val_losses"][STEPS] < losses[0] - 2.0
    assert sorted(r["val_losses"]) == [10, 20, 30]
    assert (out / "loss.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in rows] == list(range(1, STEPS + 1))
    assert (out / "checkpoint" / "tokenizer.json").is_file()
    assert json.loads((out / "checkpoint" / "config.json").read_text())["n_layer"] == 1
    assert ckpt.read_step(out) == STEPS


DET_FLAG = "--xla_gpu_deterministic_ops=true"


def test_resume_is_exact(request, corpus, tmp_path):
    if jax.default_backend() == "gpu" and DET_FLAG not in os.environ.get("XLA_FLAGS", ""):
        # Bit-for-bit on a GPU needs XLA's deterministic scatter-add (the embedding
        # gradient), a process-wide flag: run this very test again in a process with it.
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + DET_FLAG).strip())
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                            f"{__file__}::test_resume_is_exact"], env=env, capture_output=True, text=True,
                           timeout=1200)
        assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
        return
    full_out, full = request.getfixturevalue("full_run")
    part = train(tiny_args(corpus, tmp_path / "part", stop_at=12))
    assert sorted(part["losses"]) == list(range(1, 13)) and ckpt.read_step(tmp_path / "part") == 12
    # resume with no other arguments: everything comes from the checkpoint
    rest = train(out=str(tmp_path / "part"), resume=True, progress=False)
    assert sorted(rest["losses"]) == list(range(13, STEPS + 1))
    for step in range(1, STEPS + 1):
        got = part["losses"].get(step, rest["losses"].get(step))
        assert got == full["losses"][step], (step, got, full["losses"][step])  # bit-for-bit
    assert rest["val_losses"][STEPS] == full["val_losses"][STEPS]
    # metrics of the resumed run cover each step once
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # the checkpoints hold identical parameters
    cfg = ckpt.read_config(full_out)
    _, tmpl = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    pa, _, sa = ckpt.load_checkpoint(full_out, params_template=tmpl)
    pb, _, sb = ckpt.load_checkpoint(tmp_path / "part", params_template=tmpl)
    assert sa == sb == STEPS
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_guards(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_args(corpus, out, stop_at=2))
    # another model config -> one-line error naming the field
    with pytest.raises(ValueError) as e:
        train(tiny_args(corpus, out, resume=True, set=TINY_SET + ["n_layer=2"]))
    assert "n_layer=1 vs 2" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="different model config"):
        ckpt.check_config(out, config_from_preset("nano"))
    # runtime fields may change
    ckpt.check_config(out, ckpt.read_config(out).replace(attention="flash", dtype="bfloat16", remat=True))
    # a trajectory argument that differs -> error
    with pytest.raises(ValueError, match="lr=0.5 differs"):
        train(tiny_args(corpus, out, resume=True, lr=0.5))
    # an existing checkpoint without --resume -> error
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(tiny_args(corpus, out))
    # templates of another shape -> error, not garbage
    other = config_from_preset("nano")
    _, tmpl = nnx.split(nnx.eval_shape(lambda: GPT(other, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match="does not fit this model"):
        ckpt.load_checkpoint(out, params_template=tmpl)
    with pytest.raises(ValueError, match="no checkpoint"):
        ckpt.read_config(tmp_path / "nothing")

    # a save that died half-way leaves a temporary directory behind: ignored
    (out / ".checkpoint.tmp").mkdir()
    (out / ".checkpoint.tmp" / "junk").write_text("partial")
    assert ckpt.find_checkpoint(out) == out / "checkpoint" and ckpt.read_step(out) == 2
    # a crash between the two renames leaves only the old one: still found
    (out / "checkpoint").rename(out / ".checkpoint.old")
    assert ckpt.read_step(out) == 2
    train(tiny_args(corpus, out, resume=True, stop_at=3))
    assert ckpt.find_checkpoint(out) == out / "checkpoint" and ckpt.read_step(out) == 3
    assert not (out / ".checkpoint.old").exists() and not (out / ".checkpoint.tmp").exists()


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path, full_run):
    """2 micro-batches of 4 see the same 8 sequences as one batch of 8: same losses."""
    _, full = full_run
    acc = train(tiny_args(corpus, tmp_path / "acc", grad_accum=2, stop_at=4))
    for step in range(1, 5):
        np.testing.assert_allclose(acc["losses"][step], full["losses"][step], rtol=2e-5)


def _cli(capsys, *argv):
    """Run a CLI command in-process (through `flashjax.cli` once it has the
    subcommand, else `python -m flashjax.models`'s main); (status, stdout, stderr)."""
    from flashjax.cli import SUBCOMMANDS
    from flashjax.cli import main as flashjax_main
    from flashjax.models.cli import main as models_main

    main = flashjax_main if any(c.name == argv[0] for c in SUBCOMMANDS) else models_main
    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_train_then_generate(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    sets = [a for s in TINY_SET for a in ("--set", s)]
    status, _, err = _cli(capsys, "train", "--preset", "nano", *sets, "--steps", "3", "--out", str(out),
                          "--data", str(corpus), "--batch-size", "4", "--seq-len", "32", "--no-progress")
    assert status == 0, err
    assert (out / "checkpoint" / "config.json").is_file() and (out / "loss.png").is_file()
    status, stdout, err = _cli(capsys, "generate", "--checkpoint", str(out), "--prompt", "def ",
                               "--max-new-tokens", "5", "--seed", "1")
    assert status == 0, err
    assert stdout.startswith("def ") and len(stdout) > len("def ")
    status, _, err = _cli(capsys, "train", "--preset", "gpt5", "--out", str(tmp_path / "x"))
    assert status == 2 and "unknown preset 'gpt5'" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    status, _, err = _cli(capsys, "generate", "--checkpoint", str(tmp_path / "nothing"))
    assert status == 2 and "no checkpoint found" in err



def test_train_and_sample_samples_like_generate(corpus, tmp_path, capsys):
    """`flashjax train-and-sample` samples through `flashjax generate`'s path: the same
    checkpoint, prompt and seed give the same text (temperature > 0, default top-k)."""
    out = tmp_path / "job"
    sets = [a for s in TINY_SET for a in ("--set", s)]
    sampling = ["--prompt", "def ", "--max-new-tokens", "12", "--temperature", "1.0"]
    status, stdout, err = _cli(capsys, "train-and-sample", *sets, "--steps", "3", "--out", str(out),
                               "--data", str(corpus), "--batch-size", "4", "--seq-len", "32", "--no-progress",
                               *sampling, "--sample-seed", "3")
    assert status == 0, err
    head = "\n--- sample (prompt 'def ', temperature 1.0) ---\n"
    assert head in stdout and stdout.endswith("\n---\n"), stdout
    sample = stdout[stdout.index(head) + len(head): -len("---\n")]
    assert sample.startswith("def ") and len(sample) > len("def \n")
    status, generated, err = _cli(capsys, "generate", "--checkpoint", str(out), *sampling, "--seed", "3")
    assert status == 0, err
    assert generated == sample
    # `python -m flashjax.models generate` is the same command
    status, again, err = _cli(capsys, "generate", "--checkpoint", str(out), *sampling, "--seed", "3",
                              "--engine", "paged")  # the removed option's only path: accepted
    assert status == 0 and again == sample, err
    from flashjax.models.cli import main as models_main

    capsys.readouterr()
    assert models_main(["generate", "--checkpoint", str(out), *sampling, "--seed", "3"]) == 0
    assert capsys.readouterr().out == sample
    # another seed, another sample (the seed reaches the sampler)
    status, other, err = _cli(capsys, "generate", "--checkpoint", str(out), *sampling, "--seed", "4")
    assert status == 0 and other != sample, err


def test_generate_engine_dense_is_an_error(tmp_path, capsys):
    """--engine dense was removed: one line naming the benchmark peer, before loading anything."""
    status, stdout, err = _cli(capsys, "generate", "--checkpoint", str(tmp_path / "nothing"), "--engine", "dense")
    assert status == 2 and stdout == ""
    assert err.startswith("flashjax generate: error: --engine dense was removed") and "benchmarks/generate.py" in err
    assert len(err.strip().splitlines()) == 1, err

def test_cli_entry_point_runs_as_a_process():
    """`python -m flashjax.models --help` works in a fresh interpreter (cheap)."""
    r = subprocess.run([sys.executable, "-m", "flashjax.models", "train", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout
