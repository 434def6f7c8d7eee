"""python_aio specifics (DESIGN.md §4.7, §6.2 del-state)."""

import asyncio
import errno
import gc
import importlib.util
import os
import sys
import threading
import time
import weakref
from multiprocessing.pool import ThreadPool
from typing import Any

import pytest

import caio
from caio import python_aio
from caio.python_aio import ContextState, OpCode

from helpers import AsyncBackend, LoopRunner, RawBackend, Recorder


def test_module_level_names() -> None:
    assert python_aio.fdsync is getattr(os, "fdatasync", os.fsync)
    assert python_aio.NATIVE_PREAD_PWRITE == (hasattr(os, "pread") and hasattr(os, "pwrite"))
    assert [(m.name, int(m)) for m in OpCode] == [
        ("READ", 0),
        ("WRITE", 1),
        ("FSYNC", 2),
        ("FDSYNC", 3),
        ("NOOP", -1),
    ]
    assert [(m.name, int(m)) for m in ContextState] == [
        ("OPEN", 0),
        ("CLOSING", 1),
        ("CLOSED", 2),
    ]
    assert python_aio.Context.MAX_POOL_SIZE == 128


def test_context_defaults(python_aio: RawBackend) -> None:
    ctx = python_aio.context()
    assert ctx.max_requests == 32
    assert isinstance(ctx.pool, ThreadPool)
    assert ctx._in_progress == 0
    assert ctx._state == ContextState.OPEN
    with pytest.raises(AttributeError):
        ctx.max_requests = 5


def test_context_validation(python_aio: RawBackend) -> None:
    """DESIGN.md §4.7 and the documented validation order."""
    for kwargs in ({"pool_size": 0}, {"max_requests": 0}, {"pool_size": 128}, {"max_requests": -1}):
        with pytest.raises(ValueError):
            python_aio.Context(**kwargs)
    # pool_size is validated first.
    with pytest.raises(ValueError, match="pool_size"):
        python_aio.Context(max_requests=0, pool_size=0)
    with pytest.raises(ValueError, match="between 1 and 127, got 500"):
        python_aio.Context(pool_size=500)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        python_aio.Context(max_requests=0)
    with pytest.raises(TypeError):
        python_aio.Context(max_requests=None)
    assert python_aio.context(pool_size=127).max_requests == 32


def test_failed_construction_finalizer_is_silent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DESIGN.md §6.2 del-state: a constructor call that fails before __init__ runs (unknown
    keyword) or inside validation must not report anything from __del__."""
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    with pytest.raises(TypeError):
        python_aio.Context(bogus=1)
    with pytest.raises(ValueError):
        python_aio.Context(pool_size=0)
    gc.collect()
    assert reports == []


def test_direct_operation_construction(python_aio: RawBackend) -> None:
    ctx = python_aio.context()
    op = python_aio.Operation(0, None, None, OpCode.NOOP)
    assert (op.fileno, op.nbytes, op.offset) == (0, 0, 0)
    assert op.opcode is OpCode.NOOP
    assert op.callback is None
    assert op.in_progress is False
    assert op.exception is None
    assert op.written == 0
    assert op.buffer == b""
    assert python_aio.run_one(ctx, op) is None
    assert op.get_value() == b""
    assert op.in_progress is True  # never reset after a genuine dispatch


def test_write_requires_bytes_payload_directly() -> None:
    with pytest.raises(ValueError):
        python_aio.Operation(0, 1, 0, OpCode.WRITE, payload=None)
    with pytest.raises(ValueError):
        python_aio.Operation(0, 1, 0, OpCode.WRITE, payload="x")


def test_payload_is_a_new_memoryview_each_time(
    python_aio: RawBackend,
    tmp_fd: int,
) -> None:
    op = python_aio.Operation.write(b"abc", tmp_fd, 0)
    first, second = op.payload, op.payload
    assert isinstance(first, memoryview)
    assert first is not second
    assert first == second == b"abc"


def test_no_in_flight_gate(python_aio: RawBackend, tmp_fd: int) -> None:
    os.pwrite(tmp_fd, b"data", 0)
    ctx = python_aio.context(pool_size=1)
    release = threading.Event()
    blocker = python_aio.Operation.fsync(tmp_fd)
    blocker.set_callback(lambda _: release.wait(10))
    assert ctx.submit(blocker) == 1
    op = python_aio.Operation.read(4, tmp_fd, 0)
    calls = Recorder()
    op.set_callback(calls)
    assert ctx.submit(op) == 1
    # python_aio returns the current state instead of raising.
    assert op.get_value() in (b"", b"data")
    assert bytes(op.payload) in (b"", b"data")
    release.set()
    python_aio.wait_for(None, lambda: len(calls) == 1)
    assert op.get_value() == b"data"


def test_max_requests_one_rejects_second(python_aio: RawBackend) -> None:
    """DESIGN.md §4.7."""
    ctx = python_aio.context(max_requests=1, pool_size=1)
    ctx._in_progress = 1
    with pytest.raises(RuntimeError):
        ctx.submit(python_aio.Operation.fsync(0))
    ctx._in_progress = 0


def test_in_flight_never_exceeds_max_requests(
    python_aio: RawBackend,
    fast_fd: int,
) -> None:
    ctx = python_aio.context(max_requests=3, pool_size=1)
    release = threading.Event()
    calls = Recorder()
    ops = [python_aio.Operation.fsync(fast_fd) for _ in range(5)]
    ops[0].set_callback(lambda _: (release.wait(10), calls(None)))
    for op in ops[1:]:
        op.set_callback(calls)
    with pytest.raises(RuntimeError, match="Maximum simultaneous requests"):
        ctx.submit(*ops)
    # The first three were scheduled, the rest never claimed - except that
    # ops[0] may finish (its count is returned before its callback blocks)
    # while submit() is still going, and then ops[3] fits in its place.
    # (ops[0] only returns its count - its callback blocks after that; the
    # others cannot finish meanwhile: the single worker is taken.)
    python_aio.wait_for(
        None,
        lambda: ctx._in_progress == sum(op.in_progress for op in ops[1:]),
    )
    states = [op.in_progress for op in ops]
    assert states[1:3] == [True, True] and states[4] is False, states
    accepted = 4 if states[3] else 3
    assert ctx._in_progress == accepted - 1 <= 3
    release.set()
    python_aio.wait_for(None, lambda: len(calls) == accepted)
    python_aio.wait_for(None, lambda: ctx._in_progress == 0)
    assert python_aio.run(ctx, *ops[accepted:]) == [None] * (5 - accepted)


def test_claimed_op_is_skipped_even_on_closed_context(
    python_aio: RawBackend,
    tmp_fd: int,
) -> None:
    ctx = python_aio.context()
    op = python_aio.Operation.write(b"x", tmp_fd, 0)
    python_aio.run_one(ctx, op)
    ctx.close()
    assert ctx._state == ContextState.CLOSED
    assert ctx.submit(op) == 0
    with pytest.raises(RuntimeError, match="Context is closed"):
        ctx.submit(python_aio.Operation.write(b"y", tmp_fd, 0))


def test_pool_closed_underneath(python_aio: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §4.7: scheduling fails -> claim and counter rolled back."""
    ctx = python_aio.context(max_requests=1)
    ctx.pool.close()
    op = python_aio.Operation.fsync(tmp_fd)
    # Whatever the closed pool raises (ValueError from multiprocessing today).
    with pytest.raises(Exception):  # noqa: B017
        ctx.submit(op)
    assert ctx._in_progress == 0
    assert op.in_progress is False
    other = python_aio.context()
    assert python_aio.run_one(other, op) is None


def test_close_does_not_wait_and_pool_joins(
    python_aio: RawBackend,
    fast_fd: int,
) -> None:
    ctx = python_aio.context(max_requests=64, pool_size=2)
    release = threading.Event()
    calls = Recorder()
    blocker = python_aio.Operation.fsync(fast_fd)
    blocker.set_callback(lambda _: (release.wait(10), calls(None)))
    ops = [python_aio.Operation.fsync(fast_fd) for _ in range(20)]
    for op in ops:
        op.set_callback(calls)
    assert ctx.submit(blocker, *ops) == 21
    ctx.close()  # returns while the blocker's callback is still waiting
    assert len(calls) < 21
    release.set()
    ctx.pool.join()  # graceful: every scheduled operation was delivered
    assert len(calls) == 21
    assert ctx._in_progress == 0


def test_raising_callback_reports_via_excepthook(
    python_aio: RawBackend,
    tmp_fd: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DESIGN.md §3.6: exactly one excepthook call, later ops delivered."""
    reports = []
    monkeypatch.setattr(threading, "excepthook", reports.append)
    ctx = python_aio.context()
    failing = python_aio.Operation.write(b"first", tmp_fd, 0)
    failing.set_callback(lambda _: 1 / 0)
    assert ctx.submit(failing) == 1
    python_aio.wait_for(None, lambda: reports)
    assert len(reports) == 1
    report = reports[0]
    assert isinstance(report, threading.ExceptHookArgs)
    assert report.exc_type is ZeroDivisionError
    assert isinstance(report.exc_value, ZeroDivisionError)
    assert report.exc_traceback is not None
    assert report.thread is not threading.current_thread()
    following = python_aio.Operation.write(b"second", tmp_fd, 5)
    assert python_aio.run_one(ctx, following) == 6
    assert len(reports) == 1


def test_callbacks_run_one_at_a_time(python_aio: RawBackend, fast_fd: int) -> None:
    ctx = python_aio.context(max_requests=64, pool_size=8)
    active = []
    overlap = []
    lock = threading.Lock()

    def callback(_: object) -> None:
        with lock:
            active.append(1)
            if len(active) > 1:
                overlap.append(1)
        threading.Event().wait(0.001)
        with lock:
            active.pop()

    ops = [python_aio.Operation.fsync(fast_fd) for _ in range(40)]
    python_aio.run(ctx, *ops)  # run() replaces callbacks; wrap instead
    ops = [python_aio.Operation.fsync(fast_fd) for _ in range(40)]
    done = Recorder()
    for op in ops:
        op.set_callback(lambda r: (callback(r), done(r)))
    assert ctx.submit(*ops) == 40
    python_aio.wait_for(None, lambda: len(done) == 40)
    assert overlap == []


def test_apply_async_fallback_path(python_aio: RawBackend, tmp_fd: int) -> None:
    """The ThreadPool.apply_async path gives the same results."""
    ctx = python_aio.context()
    ctx._direct = False
    write = python_aio.Operation.write(b"fallback", tmp_fd, 0)
    assert python_aio.run_one(ctx, write) == 8
    read = python_aio.Operation.read(100, tmp_fd, 0)
    assert python_aio.run_one(ctx, read) == 8
    assert read.get_value() == b"fallback"
    bad = python_aio.Operation.read(1, 4093 + 7919, 0)
    assert python_aio.run_one(ctx, bad) is None
    with pytest.raises(OSError):
        bad.get_value()
    assert ctx._in_progress == 0
    ctx.pool.close()
    with pytest.raises(ValueError):
        ctx.submit(python_aio.Operation.fsync(tmp_fd))
    assert ctx._in_progress == 0


def test_direct_path_is_used_on_this_python(python_aio: RawBackend) -> None:
    # The lean submission path relies on ThreadPool internals that have not
    # changed from 3.8 to 3.13; make it visible when a new CPython drops them.
    assert python_aio.context()._direct is True


def test_unknown_opcode_is_rejected_by_submit(python_aio: RawBackend) -> None:
    ctx = python_aio.context()
    op = python_aio.Operation(0, None, None, 99)
    with pytest.raises(KeyError):
        ctx.submit(op)
    assert op.in_progress is False
    assert ctx._in_progress == 0


# -- the lseek+read emulation used without os.pread (Windows) -------------------------


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A private copy of python_aio loaded as if os.pread/pwrite were missing."""
    monkeypatch.delattr(os, "pread", raising=False)
    monkeypatch.delattr(os, "pwrite", raising=False)
    spec = importlib.util.spec_from_file_location(
        "caio._python_aio_emulated",
        python_aio.__file__,
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.undo()  # the module captured the emulation already
    assert module.NATIVE_PREAD_PWRITE is False
    backend = RawBackend("python_aio", module)
    yield backend
    backend.cleanup()


def test_emulated_pread_pwrite(emulated: RawBackend, tmp_fd: int) -> None:
    ctx = emulated.context()
    ops = [emulated.Operation.write(bytes([65 + i]) * 512, tmp_fd, 512 * i) for i in range(16)]
    assert emulated.run(ctx, *ops) == [512] * 16
    reads = [emulated.Operation.read(512, tmp_fd, 512 * i) for i in range(16)]
    assert emulated.run(ctx, *reads) == [512] * 16
    assert [op.get_value() for op in reads] == [bytes([65 + i]) * 512 for i in range(16)]
    past = emulated.Operation.read(10, tmp_fd, 10**6)
    assert emulated.run_one(ctx, past) == 0
    negative = emulated.Operation.read(10, tmp_fd, -1)
    emulated.run_one(ctx, negative)
    with pytest.raises(OSError) as excinfo:
        negative.get_value()
    assert excinfo.value.errno == errno.EINVAL


def test_fdsync_fallback_symbol() -> None:
    if hasattr(os, "fdatasync"):
        assert python_aio.fdsync is os.fdatasync
    else:
        assert python_aio.fdsync is os.fsync


def test_python_aio_is_always_available() -> None:
    assert caio.python_aio is python_aio
    assert caio.variants[-1] is python_aio
    assert caio.variants_asyncio[-1] is caio.python_aio_asyncio


# -- scheduling: slow operations must not hold up others ------------------------------


@pytest.fixture
def blocking_noop(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """NOOP operations block on the pool thread until the event is set."""
    release = threading.Event()

    def blocking(op: Any) -> None:
        assert release.wait(20), "never released"

    monkeypatch.setitem(python_aio._RUNNERS, OpCode.NOOP, blocking)
    yield release
    release.set()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "apply_async"])
def test_slow_operation_does_not_hold_up_others(
    python_aio: RawBackend,
    fast_fd: int,
    blocking_noop: threading.Event,
    direct: bool,
) -> None:
    ctx = python_aio.context(64, pool_size=2)
    ctx._direct = direct
    slow_done = Recorder()
    slow = python_aio.Operation(0, None, None, OpCode.NOOP)
    slow.set_callback(slow_done)
    assert ctx.submit(slow) == 1
    # Everything else completes on the second worker meanwhile.
    fast = [python_aio.Operation.write(b"%02d" % i, fast_fd, 2 * i) for i in range(20)]
    assert python_aio.run(ctx, *fast) == [2] * 20
    assert slow_done.items == []
    blocking_noop.set()
    python_aio.wait_for(None, lambda: len(slow_done) == 1)
    assert ctx._in_progress == 0


def test_exhausted_pool_queues_operations(
    python_aio: RawBackend,
    fast_fd: int,
    blocking_noop: threading.Event,
) -> None:
    ctx = python_aio.context(64, pool_size=2)
    slow = [python_aio.Operation(0, None, None, OpCode.NOOP) for _ in range(2)]
    assert ctx.submit(*slow) == 2
    done = Recorder()
    waiting = [python_aio.Operation.fsync(fast_fd) for _ in range(10)]
    for op in waiting:
        op.set_callback(done)
    assert ctx.submit(*waiting) == 10
    threading.Event().wait(0.2)
    assert done.items == []  # both workers are blocked
    blocking_noop.set()
    python_aio.wait_for(None, lambda: len(done) == 10)
    python_aio.wait_for(None, lambda: ctx._in_progress == 0)


def test_base_exception_in_runner_fails_only_that_operation(
    python_aio: RawBackend,
    fast_fd: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(op: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(caio.python_aio._RUNNERS, OpCode.NOOP, interrupted)
    ctx = python_aio.context(pool_size=1)
    op = python_aio.Operation(0, None, None, OpCode.NOOP)
    assert python_aio.run_one(ctx, op) is None
    with pytest.raises(KeyboardInterrupt):
        op.get_value()
    # The single worker is still alive and serving.
    assert python_aio.run_one(ctx, python_aio.Operation.fsync(fast_fd)) is None


_NO_TRACKER_SCRIPT = """
import gc, multiprocessing, os, sys
multiprocessing.set_start_method(sys.argv[1])
from caio import python_aio
fds = sorted(os.listdir("/proc/self/fd"))
ctx = python_aio.Context()
pool = ctx.pool
ctx.close()
pool.join()
del ctx, pool
gc.collect()
from multiprocessing import resource_tracker
tracker = resource_tracker._resource_tracker
print(sorted(os.listdir("/proc/self/fd")) == fds, getattr(tracker, "_pid", None))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_context_starts_no_resource_tracker(method: str) -> None:
    """Under a "forkserver"/"spawn" default start method (Python 3.14's
    default on Linux, macOS's since 3.8) ThreadPool's notifier semaphore would
    be registered with multiprocessing's resource tracker: a tracker process
    started by the first Context, a pipe fd held for good, and "leaked
    semaphore" warnings from forked children. Our pool's notifier is a
    wake-up fd of its own (the stdlib one built under the "fork" context
    where there are none): no tracker, no fd left behind."""
    from helpers import run_python

    proc = run_python(["-c", _NO_TRACKER_SCRIPT, method])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "None"], (proc.stdout, proc.stderr)
    assert proc.stderr == "", proc.stderr


# -- asyncio adapter: wake-ups through the adapter's own fd ---------------------------


def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


@pytest.mark.skipif(not python_aio.WAKEUP_FDS, reason="no fd wake-ups on this platform")
def test_adapter_does_not_depend_on_the_loops_self_pipe(aio: LoopRunner, tmp_fd: int) -> None:
    """What a forked child's exit does to its parent's asyncio loop
    (test_reliability_fork.py): the loop's self-pipe is unregistered from
    its selector, so call_soon_threadsafe() no longer wakes it. Completions
    still arrive, through the adapter's own fd."""
    if aio.kind != "asyncio":
        pytest.skip("reaches into asyncio's selector loop")
    loop: Any = aio.loop
    os.pwrite(tmp_fd, b"payload", 0)

    async def main() -> None:
        ctx = caio.python_aio_asyncio.AsyncioContext(8, loop=loop)
        # Every read goes to the pool and comes back through the fd (a
        # page-cache hit would complete inside submit(), with no wake-up).
        ctx.context._inline_read_max = 0
        try:
            assert await ctx.read(7, tmp_fd, 0) == b"payload"
            loop._selector.unregister(loop._ssock.fileno())
            for _ in range(3):
                await asyncio.sleep(0.01)  # the loop is asleep when the op ends
                started = time.monotonic()
                done, _ = await asyncio.wait(
                    {asyncio.ensure_future(ctx.read(7, tmp_fd, 0))}, timeout=5
                )
                # Not merely done: a completion that did not wake the loop is
                # seen when the wait's own timer does, 5 s later.
                assert done and time.monotonic() - started < 2.5, "the loop was not woken"
                assert done.pop().result() == b"payload"
        finally:
            ctx.close()
            loop._add_reader(loop._ssock.fileno(), loop._read_from_self)

    aio.run(main())


@pytest.mark.skipif(not python_aio.WAKEUP_FDS, reason="no fd wake-ups on this platform")
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_dropped_adapter_is_collected_and_its_fd_unwatched(aio: LoopRunner, tmp_fd: int) -> None:
    """The loop holds the adapter's reader, which holds the adapter only
    weakly: an adapter dropped without close() is still collected, and its
    wake-up fd is taken off the loop and closed."""

    async def use() -> tuple[Any, int, str | None]:
        ctx = caio.python_aio_asyncio.AsyncioContext(8, loop=aio.loop)
        await ctx.write(b"x", tmp_fd, 0)
        fd = ctx._reader_fd
        assert fd is not None
        return weakref.ref(ctx), fd, _fd_target(fd)

    ref, fd, target = aio.run(use())
    assert target is not None
    gc.collect()
    assert ref() is None
    aio.settle()  # the finaliser's call_soon_threadsafe() runs on the loop
    assert _fd_target(fd) != target


class _NoReadersLoop(asyncio.SelectorEventLoop):
    def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:
        raise NotImplementedError  # as the proactor loop on Windows


def test_loop_without_fd_readers_uses_call_soon_threadsafe(tmp_fd: int) -> None:
    loop = _NoReadersLoop()
    try:

        async def main() -> None:
            ctx = caio.python_aio_asyncio.AsyncioContext(8, loop=loop)
            assert ctx._wakeup is None
            assert await ctx.write(b"fallback", tmp_fd, 0) == 8
            assert (
                await asyncio.gather(*[ctx.read(8, tmp_fd, 0) for _ in range(20)])
                == [b"fallback"] * 20
            )
            ctx.close()
            with pytest.raises(RuntimeError):
                await ctx.read(8, tmp_fd, 0)

        loop.run_until_complete(asyncio.wait_for(main(), 30))
    finally:
        loop.close()


# -- close() releases OS resources once idle ----------------------------------------


def _open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not python_aio.WAKEUP_FDS, reason="stdlib notifier on this platform")
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_closed_context_lets_go_of_its_fds_without_gc(
    python_aio: RawBackend,
    tmp_fd: int,
) -> None:
    """The raw Context: close() does not wait, but once the pool has wound
    down (nothing left to run) its threads are gone and its notifier fd is
    closed, although Context and pool are still referenced. A pool finalised
    afterwards (terminate, collection) still puts into that notifier:
    harmless."""
    before = _open_fds()
    ctx = python_aio.context(16, pool_size=4)
    pool = ctx.pool
    ops = [python_aio.Operation.write(b"%d" % i, tmp_fd, i) for i in range(10)]
    assert python_aio.run(ctx, *ops) == [1] * 10
    ctx.close()
    python_aio.wait_for(None, lambda: _open_fds() == before, what="the pool's fds closed")
    assert ctx._join(10) is True
    assert not pool._worker_handler.is_alive()
    assert not any(worker.is_alive() for worker in pool._pool)
    pool.terminate()
    del ctx, pool
    gc.collect()
    assert _open_fds() == before


def test_join_waits_only_for_a_closed_context(python_aio: RawBackend) -> None:
    ctx = python_aio.context()
    assert ctx._join(10) is False  # open: its threads do not end
    ctx.close()
    assert ctx._join(10) is True
    assert not ctx.pool._result_handler.is_alive()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_close_releases_fds_once_idle(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
) -> None:
    """After every operation was awaited, close() plus one loop iteration
    gives back every fd the adapter opened, although the adapter itself is
    still referenced (a traceback, a closure...): a service that makes a
    context per request must not depend on the garbage collector for them
    (DESIGN.md 5.6, close once idle)."""
    aio.run(asyncio.sleep(0))  # the loop's own lazily made fds (uvloop)
    before = _open_fds()

    async def main() -> Any:
        ctx = async_backend.context(8)
        assert await ctx.write(b"payload", tmp_fd, 0) == 7
        assert await asyncio.gather(*[ctx.read(7, tmp_fd, 0) for _ in range(8)]) == [b"payload"] * 8
        await ctx.fsync(tmp_fd)
        ctx.close()
        await asyncio.sleep(0)
        return ctx

    ctx = aio.run(main())
    assert _open_fds() == before
    del ctx


@pytest.mark.skipif(not hasattr(os, "eventfd"), reason="the pipe is the only kind here")
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_pipe_wakeups_where_there_is_no_eventfd(
    tmp_fd: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """macOS and the BSDs have no eventfd: the adapter's wake-up fd and the
    pool's notifier are pipes there. Same behaviour, same release."""
    monkeypatch.delattr(os, "eventfd")
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.sleep(0))
        before = _open_fds()

        async def main() -> Any:
            ctx = caio.python_aio_asyncio.AsyncioContext(8, loop=loop)
            assert ctx._wakeup is not None and ctx._wakeup._write_fd != ctx._wakeup._read_fd
            assert len(_open_fds()) == len(before) + 4  # two pipes
            assert await ctx.write(b"piped", tmp_fd, 0) == 5
            assert (
                await asyncio.gather(*[ctx.read(5, tmp_fd, 0) for _ in range(16)])
                == [b"piped"] * 16
            )
            ctx.close()
            await asyncio.sleep(0)
            return ctx

        ctx = loop.run_until_complete(asyncio.wait_for(main(), 30))
        assert ctx._released()
        assert _open_fds() == before
    finally:
        loop.close()


@pytest.mark.skipif(not python_aio.INLINE_READS, reason="no preadv(RWF_NOWAIT) here")
def test_page_cache_hit_completes_inside_submit(aio: LoopRunner, tmp_fd: int) -> None:
    """DESIGN.md §7.5: through the asyncio adapter, a read of at most
    INLINE_READ_MAX bytes that the page cache holds is served by
    preadv(RWF_NOWAIT) inside submit(), on the loop thread: no pool job, no
    wake-up, no suspension. Data, short reads at end of file, readinto and
    errors are what the pool gives; larger reads still use the pool, and the
    adapter still closes once idle."""
    from caio.python_aio_asyncio import INLINE_READ_MAX

    data = os.urandom(2 * INLINE_READ_MAX + 100)
    os.pwrite(tmp_fd, data, 0)
    r, w = os.pipe()

    async def main() -> None:
        ctx = caio.python_aio_asyncio.AsyncioContext(8, loop=aio.loop)
        scheduled: list[Any] = []
        schedule = ctx.context._schedule

        def spy(runner: Any, operation: Any) -> None:
            scheduled.append(operation)
            schedule(runner, operation)

        ctx.context._schedule = spy
        got = [await ctx.read(4096, tmp_fd, i * 4096) for i in range(8)]
        assert got == [data[i * 4096 : (i + 1) * 4096] for i in range(8)]
        assert await ctx.read(INLINE_READ_MAX, tmp_fd, 0) == data[:INLINE_READ_MAX]
        assert await ctx.read(4096, tmp_fd, len(data) - 10) == data[-10:]  # end of file
        assert await ctx.read(0, tmp_fd, 0) == b""
        buf = bytearray(1000)
        assert await ctx.readinto(buf, tmp_fd, 7) == 1000
        assert bytes(buf) == data[7:1007]
        assert scheduled == [], "a page-cache hit went to the pool"
        assert ctx.context._in_progress == 0
        # Larger than the limit, or not a page-cache read: the pool, with
        # the pool's results and errors.
        assert await ctx.read(INLINE_READ_MAX + 1, tmp_fd, 0) == data[: INLINE_READ_MAX + 1]
        assert len(scheduled) == 1
        with pytest.raises(OSError) as info:
            await ctx.read(10, r, 0)
        assert info.value.errno == errno.ESPIPE
        assert len(scheduled) == 2
        ctx.close()
        for _ in range(100):
            if ctx._released():
                break
            await asyncio.sleep(0.01)
        assert ctx._released(), "inline completions left the adapter counting ops in flight"

    try:
        aio.run(main())
    finally:
        os.close(r)
        os.close(w)


def test_raw_context_never_reads_inline(python_aio: RawBackend, tmp_fd: int) -> None:
    """The raw API keeps upstream's behaviour: every operation runs on the
    pool and its callback on the pool's thread, page-cache hit or not."""
    os.pwrite(tmp_fd, b"x" * 4096, 0)
    ctx = python_aio.module.Context(8)
    try:
        threads: list[int] = []
        done = threading.Event()
        op = python_aio.module.Operation.read(4096, tmp_fd, 0)
        op.set_callback(lambda _r: (threads.append(threading.get_ident()), done.set()))
        assert ctx.submit(op) == 1
        assert done.wait(5)
        assert threads != [threading.get_ident()]
        assert op.get_value() == b"x" * 4096
    finally:
        ctx.close()
