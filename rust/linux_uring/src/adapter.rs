//! The io_uring engine of the native asyncio fast path (`caio_core::aio`).
//!
//! Submission policy of the plain ring:
//! * eager (the default while operations complete inline): the op's SQE is
//!   staged and the ring entered at once; a page-cache hit completes inside
//!   that `io_uring_enter`, is drained right there and the awaitable returns
//!   without suspending (no future, no loop iteration);
//! * batched (automatically once an eager submission did not complete
//!   inline): SQEs are staged and entered BATCH_MAX at a time, the rest by a
//!   `call_soon` callback (`Context._deferred_flush`) at the end of the loop
//!   iteration — scheduled by the eventfd reader right after it woke the
//!   tasks, so it runs after them in the same iteration. That callback
//!   switches back to eager when its whole batch completed inline. Batching
//!   matters when completions are asynchronous anyway (cold page cache,
//!   O_DIRECT): fewer enters, block plugs and device notifications;
//! * `deferred=True` (DESIGN.md §5.8.1): every SQE of a loop iteration in one
//!   `io_uring_enter`.
//!
//! What goes to the worker pool or is served from the page cache without
//! the ring is `route`'s decision (shared with a raw Context in loop-delivery
//! mode). SQPOLL rings: stage, wake the SQ thread if it sleeps, drain.
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
use crate::route::{self, Routed};

/// Largest automatic batch (SQEs per `io_uring_enter`), see `submit`.
const BATCH_MAX: usize = 4;

pub(crate) static ENGINE: Engine = Engine {
    submit,
    cancel,
    loop_events,
    shutdown,
};

// Every hook below is an `Engine` hook: `caio_core::aio` calls it attached,
// with `a` bound (in `_bind`) to a Context of this module, and `op` one of
// this module's Operations. That is their `# Safety` contract.

/// Stages `op` and, depending on the policy (module doc), enters the ring
/// now or schedules a batch flush.
///
/// # Safety
/// An `Engine` hook (see above).
unsafe fn submit(a: &Adapter, op: *mut PyObject) -> PyResult<bool> {
    let ctx_obj = a.context();
    // SAFETY: `ctx_obj` is a Context (hook contract).
    let c = unsafe { ctx(ctx_obj) };
    let _u = c.enter()?;
    // SAFETY: attached, inside the use above; `op` is this module's
    // Operation and `ctx_obj` the Context `c` (hook contract).
    let claimed = match unsafe { route::submit_off_ring(c, ctx_obj, op, a.deferred(), true) }? {
        Routed::Done(accepted) => return Ok(accepted),
        Routed::Ring { claimed } => claimed,
    };
    // SAFETY: as above; claimed and begun by `submit_off_ring` when
    // `claimed`, and handed to no engine.
    let mut staged = unsafe { route::stage(c, ctx_obj, op, claimed) };
    if let (_, Some(StageError::Full)) = staged {
        // The admission gate keeps in-flight ops below the ring size, but
        // SQEs of cancelled ops (and cancel SQEs) may still sit in a batch
        // or wait for the SQ thread: make room and try once more.
        c.ring()
            .make_room()
            .map_err(|e| PyErr::Errno(Exc::SystemError, e.raw_os_error().unwrap_or(libc::EIO)))?;
        // SAFETY: as above.
        staged = unsafe { c.ring().stage(&[op], ctx_obj) };
    }
    let (n, err) = staged;
    if let Some(e) = err {
        // SAFETY: attached; `ctx_obj` is a Context.
        return Err(unsafe { e.into_pyerr(ctx_obj) });
    }
    if n == 0 {
        return Ok(false);
    }
    // The awaitable's future (installed when the op does not complete
    // inline) is what the delivery resolves, never a callback set on the op
    // beforehand, whether or not it completes inside the enter below (DESIGN.md
    // §5.2; as every adapter). Only this thread delivers the adapter's
    // completions, so the op cannot have been delivered yet.
    // SAFETY: attached; `op` is an Operation (hook contract).
    unsafe { caio_core::op::clear_callback(as_op(op)) };
    let batch = a.deferred() || c.batching.load(Ordering::Relaxed);
    if batch && !c.ring().sqpoll {
        // Automatic batches are capped: entering every BATCH_MAX SQEs keeps
        // the device fed while a burst of woken tasks is still being run
        // (one batch per whole iteration made the queue depth sag and cost
        // throughput); deferred=True keeps one enter per iteration.
        if !a.deferred() && c.ring().staged() as usize >= BATCH_MAX {
            // SAFETY: attached (hook contract).
            unsafe { c.flush_batch() }?;
            return Ok(true);
        }
        // SAFETY: attached; `a` is bound to `c` (hook contract).
        unsafe { schedule_flush(a, c) }?;
        return Ok(true);
    }
    // (A refusal the kernel may lift leaves the op staged for a retry by
    // the loop's reader: it completes later, its awaitable waits.)
    c.submit_or_retry()?;
    // SAFETY: attached (hook contract).
    unsafe { c.deliver(usize::MAX) };
    // SAFETY: `op` is an Operation (hook contract).
    if unsafe { as_op(op) }.state() != caio_core::op::OpState::Done && !c.ring().sqpoll {
        // Not a page-cache hit: completions are coming through the event
        // loop now, batch the next submissions.
        c.batching.store(true, Ordering::Relaxed);
    }
    Ok(true)
}

/// Schedules the batch flush (once per loop iteration).
///
/// # Safety
/// Attached; `a` is bound to the Context `c`.
unsafe fn schedule_flush(a: &Adapter, c: &crate::Context) -> PyResult<()> {
    if !c.flush_scheduled.swap(true, Ordering::AcqRel) {
        // SAFETY: attached; `engine_obj` is the live object given to `_bind`
        // (the Context's `_deferred_flush`).
        if let Err(e) = unsafe { a.call_soon(a.engine_obj()) } {
            // Could not schedule (closed loop?): submit right away.
            c.flush_scheduled.store(false, Ordering::Release);
            e.restore();
            // SAFETY: attached; drops the exception just restored.
            unsafe { PyErr_Clear() };
            c.submit_or_retry()?;
            // SAFETY: attached (contract above).
            unsafe { c.deliver(usize::MAX) };
        }
    }
    Ok(())
}

/// The eventfd reader. When it wakes tasks while submissions are batched, it
/// schedules the flush right away: `call_soon` runs callbacks in order, so
/// the flush runs in the next iteration *after* the woken tasks have staged
/// their next operations — one enter for all of them, without the extra
/// loop iteration a flush scheduled by the first of them would cost.
///
/// # Safety
/// An `Engine` hook (see above).
unsafe fn loop_events(a: &Adapter) -> PyResult<usize> {
    // SAFETY: `a.context()` is a Context (hook contract).
    let c = unsafe { ctx(a.context()) };
    let _u = c.enter()?;
    c.ring().consume_eventfd();
    // SAFETY: attached (hook contract).
    let n = unsafe { c.deliver(usize::MAX) + c.workers().deliver() };
    if c.ring().sqpoll {
        if c.ring().staged() > 0 {
            // A wake-up of the SQ thread may have been refused: again.
            c.submit_or_retry()?;
        }
    } else if (n > 0 && (a.deferred() || c.batching.load(Ordering::Relaxed)))
        || c.ring().staged() > 0
    {
        // (Staged SQEs here and no flush scheduled: the kernel refused an
        // enter, see `Context::submit_or_retry`; the flush tries again.)
        // SAFETY: attached; `a` is bound to `c` (hook contract).
        unsafe { schedule_flush(a, c) }?;
    }
    Ok(n)
}

/// Asks the kernel to cancel `op`; a full ring only means the op completes
/// normally later.
///
/// # Safety
/// An `Engine` hook (see above).
unsafe fn cancel(a: &Adapter, op: *mut PyObject) {
    // SAFETY: `a.context()` is a Context (hook contract).
    let c = unsafe { ctx(a.context()) };
    let Ok(_u) = c.enter() else {
        return;
    };
    // (No room for a ring cancel: the op completes normally later.)
    // SAFETY: attached, inside the use above; `op` is an Operation (hook
    // contract).
    let _ = unsafe { route::cancel(c, op) };
}

/// The loop is closed ("loop gone" in `caio_core::aio`): submit what is
/// staged, cancel everything (reads of idle pipes and sockets would never
/// complete), and drain until no op is left in flight. Deliveries only drop
/// their references here (`op::Discarding`, set by the caller).
///
/// # Safety
/// An `Engine` hook (see above).
unsafe fn shutdown(a: &Adapter, deadline: std::time::Instant) -> bool {
    // SAFETY: `a.context()` is a Context (hook contract).
    let c = unsafe { ctx(a.context()) };
    let Ok(_u) = c.enter() else {
        // A hook must not raise: leave no exception set.
        // SAFETY: attached (hook contract).
        unsafe { PyErr_Clear() };
        return false;
    };
    let ring = c.ring();
    let mut rounds = 0u32;
    loop {
        if rounds % 10 == 0 {
            // Again now and then: a request may have been between the
            // submission queue and io-wq when the previous one looked.
            ring.cancel_all();
        }
        rounds += 1;
        ring.consume_eventfd();
        // SAFETY: attached (hook contract).
        unsafe {
            c.deliver(usize::MAX);
            c.workers().deliver();
        }
        if ring.in_flight() == 0 && c.workers().in_flight() == 0 {
            return true;
        }
        if !caio_core::aio::wait_readable_until(ring.eventfd(), deadline, 20) {
            return false;
        }
    }
}
