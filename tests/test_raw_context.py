"""Raw Context/Operation behaviour shared by every backend (DESIGN.md §3, §4)."""

import errno
import gc
import os
import sys
import threading
import time
import weakref

import pytest

from helpers import RawBackend, Recorder, read_file

# -- construction (DESIGN.md §4.4–§4.7) ---------------------------------------------------


def _aio_capacity() -> int:
    try:
        with open("/proc/sys/fs/aio-max-nr") as fp:
            maximum = int(fp.read())
        with open("/proc/sys/fs/aio-nr") as fp:
            used = int(fp.read())
    except OSError:
        return 0
    return maximum - used


@pytest.mark.parametrize("max_requests", [None, 1, 32218])
def test_context_constructs(backend: RawBackend, max_requests: object) -> None:
    if max_requests is None:
        ctx = backend.context()
    elif backend.is_linux_aio and max_requests > _aio_capacity() // 2:
        # Subject to fs.aio-max-nr: failing is allowed, but as SystemError.
        try:
            ctx = backend.context(max_requests)
        except SystemError:
            return
    else:
        ctx = backend.context(max_requests)
    expected = {
        None: 512 if backend.is_thread else 32,
    }.get(max_requests, max_requests)
    assert ctx.max_requests == expected


def test_context_max_requests_keyword(backend: RawBackend) -> None:
    assert backend.context(max_requests=4).max_requests == 4
    with pytest.raises(TypeError):
        backend.Context(4, bogus=1)


def test_zero_max_requests_means_default(native_backend: RawBackend) -> None:
    expected = 512 if native_backend.is_thread else 32
    assert native_backend.context(0).max_requests == expected


# -- basic I/O (DESIGN.md §3.5, §4.1) ----------------------------------------------------


def test_write_then_read(backend: RawBackend, tmp_fd: int) -> None:
    ctx = backend.context()
    write = backend.Operation.write(b"Hello world", tmp_fd, 0)
    assert backend.run_one(ctx, write) == 11
    assert write.get_value() == 11
    assert read_file(tmp_fd) == b"Hello world"

    read = backend.Operation.read(5, tmp_fd, 6)
    result = backend.run_one(ctx, read)
    assert read.get_value() == b"world"
    assert result == 5


def test_zero_length_read(backend: RawBackend, tmp_fd: int) -> None:
    os.pwrite(tmp_fd, b"data", 0)
    ctx = backend.context()
    op = backend.Operation.read(0, tmp_fd, 0)
    assert backend.run_one(ctx, op) == 0
    assert op.get_value() == b""


def test_zero_length_write(backend: RawBackend, tmp_fd: int) -> None:
    ctx = backend.context()
    op = backend.Operation.write(b"", tmp_fd, 0)
    assert backend.run_one(ctx, op) == 0
    assert op.get_value() == 0
    assert read_file(tmp_fd) == b""


def test_read_past_eof(backend: RawBackend, tmp_fd: int) -> None:
    os.pwrite(tmp_fd, b"12345", 0)
    ctx = backend.context()
    op = backend.Operation.read(10, tmp_fd, 100)
    assert backend.run_one(ctx, op) == 0
    assert op.get_value() == b""
    # Native backends report the transferred size afterwards.
    assert op.nbytes == (0 if backend.native else 10)


def test_short_read(backend: RawBackend, tmp_fd: int) -> None:
    os.pwrite(tmp_fd, b"12345", 0)
    ctx = backend.context()
    op = backend.Operation.read(100, tmp_fd, 0)
    assert backend.run_one(ctx, op) == 5
    assert op.get_value() == b"12345"
    if backend.native:
        # The buffer keeps its original size; the tail stays zero, never
        # leftover heap bytes (DESIGN.md §8.4).
        assert bytes(op.payload) == b"12345" + b"\0" * 95
        assert op.nbytes == 5
    else:
        assert bytes(op.payload) == b"12345"


def test_full_read_nbytes(backend: RawBackend, tmp_fd: int) -> None:
    os.pwrite(tmp_fd, b"abcdefgh", 0)
    ctx = backend.context()
    op = backend.Operation.read(8, tmp_fd, 0)
    backend.run_one(ctx, op)
    assert op.nbytes == 8
    assert bytes(op.payload) == b"abcdefgh"


def test_batch_of_writes_then_reads(backend: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §4.1: 4 writes, then 4 reads, one submit each."""
    ctx = backend.context(8)
    Op = backend.Operation
    chunks = [bytes([65 + i]) * 16 for i in range(4)]
    writes = [Op.write(chunk, tmp_fd, i * 16) for i, chunk in enumerate(chunks)]
    assert backend.run(ctx, *writes) == [16] * 4
    reads = [Op.read(16, tmp_fd, i * 16) for i in range(4)]
    assert backend.run(ctx, *reads) == [16] * 4
    assert [op.get_value() for op in reads] == chunks


@pytest.mark.parametrize("kind", ["fsync", "fdsync"])
def test_sync_ops(backend: RawBackend, tmp_fd: int, kind: str) -> None:
    os.pwrite(tmp_fd, b"dirty", 0)
    ctx = backend.context()
    op = getattr(backend.Operation, kind)(tmp_fd)
    result = backend.run_one(ctx, op)
    assert result == (None if backend.is_python else 0)
    assert op.get_value() is None


def test_large_transfer(backend: RawBackend, tmp_fd: int) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    ctx = backend.context()
    write = backend.Operation.write(payload, tmp_fd, 0)
    assert backend.run_one(ctx, write) == len(payload)
    read = backend.Operation.read(len(payload), tmp_fd, 0)
    assert backend.run_one(ctx, read) == len(payload)
    assert read.get_value() == payload


def test_sparse_write(backend: RawBackend, tmp_fd: int) -> None:
    ctx = backend.context()
    offset = 4 * 1024 * 1024
    backend.run_one(ctx, backend.Operation.write(b"!", tmp_fd, offset))
    assert os.fstat(tmp_fd).st_size == offset + 1
    read = backend.Operation.read(offset + 10, tmp_fd, 0)
    backend.run_one(ctx, read)
    value = read.get_value()
    assert len(value) == offset + 1
    assert value[-1:] == b"!"
    assert value[:-1].count(0) == offset


def test_submit_nothing(backend: RawBackend) -> None:
    assert backend.context().submit() == 0


def test_submit_rejects_wrong_types_before_claiming(
    backend: RawBackend,
    tmp_fd: int,
) -> None:
    """DESIGN.md §4.1 (every backend): nothing from a bad call is claimed."""
    ctx = backend.context()
    op = backend.Operation.write(b"abc", tmp_fd, 0)
    expected = ValueError if backend.is_python else TypeError
    for bad in (object(), [op], None):
        with pytest.raises(expected):
            ctx.submit(op, bad)
    with pytest.raises(TypeError):
        ctx.submit(op=op)
    assert backend.run_one(ctx, op) == 3


def test_submit_rejects_other_backends_operations(
    backend: RawBackend,
    tmp_fd: int,
) -> None:
    from helpers import MODULES

    ctx = backend.context()
    expected = ValueError if backend.is_python else TypeError
    for name, module in MODULES.items():
        if name == backend.name:
            continue
        with pytest.raises(expected):
            ctx.submit(module.Operation.fsync(tmp_fd))


def test_submit_message_has_no_literal_format(backend: RawBackend) -> None:
    """DESIGN.md §6.2 msg-format: error messages must not contain an unformatted '%r'."""
    ctx = backend.context()
    with pytest.raises((TypeError, ValueError)) as excinfo:
        ctx.submit(object())
    assert "%r" not in str(excinfo.value)


# -- one-shot semantics (DESIGN.md §4.1) ---------------------------------------------


def test_submit_twice_counts_once(backend: RawBackend, tmp_fd: int) -> None:
    ctx = backend.context()
    calls = Recorder()
    op = backend.Operation.write(b"once", tmp_fd, 0)
    op.set_callback(calls)
    first = ctx.submit(op)
    second = ctx.submit(op)
    assert (first, second) == (1, 0)
    backend.wait_for(ctx, lambda: len(calls) >= 1)
    backend.drive(ctx)
    assert len(calls) == 1
    assert ctx.submit(op) == 0  # completed: one-shot


def test_same_op_to_two_contexts(backend: RawBackend, tmp_fd: int) -> None:
    first, second = backend.context(), backend.context()
    calls = Recorder()
    op = backend.Operation.write(b"xy", tmp_fd, 0)
    op.set_callback(calls)
    assert first.submit(op) == 1
    assert second.submit(op) == 0
    backend.wait_for(first, lambda: len(calls) >= 1)
    backend.drive(second)
    backend.drive(first)
    assert calls.items == [2]


def test_same_op_twice_in_one_call(backend: RawBackend, tmp_fd: int) -> None:
    ctx = backend.context()
    calls = Recorder()
    op = backend.Operation.write(b"abc", tmp_fd, 0)
    op.set_callback(calls)
    assert ctx.submit(op, op) == 1
    backend.wait_for(ctx, lambda: len(calls) >= 1)
    backend.drive(ctx)
    assert len(calls) == 1
    assert read_file(tmp_fd) == b"abc"


def test_completed_op_is_not_resubmitted(backend: RawBackend, tmp_fd: int) -> None:
    os.pwrite(tmp_fd, b"1234", 0)
    ctx = backend.context()
    op = backend.Operation.read(8, tmp_fd, 0)
    backend.run_one(ctx, op)
    assert op.get_value() == b"1234"
    os.pwrite(tmp_fd, b"5678", 4)
    assert ctx.submit(op) == 0
    assert op.get_value() == b"1234"
    fresh = backend.Operation.read(8, tmp_fd, 0)
    backend.run_one(ctx, fresh)
    assert fresh.get_value() == b"12345678"


def test_handed_out_bytes_never_change(backend: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §3.5, §8.4: each completed read owns its buffer."""
    os.pwrite(tmp_fd, b"A" * 64, 0)
    ctx = backend.context()
    first = backend.Operation.read(64, tmp_fd, 0)
    backend.run_one(ctx, first)
    value = first.get_value()
    value_hash = hash(value)
    os.pwrite(tmp_fd, b"B" * 64, 0)
    second = backend.Operation.read(64, tmp_fd, 0)
    backend.run_one(ctx, second)
    assert value == b"A" * 64 and hash(value) == value_hash
    assert first.get_value() == b"A" * 64
    assert second.get_value() == b"B" * 64
    assert second.get_value() is not value


# -- errors (DESIGN.md §3.5, §4.3, §6.2 errtype/thread-fields) ------------------------------


def _failing_op(backend: RawBackend, fd: int, ctx: object) -> object:
    """Run a read on ``fd`` that fails at completion; returns the op."""
    op = backend.Operation.read(16, fd, 0)
    result = backend.run_one(ctx, op)
    if backend.is_uring:
        assert result == -errno.EBADF
        assert (op.result, op.error) == (-errno.EBADF, errno.EBADF)
    elif backend.is_thread:
        assert result == -1
        assert op.error == errno.EBADF
    else:
        assert result is None
    return op


def test_bad_fd(backend: RawBackend, closed_fd: int) -> None:
    ctx = backend.context()
    if backend.is_linux_aio:
        # linux_aio reports it from io_submit(); the claim is rolled back.
        op = backend.Operation.read(16, closed_fd, 0)
        with pytest.raises(ValueError):
            ctx.submit(op)
        return

    op = _failing_op(backend, closed_fd, ctx)
    with pytest.raises(OSError) as excinfo:
        op.get_value()
    assert excinfo.value.errno == errno.EBADF
    # A failed operation is still one-shot.
    assert ctx.submit(op) == 0


def test_native_errors_are_system_and_os_errors(
    completion_error_backend: RawBackend,
    closed_fd: int,
) -> None:
    """DESIGN.md §6.2 errtype: catchable as SystemError (compatibility) and OSError with errno."""
    native_backend = completion_error_backend
    ctx = native_backend.context()
    op = _failing_op(native_backend, closed_fd, ctx)
    with pytest.raises(SystemError):
        op.get_value()
    with pytest.raises(OSError) as excinfo:
        op.get_value()
    assert isinstance(excinfo.value, SystemError)
    assert excinfo.value.errno == errno.EBADF
    assert excinfo.value.strerror == os.strerror(errno.EBADF)
    # DESIGN.md §6.2 thread-fields: a failed read keeps its requested size.
    assert op.nbytes == 16
    # payload is readable after completion (no in-flight gate).
    _ = op.payload


def test_python_error_is_original_oserror(
    python_aio: RawBackend,
    closed_fd: int,
) -> None:
    ctx = python_aio.context()
    op = python_aio.Operation.read(16, closed_fd, 0)
    assert python_aio.run_one(ctx, op) is None
    with pytest.raises(OSError) as excinfo:
        op.get_value()
    assert type(excinfo.value) is OSError
    assert excinfo.value.errno == errno.EBADF
    assert op.written == 0
    assert op.exception is excinfo.value


def test_read_directory(backend: RawBackend, tmp_path: object) -> None:
    fd = os.open(str(tmp_path), os.O_RDONLY)
    try:
        ctx = backend.context()
        op = backend.Operation.read(16, fd, 0)
        # linux_aio too: io_submit refuses a directory (EINVAL), a worker's
        # pread() gives the true errno.
        backend.run_one(ctx, op)
        with pytest.raises(OSError) as excinfo:
            op.get_value()
        assert excinfo.value.errno == errno.EISDIR
        if backend.native:
            assert isinstance(excinfo.value, SystemError)
        else:
            assert isinstance(excinfo.value, IsADirectoryError)
    finally:
        os.close(fd)


def test_write_to_read_only_fd(backend: RawBackend, tmp_path: object) -> None:
    path = str(tmp_path / "ro.bin")
    with open(path, "wb"):
        pass
    fd = os.open(path, os.O_RDONLY)
    try:
        ctx = backend.context()
        op = backend.Operation.write(b"nope", fd, 0)
        if backend.is_linux_aio:
            with pytest.raises(ValueError):
                ctx.submit(op)
            return
        backend.run_one(ctx, op)
        with pytest.raises(OSError) as excinfo:
            op.get_value()
        assert excinfo.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_negative_offset(backend: RawBackend, tmp_fd: int) -> None:
    """Offset -1 on a regular file: accepted by the constructor, fails at
    execution (EINVAL) -- except on uring, where -1 means "current position".
    """
    os.pwrite(tmp_fd, b"abcdef", 0)
    os.lseek(tmp_fd, 2, os.SEEK_SET)
    ctx = backend.context()
    op = backend.Operation.read(3, tmp_fd, -1)
    if backend.is_uring:
        backend.run_one(ctx, op)
        assert op.get_value() == b"cde"
        return
    if backend.is_linux_aio:
        with pytest.raises(ValueError):
            ctx.submit(op)
        return
    backend.run_one(ctx, op)
    with pytest.raises(OSError) as excinfo:
        op.get_value()
    assert excinfo.value.errno == errno.EINVAL


# -- callbacks (DESIGN.md §3.6) ------------------------------------------------------------


def test_callback_thread(backend: RawBackend, tmp_fd: int) -> None:
    ctx = backend.context()
    threads = []
    ops = [backend.Operation.fsync(tmp_fd) for _ in range(8)]
    for op in ops:
        op.set_callback(lambda _: threads.append(threading.current_thread()))
    assert ctx.submit(*ops) == 8
    backend.wait_for(ctx, lambda: len(threads) == 8)
    if backend.is_linux:
        # Delivered synchronously by flush()/process_events() on the caller.
        assert set(threads) == {threading.current_thread()}
    else:
        assert threading.current_thread() not in threads
    if backend.is_python:
        # All on the pool's single result-handler thread.
        assert len(set(threads)) == 1


def test_op_is_done_when_callback_runs(backend: RawBackend, tmp_fd: int) -> None:
    os.pwrite(tmp_fd, b"payload!", 0)
    ctx = backend.context()
    seen = []
    op = backend.Operation.read(8, tmp_fd, 0)

    def callback(result: object) -> None:
        seen.append((result, op.get_value(), bytes(op.payload)))
        if backend.is_linux:
            seen.append(op.context)

    op.set_callback(callback)
    assert ctx.submit(op) == 1
    backend.wait_for(ctx, lambda: seen)
    assert seen[0] == (8, b"payload!", b"payload!")
    if backend.is_linux:
        assert seen[1] is None


def test_no_callback_is_fine(backend: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §3.6: an operation without callback completes."""
    ctx = backend.context()
    op = backend.Operation.write(b"12345", tmp_fd, 0)
    assert ctx.submit(op) == 1
    backend.wait_for(ctx, lambda: read_file(tmp_fd) == b"12345")

    def finished() -> bool:
        try:
            return op.get_value() == 5
        except RuntimeError:  # still in flight (native gate)
            return False

    backend.wait_for(ctx, finished)


def test_callback_installed_after_delivery_is_never_called(
    backend: RawBackend,
    tmp_fd: int,
) -> None:
    ctx = backend.context()
    op = backend.Operation.write(b"x", tmp_fd, 0)
    backend.run_one(ctx, op)
    late = Recorder()
    op.set_callback(late)
    other = backend.Operation.write(b"y", tmp_fd, 1)
    backend.run_one(ctx, other)  # gives the backend time to misbehave
    assert late.items == []


def test_raising_callback_is_reported_and_delivery_continues(
    backend: RawBackend,
    tmp_fd: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Native: sys.unraisablehook; python_aio: threading.excepthook."""
    reports = []
    if backend.is_python:
        monkeypatch.setattr(threading, "excepthook", reports.append)
    else:
        monkeypatch.setattr(sys, "unraisablehook", reports.append)

    ctx = backend.context()
    results = Recorder()
    failing = backend.Operation.write(b"first", tmp_fd, 0)
    failing.set_callback(lambda _: 1 / 0)
    following = backend.Operation.write(b"second", tmp_fd, 5)
    following.set_callback(results)
    assert ctx.submit(failing, following) == 2
    backend.wait_for(ctx, lambda: len(results) == 1 and reports)
    assert len(reports) == 1
    assert reports[0].exc_type is ZeroDivisionError
    if backend.is_python:
        assert isinstance(reports[0].thread, threading.Thread)

    # Later operations are still delivered.
    later = backend.Operation.write(b"third", tmp_fd, 11)
    assert backend.run_one(ctx, later) == 5
    assert read_file(tmp_fd) == b"firstsecondthird"
    assert len(reports) == 1


# -- capacity (DESIGN.md §4.2) ------------------------------------------------


def test_flood_beyond_capacity(backend: RawBackend, fast_fd: int) -> None:
    """DESIGN.md §4.2: 64 x max_requests ops in one submit()."""
    ctx = backend.context(1, **({"pool_size": 1} if not backend.is_linux else {}))
    calls = Recorder()
    ops = [backend.Operation.fsync(fast_fd) for _ in range(64)]
    for op in ops:
        op.set_callback(calls)
    if backend.is_linux_aio:
        accepted = ctx.submit(*ops)
        assert 0 <= accepted <= len(ops)
    else:
        with pytest.raises((OverflowError, RuntimeError)):
            ctx.submit(*ops)

    def settled() -> bool:
        if not backend.native:
            return ctx._in_progress == 0  # noqa: F821 (used before the del ctx below)
        for op in ops:
            try:
                op.get_value()
            except RuntimeError:  # still in flight
                return False
        return True

    backend.wait_for(ctx, settled, what="accepted ops to finish")
    backend.drive(ctx)
    # DONE is published before the callback runs (DESIGN.md §3.6, §8.1): on a
    # free-threaded build the last callbacks may still be running when
    # get_value() already works. Count once the number stops changing.
    count, deadline = -1, time.monotonic() + 10
    while len(calls) != count and time.monotonic() < deadline:
        count = len(calls)
        time.sleep(0.05)
    accepted_count = len(calls)
    assert 1 <= accepted_count < 64 or backend.is_linux_aio
    # The rejected ones were rolled back and are retryable now.
    retry = ops[accepted_count:][:1]
    if retry:
        assert ctx.submit(*retry) == 1
        backend.wait_for(ctx, lambda: len(calls) == accepted_count + 1)
    # ...and the Context is still destructible.
    ref = weakref.ref(ctx)
    backend.cleanup()
    del ctx
    gc.collect()
    assert ref() is None


def test_many_sync_ops_in_one_submit(backend: RawBackend, fast_fd: int) -> None:
    """DESIGN.md §4.1: 4000 fsync ops in one submit() (max_requests=8192)."""
    if backend.is_linux_aio and _aio_capacity() < 8192:
        pytest.skip("fs.aio-max-nr too small for this host")
    ctx = backend.context(8192)
    ops = [backend.Operation.fsync(fast_fd) for _ in range(4000)]
    results = backend.run(ctx, *ops, timeout=30)
    assert results == [None if backend.is_python else 0] * 4000
    assert all(op.get_value() is None for op in ops)


def test_sync_results_none_refcount(backend: RawBackend, fast_fd: int) -> None:
    """DESIGN.md §3.5: 200 fsyncs returning None do not damage None."""
    ctx = backend.context(256)
    gc.collect()
    before = sys.getrefcount(None)
    # Five rounds of 200: a bug dropping one reference per op would show as
    # -1000, far outside the noise of other threads (left over from earlier
    # tests) releasing objects that refer to None meanwhile.
    for _ in range(5):
        ops = [backend.Operation.fsync(fast_fd) for _ in range(200)]
        backend.run(ctx, *ops)
        values = [op.get_value() for op in ops]
        assert values == [None] * 200
        del values, ops
    gc.collect()
    # Only meaningful before 3.12 (immortal None), harmless after.
    assert sys.getrefcount(None) >= before - 200


# -- lifetime (DESIGN.md §8.2) ----------------------------------------------------------------


def test_fire_and_forget_submission(backend: RawBackend, tmp_fd: int) -> None:
    ctx = backend.context()
    done = threading.Event()
    op = backend.Operation.write(b"forgotten", tmp_fd, 0)
    op.set_callback(lambda _: done.set())
    ref = weakref.ref(op)
    assert ctx.submit(op) == 1
    del op
    backend.wait_for(ctx, done.is_set)
    backend.drive(ctx)
    gc.collect()
    assert ref() is None
    assert read_file(tmp_fd) == b"forgotten"


def test_inflight_op_keeps_context_alive(backend: RawBackend, tmp_fd: int) -> None:
    ctx = backend.Context()  # not tracked: the test drops it
    ctx_ref = weakref.ref(ctx)
    done = threading.Event()
    op = backend.Operation.write(b"alive", tmp_fd, 0)
    op.set_callback(lambda _: done.set())
    assert ctx.submit(op) == 1
    if backend.is_linux:
        assert op.context is ctx
    del ctx
    gc.collect()
    if backend.is_linux:
        driver = op.context
        assert driver is not None
        backend.wait_for(driver, done.is_set)
        assert op.context is None
        del driver
    else:
        backend.wait_for(None, done.is_set)
    assert op.get_value() == 5
    # The completed op no longer references its Context.
    backend.wait_for(
        None, lambda: gc.collect() is not None and ctx_ref() is None, what="context to be freed"
    )


def _self_referencing(op: object, done: threading.Event) -> object:
    # The closure cell keeps ``op`` alive: op -> callback -> cell -> op.
    op.set_callback(lambda _: (op, done.set()))
    return op


def test_operation_cycle_is_collected(backend: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §8.3: op -> callback -> op cycle, fresh and completed."""
    ctx = backend.context()
    gc.disable()
    try:
        op = _self_referencing(backend.Operation.read(16, tmp_fd, 0), threading.Event())
        fresh = weakref.ref(op)
        del op

        done = threading.Event()
        op = _self_referencing(backend.Operation.write(b"cycle", tmp_fd, 0), done)
        completed = weakref.ref(op)
        assert ctx.submit(op) == 1
        del op
        backend.wait_for(ctx, done.is_set)
        backend.drive(ctx)
        # Refcounting alone cannot free a cycle.
        assert fresh() is not None
    finally:
        gc.enable()
    backend.wait_for(
        None,
        lambda: gc.collect() is not None and fresh() is None and completed() is None,
        what="cycles to be collected",
    )


def test_read_payload_outlives_operation(backend: RawBackend, tmp_fd: int) -> None:
    """DESIGN.md §6.2 view-uaf: a read payload view stays valid after the op is gone."""
    data = os.urandom(64 * 1024)
    os.pwrite(tmp_fd, data, 0)
    ctx = backend.context()
    op = backend.Operation.read(len(data), tmp_fd, 0)
    backend.run_one(ctx, op)
    payload = op.payload
    del op
    gc.collect()
    # Churn the allocator so freed memory would be reused.
    junk = [os.urandom(64 * 1024) for _ in range(32)]
    assert bytes(payload) == data
    del junk
    if isinstance(payload, memoryview):
        assert payload.readonly
        payload.release()
