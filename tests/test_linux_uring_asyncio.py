"""caio.linux_uring_asyncio (DESIGN.md §5).

Every test runs for the default AsyncioContext, ``sqpoll=True`` and
``deferred=True``, on asyncio's default loop and (when installed) uvloop.
Self-contained: own fixtures, skipped when io_uring is unavailable.
"""

import asyncio
import errno
import gc
import hashlib
import os
import platform
import random
import time
import weakref

import pytest

linux_uring = pytest.importorskip("caio.linux_uring")
from caio import linux_uring_asyncio  # noqa: E402
from caio.asyncio_base import AsyncioContextBase  # noqa: E402

AsyncioContext = linux_uring_asyncio.AsyncioContext

CONFIGS = {
    "default": {},
    "sqpoll": {"sqpoll": True},
    "deferred": {"deferred": True},
}

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

LOOPS = ["asyncio"] + (["uvloop"] if uvloop else [])


@pytest.fixture(params=list(CONFIGS))
def config(request):
    return CONFIGS[request.param]


@pytest.fixture(params=LOOPS)
def loop(request):
    lp = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    handler_calls = []
    lp.set_exception_handler(lambda loop, ctx: handler_calls.append(ctx))
    lp.handler_calls = handler_calls
    yield lp
    lp.run_until_complete(asyncio.sleep(0))
    lp.close()


@pytest.fixture
def run(loop):
    def run(coro, timeout=30):
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))

    return run


@pytest.fixture
def make_ctx(loop, config):
    made = []

    def make(max_requests=None, **kwargs):
        kw = dict(config)
        kw.update(kwargs)
        c = AsyncioContext(max_requests, loop=loop, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "data.bin")


@pytest.fixture
def fd(path):
    f = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    yield f
    try:
        os.close(f)
    except OSError:
        pass


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for x in (r, w):
        try:
            os.close(x)
        except OSError:
            pass


# -- construction -------------------------------------------------------------


def test_class_attributes():
    assert AsyncioContext.CONTEXT_CLASS is linux_uring.Context
    assert AsyncioContext.OPERATION_CLASS is linux_uring.Operation
    assert AsyncioContext.MAX_REQUESTS_DEFAULT == 512
    assert issubclass(AsyncioContext, AsyncioContextBase)


@pytest.mark.parametrize("n", [None, 0])
def test_default_max_requests(loop, n):
    ctx = AsyncioContext(n, loop=loop)
    try:
        assert ctx.context.max_requests == 512
        assert ctx._gate_state() == (0, 512, 0)
        assert isinstance(ctx.semaphore, asyncio.BoundedSemaphore)
        assert ctx.semaphore._value == 512
        assert ctx.loop is loop and ctx.deferred is False
        assert ctx.context.sqpoll == 0  # see DEFAULT_SQPOLL
    finally:
        ctx.close()


def test_sqpoll_deferred_constructs(loop):
    # DESIGN.md §5.8.1.
    ctx = AsyncioContext(max_requests=8, loop=loop, sqpoll=True, deferred=True)
    try:
        assert ctx.context.sqpoll in (0, 1)
        assert ctx.context.sqpoll == int(linux_uring.SQPOLL_ALLOWED)
        assert ctx.deferred is True
    finally:
        ctx.close()


def test_bad_kwargs_and_sizes(loop):
    with pytest.raises(TypeError):
        AsyncioContext(8, loop=loop, bogus=1)
    with pytest.raises(ValueError):
        AsyncioContext(-1, loop=loop)


def test_positional_loop_and_context_manager(loop, run, fd):
    async def main():
        async with AsyncioContext(4, loop) as ctx:
            assert await ctx.write(b"cm", fd, 0) == 2
            return ctx

    ctx = run(main())
    ctx.close()  # twice is harmless


def test_get_event_loop_inside_coroutine(loop, run):
    async def main():
        ctx = AsyncioContext(4)
        try:
            return ctx.loop is asyncio.get_running_loop()
        finally:
            ctx.close()

    assert run(main())


# -- DESIGN.md §5.2: I/O -----------------------------------------------------


def test_basic_io(make_ctx, run, fd):
    ctx = make_ctx()

    async def main():
        assert await ctx.read(32, fd, 0) == b""
        assert await ctx.write(b"Hello world", fd, 0) == 11
        assert await ctx.read(32, fd, 0) == b"Hello world"
        assert await ctx.write(b"Hello world, longer", fd, 0) == 19
        assert await ctx.read(32, fd, 0) == b"Hello world, longer"
        assert await ctx.write(b"", fd, 0) == 0
        assert await ctx.read(0, fd, 0) == b""
        assert await ctx.fsync(fd) is None
        assert await ctx.fdsync(fd) is None

    run(main())


def test_keywords(make_ctx, run, fd):
    ctx = make_ctx()

    async def main():
        assert await ctx.write(payload=b"kw", fd=fd, offset=0, priority=0) == 2
        assert await ctx.read(nbytes=2, fd=fd, offset=0) == b"kw"
        assert await ctx.fsync(fd=fd) is None

    run(main())


def test_concurrent_small_writes(make_ctx, run, fd):
    ctx = make_ctx()

    async def main():
        await asyncio.gather(*(ctx.write(b"%04d" % i, fd, i * 4) for i in range(32)))
        await ctx.fdsync(fd)
        data = await ctx.read(128, fd, 0)
        assert data == b"".join(b"%04d" % i for i in range(32))

    run(main())


def test_closed_fd_raises(make_ctx, run, path):
    ctx = make_ctx()
    # A closed fd that nothing reuses (lowest-free allocation never gets here).
    f0 = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    f = os.dup2(f0, 1000)
    os.close(f0)
    os.close(f)

    async def main():
        with pytest.raises((SystemError, OSError, ValueError)) as e:
            await ctx.read(10, f, 0)
        assert e.value.errno == errno.EBADF
        with pytest.raises(SystemError):
            await ctx.write(b"x", f, 0)

    run(main())


def test_short_read(make_ctx, run, fd):
    ctx = make_ctx()
    os.pwrite(fd, b"12345", 0)
    assert run(ctx.read(100, fd, 0)) == b"12345"


def test_big_payload(make_ctx, run, fd):
    ctx = make_ctx()
    payload = os.urandom(4 << 20)

    async def main():
        assert await ctx.write(payload, fd, 0) == len(payload)
        back = await ctx.read(len(payload), fd, 0)
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()

    run(main())


def test_sparse_write(make_ctx, run, fd):
    ctx = make_ctx()

    async def main():
        assert await ctx.write(b"x", fd, 4 << 20) == 1
        assert os.fstat(fd).st_size == (4 << 20) + 1
        assert await ctx.read(4 << 20, fd, 0) == bytes(4 << 20)

    run(main())


@pytest.mark.parametrize("max_requests", [1, 2])
def test_back_pressure(loop, config, run, fd, max_requests):
    # DESIGN.md §5.4: more concurrent ops than max_requests, no capacity errors.
    ctx = AsyncioContext(max_requests, loop=loop, **config)
    blocks = [os.urandom(4096) for _ in range(40)]

    async def main():
        assert (
            await asyncio.gather(*(ctx.write(b, fd, i * 4096) for i, b in enumerate(blocks)))
            == [4096] * 40
        )
        assert await asyncio.gather(*(ctx.read(4096, fd, i * 4096) for i in range(40))) == blocks

    try:
        run(main())
        assert ctx._gate_state() == (0, max_requests, 0)
    finally:
        ctx.close()


def test_no_buffer_aliasing(make_ctx, run, fd):
    ctx = make_ctx()
    chunks = [os.urandom(8192) for _ in range(32)]

    async def main():
        await asyncio.gather(*(ctx.write(c, fd, i * 8192) for i, c in enumerate(chunks)))
        got = await asyncio.gather(*(ctx.read(8192, fd, i * 8192) for i in range(32)))
        assert got == chunks

    run(main())


def test_gate_limits_concurrency(loop, config, run, pipe):
    r, w = pipe
    ctx = AsyncioContext(3, loop=loop, **config)

    async def main():
        tasks = [asyncio.ensure_future(ctx.read(1, r, -1)) for _ in range(8)]
        await asyncio.sleep(0.1)
        assert ctx._gate_state() == (3, 3, 5)
        os.write(w, b"abcdefgh")
        got = await asyncio.gather(*tasks)
        assert sorted(got) == [bytes([c]) for c in b"abcdefgh"]
        assert ctx._gate_state() == (0, 3, 0)

    try:
        run(main())
    finally:
        ctx.close()


# -- DESIGN.md §5.5: cancellation -----------------------------------


def test_cancel_clean_loops(make_ctx, run, loop, fd):
    ctx = make_ctx(16)
    os.pwrite(fd, os.urandom(1 << 16), 0)

    async def main():
        for rnd in range(50):
            if rnd % 2:
                coros = [ctx.read(4096, fd, (i * 4096) % (1 << 16)) for i in range(16)]
            else:
                coros = [ctx.write(os.urandom(512), fd, i * 512) for i in range(16)]
            tasks = [asyncio.ensure_future(c) for c in coros]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.sleep(0.05)

    run(main())
    gc.collect()
    assert loop.handler_calls == []
    assert ctx._gate_state()[0] == 0


def test_cancel_write_after_first_step(make_ctx, run, loop, fd):
    ctx = make_ctx()

    async def main():
        t = asyncio.ensure_future(ctx.write(b"x" * 4096, fd, 0))
        await asyncio.sleep(0)
        t.cancel()
        try:
            await t
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0.05)

    run(main())
    assert loop.handler_calls == []


def test_cancel_before_first_step(make_ctx, run, loop, fd):
    ctx = make_ctx()

    async def main():
        t = asyncio.ensure_future(ctx.read(10, fd, 0))
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    run(main())
    assert loop.handler_calls == []
    assert ctx._gate_state()[0] == 0


def test_cancel_in_flight_pipe_read_is_a_kernel_cancel(make_ctx, run, loop, pipe):
    r, w = pipe
    ctx = make_ctx()

    async def main():
        aw = ctx.read(10, r, -1)
        op = aw.operation
        t = asyncio.ensure_future(aw)
        await asyncio.sleep(0.05)
        assert op.context is ctx.context
        assert ctx._gate_state()[0] == 1
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        for _ in range(100):
            if op.context is None:
                break
            await asyncio.sleep(0.01)
        assert op.error == errno.ECANCELED
        # The slot comes back once the kernel has really finished the op
        # (not while it may still be running: DESIGN.md §5.4, §5.5, no capacity errors
        # from piled-up cancelled operations).
        assert ctx._gate_state()[0] == 0
        # the pipe is still usable, nothing consumed the data
        os.write(w, b"later")
        assert await ctx.read(10, r, -1) == b"later"

    run(main())
    assert loop.handler_calls == []


def test_cancel_while_waiting_for_slot(loop, config, run, pipe):
    r, w = pipe
    ctx = AsyncioContext(1, loop=loop, **config)

    async def main():
        first = asyncio.ensure_future(ctx.read(1, r, -1))
        second = asyncio.ensure_future(ctx.read(1, r, -1))
        third = asyncio.ensure_future(ctx.read(1, r, -1))
        await asyncio.sleep(0.05)
        assert ctx._gate_state() == (1, 1, 2)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        os.write(w, b"ab")
        assert await first == b"a"
        assert await third == b"b"
        assert ctx._gate_state() == (0, 1, 0)

    try:
        run(main())
    finally:
        ctx.close()
    assert loop.handler_calls == []


def test_cancel_when_slot_granted_but_not_resumed(loop, config, run, pipe):
    r, w = pipe
    ctx = AsyncioContext(1, loop=loop, **config)

    async def main():
        first = asyncio.ensure_future(ctx.read(1, r, -1))
        second = asyncio.ensure_future(ctx.read(1, r, -1))
        await asyncio.sleep(0.05)
        os.write(w, b"a")
        while not first.done():
            await asyncio.sleep(0)
        # the slot was handed to `second`, which has not run yet
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert ctx._gate_state() == (0, 1, 0)
        os.write(w, b"b")
        assert await ctx.read(1, r, -1) == b"b"

    try:
        run(main())
    finally:
        ctx.close()


def test_cancel_cold_reads(make_ctx, run, loop, tmp_path):
    # Reads that really go to the disk (page cache evicted), cancelled
    # while in flight: every task ends, no callbacks leak.
    p = str(tmp_path / "cold.bin")
    data = os.urandom(8 << 20)
    with open(p, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    f = os.open(p, os.O_RDONLY)
    os.posix_fadvise(f, 0, 0, os.POSIX_FADV_DONTNEED)
    ctx = make_ctx(64)

    async def main():
        offs = random.Random(3).sample(range(2048), 256)
        tasks = [asyncio.ensure_future(ctx.read(4096, f, o * 4096)) for o in offs]
        await asyncio.sleep(0)
        for t in tasks[::2]:
            t.cancel()
        res = await asyncio.gather(*tasks, return_exceptions=True)
        for o, r in zip(offs, res, strict=True):
            if not isinstance(r, asyncio.CancelledError):
                assert r == data[o * 4096 : (o + 1) * 4096]
        await asyncio.sleep(0.1)

    try:
        run(main())
    finally:
        os.close(f)
    assert loop.handler_calls == []
    assert ctx._gate_state()[0] == 0


# -- DESIGN.md §5.2, submit() ------------------------------------------------------


def test_submit(make_ctx, run, fd):
    ctx = make_ctx()
    os.pwrite(fd, b"submitted", 0)

    async def main():
        with pytest.raises(ValueError):
            await ctx.submit(object())
        op = linux_uring.Operation.read(9, fd, 0)
        assert await ctx.submit(op) == b"submitted"
        with pytest.raises(OSError):
            await ctx.submit(op)
        with pytest.raises(ValueError):
            await ctx.submit(linux_uring.Operation)

    run(main())


def test_argument_errors_are_eager(make_ctx, fd):
    ctx = make_ctx()
    with pytest.raises(TypeError):
        ctx.read(1.5, fd, 0)
    with pytest.raises(TypeError):
        ctx.read(1, fd)  # offset is required here
    with pytest.raises(OverflowError):
        ctx.read(2**64, fd, 0)
    with pytest.raises(OverflowError):
        ctx.read(1, 2**32 + 5, 0)
    with pytest.raises(ValueError):
        ctx.write("str", fd, 0)
    with pytest.raises(TypeError):
        ctx.fsync()


def test_awaitables_are_coroutines(make_ctx, run, fd):
    ctx = make_ctx()
    os.pwrite(fd, b"abc", 0)

    async def main():
        aw = ctx.read(3, fd, 0)
        assert asyncio.iscoroutine(aw)
        t = asyncio.create_task(aw)
        assert await t == b"abc"
        assert await asyncio.gather(ctx.read(1, fd, 0), ctx.read(1, fd, 1)) == [b"a", b"b"]
        assert await asyncio.wait_for(ctx.read(1, fd, 2), 5) == b"c"
        aw = ctx.read(1, fd, 0)
        assert await aw == b"a"
        with pytest.raises(RuntimeError):
            await aw  # cannot be awaited twice
        # an awaitable that is never awaited is harmless
        ctx.read(1, fd, 0)
        gc.collect()

    run(main())


def test_coroutine_protocol_by_hand(make_ctx, fd):
    ctx = make_ctx()
    os.pwrite(fd, b"manual", 0)
    aw = ctx.read(6, fd, 0)
    if ctx.context.sqpoll or ctx.deferred:
        pytest.skip("inline completion is specific to the plain eager ring")
    with pytest.raises(StopIteration) as e:
        aw.send(None)
    assert e.value.value == b"manual"
    aw2 = ctx.read(6, fd, 0)
    with pytest.raises(TypeError):
        aw2.send(1)
    with pytest.raises(KeyError):
        aw2.throw(KeyError("x"))
    aw2.close()
    with pytest.raises(RuntimeError):
        aw2.send(None)


def test_inline_completion_spends_no_loop_iteration(loop, run, fd):
    # Page-cache hits complete inside the submitting io_uring_enter: the
    # awaiting task does not suspend (plain ring, deferred=False) ...
    class NoStreak(AsyncioContext):
        MAX_SYNC_STREAK = 0

    ctx = NoStreak(8, loop=loop)
    os.pwrite(fd, os.urandom(65536), 0)

    async def main():
        await ctx.read(4096, fd, 0)  # warm
        ran = []
        loop.call_soon(ran.append, 1)
        for i in range(100):
            await ctx.read(4096, fd, (i % 16) * 4096)
        return list(ran)  # a copy: the callback runs once main() is done

    try:
        assert run(main()) == []
    finally:
        ctx.close()


@pytest.mark.parametrize("kw", [{}, {"sqpoll": True}])
def test_page_cache_hit_never_touches_the_ring(loop, run, fd, kw):
    # DESIGN.md §7.2: a cached read of at most 64 KiB is served by
    # preadv2(RWF_NOWAIT) on the loop thread - no SQE, no enter, no CQE, so
    # the ring's eventfd (signalled by every CQE) stays quiet. Data and short
    # reads are still right; an uncached or larger read still uses the ring.
    import select

    data = os.urandom(3 * 65536 + 100)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    ctx = AsyncioContext(8, loop=loop, **kw)
    efd = ctx.context.fileno

    def signalled():
        return bool(select.select([efd], [], [], 0)[0])

    async def main():
        assert not signalled()
        got = []
        for i in range(10):  # fewer than MAX_SYNC_STREAK: no loop turn
            got.append(await ctx.read(4096, fd, i * 4096))
        got.append(await ctx.read(65536, fd, 65536))
        got.append(await ctx.read(4096, fd, 3 * 65536))  # short: end of file
        quiet = not signalled()
        big = await ctx.read(3 * 65536, fd, 0)  # above the inline limit
        return got, quiet, big

    try:
        got, quiet, big = run(main())
        assert quiet
        assert got[:10] == [data[i * 4096 : (i + 1) * 4096] for i in range(10)]
        assert got[10] == data[65536:131072]
        assert got[11] == data[3 * 65536 :]
        assert big == data[: 3 * 65536]
    finally:
        ctx.close()


def test_back_to_inline_after_asynchronous_completions(loop, run, fd, pipe):
    # An op that does not complete inline switches submission to batches
    # (one enter per loop iteration); a batch that completes inline switches
    # back to eager, suspension-free submission.
    class NoStreak(AsyncioContext):
        MAX_SYNC_STREAK = 0

    r, w = pipe
    ctx = NoStreak(8, loop=loop)
    os.pwrite(fd, os.urandom(65536), 0)

    async def main():
        t = asyncio.ensure_future(ctx.read(1, r, -1))
        await asyncio.sleep(0.01)
        os.write(w, b"x")
        assert await t == b"x"
        # batched now: these suspend once, and complete inline in the batch
        assert len(await asyncio.gather(*(ctx.read(4096, fd, 0) for _ in range(4)))) == 4
        ran = []
        loop.call_soon(ran.append, 1)
        for i in range(100):
            await ctx.read(4096, fd, (i % 16) * 4096)
        return list(ran)

    try:
        assert run(main()) == []
    finally:
        ctx.close()


def _caio_workers():
    """Threads of caio's native worker pools (kernel ``comm`` names)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names.count("caio-worker")


def test_buffered_writes_and_fsyncs_run_on_workers(loop, run, fd, pipe):
    # DESIGN.md §7.2: buffered writes (io_uring punts them to io-wq on ext4)
    # and the fsyncs that must cover them go to core's worker pool, started
    # on first use and stopped with the Context; reads stay inline/on the
    # ring, and so do writes to a pipe (not a regular file).
    before = _caio_workers()
    ctx = AsyncioContext(16, loop=loop)
    r, w = pipe

    async def main():
        assert await ctx.read(10, fd, 0) == b""
        started = _caio_workers()
        data = [os.urandom(4096) for _ in range(32)]
        got = await asyncio.gather(
            *(ctx.write(d, fd, i * 4096) for i, d in enumerate(data)),
            ctx.fsync(fd),
            ctx.fdsync(fd),
        )
        assert await ctx.write(b"pipe", w, -1) == 4
        # Not a regular file: the ring (stream semantics), never a pwrite's
        # ESPIPE from a worker.
        assert await ctx.write(b"+0", w, 0) == 2
        return started, got, data

    try:
        started, got, data = run(main())
        assert started == before
        assert _caio_workers() > before
        assert got == [4096] * 32 + [None, None]
        assert os.pread(fd, 32 * 4096, 0) == b"".join(data)
        assert os.read(r, 10) == b"pipe+0"
    finally:
        ctx.close()
    context = ctx.context
    ctx = None
    del context
    deadline = time.monotonic() + 5
    while _caio_workers() > before and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.02)
    assert _caio_workers() == before


# The start of the routing scripts below: `workers()` counts the adapter's
# worker threads, `fd` is the file named by argv[1].
_ROUTING_PRELUDE = r"""
import asyncio, mmap, os, sys
from caio import linux_uring_asyncio

def workers():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names.count("caio-worker")

fd = os.open(sys.argv[1], os.O_RDONLY)
"""


def _run_routing_script(script: str, path: str, spare_cpus: str) -> list[int]:
    """Runs `_ROUTING_PRELUDE + script` on `path` with the spare-CPU test hook
    set; returns the integers it prints."""
    import subprocess
    import sys

    if not linux_uring._TEST_HOOKS:
        pytest.skip("needs a build with the test hooks")
    env = dict(os.environ, CAIO_TEST_URING_SPARE_CPUS=spare_cpus)
    out = subprocess.run(
        [sys.executable, "-c", _ROUTING_PRELUDE + script, path],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [int(n) for n in out.stdout.split()]


_COPY_RULE_SCRIPT = r"""
data = os.pread(fd, 3 << 20, 0)

async def main():
    ctx = linux_uring_asyncio.AsyncioContext(8)
    try:
        assert await ctx.read(65536, fd, 4096) == data[4096 : 4096 + 65536]
        assert await ctx.read(2 << 20, fd, 8192) == data[8192 : 8192 + (2 << 20)]
        loop_sized = workers()
        mid = await asyncio.gather(*(ctx.read(256 << 10, fd, i << 18) for i in range(8)))
        assert mid == [data[i << 18 : (i + 1) << 18] for i in range(8)]
        assert await ctx.read(1 << 20, fd, (2 << 20) + 100) == data[(2 << 20) + 100 :]
        print(loop_sized, workers())
    finally:
        ctx.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("cpus", ["2", "1"])
def test_mid_size_reads_are_copied_by_workers_when_a_core_is_free(path, cpus):
    # DESIGN.md §7.2, the copy rule: reads above 64 KiB and up to 1 MiB are
    # copied by a worker on another core while one is available to the
    # process (measured; here forced through the test hook), else on the
    # loop thread; 64 KiB and less, and more than 1 MiB, always on the loop
    # thread (inline page-cache read / the ring).
    with open(path, "wb") as f:
        f.write(os.urandom(3 << 20))
    loop_sized, after = _run_routing_script(_COPY_RULE_SCRIPT, path, cpus)
    assert loop_sized == 0
    assert (after > 0) == (cpus == "2")


_COPY_DISTANCE_SCRIPT = r"""
data = os.pread(fd, 1 << 20, 0)
arena = mmap.mmap(-1, (1 << 20) + 8192)

async def main():
    ctx = linux_uring_asyncio.AsyncioContext(8)
    try:
        counts = []
        for shift in (0, 16):  # page-aligned, then 16 bytes past the page
            view = memoryview(arena)[shift : shift + (256 << 10)]
            assert await ctx.readinto(view, fd, 4096) == 256 << 10
            view.release()
            assert arena[shift : shift + (256 << 10)] == data[4096 : 4096 + (256 << 10)]
            counts.append(workers())
        print(*counts)
    finally:
        ctx.close()

asyncio.run(main())
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the slow copy distance is x86-64's")
def test_readinto_at_a_slow_copy_distance_goes_to_the_workers(path):
    # DESIGN.md §11.3: the kernel copies 1-31 bytes past the source's page
    # position ~3.5x slower, so a readinto above 64 KiB into such memory goes
    # to the workers (scratch buffer) even with no core to spare; into
    # page-aligned memory it stays on the loop thread (the ring).
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
    aligned, shifted = _run_routing_script(_COPY_DISTANCE_SCRIPT, path, "1")
    assert aligned == 0
    assert shifted > 0


def test_loop_with_own_create_future(run, fd, pipe):
    made = []

    class Loop(asyncio.SelectorEventLoop):
        def create_future(self):
            made.append(1)
            return super().create_future()

    lp = Loop()
    try:
        ctx = AsyncioContext(4, loop=lp)
        r, w = pipe

        async def main():
            t = asyncio.ensure_future(ctx.read(1, r, -1))
            await asyncio.sleep(0.01)
            os.write(w, b"y")
            return await t

        assert lp.run_until_complete(main()) == b"y"
        assert made  # the loop's own factory was used
        ctx.close()
    finally:
        lp.close()


def test_sync_streak_gives_the_loop_a_turn(loop, run, fd):
    # ... but after MAX_SYNC_STREAK synchronous completions in a row the
    # loop gets one turn, so other tasks are not starved.
    ctx = AsyncioContext(8, loop=loop)
    assert ctx.MAX_SYNC_STREAK == 32
    os.pwrite(fd, os.urandom(65536), 0)

    async def main():
        await ctx.read(4096, fd, 0)
        ticks = []
        reads = 0

        async def ticker():
            while reads < 300:
                ticks.append(reads)
                await asyncio.sleep(0)

        t = asyncio.ensure_future(ticker())
        for i in range(300):
            assert await ctx.read(4096, fd, (i % 16) * 4096) == os.pread(fd, 4096, (i % 16) * 4096)
            reads += 1
        await t
        return ticks

    try:
        ticks = run(main())
    finally:
        ctx.close()
    assert len(ticks) >= 300 // 33
    assert max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) <= 33


def test_closed_context_refuses_new_ops(loop, run, fd):
    ctx = AsyncioContext(4, loop=loop)

    async def main():
        assert await ctx.write(b"x", fd, 0) == 1
        ctx.close()
        with pytest.raises(RuntimeError):
            await ctx.read(1, fd, 0)

    run(main())


def test_context_freed_after_close(loop, run, fd):
    ctx = AsyncioContext(4, loop=loop)
    run(ctx.write(b"x", fd, 0))
    ref = weakref.ref(ctx)
    ring = weakref.ref(ctx.context)
    ctx.close()
    del ctx
    gc.collect()
    assert ref() is None and ring() is None


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_loop_closed_before_flush_frees_ops_and_context(loop_kind, config, fd, pipe):
    """The loop stops and is closed while the SQEs of a batch wait for
    their flush (a callback of that loop, which never runs; deferred=True
    and automatic batching): the loop-gone drain submits and cancels them,
    so op, Context and adapter are collectable - the ring's references are
    invisible to the GC, and each op's future leads through its task back
    to the adapter and the Context. Includes a read of an idle pipe, which
    only a cancel ends."""
    os.pwrite(fd, b"r" * 4096, 0)
    lp = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        ctx = AsyncioContext(16, loop=lp, **config)
        context = ctx.context
        refs = [weakref.ref(ctx), weakref.ref(context)]

        async def one(make):
            aw = make()
            refs.append(weakref.ref(aw.operation))
            return await aw

        makers = [
            lambda: ctx.read(4096, fd, 0),
            lambda: ctx.write(b"w" * 4096, fd, 4096),
            lambda: ctx.fdsync(fd),
            lambda: ctx.read(100, pipe[0], -1),  # never completes
            lambda: ctx.read(100, fd, 8192),
        ]
        tasks = [lp.create_task(one(m)) for m in makers]
        lp.call_soon(lp.stop)
        lp.run_forever()  # one iteration: every task ran its first step
        assert len(refs) == 2 + len(makers)
        if config.get("deferred") and not config.get("sqpoll") and loop_kind == "asyncio":
            # Staged, not entered: the flush has not run. (uvloop runs the
            # callbacks scheduled during its last iteration before it stops.)
            assert not any(task.done() for task in tasks)
        assert not tasks[3].done()
        lp.close()
        assert ctx._released()
        for task in tasks:
            task._log_destroy_pending = False  # abandoned on purpose
        ctx = context = tasks = task = makers = one = None  # type: ignore[assignment]
        gc.collect()
        alive = [r() for r in refs if r() is not None]
        assert alive == [], alive
    finally:
        if not lp.is_closed():
            lp.close()


def test_subclass_hooks_still_work(loop, run, fd):
    class Mine(AsyncioContext):
        def extra(self):
            return "extra"

    ctx = Mine(4, loop=loop)
    try:
        assert ctx.extra() == "extra"
        assert run(ctx.write(b"sub", fd, 0)) == 3
    finally:
        ctx.close()


# -- O_DIRECT through the adapter ----------------------------------------------


def test_direct_io(make_ctx, run, path):
    data = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.write(data)
    try:
        f = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        pytest.skip(f"O_DIRECT unsupported: {e}")
    ctx = make_ctx(64)
    rnd = random.Random(7)
    cases = [(rnd.randrange(1, 20000), rnd.randrange(0, (1 << 20) - 20000)) for _ in range(200)]

    async def main():
        got = await asyncio.gather(*(ctx.read(n, f, o) for n, o in cases))
        for (n, o), g in zip(cases, got, strict=True):
            assert g == data[o : o + n]
        block = os.urandom(4096)
        assert await ctx.write(block, f, 8192) == 4096
        assert await ctx.read(4096, f, 8192) == block

    try:
        run(main())
    finally:
        os.close(f)


# -- a long random run with cancellations --------------------------------------


def test_10000_ops_with_random_cancellations(make_ctx, run, loop, tmp_path):
    rnd = random.Random(12345)
    p = str(tmp_path / "stress.bin")
    base = bytearray(os.urandom(1 << 20))
    with open(p, "wb") as f:
        f.write(base)
    f = os.open(p, os.O_RDWR)
    ctx = make_ctx(128)
    # 4 KiB blocks: 0..127 receive writes (block b only pattern(b, k)),
    # 128..255 are only read and must always read back exactly. (Buffered
    # reads racing a write of the same page may legitimately see a mix.)
    wblocks, nblocks = 128, 256

    def pattern(b, k):
        return bytes([(b * 7 + k) & 0xFF]) * 4096

    written = {}  # block -> patterns possibly written

    async def one(i):
        kind = rnd.random()
        if kind < 0.3:
            b, k = rnd.randrange(wblocks), rnd.randrange(1, 5)
            written.setdefault(b, set()).add(pattern(b, k))
            return ("w", b, await ctx.write(pattern(b, k), f, b * 4096))
        b = rnd.randrange(nblocks)
        return ("r", b, await ctx.read(4096, f, b * 4096))

    async def main():
        results = []
        for start in range(0, 10000, 500):
            tasks = [asyncio.ensure_future(one(i)) for i in range(start, start + 500)]
            for _ in range(rnd.randrange(0, 3)):
                await asyncio.sleep(0)
            for t in rnd.sample(tasks, 100):
                t.cancel()
            results += await asyncio.gather(*tasks, return_exceptions=True)
        return results

    results = run(main(), timeout=120)
    assert len(results) == 10000
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert 0 < cancelled <= 2000
    for r in results:
        if isinstance(r, BaseException):
            assert isinstance(r, asyncio.CancelledError), r
            continue
        kind, b, val = r
        if kind == "w":
            assert val == 4096
        elif b >= wblocks:
            assert val == bytes(base[b * 4096 : (b + 1) * 4096]), "wrong read"
        else:
            assert len(val) == 4096
    final = os.pread(f, 1 << 20, 0)
    os.close(f)
    for b in range(nblocks):
        blk = final[b * 4096 : (b + 1) * 4096]
        assert blk == bytes(base[b * 4096 : (b + 1) * 4096]) or blk in written.get(b, ())
    assert loop.handler_calls == []
    assert ctx._gate_state()[0] == 0


# -- fork ------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # io_uring kernel threads
def test_adapter_after_fork(loop, run, fd):
    ctx = AsyncioContext(4, loop=loop)
    run(ctx.write(b"parent", fd, 0))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            aw = ctx.read(6, fd, 0)
            try:
                aw.send(None)
            except RuntimeError as e:
                code = 0 if "fork" in str(e) else 2
            except BaseException:
                code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert run(ctx.read(6, fd, 0)) == b"parent"
    ctx.close()


def test_timing_sanity(make_ctx, run, fd):
    # Many cached reads finish quickly in every configuration (no hangs,
    # no per-op sleeping).
    ctx = make_ctx()
    os.pwrite(fd, os.urandom(1 << 16), 0)

    async def main():
        t0 = time.monotonic()
        await asyncio.gather(*(ctx.read(4096, fd, (i % 16) * 4096) for i in range(5000)))
        return time.monotonic() - t0

    assert run(main()) < 10


@pytest.mark.parametrize("loop_name", LOOPS)
def test_garbage_collection_with_ops_in_flight(pipe, loop_name):
    # Loop, adapter, task and an awaitable whose op is in flight all become
    # garbage together (with reference cycles): collecting them must not
    # crash, whatever order the collector clears and finalises them in.
    r, w = pipe
    for _ in range(20):
        lp = uvloop.new_event_loop() if loop_name == "uvloop" else asyncio.new_event_loop()
        lp.set_exception_handler(lambda loop, ctx: None)  # "Task was destroyed but it is pending"
        ctx = AsyncioContext(4, loop=lp)

        async def main():
            # ctx through the closure cell, not a default argument: ``del ctx``
            # below must leave the adapter to the garbage collector.
            tasks = [asyncio.ensure_future(ctx.read(1, r, -1)) for _ in range(3)]  # noqa: B023, F821
            await asyncio.sleep(0.005)
            return tasks

        tasks = lp.run_until_complete(main())
        ctx.self_ref = ctx  # a cycle through the adapter's __dict__
        lp.close()
        del ctx, tasks, lp
        gc.collect()
    gc.collect()


@pytest.mark.skipif(not linux_uring._TEST_HOOKS, reason="needs a build with the test hooks")
@pytest.mark.parametrize("deferred", [False, True], ids=["eager", "deferred"])
def test_refused_enter_fails_no_awaitable(loop, run, fd, deferred, monkeypatch):
    """DESIGN.md §5.8.1: when io_uring_enter refuses the SQEs (EAGAIN, EBUSY...)
    they stay staged and run with the next enter: their awaitables wait and get
    the result, none fails (it used to raise SystemError although the op ran
    later). The hook makes every enter refuse until it is removed. A pipe:
    its reads and writes go through the ring (no inline page-cache read, no
    worker route, DESIGN.md §7.2)."""
    r, w = os.pipe()

    async def main():
        ctx = AsyncioContext(8, sqpoll=False, deferred=deferred)
        try:
            monkeypatch.setenv("CAIO_TEST_URING_ENTER_ERRNO", str(errno.EAGAIN))
            tasks = [
                asyncio.ensure_future(ctx.write(b"abcd", w, 0)),
                asyncio.ensure_future(ctx.read(4, r, 0)),
            ]
            for _ in range(5):
                await asyncio.sleep(0)
            assert not any(t.done() for t in tasks)  # staged, retried, waiting
            monkeypatch.delenv("CAIO_TEST_URING_ENTER_ERRNO")
            assert await asyncio.gather(*tasks) == [4, b"abcd"]
        finally:
            ctx.close()

    try:
        run(main())
    finally:
        os.close(r)
        os.close(w)
    assert loop.handler_calls == []
