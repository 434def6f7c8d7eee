//! The CPython plumbing every other module builds on.
//!
//! * [`object`]: typed references ([`Owned`], [`Borrowed`], [`Slot`]),
//!   process-wide objects and the constructors of the values we build;
//! * [`error`]: [`PyErr`]/[`PyResult`], [`SavedErr`] and the one panic →
//!   exception path ([`catch`] and the `trampoline*` shapes every
//!   `extern "C"` entry point goes through);
//! * [`call`]: calls into Python, future resolution, builtin functions from
//!   static definitions, thread-state helpers;
//! * [`typespec`]: the builder every heap type of core is made with.
//!
//! # Attachment
//! Touching a Python object (refcounts included) needs a thread attached to
//! the interpreter (holding the GIL; an attached thread state on
//! free-threaded builds). Core's native code is entered only through CPython
//! slots and methods, which run attached, or on worker threads, which attach
//! explicitly before touching an object. The *safe* helpers of this module
//! (`none()`, `py_int()`, `Owned::drop`, ...) rely on that crate-wide
//! invariant: they are only called attached. `Owned` is neither `Send` nor
//! `Sync`, so a reference cannot wander off to a worker thread by accident.

pub mod call;
pub mod error;
pub mod object;
pub mod typespec;

pub use call::{
    allow_threads, call0, call1, call_method, is_attached, is_finalizing, set_result_unless_done,
    MethodDef,
};
pub use error::{
    catch, clear_error, trampoline, trampoline_int, trampoline_void, write_unraisable, Exc, PyErr,
    PyResult, SavedErr,
};
pub use object::{
    none, py_bool, py_int, py_str, py_tuple, py_uint, py_usize, ssize, str_of, usize_of, visit_opt,
    Borrowed, Interned, LazyObject, Owned, Slot,
};
pub use typespec::{Spec, SpecCache, TypeSpec};
