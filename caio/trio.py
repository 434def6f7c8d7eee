"""Asynchronous file I/O for trio: :class:`TrioContext`.

``trio.open_file`` runs every read in a worker thread. ``TrioContext`` hands
the operation to one of caio's engines instead (io_uring, kernel AIO, the
native thread pool, or the pure-Python pool), with the methods, arguments,
results and errors of ``caio.AsyncioContext``::

    import trio
    from caio.trio import TrioContext

    async def main():
        async with TrioContext() as ctx:
            with open("data.bin", "rb") as fp:
                data = await ctx.read(4096, fp.fileno(), 0)

    trio.run(main)

Completions come back through the engine's completion fd, waited on with
``trio.lowlevel.wait_readable`` by one of the waiting tasks at a time (no
thread, no background task); the pure-Python backend (and thread_aio on
Windows) wakes the run with ``TrioToken.run_sync_soon``, once per batch. A
cancelled operation is cancelled in the engine where it can be, and its
``await`` raises ``trio.Cancelled`` only once the engine no longer touches
its buffer. Details: ``caio._structured``.

Needs trio (``pip install caio[trio]``); ``import caio`` never imports it.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import trio

from ._structured import StructuredContextBase, Waiter

__all__ = ("TrioContext",)


class _TrioWaiter(Waiter):
    __slots__ = ("task",)

    def __init__(self) -> None:
        self.done = False
        self.task: trio.lowlevel.Task | None = None

    def wake(self) -> None:
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    async def park(self) -> None:
        self.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class TrioContext(StructuredContextBase):
    """caio's asynchronous file operations for trio.

    The API is :class:`caio._structured.StructuredContextBase`'s (and
    ``AsyncioContext``'s); DESIGN.md §5.10 says how it works.
    """

    _Waiter = _TrioWaiter
    _wait_readable = staticmethod(trio.lowlevel.wait_readable)
    _checkpoint_if_cancelled = staticmethod(trio.lowlevel.checkpoint_if_cancelled)
    _cancel_shielded_checkpoint = staticmethod(trio.lowlevel.cancel_shielded_checkpoint)
    _to_thread = staticmethod(trio.to_thread.run_sync)

    def _shield(self) -> AbstractContextManager[Any]:
        return trio.CancelScope(shield=True)

    def _is_cancellation(self, exc: BaseException) -> bool:
        return isinstance(exc, trio.Cancelled)

    def _thread_caller(self) -> Callable[[Callable[[], Any]], Any]:
        return trio.lowlevel.current_trio_token().run_sync_soon
