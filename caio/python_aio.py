"""Pure-Python backend: file operations run on a ``ThreadPool``.

This backend works everywhere CPython does (it is the only one on Windows
unless a native ``thread_aio`` is built there).  Its observable behaviour is
described in DESIGN.md §4.7; the notes below explain how the per-operation
path is kept cheap without changing that behaviour.

Per-operation path
------------------
``Context.submit`` claims the operation and hands it to the pool.  Upstream
does that with ``ThreadPool.apply_async``, which for every operation builds
an ``ApplyResult`` (with its own ``threading.Event``/``Condition``), two
closures, routes the task through the pool's task-handler thread and wakes a
sleeping worker.  On a busy event loop that per-operation overhead, and the
thread wake-ups above all, are what limits throughput.

Here, when the pool exposes the (long unchanged, 3.8 to 3.13) internals we
rely on, each claimed operation is registered in the pool's job cache and
appended to a queue owned by the Context.  "Drain" tasks running on the
pool's own workers take operations from that queue and report each result
to the pool's result-handler thread individually, exactly as a worker
reports a task:

* callbacks keep running on the pool's single result-handler thread, one at
  a time, as with ``apply_async``;
* a new drain is started only when every existing drain is busy executing an
  operation (at most ``pool_size`` of them), and a drain that sees more work
  waiting recruits the next one itself, so the submitting thread rarely has
  to wake a worker and a slow operation never holds up the others;
* ``pool.close()``/``pool.join()`` keep their graceful semantics because
  every pending operation is in the pool's cache (the pool only stops its
  workers once the cache is empty).

If those internals are missing (some future CPython), ``apply_async`` is
used instead; both paths produce identical results (the test-suite runs
both).
"""

import atexit
import errno
import functools
import multiprocessing
import operator
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum, unique
from multiprocessing.pool import CLOSE as _POOL_CLOSE
from multiprocessing.pool import RUN as _POOL_RUN
from multiprocessing.pool import Pool, ThreadPool
from threading import Lock, RLock
from typing import TYPE_CHECKING, Any
from weakref import WeakSet, WeakValueDictionary

from .abstract import AbstractContext, AbstractOperation

if TYPE_CHECKING:
    from typing_extensions import Buffer

if hasattr(os, "fdatasync"):
    fdsync = os.fdatasync
else:
    # macOS and Windows have no fdatasync(); a full fsync is the safe stand-in.
    fdsync = os.fsync

NATIVE_PREAD_PWRITE = hasattr(os, "pread") and hasattr(os, "pwrite")
NATIVE_PREADV = hasattr(os, "preadv")


@unique
class OpCode(IntEnum):
    READ = 0
    WRITE = 1
    FSYNC = 2
    FDSYNC = 3
    NOOP = -1


@unique
class ContextState(IntEnum):
    OPEN = 0
    CLOSING = 1
    CLOSED = 2


class CapacityError(OSError, RuntimeError):
    """``Context.submit()`` refused an operation: ``max_requests`` are
    already in progress.

    DESIGN.md §4.2 prescribes a ``RuntimeError`` here (as upstream caio raises);
    it is also an ``OSError`` with ``errno == errno.EAGAIN`` (same section).
    Deriving from both satisfies the two, as ``OperationError`` does for
    operation failures in the native backends (DESIGN.md §6.2 errtype); the native
    backends raise their own ``CapacityError`` the same way.
    """


Callback = Callable[[Any], Any]


def _report_callback_error() -> None:
    # Called from inside an ``except`` block on the result-handler thread.
    # Reporting through threading.excepthook (instead of letting it escape)
    # keeps that thread alive: if it died, no later completion of this
    # Context would ever be delivered.
    exc_type, exc_value, exc_tb = sys.exc_info()
    try:
        threading.excepthook(
            threading.ExceptHookArgs(
                (exc_type, exc_value, exc_tb, threading.current_thread()),
            ),
        )
    finally:
        del exc_type, exc_value, exc_tb


# -- blocking primitives executed on pool threads -----------------------------

_fd_locks: "WeakValueDictionary[int, Any]" = WeakValueDictionary()
_fd_locks_guard = Lock()


def _fd_lock(fd: int) -> Any:
    # Only used without native pread/pwrite (Windows).  An entry lives only
    # while an operation on that fd holds the lock, so the dictionary does
    # not grow with every fd ever used.  Module-wide rather than per Context:
    # the file position is shared by everybody using the fd.
    with _fd_locks_guard:
        lock = _fd_locks.get(fd)
        if lock is None:
            lock = _fd_locks[fd] = RLock()
        return lock


def _lseek_read(fd: int, size: int, offset: int) -> bytes:
    # pread() emulation: moves the fd's file position as a side effect.
    with _fd_lock(fd):
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)


def _lseek_write(fd: int, data: "Buffer", offset: int) -> int:
    with _fd_lock(fd):
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


_pread: Callable[[int, int, int], bytes] = os.pread if NATIVE_PREAD_PWRITE else _lseek_read
_pwrite: Callable[[int, "Buffer", int], int] = os.pwrite if NATIVE_PREAD_PWRITE else _lseek_write


# O_DIRECT: the kernel wants the buffer address, file offset and length
# aligned, and os.pread()/the caller's bytes give no aligned memory, so such
# calls fail with EINVAL. Once EINVAL comes back on an fd opened with
# O_DIRECT, the transfer is redone through page-aligned anonymous memory
# (a page satisfies every device's alignment): reads at any offset and length
# (the aligned window around them is read, the requested part returned),
# writes whose offset and length are already aligned. The native backends
# do the same (aligned bounce windows).
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_DIRECT_OK = bool(_O_DIRECT) and hasattr(os, "preadv") and hasattr(os, "pwritev")


def _is_direct(fd: int) -> bool:
    if not _DIRECT_OK:
        return False
    import fcntl

    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT)
    except OSError:
        return False


def _direct_read(fd: int, size: int, offset: int) -> bytes:
    import mmap

    align = mmap.PAGESIZE
    start = offset - offset % align
    end = -(-(offset + size) // align) * align
    skip = offset - start
    window = mmap.mmap(-1, max(end - start, align))
    try:
        got = os.preadv(fd, [memoryview(window)[: end - start]], start)
        return window[skip : max(skip, min(got, skip + size))]
    finally:
        window.close()


def _direct_write(fd: int, data: bytes, offset: int) -> int:
    import mmap

    window = mmap.mmap(-1, max(len(data), mmap.PAGESIZE))
    try:
        window[: len(data)] = data
        return os.pwritev(fd, [memoryview(window)[: len(data)]], offset)
    finally:
        window.close()


def _needs_aligned_retry(e: OSError, op: "Operation") -> bool:
    """EINVAL at a valid offset on an O_DIRECT fd: the memory was the problem."""
    return e.errno == errno.EINVAL and op._offset >= 0 and _is_direct(op._fileno)


def _run_read(op: "Operation") -> int:
    target = op._view
    if target is not None:
        return _run_readinto(op, target)
    try:
        data = _pread(op._fileno, op._nbytes, op._offset)
    except OSError as e:
        if not _needs_aligned_retry(e, op):
            raise
        data = _direct_read(op._fileno, op._nbytes, op._offset)
    op.buffer = data
    return len(data)


#: Most buffers one readv()/writev() takes (Linux's IOV_MAX, as the native
#: backends): longer sequences are refused with ValueError.
IOV_MAX = 1024


def _export_all(buffers: Any, writable: bool) -> list[memoryview]:
    """The views of a readv()/writev() sequence (the native backends'
    errors); every one is released if one is refused."""
    if isinstance(buffers, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"buffers must be a sequence of buffers, not a single {type(buffers).__name__!r}"
        )
    try:
        items = tuple(buffers)
    except TypeError:
        raise TypeError(
            f"buffers must be a sequence of buffers, not {type(buffers).__name__!r}"
        ) from None
    if not items:
        raise ValueError("buffers must not be empty")
    if len(items) > IOV_MAX:
        raise ValueError(
            f"buffers holds {len(items)} buffers; at most IOV_MAX ({IOV_MAX}) per operation"
        )
    views: list[memoryview] = []
    try:
        for item in items:
            views.append(_export(item, writable, "buffers"))
    except BaseException:
        for v in views:
            v.release()
        raise
    return views


def _run_vectored(op: "Operation") -> int:
    views = op._views
    fd, offset = op._fileno, op._offset
    if NATIVE_PREADV:
        if op.opcode == _READV:
            return os.preadv(fd, views, offset)
        return os.pwritev(fd, views, offset)
    # Windows: the buffers in turn, stopping at a short transfer.
    total = 0
    for v in views:
        if op.opcode == _READV:
            data = _pread(fd, len(v), offset + total)
            v[: len(data)] = data
            n = len(data)
        else:
            n = _pwrite(fd, v, offset + total)
        total += n
        if n < len(v):
            break
    return total


def _run_readinto(op: "Operation", target: memoryview) -> int:
    # Into the caller's memory: one preadv() where it exists, else a read
    # copied in (Windows).
    try:
        if NATIVE_PREADV:
            return os.preadv(op._fileno, [target], op._offset)
        data = _pread(op._fileno, op._nbytes, op._offset)
    except OSError as e:
        if not _needs_aligned_retry(e, op):
            raise
        data = _direct_read(op._fileno, op._nbytes, op._offset)
    target[: len(data)] = data
    return len(data)


#: preadv(RWF_NOWAIT) exists here (Linux): reads can be tried straight from
#: the page cache on the submitting thread (see _try_read_inline).
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
INLINE_READS = bool(_RWF_NOWAIT) and NATIVE_PREADV


def _try_read_inline(op: "Operation") -> bool:
    """Completes ``op`` (a read) from the page cache on the calling thread,
    never waiting for the disk: ``preadv(..., RWF_NOWAIT)``, continued while
    bytes come, so a short result only means end of file (the native pool's
    rule, DESIGN.md §11.3). Returns False, with nothing of ``op`` changed
    but the bytes of its target, when the read must go to the pool instead:
    data not (fully) cached, or any error — the pool then gives the same
    result or error a plain read would."""
    fd, nbytes, offset = op._fileno, op._nbytes, op._offset
    if offset < 0:
        return False  # preadv treats -1 as "the file position"
    target = op._view
    view = memoryview(bytearray(nbytes)) if target is None else target
    done = 0
    try:
        # At least one call, even for a zero-length read: the fd is checked.
        while True:
            n = os.preadv(fd, [view[done:]], offset + done, _RWF_NOWAIT)
            done += n
            if n == 0 or done >= nbytes:
                break
    except OSError:
        return False
    if target is None:
        op.buffer = bytes(view[:done])
    op.written = done
    return True


def _export(obj: Any, writable: bool, what: str) -> memoryview:
    """A flat byte view of the caller's C-contiguous buffer (the same errors
    as the native constructors: DESIGN.md §3.4). Holding it pins the memory:
    a bytearray cannot be resized until it is released."""
    try:
        view = memoryview(obj)
    except TypeError:
        kind = type(obj).__name__
        msg = f"{what} must be a bytes-like object (a C-contiguous buffer), not {kind!r}"
        if writable:
            raise TypeError(msg) from None
        raise ValueError(msg) from None
    if not view.c_contiguous:
        view.release()
        raise ValueError(f"{what} must be a C-contiguous buffer ({type(obj).__name__!r} is not)")
    if writable and view.readonly:
        view.release()
        raise TypeError(f"{what} must be a writable buffer, not read-only {type(obj).__name__!r}")
    if view.format == "B" and view.ndim == 1:
        return view
    flat = view.cast("B")
    view.release()
    return flat


def _run_write(op: "Operation") -> int:
    try:
        return _pwrite(op._fileno, op.buffer, op._offset)
    except OSError as e:
        if not _needs_aligned_retry(e, op):
            raise
        # Only the memory is fixed up: an unaligned offset or length gets
        # its EINVAL again from the kernel.
        return _direct_write(op._fileno, op.buffer, op._offset)


def _run_fsync(op: "Operation") -> None:
    os.fsync(op._fileno)


def _run_fdsync(op: "Operation") -> None:
    fdsync(op._fileno)


def _run_noop(op: "Operation") -> None:
    return None


# Plain module constants: attribute access on an Enum class is comparatively
# slow on 3.10/3.11 and these sit on the per-operation path.
_READ, _WRITE, _FSYNC, _FDSYNC = OpCode.READ, OpCode.WRITE, OpCode.FSYNC, OpCode.FDSYNC
# readv/writev: not members of OpCode, which stays upstream's enum.
_READV, _WRITEV = 4, 5
_OPEN = ContextState.OPEN

_RUNNERS: dict[int, Callable[["Operation"], int | None]] = {
    OpCode.READ: _run_read,
    OpCode.WRITE: _run_write,
    OpCode.FSYNC: _run_fsync,
    OpCode.FDSYNC: _run_fdsync,
    OpCode.NOOP: _run_noop,
    _READV: _run_vectored,
    _WRITEV: _run_vectored,
}


class _WriteOrder:
    """fsync after the writes before it (DESIGN.md §4.1): a sync submitted on
    a Context does not start before every write to the same fd submitted
    before it on that Context has finished. The pool's threads run operations
    in parallel, so an fsync could otherwise run (and report the data
    durable) while an earlier write to its file is still running.

    Per fd: the number of writes submitted so far and the numbers of those
    not finished; a sync waits (on its worker) only for writes numbered below
    the count at its submission, so unrelated fds never wait for each other
    and later writes cannot hold it back. It cannot deadlock: numbers are
    given and jobs queued under one lock (``Context._schedule_ordered``), so
    the writes a sync waits for were queued before it and workers have
    already taken them.
    """

    __slots__ = ("_cond", "_fds")

    def __init__(self) -> None:
        self._cond = threading.Condition(Lock())
        # fd -> [writes submitted, set of unfinished write numbers]
        self._fds: dict[int, list[Any]] = {}

    def write_submitted(self, fd: int) -> int:
        with self._cond:
            state = self._fds.get(fd)
            if state is None:
                state = self._fds[fd] = [0, set()]
            number: int = state[0]
            state[0] = number + 1
            state[1].add(number)
        return number

    def write_finished(self, fd: int, number: int) -> None:
        with self._cond:
            state = self._fds.get(fd)
            if state is not None:
                state[1].discard(number)
                if not state[1]:
                    del self._fds[fd]
                self._cond.notify_all()

    def sync_submitted(self, fd: int) -> int | None:
        """The writes a sync must wait for (``None``: nothing unfinished)."""
        with self._cond:
            state = self._fds.get(fd)
            return state[0] if state is not None else None

    def wait_for_writes(self, fd: int, before: int) -> None:
        with self._cond:
            while True:
                state = self._fds.get(fd)
                if state is None or min(state[1]) >= before:
                    return
                self._cond.wait()


def _ordered_write(
    order: _WriteOrder,
    number: int,
    runner: Callable[["Operation"], Any],
    operation: "Operation",
) -> Any:
    try:
        return runner(operation)
    finally:
        order.write_finished(operation._fileno, number)


def _ordered_sync(
    order: _WriteOrder,
    before: int,
    runner: Callable[["Operation"], Any],
    operation: "Operation",
) -> Any:
    order.wait_for_writes(operation._fileno, before)
    return runner(operation)


class _Job:
    """One submitted operation, as seen by the pool's result handler.

    Registered in ``pool._cache`` under its own identity, so its key can
    never collide with the integer ids ``apply_async`` uses.
    """

    __slots__ = ("context", "operation")

    def __init__(self, context: "Context", operation: "Operation"):
        self.context = context
        self.operation = operation

    # Called by the pool's result-handler thread: ``outcome`` is the
    # worker's ``(success, value_or_exception)`` pair.
    def _set(self, index: int, outcome: tuple[bool, Any]) -> None:
        context = self.context
        operation = self.operation
        self.context = self.operation = None  # type: ignore[assignment]
        try:
            success, value = outcome
            if success:
                context._complete(operation, value)
            else:
                context._fail(operation, value)
        finally:
            # Deregister last (as ApplyResult does): the pool counts the job
            # as pending until its callback has run.
            pool: Any = context.pool
            del pool._cache[self]


class _DrainJob:
    """Pool cache entry of one drain task (see Context._drain)."""

    __slots__ = ("context",)

    def __init__(self, context: "Context"):
        self.context = context

    def _set(self, index: int, outcome: tuple[bool, Any]) -> None:
        context = self.context
        self.context = None  # type: ignore[assignment]
        pool: Any = context.pool
        del pool._cache[self]


# Bumped in a child process after fork(): a Context remembers the value it
# was created with. Its ThreadPool's threads exist only in the parent, so in
# the child an accepted operation would never run and its awaiter would wait
# forever; submit() refuses instead (as the native backends do).
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


#: Where wake-ups can go through a file descriptor of our own (an eventfd on
#: Linux, a pipe elsewhere): every POSIX system. Not on Windows.
WAKEUP_FDS = os.name == "posix"

# One eventfd increment (eventfd I/O is always 8 bytes); any byte would do
# for a pipe.
_WAKEUP_SIGNAL = (1).to_bytes(8, sys.byteorder)


class _WakeupFd:
    """A non-blocking wake-up channel: an eventfd (Linux) or a pipe.

    ``signal()`` may be called from any thread; ``drain()`` consumes every
    pending signal; after ``close()`` (idempotent; also run when the object
    is collected) ``signal()`` does nothing and returns False. The three
    are serialised by a lock, so a signal never reaches a closed (or
    reused) fd number. In a process forked from the creator ``signal()``
    does nothing: the fds are shared with the creator, whose waiters the
    child must not wake.
    """

    __slots__ = ("_generation", "_lock", "_read_fd", "_write_fd")

    def __init__(self) -> None:
        self._read_fd = self._write_fd = -1
        self._lock = Lock()
        self._generation = _fork_generation
        if hasattr(os, "eventfd"):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._read_fd = self._write_fd = fd
        else:
            read_fd, write_fd = os.pipe()  # non-inheritable (PEP 446)
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            self._read_fd, self._write_fd = read_fd, write_fd

    def fileno(self) -> int:
        return self._read_fd

    def signal(self) -> bool:
        with self._lock:
            if self._write_fd < 0 or self._generation != _fork_generation:
                return False
            try:
                os.write(self._write_fd, _WAKEUP_SIGNAL)
            except BlockingIOError:
                pass  # a full pipe is readable already
            return True

    def drain(self) -> None:
        with self._lock:
            while self._read_fd >= 0:
                try:
                    if not os.read(self._read_fd, 4096):
                        return
                except OSError:  # BlockingIOError: nothing (more) pending
                    return

    def close(self) -> None:
        with self._lock:
            read_fd, write_fd = self._read_fd, self._write_fd
            self._read_fd = self._write_fd = -1
        for fd in {read_fd, write_fd}:
            if fd >= 0:
                os.close(fd)

    def __del__(self) -> None:
        if self._read_fd >= 0:
            self.close()


def _notifier_context() -> Any:
    try:
        return multiprocessing.get_context("fork")
    except ValueError:  # pragma: no cover - Windows: semaphores are never tracked there
        return None


class _PoolNotifier(_WakeupFd):
    """Stands in for the ``multiprocessing.SimpleQueue`` that ``ThreadPool``
    uses as its change notifier (``Pool._change_notifier``).

    The pool only ever puts ``None`` into it, to wake its worker-handler
    thread, which waits on ``_reader`` and then empties it with
    ``empty()``/``get()``; a wake-up fd does all of that, without the
    SimpleQueue's pickling, its two locks (named semaphores, which
    multiprocessing's resource tracker would register under a "spawn" or
    "forkserver" start method) and its two fds. Unlike the SimpleQueue it
    can be closed while the pool object is still referenced: ``put()``
    after ``close()`` does nothing, so the pool's finaliser and ``__del__``
    stay harmless. It is closed once the worker-handler thread has ended
    (see ``_ThreadPool._setup_queues``). A forked child never writes to it
    (``_WakeupFd.signal``): the child's exit runs the inherited pool's
    finaliser, which would wake the parent's worker handler.
    """

    __slots__ = ("reader_thread",)

    def __init__(self) -> None:
        super().__init__()
        #: The pool's worker-handler thread: the one thread that waits on
        #: this notifier (set once the pool has started it).
        self.reader_thread: threading.Thread | None = None

    @property
    def _reader(self) -> "_PoolNotifier":
        # multiprocessing.connection.wait() only needs fileno().
        return self

    def put(self, obj: Any) -> None:
        self.signal()

    def empty(self) -> bool:
        self.drain()
        return True

    def get(self) -> None:
        self.drain()

    def close_after_reader(self) -> None:
        """Close once the worker-handler thread has ended (it is about to:
        called after it asked the task handler to stop)."""
        reader = self.reader_thread
        if reader is not None and reader is not threading.current_thread():
            reader.join()
        self.close()


class _NotifierContext:
    """The ``context`` handed to ``Pool.__init__``: ``ThreadPool`` uses its
    ``SimpleQueue()`` for the change notifier and nothing else (its worker
    "processes" are threads); any other attribute is the "fork" context's."""

    def __init__(self, notifier: _PoolNotifier) -> None:
        self._notifier = notifier

    def SimpleQueue(self) -> _PoolNotifier:  # multiprocessing's name
        return self._notifier

    def __getattr__(self, name: str) -> Any:
        return getattr(_notifier_context(), name)


class _ThreadPool(ThreadPool):
    """A ``ThreadPool`` whose change notifier is a ``_PoolNotifier``, closed
    as soon as the pool has wound down (POSIX), instead of a
    ``multiprocessing.SimpleQueue`` whose pipe stays open until the pool
    object is collected.

    Where there are no wake-up fds (Windows), the stdlib notifier is built
    under the "fork" multiprocessing context where one exists: ThreadPool
    starts no process, but under a "forkserver"/"spawn" default (Python
    3.14's on Linux, macOS's) the notifier's named semaphore would be
    registered with multiprocessing's resource tracker (a tracker process
    started by the first Context, a pipe to it held for good, "leaked
    semaphore objects" from forked children). Nothing here forks.
    """

    _notifier: _PoolNotifier | None = None

    def __init__(self, processes: int) -> None:
        if not WAKEUP_FDS:
            Pool.__init__(self, processes, context=_notifier_context())
            return
        notifier = self._notifier = _PoolNotifier()
        try:
            Pool.__init__(self, processes, context=_NotifierContext(notifier))
        except BaseException:
            notifier.close()
            raise
        notifier.reader_thread = getattr(self, "_worker_handler", None)

    def _setup_queues(self) -> None:
        super()._setup_queues()  # type: ignore[misc]
        notifier = self._notifier
        if notifier is None:
            return
        put = self._inqueue.put  # type: ignore[attr-defined]

        def quick_put(task: Any) -> None:
            # Pool._handle_tasks sends the workers their stop sentinels
            # (None) only after the worker handler has left its loop and
            # asked it to stop: the notifier's one reader is done with it.
            if task is None:
                notifier.close_after_reader()
            put(task)

        self._quick_put = quick_put


# The pool's own threads, worker handler first: it is the one that lets the
# others stop (Context._join).
_POOL_THREADS = ("_worker_handler", "_task_handler", "_result_handler")


# Contexts still open, closed by an atexit hook. multiprocessing's own exit
# handler (registered when multiprocessing.pool was imported above, so it
# runs after ours) terminates pools without marking them closed; a pool left
# in RUN state then writes to its already-closed notifier pipe when it is
# collected ("Exception ignored ... Bad file descriptor" at exit). Closing our
# pools first avoids that; work already scheduled still completes.
_open_contexts: "WeakSet[Context]" = WeakSet()


@atexit.register
def _close_open_contexts() -> None:
    for context in list(_open_contexts):
        try:
            context.close()
        except Exception:  # pragma: no cover - best effort at exit
            pass


class Context(AbstractContext):
    """
    python aio context implementation
    """

    MAX_POOL_SIZE = 128

    # Class-level default: if the constructor call fails before __init__
    # runs (e.g. an unknown keyword argument), __del__ still finds a state
    # and does nothing (upstream printed an AttributeError here, DESIGN.md §6.2 del-state).
    _state = ContextState.CLOSED

    #: Reads of at most this many bytes are first tried from the page cache
    #: inside submit() (0: never, the raw API's default). The asyncio
    #: adapter switches it on (_enable_inline_reads).
    _inline_read_max = 0

    def __init__(self, max_requests: int = 32, pool_size: int = 8):
        self._state = ContextState.CLOSED

        if not 0 < pool_size < self.MAX_POOL_SIZE:
            raise ValueError(
                f"pool_size must be between 1 and {self.MAX_POOL_SIZE - 1}, got {pool_size}",
            )
        if max_requests <= 0:
            raise ValueError(
                f"max_requests must be a positive integer, got {max_requests}",
            )

        self._max_requests = max_requests
        self._fork_generation = _fork_generation
        self.pool = _ThreadPool(pool_size)
        self._in_progress = 0
        self._lock = Lock()
        self._direct = _pool_supports_direct_jobs(self.pool)
        # Direct path: claimed operations wait here for a "drain" task; at
        # most pool_size drains are queued or running at any time.
        self._queue: deque[tuple[Any, Any, Operation]] = deque()
        self._order = _WriteOrder()
        self._order_lock = Lock()
        self._drains = 0
        self._busy = 0
        self._pool_size = pool_size
        self._state = ContextState.OPEN
        _open_contexts.add(self)

    def _enable_inline_reads(self, max_bytes: int) -> None:
        """From now on, submit() first tries reads of at most ``max_bytes``
        from the page cache on the calling thread (``preadv(RWF_NOWAIT)``,
        never waiting for the disk). A hit completes inside submit(): its
        callback runs there, on the submitting thread, before submit()
        returns. No-op where ``RWF_NOWAIT`` does not exist."""
        if INLINE_READS:
            self._inline_read_max = max_bytes

    @property
    def max_requests(self) -> int:
        return self._max_requests

    # -- submission ------------------------------------------------------------

    def submit(self, *aio_operations: AbstractOperation) -> int:
        for operation in aio_operations:
            if not isinstance(operation, Operation):
                raise ValueError(f"Invalid Operation {operation!r}")
        if self._fork_generation != _fork_generation:
            # Checked before taking any lock: a lock held by one of the
            # parent's threads at fork() time is never released here.
            raise RuntimeError(
                "this python_aio Context was created before fork() and its "
                "thread pool does not exist in this process; create a new "
                "Context in the child",
            )

        count = 0
        for operation in aio_operations:
            # Resolved before claiming: an unknown opcode raises KeyError
            # here and leaves the operation untouched.
            assert isinstance(operation, Operation)  # checked above
            runner = _RUNNERS[operation.opcode]
            if self._claim(operation):
                opcode = operation.opcode
                if (
                    opcode == _READ
                    and operation._nbytes <= self._inline_read_max
                    and _try_read_inline(operation)
                ):
                    # A page-cache hit: completed here, callback included.
                    self._complete(operation, operation.written)
                    count += 1
                    continue
                try:
                    if (
                        opcode == _WRITE
                        or opcode == _WRITEV
                        or opcode == _FSYNC
                        or opcode == _FDSYNC
                    ):
                        self._schedule_ordered(runner, operation)
                    else:
                        self._schedule(runner, operation)
                except BaseException:
                    self._unclaim(operation)
                    raise
                count += 1
        return count

    def _schedule_ordered(
        self,
        runner: Callable[["Operation"], Any],
        operation: "Operation",
    ) -> None:
        """A write or a sync: numbered and queued under one lock, so a sync
        waits only for writes queued before it (workers take them first: a
        waiting sync never holds up the writes it waits for)."""
        order = self._order
        fd = operation._fileno
        with self._order_lock:
            if operation.opcode == _WRITE or operation.opcode == _WRITEV:
                number = order.write_submitted(fd)
                try:
                    self._schedule(
                        functools.partial(_ordered_write, order, number, runner), operation
                    )
                except BaseException:
                    order.write_finished(fd, number)
                    raise
                return
            before = order.sync_submitted(fd)
            if before is not None:
                runner = functools.partial(_ordered_sync, order, before, runner)
            self._schedule(runner, operation)

    def _claim(self, operation: "Operation") -> bool:
        # The operation's own lock makes the claim atomic across Contexts
        # (two Contexts never share their locks, only the operation).
        with operation._lock, self._lock:
            if operation.in_progress:
                # One-shot: already submitted somewhere, or completed.
                return False
            if self._state != _OPEN:
                raise RuntimeError("Context is closed")
            if self._in_progress >= self._max_requests:
                raise CapacityError(
                    errno.EAGAIN,
                    "Maximum simultaneous requests have been reached: the "
                    f"queue is full (max_requests={self._max_requests}); the operations before "
                    "this one were accepted, submit the rest again once some "
                    "have completed",
                )
            operation.in_progress = True
            self._in_progress += 1
        return True

    def _unclaim(self, operation: "Operation") -> None:
        # Scheduling failed, so the pool never saw the operation: give the
        # slot back and leave the operation retryable.
        with operation._lock, self._lock:
            operation.in_progress = False
            self._in_progress -= 1

    def _schedule(
        self,
        runner: Callable[["Operation"], Any],
        operation: "Operation",
    ) -> None:
        # Any: the direct path uses ThreadPool internals the stubs do not list.
        pool: Any = self.pool
        if not self._direct:
            pool.apply_async(
                runner,
                (operation,),
                callback=_ApplyCallback(self, operation, True),
                error_callback=_ApplyCallback(self, operation, False),
            )
            return

        job = _Job(self, operation)
        cache = pool._cache
        # Register first, then check the pool is running: if a concurrent
        # pool.close() has already happened we back out; if it happens after
        # the check, the pool waits for this cached job before it stops its
        # workers, so the queued operation is always executed.
        cache[job] = job
        if pool._state != _POOL_RUN:
            del cache[job]
            raise ValueError("Pool not running")
        item = (job, runner, operation)
        with self._lock:
            self._queue.append(item)
            # Recruit a drain only when every existing one is busy executing
            # an operation: a free drain picks this one up by itself.
            spawn = self._drains == self._busy and self._drains < self._pool_size
            if spawn:
                self._drains += 1
        if spawn and not self._spawn_drain(pool):
            with self._lock:
                try:
                    self._queue.remove(item)
                except ValueError:
                    return  # another drain already took it: it will run
            del cache[job]
            raise RuntimeError("Cannot schedule the operation on the pool")

    def _spawn_drain(self, pool: Any) -> bool:
        """Queue one drain task on the pool; the caller counted it already."""
        drain = _DrainJob(self)
        pool._cache[drain] = drain
        try:
            # Task layout expected by the pool's workers: (job, index, func,
            # args, kwds).
            pool._quick_put((drain, 0, self._drain, (), {}))
        except BaseException:
            del pool._cache[drain]
            with self._lock:
                self._drains -= 1
            return False
        return True

    def _drain(self) -> None:
        # Runs on a pool worker: executes queued operations until none is
        # left.  Each result is handed to the pool's result handler on its
        # own, exactly as a worker reports an individual task, so callbacks
        # are neither batched nor delayed behind later operations.  Before
        # starting an operation, a drain that sees more work waiting and no
        # free drain recruits another one, so a slow operation never holds up
        # the rest of the queue (up to pool_size drains, one per worker).
        queue = self._queue
        lock = self._lock
        pool: Any = self.pool
        put = pool._outqueue.put
        busy = False
        while True:
            with lock:
                if busy:
                    self._busy -= 1
                    busy = False
                if not queue:
                    self._drains -= 1
                    return
                job, runner, operation = queue.popleft()
                self._busy += 1
                busy = True
                spawn = (
                    bool(queue) and self._drains == self._busy and self._drains < self._pool_size
                )
                if spawn:
                    self._drains += 1
            if spawn:
                # On failure the loop still serves the queue by itself.
                self._spawn_drain(pool)
            try:
                outcome: tuple[bool, Any] = (True, runner(operation))
            except BaseException as exc:
                # Reported as this operation's failure; letting it escape
                # would kill the worker with the drain bookkeeping half done.
                outcome = (False, exc)
            put((job, 0, outcome))
            # Do not keep the last operation alive while idle.
            job = runner = operation = outcome = None  # type: ignore[assignment]

    # -- completion (pool result-handler thread) -------------------------------

    def _complete(self, operation: "Operation", result: Any) -> None:
        operation.written = result
        operation._release_view()
        with self._lock:
            self._in_progress -= 1
        callback = operation.callback
        if callback is not None:
            try:
                callback(result)
            except BaseException:
                _report_callback_error()

    def _fail(self, operation: "Operation", exc: BaseException) -> None:
        operation.exception = exc
        operation.written = 0
        operation._release_view()
        with self._lock:
            self._in_progress -= 1
        callback = operation.callback
        if callback is not None:
            try:
                callback(None)
            except BaseException:
                _report_callback_error()

    # -- misc ------------------------------------------------------------------

    def cancel(self, *aio_operations: AbstractOperation) -> int:
        """Operations cannot be cancelled here; always returns 0."""
        return 0

    def close(self) -> None:
        """Stop accepting operations; already scheduled ones still finish.

        Does not wait for them (their callbacks still fire).  Idempotent.
        Once they are done the pool's threads end and its notifier fd is
        closed (``_join`` waits for that).
        """
        if self._state != ContextState.OPEN:
            return
        if self._fork_generation != _fork_generation:
            # Inherited through fork(): the pool's threads (and whoever held
            # our lock or the pool's at the moment of the fork) exist only in
            # the parent, so taking those locks here could block forever
            # (seen at the child's exit, from the atexit hook). Nothing runs
            # here to stop or wait for. Only mark the pool closed, so that
            # its __del__ does not try to notify its (absent) threads through
            # a queue at interpreter shutdown.
            self._state = ContextState.CLOSED
            pool: Any = self.pool
            pool._state = _POOL_CLOSE
            return
        with self._lock:
            if self._state != ContextState.OPEN:
                return
            self._state = ContextState.CLOSING
            try:
                self.pool.close()
            finally:
                self._state = ContextState.CLOSED

    def _join(self, timeout: float) -> bool:
        """Wait, at most ``timeout`` seconds, for the pool of this closed
        Context to stop its threads (it does once no operation is left);
        by then the pool's notifier fd is closed too. Returns True if it did.

        Waits for nothing while the Context is open, in a forked child (the
        threads are the parent's) or on one of the pool's own threads.
        """
        if self._state != ContextState.CLOSED or self._fork_generation != _fork_generation:
            return False
        pool: Any = self.pool
        threads = [getattr(pool, name, None) for name in _POOL_THREADS]
        threads.extend(getattr(pool, "_pool", ()))
        if threading.current_thread() in threads:
            return False
        deadline = time.monotonic() + timeout
        for thread in threads:
            if not isinstance(thread, threading.Thread) or thread.ident is None:
                continue  # never started
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
        notifier = getattr(pool, "_notifier", None)
        if notifier is not None:
            notifier.close()
        return True

    def __del__(self, _open: ContextState = ContextState.OPEN) -> None:
        # ``_open`` is bound at definition time: at interpreter shutdown this
        # module's globals may already be None (seen on 3.13t with a Context
        # inherited through fork(): "'NoneType' object has no attribute
        # 'OPEN'"), and then there is nothing left worth closing.
        if self._state == _open and ContextState is not None:
            self.close()


class _ApplyCallback:
    """Fallback-path completion callback for ``apply_async``."""

    __slots__ = ("context", "operation", "success")

    def __init__(self, context: Context, operation: "Operation", success: bool):
        self.context = context
        self.operation = operation
        self.success = success

    def __call__(self, value: Any) -> None:
        if self.success:
            self.context._complete(self.operation, value)
        else:
            self.context._fail(self.operation, value)


def _pool_supports_direct_jobs(pool: ThreadPool) -> bool:
    return (
        callable(getattr(pool, "_quick_put", None))
        and isinstance(getattr(pool, "_cache", None), dict)
        and hasattr(pool, "_state")
        and callable(getattr(getattr(pool, "_outqueue", None), "put", None))
    )


_NO_TARGET: Any = object()  # Operation(): not a readinto


class Operation(AbstractOperation):
    """
    python aio operation implementation
    """

    #: readv/writev: the views of the caller's buffers until completion.
    _views: "list[memoryview] | tuple[()]" = ()

    def __init__(
        self,
        fd: int,
        nbytes: int | None,
        offset: int | None,
        opcode: OpCode | int,
        payload: Any = None,
        priority: int | None = None,
        target: Any = _NO_TARGET,
    ):
        # Same acceptance rule as the native argument parsers: anything with
        # __index__ (int, bool, numpy integers), nothing else.
        fd = operator.index(fd)
        nbytes = 0 if nbytes is None else operator.index(nbytes)
        offset = 0 if offset is None else operator.index(offset)
        priority = 0 if priority is None else operator.index(priority)

        # The caller's memory, used in place: a write's payload that is not
        # `bytes` (immutable, so nothing to pin) or a readinto's target. The
        # export is released when the operation completes.
        view: memoryview | None = None
        caller: Any = None
        if opcode == _WRITE:
            if isinstance(payload, bytes):
                buffer: Any = payload
            else:
                if payload is None:
                    raise ValueError("payload_bytes must be a bytes-like object, not 'NoneType'")
                view = _export(payload, False, "payload_bytes")
                buffer, caller, nbytes = view, payload, view.nbytes
        elif opcode == _READV or opcode == _WRITEV:
            buffer = b""
            self._views = _export_all(target, opcode == _READV)
            caller, nbytes = target, sum(v.nbytes for v in self._views)
        else:
            buffer = b""
            if target is not _NO_TARGET:
                view = _export(target, True, "buffer")
                caller, nbytes = target, view.nbytes

        self.callback: Callback | None = None
        self.in_progress = False
        self._lock = Lock()
        # Write: the caller's payload (no copy).  Read: replaced by the bytes
        # pread() returns.  Otherwise empty.
        self.buffer: Any = buffer
        self._view = view
        self._caller = caller
        self._borrows_buffer = caller is not None
        self.opcode = opcode
        self.exception: BaseException | None = None
        self.written: int = 0

        self._fileno = fd
        self._nbytes = nbytes
        self._offset = offset
        self._priority = priority  # accepted for compatibility, unused

    @classmethod
    def read(
        cls,
        nbytes: int,
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> "Operation":
        """Create a read operation."""
        return cls(fd, nbytes, offset, _READ, priority=priority)

    @classmethod
    def write(
        cls,
        payload_bytes: "Buffer",
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> "Operation":
        """Create a write operation."""
        return cls(
            fd,
            len(payload_bytes),  # type: ignore[arg-type]  # its TypeError is the contract's
            offset,
            _WRITE,
            payload=payload_bytes,
            priority=priority,
        )

    @classmethod
    def readinto(
        cls,
        buffer: "Buffer",
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> "Operation":
        """Create a read into ``buffer`` (a writable C-contiguous buffer),
        used in place; ``get_value()`` is the number of bytes read."""
        return cls(fd, None, offset, _READ, priority=priority, target=buffer)

    @classmethod
    def readv(cls, buffers: Any, fd: int, offset: int, priority: int = 0) -> "Operation":
        """One vectored read (``os.preadv``) into ``buffers``, a sequence of
        at most ``IOV_MAX`` writable C-contiguous buffers filled in order;
        ``get_value()`` is the number of bytes read."""
        return cls(fd, None, offset, _READV, priority=priority, target=buffers)

    @classmethod
    def writev(cls, buffers: Any, fd: int, offset: int, priority: int = 0) -> "Operation":
        """One vectored write (``os.pwritev``) of ``buffers`` in order;
        ``get_value()`` is the number of bytes written."""
        return cls(fd, None, offset, _WRITEV, priority=priority, target=buffers)

    def _release_view(self) -> None:
        # Completion: the caller's memory is theirs again.
        views, self._views = self._views, ()
        for v in views:
            v.release()
        view = self._view
        if view is not None:
            self._view = None
            if self.opcode == _WRITE:
                self.buffer = b""
            view.release()

    @classmethod
    def fsync(cls, fd: int, priority: int = 0) -> "Operation":
        """Create an fsync operation."""
        return cls(fd, None, None, _FSYNC, priority=priority)

    @classmethod
    def fdsync(cls, fd: int, priority: int = 0) -> "Operation":
        """Create an fdatasync operation (fsync where unavailable)."""
        return cls(fd, None, None, _FDSYNC, priority=priority)

    def get_value(self) -> bytes | int | None:
        """The result: bytes read, bytes written, or ``None`` for syncs.

        Re-raises the original ``OSError`` if the operation failed.
        """
        if self.exception is not None:
            raise self.exception
        opcode = self.opcode
        if opcode == _WRITE or opcode == _READV or opcode == _WRITEV:
            return self.written
        if opcode == _FSYNC or opcode == _FDSYNC:
            return None
        if self._caller is not None:
            return self.written  # readinto: the bytes read
        data: bytes = self.buffer
        return data

    @property
    def fileno(self) -> int:
        return self._fileno

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def payload(self) -> Any:
        if self._caller is not None:
            return self._caller
        return memoryview(self.buffer)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def set_callback(self, callback: Callback) -> bool:
        if not callable(callback):
            raise ValueError(
                f"callback must be callable, got {callback!r}",
            )
        # A single attribute store is atomic (also without the GIL) and drops
        # the previous callback exactly once.
        self.callback = callback
        return True
