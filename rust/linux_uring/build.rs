fn main() {
    // Exports cfg(Py_3_1x), cfg(Py_GIL_DISABLED) for the interpreter we build against.
    pyo3_build_config::use_pyo3_cfgs();
}
