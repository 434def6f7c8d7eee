"""Free-threaded CPython (3.13t+) stress tests, DESIGN.md §9.1.

Collected only when the GIL is disabled (``sys._is_gil_enabled()`` is
False).  Set ``CAIO_TEST_FREE_THREADING=1`` to run them with the GIL as well
(useful to check the tests themselves; they are much weaker there).
"""

import errno
import os
import random
import subprocess
import sys
import sysconfig
import threading
import weakref
from typing import Any

import pytest

from helpers import (
    FREE_THREADED,
    NATIVE_MODULES,
    RawBackend,
    Recorder,
    read_file,
    subprocess_env,
)

FORCED = os.environ.get("CAIO_TEST_FREE_THREADING") == "1"

pytestmark = pytest.mark.skipif(
    not (FREE_THREADED or FORCED),
    reason="needs a free-threaded CPython with the GIL disabled",
)


def _run_threads(count: int, target: Any, *args: Any) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def wrapper(index: int) -> None:
        try:
            barrier.wait()
            target(index, *args)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrapper, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "thread hung"
    if errors:
        raise errors[0]


@pytest.mark.skipif(
    not sysconfig.get_config_var("Py_GIL_DISABLED"),
    reason="needs a free-threaded build",
)
@pytest.mark.parametrize("module", ["caio"] + ["caio." + name for name in NATIVE_MODULES])
def test_import_keeps_gil_disabled(module: str) -> None:
    """DESIGN.md §9.1: importing caio, or any native module on its own, in a
    fresh interpreter (PYTHON_GIL unset, so the default applies) leaves the
    GIL disabled, with the "enabling the GIL" RuntimeWarning made an error."""
    env = subprocess_env(PYTHON_GIL=None)
    code = (
        "import importlib, sys\n"
        "m = importlib.import_module(sys.argv[1])\n"
        "import caio\n"
        "native = sorted(n for n in ('linux_uring', 'linux_aio', 'thread_aio')"
        " if getattr(caio, n) is not None)\n"
        "print(sys._is_gil_enabled(), ','.join(native))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", code, module],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    gil, native = proc.stdout.split()
    assert gil == "False"
    # Not vacuous: the subprocess loaded the same native modules as this one.
    assert native.split(",") == sorted(NATIVE_MODULES)
    assert "GIL" not in proc.stderr  # no "enabling the GIL" RuntimeWarning


@pytest.mark.parametrize("threads", [2, 8])
def test_one_op_many_contexts(backend: RawBackend, fast_fd: int, threads: int) -> None:
    """DESIGN.md §9.1: racing submits of one op to different Contexts."""
    iterations = 2000 if threads == 2 else 500
    ops = [backend.Operation.fsync(fast_fd) for _ in range(iterations)]
    callbacks: dict[int, int] = {}
    lock = threading.Lock()

    def count(index: int) -> Any:
        def callback(_: object) -> None:
            with lock:
                callbacks[index] = callbacks.get(index, 0) + 1

        return callback

    for index, op in enumerate(ops):
        op.set_callback(count(index))
    contexts = [backend.context(iterations + 8) for _ in range(threads)]
    accepted = [[0] * iterations for _ in range(threads)]

    def worker(index: int) -> None:
        ctx = contexts[index]
        for i, op in enumerate(ops):
            accepted[index][i] = ctx.submit(op)
            if backend.is_linux and i % 16 == 0:
                backend.drive(ctx)

    _run_threads(threads, worker)
    totals = [sum(accepted[t][i] for t in range(threads)) for i in range(iterations)]
    assert totals == [1] * iterations

    def all_delivered() -> bool:
        for ctx in contexts:
            backend.drive(ctx)
        return len(callbacks) == iterations

    backend.wait_for(None, all_delivered, timeout=30)
    for ctx in contexts:
        backend.drive(ctx)
    assert set(callbacks.values()) == {1}


@pytest.mark.parametrize("threads,batch", [(2, 64), (8, 16), (32, 1)])
def test_many_threads_one_context(
    backend: RawBackend,
    fast_fd: int,
    threads: int,
    batch: int,
) -> None:
    """DESIGN.md §9.1: distinct writes from many threads to one Context."""
    batches = 8
    total = threads * batches * batch
    ctx = backend.context(8192)
    seen = Recorder()
    submitted = []

    def worker(index: int) -> None:
        accepted = 0
        for b in range(batches):
            ops = []
            for k in range(batch):
                slot = (index * batches + b) * batch + k
                op = backend.Operation.write(b"%04d" % (slot % 10000), fast_fd, 4 * slot)
                op.set_callback(lambda result, op=op: seen((result, op.get_value())))
                ops.append(op)
            accepted += ctx.submit(*ops)
        submitted.append(accepted)

    _run_threads(threads, worker)
    assert sum(submitted) == total
    backend.wait_for(ctx, lambda: len(seen) == total, timeout=30)
    assert set(seen.items) == {(4, 4)}
    assert read_file(fast_fd) == b"".join(b"%04d" % (i % 10000) for i in range(total))


@pytest.mark.parametrize("threads", [2, 16])
def test_concurrent_drainers(linux_backend: RawBackend, fast_fd: int, threads: int) -> None:
    """DESIGN.md §9.1: each completion is delivered exactly once."""
    ctx = linux_backend.context(2048)
    count = 1000
    hits = [0] * count
    lock = threading.Lock()
    done = Recorder()

    def make(index: int) -> Any:
        def callback(_: object) -> None:
            with lock:
                hits[index] += 1
            done(index)

        return callback

    ops = [linux_backend.Operation.write(b"x", fast_fd, i) for i in range(count)]
    for i, op in enumerate(ops):
        op.set_callback(make(i))
    assert ctx.submit(*ops) == count
    if linux_backend.is_uring:
        ctx.flush()

    def drainer(index: int) -> None:
        import time

        deadline = time.monotonic() + 30
        while len(done) < count and time.monotonic() < deadline:
            ctx.process_events(max_requests=7)

    _run_threads(threads, drainer)
    assert hits == [1] * count


def test_many_readers_of_one_result(backend: RawBackend, fast_fd: int) -> None:
    """DESIGN.md §9.1."""
    data = os.urandom(4096)
    os.pwrite(fast_fd, data, 0)
    ctx = backend.context()
    op = backend.Operation.read(4096, fast_fd, 0)
    backend.run_one(ctx, op)

    def reader(index: int) -> None:
        for _ in range(2000):
            assert op.get_value() == data
            assert bytes(op.payload)[:4096] == data

    _run_threads(8, reader)


def test_observers_during_completion(pool_backend: RawBackend, fast_fd: int) -> None:
    """DESIGN.md §9.1: only RuntimeError or valid values, never a crash."""
    payload = b"p" * 512
    ctx = pool_backend.context(4096, pool_size=4)
    ops = [pool_backend.Operation.write(payload, fast_fd, 512 * i) for i in range(400)]
    calls = Recorder()
    for op in ops:
        op.set_callback(calls)
    stop = threading.Event()

    def observer(index: int) -> None:
        while not stop.is_set():
            for op in ops[index::4]:
                try:
                    value = op.get_value()
                    assert value in (0, 512)
                except RuntimeError:
                    pass
                try:
                    view = op.payload
                    assert view is None or bytes(view) == payload
                except RuntimeError:
                    pass

    def submitter(index: int) -> None:
        if index == 0:
            try:
                assert ctx.submit(*ops) == len(ops)
                pool_backend.wait_for(None, lambda: len(calls) == len(ops), timeout=30)
            finally:
                stop.set()
        else:
            observer(index)

    _run_threads(5, submitter)
    assert len(calls) == len(ops)


def test_concurrent_callback_replacement(backend: RawBackend) -> None:
    """DESIGN.md §9.1: every replaced callback is released exactly once."""
    op = backend.Operation.fsync(0)
    refs: list[Any] = []
    lock = threading.Lock()

    def replacer(index: int) -> None:
        local = []
        for i in range(500):

            def callback(_: object, i: int = i) -> None:
                pass

            local.append(weakref.ref(callback))
            assert op.set_callback(callback) is True
            del callback
        with lock:
            refs.extend(local)

    _run_threads(8, replacer)
    op.set_callback(print)
    import gc

    gc.collect()
    assert [r for r in refs if r() is not None] == []


def test_concurrent_uring_cancels(uring: RawBackend) -> None:
    """DESIGN.md §9.1."""
    ctx = uring.context(256)
    pipes = [os.pipe() for _ in range(64)]
    calls = [Recorder() for _ in pipes]
    ops = []
    try:
        for (r, _), recorder in zip(pipes, calls, strict=True):
            op = uring.Operation.read(8, r, -1)
            op.set_callback(recorder)
            ops.append(op)
        assert ctx.submit(*ops) == len(ops)
        ctx.flush()
        results: list[int] = []

        def canceller(index: int) -> None:
            for op in ops[index::8]:
                results.append(ctx.cancel(op))

        _run_threads(8, canceller)
        assert results == [0] * len(ops)
        uring.wait_for(ctx, lambda: all(len(c) >= 1 for c in calls), timeout=30)
        uring.drive(ctx)
        assert [len(c) for c in calls] == [1] * len(ops)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


@pytest.mark.parametrize("threads", [4, 16])
def test_submit_and_cancel_hammer(
    backend: RawBackend,
    fast_fd: int,
    threads: int,
) -> None:
    """Many threads submit to, cancel on and drive one Context at once.

    Every thread submits batches of distinct writes (plus an fsync), then
    tries to cancel random operations submitted by any thread (its own or
    others', pending or already finished) while the others keep submitting,
    and drives completions for the eventfd backends.  Every accepted operation
    must complete exactly once, with its full length or cancelled (io_uring:
    -ECANCELED; thread_aio: -1 with error ECANCELED, an op cancel() took back
    from the queue), and every completed write must be in the file.
    """
    rounds, batch, block, cancels = 30, 8, 16, 6
    total = threads * rounds * (batch + 1)
    ctx = backend.context(total + 64)
    results: dict[int, list[int]] = {}
    lock = threading.Lock()
    submitted: list[Any] = []  # every accepted op, shared by all threads
    cancel_calls = [0]
    writes: dict[int, Any] = {}  # id(op) -> (offset, payload, op)
    allowed_cancel_errors: Any = (
        (ValueError, SystemError, RuntimeError, NotImplementedError) if backend.is_linux_aio else ()
    )

    def make_callback(key: int) -> Any:
        def callback(result: Any) -> None:
            with lock:
                results.setdefault(key, []).append(result)

        return callback

    def worker(index: int) -> None:
        rnd = random.Random(index)
        for r in range(rounds):
            ops = []
            for k in range(batch):
                slot = (index * rounds + r) * batch + k
                payload = bytes([slot % 251 + 1]) * block
                op = backend.Operation.write(payload, fast_fd, block * slot)
                op.set_callback(make_callback(id(op)))
                ops.append(op)
                with lock:
                    writes[id(op)] = (block * slot, payload, op)
            sync = backend.Operation.fsync(fast_fd)
            sync.set_callback(make_callback(id(sync)))
            ops.append(sync)
            assert ctx.submit(*ops) == len(ops)
            with lock:
                submitted.extend(ops)
                targets = rnd.sample(submitted, min(len(submitted), cancels))
            for target in targets:
                try:
                    ctx.cancel(target)
                except allowed_cancel_errors:
                    pass
                with lock:
                    cancel_calls[0] += 1
            if backend.is_linux and r % 3 == index % 3:
                backend.drive(ctx)

    _run_threads(threads, worker)
    assert len(submitted) == total
    assert cancel_calls[0] == threads * rounds * cancels
    backend.wait_for(ctx, lambda: len(results) == total, timeout=60, what=f"{total} completions")
    backend.drive(ctx)
    keys = {id(op) for op in submitted}
    assert set(results) == keys
    assert all(len(r) == 1 for r in results.values()), "a callback ran twice"
    cancelled = -errno.ECANCELED
    data = read_file(fast_fd)
    for key, (offset, payload, _op) in writes.items():
        (result,) = results[key]
        if backend.is_uring and result == cancelled:
            continue
        if backend.is_thread and result == -1 and _op.error == errno.ECANCELED:
            continue  # taken back from the queue by cancel() (DESIGN.md §4.6)
        assert result == len(payload), (backend.name, result)
        assert data[offset : offset + len(payload)] == payload


@pytest.mark.parametrize("threads", [4, 16])
def test_concurrent_readinto_distinct_slices_of_one_buffer(
    backend: RawBackend, fast_fd: int, threads: int
) -> None:
    """Issue 13: raw readinto ops from many threads, on one Context, into
    distinct slices of one bytearray: every slice gets exactly its own bytes,
    and every export is released (the bytearray can be resized afterwards)."""
    chunk, rounds = 4096, 16
    data = bytes(random.Random(13).randbytes(chunk * threads))
    os.pwrite(fast_fd, data, 0)
    buf = bytearray(chunk * threads)
    ctx = backend.context(1024)
    seen = Recorder()

    def worker(index: int) -> None:
        view = memoryview(buf)[index * chunk : (index + 1) * chunk]
        for r in range(rounds):
            # Alternate the offset so each round changes the slice's content.
            offset = index * chunk if r % 2 == 0 else ((index + 1) % threads) * chunk
            op = backend.Operation.readinto(view, fast_fd, offset)
            done = threading.Event()
            op.set_callback(lambda _result, done=done: done.set())
            assert ctx.submit(op) == 1
            backend.wait_for(ctx, done.is_set, timeout=30)
            assert op.get_value() == chunk
            assert view == data[offset : offset + chunk]
            seen(index)
            del op
        view.release()

    _run_threads(threads, worker)
    assert len(seen) == threads * rounds
    # Each thread's last round (odd) read its neighbour's chunk.
    for index in range(threads):
        nxt = ((index + 1) % threads) * chunk
        assert buf[index * chunk : (index + 1) * chunk] == data[nxt : nxt + chunk]
    buf.extend(b"x")  # no export left
