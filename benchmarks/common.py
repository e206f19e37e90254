"""Shared benchmark plumbing: environment info, timing, compiled-memory
analysis, error labels, Markdown tables, JSON results and the README section."""

from __future__ import annotations

import datetime
import json
import math
import platform
import re
import statistics
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR.parent / "README.md"


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------

def env_info() -> dict:
    import jax
    import jaxlib

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            return None

    dev = jax.devices()[0]
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "device_memory_bytes": device_memory_bytes(),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": version("flax"),
            "flashjax": version("flashjax"),
            "python": platform.python_version(),
        },
    }


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def device_memory_bytes() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU backends may not implement it
        return None
    return stats.get("bytes_limit")


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------

def time_call(fn, args, *, warmup: int, reps: int, min_sample_s: float = 0.0) -> dict:
    """Median wall time of `fn(*args)` (blocking on the result) over `reps` samples.

    min_sample_s > 0: a call shorter than that is timed `calls_per_sample` times back to
    back per sample (dispatched together, blocked on once, divided), so that a short
    kernel's time is not dominated by the host's dispatch and wake-up jitter (a 0.3 ms
    attention call measured one at a time varied 0.29-0.52 ms between medians)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    calls = 1
    if min_sample_s > 0:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        one = max(time.perf_counter() - t0, 1e-6)
        calls = int(min(50, max(1, math.ceil(min_sample_s / one))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / calls)
        del outs
    return {"ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "reps": reps,
            "calls_per_sample": calls}


def compiled_memory(compiled) -> dict | None:
    """Sizes from XLA's memory analysis of a compiled executable (None if unavailable)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if ma is None:
        return None
    fields = {
        "temp_bytes": "temp_size_in_bytes",
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "generated_code_bytes": "generated_code_size_in_bytes",
    }
    out = {k: int(getattr(ma, attr)) for k, attr in fields.items() if hasattr(ma, attr)}
    return out or None


def describe_error(exc: BaseException) -> str:
    """A short label for a failed measurement: 'OOM', 'unsupported: ...' or 'error: ...'."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if "resource_exhausted" in low or "out of memory" in low or "oom" in low.split():
        return "OOM"
    if isinstance(exc, NotImplementedError) or any(
        s in low for s in ("not supported", "unsupported", "notimplemented", "not implemented",
                           "no supported", "unimplemented", "not detected", "not available")
    ):
        return f"unsupported: {first}"[:160]
    return f"error: {type(exc).__name__}: {first}"[:160]


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def block_sizes(overrides: dict, what: str):
    """flashjax.BlockSizes() with `overrides`; an unknown field exits naming `what`."""
    import dataclasses

    import flashjax

    try:
        return dataclasses.replace(flashjax.BlockSizes(), **overrides)
    except TypeError as exc:
        fields = [f.name for f in dataclasses.fields(flashjax.BlockSizes)]
        raise SystemExit(f"{what} does not fit flashjax.BlockSizes (fields: {fields}): {exc}")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def results_path(kind: str, device: str, *, quick: bool = False, ext: str = "json") -> Path:
    date = datetime.date.today().isoformat()
    suffix = "-quick" if quick else ""
    return RESULTS_DIR / f"{kind}-{device_slug(device)}-{date}{suffix}.{ext}"


def write_json(data: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    return path


def latest_json(kind: str = "attention", *, include_quick: bool = False) -> Path | None:
    """Newest results file of `kind` (by its 'created' stamp); quick runs skipped unless asked."""
    best, best_key = None, ""
    for path in RESULTS_DIR.glob(f"{kind}-*.json"):
        if kind == "attention" and path.name.startswith("attention-sweep-"):
            continue
        if path.stem.endswith("-quick") and not include_quick:
            continue
        try:
            created = json.loads(path.read_text()).get("created", "")
        except (OSError, ValueError):
            continue
        if created >= best_key:
            best, best_key = path, created
    return best


def replace_between_markers(text: str, start: str, end: str, body: str) -> str:
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"markers {start!r} ... {end!r} not found (in that order)")
    return text[: i + len(start)] + "\n" + body.strip("\n") + "\n" + text[j:]


def update_readme(body: str, section: str = "attention", readme: Path = README) -> Path:
    """Rewrite README's text between <!-- bench:SECTION:start --> and <!-- bench:SECTION:end -->."""
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    readme.write_text(replace_between_markers(readme.read_text(), start, end, body))
    return readme
