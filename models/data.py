"""Training corpus, train/validation split and deterministic batches.

The default corpus is the running interpreter's standard library (*.py files,
sorted by path), capped at `max_bytes`. Batches are a pure function of
(seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from pathlib import Path

import numpy as np

from flashjax.models.cli_args import DEFAULT_MAX_BYTES  # noqa: E402  (one source of truth)
# Not library code: installed packages, test suites, codec tables, pydoc's text dump.
_SKIP_DIRS = {
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
    "encodings", "pydoc_data",
}


def stdlib_files() -> list[Path]:
    """The standard library's *.py files (library code only), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _spread(files: list[Path], max_bytes: int | None) -> list[Path]:
    """A deterministic subset of at most ~max_bytes spread over the whole sorted list
    (every k-th file first, then the next offset, ...), returned in sorted order."""
    sizes = []
    for f in files:
        try:
            sizes.append(f.stat().st_size)
        except OSError:
            sizes.append(0)
    total = sum(sizes)
    if not max_bytes or total <= max_bytes:
        return files
    k = -(-total // max_bytes)
    chosen, used = [], 0
    for offset in range(k):
        for i in range(offset, len(files), k):
            if used >= max_bytes:
                break
            chosen.append(i)
            used += sizes[i]
    return [files[i] for i in sorted(chosen)]


def _text_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in filenames:
            if not name.startswith("."):
                out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in raw[:8192]:
        return None  # binary
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_corpus(data: str | os.PathLike | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[str]:
    """Documents (strings) of the corpus, in a deterministic order.

    `data`: None for the standard library's Python sources (library code, no
    tests; with a cap, files spread over the whole library), else a UTF-8 text
    file or a directory (all its UTF-8 text files, recursively, sorted).
    `max_bytes` caps the total size (the last document is cut); None or 0: no cap.
    Raises a one-line ValueError for a missing, unreadable or empty corpus.
    """
    if data is None:
        files = _spread(stdlib_files(), max_bytes)
        where = f"the standard library ({sysconfig.get_paths()['stdlib']})"
    else:
        path = Path(data)
        where = str(path)
        if not path.exists():
            raise ValueError(f"--data {path}: no such file or directory")
        if path.is_dir():
            files = _text_files(path)
        else:
            text = _read_text(path)
            if text is None:
                raise ValueError(f"--data {path}: not a readable UTF-8 text file")
            files = [path]
    docs: list[str] = []
    total = 0
    for f in files:
        text = _read_text(f)
        if not text:
            continue
        if max_bytes:
            room = max_bytes - total
            if room <= 0:
                break
            raw = text.encode("utf-8")
            if len(raw) > room:
                text = raw[:room].decode("utf-8", errors="ignore")
        docs.append(text)
        total += len(text.encode("utf-8"))
    if not docs or total == 0:
        raise ValueError(f"corpus is empty: no readable UTF-8 text in {where}")
    return docs


@dataclasses.dataclass
class TokenData:
    train: np.ndarray  # int32 token stream
    val: np.ndarray


def split_tokens(tokens: np.ndarray, val_fraction: float, seq_len: int) -> TokenData:
    """The last `val_fraction` of the stream is validation (at least one window)."""
    need = seq_len + 1
    n_val = max(int(len(tokens) * val_fraction), need) if val_fraction > 0 else 0
    if len(tokens) - n_val < need:
        raise ValueError(
            f"corpus too small: {len(tokens)} tokens cannot give train and validation windows of "
            f"{need} tokens (lower --seq-len or add data)"
        )
    cut = len(tokens) - n_val
    return TokenData(train=tokens[:cut], val=tokens[cut:])


def batch_starts(n_tokens: int, seq_len: int, seed: int, step: int, count: int) -> np.ndarray:
    """Random window starts for training step `step`: a pure function of (seed, step)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step), 0x5EED]))
    return rng.integers(0, n_tokens - seq_len, size=count)


def get_batch(tokens: np.ndarray, seq_len: int, seed: int, step: int, shape: tuple[int, ...]):
    """(inputs, targets), each int32 of `shape + (seq_len,)`, for training step `step`."""
    count = int(np.prod(shape))
    starts = batch_starts(len(tokens), seq_len, seed, step, count)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    windows = tokens[idx].reshape(*shape, seq_len + 1)
    return windows[..., :-1].astype(np.int32), windows[..., 1:].astype(np.int32)


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int):
    """Fixed validation batches: evenly spaced windows over the validation stream."""
    n_windows = max(1, (len(tokens) - 1) // seq_len)
    n_batches = max(1, min(max_batches, n_windows // batch_size))
    count = n_batches * batch_size  # full batches only (windows may overlap when data is short)
    span = len(tokens) - seq_len - 1
    starts = np.linspace(0, span, num=count).astype(np.int64)
    out = []
    for i in range(0, count, batch_size):
        s = starts[i : i + batch_size]
        idx = s[:, None] + np.arange(seq_len + 1)[None, :]
        w = tokens[idx]
        out.append((w[:, :-1].astype(np.int32), w[:, 1:].astype(np.int32)))
    return out
