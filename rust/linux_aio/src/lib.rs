//! `caio.linux_aio`: Linux kernel AIO (`io_setup`/`io_submit`), spoken
//! directly through system calls.
//!
//! What it adds over a plain AIO binding (and over upstream caio):
//!
//! * **The event loop never waits for the disk on buffered files.** Kernel
//!   AIO on a file without `O_DIRECT` runs the whole read inside
//!   `io_submit`. In event-loop mode (`_set_nowait(True)`, which the asyncio
//!   adapter turns on; a raw Context keeps upstream's synchronous semantics)
//!   we submit buffered reads and writes with `RWF_NOWAIT`:
//!   page-cache hits complete inline as before, and what the kernel refuses
//!   (`-EAGAIN`; `-EOPNOTSUPP` for buffered writes on filesystems without
//!   non-blocking writes, e.g. ext4) or transfers only partly is handed to a
//!   small worker pool (`caio_core::pool`, created on first need). Workers
//!   queue their results and signal the same eventfd the kernel signals, and
//!   `process_events()` delivers both kinds on the caller's (loop) thread.
//!   A refused read has still started its readahead inside `io_submit`, and
//!   that can sleep for a free request slot on a busy device, so while most
//!   attempts are refused (a cold file; ext4 writes) operations skip the
//!   kernel attempt and go straight to the workers (see `Route`). `O_DIRECT`
//!   requests get `RWF_NOWAIT` too, so a saturated device (no free request
//!   slot), block allocation or a contended inode lock cannot block the
//!   loop either.
//! * **`O_DIRECT` works.** Reads go through a 4096-byte aligned window
//!   (any offset/length; the caller still gets `bytes`); writes are copied
//!   into aligned memory, and must have offset and length aligned to the
//!   file's O_DIRECT granularity (`statx` `STATX_DIOALIGN`), else they are
//!   refused at submission with `SubmitError` (`OSError` EINVAL, also a
//!   `ValueError`) naming the alignment.
//! * **No kernel context leaks.** `Context.close()` (an extension) and
//!   deallocation release the AIO context deterministically, without
//!   blocking the caller (see `destroyer`).
//! * Completions are read from the kernel's completion ring in user space
//!   (no `io_getevents` system call per drain).
//!
//! Linux only: on other targets the crate is empty (so `cargo build
//! --workspace` works everywhere; setup.py builds it on Linux only).
#![cfg(target_os = "linux")]

mod abi;
mod adapter;
mod destroyer;

use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use caio_core::args::{int_in, Params};
use caio_core::module::{init_common, ContextType, ModState};
use caio_core::op::{self, as_op, Delivery, Flavor, OpKind, Operation, ReadPayload};
use caio_core::pool::{self, CompletionQueue, Job, Pool};
use caio_core::py::{
    allow_threads, none, py_int, py_str, py_uint, trampoline, trampoline_void, Borrowed, Exc,
    Owned, PyErr, PyResult,
};
use caio_core::pyo3_ffi::*;
use caio_core::{backend_module, sys};

use abi::{IoEvent, Iocb, Ring, RWF_NOWAIT};

static FLAVOR: Flavor = Flavor {
    type_name: c"aio.AIOOperation",
    doc: c"linux aio operation representation",
    read_payload: ReadPayload::MemoryView,
    drop_write_payload: false,
    nbytes_tracks_write: true,
    max_read: isize::MAX as u64,
    max_read_msg: "nbytes does not fit in Py_ssize_t",
    offset_min: i64::MIN as i128,
    offset_max: i64::MAX as i128,
    // Sent as the iocb's signed 16-bit aio_reqprio.
    priority_min: i16::MIN as i128,
    priority_max: i16::MAX as i128,
    payload_type_msg: "payload_bytes argument must be bytes",
    // API.md §7 Q1, fixed: callbacks get the signed kernel result (bytes
    // moved, or -errno), not its unsigned 64-bit reinterpretation.
    failure_as_minus_one: false,
    callback_keyword: true,
    has_result_error: false,
    has_context: true,
    has_priority: true,
    repr_offset_signed: true,
    repr_result: false,
};

const DEFAULT_MAX_REQUESTS: u32 = 32;
const DEFAULT_EVENTS: usize = 512;
const MAX_EVENTS: usize = 1 << 20;
/// Worker threads for operations the kernel would have run synchronously.
/// While reads go straight to the workers (see [`Route`]), this is the
/// number of disk reads in flight.
const POOL_SIZE: usize = 16;
/// In "straight to the workers" mode, one operation per this interval
/// still tries the kernel first, to notice when the data is cached again.
/// Time-based: a probe on a cold file costs the loop thread the readahead
/// submission, up to a millisecond or more on a busy device.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// `aio_data` tag: a buffered read/write submitted with RWF_NOWAIT (its
/// outcome feeds [`Route`]). Operation pointers are 8-byte aligned.
const TAG_BUFFERED: u64 = 1;

/// Where buffered reads (or writes) of an event-loop-mode Context go.
///
/// A refused RWF_NOWAIT read has done part of the work on the loop thread:
/// the kernel allocated page-cache pages and submitted the readahead I/O,
/// and that submission sleeps when the device's request slots are
/// exhausted (perf: blk_mq_get_tag under io_submit, 5-35 ms loop stalls on
/// a busy disk). So when most recent attempts were refused (a cold file),
/// operations go straight to the workers, which do the whole read
/// themselves; one per [`PROBE_INTERVAL`] still tries the kernel, so once
/// the data is cached the loop serves it inline again. Writes use the same
/// logic: on filesystems without non-blocking buffered writes (ext4) every
/// attempt is refused, and skipping it saves a system call and a wake-up.
struct Route {
    /// Moving average of "refused" (0..=1024), updated under the reap lock.
    refused: AtomicU32,
    cold: AtomicBool,
    /// When the last probe was sent (microseconds, [`monotonic_us`]).
    last_probe: AtomicU64,
}

/// Microseconds on a process-wide monotonic clock that starts at one second
/// (so a `last_probe` of 0 is always long enough ago).
fn monotonic_us() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1_000_000
}

impl Route {
    const ONE: u32 = 1024;

    const fn new() -> Route {
        Route {
            refused: AtomicU32::new(0),
            cold: AtomicBool::new(false),
            last_probe: AtomicU64::new(0),
        }
    }

    fn record(&self, refused: bool) {
        let avg = self.refused.load(Ordering::Relaxed);
        let sample = if refused { Self::ONE } else { 0 };
        let avg = avg - avg / 16 + sample / 16;
        self.refused.store(avg, Ordering::Relaxed);
        // Hysteresis: a mixed workload does not flip on every sample.
        if avg > Self::ONE * 3 / 4 {
            self.cold.store(true, Ordering::Relaxed);
        } else if avg < Self::ONE / 4 {
            self.cold.store(false, Ordering::Relaxed);
        }
    }

    /// Whether the next operation skips the kernel attempt.
    fn straight_to_workers(&self) -> bool {
        if !self.cold.load(Ordering::Relaxed) {
            return false;
        }
        let now = monotonic_us();
        let last = self.last_probe.load(Ordering::Relaxed);
        let probe = now.saturating_sub(last) >= PROBE_INTERVAL.as_micros() as u64
            && self
                .last_probe
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        !probe
    }
}
/// Memory alignment (and read window granularity) for O_DIRECT: covers every
/// logical block size up to a page.
const DIO_ALIGN: usize = 4096;

// ---------------------------------------------------------------------------
// Context state

struct Handle {
    /// The kernel `aio_context_t`; 0 once released.
    aio: u64,
    /// Completions can be read from the ring in user space.
    user_ring: bool,
    /// Owns the eventfd signalled by the kernel (IOCB_FLAG_RESFD) and by the
    /// worker pool; `None` once released.
    queue: Option<Arc<CompletionQueue>>,
}

struct Reap {
    pool: Option<Arc<Pool>>,
    pool_failed: bool,
    /// Worker completions taken from the queue but not delivered yet
    /// (`process_events(max_requests=…)` may stop half-way).
    backlog: VecDeque<(Job, i64)>,
    scratch: Vec<(Job, i64)>,
    events: Vec<IoEvent>,
}

struct AioContext {
    max_requests: u32,
    fork_generation: u64,
    /// The context id as created (for repr).
    aio_id: u64,
    /// The eventfd, -1 once released.
    fileno: AtomicI32,
    /// `close()` was called: nothing new is accepted; resources are released
    /// once nothing is in flight.
    closing: AtomicBool,
    /// Submitters and drainers hold it shared; releasing takes it exclusively
    /// (the ring is unmapped by io_destroy).
    handle: RwLock<Handle>,
    /// Serialises ring readers and the worker-completion backlog.
    reap: Mutex<Reap>,
    /// Accepted and not yet delivered (kernel or worker pool).
    in_flight: AtomicUsize,
    /// Event-loop mode (`_set_nowait`): buffered reads/writes are submitted
    /// with RWF_NOWAIT and what the kernel refuses goes to worker threads.
    nowait: AtomicBool,
    reads: Route,
    writes: Route,
    /// The asyncio adapter's `deferred=True` batch: ops claimed by the
    /// engine (owned references, not begun), submitted by the next flush
    /// (see `adapter`).
    staged: Mutex<Vec<usize>>,
    /// A flush of `staged` is scheduled on the event loop.
    flush_scheduled: AtomicBool,
}

#[repr(C)]
struct Context {
    ob_base: PyObject,
    weakreflist: *mut PyObject,
    inner: AioContext,
}

unsafe fn ctx<'a>(p: *mut PyObject) -> &'a AioContext {
    &(*(p as *const Context)).inner
}

fn closed_error() -> PyErr {
    PyErr::runtime("Context is closed")
}

impl AioContext {
    fn read(&self) -> RwLockReadGuard<'_, Handle> {
        self.handle.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Handle> {
        self.handle.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_reap(&self) -> MutexGuard<'_, Reap> {
        self.reap.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forked(&self) -> bool {
        sys::fork_generation() != self.fork_generation
    }

    fn check_fork(&self) -> PyResult<()> {
        if self.forked() {
            return Err(PyErr::runtime(
                "this linux_aio Context was created before fork(): its kernel AIO context \
belongs to the parent process; create a new Context in the child",
            ));
        }
        Ok(())
    }

    fn queue(&self) -> Option<Arc<CompletionQueue>> {
        self.read().queue.clone()
    }

    /// Releases the kernel context (see `destroyer`) and detaches the eventfd
    /// and the worker pool, which [`Released::finish`] then closes. Caller
    /// holds the handle exclusively and nothing is in flight.
    fn release_locked(&self, h: &mut Handle) -> Released {
        let forked = self.forked();
        if h.aio != 0 {
            if !forked {
                destroyer::destroy(h.aio);
            }
            h.aio = 0;
        }
        self.fileno.store(-1, Ordering::Relaxed);
        let queue = h.queue.take();
        if let Some(q) = &queue {
            // Wake any thread blocked in process_events() on it.
            signal_fd(q.fileno());
        }
        Released {
            pool: self.lock_reap().pool.take(),
            queue,
            forked,
        }
    }

    fn release_if_idle(&self) {
        if !self.closing.load(Ordering::Acquire) || self.in_flight.load(Ordering::Acquire) != 0 {
            return;
        }
        let released = {
            let mut h = self.write();
            if self.in_flight.load(Ordering::Acquire) != 0 || h.queue.is_none() {
                return;
            }
            self.release_locked(&mut h)
        };
        released.finish();
    }
}

/// What `release_locked` detached, to be closed without our locks held.
struct Released {
    pool: Option<Arc<Pool>>,
    queue: Option<Arc<CompletionQueue>>,
    forked: bool,
}

impl Released {
    /// Caller attached (GIL held). Joins the (idle) workers so that the
    /// eventfd, which they share, is closed by the time this returns.
    fn finish(self) {
        if let Some(pool) = self.pool {
            if self.forked {
                // The workers do not exist in a forked child.
                std::mem::forget(pool);
            } else {
                allow_threads(|| pool.shutdown(true));
            }
        }
        drop(self.queue);
        throttle_destroys();
    }
}

/// Caller attached (GIL held); waits with the GIL released if too many
/// closed contexts still wait for `io_destroy` (see `destroyer`).
fn throttle_destroys() {
    if destroyer::over_backlog() {
        allow_threads(destroyer::wait_backlog);
    }
}

fn signal_fd(fd: i32) {
    let one: u64 = 1;
    unsafe {
        libc::write(fd, (&one as *const u64).cast(), 8);
    }
}

/// Reads (and so resets) an eventfd counter: `Ok(0)` if it was zero.
fn read_counter(fd: i32) -> Result<u64, i32> {
    let mut v: u64 = 0;
    let r = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if r == 8 {
        return Ok(v);
    }
    match sys::last_errno() {
        libc::EAGAIN => Ok(0),
        e => Err(e),
    }
}

// ---------------------------------------------------------------------------
// creation

static NEW_PARAMS: Params = Params {
    fname: "Context",
    names: &["max_requests"],
    required: 0,
    keywords: true,
};

fn setup_error(nr: u32, errno: i32) -> PyErr {
    let msg = match errno {
        libc::EAGAIN => {
            let (nr_now, max) = abi::aio_counters();
            let show = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
            format!(
                "io_setup({nr}) failed: {} [EAGAIN]. The system-wide kernel AIO limit is \
exhausted: /proc/sys/fs/aio-nr is {} of /proc/sys/fs/aio-max-nr = {} (every Context reserves \
about 2 * max_requests events until it is closed). Close contexts you no longer need \
(Context.close(), AsyncioContext.close()), use a smaller max_requests, or raise fs.aio-max-nr \
(sysctl -w fs.aio-max-nr=N).",
                sys::strerror(errno),
                show(nr_now),
                show(max)
            )
        }
        libc::EINVAL => format!(
            "io_setup({nr}) failed: {} [EINVAL]: max_requests is out of the kernel's range",
            sys::strerror(errno)
        ),
        libc::ENOSYS => format!(
            "io_setup({nr}) failed: {} [ENOSYS]: kernel AIO is not available (kernel built \
without CONFIG_AIO, or blocked by a seccomp filter)",
            sys::strerror(errno)
        ),
        _ => format!("io_setup({nr}) failed: {}", sys::strerror(errno)),
    };
    PyErr::ErrnoMsg(Exc::SystemError, errno, msg)
}

/// `io_setup`, waiting a little when the limit is only held by contexts
/// that are being destroyed in the background.
fn setup(nr: u32) -> PyResult<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match abi::io_setup(nr) {
            Ok(c) => return Ok(c),
            Err(libc::EINTR) => {
                if unsafe { PyErr_CheckSignals() } != 0 {
                    return Err(PyErr::Fetched);
                }
            }
            Err(libc::EAGAIN) if destroyer::pending() > 0 && Instant::now() < deadline => {
                allow_threads(|| std::thread::sleep(Duration::from_millis(1)));
            }
            Err(e) => return Err(setup_error(nr, e)),
        }
    }
}

unsafe extern "C" fn ctx_new(
    tp: *mut PyTypeObject,
    args: *mut PyObject,
    kwargs: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let a = NEW_PARAMS.parse_tuple::<1>(args, kwargs)?;
        let max_requests = match a.get(0) {
            Some(o) => int_in(o, "max_requests", 0, u32::MAX as i128)? as u32,
            None => 0,
        };
        let max_requests = if max_requests == 0 {
            DEFAULT_MAX_REQUESTS
        } else {
            max_requests
        };
        let queue = Arc::new(CompletionQueue::new_shared().map_err(|e| {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            PyErr::ErrnoMsg(
                Exc::SystemError,
                errno,
                format!("eventfd() failed: {}", sys::strerror(errno)),
            )
        })?);
        let aio = setup(max_requests)?;
        let user_ring = Ring::of(aio).is_some();
        let alloc = (*tp).tp_alloc.unwrap_or(PyType_GenericAlloc);
        let obj = match Owned::from_new(alloc(tp, 0)) {
            Ok(o) => o,
            Err(e) => {
                destroyer::destroy(aio);
                return Err(e);
            }
        };
        let c = obj.as_ptr() as *mut Context;
        let fd = queue.fileno();
        ptr::addr_of_mut!((*c).inner).write(AioContext {
            max_requests,
            fork_generation: sys::fork_generation(),
            aio_id: aio,
            fileno: AtomicI32::new(fd),
            closing: AtomicBool::new(false),
            handle: RwLock::new(Handle {
                aio,
                user_ring,
                queue: Some(queue),
            }),
            reap: Mutex::new(Reap {
                pool: None,
                pool_failed: false,
                backlog: VecDeque::new(),
                scratch: Vec::new(),
                events: Vec::new(),
            }),
            in_flight: AtomicUsize::new(0),
            nowait: AtomicBool::new(false),
            reads: Route::new(),
            writes: Route::new(),
            staged: Mutex::new(Vec::new()),
            flush_scheduled: AtomicBool::new(false),
        });
        Ok(obj)
    })
}

unsafe extern "C" fn ctx_dealloc(slf: *mut PyObject) {
    trampoline_void(|| {
        let c = ctx(slf);
        if !(*(slf as *mut Context)).weakreflist.is_null() {
            PyObject_ClearWeakRefs(slf);
        }
        // Every in-flight op holds a reference to its Context: nothing is in
        // flight here, so the kernel holds no pointer into our memory.
        let released = {
            let mut h = c.write();
            (h.queue.is_some() || h.aio != 0).then(|| c.release_locked(&mut h))
        };
        if let Some(r) = released {
            r.finish();
        }
        // A deferred batch whose flush never ran (its loop was closed).
        adapter::drop_staged(c);
        ptr::drop_in_place(ptr::addr_of_mut!((*(slf as *mut Context)).inner));
        let tp = Py_TYPE(slf);
        if let Some(free) = (*tp).tp_free {
            free(slf.cast());
        }
        Py_DECREF(tp.cast());
    })
}

// ---------------------------------------------------------------------------
// submission

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
                    let route = if o.kind == OpKind::Read {
                        &c.reads
                    } else {
                        &c.writes
                    };
                    if route.straight_to_workers() {
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
unsafe fn submit_ops(
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
unsafe fn submit_claimed(
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

unsafe fn check_types(slf: *mut PyObject, args: &[*mut PyObject]) -> PyResult<()> {
    let op_type = (*ModState::of(slf)).op_type;
    for (i, &a) in args.iter().enumerate() {
        if !op::is_op(a, op_type) {
            return Err(PyErr::type_error(format!(
                "Wrong type for argument {} -> {}: expected linux_aio.Operation",
                i,
                Borrowed::from_ptr(a).repr()
            )));
        }
    }
    Ok(())
}

unsafe extern "C" fn ctx_submit(
    slf: *mut PyObject,
    args: *mut *mut PyObject,
    nargsf: Py_ssize_t,
) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        let nargs = PyVectorcall_NARGS(nargsf as usize) as usize;
        let args = std::slice::from_raw_parts(args, nargs);
        check_types(slf, args)?;
        if args.is_empty() {
            return py_int(0);
        }
        let (n, failure) = submit_ops(slf, c, args, None)?;
        match failure {
            // Like io_submit: an error only when nothing was accepted.
            Some((_, e)) if n == 0 => Err(e),
            _ => py_int(n as i64),
        }
    })
}

/// Turns an error into an exception instance (for `_submit_each`).
unsafe fn exception_object(e: PyErr) -> PyResult<Owned> {
    e.restore();
    #[cfg(Py_3_12)]
    {
        Owned::from_new(PyErr_GetRaisedException())
    }
    #[cfg(not(Py_3_12))]
    {
        let mut t = ptr::null_mut();
        let mut v = ptr::null_mut();
        let mut tb = ptr::null_mut();
        PyErr_Fetch(&mut t, &mut v, &mut tb);
        PyErr_NormalizeException(&mut t, &mut v, &mut tb);
        if !tb.is_null() {
            if !v.is_null() {
                PyException_SetTraceback(v, tb);
            }
            Py_DECREF(tb);
        }
        if !t.is_null() {
            Py_DECREF(t);
        }
        Owned::from_new(v)
    }
}

/// `_submit_each(*ops) -> list`: submits as many ops as possible, one
/// outcome per argument: `True` accepted, `False` not accepted because the op
/// was already submitted (or listed twice), or the exception that refused
/// it. A refused op does not hold back the ones after it (they are
/// resubmitted). What the asyncio adapter's `deferred=True` flush does
/// natively (`adapter::flush`), for event-loop integrations in Python.
unsafe extern "C" fn ctx_submit_each(
    slf: *mut PyObject,
    args: *mut *mut PyObject,
    nargsf: Py_ssize_t,
) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        let nargs = PyVectorcall_NARGS(nargsf as usize) as usize;
        let args = std::slice::from_raw_parts(args, nargs);
        check_types(slf, args)?;
        let mut outcome: Vec<Option<Owned>> = (0..nargs).map(|_| None).collect();
        let mut accepted = Vec::new();
        let mut start = 0;
        while start < nargs {
            accepted.clear();
            let (_, failure) = submit_ops(slf, c, &args[start..], Some(&mut accepted))?;
            for &i in &accepted {
                outcome[start + i] = Some(Owned::from_borrowed(Py_True()));
            }
            match failure {
                Some((i, e)) => {
                    outcome[start + i] = Some(exception_object(e)?);
                    start += i + 1;
                }
                None => break,
            }
        }
        let list = Owned::from_new(PyList_New(nargs as Py_ssize_t))?;
        for (i, o) in outcome.into_iter().enumerate() {
            let item = o.unwrap_or_else(|| Owned::from_borrowed(Py_False()));
            PyList_SET_ITEM(list.as_ptr(), i as Py_ssize_t, item.into_ptr());
        }
        Ok(list)
    })
}

// ---------------------------------------------------------------------------
// completion

/// Final result of an op that had `done` bytes moved before `r` was added.
fn combine(done: u64, r: i64) -> i64 {
    if r >= 0 {
        done as i64 + r
    } else if done > 0 {
        // POSIX partial transfer: report what did happen.
        done as i64
    } else {
        r
    }
}

/// Whether a non-blocking read that moved `n` bytes stopped at end of file
/// (then it is final) rather than at a page that is not cached.
unsafe fn at_eof(o: &Operation, n: u64) -> bool {
    let mut st: libc::stat = std::mem::zeroed();
    if libc::fstat(o.fd_i32(), &mut st) != 0 || (st.st_mode & libc::S_IFMT) != libc::S_IFREG {
        return false;
    }
    o.io().offset.saturating_add(n) >= st.st_size as u64
}

impl AioContext {
    /// Hands an op to the worker pool (created on first use).
    unsafe fn to_pool(
        &self,
        reap: &mut Reap,
        queue: &Arc<CompletionQueue>,
        op: *mut Operation,
    ) -> bool {
        if reap.pool.is_none() && !reap.pool_failed {
            match Pool::new(POOL_SIZE, usize::MAX) {
                Ok(p) => {
                    if p.install_completion_queue(queue.clone()).is_ok()
                        && p.enable_queued_delivery().is_ok()
                    {
                        reap.pool = Some(Arc::new(p));
                    } else {
                        p.shutdown(false);
                        reap.pool_failed = true;
                    }
                }
                Err(_) => reap.pool_failed = true,
            }
        }
        match &reap.pool {
            Some(p) => p.submit(Job(op)).is_ok(),
            None => false,
        }
    }

    /// One kernel completion. Returns whether it was delivered (`false`: it
    /// went to the worker pool and will come back through the queue).
    unsafe fn on_event(
        &self,
        reap: &mut Reap,
        queue: &Arc<CompletionQueue>,
        ev: &IoEvent,
        out: &mut Vec<Delivery>,
    ) -> bool {
        let op = (ev.data & !TAG_BUFFERED) as *mut Operation;
        let o = &*op;
        let cb = &mut *(o.engine_area() as *mut Iocb);
        let mut res = ev.res;
        if cb.rw_flags & RWF_NOWAIT != 0 {
            cb.rw_flags &= !RWF_NOWAIT;
            // EAGAIN: data not cached / would block. EOPNOTSUPP: no
            // non-blocking buffered writes on this filesystem (ext4).
            // EINVAL: kernels before 5.x reject NOWAIT buffered writes that
            // way; a worker re-runs the op, so a genuine EINVAL still comes
            // back from pread/pwrite.
            let refused = res == -(libc::EAGAIN as i64)
                || res == -(libc::EOPNOTSUPP as i64)
                || res == -(libc::EINVAL as i64);
            // A short non-blocking read stopped at an uncached page unless it
            // reached the end of the file.
            let partial = res > 0
                && (res as u64) < cb.nbytes
                && !(o.kind == OpKind::Read && at_eof(o, res as u64));
            if ev.data & TAG_BUFFERED != 0 {
                let route = if o.kind == OpKind::Read {
                    &self.reads
                } else {
                    &self.writes
                };
                route.record(refused || partial);
            }
            if refused || partial {
                let done = if partial { res as u64 } else { 0 };
                cb.reserved2 = done;
                if done > 0 {
                    o.io_advance(done as usize);
                }
                if self.to_pool(reap, queue, op) {
                    return false;
                }
                // No worker thread could be started: do it here.
                res = combine(done, pool::execute(o));
            }
        }
        out.push(op::finish(op, res));
        true
    }

    /// Collects up to `max` deliveries (worker results first, then the
    /// kernel ring). Caller holds the handle (shared) and the reap lock.
    unsafe fn collect(&self, h: &Handle, reap: &mut Reap, max: usize, out: &mut Vec<Delivery>) {
        let Some(queue) = h.queue.as_ref() else {
            return;
        };
        if reap.backlog.is_empty() && reap.pool.is_some() {
            let mut v = std::mem::take(&mut reap.scratch);
            queue.take(&mut v);
            reap.backlog.extend(v.drain(..));
            reap.scratch = v;
        }
        while out.len() < max {
            let Some((job, r)) = reap.backlog.pop_front() else {
                break;
            };
            let o = &*job.0;
            let done = (*(o.engine_area() as *const Iocb)).reserved2;
            out.push(op::finish(job.0, combine(done, r)));
        }
        if out.len() >= max || h.aio == 0 {
            return;
        }
        if h.user_ring {
            if let Some(ring) = Ring::of(h.aio) {
                let want = max - out.len();
                ring.consume(want, |ev| self.on_event(reap, queue, ev, out));
                return;
            }
        }
        // Unknown ring layout: ask the kernel.
        loop {
            let want = (max - out.len()).min(1024);
            if want == 0 {
                break;
            }
            let mut events = std::mem::take(&mut reap.events);
            events.resize(want, IoEvent::default());
            let got = abi::io_getevents_nowait(h.aio, &mut events).unwrap_or(0);
            for ev in &events[..got] {
                self.on_event(reap, queue, ev, out);
            }
            reap.events = events;
            if got < want {
                break;
            }
        }
    }

    /// Delivers up to `max` completions: records them under the locks, then
    /// (locks released) runs callbacks / resolves futures.
    unsafe fn deliver(&self, max: usize) -> usize {
        let mut out = Vec::new();
        {
            let h = self.read();
            if h.queue.is_none() {
                return 0;
            }
            let mut reap = self.lock_reap();
            self.collect(&h, &mut reap, max, &mut out);
        }
        let n = out.len();
        if n > 0 {
            self.in_flight.fetch_sub(n, Ordering::AcqRel);
            self.release_if_idle();
            for d in out {
                d.run();
            }
        }
        n
    }
}

static PE_PARAMS: Params = Params {
    fname: "process_events",
    names: &["max_requests", "min_requests", "timeout"],
    required: 0,
    keywords: true,
};

enum Wait {
    Ready,
    Timeout,
    Interrupted,
    Failed(i32),
}

fn wait_readable(fd: i32, timeout_ms: c_int) -> Wait {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    match unsafe { libc::poll(&mut p, 1, timeout_ms) } {
        0 => Wait::Timeout,
        r if r > 0 => Wait::Ready,
        _ => match sys::last_errno() {
            libc::EINTR => Wait::Interrupted,
            e => Wait::Failed(e),
        },
    }
}

unsafe extern "C" fn ctx_process_events(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        let a = PE_PARAMS.parse::<3>(args, nargs, kw)?;
        let max = match a.get(0) {
            Some(o) => int_in(o, "max_requests", 0, u32::MAX as i128)? as usize,
            None => 0,
        };
        let max = if max == 0 { DEFAULT_EVENTS } else { max };
        if max > MAX_EVENTS {
            return Err(PyErr::overflow(format!(
                "max_requests ({}) exceeds the maximum allowed ({})",
                max, MAX_EVENTS
            )));
        }
        let min = match a.get(1) {
            Some(o) => int_in(o, "min_requests", 0, u32::MAX as i128)? as usize,
            None => 0,
        };
        if min > max {
            return Err(PyErr::value_error(format!(
                "min_requests ({}) must not exceed max_requests ({})",
                min, max
            )));
        }
        let timeout = match a.get(2) {
            Some(o) => int_in(o, "timeout", i32::MIN as i128, i32::MAX as i128)? as i32,
            None => 0,
        };
        c.check_fork()?;
        let deadline = (timeout > 0).then(|| Instant::now() + Duration::from_secs(timeout as u64));
        let mut n = 0usize;
        loop {
            n += c.deliver(max - n);
            if n >= min || timeout == 0 {
                break;
            }
            let Some(q) = c.queue() else {
                break; // closed meanwhile
            };
            let wait_ms: c_int = match deadline {
                None => -1,
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    let left = d - now;
                    (left.as_millis() + u128::from(left.subsec_nanos() % 1_000_000 != 0))
                        .min(c_int::MAX as u128) as c_int
                }
            };
            match allow_threads(|| wait_readable(q.fileno(), wait_ms)) {
                Wait::Ready => {
                    let got = c.deliver(max - n);
                    n += got;
                    if got == 0 {
                        // A notification for completions already delivered
                        // (by an earlier call or another thread): consume it,
                        // or poll() would keep reporting the fd readable. The
                        // loop drains once more, so a completion signalled
                        // just now is not missed.
                        let _ = read_counter(q.fileno());
                    }
                }
                Wait::Timeout => {}
                Wait::Interrupted => {
                    // API.md §7 Q11: run signal handlers; an exception from
                    // one propagates, otherwise keep waiting.
                    if PyErr_CheckSignals() != 0 {
                        return Err(PyErr::Fetched);
                    }
                }
                Wait::Failed(e) => return Err(PyErr::os(e)),
            }
        }
        py_int(n as i64)
    })
}

/// `_drain()`: what the asyncio adapter's reader callback does (natively,
/// `adapter::loop_events`) — reset the eventfd counter, then deliver
/// everything available.
unsafe extern "C" fn ctx_drain(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        c.check_fork()?;
        py_int(c.drain() as i64)
    })
}

impl AioContext {
    /// Resets the eventfd counter, then delivers every available completion.
    unsafe fn drain(&self) -> usize {
        {
            let h = self.read();
            if let Some(q) = h.queue.as_ref() {
                let _ = read_counter(q.fileno());
            }
        }
        let mut total = 0usize;
        loop {
            let n = self.deliver(DEFAULT_EVENTS);
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    }
}

/// `_reap()`: deliver what is available now without touching the eventfd
/// (what the asyncio adapter does natively right after a submission:
/// page-cache hits completed inside io_submit are delivered at once).
unsafe extern "C" fn ctx_reap(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        c.check_fork()?;
        py_int(c.deliver(DEFAULT_EVENTS) as i64)
    })
}

unsafe extern "C" fn ctx_poll(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        c.check_fork()?;
        let h = c.read();
        let Some(q) = h.queue.as_ref() else {
            return Err(closed_error());
        };
        match read_counter(q.fileno()) {
            Ok(0) => {
                PyErr_SetNone(PyExc_BlockingIOError);
                Err(PyErr::Fetched)
            }
            Ok(v) => py_uint(v),
            Err(e) => Err(PyErr::os(e)),
        }
    })
}

static CANCEL_PARAMS: Params = Params {
    fname: "cancel",
    names: &["operation"],
    required: 1,
    keywords: true,
};

unsafe extern "C" fn ctx_cancel(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        let a = CANCEL_PARAMS.parse::<1>(args, nargs, kw)?;
        let obj = a.get(0).unwrap();
        let op_type = (*ModState::of(slf)).op_type;
        if !op::is_op(obj.as_ptr(), op_type) {
            return Err(PyErr::type_error(format!(
                "cancel() argument must be linux_aio.Operation, not {}",
                obj.type_name()
            )));
        }
        c.check_fork()?;
        let h = c.read();
        if h.aio == 0 {
            // Released only once nothing was in flight: the op cannot be.
            return Err(PyErr::value_error(
                "The operation is not in flight on this Context: it is closed [EINVAL]",
            ));
        }
        // The kernel only compares the pointer with the requests of this
        // context, so any op (never submitted, done, another Context's) is
        // safe to pass: it is simply not found (EINVAL).
        let cb = as_op(obj.as_ptr()).engine_area() as *mut Iocb;
        match abi::io_cancel(h.aio, cb) {
            // Current kernels report a started cancellation as EINPROGRESS;
            // the op then completes (-ECANCELED) through process_events().
            Ok(()) => py_int(0),
            Err(libc::EINPROGRESS) => py_int(0),
            Err(libc::EAGAIN) => Err(PyErr::ErrnoMsg(
                Exc::SystemError,
                libc::EAGAIN,
                "Specified operation was not canceled [EAGAIN]".to_owned(),
            )),
            Err(libc::EFAULT) => Err(PyErr::runtime(
                "One of the data structures points to invalid data [EFAULT]",
            )),
            Err(libc::EINVAL) => Err(PyErr::value_error(
                "The operation cannot be canceled [EINVAL]: it is not in flight in the kernel \
on this Context (never submitted, already completed, handled by a worker thread or submitted \
to another Context), or it is regular-file I/O, which the kernel cannot cancel",
            )),
            Err(libc::ENOSYS) => Err(PyErr::new(
                Exc::NotImplementedError,
                "io_cancel is not implemented by this kernel [ENOSYS]",
            )),
            Err(e) => Err(PyErr::ErrnoMsg(
                Exc::SystemError,
                e,
                format!("io_cancel failed: {}", sys::strerror(e)),
            )),
        }
    })
}

/// `_set_nowait(flag)`: event-loop mode on/off (see the module docs).
unsafe extern "C" fn ctx_set_nowait(slf: *mut PyObject, flag: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let on = caio_core::args::truthy(Borrowed::from_ptr(flag))?;
        ctx(slf).nowait.store(on, Ordering::Relaxed);
        Ok(none())
    })
}

unsafe extern "C" fn ctx_close(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        c.closing.store(true, Ordering::Release);
        c.release_if_idle();
        Ok(none())
    })
}

unsafe extern "C" fn ctx_repr(slf: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let c = ctx(slf);
        let aio = c.read().aio;
        py_str(&format!(
            "<Context as {:#x}: max_requests={}, ctx={}{}>",
            slf as usize,
            c.max_requests,
            c.aio_id,
            if aio == 0 { ", closed" } else { "" }
        ))
    })
}

unsafe extern "C" fn get_max_requests(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_int(ctx(slf).max_requests as i64))
}

unsafe extern "C" fn get_fileno(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_int(ctx(slf).fileno.load(Ordering::Relaxed) as i64))
}

unsafe extern "C" fn get_closed(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| {
        Ok(Owned::from_borrowed(
            if ctx(slf).closing.load(Ordering::Acquire) {
                Py_True()
            } else {
                Py_False()
            },
        ))
    })
}

unsafe extern "C" fn get_in_flight(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_int(ctx(slf).in_flight.load(Ordering::Acquire) as i64))
}

unsafe extern "C" fn get_staged(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_int(ctx(slf).lock_staged().len() as i64))
}

static mut CTX_METHODS: [PyMethodDef; 10] = [
    PyMethodDef {
        ml_name: c"submit".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunctionFast: ctx_submit,
        },
        ml_flags: METH_FASTCALL,
        ml_doc: c"submit(*operations) -> int\n--\n\nSubmit operations in one io_submit call; returns how \
many were accepted (a prefix: the rest are untouched and can be resubmitted). Raises if the first \
one is refused."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"cancel".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunctionFastWithKeywords: ctx_cancel,
        },
        ml_flags: METH_FASTCALL | METH_KEYWORDS,
        ml_doc: c"cancel(operation) -> int\n--\n\nio_cancel(): returns 0 when the kernel started the \
cancellation (the op then completes through process_events()); raises ValueError when it cannot \
(regular-file I/O never can)."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"process_events".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunctionFastWithKeywords: ctx_process_events,
        },
        ml_flags: METH_FASTCALL | METH_KEYWORDS,
        ml_doc: c"process_events(max_requests=512, min_requests=0, timeout=0) -> int\n--\n\nDeliver up \
to max_requests completions (callbacks run here). With min_requests > 0 and timeout != 0, first \
wait (GIL released) until min_requests are available or timeout seconds pass (timeout < 0: no \
limit). Returns the number delivered."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"poll".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunction: ctx_poll,
        },
        ml_flags: METH_NOARGS,
        ml_doc: c"poll() -> int\n--\n\nRead and reset the eventfd counter (completion notifications \
since the last read); BlockingIOError if there were none. Never blocks, delivers nothing."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"close".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunction: ctx_close,
        },
        ml_flags: METH_NOARGS,
        ml_doc: c"close()\n--\n\nStop accepting operations and release the kernel AIO context (its \
share of fs.aio-nr), the eventfd and the worker threads: now if nothing is in flight, otherwise \
as soon as process_events() has delivered the last completion. Idempotent. (Not in upstream caio.)"
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"_drain".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunction: ctx_drain,
        },
        ml_flags: METH_NOARGS,
        ml_doc: c"_drain() -> int\n--\n\nReset the eventfd counter and deliver every available \
completion (what the asyncio adapter's reader callback does)."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"_reap".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunction: ctx_reap,
        },
        ml_flags: METH_NOARGS,
        ml_doc: c"_reap() -> int\n--\n\nDeliver the completions available now (up to 512) without \
reading the eventfd (what the asyncio adapter does right after submitting)."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"_submit_each".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunctionFast: ctx_submit_each,
        },
        ml_flags: METH_FASTCALL,
        ml_doc: c"_submit_each(*operations) -> list\n--\n\nSubmit as many operations as possible; one \
outcome per argument: True (accepted), False (already submitted) or the exception that refused \
it (what the asyncio adapter's deferred=True flush does)."
            .as_ptr(),
    },
    PyMethodDef {
        ml_name: c"_set_nowait".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunction: ctx_set_nowait,
        },
        ml_flags: METH_O,
        ml_doc: c"_set_nowait(flag)\n--\n\nEvent-loop mode: submit buffered reads/writes with \
RWF_NOWAIT so io_submit never waits for the disk; operations the kernel refuses (or only partly \
does) are finished by worker threads, and still delivered by process_events() on this thread. \
Off by default (upstream semantics: buffered I/O completes inside submit()). The asyncio adapter \
turns it on."
            .as_ptr(),
    },
    PyMethodDef::zeroed(),
];

static mut CTX_GETSET: [PyGetSetDef; 6] = [
    PyGetSetDef {
        name: c"max_requests".as_ptr(),
        get: Some(get_max_requests),
        set: None,
        doc: c"the size requested from io_setup".as_ptr(),
        closure: ptr::null_mut(),
    },
    PyGetSetDef {
        name: c"fileno".as_ptr(),
        get: Some(get_fileno),
        set: None,
        doc: c"the eventfd signalled on completions (-1 once closed)".as_ptr(),
        closure: ptr::null_mut(),
    },
    PyGetSetDef {
        name: c"closed".as_ptr(),
        get: Some(get_closed),
        set: None,
        doc: c"close() was called".as_ptr(),
        closure: ptr::null_mut(),
    },
    PyGetSetDef {
        name: c"_in_flight".as_ptr(),
        get: Some(get_in_flight),
        set: None,
        doc: c"operations accepted and not yet delivered".as_ptr(),
        closure: ptr::null_mut(),
    },
    PyGetSetDef {
        name: c"_staged".as_ptr(),
        get: Some(get_staged),
        set: None,
        doc: c"operations waiting in the asyncio adapter's deferred batch".as_ptr(),
        closure: ptr::null_mut(),
    },
    PyGetSetDef {
        name: ptr::null(),
        get: None,
        set: None,
        doc: ptr::null(),
        closure: ptr::null_mut(),
    },
];

/// The Context type's docstring (text signature first).
const CTX_DOC: &std::ffi::CStr =
    c"Context(max_requests=32)\n--\n\n linux aio context representation \n\nA kernel AIO \
context (io_setup) plus an eventfd (fileno) signalled on completions.\n\nDifferences from upstream \
caio: callbacks receive the signed kernel result (bytes moved, or -errno); close() releases the \
kernel context deterministically; O_DIRECT works (reads at any offset/length through aligned \
memory; writes need offset and length aligned to the file's O_DIRECT alignment, else OSError \
EINVAL); out-of-range integer arguments raise OverflowError instead of wrapping.";

// ---------------------------------------------------------------------------
// module

fn kernel_release() -> String {
    if let Ok(r) = std::env::var("CAIO_TEST_AIO_KERNEL_RELEASE") {
        if !r.is_empty() {
            return r; // test hook: pretend to run on this kernel
        }
    }
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return String::new();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|ch: char| !ch.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Import-time checks: everything that makes kernel AIO unusable becomes an
/// `ImportError` (caio then falls back to the next backend, and
/// `python -m caio` shows the reason).
fn check_available() -> PyResult<()> {
    let release = kernel_release();
    match parse_version(&release) {
        Some(v) if v >= (4, 18) => {}
        _ => {
            return Err(PyErr::new(
                Exc::ImportError,
                format!(
                    "Linux kernel supported since 4.18 but current kernel is {}. (linux_aio \
needs AIO fsync/fdsync and RWF_NOWAIT.)",
                    release
                ),
            ))
        }
    }
    let forced = std::env::var("CAIO_TEST_AIO_PROBE_ERRNO")
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|&e| e > 0);
    let probe = match forced {
        Some(e) => Err(e), // test hook: pretend io_setup failed this way
        None => abi::io_setup(1),
    };
    let errno = match probe {
        Ok(c) => {
            destroyer::destroy(c);
            return Ok(());
        }
        Err(e) => e,
    };
    let reason = match errno {
        libc::ENOSYS => format!(
            "kernel AIO is unavailable: io_setup() failed with ENOSYS ({}). Either the kernel \
was built without CONFIG_AIO, or a seccomp filter blocks the AIO system calls, as container \
runtimes may do (Docker/Podman: --security-opt seccomp=unconfined or a profile allowing \
io_setup, io_submit, io_getevents, io_cancel, io_destroy; Kubernetes: \
securityContext.seccompProfile.type=Unconfined). Kernel {}.",
            sys::strerror(errno),
            release
        ),
        libc::EAGAIN => {
            let (nr, max) = abi::aio_counters();
            let show = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
            format!(
                "kernel AIO is unavailable: io_setup() failed with EAGAIN ({}): the \
system-wide AIO limit is exhausted (/proc/sys/fs/aio-nr = {} of /proc/sys/fs/aio-max-nr = {}). \
Other processes hold AIO contexts; raise fs.aio-max-nr (sysctl -w fs.aio-max-nr=N).",
                sys::strerror(errno),
                show(nr),
                show(max)
            )
        }
        libc::EPERM | libc::EACCES => format!(
            "kernel AIO is unavailable: io_setup() failed with {} ({}), probably a security \
policy (seccomp, LSM) forbidding it. Kernel {}.",
            if errno == libc::EPERM {
                "EPERM"
            } else {
                "EACCES"
            },
            sys::strerror(errno),
            release
        ),
        _ => format!(
            "kernel AIO is unavailable: io_setup() probe failed with errno {} ({}). Kernel {}.",
            errno,
            sys::strerror(errno),
            release
        ),
    };
    Err(PyErr::new(Exc::ImportError, reason))
}

unsafe fn exec(module: *mut PyObject) -> PyResult<()> {
    check_available()?;
    init_common(
        module,
        &FLAVOR,
        ContextType {
            doc: CTX_DOC,
            basicsize: std::mem::size_of::<Context>(),
            weaklistoffset: std::mem::offset_of!(Context, weakreflist),
            new: ctx_new,
            dealloc: ctx_dealloc,
            repr: ctx_repr,
            methods: ptr::addr_of_mut!(CTX_METHODS).cast(),
            getset: ptr::addr_of_mut!(CTX_GETSET).cast(),
        },
        c"caio.linux_aio.OperationError",
    )?;
    let bases = caio_core::py::py_tuple(vec![
        Owned::from_borrowed(PyExc_OSError),
        Owned::from_borrowed(PyExc_ValueError),
    ])?;
    let submit_error = Owned::from_new(PyErr_NewExceptionWithDoc(
        c"caio.linux_aio.SubmitError".as_ptr(),
        c"io_submit refused an operation (bad fd, invalid for the file, ...). A ValueError, as \
upstream caio raises, and an OSError with the errno."
            .as_ptr(),
        bases.as_ptr(),
        ptr::null_mut(),
    ))?;
    caio_core::module::add_object(module, c"SubmitError", submit_error)?;
    caio_core::module::init_capacity_error(
        module,
        c"caio.linux_aio.CapacityError",
        PyExc_OverflowError,
        c"submit() accepted nothing because the kernel completion ring is full (io_submit \
EAGAIN). An OverflowError, as upstream caio raises, and an OSError with errno EAGAIN.",
    )?;
    caio_core::aio::init(module, &adapter::ENGINE)?;
    Ok(())
}

backend_module!(
    PyInit_linux_aio,
    c"linux_aio",
    c"Linux AIO c API bindings.",
    exec
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_version("4.18.0-553.el8.x86_64"), Some((4, 18)));
        assert_eq!(parse_version("4.9"), Some((4, 9)));
        assert!(parse_version("4.9").unwrap() < (4, 18));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn route_switches_with_hysteresis() {
        let r = Route::new();
        assert!(!r.straight_to_workers());
        for _ in 0..10 {
            r.record(true);
        }
        assert!(!r.cold.load(Ordering::Relaxed)); // not yet convinced
        for _ in 0..30 {
            r.record(true);
        }
        assert!(r.cold.load(Ordering::Relaxed));
        // Straight to the workers, with one kernel probe per interval.
        let direct = (0..64).filter(|_| r.straight_to_workers()).count();
        assert_eq!(direct, 63);
        std::thread::sleep(PROBE_INTERVAL);
        assert!(!r.straight_to_workers());
        assert!(r.straight_to_workers());
        // A few hits do not flip it back; a run of them does.
        for _ in 0..5 {
            r.record(false);
        }
        assert!(r.cold.load(Ordering::Relaxed));
        for _ in 0..40 {
            r.record(false);
        }
        assert!(!r.cold.load(Ordering::Relaxed));
        assert!(!r.straight_to_workers());
    }

    #[test]
    fn combine_results() {
        assert_eq!(combine(0, 4096), 4096);
        assert_eq!(combine(100, 3996), 4096);
        assert_eq!(combine(100, -5), 100);
        assert_eq!(combine(0, -11), -11);
        assert_eq!(combine(100, 0), 100);
    }
}
