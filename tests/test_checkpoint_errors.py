"""A damaged checkpoint gives one clear line naming the file and what is wrong.

Each case copies a small checkpoint, damages one file, and runs `flashjax generate`
(and `flashjax serve`) through the CLI: exit status 2 and a single line
`flashjax <cmd>: error: <file> ...` on stderr, with no traceback, no TensorStore
spec dump and no "Event loop is closed" reports from Orbax's leftover reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flax import nnx

from flashjax import cli
from flashjax.models import checkpoint as ckpt
from flashjax.models.config import config_from_preset
from flashjax.models.gpt import build_model
from flashjax.models.tokenizer import Tokenizer

HF_GPT2 = Path(__file__).parent / "data" / "hf" / "gpt2"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A run directory holding a small saved checkpoint (params + optimizer-like state, tokenizer)."""
    cfg = config_from_preset("nano", n_layer=2, d_model=32, n_head=2, vocab_size=300, max_seq_len=64,
                             attention="xla")
    _, params = nnx.split(build_model(cfg, 0))
    tok = Tokenizer.train([f"def f{i}(x): return x + {i}\n" for i in range(200)], 300)
    run = tmp_path_factory.mktemp("ck") / "run"
    ckpt.save_checkpoint(run, params=params, opt_state=(params, params), step=7, config=cfg, tokenizer=tok,
                         train_args={"seed": 0})
    return run


def _copy(good, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(good, run)
    return run


def _cli(capsys, *argv):
    try:
        status = cli.main(list(argv))
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.err


def _generate(capsys, run):
    return _cli(capsys, "generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "1")


def _truncate(f: Path):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _largest_state_file(run: Path) -> Path:
    files = [f for f in (run / "checkpoint" / "state").rglob("*") if f.is_file()]
    return max(files, key=lambda f: f.stat().st_size)


CASES = {
    # name: (damage(run), text the line must hold)
    "config_garbled": (lambda r: (r / "checkpoint/config.json").write_text('{"n_layer": 2,\n'),
                       "checkpoint/config.json is not valid JSON"),
    "config_empty": (lambda r: (r / "checkpoint/config.json").write_text(""), "checkpoint/config.json is not valid JSON"),
    "config_not_object": (lambda r: (r / "checkpoint/config.json").write_text("[1, 2]"),
                          "checkpoint/config.json is not a JSON object"),
    "config_bad_field": (lambda r: (r / "checkpoint/config.json").write_text('{"n_layer": "two"}'),
                         "checkpoint/config.json is not a valid model config"),
    "config_missing": (lambda r: (r / "checkpoint/config.json").unlink(), "config.json missing"),
    "tokenizer_garbled": (lambda r: (r / "checkpoint/tokenizer.json").write_text('{"version": "1.0",\n"mod'),
                          "checkpoint/tokenizer.json is not a valid tokenizer file"),
    "tokenizer_truncated": (lambda r: _truncate(r / "checkpoint/tokenizer.json"),
                            "checkpoint/tokenizer.json is not a valid tokenizer file"),
    "tokenizer_missing": (lambda r: (r / "checkpoint/tokenizer.json").unlink(), "checkpoint/tokenizer.json is missing"),
    "state_metadata_garbled": (lambda r: (r / "checkpoint/state/_METADATA").write_text("{garbage"),
                               "state/_METADATA is not valid JSON"),
    "state_metadata_missing": (lambda r: (r / "checkpoint/state/_METADATA").unlink(),
                               "checkpoint/state (the checkpoint's arrays) could not be read"),
    "state_data_truncated": (lambda r: _truncate(_largest_state_file(r)),
                             "checkpoint/state (the checkpoint's arrays) could not be read"),
    "state_data_emptied": (lambda r: _largest_state_file(r).write_bytes(b""),
                           "checkpoint/state (the checkpoint's arrays) could not be read"),
}


def _assert_one_line(status, err, cmd, must):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flashjax {cmd}: error: "), err
    assert must in lines[0], err
    assert "Traceback" not in err and "tensorstore_spec" not in err and len(lines[0]) < 700, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_checkpoint_generate_one_line(good, tmp_path, capsys, case):
    damage, must = CASES[case]
    run = _copy(good, tmp_path)
    damage(run)
    status, err = _generate(capsys, run)
    _assert_one_line(status, err, "generate", must)


def test_damaged_checkpoint_serve_one_line(good, tmp_path, capsys):
    pytest.importorskip("uvicorn")
    run = _copy(good, tmp_path)
    (run / "checkpoint/tokenizer.json").write_text("not json")
    status, err = _cli(capsys, "serve", "--checkpoint", str(run), "--port", "0")
    _assert_one_line(status, err, "serve", "checkpoint/tokenizer.json is not a valid tokenizer file")


def test_damaged_meta_and_train_json_name_the_file(good, tmp_path):
    run = _copy(good, tmp_path)
    assert ckpt.read_step(run) == 7 and ckpt.read_train_args(run) == {"seed": 0}
    (run / "checkpoint/meta.json").write_text('{"step": ')
    (run / "checkpoint/train.json").write_text('["not", "an object"]')
    with pytest.raises(ValueError, match=r"checkpoint/meta.json is not valid JSON"):
        ckpt.read_step(run)
    with pytest.raises(ValueError, match=r"checkpoint/train.json is not a JSON object"):
        ckpt.read_train_args(run)
    (run / "checkpoint/meta.json").write_text('{"stp": 7}')
    with pytest.raises(ValueError, match=r"checkpoint/meta.json has no valid 'step'"):
        ckpt.read_step(run)


def test_hf_dir_with_damaged_config_names_it(tmp_path, capsys):
    d = tmp_path / "gpt2"
    shutil.copytree(HF_GPT2, d)
    (d / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"],\n')
    status, err = _generate(capsys, d)
    _assert_one_line(status, err, "generate", "gpt2/config.json is not valid JSON")
    (d / "config.json").unlink()
    status, err = _generate(capsys, d)
    _assert_one_line(status, err, "generate", "has safetensors weights but no config.json")


def test_failed_restore_reports_no_event_loop_tracebacks(good, tmp_path, monkeypatch):
    """Orbax's other reads, finishing after the failure, must not print "Event loop is closed"."""
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    run = _copy(good, tmp_path)
    _truncate(_largest_state_file(run))
    _, params_t = nnx.split(build_model(ckpt.read_config(run), 0))
    with pytest.raises(ValueError, match="could not be read"):
        ckpt.load_checkpoint(run, params_template=params_t)
    time.sleep(2)  # the leftover reads finish (and used to report) within this
    assert not [r for r in reports if "Event loop is closed" in str(r.exc_value)]


def test_damaged_state_as_a_process_prints_one_line(good, tmp_path):
    """The whole process's stderr, exit included, is the one line."""
    run = _copy(good, tmp_path)
    _truncate(_largest_state_file(run))
    r = subprocess.run([sys.executable, "-m", "flashjax.cli", "generate", "--checkpoint", str(run),
                        "--prompt", "a", "--max-new-tokens", "1"],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                          "JAX_PLATFORMS": "cpu"})
    _assert_one_line(r.returncode, r.stderr, "generate",
                     "checkpoint/state (the checkpoint's arrays) could not be read")


def test_resume_of_a_damaged_checkpoint_overwrites_nothing(good, tmp_path):
    """`flashjax train --resume` on a run whose checkpoint lost its config.json is an error
    naming the file; before, it said "no checkpoint" and trained over the saved state."""
    from flashjax.models.train import train

    run = tmp_path / "run"
    shutil.copytree(good, run)
    ck = ckpt.find_checkpoint(run)
    (ck / "config.json").unlink()
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    with pytest.raises(ValueError, match=r"config\.json missing.*nothing was overwritten"):
        train(out=str(run), resume=True, steps=1)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
