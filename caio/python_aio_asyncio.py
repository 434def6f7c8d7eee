"""asyncio adapter for the pure-Python backend (:mod:`caio.python_aio`).

Delivery
--------
Completions arrive on the pool's result-handler thread. Finished futures are
queued here and a single wake-up resolves everything that finished meanwhile
(not one per operation). The wake-up goes through a file descriptor of the
adapter's own (``python_aio._WakeupFd``: an eventfd, or a pipe) watched with
``loop.add_reader()``, as the native adapters watch their eventfd. Loops
without fd readers (Windows' proactor loop) get ``call_soon_threadsafe()``
instead.

Not ``call_soon_threadsafe()`` everywhere: it wakes the loop through the
loop's self-pipe, whose registration lives in an epoll instance that a
forked child shares. A child that ends normally finalises the inherited loop
(whenever something it still holds at exit references it, e.g. the frame
that created this adapter), and ``BaseEventLoop.close()`` unregisters the
self-pipe from that shared epoll: the parent's loop then never wakes for a
``call_soon_threadsafe()`` again. The adapter's own fd is not touched by the
child (``_remove_loop_reader`` leaves the loop alone in a forked child).

Close once idle
---------------
``close()`` refuses new operations at once and does not wait for those in
flight; as soon as every operation the backend accepted has been delivered
(at once if none is in flight), the adapter stops watching its fd, closes it
and waits for the pool's threads, which have nothing left to do and end
promptly, taking the pool's notifier fd with them (DESIGN.md §5.6): no OS
resource is left to the garbage collector, however long the adapter object
itself is kept. If the loop is closed with operations in flight, the first
completion that finds it closed releases what it can without the loop (the
pool then winds down by itself).

The loop holds the fd's reader callback, which references the adapter only
weakly: an adapter dropped without ``close()`` is still collected, and a
finaliser then takes its fd off the loop (on the loop's thread) and closes it.
"""

import asyncio
import os
import weakref
from asyncio.events import _get_running_loop
from collections import deque
from collections.abc import Callable
from typing import Any

from .asyncio_base import AsyncioContextBase
from .python_aio import WAKEUP_FDS, Context, Operation, _WakeupFd

#: Reads up to this many bytes are tried from the page cache inside submit()
#: (the native adapters' INLINE_READ_MAX, DESIGN.md §11.3).
INLINE_READ_MAX = 64 * 1024


def _reader(ref: "weakref.ReferenceType[AsyncioContext]", wakeup: _WakeupFd) -> Callable[[], None]:
    # Registered with the loop. Holds the adapter weakly and the wake-up fd
    # strongly: the fd is never closed while the loop still watches it.
    def on_readable() -> None:
        adapter = ref()
        if adapter is not None:
            adapter._on_wakeup()
        else:
            wakeup.drain()

    return on_readable


def _unwatch_dropped(
    loop: asyncio.AbstractEventLoop,
    wakeup: _WakeupFd,
    owner_pid: int,
) -> None:
    # weakref.finalize callback: the adapter was collected without being
    # released. Any thread may get here; the loop is only touched from its
    # own thread, and never from a forked child (its epoll instance is the
    # parent's).
    if os.getpid() != owner_pid:
        wakeup.close()
        return

    def unwatch() -> None:
        try:
            loop.remove_reader(wakeup.fileno())
        except (RuntimeError, ValueError, OSError):
            pass
        wakeup.close()

    try:
        loop.call_soon_threadsafe(unwatch)
    except RuntimeError:  # the loop is closed: it watches nothing any more
        wakeup.close()


class AsyncioContext(AsyncioContextBase):
    OPERATION_CLASS = Operation
    CONTEXT_CLASS = Context

    #: Longest wait (seconds) for the pool's threads when the closed adapter
    #: is released. They only have to wake up and return (nothing is in
    #: flight then); the bound covers work put on the pool from outside.
    RELEASE_TIMEOUT = 5.0

    def __init__(self, *args: Any, **kwargs: Any):
        # Set up before the base constructor creates the Context.
        self._finished: deque[asyncio.Future[Any]] = deque()
        self._wakeup_pending = False
        self._wakeup: _WakeupFd | None = None
        self._reader_fd: int | None = None
        self._unwatch: weakref.finalize[Any, Any] | None = None
        # Operations accepted by the backend whose completion the loop has
        # not processed yet (loop thread only).
        self._in_flight = 0
        self._closing = False
        self._release_ran = False
        # Slot accounting for cancelled operations (loop thread only): the
        # Context refuses work beyond max_requests *running* operations, and a
        # cancelled one keeps running, so its semaphore slot is returned only
        # when it has really finished.
        self._cancelled_running: set[asyncio.Future[Any]] = set()
        self._cancelled_finished: set[asyncio.Future[Any]] = set()
        super().__init__(*args, **kwargs)

    def _create_context(self, max_requests: int, **kwargs: Any) -> Any:
        context = super()._create_context(max_requests, **kwargs)
        # Page-cache hits complete inside submit() on the loop thread, as the
        # native adapters' do (DESIGN.md §7.5); see _on_done.
        context._enable_inline_reads(INLINE_READ_MAX)
        if not WAKEUP_FDS:
            return context
        try:
            wakeup = _WakeupFd()
        except BaseException:
            context.close()
            raise
        try:
            self.loop.add_reader(wakeup.fileno(), _reader(weakref.ref(self), wakeup))
        except Exception:
            # No fd readers on this loop (proactor), or not a usable loop:
            # wake-ups go through call_soon_threadsafe() as they always did.
            wakeup.close()
            return context
        self._wakeup = wakeup
        self._reader_fd = wakeup.fileno()
        unwatch = weakref.finalize(self, _unwatch_dropped, self.loop, wakeup, os.getpid())
        unwatch.atexit = False
        self._unwatch = unwatch
        return context

    def _on_submitted(self) -> None:
        self._in_flight += 1

    def _on_done(self, future: "asyncio.Future[Any]", result: Any) -> None:
        if _get_running_loop() is self.loop:
            # A read completed inline, inside Context.submit() on the loop
            # thread: resolve it now, so submit() returns without
            # suspending. _on_submitted() follows and counts it in flight;
            # it is not, so take that count back here.
            self._in_flight -= 1
            if not future.done():
                future.set_result(True)
            return
        # Foreign thread.  Order matters: queue the future first, then look
        # at the flag.  The loop clears the flag *before* draining, so a
        # future queued while the flag still reads True is picked up by the
        # drain that is already scheduled; one queued after the flag was
        # cleared schedules a new drain.  A spurious extra drain is harmless.
        self._finished.append(future)
        if self._wakeup_pending:
            return
        self._wakeup_pending = True
        wakeup = self._wakeup
        if wakeup is not None:
            if not self.loop.is_closed():
                if wakeup.signal():
                    return
            else:
                self._loop_gone()
                return
        try:
            self.loop.call_soon_threadsafe(self._resolve_finished)
        except BaseException:
            # Do not leave the flag set, or no later completion would try
            # to wake the loop again.
            self._wakeup_pending = False
            if self.loop.is_closed():
                # The loop was closed with this operation in flight: no
                # task can await its future any more, so there is nobody
                # to tell (raising here would only print a traceback from
                # the pool's result thread).
                self._finished.clear()
                return
            raise

    def _loop_gone(self) -> None:
        # Result-handler thread, the loop is closed: nobody can await these
        # futures any more, and the loop watches no fd. Release what does
        # not need the loop: the wake-up fd, and the Context (closing it
        # refuses new work; the pool finishes what it has in the background).
        self._wakeup_pending = False
        self._finished.clear()
        wakeup = self._wakeup
        if wakeup is not None:
            unwatch = self._unwatch
            if unwatch is not None:
                unwatch.detach()
            wakeup.close()
        self.context.close()

    def _on_wakeup(self) -> None:
        # Loop thread: the wake-up fd is readable.
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.drain()
        self._resolve_finished()

    def _resolve_finished(self) -> None:
        # Loop thread.
        self._wakeup_pending = False
        finished = self._finished
        while finished:
            future = finished.popleft()
            self._in_flight -= 1
            if not future.done():
                future.set_result(True)
            elif future in self._cancelled_running:
                # Its awaiter was cancelled earlier and left the slot to us.
                self._cancelled_running.discard(future)
                self.semaphore.release()
            elif future.cancelled():
                # Finished before the awaiter's cancellation was handled.
                self._cancelled_finished.add(future)
        if self._closing and self._in_flight <= 0:
            self._release()

    def _keep_slot_until_done(self, op: Any, future: "asyncio.Future[Any]") -> bool:
        # Loop thread, like _resolve_finished: no race between the two.
        if not future.cancelled():
            return False  # resolved: the op has finished
        if future in self._cancelled_finished:
            self._cancelled_finished.discard(future)
            return False
        self._cancelled_running.add(future)
        return True

    def _destroy_context(self) -> None:
        # Does not wait for operations: those already accepted finish in the
        # background and are still delivered; the adapter is released once
        # they have.
        self._closing = True
        self.context.close()
        if self._in_flight <= 0:
            self._release()
        elif self.loop.is_closed():
            # Nobody can await them any more: let go of what needs no
            # waiting; the pool winds down by itself once they are done.
            self._release(join=False)

    def _released(self) -> bool:
        """Whether the closed adapter was released (as the native ones)."""
        return self._release_ran

    def _release(self, join: bool = True) -> None:
        """Stop watching the wake-up fd and close it, then (``join``) wait
        for the pool's threads, which end promptly now that nothing is in
        flight, so that its notifier fd is closed too. Once."""
        if self._release_ran:
            return
        self._release_ran = True
        unwatch = self._unwatch
        if unwatch is not None:
            unwatch.detach()
        fd, self._reader_fd = self._reader_fd, None
        self._remove_loop_reader(fd)
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.close()
        if join:
            self.context._join(self.RELEASE_TIMEOUT)
