"""io_uring based AIO backend (Linux 5.6+)."""

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, final

from typing_extensions import Buffer, Self, disjoint_base

from . import _native
from .abstract import AbstractContext, AbstractOperation

# Whether this build honours the CAIO_TEST_* environment hooks (dev builds with
# CAIO_TEST_HOOKS=1; never release wheels).
_TEST_HOOKS: bool

# Whether this kernel/process may create SQPOLL rings (probed once at import).
SQPOLL_ALLOWED: bool

class OperationError(OSError, SystemError):
    """A failed operation: ``errno``/``strerror`` like OSError, and still a
    SystemError for code written against upstream caio."""

class CapacityError(OSError, OverflowError):
    """``submit()`` refused an operation because the SQ ring is full:
    upstream's OverflowError, and an OSError with ``errno == errno.EAGAIN``."""

# The runtime types do not inherit from the abstract classes; declaring them
# as subclasses here is a typing convenience only.  Neither can be
# subclassed at runtime, hence @final.

@final
class Context(AbstractContext):
    """io_uring AIO context"""

    def __new__(cls, max_requests: int = 32, sqpoll: bool = False) -> Self: ...
    @property
    def max_requests(self) -> int: ...
    # The eventfd signalled on completions (a data attribute, not a method).
    @property
    def fileno(self) -> int: ...
    # 1 if an SQPOLL ring was negotiated, else 0 (an int, compares equal to
    # the corresponding bool).
    @property
    def sqpoll(self) -> int: ...
    def submit(self, *aio_operations: Operation) -> int: ...  # type: ignore[override]
    # cancel(op) as upstream; several operations at once are an extension.
    def cancel(self, operation: Operation, *more: Operation) -> int: ...  # type: ignore[override]
    def flush(self) -> int: ...
    def poll(self) -> int: ...
    def process_events(
        self,
        max_requests: int = 512,
        min_requests: int = 0,
        timeout: int = 0,
    ) -> int: ...
    # Used by caio.linux_uring_asyncio.
    def _deferred_flush(self) -> int: ...
    def _close(self) -> bool: ...
    def _process_loop_events(self) -> int: ...
    # Used by caio._drivers (the trio and anyio adapters).
    def _enable_loop_delivery(self) -> None: ...

@final
class Operation(AbstractOperation):
    """io_uring AIO operation"""

    @classmethod
    def read(
        cls,
        nbytes: int,
        fd: int,
        offset: int = 0,
        priority: int = 0,
    ) -> Operation: ...
    # Any C-contiguous buffer, used in place (bytes, bytearray, memoryview,
    # mmap, array.array, ...).
    @classmethod
    def write(
        cls,
        payload_bytes: Buffer,
        fd: int,
        offset: int = 0,
        priority: int = 0,
    ) -> Operation: ...
    # A read into the caller's writable C-contiguous buffer; get_value() is
    # the number of bytes read.
    @classmethod
    def readinto(
        cls,
        buffer: Buffer,
        fd: int,
        offset: int = 0,
        priority: int = 0,
    ) -> Operation: ...
    # One vectored transfer of at most 1024 buffers (IOV_MAX).
    @classmethod
    def readv(
        cls,
        buffers: Sequence[Buffer],
        fd: int,
        offset: int = 0,
        priority: int = 0,
    ) -> Operation: ...
    @classmethod
    def writev(
        cls,
        buffers: Sequence[Buffer],
        fd: int,
        offset: int = 0,
        priority: int = 0,
    ) -> Operation: ...
    @classmethod
    def fsync(cls, fd: int, priority: int = 0) -> Operation: ...
    @classmethod
    def fdsync(cls, fd: int, priority: int = 0) -> Operation: ...
    def get_value(self) -> bytes | int | None: ...
    def set_callback(self, callback: Callable[[int], Any], /) -> bool: ...
    def _set_future(self, future: asyncio.Future[Any], /) -> None: ...
    @property
    def fileno(self) -> int: ...
    @property
    def offset(self) -> int: ...
    # read: bytes of the requested length, filled in place; write: the
    # caller's bytes; fsync/fdsync: None.
    @property
    def payload(self) -> Buffer | None: ...
    @property
    def nbytes(self) -> int: ...
    # Whether the operation uses memory the caller may change (readinto, a
    # write from a mutable buffer).
    @property
    def _borrows_buffer(self) -> bool: ...
    # Raw kernel result: bytes moved, 0, or a negative errno.
    @property
    def result(self) -> int: ...
    # 0 or a positive errno.
    @property
    def error(self) -> int: ...
    # The Context while the operation is in flight, else None.
    @property
    def context(self) -> Context | None: ...

@final
class OperationAwaitable(_native.OperationAwaitableAPI[Operation]):
    """An operation in progress, as returned by the asyncio adapter's
    read/write/fsync/fdsync/submit: await it or wrap it in a task."""

@disjoint_base
class _AsyncioBase(_native.AsyncioBaseAPI[Context, OperationAwaitable]):
    """Native base of linux_uring_asyncio.AsyncioContext (the per-operation
    fast path)."""

_PathOps = _native._PathOps
