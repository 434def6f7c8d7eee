#!/usr/bin/env bash
# Python gates: ruff lint, ruff format check, mypy --strict (caio/ and its .pyi stubs) and
# mypy.stubtest of the stubs against the built native modules.
#   scripts/lint.sh [venv]        (default: .venv, as made by `make develop`)
# Installs the pinned ruff and mypy into the venv when they are missing (or another version).
# Runs every check, then exits non-zero if any of them found something (2: no venv). Settings:
# pyproject.toml ([tool.ruff], [tool.ruff.lint], [tool.mypy]); stubtest's allowlist:
# scripts/stubtest-allowlist.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-.venv}
RUFF_VERSION=0.17.6
MYPY_VERSION=2.4.1
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "lint: no virtualenv at $VENV (make develop creates .venv)" >&2
    exit 2
fi

installed() { # name version
    [ "$("$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')" = "$2" ]
}
if ! installed ruff "$RUFF_VERSION" || ! installed mypy "$MYPY_VERSION"; then
    echo "lint: installing ruff==$RUFF_VERSION mypy==$MYPY_VERSION into $VENV"
    "$PY" -m pip install -q "ruff==$RUFF_VERSION" "mypy==$MYPY_VERSION" || exit 2
fi

failed=()
step() { # name command...
    local name=$1
    shift
    printf '\n==> %s\n' "$name"
    if ! "$@"; then
        failed+=("$name")
    fi
}

step "ruff check" "$PY" -m ruff check .
step "ruff format --check" "$PY" -m ruff format --check .
step "mypy (strict)" "$PY" -m mypy

# stubtest imports the modules it checks, so it needs the built native modules (all three on
# Linux; thread_aio alone elsewhere).
BUILT=$("$PY" -c '
import importlib
for name in ("linux_uring", "linux_aio", "thread_aio"):
    try:
        importlib.import_module("caio." + name)
    except ImportError:
        continue
    print("caio." + name)
' 2>/dev/null | tr '\n' ' ')
if [ -z "$BUILT" ]; then
    printf '\n==> stubtest: SKIPPED, no native module is built here (caio.linux_uring,\n'
    printf '    caio.linux_aio, caio.thread_aio); `make develop` (needs cargo) builds them.\n'
elif [ "$BUILT" = "caio.linux_uring caio.linux_aio caio.thread_aio " ]; then
    # shellcheck disable=SC2086  # the module list is split on purpose
    step "stubtest" "$PY" -m mypy.stubtest --allowlist scripts/stubtest-allowlist.txt $BUILT
else
    printf '\n==> stubtest: only %sare built here; checking those\n' "$BUILT"
    # shellcheck disable=SC2086
    step "stubtest (${BUILT% })" "$PY" -m mypy.stubtest --ignore-unused-allowlist \
        --allowlist scripts/stubtest-allowlist.txt $BUILT
fi

echo
if [ ${#failed[@]} -ne 0 ]; then
    echo "lint: FAILED: ${failed[*]}"
    exit 1
fi
echo "lint: all checks passed"
