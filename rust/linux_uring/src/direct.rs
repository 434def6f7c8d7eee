//! O_DIRECT on io_uring: core's policy (`caio_core::direct`) applied to a
//! ring, and the marks in an op's engine area that allow exactly one retry
//! and let `get_value()` explain a final `EINVAL`.
//!
//! Detecting the flag costs nothing on the submit path: an op on an fd not
//! known to be O_DIRECT is submitted as is; if it fails with `EINVAL`,
//! core's [`retry_after`](caio_core::direct::retry_after) tells whether
//! O_DIRECT was the reason, the fd goes into the ring's
//! [`FdCache`] and the op is resubmitted through an aligned window. Later
//! ops on that fd use a window from the start ([`prepare`]). A stale entry
//! (a reused fd number) never makes an op fail: see `caio_core::direct::cache`.
//!
//! Engine area of an op (owned by the engine between claim and completion):
//! word 0 holds the marks below, word 1 the alignment of the window in use.

use caio_core::direct::{self, FdCache, Retry};
use caio_core::op::{OpKind, Operation};
use caio_core::py::PyResult;

/// The op's I/O goes through an aligned window (word 1: its alignment).
const ALIGNED: u64 = 1;
/// The op was resubmitted after an `EINVAL`: no second retry.
const RETRIED: u64 = 2;

/// Records in the op's engine area which window (if any) its next attempt
/// uses.
///
/// # Safety
/// The calling engine owns `o` and its engine area.
unsafe fn mark_window(o: &Operation, align: Option<usize>) {
    // SAFETY: forwarded contract.
    let area = unsafe { &mut *o.engine_area() };
    area[0] &= RETRIED;
    if let Some(align) = align {
        area[0] |= ALIGNED;
        area[1] = caio_core::num::len_u64(align);
    }
}

/// The alignment of the window the op's last attempt used, from its marks.
///
/// # Safety
/// `o` is in flight on the calling engine: its engine area is only written
/// by the engine before a submission.
unsafe fn window_of(o: &Operation) -> (u64, Option<usize>) {
    // SAFETY: forwarded contract.
    let [marks, align, ..] = unsafe { *o.engine_area() };
    let used = (marks & ALIGNED != 0).then(|| caio_core::num::usize_sat(align));
    (marks, used)
}

/// Readies a claimed op for its first submission: a read or write on an fd
/// cached as O_DIRECT goes through an aligned window.
///
/// # Safety
/// The calling engine owns `o`: claimed, not yet handed to the kernel.
pub unsafe fn prepare(o: &Operation, cache: &FdCache) -> PyResult<()> {
    // SAFETY: the engine owns a claimed op's engine area and I/O window
    // until it hands the op to the kernel (this function's contract).
    unsafe {
        (*o.engine_area())[0] = 0;
        mark_window(o, direct::use_cached_window(o, cache)?);
    }
    Ok(())
}

/// After an attempt of `o` failed with `res`: whether (and how) to resubmit
/// it, the ring's cache updated (see `FdCache::after_attempt`). At most one
/// retry per op.
///
/// # Safety
/// `o` is in flight on the calling engine, its CQE consumed and not
/// finished.
pub unsafe fn retry(o: &Operation, res: i32, cache: &FdCache) -> Option<Retry> {
    // SAFETY: forwarded contract.
    let (marks, used) = unsafe { window_of(o) };
    if marks & RETRIED != 0 {
        return None;
    }
    // SAFETY: forwarded contract (engine-owned op).
    unsafe { cache.after_attempt(o, i64::from(res), used) }
}

/// Whether a drain would resubmit `o` after `res` ([`retry`] without its
/// effects: for counting what a wait can expect).
///
/// # Safety
/// `o` is in flight on the calling engine (its CQE not yet consumed).
pub unsafe fn would_retry(o: &Operation, res: i32) -> bool {
    // SAFETY: forwarded contract.
    let (marks, used) = unsafe { window_of(o) };
    // SAFETY: forwarded contract (engine-owned op; only read).
    marks & RETRIED == 0 && unsafe { direct::retry_after(o, i64::from(res), used) }.is_some()
}

/// Readies `o` for its one retry.
///
/// # Safety
/// The calling engine owns `o` again: its CQE was consumed and it is not
/// finished.
pub unsafe fn prepare_retry(o: &Operation, retry: Retry) -> PyResult<()> {
    // SAFETY: forwarded contract.
    unsafe {
        (*o.engine_area())[0] |= RETRIED;
        direct::prepare_retry(o, retry)?;
        mark_window(
            o,
            match retry {
                Retry::Aligned(align) => Some(align),
                Retry::Plain => None,
            },
        );
    }
    Ok(())
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
    let (_, used) = unsafe { window_of(o) };
    let align = used?;
    if errno != libc::EINVAL {
        return None;
    }
    Some(match o.kind {
        OpKind::Write => format!(
            "Invalid argument: O_DIRECT writes on this file need an offset and a length that \
are multiples of the device's logical block size ({}); got offset {}, length {}. (The data \
itself needs no alignment: caio copies it into aligned memory.)",
            match direct::dio_alignment(o.fd_i32()) {
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
        // Never given a window (see `caio_core::direct::window_fits`).
        OpKind::Fsync | OpKind::Fdsync | OpKind::ReadV | OpKind::WriteV => return None,
    })
}
