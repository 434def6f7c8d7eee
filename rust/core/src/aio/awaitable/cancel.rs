//! Leaving early: an awaitable thrown into, closed or finalised gives up its
//! admission, cancels its op in the engine and — for an op that borrows the
//! caller's buffer — raises only once the engine is done with it
//! (`CancelWait`, DESIGN.md §5.5); the admission slot follows the op.

use pyo3_ffi::*;

use crate::aio::adapter::adapter;
use crate::op::{self, OpState};
use crate::py::{clear_error, none, trampoline, MethodDef, PyErr, PyResult, SavedErr};

use super::steps::{release_slot, yield_future};
use super::{AwState, Awaitable, Step};

/// Raises the exception held in `error` (the one thrown in), releasing the
/// slot: the op is finished.
fn raise_held(w: &Awaitable) -> PyResult<Step> {
    // SAFETY: attached; an Operation (see `settle`).
    unsafe { op::retire_unsent(w.operation()) };
    release_slot(w);
    drop(w.fut.take());
    w.set_state(AwState::Finished);
    match w.error.take() {
        Some(e) => {
            // SAFETY: attached; `e` is an exception instance.
            unsafe { PyErr_SetObject(Py_TYPE(e.as_ptr()).cast(), e.as_ptr()) };
            Err(PyErr::Fetched)
        }
        None => Err(PyErr::runtime("cancelled operation lost its exception")),
    }
}

/// `CancelWait`: raise the held exception once the engine is done with the
/// op's buffer, else yield a fresh future its delivery resolves (the one the
/// task was waiting on was cancelled with it).
pub(super) fn settle(w: &Awaitable) -> PyResult<Step> {
    // SAFETY: no `error` past `Init` (the held exception came later).
    let o = unsafe { w.operation() };
    if o.state() != OpState::InFlight {
        return raise_held(w); // done, or rolled back before reaching the engine
    }
    let fut = match w.adapter().new_future() {
        Ok(f) => f,
        Err(e) => {
            // No future to wait with: give up as a plain cancel would (the
            // op keeps its buffer export until the engine is done).
            drop(w.error.take());
            abandon(w);
            return Err(e);
        }
    };
    // SAFETY: attached; `fut` is an asyncio future.
    unsafe { op::set_future(o, fut.as_ptr()) };
    if o.state() == OpState::Done {
        return raise_held(w); // delivered between the check and the install
    }
    yield_future(w, fut, AwState::CancelWait)
}

/// Thrown into (the exception is set) while `OpWait` or `CancelWait` with
/// an op that borrows the caller's buffer: cancel it in the engine (once),
/// keep the first exception and wait for the engine ([`settle`]).
pub(super) fn cancel_and_settle(w: &Awaitable) -> PyResult<Step> {
    // SAFETY: attached; the thrown exception is the current one.
    let exc = unsafe { SavedErr::fetch() }.into_value();
    if w.state() == AwState::OpWait {
        drop(w.fut.take());
        w.error.set(exc);
        let a = w.adapter();
        // SAFETY: no `error` past `Init` (just set, after the check).
        let o = unsafe { w.operation() };
        if o.state() == OpState::InFlight && a.is_bound() {
            // SAFETY: the engine's contract: attached, its op.
            unsafe { (a.engine().cancel)(a, o.as_ptr()) };
            clear_error();
        }
    } else {
        drop(exc); // cancelled again while waiting: keep waiting
    }
    settle(w)
}

/// Whether a throw must wait for the engine (see [`cancel_and_settle`]).
pub(super) fn waits_on_throw(w: &Awaitable) -> bool {
    match w.state() {
        // SAFETY: no `error` past `Init`.
        AwState::OpWait => unsafe { w.operation() }.borrows_buffer,
        AwState::CancelWait => true,
        AwState::Init | AwState::SlotWait | AwState::Yielded | AwState::Finished => false,
    }
}

/// Gives up whatever the awaitable waits for (thrown into, closed or
/// finalised): a waiting admission is withdrawn (or a granted slot returned),
/// an in-flight op is cancelled and its slot released. Runs with no
/// exception set.
pub(super) fn abandon(w: &Awaitable) {
    let a = w.adapter();
    match w.state() {
        AwState::SlotWait => {
            drop(w.fut.take());
            if let Some(t) = w.ticket.take() {
                // A slot already handed over is ours to give back; otherwise
                // the gate forgets the waiter.
                if a.gate_withdraw(&t) {
                    w.has_slot.set(true);
                }
            }
            release_slot(w);
        }
        AwState::OpWait | AwState::CancelWait => {
            drop(w.fut.take());
            drop(w.error.take());
            // SAFETY: no `error` past `Init`.
            let o = unsafe { w.operation() };
            // (The adapter may already have been cleared by the GC.)
            if o.state() != OpState::Done && a.is_bound() {
                // SAFETY: the engine's contract: attached, its op.
                unsafe { (a.engine().cancel)(a, o.as_ptr()) };
                clear_error();
            }
            // The op may still be running in the backend: its slot is
            // returned when the backend really finishes it, not now, or
            // cancelled-but-running ops would pile up beyond max_requests
            // (DESIGN.md §5.4, §5.5: no capacity errors however many are cancelled).
            if w.has_slot.get() && hand_slot_to_op(w) {
                w.has_slot.set(false);
            }
            release_slot(w);
        }
        AwState::Yielded => drop(w.value.take()),
        AwState::Init | AwState::Finished => {}
    }
    if !w.op_obj().is_none() {
        // Never handed to the engine (or rolled back): the caller's buffer
        // is released now.
        // SAFETY: attached; not None, so an Operation.
        unsafe { op::retire_unsent(w.operation()) };
    }
    w.set_state(AwState::Finished);
}

/// # Safety
/// A builtin function bound to one of our adapters (`MethodDef::new_function`),
/// called by CPython attached.
unsafe extern "C" fn release_slot_callback(
    adapter_obj: *mut PyObject,
    _result: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: the function is bound to one of our adapters.
        unsafe { adapter(adapter_obj) }.gate_release();
        Ok(none())
    })
}

static RELEASE_SLOT_DEF: MethodDef = MethodDef::onearg(c"_release_slot", release_slot_callback);

/// Makes the op's delivery release the awaitable's admission slot. False if
/// the op is not in flight (the caller releases it now).
fn hand_slot_to_op(w: &Awaitable) -> bool {
    // SAFETY: no `error` past `Init` (only `OpWait` calls this).
    let o = unsafe { w.operation() };
    // Only an op still claimed by the backend can hold it: a Done op has
    // finished, and one the backend rolled back to New (a deferred batch
    // that never reached the kernel, a refused submission) never will.
    match o.state() {
        OpState::InFlight => {}
        OpState::New | OpState::Done => return false,
    }
    // SAFETY: attached; bound to the live adapter.
    match unsafe { RELEASE_SLOT_DEF.new_function(w.adapter().as_ptr()) } {
        // SAFETY: attached.
        Ok(cb) => unsafe { op::set_callback_if_pending(o, cb) },
        Err(_) => {
            clear_error();
            false // no memory: release now rather than never
        }
    }
}
