"""The per-operation path of ``TrioContext`` and ``AnyioContext``.

Both classes are this base plus a handful of primitives of their library
(:class:`Waiter`, ``_wait_readable``, ``_shield``, checkpoints, a thread-to-loop
call). The backend is driven through its raw Context (``caio._drivers``).
This module imports neither trio nor anyio.

One operation (``await ctx.read(...)``)::

    cancel point        checkpoint_if_cancelled(): nothing is submitted
                        when the task is already cancelled
    admission           a slot of max_requests, FIFO (DESIGN.md §5.4);
                        cancelled while waiting: nothing was submitted
    submit + kick       the op is in flight; a page-cache hit is delivered
                        inside this call (no suspension, see MAX_SYNC_STREAK).
                        With a completion fd, admission is only checked
                        before, and the slot taken after, the submission: an
                        op completed inline never held one
    wait                until the op's callback marked it done (below)
    cancelled/failed    while waiting: the op is cancelled in the engine
    while waiting       (Driver.cancel), then waited for, shielded, until
                        the engine has delivered it; only then does the
                        cancellation propagate. No op outlives its await,
                        so none outlives its context, and a buffer is never
                        released while the kernel or a worker may write it
    result              op.get_value(): bytes / int / None, or the op's
                        error (the same types as AsyncioContext)

Completions. Backends with a completion fd (linux_uring, linux_aio,
thread_aio on POSIX) deliver only when drained. There is no background task:
among the tasks waiting for an op of this context one at a time is the
*poller*: it waits for the fd with the library's ``wait_readable``, then
drains the whole batch, which marks every completed op done and wakes its
task (one wake-up of the loop per batch). The other waiters are parked. A
poller that leaves (its op is done, or it was cancelled) hands the role to a
parked waiter whose op is not done yet. Backends without such an fd
(python_aio, thread_aio on Windows) run callbacks on a worker thread; they
queue the waiter and one thread-to-loop call per batch
(``run_sync_soon``/``call_soon_threadsafe``) wakes the tasks.
"""

import abc
import operator
import os
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

from ._drivers import open_driver
from ._opsapi import OperationsAPI
from ._pathops import Job, PathOpsAPI, run_job

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11


# Bumped in a forked child: a context created before fork() refuses to
# work there (its engine is the parent's, DESIGN.md §9.3), and says so
# before its admission or polling state, also the parent's, could make it
# wait for ever.
_fork_generation = [0]


def _after_fork_in_child() -> None:
    _fork_generation[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Waiter(abc.ABC):
    """A task parked until ``wake()``; ``done`` is set by the op's delivery
    (calling the waiter) or by whoever hands a slot over."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def __call__(self, result: Any = None) -> None:
        # The op's callback, on the thread that owns the task's loop.
        self.done = True
        self.wake()

    @abc.abstractmethod
    def wake(self) -> None:
        """Resume the parked task (nothing if it is not parked)."""

    @abc.abstractmethod
    async def park(self) -> None:
        """Suspend until ``wake()``; cancellable."""


class StructuredContextBase(OperationsAPI, PathOpsAPI, abc.ABC):
    """Common base of :class:`caio.trio.TrioContext` and
    :class:`caio.anyio.AnyioContext` (see the module docstring).

    ``TrioContext(max_requests=512, *, backend=None, **kwargs)`` (and ``AnyioContext(...)``):
    ``backend`` is ``"linux_uring"``, ``"linux_aio"``, ``"thread_aio"`` or
    ``"python_aio"``; by default the one ``from caio import AsyncioContext``
    uses (best available, ``CAIO_IMPL``, ``default_implementation``).
    Other keyword arguments go to the backend's Context (``pool_size=``,
    ``sqpoll=``). At most ``max_requests`` operations are in flight; more
    wait their turn in FIFO order.

    ``read(nbytes, fd, offset, priority=0)`` → ``bytes``,
    ``readinto(buffer, fd, offset=0, priority=0)`` → ``int``,
    ``readv(buffers, fd, offset=0, priority=0)`` / ``writev(...)`` → ``int``,
    ``write(payload, fd, offset, priority=0)`` → ``int``, ``fsync(fd)``,
    ``fdsync(fd)`` → ``None``: argument errors raise at call time, I/O
    errors from the ``await``. ``close()`` refuses new operations and
    releases the backend once those already started have ended;
    ``aclose()`` and ``async with`` also wait for them.
    """

    #: A falsy ``max_requests`` means this many (as ``AsyncioContext``).
    MAX_REQUESTS_DEFAULT = 512

    #: Operations completed inside their submission (page-cache hits) do not
    #: suspend the task. So that a task looping over cached reads cannot
    #: starve the others, it yields once (a cancel-shielded checkpoint) after
    #: this many consecutive ones, as ``AsyncioContext`` does. Set it to 1 to
    #: make every operation a full checkpoint.
    MAX_SYNC_STREAK = 32

    # -- library primitives, supplied by the subclasses ----------------------

    _Waiter: ClassVar[type[Waiter]]
    _wait_readable: Callable[[int], Awaitable[Any]]
    _checkpoint_if_cancelled: Callable[[], Awaitable[Any]]
    _cancel_shielded_checkpoint: Callable[[], Awaitable[Any]]
    #: Runs a blocking function on a worker thread (not abandoned when
    #: cancelled: the call runs to its end, so an fd it opens is returned).
    _to_thread: Callable[..., Awaitable[Any]]

    @abc.abstractmethod
    def _shield(self) -> AbstractContextManager[Any]:
        """A cancel scope that shields its body from cancellation."""

    @abc.abstractmethod
    def _is_cancellation(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the library's cancellation exception."""

    @abc.abstractmethod
    def _thread_caller(self) -> Callable[[Callable[[], Any]], Any]:
        """On the loop thread: a function any thread may call to run a
        callback soon on this loop (non-blocking)."""

    # -- construction ----------------------------------------------------------

    def __init__(
        self,
        max_requests: int | None = None,
        *,
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        max_requests = operator.index(max_requests or self.MAX_REQUESTS_DEFAULT)
        if max_requests < 0:
            raise ValueError(f"max_requests must be positive, not {max_requests}")
        driver = open_driver(backend, max_requests, **kwargs)
        self._driver = driver
        self._fd = driver.fd
        # The per-operation path calls these directly.
        self._submit: Callable[[Any], int] = driver.context.submit
        self._kick = driver.kick
        #: The backend's raw Context.
        self.context: Any = driver.context
        #: ``"linux_uring"``, ``"linux_aio"``, ``"thread_aio"`` or ``"python_aio"``.
        self.backend = driver.name
        self.max_requests = max_requests
        self.CONTEXT_CLASS: Any = driver.module.Context
        self.OPERATION_CLASS: Any = driver.module.Operation
        self._generation = _fork_generation[0]
        # Admission (loop thread only).
        self._in_use = 0
        self._slot_waiters: deque[Waiter] = deque()
        # Operations between the closed check and their end (slot waiters
        # included); the backend is released when this drops to 0 after
        # close().
        self._active = 0
        self._closed = False
        self._released = False
        self._idle_waiters: list[Waiter] = []
        self._streak = 0
        # The fast path's callback: an op completed inline appends its
        # result here (cleared at once).
        self._inline_done: list[int] = []
        self._inline_sink = self._inline_done.append
        # fd delivery: whether a task is the poller, and the parked ones.
        self._polling = False
        self._parked: dict[Waiter, None] = {}
        self._successor: Waiter | None = None
        # thread delivery: waiters whose op finished on a worker thread.
        self._finished: deque[Waiter] = deque()
        self._wakeup_pending = False
        self._call_soon: Callable[[Callable[[], Any]], Any] | None = None

    def __repr__(self) -> str:
        return "<{} backend={!r} max_requests={} in_flight={}{}>".format(
            type(self).__name__,
            self.backend,
            self.max_requests,
            self._in_use,
            " closed" if self._closed else "",
        )

    # -- operations ------------------------------------------------------------

    async def submit(self, op: Any) -> bytes | int | None:
        """Run an Operation of this backend (``OPERATION_CLASS``)."""
        if not isinstance(op, self.OPERATION_CLASS):
            raise ValueError("Operation object expected")
        result: bytes | int | None = await self._execute(op)
        return result

    # -- close -----------------------------------------------------------------

    def close(self) -> None:
        """Refuse new operations; release the backend once the operations
        already started have ended (at once if there are none)."""
        if self._closed:
            return
        self._closed = True
        if not self._active:
            self._release()

    async def aclose(self) -> None:
        """``close()``, then wait until the operations already started have
        ended and the backend is released."""
        self.close()
        while self._active:
            waiter = self._Waiter()
            self._idle_waiters.append(waiter)
            try:
                while not waiter.done:
                    await waiter.park()
            except BaseException:
                if waiter in self._idle_waiters:
                    self._idle_waiters.remove(waiter)
                raise

    async def __aenter__(self) -> "Self":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._driver.release()

    def _on_idle(self) -> None:
        if self._closed:
            self._release()
        if self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter()

    # -- the per-operation path ---------------------------------------------------

    def _check_usable(self) -> None:
        if self._generation != _fork_generation[0]:
            raise RuntimeError(
                f"this {type(self).__name__} was created before fork(); its engine belongs "
                "to the parent process: create a new one in the child"
            )
        if self._closed:
            raise RuntimeError(
                f"{type(self).__name__} is closed: create a new one to submit operations"
            )

    async def _execute(self, op: Any) -> Any:
        await self._checkpoint_if_cancelled()
        if (
            self._fd is not None
            and self._in_use < self.max_requests
            and not self._slot_waiters
            and not self._closed
            and self._generation == _fork_generation[0]
        ):
            # The fast path of a completion-fd driver: only this thread
            # delivers (inside submit/kick here, or a later drain), so an op
            # completed inline needs no slot, no count for close() and no
            # waiter: its callback is a list's append (no Python frame). Only
            # an op still pending after the kick takes them, its callback
            # replaced by a waiter before anything can deliver it (DESIGN.md
            # §5.10).
            done = self._inline_done
            if done:
                done.clear()  # from an op whose submission was refused
            op.set_callback(self._inline_sink)
            if self._submit(op) != 1:
                raise OSError("Operation was not submitted")
            error: BaseException | None = None
            kick = self._kick
            if kick is not None:
                try:
                    kick()
                except BaseException as exc:  # the op is in flight regardless
                    error = exc
            if done:
                done.clear()
                if error is not None:
                    raise error
                self._streak += 1
                if self._streak >= self.MAX_SYNC_STREAK:
                    self._streak = 0
                    await self._cancel_shielded_checkpoint()
                return op.get_value()
            waiter = self._Waiter()
            op.set_callback(waiter)
            self._streak = 0
            self._in_use += 1
            self._active += 1
            try:
                try:
                    return await self._await_op(op, waiter, error)
                finally:
                    self._release_slot()
            finally:
                self._active -= 1
                if not self._active:
                    self._on_idle()
        self._check_usable()
        self._active += 1
        try:
            if self._in_use < self.max_requests and not self._slot_waiters:
                self._in_use += 1
            else:
                await self._acquire_slot()
            try:
                waiter = self._Waiter()
                if self._fd is None:
                    self._call_soon = self._thread_caller()
                    op.set_callback(partial(self._thread_done, waiter))
                else:
                    op.set_callback(waiter)
                self._driver.submit(op)  # raises: not in flight
                error = None
                kick = self._kick
                if kick is not None:
                    try:
                        kick()
                    except BaseException as exc:  # the op is in flight regardless
                        error = exc
                if waiter.done and error is None:
                    self._streak += 1
                    if self._streak >= self.MAX_SYNC_STREAK:
                        self._streak = 0
                        await self._cancel_shielded_checkpoint()
                    return op.get_value()
                self._streak = 0
                return await self._await_op(op, waiter, error)
            finally:
                self._release_slot()
        finally:
            self._active -= 1
            if not self._active:
                self._on_idle()

    # OperationsAPI's hook: read()/write()/... run the per-operation path.
    _run_op = _execute

    async def _await_op(self, op: Any, waiter: Waiter, error: BaseException | None) -> Any:
        """Wait until the engine has delivered ``op`` (submitted, with
        ``waiter`` as its callback) and return its value; ``error``: the
        kick after its submission raised that (re-raised once the op is
        done)."""
        try:
            if error is not None:
                raise error
            await self._wait_done(waiter)
        except GeneratorExit:
            # The coroutine is being closed without being awaited to the
            # end (garbage collected with its loop gone): it can no longer
            # wait. The engine keeps the op (and its buffer) alive until it
            # completes.
            if not waiter.done:
                self._driver.cancel(op)
            raise
        except BaseException:
            await self._abandon(op, waiter)
            raise
        return op.get_value()

    # -- path operations (DESIGN.md §14) ------------------------------------------

    def _path_job(self, job: Job) -> Coroutine[Any, Any, Any]:
        return self._run_path_job(job)

    async def _run_path_job(self, job: Job) -> Any:
        # The os calls on the library's worker threads; they count as
        # operations in flight for close()/aclose(), but take no slot.
        await self._checkpoint_if_cancelled()
        self._check_usable()
        self._active += 1
        try:
            return await self._to_thread(run_job, job)
        finally:
            self._active -= 1
            if not self._active:
                self._on_idle()

    async def _acquire_slot(self) -> None:
        waiter = self._Waiter()
        self._slot_waiters.append(waiter)
        try:
            while not waiter.done:
                await waiter.park()
        except BaseException:
            if waiter.done:
                self._release_slot()  # handed over meanwhile: pass it on
            else:
                self._slot_waiters.remove(waiter)
            raise

    def _release_slot(self) -> None:
        if self._slot_waiters:
            self._slot_waiters.popleft()()  # the slot goes to the first waiter
        else:
            self._in_use -= 1

    async def _wait_done(self, waiter: Waiter) -> None:
        """Wait until ``waiter.done``, polling the completion fd when nobody
        else does."""
        fd = self._fd
        if fd is None:
            while not waiter.done:
                await waiter.park()
            return
        parked = self._parked
        try:
            while not waiter.done:
                if self._polling:
                    parked[waiter] = None
                    try:
                        await waiter.park()
                    finally:
                        parked.pop(waiter, None)
                    if self._successor is waiter:
                        self._successor = None
                    continue
                self._polling = True
                try:
                    await self._wait_readable(fd)
                finally:
                    self._polling = False
                # One wake-up, the whole batch: every op delivered here has
                # its task woken by its waiter.
                self._driver.drain()
        finally:
            if self._successor is waiter:
                self._successor = None
            if not self._polling and self._successor is None:
                self._hand_off()

    def _hand_off(self) -> None:
        """Nobody polls: wake a parked waiter whose op is still pending so
        that it takes over (``_successor`` until it has run, so that the
        tasks leaving meanwhile do not wake others too)."""
        parked = self._parked
        while parked:
            waiter = next(iter(parked))
            del parked[waiter]
            if not waiter.done:
                self._successor = waiter
                waiter.wake()
                return

    async def _abandon(self, op: Any, waiter: Waiter) -> None:
        """The wait for ``op`` was interrupted (cancelled, or an error): ask
        the engine to cancel it, then wait, shielded, until the engine has
        delivered it. The caller re-raises."""
        if waiter.done:
            return
        self._driver.cancel(op)
        late: BaseException | None = None
        while not waiter.done:
            try:
                with self._shield():
                    await self._wait_done(waiter)
            except BaseException as exc:
                # Only a cancellation the shield cannot stop (asyncio's
                # task.cancel() under anyio) is waited through; anything
                # else ends the wait.
                late = exc
                if not self._is_cancellation(exc):
                    break
        if late is not None:
            raise late

    # -- thread delivery ---------------------------------------------------------

    def _thread_done(self, waiter: Waiter, result: Any) -> None:
        # A worker thread. Queue first, then look at the flag: the loop
        # clears the flag before it drains, so a waiter queued while the flag
        # still reads True is taken by the drain already scheduled.
        self._finished.append(waiter)
        if not self._wakeup_pending:
            self._wakeup_pending = True
            call_soon = self._call_soon
            try:
                if call_soon is not None:
                    call_soon(self._resolve_finished)
            except BaseException:
                # The run is over (trio.RunFinishedError, a closed asyncio
                # loop): no task awaits this op any more. Raising here would
                # only print a traceback from the worker.
                self._wakeup_pending = False

    def _resolve_finished(self) -> None:
        # The loop thread.
        self._wakeup_pending = False
        finished = self._finished
        while finished:
            finished.popleft()()
