//! The io_uring engine of the native asyncio fast path (`caio_core::aio`).
//!
//! Submission policy of the plain ring:
//! * eager (the default while operations complete inline): the op's SQE is
//!   staged and the ring entered at once; a page-cache hit completes inside
//!   that `io_uring_enter`, is drained right there and the awaitable returns
//!   without suspending (no future, no loop iteration);
//! * batched (`deferred=True`, or automatically once an eager submission did
//!   not complete inline): SQEs staged during one loop iteration go to the
//!   kernel in one `io_uring_enter` from a single `call_soon` callback
//!   (`Context._deferred_flush`). That callback switches back to eager when
//!   its whole batch completed inline. Batching matters when completions are
//!   asynchronous anyway (cold page cache, O_DIRECT): one enter, one block
//!   plug and one device notification per batch instead of per op.
//!
//! SQPOLL rings: stage, wake the SQ thread if it sleeps, drain.
//! Later completions signal the eventfd; the loop's reader callback
//! (`Context._process_loop_events`) drains the whole batch and resolves the
//! futures directly.

use std::sync::atomic::Ordering;

use caio_core::aio::{Adapter, Engine};
use caio_core::op::as_op;
use caio_core::py::{Exc, PyErr, PyResult};
use caio_core::pyo3_ffi::*;

use crate::ctx;
use crate::ring::StageError;

pub static ENGINE: Engine = Engine { submit, cancel };

unsafe fn submit(a: &Adapter, op: *mut PyObject) -> PyResult<bool> {
    let ctx_obj = a.context();
    let c = ctx(ctx_obj);
    c.check_fork()?;
    let mut staged = c.ring().stage(&[op], ctx_obj);
    if let (_, Some(StageError::Full)) = staged {
        // The admission gate keeps in-flight ops below the ring size, but
        // SQEs of cancelled ops (and cancel SQEs) may still sit in a batch
        // or wait for the SQ thread: make room and try once more.
        c.ring()
            .make_room()
            .map_err(|e| PyErr::Errno(Exc::SystemError, e.raw_os_error().unwrap_or(libc::EIO)))?;
        staged = c.ring().stage(&[op], ctx_obj);
    }
    let (n, err) = staged;
    if let Some(e) = err {
        return Err(e.into_pyerr());
    }
    if n == 0 {
        return Ok(false);
    }
    let batch = a.deferred() || c.batching.load(Ordering::Relaxed);
    if batch && !c.ring().sqpoll {
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
    if as_op(op).state() != caio_core::op::DONE && !c.ring().sqpoll {
        // Not a page-cache hit: completions are coming through the event
        // loop now, batch the next submissions.
        c.batching.store(true, Ordering::Relaxed);
    }
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
