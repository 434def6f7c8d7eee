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

    def _create_context(self, max_requests: int, **kwargs: Any) -> Any:
        kwargs.setdefault("sqpoll", DEFAULT_SQPOLL and SQPOLL_ALLOWED)
        context = super()._create_context(max_requests, **kwargs)
        self._bind(context, self.loop, max_requests, self.deferred,
                   context._deferred_flush)
        self.loop.add_reader(context.fileno, self._process_loop_events)
        self._loop_delivery = True
        return context

    def _on_read_event(self) -> None:
        # Kept for subclasses/compatibility; the reader is the native method.
        self._process_loop_events()

    def _destroy_context(self) -> None:
        # Upstream semantics (API.md §7 Q14): stop watching the eventfd; the
        # ring lives until garbage collection. New operations now raise
        # RuntimeError instead of hanging.
        self._close_native()
        self.loop.remove_reader(self.context.fileno)
