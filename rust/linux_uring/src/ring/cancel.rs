//! Our own `ASYNC_CANCEL` SQEs: one op, or every request of the ring.

use std::ptr;

use caio_core::op::Operation;
use io_uring::{opcode, squeue, types, EnterFlags};

use super::{lock, Ring, CANCEL_TAG};

impl Ring {
    // -- cancellation -------------------------------------------------------

    /// Stages an `ASYNC_CANCEL` for `target` and submits everything staged
    /// (DESIGN.md §6.2 cancel-submit: not only the oldest SQE; SQPOLL gets its wake-up).
    /// Errors from entering the kernel are ignored; a ring that stays full
    /// gives `Err(())`.
    pub fn cancel(&self, target: &Operation) -> Result<(), ()> {
        let entry = opcode::AsyncCancel::new(ptr::from_ref(target) as u64)
            .build()
            .user_data(CANCEL_TAG);
        if self.push_cancel(&entry) {
            Ok(())
        } else {
            Err(())
        }
    }

    /// Stages one of our cancel SQEs (making room once if the ring is full)
    /// and submits everything staged. False: the ring stayed full.
    fn push_cancel(&self, entry: &squeue::Entry) -> bool {
        for attempt in 0..2 {
            {
                let _side = lock(&self.sq);
                // SAFETY: under the SQ lock (see the module doc).
                let mut sq = unsafe { self.uring.submission_shared() };
                if !sq.is_full() {
                    // SAFETY: a cancel SQE carries no buffer, only the key
                    // of what to cancel. Cannot fail: room checked above,
                    // under the lock.
                    let _ = unsafe { sq.push(entry) };
                    drop(sq);
                    drop(_side);
                    let _ = self.submit_staged();
                    return true;
                }
            }
            if attempt == 0 {
                // Make room: hand the staged SQEs to the kernel first.
                let _ = self.submit_staged();
                if self.sqpoll {
                    let _ = self.enter(0, 0, EnterFlags::SQ_WAIT.bits());
                }
            }
        }
        false
    }

    /// Submits what is staged and asks the kernel to cancel every request of
    /// this ring (`IORING_ASYNC_CANCEL_ANY`, Linux 5.19+; older kernels
    /// answer EINVAL and the requests complete on their own). Best effort.
    pub fn cancel_all(&self) {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        self.push_cancel(&entry);
    }
}
