//! The engine's I/O window of an operation: normally the op's own buffer
//! (the read's `bytes`, the write's payload), but O_DIRECT I/O may go
//! through an aligned window of bounce memory ([`crate::direct`]) that is
//! copied out (read) or in (write). The window belongs to the engine from
//! the claim until [`super::finish`]; only that engine touches it.

use std::ptr;

use super::{OpKind, Operation};
use crate::direct::bounce;
use crate::num::{len_u64, usize_sat};
use crate::py::{PyErr, PyResult};

/// Where the engine moves data.
pub struct IoTarget {
    pub ptr: *mut u8,
    pub len: usize,
    pub offset: u64,
    /// Aligned bounce memory, when the window uses it.
    pub(super) bounce: Option<bounce::Block>,
    /// Bytes of the window before the user's requested offset.
    pub(super) skip: usize,
}

impl Operation {
    /// The I/O window the engine must use.
    ///
    /// # Safety
    /// Only the engine owning the in-flight op may call this (or the op's
    /// constructor/`abort`, which own it too).
    #[inline]
    pub unsafe fn io(&self) -> &IoTarget {
        // SAFETY: the window is only mutated by its owner (caller's
        // contract), so no `&mut` to it exists while this borrow lives.
        unsafe { &*self.io.get() }
    }

    /// # Safety
    /// As for [`Operation::io`], and no other borrow of the window is alive.
    #[inline]
    #[allow(clippy::mut_from_ref)] // interior mutability: the window is an UnsafeCell owned by the engine
    unsafe fn io_mut(&self) -> &mut IoTarget {
        // SAFETY: exclusive owner of the window (caller's contract).
        unsafe { &mut *self.io.get() }
    }

    /// Data pointer of the write payload export.
    ///
    /// # Safety
    /// The op is not yet shared or is owned by the caller's engine (no
    /// concurrent completion can release the export), or `lock` is held.
    #[inline]
    pub(super) unsafe fn payload_ptr(&self) -> *const u8 {
        // SAFETY: no concurrent writer of `view` (caller's contract).
        unsafe { (*self.view.get()).buf.cast_const().cast() }
    }

    /// Moves a read's I/O into an aligned window `[offset rounded down,
    /// offset + nbytes rounded up)` of `align`-aligned memory (O_DIRECT).
    /// The requested bytes are copied into the result `bytes` on completion.
    /// For writes, copies the payload into aligned memory; the caller must
    /// have checked that offset and length are already multiples of `align`.
    ///
    /// # Safety
    /// Call only between claim and dispatch, by the engine owning the op;
    /// `align` is a power of two.
    pub unsafe fn use_aligned_window(&self, align: usize) -> PyResult<()> {
        debug_assert!(align.is_power_of_two());
        let a = len_u64(align);
        // The caller's own memory (a `readinto` target, a write payload:
        // e.g. an anonymous mmap, page-aligned) may already satisfy the
        // alignment: then it is the window, with no bounce copy.
        // SAFETY: forwarded contract (engine-owned op).
        if unsafe { self.own_buffer_aligned(a) } {
            // SAFETY: forwarded contract; the bounce block goes first.
            unsafe {
                self.free_bounce();
                self.reset_io();
            }
            return Ok(());
        }
        let (start, end) = match self.kind {
            OpKind::Read => {
                let start = self.offset & !(a - 1);
                let end = self
                    .offset
                    .checked_add(self.nbytes)
                    .and_then(|e| e.checked_add(a - 1))
                    .map(|e| e & !(a - 1))
                    .ok_or_else(|| PyErr::overflow("offset + nbytes overflows"))?;
                (start, end)
            }
            // (Vectored ops never get a window: `direct::window_fits`.)
            OpKind::Write | OpKind::Fsync | OpKind::Fdsync | OpKind::ReadV | OpKind::WriteV => {
                (self.offset, self.offset.saturating_add(self.nbytes))
            }
        };
        let len = usize_sat(end - start);
        let block = bounce::alloc(len.max(align), align)?;
        let p = block.as_ptr();
        if self.kind == OpKind::Write && self.nbytes > 0 {
            // SAFETY: the payload export holds `nbytes` readable bytes (the
            // engine owns the op, so it is not released meanwhile); the
            // block holds at least `len == nbytes` bytes; distinct memory.
            unsafe { ptr::copy_nonoverlapping(self.payload_ptr(), p, usize_sat(self.nbytes)) };
        }
        // SAFETY: engine-owned window (caller's contract), no other borrow.
        let io = unsafe { self.io_mut() };
        if let Some(old) = io.bounce.replace(block) {
            bounce::free(old);
        }
        io.skip = usize_sat(self.offset - start);
        io.ptr = p;
        io.len = len;
        io.offset = start;
        Ok(())
    }

    /// Whether the op's own buffer, offset and length are all multiples of
    /// `a` (a read into a `bytes` object never is: its data sits after the
    /// object header).
    ///
    /// # Safety
    /// The op is owned by the caller's engine.
    unsafe fn own_buffer_aligned(&self, a: u64) -> bool {
        let own = match self.kind {
            OpKind::Read => self.read_data().cast_const(),
            // SAFETY: forwarded contract (no concurrent release).
            OpKind::Write => unsafe { self.payload_ptr() },
            _ => return false,
        };
        !own.is_null()
            && (own as usize as u64) % a == 0
            && self.offset % a == 0
            && self.nbytes % a == 0
    }

    /// Points the I/O window back at the op's own buffer, dropping an
    /// aligned window (an engine retrying without it).
    ///
    /// # Safety
    /// Call only between claim and dispatch (or a consumed attempt and the
    /// next dispatch), by the engine owning the op.
    pub unsafe fn use_own_buffer(&self) {
        // SAFETY: forwarded contract; the bounce block goes first, as
        // `reset_io` requires.
        unsafe {
            self.free_bounce();
            self.reset_io();
        }
    }

    /// Whether the I/O window is still the op's own buffer, untouched: no
    /// aligned window yet and not advanced by a partial transfer.
    ///
    /// # Safety
    /// The op is owned by the caller's engine.
    pub unsafe fn io_is_pristine(&self) -> bool {
        // SAFETY: forwarded contract.
        let io = unsafe { self.io() };
        io.bounce.is_none() && io.offset == self.offset && len_u64(io.len) == self.nbytes
    }

    /// Moves the I/O window past its first `n` bytes, which the engine has
    /// already transferred (e.g. a partial non-blocking read whose remainder
    /// goes to a worker thread). [`super::finish`] must then be given the
    /// total count for the whole window.
    ///
    /// # Safety
    /// Call only while the op is in flight and owned by the calling engine;
    /// `n` must not exceed the window's length.
    pub unsafe fn io_advance(&self, n: usize) {
        // SAFETY: engine-owned window (caller's contract), no other borrow.
        let io = unsafe { self.io_mut() };
        debug_assert!(n <= io.len);
        let n = n.min(io.len);
        // SAFETY: `n <= len`, so the new pointer stays within (or one past)
        // the window's allocation.
        io.ptr = unsafe { io.ptr.add(n) };
        io.len -= n;
        io.offset = io.offset.wrapping_add(len_u64(n));
    }

    /// Points the window back at the op's own buffer (construction, abort).
    ///
    /// # Safety
    /// The caller owns the window (constructor, or the engine aborting a
    /// claim) and no bounce block is attached.
    pub(super) unsafe fn reset_io(&self) {
        let buf = match self.kind {
            OpKind::Read => self.read_data(),
            // SAFETY: forwarded ownership: no concurrent completion.
            OpKind::Write => unsafe { self.payload_ptr() }.cast_mut(),
            // Vectored ops move `iovecs()`, not the window.
            OpKind::Fsync | OpKind::Fdsync | OpKind::ReadV | OpKind::WriteV => ptr::null_mut(),
        };
        // SAFETY: forwarded contract.
        let io = unsafe { self.io_mut() };
        debug_assert!(io.bounce.is_none());
        io.ptr = buf;
        io.len = usize_sat(self.nbytes);
        io.offset = self.offset;
        io.skip = 0;
    }

    /// Returns the bounce block, if any, to the allocator.
    ///
    /// # Safety
    /// The caller owns the window (engine finishing or aborting, dealloc)
    /// and is done with the block's memory.
    pub(super) unsafe fn free_bounce(&self) {
        // SAFETY: forwarded contract.
        if let Some(b) = unsafe { self.io_mut() }.bounce.take() {
            bounce::free(b);
        }
    }
}
