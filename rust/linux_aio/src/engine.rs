//! The kernel AIO context behind one Python `Context`: its state, creation
//! (`io_setup`), the worker pool it falls back to, and release.
//!
//! * [`AioContext::open`] creates the eventfd and the kernel context,
//!   waiting briefly when `fs.aio-nr` is only held by contexts that are
//!   being destroyed in the background (see `destroyer`).
//! * The kernel context id lives in [`Handle`], behind an `RwLock`:
//!   submitters and drainers hold it shared, release takes it exclusively
//!   (`io_destroy` unmaps the completion ring that drainers read).
//! * [`Reap`], behind a mutex, serialises completion-ring readers and holds
//!   the worker pool (created on first need, [`AioContext::to_pool`]) and
//!   its undelivered results.
//! * Closing is deferred until nothing is in flight
//!   ([`AioContext::release_if_idle`]); what [`AioContext::release_locked`]
//!   detaches is closed by [`Released::finish`] without our locks held.
//!
//! Submission is in `submit`, completion in `reap`. Lock order: `handle`
//! (shared) before `reap`; `staged` (the adapter's batch) is never held
//! together with either.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use caio_core::fork::Stamp;
use caio_core::op::Operation;
use caio_core::pool::order::Order;
use caio_core::pool::{CompletionQueue, Job, Pool};
use caio_core::py::{allow_threads, Exc, PyErr, PyResult};
use caio_core::pyo3_ffi::PyErr_CheckSignals;
use caio_core::sys;

use crate::abi::{self, IoEvent, Ring};
use crate::destroyer;
use crate::route::Routes;

/// Worker threads for operations the kernel would have run synchronously.
/// While reads go straight to the workers (see
/// [`Route`](crate::route::Route)), this is the number of disk reads in
/// flight.
const POOL_SIZE: usize = 16;

/// The kernel side of a Context, shared by submitters and drainers.
pub(crate) struct Handle {
    /// The kernel `aio_context_t`; 0 once released.
    pub(crate) aio: u64,
    /// Completions can be read from the ring in user space.
    pub(crate) user_ring: bool,
    /// Owns the eventfd signalled by the kernel (IOCB_FLAG_RESFD) and by the
    /// worker pool; `None` once released.
    pub(crate) queue: Option<Arc<CompletionQueue>>,
}

/// Completion-side state; one drainer at a time.
pub(crate) struct Reap {
    pub(crate) pool: Option<Arc<Pool>>,
    pool_failed: bool,
    /// Worker completions taken from the queue but not delivered yet
    /// (`process_events(max_requests=…)` may stop half-way).
    pub(crate) backlog: VecDeque<(Job, i64)>,
    /// Reused buffer for taking worker results off the queue.
    pub(crate) scratch: Vec<(Job, i64)>,
    /// Reused buffer for `io_getevents` (unknown ring layout only).
    pub(crate) events: Vec<IoEvent>,
}

/// The engine state of one Context (embedded in the Python object).
pub(crate) struct AioContext {
    pub(crate) max_requests: u32,
    pub(crate) born: Stamp,
    /// The context id as created (for repr).
    pub(crate) aio_id: u64,
    /// The eventfd, -1 once released.
    pub(crate) fileno: AtomicI32,
    /// `close()` was called: nothing new is accepted; resources are released
    /// once nothing is in flight.
    pub(crate) closing: AtomicBool,
    /// Submitters and drainers hold it shared; releasing takes it exclusively
    /// (the ring is unmapped by io_destroy).
    handle: RwLock<Handle>,
    /// Serialises ring readers and the worker-completion backlog.
    reap: Mutex<Reap>,
    /// Accepted and not yet delivered (kernel or worker pool).
    pub(crate) in_flight: AtomicUsize,
    /// Event-loop mode (`_set_nowait`): buffered reads/writes are submitted
    /// with RWF_NOWAIT and what the kernel refuses goes to worker threads.
    pub(crate) nowait: AtomicBool,
    /// Where buffered reads and writes go in event-loop mode.
    pub(crate) routes: Routes,
    /// The asyncio adapter's `deferred=True` batch: ops claimed by the
    /// engine (owned references, not begun), submitted by the next flush
    /// (see `adapter`).
    pub(crate) staged: Mutex<Vec<usize>>,
    /// A flush of `staged` is scheduled on the event loop.
    pub(crate) flush_scheduled: AtomicBool,
    /// Writes not finished yet and the syncs held back behind them
    /// (DESIGN.md §4.1: an fsync covers the writes submitted before it; the
    /// kernel and the workers would otherwise run them in any order). A
    /// released sync goes to the worker pool.
    pub(crate) order: Order,
}

/// What an operation on a closed Context raises.
pub(crate) fn closed_error() -> PyErr {
    PyErr::runtime("Context is closed")
}

impl AioContext {
    /// The kernel side, shared (submitters, drainers). A poisoned lock is
    /// taken over: no panic can leave `Handle` half-updated.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Handle> {
        self.handle.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The kernel side, exclusively (release).
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Handle> {
        self.handle.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The completion side (one drainer at a time).
    pub(crate) fn lock_reap(&self) -> MutexGuard<'_, Reap> {
        self.reap.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This process is a fork() child of the one that created the context.
    pub(crate) fn forked(&self) -> bool {
        !self.born.is_current()
    }

    /// The completion queue (and eventfd), unless released.
    pub(crate) fn queue(&self) -> Option<Arc<CompletionQueue>> {
        self.read().queue.clone()
    }

    /// Releases the kernel context (see `destroyer`) and detaches the eventfd
    /// and the worker pool, which [`Released::finish`] then closes. Caller
    /// holds the handle exclusively and nothing is in flight.
    pub(crate) fn release_locked(&self, h: &mut Handle) -> Released {
        let forked = self.forked();
        if h.aio != 0 {
            if !forked {
                destroyer::destroy(h.aio);
            }
            h.aio = 0;
        }
        self.fileno.store(-1, Ordering::Relaxed);
        let queue = h.queue.take();
        if let Some(q) = &queue {
            // Wake any thread blocked in process_events() on it.
            signal_fd(q.fileno());
        }
        Released {
            pool: self.lock_reap().pool.take(),
            queue,
            forked,
        }
    }

    pub(crate) fn release_if_idle(&self) {
        if !self.closing.load(Ordering::Acquire) || self.in_flight.load(Ordering::Acquire) != 0 {
            return;
        }
        let released = {
            let mut h = self.write();
            if self.in_flight.load(Ordering::Acquire) != 0 || h.queue.is_none() {
                return;
            }
            self.release_locked(&mut h)
        };
        released.finish();
    }
}

/// What `release_locked` detached, to be closed without our locks held.
pub(crate) struct Released {
    pool: Option<Arc<Pool>>,
    queue: Option<Arc<CompletionQueue>>,
    forked: bool,
}

impl Released {
    /// Caller attached (GIL held). Joins the (idle) workers so that the
    /// eventfd, which they share, is closed by the time this returns.
    pub(crate) fn finish(self) {
        if let Some(pool) = self.pool {
            if self.forked {
                // The workers do not exist in a forked child.
                std::mem::forget(pool);
            } else {
                allow_threads(|| pool.shutdown(true));
            }
        }
        drop(self.queue);
        throttle_destroys();
    }
}

/// Caller attached (GIL held); waits with the GIL released if too many
/// closed contexts still wait for `io_destroy` (see `destroyer`).
fn throttle_destroys() {
    if destroyer::over_backlog() {
        allow_threads(destroyer::wait_backlog);
    }
}

/// Adds one to an eventfd counter (wakes its pollers). Never fails on an
/// open eventfd short of counter overflow, which then only means "already
/// signalled".
pub(crate) fn signal_fd(fd: i32) {
    let one: u64 = 1;
    // SAFETY: write reads 8 bytes from `one`, which outlives the call.
    unsafe {
        libc::write(fd, (&raw const one).cast(), 8);
    }
}

/// Reads (and so resets) an eventfd counter: `Ok(0)` if it was zero.
pub(crate) fn read_counter(fd: i32) -> Result<u64, i32> {
    let mut v: u64 = 0;
    // SAFETY: read writes at most 8 bytes into `v`, which outlives the call.
    let r = unsafe { libc::read(fd, (&raw mut v).cast(), 8) };
    if r == 8 {
        return Ok(v);
    }
    match sys::last_errno() {
        libc::EAGAIN => Ok(0),
        e => Err(e),
    }
}

// ---------------------------------------------------------------------------
// creation

fn setup_error(nr: u32, errno: i32) -> PyErr {
    let msg = match errno {
        libc::EAGAIN => {
            let (nr_now, max) = abi::aio_counters();
            let show = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
            format!(
                "io_setup({nr}) failed: {} [EAGAIN]. The system-wide kernel AIO limit is \
exhausted: /proc/sys/fs/aio-nr is {} of /proc/sys/fs/aio-max-nr = {} (every Context reserves \
about 2 * max_requests events until it is closed). Close contexts you no longer need \
(Context.close(), AsyncioContext.close()), use a smaller max_requests, or raise fs.aio-max-nr \
(sysctl -w fs.aio-max-nr=N).",
                sys::strerror(errno),
                show(nr_now),
                show(max)
            )
        }
        libc::EINVAL => format!(
            "io_setup({nr}) failed: {} [EINVAL]: max_requests is out of the kernel's range",
            sys::strerror(errno)
        ),
        libc::ENOSYS => format!(
            "io_setup({nr}) failed: {} [ENOSYS]: kernel AIO is not available (kernel built \
without CONFIG_AIO, or blocked by a seccomp filter)",
            sys::strerror(errno)
        ),
        _ => format!("io_setup({nr}) failed: {}", sys::strerror(errno)),
    };
    PyErr::ErrnoMsg(Exc::SystemError, errno, msg)
}

/// `io_setup`, waiting a little when the limit is only held by contexts
/// that are being destroyed in the background.
///
/// # Safety
/// Attached: an interrupted call runs the Python signal handlers, and the
/// wait releases the GIL.
unsafe fn setup(nr: u32) -> PyResult<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match abi::io_setup(nr) {
            Ok(c) => return Ok(c),
            Err(libc::EINTR) => {
                // SAFETY: attached (our contract).
                if unsafe { PyErr_CheckSignals() } != 0 {
                    return Err(PyErr::Fetched);
                }
            }
            Err(libc::EAGAIN) if destroyer::pending() > 0 && Instant::now() < deadline => {
                allow_threads(|| std::thread::sleep(Duration::from_millis(1)));
            }
            Err(e) => return Err(setup_error(nr, e)),
        }
    }
}

impl AioContext {
    /// A new kernel AIO context of `max_requests` events with its eventfd,
    /// in event-loop mode off (upstream semantics).
    ///
    /// # Safety
    /// Attached (see [`setup`]).
    pub(crate) unsafe fn open(max_requests: u32) -> PyResult<AioContext> {
        let queue = Arc::new(CompletionQueue::new_shared().map_err(|e| {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            PyErr::ErrnoMsg(
                Exc::SystemError,
                errno,
                format!("eventfd() failed: {}", sys::strerror(errno)),
            )
        })?);
        // SAFETY: attached (our contract).
        let aio = unsafe { setup(max_requests) }?;
        // SAFETY: `aio` is the live context io_setup just returned.
        let user_ring = unsafe { Ring::of(aio) }.is_some();
        let fd = queue.fileno();
        Ok(AioContext {
            max_requests,
            born: Stamp::now(),
            aio_id: aio,
            fileno: AtomicI32::new(fd),
            closing: AtomicBool::new(false),
            handle: RwLock::new(Handle {
                aio,
                user_ring,
                queue: Some(queue),
            }),
            reap: Mutex::new(Reap {
                pool: None,
                pool_failed: false,
                backlog: VecDeque::new(),
                scratch: Vec::new(),
                events: Vec::new(),
            }),
            in_flight: AtomicUsize::new(0),
            nowait: AtomicBool::new(false),
            routes: Routes::new(),
            staged: Mutex::new(Vec::new()),
            flush_scheduled: AtomicBool::new(false),
            order: Order::default(),
        })
    }

    /// Gives back a context that never became a Python object: its kernel
    /// context goes to the destroyer, its eventfd is closed on drop.
    pub(crate) fn abandon(self) {
        destroyer::destroy(self.aio_id);
    }

    /// Hands an op to the worker pool (created on first use). Returns false
    /// if no worker could take it (no thread could be started): the op is
    /// then still the caller's.
    ///
    /// # Safety
    /// `op` is in flight, owned by this engine and not in the kernel: the
    /// worker runs its I/O and queues its result (`reap` delivers it).
    /// `reap` is this context's (locked) completion state and `queue` its
    /// completion queue.
    pub(crate) unsafe fn to_pool(
        &self,
        reap: &mut Reap,
        queue: &Arc<CompletionQueue>,
        op: *mut Operation,
    ) -> bool {
        if reap.pool.is_none() && !reap.pool_failed {
            match Pool::new(POOL_SIZE, usize::MAX) {
                Ok(p) => {
                    if p.install_completion_queue(queue.clone()).is_ok()
                        && p.enable_queued_delivery().is_ok()
                    {
                        reap.pool = Some(Arc::new(p));
                    } else {
                        p.shutdown(false);
                        reap.pool_failed = true;
                    }
                }
                Err(_) => reap.pool_failed = true,
            }
        }
        match &reap.pool {
            Some(p) => p.submit(Job(op)).is_ok(),
            None => false,
        }
    }

    /// Starts syncs released by `order` (the last write before them just
    /// finished or was rolled back): on the worker pool, or right here if no
    /// worker can be started (the result is delivered like a worker's).
    ///
    /// # Safety
    /// As [`AioContext::to_pool`], for every job (held syncs: claimed, begun,
    /// counted in flight, never dispatched).
    pub(crate) unsafe fn start_released(
        &self,
        reap: &mut Reap,
        queue: &Arc<CompletionQueue>,
        jobs: Vec<Job>,
    ) {
        for job in jobs {
            // SAFETY: the caller's contract.
            if !unsafe { self.to_pool(reap, queue, job.0) } {
                // SAFETY: as above; this engine owns the op until delivery.
                let r = unsafe { caio_core::pool::execute(&*job.0, None) };
                reap.backlog.push_back((job, r));
                signal_fd(queue.fileno());
            }
        }
    }
}
