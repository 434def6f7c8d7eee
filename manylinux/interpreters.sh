#!/usr/bin/env bash
# manylinux/interpreters.sh - provision every CPython interpreter of the wheel test matrix.
#
#   manylinux/interpreters.sh [--arm64] [--print] [--verify]
#
# Interpreters (cached OUTSIDE the repository, in ${CAIO_INTERP_CACHE:-$HOME/.cache/caio-interpreters}):
#   cp310 cp311 cp312 cp313   pyenv's CPython 3.10-3.13 (only located, never installed)
#   cp314                     Debian sid's binary CPython 3.14, run through the sysroot's own ld.so
#   cp313t                    free-threaded CPython 3.13 (--disable-gil) built from Debian's orig tarball
#   cp313-arm64 cp314-arm64   (--arm64) Debian sid arm64 CPython under qemu-aarch64-static (user mode)
# Writes "$CACHE/interpreters.txt" ("<tag> <python>" per line) and "$CACHE/bin/mkvenv <python> <venvdir>"
# (venv + pip for any of them). Progress goes to stderr; --print writes the list to stdout.
# The first run takes several minutes (mostly the 3.13t build); later runs only check stamp files.
set -Eeuo pipefail
shopt -s nullglob

PROG=interpreters.sh
STAMP_V=v1   # bump to invalidate every stamp when the recipe changes

log()  { printf '[%s %s] %s\n' "$PROG" "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$PROG" "$*" >&2; }
die()  { printf '\n[%s] ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }
# shellcheck disable=SC2154
trap 'rc=$?; printf "[%s] ERROR: command failed (exit %s) at %s line %s: %s\n" "$PROG" "$rc" "${BASH_SOURCE[0]}" "$LINENO" "$BASH_COMMAND" >&2' ERR

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --arm64    also provision the arm64 sid CPython 3.13/3.14 sysroot + qemu-aarch64-static
  --print    print the interpreter list ("<tag> <python>") to stdout when done
  --verify   re-run the smoke tests even for interpreters that are already provisioned
  -h|--help  this text
Environment:
  CAIO_INTERP_CACHE  cache root (default: $HOME/.cache/caio-interpreters); must be outside any git repository
  CAIO_CP313T_VERSION  preferred CPython 3.13 source version for cp313t (default: 3.13.15)
EOF
}

ARM64=0 PRINT=0 VERIFY=0
for arg in "$@"; do
    case $arg in
        --arm64) ARM64=1 ;;
        --print) PRINT=1 ;;
        --verify) VERIFY=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $arg" ;;
    esac
done

CACHE=${CAIO_INTERP_CACHE:-$HOME/.cache/caio-interpreters}
case $CACHE in /*) ;; *) CACHE=$PWD/$CACHE ;; esac
CP313T_PREF=${CAIO_CP313T_VERSION:-3.13.15}
PYENV_MINORS=(3.10 3.11 3.12 3.13)
JOBS=$(nproc 2>/dev/null || echo 2)
T0=$SECONDS

# -------------------------------------------------------------------------------------------------
# cache root: outside any repository, locked against concurrent runs
# -------------------------------------------------------------------------------------------------
anc=$CACHE
while [[ ! -d $anc ]]; do anc=$(dirname "$anc"); done
if command -v git >/dev/null && top=$(git -C "$anc" rev-parse --show-toplevel 2>/dev/null); then
    die "cache root $CACHE is inside the git work tree $top; set CAIO_INTERP_CACHE to a directory outside any repository"
fi
mkdir -p "$CACHE"/{bin,.stamps,.work,downloads,logs,wheels}
CACHE=$(cd "$CACHE" && pwd -P)

exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    log "another interpreters.sh run holds $CACHE/.lock; waiting for it (up to 2 h)..."
    flock -w 7200 9 || die "timed out waiting for the lock $CACHE/.lock"
fi
# We hold the lock, so anything left in .work is debris from an interrupted run.
rm -rf "${CACHE:?}/.work"/* "$CACHE"/.work/.[!.]* 2>/dev/null || true

WORK_DIRS=()
cleanup() { local d; for d in "${WORK_DIRS[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# new_workdir <var> <name>: fresh scratch dir under $CACHE/.work (removed on exit), path stored in <var>
new_workdir() {
    local _d
    _d=$(mktemp -d "$CACHE/.work/$2.XXXXXX") || die "cannot create a work dir in $CACHE/.work"
    WORK_DIRS+=("$_d")
    printf -v "$1" '%s' "$_d"
}

stamp_file() { printf '%s/.stamps/%s.%s\n' "$CACHE" "$1" "$STAMP_V"; }
stamp_ok()   { [[ -f $(stamp_file "$1") ]]; }
stamp_set()  { printf '%s\n' "${2:-ok}" >"$(stamp_file "$1").tmp" && mv -f "$(stamp_file "$1").tmp" "$(stamp_file "$1")"; }
stamp_del()  { rm -f "$(stamp_file "$1")"; }

# run_logged <logfile> <what> cmd...: run quietly, show the log tail on failure
run_logged() {
    local logf=$1 what=$2; shift 2
    if ! "$@" >>"$logf" 2>&1; then
        printf '%s\n' "----- last 40 lines of $logf -----" >&2
        tail -n 40 "$logf" >&2
        die "$what failed (full log: $logf)"
    fi
}

# -------------------------------------------------------------------------------------------------
# host packages (idempotent: apt-get only runs when something is missing)
# -------------------------------------------------------------------------------------------------
ensure_debs() {   # ensure_debs <why> pkg...
    local why=$1; shift
    local p missing=()
    for p in "$@"; do
        [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null) == ii* ]] || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    log "installing missing host packages for $why: ${missing[*]}"
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root to run: apt-get install ${missing[*]}"
        sudo=(sudo)
    fi
    local logf=$CACHE/logs/apt-install.log
    local aptg=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=900)
    if ! "${aptg[@]}" install --no-install-recommends "${missing[@]}" >>"$logf" 2>&1; then
        log "apt-get install failed; refreshing the package lists and retrying"
        run_logged "$logf" "apt-get update" "${aptg[@]}" update
        run_logged "$logf" "apt-get install ${missing[*]}" "${aptg[@]}" install --no-install-recommends "${missing[@]}"
    fi
}

declare -A CMD_PKG=([curl]=curl [xz]=xz-utils [tar]=tar [readelf]=binutils [flock]=util-linux
                    [dpkg-deb]=dpkg [apt-get]=apt [sha256sum]=coreutils)
need=()
for c in "${!CMD_PKG[@]}"; do command -v "$c" >/dev/null || need+=("${CMD_PKG[$c]}"); done
((${#need[@]} == 0)) || ensure_debs "the tools this script uses" "${need[@]}"

if [[ -z ${DEBIAN_MIRROR:-} ]]; then
    srcs=(/etc/apt/sources.list.d/*.sources)
    ((${#srcs[@]} == 0)) || DEBIAN_MIRROR=$(awk '/^URIs:/{print $2; exit}' "${srcs[@]}")
fi
DEBIAN_MIRROR=${DEBIAN_MIRROR:-}
DEBIAN_MIRROR=${DEBIAN_MIRROR%/}

# -------------------------------------------------------------------------------------------------
# smoke tests
# -------------------------------------------------------------------------------------------------
# modules every interpreter must have (pip/ssl/ctypes/compression/...); EXTRA ones only warn
CORE_MODS="ssl _ssl _hashlib ctypes _ctypes zlib binascii bz2 lzma sqlite3 _decimal pyexpat _json select _socket fcntl _posixsubprocess mmap"
EXTRA_MODS="readline _curses _uuid"

smoke_imports() {   # smoke_imports <tag> <python> [required-extra-mods] [expected machine]
    local tag=$1 py=$2 req=${3:-} machine=${4:-x86_64} out
    if ! out=$(CORE="$CORE_MODS $req" EXTRA="$EXTRA_MODS" MACHINE="$machine" "$py" - <<'EOF' 2>&1
import importlib, os, platform, sys
core = os.environ["CORE"].split()
extra = [m for m in os.environ["EXTRA"].split() if m not in core]
bad, opt = [], []
for names, sink in ((core, bad), (extra, opt)):
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:
            sink.append(f"{name} ({type(e).__name__}: {e})")
import ctypes, ssl, zlib
assert ctypes.CDLL(None).strlen(b"caio") == 4, "ctypes call failed"
ssl.create_default_context()
assert zlib.decompress(zlib.compress(b"x" * 1000)) == b"x" * 1000
if platform.machine() != os.environ["MACHINE"]:
    bad.append(f"platform.machine() is {platform.machine()!r}, expected {os.environ['MACHINE']!r}")
if opt:
    print("optional modules missing: " + ", ".join(opt))
if bad:
    print("REQUIRED modules/checks failed: " + "; ".join(bad))
    sys.exit(1)
gil = getattr(sys, "_is_gil_enabled", lambda: True)()
print(f"Python {platform.python_version()} {platform.machine()} gil={'on' if gil else 'off'} OK")
EOF
    ); then
        printf '%s\n' "$out" >&2
        die "$tag ($py): smoke test failed"
    fi
    local line
    while IFS= read -r line; do
        case $line in optional*) warn "$tag: $line" ;; *) log "  $tag: $line" ;; esac
    done <<<"$out"
}

# smoke_venv <tag> <python>: mkvenv + pip install from PyPI (proves ssl) + import in the venv
smoke_venv() {
    local tag=$1 py=$2 d logf=$CACHE/logs/smoke-venv-$1.log
    new_workdir d "venv-$tag"
    : >"$logf"
    run_logged "$logf" "$tag: mkvenv" "$CACHE/bin/mkvenv" "$py" "$d/venv"
    run_logged "$logf" "$tag: pip install from PyPI in the venv" \
        "$d/venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check iniconfig
    run_logged "$logf" "$tag: import in the venv" "$d/venv/bin/python" -c '
import sys, iniconfig
assert sys.prefix != sys.base_prefix, "not running inside the venv"
print(sys.executable, sys.prefix, iniconfig.__file__)'
    log "  $tag: venv + pip install from PyPI OK"
    rm -rf "$d"
}

# -------------------------------------------------------------------------------------------------
# pip wheel (bootstraps pip into venvs of interpreters without ensurepip, e.g. Debian's 3.14)
# -------------------------------------------------------------------------------------------------
pip_wheel() { local w=("$CACHE"/wheels/pip-*.whl); ((${#w[@]})) && printf '%s\n' "${w[@]}" | sort -V | tail -n1; }

ensure_pip_wheel() {   # ensure_pip_wheel <python-with-pip>
    [[ -n $(pip_wheel) ]] && return 0
    local d
    new_workdir d pipwheel
    log "downloading the pip wheel from PyPI into $CACHE/wheels"
    run_logged "$CACHE/logs/pip-download.log" "pip download pip" \
        "$1" -m pip download --no-deps --only-binary=:all: --no-cache-dir --disable-pip-version-check -d "$d" pip
    local w=("$d"/pip-*.whl)
    ((${#w[@]} == 1)) || die "pip download produced no pip wheel (see $CACHE/logs/pip-download.log)"
    mv -f "${w[0]}" "$CACHE/wheels/"
}

write_mkvenv() {
    local f=$CACHE/bin/mkvenv
    cat >"$f.tmp" <<EOF
#!/bin/sh
# mkvenv <python> <venvdir>: create a venv with pip for any interpreter provisioned by
# manylinux/interpreters.sh (generated file; cache: $CACHE).
# Works for the sysroot/qemu wrappers too: their sys.executable is the wrapper script itself, so the
# venv's bin/python symlinks resolve to the wrapper (which passes --argv0/-0 so pyvenv.cfg is found).
# pip comes from a cached pip wheel, not ensurepip (Debian's 3.14 has no ensurepip).
set -eu
CACHE='$CACHE'
EOF
    cat >>"$f.tmp" <<'EOF'
die() { echo "mkvenv: ERROR: $*" >&2; exit 1; }
[ $# -eq 2 ] || { echo "usage: mkvenv <python> <venvdir>" >&2; exit 2; }
py=$1 venv=$2
[ -e "$venv" ] && die "$venv already exists"
whl=$(ls "$CACHE"/wheels/pip-*.whl 2>/dev/null | sort -V | tail -n 1)
[ -n "$whl" ] || die "no pip wheel in $CACHE/wheels; run manylinux/interpreters.sh first"
"$py" -m venv --without-pip "$venv" || die "'$py -m venv --without-pip $venv' failed"
"$venv/bin/python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' \
    || die "$venv/bin/python does not run inside its venv"
"$venv/bin/python" "$whl/pip" install --quiet --no-index --no-cache-dir --disable-pip-version-check "$whl" \
    || die "bootstrapping pip from $whl failed"
"$venv/bin/python" -m pip --version >&2
EOF
    chmod +x "$f.tmp"
    if [[ -f $f ]] && cmp -s "$f" "$f.tmp"; then rm -f "$f.tmp"; else mv -f "$f.tmp" "$f"; fi
}

# -------------------------------------------------------------------------------------------------
# 1. pyenv CPython 3.10-3.13 (located only)
# -------------------------------------------------------------------------------------------------
declare -A PY=()
TAGS=()

locate_pyenv() {
    local root=""
    if command -v pyenv >/dev/null; then root=$(pyenv root 2>/dev/null || true); fi
    [[ -n $root ]] || root=${PYENV_ROOT:-}
    [[ -n $root ]] || { [[ -d $HOME/.pyenv ]] && root=$HOME/.pyenv; }
    [[ -n $root && -d $root/versions ]] || die "pyenv not found (no 'pyenv' on PATH, no \$PYENV_ROOT, no ~/.pyenv/versions).
  CPython 3.10-3.13 are taken from pyenv; this script cannot install pyenv (no internet access).
  Install pyenv and 'pyenv install 3.10 3.11 3.12 3.13', or set PYENV_ROOT."
    local minor v best missing=() d
    for minor in "${PYENV_MINORS[@]}"; do
        best=""
        for d in "$root"/versions/"$minor".*; do
            v=${d##*/}
            [[ $v =~ ^${minor//./\\.}\.[0-9]+$ && -x $d/bin/python$minor ]] || continue
            best=$(printf '%s\n%s\n' "$best" "$v" | sed '/^$/d' | sort -V | tail -n1)
        done
        if [[ -z $best ]]; then missing+=("$minor"); continue; fi
        local tag=cp${minor//./}
        PY[$tag]=$root/versions/$best/bin/python$minor
        TAGS+=("$tag")
        ln -sfn "${PY[$tag]}" "$CACHE/bin/python$minor"
    done
    ((${#missing[@]} == 0)) || die "pyenv ($root) has no CPython ${missing[*]} (looked for $root/versions/<X.Y.Z>/bin/pythonX.Y).
  Installed: $(ls "$root/versions" | tr '\n' ' ')
  Install with 'pyenv install ${missing[*]}' (needs python.org access, not available here)."
    log "pyenv ($root): $(for t in "${TAGS[@]}"; do printf '%s=%s ' "$t" "$(basename "$(dirname "$(dirname "${PY[$t]}")")")"; done)"
}

smoke_pyenv() {
    local tag
    for tag in cp310 cp311 cp312 cp313; do
        local key
        key="smoke-$tag-$(basename "$(dirname "$(dirname "${PY[$tag]}")")")"
        if stamp_ok "$key" && ((!VERIFY)); then continue; fi
        log "smoke-testing $tag (${PY[$tag]})"
        smoke_imports "$tag" "${PY[$tag]}"
        smoke_venv "$tag" "${PY[$tag]}"
        stamp_set "$key"
    done
}

# -------------------------------------------------------------------------------------------------
# 2. Debian sid binary CPython sysroots (private apt config; the system apt is not touched)
# -------------------------------------------------------------------------------------------------
APTDIR=$CACHE/.apt
PRIV_APT_UPDATED=0
priv_apt_opts() {
    printf '%s\n' \
        -o "Dir::Etc::SourceList=$APTDIR/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o "Dir::State::Lists=$APTDIR/lists" -o Dir::State::status=/dev/null \
        -o "Dir::Cache=$APTDIR/cache" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= \
        -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null \
        -o APT::Architectures::=amd64 -o APT::Architectures::=arm64 \
        -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false -o Acquire::Languages=none \
        -o APT::Sandbox::User=root -q
}
priv_apt() { local o; mapfile -t o < <(priv_apt_opts); apt-get "${o[@]}" "$@"; }

priv_apt_update() {
    ((PRIV_APT_UPDATED)) && return 0
    [[ -n $DEBIAN_MIRROR ]] || die "could not determine the Debian mirror (no URIs: line in /etc/apt/sources.list.d/*.sources); set DEBIAN_MIRROR"
    mkdir -p "$APTDIR"/lists/partial "$APTDIR"/cache/archives/partial
    printf 'deb [arch=amd64,arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s sid main\n' \
        "$DEBIAN_MIRROR" >"$APTDIR/sources.list"
    log "updating the private apt indexes for Debian sid (amd64+arm64) from $DEBIAN_MIRROR"
    run_logged "$CACHE/logs/apt-sid.log" "apt-get update (private sid config)" priv_apt update
    PRIV_APT_UPDATED=1
}

# sysroot_paths <arch>: sets TRIPLET LDSO
sysroot_paths() {
    case $1 in
        amd64) TRIPLET=x86_64-linux-gnu;  LDSO=ld-linux-x86-64.so.2 ;;
        arm64) TRIPLET=aarch64-linux-gnu; LDSO=ld-linux-aarch64.so.1 ;;
        *) die "unknown arch $1" ;;
    esac
}

sid_packages() {   # sid_packages <pyversion>...
    local v
    echo libc6 libgcc-s1 libexpat1 zlib1g libssl3t64 libbz2-1.0 libffi8 liblzma5 libncursesw6 \
        libreadline8t64 libsqlite3-0 libtinfo6 libuuid1 libzstd1 libdb5.3t64
    for v in "$@"; do echo "python$v python$v-minimal libpython$v-minimal libpython$v-stdlib"; done
}

# every NEEDED soname of the interpreters and their extension modules must be in the sysroot
check_sysroot_libs() {   # check_sysroot_libs <root> <triplet> <pyversion>...
    local root=$1 trip=$2; shift 2
    local v f so missing=()
    local files=()
    for v in "$@"; do files+=("$root/usr/bin/python$v.real" "$root"/usr/lib/python"$v"/lib-dynload/*.so); done
    local dyn
    for f in "${files[@]}"; do
        dyn=$(readelf -d "$f") || die "readelf -d $f failed"
        while read -r so; do
            [[ -e $root/usr/lib/$trip/$so || -e $root/usr/lib/$so ]] || missing+=("$so (needed by ${f#"$root"/})")
        done < <(sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' <<<"$dyn")
    done
    ((${#missing[@]} == 0)) || die "sid sysroot is missing shared libraries (add the Debian packages shipping them to sid_packages):$(printf '\n  %s' "${missing[@]}")"
}

write_sysroot_wrapper() {   # <staged-root> <final-root> <arch> <pyversion>
    local final=$2 arch=$3 v=$4 wrap=$1/usr/bin/python$4
    sysroot_paths "$arch"
    mv "$wrap" "$wrap.real"
    if [[ $arch == amd64 ]]; then
        cat >"$wrap" <<EOF
#!/bin/sh
# Debian sid CPython $v (needs sid's glibc) run through the sysroot's own loader. --argv0 "\$0" makes
# sys.executable this script, so venvs and sys.executable subprocesses work. Generated by interpreters.sh.
S='$final'
exec "\$S/usr/lib/$TRIPLET/$LDSO" --library-path "\$S/usr/lib/$TRIPLET:\$S/usr/lib" --argv0 "\$0" "\$S/usr/bin/python$v.real" "\$@"
EOF
    else
        cat >"$wrap" <<EOF
#!/bin/sh
# Debian sid arm64 CPython $v under qemu user-mode emulation (-0 "\$0": sys.executable is this script, so
# venvs work). Generated by interpreters.sh.
S='$final'
exec '$CACHE/qemu/qemu-aarch64-static' -L "\$S" -0 "\$0" "\$S/usr/bin/python$v.real" "\$@"
EOF
    fi
    chmod 755 "$wrap"
}

provision_sysroot() {   # provision_sysroot <arch> <pyversion>...
    local arch=$1; shift
    local name=sid-$arch final=$CACHE/sid-$arch v ok=1
    for v in "$@"; do [[ -x $final/usr/bin/python$v && -x $final/usr/bin/python$v.real ]] || ok=0; done
    if stamp_ok "$name" && ((ok)); then return 0; fi
    stamp_del "$name"
    log "provisioning Debian sid $arch CPython $* into $final"
    priv_apt_update
    local d pkgs=() p
    new_workdir d "$name"
    mkdir -p "$d/debs" "$d/root"
    for p in $(sid_packages "$@"); do pkgs+=("$p:$arch"); done
    log "  downloading ${#pkgs[@]} sid packages ($arch)"
    (cd "$d/debs" && run_logged "$CACHE/logs/apt-sid.log" "apt-get download (sid $arch)" priv_apt download "${pkgs[@]}")
    log "  extracting"
    for p in "$d"/debs/*.deb; do
        dpkg -x "$p" "$d/root" || die "dpkg -x $p failed"
        dpkg-deb -W --showformat='${Package} ${Version}\n' "$p" >>"$d/root/.caio-packages"
    done
    [[ -e $d/root/lib ]] || ln -s usr/lib "$d/root/lib"
    sysroot_paths "$arch"
    [[ -e $d/root/usr/lib/$TRIPLET/$LDSO || -e $d/root/usr/lib/$LDSO ]] || die "no $LDSO in the extracted libc6:$arch"
    for v in "$@"; do write_sysroot_wrapper "$d/root" "$final" "$arch" "$v"; done
    check_sysroot_libs "$d/root" "$TRIPLET" "$@"
    rm -rf "$final"
    mv "$d/root" "$final"
    log "  sysroot ready: $(awk '/^python3\.[0-9]+ /{printf "%s%s %s", n++ ? ", " : "", $1, $2}' "$final/.caio-packages")"
}

finish_sid_amd64() {
    ln -sfn "$CACHE/sid-amd64/usr/bin/python3.14" "$CACHE/bin/python3.14"
    PY[cp314]=$CACHE/bin/python3.14
    TAGS+=(cp314)
    if stamp_ok sid-amd64 && ((!VERIFY)); then return 0; fi
    log "smoke-testing cp314 (${PY[cp314]})"
    smoke_imports cp314 "${PY[cp314]}"
    local d
    new_workdir d venv-check
    "${PY[cp314]}" -m venv --without-pip "$d/v" || die "cp314: '${PY[cp314]} -m venv --without-pip' failed"
    "$d/v/bin/python" -c 'import sys, ssl; assert sys.prefix != sys.base_prefix' \
        || die "cp314: the python of a venv made with '-m venv --without-pip' does not work"
    rm -rf "$d"
    smoke_venv cp314 "${PY[cp314]}"
    stamp_set sid-amd64 "$(paste -sd' ' "$CACHE/sid-amd64/.caio-packages")"
}

# -------------------------------------------------------------------------------------------------
# 3. free-threaded CPython 3.13t from Debian's orig tarball
# -------------------------------------------------------------------------------------------------
BUILD_DEBS=(build-essential pkg-config libssl-dev libffi-dev zlib1g-dev libbz2-dev liblzma-dev libsqlite3-dev
            libreadline-dev libncurses-dev uuid-dev libgdbm-dev libgdbm-compat-dev xz-utils ca-certificates)

url_exists() { curl -fsIL --retry 2 -o /dev/null "$1"; }

# sets SRC_VER SRC_SHA (sha may be empty if no Sources index lists the file)
resolve_313_source() {
    [[ -n $DEBIAN_MIRROR ]] || die "could not determine the Debian mirror; set DEBIAN_MIRROR"
    local base=$DEBIAN_MIRROR/pool/main/p/python3.13 idx=$CACHE/downloads/python3.13-orig-sha256.txt suite
    # "<sha256> python3.13_<ver>.orig.tar.xz" from the Sources indexes (checksums + candidate versions)
    if [[ ! -s $idx ]]; then
        log "reading python3.13 source checksums from the Sources indexes (sid, forky, trixie)"
        for suite in sid forky trixie; do
            curl -fsSL --retry 2 "$DEBIAN_MIRROR/dists/$suite/main/source/Sources.xz" 2>/dev/null | xz -dc 2>/dev/null |
                awk '/^Package: /{p=$2; c=0; next} /^[^ ]/{c=($1=="Checksums-Sha256:"); next}
                     c && p=="python3.13" && $3 ~ /^python3\.13_.*\.orig\.tar\.xz$/ {print $1, $3}' || true
        done | sort -u >"$idx.tmp"
        mv -f "$idx.tmp" "$idx"
        [[ -s $idx ]] || warn "no python3.13 entry found in the Sources indexes; the tarball cannot be checksum-verified"
    fi
    local cands=("$CP313T_PREF") v
    if [[ -s $CACHE/downloads/python3.13_$CP313T_PREF.orig.tar.xz ]] || url_exists "$base/python3.13_$CP313T_PREF.orig.tar.xz"; then
        SRC_VER=$CP313T_PREF
    else
        warn "$base/python3.13_$CP313T_PREF.orig.tar.xz is not available; looking for other 3.13 tarballs"
        mapfile -t cands < <( { curl -fsSL "$base/" 2>/dev/null | grep -o 'python3\.13_3\.13\.[0-9]*\.orig\.tar\.xz' || true
                               awk '{print $2}' "$idx"; } | sed 's/^python3\.13_//; s/\.orig\.tar\.xz$//' | sort -uVr)
        SRC_VER=""
        for v in "${cands[@]}"; do
            if url_exists "$base/python3.13_$v.orig.tar.xz"; then SRC_VER=$v; break; fi
            log "  python3.13_$v.orig.tar.xz: not available"
        done
        [[ -n $SRC_VER ]] || die "no python3.13_*.orig.tar.xz is downloadable from $base/ (tried: $CP313T_PREF ${cands[*]})"
    fi
    SRC_SHA=$(awk -v f="python3.13_$SRC_VER.orig.tar.xz" '$2==f{print $1; exit}' "$idx")
}

build_313t() {
    local final=$CACHE/3.13t py
    py=$final/bin/python3.13t
    if stamp_ok 3.13t && [[ -x $py ]]; then finish_313t; return 0; fi
    stamp_del 3.13t
    ensure_debs "building CPython 3.13t" "${BUILD_DEBS[@]}"
    resolve_313_source
    local tarball=$CACHE/downloads/python3.13_$SRC_VER.orig.tar.xz
    local url=$DEBIAN_MIRROR/pool/main/p/python3.13/python3.13_$SRC_VER.orig.tar.xz
    if [[ ! -s $tarball ]]; then
        log "downloading $url"
        curl -fL --retry 3 -sS -o "$tarball.part" "$url" || die "download of $url failed"
        mv -f "$tarball.part" "$tarball"
    fi
    if [[ -n $SRC_SHA ]]; then
        echo "$SRC_SHA  $tarball" | sha256sum -c --quiet - >/dev/null 2>&1 || {
            rm -f "$tarball"; die "sha256 mismatch for $tarball (expected $SRC_SHA from Debian's Sources index); deleted it, re-run"; }
        log "  sha256 verified against Debian's Sources index"
    fi
    local d logf=$CACHE/logs/build-3.13t.log t
    new_workdir d 3.13t
    : >"$logf"
    log "building free-threaded CPython $SRC_VER (--disable-gil, make -j$JOBS): ~5 min on 2 idle cores; log: $logf"
    tar -C "$d" -xf "$tarball"
    local src=("$d"/Python-*/)
    ((${#src[@]} == 1)) || die "unexpected layout of $tarball (no single Python-*/ directory)"
    mkdir "$d/build"
    t=$SECONDS
    (cd "$d/build" && run_logged "$logf" "configure" "${src[0]}configure" --prefix="$final" --disable-gil)
    log "  configure: $((SECONDS - t)) s"; t=$SECONDS
    (cd "$d/build" && run_logged "$logf" "make" make -j"$JOBS")
    log "  make: $((SECONDS - t)) s"; t=$SECONDS
    # report what CPython's check_extension_modules says about missing modules
    local miss
    miss=$(sed -n '/necessary bits to build these optional modules were not found/,/^To find the necessary bits/p;
                   /Failed to build these modules/,/^$/p; /could not be imported/,/^$/p' "$logf" | sed '/^$/d' || true)
    [[ -z $miss ]] || warn "CPython's build reports: $(printf '%s' "$miss" | tr '\n' ' ')"
    (cd "$d/build" && run_logged "$logf" "make install" make install DESTDIR="$d/stage")
    log "  install: $((SECONDS - t)) s"
    local staged=$d/stage$final
    [[ -x $staged/bin/python3.13t ]] || die "make install produced no $staged/bin/python3.13t"
    # the interpreter is relocatable enough to test in the staging dir before it goes live
    smoke_imports cp313t-staged "$staged/bin/python3.13t" "readline _curses _uuid _dbm _gdbm"
    rm -rf "$final"
    mv "$staged" "$final"
    finish_313t new
}

finish_313t() {
    local py=$CACHE/3.13t/bin/python3.13t
    ln -sfn "$py" "$CACHE/bin/python3.13t"
    PY[cp313t]=$py
    TAGS+=(cp313t)
    if [[ -z ${1:-} ]] && stamp_ok 3.13t && ((!VERIFY)); then return 0; fi
    log "smoke-testing cp313t ($py)"
    smoke_imports cp313t "$py" "readline _curses _uuid _dbm _gdbm"
    PYTHON_GIL=0 "$py" -c '
import sys, sysconfig
assert sysconfig.get_config_var("Py_GIL_DISABLED") == 1, "not a free-threaded build"
assert not sys._is_gil_enabled(), "GIL enabled under PYTHON_GIL=0"' || die "cp313t: the GIL is not disabled"
    log "  cp313t: Py_GIL_DISABLED=1, sys._is_gil_enabled() is False under PYTHON_GIL=0"
    smoke_venv cp313t "$py"
    stamp_set 3.13t "$("$py" -c 'import platform; print(platform.python_version())')"
}

# -------------------------------------------------------------------------------------------------
# 4. arm64: qemu-aarch64-static (bookworm .deb, dpkg -x only) + sid arm64 sysroot
# -------------------------------------------------------------------------------------------------
provision_qemu() {
    local q=$CACHE/qemu/qemu-aarch64-static
    if stamp_ok qemu && [[ -x $q ]]; then return 0; fi
    stamp_del qemu
    log "provisioning qemu-aarch64-static from Debian's qemu-user-static .deb (dpkg -x only, nothing installed)"
    local d logf=$CACHE/logs/qemu.log
    new_workdir d qemu
    if ! (cd "$d" && apt-get -q -o APT::Sandbox::User=root download qemu-user-static >>"$logf" 2>&1); then
        log "  apt-get download failed; refreshing the system package lists and retrying"
        run_logged "$logf" "apt-get update" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=900 update
        (cd "$d" && run_logged "$logf" "apt-get download qemu-user-static" apt-get -q -o APT::Sandbox::User=root download qemu-user-static)
    fi
    local deb=("$d"/qemu-user-static_*.deb)
    ((${#deb[@]} == 1)) || die "apt-get download qemu-user-static produced no .deb (see $logf)"
    dpkg-deb --fsys-tarfile "${deb[0]}" | tar -x -C "$d" ./usr/bin/qemu-aarch64-static \
        || die "could not extract qemu-aarch64-static from ${deb[0]}"
    "$d/usr/bin/qemu-aarch64-static" --version >/dev/null || die "qemu-aarch64-static does not run"
    mkdir -p "$CACHE/qemu"
    mv -f "$d/usr/bin/qemu-aarch64-static" "$q"
    stamp_set qemu "$(dpkg-deb -f "${deb[0]}" Version)"
    log "  $("$q" --version | head -n1)"
}

finish_sid_arm64() {
    local v tag
    for v in 3.13 3.14; do
        tag=cp${v//./}-arm64
        ln -sfn "$CACHE/sid-arm64/usr/bin/python$v" "$CACHE/bin/python$v-arm64"
        PY[$tag]=$CACHE/bin/python$v-arm64
        TAGS+=("$tag")
    done
    if stamp_ok sid-arm64 && ((!VERIFY)); then return 0; fi
    for v in 3.13 3.14; do
        tag=cp${v//./}-arm64
        log "smoke-testing $tag under qemu (${PY[$tag]}; a few seconds)"
        smoke_imports "$tag" "${PY[$tag]}" "" aarch64
    done
    stamp_set sid-arm64 "$(paste -sd' ' "$CACHE/sid-arm64/.caio-packages")"
}

# -------------------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------------------
log "cache: $CACHE"
locate_pyenv
ensure_pip_wheel "${PY[cp312]}"
write_mkvenv
smoke_pyenv

provision_sysroot amd64 3.14
finish_sid_amd64

build_313t

if ((ARM64)); then
    provision_qemu
    provision_sysroot arm64 3.13 3.14
    finish_sid_arm64
elif stamp_ok sid-arm64 && stamp_ok qemu && [[ -x $CACHE/bin/python3.13-arm64 && -x $CACHE/bin/python3.14-arm64 ]]; then
    finish_sid_arm64   # provisioned by an earlier --arm64 run: keep listing it
fi

# the private sid indexes (~45 MB) are only needed while provisioning; every provisioning run re-fetches them
if ((PRIV_APT_UPDATED)); then rm -rf "$APTDIR/lists" "$APTDIR/cache"; fi

list=$CACHE/interpreters.txt
for tag in "${TAGS[@]}"; do printf '%s %s\n' "$tag" "${PY[$tag]}"; done >"$list.tmp"
if [[ -f $list ]] && cmp -s "$list" "$list.tmp"; then rm -f "$list.tmp"; else mv -f "$list.tmp" "$list"; fi
log "done in $((SECONDS - T0)) s: ${#TAGS[@]} interpreters listed in $list (venv helper: $CACHE/bin/mkvenv <python> <dir>)"
if ((PRINT)); then cat "$list"; fi
