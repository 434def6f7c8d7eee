//! The thread-pool engine of the native asyncio fast path (`caio_core::aio`).
//!
//! `thread_aio_asyncio.AsyncioContext` binds it once the Context delivers on
//! the event loop (`_enable_loop_delivery`): submission is `Context.submit`'s
//! (a page-cache hit may complete inline), completions are drained by the
//! loop's reader on `_completion_fd()`, and a cancel really takes back a job
//! no worker has started yet.

use caio_core::aio::{Adapter, Engine};
use caio_core::context::ContextState;
use caio_core::op;
use caio_core::py::PyResult;
use caio_core::pyo3_ffi::PyObject;

use crate::{ctx, submit_one};

pub(crate) static ENGINE: Engine = Engine {
    submit,
    cancel,
    loop_events,
    shutdown,
};

// Every hook below is an `Engine` hook: `caio_core::aio` calls it attached,
// with `a` bound (in `_bind`) to a Context of this module, and `op` one of
// this module's Operations. That is their `# Safety` contract.

/// The loop is closed ("loop gone" in `caio_core::aio`): stop the pool,
/// letting queued and running work finish, and deliver the completions
/// (they only drop their references here: `op::Discarding`, set by the
/// caller). Waits for the workers until `deadline`: a worker stuck in its
/// I/O then keeps its op (false: the backend is not released).
///
/// # Safety
/// An `Engine` hook (see above).
unsafe fn shutdown(a: &Adapter, deadline: std::time::Instant) -> bool {
    // SAFETY: `a.context()` is a Context and we are attached (hook
    // contract).
    unsafe { ctx(a.context()).shutdown(Some(deadline)) }
}

/// Claims `op` and hands it to the pool, as `Context.submit` does.
///
/// # Safety
/// An `Engine` hook (see above).
unsafe fn submit(a: &Adapter, op: *mut PyObject) -> PyResult<bool> {
    let slf = a.context();
    // SAFETY: `slf` is a Context (hook contract).
    let c = unsafe { ctx(slf) };
    c.check_fork()?;
    let pool = c.pool()?;
    // SAFETY: attached; `slf` is `c`; `op` is an Operation (hook contract).
    unsafe { submit_one(c, slf, &pool, op, true) }
}

/// Takes back a job no worker has started yet and completes it as
/// cancelled; a running one completes normally later.
///
/// # Safety
/// An `Engine` hook (see above).
unsafe fn cancel(a: &Adapter, op: *mut PyObject) {
    // SAFETY: `a.context()` is a Context (hook contract).
    let c = unsafe { ctx(a.context()) };
    if c.check_fork().is_err() {
        return;
    }
    let Some(pool) = c.pool_slot().clone() else {
        return;
    };
    if let Some(job) = pool.try_cancel(op.cast()) {
        // Never started: complete it as cancelled, like a kernel cancel.
        // SAFETY: the pool handed the job back, so it is in flight and ours
        // alone; attached (hook contract).
        unsafe { op::finish(job.0, -i64::from(libc::ECANCELED)) }.run();
    }
}

/// The loop's reader callback: deliver every queued completion.
///
/// # Safety
/// An `Engine` hook (see above).
unsafe fn loop_events(a: &Adapter) -> PyResult<usize> {
    // SAFETY: `a.context()` is a Context (hook contract).
    let pool = unsafe { ctx(a.context()) }.pool_slot().clone();
    Ok(match pool.as_ref().and_then(|p| p.queued_delivery()) {
        // SAFETY: attached (hook contract).
        Some(q) => unsafe { q.deliver_all() },
        None => 0,
    })
}
