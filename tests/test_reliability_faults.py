"""Faults are surfaced, not swallowed.

Each fault is injected into one operation while others are in flight on the
same AsyncioContext (``asyncio.gather``): the failing operation's awaiter -
and only it - gets an ``OSError`` with the right ``errno``; on the native
backends it is also a ``SystemError`` (upstream's type, DESIGN.md §6.2 errtype), on
python_aio it is the original ``OSError``. The other operations return
exactly what they should, the file holds exactly their data, and the context
keeps working.

Faults: EBADF (closed fd, write to a read-only fd), EINVAL (O_DIRECT write
at an unaligned offset - the uring/linux_aio aligned windows only cover
reads and aligned writes), EFBIG (``RLIMIT_FSIZE`` in a subprocess with
SIGXFSZ ignored, plus the partial write that crosses the limit), ENOSPC (a
256 KiB tmpfs mounted by the test - needs root), EISDIR (read of a directory),
special files (/dev/full, /dev/zero, pipes, /proc, sysfs: what os.pread and
os.pwrite give, raw and under asyncio), and full rings/queues in the raw API.
"""

import asyncio
import errno
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import pytest

from helpers import AsyncBackend, LoopRunner, RawBackend, read_file, run_python

STATS: dict[str, int] = {}


def _count(key: str, n: int = 1) -> None:
    STATS[key] = STATS.get(key, 0) + n


N_GOOD = 12
CHUNK = 4096


def check_error(backend_name: str, exc: BaseException, expected_errno: int) -> None:
    assert isinstance(exc, OSError), (type(exc), exc)
    assert exc.errno == expected_errno, (exc.errno, expected_errno, exc)
    assert exc.strerror, exc
    _count(f"{errno.errorcode[expected_errno]} on {backend_name}")
    if backend_name == "linux_aio" and isinstance(exc, ValueError):
        # Refused by io_submit: upstream raised ValueError from submit()
        # (DESIGN.md §4.5); ours is SubmitError(OSError, ValueError).
        return
    if backend_name != "python_aio":
        # Also upstream's type: code written for upstream caio catches it.
        assert isinstance(exc, SystemError), type(exc).__mro__


async def with_neighbours(
    ctx: Any,
    good_fd: int,
    fault: Callable[[], Any],
) -> tuple[BaseException, list[Any]]:
    """Runs ``fault()`` among N_GOOD writes and N_GOOD reads of ``good_fd``;
    returns the fault's exception and checks the neighbours."""
    os.pwrite(good_fd, b"R" * (CHUNK * N_GOOD), CHUNK * 64)
    coros: list[Any] = []
    for i in range(N_GOOD):
        coros.append(ctx.write(bytes([65 + i]) * CHUNK, good_fd, CHUNK * i))
        coros.append(ctx.read(CHUNK, good_fd, CHUNK * (64 + i)))
        if i == N_GOOD // 2:
            coros.append(fault())
    results = await asyncio.gather(*coros, return_exceptions=True)
    fault_result = results.pop(2 * (N_GOOD // 2) + 2)
    assert isinstance(fault_result, BaseException), ("the fault did not fail", fault_result)
    for i in range(N_GOOD):
        assert results[2 * i] == CHUNK, (i, results[2 * i])
        assert results[2 * i + 1] == b"R" * CHUNK, (i, results[2 * i + 1])
    content = os.pread(good_fd, CHUNK * N_GOOD, 0)
    assert content == b"".join(bytes([65 + i]) * CHUNK for i in range(N_GOOD))
    # The context still works afterwards.
    assert await ctx.write(b"after", good_fd, CHUNK * 200) == 5
    assert await ctx.read(5, good_fd, CHUNK * 200) == b"after"
    _count("faults injected")
    return fault_result, results


# -- EBADF, EISDIR, EINVAL ---------------------------------------------------------------


def test_ebadf_closed_fd(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
    closed_fd: int,
) -> None:
    async def main() -> BaseException:
        async with async_backend.context(64) as ctx:
            exc, _ = await with_neighbours(ctx, tmp_fd, lambda: ctx.write(b"lost", closed_fd, 0))
            exc2, _ = await with_neighbours(ctx, tmp_fd, lambda: ctx.read(16, closed_fd, 0))
            exc3, _ = await with_neighbours(ctx, tmp_fd, lambda: ctx.fdsync(closed_fd))
            for e in (exc2, exc3):
                check_error(async_backend.name, e, errno.EBADF)
            return exc

    check_error(async_backend.name, aio.run(main()), errno.EBADF)


def test_ebadf_write_to_read_only_fd(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
    tmp_path: Any,
) -> None:
    path = str(tmp_path / "ro.bin")
    with open(path, "wb") as fp:
        fp.write(b"read only")
    ro = os.open(path, os.O_RDONLY)
    try:

        async def main() -> BaseException:
            async with async_backend.context(64) as ctx:
                exc, _ = await with_neighbours(ctx, tmp_fd, lambda: ctx.write(b"XX", ro, 0))
                return exc

        check_error(async_backend.name, aio.run(main()), errno.EBADF)
    finally:
        os.close(ro)
    with open(path, "rb") as fp:
        assert fp.read() == b"read only"


def test_eisdir(async_backend: AsyncBackend, aio: LoopRunner, tmp_fd: int, tmp_path: Any) -> None:
    directory = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:

        async def main() -> BaseException:
            async with async_backend.context(64) as ctx:
                exc, _ = await with_neighbours(ctx, tmp_fd, lambda: ctx.read(64, directory, 0))
                return exc

        exc = aio.run(main())
    finally:
        os.close(directory)
    # linux_aio: io_submit refuses a directory (EINVAL); a worker's pread
    # then gives the true errno, like every other backend.
    check_error(async_backend.name, exc, errno.EISDIR)


# -- special files: what os.pread / os.pwrite give ---------------------------------
#
# Files without a kernel AIO path (linux_aio's io_submit refuses them with
# EINVAL) or that io_uring handles through another code path: every backend
# must give what the system call gives, raw and under asyncio.

SPECIAL_CASES = (
    "devfull_write",
    "dir_read",
    "pipe_read",
    "proc_read",
    "sys_read",
    "devzero_read",
)

SYSFS_CANDIDATES = (
    "/sys/devices/system/cpu/online",
    "/sys/devices/system/cpu/possible",
    "/sys/kernel/mm/transparent_hugepage/enabled",
    "/sys/power/state",
)

PIPE_DATA = b"through the pipe"


def _sysfs_file() -> str | None:
    for path in SYSFS_CANDIDATES:
        try:
            with open(path, "rb") as fp:
                if fp.read():
                    return path
        except OSError:
            continue
    return None


class SpecialCase:
    """One operation on a special file and the outcome it must have."""

    def __init__(self, case: str, backend_name: str, tmp_path: Any) -> None:
        self.fds: list[int] = []
        self.kind = "read"
        self.offset = 0
        self.errno: int | None = None
        self.check: Callable[[bytes], bool] = lambda data: True
        if case == "devfull_write":
            self.kind = "write"
            self.fd = self._open("/dev/full", os.O_WRONLY)
            self.arg: Any = b"x" * 64
            self.errno = errno.ENOSPC
        elif case == "dir_read":
            self.fd = self._open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
            self.arg = 64
            self.errno = errno.EISDIR
        elif case == "pipe_read":
            r, w = os.pipe()
            self.fds += [r, w]
            os.write(w, PIPE_DATA)
            self.fd, self.arg = r, len(PIPE_DATA)
            if backend_name in ("thread_aio", "python_aio"):
                # The pool backends run os.pread(), which has no stream
                # semantics: ESPIPE, exactly what os.pread(r, n, 0) gives.
                self.errno = errno.ESPIPE
            else:
                self.check = lambda data: data == PIPE_DATA
        elif case == "proc_read":
            self.fd = self._open("/proc/self/status", os.O_RDONLY)
            self.arg = 4096
            self.check = lambda data: data.startswith(b"Name:\t") and b"\nPid:\t" in data
        elif case == "sys_read":
            path = _sysfs_file()
            if path is None:
                pytest.skip("no readable sysfs file")
            self.fd = self._open(path, os.O_RDONLY)
            with open(path, "rb") as fp:
                expected = fp.read()
            self.arg = 4096
            self.check = lambda data: data == expected
        elif case == "devzero_read":
            self.fd = self._open("/dev/zero", os.O_RDONLY)
            # One page: /dev/zero may end a longer non-blocking read early
            # when the task should reschedule (a legal short read, which
            # io_uring passes on).
            self.arg = 4096
            self.check = lambda data: data == bytes(4096)
        else:
            raise AssertionError(case)

    def _open(self, path: str, flags: int) -> int:
        try:
            fd = os.open(path, flags)
        except OSError as e:
            self.close()
            pytest.skip(f"{path}: {e}")
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def verify(self, backend_name: str, outcome: Any) -> None:
        if self.errno is not None:
            check_error(backend_name, outcome, self.errno)
            # Reported at completion, like every other backend: never a
            # submit-time refusal.
            assert not (backend_name == "linux_aio" and isinstance(outcome, ValueError)), outcome
            return
        assert not isinstance(outcome, BaseException), repr(outcome)
        if self.kind == "write":
            assert outcome == len(self.arg)
        else:
            assert isinstance(outcome, bytes), type(outcome)
            assert self.check(outcome), outcome[:200]


@pytest.mark.parametrize("case", SPECIAL_CASES)
def test_special_files_raw(backend: RawBackend, tmp_path: Any, case: str) -> None:
    sc = SpecialCase(case, backend.name, tmp_path)
    try:
        ctx = backend.context()
        if sc.kind == "write":
            op = backend.Operation.write(sc.arg, sc.fd, sc.offset)
        else:
            op = backend.Operation.read(sc.arg, sc.fd, sc.offset)
        backend.run_one(ctx, op)
        try:
            outcome = op.get_value()
        except OSError as e:
            outcome = e
        sc.verify(backend.name, outcome)
    finally:
        sc.close()


@pytest.mark.parametrize("case", SPECIAL_CASES)
def test_special_files_asyncio(
    async_backend: AsyncBackend, aio: LoopRunner, tmp_fd: int, tmp_path: Any, case: str
) -> None:
    sc = SpecialCase(case, async_backend.name, tmp_path)
    try:

        async def main() -> Any:
            async with async_backend.context(64) as ctx:
                if sc.kind == "write":
                    fault = lambda: ctx.write(sc.arg, sc.fd, sc.offset)  # noqa: E731
                else:
                    fault = lambda: ctx.read(sc.arg, sc.fd, sc.offset)  # noqa: E731
                try:
                    alone = await fault()
                except OSError as e:
                    alone = e
                if sc.errno is None:
                    return alone
                # A failing one among others: it alone fails, with its errno.
                exc, _ = await with_neighbours(ctx, tmp_fd, fault)
                return alone, exc

        outcome = aio.run(main())
        if sc.errno is None:
            sc.verify(async_backend.name, outcome)
        else:
            for o in outcome:
                sc.verify(async_backend.name, o)
    finally:
        sc.close()


def _supports_o_direct(directory: str) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(os.path.join(directory, "probe"), os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


def test_einval_unaligned_o_direct_write(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
    tmp_path: Any,
) -> None:
    """O_DIRECT writes at an unaligned offset are EINVAL on every backend;
    aligned ones work on uring/linux_aio (aligned bounce buffers), and their
    unaligned *reads* work too (DESIGN.md §10)."""
    if not _supports_o_direct(str(tmp_path)):
        pytest.skip("the filesystem of tmp_path does not support O_DIRECT")
    path = str(tmp_path / "direct.bin")
    with open(path, "wb") as fp:
        fp.write(b"D" * 65536)
    direct = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:

        async def main() -> BaseException:
            async with async_backend.context(64) as ctx:
                exc, _ = await with_neighbours(
                    ctx, tmp_fd, lambda: ctx.write(b"U" * 4096, direct, 1)
                )
                exc_len, _ = await with_neighbours(
                    ctx, tmp_fd, lambda: ctx.write(b"U" * 1000, direct, 4096)
                )
                check_error(async_backend.name, exc_len, errno.EINVAL)
                if async_backend.is_linux:
                    assert await ctx.write(b"A" * 4096, direct, 8192) == 4096
                    assert await ctx.read(100, direct, 8190) == b"DD" + b"A" * 98
                return exc

        check_error(async_backend.name, aio.run(main()), errno.EINVAL)
    finally:
        os.close(direct)
    with open(path, "rb") as fp:
        data = fp.read()
    assert b"U" not in data  # nothing of the refused writes landed
    assert len(data) == 65536


# -- EFBIG (RLIMIT_FSIZE, in a subprocess) -----------------------------------------------

EFBIG_SCRIPT = r"""
import asyncio, importlib, json, os, resource, signal, sys
name, kwargs, path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
LIMIT = 1 << 20
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
adapter = importlib.import_module("caio." + name + "_asyncio")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

def describe(x):
    if isinstance(x, BaseException):
        return {"error": type(x).__name__, "errno": getattr(x, "errno", None),
                "oserror": isinstance(x, OSError), "systemerror": isinstance(x, SystemError)}
    return {"value": x if isinstance(x, int) else len(x)}

async def main():
    async with adapter.AsyncioContext(64, **kwargs) as ctx:
        coros = [ctx.write(b"g" * 4096, fd, 4096 * i) for i in range(16)]
        coros.append(ctx.write(b"x" * 4096, fd, LIMIT))           # beyond: EFBIG
        coros.append(ctx.write(b"p" * 4096, fd, LIMIT - 1000))    # crosses: partial
        results = await asyncio.gather(*coros, return_exceptions=True)
        results += await asyncio.gather(*[ctx.read(4096, fd, 4096 * i) for i in range(4)])
        after = await ctx.write(b"after", fd, 4096 * 20)
        return [describe(r) for r in results], after

results, after = asyncio.run(main())
print(json.dumps({"results": results, "after": after, "size": os.fstat(fd).st_size}))
"""


def test_efbig_file_size_limit(async_backend: AsyncBackend, tmp_path: Any) -> None:
    proc = run_python(
        [
            "-c",
            EFBIG_SCRIPT,
            async_backend.name,
            json.dumps(async_backend.kwargs),
            str(tmp_path / "big.bin"),
        ],
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not proc.stderr.strip(), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    results = report["results"]
    assert results[:16] == [{"value": 4096}] * 16, results[:16]
    efbig, partial = results[16], results[17]
    assert efbig["error"] and efbig["errno"] == errno.EFBIG and efbig["oserror"], efbig
    if not (async_backend.is_linux_aio and efbig["error"] == "SubmitError"):
        assert efbig["systemerror"] == (async_backend.name != "python_aio"), efbig
    # POSIX partial write: what fits below the limit is written and counted.
    assert partial == {"value": 1000}, partial
    assert results[18:] == [{"value": 4096}] * 4, results[18:]
    assert report["after"] == 5
    assert report["size"] == 1 << 20
    _count("faults injected", 2)
    _count(f"EFBIG on {async_backend.name}")


# -- ENOSPC (a tiny tmpfs) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def full_fs() -> Any:
    """A 256 KiB tmpfs, mounted for this module and filled up."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mountpoint = tempfile.mkdtemp(prefix="caio-enospc-")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", mountpoint],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        os.rmdir(mountpoint)
        pytest.skip("cannot mount a tmpfs here: " + proc.stderr.strip())
    try:
        filler = os.open(os.path.join(mountpoint, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(filler, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(filler)
        yield mountpoint
    finally:
        subprocess.run(["umount", mountpoint], check=False)
        os.rmdir(mountpoint)


def test_enospc(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
    full_fs: str,
) -> None:
    path = os.path.join(full_fs, f"victim-{os.getpid()}")
    victim = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:

        async def main() -> BaseException:
            async with async_backend.context(64) as ctx:
                exc, _ = await with_neighbours(
                    ctx, tmp_fd, lambda: ctx.write(b"N" * 65536, victim, 0)
                )
                return exc

        check_error(async_backend.name, aio.run(main()), errno.ENOSPC)
    finally:
        os.close(victim)
        os.unlink(path)


# -- full rings and queues (raw API) --------------------------------------------------------

CAPACITY_TYPES = {
    "linux_uring": OverflowError,
    "linux_aio": OverflowError,
    "thread_aio": RuntimeError,
    "python_aio": RuntimeError,
}


def _capacity_context(backend: RawBackend) -> Any:
    if backend.is_thread or backend.is_python:
        return backend.context(1, pool_size=1)
    return backend.context(1)


def test_full_ring_or_queue(backend: RawBackend, tmp_fd: int) -> None:
    """Submitting far more than the capacity: the refusal is the contract's
    type (DESIGN.md §4.2), raised to the submitter; the operations accepted
    before it (a prefix of the batch) complete with the right data; the
    refused one and the rest are untouched and work when submitted again
    (linux_aio: a count instead of a refusal - its workers take the
    overflow)."""
    import time

    ctx = _capacity_context(backend)
    ops = [backend.Operation.write(b"%04d" % i, tmp_fd, 4 * i) for i in range(64)]
    calls: list[list[Any]] = [[] for _ in ops]
    for op, record in zip(ops, calls, strict=True):
        op.set_callback(record.append)
    try:
        accepted = ctx.submit(*ops)
    except Exception as exc:
        assert not backend.is_linux_aio, exc
        assert isinstance(exc, CAPACITY_TYPES[backend.name]), exc
        _count("full ring/queue refusals")
        # The count is lost with the exception: wait until the accepted
        # prefix has been delivered.
        previous, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 0.3:
            backend.drive(ctx)
            done = sum(1 for c in calls if c)
            if done != previous:
                previous, stable_since = done, time.monotonic()
            time.sleep(0.005)
        accepted = previous
    else:
        assert backend.is_linux_aio and 0 < accepted <= 64, accepted
        backend.wait_for(ctx, lambda: sum(1 for c in calls if c) == accepted)
    assert 1 <= accepted < 64 or backend.is_linux_aio
    assert [bool(c) for c in calls] == [True] * accepted + [False] * (64 - accepted)
    for i, op in enumerate(ops[accepted:], accepted):
        # Rolled back: still fresh, with its original payload and callback.
        assert ctx.submit(op) == 1
        backend.wait_for(ctx, lambda i=i: calls[i], what=f"op {i}")
    assert [len(c) for c in calls] == [1] * 64
    assert all(c == [4] for c in calls) or backend.is_python
    assert read_file(tmp_fd) == b"".join(b"%04d" % i for i in range(64))


def test_full_ring_or_queue_is_also_oserror_eagain(backend: RawBackend, tmp_fd: int) -> None:
    """A capacity refusal of the raw submit() is the module's CapacityError:
    catchable as DESIGN.md §4.2 prescribes (OverflowError: uring SQ ring full,
    linux_aio io_submit EAGAIN; RuntimeError: thread_aio/python_aio queue
    full) and as an OSError with errno EAGAIN (DESIGN.md §4.2). Its message
    says what is full and the max_requests value. The refused operations are
    untouched: once completions are delivered, submitting them again works.

    linux_aio first takes what the kernel ring has room for and returns that
    short count (DESIGN.md §4.2); only a submit() that gets
    nothing in at all raises."""
    ctx = _capacity_context(backend)
    n = 4096 if backend.is_linux_aio else 64
    ops = [backend.Operation.fsync(tmp_fd) for _ in range(n)]
    calls: list[Any] = []
    for op in ops:
        op.set_callback(calls.append)
    if backend.is_linux_aio:
        accepted = ctx.submit(*ops)
        assert 0 < accepted < n, accepted
        _count("linux_aio short counts")
    cls = backend.module.CapacityError
    assert issubclass(cls, OSError) and issubclass(cls, CAPACITY_TYPES[backend.name])
    # Already accepted operations are skipped by submit() (one-shot), so the
    # whole list can be offered again each time.
    with pytest.raises(OSError) as as_oserror:
        ctx.submit(*ops)
    with pytest.raises(CAPACITY_TYPES[backend.name]) as as_contract_type:
        ctx.submit(*ops)
    for exc in (as_oserror.value, as_contract_type.value):
        assert type(exc) is cls, exc
        assert exc.errno == errno.EAGAIN, exc
        assert str(exc).startswith(f"[Errno {errno.EAGAIN}] "), exc
        assert "full" in str(exc) and "max_requests=1" in str(exc), exc
        _count("EAGAIN capacity refusals")

    def all_done() -> bool:
        try:
            ctx.submit(*ops)
        except cls:
            pass  # still full: deliver (wait_for drives) and retry
        return len(calls) == n

    backend.wait_for(ctx, all_done, timeout=60.0, what=f"all {n} fsyncs")
    assert len(calls) == n


# -- cancellation must not turn into capacity errors for others ---------------------------------


def _cancel_capacity_params() -> list[Any]:
    """Every asyncio configuration. (thread_aio and python_aio used to fail
    this: a cancelled operation gave its admission slot back at once while
    still occupying the backend's queue - fixed on main, see
    test_cancellation_slots.py.)"""
    from helpers import async_params

    return [pytest.param(p.values[0], id=p.id) for p in async_params()]


@pytest.mark.parametrize("config", _cancel_capacity_params())
@pytest.mark.parametrize("max_requests", [1, 2])
def test_cancelled_operations_do_not_cause_capacity_errors(
    config: Any,
    max_requests: int,
    aio: LoopRunner,
    tmp_fd: int,
) -> None:
    name, module, kwargs = config

    async def main() -> dict[str, int]:
        ctx = module.AsyncioContext(max_requests, **kwargs)
        errors: dict[str, int] = {}
        try:
            for _ in range(150):
                tasks = [
                    asyncio.ensure_future(ctx.write(b"x" * 512, tmp_fd, 0))
                    for _ in range(max_requests + 1)
                ]
                await asyncio.sleep(0)
                tasks[0].cancel()
                await asyncio.sleep(0)
                tasks.append(asyncio.ensure_future(ctx.write(b"y" * 512, tmp_fd, 512)))
                for result in await asyncio.gather(*tasks, return_exceptions=True):
                    if isinstance(result, Exception) and not isinstance(
                        result, asyncio.CancelledError
                    ):
                        errors[repr(result)] = errors.get(repr(result), 0) + 1
        finally:
            ctx.close()
        return errors

    errors = aio.run(main())
    _count("cancel-then-submit rounds", 150)
    assert errors == {}, errors
