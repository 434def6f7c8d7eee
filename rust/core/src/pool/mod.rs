//! A native worker pool running positional I/O without the GIL.
//!
//! Completions leave a worker in one of two ways:
//! * **direct** (the default, upstream's documented semantics): the worker
//!   attaches to the interpreter and runs the op's callback itself
//!   ([`delivery`]);
//! * **queued**: once a [`CompletionQueue`] is installed, the worker only
//!   appends the op to it and, if the queue was empty, signals a wake-up fd.
//!   The event-loop thread drains the queue in one go — workers never touch
//!   the GIL and the loop is woken once per batch, not once per operation.
//!
//! Locks are never held while attaching to the interpreter or running Python.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{JoinHandle, ThreadId};

use crate::op::Operation;
use crate::sync::lock;

pub mod completion;
pub mod delivery;
pub mod io;
pub mod order;

pub use completion::CompletionQueue;
pub use delivery::{after_fork, before_fork, exit_deadline, exit_wait, interpreter_exiting};
pub(crate) use delivery::{register_atexit, FORK_HANDLERS};
pub use io::{execute, try_read_inline};

use delivery::{deliver_direct, OUTSTANDING};

/// An op travelling between threads; it carries the engine's strong
/// reference (taken by `op::begin`).
pub struct Job(pub *mut Operation);

// SAFETY: the reference is only used by one thread at a time, and only
// touched as a Python object by a thread attached to the interpreter.
unsafe impl Send for Job {}

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
    /// fds the workers found to be open with O_DIRECT (see [`execute`]).
    direct: crate::direct::FdCache,
    /// Syncs held back until the writes before them are done (`order`).
    order: order::Order,
}

pub struct Pool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<(ThreadId, JoinHandle<()>)>>,
    size: usize,
}

/// How long an idle worker polls for new work before going to sleep. Long
/// enough to cover an event loop's round trip, so a steady stream of
/// operations never pays a futex wake-up per op.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

impl Shared {
    /// Queues syncs released by [`order::Order::finished`] (ahead of newer
    /// work: they have waited already).
    fn requeue(&self, ready: Vec<Job>) {
        if ready.is_empty() {
            return;
        }
        let mut st = lock(&self.state);
        for job in ready.into_iter().rev() {
            st.queue.push_front(job);
        }
        self.pending.store(st.queue.len(), Ordering::Relaxed);
        drop(st);
        self.work.notify_all();
    }

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
                st = self
                    .work
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                st.idle -= 1;
            }
        }
    }
}

fn worker(shared: Arc<Shared>) {
    while let Some(job) = shared.next_job() {
        let op = job.0;
        stall_for_test(op);
        // SAFETY: a queued job is an in-flight op owned by this pool (its
        // engine), now run by this worker only.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            execute(&*op, Some(&shared.direct))
        }))
        .unwrap_or(crate::sys::neg(libc::EIO));
        // The syncs this write was the last to hold back (taken while the
        // op is certainly alive: delivery may free it).
        // SAFETY: the job's live in-flight op.
        let ready = unsafe { shared.order.finished(op) };
        match shared.completions.get() {
            Some(q) if shared.queued.load(Ordering::Acquire) => q.push(job, result),
            // SAFETY: the job's in-flight op; workers are never attached.
            _ => unsafe { deliver_direct(job, result) },
        }
        // Only now may they run: the write's completion is queued (or
        // delivered) first, so a sync is never seen to finish before a write
        // it covers — also when another worker takes it at once.
        shared.requeue(ready);
        OUTSTANDING.fetch_sub(1, Ordering::SeqCst);
    }
    delivery::worker_exit();
}

/// Test hook `CAIO_TEST_POOL_STALL_MS`: a worker sleeps that long before
/// running a write (a stuck worker, or a write an fsync could overtake).
/// Nothing in builds without the test hooks.
fn stall_for_test(op: *mut Operation) {
    if !crate::test_hooks::ENABLED {
        return;
    }
    // SAFETY: a live in-flight op (the job's reference); `kind` is immutable.
    let kind = unsafe { (*op).kind };
    if !matches!(kind, crate::op::OpKind::Write | crate::op::OpKind::WriteV) {
        return;
    }
    if let Some(ms) = crate::test_hooks::env_parse::<u64>("CAIO_TEST_POOL_STALL_MS") {
        std::thread::sleep(std::time::Duration::from_millis(ms));
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
            direct: crate::direct::FdCache::new(),
            order: order::Order::default(),
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

    /// Whether the workers found `fd` to be open with O_DIRECT (a read on it
    /// is not worth a non-blocking attempt on the submitting thread: it
    /// would fail with `EINVAL`).
    pub fn knows_direct(&self, fd: i32) -> bool {
        self.shared.direct.contains(fd)
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
        OUTSTANDING.fetch_add(1, Ordering::SeqCst);
        // SAFETY: a queued job is a live in-flight op (its reference).
        match unsafe { self.shared.order.submitted(job) } {
            order::Admit::Run(job) => st.queue.push_back(job),
            // Held back until the writes to its fd before it are done.
            order::Admit::Held => return Ok(()),
        }
        self.shared.pending.store(st.queue.len(), Ordering::Relaxed);
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
        let job = match st.queue.iter().position(|j| j.0 == op) {
            Some(pos) => st.queue.remove(pos)?,
            // A sync held back behind writes has not started either.
            None => self.shared.order.take_held(op)?,
        };
        // A cancelled write no longer holds back the syncs after it.
        // SAFETY: the job taken back carries the op's reference.
        for ready in unsafe { self.shared.order.finished(job.0) }
            .into_iter()
            .rev()
        {
            st.queue.push_front(ready);
        }
        self.shared.pending.store(st.queue.len(), Ordering::Relaxed);
        drop(st);
        self.shared.work.notify_all();
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
        if join {
            self.shutdown_until(None);
            return;
        }
        lock(&self.shared.state).closed = true;
        self.shared.closing.store(true, Ordering::Relaxed);
        self.shared.work.notify_all();
        drop(std::mem::take(&mut *lock(&self.threads)));
    }

    /// [`Pool::shutdown`] with joining, bounded by `deadline` (if given):
    /// a worker still busy then (stuck in a read of an idle pipe...) is
    /// detached with its job, which completes whenever it does. True when
    /// every worker ended. Same GIL rule as `shutdown`.
    pub fn shutdown_until(&self, deadline: Option<std::time::Instant>) -> bool {
        lock(&self.shared.state).closed = true;
        self.shared.closing.store(true, Ordering::Relaxed);
        self.shared.work.notify_all();
        let me = std::thread::current().id();
        let threads = std::mem::take(&mut *lock(&self.threads));
        let mut all = true;
        for (id, h) in threads {
            if id == me {
                continue;
            }
            if let Some(d) = deadline {
                while !h.is_finished() && std::time::Instant::now() < d {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                if !h.is_finished() {
                    all = false;
                    continue; // detached
                }
            }
            let _ = h.join();
        }
        all
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
