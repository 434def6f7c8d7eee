//! Typed object references: [`Owned`] (strong), [`Borrowed`] (valid for a
//! lifetime), [`Slot`] (a strong reference stored in a field of one of our
//! objects, readable without a lock), process-wide objects ([`Interned`],
//! [`LazyObject`]) and the constructors of the few values we build.

use std::ffi::CStr;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::OnceLock;

use pyo3_ffi::*;

use super::error::{PyErr, PyResult};

/// An owned (strong) reference to a Python object. Dropping it decrefs, so
/// it is only dropped attached (it is neither `Send` nor `Sync`).
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

    /// A new strong reference to `p`.
    ///
    /// # Safety
    /// `p` must be a valid object pointer; the caller must be attached.
    #[inline]
    pub unsafe fn from_borrowed(p: *mut PyObject) -> Owned {
        // SAFETY: `p` is a valid object and we are attached (caller's contract).
        unsafe { Py_INCREF(p) };
        // SAFETY: a valid object pointer is never NULL.
        Owned(unsafe { NonNull::new_unchecked(p) })
    }

    /// # Safety
    /// `p` must be a non-NULL strong reference whose ownership moves here.
    #[inline]
    pub unsafe fn from_raw(p: *mut PyObject) -> Owned {
        // SAFETY: non-NULL (caller's contract).
        Owned(unsafe { NonNull::new_unchecked(p) })
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

    /// As [`Owned::into_ptr`], typed non-NULL.
    #[inline]
    pub fn into_non_null(self) -> NonNull<PyObject> {
        let p = self.0;
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
        // SAFETY: `self` keeps the object alive; an `Owned` only exists on an
        // attached thread (it is not `Send`, and is created attached).
        unsafe { Owned::from_borrowed(self.as_ptr()) }
    }
}

impl Drop for Owned {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: we own one strong reference; dropped attached (see the
        // type's documentation).
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
        // SAFETY: non-NULL (caller's contract).
        Borrowed(unsafe { NonNull::new_unchecked(p) }, PhantomData)
    }

    /// `None` for NULL.
    ///
    /// # Safety
    /// `p` must be NULL or a valid object pointer for `'a`.
    #[inline]
    pub unsafe fn from_ptr_opt(p: *mut PyObject) -> Option<Borrowed<'a>> {
        NonNull::new(p).map(|p| Borrowed(p, PhantomData))
    }

    #[inline]
    pub fn as_ptr(self) -> *mut PyObject {
        self.0.as_ptr()
    }

    /// A new strong reference.
    #[inline]
    pub fn to_owned(self) -> Owned {
        // SAFETY: valid for 'a; attached (crate invariant, see `py`).
        unsafe { Owned::from_borrowed(self.as_ptr()) }
    }

    /// `repr(obj)` as a Rust string (best effort; never fails).
    pub fn repr(self) -> String {
        // SAFETY: a valid object; attached (crate invariant).
        let r = unsafe { Owned::from_new(PyObject_Repr(self.as_ptr())) };
        match r {
            Ok(r) => str_of(r.borrow()),
            Err(_) => {
                // SAFETY: attached; drops the repr() failure.
                unsafe { PyErr_Clear() };
                None
            }
        }
        .unwrap_or_else(|| "<unrepresentable object>".to_owned())
    }

    /// Name of the object's type (`type(obj).__name__`-like, from `tp_name`).
    pub fn type_name(self) -> String {
        // SAFETY: a valid object has a valid type whose `tp_name` is a
        // NUL-terminated string living as long as the type.
        unsafe {
            let tp = Py_TYPE(self.as_ptr());
            CStr::from_ptr((*tp).tp_name).to_string_lossy().into_owned()
        }
    }

    /// Whether this is the `True` singleton.
    #[inline]
    pub fn is_true_singleton(self) -> bool {
        // SAFETY: `Py_True` only reads the address of a static object.
        self.as_ptr() == unsafe { Py_True() }
    }

    /// Whether this is `None`.
    #[inline]
    pub fn is_none(self) -> bool {
        // SAFETY: `Py_None` only reads the address of a static object.
        self.as_ptr() == unsafe { Py_None() }
    }
}

/// UTF-8 contents of a `str` object, `None` (error cleared) if not a str.
pub fn str_of(o: Borrowed<'_>) -> Option<String> {
    let mut size: Py_ssize_t = 0;
    // SAFETY: a valid object; attached (crate invariant). The result points
    // into `o`'s UTF-8 cache, valid while `o` lives (the whole function).
    let p = unsafe { PyUnicode_AsUTF8AndSize(o.as_ptr(), &raw mut size) };
    if p.is_null() {
        // SAFETY: attached; the failure of a non-str is expected.
        unsafe { PyErr_Clear() };
        return None;
    }
    // SAFETY: CPython returned `size` bytes of UTF-8 at `p` (non-NULL).
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), usize_of(size)) };
    Some(String::from_utf8_lossy(bytes).into_owned())
}

/// A Rust length as a `Py_ssize_t`. Rust objects never exceed `isize::MAX`
/// bytes, so lengths of Rust collections always fit; anything else is
/// clamped rather than wrapped.
#[inline]
pub fn ssize(n: usize) -> Py_ssize_t {
    Py_ssize_t::try_from(n).unwrap_or(Py_ssize_t::MAX)
}

/// A size reported by CPython (never negative) as a `usize`; a negative
/// value (a failed call the caller did not check) becomes 0.
#[inline]
pub fn usize_of(n: Py_ssize_t) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// `None`, as an owned reference.
#[inline]
pub fn none() -> Owned {
    // SAFETY: `None` is a valid (immortal) object; attached (crate invariant).
    unsafe { Owned::from_borrowed(Py_None()) }
}

#[inline]
pub fn py_bool(v: bool) -> Owned {
    // SAFETY: `True`/`False` are valid static objects; attached.
    unsafe { Owned::from_borrowed(if v { Py_True() } else { Py_False() }) }
}

#[inline]
pub fn py_int(v: i64) -> PyResult<Owned> {
    // SAFETY: attached (crate invariant); returns a new reference or NULL.
    unsafe { Owned::from_new(PyLong_FromLongLong(v)) }
}

#[inline]
pub fn py_uint(v: u64) -> PyResult<Owned> {
    // SAFETY: attached (crate invariant); returns a new reference or NULL.
    unsafe { Owned::from_new(PyLong_FromUnsignedLongLong(v)) }
}

/// A count (e.g. of delivered completions) as a Python `int`.
#[inline]
pub fn py_usize(v: usize) -> PyResult<Owned> {
    py_uint(u64::try_from(v).unwrap_or(u64::MAX))
}

pub fn py_str(s: &str) -> PyResult<Owned> {
    // SAFETY: attached; `s` is `s.len()` bytes of valid UTF-8.
    unsafe {
        Owned::from_new(PyUnicode_FromStringAndSize(
            s.as_ptr().cast(),
            ssize(s.len()),
        ))
    }
}

/// Builds a tuple, stealing the given references.
pub fn py_tuple(items: Vec<Owned>) -> PyResult<Owned> {
    // SAFETY: attached (crate invariant).
    let t = unsafe { Owned::from_new(PyTuple_New(ssize(items.len())))? };
    for (i, item) in items.into_iter().enumerate() {
        // SAFETY: `t` is a fresh tuple of `items.len()` empty slots and `i`
        // is in range; SET_ITEM steals the reference `into_ptr` gives up.
        unsafe { PyTuple_SET_ITEM(t.as_ptr(), ssize(i), item.into_ptr()) };
    }
    Ok(t)
}

// ---------------------------------------------------------------------------
// object slots

/// A strong reference kept in a field of one of our objects (e.g. the
/// asyncio adapter's loop and context). Empty is NULL, so a zeroed
/// allocation (`tp_alloc`) starts with every slot empty.
///
/// Reads are one atomic load: no lock, no refcount traffic, so hot paths
/// can use the referenced object through [`Slot::get`]. That is sound
/// because the slot is only *written* while no reader can exist: while its
/// object is being set up (before the setup is published to other threads)
/// and while it is torn down (`tp_clear` of an unreachable object, or
/// `tp_dealloc`) — the contract of the `unsafe` writers. A slot that is
/// never read outside garbage collection may be replaced at any time
/// ([`Slot::swap_unread`]).
#[repr(transparent)]
pub struct Slot(AtomicPtr<PyObject>);

impl Slot {
    pub const fn empty() -> Slot {
        Slot(AtomicPtr::new(ptr::null_mut()))
    }

    /// The referenced object, borrowed from the slot.
    #[inline]
    pub fn get(&self) -> Option<Borrowed<'_>> {
        let p = self.0.load(Ordering::Acquire);
        // SAFETY: a non-NULL slot holds a strong reference that is only
        // released by `take`/`set`, whose contract excludes concurrent
        // readers: it outlives the borrow of `self`.
        (!p.is_null()).then(|| unsafe { Borrowed::from_ptr(p) })
    }

    /// The raw pointer (NULL when empty), borrowed.
    #[inline]
    pub fn as_ptr(&self) -> *mut PyObject {
        self.0.load(Ordering::Acquire)
    }

    /// Stores `v` (a reference is taken), dropping the previous value.
    ///
    /// # Safety
    /// Attached; no other thread may be using a reference obtained through
    /// [`Slot::get`] (the object is being initialised and not yet visible
    /// to other threads, or is being torn down).
    #[inline]
    pub unsafe fn set(&self, v: Option<Borrowed<'_>>) {
        let new = v.map_or(ptr::null_mut(), |b| b.to_owned().into_ptr());
        // SAFETY: forwarded contract.
        drop(unsafe { self.swap(new) });
    }

    /// Empties the slot, handing back its reference.
    ///
    /// # Safety
    /// As for [`Slot::set`].
    #[inline]
    pub unsafe fn take(&self) -> Option<Owned> {
        // SAFETY: forwarded contract.
        unsafe { self.swap(ptr::null_mut()) }
    }

    /// Stores `v` in a slot that is never read through [`Slot::get`] (only
    /// visited by the garbage collector), at any time.
    ///
    /// # Safety
    /// Attached, and the slot is never read outside `tp_traverse`.
    pub unsafe fn swap_unread(&self, v: Owned) {
        // SAFETY: nobody borrows from this slot, so releasing the previous
        // value cannot invalidate a reader; the swap itself is atomic.
        drop(unsafe { self.swap(v.into_ptr()) });
    }

    /// # Safety
    /// `new` is NULL or a strong reference whose ownership moves here; the
    /// contract of [`Slot::set`] holds.
    unsafe fn swap(&self, new: *mut PyObject) -> Option<Owned> {
        let old = self.0.swap(new, Ordering::AcqRel);
        // SAFETY: a non-NULL old value is the strong reference the slot held.
        (!old.is_null()).then(|| unsafe { Owned::from_raw(old) })
    }

    /// `Py_VISIT` for `tp_traverse`.
    ///
    /// # Safety
    /// Called from `tp_traverse` with its `visit`/`arg`.
    #[inline]
    pub unsafe fn visit(&self, visit: visitproc, arg: *mut std::ffi::c_void) -> std::ffi::c_int {
        match self.get() {
            // SAFETY: a live object, visited with the collector's callback.
            Some(o) => unsafe { visit(o.as_ptr(), arg) },
            None => 0,
        }
    }
}

/// `Py_VISIT(p)` for an optional owned field (`tp_traverse`).
///
/// # Safety
/// Called from `tp_traverse` with its `visit`/`arg`.
#[inline]
pub unsafe fn visit_opt(
    o: &Option<Owned>,
    visit: visitproc,
    arg: *mut std::ffi::c_void,
) -> std::ffi::c_int {
    match o {
        // SAFETY: a live object, visited with the collector's callback.
        Some(o) => unsafe { visit(o.as_ptr(), arg) },
        None => 0,
    }
}

// ---------------------------------------------------------------------------
// process-wide objects

/// A reference deliberately kept for the life of the process (never
/// released), so its pointer may be shared between threads.
#[derive(Clone, Copy)]
struct Leaked(NonNull<PyObject>);

// SAFETY: the object is kept alive forever (its reference is leaked) and is
// only used as a Python object by attached threads.
unsafe impl Send for Leaked {}
// SAFETY: as above; sharing the pointer itself is harmless.
unsafe impl Sync for Leaked {}

/// The object in `cell`, made by `make` on first use. When two threads race,
/// one result is kept and the other released.
fn get_or_make(
    cell: &OnceLock<Leaked>,
    make: impl FnOnce() -> PyResult<Owned>,
) -> PyResult<Borrowed<'static>> {
    let leaked = match cell.get() {
        Some(l) => *l,
        None => {
            let made = make()?;
            // Leaking the reference keeps the object alive (and at this
            // address) for the rest of the process.
            *cell.get_or_init(|| Leaked(made.into_non_null()))
        }
    };
    // SAFETY: the kept reference is never released: valid for 'static.
    Ok(unsafe { Borrowed::from_ptr(leaked.0.as_ptr()) })
}

/// An interned Python string kept for the life of the process (for method
/// and attribute names used on hot paths).
pub struct Interned(OnceLock<Leaked>, &'static CStr);

impl Interned {
    pub const fn new(s: &'static CStr) -> Self {
        Interned(OnceLock::new(), s)
    }

    pub fn get(&self) -> PyResult<Borrowed<'static>> {
        get_or_make(&self.0, || {
            // SAFETY: attached (crate invariant); a static NUL-terminated name.
            unsafe { Owned::from_new(PyUnicode_InternFromString(self.1.as_ptr())) }
        })
    }
}

/// Any other object built once and kept for the life of the process (e.g.
/// the `("loop",)` keyword-name tuple of `Future(loop=...)`).
pub struct LazyObject(OnceLock<Leaked>, fn() -> PyResult<Owned>);

impl LazyObject {
    pub const fn new(make: fn() -> PyResult<Owned>) -> Self {
        LazyObject(OnceLock::new(), make)
    }

    pub fn get(&self) -> PyResult<Borrowed<'static>> {
        get_or_make(&self.0, self.1)
    }
}
