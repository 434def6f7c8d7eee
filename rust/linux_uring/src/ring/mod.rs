//! The io_uring instance behind one `Context`.
//!
//! * Staging ([`Ring::stage`]) claims operations and writes one SQE each into
//!   the shared SQ ring under the SQ lock; it never enters the kernel.
//! * [`Ring::submit_staged`] hands staged SQEs to the kernel (or wakes the SQ
//!   thread in SQPOLL mode).
//! * [`Ring::drain`] consumes CQEs under the CQ lock, records every result in
//!   its op (`op::finish`) and publishes the new CQ head for the whole batch
//!   before the caller runs any callback ([`Delivery::run`]) — callbacks may
//!   re-enter the Context and must find the batch consumed.
//! * [`Ring::wait`] blocks (GIL released) on the ring's eventfd with
//!   `poll(2)` until enough completions are visible; several concurrent
//!   waiters wake each other through private eventfds, so consuming the ring
//!   eventfd never strands anyone.
//! * O_DIRECT: a drain resubmits the `EINVAL` of a read or write on an
//!   O_DIRECT fd through an aligned window instead of delivering it (the
//!   policy is in `direct`).
//!
//! No lock is ever held while Python code runs, and the two ring locks are
//! never nested.
//!
//! The shared rings are only touched under their lock: a `SubmissionQueue`
//! exists only while `Ring::sq` is held, a `CompletionQueue` only while
//! `Ring::cq` is held — what `IoUring::submission_shared` and
//! `completion_shared` require. Every SQE pushed points into memory that
//! stays valid until its CQE is consumed (see [`Ring::stage`]), so entering
//! the kernel is always sound.

use std::io;
use std::mem::ManuallyDrop;
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use caio_core::op::{self, as_op, Operation};
use caio_core::pool::order::{Admit, Order};
use caio_core::pool::Job;
use caio_core::py::{Exc, PyErr};
use caio_core::pyo3_ffi::PyObject;
use io_uring::{squeue, EnterFlags, IoUring};

use caio_core::direct::FdCache;

use crate::direct;

mod cancel;
mod complete;
mod sqe;
mod wait;

use sqe::sqe;

/// `user_data` of our own cancel SQEs: their CQEs are skipped by drains.
pub const CANCEL_TAG: u64 = u64::MAX;

/// Requested `sq_thread_idle` for SQPOLL rings, in milliseconds.
pub const SQPOLL_IDLE_MS: u32 = 100;

/// Staged writes/reads above this many bytes are entered with the GIL
/// released (the kernel may copy page-cache data inline while submitting).
const GIL_FREE_ENTER_BYTES: u64 = 256 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct SqSide {
    /// `user_data` of the ops staged since the kernel last took the SQ
    /// (the asyncio adapter's batch).
    recent: Vec<u64>,
}

pub struct Ring {
    uring: ManuallyDrop<IoUring>,
    eventfd: i32,
    pub sqpoll: bool,
    sq: Mutex<SqSide>,
    cq: Mutex<()>,
    /// fds found to be open with O_DIRECT (core's policy, see `direct`).
    direct: FdCache,
    /// Bytes of read/write SQEs staged since the last enter (GIL policy).
    staged_bytes: AtomicU64,
    /// Real completions consumed by drains so far (cancel CQEs excluded).
    consumed: AtomicU64,
    /// Operations accepted by [`Ring::stage`] and finished by drains so far:
    /// the difference is what is in flight (see [`Ring::in_flight`]).
    accepted: AtomicU64,
    finished: AtomicU64,
    /// Private wake-up eventfds of threads blocked in [`Ring::wait`].
    waiters: Mutex<Vec<i32>>,
    /// fsync after the writes before it (DESIGN.md §4.1): writes not
    /// finished yet per fd, and the syncs staged behind them — held out of
    /// the SQ until those writes are drained (the kernel would otherwise run
    /// them in any order). Unrelated fds never wait for each other.
    order: Order,
    /// Syncs released by `order` that found the SQ full (staged by a later
    /// drain).
    released: Mutex<Vec<Job>>,
    nwaiters: AtomicUsize,
}

/// Why [`Ring::stage`] stopped.
pub enum StageError {
    /// No free SQ slot (the op concerned was rolled back).
    Full,
    Failed(PyErr),
}

impl StageError {
    /// The Python exception; `ctx` is the Context that staged.
    ///
    /// # Safety
    /// Attached; `ctx` is a linux_uring Context.
    pub unsafe fn into_pyerr(self, ctx: *mut PyObject) -> PyErr {
        match self {
            // SAFETY: attached; `ctx` is a linux_uring Context (contract
            // above).
            StageError::Full => unsafe {
                ring_full_error(
                    ctx,
                    "the operations before this one were accepted; flush() or process_events() \
hands them to the kernel, then submit the rest again",
                )
            },
            StageError::Failed(e) => e,
        }
    }
}

/// The SQ ring has no free slot: `caio.linux_uring.CapacityError`, an
/// `OverflowError` (DESIGN.md §4.2) that is also an `OSError` with errno EAGAIN
/// (see `caio_core::module::init_capacity_error`).
///
/// # Safety
/// Attached; `ctx` is a linux_uring Context.
pub unsafe fn ring_full_error(ctx: *mut PyObject, advice: &str) -> PyErr {
    // SAFETY: attached; `ctx` is an instance of this module's Context type
    // (contract above).
    unsafe {
        caio_core::module::capacity_error(
            ctx,
            Exc::OverflowError,
            format!(
                "io_uring SQ ring is full (max_requests={}): {}",
                crate::ctx(ctx).max_requests,
                advice
            ),
        )
    }
}

/// Why a ring could not be created: the errno of the last attempt.
pub struct SetupError(pub i32);

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Ring {
    /// `entries` SQ slots requested (the kernel rounds up to a power of two).
    /// Setup flags are tried in order; EINVAL/EPERM/EACCES move on to the
    /// next set (older kernels, SQPOLL not permitted), anything else fails.
    /// `eventfd` (a non-blocking eventfd) is registered to signal every
    /// posted CQE; it stays the caller's (it must outlive the ring and is
    /// not closed by it), so it can be shared with another completion
    /// source (`workers`).
    pub fn new(entries: u64, sqpoll: bool, eventfd: i32) -> Result<Ring, SetupError> {
        let Ok(entries) = u32::try_from(entries) else {
            return Err(SetupError(libc::EINVAL));
        };
        // (sqpoll, no_sqarray)
        let attempts: &[(bool, bool)] = if sqpoll {
            &[(true, true), (true, false), (false, false)]
        } else {
            &[(false, true), (false, false)]
        };
        let mut last = libc::EINVAL;
        let mut built = None;
        for &(sq, nosqarray) in attempts {
            let mut b = IoUring::<squeue::Entry, io_uring::cqueue::Entry>::builder();
            if sq {
                b.setup_sqpoll(SQPOLL_IDLE_MS);
            }
            if nosqarray {
                b.setup_no_sqarray();
            }
            match b.build(entries) {
                Ok(r) => {
                    built = Some((r, sq));
                    break;
                }
                Err(e) => {
                    last = errno_of(&e);
                    if !matches!(last, libc::EINVAL | libc::EPERM | libc::EACCES) {
                        return Err(SetupError(last));
                    }
                }
            }
        }
        let Some((uring, sqpoll)) = built else {
            return Err(SetupError(last));
        };
        let efd = eventfd;
        raise_bounded_workers(&uring, entries);
        // The plain variant: every posted CQE (inline ones included) signals.
        if let Err(e) = uring.submitter().register_eventfd(efd) {
            return Err(SetupError(errno_of(&e)));
        }
        Ok(Ring {
            uring: ManuallyDrop::new(uring),
            eventfd: efd,
            sqpoll,
            sq: Mutex::new(SqSide { recent: Vec::new() }),
            cq: Mutex::new(()),
            direct: FdCache::new(),
            staged_bytes: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
            nwaiters: AtomicUsize::new(0),
            order: Order::default(),
            released: Mutex::new(Vec::new()),
        })
    }

    pub fn ring_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.uring.as_raw_fd()
    }

    pub fn eventfd(&self) -> i32 {
        self.eventfd
    }

    // -- submission ---------------------------------------------------------

    /// Claims and stages `ops` (already type-checked) on behalf of `ctx`.
    /// Returns how many were newly accepted; on a full ring or a failure the
    /// op concerned is rolled back, the earlier ones stay staged, and the
    /// error comes back with the count.
    ///
    /// # Safety
    /// Attached; every pointer is one of this module's Operations; `ctx` is
    /// the Context owning this ring.
    pub unsafe fn stage(
        &self,
        ops: &[*mut PyObject],
        ctx: *mut PyObject,
    ) -> (usize, Option<StageError>) {
        let take = |o: &Operation| {
            if !o.try_claim() {
                return false; // in flight elsewhere, listed twice, or done
            }
            // SAFETY: attached; `o` was claimed just now by this call.
            unsafe { op::begin(o, ctx) };
            true
        };
        // SAFETY: forwarded contract; `take` claims and begins.
        unsafe { self.stage_with(ops, take) }
    }

    /// Stages one op the caller has already claimed and begun
    /// (`op::begin`), e.g. after a non-blocking page-cache read did not
    /// finish it. On a full ring or a failure the op is rolled back
    /// (`op::abort`: `New` again) and the error returned.
    ///
    /// # Safety
    /// Attached; `p` is one of this module's Operations, claimed and begun
    /// by the caller for the Context owning this ring, and not handed to any
    /// engine.
    pub unsafe fn stage_claimed(&self, p: *mut PyObject) -> Option<StageError> {
        // SAFETY: forwarded contract: the op is already claimed and begun.
        unsafe { self.stage_with(&[p], |_| true) }.1
    }

    /// [`Ring::stage`]'s loop; `take` claims and begins an op (false: skip
    /// it).
    ///
    /// # Safety
    /// As for [`Ring::stage`]; after `take` returned true the op is claimed
    /// and begun.
    unsafe fn stage_with(
        &self,
        ops: &[*mut PyObject],
        mut take: impl FnMut(&Operation) -> bool,
    ) -> (usize, Option<StageError>) {
        let mut side = lock(&self.sq);
        // SAFETY: under the SQ lock (see the module doc).
        let mut sq = unsafe { self.uring.submission_shared() };
        let mut accepted = 0;
        let mut bytes = 0u64;
        let mut err = None;
        for &p in ops {
            // SAFETY: every pointer is one of this module's Operations
            // (contract above).
            let o = unsafe { as_op(p) };
            if !take(o) {
                continue;
            }
            if sq.is_full() {
                // SAFETY: begun above, never handed to the kernel.
                unsafe { op::abort(o) };
                err = Some(StageError::Full);
                break;
            }
            // SAFETY: claimed by this call and not in the kernel yet, so its
            // I/O window and engine area are the engine's.
            match unsafe { direct::prepare(o, &self.direct) } {
                Ok(()) => {
                    // SAFETY: claimed and begun just now: a live in-flight
                    // op. A write is recorded; a sync behind unfinished
                    // writes to its fd is accepted but held (a drain stages
                    // it once they are done).
                    let admit = unsafe { self.order.submitted(Job(p.cast())) };
                    if matches!(admit, Admit::Held) {
                        accepted += 1;
                        continue;
                    }
                    // SAFETY: claimed by this call, not in the kernel yet.
                    let entry = unsafe { sqe(o) };
                    // SAFETY: the SQE points into the op's I/O window (its
                    // own buffer, payload or aligned window), which stays
                    // valid until the drain that consumes its CQE finishes
                    // the op: `op::begin` took the engine's reference and
                    // the window belongs to the engine until then. Cannot
                    // fail: checked for room above, under the lock.
                    let _ = unsafe { sq.push(&entry) };
                    accepted += 1;
                    bytes += o.nbytes;
                    side.recent.push(p as u64);
                }
                Err(e) => {
                    // SAFETY: begun above, never handed to the kernel.
                    unsafe { op::abort(o) };
                    err = Some(StageError::Failed(e));
                    break;
                }
            }
        }
        drop(sq); // publishes the tail (release)
        drop(side);
        if accepted > 0 {
            self.accepted.fetch_add(accepted as u64, Ordering::AcqRel);
        }
        if bytes > 0 {
            self.staged_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        (accepted, err)
    }

    /// Whether this ring found `fd` to be open with O_DIRECT (no page cache
    /// to read from without waiting: only an `EINVAL`).
    pub fn knows_direct(&self, fd: i32) -> bool {
        self.direct.contains(fd)
    }

    /// The ops staged since the kernel last took the SQ (see `recent`).
    pub fn take_recent(&self) -> Vec<u64> {
        std::mem::take(&mut lock(&self.sq).recent)
    }

    /// Frees SQ slots: hands the staged SQEs to the kernel (plain ring) or
    /// waits until the SQ thread consumed some (SQPOLL).
    pub fn make_room(&self) -> io::Result<()> {
        self.submit_staged()?;
        if self.sqpoll {
            loop {
                match self.enter(0, 0, EnterFlags::SQ_WAIT.bits()) {
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    r => return r.map(drop),
                }
            }
        }
        Ok(())
    }

    /// SQEs written but not yet consumed by the kernel.
    pub fn staged(&self) -> u32 {
        let _g = lock(&self.sq);
        // SAFETY: under the SQ lock (see the module doc).
        let sq = unsafe { self.uring.submission_shared() };
        let n = sq.len() as u32;
        // Dropping the borrowed queue re-stores the same tail: harmless.
        drop(sq);
        n
    }

    /// Whether the next enter should run with the GIL released.
    pub fn big_enter(&self) -> bool {
        self.staged_bytes.load(Ordering::Relaxed) > GIL_FREE_ENTER_BYTES
    }

    /// Hands every staged SQE to the kernel (plain ring) or wakes the SQ
    /// thread if it went to sleep (SQPOLL). Touches no Python object.
    pub fn submit_staged(&self) -> io::Result<()> {
        if self.sqpoll {
            return self.wake_sq_thread();
        }
        self.staged_bytes.store(0, Ordering::Relaxed);
        {
            let mut side = lock(&self.sq);
            if !side.recent.is_empty() {
                side.recent.clear();
            }
        }
        loop {
            let staged = self.staged();
            if staged == 0 {
                return Ok(());
            }
            // Test hook: the kernel refuses to take the SQEs (they stay staged).
            if let Some(e) = caio_core::test_hooks::env_parse::<i32>("CAIO_TEST_URING_ENTER_ERRNO")
            {
                return Err(io::Error::from_raw_os_error(e));
            }
            match self.enter(staged, 0, 0) {
                Ok(0) => return Ok(()), // nothing consumed: do not spin
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn wake_sq_thread(&self) -> io::Result<()> {
        let need = {
            let _g = lock(&self.sq);
            // SAFETY: under the SQ lock (see the module doc).
            let sq = unsafe { self.uring.submission_shared() };
            // Our tail store must be visible before we read the flag (see
            // io_uring's SubmissionQueue::need_wakeup).
            fence(Ordering::SeqCst);
            sq.need_wakeup()
        };
        if need {
            loop {
                match self.enter(0, 0, EnterFlags::SQ_WAKEUP.bits()) {
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    r => return r.map(drop),
                }
            }
        }
        Ok(())
    }

    /// Makes the eventfd readable, so the event loop's reader runs (and
    /// retries a refused submission, see `Context::submit_or_retry`).
    pub fn poke_eventfd(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to our eventfd.
        unsafe { libc::write(self.eventfd, (&raw const one).cast(), 8) };
    }

    /// `io_uring_enter(2)` without a signal mask.
    fn enter(&self, to_submit: u32, min_complete: u32, flags: u32) -> io::Result<usize> {
        // SAFETY: no argument pointer is passed, and every SQE the kernel
        // may take was pushed valid for the op's whole flight (see
        // `Ring::stage`; cancel SQEs carry no buffer).
        unsafe {
            self.uring
                .submitter()
                .enter::<libc::sigset_t>(to_submit, min_complete, flags, None)
        }
    }

    /// A non-waiting `io_uring_enter(GETEVENTS)`: flushes overflowed CQEs
    /// into the ring and runs pending completion work.
    pub fn get_events(&self) {
        let _ = self.enter(0, 0, EnterFlags::GETEVENTS.bits());
    }

    fn cq_overflow(&self) -> bool {
        let _g = lock(&self.sq);
        // SAFETY: under the SQ lock (see the module doc).
        let sq = unsafe { self.uring.submission_shared() };
        let r = sq.cq_overflow();
        drop(sq);
        r
    }

    /// Operations accepted and not finished yet (staged, in the kernel, or
    /// completed but not drained).
    pub fn in_flight(&self) -> u64 {
        let finished = self.finished.load(Ordering::Acquire);
        self.accepted
            .load(Ordering::Acquire)
            .saturating_sub(finished)
    }
}

/// Upper bound of io-wq workers for regular-file I/O we ask for.
const IOWQ_BOUNDED_MAX: u32 = 64;

/// Requests that cannot be issued without blocking (buffered reads on
/// filesystems without async buffered-read support, O_DIRECT when the device
/// queue is full, writes the filesystem cannot do NOWAIT) go to the ring's
/// io-wq threads. For regular files the kernel allows only min(SQ entries,
/// 4 x CPUs) of them — 8 on a 2-CPU machine — which caps such a workload at 8
/// operations in parallel however many are submitted. Raise that bound to
/// the ring size (at most 64; Linux 5.15+, best effort).
fn raise_bounded_workers(uring: &IoUring, entries: u32) {
    let want = entries.min(IOWQ_BOUNDED_MAX);
    let mut cur = [0u32, 0u32]; // 0 = leave unchanged, returns the current values
    if uring
        .submitter()
        .register_iowq_max_workers(&mut cur)
        .is_ok()
        && cur[0] < want
    {
        let mut set = [want, 0];
        let _ = uring.submitter().register_iowq_max_workers(&mut set);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Unmaps the rings and closes the ring fd (the kernel cancels
        // whatever might still run). Also fine in a forked child: the
        // mappings and fds dropped there are the child's own copies. The
        // eventfd is the owner's (see `Ring::new`), closed after this.
        // SAFETY: dropped once, here, and never used again.
        unsafe { ManuallyDrop::drop(&mut self.uring) };
    }
}
