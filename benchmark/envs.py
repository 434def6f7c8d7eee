"""Environment: cached virtualenvs, fio, the test files, machine facts."""

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DRIVER = os.path.join(HERE, "driver.py")
REQUIREMENTS = os.path.join(HERE, "requirements.txt")
UPSTREAM_REQ = "caio==0.12.10"
BLOCK = 4096
MAGIC = 0xCA10BE4C_0000_0001
DATA_FORMAT = 1


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cache_dir(override=None):
    if override:
        return override
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "caio-bench")


# ------------------------------------------------------------ interpreters


def python_cmd(python):
    """Command prefix that runs a script without putting its directory (or the
    repository) on sys.path: -P where supported (3.11+); driver.py also
    strips its own directory for older interpreters."""
    return [python, "-P"] if py_version(python) >= (3, 11) else [python]


_PYVER = {}


def py_version(python):
    if python not in _PYVER:
        out = subprocess.run(
            [
                python,
                "-c",
                "import sys; print(sys.version_info[0], sys.version_info[1], "
                "sys.version.split()[0], sys.implementation.name, "
                "int(not getattr(sys, '_is_gil_enabled', lambda: True)()))",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=tempfile.gettempdir(),
        )
        a, b, full, impl, ft = out.stdout.split()
        _PYVER[python] = (int(a), int(b))
        _PYVER[python + "#tag"] = "%s-%s%s" % (impl, full, "t" if ft == "1" else "")
    return _PYVER[python]


def py_tag(python):
    py_version(python)
    return _PYVER[python + "#tag"]


def _run(cmd, **kw):
    log("  $ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


def ensure_venv(base_python, directory, requirements, label, offline_ok=False):
    """Create (once) and return the python of a venv holding ``requirements``.

    A stamp file records what was installed; the venv is rebuilt when the
    requirement text or the base interpreter changes."""
    stamp_text = json.dumps(
        {"base": os.path.realpath(base_python), "tag": py_tag(base_python), "req": requirements}
    )
    stamp = os.path.join(directory, ".caio-bench-stamp")
    py = os.path.join(directory, "bin", "python")
    if os.path.exists(stamp) and os.path.exists(py):
        with open(stamp) as f:
            if f.read() == stamp_text:
                return py
    log("setup: creating %s venv in %s" % (label, directory))
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    _run([base_python, "-m", "venv", directory], cwd=tempfile.gettempdir())
    req_file = os.path.join(directory, "requirements.txt")
    with open(req_file, "w") as f:
        f.write(requirements)
    _run(
        [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", req_file],
        cwd=tempfile.gettempdir(),
    )
    with open(stamp, "w") as f:
        f.write(stamp_text)
    return py


def upstream_venv(base_python, cache):
    d = os.path.join(cache, "upstream-%s" % py_tag(base_python))
    return ensure_venv(base_python, d, UPSTREAM_REQ + "\n", "upstream caio 0.12.10")


def tools_venv(base_python, cache):
    with open(REQUIREMENTS) as f:
        req = f.read()
    d = os.path.join(cache, "tools-%s" % py_tag(base_python))
    return ensure_venv(base_python, d, req, "tools (aiofiles, anyio, matplotlib)")


# Installed without dependencies into a directory of their own and appended to the
# sys.path of every caio contender's driver (ours, base, upstream): the loop and the
# library on top run against whichever caio that interpreter imports first.
EXTRAS = ("uvloop", "aiofile")


def extras_requirements():
    """The pinned lines of EXTRAS, taken from requirements.txt (one place for versions)."""
    with open(REQUIREMENTS) as f:
        lines = [ln.split("#")[0].strip() for ln in f]
    return [ln for ln in lines if ln.split("=")[0].split(";")[0].strip() in EXTRAS]


def extras_dir(base_python, cache):
    """A ``pip install --no-deps --target`` directory with uvloop and aiofile for
    ``base_python`` (aiofile's own caio dependency is deliberately not installed:
    it must run on the caio of the interpreter that measures it).  Returns the
    directory, or None (logged) when it cannot be installed."""
    req = extras_requirements()
    d = os.path.join(cache, "extras-%s" % py_tag(base_python))
    stamp_text = json.dumps({"tag": py_tag(base_python), "req": req})
    stamp = os.path.join(d, ".caio-bench-stamp")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if f.read() == stamp_text:
                return d
    log("setup: installing %s into %s" % (", ".join(req), d))
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    try:
        _run(
            [base_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            + ["--no-deps", "--target", d]
            + req,
            cwd=tempfile.gettempdir(),
        )
    except (subprocess.CalledProcessError, OSError) as e:
        log("setup: extras install failed (%s): no uvloop/aiofile rows for caio" % e)
        return None
    with open(stamp, "w") as f:
        f.write(stamp_text)
    return d


def probe(python, extra_path=None):
    """Run driver.py probe with ``python`` from a neutral cwd (``extra_path``:
    a directory appended to its sys.path, see extras_dir)."""
    with tempfile.TemporaryDirectory(prefix="caio-bench-probe-") as tmp:
        out = subprocess.run(
            python_cmd(python) + [DRIVER, "probe"] + ([extra_path] if extra_path else []),
            capture_output=True,
            text=True,
            cwd=tmp,
            timeout=120,
        )
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------- fio


def fio_path():
    return shutil.which("fio")


def ensure_fio(install=True):
    p = fio_path()
    if p or not install:
        return p
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log(
            "setup: fio missing and cannot apt-get install it (not root or no apt); "
            "fio rows skipped"
        )
        return None
    log("setup: installing fio with apt-get (Debian package)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for attempt in range(2):
        r = subprocess.run(
            ["apt-get", "install", "-y", "-q", "fio"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if r.returncode == 0:
            break
        if attempt == 0:
            subprocess.run(
                ["apt-get", "update", "-q"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    else:
        log("setup: apt-get install fio failed: %s" % r.stderr.strip()[-500:])
    return fio_path()


def fio_version(path):
    try:
        return subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


# ------------------------------------------------------------ filesystems


def mount_of(path):
    """(mount point, fs type, device) of the filesystem holding ``path``."""
    path = os.path.realpath(path)
    best = ("/", "?", "?")
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    return best


def block_device_info(dev):
    info = {}
    name = os.path.basename(os.path.realpath(dev)) if dev.startswith("/dev/") else None
    if not name:
        return info
    for base in (name, name.rstrip("0123456789").rstrip("p")):
        q = "/sys/block/%s/queue" % base
        if os.path.isdir(q):
            for key in (
                "rotational",
                "scheduler",
                "nr_requests",
                "read_ahead_kb",
                "logical_block_size",
            ):
                try:
                    with open(os.path.join(q, key)) as f:
                        info[key] = f.read().strip()
                except OSError:
                    pass
            info["device"] = base
            break
    return info


def _size_ok(path, size):
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False


def _file_ok(path, size):
    try:
        if os.path.getsize(path) != size:
            return False
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(size - BLOCK)
            tail = f.read(16)
        return head == (0).to_bytes(8, "little") + MAGIC.to_bytes(8, "little") and tail == (
            (size - BLOCK) // BLOCK
        ).to_bytes(8, "little") + MAGIC.to_bytes(8, "little")
    except OSError:
        return False


def ensure_data_file(path, size, verify_content=True):
    """A file of ``size`` bytes whose every 4 KiB block starts with its block
    number and a magic (so the driver can verify every read), the rest random.
    Reused across runs when already present with the right size."""
    if _file_ok(path, size) if verify_content else _size_ok(path, size):
        return False
    log("setup: writing %d MiB test file %s" % (size >> 20, path))
    import random

    rnd = random.Random(1234)
    mib = 1 << 20
    base = bytearray(rnd.randbytes(mib))
    magic = MAGIC.to_bytes(8, "little")
    tmp = path + ".tmp"
    with open(tmp, "wb", buffering=0) as f:
        off = 0
        while off < size:
            n = min(mib, size - off)
            buf = bytearray(base[:n])
            for b in range(0, n, BLOCK):
                buf[b : b + 16] = ((off + b) // BLOCK).to_bytes(8, "little") + magic
            f.write(buf)
            off += n
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def check_eviction(path, size):
    """Show that fsync + POSIX_FADV_DONTNEED really drops pages on this fs:
    RWF_NOWAIT reads must fail with EAGAIN after eviction and succeed once the
    pages are read again; mincore(2) must agree for the whole file."""
    import random

    from .driver import _resident_fraction

    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(BLOCK)
    rnd = random.Random(7)
    offs = [rnd.randrange(0, size // BLOCK) * BLOCK for _ in range(32)]

    def resident():
        n = 0
        for o in offs:
            try:
                if os.preadv(fd, [buf], o, os.RWF_NOWAIT) == BLOCK:
                    n += 1
            except BlockingIOError:
                pass
        return n

    try:
        for o in offs:
            os.pread(fd, BLOCK, o)
        before = resident()
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        mincore_after = _resident_fraction(path, size)
        after = resident()
        ok = before == len(offs) and after == 0 and mincore_after < 0.001
        return {
            "ok": ok,
            "sampled": len(offs),
            "resident_before": before,
            "resident_after_evict": after,
            "mincore_resident_after_evict": mincore_after,
            "method": (
                "fsync + posix_fadvise(DONTNEED), verified with preadv(RWF_NOWAIT) and mincore"
            ),
        }
    except OSError as e:
        return {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
    finally:
        os.close(fd)


# ---------------------------------------------------------------- machine


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def loadavg():
    parts = _read("/proc/loadavg").split()
    return [float(x) for x in parts[:3]] if len(parts) >= 3 else [None, None, None]


def uptime_text():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return " ".join(str(x) for x in loadavg())


def machine_info():
    cpu = None
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = None
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) // 1024
    u = platform.uname()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    git = {}
    for key, cmd in (
        ("commit", ["git", "rev-parse", "HEAD"]),
        ("branch", ["git", "rev-parse", "--abbrev-ref", "HEAD"]),
        ("dirty", ["git", "status", "--porcelain"]),
    ):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO).stdout.strip()
            git[key] = bool(out) if key == "dirty" else out
        except OSError:
            pass
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "mem_total_mib": mem,
        "kernel": "%s %s" % (u.system, u.release),
        "kernel_version": u.version,
        "machine": u.machine,
        "hostname_hash": hashlib.sha1(u.node.encode()).hexdigest()[:8],
        "aio_max_nr": _read("/proc/sys/fs/aio-max-nr").strip() or None,
        "io_uring_disabled": _read("/proc/sys/kernel/io_uring_disabled").strip() or None,
        "runner_python": sys.version.split()[0],
        "git": git,
    }
