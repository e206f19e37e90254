"""Write a stub `xprof` package so that tokamax imports without the xprof wheel.

    python benchmarks/tokamax_stub.py DIR      # DIR/xprof/cli/tools.py (+ __init__.py files)
    PYTHONPATH=DIR python benchmarks/attention.py --grid issue19

tokamax (0.0.17) runs `from xprof.cli.tools import get_kernel_stats_tool` at import
time; it uses it only for its own profiling, which the attention benchmark never
calls. On the GPU machine tokamax is carried as wheels, and the xprof wheel (32 MB)
need not be: this stub, with `get_kernel_stats_tool = None`, is all the import
needs. DIR is a site directory (e.g. `python -c 'import sysconfig;
print(sysconfig.get_path("purelib"))'`) or any folder put on PYTHONPATH. An `xprof`
that is already there and is not this stub is left alone (exit status 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

MARKER = "# flashjax benchmarks/tokamax_stub.py: a stand-in for the xprof wheel"
FILES = {
    "xprof/__init__.py": f"{MARKER}\n",
    "xprof/cli/__init__.py": f"{MARKER}\n",
    "xprof/cli/tools.py": f"{MARKER}\n# tokamax imports this name at import time, only for its own profiling.\n"
                          "get_kernel_stats_tool = None\n",
}


def write_xprof_stub(site_dir) -> list[Path]:
    """Writes the stub `xprof` package into `site_dir` and returns the files written.
    Raises FileExistsError when `site_dir` holds an `xprof` that is not this stub."""
    site = Path(site_dir)
    init = site / "xprof" / "__init__.py"
    if (site / "xprof").exists() and not (init.exists() and init.read_text().startswith(MARKER)):
        raise FileExistsError(f"{site / 'xprof'} exists and is not this stub: leaving it alone")
    written = []
    for rel, text in FILES.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        written = write_xprof_stub(argv[0])
    except FileExistsError as exc:
        print(f"tokamax_stub: {exc}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
