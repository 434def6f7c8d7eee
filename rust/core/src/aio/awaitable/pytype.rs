//! The `OperationAwaitable` type: CPython's slots and methods (coroutine
//! protocol, GC, repr, getters) over the steps in [`super::steps`] and
//! [`super::cancel`].

use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::atomic::Ordering;

use pyo3_ffi::*;

use crate::py::typespec::{fast, noargs, onearg};
use crate::py::{
    catch, none, py_str, py_tuple, trampoline, trampoline_void, Borrowed, Owned, PyErr, PyResult,
    SavedErr, TypeSpec,
};

use super::cancel::{abandon, cancel_and_settle, waits_on_throw};
use super::steps::send_step;
use super::{aw, AwState, Awaitable, Step};

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
    // (The ticket holds no Python object; it stays for `abandon`.)
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
            ptr::drop_in_place(ptr::addr_of_mut!((*w).ticket));
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

pub(in crate::aio) fn type_spec() -> TypeSpec {
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
