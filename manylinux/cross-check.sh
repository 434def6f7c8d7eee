#!/usr/bin/env bash
# manylinux/cross-check.sh - prove on Linux that the native modules compile AND link for macOS and Windows.
#
#   manylinux/cross-check.sh [--quick]
#
# Release wheels for macOS/Windows are built and tested on real runners (.github/workflows/release.yml);
# this is the check that can run here and in Linux CI. For every Python ABI the wheels target
# (3.10 3.11 3.12 3.13 3.14, free-threaded 3.13t 3.14t; --quick: 3.12 and 3.13t) and every crate under
# rust/ except the shared core:
#   macOS universal2   cargo zigbuild --target universal2-apple-darwin (x86_64 + arm64, no SDK needed),
#                      MACOSX_DEPLOYMENT_TARGET=10.12. Checked with llvm-nm/llvm-objdump: both slices are
#                      this crate, PyInit_<module> exported, the C API left undefined (dynamic_lookup),
#                      only system dylibs linked.
#   Windows x86_64     cargo zigbuild --target x86_64-pc-windows-gnu (zig's mingw-w64 + UCRT) with
#                      pyo3-ffi/generate-import-lib, so python3XY[t].dll is linked through a real import
#                      library. Checked: a PE32+ DLL exporting PyInit_<module>, importing python3XY[t].dll and
#                      the CRT/kernel32 functions thread_aio's Windows I/O path uses.
#   Windows MSVC       cargo check --target x86_64-pc-windows-msvc (the release target; linking needs MSVC).
# The Linux-only crates (linux_aio, linux_uring) must build there too, as empty libraries.
# Free-threaded ABIs are configured with a PYO3_CONFIG_FILE (build_flags=Py_GIL_DISABLED): pyo3-ffi
# 0.28's PYO3_CROSS_PYTHON_VERSION=3.13t silently drops that flag (BUILD-NOTES pitfall 14).
# Works on a copy of the Cargo workspace in ${CAIO_WHEEL_CACHE:-$HOME/.cache/caio-wheels}/cross (the
# import-library feature adds python3-dll-a to that copy's Cargo.lock, never to the repository's).
set -Eeuo pipefail
shopt -s nullglob
PROG=cross-check.sh
log()  { printf '[%s %s] %s\n' "$PROG" "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf '\n[%s] ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }
trap 'rc=$?; printf "[%s] ERROR: command failed (exit %s) at line %s: %s\n" "$PROG" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

QUICK=0
for a in "$@"; do
    case $a in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $a" ;;
    esac
done
if ((QUICK)); then ABIS=(3.12 3.13t); else ABIS=(3.10 3.11 3.12 3.13 3.14 3.13t 3.14t); fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
CACHE=${CAIO_WHEEL_CACHE:-$HOME/.cache/caio-wheels}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd -P)
case $CACHE/ in "$REPO"/*) die "CAIO_WHEEL_CACHE must be outside the repository" ;; esac
X=$CACHE/cross
LOGS=$CACHE/logs
mkdir -p "$X" "$LOGS" "$CACHE/venvs"
exec 9>"$X/.lock"
flock -w 3600 9 || die "another cross-check.sh holds $X/.lock"
LOGF=$LOGS/cross-check.log
: >"$LOGF"
T0=$SECONDS

run_logged() {   # run_logged <what> cmd...
    local what=$1; shift
    printf '\n$ %s\n' "$*" >>"$LOGF"
    if ! "$@" >>"$LOGF" 2>&1; then
        tail -n 40 "$LOGF" >&2
        die "$what failed (log: $LOGF)"
    fi
}

# --- tools: zig + cargo-zigbuild (pinned, from PyPI), llvm-tools (rustup) --------------------
for c in cargo rustup rustc python3 flock; do command -v "$c" >/dev/null || die "$c is required"; done
TOOLS_REQ=(ziglang==0.17.1 cargo-zigbuild==0.24.0)
V=$CACHE/venvs/cross-tools
if [[ ! -x $V/bin/cargo-zigbuild || $(cat "$V/.caio-req" 2>/dev/null) != "${TOOLS_REQ[*]}" ]]; then
    log "tools venv $V: ${TOOLS_REQ[*]}"
    rm -rf "$V"
    run_logged "venv" python3 -m venv "$V"
    run_logged "pip install ${TOOLS_REQ[*]}" "$V/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: "${TOOLS_REQ[@]}"
    printf '%s' "${TOOLS_REQ[*]}" >"$V/.caio-req"
fi
ZIGDIR=$("$V/bin/python" -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))')
export PATH="$V/bin:$ZIGDIR:$PATH"
# python3-dll-a (pyo3-ffi/generate-import-lib) uses `zig dlltool` when told zig is the linker
export ZIG_COMMAND=$ZIGDIR/zig
TARGETS=(x86_64-apple-darwin aarch64-apple-darwin x86_64-pc-windows-gnu x86_64-pc-windows-msvc)
installed=$(rustup target list --installed)
for t in "${TARGETS[@]}"; do
    grep -qx "$t" <<<"$installed" || { log "rustup target add $t"; run_logged "rustup target add $t" rustup target add "$t"; }
done
LLVM=$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin
if [[ ! -x $LLVM/llvm-nm ]]; then
    log "rustup component add llvm-tools"
    run_logged "rustup component add llvm-tools" rustup component add llvm-tools
fi
NM=$LLVM/llvm-nm OBJDUMP=$LLVM/llvm-objdump READOBJ=$LLVM/llvm-readobj
log "zig $(zig version), $(cargo-zigbuild --version), $("$NM" --version | grep -o 'LLVM version [0-9.]*')"

# --- workspace copy ----------------------------------------------------------------------------
WS=$X/ws
rm -rf "$WS"
mkdir -p "$WS"
cp -a "$REPO/Cargo.toml" "$REPO/Cargo.lock" "$WS/"
tar -C "$REPO" --exclude=target -cf - rust | tar -C "$WS" -xf -
export CARGO_TARGET_DIR=$X/target
CRATES=() PKGS=()
for d in "$WS"/rust/*/; do
    n=$(basename "$d"); [[ $n == core ]] && continue
    grep -q cdylib "$d/Cargo.toml" || continue
    CRATES+=("$n")
    PKGS+=("$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$d/Cargo.toml" | head -n1)")
done
((${#CRATES[@]})) || die "no cdylib crates under rust/"
log "crates: ${CRATES[*]}; ABIs: ${ABIS[*]}"

# pyo3 cross configuration for one ABI: sets PYCFG (env assignments for `env`)
pyo3_env() {   # <abi> <target>
    local abi=$1 target=$2 v=${1%t}
    if [[ $abi == *t ]]; then
        local f=$X/pyo3-$abi-$target.txt lib=python${v/./}t
        [[ $target == *apple* ]] && lib=python${v}t
        cat >"$f" <<EOF
implementation=CPython
version=$v
shared=true
abi3=false
lib_name=$lib
pointer_width=64
build_flags=Py_GIL_DISABLED
suppress_build_script_link_lines=false
EOF
        PYCFG=(PYO3_CONFIG_FILE="$f")
    else
        PYCFG=(PYO3_CROSS_PYTHON_VERSION="$v")
    fi
}

RESULTS=()
fail() { die "$*"; }

check_macos() {   # <abi> <crate> <dylib>
    local abi=$1 crate=$2 f=$3 a out
    for a in x86_64 arm64; do
        "$OBJDUMP" --macho --dylib-id --arch=$a "$f" | tail -n1 | grep -q "/lib$crate.dylib$" \
            || fail "macOS $abi $crate: the $a slice is not lib$crate.dylib"
        local defined undefined
        defined=$("$NM" --arch=$a -g --defined-only "$f")
        undefined=$("$NM" --arch=$a -u "$f")
        if [[ $crate == linux_* ]]; then
            ! grep -q "_PyInit_" <<<"$defined" || fail "macOS $abi $crate ($a): a Linux-only crate exports a PyInit"
        else
            grep -q " _PyInit_$crate$" <<<"$defined" || fail "macOS $abi $crate ($a): _PyInit_$crate not exported"
            grep -qE "^( *U )?_Py[A-Z]" <<<"$undefined" || fail "macOS $abi $crate ($a): no undefined C API symbols?"
        fi
        out=$("$OBJDUMP" --macho --dylibs-used --arch=$a "$f" | tail -n +2 | awk '{print $1}')
        if grep -v -E '^/usr/lib/lib(System\.B|iconv\.2|charset\.1)\.dylib$|/lib'"$crate"'\.dylib$' <<<"$out" | grep -q .; then
            fail "macOS $abi $crate ($a): unexpected dylibs: $out"
        fi
        if grep -qi python <<<"$out"; then fail "macOS $abi $crate ($a): links libpython"; fi
        local minos
        minos=$("$OBJDUMP" --macho --all-headers --arch=$a "$f" | awk '/LC_BUILD_VERSION|LC_VERSION_MIN_MACOSX/{p=1} p && ($1 == "minos" || $1 == "version") {print $2; exit}')
        # zig writes MACOSX_DEPLOYMENT_TARGET (10.12) into both slices; on real runners the arm64
        # slice gets 11.0. Either way it must not be zig's default (the host's SDK, 15.x).
        case $minos in 10.12*|11.0*) ;; *) fail "macOS $abi $crate ($a): minimum macOS '$minos' (want 10.12/11.0)" ;; esac
    done
}

check_windows() {   # <abi> <crate> <dll>
    local abi=$1 crate=$2 f=$3 v=${1%t} t=
    [[ $1 == *t ]] && t=t
    file -b "$f" | grep -q 'PE32+ executable (DLL).*x86-64' || fail "Windows $abi $crate: not a PE32+ x86-64 DLL: $(file -b "$f")"
    local p
    p=$("$READOBJ" --coff-exports --coff-imports "$f")
    [[ $crate == linux_* ]] && return 0
    grep -q "^ *Name: PyInit_$crate$" <<<"$p" || fail "Windows $abi $crate: PyInit_$crate not exported"
    grep -qi "^ *Name: python${v/./}$t.dll$" <<<"$p" || fail "Windows $abi $crate: does not import python${v/./}$t.dll"
    local sym
    for sym in _get_osfhandle _set_thread_local_invalid_parameter_handler ReadFile WriteFile FlushFileBuffers; do
        grep -q "^ *Symbol: $sym (" <<<"$p" || fail "Windows $abi $crate: $sym is not imported"
    done
}

for abi in "${ABIS[@]}"; do
    for i in "${!CRATES[@]}"; do
        crate=${CRATES[$i]} pkg=${PKGS[$i]}
        t=$SECONDS
        # macOS universal2 (one package per invocation: each slice is checked to be this crate)
        pyo3_env "$abi" apple
        run_logged "macOS $abi $crate" env "${PYCFG[@]}" MACOSX_DEPLOYMENT_TARGET=10.12 \
            cargo zigbuild --release --target universal2-apple-darwin -p "$pkg"
        check_macos "$abi" "$crate" "$CARGO_TARGET_DIR/universal2-apple-darwin/release/lib$crate.dylib"
        # Windows x86_64 (zig, UCRT), linked against a generated python3XY[t] import library
        pyo3_env "$abi" windows
        run_logged "Windows $abi $crate" env "${PYCFG[@]}" \
            cargo zigbuild --release --target x86_64-pc-windows-gnu -p "$pkg" --features pyo3-ffi/generate-import-lib
        check_windows "$abi" "$crate" "$CARGO_TARGET_DIR/x86_64-pc-windows-gnu/release/$crate.dll"
        # Windows MSVC: type-check the real release target
        run_logged "Windows MSVC check $abi $crate" env "${PYCFG[@]}" \
            cargo check --release --target x86_64-pc-windows-msvc -p "$pkg"
        RESULTS+=("$abi $crate: macOS universal2 (x86_64+arm64) linked, Windows x86_64 DLL linked, MSVC check ok ($((SECONDS - t)) s)")
        log "  ${RESULTS[-1]}"
    done
done
printf '%s\n' "${RESULTS[@]}" >"$LOGS/cross-check-summary.txt"
log "all ${#RESULTS[@]} macOS/Windows builds passed in $((SECONDS - T0)) s (details: $LOGF)"
