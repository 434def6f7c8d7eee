//! The Python side of `Operation`: the properties, `get_value`,
//! `set_callback`, `repr`, GC support and the type itself (the class-method
//! constructors are in `construct`).

use std::ffi::{c_int, c_void};
use std::ptr;

use pyo3_ffi::*;

use super::construct::*;
use super::lifecycle::{set_callback, set_future};
use super::{as_op, Flavor, OpKind, OpState, Operation, ReadPayload};
use crate::args::Params;
use crate::module::ModState;
use crate::num::usize_sat;
use crate::py::typespec::{fastcall, onearg};
use crate::py::{
    none, py_bool, py_int, py_str, py_uint, ssize, trampoline, trampoline_int, trampoline_void,
    visit_opt, Borrowed, Exc, Owned, PyErr, PyResult, SpecCache, TypeSpec,
};

// ---------------------------------------------------------------------------
// value and errors

fn in_flight_error(what: &str) -> PyErr {
    PyErr::runtime(format!(
        "{} is not available while the operation is in flight",
        what
    ))
}

/// Builds a better message than `strerror` for some failures of a backend's
/// ops (e.g. O_DIRECT alignment), or `None` for the plain text.
pub type ErrorMessageHook = unsafe fn(op: &Operation, errno: i32) -> Option<String>;

// Core is linked into each backend's shared library separately, so this is
// one hook per backend module.
static ERROR_HOOK: std::sync::OnceLock<ErrorMessageHook> = std::sync::OnceLock::new();

/// Installs the backend's [`ErrorMessageHook`] (first call wins).
pub fn set_error_message_hook(hook: ErrorMessageHook) {
    let _ = ERROR_HOOK.set(hook);
}

/// The error raised by `get_value()` for a failed op: the module's
/// `OperationError`, a subclass of both `OSError` and `SystemError`
/// (DESIGN.md §6.2 errtype: still catchable as upstream's `SystemError`, now also with
/// `errno`/`strerror`).
///
/// # Safety
/// Attached; `op` is done (the hook may read its engine area).
unsafe fn op_error(op: &Operation, errno: i32) -> PyErr {
    // SAFETY: the op is an instance of one of our module's types.
    let exc = Exc::Custom(unsafe { (*ModState::of(op.as_ptr())).error_type });
    if let Some(hook) = ERROR_HOOK.get() {
        // SAFETY: the hook's contract: a done op, attached.
        if let Some(msg) = unsafe { hook(op, errno) } {
            return PyErr::ErrnoMsg(exc, errno, msg);
        }
    }
    PyErr::Errno(exc, errno)
}

/// A fresh zero-filled `bytes` of `n` bytes (the value of a read not yet run).
fn zero_bytes(n: u64) -> PyResult<Owned> {
    let n = usize_sat(n);
    // SAFETY: attached (crate invariant); NULL data allocates `n` bytes.
    let b = unsafe { Owned::from_new(PyBytes_FromStringAndSize(ptr::null(), ssize(n)))? };
    // SAFETY: the fresh `bytes` holds `n` writable bytes nobody else sees.
    unsafe { ptr::write_bytes(PyBytes_AS_STRING(b.as_ptr()).cast_mut().cast::<u8>(), 0, n) };
    Ok(b)
}

/// `op.get_value()`: the read bytes, the written count or `None`; raises the
/// op's error (or `RuntimeError` while in flight).
///
/// # Safety
/// Attached.
pub unsafe fn get_value(op: &Operation) -> PyResult<Owned> {
    let state = op.state();
    if state == OpState::InFlight {
        return Err(in_flight_error("get_value()"));
    }
    let res = op.raw_result();
    if res < 0 {
        // SAFETY: attached; the op is done.
        return Err(unsafe { op_error(op, op.errno()) });
    }
    if op.is_readinto() || op.kind.is_vectored() {
        return py_int(res); // bytes moved (0 before it ran)
    }
    match (op.kind, &op.read_buf) {
        (OpKind::Read, _) if state == OpState::New => zero_bytes(op.nbytes),
        (OpKind::Read, Some(buf)) => {
            if u64::try_from(res) == Ok(op.nbytes) {
                Ok(buf.clone())
            } else {
                // SAFETY: attached; copies the first `res` (≤ nbytes) bytes
                // of the filled `bytes`.
                unsafe {
                    Owned::from_new(PyBytes_FromStringAndSize(
                        PyBytes_AS_STRING(buf.as_ptr()),
                        ssize(crate::num::count_usize(res)),
                    ))
                }
            }
        }
        (OpKind::Read, None) => zero_bytes(op.nbytes),
        (OpKind::Write | OpKind::ReadV | OpKind::WriteV, _) => py_int(res),
        (OpKind::Fsync | OpKind::Fdsync, _) => Ok(none()),
    }
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn op_get_value(
    slf: *mut PyObject,
    _args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our Operation type called by CPython.
        unsafe {
            crate::args::no_args("get_value", nargs, kw)?;
            get_value(as_op(slf))
        }
    })
}

static SET_CALLBACK_KW: Params = Params {
    fname: "set_callback",
    names: &["callback"],
    required: 1,
    keywords: true,
};
static SET_CALLBACK_POS: Params = Params {
    fname: "set_callback",
    names: &["callback"],
    required: 1,
    keywords: false,
};

/// `op._set_future(fut)`: on delivery, resolve `fut` with `True` unless it is
/// already done (instead of calling a callback). Only for backends whose
/// completions are delivered on the event-loop thread (asyncio adapters).
///
/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn op_set_future(slf: *mut PyObject, fut: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a METH_O method of our Operation type: `fut` is a live object.
        unsafe { set_future(as_op(slf), fut) };
        Ok(none())
    })
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn op_set_callback(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our Operation type called by CPython with its
        // vectorcall arguments.
        unsafe {
            let op = as_op(slf);
            let params = if op.flavor().callback_keyword {
                &SET_CALLBACK_KW
            } else {
                &SET_CALLBACK_POS
            };
            let [cb] = params.parse::<1>(args, nargs, kw)?.0;
            set_callback(op, Params::req(cb)?)?;
        }
        Ok(py_bool(true))
    })
}

// ---------------------------------------------------------------------------
// properties

/// Runs `f` on the op behind a getter's `self`.
fn getter_of(slf: *mut PyObject, f: impl FnOnce(&Operation) -> PyResult<Owned>) -> *mut PyObject {
    // SAFETY: getters are only installed on our Operation types.
    trampoline(|| f(unsafe { as_op(slf) }))
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn get_fileno(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    getter_of(slf, |op| py_uint(u64::from(op.fd)))
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn get_offset(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    getter_of(slf, |op| py_uint(op.offset))
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn get_nbytes(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    getter_of(slf, |op| {
        let tracks = match op.kind {
            OpKind::Read | OpKind::ReadV => true,
            OpKind::Write | OpKind::WriteV => op.flavor().nbytes_tracks_write,
            OpKind::Fsync | OpKind::Fdsync => false,
        };
        match u64::try_from(op.raw_result()) {
            Ok(done) if op.state() == OpState::Done && tracks => py_uint(done),
            _ => py_uint(op.nbytes),
        }
    })
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn get_payload(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    getter_of(slf, |op| {
        let state = op.state();
        if state == OpState::InFlight {
            return Err(in_flight_error("payload"));
        }
        if op.is_readinto() || op.kind.is_vectored() {
            return Ok(op.caller_obj.clone().unwrap_or_else(none));
        }
        match op.kind {
            OpKind::Read => {
                let bytes = match (&op.read_buf, state) {
                    (Some(b), OpState::Done) => b.clone(),
                    _ => zero_bytes(op.nbytes)?,
                };
                match op.flavor().read_payload {
                    ReadPayload::Bytes => Ok(bytes),
                    // SAFETY: attached; a `bytes` supports the buffer protocol.
                    ReadPayload::MemoryView => unsafe {
                        Owned::from_new(PyMemoryView_FromObject(bytes.as_ptr()))
                    },
                }
            }
            // The caller's object (thread_aio: until delivered).
            OpKind::Write if op.flavor().drop_write_payload && state == OpState::Done => Ok(none()),
            OpKind::Write | OpKind::ReadV | OpKind::WriteV => {
                Ok(op.caller_obj.clone().unwrap_or_else(none))
            }
            OpKind::Fsync | OpKind::Fdsync => Ok(none()),
        }
    })
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn get_borrows_buffer(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    getter_of(slf, |op| Ok(py_bool(op.borrows_buffer)))
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn get_result(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    getter_of(slf, |op| py_int(op.reported_result(op.raw_result())))
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn get_error(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    getter_of(slf, |op| py_int(i64::from(op.errno())))
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn get_context(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    getter_of(slf, |op| Ok(op.context_ref().unwrap_or_else(none)))
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn get_priority(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    getter_of(slf, |op| py_int(i64::from(op.priority)))
}

// ---------------------------------------------------------------------------
// slots

/// The address `repr` shows as `buffer=`: the read's data, or the write's
/// payload (read under the op's lock: a completion on another thread may
/// release the export at any time on free-threaded builds).
fn repr_buffer(op: &Operation) -> usize {
    match op.kind {
        OpKind::Read if !op.is_readinto() => op.read_data() as usize,
        OpKind::Read | OpKind::Write => {
            let _g = op.lock.lock();
            // SAFETY: `view` is read under `lock`, which `finish` holds
            // while it releases the export.
            unsafe { op.payload_ptr() as usize }
        }
        OpKind::ReadV | OpKind::WriteV => {
            let _g = op.lock.lock();
            // SAFETY: `vectored` is read under `lock`, which `finish` holds
            // while it takes the vector out.
            match unsafe { &*op.vectored.get() } {
                Some(v) => v.iovecs().0 as usize,
                None => 0,
            }
        }
        OpKind::Fsync | OpKind::Fdsync => 0,
    }
}

/// # Safety
/// A method, property or slot of an Operation type called by CPython: attached,
/// `slf` one of our Operations, the arguments CPython's.
unsafe extern "C" fn op_repr(slf: *mut PyObject) -> *mut PyObject {
    getter_of(slf, |op| {
        let fl = op.flavor();
        // SAFETY: `slf` is a live object (the op itself).
        let name = unsafe { Borrowed::from_ptr(slf) }.type_name();
        let offset = if fl.repr_offset_signed {
            op.offset_i64().to_string()
        } else {
            op.offset.to_string()
        };
        let buffer = match repr_buffer(op) {
            0 => "0x(nil)".to_owned(),
            b => format!("{:#x}", b),
        };
        let result = if fl.repr_result {
            format!(", result={}", op.reported_result(op.raw_result()))
        } else {
            String::new()
        };
        py_str(&format!(
            "<{} at {:#x}: mode=\"{}\", fd={}, offset={}{}, buffer={}>",
            name,
            slf as usize,
            op.mode(),
            op.fd,
            offset,
            result,
            buffer
        ))
    })
}

/// # Safety
/// CPython's `tp_traverse` of an Operation type: `slf` one of our Operations.
unsafe extern "C" fn op_traverse(slf: *mut PyObject, visit: visitproc, arg: *mut c_void) -> c_int {
    // Runs with the world stopped (free-threaded) or the GIL held; the spin
    // lock is never held across a point where that can happen, so the slots
    // are read without it.
    // SAFETY: `slf` is one of our Operations; the slots hold live objects
    // (or nothing), visited with the collector's callback.
    unsafe {
        let op = as_op(slf);
        if let Some(t) = &*op.target.get() {
            let r = t.visit(visit, arg);
            if r != 0 {
                return r;
            }
        }
        let r = visit_opt(&*op.context.get(), visit, arg);
        if r != 0 {
            return r;
        }
        let exporter = (*op.view.get()).obj;
        if !exporter.is_null() {
            let r = visit(exporter, arg);
            if r != 0 {
                return r;
            }
        }
        let r = visit_opt(&op.caller_obj, visit, arg);
        if r != 0 {
            return r;
        }
        if let Some(v) = &*op.vectored.get() {
            for exporter in v.exporters() {
                let r = visit(exporter, arg);
                if r != 0 {
                    return r;
                }
            }
        }
        visit(Py_TYPE(slf).cast(), arg)
    }
}

/// # Safety
/// CPython's `tp_clear` of an Operation type: attached, `slf` one of our
/// (unreachable) Operations.
unsafe extern "C" fn op_clear(slf: *mut PyObject) -> c_int {
    trampoline_int(|| {
        // Only the callback can close a cycle through the op (its context
        // reference is held on behalf of the engine while in flight).
        // SAFETY: `slf` is one of our Operations.
        drop(unsafe { as_op(slf) }.take_slots());
        Ok(())
    })
}

/// # Safety
/// CPython's `tp_dealloc` of an Operation type: attached, the last reference to
/// `slf` is gone.
unsafe extern "C" fn op_dealloc(slf: *mut PyObject) {
    trampoline_void(|| {
        // SAFETY: CPython deallocates one of our Operations: the last
        // reference is gone, so nothing else can reach it (not even an
        // engine: engines hold a reference while in flight) and it may be
        // torn down through `&mut`.
        unsafe {
            PyObject_GC_UnTrack(slf.cast());
            let op = &mut *slf.cast::<Operation>();
            if !op.weakreflist.is_null() {
                PyObject_ClearWeakRefs(slf);
            }
            drop(op.take_slots());
            if !(*op.view.get()).obj.is_null() {
                PyBuffer_Release(op.view.get());
            }
            drop(op.read_buf.take());
            drop(op.caller_obj.take());
            drop((*op.vectored.get()).take());
            op.free_bounce();
            let tp = Py_TYPE(slf);
            if let Some(free) = (*tp).tp_free {
                free(slf.cast());
            }
            Py_DECREF(tp.cast());
        }
    })
}

// ---------------------------------------------------------------------------
// the type

fn type_spec(fl: &'static Flavor) -> TypeSpec {
    let mut t = TypeSpec::new(
        fl.type_name,
        std::mem::size_of::<Operation>(),
        Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    )
    .doc(fl.doc)
    .dealloc(op_dealloc)
    .traverse(op_traverse)
    .clear(op_clear)
    .repr(op_repr)
    .weaklist_offset(std::mem::offset_of!(Operation, weakreflist))
    .method(fastcall(
        c"read",
        op_read,
        METH_CLASS,
        c"read($type, nbytes, fd, offset=0, priority=0)\n--\n\nA read of nbytes at offset.",
    ))
    .method(fastcall(
        c"write",
        op_write,
        METH_CLASS,
        c"write($type, payload_bytes, fd, offset=0, priority=0)\n--\n\nA write of payload_bytes (any \
C-contiguous buffer, used in place) at offset.",
    ))
    .method(fastcall(
        c"readinto",
        op_readinto,
        METH_CLASS,
        c"readinto($type, buffer, fd, offset=0, priority=0)\n--\n\nA read into buffer (a writable \
C-contiguous buffer: bytearray, memoryview, mmap, array) at offset, without copying. get_value() \
is the number of bytes read. The buffer export is held until the operation completes.",
    ))
    .method(fastcall(
        c"readv",
        op_readv,
        METH_CLASS,
        c"readv($type, buffers, fd, offset=0, priority=0)\n--\n\nOne vectored read (preadv) into \
buffers (a sequence of at most 1024 writable C-contiguous buffers, filled in order) at offset. \
get_value() is the number of bytes read.",
    ))
    .method(fastcall(
        c"writev",
        op_writev,
        METH_CLASS,
        c"writev($type, buffers, fd, offset=0, priority=0)\n--\n\nOne vectored write (pwritev) of \
buffers (a sequence of at most 1024 C-contiguous buffers, in order) at offset. get_value() is the \
number of bytes written.",
    ))
    .method(fastcall(
        c"fsync",
        op_fsync,
        METH_CLASS,
        c"fsync($type, fd, priority=0)\n--\n\nAn fsync of fd.",
    ))
    .method(fastcall(
        c"fdsync",
        op_fdsync,
        METH_CLASS,
        c"fdsync($type, fd, priority=0)\n--\n\nAn fdatasync of fd (fsync where unavailable).",
    ))
    .method(fastcall(
        c"get_value",
        op_get_value,
        0,
        c"get_value($self)\n--\n\nbytes for a read, bytes written for a write, None for syncs; raises the operation's error.",
    ))
    .method(fastcall(
        c"set_callback",
        op_set_callback,
        0,
        if fl.callback_keyword {
            c"set_callback($self, callback)\n--\n\nCalled once with the result when the completion is delivered."
        } else {
            c"set_callback($self, callback, /)\n--\n\nCalled once with the result when the completion is delivered."
        },
    ))
    .method(onearg(
        c"_set_future",
        op_set_future,
        c"_set_future($self, future, /)\n--\n\nResolve future (set_result(True) unless done) on delivery \
instead of calling a callback. For asyncio adapters whose completions are delivered on the loop thread.",
    ))
    .getter(c"fileno", get_fileno, c"file descriptor")
    .getter(c"offset", get_offset, c"file offset")
    .getter(
        c"nbytes",
        get_nbytes,
        c"requested (or, once done, transferred) byte count",
    )
    .getter(c"payload", get_payload, c"read buffer or write payload")
    .getter(
        c"_borrows_buffer",
        get_borrows_buffer,
        c"whether the engine uses memory the caller may change (the Python awaiting path waits for the engine on cancel)",
    );
    if fl.has_result_error {
        t = t
            .getter(c"result", get_result, c"raw result once done")
            .getter(c"error", get_error, c"errno once done (0 on success)");
    }
    if fl.has_context {
        t = t.getter(c"context", get_context, c"the Context while in flight");
    }
    if fl.has_priority {
        t = t.getter(c"priority", get_priority, c"request priority");
    }
    t
}

/// Creates the Operation heap type of a backend module.
///
/// # Safety
/// Caller attached; `module` is the module being initialised.
pub unsafe fn create_type(module: *mut PyObject, fl: &'static Flavor) -> PyResult<Owned> {
    // One spec per flavor (module re-imports reuse it).
    static SPECS: SpecCache = SpecCache::new();
    let spec = SPECS.get_or_build(std::ptr::from_ref(fl) as usize, || type_spec(fl));
    // SAFETY: attached, `module` valid (caller's contract); the spec's
    // functions match their slots.
    unsafe { spec.create(module) }
}

/// Whether `obj` is an Operation of this module (`op_type`).
///
/// # Safety
/// `obj` must be a live object.
#[inline]
pub unsafe fn is_op(obj: *mut PyObject, op_type: *mut PyObject) -> bool {
    // SAFETY: a live object has a type (caller's contract).
    unsafe { Py_TYPE(obj) }.cast::<PyObject>() == op_type
}
