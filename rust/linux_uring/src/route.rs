//! Where an operation of a linux_uring Context runs (DESIGN.md §7.2): the
//! one route decision of the asyncio adapter (`adapter::submit`) and of a raw
//! Context in loop-delivery mode (`Context._enable_loop_delivery()`, what
//! the trio/anyio driver uses, DESIGN.md §5.10).
//!
//! * a buffered write or fsync, or a mid-size read while a second core is
//!   available: the worker pool (`workers::Workers::takes`);
//! * a read of at most [`INLINE_READ_MAX`] bytes: first tried from the page
//!   cache on the calling thread (`preadv2(RWF_NOWAIT)`), completed right
//!   there on a hit — no SQE, no enter, no CQE;
//! * everything else, and an inline miss: the ring.
//!
//! Worker results signal the ring's eventfd, so one reader
//! (`_process_loop_events`) delivers both engines' completions.

use std::sync::atomic::Ordering;

use caio_core::op::{self, as_op, OpKind, Operation};
use caio_core::pool;
use caio_core::py::PyResult;
use caio_core::pyo3_ffi::PyObject;

use crate::ring::StageError;
use crate::Context;

/// Reads of at most this many bytes are first tried from the page cache on
/// the calling thread (core's `pool::try_read_inline`), as thread_aio's
/// adapter does (`INLINE_READ_MAX`).
const INLINE_READ_MAX: u64 = crate::workers::COPY_ON_LOOP_MAX;

/// What [`submit_off_ring`] did with an op.
pub(crate) enum Routed {
    /// Handled off the ring: `true` accepted (completed inline, its
    /// delivery run, or handed to a worker), `false` claimed already
    /// elsewhere (in flight or done: skipped).
    Done(bool),
    /// For the ring; `claimed`: this call claimed and began it (an inline
    /// miss), so it is staged with `Ring::stage_claimed` (see [`stage`]).
    Ring { claimed: bool },
}

/// Whether `o` is first tried as a non-blocking page-cache read: a read of
/// at most [`INLINE_READ_MAX`] bytes, unless `deferred` (the adapter's
/// `deferred=True`: every operation of an iteration goes to the ring in one
/// enter), while the adapter batches submissions (the last ones were not
/// page-cache hits: a cold file, where the attempt would only be refused)
/// and on an fd the ring knows to be `O_DIRECT` (no page cache to hit, only
/// an `EINVAL`).
fn tries_inline(c: &Context, o: &Operation, deferred: bool) -> bool {
    o.kind == OpKind::Read
        && o.nbytes <= INLINE_READ_MAX
        && !deferred
        && !c.batching.load(Ordering::Relaxed)
        && !c.ring().knows_direct(o.fd_i32())
}

/// Claims and begins `o` for `ctx_obj` outside the ring's own staging; false
/// if it was claimed already. `for_adapter`: a callback set on the op
/// beforehand is dropped (the awaitable's future replaces it, DESIGN.md
/// §5.2) before anything can deliver the op; a raw Context keeps it.
///
/// # Safety
/// Attached; `o` is one of this module's Operations; `ctx_obj` its Context.
unsafe fn claim(o: &Operation, ctx_obj: *mut PyObject, for_adapter: bool) -> bool {
    if !o.try_claim() {
        return false;
    }
    // SAFETY: attached, and `o` was claimed just now by this call.
    unsafe { op::begin(o, ctx_obj) };
    if for_adapter {
        // SAFETY: attached; claimed and begun, delivered by nobody yet.
        unsafe { op::clear_callback(o) };
    }
    true
}

/// Sends `op` to the worker pool or serves it from the page cache when the
/// route says so (module doc); otherwise leaves it for the ring.
///
/// # Safety
/// Attached, inside a use of the ring (`Context::enter`); `op` is one of
/// this module's Operations; `ctx_obj` is the Context `c`.
pub(crate) unsafe fn submit_off_ring(
    c: &Context,
    ctx_obj: *mut PyObject,
    op: *mut PyObject,
    deferred: bool,
    for_adapter: bool,
) -> PyResult<Routed> {
    // SAFETY: `op` is an Operation (contract above).
    let o = unsafe { as_op(op) };
    if !deferred
        && c.workers()
            .takes(o, c.ring().sqpoll, |fd| c.ring().knows_direct(fd))
    {
        // A buffered write (or an fsync behind such writes), or a mid-size
        // read: the pool (`workers`).
        // SAFETY: attached; `o` is this module's Operation (contract above).
        if !unsafe { claim(o, ctx_obj, for_adapter) } {
            return Ok(Routed::Done(false));
        }
        if let Err(e) = c.workers().submit(op.cast()) {
            // SAFETY: begun above; the pool did not take it.
            unsafe { op::abort(o) };
            return Err(e);
        }
        return Ok(Routed::Done(true));
    }
    if !tries_inline(c, o, deferred) {
        return Ok(Routed::Ring { claimed: false });
    }
    // SAFETY: attached; `o` is this module's Operation (contract above).
    if !unsafe { claim(o, ctx_obj, for_adapter) } {
        return Ok(Routed::Done(false));
    }
    // Page-cache hit: done right here, without SQE, enter or CQE.
    // SAFETY: claimed and begun by this call and not handed to the ring yet,
    // so nobody else finishes it; attached for `finish`.
    match unsafe { pool::try_read_inline(o) } {
        // ESPIPE: a pipe, socket or FIFO (positional reads do not apply),
        // which the ring reads as a stream.
        Some(res) if res != -i64::from(libc::ESPIPE) => {
            // SAFETY: as above: in flight, ours alone, attached.
            unsafe { op::finish(op.cast(), res) }.run();
            Ok(Routed::Done(true))
        }
        _ => Ok(Routed::Ring { claimed: true }),
    }
}

/// Stages an op [`submit_off_ring`] left for the ring: `(accepted, error)`
/// as `Ring::stage` returns them; on an error the op is `New` again.
///
/// # Safety
/// Attached, inside a use of the ring; `op` is one of this module's
/// Operations, claimed and begun for `ctx_obj` when `claimed` (and then
/// handed to no engine); `ctx_obj` is the Context `c`.
pub(crate) unsafe fn stage(
    c: &Context,
    ctx_obj: *mut PyObject,
    op: *mut PyObject,
    claimed: bool,
) -> (usize, Option<StageError>) {
    if claimed {
        // SAFETY: forwarded contract: claimed and begun for this ring's
        // Context, not handed to any engine.
        match unsafe { c.ring().stage_claimed(op) } {
            None => (1, None),
            err => (0, err),
        }
    } else {
        // SAFETY: forwarded contract.
        unsafe { c.ring().stage(&[op], ctx_obj) }
    }
}

/// Asks whichever engine holds `op` to cancel it: the pool takes back a job
/// no worker has started (completing it as cancelled right here), the ring
/// gets an `ASYNC_CANCEL` (`Err(())`: no room for it). Either way a
/// cancelled op is still delivered; one running on a worker completes
/// normally.
///
/// # Safety
/// Attached, inside a use of the ring; `op` is one of this module's
/// Operations.
pub(crate) unsafe fn cancel(c: &Context, op: *mut PyObject) -> Result<(), ()> {
    // SAFETY: attached (contract above).
    if unsafe { c.workers().cancel(op.cast()) } {
        return Ok(());
    }
    // SAFETY: `op` is an Operation (contract above).
    c.ring().cancel(unsafe { as_op(op) })
}
