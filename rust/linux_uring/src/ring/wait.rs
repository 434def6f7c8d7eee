//! Blocking until completions are visible ([`Ring::wait`], GIL released)
//! and the ring eventfd shared by several waiters.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use caio_core::op::Operation;
use caio_core::py::{PyErr, PyResult};

use super::{lock, Ring, CANCEL_TAG};
use crate::direct;

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

impl Ring {
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
