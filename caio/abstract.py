"""Abstract base classes describing the caio Context/Operation interface.

Only the pure-Python backend subclasses these at runtime; the native types
follow the same interface without inheriting from them (see the ``.pyi`` stubs).
"""

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Buffer


class AbstractContext(abc.ABC):
    @property
    def max_requests(self) -> int:
        raise NotImplementedError

    def submit(self, *aio_operations: "AbstractOperation") -> int:
        raise NotImplementedError(aio_operations)

    def cancel(self, *aio_operations: "AbstractOperation") -> int:
        raise NotImplementedError(aio_operations)


class AbstractOperation(abc.ABC):
    @classmethod
    @abc.abstractmethod
    def read(
        cls,
        nbytes: int,
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> "AbstractOperation":
        raise NotImplementedError

    @classmethod
    @abc.abstractmethod
    def write(
        cls,
        payload_bytes: "Buffer",
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> "AbstractOperation":
        raise NotImplementedError

    # -- zero-copy (not abstract: a subclass written before it keeps working)

    @classmethod
    def readinto(
        cls,
        buffer: "Buffer",
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> "AbstractOperation":
        """A read into ``buffer`` (a writable C-contiguous buffer);
        ``get_value()`` is the number of bytes read."""
        raise NotImplementedError

    @classmethod
    def readv(
        cls,
        buffers: "Sequence[Buffer]",
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> "AbstractOperation":
        """One vectored read into ``buffers``; ``get_value()`` is the number
        of bytes read."""
        raise NotImplementedError

    @classmethod
    def writev(
        cls,
        buffers: "Sequence[Buffer]",
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> "AbstractOperation":
        """One vectored write of ``buffers``; ``get_value()`` is the number
        of bytes written."""
        raise NotImplementedError

    @classmethod
    @abc.abstractmethod
    def fsync(cls, fd: int, priority: int = 0) -> "AbstractOperation":
        raise NotImplementedError

    @classmethod
    @abc.abstractmethod
    def fdsync(cls, fd: int, priority: int = 0) -> "AbstractOperation":
        raise NotImplementedError

    @abc.abstractmethod
    def get_value(self) -> bytes | int | None:
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def fileno(self) -> int:
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def offset(self) -> int:
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def payload(self) -> "Buffer | None":
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        raise NotImplementedError

    @abc.abstractmethod
    def set_callback(self, callback: Callable[[Any], Any]) -> bool:
        raise NotImplementedError
