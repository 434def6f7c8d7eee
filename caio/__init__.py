# Placeholder until the package front-end lands (selection per API.md §1).
from .version import __version__  # noqa: F401

try:
    from . import thread_aio, thread_aio_asyncio
except ImportError:
    thread_aio = thread_aio_asyncio = None

AsyncioContext = thread_aio_asyncio.AsyncioContext if thread_aio_asyncio else None
