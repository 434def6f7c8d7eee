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
use std::ptr;
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use caio_core::op::{self, as_op, Delivery, OpKind, Operation};
use caio_core::pool::order::{Admit, Order};
use caio_core::pool::Job;
use caio_core::py::{Exc, PyErr, PyResult};
use caio_core::pyo3_ffi::PyObject;
use caio_core::sys::MAX_TRANSFER;
use io_uring::{opcode, squeue, types, EnterFlags, IoUring};

use caio_core::direct::{FdCache, Retry};

use crate::direct;

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

/// What one GIL-free round of [`Ring::wait`] found.
enum WaitRound {
    /// Enough completions, or the deadline passed.
    Done,
    /// A signal interrupted `poll(2)`: run the handlers.
    Interrupted,
    /// An O_DIRECT EINVAL waits to be retried: drain.
    Retry,
    /// Woken (or a spurious `poll` error): look again.
    Again,
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

    // -- cancellation -------------------------------------------------------

    /// Stages an `ASYNC_CANCEL` for `target` and submits everything staged
    /// (DESIGN.md §6.2 cancel-submit: not only the oldest SQE; SQPOLL gets its wake-up).
    /// Errors from entering the kernel are ignored; a ring that stays full
    /// gives `Err(())`.
    pub fn cancel(&self, target: &Operation) -> Result<(), ()> {
        let entry = opcode::AsyncCancel::new(ptr::from_ref(target) as u64)
            .build()
            .user_data(CANCEL_TAG);
        if self.push_cancel(&entry) {
            Ok(())
        } else {
            Err(())
        }
    }

    /// Stages one of our cancel SQEs (making room once if the ring is full)
    /// and submits everything staged. False: the ring stayed full.
    fn push_cancel(&self, entry: &squeue::Entry) -> bool {
        for attempt in 0..2 {
            {
                let _side = lock(&self.sq);
                // SAFETY: under the SQ lock (see the module doc).
                let mut sq = unsafe { self.uring.submission_shared() };
                if !sq.is_full() {
                    // SAFETY: a cancel SQE carries no buffer, only the key
                    // of what to cancel. Cannot fail: room checked above,
                    // under the lock.
                    let _ = unsafe { sq.push(entry) };
                    drop(sq);
                    drop(_side);
                    let _ = self.submit_staged();
                    return true;
                }
            }
            if attempt == 0 {
                // Make room: hand the staged SQEs to the kernel first.
                let _ = self.submit_staged();
                if self.sqpoll {
                    let _ = self.enter(0, 0, EnterFlags::SQ_WAIT.bits());
                }
            }
        }
        false
    }

    // -- completion ---------------------------------------------------------

    /// Consumes up to `max` real completions: records them in their ops and
    /// returns the deliveries (callbacks not yet run) in `out`. The CQ head
    /// is published before returning. O_DIRECT misalignment failures are
    /// resubmitted instead of delivered.
    ///
    /// # Safety
    /// Attached (finishing an op touches its buffers' bookkeeping).
    pub unsafe fn drain(&self, max: usize, out: &mut Vec<Delivery>) -> usize {
        let before = out.len();
        // SAFETY: attached (this function's contract).
        let count = unsafe { self.drain_inner(max, out) };
        self.finished
            .fetch_add((out.len() - before) as u64, Ordering::AcqRel);
        // Finished writes may release syncs held behind them.
        let mut released = Vec::new();
        for d in &out[before..] {
            // SAFETY: the delivery holds the op's reference: alive.
            released.extend(unsafe { self.order.finished(d.op_ptr()) });
        }
        if self.stage_released(released) {
            // Like an O_DIRECT retry: entered from the drain, so a thread
            // waiting in process_events() gets the sync's completion.
            let _ = self.submit_staged();
        }
        count
    }

    /// Stages the syncs `order` released (and those a full SQ kept back
    /// before). True if any was staged.
    fn stage_released(&self, jobs: Vec<Job>) -> bool {
        let mut pending = lock(&self.released);
        pending.extend(jobs);
        if pending.is_empty() {
            return false;
        }
        let _side = lock(&self.sq);
        // SAFETY: under the SQ lock (see the module doc).
        let mut sq = unsafe { self.uring.submission_shared() };
        let mut staged = false;
        while !pending.is_empty() && !sq.is_full() {
            let job = pending.remove(0);
            // SAFETY: a held sync: claimed, begun and accepted by `stage`,
            // never in the kernel, so the engine's (its SQE carries no
            // buffer).
            let entry = unsafe { sqe(&*job.0) };
            // SAFETY: as in `Ring::stage`; room checked, under the lock.
            let _ = unsafe { sq.push(&entry) };
            staged = true;
        }
        staged
    }

    /// Operations accepted and not finished yet (staged, in the kernel, or
    /// completed but not drained).
    pub fn in_flight(&self) -> u64 {
        let finished = self.finished.load(Ordering::Acquire);
        self.accepted
            .load(Ordering::Acquire)
            .saturating_sub(finished)
    }

    /// Submits what is staged and asks the kernel to cancel every request of
    /// this ring (`IORING_ASYNC_CANCEL_ANY`, Linux 5.19+; older kernels
    /// answer EINVAL and the requests complete on their own). Best effort.
    pub fn cancel_all(&self) {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        self.push_cancel(&entry);
    }

    /// [`Ring::drain`] without the `finished` bookkeeping.
    ///
    /// # Safety
    /// Attached.
    unsafe fn drain_inner(&self, max: usize, out: &mut Vec<Delivery>) -> usize {
        if self.cq_overflow() {
            self.get_events();
        }
        let mut retries: Vec<(*mut Operation, Retry)> = Vec::new();
        let mut count = 0usize;
        {
            let _g = lock(&self.cq);
            // SAFETY: under the CQ lock (see the module doc).
            let mut cq = unsafe { self.uring.completion_shared() };
            let mut synced = false;
            while count < max {
                let Some(cqe) = cq.next() else {
                    if synced {
                        break;
                    }
                    // Pick up what was posted while we were busy.
                    cq.sync();
                    synced = true;
                    continue;
                };
                let ud = cqe.user_data();
                if ud == CANCEL_TAG {
                    continue;
                }
                // Not a cancel CQE: `ud` is the address of an op this ring
                // staged, kept alive by the engine's reference until it is
                // finished — by whoever consumes its CQE, here, under the CQ
                // lock.
                let op = ud as *mut Operation;
                let res = cqe.result();
                if res < 0 {
                    // SAFETY: `op` is in flight on this ring (above), its
                    // CQE consumed and not finished.
                    if let Some(retry) = unsafe { direct::retry(&*op, res, &self.direct) } {
                        retries.push((op, retry));
                        continue;
                    }
                }
                // SAFETY: in flight, its CQE consumed just now by this call
                // alone; attached (contract above).
                out.push(unsafe { op::finish(op, i64::from(res)) });
                count += 1;
            }
            drop(cq); // publishes the head (release)
            self.consumed.fetch_add(count as u64, Ordering::Release);
        }
        if !retries.is_empty() {
            // SAFETY: their CQEs were consumed above and they were not
            // finished; attached (contract above).
            unsafe { self.resubmit_direct(retries, out) };
        }
        count
    }

    /// Second attempt of ops that failed with EINVAL on an O_DIRECT fd:
    /// through an aligned window this time (or, for a stale cache entry,
    /// without one). Ops that cannot be resubmitted are finished with their
    /// original error.
    ///
    /// # Safety
    /// Attached; every op is in flight on this ring, its CQE consumed by the
    /// caller and not finished.
    unsafe fn resubmit_direct(&self, ops: Vec<(*mut Operation, Retry)>, out: &mut Vec<Delivery>) {
        let mut staged = false;
        {
            let _side = lock(&self.sq);
            // SAFETY: under the SQ lock (see the module doc).
            let mut sq = unsafe { self.uring.submission_shared() };
            for (op, retry) in ops {
                // SAFETY: in flight, so alive (contract above).
                let o = unsafe { &*op };
                // SAFETY: its CQE is consumed and it is not finished: the
                // engine owns it again, as between claim and dispatch.
                let entry = unsafe {
                    if sq.is_full() || direct::prepare_retry(o, retry).is_err() {
                        None
                    } else {
                        Some(sqe(o))
                    }
                };
                match entry {
                    Some(e) => {
                        // SAFETY: as in `Ring::stage`: the SQE points into
                        // the op's window, the engine's until the op is
                        // finished. Room checked above, under the lock.
                        let _ = unsafe { sq.push(&e) };
                        staged = true;
                    }
                    // SAFETY: ours alone (above); attached (contract above).
                    None => out.push(unsafe { op::finish(op, -i64::from(libc::EINVAL)) }),
                }
            }
        }
        if staged {
            let _ = self.submit_staged();
        }
    }

    /// Real completions visible so far: the running count of consumed ones
    /// plus the CQEs in the ring that a drain will deliver (not cancel
    /// CQEs, not O_DIRECT EINVALs it will retry), read consistently under
    /// the CQ lock. Also says whether a CQE waits to be retried.
    fn visible(&self) -> (u64, bool) {
        let _g = lock(&self.cq);
        // SAFETY: under the CQ lock (see the module doc).
        let mut cq = unsafe { self.uring.completion_shared() };
        let mut n = 0u64;
        let mut retry = false;
        for cqe in &mut cq {
            let ud = cqe.user_data();
            if ud == CANCEL_TAG {
                continue;
            }
            // A drain resubmits this one instead of delivering it.
            let res = cqe.result();
            let retried = res < 0
                // SAFETY: not a cancel CQE, so `ud` is an op in flight on
                // this ring; it stays alive at least until a drain consumes
                // its CQE, which cannot happen while we hold the CQ lock.
                && unsafe { direct::would_retry(&*(ud as *const Operation), res) };
            if retried {
                retry = true;
            } else {
                n += 1;
            }
        }
        // Peek only: dropping the queue would publish the advanced head.
        std::mem::forget(cq);
        (n + self.consumed.load(Ordering::Acquire), retry)
    }

    /// Blocks until `min` real completions became visible since `start`
    /// (`start` is a [`Ring::consumed`] value; CQEs still in the ring count
    /// too) or the deadline passes. Runs with the GIL released. With the
    /// GIL, `on_eintr` is called whenever a signal interrupted the wait, and
    /// `on_retry` when the ring holds an O_DIRECT EINVAL to be retried and
    /// not enough real completions yet: it must drain (a drain resubmits
    /// the request; nothing else would). An error from either aborts the
    /// wait.
    pub fn wait(
        &self,
        start: u64,
        min: u64,
        deadline: Option<Instant>,
        on_eintr: &mut dyn FnMut() -> PyResult<()>,
        on_retry: &mut dyn FnMut() -> PyResult<()>,
    ) -> PyResult<()> {
        // SAFETY: eventfd(2) takes no pointer.
        let mine = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if mine < 0 {
            return Err(PyErr::last_os());
        }
        {
            let mut w = lock(&self.waiters);
            w.push(mine);
            self.nwaiters.fetch_add(1, Ordering::SeqCst);
        }
        let r = self.wait_registered(mine, start, min, deadline, on_eintr, on_retry);
        {
            let mut w = lock(&self.waiters);
            w.retain(|&fd| fd != mine);
            self.nwaiters.fetch_sub(1, Ordering::SeqCst);
        }
        // SAFETY: `mine` is ours, and no longer listed for wake-ups.
        unsafe { libc::close(mine) };
        r
    }

    fn wait_registered(
        &self,
        mine: i32,
        start: u64,
        min: u64,
        deadline: Option<Instant>,
        on_eintr: &mut dyn FnMut() -> PyResult<()>,
        on_retry: &mut dyn FnMut() -> PyResult<()>,
    ) -> PyResult<()> {
        loop {
            match caio_core::py::allow_threads(|| self.wait_round(mine, start, min, deadline)) {
                WaitRound::Done => return Ok(()),
                WaitRound::Interrupted => on_eintr()?,
                WaitRound::Retry => on_retry()?,
                WaitRound::Again => {}
            }
        }
    }

    /// One look at the ring and, if that is not enough, one `poll(2)` on
    /// the ring eventfd and the waiter's own. Touches no Python object.
    fn wait_round(&self, mine: i32, start: u64, min: u64, deadline: Option<Instant>) -> WaitRound {
        if self.cq_overflow() {
            self.get_events();
        }
        let (visible, retry) = self.visible();
        if visible.wrapping_sub(start) >= min {
            return WaitRound::Done;
        }
        if retry {
            return WaitRound::Retry;
        }
        let timeout_ms = match deadline {
            None => -1,
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return WaitRound::Done;
                }
                // Round up so that we never wake just before the deadline.
                let left = d - now + Duration::from_micros(999);
                i32::try_from(left.as_millis()).unwrap_or(i32::MAX)
            }
        };
        let mut fds = [
            libc::pollfd {
                fd: self.eventfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: mine,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if r < 0 {
            if caio_core::sys::last_errno() == libc::EINTR {
                return WaitRound::Interrupted;
            }
            return WaitRound::Again;
        }
        if fds[0].revents != 0 {
            self.consume_eventfd();
        }
        if fds[1].revents != 0 {
            let mut v = 0u64;
            // SAFETY: reads at most 8 bytes into `v`, a live u64.
            unsafe { libc::read(mine, (&raw mut v).cast(), 8) };
        }
        WaitRound::Again
    }

    /// Real completions consumed by drains so far: [`Ring::wait`] counts
    /// from this value.
    pub fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Acquire)
    }

    /// Reads (and resets) the ring eventfd counter; 0 when it was zero.
    /// Whoever consumes a notification passes it on to blocked waiters.
    pub fn consume_eventfd(&self) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads at most 8 bytes into `v`, a live u64.
        let r = unsafe { libc::read(self.eventfd, (&raw mut v).cast(), 8) };
        if r != 8 {
            return 0;
        }
        if self.nwaiters.load(Ordering::SeqCst) > 0 {
            let w = lock(&self.waiters);
            let one = 1u64;
            for &fd in w.iter() {
                // SAFETY: writes 8 bytes from `one`, a live u64.
                unsafe { libc::write(fd, (&raw const one).cast(), 8) };
            }
        }
        v
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

/// Builds the SQE of a claimed op (user_data = the op's address), from its
/// I/O window as `direct` readied it.
///
/// # Safety
/// The calling engine owns `o`: claimed (or its CQE consumed for a retry)
/// and not in the kernel.
unsafe fn sqe(o: &Operation) -> squeue::Entry {
    let fd = types::Fd(o.fd_i32());
    let entry = match o.kind {
        OpKind::Read | OpKind::Write => {
            // SAFETY: the engine owns `o` (contract above).
            let io = unsafe { o.io() };
            // DESIGN.md §6.2 uring-4g: never more than the kernel's single-transfer cap;
            // the partial count is reported and callers loop.
            let len = io.len.min(MAX_TRANSFER) as u32;
            if o.kind == OpKind::Read {
                opcode::Read::new(fd, io.ptr, len).offset(io.offset).build()
            } else {
                opcode::Write::new(fd, io.ptr, len)
                    .offset(io.offset)
                    .build()
            }
        }
        OpKind::ReadV | OpKind::WriteV => {
            // SAFETY: the engine owns `o` (contract above): its iovecs and
            // the buffers they describe stay valid until its completion.
            let (iov, count) = unsafe { o.iovecs() };
            // At most IOV_MAX (1024) entries: fits u32.
            let count = count as u32;
            if o.kind == OpKind::ReadV {
                opcode::Readv::new(fd, iov.cast::<libc::iovec>(), count)
                    .offset(o.offset)
                    .build()
            } else {
                opcode::Writev::new(fd, iov.cast::<libc::iovec>(), count)
                    .offset(o.offset)
                    .build()
            }
        }
        OpKind::Fsync => opcode::Fsync::new(fd).build(),
        OpKind::Fdsync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    };
    entry.user_data(ptr::from_ref(o) as u64)
}
