#!/usr/bin/env python3
"""Benchmark: whole files and path operations (DESIGN.md §14) against what
asyncio programs use today.

Scenarios (each over ``--files`` files, 10,000 by default, concurrency
``--concurrency``, 64 by default):

* ``read-4k`` / ``read-64k``, page-cached and cold (each file's pages are
  dropped with ``posix_fadvise(DONTNEED)`` before the cell): read every file
  whole;
* ``stat``: ``os.stat`` every file;
* ``write-4k``: create, write 4 KiB, close every file.

Contenders:

* ``ours.<backend>``: ``await ctx.read_file(p)`` / ``ctx.stat(p)`` /
  ``ctx.write_file(p, data)`` on ``caio.<backend>_asyncio.AsyncioContext``;
* ``to_thread``: ``await asyncio.to_thread(Path(p).read_bytes)`` (``os.stat``,
  ``Path.write_bytes``);
* ``sync``: a plain loop on the event-loop thread (the loop is blocked
  throughout: its stall is the whole cell);
* ``aiofiles``: ``async with aiofiles.open(p, "rb") as f: await f.read()``;
* ``anyio``: ``await anyio.Path(p).read_bytes()``;
* ``aiofile``: ``async with aiofile.async_open(p, "rb") as f: await
  f.read()`` (reference; runs on whatever caio the child imports — ours).

Every cell runs in its own subprocess with the interpreter of ``--python``
(default: the benchmark's tools venv, which has aiofiles and anyio; ours is
put on ``PYTHONPATH``), ``--repeat`` times in rotating order; the table shows
the median files per second, ours' ratio to ``to_thread`` and the longest
event-loop stall seen by a 1 ms ticker task during the cell.

    .venv/bin/python benchmark/pathops_quick.py
    .venv/bin/python benchmark/pathops_quick.py --files 2000 --repeat 1 --scenarios read-4k
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("linux_uring", "linux_aio", "thread_aio", "python_aio")
SCENARIOS = ("read-4k", "read-64k", "read-4k-cold", "read-64k-cold", "stat", "write-4k")
PEERS_READ = ("to_thread", "sync", "aiofiles", "anyio", "aiofile")


# ---------------------------------------------------------------------------
# child side


CHILD = r"""
import asyncio, json, os, sys, time
from pathlib import Path

scenario, contender, concurrency, listing = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
names = Path(listing).read_text().split("\n")
data = b"w" * 4096


def make_op(ctx):
    kind = scenario.split("-")[0]
    if contender.startswith("ours."):
        if kind == "read":
            return ctx.read_file
        if kind == "stat":
            return ctx.stat
        return lambda p: ctx.write_file(p, data)
    if contender == "to_thread":
        if kind == "read":
            return lambda p: asyncio.to_thread(Path(p).read_bytes)
        if kind == "stat":
            return lambda p: asyncio.to_thread(os.stat, p)
        return lambda p: asyncio.to_thread(Path(p).write_bytes, data)
    if contender == "aiofiles":
        import aiofiles

        async def op(p):
            async with aiofiles.open(p, "rb") as f:
                return await f.read()

        return op
    if contender == "anyio":
        import anyio

        return lambda p: anyio.Path(p).read_bytes()
    if contender == "aiofile":
        import aiofile

        async def op(p):
            async with aiofile.async_open(p, "rb") as f:
                return await f.read()

        return op
    raise SystemExit(f"unknown contender {contender}")


def sync_op():
    kind = scenario.split("-")[0]
    if kind == "read":
        return lambda p: Path(p).read_bytes()
    if kind == "stat":
        return os.stat
    return lambda p: Path(p).write_bytes(data)


async def main():
    ctx = None
    if contender.startswith("ours."):
        import importlib

        mod = importlib.import_module(f"caio.{contender[5:]}_asyncio")
        ctx = mod.AsyncioContext()
    stall = [0.0]
    stop = [False]

    async def ticker():
        while not stop[0]:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            stall[0] = max(stall[0], time.perf_counter() - t - 0.001)

    # Warm-up: the runner's threads, imports.
    if contender == "sync":
        op = sync_op()
        for p in names[:16]:
            op(p)
    else:
        op = make_op(ctx)
        for p in names[:16]:
            await op(p)
    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.005)
    stall[0] = 0.0
    total = [0]
    t0 = time.perf_counter()
    if contender == "sync":
        for p in names:
            r = op(p)
            total[0] += len(r) if isinstance(r, bytes) else 1
    else:
        it = iter(names)

        async def worker():
            for p in it:
                r = await op(p)
                total[0] += len(r) if isinstance(r, bytes) else 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(0.003)
    stop[0] = True
    await tick
    if contender == "sync":
        stall[0] = max(stall[0], elapsed)
    if ctx is not None:
        ctx.close()
    out = {"elapsed": elapsed, "files": len(names), "stall": stall[0], "units": total[0]}
    print(json.dumps(out))


asyncio.run(main())
"""


# ---------------------------------------------------------------------------
# parent side


def default_python() -> str:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "caio-bench"
    for venv in sorted(cache.glob("tools-*")):
        py = venv / "bin" / "python"
        if py.exists():
            return str(py)
    return sys.executable


def make_files(base: Path, size: int, n: int) -> list[str]:
    d = base / f"files-{size}-{n}"
    marker = d / ".complete"
    names = [str(d / f"{i // 1000:03d}" / f"f{i:05d}") for i in range(n)]
    if not marker.exists():
        payload = os.urandom(size)
        for name in names:
            os.makedirs(os.path.dirname(name), exist_ok=True)
            Path(name).write_bytes(payload)
        marker.write_text("ok")
    return names


def drop_cache(names: list[str]) -> None:
    for name in names:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_cell(args: argparse.Namespace, scenario: str, contender: str, names: list[str]) -> dict:
    listing = Path(args.data_dir) / f"list-{scenario}.txt"
    listing.write_text("\n".join(names))
    if scenario.endswith("-cold"):
        drop_cache(names)
    else:
        # Page-cached: read everything once.
        if scenario.startswith("read"):
            for n in names:
                Path(n).read_bytes()
    env = dict(os.environ)
    extra = [str(ROOT)]
    if args.extra_path:
        extra.append(args.extra_path)
    env["PYTHONPATH"] = os.pathsep.join(extra + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("CAIO_IMPL", None)
    proc = subprocess.run(
        [args.python, "-c", CHILD, scenario, contender, str(args.concurrency), str(listing)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd="/",
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--python", default=default_python())
    ap.add_argument("--extra-path", default="", help="added to the children's sys.path (aiofile)")
    ap.add_argument("--data-dir", default=str(ROOT / "benchmark" / "results" / "tmp" / "pathops"))
    ap.add_argument("--json", default="", help="write the raw results here")
    args = ap.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    print(
        f"# python {args.python}; load {os.getloadavg()}; files {args.files}, c={args.concurrency}"
    )
    results: dict[tuple[str, str], list[dict]] = {}
    for scenario in args.scenarios.split(","):
        kind = scenario.split("-")[0]
        size = 64 * 1024 if "64k" in scenario else 4096
        if kind == "write":
            base = Path(args.data_dir) / "written"
            base.mkdir(parents=True, exist_ok=True)
            for i in range(args.files // 1000 + 1):
                (base / f"{i:03d}").mkdir(exist_ok=True)
            names = [str(base / f"{i // 1000:03d}" / f"w{i:05d}") for i in range(args.files)]
        else:
            names = make_files(Path(args.data_dir), size, args.files)
        contenders = [f"ours.{b}" for b in args.backends.split(",") if b]
        contenders += ["to_thread", "sync"]
        if kind == "read":
            contenders += ["aiofiles", "anyio", "aiofile"]
        for rep in range(args.repeat):
            order = contenders[rep % len(contenders) :] + contenders[: rep % len(contenders)]
            for contender in order:
                r = run_cell(args, scenario, contender, names)
                results.setdefault((scenario, contender), []).append(r)
        print_table(scenario, contenders, results)
    if args.json:
        Path(args.json).write_text(
            json.dumps({f"{s}|{c}": v for (s, c), v in results.items()}, indent=1)
        )
    return 0


def print_table(scenario: str, contenders: list[str], results: dict) -> None:
    def rate(c: str) -> float | None:
        runs = [r for r in results.get((scenario, c), []) if "elapsed" in r]
        if not runs:
            return None
        return statistics.median(r["files"] / r["elapsed"] for r in runs)

    def stall(c: str) -> float | None:
        runs = [r for r in results.get((scenario, c), []) if "stall" in r]
        return max(r["stall"] for r in runs) * 1000 if runs else None

    base = rate("to_thread")
    print(f"\n## {scenario}")
    print(f"{'contender':24} {'files/s':>10} {'vs to_thread':>13} {'max stall ms':>13}")
    for c in contenders:
        v = rate(c)
        if v is None:
            errs = [r.get("error") for r in results.get((scenario, c), [])]
            print(f"{c:24} {'error':>10}  {errs[0] if errs else ''}")
            continue
        ratio = f"{v / base:.2f}x" if base else "n/a"
        print(f"{c:24} {v:10.0f} {ratio:>13} {stall(c):13.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    t = time.time()
    rc = main()
    print(f"\n# {time.time() - t:.0f} s")
    sys.exit(rc)
