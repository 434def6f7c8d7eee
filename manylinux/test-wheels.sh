#!/usr/bin/env bash
# manylinux/test-wheels.sh - install every artifact in dist/ where it can run, and test it there.
#
#   manylinux/test-wheels.sh [--full] [--jobs N] [--only REGEX] [--keep]
#
# Two depths (docs/wheels.md, "What test-wheels.sh tests"):
#   default (what CI runs)  the WHOLE suite on the manylinux x86_64 cp310 and cp314 wheels, on the
#                           cp313t wheel (PYTHON_GIL=0), on the py3-none-any wheel and on the sdist
#                           installed without cargo; every other artifact that can run here gets the
#                           smoke test (every module loads, every backend's round trip) plus the
#                           curated subset of the suite (SUBSET below, a few hundred tests).
#   --full                  the whole suite on every artifact that can run here.
# --jobs N runs N artifact tests at once (default 2: the suites wait on I/O and subprocesses a lot).
#
# What runs where (interpreters from manylinux/interpreters.sh --arm64):
#   manylinux x86_64 cpXY wheels   fresh venv of that interpreter, wheel + test deps, the suite
#                                  (tests/ of this checkout, run from a scratch cwd so the source tree's
#                                  caio/ cannot shadow the wheel; a plugin asserts caio is the venv's).
#   cp313t wheel                   the same with PYTHON_GIL=0, plus an explicit check that importing every
#                                  native module (with -W error::RuntimeWarning) leaves the GIL disabled;
#                                  tests/test_free_threading.py (thread hammers) runs there, and its
#                                  tests must all have passed (counted from pytest's junit XML).
#   py3-none-any wheel             fresh cp312 venv (python_aio only; asserted).
#   sdist                          installed twice into fresh cp311 venvs: with cargo (CAIO_REQUIRE_RUST=1,
#                                  native modules asserted) and with cargo removed from PATH (python_aio
#                                  only, asserted).
#   manylinux aarch64 cp313/cp314  host pip --target --platform, then manylinux/smoke.py under qemu-user
#                                  with Debian sid's arm64 CPython (imports + write/read/fsync per backend).
#   musllinux x86_64 cp313         smoke + suite on a CPython 3.13 built against musl (musl-python.sh).
#   other aarch64 / musl wheels    no interpreter exists here: static checks only (build-wheels.sh).
# Prints a table (wheel, interpreter, depth, result) at the end and exits non-zero if anything failed.
set -Eeuo pipefail
shopt -s nullglob

PROG=test-wheels.sh
log()  { printf '[%s %s] %s\n' "$PROG" "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf '\n[%s] ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }
trap 'rc=$?; printf "[%s] ERROR: command failed (exit %s) at line %s: %s\n" "$PROG" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

ONLY= KEEP=0 FULL=0 JOBS=2
while (($#)); do
    case $1 in
        --only) shift; ONLY=${1:?--only needs a regex} ;;
        --keep) KEEP=1 ;;
        --full) FULL=1 ;;
        --jobs) shift; JOBS=${1:?--jobs needs a number} ;;
        -h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
DIST=${CAIO_DIST:-$REPO/dist}
CACHE=${CAIO_WHEEL_CACHE:-$HOME/.cache/caio-wheels}
mkdir -p "$CACHE/logs"
CACHE=$(cd "$CACHE" && pwd -P)
LOGS=$CACHE/logs
T0=$SECONDS
TEST_DEPS=("pytest>=7" pytest-timeout hypothesis "setuptools>=70" "setuptools-rust>=1.10" wheel)

exec 8>"$CACHE/.test-lock"
flock -w 7200 8 || die "another test-wheels.sh run holds $CACHE/.test-lock"
WORK=$CACHE/test
rm -rf "$WORK"
mkdir -p "$WORK"
((KEEP)) || trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------------------------
log "interpreters: manylinux/interpreters.sh --arm64 (cached after its first run)"
"$REPO/manylinux/interpreters.sh" --arm64
ICACHE=${CAIO_INTERP_CACHE:-$HOME/.cache/caio-interpreters}
declare -A PY=()
while read -r tag py; do PY[$tag]=$py; done <"$ICACHE/interpreters.txt"
MKVENV=$ICACHE/bin/mkvenv
# pip used for --target installs of foreign-platform wheels (the build tools venv if there is one)
if [[ -x $CACHE/venvs/tools/bin/python ]]; then HOSTPIP=("$CACHE/venvs/tools/bin/python" -m pip)
else HOSTPIP=("${PY[cp312]}" -m pip); fi

ARTIFACTS=("$DIST"/caio-*.whl "$DIST"/caio-*.tar.gz)
((${#ARTIFACTS[@]})) || die "nothing to test in $DIST; run manylinux/build-wheels.sh first"
MODULES=()
for d in "$REPO"/rust/*/; do
    n=$(basename "$d"); [[ $n == core ]] && continue
    grep -q cdylib "$d/Cargo.toml" && MODULES+=("$n")
done

# Results: every artifact test writes "artifact|where|depth|result" lines into a file of its own
# under $WORK/results (the tests run as parallel jobs); the table at the end reads them all.
mkdir -p "$WORK/results"
RESFILE=/dev/null
record() { printf '%s|%s|%s|%s\n' "$1" "$2" "$DEPTH" "$3" >>"$RESFILE"; }

# The curated subset (default depth for the artifacts that do not get the whole suite): the public
# API and its errors on every backend (raw Context/Operation, asyncio adapters on the asyncio loop),
# selection (CAIO_IMPL, default_implementation), `python -m caio` and the packaging checks. A few
# hundred tests, about 20 s; together with manylinux/smoke.py it proves the artifact works here.
SUBSET=(tests/test_package.py tests/test_raw_context.py tests/test_operation.py tests/test_asyncio.py)
SUBSET_ENV=(CAIO_TEST_LOOPS=asyncio)

# depth_of <python tag or kind>: "suite" (the whole suite) or "subset"
depth_of() {
    ((FULL)) && { echo suite; return; }
    case $1 in
        cp310|cp314|cp313t|pure|sdist-nocargo) echo suite ;;
        *) echo subset ;;
    esac
}

# the pytest plugin that proves the installed package is under test, not the checkout
mkdir -p "$WORK/plugin"
cat >"$WORK/plugin/caio_installed_check.py" <<'EOF'
import os, sys
def pytest_sessionstart(session):
    import caio
    where = os.path.realpath(caio.__file__)
    expect = os.environ["CAIO_EXPECT_PREFIX"]
    if not where.startswith(os.path.realpath(expect)):
        raise SystemExit(f"caio imported from {where}, not from {expect}")
    native = [n for n in ("linux_uring", "linux_aio", "thread_aio") if getattr(caio, n) is not None]
    files = [os.path.basename(getattr(caio, n).__file__) for n in native]
    print(f"\ncaio under test: {where}; native: {', '.join(files) or 'none (python_aio only)'}")
EOF

# Memory watch: every suite logs each test's start and, after it, the process's RSS and peak RSS
# ("<nodeid> rss=<kB> hwm=<kB>") into <log>.rss, and runs in a memory cgroup capped at MEMCAP (when
# this host lets us make one), so that a runaway test is killed alone and the last "START" line
# of its .rss file names it (docs/wheels.md, "Memory").
MEMCAP=${CAIO_TEST_MEMCAP:-$((8 * 1024 * 1024 * 1024))}
cat >"$WORK/plugin/caio_rss_log.py" <<'EOF'
import os
OUT = os.environ.get("CAIO_RSS_LOG")
def _status():
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line[:5]] = line.split()[1]
    return vals.get("VmRSS", "?"), vals.get("VmHWM", "?")
def _write(text):
    if OUT:
        with open(OUT, "a") as f:
            f.write(text + "\n")
def pytest_runtest_logstart(nodeid, location):
    _write("START " + nodeid)
def pytest_runtest_logfinish(nodeid, location):
    rss, hwm = _status()
    _write(f"{nodeid} rss={rss} hwm={hwm}")
EOF
# memcap_exec <name> cmd...: runs cmd in a fresh memory cgroup capped at MEMCAP (v2 or v1), or as is
memcap_exec() {
    local name=$1 cg=; shift
    if [[ -w /sys/fs/cgroup/cgroup.subtree_control ]] && grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
        cg=/sys/fs/cgroup/caio-test-$name-$$
        mkdir -p "$cg" 2>/dev/null && echo "$MEMCAP" >"$cg/memory.max" 2>/dev/null || cg=
    elif [[ -w /sys/fs/cgroup/memory ]]; then
        cg=/sys/fs/cgroup/memory/caio-test-$name-$$
        mkdir -p "$cg" 2>/dev/null && echo "$MEMCAP" >"$cg/memory.limit_in_bytes" 2>/dev/null || cg=
    fi
    if [[ -n $cg ]]; then
        local rc=0
        sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' memcap "$cg" "$@" || rc=$?
        rmdir "$cg" 2>/dev/null || true
        return $rc
    fi
    "$@"
}

# pytest_run <python> <logfile> <expect-prefix> <extra PYTHONPATH or ""> [env...]: runs the suite
# ($DEPTH: the whole suite or the curated subset) from a scratch cwd, echoes pytest's summary line,
# returns pytest's status
pytest_run() {
    local py=$1 logf=$2 prefix=$3 extra=$4; shift 4
    local cwd
    cwd=$(mktemp -d "$WORK/cwd.XXXXXX")
    local rc=0 paths=("$REPO/tests") envs=("$@") f
    if [[ $DEPTH == subset ]]; then
        paths=()
        for f in "${SUBSET[@]}"; do paths+=("$REPO/$f"); done
        envs+=("${SUBSET_ENV[@]}")
    fi
    : >"${logf%.log}.rss"
    (cd "$cwd" && memcap_exec "$(basename "${logf%.log}")" env "${envs[@]}" CAIO_EXPECT_PREFIX="$prefix" \
        CAIO_RSS_LOG="${logf%.log}.rss" PYTHONPATH="$WORK/plugin${extra:+:$extra}" \
        "$py" -m pytest "${paths[@]}" -p caio_installed_check -p caio_rss_log -p no:cacheprovider -q -rfEs \
        --junitxml "${logf%.log}.xml" --rootdir "$REPO" >>"$logf" 2>&1) || rc=$?
    local summary
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|^(=+ )?no tests ran|^(=+ )?[0-9]+ error' "$logf" | tail -n1 | sed 's/=//g; s/^ *//; s/ *$//')
    if [[ -z $summary ]]; then
        # killed (out of memory, a signal): name the test that was running and the peak so far
        local last peak
        last=$(grep '^START ' "${logf%.log}.rss" | tail -n1 | cut -c7-)
        peak=$(grep -o 'hwm=[0-9]*' "${logf%.log}.rss" | cut -d= -f2 | sort -n | tail -n1)
        summary="no pytest summary (rc $rc); running: ${last:-?}; peak RSS before it: ${peak:-?} kB"
    fi
    printf '%s\n' "$summary"
    return $rc
}

# smoke_run <python> <logfile> [env...]: manylinux/smoke.py (every native module loads, a round trip
# through every asyncio context) from a scratch cwd
smoke_run() {
    local py=$1 logf=$2; shift 2
    local cwd
    cwd=$(mktemp -d "$WORK/cwd.XXXXXX")
    (cd "$cwd" && env "$@" "$py" "$REPO/manylinux/smoke.py" "${MODULES[@]}") >>"$logf" 2>&1
}

# new_venv <tag> <name>: fresh venv of interpreter <tag> with the test dependencies
new_venv() {
    local tag=$1 name=$2 logf=$3
    local v=$WORK/venv-$name
    "$MKVENV" "${PY[$tag]}" "$v" >>"$logf" 2>&1 || { tail -n 20 "$logf" >&2; die "mkvenv $tag failed"; }
    # binary wheels only (see scripts/dev-setup.sh); uvloop where it exists
    "$v/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: "${TEST_DEPS[@]}" >>"$logf" 2>&1 \
        || { tail -n 20 "$logf" >&2; die "installing the test dependencies into the $tag venv failed"; }
    "$v/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: uvloop >>"$logf" 2>&1 \
        || echo "uvloop: no wheel for $tag, skipped" >>"$logf"
    printf '%s' "$v"
}

# assert_native <python> <expected modules (space separated) or "none">
assert_native() {
    "$1" - "$2" <<'EOF'
import sys, caio
want = sys.argv[1].split() if sys.argv[1] != "none" else []
have = sorted(n for n in ("linux_uring", "linux_aio", "thread_aio") if getattr(caio, n) is not None)
if have != sorted(want):
    sys.exit(f"native backends {have}, expected {sorted(want)}; import errors: {caio._import_errors}")
print(f"native backends: {have or 'none'}; AsyncioContext = {caio.AsyncioContext.__module__}")
EOF
}

ft_passed() {   # <junit xml>: "N free-threading tests passed", fails unless all of them passed
    "${PY[cp312]}" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
cases = [c for c in ET.parse(sys.argv[1]).iter("testcase") if "test_free_threading" in c.get("classname", "")]
bad = [c.get("name") for c in cases if len(c)]   # failure/error/skipped children
if not cases or bad:
    print(f"{len(cases)} collected, not passed: {bad}")
    sys.exit(1)
print(f"{len(cases)} free-threading tests (thread hammers, GIL checks) passed")
EOF
}

tag_of() {   # caio-0.12.11-cp313-cp313t-manylinux...whl -> cp313t
    local b=${1##*/}; b=${b%.whl}
    local IFS=-; local parts=($b)
    printf '%s' "${parts[-2]}"
}

test_native_x86_64() {   # <wheel>
    local whl=$1 tag name logf v t=$SECONDS
    tag=$(tag_of "$whl")
    name=manylinux-x86_64-$tag
    logf=$LOGS/test-$name.log; : >"$logf"
    DEPTH=$(depth_of "$tag")
    log "$tag: fresh venv, $(basename "$whl"), $DEPTH"
    v=$(new_venv "$tag" "$name" "$logf")
    "$v/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$whl" >>"$logf" 2>&1 \
        || { record "$(basename "$whl")" "$tag" "FAIL: pip install"; return; }
    local envs=()
    [[ $tag == *t ]] && envs=(PYTHON_GIL=0)
    if ! (cd "$WORK" && env "${envs[@]}" "$v/bin/python" -W error::RuntimeWarning -c '' && assert_native "$v/bin/python" "${MODULES[*]}") >>"$logf" 2>&1; then
        record "$(basename "$whl")" "$tag" "FAIL: native modules missing (see $logf)"; return
    fi
    if [[ $tag == *t ]]; then
        # importing every native module must leave the GIL disabled, with and without PYTHON_GIL=0
        local mods=() m
        for m in "${MODULES[@]}"; do mods+=("caio.$m"); done
        local gil_env
        for gil_env in PYTHON_GIL=0 CAIO_UNUSED=1; do
            if ! (cd "$WORK" && env -u PYTHON_GIL "$gil_env" "$v/bin/python" -W error::RuntimeWarning -c '
import importlib, sys, sysconfig
assert sysconfig.get_config_var("Py_GIL_DISABLED") == 1
for name in sys.argv[1:]:
    importlib.import_module(name)
    assert not sys._is_gil_enabled(), f"importing {name} enabled the GIL"
import caio
assert caio.thread_aio is not None
print("GIL still disabled after importing", ", ".join(sys.argv[1:]))' "${mods[@]}") >>"$logf" 2>&1; then
                record "$(basename "$whl")" "$tag" "FAIL: GIL enabled by an import ($gil_env; see $logf)"; return
            fi
        done
    fi
    if [[ $DEPTH == subset ]] && ! smoke_run "$v/bin/python" "$logf" "${envs[@]}"; then
        record "$(basename "$whl")" "$tag venv" "FAIL: smoke (log: $logf)"; return
    fi
    local summary rc=0
    summary=$(pytest_run "$v/bin/python" "$logf" "$v" "" "${envs[@]}") || rc=$?
    local extra=
    if ((rc == 0)) && [[ $tag == *t ]]; then
        # the thread hammers (tests/test_free_threading.py) must really have run and passed here
        local ft
        if ft=$(ft_passed "${logf%.log}.xml"); then
            extra=", PYTHON_GIL=0, GIL stays disabled; $ft"
        else
            record "$(basename "$whl")" "$tag venv" "FAIL: free-threading tests did not run/pass: $ft (log: $logf)"; return
        fi
    fi
    if ((rc == 0)); then
        record "$(basename "$whl")" "$tag venv ($("$v/bin/python" -c 'import platform; print(platform.python_version())'))" "PASS: $summary$extra"
    else
        record "$(basename "$whl")" "$tag venv" "FAIL: $summary (log: $logf)"
    fi
    log "  $tag: $summary ($((SECONDS - t)) s)"
}

test_pure() {   # <wheel>
    local whl=$1 logf=$LOGS/test-pure.log v t=$SECONDS
    : >"$logf"
    DEPTH=$(depth_of pure)
    log "py3-none-any: fresh cp312 venv, $DEPTH"
    v=$(new_venv cp312 pure "$logf")
    "$v/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$whl" >>"$logf" 2>&1 \
        || { record "$(basename "$whl")" cp312 "FAIL: pip install"; return; }
    (cd "$WORK" && assert_native "$v/bin/python" none) >>"$logf" 2>&1 \
        || { record "$(basename "$whl")" cp312 "FAIL: not python_aio-only (see $logf)"; return; }
    local summary rc=0
    summary=$(pytest_run "$v/bin/python" "$logf" "$v" "") || rc=$?
    if ((rc == 0)); then record "$(basename "$whl")" "cp312 venv" "PASS: $summary (python_aio only)"
    else record "$(basename "$whl")" "cp312 venv" "FAIL: $summary (log: $logf)"; fi
    log "  py3-none-any: $summary ($((SECONDS - t)) s)"
}

test_sdist() {   # <sdist> <mode: cargo|nocargo>
    local sd=$1 logf v t
    local mode
    for mode in $2; do
        t=$SECONDS
        logf=$LOGS/test-sdist-$mode.log; : >"$logf"
        DEPTH=$(depth_of "sdist-$mode")
        log "sdist ($mode): fresh cp311 venv, pip install $(basename "$sd") (PEP 517 build isolation), $DEPTH"
        v=$(new_venv cp311 "sdist-$mode" "$logf")
        local envs=() expect=none
        if [[ $mode == cargo ]]; then
            envs=(CAIO_REQUIRE_RUST=1)
            expect="${MODULES[*]}"
        else
            local p keep=() d
            IFS=: read -ra p <<<"$PATH"
            for d in "${p[@]}"; do [[ -n $d && ! -e $d/cargo ]] && keep+=("$d"); done
            envs=(PATH="$(IFS=:; echo "${keep[*]}")")
        fi
        if ! (cd "$WORK" && env -u CARGO "${envs[@]}" "$v/bin/python" -m pip install --disable-pip-version-check \
                --no-cache-dir --no-deps "$sd") >>"$logf" 2>&1; then
            record "$(basename "$sd")" "cp311 venv, $mode" "FAIL: pip install (log: $logf)"; continue
        fi
        (cd "$WORK" && assert_native "$v/bin/python" "$expect") >>"$logf" 2>&1 \
            || { record "$(basename "$sd")" "cp311 venv, $mode" "FAIL: wrong backends (see $logf)"; continue; }
        if [[ $DEPTH == subset ]] && ! smoke_run "$v/bin/python" "$logf"; then
            record "$(basename "$sd")" "cp311 venv, $mode" "FAIL: smoke (log: $logf)"; continue
        fi
        local summary rc=0
        summary=$(pytest_run "$v/bin/python" "$logf" "$v" "") || rc=$?
        local what="with cargo: native ${MODULES[*]}"
        [[ $mode == nocargo ]] && what="without cargo: python_aio only"
        if ((rc == 0)); then record "$(basename "$sd")" "cp311 venv, $what" "PASS: $summary"
        else record "$(basename "$sd")" "cp311 venv, $what" "FAIL: $summary (log: $logf)"; fi
        log "  sdist $mode: $summary ($((SECONDS - t)) s)"
    done
}

# host pip install into a --target dir for a foreign platform
target_install() {   # <wheel> <dir> <platform> <pyver e.g. 3.13> <abi> [extra requirements...]
    local whl=$1 dir=$2 plat=$3 pyv=$4 abi=$5; shift 5
    "${HOSTPIP[@]}" install -q --disable-pip-version-check --no-deps --target "$dir" --platform "$plat" \
        --python-version "$pyv" --implementation cp --abi "$abi" --only-binary=:all: "$whl" "$@"
}

test_aarch64() {   # <wheel>
    local whl=$1 tag logf t=$SECONDS
    tag=$(tag_of "$whl")
    local pyv=${tag#cp}; pyv=${pyv:0:1}.${pyv:1}
    local qpy=${PY[$tag-arm64]:-}
    DEPTH=smoke
    if [[ -z $qpy ]]; then
        DEPTH=static
        record "$(basename "$whl")" "-" "static checks only (no arm64 CPython $pyv here)"
        return
    fi
    logf=$LOGS/test-aarch64-$tag.log; : >"$logf"
    log "aarch64 $tag: smoke test under qemu-user (Debian sid arm64 CPython)"
    local dir=$WORK/arm-$tag
    target_install "$whl" "$dir" manylinux2014_aarch64 "$pyv" "$tag" >>"$logf" 2>&1 \
        || { record "$(basename "$whl")" "$tag-arm64" "FAIL: pip --target (log: $logf)"; return; }
    local cwd; cwd=$(mktemp -d "$WORK/cwd.XXXXXX")
    local out
    if out=$(cd "$cwd" && PYTHONPATH="$dir" "$qpy" "$REPO/manylinux/smoke.py" "${MODULES[@]}" 2>&1); then
        printf '%s\n' "$out" >>"$logf"
        local ver rt unavail
        ver=$(sed -n 's/^python \([0-9.]*\) .*/\1/p' <<<"$out" | head -n1)
        rt=$(sed -n 's/^  round trip ok: //p' <<<"$out")
        unavail=$(sed -n 's/^  \([a-z_]*\): loaded .*, unavailable here.*/\1/p' <<<"$out" | paste -sd, -)
        record "$(basename "$whl")" "qemu-aarch64, Debian CPython $ver" \
            "PASS: smoke (modules load; round trip: $rt${unavail:+; $unavail loads but has no kernel AIO under qemu-user})"
    else
        printf '%s\n' "$out" >>"$logf"
        record "$(basename "$whl")" "$tag-arm64 (qemu)" "FAIL: smoke (log: $logf)"
    fi
    log "  aarch64 $tag: done ($((SECONDS - t)) s)"
}

test_musl() {   # <wheel>
    local whl=$1 tag arch t=$SECONDS
    tag=$(tag_of "$whl")
    case $whl in *_x86_64.whl) arch=x86_64 ;; *) arch=aarch64 ;; esac
    DEPTH=$(depth_of musl)
    if [[ $arch != x86_64 || $tag != cp313 ]]; then
        DEPTH=static
        record "$(basename "$whl")" "-" "static checks only (no musl CPython ${tag#cp} $arch here)"
        return
    fi
    local logf=$LOGS/test-musl-$tag.log; : >"$logf"
    log "musllinux x86_64 $tag: CPython 3.13 built against musl (manylinux/musl-python.sh), smoke + $DEPTH"
    local mpy
    mpy=$("$REPO/manylinux/musl-python.sh" --print) || { record "$(basename "$whl")" musl "FAIL: no musl CPython"; return; }
    local dir=$WORK/musl-$tag
    # the musl CPython has no zlib/ssl (pip cannot run there): the host pip installs wheel + test deps
    # (pure-Python ones; setuptools is left out, so test_packaging.py, which needs pip, is skipped)
    target_install "$whl" "$dir" musllinux_1_2_x86_64 3.13 cp313 >>"$logf" 2>&1 \
        || { record "$(basename "$whl")" musl "FAIL: pip --target (log: $logf)"; return; }
    "${HOSTPIP[@]}" install -q --disable-pip-version-check --target "$dir" --platform musllinux_1_2_x86_64 \
        --python-version 3.13 --implementation cp --abi cp313 --only-binary=:all: \
        "pytest>=7" pytest-timeout hypothesis >>"$logf" 2>&1 \
        || { record "$(basename "$whl")" musl "FAIL: test deps (log: $logf)"; return; }
    local cwd; cwd=$(mktemp -d "$WORK/cwd.XXXXXX")
    if ! (cd "$cwd" && PYTHONPATH="$dir" "$mpy" "$REPO/manylinux/smoke.py" "${MODULES[@]}") >>"$logf" 2>&1; then
        record "$(basename "$whl")" "musl CPython 3.13" "FAIL: smoke (log: $logf)"; return
    fi
    local summary rc=0
    # PYTHONPATH carries the target dir (the suite's subprocesses inherit it)
    summary=$(pytest_run "$mpy" "$logf" "$dir" "$dir") || rc=$?
    if ((rc == 0)); then
        record "$(basename "$whl")" "musl CPython $("$mpy" -c 'import platform; print(platform.python_version())') (x86_64)" "PASS: $summary"
    else
        record "$(basename "$whl")" "musl CPython 3.13" "FAIL: ${summary:-no summary} (log: $logf)"
    fi
    log "  musl $tag: $summary ($((SECONDS - t)) s)"
}

# ---------------------------------------------------------------------------------------------
# The jobs, heaviest first (they run $JOBS at a time): "<function> <artifact> [mode]".
JOBLIST=()
declare -A WEIGHT=()
add_job() {   # add_job <weight> <function> <artifact> [arg]
    JOBLIST+=("$2|$3|${4:-}")
    WEIGHT[${#JOBLIST[@]}]=$1
}
for a in "${ARTIFACTS[@]}"; do
    b=$(basename "$a")
    if [[ -n $ONLY && ! $b =~ $ONLY ]]; then continue; fi
    case $b in
        *.tar.gz) add_job 60 test_sdist "$a" cargo; add_job 20 test_sdist "$a" nocargo ;;
        *-py3-none-any.whl) add_job 20 test_pure "$a" ;;
        *manylinux*_x86_64.whl)
            t=$(tag_of "$a")
            if [[ $(depth_of "$t") == suite ]]; then add_job $([[ $t == *t ]] && echo 100 || echo 90) test_native_x86_64 "$a"
            else add_job 10 test_native_x86_64 "$a"; fi ;;
        *manylinux*_aarch64.whl) add_job 5 test_aarch64 "$a" ;;
        # last: .ci/run builds the musl CPython in its other lane meanwhile (musl-python.sh
        # serialises on its lock, so a job that starts early just waits for it)
        *musllinux*.whl) add_job $([[ $b == *cp313-cp313-musllinux*_x86_64.whl ]] && echo 1 || echo 0) test_musl "$a" ;;
        *) add_job 0 record_unroutable "$a" ;;
    esac
done
record_unroutable() { DEPTH=-; record "$(basename "$1")" "-" "FAIL: no test route for this artifact"; }

ORDER=()
while read -r _ i; do ORDER+=("$i"); done < <(for i in "${!WEIGHT[@]}"; do echo "${WEIGHT[$i]} $i"; done | sort -k1,1nr -k2,2n)
log "${#ORDER[@]} artifact tests, $JOBS at a time ($( ((FULL)) && echo "--full: the whole suite everywhere" || echo "whole suite on cp310, cp314, cp313t, py3-none-any, sdist without cargo; smoke + subset elsewhere"))"
running=0
for i in "${ORDER[@]}"; do
    IFS='|' read -r fn art arg <<<"${JOBLIST[$((i - 1))]}"
    while ((running >= JOBS)); do wait -n || true; running=$((running - 1)); done
    ( RESFILE=$WORK/results/$(printf '%03d' "$i"); : >"$RESFILE"; DEPTH=-
      "$fn" "$art" ${arg:+"$arg"}
      [[ -s $RESFILE ]] || record "$(basename "$art")" "-" "FAIL: the test job ended without a result (logs in $LOGS)" ) &
    running=$((running + 1))
done
wait || true

RESULTS=()
FAILED=0
for f in "$WORK"/results/*; do
    while IFS= read -r line; do
        RESULTS+=("$line")
        IFS='|' read -r _ _ _ r <<<"$line"
        [[ $r == PASS* || $r == "static checks only"* ]] || FAILED=$((FAILED + 1))
    done <"$f"
done

{
    printf '\n%-74s %-40s %-7s %s\n' "artifact" "tested on" "depth" "result"
    for line in "${RESULTS[@]}"; do
        IFS='|' read -r a w d r <<<"$line"
        printf '%-74s %-40s %-7s %s\n' "$a" "$w" "$d" "$r"
    done
    printf '\n%d artifact test(s), %d failure(s), %d s\n' "${#RESULTS[@]}" "$FAILED" "$((SECONDS - T0))"
} | tee "$LOGS/test-summary.txt" >&2
((FAILED == 0)) || die "$FAILED test(s) failed; logs in $LOGS"
log "all passed"
