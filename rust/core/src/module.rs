//! Module state and multi-phase initialisation shared by the backends.
//!
//! Every backend module stores its types in a [`ModState`]; types find it with
//! `PyType_GetModuleState` (they cannot be subclassed, so `Py_TYPE(self)` is
//! always the module's own type). The [`backend_module!`](crate::backend_module) macro generates
//! the `PyModuleDef`, its slots (exec, `Py_mod_gil = NOT_USED` on 3.13+,
//! single-interpreter on 3.12+) and the `PyInit_*` symbol.

use std::ffi::{c_int, c_void, CStr};
use std::ptr;

use pyo3_ffi::*;

use crate::op::Flavor;
use crate::py::{Exc, Owned, PyErr, PyResult, SpecCache, TypeSpec};

/// Per-module state (`m_size` bytes, zeroed by CPython before exec).
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
        // SAFETY: a type made with `PyType_FromModuleAndSpec` by one of our
        // modules has that module's state (caller's contract).
        unsafe { PyType_GetModuleState(tp) }.cast()
    }

    /// # Safety
    /// `obj` must be an instance of one of our module's types.
    #[inline]
    pub unsafe fn of(obj: *mut PyObject) -> *mut ModState {
        // SAFETY: a live instance of one of our types (caller's contract).
        unsafe { Self::of_type(Py_TYPE(obj)) }
    }

    /// # Safety
    /// `module` must be a module created from a def using this state.
    pub unsafe fn of_module(module: *mut PyObject) -> *mut ModState {
        // SAFETY: forwarded contract.
        unsafe { PyModule_GetState(module) }.cast()
    }

    /// The object references the state owns, for traverse/clear.
    fn refs(&mut self) -> [&mut *mut PyObject; 6] {
        [
            &mut self.op_type,
            &mut self.ctx_type,
            &mut self.error_type,
            &mut self.capacity_type,
            &mut self.adapter_type,
            &mut self.awaitable_type,
        ]
    }
}

/// `m_size` of every backend module.
#[allow(clippy::cast_possible_wrap)] // a struct of eight pointers: far below isize::MAX
pub const STATE_SIZE: Py_ssize_t = std::mem::size_of::<ModState>() as Py_ssize_t;

/// # Safety
/// CPython's `m_traverse` of a module made from [`backend_module!`](crate::backend_module).
pub unsafe extern "C" fn state_traverse(
    module: *mut PyObject,
    visit: visitproc,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: our module (CPython's contract for m_traverse); its state is
    // NULL or a live `ModState` that only GC/clear touch right now.
    let Some(st) = (unsafe { ModState::of_module(module).as_mut() }) else {
        return 0;
    };
    for p in st.refs() {
        if !p.is_null() {
            // SAFETY: a strong reference the state owns, visited with the
            // collector's callback.
            let r = unsafe { visit(*p, arg) };
            if r != 0 {
                return r;
            }
        }
    }
    0
}

/// # Safety
/// CPython's `m_clear` of a module made from [`backend_module!`](crate::backend_module).
pub unsafe extern "C" fn state_clear(module: *mut PyObject) -> c_int {
    // SAFETY: our module (CPython's contract); its state is NULL or a live
    // `ModState`, cleared while no other code uses it.
    let Some(st) = (unsafe { ModState::of_module(module).as_mut() }) else {
        return 0;
    };
    for p in st.refs() {
        let old = std::mem::replace(p, ptr::null_mut());
        if !old.is_null() {
            // SAFETY: the state's strong reference, released once (the
            // field is already NULL).
            unsafe { Py_DECREF(old) };
        }
    }
    0
}

/// # Safety
/// CPython's `m_free` of a module made from [`backend_module!`](crate::backend_module).
pub unsafe extern "C" fn state_free(module: *mut c_void) {
    // SAFETY: CPython passes the module being freed.
    unsafe { state_clear(module.cast()) };
}

/// Creates a backend's Context type from its spec (built once per process:
/// module re-execution reuses it, keyed by `flavor`).
///
/// # Safety
/// Attached; `module` valid; the spec's functions match their slots.
unsafe fn create_context_type(
    module: *mut PyObject,
    flavor: &'static Flavor,
    spec: fn() -> TypeSpec,
) -> PyResult<Owned> {
    static SPECS: SpecCache = SpecCache::new();
    let spec = SPECS.get_or_build(std::ptr::from_ref(flavor) as usize, spec);
    // SAFETY: forwarded contract.
    let tp = unsafe { spec.create(module)? };
    // Messages and repr(type) use tp_name, which upstream has as plain
    // "Context": point it past the "builtins." prefix (a static string).
    let prefix = b"builtins.".len();
    // SAFETY: `tp` is the heap type just created, not yet visible to any
    // other code; the new name points into a static NUL-terminated string.
    unsafe {
        (*tp.as_ptr().cast::<PyTypeObject>()).tp_name =
            crate::context::SPEC_NAME.as_ptr().add(prefix);
    }
    Ok(tp)
}

/// Creates an exception class `name` (dotted: `"caio.backend.Name"`) deriving
/// from `bases` and adds it to `module` as `attr`. Every exception type of
/// the backends is made here.
///
/// # Safety
/// Attached; `module` is the module being executed; `bases` are exception
/// classes.
pub unsafe fn add_exception(
    module: *mut PyObject,
    attr: &CStr,
    name: &'static CStr,
    bases: &[*mut PyObject],
    doc: &'static CStr,
) -> PyResult<Owned> {
    // SAFETY: attached; the bases are live classes (caller's contract).
    let bases = crate::py::py_tuple(
        bases
            .iter()
            .map(|&b| unsafe { Owned::from_borrowed(b) })
            .collect(),
    )?;
    // SAFETY: attached; static NUL-terminated name and doc, a tuple of
    // exception classes.
    let cls = unsafe {
        Owned::from_new(PyErr_NewExceptionWithDoc(
            name.as_ptr(),
            doc.as_ptr(),
            bases.as_ptr(),
            ptr::null_mut(),
        ))?
    };
    // SAFETY: forwarded contract.
    unsafe { add_object(module, attr, cls.clone())? };
    Ok(cls)
}

/// Creates the module's Operation type, its Context type (from `ctx_spec`,
/// see [`crate::context::ContextObject::spec`]) and its `OperationError`, and stores them in the
/// module state and as attributes.
///
/// # Safety
/// Called from a module exec slot, attached.
pub unsafe fn init_common(
    module: *mut PyObject,
    flavor: &'static Flavor,
    ctx_spec: fn() -> TypeSpec,
    error_name: &'static CStr,
) -> PyResult<()> {
    // Fork handlers in place before any context, pool or buffer exists.
    crate::fork::install();
    // SAFETY: a module made from `backend_module!` being executed
    // (caller's contract): its state is ours to fill.
    let st = unsafe { &mut *ModState::of_module(module) };
    st.flavor = flavor;

    // SAFETY: attached, `module` valid (caller's contract).
    let op_type = unsafe { crate::op::create_type(module, flavor)? };
    // SAFETY: as above; the backend's functions match their slots.
    let ctx_type = unsafe { create_context_type(module, flavor, ctx_spec)? };
    // SAFETY: attached, `module` valid (caller's contract); the builtin
    // classes are valid objects.
    let error_type = unsafe {
        add_exception(
            module,
            c"OperationError",
            error_name,
            &[PyExc_OSError, PyExc_SystemError],
            c"An I/O operation failed. Subclass of OSError (errno, strerror) and, for \
compatibility with upstream caio, of SystemError.",
        )?
    };

    // SAFETY: attached, `module` valid (caller's contract).
    unsafe {
        add_object(module, c"Operation", op_type.clone())?;
        add_object(module, c"Context", ctx_type.clone())?;
        // Whether this build honours the CAIO_TEST_* environment hooks (the
        // test suite skips what needs them when not).
        add_object(
            module,
            c"_TEST_HOOKS",
            crate::py::py_bool(crate::test_hooks::ENABLED),
        )?;
        if crate::test_hooks::ENABLED {
            add_object(
                module,
                c"_bounce_windows",
                BOUNCE_WINDOWS_DEF.new_function(module)?,
            )?;
        }
    }

    st.op_type = op_type.into_ptr();
    st.ctx_type = ctx_type.into_ptr();
    st.error_type = error_type.into_ptr();
    Ok(())
}

/// `_bounce_windows()` (test-hook builds): O_DIRECT bounce windows this
/// module has allocated (DESIGN.md §10: an aligned caller buffer needs none).
///
/// # Safety
/// A builtin function called by CPython, attached.
unsafe extern "C" fn bounce_windows(_module: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    crate::py::trampoline(|| crate::py::py_uint(crate::direct::bounce::windows_allocated()))
}

static BOUNCE_WINDOWS_DEF: crate::py::MethodDef =
    crate::py::MethodDef::noargs(c"_bounce_windows", bounce_windows);

/// Creates the module's `CapacityError`: raised by a raw `Context.submit()`
/// refused because the ring/queue is full. DESIGN.md §4.2 prescribes the
/// builtin `base` (`OverflowError` for linux_uring/linux_aio, `RuntimeError`
/// for thread_aio); DESIGN.md §4.2 asks for an `OSError` with `errno == EAGAIN` as
/// well. As for `OperationError` (DESIGN.md §6.2 errtype), one class deriving from
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
    // SAFETY: attached; our module being executed; `base` and `OSError` are
    // exception classes (caller's contract).
    unsafe {
        let cls = add_exception(module, c"CapacityError", name, &[PyExc_OSError, base], doc)?;
        (*ModState::of_module(module)).capacity_type = cls.into_ptr();
    }
    Ok(())
}

/// The capacity refusal for a `submit()` on `obj` (an instance of one of the
/// module's types): the module's `CapacityError(EAGAIN, msg)`, or
/// `fallback(EAGAIN, msg)` if the module state is already torn down.
///
/// # Safety
/// Attached; `obj` is an instance of one of our module's types.
pub unsafe fn capacity_error(obj: *mut PyObject, fallback: Exc, msg: String) -> PyErr {
    // SAFETY: forwarded contract: our type has our module state.
    let cls = unsafe { (*ModState::of(obj)).capacity_type };
    let exc = if cls.is_null() {
        fallback
    } else {
        Exc::Custom(cls)
    };
    PyErr::ErrnoMsg(exc, libc::EAGAIN, msg)
}

/// `module.<name> = value` (the module takes its own reference).
///
/// # Safety
/// Attached; `module` valid.
pub unsafe fn add_object(module: *mut PyObject, name: &CStr, value: Owned) -> PyResult<()> {
    // SAFETY: forwarded contract; `PyModule_AddObjectRef` does not steal.
    if unsafe { PyModule_AddObjectRef(module, name.as_ptr(), value.as_ptr()) } != 0 {
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

            /// # Safety
            /// CPython's `Py_mod_exec` slot: attached, `m` the module being
            /// initialised.
            unsafe extern "C" fn exec_slot(m: *mut PyObject) -> ::std::ffi::c_int {
                // SAFETY: CPython runs the exec slot attached, with the
                // module being initialised.
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

            /// The module's init function (multi-phase initialisation).
            ///
            /// # Safety
            /// Called by CPython's import machinery, attached.
            #[no_mangle]
            #[allow(non_snake_case)]
            pub unsafe extern "C" fn $init() -> *mut PyObject {
                // SAFETY: CPython calls PyInit_* attached; the definition is
                // a static that CPython initialises and then owns.
                unsafe { PyModuleDef_Init(::std::ptr::addr_of_mut!(DEF)) }
            }
        }
    };
}
