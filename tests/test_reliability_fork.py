"""fork(): what a child may do with the parent's contexts, and that the
parent is never affected.

Decision (the same for every backend, documented in docs/reliability.md):
a Context created before ``fork()`` is unusable in the child. Its kernel
objects (io_uring instance, AIO context, eventfd) are shared with the parent
or absent, and its worker threads do not exist there. Every method that
would touch them (``submit``, ``process_events``, ``poll``, ``flush``,
``cancel`` where it does anything) raises ``RuntimeError`` naming fork();
dropping or closing the inherited Context is harmless. A new Context created
in the child works normally. The child exits promptly, and the parent's
operations - including those in flight at the moment of the fork - complete
exactly once.

Each scenario runs in a fresh interpreter (``python -c``) that forks; the
test process itself never forks.
"""

import json
import os
import re
import sys
from typing import Any

import pytest

from helpers import MODULES, async_params, run_python

STATS: dict[str, int] = {}


def _count(key: str, n: int = 1) -> None:
    STATS[key] = STATS.get(key, 0) + n


pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

COMMON = r'''
import asyncio, gc, importlib, json, os, signal, sys, time
name, path = sys.argv[1], sys.argv[2]
mod = importlib.import_module("caio." + name)
report = {}

def drive(ctx, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        for method in ("flush", "process_events"):
            if hasattr(ctx, method):
                getattr(ctx, method)()
        time.sleep(0.0005)

def run(ctx, op):
    calls = []
    op.set_callback(calls.append)
    assert ctx.submit(op) == 1
    drive(ctx, lambda: calls)
    return op.get_value()

def wait_child(pid, timeout=15.0):
    """(exit status or None on hang, seconds)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, time.monotonic() - start
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None, timeout

def child_report(r, w, body):
    """Runs body() in the child; its dict goes to the parent through a pipe."""
    os.close(r)
    out = {}
    try:
        body(out)
    except BaseException as exc:
        out["child_error"] = "{}: {}".format(type(exc).__name__, exc)
    os.write(w, json.dumps(out).encode())
    os.close(w)

def read_report(r):
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    return json.loads(data or b"{}")

def inherited_methods(ctx, fd, out):
    """Every method of an inherited Context in the child."""
    results = {}
    for method, args in [("submit", (mod.Operation.write(b"child!", fd, 0),)),
                         ("process_events", ()), ("poll", ()), ("flush", ()),
                         ("cancel", (mod.Operation.fsync(fd),))]:
        if not hasattr(ctx, method):
            continue
        try:
            value = getattr(ctx, method)(*args)
            results[method] = "returned {!r}".format(value)
        except RuntimeError as exc:
            results[method] = "RuntimeError" + (" (mentions fork)" if "fork" in str(exc) else "")
        except BaseException as exc:
            results[method] = "{}: {}".format(type(exc).__name__, exc)
    out["inherited"] = results

def fresh_context_works(fd, out):
    ctx = mod.Context()
    assert run(ctx, mod.Operation.write(b"from the child", fd, 4096)) == 14
    assert run(ctx, mod.Operation.read(14, fd, 4096)) == b"from the child"
    if hasattr(ctx, "close"):
        ctx.close()
    out["fresh_context"] = "works"
'''

RAW_IDLE = (
    COMMON
    + r"""
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
ctx = mod.Context()
assert run(ctx, mod.Operation.write(b"parent", fd, 0)) == 6
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    def body(out):
        inherited_methods(ctx, fd, out)
        fresh_context_works(fd, out)
    child_report(r, w, body)
    sys.exit(0)  # a normal exit: atexit hooks and finalisers run
os.close(w)
report.update(read_report(r))
status, seconds = wait_child(pid)
report["child_exit"] = status
report["child_exit_seconds"] = round(seconds, 2)
# The parent's context is unaffected.
assert run(ctx, mod.Operation.write(b"PARENT", fd, 0)) == 6
assert run(ctx, mod.Operation.read(6, fd, 0)) == b"PARENT"
report["parent"] = "works"
report["file"] = os.pread(fd, 64, 4096).decode()
print(json.dumps(report))
"""
)

RAW_BUSY = (
    COMMON
    + r"""
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
ctx = mod.Context(4096) if name != "python_aio" else mod.Context(4096, 8)
calls = []
ops = [mod.Operation.write(b"%08d" % i, fd, 8 * i) for i in range(400)]
ops += [mod.Operation.fdsync(fd) for _ in range(200)]
for op in ops:
    op.set_callback(calls.append)
accepted = ctx.submit(*ops)
assert accepted == len(ops), accepted
if hasattr(ctx, "flush"):
    ctx.flush()
r, w = os.pipe()
pid = os.fork()  # with operations in flight (and pool workers busy)
if pid == 0:
    def body(out):
        inherited_methods(ctx, fd, out)
        fresh_context_works(fd, out)
    child_report(r, w, body)
    sys.exit(0)
os.close(w)
report.update(read_report(r))
status, seconds = wait_child(pid)
report["child_exit"] = status
report["child_exit_seconds"] = round(seconds, 2)
drive(ctx, lambda: len(calls) >= len(ops), timeout=60)
time.sleep(0.05)
drive(ctx, lambda: True)
report["parent_callbacks"] = len(calls)
report["parent_ops"] = len(ops)
content = os.pread(fd, 3200, 0)
report["parent_data_ok"] = content == b"".join(b"%08d" % i for i in range(400))
print(json.dumps(report))
"""
)

ASYNC_BUSY = (
    COMMON
    + r"""
kwargs = json.loads(sys.argv[3])
close_in_child = sys.argv[4] == "close"
adapter = importlib.import_module("caio." + name + "_asyncio")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
loop = asyncio.new_event_loop()
ctx = adapter.AsyncioContext(64, loop=loop, **kwargs)

async def writes(n, base):
    results = await asyncio.gather(*[
        ctx.write(b"%08d" % (base + i), fd, 8 * (base + i)) for i in range(n)])
    assert results == [8] * n, results
    await ctx.fdsync(fd)
    data = await ctx.read(8 * n, fd, 8 * base)
    assert data == b"".join(b"%08d" % (base + i) for i in range(n)), data[:40]

loop.run_until_complete(writes(32, 0))

async def fork_with_work_in_flight():
    tasks = [asyncio.ensure_future(writes(32, 32 * k)) for k in range(1, 4)]
    await asyncio.sleep(0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # The forking thread had a running loop; a child starts afresh.
        asyncio.events._set_running_loop(None)
        def body(out):
            async def use_inherited():
                try:
                    await asyncio.wait_for(ctx.write(b"child!", fd, 0), 5)
                    return "worked (!)"
                except RuntimeError as exc:
                    return "RuntimeError" + (" (mentions fork)" if "fork" in str(exc) else "")
                except asyncio.TimeoutError:
                    return "HANG"
                except BaseException as exc:
                    return "{}: {}".format(type(exc).__name__, exc)
            child_loop = asyncio.new_event_loop()
            out["inherited"] = {"await write": child_loop.run_until_complete(use_inherited())}
            if close_in_child:
                ctx.close()
                out["closed_inherited"] = True
            async def fresh():
                async with adapter.AsyncioContext(8, **kwargs) as c2:
                    assert await c2.write(b"from the child", fd, 4096 * 4) == 14
                    await c2.fsync(fd)
                    assert await c2.read(14, fd, 4096 * 4) == b"from the child"
            child_loop.run_until_complete(fresh())
            child_loop.close()
            out["fresh_context"] = "works"
        child_report(r, w, body)
        # Not sys.exit(): the child is inside the parent's run_until_complete
        # and a normal exit would garbage-collect the inherited loop, whose
        # __del__ closes it - removing the parent's self-pipe from the epoll
        # instance both share (an asyncio hazard, not caio's). The normal
        # exit path is covered by the raw scenarios.
        os._exit(0)
    os.close(w)
    # (read the child's report without blocking this loop for long)
    report.update(await loop.run_in_executor(None, read_report, r))
    status, seconds = await loop.run_in_executor(None, wait_child, pid)
    report["child_exit"] = status
    report["child_exit_seconds"] = round(seconds, 2)
    limit = 5 if close_in_child else 20  # generous: only a hang takes this long
    await asyncio.wait_for(asyncio.gather(*tasks), limit)
    await asyncio.wait_for(writes(32, 128), limit)  # and new work after the child is gone

try:
    loop.run_until_complete(fork_with_work_in_flight())
    report["parent"] = "works"
except asyncio.TimeoutError:
    report["parent"] = "HANG"
ctx.close()
print(json.dumps(report))
"""
)


_LOOP_DEL_310 = re.compile(
    r"Exception ignored in: <function BaseEventLoop\.__del__ at 0x[0-9a-f]+>\n"
    r"Traceback \(most recent call last\):\n(?:  .*\n)*?"
    r"ValueError: Invalid file descriptor: -1\n?"
)


def _run(script: str, *args: str, timeout: float = 90) -> dict[str, Any]:
    proc = run_python(["-c", script, *args], timeout=timeout)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    stderr = proc.stderr
    if sys.version_info < (3, 11):
        # DESIGN.md §6.5 (known gap): on 3.10, a forked child's exit finalises
        # the inherited event loop, whose self-pipe socket is already closed
        # there, and asyncio prints this from BaseEventLoop.__del__. The
        # parent is unaffected (the assertions on the report check it).
        stderr = _LOOP_DEL_310.sub("", stderr)
    noise = [
        line
        for line in stderr.splitlines()
        if "DeprecationWarning" not in line
        and "os.fork()" not in line
        and "self.pid = os.fork()" not in line
        and line.strip()
    ]
    assert not noise, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_child(report: dict[str, Any]) -> None:
    assert "child_error" not in report, report
    assert report["child_exit"] == 0, report  # exited, and promptly
    assert report["child_exit_seconds"] < 10, report
    assert report["fresh_context"] == "works", report
    for method, outcome in report["inherited"].items():
        # Refused with a clear error; cancel() may be a harmless no-op.
        assert outcome.startswith("RuntimeError") or (
            method == "cancel" and outcome == "returned 0"
        ), (method, outcome)
        if outcome.startswith("RuntimeError"):
            assert "mentions fork" in outcome, (method, outcome)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_inherited_idle_context(name: str, tmp_path: Any) -> None:
    report = _run(RAW_IDLE, name, str(tmp_path / "data"))
    _check_child(report)
    assert report["parent"] == "works"
    assert report["file"] == "from the child"
    _count("fork scenarios passed")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_fork_with_operations_in_flight(name: str, tmp_path: Any) -> None:
    """The child of a process with 600 operations in flight exits promptly
    (this hung in the atexit hook before core/pool reset its counters), and
    every one of the parent's operations completes exactly once."""
    report = _run(RAW_BUSY, name, str(tmp_path / "data"))
    _check_child(report)
    assert report["parent_callbacks"] == report["parent_ops"], report
    assert report["parent_data_ok"], report
    _count("fork scenarios passed")


def _async_configs() -> list[Any]:
    configs = []
    for name in sorted(MODULES):
        configs.append(pytest.param(name, {}, id=name))
        if name == "linux_uring":
            configs.append(pytest.param(name, {"sqpoll": True}, id=name + "-sqpoll"))
    return configs


@pytest.mark.parametrize("name,kwargs", _async_configs())
def test_asyncio_fork_with_operations_in_flight(
    name: str,
    kwargs: dict[str, Any],
    tmp_path: Any,
) -> None:
    report = _run(ASYNC_BUSY, name, str(tmp_path / "data"), json.dumps(kwargs), "keep")
    assert "child_error" not in report, report
    assert report["child_exit"] == 0 and report["child_exit_seconds"] < 10, report
    assert report["inherited"]["await write"] == "RuntimeError (mentions fork)", report
    assert report["fresh_context"] == "works", report
    assert report["parent"] == "works", report
    _count("fork scenarios passed")


def _close_configs() -> list[Any]:
    """Every asyncio configuration. close() of an inherited AsyncioContext
    used to call loop.remove_reader() on the inherited loop, whose epoll
    instance is shared with the parent: the parent's eventfd registration
    was deleted and its pending operations hung. The child now leaves the
    loop alone (AsyncioContextBase._remove_loop_reader)."""
    return _async_configs()


@pytest.mark.parametrize("name,kwargs", _close_configs())
def test_closing_inherited_asyncio_context_leaves_parent_working(
    name: str,
    kwargs: dict[str, Any],
    tmp_path: Any,
) -> None:
    report = _run(ASYNC_BUSY, name, str(tmp_path / "data"), json.dumps(kwargs), "close")
    assert "child_error" not in report, report
    assert report.get("closed_inherited") is True, report
    assert report["parent"] == "works", report
    _count("fork scenarios passed")


@pytest.mark.skipif("linux_aio" not in MODULES, reason="linux_aio not available")
def test_child_can_close_many_linux_aio_contexts(tmp_path: Any) -> None:
    """Regression: a child of a process that had just closed linux_aio
    contexts (io_destroy helpers still idle) hung at its 9th close()."""
    script = (
        COMMON
        + r"""
ctxs = [mod.Context(8) for _ in range(40)]
for c in ctxs:
    c.close()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    def body(out):
        for i in range(30):
            mod.Context(8).close()
        out["closed"] = 30
    child_report(r, w, body)
    sys.exit(0)
os.close(w)
report.update(read_report(r))
status, seconds = wait_child(pid)
report["child_exit"] = status
print(json.dumps(report))
"""
    )
    report = _run(script, "linux_aio", str(tmp_path / "unused"))
    assert report == {"closed": 30, "child_exit": 0}, report
    _count("fork scenarios passed")


# The child ends with SystemExit while the frame that created the context is
# still alive (the traceback holds it): interpreter shutdown then finalises
# the parent's event loop in the child. BaseEventLoop.__del__ closes it, and
# close() unregisters the loop's self-pipe from the epoll instance the two
# processes share, so call_soon_threadsafe() no longer wakes the parent's
# loop. python_aio used to deliver completions through call_soon_threadsafe()
# alone: the parent's next read never completed (on 3.12+ at once; on
# 3.10/3.11 the first read usually won a race against the loop going to
# sleep, the second one below did not).
INHERITED_EXIT = (
    COMMON
    + r"""
kwargs = json.loads(sys.argv[3])
adapter = importlib.import_module("caio." + name + "_asyncio")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.pwrite(fd, b"0123456789", 0)

def scenario():
    loop = asyncio.new_event_loop()
    ctx = adapter.AsyncioContext(8, loop=loop, **kwargs)
    first = loop.run_until_complete(asyncio.wait_for(ctx.read(10, fd, 0), 10))
    assert first == b"0123456789", first
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        def body(out):
            async def use_inherited():
                try:
                    await asyncio.wait_for(ctx.read(10, fd, 0), 5)
                    return "worked (!)"
                except RuntimeError as exc:
                    return "RuntimeError" + (" (mentions fork)" if "fork" in str(exc) else "")
                except asyncio.TimeoutError:
                    return "HANG"
            child_loop = asyncio.new_event_loop()
            out["inherited"] = child_loop.run_until_complete(use_inherited())
        child_report(r, w, body)
        # A normal exit while this frame (ctx, loop) is still referenced.
        raise SystemExit(0)
    os.close(w)
    report.update(read_report(r))
    status, seconds = wait_child(pid)
    report["child_exit"] = status

    async def read_again():
        # Right after the child is gone, then once the loop has been idle
        # (asleep in epoll_wait) when the completion arrives.
        outcomes = []
        for pause in (0, 0.05):
            await asyncio.sleep(pause)
            started = time.monotonic()
            task = asyncio.ensure_future(ctx.read(10, fd, 0))
            done, _ = await asyncio.wait({task}, timeout=10)
            seconds = time.monotonic() - started
            report.setdefault("read_seconds", []).append(round(seconds, 3))
            if not done:
                task.cancel()
                outcomes.append("HANG")
            elif seconds > 5:
                # Delivered only when a timer happened to wake the loop (on
                # 3.10/3.11 the wait's own timeout): a healthy read takes
                # milliseconds.
                outcomes.append("STALLED")
            else:
                outcomes.append(task.result().decode())
        return outcomes

    report["parent_reads"] = loop.run_until_complete(read_again())
    ctx.close()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()

scenario()
print(json.dumps(report))
"""
)


def _async_backend_configs() -> list[Any]:
    """Every asyncio configuration the suite has (helpers.async_params)."""
    configs = []
    for param in async_params():
        name, _adapter, kwargs = param.values[0]
        configs.append(pytest.param(name, kwargs, id=param.id))
    return configs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,kwargs", _async_backend_configs())
def test_child_exit_with_inherited_context_leaves_parent_working(
    name: str,
    kwargs: dict[str, Any],
    tmp_path: Any,
) -> None:
    """A child that used an inherited AsyncioContext and exits normally
    (``raise SystemExit``) while the creating frame still references it must
    not stop the parent's next operations from completing."""
    report = _run(INHERITED_EXIT, name, str(tmp_path / "data"), json.dumps(kwargs), timeout=90)
    assert "child_error" not in report, report
    assert report["inherited"] == "RuntimeError (mentions fork)", report
    assert report["child_exit"] == 0, report
    assert report["parent_reads"] == ["0123456789", "0123456789"], report
    _count("fork scenarios passed")
