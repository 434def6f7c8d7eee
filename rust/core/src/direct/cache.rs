//! The per-engine memory of which fds are open with O_DIRECT, and the one
//! decision every engine makes after an attempt: try once more, and how.
//!
//! Detecting O_DIRECT costs a failed attempt (`EINVAL`), an `fcntl` and a
//! `statx`. An engine that remembers the answer per fd ([`FdCache`]) sends
//! later operations on that fd through an aligned window from the start
//! ([`use_cached_window`]). fd numbers are closed and reused all the time,
//! so an entry may be stale; the rule that keeps that harmless:
//!
//! * a stale entry never makes an operation fail: an attempt through a
//!   cached window that fails with `EINVAL` is checked against the fd as it
//!   is now ([`retry_after`]) and retried without the window (no longer
//!   O_DIRECT) or with the alignment the fd needs now;
//! * an entry is dropped on `EBADF` (the fd was closed), when the fd turns
//!   out not to be O_DIRECT any more, and re-checked with one `fcntl` every
//!   [`RECHECK_EVERY`] uses, so a stale entry costs a copy through aligned
//!   memory for a bounded number of operations at most;
//! * a request no window can express (offset −1 or negative, an end past
//!   2⁶⁴) never uses one.
//!
//! linux_uring keeps one cache per ring, the worker pool one per pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{alignment_if_direct, is_direct};
use crate::op::{OpKind, Operation};
use crate::py::PyResult;
use crate::sync::lock;

/// At most this many fds are remembered per cache (oldest evicted first).
pub const CACHE_MAX: usize = 64;

/// Every this many uses an entry is re-checked with one `fcntl`.
pub const RECHECK_EVERY: u32 = 64;

#[derive(Clone, Copy, Debug)]
struct Entry {
    fd: i32,
    align: usize,
    uses: u32,
}

/// fds found to be open with O_DIRECT, with the alignment their I/O uses,
/// oldest first. Thread-safe; a lookup in an empty cache takes no lock.
#[derive(Debug, Default)]
pub struct FdCache {
    entries: Mutex<Vec<Entry>>,
    len: AtomicUsize,
}

/// What to do after an attempt ([`retry_after`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Once more through an aligned window of this alignment.
    Aligned(usize),
    /// Once more from the op's own buffer (the cached window was stale).
    Plain,
}

impl FdCache {
    pub const fn new() -> FdCache {
        FdCache {
            entries: Mutex::new(Vec::new()),
            len: AtomicUsize::new(0),
        }
    }

    /// The alignment `fd` was found to need, if it is cached. Counts a use:
    /// every [`RECHECK_EVERY`]th one re-checks that the fd is still
    /// O_DIRECT (and forgets it if not).
    pub fn lookup(&self, fd: i32) -> Option<usize> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let (align, recheck) = {
            let mut entries = lock(&self.entries);
            let e = entries.iter_mut().find(|e| e.fd == fd)?;
            e.uses = e.uses.wrapping_add(1);
            (e.align, e.uses % RECHECK_EVERY == 0)
        };
        if recheck && !is_direct(fd) {
            self.forget(fd);
            return None;
        }
        Some(align)
    }

    /// Whether `fd` is cached (no use counted).
    pub fn contains(&self, fd: i32) -> bool {
        self.len.load(Ordering::Relaxed) != 0 && lock(&self.entries).iter().any(|e| e.fd == fd)
    }

    /// Remembers that `fd` is open with O_DIRECT and needs `align`.
    pub fn learn(&self, fd: i32, align: usize) {
        let mut entries = lock(&self.entries);
        if let Some(e) = entries.iter_mut().find(|e| e.fd == fd) {
            e.align = align;
            return;
        }
        if entries.len() >= CACHE_MAX {
            entries.remove(0);
        }
        entries.push(Entry { fd, align, uses: 0 });
        self.len.store(entries.len(), Ordering::Relaxed);
    }

    /// Forgets `fd` (closed, or not O_DIRECT any more).
    pub fn forget(&self, fd: i32) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut entries = lock(&self.entries);
        entries.retain(|e| e.fd != fd);
        self.len.store(entries.len(), Ordering::Relaxed);
    }

    /// [`retry_after`], and the cache updated with what it found: the fd
    /// forgotten on `EBADF` or when it is not O_DIRECT any more, learnt with
    /// its (new) alignment when the retry uses one.
    ///
    /// # Safety
    /// As for [`retry_after`].
    pub unsafe fn after_attempt(
        &self,
        op: &Operation,
        raw: i64,
        used: Option<usize>,
    ) -> Option<Retry> {
        let fd = op.fd_i32();
        if raw == -i64::from(libc::EBADF) {
            self.forget(fd);
            return None;
        }
        // SAFETY: forwarded contract.
        let retry = unsafe { retry_after(op, raw, used) };
        match retry {
            Some(Retry::Aligned(align)) => self.learn(fd, align),
            Some(Retry::Plain) => self.forget(fd),
            None => {}
        }
        retry
    }
}

/// Whether an aligned window `[offset rounded down, offset + nbytes rounded
/// up to align)` can express this read or write: a real offset (not −1, the
/// "current position" of pipes, nor negative as a signed value) and an end
/// that fits 64 bits.
pub fn window_fits(op: &Operation, align: usize) -> bool {
    let Ok(a) = u64::try_from(align) else {
        return false;
    };
    matches!(op.kind, OpKind::Read | OpKind::Write)
        && op.offset_i64() >= 0
        && op
            .offset
            .checked_add(op.nbytes)
            .and_then(|end| end.checked_add(a.saturating_sub(1)))
            .is_some()
}

/// Before the first attempt: if `op`'s fd is cached as O_DIRECT and a window
/// can express the request, moves its I/O into an aligned window and
/// returns the alignment used (pass it to [`retry_after`]). `Ok(None)`: the
/// op goes from its own buffer. `Err`: the window could not be allocated.
///
/// # Safety
/// The calling engine owns `op`, between claim and dispatch, its I/O window
/// untouched.
pub unsafe fn use_cached_window(op: &Operation, cache: &FdCache) -> PyResult<Option<usize>> {
    if !matches!(op.kind, OpKind::Read | OpKind::Write) {
        return Ok(None);
    }
    match cache.lookup(op.fd_i32()) {
        Some(align) if window_fits(op, align) => {
            // SAFETY: forwarded contract.
            unsafe { op.use_aligned_window(align) }?;
            Ok(Some(align))
        }
        _ => Ok(None),
    }
}

/// The retry predicate, after an attempt of `op` returned `raw` (bytes moved
/// or `-errno`); `used` is the alignment of the window the attempt went
/// through (`None`: the op's own buffer). Only an `EINVAL` of a read or
/// write at a real offset, with nothing transferred, is reconsidered:
///
/// * from the op's own buffer, on an O_DIRECT fd: retry through a window
///   of the alignment it needs;
/// * through a window (a cached alignment): the fd is checked as it is now:
///   no longer O_DIRECT → retry from the op's own buffer; O_DIRECT with
///   another alignment → retry with that one; else the kernel's answer
///   stands (an unaligned write offset or length).
///
/// Pure: reads the fd's state (`fcntl`, `statx`), changes nothing.
///
/// # Safety
/// `op` is in flight and owned by the caller's engine (its I/O window is
/// read).
pub unsafe fn retry_after(op: &Operation, raw: i64, used: Option<usize>) -> Option<Retry> {
    if raw != -i64::from(libc::EINVAL) || !window_fits(op, 1) {
        return None;
    }
    let fd = op.fd_i32();
    match used {
        None => {
            // A partial transfer (the window advanced) cannot be redone.
            // SAFETY: forwarded contract (engine-owned op).
            if !unsafe { op.io_is_pristine() } {
                return None;
            }
            alignment_if_direct(fd).map(Retry::Aligned)
        }
        Some(was) => match alignment_if_direct(fd) {
            None => Some(Retry::Plain),
            Some(now) if now != was => Some(Retry::Aligned(now)),
            Some(_) => None,
        },
    }
}

/// Carries out a [`Retry`] decision on the op's I/O window. `Err`: the
/// aligned window could not be allocated (the caller reports `ENOMEM`).
///
/// # Safety
/// The calling engine owns `op` and will dispatch it again.
pub unsafe fn prepare_retry(op: &Operation, retry: Retry) -> PyResult<()> {
    match retry {
        // SAFETY: forwarded contract.
        Retry::Aligned(align) => unsafe { op.use_aligned_window(align) },
        Retry::Plain => {
            // SAFETY: forwarded contract.
            unsafe { op.use_own_buffer() };
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_fds() {
        let c = FdCache::new();
        assert_eq!(c.lookup(3), None);
        let last = i32::try_from(CACHE_MAX).unwrap();
        for fd in 0..=last {
            c.learn(fd, 4096);
        }
        assert_eq!(c.lookup(0), None, "evicted");
        assert_eq!(c.lookup(1), Some(4096));
        assert_eq!(c.lookup(last), Some(4096));
        c.learn(1, 512); // already there: updated, no eviction
        assert_eq!(c.lookup(1), Some(512));
        assert!(c.contains(2));
        c.forget(2);
        assert!(!c.contains(2));
        assert_eq!(c.lookup(2), None);
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn an_entry_of_a_buffered_fd_is_dropped_at_its_recheck() {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let fd = f.as_raw_fd();
        let c = FdCache::new();
        c.learn(fd, 4096); // stale: the fd is not O_DIRECT
        let served = (0..RECHECK_EVERY)
            .filter(|_| c.lookup(fd).is_some())
            .count();
        assert_eq!(served, usize::try_from(RECHECK_EVERY).unwrap() - 1);
        assert!(!c.contains(fd));
        assert_eq!(c.lookup(fd), None);
    }
}
