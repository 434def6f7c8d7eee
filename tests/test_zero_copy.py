"""Zero-copy I/O (issue 13, DESIGN.md §3.4, §5.5, §8.4): ``write()`` from any
C-contiguous buffer, ``readinto()`` into the caller's buffer.

The rules checked on every backend:

* the buffer's export is held from the call until the engine is done with
  it (a ``bytearray`` cannot be resized meanwhile: ``BufferError``) and
  released exactly once afterwards — on success, error and cancellation;
* the buffer is the caller's again when the await ends, however it ends: a
  cancelled ``readinto`` resumes its task only once the engine is done, so a
  sentinel written into the buffer right after the cancellation stays
  intact;
* bad buffers are refused at call time with ``TypeError``/``ValueError``.
"""

import array
import asyncio
import mmap
import os
from typing import Any

import pytest

from helpers import AsyncBackend, RawBackend, read_file

DATA = bytes(range(256)) * 64  # 16 KiB


def _fill(fd: int, data: bytes) -> None:
    os.pwrite(fd, data, 0)


# -- write() from any buffer -------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda b: bytearray(b),
        lambda b: memoryview(b"--" + b + b"--")[2:-2],
        lambda b: memoryview(bytearray(b)),
        lambda b: array.array("B", b),
        lambda b: array.array("i", b),  # len() counts items: nbytes must not
    ],
    ids=["bytearray", "memoryview-slice", "memoryview-bytearray", "array-B", "array-i"],
)
def test_write_accepts_any_contiguous_buffer(
    async_backend: AsyncBackend, aio: Any, tmp_fd: int, make: Any
) -> None:
    payload = make(b"0123456789abcdef")

    async def main() -> None:
        ctx = async_backend.context()
        try:
            assert await ctx.write(payload, tmp_fd, 3) == 16
        finally:
            ctx.close()

    aio.run(main())
    assert read_file(tmp_fd) == b"\0\0\x000123456789abcdef"


def test_write_from_mmap(async_backend: AsyncBackend, aio: Any, tmp_fd: int) -> None:
    m = mmap.mmap(-1, 8192)
    m[:5] = b"hello"

    async def main() -> None:
        ctx = async_backend.context()
        try:
            assert await ctx.write(m, tmp_fd, 0) == 8192
        finally:
            ctx.close()

    aio.run(main())
    m.close()  # no export left behind
    assert read_file(tmp_fd)[:6] == b"hello\0"


def test_write_refuses_non_buffers_and_non_contiguous(
    async_backend: AsyncBackend, aio: Any, tmp_fd: int
) -> None:
    async def main() -> None:
        ctx = async_backend.context()
        try:
            for bad in ("text", ["a"], 12, None):
                # python_aio takes len() first: no len() is its TypeError
                # (DESIGN.md §3.2).
                no_len = async_backend.name == "python_aio" and bad in (12, None)
                with pytest.raises(TypeError if no_len else ValueError):
                    ctx.write(bad, tmp_fd, 0)
            with pytest.raises(ValueError, match="C-contiguous"):
                ctx.write(memoryview(bytearray(8))[::2], tmp_fd, 0)
        finally:
            ctx.close()

    aio.run(main())


def test_raw_write_releases_export_at_completion(backend: RawBackend, tmp_fd: int) -> None:
    ctx = backend.context()
    payload = bytearray(b"abc")
    op = backend.Operation.write(payload, tmp_fd, 0)
    with pytest.raises(BufferError):
        payload.extend(b"d")  # pinned from construction
    assert backend.run_one(ctx, op) == 3
    assert op.get_value() == 3
    payload.extend(b"d")  # released at completion, the op still alive
    assert read_file(tmp_fd) == b"abc"


# -- readinto() -------------------------------------------------------------------


def test_readinto_fills_the_callers_buffers(
    async_backend: AsyncBackend, aio: Any, tmp_fd: int
) -> None:
    _fill(tmp_fd, DATA)
    ba = bytearray(100)
    m = mmap.mmap(-1, 4096)
    arr = array.array("i", [0] * 8)
    big = bytearray(b"\xee" * (len(DATA) + 50))

    async def main() -> None:
        ctx = async_backend.context()
        try:
            assert await ctx.readinto(ba, tmp_fd, 10) == 100
            view = memoryview(m)
            assert await ctx.readinto(view[100:200], tmp_fd, 0) == 100
            view.release()
            assert await ctx.readinto(arr, tmp_fd, 4) == 32
            # Short at end of file; the rest of the buffer is left alone.
            assert await ctx.readinto(big, tmp_fd, 0) == len(DATA)
            assert await ctx.readinto(bytearray(8), tmp_fd, len(DATA)) == 0
            assert await ctx.readinto(bytearray(), tmp_fd, 0) == 0
            # Keywords and defaults as documented.
            assert await ctx.readinto(buffer=bytearray(4), fd=tmp_fd) == 4
        finally:
            ctx.close()

    aio.run(main())
    assert ba == DATA[10:110]
    assert m[100:200] == DATA[:100] and m[:100] == b"\0" * 100
    assert arr.tobytes() == DATA[4:36]
    assert big[: len(DATA)] == DATA and big[len(DATA) :] == b"\xee" * 50
    ba.extend(b"x")  # export released
    m.close()


def test_readinto_at_every_copy_distance(
    async_backend: AsyncBackend, aio: Any, tmp_fd: int
) -> None:
    """Large reads into memory a few bytes past a page boundary (where
    malloc puts a big bytearray) go through a scratch buffer on x86-64
    Linux (DESIGN.md §11.3, copy distance): whatever the distance between
    the destination and the file offset, and however the read ends (end of
    file inside a piece, or after several pieces), the bytes land exactly
    where asked and nowhere else."""
    size = 700 * 1024  # more than two scratch pieces
    data = os.urandom(size + 5000)
    _fill(tmp_fd, data)
    arena = mmap.mmap(-1, size + 3 * 4096)

    async def main() -> None:
        ctx = async_backend.context()
        try:
            for shift in (0, 1, 16, 31, 32, 2048, 4095):
                for offset in (0, 100, 4096 * 3, size + 5000 - 20 * 1024):
                    arena[:] = b"\xee" * len(arena)
                    view = memoryview(arena)[4096 + shift : 4096 + shift + size]
                    try:
                        got = await ctx.readinto(view, tmp_fd, offset)
                    finally:
                        view.release()
                    want = data[offset : offset + size]
                    assert got == len(want), (shift, offset)
                    start = 4096 + shift
                    assert arena[start : start + got] == want, (shift, offset)
                    assert arena[:start] == b"\xee" * start, (shift, offset)
                    assert arena[start + got :] == b"\xee" * (len(arena) - start - got)
        finally:
            ctx.close()

    aio.run(main())
    arena.close()


def test_readinto_refuses_bad_buffers_at_call_time(
    async_backend: AsyncBackend, aio: Any, tmp_fd: int
) -> None:
    async def main() -> None:
        ctx = async_backend.context()
        try:
            for ro in (b"abc", memoryview(b"abc"), memoryview(bytearray(3)).toreadonly()):
                with pytest.raises(TypeError, match="writable"):
                    ctx.readinto(ro, tmp_fd, 0)
            for bad in ("abc", 12, None, [0]):
                with pytest.raises(TypeError):
                    ctx.readinto(bad, tmp_fd, 0)
            with pytest.raises(ValueError, match="C-contiguous"):
                ctx.readinto(memoryview(bytearray(8))[::2], tmp_fd, 0)
            with pytest.raises(TypeError):
                ctx.readinto(bytearray(4), "fd", 0)
            if async_backend.name != "python_aio":  # it checks no range (§3.2)
                with pytest.raises(OverflowError):
                    ctx.readinto(bytearray(4), tmp_fd, 2**70)
        finally:
            ctx.close()

    aio.run(main())


def test_readinto_export_held_until_done_then_released(
    async_backend: AsyncBackend, aio: Any, tmp_fd: int, closed_fd: int
) -> None:
    _fill(tmp_fd, DATA)

    async def main() -> None:
        ctx = async_backend.context()
        try:
            ok, bad = bytearray(16), bytearray(16)
            pending = ctx.readinto(ok, tmp_fd, 0)
            with pytest.raises(BufferError):
                ok.extend(b"x")
            assert await pending == 16
            ok.extend(b"x")  # success: released
            mv = memoryview(bytearray(16))
            pending = ctx.readinto(mv, tmp_fd, 0)
            if async_backend.name != "python_aio":
                # A native export is taken on the memoryview itself, so it
                # cannot be released meanwhile. python_aio's memoryview of
                # it shares the underlying export instead (DESIGN.md §3.8):
                # the memory stays valid either way.
                with pytest.raises(BufferError):
                    mv.release()
            assert await pending == 16
            del pending
            mv.release()
            failing = ctx.readinto(bad, closed_fd, 0)
            with pytest.raises(BufferError):
                bad.extend(b"x")
            with pytest.raises(OSError):
                await failing
            del failing
            bad.extend(b"x")  # error: released
        finally:
            ctx.close()

    aio.run(main())


def test_raw_readinto_operation(backend: RawBackend, tmp_fd: int) -> None:
    _fill(tmp_fd, DATA)
    ctx = backend.context()
    buf = bytearray(b"\xaa" * 32)
    op = backend.Operation.readinto(buf, tmp_fd, len(DATA) - 8)
    assert op.get_value() == 0  # not run yet
    assert op.payload is buf
    with pytest.raises(BufferError):
        buf.extend(b"x")
    result = backend.run_one(ctx, op)
    assert op.get_value() == 8
    if backend.native:
        assert result == 8  # the callback gets the byte count
    assert op.payload is buf
    assert buf == DATA[-8:] + b"\xaa" * 24  # the tail is not zeroed
    buf.extend(b"x")  # released at completion, the op still alive
    with pytest.raises(TypeError):
        backend.Operation.readinto(b"ro", tmp_fd, 0)


# -- cancellation: the buffer is the caller's again when the await ends ---------------


def _cold_fd(path: str, size: int) -> tuple[int, bool]:
    """A file of ``size`` bytes whose pages are not cached: opened with
    O_DIRECT where the file system allows, and dropped from the page cache
    either way (so every read goes to the device)."""
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    direct = getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, os.O_RDONLY | direct)
    except OSError:
        fd, direct = os.open(path, os.O_RDONLY), 0
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    return fd, bool(direct)


async def _settled(ctx: Any) -> None:
    """Wait until the backend has finished every operation (cancelled ones
    included: they hold their admission slot until then)."""
    if hasattr(ctx, "_gate_state"):
        while ctx._gate_state()[0]:
            await asyncio.sleep(0.001)
    while getattr(ctx, "_in_flight", 0):
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("rounds", [8])
def test_cancelled_readinto_never_writes_the_buffer_afterwards(
    async_backend: AsyncBackend, aio: Any, tmp_path: Any, rounds: int
) -> None:
    chunk, count = 64 << 10, 32
    path = str(tmp_path / "cold.bin")

    async def main() -> None:
        ctx = async_backend.context(count)
        buf = bytearray(chunk * count)
        view = memoryview(buf)
        try:
            for _ in range(rounds):
                fd, _direct = _cold_fd(path, chunk * count)
                try:
                    parts = [view[i * chunk : (i + 1) * chunk] for i in range(count)]
                    tasks = [
                        asyncio.ensure_future(ctx.readinto(p, fd, i * chunk))
                        for i, p in enumerate(parts)
                    ]
                    await asyncio.sleep(0)
                    for t in tasks:
                        t.cancel()
                    results = await asyncio.gather(*tasks, return_exceptions=True)
                    for r in results:
                        assert isinstance(r, (int, asyncio.CancelledError)), repr(r)
                    # Every task has ended: the buffer is ours again.
                    buf[:] = b"\x5a" * len(buf)
                    await _settled(ctx)
                    assert buf.count(b"\x5a") == len(buf)
                    # Exports released: the slices can be let go of.
                    for p in parts:
                        p.release()
                finally:
                    os.close(fd)
        finally:
            view.release()
            buf.extend(b"x")  # nothing still holds an export
            ctx.close()

    aio.run(main(), timeout=120)


def test_cancelled_readinto_on_a_pipe_does_not_hang(async_backend: AsyncBackend, aio: Any) -> None:
    """A read of a pipe that never becomes readable: linux_uring cancels it
    in the kernel; the pool backends' workers use pread(), which refuses a
    pipe at once (ESPIPE), so no worker is ever blocked in one; linux_aio
    hands it to such a worker. Either way the cancelled task ends, and data
    written to the pipe afterwards never lands in the buffer."""
    r, w = os.pipe()
    bufs = [bytearray(b"\x11" * 8) for _ in range(8)]

    async def main() -> None:
        ctx = async_backend.context()
        try:
            tasks = [asyncio.ensure_future(ctx.readinto(b, r, 0)) for b in bufs]
            await asyncio.sleep(0.01)
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for res in results:
                assert isinstance(res, (asyncio.CancelledError, OSError)), repr(res)
            for b in bufs:
                b[:] = b"\x22" * 8
                b.extend(b"x")  # every export released
            os.write(w, b"\x33" * 64)
            await _settled(ctx)
            await asyncio.sleep(0.01)
            assert all(b == b"\x22" * 8 + b"x" for b in bufs)
        finally:
            ctx.close()

    try:
        aio.run(main())
    finally:
        os.close(r)
        os.close(w)


def test_cancel_while_waiting_for_the_engine_keeps_waiting(
    async_backend: AsyncBackend, aio: Any, tmp_path: Any
) -> None:
    """Cancelling the task again while it waits for the engine changes
    nothing: it still ends with CancelledError once the engine is done."""
    chunk, count = 256 << 10, 8
    fd, _ = _cold_fd(str(tmp_path / "cold.bin"), chunk * count)
    buf = bytearray(chunk * count)

    async def main() -> None:
        ctx = async_backend.context()
        try:
            view = memoryview(buf)
            tasks = [
                asyncio.ensure_future(
                    ctx.readinto(view[i * chunk : (i + 1) * chunk], fd, i * chunk)
                )
                for i in range(count)
            ]
            await asyncio.sleep(0)
            for _ in range(3):
                for t in tasks:
                    t.cancel()
                await asyncio.sleep(0)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                assert isinstance(r, (int, asyncio.CancelledError)), repr(r)
            buf[:] = b"\x77" * len(buf)
            await _settled(ctx)
            assert buf.count(b"\x77") == len(buf)
            del tasks
            view.release()
        finally:
            ctx.close()

    try:
        aio.run(main(), timeout=120)
    finally:
        os.close(fd)


# -- readv() / writev() ----------------------------------------------------------------


def test_writev_then_readv(async_backend: AsyncBackend, aio: Any, tmp_fd: int) -> None:
    async def main() -> None:
        ctx = async_backend.context()
        try:
            parts = [b"abc", bytearray(b"defg"), memoryview(b"--hij")[2:], array.array("B", b"k")]
            assert await ctx.writev(parts, tmp_fd, 2) == 11
            bufs = [bytearray(4), bytearray(5), bytearray(8)]
            # Short at end of file: the last buffer is partly filled.
            assert await ctx.readv(bufs, tmp_fd, 0) == 13
            assert bufs[0] == b"\0\0ab" and bufs[1] == b"cdefg"
            assert bufs[2] == b"hijk\0\0\0\0"
            for b in bufs:
                b.extend(b"x")  # exports released
            # A generator is a sequence too; keywords as documented.
            m = mmap.mmap(-1, 4096)
            n = await ctx.readv(buffers=(memoryview(m)[i : i + 2] for i in (0, 10)), fd=tmp_fd)
            assert n == 4 and m[:2] == b"\0\0" and m[10:12] == b"ab"
        finally:
            ctx.close()

    aio.run(main())
    assert read_file(tmp_fd) == b"\0\0abcdefghijk"


def test_readv_writev_refusals(async_backend: AsyncBackend, aio: Any, tmp_fd: int) -> None:
    async def main() -> None:
        ctx = async_backend.context()
        try:
            for method in (ctx.readv, ctx.writev):
                with pytest.raises(ValueError, match="empty"):
                    method([], tmp_fd, 0)
                with pytest.raises(ValueError, match="IOV_MAX"):
                    method([bytearray(1)] * 1025, tmp_fd, 0)
                with pytest.raises(TypeError, match="sequence"):
                    method(bytearray(4), tmp_fd, 0)  # one buffer, not a sequence
                with pytest.raises(TypeError):
                    method(12, tmp_fd, 0)
                with pytest.raises(ValueError, match="C-contiguous"):
                    method([bytearray(2), memoryview(bytearray(8))[::2]], tmp_fd, 0)
            with pytest.raises(TypeError, match="writable"):
                ctx.readv([bytearray(2), b"read-only"], tmp_fd, 0)
            with pytest.raises(ValueError):
                ctx.writev(["text"], tmp_fd, 0)
            # A refused sequence leaves no export behind.
            first = bytearray(2)
            with pytest.raises(TypeError):
                ctx.readv([first, b"ro"], tmp_fd, 0)
            first.extend(b"x")
            # 1024 buffers are fine.
            assert await ctx.writev([b"z"] * 1024, tmp_fd, 0) == 1024
        finally:
            ctx.close()

    aio.run(main())


def test_raw_readv_writev(backend: RawBackend, tmp_fd: int) -> None:
    ctx = backend.context()
    payload = [bytearray(b"12"), b"345"]
    op = backend.Operation.writev(payload, tmp_fd, 0)
    assert op.nbytes == 5 and op.payload is payload
    with pytest.raises(BufferError):
        payload[0].extend(b"x")
    backend.run_one(ctx, op)
    assert op.get_value() == 5
    payload[0].extend(b"x")  # released at completion
    bufs = [bytearray(3), bytearray(3)]
    op = backend.Operation.readv(bufs, tmp_fd, 1)
    assert op.get_value() == 0  # not run yet
    result = backend.run_one(ctx, op)
    assert op.get_value() == 4
    if backend.native:
        assert result == 4
    assert bufs == [bytearray(b"234"), bytearray(b"5\0\0")]


def test_cancelled_readv_never_writes_the_buffers_afterwards(
    async_backend: AsyncBackend, aio: Any, tmp_path: Any
) -> None:
    """As for readinto; the memory is page-aligned (an anonymous mmap), as a
    vectored O_DIRECT transfer needs: the kernel takes the caller's buffers
    as they are (DESIGN.md §10)."""
    chunk, count = 64 << 10, 16
    fd, _direct = _cold_fd(str(tmp_path / "cold.bin"), chunk * count * 4)
    buf = mmap.mmap(-1, chunk * count * 4)

    async def main() -> None:
        ctx = async_backend.context()
        try:
            view = memoryview(buf)
            tasks = []
            for t in range(4):
                base = t * chunk * count
                parts = [view[base + i * chunk : base + (i + 1) * chunk] for i in range(count)]
                tasks.append(asyncio.ensure_future(ctx.readv(parts, fd, base)))
            del parts
            await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                assert isinstance(r, (int, asyncio.CancelledError)), repr(r)
            buf[:] = b"\x5a" * len(buf)
            await _settled(ctx)
            assert buf[:].count(b"\x5a") == len(buf)
        finally:
            ctx.close()

    try:
        aio.run(main(), timeout=120)
    finally:
        os.close(fd)


# -- O_DIRECT with aligned caller memory: no bounce copy ----------------------------------


def _direct_fd(tmp_path: Any, size: int) -> int:
    path = str(tmp_path / "direct.bin")
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (size // 256))
    try:
        return os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0))
    except OSError:
        pytest.skip("no O_DIRECT here")


def test_direct_io_with_aligned_buffers_makes_no_bounce_copy(
    async_backend: AsyncBackend, aio: Any, tmp_path: Any
) -> None:
    """DESIGN.md §10: an anonymous mmap is page-aligned, so readinto/write/
    readv/writev of whole blocks on an O_DIRECT fd use it as it is (the
    module's test-hook counter of bounce windows does not move); a
    bytearray is not aligned and still goes through a bounce window."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT")
    fd = _direct_fd(tmp_path, 1 << 20)
    native = async_backend.name != "python_aio"
    module = getattr(__import__("caio"), async_backend.name)
    if native and not module._TEST_HOOKS:
        pytest.skip("needs a build with test hooks")
    count = module._bounce_windows if native else (lambda: 0)
    m = mmap.mmap(-1, 64 << 10)
    expected = (bytes(range(256)) * 256)[: 64 << 10]

    async def main() -> None:
        ctx = async_backend.context()
        try:
            # Unaligned memory goes through a bounce window (and makes the
            # backends that detect O_DIRECT lazily remember this fd).
            start = count()
            ba = bytearray(4097)
            odd = memoryview(ba)[1:]  # an odd address: never aligned
            assert await ctx.readinto(odd, fd, 4096) == 4096
            assert ba[1:] == expected[:4096]
            odd.release()
            if native:
                assert count() > start
            before = count()
            view = memoryview(m)
            for _ in range(3):
                assert await ctx.readinto(m, fd, 4096) == 64 << 10
                assert m[:] == expected
                assert await ctx.readv([view[:4096], view[4096:8192]], fd, 0) == 8192
                assert await ctx.write(view[:8192], fd, 8192) == 8192
                assert await ctx.writev([view[:4096], view[8192:16384]], fd, 0) == 12288
            assert count() == before  # the caller's memory was the window
            view.release()
        finally:
            ctx.close()

    try:
        aio.run(main())
    finally:
        os.close(fd)
    m.close()


def test_close_with_readinto_in_flight_releases_every_export(
    async_backend: AsyncBackend, aio: Any, tmp_path: Any
) -> None:
    """close() with operations in flight: they are still delivered (DESIGN.md
    §5.6) and each buffer export is released when its engine is done."""
    fd, _ = _cold_fd(str(tmp_path / "cold.bin"), 16 * 65536)
    bufs = [bytearray(65536) for _ in range(16)]

    async def main() -> None:
        ctx = async_backend.context()
        tasks = [asyncio.ensure_future(ctx.readinto(b, fd, i * 65536)) for i, b in enumerate(bufs)]
        await asyncio.sleep(0)
        ctx.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            # Submitted before close(): read; not yet admitted: refused.
            assert isinstance(r, (int, RuntimeError)), repr(r)

    try:
        aio.run(main())
    finally:
        os.close(fd)
    for b in bufs:
        b.extend(b"x")  # no export left
