#!/usr/bin/env bash
# flashjax: set up a virtual environment, then run the main job or the tests.
#
#   bash run.sh [ARGS]      set up .venv, then run the main job (main_job below)
#   bash run.sh test [ARGS] set up .venv, then: python -m pytest -q tests [ARGS]
#                           (if ARGS name test files/dirs, those replace `tests`)
#   bash run.sh extras      print the pip extras set-up would install (and why
#                           any is left out); changes nothing
#
# Environment knobs (all optional):
#   PYTHON=/path/to/python3.12   interpreter to build .venv from (>= 3.12)
#   FLASHJAX_EXTRAS=test,hf,gpu  pip extras to install (default: test, serve and hf
#                                (torch, transformers, safetensors for the Hugging
#                                Face checkpoint tests), plus gpu when nvidia-smi
#                                sees a GPU; in system-site mode hf only when the
#                                interpreter already has torch and transformers, and
#                                otherwise only with FLASHJAX_HF_MIN_FREE_GB (12) free)
#   FLASHJAX_WHEELS=DIR          wheels to install from before the index (default .whl/
#                                when it exists: carried to machines that cannot download)
#   FLASHJAX_SYSTEM_SITE=0|1     build .venv with --system-site-packages
#                                (default: 1 when the interpreter already has
#                                jax 0.11.2, e.g. the preinstalled CUDA jax on
#                                GPU machines that cannot download anything)
set -euo pipefail

# ---- The main job (`bash run.sh [ARGS]`): change these two when it changes ----
# Trains the `nano` GPT on the embedded corpus (the standard library's source) for a
# few minutes on CPU, checkpoints it under runs/nano, then prints a sampled completion.
MAIN_JOB_DESC="flashjax train-and-sample (nano GPT on the stdlib corpus, then a sample)"
main_job() {
    flashjax train-and-sample "$@"
}
# -------------------------------------------------------------------------------

MIN_PY_MAJOR=3
MIN_PY_MINOR=12
JAX_PIN="0.11.2"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.flashjax-setup"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }

# Prints the interpreter's absolute path if it runs, is >= 3.12 and can make venvs;
# a second word "jax" when it already has jax==$JAX_PIN installed.
probe_python() {
    local cand="$1"
    [ -n "$cand" ] || return 1
    command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || return 1
    # Running it is the only honest check: pyenv shims exist on PATH but fail
    # unless their version is selected.
    "$cand" - "$MIN_PY_MAJOR" "$MIN_PY_MINOR" "$JAX_PIN" 2>/dev/null <<'EOF' || return 1
import os, sys
need = (int(sys.argv[1]), int(sys.argv[2]))
if sys.version_info[:2] < need:
    sys.exit(1)
import venv, ensurepip  # noqa: F401  (Debian splits these into python3-venv)
from importlib import metadata
try:
    has_jax = metadata.version("jax") == metadata.version("jaxlib") == sys.argv[3]
except metadata.PackageNotFoundError:
    has_jax = False
print(os.path.abspath(sys.executable) + (" jax" if has_jax else ""))
EOF
}

# Candidates, in order of preference.
python_candidates() {
    local root d
    printf '%s\n' python3.14 python3.13 python3.12 python3
    local dirs=()
    if command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null)"; then
        dirs+=("$root/versions")
    fi
    dirs+=("$HOME/.pyenv/versions")
    for d in "${dirs[@]}"; do
        [ -d "$d" ] && ls -d "$d"/*/bin/python3 2>/dev/null | sort -V -r  # newest first
    done
    if command -v uv >/dev/null 2>&1; then
        uv python find ">=$MIN_PY_MAJOR.$MIN_PY_MINOR" 2>/dev/null || true
    fi
}

# The first working candidate, but one that already has jax==$JAX_PIN wins
# (e.g. a GPU image's preinstalled CUDA jax on a machine that cannot download).
find_python() {
    local cand found first=""
    if [ -n "${PYTHON:-}" ]; then
        found="$(probe_python "$PYTHON")" || return 1
        echo "${found% jax}"
        return 0
    fi
    while IFS= read -r cand; do
        [ -n "$cand" ] || continue
        found="$(probe_python "$cand")" || continue
        case "$found" in
            *" jax") echo "${found% jax}"; return 0 ;;
        esac
        [ -n "$first" ] || first="$found"
    done < <(python_candidates)
    [ -n "$first" ] || return 1
    echo "$first"
}

no_python_help() {
    cat >&2 <<EOF
run.sh: error: flashjax needs Python >= $MIN_PY_MAJOR.$MIN_PY_MINOR (with the venv module), and none was found.
Looked at: \$PYTHON, python3.14, python3.13, python3.12 and python3 on PATH,
pyenv's versions (\$(pyenv root)/versions/*, ~/.pyenv/versions/*) and \`uv python find\`.
Get one, then run this again, for example:
  pyenv install 3.12          (then: pyenv shell 3.12, or PYTHON=\$(pyenv root)/versions/3.12.*/bin/python3)
  uv python install 3.12      (uv then finds it)
  sudo apt install python3.12 python3.12-venv   (or your distribution's package)
  PYTHON=/path/to/python3.12 bash run.sh ...
EOF
    exit 1
}

# hf: torch + transformers for tests/test_hf.py. A system-site interpreter that may be
# offline gets it only when it already has them, so pip has nothing to download.
# Elsewhere it needs disk: torch's PyPI wheel for Linux is a CUDA build (torch, triton
# and nvidia-* libraries: about 6 GB installed, 3 GB more while pip unpacks). With less
# free than FLASHJAX_HF_MIN_FREE_GB (default 12) it is left out: test_hf.py then skips,
# saying so, and test_hf_golden.py still checks checkpoint loading against numbers
# transformers wrote (tests/data/hf). Succeeds when hf should be installed.
want_hf() {
    local py="$1" system_site="$2" free_gb mount min_gb="${FLASHJAX_HF_MIN_FREE_GB:-12}"
    if "$py" -c 'import torch, transformers, safetensors, jinja2' >/dev/null 2>&1 \
        || { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import torch, transformers' >/dev/null 2>&1; }; then
        return 0
    fi
    [ "$system_site" = 0 ] || return 1
    read -r free_gb mount < <(df -Pk "$ROOT" 2>/dev/null | awk 'NR == 2 { printf "%d %s\n", $4 / 1048576, $6 }') || true
    if [ -z "${free_gb:-}" ] || [ "$free_gb" -ge "$min_gb" ]; then
        return 0
    fi
    say "Leaving out the hf extra (torch + transformers, about 9 GB to install): only ${free_gb} GB free"
    say "  on $mount, FLASHJAX_HF_MIN_FREE_GB=$min_gb. tests/test_hf.py will skip; tests/test_hf_golden.py"
    say "  still checks checkpoints against transformers' numbers. Force it: FLASHJAX_EXTRAS=test,serve,hf"
    return 1
}

# Sets py, py_base, system_site and want_extras: the interpreter and what to install.
choose_setup() {
    if [ -n "${PYTHON:-}" ] && ! probe_python "$PYTHON" >/dev/null; then
        die "PYTHON=$PYTHON is not a working Python >= $MIN_PY_MAJOR.$MIN_PY_MINOR with the venv module (unset it to search)."
    fi
    py="$(find_python)" || no_python_help
    say "Python: $py ($("$py" -c 'import platform; print(platform.python_version())'))"
    py_base="$("$py" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')"

    system_site="${FLASHJAX_SYSTEM_SITE:-}"
    if [ -z "$system_site" ]; then
        if "$py" -c "import jax, sys; sys.exit(jax.__version__ != '$JAX_PIN')" >/dev/null 2>&1; then
            system_site=1
        else
            system_site=0
        fi
    fi
    want_extras="${FLASHJAX_EXTRAS:-}"
    if [ -z "$want_extras" ]; then
        want_extras="test"
        # serve: fastapi, uvicorn, httpx for the HTTP server and tests/test_server.py
        # (small, pure Python; a system-site interpreter gets it only if it has them).
        if [ "$system_site" = 0 ] || "$py" -c 'import fastapi, uvicorn, httpx' >/dev/null 2>&1 \
            || ls "${FLASHJAX_WHEELS:-$ROOT/.whl}"/fastapi-*.whl >/dev/null 2>&1; then
            want_extras="$want_extras,serve"
        fi
        if want_hf "$py" "$system_site"; then
            want_extras="$want_extras,hf"
        fi
        # Outside system-site mode a GPU needs the CUDA plugin from pip.
        if [ "$system_site" = 0 ] && command -v nvidia-smi >/dev/null 2>&1 \
            && nvidia-smi -L >/dev/null 2>&1; then
            want_extras="$want_extras,gpu"
        fi
    fi
}

setup_venv() {
    local stamp_now venv_base
    choose_setup

    # (Re)create .venv when missing, broken, or built from another interpreter.
    if [ -x "$VENV/bin/python" ]; then
        venv_base="$("$VENV/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))' 2>/dev/null || true)"
        local old_py="" old_site=""
        if [ -f "$STAMP" ]; then
            old_py="$(sed -n 's/^python=//p' "$STAMP")"
            old_site="$(sed -n 's/^system_site=//p' "$STAMP")"
        fi
        if [ "$venv_base" != "$py_base" ] || { [ -n "$old_py" ] && [ "$old_py" != "$py" ]; } \
            || { [ -n "$old_site" ] && [ "$old_site" != "$system_site" ]; }; then
            say "Rebuilding .venv (it was made by ${old_py:-${venv_base:-a broken interpreter}}${old_site:+, system_site=$old_site})"
            rm -rf "$VENV"
        fi
    elif [ -e "$VENV" ]; then
        say "Rebuilding .venv (no working bin/python in it)"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "Creating .venv"
        local venv_args=()
        [ "$system_site" = 1 ] && venv_args+=(--system-site-packages)
        "$py" -m venv "${venv_args[@]}" "$VENV" || die "could not create .venv with $py"
        if [ "$system_site" = 1 ]; then
            # --system-site-packages reaches only the *base* interpreter's packages;
            # when $py is itself a venv (e.g. a GPU image's preinstalled jax), a .pth
            # file chains its site-packages in after .venv's own.
            "$py" - "$VENV" <<'EOF' || die "could not link $py's packages into .venv"
import os, subprocess, sys, sysconfig
if sys.prefix != sys.base_prefix:
    paths = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    venv_py = os.path.join(sys.argv[1], "bin", "python")
    site = subprocess.check_output(
        [venv_py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip()
    with open(os.path.join(site, "_flashjax_parent_env.pth"), "w") as f:
        f.write("\n".join(paths) + "\n")
EOF
        fi
    fi

    # Install (again) only when something that matters changed.
    stamp_now="python=$py
system_site=$system_site
extras=$want_extras
pyproject=$(cksum < pyproject.toml)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp_now" ] \
        && "$VENV/bin/python" -c 'import flashjax' >/dev/null 2>&1; then
        return 0
    fi
    local log="$VENV/pip-install.log"
    local pip_args=(-q --no-cache-dir)  # no wheel cache: torch's would double its disk use
    if [ "$system_site" = 1 ] && "$VENV/bin/python" -c \
        'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' >/dev/null 2>&1; then
        # Offline-friendly: build with the setuptools that is already there.
        pip_args+=(--no-build-isolation)
    fi
    say "Installing flashjax[$want_extras] into .venv (first time: downloads jax etc., a minute or two; log: .venv/pip-install.log)"
    rm -f "$STAMP"
    # Wheels carried to a machine that cannot download (the GPU machines): a `.whl/`
    # folder next to this script (or FLASHJAX_WHEELS=DIR) is searched before the index.
    local wheels="${FLASHJAX_WHEELS:-$ROOT/.whl}"
    [ -d "$wheels" ] && pip_args+=(--find-links "$wheels")
    if [ "$system_site" = 1 ] && [ -z "${PIP_INDEX_URL:-}${HTTPS_PROXY:-}${https_proxy:-}" ] && ! "$VENV/bin/python" -c \
        'import socket; socket.create_connection(("pypi.org", 443), timeout=5).close()' >/dev/null 2>&1; then
        # No index to reach: say so to pip at once (it would retry every lookup for minutes)
        say "pypi.org is out of reach: installing from what is here${wheels:+ (and $wheels)}"
        pip_args+=(--no-index)
    fi
    if ! {
        # setuptools in the venv lets tests build the package offline (tests/test_install.py).
        "$VENV/bin/python" -m pip install "${pip_args[@]}" "setuptools>=68" \
            && "$VENV/bin/python" -m pip install "${pip_args[@]}" -e ".[$want_extras]"
    } >"$log" 2>&1; then
        if [ "$system_site" != 1 ]; then
            tail -n 30 "$log" >&2
            die "pip install failed (full log: $log)"
        fi
        # Offline with a preinstalled jax: install flashjax itself, then each extra's
        # requirement that can be had; the tests of what is missing skip (and say so).
        say "Some extras are not installable here (offline?); installing flashjax and what is available"
        "$VENV/bin/python" -m pip install "${pip_args[@]}" --no-deps -e . >>"$log" 2>&1 \
            || { tail -n 30 "$log" >&2; die "pip install failed (full log: $log)"; }
        local req missing=()
        for req in $("$VENV/bin/python" - "$want_extras" <<'PYEOF'
import sys, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
for e in sys.argv[1].split(","):
    print(*[r.replace(" ", "") for r in extras.get(e, [])], sep="\n")
PYEOF
        ); do
            "$VENV/bin/python" -m pip install "${pip_args[@]}" "$req" >>"$log" 2>&1 || missing+=("$req")
        done
        [ ${#missing[@]} -eq 0 ] || say "Not installed (their tests skip): ${missing[*]}"
    fi
    printf '%s\n' "$stamp_now" >"$STAMP"
    say "Installed: $("$VENV/bin/python" -c 'import jax, flashjax; print(f"flashjax {flashjax.__version__}, jax {jax.__version__}, backend {jax.default_backend()}")' 2>/dev/null)"
}

run_tests() {
    # Default target is `tests`; explicit test paths given as arguments replace it.
    local arg target=(tests)
    for arg in "$@"; do
        case "$arg" in
            -*) ;;
            *) if [ -e "${arg%%::*}" ]; then target=(); break; fi ;;
        esac
    done
    exec "$VENV/bin/python" -m pytest -q "${target[@]}" "$@"
}

if [ "${1:-}" = extras ]; then  # what set-up would install, and why; changes nothing
    choose_setup
    echo "$want_extras"
    exit 0
fi

# One set-up at a time per checkout (parallel runs would race on .venv).
if command -v flock >/dev/null 2>&1; then
    exec 9>"${TMPDIR:-/tmp}/flashjax-run-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1).lock"
    flock 9
fi
setup_venv
if command -v flock >/dev/null 2>&1; then
    flock -u 9
    exec 9>&-
fi
export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1

case "${1:-}" in
    test)
        shift
        say "Running the test suite"
        run_tests "$@"
        ;;
    *)
        say "Running the main job: $MAIN_JOB_DESC"
        main_job "$@"
        ;;
esac
