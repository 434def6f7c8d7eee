"""caio.linux_uring, raw API (DESIGN.md §3, §4.1, §4.4, §6.2).

Self-contained: own fixtures, skipped when io_uring is unavailable.
"""

import errno
import gc
import os
import pickle
import re
import signal
import sys
import threading
import time
import weakref

import pytest

linux_uring = pytest.importorskip("caio.linux_uring")
Context = linux_uring.Context
Operation = linux_uring.Operation

IMMORTAL_NONE = sys.version_info >= (3, 12)


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


@pytest.fixture
def ctx():
    c = Context(64)
    yield c
    # Deliver whatever the test left behind (keeps refcounts sane).
    c.flush()
    c.process_events()


def run(ctx, *ops, timeout=5):
    """Submit, flush and wait until every op was delivered."""
    got = []
    for op in ops:
        op.set_callback(got.append)
    assert ctx.submit(*ops) == len(ops)
    ctx.flush()
    deadline = time.monotonic() + timeout
    while len(got) < len(ops):
        assert time.monotonic() < deadline, "operations did not complete"
        ctx.process_events(min_requests=1, timeout=1)
    return got


def drain(ctx, n, timeout=5):
    delivered = ctx.flush()
    deadline = time.monotonic() + timeout
    while delivered < n:
        assert time.monotonic() < deadline
        delivered += ctx.process_events(min_requests=1, timeout=1)
    return delivered


# -- module and types ------------------------------------------------------


def test_module_identity():
    assert linux_uring.__doc__ == "io_uring based AIO backend (Linux 5.6+)."
    assert isinstance(linux_uring.SQPOLL_ALLOWED, bool)
    assert Context.__name__ == "Context"
    assert "io_uring AIO context" in Context.__doc__
    assert Operation.__doc__ == "io_uring AIO operation"
    assert "linux_uring.Operation" in repr(Operation)
    assert issubclass(linux_uring.OperationError, OSError)
    assert issubclass(linux_uring.OperationError, SystemError)


def test_types_are_final_and_not_instantiable(fd):
    with pytest.raises(TypeError):
        Operation()
    for tp in (Context, Operation):
        with pytest.raises(TypeError):
            type("X", (tp,), {})
    op = Operation.read(1, fd, 0)
    weakref.ref(op)
    weakref.ref(Context())
    with pytest.raises(TypeError):
        pickle.dumps(op)
    with pytest.raises(TypeError):
        pickle.dumps(Context())
    with pytest.raises(AttributeError):
        op.fileno = 3
    with pytest.raises(AttributeError):
        op.new_attr = 1
    c = Context()
    for name in ("fileno", "max_requests", "sqpoll"):
        with pytest.raises(AttributeError):
            setattr(c, name, 1)


# -- DESIGN.md §3.3, §3.7, §4.4: construction, repr, fresh attributes --------------------


@pytest.mark.parametrize("n", [0, 1, 2, 31, 32218, 32767])
def test_context_sizes(n):
    c = Context(n)
    assert c.max_requests == (n or 32)
    assert isinstance(repr(c), str)
    assert c.sqpoll == 0
    assert isinstance(c.sqpoll, int)
    assert isinstance(c.fileno, int) and c.fileno >= 0


def test_context_bad_sizes():
    with pytest.raises(SystemError) as e:
        Context(32768)
    assert e.value.args[0] == errno.EINVAL
    with pytest.raises(OverflowError):
        Context(-1)
    with pytest.raises(OverflowError):
        Context(2**32)
    with pytest.raises(TypeError):
        Context(1.5)
    with pytest.raises(TypeError):
        Context(1, False, 3)


def test_context_repr():
    c = Context(7)
    r = repr(c)
    assert r.startswith("<Context as 0x")
    assert "max_requests=7" in r and f"eventfd={c.fileno}" in r and "sqpoll=0" in r


def test_sqpoll_negotiation():
    c = Context(4, sqpoll=True)
    assert c.sqpoll == int(linux_uring.SQPOLL_ALLOWED)
    assert Context(4, sqpoll=[]).sqpoll == 0  # truthiness


def test_fresh_operations(fd):
    w = Operation.write(b"the quick brown fox", fd, 7)
    assert (w.fileno, w.offset, w.nbytes) == (fd, 7, 19)
    assert bytes(w.payload) == b"the quick brown fox"
    assert w.get_value() == 0
    r = Operation.read(16, fd, 3)
    assert (r.fileno, r.offset, r.nbytes) == (fd, 3, 16)
    assert r.get_value() == b"\0" * 16 and r.payload == b"\0" * 16
    for op in (Operation.fsync(fd), Operation.fdsync(fd)):
        assert op.offset == 0 and op.nbytes == 0 and not op.payload
        assert op.get_value() is None
        assert op.result == 0 and op.error == 0 and op.context is None
    for op in (w, r, Operation.fsync(fd), Operation.fdsync(fd)):
        assert isinstance(repr(op), str)
    assert 'mode="read"' in repr(r) and "offset=3" in repr(r)
    assert 'mode="fsync"' in repr(Operation.fsync(fd)) and "0x(nil)" in repr(Operation.fsync(fd))
    assert not hasattr(r, "priority")


def test_keyword_constructors(fd):
    op = Operation.read(nbytes=4, fd=fd, offset=2, priority=1)
    assert op.nbytes == 4 and op.offset == 2
    op = Operation.write(payload_bytes=b"x", fd=fd)
    assert op.offset == 0
    Operation.fsync(fd=fd, priority=3)
    with pytest.raises(TypeError):
        Operation.read(1, fd, 0, 0, 0)
    with pytest.raises(TypeError):
        Operation.read(1)
    with pytest.raises(TypeError):
        Operation.read(1, fd, bogus=1)


# -- hostile input (DESIGN.md §6.2 wrap) -------------------------------------------


def test_hostile_integers(fd):
    with pytest.raises(OverflowError):
        Operation.read(1, 2**32 + 5, 0)
    with pytest.raises(OverflowError):
        Operation.read(2**64, fd, 0)
    with pytest.raises(OverflowError):
        Operation.read(2**32, fd, 0)
    with pytest.raises(OverflowError):
        Operation.read(-1, fd, 0)
    with pytest.raises(OverflowError):
        Operation.read(1, fd, 2**64)
    with pytest.raises(OverflowError):
        Operation.read(1, fd, -2)
    with pytest.raises(OverflowError):
        Operation.write(b"x", 2**32 + 5, 0)
    with pytest.raises(OverflowError):
        Operation.fsync(-(2**31) - 1)
    for bad in (1.5, "1", None):
        with pytest.raises(TypeError):
            Operation.read(bad, fd, 0)
        with pytest.raises(TypeError):
            Operation.read(1, bad, 0)
    # fd -1 is accepted (fails later with EBADF) and shown unsigned.
    assert Operation.read(1, -1, 0).fileno == 2**32 - 1
    # offset -1 means "current position" (pipes).
    assert Operation.read(1, fd, -1).offset == 2**64 - 1
    assert Operation.read(True, fd, 0).nbytes == 1


def test_read_huge_raises_cleanly(fd):
    with pytest.raises((OverflowError, MemoryError)):
        Operation.read(2**62, 0, 0)


def test_bad_fd_completes_with_ebadf(ctx):
    op = Operation.read(1, -1, 0)
    (res,) = run(ctx, op)
    assert res == -errno.EBADF and op.error == errno.EBADF
    op = Operation.read(1, 9999, 0)
    (res,) = run(ctx, op)
    assert res == -errno.EBADF


def test_failed_constructions_leak_nothing(fd):
    payload = ["not", "bytes"]
    before = sys.getrefcount(payload)
    for _ in range(50):
        with pytest.raises(ValueError):
            Operation.write(payload, fd, 0)
    assert sys.getrefcount(payload) == before
    gc.collect()
    n = len(gc.get_objects())
    for _ in range(500):
        with pytest.raises(TypeError):
            Operation.read("x", fd, 0)
    gc.collect()
    assert len(gc.get_objects()) <= n + 10


def test_set_callback(fd):
    op = Operation.read(1, fd, 0)
    with pytest.raises(ValueError):
        op.set_callback("not callable")
    assert op.set_callback(print) is True
    with pytest.raises(TypeError):
        op.set_callback(callback=print)  # positional only on uring


# -- DESIGN.md §3.5, §4.4: basic I/O ---------------------------------------------


def test_write_read_roundtrip(ctx, fd):
    w = Operation.write(b"hello world", fd, 0)
    assert run(ctx, w) == [11]
    assert w.get_value() == 11 and w.result == 11 and w.error == 0
    assert w.payload == b"hello world" and w.nbytes == 11
    r = Operation.read(11, fd, 0)
    assert run(ctx, r) == [11]
    assert r.get_value() == b"hello world"
    assert r.get_value() is r.payload  # full read: the very same object
    assert r.nbytes == 11 and r.context is None


def test_empty_read_and_write(ctx, fd):
    r = Operation.read(0, fd, 0)
    w = Operation.write(b"", fd, 0)
    assert sorted(run(ctx, r, w)) == [0, 0]
    assert r.get_value() == b"" and w.get_value() == 0


def test_read_past_eof(ctx, fd):
    os.pwrite(fd, b"abc", 0)
    r = Operation.read(10, fd, 100)
    assert run(ctx, r) == [0]
    assert r.get_value() == b"" and r.nbytes == 0


def test_short_read(ctx, fd):
    os.pwrite(fd, b"12345", 0)
    r = Operation.read(100, fd, 0)
    assert run(ctx, r) == [5]
    assert r.get_value() == b"12345"
    assert r.payload == b"12345" + b"\0" * 95
    assert r.nbytes == 5


def test_short_read_tail_is_zero(ctx, fd):
    # DESIGN.md §8.4: the unfilled part never shows stale heap bytes.
    garbage = [os.urandom(65536) for _ in range(64)]
    del garbage
    os.pwrite(fd, b"x" * 10, 0)
    for _ in range(20):
        r = Operation.read(65536, fd, 0)
        run(ctx, r)
        assert r.payload == b"x" * 10 + b"\0" * (65536 - 10)


def test_four_writes_four_reads(fd):
    ctx = Context(8)
    writes = [Operation.write(bytes([65 + i]) * 4, fd, i * 4) for i in range(4)]
    got = []
    for w in writes:
        w.set_callback(got.append)
    assert ctx.submit(*writes) == 4
    drain(ctx, 4)
    assert got == [4] * 4
    reads = [Operation.read(4, fd, i * 4) for i in range(4)]
    assert ctx.submit(*reads) == 4
    drain(ctx, 4)
    assert [r.get_value() for r in reads] == [bytes([65 + i]) * 4 for i in range(4)]


def test_fsync_fdsync(ctx, fd):
    ops = [Operation.fsync(fd), Operation.fdsync(fd)]
    assert run(ctx, *ops) == [0, 0]
    assert [op.get_value() for op in ops] == [None, None]


def test_many_fsyncs_none_refcount(ctx, fd):
    if not IMMORTAL_NONE:
        before = sys.getrefcount(None)
    ops = [Operation.fsync(fd) for _ in range(200)]
    drain_all = []
    for op in ops:
        op.set_callback(drain_all.append)
    for i in range(0, 200, 50):
        ctx.submit(*ops[i : i + 50])
        drain(ctx, 50)
    assert all(op.get_value() is None for op in ops)
    del ops, drain_all
    gc.collect()
    if not IMMORTAL_NONE:
        assert abs(sys.getrefcount(None) - before) < 50


def test_4000_fsyncs_one_submit(fd):
    ctx = Context(8192)
    ops = [Operation.fsync(fd) for _ in range(4000)]
    assert ctx.submit(*ops) == 4000
    drain(ctx, 4000, timeout=60)
    assert all(op.error == 0 and op.get_value() is None for op in ops)


def test_large_mixed_batch(fd):
    ctx = Context(4096)
    data = os.urandom(4096 * 16)
    os.pwrite(fd, data, 0)
    ops = [Operation.read(4096, fd, (i % 16) * 4096) for i in range(10000)]
    for i in range(0, 10000, 2000):
        assert ctx.submit(*ops[i : i + 2000]) == 2000
        drain(ctx, 2000)
    for i, op in enumerate(ops):
        assert op.get_value() == data[(i % 16) * 4096 :][:4096]


# -- DESIGN.md §3.3, §4.4: process_events, poll, in-flight gating ----------------


def test_process_events_argument_checks(ctx):
    with pytest.raises(ValueError):
        ctx.process_events(max_requests=1, min_requests=5)
    with pytest.raises(TypeError):
        ctx.process_events(timeout=0.5)
    with pytest.raises(OverflowError):
        ctx.process_events(timeout=2**31)
    assert ctx.process_events(max_requests=-1) == 0  # upstream: -1 = 2**32-1
    with pytest.raises(OverflowError):
        ctx.process_events(max_requests=-2)
    with pytest.raises(OverflowError):
        ctx.process_events(max_requests=2**32)
    assert ctx.process_events() == 0
    assert ctx.process_events(0, 0, 0) == 0


def test_process_events_timeout_releases_gil():
    ctx = Context(4)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.01)

    t = threading.Thread(target=ticker)
    t.start()
    t0 = time.monotonic()
    assert ctx.process_events(min_requests=1, timeout=1) == 0
    el = time.monotonic() - t0
    stop.set()
    t.join()
    assert 0.95 <= el < 3
    assert len(ticks) > 20


def test_process_events_blocks_until_other_thread_op_completes(pipe):
    r, w = pipe
    ctx = Context(4)
    op = Operation.read(3, r, -1)
    got = []
    op.set_callback(got.append)

    def other():
        time.sleep(0.2)
        ctx.submit(op)
        ctx.flush()
        time.sleep(0.2)
        os.write(w, b"abc")

    t = threading.Thread(target=other)
    t.start()
    t0 = time.monotonic()
    n = ctx.process_events(min_requests=1, timeout=-1)
    t.join()
    assert n >= 1 and got == [3] and op.get_value() == b"abc"
    assert 0.3 < time.monotonic() - t0 < 5


def test_process_events_min_requests_timeout_zero(ctx, fd):
    ops = [Operation.fsync(fd) for _ in range(3)]
    ctx.submit(*ops)
    ctx.flush()
    deadline = time.monotonic() + 5
    n = 0
    while n < 3 and time.monotonic() < deadline:
        n += ctx.process_events(max_requests=10, min_requests=1, timeout=0)
    assert n == 3


def test_poll(ctx, fd):
    with pytest.raises(BlockingIOError):
        ctx.poll()
    os.pwrite(fd, b"cached", 0)
    op = Operation.read(6, fd, 0)
    ctx.submit(op)
    assert ctx.flush() == 1  # page-cache hit: completed inline
    assert ctx.poll() > 0  # ... and it still signalled the eventfd
    with pytest.raises(BlockingIOError):
        ctx.poll()


def test_in_flight_gating(ctx, pipe):
    r, w = pipe
    op = Operation.read(3, r, -1)
    got = []
    op.set_callback(got.append)
    ctx.submit(op)
    with pytest.raises(RuntimeError):
        _ = op.payload
    with pytest.raises(RuntimeError):
        op.get_value()
    assert op.context is ctx
    ctx.flush()
    with pytest.raises(RuntimeError):
        op.get_value()
    os.write(w, b"xyz")
    ctx.process_events(min_requests=1, timeout=5)
    assert got == [3] and op.get_value() == b"xyz" and op.payload == b"xyz"
    assert op.context is None


def test_max_requests_one_exactly_one_callback(fd):
    # DESIGN.md §4.4 (drain): 5 ready completions, max_requests=1 delivers one.
    ctx = Context(8)
    ops = [Operation.write(b"a", fd, i) for i in range(5)]
    got = []
    for op in ops:
        op.set_callback(got.append)
    ctx.submit(*ops)
    ctx_flush_no_drain(ctx)  # in the kernel, nothing delivered yet
    time.sleep(0.5)
    assert got == []
    assert ctx.process_events(max_requests=1) == 1
    assert len(got) == 1
    n = 1
    deadline = time.monotonic() + 5
    while n < 5 and time.monotonic() < deadline:
        n += ctx.process_events(min_requests=1, timeout=1)
    assert n == 5 and got == [1] * 5


def ctx_flush_no_drain(ctx):
    # process_events(min_requests=1, timeout=0) enters the kernel with
    # GETEVENTS but does not submit; flush() submits and drains. To submit
    # without draining, use a re-entrant trick: a callback-free cancel of an
    # op that is in flight elsewhere submits everything staged (DESIGN.md §6.2 cancel-submit).
    other = Context(2)
    r, w = os.pipe()
    try:
        blocker = Operation.read(1, r, -1)
        other.submit(blocker)
        other.flush()
        ctx.cancel(blocker)  # submits all staged SQEs of ctx, + an ENOENT sentinel
        other.cancel(blocker)
        other.process_events(min_requests=1, timeout=5)
    finally:
        os.close(r)
        os.close(w)


# -- DESIGN.md §4.1, §4.2, §4.4: capacity, cancel, one-shot ---------------------------


def test_ring_full_raises_and_keeps_earlier(fd):
    ctx = Context(1)  # SQ capacity 2
    ops = [Operation.write(b"x", fd, i) for i in range(256)]
    with pytest.raises(OverflowError):
        ctx.submit(*ops)
    staged = [op for op in ops if op.context is ctx]
    assert len(staged) == 2 and staged[0] is ops[0]
    for op in ops[2:]:
        assert op.context is None
        assert op.get_value() == 0  # back to NEW
    got = []
    ops[0].set_callback(got.append)
    drain(ctx, 2)
    assert got == [1]
    fresh = Operation.write(b"y", fd, 0)
    assert run(ctx, fresh) == [1]
    # A rolled-back op is fully retryable.
    assert run(ctx, ops[5]) == [1]


def test_ring_full_huge_batch_context_destructible(fd):
    ctx = Context(4)
    ops = [Operation.fsync(fd) for _ in range(64 * 4)]
    with pytest.raises(OverflowError):
        ctx.submit(*ops)
    drain(ctx, 8)
    ref = weakref.ref(ctx)
    del ctx
    gc.collect()
    assert ref() is None


def test_cancel_blocked_pipe_read(ctx, pipe):
    r, _ = pipe
    op = Operation.read(10, r, -1)
    got = []
    op.set_callback(got.append)
    ctx.submit(op)
    ctx.flush()
    assert ctx.cancel(op) == 0
    drain(ctx, 1)
    assert got == [-errno.ECANCELED]
    assert op.error == errno.ECANCELED and op.result == -errno.ECANCELED
    with pytest.raises(SystemError) as e:
        op.get_value()
    assert isinstance(e.value, OSError) and e.value.errno == errno.ECANCELED
    assert "canceled" in str(e.value).lower()


def test_cancel_keyword_and_several(ctx, pipe):
    r, _ = pipe
    a, b = Operation.read(1, r, -1), Operation.read(1, r, -1)
    ctx.submit(a, b)
    ctx.flush()
    assert ctx.cancel(operation=a) == 0
    assert ctx.cancel(b) == 0
    drain(ctx, 2)
    assert a.error == b.error == errno.ECANCELED
    with pytest.raises(TypeError):
        ctx.cancel(object())
    with pytest.raises(TypeError):
        ctx.cancel()


def test_cancel_before_flush(ctx, pipe):
    # DESIGN.md §4.4 and §6.2 cancel-submit: the cancel submits what is staged.
    r, _ = pipe
    op = Operation.read(10, r, -1)
    got = []
    op.set_callback(got.append)
    ctx.submit(op)
    ctx.cancel(op)
    drain(ctx, 1)
    assert got == [-errno.ECANCELED]


def test_cancel_never_raises_for_state(ctx, fd):
    fresh = Operation.read(1, fd, 0)
    assert ctx.cancel(fresh) == 0
    done = Operation.read(1, fd, 0)
    run(ctx, done)
    assert ctx.cancel(done) == 0
    assert ctx.flush() == 0


def test_cancel_op_of_other_context(pipe):
    r, w = pipe
    a, b = Context(4), Context(4)
    op = Operation.read(3, r, -1)
    got = []
    op.set_callback(got.append)
    a.submit(op)
    a.flush()
    assert b.cancel(op) == 0
    time.sleep(0.05)
    assert b.process_events() == 0  # the ENOENT sentinel is not a completion
    os.write(w, b"abc")
    a.process_events(min_requests=1, timeout=5)
    assert got == [3] and op.get_value() == b"abc"


def test_sentinels_do_not_count_toward_min_requests(pipe):
    # DESIGN.md §6.2 cancel-count: a cancel CQE must not satisfy min_requests.
    r, _ = pipe
    a, b = Context(4), Context(4)
    op = Operation.read(1, r, -1)
    a.submit(op)
    a.flush()
    b.cancel(op)  # produces only a sentinel CQE on b
    t0 = time.monotonic()
    assert b.process_events(min_requests=1, timeout=1) == 0
    assert time.monotonic() - t0 >= 0.9
    a.cancel(op)
    drain(a, 1)


def test_submit_twice_and_two_contexts(fd):
    os.pwrite(fd, b"data", 0)
    a, b = Context(4), Context(4)
    op = Operation.read(4, fd, 0)
    got = []
    op.set_callback(got.append)
    assert a.submit(op) == 1
    assert a.submit(op) == 0
    assert b.submit(op) == 0
    assert b.flush() == 0
    drain(a, 1)
    assert got == [4]
    assert a.submit(op) == 0  # one-shot
    op2 = Operation.read(4, fd, 0)
    assert a.submit(op2, op2) == 1
    drain(a, 1)
    assert op2.get_value() == b"data"


def test_fresh_read_after_growth(ctx, fd):
    os.pwrite(fd, b"1234", 0)
    op = Operation.read(8, fd, 0)
    run(ctx, op)
    assert op.get_value() == b"1234"
    os.pwrite(fd, b"5678", 4)
    assert ctx.submit(op) == 0
    op2 = Operation.read(8, fd, 0)
    run(ctx, op2)
    assert op2.get_value() == b"12345678" and op2.nbytes == 8


def test_write_to_closed_fd_then_repaired(ctx, path):
    f = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.close(f)
    op = Operation.write(b"abc", f, 0)
    run(ctx, op)
    assert op.error != 0
    with pytest.raises(SystemError):
        op.get_value()
    assert ctx.submit(op) == 0
    f2 = os.open(path, os.O_RDWR)
    try:
        op2 = Operation.write(b"abc", f2, 0)
        run(ctx, op2)
        assert op2.error == 0 and op2.get_value() == 3
    finally:
        os.close(f2)


def test_write_to_readonly_fd(ctx, path):
    open(path, "wb").close()
    f = os.open(path, os.O_RDONLY)
    try:
        op = Operation.write(b"abc", f, 0)
        (res,) = run(ctx, op)
        assert res == -errno.EBADF
    finally:
        os.close(f)


def test_read_directory(ctx, tmp_path):
    d = os.open(str(tmp_path), os.O_RDONLY)
    try:
        op = Operation.read(10, d, 0)
        (res,) = run(ctx, op)
        assert res == -errno.EISDIR
        with pytest.raises(SystemError, match="Is a directory"):
            op.get_value()
    finally:
        os.close(d)


def test_submit_type_checks(ctx, fd):
    op = Operation.read(1, fd, 0)
    with pytest.raises(TypeError):
        ctx.submit(op, object())
    assert op.context is None
    with pytest.raises(TypeError):
        ctx.submit([op])
    assert ctx.submit() == 0
    assert ctx.submit(op) == 1
    drain(ctx, 1)


def test_flush_with_nothing_staged_does_not_drain(ctx, fd):
    # DESIGN.md §6.2 flush-empty: kept; completions stay for process_events.
    op = Operation.fsync(fd)
    got = []
    op.set_callback(got.append)
    ctx.submit(op)
    ctx_flush_no_drain(ctx)
    time.sleep(0.2)
    assert ctx.flush() == 0
    assert got == []
    ctx.process_events(min_requests=1, timeout=5)
    assert got == [0]


def test_reentrant_process_events_in_callback(ctx, fd):
    # DESIGN.md §4.4 (drain).
    op = Operation.fsync(fd)
    inner = []
    op.set_callback(lambda res: inner.append(ctx.process_events()))
    before = sys.getrefcount(op)
    ctx.submit(op)
    drain(ctx, 1)
    assert inner == [0]
    assert sys.getrefcount(op) == before


def test_reentrant_submit_from_callback(ctx, fd):
    os.pwrite(fd, b"0123456789", 0)
    results = []

    def chain(i):
        def cb(res):
            results.append((i, res))
            if i < 20:
                nxt = Operation.read(1, fd, i % 10)
                nxt.set_callback(chain(i + 1))
                ctx.submit(nxt)
                ctx.flush()

        return cb

    first = Operation.read(1, fd, 0)
    first.set_callback(chain(0))
    ctx.submit(first)
    ctx.flush()
    deadline = time.monotonic() + 5
    while len(results) < 21 and time.monotonic() < deadline:
        ctx.process_events(min_requests=1, timeout=1)
    assert [i for i, _ in results] == list(range(21))
    assert all(res == 1 for _, res in results)


def test_callback_exception_goes_to_unraisablehook(ctx, fd, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    ops = [Operation.fsync(fd) for _ in range(3)]
    got = []
    ops[0].set_callback(lambda r: 1 / 0)
    ops[1].set_callback(got.append)
    ops[2].set_callback(got.append)
    ctx.submit(*ops)
    drain(ctx, 3)
    assert got == [0, 0]
    assert len(seen) == 1 and seen[0].exc_type is ZeroDivisionError


# -- DESIGN.md §8.2, §8.3, §8.4, §4.4: lifetime ----------------------------------


def test_op_keeps_context_alive(pipe):
    r, w = pipe
    ctx = Context(4)
    ref = weakref.ref(ctx)
    op = Operation.read(1, r, -1)
    ctx.submit(op)
    ctx.flush()
    assert op.context is ctx
    del ctx
    gc.collect()
    assert ref() is not None
    os.write(w, b"x")
    op.context.process_events(min_requests=1, timeout=5)
    assert op.context is None
    assert ref() is None  # freed by refcounting alone
    assert op.get_value() == b"x"


def _fill_pipe(w):
    """Fills the pipe behind `w` (which stays non-blocking): a write waits."""
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"\0" * 65536)
    except BlockingIOError:
        pass


def test_blocked_write_on_full_pipe_keeps_context(pipe):
    # DESIGN.md §8.3.
    r, w = pipe
    _fill_pipe(w)
    ctx = Context(4)
    ref = weakref.ref(ctx)
    op = Operation.write(b"tail", w, -1)
    ctx.submit(op)
    ctx.flush()
    del ctx
    gc.collect()
    assert ref() is not None and op.context is not None
    os.set_blocking(r, False)
    try:
        while os.read(r, 1 << 20):
            pass
    except BlockingIOError:
        pass
    deadline = time.monotonic() + 5
    while op.context is not None and time.monotonic() < deadline:
        op.context.process_events(min_requests=1, timeout=1)
    gc.collect()
    assert ref() is None
    assert op.get_value() == 4


def test_callback_cycle_collected(fd):
    op = Operation.read(1, fd, 0)
    holder = [op]
    op.set_callback(lambda r, h=holder: h)
    ref = weakref.ref(op)
    del op, holder
    assert ref() is not None
    gc.collect()
    assert ref() is None


def test_completed_read_value_is_stable(ctx, fd):
    os.pwrite(fd, b"A" * 64, 0)
    op = Operation.read(64, fd, 0)
    run(ctx, op)
    v = op.get_value()
    h = hash(v)
    os.pwrite(fd, b"B" * 64, 0)
    op2 = Operation.read(64, fd, 0)
    run(ctx, op2)
    assert v == b"A" * 64 and hash(v) == h
    assert op2.get_value() == b"B" * 64 and op2.get_value() is not v


def test_context_used_from_another_thread(fd):
    holder = {}
    t = threading.Thread(target=lambda: holder.setdefault("ctx", Context(8)))
    t.start()
    t.join()
    ctx = holder["ctx"]
    os.pwrite(fd, b"thread", 0)
    out = []

    def work():
        op = Operation.read(6, fd, 0)
        out.extend(run(ctx, op))
        out.append(op.get_value())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert out == [6, b"thread"]


def test_context_dropped_with_op_in_flight_runs_no_callback(pipe):
    r, w = pipe
    ctx = Context(4)
    op = Operation.read(1, r, -1)
    called = []
    op.set_callback(called.append)
    ctx.submit(op)
    ctx.flush()
    del ctx
    gc.collect()
    os.write(w, b"x")
    time.sleep(0.1)
    gc.collect()
    assert called == []
    # Deliver to clean up.
    op.context.process_events(min_requests=1, timeout=5)
    assert called == [1]


# -- concurrency -------------------------------------------------------------


def test_concurrent_process_events_waiters(pipe):
    # Several threads blocked on one ring: one completion wakes them all
    # (whoever consumes the eventfd passes the wake-up on).
    r, w = pipe
    ctx = Context(8)
    ops = [Operation.read(1, r, -1) for _ in range(2)]
    got = []
    for op in ops:
        op.set_callback(got.append)
    ctx.submit(*ops)
    ctx.flush()
    woke = []

    def waiter():
        ctx.process_events(min_requests=1, timeout=10)
        woke.append(time.monotonic())

    threads = [threading.Thread(target=waiter) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t_write = time.monotonic()
    os.write(w, b"a")
    for t in threads:
        t.join()
    assert len(woke) == 4
    assert max(woke) - t_write < 2  # nobody missed the wake-up
    assert got == [1]
    os.write(w, b"b")
    ctx.process_events(min_requests=1, timeout=5)
    assert got == [1, 1]


def test_many_threads_cancel_distinct_pipe_reads(pipe):
    r, _ = pipe
    ctx = Context(256)
    ops = [Operation.read(1, r, -1) for _ in range(64)]
    got = {}
    for i, op in enumerate(ops):
        op.set_callback(lambda res, i=i: got.setdefault(i, []).append(res))
    ctx.submit(*ops)
    ctx.flush()
    results = []

    def canceller(chunk):
        for op in chunk:
            results.append(ctx.cancel(op))

    threads = [threading.Thread(target=canceller, args=(ops[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0] * 64
    drain(ctx, 64)
    assert all(v == [-errno.ECANCELED] for v in got.values()) and len(got) == 64


def test_threads_submit_to_one_context(fd):
    ctx = Context(1024)
    errors = []

    def submitter(base):
        try:
            for i in range(16):
                op = Operation.write(b"abcd", fd, (base * 16 + i) * 4)
                while True:
                    try:
                        ctx.submit(op)
                        break
                    except OverflowError:
                        time.sleep(0.001)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drain(ctx, 128)
    assert not errors
    assert os.pread(fd, 512, 0) == b"abcd" * 128


# -- signals (DESIGN.md §6.2 eintr) -----------------------------------------------------------


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need the main thread"
)
def test_signal_handler_exception_interrupts_wait():
    ctx = Context(4)

    class Boom(Exception):
        pass

    def handler(signum, frame):
        raise Boom

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t0 = time.monotonic()
        with pytest.raises(Boom):
            ctx.process_events(min_requests=1, timeout=-1)
        assert time.monotonic() - t0 < 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need the main thread"
)
def test_signal_handler_runs_during_wait_and_wait_continues():
    ctx = Context(4)
    calls = []
    old = signal.signal(signal.SIGALRM, lambda s, f: calls.append(time.monotonic()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t0 = time.monotonic()
        assert ctx.process_events(min_requests=1, timeout=1) == 0
        end = time.monotonic()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(calls) == 1
    assert calls[0] - t0 < 0.6  # ran during the wait, not after it
    assert end - t0 >= 0.95


# -- DESIGN.md §6.2 uring-4g: huge writes are partial, never truncated to 32 bits -----------------


def test_write_4gib_payload_is_partial_not_truncated(ctx):
    try:
        payload = bytes(2**32 + 1)  # calloc'ed: pages are never touched
    except MemoryError:
        pytest.skip("cannot allocate 4 GiB of address space")
    f = os.open("/dev/null", os.O_WRONLY)
    try:
        op = Operation.write(payload, f, 0)
        assert op.nbytes == 2**32 + 1
        (res,) = run(ctx, op)
        assert res == 0x7FFFF000
        assert op.get_value() == 0x7FFFF000
    finally:
        os.close(f)
        del payload


# -- fork ---------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # io_uring kernel threads
def test_context_refuses_work_after_fork(fd):
    ctx = Context(4)
    op = Operation.fsync(fd)
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        for call in (
            lambda: ctx.submit(Operation.fsync(fd)),
            ctx.flush,
            ctx.process_events,
            ctx.poll,
            lambda: ctx.cancel(op),
        ):
            try:
                call()
                code |= 1
            except RuntimeError as e:
                if "fork" not in str(e):
                    code |= 2
            except BaseException:
                code |= 4
        fresh = Context(4)
        o = Operation.fsync(fd)
        fresh.submit(o)
        fresh.flush()
        fresh.process_events(min_requests=1, timeout=5)
        if o.error != 0:
            code |= 8
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's ring is untouched.
    assert run(ctx, op) == [0]


# -- SQPOLL --------------------------------------------------------------------


@pytest.mark.skipif(not linux_uring.SQPOLL_ALLOWED, reason="SQPOLL not permitted")
def test_sqpoll_context_io(fd, pipe):
    ctx = Context(16, sqpoll=True)
    assert ctx.sqpoll == 1
    w = Operation.write(b"sqpoll!", fd, 0)
    assert run(ctx, w) == [7]
    r = Operation.read(7, fd, 0)
    assert run(ctx, r) == [7] and r.get_value() == b"sqpoll!"
    # the SQ thread idles after 100 ms: flush must wake it
    time.sleep(0.3)
    r2 = Operation.read(3, fd, 0)
    assert run(ctx, r2) == [3]
    pr, _ = pipe
    p = Operation.read(1, pr, -1)
    ctx.submit(p)
    ctx.flush()
    time.sleep(0.05)
    ctx.cancel(p)
    drain(ctx, 1)
    assert p.error == errno.ECANCELED


# -- O_DIRECT ----------------------------------------------------------------


def _direct_fd(path, size=1 << 20):
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    try:
        return os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        pytest.skip(f"O_DIRECT unsupported here: {e}")


def test_direct_reads_any_offset_and_length(ctx, path):
    f = _direct_fd(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        cases = [
            (4096, 0),
            (4096, 8192),
            (100, 3),
            (5000, 4095),
            (1, (1 << 20) - 1),
            (8192, (1 << 20) - 100),
            (65536, 12345),
        ]
        ops = [Operation.read(n, f, off) for n, off in cases]
        res = run(ctx, *ops)
        for (n, off), op, _r in zip(cases, ops, res, strict=True):
            expect = data[off : off + n]
            assert op.get_value() == expect
            assert isinstance(op.get_value(), bytes)
        assert sorted(res) == sorted(len(data[off : off + n]) for n, off in cases)
    finally:
        os.close(f)


def test_direct_writes_from_unaligned_payloads(ctx, path):
    f = _direct_fd(path)
    try:
        payload = os.urandom(8192)
        op = Operation.write(payload, f, 4096)
        assert run(ctx, op) == [8192]
        back = Operation.read(8192, f, 4096)
        run(ctx, back)
        assert back.get_value() == payload
        # many ops on the same fd: cached as O_DIRECT, no retries needed
        ops = [Operation.write(bytes([i]) * 4096, f, i * 4096) for i in range(32)]
        assert run(ctx, *ops) == [4096] * 32
        reads = [Operation.read(4096, f, i * 4096) for i in range(32)]
        run(ctx, *reads)
        assert [r.get_value() for r in reads] == [bytes([i]) * 4096 for i in range(32)]
    finally:
        os.close(f)


def test_direct_misaligned_write_fails_with_einval(ctx, path):
    f = _direct_fd(path)
    try:
        op = Operation.write(b"abc", f, 1)
        (res,) = run(ctx, op)
        assert res == -errno.EINVAL
        with pytest.raises(OSError) as e:
            op.get_value()
        assert e.value.errno == errno.EINVAL
        assert "O_DIRECT" in str(e.value)
    finally:
        os.close(f)


def test_direct_fd_cache_entry_of_reused_fd_number_fails_nothing(ctx, path):
    # A misaligned read puts the fd into the ring's O_DIRECT cache. fd numbers
    # are reused: a pipe on the same number must work at offset -1 as on a
    # fresh Context (was: OverflowError "offset + nbytes overflows"; writes
    # computed offset + nbytes unchecked).
    f = _direct_fd(path)
    r, w = os.pipe()
    try:
        run(ctx, Operation.read(100, f, 3))  # EINVAL, retried aligned: cached
        os.dup2(w, f)  # closes the O_DIRECT file, same number
        assert run(ctx, Operation.write(b"hello", f, -1)) == [5]
        os.dup2(r, f)
        op = Operation.read(5, f, -1)
        assert run(ctx, op) == [5]
        assert op.get_value() == b"hello"
    finally:
        for x in (r, w, f):
            os.close(x)


def test_process_events_waits_past_a_retried_direct_read(ctx, path):
    # The EINVAL of a misaligned O_DIRECT read is retried through an aligned
    # window: it is not a completion, min_requests must wait for the real one.
    f = _direct_fd(path)
    try:
        with open(path, "rb") as fh:
            expect = fh.read()[3:103]
        op = Operation.read(100, f, 3)
        got = []
        op.set_callback(got.append)
        ctx.submit(op)
        ctx_flush_no_drain(ctx)  # the EINVAL CQE now waits in the ring
        n = ctx.process_events(min_requests=1, timeout=1)
        assert (n, got) == (1, [100])
        assert op.get_value() == expect
    finally:
        os.close(f)


# -- free-threading shaped stress (meaningful on 3.13t, harmless elsewhere) ---


def test_same_op_raced_to_many_contexts(fd):
    # DESIGN.md §9.1: exactly one acceptance and one callback per op.
    ctxs = [Context(64) for _ in range(4)]
    barrier = threading.Barrier(4)
    for _ in range(50):
        op = Operation.fsync(fd)
        calls = []
        op.set_callback(calls.append)
        accepted = []

        def racer(c, op=op, accepted=accepted):
            barrier.wait()
            accepted.append(c.submit(op))

        threads = [threading.Thread(target=racer, args=(c,)) for c in ctxs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(accepted) == [0, 0, 0, 1]
        owner = op.context
        drain(owner, 1)
        assert calls == [0]
    for c in ctxs:
        assert c.flush() == 0


def test_concurrent_drainers_deliver_each_completion_once(fd):
    # DESIGN.md §9.1.
    ctx = Context(1024)
    ops = [Operation.fsync(fd) for _ in range(600)]
    counts = {}
    lock = threading.Lock()

    def cb_for(i):
        def cb(res):
            with lock:
                counts[i] = counts.get(i, 0) + 1

        return cb

    for i, op in enumerate(ops):
        op.set_callback(cb_for(i))
    ctx.submit(*ops)
    ctx.flush()
    stop = time.monotonic() + 10

    def drainer():
        while len(counts) < len(ops) and time.monotonic() < stop:
            ctx.process_events(max_requests=7, min_requests=1, timeout=1)

    threads = [threading.Thread(target=drainer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(counts) == 600 and set(counts.values()) == {1}


def test_many_threads_read_one_value(ctx, fd):
    # DESIGN.md §9.1.
    data = os.urandom(4096)
    os.pwrite(fd, data, 0)
    op = Operation.read(4096, fd, 0)
    run(ctx, op)
    bad = []

    def reader():
        for _ in range(500):
            if op.get_value() != data or op.payload != data:
                bad.append(1)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_private_close_releases_the_ring_and_refuses_later_calls(tmp_fd):
    """``Context._close()`` (the adapter's close once idle, DESIGN.md §5.6):
    refused while an operation is in flight, then the ring fd and the eventfd
    are closed at once and every method raises a clear RuntimeError; a close
    from a callback running inside a drain is deferred until the drain is over."""
    ctx = Context()
    ring_fds = {ctx.fileno, int(re.search(r"uring_fd=(\d+)", repr(ctx)).group(1))}
    op = Operation.write(b"data", tmp_fd, 0)
    done = []
    op.set_callback(done.append)
    assert ctx.submit(op) == 1
    assert ctx._close() is False  # staged: its memory is the kernel's to use
    ctx.flush()
    while not done:
        ctx.process_events(min_requests=1, timeout=1)
    assert ctx._close() is True
    for fd in ring_fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(RuntimeError, match="closed"):
        ctx.submit(Operation.read(4, tmp_fd, 0))
    for call in (ctx.flush, ctx.process_events, ctx.poll, lambda: ctx.fileno):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    assert "closed" in repr(ctx)
    assert ctx._close() is True

    # Closed from a callback the drain runs: released once the drain returns.
    other = Context()
    efd = other.fileno
    seen = []

    def close_from_callback(result):
        seen.append(other._close())
        os.fstat(efd)  # still open while the drain runs

    read = Operation.read(4, tmp_fd, 0)
    read.set_callback(close_from_callback)
    assert other.submit(read) == 1
    other.flush()
    while not seen:
        other.process_events(min_requests=1, timeout=1)
    assert seen == [True]
    with pytest.raises(OSError):
        os.fstat(efd)


@pytest.mark.parametrize("kind", ["fsync", "fdsync"])
def test_sync_is_held_until_the_writes_before_it_are_done(kind):
    """DESIGN.md §4.1: a sync staged after a write to the same fd does not
    reach the kernel before that write has completed (io_uring would run them
    in any order). A write into a full pipe waits for a reader; the sync of
    the pipe (which the kernel answers with EINVAL at once) must wait for it,
    while a read on another fd is not held back."""
    r, w = os.pipe()
    other_r, other_w = os.pipe()
    ctx = Context()
    try:
        _fill_pipe(w)
        os.write(other_w, b"o")
        done = []
        write = Operation.write(b"x", w, -1)
        sync = getattr(Operation, kind)(w)
        unrelated = Operation.read(1, other_r, -1)
        write.set_callback(lambda res: done.append("write"))
        sync.set_callback(lambda res: done.append("sync"))
        unrelated.set_callback(lambda res: done.append("unrelated"))
        assert ctx.submit(write, sync, unrelated) == 3
        ctx.flush()
        while "unrelated" not in done:
            ctx.process_events(min_requests=1, timeout=1)
        # The write cannot complete while the pipe is full, so neither can
        # the sync (an unordered one would have failed with EINVAL by now).
        assert ctx.process_events(min_requests=1, timeout=1) == 0
        assert done == ["unrelated"]
        os.read(r, 65536)  # room for the write
        while len(done) < 3:
            ctx.process_events(min_requests=1, timeout=1)
        assert done == ["unrelated", "write", "sync"]
        assert write.get_value() == 1
        with pytest.raises(OSError):
            sync.get_value()
    finally:
        for f in (r, w, other_r, other_w):
            os.close(f)
