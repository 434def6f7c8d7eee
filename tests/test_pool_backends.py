"""Thread-pool backends: thread_aio (native) and python_aio (DESIGN.md §4.6, §4.7)."""

import errno
import os
import pathlib
import random
import threading
from collections.abc import Callable

import pytest

from helpers import RawBackend, Recorder, read_file

# -- shared by thread_aio and python_aio ----------------------------------------------


def test_no_eventfd_interface(pool_backend: RawBackend) -> None:
    ctx = pool_backend.context()
    for name in ("fileno", "poll", "process_events", "flush"):
        assert not hasattr(ctx, name)


def test_cancel_of_nothing_queued_returns_0(pool_backend: RawBackend, tmp_fd: int) -> None:
    """An op not queued (new, or done) is left alone: 0, as upstream's no-op cancel."""
    ctx = pool_backend.context()
    op = pool_backend.Operation.write(b"x", tmp_fd, 0)
    assert ctx.cancel(op) == 0
    assert ctx.cancel() == 0
    assert pool_backend.run_one(ctx, op) == 1
    assert ctx.cancel(op) == 0


def test_close_twice_then_submit(pool_backend: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §4.6, §4.7."""
    ctx = pool_backend.context()
    ctx.close()
    ctx.close()
    op = pool_backend.Operation.fsync(tmp_fd)
    with pytest.raises(RuntimeError):
        ctx.submit(op)
    # Rejected, so still usable elsewhere.
    other = pool_backend.context()
    assert pool_backend.run_one(other, op) in (0, None)


def test_dropped_context_still_delivers_queued_work(
    pool_backend: RawBackend,
    fast_fd: int,
) -> None:
    """DESIGN.md §8.2: 64 queued fsyncs on a pool_size=2 Context, Context dropped."""
    ctx = pool_backend.Context(max_requests=64, pool_size=2)
    calls = Recorder()
    ops = [pool_backend.Operation.fsync(fast_fd) for _ in range(64)]
    for op in ops:
        op.set_callback(calls)
    assert ctx.submit(*ops) == 64
    del ctx
    pool_backend.wait_for(None, lambda: len(calls) == 64, what="64 callbacks")
    assert all(op.get_value() is None for op in ops)


def test_close_with_operations_in_flight(
    pool_backend: RawBackend,
    fast_fd: int,
) -> None:
    """close() stops accepting work; queued operations still complete."""
    ctx = pool_backend.context(128, pool_size=2)
    calls = Recorder()
    ops = [pool_backend.Operation.write(b"%03d" % i, fast_fd, 3 * i) for i in range(100)]
    for op in ops:
        op.set_callback(calls)
    assert ctx.submit(*ops) == 100
    ctx.close()
    pool_backend.wait_for(None, lambda: len(calls) == 100, what="100 callbacks")
    assert sorted(calls.items) == [3] * 100
    assert read_file(fast_fd) == b"".join(b"%03d" % i for i in range(100))
    with pytest.raises(RuntimeError):
        ctx.submit(pool_backend.Operation.fsync(fast_fd))


def test_callback_may_submit_more_work(pool_backend: RawBackend, tmp_fd: int) -> None:
    """A completion callback can submit the next operation (capacity freed)."""
    ctx = pool_backend.context(1, pool_size=1)
    done = threading.Event()
    results = []

    def chain(result: object) -> None:
        results.append(result)
        if len(results) < 5:
            op = pool_backend.Operation.write(b"x", tmp_fd, len(results))
            op.set_callback(chain)
            assert ctx.submit(op) == 1
        else:
            done.set()

    first = pool_backend.Operation.write(b"x", tmp_fd, 0)
    first.set_callback(chain)
    assert ctx.submit(first) == 1
    assert done.wait(10)
    assert results == [1] * 5
    assert read_file(tmp_fd) == b"xxxxx"


def _outcome(backend: RawBackend, ctx: object, op: object) -> tuple[object, ...]:
    """What an operation ended with: ("ok", value) or ("error", errno)."""
    backend.run_one(ctx, op)
    try:
        return ("ok", op.get_value())  # type: ignore[attr-defined]
    except OSError as e:
        return ("error", e.errno)


def test_direct_fd_cache_entry_of_reused_fd_number_fails_nothing(
    pool_backend: RawBackend,
    tmp_path: pathlib.Path,
) -> None:
    """DESIGN.md §10: the pool remembers which fds are O_DIRECT (their
    operations then use an aligned window from the first attempt). fd numbers
    are reused: an entry of an fd number that is now a buffered file, a pipe,
    closed, or O_DIRECT again must make no operation fail or differ from what
    a fresh Context does (the rule test_linux_uring.py checks for the ring)."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    data = random.Random(3).randbytes(1 << 16)
    direct_path = tmp_path / "direct.bin"
    plain_path = tmp_path / "plain.bin"
    direct_path.write_bytes(data)
    plain_path.write_bytes(data[::-1])
    try:
        f = os.open(direct_path, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        pytest.skip(f"O_DIRECT unsupported here: {e}")
    plain = os.open(plain_path, os.O_RDWR)
    r, w = os.pipe()
    again = os.open(direct_path, os.O_RDWR | os.O_DIRECT)
    Op = pool_backend.Operation
    ctx = pool_backend.context()
    fresh = pool_backend.context()  # never given a misaligned O_DIRECT op

    def check(make: Callable[[], object], expected: tuple[object, ...]) -> None:
        assert _outcome(pool_backend, ctx, make()) == expected
        assert _outcome(pool_backend, fresh, make()) == expected

    try:
        # Misaligned reads: EINVAL, retried through a window, remembered.
        for _ in range(3):
            assert _outcome(pool_backend, ctx, Op.read(100, f, 3)) == ("ok", data[3:103])
        os.dup2(plain, f)  # closes the O_DIRECT file, same number: buffered
        check(lambda: Op.read(100, f, 3), ("ok", data[::-1][3:103]))
        check(lambda: Op.write(b"hello", f, 7), ("ok", 5))
        assert os.pread(plain, 5, 7) == b"hello"
        os.dup2(w, f)  # a pipe
        check(lambda: Op.write(b"pipe", f, 0), ("error", errno.ESPIPE))
        os.close(f)  # closed
        check(lambda: Op.read(10, f, 0), ("error", errno.EBADF))
        os.dup2(again, f)  # O_DIRECT again, same number
        for _ in range(3):
            assert _outcome(pool_backend, ctx, Op.read(5000, f, 4095)) == (
                "ok",
                data[4095:9095],
            )
    finally:
        for x in (r, w, plain, again, f):
            try:
                os.close(x)
            except OSError:
                pass


# -- thread_aio -----------------------------------------------------------------------


def test_thread_aio_constructor_limits(thread_aio: RawBackend) -> None:
    ctx = thread_aio.context()
    assert (ctx.max_requests, ctx.pool_size) == (512, 8)
    assert thread_aio.context(0, 0).max_requests == 512
    assert thread_aio.context(pool_size=128).pool_size == 128
    assert thread_aio.context(max_requests=65534, pool_size=1).max_requests == 65534
    with pytest.raises(ValueError):
        thread_aio.Context(pool_size=129)
    with pytest.raises(ValueError):
        thread_aio.Context(max_requests=65535)


def test_thread_aio_values_that_would_wrap_are_rejected(thread_aio: RawBackend) -> None:
    """DESIGN.md §6.2 wrap: 100000 used to become 34464 and 65536 used to become 0 (-> 8)."""
    with pytest.raises((OverflowError, ValueError)):
        thread_aio.Context(max_requests=100000)
    with pytest.raises((OverflowError, ValueError)):
        thread_aio.Context(pool_size=65536)
    with pytest.raises((OverflowError, ValueError)):
        thread_aio.Context(pool_size=-1)


def test_thread_aio_repr_after_close(thread_aio: RawBackend) -> None:
    ctx = thread_aio.context()
    assert "pool_size=8" in repr(ctx)
    ctx.close()
    with pytest.raises(RuntimeError):
        repr(ctx)


def test_thread_aio_cancel_accepts_anything(thread_aio: RawBackend) -> None:
    ctx = thread_aio.context()
    assert ctx.cancel(object(), 1, "x") == 0
    with pytest.raises(TypeError):
        ctx.cancel(operation=None)


def _blocked_worker(backend: RawBackend, fd: int) -> tuple:
    """A pool_size=1 context whose only worker is stuck in a callback."""
    ctx = backend.context(4, pool_size=1)
    release = threading.Event()
    entered = threading.Event()

    def block(_: object) -> None:
        entered.set()
        release.wait(20)

    blocker = backend.Operation.fsync(fd)
    blocker.set_callback(block)
    assert ctx.submit(blocker) == 1
    assert entered.wait(10)
    return ctx, release


def test_thread_aio_cancel_takes_back_queued_operations(
    thread_aio: RawBackend, tmp_fd: int
) -> None:
    """cancel() completes queued ops (no worker started them) with ECANCELED
    and returns how many; the running one and ops of another Context are
    left alone (DESIGN.md §4.6)."""
    ctx, release = _blocked_worker(thread_aio, tmp_fd)
    other = thread_aio.context()
    try:
        calls = Recorder()
        queued = [thread_aio.Operation.write(b"q", tmp_fd, i) for i in range(3)]
        for op in queued:
            op.set_callback(calls)
        assert ctx.submit(*queued) == 3
        elsewhere = thread_aio.Operation.fsync(tmp_fd)
        assert ctx.cancel(queued[0], queued[2], elsewhere, object()) == 2
        # Delivered inside cancel(): -1 with the errno, as every thread_aio failure.
        assert calls.items == [-1, -1]
        for op in (queued[0], queued[2]):
            assert op.result == -1 and op.error == errno.ECANCELED
            with pytest.raises(SystemError) as info:
                op.get_value()
            assert info.value.errno == errno.ECANCELED
        assert ctx.cancel(queued[0]) == 0  # already done
        assert other.cancel(queued[1]) == 0  # not queued on that Context
    finally:
        release.set()
    thread_aio.wait_for(None, lambda: len(calls) == 3)
    assert queued[1].get_value() == 1
    assert read_file(tmp_fd)[1:2] == b"q"  # only the op left queued was written


def test_thread_aio_queued_op_is_gated(thread_aio: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §3.3, §3.4 (and §6.2 thread-payload: a write payload becomes None
    after completion)."""
    ctx, release = _blocked_worker(thread_aio, tmp_fd)
    try:
        calls = Recorder()
        op = thread_aio.Operation.write(b"hello", tmp_fd, 0)
        op.set_callback(calls)
        assert ctx.submit(op) == 1
        with pytest.raises(RuntimeError):
            _ = op.payload
        with pytest.raises(RuntimeError):
            op.get_value()
        assert op.nbytes == 5
    finally:
        release.set()
    thread_aio.wait_for(None, lambda: len(calls) == 1)
    assert calls.items == [5]
    assert op.get_value() == 5
    assert op.payload is None
    assert op.result == 5 and op.error == 0


def test_thread_aio_queue_overflow_is_retryable(thread_aio: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §4.1, §4.2."""
    ctx, release = _blocked_worker(thread_aio, tmp_fd)
    calls = Recorder()
    try:
        ops = [thread_aio.Operation.write(b"%02d" % i, tmp_fd, 2 * i) for i in range(64)]
        for op in ops:
            op.set_callback(calls)
        with pytest.raises(RuntimeError):
            ctx.submit(*ops)
        accepted = sum(1 for op in ops if _in_flight(op))
        assert 0 < accepted < 64
        rejected = ops[accepted]
        assert not _in_flight(rejected)
    finally:
        release.set()
    thread_aio.wait_for(None, lambda: len(calls) == accepted)
    calls.items.clear()
    assert thread_aio.run_one(ctx, rejected) == 2  # its original payload
    assert rejected.result == 2
    data = read_file(tmp_fd)
    assert data[2 * accepted : 2 * accepted + 2] == b"%02d" % accepted


def _in_flight(op: object) -> bool:
    try:
        op.get_value()
    except RuntimeError:
        return True
    return False


def test_thread_aio_close_from_callback(thread_aio: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §4.6: close() inside a callback does not deadlock."""
    ctx = thread_aio.Context()
    done = threading.Event()
    op = thread_aio.Operation.write(b"x", tmp_fd, 0)

    def close_from_worker(_: object) -> None:
        ctx.close()
        done.set()

    op.set_callback(close_from_worker)
    assert ctx.submit(op) == 1
    assert done.wait(10)
    with pytest.raises(RuntimeError):
        ctx.submit(thread_aio.Operation.fsync(tmp_fd))


def test_thread_aio_close_waits_for_queued_work(
    thread_aio: RawBackend,
    fast_fd: int,
) -> None:
    ctx = thread_aio.Context(pool_size=2)
    calls = Recorder()
    ops = [thread_aio.Operation.fsync(fast_fd) for _ in range(50)]
    for op in ops:
        op.set_callback(calls)
    assert ctx.submit(*ops) == 50
    ctx.close()
    assert len(calls) == 50


def test_thread_aio_error_result(thread_aio: RawBackend, closed_fd: int) -> None:
    ctx = thread_aio.context()
    op = thread_aio.Operation.write(b"x", closed_fd, 0)
    assert thread_aio.run_one(ctx, op) == -1
    assert op.result == -1
    assert op.error == 9
