//! What a worker does with an op: its positional I/O (O_DIRECT through the
//! pool's per-fd cache and the aligned retry, `crate::direct`), and the non-blocking page-cache read a submitter may try
//! on its own thread first.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::direct;
use crate::num::{count_usize, len_i64, len_u64};
use crate::op::{OpKind, Operation};
use crate::sys::{self, neg};

/// Runs the op's I/O on the calling thread (no GIL). Returns bytes moved or
/// `-errno`.
///
/// O_DIRECT needs aligned memory, and a read lands in a `bytes` object
/// (never aligned) or a write comes from one. With `fds` (the pool's
/// [`direct::FdCache`]) an fd already known to be O_DIRECT goes through an
/// aligned bounce window from the start; otherwise, once `EINVAL` says so,
/// the op is retried through one (a read's window also covers any offset
/// and length) and the fd remembered. A write's file offset and length
/// cannot be fixed up: if they are unaligned, the kernel's `EINVAL` comes
/// back again and stands. [`direct::retry_after`] decides, and keeps a stale
/// cache entry (a reused fd number) from failing anything.
///
/// # Safety
/// `op` must be in flight and owned by the caller's engine.
pub unsafe fn execute(op: &Operation, fds: Option<&direct::FdCache>) -> i64 {
    let used = match fds {
        // SAFETY: forwarded contract (engine-owned op, not dispatched yet).
        Some(f) => match unsafe { direct::use_cached_window(op, f) } {
            Ok(used) => used,
            Err(_) => return neg(libc::ENOMEM),
        },
        None => None,
    };
    // SAFETY: forwarded contract (engine-owned op).
    let r = unsafe { execute_once(op) };
    // SAFETY: forwarded contract (engine-owned op).
    let retry = unsafe {
        match fds {
            Some(f) => f.after_attempt(op, r, used),
            None => direct::retry_after(op, r, used),
        }
    };
    let Some(retry) = retry else {
        return r;
    };
    // SAFETY: forwarded contract: the engine owns the op and has not
    // dispatched it anywhere else (this thread runs it).
    match unsafe { direct::prepare_retry(op, retry) } {
        // SAFETY: as above.
        Ok(()) => unsafe { execute_once(op) },
        Err(_) => neg(libc::ENOMEM),
    }
}

/// # Safety
/// As for [`execute`].
unsafe fn execute_once(op: &Operation) -> i64 {
    let fd = op.fd_i32();
    // SAFETY: forwarded contract: the window belongs to this engine and
    // describes `len` valid bytes (the op's buffer or its bounce block).
    unsafe {
        let io = op.io();
        let offset = crate::num::i64_bits(io.offset);
        match op.kind {
            // (The helper hands `pread` pieces of the window or of its
            // scratch buffer, each valid for the length given.)
            OpKind::Read => sys::read_at_good_distance(io.ptr, io.len, io.offset, |b, l, o| {
                sys::pread(fd, b, l, crate::num::i64_bits(o))
            }),
            OpKind::Write => sys::pwrite(fd, io.ptr, io.len, offset),
            OpKind::Fsync => sys::fsync(fd),
            OpKind::Fdsync => sys::fdatasync(fd),
            OpKind::ReadV | OpKind::WriteV => {
                let (iov, count) = op.iovecs();
                sys::prwv(fd, iov, count, offset, op.kind == OpKind::WriteV)
            }
        }
    }
}

/// Set once `preadv2` turned out not to exist (kernel < 4.6).
static NOWAIT_MISSING: AtomicBool = AtomicBool::new(false);

/// Tries to complete a read from the page cache on the calling thread
/// (`RWF_NOWAIT`: never waits for the disk). Returns the final result, or
/// `None` when the read must go to the pool: data not (fully) cached, or the
/// kernel/filesystem cannot do non-blocking reads. A partially cached range
/// is continued, so a short result only ever means end of file — callers
/// (aiofile) treat short reads as EOF.
///
/// # Safety
/// `op` must be claimed by the caller and not yet handed to any engine.
pub unsafe fn try_read_inline(op: &Operation) -> Option<i64> {
    if op.kind != OpKind::Read || NOWAIT_MISSING.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: the caller owns the claimed op's window.
    let io = unsafe { op.io() };
    if crate::num::i64_bits(io.offset) < 0 {
        // preadv2 treats -1 as "use the file position": leave it to pread,
        // which rejects negative offsets.
        return None;
    }
    let fd = op.fd_i32();
    let mut done = 0usize;
    // At least one call, even for a zero-length read: the kernel still
    // checks the fd (EBADF, EISDIR, ...), as pread does on the pool.
    loop {
        // SAFETY: `done <= len`, so `ptr + done` and `len - done` stay
        // within the window's valid bytes.
        let r = unsafe {
            sys::read_at_good_distance(
                io.ptr.add(done),
                io.len - done,
                io.offset + len_u64(done),
                // Pieces of the window or of the helper's scratch buffer.
                |b, l, o| sys::pread_nowait(fd, b, l, o),
            )
        };
        if r > 0 {
            done += count_usize(r);
            if done < io.len {
                continue;
            }
            break;
        }
        if r == 0 {
            break; // end of file (or nothing asked for)
        }
        let errno = i32::try_from(-r).unwrap_or(libc::EIO);
        return match errno {
            libc::ENOSYS => {
                NOWAIT_MISSING.store(true, Ordering::Relaxed);
                None
            }
            libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::EINTR => None,
            _ if done > 0 => Some(len_i64(done)),
            _ => Some(r),
        };
    }
    Some(len_i64(done))
}
