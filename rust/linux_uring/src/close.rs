//! Closing a Context's ring before the Context object goes: the asyncio
//! adapter's close once idle (DESIGN.md §5.6) gives the io_uring instance, the
//! adapter's worker pool and the eventfd they share back at once
//! (`Context._close()`), instead of when the garbage collector frees the
//! Context — never, while a traceback or a closure still references the
//! adapter.
//!
//! Every use of the ring happens inside a [`RingUse`] (taken by each method
//! and engine hook on entry). Closing marks the slot closed; the ring is
//! released by whoever leaves last — the closer itself when nobody is inside,
//! otherwise the last method still running (a close from a callback run by a
//! drain, or from another thread on a free-threaded build, is deferred until
//! that drain is over). Once closed, entering fails: the methods raise a
//! clear `RuntimeError`.

use std::cell::UnsafeCell;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::ring::Ring;
use crate::workers::Workers;

/// What a Context closes as one: the ring and the adapter's worker pool,
/// which owns the eventfd the ring signals (dropped in this order: the ring
/// lets go of the eventfd before the pool's completion queue closes it).
pub(crate) struct Engines {
    pub(crate) ring: Ring,
    pub(crate) workers: Workers,
}

/// `uses`: closed flag (top bit) plus the number of live [`RingUse`]s.
const CLOSED: u64 = 1 << 63;

/// The ring of a Context, closable while the Context lives on.
pub(crate) struct RingSlot {
    ring: UnsafeCell<ManuallyDrop<Engines>>,
    uses: AtomicU64,
    released: AtomicBool,
}

// SAFETY: the ring is shared (`&Ring`, itself `Sync`) only through live
// `RingUse`s; it is dropped exactly once (`released`), when no `RingUse` is
// alive and none can be taken any more (`CLOSED` is set).
unsafe impl Sync for RingSlot {}

impl RingSlot {
    pub(crate) fn new(engines: Engines) -> RingSlot {
        RingSlot {
            ring: UnsafeCell::new(ManuallyDrop::new(engines)),
            uses: AtomicU64::new(0),
            released: AtomicBool::new(false),
        }
    }

    /// A use of the ring, or `None` once it is closed.
    pub(crate) fn enter(&self) -> Option<RingUse<'_>> {
        let prev = self.uses.fetch_add(1, Ordering::AcqRel);
        let u = RingUse(self);
        if prev & CLOSED != 0 {
            drop(u);
            return None;
        }
        Some(u)
    }

    /// Closes: no new use can start; the ring is released now if nobody is
    /// inside, otherwise when the last use ends.
    pub(crate) fn close(&self) {
        if self.uses.fetch_or(CLOSED, Ordering::AcqRel) == 0 {
            self.release();
        }
    }

    /// The ring, without a use.
    ///
    /// # Safety
    /// A [`RingUse`] of this slot is alive while the result is used.
    pub(crate) unsafe fn get_unchecked(&self) -> &Engines {
        // SAFETY: a live use keeps the ring from being released (contract
        // above); nothing else ever mutates the cell.
        unsafe { &*self.ring.get() }
    }

    fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            // SAFETY: closed and no use alive (callers: `close` saw none,
            // or the last use just ended), so nobody borrows the ring and
            // nobody can any more; `released` makes this the only drop.
            // Dropping unmaps the rings and closes the ring fd, then the
            // pool's completion queue closes the eventfd (its threads were
            // stopped by `Context._close()` or `ContextState::release`).
            unsafe { ManuallyDrop::drop(&mut *self.ring.get()) };
        }
    }
}

impl Drop for RingSlot {
    fn drop(&mut self) {
        if !*self.released.get_mut() {
            *self.released.get_mut() = true;
            // SAFETY: not released before (checked), and `&mut self`: no
            // use can be alive.
            unsafe { ManuallyDrop::drop(self.ring.get_mut()) };
        }
    }
}

/// One method's (or engine hook's) use of the ring: the ring stays alive
/// while it lives.
pub(crate) struct RingUse<'a>(&'a RingSlot);

impl Deref for RingUse<'_> {
    type Target = Ring;

    fn deref(&self) -> &Ring {
        // SAFETY: this use is alive.
        unsafe { &self.0.get_unchecked().ring }
    }
}

impl RingUse<'_> {
    /// The adapter's worker pool, alive as long as this use.
    pub(crate) fn workers(&self) -> &Workers {
        // SAFETY: this use is alive.
        unsafe { &self.0.get_unchecked().workers }
    }
}

impl Drop for RingUse<'_> {
    fn drop(&mut self) {
        if self.0.uses.fetch_sub(1, Ordering::AcqRel) == CLOSED | 1 {
            // Closed meanwhile and this was the last use.
            self.0.release();
        }
    }
}
