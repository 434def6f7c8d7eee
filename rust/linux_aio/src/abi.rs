//! The Linux kernel AIO ABI (`<linux/aio_abi.h>`), declared here instead of
//! linking libaio, and thin wrappers over the five system calls.
//!
//! Every wrapper returns `Err(errno)` on failure and never touches Python.

use std::sync::atomic::{AtomicU32, Ordering};

pub const IOCB_CMD_PREAD: u16 = 0;
pub const IOCB_CMD_PWRITE: u16 = 1;
pub const IOCB_CMD_FSYNC: u16 = 2;
pub const IOCB_CMD_FDSYNC: u16 = 3;

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
    /// `ctx` must be a live AIO context of this process.
    pub unsafe fn of(ctx: u64) -> Option<Ring> {
        let h = ctx as *const RingHeader;
        if h.is_null()
            || (*h).magic != AIO_RING_MAGIC
            || (*h).incompat_features != 0
            || (*h).nr == 0
            || ((*h).header_length as usize) < std::mem::size_of::<RingHeader>()
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
    /// See the type's documentation (exclusive reader, live context).
    pub unsafe fn consume(&self, max: usize, mut f: impl FnMut(&IoEvent) -> bool) -> usize {
        let h = &*self.0;
        let nr = h.nr;
        let events = (self.0 as *const u8).add(h.header_length as usize) as *const IoEvent;
        let mut head = h.head.load(Ordering::Relaxed);
        let mut counted = 0;
        let mut moved = false;
        while counted < max {
            // Acquire pairs with the kernel's smp_wmb() before it moves tail.
            let tail = h.tail.load(Ordering::Acquire);
            if head == tail {
                break;
            }
            let ev = std::ptr::read_volatile(events.add((head % nr) as usize));
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

fn ret(r: libc::c_long) -> Result<libc::c_long, i32> {
    if r < 0 {
        Err(caio_core::sys::last_errno())
    } else {
        Ok(r)
    }
}

pub fn io_setup(nr_events: u32) -> Result<u64, i32> {
    let mut ctx: u64 = 0;
    unsafe {
        ret(libc::syscall(
            libc::SYS_io_setup,
            nr_events as libc::c_ulong,
            &mut ctx as *mut u64,
        ))?;
    }
    Ok(ctx)
}

/// Blocks until every request of the context is done and the kernel has let
/// go of it (an RCU grace period, tens of milliseconds): call it from a
/// helper thread (`destroyer`).
pub fn io_destroy(ctx: u64) -> Result<(), i32> {
    unsafe { ret(libc::syscall(libc::SYS_io_destroy, ctx as libc::c_ulong)).map(drop) }
}

/// Submits `iocbs`; returns how many the kernel accepted (a prefix).
///
/// # Safety
/// Every pointer must reference a valid iocb whose buffers stay valid until
/// the completion has been reaped.
pub unsafe fn io_submit(ctx: u64, iocbs: &[*mut Iocb]) -> Result<usize, i32> {
    ret(libc::syscall(
        libc::SYS_io_submit,
        ctx as libc::c_ulong,
        iocbs.len() as libc::c_long,
        iocbs.as_ptr(),
    ))
    .map(|n| n as usize)
}

/// Non-blocking reap of up to `events.len()` completions (used only when the
/// ring layout is unknown).
pub fn io_getevents_nowait(ctx: u64, events: &mut [IoEvent]) -> Result<usize, i32> {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe {
        ret(libc::syscall(
            libc::SYS_io_getevents,
            ctx as libc::c_ulong,
            0 as libc::c_long,
            events.len() as libc::c_long,
            events.as_mut_ptr(),
            &ts as *const libc::timespec,
        ))
        .map(|n| n as usize)
    }
}

/// # Safety
/// `iocb` must point to readable memory (the kernel reads its key).
pub unsafe fn io_cancel(ctx: u64, iocb: *mut Iocb) -> Result<(), i32> {
    let mut ev = IoEvent::default();
    ret(libc::syscall(
        libc::SYS_io_cancel,
        ctx as libc::c_ulong,
        iocb,
        &mut ev as *mut IoEvent,
    ))
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
