"""Eventfd-driven backends: linux_uring and linux_aio (DESIGN.md §4.4, §4.5).

These tests only have parameters when the native modules are importable.
"""

import errno
import gc
import os
import sys
import textwrap
import threading
import time
import weakref

import pytest

from helpers import RawBackend, Recorder, read_file, run_python

U64_MAX = 2**64 - 1


def _wait_ready(ctx: object, timeout: float = 10.0) -> None:
    """Wait until the eventfd reports completions, without draining the CQ.

    The kernel may coalesce several completions into one eventfd increment,
    so the counter only says "something is ready"; a short grace period
    lets the rest of a batch land.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            ctx.poll()
            break
        except BlockingIOError as exc:
            if time.monotonic() > deadline:
                raise AssertionError("no completion signalled") from exc
            time.sleep(0.001)
    time.sleep(0.2)


def _pipe() -> tuple:
    r, w = os.pipe()
    return r, w


# -- shared eventfd model ----------------------------------------------------------


def test_fileno_is_an_eventfd_int(linux_backend: RawBackend) -> None:
    ctx = linux_backend.context()
    assert isinstance(ctx.fileno, int)
    os.fstat(ctx.fileno)  # an open descriptor


def test_flush_and_process_events_delivery_counts(
    linux_backend: RawBackend,
    tmp_fd: int,
) -> None:
    """DESIGN.md §4.4, §4.5: every completion is counted exactly once by the
    flush()/process_events() calls that deliver it."""
    ctx = linux_backend.context(8)
    Op = linux_backend.Operation
    for ops in (
        [Op.write(bytes([65 + i]) * 8, tmp_fd, 8 * i) for i in range(4)],
        [Op.read(8, tmp_fd, 8 * i) for i in range(4)],
    ):
        calls = Recorder()
        for op in ops:
            op.set_callback(calls)
        assert ctx.submit(*ops) == 4
        delivered = 0
        deadline = time.monotonic() + 10
        while len(calls) < 4:
            assert time.monotonic() < deadline
            delivered += linux_backend.drive(ctx)
        delivered += linux_backend.drive(ctx)
        assert delivered == 4
        assert sorted(calls.items) == [8] * 4
    assert [op.get_value() for op in ops] == [bytes([65 + i]) * 8 for i in range(4)]


def test_process_events_argument_checks(linux_backend: RawBackend) -> None:
    ctx = linux_backend.context()
    with pytest.raises(ValueError):
        ctx.process_events(max_requests=1, min_requests=5)  # DESIGN.md §4.4, §4.5
    with pytest.raises(TypeError):
        ctx.process_events(timeout=0.5)
    with pytest.raises(OverflowError):
        ctx.process_events(timeout=2**31)
    assert ctx.process_events(512, 0, 0) == 0
    assert ctx.process_events(max_requests=0, min_requests=0, timeout=0) == 0
    if linux_backend.is_linux_aio:
        with pytest.raises(OverflowError):
            ctx.process_events(max_requests=2**32 - 1)  # DESIGN.md §4.5
        with pytest.raises(OverflowError):
            ctx.process_events(max_requests=1048577)
    else:
        assert ctx.process_events(max_requests=-1) == 0


def test_process_events_timeout_releases_gil(linux_backend: RawBackend) -> None:
    """DESIGN.md §4.4, §4.5: nothing submitted, min_requests=1, timeout=1."""
    ctx = linux_backend.context()
    ticks = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks.append(None)
            time.sleep(0.01)

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        started = time.monotonic()
        assert ctx.process_events(min_requests=1, timeout=1) == 0
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
    assert 0.8 <= elapsed < 10
    assert len(ticks) >= 10  # the other thread kept running


def test_process_events_blocks_until_other_thread_completes(
    linux_backend: RawBackend,
    tmp_fd: int,
) -> None:
    """DESIGN.md §4.4, §4.5: timeout=-1 waits for a completion from another thread."""
    ctx = linux_backend.context()
    calls = Recorder()
    if linux_backend.is_uring:
        r, w = _pipe()
        op = linux_backend.Operation.read(4, r, -1)
    else:
        r = w = -1
        op = linux_backend.Operation.write(b"data", tmp_fd, 0)
    op.set_callback(calls)

    def producer() -> None:
        time.sleep(0.2)
        if linux_backend.is_uring:
            assert ctx.submit(op) == 1
            ctx.flush()  # the pipe is empty: nothing completes yet
            time.sleep(0.2)
            os.write(w, b"ping")
        else:
            assert ctx.submit(op) == 1

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        delivered = ctx.process_events(min_requests=1, timeout=-1)
    finally:
        thread.join()
        if r >= 0:
            os.close(r)
            os.close(w)
    assert delivered >= 1
    assert len(calls) == 1
    assert op.get_value() in (b"ping", 4)


def test_poll(linux_backend: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §4.4, §4.5."""
    ctx = linux_backend.context()
    started = time.monotonic()
    with pytest.raises(BlockingIOError) as e:
        ctx.poll()
    assert time.monotonic() - started < 1
    # Upstream's exception exactly: BlockingIOError() - no arguments, so
    # no errno and str() == "" (DESIGN.md §4.4, §4.5).
    assert type(e.value) is BlockingIOError
    assert e.value.args == () and e.value.errno is None
    ops = [linux_backend.Operation.write(b"x", tmp_fd, i) for i in range(3)]
    linux_backend.run(ctx, *ops)
    _wait_ready(ctx)  # reads (and resets) the counter
    with pytest.raises(BlockingIOError) as e:
        ctx.poll()
    assert e.value.args == ()


def test_poll_returns_positive_count(linux_backend: RawBackend, tmp_fd: int) -> None:
    ctx = linux_backend.context()
    linux_backend.run(ctx, linux_backend.Operation.write(b"x", tmp_fd, 0))
    deadline = time.monotonic() + 10
    while True:
        try:
            count = ctx.poll()
            break
        except BlockingIOError:
            assert time.monotonic() < deadline
            time.sleep(0.001)
    assert isinstance(count, int) and count > 0


def test_in_flight_gate(linux_backend: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §3.3: payload/get_value raise while in flight."""
    os.pwrite(tmp_fd, b"0123456789", 0)
    ctx = linux_backend.context()
    op = linux_backend.Operation.read(4, tmp_fd, 2)
    calls = Recorder()
    op.set_callback(calls)
    assert ctx.submit(op) == 1  # uring: staged; linux_aio: not yet delivered
    with pytest.raises(RuntimeError):
        _ = op.payload
    with pytest.raises(RuntimeError):
        op.get_value()
    assert (op.fileno, op.offset) == (tmp_fd, 2)
    assert op.context is ctx
    linux_backend.wait_for(ctx, lambda: len(calls) == 1)
    assert op.get_value() == b"2345"
    assert bytes(op.payload) == b"2345"
    assert op.context is None


def test_cancel_submitted_op_never_hangs(linux_backend: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §4.3."""
    ctx = linux_backend.context()
    calls = Recorder()
    op = linux_backend.Operation.write(b"abc", tmp_fd, 0)
    op.set_callback(calls)
    assert ctx.submit(op) == 1
    if linux_backend.is_linux_aio:
        try:
            ctx.cancel(op)
        except (ValueError, SystemError, RuntimeError, NotImplementedError):
            pass
    else:
        assert ctx.cancel(op) == 0
    linux_backend.wait_for(ctx, lambda: len(calls) == 1)
    assert len(calls) == 1


def test_cancel_requires_an_operation(linux_backend: RawBackend) -> None:
    ctx = linux_backend.context()
    with pytest.raises(TypeError):
        ctx.cancel(object())
    with pytest.raises(TypeError):
        ctx.cancel()


def test_cancel_op_of_another_context(linux_backend: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §4.4, §4.5."""
    owner, other = linux_backend.context(), linux_backend.context()
    calls = Recorder()
    op = linux_backend.Operation.write(b"mine", tmp_fd, 0)
    op.set_callback(calls)
    assert owner.submit(op) == 1
    if linux_backend.is_uring:
        assert other.cancel(op) == 0
    else:
        with pytest.raises(ValueError):
            other.cancel(op)
    linux_backend.wait_for(owner, lambda: len(calls) == 1)
    assert op.get_value() == 4
    assert read_file(tmp_fd) == b"mine"


def test_context_lifetime_follows_in_flight_ops(
    linux_backend: RawBackend,
    tmp_fd: int,
) -> None:
    """DESIGN.md §8.2: with gc disabled, refcounting alone frees the Context."""
    ctx = linux_backend.Context()
    ctx_ref = weakref.ref(ctx)
    calls = Recorder()
    op = linux_backend.Operation.write(b"rc", tmp_fd, 0)
    op.set_callback(calls)
    gc.disable()
    try:
        assert ctx.submit(op) == 1
        assert op.context is ctx
        del ctx
        assert ctx_ref() is not None
        linux_backend.wait_for(op.context, lambda: len(calls) == 1)
        assert op.context is None
        assert ctx_ref() is None
    finally:
        gc.enable()


def test_reentrant_process_events(linux_backend: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §4.4 (drain): a callback re-entering process_events() gets 0."""
    ctx = linux_backend.context()
    inner = []
    op = linux_backend.Operation.write(b"re", tmp_fd, 0)
    op.set_callback(lambda _: inner.append(ctx.process_events()))
    before = sys.getrefcount(op)
    assert ctx.submit(op) == 1
    linux_backend.wait_for(ctx, lambda: inner)
    assert inner == [0]
    op.set_callback(print)  # drop the closure's reference to ctx
    assert sys.getrefcount(op) == before


def test_process_events_max_requests_limits_delivery(
    linux_backend: RawBackend,
    tmp_fd: int,
) -> None:
    """DESIGN.md §4.4 (drain): 5 ready completions, max_requests=1 delivers one."""
    ctx = linux_backend.context()
    calls = Recorder()
    if linux_backend.is_uring:
        # Pipe reads complete after flush() returned, so they wait in the CQ.
        r, w = _pipe()
        ops = [linux_backend.Operation.read(1, r, -1) for _ in range(5)]
    else:
        r = w = -1
        ops = [linux_backend.Operation.write(b"x", tmp_fd, i) for i in range(5)]
    for op in ops:
        op.set_callback(calls)
    try:
        assert ctx.submit(*ops) == 5
        if linux_backend.is_uring:
            assert ctx.flush() == 0
            os.write(w, b"abcde")
        _wait_ready(ctx)
        assert ctx.process_events(max_requests=1) == 1
        assert len(calls) == 1
        assert ctx.process_events() == 4
        assert len(calls) == 5
    finally:
        if r >= 0:
            os.close(r)
            os.close(w)


def test_teardown_never_runs_callbacks(linux_backend: RawBackend) -> None:
    """DESIGN.md §8.2, §9.4: interpreter exit with an op in flight calls nothing."""
    script = textwrap.dedent("""
        import os, sys
        from caio import {name} as backend

        r, w = os.pipe()
        ctx = backend.Context()
        if {uring}:
            op = backend.Operation.read(4, r, -1)
        else:
            op = backend.Operation.write(b"data", os.open(os.devnull, os.O_WRONLY), 0)
        op.set_callback(lambda result: print("CALLBACK", result, flush=True))
        assert ctx.submit(op) == 1
        if {uring}:
            ctx.flush()
        del ctx
        print("EXITING", flush=True)
    """).format(name=linux_backend.name, uring=linux_backend.is_uring)
    proc = run_python(["-c", script])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["EXITING"]


# -- linux_uring -----------------------------------------------------------------------


def test_uring_constructor(uring: RawBackend) -> None:
    module = uring.module
    assert isinstance(module.SQPOLL_ALLOWED, bool)
    ctx = uring.context()
    assert ctx.max_requests == 32
    assert type(ctx.sqpoll) is int and ctx.sqpoll == 0
    assert uring.context(max_requests=3, sqpoll=False).max_requests == 3
    polled = uring.context(4, sqpoll=True)
    assert type(polled.sqpoll) is int
    assert polled.sqpoll == (1 if module.SQPOLL_ALLOWED else 0)
    assert uring.context(4, sqpoll="yes").sqpoll == polled.sqpoll
    with pytest.raises(SystemError):
        uring.Context(32768)


def test_uring_flush_with_nothing_staged(uring: RawBackend) -> None:
    assert uring.context().flush() == 0


def test_uring_submit_stages_until_flush(uring: RawBackend, tmp_fd: int) -> None:
    ctx = uring.context()
    calls = Recorder()
    op = uring.Operation.write(b"staged", tmp_fd, 0)
    op.set_callback(calls)
    assert ctx.submit(op) == 1
    time.sleep(0.05)
    assert ctx.process_events() == 0  # not submitted to the kernel yet
    assert read_file(tmp_fd) == b""
    uring.wait_for(ctx, lambda: len(calls) == 1)
    assert read_file(tmp_fd) == b"staged"
    assert op.result == 6 and op.error == 0


def test_uring_bad_fd_callback_result(uring: RawBackend, closed_fd: int) -> None:
    ctx = uring.context()
    op = uring.Operation.write(b"x", closed_fd, 0)
    assert uring.run_one(ctx, op) == -errno.EBADF
    assert op.error == errno.EBADF


def test_uring_sq_ring_full(uring: RawBackend, fast_fd: int) -> None:
    """DESIGN.md §4.2, §4.4 (and the SQ capacity rule next_pow2(max_requests+1))."""
    ctx = uring.context(1)
    calls = Recorder()
    ops = [uring.Operation.fsync(fast_fd) for _ in range(256)]
    for op in ops:
        op.set_callback(calls)
    with pytest.raises(OverflowError):
        ctx.submit(*ops)
    uring.wait_for(ctx, lambda: len(calls) == 2)
    time.sleep(0.05)
    uring.drive(ctx)
    assert len(calls) == 2  # the two staged before the ring filled up
    assert ops[0].get_value() is None and ops[1].get_value() is None
    # The rejected op was rolled back and works now.
    assert uring.run_one(ctx, ops[2]) == 0
    assert uring.run_one(ctx, uring.Operation.fsync(fast_fd)) == 0


def test_uring_full_read_returns_payload_object(uring: RawBackend, tmp_fd: int) -> None:
    os.pwrite(tmp_fd, b"12345678", 0)
    ctx = uring.context()
    op = uring.Operation.read(8, tmp_fd, 0)
    uring.run_one(ctx, op)
    assert op.get_value() is op.payload
    short = uring.Operation.read(16, tmp_fd, 0)
    uring.run_one(ctx, short)
    assert short.get_value() == b"12345678"
    assert len(short.payload) == 16


def test_uring_cancel_blocked_pipe_read(uring: RawBackend) -> None:
    """DESIGN.md §4.4."""
    r, w = _pipe()
    try:
        ctx = uring.context()
        calls = Recorder()
        op = uring.Operation.read(16, r, -1)
        op.set_callback(calls)
        assert ctx.submit(op) == 1
        assert ctx.flush() == 0
        time.sleep(0.05)
        assert calls.items == []
        assert ctx.cancel(op) == 0
        uring.wait_for(ctx, lambda: len(calls) == 1)
        assert calls.items == [-errno.ECANCELED]
        assert op.error == errno.ECANCELED
        with pytest.raises(SystemError) as excinfo:
            op.get_value()
        assert getattr(excinfo.value, "errno", errno.ECANCELED) == errno.ECANCELED
    finally:
        os.close(r)
        os.close(w)


def test_uring_cancel_before_flush(uring: RawBackend) -> None:
    """DESIGN.md §4.4."""
    r, w = _pipe()
    try:
        ctx = uring.context()
        calls = Recorder()
        op = uring.Operation.read(16, r, -1)
        op.set_callback(calls)
        assert ctx.submit(op) == 1
        assert ctx.cancel(operation=op) == 0
        uring.wait_for(ctx, lambda: len(calls) == 1)
        assert calls.items == [-errno.ECANCELED]
    finally:
        os.close(r)
        os.close(w)


def test_uring_cancel_never_raises_for_state(uring: RawBackend, tmp_fd: int) -> None:
    ctx = uring.context()
    fresh = uring.Operation.write(b"x", tmp_fd, 0)
    assert ctx.cancel(fresh) == 0
    uring.run_one(ctx, fresh)
    assert ctx.cancel(fresh) == 0
    assert fresh.get_value() == 1


def test_uring_closed_fd_then_repaired(uring: RawBackend, tmp_path: object) -> None:
    """DESIGN.md §4.1, §4.3."""
    path = str(tmp_path / "repair.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.close(fd)
    ctx = uring.context()
    op = uring.Operation.write(b"data", fd, 0)
    uring.run_one(ctx, op)
    assert op.error != 0
    with pytest.raises(SystemError):
        op.get_value()
    assert ctx.submit(op) == 0
    fd2 = os.open(path, os.O_RDWR)
    try:
        fresh = uring.Operation.write(b"data", fd2, 0)
        assert uring.run_one(ctx, fresh) == 4
        assert fresh.error == 0
    finally:
        os.close(fd2)


def test_uring_context_kept_alive_by_blocked_op(uring: RawBackend) -> None:
    """DESIGN.md §8.3."""
    r, w = _pipe()
    try:
        ctx = uring.Context()
        ref = weakref.ref(ctx)
        calls = Recorder()
        op = uring.Operation.read(4, r, -1)
        op.set_callback(calls)
        assert ctx.submit(op) == 1
        ctx.flush()
        del ctx
        gc.collect()
        assert ref() is not None
        os.write(w, b"wake")
        uring.wait_for(op.context, lambda: len(calls) == 1)
        gc.collect()
        assert ref() is None
        assert op.get_value() == b"wake"
    finally:
        os.close(r)
        os.close(w)


def test_uring_cross_thread_use(uring: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §4.4: created on one thread, used from another."""
    ctx = uring.context()
    result = []

    def worker() -> None:
        op = uring.Operation.write(b"thread", tmp_fd, 0)
        result.append(uring.run_one(ctx, op))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert result == [6]
    assert read_file(tmp_fd) == b"thread"


# -- linux_aio -----------------------------------------------------------------------------


def test_linux_aio_too_many_requests(linux_aio: RawBackend) -> None:
    try:
        with open("/proc/sys/fs/aio-max-nr") as fp:
            limit = int(fp.read())
    except OSError:
        pytest.skip("no /proc/sys/fs/aio-max-nr")
    if limit >= 2**31:
        pytest.skip("aio-max-nr effectively unlimited")
    with pytest.raises(SystemError):
        linux_aio.Context(limit + 1)


def test_linux_aio_bad_fd_rolls_back(linux_aio: RawBackend, closed_fd: int) -> None:
    ctx = linux_aio.context()
    calls = Recorder()
    op = linux_aio.Operation.read(16, closed_fd, 0)
    op.set_callback(calls)
    for _ in range(2):  # rolled back, so it is retried (and fails) again
        with pytest.raises(ValueError):
            ctx.submit(op)
    assert op.context is None
    assert ctx.process_events() == 0
    assert calls.items == []


def test_linux_aio_partial_acceptance(
    linux_aio: RawBackend,
    tmp_fd: int,
    closed_fd: int,
) -> None:
    ctx = linux_aio.context()
    calls = Recorder()
    good = linux_aio.Operation.write(b"one", tmp_fd, 0)
    bad = linux_aio.Operation.write(b"two", closed_fd, 0)
    later = linux_aio.Operation.write(b"333", tmp_fd, 3)
    for op in (good, bad, later):
        op.set_callback(calls)
    assert ctx.submit(good, bad, later) == 1
    linux_aio.wait_for(ctx, lambda: len(calls) == 1)
    assert linux_aio.run_one(ctx, later) == 3
    assert read_file(tmp_fd) == b"one333"


def test_linux_aio_cancel_typically_raises(linux_aio: RawBackend, tmp_fd: int) -> None:
    ctx = linux_aio.context()
    op = linux_aio.Operation.write(b"x", tmp_fd, 0)
    with pytest.raises((ValueError, SystemError, RuntimeError, NotImplementedError)):
        ctx.cancel(op)  # never submitted
    linux_aio.run_one(ctx, op)
    with pytest.raises((ValueError, SystemError, RuntimeError, NotImplementedError)):
        ctx.cancel(operation=op)  # completed


def test_linux_aio_nbytes_after_completion(linux_aio: RawBackend, tmp_fd: int) -> None:
    os.pwrite(tmp_fd, b"abc", 0)
    ctx = linux_aio.context()
    op = linux_aio.Operation.read(10, tmp_fd, 0)
    linux_aio.run_one(ctx, op)
    assert op.nbytes == 3
    sync = linux_aio.Operation.fsync(tmp_fd)
    linux_aio.run_one(ctx, sync)
    assert sync.nbytes == 0


# -- signals and EINTR (DESIGN.md §6.2 eintr) -----------------------------------------------------


class _Alarm(Exception):
    pass


def test_signal_handler_exception_interrupts_wait(linux_backend: RawBackend) -> None:
    """DESIGN.md §6.2 eintr: a Python signal handler's exception ends a blocking wait promptly."""
    import signal

    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        pytest.skip("needs setitimer on the main thread")

    def handler(signum: int, frame: object) -> None:
        raise _Alarm

    ctx = linux_backend.context()
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        started = time.monotonic()
        with pytest.raises(_Alarm):
            ctx.process_events(min_requests=1, timeout=3)
        assert time.monotonic() - started < 2.5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_harmless_signal_does_not_break_wait(linux_backend: RawBackend) -> None:
    """DESIGN.md §6.2 eintr: EINTR without a raising handler keeps waiting (no SystemError)."""
    import signal

    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        pytest.skip("needs setitimer on the main thread")
    fired = []
    ctx = linux_backend.context()
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        started = time.monotonic()
        assert ctx.process_events(min_requests=1, timeout=1) == 0
        assert time.monotonic() - started >= 0.8
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == [1]


def test_linux_aio_wait_survives_uring_teardown(uring: RawBackend) -> None:
    """Destroying an io_uring ring queues kernel task work that interrupts the
    thread's next blocking io_getevents() with EINTR; linux_aio must retry
    instead of raising SystemError(EINTR) (DESIGN.md §6.2 eintr)."""
    from helpers import MODULES

    if "linux_aio" not in MODULES:
        pytest.skip("linux_aio not available")
    ring = uring.Context()
    assert ring.process_events(min_requests=1, timeout=1) == 0
    del ring
    gc.collect()
    aio_ctx = MODULES["linux_aio"].Context()
    started = time.monotonic()
    assert aio_ctx.process_events(min_requests=1, timeout=1) == 0
    assert time.monotonic() - started >= 0.8
