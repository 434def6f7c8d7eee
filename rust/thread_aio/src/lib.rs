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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use caio_core::args::{int_as, int_in, Args, Params};
use caio_core::backend_module;
use caio_core::context::{ContextObject, ContextState};
use caio_core::fork::Stamp;
use caio_core::module::{init_common, ModState};
use caio_core::op::{self, as_op, Flavor};
use caio_core::pool::{self, CompletionQueue, Job, Pool, SubmitError};
use caio_core::py::{
    allow_threads, none, py_int, py_usize, Borrowed, Exc, Owned, PyErr, PyResult, TypeSpec,
};
use caio_core::pyo3_ffi::*;

mod adapter;

/// The module's Operation type (`caio_core::op`), as thread_aio has it. The
/// priority is not used by a thread pool (but still range-checked).
static FLAVOR: Flavor = Flavor {
    doc: c"thread aio operation representation",
    drop_write_payload: true,
    failure_as_minus_one: true,
    has_context: false,
    ..Flavor::COMMON
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

    /// Stops the pool, letting queued and running work finish (callbacks
    /// included) — with the GIL released, as direct-delivery workers need it.
    /// The wait is bounded by `deadline` (the loop-gone drain) and, while
    /// the interpreter exits, by the exit bound (`pool::exit_deadline`): a
    /// worker stuck in its I/O then keeps its op (and its memory) and is
    /// left behind. True when every worker ended.
    ///
    /// # Safety
    /// Attached (queued completions are delivered here).
    pub(crate) unsafe fn shutdown(&self, deadline: Option<std::time::Instant>) -> bool {
        let pool = self.pool_slot().take();
        let Some(pool) = pool else {
            return true;
        };
        if self.check_fork().is_err() {
            // A forked child has none of the parent's workers: leave the
            // copied bookkeeping alone rather than join threads that do
            // not exist here.
            std::mem::forget(pool);
            return true;
        }
        let deadline = deadline.or_else(caio_core::pool::exit_deadline);
        let all = allow_threads(|| pool.shutdown_until(deadline));
        if let Some(q) = pool.queued_delivery() {
            // SAFETY: attached (this function's contract).
            unsafe { q.deliver_all() };
        }
        all
    }
}

impl ContextState for Context {
    /// `Context(max_requests=512, pool_size=8)`.
    unsafe fn new(args: *mut PyObject, kwargs: *mut PyObject) -> PyResult<Context> {
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
        Ok(Context {
            max_requests,
            pool_size,
            born: Stamp::now(),
            inline_read_max: AtomicUsize::new(0),
            pool: Mutex::new(Some(Arc::new(pool))),
        })
    }

    const FORKED: &'static str = "this thread_aio Context was created before fork() and its \
worker threads do not exist in this process; create a new Context in the child";

    fn born(&self) -> Stamp {
        self.born
    }

    fn not_an_operation(i: usize, arg: Borrowed<'_>) -> String {
        format!(
            "Wrong type for argument {i}: expected thread_aio.Operation, got {}",
            arg.repr()
        )
    }

    /// Raises once closed (as upstream: "Pool not initialized").
    fn repr(&self, slf: *mut PyObject) -> PyResult<String> {
        let pool = self
            .pool_slot()
            .clone()
            .ok_or_else(|| PyErr::runtime("Pool not initialized"))?;
        Ok(format!(
            "<Context as {:p}: max_requests={}, pool_size={}, ctx={:p}>",
            slf,
            self.max_requests,
            self.pool_size,
            Arc::as_ptr(&pool)
        ))
    }

    /// No op can be in flight here (each one keeps its Context alive), so
    /// this only stops idle workers.
    unsafe fn release(&self) {
        // SAFETY: attached (the trait's contract).
        unsafe { self.shutdown(None) };
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

static NEW_PARAMS: Params = Params::new("Context", &["max_requests", "pool_size"], 0);

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

/// `Context.submit(*operations)` (`METH_FASTCALL`).
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_submit(slf: *mut PyObject, args: &[*mut PyObject]) -> PyResult<Owned> {
    // SAFETY: the method's contract.
    let c = unsafe { ContextObject::<Context>::submitting(slf, args) }?;
    let pool = c.pool()?;
    let mut accepted = 0usize;
    for &a in args {
        // SAFETY: attached; `slf` is `c`; `a` is an Operation (checked).
        if unsafe { submit_one(c, slf, &pool, a, false) }? {
            accepted += 1;
        }
    }
    py_usize(accepted)
}

/// Claims `a` and hands it to the pool — or, for a page-cache hit in
/// event-loop mode, completes it right here. `Ok(false)`: already claimed
/// (in flight or done), silently skipped. On error the claim is rolled back.
/// `for_adapter`: the asyncio adapter submits; once claimed, a callback set
/// on the op is dropped (the adapter's future replaces it, DESIGN.md §5.2),
/// before anything can deliver it.
///
/// # Safety
/// Attached; `slf` is the Context `c`; `a` is one of this module's
/// Operations.
pub(crate) unsafe fn submit_one(
    c: &Context,
    slf: *mut PyObject,
    pool: &Pool,
    a: *mut PyObject,
    for_adapter: bool,
) -> PyResult<bool> {
    // SAFETY: `a` is an Operation (contract above).
    let o = unsafe { as_op(a) };
    if !o.try_claim() {
        return Ok(false);
    }
    // SAFETY: attached, and `o` was claimed just now by this call.
    unsafe { op::begin(o, slf) };
    if for_adapter {
        // SAFETY: attached.
        unsafe { op::clear_callback(o) };
    }
    let inline_max = c.inline_read_max.load(Ordering::Relaxed);
    // `inline_max == 0`: inline reads are off (a raw Context, or the adapter
    // asked for none); then every op, a zero-length read included, runs and
    // calls back on a worker, never inside submit() on the caller's thread.
    if inline_max > 0 && o.nbytes as usize <= inline_max && !pool.knows_direct(o.fd_i32()) {
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
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_cancel(slf: *mut PyObject, args: &[*mut PyObject]) -> PyResult<Owned> {
    // SAFETY: the method's contract.
    let c = unsafe { ctx(slf) };
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
}

/// `Context.close()`.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_close(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context and we are attached (contract above).
    unsafe { ctx(slf).shutdown(None) };
    Ok(none())
}

/// `Context._completion_fd()`.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_completion_fd(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    let c = unsafe { ctx(slf) };
    c.check_fork()?;
    let q: Arc<CompletionQueue> = c.pool()?.completion_queue().map_err(io_error)?;
    py_int(i64::from(q.fileno()))
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

static ENABLE_PARAMS: Params = Params::new("_enable_loop_delivery", &["inline_read_max"], 0);

/// `Context._enable_loop_delivery(inline_read_max=0)`.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_enable_loop_delivery(slf: *mut PyObject, a: Args<'_, 1>) -> PyResult<Owned> {
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
}

/// `Context._process_completions()`.
///
/// # Safety
/// A Context method (`caio_core::method!`): attached, `slf` a live
/// Context.
unsafe fn ctx_process_completions(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    let pool = unsafe { ctx(slf) }.pool_slot().clone();
    let n = match pool.as_ref().and_then(|p| p.queued_delivery()) {
        // SAFETY: attached (contract above).
        Some(q) => unsafe { q.deliver_all() },
        None => 0,
    };
    py_usize(n)
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

/// `Context.pool_size`.
///
/// # Safety
/// A Context getter (`caio_core::getter!`): attached, `slf` a live
/// Context.
unsafe fn get_pool_size(slf: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: `slf` is a Context (contract above).
    py_int(i64::from(unsafe { ctx(slf) }.pool_size))
}

/// The Context type: core's common shape plus this backend's methods and
/// properties (`caio_core::module::init_common` creates it).
fn context_spec() -> TypeSpec {
    ContextObject::<Context>::spec(CTX_DOC)
    .method(caio_core::method!(
        varargs c"submit",
        ctx_submit,
        c"submit($self, *operations)\n--\n\nQueue operations; returns how many were newly accepted.",
    ))
    .method(caio_core::method!(
        varargs c"cancel",
        ctx_cancel,
        c"cancel($self, *operations)\n--\n\nCancels the given operations that no worker has started yet (they complete\nwith ECANCELED); a running one completes normally. Returns how many were\ncancelled.",
    ))
    .method(caio_core::method!(
        noargs c"close",
        ctx_close,
        c"close($self)\n--\n\nStop accepting work, let queued work finish, join the workers.",
    ))
    .method(caio_core::method!(
        noargs c"_completion_fd",
        ctx_completion_fd,
        c"_completion_fd($self)\n--\n\nThe fd that becomes readable when completions are queued for \
_process_completions() (see _enable_loop_delivery). Used by the asyncio adapter.",
    ))
    .method(caio_core::method!(
        params c"_enable_loop_delivery",
        ctx_enable_loop_delivery,
        ENABLE_PARAMS,
        c"_enable_loop_delivery($self, inline_read_max=0)\n--\n\nFrom now on, workers queue completions instead \
of running callbacks; _process_completions() delivers them. Irreversible; watch _completion_fd() first. \
Reads of at most inline_read_max bytes are first tried from the page cache on the calling thread \
(preadv2 RWF_NOWAIT, Linux) and complete inside submit() when cached.",
    ))
    .method(caio_core::method!(
        noargs c"_process_completions",
        ctx_process_completions,
        c"_process_completions($self)\n--\n\nDeliver queued completions (run their callbacks) on this thread; returns \
how many.",
    ))
    .getter(c"max_requests", caio_core::getter!(get_max_requests), c"how many operations may wait in the queue")
    .getter(c"pool_size", caio_core::getter!(get_pool_size), c"number of worker threads")
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
