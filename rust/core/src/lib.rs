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

unsafe extern "C" fn atexit_hook(_m: *mut PyObject, _a: *mut PyObject) -> *mut PyObject {
    py::trampoline(|| {
        pool::interpreter_exiting();
        Ok(py::none())
    })
}

static mut ATEXIT_DEF: PyMethodDef = PyMethodDef {
    ml_name: c"_caio_native_atexit".as_ptr(),
    ml_meth: PyMethodDefPointer {
        PyCFunction: atexit_hook,
    },
    ml_flags: METH_NOARGS,
    ml_doc: ptr::null(),
};

/// Registers (once per process) the `atexit` hook that lets worker pools
/// finish and then keeps them from attaching to a finalising interpreter.
///
/// # Safety
/// Caller attached.
pub unsafe fn register_atexit() -> PyResult<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let atexit = Owned::from_new(PyImport_ImportModule(c"atexit".as_ptr()))?;
    let func = Owned::from_new(PyCFunction_NewEx(
        ptr::addr_of_mut!(ATEXIT_DEF),
        ptr::null_mut(),
        ptr::null_mut(),
    ))?;
    let register = Owned::from_new(PyObject_GetAttrString(
        atexit.as_ptr(),
        c"register".as_ptr(),
    ))?;
    py::call1(register.borrow(), func.borrow())?;
    Ok(())
}
