"""Hostile arguments: every public constructor and method fed wrong types,
negative/huge/aliasing integers, non-buffer payloads and closed contexts.

Each call must either work (and then mean exactly what was asked: an fd of
``2**32 + 5`` never becomes fd 5, ``nbytes=2**64`` never becomes 0) or raise a
clear exception (``TypeError``, ``ValueError``, ``OverflowError``,
``OSError``, ``RuntimeError``, ``MemoryError``; ``SystemError`` only where
DESIGN.md §4.3 prescribes it for a failing ``Context(...)``). A crash kills
the test process, a hang trips pytest-timeout; memory the library does not
own would show up as wrong data or a crash (and under the sanitizer runs).

File descriptors are drawn from a safe set only: the test's own file, a
closed fd, and values that are *congruent* to the test's fd modulo 2**32 (an
implementation that truncates would touch the test's file, which is checked
afterwards) - never another descriptor of the test process (stdin!).
"""

import asyncio
import gc
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import caio

from helpers import AsyncBackend, LoopRunner, RawBackend

CLEAR = (TypeError, ValueError, OverflowError, OSError, RuntimeError, MemoryError)
STATS: dict[str, int] = {}


def _count(key: str, n: int = 1) -> None:
    STATS[key] = STATS.get(key, 0) + n


class Index:
    """An int-like object (``__index__``), accepted like an int."""

    def __init__(self, value: Any):
        self.value = value

    def __index__(self) -> Any:
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value

    def __repr__(self) -> str:
        return f"Index({self.value!r})"


class Unbool:
    def __bool__(self) -> bool:
        raise ValueError("no truth value")

    def __repr__(self) -> str:
        return "Unbool()"


class Bytes(bytes):
    """A bytes subclass: accepted as a payload."""


EDGE_INTS = [
    -(2**100),
    -(2**64) - 1,
    -(2**64),
    -(2**63) - 1,
    -(2**63),
    -(2**32) - 1,
    -(2**32),
    -(2**31) - 1,
    -(2**31),
    -(2**16),
    -(2**15) - 1,
    -(2**15),
    -2,
    -1,
    0,
    1,
    2,
    2**15 - 1,
    2**15,
    2**16 - 1,
    2**16,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**32 + 5,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    2**64 + 1,
    2**100,
]

ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers())
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.just(object()),
    st.lists(st.integers(), max_size=2),
    st.just(bytearray(b"ab")),
    st.just(memoryview(b"ab")),
    st.just(Unbool()),
    st.builds(Index, st.sampled_from([ValueError("boom"), "7", 2**100, -1, 5, None])),
    st.just(sys.maxsize),
    st.just(float("inf")),
)
anything = st.one_of(ints, ints, junk)


def sizes_ok(value: Any) -> bool:
    """An int-like value small enough to allocate as a read buffer."""
    try:
        return abs(int(value.__index__())) <= 1 << 20  # type: ignore[union-attr]
    except Exception:
        return True


def as_int(value: Any) -> Any:
    """The integer a well-behaved ``operator.index`` gives, else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, Index) and isinstance(value.value, int):
        return value.value
    return None


@pytest.fixture
def hostile_fds(tmp_path: Any, closed_fd: int) -> Any:
    """(fd, candidate fds): the test's own file plus safe hostile values."""
    fd = os.open(str(tmp_path / "target.bin"), os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, b"original", 0)
    candidates = [
        fd,
        closed_fd,
        -1,
        -(2**31),
        -(2**31) - 1,
        2**31 - 1,
        2**31,
        2**32 - 1,
        2**32,
        2**32 + fd,
        2**64 + fd,
        -(2**32) + fd,
        fd - 2**64,
        Index(2**32 + fd),
        True,  # True is fd 1 only as a bool: see below
    ]
    # bool is an int subclass: True == 1 would be stdout. Keep only values
    # that cannot denote another open descriptor of this process.
    candidates = [c for c in candidates if c is not True]
    yield fd, candidates
    os.close(fd)


def fd_strategy(candidates: list[Any]) -> Any:
    return st.one_of(
        st.sampled_from(candidates),
        st.sampled_from(candidates),
        junk.filter(lambda v: as_int(v) is None),
    )


def check_fd_attribute(backend_name: str, given: Any, fileno: int) -> None:
    value = as_int(given)
    if backend_name == "python_aio":
        assert fileno == value
        return
    # Native: the u32 view of a value in the C int/unsigned range, nothing else.
    assert -(2**31) <= value < 2**32, ("aliasing fd accepted", given)
    assert fileno == value % 2**32


def check_untouched(fd: int) -> None:
    assert os.pread(fd, 100, 0) == b"original", "an aliasing fd reached the test's file"


# -- Operation constructors -----------------------------------------------------------


def more_examples(factor: int) -> Any:
    """These calls are cheap: several times the profile's example count."""
    current = settings.default
    return settings(current, max_examples=current.max_examples * factor)


def maybe(valid: Any) -> Any:
    """Mostly a valid value, sometimes a hostile one."""
    return st.one_of(valid, valid, valid, valid, valid, anything)


def test_operation_constructors(backend: RawBackend, hostile_fds: tuple[int, list[Any]]) -> None:
    fd, candidates = hostile_fds
    Op = backend.Operation
    payloads = st.one_of(st.binary(max_size=8), st.builds(Bytes, st.binary(max_size=8)))

    @more_examples(8)
    @given(
        method=st.sampled_from(["read", "write", "fsync", "fdsync"]),
        nbytes=maybe(st.integers(0, 4096)),
        payload=maybe(payloads),
        fd_value=st.one_of(st.just(fd), st.just(fd), fd_strategy(candidates)),
        offset=maybe(st.integers(0, 2**40)),
        priority=maybe(st.integers(0, 3)),
        arity=st.sampled_from(["required", "all", "all", "too many", "missing"]),
        keywords=st.integers(0, 2),
    )
    def check(
        method: str,
        nbytes: Any,
        payload: Any,
        fd_value: Any,
        offset: Any,
        priority: Any,
        arity: str,
        keywords: int,
    ) -> None:
        if not sizes_ok(nbytes):
            nbytes = 2**62 if (as_int(nbytes) or 0) > 0 else nbytes
        names = {
            "read": ["nbytes", "fd", "offset", "priority"],
            "write": ["payload_bytes", "fd", "offset", "priority"],
            "fsync": ["fd", "priority"],
            "fdsync": ["fd", "priority"],
        }[method]
        required = {"read": 2, "write": 2, "fsync": 1, "fdsync": 1}[method]
        if backend.is_python and method in ("read", "write"):
            required = 3  # offset is required there (DESIGN.md §3.2)
        values = {
            "nbytes": nbytes,
            "payload_bytes": payload,
            "fd": fd_value,
            "offset": offset,
            "priority": priority,
        }
        args = [values[n] for n in names]
        if arity == "required":
            args = args[:required]
        elif arity == "missing":
            args = args[: required - 1]
        kwargs: dict[str, Any] = {}
        for _ in range(min(keywords, len(args))):
            kwargs[names[len(args) - 1]] = args.pop()
        if arity == "too many":
            args.append(0)
        note(f"{method}(*{args!r}, **{kwargs!r})")
        _count("constructor calls")
        try:
            op = getattr(Op, method)(*args, **kwargs)
        except CLEAR:
            _count("constructor calls refused")
            return
        _count("constructor calls accepted")
        assert arity not in ("too many", "missing")
        given_ = dict(zip(names, args, strict=False), **kwargs)
        check_fd_attribute(backend.name, given_["fd"], op.fileno)
        if method == "read":
            n = as_int(given_["nbytes"])
            if backend.is_python and given_["nbytes"] is None:
                n = 0  # DESIGN.md §4.7: None becomes 0
            assert n is not None
            assert op.nbytes == n, ("nbytes aliased", n, op.nbytes)
            if backend.native:
                assert 0 <= n < 2**63
        if method == "write":
            # DESIGN.md §3.4: any C-contiguous buffer (bytes, bytearray,
            # memoryview, ...); nbytes counts its bytes.
            with memoryview(given_["payload_bytes"]) as view:
                assert view.c_contiguous
                assert op.nbytes == view.nbytes
        if "offset" in given_ and backend.native:
            o = as_int(given_["offset"])
            assert o is not None and -(2**63) <= o < 2**64, ("offset accepted", o)
            assert op.offset == o % 2**64
        if "priority" in given_ and backend.native:
            p = as_int(given_["priority"])
            assert p is not None and -(2**15) <= p < 2**16, ("priority accepted", p)
        repr(op)

    check()


def test_aliasing_integers_are_refused_or_fail_on_their_own(
    backend: RawBackend,
    hostile_fds: tuple[int, list[Any]],
) -> None:
    """The headline cases of DESIGN.md §6.2 wrap: ``fd = 2**32 + fd`` must not reach
    ``fd``, ``nbytes = 2**64`` must not become a 0-byte read, and an offset of
    ``2**64 + k`` must not become ``k``. python_aio keeps Python ints: the
    operation itself fails (``os.pread`` refuses them)."""
    fd, _ = hostile_fds
    ctx = backend.context()
    cases = [
        ("write", (b"ALIASED!", 2**32 + fd, 0)),
        ("write", (b"ALIASED!", fd, 2**64)),
        ("read", (8, 2**32 + fd, 0)),
        ("read", (2**64, fd, 0)),
        ("read", (2**64 + 8, fd, 0)),
        ("read", (8, fd, 2**64)),
        ("fsync", (2**32 + fd,)),
    ]
    for method, args in cases:
        try:
            op = getattr(backend.Operation, method)(*args)
        except (OverflowError, MemoryError, ValueError):
            assert backend.native, (method, args)
            _count("aliasing values refused at construction")
            continue
        assert backend.is_python, (method, args, "accepted by a native backend")
        backend.run_one(ctx, op)
        with pytest.raises((OverflowError, OSError, ValueError)):
            op.get_value()
        _count("aliasing values failing at execution (python_aio)")
    check_untouched(fd)


# -- Context constructors -------------------------------------------------------------


def _thread_count() -> int:
    return (
        len(os.listdir("/proc/self/task"))
        if os.path.isdir("/proc/self/task")
        else threading.active_count()
    )


def _thread_names() -> list[str]:
    """Names of the process's threads (kernel ``comm``), for failure messages."""
    names = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return [t.name for t in threading.enumerate()]
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return sorted(names)


def _worker_count() -> int:
    """Threads of caio's native worker pools (named ``caio-worker``)."""
    return _thread_names().count("caio-worker")


def _wait_count(count: Callable[[], int], limit: int, timeout: float, interval: float) -> int:
    """Collects garbage and polls ``count()`` until it is at most ``limit``
    or ``timeout`` seconds have passed; returns the last value."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        n = count()
        if n <= limit or time.monotonic() > deadline:
            return n
        time.sleep(interval)


def wait_worker_count(limit: int, timeout: float = 2.0) -> int:
    """Pool workers are joined synchronously on close: a short bound."""
    return _wait_count(_worker_count, limit, timeout, 0.02)


def wait_thread_count(limit: int, timeout: float = 10.0) -> int:
    """Waits for the process's thread count to drop to ``limit`` (helper
    threads, e.g. linux_aio's io_destroy helpers, linger up to a second)."""
    return _wait_count(_thread_count, limit, timeout, 0.05)


def test_context_constructor(backend: RawBackend) -> None:
    extra = {"linux_uring": "sqpoll", "thread_aio": "pool_size", "python_aio": "pool_size"}
    second = extra.get(backend.name)
    before = _thread_count()
    names_before = _thread_names()

    @more_examples(4)
    @given(
        max_requests=maybe(st.integers(0, 64)),
        other=maybe(st.integers(0, 16)),
        shape=st.sampled_from(["none", "pos1", "pos2", "kw", "bogus", "three"]),
    )
    def check(max_requests: Any, other: Any, shape: str) -> None:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if shape == "pos1":
            args = [max_requests]
        elif shape == "pos2":
            args = [max_requests, other]
        elif shape == "kw":
            kwargs = {"max_requests": max_requests}
            if second:
                kwargs[second] = other
        elif shape == "bogus":
            kwargs = {"bogus": other}
        elif shape == "three":
            args = [max_requests, other, other]
        # Keep contexts affordable: no 128-thread pools or 2**15-entry rings.
        for v in list(args) + list(kwargs.values()):
            n = as_int(v)
            if n is not None and 256 < n < 2**16 and not isinstance(v, bool):
                return
        note(f"Context(*{args!r}, **{kwargs!r})")
        _count("Context() calls")
        try:
            ctx = backend.Context(*args, **kwargs)
        except CLEAR:
            _count("Context() calls refused")
            return
        except SystemError:
            # DESIGN.md §4.4, §4.5: the kernel refused io_setup/io_uring_setup.
            assert backend.is_linux
            _count("Context() calls refused")
            return
        assert ctx.max_requests > 0
        repr(ctx)
        close = getattr(ctx, "close", None)
        if close is not None:
            close()

    check()
    # Refused and closed contexts leave no worker threads behind.
    after = wait_thread_count(before)
    assert after <= before, (before, after, names_before, _thread_names())


# -- Context methods, open and closed ------------------------------------------------------


def _ctx_methods(backend: RawBackend) -> list[str]:
    names = ["submit", "cancel", "process_events", "poll", "flush", "close"]
    return [n for n in names if hasattr(backend.Context, n)]


def test_context_methods(backend: RawBackend, hostile_fds: tuple[int, list[Any]]) -> None:
    """submit/cancel/process_events/poll/flush/close with hostile arguments,
    on an open and on a closed Context; afterwards a fresh Context still
    works and the test's file is intact."""
    fd, _ = hostile_fds
    others = [m for m in caio.variants if m is not backend.module]
    foreign = [m.Operation.fsync(fd) for m in others]

    @more_examples(4)
    @given(
        method=st.sampled_from(_ctx_methods(backend)),
        args=st.lists(st.one_of(anything, st.sampled_from(["op", "foreign", "done"])), max_size=4),
        kwargs=st.dictionaries(
            st.sampled_from(["operation", "max_requests", "min_requests", "timeout", "bogus"]),
            anything,
            max_size=2,
        ),
        closed=st.booleans(),
    )
    def check(method: str, args: list[Any], kwargs: dict[str, Any], closed: bool) -> None:
        ctx = backend.Context(8)
        done = backend.Operation.write(b"", fd, 0)
        backend.run_one(ctx, done)
        op = backend.Operation.read(4, fd, 0)
        calls: list[Any] = []
        op.set_callback(calls.append)
        for i, a in enumerate(args):
            if a == "op":
                args[i] = op
            elif a == "foreign":
                args[i] = foreign[0] if foreign else object()
            elif a == "done":
                args[i] = done
        if method == "process_events":
            # min_requests > 0 with a non-zero timeout waits by contract;
            # nothing is in flight here, so it could wait forever.
            params = dict(zip(["max_requests", "min_requests", "timeout"], args, strict=False))
            params.update(kwargs)
            m = as_int(params.get("min_requests", 0))
            t = params.get("timeout", 0)
            if (m is None or m != 0) and as_int(t) not in (0, None):
                return
        if closed:
            if not hasattr(ctx, "close"):
                return
            ctx.close()
        note(
            "{}Context.{}(*{!r}, **{!r})".format("closed " if closed else "", method, args, kwargs)
        )
        _count("Context method calls")
        try:
            result = getattr(ctx, method)(*args, **kwargs)
        except BlockingIOError:
            assert method == "poll"
        except CLEAR:
            _count("Context method calls refused")
        else:
            if method == "submit":
                real = [a for a in args if a is op]
                assert result == (1 if real else 0), (result, args)
                if real:
                    backend.wait_for(ctx, lambda: calls, what="the accepted op")
                    assert op.get_value() == b"orig"
            elif method in ("cancel", "process_events", "poll", "flush"):
                assert isinstance(result, int), result
        # The op is either untouched (fresh) or was accepted exactly once.
        if hasattr(ctx, "close"):
            ctx.close()

    check()
    # Still fully usable afterwards.
    ctx = backend.context()
    op = backend.Operation.read(8, fd, 0)
    backend.run_one(ctx, op)
    assert op.get_value() == b"original"


def _delivered(op: Any) -> bool:
    try:
        op.get_value()
    except RuntimeError:
        return False
    return True


def test_submit_rejects_bad_batches_without_claiming(backend: RawBackend, tmp_fd: int) -> None:
    """A batch with one bad item is refused as a whole; the good operations
    in it stay fresh and can be submitted afterwards."""
    ctx = backend.context()
    bad_items: list[Any] = [object(), None, 1, "op", [], b"x"]
    bad_items += [m.Operation.fsync(tmp_fd) for m in caio.variants if m is not backend.module]
    for bad in bad_items:
        op = backend.Operation.write(b"ok", tmp_fd, 0)
        with pytest.raises(TypeError if backend.native else ValueError):
            ctx.submit(op, bad, op)
        assert backend.run_one(ctx, op) in (2, None) or backend.is_python
        assert op.get_value() == 2
        _count("bad batches refused")


# -- Operation methods ------------------------------------------------------------------


def test_operation_methods(backend: RawBackend, tmp_fd: int) -> None:
    ctx = backend.context()

    @more_examples(4)
    @given(
        which=st.sampled_from(["set_callback", "get_value"]),
        args=st.lists(
            st.one_of(anything, st.sampled_from([lambda *a: None, Bytes, print.__call__])),
            max_size=3,
        ),
        kw=st.booleans(),
        state=st.sampled_from(["new", "done"]),
    )
    def check(which: str, args: list[Any], kw: bool, state: str) -> None:
        op = backend.Operation.read(4, tmp_fd, 0)
        if state == "done":
            backend.run_one(ctx, op)
        kwargs = {}
        if kw and args:
            kwargs = {"callback": args.pop()}
        note(f"{state} op.{which}(*{args!r}, **{kwargs!r})")
        _count("Operation method calls")
        try:
            result = getattr(op, which)(*args, **kwargs)
        except CLEAR:
            _count("Operation method calls refused")
            return
        if which == "set_callback":
            assert result is True
            assert len(args) + len(kwargs) == 1 and callable((args + list(kwargs.values()))[0])
        else:
            assert not args and not kwargs
            assert isinstance(result, bytes)

    check()


# -- asyncio adapters ----------------------------------------------------------------------


def test_asyncio_context_constructor(
    async_backend: AsyncBackend,
    aio: LoopRunner,
) -> None:
    """AsyncioContext(max_requests, loop, deferred, **kwargs) with hostile
    values: built and closed, or refused; nothing left running afterwards.
    A ``loop`` that is not an event loop may also give AttributeError
    (upstream does the same: the adapter calls its methods)."""
    before = _thread_count()
    names_before = _thread_names()

    async def build(args: list[Any], kwargs: dict[str, Any]) -> None:
        ctx = async_backend.module.AsyncioContext(*args, **kwargs)
        try:
            repr(ctx)
        finally:
            ctx.close()

    @given(
        max_requests=maybe(st.integers(0, 64)),
        loop=st.sampled_from(["real", "real", "real", None, "object", "int"]),
        deferred=st.one_of(st.booleans(), anything),
        kwargs=st.dictionaries(
            st.sampled_from(["sqpoll", "pool_size", "bogus"]), anything, max_size=2
        ),
    )
    def check(max_requests: Any, loop: Any, deferred: Any, kwargs: dict[str, Any]) -> None:
        for v in [max_requests] + list(kwargs.values()):
            n = as_int(v)
            if n is not None and 256 < n < 2**16 and not isinstance(v, bool):
                return
        loop_value = {"real": aio.loop, None: None, "object": object(), "int": 3}[loop]
        kwargs = dict(kwargs)
        options = dict(async_backend.kwargs)
        options.update(kwargs)
        note(
            f"AsyncioContext({max_requests!r}, loop={loop!r}, deferred={deferred!r}, **{options!r})"
        )
        _count("AsyncioContext() calls")
        workers = _worker_count()
        try:
            aio.run(build([max_requests, loop_value], dict(options, deferred=deferred)))
        except CLEAR:
            _count("AsyncioContext() calls refused")
        except AttributeError:
            assert loop in ("object", "int")
            _count("AsyncioContext() calls refused")
        except SystemError:
            assert async_backend.is_linux
            _count("AsyncioContext() calls refused")
        # Per example: a worker pool this call started is gone again (built
        # and closed, or released with the refused object).
        left = wait_worker_count(workers)
        assert left <= workers, (workers, left, _thread_names())

    check()
    aio.settle()
    after = wait_thread_count(before)
    assert after <= before, (before, after, names_before, _thread_names())


def test_refused_asyncio_context_stops_its_workers(thread_aio: RawBackend) -> None:
    """thread_aio: AsyncioContext(loop=<not a loop>) is refused after its
    worker pool started; the pool must stop then, not whenever the
    exception's traceback (which holds the constructor's frame) goes. The
    exceptions are kept here, as something in CI's full-suite runs did.
    (The fixture skips this where thread_aio is not built: the pure wheel.)"""
    from caio import thread_aio_asyncio

    before = _worker_count()
    kept = []
    for loop in (object(), 3):
        with pytest.raises(AttributeError) as info:
            thread_aio_asyncio.AsyncioContext(0, loop=loop)
        kept.append(info.value)
    gc.collect()
    assert _worker_count() <= before, _thread_names()
    assert all("create_future" in str(e) for e in kept), kept


def test_asyncio_operations(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    hostile_fds: tuple[int, list[Any]],
) -> None:
    """read/write/fsync/fdsync with hostile arguments: argument errors at
    call time, I/O errors from the await, never a hang, never the wrong fd."""
    fd, candidates = hostile_fds
    ctx = async_backend.context(8, loop=aio.loop)

    @more_examples(4)
    @given(
        method=st.sampled_from(["read", "write", "fsync", "fdsync"]),
        nbytes=maybe(st.integers(0, 64)),
        payload=maybe(st.binary(max_size=8)),
        fd_value=st.one_of(st.just(fd), st.just(fd), fd_strategy(candidates)),
        offset=maybe(st.integers(0, 64)),
    )
    def check(method: str, nbytes: Any, payload: Any, fd_value: Any, offset: Any) -> None:
        first = nbytes if method == "read" else payload
        if method == "read" and not sizes_ok(first):
            return
        if method == "write" and as_int(fd_value) == fd:
            method = "read"  # the test's file must keep its content
        if method == "write" and isinstance(first, bytes):
            first = b"ALIASED!"[: max(1, len(first))]
        if method in ("read", "write"):
            args = (first, fd_value, offset)
        else:
            args = (fd_value,)
        note(f"{method}(*{args!r})")
        _count("AsyncioContext operation calls")
        try:
            awaitable = getattr(ctx, method)(*args)
        except CLEAR:
            _count("AsyncioContext operation calls refused at call time")
            return

        async def run() -> Any:
            return await asyncio.wait_for(awaitable, 10)

        try:
            result = aio.run(run())
        except asyncio.TimeoutError as exc:
            raise AssertionError(f"hang: {method}{args!r}") from exc
        except CLEAR:
            _count("AsyncioContext operations failing from the await")
            return
        assert as_int(fd_value) == fd and not isinstance(fd_value, Index), (
            "an operation on a hostile fd succeeded",
            method,
            args,
            result,
        )

    try:
        check()
    finally:
        ctx.close()
    check_untouched(fd)


def test_asyncio_submit_rejects_foreign_objects(
    async_backend: AsyncBackend, aio: LoopRunner
) -> None:
    ctx = async_backend.context(4, loop=aio.loop)
    try:
        for bad in [object(), None, 1, b"x"] + [
            m.Operation.fsync(0) for m in caio.variants if m.Operation is not ctx.OPERATION_CLASS
        ]:

            async def main(bad: Any = bad) -> None:
                await ctx.submit(bad)

            with pytest.raises((ValueError, TypeError)):
                aio.run(main())
            _count("foreign objects refused by AsyncioContext.submit")
    finally:
        ctx.close()


def test_asyncio_operations_on_a_closed_context(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_fd: int,
) -> None:
    """After close(), every operation fails clearly (RuntimeError) instead of
    hanging (DESIGN.md §6.2 close: upstream's linux adapters could hang here), and
    close() stays idempotent."""
    ctx = async_backend.context(4, loop=aio.loop)
    ctx.close()
    calls = [
        lambda: ctx.read(4, tmp_fd, 0),
        lambda: ctx.write(b"late", tmp_fd, 0),
        lambda: ctx.fsync(tmp_fd),
        lambda: ctx.fdsync(tmp_fd),
        lambda: ctx.submit(ctx.OPERATION_CLASS.fsync(tmp_fd)),
    ]
    for call in calls:

        async def main(call: Callable[[], Any] = call) -> None:
            await asyncio.wait_for(call(), 10)

        with pytest.raises(RuntimeError):
            aio.run(main())
        _count("operations refused by a closed AsyncioContext")
    ctx.close()
    assert os.fstat(tmp_fd).st_size == 0
