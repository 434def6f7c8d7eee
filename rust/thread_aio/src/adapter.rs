//! The thread-pool engine of the native asyncio fast path (`caio_core::aio`).
//!
//! `thread_aio_asyncio.AsyncioContext` binds it once the Context delivers on
//! the event loop (`_enable_loop_delivery`): submission is `Context.submit`'s
//! (a page-cache hit may complete inline), completions are drained by the
//! loop's reader on `_completion_fd()`, and a cancel really takes back a job
//! no worker has started yet.

use caio_core::aio::{Adapter, Engine};
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

/// The loop is closed ("loop gone" in `caio_core::aio`): stop the pool,
/// letting queued and running work finish, and deliver the completions
/// (they only drop their references here: `op::Discarding`, set by the
/// caller). Like `close()`, this waits for the workers.
unsafe fn shutdown(a: &Adapter, _deadline: std::time::Instant) -> bool {
    ctx(a.context()).shutdown();
    true
}

unsafe fn submit(a: &Adapter, op: *mut PyObject) -> PyResult<bool> {
    let slf = a.context();
    let c = ctx(slf);
    c.check_fork()?;
    let pool = c.pool()?;
    submit_one(c, slf, &pool, op)
}

unsafe fn cancel(a: &Adapter, op: *mut PyObject) {
    let c = ctx(a.context());
    if c.check_fork().is_err() {
        return;
    }
    let Some(pool) = c.pool_slot().clone() else {
        return;
    };
    if let Some(job) = pool.try_cancel(op as *mut op::Operation) {
        // Never started: complete it as cancelled, like a kernel cancel.
        op::finish(job.0, -(libc::ECANCELED as i64)).run();
    }
}

unsafe fn loop_events(a: &Adapter) -> PyResult<usize> {
    let pool = ctx(a.context()).pool_slot().clone();
    Ok(match pool.as_ref().and_then(|p| p.queued_delivery()) {
        Some(q) => q.deliver_all(),
        None => 0,
    })
}
