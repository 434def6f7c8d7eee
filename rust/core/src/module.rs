//! Module state and multi-phase initialisation shared by the backends.
//!
//! Every backend module stores its types in a [`ModState`]; types find it with
//! `PyType_GetModuleState` (they cannot be subclassed, so `Py_TYPE(self)` is
//! always the module's own type). The [`backend_module!`] macro generates
//! the `PyModuleDef`, its slots (exec, `Py_mod_gil = NOT_USED` on 3.13+,
//! single-interpreter on 3.12+) and the `PyInit_*` symbol.

use std::ffi::{c_int, c_void, CStr};
use std::ptr;

use pyo3_ffi::*;

use crate::op::Flavor;
use crate::py::{Owned, PyErr, PyResult};

#[repr(C)]
pub struct ModState {
    pub op_type: *mut PyObject,
    pub ctx_type: *mut PyObject,
    /// `OperationError(OSError, SystemError)`.
    pub error_type: *mut PyObject,
    /// `CapacityError(OSError, OverflowError | RuntimeError)`, see
    /// [`init_capacity_error`]; null until then.
    pub capacity_type: *mut PyObject,
    pub flavor: *const Flavor,
    /// Native asyncio fast path ([`crate::aio::init`]); null when unused.
    pub adapter_type: *mut PyObject,
    pub awaitable_type: *mut PyObject,
    pub engine: *const crate::aio::Engine,
}

impl ModState {
    /// # Safety
    /// `tp` must be a type created by one of our modules.
    #[inline]
    pub unsafe fn of_type(tp: *mut PyTypeObject) -> *mut ModState {
        PyType_GetModuleState(tp) as *mut ModState
    }

    /// # Safety
    /// `obj` must be an instance of one of our module's types.
    #[inline]
    pub unsafe fn of(obj: *mut PyObject) -> *mut ModState {
        Self::of_type(Py_TYPE(obj))
    }

    /// # Safety
    /// `module` must be a module created from a def using this state.
    pub unsafe fn of_module(module: *mut PyObject) -> *mut ModState {
        PyModule_GetState(module) as *mut ModState
    }
}

pub const STATE_SIZE: Py_ssize_t = std::mem::size_of::<ModState>() as Py_ssize_t;

pub unsafe extern "C" fn state_traverse(
    module: *mut PyObject,
    visit: visitproc,
    arg: *mut c_void,
) -> c_int {
    let st = ModState::of_module(module);
    if st.is_null() {
        return 0;
    }
    for p in [
        (*st).op_type,
        (*st).ctx_type,
        (*st).error_type,
        (*st).capacity_type,
        (*st).adapter_type,
        (*st).awaitable_type,
    ] {
        if !p.is_null() {
            let r = visit(p, arg);
            if r != 0 {
                return r;
            }
        }
    }
    0
}

pub unsafe extern "C" fn state_clear(module: *mut PyObject) -> c_int {
    let st = ModState::of_module(module);
    if st.is_null() {
        return 0;
    }
    for p in [
        &mut (*st).op_type,
        &mut (*st).ctx_type,
        &mut (*st).error_type,
        &mut (*st).capacity_type,
        &mut (*st).adapter_type,
        &mut (*st).awaitable_type,
    ] {
        let old = std::mem::replace(p, ptr::null_mut());
        if !old.is_null() {
            Py_DECREF(old);
        }
    }
    0
}

pub unsafe extern "C" fn state_free(module: *mut c_void) {
    state_clear(module.cast());
}

/// What a backend's `Context` type consists of; `init_common` turns it into
/// the heap type. Every backend's Context has the same shape: a plain
/// (non-GC) object with a weak-reference list, `__new__`, dealloc, repr, and
/// its own methods and properties.
pub struct ContextType {
    /// Type docstring (with the `Name(sig)\n--\n\n` text signature).
    pub doc: &'static CStr,
    /// `size_of::<YourContext>()`.
    pub basicsize: usize,
    /// `offset_of!(YourContext, weakreflist)`.
    pub weaklistoffset: usize,
    pub new: newfunc,
    pub dealloc: destructor,
    pub repr: reprfunc,
    /// NULL-terminated, must live for the process (CPython keeps the pointer).
    pub methods: *mut PyMethodDef,
    /// NULL-terminated, must live for the process (CPython keeps the pointer).
    pub getset: *mut PyGetSetDef,
}

/// The spec name: "builtins." gives `__module__ == "builtins"` like
/// upstream's static type, without the 3.12+ warning for undotted heap-type
/// names. Static because 3.10/3.11 keep pointing `tp_name` into it.
const CONTEXT_SPEC_NAME: &CStr = c"builtins.Context";

impl ContextType {
    /// # Safety
    /// Attached; `module` valid; the method/getset tables are static and
    /// NULL-terminated.
    unsafe fn create(&self, module: *mut PyObject) -> PyResult<Owned> {
        // CPython copies the members table and the doc into the new type;
        // only `methods`/`getset` (and the spec name) must outlive it.
        let mut members = [
            PyMemberDef {
                name: c"__weaklistoffset__".as_ptr(),
                type_code: Py_T_PYSSIZET,
                offset: self.weaklistoffset as Py_ssize_t,
                flags: Py_READONLY,
                doc: ptr::null(),
            },
            PyMemberDef {
                name: ptr::null(),
                type_code: 0,
                offset: 0,
                flags: 0,
                doc: ptr::null(),
            },
        ];
        let mut slots = [
            PyType_Slot {
                slot: Py_tp_doc,
                pfunc: self.doc.as_ptr() as *mut c_void,
            },
            PyType_Slot {
                slot: Py_tp_new,
                pfunc: self.new as *mut c_void,
            },
            PyType_Slot {
                slot: Py_tp_dealloc,
                pfunc: self.dealloc as *mut c_void,
            },
            PyType_Slot {
                slot: Py_tp_repr,
                pfunc: self.repr as *mut c_void,
            },
            PyType_Slot {
                slot: Py_tp_methods,
                pfunc: self.methods.cast(),
            },
            PyType_Slot {
                slot: Py_tp_getset,
                pfunc: self.getset.cast(),
            },
            PyType_Slot {
                slot: Py_tp_members,
                pfunc: members.as_mut_ptr().cast(),
            },
            PyType_Slot {
                slot: 0,
                pfunc: ptr::null_mut(),
            },
        ];
        let mut spec = PyType_Spec {
            name: CONTEXT_SPEC_NAME.as_ptr(),
            basicsize: self.basicsize as c_int,
            itemsize: 0,
            flags: Py_TPFLAGS_DEFAULT as _,
            slots: slots.as_mut_ptr(),
        };
        let tp = Owned::from_new(PyType_FromModuleAndSpec(module, &mut spec, ptr::null_mut()))?;
        // Messages and repr(type) use tp_name, which upstream has as plain
        // "Context": point it past the "builtins." prefix (static string).
        let prefix = b"builtins.".len();
        (*(tp.as_ptr() as *mut PyTypeObject)).tp_name = CONTEXT_SPEC_NAME.as_ptr().add(prefix);
        Ok(tp)
    }
}

/// Creates the module's Operation type, its `OperationError` and stores them
/// (plus the given Context type) in the module state and as attributes.
///
/// # Safety
/// Called from a module exec slot, attached.
pub unsafe fn init_common(
    module: *mut PyObject,
    flavor: &'static Flavor,
    ctx: ContextType,
    error_name: &'static CStr,
) -> PyResult<()> {
    let st = ModState::of_module(module);
    (*st).flavor = flavor;

    let op_type = crate::op::create_type(module, flavor)?;
    let ctx_type = ctx.create(module)?;
    let bases = crate::py::py_tuple(vec![
        Owned::from_borrowed(PyExc_OSError),
        Owned::from_borrowed(PyExc_SystemError),
    ])?;
    let error_type = Owned::from_new(PyErr_NewExceptionWithDoc(
        error_name.as_ptr(),
        c"An I/O operation failed. Subclass of OSError (errno, strerror) and, for \
compatibility with upstream caio, of SystemError."
            .as_ptr(),
        bases.as_ptr(),
        ptr::null_mut(),
    ))?;

    add_object(module, c"Operation", op_type.clone())?;
    add_object(module, c"Context", ctx_type.clone())?;
    add_object(module, c"OperationError", error_type.clone())?;

    (*st).op_type = op_type.into_ptr();
    (*st).ctx_type = ctx_type.into_ptr();
    (*st).error_type = error_type.into_ptr();
    Ok(())
}

/// Creates the module's `CapacityError`: raised by a raw `Context.submit()`
/// refused because the ring/queue is full. API.md §3.6 prescribes the
/// builtin `base` (`OverflowError` for linux_uring/linux_aio, `RuntimeError`
/// for thread_aio); issue 7 asks for an `OSError` with `errno == EAGAIN` as
/// well. As for `OperationError` (API.md §7 Q4), one class deriving from
/// both satisfies the two: `except OverflowError` / `except RuntimeError`
/// keep working, `except OSError` with `e.errno == errno.EAGAIN` works too
/// (and `str()` reads `[Errno 11] <message>`).
///
/// # Safety
/// Called from a module exec slot after [`init_common`], attached; `base` is
/// a builtin exception class.
pub unsafe fn init_capacity_error(
    module: *mut PyObject,
    name: &'static CStr,
    base: *mut PyObject,
    doc: &'static CStr,
) -> PyResult<()> {
    let st = ModState::of_module(module);
    let bases = crate::py::py_tuple(vec![
        Owned::from_borrowed(PyExc_OSError),
        Owned::from_borrowed(base),
    ])?;
    let cls = Owned::from_new(PyErr_NewExceptionWithDoc(
        name.as_ptr(),
        doc.as_ptr(),
        bases.as_ptr(),
        ptr::null_mut(),
    ))?;
    add_object(module, c"CapacityError", cls.clone())?;
    (*st).capacity_type = cls.into_ptr();
    Ok(())
}

/// The capacity refusal for a `submit()` on `obj` (an instance of one of the
/// module's types): the module's `CapacityError(EAGAIN, msg)`, or
/// `fallback(EAGAIN, msg)` if the module state is already torn down.
///
/// # Safety
/// Attached; `obj` is an instance of one of our module's types.
pub unsafe fn capacity_error(obj: *mut PyObject, fallback: crate::py::Exc, msg: String) -> PyErr {
    let cls = (*ModState::of(obj)).capacity_type;
    let exc = if cls.is_null() {
        fallback
    } else {
        crate::py::Exc::Custom(cls)
    };
    PyErr::ErrnoMsg(exc, libc::EAGAIN, msg)
}

/// `module.<name> = value` (steals `value`).
///
/// # Safety
/// Attached; `module` valid.
pub unsafe fn add_object(module: *mut PyObject, name: &CStr, value: Owned) -> PyResult<()> {
    if PyModule_AddObjectRef(module, name.as_ptr(), value.as_ptr()) != 0 {
        return Err(PyErr::Fetched);
    }
    Ok(())
}

/// Declares a backend module: `backend_module!(PyInit_thread_aio, c"thread_aio",
/// c"doc", exec_fn)` where `exec_fn: unsafe fn(*mut PyObject) -> PyResult<()>`.
#[macro_export]
macro_rules! backend_module {
    ($init:ident, $name:expr, $doc:expr, $exec:path) => {
        mod __caio_module {
            use super::*;
            use $crate::pyo3_ffi::*;

            unsafe extern "C" fn exec_slot(m: *mut PyObject) -> ::std::ffi::c_int {
                $crate::py::trampoline_int(|| unsafe { $exec(m) })
            }

            const N_SLOTS: usize = 2 + cfg!(Py_3_12) as usize + cfg!(Py_3_13) as usize;

            static mut SLOTS: [PyModuleDef_Slot; N_SLOTS] = [
                PyModuleDef_Slot {
                    slot: Py_mod_exec,
                    value: exec_slot as *mut ::std::ffi::c_void,
                },
                // Worker threads attach through PyGILState, which only knows the
                // main interpreter: no sub-interpreter support.
                #[cfg(Py_3_12)]
                PyModuleDef_Slot {
                    slot: Py_mod_multiple_interpreters,
                    value: Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED,
                },
                // All shared state is atomic or behind our own locks.
                #[cfg(Py_3_13)]
                PyModuleDef_Slot {
                    slot: Py_mod_gil,
                    value: Py_MOD_GIL_NOT_USED,
                },
                PyModuleDef_Slot {
                    slot: 0,
                    value: ::std::ptr::null_mut(),
                },
            ];

            static mut DEF: PyModuleDef = PyModuleDef {
                m_base: PyModuleDef_HEAD_INIT,
                m_name: $name.as_ptr(),
                m_doc: $doc.as_ptr(),
                m_size: $crate::module::STATE_SIZE,
                m_methods: ::std::ptr::null_mut(),
                m_slots: ::std::ptr::addr_of_mut!(SLOTS).cast(),
                m_traverse: Some($crate::module::state_traverse),
                m_clear: Some($crate::module::state_clear),
                m_free: Some($crate::module::state_free),
            };

            #[no_mangle]
            #[allow(non_snake_case)]
            pub unsafe extern "C" fn $init() -> *mut PyObject {
                PyModuleDef_Init(::std::ptr::addr_of_mut!(DEF))
            }
        }
    };
}
