"""caio.trio.TrioContext under trio, on every backend.

The scenarios are in ``structured_scenarios.py`` (shared with
``test_anyio.py``); this module supplies the ``lib`` fixture and the checks
that only concern trio. Skipped where trio is not installed (the wheel tests
run the suite without it).
"""

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

trio = pytest.importorskip("trio", minversion="0.25")  # the `trio` extra

from caio.trio import TrioContext  # noqa: E402

from helpers import subprocess_env  # noqa: E402
from structured_scenarios import *  # noqa: E402,F403
from structured_scenarios import RUN_LIMIT, Lib  # noqa: E402


class TrioLib(Lib):
    name = "trio"
    Context = TrioContext
    import_source = "import trio\nfrom caio.trio import TrioContext as Context"
    run_source = "trio.run(main)"
    spawn_source = (
        "async with trio.open_nursery() as n:\n"
        "        for k in range(1, 4):\n"
        "            n.start_soon(writes, 16 * k, 16)\n"
        "        await trio.sleep(0)\n"
        "        spawn_fork()"
    )

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def bounded() -> Any:
            with trio.fail_after(RUN_LIMIT):
                return await fn(*args)

        return trio.run(bounded)

    def task_group(self) -> Any:
        return trio.open_nursery()

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    def move_on_after(self, seconds: float) -> Any:
        return trio.move_on_after(seconds)

    def cancel_scope(self) -> Any:
        return trio.CancelScope()

    def cancelled(self) -> type[BaseException]:
        return trio.Cancelled  # type: ignore[no-any-return]


@pytest.fixture
def lib() -> Lib:
    return TrioLib()


def test_importing_caio_imports_neither_trio_nor_anyio() -> None:
    code = (
        "import sys, caio, caio.linux_uring_asyncio, caio.python_aio_asyncio\n"
        "print(sorted(m for m in ('trio', 'anyio') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_caio_impl_selects_the_backend() -> None:
    """No backend named: CAIO_IMPL applies, as for ``from caio import
    AsyncioContext`` (the rule lives in caio/__init__.py only)."""
    code = (
        "import trio\nfrom caio.trio import TrioContext\n"
        "import caio\nctx = TrioContext()\nprint(ctx.backend, caio._selected_key)\nctx.close()"
    )
    for key, name in (("python", "python_aio"), ("thread", "thread_aio")):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=subprocess_env(CAIO_IMPL=key),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        if proc.stdout.split()[1] == key:  # available here
            assert proc.stdout.split() == [name, key]


def test_trio_cancelled_in_engine_raises_cancelled_not_the_op_error() -> None:
    """A nursery cancelled while reads wait: every task sees trio.Cancelled
    (never OperationError(ECANCELED)), so the nursery exits cleanly."""
    import os

    import caio

    if caio.linux_uring is None:
        pytest.skip("linux_uring not available")
    r, w = os.pipe()
    seen: list[str] = []

    async def reader(ctx: Any) -> None:
        try:
            await ctx.read(4, r, -1)
        except trio.Cancelled:
            seen.append("cancelled")
            raise

    async def main() -> None:
        async with TrioContext(backend="linux_uring") as ctx:
            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(reader, ctx)
                await trio.sleep(0.05)
                n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        os.close(r)
        os.close(w)
    assert seen == ["cancelled"] * 8


def test_unavailable_backend_is_refused(monkeypatch: Any) -> None:
    """A backend named but not usable here: RuntimeError naming why."""
    import caio

    available = caio._available_implementations()
    available.pop("uring", None)
    monkeypatch.setattr(caio, "_available_implementations", lambda: available)
    monkeypatch.setitem(caio._import_errors, "uring", "ImportError: no io_uring here")
    with pytest.raises(RuntimeError, match="no io_uring here"):
        TrioContext(backend="linux_uring")
    with pytest.raises(ValueError, match="unknown backend"):
        TrioContext(backend="io_uring")
