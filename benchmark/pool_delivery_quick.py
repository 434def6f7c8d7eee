"""thread_aio's direct delivery: delivered operations per second.

A raw ``thread_aio.Context`` (no event loop) runs 4 KiB reads of a page-cached
file; its workers run every callback themselves, attaching to the interpreter
once per operation. That attach is what this measures (DESIGN.md §11.2): batches
of ``--batch`` operations are submitted and waited for until ``--ops`` have
completed; the best of ``--repeat`` runs is printed.

    .venv/bin/python benchmark/pool_delivery_quick.py
    .venv313t/bin/python benchmark/pool_delivery_quick.py --pool-size 8
"""

import argparse
import os
import sys
import tempfile
import threading
import time

from caio import thread_aio


def run(path: str, total: int, batch: int, pool_size: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    ctx = thread_aio.Context(max_requests=batch, pool_size=pool_size)
    lock = threading.Lock()
    left = [0]
    finished = threading.Event()

    def callback(_result: object) -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                finished.set()

    done = 0
    start = time.perf_counter()
    while done < total:
        ops = [thread_aio.Operation.read(4096, fd, 0) for _ in range(batch)]
        for op in ops:
            op.set_callback(callback)
        left[0] = batch
        finished.clear()
        ctx.submit(*ops)
        finished.wait()
        done += batch
    elapsed = time.perf_counter() - start
    ctx.close()
    os.close(fd)
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(prefix="caio-delivery-") as f:
        f.write(b"x" * 4096)
        f.flush()
        best = max(run(f.name, args.ops, args.batch, args.pool_size) for _ in range(args.repeat))
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    print(
        f"Python {sys.version.split()[0]}{'' if gil else ' (GIL off)'}: thread_aio direct "
        f"delivery, pool_size={args.pool_size}: {best / 1000:.1f}k ops/s",
    )


if __name__ == "__main__":
    main()
