"""The ``caio`` package itself: names, backend selection, ``python -m caio``
and the README usage example (DESIGN.md §2, §5.9)."""

import importlib.metadata
import os
import re
import shutil
import sys
import textwrap
from typing import Any

import pytest

import caio

from helpers import (
    CONTEXT_DOC,
    KEYS,
    run_python,
    subprocess_env,
)

HERE = os.path.dirname(os.path.abspath(__file__))

# Backend keys usable for selection: module and adapter both importable.
AVAILABLE_KEYS = [KEYS[module.__name__.rsplit(".", 1)[-1]] for module in caio.variants]
KEY_TO_NAME = {key: name for name, key in KEYS.items()}

EXPECTED_ALL = [
    "AbstractContext",
    "AbstractOperation",
    "AsyncioContext",
    "Context",
    "Operation",
    "__author__",
    "__version__",
    "linux_aio",
    "linux_aio_asyncio",
    "linux_uring",
    "linux_uring_asyncio",
    "python_aio",
    "python_aio_asyncio",
    "thread_aio",
    "thread_aio_asyncio",
    "variants",
    "variants_asyncio",
]


# -- names ---------------------------------------------------------------------------


def test_dunder_all() -> None:
    assert list(caio.__all__) == EXPECTED_ALL
    for name in caio.__all__:
        assert hasattr(caio, name), name
    assert "preferred" not in caio.__all__
    assert "preferred_asyncio" not in caio.__all__


def test_abstract_classes_exported() -> None:
    from caio.abstract import AbstractContext, AbstractOperation

    assert caio.AbstractContext is AbstractContext
    assert caio.AbstractOperation is AbstractOperation
    # Instantiable, with NotImplementedError members (DESIGN.md §2.6).
    ctx = AbstractContext()
    with pytest.raises(NotImplementedError):
        _ = ctx.max_requests
    with pytest.raises(NotImplementedError):
        ctx.submit()
    with pytest.raises(NotImplementedError):
        ctx.cancel()


def test_asyncio_base_names() -> None:
    import typing

    from caio import abstract, asyncio_base

    for alias, cls in (
        (asyncio_base.ContextType, abstract.AbstractContext),
        (asyncio_base.OperationType, abstract.AbstractOperation),
    ):
        assert typing.get_origin(alias) is type
        assert typing.get_args(alias) == (cls,)
    assert asyncio_base.AsyncioContextBase.MAX_REQUESTS_DEFAULT == 512
    assert caio.AsyncioContext.MAX_REQUESTS_DEFAULT == 512


def test_version_and_author() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", caio.__version__)
    assert caio.__author__ == "Dmitry Orlov <me@mosquito.su>"


def test_version_matches_installed_distribution() -> None:
    try:
        dist = importlib.metadata.distribution("caio")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("caio is imported from a source tree, not installed")
    located = os.path.realpath(str(dist.locate_file("caio/__init__.py")))
    if located != os.path.realpath(caio.__file__):
        pytest.skip("the installed distribution is not the imported package")
    assert dist.version == caio.__version__


def test_backend_names_are_module_or_none() -> None:
    for name in ("linux_uring", "linux_aio", "thread_aio"):
        module = getattr(caio, name)
        adapter = getattr(caio, name + "_asyncio")
        # Imported together: both available or both None.
        assert (module is None) == (adapter is None), name
        if module is not None:
            assert module.__name__ == "caio." + name
            assert adapter.AsyncioContext.CONTEXT_CLASS is module.Context
    # "from caio import x" never raises for an unavailable backend.
    from caio import linux_aio_asyncio, linux_uring_asyncio, thread_aio_asyncio  # noqa: F401


def test_variants_order() -> None:
    order = ["linux_uring", "linux_aio", "thread_aio", "python_aio"]
    names = [m.__name__.rsplit(".", 1)[-1] for m in caio.variants]
    adapters = [m.__name__.rsplit(".", 1)[-1] for m in caio.variants_asyncio]
    assert isinstance(caio.variants, tuple)
    assert isinstance(caio.variants_asyncio, tuple)
    assert names == [n for n in order if getattr(caio, n) is not None]
    assert adapters == [n + "_asyncio" for n in names]
    assert names[-1] == "python_aio"


def test_context_names_follow_preferred() -> None:
    assert caio.Context is caio.preferred.Context
    assert caio.Operation is caio.preferred.Operation
    assert caio.AsyncioContext is caio.preferred_asyncio.AsyncioContext
    assert caio.preferred in caio.variants
    assert caio.preferred_asyncio in caio.variants_asyncio


def test_import_errors_are_recorded() -> None:
    for name in ("linux_uring", "linux_aio", "thread_aio"):
        key = KEYS[name]
        if getattr(caio, name) is None:
            assert caio._import_errors[key].strip()
        else:
            assert key not in caio._import_errors


# -- selection (DESIGN.md §2.3) ---------------------------------------------------


PROBE = textwrap.dedent("""
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import caio
    print(json.dumps({
        "file": caio.__file__,
        "doc": caio.Context.__doc__,
        "preferred": caio.preferred.__name__,
        "preferred_asyncio": caio.preferred_asyncio.__name__,
        "asyncio_ok": caio.AsyncioContext is caio.preferred_asyncio.AsyncioContext,
        "reason": getattr(caio, "_selection_reason", None),
        "warnings": [(w.category.__name__, str(w.message)) for w in caught],
    }))
""")


def probe(env: dict[str, str], cwd: str | None = None) -> dict[str, Any]:
    import json

    proc = run_python(["-c", PROBE], env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def default_name() -> str:
    return caio.variants[0].__name__


@pytest.mark.parametrize("key", AVAILABLE_KEYS)
def test_caio_impl_selects_backend(key: str) -> None:
    result = probe(subprocess_env(CAIO_IMPL=key))
    name = KEY_TO_NAME[key]
    assert CONTEXT_DOC[name] in result["doc"]
    assert result["preferred"] == "caio." + name
    assert result["preferred_asyncio"] == "caio." + name + "_asyncio"
    assert result["asyncio_ok"]
    assert result["warnings"] == []


def test_automatic_selection_is_best_available() -> None:
    result = probe(subprocess_env())
    assert result["preferred"] == default_name()
    assert result["warnings"] == []


@pytest.mark.parametrize("value", ["bogus", "PYTHON", " python", "python ", "aio"])
def test_invalid_caio_impl_warns_and_keeps_default(value: str) -> None:
    result = probe(subprocess_env(CAIO_IMPL=value))
    assert result["preferred"] == default_name()
    expected = (
        f"CAIO_IMPL contains unsupported value {value!r}. Use one of {tuple(AVAILABLE_KEYS)!r}"
    )
    assert result["warnings"] == [["RuntimeWarning", expected]]


def test_empty_caio_impl_counts_as_unset() -> None:
    result = probe(subprocess_env(CAIO_IMPL=""))
    assert result["preferred"] == default_name()
    assert result["warnings"] == []


@pytest.fixture
def package_copy(tmp_path: Any) -> str:
    """A private copy of the caio package (native modules included).

    Tests write ``default_implementation`` files and fake modules into the
    copy, never into the package under test.
    """
    source = os.path.dirname(os.path.abspath(caio.__file__))
    root = tmp_path / "site"
    shutil.copytree(
        source,
        str(root / "caio"),
        ignore=shutil.ignore_patterns("__pycache__", "default_implementation"),
    )
    return str(root)


def copy_env(root: str, **overrides: str | None) -> dict[str, str]:
    env = subprocess_env(**overrides)
    env["PYTHONPATH"] = root
    return env


def write_default(root: str, text: str) -> None:
    with open(os.path.join(root, "caio", "default_implementation"), "w") as fp:
        fp.write(text)


def test_default_implementation_file(package_copy: str) -> None:
    unavailable = [k for k in ("uring", "linux", "thread") if k not in AVAILABLE_KEYS]
    lines = ["# distro default", "", "   ", "nonsense", *unavailable, "  python  ", "thread"]
    write_default(package_copy, "\n".join(lines) + "\n")
    result = probe(copy_env(package_copy), cwd=package_copy)
    assert result["file"].startswith(package_copy)
    assert CONTEXT_DOC["python_aio"] in result["doc"]
    assert result["preferred"] == "caio.python_aio"
    assert result["warnings"] == []


def test_selection_reason_default_implementation(package_copy: str) -> None:
    write_default(package_copy, "# comment\nbogus\npython\n")
    result = probe(copy_env(package_copy), cwd=package_copy)
    assert result["reason"] == "default_implementation file: python"
    write_default(package_copy, "bogus\n")
    result = probe(copy_env(package_copy), cwd=package_copy)
    assert result["reason"].startswith("automatic (best available)")


@pytest.mark.parametrize("key", AVAILABLE_KEYS)
def test_default_implementation_file_each_key(package_copy: str, key: str) -> None:
    write_default(package_copy, f"# comment\nunknown\n{key}\n")
    result = probe(copy_env(package_copy), cwd=package_copy)
    assert result["preferred"] == "caio." + KEY_TO_NAME[key]


def test_default_implementation_without_match_keeps_default(package_copy: str) -> None:
    write_default(package_copy, "# nothing useful\nfoo\nbar\n")
    result = probe(copy_env(package_copy), cwd=package_copy)
    assert result["preferred"] == default_name()
    assert result["warnings"] == []


def test_caio_impl_wins_over_file(package_copy: str) -> None:
    write_default(package_copy, "python\n")
    key = AVAILABLE_KEYS[0]
    result = probe(copy_env(package_copy, CAIO_IMPL=key), cwd=package_copy)
    assert result["preferred"] == "caio." + KEY_TO_NAME[key]


def test_selection_reason_caio_impl(package_copy: str) -> None:
    write_default(package_copy, "python\n")
    key = AVAILABLE_KEYS[0]
    result = probe(copy_env(package_copy, CAIO_IMPL=key), cwd=package_copy)
    assert result["reason"] == f"CAIO_IMPL={key}"
    result = probe(copy_env(package_copy, CAIO_IMPL="nope"), cwd=package_copy)
    assert "CAIO_IMPL='nope' ignored" in result["reason"]


def test_invalid_caio_impl_ignores_file(package_copy: str) -> None:
    write_default(package_copy, "python\n")
    result = probe(copy_env(package_copy, CAIO_IMPL="nope"), cwd=package_copy)
    assert result["preferred"] == default_name()
    assert [w[0] for w in result["warnings"]] == ["RuntimeWarning"]


def test_default_implementation_directory_is_ignored(package_copy: str) -> None:
    os.mkdir(os.path.join(package_copy, "caio", "default_implementation"))
    result = probe(copy_env(package_copy), cwd=package_copy)
    assert result["preferred"] == default_name()


def test_selection_reason_automatic() -> None:
    result = probe(subprocess_env())
    assert result["reason"] == "automatic (best available)"
    assert probe(subprocess_env(CAIO_IMPL="python"))["reason"] == "CAIO_IMPL=python"


def _replace_backend(root: str, name: str, native: str, adapter: str) -> None:
    package = os.path.join(root, "caio")
    for entry in os.listdir(package):
        if entry.split(".")[0] in (name, name + "_asyncio"):
            os.remove(os.path.join(package, entry))
    with open(os.path.join(package, name + ".py"), "w") as fp:
        fp.write(native)
    with open(os.path.join(package, name + "_asyncio.py"), "w") as fp:
        fp.write(adapter)


def test_only_import_error_marks_backend_unavailable(package_copy: str) -> None:
    _replace_backend(
        package_copy,
        "thread_aio",
        "raise ImportError('thread pool not supported here')\n",
        "from .thread_aio import Context, Operation\n",
    )
    proc = run_python(
        ["-c", "import caio; print(caio.thread_aio, caio.thread_aio_asyncio)"],
        env=copy_env(package_copy),
        cwd=package_copy,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["None None"]


def test_import_error_message_is_recorded(package_copy: str) -> None:
    _replace_backend(
        package_copy,
        "thread_aio",
        "raise ImportError('thread pool not supported here')\n",
        "from .thread_aio import Context, Operation\n",
    )
    proc = run_python(
        ["-c", "import caio; print(caio._import_errors['thread'])"],
        env=copy_env(package_copy),
        cwd=package_copy,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "ImportError: thread pool not supported here",
    ]


def test_failing_adapter_disables_the_pair(package_copy: str) -> None:
    _replace_backend(
        package_copy,
        "thread_aio",
        "Context = Operation = None\n",
        "raise ImportError('adapter broken')\n",
    )
    proc = run_python(
        [
            "-c",
            "import caio; print(caio.thread_aio, caio.thread_aio_asyncio);"
            "print(caio.thread_aio in caio.variants)",
        ],
        env=copy_env(package_copy),
        cwd=package_copy,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["None None", "False"]


def test_other_errors_break_the_import(package_copy: str) -> None:
    _replace_backend(
        package_copy,
        "thread_aio",
        "raise RuntimeError('a real bug')\n",
        "from .thread_aio import Context, Operation\n",
    )
    proc = run_python(["-c", "import caio"], env=copy_env(package_copy), cwd=package_copy)
    assert proc.returncode != 0
    assert "RuntimeError: a real bug" in proc.stderr


# -- python -m caio -----------------------------------------------------------------------


def test_main_reports_everything(tmp_path: Any) -> None:
    proc = run_python(["-m", "caio", "--dir", str(tmp_path)], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"caio {caio.__version__}" in out
    for name in ("linux_uring", "linux_aio", "thread_aio", "python_aio"):
        lines = [line for line in out.splitlines() if re.search(rf"\b{name}\b", line)]
        status = lines[0]
        if getattr(caio, name) is not None:
            assert "available" in status and "unavailable" not in status
            assert any(re.search(r"\bok\b", line) for line in lines[1:]), out
        else:
            assert "unavailable" in status
            message = caio._import_errors[KEYS[name]].splitlines()[0]
            assert message in out
    assert "automatic (best available)" in out
    assert caio.preferred_asyncio.__name__.rsplit(".", 1)[-1] in out
    assert "All available backends passed." in out
    assert os.listdir(str(tmp_path)) == []  # the self-test cleaned up


def test_main_explains_caio_impl() -> None:
    proc = run_python(
        ["-m", "caio", "--no-self-test"],
        env=subprocess_env(CAIO_IMPL="python"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "CAIO_IMPL=python" in proc.stdout
    assert "python_aio_asyncio" in proc.stdout
    assert "Self-test" not in proc.stdout


def test_main_fails_when_a_backend_fails() -> None:
    script = textwrap.dedent("""
        import runpy
        import caio.python_aio_asyncio as adapter

        async def broken_read(self, nbytes, fd, offset, priority=0):
            return b"garbage"

        adapter.AsyncioContext.read = broken_read
        runpy.run_module("caio", run_name="__main__")
    """)
    proc = run_python(["-c", script])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"python_aio\s+FAIL", proc.stdout), proc.stdout


def test_main_in_process(
    capsys: pytest.CaptureFixture, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from caio import __main__ as main_module

    assert main_module.main(["--dir", str(tmp_path)]) == 0
    assert "python_aio" in capsys.readouterr().out

    async def broken_fsync(self: Any, fd: int) -> None:
        raise OSError(5, "simulated I/O error")

    for adapter in caio.variants_asyncio:
        monkeypatch.setattr(adapter.AsyncioContext, "fsync", broken_fsync)
    assert main_module.main(["--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "simulated I/O error" in out
    assert "FAILED" in out


def test_main_explanations() -> None:
    from caio.__main__ import explain_import_error

    missing = explain_import_error(
        "linux_aio",
        "ModuleNotFoundError: No module named 'caio.linux_aio'",
    )
    assert "not built" in missing
    blocked = explain_import_error(
        "linux_uring",
        "ImportError: io_uring_setup(2) returns ENOSYS: seccomp",
    )
    assert "seccomp" in blocked
    refused = explain_import_error(
        "linux_uring",
        "ImportError: io_uring_setup probe failed: Operation not permitted",
    )
    assert "io_uring_disabled" in refused


# -- the README example (seed 004) ----------------------------------------------------------


@pytest.mark.parametrize("key", [None, *AVAILABLE_KEYS], ids=lambda k: k or "default")
def test_seed_usage_example(tmp_path: Any, key: str | None) -> None:
    """The upstream README example runs unchanged (tests/seed_example.py is
    its code block, verbatim)."""
    env = subprocess_env(CAIO_IMPL=key)
    example = os.path.join(HERE, "seed_example.py")
    proc = run_python([example], env=env, cwd=str(tmp_path))
    if sys.version_info >= (3, 14):
        # Python 3.14 removed the implicit loop of asyncio.get_event_loop(): the
        # example's first line fails there before caio is used (upstream's
        # README example likewise). Check exactly that, then run the example
        # verbatim with an event loop installed first.
        assert proc.returncode == 1, proc.stderr
        assert "loop = asyncio.get_event_loop()" in proc.stderr, proc.stderr
        assert "RuntimeError: There is no current event loop" in proc.stderr, proc.stderr
        assert not (tmp_path / "test.file").exists()
        prelude = (
            "import asyncio, runpy, sys; asyncio.set_event_loop(asyncio.new_event_loop()); "
            "runpy.run_path(sys.argv[1], run_name='__main__')"
        )
        proc = run_python(["-c", prelude, example], env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "b'Hello world'",
        "b'Hello from async world'",
    ]
    # Only warnings are tolerated (3.12+ deprecates get_event_loop() here).
    assert "Traceback" not in proc.stderr
    assert "Exception ignored" not in proc.stderr
    assert (tmp_path / "test.file").read_bytes() == b"Hello from async world"


def test_seed_example_is_verbatim() -> None:
    seeds = os.environ.get("CAIO_SEEDS_DIR", "/work/shared/seeds")
    seed = os.path.join(seeds, "004_4850f737acf41f2e.txt")
    if not os.path.exists(seed):
        pytest.skip("seed documents not available here")
    with open(seed) as fp:
        block = re.findall(r"```python\n(.*?)```", fp.read(), re.S)[0]
    with open(os.path.join(HERE, "seed_example.py")) as fp:
        assert fp.read() == block
