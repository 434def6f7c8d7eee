"""asyncio adapter for the pure-Python backend (:mod:`caio.python_aio`)."""

import asyncio
from collections import deque
from typing import Any

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
        self._finished: deque[asyncio.Future[Any]] = deque()
        self._wakeup_pending = False
        # Slot accounting for cancelled operations (loop thread only): the
        # Context refuses work beyond max_requests *running* operations, and a
        # cancelled one keeps running, so its semaphore slot is returned only
        # when it has really finished.
        self._cancelled_running: set[asyncio.Future[Any]] = set()
        self._cancelled_finished: set[asyncio.Future[Any]] = set()
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
                # Do not leave the flag set, or no later completion would try
                # to wake the loop again.
                self._wakeup_pending = False
                if self.loop.is_closed():
                    # The loop was closed with this operation in flight: no
                    # task can await its future any more, so there is nobody
                    # to tell (raising here would only print a traceback from
                    # the pool's result thread).
                    self._finished.clear()
                    return
                raise

    def _resolve_finished(self) -> None:
        # Loop thread.
        self._wakeup_pending = False
        finished = self._finished
        while finished:
            future = finished.popleft()
            if not future.done():
                future.set_result(True)
            elif future in self._cancelled_running:
                # Its awaiter was cancelled earlier and left the slot to us.
                self._cancelled_running.discard(future)
                self.semaphore.release()
            elif future.cancelled():
                # Finished before the awaiter's cancellation was handled.
                self._cancelled_finished.add(future)

    def _keep_slot_until_done(self, op: Any, future: "asyncio.Future[Any]") -> bool:
        # Loop thread, like _resolve_finished: no race between the two.
        if not future.cancelled():
            return False  # resolved: the op has finished
        if future in self._cancelled_finished:
            self._cancelled_finished.discard(future)
            return False
        self._cancelled_running.add(future)
        return True

    def _destroy_context(self) -> None:
        # Non-blocking: already scheduled operations finish in the background.
        self.context.close()
