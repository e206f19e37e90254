"""Rewrite README.md's benchmark section from a results JSON.

    python benchmarks/readme_table.py            # newest non-quick attention-*.json
    python benchmarks/readme_table.py PATH.json  # a given file (quick runs too)

Replaces the text between <!-- bench:attention:start --> and
<!-- bench:attention:end --> in README.md (for a float16 run: the
bench:attention_float16 markers).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from attention import readme_section, results_kind  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    path = Path(argv[0]) if argv else common.latest_json("attention")
    if path is None:
        print(f"no attention results in {common.RESULTS_DIR} (run benchmarks/attention.py first)",
              file=sys.stderr)
        return 1
    data = json.loads(path.read_text())
    readme = common.update_readme(readme_section(data, path), results_kind(data.get("dtype", "bfloat16")))
    print(f"updated {readme} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
