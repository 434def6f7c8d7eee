"""Import-and-round-trip smoke test for an installed caio wheel.

    python smoke.py <native module>...      e.g. python smoke.py thread_aio linux_aio

Used where the full test suite cannot run: aarch64 wheels under qemu-user, and Windows wheels in
cibuildwheel (the suite needs POSIX helpers; see pyproject.toml [tool.cibuildwheel.windows]).
Every listed native module must be *present and loadable* from the installed package
(not from a source tree). A Linux kernel backend whose import fails only because the
kernel interface is missing (qemu-user implements neither io_uring nor kernel AIO) is
reported as "unavailable" with the reason; a missing file, a wrong file name or an
unloadable module (undefined symbol, wrong ELF class, ...) is a failure. Then
write/read/fsync/fdsync go through every AsyncioContext in caio.variants_asyncio.
"""

import asyncio
import importlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
import sysconfig
import tempfile

# native modules whose only legitimate import failure is a missing kernel interface
KERNEL_BACKENDS = {"linux_aio", "linux_uring"}
LOADER_ERRORS = (
    "undefined symbol",
    "cannot open shared object",
    "ELF",
    "wrong",
    "invalid",
    "Exec format",
    "not a dynamic",
    "symbol not found",
    "Error relocating",
    "No module named",
)


def main() -> int:
    wanted = sys.argv[1:]
    failures = []
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    print(
        f"python {platform.python_version()} {platform.machine()} "
        f"EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')} gil={'on' if gil else 'off'}"
    )
    import caio

    print(f"caio {caio.__version__} from {os.path.dirname(caio.__file__)}")
    for name in wanted:
        spec = importlib.util.find_spec("caio." + name)
        if (
            spec is None
            or not spec.origin
            or not spec.origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        ):
            failures.append(f"{name}: no extension module file found (wrong file name?)")
            continue
        try:
            importlib.import_module("caio." + name)
        except ImportError as exc:
            msg = str(exc)
            if name in KERNEL_BACKENDS and not any(s in msg for s in LOADER_ERRORS):
                print(f"  {name}: loaded {os.path.basename(spec.origin)}, unavailable here: {msg}")
            else:
                failures.append(f"{name}: import failed: {msg}")
            continue
        print(f"  {name}: imported {os.path.basename(spec.origin)}")
    if "thread_aio" in wanted and caio.thread_aio is None:
        failures.append("caio.thread_aio is None")

    async def round_trip(adapter) -> str:
        ctx = adapter.AsyncioContext(max_requests=64)
        try:
            with tempfile.TemporaryFile() as f:
                fd = f.fileno()
                payload = os.urandom(100_000)
                assert await ctx.write(payload, fd, 0) == len(payload)
                assert await ctx.write(b"tail", fd, len(payload)) == 4
                assert await ctx.read(len(payload) + 100, fd, 0) == payload + b"tail"
                assert await ctx.read(10, fd, 1 << 20) == b""
                await ctx.fsync(fd)
                await ctx.fdsync(fd)
                parts = await asyncio.gather(*(ctx.read(1000, fd, 1000 * i) for i in range(50)))
                assert b"".join(parts) == payload[:50_000]
        finally:
            ctx.close()
        return adapter.__name__

    names = []
    for adapter in caio.variants_asyncio:
        try:
            names.append(asyncio.run(round_trip(adapter)))
        except Exception as exc:  # report every backend, then fail
            failures.append(f"{adapter.__name__}: round trip failed: {exc!r}")
    print("  round trip ok: " + ", ".join(n.rsplit(".", 1)[1] for n in names))
    if gil != getattr(sys, "_is_gil_enabled", lambda: True)():
        failures.append("importing caio changed the GIL state")
    if failures:
        for f in failures:
            print("FAIL " + f)
        return 1
    print("SMOKE OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
