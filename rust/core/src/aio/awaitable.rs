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
//! once the engine is done with the buffer (`CancelWait`, [`settle`]), so the
//! buffer is the caller's again when the await ends, however it ends.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3_ffi::*;

use super::adapter::{adapter, Adapter};
use crate::op::{self, as_op, OpState};
use crate::py::typespec::{fast, noargs, onearg};
use crate::py::{
    call_method, catch, clear_error, none, py_str, py_tuple, trampoline, trampoline_void, Borrowed,
    Exc, Interned, MethodDef, Owned, PyErr, PyResult, SavedErr, TypeSpec,
};
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

static DONE: Interned = Interned::new(c"done");
static CANCELLED: Interned = Interned::new(c"cancelled");
static CANCEL: Interned = Interned::new(c"cancel");
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
/// yields it.
fn yield_future(w: &Awaitable, fut: Owned, state: AwState) -> PyResult<Step> {
    // SAFETY: attached (crate invariant); `fut` is a live object, the name
    // interned, `True` static.
    if unsafe { PyObject_SetAttr(fut.as_ptr(), BLOCKING.get()?.as_ptr(), Py_True()) } != 0 {
        return Err(PyErr::Fetched);
    }
    w.fut.set(Some(fut.clone()));
    w.set_state(state);
    Ok(Step::Yield(fut))
}

fn release_slot(w: &Awaitable) {
    if w.has_slot.replace(false) {
        w.adapter().gate_release();
    }
}

/// The op is done: free the slot and return its value (or raise its error).
/// `inline`: it completed without the awaitable ever suspending; the loop
/// may get one turn first ([`super::fairness`]), so a task looping over
/// page-cache hits cannot starve the others.
fn finish(w: &Awaitable, inline: bool) -> PyResult<Step> {
    release_slot(w);
    drop(w.fut.take());
    w.set_state(AwState::Finished);
    // SAFETY: attached; stepping an awaitable without `error` (the INIT
    // step raised and finished it otherwise).
    let v = unsafe { op::get_value(w.operation())? };
    if super::fairness::must_yield(w.adapter(), inline) {
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

fn send_step(w: &Awaitable) -> PyResult<Step> {
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
            a.gate_wait(&fut);
            yield_future(w, fut, AwState::SlotWait)
        }
        AwState::SlotWait => {
            let Some(fut) = w.fut.take() else {
                return Err(PyErr::runtime("admission future missing"));
            };
            if !method_true(fut.borrow(), &DONE)? {
                // Resumed without the future being done: keep waiting.
                return yield_future(w, fut, AwState::SlotWait);
            }
            if method_true(fut.borrow(), &CANCELLED)? {
                w.set_state(AwState::Finished);
                // Raises CancelledError.
                call_method(fut.borrow(), RESULT.get()?, &[])?;
                return Err(PyErr::runtime("admission future cancelled"));
            }
            w.has_slot.set(true); // handed over by gate_release
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
fn settle(w: &Awaitable) -> PyResult<Step> {
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
fn cancel_and_settle(w: &Awaitable) -> PyResult<Step> {
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
fn waits_on_throw(w: &Awaitable) -> bool {
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
fn abandon(w: &Awaitable) {
    let a = w.adapter();
    match w.state() {
        AwState::SlotWait => {
            if let Some(fut) = w.fut.take() {
                let granted = method_true(fut.borrow(), &DONE).unwrap_or(false)
                    && !method_true(fut.borrow(), &CANCELLED).unwrap_or(true);
                if granted {
                    w.has_slot.set(true);
                } else if let Ok(name) = CANCEL.get() {
                    // The gate skips cancelled futures.
                    let _ = call_method(fut.borrow(), name, &[]);
                }
                clear_error();
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

/// Serialises the steps of one awaitable (two threads stepping it at once
/// is a `ValueError`, like a generator's "already executing").
struct Running<'a>(&'a Awaitable);

impl<'a> Running<'a> {
    fn enter(w: &'a Awaitable) -> PyResult<Running<'a>> {
        if w.running
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(PyErr::value_error("coroutine already executing"));
        }
        Ok(Running(w))
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

/// One step under the [`Running`] guard.
///
/// # Safety
/// `slf` is one of our awaitables (a slot or method of its type).
unsafe fn step(slf: *mut PyObject, f: impl FnOnce(&Awaitable) -> PyResult<Step>) -> PyResult<Step> {
    // SAFETY: forwarded contract; `Running` serialises the steps, which are
    // the only users of the `Cell`s besides finalisation/GC.
    let w = unsafe { aw(slf) };
    let _g = Running::enter(w)?;
    f(w)
}

/// # Safety
/// CPython's `am_send` of `OperationAwaitable`: attached, `slf` one of our
/// awaitables, `result` a valid out-pointer.
unsafe extern "C" fn aw_am_send(
    slf: *mut PyObject,
    _arg: *mut PyObject,
    result: *mut *mut PyObject,
) -> PySendResult {
    // SAFETY: CPython's am_send on one of our awaitables.
    let (value, kind) = match catch(|| unsafe { step(slf, send_step) }) {
        Some(Step::Yield(v)) => (v.into_ptr(), PySendResult::PYGEN_NEXT),
        Some(Step::Return(v)) => (v.into_ptr(), PySendResult::PYGEN_RETURN),
        None => (ptr::null_mut(), PySendResult::PYGEN_ERROR),
    };
    // SAFETY: CPython passes a valid out-pointer for the result.
    unsafe { *result = value };
    kind
}

/// `StopIteration(value)` as the way an iterator returns a value.
fn stop_iteration(v: Owned) -> PyErr {
    if v.borrow().is_none() {
        // SAFETY: attached; `StopIteration` is a class.
        unsafe { PyErr_SetNone(PyExc_StopIteration) };
        return PyErr::Fetched;
    }
    // A 1-tuple: exactly `value`, even when it is a tuple/exception itself.
    let exc = py_tuple(vec![v]).and_then(|args| {
        // SAFETY: attached; `StopIteration` is a class, `args` a tuple.
        unsafe {
            Owned::from_new(PyObject_Call(
                PyExc_StopIteration,
                args.as_ptr(),
                ptr::null_mut(),
            ))
        }
    });
    if let Ok(exc) = exc {
        // SAFETY: attached; `exc` is a StopIteration instance.
        unsafe { PyErr_SetObject(PyExc_StopIteration, exc.as_ptr()) };
    }
    PyErr::Fetched
}

fn step_to_py(r: PyResult<Step>) -> PyResult<Owned> {
    match r? {
        Step::Yield(v) => Ok(v),
        Step::Return(v) => Err(stop_iteration(v)),
    }
}

/// # Safety
/// A slot or method of `OperationAwaitable` called by CPython: attached, `slf`
/// one of our awaitables, the arguments CPython's.
unsafe extern "C" fn aw_iternext(slf: *mut PyObject) -> *mut PyObject {
    // SAFETY: CPython's tp_iternext on one of our awaitables.
    trampoline(|| step_to_py(unsafe { step(slf, send_step) }))
}

/// # Safety
/// A slot or method of `OperationAwaitable` called by CPython: attached, `slf`
/// one of our awaitables, the arguments CPython's.
unsafe extern "C" fn aw_send(slf: *mut PyObject, value: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a METH_O method's argument is a live object.
        let value = unsafe { Borrowed::from_ptr(value) };
        let body = |w: &Awaitable| {
            if !value.is_none() && w.state() == AwState::Init {
                return Err(PyErr::type_error(
                    "can't send non-None value to a just-started coroutine",
                ));
            }
            send_step(w)
        };
        // SAFETY: a method of our awaitable type.
        let r = unsafe { step(slf, body) };
        step_to_py(r)
    })
}

/// # Safety
/// A slot or method of `OperationAwaitable` called by CPython: attached, `slf`
/// one of our awaitables, the arguments CPython's.
unsafe extern "C" fn aw_throw(
    slf: *mut PyObject,
    args: *mut *mut PyObject,
    nargsf: Py_ssize_t,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: CPython's METH_FASTCALL arguments (NULL when there are
        // none: `positional` guards that).
        let args = unsafe { crate::args::positional(args.cast_const(), nargsf) };
        let (typ, val) = match *args {
            [typ] => (typ, ptr::null_mut()),
            [typ, val] | [typ, val, _] => (typ, val),
            _ => {
                return Err(PyErr::type_error(format!(
                    "throw expected 1 to 3 arguments, got {}",
                    args.len()
                )))
            }
        };
        // SAFETY: the arguments are live objects; attached.
        let (typ, val) = unsafe { (Borrowed::from_ptr(typ), Borrowed::from_ptr_opt(val)) };
        let val = val.filter(|v| !v.is_none());
        let body = |w: &Awaitable| {
            // Normalise like generator.throw(): an instance, or a class
            // (+ value).
            // SAFETY: attached; live objects.
            let is_instance = unsafe { PyExceptionInstance_Check(typ.as_ptr()) } != 0;
            if is_instance {
                if val.is_some() {
                    return Err(PyErr::type_error(
                        "instance exception may not have a separate value",
                    ));
                }
            // SAFETY: attached; a live object.
            } else if unsafe { PyExceptionClass_Check(typ.as_ptr()) } == 0 {
                return Err(PyErr::type_error(format!(
                    "exceptions must be classes or instances deriving from BaseException, not {}",
                    typ.type_name()
                )));
            }
            let wait = waits_on_throw(w);
            if !wait {
                abandon(w);
            }
            // SAFETY: attached; `typ` an exception instance or class, `val`
            // a live object.
            unsafe {
                match val {
                    _ if is_instance => {
                        PyErr_SetObject(Py_TYPE(typ.as_ptr()).cast(), typ.as_ptr());
                    }
                    None => PyErr_SetNone(typ.as_ptr()),
                    Some(v) => PyErr_SetObject(typ.as_ptr(), v.as_ptr()),
                }
            }
            if wait {
                return cancel_and_settle(w);
            }
            Err(PyErr::Fetched)
        };
        // SAFETY: a method of our awaitable type.
        let r = unsafe { step(slf, body) };
        step_to_py(r)
    })
}

/// # Safety
/// A slot or method of `OperationAwaitable` called by CPython: attached, `slf`
/// one of our awaitables, the arguments CPython's.
unsafe extern "C" fn aw_close(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let body = |w: &Awaitable| {
            abandon(w);
            Ok(Step::Yield(none()))
        };
        // SAFETY: a method of our awaitable type.
        unsafe { step(slf, body) }.map(|_| none())
    })
}

/// # Safety
/// A slot or method of `OperationAwaitable` called by CPython: attached, `slf`
/// one of our awaitables, the arguments CPython's.
unsafe extern "C" fn aw_await(slf: *mut PyObject) -> *mut PyObject {
    // SAFETY: CPython's am_await/tp_iter on a live object: return it.
    unsafe { Py_INCREF(slf) };
    slf
}

/// # Safety
/// CPython's `tp_finalize` of `OperationAwaitable`: attached, no step of `slf`
/// running.
unsafe extern "C" fn aw_finalize(slf: *mut PyObject) {
    // SAFETY: CPython finalises one of our awaitables: no step runs.
    let w = unsafe { aw(slf) };
    match w.state() {
        AwState::SlotWait | AwState::OpWait | AwState::CancelWait => {}
        AwState::Init | AwState::Finished | AwState::Yielded => return,
    }
    // SAFETY: attached (finalisers run attached); restored below.
    let saved = unsafe { SavedErr::fetch() };
    trampoline_void(|| abandon(w));
    saved.restore();
}

/// # Safety
/// CPython's `tp_traverse` of `OperationAwaitable`: `slf` one of our
/// awaitables, no step running.
unsafe extern "C" fn aw_traverse(slf: *mut PyObject, visit: visitproc, arg: *mut c_void) -> c_int {
    // SAFETY: CPython traverses one of our awaitables (world stopped / GIL
    // held: no step runs, so reading the `Cell`s in place is sound); the
    // fields hold live objects, visited with the collector's callback.
    unsafe {
        let w = aw(slf);
        for o in [&w.adapter, &w.op] {
            let r = crate::py::visit_opt(o, visit, arg);
            if r != 0 {
                return r;
            }
        }
        for c in [&w.fut, &w.error, &w.value] {
            let r = crate::py::visit_opt(&*c.as_ptr(), visit, arg);
            if r != 0 {
                return r;
            }
        }
        visit(Py_TYPE(slf).cast(), arg)
    }
}

/// # Safety
/// CPython's `tp_clear` of `OperationAwaitable`: attached, `slf` unreachable,
/// no step running.
unsafe extern "C" fn aw_clear(slf: *mut PyObject) -> c_int {
    // SAFETY: CPython clears one of our (unreachable) awaitables.
    let w = unsafe { aw(slf) };
    // `adapter` and `op` stay until dealloc (abandon() may still need them
    // if finalisation runs after clear); they cannot close a cycle alone.
    let dropped = (w.fut.take(), w.error.take(), w.value.take());
    drop(dropped);
    0
}

/// # Safety
/// CPython's `tp_dealloc` of `OperationAwaitable`: attached, the last reference
/// to `slf` is gone.
unsafe extern "C" fn aw_dealloc(slf: *mut PyObject) {
    trampoline_void(|| {
        // SAFETY: CPython deallocates one of our awaitables: after the
        // finaliser (which may resurrect it) nothing else references it, so
        // its fields are dropped in place once and the memory freed.
        unsafe {
            if PyObject_CallFinalizerFromDealloc(slf) != 0 {
                return; // resurrected
            }
            PyObject_GC_UnTrack(slf.cast());
            let w = slf.cast::<Awaitable>();
            ptr::drop_in_place(ptr::addr_of_mut!((*w).fut));
            ptr::drop_in_place(ptr::addr_of_mut!((*w).error));
            ptr::drop_in_place(ptr::addr_of_mut!((*w).value));
            ptr::drop_in_place(ptr::addr_of_mut!((*w).op));
            ptr::drop_in_place(ptr::addr_of_mut!((*w).adapter));
            let tp = Py_TYPE(slf);
            if let Some(free) = (*tp).tp_free {
                free(slf.cast());
            }
            Py_DECREF(tp.cast());
        }
    })
}

/// # Safety
/// A slot or method of `OperationAwaitable` called by CPython: attached, `slf`
/// one of our awaitables, the arguments CPython's.
unsafe extern "C" fn aw_repr(slf: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a slot of our awaitable type; only the atomic state and
        // the immutable `op` are read.
        let w = unsafe { aw(slf) };
        let state = match w.state() {
            AwState::Init => "created",
            AwState::SlotWait => "waiting for a slot",
            AwState::OpWait => "in flight",
            AwState::Yielded => "done, yielding once",
            AwState::CancelWait => "cancelled, waiting for the engine",
            AwState::Finished => "finished",
        };
        py_str(&format!(
            "<caio operation awaitable at {:#x} ({}): {}>",
            slf as usize,
            state,
            w.op_obj().repr()
        ))
    })
}

/// `read`, `write`, ... (shown in task reprs); `submit` for a failed submit.
///
/// Reads only the immutable `op` (never the `Cell`s): task reprs call it from
/// any thread, possibly while another one steps the awaitable.
fn aw_name(w: &Awaitable) -> &'static str {
    // `op` is None exactly when the awaitable was made for a refused
    // `submit` (with its `error`); otherwise it is an Operation.
    if w.op_obj().is_none() {
        "submit"
    } else {
        // SAFETY: not None, so an Operation (see above).
        unsafe { w.operation() }.mode()
    }
}

/// # Safety
/// A slot or method of `OperationAwaitable` called by CPython: attached, `slf`
/// one of our awaitables, the arguments CPython's.
unsafe extern "C" fn aw_get_name(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    // SAFETY: a getter of our awaitable type.
    trampoline(|| py_str(aw_name(unsafe { aw(slf) })))
}

/// # Safety
/// A slot or method of `OperationAwaitable` called by CPython: attached, `slf`
/// one of our awaitables, the arguments CPython's.
unsafe extern "C" fn aw_get_qualname(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a getter of our awaitable type.
        let w = unsafe { aw(slf) };
        py_str(&format!("AsyncioContext.{}", aw_name(w)))
    })
}

/// # Safety
/// A slot or method of `OperationAwaitable` called by CPython: attached, `slf`
/// one of our awaitables, the arguments CPython's.
unsafe extern "C" fn aw_get_op(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    // SAFETY: a getter of our awaitable type.
    trampoline(|| Ok(unsafe { aw(slf) }.op_obj().to_owned()))
}

pub(super) fn type_spec() -> TypeSpec {
    TypeSpec::new(
        c"caio.OperationAwaitable",
        std::mem::size_of::<Awaitable>(),
        Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    )
    .doc(c"An I/O operation in progress: await it (or wrap it in a task). Coroutine-like: \
__await__, send, throw, close.")
    .dealloc(aw_dealloc)
    .traverse(aw_traverse)
    .clear(aw_clear)
    .finalize(aw_finalize)
    .repr(aw_repr)
    .iter(aw_await)
    .iternext(aw_iternext)
    .am_await(aw_await)
    .am_send(aw_am_send)
    .method(onearg(
        c"send",
        aw_send,
        c"send($self, value, /)\n--\n\nAdvance the operation (coroutine protocol).",
    ))
    .method(fast(
        c"throw",
        aw_throw,
        c"throw($self, typ, val=None, tb=None, /)\n--\n\nAbandon the operation (cancelling it in the kernel) and raise.",
    ))
    .method(noargs(
        c"close",
        aw_close,
        c"close($self)\n--\n\nAbandon the operation (cancelling it in the kernel).",
    ))
    .getter(c"operation", aw_get_op, c"the Operation being awaited")
    .getter(
        c"__name__",
        aw_get_name,
        c"the operation kind (shown in task reprs)",
    )
    .getter(
        c"__qualname__",
        aw_get_qualname,
        c"AsyncioContext.<kind> (shown in task reprs)",
    )
}
