"""Packaging: caio installs and works without a Rust toolchain (python_aio
only), the pure wheel is tagged py3-none-any, and the sdist carries
everything needed to build the native backends.

These build the package from a copy of the source tree with
``--no-build-isolation`` (setuptools and setuptools-rust come from the test
environment), so they need no network.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("setuptools")
pytest.importorskip("setuptools_rust")

IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "target",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.so",
    "*.pyd",
    ".pytest_cache",
    ".hypothesis",
    "results",
)


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("src") / "caio-src"
    shutil.copytree(ROOT, dst, ignore=IGNORE)
    return dst


def env_without_cargo():
    """PATH with every directory holding a `cargo` executable removed."""
    env = dict(os.environ)
    env.pop("CARGO", None)
    env.pop("CAIO_REQUIRE_RUST", None)
    keep = [
        d
        for d in env.get("PATH", "").split(os.pathsep)
        if d and not os.path.exists(os.path.join(d, "cargo"))
    ]
    env["PATH"] = os.pathsep.join(keep)
    # Make sure the interpreter itself is still reachable.
    assert shutil.which("cargo", path=env["PATH"]) is None
    return env


def pip(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.timeout(600)
def test_install_without_cargo_works_on_python_aio(source_copy, tmp_path):
    target = tmp_path / "site"
    env = env_without_cargo()
    r = pip(
        "install",
        "--no-build-isolation",
        "--no-deps",
        "--target",
        str(target),
        str(source_copy),
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list(target.glob("caio/*.so")), "no native module may be built"

    check = textwrap.dedent("""
        import asyncio, os, tempfile
        import caio
        assert caio.thread_aio is None and caio.linux_aio is None and caio.linux_uring is None
        assert caio.variants == (caio.python_aio,)
        assert caio.AsyncioContext is caio.python_aio_asyncio.AsyncioContext

        async def main():
            ctx = caio.AsyncioContext()
            with tempfile.TemporaryFile() as f:
                fd = f.fileno()
                assert await ctx.write(b"no rust needed", fd, 0) == 14
                assert await ctx.read(64, fd, 0) == b"no rust needed"
                await ctx.fsync(fd)
            ctx.close()
        asyncio.run(main())
        print("python_aio ok", caio.__version__)
    """)
    # -S: no site-packages, so a development (editable) install of caio
    # cannot shadow the one just installed into `target`.
    run_env = dict(env, PYTHONPATH=str(target))
    r = subprocess.run(
        [sys.executable, "-S", "-c", check],
        env=run_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "python_aio ok" in r.stdout


@pytest.mark.timeout(600)
def test_pure_wheel_is_platform_independent(source_copy, tmp_path):
    r = pip(
        "wheel",
        "--no-build-isolation",
        "--no-deps",
        "-w",
        str(tmp_path),
        str(source_copy),
        env=env_without_cargo(),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = [p.name for p in tmp_path.glob("*.whl")]
    assert len(wheels) == 1 and wheels[0].endswith("-py3-none-any.whl"), wheels


@pytest.mark.timeout(600)
def test_sdist_contains_the_rust_sources(source_copy, tmp_path):
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
        cwd=source_copy,
        env=env_without_cargo(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (sdist,) = tmp_path.glob("caio-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for required in [
        "Cargo.toml",
        "Cargo.lock",
        "setup.py",
        "pyproject.toml",
        "rust/core/Cargo.toml",
        "rust/core/build.rs",
        "rust/core/src/lib.rs",
        "rust/thread_aio/Cargo.toml",
        "rust/thread_aio/src/lib.rs",
        "caio/__init__.py",
        "caio/py.typed",
        "caio/thread_aio.pyi",
    ]:
        assert required in names, required
    assert not any(n.endswith((".so", ".pyd")) for n in names)
