//! Shared foundation of caio's native backends.
//!
//! * [`py`]: owned/borrowed object wrappers, the error type and the one place
//!   where Rust results become "NULL + exception" (panics included).
//! * [`args`]: vectorcall argument parsing and range-checked integers.
//! * [`op`]: the `Operation` type (constructors, properties, `get_value`,
//!   `set_callback`, repr, GC, one-shot life cycle, buffer ownership).
//! * [`module`]: module state and multi-phase init ([`backend_module!`]).
//! * [`pool`]: the worker pool (thread_aio's engine, linux_aio's fallback)
//!   with direct or event-loop (queued) completion delivery.
//! * [`sys`]: errno helpers, positional I/O, fork detection, wake-up fds.
//! * [`aio`]: the native asyncio fast path (awaitable operations, admission
//!   gate, subclassable adapter base) for loop-thread delivery backends.
//!
//! A backend crate adds only its engine and its `Context` type.

#![allow(clippy::missing_safety_doc)]

pub use pyo3_ffi;

pub mod aio;
pub mod args;
pub mod module;
pub mod op;
pub mod pool;
pub mod py;
pub mod sys;

use std::ptr;

use pyo3_ffi::*;

use py::{Owned, PyResult};

/// A module-less `METH_NOARGS` builtin `name` that runs `action` (attached)
/// and returns None: the process hooks below.
macro_rules! process_hook {
    ($def:ident, $name:literal, $action:path) => {
        static mut $def: PyMethodDef = {
            unsafe extern "C" fn hook(_m: *mut PyObject, _a: *mut PyObject) -> *mut PyObject {
                py::trampoline(|| {
                    $action();
                    Ok(py::none())
                })
            }
            PyMethodDef {
                ml_name: $name.as_ptr(),
                ml_meth: PyMethodDefPointer { PyCFunction: hook },
                ml_flags: METH_NOARGS,
                ml_doc: ptr::null(),
            }
        };
    };
}

process_hook!(
    ATEXIT_DEF,
    c"_caio_native_atexit",
    pool::interpreter_exiting
);
process_hook!(
    BEFORE_FORK_DEF,
    c"_caio_native_before_fork",
    pool::before_fork
);
process_hook!(AFTER_FORK_DEF, c"_caio_native_after_fork", pool::after_fork);

/// A new builtin function object for one of the hooks above.
unsafe fn hook_function(def: *mut PyMethodDef) -> PyResult<Owned> {
    Owned::from_new(PyCFunction_NewEx(def, ptr::null_mut(), ptr::null_mut()))
}

/// Registers (once per process) the `atexit` hook that lets worker pools
/// finish and then keeps them from attaching to a finalising interpreter,
/// and (where `os.register_at_fork` exists) the fork hooks that keep workers
/// from attaching while `os.fork()` runs ([`pool::before_fork`]).
///
/// # Safety
/// Caller attached.
pub unsafe fn register_process_hooks() -> PyResult<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let atexit = Owned::from_new(PyImport_ImportModule(c"atexit".as_ptr()))?;
    let func = hook_function(ptr::addr_of_mut!(ATEXIT_DEF))?;
    let register = Owned::from_new(PyObject_GetAttrString(
        atexit.as_ptr(),
        c"register".as_ptr(),
    ))?;
    py::call1(register.borrow(), func.borrow())?;

    let os = Owned::from_new(PyImport_ImportModule(c"os".as_ptr()))?;
    if PyObject_HasAttrString(os.as_ptr(), c"register_at_fork".as_ptr()) == 0 {
        return Ok(()); // no fork() here
    }
    let before = hook_function(ptr::addr_of_mut!(BEFORE_FORK_DEF))?;
    let after = hook_function(ptr::addr_of_mut!(AFTER_FORK_DEF))?;
    let register = Owned::from_new(PyObject_GetAttrString(
        os.as_ptr(),
        c"register_at_fork".as_ptr(),
    ))?;
    let args = Owned::from_new(PyTuple_New(0))?;
    let kwargs = Owned::from_new(PyDict_New())?;
    for (key, value) in [
        (c"before", &before),
        (c"after_in_parent", &after),
        (c"after_in_child", &after),
    ] {
        if PyDict_SetItemString(kwargs.as_ptr(), key.as_ptr(), value.as_ptr()) != 0 {
            return Err(py::PyErr::Fetched);
        }
    }
    Owned::from_new(PyObject_Call(
        register.as_ptr(),
        args.as_ptr(),
        kwargs.as_ptr(),
    ))?;
    Ok(())
}
