"""Typing only: the members every native backend module (``linux_uring``,
``linux_aio``, ``thread_aio``) defines alike. Each module's stub names its
own classes as subclasses of these; at runtime the classes are the module's
own (no such base exists, and there is no ``caio._native`` module).
"""

import asyncio
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any, Generic, TypeVar, final

from typing_extensions import Buffer, Self

from .abstract import AbstractOperation

_Op = TypeVar("_Op")
_Ctx = TypeVar("_Ctx")
_Aw = TypeVar("_Aw")

class OperationAwaitableAPI(Coroutine[Any, Any, Any], Generic[_Op]):
    """An operation in progress, as returned by the asyncio adapter's
    read/write/fsync/fdsync/submit: await it or wrap it in a task."""

    @property
    def operation(self) -> _Op: ...
    # The operation kind and "AsyncioContext.<kind>", shown in task reprs.
    @property
    def __name__(self) -> str: ...
    @property
    def __qualname__(self) -> str: ...
    def __await__(self) -> Generator[Any, None, Any]: ...
    def send(self, value: Any, /) -> Any: ...
    def throw(self, typ: Any, val: Any = ..., tb: Any = ..., /) -> Any: ...
    def close(self) -> None: ...

class AsyncioBaseAPI(Generic[_Ctx, _Aw]):
    """The native base of a backend's AsyncioContext (the per-operation
    fast path)."""

    def read(self, nbytes: int, fd: int, offset: int, priority: int = 0) -> _Aw: ...
    def write(self, payload: Buffer, fd: int, offset: int, priority: int = 0) -> _Aw: ...
    def readinto(self, buffer: Buffer, fd: int, offset: int = 0, priority: int = 0) -> _Aw: ...
    def readv(
        self, buffers: Sequence[Buffer], fd: int, offset: int = 0, priority: int = 0
    ) -> _Aw: ...
    def writev(
        self, buffers: Sequence[Buffer], fd: int, offset: int = 0, priority: int = 0
    ) -> _Aw: ...
    def fsync(self, fd: int) -> _Aw: ...
    def fdsync(self, fd: int) -> _Aw: ...
    # As AsyncioContextBase.submit: anything but this backend's Operation
    # raises ValueError when awaited.
    def submit(self, op: AbstractOperation) -> _Aw: ...
    def _bind(
        self,
        context: _Ctx,
        loop: asyncio.AbstractEventLoop,
        max_requests: int,
        deferred: bool,
        engine_obj: Any = ...,
    ) -> None: ...
    def _process_loop_events(self) -> int: ...
    def _loop_reader(self) -> Callable[[], int]: ...
    def _close_native(self) -> None: ...
    def _gate_state(self) -> tuple[int, int, int]: ...
    def _released(self) -> bool: ...

@final
class _PathOps:
    """The native runner of path operations (DESIGN.md §14), driven by
    ``caio._pathops``."""

    def __new__(cls, workers: int, inline_slice_ns: int, /) -> Self: ...
    def submit(
        self,
        future: asyncio.Future[Any],
        code: int,
        name1: Any,
        path1: bytes | None,
        name2: Any,
        path2: bytes | None,
        fd1: int | None,
        fd2: int | None,
        a: int,
        b: int,
        c: int,
        data: bytes | None,
        /,
    ) -> None: ...
    def drain(self) -> int: ...
    def fileno(self) -> int: ...
    def in_flight(self) -> int: ...
    def close(self) -> None: ...
