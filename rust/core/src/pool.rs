//! A native worker pool running positional I/O without the GIL.
//!
//! Completions leave a worker in one of two ways:
//! * **direct** (the default, upstream's documented semantics): the worker
//!   attaches to the interpreter and runs the op's callback itself;
//! * **queued**: once a [`CompletionQueue`] is installed, the worker only
//!   appends the op to it and, if the queue was empty, signals a wake-up fd.
//!   The event-loop thread drains the queue in one go — workers never touch
//!   the GIL and the loop is woken once per batch, not once per operation.
//!
//! Locks are never held while attaching to the interpreter or running Python.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use pyo3_ffi::*;

use crate::op::{finish, OpKind, Operation};
use crate::sys;

/// An op travelling between threads; it carries the engine's strong
/// reference (taken by `op::begin`).
pub struct Job(pub *mut Operation);
// SAFETY: the reference is only used by one thread at a time, and only touched
// as a Python object by a thread attached to the interpreter.
unsafe impl Send for Job {}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------

/// Completed ops waiting for the event-loop thread.
pub struct CompletionQueue {
    done: Mutex<Vec<(Job, i64)>>,
    wake: sys::WakeFd,
    /// `take()` consumes the wake-up fd's notifications (see [`Self::new_shared`]).
    drain_on_take: bool,
}

impl CompletionQueue {
    pub fn new() -> std::io::Result<CompletionQueue> {
        Ok(CompletionQueue {
            done: Mutex::new(Vec::with_capacity(64)),
            wake: sys::WakeFd::new()?,
            drain_on_take: true,
        })
    }

    /// A queue whose wake-up fd is shared with another completion source
    /// (linux_aio registers it as the kernel AIO eventfd, so one fd wakes the
    /// event loop for both kernel and worker completions). The owner reads
    /// the fd itself, so [`Self::take`] leaves its counter alone.
    pub fn new_shared() -> std::io::Result<CompletionQueue> {
        Ok(CompletionQueue {
            drain_on_take: false,
            ..CompletionQueue::new()?
        })
    }

    pub fn fileno(&self) -> i32 {
        self.wake.fileno()
    }

    /// Called by any thread: queue a completion, wake the loop if needed.
    pub fn push(&self, job: Job, result: i64) {
        let was_empty = {
            let mut q = lock(&self.done);
            let was_empty = q.is_empty();
            q.push((job, result));
            was_empty
        };
        if was_empty {
            self.wake.signal();
        }
    }

    /// Swaps the pending completions into `out` (which must be empty). The
    /// wake-up fd is drained first (unless shared), so a completion pushed
    /// after the swap signals again and is never stranded.
    pub fn take(&self, out: &mut Vec<(Job, i64)>) {
        debug_assert!(out.is_empty());
        if self.drain_on_take {
            let _ = self.wake.drain();
        }
        std::mem::swap(&mut *lock(&self.done), out);
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.done).is_empty()
    }

    /// Delivers everything queued (caller attached): records each completion,
    /// then runs the callbacks. Returns how many were delivered.
    ///
    /// # Safety
    /// Caller attached to the interpreter.
    pub unsafe fn deliver_all(&self) -> usize {
        let mut batch = Vec::new();
        self.take(&mut batch);
        let n = batch.len();
        // Publish every DONE before running any callback: a callback may
        // re-enter the context and must find this batch consumed.
        let deliveries: Vec<_> = batch
            .into_iter()
            .map(|(job, res)| finish(job.0, res))
            .collect();
        for d in deliveries {
            d.run();
        }
        n
    }
}

// ---------------------------------------------------------------------------
// process-wide shutdown coordination for direct delivery

/// Set when the interpreter starts shutting down; from then on workers never
/// attach to it (callbacks of later completions are not run).
static STOPPING: AtomicBool = AtomicBool::new(false);
/// Workers currently between "decided to attach" and "detached again".
static ATTACHING: AtomicUsize = AtomicUsize::new(0);
/// Jobs accepted by any pool and not yet delivered/discarded.
static OUTSTANDING: AtomicUsize = AtomicUsize::new(0);

/// In a child process after `fork()` (async-signal-safe): the parent's
/// workers do not exist here, so neither the jobs they had outstanding nor
/// the ones about to attach can ever finish. Left as they were, the counters
/// make [`interpreter_exiting`] wait 5 s for `OUTSTANDING`, then forever for
/// `ATTACHING` (a worker waiting for the GIL at the moment of the fork).
#[cfg_attr(not(unix), allow(dead_code))]
pub(crate) fn after_fork_in_child() {
    OUTSTANDING.store(0, Ordering::SeqCst);
    ATTACHING.store(0, Ordering::SeqCst);
    FORKING.store(false, Ordering::SeqCst);
}

/// Set from `os.fork()`'s "before" hook until its "after" hooks: workers with
/// a completion to deliver wait *before* attaching. `PyGILState_Ensure` and
/// `Release` create and destroy a thread state under CPython's runtime locks;
/// a fork landing in the middle of that leaves such a lock held in the child,
/// whose interpreter then hangs at exit (seen on free-threaded 3.13: the
/// child's final GC blocked in stop-the-world).
static FORKING: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread is running a direct delivery (a callback may fork).
    static DELIVERING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `os.fork()` "before" hook (attached): stops workers from attaching and
/// waits (GIL released, so a worker already waiting for the GIL can finish)
/// until none is attached — bounded, because a callback running in a worker
/// may itself wait for the forking thread.
pub fn before_fork() {
    FORKING.store(true, Ordering::SeqCst);
    let own = usize::from(DELIVERING.with(|d| d.get()));
    crate::py::allow_threads(|| {
        wait_while(
            Some(Duration::from_secs(2)),
            Duration::from_micros(200),
            || ATTACHING.load(Ordering::SeqCst) > own,
        )
    });
}

/// `os.fork()` "after" hook, in the parent and in the child.
pub fn after_fork() {
    FORKING.store(false, Ordering::SeqCst);
}

/// Called from an `atexit` hook (attached, Python still fully alive): lets
/// queued work finish and deliver for a bounded time, then stops workers from
/// ever attaching again, waiting for the ones already attaching.
pub fn interpreter_exiting() {
    crate::py::allow_threads(|| {
        let step = Duration::from_millis(1);
        wait_while(Some(Duration::from_secs(5)), step, || {
            OUTSTANDING.load(Ordering::SeqCst) > 0
        });
        STOPPING.store(true, Ordering::SeqCst);
        wait_while(None, step, || ATTACHING.load(Ordering::SeqCst) > 0);
    });
}

/// Sleeps in `step`s while `busy()` holds, at most `limit` (if given). For
/// the process-wide counters above; the caller has released the GIL.
fn wait_while(limit: Option<Duration>, step: Duration, busy: impl Fn() -> bool) {
    let deadline = limit.map(|l| std::time::Instant::now() + l);
    while busy() && deadline.is_none_or(|d| std::time::Instant::now() < d) {
        std::thread::sleep(step);
    }
}

#[cfg(Py_3_13)]
fn is_finalizing() -> bool {
    unsafe { Py_IsFinalizing() != 0 }
}

#[cfg(not(Py_3_13))]
fn is_finalizing() -> bool {
    // Before 3.13 there is no public check; the atexit hook covers it.
    false
}

unsafe fn deliver_direct(job: Job, result: i64) {
    // Count ourselves in, then look at FORKING (both SeqCst): either the
    // forking thread sees us in ATTACHING and waits, or we see its flag and
    // step back until the fork is done.
    loop {
        ATTACHING.fetch_add(1, Ordering::SeqCst);
        if !FORKING.load(Ordering::SeqCst) {
            break;
        }
        ATTACHING.fetch_sub(1, Ordering::SeqCst);
        while FORKING.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
    if STOPPING.load(Ordering::SeqCst) || is_finalizing() {
        // The interpreter is going away: running Python is no longer
        // possible. The I/O itself has completed; the op is leaked on purpose.
        ATTACHING.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let g = PyGILState_Ensure();
    let d = finish(job.0, result);
    DELIVERING.with(|f| f.set(true));
    d.run();
    DELIVERING.with(|f| f.set(false));
    PyGILState_Release(g);
    ATTACHING.fetch_sub(1, Ordering::SeqCst);
}

// ---------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    Full,
    Closed,
}

struct State {
    queue: VecDeque<Job>,
    closed: bool,
    idle: usize,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    max_queued: usize,
    completions: OnceLock<Arc<CompletionQueue>>,
    /// Set (once, never cleared) when completions go to `completions`.
    queued: AtomicBool,
    /// Queue length, readable without the lock (for the spinning worker).
    pending: AtomicUsize,
    /// Workers currently polling for work (0 or 1).
    spinning: AtomicUsize,
    closing: AtomicBool,
}

pub struct Pool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<(ThreadId, JoinHandle<()>)>>,
    size: usize,
}

/// Runs the op's I/O on the calling thread (no GIL). Returns bytes moved or
/// `-errno`.
///
/// # Safety
/// `op` must be in flight and owned by the caller's engine.
pub unsafe fn execute(op: &Operation) -> i64 {
    let r = execute_once(op);
    if r == -(libc::EINVAL as i64) && (op.offset as i64) >= 0 && op.io_is_pristine() {
        // O_DIRECT needs aligned memory, and a read lands in a `bytes`
        // object (never aligned) or a write comes from one: once EINVAL
        // says so, retry through an aligned bounce window (a read's window
        // also covers any offset and length). A write's file offset and
        // length cannot be fixed up: if they are unaligned, the kernel's
        // EINVAL comes back again and stands.
        if let Some(align) = sys::direct_io_alignment(op.fd_i32()) {
            if matches!(op.kind, OpKind::Read | OpKind::Write) {
                return match op.use_aligned_window(align) {
                    Ok(()) => execute_once(op),
                    Err(_) => -(libc::ENOMEM as i64),
                };
            }
        }
    }
    r
}

unsafe fn execute_once(op: &Operation) -> i64 {
    let fd = op.fd_i32();
    let io = op.io();
    match op.kind {
        OpKind::Read => sys::pread(fd, io.ptr, io.len, io.offset as i64),
        OpKind::Write => sys::pwrite(fd, io.ptr, io.len, io.offset as i64),
        OpKind::Fsync => sys::fsync(fd),
        OpKind::Fdsync => sys::fdatasync(fd),
    }
}

/// How long an idle worker polls for new work before going to sleep. Long
/// enough to cover an event loop's round trip, so a steady stream of
/// operations never pays a futex wake-up per op.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

impl Shared {
    /// Pops a job, or returns `None` once the pool is closed and drained.
    fn next_job(&self) -> Option<Job> {
        loop {
            {
                let mut st = lock(&self.state);
                if let Some(job) = st.queue.pop_front() {
                    self.pending.store(st.queue.len(), Ordering::Relaxed);
                    // Leave a backlog to a sleeper if nobody else is looking.
                    let wake = !st.queue.is_empty()
                        && st.idle > 0
                        && self.spinning.load(Ordering::Relaxed) == 0;
                    drop(st);
                    if wake {
                        self.work.notify_one();
                    }
                    return Some(job);
                }
                if st.closed {
                    return None;
                }
            }
            // One worker at a time polls briefly instead of sleeping.
            if self
                .spinning
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                let deadline = std::time::Instant::now() + SPIN;
                let mut found = false;
                let mut n = 0u32;
                while std::time::Instant::now() < deadline {
                    if self.pending.load(Ordering::Relaxed) > 0
                        || self.closing.load(Ordering::Relaxed)
                    {
                        found = true;
                        break;
                    }
                    n += 1;
                    if n % 16 == 0 {
                        // Give the CPU away if the event loop shares this core.
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
                // Cleared under the lock so a submitter that saw "someone is
                // spinning" is ordered before our final check below.
                let st = lock(&self.state);
                self.spinning.store(0, Ordering::Relaxed);
                drop(st);
                if found {
                    continue;
                }
            }
            let mut st = lock(&self.state);
            if st.queue.is_empty() && !st.closed {
                st.idle += 1;
                st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
                st.idle -= 1;
            }
        }
    }
}

/// Set once `preadv2` turned out not to exist (kernel < 4.6).
static NOWAIT_MISSING: AtomicBool = AtomicBool::new(false);

/// Tries to complete a read from the page cache on the calling thread
/// (`RWF_NOWAIT`: never waits for the disk). Returns the final result, or
/// `None` when the read must go to the pool: data not (fully) cached, or the
/// kernel/filesystem cannot do non-blocking reads. A partially cached range
/// is continued, so a short result only ever means end of file — callers
/// (aiofile) treat short reads as EOF.
///
/// # Safety
/// `op` must be claimed by the caller and not yet handed to any engine.
pub unsafe fn try_read_inline(op: &Operation) -> Option<i64> {
    if op.kind != OpKind::Read || NOWAIT_MISSING.load(Ordering::Relaxed) {
        return None;
    }
    let io = op.io();
    if (io.offset as i64) < 0 {
        // preadv2 treats -1 as "use the file position": leave it to pread,
        // which rejects negative offsets.
        return None;
    }
    let fd = op.fd_i32();
    let mut done = 0usize;
    // At least one call, even for a zero-length read: the kernel still
    // checks the fd (EBADF, EISDIR, ...), as pread does on the pool.
    loop {
        let r = sys::pread_nowait(fd, io.ptr.add(done), io.len - done, io.offset + done as u64);
        if r > 0 {
            done += r as usize;
            if done < io.len {
                continue;
            }
            break;
        }
        if r == 0 {
            break; // end of file (or nothing asked for)
        }
        return match (-r) as i32 {
            libc::ENOSYS => {
                NOWAIT_MISSING.store(true, Ordering::Relaxed);
                None
            }
            libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::EINTR => None,
            _ if done > 0 => Some(done as i64),
            _ => Some(r),
        };
    }
    Some(done as i64)
}

fn worker(shared: Arc<Shared>) {
    while let Some(job) = shared.next_job() {
        let op = job.0;
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { execute(&*op) }))
                .unwrap_or(-(libc::EIO as i64));
        match shared.completions.get() {
            Some(q) if shared.queued.load(Ordering::Acquire) => q.push(job, result),
            _ => unsafe { deliver_direct(job, result) },
        }
        OUTSTANDING.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    pub fn new(size: usize, max_queued: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(max_queued.min(1024)),
                closed: false,
                idle: 0,
            }),
            work: Condvar::new(),
            max_queued,
            completions: OnceLock::new(),
            queued: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            spinning: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
        });
        let pool = Pool {
            shared,
            threads: Mutex::new(Vec::with_capacity(size)),
            size,
        };
        for _ in 0..size {
            let s = pool.shared.clone();
            let h = std::thread::Builder::new()
                .name("caio-worker".into())
                .stack_size(256 * 1024)
                .spawn(move || worker(s));
            match h {
                Ok(h) => lock(&pool.threads).push((h.thread().id(), h)),
                Err(e) => {
                    pool.shutdown(false);
                    return Err(e);
                }
            }
        }
        Ok(pool)
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The queue (created on first use) whose fd an event loop watches.
    /// Completions only go there after [`Pool::enable_queued_delivery`].
    pub fn completion_queue(&self) -> std::io::Result<Arc<CompletionQueue>> {
        if let Some(q) = self.shared.completions.get() {
            return Ok(q.clone());
        }
        let q = Arc::new(CompletionQueue::new()?);
        Ok(self.shared.completions.get_or_init(|| q).clone())
    }

    /// Makes `q` the queue completions go to (instead of one created on
    /// demand), e.g. a [`CompletionQueue::new_shared`] queue. Must happen
    /// before [`Pool::completion_queue`]/[`Pool::enable_queued_delivery`]; if
    /// a queue is already installed, `q` is handed back.
    pub fn install_completion_queue(
        &self,
        q: Arc<CompletionQueue>,
    ) -> Result<(), Arc<CompletionQueue>> {
        self.shared.completions.set(q)
    }

    /// Switches (for good) from direct to queued delivery. Call it once the
    /// queue's fd is watched, so no completion can be stranded.
    pub fn enable_queued_delivery(&self) -> std::io::Result<()> {
        self.completion_queue()?;
        self.shared.queued.store(true, Ordering::Release);
        Ok(())
    }

    pub fn queued_delivery(&self) -> Option<&Arc<CompletionQueue>> {
        self.shared.completions.get()
    }

    /// Enqueues a claimed op. On error the job is handed back untouched.
    pub fn submit(&self, job: Job) -> Result<(), (Job, SubmitError)> {
        let mut st = lock(&self.shared.state);
        if st.closed {
            return Err((job, SubmitError::Closed));
        }
        if st.queue.len() >= self.shared.max_queued {
            return Err((job, SubmitError::Full));
        }
        st.queue.push_back(job);
        self.shared.pending.store(st.queue.len(), Ordering::Relaxed);
        OUTSTANDING.fetch_add(1, Ordering::SeqCst);
        // A spinning worker will pick it up; otherwise wake a sleeper.
        let wake = st.idle > 0 && self.shared.spinning.load(Ordering::Relaxed) == 0;
        drop(st);
        if wake {
            self.shared.work.notify_one();
        }
        Ok(())
    }

    /// Takes back a job that no worker has started yet (a real cancel for
    /// queued work); the caller then finishes the op itself. `None` when it
    /// is running or already done.
    pub fn try_cancel(&self, op: *mut Operation) -> Option<Job> {
        let mut st = lock(&self.shared.state);
        let pos = st.queue.iter().position(|j| j.0 == op)?;
        let job = st.queue.remove(pos)?;
        self.shared.pending.store(st.queue.len(), Ordering::Relaxed);
        OUTSTANDING.fetch_sub(1, Ordering::SeqCst);
        Some(job)
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.shared.state).closed
    }

    /// Stops accepting work; with `join`, waits until every queued and running
    /// job has finished (the calling thread, if it is one of the workers, is
    /// detached instead). Must be called WITHOUT the GIL when `join` is set,
    /// because direct-delivery workers need it to finish.
    pub fn shutdown(&self, join: bool) {
        lock(&self.shared.state).closed = true;
        self.shared.closing.store(true, Ordering::Relaxed);
        self.shared.work.notify_all();
        let me = std::thread::current().id();
        let threads = std::mem::take(&mut *lock(&self.threads));
        for (id, h) in threads {
            if join && id != me {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Detach whatever is left; idle workers exit on their own.
        lock(&self.shared.state).closed = true;
        self.shared.closing.store(true, Ordering::Relaxed);
        self.shared.work.notify_all();
    }
}
