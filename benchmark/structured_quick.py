#!/usr/bin/env python3
"""Quick benchmark: caio's TrioContext / AnyioContext against trio's and
anyio's own file I/O (worker threads), 4 KiB random reads of a page-cached
file at concurrency 1 and 64.

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

Every cell runs in its own subprocess (``--measure`` seconds after
``--warmup``), the cells of a repetition in one order, ``--repeat`` times;
the table shows the median operations per second and caio's ratio to each
thread-based contender. The machine may be shared: ``uptime`` is printed.

    .venv/bin/python benchmark/structured_quick.py
    .venv/bin/python benchmark/structured_quick.py --repeat 7 --libs trio
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

BLOCK = 4096
FILE_SIZE = 64 * 1024 * 1024
LIBS = ("trio", "anyio-asyncio", "anyio-trio")


# ---------------------------------------------------------------------------
# child side


def child(
    lib: str, method: str, concurrency: int, path: str, warmup: float, measure: float
) -> None:
    fd = os.open(path, os.O_RDONLY)
    blocks = os.fstat(fd).st_size // BLOCK
    rnd = random.Random(1)
    offsets = [rnd.randrange(blocks) * BLOCK for _ in range(1 << 16)]
    backend = None
    streak = 0
    if method == "caio-checkpoint":
        method, streak = "caio", 1
    if method.startswith("caio:"):
        method, backend = method.split(":", 1)

    if lib == "trio":
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

    state = {"count": 0, "stop": False, "measuring": False}

    async def worker(k: int, ctx: object) -> None:
        i = k * 997
        n = len(offsets)
        if method == "caio":
            read = ctx.read  # type: ignore[attr-defined]
            while not state["stop"]:
                data = await read(BLOCK, fd, offsets[i % n])
                i += 1
                state["count"] += 1
        elif method == "to_thread":
            pread = os.pread
            while not state["stop"]:
                data = await to_thread(pread, fd, BLOCK, offsets[i % n])
                i += 1
                state["count"] += 1
        else:
            f = await open_file(path, "rb", buffering=0)
            try:
                while not state["stop"]:
                    await f.seek(offsets[i % n])
                    data = await f.read(BLOCK)
                    i += 1
                    state["count"] += 1
            finally:
                await f.aclose()
        assert len(data) == BLOCK

    async def main() -> None:
        ctx = make_ctx() if method == "caio" else None
        if streak:
            ctx.MAX_SYNC_STREAK = streak  # type: ignore[union-attr]
        async with group() as tg:
            for k in range(concurrency):
                tg.start_soon(worker, k, ctx)
            await sleep(warmup)
            start_count, t0 = state["count"], time.perf_counter()
            await sleep(measure)
            done, t1 = state["count"] - start_count, time.perf_counter()
            state["stop"] = True
        if ctx is not None:
            await ctx.aclose()  # type: ignore[attr-defined]
        print(json.dumps({"ops": done / (t1 - t0), "backend": getattr(ctx, "backend", None)}))

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
    parser.add_argument("--child", nargs=4, metavar=("LIB", "METHOD", "CONC", "PATH"))
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument("--backends", default="", help="extra caio backends, comma-separated")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--measure", type=float, default=1.0)
    parser.add_argument("--file", default="/var/tmp/caio-structured-bench/read.bin")
    args = parser.parse_args()
    if args.child:
        lib, method, conc, path = args.child
        child(lib, method, int(conc), path, args.warmup, args.measure)
        return 0

    ensure_file(args.file)
    methods = ["caio", "caio-checkpoint", "open_file", "to_thread"]
    methods += ["caio:" + b for b in args.backends.split(",") if b]
    cells = [
        (lib, method, int(conc))
        for lib in args.libs.split(",")
        for conc in args.concurrency.split(",")
        for method in methods
    ]
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    results: dict[tuple[str, str, int], list[float]] = {cell: [] for cell in cells}
    backends: dict[tuple[str, str, int], str] = {}
    for rep in range(args.repeat):
        for cell in cells:
            lib, method, conc = cell
            proc = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--warmup",
                    str(args.warmup),
                    "--measure",
                    str(args.measure),
                    "--child",
                    lib,
                    method,
                    str(conc),
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
            results[cell].append(out["ops"])
            if out["backend"]:
                backends[cell] = out["backend"]
        print(f"repetition {rep + 1}/{args.repeat} done", file=sys.stderr)

    print(f"\nmedian of {args.repeat} runs, 4 KiB cached random reads, operations/s\n")
    header = f"{'library':<14} {'c':>3}  {'contender':<30} {'ops/s':>9}   {'caio ÷':>7}"
    print(header)
    print("-" * len(header))
    for lib in args.libs.split(","):
        for conc in args.concurrency.split(","):
            med = {m: statistics.median(results[(lib, m, int(conc))]) for m in methods}
            for m in methods:
                label = m
                if m.startswith("caio"):
                    label = f"{m} ({backends.get((lib, m, int(conc)))})"
                ratio = "" if m.startswith("caio") else f"{med['caio'] / med[m]:6.1f}x"
                print(f"{lib:<14} {conc:>3}  {label:<30} {med[m]:9.0f}   {ratio:>7}")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
