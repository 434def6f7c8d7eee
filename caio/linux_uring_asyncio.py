"""asyncio adapter for the io_uring backend.

The per-operation path is native (``caio.linux_uring._AsyncioBase``):
``read``/``write``/``fsync``/``fdsync``/``submit`` build the Operation at call
time and return an awaitable that hands it to the engine. A read of at most
64 KiB is first tried from the page cache with ``preadv2(RWF_NOWAIT)``: a hit
returns its value without suspending the task and without touching the ring.
Buffered writes, fsyncs and reads above 64 KiB up to 1 MiB (on a machine with
more than one CPU) run on a native worker pool; everything else stages an SQE
and enters the kernel. Anything that did not complete at once waits on a
future that the eventfd reader resolves (ring and pool share the eventfd).
DESIGN.md §7.2 has the rules and the measurements behind them.

``deferred=True`` (plain ring) instead stages the SQEs of one loop iteration
and submits them with a single ``io_uring_enter``. ``sqpoll=True`` asks for a
kernel submission thread (see ``DEFAULT_SQPOLL`` for why it is off by
default).

Construction, ``close()`` ("close once idle": the ring and its eventfd are
released as soon as nothing is in flight) and the loop-gone drain are shared
with the other native adapters (``NativeAsyncioContextBase``).
"""

from typing import Any

from . import linux_uring as _linux_uring_module
from .asyncio_base import NativeAsyncioContextBase
from .linux_uring import SQPOLL_ALLOWED, Context, Operation, _AsyncioBase

__all__ = ("AsyncioContext",)

# Upstream turns SQPOLL on whenever the kernel allows it. Measured on a
# 2-core machine (docs/uring-sqpoll.md), a plain ring is faster for cached
# reads at every concurrency; an explicit ``sqpoll=True`` still works.
DEFAULT_SQPOLL = False


class AsyncioContext(_AsyncioBase, NativeAsyncioContextBase):
    # Path operations (DESIGN.md §14) on the native runner.
    _PATH_OPS_TYPE = getattr(_linux_uring_module, "_PathOps", None)

    OPERATION_CLASS = Operation
    CONTEXT_CLASS = Context

    def _open_context(self, max_requests: int, **kwargs: Any) -> Any:
        kwargs.setdefault("sqpoll", DEFAULT_SQPOLL and SQPOLL_ALLOWED)
        return super()._open_context(max_requests, **kwargs)

    def _engine_obj(self, context: Any) -> Any:
        # deferred=True: the native base submits a loop iteration's staged
        # SQEs through this.
        return context._deferred_flush

    def _close_backend(self, context: Any) -> None:
        # Close once idle (DESIGN.md §5.6): the ring and its eventfd go now,
        # not when the garbage collector frees the Context (never, while a
        # traceback or a closure still references the adapter). Called once
        # nothing admitted is in flight; an operation still in the ring (the
        # loop-gone drain gave up) keeps it: ``_close()`` then does nothing.
        context._close()
