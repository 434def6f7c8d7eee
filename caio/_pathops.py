"""Path operations and whole files (DESIGN.md §14).

``open``, ``close_fd``, ``stat``, ``fallocate``, ``ftruncate``, ``fadvise``,
``unlink``, ``rename``, ``mkdir``, ``read_file`` and ``write_file`` on every
context. :class:`PathOpsAPI` holds the public methods once: each checks and
converts its arguments at call time (so argument errors raise before any
``await``) into a *job* tuple and hands it to ``self._path_job(job)``, which
the context type supplies:

* ``AsyncioContextBase`` (:class:`AsyncioPathOps`): a runner per adapter,
  created on first use — the native one (``_PathOps`` of the backend's
  module, ``rust/core/src/pathop/``) when the adapter class names it, else
  :class:`_ThreadRunner` (the same ``os`` calls on a ``ThreadPoolExecutor``
  of the adapter's own);
* ``StructuredContextBase`` (trio/anyio): :func:`run_job` on the library's
  ``to_thread.run_sync``.

A job is ``(code, name1, path1, name2, path2, fd1, fd2, a, b, c, data)``:
``name1``/``name2`` are the objects ``os`` would report as ``filename``/
``filename2`` (the arguments as given), ``path1``/``path2`` their encoded
``bytes``, ``fd1``/``fd2`` fds or ``dir_fd``s (``None``: the current
directory), ``a``/``b``/``c`` integers and ``data`` the ``bytes`` of
``write_file``. The native runner reads the same tuple.
"""

import asyncio
import concurrent.futures
import errno
import operator
import os
import sys
from collections.abc import Awaitable, Generator
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, cast

__all__ = ("AsyncioPathOps", "PathOpsAPI", "run_job")

# Job codes (the native runner uses the same numbers).
OPEN = 1
CLOSE = 2
STAT = 3
FALLOCATE = 4
FTRUNCATE = 5
FADVISE = 6
UNLINK = 7
RENAME = 8
MKDIR = 9
READ_FILE = 10
WRITE_FILE = 11

Job = tuple[int, Any, bytes | None, Any, bytes | None, int | None, int | None, int, int, int, Any]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)


def _encode(path: Any, fname: str, argname: str = "path") -> tuple[str | bytes, bytes]:
    """``os``'s path conversion: ``str``, ``bytes`` or ``os.PathLike``.
    Returns the name ``os`` reports in errors (``os.fspath(path)``) and the
    encoded path."""
    try:
        p = os.fspath(path)
    except TypeError:
        raise TypeError(
            f"{fname}: {argname} should be string, bytes or os.PathLike, not {type(path).__name__}"
        ) from None
    b = os.fsencode(p)
    if b"\0" in b:
        raise ValueError("embedded null byte")
    return p, b


def _dir_fd(dir_fd: Any) -> int | None:
    return None if dir_fd is None else operator.index(dir_fd)


# -- the blocking implementation (Python runner, trio/anyio) -------------------


def _named(e: OSError, name: Any) -> OSError:
    """``e`` reported for ``name`` (as ``open()`` reports any step's error)."""
    if e.filename is not None or e.errno is None:
        return e
    return OSError(e.errno, e.strerror, name)


def _read_file(name: Any) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY | _O_CLOEXEC | _O_BINARY)
    except OSError as e:
        raise _named(e, name) from None
    try:
        size = os.fstat(fd).st_size
        chunks = []
        want = max(size, 0) + 1  # one more byte: end of file seen in one read
        while True:
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            want = max(want, 64 * 1024)
        return b"".join(chunks)
    except OSError as e:
        raise _named(e, name) from None
    finally:
        os.close(fd)


def _write_file(name: Any, data: bytes, mode: int, sync: int) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC | _O_BINARY
    try:
        fd = os.open(name, flags, mode)
    except OSError as e:
        raise _named(e, name) from None
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        if sync:
            os.fsync(fd)
        return done
    except OSError as e:
        raise _named(e, name) from None
    finally:
        os.close(fd)


def _fallocate(fd: int, offset: int, length: int, mode: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.fallocate64
        f.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        f.restype = ctypes.c_int
        if f(fd, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return
    fallocate = getattr(os, "posix_fallocate", None)
    if mode or fallocate is None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    fallocate(fd, offset, length)


def run_job(job: Job) -> Any:
    """Run one job with ``os`` calls on the calling thread."""
    code, name1, _, name2, _, fd1, fd2, a, b, c, data = job
    if code == READ_FILE:
        return _read_file(name1)
    if code == OPEN:
        return os.open(name1, a, b, dir_fd=fd1)
    if code == STAT:
        if job[2] is None:
            return os.stat(cast(int, fd1))
        return os.stat(name1, dir_fd=fd1, follow_symlinks=bool(a))
    if code == CLOSE:
        os.close(cast(int, fd1))
        return None
    if code == WRITE_FILE:
        return _write_file(name1, data, a, b)
    if code == FTRUNCATE:
        os.ftruncate(cast(int, fd1), a)
        return None
    if code == FALLOCATE:
        _fallocate(cast(int, fd1), a, b, c)
        return None
    if code == FADVISE:
        fadvise = getattr(os, "posix_fadvise", None)
        if fadvise is None:  # not on this platform (macOS, Windows)
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        fadvise(cast(int, fd1), a, b, c)
        return None
    if code == UNLINK:
        os.unlink(name1, dir_fd=fd1)
        return None
    if code == RENAME:
        os.rename(name1, name2, src_dir_fd=fd1, dst_dir_fd=fd2)
        return None
    if code == MKDIR:
        os.mkdir(name1, a, dir_fd=fd1)
        return None
    raise ValueError(f"unknown path job {code}")


# -- the public methods, shared by every context type ---------------------------


class PathOpsAPI:
    """``os``-like path and fd calls, awaitable (DESIGN.md §14)."""

    def _path_job(self, job: Job) -> Awaitable[Any]:
        raise NotImplementedError

    def open(
        self, path: Any, flags: int = os.O_RDONLY, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> Awaitable[int]:
        """``os.open`` (the fd is non-inheritable, as ``os.open`` makes it)."""
        flags = operator.index(flags) | _O_CLOEXEC
        job = _path_job(OPEN, path, "open", dir_fd, flags, operator.index(mode))
        return cast("Awaitable[int]", self._path_job(job))

    def close_fd(self, fd: int) -> Awaitable[None]:
        """``os.close``."""
        return cast("Awaitable[None]", self._path_job(_fd_job(CLOSE, fd)))

    def stat(
        self, path: Any, *, dir_fd: int | None = None, follow_symlinks: bool = True
    ) -> Awaitable[os.stat_result]:
        """``os.stat`` of a path or an fd."""
        if isinstance(path, int):
            if dir_fd is not None or not follow_symlinks:
                raise ValueError("stat: cannot use fd and dir_fd or follow_symlinks=False together")
            fd = operator.index(path)
            # os.stat(fd) reports the fd as the error's filename.
            job: Job = (STAT, fd, None, None, None, fd, None, 1, 0, 0, None)
        else:
            job = _path_job(STAT, path, "stat", dir_fd, int(bool(follow_symlinks)))
        return cast("Awaitable[os.stat_result]", self._path_job(job))

    def fallocate(self, fd: int, offset: int, length: int, mode: int = 0) -> Awaitable[None]:
        """``fallocate(2)``: allocate (``mode`` 0) or punch/zero a range."""
        job = _fd_job(FALLOCATE, fd, offset, length, mode)
        return cast("Awaitable[None]", self._path_job(job))

    def ftruncate(self, fd: int, length: int) -> Awaitable[None]:
        """``os.ftruncate``."""
        return cast("Awaitable[None]", self._path_job(_fd_job(FTRUNCATE, fd, length)))

    def fadvise(self, fd: int, offset: int, length: int, advice: int) -> Awaitable[None]:
        """``os.posix_fadvise``."""
        job = _fd_job(FADVISE, fd, offset, length, advice)
        return cast("Awaitable[None]", self._path_job(job))

    def unlink(self, path: Any, *, dir_fd: int | None = None) -> Awaitable[None]:
        """``os.unlink``."""
        return cast("Awaitable[None]", self._path_job(_path_job(UNLINK, path, "unlink", dir_fd)))

    def rename(
        self,
        src: Any,
        dst: Any,
        *,
        src_dir_fd: int | None = None,
        dst_dir_fd: int | None = None,
    ) -> Awaitable[None]:
        """``os.rename``."""
        name1, path1 = _encode(src, "rename", "src")
        name2, path2 = _encode(dst, "rename", "dst")
        fd1, fd2 = _dir_fd(src_dir_fd), _dir_fd(dst_dir_fd)
        job = (RENAME, name1, path1, name2, path2, fd1, fd2, 0, 0, 0, None)
        return cast("Awaitable[None]", self._path_job(job))

    def mkdir(self, path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> Awaitable[None]:
        """``os.mkdir``."""
        job = _path_job(MKDIR, path, "mkdir", dir_fd, operator.index(mode))
        return cast("Awaitable[None]", self._path_job(job))

    def read_file(self, path: Any) -> Awaitable[bytes]:
        """The whole file's contents, like ``Path.read_bytes``."""
        return cast("Awaitable[bytes]", self._path_job(_path_job(READ_FILE, path, "read_file")))

    def write_file(
        self, path: Any, data: Any, *, mode: int = 0o666, fsync: bool = False
    ) -> Awaitable[int]:
        """Create or truncate ``path`` and write ``data`` (bytes-like), like
        ``Path.write_bytes``; with ``fsync``, sync it before closing."""
        if not isinstance(data, bytes):
            data = bytes(memoryview(data))
        mode = operator.index(mode)
        job = _path_job(WRITE_FILE, path, "write_file", None, mode, int(bool(fsync)), data)
        return cast("Awaitable[int]", self._path_job(job))


def _path_job(
    code: int, path: Any, fname: str, dir_fd: Any = None, a: int = 0, b: int = 0, data: Any = None
) -> Job:
    """The job of a call on one path (relative to ``dir_fd``)."""
    name, encoded = _encode(path, fname)
    return (code, name, encoded, None, None, _dir_fd(dir_fd), None, a, b, 0, data)


def _fd_job(code: int, fd: Any, a: Any = 0, b: Any = 0, c: Any = 0) -> Job:
    """The job of a call on an fd."""
    ints = operator.index(a), operator.index(b), operator.index(c)
    return (code, None, None, None, None, operator.index(fd), None, *ints, None)


# -- runners for asyncio ----------------------------------------------------------


def _close_quietly(fd: Any) -> None:
    if isinstance(fd, int):
        try:
            os.close(fd)
        except OSError:
            pass


class _OpenAwaitable:
    """What ``open`` returns on asyncio: awaits the runner's future and hands
    the fd to the awaiter. An fd nobody will receive is closed: the runner
    closes it when the future was cancelled before the job finished; this
    closes it when the future got its result but the awaiting task was
    cancelled before it resumed, and — when the awaitable is dropped without
    ever being awaited to the end (e.g. a task cancelled before its first
    step) — cancels the future or closes the fd it already holds."""

    __slots__ = ("_claimed", "_future")

    def __init__(self, future: "asyncio.Future[int]") -> None:
        self._future = future
        self._claimed = False

    def __await__(self) -> Generator[Any, None, int]:
        try:
            fd = yield from self._future.__await__()
        except BaseException:
            self._abandon()
            raise
        self._claimed = True
        return fd

    def _abandon(self) -> None:
        self._claimed = True
        future = self._future
        if not future.done():
            future.cancel()  # the runner closes the fd when the job ends
        elif not future.cancelled() and future.exception() is None:
            _close_quietly(future.result())

    def __del__(self) -> None:
        if not self._claimed:
            self._abandon()


class _ThreadRunner:
    """The ``os`` calls on a thread pool of the adapter's own; results are
    handed to the loop with ``call_soon_threadsafe``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int) -> None:
        self.loop = loop
        self.pid = os.getpid()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="caio-pathop"
        )
        self._in_flight = 0  # loop thread only

    def run(self, job: Job) -> "asyncio.Future[Any]":
        future = self.loop.create_future()
        cf = self._executor.submit(run_job, job)
        self._in_flight += 1
        cf.add_done_callback(partial(self._done, future, job[0]))
        return future

    def in_flight(self) -> int:
        """Jobs whose result the loop has not received yet."""
        return self._in_flight

    def _done(self, future: "asyncio.Future[Any]", code: int, cf: Any) -> None:
        # Worker thread.
        try:
            self.loop.call_soon_threadsafe(self._transfer, future, code, cf)
        except RuntimeError:  # the loop is closed: nobody awaits the result
            if code == OPEN and not cf.cancelled() and cf.exception() is None:
                _close_quietly(cf.result())

    def _transfer(self, future: "asyncio.Future[Any]", code: int, cf: Any) -> None:
        # Loop thread.
        self._in_flight -= 1
        exc = cf.exception()
        if future.cancelled():
            if code == OPEN and exc is None:
                _close_quietly(cf.result())  # nobody will ever see this fd
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(cf.result())

    def close(self) -> None:
        # Queued jobs still run and are delivered; the threads end after.
        self._executor.shutdown(wait=False)


class _NativeRunner:
    """The backend module's ``_PathOps``: native workers, results built and
    futures resolved by one drain per wake-up of the loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, ops_type: Any, workers: int, slice_ns: int
    ) -> None:
        self.loop = loop
        self.pid = os.getpid()
        ops = ops_type(workers, slice_ns)
        self._ops = ops
        self._submit = ops.submit
        self._closing = False
        self._fd: int | None = None
        try:
            fd = ops.fileno()
            loop.add_reader(fd, self._on_readable)
        except BaseException:
            ops.close()
            raise
        self._fd = fd

    def run(self, job: Job) -> "asyncio.Future[Any]":
        future = self.loop.create_future()
        self._submit(future, *job)
        return future

    def in_flight(self) -> int:
        """Jobs whose result the loop has not received yet."""
        n: int = self._ops.in_flight()
        return n

    def _on_readable(self) -> None:
        if self._ops.drain() == 0 and self._closing:
            self._release()

    def close(self) -> None:
        self._closing = True
        if self._ops.in_flight() == 0:
            self._release()

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and os.getpid() == self.pid:
            try:
                self.loop.remove_reader(fd)
            except (RuntimeError, ValueError, OSError):
                pass
        self._ops.close()


class AsyncioPathOps(PathOpsAPI):
    """Path operations of an ``AsyncioContext`` (a base of
    ``AsyncioContextBase``)."""

    #: The native runner type (``backend._PathOps``); None: the thread runner.
    _PATH_OPS_TYPE: ClassVar[Any] = None
    #: Worker threads of the runner.
    PATH_OPS_WORKERS: ClassVar[int] = 8
    #: Native runner: ``read_file`` and ``stat`` are first tried on the loop
    #: thread from the dentry and page caches only (``openat2(RESOLVE_CACHED)``,
    #: ``preadv2(RWF_NOWAIT)``: they never wait for the disk); a miss goes to
    #: a worker. False: every job goes to a worker.
    PATH_OPS_INLINE: ClassVar[bool] = True
    #: The longest burst (seconds) of such inline work before a job goes to
    #: a worker, which lets the loop run (DESIGN.md §14).
    PATH_OPS_INLINE_SLICE: ClassVar[float] = 0.001

    _path_runner: Any = None
    _path_ops_closed = False

    if TYPE_CHECKING:  # provided by AsyncioContextBase
        loop: asyncio.AbstractEventLoop

    def _path_job(self, job: Job) -> Awaitable[Any]:
        runner = self._path_runner
        if runner is None or runner.pid != os.getpid():
            runner = self._new_path_runner()
        future = runner.run(job)
        if job[0] == OPEN:
            return _OpenAwaitable(future)
        return cast("asyncio.Future[Any]", future)

    def _new_path_runner(self) -> Any:
        if self._path_ops_closed:
            raise RuntimeError("AsyncioContext is closed: create a new one to submit operations")
        if self._path_runner is not None:
            raise RuntimeError(
                "this AsyncioContext was created before fork(); create a new one in the child"
            )
        ops_type = self._PATH_OPS_TYPE
        runner: Any
        if ops_type is not None:
            slice_ns = int(self.PATH_OPS_INLINE_SLICE * 1e9) if self.PATH_OPS_INLINE else 0
            runner = _NativeRunner(self.loop, ops_type, self.PATH_OPS_WORKERS, slice_ns)
        else:
            runner = _ThreadRunner(self.loop, self.PATH_OPS_WORKERS)
        self._path_runner = runner
        return runner

    def _close_path_ops(self) -> None:
        if self._path_ops_closed:
            return
        self._path_ops_closed = True
        runner = self._path_runner
        if runner is not None and runner.pid == os.getpid():
            runner.close()
        # New path operations now fail in _new_path_runner.
        self._path_runner = _Closed()


class _Closed:
    """Stands for the runner of a closed context."""

    pid = -1
