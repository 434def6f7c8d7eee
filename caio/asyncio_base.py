"""Shared asyncio adapter: turns a backend Context into awaitable operations.

Every ``caio.<backend>_asyncio.AsyncioContext`` subclasses
:class:`AsyncioContextBase`.  The per-operation path is::

    read()/write()/fsync()/fdsync()   build the Operation eagerly (argument
                                      errors raise here, before any await)
    submit(op)                        one coroutine: take a semaphore slot,
                                      hand the op to the backend, await a
                                      future, return ``op.get_value()``

Pure-Python adapters customise it through small hooks: ``_create_context``,
``_on_submitted``, ``_on_done``, ``_keep_slot_until_done`` and
``_destroy_context``.

The native backends' adapters use :class:`NativeAsyncioContextBase` instead:
there the per-operation path is the backend's native ``_AsyncioBase`` and
this module only wires it to the event loop.
"""

import abc
import asyncio
import os
from collections.abc import Callable, Coroutine
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._opsapi import OperationsAPI
from ._pathops import AsyncioPathOps
from .abstract import AbstractContext, AbstractOperation

ContextType = type[AbstractContext]
OperationType = type[AbstractOperation]

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11


def _resolve(future: asyncio.Future[Any]) -> None:
    # Runs on the loop thread; the future may have been cancelled meanwhile.
    if not future.done():
        future.set_result(True)


class AsyncioContextBase(OperationsAPI, AsyncioPathOps, abc.ABC):
    MAX_REQUESTS_DEFAULT = 512

    CONTEXT_CLASS: ContextType
    OPERATION_CLASS: OperationType

    def __init__(
        self,
        max_requests: int | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        deferred: bool = False,
        **kwargs: Any,
    ):
        max_requests = max_requests or self.MAX_REQUESTS_DEFAULT
        self.loop = loop or asyncio.get_event_loop()
        self.deferred = deferred
        self.semaphore = asyncio.BoundedSemaphore(max_requests)
        self._owner_pid = os.getpid()
        self.context = self._create_context(max_requests, **kwargs)

    def _remove_loop_reader(self, fd: int | None) -> None:
        """Stop watching ``fd`` on the loop (nothing if the loop is closed).

        Not in a process forked from the one that created this context: the
        inherited loop's epoll instance is shared with the parent, so
        removing the registration there would remove the parent's and hang
        its pending operations. The child only drops its own references.
        """
        if fd is None or fd < 0 or os.getpid() != self._owner_pid:
            return
        try:
            self.loop.remove_reader(fd)
        except (RuntimeError, ValueError, OSError):
            pass  # the loop is closed already

    # -- hooks -------------------------------------------------------------

    def _create_context(self, max_requests: int, **kwargs: Any) -> Any:
        # The abstract interface leaves the constructor open; every backend's
        # takes max_requests.
        factory: Callable[..., Any] = self.CONTEXT_CLASS
        return factory(max_requests=max_requests, **kwargs)

    def _destroy_context(self) -> None:
        """Release the backend context (default: nothing to release)."""

    def _on_done(self, future: asyncio.Future[Any], result: Any) -> None:
        # Default for callbacks fired on a foreign (worker) thread.
        if future.done():
            return
        try:
            self.loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:
            # The loop was closed with this operation in flight: no task can
            # await the future any more; raising would only print a traceback
            # from the worker thread.
            if not self.loop.is_closed():
                raise

    def _on_submitted(self) -> None:
        """The backend accepted an operation: its callback will run exactly
        once (default: nothing to count)."""

    def _keep_slot_until_done(self, op: AbstractOperation, future: asyncio.Future[Any]) -> bool:
        """The awaiting task was cancelled while ``op`` may still be running.

        Return True to take over releasing its semaphore slot once the backend
        has really finished the op (so cancelled-but-running operations cannot
        pile up beyond ``max_requests`` and make the backend refuse new ones);
        False (default) releases it now, as upstream does.
        """
        return False

    # -- public API --------------------------------------------------------

    def close(self) -> None:
        self._close_path_ops()
        self._destroy_context()

    async def __aenter__(self) -> "Self":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    #: Operations served synchronously (a page-cache hit completed inside
    #: ``submit``) never suspend the awaiting coroutine. So that a task
    #: looping over cached reads cannot starve the others, the loop gets one
    #: turn after this many consecutive synchronous completions.
    MAX_SYNC_STREAK = 32
    _sync_streak = 0

    async def submit(self, op: AbstractOperation) -> bytes | int | None:
        if not isinstance(op, self.OPERATION_CLASS):
            raise ValueError("Operation object expected")

        future = self.loop.create_future()
        op.set_callback(partial(self._on_done, future))

        semaphore = self.semaphore
        if semaphore.locked():
            await semaphore.acquire()
        else:
            # The uncontended path of Semaphore.acquire(), without the extra
            # coroutine: same FIFO rule (locked() also counts live waiters).
            semaphore._value -= 1
        release = True
        try:
            if self.context.submit(op) != 1:
                raise OSError("Operation was not submitted")
            self._on_submitted()
            try:
                if future.done():
                    self._sync_streak += 1
                    if self._sync_streak >= self.MAX_SYNC_STREAK:
                        self._sync_streak = 0
                        await asyncio.sleep(0)
                else:
                    self._sync_streak = 0
                    if getattr(op, "_borrows_buffer", False):
                        await self._await_borrowing(op, future)
                    else:
                        await future
            except asyncio.CancelledError:
                try:
                    self.context.cancel(op)
                except ValueError:
                    pass
                if self._keep_slot_until_done(op, future):
                    release = False
                raise
            return op.get_value()
        finally:
            if release:
                semaphore.release()

    async def _await_borrowing(self, op: AbstractOperation, future: asyncio.Future[Any]) -> None:
        """Await the completion of an op that uses the caller's memory
        (``readinto``, a write from a mutable buffer): a cancellation is
        passed to the backend, but raised only once the backend is done with
        the buffer, so it is the caller's again when the await ends however
        it ends (DESIGN.md §5.5). The completion future is shielded so that
        the task's cancellation does not cancel it."""
        cancelled: asyncio.CancelledError | None = None
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError as e:
                if future.done():
                    break
                if cancelled is None:
                    cancelled = e
                    try:
                        self.context.cancel(op)
                    except ValueError:
                        pass
        if cancelled is not None:
            try:
                raise cancelled
            finally:
                # The exception's traceback holds this frame: no cycle that
                # would keep the op (and the caller's buffers) alive.
                del cancelled

    def _run_op(self, op: Any) -> Coroutine[Any, Any, Any]:
        # OperationsAPI's hook: read()/write()/... run through submit(),
        # whose result is the operation's get_value() (bytes read, int for
        # writes, None for syncs).
        return self.submit(op)


class NativeAsyncioContextBase(AsyncioContextBase):
    """Mixin of the native backends' adapters, combined with the backend's
    ``_AsyncioBase`` (the native fast path, documented at the top of
    ``rust/core/src/aio.rs``), which must come first in the bases::

        class AsyncioContext(backend._AsyncioBase, NativeAsyncioContextBase): ...

    ``_AsyncioBase`` supplies ``read``/``write``/``fsync``/``fdsync``/
    ``submit`` and the loop machinery; this class wires them the same way
    for every backend:

    construction   open the backend Context, ``_bind`` the native base to
                   it and the loop, watch the completion fd with
                   ``loop.add_reader(fd, self._loop_reader())``, then
                   ``_start_delivery``. A refused construction (e.g.
                   ``loop`` is not an event loop) undoes what was done: the
                   reader is removed only if ``add_reader`` succeeded, and
                   the backend is closed in a ``finally`` (the exception's
                   traceback holds this frame; whoever keeps it must not keep
                   worker threads or fds alive).
    ``close()``    ``_close_native()``: new operations are refused at once;
                   the native base calls ``_release()`` as soon as none is in
                   flight, cancelled ones included ("close once idle").
    loop gone      the loop is closed with operations in flight: the native
                   base notices it drop the reader, drains the backend
                   without touching the loop and calls ``_release()``.
    ``_release()`` stop watching the fd, then close the backend.

    Backends fill in the hooks below. ``_release()`` may run twice
    (thread_aio also calls it from ``close()``): the reader is removed once,
    and the backends' ``close()`` does nothing the second time.
    """

    _reader_fd: int | None = None

    if TYPE_CHECKING:
        # Supplied by the backend's native ``_AsyncioBase``.
        def _bind(
            self,
            context: Any,
            loop: asyncio.AbstractEventLoop,
            max_requests: int,
            deferred: bool,
            engine_obj: Any = None,
        ) -> None: ...
        def _loop_reader(self) -> Callable[[], int]: ...
        def _close_native(self) -> None: ...

    # -- backend hooks -----------------------------------------------------

    def _open_context(self, max_requests: int, **kwargs: Any) -> Any:
        """Create the backend Context."""
        factory: Callable[..., Any] = self.CONTEXT_CLASS
        return factory(max_requests=max_requests, **kwargs)

    def _completion_fd(self, context: Any) -> int:
        """The fd the loop watches for completions (default: its eventfd)."""
        fd: int = context.fileno
        return fd

    def _engine_obj(self, context: Any) -> Any:
        """The backend's own object for the native engine (``_bind``)."""
        return None

    def _start_delivery(self, context: Any) -> None:
        """Called once the completion fd is watched (default: nothing)."""

    def _close_backend(self, context: Any) -> None:
        """Release the backend's resources (default: ``context.close()``)."""
        context.close()

    # -- AsyncioContextBase hooks ---------------------------------------------

    def _create_context(self, max_requests: int, **kwargs: Any) -> Any:
        context = self._open_context(max_requests, **kwargs)
        watched = None
        try:
            fd = self._completion_fd(context)
            self._bind(context, self.loop, max_requests, self.deferred, self._engine_obj(context))
            self.loop.add_reader(fd, self._loop_reader())
            watched = fd
            # Only now that the fd is watched: no completion can be stranded.
            self._start_delivery(context)
        except BaseException:
            try:
                # Only a real loop that took the reader is asked to drop it
                # (``loop`` may be any object here).
                self._remove_loop_reader(watched)
            finally:
                self._close_backend(context)
            raise
        self._reader_fd = fd
        return context

    def _destroy_context(self) -> None:
        self._close_native()

    def _release(self) -> None:
        # Called by the native base once idle (or from close(), see
        # thread_aio). The reader goes before the backend closes its fd.
        fd, self._reader_fd = self._reader_fd, None
        self._remove_loop_reader(fd)
        self._close_backend(self.context)
