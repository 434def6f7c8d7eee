"""caio.anyio.AnyioContext under anyio, on both of its backends (asyncio and
trio), on every caio backend.

The scenarios are in ``structured_scenarios.py`` (shared with
``test_trio.py``); this module supplies the ``lib`` fixture. Skipped where
anyio is not installed (the wheel tests run the suite without it); the trio
backend's parameters are skipped where trio is not installed.
"""

from collections.abc import Callable
from typing import Any

import pytest

anyio = pytest.importorskip("anyio")
if not hasattr(pytest.importorskip("anyio.lowlevel"), "current_token"):
    pytest.skip("needs anyio >= 4.11 (the `anyio` extra)", allow_module_level=True)

from caio.anyio import AnyioContext  # noqa: E402

from structured_scenarios import *  # noqa: E402,F403
from structured_scenarios import RUN_LIMIT, Lib  # noqa: E402


class AnyioLib(Lib):
    Context = AnyioContext
    import_source = "import anyio\nfrom caio.anyio import AnyioContext as Context"
    spawn_source = (
        "async with anyio.create_task_group() as n:\n"
        "        for k in range(1, 4):\n"
        "            n.start_soon(writes, 16 * k, 16)\n"
        "        await anyio.sleep(0)\n"
        "        spawn_fork()"
    )

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = "anyio+" + backend
        self.run_source = f"anyio.run(main, backend={backend!r})"

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def bounded() -> Any:
            with anyio.fail_after(RUN_LIMIT):
                return await fn(*args)

        return anyio.run(bounded, backend=self.backend)

    def task_group(self) -> Any:
        return anyio.create_task_group()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def move_on_after(self, seconds: float) -> Any:
        return anyio.move_on_after(seconds)

    def cancel_scope(self) -> Any:
        return anyio.CancelScope()

    def cancelled(self) -> type[BaseException]:
        return anyio.get_cancelled_exc_class()  # type: ignore[no-any-return]


def _have_trio() -> bool:
    try:
        import trio  # noqa: F401
    except ImportError:
        return False
    return True


_HAVE_TRIO = _have_trio()


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="anyio_asyncio"),
        pytest.param(
            "trio",
            id="anyio_trio",
            marks=pytest.mark.skipif(not _HAVE_TRIO, reason="trio is not installed"),
        ),
    ]
)
def lib(request: Any) -> Lib:
    return AnyioLib(request.param)


def test_native_asyncio_cancellation_through_the_shield(tmp_path: Any) -> None:
    """Under anyio's asyncio backend a plain ``task.cancel()`` (not an anyio
    scope) reaches through the shield; the operation is still waited for
    until the engine is done with it, then CancelledError propagates."""
    import asyncio
    import os

    import caio

    if caio.linux_uring is None:
        pytest.skip("linux_uring not available")
    r, w = os.pipe()
    state: dict[str, Any] = {}

    async def main() -> None:
        async with AnyioContext(backend="linux_uring") as ctx:
            op = ctx.OPERATION_CLASS.read(4, r, -1)
            task = asyncio.ensure_future(ctx.submit(op))
            await asyncio.sleep(0.05)
            for _ in range(3):
                task.cancel()
                await asyncio.sleep(0)
            try:
                await task
            except asyncio.CancelledError:
                state["cancelled"] = True
            state["error"] = op.error
            state["context"] = op.context

    try:
        asyncio.run(main())
    finally:
        os.close(r)
        os.close(w)
    assert state == {"cancelled": True, "error": 125, "context": None}


def test_closing_an_abandoned_coroutine_does_not_wait() -> None:
    """A coroutine closed while its read waits (what happens to the tasks of
    a loop that is gone) cannot wait any more: close() neither hangs nor
    complains; the op is cancelled in the engine, which still owns it until
    it is delivered."""
    import asyncio
    import os

    import caio

    if caio.linux_uring is None:
        pytest.skip("linux_uring not available")
    r, w = os.pipe()

    async def main() -> None:
        ctx = AnyioContext(backend="linux_uring")
        op = ctx.OPERATION_CLASS.read(4, r, -1)
        coro = ctx.submit(op)
        coro.send(None)  # submitted; now waiting for the completion fd
        assert op.context is ctx.context  # in flight
        coro.close()
        assert ctx._active == 0 and ctx._in_use == 0 and not ctx._polling
        for _ in range(100):
            if ctx.context._process_loop_events():
                break
            await asyncio.sleep(0.01)
        assert op.context is None and op.error == 125  # cancelled in the kernel
        ctx.close()

    try:
        asyncio.run(main())
    finally:
        os.close(r)
        os.close(w)
