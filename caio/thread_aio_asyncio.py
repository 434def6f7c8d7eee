"""asyncio adapter for the native thread-pool backend.

Completion path: the pool's workers do not call back into Python. They queue
each finished operation and make a wake-up fd readable when the queue turns
non-empty; the event loop (``add_reader``) then delivers the whole batch at
once, resolving the futures directly on the loop thread. Workers never wait for
the GIL and the loop is woken once per batch instead of once per operation.

The per-operation path is native (``caio.thread_aio._AsyncioBase``, shared
with the io_uring adapter): ``read``/``write``/``fsync``/``fdsync`` build the
Operation at call time and return an awaitable that hands it to the pool.
Small reads that hit the page cache are completed inline (see
``INLINE_READ_MAX``) and return without suspending the task. Cancelling a task
whose operation no worker has started yet really cancels it.

Where the event loop has no ``add_reader`` (Windows' proactor loop), the
classic path is used: the worker runs the callback, which wakes the loop with
``call_soon_threadsafe``.
"""

import os
from typing import Any, Optional

from . import thread_aio
from .asyncio_base import AsyncioContextBase

__all__ = ("AsyncioContext",)


class _LoopDeliveryContext(thread_aio._AsyncioBase, AsyncioContextBase):
    MAX_REQUESTS_DEFAULT = 512
    OPERATION_CLASS = thread_aio.Operation
    CONTEXT_CLASS = thread_aio.Context

    #: Reads up to this many bytes are first tried straight from the page
    #: cache on the loop thread (Linux ``preadv2(RWF_NOWAIT)``: it never waits
    #: for the disk, so the loop cannot stall); misses go to the worker pool.
    #: Set to 0 to send every operation to the pool.
    INLINE_READ_MAX = 64 * 1024

    _reader_fd: Optional[int] = None

    def _create_context(self, max_requests: int, **kwargs: Any) -> Any:
        context = super()._create_context(max_requests, **kwargs)
        # A refused construction (e.g. ``loop`` not an event loop) stops the
        # workers right here: the exception's traceback holds this frame, and
        # whoever keeps that traceback would otherwise keep the pool's threads.
        watched = None
        try:
            fd = context._completion_fd()
            self._bind(context, self.loop, max_requests, self.deferred)
            self.loop.add_reader(fd, self._loop_reader())
            watched = fd
            # Only now that the fd is watched: no completion can be stranded.
            context._enable_loop_delivery(inline_read_max=self.INLINE_READ_MAX)
        except BaseException:
            try:
                # Only a real loop that took the reader is asked to drop it
                # (``loop`` may be any object here).
                self._remove_loop_reader(watched)
            finally:
                context.close()
            raise
        self._reader_fd = fd
        self._loop_delivery = True
        return context

    def _destroy_context(self) -> None:
        # New operations raise RuntimeError from now on. Unlike the kernel
        # backends this one does not wait for the loop to deliver what is in
        # flight: closing the pool blocks until the queued work has finished
        # (upstream semantics, API.md §7 Q15) and delivers its completions
        # itself, so it is idle right away.
        self._close_native()
        self._release()

    def _release(self) -> None:
        # Also called by the native base once idle ("close once idle"):
        # idempotent. The reader goes before the pool closes its wake-up fd.
        fd, self._reader_fd = self._reader_fd, None
        self._remove_loop_reader(fd)
        self.context.close()


class _CallbackContext(AsyncioContextBase):
    """Portable path: callbacks on worker threads, call_soon_threadsafe."""

    MAX_REQUESTS_DEFAULT = 512
    OPERATION_CLASS = thread_aio.Operation
    CONTEXT_CLASS = thread_aio.Context

    def _destroy_context(self) -> None:
        self.context.close()


# Every asyncio loop on POSIX (selector loops, uvloop) has add_reader.
AsyncioContext = _LoopDeliveryContext if os.name == "posix" else _CallbackContext
AsyncioContext.__name__ = AsyncioContext.__qualname__ = "AsyncioContext"
