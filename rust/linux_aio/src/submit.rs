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

use std::ffi::c_int;
use std::sync::atomic::Ordering;

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

/// Memory alignment (and read window granularity) for O_DIRECT: covers every
/// logical block size up to a page.
const DIO_ALIGN: usize = 4096;

/// The module's `SubmitError(OSError, ValueError)` class (borrowed: the
/// module keeps it alive), or plain `ValueError` if it cannot be found.
unsafe fn submit_error_type(slf: *mut PyObject) -> Exc {
    let module = PyType_GetModule(Py_TYPE(slf));
    if !module.is_null() {
        let cls = PyObject_GetAttrString(module, c"SubmitError".as_ptr());
        if !cls.is_null() {
            Py_DECREF(cls);
            return Exc::Custom(cls);
        }
    }
    PyErr_Clear();
    Exc::ValueError
}

/// Exception for an op that `io_submit` refused with `e` (API.md §3.2;
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
        // `caio.linux_aio.CapacityError`: upstream's OverflowError (API.md
        // §3.6), also an OSError with errno EAGAIN (see
        // caio_core::module::init_capacity_error).
        libc::EAGAIN => caio_core::module::capacity_error(
            slf,
            Exc::OverflowError,
            format!(
                "Insufficient resources are available to queue any iocbs [EAGAIN]: the kernel \
completion ring of this Context (max_requests={max_requests}) is full; deliver completions \
with process_events() and retry"
            ),
        ),
        libc::EBADF => PyErr::ErrnoMsg(
            refused,
            e,
            format!(
                "The file descriptor specified in the first iocb is invalid [EBADF]: fd {} is \
not open{}",
                fd,
                match o.kind {
                    OpKind::Read => " for reading",
                    OpKind::Write => " for writing",
                    _ => "",
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
            format!(
                "The kernel refused the {} on fd {} [EINVAL]: the file does not support this \
operation through kernel AIO (a directory, an eventfd, a pipe or socket with a position, \
fsync on a special file, ...) or the offset is invalid",
                o.kind.mode(),
                fd
            ),
        ),
        e => PyErr::ErrnoMsg(
            Exc::SystemError,
            e,
            format!("io_submit failed: {}", sys::strerror(e)),
        ),
    }
}

/// `fcntl(F_GETFL)`, remembered for the last fd of a batch.
fn fd_flags(fd: u32, cache: &mut Option<(u32, c_int)>) -> c_int {
    if let Some((f, flags)) = *cache {
        if f == fd {
            return flags;
        }
    }
    let flags = unsafe { libc::fcntl(fd as c_int, libc::F_GETFL) };
    *cache = Some((fd, flags));
    flags
}

/// Fills the op's iocb (in its engine area). O_DIRECT reads/writes get
/// aligned memory; in event-loop mode reads and writes get `RWF_NOWAIT`.
unsafe fn prepare(
    slf: *mut PyObject,
    c: &AioContext,
    o: &Operation,
    resfd: i32,
    nowait: bool,
    cache: &mut Option<(u32, c_int)>,
) -> Result<(*mut Iocb, bool), PyErr> {
    let mut to_workers = false;
    let cb = o.engine_area() as *mut Iocb;
    let mut iocb = Iocb {
        data: o.as_ptr() as u64,
        fildes: o.fd,
        reqprio: o.priority as i16,
        flags: abi::IOCB_FLAG_RESFD,
        resfd: resfd as u32,
        ..Iocb::default()
    };
    match o.kind {
        OpKind::Fsync => iocb.opcode = abi::IOCB_CMD_FSYNC,
        OpKind::Fdsync => iocb.opcode = abi::IOCB_CMD_FDSYNC,
        OpKind::Read | OpKind::Write => {
            let flags = fd_flags(o.fd, cache);
            let direct = flags >= 0 && flags & libc::O_DIRECT != 0;
            if direct {
                if o.kind == OpKind::Write {
                    prepare_direct_write(slf, o)?;
                } else {
                    o.use_aligned_window(DIO_ALIGN)?;
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
            let io = o.io();
            iocb.opcode = if o.kind == OpKind::Read {
                abi::IOCB_CMD_PREAD
            } else {
                abi::IOCB_CMD_PWRITE
            };
            iocb.buf = io.ptr as u64;
            iocb.nbytes = io.len as u64;
            iocb.offset = io.offset as i64;
        }
    }
    cb.write(iocb);
    Ok((cb, to_workers))
}

/// O_DIRECT write policy: the payload is always copied into aligned memory
/// (a `bytes` object never is); offset and length must be multiples of the
/// file's O_DIRECT offset alignment, otherwise `SubmitError` (an `OSError`
/// with errno EINVAL, and a `ValueError`) naming it.
unsafe fn prepare_direct_write(slf: *mut PyObject, o: &Operation) -> PyResult<()> {
    if o.nbytes == 0 {
        return Ok(()); // nothing is transferred; no alignment needed
    }
    let (mem_align, off_align) = if (o.offset | o.nbytes) % DIO_ALIGN as u64 == 0 {
        (DIO_ALIGN, DIO_ALIGN as u64)
    } else {
        match caio_core::sys::dio_alignment(o.fd_i32()) {
            Some((m, off)) => ((m as usize).max(DIO_ALIGN), off as u64),
            None => (DIO_ALIGN, 512),
        }
    };
    if o.offset % off_align != 0 || o.nbytes % off_align != 0 {
        return Err(PyErr::ErrnoMsg(
            submit_error_type(slf),
            libc::EINVAL,
            format!(
                "O_DIRECT write to fd {} must have offset and length aligned to {} bytes \
(got offset={}, length={}); pad the data or open the file without O_DIRECT",
                o.fd_i32(),
                off_align,
                o.offset_i64(),
                o.nbytes
            ),
        ));
    }
    o.use_aligned_window(mem_align.next_power_of_two())
}

/// Claims and submits `args` (all known to be Operations), see
/// [`submit_claimed`]. Ops that cannot be claimed (in flight elsewhere,
/// listed twice, or done) are skipped.
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
        let o = as_op(a);
        if o.try_claim() {
            op::begin(o, slf);
            claimed.push((i, a as *mut Operation));
        }
    }
    submit_claimed(slf, c, &claimed, accepted)
}

/// Prepares and submits ops the caller has claimed and begun (`(argument
/// index, op)`), in one `io_submit` when the kernel takes them all. Returns
/// how many were accepted (a prefix) and, if one was refused, its argument
/// index and the reason: that op and every later one is rolled back (`NEW`,
/// retryable). Indices of accepted ops are pushed to `accepted` when given.
/// On `Err` every op is rolled back.
pub(crate) unsafe fn submit_claimed(
    slf: *mut PyObject,
    c: &AioContext,
    claimed: &[(usize, *mut Operation)],
    accepted: Option<&mut Vec<usize>>,
) -> PyResult<(usize, Option<(usize, PyErr)>)> {
    let abort_all = || {
        for &(_, p) in claimed {
            op::abort(&*p);
        }
    };
    if let Err(e) = c.check_fork() {
        abort_all();
        return Err(e);
    }
    let h = c.read();
    if c.closing.load(Ordering::Acquire) || h.aio == 0 {
        drop(h);
        abort_all();
        return Err(closed_error());
    }
    let resfd = h.queue.as_ref().map_or(-1, |q| q.fileno());
    // (argument index, op, goes straight to the workers)
    let mut entries: Vec<(usize, *mut Operation, bool)> = Vec::with_capacity(claimed.len());
    let mut iocbs: Vec<*mut Iocb> = Vec::with_capacity(claimed.len());
    // For each iocb, the index of its entry.
    let mut iocb_entry: Vec<usize> = Vec::with_capacity(claimed.len());
    let mut local: Option<(usize, PyErr)> = None;
    let mut cache = None;
    let nowait = c.nowait.load(Ordering::Relaxed);
    for &(i, p) in claimed {
        match prepare(slf, c, &*p, resfd, nowait, &mut cache) {
            Ok((cb, to_workers)) => {
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
        match abi::io_submit(h.aio, &iocbs[done..]) {
            Ok(0) => {
                refused = Some((done, libc::EAGAIN));
                break;
            }
            Ok(n) => done += n,
            Err(libc::EINTR) => continue,
            Err(e) => {
                let cb = &mut *iocbs[done];
                if cb.rw_flags & RWF_NOWAIT != 0 && (e == libc::EOPNOTSUPP || e == libc::EINVAL) {
                    // This file cannot do non-blocking AIO (tmpfs, procfs, a
                    // pipe, a directory...): submit it the classic way, which
                    // also yields upstream's error if it is invalid anyway.
                    cb.rw_flags &= !RWF_NOWAIT;
                    cb.data &= !TAG_BUFFERED;
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
    if entries[..cut].iter().any(|e| e.2) {
        if let Some(queue) = h.queue.as_ref() {
            let mut reap = c.lock_reap();
            for &(_, p, to_workers) in &entries[..cut] {
                if to_workers && !c.to_pool(&mut reap, queue, p) {
                    // No worker thread could be started: do it here; the
                    // result is delivered by process_events() like any other.
                    let r = pool::execute(&*p);
                    reap.backlog.push_back((Job(p), r));
                    signal_fd(queue.fileno());
                }
            }
        }
    }
    drop(h);
    let rolled_back = entries.len() - cut;
    if rolled_back > 0 {
        c.in_flight.fetch_sub(rolled_back, Ordering::AcqRel);
    }
    for &(_, p, _) in &entries[cut..] {
        op::abort(&*p);
    }
    for &(_, p) in unprepared {
        op::abort(&*p);
    }
    if let Some(acc) = accepted {
        acc.extend(entries[..cut].iter().map(|&(i, _, _)| i));
    }
    let failure = match refused {
        Some((_, r)) => {
            let (i, p, _) = entries[cut];
            Some((
                i,
                refusal_error(slf, &*p, r, c.max_requests, submit_error_type(slf)),
            ))
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
    pub(crate) unsafe fn cancel(&self, o: &Operation) -> Option<Result<(), i32>> {
        let h = self.read();
        if h.aio == 0 {
            return None;
        }
        Some(abi::io_cancel(h.aio, o.engine_area() as *mut Iocb))
    }
}
