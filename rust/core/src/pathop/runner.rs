//! The path runner's threads: a queue of jobs, `caio-pathop` workers that
//! run them without the GIL, and the list of finished jobs with the wake-up
//! fd the event loop watches. No Python here: [`super::pytype`] submits and
//! drains, attached.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use super::engine::Engine;
use super::job::{self, Job};
use crate::sync::lock;
use crate::sys::WakeFd;

struct Queue {
    jobs: VecDeque<Box<Job>>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
    // Boxed: a job moves queue → worker → list → drain without copying.
    #[allow(clippy::vec_box)]
    done: Mutex<Vec<Box<Job>>>,
    wake: WakeFd,
    /// Submitted and not yet taken by a drain.
    in_flight: AtomicUsize,
    /// The current burst of jobs completed on the submitting thread (see
    /// [`Runner::inline_allowed`]): when it started and when its last job
    /// was tried, in nanoseconds since [`epoch`]; 0: no burst.
    burst_start: AtomicU64,
    burst_last: AtomicU64,
    /// The longest burst of inline work (ns); 0: jobs are never tried on
    /// the submitting thread.
    slice_ns: u64,
}

/// See [`Runner::inline_allowed`]: a job this long after the previous one
/// starts a new burst.
pub const INLINE_GAP_NS: u64 = 1_000_000;

fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let e = *EPOCH.get_or_init(Instant::now);
    u64::try_from(e.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

pub struct Runner {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The backend's engine, offered every job first (see [`super::engine`]).
    engine: Option<Box<dyn Engine>>,
}

fn worker(shared: &Shared) {
    loop {
        let mut job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.closed {
                    return;
                }
                q = shared
                    .work
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job::run(&mut job))).is_err() {
            job.outcome = job::Outcome::Failed(libc::EIO);
        }
        let was_empty = {
            let mut d = lock(&shared.done);
            let was_empty = d.is_empty();
            d.push(job);
            was_empty
        };
        if was_empty {
            shared.wake.signal();
        }
    }
}

impl Runner {
    /// Starts `workers` threads (at least one); `slice_ns`: see
    /// [`Runner::inline_allowed`] (0: no inline attempts). The backend's
    /// engine, if it registered one, is built on the wake-up fd.
    pub fn new(workers: usize, slice_ns: u64) -> std::io::Result<Runner> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            work: Condvar::new(),
            done: Mutex::new(Vec::new()),
            wake: WakeFd::new()?,
            in_flight: AtomicUsize::new(0),
            burst_start: AtomicU64::new(0),
            burst_last: AtomicU64::new(0),
            slice_ns,
        });
        let engine = super::engine::factory().and_then(|f| f(shared.wake.fileno()));
        let runner = Runner {
            shared,
            threads: Mutex::new(Vec::new()),
            engine,
        };
        for _ in 0..workers.max(1) {
            let s = runner.shared.clone();
            let h = std::thread::Builder::new()
                .name("caio-pathop".into())
                .stack_size(256 * 1024)
                .spawn(move || worker(&s));
            match h {
                Ok(h) => lock(&runner.threads).push(h),
                Err(e) => {
                    runner.stop(false);
                    return Err(e);
                }
            }
        }
        Ok(runner)
    }

    pub fn fileno(&self) -> i32 {
        self.shared.wake.fileno()
    }

    pub fn in_flight(&self) -> usize {
        let engine = self.engine.as_ref().map_or(0, |e| e.in_flight());
        self.shared.in_flight.load(Ordering::Acquire) + engine
    }

    /// Jobs the engine completed so far (0 without one).
    pub fn engine_completed(&self) -> u64 {
        self.engine.as_ref().map_or(0, |e| e.completed())
    }

    /// Whether the next job may be tried on the submitting thread. Inline
    /// jobs come in bursts of at most the runner's slice of wall-clock time
    /// (the loop thread's Python work between them included): the first job
    /// after that goes to a worker, whose completion makes the loop drain in
    /// a later iteration, which ends the burst. So the inline work of one
    /// loop iteration is bounded however many tasks share the runner, and a
    /// task whose files are all cached still yields to the loop now and then
    /// (the role of `SYNC_BUDGET`, DESIGN.md §5.3). A job coming more than
    /// [`INLINE_GAP_NS`] after the previous one starts a new burst (the loop
    /// thread was not busy with ours meanwhile).
    pub fn inline_allowed(&self) -> bool {
        let slice = self.shared.slice_ns;
        if slice == 0 {
            return false;
        }
        let now = now_ns();
        let sh = &self.shared;
        let last = sh.burst_last.swap(now, Ordering::Relaxed);
        let start = sh.burst_start.load(Ordering::Relaxed);
        if start == 0 || now.saturating_sub(last) > INLINE_GAP_NS {
            sh.burst_start.store(now, Ordering::Relaxed);
            return true;
        }
        now.saturating_sub(start) <= slice
    }

    /// A drain ran: the loop went through an iteration; the burst is over.
    pub fn refill(&self) {
        self.shared.burst_start.store(0, Ordering::Relaxed);
    }

    /// Starts a job on the engine, or queues it for a worker; hands it
    /// back when the runner is stopped.
    pub fn submit(&self, job: Box<Job>) -> Result<(), Box<Job>> {
        let job = match &self.engine {
            Some(e) => {
                if lock(&self.shared.queue).closed {
                    return Err(job);
                }
                match e.start(job) {
                    Ok(()) => return Ok(()),
                    Err(job) => job,
                }
            }
            None => job,
        };
        let mut q = lock(&self.shared.queue);
        if q.closed {
            return Err(job);
        }
        q.jobs.push_back(job);
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        drop(q);
        self.shared.work.notify_one();
        Ok(())
    }

    /// Takes the finished jobs, the workers' and the engine's (the
    /// wake-up fd is reset first, so a job finished after the swap signals
    /// again).
    #[allow(clippy::vec_box)]
    pub fn take_done(&self) -> Vec<Box<Job>> {
        let _ = self.shared.wake.drain();
        let mut done = std::mem::take(&mut *lock(&self.shared.done));
        self.shared
            .in_flight
            .fetch_sub(done.len(), Ordering::AcqRel);
        if let Some(e) = &self.engine {
            e.reap(&mut done);
        }
        done
    }

    /// Jobs no worker started (for the caller to release, attached).
    #[allow(clippy::vec_box)]
    pub fn take_queued(&self) -> Vec<Box<Job>> {
        let mut q = lock(&self.shared.queue);
        let jobs: Vec<_> = q.jobs.drain(..).collect();
        self.shared
            .in_flight
            .fetch_sub(jobs.len(), Ordering::AcqRel);
        jobs
    }

    /// Refuses new jobs; the workers finish the queue and end. With `join`,
    /// waits for them and shuts the engine down (its jobs are then reaped
    /// by [`Runner::take_done`]); call it detached from the interpreter.
    pub fn stop(&self, join: bool) {
        lock(&self.shared.queue).closed = true;
        self.shared.work.notify_all();
        let threads = std::mem::take(&mut *lock(&self.threads));
        if join {
            for h in threads {
                let _ = h.join();
            }
            if let Some(e) = &self.engine {
                e.shutdown();
            }
        }
    }
}
