"""asyncio adapter for the Linux kernel AIO backend.

The per-operation path is native (``caio.linux_aio._AsyncioBase``, shared
with the io_uring and thread_aio adapters): ``read``/``write``/``fsync``/
``fdsync``/``submit`` build the Operation at call time and return an
awaitable that submits it with ``io_submit``. A page-cache hit completes
inside that call and is delivered right after it, so the awaitable returns
its value without suspending the task (within a budget of ``SYNC_BUDGET``
such completions per loop iteration). Anything else waits on a future that
the eventfd reader (``_process_loop_events``) resolves on the loop thread.

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
  rest of its batch is still submitted (API.md §7 Q12).
"""

from typing import Any

from . import linux_aio
from .asyncio_base import AsyncioContextBase

__all__ = ("AsyncioContext",)


class AsyncioContext(linux_aio._AsyncioBase, AsyncioContextBase):
    OPERATION_CLASS = linux_aio.Operation
    CONTEXT_CLASS = linux_aio.Context

    _closed = False
    _reader_fd = -1

    #: Synchronous completions (page-cache hits delivered right after
    #: io_submit) allowed per event-loop iteration before tasks yield: at a
    #: few microseconds each this bounds an iteration to about a millisecond.
    #: (A streak limit would not: 64 tasks x 32 ops each is still one 7 ms
    #: iteration.) Read by ``_bind``; replaces ``MAX_SYNC_STREAK``.
    SYNC_BUDGET = 128

    # No **kwargs: like upstream, any extra keyword argument is a TypeError
    # (API.md §7 Q13).
    def _create_context(self, max_requests: int) -> Any:
        context = self.CONTEXT_CLASS(max_requests=max_requests)
        # io_submit must never wait for the disk on the loop thread: buffered
        # I/O the kernel cannot do from the page cache goes to worker threads.
        context._set_nowait(True)
        try:
            self._bind(context, self.loop, max_requests, self.deferred)
            self.loop.add_reader(context.fileno, self._loop_reader())
        except BaseException:
            context.close()
            raise
        self._reader_fd = context.fileno
        self._loop_delivery = True
        return context

    def _destroy_context(self) -> None:
        if self._closed:
            return
        # New operations are refused from now on; those started before are
        # still submitted and delivered (the reader stays until then), so
        # awaiting them never hangs. The native base calls _release() as soon
        # as none is in flight (cancelled ones included): now, or from a loop
        # callback once the last one is over ("close once idle").
        self._closed = True
        self._close_native()

    def _release(self) -> None:
        fd, self._reader_fd = self._reader_fd, -1
        self._remove_loop_reader(fd)
        self.context.close()
