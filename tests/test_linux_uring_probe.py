"""Import-time probe of caio.linux_uring: a diagnosed ImportError and the fallback.

The probe is made to fail for real — a seccomp filter installed in a child
process makes io_uring_setup() return ENOSYS, exactly like Docker's default
profile — and through the test hooks CAIO_TEST_URING_PROBE_ERRNO and
CAIO_TEST_URING_KERNEL, which only builds with the ``test-hooks`` cargo feature
honour (``make develop``; release wheels do not: those tests skip there).
"""

import importlib.util
import os
import platform
import subprocess
import sys
import textwrap

import pytest

linux_uring = pytest.importorskip("caio.linux_uring")

needs_test_hooks = pytest.mark.skipif(
    not linux_uring._TEST_HOOKS,
    reason="built without the test-hooks cargo feature (CAIO_TEST_HOOKS=1): CAIO_TEST_* unread",
)

# The seccomp tests install their filter with ctypes (prctl); an interpreter
# built without _ctypes (e.g. the musl CPython of manylinux/musl-python.sh,
# which has no libffi) cannot do that.
needs_ctypes = pytest.mark.skipif(
    importlib.util.find_spec("_ctypes") is None, reason="needs ctypes to install a seccomp filter"
)


def run_child(code, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=e,
        capture_output=True,
        text=True,
        timeout=60,
    )


IMPORT_AND_REPORT = """
    import sys
    try:
        import caio.linux_uring
    except ImportError as e:
        print("IMPORTERROR")
        print(e)
    else:
        print("IMPORTED", caio.linux_uring.SQPOLL_ALLOWED)
    try:
        import caio.linux_uring_asyncio
    except ImportError:
        print("ADAPTER-IMPORTERROR")
    import caio
    if hasattr(caio, "variants"):
        print("FRONTEND", caio.linux_uring is None, caio.linux_uring_asyncio is None,
              caio.preferred.__name__)
"""


def test_probe_succeeds_normally():
    p = run_child(IMPORT_AND_REPORT)
    assert p.returncode == 0, p.stderr
    assert "IMPORTED" in p.stdout


@needs_test_hooks
def test_enosys_names_the_seccomp_fix():
    p = run_child(IMPORT_AND_REPORT, {"CAIO_TEST_URING_PROBE_ERRNO": "38"})
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "IMPORTERROR" in out and "ADAPTER-IMPORTERROR" in out
    assert "ENOSYS" in out
    assert "seccomp=unconfined" in out
    assert "seccompProfile" in out
    assert platform.release() in out
    if "FRONTEND" in out:  # the package front-end falls back
        assert "FRONTEND True True" in out
        assert "linux_uring" not in out.split("FRONTEND")[1]


@needs_test_hooks
def test_eperm_names_the_sysctl():
    p = run_child(IMPORT_AND_REPORT, {"CAIO_TEST_URING_PROBE_ERRNO": "1"})
    assert "IMPORTERROR" in p.stdout
    assert "kernel.io_uring_disabled" in p.stdout
    assert "EPERM" in p.stdout


@needs_test_hooks
def test_other_errno_is_reported():
    p = run_child(IMPORT_AND_REPORT, {"CAIO_TEST_URING_PROBE_ERRNO": "5"})
    assert "IMPORTERROR" in p.stdout
    assert "io_uring_setup probe failed" in p.stdout


@needs_test_hooks
def test_old_kernel():
    p = run_child(IMPORT_AND_REPORT, {"CAIO_TEST_URING_KERNEL": "5.4.0-150-generic"})
    assert "IMPORTERROR" in p.stdout
    assert "requires Linux 5.6+" in p.stdout and "5.4.0-150-generic" in p.stdout


@pytest.mark.skipif(linux_uring._TEST_HOOKS, reason="this build honours the test hooks")
def test_release_builds_ignore_the_test_hooks():
    p = run_child(
        IMPORT_AND_REPORT,
        {"CAIO_TEST_URING_PROBE_ERRNO": "38", "CAIO_TEST_URING_KERNEL": "5.4.0-150-generic"},
    )
    assert p.returncode == 0, p.stderr
    assert "IMPORTED" in p.stdout


SECCOMP = """
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    NR_IO_URING_SETUP = 425  # same number on x86_64 and aarch64
    ENOSYS = 38
    RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
    LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
    prog = [
        (LD_W_ABS, 0, 0, 0),                       # A = seccomp_data.nr
        (JEQ_K, 0, 1, NR_IO_URING_SETUP),          # io_uring_setup?
        (RET_K, 0, 0, RET_ERRNO | ENOSYS),         #   -> ENOSYS (like Docker)
        (RET_K, 0, 0, RET_ALLOW),
    ]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)

    class sock_fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = sock_fprog(len(prog), ctypes.addressof(buf))
    assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        print("NOSECCOMP", ctypes.get_errno())
        raise SystemExit(0)
"""


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"),
    reason="syscall number known for x86_64/aarch64 only",
)
@needs_ctypes
def test_real_seccomp_filter_falls_back():
    p = run_child(SECCOMP + IMPORT_AND_REPORT)
    if "NOSECCOMP" in p.stdout:
        pytest.skip("cannot install a seccomp filter here")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "IMPORTERROR" in out
    assert "ENOSYS" in out and "seccomp=unconfined" in out
    if "FRONTEND" in out:
        assert "FRONTEND True True" in out


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"),
    reason="syscall number known for x86_64/aarch64 only",
)
@needs_ctypes
def test_python_m_caio_shows_the_reason():
    # Only meaningful once the package front-end (python -m caio) exists.
    import importlib.util

    if importlib.util.find_spec("caio.__main__") is None:
        pytest.skip("caio has no __main__ yet")
    p = run_child(
        textwrap.dedent(SECCOMP) + "\nimport runpy; runpy.run_module('caio', run_name='__main__')\n"
    )
    if "NOSECCOMP" in p.stdout:
        pytest.skip("cannot install a seccomp filter here")
    out = p.stdout + p.stderr
    assert "seccomp=unconfined" in out, out
    assert "linux_uring" in out
