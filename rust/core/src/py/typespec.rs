//! The one way caio defines a heap type (core's and the backends' Context
//! types alike): a [`TypeSpec`] builder that
//! collects slots, methods, properties and members, then [`TypeSpec::build`]
//! leaks the tables (CPython keeps pointing into them — and on 3.10/3.11
//! into the spec's name — for as long as the type exists, which can be the
//! whole process) into a [`Spec`] that creates the type with
//! `PyType_FromModuleAndSpec`. A [`SpecCache`] builds each spec once per
//! process, however many times the module is executed.

use std::cell::UnsafeCell;
use std::ffi::{c_int, c_uint, c_ulong, c_void, CStr};
use std::ptr;
use std::sync::Mutex;

use pyo3_ffi::*;

use super::error::{PyErr, PyResult};
use super::object::{ssize, Owned};

/// `Py_am_send` (3.10+), missing from pyo3-ffi's slot constants.
pub const PY_AM_SEND: c_int = 81;

/// A heap type under construction.
pub struct TypeSpec {
    name: &'static CStr,
    basicsize: usize,
    flags: c_ulong,
    slots: Vec<PyType_Slot>,
    methods: Vec<PyMethodDef>,
    getset: Vec<PyGetSetDef>,
    members: Vec<PyMemberDef>,
}

impl TypeSpec {
    /// `name` is the dotted spec name (`"module.Type"`); `basicsize` the
    /// size of the instance struct; `flags` `Py_TPFLAGS_*`.
    pub fn new(name: &'static CStr, basicsize: usize, flags: c_ulong) -> TypeSpec {
        TypeSpec {
            name,
            basicsize,
            flags,
            slots: Vec::new(),
            methods: Vec::new(),
            getset: Vec::new(),
            members: Vec::new(),
        }
    }

    /// Any slot (`Py_tp_*`, `Py_am_*`) by number. Prefer the typed setters.
    pub fn slot(mut self, slot: c_int, pfunc: *mut c_void) -> TypeSpec {
        self.slots.push(PyType_Slot { slot, pfunc });
        self
    }

    pub fn doc(self, doc: &'static CStr) -> TypeSpec {
        self.slot(Py_tp_doc, doc.as_ptr().cast_mut().cast())
    }
    pub fn new_fn(self, f: newfunc) -> TypeSpec {
        self.slot(Py_tp_new, f as *mut c_void)
    }
    pub fn dealloc(self, f: destructor) -> TypeSpec {
        self.slot(Py_tp_dealloc, f as *mut c_void)
    }
    pub fn traverse(self, f: traverseproc) -> TypeSpec {
        self.slot(Py_tp_traverse, f as *mut c_void)
    }
    pub fn clear(self, f: inquiry) -> TypeSpec {
        self.slot(Py_tp_clear, f as *mut c_void)
    }
    pub fn finalize(self, f: destructor) -> TypeSpec {
        self.slot(Py_tp_finalize, f as *mut c_void)
    }
    pub fn repr(self, f: reprfunc) -> TypeSpec {
        self.slot(Py_tp_repr, f as *mut c_void)
    }
    pub fn iter(self, f: getiterfunc) -> TypeSpec {
        self.slot(Py_tp_iter, f as *mut c_void)
    }
    pub fn iternext(self, f: iternextfunc) -> TypeSpec {
        self.slot(Py_tp_iternext, f as *mut c_void)
    }
    pub fn am_await(self, f: unaryfunc) -> TypeSpec {
        self.slot(Py_am_await, f as *mut c_void)
    }
    pub fn am_send(self, f: sendfunc) -> TypeSpec {
        self.slot(PY_AM_SEND, f as *mut c_void)
    }

    /// A method (see [`fastcall`], [`noargs`], [`onearg`], [`fast`]).
    pub fn method(mut self, m: PyMethodDef) -> TypeSpec {
        self.methods.push(m);
        self
    }

    /// A read-only property.
    pub fn getter(mut self, name: &'static CStr, get: getter, doc: &'static CStr) -> TypeSpec {
        self.getset.push(PyGetSetDef {
            name: name.as_ptr(),
            get: Some(get),
            set: None,
            doc: doc.as_ptr(),
            closure: ptr::null_mut(),
        });
        self
    }

    /// Instances keep a weak-reference list at `offset` (`__weaklistoffset__`).
    pub fn weaklist_offset(mut self, offset: usize) -> TypeSpec {
        self.members.push(PyMemberDef {
            name: c"__weaklistoffset__".as_ptr(),
            type_code: Py_T_PYSSIZET,
            offset: ssize(offset),
            flags: Py_READONLY,
            doc: ptr::null(),
        });
        self
    }

    /// Leaks the tables for the life of the process and returns the spec.
    pub fn build(self) -> &'static Spec {
        fn terminated<T>(mut v: Vec<T>, zero: T) -> Option<&'static mut [T]> {
            if v.is_empty() {
                return None;
            }
            v.push(zero);
            Some(Box::leak(v.into_boxed_slice()))
        }
        let mut slots = self.slots;
        if let Some(m) = terminated(self.methods, PyMethodDef::zeroed()) {
            slots.push(PyType_Slot {
                slot: Py_tp_methods,
                pfunc: m.as_mut_ptr().cast(),
            });
        }
        let getset_end = PyGetSetDef {
            name: ptr::null(),
            get: None,
            set: None,
            doc: ptr::null(),
            closure: ptr::null_mut(),
        };
        if let Some(g) = terminated(self.getset, getset_end) {
            slots.push(PyType_Slot {
                slot: Py_tp_getset,
                pfunc: g.as_mut_ptr().cast(),
            });
        }
        let members = terminated(
            self.members,
            PyMemberDef {
                name: ptr::null(),
                type_code: 0,
                offset: 0,
                flags: 0,
                doc: ptr::null(),
            },
        );
        if let Some(m) = members {
            slots.push(PyType_Slot {
                slot: Py_tp_members,
                pfunc: m.as_mut_ptr().cast(),
            });
        }
        slots.push(PyType_Slot {
            slot: 0,
            pfunc: ptr::null_mut(),
        });
        let slots: &'static mut [PyType_Slot] = Box::leak(slots.into_boxed_slice());
        Box::leak(Box::new(Spec {
            spec: UnsafeCell::new(PyType_Spec {
                name: self.name.as_ptr(),
                // Checked in `Spec::create` (a struct size always fits).
                basicsize: c_int::try_from(self.basicsize).unwrap_or(-1),
                itemsize: 0,
                flags: c_uint::try_from(self.flags).unwrap_or(0),
                slots: slots.as_mut_ptr(),
            }),
        }))
    }
}

/// A finished type spec, alive for the process.
pub struct Spec {
    spec: UnsafeCell<PyType_Spec>,
}

// SAFETY: the spec and its tables are written only while building, before
// the `&'static Spec` exists; afterwards CPython (and we) only read them.
unsafe impl Sync for Spec {}
// SAFETY: as above: immutable, leaked data.
unsafe impl Send for Spec {}

impl Spec {
    /// Creates the heap type, bound to `module` (`PyType_GetModule`).
    ///
    /// # Safety
    /// Attached; `module` NULL or a module object; every function pointer
    /// in the spec matches its slot's signature.
    pub unsafe fn create(&'static self, module: *mut PyObject) -> PyResult<Owned> {
        // SAFETY: only read (see the `Sync` impl).
        let spec = unsafe { &*self.spec.get() };
        if spec.basicsize < 0 {
            return Err(PyErr::overflow("type too large"));
        }
        // SAFETY: attached (caller's contract); `PyType_FromModuleAndSpec`
        // reads the spec without modifying it (its parameter is only
        // non-const for historical reasons) and the leaked tables outlive
        // the type.
        unsafe {
            Owned::from_new(PyType_FromModuleAndSpec(
                module,
                self.spec.get(),
                ptr::null_mut(),
            ))
        }
    }
}

/// Specs built once per process, keyed by an address (e.g. a backend's
/// `Flavor`): module re-execution reuses them instead of leaking new ones.
pub struct SpecCache(Mutex<Vec<(usize, &'static Spec)>>);

impl SpecCache {
    pub const fn new() -> SpecCache {
        SpecCache(Mutex::new(Vec::new()))
    }

    /// The spec for `key`, built by `make` the first time.
    pub fn get_or_build(&self, key: usize, make: impl FnOnce() -> TypeSpec) -> &'static Spec {
        let mut specs = crate::sync::lock(&self.0);
        if let Some((_, s)) = specs.iter().find(|(k, _)| *k == key) {
            return s;
        }
        let s = make().build();
        specs.push((key, s));
        s
    }
}

impl Default for SpecCache {
    fn default() -> Self {
        Self::new()
    }
}

/// A `METH_FASTCALL | METH_KEYWORDS` method (`flags` adds e.g. `METH_CLASS`).
pub fn fastcall(
    name: &'static CStr,
    f: PyCFunctionFastWithKeywords,
    flags: c_int,
    doc: &'static CStr,
) -> PyMethodDef {
    PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunctionFastWithKeywords: f,
        },
        ml_flags: METH_FASTCALL | METH_KEYWORDS | flags,
        ml_doc: doc.as_ptr(),
    }
}

/// A `METH_FASTCALL` method (positional only).
pub fn fast(name: &'static CStr, f: PyCFunctionFast, doc: &'static CStr) -> PyMethodDef {
    PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: PyMethodDefPointer { PyCFunctionFast: f },
        ml_flags: METH_FASTCALL,
        ml_doc: doc.as_ptr(),
    }
}

/// A `METH_NOARGS` method.
pub fn noargs(name: &'static CStr, f: PyCFunction, doc: &'static CStr) -> PyMethodDef {
    PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: PyMethodDefPointer { PyCFunction: f },
        ml_flags: METH_NOARGS,
        ml_doc: doc.as_ptr(),
    }
}

/// A `METH_O` method.
pub fn onearg(name: &'static CStr, f: PyCFunction, doc: &'static CStr) -> PyMethodDef {
    PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: PyMethodDefPointer { PyCFunction: f },
        ml_flags: METH_O,
        ml_doc: doc.as_ptr(),
    }
}
