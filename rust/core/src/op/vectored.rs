//! The buffers of a vectored operation (`readv`/`writev`): one export per
//! buffer of the caller's sequence and the iovec array the engine hands to
//! one system call or SQE (`preadv`/`pwritev`, `IORING_OP_READV`/`WRITEV`,
//! `IOCB_CMD_PREADV`/`PWRITEV`). Built at construction; the exports are
//! released when the engine is done (by the delivery), like a `readinto`'s.

use pyo3_ffi::*;

use super::buffer::{self, Access};
use crate::py::{ssize, Borrowed, Owned, PyErr, PyResult};
use crate::sys::IoVec;

/// Most buffers one vectored op takes: Linux's `IOV_MAX` (`UIO_MAXIOV`).
/// Longer sequences are refused with `ValueError` (DESIGN.md §3.2): split
/// them, nothing is gained past it.
pub const IOV_MAX: usize = 1024;

/// The exports and the iovecs over them (same order).
pub struct Vectored {
    views: Vec<Py_buffer>,
    iov: Vec<IoVec>,
}

impl Vectored {
    /// Exports every buffer of the sequence `seq` (`what` names the
    /// argument). Returns the buffers and their total length.
    ///
    /// # Safety
    /// Attached.
    pub unsafe fn export(
        seq: Borrowed<'_>,
        access: Access,
        what: &str,
    ) -> PyResult<(Vectored, u64)> {
        // SAFETY: attached; a live object.
        if unsafe { PyObject_CheckBuffer(seq.as_ptr()) } != 0 {
            return Err(PyErr::type_error(format!(
                "{} must be a sequence of buffers, not a single '{}'",
                what,
                seq.type_name()
            )));
        }
        // SAFETY: attached; a live object.
        let fast = unsafe { Owned::from_new(PySequence_Tuple(seq.as_ptr())) }.map_err(|_| {
            crate::py::clear_error();
            PyErr::type_error(format!(
                "{} must be a sequence of buffers, not '{}'",
                what,
                seq.type_name()
            ))
        })?;
        // SAFETY: `fast` is a tuple.
        let n = crate::py::usize_of(unsafe { PyTuple_GET_SIZE(fast.as_ptr()) });
        if n == 0 {
            return Err(PyErr::value_error(format!("{} must not be empty", what)));
        }
        if n > IOV_MAX {
            return Err(PyErr::value_error(format!(
                "{} holds {} buffers; at most IOV_MAX ({}) per operation",
                what, n, IOV_MAX
            )));
        }
        let mut v = Vectored {
            views: Vec::with_capacity(n),
            iov: Vec::with_capacity(n),
        };
        let mut total: u64 = 0;
        for i in 0..n {
            // SAFETY: `i < n`, the tuple's size; a borrowed item kept alive
            // by `fast`.
            let item = unsafe { Borrowed::from_ptr(PyTuple_GET_ITEM(fast.as_ptr(), ssize(i))) };
            // SAFETY: all-zero is a valid (empty) `Py_buffer`.
            let mut view: Py_buffer = unsafe { std::mem::zeroed() };
            // SAFETY: attached; `view` is a local empty `Py_buffer`. On
            // error `v` (the exports so far) is dropped: released.
            unsafe { buffer::export(item, &raw mut view, access, what)? };
            let len = crate::py::usize_of(view.len);
            total = total.saturating_add(crate::num::len_u64(len));
            v.iov.push(IoVec {
                base: view.buf.cast(),
                len,
            });
            v.views.push(view);
        }
        Ok((v, total))
    }

    /// The iovec array (pointer, count) for the engine.
    pub fn iovecs(&self) -> (*const IoVec, usize) {
        (self.iov.as_ptr(), self.iov.len())
    }

    /// The exporters, for the op's `tp_traverse`.
    pub(super) fn exporters(&self) -> impl Iterator<Item = *mut PyObject> + '_ {
        self.views.iter().map(|v| v.obj).filter(|o| !o.is_null())
    }
}

impl Drop for Vectored {
    fn drop(&mut self) {
        if !crate::py::is_attached() {
            // No interpreter to release them with: leak rather than touch
            // the objects without it (as `Delivery` does).
            std::mem::forget(std::mem::take(&mut self.views));
            return;
        }
        for view in &mut self.views {
            // SAFETY: each an export taken by `PyObject_GetBuffer`, released
            // once (the vector is dropped once); attached.
            unsafe { PyBuffer_Release(view) };
        }
    }
}
