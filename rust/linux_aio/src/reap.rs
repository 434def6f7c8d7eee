//! Completion: kernel events (read from the completion ring in user space)
//! and worker-pool results become deliveries, which run (callbacks, futures)
//! on the caller's thread once every lock is released.
//!
//! * [`AioContext::collect`] takes worker results first, then kernel
//!   events. A kernel event of an `RWF_NOWAIT` attempt the kernel refused
//!   (or did only partly) is not delivered: it feeds the
//!   [`Route`](crate::route::Route) and the op goes to a worker, which
//!   finishes the rest ([`combine`] adds what the kernel had moved).
//! * [`AioContext::deliver`] / [`AioContext::drain`] are what
//!   `process_events()`, `_reap()`, `_drain()` and the asyncio adapter use;
//!   [`AioContext::wait_and_deliver`] is `process_events()` with waiting.
//!
//! Both kinds of completion signal the same eventfd (the Context's
//! `fileno`).

use std::ffi::c_int;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caio_core::op::{self, Delivery, OpKind, Operation};
use caio_core::pool::{self, CompletionQueue};
use caio_core::py::{allow_threads, PyErr, PyResult};
use caio_core::pyo3_ffi::PyErr_CheckSignals;
use caio_core::sys;

use crate::abi::{self, IoEvent, Iocb, Ring, RWF_NOWAIT};
use crate::engine::{read_counter, AioContext, Handle, Reap};
use crate::submit::TAG_BUFFERED;

/// How many completions one `deliver` round takes by default
/// (`process_events()`'s `max_requests=0`, `_reap()`, each round of
/// `_drain()`).
pub(crate) const DEFAULT_EVENTS: usize = 512;

/// Final result of an op that had `done` bytes moved before `r` was added.
fn combine(done: u64, r: i64) -> i64 {
    if r >= 0 {
        done as i64 + r
    } else if done > 0 {
        // POSIX partial transfer: report what did happen.
        done as i64
    } else {
        r
    }
}

/// Whether a non-blocking read that moved `n` bytes stopped at end of file
/// (then it is final) rather than at a page that is not cached.
unsafe fn at_eof(o: &Operation, n: u64) -> bool {
    let mut st: libc::stat = std::mem::zeroed();
    if libc::fstat(o.fd_i32(), &mut st) != 0 || (st.st_mode & libc::S_IFMT) != libc::S_IFREG {
        return false;
    }
    o.io().offset.saturating_add(n) >= st.st_size as u64
}

impl AioContext {
    /// One kernel completion. Returns whether it was delivered (`false`: it
    /// went to the worker pool and will come back through the queue).
    unsafe fn on_event(
        &self,
        reap: &mut Reap,
        queue: &Arc<CompletionQueue>,
        ev: &IoEvent,
        out: &mut Vec<Delivery>,
    ) -> bool {
        let op = (ev.data & !TAG_BUFFERED) as *mut Operation;
        let o = &*op;
        let cb = &mut *(o.engine_area() as *mut Iocb);
        let mut res = ev.res;
        if cb.rw_flags & RWF_NOWAIT != 0 {
            cb.rw_flags &= !RWF_NOWAIT;
            // EAGAIN: data not cached / would block. EOPNOTSUPP: no
            // non-blocking buffered writes on this filesystem (ext4).
            // EINVAL: kernels before 5.x reject NOWAIT buffered writes that
            // way; a worker re-runs the op, so a genuine EINVAL still comes
            // back from pread/pwrite.
            let refused = res == -(libc::EAGAIN as i64)
                || res == -(libc::EOPNOTSUPP as i64)
                || res == -(libc::EINVAL as i64);
            // A short non-blocking read stopped at an uncached page unless it
            // reached the end of the file.
            let partial = res > 0
                && (res as u64) < cb.nbytes
                && !(o.kind == OpKind::Read && at_eof(o, res as u64));
            if ev.data & TAG_BUFFERED != 0 {
                self.routes.of(o.kind).record(refused || partial);
            }
            if refused || partial {
                let done = if partial { res as u64 } else { 0 };
                cb.reserved2 = done;
                if done > 0 {
                    o.io_advance(done as usize);
                }
                if self.to_pool(reap, queue, op) {
                    return false;
                }
                // No worker thread could be started: do it here.
                res = combine(done, pool::execute(o));
            }
        }
        out.push(op::finish(op, res));
        true
    }

    /// Collects up to `max` deliveries (worker results first, then the
    /// kernel ring). Caller holds the handle (shared) and the reap lock.
    unsafe fn collect(&self, h: &Handle, reap: &mut Reap, max: usize, out: &mut Vec<Delivery>) {
        let Some(queue) = h.queue.as_ref() else {
            return;
        };
        if reap.backlog.is_empty() && reap.pool.is_some() {
            let mut v = std::mem::take(&mut reap.scratch);
            queue.take(&mut v);
            reap.backlog.extend(v.drain(..));
            reap.scratch = v;
        }
        while out.len() < max {
            let Some((job, r)) = reap.backlog.pop_front() else {
                break;
            };
            let o = &*job.0;
            let done = (*(o.engine_area() as *const Iocb)).reserved2;
            out.push(op::finish(job.0, combine(done, r)));
        }
        if out.len() >= max || h.aio == 0 {
            return;
        }
        if h.user_ring {
            if let Some(ring) = Ring::of(h.aio) {
                let want = max - out.len();
                ring.consume(want, |ev| self.on_event(reap, queue, ev, out));
                return;
            }
        }
        // Unknown ring layout: ask the kernel.
        loop {
            let want = (max - out.len()).min(1024);
            if want == 0 {
                break;
            }
            let mut events = std::mem::take(&mut reap.events);
            events.resize(want, IoEvent::default());
            let got = abi::io_getevents_nowait(h.aio, &mut events).unwrap_or(0);
            for ev in &events[..got] {
                self.on_event(reap, queue, ev, out);
            }
            reap.events = events;
            if got < want {
                break;
            }
        }
    }

    /// Delivers up to `max` completions: records them under the locks, then
    /// (locks released) runs callbacks / resolves futures.
    pub(crate) unsafe fn deliver(&self, max: usize) -> usize {
        let mut out = Vec::new();
        {
            let h = self.read();
            if h.queue.is_none() {
                return 0;
            }
            let mut reap = self.lock_reap();
            self.collect(&h, &mut reap, max, &mut out);
        }
        let n = out.len();
        if n > 0 {
            self.in_flight.fetch_sub(n, Ordering::AcqRel);
            self.release_if_idle();
            for d in out {
                d.run();
            }
        }
        n
    }
}

enum Wait {
    Ready,
    Timeout,
    Interrupted,
    Failed(i32),
}

fn wait_readable(fd: i32, timeout_ms: c_int) -> Wait {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    match unsafe { libc::poll(&mut p, 1, timeout_ms) } {
        0 => Wait::Timeout,
        r if r > 0 => Wait::Ready,
        _ => match sys::last_errno() {
            libc::EINTR => Wait::Interrupted,
            e => Wait::Failed(e),
        },
    }
}

impl AioContext {
    /// Resets the eventfd counter, then delivers every available completion.
    pub(crate) unsafe fn drain(&self) -> usize {
        {
            let h = self.read();
            if let Some(q) = h.queue.as_ref() {
                let _ = read_counter(q.fileno());
            }
        }
        let mut total = 0usize;
        loop {
            let n = self.deliver(DEFAULT_EVENTS);
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    }
}

impl AioContext {
    /// `process_events()` after argument checks: delivers up to `max`
    /// completions; with `min > 0` and `timeout != 0`, first waits (GIL
    /// released) on the eventfd until `min` were delivered or `timeout`
    /// seconds passed (`timeout < 0`: no limit). Returns how many were
    /// delivered.
    pub(crate) unsafe fn wait_and_deliver(
        &self,
        max: usize,
        min: usize,
        timeout: i32,
    ) -> PyResult<usize> {
        let deadline = (timeout > 0).then(|| Instant::now() + Duration::from_secs(timeout as u64));
        let mut n = 0usize;
        loop {
            n += self.deliver(max - n);
            if n >= min || timeout == 0 {
                break;
            }
            let Some(q) = self.queue() else {
                break; // closed meanwhile
            };
            let wait_ms: c_int = match deadline {
                None => -1,
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    let left = d - now;
                    (left.as_millis() + u128::from(left.subsec_nanos() % 1_000_000 != 0))
                        .min(c_int::MAX as u128) as c_int
                }
            };
            match allow_threads(|| wait_readable(q.fileno(), wait_ms)) {
                Wait::Ready => {
                    let got = self.deliver(max - n);
                    n += got;
                    if got == 0 {
                        // A notification for completions already delivered
                        // (by an earlier call or another thread): consume it,
                        // or poll() would keep reporting the fd readable. The
                        // loop drains once more, so a completion signalled
                        // just now is not missed.
                        let _ = read_counter(q.fileno());
                    }
                }
                Wait::Timeout => {}
                Wait::Interrupted => {
                    // API.md §7 Q11: run signal handlers; an exception from
                    // one propagates, otherwise keep waiting.
                    if PyErr_CheckSignals() != 0 {
                        return Err(PyErr::Fetched);
                    }
                }
                Wait::Failed(e) => return Err(PyErr::os(e)),
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_results() {
        assert_eq!(combine(0, 4096), 4096);
        assert_eq!(combine(100, 3996), 4096);
        assert_eq!(combine(100, -5), 100);
        assert_eq!(combine(0, -11), -11);
        assert_eq!(combine(100, 0), 100);
    }
}
