//! Small typed wrappers over CPython object pointers, the error type used by
//! every native function, and the one place that turns a `PyResult` into the
//! CPython convention ("NULL/-1 with an exception set").
//!
//! Rules kept throughout the crate:
//! * `Owned` is a strong reference; dropping it decrefs, so it may only be
//!   dropped by a thread attached to the interpreter (GIL held).
//! * Every `extern "C"` entry point goes through [`trampoline`] (or one of its
//!   siblings), which catches panics so that none crosses into CPython.

use std::borrow::Cow;
use std::ffi::{c_int, CStr, CString};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};

use pyo3_ffi::*;

/// An owned (strong) reference to a Python object.
pub struct Owned(NonNull<PyObject>);

impl Owned {
    /// Takes ownership of a new reference returned by the C API; NULL means an
    /// exception is already set.
    ///
    /// # Safety
    /// `p` must be NULL or a new strong reference, and the caller attached.
    #[inline]
    pub unsafe fn from_new(p: *mut PyObject) -> PyResult<Owned> {
        NonNull::new(p).map(Owned).ok_or(PyErr::Fetched)
    }

    /// # Safety
    /// `p` must be a valid object pointer; the caller must be attached.
    #[inline]
    pub unsafe fn from_borrowed(p: *mut PyObject) -> Owned {
        Py_INCREF(p);
        Owned(NonNull::new_unchecked(p))
    }

    /// # Safety
    /// `p` must be a non-NULL strong reference whose ownership moves here.
    #[inline]
    pub unsafe fn from_raw(p: *mut PyObject) -> Owned {
        Owned(NonNull::new_unchecked(p))
    }

    #[inline]
    pub fn as_ptr(&self) -> *mut PyObject {
        self.0.as_ptr()
    }

    /// Gives up ownership without decref'ing (the caller now owns the reference).
    #[inline]
    pub fn into_ptr(self) -> *mut PyObject {
        let p = self.0.as_ptr();
        std::mem::forget(self);
        p
    }

    #[inline]
    pub fn borrow(&self) -> Borrowed<'_> {
        Borrowed(self.0, PhantomData)
    }
}

impl Clone for Owned {
    fn clone(&self) -> Self {
        unsafe { Owned::from_borrowed(self.as_ptr()) }
    }
}

impl Drop for Owned {
    #[inline]
    fn drop(&mut self) {
        unsafe { Py_DECREF(self.0.as_ptr()) }
    }
}

/// A borrowed reference, valid for `'a`.
#[derive(Clone, Copy)]
pub struct Borrowed<'a>(NonNull<PyObject>, PhantomData<&'a PyObject>);

impl<'a> Borrowed<'a> {
    /// # Safety
    /// `p` must be a valid, non-NULL object pointer for `'a`.
    #[inline]
    pub unsafe fn from_ptr(p: *mut PyObject) -> Borrowed<'a> {
        Borrowed(NonNull::new_unchecked(p), PhantomData)
    }

    #[inline]
    pub fn as_ptr(self) -> *mut PyObject {
        self.0.as_ptr()
    }

    #[inline]
    pub fn to_owned(self) -> Owned {
        unsafe { Owned::from_borrowed(self.as_ptr()) }
    }

    /// `repr(obj)` as a Rust string (best effort; never fails).
    pub fn repr(self) -> String {
        unsafe {
            let r = PyObject_Repr(self.as_ptr());
            if r.is_null() {
                PyErr_Clear();
                return "<unrepresentable object>".to_owned();
            }
            let r = Owned::from_raw(r);
            str_of(r.borrow()).unwrap_or_else(|| "<unrepresentable object>".to_owned())
        }
    }

    /// Name of the object's type (`type(obj).__name__`-like, from `tp_name`).
    pub fn type_name(self) -> String {
        unsafe {
            let tp = Py_TYPE(self.as_ptr());
            CStr::from_ptr((*tp).tp_name).to_string_lossy().into_owned()
        }
    }
}

/// UTF-8 contents of a `str` object, `None` (error cleared) if not a str.
pub fn str_of(o: Borrowed<'_>) -> Option<String> {
    unsafe {
        let mut size: Py_ssize_t = 0;
        let p = PyUnicode_AsUTF8AndSize(o.as_ptr(), &mut size);
        if p.is_null() {
            PyErr_Clear();
            return None;
        }
        let bytes = std::slice::from_raw_parts(p.cast::<u8>(), size as usize);
        Some(String::from_utf8_lossy(bytes).into_owned())
    }
}

/// `None`, as an owned reference.
#[inline]
pub fn none() -> Owned {
    unsafe { Owned::from_borrowed(Py_None()) }
}

#[inline]
pub fn py_bool(v: bool) -> Owned {
    unsafe { Owned::from_borrowed(if v { Py_True() } else { Py_False() }) }
}

#[inline]
pub fn py_int(v: i64) -> PyResult<Owned> {
    unsafe { Owned::from_new(PyLong_FromLongLong(v)) }
}

#[inline]
pub fn py_uint(v: u64) -> PyResult<Owned> {
    unsafe { Owned::from_new(PyLong_FromUnsignedLongLong(v)) }
}

pub fn py_str(s: &str) -> PyResult<Owned> {
    unsafe {
        Owned::from_new(PyUnicode_FromStringAndSize(
            s.as_ptr().cast(),
            s.len() as Py_ssize_t,
        ))
    }
}

/// Builds a tuple, stealing the given references.
pub fn py_tuple(items: Vec<Owned>) -> PyResult<Owned> {
    unsafe {
        let t = Owned::from_new(PyTuple_New(items.len() as Py_ssize_t))?;
        for (i, item) in items.into_iter().enumerate() {
            PyTuple_SET_ITEM(t.as_ptr(), i as Py_ssize_t, item.into_ptr());
        }
        Ok(t)
    }
}

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
    /// A class object owned elsewhere (a module-state exception type).
    Custom(*mut PyObject),
}

impl Exc {
    fn as_ptr(self) -> *mut PyObject {
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
        PyErr::Errno(Exc::Custom(unsafe { PyExc_OSError }), errno)
    }
    /// The error of the last failed libc call.
    pub fn last_os() -> PyErr {
        PyErr::os(crate::sys::last_errno())
    }

    /// Sets this error as the current Python exception.
    pub fn restore(self) {
        unsafe {
            match self {
                PyErr::Fetched => {
                    if PyErr_Occurred().is_null() {
                        PyErr_SetString(
                            PyExc_SystemError,
                            c"caio: error return without exception set".as_ptr(),
                        );
                    }
                }
                PyErr::Msg(exc, msg) => {
                    let c = cstring(&msg);
                    PyErr_SetString(exc.as_ptr(), c.as_ptr());
                }
                PyErr::Errno(exc, errno) => {
                    set_errno_exc(exc.as_ptr(), errno, &crate::sys::strerror(errno))
                }
                PyErr::ErrnoMsg(exc, errno, msg) => set_errno_exc(exc.as_ptr(), errno, &msg),
            }
        }
    }
}

unsafe fn set_errno_exc(exc: *mut PyObject, errno: i32, msg: &str) {
    let args = (|| -> PyResult<Owned> { py_tuple(vec![py_int(errno as i64)?, py_str(msg)?]) })();
    let Ok(args) = args else { return };
    let value = PyObject_Call(exc, args.as_ptr(), ptr::null_mut());
    if value.is_null() {
        return;
    }
    let value = Owned::from_raw(value);
    PyErr_SetObject(Py_TYPE(value.as_ptr()).cast(), value.as_ptr());
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "\\0")).unwrap_or_default()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

fn raise_panic(payload: Box<dyn std::any::Any + Send>) {
    PyErr::new(
        Exc::SystemError,
        format!(
            "caio internal error (Rust panic): {}",
            panic_message(&*payload)
        ),
    )
    .restore();
}

/// Runs `f`, converting `Err` and panics into "NULL + exception".
#[inline]
pub fn trampoline<F>(f: F) -> *mut PyObject
where
    F: FnOnce() -> PyResult<Owned>,
{
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(obj)) => obj.into_ptr(),
        Ok(Err(e)) => {
            e.restore();
            ptr::null_mut()
        }
        Err(payload) => {
            raise_panic(payload);
            ptr::null_mut()
        }
    }
}

/// Like [`trampoline`] for slots returning `int` (0 ok, -1 error).
#[inline]
pub fn trampoline_int<F>(f: F) -> c_int
where
    F: FnOnce() -> PyResult<()>,
{
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            e.restore();
            -1
        }
        Err(payload) => {
            raise_panic(payload);
            -1
        }
    }
}

/// For slots that cannot fail (dealloc, clear): a panic is reported through
/// `sys.unraisablehook` instead of unwinding into CPython.
#[inline]
pub fn trampoline_void<F>(f: F)
where
    F: FnOnce(),
{
    if let Err(payload) = catch_unwind(AssertUnwindSafe(f)) {
        raise_panic(payload);
        unsafe { PyErr_WriteUnraisable(ptr::null_mut()) };
    }
}

/// Reports the current exception through `sys.unraisablehook`
/// ("Exception ignored in: <obj>") and clears it.
///
/// # Safety
/// Caller attached; `obj` NULL or a valid object.
pub unsafe fn write_unraisable(obj: *mut PyObject) {
    if !PyErr_Occurred().is_null() {
        PyErr_WriteUnraisable(obj);
    }
}

/// Calls `callable(arg)`.
#[inline]
pub fn call1(callable: Borrowed<'_>, arg: Borrowed<'_>) -> PyResult<Owned> {
    unsafe {
        let args = [arg.as_ptr()];
        Owned::from_new(PyObject_Vectorcall(
            callable.as_ptr(),
            args.as_ptr(),
            1,
            ptr::null_mut(),
        ))
    }
}

/// Calls `obj.<name>(*args)`; `name` should be an interned string.
#[inline]
pub fn call_method(
    obj: Borrowed<'_>,
    name: Borrowed<'_>,
    args: &[*mut PyObject],
) -> PyResult<Owned> {
    unsafe {
        let mut v: Vec<*mut PyObject> = Vec::with_capacity(args.len() + 1);
        v.push(obj.as_ptr());
        v.extend_from_slice(args);
        Owned::from_new(PyObject_VectorcallMethod(
            name.as_ptr(),
            v.as_ptr(),
            v.len() | PY_VECTORCALL_ARGUMENTS_OFFSET_USIZE,
            ptr::null_mut(),
        ))
    }
}

const PY_VECTORCALL_ARGUMENTS_OFFSET_USIZE: usize = 1usize << (usize::BITS - 1);

/// Runs `f` with the thread detached from the interpreter (GIL released).
/// `f` must not touch any Python object.
pub fn allow_threads<R, F: FnOnce() -> R>(f: F) -> R {
    unsafe {
        let ts = PyEval_SaveThread();
        let r = catch_unwind(AssertUnwindSafe(f));
        PyEval_RestoreThread(ts);
        match r {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

/// An interned Python string kept for the life of the process (for method
/// names called on hot paths). Immortal-ish: never released.
pub struct Interned(std::sync::OnceLock<usize>, &'static CStr);

impl Interned {
    pub const fn new(s: &'static CStr) -> Self {
        Interned(std::sync::OnceLock::new(), s)
    }
    pub fn get(&self) -> PyResult<Borrowed<'static>> {
        if let Some(&p) = self.0.get() {
            return Ok(unsafe { Borrowed::from_ptr(p as *mut PyObject) });
        }
        let p = unsafe { PyUnicode_InternFromString(self.1.as_ptr()) };
        if p.is_null() {
            return Err(PyErr::Fetched);
        }
        // A racing thread may have won: keep one, leak the other reference.
        let kept = *self.0.get_or_init(|| p as usize);
        Ok(unsafe { Borrowed::from_ptr(kept as *mut PyObject) })
    }
}
