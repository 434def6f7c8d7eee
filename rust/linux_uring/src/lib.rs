//! `caio.linux_uring`: asynchronous file I/O on io_uring.
//!
//! `Context.submit()` only stages SQEs (no system call); `flush()` enters the
//! kernel and delivers whatever completed inline; later completions signal
//! the ring's eventfd (`fileno`) and are delivered by `process_events()` —
//! or, under asyncio, straight from the event loop (see `adapter`).
//!
//! This file holds the module (its Operation flavour and initialisation) and
//! the Python `Context` type; `ring` is the io_uring engine behind a
//! Context, `direct` its O_DIRECT policy, `adapter` the engine hooks of the
//! native asyncio fast path and `probe` the import-time availability check.
//!
//! Linux only: on other targets the crate is empty (so `cargo build
//! --workspace` works everywhere; setup.py builds it on Linux only).
#![cfg(target_os = "linux")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use caio_core::args::{int_as, positional, truthy, Args, Params};
use caio_core::backend_module;
use caio_core::context::{check_ops, ContextObject, ContextState};
use caio_core::fork::Stamp;
use caio_core::module::{add_object, init_common};
use caio_core::op::{self, as_op, Delivery, Flavor, ReadPayload};
use caio_core::py::{
    allow_threads, py_bool, py_int, py_uint, py_usize, Borrowed, Exc, Owned, PyErr, PyResult,
    TypeSpec,
};
use caio_core::pyo3_ffi::*;

mod adapter;
mod close;
mod direct;
mod pathring;
mod probe;
mod ring;
mod route;
mod spare;
mod workers;

use close::{Engines, RingSlot, RingUse};
use ring::{Ring, SetupError};
use workers::Workers;

/// The module's Operation type (`caio_core::op`), as linux_uring has it.
static FLAVOR: Flavor = Flavor {
    type_name: c"linux_uring.Operation",
    doc: c"io_uring AIO operation",
    read_payload: ReadPayload::Bytes,
    // DESIGN.md §3.2: a read larger than 2**32-1 bytes cannot be expressed in an SQE.
    max_read: u32::MAX as u64,
    max_read_msg: "nbytes exceeds the io_uring read limit",
    // DESIGN.md §6.2 wrap: -1 (= 2**64-1, "current file position" for pipes) stays accepted;
    // other negative values would alias huge offsets and are refused.
    offset_min: -1,
    offset_max: u64::MAX as i128,
    callback_keyword: false,
    ..Flavor::COMMON
};

const DEFAULT_MAX_REQUESTS: u32 = 32;
const DEFAULT_EVENTS: u32 = 512;

/// The engine state of a Context (`caio_core::context::ContextObject`).
pub(crate) struct Context {
    max_requests: u32,
    born: Stamp,
    /// A `_deferred_flush` is scheduled on the event loop (asyncio adapter,
    /// `deferred=True`).
    pub(crate) flush_scheduled: AtomicBool,
    /// asyncio adapter (plain ring): the last submissions did not complete
    /// inline, so new ones are batched per loop iteration (one enter).
    pub(crate) batching: AtomicBool,
    /// Loop-delivery mode (`_enable_loop_delivery()`): `submit` routes each
    /// op as the asyncio adapter does (`route`), for the trio/anyio driver.
    loop_delivery: AtomicBool,
    /// The ring and the asyncio adapter's worker pool (which owns the
    /// eventfd they share), closable before the Context goes (`_close()`,
    /// see `close`).
    ring: RingSlot,
}

const CLOSED_MSG: &str = "this linux_uring Context is closed (its io_uring instance and eventfd \
were released): create a new one";

impl Context {
    /// Starts a use of the ring (every method and engine hook, on entry):
    /// `RuntimeError` in a forked child or once the Context is closed.
    pub(crate) fn enter(&self) -> PyResult<RingUse<'_>> {
        self.check_fork()?;
        self.ring.enter().ok_or_else(|| PyErr::runtime(CLOSED_MSG))
    }

    /// The ring. Only called inside a use taken by [`Context::enter`] (every
    /// method and engine hook takes one on entry), which keeps it from being
    /// released.
    pub(crate) fn ring(&self) -> &Ring {
        // SAFETY: see above: a use is alive.
        unsafe { &self.ring.get_unchecked().ring }
    }

    /// The asyncio adapter's worker pool (`workers`); the same rule as
    /// [`Context::ring`].
    pub(crate) fn workers(&self) -> &Workers {
        // SAFETY: see `ring`: a use is alive.
        unsafe { &self.ring.get_unchecked().workers }
    }

    /// Hands staged SQEs to the kernel; big batches with the GIL released.
    fn enter_staged(&self) -> std::io::Result<()> {
        if self.ring().big_enter() {
            allow_threads(|| self.ring().submit_staged())
        } else {
            self.ring().submit_staged()
        }
    }

    /// Hands staged SQEs to the kernel (raw API: a refusal raises
    /// `SystemError(errno)`, the SQEs stay staged for the next enter).
    pub(crate) fn submit_staged(&self) -> PyResult<()> {
        self.enter_staged().map_err(enter_error)
    }

    /// The asyncio adapter's submission. The ops are staged and claimed, so
    /// they will run with the next enter that succeeds: a refusal must not
    /// fail their awaitables (they would fail *and* run later). When the
    /// kernel asks to try again (`EAGAIN`, `EBUSY`: CQ overflow, `ENOMEM`,
    /// `EINTR`), the SQEs stay staged and the eventfd is made readable: the
    /// loop's reader sees staged SQEs and schedules the flush, which enters
    /// again (once per loop iteration until the kernel takes them); their
    /// awaitables just wait. Any other refusal means the ring itself is
    /// unusable (nothing staged on it will ever run): it is raised.
    pub(crate) fn submit_or_retry(&self) -> PyResult<()> {
        match self.enter_staged() {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::ENOMEM | libc::EINTR)
                ) =>
            {
                self.ring().poke_eventfd();
                Ok(())
            }
            Err(e) => Err(enter_error(e)),
        }
    }

    /// Drains up to `max` completions and runs their callbacks (after the
    /// CQ head was published). Returns how many were delivered.
    ///
    /// # Safety
    /// Attached (callbacks run here).
    pub(crate) unsafe fn deliver(&self, max: usize) -> usize {
        let mut out: Vec<Delivery> = Vec::new();
        // SAFETY: attached (this function's contract).
        let n = unsafe { self.ring().drain(max, &mut out) };
        for d in out {
            d.run();
        }
        n
    }

    /// The asyncio adapter's batch flush: enter with what was staged, deliver
    /// everything available, and if the whole batch completed inside this
    /// enter (page-cache hits) go back to one enter per operation (no
    /// suspension at all). An empty batch says nothing either way.
    ///
    /// # Safety
    /// Attached (callbacks run here).
    pub(crate) unsafe fn flush_batch(&self) -> PyResult<usize> {
        let mut batch = self.ring().take_recent();
        self.submit_or_retry()?;
        let mut out: Vec<Delivery> = Vec::new();
        // SAFETY: attached (this function's contract).
        let n = unsafe { self.ring().drain(usize::MAX, &mut out) };
        if !batch.is_empty() {
            batch.sort_unstable();
            let inline = out
                .iter()
                .filter(|d| batch.binary_search(&(d.op_ptr() as u64)).is_ok())
                .count();
            self.batching.store(inline < batch.len(), Ordering::Relaxed);
        }
        for d in out {
            d.run();
        }
        Ok(n)
    }

    /// `flush()` semantics: enter with the staged SQEs (or wake the SQ
    /// thread), then deliver everything available.
    ///
    /// # Safety
    /// Attached (callbacks run here).
    pub(crate) unsafe fn flush(&self) -> PyResult<usize> {
        if !self.ring().sqpoll && self.ring().staged() == 0 {
            // DESIGN.md §6.2 flush-empty: nothing staged, nothing looked at.
            return Ok(0);
        }
        self.submit_staged()?;
        // SAFETY: attached (this function's contract).
        Ok(unsafe { self.deliver(usize::MAX) })
    }
}

/// `io_uring_enter` refused: `SystemError(errno)`.
fn enter_error(e: std::io::Error) -> PyErr {
    PyErr::Errno(Exc::SystemError, e.raw_os_error().unwrap_or(libc::EIO))
}

/// Every in-flight op holds a reference to its Context, so nothing can
/// still be in flight at deallocation: no callback runs and no memory the
/// kernel might write is freed when the ring is dropped (which unmaps it and
/// closes its fds).
impl ContextState for Context {
    /// `Context(max_requests=32, sqpoll=False)`.
    unsafe fn new(args: *mut PyObject, kwargs: *mut PyObject) -> PyResult<Context> {
        // SAFETY: `args` and `kwargs` as CPython passes them to `tp_new`.
        let a = unsafe { NEW_PARAMS.parse_tuple::<2>(args, kwargs) }?;
        let mut max_requests = match a.get(0) {
            Some(o) => int_as(o, "max_requests", 0, u32::MAX)?,
            None => DEFAULT_MAX_REQUESTS,
        };
        if max_requests == 0 {
            max_requests = DEFAULT_MAX_REQUESTS;
        }
        let sqpoll = match a.get(1) {
            Some(o) => truthy(o)?,
            None => false,
        };
        // One spare entry: SQPOLL's lag and the cancel SQE of an op never
        // push a full `max_requests` load into "ring full".
        let workers = Workers::new()
            .map_err(|e| PyErr::Errno(Exc::SystemError, e.raw_os_error().unwrap_or(libc::EIO)))?;
        let ring = Ring::new(u64::from(max_requests) + 1, sqpoll, workers.eventfd())
            .map_err(|SetupError(errno)| PyErr::Errno(Exc::SystemError, errno))?;
        Ok(Context {
            max_requests,
            born: Stamp::now(),
            flush_scheduled: AtomicBool::new(false),
            batching: AtomicBool::new(false),
            loop_delivery: AtomicBool::new(false),
            ring: RingSlot::new(Engines { ring, workers }),
        })
    }

    const FORKED: &'static str = "this linux_uring Context was created in the parent process \
before fork(); its io_uring instance belongs to the parent and cannot be used here. Create a new \
Context (or AsyncioContext) in the child";

    fn born(&self) -> Stamp {
        self.born
    }

    /// Stops the adapter's worker threads, if it started any (and the ring
    /// is still open: `_close()` stopped them otherwise).
    unsafe fn release(&self) {
        if let Some(u) = self.ring.enter() {
            u.workers().release(!self.born.is_current());
        }
    }

    /// DESIGN.md §4.1: every argument is checked before anything is claimed.
    fn not_an_operation(i: usize, arg: Borrowed<'_>) -> String {
        format!(
            "argument {} is not an Operation: expected linux_uring.Operation, got {}",
            i + 1,
            arg.type_name()
        )
    }

    fn repr(&self, slf: *mut PyObject) -> PyResult<String> {
        let Some(_u) = self.ring.enter() else {
            return Ok(format!(
                "<Context as {:p}: max_requests={}, closed>",
                slf, self.max_requests
            ));
        };
        Ok(format!(
            "<Context as {:p}: max_requests={}, uring_fd={}, eventfd={}, sqpoll={}>",
            slf,
            self.max_requests,
            self.ring().ring_fd(),
            self.ring().eventfd(),
            i32::from(self.ring().sqpoll)
        ))
    }
}

/// The Context behind `p`.
///
/// # Safety
/// `p` is a live instance of this module's Context type that outlives `'a`
/// (see `ContextObject::state`).
pub(crate) unsafe fn ctx<'a>(p: *mut PyObject) -> &'a Context {
    // SAFETY: forwarded contract.
    unsafe { ContextObject::<Context>::state(p) }
}

static NEW_PARAMS: Params = Params::new("Context", &["max_requests", "sqpoll"], 0);

/// `Context.submit(*operations)` (`METH_FASTCALL`).
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_submit(slf: *mut PyObject, args: &[*mut PyObject]) -> PyResult<Owned> {
    // SAFETY: the method's contract.
    let c = unsafe { ContextObject::<Context>::submitting(slf, args) }?;
    let _u = c.enter()?;
    let (accepted, err) = if c.loop_delivery.load(Ordering::Relaxed) {
        // SAFETY: attached, inside the use above; every arg is one of this
        // module's Operations (checked above); `slf` is `c`.
        unsafe { submit_routed(c, slf, args) }?
    } else {
        // SAFETY: attached; every arg is one of this module's Operations
        // (checked above); `slf` owns this ring.
        unsafe { c.ring().stage(args, slf) }
    };
    match err {
        // SAFETY: attached; `slf` is a Context.
        Some(e) => Err(unsafe { e.into_pyerr(slf) }),
        None => py_usize(accepted),
    }
}

/// `submit` in loop-delivery mode: each op where `route` sends it — a
/// page-cache hit completes (its callback runs) right here, a worker's
/// result is delivered by `_process_loop_events`, the rest is staged for
/// `flush()`. Stops at the first op refused, as `Ring::stage` does (the ops
/// before it stay accepted).
///
/// # Safety
/// Attached, inside a use of the ring; every arg is one of this module's
/// Operations; `slf` is the Context `c`.
unsafe fn submit_routed(
    c: &Context,
    slf: *mut PyObject,
    args: &[*mut PyObject],
) -> PyResult<(usize, Option<ring::StageError>)> {
    let mut accepted = 0;
    for &op in args {
        // SAFETY: forwarded contract; no `deferred=True` here.
        let (n, err) = match unsafe { route::submit_off_ring(c, slf, op, false, false) }? {
            route::Routed::Done(ok) => (usize::from(ok), None),
            // SAFETY: forwarded contract; claimed and begun by
            // `submit_off_ring` when `claimed`, handed to no engine.
            route::Routed::Ring { claimed } => unsafe { route::stage(c, slf, op, claimed) },
        };
        accepted += n;
        if err.is_some() {
            return Ok((accepted, err));
        }
    }
    Ok((accepted, None))
}

/// `Context._enable_loop_delivery()`.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_enable_loop_delivery(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    let c = unsafe { ctx(slf) };
    let _u = c.enter()?;
    c.loop_delivery.store(true, Ordering::Relaxed);
    Ok(caio_core::py::none())
}

/// `Context.cancel(operation, *more)` (`METH_FASTCALL | METH_KEYWORDS`).
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_cancel(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> PyResult<Owned> {
    // SAFETY: the method's contract; `kwnames` is NULL or a
    // tuple.
    let (c, posargs, has_kw) = unsafe {
        (
            ctx(slf),
            positional(args, nargsf),
            !kwnames.is_null() && PyTuple_GET_SIZE(kwnames) > 0,
        )
    };
    // cancel(operation) as upstream, cancel(op1, op2, ...) as an extension.
    if has_kw {
        // SAFETY: the vectorcall arguments as CPython passed them.
        let a = unsafe { CANCEL_PARAMS.parse::<1>(args, nargsf, kwnames) }?;
        let op = a.get(0).unwrap().as_ptr();
        // SAFETY: attached; `slf` is `c`; `op` a live object.
        return unsafe { cancel_ops(c, slf, &[op]) };
    }
    if posargs.is_empty() {
        return Err(PyErr::type_error(
            "cancel() missing required argument 'operation' (pos 1)",
        ));
    }
    // SAFETY: attached; `slf` is `c`; the args are live objects.
    unsafe { cancel_ops(c, slf, posargs) }
}

static CANCEL_PARAMS: Params = Params::new("cancel", &["operation"], 1);

/// Asks the kernel to cancel those of `ops` that are in flight.
///
/// # Safety
/// Attached; `slf` is the Context `c`; `ops` are live objects.
unsafe fn cancel_ops(c: &Context, slf: *mut PyObject, ops: &[*mut PyObject]) -> PyResult<Owned> {
    // SAFETY: forwarded contract.
    unsafe {
        check_ops(slf, ops, |i, a| {
            format!(
                "argument {} must be linux_uring.Operation, not {}",
                i + 1,
                a.type_name()
            )
        })
    }?;
    let _u = c.enter()?;
    for &a in ops {
        // SAFETY: `a` is an Operation (checked above).
        let o = unsafe { as_op(a) };
        // Only an op in flight can be cancelled; for others (never
        // submitted, done, or on another Context) the kernel would answer
        // ENOENT anyway.
        if o.state() != op::OpState::InFlight {
            continue;
        }
        // SAFETY: attached, inside the use above; `a` is an Operation.
        if unsafe { route::cancel(c, a) }.is_err() {
            // SAFETY: attached; `slf` is a Context.
            return Err(unsafe {
                ring::ring_full_error(
                    slf,
                    "no room for the cancel request; flush() or process_events() and retry",
                )
            });
        }
    }
    py_int(0)
}

/// `Context.flush()`.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_flush(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    let c = unsafe { ctx(slf) };
    let _u = c.enter()?;
    // SAFETY: attached (contract above).
    py_usize(unsafe { c.flush() }?)
}

static EVENTS_PARAMS: Params = Params::new(
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
    // Upstream takes -1 as "2**32-1" (everything); other negative values
    // would alias and raise (DESIGN.md §6.2 wrap).
    let mut max = match a.get(0) {
        Some(o) => match int_as(o, "max_requests", -1, i64::from(u32::MAX))? {
            -1 => u32::MAX,
            v => u32::try_from(v).unwrap_or(u32::MAX),
        },
        None => DEFAULT_EVENTS,
    };
    if max == 0 {
        max = DEFAULT_EVENTS;
    }
    let min = match a.get(1) {
        Some(o) => int_as(o, "min_requests", 0, u32::MAX)?,
        None => 0,
    };
    let timeout = match a.get(2) {
        Some(o) => int_as(o, "timeout", i32::MIN, i32::MAX)?,
        None => 0,
    };
    if min > max {
        return Err(PyErr::value_error(format!(
            "min_requests ({}) must be <= max_requests ({})",
            min, max
        )));
    }
    // SAFETY: `slf` is a Context (contract above).
    let c = unsafe { ctx(slf) };
    let _u = c.enter()?;
    // u32 fits usize on every target we build for.
    let max = max as usize;
    // Delivered during the wait: an O_DIRECT EINVAL in the ring is only
    // retried by a drain.
    let mut delivered = 0usize;
    if min > 0 {
        if timeout == 0 {
            allow_threads(|| c.ring().get_events());
        } else {
            let start = c.ring().consumed();
            let deadline = if timeout > 0 {
                let secs = u64::from(timeout.unsigned_abs());
                Some(Instant::now() + Duration::from_secs(secs))
            } else {
                None
            };
            c.ring().wait(
                start,
                u64::from(min),
                deadline,
                &mut || {
                    // DESIGN.md §6.2 eintr: run Python signal handlers; an
                    // exception from one ends the wait, otherwise keep
                    // waiting.
                    // SAFETY: `wait` calls this attached.
                    if unsafe { PyErr_CheckSignals() } != 0 {
                        Err(PyErr::Fetched)
                    } else {
                        Ok(())
                    }
                },
                &mut || {
                    // SAFETY: `wait` calls this attached.
                    delivered += unsafe { c.deliver(max.saturating_sub(delivered)) };
                    Ok(())
                },
            )?;
        }
    }
    // SAFETY: attached (contract above).
    let n = unsafe { c.deliver(max.saturating_sub(delivered)) };
    py_usize(delivered + n)
}

/// `Context.poll()`.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_poll(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    let c = unsafe { ctx(slf) };
    let _u = c.enter()?;
    match c.ring().consume_eventfd() {
        0 => {
            // `BlockingIOError()` without arguments, as upstream and
            // linux_aio raise it (not `BlockingIOError('')`).
            // SAFETY: attached; a builtin exception class.
            unsafe { PyErr_SetNone(PyExc_BlockingIOError) };
            Err(PyErr::Fetched)
        }
        n => py_uint(n),
    }
}

/// The asyncio adapter's deferred flush: one `io_uring_enter` for every
/// SQE staged during the loop iteration, then delivery.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_deferred_flush(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    let c = unsafe { ctx(slf) };
    c.flush_scheduled.store(false, Ordering::Release);
    c.check_fork()?;
    let Some(_u) = c.ring.enter() else {
        // Scheduled before the adapter closed once idle: nothing is staged
        // on a closed ring (`_close` refuses while anything is).
        return py_usize(0);
    };
    // SAFETY: attached (contract above).
    py_usize(unsafe { c.flush_batch() }?)
}

/// The asyncio adapter's eventfd reader: reset the counter (EAGAIN is fine:
/// draining never depends on it) and deliver the whole batch.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_loop_events(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    let c = unsafe { ctx(slf) };
    let _u = c.enter()?;
    c.ring().consume_eventfd();
    // SAFETY: attached (contract above). The worker results of the asyncio
    // adapter's pool share the eventfd just consumed (`workers`).
    py_usize(unsafe { c.deliver(usize::MAX) + c.workers().deliver() })
}

/// `Context._close()` (the asyncio adapter's close once idle, DESIGN.md §5.6):
/// releases the io_uring instance and its eventfd now — or, when called
/// while a method of this Context runs (a drain's callback, another
/// thread), as soon as that method returns. Refused (`False`, nothing done)
/// while operations are staged or in flight: the kernel may still use their
/// memory and their completions must still be delivered. Afterwards every
/// method raises `RuntimeError`. True once closed (also when it already was).
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_close(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    let c = unsafe { ctx(slf) };
    let Some(u) = c.ring.enter() else {
        return Ok(py_bool(true));
    };
    if c.check_fork().is_err() {
        // An inherited Context: the parent's ring; the child's copy goes
        // with the object.
        return Ok(py_bool(false));
    }
    if u.in_flight() > 0 || u.workers().in_flight() > 0 {
        return Ok(py_bool(false));
    }
    // Idle: the pool's threads (if it started any) end now; the eventfd goes
    // with the slot.
    u.workers().release(false);
    c.ring.close();
    drop(u); // the ring is released here unless another use is running
    Ok(py_bool(true))
}

/// `Context.max_requests`.
///
/// # Safety
/// A Context getter (`caio_core::getter!`): attached, `slf` a live
/// Context.
unsafe fn get_max_requests(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    py_int(i64::from(unsafe { ctx(slf) }.max_requests))
}

/// `Context.fileno`.
///
/// # Safety
/// A Context getter (`caio_core::getter!`): attached, `slf` a live
/// Context.
unsafe fn get_fileno(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    let c = unsafe { ctx(slf) };
    let u = c.enter()?;
    py_int(i64::from(u.eventfd()))
}

/// `Context.sqpoll`: DESIGN.md §6.2 sqpoll-int, an int (what was negotiated), not a
/// bool.
///
/// # Safety
/// A Context getter (`caio_core::getter!`): attached, `slf` a live
/// Context.
unsafe fn get_sqpoll(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    let c = unsafe { ctx(slf) };
    let u = c.enter()?;
    py_int(i64::from(u.sqpoll))
}

/// The Context type: core's common shape plus this backend's methods and
/// properties (`caio_core::module::init_common` creates it).
fn context_spec() -> TypeSpec {
    ContextObject::<Context>::spec(CTX_DOC)
    .method(caio_core::method!(
        noargs c"_deferred_flush",
        ctx_deferred_flush,
        c"_deferred_flush($self)\n--\n\nasyncio adapter: submit everything staged and deliver. Returns the \
number delivered.",
    ))
    .method(caio_core::method!(
        noargs c"_close",
        ctx_close,
        c"_close($self)\n--\n\nasyncio adapter: release the ring and the eventfd now (or when the \
method running meanwhile returns) unless operations are in flight (then False, nothing done). \
Afterwards every method raises RuntimeError.",
    ))
    .method(caio_core::method!(
        noargs c"_enable_loop_delivery",
        ctx_enable_loop_delivery,
        c"_enable_loop_delivery($self)\n--\n\nFrom now on, submit() routes each operation as the \
asyncio adapter does: a read of at most 64 KiB is first tried from the page cache (a hit \
completes, its callback runs, inside submit()), buffered writes and fsyncs of regular files and \
mid-size reads go to worker threads, the rest is staged in the ring. Worker results signal the \
same eventfd (fileno) and are delivered by _process_loop_events(), not by process_events(); \
cancel() takes back a job no worker has started. Used by the trio and anyio adapters.",
    ))
    .method(caio_core::method!(
        noargs c"_process_loop_events",
        ctx_loop_events,
        c"_process_loop_events($self)\n--\n\nasyncio adapter: reset the eventfd and deliver every \
available completion. Returns the number delivered.",
    ))
    .method(caio_core::method!(
        varargs c"submit",
        ctx_submit,
        c"submit($self, *operations)\n--\n\nStage operations in the submission ring (no \
system call; flush() hands them to the kernel). Returns how many were newly accepted; raises \
CapacityError (an OverflowError and an OSError with errno EAGAIN) when the ring is full (the ops \
staged before stay staged).",
    ))
    .method(caio_core::method!(
        vectorcall c"cancel",
        ctx_cancel,
        c"cancel($self, operation, *more)\n--\n\nAsk the kernel to cancel in-flight \
operations (IORING_OP_ASYNC_CANCEL; everything staged is submitted along). A cancelled op \
completes with -ECANCELED through the normal delivery. Returns 0.",
    ))
    .method(caio_core::method!(
        noargs c"flush",
        ctx_flush,
        c"flush($self)\n--\n\nSubmit the staged operations (SQPOLL: wake the kernel \
thread if needed), then deliver every available completion. Returns the number delivered.",
    ))
    .method(caio_core::method!(
        params c"process_events",
        ctx_process_events,
        EVENTS_PARAMS,
        c"process_events($self, max_requests=512, min_requests=0, timeout=0)\n--\n\n\
Deliver up to max_requests completions. With min_requests > 0, first wait (GIL released) \
until that many completions became available since the call started, at most timeout \
seconds (negative: no limit). Signal handlers run during the wait. Returns the number \
delivered.",
    ))
    .method(caio_core::method!(
        noargs c"poll",
        ctx_poll,
        c"poll($self)\n--\n\nRead and reset the eventfd counter and return it \
(BlockingIOError when zero). Never blocks and never delivers completions.",
    ))
    .getter(c"max_requests", caio_core::getter!(get_max_requests), c"max_requests as requested")
    .getter(c"fileno", caio_core::getter!(get_fileno), c"the eventfd signalled for every completion")
    .getter(c"sqpoll", caio_core::getter!(get_sqpoll), c"1 if the ring runs with a kernel SQ polling thread, else 0")
}

/// The Context type's docstring (text signature first).
const CTX_DOC: &std::ffi::CStr =
    c"Context(max_requests=32, sqpoll=False)\n--\n\nio_uring AIO context: a ring \
with room for max_requests staged operations, an eventfd (fileno) signalled for every \
completion and, with sqpoll=True (when permitted), a kernel submission thread.";

/// The module's `Py_mod_exec` slot.
///
/// # Safety
/// Called by CPython from the exec slot (once per module object), attached.
unsafe fn exec(module: *mut PyObject) -> PyResult<()> {
    let probed = probe::run().map_err(|msg| PyErr::new(Exc::ImportError, msg))?;
    // Path operations as ring opcodes where the kernel has them (DESIGN.md §14).
    caio_core::pathop::engine::set_factory(pathring::new_engine);
    // SAFETY: an exec slot, attached, in the order core requires
    // (init_common first). The method and getset tables are statics that
    // nothing writes after this and that outlive the type.
    unsafe {
        init_common(
            module,
            &FLAVOR,
            context_spec,
            c"caio.linux_uring.OperationError",
        )?;
        caio_core::module::init_capacity_error(
            module,
            c"caio.linux_uring.CapacityError",
            PyExc_OverflowError,
            c"submit() found the SQ ring full. An OverflowError, as upstream caio raises, and an \
OSError with errno EAGAIN.",
        )?;
        add_object(module, c"SQPOLL_ALLOWED", py_bool(probed.sqpoll_allowed))?;
        caio_core::aio::init(module, &adapter::ENGINE)?;
    }
    op::set_error_message_hook(direct::error_message);
    Ok(())
}

backend_module!(
    PyInit_linux_uring,
    c"linux_uring",
    c"io_uring based AIO backend (Linux 5.6+).",
    exec
);
