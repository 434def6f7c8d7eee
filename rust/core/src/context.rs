//! The Python object every backend's `Context` is: the object header, a
//! weak-reference list and the backend's engine state `T`
//! ([`ContextObject`]); its type spec, allocation and deallocation; and the
//! argument check every `submit()` starts with.
//!
//! A backend defines its state type (implementing [`ContextState`]), its
//! `__new__` (parse the arguments, build the state, [`ContextObject::create`]),
//! `__repr__` and methods, and hands [`ContextObject::spec`] plus its
//! methods and properties to [`crate::module::init_common`].

use std::ffi::CStr;
use std::ptr;

use pyo3_ffi::*;

use crate::module::ModState;
use crate::py::{trampoline_void, Borrowed, Owned, PyResult, TypeSpec};

/// The spec name: "builtins." gives `__module__ == "builtins"` like
/// upstream's static type, without the 3.12+ warning for undotted heap-type
/// names. Static because 3.10/3.11 keep pointing `tp_name` into it; the
/// module points `tp_name` past the prefix once the type exists.
pub(crate) const SPEC_NAME: &CStr = c"builtins.Context";

/// What deallocation does with a backend's state.
pub trait ContextState: Sized {
    /// Runs when the Context is deallocated, before the state is dropped:
    /// release what dropping alone would not (kernel objects, worker
    /// threads). Nothing is in flight (every in-flight op holds a reference
    /// to its Context).
    ///
    /// # Safety
    /// Attached.
    unsafe fn release(&self) {}

    /// Gives back a state that never became a Python object (its allocation
    /// failed). Dropping it is the default.
    fn abandon(self) {}
}

/// A backend's Context object. `#[repr(C)]`: the header first, as CPython
/// lays objects out.
#[repr(C)]
pub struct ContextObject<T> {
    ob_base: PyObject,
    weakreflist: *mut PyObject,
    state: T,
}

impl<T: ContextState> ContextObject<T> {
    /// What every backend's Context type starts from: a plain (non-GC)
    /// object holding a `T`, with a weak-reference list, `__new__`, this
    /// module's deallocation, `repr`, and `doc` (with the
    /// `Context(sig)\n--\n\n` text signature). The backend adds its methods
    /// and properties with [`TypeSpec::method`] and [`TypeSpec::getter`].
    pub fn spec(doc: &'static CStr, new: newfunc, repr: reprfunc) -> TypeSpec {
        TypeSpec::new(
            SPEC_NAME,
            std::mem::size_of::<ContextObject<T>>(),
            Py_TPFLAGS_DEFAULT,
        )
        .doc(doc)
        .new_fn(new)
        .dealloc(Self::dealloc)
        .repr(repr)
        .weaklist_offset(std::mem::offset_of!(ContextObject<T>, weakreflist))
    }

    /// The state of Context `p`.
    ///
    /// # Safety
    /// `p` is a live instance of a Context type made from `Self::spec` that
    /// outlives `'a` and whose `__new__` finished ([`Self::create`]): CPython
    /// passes one as `self` to the type's methods and slots, and
    /// `crate::aio` checks an adapter's context against the type in
    /// `_bind`.
    #[inline]
    pub unsafe fn state<'a>(p: *mut PyObject) -> &'a T {
        // SAFETY: `p` points to a `ContextObject<T>` whose state is
        // initialised (caller's contract).
        unsafe { &(*p.cast::<ContextObject<T>>()).state }
    }

    /// `__new__`'s allocation: a new instance of `tp` holding `state` (given
    /// back with [`ContextState::abandon`] if the allocation fails).
    ///
    /// # Safety
    /// Attached; `tp` is a live type made from `Self::spec` (or a subclass
    /// of one: none exist, the types are final).
    pub unsafe fn create(tp: *mut PyTypeObject, state: T) -> PyResult<Owned> {
        // SAFETY: attached; `tp` is a live type whose `tp_basicsize` is
        // `size_of::<ContextObject<T>>()`: its allocator returns a zeroed
        // object of that size (or NULL with an exception set).
        let obj = unsafe {
            let alloc = (*tp).tp_alloc.unwrap_or(PyType_GenericAlloc);
            Owned::from_new(alloc(tp, 0))
        };
        match obj {
            Ok(obj) => {
                // SAFETY: a fresh, zeroed allocation of the right size: the
                // state is written in place (nothing to drop), before the
                // object is handed out.
                unsafe {
                    ptr::addr_of_mut!((*obj.as_ptr().cast::<ContextObject<T>>()).state)
                        .write(state);
                }
                Ok(obj)
            }
            Err(e) => {
                state.abandon();
                Err(e)
            }
        }
    }

    /// `tp_dealloc`: clears weak references, lets the state release what it
    /// holds, drops it, frees the object and drops the reference every
    /// heap-type instance holds on its type.
    ///
    /// # Safety
    /// Called by CPython, attached, when the last reference to `slf` (made
    /// by [`Self::create`]) is gone.
    unsafe extern "C" fn dealloc(slf: *mut PyObject) {
        trampoline_void(|| {
            let obj = slf.cast::<ContextObject<T>>();
            // SAFETY: `slf` is a live Context until `tp_free` below
            // (contract above); attached for the weakref callbacks and
            // `release`. Then the state is dropped exactly once, the memory
            // goes back to the type's allocator and the heap type loses the
            // reference its instance held; `obj` is not used afterwards.
            unsafe {
                if !(*obj).weakreflist.is_null() {
                    PyObject_ClearWeakRefs(slf);
                }
                (*obj).state.release();
                ptr::drop_in_place(ptr::addr_of_mut!((*obj).state));
                let tp = Py_TYPE(slf);
                if let Some(free) = (*tp).tp_free {
                    free(slf.cast());
                }
                Py_DECREF(tp.cast());
            }
        });
    }
}

/// The first of `args` that is not an Operation of `slf`'s module, with its
/// index (for the backend's `TypeError`): `submit()` checks every argument
/// before it claims any.
///
/// # Safety
/// Attached; `slf` is an instance of one of the module's types; `args` are
/// live objects for `'a`.
pub unsafe fn first_non_op<'a>(
    slf: *mut PyObject,
    args: &[*mut PyObject],
) -> Option<(usize, Borrowed<'a>)> {
    // SAFETY: `slf` is an instance of our module's type, so its module
    // state is ours and holds the Operation type (caller's contract).
    let op_type = unsafe { (*ModState::of(slf)).op_type };
    args.iter().enumerate().find_map(|(i, &a)| {
        // SAFETY: a live object (caller's contract).
        (!unsafe { crate::op::is_op(a, op_type) }).then(|| (i, unsafe { Borrowed::from_ptr(a) }))
    })
}
