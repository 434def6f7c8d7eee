#!/usr/bin/env python3
"""Quick benchmark: caio's TrioContext / AnyioContext against trio's and
anyio's own file I/O (worker threads) and against caio's own AsyncioContext,
random reads of a page-cached file: 4 KiB at concurrency 1 and 64, 1 MiB at 64.

Contenders, per library (trio; anyio on its asyncio backend; anyio on its
trio backend):

* ``caio``       ``await ctx.read(4096, fd, off)``, ``TrioContext`` /
                 ``AnyioContext`` with the default backend (``--backends``
                 adds others: ``linux_uring,linux_aio,thread_aio,python_aio``);
* ``caio-checkpoint``  the same with ``MAX_SYNC_STREAK = 1``: every read a
                 full checkpoint (a schedule point even on a page-cache hit);
* ``open_file``  what the libraries offer for files: one
                 ``trio.open_file`` / ``anyio.open_file`` object per task,
                 ``await f.seek(off); await f.read(4096)`` (two thread hops);
* ``to_thread``  the best one can do with their threads:
                 ``await to_thread.run_sync(os.pread, fd, 4096, off)`` (one
                 hop; anyio's default limiter allows 40 threads).

and, as the reference for "trio users do not pay for choosing trio", ``asyncio``
(the library) with ``caio`` = ``AsyncioContext`` on the same backend.

Per cell: operations per second, the p99 latency of one read (µs) and the
scheduler's longest stall (ms: a task that sleeps 1 ms in a loop records how
late it woke up; the worst lateness while measuring).

Every cell runs in its own subprocess (``--measure`` seconds after
``--warmup``), the cells of a repetition in one order, ``--repeat`` times;
the table shows medians, caio's ratio to each thread-based contender and
to caio's asyncio figure at the same point. The machine may be shared: ``uptime`` is printed.

    .venv/bin/python benchmark/structured_quick.py
    .venv/bin/python benchmark/structured_quick.py --repeat 7 --libs trio

Before/after: ``--python /other/checkout/.venv/bin/python`` measures that
build instead (run both, interleaved); ``--methods caio`` leaves out the
thread-based contenders (a ratio-to-asyncio run in about a minute).
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

FILE_SIZE = 64 * 1024 * 1024
LIBS = ("trio", "anyio-asyncio", "anyio-trio")
POINTS = "4096@1,4096@64,1048576@64"  # read size @ concurrency


# ---------------------------------------------------------------------------
# child side


def child(
    lib: str,
    method: str,
    concurrency: int,
    size: int,
    path: str,
    warmup: float,
    measure: float,
) -> None:
    fd = os.open(path, os.O_RDONLY)
    blocks = os.fstat(fd).st_size // size
    rnd = random.Random(1)
    offsets = [rnd.randrange(blocks) * size for _ in range(1 << 16)]
    backend = None
    streak = 0
    if method == "caio-checkpoint":
        method, streak = "caio", 1
    if method.startswith("caio:"):
        method, backend = method.split(":", 1)

    if lib == "asyncio":
        import asyncio

        sleep = asyncio.sleep
        to_thread = asyncio.to_thread
        open_file = None
        group = asyncio.TaskGroup if sys.version_info >= (3, 11) else None

        def make_ctx() -> object:
            from caio import AsyncioContext

            if backend is None:
                return AsyncioContext(max_requests=concurrency)
            import importlib

            mod = importlib.import_module(f"caio.{backend}_asyncio")
            return mod.AsyncioContext(max_requests=concurrency)

        def run(fn: object) -> None:
            asyncio.run(fn())  # type: ignore[operator]
    elif lib == "trio":
        import trio

        sleep = trio.sleep
        to_thread = trio.to_thread.run_sync
        open_file = trio.open_file
        group = trio.open_nursery

        def make_ctx() -> object:
            from caio.trio import TrioContext

            return TrioContext(max_requests=concurrency, backend=backend)

        def run(fn: object) -> None:
            trio.run(fn)  # type: ignore[arg-type]
    else:
        import anyio
        import anyio.to_thread

        sleep = anyio.sleep
        to_thread = anyio.to_thread.run_sync
        open_file = anyio.open_file
        group = anyio.create_task_group

        def make_ctx() -> object:
            from caio.anyio import AnyioContext

            return AnyioContext(max_requests=concurrency, backend=backend)

        def run(fn: object) -> None:
            anyio.run(fn, backend=lib.split("-", 1)[1])  # type: ignore[arg-type]

    state = {"count": 0, "stop": False, "measuring": False, "stall": 0.0}
    lat: list[float] = []  # seconds per read while measuring
    clock = time.perf_counter

    async def worker(k: int, ctx: object) -> None:
        i = k * 997
        n = len(offsets)
        data = b""
        if method == "caio":
            read = ctx.read  # type: ignore[attr-defined]

            async def op(off: int) -> bytes:
                return await read(size, fd, off)  # type: ignore[no-any-return]
        elif method == "to_thread":
            pread = os.pread

            async def op(off: int) -> bytes:
                return await to_thread(pread, fd, size, off)  # type: ignore[no-any-return]
        else:
            f = await open_file(path, "rb", buffering=0)  # type: ignore[misc]

            async def op(off: int) -> bytes:
                await f.seek(off)
                return await f.read(size)  # type: ignore[no-any-return]

        try:
            while not state["stop"]:
                t = clock()
                data = await op(offsets[i % n])
                if state["measuring"]:
                    lat.append(clock() - t)
                i += 1
                state["count"] += 1
        finally:
            if method == "open_file":
                await f.aclose()
        assert len(data) == size

    async def ticker() -> None:  # the scheduler's longest stall
        while not state["stop"]:
            t = clock()
            await sleep(0.001)
            late = clock() - t - 0.001
            if state["measuring"] and late > state["stall"]:
                state["stall"] = late

    async def body(spawn: object, ctx: object) -> tuple[int, float, float]:
        for k in range(concurrency):
            spawn(worker, k, ctx)  # type: ignore[operator]
        spawn(ticker)  # type: ignore[operator]
        await sleep(warmup)
        state["measuring"] = True
        start_count, t0 = state["count"], clock()
        await sleep(measure)
        done, t1 = state["count"] - start_count, clock()
        state["measuring"] = False
        state["stop"] = True
        return done, t0, t1

    async def main() -> None:
        ctx = make_ctx() if method == "caio" else None
        if streak:
            ctx.MAX_SYNC_STREAK = streak  # type: ignore[union-attr]
        if lib == "asyncio":
            import asyncio

            tasks: list[asyncio.Task[None]] = []

            def spawn(fn: object, *a: object) -> None:
                tasks.append(asyncio.ensure_future(fn(*a)))  # type: ignore[operator]

            done, t0, t1 = await body(spawn, ctx)
            await asyncio.gather(*tasks)
        else:
            async with group() as tg:  # type: ignore[misc]
                done, t0, t1 = await body(tg.start_soon, ctx)
        if ctx is not None:
            close = getattr(ctx, "aclose", None)
            if close is not None:
                await close()
            else:
                ctx.close()  # type: ignore[attr-defined]
        lat.sort()
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0
        backend_name = getattr(ctx, "backend", None)
        if lib == "asyncio" and ctx is not None:
            backend_name = type(ctx).__module__.split(".")[-1].removesuffix("_asyncio")
        print(
            json.dumps(
                {
                    "ops": done / (t1 - t0),
                    "p99_us": p99 * 1e6,
                    "stall_ms": state["stall"] * 1e3,
                    "backend": backend_name,
                }
            )
        )

    run(main)


# ---------------------------------------------------------------------------
# parent side


def ensure_file(path: str) -> None:
    if not os.path.exists(path) or os.path.getsize(path) != FILE_SIZE:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fp:
            for _ in range(FILE_SIZE // (1 << 20)):
                fp.write(os.urandom(1 << 20))
    with open(path, "rb") as fp:  # into the page cache
        while fp.read(1 << 20):
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=5, metavar=("LIB", "METHOD", "CONC", "SIZE", "PATH"))
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument("--backends", default="", help="extra caio backends, comma-separated")
    parser.add_argument("--points", default=POINTS, help="read size@concurrency, comma-separated")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--measure", type=float, default=1.0)
    parser.add_argument("--file", default="/var/tmp/caio-structured-bench/read.bin")
    parser.add_argument(
        "--methods",
        default="caio,caio-checkpoint,open_file,to_thread",
        help="contenders under trio/anyio, comma-separated (caio is always measured)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter of the measuring subprocesses (another checkout's venv: a before/after)",
    )
    args = parser.parse_args()
    if args.child:
        lib, method, conc, size, path = args.child
        child(lib, method, int(conc), int(size), path, args.warmup, args.measure)
        return 0

    ensure_file(args.file)
    extra = ["caio:" + b for b in args.backends.split(",") if b]
    methods = ["caio", *(m for m in args.methods.split(",") if m and m != "caio"), *extra]
    points = [tuple(int(x) for x in p.split("@")) for p in args.points.split(",")]
    libs = args.libs.split(",")
    cells = [
        (lib, method, conc, size)
        for lib in ["asyncio", *libs]
        for size, conc in points
        for method in (["caio", *extra] if lib == "asyncio" else methods)
    ]
    print("python:", args.python)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    results: dict[tuple[str, str, int, int], list[dict[str, float]]] = {c: [] for c in cells}
    backends: dict[tuple[str, str, int, int], str] = {}
    for rep in range(args.repeat):
        for cell in cells:
            lib, method, conc, size = cell
            proc = subprocess.run(
                [
                    args.python,
                    os.path.abspath(__file__),
                    "--warmup",
                    str(args.warmup),
                    "--measure",
                    str(args.measure),
                    "--child",
                    lib,
                    method,
                    str(conc),
                    str(size),
                    args.file,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if proc.returncode != 0:
                print(f"{cell}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            results[cell].append(out)
            if out["backend"]:
                backends[cell] = out["backend"]
        print(f"repetition {rep + 1}/{args.repeat} done", file=sys.stderr)

    def med(cell: tuple[str, str, int, int], key: str) -> float:
        return statistics.median(r[key] for r in results[cell])

    print(f"\nmedians of {args.repeat} runs, cached random reads")
    print("ratios: caio ÷ that contender; 'vs asyncio': caio here ÷ AsyncioContext\n")
    header = (
        f"{'library':<14} {'size':>5} {'c':>3}  {'contender':<32} {'ops/s':>9} "
        f"{'p99 µs':>8} {'stall ms':>8}   {'caio ÷':>7}"
    )
    print(header)
    print("-" * len(header))
    for lib in ["asyncio", *libs]:
        for size, conc in points:
            kb = f"{size // 1024}K" if size < 1 << 20 else f"{size >> 20}M"
            ms = ["caio", *extra] if lib == "asyncio" else methods
            caio_ops = med((lib, "caio", conc, size), "ops")
            for m in ms:
                cell = (lib, m, conc, size)
                label = m
                if m.startswith("caio"):
                    label = f"{m} ({backends.get(cell)})"
                if m.startswith("caio") and lib != "asyncio":
                    ref = med(("asyncio", m if m in extra else "caio", conc, size), "ops")
                    ratio = f"{med(cell, 'ops') / ref:5.2f}x vs asyncio"
                elif m.startswith("caio"):
                    ratio = ""
                else:
                    ratio = f"{caio_ops / med(cell, 'ops'):6.1f}x"
                print(
                    f"{lib:<14} {kb:>5} {conc:>3}  {label:<32} {med(cell, 'ops'):9.0f} "
                    f"{med(cell, 'p99_us'):8.0f} {med(cell, 'stall_ms'):8.2f}   {ratio}"
                )
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
