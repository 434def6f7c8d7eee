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

use crate::abi::{self, IoEvent, Ring, RWF_NOWAIT};
use crate::engine::{read_counter, AioContext, Handle, Reap};
use crate::submit::{self, TAG_BUFFERED};

/// How many completions one `deliver` round takes by default
/// (`process_events()`'s `max_requests=0`, `_reap()`, each round of
/// `_drain()`).
pub(crate) const DEFAULT_EVENTS: usize = 512;

/// Final result of an op that had `done` bytes moved before `r` was added.
fn combine(done: u64, r: i64) -> i64 {
    // `done` is part of an op's length, which fits in an i64.
    let done = i64::try_from(done).unwrap_or(i64::MAX);
    if r >= 0 {
        done.saturating_add(r)
    } else if done > 0 {
        // POSIX partial transfer: report what did happen.
        done
    } else {
        r
    }
}

/// Whether a non-blocking read that moved `n` bytes stopped at end of file
/// (then it is final) rather than at a page that is not cached.
///
/// # Safety
/// This engine owns the in-flight op `o` (its I/O window is read).
unsafe fn at_eof(o: &Operation, n: u64) -> bool {
    // SAFETY: `stat` is plain data, so all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat fills the struct it is given; a bad fd only fails.
    if unsafe { libc::fstat(o.fd_i32(), &raw mut st) } != 0
        || (st.st_mode & libc::S_IFMT) != libc::S_IFREG
    {
        return false;
    }
    // SAFETY: this engine owns the op (our contract).
    let end = unsafe { o.io() }.offset.saturating_add(n);
    // A regular file's size is never negative.
    end >= u64::try_from(st.st_size).unwrap_or(0)
}

impl AioContext {
    /// One kernel completion. Returns whether it was delivered (`false`: it
    /// went to the worker pool and will come back through the queue).
    ///
    /// # Safety
    /// Attached; the caller holds this context's handle (shared: the
    /// context is alive) and its reap lock (`reap`, with `queue` its
    /// completion queue); `ev` was read from this context's completion ring
    /// (or `io_getevents`), so its `data` is an op this engine submitted and
    /// the kernel is done with, reported exactly once.
    unsafe fn on_event(
        &self,
        reap: &mut Reap,
        queue: &Arc<CompletionQueue>,
        ev: &IoEvent,
        out: &mut Vec<Delivery>,
    ) -> bool {
        let op = (ev.data & !TAG_BUFFERED) as *mut Operation;
        // SAFETY: `op` is the in-flight op whose iocb this event completes
        // (our contract): alive (the engine holds its reference) and owned
        // by this engine alone now that the kernel is done with it.
        let (o, cb) = unsafe { (&*op, &mut *submit::iocb_of(&*op)) };
        let mut res = ev.res;
        if cb.rw_flags & RWF_NOWAIT != 0 {
            cb.rw_flags &= !RWF_NOWAIT;
            // EAGAIN: data not cached / would block. EOPNOTSUPP: no
            // non-blocking buffered writes on this filesystem (ext4).
            // EINVAL: kernels before 5.x reject NOWAIT buffered writes that
            // way; a worker re-runs the op, so a genuine EINVAL still comes
            // back from pread/pwrite.
            let refused = res == -i64::from(libc::EAGAIN)
                || res == -i64::from(libc::EOPNOTSUPP)
                || res == -i64::from(libc::EINVAL);
            // Bytes moved (0 for an error).
            let moved = u64::try_from(res).unwrap_or(0);
            // A short non-blocking read stopped at an uncached page unless it
            // reached the end of the file.
            // (A vectored op's `nbytes` counts iovecs, and its short
            // transfer is final: it is never continued.)
            let partial = moved > 0
                && !o.kind.is_vectored()
                && moved < cb.nbytes
                // SAFETY: this engine owns `o` (see above).
                && !(o.kind == OpKind::Read && unsafe { at_eof(o, moved) });
            if ev.data & TAG_BUFFERED != 0 {
                self.routes.of(o.kind).record(refused || partial);
            }
            if refused || partial {
                let done = if partial { moved } else { 0 };
                cb.reserved2 = done;
                if done > 0 {
                    // SAFETY: this engine owns the in-flight `o`, and `done`
                    // is less than the window's length (`cb.nbytes`).
                    unsafe { o.io_advance(done as usize) };
                }
                // SAFETY: in flight, owned by this engine, out of the
                // kernel; `reap`/`queue` are ours (our contract).
                if unsafe { self.to_pool(reap, queue, op) } {
                    return false;
                }
                // No worker thread could be started: do it here.
                // SAFETY: still ours alone (no worker took it).
                res = combine(done, unsafe { pool::execute(o, None) });
            }
        }
        // SAFETY: attached; the op is in flight and finished exactly once,
        // here (the kernel reports each request once).
        out.push(unsafe { op::finish(op, res) });
        true
    }

    /// Collects up to `max` deliveries (worker results first, then the
    /// kernel ring).
    ///
    /// # Safety
    /// Attached; `h` is this context's handle, held shared, and `reap` its
    /// completion state, locked.
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
            // SAFETY: a worker result of an op this engine handed over: in
            // flight, alive, and ours again (the worker is done with it);
            // each result is queued once, so it is finished once. Attached.
            let d = unsafe {
                let done = (*submit::iocb_of(&*job.0)).reserved2;
                op::finish(job.0, combine(done, r))
            };
            out.push(d);
        }
        if out.len() >= max || h.aio == 0 {
            return;
        }
        if h.user_ring {
            // SAFETY: `h` held shared: the context is alive.
            if let Some(ring) = unsafe { Ring::of(h.aio) } {
                let want = max - out.len();
                // SAFETY: the reap lock makes us the ring's only reader and
                // the shared handle keeps the context alive; each event
                // comes from this context's ring (see `on_event`).
                unsafe { ring.consume(want, |ev| self.on_event(reap, queue, ev, out)) };
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
                // SAFETY: attached, locks held (our contract); `ev` is a
                // completion of this context reported by io_getevents.
                unsafe { self.on_event(reap, queue, ev, out) };
            }
            reap.events = events;
            if got < want {
                break;
            }
        }
    }

    /// Delivers up to `max` completions: records them under the locks, then
    /// (locks released) runs callbacks / resolves futures.
    ///
    /// # Safety
    /// Attached (callbacks run here).
    pub(crate) unsafe fn deliver(&self, max: usize) -> usize {
        let mut out = Vec::new();
        {
            let h = self.read();
            if h.queue.is_none() {
                return 0;
            }
            let mut reap = self.lock_reap();
            // SAFETY: attached (our contract); handle shared, reap locked.
            unsafe { self.collect(&h, &mut reap, max, &mut out) };
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

/// How a [`wait_readable`] ended.
enum Wait {
    Ready,
    Timeout,
    /// A signal arrived (EINTR): run the Python handlers.
    Interrupted,
    Failed(i32),
}

/// `poll(2)` for `fd` readable, up to `timeout_ms` (-1: no limit). Never
/// touches Python: call it with the GIL released.
fn wait_readable(fd: i32, timeout_ms: c_int) -> Wait {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes exactly the one pollfd it is given.
    match unsafe { libc::poll(&raw mut p, 1, timeout_ms) } {
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
    ///
    /// # Safety
    /// Attached (callbacks run here).
    pub(crate) unsafe fn drain(&self) -> usize {
        {
            let h = self.read();
            if let Some(q) = h.queue.as_ref() {
                let _ = read_counter(q.fileno());
            }
        }
        let mut total = 0usize;
        loop {
            // SAFETY: attached (our contract).
            let n = unsafe { self.deliver(DEFAULT_EVENTS) };
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
    ///
    /// # Safety
    /// Attached (callbacks and signal handlers run here; the wait releases
    /// the GIL).
    pub(crate) unsafe fn wait_and_deliver(
        &self,
        max: usize,
        min: usize,
        timeout: i32,
    ) -> PyResult<usize> {
        let deadline = u64::try_from(timeout)
            .ok()
            .filter(|&t| t > 0)
            .map(|t| Instant::now() + Duration::from_secs(t));
        let mut n = 0usize;
        loop {
            // SAFETY: attached (our contract).
            n += unsafe { self.deliver(max - n) };
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
                    // Rounded up, so the wait never ends just short of it.
                    let ms = left.as_millis() + u128::from(left.subsec_nanos() % 1_000_000 != 0);
                    c_int::try_from(ms).unwrap_or(c_int::MAX)
                }
            };
            match allow_threads(|| wait_readable(q.fileno(), wait_ms)) {
                Wait::Ready => {
                    // SAFETY: attached again (allow_threads returned).
                    let got = unsafe { self.deliver(max - n) };
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
                    // DESIGN.md §6.2 eintr: run signal handlers; an exception from
                    // one propagates, otherwise keep waiting.
                    // SAFETY: attached (our contract).
                    if unsafe { PyErr_CheckSignals() } != 0 {
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
