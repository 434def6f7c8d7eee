"""caio.linux_aio, the raw API (DESIGN.md §3, §4.1, §4.5, §6.2, §10).

Self-contained (own fixtures); skipped where kernel AIO is unavailable.
"""

import errno
import gc
import os
import pickle
import random
import subprocess
import sys
import threading
import time
import weakref

import pytest

la = pytest.importorskip("caio.linux_aio")
Context = la.Context
Operation = la.Operation


# -- fixtures and helpers ----------------------------------------------------


@pytest.fixture
def ctx():
    c = Context()
    yield c
    c.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "data.bin")


@pytest.fixture
def fd(path):
    f = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    yield f
    os.close(f)


def disk_dir():
    """A directory on a real disk (O_DIRECT, page-cache eviction)."""
    base = os.environ.get("CAIO_TEST_DISK_DIR", "/var/tmp")
    probe = os.path.join(base, f"caio-linux-aio-probe-{os.getpid()}")
    try:
        f = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as e:
        pytest.skip(f"no O_DIRECT-capable directory ({base}: {e})")
    os.close(f)
    os.unlink(probe)
    return base


@pytest.fixture
def disk_path():
    base = disk_dir()
    p = os.path.join(base, f"caio-linux-aio-test-{os.getpid()}-{random.getrandbits(32)}")
    yield p
    if os.path.exists(p):
        os.unlink(p)


def deliver(ctx, n, timeout=10.0):
    """Process completions until n have been delivered."""
    got = 0
    deadline = time.monotonic() + timeout
    while got < n:
        assert time.monotonic() < deadline, f"only {got} of {n} completions"
        got += ctx.process_events(max_requests=max(n - got, 1), min_requests=1, timeout=1)
    return got


def run(ctx, *ops):
    assert ctx.submit(*ops) == len(ops)
    deliver(ctx, len(ops))


# -- module and type identity --------------------------------------------------


def test_module_identity():
    assert la.__doc__ == "Linux AIO c API bindings."
    assert Context.__name__ == "Context" and Context.__module__ == "builtins"
    assert issubclass(la.SubmitError, OSError) and issubclass(la.SubmitError, ValueError)
    assert "linux aio context representation" in Context.__doc__
    assert Operation.__name__ == "AIOOperation"
    assert Operation.__module__ == "aio"
    assert Operation.__doc__ == "linux aio operation representation"
    assert issubclass(la.OperationError, OSError)
    assert issubclass(la.OperationError, SystemError)


def test_types_not_subclassable_not_constructible():
    with pytest.raises(TypeError):
        Operation()
    for tp in (Context, Operation):
        with pytest.raises(TypeError):
            type("X", (tp,), {})


def test_weakref_pickle_readonly(ctx, fd):
    op = Operation.read(1, fd, 0)
    assert weakref.ref(ctx)() is ctx
    assert weakref.ref(op)() is op
    for obj in (ctx, op):
        with pytest.raises(TypeError):
            pickle.dumps(obj)
    with pytest.raises(AttributeError):
        ctx.fileno = 1
    with pytest.raises(AttributeError):
        ctx.max_requests = 1
    with pytest.raises(AttributeError):
        op.fileno = 1
    with pytest.raises(AttributeError):
        op.new_attribute = 1


def test_context_construction():
    for args, expected in (((), 32), ((0,), 32), ((1,), 1), ((64,), 64)):
        c = Context(*args)
        assert c.max_requests == expected
        assert isinstance(c.fileno, int) and c.fileno >= 0
        assert isinstance(repr(c), str) and f"max_requests={expected}" in repr(c)
        c.close()
    c = Context(max_requests=5)
    assert c.max_requests == 5
    c.close()
    with pytest.raises(TypeError):
        Context(1, 2)
    with pytest.raises(TypeError):
        Context(sqpoll=True)
    with pytest.raises(TypeError):
        Context(1.5)
    for bad in (-1, 2**32):
        with pytest.raises(OverflowError):
            Context(bad)
    # Out of the kernel's range: io_setup's own error (DESIGN.md §4.5).
    with pytest.raises(SystemError) as e:
        Context(2**30)
    assert e.value.args[0] == errno.EINVAL


def test_context_large():
    try:
        c = Context(32218)
    except SystemError as e:
        if e.args[0] == errno.EAGAIN:
            pytest.skip("fs.aio-max-nr is used by other processes right now")
        raise
    c.close()


def test_eagain_names_aio_max_nr():
    with open("/proc/sys/fs/aio-max-nr") as f:
        aio_max = int(f.read())
    # More events than the whole system-wide limit: can never fit.
    n = aio_max + 1
    with pytest.raises(SystemError) as e:
        Context(n)
    assert e.value.args[0] == errno.EAGAIN
    assert "/proc/sys/fs/aio-max-nr" in str(e.value)


# -- Operation construction and attributes (DESIGN.md §3.2, §3.3) --------


def test_operation_attributes(fd):
    w = Operation.write(b"the quick brown fox", fd, 7)
    assert (w.fileno, w.offset, w.nbytes) == (fd, 7, 19)
    assert bytes(w.payload) == b"the quick brown fox"
    assert w.context is None and w.priority == 0
    r = Operation.read(16, fd, 3)
    assert (r.fileno, r.offset, r.nbytes) == (fd, 3, 16)
    assert isinstance(r.payload, memoryview) and r.payload.readonly
    for op in (Operation.fsync(fd), Operation.fdsync(fd)):
        assert (op.offset, op.nbytes) == (0, 0)
        assert not op.payload
    for op in (w, r, Operation.fsync(fd), Operation.fdsync(fd)):
        assert isinstance(repr(op), str)
    r = Operation.read(nbytes=4, fd=fd, offset=2, priority=5)
    assert (r.nbytes, r.offset, r.priority) == (4, 2, 5)


def test_operation_ranges(fd):
    assert Operation.read(1, fd, -1).offset == 2**64 - 1
    assert Operation.read(1, -1, 0).fileno == 2**32 - 1
    assert Operation.fsync(fd, priority=-1).priority == 65535
    assert Operation.fsync(fd, priority=32767).priority == 32767
    for bad in (32768, -32769):
        with pytest.raises(OverflowError):
            Operation.fsync(fd, priority=bad)
    with pytest.raises(OverflowError):
        Operation.read(1, fd, 2**63)
    with pytest.raises(OverflowError):
        Operation.read(1, 2**32 + 5, 0)
    with pytest.raises(OverflowError):
        Operation.read(-1, fd, 0)
    with pytest.raises((OverflowError, MemoryError)):
        Operation.read(2**62, 0, 0)
    for bad in (1.5, "1", None):
        with pytest.raises(TypeError):
            Operation.read(bad, fd, 0)
    with pytest.raises(ValueError):
        Operation.write("text", fd, 0)
    assert Operation.read(True, fd).nbytes == 1


def test_failed_constructions_leak_nothing(fd):
    payload = ["not", "bytes"]
    before = sys.getrefcount(payload)
    for _ in range(500):
        with pytest.raises(TypeError):
            Operation.read("x", fd, 0)
        with pytest.raises(ValueError):
            Operation.write(payload, fd, 0)
    assert sys.getrefcount(payload) == before


def test_set_callback(fd):
    op = Operation.fsync(fd)
    assert op.set_callback(print) is True
    assert op.set_callback(callback=print) is True
    with pytest.raises(ValueError, match="not callable"):
        op.set_callback("not callable")


# -- round trips (DESIGN.md §3.5, §4.5) ----------------------------------------------


def test_write_read_roundtrip(ctx, fd):
    results = []
    w = Operation.write(b"Hello world", fd, 0)
    w.set_callback(results.append)
    run(ctx, w)
    assert w.get_value() == 11 and w.nbytes == 11 and results == [11]
    r = Operation.read(64, fd, 0)
    r.set_callback(results.append)
    run(ctx, r)
    assert r.get_value() == b"Hello world"
    assert r.nbytes == 11
    assert bytes(r.payload) == b"Hello world" + b"\0" * 53
    assert results == [11, 11]


def test_empty_ops(ctx, fd):
    r = Operation.read(0, fd, 0)
    w = Operation.write(b"", fd, 0)
    run(ctx, r, w)
    assert r.get_value() == b""
    assert w.get_value() == 0


def test_short_and_past_eof_reads(ctx, fd):
    os.pwrite(fd, b"12345", 0)
    short = Operation.read(100, fd, 0)
    past = Operation.read(10, fd, 100)
    run(ctx, short, past)
    assert short.get_value() == b"12345"
    assert past.get_value() == b"" and past.nbytes == 0


def test_batch_of_writes_then_reads(fd):
    c = Context(8)
    try:
        writes = [Operation.write(bytes([65 + i]) * 8, fd, i * 8) for i in range(4)]
        assert c.submit(*writes) == 4
        assert deliver(c, 4) == 4
        reads = [Operation.read(8, fd, i * 8) for i in range(4)]
        assert c.submit(*reads) == 4
        assert deliver(c, 4) == 4
        assert [r.get_value() for r in reads] == [bytes([65 + i]) * 8 for i in range(4)]
    finally:
        c.close()


def test_fsync_ops_return_none(ctx, fd):
    none_refs = sys.getrefcount(None)
    ops = [Operation.fsync(fd) if i % 2 else Operation.fdsync(fd) for i in range(200)]
    seen = []
    for op in ops:
        op.set_callback(seen.append)
    for i in range(0, 200, 20):
        assert ctx.submit(*ops[i : i + 20]) == 20
        deliver(ctx, 20)
    assert all(op.get_value() is None for op in ops)
    assert seen == [0] * 200
    del ops, op
    gc.collect()
    # Per-op damage would show as a drift of ~200 (None is immortal on 3.12+).
    assert abs(sys.getrefcount(None) - none_refs) < 150


def test_4000_fsyncs_in_one_submit(fd):
    c = Context(8192)
    try:
        ops = [Operation.fsync(fd) for _ in range(4000)]
        assert c.submit(*ops) == 4000
        assert deliver(c, 4000, timeout=60) == 4000
    finally:
        c.close()


# -- process_events / poll (DESIGN.md §4.5) -------------------------


def test_process_events_arguments(ctx):
    assert ctx.process_events() == 0
    assert ctx.process_events(0, 0, 0) == 0
    with pytest.raises(ValueError):
        ctx.process_events(max_requests=1, min_requests=5)
    for kwargs in (
        {"max_requests": 2**32 - 1},
        {"max_requests": -1},
        {"max_requests": 2**20 + 1},
        {"min_requests": -1},
        {"timeout": 2**31},
    ):
        with pytest.raises(OverflowError):
            ctx.process_events(**kwargs)
    with pytest.raises(TypeError):
        ctx.process_events(timeout=0.5)
    with pytest.raises(TypeError):
        ctx.process_events(bogus=1)


def test_process_events_timeout_releases_gil(ctx):
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.01)

    t = threading.Thread(target=spin)
    t.start()
    try:
        start = time.monotonic()
        assert ctx.process_events(min_requests=1, timeout=1) == 0
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        t.join()
    assert 0.9 <= elapsed < 3
    assert len(ticks) > 20  # the other thread kept running


def test_process_events_waits_for_other_thread(ctx, disk_path):
    with open(disk_path, "wb") as out:
        out.write(b"\1" * 4096)
    f = os.open(disk_path, os.O_RDWR | os.O_DIRECT)
    results = []
    op = Operation.read(4096, f, 0)
    op.set_callback(results.append)

    def later():
        time.sleep(0.3)
        ctx.submit(op)

    t = threading.Thread(target=later)
    t.start()
    try:
        start = time.monotonic()
        assert ctx.process_events(min_requests=1, timeout=-1) >= 1
        assert time.monotonic() - start >= 0.25
    finally:
        t.join()
        os.close(f)
    assert results == [4096]
    assert op.get_value() == b"\1" * 4096


def test_process_events_max_requests_limits_deliveries(ctx, fd):
    ops = [Operation.fsync(fd) for _ in range(5)]
    seen = []
    for op in ops:
        op.set_callback(seen.append)
    assert ctx.submit(*ops) == 5
    time.sleep(0.2)  # kernel fsyncs run in a workqueue
    assert ctx.process_events(max_requests=1, min_requests=1, timeout=5) == 1
    assert len(seen) == 1
    assert deliver(ctx, 4) == 4
    assert len(seen) == 5


def test_poll(ctx, fd):
    with pytest.raises(BlockingIOError):
        ctx.poll()
    run(ctx, Operation.write(b"x", fd, 0))
    assert ctx.poll() >= 1
    with pytest.raises(BlockingIOError):
        ctx.poll()


def test_poll_after_completion_without_draining(ctx, fd):
    # process_events() leaves the counter alone (upstream semantics).
    assert ctx.submit(Operation.write(b"x", fd, 0)) == 1
    assert ctx.process_events(min_requests=1, timeout=5) == 1
    assert ctx.poll() >= 1


def test_signal_during_wait_runs_handler(ctx):
    import signal

    class Boom(Exception):
        pass

    def handler(signum, frame):
        raise Boom

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        start = time.monotonic()
        with pytest.raises(Boom):
            ctx.process_events(min_requests=1, timeout=5)
        assert time.monotonic() - start < 3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- in-flight state and lifetimes (DESIGN.md §3.3, §4.1, §8.1–§8.3) -----


def test_in_flight_gating_and_context_attribute(ctx, fd):
    op = Operation.write(b"abc", fd, 0)
    assert ctx.submit(op) == 1
    assert op.context is ctx
    with pytest.raises(RuntimeError):
        op.get_value()
    with pytest.raises(RuntimeError):
        _ = op.payload
    assert op.fileno == fd
    deliver(ctx, 1)
    assert op.context is None
    assert op.get_value() == 3
    assert bytes(op.payload) == b"abc"


def test_one_shot_submission(fd):
    a, b = Context(), Context()
    try:
        seen_a, seen_b = [], []
        op = Operation.write(b"x", fd, 0)
        op.set_callback(seen_a.append)
        assert a.submit(op) == 1
        assert a.submit(op) == 0
        assert b.submit(op) == 0
        deliver(a, 1)
        assert b.process_events() == 0
        assert seen_a == [1] and seen_b == []
        assert a.submit(op) == 0  # done: one-shot
        dup = Operation.write(b"y", fd, 1)
        assert a.submit(dup, dup) == 1
        deliver(a, 1)
        assert os.pread(fd, 2, 0) == b"xy"
    finally:
        a.close()
        b.close()


def test_fresh_read_after_file_grew(ctx, fd):
    os.pwrite(fd, b"1234", 0)
    first = Operation.read(8, fd, 0)
    run(ctx, first)
    assert first.get_value() == b"1234"
    os.pwrite(fd, b"5678", 4)
    assert ctx.submit(first) == 0
    second = Operation.read(8, fd, 0)
    run(ctx, second)
    assert second.get_value() == b"12345678"


def test_type_check_before_claiming(ctx, fd):
    op = Operation.write(b"x", fd, 0)
    with pytest.raises(TypeError, match="argument 1"):
        ctx.submit(op, object())
    assert op.context is None
    assert ctx.process_events() == 0
    with pytest.raises(TypeError):
        ctx.submit([op])
    assert ctx.submit() == 0
    assert ctx.submit(op) == 1
    deliver(ctx, 1)


def test_op_keeps_context_alive_until_delivered(fd):
    c = Context()
    ref = weakref.ref(c)
    op = Operation.write(b"x", fd, 0)
    assert c.submit(op) == 1
    del c
    gc.collect()
    assert ref() is not None and op.context is ref()
    deliver(op.context, 1)
    assert op.context is None
    assert ref() is None  # freed by refcounting alone


def test_submitted_op_without_user_reference(ctx, fd):
    before = len(gc.get_objects())
    for i in range(100):
        ctx.submit(Operation.write(b"z", fd, i))
    deliver(ctx, 100)
    gc.collect()
    assert len(gc.get_objects()) < before + 50
    assert os.pread(fd, 100, 0) == b"z" * 100


def test_callback_cycle_collected(fd):
    op = Operation.fsync(fd)
    op.set_callback(lambda r: op)  # noqa: F821 (a cycle through the callback; op is deleted below)
    ref = weakref.ref(op)
    del op
    gc.collect()
    assert ref() is None


def test_refcounts_after_delivery(ctx, fd):
    op = Operation.write(b"abc", fd, 0)
    payload = op.payload
    cb = print
    op.set_callback(cb)
    before = sys.getrefcount(op), sys.getrefcount(payload)
    run(ctx, op)
    assert (sys.getrefcount(op), sys.getrefcount(payload)) == before


# -- callbacks (DESIGN.md §3.6, §6.2 aio-result) ------------------------------------------------


def test_callback_result_is_signed(ctx, fd):
    # A write beyond ext4's size limit fails at completion with EFBIG.
    results = []
    op = Operation.write(b"xy", fd, 2**62)
    op.set_callback(results.append)
    try:
        run(ctx, op)
    except ValueError:
        pytest.skip("filesystem refuses this offset at submission")
    if results == [2]:
        pytest.skip("filesystem accepts writes at 4 EiB")
    assert results[0] < 0
    with pytest.raises(SystemError) as e:
        op.get_value()
    assert isinstance(e.value, OSError) and e.value.errno == -results[0]


def test_raising_callback_does_not_stop_delivery(ctx, fd, monkeypatch):
    hooked = []
    monkeypatch.setattr(sys, "unraisablehook", hooked.append)
    seen = []

    def bad(result):
        raise ZeroDivisionError(result)

    ops = [Operation.write(b"a", fd, i) for i in range(3)]
    ops[0].set_callback(bad)
    ops[1].set_callback(seen.append)
    ops[2].set_callback(bad)
    run(ctx, *ops)
    assert seen == [1]
    assert len(hooked) == 2
    assert all(isinstance(h.exc_value, ZeroDivisionError) for h in hooked)
    assert all(op.get_value() == 1 for op in ops)


def test_reentrant_callback(ctx, fd):
    inner = []
    ops = [Operation.write(b"r", fd, i) for i in range(4)]
    refs = [sys.getrefcount(op) for op in ops]

    def cb(result):
        inner.append(ctx.process_events())

    for op in ops:
        op.set_callback(cb)
    assert ctx.submit(*ops) == 4
    time.sleep(0.05)
    assert deliver(ctx, 4) == 4
    assert len(inner) == 4 and sum(inner) == 0  # nothing delivered twice
    assert ctx.process_events() == 0
    for op in ops:
        op.set_callback(print)  # drop cb (holds no op reference anyway)
    del op
    assert [sys.getrefcount(op) for op in ops] == refs


def test_callback_submitting_more_work(ctx, fd):
    chain = []

    def cb(result):
        chain.append(result)
        if len(chain) < 5:
            nxt = Operation.write(b"c", fd, len(chain))
            nxt.set_callback(cb)
            ctx.submit(nxt)

    first = Operation.write(b"c", fd, 0)
    first.set_callback(cb)
    ctx.submit(first)
    deliver(ctx, 5)
    assert chain == [1] * 5


# -- submission errors (DESIGN.md §4.1–§4.3, §4.5) -------------------------


def test_partial_acceptance_good_bad_good(ctx, fd):
    good1 = Operation.write(b"1", fd, 0)
    bad = Operation.write(b"2", 9999, 0)
    good2 = Operation.write(b"3", fd, 1)
    assert ctx.submit(good1, bad, good2) == 1
    assert good1.context is ctx
    assert bad.context is None and good2.context is None
    deliver(ctx, 1)
    # The rolled-back ops are untouched and retryable.
    assert ctx.submit(good2) == 1
    deliver(ctx, 1)
    assert os.pread(fd, 2, 0) == b"13"
    with pytest.raises(ValueError, match="EBADF") as e:
        ctx.submit(bad)
    # SubmitError: upstream's ValueError, and an OSError with the errno.
    assert isinstance(e.value, la.SubmitError) and isinstance(e.value, OSError)
    assert e.value.errno == errno.EBADF
    assert bad.context is None


def test_first_op_refused_raises(ctx, fd, tmp_path):
    with pytest.raises(ValueError, match="EBADF"):
        ctx.submit(Operation.read(1, 9999, 0))
    ro = os.open(str(tmp_path / "ro"), os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(ValueError, match="EBADF"):
            ctx.submit(Operation.write(b"x", ro, 0))
    finally:
        os.close(ro)
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="EINVAL"):
            ctx.submit(Operation.read(10, r, -1))
    finally:
        os.close(r)
        os.close(w)
    assert ctx._in_flight == 0


# -- files kernel AIO cannot do: the workers give the system call's answer -----


def special_ops(tmp_path):
    """(op, check) pairs for files without a kernel AIO path: io_submit
    refuses each with EINVAL although pread/pwrite work or fail otherwise."""
    d = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    full = os.open("/dev/full", os.O_WRONLY)
    status = os.open("/proc/self/status", os.O_RDONLY)
    fds = [d, full, status]

    def fails(code):
        def check(op):
            with pytest.raises(OSError) as e:
                op.get_value()
            assert e.value.errno == code, e.value
            assert isinstance(e.value, la.OperationError)

        return check

    def status_text(op):
        assert op.get_value().startswith(b"Name:\t")

    pairs = [
        (Operation.read(16, d, 0), fails(errno.EISDIR)),
        (Operation.write(b"x" * 16, full, 0), fails(errno.ENOSPC)),
        (Operation.read(4096, status, 0), status_text),
    ]
    return pairs, fds


@pytest.mark.parametrize("nowait", [False, True], ids=["plain", "nowait"])
def test_files_without_aio_support_go_to_workers(ctx, fd, tmp_path, nowait):
    """io_submit's EINVAL for a read/write at a valid offset means the file
    has no kernel AIO path (directory, /dev/full, /proc): the op is accepted
    and a worker's pread/pwrite gives the true result, also inside a batch."""
    ctx._set_nowait(nowait)
    pairs, fds = special_ops(tmp_path)
    try:
        for op, check in pairs:
            run(ctx, op)
            check(op)
        # In one batch between good ops: nothing is refused or rolled back.
        pairs, more = special_ops(tmp_path)
        fds += more
        os.pwrite(fd, b"data", 100)
        batch = [Operation.write(b"first", fd, 0)]
        for i, (op, _) in enumerate(pairs):
            batch += [op, Operation.write(b"between", fd, 10 * (i + 1))]
        batch.append(Operation.read(4, fd, 100))
        run(ctx, *batch)
        for op, check in pairs:
            check(op)
        assert batch[-1].get_value() == b"data"
        assert os.pread(fd, 37, 0) == b"first\0\0\0\0\0" + b"between\0\0\0" * 2 + b"between"
        assert ctx._in_flight == 0
    finally:
        for f in fds:
            os.close(f)


def test_genuine_einval_still_refused_at_submit(ctx, fd):
    """A bad position (pread says EINVAL too) and fsync of a file without
    fsync (fsync(2) says EINVAL too) stay upstream's submit-time errors; a
    refused op in a batch still ends the accepted prefix."""
    os.pwrite(fd, b"data", 0)
    for bad in (Operation.read(4, fd, -1), Operation.write(b"x", fd, -2)):
        with pytest.raises(la.SubmitError) as e:
            ctx.submit(bad)
        assert e.value.errno == errno.EINVAL and "invalid offset" in str(e.value)
        assert bad.context is None
    r, w = os.pipe()
    try:
        with pytest.raises(la.SubmitError) as e:
            ctx.submit(Operation.fsync(w))
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    good = Operation.read(4, fd, 0)
    assert ctx.submit(good, Operation.read(4, fd, -1), Operation.read(4, fd, 0)) == 1
    deliver(ctx, 1)
    assert good.get_value() == b"data"
    assert ctx._in_flight == 0


def test_more_ops_than_capacity(fd):
    c = Context(1)
    ops = [Operation.fsync(fd) for _ in range(64 * 1)] + [
        Operation.write(b"w", fd, i) for i in range(1000)
    ]
    accepted = c.submit(*ops)
    assert 0 < accepted < len(ops)
    assert c._in_flight == accepted
    assert all(op.context is c for op in ops[:accepted])
    assert all(op.context is None for op in ops[accepted:])
    deliver(c, accepted)
    # Nothing accepted at all: a clear OverflowError; the op stays retryable.
    rest = ops[accepted:]
    n = 0
    while rest:
        k = c.submit(*rest)
        if k == 0:
            break
        deliver(c, k)
        n += k
        rest = rest[k:]
    assert not rest
    assert all(op.context is None for op in ops)
    assert os.pread(fd, 1000, 0) == b"w" * 1000
    c.close()


def test_capacity_exhausted_overflow_error(fd):
    c = Context(1)
    try:
        accepted = c.submit(*[Operation.fsync(fd) for _ in range(4096)])
        op = Operation.fsync(fd)
        with pytest.raises(OverflowError, match="EAGAIN"):
            c.submit(op)
        assert op.context is None
        deliver(c, accepted)
        assert c.submit(op) == 1
        deliver(c, 1)
    finally:
        c.close()


# -- cancel (DESIGN.md §4.5) ----------------------------------------------


def test_cancel(fd):
    a, b = Context(), Context()
    try:
        op_a = Operation.write(b"a", fd, 0)
        op_b = Operation.write(b"b", fd, 1)
        assert a.submit(op_a) == 1 and b.submit(op_b) == 1
        with pytest.raises(ValueError):
            a.cancel(op_b)  # another Context's op
        with pytest.raises(ValueError):
            a.cancel(operation=op_a)  # regular-file I/O cannot be cancelled
        with pytest.raises(ValueError):
            a.cancel(Operation.fsync(fd))  # never submitted
        with pytest.raises(TypeError):
            a.cancel(object())
        with pytest.raises(TypeError):
            a.cancel()
        deliver(a, 1)
        deliver(b, 1)
        assert op_a.get_value() == 1 and op_b.get_value() == 1
        with pytest.raises(ValueError):
            a.cancel(op_a)  # completed
    finally:
        a.close()
        b.close()


# -- close() (extension) -------------------------------------------------------------


def ring_address(c):
    """The kernel context id (the address its completion ring is mapped at)."""
    return int(repr(c).split("ctx=")[1].split(",")[0].rstrip(">"))


def ring_mapped(address):
    with open("/proc/self/maps") as f:
        for line in f:
            if "[aio]" in line and int(line.split("-")[0], 16) == address:
                return True
    return False


def wait_unmapped(address, timeout=5.0):
    """close() hands io_destroy to a helper thread (it blocks ~30 ms in an
    RCU wait); the ring disappears as soon as the helper has called it."""
    deadline = time.monotonic() + timeout
    while ring_mapped(address) and time.monotonic() < deadline:
        time.sleep(0.001)
    return not ring_mapped(address)


def test_close_idle_releases_everything(fd):
    c = Context()
    address = ring_address(c)
    assert ring_mapped(address)
    efd = c.fileno
    c.close()
    assert wait_unmapped(address)
    assert c.fileno == -1 and c.closed
    with pytest.raises(OSError):
        os.fstat(efd)
    with pytest.raises(RuntimeError):
        c.submit(Operation.fsync(fd))
    with pytest.raises(RuntimeError):
        c.poll()
    with pytest.raises(ValueError):  # like any op not in flight here
        c.cancel(Operation.fsync(fd))
    assert c.process_events() == 0
    assert c.process_events(min_requests=1, timeout=1) == 0
    c.close()  # idempotent
    assert "closed" in repr(c)


def test_close_with_operations_in_flight(fd):
    c = Context()
    address = ring_address(c)
    ops = [Operation.write(b"q", fd, i) for i in range(10)]
    assert c.submit(*ops) == 10
    c.close()
    assert c.fileno != -1  # still draining
    assert ring_mapped(address)
    with pytest.raises(RuntimeError):
        c.submit(Operation.fsync(fd))
    deliver(c, 10)
    assert [op.get_value() for op in ops] == [1] * 10
    assert c.fileno == -1
    assert wait_unmapped(address)


def test_dealloc_releases_kernel_context():
    addresses = []
    for _ in range(50):
        addresses.append(ring_address(Context()))
    gc.collect()
    assert all(wait_unmapped(a) for a in addresses)


# -- O_DIRECT (DESIGN.md §10; aligned windows, write policy) -----------------------------


@pytest.fixture
def direct_file(disk_path):
    data = os.urandom(256 * 1024)
    with open(disk_path, "wb") as f:
        f.write(data)
    fd = os.open(disk_path, os.O_RDWR | os.O_DIRECT)
    yield fd, data
    os.close(fd)


def test_direct_reads_any_offset_and_length(ctx, direct_file):
    fd, data = direct_file
    cases = [
        (4096, 0),
        (4096, 8192),
        (1, 0),
        (100, 7),
        (5000, 4095),
        (65536, 12345),
        (512, 512),
        (0, 3),
        (10, len(data) - 4),
        (100, len(data) + 5),
    ]
    ops = [Operation.read(n, fd, off) for n, off in cases]
    run(ctx, *ops)
    for (n, off), op in zip(cases, ops, strict=True):
        value = op.get_value()
        assert isinstance(value, bytes)
        assert value == data[off : off + n], (n, off)


def test_direct_aligned_write(ctx, direct_file):
    fd, data = direct_file
    payload = os.urandom(8192)
    w = Operation.write(payload, fd, 4096)
    run(ctx, w)
    assert w.get_value() == 8192
    r = Operation.read(8192, fd, 4096)
    run(ctx, r)
    assert r.get_value() == payload
    assert bytes(w.payload) == payload  # the caller's bytes are untouched


def test_direct_unaligned_write_refused(ctx, direct_file):
    fd, _ = direct_file
    op = Operation.write(b"x" * 100, fd, 4096)
    with pytest.raises(OSError) as e:
        ctx.submit(op)
    assert e.value.errno == errno.EINVAL and isinstance(e.value, la.SubmitError)
    assert "aligned to" in str(e.value) and "O_DIRECT" in str(e.value)
    assert op.context is None and ctx._in_flight == 0
    # In a batch, like any refused op: the accepted prefix is returned.
    good = Operation.write(b"y" * 4096, fd, 0)
    assert ctx.submit(good, Operation.write(b"z" * 10, fd, 3)) == 1
    deliver(ctx, 1)
    assert good.get_value() == 4096
    assert ctx.submit(Operation.write(b"", fd, 3)) == 1  # nothing to align
    deliver(ctx, 1)


def test_direct_in_nowait_mode(disk_path):
    # O_DIRECT gets RWF_NOWAIT too: an extending write (block allocation) is
    # refused by ext4/xfs with EAGAIN and finished by a worker thread.
    fd = os.open(disk_path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    c = Context()
    c._set_nowait(True)
    try:
        blocks = [os.urandom(4096) for _ in range(16)]
        ws = [Operation.write(b, fd, i * 4096) for i, b in enumerate(blocks)]
        run(c, *ws)
        assert [w.get_value() for w in ws] == [4096] * 16
        rs = [Operation.read(4096, fd, i * 4096) for i in range(16)]
        run(c, *rs)
        assert [r.get_value() for r in rs] == blocks
        odd = Operation.read(5000, fd, 1000)
        run(c, odd)
        assert odd.get_value() == b"".join(blocks)[1000:6000]
        with pytest.raises(OSError):
            c.submit(Operation.write(b"x", fd, 0))
    finally:
        c.close()
        os.close(fd)


# -- event-loop mode: RWF_NOWAIT + worker threads ----------------------------------


def evict(fd):
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def test_nowait_mode_cold_reads_and_writes(disk_path):
    data = os.urandom(1 << 20)
    with open(disk_path, "wb") as f:
        f.write(data)
    fd = os.open(disk_path, os.O_RDWR)
    c = Context(64)
    c._set_nowait(True)
    try:
        evict(fd)
        # A page-spanning read that is half cached: continued by a worker.
        os.pread(fd, 4096, 8192)
        offsets = [random.randrange(len(data) - 5000) for _ in range(60)]
        ops = [Operation.read(5000, fd, off) for off in offsets]
        ops.append(Operation.read(4096 * 3, fd, 4096 + 100))
        offsets.append(4096 + 100)
        assert c.submit(*ops) == len(ops)
        deliver(c, len(ops))
        for off, op in zip(offsets, ops, strict=True):
            assert op.get_value() == data[off : off + op.nbytes]
            assert op.nbytes == len(op.get_value())
        # Short read at the end of the file stays short.
        tail = Operation.read(100, fd, len(data) - 10)
        run(c, tail)
        assert tail.get_value() == data[-10:]
        # Buffered writes (ext4 refuses them with RWF_NOWAIT) still work.
        ws = [Operation.write(b"%05d" % i, fd, i * 5) for i in range(50)]
        run(c, *ws)
        assert all(w.get_value() == 5 for w in ws)
        assert os.pread(fd, 250, 0) == b"".join(b"%05d" % i for i in range(50))
    finally:
        c.close()
        os.close(fd)


def test_nowait_mode_cold_file_goes_straight_to_workers(disk_path):
    # After a run of refusals, reads skip the kernel attempt (its readahead
    # submission can sleep on a busy device) and are done by the workers,
    # except for periodic probes; results are the same either way.
    data = os.urandom(4 << 20)
    with open(disk_path, "wb") as f:
        f.write(data)
    fd = os.open(disk_path, os.O_RDONLY)
    c = Context(64)
    c._set_nowait(True)
    try:
        evict(fd)
        rnd = random.Random(9)
        for _ in range(200):
            off = rnd.randrange(len(data) - 9000)
            n = rnd.choice((1, 100, 4096, 9000))
            op = Operation.read(n, fd, off)
            run(c, op)
            assert op.get_value() == data[off : off + n]
        # Now cached: served inline again (still correct).
        for _ in range(100):
            off = rnd.randrange(len(data) - 4096)
            op = Operation.read(4096, fd, off)
            run(c, op)
            assert op.get_value() == data[off : off + 4096]
    finally:
        c.close()
        os.close(fd)


def test_nowait_mode_errors_match_plain_mode(ctx, tmp_path):
    ctx._set_nowait(True)
    d = os.open(str(tmp_path), os.O_RDONLY)
    try:
        op = Operation.read(10, d, 0)
        run(ctx, op)
        with pytest.raises(OSError) as e:
            op.get_value()
        assert e.value.errno == errno.EISDIR
    finally:
        os.close(d)
    with pytest.raises(ValueError, match="EBADF"):
        ctx.submit(Operation.read(10, 9999, 0))
    # tmpfs files cannot do RWF_NOWAIT: submitted the classic way.
    if not os.path.isdir("/dev/shm"):
        return
    shm = f"/dev/shm/caio-linux-aio-{os.getpid()}"
    st = os.open(shm, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        w = Operation.write(b"tmpfs data", st, 0)
        run(ctx, w)
        op = Operation.read(4096, st, 0)
        run(ctx, op)
        assert op.get_value() == b"tmpfs data"
    finally:
        os.close(st)
        os.unlink(shm)


# -- many threads ---------------------------------------------------------------------


def test_threads_submit_and_drain_concurrently(fd):
    c = Context(256)
    c._set_nowait(True)
    n_threads, per_thread = 4, 250
    seen = []
    lock = threading.Lock()

    def cb(result):
        with lock:
            seen.append(result)

    def submitter(k):
        for i in range(per_thread):
            op = Operation.write(b"%d" % k, fd, k * per_thread + i)
            op.set_callback(cb)
            while True:
                try:
                    if c.submit(op) == 1:
                        break
                except OverflowError:  # completion ring full: drainers catch up
                    pass
                time.sleep(0.001)

    stop = threading.Event()
    delivered = []

    def drainer():
        n = 0
        while not stop.is_set() or c._in_flight:
            n += c.process_events(min_requests=1, timeout=1)
        delivered.append(n)

    drainers = [threading.Thread(target=drainer) for _ in range(2)]
    submitters = [threading.Thread(target=submitter, args=(k,)) for k in range(n_threads)]
    for t in drainers + submitters:
        t.start()
    for t in submitters:
        t.join()
    stop.set()
    for t in drainers:
        t.join()
    c.close()
    assert sum(delivered) == n_threads * per_thread == len(seen)
    assert seen == [1] * len(seen)
    content = os.pread(fd, n_threads * per_thread, 0)
    assert content == b"".join(b"%d" % k * per_thread for k in range(n_threads))


def test_same_op_raced_to_many_contexts(fd):
    # DESIGN.md §8.1, §9.1: the claim is atomic; exactly one Context wins.
    n_threads, rounds = 4, 200
    contexts = [Context(64) for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads)
    shared = [None]
    accepted = [0] * rounds
    calls = [0] * rounds
    lock = threading.Lock()

    def racer(k):
        c = contexts[k]
        for r in range(rounds):
            if k == 0:
                op = Operation.write(b"r", fd, r)

                def cb(result, r=r):
                    with lock:
                        calls[r] += 1

                op.set_callback(cb)
                shared[0] = op
            barrier.wait()
            n = c.submit(shared[0])
            with lock:
                accepted[r] += n
            barrier.wait()
            if n:
                deliver(c, 1)

    threads = [threading.Thread(target=racer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in contexts:
        assert c.process_events() == 0
        c.close()
    assert accepted == [1] * rounds
    assert calls == [1] * rounds


# -- many operations with random cancellations ------------------------------------


def test_10000_operations_with_random_cancel_attempts(fd):
    rnd = random.Random(12345)
    c = Context(128)
    c._set_nowait(True)
    block = 64
    n = 10000
    expected = bytearray(block * n)
    ops = []
    pending = 0
    for i in range(n):
        payload = bytes([rnd.randrange(256)]) * block
        expected[i * block : (i + 1) * block] = payload
        op = Operation.write(payload, fd, i * block)
        ops.append(op)
        while True:
            try:
                if c.submit(op) == 1:
                    break
            except OverflowError:  # the completion ring is full
                pass
            pending -= c.process_events(min_requests=1, timeout=1)
        pending += 1
        if rnd.random() < 0.3:
            target = ops[rnd.randrange(len(ops))]
            with pytest.raises((ValueError, SystemError)):
                c.cancel(target)
        if rnd.random() < 0.1:
            pending -= c.process_events()
    while pending:
        pending -= c.process_events(min_requests=1, timeout=5)
    assert all(op.get_value() == block for op in ops)
    assert os.pread(fd, block * n, 0) == bytes(expected)
    reads = [Operation.read(block, fd, i * block) for i in rnd.sample(range(n), 500)]
    assert c.submit(*reads[:100]) == 100
    deliver(c, 100)
    for r in reads[:100]:
        i = r.offset // block
        assert r.get_value() == bytes(expected[i * block : (i + 1) * block])
    c.close()


# -- fork and import-time checks ------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_forked_child_refuses_parent_context(ctx, fd):
    code = r"""
import os, sys
import caio.linux_aio as la
c = la.Context()
fd = os.open(sys.argv[1], os.O_RDWR)
pid = os.fork()
if pid == 0:
    try:
        c.submit(la.Operation.fsync(fd))
    except RuntimeError as e:
        os._exit(0 if "fork" in str(e) else 2)
    os._exit(1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    path = f"/proc/self/fd/{fd}"
    p = subprocess.run(
        [sys.executable, "-c", code, os.readlink(path)], capture_output=True, text=True, timeout=60
    )
    assert p.stdout.strip() == "0", p.stderr


# The CAIO_TEST_AIO_* hooks are honoured only by builds with the test-hooks cargo feature
# (make develop); release wheels ignore them.
needs_test_hooks = pytest.mark.skipif(
    not la._TEST_HOOKS,
    reason="built without the test-hooks cargo feature (CAIO_TEST_HOOKS=1): CAIO_TEST_* unread",
)


def import_in_subprocess(env):
    code = "import caio.linux_aio"
    full_env = dict(os.environ, **env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=60
    )


@needs_test_hooks
@pytest.mark.parametrize(
    "err, words",
    [
        (errno.ENOSYS, ["ENOSYS", "seccomp", "seccomp=unconfined"]),
        (errno.EAGAIN, ["EAGAIN", "/proc/sys/fs/aio-max-nr"]),
        (errno.EPERM, ["EPERM"]),
        (errno.EIO, ["probe failed"]),
    ],
)
def test_import_fails_cleanly_when_probe_fails(err, words):
    p = import_in_subprocess({"CAIO_TEST_AIO_PROBE_ERRNO": str(err)})
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:"), p.stderr
    for w in words:
        assert w in last, last


@needs_test_hooks
def test_import_fails_on_old_kernel():
    p = import_in_subprocess({"CAIO_TEST_AIO_KERNEL_RELEASE": "4.17.0-old"})
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "4.18" in last and "4.17.0-old" in last
    p = import_in_subprocess({"CAIO_TEST_AIO_KERNEL_RELEASE": "4.18.0-ok"})
    assert p.returncode == 0, p.stderr


@needs_test_hooks
def test_package_falls_back_when_probe_fails():
    code = (
        "import caio, sys\n"
        "print(getattr(caio, 'linux_aio', 'missing'))\n"
        "print(caio.AsyncioContext is not None)\n"
    )
    env = dict(os.environ, CAIO_TEST_AIO_PROBE_ERRNO=str(errno.ENOSYS))
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split()
    assert lines[0] in ("None", "missing")
    assert lines[1] == "True"


@pytest.mark.skipif(la._TEST_HOOKS, reason="this build honours the test hooks")
def test_release_builds_ignore_the_test_hooks():
    p = import_in_subprocess(
        {"CAIO_TEST_AIO_PROBE_ERRNO": str(errno.ENOSYS), "CAIO_TEST_AIO_KERNEL_RELEASE": "4.9.0"}
    )
    assert p.returncode == 0, p.stderr
