//! The io_uring engine of the native asyncio fast path (`caio_core::aio`).
//!
//! * Default (`deferred=False`) and SQPOLL: the op's SQE is staged and the
//!   ring entered at once; page-cache hits complete inside that
//!   `io_uring_enter`, are drained right there and the awaitable returns
//!   without suspending (no future, no loop iteration).
//! * `deferred=True` (plain ring): SQEs staged during one loop iteration go
//!   to the kernel in one `io_uring_enter`, from a single `call_soon`
//!   callback (`Context._deferred_flush`).
//! * Later completions signal the eventfd; the loop's reader callback
//!   (`Context._process_loop_events`) drains the whole batch and resolves the
//!   futures directly.

use std::sync::atomic::Ordering;

use caio_core::aio::{Adapter, Engine};
use caio_core::op::as_op;
use caio_core::py::PyResult;
use caio_core::pyo3_ffi::*;

use crate::ctx;

pub static ENGINE: Engine = Engine { submit, cancel };

unsafe fn submit(a: &Adapter, op: *mut PyObject) -> PyResult<bool> {
    let ctx_obj = a.context();
    let c = ctx(ctx_obj);
    c.check_fork()?;
    let (n, err) = c.ring().stage(&[op], ctx_obj);
    if let Some(e) = err {
        return Err(e);
    }
    if n == 0 {
        return Ok(false);
    }
    if a.deferred() && !c.ring().sqpoll {
        if !c.flush_scheduled.swap(true, Ordering::AcqRel) {
            if let Err(e) = a.call_soon(a.engine_obj()) {
                // Could not schedule (closed loop?): submit right away.
                c.flush_scheduled.store(false, Ordering::Release);
                e.restore();
                PyErr_Clear();
                c.submit_staged()?;
                c.deliver(usize::MAX);
            }
        }
        return Ok(true);
    }
    c.submit_staged()?;
    c.deliver(usize::MAX);
    Ok(true)
}

unsafe fn cancel(a: &Adapter, op: *mut PyObject) {
    let c = ctx(a.context());
    if c.check_fork().is_err() {
        return;
    }
    // A full ring only means the op completes normally later.
    let _ = c.ring().cancel(as_op(op));
}
