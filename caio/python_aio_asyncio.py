"""asyncio adapter for the pure-Python backend (:mod:`caio.python_aio`)."""

import asyncio
from collections import deque
from typing import Any, Deque

from .asyncio_base import AsyncioContextBase
from .python_aio import Context, Operation


class AsyncioContext(AsyncioContextBase):
    OPERATION_CLASS = Operation
    CONTEXT_CLASS = Context

    def __init__(self, *args: Any, **kwargs: Any):
        # Completions arrive on the pool's result-handler thread.  Instead of
        # one loop.call_soon_threadsafe() per operation (each one a write to
        # the loop's self-pipe plus a loop wake-up), finished futures are
        # queued here and a single wake-up drains everything that finished
        # meanwhile.  Set up before the base constructor creates the Context.
        self._finished: Deque["asyncio.Future[Any]"] = deque()
        self._wakeup_pending = False
        super().__init__(*args, **kwargs)

    def _on_done(self, future: "asyncio.Future[Any]", result: Any) -> None:
        # Foreign thread.  Order matters: queue the future first, then look
        # at the flag.  The loop clears the flag *before* draining, so a
        # future queued while the flag still reads True is picked up by the
        # drain that is already scheduled; one queued after the flag was
        # cleared schedules a new drain.  A spurious extra drain is harmless.
        self._finished.append(future)
        if not self._wakeup_pending:
            self._wakeup_pending = True
            try:
                self.loop.call_soon_threadsafe(self._resolve_finished)
            except BaseException:
                # e.g. the loop is closed: do not leave the flag set, or no
                # later completion would try to wake the loop again.
                self._wakeup_pending = False
                raise

    def _resolve_finished(self) -> None:
        # Loop thread.
        self._wakeup_pending = False
        finished = self._finished
        while finished:
            future = finished.popleft()
            # A cancelled awaiter leaves its future done; ignore it.
            if not future.done():
                future.set_result(True)

    def _destroy_context(self) -> None:
        # Non-blocking: already scheduled operations finish in the background.
        self.context.close()
