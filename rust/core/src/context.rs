//! The Python object every backend's `Context` is: the object header, a
//! weak-reference list and the backend's engine state `T`
//! ([`ContextObject`]); its type spec, allocation and deallocation; and the
//! argument check every `submit()` starts with.
//!
//! A backend defines its state type, implementing [`ContextState`]
//! (`__new__`'s arguments → state, `repr`, what deallocation releases), and
//! its methods and properties as plain functions of `self`, made into
//! CPython methods by [`method!`](crate::method) and
//! [`getter!`](crate::getter); it hands [`ContextObject::spec`] with them to
//! [`crate::module::init_common`]. The CPython calling conventions — the
//! `extern "C"` entry points, the one panic → exception path, argument
//! unpacking — are all here.

use std::ffi::CStr;
use std::ptr;

use pyo3_ffi::*;

use crate::fork::Stamp;
use crate::module::ModState;
use crate::py::{trampoline_void, Borrowed, Owned, PyErr, PyResult, TypeSpec};

/// The spec name: "builtins." gives `__module__ == "builtins"` like
/// upstream's static type, without the 3.12+ warning for undotted heap-type
/// names. Static because 3.10/3.11 keep pointing `tp_name` into it; the
/// module points `tp_name` past the prefix once the type exists.
pub(crate) const SPEC_NAME: &CStr = c"builtins.Context";

/// A backend's Context state: how it is made, shown and released.
pub trait ContextState: Sized {
    /// `Context(...)`: the state for these constructor arguments.
    ///
    /// # Safety
    /// Attached; `args` is a tuple, `kwargs` NULL or a dict (what CPython
    /// passes to `tp_new`).
    unsafe fn new(args: *mut PyObject, kwargs: *mut PyObject) -> PyResult<Self>;

    /// `repr(context)`; `slf` is the Context object (for its address).
    fn repr(&self, slf: *mut PyObject) -> PyResult<String>;

    /// What a forked child is told when it uses the Context (its kernel
    /// objects and worker threads are the parent's): a `RuntimeError`.
    const FORKED: &'static str;

    /// The fork generation the state was created in ([`Stamp::now`]).
    fn born(&self) -> Stamp;

    /// `RuntimeError(FORKED)` in a forked child.
    fn check_fork(&self) -> PyResult<()> {
        self.born().check(Self::FORKED)
    }

    /// `submit()`'s `TypeError` message for its argument `i`, which is not an
    /// Operation of the module (each backend keeps its upstream wording).
    fn not_an_operation(i: usize, arg: Borrowed<'_>) -> String;

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
    /// object holding a `T`, with a weak-reference list, `__new__`,
    /// deallocation and `repr` from [`ContextState`], and `doc` (with the
    /// `Context(sig)\n--\n\n` text signature). The backend adds its methods
    /// and properties with [`TypeSpec::method`] and [`TypeSpec::getter`].
    pub fn spec(doc: &'static CStr) -> TypeSpec {
        TypeSpec::new(
            SPEC_NAME,
            std::mem::size_of::<ContextObject<T>>(),
            Py_TPFLAGS_DEFAULT,
        )
        .doc(doc)
        .new_fn(Self::tp_new)
        .dealloc(Self::dealloc)
        .repr(Self::tp_repr)
        .weaklist_offset(std::mem::offset_of!(ContextObject<T>, weakreflist))
    }

    /// `tp_new`.
    ///
    /// # Safety
    /// Called by CPython, attached: `tp` is the Context type, `args` a
    /// tuple, `kwargs` NULL or a dict.
    unsafe extern "C" fn tp_new(
        tp: *mut PyTypeObject,
        args: *mut PyObject,
        kwargs: *mut PyObject,
    ) -> *mut PyObject {
        crate::py::trampoline(|| {
            // SAFETY: the arguments as CPython passes them (contract above).
            let state = unsafe { T::new(args, kwargs) }?;
            // SAFETY: attached; `tp` is the Context type.
            unsafe { Self::create(tp, state) }
        })
    }

    /// `tp_repr`.
    ///
    /// # Safety
    /// Called by CPython, attached, with `slf` a Context.
    unsafe extern "C" fn tp_repr(slf: *mut PyObject) -> *mut PyObject {
        // SAFETY: `slf` is a Context (contract above).
        crate::py::trampoline(|| crate::py::py_str(&unsafe { Self::state(slf) }.repr(slf)?))
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

    /// `submit()`'s first step: the state of `slf`, once every argument is
    /// known to be an Operation of the module ([`check_ops`], before any is
    /// claimed) and the process to be the one the Context was created in.
    ///
    /// # Safety
    /// As for [`Self::state`]; attached; `args` are live objects.
    pub unsafe fn submitting<'a>(slf: *mut PyObject, args: &[*mut PyObject]) -> PyResult<&'a T> {
        // SAFETY: forwarded contract.
        unsafe { check_ops(slf, args, T::not_an_operation) }?;
        // SAFETY: forwarded contract.
        let c = unsafe { Self::state(slf) };
        c.check_fork()?;
        Ok(c)
    }

    /// `__new__`'s allocation: a new instance of `tp` holding `state` (given
    /// back with [`ContextState::abandon`] if the allocation fails).
    ///
    /// # Safety
    /// Attached; `tp` is a live type made from `Self::spec` (or a subclass
    /// of one: none exist, the types are final).
    unsafe fn create(tp: *mut PyTypeObject, state: T) -> PyResult<Owned> {
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

/// `submit()`'s first step: every argument must be an Operation of `slf`'s
/// module, checked before any is claimed. The `TypeError` for the first that
/// is not says what `message(index, argument)` says (each backend keeps its
/// upstream wording).
///
/// # Safety
/// Attached; `slf` is an instance of one of the module's types; `args` are
/// live objects.
pub unsafe fn check_ops(
    slf: *mut PyObject,
    args: &[*mut PyObject],
    message: impl FnOnce(usize, Borrowed<'_>) -> String,
) -> PyResult<()> {
    // SAFETY: `slf` is an instance of our module's type, so its module
    // state is ours and holds the Operation type (caller's contract).
    let op_type = unsafe { (*ModState::of(slf)).op_type };
    let is_op = |a: *mut PyObject| {
        // SAFETY: a live object (caller's contract).
        unsafe { crate::op::is_op(a, op_type) }
    };
    match args.iter().position(|&a| !is_op(a)) {
        None => Ok(()),
        Some(i) => {
            // SAFETY: as above.
            let arg = unsafe { Borrowed::from_ptr(args[i]) };
            Err(PyErr::type_error(message(i, arg)))
        }
    }
}

/// A Context method's `PyMethodDef`, from a plain `unsafe fn` of its
/// arguments; core supplies the CPython calling convention (the
/// `extern "C"` entry point, the panic → exception path, the argument
/// unpacking). The function's contract (its `# Safety`): attached, `slf` a
/// live Context of the module, as CPython guarantees to a method of the type.
///
/// * `method!(noargs c"name", f, doc)`: `f(slf)`;
/// * `method!(onearg c"name", f, doc)`: `f(slf, arg: Borrowed)`;
/// * `method!(varargs c"name", f, doc)`: `f(slf, args: &[*mut PyObject])`,
///   positional arguments only;
/// * `method!(params c"name", f, PARAMS, doc)`: `f(slf, Args<N>)` parsed by
///   `PARAMS` (an [`crate::args::Params`] of `N` names);
/// * `method!(vectorcall c"name", f, doc)`: `f(slf, args, nargsf, kwnames)`,
///   the raw vectorcall arguments (for a signature `Params` cannot say);
///
/// each returning `PyResult<Owned>`.
#[macro_export]
macro_rules! method {
    (noargs $name:expr, $f:path, $doc:expr $(,)?) => {{
        /// # Safety
        /// CPython's `METH_NOARGS` call of a Context method.
        unsafe extern "C" fn entry(
            slf: *mut $crate::pyo3_ffi::PyObject,
            _: *mut $crate::pyo3_ffi::PyObject,
        ) -> *mut $crate::pyo3_ffi::PyObject {
            // SAFETY: a method call: attached, `slf` a live Context.
            $crate::py::trampoline(|| unsafe { $f(slf) })
        }
        $crate::py::typespec::noargs($name, entry, $doc)
    }};
    (onearg $name:expr, $f:path, $doc:expr $(,)?) => {{
        /// # Safety
        /// CPython's `METH_O` call of a Context method.
        unsafe extern "C" fn entry(
            slf: *mut $crate::pyo3_ffi::PyObject,
            arg: *mut $crate::pyo3_ffi::PyObject,
        ) -> *mut $crate::pyo3_ffi::PyObject {
            // SAFETY: a method call: attached, `slf` a live Context, `arg`
            // a live object for the call.
            $crate::py::trampoline(|| unsafe { $f(slf, $crate::py::Borrowed::from_ptr(arg)) })
        }
        $crate::py::typespec::onearg($name, entry, $doc)
    }};
    (varargs $name:expr, $f:path, $doc:expr $(,)?) => {{
        /// # Safety
        /// CPython's `METH_FASTCALL` call of a Context method.
        unsafe extern "C" fn entry(
            slf: *mut $crate::pyo3_ffi::PyObject,
            args: *mut *mut $crate::pyo3_ffi::PyObject,
            nargsf: $crate::pyo3_ffi::Py_ssize_t,
        ) -> *mut $crate::pyo3_ffi::PyObject {
            // SAFETY: a method call: attached, `slf` a live Context, the
            // arguments CPython's (`positional` guards a NULL `args`).
            $crate::py::trampoline(|| unsafe {
                $f(slf, $crate::args::positional(args.cast_const(), nargsf))
            })
        }
        $crate::py::typespec::fast($name, entry, $doc)
    }};
    (vectorcall $name:expr, $f:path, $doc:expr $(,)?) => {{
        /// # Safety
        /// CPython's `METH_FASTCALL | METH_KEYWORDS` call of a Context
        /// method.
        unsafe extern "C" fn entry(
            slf: *mut $crate::pyo3_ffi::PyObject,
            args: *const *mut $crate::pyo3_ffi::PyObject,
            nargsf: $crate::pyo3_ffi::Py_ssize_t,
            kwnames: *mut $crate::pyo3_ffi::PyObject,
        ) -> *mut $crate::pyo3_ffi::PyObject {
            // SAFETY: a method call: attached, `slf` a live Context, the
            // vectorcall arguments CPython's.
            $crate::py::trampoline(|| unsafe { $f(slf, args, nargsf, kwnames) })
        }
        $crate::py::typespec::fastcall($name, entry, 0, $doc)
    }};
    (params $name:expr, $f:path, $params:expr, $doc:expr $(,)?) => {{
        /// # Safety
        /// As for the `vectorcall` form.
        unsafe fn parsed(
            slf: *mut $crate::pyo3_ffi::PyObject,
            args: *const *mut $crate::pyo3_ffi::PyObject,
            nargsf: $crate::pyo3_ffi::Py_ssize_t,
            kwnames: *mut $crate::pyo3_ffi::PyObject,
        ) -> $crate::py::PyResult<$crate::py::Owned> {
            // SAFETY: forwarded contract (CPython's vectorcall arguments;
            // attached, `slf` a live Context).
            unsafe { $f(slf, $params.parse(args, nargsf, kwnames)?) }
        }
        $crate::method!(vectorcall $name, parsed, $doc)
    }};
}

/// A Context property's getter, from a plain `unsafe fn(slf) ->
/// PyResult<Owned>` (contract as for [`method!`](crate::method)).
#[macro_export]
macro_rules! getter {
    ($f:path) => {{
        /// # Safety
        /// CPython's call of a Context property getter.
        unsafe extern "C" fn entry(
            slf: *mut $crate::pyo3_ffi::PyObject,
            _: *mut ::std::ffi::c_void,
        ) -> *mut $crate::pyo3_ffi::PyObject {
            // SAFETY: a getter call: attached, `slf` a live Context.
            $crate::py::trampoline(|| unsafe { $f(slf) })
        }
        entry
    }};
}
