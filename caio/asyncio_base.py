"""Shared asyncio adapter: turns a backend Context into awaitable operations.

Every ``caio.<backend>_asyncio.AsyncioContext`` subclasses
:class:`AsyncioContextBase`.  The per-operation path is::

    read()/write()/fsync()/fdsync()   build the Operation eagerly (argument
                                      errors raise here, before any await)
    submit(op)                        one coroutine: take a semaphore slot,
                                      hand the op to the backend, await a
                                      future, return ``op.get_value()``

Backends customise it through small hooks: ``_create_context``,
``_submit_op``, ``_on_submitted``, ``_on_done`` and ``_destroy_context``.
"""

import abc
import asyncio
import os
from functools import partial
from typing import Any, Coroutine, Optional, Type, Union

from .abstract import AbstractContext, AbstractOperation


ContextType = Type[AbstractContext]
OperationType = Type[AbstractOperation]


def _resolve(future: asyncio.Future) -> None:
    # Runs on the loop thread; the future may have been cancelled meanwhile.
    if not future.done():
        future.set_result(True)


class AsyncioContextBase(abc.ABC):
    MAX_REQUESTS_DEFAULT = 512

    CONTEXT_CLASS: ContextType
    OPERATION_CLASS: OperationType

    def __init__(
        self,
        max_requests: Optional[int] = None,
        loop: Optional[asyncio.AbstractEventLoop] = None,
        deferred: bool = False,
        **kwargs: Any,
    ):
        max_requests = max_requests or self.MAX_REQUESTS_DEFAULT
        self.loop = loop or asyncio.get_event_loop()
        self.deferred = deferred
        self.semaphore = asyncio.BoundedSemaphore(max_requests)
        self._owner_pid = os.getpid()
        self.context = self._create_context(max_requests, **kwargs)

    def _remove_loop_reader(self, fd: Optional[int]) -> None:
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
        return self.CONTEXT_CLASS(max_requests=max_requests, **kwargs)

    def _destroy_context(self) -> None:
        """Release the backend context (default: nothing to release)."""

    def _on_done(self, future: asyncio.Future, result: Any) -> None:
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

    def _submit_op(self, op: AbstractOperation, future: asyncio.Future) -> None:
        if self.context.submit(op) != 1:
            raise OSError("Operation was not submitted")

    def _on_submitted(self) -> None:
        """Called after each successful ``_submit_op`` (default: nothing)."""

    def _keep_slot_until_done(self, op: AbstractOperation, future: asyncio.Future) -> bool:
        """The awaiting task was cancelled while ``op`` may still be running.

        Return True to take over releasing its semaphore slot once the backend
        has really finished the op (so cancelled-but-running operations cannot
        pile up beyond ``max_requests`` and make the backend refuse new ones);
        False (default) releases it now, as upstream does.
        """
        return False

    # -- public API --------------------------------------------------------

    def close(self) -> None:
        self._destroy_context()

    async def __aenter__(self) -> "AsyncioContextBase":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    # Adapters whose completions are delivered on the event-loop thread set
    # this (per instance, once delivery is wired up): the native drain then
    # resolves the future itself (``Operation._set_future``), with no Python
    # callback per operation. ``_on_done`` is not used in that mode.
    _loop_delivery = False

    #: Operations served synchronously (a page-cache hit completed inside
    #: ``submit``) never suspend the awaiting coroutine. So that a task
    #: looping over cached reads cannot starve the others, the loop gets one
    #: turn after this many consecutive synchronous completions.
    MAX_SYNC_STREAK = 32
    _sync_streak = 0

    async def submit(self, op: AbstractOperation) -> Union[bytes, int, None]:
        if not isinstance(op, self.OPERATION_CLASS):
            raise ValueError("Operation object expected")

        future = self.loop.create_future()
        if self._loop_delivery:
            op._set_future(future)  # type: ignore[attr-defined]
        else:
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
            self._submit_op(op, future)
            self._on_submitted()
            try:
                if future.done():
                    self._sync_streak += 1
                    if self._sync_streak >= self.MAX_SYNC_STREAK:
                        self._sync_streak = 0
                        await asyncio.sleep(0)
                else:
                    self._sync_streak = 0
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

    def read(
        self,
        nbytes: int,
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> Coroutine[Any, Any, bytes]:
        return self.submit(
            self.OPERATION_CLASS.read(nbytes, fd, offset, priority),
        )

    def write(
        self,
        payload: bytes,
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> Coroutine[Any, Any, int]:
        return self.submit(
            self.OPERATION_CLASS.write(payload, fd, offset, priority),
        )

    def fsync(self, fd: int) -> Coroutine[Any, Any, None]:
        return self.submit(self.OPERATION_CLASS.fsync(fd))

    def fdsync(self, fd: int) -> Coroutine[Any, Any, None]:
        return self.submit(self.OPERATION_CLASS.fdsync(fd))
