"""Shutdown with operations in flight, in subprocesses, for every adapter
configuration on every loop kind.

Scenarios (``SCENARIOS``), each started while 32 x 1 MiB writes and 4 fsyncs
are in flight (io_uring also has reads of an empty pipe that never complete):

* ``exit_in_run``   ``sys.exit()`` inside ``asyncio.run()``;
* ``exit_pending``  the interpreter exits with the loop still open and the
                    operations' tasks pending (nothing closed);
* ``run_returns``   ``asyncio.run()`` returns while the operations are
                    pending (asyncio.run cancels them), the AsyncioContext
                    is never closed - it is just dropped;
* ``run_closes``    ``async with AsyncioContext()``: the context is closed
                    while the operations are in flight, then asyncio.run
                    cancels them;
* ``loop_close``    ``loop.close()`` with the tasks still pending, then
                    ``ctx.close()``;
* ``loop_drop``     ``loop.close()`` with the tasks still pending, and the
                    context is never closed - everything is dropped.

Each must exit 0 before a (generous) time limit, with a stderr free of
tracebacks, "exception was never retrieved" and "Task was destroyed but it
is pending" - except, in the ``loop_close``/``loop_drop``/``exit_pending``
scenarios, the latter for the *user's own* tasks (named ``user-N``), which
asyncio reports by design when a loop is abandoned with them pending.
Where the process goes on after the loop is gone, its threads and file
descriptors come back to what they were before the first context was made
(only the main thread is left; io_uring's kernel ``iou-*`` threads, which the
kernel retires on its own timer, and linux_aio's one process-wide io_destroy
helper are not counted) and a fresh loop and context still work.
"""

import json
import re
from typing import Any

import pytest

from helpers import LOOP_KINDS, async_params, run_python, subprocess_env

STATS: dict[str, int] = {}

SCENARIOS = ["exit_in_run", "exit_pending", "run_returns", "run_closes", "loop_close", "loop_drop"]

#: Scenarios after which the process checks its threads and fds.
CHECKED = {"run_returns", "run_closes", "loop_close", "loop_drop"}

#: Scenarios that abandon pending user tasks (asyncio reports those).
ABANDONS_TASKS = {"exit_pending", "loop_close", "loop_drop"}

SCRIPT = r'''
import asyncio, gc, importlib, json, os, sys, threading, time
name, kwargs, loop_kind, scenario, directory = (
    sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
if loop_kind == "uvloop":
    import uvloop
adapter = importlib.import_module("caio." + name + "_asyncio")


def new_loop():
    return uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()


def run(coro):
    # asyncio.run() for either loop kind (uvloop.run needs uvloop >= 0.18).
    if loop_kind == "uvloop":
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) if hasattr(asyncio, "Runner") \
                else _Runner() as runner:
            return runner.run(coro)
    return asyncio.run(coro)


class _Runner:
    # Python < 3.11: what asyncio.run does, on a uvloop loop.
    def __enter__(self):
        self.loop = new_loop()
        asyncio.set_event_loop(self.loop)
        return self

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def __exit__(self, *exc):
        try:
            tasks = asyncio.all_tasks(self.loop)
            for t in tasks:
                t.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            self.loop.close()


def threads():
    """This process's threads, without io_uring's kernel threads (``iou-*``,
    retired by the kernel on its own timer) and linux_aio's process-wide
    io_destroy helper (``caio-aio-destro``, started at import)."""
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/comm" % tid) as f:
                comm = f.read().strip()
        except OSError:
            continue
        if not comm.startswith(("iou-", "caio-aio-destro")):
            out.append(comm)
    return sorted(out)


def fds():
    return sorted(int(x) for x in os.listdir("/proc/self/fd"))


fd = os.open(os.path.join(directory, "data.bin"), os.O_RDWR | os.O_CREAT, 0o600)
pipe_r, pipe_w = os.pipe()
# uvloop keeps a process-wide pipe from its first loop on: make it first.
_first = new_loop()
_first.run_until_complete(asyncio.sleep(0))
_first.close()
del _first
THREADS, FDS = ["main"], fds()


def start(ctx):
    """Starts the operations; returns their tasks (named user-N)."""
    coros = [ctx.write(b"w" * (1 << 20), fd, i << 20) for i in range(32)]
    coros += [ctx.fsync(fd) for _ in range(4)]
    if name == "linux_uring":
        coros += [ctx.read(16, pipe_r, -1) for _ in range(2)]  # never complete
    tasks = [asyncio.ensure_future(c) for c in coros]
    for i, t in enumerate(tasks):
        t.set_name("user-%d" % i)
    return tasks


async def started(ctx):
    tasks = start(ctx)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return tasks


def settle(what):
    """Waits (bounded) for threads and fds to come back; reports them."""
    deadline = time.monotonic() + float(os.environ.get("CAIO_SETTLE_SECONDS", "20"))
    while True:
        gc.collect()
        now_threads, now_fds = threads(), fds()
        if (len(now_threads) == 1 and now_fds == FDS) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return {"threads_before": THREADS, "threads_after": now_threads,
            "fds_before": FDS, "fds_after": now_fds}


async def still_works():
    async with adapter.AsyncioContext(8, **kwargs) as ctx:
        assert await ctx.write(b"fresh", fd, 64 << 20) == 5
        assert await ctx.read(5, fd, 64 << 20) == b"fresh"
        await ctx.fdsync(fd)


if scenario == "exit_in_run":
    async def main():
        ctx = adapter.AsyncioContext(64, **kwargs)
        await started(ctx)
        sys.exit(0)
    run(main())
    raise AssertionError("not reached")

if scenario == "exit_pending":
    loop = new_loop()
    asyncio.set_event_loop(loop)
    ctx = adapter.AsyncioContext(64, loop=loop, **kwargs)
    tasks = loop.run_until_complete(started(ctx))
    print(json.dumps({"pending": sum(not t.done() for t in tasks)}), flush=True)
    sys.exit(0)

if scenario == "run_returns":
    async def main():
        ctx = adapter.AsyncioContext(64, **kwargs)
        await started(ctx)
    run(main())

elif scenario == "run_closes":
    async def main():
        async with adapter.AsyncioContext(64, **kwargs) as ctx:
            await started(ctx)
    run(main())

elif scenario in ("loop_close", "loop_drop"):
    loop = new_loop()
    asyncio.set_event_loop(loop)
    ctx = adapter.AsyncioContext(64, loop=loop, **kwargs)
    tasks = loop.run_until_complete(started(ctx))
    asyncio.set_event_loop(None)
    loop.close()
    if scenario == "loop_close":
        ctx.close()
    del ctx, tasks, loop

report = settle(scenario)
run(still_works())
again = settle(scenario)
report["after_still_works"] = len(again["threads_after"]) == 1 and again["fds_after"] == FDS
print(json.dumps(report), flush=True)
'''


def _params() -> list[Any]:
    params = []
    for p in async_params():
        name, _module, kwargs = p.values[0]
        for kind in LOOP_KINDS:
            if kind != "asyncio" and kwargs:
                continue  # the extra configurations on asyncio's loop only
            for scenario in SCENARIOS:
                params.append(
                    pytest.param(
                        name,
                        kwargs,
                        kind,
                        scenario,
                        id=f"{p.id}-{kind}-{scenario}",
                    )
                )
    return params


TASK_DESTROYED = re.compile(
    r"^Task was destroyed but it is pending!\ntask: <Task pending name='(?P<name>[^']*)'",
    re.M,
)


def check_stderr(stderr: str, scenario: str) -> None:
    text = stderr
    user_tasks = 0
    if scenario in ABANDONS_TASKS:
        # asyncio's report of the user's abandoned tasks: allowed, but only
        # for tasks the script made (user-N), one line pair each.
        for match in TASK_DESTROYED.finditer(stderr):
            assert match.group("name").startswith("user-"), stderr[-3000:]
            user_tasks += 1
        text = re.sub(
            r"^Task was destroyed but it is pending!\ntask: <Task pending name='user-\d+'[^\n]*\n?",
            "",
            stderr,
            flags=re.M,
        )
    for noise in (
        "Traceback",
        "Task was destroyed",
        "never retrieved",
        "Exception ignored",
        "Error",
        "Fatal",
        "Segmentation",
        "Aborted",
        "panicked",
    ):
        assert noise not in text, text[-3000:]
    assert text.strip() == "", text[-3000:]
    STATS["abandoned user tasks reported by asyncio"] = (
        STATS.get("abandoned user tasks reported by asyncio", 0) + user_tasks
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,kwargs,loop_kind,scenario", _params())
def test_shutdown_with_operations_in_flight(
    name: str,
    kwargs: dict[str, Any],
    loop_kind: str,
    scenario: str,
    tmp_path: Any,
) -> None:
    proc = run_python(
        ["-c", SCRIPT, name, json.dumps(kwargs), loop_kind, scenario, str(tmp_path)],
        env=subprocess_env(CAIO_SETTLE_SECONDS="20"),
        timeout=90,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    check_stderr(proc.stderr, scenario)
    STATS["shutdown subprocesses"] = STATS.get("shutdown subprocesses", 0) + 1
    if scenario == "exit_in_run":
        assert proc.stdout == ""
        return
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if scenario == "exit_pending":
        assert report["pending"] > 0, report  # really exited with work pending
        return
    # Only the main thread is left (names may differ: count them).
    assert len(report["threads_after"]) == 1, report
    assert report["fds_after"] == report["fds_before"], report
    assert report["after_still_works"], report


def _native_params() -> list[Any]:
    return [
        pytest.param(p.values[0][0], p.values[0][2], id=p.id)
        for p in async_params()
        if p.values[0][0] != "python_aio"
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,kwargs", _native_params())
def test_loop_close_drains_and_releases_in_process(
    name: str,
    kwargs: dict[str, Any],
    tmp_path: Any,
) -> None:
    """``loop.close()`` with operations in flight: the adapter notices it
    (through the reader the loop drops), refuses new operations, drains and
    releases its backend before ``close()`` returns - the io_uring read of an
    idle pipe, which would never complete, is cancelled - and resolves no
    future of the closed loop."""
    import asyncio
    import importlib
    import os

    adapter = importlib.import_module("caio." + name + "_asyncio")
    fd = os.open(str(tmp_path / "data.bin"), os.O_RDWR | os.O_CREAT, 0o600)
    pipe_r, pipe_w = os.pipe()
    loop = asyncio.new_event_loop()
    try:
        ctx = adapter.AsyncioContext(16, loop=loop, **kwargs)
        coros = [ctx.write(b"w" * (1 << 20), fd, i << 20) for i in range(8)]
        coros.append(ctx.fsync(fd))
        if name == "linux_uring":
            coros.append(ctx.read(16, pipe_r, -1))  # never completes
        tasks = [loop.create_task(c) for c in coros]
        loop.run_until_complete(asyncio.sleep(0))
        assert not ctx._released()
        loop.close()
        assert ctx._released()
        with pytest.raises(RuntimeError, match="closed"):
            ctx.write(b"late", fd, 0).send(None)
        if name == "linux_uring":
            assert not tasks[-1].done()  # its future was dropped, not resolved
        for t in tasks:
            t._log_destroy_pending = False  # abandoned on purpose
        ctx.close()  # still fine
    finally:
        if not loop.is_closed():
            loop.close()
        for f in (fd, pipe_r, pipe_w):
            os.close(f)


STUCK_WORKER = r"""
import asyncio, os, sys
from caio import thread_aio
from caio.thread_aio_asyncio import AsyncioContext
assert thread_aio._TEST_HOOKS
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)

async def main():
    ctx = AsyncioContext(4)
    # The write's worker sleeps 60 s first (CAIO_TEST_POOL_STALL_MS): stuck.
    task = asyncio.ensure_future(ctx.write(b"stuck", fd, 0))
    await asyncio.sleep(0.05)
    print("leaving with the write in flight", flush=True)

asyncio.run(main())  # cancels the task and closes the loop: "loop gone"
print("asyncio.run returned", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_stuck_thread_aio_worker_does_not_hang_loop_gone_or_exit(tmp_path: Any) -> None:
    """DESIGN.md §5.7, §9.4: thread_aio's loop-gone drain and the interpreter's
    exit wait for the pool's workers only up to their bounds: a worker stuck in
    its I/O is left behind with its operation (and its memory) instead of
    hanging the process. The bounds are shortened by CAIO_TEST_SHUTDOWN_WAIT_MS;
    the write stalls for 60 s, the subprocess gets 30."""
    thread_aio = pytest.importorskip("caio.thread_aio", reason="thread_aio is not built here")
    if not thread_aio._TEST_HOOKS:
        pytest.skip("needs a build with the test hooks")
    proc = run_python(
        ["-c", STUCK_WORKER, str(tmp_path / "data.bin")],
        env=subprocess_env(CAIO_TEST_POOL_STALL_MS="60000", CAIO_TEST_SHUTDOWN_WAIT_MS="200"),
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "leaving with the write in flight",
        "asyncio.run returned",
    ]
    check_stderr(proc.stderr, "run_returns")
    assert (tmp_path / "data.bin").stat().st_size == 0  # the write was really stuck
