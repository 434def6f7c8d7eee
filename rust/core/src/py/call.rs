//! Calling into Python: vectorcalls, method calls, resolving an asyncio
//! future, builtin functions made from static method definitions, and the
//! thread-state helpers (detaching around blocking work, "is this thread
//! attached", "is the interpreter finalising").

use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use pyo3_ffi::*;

use super::error::{PyErr, PyResult, SavedErr};
use super::object::{Borrowed, Interned, Owned};

/// Calls `callable(arg)`.
#[inline]
pub fn call1(callable: Borrowed<'_>, arg: Borrowed<'_>) -> PyResult<Owned> {
    let args = [arg.as_ptr()];
    // SAFETY: attached (crate invariant); a one-element argument vector of
    // valid objects, no keywords.
    unsafe {
        Owned::from_new(PyObject_Vectorcall(
            callable.as_ptr(),
            args.as_ptr(),
            1,
            ptr::null_mut(),
        ))
    }
}

/// Calls `callable()`.
#[inline]
pub fn call0(callable: Borrowed<'_>) -> PyResult<Owned> {
    // SAFETY: attached (crate invariant); `callable` is a valid object.
    unsafe { Owned::from_new(PyObject_CallNoArgs(callable.as_ptr())) }
}

/// Calls `obj.<name>(*args)`; `name` should be an interned string.
#[inline]
pub fn call_method(
    obj: Borrowed<'_>,
    name: Borrowed<'_>,
    args: &[*mut PyObject],
) -> PyResult<Owned> {
    match *args {
        // The common shapes without a heap-allocated argument vector.
        [] => call_method_vec(name, &[obj.as_ptr()]),
        [a] => call_method_vec(name, &[obj.as_ptr(), a]),
        _ => {
            let mut v: Vec<*mut PyObject> = Vec::with_capacity(args.len() + 1);
            v.push(obj.as_ptr());
            v.extend_from_slice(args);
            call_method_vec(name, &v)
        }
    }
}

/// `PyObject_VectorcallMethod(name, [self, *args])`.
fn call_method_vec(name: Borrowed<'_>, self_and_args: &[*mut PyObject]) -> PyResult<Owned> {
    // SAFETY: attached (crate invariant); `self_and_args` holds `self` and
    // the arguments, valid objects, for the length passed.
    unsafe {
        Owned::from_new(PyObject_VectorcallMethod(
            name.as_ptr(),
            self_and_args.as_ptr(),
            self_and_args.len() | PY_VECTORCALL_ARGUMENTS_OFFSET,
            ptr::null_mut(),
        ))
    }
}

static SET_RESULT: Interned = Interned::new(c"set_result");
static DONE: Interned = Interned::new(c"done");

/// `fut.set_result(value)` unless `fut` is already done (cancelled by its
/// awaiter): `Ok(true)` when it was set, `Ok(false)` when the future was
/// done. The common case costs one call: `set_result` is tried first and its
/// `InvalidStateError` is only examined when it fails. Any other failure is
/// returned with `set_result`'s exception.
pub fn set_result_unless_done(fut: Borrowed<'_>, value: Borrowed<'_>) -> PyResult<bool> {
    if call_method(fut, SET_RESULT.get()?, &[value.as_ptr()]).is_ok() {
        return Ok(true);
    }
    // SAFETY: attached (crate invariant); the guard is used right here.
    let saved = unsafe { SavedErr::fetch() };
    match call_method(fut, DONE.get()?, &[]) {
        Ok(d) if d.borrow().is_true_singleton() => Ok(false), // `saved` dropped: expected
        _ => {
            super::error::clear_error();
            saved.restore();
            Err(PyErr::Fetched)
        }
    }
}

/// Runs `f` with the thread detached from the interpreter (GIL released).
/// `f` must not touch any Python object.
pub fn allow_threads<R, F: FnOnce() -> R>(f: F) -> R {
    // SAFETY: attached (crate invariant), so there is a thread state to
    // save; it is restored below before anything else touches Python, also
    // when `f` panics (the panic is resumed once attached again).
    let ts = unsafe { PyEval_SaveThread() };
    let r = catch_unwind(AssertUnwindSafe(f));
    // SAFETY: `ts` is this thread's state saved above.
    unsafe { PyEval_RestoreThread(ts) };
    match r {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Whether the calling thread holds the GIL (has an attached thread state on
/// free-threaded builds). May be called from any thread.
#[inline]
pub fn is_attached() -> bool {
    // SAFETY: `PyGILState_Check` may be called from any thread, attached or
    // not, once the interpreter exists (it does: our code runs in it).
    unsafe { PyGILState_Check() != 0 }
}

/// Whether the interpreter is finalising (running Python is no longer
/// possible from a thread that is not already attached).
#[inline]
pub fn is_finalizing() -> bool {
    #[cfg(Py_3_13)]
    {
        // SAFETY: `Py_IsFinalizing` reads a runtime flag; callable from any
        // thread.
        unsafe { Py_IsFinalizing() != 0 }
    }
    #[cfg(not(Py_3_13))]
    {
        extern "C" {
            fn _Py_IsFinalizing() -> std::ffi::c_int;
        }
        // SAFETY: exported by 3.11 and 3.12 (the public name came in 3.13);
        // reads a runtime flag, callable from any thread.
        unsafe { _Py_IsFinalizing() != 0 }
    }
}

/// A static `PyMethodDef` for builtin functions made at run time
/// ([`MethodDef::new_function`]): process hooks, loop callbacks. CPython
/// keeps the pointer for the function's lifetime and never writes through
/// it.
pub struct MethodDef(UnsafeCell<PyMethodDef>);

// SAFETY: the definition is never written after construction (neither by us
// nor by CPython, which only reads it), so sharing it between threads is
// sharing immutable data.
unsafe impl Sync for MethodDef {}

impl MethodDef {
    /// A `METH_NOARGS` function `f(self, NULL)`.
    pub const fn noargs(name: &'static CStr, f: PyCFunction) -> MethodDef {
        MethodDef::with(name, f, METH_NOARGS)
    }

    /// A `METH_O` function `f(self, arg)`.
    pub const fn onearg(name: &'static CStr, f: PyCFunction) -> MethodDef {
        MethodDef::with(name, f, METH_O)
    }

    const fn with(name: &'static CStr, f: PyCFunction, flags: std::ffi::c_int) -> MethodDef {
        MethodDef(UnsafeCell::new(PyMethodDef {
            ml_name: name.as_ptr(),
            ml_meth: PyMethodDefPointer { PyCFunction: f },
            ml_flags: flags,
            ml_doc: ptr::null(),
        }))
    }

    /// A new builtin function object bound to `slf` (it holds a reference
    /// to it; NULL for a module-less function without `self`).
    ///
    /// # Safety
    /// Attached; `slf` NULL or a valid object of the type `f` expects.
    pub unsafe fn new_function(&'static self, slf: *mut PyObject) -> PyResult<Owned> {
        // SAFETY: attached (caller's contract); the definition is static and
        // never mutated, as CPython requires of `ml`.
        unsafe { Owned::from_new(PyCFunction_NewEx(self.0.get(), slf, ptr::null_mut())) }
    }
}
