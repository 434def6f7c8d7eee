"""``python -m caio``: which backends work here, which one is used, and why.

Prints the version, the availability of every backend (with the reason when
one cannot be imported), the backend ``from caio import AsyncioContext``
picks and how it was chosen, then runs a small write/read/fsync/fdsync
round trip through the asyncio adapter of every available backend.

Exit status: 0 when every available backend passed its self-test, 1 when at
least one failed, 2 for bad command-line arguments.
"""

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from types import ModuleType

import caio

# (key used by CAIO_IMPL, native module name, short description)
BACKENDS: tuple[tuple[str, str, str], ...] = (
    ("uring", "linux_uring", "io_uring, Linux >= 5.6"),
    ("linux", "linux_aio", "kernel AIO, Linux >= 4.18"),
    ("thread", "thread_aio", "native thread pool"),
    ("python", "python_aio", "pure Python thread pool"),
)

SELF_TEST_TIMEOUT = 10.0


def _indent(text: str, prefix: str) -> str:
    return textwrap.indent(text, prefix)


def explain_import_error(module_name: str, message: str) -> str:
    """Human explanation of why a native backend could not be imported."""
    not_built = f"No module named 'caio.{module_name}'"
    if message.startswith("ModuleNotFoundError") and not_built in message:
        return (
            "native module not built/installed here (pure-Python install, "
            "unsupported platform, or built without this backend)\n" + message
        )
    hints = []
    lowered = message.lower()
    if "seccomp" in lowered or "enosys" in lowered:
        hints.append(
            "io_uring system calls are blocked (typically a container's seccomp profile)",
        )
    elif "not permitted" in lowered or "eperm" in lowered:
        hints.append(
            "io_uring is refused by the kernel; check the sysctl "
            "kernel.io_uring_disabled (0 allows it) or the container's "
            "security profile",
        )
    elif "requires linux" in lowered or "kernel supported since" in lowered:
        hints.append("the running kernel is too old for this backend")
    hints.append(message)
    return "\n".join(hints)


def backend_report() -> list[str]:
    lines = ["Backends (best first):"]
    for key, module_name, description in BACKENDS:
        module: ModuleType | None = getattr(caio, module_name)
        label = f"  {key:<7} {module_name:<12} "
        if module is not None:
            extra = ""
            if module_name == "linux_uring":
                allowed = getattr(module, "SQPOLL_ALLOWED", None)
                if allowed is not None:
                    extra = ", SQPOLL {}".format(
                        "allowed" if allowed else "not allowed",
                    )
            lines.append(f"{label}available ({description}{extra})")
        else:
            message = caio._import_errors.get(key, "unknown reason")
            lines.append(f"{label}unavailable ({description})")
            lines.append(
                _indent(explain_import_error(module_name, message), " " * 23),
            )
    return lines


def selection_report() -> list[str]:
    selected = caio.preferred_asyncio
    name = selected.__name__.rsplit(".", 1)[-1]
    lines = [
        f"Selected: `from caio import AsyncioContext` uses {name} "
        f"(CAIO_IMPL key {caio._selected_key!r})",
        f"  how: {caio._selection_reason}",
    ]
    env = os.environ.get("CAIO_IMPL")
    if env is not None:
        lines.append(f"  CAIO_IMPL={env!r}")
    default_file = os.path.join(
        os.path.dirname(os.path.abspath(caio.__file__)),
        "default_implementation",
    )
    if os.path.isfile(default_file):
        lines.append(f"  default_implementation file: {default_file}")
    lines.append(
        "  Override with CAIO_IMPL=uring|linux|thread|python, or import a "
        "backend directly (from caio.thread_aio_asyncio import "
        "AsyncioContext).",
    )
    return lines


async def _round_trip(adapter: ModuleType, directory: str) -> str:
    payload = os.urandom(8192) + b"caio self-test"
    fd, path = tempfile.mkstemp(prefix="caio-selftest-", dir=directory)
    try:
        context = adapter.AsyncioContext(max_requests=8)
        try:
            written = await context.write(payload, fd, 0)
            if written != len(payload):
                raise AssertionError(
                    f"write returned {written}, expected {len(payload)}",
                )
            data = await context.read(len(payload) + 100, fd, 0)
            if data != payload:
                raise AssertionError(
                    f"read back {len(data)} bytes that differ from what was written",
                )
            await context.fsync(fd)
            await context.fdsync(fd)
        finally:
            context.close()
    finally:
        os.close(fd)
        os.unlink(path)
    return "ok"


def self_test(adapter: ModuleType, directory: str) -> tuple[bool, str]:
    started = time.monotonic()
    try:
        asyncio.run(
            asyncio.wait_for(_round_trip(adapter, directory), SELF_TEST_TIMEOUT),
        )
    except asyncio.TimeoutError:
        return False, f"FAIL: no completion within {SELF_TEST_TIMEOUT:.0f} s"
    except Exception as exc:  # report every failure, keep testing the rest
        return False, f"FAIL: {type(exc).__name__}: {exc}"
    return True, f"ok ({(time.monotonic() - started) * 1000:.1f} ms)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m caio",
        description=(
            "Show which caio backends are available here, which one is "
            "used by default and why, and self-test each of them."
        ),
    )
    parser.add_argument(
        "--no-self-test",
        action="store_true",
        help="only print the report, do not run any I/O",
    )
    parser.add_argument(
        "--dir",
        default=None,
        help="directory for the self-test's temporary file "
        "(default: the system temp directory); use it to test a specific "
        "filesystem",
    )
    args = parser.parse_args(argv)

    print(f"caio {caio.__version__} ({os.path.dirname(os.path.abspath(caio.__file__))})")
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()})"
        f" on {platform.system()} {platform.release()} ({platform.machine()})"
    )
    print()
    for line in backend_report():
        print(line)
    print()
    for line in selection_report():
        print(line)

    if args.no_self_test:
        return 0

    directory = args.dir or tempfile.gettempdir()
    print()
    print(f"Self-test (write, read back, fsync, fdsync via AsyncioContext in {directory}):")
    failed = []
    for key, module_name, _ in BACKENDS:
        adapter = getattr(caio, module_name + "_asyncio")
        if adapter is None:
            print(f"  {key:<7} {module_name:<12} skipped (unavailable)")
            continue
        ok, text = self_test(adapter, directory)
        print(f"  {key:<7} {module_name:<12} {text}")
        sys.stdout.flush()
        if not ok:
            failed.append(module_name)

    print()
    if failed:
        print(
            "FAILED: {}. Select a working backend with CAIO_IMPL (see above).".format(
                ", ".join(failed)
            )
        )
        return 1
    print("All available backends passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
