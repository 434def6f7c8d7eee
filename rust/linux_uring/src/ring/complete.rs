//! Draining the CQ: results recorded in their ops, O_DIRECT retries
//! resubmitted, syncs held behind finished writes released.

use std::sync::atomic::Ordering;

use caio_core::direct::Retry;
use caio_core::op::{self, Delivery, Operation};
use caio_core::pool::Job;

use super::sqe::sqe;
use super::{lock, Ring, CANCEL_TAG};
use crate::direct;

impl Ring {
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
}
