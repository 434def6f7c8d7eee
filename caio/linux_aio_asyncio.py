"""asyncio adapter for the Linux kernel AIO backend.

Completion path: the kernel (and, for operations it would have run
synchronously, linux_aio's worker threads) signal the Context's eventfd; the
loop's reader callback delivers everything available in one native call
(``Context._drain``), resolving the awaiting futures directly on the loop
thread. Page-cache hits complete inside ``io_submit``: they are delivered
right after the submission (``Context._reap``), so awaiting them does not
suspend the task (within a budget of ``SYNC_BUDGET`` such completions per
loop iteration).

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

import asyncio
from typing import Any, List, Tuple, Union

from . import linux_aio
from .asyncio_base import AsyncioContextBase


def _fast_semaphore(sem: Any) -> bool:
    # The inlined fast paths below touch the same private fields the base
    # class already relies on; fall back to the public methods otherwise.
    return (
        type(sem) is asyncio.BoundedSemaphore
        and all(hasattr(sem, a) for a in ("_value", "_waiters", "_bound_value"))
    )


class AsyncioContext(AsyncioContextBase):
    OPERATION_CLASS = linux_aio.Operation
    CONTEXT_CLASS = linux_aio.Context

    _closed = False
    _reader_fd = -1
    _fast_sem = None

    #: Synchronous completions (page-cache hits delivered right after
    #: io_submit) allowed per event-loop iteration before tasks yield: at a
    #: few microseconds each this bounds an iteration to about a millisecond.
    #: (A per-task streak limit would not: 64 tasks x 32 ops each is still
    #: one 7 ms iteration.)
    SYNC_BUDGET = 128
    _sync_budget = SYNC_BUDGET

    def _refill_sync_budget(self) -> None:
        self._sync_budget = self.SYNC_BUDGET

    # No **kwargs: like upstream, any extra keyword argument is a TypeError
    # (API.md §7 Q13).
    def _create_context(self, max_requests: int) -> Any:
        context = self.CONTEXT_CLASS(max_requests=max_requests)
        # io_submit must never wait for the disk on the loop thread: buffered
        # I/O the kernel cannot do from the page cache goes to worker threads.
        context._set_nowait(True)
        self._pending: List[Tuple[Any, Any]] = []
        self._submit_scheduled = False
        self._release_when_idle = False
        try:
            self.loop.add_reader(context.fileno, self._on_read_event)
        except BaseException:
            context.close()
            raise
        self._reader_fd = context.fileno
        # Completions are delivered on the loop thread: let the native drain
        # resolve futures itself (no Python callback per operation).
        self._loop_delivery = True
        return context

    async def submit(self, op: Any) -> Union[bytes, int, None]:
        # Same steps as AsyncioContextBase.submit (argument check, future,
        # semaphore slot, submission, cancellation handling, get_value()),
        # with the per-operation Python calls of the common case inlined:
        # this path runs once per read/write.
        if type(op) is not self.OPERATION_CLASS and not isinstance(
            op, self.OPERATION_CLASS,
        ):
            raise ValueError("Operation object expected")
        future = self.loop.create_future()
        sem = self.semaphore
        fast = self._fast_sem
        if fast is None:
            fast = self._fast_sem = _fast_semaphore(sem)
        if fast and sem._value > 0 and not sem._waiters:
            sem._value -= 1
        else:
            await sem.acquire()
        try:
            if self.deferred or self._closed:
                self._submit_op(op, future)
            elif self.context.submit(op) == 1:
                # Only completions delivered on this thread can resolve it, so
                # installing the future after the submission is safe - and an
                # op that was already submitted keeps its first submitter's.
                op._set_future(future)
                # A page-cache hit completed inside io_submit: deliver it now
                # rather than after a trip through the event loop.
                self.context._reap()
            else:
                raise OSError("Operation was not submitted")
            try:
                if future.done():
                    # Completed synchronously: no suspension, unless this loop
                    # iteration has used up its budget of synchronous
                    # completions (then every task yields once, and the
                    # budget is refilled first thing next iteration) - so
                    # neither other tasks nor the loop's I/O wait long.
                    budget = self._sync_budget - 1
                    self._sync_budget = budget
                    if budget <= 0:
                        if budget == 0:
                            self.loop.call_soon(self._refill_sync_budget)
                        await asyncio.sleep(0)
                else:
                    await future
            except asyncio.CancelledError:
                try:
                    self.context.cancel(op)
                except ValueError:
                    pass
                raise
            return op.get_value()
        finally:
            if fast and not sem._waiters and sem._value < sem._bound_value:
                sem._value += 1
            else:
                sem.release()

    def _on_done(self, future: Any, result: Any) -> None:
        # Only used without loop delivery; runs on the loop thread.
        if not future.done():
            future.set_result(True)

    def _submit_op(self, op: Any, future: Any) -> None:
        if self._closed:
            raise RuntimeError("AsyncioContext is closed")
        if not self.deferred:
            if self.context.submit(op) != 1:
                raise OSError("Operation was not submitted")
            op._set_future(future)
            return
        # Batch every operation started in this loop iteration into one
        # io_submit call.
        self._pending.append((op, future))
        if not self._submit_scheduled:
            self._submit_scheduled = True
            self.loop.call_soon(self._deferred_submit)

    def _deferred_submit(self) -> None:
        self._submit_scheduled = False
        pending, self._pending = self._pending, []
        try:
            self._submit_batch(pending)
        finally:
            self._maybe_release()

    def _submit_batch(self, pending: List[Tuple[Any, Any]]) -> None:
        # Cancelled while waiting here: never reached the kernel.
        pending = [(op, fut) for op, fut in pending if not fut.done()]
        if not pending:
            return
        try:
            outcomes = self.context._submit_each(*[op for op, _ in pending])
        except BaseException as exc:  # noqa: BLE001 - runs as a bare call_soon callback
            for _, fut in pending:
                if not fut.done():
                    fut.set_exception(exc)
            return
        accepted = False
        for (op, fut), outcome in zip(pending, outcomes):
            if outcome is True:
                op._set_future(fut)
                accepted = True
                continue
            if fut.done():
                continue
            if outcome is False:
                # Already submitted elsewhere (e.g. the same op awaited twice).
                fut.set_exception(OSError("Operation was not submitted"))
            else:
                fut.set_exception(outcome)
        if accepted:
            # Page-cache hits completed inside io_submit: resolve them now.
            self.context._reap()

    def _on_read_event(self) -> None:
        self.context._drain()
        if self._release_when_idle:
            self._maybe_release()

    def _maybe_release(self) -> None:
        # After close(): once the operations started before it (including a
        # deferred batch not submitted yet) have been delivered.
        if self._release_when_idle and not self._pending and not self.context._in_flight:
            self._release()

    def _release(self) -> None:
        self._release_when_idle = False
        fd, self._reader_fd = self._reader_fd, -1
        if fd >= 0:
            try:
                self.loop.remove_reader(fd)
            except (RuntimeError, ValueError, OSError):
                pass  # loop already closed
        self.context.close()

    def _destroy_context(self) -> None:
        if self._closed:
            return
        # New operations are refused from now on; those started before are
        # still submitted and delivered (the reader stays until then), so
        # awaiting them never hangs. Then the kernel context is released.
        self._closed = True
        self._release_when_idle = True
        self._maybe_release()
