"""asyncio adapter for the Linux kernel AIO backend.

The per-operation path is native (``caio.linux_aio._AsyncioBase``, shared
with the io_uring and thread_aio adapters): ``read``/``write``/``fsync``/
``fdsync``/``submit`` build the Operation at call time and return an
awaitable that submits it with ``io_submit``. A page-cache hit completes
inside that call and is delivered right after it, so the awaitable returns
its value without suspending the task (within a budget of ``SYNC_BUDGET``
such completions per loop iteration). Anything else waits on a future that
the eventfd reader (``_process_loop_events``) resolves on the loop thread.
Construction, ``close()`` and the loop-gone drain are shared with the other
native adapters (``NativeAsyncioContextBase``).

Differences from upstream caio (all compatible):

* The loop never waits for the disk inside ``io_submit``: the Context runs
  in event-loop mode (``_set_nowait(True)``): reads and writes are submitted
  with ``RWF_NOWAIT`` and what the kernel would have done synchronously
  (cache misses, ext4 buffered writes) is finished by worker threads.
* ``close()`` releases the kernel AIO context (``fs.aio-nr``) and the
  eventfd deterministically instead of at garbage collection. Operations
  started before it (in flight, or waiting in a deferred batch) are still
  completed first; starting one after ``close()`` raises ``RuntimeError``
  instead of hanging.
* ``deferred=True``: an operation refused by the kernel fails alone; the
  rest of its batch is still submitted (DESIGN.md §6.2 batch-fail).
"""

from typing import Any

from . import linux_aio as _linux_aio_module
from .asyncio_base import NativeAsyncioContextBase
from .linux_aio import Context, Operation, _AsyncioBase

__all__ = ("AsyncioContext",)


class AsyncioContext(_AsyncioBase, NativeAsyncioContextBase):
    # Path operations (DESIGN.md §14) on the native runner.
    _PATH_OPS_TYPE = getattr(_linux_aio_module, "_PathOps", None)

    OPERATION_CLASS = Operation
    CONTEXT_CLASS = Context

    #: Synchronous completions (page-cache hits delivered right after
    #: io_submit) allowed per event-loop iteration before tasks yield: at a
    #: few microseconds each this bounds an iteration to about a millisecond.
    #: (A streak limit would not: 64 tasks x 32 ops each is still one 7 ms
    #: iteration.) Read by ``_bind``; replaces ``MAX_SYNC_STREAK``.
    SYNC_BUDGET = 128

    def _open_context(self, max_requests: int, **kwargs: Any) -> Any:
        if kwargs:
            # Like upstream, any extra keyword argument is a TypeError
            # (DESIGN.md §6.2 aio-kwargs).
            raise TypeError(
                f"AsyncioContext() got an unexpected keyword argument {next(iter(kwargs))!r}"
            )
        context = self.CONTEXT_CLASS(max_requests=max_requests)
        # io_submit must never wait for the disk on the loop thread: buffered
        # I/O the kernel cannot do from the page cache goes to worker threads.
        context._set_nowait(True)
        return context
