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
import os
from typing import Any

import pytest


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


class _Poison:
    """Which Python call on the adapter's futures fails (switched on by the
    test once its first operation holds the only slot)."""

    done = False
    block = False


class _FailingFuture(asyncio.Future):  # type: ignore[type-arg]
    """``done()`` raises once it has a result (after the gate handed it a
    slot); marking it awaited (``_asyncio_future_blocking = True``) raises."""

    def done(self) -> bool:
        if _Poison.done and super().done() and not self.cancelled():
            raise RuntimeError("done() failed")
        return super().done()

    def __setattr__(self, name: str, value: Any) -> None:
        if _Poison.block and name == "_asyncio_future_blocking" and value:
            raise RuntimeError("cannot mark the future awaited")
        super().__setattr__(name, value)


class _FailingFutureLoop(asyncio.SelectorEventLoop):
    def create_future(self) -> Any:
        return _FailingFuture(loop=self)


@pytest.mark.parametrize("failing", ["done", "block"])
def test_no_slot_leaks_when_a_future_call_fails(async_backend: Any, failing: str) -> None:
    """DESIGN.md §5.4: a waiter whose future fails (``done()`` raising once the
    gate handed it the slot, or marking it awaited raising after it was queued)
    leaves every slot available: the gate's ticket, not the future, says who
    holds a slot."""
    if async_backend.name == "python_aio":
        pytest.skip("python_aio admits through its asyncio semaphore, not the native gate")
    loop = _FailingFutureLoop()
    # (kernel AIO refuses offset -1 at submit; at 0 a pipe read goes to a worker)
    offset = 0 if async_backend.is_linux_aio else -1
    r, w = os.pipe()
    os.set_blocking(r, False)

    async def main() -> None:
        ctx = async_backend.context(1)
        try:
            # Holds the only slot until data arrives (linux_uring) or a worker
            # answers (ESPIPE: linux_aio, thread_aio): never inline.
            first = asyncio.ensure_future(ctx.read(1, r, offset))
            await asyncio.sleep(0)
            assert ctx._gate_state()[0] == 1
            setattr(_Poison, failing, True)
            try:
                second = asyncio.ensure_future(ctx.read(1, r, offset))
                await asyncio.sleep(0)
                os.write(w, b"xy")
                results = await asyncio.gather(first, second, return_exceptions=True)
            finally:
                setattr(_Poison, failing, False)
            assert all(isinstance(x, (bytes, OSError, RuntimeError)) for x in results), results
            assert ctx._gate_state() == (0, 1, 0)
        finally:
            ctx.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        os.close(r)
        os.close(w)
