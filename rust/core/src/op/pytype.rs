//! The Python side of `Operation`: the class-method constructors (`read`,
//! `write`, `fsync`, `fdsync`) and their Rust twins, the properties,
//! `get_value`, `set_callback`, `repr`, GC support and the type itself.

use std::ffi::{c_int, c_void};
use std::ptr;

use pyo3_ffi::*;

use super::lifecycle::{set_callback, set_future};
use super::{as_op, buffer, Flavor, OpKind, OpState, Operation, ReadPayload};
use crate::args::{fd_arg, int_in, Params};
use crate::module::ModState;
use crate::num::{low_u16, low_u64, usize_sat};
use crate::py::typespec::{fastcall, onearg};
use crate::py::{
    none, py_bool, py_int, py_str, py_uint, ssize, trampoline, trampoline_int, trampoline_void,
    visit_opt, Borrowed, Exc, Owned, PyErr, PyResult, SpecCache, TypeSpec,
};

// ---------------------------------------------------------------------------
// construction

/// A fresh op of type `cls` (zeroed by `tp_alloc`: every slot empty, state
/// `New`).
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`].
unsafe fn new_op(
    cls: *mut PyObject,
    kind: OpKind,
    fd: u32,
    offset: u64,
    priority: u16,
) -> PyResult<Owned> {
    let tp = cls.cast::<PyTypeObject>();
    // SAFETY: `cls` is one of our Operation types (caller's contract):
    // `tp_alloc` returns a zeroed instance of `size_of::<Operation>()`
    // bytes, which nothing else references yet, so it may be written
    // through `&mut`.
    unsafe {
        let alloc = (*tp).tp_alloc.unwrap_or(PyType_GenericAlloc);
        let obj = Owned::from_new(alloc(tp, 0))?;
        let op = &mut *obj.as_ptr().cast::<Operation>();
        op.flavor = (*ModState::of_type(tp)).flavor;
        op.kind = kind;
        op.fd = fd;
        op.offset = offset;
        op.priority = priority;
        (*op.io.get()).offset = offset;
        Ok(obj)
    }
}

/// The parsed `fd`, `offset` and `priority` arguments.
fn common_args(
    fl: &Flavor,
    fd: Borrowed<'_>,
    offset: Option<Borrowed<'_>>,
    priority: Option<Borrowed<'_>>,
) -> PyResult<(u32, u64, u16)> {
    let fd = fd_arg(fd)?;
    let offset = match offset {
        // In range (flavor bounds lie within −2⁶³ … 2⁶⁴−1): the raw 64 bits.
        Some(o) => low_u64(int_in(o, "offset", fl.offset_min, fl.offset_max)?),
        None => 0,
    };
    let priority = match priority {
        // In range (−2¹⁵ … 2¹⁶−1): the raw 16 bits.
        Some(p) => low_u16(int_in(p, "priority", fl.priority_min, fl.priority_max)?),
        None => 0,
    };
    Ok((fd, offset, priority))
}

/// The flavor of an Operation type.
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`].
unsafe fn flavor_of_type(cls: *mut PyObject) -> &'static Flavor {
    // SAFETY: the module state of our type holds its `&'static Flavor`
    // (set by `init_common` before the type was created).
    unsafe { &*(*ModState::of_type(cls.cast())).flavor }
}

static READ_PARAMS: Params = Params {
    fname: "read",
    names: &["nbytes", "fd", "offset", "priority"],
    required: 2,
    keywords: true,
};
static WRITE_PARAMS: Params = Params {
    fname: "write",
    names: &["payload_bytes", "fd", "offset", "priority"],
    required: 2,
    keywords: true,
};
static FSYNC_PARAMS: Params = Params {
    fname: "fsync",
    names: &["fd", "priority"],
    required: 1,
    keywords: true,
};
static FDSYNC_PARAMS: Params = Params {
    fname: "fdsync",
    names: &["fd", "priority"],
    required: 1,
    keywords: true,
};

/// # Safety
/// A class method of an Operation type called by CPython: attached, `cls` one
/// of our Operation types, the arguments CPython's vectorcall.
unsafe extern "C" fn op_read(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: CPython's vectorcall arguments; `cls` is the class the
        // classmethod is bound to (one of our Operation types).
        unsafe {
            let [n, fd, off, prio] = READ_PARAMS.parse::<4>(args, nargs, kw)?.0;
            new_read(cls, Params::req(n)?, Params::req(fd)?, off, prio)
        }
    })
}

/// `cls.read(nbytes, fd, offset, priority)` for Rust callers (`cls` is a
/// backend's Operation type); `None` = the parameter's default.
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`].
pub unsafe fn new_read(
    cls: *mut PyObject,
    nbytes: Borrowed<'_>,
    fd: Borrowed<'_>,
    offset: Option<Borrowed<'_>>,
    priority: Option<Borrowed<'_>>,
) -> PyResult<Owned> {
    // SAFETY: forwarded contract.
    let fl = unsafe { flavor_of_type(cls) };
    let nbytes = crate::args::to_i128(nbytes, "nbytes")?;
    let nbytes = match u64::try_from(nbytes) {
        Ok(n) if n <= fl.max_read => n,
        _ => return Err(PyErr::overflow(fl.max_read_msg)),
    };
    let (fd, offset, priority) = common_args(fl, fd, offset, priority)?;
    // Uninitialised on purpose: a full read overwrites it, and `finish`
    // zeroes whatever was not filled, so stale heap bytes are never seen.
    // SAFETY: attached; NULL data with a size allocates an uninitialised
    // `bytes` (max_read keeps the size within Py_ssize_t).
    let buf = unsafe {
        Owned::from_new(PyBytes_FromStringAndSize(
            ptr::null(),
            ssize(usize_sat(nbytes)),
        ))?
    };
    // SAFETY: forwarded contract.
    let obj = unsafe { new_op(cls, OpKind::Read, fd, offset, priority)? };
    // SAFETY: a fresh op nobody else references yet.
    unsafe {
        let op = &mut *obj.as_ptr().cast::<Operation>();
        op.nbytes = nbytes;
        op.read_buf = Some(buf);
        op.reset_io();
    }
    Ok(obj)
}

/// # Safety
/// A class method of an Operation type called by CPython: attached, `cls` one
/// of our Operation types, the arguments CPython's vectorcall.
unsafe extern "C" fn op_write(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: CPython's vectorcall arguments; `cls` is one of our
        // Operation types.
        unsafe {
            let [p, fd, off, prio] = WRITE_PARAMS.parse::<4>(args, nargs, kw)?.0;
            new_write(cls, Params::req(p)?, Params::req(fd)?, off, prio)
        }
    })
}

static READINTO_PARAMS: Params = Params {
    fname: "readinto",
    names: &["buffer", "fd", "offset", "priority"],
    required: 2,
    keywords: true,
};

/// # Safety
/// A class method of an Operation type called by CPython: attached, `cls` one
/// of our Operation types, the arguments CPython's vectorcall.
unsafe extern "C" fn op_readinto(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: CPython's vectorcall arguments; `cls` is one of our
        // Operation types.
        unsafe {
            let [b, fd, off, prio] = READINTO_PARAMS.parse::<4>(args, nargs, kw)?.0;
            new_readinto(cls, Params::req(b)?, Params::req(fd)?, off, prio)
        }
    })
}

/// `cls.write(payload_bytes, fd, offset, priority)` for Rust callers.
/// The payload is any C-contiguous buffer (DESIGN.md §3.4), used in place.
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`].
pub unsafe fn new_write(
    cls: *mut PyObject,
    payload: Borrowed<'_>,
    fd: Borrowed<'_>,
    offset: Option<Borrowed<'_>>,
    priority: Option<Borrowed<'_>>,
) -> PyResult<Owned> {
    // SAFETY: forwarded contract.
    unsafe { new_borrowing(cls, OpKind::Write, payload, fd, offset, priority) }
}

/// `cls.readinto(buffer, fd, offset, priority)` for Rust callers: a read
/// into the caller's writable C-contiguous buffer.
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`].
pub unsafe fn new_readinto(
    cls: *mut PyObject,
    buffer: Borrowed<'_>,
    fd: Borrowed<'_>,
    offset: Option<Borrowed<'_>>,
    priority: Option<Borrowed<'_>>,
) -> PyResult<Owned> {
    // SAFETY: forwarded contract.
    unsafe { new_borrowing(cls, OpKind::Read, buffer, fd, offset, priority) }
}

/// A write from, or a read into, the caller's object `obj`: its buffer
/// export is held from here until completion (or the op's death).
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`].
unsafe fn new_borrowing(
    cls: *mut PyObject,
    kind: OpKind,
    obj: Borrowed<'_>,
    fd: Borrowed<'_>,
    offset: Option<Borrowed<'_>>,
    priority: Option<Borrowed<'_>>,
) -> PyResult<Owned> {
    // SAFETY: forwarded contract.
    let fl = unsafe { flavor_of_type(cls) };
    let (access, what) = match kind {
        OpKind::Write => (buffer::Access::Payload, "payload_bytes"),
        _ => (buffer::Access::Target, "buffer"),
    };
    // The buffer first: upstream checked the payload before the integers.
    // SAFETY: all-zero is a valid (empty) `Py_buffer`, a plain C struct.
    let mut view: Py_buffer = unsafe { std::mem::zeroed() };
    // SAFETY: attached; `view` is a local empty `Py_buffer`.
    unsafe { buffer::export(obj, &raw mut view, access, what)? };
    let len = u64::try_from(view.len).unwrap_or(0);
    let checked = common_args(fl, fd, offset, priority).and_then(|a| {
        if kind == OpKind::Read && len > fl.max_read {
            return Err(PyErr::overflow(fl.max_read_msg));
        }
        Ok(a)
    });
    // SAFETY: forwarded contract.
    let made = checked
        .and_then(|(fd, offset, priority)| unsafe { new_op(cls, kind, fd, offset, priority) });
    let obj_ref = obj.to_owned();
    let op_obj = match made {
        Ok(o) => o,
        Err(e) => {
            // SAFETY: the export taken above, released once.
            unsafe { PyBuffer_Release(&raw mut view) };
            return Err(e);
        }
    };
    // SAFETY: a fresh op nobody else references yet; its `view` is empty
    // and takes over the export.
    unsafe {
        let op = &mut *op_obj.as_ptr().cast::<Operation>();
        *op.view.get() = view;
        op.nbytes = len;
        // `bytes` (and subclasses) cannot change under the engine; anything
        // else is the caller's mutable memory.
        op.borrows_buffer = kind == OpKind::Read || PyBytes_Check(obj.as_ptr()) == 0;
        op.caller_obj = Some(obj_ref);
        op.reset_io();
    }
    Ok(op_obj)
}

static READV_PARAMS: Params = Params {
    fname: "readv",
    names: &["buffers", "fd", "offset", "priority"],
    required: 2,
    keywords: true,
};
static WRITEV_PARAMS: Params = Params {
    fname: "writev",
    names: &["buffers", "fd", "offset", "priority"],
    required: 2,
    keywords: true,
};

/// # Safety
/// CPython's vectorcall arguments; `cls` one of our Operation types.
unsafe fn vectored_op(
    cls: *mut PyObject,
    kind: OpKind,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> PyResult<Owned> {
    let params = if kind == OpKind::ReadV {
        &READV_PARAMS
    } else {
        &WRITEV_PARAMS
    };
    // SAFETY: forwarded contract.
    unsafe {
        let [b, fd, off, prio] = params.parse::<4>(args, nargs, kw)?.0;
        new_vectored(cls, kind, Params::req(b)?, Params::req(fd)?, off, prio)
    }
}

/// # Safety
/// A class method of an Operation type called by CPython: attached, `cls` one
/// of our Operation types, the arguments CPython's vectorcall.
unsafe extern "C" fn op_readv(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    // SAFETY: called by CPython as a classmethod of our Operation type.
    trampoline(|| unsafe { vectored_op(cls, OpKind::ReadV, args, nargs, kw) })
}

/// # Safety
/// A class method of an Operation type called by CPython: attached, `cls` one
/// of our Operation types, the arguments CPython's vectorcall.
unsafe extern "C" fn op_writev(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    // SAFETY: called by CPython as a classmethod of our Operation type.
    trampoline(|| unsafe { vectored_op(cls, OpKind::WriteV, args, nargs, kw) })
}

/// `cls.readv(buffers, fd, offset, priority)` / `cls.writev(...)` for Rust
/// callers: one vectored transfer of the caller's buffers (a sequence of
/// C-contiguous buffers, writable for `readv`; at most
/// [`super::vectored::IOV_MAX`]).
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`];
/// `kind` is `ReadV` or `WriteV`.
pub unsafe fn new_vectored(
    cls: *mut PyObject,
    kind: OpKind,
    buffers: Borrowed<'_>,
    fd: Borrowed<'_>,
    offset: Option<Borrowed<'_>>,
    priority: Option<Borrowed<'_>>,
) -> PyResult<Owned> {
    debug_assert!(kind.is_vectored());
    // SAFETY: forwarded contract.
    let fl = unsafe { flavor_of_type(cls) };
    let access = if kind == OpKind::ReadV {
        buffer::Access::Target
    } else {
        buffer::Access::Payload
    };
    // SAFETY: attached.
    let (v, total) = unsafe { super::vectored::Vectored::export(buffers, access, "buffers")? };
    let limit = if kind == OpKind::ReadV {
        fl.max_read
    } else {
        isize::MAX as u64
    };
    if total > limit {
        return Err(PyErr::overflow(
            "the buffers' total length exceeds the read limit",
        ));
    }
    let (fd, offset, priority) = common_args(fl, fd, offset, priority)?;
    // SAFETY: forwarded contract.
    let obj = unsafe { new_op(cls, kind, fd, offset, priority)? };
    // SAFETY: a fresh op nobody else references yet.
    unsafe {
        let op = &mut *obj.as_ptr().cast::<Operation>();
        *op.vectored.get() = Some(Box::new(v));
        op.nbytes = total;
        op.borrows_buffer = true;
        op.caller_obj = Some(buffers.to_owned());
        op.reset_io();
    }
    Ok(obj)
}

/// `cls.fsync(fd)` / `cls.fdsync(fd)` for Rust callers.
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`].
pub unsafe fn new_sync(
    cls: *mut PyObject,
    kind: OpKind,
    fd: Borrowed<'_>,
    priority: Option<Borrowed<'_>>,
) -> PyResult<Owned> {
    debug_assert!(matches!(kind, OpKind::Fsync | OpKind::Fdsync));
    // SAFETY: forwarded contract.
    let fl = unsafe { flavor_of_type(cls) };
    let (fd, _, priority) = common_args(fl, fd, None, priority)?;
    // SAFETY: forwarded contract.
    unsafe { new_op(cls, kind, fd, 0, priority) }
}

/// # Safety
/// CPython's vectorcall arguments; `cls` one of our Operation types.
unsafe fn sync_op(
    cls: *mut PyObject,
    params: &Params,
    kind: OpKind,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> PyResult<Owned> {
    // SAFETY: forwarded contract.
    unsafe {
        let [fd, prio] = params.parse::<2>(args, nargs, kw)?.0;
        new_sync(cls, kind, Params::req(fd)?, prio)
    }
}

/// # Safety
/// A class method of an Operation type called by CPython: attached, `cls` one
/// of our Operation types, the arguments CPython's vectorcall.
unsafe extern "C" fn op_fsync(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    // SAFETY: called by CPython as a classmethod of our Operation type.
    trampoline(|| unsafe { sync_op(cls, &FSYNC_PARAMS, OpKind::Fsync, args, nargs, kw) })
}

/// # Safety
/// A class method of an Operation type called by CPython: attached, `cls` one
/// of our Operation types, the arguments CPython's vectorcall.
unsafe extern "C" fn op_fdsync(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    // SAFETY: called by CPython as a classmethod of our Operation type.
    trampoline(|| unsafe { sync_op(cls, &FDSYNC_PARAMS, OpKind::Fdsync, args, nargs, kw) })
}

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
