//! The Python type `caio.linux_aio.Context`: its object layout, `__new__`
//! and deallocation, the methods, properties and docstrings. Each method
//! parses and checks its arguments, then calls the engine (`engine`,
//! `submit`, `reap`); the messages of the errors it raises are here.

use std::ffi::{c_void, CStr};
use std::ptr;
use std::sync::atomic::Ordering;

use caio_core::args::{int_in, Params};
use caio_core::module::{ContextType, ModState};
use caio_core::op::{self, as_op};
use caio_core::py::{
    none, py_int, py_str, py_uint, trampoline, trampoline_void, Borrowed, Exc, Owned, PyErr,
    PyResult,
};
use caio_core::pyo3_ffi::*;
use caio_core::sys;

use crate::adapter;
use crate::engine::{closed_error, read_counter, AioContext};
use crate::reap::DEFAULT_EVENTS;
use crate::submit::submit_ops;

/// `Context(max_requests=0)` means this many.
const DEFAULT_MAX_REQUESTS: u32 = 32;
/// The largest `process_events(max_requests=…)`.
const MAX_EVENTS: usize = 1 << 20;

/// The Python object: a plain (non-GC) object with a weak-reference list and
/// the engine state.
#[repr(C)]
struct Context {
    ob_base: PyObject,
    weakreflist: *mut PyObject,
    inner: AioContext,
}

/// The engine state of Context `p`.
pub(crate) unsafe fn ctx<'a>(p: *mut PyObject) -> &'a AioContext {
    &(*(p as *const Context)).inner
}

static NEW_PARAMS: Params = Params {
    fname: "Context",
    names: &["max_requests"],
    required: 0,
    keywords: true,
};

unsafe extern "C" fn ctx_new(
    tp: *mut PyTypeObject,
    args: *mut PyObject,
    kwargs: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let a = NEW_PARAMS.parse_tuple::<1>(args, kwargs)?;
        let max_requests = match a.get(0) {
            Some(o) => int_in(o, "max_requests", 0, u32::MAX as i128)? as u32,
            None => 0,
        };
        let max_requests = if max_requests == 0 {
            DEFAULT_MAX_REQUESTS
        } else {
            max_requests
        };
        let engine = AioContext::open(max_requests)?;
        let alloc = (*tp).tp_alloc.unwrap_or(PyType_GenericAlloc);
        let obj = match Owned::from_new(alloc(tp, 0)) {
            Ok(o) => o,
            Err(e) => {
                engine.abandon();
                return Err(e);
            }
        };
        let c = obj.as_ptr() as *mut Context;
        ptr::addr_of_mut!((*c).inner).write(engine);
        Ok(obj)
    })
}

unsafe extern "C" fn ctx_dealloc(slf: *mut PyObject) {
    trampoline_void(|| {
        let c = ctx(slf);
        if !(*(slf as *mut Context)).weakreflist.is_null() {
            PyObject_ClearWeakRefs(slf);
        }
        // Every in-flight op holds a reference to its Context: nothing is in
        // flight here, so the kernel holds no pointer into our memory.
        let released = {
            let mut h = c.write();
            (h.queue.is_some() || h.aio != 0).then(|| c.release_locked(&mut h))
        };
        if let Some(r) = released {
            r.finish();
        }
        // A deferred batch whose flush never ran (its loop was closed).
        adapter::drop_staged(c);
        ptr::drop_in_place(ptr::addr_of_mut!((*(slf as *mut Context)).inner));
        let tp = Py_TYPE(slf);
        if let Some(free) = (*tp).tp_free {
            free(slf.cast());
        }
        Py_DECREF(tp.cast());
    })
}

unsafe fn check_types(slf: *mut PyObject, args: &[*mut PyObject]) -> PyResult<()> {
    let op_type = (*ModState::of(slf)).op_type;
    for (i, &a) in args.iter().enumerate() {
        if !op::is_op(a, op_type) {
            return Err(PyErr::type_error(format!(
                "Wrong type for argument {} -> {}: expected linux_aio.Operation",
                i,
                Borrowed::from_ptr(a).repr()
            )));
        }
    }
    Ok(())
}

unsafe extern "C" fn ctx_submit(
    slf: *mut PyObject,
    args: *mut *mut PyObject,
    nargsf: Py_ssize_t,
) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        let nargs = PyVectorcall_NARGS(nargsf as usize) as usize;
        let args = std::slice::from_raw_parts(args, nargs);
        check_types(slf, args)?;
        if args.is_empty() {
            return py_int(0);
        }
        let (n, failure) = submit_ops(slf, c, args, None)?;
        match failure {
            // Like io_submit: an error only when nothing was accepted.
            Some((_, e)) if n == 0 => Err(e),
            _ => py_int(n as i64),
        }
    })
}

/// Turns an error into an exception instance (for `_submit_each`).
pub(crate) unsafe fn exception_object(e: PyErr) -> PyResult<Owned> {
    e.restore();
    #[cfg(Py_3_12)]
    {
        Owned::from_new(PyErr_GetRaisedException())
    }
    #[cfg(not(Py_3_12))]
    {
        let mut t = ptr::null_mut();
        let mut v = ptr::null_mut();
        let mut tb = ptr::null_mut();
        PyErr_Fetch(&mut t, &mut v, &mut tb);
        PyErr_NormalizeException(&mut t, &mut v, &mut tb);
        if !tb.is_null() {
            if !v.is_null() {
                PyException_SetTraceback(v, tb);
            }
            Py_DECREF(tb);
        }
        if !t.is_null() {
            Py_DECREF(t);
        }
        Owned::from_new(v)
    }
}

/// `_submit_each(*ops) -> list`: submits as many ops as possible, one
/// outcome per argument: `True` accepted, `False` not accepted because the op
/// was already submitted (or listed twice), or the exception that refused
/// it. A refused op does not hold back the ones after it (they are
/// resubmitted). What the asyncio adapter's `deferred=True` flush does
/// natively (`adapter::flush`), for event-loop integrations in Python.
unsafe extern "C" fn ctx_submit_each(
    slf: *mut PyObject,
    args: *mut *mut PyObject,
    nargsf: Py_ssize_t,
) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        let nargs = PyVectorcall_NARGS(nargsf as usize) as usize;
        let args = std::slice::from_raw_parts(args, nargs);
        check_types(slf, args)?;
        let mut outcome: Vec<Option<Owned>> = (0..nargs).map(|_| None).collect();
        let mut accepted = Vec::new();
        let mut start = 0;
        while start < nargs {
            accepted.clear();
            let (_, failure) = submit_ops(slf, c, &args[start..], Some(&mut accepted))?;
            for &i in &accepted {
                outcome[start + i] = Some(Owned::from_borrowed(Py_True()));
            }
            match failure {
                Some((i, e)) => {
                    outcome[start + i] = Some(exception_object(e)?);
                    start += i + 1;
                }
                None => break,
            }
        }
        let list = Owned::from_new(PyList_New(nargs as Py_ssize_t))?;
        for (i, o) in outcome.into_iter().enumerate() {
            let item = o.unwrap_or_else(|| Owned::from_borrowed(Py_False()));
            PyList_SET_ITEM(list.as_ptr(), i as Py_ssize_t, item.into_ptr());
        }
        Ok(list)
    })
}
static PE_PARAMS: Params = Params {
    fname: "process_events",
    names: &["max_requests", "min_requests", "timeout"],
    required: 0,
    keywords: true,
};

unsafe extern "C" fn ctx_process_events(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        let a = PE_PARAMS.parse::<3>(args, nargs, kw)?;
        let max = match a.get(0) {
            Some(o) => int_in(o, "max_requests", 0, u32::MAX as i128)? as usize,
            None => 0,
        };
        let max = if max == 0 { DEFAULT_EVENTS } else { max };
        if max > MAX_EVENTS {
            return Err(PyErr::overflow(format!(
                "max_requests ({}) exceeds the maximum allowed ({})",
                max, MAX_EVENTS
            )));
        }
        let min = match a.get(1) {
            Some(o) => int_in(o, "min_requests", 0, u32::MAX as i128)? as usize,
            None => 0,
        };
        if min > max {
            return Err(PyErr::value_error(format!(
                "min_requests ({}) must not exceed max_requests ({})",
                min, max
            )));
        }
        let timeout = match a.get(2) {
            Some(o) => int_in(o, "timeout", i32::MIN as i128, i32::MAX as i128)? as i32,
            None => 0,
        };
        c.check_fork()?;
        let n = c.wait_and_deliver(max, min, timeout)?;
        py_int(n as i64)
    })
}

/// `_drain()`: what the asyncio adapter's reader callback does (natively,
/// `adapter::loop_events`) — reset the eventfd counter, then deliver
/// everything available.
unsafe extern "C" fn ctx_drain(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        c.check_fork()?;
        py_int(c.drain() as i64)
    })
}

/// `_reap()`: deliver what is available now without touching the eventfd
/// (what the asyncio adapter does natively right after a submission:
/// page-cache hits completed inside io_submit are delivered at once).
unsafe extern "C" fn ctx_reap(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        c.check_fork()?;
        py_int(c.deliver(DEFAULT_EVENTS) as i64)
    })
}

unsafe extern "C" fn ctx_poll(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        c.check_fork()?;
        let h = c.read();
        let Some(q) = h.queue.as_ref() else {
            return Err(closed_error());
        };
        match read_counter(q.fileno()) {
            Ok(0) => {
                PyErr_SetNone(PyExc_BlockingIOError);
                Err(PyErr::Fetched)
            }
            Ok(v) => py_uint(v),
            Err(e) => Err(PyErr::os(e)),
        }
    })
}

static CANCEL_PARAMS: Params = Params {
    fname: "cancel",
    names: &["operation"],
    required: 1,
    keywords: true,
};

unsafe extern "C" fn ctx_cancel(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        let a = CANCEL_PARAMS.parse::<1>(args, nargs, kw)?;
        let obj = a.get(0).unwrap();
        let op_type = (*ModState::of(slf)).op_type;
        if !op::is_op(obj.as_ptr(), op_type) {
            return Err(PyErr::type_error(format!(
                "cancel() argument must be linux_aio.Operation, not {}",
                obj.type_name()
            )));
        }
        c.check_fork()?;
        let Some(outcome) = c.cancel(as_op(obj.as_ptr())) else {
            // Released only once nothing was in flight: the op cannot be.
            return Err(PyErr::value_error(
                "The operation is not in flight on this Context: it is closed [EINVAL]",
            ));
        };
        match outcome {
            // Started (EINPROGRESS on current kernels): the op completes
            // (-ECANCELED) through process_events().
            Ok(()) => py_int(0),
            Err(libc::EINPROGRESS) => py_int(0),
            Err(libc::EAGAIN) => Err(PyErr::ErrnoMsg(
                Exc::SystemError,
                libc::EAGAIN,
                "Specified operation was not canceled [EAGAIN]".to_owned(),
            )),
            Err(libc::EFAULT) => Err(PyErr::runtime(
                "One of the data structures points to invalid data [EFAULT]",
            )),
            Err(libc::EINVAL) => Err(PyErr::value_error(
                "The operation cannot be canceled [EINVAL]: it is not in flight in the kernel \
on this Context (never submitted, already completed, handled by a worker thread or submitted \
to another Context), or it is regular-file I/O, which the kernel cannot cancel",
            )),
            Err(libc::ENOSYS) => Err(PyErr::new(
                Exc::NotImplementedError,
                "io_cancel is not implemented by this kernel [ENOSYS]",
            )),
            Err(e) => Err(PyErr::ErrnoMsg(
                Exc::SystemError,
                e,
                format!("io_cancel failed: {}", sys::strerror(e)),
            )),
        }
    })
}

/// `_set_nowait(flag)`: event-loop mode on/off (see the module docs).
unsafe extern "C" fn ctx_set_nowait(slf: *mut PyObject, flag: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let on = caio_core::args::truthy(Borrowed::from_ptr(flag))?;
        ctx(slf).nowait.store(on, Ordering::Relaxed);
        Ok(none())
    })
}

unsafe extern "C" fn ctx_close(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        c.closing.store(true, Ordering::Release);
        c.release_if_idle();
        Ok(none())
    })
}

unsafe extern "C" fn ctx_repr(slf: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        let aio = c.read().aio;
        py_str(&format!(
            "<Context as {:#x}: max_requests={}, ctx={}{}>",
            slf as usize,
            c.max_requests,
            c.aio_id,
            if aio == 0 { ", closed" } else { "" }
        ))
    })
}

unsafe extern "C" fn get_max_requests(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_int(ctx(slf).max_requests as i64))
}

unsafe extern "C" fn get_fileno(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_int(ctx(slf).fileno.load(Ordering::Relaxed) as i64))
}

unsafe extern "C" fn get_closed(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| {
        Ok(Owned::from_borrowed(
            if ctx(slf).closing.load(Ordering::Acquire) {
                Py_True()
            } else {
                Py_False()
            },
        ))
    })
}

unsafe extern "C" fn get_in_flight(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_int(ctx(slf).in_flight.load(Ordering::Acquire) as i64))
}

unsafe extern "C" fn get_staged(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_int(ctx(slf).lock_staged().len() as i64))
}

static mut CTX_METHODS: [PyMethodDef; 10] = [
    PyMethodDef {
        ml_name: c"submit".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunctionFast: ctx_submit,
        },
        ml_flags: METH_FASTCALL,
        ml_doc: c"submit(*operations) -> int\n--\n\nSubmit operations in one io_submit call; returns how \
many were accepted (a prefix: the rest are untouched and can be resubmitted). Raises if the first \
one is refused."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"cancel".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunctionFastWithKeywords: ctx_cancel,
        },
        ml_flags: METH_FASTCALL | METH_KEYWORDS,
        ml_doc: c"cancel(operation) -> int\n--\n\nio_cancel(): returns 0 when the kernel started the \
cancellation (the op then completes through process_events()); raises ValueError when it cannot \
(regular-file I/O never can)."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"process_events".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunctionFastWithKeywords: ctx_process_events,
        },
        ml_flags: METH_FASTCALL | METH_KEYWORDS,
        ml_doc: c"process_events(max_requests=512, min_requests=0, timeout=0) -> int\n--\n\nDeliver up \
to max_requests completions (callbacks run here). With min_requests > 0 and timeout != 0, first \
wait (GIL released) until min_requests are available or timeout seconds pass (timeout < 0: no \
limit). Returns the number delivered."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"poll".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunction: ctx_poll,
        },
        ml_flags: METH_NOARGS,
        ml_doc: c"poll() -> int\n--\n\nRead and reset the eventfd counter (completion notifications \
since the last read); BlockingIOError if there were none. Never blocks, delivers nothing."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"close".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunction: ctx_close,
        },
        ml_flags: METH_NOARGS,
        ml_doc: c"close()\n--\n\nStop accepting operations and release the kernel AIO context (its \
share of fs.aio-nr), the eventfd and the worker threads: now if nothing is in flight, otherwise \
as soon as process_events() has delivered the last completion. Idempotent. (Not in upstream caio.)"
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"_drain".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunction: ctx_drain,
        },
        ml_flags: METH_NOARGS,
        ml_doc: c"_drain() -> int\n--\n\nReset the eventfd counter and deliver every available \
completion (what the asyncio adapter's reader callback does)."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"_reap".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunction: ctx_reap,
        },
        ml_flags: METH_NOARGS,
        ml_doc: c"_reap() -> int\n--\n\nDeliver the completions available now (up to 512) without \
reading the eventfd (what the asyncio adapter does right after submitting)."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"_submit_each".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunctionFast: ctx_submit_each,
        },
        ml_flags: METH_FASTCALL,
        ml_doc: c"_submit_each(*operations) -> list\n--\n\nSubmit as many operations as possible; one \
outcome per argument: True (accepted), False (already submitted) or the exception that refused \
it (what the asyncio adapter's deferred=True flush does)."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"_set_nowait".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunction: ctx_set_nowait,
        },
        ml_flags: METH_O,
        ml_doc: c"_set_nowait(flag)\n--\n\nEvent-loop mode: submit buffered reads/writes with \
RWF_NOWAIT so io_submit never waits for the disk; operations the kernel refuses (or only partly \
does) are finished by worker threads, and still delivered by process_events() on this thread. \
Off by default (upstream semantics: buffered I/O completes inside submit()). The asyncio adapter \
turns it on."
            .as_ptr(),
    },
    PyMethodDef::zeroed(),
];

static mut CTX_GETSET: [PyGetSetDef; 6] = [
    PyGetSetDef {
        name: c"max_requests".as_ptr(),
        get: Some(get_max_requests),
        set: None,
        doc: c"the size requested from io_setup".as_ptr(),
        closure: ptr::null_mut(),
    },
    PyGetSetDef {
        name: c"fileno".as_ptr(),
        get: Some(get_fileno),
        set: None,
        doc: c"the eventfd signalled on completions (-1 once closed)".as_ptr(),
        closure: ptr::null_mut(),
    },
    PyGetSetDef {
        name: c"closed".as_ptr(),
        get: Some(get_closed),
        set: None,
        doc: c"close() was called".as_ptr(),
        closure: ptr::null_mut(),
    },
    PyGetSetDef {
        name: c"_in_flight".as_ptr(),
        get: Some(get_in_flight),
        set: None,
        doc: c"operations accepted and not yet delivered".as_ptr(),
        closure: ptr::null_mut(),
    },
    PyGetSetDef {
        name: c"_staged".as_ptr(),
        get: Some(get_staged),
        set: None,
        doc: c"operations waiting in the asyncio adapter's deferred batch".as_ptr(),
        closure: ptr::null_mut(),
    },
    PyGetSetDef {
        name: ptr::null(),
        get: None,
        set: None,
        doc: ptr::null(),
        closure: ptr::null_mut(),
    },
];

/// The Context type's docstring (text signature first).
const CTX_DOC: &CStr =
    c"Context(max_requests=32)\n--\n\n linux aio context representation \n\nA kernel AIO \
context (io_setup) plus an eventfd (fileno) signalled on completions.\n\nDifferences from upstream \
caio: callbacks receive the signed kernel result (bytes moved, or -errno); close() releases the \
kernel context deterministically; O_DIRECT works (reads at any offset/length through aligned \
memory; writes need offset and length aligned to the file's O_DIRECT alignment, else OSError \
EINVAL); out-of-range integer arguments raise OverflowError instead of wrapping.";

/// What `caio_core::module::init_common` needs to create the type.
pub(crate) fn context_type() -> ContextType {
    ContextType {
        doc: CTX_DOC,
        basicsize: std::mem::size_of::<Context>(),
        weaklistoffset: std::mem::offset_of!(Context, weakreflist),
        new: ctx_new,
        dealloc: ctx_dealloc,
        repr: ctx_repr,
        methods: ptr::addr_of_mut!(CTX_METHODS).cast(),
        getset: ptr::addr_of_mut!(CTX_GETSET).cast(),
    }
}
