"""Regression tests for fixes in caio-core (``rust/core``).

* Zero-argument vectorcalls: CPython passes ``args == NULL`` for calls made
  with ``PyObject_CallNoArgs`` (``iter(callable, sentinel)`` is one way to
  get there from Python), and turning that NULL into a Rust slice — even an
  empty one — is undefined behaviour: a debug build (``CAIO_DEBUG_BUILD=1``)
  aborts on it. Every native function must answer ``next(iter(f, s))``
  exactly as it answers ``f()``. Run in a subprocess per backend, so an
  abort is a test failure rather than the end of the test session.
* ``repr()`` of a write operation reads the payload pointer under the
  operation's lock: on free-threaded builds a completion on a worker thread
  may release the payload at that very moment.
* An awaitable's ``__name__``/``__qualname__``/``repr`` (a task's repr) may
  be read from any thread while the loop thread steps it.
* ``_AsyncioBase._bind`` runs once per adapter: what it stores is read
  without locks afterwards, so a second call is refused instead of swapping
  those objects under a running operation.
"""

import asyncio
import os
import re
import textwrap
import threading
from typing import Any

import pytest

from helpers import NATIVE_MODULES, run_python

NULL_ARGS_SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib, os, sys, tempfile

    name = sys.argv[1]
    module = importlib.import_module("caio." + name)
    adapter_module = importlib.import_module("caio." + name + "_asyncio")
    SENTINEL = object()
    fd = os.open(tempfile.mkstemp()[1], os.O_RDWR)


    def outcome(f):
        try:
            value = f()
        except BaseException as e:  # noqa: B902 - any outcome is compared
            return ("raise", type(e).__name__, str(e))
        return ("ok", type(value).__name__)


    def compare(label, make):
        # A fresh callable for each way of calling it (calls have effects).
        direct = outcome(make())
        f = make()
        null_args = outcome(lambda: next(iter(f, SENTINEL)))
        if direct != null_args:
            print("MISMATCH", label, direct, null_args)
            sys.exit(1)
        print("ok", label, direct[0])


    def context():
        return module.Context()


    def operation():
        return module.Operation.read(16, fd, 0)


    def public(obj):
        return [a for a in dir(obj) if not a.startswith("__") and callable(getattr(obj, a))]


    compare("Context()", lambda: module.Context)
    for attr in public(module.Context):
        compare("Context." + attr, lambda attr=attr: getattr(context(), attr))
    for attr in public(module.Operation):
        compare("Operation." + attr, lambda attr=attr: getattr(module.Operation, attr))
        compare("op." + attr, lambda attr=attr: getattr(operation(), attr))

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    adapters = []


    def adapter():
        a = adapter_module.AsyncioContext(4, loop=loop)
        adapters.append(a)
        return a


    probe = adapter()
    if hasattr(probe, "_bind"):
        for attr in public(probe):
            if attr.startswith("_") and attr not in (
                "_bind", "_gate_state", "_released", "_process_loop_events", "_loop_reader",
            ):
                continue
            compare("AsyncioContext." + attr, lambda attr=attr: getattr(adapter(), attr))
        for attr in ("throw", "close"):
            compare(
                "awaitable." + attr,
                lambda attr=attr: getattr(adapter().read(16, fd, 0), attr),
            )
    for a in adapters:
        a.close()
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    print("done")
    """
)


@pytest.mark.parametrize("name", sorted(NATIVE_MODULES))
def test_zero_argument_calls_with_null_args(name: str) -> None:
    proc = run_python(["-c", NULL_ARGS_SCRIPT, name])
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("done"), (
        proc.returncode,
        proc.stdout[-2000:],
        proc.stderr[-4000:],
    )
    # The walk reached the native entry points (not just the constructors).
    assert "ok op.get_value" in proc.stdout
    assert "ok Context.submit" in proc.stdout


REPR = re.compile(
    r'^<[\w.]+ at 0x[0-9a-f]+: mode="write", fd=\d+, offset=\d+(, result=-?\d+)?, '
    r"buffer=0x(\(nil\)|[0-9a-f]+)>$"
)


def test_repr_of_a_write_completing_on_a_worker(thread_aio: Any, tmp_fd: int) -> None:
    """Worker threads complete (and release the payloads of) writes while
    other threads repr() them; every repr stays well formed, and a completed
    thread_aio write shows no buffer (its payload was dropped)."""
    ctx = thread_aio.context(max_requests=64)
    ops = [thread_aio.Operation.write(b"x" * 4096, tmp_fd, i * 4096) for i in range(64)]
    stop = threading.Event()
    bad = []

    def spin() -> None:
        while not stop.is_set():
            for op in ops:
                r = repr(op)
                if not REPR.match(r):
                    bad.append(r)

    threads = [threading.Thread(target=spin) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for round_ in range(20):
            if round_:
                ops[:] = [
                    thread_aio.Operation.write(b"y" * 4096, tmp_fd, i * 4096) for i in range(64)
                ]
            assert thread_aio.run(ctx, *ops) == [4096] * len(ops)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == []
    assert all(repr(op).endswith("buffer=0x(nil)>") for op in ops)


def test_bind_runs_once(async_backend: Any, aio: Any, tmp_fd: int) -> None:
    actx = async_backend.context(4, loop=aio.loop)
    try:
        if not hasattr(actx, "_bind") or not getattr(actx, "_loop_delivery", False):
            pytest.skip("no native asyncio fast path for this backend here")
        with pytest.raises(RuntimeError, match="already bound"):
            actx._bind(actx.context, aio.loop, 4, False)
        # Still bound as before, and fully usable.
        assert aio.run(actx.write(b"abc", tmp_fd, 0)) == 3
        assert aio.run(actx.read(3, tmp_fd, 0)) == b"abc"
        assert actx._gate_state() == (0, 4, 0)
    finally:
        actx.close()


def test_awaitable_names_read_while_another_thread_steps(
    async_backend: Any, aio: Any, tmp_fd: int
) -> None:
    """``__name__``/``__qualname__``/``repr`` of an awaitable (what a task's
    repr shows) may be read from any thread while the loop thread steps it:
    they read only immutable fields and the atomic state."""
    actx = async_backend.context(8, loop=aio.loop)
    if not hasattr(actx, "_bind"):
        actx.close()
        pytest.skip("not the native awaitable")
    os.pwrite(tmp_fd, b"z" * 65536, 0)
    awaitables = []
    stop = threading.Event()
    seen = []

    def spin() -> None:
        while not stop.is_set():
            for aw in list(awaitables):
                seen.append((aw.__name__, aw.__qualname__, repr(aw)[:30]))
            del seen[:-10]

    async def main() -> None:
        for _ in range(300):
            batch = [actx.read(4096, tmp_fd, 4096 * (i % 16)) for i in range(8)]
            awaitables[:] = batch
            assert await asyncio.gather(*batch) == [b"z" * 4096] * 8

    t = threading.Thread(target=spin)
    t.start()
    try:
        aio.run(main())
    finally:
        stop.set()
        t.join()
        actx.close()
    assert all(name == "read" and qual == "AsyncioContext.read" for name, qual, _ in seen)
