"""Asynchronous file I/O for asyncio.

Backends, best first: ``linux_uring`` (io_uring), ``linux_aio`` (kernel AIO),
``thread_aio`` (native thread pool) and ``python_aio`` (pure Python, always
available).  ``from caio import AsyncioContext`` gives the best available one
unless the ``CAIO_IMPL`` environment variable or a ``default_implementation``
file next to this module asks for another.  ``python -m caio`` shows what is
available here and why.
"""

import os
import warnings
from importlib import import_module
from types import ModuleType

from . import python_aio, python_aio_asyncio
from .abstract import AbstractContext, AbstractOperation
from .version import __version__

__author__ = "Dmitry Orlov <me@mosquito.su>"

# Why each unavailable native backend could not be imported, keyed like
# CAIO_IMPL ("uring", "linux", "thread"); shown by ``python -m caio``.
_import_errors: dict[str, str] = {}


def _import_backend(
    key: str,
    native: str,
) -> tuple[ModuleType | None, ModuleType | None]:
    """Import a native backend together with its asyncio adapter.

    Only ImportError means "not available here" (both names become None);
    anything else is a real bug and propagates.  import_module() is used
    instead of ``from . import name`` because the latter turns a missing
    extension into a misleading "cannot import name ... (most likely due to
    a circular import)" message.
    """
    try:
        module = import_module("." + native, __name__)
        adapter = import_module("." + native + "_asyncio", __name__)
    except ImportError as exc:
        _import_errors[key] = "{}: {}".format(
            type(exc).__name__,
            str(exc) or "(no message)",
        )
        return None, None
    return module, adapter


linux_uring, linux_uring_asyncio = _import_backend("uring", "linux_uring")
linux_aio, linux_aio_asyncio = _import_backend("linux", "linux_aio")
thread_aio, thread_aio_asyncio = _import_backend("thread", "thread_aio")


variants = tuple(
    module for module in (linux_uring, linux_aio, thread_aio, python_aio) if module is not None
)
variants_asyncio = tuple(
    module
    for module in (
        linux_uring_asyncio,
        linux_aio_asyncio,
        thread_aio_asyncio,
        python_aio_asyncio,
    )
    if module is not None
)

preferred = variants[0]
preferred_asyncio = variants_asyncio[0]

# Filled in by _select_implementation(): the chosen key and how it was chosen.
_selected_key: str = ""
_selection_reason: str = ""


def _available_implementations() -> dict[str, tuple[ModuleType, ModuleType]]:
    candidates: dict[str, tuple[ModuleType | None, ModuleType | None]] = {
        "uring": (linux_uring, linux_uring_asyncio),
        "linux": (linux_aio, linux_aio_asyncio),
        "thread": (thread_aio, thread_aio_asyncio),
        "python": (python_aio, python_aio_asyncio),
    }
    return {
        key: (module, adapter)
        for key, (module, adapter) in candidates.items()
        if module is not None and adapter is not None
    }


def _read_default_implementation(
    path: str,
    available: dict[str, tuple[ModuleType, ModuleType]],
) -> str | None:
    """First line of the file naming an available backend, else ``None``.

    Blank lines, ``#`` comments, unknown and unavailable keys are skipped.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as fp:
            for line in fp:
                key = line.strip()
                if not key or key.startswith("#"):
                    continue
                if key in available:
                    return key
    except OSError as exc:
        # An unreadable file should not make "import caio" fail.
        warnings.warn(
            f"Cannot read {path}: {exc}",
            RuntimeWarning,
            stacklevel=1,
        )
    return None


def _select_implementation() -> None:
    global preferred, preferred_asyncio, _selected_key, _selection_reason

    available = _available_implementations()
    automatic = "automatic (best available)"
    chosen: str | None = None

    requested = os.environ.get("CAIO_IMPL")
    if requested:
        # Exact, case-sensitive match; when CAIO_IMPL is set the
        # default_implementation file is not consulted at all.
        if requested in available:
            chosen = requested
            reason = f"CAIO_IMPL={requested}"
        else:
            warnings.warn(
                f"CAIO_IMPL contains unsupported value {requested!r}. "
                f"Use one of {tuple(available)!r}",
                RuntimeWarning,
                stacklevel=1,
            )
            reason = f"{automatic}; CAIO_IMPL={requested!r} ignored (not an available backend)"
    else:
        path = os.path.join(
            os.path.dirname(os.path.abspath(__file__)),
            "default_implementation",
        )
        if os.path.isfile(path):
            chosen = _read_default_implementation(path, available)
            if chosen is not None:
                reason = f"default_implementation file: {chosen}"
            else:
                reason = f"{automatic}; default_implementation file names no available backend"
        else:
            reason = automatic

    if chosen is not None:
        preferred, preferred_asyncio = available[chosen]

    for key, (module, _adapter) in available.items():
        if module is preferred:
            _selected_key = key
            break
    _selection_reason = reason


_select_implementation()

Context = preferred.Context
Operation = preferred.Operation
AsyncioContext = preferred_asyncio.AsyncioContext


__all__ = (
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
)
