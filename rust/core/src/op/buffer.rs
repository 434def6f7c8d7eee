//! Taking the caller's memory for an operation: a buffer-protocol export
//! (`PyObject_GetBuffer`) of a C-contiguous bytes-like object, with the
//! contract's errors (DESIGN.md §3.4): not a buffer → `ValueError` for a
//! write payload (what upstream raised for non-`bytes`) or `TypeError` for a
//! read target; read-only target → `TypeError`; not C-contiguous →
//! `ValueError`. The export pins the memory (a `bytearray` cannot be
//! resized, a `memoryview` cannot be released) until it is released.

use pyo3_ffi::*;

use crate::py::{clear_error, Borrowed, PyErr, PyResult};

/// What the memory is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A write payload: any C-contiguous buffer, read-only ones included.
    Payload,
    /// A read target: a writable C-contiguous buffer.
    Target,
}

/// Fills `view` with an export of `obj`'s memory, or raises the contract's
/// error (`what` names the argument) and leaves `view` zeroed.
///
/// # Safety
/// Attached; `view` points to a zeroed (empty) `Py_buffer` owned by the
/// caller, who releases a successful export exactly once.
pub unsafe fn export(
    obj: Borrowed<'_>,
    view: *mut Py_buffer,
    access: Access,
    what: &str,
) -> PyResult<()> {
    let o = obj.as_ptr();
    // SAFETY: attached; a live object.
    if unsafe { PyObject_CheckBuffer(o) } == 0 {
        let msg = format!(
            "{} must be a bytes-like object (a C-contiguous buffer), not '{}'",
            what,
            obj.type_name()
        );
        return Err(match access {
            Access::Payload => PyErr::value_error(msg),
            Access::Target => PyErr::type_error(msg),
        });
    }
    let flags = match access {
        Access::Payload => PyBUF_SIMPLE,
        Access::Target => PyBUF_WRITABLE,
    };
    // SAFETY: attached; `view` is the caller's empty `Py_buffer`.
    if unsafe { PyObject_GetBuffer(o, view, flags) } == 0 {
        return Ok(());
    }
    // SAFETY: a failed export leaves the struct unspecified: make it empty.
    unsafe { *view = std::mem::zeroed() };
    clear_error();
    // Why did it fail? A read-only but contiguous object is refused for
    // reading into; anything else the exporter refused is not contiguous.
    // SAFETY: all-zero is a valid (empty) `Py_buffer`, a plain C struct.
    let mut probe: Py_buffer = unsafe { std::mem::zeroed() };
    // SAFETY: attached; `probe` is a local empty `Py_buffer`, released at
    // once when the export succeeds.
    let contiguous_readonly = unsafe {
        let ok = PyObject_GetBuffer(o, &raw mut probe, PyBUF_SIMPLE) == 0;
        if ok {
            PyBuffer_Release(&raw mut probe);
        } else {
            clear_error();
        }
        ok
    };
    if access == Access::Target && contiguous_readonly {
        return Err(PyErr::type_error(format!(
            "{} must be a writable buffer, not read-only '{}'",
            what,
            obj.type_name()
        )));
    }
    Err(PyErr::value_error(format!(
        "{} must be a C-contiguous buffer ('{}' is not)",
        what,
        obj.type_name()
    )))
}
