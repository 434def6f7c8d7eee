//! Build script of the `caio.linux_uring` extension: interpreter cfgs and link flags.

fn main() {
    // Exports cfg(Py_3_1x), cfg(Py_GIL_DISABLED) for the interpreter we build against.
    pyo3_build_config::use_pyo3_cfgs();
    // macOS: `-undefined dynamic_lookup`, so the cdylib links without libpython (the
    // interpreter provides the C API at import time). No-op on other targets.
    pyo3_build_config::add_extension_module_link_args();
}
