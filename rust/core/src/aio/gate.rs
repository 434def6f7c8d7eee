//! Admission control: at most `max_requests` operations of an adapter
//! between submission and completion (DESIGN.md §5.4); later ones wait in FIFO
//! order on a future. A cancelled operation keeps its slot until the
//! backend has really finished it (see `awaitable::hand_slot_to_op`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, MutexGuard};

use super::adapter::Adapter;
use crate::py::{set_result_unless_done, write_unraisable, Borrowed, Owned};
use crate::sync::lock;

/// A waiter's claim on the next free slot. Whether the waiter owns a slot
/// is decided here, with atomics, never by asking its future (whose
/// `done()` may raise, and which may be cancelled or resolved by someone
/// else): a slot handed to a ticket is taken by its awaitable, or given back
/// — whichever way the awaitable leaves (resumed, thrown into, closed,
/// finalised, or a failing step).
pub(super) struct Ticket(AtomicU8);

const WAITING: u8 = 0;
/// The gate handed it a slot (and resolved its future).
const GRANTED: u8 = 1;
/// Its awaitable took the granted slot (`has_slot`).
const TAKEN: u8 = 2;
/// Its awaitable stopped waiting, or the gate took back a slot its future
/// could not be told about: it holds nothing and the gate skips it.
const WITHDRAWN: u8 = 3;

impl Ticket {
    fn new() -> Ticket {
        Ticket(AtomicU8::new(WAITING))
    }

    fn cas(&self, from: u8, to: u8) -> Result<u8, u8> {
        self.0
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
    }

    /// The awaitable takes a granted slot: true if it now owns one.
    pub(super) fn take(&self) -> bool {
        self.cas(GRANTED, TAKEN).is_ok()
    }

    /// The awaitable stops waiting: true if a slot had been granted to it
    /// (it now owns it and must release it), false otherwise (the gate will
    /// never grant it one).
    fn settle(&self) -> bool {
        match self.cas(WAITING, WITHDRAWN) {
            Ok(_) => false,
            Err(GRANTED) => self.take(),
            Err(_) => false, // already taken (counted by `has_slot`) or withdrawn
        }
    }
}

/// The gate's counters and waiters (behind the adapter's mutex, which is
/// never held across a Python call or a decref).
pub(super) struct Gate {
    pub(super) in_use: usize,
    pub(super) max: usize,
    /// Tickets and futures of waiting awaitables. Invariant: the queue is
    /// only non-empty while `in_use == max`.
    pub(super) waiters: VecDeque<(Arc<Ticket>, Owned)>,
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

    /// Queues `fut` (a reference is kept) for the next free slot; the
    /// ticket says whether a slot was handed over (see [`Ticket`]).
    pub(super) fn gate_wait(&self, fut: &Owned) -> Arc<Ticket> {
        let ticket = Arc::new(Ticket::new());
        let fut = fut.clone();
        self.gate().waiters.push_back((ticket.clone(), fut));
        ticket
    }

    /// The awaitable holding `ticket` stops waiting (abandoned, or a step
    /// failed): true if a slot had been handed to it (now the caller's to
    /// release); otherwise it leaves the queue.
    pub(super) fn gate_withdraw(&self, ticket: &Arc<Ticket>) -> bool {
        if ticket.settle() {
            return true;
        }
        let removed = {
            let mut g = self.gate();
            let pos = g.waiters.iter().position(|(t, _)| Arc::ptr_eq(t, ticket));
            pos.and_then(|i| g.waiters.remove(i))
        };
        drop(removed); // (its future is released outside the lock)
        false
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
                    Some((t, f)) => {
                        if t.cas(WAITING, GRANTED).is_err() {
                            // Withdrawn: skip it (its future is released
                            // outside the lock).
                            drop(g);
                            drop(f);
                            continue;
                        }
                        (t, f)
                    }
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
            let (ticket, next) = next;
            // (`next` is released outside the gate's lock.)
            // SAFETY: `None` is a static object.
            let none = unsafe { Borrowed::from_ptr(pyo3_ffi::Py_None()) };
            match set_result_unless_done(next.borrow(), none) {
                Ok(true) => return, // slot transferred
                Ok(false) => {}
                Err(e) => {
                    e.restore();
                    // SAFETY: attached; `next` is a live object.
                    unsafe { write_unraisable(next.as_ptr()) };
                }
            }
            // Its future could not be resolved (cancelled, or failing): take
            // the slot back for the next waiter, unless its awaitable took it
            // meanwhile.
            if ticket.cas(GRANTED, WITHDRAWN).is_err() {
                return;
            }
        }
    }

    /// Empties the waiters (GC clear, dealloc); they are released by the
    /// caller, outside the lock.
    pub(super) fn gate_take_waiters(&self) -> Vec<Owned> {
        let taken: Vec<_> = self.gate().waiters.drain(..).collect();
        taken.into_iter().map(|(_, f)| f).collect()
    }
}
