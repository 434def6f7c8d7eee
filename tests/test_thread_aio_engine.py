"""thread_aio's engine: both completion-delivery modes, inline page-cache
reads, queue-full rollback, close semantics, GIL-free workers, fork, exit.

The generic contract (DESIGN.md) is covered by the shared suite; these tests pin
down how our native pool behaves.
"""

import asyncio
import errno
import gc
import os
import select
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest

thread_aio = pytest.importorskip("caio.thread_aio")
from caio.thread_aio_asyncio import AsyncioContext  # noqa: E402

Operation = thread_aio.Operation
Context = thread_aio.Context


@pytest.fixture
def fd(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.001)


def finished(op):
    """True once the op's completion was delivered (no longer gated)."""
    try:
        op.get_value()
    except RuntimeError:
        return False
    except OSError:
        pass
    return True


def readable(fd, timeout=0.0):
    return bool(select.select([fd], [], [], timeout)[0])


class TestDirectDelivery:
    """Default mode: upstream's semantics, callbacks on a pool worker."""

    def test_callback_runs_on_a_worker_thread(self, fd):
        ctx = Context()
        seen = []
        done = threading.Event()
        op = Operation.write(b"abc", fd, 0)
        op.set_callback(lambda r: (seen.append((r, threading.current_thread())), done.set()))
        assert ctx.submit(op) == 1
        assert done.wait(5)
        ((result, thread),) = seen
        assert result == 3
        assert thread is not threading.main_thread()
        assert op.get_value() == 3
        ctx.close()

    def test_write_payload_is_released_after_completion(self, fd):
        # DESIGN.md §6.2 thread-payload (kept): a completed write's payload becomes None.
        ctx = Context()
        done = threading.Event()
        op = Operation.write(b"payload", fd, 0)
        assert op.payload == b"payload"
        op.set_callback(lambda r: done.set())
        ctx.submit(op)
        assert done.wait(5)
        wait_for(lambda: finished(op))
        assert op.payload is None
        assert op.nbytes == 7
        ctx.close()

    def test_failed_read_keeps_requested_nbytes(self):
        # DESIGN.md §6.2 thread-fields (fixed): nbytes is not clobbered to -1 on failure.
        ctx = Context()
        done = threading.Event()
        op = Operation.read(10, 999_999, 0)
        op.set_callback(lambda r: done.set())
        ctx.submit(op)
        assert done.wait(5)
        assert op.result == -1
        assert op.error == 9
        assert op.nbytes == 10
        with pytest.raises(OSError) as e:
            op.get_value()
        assert e.value.errno == 9
        assert isinstance(e.value, SystemError)
        ctx.close()

    def test_close_from_inside_a_callback_does_not_deadlock(self, fd):
        ctx = Context(pool_size=2)
        done = threading.Event()
        op = Operation.fsync(fd)
        op.set_callback(lambda r: (ctx.close(), done.set()))
        ctx.submit(op)
        assert done.wait(5)
        with pytest.raises(RuntimeError):
            ctx.submit(Operation.fsync(fd))

    def test_zero_length_read_calls_back_on_a_worker(self, fd):
        """Inline reads off (a raw Context): even a zero-length read runs and
        calls back on a worker, never inside submit() on the caller's thread,
        so a caller holding a lock its callback takes cannot deadlock."""
        ctx = Context(4)
        lock = threading.Lock()
        threads = []
        done = threading.Event()

        def callback(result):
            with lock:
                threads.append(threading.get_ident())
            done.set()

        op = Operation.read(0, fd, 0)
        op.set_callback(callback)
        with lock:  # the callback takes it: it must not run in here
            assert ctx.submit(op) == 1
            assert not threads
        assert done.wait(5)
        assert threads != [threading.get_ident()]
        assert op.get_value() == b""
        ctx.close()


class TestQueueFull:
    def test_rejected_op_is_rolled_back_and_retryable(self, fd):
        # One worker kept busy by a blocking callback, a queue of one.
        ctx = Context(max_requests=1, pool_size=1)
        release = threading.Event()
        started = threading.Event()
        blocker = Operation.fsync(fd)
        blocker.set_callback(lambda r: (started.set(), release.wait(10)))
        assert ctx.submit(blocker) == 1
        assert started.wait(5)

        queued = Operation.write(b"first", fd, 0)
        rejected = Operation.write(b"second!", fd, 0)
        results = []
        rejected.set_callback(results.append)
        with pytest.raises(RuntimeError, match=r"queue is full \(max_requests=1\)") as info:
            ctx.submit(queued, rejected)
        # Also an OSError with errno EAGAIN (thread_aio.CapacityError).
        assert isinstance(info.value, OSError) and info.value.errno == errno.EAGAIN
        # The queued op waits behind the busy worker: gated while in flight.
        with pytest.raises(RuntimeError):
            queued.get_value()
        # The rejected one is untouched and can be submitted again.
        assert rejected.get_value() == 0
        release.set()
        wait_for(lambda: finished(queued))
        assert queued.get_value() == 5
        assert ctx.submit(rejected) == 1
        wait_for(lambda: results)
        assert results == [7]
        assert rejected.get_value() == 7
        ctx.close()


class TestParameters:
    @pytest.mark.parametrize(
        "kwargs, exc",
        [
            ({"max_requests": 65535}, ValueError),
            ({"max_requests": 100_000}, OverflowError),  # upstream wrapped to 34464
            ({"max_requests": -1}, OverflowError),
            ({"pool_size": 129}, ValueError),
            ({"pool_size": 65536}, OverflowError),  # upstream wrapped to 0 -> 8
            ({"pool_size": 1.5}, TypeError),
        ],
    )
    def test_out_of_range_values_raise(self, kwargs, exc):
        with pytest.raises(exc):
            Context(**kwargs)

    def test_defaults_and_limits(self):
        assert (Context().max_requests, Context().pool_size) == (512, 8)
        assert Context(0, 0).max_requests == 512
        ctx = Context(max_requests=65534, pool_size=128)
        assert (ctx.max_requests, ctx.pool_size) == (65534, 128)
        ctx.close()


class TestLoopDelivery:
    """Event-loop mode used by the asyncio adapter."""

    def test_completions_wait_for_process_completions(self, fd):
        ctx = Context()
        wake_fd = ctx._completion_fd()
        ctx._enable_loop_delivery()
        calls = []
        ops = [Operation.write(b"x" * 10, fd, i * 10) for i in range(20)]
        for op in ops:
            op.set_callback(lambda r: calls.append((r, threading.current_thread())))
        assert ctx.submit(*ops) == 20
        assert readable(wake_fd, timeout=5)
        delivered = 0
        deadline = time.monotonic() + 5
        while delivered < 20 and time.monotonic() < deadline:
            if readable(wake_fd, timeout=0.5):
                delivered += ctx._process_completions()
        assert delivered == 20
        assert len(calls) == 20
        assert {t for _, t in calls} == {threading.main_thread()}
        assert all(r == 10 for r, _ in calls)
        assert ctx._process_completions() == 0
        ctx.close()

    def test_workers_do_not_need_the_gil(self, fd):
        # While this thread keeps the interpreter busy, workers still finish:
        # in loop mode they never wait for the GIL.
        ctx = Context(pool_size=4)
        ctx._completion_fd()
        ctx._enable_loop_delivery()
        ops = [Operation.write(b"y" * 4096, fd, i * 4096) for i in range(64)]
        ctx.submit(*ops)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # pure-Python busy loop
            pass
        assert ctx._process_completions() == 64
        assert [op.get_value() for op in ops] == [4096] * 64
        ctx.close()

    def test_close_delivers_what_is_still_queued(self, fd):
        ctx = Context()
        ctx._completion_fd()
        ctx._enable_loop_delivery()
        calls = []
        ops = [Operation.fsync(fd) for _ in range(16)]
        for op in ops:
            op.set_callback(calls.append)
        ctx.submit(*ops)
        ctx.close()  # joins the workers, then delivers on this thread
        assert calls == [0] * 16

    def test_cached_read_completes_inside_submit(self, fd):
        os.pwrite(fd, b"cached data!", 0)
        ctx = Context()
        ctx._completion_fd()
        ctx._enable_loop_delivery(inline_read_max=65536)
        calls = []
        op = Operation.read(12, fd, 0)
        op.set_callback(calls.append)
        assert ctx.submit(op) == 1
        if sys.platform.startswith("linux"):
            # Page-cache hit: no worker involved, delivered synchronously.
            assert calls == [12]
            assert op.get_value() == b"cached data!"
        ctx.close()
        assert op.get_value() == b"cached data!"

    def test_inline_read_never_uses_the_file_position(self, fd):
        # preadv2(offset=-1) would read at the file position; a negative
        # offset must fail like pread does (EINVAL).
        os.pwrite(fd, b"0123456789", 0)
        ctx = Context()
        ctx._completion_fd()
        ctx._enable_loop_delivery(inline_read_max=65536)
        op = Operation.read(4, fd, -1)
        ctx.submit(op)
        wait_for(lambda: ctx._process_completions() or op.result != 0)
        with pytest.raises(OSError) as e:
            op.get_value()
        assert e.value.errno == 22
        ctx.close()

    def test_inline_reads_large_than_the_limit_use_the_pool(self, fd):
        os.pwrite(fd, b"z" * 8192, 0)
        ctx = Context()
        ctx._completion_fd()
        ctx._enable_loop_delivery(inline_read_max=4096)
        op = Operation.read(8192, fd, 0)
        ctx.submit(op)
        wait_for(lambda: ctx._process_completions() > 0)
        assert op.get_value() == b"z" * 8192
        ctx.close()


@pytest.mark.skipif(
    not hasattr(os, "posix_fadvise"),
    reason="needs posix_fadvise to evict pages",
)
def test_partially_cached_file_reads_back_exactly(tmp_path, aio):
    import random

    path = tmp_path / "cold.bin"
    size = 8 << 20
    data = os.urandom(size)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        rnd = random.Random(7)
        for _ in range(200):  # a scattering of cached pages
            os.pread(fd, 4096, rnd.randrange(size // 4096) * 4096)

        async def main():
            ctx = AsyncioContext()
            sizes = [1, 100, 4096, 5000, 16384, 65536, 70000]
            reqs = [(rnd.randrange(size - 70000), rnd.choice(sizes)) for _ in range(1000)]
            reqs += [(size - 10, 100), (size + 5, 10)]
            results = await asyncio.gather(*(ctx.read(n, fd, off) for off, n in reqs))
            ctx.close()
            return reqs, results

        reqs, results = aio.run(main(), timeout=120)
        for (off, n), got in zip(reqs, results, strict=True):
            assert got == data[off : off + n]
    finally:
        os.close(fd)


class TestAsyncioAdapter:
    def test_adapter_uses_loop_delivery(self, fd, aio):
        async def main():
            ctx = AsyncioContext()
            assert ctx._reader_fd is not None
            assert ctx._reader_fd == ctx.context._completion_fd()  # the loop watches the pool
            assert await ctx.write(b"hello", fd, 0) == 5
            assert await ctx.read(5, fd, 0) == b"hello"
            ctx.close()
            assert ctx._reader_fd is None

        aio.run(main())

    def test_inline_disabled_still_works(self, fd, aio):
        class NoInline(AsyncioContext):
            INLINE_READ_MAX = 0

        async def main():
            ctx = NoInline()
            await ctx.write(b"pool only", fd, 0)
            assert await ctx.read(9, fd, 0) == b"pool only"
            ctx.close()

        aio.run(main())

    def test_close_with_operations_in_flight(self, fd, aio):
        async def main():
            ctx = AsyncioContext(pool_size=2)
            tasks = [asyncio.ensure_future(ctx.write(b"w" * 4096, fd, i * 4096)) for i in range(64)]
            await asyncio.sleep(0)
            ctx.close()  # blocks until the queued writes are done
            return await asyncio.gather(*tasks)

        assert aio.run(main()) == [4096] * 64
        assert os.fstat(fd).st_size == 64 * 4096


def run_python(code, timeout=30):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_context_is_refused_after_fork(fd):
    ctx = Context()
    pid = os.fork()
    if pid == 0:  # child: must raise cleanly, never hang
        code = 1
        try:
            ctx.submit(Operation.fsync(fd))
        except RuntimeError as e:
            code = 0 if "fork" in str(e) else 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent is unaffected.
    done = threading.Event()
    op = Operation.fsync(fd)
    op.set_callback(lambda r: done.set())
    ctx.submit(op)
    assert done.wait(5)
    ctx.close()


def test_interpreter_exit_with_operations_in_flight(tmp_path):
    path = tmp_path / "exit.bin"
    result = run_python(f"""
        import os, threading
        from caio import thread_aio
        fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)
        ctx = thread_aio.Context(pool_size=2)
        gate = threading.Event()
        ops = [thread_aio.Operation.write(b"x" * 4096, fd, i * 4096) for i in range(200)]
        for op in ops:
            op.set_callback(lambda r: None)
        ctx.submit(*ops)
        print("submitted", flush=True)
    """)
    assert result.returncode == 0, result.stderr
    assert "submitted" in result.stdout
    assert "Traceback" not in result.stderr
    # Work accepted before exit is completed, not dropped.
    assert path.stat().st_size == 200 * 4096


def test_gc_collects_context_and_ops(fd):
    import weakref

    ctx = Context()
    ref = weakref.ref(ctx)
    done = threading.Event()
    op = Operation.fsync(fd)
    op.set_callback(lambda r: (op, done.set()))  # noqa: F821 (a cycle through the callback)
    ctx.submit(op)
    del ctx
    assert done.wait(5)
    wait_for(lambda: gc.collect() is not None and ref() is None)
    del op
    gc.collect()


def test_cancelling_a_queued_operation_really_cancels_it(fd, aio):
    """A job no worker has started yet is taken back from the queue and
    completes with ECANCELED; the admission slot returns when the backend has
    really finished an operation, so cancelled work never piles up beyond
    max_requests."""
    import errno

    big = b"b" * (64 << 20)

    async def main():
        ctx = AsyncioContext(max_requests=4, pool_size=1)
        busy = asyncio.ensure_future(ctx.write(big, fd, 0))  # occupies the worker
        await asyncio.sleep(0)
        aw = ctx.write(b"queued", fd, len(big))
        op = aw.operation
        queued = asyncio.ensure_future(aw)
        await asyncio.sleep(0)
        assert ctx._gate_state()[0] == 2
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        # Taken back from the queue and finished as cancelled right away,
        # while the big write is still running.
        assert not busy.done()
        assert op.error == errno.ECANCELED
        assert ctx._gate_state()[0] == 1
        assert await busy == len(big)
        assert ctx._gate_state()[0] == 0
        ctx.close()

    aio.run(main())
    assert os.fstat(fd).st_size == 64 << 20  # the cancelled write never ran


def test_cancelled_running_operation_keeps_its_slot(fd, aio):
    big = b"c" * (64 << 20)

    async def main():
        ctx = AsyncioContext(max_requests=1, pool_size=1)
        running = asyncio.ensure_future(ctx.write(big, fd, 0))
        await asyncio.sleep(0)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        # Still being written by the worker: the one slot stays taken, so
        # the next operation waits instead of overfilling the pool.
        if ctx._gate_state()[0] == 1:
            nxt = asyncio.ensure_future(ctx.write(b"next", fd, 0))
            await asyncio.sleep(0)
            assert ctx._gate_state() == (1, 1, 1)
            assert await nxt == 4
        assert ctx._gate_state()[0] == 0
        ctx.close()

    aio.run(main())


def test_a_worker_keeps_one_thread_state(fd):
    """DESIGN.md §11.2: direct delivery attaches each worker with one thread
    state for its whole life (made by its first delivery, detached between
    deliveries, deleted when the worker ends), not a new one per operation.
    ``threading.local`` data lives in the thread state, so a callback sees
    what the previous one stored on the same worker; closing the Context ends
    the workers, which delete their states (the data is released)."""
    os.pwrite(fd, b"x" * 16, 0)
    local = threading.local()
    fresh = []
    released = []

    class Marker:
        pass

    def callback(result):
        if not hasattr(local, "marker"):
            local.marker = Marker()
            weakref.finalize(local.marker, released.append, 1)
            fresh.append(threading.get_ident())

    ctx = Context(max_requests=64, pool_size=1)
    done = threading.Event()
    for _ in range(20):
        op = Operation.read(4, fd, 0)
        op.set_callback(lambda result, f=callback: (f(result), done.set()))
        done.clear()
        assert ctx.submit(op) == 1
        assert done.wait(10)
    assert len(fresh) == 1  # one thread state for the 20 deliveries
    ctx.close()  # joins the worker, which deletes its thread state
    gc.collect()
    assert released == [1]
