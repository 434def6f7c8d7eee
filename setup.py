"""Build script: the Rust extensions are optional.

* No cargo on PATH (or ``CAIO_NO_RUST=1``): a pure-Python install — caio works
  on its ``python_aio`` backend.
* ``CAIO_REQUIRE_RUST=1`` (CI, wheel builds): a failing Rust build is an error
  instead of a silent fallback.
* Linux-only backends (``linux_aio``, ``linux_uring``) are built on Linux only.
* ``CAIO_TEST_HOOKS=1`` (``scripts/dev-setup.sh``, so ``make develop``/``make test``):
  the extensions are built with the ``test-hooks`` cargo feature and honour the
  ``CAIO_TEST_*`` environment variables the test suite uses to fake a kernel or a
  failing probe. Release wheels are built without it and never read them.
"""

import os
import shutil
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# module name -> (crate directory, platforms it is built for)
NATIVE_MODULES = {
    "linux_uring": ("rust/linux_uring", ("linux",)),
    "linux_aio": ("rust/linux_aio", ("linux",)),
    "thread_aio": ("rust/thread_aio", None),
}


def rust_extensions():
    if os.environ.get("CAIO_NO_RUST") == "1":
        return []
    required = os.environ.get("CAIO_REQUIRE_RUST") == "1"
    cargo = os.environ.get("CARGO", "cargo")
    if shutil.which(cargo) is None:
        if required:
            raise RuntimeError("CAIO_REQUIRE_RUST=1 but cargo was not found on PATH")
        warnings.warn(
            "cargo not found: installing caio without its native backends "
            "(python_aio only). Install Rust (https://rustup.rs) for the fast ones.",
            stacklevel=1,
        )
        return []
    from setuptools_rust import Binding, RustExtension

    features = ["test-hooks"] if os.environ.get("CAIO_TEST_HOOKS") == "1" else []
    extensions = []
    for name, (crate, platforms) in NATIVE_MODULES.items():
        manifest = os.path.join(crate, "Cargo.toml")
        if not os.path.exists(os.path.join(HERE, manifest)):
            continue
        if platforms and not sys.platform.startswith(platforms):
            continue
        extensions.append(
            RustExtension(
                f"caio.{name}",
                path=manifest,
                binding=Binding.NoBinding,
                optional=not required,
                debug=os.environ.get("CAIO_DEBUG_BUILD") == "1",
                features=features,
            ),
        )
    return extensions


setup(rust_extensions=rust_extensions(), zip_safe=False)
