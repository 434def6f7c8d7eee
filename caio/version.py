# The one source of the package version. caio/__init__.py imports it and the
# build takes it from here (pyproject.toml, [tool.setuptools.dynamic]).
# Cargo.toml's [workspace.package] version is kept equal
# (scripts/bump-version.sh sets both; tests/test_version.py checks them and
# the installed metadata). Upstream looked the version up at import time with
# importlib.metadata; a literal gives the same value when installed, also
# works from a source tree (PYTHONPATH, no dist-info) and costs no metadata
# scan on import.
__version__ = "0.12.11"
