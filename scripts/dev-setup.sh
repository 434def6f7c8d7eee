#!/usr/bin/env bash
# Creates (or refreshes) a development virtualenv and builds caio into the
# source tree (editable install, native extensions compiled in place).
#   scripts/dev-setup.sh [python] [venv-dir]
set -euo pipefail
PYTHON=${1:-python3}
VENV=${2:-.venv}
cd "$(dirname "$0")/.."

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "dev-setup: interpreter '$PYTHON' not found" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "dev-setup: creating $VENV with $("$PYTHON" -V 2>&1)"
    if ! "$PYTHON" -m venv "$VENV"; then
        # Interpreters without ensurepip (Debian's 3.14 that
        # manylinux/interpreters.sh provisions): its mkvenv helper bootstraps
        # pip from a cached wheel instead.
        MKVENV=${CAIO_INTERP_CACHE:-$HOME/.cache/caio-interpreters}/bin/mkvenv
        rm -rf "$VENV"
        if [ ! -x "$MKVENV" ]; then
            echo "dev-setup: '$PYTHON -m venv' failed; run manylinux/interpreters.sh for a pip bootstrap" >&2
            exit 1
        fi
        "$MKVENV" "$PYTHON" "$VENV"
    fi
fi
STAMP="$VENV/.caio-deps-v3"
if [ ! -f "$STAMP" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # Binary wheels only: recent hypothesis releases ship a pyo3 >= 0.29
    # extension that cannot be built for free-threaded 3.13; pip then picks
    # the newest release with a usable (pure-Python) wheel.
    "$VENV/bin/python" -m pip install -q --only-binary=:all: \
        "setuptools>=70" "setuptools-rust>=1.10" wheel \
        "pytest>=7" pytest-timeout hypothesis
    # caio.trio / caio.anyio and their tests (skipped where these are missing).
    "$VENV/bin/python" -m pip install -q "trio>=0.25" "anyio>=4.11" \
        || echo "dev-setup: trio/anyio unavailable, their tests will be skipped"
    # uvloop has no wheels for every interpreter; the suite uses it when present.
    "$VENV/bin/python" -m pip install -q uvloop || echo "dev-setup: uvloop unavailable, skipping"
    touch "$STAMP"
fi
if ! command -v "${CARGO:-cargo}" >/dev/null 2>&1; then
    echo "dev-setup: cargo not found; install Rust (https://rustup.rs) to build the native backends" >&2
    exit 1
fi
# Release build of the native modules, placed next to the Python sources, with
# the test hooks compiled in (CAIO_TEST_HOOKS=0 builds them as wheels have them).
CAIO_TEST_HOOKS=${CAIO_TEST_HOOKS:-1} CAIO_REQUIRE_RUST=1 \
    "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
