//! `caio.thread_aio`: positional I/O on a native worker pool.
//!
//! The engine is `caio_core::pool`. By default a worker runs the op's callback
//! itself (upstream's documented semantics: callback on a pool thread). The
//! asyncio adapter instead watches `_completion_fd()` with `loop.add_reader`
//! and then calls `_enable_loop_delivery()`: workers only queue completions
//! and signal the fd when the queue turns non-empty, and
//! `_process_completions()` (run by the loop) delivers the whole batch — no
//! GIL traffic in workers, one wake-up per batch.
//!
//! This file holds the module (its Operation flavour and initialisation) and
//! the Python `Context` type; `adapter` holds the engine hooks of the native
//! asyncio fast path.

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use caio_core::args::{int_as, int_in, positional, Params};
use caio_core::backend_module;
use caio_core::context::{first_non_op, ContextObject, ContextState};
use caio_core::fork::Stamp;
use caio_core::module::{init_common, ModState};
use caio_core::op::{self, as_op, Flavor, ReadPayload};
use caio_core::pool::{self, CompletionQueue, Job, Pool, SubmitError};
use caio_core::py::typespec::{fast, fastcall, noargs};
use caio_core::py::TypeSpec;
use caio_core::py::{
    allow_threads, none, py_int, py_str, py_usize, trampoline, Borrowed, Exc, PyErr, PyResult,
};
use caio_core::pyo3_ffi::*;

mod adapter;

static FLAVOR: Flavor = Flavor {
    type_name: c"aio.AIOOperation",
    doc: c"thread aio operation representation",
    read_payload: ReadPayload::MemoryView,
    drop_write_payload: true,
    nbytes_tracks_write: false,
    max_read: isize::MAX as u64,
    max_read_msg: "nbytes does not fit in Py_ssize_t",
    offset_min: i64::MIN as i128,
    offset_max: i64::MAX as i128,
    // DESIGN.md §6.2 wrap: accept every value that fits 16 bits signed or unsigned, reject the
    // rest instead of wrapping. The priority is not used by a thread pool.
    priority_min: i16::MIN as i128,
    priority_max: u16::MAX as i128,
    payload_type_msg: "payload_bytes argument must be bytes",
    failure_as_minus_one: true,
    callback_keyword: true,
    has_result_error: true,
    has_context: false,
    has_priority: false,
    repr_offset_signed: false,
    repr_result: true,
};

const DEFAULT_MAX_REQUESTS: u16 = 512;
const DEFAULT_POOL_SIZE: u16 = 8;
const MAX_POOL_SIZE: u16 = 128;
const MAX_REQUESTS_LIMIT: u16 = 65535;

/// The engine state of a Context (`caio_core::context::ContextObject`).
pub(crate) struct Context {
    max_requests: u16,
    pool_size: u16,
    born: Stamp,
    /// Reads up to this size are first tried inline from the page cache
    /// (event-loop delivery only; 0 = never).
    inline_read_max: AtomicUsize,
    /// `None` once closed.
    pool: Mutex<Option<Arc<Pool>>>,
}

impl Context {
    pub(crate) fn pool_slot(&self) -> MutexGuard<'_, Option<Arc<Pool>>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn pool(&self) -> PyResult<Arc<Pool>> {
        self.pool_slot()
            .clone()
            .ok_or_else(|| PyErr::runtime("Context is closed"))
    }

    pub(crate) fn check_fork(&self) -> PyResult<()> {
        self.born.check(
            "this thread_aio Context was created before fork() and its worker \
threads do not exist in this process; create a new Context in the child",
        )
    }

    /// Stops the pool, letting queued and running work finish (callbacks
    /// included) — with the GIL released, as direct-delivery workers need it.
    ///
    /// # Safety
    /// Attached (queued completions are delivered here).
    pub(crate) unsafe fn shutdown(&self) {
        let pool = self.pool_slot().take();
        if let Some(pool) = pool {
            if self.check_fork().is_err() {
                // A forked child has none of the parent's workers: leave the
                // copied bookkeeping alone rather than join threads that do
                // not exist here.
                std::mem::forget(pool);
                return;
            }
            allow_threads(|| pool.shutdown(true));
            if let Some(q) = pool.queued_delivery() {
                // SAFETY: attached (this function's contract).
                unsafe { q.deliver_all() };
            }
        }
    }
}

impl ContextState for Context {
    /// No op can be in flight here (each one keeps its Context alive), so
    /// this only stops idle workers.
    unsafe fn release(&self) {
        // SAFETY: attached (the trait's contract).
        unsafe { self.shutdown() };
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

static NEW_PARAMS: Params = Params {
    fname: "Context",
    names: &["max_requests", "pool_size"],
    required: 0,
    keywords: true,
};

/// A u16 parameter: 0 selects the default, values above `limit` are refused
/// with upstream's `ValueError`, values that do not fit 16 bits raise
/// `OverflowError` instead of wrapping around (DESIGN.md §6.2 wrap).
fn u16_param(obj: Option<Borrowed<'_>>, name: &str, default: u16, max_ok: u16) -> PyResult<u16> {
    let Some(obj) = obj else { return Ok(default) };
    match int_as(obj, name, 0, u16::MAX)? {
        0 => Ok(default),
        v if v <= max_ok => Ok(v),
        v => Err(PyErr::value_error(format!(
            "{} too large: must be at most {}, got {}",
            name, max_ok, v
        ))),
    }
}

/// `Context(max_requests=512, pool_size=8)` (`tp_new`).
///
/// # Safety
/// Called by CPython, attached: `tp` is this module's Context type, `args`
/// a tuple, `kwargs` NULL or a dict.
unsafe extern "C" fn ctx_new(
    tp: *mut PyTypeObject,
    args: *mut PyObject,
    kwargs: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: `args` and `kwargs` as CPython passes them to `tp_new`.
        let a = unsafe { NEW_PARAMS.parse_tuple::<2>(args, kwargs) }?;
        let max_requests = u16_param(
            a.get(0),
            "max_requests",
            DEFAULT_MAX_REQUESTS,
            MAX_REQUESTS_LIMIT - 1,
        )?;
        let pool_size = u16_param(a.get(1), "pool_size", DEFAULT_POOL_SIZE, MAX_POOL_SIZE)?;
        let pool = Pool::new(usize::from(pool_size), usize::from(max_requests)).map_err(|e| {
            PyErr::runtime(format!(
                "Pool initialization failed size={} max_requests={}: {}",
                pool_size, max_requests, e
            ))
        })?;
        let state = Context {
            max_requests,
            pool_size,
            born: Stamp::now(),
            inline_read_max: AtomicUsize::new(0),
            pool: Mutex::new(Some(Arc::new(pool))),
        };
        // SAFETY: attached; `tp` is this module's Context type.
        unsafe { ContextObject::create(tp, state) }
    })
}

/// Type-checks every argument before anything is claimed.
///
/// # Safety
/// Attached; `slf` is a Context; `args` are live objects.
unsafe fn check_ops(slf: *mut PyObject, args: &[*mut PyObject]) -> PyResult<()> {
    // SAFETY: forwarded contract.
    match unsafe { first_non_op(slf, args) } {
        None => Ok(()),
        Some((i, a)) => Err(PyErr::type_error(format!(
            "Wrong type for argument {}: expected thread_aio.Operation, got {}",
            i,
            a.repr()
        ))),
    }
}

/// `Context.submit(*operations)` (`METH_FASTCALL`).
///
/// # Safety
/// Called by CPython, attached: `slf` is a Context, `args`/`nargsf` the
/// call's arguments.
unsafe extern "C" fn ctx_submit(
    slf: *mut PyObject,
    args: *mut *mut PyObject,
    nargsf: Py_ssize_t,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: the METH_FASTCALL contract above.
        let (c, args) = unsafe { (ctx(slf), positional(args.cast_const(), nargsf)) };
        // SAFETY: attached; `slf` is a Context, `args` live objects.
        unsafe { check_ops(slf, args) }?;
        c.check_fork()?;
        let pool = c.pool()?;
        let mut accepted = 0usize;
        for &a in args {
            // SAFETY: attached; `slf` is `c`; `a` is an Operation (checked).
            if unsafe { submit_one(c, slf, &pool, a) }? {
                accepted += 1;
            }
        }
        py_usize(accepted)
    })
}

/// Claims `a` and hands it to the pool — or, for a page-cache hit in
/// event-loop mode, completes it right here. `Ok(false)`: already claimed
/// (in flight or done), silently skipped. On error the claim is rolled back.
///
/// # Safety
/// Attached; `slf` is the Context `c`; `a` is one of this module's
/// Operations.
pub(crate) unsafe fn submit_one(
    c: &Context,
    slf: *mut PyObject,
    pool: &Pool,
    a: *mut PyObject,
) -> PyResult<bool> {
    // SAFETY: `a` is an Operation (contract above).
    let o = unsafe { as_op(a) };
    if !o.try_claim() {
        return Ok(false);
    }
    // SAFETY: attached, and `o` was claimed just now by this call.
    unsafe { op::begin(o, slf) };
    if o.nbytes as usize <= c.inline_read_max.load(Ordering::Relaxed)
        && !pool.knows_direct(o.fd_i32())
    {
        // Page-cache hit: done right here, no thread hop. RWF_NOWAIT never
        // waits for the disk and the size is bounded, so this does not stall
        // the event loop. (Not tried on an fd the workers found to be
        // O_DIRECT: there is no page cache to hit, only an EINVAL.)
        // SAFETY: claimed and begun by this call and not handed to the pool
        // yet, so nobody else finishes it; attached for `finish`.
        if let Some(res) = unsafe { pool::try_read_inline(o) } {
            // SAFETY: as above: in flight, ours alone, attached.
            unsafe { op::finish(a.cast(), res) }.run();
            return Ok(true);
        }
    }
    match pool.submit(Job(a.cast())) {
        Ok(()) => Ok(true),
        Err((_, why)) => {
            // SAFETY: begun above, and the pool handed the job back.
            unsafe { op::abort(o) };
            Err(match why {
                // `caio.thread_aio.CapacityError`: the RuntimeError of DESIGN.md
                // §4.2, also an OSError with errno EAGAIN (see
                // caio_core::module::init_capacity_error).
                // SAFETY: attached; `slf` is an instance of this module's
                // Context type.
                SubmitError::Full => unsafe {
                    caio_core::module::capacity_error(
                        slf,
                        Exc::RuntimeError,
                        format!(
                            "Thread pool queue is full (max_requests={}): the operations before \
this one were accepted; submit the rest again once the workers have taken some",
                            c.max_requests
                        ),
                    )
                },
                SubmitError::Closed => PyErr::runtime("Context is closed"),
            })
        }
    }
}

/// `Context.cancel(*operations)`: takes back every given operation that is
/// queued on this Context and no worker has started yet, and completes it
/// as cancelled (`ECANCELED`; its callback runs here). A running `pread`
/// cannot be stopped: it completes normally later. Returns how many were
/// cancelled. Like upstream (whose `cancel` does nothing and returns 0), any
/// arguments are accepted; what is not a queued operation of this Context
/// is left alone (DESIGN.md §4.6).
///
/// # Safety
/// Called by CPython (`METH_FASTCALL`), attached, with `slf` a Context.
unsafe extern "C" fn ctx_cancel(
    slf: *mut PyObject,
    args: *mut *mut PyObject,
    nargsf: Py_ssize_t,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: the METH_FASTCALL contract above.
        let (c, args) = unsafe { (ctx(slf), positional(args.cast_const(), nargsf)) };
        c.check_fork()?;
        // SAFETY: `slf` is an instance of this module's Context type, so its
        // module state holds this module's Operation type.
        let op_type = unsafe { (*ModState::of(slf)).op_type };
        let Some(pool) = c.pool_slot().clone() else {
            return py_usize(0);
        };
        let mut cancelled = 0usize;
        for &a in args {
            // SAFETY: `a` is a live object (a call argument).
            if !unsafe { op::is_op(a, op_type) } {
                continue;
            }
            if let Some(job) = pool.try_cancel(a.cast()) {
                // SAFETY: the pool handed the job back: it is in flight and
                // ours alone; attached (contract above).
                unsafe { op::finish(job.0, -i64::from(libc::ECANCELED)) }.run();
                cancelled += 1;
            }
        }
        py_usize(cancelled)
    })
}

/// `Context.close()`.
///
/// # Safety
/// Called by CPython (`METH_NOARGS`), attached, with `slf` a Context.
unsafe extern "C" fn ctx_close(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: `slf` is a Context and we are attached (contract above).
        unsafe { ctx(slf).shutdown() };
        Ok(none())
    })
}

/// `Context._completion_fd()`.
///
/// # Safety
/// Called by CPython (`METH_NOARGS`), attached, with `slf` a Context.
unsafe extern "C" fn ctx_completion_fd(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: `slf` is a Context (contract above).
        let c = unsafe { ctx(slf) };
        c.check_fork()?;
        let q: Arc<CompletionQueue> = c.pool()?.completion_queue().map_err(io_error)?;
        py_int(i64::from(q.fileno()))
    })
}

/// `Unsupported` (no wake-up fd on this platform) → NotImplementedError, so
/// the adapter falls back to worker-thread callbacks; anything else → OSError.
fn io_error(e: std::io::Error) -> PyErr {
    match e.raw_os_error() {
        Some(errno) => PyErr::os(errno),
        None => PyErr::new(
            caio_core::py::Exc::NotImplementedError,
            format!("event-loop delivery is not available here: {}", e),
        ),
    }
}

static ENABLE_PARAMS: Params = Params {
    fname: "_enable_loop_delivery",
    names: &["inline_read_max"],
    required: 0,
    keywords: true,
};

/// `Context._enable_loop_delivery(inline_read_max=0)`.
///
/// # Safety
/// Called by CPython (`METH_FASTCALL | METH_KEYWORDS`), attached, with
/// `slf` a Context and the call's arguments.
unsafe extern "C" fn ctx_enable_loop_delivery(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: the vectorcall arguments as CPython passed them.
        let a = unsafe { ENABLE_PARAMS.parse::<1>(args, nargsf, kwnames) }?;
        let inline_max = match a.get(0) {
            Some(v) => {
                let v = int_in(v, "inline_read_max", 0, isize::MAX as i128)?;
                // Bounded by int_in; saturate where usize is narrower.
                usize::try_from(v).unwrap_or(usize::MAX)
            }
            None => 0,
        };
        // SAFETY: `slf` is a Context (contract above).
        let c = unsafe { ctx(slf) };
        c.check_fork()?;
        c.pool()?.enable_queued_delivery().map_err(io_error)?;
        c.inline_read_max.store(inline_max, Ordering::Relaxed);
        Ok(none())
    })
}

/// `Context._process_completions()`.
///
/// # Safety
/// Called by CPython (`METH_NOARGS`), attached, with `slf` a Context.
unsafe extern "C" fn ctx_process_completions(
    slf: *mut PyObject,
    _: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: `slf` is a Context (contract above).
        let pool = unsafe { ctx(slf) }.pool_slot().clone();
        let n = match pool.as_ref().and_then(|p| p.queued_delivery()) {
            // SAFETY: attached (contract above).
            Some(q) => unsafe { q.deliver_all() },
            None => 0,
        };
        py_usize(n)
    })
}

/// `repr(context)`.
///
/// # Safety
/// Called by CPython (`tp_repr`), attached, with `slf` a Context.
unsafe extern "C" fn ctx_repr(slf: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: `slf` is a Context (contract above).
        let c = unsafe { ctx(slf) };
        let pool = c
            .pool_slot()
            .clone()
            .ok_or_else(|| PyErr::runtime("Pool not initialized"))?;
        py_str(&format!(
            "<Context as {:p}: max_requests={}, pool_size={}, ctx={:p}>",
            slf,
            c.max_requests,
            c.pool_size,
            Arc::as_ptr(&pool)
        ))
    })
}

/// `Context.max_requests`.
///
/// # Safety
/// Called by CPython (getter), attached, with `slf` a Context.
unsafe extern "C" fn get_max_requests(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    // SAFETY: `slf` is a Context (contract above).
    trampoline(|| py_int(i64::from(unsafe { ctx(slf) }.max_requests)))
}

/// `Context.pool_size`.
///
/// # Safety
/// Called by CPython (getter), attached, with `slf` a Context.
unsafe extern "C" fn get_pool_size(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    // SAFETY: `slf` is a Context (contract above).
    trampoline(|| py_int(i64::from(unsafe { ctx(slf) }.pool_size)))
}

/// The Context type: core's common shape plus this backend's methods and
/// properties (`caio_core::module::init_common` creates it).
fn context_spec() -> TypeSpec {
    ContextObject::<Context>::spec(CTX_DOC, ctx_new, ctx_repr)
    .method(fast(
        c"submit",
        ctx_submit,
        c"submit($self, *operations)\n--\n\nQueue operations; returns how many were newly accepted.",
    ))
    .method(fast(
        c"cancel",
        ctx_cancel,
        c"cancel($self, *operations)\n--\n\nCancels the given operations that no worker has started yet (they complete\nwith ECANCELED); a running one completes normally. Returns how many were\ncancelled.",
    ))
    .method(noargs(
        c"close",
        ctx_close,
        c"close($self)\n--\n\nStop accepting work, let queued work finish, join the workers.",
    ))
    .method(noargs(
        c"_completion_fd",
        ctx_completion_fd,
        c"_completion_fd($self)\n--\n\nThe fd that becomes readable when completions are queued for \
_process_completions() (see _enable_loop_delivery). Used by the asyncio adapter.",
    ))
    .method(fastcall(
        c"_enable_loop_delivery",
        ctx_enable_loop_delivery,
        0,
        c"_enable_loop_delivery($self, inline_read_max=0)\n--\n\nFrom now on, workers queue completions instead \
of running callbacks; _process_completions() delivers them. Irreversible; watch _completion_fd() first. \
Reads of at most inline_read_max bytes are first tried from the page cache on the calling thread \
(preadv2 RWF_NOWAIT, Linux) and complete inside submit() when cached.",
    ))
    .method(noargs(
        c"_process_completions",
        ctx_process_completions,
        c"_process_completions($self)\n--\n\nDeliver queued completions (run their callbacks) on this thread; returns \
how many.",
    ))
    .getter(c"max_requests", get_max_requests, c"how many operations may wait in the queue")
    .getter(c"pool_size", get_pool_size, c"number of worker threads")
}

/// The Context type's docstring (text signature first).
const CTX_DOC: &std::ffi::CStr =
    c"Context(max_requests=512, pool_size=8)\n--\n\nthread aio context: a native worker pool \
running pread/pwrite/fsync/fdatasync.";

/// The module's `Py_mod_exec` slot.
///
/// # Safety
/// Called by CPython from the exec slot (once per module object), attached.
unsafe fn exec(module: *mut PyObject) -> PyResult<()> {
    // SAFETY: an exec slot, attached, in the order core requires
    // (init_common first). The method and getset tables are statics that
    // nothing writes after this and that outlive the type.
    unsafe {
        init_common(
            module,
            &FLAVOR,
            context_spec,
            c"caio.thread_aio.OperationError",
        )?;
        caio_core::module::init_capacity_error(
            module,
            c"caio.thread_aio.CapacityError",
            PyExc_RuntimeError,
            c"submit() found the queue full (max_requests operations pending). A RuntimeError, as \
upstream caio raises, and an OSError with errno EAGAIN.",
        )?;
        caio_core::aio::init(module, &adapter::ENGINE)?;
        caio_core::register_process_hooks()?;
    }
    Ok(())
}

backend_module!(PyInit_thread_aio, c"thread_aio", c"Thread based AIO.", exec);
