"""Shared fixtures for the caio test-suite.

Every fixture here is parametrised over the backends that are *importable at
run time*, so native backends join the suite automatically once they are
built:

* ``backend``        raw API, native modules + ``python_aio``
* ``native_backend`` raw API, native modules only
* ``async_backend``  asyncio adapters from ``caio.variants_asyncio`` plus the
                     extra configurations of DESIGN.md §5.8.1, §5.8.2 ("uring
                     sqpoll=True", "uring sqpoll=False deferred=True",
                     "linux_aio deferred=True") when those modules exist.

Test ids name the backend (``[linux_uring]``, ``[linux_aio_asyncio-deferred]``).

Event loops: the ``aio`` fixture (and ``loop_kind``) is parametrised over
asyncio's default loop (id ``asyncio_loop``) and, when the ``uvloop`` package
is installed, uvloop (id ``uvloop``). So every asyncio-level test runs on both
loops, while the raw-API tests (which use no loop) run once.
``CAIO_TEST_LOOPS=asyncio`` (or ``uvloop``) restricts the set.

Hypothesis: profiles ``default`` (few examples, keeps the suite fast) and
``thorough`` (many more); pick one with ``CAIO_HYPOTHESIS_PROFILE=thorough``.

This file holds the fixtures and pytest hooks only; what test modules share
besides fixtures (backend discovery, drivers, subprocess helpers) is in
``helpers.py``: ``from helpers import ...``.
"""

import faulthandler
import gc
import os
import shutil
import sys
import tempfile
from typing import Any

import pytest

# helpers.py is not a test module: have pytest rewrite its asserts too (the
# drivers' and LoopRunner.check()'s failure messages), as it did while they
# lived in this file.
pytest.register_assert_rewrite("helpers")

from helpers import (  # noqa: E402
    ALL_NAMES,
    LOOP_IDS,
    LOOP_KINDS,
    MODULES,
    NATIVE_NAMES,
    TEST_TIMEOUT,
    AsyncBackend,
    LoopRunner,
    RawBackend,
    async_params,
    raw_params,
    tmpfs_root,
)

# -- event loops -------------------------------------------------------------------


@pytest.fixture(params=[pytest.param(k, id=LOOP_IDS[k]) for k in LOOP_KINDS])
def loop_kind(request: Any) -> str:
    """``"asyncio"`` or ``"uvloop"`` (the latter only when installed)."""
    return request.param


# -- pytest hooks ------------------------------------------------------------------


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers",
        "slow: takes more than a few seconds (deselect with -m 'not slow')",
    )
    # An exception escaping a finaliser or a thread is a bug here, not noise.
    config.addinivalue_line(
        "filterwarnings",
        "error::pytest.PytestUnraisableExceptionWarning",
    )
    config.addinivalue_line(
        "filterwarnings",
        "error::pytest.PytestUnhandledThreadExceptionWarning",
    )
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line(
            "markers",
            "timeout(seconds): per-test time limit",
        )


def pytest_collection_finish(session: Any) -> None:
    """Freeze the long-lived objects (pytest, hypothesis, collected items)
    out of the garbage collector's view: the many ``gc.collect()`` calls of
    the suite then scan only what the tests themselves create. Their cost
    was most of a typical asyncio test's time."""
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


@pytest.fixture(autouse=True)
def _hang_guard(request: Any) -> Any:
    """Fallback watchdog when pytest-timeout is not installed.

    Dumps every thread's stack and exits the process instead of hanging CI.
    """
    if request.config.pluginmanager.hasplugin("timeout"):
        yield
        return
    marker = request.node.get_closest_marker("timeout")
    limit = marker.args[0] if marker else TEST_TIMEOUT
    faulthandler.dump_traceback_later(limit, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# -- raw backends ----------------------------------------------------------------


def _make_backend(request: Any) -> Any:
    backend = RawBackend(request.param, MODULES[request.param])
    request.addfinalizer(backend.cleanup)
    return backend


@pytest.fixture(params=raw_params(ALL_NAMES))
def backend(request: Any) -> RawBackend:
    return _make_backend(request)


@pytest.fixture(params=raw_params(NATIVE_NAMES))
def native_backend(request: Any) -> RawBackend:
    return _make_backend(request)


@pytest.fixture(params=raw_params(("linux_uring", "linux_aio")))
def linux_backend(request: Any) -> RawBackend:
    return _make_backend(request)


@pytest.fixture(params=raw_params(("thread_aio", "python_aio")))
def pool_backend(request: Any) -> RawBackend:
    return _make_backend(request)


@pytest.fixture(params=raw_params(("linux_uring", "thread_aio")))
def completion_error_backend(request: Any) -> RawBackend:
    """Native backends that report I/O errors at completion (not linux_aio,
    which rejects most bad requests in submit())."""
    return _make_backend(request)


@pytest.fixture(params=raw_params(("linux_uring",)))
def uring(request: Any) -> RawBackend:
    return _make_backend(request)


@pytest.fixture(params=raw_params(("linux_aio",)))
def linux_aio(request: Any) -> RawBackend:
    return _make_backend(request)


@pytest.fixture(params=raw_params(("thread_aio",)))
def thread_aio(request: Any) -> RawBackend:
    return _make_backend(request)


@pytest.fixture
def python_aio() -> Any:
    backend = RawBackend("python_aio", MODULES["python_aio"])
    yield backend
    backend.cleanup()


# -- asyncio backends --------------------------------------------------------------


@pytest.fixture(params=async_params())
def async_backend(request: Any) -> AsyncBackend:
    name, module, kwargs = request.param
    return AsyncBackend(name, module, kwargs)


@pytest.fixture
def aio(loop_kind: str) -> Any:
    """A :class:`LoopRunner` on each available loop kind (asyncio, uvloop)."""
    runner = LoopRunner(loop_kind)
    try:
        yield runner
        runner.close()
        runner.check()
    finally:
        if not runner.loop.is_closed():
            runner.loop.close()


# -- files -----------------------------------------------------------------------


@pytest.fixture
def tmp_fd(tmp_path: Any) -> Any:
    """A read/write fd of an empty file on the test's tmp_path."""
    fd = os.open(str(tmp_path / "data.bin"), os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    try:
        os.close(fd)
    except OSError:
        pass


@pytest.fixture
def fast_dir(tmp_path: Any) -> Any:
    """A directory where fsync is cheap (tmpfs if available)."""
    root = tmpfs_root()
    if root is None:
        yield str(tmp_path)
        return
    path = tempfile.mkdtemp(prefix="caio-test-", dir=root)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fast_fd(fast_dir: str) -> Any:
    fd = os.open(os.path.join(fast_dir, "data.bin"), os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    try:
        os.close(fd)
    except OSError:
        pass


@pytest.fixture
def closed_fd() -> int:
    """An fd number that is not open (and will not be opened meanwhile).

    Picked high, above anything the test process (event loops, pools) is
    likely to open, and checked with fstat().
    """
    candidate = 4093
    while True:
        try:
            os.fstat(candidate)
        except OSError:
            return candidate
        candidate += 1


# -- reliability figures -------------------------------------------------------------


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Prints the counters the reliability tests keep (examples run, faults
    injected, kills survived...): each ``test_reliability_*`` module may hold
    a ``STATS`` dict."""
    lines = []
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("test_reliability_"):
            continue
        stats = getattr(module, "STATS", None)
        if stats:
            lines.append(
                "{}: {}".format(
                    name,
                    ", ".join(f"{value} {key}" for key, value in sorted(stats.items())),
                )
            )
    if lines:
        terminalreporter.section("reliability figures")
        for line in lines:
            terminalreporter.write_line(line)
