# Single source of the package version: caio/__init__.py imports it and
# setup.py reads this file.  Upstream looked the version up at import time
# with importlib.metadata; a literal gives the same value when installed,
# also works from a source tree (PYTHONPATH, no dist-info) and costs no
# metadata scan on import.
__version__ = "0.12.11"
