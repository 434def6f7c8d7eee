"""Helpers shared by the test modules: ``from helpers import ...``.

Backend discovery (``MODULES``, ``NATIVE_MODULES``, ``KEYS``, ...), the
:class:`RawBackend` and :class:`AsyncBackend` drivers the fixtures hand out,
:class:`LoopRunner`, subprocess helpers (:func:`run_python`,
:func:`subprocess_env`) and small utilities. The fixtures and the pytest hooks
are in ``conftest.py``, which imports what it needs from here.
"""

import asyncio
import gc
import importlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import pytest

import caio

try:
    import uvloop
except ImportError:  # no wheel for this interpreter: no uvloop parameters
    uvloop = None

try:
    from hypothesis import HealthCheck
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # hypothesis is a test dependency; tolerate its absence here
    _hypothesis_settings = None


# -- discovery -------------------------------------------------------------------

NATIVE_NAMES = ("linux_uring", "linux_aio", "thread_aio")
ALL_NAMES = NATIVE_NAMES + ("python_aio",)

# The key CAIO_IMPL / default_implementation use for each backend.
KEYS = {
    "linux_uring": "uring",
    "linux_aio": "linux",
    "thread_aio": "thread",
    "python_aio": "python",
}

# Substring of Context.__doc__ identifying each backend (DESIGN.md §2.3).
CONTEXT_DOC = {
    "linux_uring": "io_uring AIO context",
    "linux_aio": "linux aio context representation",
    "thread_aio": "thread aio context",
    "python_aio": "python aio context implementation",
}


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module("caio." + name)
    except ImportError:
        return None


MODULES: dict[str, ModuleType] = {
    name: module for name in ALL_NAMES for module in [_import(name)] if module is not None
}
NATIVE_MODULES = {k: v for k, v in MODULES.items() if k != "python_aio"}

FREE_THREADED = hasattr(sys, "_is_gil_enabled") and not sys._is_gil_enabled()

# Default per-test time limit; every test must finish.
TEST_TIMEOUT = 60


# -- event loops -------------------------------------------------------------------


def _loop_kinds() -> list[str]:
    kinds = ["asyncio"] + (["uvloop"] if uvloop is not None else [])
    wanted = os.environ.get("CAIO_TEST_LOOPS")
    if wanted:
        kinds = [k for k in kinds if k in wanted.replace(",", " ").split()]
    return kinds


LOOP_KINDS = _loop_kinds()
LOOP_IDS = {"asyncio": "asyncio_loop", "uvloop": "uvloop"}


def new_event_loop(kind: str = "asyncio") -> asyncio.AbstractEventLoop:
    """A fresh event loop of the given kind (``asyncio`` or ``uvloop``)."""
    if kind == "uvloop":
        assert uvloop is not None
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


# -- hypothesis profiles --------------------------------------------------------------
#
# ``default`` keeps each property test to a few seconds on two shared cores;
# ``thorough`` is for a dedicated run:
#   CAIO_HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_reliability_model.py
# Deadlines are off: timing on a loaded CI box is not what these tests check
# (pytest-timeout catches hangs). Loaded when conftest.py imports this module,
# before any test module is collected.

if _hypothesis_settings is not None:
    _hypothesis_settings.register_profile(
        "default",
        max_examples=12,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        print_blob=True,
    )
    _hypothesis_settings.register_profile(
        "thorough",
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        print_blob=True,
    )
    _hypothesis_settings.load_profile(
        os.environ.get("CAIO_HYPOTHESIS_PROFILE", "default"),
    )


# -- raw backends ----------------------------------------------------------------


class RawBackend:
    """One backend module plus helpers to drive its completions."""

    def __init__(self, name: str, module: ModuleType):
        self.name = name
        self.module = module
        self.Context = module.Context
        self.Operation = module.Operation
        self._contexts: list[Any] = []

    def __repr__(self) -> str:
        return f"<RawBackend {self.name}>"

    native = property(lambda self: self.name != "python_aio")
    is_uring = property(lambda self: self.name == "linux_uring")
    is_linux_aio = property(lambda self: self.name == "linux_aio")
    is_thread = property(lambda self: self.name == "thread_aio")
    is_python = property(lambda self: self.name == "python_aio")
    # Backends whose completions are driven by the caller (eventfd model).
    is_linux = property(lambda self: self.name in ("linux_uring", "linux_aio"))

    def context(self, *args: Any, **kwargs: Any) -> Any:
        """A Context that is closed (where possible) at teardown."""
        ctx = self.Context(*args, **kwargs)
        self._contexts.append(ctx)
        return ctx

    def cleanup(self) -> None:
        for ctx in self._contexts:
            close = getattr(ctx, "close", None)
            if close is not None:
                close()
        self._contexts.clear()

    def drive(self, ctx: Any) -> int:
        """Deliver whatever completions are ready; returns how many."""
        delivered = 0
        if hasattr(ctx, "flush"):
            delivered += ctx.flush()
        if hasattr(ctx, "process_events"):
            delivered += ctx.process_events()
        return delivered

    def wait_for(
        self,
        ctx: Any,
        predicate: Callable[[], Any],
        timeout: float = 10.0,
        what: str = "condition",
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: timed out waiting for {what}",
                )
            if ctx is not None:
                self.drive(ctx)
            time.sleep(0.0005)

    def run(
        self,
        ctx: Any,
        *ops: Any,
        timeout: float = 10.0,
    ) -> list[Any]:
        """Submit ``ops`` in one call and wait for all their callbacks.

        Returns the callback arguments in operation order.
        """
        results: dict[int, Any] = {}

        def make_callback(index: int) -> Callable[[Any], None]:
            def callback(result: Any) -> None:
                results[index] = result

            return callback

        for index, op in enumerate(ops):
            op.set_callback(make_callback(index))
        accepted = ctx.submit(*ops)
        assert accepted == len(ops), (accepted, len(ops))
        self.wait_for(
            ctx,
            lambda: len(results) == len(ops),
            timeout,
            f"{len(ops)} completions",
        )
        return [results[i] for i in range(len(ops))]

    def run_one(self, ctx: Any, op: Any) -> Any:
        return self.run(ctx, op)[0]


def raw_params(names: Sequence[str]) -> list[Any]:
    return [pytest.param(name, id=name) for name in names if name in MODULES]


# -- asyncio backends --------------------------------------------------------------


class AsyncBackend:
    """An asyncio adapter module plus the constructor kwargs to use."""

    def __init__(self, name: str, module: ModuleType, kwargs: dict[str, Any]):
        self.name = name  # e.g. "linux_uring"
        self.module = module  # e.g. caio.linux_uring_asyncio
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"<AsyncBackend {self.name} {self.kwargs}>"

    is_uring = property(lambda self: self.name == "linux_uring")
    is_linux_aio = property(lambda self: self.name == "linux_aio")
    is_linux = property(lambda self: self.name in ("linux_uring", "linux_aio"))
    is_pool = property(lambda self: self.name in ("thread_aio", "python_aio"))

    def context(self, max_requests: int | None = None, **kwargs: Any) -> Any:
        options = dict(self.kwargs)
        options.update(kwargs)
        return self.module.AsyncioContext(max_requests, **options)


def async_params() -> list[Any]:
    params = []
    for adapter in caio.variants_asyncio:
        name = adapter.__name__.rsplit(".", 1)[-1][: -len("_asyncio")]
        params.append(pytest.param((name, adapter, {}), id=name + "_asyncio"))
        if name == "linux_uring":
            params.append(
                pytest.param(
                    (name, adapter, {"sqpoll": True}),
                    id="linux_uring_asyncio-sqpoll",
                )
            )
            params.append(
                pytest.param(
                    (name, adapter, {"sqpoll": False, "deferred": True}),
                    id="linux_uring_asyncio-nosqpoll-deferred",
                )
            )
        elif name == "linux_aio":
            params.append(
                pytest.param(
                    (name, adapter, {"deferred": True}),
                    id="linux_aio_asyncio-deferred",
                )
            )
    return params


class LoopRunner:
    """Runs coroutines on a private event loop and watches for trouble.

    Every call to the loop's exception handler (e.g. "exception was never
    retrieved", "Task was destroyed but it is pending") is recorded;
    :meth:`check` (called at teardown) asserts there were none.
    """

    def __init__(self, kind: str = "asyncio") -> None:
        self.kind = kind
        self.loop = new_event_loop(kind)
        self.handler_calls: list[dict[str, Any]] = []
        self.loop.set_exception_handler(self._handler)

    def _handler(self, loop: Any, context: dict[str, Any]) -> None:
        self.handler_calls.append(context)

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def settle(self) -> None:
        """Let pending callbacks run and finalise garbage: a few loop turns,
        one collection, then turns for what the finalisers scheduled."""
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))
        gc.collect()
        for _ in range(2):
            self.loop.run_until_complete(asyncio.sleep(0))

    def close(self) -> None:
        try:
            if not self.loop.is_closed():
                self.settle()
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()
        finally:
            gc.collect()

    def check(self) -> None:
        assert self.handler_calls == [], self.handler_calls


# -- files -----------------------------------------------------------------------


def tmpfs_root() -> str | None:
    candidate = "/dev/shm"
    if (
        sys.platform.startswith("linux")
        and os.path.isdir(candidate)
        and os.access(candidate, os.W_OK)
    ):
        return candidate
    return None


def aio_ring_count() -> int:
    """This process's kernel AIO rings (``[aio]`` mappings)."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if "[aio]" in line)


def read_file(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


# -- subprocesses ------------------------------------------------------------------


def caio_package_root() -> str:
    """The directory that contains the ``caio`` package being tested."""
    return os.path.dirname(os.path.dirname(os.path.abspath(caio.__file__)))


def subprocess_env(**overrides: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CAIO_IMPL", None)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [caio_package_root(), env.get("PYTHONPATH")]),
    )
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_python(
    args: Sequence[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = 60,
) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, *args],
        env=env if env is not None else subprocess_env(),
        cwd=cwd,
        timeout=timeout,
        capture_output=True,
        text=True,
    )


class Recorder:
    """Thread-safe list of callback results."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[Any] = []

    def __call__(self, value: Any) -> None:
        with self.lock:
            self.items.append(value)

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)
