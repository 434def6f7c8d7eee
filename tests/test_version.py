"""One version everywhere.

The version's single source is ``caio/version.py`` (``setup.py`` takes it
from there through ``[tool.setuptools.dynamic]``). Cargo needs a literal of
its own, so ``Cargo.toml``'s ``[workspace.package] version`` (and the
workspace crates in ``Cargo.lock``) must be kept equal to it by hand: these
tests fail when they drift (CONTRIBUTING.md, "Release").
"""

import importlib.metadata
import os
import re

import pytest

import caio
from caio import version as version_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARGO_TOML = os.path.join(ROOT, "Cargo.toml")
CARGO_LOCK = os.path.join(ROOT, "Cargo.lock")


def _read(path: str) -> str:
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found (tests run outside the source tree)")
    with open(path, encoding="utf-8") as fp:
        return fp.read()


def cargo_workspace_version() -> str:
    text = _read(CARGO_TOML)
    try:
        import tomllib
    except ImportError:  # Python 3.10: the one key we need, by hand
        section = re.search(r"^\[workspace\.package\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        assert section is not None, "Cargo.toml has no [workspace.package] section"
        match = re.search(r'^version\s*=\s*"([^"]+)"', section.group(1), re.M)
        assert match is not None, "Cargo.toml: [workspace.package] has no version"
        return match.group(1)
    version = tomllib.loads(text)["workspace"]["package"]["version"]
    assert isinstance(version, str)
    return version


def test_version_is_a_release_number() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", caio.__version__), caio.__version__
    assert caio.__version__ == version_module.__version__
    assert caio.__version__.startswith("0.12."), "a drop-in for upstream caio 0.12.x"


def test_cargo_workspace_version_matches() -> None:
    assert cargo_workspace_version() == caio.__version__, (
        "Cargo.toml [workspace.package] version differs from caio/version.py"
    )


def test_cargo_lock_matches() -> None:
    """The workspace crates in Cargo.lock carry the same version (cargo
    rewrites them on the next build after a bump; commit that)."""
    packages = re.findall(
        r'^\[\[package\]\]\nname = "(caio-[^"]+)"\nversion = "([^"]+)"',
        _read(CARGO_LOCK),
        re.M,
    )
    assert packages, "no caio-* crates in Cargo.lock"
    assert {name: caio.__version__ for name, _ in packages} == dict(packages)


def test_installed_metadata_matches() -> None:
    try:
        installed = importlib.metadata.version("caio")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("caio is imported from a source tree without installed metadata")
    assert installed == caio.__version__, (
        f"installed metadata says {installed}, caio.__version__ is {caio.__version__}"
        " (reinstall: make develop)"
    )
