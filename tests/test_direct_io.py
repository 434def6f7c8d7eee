"""O_DIRECT through every asyncio adapter (DESIGN.md §10).

Upstream fails every O_DIRECT read with EINVAL: the kernel wants the buffer
address, the file offset and the length aligned, and a ``bytes`` object is
never aligned. Every backend here moves O_DIRECT data through aligned memory:
reads work at any offset and length and still return ``bytes``; writes work
from any payload when their offset and length are aligned, and otherwise fail
with ``OSError(EINVAL)`` on the awaiting task only.
"""

import asyncio
import errno
import os
import random

import pytest

from helpers import AsyncBackend, LoopRunner

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")

BLOCK = 4096
SIZE = 64 * BLOCK


@pytest.fixture
def direct_file() -> object:
    """(buffered fd, O_DIRECT fd) of one file on a real disk, 256 KiB of
    known content."""
    base = os.environ.get("CAIO_TEST_DISK_DIR", "/var/tmp")
    path = os.path.join(base, f"caio-direct-{os.getpid()}-{random.getrandbits(32)}")
    data = random.Random(7).randbytes(SIZE)
    try:
        plain = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        pytest.skip(f"cannot create a file in {base}: {e}")
    try:
        os.pwrite(plain, data, 0)
        os.fsync(plain)
        try:
            direct = os.open(path, os.O_RDWR | os.O_DIRECT)
        except OSError as e:
            pytest.skip(f"O_DIRECT unsupported in {base}: {e}")
        try:
            yield plain, direct, data
        finally:
            os.close(direct)
    finally:
        os.close(plain)
        os.unlink(path)


def test_direct_reads_any_offset_and_length(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    direct_file: object,
) -> None:
    plain, direct, data = direct_file  # type: ignore[misc]
    cases = [
        (0, BLOCK),
        (BLOCK, 8 * BLOCK),
        (1, 100),
        (BLOCK - 3, 7),
        (12345, 54321),
        (SIZE - 10, 100),
        (SIZE, BLOCK),
        (SIZE + BLOCK, 10),
        (5, 0),
    ]

    async def main() -> None:
        async with async_backend.context(16) as ctx:
            got = await asyncio.gather(*(ctx.read(n, direct, off) for off, n in cases))
            for (off, n), value in zip(cases, got, strict=True):
                assert type(value) is bytes
                assert value == data[off : off + n], (off, n)

    aio.run(main())


def test_direct_aligned_writes_from_any_payload(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    direct_file: object,
) -> None:
    plain, direct, data = direct_file  # type: ignore[misc]
    blocks = {i: bytes([i]) * BLOCK for i in (0, 3, 17, 63)}

    async def main() -> None:
        async with async_backend.context(16) as ctx:
            written = await asyncio.gather(
                *(ctx.write(b, direct, i * BLOCK) for i, b in blocks.items())
            )
            assert written == [BLOCK] * len(blocks)
            await ctx.fdsync(direct)
            for i, b in blocks.items():
                assert await ctx.read(BLOCK, direct, i * BLOCK) == b

    aio.run(main())
    expected = bytearray(data)
    for i, b in blocks.items():
        expected[i * BLOCK : (i + 1) * BLOCK] = b
    assert os.pread(plain, SIZE, 0) == bytes(expected)


def test_direct_unaligned_write_is_einval_for_that_task_only(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    direct_file: object,
) -> None:
    plain, direct, data = direct_file  # type: ignore[misc]

    async def main() -> None:
        async with async_backend.context(16) as ctx:
            bad, good = await asyncio.gather(
                ctx.write(b"x" * 100, direct, 3),
                ctx.read(BLOCK, direct, 0),
                return_exceptions=True,
            )
            assert isinstance(bad, OSError) and bad.errno == errno.EINVAL, bad
            assert good == data[:BLOCK]

    aio.run(main())
    assert os.pread(plain, SIZE, 0) == data
