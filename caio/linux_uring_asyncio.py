"""asyncio adapter for the io_uring backend.

The per-operation path is native (``caio.linux_uring._AsyncioBase``):
``read``/``write``/``fsync``/``fdsync``/``submit`` build the Operation at call
time and return an awaitable that stages the SQE and enters the kernel. A
page-cache hit completes inside that ``io_uring_enter`` and the awaitable
returns its value without suspending the task; anything else waits on a
future that the eventfd reader resolves straight from the completion ring.

``deferred=True`` (plain ring) instead stages the SQEs of one loop iteration
and submits them with a single ``io_uring_enter``. ``sqpoll=True`` asks for a
kernel submission thread (see ``DEFAULT_SQPOLL`` for why it is off by
default).
"""

from typing import Any

from . import linux_uring
from .asyncio_base import AsyncioContextBase
from .linux_uring import SQPOLL_ALLOWED, Context, Operation

__all__ = ("AsyncioContext",)

# Upstream turns SQPOLL on whenever the kernel allows it. Measured on a
# 2-core machine (docs/uring-sqpoll.md), a plain ring is faster for cached
# reads at every concurrency; an explicit ``sqpoll=True`` still works.
DEFAULT_SQPOLL = False


class AsyncioContext(linux_uring._AsyncioBase, AsyncioContextBase):
    OPERATION_CLASS = Operation
    CONTEXT_CLASS = Context

    _reader_fd = -1

    def _create_context(self, max_requests: int, **kwargs: Any) -> Any:
        kwargs.setdefault("sqpoll", DEFAULT_SQPOLL and SQPOLL_ALLOWED)
        context = super()._create_context(max_requests, **kwargs)
        self._bind(context, self.loop, max_requests, self.deferred, context._deferred_flush)
        self.loop.add_reader(context.fileno, self._loop_reader())
        self._reader_fd = context.fileno
        self._loop_delivery = True
        return context

    def _on_read_event(self) -> None:
        # Kept for subclasses/compatibility; the reader is the native method.
        self._process_loop_events()

    def _destroy_context(self) -> None:
        # New operations raise RuntimeError from now on (instead of hanging,
        # API.md §7 Q14). The eventfd stays watched until the operations
        # already in flight — cancelled ones included — have been delivered;
        # then the native base calls _release() ("close once idle"). Without
        # that, an undelivered completion would keep op and Context alive
        # forever: ring and eventfd would leak.
        self._close_native()

    def _release(self) -> None:
        # Nothing is in flight: stop watching the eventfd. The ring and the
        # eventfd are released with the Context (as upstream: at garbage
        # collection; nothing in flight holds it any more).
        fd, self._reader_fd = self._reader_fd, -1
        self._remove_loop_reader(fd)
