#!/usr/bin/env python3
"""Quick side-by-side benchmark of the io_uring asyncio adapter: ours vs upstream.

Every measurement runs in its own subprocess, from a temporary working
directory (so the repository's ``caio/`` never shadows the installed package):
ours with ``<worktree>/.venv/bin/python`` (editable install), upstream with
``/work/venvs/upstream/bin/python`` (caio 0.12.10). Scenarios, 4 KiB reads:

* ``cached``  random reads of a page-cached file, concurrency 1 and 64;
* ``cold``    random reads of distinct pages right after
              ``fsync`` + ``posix_fadvise(DONTNEED)``, concurrency 64;
* ``direct``  random reads of a file opened with ``O_DIRECT``, concurrency 64,
              next to ``fio --ioengine=io_uring --iodepth=64`` on the same file;
* ``floor``   the asyncio floor: a future resolved by ``loop.call_soon``.

Configurations: ``default`` (``AsyncioContext()``), ``sqpoll0``/``sqpoll1``
(explicit ``sqpoll=``), ``deferred`` (``deferred=True``). Each figure is the
best of ``--repeat`` runs (cold: the median, each run on freshly evicted pages).

    .venv/bin/python benchmark/uring_quick.py            # everything
    .venv/bin/python benchmark/uring_quick.py --only cached --repeat 5

The test file lives in /var/tmp (must be a real disk, not tmpfs).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OURS = os.path.join(ROOT, ".venv", "bin", "python")
UPSTREAM = "/work/venvs/upstream/bin/python"
FILE = "/var/tmp/caio-uring/bench.bin"
FILE_SIZE = 1 << 30
BLOCK = 4096

CONFIGS = {
    "default": {},
    "sqpoll0": {"sqpoll": False},
    "sqpoll1": {"sqpoll": True},
    "deferred": {"deferred": True},
}


# ---------------------------------------------------------------------------
# child side


def offsets(count, seed, distinct):
    """Block-aligned pseudo-random offsets; ``distinct``: no page twice."""
    import random

    rnd = random.Random(seed)
    blocks = FILE_SIZE // BLOCK
    if distinct:
        picked = rnd.sample(range(blocks), count)
    else:
        picked = [rnd.randrange(blocks) for _ in range(count)]
    return [b * BLOCK for b in picked]


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(cfg):
    import asyncio

    scenario, conc, per_task = cfg["scenario"], cfg["conc"], cfg["per_task"]
    total = conc * per_task

    if scenario == "floor":

        async def floor_worker():
            loop = asyncio.get_running_loop()
            for _ in range(per_task):
                fut = loop.create_future()
                loop.call_soon(fut.set_result, None)
                await fut

        async def floor_main():
            t0 = time.perf_counter()
            await asyncio.gather(*(floor_worker() for _ in range(conc)))
            return time.perf_counter() - t0

        runs = [asyncio.run(floor_main()) for _ in range(cfg["repeat"])]
        return {"ops_per_s": total / min(runs)}

    from caio import linux_uring_asyncio

    flags = os.O_RDONLY | (os.O_DIRECT if scenario == "direct" else 0)
    fd = os.open(FILE, flags)
    kwargs = dict(CONFIGS[cfg["config"]])
    results = []
    errors = 0

    import resource

    cpu = []

    async def run_once(offs):
        nonlocal errors
        ctx = linux_uring_asyncio.AsyncioContext(512, **kwargs)
        chunks = [offs[i::conc] for i in range(conc)]

        async def worker(chunk):
            nonlocal errors
            read = ctx.read
            for off in chunk:
                try:
                    data = await read(BLOCK, fd, off)
                except (OSError, SystemError):
                    errors += 1
                    continue
                if len(data) != BLOCK:
                    errors += 1

        # warm-up (also lets SQPOLL's kernel thread start)
        await worker(chunks[0][:50])
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in chunks))
        el = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(
            (
                (r1.ru_utime - r0.ru_utime) * 1e6 / (len(offs) - 50),
                (r1.ru_stime - r0.ru_stime) * 1e6 / (len(offs) - 50),
            )
        )
        ctx.close()
        return el

    for r in range(cfg["repeat"]):
        if scenario == "cold":
            offs = offsets(total + 50, 1000 + r, distinct=True)
            evict(FILE)
            time.sleep(0.2)
        else:
            offs = offsets(total + 50, r, distinct=False)
        results.append(total / asyncio.run(run_once(offs)))
    os.close(fd)
    fig = statistics.median(results) if scenario == "cold" else max(results)
    user, sys_ = min(cpu, key=lambda c: c[0] + c[1])
    return {
        "ops_per_s": fig,
        "runs": results,
        "errors": errors,
        "cpu_us_per_op": [round(user, 2), round(sys_, 2)],
        "sqpoll_allowed": bool(getattr(linux_uring_asyncio, "SQPOLL_ALLOWED", False)),
    }


# ---------------------------------------------------------------------------
# parent side


def ensure_file():
    os.makedirs(os.path.dirname(FILE), exist_ok=True)
    fstype = subprocess.run(
        ["stat", "-f", "-c", "%T", os.path.dirname(FILE)], capture_output=True, text=True
    ).stdout.strip()
    if fstype in ("tmpfs", "ramfs"):
        sys.exit(f"{FILE} is on {fstype}; use a real disk")
    if not os.path.exists(FILE) or os.path.getsize(FILE) != FILE_SIZE:
        with open(FILE, "wb") as f:
            for _ in range(FILE_SIZE >> 20):
                f.write(os.urandom(1 << 20))


def warm_cache():
    with open(FILE, "rb") as f:
        while f.read(1 << 24):
            pass


def run_child(python, cfg, timeout=300):
    with tempfile.TemporaryDirectory(prefix="uring-bench-") as cwd:
        p = subprocess.run(
            [python, os.path.abspath(__file__), "--child", json.dumps(cfg)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def fio_iops(runtime):
    if shutil.which("fio") is None:
        return None
    p = subprocess.run(
        [
            "fio",
            "--name=randread",
            f"--filename={FILE}",
            "--direct=1",
            "--rw=randread",
            f"--bs={BLOCK}",
            "--ioengine=io_uring",
            "--iodepth=64",
            f"--runtime={runtime}",
            "--time_based",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        return None
    return json.loads(p.stdout)["jobs"][0]["read"]["iops"]


def fmt(r):
    if "error" in r:
        return "FAILED: " + r["error"][:60]
    s = f"{r['ops_per_s'] / 1000:8.1f}k"
    if "cpu_us_per_op" in r:
        u, k = r["cpu_us_per_op"]
        s += f"   cpu/op {u:5.2f}us user + {k:5.2f}us sys"
    if r.get("errors"):
        s += f" ({r['errors']} op errors)"
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child")
    ap.add_argument(
        "--only",
        default="floor,cached,cold,direct",
        help="comma-separated scenarios (floor, cached, cold, direct)",
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ours", default=OURS)
    ap.add_argument("--upstream", default=UPSTREAM)
    ap.add_argument(
        "--configs",
        default="default,sqpoll0,sqpoll1",
        help="configurations to run for both implementations",
    )
    ap.add_argument("--fio-runtime", type=int, default=5)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    only = args.only.split(",")
    configs = args.configs.split(",")
    ensure_file()
    print(f"# uptime: {os.popen('uptime').read().strip()}")
    print(f"# ours: {args.ours}\n# upstream: {args.upstream}")
    rows = []

    def measure(label, python, cfg):
        r = run_child(python, dict(cfg, repeat=args.repeat))
        rows.append((label, cfg, r))
        print(f"{label:<34} {fmt(r)}", flush=True)
        return r

    if "floor" in only:
        for conc, per in ((1, 100_000), (64, 3_000)):
            measure(
                f"floor c={conc}", args.ours, {"scenario": "floor", "conc": conc, "per_task": per}
            )
    if "cached" in only:
        warm_cache()
        for conc, per in ((1, 100_000), (64, 3_000)):
            for impl, python in (("upstream", args.upstream), ("ours", args.ours)):
                for config in configs:
                    measure(
                        f"cached c={conc} {impl} {config}",
                        python,
                        {"scenario": "cached", "conc": conc, "per_task": per, "config": config},
                    )
    if "cold" in only:
        for impl, python in (("upstream", args.upstream), ("ours", args.ours)):
            for config in configs:
                measure(
                    f"cold c=64 {impl} {config}",
                    python,
                    {"scenario": "cold", "conc": 64, "per_task": 400, "config": config},
                )
    if "direct" in only:
        iops = fio_iops(args.fio_runtime)
        print(f"{'fio io_uring iodepth=64 O_DIRECT':<34} {(iops or 0) / 1000:8.1f}k", flush=True)
        for impl, python in (("upstream", args.upstream), ("ours", args.ours)):
            for config in configs:
                r = measure(
                    f"direct c=64 {impl} {config}",
                    python,
                    {"scenario": "direct", "conc": 64, "per_task": 1_000, "config": config},
                )
                if iops and "ops_per_s" in r and not r.get("errors"):
                    print(f"{'':<34} = {r['ops_per_s'] / iops:.0%} of fio", flush=True)
    print(f"# uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
