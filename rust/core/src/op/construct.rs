//! The class-method constructors of `Operation` (`read`, `write`, `fsync`,
//! `fdsync`, `readinto`, `readv`, `writev`) and their Rust twins: argument
//! parsing and validation (DESIGN.md §3.2), the op's initial state.

use std::ptr;

use pyo3_ffi::*;

use super::{buffer, Flavor, OpKind, Operation};
use crate::args::{fd_arg, int_in, Params};
use crate::module::ModState;
use crate::num::{low_u16, low_u64, usize_sat};
use crate::py::{ssize, trampoline, Borrowed, Owned, PyErr, PyResult};

// ---------------------------------------------------------------------------
// construction

/// A fresh op of type `cls` (zeroed by `tp_alloc`: every slot empty, state
/// `New`).
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`](super::create_type).
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
/// Attached; `cls` is an Operation type created by [`create_type`](super::create_type).
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

/// [`new_read`], [`new_write`] or [`new_readinto`]: `(cls, object, fd,
/// offset, priority)`.
pub type OneBufferCtor = unsafe fn(
    *mut PyObject,
    Borrowed<'_>,
    Borrowed<'_>,
    Option<Borrowed<'_>>,
    Option<Borrowed<'_>>,
) -> PyResult<Owned>;

/// `read`, `write` or `readinto` from CPython's vectorcall arguments:
/// `(object, fd, offset, priority)` parsed with `params` (the class method's
/// or an adapter method's), the op built by `ctor` on `cls`.
///
/// # Safety
/// Attached; `cls` is an Operation type created by
/// [`create_type`](super::create_type); the arguments are CPython's vectorcall.
pub unsafe fn one_buffer(
    cls: *mut PyObject,
    params: &Params,
    ctor: OneBufferCtor,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> PyResult<Owned> {
    // SAFETY: forwarded contract.
    unsafe {
        let [obj, fd, off, prio] = params.parse::<4>(args, nargs, kw)?.0;
        ctor(cls, Params::req(obj)?, Params::req(fd)?, off, prio)
    }
}

/// # Safety
/// A class method of an Operation type called by CPython: attached, `cls` one
/// of our Operation types, the arguments CPython's vectorcall.
pub(super) unsafe extern "C" fn op_read(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: CPython's vectorcall arguments; `cls` is the class the
        // classmethod is bound to (one of our Operation types).
        unsafe { one_buffer(cls, &READ_PARAMS, new_read, args, nargs, kw) }
    })
}

/// `cls.read(nbytes, fd, offset, priority)` for Rust callers (`cls` is a
/// backend's Operation type); `None` = the parameter's default.
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`](super::create_type).
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
pub(super) unsafe extern "C" fn op_write(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: CPython's vectorcall arguments; `cls` is one of our
        // Operation types.
        unsafe { one_buffer(cls, &WRITE_PARAMS, new_write, args, nargs, kw) }
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
pub(super) unsafe extern "C" fn op_readinto(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: CPython's vectorcall arguments; `cls` is one of our
        // Operation types.
        unsafe { one_buffer(cls, &READINTO_PARAMS, new_readinto, args, nargs, kw) }
    })
}

/// `cls.write(payload_bytes, fd, offset, priority)` for Rust callers.
/// The payload is any C-contiguous buffer (DESIGN.md §3.4), used in place.
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`](super::create_type).
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
/// Attached; `cls` is an Operation type created by [`create_type`](super::create_type).
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
/// Attached; `cls` is an Operation type created by [`create_type`](super::create_type).
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
        op.slow_copy_distance = kind == OpKind::Read
            && crate::sys::distance::needs_scratch(op.read_data(), usize_sat(len), op.offset);
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
pub(super) unsafe extern "C" fn op_readv(
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
pub(super) unsafe extern "C" fn op_writev(
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
/// Attached; `cls` is an Operation type created by [`create_type`](super::create_type);
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
/// Attached; `cls` is an Operation type created by [`create_type`](super::create_type).
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
pub(super) unsafe extern "C" fn op_fsync(
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
pub(super) unsafe extern "C" fn op_fdsync(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    // SAFETY: called by CPython as a classmethod of our Operation type.
    trampoline(|| unsafe { sync_op(cls, &FDSYNC_PARAMS, OpKind::Fdsync, args, nargs, kw) })
}
