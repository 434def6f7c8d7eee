"""asyncio adapter for the native thread-pool backend.

Completion path: the pool's workers do not call back into Python. They queue
each finished operation and make a wake-up fd readable when the queue turns
non-empty; the event loop (``add_reader``) then delivers the whole batch at
once, resolving the futures directly on the loop thread. Workers never wait for
the GIL and the loop is woken once per batch instead of once per operation.

The per-operation path is native (``caio.thread_aio._AsyncioBase``, shared
with the io_uring and linux_aio adapters): ``read``/``write``/``fsync``/
``fdsync`` build the Operation at call time and return an awaitable that
hands it to the pool. Construction, ``close()`` and the loop-gone drain are
shared with those adapters too (``NativeAsyncioContextBase``). Small reads
that hit the page cache are completed inline (see ``INLINE_READ_MAX``) and
return without suspending the task. Cancelling a task whose operation no
worker has started yet really cancels it.

Where the event loop has no ``add_reader`` (Windows' proactor loop), the
classic path is used: the worker runs the callback, which wakes the loop with
``call_soon_threadsafe``.
"""

import os
from typing import Any

from . import thread_aio as _thread_aio_module
from .asyncio_base import AsyncioContextBase, NativeAsyncioContextBase
from .thread_aio import Context, Operation, _AsyncioBase

__all__ = ("AsyncioContext",)


class _LoopDeliveryContext(_AsyncioBase, NativeAsyncioContextBase):
    # Path operations (DESIGN.md §14) on the native runner.
    _PATH_OPS_TYPE = getattr(_thread_aio_module, "_PathOps", None)

    MAX_REQUESTS_DEFAULT = 512
    OPERATION_CLASS = Operation
    CONTEXT_CLASS = Context

    #: Reads up to this many bytes are first tried straight from the page
    #: cache on the loop thread (Linux ``preadv2(RWF_NOWAIT)``: it never waits
    #: for the disk, so the loop cannot stall); misses go to the worker pool.
    #: Set to 0 to send every operation to the pool.
    INLINE_READ_MAX = 64 * 1024

    def _completion_fd(self, context: Any) -> int:
        fd: int = context._completion_fd()
        return fd

    def _start_delivery(self, context: Any) -> None:
        # From now on workers queue completions for the loop's reader.
        context._enable_loop_delivery(inline_read_max=self.INLINE_READ_MAX)

    def _destroy_context(self) -> None:
        # New operations raise RuntimeError from now on. Unlike the kernel
        # backends this one does not wait for the loop to deliver what is in
        # flight: closing the pool blocks until the queued work has finished
        # (upstream semantics, DESIGN.md §6.2 thread-close) and delivers its completions
        # itself, so it is idle right away.
        super()._destroy_context()
        self._release()


class _CallbackContext(AsyncioContextBase):
    """Portable path: callbacks on worker threads, call_soon_threadsafe."""

    MAX_REQUESTS_DEFAULT = 512
    OPERATION_CLASS = Operation
    CONTEXT_CLASS = Context

    def _destroy_context(self) -> None:
        self.context.close()


# Every asyncio loop on POSIX (selector loops, uvloop) has add_reader.
AsyncioContext = _LoopDeliveryContext if os.name == "posix" else _CallbackContext
AsyncioContext.__name__ = AsyncioContext.__qualname__ = "AsyncioContext"
