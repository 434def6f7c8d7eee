"""io_uring based AIO backend (Linux 5.6+)."""

from collections.abc import Callable
from typing import Any, final

from .abstract import AbstractContext, AbstractOperation

# Whether this kernel/process may create SQPOLL rings (probed once at import).
SQPOLL_ALLOWED: bool

# The runtime types do not inherit from the abstract classes; declaring them
# as subclasses here is a typing convenience only.  Neither can be
# subclassed at runtime, hence @final.

@final
class Context(AbstractContext):
    """io_uring AIO context"""

    def __init__(self, max_requests: int = 32, sqpoll: bool = False) -> None: ...
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
    def cancel(self, operation: Operation) -> int: ...  # type: ignore[override]
    def flush(self) -> int: ...
    def poll(self) -> int: ...
    def process_events(
        self,
        max_requests: int = 512,
        min_requests: int = 0,
        timeout: int = 0,
    ) -> int: ...

@final
class Operation(AbstractOperation):
    """io_uring AIO operation"""

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
    def set_callback(self, callback: Callable[[int], Any], /) -> bool: ...
    @property
    def fileno(self) -> int: ...
    @property
    def offset(self) -> int: ...
    # read: bytes of the requested length, filled in place; write: the
    # caller's bytes; fsync/fdsync: None.
    @property
    def payload(self) -> bytes | None: ...
    @property
    def nbytes(self) -> int: ...
    # Raw kernel result: bytes moved, 0, or a negative errno.
    @property
    def result(self) -> int: ...
    # 0 or a positive errno.
    @property
    def error(self) -> int: ...
    # The Context while the operation is in flight, else None.
    @property
    def context(self) -> Context | None: ...
