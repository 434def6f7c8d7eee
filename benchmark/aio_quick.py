#!/usr/bin/env python3
"""Quick side-by-side benchmark of ``caio.linux_aio_asyncio``: ours vs upstream.

    python benchmark/aio_quick.py [--duration 3] [--repeat 3] [--concurrency 64]
                                  [--ours PY] [--upstream PY] [--file PATH]

Each measurement runs in a fresh subprocess of the given interpreter, started
from a temporary directory so that the repository's ``caio/`` does not shadow
the installed one (ours = the worktree's ``.venv`` with the editable install,
upstream = a venv with caio 0.12.10). Scenarios, 4 KiB random reads at the
given concurrency (tasks awaiting ``ctx.read`` in a loop) plus a ticker task
that records the event loop's longest stall (the longest gap between two
resumptions of ``await asyncio.sleep(0)``):

* ``cached``  the test file is fully in the page cache;
* ``cold``    buffered reads after ``fsync`` + ``POSIX_FADV_DONTNEED``; each
              block is read at most once (a random permutation), so every
              read misses the cache;
* ``direct``  ``O_DIRECT`` reads, compared with
              ``fio --ioengine=libaio --iodepth=<concurrency> --direct=1``
              on the same file (upstream cannot do O_DIRECT: its buffers are
              unaligned, every read fails with EINVAL).

Each max stall is also reported without the time the loop thread spent
runnable but waiting for a CPU (its run-queue wait from
``/proc/thread-self/schedstat``): on a shared 2-core machine any thread can be
preempted for tens of milliseconds, which says nothing about the backend.

The test file lives on a real disk (``/var/tmp``, not tmpfs). Not a timed
test: a measuring tool. Check ``uptime`` first; the machine is shared.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OURS = os.path.join(REPO, ".venv", "bin", "python")
DEFAULT_UPSTREAM = "/work/venvs/upstream/bin/python"
DEFAULT_FILE = "/var/tmp/caio_aio_quick.bin"
FILE_SIZE = 1 << 30
BLOCK = 4096

# Runs in the child interpreter (python -c), cwd = a temporary directory.
WORKER = r"""
import asyncio, json, os, random, sys, time
cfg = json.loads(sys.argv[1])
import caio
from caio.linux_aio_asyncio import AsyncioContext

path, mode, conc, duration = cfg["file"], cfg["mode"], cfg["concurrency"], cfg["duration"]
blocks = os.path.getsize(path) // 4096
flags = os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0)
fd = os.open(path, flags)
if mode == "cold":
    order = list(range(blocks))
    random.Random(cfg["seed"]).shuffle(order)
    it = iter(order)
    next_block = lambda: next(it, None)
else:
    rnd = random.Random(cfg["seed"])
    next_block = lambda: rnd.randrange(blocks)


async def main():
    ctx = AsyncioContext()
    done = 0
    errors = 0
    first_error = None
    stop = time.perf_counter() + duration
    running = True
    stalls = []

    # The loop thread's run-queue wait (ns), from /proc/thread-self/schedstat:
    # a gap minus the time the thread was runnable but not running is the
    # part of the stall the loop itself caused (running code or blocked in a
    # system call), as opposed to CPU contention on a shared machine.
    try:
        sched_fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        rq_wait = lambda: int(os.pread(sched_fd, 64, 0).split()[1])
    except OSError:
        rq_wait = lambda: 0

    async def ticker():
        last = time.perf_counter()
        last_wait = rq_wait()
        worst = worst_own = 0.0
        while running:
            await asyncio.sleep(0)
            now = time.perf_counter()
            wait = rq_wait()
            gap = now - last
            worst = max(worst, gap)
            worst_own = max(worst_own, gap - (wait - last_wait) * 1e-9)
            last, last_wait = now, wait
        stalls.append((worst, worst_own))

    async def worker():
        nonlocal done, errors, first_error
        while time.perf_counter() < stop:
            b = next_block()
            if b is None:
                return
            try:
                data = await ctx.read(4096, fd, b * 4096)
                if len(data) != 4096:
                    raise RuntimeError("short read %d" % len(data))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors += 1
                if first_error is None:
                    first_error = repr(e)
                if errors > 1000:
                    return
                continue
            done += 1

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    elapsed = time.perf_counter() - t0
    running = False
    await tick
    ctx.close()
    return {"ops": done, "errors": errors, "first_error": first_error,
            "elapsed": elapsed, "max_stall_ms": stalls[0][0] * 1e3,
            "max_own_stall_ms": stalls[0][1] * 1e3,
            "ops_per_s": done / elapsed,
            "caio": os.path.dirname(caio.__file__)}

print(json.dumps(asyncio.run(main())))
"""


def make_file(path, size):
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    print(f"creating {path} ({size >> 20} MiB)...", flush=True)
    chunk = os.urandom(1 << 20)
    with open(path + ".tmp", "wb") as f:
        for i in range(size >> 20):
            # vary the content a little so nothing can deduplicate it
            f.write(i.to_bytes(8, "little") + chunk[8:])
    os.replace(path + ".tmp", path)


def warm(path):
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_child(python, cfg):
    with tempfile.TemporaryDirectory(prefix="aio_quick_") as cwd:
        p = subprocess.run(
            [python, "-c", WORKER, json.dumps(cfg)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if p.returncode != 0:
        return {"failed": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def fio_iops(path, conc, duration):
    fio = shutil.which("fio")
    if not fio:
        return None
    p = subprocess.run(
        [
            fio,
            "--name=aio_quick",
            f"--filename={path}",
            "--ioengine=libaio",
            f"--iodepth={conc}",
            "--direct=1",
            "--rw=randread",
            "--bs=4k",
            f"--runtime={duration}",
            "--time_based",
            "--output-format=json",
            "--readonly",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if p.returncode != 0:
        return None
    return json.loads(p.stdout)["jobs"][0]["read"]["iops"]


def fmt(r):
    if "failed" in r:
        return f"FAILED: {r['failed']}"
    s = (
        f"{r['ops_per_s']:>9,.0f} ops/s  max stall {r['max_stall_ms']:7.2f} ms"
        f" (excluding CPU contention {r['max_own_stall_ms']:6.2f} ms)"
    )
    if r.get("errors"):
        s += f"  ({r['errors']} errors, first: {r['first_error']})"
    return s


def median_run(runs):
    ok = [r for r in runs if "failed" not in r and not r.get("errors")]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r["ops_per_s"])
    best = dict(ok[len(ok) // 2])
    best["max_stall_ms"] = max(r["max_stall_ms"] for r in ok)
    best["max_own_stall_ms"] = max(r["max_own_stall_ms"] for r in ok)
    best["all"] = [round(r["ops_per_s"]) for r in ok]
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", default=DEFAULT_OURS)
    ap.add_argument("--upstream", default=DEFAULT_UPSTREAM)
    ap.add_argument("--file", default=DEFAULT_FILE)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--only", choices=["cached", "cold", "direct"], action="append")
    args = ap.parse_args()
    scenarios = args.only or ["cached", "cold", "direct"]
    contenders = [("ours", args.ours), ("upstream", args.upstream)]

    print(f"uptime: {os.popen('uptime').read().strip()}")
    make_file(args.file, FILE_SIZE)
    results = {}
    for mode in scenarios:
        print(f"\n== {mode}: 4 KiB random reads, concurrency {args.concurrency}")
        runs = {name: [] for name, _ in contenders}
        for i in range(args.repeat):
            for name, python in contenders:
                if mode == "direct" and name == "upstream" and i > 0:
                    continue  # it fails immediately; once is enough to show it
                if mode == "cached":
                    warm(args.file)
                elif mode == "cold":
                    evict(args.file)
                cfg = {
                    "file": args.file,
                    "mode": mode,
                    "concurrency": args.concurrency,
                    "duration": args.duration,
                    "seed": 1000 * i + 7,
                }
                r = run_child(python, cfg)
                runs[name].append(r)
                print(f"  run {i + 1} {name:<9} {fmt(r)}", flush=True)
        res = {name: median_run(rs) for name, rs in runs.items()}
        if mode == "direct":
            iops = fio_iops(args.file, args.concurrency, args.duration)
            res["fio"] = iops
        results[mode] = res

    print(f"\nuptime: {os.popen('uptime').read().strip()}")
    print("\n== summary (median of runs; max stall = worst over runs)")
    for mode, res in results.items():
        ours, up = res["ours"], res["upstream"]
        line = f"{mode:<7} ours {fmt(ours)}\n        upstream {fmt(up)}"
        if "failed" not in ours and "failed" not in up and not up.get("errors"):
            line += f"\n        ratio ours/upstream: {ours['ops_per_s'] / up['ops_per_s']:.2f}x"
        if mode == "direct" and res.get("fio"):
            line += f"\n        fio libaio iodepth={args.concurrency}: {res['fio']:,.0f} IOPS"
            if "failed" not in ours:
                line += f"  -> ours = {ours['ops_per_s'] / res['fio'] * 100:.0f}% of fio"
        print(line)
    print()
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
