"""Measurement driver: runs benchmark cells for ONE contender inside this process.

This file is executed *by path* (never imported from the repository) with the
contender's own interpreter, from a temporary working directory and with
``-P`` where supported, so that the repository's ``caio/`` source tree does not
shadow the ``caio`` installed for that interpreter.  It depends only on the
standard library plus the library under test (caio, aiofiles, anyio, trio,
aiofile) and the event loop (asyncio or uvloop).

    python -P driver.py probe [EXTRA_DIR]     -> JSON description of this interpreter
                                                 (EXTRA_DIR appended to sys.path)
    python -P driver.py run SPEC.json OUT.jsonl

``run`` executes every cell listed in SPEC and appends one JSON line per cell
to OUT (flushed immediately, so a crash or a hang loses nothing that was
already measured).  Every contender goes through exactly the same worker loop
(:func:`_drive`); only the ``op(offset)`` coroutine differs.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Python < 3.11 has no -P: drop the script directory from sys.path ourselves.
sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != _HERE]

import asyncio  # noqa: E402
import faulthandler  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import mmap  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from array import array  # noqa: E402

BLOCK = 4096
MAGIC = 0xCA10BE4C_0000_0001
BACKENDS = ("linux_uring", "linux_aio", "thread_aio", "python_aio")
perf_ns = time.perf_counter_ns


class CellError(Exception):
    pass


# --------------------------------------------------------------------- probe


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def probe(extra_path=None):
    if extra_path:
        sys.path.append(extra_path)
    info = {
        "python": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "executable": sys.executable,
        "gil_disabled": bool(getattr(sys, "_is_gil_enabled", lambda: True)() is False),
        "aiofiles": _version("aiofiles"),
        "anyio": _version("anyio"),
        "uvloop": _importable_version("uvloop"),
        "aiofile": _importable_version("aiofile"),
        "trio": _importable_version("trio"),
    }
    caio_info = {"importable": False}
    try:
        import caio

        caio_info.update(
            importable=True,
            version=getattr(caio, "__version__", None),
            dist_version=_version("caio"),
            file=getattr(caio, "__file__", None),
            path=list(getattr(caio, "__path__", [])),
        )
        # What ``from caio import AsyncioContext`` selects here (the "default" rows).
        default = getattr(getattr(caio, "AsyncioContext", None), "__module__", "") or ""
        caio_info["default_backend"] = (
            default[len("caio.") : -len("_asyncio")]
            if default.startswith("caio.") and default.endswith("_asyncio")
            else None
        )
        structured = {}
        for name in ("trio", "anyio"):  # TrioContext / AnyioContext (issue 15)
            try:
                importlib.import_module("caio.%s" % name)
                structured[name] = {"ok": True}
            except BaseException as e:
                structured[name] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
        caio_info["structured"] = structured
        backends = {}
        for name in BACKENDS:
            b = {"ok": False}
            try:
                mod = importlib.import_module("caio.%s_asyncio" % name)
                if not hasattr(mod, "AsyncioContext"):
                    raise ImportError("caio.%s_asyncio has no AsyncioContext" % name)
                b["ok"] = True
                b["readinto"] = hasattr(mod.AsyncioContext, "readinto")
                b["pathops"] = hasattr(mod.AsyncioContext, "read_file")
                if name == "linux_uring":
                    raw = importlib.import_module("caio.linux_uring")
                    b["SQPOLL_ALLOWED"] = getattr(raw, "SQPOLL_ALLOWED", None)

                    async def _sq(mod=mod):
                        ctx = mod.AsyncioContext(max_requests=4)
                        try:
                            return int(getattr(ctx.context, "sqpoll", -1))
                        finally:
                            ctx.close()

                    b["default_sqpoll"] = asyncio.run(_sq())
            except BaseException as e:
                b["error"] = "%s: %s" % (type(e).__name__, e)
            backends[name] = b
        caio_info["backends"] = backends
    except BaseException as e:
        caio_info["error"] = "%s: %s" % (type(e).__name__, e)
    info["caio"] = caio_info
    print(json.dumps(info))


def _importable_version(name):
    """Version of a module the driver can import (from sys.path, extras included)."""
    try:
        mod = importlib.import_module(name)
    except BaseException as e:
        return {"error": "%s: %s" % (type(e).__name__, e)}
    return {"version": getattr(mod, "__version__", None) or _version(name)}


# ------------------------------------------------------------ page cache

_libc = None


def _resident_fraction(path, length):
    """Fraction of the first ``length`` bytes of ``path`` that sit in the page
    cache, from mincore(2) on a fresh mapping: it touches no page and starts
    no readahead (a RWF_NOWAIT probe read would)."""
    global _libc
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    npages = (length + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = (ctypes.c_ubyte * npages)()
            if _libc.mincore(addr, length, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            raw = bytes(vec)
            return (npages - raw.count(0)) / npages
        finally:
            _libc.munmap(addr, length)
    finally:
        os.close(fd)


def _evict(path):
    """fsync (pages must be clean) then drop the file from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _prime(path, size):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        buf = bytearray(8 << 20)
        off = 0
        while off < size:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
    finally:
        os.close(fd)


# --------------------------------------------------------------- offsets


def make_offsets(pattern, chunk, region, seed, count, start=0):
    """Deterministic offsets: the same list for every contender of a cell.
    ``seq`` walks consecutive chunks from chunk index ``start`` (wrapping)."""
    if pattern == "seq":
        n = max(1, region // chunk)
        return [((start + i) % n) * chunk for i in range(min(count, n))]
    nblocks = (region - chunk) // BLOCK + 1
    raw = array("I")
    raw.frombytes(random.Random(seed).randbytes(4 * count))
    return [(x % nblocks) * BLOCK for x in raw]


def _hdr(off):
    return (off // BLOCK).to_bytes(8, "little")


# --------------------------------------------------------------- contenders


class Contender:
    verify = True
    needs_loop = True

    def __init__(self, params, cell):
        self.params = params
        self.cell = cell
        self.info = {}
        self.buffers = {}

    def make_check(self, worker, check):
        """The result check of one worker (a readinto checks its own buffer)."""
        return check

    async def setup(self, fd, path):
        pass

    def make_op(self, worker):
        raise NotImplementedError

    async def setup_files(self, names):
        """The ``files`` scenarios' setup (instead of setup(fd, path))."""
        self.names = names

    def make_file_op(self, worker):
        raise NotImplementedError

    async def after(self):
        """Outside the timed window, after the measured phase (flush/close)."""

    async def teardown(self):
        pass


def _payload(n):
    return bytes(random.Random(n).randbytes(n))


class CaioContender(Contender):
    async def setup(self, fd, path):
        backend = self.params["backend"]
        mod = importlib.import_module("caio.%s_asyncio" % backend)
        kwargs = dict(self.params.get("kwargs") or {})
        self.ctx = mod.AsyncioContext(max_requests=self.cell["max_requests"], **kwargs)
        sq = getattr(self.ctx.context, "sqpoll", None)
        if sq is not None:
            self.info["sqpoll"] = int(sq)
        self.info["max_requests"] = self.cell["max_requests"]
        n = self.cell["chunk"]
        ctx = self.ctx
        self.fd = fd
        if self.params.get("api") == "readinto":
            self._op = None  # one buffer per worker: make_op
        elif self.cell["op"] == "read":
            self._op = lambda off: ctx.read(n, fd, off)
        else:
            data = _payload(n)
            self._op = lambda off: ctx.write(data, fd, off)

    def make_op(self, worker):
        if self._op is not None:
            return self._op
        # readinto into a buffer this worker reuses for every operation (issue 13)
        ctx, fd, buf = self.ctx, self.fd, bytearray(self.cell["chunk"])
        self.buffers[worker] = buf
        return lambda off: ctx.readinto(buf, fd, off)

    def make_check(self, worker, check):
        if self._op is not None or check is None:
            return check
        return _buffer_check(self.buffers[worker], self.cell["chunk"])

    async def setup_files(self, names):
        """Whole files and path operations of the context (DESIGN.md §14)."""
        mod = importlib.import_module("caio.%s_asyncio" % self.params["backend"])
        self.ctx = ctx = mod.AsyncioContext(
            max_requests=self.cell["max_requests"], **dict(self.params.get("kwargs") or {})
        )
        op = self.cell["op"]
        if op == "read":
            self._op = lambda i: ctx.read_file(names[i])
        elif op == "stat":
            self._op = lambda i: ctx.stat(names[i])
        else:
            data = _file_payload(0, self.cell["chunk"])
            self._op = lambda i: ctx.write_file(names[i], data)

    def make_file_op(self, worker):
        return self._op

    async def teardown(self):
        self.ctx.close()


class AiofileContender(Contender):
    """aiofile on top of whichever caio this interpreter imports, as its users write
    random access: one ``AIOFile`` shared by the workers, ``await afp.read(n, off)`` /
    ``await afp.write(data, off)``; aiofile picks the backend with ``from caio import
    AsyncioContext`` (each side's default)."""

    async def setup(self, fd, path):
        from aiofile import AIOFile

        self.afp = AIOFile(path, "rb" if self.cell["op"] == "read" else "r+b")
        await self.afp.open()
        n, afp = self.cell["chunk"], self.afp
        if self.cell["op"] == "read":
            self._op = lambda off: afp.read(n, off)
        else:
            data = _payload(n)

            async def op(off):
                await afp.write(data, off)
                return n  # aiofile writes all of it or raises

            self._op = op

    def make_op(self, worker):
        return self._op

    async def setup_files(self, names):
        self.afp = None
        from aiofile import async_open

        async def op(i):
            async with async_open(names[i], "rb") as f:
                return await f.read()

        self._op = op

    def make_file_op(self, worker):
        return self._op

    async def teardown(self):
        if self.afp is not None:
            await self.afp.close()


class ExecutorContender(Contender):
    """loop.run_in_executor(None, os.pread/os.pwrite): the default thread pool."""

    async def setup(self, fd, path):
        self.fd = fd
        self.loop = asyncio.get_running_loop()

    def make_file_op(self, worker):
        """``files`` cells: asyncio.to_thread of the blocking call (default pool)."""
        call, to_thread = _path_ops(self.cell, self.names), asyncio.to_thread
        return lambda i: to_thread(call, i)

    def make_op(self, worker):
        loop, fd, n = self.loop, self.fd, self.cell["chunk"]
        run = loop.run_in_executor
        if _into_buffer(self.params, self.cell):
            # os.pread allocates an unaligned bytes object (EINVAL under
            # O_DIRECT); a careful user reads into an aligned buffer instead.
            buf = mmap.mmap(-1, n)
            if self.cell["op"] == "read":

                async def op(off):
                    k = await run(None, os.preadv, fd, [buf], off)
                    return buf if k == n else buf[:k]
            else:
                buf.write(_payload(n))

                def op(off):
                    return run(None, os.pwritev, fd, [buf], off)

            return op
        if self.cell["op"] == "read":
            return lambda off: run(None, os.pread, fd, n, off)
        data = _payload(n)
        return lambda off: run(None, os.pwrite, fd, data, off)


def _path_ops(cell, names):
    """The blocking whole-file call of a ``files`` cell, as Python programs write it."""
    from pathlib import Path

    if cell["op"] == "read":
        return lambda i: Path(names[i]).read_bytes()
    if cell["op"] == "stat":
        return lambda i: os.stat(names[i])
    data = _file_payload(0, cell["chunk"])
    return lambda i: Path(names[i]).write_bytes(data)


class _FileObjContender(Contender):
    """aiofiles / anyio: one file object per worker, seek + read/write."""

    def _opener(self):
        if self.cell["cache"] != "direct":
            return None
        return lambda p, flags: os.open(p, flags | os.O_DIRECT)

    async def setup(self, fd, path):
        mode = "rb" if self.cell["op"] == "read" else "r+b"
        self.files = [await self._open(path, mode) for _ in range(self.cell["concurrency"])]
        self.data = _payload(self.cell["chunk"]) if self.cell["op"] == "write" else None

    def make_op(self, worker):
        f, n, data = self.files[worker], self.cell["chunk"], self.data
        if data is None:

            async def op(off):
                await f.seek(off)
                return await f.read(n)
        else:

            async def op(off):
                await f.seek(off)
                return await f.write(data)

        return op

    async def after(self):
        if self.cell["op"] == "write":
            for f in self.files:
                await f.flush()

    async def teardown(self):
        for f in self.files:
            await (f.aclose() if hasattr(f, "aclose") else f.close())


class AiofilesContender(_FileObjContender):
    async def _open(self, path, mode):
        import aiofiles

        return await aiofiles.open(path, mode, opener=self._opener())

    async def setup_files(self, names):
        import aiofiles

        self.files = []

        async def op(i):
            async with aiofiles.open(names[i], "rb") as f:
                return await f.read()

        self._op = op

    def make_file_op(self, worker):
        return self._op


class AnyioContender(_FileObjContender):
    async def _open(self, path, mode):
        import anyio

        return await anyio.open_file(path, mode, opener=self._opener())

    async def setup_files(self, names):
        import anyio

        self.files = []
        self._op = lambda i: anyio.Path(names[i]).read_bytes()

    def make_file_op(self, worker):
        return self._op


class FloorContender(Contender):
    """The least any awaited operation can cost: a future resolved by call_soon."""

    verify = False

    async def setup(self, fd, path):
        self.loop = asyncio.get_running_loop()

    def make_op(self, worker):
        loop = self.loop

        async def op(off):
            fut = loop.create_future()
            loop.call_soon(fut.set_result, None)
            return await fut

        return op


class SyncContender(Contender):
    """Plain os.pread/os.pwrite loop in one thread (no event loop)."""

    needs_loop = False

    def make_sync_op(self, fd):
        n = self.cell["chunk"]
        if _into_buffer(self.params, self.cell):
            buf = mmap.mmap(-1, n)
            if self.cell["op"] == "read":

                def op(off):
                    k = os.preadv(fd, [buf], off)
                    return buf if k == n else buf[:k]
            else:
                buf.write(_payload(n))

                def op(off):
                    return os.pwritev(fd, [buf], off)

            return op
        if self.cell["op"] == "read":
            return lambda off: os.pread(fd, n, off)
        data = _payload(n)
        return lambda off: os.pwrite(fd, data, off)

    def make_sync_file_op(self, names):
        return _path_ops(self.cell, names)


def _into_buffer(params, cell):
    """os.preadv/pwritev into one page-aligned buffer instead of os.pread/pwrite:
    under O_DIRECT (os.pread would fail), and for the readinto rows (issue 13)."""
    return cell["cache"] == "direct" or params.get("api") == "readinto"


KINDS = {
    "caio": CaioContender,
    "structured": Contender,  # run_structured_cell
    "aiofile": AiofileContender,
    "executor": ExecutorContender,
    "aiofiles": AiofilesContender,
    "anyio": AnyioContender,
    "floor": FloorContender,
    "sync": SyncContender,
}


# ------------------------------------------------------------ stall meters


class SelectorStallMeter:
    """Longest event-loop iteration: time between select() returning and the
    next select() call (= the longest time the loop could not react).  Adds
    two clock reads per iteration; unlike a spinning ticker it never keeps the
    loop busy."""

    def __init__(self, loop):
        self.max = 0.0
        self.active = False
        self._last = None
        sel = getattr(loop, "_selector", None)
        if sel is None:
            raise RuntimeError("event loop has no _selector")
        orig = sel.select
        clock = time.perf_counter

        def select(timeout=None):
            if self.active:
                now = clock()
                if self._last is not None and now - self._last > self.max:
                    self.max = now - self._last
            try:
                return orig(timeout)
            finally:
                self._last = clock()

        sel.select = select

    def start(self):
        self.max, self._last, self.active = 0.0, None, True

    def stop(self):
        self.active = False
        return self.max


class TickerStallMeter:
    """The classic probe: a task looping ``await asyncio.sleep(0)`` recording
    the largest gap between its wake-ups.  It keeps the loop spinning, which
    slows down and inflates the CPU time of low-concurrency cells."""

    def __init__(self, loop):
        self.max = 0.0
        self._task = None
        self._stop = False

    async def _run(self):
        clock = time.perf_counter
        last = clock()
        while not self._stop:
            await asyncio.sleep(0)
            now = clock()
            if now - last > self.max:
                self.max = now - last
            last = now

    def start(self):
        self.max, self._stop = 0.0, False
        self._task = asyncio.ensure_future(self._run())

    def stop(self):
        self._stop = True
        return self.max


class NoStallMeter:
    """uvloop's loop runs in libuv, with no selector to wrap; a ticker task would
    distort the numbers (see SelectorStallMeter), so the stall is not measured."""

    def __init__(self, loop):
        pass

    def start(self):
        pass

    def stop(self):
        return None


def _run_loop(loop, coro):
    """asyncio.run on the contender's event loop: asyncio's own or uvloop."""
    if loop == "uvloop":
        import uvloop

        if hasattr(uvloop, "run"):
            return uvloop.run(coro)
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(coro)


# ------------------------------------------------------------------ driver


def _pct(sorted_vals, q):
    if not sorted_vals:
        return None
    import math

    i = max(0, min(len(sorted_vals) - 1, int(math.ceil(q * len(sorted_vals))) - 1))
    return sorted_vals[i]


def _check_factory(cell, verify):
    n = cell["chunk"]
    if not verify:
        return None
    if cell["op"] == "read":

        def check(r, off):
            if len(r) != n:
                raise CellError("short read: %d of %d bytes at offset %d" % (len(r), n, off))
            if r[:8] != _hdr(off):
                raise CellError("wrong data at offset %d (block header mismatch)" % off)
    else:

        def check(r, off):
            if r != n:
                raise CellError("short write: %r of %d bytes at offset %d" % (r, n, off))

    return check


def _buffer_check(buf, n):
    """The check of a readinto into ``buf``: the result is the byte count."""

    def check(r, off):
        if r != n:
            raise CellError("short readinto: %r of %d bytes at offset %d" % (r, n, off))
        if buf[:8] != _hdr(off):
            raise CellError("wrong data at offset %d (block header mismatch)" % off)

    return check


async def _asyncio_gather(coros):
    await asyncio.gather(*coros)


async def _drive(ops, offsets, seconds, max_ops, checks, lats, gather=_asyncio_gather):
    """The one worker loop every asyncio contender runs."""
    state = [0]
    nofs = len(offsets)
    deadline = perf_ns() + int(seconds * 1e9)
    failure = []

    async def worker(op, check):
        while not failure:
            i = state[0]
            if i >= max_ops:
                return
            t0 = perf_ns()
            if t0 >= deadline:
                return
            state[0] = i + 1
            off = offsets[i % nofs]
            try:
                r = await op(off)
                t1 = perf_ns()
                if check is not None:
                    check(r, off)
            except Exception as e:
                failure.append(e)
                return
            if lats is not None:
                lats.append(t1 - t0)

    await gather([worker(op, check) for op, check in zip(ops, checks, strict=True)])
    if failure:
        raise failure[0]
    return state[0]


def _drive_sync(op, offsets, seconds, max_ops, check, lats):
    nofs = len(offsets)
    deadline = perf_ns() + int(seconds * 1e9)
    i = 0
    while i < max_ops:
        t0 = perf_ns()
        if t0 >= deadline:
            break
        off = offsets[i % nofs]
        r = op(off)
        t1 = perf_ns()
        i += 1
        if check is not None:
            check(r, off)
        if lats is not None:
            lats.append(t1 - t0)
    return i


def _file_flags(cell):
    flags = os.O_RDONLY if cell["op"] == "read" else os.O_RDWR
    if cell["cache"] == "direct":
        flags |= os.O_DIRECT
    return flags


def _prepare_cache(cell, path, region):
    """Cached cells: make sure the file is resident (prime if not)."""
    if cell["cache"] == "cached":
        if _resident_fraction(path, region) < 1.0:
            _prime(path, region)


def _post_warmup(cell, path, region, info):
    """Right before the timed phase: evict (cold/direct) and record how much
    of the file is in the page cache (expected: 0 for cold/direct, 1 cached)."""
    if cell["cache"] in ("cold", "direct"):
        t = time.perf_counter()
        _evict(path)
        info["evict_ms"] = round((time.perf_counter() - t) * 1e3, 2)
    info["resident"] = round(_resident_fraction(path, region), 5)
    if cell["cache"] in ("cold", "direct"):
        info["evicted"] = info["resident"] < 0.001


def _measure_result(n_ops, wall, cpu, ru0, ru1, lats, cell):
    lats.sort()
    nbytes = n_ops * cell["chunk"]
    return {
        "ops": n_ops,
        "bytes": nbytes,
        "wall_s": wall,
        "ops_per_s": n_ops / wall if wall > 0 else None,
        "mb_per_s": nbytes / wall / 1e6 if wall > 0 else None,
        "lat_p50_us": _pct(lats, 0.50) / 1e3 if lats else None,
        "lat_p99_us": _pct(lats, 0.99) / 1e3 if lats else None,
        "lat_p999_us": _pct(lats, 0.999) / 1e3 if lats else None,
        "lat_max_us": lats[-1] / 1e3 if lats else None,
        "cpu_s": cpu,
        "cpu_us_per_op": cpu / n_ops * 1e6 if n_ops else None,
        "user_s": ru1.ru_utime - ru0.ru_utime,
        "sys_s": ru1.ru_stime - ru0.ru_stime,
    }


# ------------------------------------------------- whole files (issue 14)
#
# The ``files`` scenarios: every cell handles each file of a set of
# ``cell["files"]`` files of ``chunk`` bytes exactly once, in an order fixed by
# the cell's seed (the same for every contender): read it whole, stat it, or
# create + write + close it.  ``op(i)`` works on file number ``i``.


def file_name(directory, i):
    return os.path.join(directory, "%03d" % (i // 1000), "f%06d" % i)


def _file_payload(i, size):
    return i.to_bytes(8, "little") + bytes(size - 8)


def _file_set(spec, cell):
    """The names of the cell's file set (created once, marked complete); write cells
    get their own directory, and extra names past the set for the warm-up."""
    n, size = cell["files"], cell["chunk"]
    kind = "write" if cell["op"] == "write" else "read"
    d = os.path.join(spec["files_dir"], "%s-%d-%d" % (kind, size, n))
    total = n + FILE_WARMUP
    names = [file_name(d, i) for i in range(total)]
    marker = os.path.join(d, ".complete")
    if not os.path.exists(marker):
        for i, name in enumerate(names):
            os.makedirs(os.path.dirname(name), exist_ok=True)
            if kind == "read":
                with open(name, "wb") as f:
                    f.write(_file_payload(i, size))
        os.sync()  # clean pages: a cold cell then only has to drop them (no fsync per file)
        with open(marker, "w") as f:
            f.write("ok")
    return names


FILE_WARMUP = 64


def _file_check(cell, names):
    n = cell["chunk"]
    if cell["op"] == "read":

        def check(r, i):
            if len(r) != n or r[:8] != i.to_bytes(8, "little"):
                raise CellError("wrong or short content of %s (%d bytes)" % (names[i], len(r)))
    elif cell["op"] == "stat":

        def check(r, i):
            if r.st_size != n:
                raise CellError("stat of %s: st_size %r, expected %d" % (names[i], r.st_size, n))
    else:

        def check(r, i):
            if r != n:
                raise CellError("write of %s returned %r, expected %d" % (names[i], r, n))

    return check


def _files_cache(cell, names):
    """cached: read every file once; cold: drop every file's pages (the set is clean:
    written once and synced, never written again)."""
    for name in names:
        fd = os.open(name, os.O_RDONLY)
        try:
            if cell["cache"] == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                os.read(fd, cell["chunk"])
        finally:
            os.close(fd)


def run_files_cell(spec, cell, contender):
    names = _file_set(spec, cell)
    n = cell["files"]
    order = list(range(n))
    random.Random(cell["seed"]).shuffle(order)
    warm = list(range(n, n + FILE_WARMUP))
    check = _file_check(cell, names) if contender.verify else None
    info = contender.info

    def before_measure():
        if cell["op"] == "write":  # create: none of the files exists
            for name in names[:n]:
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
        else:
            t = time.perf_counter()
            _files_cache(cell, names[:n])
            info["evict_ms" if cell["cache"] == "cold" else "prime_ms"] = round(
                (time.perf_counter() - t) * 1e3, 2
            )

    if not contender.needs_loop:
        op = contender.make_sync_file_op(names)
        _drive_sync(op, warm, 1e9, len(warm), check, None)
        before_measure()
        res = _timed_sync(cell, lambda lats: _drive_sync(op, order, 1e9, n, check, lats))
        res["max_stall_ms"] = res["wall_s"] * 1e3  # the loop thread itself: blocked throughout
        res["info"] = info
        return res

    async def main():
        meter = _stall_meter(asyncio.get_running_loop(), spec)
        await contender.setup_files(names)
        try:
            ops = [contender.make_file_op(w) for w in range(cell["concurrency"])]
            checks = [check] * len(ops)
            await asyncio.wait_for(_drive(ops, warm, 1e9, len(warm), checks, None), cell["timeout"])
            before_measure()

            async def measured(lats):
                try:
                    return await asyncio.wait_for(
                        _drive(ops, order, 1e9, n, checks, lats), cell["timeout"]
                    )
                except asyncio.TimeoutError:
                    raise CellError(
                        "timeout: %d files not done within %.0f s" % (n, cell["timeout"])
                    ) from None

            return await _timed(cell, meter, measured)
        finally:
            meter.stop()
            await contender.teardown()

    res = _run_loop(contender.params.get("loop"), main())
    res["info"] = info
    return res


# ------------------------------------------------ trio and anyio (issue 15)
#
# Contenders with ``params["lib"]`` run the same worker loop (_drive) under trio, or
# under anyio on its asyncio or trio backend, in a task group instead of
# asyncio.gather: ours is caio's TrioContext / AnyioContext (default backend), the
# peers the libraries' own trio.open_file / anyio.open_file (a file object per task,
# seek + read).


class _Lib:
    """The few primitives of a structured-concurrency library the driver needs."""

    def __init__(self, lib):
        self.name = lib
        if lib == "trio":
            import trio

            self.mod, self.open_file = trio, trio.open_file
            self.group, self.fail_after = trio.open_nursery, trio.fail_after
            self.run = trio.run
        else:
            import anyio

            self.mod, self.open_file = anyio, anyio.open_file
            self.group, self.fail_after = anyio.create_task_group, anyio.fail_after
            backend = lib.split("-", 1)[1]
            self.run = lambda fn: anyio.run(fn, backend=backend)

    async def gather(self, coros):
        async def wait(coro):
            await coro

        async with self.group() as tg:
            for coro in coros:
                tg.start_soon(wait, coro)

    def stall_meter(self, spec):
        """trio: the longest time between two waits for I/O (an Instrument: the
        selector probe's equivalent); anyio on asyncio: the selector probe."""
        if self.name.endswith("asyncio"):
            return _stall_meter(asyncio.get_running_loop(), spec)
        import trio

        class Meter(trio.abc.Instrument):
            max, active, _last = 0.0, False, None

            def after_io_wait(self, timeout):
                self._last = time.perf_counter()

            def before_io_wait(self, timeout):
                if self.active and self._last is not None:
                    self.max = max(self.max, time.perf_counter() - self._last)

            def start(self):
                self.max, self._last, self.active = 0.0, None, True

            def stop(self):
                self.active = False
                return self.max

        meter = Meter()
        trio.lowlevel.add_instrument(meter)
        return meter


def run_structured_cell(spec, cell, params):
    lib = _Lib(params["lib"])
    path = spec["files"][cell["op"]]
    region, n = spec["region"], cell["chunk"]
    offsets = make_offsets(cell["pattern"], n, region, cell["seed"], cell["offsets"])
    warm = make_offsets(cell["pattern"], n, region, cell["seed"] ^ 0x5A5A5A5A, 4096)
    check = _check_factory(cell, True)
    info = {}
    _prepare_cache(cell, path, region)
    fd = os.open(path, _file_flags(cell))

    async def main():
        files = []
        if params.get("method") == "open_file":
            for _ in range(cell["concurrency"]):
                files.append(await lib.open_file(path, "rb"))

            def make_op(f):
                async def op(off):
                    await f.seek(off)
                    return await f.read(n)

                return op

            ops, ctx = [make_op(f) for f in files], None
        else:
            mod = importlib.import_module("caio.%s" % lib.name.split("-")[0])
            cls = mod.TrioContext if lib.name == "trio" else mod.AnyioContext
            ctx = cls(max_requests=cell["max_requests"])
            info["max_requests"] = cell["max_requests"]
            ops = [lambda off, ctx=ctx: ctx.read(n, fd, off)] * cell["concurrency"]
        checks = [check] * len(ops)
        meter = lib.stall_meter(spec)
        try:
            with lib.fail_after(cell["timeout"]):
                await _drive(ops, warm, cell["warmup"], 1 << 62, checks, None, lib.gather)
            _post_warmup(cell, path, region, info)

            async def measured(lats):
                with lib.fail_after(cell["timeout"]):
                    return await _drive(
                        ops, offsets, cell["measure"], 1 << 62, checks, lats, lib.gather
                    )

            return await _timed(cell, meter, measured)
        finally:
            meter.stop()
            for f in files:
                await f.aclose()
            if ctx is not None:
                await ctx.aclose() if hasattr(ctx, "aclose") else ctx.close()

    try:
        out = []

        async def run():
            out.append(await main())

        lib.run(run)
        res = out[0]
        res["info"] = info
        return res
    finally:
        os.close(fd)


def _stall_meter(loop, spec):
    if not hasattr(loop, "_selector"):
        return NoStallMeter(loop)  # uvloop: no selector to wrap
    if spec.get("stall_method") == "ticker":
        return TickerStallMeter(loop)
    return SelectorStallMeter(loop)


def _timed_sync(cell, run):
    """The timed phase of a cell without an event loop: ``run(lats)`` does the
    operations (appending each latency) and returns how many it did."""
    lats = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, t0 = time.process_time(), time.perf_counter()
    n = run(lats)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return _measure_result(n, wall, cpu, ru0, resource.getrusage(resource.RUSAGE_SELF), lats, cell)


async def _timed(cell, meter, run):
    """The timed phase of an event-loop cell (asyncio, uvloop, trio, anyio): ``await
    run(lats)`` does the operations and returns how many; adds the longest stall."""
    lats = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    meter.start()
    c0, t0 = time.process_time(), time.perf_counter()
    n = await run(lats)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stall = meter.stop()
    res = _measure_result(n, wall, cpu, ru0, resource.getrusage(resource.RUSAGE_SELF), lats, cell)
    res["max_stall_ms"] = None if stall is None else stall * 1e3
    return res


def run_cell(spec, cell):
    kind = spec["contender"]["kind"]
    cls = KINDS[kind]
    contender = cls(spec["contender"].get("params") or {}, cell)
    if cell["pattern"] == "files":
        return run_files_cell(spec, cell, contender)
    if contender.params.get("lib"):
        return run_structured_cell(spec, cell, contender.params)
    path = spec["files"][cell["op"]]
    region = spec["region"]
    offsets = make_offsets(cell["pattern"], cell["chunk"], region, cell["seed"], cell["offsets"])
    # warm-up: another random list, or for seq the second half of the file
    warm_offsets = make_offsets(
        cell["pattern"],
        cell["chunk"],
        region,
        cell["seed"] ^ 0x5A5A5A5A,
        min(cell["offsets"], 4096),
        start=region // cell["chunk"] // 2,
    )
    reuse = cell["cache"] == "cached"
    max_ops = 1 << 62 if reuse else len(offsets)
    check = _check_factory(cell, contender.verify)
    info = contender.info
    _prepare_cache(cell, path, region)
    fd = os.open(path, _file_flags(cell))
    try:
        if not contender.needs_loop:
            op = contender.make_sync_op(fd)
            _drive_sync(op, warm_offsets, cell["warmup"], 1 << 62, check, None)
            _post_warmup(cell, path, region, info)
            res = _timed_sync(
                cell, lambda lats: _drive_sync(op, offsets, cell["measure"], max_ops, check, lats)
            )
            res["max_stall_ms"] = None
            if cell["op"] == "write":
                os.fsync(fd)
            res["info"] = info
            return res

        async def main():
            meter = _stall_meter(asyncio.get_running_loop(), spec)
            await contender.setup(fd, path)
            try:
                ops = [contender.make_op(w) for w in range(cell["concurrency"])]
                checks = [contender.make_check(w, check) for w in range(cell["concurrency"])]
                try:
                    await asyncio.wait_for(
                        _drive(ops, warm_offsets, cell["warmup"], 1 << 62, checks, None),
                        cell["timeout"],
                    )
                except asyncio.TimeoutError:
                    raise CellError(
                        "timeout during warm-up: operations did not complete "
                        "within %.0f s" % cell["timeout"]
                    ) from None
                await contender.after()
                _post_warmup(cell, path, region, info)

                async def measured(lats):
                    try:
                        return await asyncio.wait_for(
                            _drive(ops, offsets, cell["measure"], max_ops, checks, lats),
                            cell["timeout"],
                        )
                    except asyncio.TimeoutError:
                        raise CellError(
                            "timeout: operations did not complete within %.0f s "
                            "(%d completed)" % (cell["timeout"], len(lats))
                        ) from None

                res = await _timed(cell, meter, measured)
                await contender.after()
                if cell["op"] == "write":
                    os.fsync(fd)
                return res
            finally:
                meter.stop()
                await contender.teardown()

        res = _run_loop(contender.params.get("loop"), main())
        res["info"] = info
        return res
    finally:
        os.close(fd)


def run(spec_path, out_path):
    with open(spec_path) as f:
        spec = json.load(f)
    extra = (spec["contender"].get("params") or {}).get("sys_path")
    if extra:  # uvloop / aiofile for a caio interpreter (envs.extras_dir)
        sys.path.append(extra)
    try:  # 1024 concurrent file objects for aiofiles/anyio
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 65536)), hard))
    except (ValueError, OSError):
        pass
    hung = None
    with open(out_path, "a") as out:
        for cell in spec["cells"]:
            print("cell %s" % cell["id"], file=sys.stderr, flush=True)
            if hung is not None:
                out.write(
                    json.dumps(
                        {
                            "id": cell["id"],
                            "status": "fail",
                            "error": "not run: an earlier "
                            "cell of this contender timed out in the same batch (%s)" % hung,
                        }
                    )
                    + "\n"
                )
                out.flush()
                continue
            faulthandler.dump_traceback_later(cell["hard_timeout"], exit=True)
            try:
                res = run_cell(spec, cell)
                res["status"] = "ok"
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                res = {
                    "status": "fail",
                    "error": "%s: %s" % (type(e).__name__, e),
                    "traceback": traceback.format_exc()[-2000:],
                }
                if isinstance(e, CellError) and str(e).startswith("timeout"):
                    hung = cell["id"]
            finally:
                faulthandler.cancel_dump_traceback_later()
            res["id"] = cell["id"]
            out.write(json.dumps(res) + "\n")
            out.flush()


def main(argv):
    if len(argv) in (2, 3) and argv[1] == "probe":
        probe(argv[2] if len(argv) == 3 else None)
    elif len(argv) == 4 and argv[1] == "run":
        run(argv[2], argv[3])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
