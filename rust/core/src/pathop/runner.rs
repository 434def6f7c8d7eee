//! The path runner's threads: a queue of jobs, `caio-pathop` workers that
//! run them without the GIL, and the list of finished jobs with the wake-up
//! fd the event loop watches. No Python here: [`super::pytype`] submits and
//! drains, attached.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

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
    /// Consecutive jobs completed on the submitting thread (see
    /// [`Runner::inline_allowed`]).
    streak: AtomicUsize,
    /// Whether jobs may be tried on the submitting thread at all.
    inline: bool,
}

/// See [`Runner::inline_allowed`] (`MAX_SYNC_STREAK` of DESIGN.md §5.3).
pub const MAX_STREAK: usize = 32;

pub struct Runner {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
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
    /// Starts `workers` threads (at least one); `inline`: see
    /// [`Runner::inline_allowed`].
    pub fn new(workers: usize, inline: bool) -> std::io::Result<Runner> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            work: Condvar::new(),
            done: Mutex::new(Vec::new()),
            wake: WakeFd::new()?,
            in_flight: AtomicUsize::new(0),
            streak: AtomicUsize::new(0),
            inline,
        });
        let runner = Runner {
            shared,
            threads: Mutex::new(Vec::new()),
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
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Whether the next job may be tried on the submitting thread: after
    /// [`MAX_STREAK`] such jobs in a row one goes to a worker, so a task
    /// whose files are all cached still yields to the loop now and then.
    pub fn inline_allowed(&self) -> bool {
        if !self.shared.inline {
            return false;
        }
        let n = self.shared.streak.fetch_add(1, Ordering::Relaxed);
        if n + 1 >= MAX_STREAK {
            self.shared.streak.store(0, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Queues a job; hands it back when the runner is stopped.
    pub fn submit(&self, job: Box<Job>) -> Result<(), Box<Job>> {
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

    /// Takes the finished jobs (the wake-up fd is reset first, so a job
    /// finished after the swap signals again).
    #[allow(clippy::vec_box)]
    pub fn take_done(&self) -> Vec<Box<Job>> {
        let _ = self.shared.wake.drain();
        let done = std::mem::take(&mut *lock(&self.shared.done));
        self.shared
            .in_flight
            .fetch_sub(done.len(), Ordering::AcqRel);
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
    /// waits for them (call it detached from the interpreter).
    pub fn stop(&self, join: bool) {
        lock(&self.shared.queue).closed = true;
        self.shared.work.notify_all();
        let threads = std::mem::take(&mut *lock(&self.threads));
        if join {
            for h in threads {
                let _ = h.join();
            }
        }
    }
}
