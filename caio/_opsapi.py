"""The per-operation methods of every context type, written once.

``read``, ``write``, ``readinto``, ``readv``, ``writev``, ``fsync`` and
``fdsync`` build the backend's Operation eagerly (argument errors raise at
call time, before any ``await``) and hand it to ``self._run_op(op)``, which
the context type supplies (as :class:`caio._pathops.PathOpsAPI` does for the
path operations):

* ``AsyncioContextBase``: its ``submit(op)`` coroutine (the pure-Python
  adapter; the native adapters' ``_AsyncioBase`` has its own methods, first
  in their bases);
* ``StructuredContextBase`` (trio/anyio): its per-operation path,
  ``_execute(op)``.
"""

from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typing.Buffer needs Python 3.12

__all__ = ("OperationsAPI",)


class OperationsAPI:
    """Awaitable file operations on an fd (the API of ``AsyncioContext``)."""

    OPERATION_CLASS: Any

    def _run_op(self, op: Any) -> Coroutine[Any, Any, Any]:
        """Run ``op`` (an ``OPERATION_CLASS`` instance): a coroutine whose
        result is ``op.get_value()``. (Its ``Any`` result type lets each
        method below return it as its own, without a ``cast`` call per
        operation.)"""
        raise NotImplementedError

    def read(
        self,
        nbytes: int,
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> Coroutine[Any, Any, bytes]:
        """Read up to ``nbytes`` at ``offset``; ``b""`` at end of file."""
        op = self.OPERATION_CLASS.read(nbytes, fd, offset, priority)
        return self._run_op(op)

    def write(
        self,
        payload: "Buffer",
        fd: int,
        offset: int,
        priority: int = 0,
    ) -> Coroutine[Any, Any, int]:
        """Write ``payload`` (any C-contiguous buffer, used in place) at
        ``offset``; returns the bytes written."""
        op = self.OPERATION_CLASS.write(payload, fd, offset, priority)
        return self._run_op(op)

    # -- zero-copy operations (issue 13) ---------------------------------------

    def readinto(
        self,
        buffer: "Buffer",
        fd: int,
        offset: int = 0,
        priority: int = 0,
    ) -> Coroutine[Any, Any, int]:
        """Read into ``buffer`` (a writable C-contiguous buffer) in place at
        ``offset``; returns the bytes read (fewer at end of file). A
        cancelled read is waited for, so the buffer is the caller's again
        when the await ends."""
        op = self.OPERATION_CLASS.readinto(buffer, fd, offset, priority)
        return self._run_op(op)

    def readv(
        self,
        buffers: "Sequence[Buffer]",
        fd: int,
        offset: int = 0,
        priority: int = 0,
    ) -> Coroutine[Any, Any, int]:
        """One vectored read into ``buffers`` (at most 1024 writable
        C-contiguous buffers, filled in order); returns the bytes read."""
        op = self.OPERATION_CLASS.readv(buffers, fd, offset, priority)
        return self._run_op(op)

    def writev(
        self,
        buffers: "Sequence[Buffer]",
        fd: int,
        offset: int = 0,
        priority: int = 0,
    ) -> Coroutine[Any, Any, int]:
        """One vectored write of ``buffers`` (at most 1024 C-contiguous
        buffers, in order); returns the bytes written."""
        op = self.OPERATION_CLASS.writev(buffers, fd, offset, priority)
        return self._run_op(op)

    def fsync(self, fd: int) -> Coroutine[Any, Any, None]:
        """Flush ``fd``'s data and metadata to stable storage (after the
        writes submitted before it)."""
        return self._run_op(self.OPERATION_CLASS.fsync(fd))

    def fdsync(self, fd: int) -> Coroutine[Any, Any, None]:
        """Flush ``fd``'s data (``fdatasync``, after the writes submitted
        before it)."""
        return self._run_op(self.OPERATION_CLASS.fdsync(fd))
