"""What gets measured: modes, scenarios, cells and contenders."""

import fnmatch
import zlib
from dataclasses import dataclass, field

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SMALL = 4 * KiB

# --------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    cache: str  # cached | cold | direct
    pattern: str  # rand | seq | files (a set of Mode.files files, each handled once)
    op: str  # read | write | stat (files only)
    concs: tuple  # concurrency sweep, at 4 KiB
    chunks: tuple  # chunk-size sweep, at Mode.sweep_conc

    @property
    def name(self):
        return "%s-%s-%s" % (self.cache, self.pattern, self.op)


@dataclass
class Mode:
    name: str
    file_size: int
    reps: int
    warmup: float
    measure: float
    offsets: int  # length of each cell's offset list
    sweep_conc: int  # concurrency of the chunk-size sweep
    scenarios: list[Scenario]
    fio_install: bool = True
    note: str = ""
    budget: float = 0.0  # minutes; 0 = no limit (see runner --budget)
    # The cells of the contender families that run at a few points only, by family
    # tag (Contender.tag): {tag: {scenario name: ((chunk, concurrency), ...)}}.
    tagged: dict = field(default_factory=dict)
    files: int = 10_000  # size of the file set of the ``files`` scenarios (issue 14)


def _s(cache, pattern, op, concs=(), chunks=()):
    return Scenario(cache, pattern, op, tuple(concs), tuple(chunks))


CONCS_FULL = (1, 16, 64, 256, 1024)
CHUNKS_FULL = (4 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB)
CR, CW = "cached-rand-read", "cached-rand-write"
TARGET_CONCS = ((SMALL, 1), (SMALL, 16), (SMALL, 64), (SMALL, 256))

# uvloop: every caio contender and run_in_executor at issue 16's points;
# aiofile on top of ours and of upstream: 4 KiB random reads and writes at c=64;
# readinto into a reused buffer (issue 13): 4 KiB at c=1 and 64, 1 MiB at c=64,
# with a synchronous os.preadv loop into one buffer as the 1 MiB reference.
# Whole files and path operations (issue 14), c=64: read 4 KiB and 64 KiB files
# (page-cached and cold), stat, and create + write 4 KiB + close.
FILES_SCENARIOS = [
    Scenario("cached", "files", "read", (), (SMALL, 64 * KiB)),
    Scenario("cold", "files", "read", (), (SMALL, 64 * KiB)),
    Scenario("cached", "files", "stat", (), (SMALL,)),
    Scenario("cached", "files", "write", (), (SMALL,)),
]
FILES_READ = {
    "cached-files-read": ((SMALL, 64), (64 * KiB, 64)),
    "cold-files-read": ((SMALL, 64), (64 * KiB, 64)),
}

TAGGED_TARGETS = {
    "uvloop": {CR: TARGET_CONCS, CW: ((SMALL, 64),)},
    "aiofile": {CR: ((SMALL, 64),), CW: ((SMALL, 64),)},
    "readinto": {CR: ((SMALL, 1), (SMALL, 64), (MiB, 64))},
    "preadv": {CR: ((MiB, 1),)},
    "structured": {CR: ((SMALL, 1), (SMALL, 64), (MiB, 64))},
}
# full mode: aiofile's async_open + read in the files scenarios too (a reference, no target)
TAGGED_FULL = dict(TAGGED_TARGETS, aiofile={**TAGGED_TARGETS["aiofile"], **FILES_READ})
STRUCTURED_LIBS = ("trio", "anyio-asyncio", "anyio-trio")

MODES = {
    "smoke": Mode(
        "smoke",
        file_size=16 * MiB,
        reps=1,
        warmup=0.02,
        measure=0.05,
        offsets=4096,
        sweep_conc=8,
        fio_install=False,
        scenarios=[
            _s("cached", "rand", "read", (1, 8), (SMALL, 64 * KiB)),
            _s("cold", "rand", "read", (8,)),
            _s("direct", "rand", "read", (8,)),
            _s("cached", "seq", "write", (8,)),
            _s("cached", "files", "read", (), (SMALL,)),
            _s("cold", "files", "read", (), (SMALL,)),
            _s("cached", "files", "stat", (), (SMALL,)),
            _s("cached", "files", "write", (), (SMALL,)),
        ],
        files=200,
        tagged={
            "uvloop": {"cached-rand-read": ((SMALL, 8),), "cached-seq-write": ((SMALL, 8),)},
            "aiofile": {
                "cached-rand-read": ((SMALL, 8),),
                "cached-seq-write": ((SMALL, 8),),
                "cached-files-read": ((SMALL, 8),),
            },
            "readinto": {"cached-rand-read": ((SMALL, 8), (64 * KiB, 8))},
            "preadv": {"cached-rand-read": ((64 * KiB, 1),)},
            "structured": {"cached-rand-read": ((SMALL, 8),)},
        },
        note="plumbing check only: numbers are meaningless",
    ),
    "quick": Mode(
        "quick",
        file_size=256 * MiB,
        reps=3,
        warmup=0.05,
        measure=0.2,
        offsets=65536,
        sweep_conc=64,
        scenarios=[
            _s("cached", "rand", "read", (1, 16, 64, 256), (SMALL, 64 * KiB, 1 * MiB)),
            _s("cold", "rand", "read", (64,)),
            _s("direct", "rand", "read", (64,)),
            _s("cached", "rand", "write", (1, 16, 64, 256)),
            *FILES_SCENARIOS,
        ],
        files=2_000,  # a fifth of the 10,000 (full mode): the same rates, 1/5 the time
        tagged=TAGGED_TARGETS,
        note="the performance-target cells plus a short concurrency/chunk sweep",
    ),
    "full": Mode(
        "full",
        file_size=1 * GiB,
        reps=3,
        warmup=0.05,
        measure=0.2,
        offsets=131072,
        sweep_conc=64,
        scenarios=[
            _s("cached", "rand", "read", CONCS_FULL, CHUNKS_FULL),
            _s("cached", "seq", "read", CONCS_FULL, CHUNKS_FULL),
            _s("cold", "rand", "read", CONCS_FULL, CHUNKS_FULL),
            _s("cold", "seq", "read", CONCS_FULL, CHUNKS_FULL),
            _s("direct", "rand", "read", CONCS_FULL, CHUNKS_FULL),
            _s("direct", "seq", "read", CONCS_FULL, CHUNKS_FULL),
            _s("cached", "rand", "write", CONCS_FULL, CHUNKS_FULL),
            _s("cached", "seq", "write", CONCS_FULL, CHUNKS_FULL),
            _s("cold", "rand", "write", (1, 64), (SMALL, 1 * MiB)),
            _s("direct", "rand", "write", CONCS_FULL, CHUNKS_FULL),
            _s("direct", "seq", "write", CONCS_FULL, CHUNKS_FULL),
            *FILES_SCENARIOS,
        ],
        budget=35.0,
        tagged=TAGGED_FULL,
        note="every scenario; cold writes only at a few points (aligned whole-page "
        "buffered writes never read the old page, so they behave like cached writes)",
    ),
}


# ------------------------------------------------------------------- cells


@dataclass
class Cell:
    scenario: Scenario
    chunk: int
    concurrency: int
    rep: int
    seed: int

    @property
    def id(self):
        return "%s/%s/c%d/r%d" % (
            self.scenario.name,
            fmt_size(self.chunk),
            self.concurrency,
            self.rep,
        )

    @property
    def key(self):
        return (self.scenario.name, self.chunk, self.concurrency)


def fmt_size(n):
    if n >= MiB and n % MiB == 0:
        return "%dMiB" % (n // MiB)
    if n >= KiB and n % KiB == 0:
        return "%dKiB" % (n // KiB)
    return "%dB" % n


def parse_size(text):
    t = text.strip().lower().replace("ib", "").replace("b", "")
    mult = {"k": KiB, "m": MiB, "g": GiB}.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in "kmg" else t) * mult)


def cell_seed(base, rep, scenario, chunk):
    """Same seed -> same offsets for every contender of a cell (and for fio)."""
    return zlib.crc32(
        ("%d:%d:%s:%s:%d" % (base, rep, scenario.pattern, scenario.op, chunk)).encode()
    )


def scenario_points(mode, scen):
    pts = [(SMALL, c) for c in scen.concs]
    pts += [(ch, mode.sweep_conc) for ch in scen.chunks]
    seen, out = set(), []
    for p in pts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# -------------------------------------------------------------- contenders


@dataclass
class Contender:
    id: str
    family: str  # ours | upstream | peer | limit
    label: str
    kind: str  # caio | executor | aiofiles | anyio | sync | floor | fio
    python: str | None = None
    backend: str | None = None
    variant: str = ""
    params: dict = field(default_factory=dict)
    version: str | None = None
    tag: str = ""  # a family measured at a few points only: Mode.tagged[tag]

    def points(self, mode, scen):
        """The (chunk, concurrency) cells this contender runs in a scenario."""
        if self.tag:
            return list(mode.tagged.get(self.tag, {}).get(scen.name, ()))
        pts = scenario_points(mode, scen)
        if scen.pattern == "files":  # whole files: the contenders with such a call
            if self.kind == "caio":
                ok = self.params.get("pathops") and self.variant == "default"
            else:
                ok = self.kind in ("executor", "sync") or (
                    self.kind in ("aiofiles", "anyio") and scen.op == "read"
                )
            return pts if ok else []
        if self.kind == "floor":
            if scen.name != "cached-rand-read":
                return []
            return [p for p in pts if p[0] == SMALL]
        if self.kind == "sync":  # one thread: concurrency does not apply
            out = []
            for ch, _ in pts:
                if (ch, 1) not in out:
                    out.append((ch, 1))
            return out
        if self.kind == "fio":
            return pts if scen.cache == "direct" else []
        return pts


CAIO_BACKENDS = ("linux_uring", "linux_aio", "thread_aio", "python_aio")


def caio_contenders(family, python, probe_info, log):
    """One contender per available backend (+ uring SQPOLL variants)."""
    out = []
    cinfo = probe_info.get("caio") or {}
    if probe_info.get("error") or not cinfo.get("importable"):
        log(
            "%s: caio not importable with %s -> no %s contenders (%s)"
            % (family, python, family, probe_info.get("error") or cinfo.get("error"))
        )
        return out
    version = cinfo.get("version") or cinfo.get("dist_version")
    for b in CAIO_BACKENDS:
        bi = (cinfo.get("backends") or {}).get(b) or {}
        if not bi.get("ok"):
            log(
                "%s: backend %s unavailable, omitted (%s)"
                % (family, b, bi.get("error", "not probed"))
            )
            continue
        common = {
            "family": family,
            "kind": "caio",
            "python": python,
            "backend": b,
            "version": version,
        }
        # whole files and path operations (issue 14): ctx.read_file, stat, write_file
        pathops = bool(bi.get("pathops"))
        if b == "linux_uring":
            dsq = bi.get("default_sqpoll")
            out.append(
                Contender(
                    "%s.linux_uring" % family,
                    label="%s linux_uring (default%s)" % (family, ", sqpoll" if dsq else ""),
                    variant="default",
                    params={"backend": b, "kwargs": {}, "pathops": pathops},
                    **common,
                )
            )
            # The explicit sqpoll=False row only when it differs from the
            # default (upstream's default is SQPOLL; ours is the plain ring,
            # so for ours it would measure the same thing twice).
            if dsq or family not in ("ours", "base"):
                out.append(
                    Contender(
                        "%s.linux_uring.nosqpoll" % family,
                        label="%s linux_uring sqpoll=False" % family,
                        variant="sqpoll=False",
                        params={"backend": b, "kwargs": {"sqpoll": False}, "pathops": pathops},
                        **common,
                    )
                )
            if not dsq and bi.get("SQPOLL_ALLOWED"):
                out.append(
                    Contender(
                        "%s.linux_uring.sqpoll" % family,
                        label="%s linux_uring sqpoll=True" % family,
                        variant="sqpoll=True",
                        params={"backend": b, "kwargs": {"sqpoll": True}, "pathops": pathops},
                        **common,
                    )
                )
        else:
            out.append(
                Contender(
                    "%s.%s" % (family, b),
                    label="%s %s" % (family, b),
                    variant="default",
                    params={"backend": b, "kwargs": {}, "pathops": pathops},
                    **common,
                )
            )
    return out


def _lib_ok(probe_info, name):
    v = probe_info.get(name)
    return isinstance(v, dict) and not v.get("error")


def tagged_contenders(base, probes, extras, log, loop_and_aiofile=True):
    """The issue rows derived from the caio contenders in ``base``: TrioContext /
    AnyioContext (15), each under uvloop (16), readinto into a reused buffer (13,
    ours' native backends that have it), and aiofile on top (16, one per family:
    aiofile takes the default backend).  ``probes``: family -> probe of its
    interpreter with ``extras`` (or None) on sys.path; ``loop_and_aiofile=False``
    (--no-extras) leaves out the uvloop and aiofile rows."""
    out, aiofile_done = [], set()
    for family in ("ours", "base"):  # TrioContext / AnyioContext (issue 15)
        pi = probes.get(family) or {}
        first = next((c for c in base if c.family == family and c.kind == "caio"), None)
        st = (pi.get("caio") or {}).get("structured") or {}
        if first is None:
            continue
        for lib in STRUCTURED_LIBS:
            m = lib.split("-")[0]
            if not (st.get(m) or {}).get("ok") or (m == "trio" and not _lib_ok(pi, "trio")):
                log(
                    "%s: caio.%s not usable (%s): no %s.%s row"
                    % (family, m, st.get(m), family, lib)
                )
                continue
            out.append(
                Contender(
                    "%s.%s" % (family, lib),
                    family,
                    "%s %sContext under %s (default backend)"
                    % (family, "Trio" if m == "trio" else "Anyio", lib),
                    "structured",
                    python=first.python,
                    backend=(pi.get("caio") or {}).get("default_backend"),
                    variant=lib,
                    params={"lib": lib},
                    version=first.version,
                    tag="structured",
                )
            )
    for c in base:
        if c.kind != "caio":
            continue
        pi = probes.get(c.family) or {}
        params = dict(c.params, sys_path=extras)
        if loop_and_aiofile and _lib_ok(pi, "uvloop"):
            out.append(
                Contender(
                    c.id + ".uvloop",
                    c.family,
                    c.label + " (uvloop)",
                    "caio",
                    python=c.python,
                    backend=c.backend,
                    variant=(c.variant + "+uvloop").lstrip("+"),
                    params=dict(params, loop="uvloop"),
                    version=c.version,
                    tag="uvloop",
                )
            )
        elif loop_and_aiofile:
            log(
                "%s: uvloop not importable (%s): no %s.uvloop row"
                % (c.family, pi.get("uvloop"), c.id)
            )
        bi = ((pi.get("caio") or {}).get("backends") or {}).get(c.backend) or {}
        if (
            c.family in ("ours", "base")
            and c.variant == "default"
            and c.backend != "python_aio"
            and bi.get("readinto")
        ):
            out.append(
                Contender(
                    c.id + ".readinto",
                    c.family,
                    c.label + " readinto",
                    "caio",
                    python=c.python,
                    backend=c.backend,
                    variant="readinto",
                    params=dict(c.params, api="readinto"),
                    version=c.version,
                    tag="readinto",
                )
            )
        if loop_and_aiofile and c.family not in aiofile_done:
            aiofile_done.add(c.family)
            if _lib_ok(pi, "aiofile"):
                out.append(
                    Contender(
                        "%s.aiofile" % c.family,
                        c.family,
                        "aiofile %s on %s (default backend)"
                        % ((pi.get("aiofile") or {}).get("version"), c.family),
                        "aiofile",
                        python=c.python,
                        backend=(pi.get("caio") or {}).get("default_backend"),
                        variant="aiofile",
                        params={"sys_path": extras},
                        version=c.version,
                        tag="aiofile",
                    )
                )
            else:
                log(
                    "%s: aiofile not importable (%s): no aiofile row"
                    % (c.family, pi.get("aiofile"))
                )
    return out


def peer_contenders(python, probe_info, fio, fio_ver):
    out = [
        Contender(
            "peer.run_in_executor",
            "peer",
            "run_in_executor(os.pread/pwrite)",
            "executor",
            python=python,
            version="python " + str(probe_info.get("python")),
        ),
        Contender(
            "peer.aiofiles",
            "peer",
            "aiofiles (seek + read/write)",
            "aiofiles",
            python=python,
            version=probe_info.get("aiofiles"),
        ),
        Contender(
            "peer.anyio",
            "peer",
            "anyio.open_file (seek + read/write)",
            "anyio",
            python=python,
            version=probe_info.get("anyio"),
        ),
        Contender(
            "limit.sync",
            "limit",
            "sync os.pread/pwrite loop (1 thread)",
            "sync",
            python=python,
            version="python " + str(probe_info.get("python")),
        ),
        Contender(
            "limit.sync.preadv",
            "limit",
            "sync os.preadv loop into one buffer (1 thread)",
            "sync",
            python=python,
            params={"api": "readinto"},
            version="python " + str(probe_info.get("python")),
            tag="preadv",
        ),
        Contender(
            "limit.floor",
            "limit",
            "asyncio floor (call_soon future)",
            "floor",
            python=python,
            version="python " + str(probe_info.get("python")),
        ),
    ]
    for lib in STRUCTURED_LIBS if _lib_ok(probe_info, "trio") and probe_info.get("anyio") else ():
        out.append(
            Contender(
                "peer.%s.open_file" % lib,
                "peer",
                "%s.open_file (seek + read) under %s" % (lib.split("-")[0], lib),
                "structured",
                python=python,
                variant=lib,
                params={"lib": lib, "method": "open_file"},
                version="%s %s" % (lib.split("-")[0], probe_info.get(lib.split("-")[0])),
                tag="structured",
            )
        )
    if _lib_ok(probe_info, "uvloop"):
        out.insert(
            1,
            Contender(
                "peer.run_in_executor.uvloop",
                "peer",
                "run_in_executor(os.pread/pwrite) (uvloop)",
                "executor",
                python=python,
                variant="uvloop",
                params={"loop": "uvloop"},
                version="python " + str(probe_info.get("python")),
                tag="uvloop",
            ),
        )
    if fio:
        for eng in ("io_uring", "libaio"):
            out.append(
                Contender(
                    "limit.fio_%s" % eng,
                    "limit",
                    "fio %s (O_DIRECT)" % eng,
                    "fio",
                    backend=eng,
                    params={"ioengine": eng, "fio": fio},
                    version=fio_ver,
                )
            )
    return out


def select(contenders, only, skip):
    def match(c, pats):
        return any(fnmatch.fnmatch(c.id, p.strip()) for p in pats.split(",") if p.strip())

    if only:
        contenders = [c for c in contenders if match(c, only)]
    if skip:
        contenders = [c for c in contenders if not match(c, skip)]
    return contenders
