//! Aligned bounce memory for O_DIRECT windows. Small windows (the common
//! 4–64 KiB random I/O) are recycled through a bounded per-size free list:
//! `posix_memalign`/`free` of page-aligned blocks on every operation showed
//! up in profiles (malloc consolidation); the free list costs one lock.
//!
//! The free list's lock is taken by worker threads, so a `fork()` landing
//! while one holds it would leave it locked forever in the child, whose
//! first O_DIRECT operation would then hang: `FORK_HANDLERS` take it
//! around `fork()` (registered by [`crate::fork`]).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::py::{Exc, PyErr, PyResult};
use crate::sync::lock;

const MIN: usize = 4096;
/// Size classes 4, 8, 16, 32, 64 KiB, page-aligned.
const CLASSES: usize = 5;
/// At most 1 MiB kept per class.
const KEEP_BYTES: usize = 1 << 20;

/// Free blocks per size class (addresses of `MIN << class`-byte,
/// `MIN`-aligned allocations).
type FreeLists = [Vec<usize>; CLASSES];

static FREE: Mutex<FreeLists> =
    Mutex::new([Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()]);

/// An aligned allocation: exactly what [`free`] needs back.
#[derive(Debug)]
pub struct Block {
    ptr: NonNull<u8>,
    size: usize,
    align: usize,
}

impl Block {
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Usable bytes (at least what was asked for).
    #[inline]
    pub fn size(&self) -> usize {
        self.size
    }
}

fn class_of(size: usize, align: usize) -> Option<usize> {
    if align > MIN || size > MIN << (CLASSES - 1) {
        return None;
    }
    let rounded = size.max(MIN).next_power_of_two();
    Some((rounded.trailing_zeros() - MIN.trailing_zeros()) as usize)
}

/// Windows handed out by [`alloc`] since the module was loaded: the test
/// suite's proof that an aligned caller buffer makes no bounce copy
/// (`_bounce_windows()` in builds with test hooks).
static WINDOWS: AtomicU64 = AtomicU64::new(0);

/// How many bounce windows [`alloc`] has handed out.
pub fn windows_allocated() -> u64 {
    WINDOWS.load(Ordering::Relaxed)
}

/// At least `size` bytes aligned to `align` (a power of two).
pub fn alloc(size: usize, align: usize) -> PyResult<Block> {
    WINDOWS.fetch_add(1, Ordering::Relaxed);
    let (size, align) = match class_of(size, align) {
        Some(c) => {
            if let Some(p) = lock(&FREE)[c].pop() {
                // A recycled block of this class (never 0: it came from the
                // allocator below).
                if let Some(ptr) = NonNull::new(p as *mut u8) {
                    return Ok(Block {
                        ptr,
                        size: MIN << c,
                        align: MIN,
                    });
                }
            }
            (MIN << c, MIN)
        }
        None => (size, align),
    };
    let layout = std::alloc::Layout::from_size_align(size, align)
        .map_err(|_| PyErr::overflow("aligned buffer too large"))?;
    // SAFETY: `layout` has a non-zero size (every caller asks for at least
    // one alignment unit; size classes are >= 4 KiB).
    let p = unsafe { std::alloc::alloc(layout) };
    NonNull::new(p)
        .map(|ptr| Block { ptr, size, align })
        .ok_or_else(|| PyErr::new(Exc::MemoryError, "cannot allocate aligned buffer"))
}

/// Returns a block to the free list (or to the allocator).
pub fn free(b: Block) {
    if let Some(c) = class_of(b.size, b.align).filter(|&c| MIN << c == b.size && b.align == MIN) {
        let mut free = lock(&FREE);
        if free[c].len() * b.size < KEEP_BYTES {
            free[c].push(b.ptr.as_ptr() as usize);
            return;
        }
    }
    // SAFETY: `b` was allocated by `alloc` with exactly this size and
    // alignment (a valid layout, checked then), and is not used afterwards:
    // the `Block` is consumed.
    unsafe {
        std::alloc::dealloc(
            b.ptr.as_ptr(),
            std::alloc::Layout::from_size_align_unchecked(b.size, b.align),
        );
    }
}

crate::hold_across_fork!(
    /// Keeps the free list usable in a forked child (see the module docs).
    pub(crate) static FORK_HANDLERS: Handlers = FREE as FreeLists
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_and_recycled() {
        let b = alloc(5000, 4096).unwrap();
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert_eq!(b.size(), 8192);
        let p = b.as_ptr();
        free(b);
        let again = alloc(8192, 512).unwrap();
        assert_eq!(
            again.as_ptr(),
            p,
            "the 8 KiB block comes back from the free list"
        );
        free(again);
        let big = alloc(1 << 20, 8192).unwrap();
        assert_eq!(big.as_ptr() as usize % 8192, 0);
        free(big);
    }

    /// A child forked while another thread hammers the free list can still
    /// allocate (the lock is not left held in the child).
    #[cfg(unix)]
    #[test]
    fn free_list_survives_fork() {
        use std::sync::atomic::{AtomicBool, Ordering};
        crate::fork::install();
        let _serial = crate::sync::lock(&crate::fork::FORK_TEST_LOCK);
        let stop = AtomicBool::new(false);
        /// Stops the hammering thread however the loop below ends (a
        /// failed assertion must not leave `scope` waiting for it).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(b) = alloc(4096, 4096) {
                        free(b);
                    }
                }
            });
            let _stop = StopOnDrop(&stop);
            for _ in 0..20 {
                // SAFETY: the child uses the (fork-safe) free list and _exit
                // only; a deadlock shows up as the alarm killing it.
                let pid = unsafe { libc::fork() };
                assert!(pid >= 0);
                if pid == 0 {
                    // SAFETY: bounded lifetime for a child that hangs.
                    unsafe { libc::alarm(5) };
                    let locked =
                        matches!(FREE.try_lock(), Err(std::sync::TryLockError::WouldBlock));
                    // SAFETY: leaving the child at once.
                    unsafe { libc::_exit(i32::from(locked)) };
                }
                let mut status = 0;
                // SAFETY: our own child.
                assert_eq!(unsafe { libc::waitpid(pid, &raw mut status, 0) }, pid);
                assert!(
                    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                    "child found the bounce free list locked (status {status:#x})"
                );
            }
        });
    }
}
