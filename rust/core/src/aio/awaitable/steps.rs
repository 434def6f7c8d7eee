//! The awaitable's forward steps: admission, submission to the engine, the
//! wait for the op and its value (`send`, `__next__`, `am_send`).

use pyo3_ffi::*;

use crate::op::{self, OpState};
use crate::py::{call_method, none, Borrowed, Exc, Interned, Owned, PyErr, PyResult, SavedErr};

use super::cancel::{abandon, settle};
use super::{AwState, Awaitable, Step};

static DONE: Interned = Interned::new(c"done");
static CANCELLED: Interned = Interned::new(c"cancelled");
static RESULT: Interned = Interned::new(c"result");
static BLOCKING: Interned = Interned::new(c"_asyncio_future_blocking");

/// `fut.<name>()` is `True`.
fn method_true(fut: Borrowed<'_>, name: &Interned) -> PyResult<bool> {
    Ok(call_method(fut, name.get()?, &[])?
        .borrow()
        .is_true_singleton())
}

const CLOSED_MSG: &str = "AsyncioContext is closed: create a new one to submit operations";

/// Marks `fut` as awaited by a task (what `Future.__await__` does) and
/// yields it. The state is set first, so that a failure here leaves the
/// awaitable in a state [`abandon`] knows how to unwind (see `send_step`).
pub(super) fn yield_future(w: &Awaitable, fut: Owned, state: AwState) -> PyResult<Step> {
    w.fut.set(Some(fut.clone()));
    w.set_state(state);
    // SAFETY: attached (crate invariant); `fut` is a live object, the name
    // interned, `True` static.
    if unsafe { PyObject_SetAttr(fut.as_ptr(), BLOCKING.get()?.as_ptr(), Py_True()) } != 0 {
        return Err(PyErr::Fetched);
    }
    Ok(Step::Yield(fut))
}

pub(super) fn release_slot(w: &Awaitable) {
    if w.has_slot.replace(false) {
        w.adapter().gate_release();
    }
}

/// The op is done: free the slot and return its value (or raise its error).
/// `inline`: it completed without the awaitable ever suspending; the loop
/// may get one turn first ([`crate::aio::fairness`]), so a task looping over
/// page-cache hits cannot starve the others.
fn finish(w: &Awaitable, inline: bool) -> PyResult<Step> {
    release_slot(w);
    drop(w.fut.take());
    w.set_state(AwState::Finished);
    // SAFETY: attached; stepping an awaitable without `error` (the INIT
    // step raised and finished it otherwise).
    let v = unsafe { op::get_value(w.operation())? };
    if crate::aio::fairness::must_yield(w.adapter(), inline) {
        w.value.set(Some(v));
        w.set_state(AwState::Yielded);
        // A bare yield: the task reschedules itself with call_soon.
        return Ok(Step::Yield(none()));
    }
    Ok(Step::Return(v))
}

fn submit_op(w: &Awaitable) -> PyResult<Step> {
    let a = w.adapter();
    let opp = w.op_obj().as_ptr();
    // SAFETY: the engine's contract: attached, an Operation of its module.
    match unsafe { (a.engine().submit)(a, opp) } {
        Ok(true) => {}
        Ok(false) => {
            release_slot(w);
            w.set_state(AwState::Finished);
            return Err(PyErr::new(Exc::OSError, "Operation was not submitted"));
        }
        Err(e) => {
            release_slot(w);
            w.set_state(AwState::Finished);
            return Err(e);
        }
    }
    // SAFETY: no `error` here (see `operation`).
    match unsafe { w.operation() }.state() {
        OpState::Done => finish(w, true), // completed inline: no future, no suspension
        OpState::New | OpState::InFlight => wait_for_op(w),
    }
}

/// Installs a fresh future in the in-flight op and yields it.
fn wait_for_op(w: &Awaitable) -> PyResult<Step> {
    let a = w.adapter();
    // SAFETY: no `error` here (see `operation`).
    let o = unsafe { w.operation() };
    let fut = match a.new_future() {
        Ok(f) => f,
        Err(e) => {
            if a.is_bound() {
                // SAFETY: the engine's contract: attached, its op.
                unsafe { (a.engine().cancel)(a, o.as_ptr()) };
            }
            release_slot(w);
            w.set_state(AwState::Finished);
            return Err(e);
        }
    };
    // SAFETY: attached; `fut` is an asyncio future.
    unsafe { op::set_future(o, fut.as_ptr()) };
    match o.state() {
        // Delivered by another thread between the check and the install.
        OpState::Done => finish(w, false),
        OpState::New | OpState::InFlight => yield_future(w, fut, AwState::OpWait),
    }
}

/// One step of the coroutine protocol. A step that fails before the
/// awaitable is finished gives up what it waits for (a queued admission, a
/// granted slot, an in-flight op), so no admission slot can leak however a
/// Python call in between fails (`yield_future`, a future's `done()`).
pub(super) fn send_step(w: &Awaitable) -> PyResult<Step> {
    let r = send_step_inner(w);
    if r.is_err() && w.state() != AwState::Finished {
        // SAFETY: attached; the exception is put back right after.
        let saved = unsafe { SavedErr::fetch() };
        abandon(w);
        saved.restore();
    }
    r
}

/// The granted-or-not decision for a waiter resumed in `SlotWait`.
fn take_granted_slot(w: &Awaitable) -> bool {
    let t = w.ticket.take();
    match &t {
        Some(t) if t.take() => {
            w.has_slot.set(true);
            true
        }
        _ => {
            w.ticket.set(t);
            false
        }
    }
}

fn send_step_inner(w: &Awaitable) -> PyResult<Step> {
    let a = w.adapter();
    match w.state() {
        AwState::Init => {
            if let Some(e) = w.error.take() {
                w.set_state(AwState::Finished);
                // SAFETY: attached; `e` is an exception instance.
                unsafe { PyErr_SetObject(Py_TYPE(e.as_ptr()).cast(), e.as_ptr()) };
                return Err(PyErr::Fetched);
            }
            if a.is_closed() || !a.is_bound() {
                w.set_state(AwState::Finished);
                return Err(PyErr::runtime(CLOSED_MSG));
            }
            if a.gate_try_acquire() {
                w.has_slot.set(true);
                return submit_op(w);
            }
            let fut = a.new_future()?;
            w.ticket.set(Some(a.gate_wait(&fut)));
            yield_future(w, fut, AwState::SlotWait)
        }
        AwState::SlotWait => {
            let Some(fut) = w.fut.take() else {
                return Err(PyErr::runtime("admission future missing"));
            };
            // Whether a slot was handed over is the ticket's to say (set by
            // gate_release before it resolves the future).
            if !take_granted_slot(w) {
                w.fut.set(Some(fut.clone()));
                if !method_true(fut.borrow(), &DONE)? {
                    // Resumed without the future being done: keep waiting.
                    return yield_future(w, fut, AwState::SlotWait);
                }
                if method_true(fut.borrow(), &CANCELLED)? {
                    abandon(w);
                    // Raises CancelledError.
                    call_method(fut.borrow(), RESULT.get()?, &[])?;
                    return Err(PyErr::runtime("admission future cancelled"));
                }
                return Err(PyErr::runtime("admission future resolved without a slot"));
            }
            drop(w.ticket.take());
            drop(fut);
            if a.is_closed() || !a.is_bound() {
                release_slot(w);
                w.set_state(AwState::Finished);
                return Err(PyErr::runtime(CLOSED_MSG));
            }
            submit_op(w)
        }
        // SAFETY: no `error` past `Init`.
        AwState::OpWait => match unsafe { w.operation() }.state() {
            OpState::Done => finish(w, false),
            OpState::New | OpState::InFlight => wait_for_op(w),
        },
        AwState::Yielded => {
            w.set_state(AwState::Finished);
            Ok(Step::Return(w.value.take().unwrap_or_else(none)))
        }
        AwState::CancelWait => settle(w),
        AwState::Finished => Err(PyErr::runtime("cannot reuse already awaited coroutine")),
    }
}
