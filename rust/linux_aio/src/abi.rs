//! The Linux kernel AIO ABI (`<linux/aio_abi.h>`), declared here instead of
//! linking libaio, and thin wrappers over the five system calls.
//!
//! Every wrapper returns `Err(errno)` on failure and never touches Python.

use std::sync::atomic::{AtomicU32, Ordering};

pub const IOCB_CMD_PREAD: u16 = 0;
pub const IOCB_CMD_PWRITE: u16 = 1;
pub const IOCB_CMD_FSYNC: u16 = 2;
pub const IOCB_CMD_FDSYNC: u16 = 3;
pub const IOCB_CMD_PREADV: u16 = 7;
pub const IOCB_CMD_PWRITEV: u16 = 8;

/// `aio_resfd` is valid: the kernel signals that eventfd on completion.
pub const IOCB_FLAG_RESFD: u32 = 1;

/// `aio_rw_flags`: fail with EAGAIN instead of blocking (kernel ≥ 4.14 for
/// AIO; needs `FMODE_NOWAIT` on the file, else `io_submit` says EOPNOTSUPP).
pub const RWF_NOWAIT: i32 = 0x8;

/// `struct iocb` — 64 bytes, exactly an op's engine area.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Iocb {
    pub data: u64,
    #[cfg(target_endian = "little")]
    pub key: u32,
    pub rw_flags: i32,
    #[cfg(target_endian = "big")]
    pub key: u32,
    pub opcode: u16,
    pub reqprio: i16,
    pub fildes: u32,
    pub buf: u64,
    pub nbytes: u64,
    pub offset: i64,
    /// Must be 0 at submission. Once the kernel has completed the request we
    /// reuse it to remember bytes already transferred (see `Context`).
    pub reserved2: u64,
    pub flags: u32,
    pub resfd: u32,
}

/// `struct io_event` — 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IoEvent {
    pub data: u64,
    pub obj: u64,
    pub res: i64,
    pub res2: i64,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);
const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);
// An iocb lives in an op's engine area (`[u64; 8]`): same size, and no
// stricter alignment.
const _: () = assert!(std::mem::align_of::<Iocb>() <= std::mem::align_of::<[u64; 8]>());

/// Header of the completion ring the kernel maps at the address that
/// `io_setup` returns as the context id (`struct aio_ring` in fs/aio.c).
#[repr(C)]
struct RingHeader {
    id: u32,
    nr: u32,
    head: AtomicU32,
    tail: AtomicU32,
    magic: u32,
    compat_features: u32,
    incompat_features: u32,
    header_length: u32,
}

const AIO_RING_MAGIC: u32 = 0xa10a_10a1;

/// The completion ring read from user space, as libaio does: the kernel
/// publishes events then `tail` (write barrier); we read events up to
/// `tail` and publish the new `head`. The kernel honours a user-updated
/// `head` when it refills its free-slot accounting (fs/aio.c
/// `user_refill_reqs_available`). Only one reader may walk the ring at a
/// time, and never together with `io_getevents` (our Context serialises
/// that), and only while the context is alive.
pub struct Ring(*const RingHeader);

impl Ring {
    /// The ring of `ctx`, if it has the layout we know.
    ///
    /// # Safety
    /// `ctx` must be a live AIO context of this process (its id is the
    /// address of its ring, mapped until `io_destroy`).
    pub unsafe fn of(ctx: u64) -> Option<Ring> {
        let h = ctx as *const RingHeader;
        if h.is_null() {
            return None;
        }
        // SAFETY: a live context's id is the address of its mapped ring,
        // which starts with this header (the caller's contract).
        let h_ref = unsafe { &*h };
        if h_ref.magic != AIO_RING_MAGIC
            || h_ref.incompat_features != 0
            || h_ref.nr == 0
            || (h_ref.header_length as usize) < std::mem::size_of::<RingHeader>()
        {
            return None;
        }
        Some(Ring(h))
    }

    /// Calls `f` for available events, oldest first, until `f` has returned
    /// `true` (a "counted" event) `max` times or the ring is empty. Returns
    /// how many were counted.
    ///
    /// # Safety
    /// See the type's documentation: the caller is the only reader of the
    /// ring and its context is alive (not yet destroyed) until this returns.
    pub unsafe fn consume(&self, max: usize, mut f: impl FnMut(&IoEvent) -> bool) -> usize {
        // SAFETY: the context is alive, so its ring stays mapped (caller's
        // contract); `of` checked that the header has our layout.
        let h = unsafe { &*self.0 };
        let nr = h.nr;
        // SAFETY: the `nr` events start `header_length` bytes into the
        // ring's mapping (`of` checked the layout).
        let events = unsafe { self.0.cast::<u8>().add(h.header_length as usize) }.cast::<IoEvent>();
        let mut head = h.head.load(Ordering::Relaxed);
        let mut counted = 0;
        let mut moved = false;
        while counted < max {
            // Acquire pairs with the kernel's smp_wmb() before it moves tail.
            let tail = h.tail.load(Ordering::Acquire);
            if head == tail {
                break;
            }
            // SAFETY: `head % nr` is a slot of the mapped ring, published
            // by the kernel (it is before `tail`, read with Acquire); being
            // the only reader, nobody else moves `head` meanwhile. Volatile:
            // the kernel writes the slots.
            let ev = unsafe { std::ptr::read_volatile(events.add((head % nr) as usize)) };
            head = (head + 1) % nr;
            moved = true;
            if f(&ev) {
                counted += 1;
            }
        }
        if moved {
            // Release: our reads of the events happen before the kernel may
            // reuse their slots.
            h.head.store(head, Ordering::Release);
        }
        counted
    }
}

// The context id is passed as the kernel's `aio_context_t` (an unsigned
// long): `as libc::c_ulong` is the identity on 64-bit targets and keeps a
// variadic `syscall` argument the right width elsewhere.

/// A system call's result: `Ok(r)` for `r >= 0`, else `Err(errno)`.
fn ret(r: libc::c_long) -> Result<usize, i32> {
    usize::try_from(r).map_err(|_| caio_core::sys::last_errno())
}

pub fn io_setup(nr_events: u32) -> Result<u64, i32> {
    let mut ctx: u64 = 0;
    // SAFETY: io_setup writes the new context id to `ctx`, a valid u64.
    ret(unsafe {
        libc::syscall(
            libc::SYS_io_setup,
            libc::c_ulong::from(nr_events),
            &raw mut ctx,
        )
    })?;
    Ok(ctx)
}

/// Blocks until every request of the context is done and the kernel has let
/// go of it (an RCU grace period, tens of milliseconds): call it from a
/// helper thread (`destroyer`).
pub fn io_destroy(ctx: u64) -> Result<(), i32> {
    // SAFETY: no pointer is passed; an unknown id is refused (EINVAL). The
    // callers own `ctx`: nobody reads its ring any more.
    ret(unsafe { libc::syscall(libc::SYS_io_destroy, ctx as libc::c_ulong) }).map(drop)
}

/// Submits `iocbs`; returns how many the kernel accepted (a prefix).
///
/// # Safety
/// Every pointer must reference a valid iocb whose buffers stay valid until
/// the completion has been reaped.
pub unsafe fn io_submit(ctx: u64, iocbs: &[*mut Iocb]) -> Result<usize, i32> {
    let nr = libc::c_long::try_from(iocbs.len()).map_err(|_| libc::EINVAL)?;
    // SAFETY: `iocbs` holds `nr` pointers to valid iocbs whose buffers stay
    // valid until reaped (the caller's contract).
    ret(unsafe {
        libc::syscall(
            libc::SYS_io_submit,
            ctx as libc::c_ulong,
            nr,
            iocbs.as_ptr(),
        )
    })
}

/// Non-blocking reap of up to `events.len()` completions (used only when the
/// ring layout is unknown).
pub fn io_getevents_nowait(ctx: u64, events: &mut [IoEvent]) -> Result<usize, i32> {
    let nr = libc::c_long::try_from(events.len()).map_err(|_| libc::EINVAL)?;
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the kernel writes at most `nr` events into `events` and reads
    // `ts`; both outlive the call.
    ret(unsafe {
        libc::syscall(
            libc::SYS_io_getevents,
            ctx as libc::c_ulong,
            0 as libc::c_long,
            nr,
            events.as_mut_ptr(),
            &raw const ts,
        )
    })
}

/// # Safety
/// `iocb` must point to readable memory (the kernel reads its key).
pub unsafe fn io_cancel(ctx: u64, iocb: *mut Iocb) -> Result<(), i32> {
    let mut ev = IoEvent::default();
    // SAFETY: `iocb` is readable (the caller's contract); the kernel writes
    // at most one event into `ev`.
    ret(unsafe { libc::syscall(libc::SYS_io_cancel, ctx as libc::c_ulong, iocb, &raw mut ev) })
        .map(drop)
}

/// `/proc/sys/fs/aio-nr` and `aio-max-nr`, for error messages.
pub fn aio_counters() -> (Option<u64>, Option<u64>) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    (read("/proc/sys/fs/aio-nr"), read("/proc/sys/fs/aio-max-nr"))
}
