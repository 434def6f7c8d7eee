"""Path operations as io_uring opcodes on linux_uring (DESIGN.md §14): the
ring really runs them (the runner's ``engine_jobs()`` count), with the same
results as ``os``; opcodes the probe denies (the ``CAIO_TEST_URING_PATH_MASK``
test hook) go to the workers with the same results; ``read_file``'s linked
chain reads every kind of file to its end; cancellation and a loop closed
with a chain in flight neither leak nor hang."""

import asyncio
import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from pathops_cases import compare_all

from helpers import LoopRunner, subprocess_env

uring_asyncio = pytest.importorskip("caio.linux_uring_asyncio")
linux_uring = pytest.importorskip("caio.linux_uring")

needs_test_hooks = pytest.mark.skipif(
    not linux_uring._TEST_HOOKS,
    reason="built without the test-hooks cargo feature (CAIO_TEST_HOOKS=1): CAIO_TEST_* unread",
)

IORING_OP_OPENAT = 18
IORING_OP_STATX = 21


class RingOnly(uring_asyncio.AsyncioContext):  # type: ignore[misc,name-defined]
    """No loop-thread attempts: every job goes to the runner (ring first)."""

    PATH_OPS_INLINE = False


def engine_jobs(ctx: Any) -> int:
    n: int = ctx._path_runner._ops.engine_jobs()
    return n


def test_ring_runs_every_case_like_os(aio: LoopRunner, tmp_path: Any) -> None:
    async def main() -> int:
        ctx = RingOnly()
        try:
            n = await compare_all(ctx, str(tmp_path))
            # Every path call but write_file has an opcode on this kernel.
            assert engine_jobs(ctx) > n // 2
            return n
        finally:
            ctx.close()

    assert aio.run(main(), timeout=120) > 200


@needs_test_hooks
def test_masked_opcodes_go_to_workers_with_the_same_results(
    aio: LoopRunner, tmp_path: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CAIO_TEST_URING_PATH_MASK", "all")

    async def main() -> int:
        ctx = RingOnly()
        try:
            n = await compare_all(ctx, str(tmp_path))
            assert engine_jobs(ctx) == 0
            return n
        finally:
            ctx.close()

    assert aio.run(main(), timeout=120) > 200


@needs_test_hooks
def test_one_masked_opcode_sends_only_its_calls_to_workers(
    aio: LoopRunner, tmp_path: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CAIO_TEST_URING_PATH_MASK", str(IORING_OP_OPENAT))
    p = tmp_path / "f"
    p.write_bytes(b"data")

    async def main() -> None:
        ctx = RingOnly()
        try:
            assert await ctx.read_file(p) == b"data"  # OPENAT denied: a worker
            fd = await ctx.open(p)  # likewise
            os.close(fd)
            assert engine_jobs(ctx) == 0
            assert await ctx.stat(p) == os.stat(p)  # STATX: the ring
            assert engine_jobs(ctx) == 1
        finally:
            ctx.close()

    aio.run(main())


def test_read_file_chain_reads_every_size_to_its_end(aio: LoopRunner, tmp_path: Any) -> None:
    sizes = [0, 1, 4096, 65535, 65536, 65537, 65538, 200_000, 3 * 1024 * 1024 + 7]
    paths = []
    for s in sizes:
        q = tmp_path / f"f{s}"
        q.write_bytes(os.urandom(s))
        paths.append(q)
    others = ["/proc/self/mountinfo", "/proc/self/status", "/proc/cpuinfo"]

    async def main() -> None:
        ctx = RingOnly()
        try:
            got = await asyncio.gather(*(ctx.read_file(q) for q in paths))
            assert got == [q.read_bytes() for q in paths]
            for name in others:
                data = await ctx.read_file(name)
                # Same first line as a synchronous read (their later lines
                # may change between two reads).
                with open(name, "rb") as f:
                    assert data.split(b"\n")[0] == f.read().split(b"\n")[0]
            with pytest.raises(IsADirectoryError) as e:
                await ctx.read_file(tmp_path)
            assert e.value.filename == str(tmp_path)
            assert engine_jobs(ctx) == len(paths) + len(others) + 1
        finally:
            ctx.close()

    aio.run(main(), timeout=60)


def _write_later(path: str, chunks: list[bytes], pause: float) -> threading.Thread:
    def writer() -> None:
        with open(path, "wb", buffering=0) as f:
            for c in chunks:
                time.sleep(pause)
                f.write(c)

    t = threading.Thread(target=writer)
    t.start()
    return t


def test_read_file_of_a_fifo_reads_until_the_writer_closes(aio: LoopRunner, tmp_path: Any) -> None:
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    chunks = [b"a" * 10, b"b" * 70_000, b"c" * 5]

    async def main() -> None:
        ctx = RingOnly()
        try:
            t = _write_later(fifo, chunks, 0.05)
            assert await ctx.read_file(fifo) == b"".join(chunks)
            t.join()
            assert engine_jobs(ctx) == 1
        finally:
            ctx.close()

    aio.run(main(), timeout=60)


def test_cancelled_read_file_chain_finishes_and_frees_its_slot(
    aio: LoopRunner, tmp_path: Any
) -> None:
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)

    async def main() -> None:
        ctx = RingOnly()
        try:
            task = asyncio.ensure_future(ctx.read_file(fifo))  # the open waits for a writer
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            runner = ctx._path_runner
            assert runner.in_flight() == 1  # the kernel still holds the chain
            _write_later(fifo, [b"late"], 0.0).join()
            for _ in range(2000):
                if runner.in_flight() == 0:
                    break
                await asyncio.sleep(0.005)
            assert runner.in_flight() == 0
            # Every slot is free again: more chains than slots still work.
            p = tmp_path / "f"
            p.write_bytes(b"z" * 100)
            got = await asyncio.gather(*(ctx.read_file(p) for _ in range(600)))
            assert got == [b"z" * 100] * 600
        finally:
            ctx.close()

    aio.run(main(), timeout=60)


LOOP_CLOSED_SCRIPT = r"""
import asyncio, gc, os, sys
import caio.linux_uring_asyncio as m

class RingOnly(m.AsyncioContext):
    PATH_OPS_INLINE = False

fifo = sys.argv[1]
loop = asyncio.new_event_loop()
ctx = RingOnly(loop=loop)
async def start():
    fut = ctx.read_file(fifo)  # the open waits for a writer that never comes
    await asyncio.sleep(0.1)
    return fut
fut = loop.run_until_complete(start())
fut.cancel()
loop.close()
del ctx, fut
gc.collect()
print("done")
"""


def test_loop_closed_with_a_chain_in_flight_does_not_hang(tmp_path: Any) -> None:
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-c", LOOP_CLOSED_SCRIPT, fifo],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"


FORK_SCRIPT = r"""
import asyncio, gc, os, sys
import caio.linux_uring_asyncio as m

class RingOnly(m.AsyncioContext):
    PATH_OPS_INLINE = False

path, fifo = sys.argv[1], sys.argv[2]
loop = asyncio.new_event_loop()
ctx = RingOnly(loop=loop)
assert loop.run_until_complete(ctx.read_file(path)) == b"data"
fut = ctx.read_file(fifo)  # in flight in the parent's ring across the fork
pid = os.fork()
if pid == 0:
    try:
        ctx.read_file(path)
    except RuntimeError:
        pass
    else:
        os._exit(3)
    del ctx, fut  # the child's copy is dropped: it must not touch the parent's ring
    gc.collect()
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
with open(fifo, "wb") as w:
    w.write(b"after fork")
assert loop.run_until_complete(fut) == b"after fork"
assert loop.run_until_complete(ctx.read_file(path)) == b"data"
assert ctx._path_runner._ops.engine_jobs() == 3
ctx.close()
loop.close()
print("done")
"""


def test_fork_leaves_the_parents_ring_alone(tmp_path: Any) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"data")
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, str(p), fifo],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
