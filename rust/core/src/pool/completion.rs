//! The queue through which workers hand completions to the event-loop
//! thread: workers push, the loop's reader drains and delivers in one go.

use std::sync::Mutex;

use super::Job;
use crate::op::finish;
use crate::sync::lock;
use crate::sys;

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
        // Publish every Done before running any callback: a callback may
        // re-enter the context and must find this batch consumed.
        let deliveries: Vec<_> = batch
            .into_iter()
            // SAFETY: each queued job is an in-flight op whose engine
            // reference the queue carried; attached (caller's contract);
            // only this drain finishes it.
            .map(|(job, res)| unsafe { finish(job.0, res) })
            .collect();
        for d in deliveries {
            d.run();
        }
        n
    }
}
