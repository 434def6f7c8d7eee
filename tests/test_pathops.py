"""Path operations and whole files on every asyncio adapter (DESIGN.md §14),
compared with ``os`` on the same inputs (``pathops_cases.py``)."""

import asyncio
import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from pathops_cases import (
    BIG,
    DATA,
    PERMISSION_SCRIPT,
    compare_all,
    make_permission_tree,
)

import caio

from helpers import AsyncBackend, LoopRunner, subprocess_env


def test_every_case_matches_os(async_backend: AsyncBackend, aio: LoopRunner, tmp_path: Any) -> None:
    async def main() -> int:
        ctx = async_backend.context()
        try:
            return await compare_all(ctx, str(tmp_path))
        finally:
            ctx.close()

    assert aio.run(main(), timeout=120) > 200


def test_every_case_matches_os_without_inline_attempts(
    async_backend: AsyncBackend, aio: LoopRunner, tmp_path: Any
) -> None:
    """The native runner with its loop-thread attempt switched off (every
    job on a worker): the same results as os."""
    if async_backend.module.AsyncioContext._PATH_OPS_TYPE is None:
        pytest.skip("no native runner on this adapter")

    class NoInline(async_backend.module.AsyncioContext):  # type: ignore[name-defined,misc]
        PATH_OPS_INLINE = False

    async def main() -> int:
        ctx = NoInline(**async_backend.kwargs)
        try:
            return await compare_all(ctx, str(tmp_path))
        finally:
            ctx.close()

    assert aio.run(main(), timeout=120) > 200


def test_cached_read_file_and_stat_complete_inline(
    async_backend: AsyncBackend, aio: LoopRunner, tmp_path: Any
) -> None:
    """Native runner: a cached file is read, and a cached path stat'ed, on the
    loop thread (the future is done when returned); a file bigger than the
    inline limit, or a stat that follows a symlink (RESOLVE_CACHED refuses
    to), goes to a worker. (A slice of 10 s: nothing here is cut short.)"""
    if async_backend.module.AsyncioContext._PATH_OPS_TYPE is None:
        pytest.skip("no native runner on this adapter")
    p = tmp_path / "f"
    p.write_bytes(DATA)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(300 * 1024))
    os.symlink("f", tmp_path / "l")

    class LongSlice(async_backend.module.AsyncioContext):  # type: ignore[name-defined,misc]
        PATH_OPS_INLINE_SLICE = 10.0

    async def main() -> None:
        ctx = LongSlice(**async_backend.kwargs)
        try:
            await ctx.read_file(p)  # cached now, and the runner exists
            for _ in range(64):
                fut = ctx.read_file(p)
                assert fut.done()
                assert await fut == DATA
            fut = ctx.read_file(big)
            assert not fut.done()
            assert await fut == big.read_bytes()
            for path, follow, inline in (
                (p, True, True),
                (tmp_path / "l", False, True),
                (tmp_path / "l", True, False),
            ):
                fut = ctx.stat(path, follow_symlinks=follow)
                assert fut.done() is inline
                assert await fut == os.stat(path, follow_symlinks=follow)
        finally:
            ctx.close()

    aio.run(main())


def test_inline_bursts_are_bounded(
    async_backend: AsyncBackend, aio: LoopRunner, tmp_path: Any
) -> None:
    """With a slice of 1 ns, a burst is one job: back-to-back cached reads
    alternate between the loop thread and a worker (whose completion lets
    the loop run), so a task reading cached files still yields."""
    if async_backend.module.AsyncioContext._PATH_OPS_TYPE is None:
        pytest.skip("no native runner on this adapter")
    p = tmp_path / "f"
    p.write_bytes(DATA)

    class TinySlice(async_backend.module.AsyncioContext):  # type: ignore[name-defined,misc]
        PATH_OPS_INLINE_SLICE = 1e-9

    async def main() -> None:
        ctx = TinySlice(**async_backend.kwargs)
        try:
            await ctx.read_file(p)
            done = []
            for _ in range(200):
                fut = ctx.read_file(p)
                done.append(fut.done())
                assert await fut == DATA
            # (A job more than 1 ms after the previous one starts a new
            # burst, so a preempted run may see more inline ones.)
            assert done.count(False) >= 20, done
            assert done.count(True) >= 20, done
        finally:
            ctx.close()

    aio.run(main())


def test_native_adapters_use_the_native_runner(async_backend: AsyncBackend) -> None:
    native = getattr(caio, async_backend.name)
    ops_type = async_backend.module.AsyncioContext._PATH_OPS_TYPE
    if async_backend.name == "python_aio":
        assert ops_type is None
    else:
        assert ops_type is native._PathOps


def test_results_and_types(async_backend: AsyncBackend, aio: LoopRunner, tmp_path: Any) -> None:
    p = tmp_path / "f"

    async def main() -> None:
        ctx = async_backend.context()
        try:
            assert await ctx.write_file(p, DATA, mode=0o600, fsync=True) == len(DATA)
            assert (os.stat(p).st_mode & 0o777) == 0o600
            assert await ctx.read_file(p) == DATA
            assert await ctx.write_file(str(p), memoryview(BIG)) == len(BIG)
            assert await ctx.read_file(os.fsencode(p)) == BIG
            st = await ctx.stat(p)
            ref = os.stat(p)
            assert type(st) is os.stat_result
            assert st == ref
            for field in (
                "st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
                "st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns",
                "st_ctime_ns", "st_blksize", "st_blocks", "st_rdev",
            ):  # fmt: skip
                assert getattr(st, field) == getattr(ref, field), field
                assert type(getattr(st, field)) is type(getattr(ref, field)), field
            assert tuple(st) == tuple(ref)
            null = await ctx.stat("/dev/null")
            assert null.st_rdev == os.stat("/dev/null").st_rdev != 0
            fd = await ctx.open(p, os.O_RDWR)
            try:
                assert not os.get_inheritable(fd)
                assert await ctx.ftruncate(fd, 10) is None
                assert os.fstat(fd).st_size == 10
                assert await ctx.fallocate(fd, 0, 8192) is None
                assert os.fstat(fd).st_size == 8192
                assert await ctx.fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED) is None
            finally:
                assert await ctx.close_fd(fd) is None
            with pytest.raises(OSError) as e:
                os.fstat(fd)
            assert e.value.errno == 9
            # /proc files report size 0: read to the end anyway.
            status = await ctx.read_file("/proc/self/status")
            assert status.startswith(b"Name:")
        finally:
            ctx.close()

    aio.run(main())


def test_argument_errors_raise_at_call_time(
    async_backend: AsyncBackend, aio: LoopRunner, tmp_path: Any
) -> None:
    async def main() -> None:
        ctx = async_backend.context()
        try:
            with pytest.raises(TypeError):
                ctx.stat(1.5)
            with pytest.raises(TypeError):
                ctx.read_file(None)
            with pytest.raises(ValueError, match="embedded null"):
                ctx.open("a\0b")
            with pytest.raises(ValueError, match="embedded null"):
                ctx.rename(b"ok", b"a\0b")
            with pytest.raises(ValueError):
                ctx.stat(0, dir_fd=3)
            with pytest.raises(TypeError):
                ctx.ftruncate("3", 0)
            with pytest.raises(TypeError):
                ctx.write_file(tmp_path / "x", "text")
            with pytest.raises(OverflowError):
                await ctx.open(tmp_path / "x", 1 << 70)
        finally:
            ctx.close()

    aio.run(main())


def test_closed_context_refuses_path_ops(
    async_backend: AsyncBackend, aio: LoopRunner, tmp_path: Any
) -> None:
    (tmp_path / "f").write_bytes(b"x")

    async def main() -> None:
        ctx = async_backend.context()
        assert await ctx.read_file(tmp_path / "f") == b"x"
        pending = ctx.read_file(tmp_path / "f")
        ctx.close()
        # Started before close(): still delivered.
        assert await pending == b"x"
        with pytest.raises(RuntimeError, match="closed"):
            await ctx.read_file(tmp_path / "f")
        ctx2 = async_backend.context()
        ctx2.close()
        with pytest.raises(RuntimeError, match="closed"):
            await ctx2.stat(tmp_path)

    aio.run(main())


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_cancelled_opens_do_not_leak_fds(
    async_backend: AsyncBackend, aio: LoopRunner, tmp_path: Any
) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x")

    async def main() -> None:
        ctx = async_backend.context()
        await ctx.stat(p)  # the runner exists: its own fds are counted
        before = _fd_count()
        for round_ in range(6):
            tasks = [asyncio.ensure_future(ctx.open(p)) for _ in range(200)]
            # Odd rounds: cancelled before their first step (the open was
            # submitted at call time, its awaitable is never awaited).
            for _ in range(round_ % 2 * 2):
                await asyncio.sleep(0)
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, int):
                    os.close(r)
            # (An open whose task was cancelled before its first step is
            # never awaited: dropping it closes its fd.)
            del tasks, results
        # Wait (bounded) until the runner has delivered every job (a
        # cancelled open's fd is closed then).
        runner = ctx._path_runner
        for _ in range(4000):
            gc.collect()
            if runner.in_flight() == 0:
                break
            await asyncio.sleep(0.005)
        assert runner.in_flight() == 0
        assert _fd_count() == before
        ctx.close()

    aio.run(main())


def test_many_concurrent_read_files(
    async_backend: AsyncBackend, aio: LoopRunner, tmp_path: Any
) -> None:
    names = []
    for i in range(300):
        q = tmp_path / f"f{i}"
        q.write_bytes(os.urandom(i * 37))
        names.append(q)

    async def main() -> None:
        ctx = async_backend.context()
        try:
            got = await asyncio.gather(*(ctx.read_file(q) for q in names))
            assert got == [q.read_bytes() for q in names]
        finally:
            ctx.close()

    aio.run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_permission_denied_matches_os(async_backend: AsyncBackend) -> None:
    root = tempfile.mkdtemp(prefix="caio-perm-")
    try:
        os.chmod(root, 0o755)
        tree = os.path.join(root, "t")
        make_permission_tree(tree)
        proc = subprocess.run(
            [sys.executable, "-c", PERMISSION_SCRIPT, tree, async_backend.module.__name__],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "[]", proc.stdout
    finally:
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
        import shutil

        shutil.rmtree(root)


def test_write_file_then_read_file_round_trip_bytes_path(aio: LoopRunner, tmp_path: Any) -> None:
    # The default AsyncioContext (best backend here).
    async def main() -> None:
        async with caio.AsyncioContext() as ctx:
            target = os.fsencode(tmp_path / "é.bin")
            assert await ctx.write_file(target, b"abc") == 3
            assert Path(os.fsdecode(target)).read_bytes() == b"abc"
            assert await ctx.read_file(target) == b"abc"
            await ctx.mkdir(tmp_path / "d", 0o700)
            await ctx.rename(target, tmp_path / "d" / "x")
            await ctx.unlink(tmp_path / "d" / "x")
            assert os.listdir(tmp_path / "d") == []

    aio.run(main())
