"""Linux AIO c API bindings."""

from collections.abc import Callable
from typing import Any, final

from .abstract import AbstractContext, AbstractOperation

# The runtime types do not inherit from the abstract classes; declaring them
# as subclasses here is a typing convenience only.  Neither can be
# subclassed at runtime, hence @final.

class OperationError(OSError, SystemError):
    """A failed operation (``get_value()``): ``errno``/``strerror`` like
    OSError, and still a SystemError for code written against upstream."""

class SubmitError(OSError, ValueError):
    """``submit()`` refused an operation (bad fd, invalid for the file,
    unaligned O_DIRECT write): upstream's ValueError, plus ``errno``."""

@final
class Context(AbstractContext):
    """linux aio context representation"""

    def __init__(self, max_requests: int = 32) -> None: ...
    @property
    def max_requests(self) -> int: ...
    # The eventfd signalled on completions (a data attribute, not a method).
    @property
    def fileno(self) -> int: ...
    def submit(self, *aio_operations: Operation) -> int: ...  # type: ignore[override]
    def cancel(self, operation: Operation) -> int: ...  # type: ignore[override]
    def poll(self) -> int: ...
    def process_events(
        self,
        max_requests: int = 512,
        min_requests: int = 0,
        timeout: int = 0,
    ) -> int: ...
    # Extensions (not in upstream caio): release the kernel AIO context, the
    # eventfd and worker threads now, or once the last in-flight operation
    # has been delivered.
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    # Used by caio.linux_aio_asyncio.
    def _set_nowait(self, flag: bool) -> None: ...
    def _drain(self) -> int: ...
    def _submit_each(self, *aio_operations: Operation) -> list[bool | BaseException]: ...
    @property
    def _in_flight(self) -> int: ...

@final
class Operation(AbstractOperation):
    """linux aio operation representation"""

    @classmethod
    def read(
        cls, nbytes: int, fd: int, offset: int = 0, priority: int = 0,
    ) -> Operation: ...
    @classmethod
    def write(
        cls, payload_bytes: bytes, fd: int, offset: int = 0, priority: int = 0,
    ) -> Operation: ...
    @classmethod
    def fsync(cls, fd: int, priority: int = 0) -> Operation: ...
    @classmethod
    def fdsync(cls, fd: int, priority: int = 0) -> Operation: ...
    def get_value(self) -> bytes | int | None: ...
    # The callback gets the signed kernel result: bytes moved, or -errno.
    def set_callback(self, callback: Callable[[int], Any]) -> bool: ...
    @property
    def fileno(self) -> int: ...
    @property
    def offset(self) -> int: ...
    # read: read-only memoryview; write: the caller's bytes; fsync: None.
    @property
    def payload(self) -> bytes | memoryview | None: ...
    @property
    def nbytes(self) -> int: ...
    # The Context while the operation is in flight, else None.
    @property
    def context(self) -> Context | None: ...
    @property
    def priority(self) -> int: ...
