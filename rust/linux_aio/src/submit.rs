//! Submission: claimed operations become iocbs (in each op's engine area)
//! and go to the kernel in one `io_submit`, or to the worker pool when the
//! route says so; plus `io_cancel`.
//!
//! * [`prepare`] fills an op's iocb: `O_DIRECT` ops get an aligned window
//!   (writes are checked against the file's O_DIRECT alignment first), and
//!   in event-loop mode reads and writes get `RWF_NOWAIT` — or, for a
//!   buffered op the [`Route`](crate::route::Route) sends straight to the
//!   workers, no iocb at all.
//! * [`submit_claimed`] submits a batch: what the kernel accepts (a prefix)
//!   is in flight, the first refused op gets its own error and it and
//!   everything after it is rolled back (`NEW`, retryable).
//! * A non-blocking attempt the file cannot do (`EOPNOTSUPP`/`EINVAL` for
//!   `RWF_NOWAIT` at submission) is resubmitted the classic way.
//! * A read or write of a file kernel AIO has no path for (`EINVAL` at a
//!   valid position: a directory, `/dev/full`, most `/proc` files) goes to
//!   the worker pool, whose `pread`/`pwrite` gives the true result or errno
//!   ([`aio_cannot_do`]).

use std::ffi::c_int;
use std::sync::atomic::Ordering;

use caio_core::context::ContextState;
use caio_core::direct;
use caio_core::op::{self, as_op, OpKind, Operation};
use caio_core::pool::{self, Job};
use caio_core::py::{Exc, PyErr, PyResult};
use caio_core::pyo3_ffi::*;
use caio_core::sys;

use crate::abi::{self, Iocb, RWF_NOWAIT};
use crate::engine::{closed_error, signal_fd, AioContext};

/// `aio_data` tag: a buffered read/write submitted with RWF_NOWAIT (its
/// outcome feeds [`Route`](crate::route::Route)). Operation pointers are
/// 8-byte aligned, so the low bit is free.
pub(crate) const TAG_BUFFERED: u64 = 1;

/// The iocb of `o`: its engine area, which is exactly one [`Iocb`] (size
/// and alignment checked in `abi`).
///
/// # Safety
/// The pointer may be formed for any op (`io_cancel` only compares it), but
/// only the engine owning the in-flight op may read or write through it
/// (`Operation::engine_area`).
pub(crate) unsafe fn iocb_of(o: &Operation) -> *mut Iocb {
    // SAFETY: forming the pointer reads nothing; the caller upholds the
    // ownership rule for every access through it.
    unsafe { o.engine_area() }.cast::<Iocb>()
}

/// The same 64 bits read as a signed number. Offsets are kept as the raw
/// bits of a signed value (`Flavor::offset_min` is `i64::MIN`); the
/// kernel's `aio_offset` is signed.
const fn signed64(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// The same 16 bits read as a signed number (priorities, `aio_reqprio`).
const fn signed16(v: u16) -> i16 {
    i16::from_ne_bytes(v.to_ne_bytes())
}

/// The module's `SubmitError(OSError, ValueError)` class (borrowed: the
/// module keeps it alive), or plain `ValueError` if it cannot be found.
///
/// # Safety
/// Attached; `slf` is a linux_aio Context.
unsafe fn submit_error_type(slf: *mut PyObject) -> Exc {
    // SAFETY: attached and `slf` is a live object of our heap type, whose
    // module (if it still exists) we may query; a new reference is dropped
    // at once because the module attribute keeps the class alive.
    unsafe {
        let module = PyType_GetModule(Py_TYPE(slf));
        if !module.is_null() {
            let cls = PyObject_GetAttrString(module, c"SubmitError".as_ptr());
            if !cls.is_null() {
                Py_DECREF(cls);
                return Exc::Custom(cls);
            }
        }
        PyErr_Clear();
    }
    Exc::ValueError
}

/// Exception for an op that `io_submit` refused with `e` (DESIGN.md §4.5;
/// messages extended to name the actual cause). Where upstream raises
/// `ValueError`, `refused` is `SubmitError`: still a `ValueError`, and also
/// an `OSError` carrying the errno (like `io.UnsupportedOperation`).
///
/// # Safety
/// Attached; `slf` is a linux_aio Context.
unsafe fn refusal_error(
    slf: *mut PyObject,
    o: &Operation,
    e: i32,
    max_requests: u32,
    refused: Exc,
) -> PyErr {
    let fd = o.fd_i32();
    match e {
        // `caio.linux_aio.CapacityError`: upstream's OverflowError (DESIGN.md
        // §4.2), also an OSError with errno EAGAIN (see
        // caio_core::module::init_capacity_error).
        // SAFETY: attached and `slf` is a linux_aio Context (the caller's
        // contract).
        libc::EAGAIN => unsafe {
            caio_core::module::capacity_error(
                slf,
                Exc::OverflowError,
                format!(
                    "Insufficient resources are available to queue any iocbs [EAGAIN]: the \
kernel completion ring of this Context (max_requests={max_requests}) is full; deliver \
completions with process_events() and retry"
                ),
            )
        },
        libc::EBADF => PyErr::ErrnoMsg(
            refused,
            e,
            format!(
                "The file descriptor specified in the first iocb is invalid [EBADF]: fd {} is \
not open{}",
                fd,
                match o.kind {
                    OpKind::Read | OpKind::ReadV => " for reading",
                    OpKind::Write | OpKind::WriteV => " for writing",
                    OpKind::Fsync | OpKind::Fdsync => "",
                }
            ),
        ),
        libc::EFAULT => PyErr::ErrnoMsg(
            refused,
            e,
            "One of the data structures points to invalid data [EFAULT]".to_owned(),
        ),
        libc::EINVAL => PyErr::ErrnoMsg(
            refused,
            e,
            match o.kind {
                OpKind::Read | OpKind::Write | OpKind::ReadV | OpKind::WriteV => format!(
                    "The kernel refused the {} on fd {} [EINVAL]: invalid offset {} (it must not \
be negative: kernel AIO has no current position; and offset + length must fit in a signed \
64-bit file position)",
                    o.kind.mode(),
                    fd,
                    o.offset_i64()
                ),
                OpKind::Fsync | OpKind::Fdsync => format!(
                    "The kernel refused the {} on fd {} [EINVAL]: the file does not support \
synchronization (a pipe, socket or special file; fsync(2) fails the same way)",
                    o.kind.mode(),
                    fd
                ),
            },
        ),
        e => PyErr::ErrnoMsg(
            Exc::SystemError,
            e,
            format!("io_submit failed: {}", sys::strerror(e)),
        ),
    }
}

/// Whether `io_submit`'s `EINVAL` for `cb` (a plain, non-`RWF_NOWAIT` iocb
/// we built) can only mean that the file has no kernel AIO path for it.
///
/// For a read or write the kernel refuses at submission with `EINVAL` when
/// the file has no `read_iter`/`write_iter` (directories, `/dev/full`, many
/// `/proc` and driver files: `read(2)`/`write(2)` work through
/// `->read`/`->write`, kernel AIO does not) or when the position is invalid
/// (negative, or `offset + length` overflows) — everything else a file can
/// object to (misaligned `O_DIRECT`, a short `eventfd` buffer, ...) is
/// reported in the completion instead. So a read or write at a valid
/// position goes to a worker, whose `pread`/`pwrite` yields what the
/// system call gives; a bad position (which `pread` refuses with `EINVAL`
/// too) stays upstream's submit-time error, as does an fsync of a file
/// without `->fsync` (`fsync(2)` fails the same way). Only reached on a
/// refusal: the normal path pays nothing for it.
fn aio_cannot_do(cb: &Iocb) -> bool {
    (cb.opcode == abi::IOCB_CMD_PREAD || cb.opcode == abi::IOCB_CMD_PWRITE)
        && cb.offset >= 0
        && i64::try_from(cb.nbytes)
            .ok()
            .and_then(|n| cb.offset.checked_add(n))
            .is_some()
}

/// Whether `fd` is open with O_DIRECT ([`direct::is_direct`]), remembered
/// for the last fd of a batch.
fn is_direct(fd: c_int, cache: &mut Option<(c_int, bool)>) -> bool {
    match *cache {
        Some((f, direct)) if f == fd => direct,
        _ => {
            let direct = direct::is_direct(fd);
            *cache = Some((fd, direct));
            direct
        }
    }
}

/// Fills the op's iocb (in its engine area). O_DIRECT reads/writes get
/// aligned memory; in event-loop mode reads and writes get `RWF_NOWAIT`.
/// Returns the iocb and whether the op goes straight to the workers
/// instead (then the iocb only keeps its bookkeeping).
///
/// # Safety
/// Attached; `o` has been claimed and begun by the caller (this engine owns
/// its I/O window and engine area) and `slf` is the Context owning `c`.
unsafe fn prepare(
    slf: *mut PyObject,
    c: &AioContext,
    o: &Operation,
    resfd: u32,
    nowait: bool,
    cache: &mut Option<(c_int, bool)>,
) -> Result<(*mut Iocb, bool), PyErr> {
    let mut to_workers = false;
    let mut iocb = Iocb {
        data: o.as_ptr() as u64,
        fildes: o.fd,
        reqprio: signed16(o.priority),
        flags: abi::IOCB_FLAG_RESFD,
        resfd,
        ..Iocb::default()
    };
    match o.kind {
        OpKind::Fsync => iocb.opcode = abi::IOCB_CMD_FSYNC,
        OpKind::Fdsync => iocb.opcode = abi::IOCB_CMD_FDSYNC,
        OpKind::ReadV | OpKind::WriteV => {
            // The caller's buffers as they are: no aligned window for a
            // vectored op (O_DIRECT: the kernel's answer stands). In
            // event-loop mode the same non-blocking attempt and routing as
            // a read or write; a refusal goes to a worker (preadv/pwritev).
            if nowait && !is_direct(o.fd_i32(), cache) {
                if c.routes.of(o.kind).straight_to_workers() {
                    to_workers = true;
                } else {
                    iocb.rw_flags = RWF_NOWAIT;
                    iocb.data |= TAG_BUFFERED;
                }
            }
            // SAFETY: this engine owns the claimed op's iovecs.
            let (iov, count) = unsafe { o.iovecs() };
            iocb.opcode = if o.kind == OpKind::ReadV {
                abi::IOCB_CMD_PREADV
            } else {
                abi::IOCB_CMD_PWRITEV
            };
            iocb.buf = iov as u64;
            iocb.nbytes = count as u64;
            iocb.offset = signed64(o.offset);
        }
        OpKind::Read | OpKind::Write => {
            let direct = is_direct(o.fd_i32(), cache);
            if direct {
                if o.kind == OpKind::Write {
                    // SAFETY: the caller's contract (attached, `o` claimed
                    // and not dispatched, `slf` our Context).
                    unsafe { prepare_direct_write(slf, o) }?;
                } else {
                    // SAFETY: `o` is between claim and dispatch (the
                    // caller's contract).
                    unsafe { o.use_aligned_window(direct::DEFAULT_ALIGN) }?;
                }
            }
            if nowait {
                // Buffered: no waiting for the disk. O_DIRECT: no waiting
                // for a free request slot on a saturated device, nor for
                // block allocation or the inode lock (REQ_NOWAIT/IOCB_NOWAIT).
                iocb.rw_flags = RWF_NOWAIT;
                if !direct {
                    if c.routes.of(o.kind).straight_to_workers() {
                        iocb.rw_flags = 0;
                        to_workers = true;
                    } else {
                        iocb.data |= TAG_BUFFERED;
                    }
                }
            }
            // SAFETY: this engine owns the claimed op's I/O window.
            let io = unsafe { o.io() };
            if nowait
                && !direct
                && o.kind == OpKind::Read
                && caio_core::sys::distance::needs_scratch(io.ptr, io.len, io.offset)
            {
                // The kernel would copy into the caller's memory at a slow
                // distance (DESIGN.md §11.3); a worker reads through its
                // scratch buffer at full speed.
                iocb.rw_flags = 0;
                iocb.data &= !TAG_BUFFERED;
                to_workers = true;
            }
            iocb.opcode = if o.kind == OpKind::Read {
                abi::IOCB_CMD_PREAD
            } else {
                abi::IOCB_CMD_PWRITE
            };
            iocb.buf = io.ptr as u64;
            iocb.nbytes = io.len as u64;
            iocb.offset = signed64(io.offset);
        }
    }
    // SAFETY: this engine owns the claimed op's engine area, one `Iocb`;
    // nothing else (the kernel included) uses it before submission.
    let cb = unsafe {
        let cb = iocb_of(o);
        cb.write(iocb);
        cb
    };
    Ok((cb, to_workers))
}

/// O_DIRECT write policy: the payload is always copied into aligned memory
/// (a `bytes` object never is); offset and length must be multiples of the
/// file's O_DIRECT offset alignment ([`direct::check_write`]), otherwise
/// `SubmitError` (an `OSError` with errno EINVAL, and a `ValueError`) naming
/// it.
///
/// # Safety
/// As [`prepare`]: attached, `o` between claim and dispatch, `slf` a
/// linux_aio Context.
unsafe fn prepare_direct_write(slf: *mut PyObject, o: &Operation) -> PyResult<()> {
    if o.nbytes == 0 {
        return Ok(()); // nothing is transferred; no alignment needed
    }
    if let Err(granularity) = direct::check_write(o) {
        return Err(PyErr::ErrnoMsg(
            // SAFETY: attached, `slf` a linux_aio Context (our contract).
            unsafe { submit_error_type(slf) },
            libc::EINVAL,
            format!(
                "O_DIRECT write to fd {} must have offset and length aligned to {} bytes \
(got offset={}, length={}); pad the data or open the file without O_DIRECT",
                o.fd_i32(),
                granularity,
                o.offset_i64(),
                o.nbytes
            ),
        ));
    }
    // SAFETY: `o` is between claim and dispatch (our contract); offset and
    // length were checked against the alignment above.
    unsafe { o.use_aligned_window(direct::DEFAULT_ALIGN) }
}

/// Claims and submits `args` (all known to be Operations), see
/// [`submit_claimed`]. Ops that cannot be claimed (in flight elsewhere,
/// listed twice, or done) are skipped.
///
/// # Safety
/// Attached; `slf` is the linux_aio Context owning `c` and every element of
/// `args` is an Operation of its module (`check_ops`).
pub(crate) unsafe fn submit_ops(
    slf: *mut PyObject,
    c: &AioContext,
    args: &[*mut PyObject],
    accepted: Option<&mut Vec<usize>>,
) -> PyResult<(usize, Option<(usize, PyErr)>)> {
    c.check_fork()?;
    if c.closing.load(Ordering::Acquire) {
        return Err(closed_error());
    }
    let mut claimed: Vec<(usize, *mut Operation)> = Vec::with_capacity(args.len());
    for (i, &a) in args.iter().enumerate() {
        // SAFETY: `a` is an Operation (our contract), alive for the call.
        let o = unsafe { as_op(a) };
        if o.try_claim() {
            // SAFETY: attached, and we have just claimed `o`.
            unsafe { op::begin(o, slf) };
            claimed.push((i, a.cast::<Operation>()));
        }
    }
    // SAFETY: attached; every op in `claimed` was claimed and begun above.
    unsafe { submit_claimed(slf, c, &claimed, accepted) }
}

/// Prepares and submits ops the caller has claimed and begun (`(argument
/// index, op)`), in one `io_submit` when the kernel takes them all. Returns
/// how many were accepted (a prefix) and, if one was refused, its argument
/// index and the reason: that op and every later one is rolled back (`NEW`,
/// retryable). Indices of accepted ops are pushed to `accepted` when given.
/// On `Err` every op is rolled back.
///
/// # Safety
/// Attached; `slf` is the linux_aio Context owning `c`; every op in
/// `claimed` was claimed and begun ([`op::begin`]) by the caller and is not
/// handed to any engine yet: from here on this function owns it.
pub(crate) unsafe fn submit_claimed(
    slf: *mut PyObject,
    c: &AioContext,
    claimed: &[(usize, *mut Operation)],
    accepted: Option<&mut Vec<usize>>,
) -> PyResult<(usize, Option<(usize, PyErr)>)> {
    /// Rolls `p` back to `NEW`.
    ///
    /// # Safety
    /// Attached; `p` is begun and was not accepted by the kernel nor handed
    /// to a worker.
    unsafe fn abort(p: *mut Operation) {
        // SAFETY: the caller's contract; the op is alive (we hold the
        // reference `op::begin` took).
        unsafe { op::abort(&*p) }
    }
    // Only before anything is prepared or dispatched.
    let abort_all = || {
        for &(_, p) in claimed {
            // SAFETY: used only on the early returns below, before any op
            // of `claimed` was prepared, submitted or handed to a worker.
            unsafe { abort(p) };
        }
    };
    if let Err(e) = c.check_fork() {
        abort_all();
        return Err(e);
    }
    let h = c.read();
    // The queue (eventfd) is released together with the kernel context.
    let queue = match h.queue.as_ref() {
        Some(q) if h.aio != 0 && !c.closing.load(Ordering::Acquire) => q,
        _ => {
            drop(h);
            abort_all();
            return Err(closed_error());
        }
    };
    // An open eventfd: never negative.
    let resfd = u32::try_from(queue.fileno()).unwrap_or(u32::MAX);
    // (argument index, op, goes straight to the workers)
    let mut entries: Vec<(usize, *mut Operation, bool)> = Vec::with_capacity(claimed.len());
    let mut iocbs: Vec<*mut Iocb> = Vec::with_capacity(claimed.len());
    // For each iocb, the index of its entry.
    let mut iocb_entry: Vec<usize> = Vec::with_capacity(claimed.len());
    let mut local: Option<(usize, PyErr)> = None;
    let mut cache = None;
    let nowait = c.nowait.load(Ordering::Relaxed);
    for &(i, p) in claimed {
        // SAFETY: attached; `p` is claimed and begun, not dispatched, and
        // alive (our contract).
        match unsafe { prepare(slf, c, &*p, resfd, nowait, &mut cache) } {
            Ok((cb, mut to_workers)) => {
                // SAFETY: `p` is claimed and begun: a live in-flight op.
                let o = unsafe { &*p };
                match o.kind {
                    // Recorded before the kernel or a worker can finish it.
                    OpKind::Write | OpKind::WriteV => {
                        // SAFETY: as above.
                        let _ = unsafe { c.order.submitted(Job(p)) };
                    }
                    // Behind unfinished writes to its fd: not for the kernel
                    // (it would run it at once); held, then run by a worker
                    // once those writes are done (see the hand-over below).
                    OpKind::Fsync | OpKind::Fdsync if c.order.writes_pending(o.fd_i32()) => {
                        to_workers = true;
                    }
                    _ => {}
                }
                if !to_workers {
                    iocbs.push(cb);
                    iocb_entry.push(entries.len());
                }
                entries.push((i, p, to_workers));
            }
            Err(e) => {
                local = Some((i, e));
                break;
            }
        }
    }
    // The op that could not be prepared and everything after it.
    let unprepared = &claimed[entries.len()..];
    // Counted before the kernel sees them: a completion may be reaped by
    // another thread before io_submit even returns.
    c.in_flight.fetch_add(entries.len(), Ordering::AcqRel);
    let mut done = 0usize;
    let mut refused: Option<(usize, i32)> = None;
    while done < iocbs.len() {
        // SAFETY: each iocb lives in the engine area of an op we own (the
        // begun op holds a reference, so the object and its buffers — the
        // result bytes, the payload export or the aligned window — stay
        // alive until the completion is reaped); the handle is held
        // shared, so the context cannot be released meanwhile.
        match unsafe { abi::io_submit(h.aio, &iocbs[done..]) } {
            Ok(0) => {
                refused = Some((done, libc::EAGAIN));
                break;
            }
            Ok(n) => done += n,
            Err(libc::EINTR) => continue,
            Err(e) => {
                // SAFETY: the kernel refused this iocb (it did not take it),
                // so it is still ours alone.
                let cb = unsafe { &mut *iocbs[done] };
                if cb.rw_flags & RWF_NOWAIT != 0 && (e == libc::EOPNOTSUPP || e == libc::EINVAL) {
                    // This file cannot do non-blocking AIO (tmpfs, procfs, a
                    // pipe, a directory...): submit it the classic way, which
                    // also yields upstream's error if it is invalid anyway.
                    cb.rw_flags &= !RWF_NOWAIT;
                    cb.data &= !TAG_BUFFERED;
                    continue;
                }
                if e == libc::EINVAL && aio_cannot_do(cb) {
                    // The file has no kernel AIO path (a directory, /dev/full,
                    // most /proc files...): a worker's pread/pwrite gives the
                    // true result or errno (EISDIR, ENOSPC, the data).
                    entries[iocb_entry[done]].2 = true;
                    done += 1;
                    continue;
                }
                refused = Some((done, e));
                break;
            }
        }
    }
    // Entries before the refused one are accepted (the kernel took the
    // iocbs among them); the worker-bound ones among them are handed over
    // now, the rest is rolled back.
    let cut = refused.map_or(entries.len(), |(k, _)| iocb_entry[k]);
    // Rolled-back writes hold nothing back any more (a sync can only wait
    // for writes submitted before it, so none is released here; started
    // anyway if one were).
    let mut released = Vec::new();
    for &(_, p, _) in &entries[cut..] {
        // SAFETY: claimed and begun: a live op.
        released.extend(unsafe { c.order.finished(p) });
    }
    if !released.is_empty() || entries[..cut].iter().any(|e| e.2) {
        let mut reap = c.lock_reap();
        // SAFETY: released syncs are claimed, begun, counted and never
        // dispatched; `reap`/`queue` are this context's.
        unsafe { c.start_released(&mut reap, queue, released) };
        for &(_, p, to_workers) in &entries[..cut] {
            // SAFETY: claimed and begun: a live in-flight op.
            let sync = matches!(unsafe { (*p).kind }, OpKind::Fsync | OpKind::Fdsync);
            if to_workers && sync {
                // SAFETY: claimed and begun: a live in-flight op, not
                // dispatched. Held while writes before it are unfinished
                // (they may all have finished since `prepare`: then now).
                match unsafe { c.order.submitted(Job(p)) } {
                    pool::order::Admit::Held => continue,
                    pool::order::Admit::Run(_) => {}
                }
            }
            // SAFETY: `p` is claimed, begun and prepared, and not in the
            // kernel (no iocb was submitted for it): ours to hand over.
            if to_workers && !unsafe { c.to_pool(&mut reap, queue, p) } {
                // No worker thread could be started: do it here; the
                // result is delivered by process_events() like any other.
                // SAFETY: as above; this engine owns `p` until delivery.
                let r = unsafe { pool::execute(&*p, None) };
                reap.backlog.push_back((Job(p), r));
                signal_fd(queue.fileno());
            }
        }
    }
    drop(h);
    let rolled_back = entries.len() - cut;
    if rolled_back > 0 {
        c.in_flight.fetch_sub(rolled_back, Ordering::AcqRel);
    }
    for &(_, p, _) in &entries[cut..] {
        // SAFETY: refused or after the refused one: the kernel did not take
        // its iocb and no worker has it.
        unsafe { abort(p) };
    }
    for &(_, p) in unprepared {
        // SAFETY: never prepared, so never dispatched.
        unsafe { abort(p) };
    }
    if let Some(acc) = accepted {
        acc.extend(entries[..cut].iter().map(|&(i, _, _)| i));
    }
    let failure = match refused {
        Some((_, r)) => {
            let (i, p, _) = entries[cut];
            // SAFETY: attached, `slf` our Context; `p` was rolled back but
            // is still alive (the caller holds the argument's reference).
            let e = unsafe { refusal_error(slf, &*p, r, c.max_requests, submit_error_type(slf)) };
            Some((i, e))
        }
        None => local,
    };
    Ok((cut, failure))
}

impl AioContext {
    /// `io_cancel` for `o`'s iocb; `None` once the kernel context is
    /// released (then nothing is in flight). The kernel only compares the
    /// pointer with the requests of this context, so any op (never
    /// submitted, done, another Context's) may be passed: it is simply not
    /// found (`EINVAL`). Current kernels report a started cancellation as
    /// `EINPROGRESS`; the op then completes (`-ECANCELED`) through the
    /// completion ring.
    pub(crate) fn cancel(&self, o: &Operation) -> Option<Result<(), i32>> {
        let h = self.read();
        if h.aio == 0 {
            return None;
        }
        // SAFETY: the engine area is memory inside the live op object (the
        // caller holds a reference); the kernel reads only the iocb's key
        // and compares the address with its own requests. The handle is
        // held shared: the context stays alive for the call.
        Some(unsafe { abi::io_cancel(h.aio, iocb_of(o)) })
    }
}
