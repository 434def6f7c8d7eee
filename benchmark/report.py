"""summary.md, details.md and PNG charts from a results directory.

Imported by the runner (summary, standard library only) and run as a script
with the tools venv's interpreter for the charts (needs matplotlib):

    python benchmark/report.py summary benchmark/results/<run>
    python benchmark/report.py charts  benchmark/results/<run>
"""

import csv
import json
import os
import statistics
import sys

NUM = (
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
    "load1",
    "load5",
    "load15",
    "evict_ms",
    "resident",
)
INT = ("rep", "chunk", "concurrency", "file_size")
SMALL = 4096
NOISY = 0.25  # (max - min) / median above this is flagged


# ------------------------------------------------------------------ loading


def load(out_dir):
    rows = []
    with open(os.path.join(out_dir, "results.csv"), newline="") as f:
        for r in csv.DictReader(f):
            for k in NUM:
                r[k] = float(r[k]) if r.get(k) not in (None, "") else None
            for k in INT:
                r[k] = int(r[k]) if r.get(k) not in (None, "") else None
            rows.append(r)
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    return rows, meta


class Stat:
    def __init__(self, rows):
        self.rows = rows
        self.ok = [r for r in rows if r["status"] == "ok"]
        self.fail = [r for r in rows if r["status"] != "ok"]

    @property
    def failed(self):
        return not self.ok and bool(self.fail)

    @property
    def error(self):
        return self.fail[0]["error"] if self.fail else ""

    def vals(self, metric):
        return [r[metric] for r in self.ok if r[metric] is not None]

    def med(self, metric):
        v = self.vals(metric)
        return statistics.median(v) if v else None

    def lo(self, metric):
        v = self.vals(metric)
        return min(v) if v else None

    def hi(self, metric):
        v = self.vals(metric)
        return max(v) if v else None

    def spread(self, metric):
        m = self.med(metric)
        if not m or len(self.vals(metric)) < 2:
            return None
        return (self.hi(metric) - self.lo(metric)) / m


DISPLAY = {
    "peer.run_in_executor": "run_in_executor(os.pread/pwrite)",
    "peer.aiofiles": "aiofiles (seek + read/write)",
    "peer.anyio": "anyio.open_file (seek + read/write)",
    "limit.sync": "sync os.pread/pwrite loop (1 thread)",
    "limit.floor": "asyncio floor (call_soon future)",
    "limit.fio_io_uring": "fio io_uring (O_DIRECT)",
    "limit.fio_libaio": "fio libaio (O_DIRECT)",
}


class Results:
    def __init__(self, rows, meta):
        self.rows, self.meta = rows, meta
        self.groups = {}
        for r in rows:
            self.groups.setdefault(
                (r["scenario"], r["chunk"], r["concurrency"], r["contender"]), []
            ).append(r)
        self.contenders = []
        seen = set()
        for c in meta.get("contenders", []):
            if c["id"] not in seen:
                seen.add(c["id"])
                self.contenders.append(c)
        for c in self.contenders:  # display names are the report's business
            c["label"] = DISPLAY.get(c["id"], c["label"])
        self.labels = {c["id"]: c["label"] for c in self.contenders}
        self.tags = {c["id"]: c.get("tag") or "" for c in self.contenders}
        # the sweeps and their charts: every contender measured across a scenario
        self.sweepers = [c for c in self.contenders if not self.tags[c["id"]]]
        self.scenarios = []
        for r in rows:
            if r["scenario"] not in self.scenarios:
                self.scenarios.append(r["scenario"])
        # the offset scenarios get the generic sweep sections, ratio tables and charts;
        # the whole-file ones (``*-files-*``) have their own section
        self.offset_scenarios = [x for x in self.scenarios if "-files-" not in x]

    def get(self, scen, chunk, conc, cid):
        rows = self.groups.get((scen, chunk, conc, cid))
        if rows is None and cid.startswith("limit.sync"):  # one thread: concurrency does not apply
            rows = self.groups.get((scen, chunk, 1, cid))
        return Stat(rows) if rows else None

    def has(self, cid):
        return any(k[3] == cid for k in self.groups)

    def points(self, scen):
        pts = sorted(
            {
                (k[1], k[2])
                for k in self.groups
                if k[0] == scen and not k[3].startswith("limit.sync") and not self.tags.get(k[3])
            }
        )
        return pts

    def conc_points(self, scen):
        return sorted({c for ch, c in self.points(scen) if ch == SMALL})

    def chunk_points(self, scen):
        sc = self.meta.get("params", {}).get("sweep_conc", 64)
        return sorted({ch for ch, c in self.points(scen) if c == sc})


# --------------------------------------------------------------- formatting


def si(x, unit=""):
    if x is None:
        return "–"
    for suf, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return "%.3g%s%s" % (x / f, suf, unit)
    return "%.3g%s" % (x, unit)


def num(x, digits=3):
    if x is None:
        return "–"
    if x >= 1000:
        return "%.0f" % x
    return "%.*g" % (digits, x)


def fsize(n):
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return "%d MiB" % (n >> 20)
    return "%d KiB" % (n >> 10)


def cell_text(st, metric, fmt=si, spread=True):
    if st is None:
        return ""
    if st.failed:
        return "**FAIL**"
    m = st.med(metric)
    if m is None:
        return "–"
    s = fmt(m)
    if spread and len(st.vals(metric)) > 1:
        s += " <sub>%s–%s</sub>" % (fmt(st.lo(metric)), fmt(st.hi(metric)))
        sp = st.spread(metric)
        if sp is not None and sp > NOISY:
            s += "⚠"
    if st.fail:
        s += " (%d fail)" % len(st.fail)
    return s


def ratio(a, b, metric="ops_per_s"):
    if a is None or b is None:
        return None
    if a.failed or b.failed:
        return None
    x, y = a.med(metric), b.med(metric)
    if x is None or not y:
        return None
    return x / y


def rtext(r, pct=False):
    if r is None:
        return "–"
    if pct:
        return "**%.0f%%**" % (100 * r)
    return "**%.2f×**" % r


def esc(text):
    return (text or "").replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------ targets

CR = "cached-rand-read"
CO = "cold-rand-read"
DR = "direct-rand-read"
MB = 1 << 20


def targets():
    """(group, title, scenario, chunk, conc, ours, reference, metric, kind)."""
    t = []
    a = t.append
    a(
        (
            "thread_aio",
            "4 KiB cached random read, c=1: ours / upstream",
            CR,
            SMALL,
            1,
            "ours.thread_aio",
            "upstream.thread_aio",
            "ops_per_s",
            "x",
        )
    )
    a(
        (
            "thread_aio",
            "4 KiB cached random read, c=64: ours / upstream",
            CR,
            SMALL,
            64,
            "ours.thread_aio",
            "upstream.thread_aio",
            "ops_per_s",
            "x",
        )
    )
    a(
        (
            "thread_aio",
            "4 KiB cached random read, c=64: ours / run_in_executor",
            CR,
            SMALL,
            64,
            "ours.thread_aio",
            "peer.run_in_executor",
            "ops_per_s",
            "x",
        )
    )
    a(
        (
            "thread_aio",
            "4 KiB cached random read, c=64: ours / aiofiles",
            CR,
            SMALL,
            64,
            "ours.thread_aio",
            "peer.aiofiles",
            "ops_per_s",
            "x",
        )
    )
    a(
        (
            "python_aio",
            "4 KiB cached random read, c=64: ours / upstream",
            CR,
            SMALL,
            64,
            "ours.python_aio",
            "upstream.python_aio",
            "ops_per_s",
            "x",
        )
    )
    for c in (1, 64):
        a(
            (
                "linux_uring",
                "4 KiB cached random read, c=%d: ours default / upstream default (SQPOLL)" % c,
                CR,
                SMALL,
                c,
                "ours.linux_uring",
                "upstream.linux_uring",
                "ops_per_s",
                "x",
            )
        )
        a(
            (
                "linux_uring",
                "4 KiB cached random read, c=%d: ours default / upstream sqpoll=False" % c,
                CR,
                SMALL,
                c,
                "ours.linux_uring",
                "upstream.linux_uring.nosqpoll",
                "ops_per_s",
                "x",
            )
        )
    a(
        (
            "linux_uring",
            "4 KiB cold buffered random read, c=64: ours / upstream default",
            CO,
            SMALL,
            64,
            "ours.linux_uring",
            "upstream.linux_uring",
            "ops_per_s",
            "x",
        )
    )
    a(
        (
            "linux_uring",
            "4 KiB cold buffered random read, c=64: ours / upstream sqpoll=False",
            CO,
            SMALL,
            64,
            "ours.linux_uring",
            "upstream.linux_uring.nosqpoll",
            "ops_per_s",
            "x",
        )
    )
    a(
        (
            "linux_uring",
            "4 KiB O_DIRECT random read, c=64: ours / fio io_uring (iodepth 64)",
            DR,
            SMALL,
            64,
            "ours.linux_uring",
            "limit.fio_io_uring",
            "ops_per_s",
            "x",
        )
    )
    a(
        (
            "linux_uring",
            "4 KiB O_DIRECT random read, c=64: ours / upstream (upstream fails: EINVAL)",
            DR,
            SMALL,
            64,
            "ours.linux_uring",
            "upstream.linux_uring",
            "ops_per_s",
            "x",
        )
    )
    a(
        (
            "linux_aio",
            "4 KiB cached random read, c=64: ours / upstream",
            CR,
            SMALL,
            64,
            "ours.linux_aio",
            "upstream.linux_aio",
            "ops_per_s",
            "x",
        )
    )
    a(
        (
            "linux_aio",
            "4 KiB cold buffered random read, c=64: ours / upstream",
            CO,
            SMALL,
            64,
            "ours.linux_aio",
            "upstream.linux_aio",
            "ops_per_s",
            "x",
        )
    )
    a(
        (
            "linux_aio",
            "… same cell, longest event-loop stall (ms): ours / upstream",
            CO,
            SMALL,
            64,
            "ours.linux_aio",
            "upstream.linux_aio",
            "max_stall_ms",
            "stall",
        )
    )
    a(
        (
            "linux_aio",
            "4 KiB O_DIRECT random read, c=64: ours / fio libaio (iodepth 64)",
            DR,
            SMALL,
            64,
            "ours.linux_aio",
            "limit.fio_libaio",
            "ops_per_s",
            "x",
        )
    )
    for b in ("linux_uring", "linux_aio", "thread_aio", "python_aio"):
        a(
            (
                "large reads",
                "1 MiB cached random read, c=64, MB/s: ours %s / sync os.pread loop" % b,
                CR,
                MB,
                64,
                "ours.%s" % b,
                "limit.sync",
                "mb_per_s",
                "pct",
            )
        )
    return t


# ------------------------------------------- the issues' targets (13, 16)

CW = "cached-rand-write"
NATIVE = ("linux_uring", "linux_aio", "thread_aio")


def default_backend(res, family="ours"):
    """What ``from caio import AsyncioContext`` selected in that interpreter (probe)."""
    probe = (res.meta.get("probes") or {}).get(family) or {}
    return (probe.get("caio") or {}).get("default_backend")


def _caio_ids(res, family, tag):
    return [
        c["id"]
        for c in res.contenders
        if c["id"].startswith(family + ".")
        and c.get("kind") == "caio"
        and (c.get("tag") or "") == tag
    ]


def resolve(res, ref, scen, chunk, conc, metric):
    """(contender id, Stat) of a reference: an id, ``("default", family, tag)`` (the
    backend ``from caio import AsyncioContext`` picks) or ``("best", family, tag)``
    (that family's caio contender with the highest median at this cell)."""
    if isinstance(ref, str):
        return ref, res.get(scen, chunk, conc, ref)
    how, family, tag = ref
    if how == "default":
        b = default_backend(res, family)
        if b is None:
            return None, None
        cid = "%s.%s%s" % (family, b, "." + tag if tag else "")
        return cid, res.get(scen, chunk, conc, cid)
    best = (None, None)
    for cid in _caio_ids(res, family, tag):
        st = res.get(scen, chunk, conc, cid)
        if st is None or st.med(metric) is None:
            continue
        if best[1] is None or st.med(metric) > best[1].med(metric):
            best = (cid, st)
    return best


# What the peers do in the ``files`` scenarios (their ids are the offset scenarios' ones).
FILE_LABELS = {
    "peer.run_in_executor": {
        "read": "asyncio.to_thread(Path.read_bytes)",
        "stat": "asyncio.to_thread(os.stat)",
        "write": "asyncio.to_thread(Path.write_bytes)",
    },
    "limit.sync": {
        "read": "sync Path.read_bytes loop",
        "stat": "sync os.stat loop",
        "write": "sync Path.write_bytes loop",
    },
    "peer.aiofiles": {"read": 'aiofiles (async with aiofiles.open(p, "rb") as f: f.read())'},
    "peer.anyio": {"read": "anyio (await anyio.Path(p).read_bytes())"},
    "ours.aiofile": {"read": "aiofile async_open + read (on ours)"},
    "upstream.aiofile": {"read": "aiofile async_open + read (on upstream)"},
}
# (reference, target ratio) of read_file (cold: without the sync loop), stat, write_file
FILE_READ_REFS = (
    ("limit.sync", 1.0),
    ("peer.run_in_executor", 2.0),
    ("peer.aiofiles", 5.0),
    ("peer.anyio", 5.0),
    ("ours.aiofile", None),
)
FILE_OTHER_REFS = (("limit.sync", None), ("peer.run_in_executor", 2.0))


def label_in(res, cid, scen):
    """A contender's name in a scenario: in the ``files`` ones, what the peer does there."""
    if "-files-" in scen and cid in FILE_LABELS:
        return FILE_LABELS[cid].get(scen.split("-")[-1], res.labels.get(cid, cid))
    return res.labels.get(cid, cid)


def files_table(res):
    """The ``files`` scenarios: files per second and the loop's longest stall."""
    pts = sorted({k[:3] for k in res.groups if "-files-" in k[0]})
    if not pts:
        return ""
    hdr = ["contender"] + [
        "%s %s c=%d" % (scen.replace("-files", ""), fsize(ch), c) for scen, ch, c in pts
    ]
    out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for c in res.contenders:
        cells = []
        for scen, ch, conc in pts:
            st = res.get(scen, ch, conc, c["id"])
            if st is None:
                cells.append("")
                continue
            stall = st.med("max_stall_ms")
            cells.append(
                cell_text(st, "ops_per_s", si, spread=False)
                + ("" if stall is None else " <sub>stall %s ms</sub>" % num(stall))
            )
        if any(cells):
            labels = FILE_LABELS.get(c["id"])
            label = " / ".join(labels.values()) if labels else c["label"]
            out.append("| %s | %s |" % (label, " | ".join(cells)))
    return "\n".join(out)


def issue_targets(files_n="10,000"):
    """(issue, title, (ref, scen, chunk, conc), (ref, scen, chunk, conc) | None, metric,
    target): ratio a ÷ b >= target, or (b None) the value of a below the target."""
    t = []
    a = t.append
    dflt = lambda tag="": ("default", "ours", tag)  # noqa: E731
    best = lambda fam, tag="": ("best", fam, tag)  # noqa: E731
    for tag, loop in (("", "asyncio"), ("uvloop", "uvloop")):
        for scen, what in ((CR, "cached random read"), (CW, "buffered random write")):
            for c in (1, 16, 64, 256):
                a(
                    (
                        16,
                        "4 KiB %s, c=%d, %s: default ÷ our best backend" % (what, c, loop),
                        (dflt(tag), scen, SMALL, c),
                        (best("ours", tag), scen, SMALL, c),
                        "ops_per_s",
                        0.95,
                    )
                )
    a(
        (
            16,
            "4 KiB cached random read, c=1: default ÷ sync os.pread loop",
            (dflt(), CR, SMALL, 1),
            ("limit.sync", CR, SMALL, 1),
            "ops_per_s",
            0.55,
        )
    )
    a(
        (
            16,
            "4 KiB cached random read, c=64, uvloop: default ÷ upstream's best",
            (dflt("uvloop"), CR, SMALL, 64),
            (best("upstream", "uvloop"), CR, SMALL, 64),
            "ops_per_s",
            2.0,
        )
    )
    for b in NATIVE:
        a(
            (
                16,
                "4 KiB buffered random write, c=64: ours %s ÷ upstream's best" % b,
                ("ours.%s" % b, CW, SMALL, 64),
                (best("upstream"), CW, SMALL, 64),
                "ops_per_s",
                1.5,
            )
        )
    a(
        (
            16,
            "aiofile on top, 4 KiB random write, c=64: on ours ÷ on upstream",
            ("ours.aiofile", CW, SMALL, 64),
            ("upstream.aiofile", CW, SMALL, 64),
            "ops_per_s",
            1.5,
        )
    )
    a(
        (
            16,
            "aiofile on top, 4 KiB random read, c=64: on ours ÷ on upstream",
            ("ours.aiofile", CR, SMALL, 64),
            ("upstream.aiofile", CR, SMALL, 64),
            "ops_per_s",
            None,
        )
    )
    for ch in (64 * 1024, MB):
        a(
            (
                16,
                "%s cached random read, c=64: default ÷ upstream's best" % fsize(ch),
                (dflt(), CR, ch, 64),
                (best("upstream"), CR, ch, 64),
                "ops_per_s",
                1.0,
            )
        )
        a(
            (
                16,
                "%s cached random read, c=64, MB/s: default ÷ sync os.pread loop" % fsize(ch),
                (dflt(), CR, ch, 64),
                ("limit.sync", CR, ch, 1),
                "mb_per_s",
                0.9,
            )
        )
    a(
        (
            16,
            "4 KiB O_DIRECT random read, c=64: ours thread_aio ÷ ours linux_uring",
            ("ours.thread_aio", DR, SMALL, 64),
            ("ours.linux_uring", DR, SMALL, 64),
            "ops_per_s",
            0.9,
        )
    )
    a(
        (
            16,
            "4 KiB cached random read, c=1: ours python_aio ÷ upstream python_aio",
            ("ours.python_aio", CR, SMALL, 1),
            ("upstream.python_aio", CR, SMALL, 1),
            "ops_per_s",
            1.5,
        )
    )
    a(
        (
            16,
            "4 KiB cold buffered random read, c=64: default ÷ fio O_DIRECT io_uring iodepth 64",
            (dflt(), CO, SMALL, 64),
            ("limit.fio_io_uring", DR, SMALL, 64),
            "ops_per_s",
            0.85,
        )
    )
    a(
        (
            16,
            "… same cell, default's longest event-loop stall (ms)",
            (dflt(), CO, SMALL, 64),
            None,
            "max_stall_ms",
            5.0,
        )
    )
    for scen, ch, refs in (
        ("cached-files-read", SMALL, FILE_READ_REFS),
        ("cached-files-read", 64 * 1024, FILE_READ_REFS),
        ("cold-files-read", SMALL, FILE_READ_REFS[1:]),
        ("cold-files-read", 64 * 1024, FILE_READ_REFS[1:]),
        ("cached-files-stat", SMALL, FILE_OTHER_REFS),
        ("cached-files-write", SMALL, FILE_OTHER_REFS),
    ):
        what = {
            "cached-files-read": "read_file of %s cached %s files" % (files_n, fsize(ch)),
            "cold-files-read": "read_file of %s cold %s files" % (files_n, fsize(ch)),
            "cached-files-stat": "stat of %s files" % files_n,
            "cached-files-write": "write_file (create + write 4 KiB + close) of %s files" % files_n,
        }[scen]
        for ref, target in refs:
            a(
                (
                    14,
                    "%s, c=64: default ÷ %s" % (what, FILE_LABELS[ref][scen.split("-")[-1]]),
                    (dflt(), scen, ch, 64),
                    (ref, scen, ch, 64),
                    "ops_per_s",
                    target,
                )
            )
        a(
            (
                14,
                "… same cell, default's longest event-loop stall (ms)",
                (dflt(), scen, ch, 64),
                None,
                "max_stall_ms",
                5.0,
            )
        )
    for lib in ("trio", "anyio-asyncio", "anyio-trio"):
        for ch, c in ((SMALL, 1), (SMALL, 64), (MB, 64)):
            where = "%s cached random read, c=%d, %s" % (fsize(ch), c, lib)
            a(
                (
                    15,
                    "%s: ours ÷ %s.open_file (seek + read)" % (where, lib.split("-")[0]),
                    ("ours.%s" % lib, CR, ch, c),
                    ("peer.%s.open_file" % lib, CR, ch, c),
                    "ops_per_s",
                    20.0,
                )
            )
            a(
                (
                    15,
                    "%s: ours ÷ our own asyncio (default)" % where,
                    ("ours.%s" % lib, CR, ch, c),
                    (dflt(), CR, ch, c),
                    "ops_per_s",
                    0.8,
                )
            )
    for b in NATIVE:
        ri = "ours.%s.readinto" % b
        a(
            (
                13,
                "1 MiB cached random readinto (reused buffer), c=64, MB/s: ours %s ÷ sync "
                "os.preadv loop into one buffer" % b,
                (ri, CR, MB, 64),
                ("limit.sync.preadv", CR, MB, 1),
                "mb_per_s",
                1.0,
            )
        )
        a(
            (
                13,
                "1 MiB cached random read, c=64: ours %s readinto ÷ read()" % b,
                (ri, CR, MB, 64),
                ("ours.%s" % b, CR, MB, 64),
                "ops_per_s",
                1.3,
            )
        )
        for c in (1, 64):
            a(
                (
                    13,
                    "4 KiB cached random read, c=%d: ours %s readinto ÷ read()" % (c, b),
                    (ri, CR, SMALL, c),
                    ("ours.%s" % b, CR, SMALL, c),
                    "ops_per_s",
                    1.0,
                )
            )
    return t


def issue_targets_md(res):
    out = [
        "| issue | target | ours | reference | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    n = 0
    files_n = "{:,}".format(res.meta.get("params", {}).get("files") or 10000)
    for issue, title, ca, cb, metric, target in issue_targets(files_n):
        ida, sa = resolve(res, ca[0], ca[1], ca[2], ca[3], metric)
        idb, sb = resolve(res, cb[0], cb[1], cb[2], cb[3], metric) if cb else (None, None)
        if (sa is None and sb is None) or (target is None and (sa is None or sb is None)):
            continue  # a cell this mode does not measure (or a reference without data)
        f = fmt_metric(metric)

        def cell(cid, st, scen, f=f, metric=metric):
            if st is None:
                return "n/a"
            txt = cell_text(st, metric, f, spread=False)
            if st.failed:
                txt += " (%s)" % esc(st.error)[:60]
            return "%s: %s" % (label_in(res, cid, scen), txt)

        if cb is None:  # an absolute bound (the stall)
            v = None if sa is None or sa.failed else sa.med(metric)
            rt, tt = "–", "< %g ms" % target
            met = "–" if v is None else ("✔" if v < target else "✘")
        else:
            r = ratio(sa, sb, metric)
            rt = rtext(r)
            tt = "≥ %g×" % target if target is not None else "(reference)"
            met = "–" if r is None or target is None else ("✔" if r >= target else "✘")
        out.append(
            "| %d | %s | %s | %s | %s | %s | %s |"
            % (issue, title, cell(ida, sa, ca[1]), cell(idb, sb, cb[1]) if cb else "", rt, tt, met)
        )
        n += 1
    return "\n".join(out) if n else ""


def family_cells(res):
    """(tag, title, [(contender, scen, chunk, conc)], metric) of the families measured at
    a few points (bar charts and tables): aiofile on top, readinto at 1 MiB, whole files."""
    fams = []
    n = "{:,}".format(res.meta.get("params", {}).get("files") or 10000)
    for scen, title in (
        ("cached-files-read", "read %s cached 4 KiB files, c=64 (files/s)" % n),
        ("cold-files-read", "read %s cold 4 KiB files, c=64 (files/s)" % n),
        ("cached-files-stat", "stat %s files, c=64 (files/s)" % n),
        ("cached-files-write", "create + write 4 KiB + close %s files, c=64 (files/s)" % n),
    ):
        cells = [
            (c["id"], scen, SMALL, 64)
            for c in res.contenders
            if res.get(scen, SMALL, 64, c["id"]) is not None
        ]
        if cells:
            fams.append(("files-" + scen, title, cells, "ops_per_s"))
    cells = [
        (cid, scen, SMALL, 64)
        for scen in (CW, CR)
        for cid in ("ours.aiofile", "upstream.aiofile")
        if res.get(scen, SMALL, 64, cid) is not None
    ]
    if cells:
        fams.append(
            (
                "aiofile",
                "aiofile 3.12.3 on top: 4 KiB random write and read, c=64",
                cells,
                "ops_per_s",
            )
        )
    cells = []
    for b in NATIVE:
        for cid in ("ours.%s" % b, "ours.%s.readinto" % b):
            if res.get(CR, MB, 64, cid) is not None:
                cells.append((cid, CR, MB, 64))
    for cid in ("limit.sync.preadv", "limit.sync"):
        if cells and res.get(CR, MB, 1, cid) is not None:
            cells.append((cid, CR, MB, 1))
    st = [c["id"] for c in res.contenders if c.get("tag") == "structured"]
    st = ["ours.%s" % default_backend(res)] + st
    st_cells = [(cid, CR, SMALL, 64) for cid in st if res.get(CR, SMALL, 64, cid) is not None]
    if len(st_cells) > 1:
        fams.append(
            (
                "structured",
                "trio and anyio: 4 KiB cached random read, c=64 (ops/s; first: ours under asyncio)",
                st_cells,
                "ops_per_s",
            )
        )
    if cells:
        fams.append(
            (
                "readinto",
                "1 MiB cached random read, c=64: readinto vs read() (MB/s)",
                cells,
                "mb_per_s",
            )
        )
    return fams


def tagged_table(res, tag):
    """Every cell of the contenders of one tag (ops/s, median with spread), with the
    asyncio row of the same contender next to each uvloop one; trio/anyio rows also
    show p99 latency and the scheduler's longest stall."""
    ids = [c["id"] for c in res.contenders if (c.get("tag") or "") == tag]
    # (aiofile's files cells are in the files table)
    pts = sorted({k[:3] for k in res.groups if k[3] in ids and "-files-" not in k[0]})
    if not ids or not pts:
        return ""
    hdr = ["contender"] + [
        "%s %s c=%d" % (s.replace("cached-rand-", ""), fsize(ch), c) for s, ch, c in pts
    ]
    out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    rows = []
    for cid in ids:
        if tag == "uvloop":
            rows.append(cid[: -len(".uvloop")])
        rows.append(cid)
    if tag == "structured":  # our own asyncio rows at the same points, for reference
        rows = [c["id"] for c in res.contenders if c["id"] == "ours.%s" % default_backend(res)]
        rows += ids

    def text(st):
        t = cell_text(st, "ops_per_s", si)
        if tag == "structured" and st is not None and st.ok:
            stall = st.med("max_stall_ms")
            t += " <sub>p99 %s µs, stall %s ms</sub>" % (
                num(st.med("lat_p99_us")),
                "–" if stall is None else num(stall),
            )
        return t

    for cid in rows:
        cells = [text(res.get(s, ch, c, cid)) for s, ch, c in pts]
        if any(cells):
            out.append("| %s | %s |" % (res.labels.get(cid, cid), " | ".join(cells)))
    return "\n".join(out)


def fmt_metric(metric):
    if metric == "mb_per_s":
        return lambda x: si(x, " MB/s")
    if metric == "max_stall_ms":
        return lambda x: "%s ms" % num(x)
    return lambda x: si(x, " op/s")


def targets_md(res):
    out = [
        "| area | target | ours | reference | ratio | upstream's ratio |",
        "|---|---|---|---|---|---|",
    ]
    for group, title, scen, chunk, conc, ours, ref, metric, kind in targets():
        a, b = res.get(scen, chunk, conc, ours), res.get(scen, chunk, conc, ref)
        f = fmt_metric(metric)
        if a is None:
            at = "n/a (%s)" % ("not run" if res.has(ours) else "ours not available")
        else:
            at = cell_text(a, metric, f)
        bt = "not measured" if b is None else cell_text(b, metric, f)
        if b is not None and b.failed:
            bt += " (%s)" % esc(b.error)[:80]
        if a is not None and a.failed:
            at += " (%s)" % esc(a.error)[:80]
        r = ratio(a, b, metric)
        # the same comparison for upstream's backend: the bar ours has to clear
        up = ours.replace("ours.", "upstream.", 1)
        if ref.startswith("upstream."):
            ut = ""
        else:
            su = res.get(scen, chunk, conc, up)
            ut = (
                "upstream **FAIL**"
                if su is not None and su.failed
                else rtext(ratio(su, b, metric), kind == "pct")
            )
        out.append(
            "| %s | %s | %s | %s | %s | %s |" % (group, title, at, bt, rtext(r, kind == "pct"), ut)
        )
    return "\n".join(out)


def baseline_md(res):
    """Upstream and peers at the target cells (useful before ours exists)."""
    cells = [(CR, SMALL, 1), (CR, SMALL, 64), (CO, SMALL, 64), (DR, SMALL, 64), (CR, MB, 64)]
    cells = [c for c in cells if any(k[:3] == c for k in res.groups)]
    if not cells:
        return ""
    head = ["contender"] + ["%s %s c=%d" % (s, fsize(ch), c) for s, ch, c in cells]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in res.contenders:
        cid = c["id"]
        row = [c["label"]]
        any_ = False
        for s, ch, conc in cells:
            st = res.get(s, ch, conc, cid)
            metric = "mb_per_s" if ch >= MB else "ops_per_s"
            row.append(cell_text(st, metric, fmt_metric(metric)) if st else "")
            any_ = any_ or st is not None
        if any_:
            out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


# ------------------------------------------------------------------ tables


def sweep_table(res, scen, metric, axis):
    pts = res.conc_points(scen) if axis == "conc" else res.chunk_points(scen)
    if not pts:
        return ""
    sc = res.meta.get("params", {}).get("sweep_conc", 64)
    hdr = ["contender"] + (["c=%d" % p for p in pts] if axis == "conc" else [fsize(p) for p in pts])
    out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    f = fmt_metric(metric) if metric in ("ops_per_s", "mb_per_s", "max_stall_ms") else num
    for c in res.sweepers:
        if c["id"] == "limit.floor" and axis == "chunk":
            continue
        row, any_ = [c["label"]], False
        for p in pts:
            st = (
                res.get(scen, SMALL, p, c["id"])
                if axis == "conc"
                else res.get(scen, p, sc, c["id"])
            )
            if c["id"] == "limit.sync" and st is not None and axis == "conc" and p != pts[0]:
                row.append("″")  # one thread: the same measurement (taken at c=1)
                continue
            if c["id"] == "limit.sync" and st is not None and axis == "conc" and p != 1:
                row.append(cell_text(st, metric, f) + " (c=1)")
                any_ = True
                continue
            row.append(cell_text(st, metric, f) if st else "")
            any_ = any_ or st is not None
        if any_:
            out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def details_md(res, scen):
    out = [
        "| chunk | c | contender | ops/s | MB/s | p50 µs | p99 µs | p99.9 µs | CPU µs/op "
        "| max stall ms | spread | ok/n | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pts = sorted({(k[1], k[2]) for k in res.groups if k[0] == scen})
    for ch, conc in pts:
        for c in res.contenders:
            rows = res.groups.get((scen, ch, conc, c["id"]))
            if not rows:
                continue
            st = Stat(rows)
            note = ""
            if st.fail:
                note = esc(st.error)[:160]
            else:
                sq = {r.get("sqpoll") for r in st.ok if r.get("sqpoll") not in (None, "")}
                if sq:
                    note = "sqpoll=%s" % "/".join(sorted(sq))
                ev = [r.get("evicted") for r in st.ok if r.get("evicted") not in (None, "")]
                if ev and any(e != "True" for e in ev):
                    note += " eviction NOT verified"
                resd = [r["resident"] for r in st.ok if r.get("resident") is not None]
                if resd and min(resd) < 1.0:
                    note += " resident %.0f%%" % (100 * min(resd))
            sp = st.spread("ops_per_s")
            out.append(
                "| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d/%d | %s |"
                % (
                    fsize(ch),
                    conc,
                    c["label"],
                    si(st.med("ops_per_s")),
                    num(st.med("mb_per_s")),
                    num(st.med("lat_p50_us")),
                    num(st.med("lat_p99_us")),
                    num(st.med("lat_p999_us")),
                    num(st.med("cpu_us_per_op")),
                    num(st.med("max_stall_ms")),
                    "–" if sp is None else "%.0f%%" % (100 * sp),
                    len(st.ok),
                    len(st.rows),
                    note,
                )
            )
    return "\n".join(out)


def ratio_md(res):
    """ours / upstream for every cell and backend, plus ours vs the peers."""
    pairs = [
        (c["id"], c["id"].replace("ours.", "upstream.", 1))
        for c in res.contenders
        if c["id"].startswith("ours.")
    ]
    pairs = [(a, b) for a, b in pairs if res.has(a)]
    if not pairs:
        return "_ours not available in this run: no ratios._"
    peers = ["peer.run_in_executor", "peer.aiofiles", "peer.anyio", "limit.sync", "limit.floor"]
    peers = [p for p in peers if res.has(p)]
    out = []
    hdr = (
        ["scenario", "chunk", "c", "ours"]
        + ["/ upstream"]
        + ["/ " + res.labels.get(p, p).split(" (")[0] for p in peers]
    )
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---|" * len(hdr))
    for scen in res.offset_scenarios:
        for ch, conc in res.points(scen):
            for a, b in pairs:
                sa = res.get(scen, ch, conc, a)
                if sa is None:
                    continue
                cols = [rtext(ratio(sa, res.get(scen, ch, conc, b)))]
                for p in peers:
                    sp = res.get(scen, ch, conc, p)
                    if p == "limit.floor" and sp is None:
                        sp = res.get(CR, SMALL, conc, p)
                    cols.append(rtext(ratio(sa, sp)))
                label = res.labels.get(a, a) + (" **FAIL**" if sa.failed else "")
                out.append(
                    "| %s | %s | %d | %s | %s |" % (scen, fsize(ch), conc, label, " | ".join(cols))
                )
    return "\n".join(out)


def base_md(res):
    """ours / base (--base-python) for every cell and backend: before/after in one run."""
    pairs = [
        (c["id"], "base." + c["id"][len("ours.") :])
        for c in res.contenders
        if c["id"].startswith("ours.")
    ]
    pairs = [(a, b) for a, b in pairs if res.has(a) and res.has(b)]
    if not pairs:
        return ""
    out = ["| scenario | chunk | c | ours | base | ours / base |", "|---|---|---|---|---|---|"]
    for scen in res.scenarios:
        for ch, conc in res.points(scen):
            for a, b in pairs:
                sa, sb = res.get(scen, ch, conc, a), res.get(scen, ch, conc, b)
                if sa is None or sb is None:
                    continue
                out.append(
                    "| %s | %s | %d | %s | %s | %s |"
                    % (
                        scen,
                        fsize(ch),
                        conc,
                        res.labels.get(a, a) + ": " + cell_text(sa, "ops_per_s", si, False),
                        cell_text(sb, "ops_per_s", si, False),
                        rtext(ratio(sa, sb)),
                    )
                )
    return "\n".join(out)


def failures_md(res):
    seen = {}
    for r in res.rows:
        if r["status"] != "ok":
            key = (r["contender"], r["scenario"], esc(r["error"])[:300])
            seen.setdefault(key, []).append("%s c=%d" % (fsize(r["chunk"]), r["concurrency"]))
    if not seen:
        return "None."
    out = ["| contender | scenario | cells | error |", "|---|---|---|---|"]
    for (cid, scen, err), cells in seen.items():
        uniq = sorted(set(cells), key=cells.index)
        out.append(
            "| %s | %s | %s | %s |"
            % (
                res.labels.get(cid, cid),
                scen,
                ", ".join(uniq[:6]) + (" …" if len(uniq) > 6 else ""),
                err,
            )
        )
    return "\n".join(out)


def noise_md(res):
    ok = [r for r in res.rows if r["status"] == "ok"]
    loads = [r["load1"] for r in res.rows if r["load1"] is not None]
    noisy = total = 0
    for rows in res.groups.values():
        st = Stat(rows)
        sp = st.spread("ops_per_s")
        if sp is not None:
            total += 1
            if sp > NOISY:
                noisy += 1
    lines = [
        "- %d measurements (%d ok, %d failed)." % (len(res.rows), len(ok), len(res.rows) - len(ok))
    ]
    if loads:
        lines.append(
            "- 1-minute load average during the run: min %.2f, median %.2f, max %.2f "
            "(machine has %s CPUs)."
            % (
                min(loads),
                statistics.median(loads),
                max(loads),
                res.meta.get("machine", {}).get("cpu_count"),
            )
        )
    if total:
        lines.append(
            "- %d of %d cells have a repetition spread (max−min)/median above %d%% (marked ⚠)."
            % (noisy, total, NOISY * 100)
        )
    return "\n".join(lines)


def env_md(meta):
    m = meta.get("machine", {})
    d = meta.get("data", {})
    p = meta.get("params", {})
    probes = meta.get("probes", {})
    ours = (probes.get("ours") or {}).get("caio") or {}
    up = (probes.get("upstream") or {}).get("caio") or {}
    tools = probes.get("tools") or {}
    ev = d.get("eviction_check") or {}
    blk = d.get("block") or {}
    rows = [
        (
            "run",
            "%s (mode `%s`: %s)"
            % (meta.get("run_id"), meta.get("mode"), meta.get("mode_note", "")),
        ),
        (
            "machine",
            "%s, %s CPUs (%s usable), %s MiB RAM"
            % (
                m.get("cpu_model"),
                m.get("cpu_count"),
                m.get("cpus_usable"),
                m.get("mem_total_mib"),
            ),
        ),
        ("kernel", "%s (%s)" % (m.get("kernel"), m.get("kernel_version"))),
        (
            "python",
            "%s (runner %s)" % ((probes.get("ours") or {}).get("python"), m.get("runner_python")),
        ),
        (
            "ours caio",
            ("%s from `%s`" % (ours.get("version"), ours.get("file") or ours.get("path")))
            if ours.get("importable")
            else "not available (%s)"
            % esc(ours.get("error") or (probes.get("ours") or {}).get("error"))[:200],
        ),
        (
            "upstream caio",
            "%s from `%s`" % (up.get("version"), up.get("file"))
            if up.get("importable")
            else "not run",
        ),
        (
            "peers",
            "aiofiles %s, anyio %s, fio: %s"
            % (tools.get("aiofiles"), tools.get("anyio"), meta.get("fio") or "not available"),
        ),
        (
            "test files",
            "%s MiB each on %s (%s, %s; %s)"
            % (
                (d.get("file_size") or 0) >> 20,
                d.get("mount"),
                d.get("fstype"),
                d.get("device"),
                ", ".join("%s=%s" % kv for kv in blk.items()),
            ),
        ),
        (
            "page-cache eviction",
            (
                "works (%d/%d sampled pages resident before, %d after fsync+FADV_DONTNEED; "
                "checked with RWF_NOWAIT)"
                % (
                    ev.get("resident_before", 0),
                    ev.get("sampled", 0),
                    ev.get("resident_after_evict", 0),
                )
            )
            if ev.get("ok")
            else "**NOT WORKING** %s" % esc(json.dumps(ev)),
        ),
        (
            "method",
            "%s reps round-robin, warm-up %.2f s + %.2f s measured per cell, "
            "stall probe: %s, seed %s"
            % (
                p.get("reps"),
                p.get("warmup_s", 0),
                p.get("measure_s", 0),
                p.get("stall_method"),
                p.get("seed"),
            ),
        ),
        ("load", "start: `%s` — end: `%s`" % (meta.get("uptime_start"), meta.get("uptime_end"))),
        (
            "duration",
            "%s s total (%s s setup, %s s measuring)%s"
            % (
                meta.get("total_s"),
                meta.get("setup_s"),
                meta.get("elapsed_s"),
                " — **interrupted**" if meta.get("interrupted") else "",
            ),
        ),
        (
            "git",
            "%s %s%s"
            % (
                m.get("git", {}).get("branch"),
                (m.get("git", {}).get("commit") or "")[:12],
                " (dirty)" if m.get("git", {}).get("dirty") else "",
            ),
        ),
    ]
    return "\n".join(["| | |", "|---|---|"] + ["| %s | %s |" % (k, v) for k, v in rows])


def chart_files(out_dir):
    d = os.path.join(out_dir, "charts")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def write_summary(out_dir):
    rows, meta = load(out_dir)
    res = Results(rows, meta)
    charts = chart_files(out_dir)
    s = [
        "# caio benchmark — %s" % meta.get("run_id"),
        "",
        "How to read this: see [benchmark/README.md](../../README.md). Values are medians over the "
        "repetitions with <sub>min–max</sub>; ⚠ marks cells whose spread exceeds %d%%; "
        "**FAIL** cells failed in every repetition (error text in *Failures*). "
        "Ratios are ours ÷ reference of the medians "
        "(>1 = ours faster; for stalls <1 = ours better)." % (NOISY * 100),
        "",
        env_md(meta),
        "",
    ]
    s += ["## Performance targets", "", targets_md(res), ""]
    ft = files_table(res)
    it = issue_targets_md(res)
    if it:
        s += [
            "### Issue targets (13: zero-copy readinto; 16: the default path, uvloop, aiofile)",
            "",
            "“default” is the backend `from caio import AsyncioContext` selects in ours' "
            "interpreter (%s); “best” is the fastest caio contender of that side at the "
            "cell (any backend or ring variant). ✔ = target met in this run."
            % (default_backend(res) or "unknown"),
            "",
            it,
            "",
        ]
    for tag, title in (
        ("uvloop", "Under uvloop (4 KiB, ops/s; each uvloop row under its asyncio row)"),
        ("aiofile", "aiofile on top of ours and of upstream (ops/s)"),
        ("readinto", "readinto into a reused buffer (ops/s)"),
        ("structured", "trio and anyio: cached random reads (ops/s, p99, scheduler stall)"),
    ):
        if tag == "aiofile" and ft:
            s += [
                "## Whole files and path operations (files/s, c=64; the loop's longest stall)",
                "",
                "Each cell handles every file of a set once (same order for everyone); ours "
                "is `ctx.read_file` / `ctx.stat` / `ctx.write_file`; the sync loop runs on "
                "the loop thread (its stall is the whole cell).",
                "",
                ft,
                "",
            ]
            s += ["![%s](charts/%s)" % (ch, ch) for ch in charts if ch.startswith("files-")]
            s += [""]
        t = tagged_table(res, tag)
        if t:
            s += ["## %s" % title, "", t, ""]
            s += ["![%s](charts/%s)" % (ch, ch) for ch in charts if ch.startswith(tag + "-")]
            s += [""]
    b = baseline_md(res)
    if b:
        s += ["## Upstream caio and the peers at the target cells", "", b, ""]
    s += ["## Ratios: ours vs upstream and the peers (ops/s)", "", ratio_md(res), ""]
    bm = base_md(res)
    if bm:
        s += ["## Ours vs base (`--base-python`, before/after in one run; ops/s)", "", bm, ""]
    for scen in res.offset_scenarios:
        s += ["## %s" % scen, ""]
        t = sweep_table(res, scen, "ops_per_s", "conc")
        if t:
            s += ["Throughput vs concurrency, 4 KiB (ops/s):", "", t, ""]
            s += [
                "p99 latency vs concurrency, 4 KiB (µs):",
                "",
                sweep_table(res, scen, "lat_p99_us", "conc"),
                "",
            ]
            s += [
                "Longest event-loop stall, 4 KiB (ms):",
                "",
                sweep_table(res, scen, "max_stall_ms", "conc"),
                "",
            ]
        t = sweep_table(res, scen, "mb_per_s", "chunk")
        if t and len(res.chunk_points(scen)) > 1:
            s += [
                "Throughput vs chunk size, c=%s (MB/s):" % meta.get("params", {}).get("sweep_conc"),
                "",
                t,
                "",
            ]
        for ch in charts:
            if ch.startswith(scen + "-"):
                s += ["![%s](charts/%s)" % (ch, ch), ""]
    s += [
        "## Noise",
        "",
        noise_md(res),
        "",
        "## Failures",
        "",
        failures_md(res),
        "",
        "Every measurement (one row per repetition) is in [results.csv](results.csv); all metrics "
        "per cell in [details.md](details.md); machine and versions in [meta.json](meta.json).",
        "",
    ]
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(s))
    d = [
        "# caio benchmark details — %s" % meta.get("run_id"),
        "",
        "Medians over repetitions; spread = (max−min)/median of ops/s. "
        "CPU µs/op is process CPU time "
        "(all threads, incl. io_uring SQPOLL/io-wq kernel threads) per completed operation.",
        "",
    ]
    for scen in res.scenarios:
        d += ["## %s" % scen, "", details_md(res, scen), ""]
    with open(os.path.join(out_dir, "details.md"), "w") as f:
        f.write("\n".join(d))
    return "\n".join(
        [
            "## Performance targets",
            "",
            targets_md(res),
            "",
            "## Upstream caio and the peers at the target cells",
            "",
            b,
        ]
    )


# ------------------------------------------------------------------- charts

COLORS = {
    "linux_uring": "#1f77b4",
    "linux_uring.nosqpoll": "#17becf",
    "linux_uring.sqpoll": "#0b3d91",
    "linux_aio": "#d62728",
    "thread_aio": "#2ca02c",
    "python_aio": "#9467bd",
    "peer.run_in_executor": "#ff7f0e",
    "peer.aiofiles": "#8c564b",
    "peer.anyio": "#e377c2",
    "limit.sync": "#000000",
    "limit.floor": "#7f7f7f",
    "limit.fio_io_uring": "#bcbd22",
    "limit.fio_libaio": "#aa6600",
    # trio / anyio: ours.<lib> solid, peer.<lib>.open_file dotted, same colour per library
    "trio": "#117a65",
    "anyio-asyncio": "#b9770e",
    "anyio-trio": "#6c3483",
    "peer.trio.open_file": "#117a65",
    "peer.anyio-asyncio.open_file": "#b9770e",
    "peer.anyio-trio.open_file": "#6c3483",
}


def _style(cid):
    for suffix in (".uvloop", ".readinto", ".preadv"):
        if cid.endswith(suffix):
            color, ls, mk = _style(cid[: -len(suffix)])
            return color, ls, {"o": "D", "x": "v", "s": "^"}.get(mk, mk)
    if cid.endswith(".aiofile"):
        return "#444444" if cid.startswith("ours.") else "#999999", "-", "*"
    if cid.startswith("ours."):
        return COLORS.get(cid[5:], "#333"), "-", "o"
    if cid.startswith("upstream."):
        return COLORS.get(cid[9:], "#333"), "--", "x"
    if cid.startswith("base."):
        return COLORS.get(cid[5:], "#333"), "-.", "+"
    return COLORS.get(cid, "#333"), ":", "s"


def charts(out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, meta = load(out_dir)
    res = Results(rows, meta)
    d = os.path.join(out_dir, "charts")
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    sc = meta.get("params", {}).get("sweep_conc", 64)
    made = []

    def plot(scen, axis, metric, ylabel, fname, logy, who=None, title=None):
        pts = res.conc_points(scen) if axis == "conc" else res.chunk_points(scen)
        if who is not None:  # a family's own points
            ids = {c["id"] for c in who}
            pts = sorted(
                {k[2] for k in res.groups if k[0] == scen and k[3] in ids and k[1] == SMALL}
            )
        if len(pts) < 2:
            return
        fig, ax = plt.subplots(figsize=(12.5, 6))
        failed = []
        for c in res.sweepers if who is None else who:
            cid = c["id"]
            if cid == "limit.floor" and axis == "chunk":  # no I/O: its MB/s is meaningless
                continue
            xs, ys, lo, hi = [], [], [], []
            seen_any = False
            for p in pts:
                st = res.get(scen, SMALL, p, cid) if axis == "conc" else res.get(scen, p, sc, cid)
                if st is None:
                    continue
                seen_any = True
                m = st.med(metric)
                if m is None:
                    continue
                xs.append(p)
                ys.append(m)
                lo.append(m - st.lo(metric))
                hi.append(st.hi(metric) - m)
            if not seen_any:
                continue
            color, ls, mk = _style(cid)
            if not xs:
                failed.append(c["label"])
                continue
            if cid == "limit.sync" and axis == "conc":  # one thread: a horizontal reference
                ax.axhline(ys[0], color=color, ls=":", lw=1.2, label=c["label"])
                continue
            ax.errorbar(
                xs,
                ys,
                yerr=[lo, hi],
                color=color,
                ls=ls,
                marker=mk,
                ms=4,
                lw=1.5,
                capsize=2,
                label=c["label"],
            )
        if failed:
            ax.plot([], [], " ", label="FAIL (every cell): " + "; ".join(failed))
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xticks(pts)
        ax.set_xticklabels([str(p) if axis == "conc" else fsize(p) for p in pts])
        ax.set_xlabel(
            "concurrency (4 KiB operations)"
            if axis == "conc"
            else "chunk size (concurrency %d)" % sc
        )
        ax.set_ylabel(ylabel)
        ax.set_title(
            "%s — %s (median, bars: min–max of %s reps)"
            % (title or scen, ylabel, meta.get("params", {}).get("reps"))
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
        fig.savefig(os.path.join(d, fname), dpi=110)
        plt.close(fig)
        made.append(fname)

    def bars(scen):
        """A scenario measured at a single point: one bar per contender."""
        pts = res.points(scen)
        if len(pts) != 1:
            return
        ch, conc = pts[0]
        bar_chart(
            "%s — %s, concurrency %d" % (scen, fsize(ch), conc),
            [(c["id"], scen, ch, conc) for c in res.sweepers],
            "%s-bars.png" % scen,
        )

    def bar_chart(title, cells, fname, metric="ops_per_s"):
        """One bar per (contender, scenario, chunk, concurrency) cell."""
        labels, vals, lo, hi, colors, fails = [], [], [], [], [], []
        for cid, scen, ch, conc in cells:
            c = {"id": cid, "label": label_in(res, cid, scen)}
            st = res.get(scen, ch, conc, cid)
            if st is None:
                continue
            m = st.med(metric)
            if m is None:
                fails.append(c["label"])
                labels.append(c["label"] + "  — FAIL")
                vals.append(0)
                lo.append(0)
                hi.append(0)
            else:
                labels.append(c["label"] + ("  (c=1)" if c["id"].startswith("limit.sync") else ""))
                vals.append(m)
                lo.append(m - st.lo(metric))
                hi.append(st.hi(metric) - m)
            colors.append(_style(c["id"])[0])
        if not labels:
            return
        fig, ax = plt.subplots(figsize=(11, 0.38 * len(labels) + 1.6))
        y = list(range(len(labels)))[::-1]
        ax.barh(y, vals, xerr=[lo, hi], color=colors, alpha=0.85, capsize=2)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        for yy, v in zip(y, vals, strict=True):
            if v:
                ax.text(v, yy, " %s" % si(v), va="center", fontsize=7)
        ax.set_xlabel(
            "%s, median; bars: min–max"
            % ("throughput (MB/s)" if metric == "mb_per_s" else "throughput (ops/s)")
        )
        ax.set_title(title)
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(d, fname), dpi=110)
        plt.close(fig)
        made.append(fname)

    for tag, title, cells, metric in family_cells(res):
        bar_chart(title, cells, "%s-bars.png" % tag, metric)
    uv = [c for c in res.contenders if c.get("tag") == "uvloop"]
    if uv:  # the asyncio lines are in the cached-rand-read chart
        plot(
            CR,
            "conc",
            "ops_per_s",
            "throughput (ops/s)",
            "uvloop-ops-vs-concurrency.png",
            True,
            uv,
            "4 KiB cached random read under uvloop",
        )
    for scen in res.offset_scenarios:
        bars(scen)
        plot(
            scen,
            "conc",
            "ops_per_s",
            "throughput (ops/s)",
            "%s-ops-vs-concurrency.png" % scen,
            True,
        )
        plot(
            scen, "conc", "lat_p99_us", "p99 latency (µs)", "%s-p99-vs-concurrency.png" % scen, True
        )
        plot(scen, "chunk", "mb_per_s", "throughput (MB/s)", "%s-mbps-vs-chunk.png" % scen, True)
    return made


def main(argv):
    if len(argv) != 3 or argv[1] not in ("summary", "charts"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "charts":
        made = charts(argv[2])
        print("%d charts" % len(made))
    else:
        write_summary(argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
