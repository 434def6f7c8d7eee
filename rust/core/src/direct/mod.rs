//! The O_DIRECT policy, in one place.
//!
//! O_DIRECT I/O needs memory, file offset and length aligned to what the
//! file's filesystem/device asks for. A read lands in a `bytes` object and a
//! write comes from one — never aligned memory — so core moves such I/O
//! through an aligned *window* of [`bounce`] memory (see
//! `Operation::use_aligned_window`): a read's window is widened to aligned
//! offsets and copied out on completion; a write's payload is copied in (its
//! offset and length cannot be fixed up and must already be aligned).
//!
//! * [`dio_alignment`]: what the kernel reports (`statx` `STATX_DIOALIGN`);
//! * [`alignment`]: one alignment that satisfies memory, offset and length
//!   (the above, else a safe default);
//! * [`is_direct`] / [`alignment_if_direct`]: whether an fd is open with
//!   `O_DIRECT`;
//! * [`FdCache`]: which fds an engine found to be O_DIRECT, and their
//!   alignment (so later operations use a window from the start);
//!   [`use_cached_window`] before an attempt, [`retry_after`] (or
//!   [`FdCache::after_attempt`]) after it: the aligned retry of an `EINVAL`,
//!   and the rule that makes a stale entry harmless (see [`cache`]);
//! * [`write_alignment`] / [`check_write`]: the offset/length granularity an
//!   O_DIRECT write must respect, for an up-front check with a helpful
//!   message.
//!
//! Engines call `Operation::use_aligned_window(align)` between claim and
//! dispatch; [`crate::op::finish`] copies a read's bytes out and frees the
//! window.
//!
//! Who uses what: linux_uring and the worker pool (thread_aio, linux_aio's
//! fallback) detect O_DIRECT lazily, from an `EINVAL`, and cache it per fd;
//! linux_aio checks `fcntl` up front ([`is_direct`]) and refuses an unaligned
//! write at submission ([`check_write`]).

pub mod bounce;
pub mod cache;

pub use cache::{prepare_retry, retry_after, use_cached_window, window_fits, FdCache, Retry};

use crate::op::Operation;

/// The alignment used when the kernel does not report one: a multiple of
/// every common logical block size, and of the page size.
pub const DEFAULT_ALIGN: usize = 4096;

/// The offset/length granularity assumed for writes when the kernel does not
/// report one (the smallest logical block size).
pub const DEFAULT_OFFSET_ALIGN: u64 = 512;

/// `statx(fd, STATX_DIOALIGN)`: `(memory alignment, offset/length
/// alignment)` for O_DIRECT I/O on `fd`, when the kernel and filesystem
/// report it (Linux >= 6.1). Raw system call, not libc's `statx()` wrapper:
/// that appeared in glibc 2.28 and musl 1.2.5, so linking it would make the
/// modules unloadable on the C libraries manylinux2014/musllinux_1_2
/// promise.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn dio_alignment(fd: i32) -> Option<(u32, u32)> {
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `statx(fd, "", AT_EMPTY_PATH, mask, &st)` reads a static empty
    // C string and writes into `st`, which lives for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_statx,
            libc::c_long::from(fd),
            c"".as_ptr(),
            libc::c_long::from(libc::AT_EMPTY_PATH),
            libc::c_long::from(libc::STATX_DIOALIGN),
            std::ptr::from_mut(&mut st),
        )
    };
    if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return None;
    }
    Some((st.stx_dio_mem_align, st.stx_dio_offset_align))
}

/// No O_DIRECT on this platform.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn dio_alignment(_fd: i32) -> Option<(u32, u32)> {
    None
}

/// One alignment (a power of two, at least 512) that satisfies memory,
/// offsets and lengths for O_DIRECT on `fd`: what [`dio_alignment`]
/// reports, else [`DEFAULT_ALIGN`].
pub fn alignment(fd: i32) -> usize {
    match dio_alignment(fd) {
        Some((mem, off)) => usize::try_from(mem.max(off))
            .unwrap_or(DEFAULT_ALIGN)
            .next_power_of_two()
            .max(512),
        None => DEFAULT_ALIGN,
    }
}

/// Whether `fd` is open with `O_DIRECT` (false for a bad fd).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn is_direct(fd: i32) -> bool {
    // SAFETY: F_GETFL reads the descriptor's status flags; any fd value is
    // acceptable (a bad one fails with EBADF).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    flags != -1 && flags & libc::O_DIRECT != 0
}

/// No O_DIRECT on this platform.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn is_direct(_fd: i32) -> bool {
    false
}

/// If `fd` is open with `O_DIRECT`, the alignment its I/O needs
/// ([`alignment`]); `None` for a buffered fd.
pub fn alignment_if_direct(fd: i32) -> Option<usize> {
    is_direct(fd).then(|| alignment(fd))
}

/// The offset and length granularity an O_DIRECT write to `fd` must respect
/// (the payload's memory is copied into aligned memory anyway): the
/// kernel's report, else [`DEFAULT_OFFSET_ALIGN`].
pub fn write_alignment(fd: i32) -> u64 {
    dio_alignment(fd).map_or(DEFAULT_OFFSET_ALIGN, |(_, off)| u64::from(off))
}

/// Whether `offset` and `len` are both multiples of `granularity` (> 0).
fn aligned_to(offset: u64, len: u64, granularity: u64) -> bool {
    granularity != 0 && offset % granularity == 0 && len % granularity == 0
}

/// Up-front check of an O_DIRECT write: `Ok(())` when its offset and length
/// are multiples of the file's [`write_alignment`] (or it moves nothing),
/// else `Err(granularity)` for the error message. The payload's memory needs
/// no check: the aligned window copies it.
pub fn check_write(op: &Operation) -> Result<(), u64> {
    if op.nbytes == 0 {
        return Ok(());
    }
    let fd = op.fd_i32();
    // The common case (4 KiB multiples) needs no statx.
    if aligned_to(op.offset, op.nbytes, crate::num::len_u64(DEFAULT_ALIGN)) {
        return Ok(());
    }
    let g = write_alignment(fd);
    if aligned_to(op.offset, op.nbytes, g) {
        Ok(())
    } else {
        Err(g)
    }
}

#[cfg(test)]
mod pure_tests {
    use super::aligned_to;

    #[test]
    fn alignment_arithmetic() {
        assert!(aligned_to(0, 4096, 4096));
        assert!(aligned_to(8192, 512, 512));
        assert!(!aligned_to(100, 4096, 512));
        assert!(!aligned_to(4096, 100, 512));
        assert!(!aligned_to(0, 0, 0));
    }
}

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn buffered_files_are_not_direct() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(!is_direct(f.as_raw_fd()));
        assert_eq!(alignment_if_direct(f.as_raw_fd()), None);
        assert!(!is_direct(-1));
    }

    #[test]
    fn alignment_is_a_power_of_two() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        for fd in [f.as_raw_fd(), -1] {
            let a = alignment(fd);
            assert!(a.is_power_of_two() && a >= 512, "{a}");
            assert!(write_alignment(fd) >= 1);
        }
        assert_eq!(alignment(-1), DEFAULT_ALIGN);
    }
}
