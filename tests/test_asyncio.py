"""The asyncio adapters (DESIGN.md §5).

Every test runs for each adapter in ``caio.variants_asyncio`` plus the extra
uring/linux_aio configurations (see conftest.async_backend).  The ``aio``
fixture runs coroutines on a private loop whose exception handler records
every call; the fixture asserts at teardown (after gc.collect()) that it was
never called -- no "exception was never retrieved", no "Task was destroyed
but it is pending".
"""

import asyncio
import errno
import gc
import hashlib
import os
import time
from typing import Any

import pytest

import caio
from caio.asyncio_base import AsyncioContextBase

from helpers import AsyncBackend, LoopRunner, read_file

# -- construction and attributes --------------------------------------------------------


def test_adapter_class_wiring(async_backend: AsyncBackend, aio: LoopRunner) -> None:
    module = async_backend.module
    native = getattr(caio, async_backend.name)
    cls = module.AsyncioContext
    assert issubclass(cls, AsyncioContextBase)
    assert cls.CONTEXT_CLASS is native.Context
    assert cls.OPERATION_CLASS is native.Operation
    assert cls.MAX_REQUESTS_DEFAULT == 512
    public = [name for name in vars(module) if not name.startswith("_")]
    assert [
        n
        for n in public
        if isinstance(getattr(module, n), type) and getattr(module, n).__module__ == module.__name__
    ] == ["AsyncioContext"]


def test_default_max_requests(async_backend: AsyncBackend, aio: LoopRunner) -> None:
    """DESIGN.md §5.1: None or 0 means 512, for the Context and the semaphore."""

    async def main() -> None:
        for value in (None, 0):
            ctx = async_backend.context(value)
            try:
                assert ctx.context.max_requests == 512
                for _ in range(512):
                    assert not ctx.semaphore.locked()
                    await ctx.semaphore.acquire()
                assert ctx.semaphore.locked()
                for _ in range(512):
                    ctx.semaphore.release()
            finally:
                ctx.close()

    aio.run(main())


def test_explicit_loop_and_positional_max_requests(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
) -> None:
    """aiofile calls AsyncioContext(max_requests, loop=loop)."""
    ctx = async_backend.module.AsyncioContext(
        16,
        loop=aio.loop,
        **async_backend.kwargs,
    )
    try:
        assert ctx.loop is aio.loop
        assert ctx.context.max_requests == 16
        assert ctx.deferred is async_backend.kwargs.get("deferred", False)
        assert aio.run(ctx.write(b"explicit", tmp_fd, 0)) == 8
        assert aio.run(ctx.read(8, tmp_fd, 0)) == b"explicit"
    finally:
        ctx.close()


def test_async_context_manager(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
) -> None:
    async def main() -> None:
        ctx = async_backend.context()
        async with ctx as entered:
            assert entered is ctx
            assert await ctx.write(b"cm", tmp_fd, 0) == 2
        ctx.close()  # a second close is harmless

    aio.run(main())
    assert read_file(tmp_fd) == b"cm"


def test_exception_in_async_with_is_not_suppressed(
    async_backend: AsyncBackend,
    aio: LoopRunner,
) -> None:
    async def main() -> None:
        async with async_backend.context():
            raise KeyError("boom")

    with pytest.raises(KeyError):
        aio.run(main())


def test_kwargs_are_forwarded(async_backend: AsyncBackend, aio: LoopRunner) -> None:
    async def main() -> None:
        if async_backend.is_pool:
            ctx = async_backend.context(pool_size=2)
            try:
                if async_backend.name == "thread_aio":
                    assert ctx.context.pool_size == 2
            finally:
                ctx.close()
        if async_backend.is_linux_aio:
            # DESIGN.md §6.2 aio-kwargs (kept): the linux_aio adapter takes no extra kwargs.
            with pytest.raises(TypeError):
                async_backend.context(sqpoll=True)
        else:
            with pytest.raises(TypeError):
                async_backend.context(definitely_not_an_option=1)

    aio.run(main())


def test_uring_default_sqpoll(aio: LoopRunner) -> None:
    module = caio.linux_uring_asyncio
    if module is None:
        pytest.skip("linux_uring not available")

    async def main() -> None:
        ctx = module.AsyncioContext()
        try:
            # Upstream defaults to SQPOLL whenever allowed; ours defaults to a
            # plain ring, decided by measurement (docs/uring-sqpoll.md).
            expected = module.DEFAULT_SQPOLL and caio.linux_uring.SQPOLL_ALLOWED
            assert ctx.context.sqpoll == int(expected)
        finally:
            ctx.close()
        ctx = module.AsyncioContext(max_requests=8, sqpoll=True, deferred=True)
        try:  # DESIGN.md §5.8.1
            assert ctx.context.sqpoll in (0, 1)
            assert ctx.deferred is True
        finally:
            ctx.close()

    aio.run(main())


def test_argument_errors_are_raised_at_call_time(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
) -> None:
    async def main() -> None:
        ctx = async_backend.context()
        try:
            with pytest.raises(TypeError):
                ctx.read("32", tmp_fd, 0)  # no await needed
            with pytest.raises(TypeError):
                ctx.fsync("fd")
            with pytest.raises(ValueError):
                ctx.write("x", tmp_fd, 0)
            with pytest.raises(TypeError):
                ctx.read(32, tmp_fd)  # offset is required
            coro = ctx.fdsync(tmp_fd)
            assert asyncio.iscoroutine(coro)
            assert await coro is None
        finally:
            ctx.close()

    aio.run(main())


def test_submit_rejects_foreign_objects(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
) -> None:
    """DESIGN.md §5.2."""

    async def main() -> None:
        ctx = async_backend.context()
        try:
            with pytest.raises(ValueError):
                await ctx.submit(object())
            op = ctx.OPERATION_CLASS.write(b"twice", tmp_fd, 0)
            assert await ctx.submit(op) == 5
            with pytest.raises(OSError):
                await ctx.submit(op)
        finally:
            ctx.close()

    aio.run(main())


def test_submit_replaces_a_user_callback(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
) -> None:
    """DESIGN.md §5.2: the adapter's completion wiring replaces a callback set
    on the op, whether the op completes inline (page-cache hit) or not."""
    os.pwrite(tmp_fd, b"cached data", 0)
    called: list[Any] = []

    async def main() -> None:
        async with async_backend.context() as ctx:
            for _ in range(3):
                read = ctx.OPERATION_CLASS.read(6, tmp_fd, 0)
                read.set_callback(called.append)
                assert await ctx.submit(read) == b"cached"
                write = ctx.OPERATION_CLASS.write(b"CACHED", tmp_fd, 0)
                write.set_callback(called.append)
                assert await ctx.submit(write) == 6
                sync = ctx.OPERATION_CLASS.fdsync(tmp_fd)
                sync.set_callback(called.append)
                assert await ctx.submit(sync) is None
                os.pwrite(tmp_fd, b"cached", 0)
            # Let any stray delivery run before looking.
            await asyncio.sleep(0)

    aio.run(main())
    assert called == []


# -- I/O (DESIGN.md §5.2) ------------------------------------------------------------


def test_hello_world(async_backend: AsyncBackend, aio: LoopRunner, tmp_fd: int) -> None:
    """DESIGN.md §5.2."""

    async def main() -> None:
        async with async_backend.context() as ctx:
            assert await ctx.read(32, tmp_fd, 0) == b""
            assert await ctx.write(b"Hello world", tmp_fd, 0) == 11
            assert await ctx.read(32, tmp_fd, 0) == b"Hello world"
            assert await ctx.write(b"Hello great big world", tmp_fd, 0) == 21
            assert await ctx.read(32, tmp_fd, 0) == b"Hello great big world"

    aio.run(main())


def test_concurrent_small_writes(async_backend: AsyncBackend, aio: LoopRunner, tmp_fd: int) -> None:
    """DESIGN.md §5.2, §5.4."""

    async def main() -> bytes:
        async with async_backend.context() as ctx:
            await asyncio.gather(*(ctx.write(b"%04d" % i, tmp_fd, 4 * i) for i in range(32)))
            await ctx.fdsync(tmp_fd)
            return await ctx.read(128, tmp_fd, 0)

    assert aio.run(main()) == b"".join(b"%04d" % i for i in range(32))


def test_closed_fd_raises(async_backend: AsyncBackend, aio: LoopRunner, closed_fd: int) -> None:
    """DESIGN.md §4.3, §5.2: an error, never a hang."""

    async def main() -> None:
        async with async_backend.context() as ctx:
            for make in (
                lambda: ctx.read(16, closed_fd, 0),
                # Zero bytes asked for: the fd is still checked (thread_aio's
                # inline page-cache read once returned b"" here).
                lambda: ctx.read(0, closed_fd, 0),
                lambda: ctx.write(b"data", closed_fd, 0),
                lambda: ctx.fsync(closed_fd),
            ):
                with pytest.raises((SystemError, OSError, ValueError)):
                    await asyncio.wait_for(make(), 10)

    aio.run(main())


def test_error_types_per_backend(
    async_backend: AsyncBackend, aio: LoopRunner, closed_fd: int
) -> None:
    """DESIGN.md §4.3: bad fd -> SystemError (uring/thread; DESIGN.md §6.2 errtype: also OSError),
    ValueError (linux_aio), OSError (python_aio)."""

    async def main() -> BaseException:
        async with async_backend.context() as ctx:
            try:
                await ctx.read(16, closed_fd, 0)
            except Exception as exc:
                return exc
        raise AssertionError("no error")

    exc = aio.run(main())
    if async_backend.is_linux_aio:
        assert isinstance(exc, ValueError)
    else:
        assert isinstance(exc, OSError) and exc.errno == 9
        if async_backend.name != "python_aio":
            assert isinstance(exc, SystemError)


def test_zero_length(async_backend: AsyncBackend, aio: LoopRunner, tmp_fd: int) -> None:
    """DESIGN.md §5.2, §3.5."""

    async def main() -> None:
        async with async_backend.context() as ctx:
            assert await ctx.write(b"", tmp_fd, 0) == 0
            assert await ctx.read(0, tmp_fd, 0) == b""

    aio.run(main())


def test_short_read_and_past_eof(async_backend: AsyncBackend, aio: LoopRunner, tmp_fd: int) -> None:
    """DESIGN.md §5.2."""
    os.pwrite(tmp_fd, b"12345", 0)

    async def main() -> None:
        async with async_backend.context() as ctx:
            assert await ctx.read(100, tmp_fd, 0) == b"12345"
            assert await ctx.read(100, tmp_fd, 3) == b"45"
            assert await ctx.read(100, tmp_fd, 5000) == b""

    aio.run(main())


def test_sync_ops_return_none(async_backend: AsyncBackend, aio: LoopRunner, tmp_fd: int) -> None:
    """DESIGN.md §5.2."""

    async def main() -> None:
        async with async_backend.context() as ctx:
            await ctx.write(b"x", tmp_fd, 0)
            assert await ctx.fsync(tmp_fd) is None
            assert await ctx.fdsync(tmp_fd) is None

    aio.run(main())


def test_four_mib_round_trip(async_backend: AsyncBackend, aio: LoopRunner, tmp_fd: int) -> None:
    """DESIGN.md §5.2."""
    payload = os.urandom(4 * 1024 * 1024)

    async def main() -> None:
        async with async_backend.context() as ctx:
            assert await ctx.write(payload, tmp_fd, 0) == 4194304
            data = await ctx.read(len(payload), tmp_fd, 0)
            assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()

    aio.run(main())


def test_sparse_write(async_backend: AsyncBackend, aio: LoopRunner, tmp_fd: int) -> None:
    """DESIGN.md §5.2."""
    size = 4 * 1024 * 1024

    async def main() -> None:
        async with async_backend.context() as ctx:
            assert await ctx.write(b"!", tmp_fd, size) == 1
            assert os.fstat(tmp_fd).st_size == size + 1
            head = await ctx.read(size, tmp_fd, 0)
            assert len(head) == size and head.count(0) == size
            assert await ctx.read(10, tmp_fd, size) == b"!"

    aio.run(main())


def test_back_pressure_with_tiny_max_requests(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
) -> None:
    """DESIGN.md §5.4: max_requests=2, 40 writes then 40 reads, no capacity errors."""
    chunks = [os.urandom(4096) for _ in range(40)]

    async def main() -> list[bytes]:
        async with async_backend.context(2) as ctx:
            written = await asyncio.gather(
                *(ctx.write(chunk, tmp_fd, 4096 * i) for i, chunk in enumerate(chunks))
            )
            assert written == [4096] * 40
            return await asyncio.gather(*(ctx.read(4096, tmp_fd, 4096 * i) for i in range(40)))

    assert aio.run(main()) == chunks


def test_no_buffer_aliasing(async_backend: AsyncBackend, aio: LoopRunner, tmp_fd: int) -> None:
    """DESIGN.md §5.2, §8.4."""
    chunks = [bytes([i]) * 8192 for i in range(32)]

    async def main() -> list[bytes]:
        async with async_backend.context() as ctx:
            await asyncio.gather(
                *(ctx.write(chunk, tmp_fd, 8192 * i) for i, chunk in enumerate(chunks))
            )
            return await asyncio.gather(*(ctx.read(8192, tmp_fd, 8192 * i) for i in range(32)))

    assert aio.run(main()) == chunks


# -- cancellation (DESIGN.md §5.5) ----------------------------------------------


@pytest.mark.parametrize("kind", ["read", "write"])
def test_cancel_cleanly_loop(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
    kind: str,
) -> None:
    """DESIGN.md §5.5: 50 rounds x 16 tasks, cancel whatever is pending."""
    os.pwrite(tmp_fd, os.urandom(16 * 4096), 0)
    payload = b"w" * 4096

    async def main() -> None:
        # Default max_requests: a cancelled operation gives its semaphore slot
        # back at once while it may still run in the backend (DESIGN.md §5.5), so
        # a tiny max_requests could let the backend itself run out of room.
        async with async_backend.context() as ctx:
            for _ in range(50):
                if kind == "read":
                    tasks = [
                        asyncio.ensure_future(ctx.read(4096, tmp_fd, 4096 * i)) for i in range(16)
                    ]
                else:
                    tasks = [
                        asyncio.ensure_future(ctx.write(payload, tmp_fd, 4096 * i))
                        for i in range(16)
                    ]
                done, pending = await asyncio.wait(
                    tasks,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in pending:
                    task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        assert isinstance(result, asyncio.CancelledError), result
                    elif kind == "read":
                        assert len(result) == 4096
                    else:
                        assert result == 4096
            # Everything is still usable afterwards.
            assert await ctx.write(b"after", tmp_fd, 0) == 5

    aio.run(main())
    aio.settle()
    aio.check()


def test_cancel_after_first_step(async_backend: AsyncBackend, aio: LoopRunner, tmp_fd: int) -> None:
    """DESIGN.md §5.5: cancel right after the op was submitted (or batched)."""

    async def main() -> None:
        async with async_backend.context() as ctx:
            for _ in range(20):
                task = asyncio.ensure_future(ctx.write(b"x" * 4096, tmp_fd, 0))
                await asyncio.sleep(0)
                task.cancel()
                try:
                    result = await task
                except asyncio.CancelledError:
                    pass
                else:
                    # It may legitimately have finished before the cancel.
                    assert result == 4096
            # The semaphore slots were all given back.
            assert await asyncio.gather(*(ctx.write(b"y", tmp_fd, i) for i in range(8))) == [1] * 8

    aio.run(main())
    aio.settle()
    aio.check()


def test_cancel_before_start_raises_cancelled(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
) -> None:
    async def main() -> None:
        async with async_backend.context() as ctx:
            task = asyncio.ensure_future(ctx.write(b"x", tmp_fd, 0))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert read_file(tmp_fd) == b""  # never submitted

    aio.run(main())
    aio.check()


def test_uring_cancel_is_real(aio: LoopRunner) -> None:
    """uring: cancelling a blocked pipe read cancels it in the kernel."""
    module = caio.linux_uring_asyncio
    if module is None:
        pytest.skip("linux_uring not available")
    r, w = os.pipe()

    async def main(**kwargs: Any) -> None:
        ctx = module.AsyncioContext(**kwargs)
        try:
            task = asyncio.ensure_future(ctx.read(4, r, -1))
            await asyncio.sleep(0.1)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.1)
        finally:
            ctx.close()

    try:
        for kwargs in ({"sqpoll": True}, {"sqpoll": False}):
            aio.run(main(**kwargs))
            os.write(w, b"left")
            assert os.read(r, 4) == b"left"  # nobody else consumed it
    finally:
        os.close(r)
        os.close(w)
    aio.settle()
    aio.check()


# -- close --------------------------------------------------------------------------------


def test_close_with_operations_in_flight(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    fast_fd: int,
) -> None:
    """Pool backends finish queued work after close(); linux adapters only
    stop listening (DESIGN.md §5.6), so whatever is left pending is cancelled."""

    async def main() -> None:
        ctx = async_backend.context(64)
        tasks = [asyncio.ensure_future(ctx.write(b"%04d" % i, fast_fd, 4 * i)) for i in range(64)]
        await asyncio.sleep(0)
        ctx.close()
        done, pending = await asyncio.wait(
            tasks,
            timeout=10 if async_backend.is_pool else 1,
        )
        if async_backend.is_pool:
            assert not pending
            assert [t.result() for t in tasks] == [4] * 64
            with pytest.raises(RuntimeError):
                await ctx.write(b"late", fast_fd, 0)
        else:
            for task in pending:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                assert result == 4 or isinstance(result, asyncio.CancelledError)

    aio.run(main())
    aio.settle()
    aio.check()


# -- linux_aio deferred batches ---------------------------------------------------------------


def test_linux_aio_deferred_partial_batch(aio: LoopRunner, tmp_fd: int, closed_fd: int) -> None:
    module = caio.linux_aio_asyncio
    if module is None:
        pytest.skip("linux_aio not available")

    async def main() -> list[Any]:
        async with module.AsyncioContext(deferred=True) as ctx:
            return await asyncio.gather(
                ctx.write(b"good", tmp_fd, 0),
                ctx.write(b"bad!", closed_fd, 0),
                ctx.write(b"late", tmp_fd, 4),
                return_exceptions=True,
            )

    first, second, third = aio.run(main())
    # DESIGN.md §6.2 batch-fail, fixed: the refused op fails alone (with its own error,
    # an OSError with errno EBADF); the rest of the batch is resubmitted.
    # Upstream failed every op after it with OSError("not submitted").
    assert first == 4
    assert isinstance(second, OSError) and second.errno == errno.EBADF
    assert third == 4
    assert read_file(tmp_fd) == b"goodlate"


# -- memory -------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as fp:
        return int(fp.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_ten_thousand_operations_do_not_grow_rss(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    fast_fd: int,
) -> None:
    payload = os.urandom(4096)

    async def batch(ctx: Any, rounds: int) -> None:
        for _ in range(rounds):
            writes = [ctx.write(payload, fast_fd, 4096 * i) for i in range(25)]
            assert await asyncio.gather(*writes) == [4096] * 25
            reads = [ctx.read(4096, fast_fd, 4096 * i) for i in range(25)]
            assert await asyncio.gather(*reads) == [payload] * 25

    async def main() -> int:
        async with async_backend.context(64) as ctx:
            await batch(ctx, 40)  # warm-up: 2000 operations
            gc.collect()
            before = _rss()
            await batch(ctx, 200)  # 10 000 operations
            gc.collect()
            return _rss() - before

    growth = aio.run(main(), timeout=120)
    assert growth < 4 * 1024 * 1024, growth


@pytest.mark.parametrize("write", ["write", "writev"])
@pytest.mark.parametrize("sync", ["fsync", "fdsync"])
def test_fsync_covers_the_writes_submitted_before_it(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_path: Any,
    sync: str,
    write: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DESIGN.md §4.1: an fsync/fdsync submitted on a context covers every write
    to the same fd submitted before it on that context: it does not start
    before they are done, so its completion comes after theirs. The pool
    workers' writes are slowed down (CAIO_TEST_POOL_STALL_MS, a test-hooks
    build; python_aio: a slow pwrite) so that an unordered fsync, run by
    another worker or by the kernel, would finish first. A write to another fd
    does not hold the fsync back."""
    monkeypatch.setenv("CAIO_TEST_POOL_STALL_MS", "150")
    ran: list[str] = []  # python_aio: what its workers did, in order
    if async_backend.name == "python_aio":
        from caio import python_aio

        real_pwrite = python_aio._pwrite

        def slow_pwrite(fd: int, data: Any, offset: int) -> int:
            time.sleep(0.15)
            try:
                return real_pwrite(fd, data, offset)
            finally:
                ran.append("write")

        monkeypatch.setattr(python_aio, "_pwrite", slow_pwrite)
        real_pwritev = os.pwritev

        def slow_pwritev(fd: int, buffers: Any, offset: int) -> int:
            time.sleep(0.15)
            try:
                return real_pwritev(fd, buffers, offset)
            finally:
                ran.append("write")

        monkeypatch.setattr(os, "pwritev", slow_pwritev)
        for name in ("fsync", "fdatasync"):
            real_sync = getattr(os, name)

            def recording_sync(fd: int, real_sync: Any = real_sync) -> None:
                ran.append("sync")
                real_sync(fd)

            monkeypatch.setattr(os, name, recording_sync)
        real_fdsync = python_aio.fdsync  # bound at import (os.fdatasync or os.fsync)

        def recording_fdsync(fd: int) -> None:
            ran.append("sync")
            real_fdsync(fd)

        monkeypatch.setattr(python_aio, "fdsync", recording_fdsync)
    # A new file on a disk filesystem: a buffered write that must allocate
    # blocks is refused by RWF_NOWAIT, so linux_aio hands it to a worker.
    fd = os.open(str(tmp_path / "ordered.bin"), os.O_RDWR | os.O_CREAT, 0o600)
    other = os.open(str(tmp_path / "other.bin"), os.O_RDWR | os.O_CREAT, 0o600)
    done: list[str] = []

    async def track(name: str, aw: Any) -> Any:
        result = await aw
        done.append(name)
        return result

    async def main() -> None:
        async with async_backend.context(16) as ctx:
            for round_ in range(3):
                done.clear()
                ran.clear()
                base = round_ << 20

                def put(data: bytes, offset: int) -> Any:
                    if write == "writev":  # a vectored write is a write too
                        half = len(data) // 2
                        return ctx.writev([data[:half], data[half:]], fd, offset)
                    return ctx.write(data, fd, offset)

                results = await asyncio.gather(
                    track("write1", put(b"a" * 8192, base)),
                    track("write2", put(b"b" * 8192, base + (512 << 10))),
                    track("sync", getattr(ctx, sync)(fd)),
                )
                assert results == [8192, 8192, None]
                if async_backend.name == "python_aio":
                    # The sync runs after the writes; its result may reach
                    # the loop first (DESIGN.md §6.5).
                    assert ran[-1] == "sync" and ran.count("write") == 2, ran
                else:
                    assert done.index("sync") == 2, done

    try:
        aio.run(main())
    finally:
        os.close(fd)
        os.close(other)
