//! O_DIRECT on io_uring: which reads and writes go through an aligned bounce
//! window (`Operation::use_aligned_window`), the per-ring cache of fds known
//! to be open with `O_DIRECT`, and the marks in an op's engine area that
//! allow exactly one retry.
//!
//! Detecting the flag costs nothing on the submit path: an op on an fd not
//! known to be O_DIRECT is submitted as is; if it fails with `EINVAL`, one
//! `fcntl(F_GETFL)` tells whether O_DIRECT was the reason ([`wants_retry`]),
//! the fd goes into the ring's [`DirectCache`] and the op is resubmitted
//! through an aligned window ([`prepare`]). A cache entry never makes an op
//! fail: fd numbers are closed and reused all the time, so an entry may be
//! stale; it then costs a copy at most, and a request no window can express
//! ([`window_fits`]) is submitted as is.
//!
//! Engine area of an op (owned by the engine between claim and completion):
//! word 0 holds the marks below, word 1 the alignment of the window in use.

// TODO(core): this is a second copy of the O_DIRECT policy that core's
// `direct.rs` is getting (fd alignment, the "needs aligned path" predicate
// = `window_fits`, the aligned window); switch `DirectCache::learn`'s
// alignment, `window_fits` and `wants_retry`'s fcntl test to it.

use caio_core::op::{OpKind, Operation};
use caio_core::py::PyResult;
use caio_core::sys;

/// The op's I/O goes through an aligned window (word 1: its alignment).
const ALIGNED: u64 = 1;
/// The op was resubmitted after an O_DIRECT `EINVAL`: no second retry.
const RETRIED: u64 = 2;

/// At most this many fds are remembered per ring (oldest evicted first).
const CACHE_MAX: usize = 64;

/// fds found to be open with O_DIRECT, with the alignment their I/O uses,
/// oldest first. One per ring, kept under its SQ lock.
// TODO(core): a per-ring cache keyed by fd number; core's direct.rs may own
// the cache (and its staleness rule) for every backend.
#[derive(Default)]
pub struct DirectCache(Vec<(i32, usize)>);

impl DirectCache {
    /// The alignment `fd` was found to need, if it is cached.
    pub fn alignment(&self, fd: i32) -> Option<usize> {
        if self.0.is_empty() {
            return None;
        }
        self.0.iter().find(|e| e.0 == fd).map(|e| e.1)
    }

    /// Remembers that `fd` is open with O_DIRECT (an op on it failed with
    /// EINVAL and `wants_retry` said so).
    pub fn learn(&mut self, fd: i32) {
        if self.alignment(fd).is_some() {
            return;
        }
        if self.0.len() >= CACHE_MAX {
            self.0.remove(0);
        }
        self.0.push((fd, sys::direct_alignment(fd)));
    }
}

/// Whether an aligned window `[offset rounded down, offset + nbytes rounded
/// up to align)` exists for this request: it needs a real offset (-1, the
/// "current position" of pipes and sockets, has none) and an end that fits
/// 64 bits.
pub fn window_fits(offset: u64, nbytes: u64, align: usize) -> bool {
    let Ok(align) = u64::try_from(align) else {
        return false;
    };
    offset != u64::MAX
        && offset
            .checked_add(nbytes)
            .and_then(|end| end.checked_add(align.saturating_sub(1)))
            .is_some()
}

/// Readies a claimed op's O_DIRECT state for (re)submission: forgets the
/// window of an earlier attempt (keeping the retry mark) and, for a read or
/// write on an fd cached as O_DIRECT that a window can express, moves its
/// I/O into an aligned window.
///
/// # Safety
/// The calling engine owns `o`: claimed, not yet handed to the kernel.
pub unsafe fn prepare(o: &Operation, cache: &DirectCache) -> PyResult<()> {
    // SAFETY: the engine owns a claimed op's engine area and I/O window
    // until it hands the op to the kernel (this function's contract).
    unsafe {
        let area = &mut *o.engine_area();
        area[0] &= RETRIED;
        if !matches!(o.kind, OpKind::Read | OpKind::Write) {
            return Ok(());
        }
        let window = cache
            .alignment(o.fd_i32())
            .filter(|&align| window_fits(o.offset, o.nbytes, align));
        if let Some(align) = window {
            o.use_aligned_window(align)?;
            area[0] |= ALIGNED;
            area[1] = align as u64; // usize fits u64 on every target
        }
    }
    Ok(())
}

/// Marks `o` as resubmitted: its next EINVAL is final.
///
/// # Safety
/// The calling engine owns `o` (its completion was consumed, not finished).
pub unsafe fn mark_retried(o: &Operation) {
    // SAFETY: the engine owns the op's engine area (this function's
    // contract).
    unsafe { (*o.engine_area())[0] |= RETRIED };
}

/// EINVAL on a read/write that did not use an aligned window yet, on an fd
/// open with O_DIRECT: worth one more try through aligned memory.
///
/// # Safety
/// `o` is in flight on the calling engine (its CQE not yet consumed, or
/// consumed and not finished), so its engine area is the engine's.
pub unsafe fn wants_retry(o: &Operation) -> bool {
    if !matches!(o.kind, OpKind::Read | OpKind::Write) {
        return false;
    }
    // SAFETY: the engine area of an in-flight op is the engine's, and the
    // engine only writes it before submission (this function's contract).
    let marks = unsafe { (*o.engine_area())[0] };
    if marks & (ALIGNED | RETRIED) != 0 {
        return false;
    }
    // Requests no window can express (offset -1: the "current position")
    // never use one.
    if !window_fits(o.offset, o.nbytes, 1) {
        return false;
    }
    // TODO(core): core's direct.rs predicate (sys::direct_io_alignment).
    // SAFETY: F_GETFL takes no pointer; a closed fd only makes it fail.
    let fl = unsafe { libc::fcntl(o.fd_i32(), libc::F_GETFL) };
    fl >= 0 && fl & libc::O_DIRECT != 0
}

/// `get_value()`'s message for an O_DIRECT request the kernel still refused
/// after we aligned its memory: what the file needs. The module installs it
/// with `op::set_error_message_hook`.
///
/// # Safety
/// `o` is `DONE` (core calls the hook from `get_value()` only then): its
/// engine area is no longer written.
pub unsafe fn error_message(o: &Operation, errno: i32) -> Option<String> {
    // SAFETY: a finished op's engine area is only read (contract above).
    let [marks, align, ..] = unsafe { *o.engine_area() };
    if errno != libc::EINVAL || marks & ALIGNED == 0 {
        return None;
    }
    Some(match o.kind {
        OpKind::Write => format!(
            "Invalid argument: O_DIRECT writes on this file need an offset and a length that \
are multiples of the device's logical block size ({}); got offset {}, length {}. (The data \
itself needs no alignment: caio copies it into aligned memory.)",
            match sys::dio_alignment(o.fd_i32()) {
                None => "512 or 4096 bytes".to_owned(),
                Some((_, n)) => format!("{} bytes", n),
            },
            o.offset,
            o.nbytes
        ),
        OpKind::Read => format!(
            "Invalid argument: the O_DIRECT read was refused even through a {}-byte aligned \
window (offset {}, length {})",
            align, o.offset, o.nbytes
        ),
        // Never marked ALIGNED (see `prepare`).
        OpKind::Fsync | OpKind::Fdsync => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::{window_fits, DirectCache, CACHE_MAX};

    #[test]
    fn windows_need_a_real_offset_and_a_64_bit_end() {
        assert!(window_fits(3, 100, 4096));
        assert!(window_fits(0, 0, 512));
        assert!(!window_fits(u64::MAX, 5, 4096)); // offset -1
        assert!(!window_fits(u64::MAX, 0, 1));
        assert!(!window_fits(u64::MAX - 10, 5, 4096)); // end rounds past 2**64
        assert!(window_fits(u64::MAX - 10, 5, 1));
        assert!(!window_fits(u64::MAX - 10, 20, 1));
    }

    #[test]
    fn cache_keeps_the_newest_fds() {
        let mut c = DirectCache::default();
        assert_eq!(c.alignment(3), None);
        let last = i32::try_from(CACHE_MAX).unwrap();
        for fd in 0..=last {
            c.learn(fd);
        }
        assert_eq!(c.alignment(0), None); // evicted
        assert!(c.alignment(1).is_some_and(|a| a.is_power_of_two()));
        assert!(c.alignment(last).is_some());
        c.learn(1); // already there: no eviction
        assert!(c.alignment(2).is_some());
    }
}
