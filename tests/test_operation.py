"""Operation construction, properties and argument handling (DESIGN.md §3)."""

import copy
import gc
import pickle
import sys
import weakref

import pytest

from helpers import RawBackend

FD = 5  # never used for I/O in this file


# -- constructors --------------------------------------------------------------


def test_constructors_accept_documented_keyword_names(backend: RawBackend) -> None:
    Op = backend.Operation
    read = Op.read(nbytes=16, fd=FD, offset=3, priority=0)
    write = Op.write(payload_bytes=b"abc", fd=FD, offset=7, priority=0)
    fsync = Op.fsync(fd=FD, priority=0)
    fdsync = Op.fdsync(fd=FD, priority=0)
    assert (read.nbytes, read.fileno, read.offset) == (16, FD, 3)
    assert (write.nbytes, write.fileno, write.offset) == (3, FD, 7)
    assert fsync.fileno == FD and fdsync.fileno == FD


def test_constructors_reject_extra_and_missing_arguments(
    backend: RawBackend,
) -> None:
    Op = backend.Operation
    with pytest.raises(TypeError):
        Op.read(1, FD, 0, 0, 0)
    with pytest.raises(TypeError):
        Op.read(1)
    with pytest.raises(TypeError):
        Op.write(b"x", FD, 0, 0, 0)
    with pytest.raises(TypeError):
        Op.fsync()
    with pytest.raises(TypeError):
        Op.fdsync(FD, 0, 0)
    with pytest.raises(TypeError):
        Op.fsync(FD, bogus=1)


def test_offset_default_per_backend(backend: RawBackend) -> None:
    Op = backend.Operation
    if backend.native:
        assert Op.read(4, FD).offset == 0
        assert Op.write(b"x", FD).offset == 0
    else:
        # python_aio: offset is required (DESIGN.md §3.2).
        with pytest.raises(TypeError):
            Op.read(4, FD)
        with pytest.raises(TypeError):
            Op.write(b"x", FD)


@pytest.mark.parametrize("bad", [1.5, "3", b"3"], ids=["float", "str", "bytes"])
def test_integer_arguments_require_index(backend: RawBackend, bad: object) -> None:
    Op = backend.Operation
    with pytest.raises(TypeError):
        Op.read(bad, FD, 0)
    with pytest.raises(TypeError):
        Op.read(4, bad, 0)
    with pytest.raises(TypeError):
        Op.read(4, FD, bad)
    with pytest.raises(TypeError):
        Op.write(b"x", bad, 0)
    with pytest.raises(TypeError):
        Op.fsync(bad)
    with pytest.raises(TypeError):
        Op.fdsync(FD, bad)


def test_none_fd_is_rejected(backend: RawBackend) -> None:
    with pytest.raises(TypeError):
        backend.Operation.fsync(None)
    with pytest.raises(TypeError):
        backend.Operation.read(4, None, 0)


def test_none_nbytes_offset(backend: RawBackend) -> None:
    Op = backend.Operation
    if backend.native:
        with pytest.raises(TypeError):
            Op.read(None, FD, 0)
        with pytest.raises(TypeError):
            Op.read(4, FD, None)
    else:
        # python_aio turns None into 0.
        op = Op.read(None, FD, None)
        assert (op.nbytes, op.offset) == (0, 0)


def test_bool_is_an_integer(backend: RawBackend) -> None:
    op = backend.Operation.read(True, FD, False, True)
    assert (op.nbytes, op.offset) == (1, 0)


def test_python_aio_accepts_index_objects(python_aio: RawBackend) -> None:
    # python_aio converts with operator.index().  (The native parsers of
    # upstream accept int and its subclasses only, so this is not asserted
    # for them.)
    class Index:
        def __init__(self, value: int):
            self.value = value

        def __index__(self) -> int:
            return self.value

    op = python_aio.Operation.read(Index(8), Index(FD), Index(2), Index(1))
    assert (op.nbytes, op.fileno, op.offset) == (8, FD, 2)
    assert type(op.nbytes) is int


# -- payload type checks ---------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    ["ab", ["a", "b"], 12],
    ids=["str", "list", "int"],
)
def test_write_payload_must_be_a_buffer(backend: RawBackend, payload: object) -> None:
    # int has no len(): python_aio raises TypeError there (len() is taken
    # first); everything with a len() is a ValueError on every backend.
    expected = TypeError if (backend.is_python and isinstance(payload, int)) else ValueError
    if backend.native and isinstance(payload, int):
        expected = ValueError
    with pytest.raises(expected):
        backend.Operation.write(payload, FD, 0)


@pytest.mark.parametrize(
    "payload",
    [bytearray(b"ab"), memoryview(b"ab"), memoryview(b"xaby")[1:3]],
    ids=["bytearray", "memoryview", "memoryview-slice"],
)
def test_write_payload_any_contiguous_buffer(backend: RawBackend, payload: object) -> None:
    # DESIGN.md §3.4: any C-contiguous buffer, used in place (no copy).
    op = backend.Operation.write(payload, FD, 0)
    assert op.nbytes == 2
    assert op.payload is payload


def test_write_payload_not_contiguous(backend: RawBackend) -> None:
    with pytest.raises(ValueError, match="C-contiguous"):
        backend.Operation.write(memoryview(b"abcd")[::2], FD, 0)


def test_write_payload_none(backend: RawBackend) -> None:
    expected = TypeError if backend.is_python else ValueError
    with pytest.raises(expected):
        backend.Operation.write(None, FD, 0)


def test_write_accepts_bytes_subclass(backend: RawBackend) -> None:
    class MyBytes(bytes):
        pass

    data = MyBytes(b"subclassed")
    op = backend.Operation.write(data, FD, 0)
    assert op.nbytes == len(data)
    assert bytes(op.payload) == b"subclassed"


def test_rejected_payload_refcount_unchanged(backend: RawBackend) -> None:
    """DESIGN.md §3.2: a rejected payload is not leaked."""
    payload = ["not", "bytes"]

    def attempt() -> None:
        try:
            backend.Operation.write(payload, 0, 0)
        except ValueError:
            pass
        else:
            raise AssertionError("non-bytes payload accepted")

    attempt()  # warm-up (caches, interned strings)
    before = sys.getrefcount(payload)
    for _ in range(100):
        attempt()
    assert sys.getrefcount(payload) == before


def test_failed_constructions_do_not_leak(backend: RawBackend) -> None:
    """DESIGN.md §3.2: 500 TypeErrors from a str argument leave nothing behind."""

    def attempt() -> None:
        for _ in range(500):
            try:
                backend.Operation.read("x", 0, 0)
            except TypeError:
                pass
            else:
                raise AssertionError("str nbytes accepted")

    attempt()
    gc.collect()
    objects_before = len(gc.get_objects())
    blocks_before = sys.getallocatedblocks()
    attempt()
    gc.collect()
    assert len(gc.get_objects()) - objects_before < 50
    assert sys.getallocatedblocks() - blocks_before < 200


# -- fresh operation properties (DESIGN.md §3.3, §3.4, §3.7) -----------------------------------


def test_fresh_write_properties(backend: RawBackend) -> None:
    payload = b"the quick brown fox"
    op = backend.Operation.write(payload, FD, 7)
    assert op.fileno == FD
    assert op.offset == 7
    assert op.nbytes == 19
    assert bytes(op.payload) == payload


def test_write_keeps_callers_bytes_without_copy(backend: RawBackend) -> None:
    payload = b"x" * 1000
    op = backend.Operation.write(payload, FD, 0)
    if backend.native:
        assert op.payload is payload
    else:
        assert op.payload.obj is payload


def test_fresh_read_properties(backend: RawBackend) -> None:
    op = backend.Operation.read(16, FD, 3)
    assert op.fileno == FD
    assert op.offset == 3
    assert op.nbytes == 16
    payload = op.payload
    if backend.native:
        # Native backends allocate a zero-filled buffer at construction.
        assert bytes(payload) == b"\0" * 16
    else:
        assert bytes(payload) == b""


@pytest.mark.parametrize("kind", ["fsync", "fdsync"])
def test_fresh_sync_properties(backend: RawBackend, kind: str) -> None:
    op = getattr(backend.Operation, kind)(FD)
    assert op.fileno == FD
    assert op.offset == 0
    assert op.nbytes == 0
    assert not op.payload


def test_reprs_are_strings(backend: RawBackend) -> None:
    Op = backend.Operation
    ops = [Op.read(4, FD, 3), Op.write(b"x", FD, 7), Op.fsync(FD), Op.fdsync(FD)]
    for op in ops:
        assert isinstance(repr(op), str)
    ctx = backend.context()
    assert isinstance(repr(ctx), str)


def test_value_before_submission(backend: RawBackend) -> None:
    Op = backend.Operation
    read = Op.read(4, FD, 0).get_value()
    assert read == (b"\0" * 4 if backend.native else b"")
    # linux_aio reports len(payload) for an unsubmitted write (DESIGN.md §6.2 unsent-write,
    # may be harmonised to 0); everyone else reports 0.
    write = Op.write(b"abc", FD, 0).get_value()
    assert write in ((0, 3) if backend.is_linux_aio else (0,))
    assert Op.fsync(FD).get_value() is None
    assert Op.fdsync(FD).get_value() is None


def test_huge_read_is_rejected_natively(backend: RawBackend) -> None:
    """DESIGN.md §3.2: no abort; native backends raise, python_aio accepts."""
    if backend.native:
        with pytest.raises((OverflowError, MemoryError, ValueError)):
            backend.Operation.read(2**62, 0, 0)
    else:
        assert backend.Operation.read(2**62, 0, 0).nbytes == 2**62


# -- integer ranges (DESIGN.md §3.2, §6.2 wrap) -------------------------------------------


def test_fd_range(backend: RawBackend) -> None:
    Op = backend.Operation
    if backend.native:
        # DESIGN.md §6.2 wrap: an fd that would alias another one (2**32 + 5 -> 5) must raise.
        with pytest.raises(OverflowError):
            Op.read(4, 2**32 + 5, 0)
        with pytest.raises(OverflowError):
            Op.fsync(2**32)
        # ...but -1 stays accepted (fails later with EBADF), shown as u32.
        assert Op.fsync(-1).fileno == 2**32 - 1
        assert Op.read(4, -1, 0).fileno == 2**32 - 1
    else:
        assert Op.fsync(-1).fileno == -1
        assert Op.fsync(2**32 + 5).fileno == 2**32 + 5


def test_nbytes_range(backend: RawBackend) -> None:
    Op = backend.Operation
    if backend.native:
        # DESIGN.md §6.2 wrap: 2**64 used to wrap to 0.
        with pytest.raises(OverflowError):
            Op.read(2**64, FD, 0)
        with pytest.raises(OverflowError):
            Op.read(-1, FD, 0)
    else:
        assert Op.read(-1, FD, 0).nbytes == -1
        assert Op.read(2**64, FD, 0).nbytes == 2**64


def test_offset_range(backend: RawBackend) -> None:
    Op = backend.Operation
    if backend.is_uring:
        # Unsigned 64-bit: -1 and 2**64-1 both mean "current position".
        assert Op.read(4, FD, -1).offset == 2**64 - 1
        assert Op.read(4, FD, 2**64 - 1).offset == 2**64 - 1
        with pytest.raises(OverflowError):
            Op.read(4, FD, 2**64)  # DESIGN.md §6.2 wrap: would alias 0
    elif backend.native:
        # Signed 64-bit with an overflow check; shown as the u64 view.
        assert Op.read(4, FD, -1).offset == 2**64 - 1
        assert Op.read(4, FD, 2**63 - 1).offset == 2**63 - 1
        with pytest.raises(OverflowError):
            Op.read(4, FD, 2**63)
        with pytest.raises(OverflowError):
            Op.write(b"x", FD, 2**64)
    else:
        assert Op.read(4, FD, -1).offset == -1
        assert Op.read(4, FD, 2**70).offset == 2**70


def test_priority_range(backend: RawBackend) -> None:
    Op = backend.Operation
    if backend.is_linux_aio:
        assert Op.read(4, FD, 0, 32767).priority == 32767
        assert Op.read(4, FD, 0, -1).priority == 65535
        with pytest.raises(OverflowError):
            Op.read(4, FD, 0, 32768)
        with pytest.raises(OverflowError):
            Op.fsync(FD, -32769)
    elif backend.native:
        Op.read(4, FD, 0, 65535)
        # DESIGN.md §6.2 wrap: 2**16 would silently alias priority 0.
        with pytest.raises(OverflowError):
            Op.read(4, FD, 0, 2**16)
        with pytest.raises(OverflowError):
            Op.fsync(FD, 2**16 + 1)
    else:
        Op.read(4, FD, 0, 2**40)
        Op.fsync(FD, None)


# -- set_callback (DESIGN.md §3.6) ---------------------------------------------------------


def test_set_callback_rejects_non_callable(backend: RawBackend) -> None:
    """DESIGN.md §3.6, plus §6.2 msg-format: the message shows the object, not '%r'."""
    op = backend.Operation.fsync(FD)
    with pytest.raises(ValueError) as excinfo:
        op.set_callback("not callable")
    assert "%r" not in str(excinfo.value)
    assert "not callable" in str(excinfo.value)


def test_set_callback_returns_true_and_replaces(backend: RawBackend) -> None:
    op = backend.Operation.fsync(FD)

    def first(result: object) -> None:
        pass

    def second(result: object) -> None:
        pass

    ref = weakref.ref(first)
    assert op.set_callback(first) is True
    del first
    assert op.set_callback(second) is True
    gc.collect()
    assert ref() is None  # the replaced callback was released


def test_set_callback_keyword(backend: RawBackend) -> None:
    op = backend.Operation.fsync(FD)
    if backend.is_uring:
        with pytest.raises(TypeError):
            op.set_callback(callback=print)
    else:
        assert op.set_callback(callback=print) is True
    with pytest.raises(TypeError):
        op.set_callback()
    with pytest.raises(TypeError):
        op.set_callback(print, print)


# -- type identity (DESIGN.md §3.1) ----------------------------------------------------------


NATIVE_IDENTITY = {
    "linux_uring": (
        "io_uring based AIO backend (Linux 5.6+).",
        "linux_uring.Operation",
        "io_uring AIO operation",
    ),
    "linux_aio": (
        "Linux AIO c API bindings.",
        "aio.AIOOperation",
        "linux aio operation representation",
    ),
    "thread_aio": (
        "Thread based AIO.",
        "aio.AIOOperation",
        "thread aio operation representation",
    ),
}


def _qualified(tp: type) -> str:
    module = tp.__module__
    return tp.__qualname__ if module == "builtins" else module + "." + tp.__qualname__


def test_native_type_names(native_backend: RawBackend) -> None:
    module_doc, op_name, op_doc = NATIVE_IDENTITY[native_backend.name]
    assert native_backend.module.__doc__ == module_doc
    assert _qualified(native_backend.Operation) == op_name
    assert op_doc in native_backend.Operation.__doc__
    assert native_backend.Context.__name__ == "Context"
    assert native_backend.Context.__module__ == "builtins"


def test_context_docstring_identifies_backend(backend: RawBackend) -> None:
    from helpers import CONTEXT_DOC

    assert CONTEXT_DOC[backend.name] in backend.Context.__doc__


def test_native_operation_cannot_be_instantiated(
    native_backend: RawBackend,
) -> None:
    with pytest.raises(TypeError):
        native_backend.Operation()


def test_native_types_cannot_be_subclassed(native_backend: RawBackend) -> None:
    with pytest.raises(TypeError):
        type("Sub", (native_backend.Operation,), {})
    with pytest.raises(TypeError):
        type("Sub", (native_backend.Context,), {})


def test_native_weakref_hash_identity(native_backend: RawBackend) -> None:
    ctx = native_backend.context()
    op = native_backend.Operation.fsync(FD)
    other = native_backend.Operation.fsync(FD)
    assert weakref.ref(ctx)() is ctx
    assert weakref.ref(op)() is op
    assert op != other and op == op
    assert len({op, other, op}) == 2
    assert hash(op) == hash(op)


def test_native_not_picklable(native_backend: RawBackend) -> None:
    ctx = native_backend.context()
    op = native_backend.Operation.read(4, FD, 0)
    for obj in (ctx, op):
        with pytest.raises(TypeError):
            pickle.dumps(obj)
        with pytest.raises(TypeError):
            copy.deepcopy(obj)


def test_native_attributes_read_only(native_backend: RawBackend) -> None:
    ctx = native_backend.context()
    op = native_backend.Operation.read(4, FD, 0)
    for name in ("fileno", "offset", "nbytes", "payload"):
        with pytest.raises(AttributeError):
            setattr(op, name, 1)
    with pytest.raises(AttributeError):
        op.brand_new_attribute = 1
    with pytest.raises(AttributeError):
        ctx.max_requests = 1
    with pytest.raises(AttributeError):
        ctx.brand_new_attribute = 1


def test_native_data_attributes_are_not_methods(
    native_backend: RawBackend,
) -> None:
    ctx = native_backend.context()
    op = native_backend.Operation.read(4, FD, 3)
    assert isinstance(ctx.max_requests, int)
    assert isinstance(op.fileno, int)
    assert isinstance(op.offset, int)
    assert isinstance(op.nbytes, int)
    if native_backend.is_linux:
        assert isinstance(ctx.fileno, int)
        assert op.context is None  # not submitted


def test_native_result_error_attributes(native_backend: RawBackend) -> None:
    op = native_backend.Operation.read(4, FD, 0)
    if native_backend.is_linux_aio:
        assert not hasattr(op, "result")
        assert isinstance(op.priority, int)
    else:
        assert (op.result, op.error) == (0, 0)
    if native_backend.is_thread:
        assert not hasattr(op, "context")


def test_python_operation_is_an_ordinary_object(python_aio: RawBackend) -> None:
    from caio.abstract import AbstractContext, AbstractOperation

    op = python_aio.Operation.read(4, FD, 0)
    op.extra = "allowed"
    assert op.extra == "allowed"
    assert isinstance(op, AbstractOperation)
    assert isinstance(python_aio.context(), AbstractContext)
    with pytest.raises(TypeError):
        pickle.dumps(op)  # holds a lock
