//! The kernel-AIO engine of the native asyncio fast path (`caio_core::aio`),
//! driven by `caio.linux_aio_asyncio.AsyncioContext` (which puts its Context
//! in event-loop mode, `_set_nowait(True)`: the loop never waits for the
//! disk inside `io_submit`).
//!
//! * `deferred=False`: one `io_submit` per operation. A page-cache hit
//!   completes inside it and is delivered right after it (together with
//!   whatever else has completed), so the awaitable returns without
//!   suspending — within the adapter's per-iteration `SYNC_BUDGET`.
//! * `deferred=True`: the engine claims the op and stages it; one flush per
//!   loop iteration (a `call_soon` callback) submits the whole batch in one
//!   `io_submit`. An op the kernel refuses fails alone, with its own error;
//!   the rest of the batch is resubmitted (DESIGN.md §6.2 batch-fail). An op whose task
//!   was cancelled before the flush never reaches the kernel.
//! * Completions (kernel and worker pool) signal the eventfd; the loop's
//!   reader (`_process_loop_events`) drains them all.
//! * After the adapter's `close()` (DESIGN.md §5.6) nothing new is accepted;
//!   once no operation is in flight any more (cancelled ones included:
//!   they keep their admission slot until delivered), the shared fast path
//!   calls the adapter's `_release()` ("close once idle" in
//!   `caio_core::aio`), which removes the reader and closes the Context
//!   (`io_destroy`, eventfd, workers).

use std::ptr;
use std::sync::atomic::Ordering;

use caio_core::aio::{Adapter, Engine};
use caio_core::context::ContextState;
use caio_core::op::{self, as_op, OpState, Operation};
use caio_core::py::{call_method, none, trampoline, Exc, Interned, Owned, PyErr, PyResult};
use caio_core::pyo3_ffi::*;

use crate::context::ctx;
use crate::engine::AioContext;
use crate::reap::DEFAULT_EVENTS;
use crate::submit::{submit_claimed, submit_ops};

// The four `Engine` functions are called by `caio_core::aio`, attached,
// with an adapter bound (`_bind`) to a live linux_aio Context (core checks
// its type) and, for `submit`/`cancel`, an Operation of that Context's
// module. Their `# Safety` sections refer to this as "the engine contract".
pub static ENGINE: Engine = Engine {
    submit,
    cancel,
    loop_events,
    shutdown,
};

static DONE: Interned = Interned::new(c"done");
static SET_EXCEPTION: Interned = Interned::new(c"set_exception");

impl AioContext {
    /// The deferred batch (a poisoned lock is taken over: the `Vec` is
    /// never left half-updated).
    pub(crate) fn lock_staged(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `Engine::submit`: one operation of an awaiting task.
///
/// # Safety
/// The engine contract.
unsafe fn submit(a: &Adapter, op: *mut PyObject) -> PyResult<bool> {
    let slf = a.context();
    // SAFETY: the engine contract: `slf` a live Context, `op` an Operation.
    let (c, o) = unsafe { (ctx(slf), as_op(op)) };
    c.check_fork()?;
    if !o.try_claim() {
        return Ok(false); // in flight (or staged) already, or done
    }
    if a.deferred() {
        // SAFETY: attached; the batch owns this new reference until the
        // flush (or `unstage`/`drop_staged`) takes it back.
        unsafe { Py_INCREF(op) };
        c.lock_staged().push(op as usize);
        // SAFETY: attached, `a` bound to `c`'s Context.
        if let Err(e) = unsafe { schedule_flush(a, c) } {
            // SAFETY: attached; `op` was staged above.
            if let Some(staged) = unsafe { unstage(c, op) } {
                o.unclaim();
                drop(staged);
            }
            return Err(e);
        }
        return Ok(true);
    }
    // SAFETY: attached; we have just claimed `o`, and hand it to
    // `submit_claimed` begun, as it requires.
    let (_, failure) = unsafe {
        op::begin(o, slf);
        submit_claimed(slf, c, &[(0, op.cast::<Operation>())], None)
    }?;
    if let Some((_, e)) = failure {
        return Err(e);
    }
    // Delivery resolves the awaitable's future (installed when the op does
    // not complete inline), never a callback set on the op beforehand: the
    // upstream adapter replaces it too. (Only this thread delivers, so the
    // op cannot have been delivered yet.)
    // A page-cache hit completed inside io_submit: deliver it now (with
    // whatever else has completed) rather than after a trip through the loop.
    // SAFETY: attached (the engine contract).
    unsafe {
        op::clear_callback(o);
        c.deliver(DEFAULT_EVENTS);
    }
    Ok(true)
}

/// `Engine::cancel`: the awaiting task is gone.
///
/// # Safety
/// The engine contract.
unsafe fn cancel(a: &Adapter, op: *mut PyObject) {
    // SAFETY: the engine contract: a live Context, `op` an Operation.
    let (c, o) = unsafe { (ctx(a.context()), as_op(op)) };
    if c.check_fork().is_err() {
        return;
    }
    // SAFETY: attached.
    if let Some(staged) = unsafe { unstage(c, op) } {
        // Still waiting for its batch: it never reaches the kernel.
        o.unclaim();
        // SAFETY: attached.
        unsafe { op::clear_callback(o) };
        drop(staged);
        return;
    }
    if o.state() != OpState::InFlight {
        return;
    }
    // As upstream: io_cancel, and never mind a refusal (regular-file I/O
    // cannot be cancelled, an op run by a worker is not in the kernel). The
    // op completes later either way.
    let _ = c.cancel(o);
}

/// `Engine::loop_events`: the loop's reader callback.
///
/// # Safety
/// The engine contract.
unsafe fn loop_events(a: &Adapter) -> PyResult<usize> {
    // SAFETY: the engine contract.
    let c = unsafe { ctx(a.context()) };
    c.check_fork()?;
    // SAFETY: attached (the engine contract).
    Ok(unsafe { c.drain() })
}

/// Takes `op` out of the deferred batch (its reference is returned).
///
/// # Safety
/// Attached.
unsafe fn unstage(c: &AioContext, op: *mut PyObject) -> Option<Owned> {
    let mut staged = c.lock_staged();
    let i = staged.iter().position(|&p| p == op as usize)?;
    let p = staged.remove(i) as *mut PyObject;
    // SAFETY: the batch held a strong reference to every staged op; it is
    // moved out of the batch here.
    Some(unsafe { Owned::from_raw(p) })
}

/// Gives back the ops of a batch that was never flushed (Context
/// deallocation: its loop was closed first).
///
/// # Safety
/// Attached.
pub(crate) unsafe fn drop_staged(c: &AioContext) {
    let staged = std::mem::take(&mut *c.lock_staged());
    for p in staged {
        let p = p as *mut PyObject;
        // SAFETY: a staged op: an Operation (claimed, not begun) whose
        // strong reference the batch held; attached.
        unsafe {
            as_op(p).unclaim();
            Py_DECREF(p);
        }
    }
}

/// Gives back a deferred batch that will never be flushed (its loop is
/// gone): each op is rolled back — `NEW` again, its future dropped, as if
/// its task had been cancelled before the flush — and the batch's
/// reference released.
///
/// # Safety
/// Attached.
unsafe fn abandon_staged(c: &AioContext) {
    let staged = std::mem::take(&mut *c.lock_staged());
    for p in staged {
        // SAFETY: the batch held a strong reference to every staged op (an
        // Operation claimed by `submit`, not begun); it moves into `staged`
        // and is dropped after the op is rolled back. Attached.
        unsafe {
            let staged = Owned::from_raw(p as *mut PyObject);
            let o = as_op(staged.as_ptr());
            o.unclaim();
            op::clear_callback(o);
            drop(staged);
        }
    }
}

/// Schedules the flush of the deferred batch (once per loop iteration).
///
/// # Safety
/// Attached; `a` is bound to `c`'s Context.
unsafe fn schedule_flush(a: &Adapter, c: &AioContext) -> PyResult<()> {
    if c.flush_scheduled.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    // SAFETY: attached; FLUSH_DEF is static (CPython keeps the pointer) and
    // the new builtin holds a reference to the adapter, its `self`.
    let r = unsafe {
        Owned::from_new(PyCFunction_NewEx(
            &raw mut FLUSH_DEF,
            a.as_ptr(),
            ptr::null_mut(),
        ))
        .and_then(|cb| a.call_soon(cb.as_ptr()))
    };
    if r.is_err() {
        c.flush_scheduled.store(false, Ordering::Release);
    }
    r
}

static mut FLUSH_DEF: PyMethodDef = PyMethodDef {
    ml_name: c"_deferred_flush".as_ptr(),
    ml_meth: PyMethodDefPointer {
        PyCFunction: flush_callback,
    },
    ml_flags: METH_NOARGS,
    ml_doc: ptr::null(),
};

/// The `call_soon` callback (bound to the adapter): submits the batch.
/// Never raises for an operation's sake: each awaiter gets its own error.
///
/// # Safety
/// Called by CPython (METH_NOARGS), attached, with `adapter_obj` the
/// adapter `schedule_flush` bound it to.
unsafe extern "C" fn flush_callback(adapter_obj: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: the builtin's `self` is the adapter (see `schedule_flush`),
        // kept alive by the builtin for the call.
        let a = unsafe { &*adapter_obj.cast::<Adapter>() };
        let slf = a.context();
        if slf.is_null() {
            return Ok(none()); // the adapter was cleared by the GC
        }
        // SAFETY: a bound adapter's Context is a live linux_aio Context.
        let c = unsafe { ctx(slf) };
        c.flush_scheduled.store(false, Ordering::Release);
        let staged: Vec<Owned> = std::mem::take(&mut *c.lock_staged())
            .into_iter()
            // SAFETY: the batch's strong references move into `Owned`s.
            .map(|p| unsafe { Owned::from_raw(p as *mut PyObject) })
            .collect();
        // SAFETY: attached; `staged` holds the claimed, not begun, ops of
        // `slf`'s batch.
        unsafe { flush(slf, c, &staged) };
        Ok(none())
    })
}

/// `fut.done()`, false if that raises (the error is dropped).
fn is_done(fut: &Owned) -> bool {
    match DONE
        .get()
        .and_then(|name| call_method(fut.borrow(), name, &[]))
    {
        // SAFETY: Py_True only reads the interpreter's singleton.
        Ok(v) => v.as_ptr() == unsafe { Py_True() },
        Err(e) => {
            e.restore();
            // SAFETY: attached (we just called a method).
            unsafe { PyErr_Clear() };
            false
        }
    }
}

/// Makes the task awaiting `fut` raise `e` (unless it is done already).
///
/// # Safety
/// Attached.
unsafe fn fail(fut: Option<&Owned>, e: &Owned) {
    let Some(fut) = fut else {
        return;
    };
    if is_done(fut) {
        return;
    }
    let r = SET_EXCEPTION
        .get()
        .and_then(|name| call_method(fut.borrow(), name, &[e.as_ptr()]));
    if let Err(e) = r {
        e.restore();
        // SAFETY: attached (our contract).
        unsafe { PyErr_Clear() };
    }
}

/// The error an awaiter gets for `e` (an exception instance).
///
/// # Safety
/// Attached; no exception set.
unsafe fn to_exception(e: PyErr) -> Option<Owned> {
    // Attached, no exception set (our contract).
    match e.into_instance() {
        Ok(x) => Some(x),
        Err(e) => {
            e.restore();
            // SAFETY: attached.
            unsafe { PyErr_Clear() };
            None
        }
    }
}

/// Submits a deferred batch (ops claimed by `submit`, not begun): as many as
/// the kernel takes, each refused op failing alone (DESIGN.md §6.2 batch-fail).
///
/// # Safety
/// Attached; `slf` is the Context owning `c`; `staged` holds Operations of
/// its module that `submit` claimed and staged (not begun).
unsafe fn flush(slf: *mut PyObject, c: &AioContext, staged: &[Owned]) {
    let mut ops: Vec<*mut PyObject> = Vec::with_capacity(staged.len());
    // The futures the awaiting tasks wait on.
    let mut futs: Vec<Option<Owned>> = Vec::with_capacity(staged.len());
    for s in staged {
        // SAFETY: a staged Operation (our contract), kept alive by `staged`.
        let o = unsafe { as_op(s.as_ptr()) };
        // SAFETY: attached.
        let fut = unsafe { op::future(o) };
        if fut.as_ref().is_some_and(is_done) {
            // Its task was cancelled while the op waited for this batch:
            // it never reaches the kernel.
            o.unclaim();
            // SAFETY: attached.
            unsafe { op::clear_callback(o) };
            continue;
        }
        ops.push(s.as_ptr());
        futs.push(fut);
    }
    let n = ops.len();
    if n == 0 {
        return;
    }
    let claimed: Vec<(usize, *mut Operation)> = ops
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            // SAFETY: attached; `p` is an Operation claimed by `submit` and
            // not begun (our contract).
            unsafe { op::begin(as_op(p), slf) };
            (i, p.cast::<Operation>())
        })
        .collect();
    // Per op: accepted by the kernel, or its awaiter has been given an error.
    let mut settled = vec![false; n];
    let mut in_kernel = vec![false; n];
    let mut accepted = Vec::new();
    let mut start = 0usize;
    // SAFETY: attached; every op of `claimed` was claimed and begun above.
    let mut round = unsafe { submit_claimed(slf, c, &claimed, Some(&mut accepted)) };
    loop {
        match round {
            Err(e) => {
                // Nothing of this round reached the kernel.
                // SAFETY: attached; `e` is not raised.
                if let Some(x) = unsafe { to_exception(e) } {
                    for i in start..n {
                        if !settled[i] {
                            settled[i] = true;
                            // SAFETY: attached.
                            unsafe { fail(futs[i].as_ref(), &x) };
                        }
                    }
                }
                break;
            }
            Ok((_, failure)) => {
                for &i in &accepted {
                    settled[start + i] = true;
                    in_kernel[start + i] = true;
                }
                accepted.clear();
                let Some((i, e)) = failure else {
                    break;
                };
                let i = start + i;
                settled[i] = true;
                // SAFETY: attached; `e` is not raised.
                if let Some(x) = unsafe { to_exception(e) } {
                    // SAFETY: attached.
                    unsafe { fail(futs[i].as_ref(), &x) };
                }
                start = i + 1;
                if start >= n {
                    break;
                }
                // The rest was rolled back too: claim and submit it again.
                // SAFETY: attached; `ops` are Operations of `slf`'s module.
                round = unsafe { submit_ops(slf, c, &ops[start..], Some(&mut accepted)) };
            }
        }
    }
    // Neither accepted nor refused: claimed by someone else meanwhile.
    if settled.iter().any(|s| !s) {
        // SAFETY: reads the builtin exception class.
        let e = PyErr::new(
            Exc::Custom(unsafe { PyExc_OSError }),
            "Operation was not submitted",
        );
        // SAFETY: attached; `e` is not raised.
        if let Some(x) = unsafe { to_exception(e) } {
            for i in 0..n {
                if !settled[i] {
                    // SAFETY: attached.
                    unsafe { fail(futs[i].as_ref(), &x) };
                }
            }
        }
    }
    // Refused ops were rolled back (NEW, retryable): their futures are no
    // longer ours to resolve.
    for i in 0..n {
        // SAFETY: an Operation kept alive by `staged`.
        let o = unsafe { as_op(ops[i]) };
        if !in_kernel[i] && o.state() == OpState::New {
            // SAFETY: attached.
            unsafe { op::clear_callback(o) };
        }
    }
    if in_kernel.contains(&true) {
        // Page-cache hits completed inside io_submit: deliver them now.
        // SAFETY: attached.
        unsafe { c.deliver(DEFAULT_EVENTS) };
    }
}

/// The loop is closed ("loop gone" in `caio_core::aio`): give back the
/// deferred batch whose flush will never run, then deliver until nothing is
/// in flight (kernel requests and worker jobs on files finish; neither can
/// be cancelled reliably). Deliveries only drop their references here
/// (`op::Discarding`, set by the caller).
///
/// # Safety
/// The engine contract.
unsafe fn shutdown(a: &Adapter, deadline: std::time::Instant) -> bool {
    // SAFETY: the engine contract.
    let c = unsafe { ctx(a.context()) };
    // The flush was a callback of the closed loop: it is gone with it. The
    // batch's references are invisible to the GC, and each staged op holds
    // its future, whose task holds the awaitable, the adapter and so this
    // Context: kept, they would keep all of it alive forever.
    // SAFETY: attached (the engine contract).
    unsafe { abandon_staged(c) };
    if c.forked() {
        return false;
    }
    loop {
        // SAFETY: attached (the engine contract).
        unsafe { c.drain() };
        if c.in_flight.load(Ordering::Acquire) == 0 {
            return true;
        }
        let fd = c.fileno.load(Ordering::Acquire);
        if !caio_core::aio::wait_readable_until(fd, deadline, 20) {
            return false;
        }
    }
}
