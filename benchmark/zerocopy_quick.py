#!/usr/bin/env python3
"""Zero-copy rows (issue 13): ``readinto`` into a reused buffer against our own
``read()`` and a synchronous ``os.preadv`` loop, and one ``readv`` against
separate ``readinto`` calls, for each native asyncio backend of ours.

    .venv/bin/python benchmark/zerocopy_quick.py [--duration 1] [--repeat 3]
                                                 [--backends linux_uring,...]
                                                 [--file PATH] [--size-mib 256]

Run from the repository root with the worktree's interpreter (ours = the
``caio`` that interpreter imports). The test file lives on a real disk
(``/var/tmp``) and is read once first, so every read is a page-cache hit:
what is measured is the per-operation cost (allocation, copies, wake-ups),
not the device. Rows (median of ``--repeat`` runs, ``--duration`` s each):

* ``4K c=1``, ``4K c=64``: random 4 KiB reads; ``read()`` (a new ``bytes``
  per op) vs ``readinto`` (each task reuses one ``bytearray``);
* ``1M c=64``: random 1 MiB reads, same pair, plus ``os.preadv`` into one
  buffer in a loop on the calling thread (the synchronous baseline);
* ``readv 16x64K``: one task, 1 MiB per step as one ``readv`` of 16 × 64 KiB
  buffers vs 16 ``readinto`` of 64 KiB awaited one after the other (16
  system calls or SQEs instead of 1);
* ``O_DIRECT 4K c=64`` (linux_uring, linux_aio): random 4 KiB ``readinto``
  into page-aligned ``mmap`` blocks (no bounce copy) vs ``fio
  --ioengine=io_uring`` / ``libaio`` at ``--iodepth=64`` on the same file;
* ``RSS``: peak resident set growth while reading the whole file in 1 MiB
  pieces into one buffer (``ru_maxrss`` before/after; it should stay within a
  few MiB of the buffer).

Not a timed test: a measuring tool, one process, numbers printed as a
Markdown table. Check ``uptime`` first; the machine is shared.
"""

import argparse
import asyncio
import importlib
import json
import mmap
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

DEFAULT_FILE = "/var/tmp/caio_zerocopy_quick.bin"


def ensure_file(path: str, size: int) -> None:
    if not os.path.exists(path) or os.path.getsize(path) != size:
        with open(path, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
    # Warm the page cache.
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


async def run_tasks(conc: int, duration: float, step: Callable[[int], Awaitable[int]]) -> float:
    """Operations (or bytes, whatever ``step`` returns) per second."""
    stop = time.perf_counter() + duration
    total = [0]

    async def worker(i: int) -> None:
        while time.perf_counter() < stop:
            n = await step(i)  # (not `total[0] += await ...`: it would
            total[0] += n  # read total before the await and lose updates)

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(conc)))
    return total[0] / (time.perf_counter() - start)


def measure(
    backend: str, fd: int, blocks: int, mode: str, size: int, conc: int, duration: float
) -> float:
    module = importlib.import_module(f"caio.{backend}_asyncio")
    rnd = random.Random(7)
    span = blocks * 4096 - size

    async def main() -> float:
        ctx = module.AsyncioContext(max(conc, 64))
        bufs = [bytearray(size) for _ in range(conc)]
        parts = [
            [memoryview(b)[j * (size // 16) : (j + 1) * (size // 16)] for j in range(16)]
            for b in bufs
        ]

        def offset() -> int:
            return rnd.randrange(span // 4096) * 4096

        async def read(i: int) -> int:
            return len(await ctx.read(size, fd, offset()))

        async def readinto(i: int) -> int:
            return await ctx.readinto(bufs[i], fd, offset())

        async def readv(i: int) -> int:
            return await ctx.readv(parts[i], fd, offset())

        async def readinto16(i: int) -> int:
            base, n = offset(), 0
            for j, p in enumerate(parts[i]):
                n += await ctx.readinto(p, fd, base + j * len(p))
            return n

        step = {"read": read, "readinto": readinto, "readv": readv, "readinto16": readinto16}
        try:
            await run_tasks(conc, min(0.2, duration), step[mode])  # warm-up
            return await run_tasks(conc, duration, step[mode])
        finally:
            ctx.close()

    return asyncio.run(main())


def direct_readinto(backend: str, path: str, conc: int, duration: float) -> float:
    """O_DIRECT 4 KiB random readinto at ``conc``, each task into its own
    page-aligned mmap block (no bounce copy): operations per second."""
    module = importlib.import_module(f"caio.{backend}_asyncio")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    blocks = os.path.getsize(path) // 4096
    rnd = random.Random(11)

    async def main() -> float:
        ctx = module.AsyncioContext(max(conc, 64))
        blocks_mem = [mmap.mmap(-1, 4096) for _ in range(conc)]

        async def step(i: int) -> int:
            await ctx.readinto(blocks_mem[i], fd, rnd.randrange(blocks) * 4096)
            return 1

        try:
            await run_tasks(conc, min(0.2, duration), step)
            return await run_tasks(conc, duration, step)
        finally:
            ctx.close()

    try:
        return asyncio.run(main())
    finally:
        os.close(fd)


def fio_iops(engine: str, path: str, depth: int, duration: float) -> float | None:
    """``fio --ioengine=<engine> --direct=1 --rw=randread --bs=4k`` IOPS on the
    same file, or None without fio."""
    if shutil.which("fio") is None:
        return None
    out = subprocess.run(
        [
            "fio",
            "--name=zc",
            f"--filename={path}",
            f"--ioengine={engine}",
            f"--iodepth={depth}",
            "--direct=1",
            "--rw=randread",
            "--bs=4k",
            "--time_based",
            f"--runtime={max(1, round(duration))}",
            "--output-format=json",
            "--randrepeat=0",
            "--norandommap",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return float(json.loads(out.stdout)["jobs"][0]["read"]["iops"])
    except (ValueError, KeyError, IndexError):
        return None


def sync_preadv(fd: int, blocks: int, size: int, duration: float) -> float:
    rnd = random.Random(7)
    span = blocks * 4096 - size
    buf = bytearray(size)
    done = 0
    stop = time.perf_counter() + duration
    start = time.perf_counter()
    while time.perf_counter() < stop:
        done += os.preadv(fd, [buf], rnd.randrange(span // 4096) * 4096)
    return done / (time.perf_counter() - start)


def peak_rss_growth(backend: str, path: str) -> tuple[float, float]:
    """MiB of peak RSS growth reading the whole file into one 1 MiB buffer,
    and the seconds it took."""
    module = importlib.import_module(f"caio.{backend}_asyncio")
    fd = os.open(path, os.O_RDONLY)
    asyncio.run(asyncio.sleep(0))  # the loop machinery, before the baseline

    async def main() -> None:
        ctx = module.AsyncioContext()
        buf = bytearray(1 << 20)
        offset = 0
        try:
            while n := await ctx.readinto(buf, fd, offset):
                offset += n
        finally:
            ctx.close()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    asyncio.run(main())
    took = time.perf_counter() - start
    os.close(fd)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, took


def median(f: Callable[[], float], repeat: int) -> float:
    return statistics.median(f() for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", default="linux_uring,linux_aio,thread_aio")
    ap.add_argument("--file", default=DEFAULT_FILE)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rss", help=argparse.SUPPRESS)  # internal: one RSS row
    args = ap.parse_args()
    if args.rss:
        growth, took = peak_rss_growth(args.rss, args.file)
        print(growth, took)
        return

    size = args.size_mib << 20
    ensure_file(args.file, size)
    fd = os.open(args.file, os.O_RDONLY)
    blocks = size // 4096
    d, r = args.duration, args.repeat
    rows: list[tuple[str, ...]] = []
    baseline_1m = median(lambda: sync_preadv(fd, blocks, 1 << 20, d), r) / (1 << 20)
    rows.append(
        ("sync os.preadv loop", "1M c=1 (one thread)", "—", f"{baseline_1m:.0f} MiB/s", "—")
    )
    for backend in args.backends.split(","):
        try:
            importlib.import_module(f"caio.{backend}_asyncio")
        except Exception as e:  # not available here
            print(f"{backend}: skipped ({e})")
            continue

        def m(mode: str, sz: int, conc: int, be: str = backend) -> float:
            return median(lambda: measure(be, fd, blocks, mode, sz, conc, d), r)

        for conc in (1, 64):
            rd = m("read", 4096, conc) / 4096  # bytes/s -> op/s
            ri = m("readinto", 4096, conc) / 4096
            rows.append(
                (
                    backend,
                    f"4K c={conc}",
                    f"{rd / 1000:.0f}k op/s",
                    f"{ri / 1000:.0f}k op/s",
                    f"{ri / rd:.2f}×",
                )
            )
        rd = m("read", 1 << 20, 64) / (1 << 20)
        ri = m("readinto", 1 << 20, 64) / (1 << 20)
        rows.append(
            (
                backend,
                "1M c=64",
                f"{rd:.0f} MiB/s",
                f"{ri:.0f} MiB/s",
                f"{ri / rd:.2f}× read, {ri / baseline_1m:.2f}× preadv",
            )
        )
        rv = m("readv", 1 << 20, 1) / (1 << 20)
        r16 = m("readinto16", 1 << 20, 1) / (1 << 20)
        rows.append(
            (
                backend,
                "16×64K c=1",
                f"{r16:.0f} MiB/s (16 readinto)",
                f"{rv:.0f} MiB/s (1 readv)",
                f"{rv / r16:.2f}×",
            )
        )
        fio_engine = {"linux_uring": "io_uring", "linux_aio": "libaio"}.get(backend)
        if fio_engine is not None:
            ours = median(lambda be=backend: direct_readinto(be, args.file, 64, d), r)
            theirs = fio_iops(fio_engine, args.file, 64, d)
            rows.append(
                (
                    backend,
                    "O_DIRECT 4K c=64",
                    f"fio {fio_engine}: " + (f"{theirs / 1000:.0f}k op/s" if theirs else "n/a"),
                    f"{ours / 1000:.0f}k op/s",
                    f"{ours / theirs:.2f}× fio" if theirs else "—",
                )
            )
        # A fresh process: the peak so far says nothing about this read.
        out = subprocess.run(
            [sys.executable, __file__, "--rss", backend, "--file", args.file],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        growth, took = float(out[0]), float(out[1])
        rows.append(
            (
                backend,
                f"RSS, {args.size_mib} MiB in 1M pieces",
                "—",
                f"+{growth:.1f} MiB peak ({args.size_mib / took:.0f} MiB/s)",
                "—",
            )
        )
    os.close(fd)
    print("| backend | row | read() / baseline | readinto / readv | ratio |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
