//! `OperationAwaitable`: what the adapter's `read`/`write`/... return. A
//! coroutine-like object (`__await__`, `send`, `throw`, `close`;
//! `asyncio.iscoroutine()` accepts it, so do `create_task` and `gather`).
//!
//! Its first step takes an admission slot ([`super::gate`]), hands the op to
//! the engine and — when the op completed inline — returns the value
//! without ever suspending. Otherwise it creates one future, installs it in
//! the op (the backend's drain resolves it, see `op::set_future`) and yields
//! it to the task; the next step returns `op.get_value()`. Cancelling the
//! task cancels the op through the engine; its slot is released once the
//! backend has really finished the op (at once when it never reached the
//! backend), see `hand_slot_to_op`.
//!
//! An op that completed inline may still yield once to the loop before its
//! value is returned ([`super::fairness`]).
//!
//! An op that borrows the caller's memory (`readinto`, a write from a
//! mutable buffer: `Operation::borrows_buffer`) is different when thrown
//! into: the engine is asked to cancel it, but the exception is raised only
//! once the engine is done with the buffer (`CancelWait`, `cancel.rs`), so the
//! buffer is the caller's again when the await ends, however it ends.
//!
//! Files: this one holds the instance and its states; `steps.rs` the forward
//! steps, `cancel.rs` leaving early, `pytype.rs` the CPython type.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pyo3_ffi::*;

use super::adapter::{adapter, Adapter};
use super::gate::Ticket;
use crate::op::{self, as_op};
use crate::py::{Borrowed, Owned, PyResult};
use crate::sync::AtomicState;

crate::u8_state! {
    /// Where an awaitable is in its steps.
    pub(super) enum AwState {
        /// Created, never stepped.
        Init = 0,
        /// Waiting for an admission slot (its future is yielded).
        SlotWait = 1,
        /// The op is in flight (its future is yielded).
        OpWait = 2,
        /// Returned, raised or abandoned: it cannot be stepped again.
        Finished = 3,
        /// Completed synchronously but yielded once to the loop (fairness);
        /// the value is returned by the next step.
        Yielded = 4,
        /// Thrown into (cancelled) while its op uses the caller's buffer:
        /// the op was cancelled in the engine and the awaitable waits for
        /// the engine to be done with the buffer (a fresh future is
        /// yielded); then it raises the exception held in `error`.
        CancelWait = 5,
    }
}

/// The instance struct (allocated zeroed: every field empty, state `Init`).
///
/// The `Cell` fields are used only while a step runs (steps are serialised
/// by `running`, see `Running`) or while the object is finalised, cleared,
/// traversed or deallocated — never concurrently with a step. Slots that may
/// run on another thread meanwhile (repr, the getters) read only `state`
/// (atomic) and the immutable `adapter`/`op`. That is the invariant `aw`
/// relies on to hand out `&Awaitable`.
#[repr(C)]
pub struct Awaitable {
    ob_base: PyObject,
    /// Set at creation, released at dealloc.
    adapter: Option<Owned>,
    /// The Operation (or None when `error` is set); set at creation,
    /// released at dealloc.
    op: Option<Owned>,
    /// The future yielded to the task (admission or completion).
    fut: Cell<Option<Owned>>,
    /// An exception instance raised by the first step, or (`CancelWait`) by
    /// the step that sees the cancelled op finished.
    error: Cell<Option<Owned>>,
    /// The value held back while `Yielded`.
    value: Cell<Option<Owned>>,
    state: AtomicState<AwState>,
    has_slot: Cell<bool>,
    /// While waiting for admission: the gate's ticket, which says whether a
    /// slot was handed over (never the future's `done()`).
    ticket: Cell<Option<Arc<Ticket>>>,
    /// Guards against two threads stepping it at once.
    running: AtomicBool,
}

/// The awaitable behind an object pointer.
///
/// # Safety
/// `p` is a live `OperationAwaitable`, alive for `'a`; the `Cell` fields
/// are not used concurrently from another thread (see [`Awaitable`]).
#[inline]
unsafe fn aw<'a>(p: *mut PyObject) -> &'a Awaitable {
    // SAFETY: instances start with the `Awaitable` struct (`repr(C)`, the
    // object header first); caller's contract for lifetime and exclusivity.
    unsafe { &*p.cast::<Awaitable>() }
}

impl Awaitable {
    fn adapter(&self) -> &Adapter {
        match &self.adapter {
            // SAFETY: `adapter` holds a live `_AsyncioBase` until dealloc.
            Some(a) => unsafe { adapter(a.as_ptr()) },
            // Set at creation; only dealloc empties it.
            None => unreachable_adapter(),
        }
    }

    /// The op (borrowed): an Operation, or `None` for a failed `submit`.
    fn op_obj(&self) -> Borrowed<'_> {
        match &self.op {
            Some(o) => o.borrow(),
            // SAFETY: `None` is an immortal static object.
            None => unsafe { Borrowed::from_ptr(Py_None()) },
        }
    }

    /// The Operation being awaited.
    ///
    /// # Safety
    /// `error` is not set (then `op` is an Operation of the adapter's
    /// module, checked by the constructor's callers).
    unsafe fn operation(&self) -> &op::Operation {
        // SAFETY: forwarded contract.
        unsafe { as_op(self.op_obj().as_ptr()) }
    }

    #[inline]
    fn state(&self) -> AwState {
        self.state.load(Ordering::Relaxed)
    }

    #[inline]
    fn set_state(&self, s: AwState) {
        self.state.store(s, Ordering::Relaxed);
    }
}

#[cold]
fn unreachable_adapter() -> &'static Adapter {
    // An awaitable always has its adapter until dealloc; reaching this
    // would be a bug. Abort rather than unwind through a CPython slot.
    std::process::abort()
}

/// A new awaitable of `a` for `op` (or, with `error`, one that raises it).
pub(super) fn new_awaitable(a: &Adapter, op: Owned, error: Option<Owned>) -> PyResult<Owned> {
    let tp = a.awaitable_type.as_ptr().cast::<PyTypeObject>();
    // SAFETY: `awaitable_type` is the module's OperationAwaitable type (set
    // by tp_new); `PyType_GenericAlloc` returns a zeroed instance nobody
    // else references yet, whose `Option` fields are written in place.
    unsafe {
        let obj = Owned::from_new(PyType_GenericAlloc(tp, 0))?;
        let w = obj.as_ptr().cast::<Awaitable>();
        ptr::addr_of_mut!((*w).adapter).write(Some(Owned::from_borrowed(a.as_ptr())));
        ptr::addr_of_mut!((*w).op).write(Some(op));
        (*w).error.set(error);
        Ok(obj)
    }
}

enum Step {
    Yield(Owned),
    Return(Owned),
}

mod cancel;
mod pytype;
mod steps;

pub(super) use pytype::type_spec;
