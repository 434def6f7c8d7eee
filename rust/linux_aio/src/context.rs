//! The Python type `caio.linux_aio.Context`: its state's constructor and
//! release (core's `ContextObject` is the object), the methods, properties
//! and docstrings. Each method
//! parses and checks its arguments, then calls the engine (`engine`,
//! `submit`, `reap`); the messages of the errors it raises are here.

use std::ffi::CStr;
use std::sync::atomic::Ordering;

use caio_core::args::{int_as, Args, Params};
use caio_core::context::{check_ops, ContextObject, ContextState};
use caio_core::fork::Stamp;
use caio_core::module::ModState;
use caio_core::op::{self, as_op};
use caio_core::py::{
    none, py_bool, py_int, py_uint, py_usize, Borrowed, Exc, Owned, PyErr, PyResult, TypeSpec,
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

/// The engine state is the Context's (`caio_core::context::ContextObject`).
impl ContextState for AioContext {
    /// `Context(max_requests=32)`.
    unsafe fn new(args: *mut PyObject, kwargs: *mut PyObject) -> PyResult<AioContext> {
        // SAFETY: CPython passes the argument tuple and keyword dict.
        let a = unsafe { NEW_PARAMS.parse_tuple::<1>(args, kwargs) }?;
        let max_requests = match u32_arg(a.get(0), "max_requests")? {
            0 => DEFAULT_MAX_REQUESTS,
            n => n,
        };
        // SAFETY: attached (the trait's contract).
        unsafe { AioContext::open(max_requests) }
    }

    const FORKED: &'static str = "this linux_aio Context was created before fork(): its kernel \
AIO context belongs to the parent process; create a new Context in the child";

    fn born(&self) -> Stamp {
        self.born
    }

    fn not_an_operation(i: usize, arg: Borrowed<'_>) -> String {
        format!(
            "Wrong type for argument {i} -> {}: expected linux_aio.Operation",
            arg.repr()
        )
    }

    fn repr(&self, slf: *mut PyObject) -> PyResult<String> {
        let aio = self.read().aio;
        Ok(format!(
            "<Context as {:#x}: max_requests={}, ctx={}{}>",
            slf as usize,
            self.max_requests,
            self.aio_id,
            if aio == 0 { ", closed" } else { "" }
        ))
    }

    /// Releases what is left. Every in-flight op holds a reference to its
    /// Context: nothing is in flight here, so the kernel holds no pointer
    /// into our memory.
    unsafe fn release(&self) {
        let released = {
            let mut h = self.write();
            (h.queue.is_some() || h.aio != 0).then(|| self.release_locked(&mut h))
        };
        if let Some(r) = released {
            r.finish();
        }
        // A deferred batch whose flush never ran (its loop was closed).
        // SAFETY: attached (the trait's contract).
        unsafe { adapter::drop_staged(self) };
    }

    /// Its kernel context goes to the destroyer.
    fn abandon(self) {
        AioContext::abandon(self);
    }
}

/// The engine state of Context `p`.
///
/// # Safety
/// `p` is a live linux_aio Context that `__new__` finished initialising,
/// and the reference is not used after the object's deallocation began
/// (see `ContextObject::state`).
pub(crate) unsafe fn ctx<'a>(p: *mut PyObject) -> &'a AioContext {
    // SAFETY: forwarded contract.
    unsafe { ContextObject::<AioContext>::state(p) }
}

// Every `ctx_*`/`get_*` function below is a method or getter of the Context
// type (made one by `caio_core::method!`/`getter!`). Their common safety
// contract, which CPython's calling convention guarantees: the calling
// thread is attached, `slf` is a live Context (initialised by `__new__`)
// and the arguments are what the method's kind promises. The `SAFETY`
// comments below refer to it as "the slot contract".

/// An optional argument in `0..=u32::MAX` (0 when absent).
fn u32_arg(arg: Option<Borrowed<'_>>, name: &str) -> PyResult<u32> {
    let Some(o) = arg else {
        return Ok(0);
    };
    int_as(o, name, 0, u32::MAX)
}

static NEW_PARAMS: Params = Params::new("Context", &["max_requests"], 0);

/// `Context.submit(*operations) -> int` (METH_FASTCALL).
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_submit(slf: *mut PyObject, args: &[*mut PyObject]) -> PyResult<Owned> {
    // SAFETY: the slot contract: `slf` a live Context, `args` holds
    // `nargs` valid objects for the call.
    let c = unsafe { ctx(slf) };
    // SAFETY: attached, `slf` our Context, `args` valid.
    unsafe { check_ops(slf, args, AioContext::not_an_operation) }?;
    if args.is_empty() {
        return py_usize(0);
    }
    // SAFETY: attached, `c` is `slf`'s engine, every argument is an
    // Operation (checked above).
    let (n, failure) = unsafe { submit_ops(slf, c, args, None) }?;
    match failure {
        // Like io_submit: an error only when nothing was accepted.
        Some((_, e)) if n == 0 => Err(e),
        _ => py_usize(n),
    }
}

/// `_submit_each(*ops) -> list`: submits as many ops as possible, one
/// outcome per argument: `True` accepted, `False` not accepted because the op
/// was already submitted (or listed twice), or the exception that refused
/// it. A refused op does not hold back the ones after it (they are
/// resubmitted). What the asyncio adapter's `deferred=True` flush does
/// natively (`adapter::flush`), for event-loop integrations in Python.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_submit_each(slf: *mut PyObject, args: &[*mut PyObject]) -> PyResult<Owned> {
    // SAFETY: the slot contract: `slf` a live Context, `args` holds
    // `nargs` valid objects for the call.
    let c = unsafe { ctx(slf) };
    let nargs = args.len();
    // SAFETY: attached, `slf` our Context, `args` valid.
    unsafe { check_ops(slf, args, AioContext::not_an_operation) }?;
    let mut outcome: Vec<Option<Owned>> = (0..nargs).map(|_| None).collect();
    let mut accepted = Vec::new();
    let mut start = 0;
    while start < nargs {
        accepted.clear();
        // SAFETY: attached, `c` is `slf`'s engine, every argument is an
        // Operation (checked above).
        let (_, failure) = unsafe { submit_ops(slf, c, &args[start..], Some(&mut accepted)) }?;
        for &i in &accepted {
            outcome[start + i] = Some(py_bool(true));
        }
        match failure {
            Some((i, e)) => {
                // Attached, no exception set (`e` is not raised).
                outcome[start + i] = Some(e.into_instance()?);
                start += i + 1;
            }
            None => break,
        }
    }
    let len = Py_ssize_t::try_from(nargs).map_err(|_| PyErr::overflow("too many arguments"))?;
    // SAFETY: attached; a new list of `len` NULL slots.
    let list = unsafe { Owned::from_new(PyList_New(len)) }?;
    for (i, o) in (0..len).zip(outcome) {
        let item = o.unwrap_or_else(|| py_bool(false));
        // SAFETY: filling slot `i` (< len) of the brand-new list, which
        // takes over the reference.
        unsafe { PyList_SET_ITEM(list.as_ptr(), i, item.into_ptr()) };
    }
    Ok(list)
}

static PE_PARAMS: Params = Params::new(
    "process_events",
    &["max_requests", "min_requests", "timeout"],
    0,
);

/// `Context.process_events(max_requests=512, min_requests=0, timeout=0)`.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_process_events(slf: *mut PyObject, a: Args<'_, 3>) -> PyResult<Owned> {
    // SAFETY: the method's contract.
    let c = unsafe { ctx(slf) };
    let max = match u32_arg(a.get(0), "max_requests")? as usize {
        0 => DEFAULT_EVENTS,
        n => n,
    };
    if max > MAX_EVENTS {
        return Err(PyErr::overflow(format!(
            "max_requests ({}) exceeds the maximum allowed ({})",
            max, MAX_EVENTS
        )));
    }
    let min = u32_arg(a.get(1), "min_requests")? as usize;
    if min > max {
        return Err(PyErr::value_error(format!(
            "min_requests ({}) must not exceed max_requests ({})",
            min, max
        )));
    }
    let timeout = match a.get(2) {
        Some(o) => int_as(o, "timeout", i32::MIN, i32::MAX)?,
        None => 0,
    };
    c.check_fork()?;
    // SAFETY: attached (the slot contract).
    let n = unsafe { c.wait_and_deliver(max, min, timeout) }?;
    py_usize(n)
}

/// `_drain()`: what the asyncio adapter's reader callback does (natively,
/// `adapter::loop_events`) — reset the eventfd counter, then deliver
/// everything available.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_drain(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: the slot contract.
    let c = unsafe { ctx(slf) };
    c.check_fork()?;
    // SAFETY: attached (the slot contract).
    py_usize(unsafe { c.drain() })
}

/// `_reap()`: deliver what is available now without touching the eventfd
/// (what the asyncio adapter does natively right after a submission:
/// page-cache hits completed inside io_submit are delivered at once).
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_reap(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: the slot contract.
    let c = unsafe { ctx(slf) };
    c.check_fork()?;
    // SAFETY: attached (the slot contract).
    py_usize(unsafe { c.deliver(DEFAULT_EVENTS) })
}

/// `Context.poll()`: read and reset the eventfd counter.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_poll(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: the slot contract.
    let c = unsafe { ctx(slf) };
    c.check_fork()?;
    let h = c.read();
    let Some(q) = h.queue.as_ref() else {
        return Err(closed_error());
    };
    match read_counter(q.fileno()) {
        Ok(0) => {
            // SAFETY: attached; a builtin exception class.
            unsafe { PyErr_SetNone(PyExc_BlockingIOError) };
            Err(PyErr::Fetched)
        }
        Ok(v) => py_uint(v),
        Err(e) => Err(PyErr::os(e)),
    }
}

static CANCEL_PARAMS: Params = Params::new("cancel", &["operation"], 1);

/// `Context.cancel(operation)`: `io_cancel`.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_cancel(slf: *mut PyObject, a: Args<'_, 1>) -> PyResult<Owned> {
    // SAFETY: the method's contract.
    let c = unsafe { ctx(slf) };
    let Some(obj) = a.get(0) else {
        // `required: 1`: the parser has already refused a missing one.
        return Err(PyErr::type_error(
            "cancel() missing required argument 'operation'",
        ));
    };
    // SAFETY: `slf` is our module's instance, so its module state is
    // ours; `obj` is a valid object for the call.
    let op = unsafe {
        let op_type = (*ModState::of(slf)).op_type;
        op::is_op(obj.as_ptr(), op_type).then(|| as_op(obj.as_ptr()))
    };
    let Some(op) = op else {
        return Err(PyErr::type_error(format!(
            "cancel() argument must be linux_aio.Operation, not {}",
            obj.type_name()
        )));
    };
    c.check_fork()?;
    let Some(outcome) = c.cancel(op) else {
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
}

/// `_set_nowait(flag)`: event-loop mode on/off (see the module docs).
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_set_nowait(slf: *mut PyObject, flag: Borrowed<'_>) -> PyResult<Owned> {
    // SAFETY: the slot contract: `slf` a live Context, `flag` valid.
    let c = unsafe { ctx(slf) };
    let on = caio_core::args::truthy(flag)?;
    c.nowait.store(on, Ordering::Relaxed);
    Ok(none())
}

/// `Context.close()`.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_close(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: the slot contract.
    let c = unsafe { ctx(slf) };
    c.closing.store(true, Ordering::Release);
    c.release_if_idle();
    Ok(none())
}

/// Getter of `Context.max_requests`.
///
/// # Safety
/// A Context getter (`caio_core::getter!`): attached, `slf` a live
/// Context.
unsafe fn get_max_requests(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: the slot contract.
    let c = unsafe { ctx(slf) };
    py_uint(u64::from(c.max_requests))
}

/// Getter of `Context.fileno`.
///
/// # Safety
/// A Context getter (`caio_core::getter!`): attached, `slf` a live
/// Context.
unsafe fn get_fileno(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: the slot contract.
    let c = unsafe { ctx(slf) };
    py_int(i64::from(c.fileno.load(Ordering::Relaxed)))
}

/// Getter of `Context.closed`.
///
/// # Safety
/// A Context getter (`caio_core::getter!`): attached, `slf` a live
/// Context.
unsafe fn get_closed(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: the slot contract.
    let c = unsafe { ctx(slf) };
    Ok(py_bool(c.closing.load(Ordering::Acquire)))
}

/// Getter of `Context._in_flight`.
///
/// # Safety
/// A Context getter (`caio_core::getter!`): attached, `slf` a live
/// Context.
unsafe fn get_in_flight(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: the slot contract.
    let c = unsafe { ctx(slf) };
    py_usize(c.in_flight.load(Ordering::Acquire))
}

/// Getter of `Context._staged`.
///
/// # Safety
/// A Context getter (`caio_core::getter!`): attached, `slf` a live
/// Context.
unsafe fn get_staged(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: the slot contract.
    let c = unsafe { ctx(slf) };
    py_usize(c.lock_staged().len())
}

/// The Context type: core's common shape plus this backend's methods and
/// properties (`caio_core::module::init_common` creates it).
pub(crate) fn context_spec() -> TypeSpec {
    ContextObject::<AioContext>::spec(CTX_DOC)
    .method(caio_core::method!(
        varargs c"submit",
        ctx_submit,
        c"submit($self, *operations)\n--\n\nSubmit operations in one io_submit call; returns how \
many were accepted (a prefix: the rest are untouched and can be resubmitted). Raises if the first \
one is refused.",
    ))
    .method(caio_core::method!(
        params c"cancel",
        ctx_cancel,
        CANCEL_PARAMS,
        c"cancel($self, operation)\n--\n\nio_cancel(): returns 0 when the kernel started the \
cancellation (the op then completes through process_events()); raises ValueError when it cannot \
(regular-file I/O never can).",
    ))
    .method(caio_core::method!(
        params c"process_events",
        ctx_process_events,
        PE_PARAMS,
        c"process_events($self, max_requests=512, min_requests=0, timeout=0)\n--\n\nDeliver up \
to max_requests completions (callbacks run here). With min_requests > 0 and timeout != 0, first \
wait (GIL released) until min_requests are available or timeout seconds pass (timeout < 0: no \
limit). Returns the number delivered.",
    ))
    .method(caio_core::method!(
        noargs c"poll",
        ctx_poll,
        c"poll($self)\n--\n\nRead and reset the eventfd counter (completion notifications \
since the last read) and return it; BlockingIOError if there were none. Never blocks, delivers nothing.",
    ))
    .method(caio_core::method!(
        noargs c"close",
        ctx_close,
        c"close($self)\n--\n\nStop accepting operations and release the kernel AIO context (its \
share of fs.aio-nr), the eventfd and the worker threads: now if nothing is in flight, otherwise \
as soon as process_events() has delivered the last completion. Idempotent. (Not in upstream caio.)",
    ))
    .method(caio_core::method!(
        noargs c"_drain",
        ctx_drain,
        c"_drain($self)\n--\n\nReset the eventfd counter and deliver every available \
completion (what the asyncio adapter's reader callback does). Returns the number delivered.",
    ))
    .method(caio_core::method!(
        noargs c"_reap",
        ctx_reap,
        c"_reap($self)\n--\n\nDeliver the completions available now (up to 512) without \
reading the eventfd (what the asyncio adapter does right after submitting). Returns the number \
delivered.",
    ))
    .method(caio_core::method!(
        varargs c"_submit_each",
        ctx_submit_each,
        c"_submit_each($self, *operations)\n--\n\nSubmit as many operations as possible; returns \
a list of one outcome per argument: True (accepted), False (already submitted) or the exception that refused \
it (what the asyncio adapter's deferred=True flush does).",
    ))
    .method(caio_core::method!(
        onearg c"_set_nowait",
        ctx_set_nowait,
        c"_set_nowait($self, flag, /)\n--\n\nEvent-loop mode: submit buffered reads/writes with \
RWF_NOWAIT so io_submit never waits for the disk; operations the kernel refuses (or only partly \
does) are finished by worker threads, and still delivered by process_events() on this thread. \
Off by default (upstream semantics: buffered I/O completes inside submit()). The asyncio adapter \
turns it on.",
    ))
    .getter(
        c"max_requests",
        caio_core::getter!(get_max_requests),
        c"the size requested from io_setup",
    )
    .getter(
        c"fileno",
        caio_core::getter!(get_fileno),
        c"the eventfd signalled on completions (-1 once closed)",
    )
    .getter(c"closed", caio_core::getter!(get_closed), c"close() was called")
    .getter(
        c"_in_flight",
        caio_core::getter!(get_in_flight),
        c"operations accepted and not yet delivered",
    )
    .getter(
        c"_staged",
        caio_core::getter!(get_staged),
        c"operations waiting in the asyncio adapter's deferred batch",
    )
}

/// The Context type's docstring (text signature first).
const CTX_DOC: &CStr =
    c"Context(max_requests=32)\n--\n\n linux aio context representation \n\nA kernel AIO \
context (io_setup) plus an eventfd (fileno) signalled on completions.\n\nDifferences from upstream \
caio: callbacks receive the signed kernel result (bytes moved, or -errno); close() releases the \
kernel context deterministically; O_DIRECT works (reads at any offset/length through aligned \
memory; writes need offset and length aligned to the file's O_DIRECT alignment, else OSError \
EINVAL); out-of-range integer arguments raise OverflowError instead of wrapping.";
