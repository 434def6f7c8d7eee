"""Model-based property tests: random programs of concurrent operations
checked against an in-memory model of the file.

* ``test_asyncio_program_matches_model``: rounds of concurrent asyncio tasks
  (writes, reads, fsync, fdsync through every adapter configuration, on every
  loop kind), some cancelled at random points, some rounds closing the
  AsyncioContext while operations are in flight.
* ``test_raw_api_state_machine``: a hypothesis state machine over the raw
  Context/Operation API of every backend (batched submits, duplicate
  submits, cancel, completion delivery, close), checking the one-shot life
  cycle, callbacks (exactly once), reference counts and the file.

Hypothesis shrinks a failure to a minimal program and prints it. More
examples: ``CAIO_HYPOTHESIS_PROFILE=thorough`` (see helpers.py).

The model
---------
The file is modelled between
*quiescent points*: ``base`` holds its exact content at the last such point
(read back from disk, so uncertainty never accumulates). Between two of them
a set of writes runs concurrently with reads; each write is

* ``MUST``: it completed and reported ``len(data)`` bytes written, so its
  bytes are in the file (in some order relative to the other writes of the
  same interval that cover the same bytes);
* ``MAY``: it was cancelled (or is still running): each byte it covers may
  hold the old value or the write's value — and *only* the bytes it covers.

A read that ran during the interval may observe any prefix of the
interval's history, so every write of the interval counts as ``MAY`` for it.

The checks work on elementary segments (the pieces between write
boundaries), so byte-by-byte comparisons only happen where several values
are genuinely possible.
"""

from collections.abc import Iterable, Sequence

MUST = "must"
MAY = "may"


def pattern(fill: int, length: int) -> bytes:
    """Position-dependent, non-zero payload: a misplaced, stale or aliased
    byte shows up as a wrong value (holes read as zero)."""
    if length <= 0:
        return b""
    period = bytes(((fill + 31 * i) % 251) + 1 for i in range(251))
    reps = length // 251 + 1
    return (period * reps)[:length]


class Write:
    __slots__ = ("offset", "data", "status")

    def __init__(self, offset: int, data: bytes, status: str):
        self.offset = offset
        self.data = data
        self.status = status

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    def __repr__(self) -> str:
        return f"Write({self.offset}, {len(self.data)} bytes, {self.status})"


def _base_slice(base: bytes, a: int, b: int) -> bytes:
    chunk = base[a:b]
    return chunk + bytes(b - a - len(chunk))


def check_bytes(
    actual: bytes,
    start: int,
    base: bytes,
    writes: Sequence[Write],
) -> str | None:
    """Checks that ``actual`` (found at file offset ``start``) is a possible
    content given ``base`` and ``writes``; returns a description of the first
    impossible byte, or None."""
    end = start + len(actual)
    points = {start, end}
    for w in writes:
        if w.data and w.offset < end and w.end > start:
            points.add(max(w.offset, start))
            points.add(min(w.end, end))
    cuts = sorted(points)
    for a, b in zip(cuts, cuts[1:], strict=False):
        covering = [w for w in writes if w.data and w.offset <= a and w.end >= b]
        musts = [w for w in covering if w.status == MUST]
        mays = [w for w in covering if w.status == MAY]
        candidates: list[bytes] = []
        if not musts:
            candidates.append(_base_slice(base, a, b))
        for w in musts + mays:
            candidates.append(w.data[a - w.offset : b - w.offset])
        got = actual[a - start : b - start]
        if len(candidates) == 1 or all(c == candidates[0] for c in candidates):
            if got != candidates[0]:
                for i, (x, y) in enumerate(zip(got, candidates[0], strict=False)):
                    if x != y:
                        return "byte at offset {}: got {}, only possible value {} ({})".format(
                            a + i,
                            x,
                            y,
                            "base" if not covering else covering,
                        )
            continue
        for i in range(b - a):
            allowed = {c[i] for c in candidates}
            if got[i] not in allowed:
                return (
                    f"byte at offset {a + i}: got {got[i]}, possible values {sorted(allowed)}"
                    f" (writes {covering})"
                )
    return None


def possible_sizes(base_size: int, writes: Iterable[Write]) -> list[tuple[int, int]]:
    """File sizes possible once every MUST write happened and any subset of
    the MAY writes did, as inclusive ranges. A MAY write may also be partly
    done (a buffered write extends the file page by page; a cancelled one can
    stop half-way), so it allows any size between its offset and its end."""
    writes = [w for w in writes if w.data]
    floor = max([base_size] + [w.end for w in writes if w.status == MUST])
    ranges = [(floor, floor)]
    for w in writes:
        if w.status == MAY and w.end > floor:
            ranges.append((max(floor, w.offset), w.end))
    return ranges


def size_allowed(size: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a <= size <= b for a, b in ranges)


def length_allowed(offset: int, nbytes: int, length: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether a read of ``nbytes`` at ``offset`` may return ``length`` bytes."""

    def clamp(size: int) -> int:
        return max(0, min(nbytes, size - offset))

    return any(clamp(a) <= length <= clamp(b) for a, b in ranges)


class FileModel:
    """Exact content at the last quiescent point plus the writes since."""

    def __init__(self) -> None:
        self.base = b""
        self.writes: list[Write] = []
        self.reads: list[tuple[int, int, bytes]] = []

    def start_interval(self) -> None:
        self.writes = []
        self.reads = []

    def add_write(self, offset: int, data: bytes, status: str) -> None:
        self.writes.append(Write(offset, data, status))

    def add_read(self, offset: int, nbytes: int, data: bytes) -> None:
        self.reads.append((offset, nbytes, data))

    def check_reads(self) -> str | None:
        """Each read may have seen any state of the interval."""
        as_may = [Write(w.offset, w.data, MAY) for w in self.writes]
        sizes = possible_sizes(len(self.base), as_may)
        for offset, nbytes, data in self.reads:
            if not length_allowed(offset, nbytes, len(data), sizes):
                return (
                    f"read({nbytes}, offset={offset}) returned {len(data)} bytes;"
                    f" possible file sizes {sizes}"
                )
            problem = check_bytes(data, offset, self.base, as_may)
            if problem:
                return f"read({nbytes}, offset={offset}): {problem}"
        return None

    def check_final(self, content: bytes) -> str | None:
        """``content``: the whole file, read back at a quiescent point."""
        sizes = possible_sizes(len(self.base), self.writes)
        if not size_allowed(len(content), sizes):
            return f"file size {len(content)}, possible sizes {sizes} (writes {self.writes})"
        return check_bytes(content, 0, self.base, self.writes)

    def settle(self, content: bytes) -> None:
        self.base = content
        self.start_interval()


# ---------------------------------------------------------------------------
# asyncio programs

import asyncio
import errno
import itertools
import os
import sys
from typing import Any

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from helpers import AsyncBackend, LoopRunner

KINDS = ("write",) * 6 + ("read",) * 5 + ("fsync", "fdsync")


class OpSpec:
    """One operation of a round, run as its own task."""

    def __init__(
        self,
        kind: str,
        offset: int,
        length: int,
        fill: int,
        cancel_after: int | None,
        via_submit: bool,
    ):
        self.kind = kind
        self.offset = offset
        self.length = length
        self.fill = fill
        self.cancel_after = cancel_after
        self.via_submit = via_submit

    def __repr__(self) -> str:
        parts = [self.kind]
        if self.kind in ("write", "read"):
            parts.append(f"offset={self.offset}, length={self.length}")
        if self.kind == "write":
            parts.append(f"fill={self.fill}")
        if self.cancel_after is not None:
            parts.append(f"cancel_after={self.cancel_after}")
        if self.via_submit:
            parts.append("via_submit")
        return "Op({})".format(", ".join(parts))


class Round:
    def __init__(self, ops: list[OpSpec], close_after: int | None):
        self.ops = ops
        self.close_after = close_after

    def __repr__(self) -> str:
        return f"Round({self.ops!r}, close_after={self.close_after})"


class Program:
    def __init__(self, max_requests: int | None, rounds: list[Round]):
        self.max_requests = max_requests
        self.rounds = rounds

    def __repr__(self) -> str:
        return "Program(max_requests={}, rounds=[\n  {}\n])".format(
            self.max_requests,
            ",\n  ".join(map(repr, self.rounds)),
        )


offsets = st.one_of(
    st.integers(0, 4096),
    st.sampled_from([0, 1, 511, 4095, 4096, 65535, 65536, 1 << 20]),
)
lengths = st.one_of(
    st.integers(0, 700),
    st.sampled_from([0, 1, 4096, 8192, 65536, 65537]),
)
op_specs = st.builds(
    OpSpec,
    kind=st.sampled_from(KINDS),
    offset=offsets,
    length=lengths,
    fill=st.integers(0, 250),
    cancel_after=st.one_of(st.none(), st.none(), st.integers(0, 3)),
    via_submit=st.booleans(),
)
rounds = st.builds(
    Round,
    ops=st.lists(op_specs, min_size=1, max_size=7),
    close_after=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 3)),
)
programs = st.builds(
    Program,
    max_requests=st.sampled_from([None, 1, 2, 3, 8]),
    rounds=st.lists(rounds, min_size=1, max_size=5),
)

#: Generous: only a hang takes this long.
HANG_TIMEOUT = 20.0

# Counters reported by the session summary (examples run, cancellations...).
STATS: dict[str, int] = {}


def _count(key: str, n: int = 1) -> None:
    STATS[key] = STATS.get(key, 0) + n


def slots_in_use(ctx: Any) -> tuple[int, int]:
    """(slots held, waiters) of an AsyncioContext's admission control."""
    gate_state = getattr(ctx, "_gate_state", None)
    if gate_state is not None:
        in_use, _max, waiting = gate_state()
        return in_use, waiting
    sem = ctx.semaphore
    return sem._bound_value - sem._value, len(sem._waiters or ())


def build_op(ctx: Any, spec: OpSpec, fd: int, data: bytes) -> Any:
    cls = ctx.OPERATION_CLASS
    if spec.kind == "write":
        return cls.write(data, fd, spec.offset)
    if spec.kind == "read":
        return cls.read(spec.length, fd, spec.offset)
    return getattr(cls, spec.kind)(fd)


def start(ctx: Any, spec: OpSpec, fd: int, data: bytes, op: Any) -> Any:
    if op is not None:
        return ctx.submit(op)
    if spec.kind == "write":
        return ctx.write(data, fd, spec.offset)
    if spec.kind == "read":
        return ctx.read(spec.length, fd, spec.offset)
    return getattr(ctx, spec.kind)(fd)


def _cancel_proved(op: Any) -> bool:
    """True if the (delivered) op reports that the kernel cancelled it."""
    try:
        op.get_value()
    except OSError as exc:
        return exc.errno == errno.ECANCELED
    except Exception:
        return False
    return False


async def quiesce(backend: AsyncBackend, ctx: Any, op: Any, closed: bool) -> None:
    """Waits until a cancelled operation is no longer running anywhere."""
    deadline = asyncio.get_running_loop().time() + HANG_TIMEOUT
    while True:
        if backend.name == "python_aio":
            busy = ctx.context._in_progress > 0
        else:
            try:
                op.get_value()
                busy = False
            except RuntimeError as exc:
                busy = "in flight" in str(exc)
            except Exception:
                busy = False
        if not busy:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"cancelled operation never finished: {op!r}")
        if closed and backend.is_uring:
            # DESIGN.md §6.2 close: a closed uring adapter no longer watches its
            # eventfd; whoever still cares must drain the ring.
            ctx.context.flush()
            ctx.context.process_events()
        await asyncio.sleep(0.001)


async def run_round(
    backend: AsyncBackend,
    state: dict[str, Any],
    rnd: Round,
    fd: int,
    model: FileModel,
) -> None:
    ctx = state.get("ctx")
    if ctx is None:
        ctx = state["ctx"] = backend.context(state["max_requests"])
    model.start_interval()
    entries = []
    for spec in rnd.ops:
        data = pattern(spec.fill, spec.length) if spec.kind == "write" else b""
        op = None
        if spec.via_submit or spec.cancel_after is not None:
            op = build_op(ctx, spec, fd, data)
        task = asyncio.ensure_future(start(ctx, spec, fd, data, op))
        entries.append((spec, data, op, task))
    closed = False
    ticks = [s.cancel_after for s in rnd.ops if s.cancel_after is not None]
    if rnd.close_after is not None:
        ticks.append(rnd.close_after)
    for tick in range(max(ticks, default=-1) + 1):
        for spec, _data, _op, task in entries:
            if spec.cancel_after == tick:
                task.cancel()
        if rnd.close_after == tick:
            ctx.close()
            closed = True
            _count("context closes")
        await asyncio.sleep(0)

    tasks = [e[3] for e in entries]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_TIMEOUT
    while True:
        drain = closed and backend.is_uring
        _done, pending = await asyncio.wait(tasks, timeout=0.01 if drain else HANG_TIMEOUT)
        if not pending:
            break
        if loop.time() > deadline:
            raise AssertionError(
                f"hang: {len(pending)} of {len(tasks)} tasks still pending: "
                f"{[spec for spec, _d, _o, t in entries if t in pending]}"
            )
        if drain:
            ctx.context.flush()
            ctx.context.process_events()

    for spec, data, op, task in entries:
        _count("operations")
        if task.cancelled():
            assert spec.cancel_after is not None, f"task cancelled by nobody: {spec!r}"
            _count("cancelled")
            # A cancelled operation keeps its admission slot until the
            # backend has really finished it (test_cancellation_slots.py).
            await quiesce(backend, ctx, op, closed)
            if spec.kind == "write":
                if _cancel_proved(op):
                    _count("cancel proved by the kernel")
                else:
                    model.add_write(spec.offset, data, MAY)
            continue
        exc = task.exception()
        if exc is not None:
            if closed and isinstance(exc, RuntimeError):
                _count("refused after close")
                continue  # refused: the operation never started
            raise AssertionError(f"{spec!r} raised {exc!r}") from exc
        result = task.result()
        if spec.kind == "write":
            assert result == len(data), (spec, result)
            model.add_write(spec.offset, data, MUST)
        elif spec.kind == "read":
            assert isinstance(result, bytes), (spec, type(result))
            assert len(result) <= spec.length, (spec, len(result))
            model.add_read(spec.offset, spec.length, result)
        else:
            assert result is None, (spec, result)

    # Every task is done and every cancelled operation has finished: the
    # slots come back once their completions have been delivered.
    deadline = loop.time() + HANG_TIMEOUT
    while slots_in_use(ctx) != (0, 0) and loop.time() < deadline:
        if closed and backend.is_uring:
            ctx.context.flush()
            ctx.context.process_events()
        await asyncio.sleep(0.001)
    in_use, waiting = slots_in_use(ctx)
    assert (in_use, waiting) == (0, 0), (
        f"admission slots leaked: {in_use} in use, {waiting} waiting"
    )
    if closed:
        state["ctx"] = None

    problem = model.check_reads()
    assert problem is None, problem
    size = os.fstat(fd).st_size
    content = os.pread(fd, size, 0) if size else b""
    problem = model.check_final(content)
    assert problem is None, problem
    model.settle(content)


async def run_program(backend: AsyncBackend, program: Program, fd: int) -> None:
    state: dict[str, Any] = {"max_requests": program.max_requests}
    model = FileModel()
    try:
        for rnd in program.rounds:
            await run_round(backend, state, rnd, fd, model)
    finally:
        ctx = state.get("ctx")
        if ctx is not None:
            ctx.close()


_file_ids = itertools.count()


@pytest.mark.timeout(300)
def test_asyncio_program_matches_model(
    async_backend: AsyncBackend,
    aio: LoopRunner,
    tmp_path: Any,
) -> None:
    """Random rounds of concurrent reads/writes/fsyncs with cancellations
    and closes; every read and the file after each round match the model."""

    @given(program=programs)
    def check(program: Program) -> None:
        note(repr(program))
        path = str(tmp_path / f"model-{next(_file_ids)}.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            aio.run(run_program(async_backend, program, fd), timeout=120)
            aio.settle()
            assert aio.handler_calls == [], aio.handler_calls
        finally:
            os.close(fd)
            os.unlink(path)
        _count("asyncio examples")

    check()


# ---------------------------------------------------------------------------
# raw API state machine

import gc
import threading
import time
import weakref

from hypothesis import settings as hsettings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from helpers import RawBackend


class Calls:
    """Callback recorder (callbacks may run on pool threads)."""

    __slots__ = ("values", "lock")

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.lock = threading.Lock()

    def __call__(self, value: Any) -> None:
        with self.lock:
            self.values.append(value)


class Rec:
    """What the state machine knows about one Operation."""

    def __init__(self, op: Any, kind: str, offset: int, data: bytes, nbytes: int):
        self.op = op
        self.kind = kind
        self.offset = offset
        self.data = data
        self.nbytes = nbytes
        self.calls = Calls()
        self.submitted = False
        self.checked = False
        self.refs = 0

    def __repr__(self) -> str:
        return (
            f"<{self.kind} offset={self.offset} n={self.nbytes} submitted={self.submitted}"
            f" calls={self.calls.values}>"
        )


def _failed(backend: RawBackend, value: Any) -> bool:
    if backend.is_python:
        return False  # python_aio passes None on failure; get_value() tells
    return isinstance(value, int) and value < 0


def make_raw_machine(backend: RawBackend, directory: str) -> type:
    has_close = hasattr(backend.Context, "close")

    class RawMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            path = os.path.join(directory, f"raw-{next(_file_ids)}.bin")
            self.path = path
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self.ctx = backend.Context(256)
            self.dropped: list[Any] = []  # weakrefs of contexts let go with work in flight
            self.recs: list[Rec] = []
            self.model = FileModel()
            _count("raw state machines")

        # -- helpers ---------------------------------------------------------

        def live(self) -> list[Rec]:
            return [r for r in self.recs if r.submitted and not r.checked]

        def contexts(self) -> list[Any]:
            found = [self.ctx] if self.ctx is not None else []
            for rec in self.live():
                ctx = getattr(rec.op, "context", None)
                if ctx is not None and all(ctx is not c for c in found):
                    found.append(ctx)
            return found

        def drive(self) -> None:
            if not backend.is_linux:
                time.sleep(0.0005)
                return
            for ctx in self.contexts():
                if getattr(ctx, "closed", False) and not any(
                    getattr(r.op, "context", None) is ctx for r in self.live()
                ):
                    continue
                if hasattr(ctx, "flush"):
                    ctx.flush()
                ctx.process_events()

        # -- rules -------------------------------------------------------------

        def new_rec(self, spec: tuple[str, int, int, int]) -> Rec:
            kind, offset, length, fill = spec
            cls = backend.Operation
            data = b""
            if kind == "write":
                data = pattern(fill, length)
                op = cls.write(data, self.fd, offset)
            elif kind == "read":
                op = cls.read(length, self.fd, offset)
            else:
                op = getattr(cls, kind)(self.fd)
            rec = Rec(op, kind, offset, data, length if kind == "read" else len(data))
            op.set_callback(rec.calls)
            rec.refs = sys.getrefcount(op)
            self.recs.append(rec)
            return rec

        def submit_recs(self, batch: list[Rec]) -> None:
            fresh: list[Rec] = []
            for rec in batch:
                if not rec.submitted and all(rec is not f for f in fresh):
                    fresh.append(rec)
            if self.ctx_closed:
                try:
                    accepted = self.ctx.submit(*[r.op for r in batch])
                except RuntimeError:
                    _count("raw submits refused after close")
                    return  # nothing was claimed: those ops stay fresh
                # Only a batch of already claimed ops may be skipped quietly
                # (python_aio checks the claim first, DESIGN.md §4.7).
                assert accepted == 0 and not fresh, (accepted, fresh)
                return
            accepted = self.ctx.submit(*[r.op for r in batch])
            assert accepted == len(fresh), (accepted, fresh, batch)
            for rec in fresh:
                rec.submitted = True
                if backend.is_linux:
                    # Not delivered before flush()/process_events(): gated.
                    with pytest.raises(RuntimeError):
                        rec.op.get_value()
                    with pytest.raises(RuntimeError):
                        _ = rec.op.payload
                    assert rec.op.context is self.ctx
            _count("raw operations submitted", accepted)
            _count("raw duplicate/late submissions skipped", len(batch) - accepted)

        @precondition(lambda self: self.ctx is not None)
        @rule(
            specs=st.lists(
                st.tuples(st.sampled_from(KINDS), offsets, lengths, st.integers(0, 250)),
                min_size=1,
                max_size=5,
            ),
            extra=st.lists(st.integers(0, 10**6), max_size=3),
        )
        def submit_new(self, specs: list[tuple[str, int, int, int]], extra: list[int]) -> None:
            """A batch of new operations, possibly with repeats and with
            operations submitted (or completed) before, which must be skipped."""
            batch = [self.new_rec(spec) for spec in specs]
            for pick in extra:
                batch.insert(pick % (len(batch) + 1), self.recs[pick % len(self.recs)])
            self.submit_recs(batch)

        @rule(spec=st.tuples(st.sampled_from(KINDS), offsets, lengths, st.integers(0, 250)))
        def new_operation(self, spec: tuple[str, int, int, int]) -> None:
            """An operation created now, submitted by a later step (maybe)."""
            self.new_rec(spec)

        @precondition(lambda self: self.recs and self.ctx is not None)
        @rule(picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=6))
        def submit_existing(self, picks: list[int]) -> None:
            self.submit_recs([self.recs[p % len(self.recs)] for p in picks])

        ctx_closed = False

        @precondition(lambda self: any(r.submitted for r in self.recs))
        @rule(pick=st.integers(0, 10**6))
        def cancel(self, pick: int) -> None:
            submitted = [r for r in self.recs if r.submitted]
            rec = submitted[pick % len(submitted)]
            ctx = getattr(rec.op, "context", None) or self.ctx
            if ctx is None:
                return
            try:
                result = ctx.cancel(rec.op)
            except (ValueError, SystemError, RuntimeError, NotImplementedError):
                assert backend.is_linux_aio
                return
            # io_uring and thread_aio really cancel (thread_aio: only what no
            # worker has started): 1 when this op was taken back.
            assert result == 0 or backend.is_linux_aio or backend.is_thread, result
            _count("raw cancels")

        @rule()
        def deliver_some(self) -> None:
            self.drive()

        @precondition(lambda self: backend.is_linux and self.ctx is not None)
        @rule()
        def poll(self) -> None:
            try:
                assert self.ctx.poll() > 0
            except BlockingIOError:
                pass

        @precondition(lambda self: self.ctx is not None and not self.ctx_closed)
        @rule(really=st.integers(0, 3))
        def close_or_drop_context(self, really: int) -> None:
            """Close (where the backend has close()) or let go of the Context
            with work in flight; the work must still complete."""
            if really:
                return  # (keeps closes rarer than the other steps)
            if backend.is_thread or backend.is_python:
                self.ctx.close()
                self.ctx_closed = True
                _count("raw context closes")
                return
            if has_close:
                self.ctx.close()
                _count("raw context closes")
            self.dropped.append(weakref.ref(self.ctx))
            self.ctx = None
            _count("raw context drops")

        @precondition(lambda self: self.ctx is None or self.ctx_closed)
        @rule()
        def new_context(self) -> None:
            self.ctx = backend.Context(256)
            self.ctx_closed = False

        @rule()
        def drain_all(self) -> None:
            """Waits for every submitted operation, checks each one and the
            file, then starts a new interval of the model."""
            live = self.live()
            deadline = time.monotonic() + HANG_TIMEOUT
            while any(not r.calls.values for r in live):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"hang: no callback for {[r for r in live if not r.calls.values]}"
                    )
                self.drive()
            for rec in live:
                self.check_delivered(rec)
            # Reads of this interval may have seen any state of it.
            problem = self.model.check_reads()
            assert problem is None, problem
            size = os.fstat(self.fd).st_size
            content = os.pread(self.fd, size, 0) if size else b""
            problem = self.model.check_final(content)
            assert problem is None, problem
            self.model.settle(content)
            gc.collect()
            for ref in self.dropped:
                assert ref() is None, "Context kept alive after its last completion"
            self.dropped = [r for r in self.dropped if r() is not None]
            # Checked operations are forgotten (fresh ones stay available).
            self.recs = [r for r in self.recs if not r.checked]

        def check_delivered(self, rec: Rec) -> None:
            rec.checked = True
            op = rec.op
            time.sleep(0)  # let a pool thread finish its bookkeeping
            assert len(rec.calls.values) == 1, ("callback count", rec)
            arg = rec.calls.values[0]
            if backend.is_linux:
                assert op.context is None, rec
            try:
                value = op.get_value()
            except OSError as exc:
                # Only a real cancel (the kernel's, or thread_aio taking a job
                # back from its queue) can fail an operation here.
                assert backend.is_uring or backend.is_thread, (rec, exc)
                assert exc.errno == errno.ECANCELED, (rec, exc)
                assert arg == (-1 if backend.is_thread else -errno.ECANCELED), (rec, arg)
                if rec.kind == "read":
                    assert op.payload == bytes(rec.nbytes), "cancelled read exposes memory"
                _count(
                    "raw operations cancelled by the kernel"
                    if backend.is_uring
                    else "raw operations taken back from the queue"
                )
                value = None
            else:
                assert not _failed(backend, arg), (rec, arg)
                if rec.kind == "write":
                    assert value == len(rec.data), (rec, value)
                    self.model.add_write(rec.offset, rec.data, MUST)
                    if not backend.is_python:
                        assert arg == value, (rec, arg)
                elif rec.kind == "read":
                    assert isinstance(value, bytes) and len(value) <= rec.nbytes
                    self.model.add_read(rec.offset, rec.nbytes, value)
                    if not backend.is_python:
                        assert arg == len(value) == op.nbytes, (rec, arg, op.nbytes)
                        payload = bytes(op.payload)
                        assert len(payload) == rec.nbytes
                        assert payload[: len(value)] == value
                        assert payload[len(value) :] == bytes(rec.nbytes - len(value)), (
                            "short read leaves non-zero bytes in the buffer"
                        )
                else:
                    assert value is None, (rec, value)
                    assert arg in (0, None), (rec, arg)
            # Delivered and checked: nobody but us may hold the op now.
            rec.calls.values = [arg]
            assert sys.getrefcount(op) == rec.refs, (
                "refcount of a delivered op",
                rec,
                sys.getrefcount(op),
                rec.refs,
            )

        @invariant()
        def callbacks_at_most_once(self) -> None:
            for rec in self.recs:
                n = len(rec.calls.values)
                assert n <= 1, (f"callback ran {n} times", rec)
                assert n == 0 or rec.submitted, ("callback of a never accepted op", rec)

        def teardown(self) -> None:
            try:
                if self.live():
                    self.drain_all()
                if self.ctx is not None and hasattr(self.ctx, "close"):
                    self.ctx.close()
            finally:
                os.close(self.fd)
                os.unlink(self.path)

    return RawMachine


@pytest.mark.timeout(300)
def test_raw_api_state_machine(backend: RawBackend, tmp_path: Any) -> None:
    """Random interleavings of the raw API (new operations, batched and
    duplicate submits, cancel, delivery, poll, close/drop of the Context with
    work in flight) against the one-shot life cycle, the callback contract,
    reference counts and the file model."""
    machine = make_raw_machine(backend, str(tmp_path))
    run_state_machine_as_test(
        machine,
        settings=hsettings(hsettings(), stateful_step_count=40),
    )
    _count("raw state machine runs")


# ---------------------------------------------------------------------------
# the checker itself must be able to fail


def test_model_rejects_impossible_content() -> None:
    model = FileModel()
    model.settle(b"abcdef")
    model.add_write(2, b"XY", MUST)
    model.add_write(0, b"zz", MAY)
    assert model.check_final(b"abXYef") is None
    assert model.check_final(b"zzXYef") is None
    assert model.check_final(b"azXYef") is None  # a cancelled write, partly
    assert model.check_final(b"abcdef") is not None  # a completed write missing
    assert model.check_final(b"abXYeQ") is not None  # a byte nobody wrote
    assert model.check_final(b"abXYe") is not None  # truncated
    assert model.check_final(b"abXYef\0") is not None  # grown
    model.add_read(1, 4, b"bcd")  # short: impossible size
    assert model.check_reads() is not None


def test_model_allows_in_flight_states_for_reads() -> None:
    model = FileModel()
    model.settle(b"")
    model.add_write(10, pattern(3, 5000), MUST)
    model.add_read(0, 100, bytes(100))  # before the write
    model.add_read(4096, 10, b"")  # before the write
    model.add_read(0, 20, bytes(10) + pattern(3, 10))
    model.add_read(4090, 100, pattern(3, 5000)[4080:4096])  # mid-way: size 4096
    assert model.check_reads() is None
    model.add_read(0, 20, bytes(9) + pattern(3, 11))  # misplaced by one byte
    assert model.check_reads() is not None
