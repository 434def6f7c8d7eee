//! The error type of every native function, the saved-exception guard, and
//! the one place where a Rust result (or a panic) becomes CPython's "NULL/-1
//! with an exception set": [`catch`], which every `extern "C"` entry point
//! goes through (directly or via the `trampoline*` shapes).

use std::borrow::Cow;
use std::ffi::{c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use pyo3_ffi::*;

use super::object::{py_int, py_str, py_tuple, Owned};

/// Built-in exception classes we raise, resolved at raise time.
#[derive(Clone, Copy, Debug)]
pub enum Exc {
    TypeError,
    ValueError,
    OverflowError,
    RuntimeError,
    MemoryError,
    SystemError,
    ImportError,
    BlockingIOError,
    NotImplementedError,
    OSError,
    /// A class object owned elsewhere (a module-state exception type).
    Custom(*mut PyObject),
}

impl Exc {
    fn as_ptr(self) -> *mut PyObject {
        // SAFETY: reading the addresses of CPython's builtin exception
        // classes (statics initialised before any extension module loads).
        unsafe {
            match self {
                Exc::TypeError => PyExc_TypeError,
                Exc::ValueError => PyExc_ValueError,
                Exc::OverflowError => PyExc_OverflowError,
                Exc::RuntimeError => PyExc_RuntimeError,
                Exc::MemoryError => PyExc_MemoryError,
                Exc::SystemError => PyExc_SystemError,
                Exc::ImportError => PyExc_ImportError,
                Exc::BlockingIOError => PyExc_BlockingIOError,
                Exc::NotImplementedError => PyExc_NotImplementedError,
                Exc::OSError => PyExc_OSError,
                Exc::Custom(p) => p,
            }
        }
    }
}

/// A Python exception waiting to be raised.
#[derive(Debug)]
pub enum PyErr {
    /// The exception is already set in the interpreter (a C API call failed).
    Fetched,
    /// `exc(message)`.
    Msg(Exc, Cow<'static, str>),
    /// `exc(errno, strerror)`, e.g. `OSError(9, 'Bad file descriptor')`; for
    /// `OSError` itself CPython picks the errno subclass (`FileNotFoundError`…).
    Errno(Exc, i32),
    /// `exc(errno, message)` with our own explanatory message.
    ErrnoMsg(Exc, i32, String),
}

pub type PyResult<T> = Result<T, PyErr>;

impl PyErr {
    pub fn new(exc: Exc, msg: impl Into<Cow<'static, str>>) -> PyErr {
        PyErr::Msg(exc, msg.into())
    }
    pub fn type_error(msg: impl Into<Cow<'static, str>>) -> PyErr {
        PyErr::new(Exc::TypeError, msg)
    }
    pub fn value_error(msg: impl Into<Cow<'static, str>>) -> PyErr {
        PyErr::new(Exc::ValueError, msg)
    }
    pub fn overflow(msg: impl Into<Cow<'static, str>>) -> PyErr {
        PyErr::new(Exc::OverflowError, msg)
    }
    pub fn runtime(msg: impl Into<Cow<'static, str>>) -> PyErr {
        PyErr::new(Exc::RuntimeError, msg)
    }
    /// `OSError(errno, strerror)` (CPython maps it to the errno subclass).
    pub fn os(errno: i32) -> PyErr {
        PyErr::Errno(Exc::OSError, errno)
    }
    /// The error of the last failed libc call.
    pub fn last_os() -> PyErr {
        PyErr::os(crate::sys::last_errno())
    }

    /// This error as an exception instance, not raised (e.g. to hand to a
    /// future's `set_exception`). Caller attached, no exception set (it
    /// would be replaced).
    pub fn into_instance(self) -> PyResult<Owned> {
        self.restore();
        // SAFETY: attached (crate invariant); `restore` just set the
        // exception taken here.
        unsafe { SavedErr::fetch() }
            .into_value()
            .ok_or_else(|| PyErr::new(Exc::SystemError, "caio: no exception to take"))
    }

    /// Sets this error as the current Python exception (caller attached).
    pub fn restore(self) {
        match self {
            PyErr::Fetched => {
                // SAFETY: attached (crate invariant, see `py`).
                if unsafe { PyErr_Occurred() }.is_null() {
                    // SAFETY: attached; a static message.
                    unsafe {
                        PyErr_SetString(
                            PyExc_SystemError,
                            c"caio: error return without exception set".as_ptr(),
                        );
                    }
                }
            }
            PyErr::Msg(exc, msg) => {
                let c = cstring(&msg);
                // SAFETY: attached; `exc` is an exception class and `c` a
                // NUL-terminated string alive for the call.
                unsafe { PyErr_SetString(exc.as_ptr(), c.as_ptr()) };
            }
            PyErr::Errno(exc, errno) => {
                set_errno_exc(exc.as_ptr(), errno, &crate::sys::strerror(errno));
            }
            PyErr::ErrnoMsg(exc, errno, msg) => set_errno_exc(exc.as_ptr(), errno, &msg),
        }
    }
}

/// Raises `exc(errno, msg)` (attached; `exc` an exception class).
fn set_errno_exc(exc: *mut PyObject, errno: i32, msg: &str) {
    let value = py_tuple(vec![
        match py_int(i64::from(errno)) {
            Ok(v) => v,
            Err(_) => return,
        },
        match py_str(msg) {
            Ok(v) => v,
            Err(_) => return,
        },
    ])
    // SAFETY: attached; `exc` is a class, the arguments a tuple.
    .and_then(|args| unsafe {
        Owned::from_new(PyObject_Call(exc, args.as_ptr(), ptr::null_mut()))
    });
    if let Ok(value) = value {
        // SAFETY: attached; `value` is an exception instance of its type.
        unsafe { PyErr_SetObject(Py_TYPE(value.as_ptr()).cast(), value.as_ptr()) };
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "\\0")).unwrap_or_default()
}

/// The current exception, taken out of the interpreter: put back with
/// [`SavedErr::restore`], or dropped (released) with the guard. One
/// exception object on 3.12+ (`PyErr_GetRaisedException`), the classic
/// `(type, value, traceback)` triple before.
pub struct SavedErr(
    #[cfg(Py_3_12)] *mut PyObject,
    #[cfg(not(Py_3_12))] [*mut PyObject; 3],
);

impl SavedErr {
    /// Takes the current exception (if any) out of the interpreter.
    ///
    /// # Safety
    /// Caller attached; the guard is dropped or restored attached.
    pub unsafe fn fetch() -> SavedErr {
        #[cfg(Py_3_12)]
        {
            // SAFETY: attached (caller's contract); returns a new reference
            // or NULL, and clears the current exception.
            SavedErr(unsafe { PyErr_GetRaisedException() })
        }
        #[cfg(not(Py_3_12))]
        {
            let mut s = [ptr::null_mut(); 3];
            let [t, v, tb] = &mut s;
            // SAFETY: attached (caller's contract); the three out-pointers
            // are valid locals.
            unsafe { PyErr_Fetch(t, v, tb) };
            SavedErr(s)
        }
    }

    /// Makes the saved exception (or none) current again.
    pub fn restore(self) {
        let s = std::mem::ManuallyDrop::new(self);
        // SAFETY: attached (the guard's contract); hands the saved
        // references (or NULLs) back to the interpreter, which steals them —
        // the `ManuallyDrop` keeps us from releasing them too.
        #[cfg(Py_3_12)]
        unsafe {
            PyErr_SetRaisedException(s.0);
        }
        // SAFETY: as above.
        #[cfg(not(Py_3_12))]
        unsafe {
            PyErr_Restore(s.0[0], s.0[1], s.0[2]);
        }
    }

    /// The saved exception as one object: the exception instance, its
    /// traceback attached (normalised first before 3.12); `None` when
    /// nothing was saved.
    pub fn into_value(self) -> Option<Owned> {
        let s = std::mem::ManuallyDrop::new(self);
        #[cfg(Py_3_12)]
        {
            // SAFETY: the guard's reference (or NULL), moved out of the
            // `ManuallyDrop`, which no longer releases it.
            std::ptr::NonNull::new(s.0).map(|p| unsafe { Owned::from_raw(p.as_ptr()) })
        }
        #[cfg(not(Py_3_12))]
        {
            let [mut t, mut v, mut tb] = s.0;
            // SAFETY: attached (the guard's contract); the three references
            // (or NULLs) are ours: normalising may replace them, then the
            // traceback moves onto the value and the type is released.
            unsafe {
                PyErr_NormalizeException(&raw mut t, &raw mut v, &raw mut tb);
                if !tb.is_null() {
                    if !v.is_null() {
                        PyException_SetTraceback(v, tb);
                    }
                    Py_DECREF(tb);
                }
                if !t.is_null() {
                    Py_DECREF(t);
                }
                std::ptr::NonNull::new(v).map(|p| Owned::from_raw(p.as_ptr()))
            }
        }
    }

    fn refs(&self) -> &[*mut PyObject] {
        #[cfg(Py_3_12)]
        {
            std::slice::from_ref(&self.0)
        }
        #[cfg(not(Py_3_12))]
        {
            &self.0
        }
    }
}

impl Drop for SavedErr {
    fn drop(&mut self) {
        for &p in self.refs() {
            if !p.is_null() {
                // SAFETY: a reference taken by `fetch`, released once,
                // attached (the guard's contract).
                unsafe { Py_DECREF(p) };
            }
        }
    }
}

// ---------------------------------------------------------------------------
// the panic → exception path

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Runs `f` on an attached thread. `Err` becomes the current Python
/// exception; a panic is caught (it must never unwind into CPython) and
/// becomes a `SystemError("caio internal error (Rust panic): ...")`. Either
/// way the result is `None` with an exception set. This is the crate's one
/// panic → exception conversion.
#[inline]
pub fn catch<T, F>(f: F) -> Option<T>
where
    F: FnOnce() -> PyResult<T>,
{
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            e.restore();
            None
        }
        Err(payload) => {
            PyErr::new(
                Exc::SystemError,
                format!(
                    "caio internal error (Rust panic): {}",
                    panic_message(&*payload)
                ),
            )
            .restore();
            None
        }
    }
}

/// [`catch`] for slots returning an object: NULL + exception on failure.
#[inline]
pub fn trampoline<F>(f: F) -> *mut PyObject
where
    F: FnOnce() -> PyResult<Owned>,
{
    catch(f).map_or(ptr::null_mut(), Owned::into_ptr)
}

/// [`catch`] for slots returning `int` (0 ok, -1 error).
#[inline]
pub fn trampoline_int<F>(f: F) -> c_int
where
    F: FnOnce() -> PyResult<()>,
{
    match catch(f) {
        Some(()) => 0,
        None => -1,
    }
}

/// [`catch`] for slots that cannot fail (dealloc, clear): a panic is
/// reported through `sys.unraisablehook` instead of unwinding into CPython.
#[inline]
pub fn trampoline_void<F>(f: F)
where
    F: FnOnce(),
{
    if catch(|| {
        f();
        Ok(())
    })
    .is_none()
    {
        // SAFETY: attached; `catch` just set the exception reported here.
        unsafe { PyErr_WriteUnraisable(ptr::null_mut()) };
    }
}

/// Reports the current exception through `sys.unraisablehook`
/// (`Exception ignored in: <obj>`) and clears it.
///
/// # Safety
/// Caller attached; `obj` NULL or a valid object.
pub unsafe fn write_unraisable(obj: *mut PyObject) {
    // SAFETY: attached and `obj` valid or NULL (caller's contract).
    unsafe {
        if !PyErr_Occurred().is_null() {
            PyErr_WriteUnraisable(obj);
        }
    }
}

/// Clears the current exception, if any (errors a caller decided to drop).
#[inline]
pub fn clear_error() {
    // SAFETY: attached (crate invariant); clearing is always allowed.
    unsafe { PyErr_Clear() };
}
