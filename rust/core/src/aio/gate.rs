//! Admission control: at most `max_requests` operations of an adapter
//! between submission and completion (DESIGN.md §5.4); later ones wait in FIFO
//! order on a future. A cancelled operation keeps its slot until the
//! backend has really finished it (see `awaitable::hand_slot_to_op`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use super::adapter::Adapter;
use crate::py::{set_result_unless_done, write_unraisable, Borrowed, Owned};
use crate::sync::lock;

/// The gate's counters and waiters (behind the adapter's mutex, which is
/// never held across a Python call or a decref).
pub(super) struct Gate {
    pub(super) in_use: usize,
    pub(super) max: usize,
    /// Futures of waiting awaitables. Invariant: the queue is only
    /// non-empty while `in_use == max`.
    pub(super) waiters: VecDeque<Owned>,
}

impl Gate {
    pub(super) fn new() -> Gate {
        Gate {
            in_use: 0,
            max: 0,
            waiters: VecDeque::new(),
        }
    }
}

impl Adapter {
    pub(super) fn gate(&self) -> MutexGuard<'_, Gate> {
        lock(&self.gate)
    }

    /// Takes a slot if one is free and nobody is queued before us.
    pub(super) fn gate_try_acquire(&self) -> bool {
        let mut g = self.gate();
        if g.waiters.is_empty() && g.in_use < g.max {
            g.in_use += 1;
            true
        } else {
            false
        }
    }

    /// Queues `fut` (a reference is kept) for the next free slot.
    pub(super) fn gate_wait(&self, fut: &Owned) {
        let fut = fut.clone();
        self.gate().waiters.push_back(fut);
    }

    /// Nothing admitted is still in flight: no slot is held (a cancelled
    /// op keeps its slot until the backend has really finished it) and
    /// nobody waits for one.
    pub(super) fn gate_idle(&self) -> bool {
        let g = self.gate();
        g.in_use == 0 && g.waiters.is_empty()
    }

    /// Frees a slot, or hands it straight to the first live waiter (caller
    /// attached).
    pub(super) fn gate_release(&self) {
        loop {
            let next = {
                let mut g = self.gate();
                if self.dead.load(Ordering::Acquire) {
                    // The loop is closed: its waiters cannot be woken.
                    g.in_use = g.in_use.saturating_sub(1);
                    return;
                }
                match g.waiters.pop_front() {
                    Some(f) => f,
                    None => {
                        g.in_use = g.in_use.saturating_sub(1);
                        let idle = g.in_use == 0;
                        drop(g);
                        if idle && self.is_closed() {
                            // The last op of a closed adapter is over.
                            self.schedule_release();
                        }
                        return;
                    }
                }
            };
            // (`next` is released outside the gate's lock.)
            // SAFETY: `None` is a static object.
            let none = unsafe { Borrowed::from_ptr(pyo3_ffi::Py_None()) };
            match set_result_unless_done(next.borrow(), none) {
                Ok(true) => return, // slot transferred
                Ok(false) => continue,
                Err(e) => {
                    e.restore();
                    // SAFETY: attached; `next` is a live object.
                    unsafe { write_unraisable(next.as_ptr()) };
                }
            }
        }
    }

    /// Empties the waiters (GC clear, dealloc); they are released by the
    /// caller, outside the lock.
    pub(super) fn gate_take_waiters(&self) -> Vec<Owned> {
        self.gate().waiters.drain(..).collect()
    }
}
