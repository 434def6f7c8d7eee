"""Asynchronous file I/O for anyio: :class:`AnyioContext`.

``anyio.open_file`` and ``anyio.Path`` run every read in a worker thread
(sharing anyio's 40 default thread tokens). ``AnyioContext`` hands the
operation to one of caio's engines instead, with the methods, arguments,
results and errors of ``caio.AsyncioContext``, on both of anyio's backends
(asyncio and trio)::

    import anyio
    from caio.anyio import AnyioContext

    async def main():
        async with AnyioContext() as ctx:
            with open("data.bin", "rb") as fp:
                data = await ctx.read(4096, fp.fileno(), 0)

    anyio.run(main)

Completions come back through the engine's completion fd, waited on with
``anyio.wait_readable`` by one of the waiting tasks at a time; the
pure-Python backend (and thread_aio on Windows) wakes the loop through the
native loop of ``anyio.lowlevel.current_token()``, once per batch. A
cancelled operation is cancelled in the engine where it can be, and its
``await`` raises the backend's cancellation exception only once the engine no
longer touches its buffer. Details: ``caio._structured``.

Needs anyio ≥ 4.11 (``pip install caio[anyio]``); ``import caio`` never
imports it.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import anyio
import anyio.lowlevel

from ._structured import StructuredContextBase, Waiter

__all__ = ("AnyioContext",)


class _AnyioWaiter(Waiter):
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.done = False
        self.event: anyio.Event | None = None

    def wake(self) -> None:
        event = self.event
        if event is not None:
            self.event = None
            event.set()

    async def park(self) -> None:
        event = self.event = anyio.Event()
        try:
            await event.wait()
        finally:
            self.event = None


class AnyioContext(StructuredContextBase):
    """caio's asynchronous file operations for anyio (asyncio or trio).

    The API is :class:`caio._structured.StructuredContextBase`'s (and
    ``AsyncioContext``'s); DESIGN.md §5.10 says how it works.
    """

    _Waiter = _AnyioWaiter
    _wait_readable = staticmethod(anyio.wait_readable)
    _checkpoint_if_cancelled = staticmethod(anyio.lowlevel.checkpoint_if_cancelled)
    _cancel_shielded_checkpoint = staticmethod(anyio.lowlevel.cancel_shielded_checkpoint)
    _to_thread = staticmethod(anyio.to_thread.run_sync)

    def _shield(self) -> AbstractContextManager[Any]:
        return anyio.CancelScope(shield=True)

    def _is_cancellation(self, exc: BaseException) -> bool:
        return isinstance(exc, anyio.get_cancelled_exc_class())

    def _thread_caller(self) -> Callable[[Callable[[], Any]], Any]:
        native: Any = anyio.lowlevel.current_token().native_token
        run_sync_soon = getattr(native, "run_sync_soon", None)  # trio's TrioToken
        if run_sync_soon is not None:
            return run_sync_soon  # type: ignore[no-any-return]
        return native.call_soon_threadsafe  # type: ignore[no-any-return]  # asyncio's loop
