"""A cancelled operation keeps its admission slot until the backend has really
finished it.

Upstream returns the slot as soon as the awaiting task is cancelled. The
operation keeps running in the backend, so with a small ``max_requests`` the
next operation then meets a full backend: python_aio raised "Maximum
simultaneous requests have been reached" and thread_aio "Thread pool queue
full" to a task that did nothing wrong (DESIGN.md §5.4: operations never see
capacity errors). Ours hands the slot to the operation's completion.
"""

import asyncio
from typing import Any


def test_operation_after_a_cancelled_one_never_sees_capacity_errors(
    async_backend: Any,
    aio: Any,
    tmp_fd: int,
) -> None:
    big = b"x" * (64 << 20)

    async def main() -> None:
        ctx = async_backend.context(1)
        running = asyncio.ensure_future(ctx.write(big, tmp_fd, 0))
        await asyncio.sleep(0.001)
        running.cancel()
        try:
            await running
        except asyncio.CancelledError:
            pass
        # Whether or not the big write is still running, this must work.
        assert await ctx.write(b"next", tmp_fd, 0) == 4
        assert await ctx.read(4, tmp_fd, 0) == b"next"
        ctx.close()

    aio.run(main())


def test_many_cancellations_with_one_slot(async_backend: Any, aio: Any, tmp_fd: int) -> None:
    chunk = b"y" * (1 << 20)

    async def main() -> None:
        ctx = async_backend.context(1)
        for _round in range(20):
            tasks = [asyncio.ensure_future(ctx.write(chunk, tmp_fd, i << 20)) for i in range(4)]
            await asyncio.sleep(0)
            for t in tasks[1:]:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    assert isinstance(r, asyncio.CancelledError), repr(r)
                else:
                    assert r == len(chunk)
        assert await ctx.write(b"end", tmp_fd, 0) == 3
        ctx.close()

    aio.run(main())
