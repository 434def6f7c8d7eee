"""How the structured-concurrency adapters drive each backend's raw Context.

``caio.trio.TrioContext`` and ``caio.anyio.AnyioContext`` do not use an
asyncio loop, so they cannot use the asyncio adapters' native fast path
(``_AsyncioBase``). They drive the raw API instead (DESIGN.md §4), through
one :class:`Driver` per backend:

* linux_uring: ``submit`` in loop-delivery mode routes each op as the
  asyncio adapter does (DESIGN.md §7.2): a small read is first tried from the
  page cache and completes inside ``submit`` on a hit; buffered writes,
  fsyncs and mid-size reads go to worker threads; the rest is staged, and
  ``flush()`` enters the kernel (delivering what completed inside the enter);
  completions (ring and workers): eventfd, then ``_process_loop_events()``;
  cancel: ``cancel(op)``, a real kernel cancel (``-ECANCELED``), or a job
  taken back from the workers.
* linux_aio: ``submit`` in event-loop mode (``RWF_NOWAIT``, misses go to
  workers), ``_reap()`` delivers page-cache hits; completions (kernel and
  workers): eventfd, then ``_drain()``; cancel: ``cancel(op)``, which the
  kernel refuses for regular files (ignored).
* thread_aio: ``submit`` (small page-cache reads complete inline);
  completions: the completion fd, then ``_process_completions()``; on
  Windows callbacks on the workers; cancel: ``cancel(op)`` (a no-op today,
  DESIGN.md §4.6).
* python_aio: ``submit``; callbacks on the pool's result thread; nothing to
  cancel.

A driver with a completion fd (:attr:`Driver.fd`) delivers only when its
``drain()`` is called, on the caller's thread; one without (``fd is None``)
runs the operations' callbacks on a foreign thread. Selection
(:func:`open_driver`) reuses ``caio``'s own rules (DESIGN.md §2.3).

This module imports neither trio nor anyio.
"""

from collections.abc import Callable
from types import ModuleType
from typing import Any

import caio

# Backend name (the ``backend=`` keyword) -> CAIO_IMPL key (DESIGN.md §2.3).
KEYS = {
    "linux_uring": "uring",
    "linux_aio": "linux",
    "thread_aio": "thread",
    "python_aio": "python",
}
NAMES = {key: name for name, key in KEYS.items()}

#: Reads up to this many bytes are tried straight from the page cache on the
#: calling thread by thread_aio (``preadv2(RWF_NOWAIT)``, never waits for the
#: disk), as its asyncio adapter does (DESIGN.md §5.8.3).
INLINE_READ_MAX = 64 * 1024


class Driver:
    """One backend Context, driven without an event loop of asyncio's."""

    #: Backend name, e.g. ``"linux_uring"``.
    name = ""
    #: The fd that becomes readable when :meth:`drain` has work, or ``None``
    #: when callbacks run on a foreign thread instead.
    fd: int | None = None
    #: Called after a submission (``None``: nothing to do): makes the kernel
    #: see it and delivers what completed inline. The op is in flight
    #: whatever this raises. A bound method of the Context where there is
    #: one (the per-operation path calls it directly).
    kick: Callable[[], Any] | None = None

    def __init__(self, module: ModuleType, max_requests: int, **kwargs: Any) -> None:
        self.module = module
        self.context: Any = self._open(module, max_requests, **kwargs)

    def _open(self, module: ModuleType, max_requests: int, **kwargs: Any) -> Any:
        factory: Callable[..., Any] = module.Context
        return factory(max_requests=max_requests, **kwargs)

    def submit(self, op: Any) -> None:
        """Hand ``op`` to the backend; raises when it was not accepted (the
        op is then not in flight)."""
        if self.context.submit(op) != 1:
            raise OSError("Operation was not submitted")

    def drain(self) -> int:
        """Deliver every available completion (fd drivers only)."""
        return 0

    def cancel(self, op: Any) -> None:
        """Ask the backend to cancel ``op`` if it can; never raises."""
        try:
            self.context.cancel(op)
        except Exception:
            # linux_aio refuses regular-file I/O (ValueError); a closed or
            # forked Context raises too. Either way the op completes.
            pass

    def release(self) -> None:
        """Release the backend (once nothing is in flight)."""
        self.context.close()


class UringDriver(Driver):
    name = "linux_uring"

    def _open(self, module: ModuleType, max_requests: int, **kwargs: Any) -> Any:
        # The asyncio adapter's default: a plain ring (docs/uring-sqpoll.md).
        from . import linux_uring_asyncio

        default = bool(linux_uring_asyncio and linux_uring_asyncio.DEFAULT_SQPOLL)
        kwargs.setdefault("sqpoll", default and module.SQPOLL_ALLOWED)
        context = super()._open(module, max_requests, **kwargs)
        try:
            # The asyncio adapter's routes (inline page-cache reads, worker
            # pool), completing through the ring's one eventfd.
            context._enable_loop_delivery()
        except BaseException:
            context._close()
            raise
        self.fd = context.fileno
        # An op left for the ring is only staged by submit(); flush() enters
        # the kernel (a page-cache hit missed inline, e.g. a larger read,
        # completes inside it and is delivered right there). Nothing staged
        # (served inline, or on a worker): no system call.
        self.kick = context.flush
        return context

    def drain(self) -> int:
        n: int = self.context._process_loop_events()
        return n

    def release(self) -> None:
        # The ring and its eventfd go with the Context object (as with the
        # asyncio adapter, DESIGN.md §5.6).
        pass


class LinuxAioDriver(Driver):
    name = "linux_aio"

    def _open(self, module: ModuleType, max_requests: int, **kwargs: Any) -> Any:
        if kwargs:
            # As the asyncio adapter (DESIGN.md §6.2 aio-kwargs).
            raise TypeError(f"unexpected keyword argument {next(iter(kwargs))!r} for linux_aio")
        context = module.Context(max_requests=max_requests)
        try:
            # io_submit never waits for the disk on the caller's thread:
            # what the kernel cannot do from the page cache goes to workers,
            # which signal the same eventfd (DESIGN.md §4.5).
            context._set_nowait(True)
        except BaseException:
            context.close()
            raise
        self.fd = context.fileno
        # Deliver page-cache hits completed inside io_submit now.
        self.kick = context._reap
        return context

    def drain(self) -> int:
        n: int = self.context._drain()
        return n


class ThreadAioDriver(Driver):
    name = "thread_aio"

    #: False: callbacks on the workers, as on Windows (the tests exercise
    #: that path on every platform through it).
    loop_delivery = True

    def _open(self, module: ModuleType, max_requests: int, **kwargs: Any) -> Any:
        context = super()._open(module, max_requests, **kwargs)
        if not self.loop_delivery:
            return context
        try:
            self.fd = context._completion_fd()
            context._enable_loop_delivery(inline_read_max=INLINE_READ_MAX)
        except NotImplementedError:
            # No wake-up fd on this platform (Windows): workers run the
            # callbacks, as in the raw API.
            self.fd = None
        except BaseException:
            context.close()
            raise
        return context

    def drain(self) -> int:
        n: int = self.context._process_completions()
        return n


class PythonAioDriver(Driver):
    name = "python_aio"


DRIVERS: dict[str, type[Driver]] = {
    "linux_uring": UringDriver,
    "linux_aio": LinuxAioDriver,
    "thread_aio": ThreadAioDriver,
    "python_aio": PythonAioDriver,
}


def available_backends() -> tuple[str, ...]:
    """Backend names usable here, best first."""
    return tuple(NAMES[key] for key in caio._available_implementations())


def selected_backend() -> str:
    """The backend ``from caio import AsyncioContext`` uses: best available,
    unless ``CAIO_IMPL`` or the ``default_implementation`` file chose
    another (decided once, when ``caio`` was imported)."""
    return NAMES[caio._selected_key]


def open_driver(backend: str | None, max_requests: int, **kwargs: Any) -> Driver:
    """A :class:`Driver` for ``backend`` (``None``: caio's selection)."""
    if backend is None:
        backend = selected_backend()
    elif not isinstance(backend, str) or backend not in KEYS:
        raise ValueError(f"unknown backend {backend!r}: use one of {tuple(KEYS)!r}")
    available = caio._available_implementations()
    key = KEYS[backend]
    if key not in available:
        reason = caio._import_errors.get(key, "not built")
        raise RuntimeError(
            f"backend {backend!r} is not available here ({reason}); "
            f"available: {available_backends()!r} (python -m caio explains)"
        )
    module = available[key][0]
    return DRIVERS[backend](module, max_requests, **kwargs)
