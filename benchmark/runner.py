"""``python -m benchmark``: caio (ours) vs upstream caio 0.12.10 vs the peers.

See benchmark/README.md.  The runner itself only needs the standard library;
every contender is measured in its own subprocess running benchmark/driver.py.
"""

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from . import envs, plan, report
from .envs import log
from .plan import MODES, fmt_size

CSV_FIELDS = [
    "run_id",
    "timestamp",
    "mode",
    "rep",
    "scenario",
    "cache",
    "pattern",
    "op",
    "chunk",
    "concurrency",
    "contender",
    "family",
    "backend",
    "variant",
    "label",
    "python",
    "lib_version",
    "status",
    "error",
    "ops",
    "bytes",
    "wall_s",
    "ops_per_s",
    "mb_per_s",
    "lat_p50_us",
    "lat_p99_us",
    "lat_p999_us",
    "lat_max_us",
    "cpu_s",
    "cpu_us_per_op",
    "user_s",
    "sys_s",
    "max_stall_ms",
    "stall_method",
    "sqpoll",
    "max_requests",
    "evicted",
    "evict_ms",
    "resident",
    "load1",
    "load5",
    "load15",
    "seed",
    "file_size",
    "warmup_s",
    "measure_s",
]


# Typical files per second of a ``files`` cell on the 2-core reference machine (estimate).
FILES_PER_S = {
    "caio": 30000,
    "executor": 6000,
    "sync": 15000,
    "aiofiles": 4000,
    "anyio": 4000,
    "aiofile": 3500,
}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmark",
        description="Benchmark caio (ours) against upstream caio 0.12.10, aiofiles, anyio, "
        "run_in_executor, a sync loop, the asyncio floor and fio.",
    )
    m = p.add_mutually_exclusive_group()
    m.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="target cells, issue rows + short sweeps (about 6.5 minutes)",
    )
    m.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="every scenario and sweep point (default; about 35 minutes)",
    )
    m.add_argument(
        "--smoke",
        dest="mode",
        action="store_const",
        const="smoke",
        help="a few seconds, tiny file, 1 repetition: plumbing check for CI",
    )
    p.set_defaults(mode="full")
    p.add_argument(
        "--ours-python",
        default=sys.executable,
        help="interpreter whose importable caio is 'ours' (default: this one)",
    )
    p.add_argument(
        "--base-python",
        default=None,
        help="a second build of ours to compare with (e.g. main's venv): its backends run as "
        "'base.*' contenders in the same run, and the summary gets an ours / base table",
    )
    p.add_argument("--only", default="", help="comma-separated globs of contender ids to keep")
    p.add_argument("--skip", default="", help="comma-separated globs of contender ids to drop")
    p.add_argument(
        "--scenarios", default="", help="comma-separated globs of scenario names to keep"
    )
    p.add_argument("--reps", type=int, help="repetitions (round-robin over contenders)")
    p.add_argument("--measure", type=float, help="seconds measured per cell")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per cell")
    p.add_argument("--file-size", help="test file size, e.g. 256M, 1G")
    p.add_argument(
        "--data-dir",
        default=os.path.join(envs.HERE, "results", "tmp"),
        help="directory for the test files (must be a real disk, not tmpfs)",
    )
    p.add_argument("--allow-tmpfs", action="store_true", help="do not refuse a tmpfs data dir")
    p.add_argument("--out", default=os.path.join(envs.HERE, "results"), help="results root")
    p.add_argument("--no-latest", action="store_true", help="do not update results/latest/")
    p.add_argument("--cache-dir", default=None, help="venv cache (default ~/.cache/caio-bench)")
    p.add_argument("--no-upstream", action="store_true", help="skip upstream caio 0.12.10")
    p.add_argument(
        "--no-peers", action="store_true", help="skip aiofiles/anyio/executor/sync/floor/fio"
    )
    p.add_argument("--no-fio", action="store_true", help="skip fio")
    p.add_argument(
        "--no-extras",
        action="store_true",
        help="no uvloop and aiofile-on-top rows for the caio contenders (and no extras dir)",
    )
    p.add_argument("--no-install", action="store_true", help="never apt-get install fio")
    p.add_argument("--no-charts", action="store_true", help="skip PNG charts")
    p.add_argument("--seed", type=int, default=20251121, help="base seed for the offsets")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="minutes; shorten the measured time per cell if the estimate exceeds it "
        "(full mode default: 35; ignored when --measure is given)",
    )
    p.add_argument(
        "--stall-method",
        choices=("selector", "ticker"),
        default="selector",
        help="event-loop stall probe (see README); 'ticker' = asyncio.sleep(0) task",
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------ helpers


def _fmt_dur(s):
    s = int(s)
    return (
        "%d:%02d" % (s // 60, s % 60)
        if s < 3600
        else "%d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60)
    )


def _si(x):
    if x is None:
        return "-"
    for unit, f in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return "%.1f%s" % (x / f, unit)
    return "%.0f" % x


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Runner:
    def __init__(self, args, mode, files, contenders, meta, out_dir):
        self.args = args
        self.mode = mode
        self.files = files
        self.contenders = contenders
        self.meta = meta
        self.out_dir = out_dir
        self.region = mode.file_size
        self.rows = []
        self.csv_path = os.path.join(out_dir, "results.csv")
        self._csv_file = open(self.csv_path, "w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        self._csv.writeheader()
        self.tmp = tempfile.mkdtemp(prefix="caio-bench-")
        self.proc = None

    # ---------------------------------------------------------------- plan

    def scenarios(self):
        out = self.mode.scenarios
        if self.args.scenarios:
            import fnmatch

            pats = [p.strip() for p in self.args.scenarios.split(",") if p.strip()]
            out = [s for s in out if any(fnmatch.fnmatch(s.name, p) for p in pats)]
        return out

    def batches(self):
        """Round-robin: every repetition walks every scenario, and within a
        scenario every contender in turn; the contender order rotates with
        the repetition so no contender is always first after an eviction."""
        out = []
        for rep in range(self.mode.reps):
            for scen in self.scenarios():
                here = [c for c in self.contenders if c.points(self.mode, scen)]
                if not here:
                    continue
                k = rep % len(here)
                for c in here[k:] + here[:k]:
                    cells = [
                        plan.Cell(
                            scen, ch, conc, rep, plan.cell_seed(self.args.seed, rep, scen, ch)
                        )
                        for ch, conc in c.points(self.mode, scen)
                    ]
                    out.append((rep, scen, c, cells))
        return out

    def cell_timeout(self):
        """(asyncio-level timeout of a timed phase, hard per-cell limit)."""
        t = max(10.0, 20 * (self.mode.warmup + self.mode.measure))
        return t, 2 * t + 20

    def estimate(self, batches):
        """Seconds, from overheads measured on the 2-core reference machine."""
        per_cell = self.mode.warmup + self.mode.measure + 0.1
        t = 0.0
        for _, _scen, c, cells in batches:
            t += 0.15 if c.kind != "fio" else 0.0  # interpreter start + imports
            for cell in cells:
                if cell.scenario.pattern == "files":  # work-bounded: files ÷ a typical rate
                    t += 0.3 + self.mode.files / FILES_PER_S.get(c.kind, 5000)
                    continue
                t += per_cell + (0.25 if c.kind == "fio" else 0.0)
                t += 0.15 * cell.concurrency / 1024 if c.kind in ("aiofiles", "anyio") else 0.0
        return t

    # ------------------------------------------------------------- running

    def _base_row(self, c, cell):
        s = cell.scenario
        load = envs.loadavg()
        return {
            "run_id": self.meta["run_id"],
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "mode": self.mode.name,
            "rep": cell.rep,
            "scenario": s.name,
            "cache": s.cache,
            "pattern": s.pattern,
            "op": s.op,
            "chunk": cell.chunk,
            "concurrency": cell.concurrency,
            "contender": c.id,
            "family": c.family,
            "backend": c.backend or "",
            "variant": c.variant,
            "label": c.label,
            "python": c.python or "",
            "lib_version": c.version or "",
            "load1": load[0],
            "load5": load[1],
            "load15": load[2],
            "seed": cell.seed,
            "file_size": self.mode.file_size,
            "warmup_s": self.mode.warmup,
            "measure_s": self.mode.measure,
            "stall_method": (
                "" if c.kind in ("sync", "fio") or c.params.get("loop") else self.args.stall_method
            ),
        }

    def _emit(self, row):
        self.rows.append(row)
        self._csv.writerow(row)
        self._csv_file.flush()

    def _cell_spec(self, cell):
        t, hard = self.cell_timeout()
        if cell.scenario.pattern == "files":  # work-bounded: allow 500 files/s at worst
            t = max(t, self.mode.files / 500)
            hard = 2 * t + 20
        return {
            "id": cell.id,
            "cache": cell.scenario.cache,
            "pattern": cell.scenario.pattern,
            "op": cell.scenario.op,
            "chunk": cell.chunk,
            "concurrency": cell.concurrency,
            "max_requests": cell.concurrency,
            "seed": cell.seed,
            "offsets": self.mode.offsets,
            "files": self.mode.files,
            "warmup": self.mode.warmup,
            "measure": self.mode.measure,
            "timeout": t,
            "hard_timeout": hard,
        }

    def run_driver_batch(self, c, cells):
        """Run ``cells`` for contender ``c`` in its own interpreter.  A crash or
        hang fails the cell it happened in (with the error text) and the
        remaining cells continue in a fresh process."""
        pending = list(cells)
        results = {}
        env = dict(os.environ)
        env.pop("CAIO_IMPL", None)
        env["PYTHONHASHSEED"] = "0"
        if c.family != "ours":
            env.pop("PYTHONPATH", None)
        while pending:
            spec = {
                "contender": {"id": c.id, "kind": c.kind, "params": c.params},
                "files": self.files,
                "region": self.region,
                "files_dir": os.path.join(os.path.abspath(self.args.data_dir), "files"),
                "stall_method": self.args.stall_method,
                "cells": [self._cell_spec(x) for x in pending],
            }
            spec_path = os.path.join(self.tmp, "spec.json")
            out_path = os.path.join(self.tmp, "out.jsonl")
            err_path = os.path.join(self.tmp, "stderr.txt")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            open(out_path, "w").close()
            budget = sum(self._cell_spec(x)["hard_timeout"] for x in pending) + 30
            with open(err_path, "w") as err:
                self.proc = subprocess.Popen(
                    envs.python_cmd(c.python) + [envs.DRIVER, "run", spec_path, out_path],
                    cwd=self.tmp,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    start_new_session=True,
                )
                killed = False
                try:
                    rc = self.proc.wait(timeout=budget)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    rc = self.proc.wait()
                    killed = True
                finally:
                    self.proc = None
            with open(out_path) as f:
                for line in f:
                    line = line.strip()
                    if line:
                        r = json.loads(line)
                        results[r["id"]] = r
            remaining = [x for x in pending if x.id not in results]
            if remaining:
                with open(err_path, errors="replace") as f:
                    tail = "\n".join(
                        ln for ln in f.read().splitlines() if not ln.startswith("cell ")
                    )[-1500:]
                why = (
                    "killed after %.0f s" % budget if killed else "driver exited with code %s" % rc
                )
                results[remaining[0].id] = {
                    "status": "fail",
                    "error": "%s: %s" % (why, tail.strip()),
                }
                pending = remaining[1:]
                if killed or "Timeout (" in tail:  # a hang: do not wait for it again and again
                    for x in pending:
                        results[x.id] = {
                            "status": "fail",
                            "error": "not run: an earlier cell of this "
                            "contender hung in the same batch (%s)" % remaining[0].id,
                        }
                    pending = []
            else:
                pending = []
        return results

    def run_fio_batch(self, c, cells):
        results = {}
        eng = c.params["ioengine"]
        for cell in cells:
            s = cell.scenario
            rw = {
                ("read", "rand"): "randread",
                ("read", "seq"): "read",
                ("write", "rand"): "randwrite",
                ("write", "seq"): "write",
            }[(s.op, s.pattern)]
            path = self.files[s.op]
            evict(path)
            cmd = [
                c.params["fio"],
                "--name=caio-bench",
                "--filename=%s" % path,
                "--size=%d" % self.region,
                "--direct=1",
                "--rw=%s" % rw,
                "--bs=%d" % cell.chunk,
                "--iodepth=%d" % cell.concurrency,
                "--ioengine=%s" % eng,
                "--ramp_time=%dms" % max(1, int(self.mode.warmup * 1000)),
                "--runtime=%dms" % max(1, int(self.mode.measure * 1000)),
                "--time_based",
                "--randseed=%d" % cell.seed,
                "--norandommap",
                "--lat_percentiles=1",
                "--percentile_list=50:99:99.9",
                "--output-format=json",
            ]
            t, _ = self.cell_timeout()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=t + 30)
                if p.returncode != 0:
                    raise RuntimeError(
                        "fio exit %d: %s" % (p.returncode, (p.stderr or p.stdout).strip()[-800:])
                    )
                data = json.loads(p.stdout[p.stdout.index("{") :])
                job = data["jobs"][0]
                if job.get("error"):
                    raise RuntimeError("fio job error %s" % job["error"])
                side = job[s.op]
                ios = side["total_ios"]
                wall = side["runtime"] / 1e3
                pct = side.get("lat_ns", {}).get("percentile") or side.get("clat_ns", {}).get(
                    "percentile", {}
                )

                def pk(q, pct=pct):
                    for k, v in pct.items():
                        if abs(float(k) - q) < 1e-6:
                            return v / 1e3
                    return None

                cpu = (
                    (job["usr_cpu"] + job["sys_cpu"])
                    / 100.0
                    * job.get("job_runtime", side["runtime"])
                    / 1e3
                )
                results[cell.id] = {
                    "status": "ok",
                    "ops": ios,
                    "bytes": ios * cell.chunk,
                    "wall_s": wall,
                    "ops_per_s": ios / wall if wall else None,
                    "mb_per_s": ios * cell.chunk / wall / 1e6 if wall else None,
                    "lat_p50_us": pk(50),
                    "lat_p99_us": pk(99),
                    "lat_p999_us": pk(99.9),
                    "lat_max_us": side.get("lat_ns", {}).get("max", 0) / 1e3 or None,
                    "cpu_s": cpu,
                    "cpu_us_per_op": cpu / ios * 1e6 if ios else None,
                    "user_s": job["usr_cpu"] / 100.0 * wall,
                    "sys_s": job["sys_cpu"] / 100.0 * wall,
                    "max_stall_ms": None,
                    "info": {"command": " ".join(cmd)},
                }
            except Exception as e:
                results[cell.id] = {"status": "fail", "error": "%s: %s" % (type(e).__name__, e)}
        return results

    def run(self):
        batches = self.batches()
        total_cells = sum(len(b[3]) for b in batches)
        est = self.estimate(batches)
        budget = self.args.budget if self.args.budget is not None else self.mode.budget
        if budget and est > budget * 60 and self.args.measure is None:
            # keep the promised wall time: shorten the measured window (never below 0.1 s)
            fixed = est - total_cells * self.mode.measure
            new = min(self.mode.measure, max(0.1, (budget * 60 - fixed) / total_cells))
            if new < self.mode.measure:
                log(
                    "plan: estimate %s exceeds the %g min budget -> "
                    "measuring %.3f s per cell instead of %.3f s"
                    % (_fmt_dur(est), budget, new, self.mode.measure)
                )
                self.mode.measure = round(new, 3)
                self.meta["params"]["measure_s"] = self.mode.measure
                est = self.estimate(batches)
        log(
            "plan: %d contenders, %d batches, %d cells (%d reps), estimated %s"
            % (len(self.contenders), len(batches), total_cells, self.mode.reps, _fmt_dur(est))
        )
        t_start = time.monotonic()
        done_cells = 0
        for i, (rep, scen, c, cells) in enumerate(batches, 1):
            rows0 = {cell.id: self._base_row(c, cell) for cell in cells}
            if c.kind == "fio":
                results = self.run_fio_batch(c, cells)
            else:
                results = self.run_driver_batch(c, cells)
            summary = []
            nok = 0
            for cell in cells:
                row = rows0[cell.id]
                r = results.get(cell.id) or {"status": "fail", "error": "no result"}
                info = r.pop("info", None) or {}
                row.update({k: v for k, v in r.items() if k in CSV_FIELDS})
                for k in ("sqpoll", "max_requests", "evicted", "evict_ms", "resident"):
                    if k in info:
                        row[k] = info[k]
                if r.get("status") == "ok":
                    nok += 1
                    summary.append(
                        "%s@c%d %s/s"
                        % (fmt_size(cell.chunk), cell.concurrency, _si(r.get("ops_per_s")))
                    )
                else:
                    summary.append("%s@c%d FAIL" % (fmt_size(cell.chunk), cell.concurrency))
                    row["error"] = (row.get("error") or "").replace("\n", " | ")[:1000]
                self._emit(row)
            done_cells += len(cells)
            elapsed = time.monotonic() - t_start
            left = elapsed / done_cells * (total_cells - done_cells) if done_cells else 0
            err = ""
            if nok < len(cells):
                first = next(rows0[x.id] for x in cells if rows0[x.id].get("status") != "ok")
                err = "  [%s]" % (first.get("error") or "")[:90]
            log(
                "[%3d/%d %s, ~%s left] rep %d/%d %-18s %-30s %d/%d ok | %s%s"
                % (
                    i,
                    len(batches),
                    _fmt_dur(elapsed),
                    _fmt_dur(left),
                    rep + 1,
                    self.mode.reps,
                    scen.name,
                    c.id,
                    nok,
                    len(cells),
                    ", ".join(summary[:4]) + (" ..." if len(summary) > 4 else ""),
                    err,
                )
            )
        self.meta["elapsed_s"] = round(time.monotonic() - t_start, 1)

    def close(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self._csv_file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mode = MODES[args.mode]
    if args.reps:
        mode.reps = args.reps
    if args.measure:
        mode.measure = args.measure
    if args.warmup is not None:
        mode.warmup = args.warmup
    if args.file_size:
        mode.file_size = plan.parse_size(args.file_size)
    if mode.file_size < 8 * plan.MiB or mode.file_size % plan.MiB:
        sys.exit("--file-size must be a multiple of 1 MiB and at least 8 MiB")
    t0 = time.monotonic()
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + mode.name
    out_dir = os.path.join(args.out, run_id)
    os.makedirs(out_dir, exist_ok=True)
    log("caio benchmark, mode=%s -> %s" % (mode.name, out_dir))
    log("load: %s" % envs.uptime_text())

    # ---- test files: a real disk, enough space
    os.makedirs(args.data_dir, exist_ok=True)
    mnt, fstype, dev = envs.mount_of(args.data_dir)
    if fstype in ("tmpfs", "ramfs", "overlay") and not args.allow_tmpfs:
        sys.exit(
            "data dir %s is on %s (%s): page-cache/O_DIRECT results would be meaningless; "
            "use --data-dir on a real disk (or --allow-tmpfs)" % (args.data_dir, fstype, mnt)
        )
    need = 2 * mode.file_size + (256 << 20)
    files = {
        op: os.path.join(args.data_dir, "caio-bench-%s-%dM.bin" % (op, mode.file_size >> 20))
        for op in ("read", "write")
    }
    missing = sum(mode.file_size for p in files.values() if not os.path.exists(p))
    free = shutil.disk_usage(args.data_dir).free
    if missing and free < need:
        sys.exit(
            "not enough free space in %s: %d MiB free, need %d MiB"
            % (args.data_dir, free >> 20, need >> 20)
        )
    for op, p in files.items():  # the write file's content is overwritten by the runs
        envs.ensure_data_file(p, mode.file_size, verify_content=(op == "read"))
    eviction = envs.check_eviction(files["read"], mode.file_size)
    log(
        "setup: data on %s (%s, %s), eviction check: %s"
        % (mnt, fstype, dev, "OK" if eviction.get("ok") else "NOT WORKING %s" % eviction)
    )

    # ---- interpreters, venvs, fio
    cache = envs.cache_dir(args.cache_dir)
    ours_py = (
        os.path.abspath(args.ours_python)
        if os.sep in args.ours_python
        else shutil.which(args.ours_python)
    )
    contenders = []
    probes = {}
    # uvloop + aiofile for the caio interpreters (no deps: aiofile must run on their caio)
    extras = None if args.no_extras else envs.extras_dir(ours_py, cache)
    ours_probe = envs.probe(ours_py, extras)
    probes["ours"] = ours_probe
    ci = ours_probe.get("caio") or {}
    if ci.get("importable"):
        log(
            "ours: caio %s from %s (python %s)"
            % (ci.get("version"), ci.get("file") or ci.get("path"), ours_probe.get("python"))
        )
        if ci.get("version") == "0.12.10" or ci.get("dist_version") == "0.12.10":
            log(
                "WARNING: the caio importable by --ours-python reports version 0.12.10 - "
                "is this upstream rather than ours?"
            )
    contenders += plan.caio_contenders("ours", ours_py, ours_probe, log)
    if args.base_python:
        base_py = os.path.abspath(args.base_python)
        probes["base"] = envs.probe(base_py, extras)
        bi = probes["base"].get("caio") or {}
        log("base: caio %s from %s" % (bi.get("version"), bi.get("file") or bi.get("path")))
        contenders += plan.caio_contenders("base", base_py, probes["base"], log)
    if not args.no_upstream:
        try:
            up_py = envs.upstream_venv(ours_py, cache)
            probes["upstream"] = envs.probe(up_py, extras)
            contenders += plan.caio_contenders("upstream", up_py, probes["upstream"], log)
        except subprocess.CalledProcessError as e:
            log("setup: upstream venv failed (%s): no upstream contenders" % e)
    contenders += plan.tagged_contenders(
        contenders, probes, extras, log, loop_and_aiofile=not args.no_extras
    )
    fio = fio_ver = None
    if not args.no_peers:
        if not args.no_fio:
            fio = envs.ensure_fio(install=mode.fio_install and not args.no_install)
            fio_ver = envs.fio_version(fio) if fio else None
            if not fio:
                log("setup: fio not available -> no fio rows")
        try:
            tools_py = envs.tools_venv(ours_py, cache)
            probes["tools"] = envs.probe(tools_py)
            contenders += plan.peer_contenders(tools_py, probes["tools"], fio, fio_ver)
        except subprocess.CalledProcessError as e:
            log("setup: tools venv failed (%s): no peers" % e)
    contenders = plan.select(contenders, args.only, args.skip)
    if not contenders:
        sys.exit("no contenders left")
    log("contenders: " + ", ".join(c.id for c in contenders))

    meta = {
        "run_id": run_id,
        "mode": mode.name,
        "mode_note": mode.note,
        "argv": sys.argv[1:] if argv is None else argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "uptime_start": envs.uptime_text(),
        "loadavg_start": envs.loadavg(),
        "machine": envs.machine_info(),
        "data": {
            "dir": os.path.abspath(args.data_dir),
            "mount": mnt,
            "fstype": fstype,
            "device": dev,
            "block": envs.block_device_info(dev),
            "file_size": mode.file_size,
            "files": files,
            "eviction_check": eviction,
        },
        "params": {
            "reps": mode.reps,
            "warmup_s": mode.warmup,
            "measure_s": mode.measure,
            "offsets_per_cell": mode.offsets,
            "sweep_conc": mode.sweep_conc,
            "files": mode.files,
            "seed": args.seed,
            "stall_method": args.stall_method,
            "scenarios": [
                {"name": s.name, "concs": s.concs, "chunks": s.chunks} for s in mode.scenarios
            ],
        },
        "probes": probes,
        "fio": fio_ver,
        "contenders": [
            {
                "id": c.id,
                "family": c.family,
                "label": c.label,
                "kind": c.kind,
                "backend": c.backend,
                "variant": c.variant,
                "python": c.python,
                "version": c.version,
                "tag": c.tag,
            }
            for c in contenders
        ],
        "setup_s": round(time.monotonic() - t0, 1),
    }

    runner = Runner(args, mode, files, contenders, meta, out_dir)
    interrupted = False
    try:
        runner.run()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured so far")
    finally:
        runner.close()
    meta["interrupted"] = interrupted
    meta["uptime_end"] = envs.uptime_text()
    meta["loadavg_end"] = envs.loadavg()
    meta["total_s"] = round(time.monotonic() - t0, 1)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)

    # ---- report
    report.write_summary(out_dir)
    if not args.no_charts:
        tools = (probes.get("tools") or {}).get("executable")
        py = tools if tools and os.path.exists(tools) else sys.executable
        r = subprocess.run(
            [py, os.path.join(envs.HERE, "report.py"), "charts", out_dir],
            cwd=tempfile.gettempdir(),
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            log("charts failed: %s" % r.stderr.strip()[-800:])
    headline = report.write_summary(out_dir)  # again, now linking the charts
    if mode.name != "smoke" and not args.no_latest and not interrupted:
        latest = os.path.join(args.out, "latest")
        shutil.rmtree(latest, ignore_errors=True)
        shutil.copytree(out_dir, latest)
        log("copied to %s" % latest)
    print(headline)
    log(
        "done in %s; summary: %s"
        % (_fmt_dur(time.monotonic() - t0), os.path.join(out_dir, "summary.md"))
    )
    # Exit status (useful for CI; never about timings): 1 when nothing was measured, when a
    # driver crashed or hung, or when a backend returned wrong/short data.  Ordinary failing
    # cells (e.g. upstream's O_DIRECT EINVAL) are results, not breakage.
    rows = runner.rows
    broken = [
        r
        for r in rows
        if r.get("status") != "ok"
        and str(r.get("error", "")).startswith(
            (
                "driver exited",
                "killed after",
                "CellError: timeout",
                "not run",
                "CellError: wrong data",
                "CellError: short",
            )
        )
    ]
    if interrupted or not any(r.get("status") == "ok" for r in rows) or broken:
        for r in broken[:5]:
            log("BROKEN: %s %s: %s" % (r["contender"], r["scenario"], str(r["error"])[:200]))
        return 1
    return 0
