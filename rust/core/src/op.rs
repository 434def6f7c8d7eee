//! The `Operation` object shared by every native backend.
//!
//! An operation is one-shot: `NEW` → (claimed by `submit`) → `IN_FLIGHT` →
//! (completion handed to Python) → `DONE`. The claim is a compare-and-swap, so
//! two threads or two Contexts can never both dispatch one op; a claim the
//! backend did not accept is rolled back to `NEW`.
//!
//! Memory ownership while in flight:
//! * the op holds a strong reference to itself on behalf of the engine
//!   (taken by [`begin`], released by [`Delivery::run`] or [`abort`]);
//! * a read owns the `bytes` object the kernel/worker fills in place (it is
//!   never exposed before `DONE`, so handing it out afterwards is sound);
//! * a write holds a buffer-protocol export of its payload until completion;
//! * the op holds a strong reference to its Context until delivery.
//!
//! Free-threading: `state` is published with release/acquire; the three
//! object slots that change after construction (callback, context, write
//! payload) sit behind a tiny per-op spin lock that is never held while
//! calling into Python or decref'ing.

use std::cell::UnsafeCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};

use pyo3_ffi::*;

use crate::args::{fd_arg, int_in, Params};
use crate::module::ModState;
use crate::py::{
    call1, none, py_bool, py_int, py_uint, trampoline, trampoline_int, trampoline_void,
    write_unraisable, Borrowed, Exc, Owned, PyErr, PyResult,
};

pub const NEW: u8 = 0;
pub const IN_FLIGHT: u8 = 1;
pub const DONE: u8 = 2;

#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OpKind {
    Read = 0,
    Write = 1,
    Fsync = 2,
    Fdsync = 3,
}

impl OpKind {
    pub fn mode(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Fsync => "fsync",
            OpKind::Fdsync => "fdsync",
        }
    }
}

/// How a `read` op's `payload` is exposed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ReadPayload {
    /// The `bytes` object itself (linux_uring).
    Bytes,
    /// A read-only `memoryview` over it (linux_aio, thread_aio). The view keeps
    /// the bytes alive, so it can never outlive its memory (API.md §7 Q5).
    MemoryView,
}

/// Per-backend differences of the Operation type (API.md §1.6, §2).
pub struct Flavor {
    /// `tp_name`, e.g. `"aio.AIOOperation"`.
    pub type_name: &'static CStr,
    pub doc: &'static CStr,
    pub read_payload: ReadPayload,
    /// thread_aio drops a write's payload once it completed (`payload` → None).
    pub drop_write_payload: bool,
    /// linux_aio: `nbytes` of a successful write becomes the kernel result.
    pub nbytes_tracks_write: bool,
    /// Largest accepted read size and the message when exceeded.
    pub max_read: u64,
    pub max_read_msg: &'static str,
    /// Accepted offset range (values outside raise OverflowError).
    pub offset_min: i128,
    pub offset_max: i128,
    pub priority_min: i128,
    pub priority_max: i128,
    pub payload_type_msg: &'static str,
    /// thread_aio reports failures as `-1` in `result`/callback (errno in
    /// `error`); the kernel backends pass `-errno`.
    pub failure_as_minus_one: bool,
    /// `set_callback(callback=...)` allowed (linux_uring: positional only).
    pub callback_keyword: bool,
    /// Which optional attributes exist.
    pub has_result_error: bool,
    pub has_context: bool,
    pub has_priority: bool,
    /// `repr` prints the offset signed (linux_aio) and/or the result.
    pub repr_offset_signed: bool,
    pub repr_result: bool,
}

/// A minimal spin lock for the op's mutable object slots. Critical sections
/// are a few instructions (pointer swap / incref), never Python calls.
#[repr(transparent)]
pub struct SpinLock(AtomicBool);

pub struct SpinGuard<'a>(&'a SpinLock);

impl SpinLock {
    #[inline]
    pub fn lock(&self) -> SpinGuard<'_> {
        let mut spins = 0u32;
        while self
            .0
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        SpinGuard(self)
    }
}

impl Drop for SpinGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0 .0.store(false, Ordering::Release);
    }
}

/// Where the engine moves data: normally the user's buffer, but an O_DIRECT
/// read may go through an aligned window that is copied out on completion.
#[repr(C)]
pub struct IoTarget {
    pub ptr: *mut u8,
    pub len: usize,
    pub offset: u64,
    /// Aligned bounce allocation (null when unused) and its layout size/align.
    bounce: *mut u8,
    bounce_size: usize,
    bounce_align: usize,
    /// Bytes of the window before the user's requested offset.
    skip: usize,
}

#[repr(C)]
pub struct Operation {
    ob_base: PyObject,
    weakreflist: *mut PyObject,
    flavor: *const Flavor,
    state: AtomicU8,
    pub kind: OpKind,
    pub priority: u16,
    pub fd: u32,
    /// Raw 64 bits of the requested offset (u64 view of a signed value).
    pub offset: u64,
    /// Requested byte count (read size or payload length).
    pub nbytes: u64,
    /// Raw result: bytes moved (≥ 0) or `-errno`. Valid once `DONE`.
    result: AtomicI64,
    /// Read: the `bytes` object filled in place (owned, immutable slot).
    read_buf: *mut PyObject,
    /// Write: the payload export (guarded by `lock`; released on completion
    /// for `drop_write_payload` flavors).
    view: UnsafeCell<Py_buffer>,
    lock: SpinLock,
    /// The callback, or (tagged with [`FUTURE_TAG`]) an asyncio future to
    /// resolve on delivery.
    callback: UnsafeCell<*mut PyObject>,
    context: UnsafeCell<*mut PyObject>,
    /// Owned by the engine between claim and completion.
    io: UnsafeCell<IoTarget>,
    /// Scratch space for an engine (e.g. a kernel AIO control block).
    engine: UnsafeCell<[u64; 8]>,
}

#[inline]
pub unsafe fn as_op<'a>(p: *mut PyObject) -> &'a Operation {
    &*(p as *const Operation)
}

impl Operation {
    #[inline]
    pub fn as_ptr(&self) -> *mut PyObject {
        self as *const Operation as *mut PyObject
    }

    #[inline]
    fn flavor(&self) -> &'static Flavor {
        unsafe { &*self.flavor }
    }

    #[inline]
    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Claims the op for dispatch (`NEW` → `IN_FLIGHT`); false if it was
    /// already claimed or done.
    #[inline]
    pub fn try_claim(&self) -> bool {
        self.state
            .compare_exchange(NEW, IN_FLIGHT, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Gives back a claim that was never followed by [`begin`] (the engine
    /// kept the op aside and dropped it before dispatch): `NEW` again.
    #[inline]
    pub fn unclaim(&self) {
        let _ = self
            .state
            .compare_exchange(IN_FLIGHT, NEW, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Raw result (bytes or `-errno`); 0 until `DONE`.
    #[inline]
    pub fn raw_result(&self) -> i64 {
        if self.state() == DONE {
            self.result.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    #[inline]
    pub fn fd_i32(&self) -> i32 {
        self.fd as i32
    }

    /// Signed view of the offset (for pread/pwrite and linux_aio).
    #[inline]
    pub fn offset_i64(&self) -> i64 {
        self.offset as i64
    }

    /// Data pointer of the write payload (valid while in flight).
    #[inline]
    pub fn payload_ptr(&self) -> *const u8 {
        unsafe { (*self.view.get()).buf as *const u8 }
    }

    /// The I/O window the engine must use.
    ///
    /// # Safety
    /// Only the engine owning the in-flight op may call this.
    #[inline]
    pub unsafe fn io(&self) -> &IoTarget {
        &*self.io.get()
    }

    /// Engine scratch space.
    ///
    /// # Safety
    /// Only the engine owning the in-flight op may use it.
    #[inline]
    pub unsafe fn engine_area(&self) -> *mut [u64; 8] {
        self.engine.get()
    }

    /// Moves a read's I/O into an aligned window `[offset rounded down,
    /// offset + nbytes rounded up)` of `align`-aligned memory (O_DIRECT).
    /// The requested bytes are copied into the result `bytes` on completion.
    /// For writes, copies the payload into aligned memory; the caller must
    /// have checked that offset and length are already multiples of `align`.
    /// Call only between claim and dispatch.
    pub unsafe fn use_aligned_window(&self, align: usize) -> PyResult<()> {
        debug_assert!(align.is_power_of_two());
        let a = align as u64;
        let (start, end) = match self.kind {
            OpKind::Read => {
                let start = self.offset & !(a - 1);
                let end = self
                    .offset
                    .checked_add(self.nbytes)
                    .and_then(|e| e.checked_add(a - 1))
                    .map(|e| e & !(a - 1))
                    .ok_or_else(|| PyErr::overflow("offset + nbytes overflows"))?;
                (start, end)
            }
            _ => (self.offset, self.offset + self.nbytes),
        };
        let (p, size, align) = bounce::alloc(((end - start) as usize).max(align), align)?;
        if self.kind == OpKind::Write && self.nbytes > 0 {
            ptr::copy_nonoverlapping(self.payload_ptr(), p, self.nbytes as usize);
        }
        let io = &mut *self.io.get();
        io.bounce = p;
        io.bounce_size = size;
        io.bounce_align = align;
        io.skip = (self.offset - start) as usize;
        io.ptr = p;
        io.len = (end - start) as usize;
        io.offset = start;
        Ok(())
    }

    /// Whether the I/O window is still the op's own buffer, untouched: no
    /// aligned window yet and not advanced by a partial transfer.
    pub fn io_is_pristine(&self) -> bool {
        let io = unsafe { &*self.io.get() };
        io.bounce.is_null() && io.offset == self.offset && io.len as u64 == self.nbytes
    }

    /// Moves the I/O window past its first `n` bytes, which the engine has
    /// already transferred (e.g. a partial non-blocking read whose remainder
    /// goes to a worker thread). [`finish`] must then be given the total
    /// count for the whole window. Call only while the op is in flight and
    /// owned by the calling engine; `n` must not exceed the window's length.
    pub unsafe fn io_advance(&self, n: usize) {
        let io = &mut *self.io.get();
        debug_assert!(n <= io.len);
        let n = n.min(io.len);
        io.ptr = io.ptr.add(n);
        io.len -= n;
        io.offset = io.offset.wrapping_add(n as u64);
    }

    unsafe fn free_bounce(&self) {
        let io = &mut *self.io.get();
        if !io.bounce.is_null() {
            bounce::free(io.bounce, io.bounce_size, io.bounce_align);
            io.bounce = ptr::null_mut();
        }
    }

    fn read_data(&self) -> *mut u8 {
        unsafe { PyBytes_AS_STRING(self.read_buf) as *mut u8 }
    }

    fn errno(&self) -> i32 {
        let r = self.raw_result();
        if r < 0 {
            (-r) as i32
        } else {
            0
        }
    }

    /// Value reported to callbacks and the `result` attribute.
    fn reported_result(&self, raw: i64) -> i64 {
        if raw < 0 && self.flavor().failure_as_minus_one {
            -1
        } else {
            raw
        }
    }
}

/// Aligned bounce memory for O_DIRECT windows. Small windows (the common
/// 4–64 KiB random I/O) are recycled through a bounded per-size free list:
/// `posix_memalign`/`free` of page-aligned blocks on every operation showed
/// up in profiles (malloc consolidation), the free list costs one lock.
mod bounce {
    use std::sync::Mutex;

    use crate::py::{Exc, PyErr, PyResult};

    const MIN: usize = 4096;
    /// Size classes 4, 8, 16, 32, 64 KiB, page-aligned.
    const CLASSES: usize = 5;
    /// At most 1 MiB kept per class.
    const KEEP_BYTES: usize = 1 << 20;

    static FREE: Mutex<[Vec<usize>; CLASSES]> =
        Mutex::new([Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()]);

    fn class_of(size: usize, align: usize) -> Option<usize> {
        if align > MIN || size > MIN << (CLASSES - 1) {
            return None;
        }
        let rounded = size.max(MIN).next_power_of_two();
        Some(rounded.trailing_zeros() as usize - MIN.trailing_zeros() as usize)
    }

    /// `(ptr, size, align)` actually allocated (what `free` needs back).
    pub(super) fn alloc(size: usize, align: usize) -> PyResult<(*mut u8, usize, usize)> {
        let (size, align) = match class_of(size, align) {
            Some(c) => {
                let reused = FREE.lock().unwrap_or_else(|e| e.into_inner())[c].pop();
                if let Some(p) = reused {
                    return Ok((p as *mut u8, MIN << c, MIN));
                }
                (MIN << c, MIN)
            }
            None => (size, align),
        };
        let layout = std::alloc::Layout::from_size_align(size, align)
            .map_err(|_| PyErr::overflow("aligned buffer too large"))?;
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(PyErr::new(
                Exc::MemoryError,
                "cannot allocate aligned buffer",
            ));
        }
        Ok((p, size, align))
    }

    /// # Safety
    /// `(p, size, align)` as returned by [`alloc`], not used afterwards.
    pub(super) unsafe fn free(p: *mut u8, size: usize, align: usize) {
        if let Some(c) = class_of(size, align).filter(|&c| MIN << c == size && align == MIN) {
            let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
            if free[c].len() * size < KEEP_BYTES {
                free[c].push(p as usize);
                return;
            }
        }
        std::alloc::dealloc(
            p,
            std::alloc::Layout::from_size_align_unchecked(size, align),
        );
    }
}

// ---------------------------------------------------------------------------
// life cycle used by engines

/// Takes the engine's reference for a freshly claimed op and records the
/// Context that keeps it company until delivery.
///
/// # Safety
/// `op` must have just been claimed by the caller (attached thread).
pub unsafe fn begin(op: &Operation, ctx: *mut PyObject) {
    Py_INCREF(op.as_ptr());
    Py_INCREF(ctx);
    let old = {
        let _g = op.lock.lock();
        std::mem::replace(&mut *op.context.get(), ctx)
    };
    if !old.is_null() {
        Py_DECREF(old);
    }
}

/// Rolls back a claim the backend did not accept: the op is `NEW` again,
/// retryable with its original payload, and no reference is leaked.
///
/// # Safety
/// `op` must be in flight through [`begin`] and not handed to any engine.
pub unsafe fn abort(op: &Operation) {
    op.free_bounce();
    op.reset_io();
    let ctx = {
        let _g = op.lock.lock();
        std::mem::replace(&mut *op.context.get(), ptr::null_mut())
    };
    op.state.store(NEW, Ordering::Release);
    if !ctx.is_null() {
        Py_DECREF(ctx);
    }
    Py_DECREF(op.as_ptr());
}

impl Operation {
    unsafe fn reset_io(&self) {
        let io = &mut *self.io.get();
        io.ptr = match self.kind {
            OpKind::Read => self.read_data(),
            OpKind::Write => self.payload_ptr() as *mut u8,
            _ => ptr::null_mut(),
        };
        io.len = self.nbytes as usize;
        io.offset = self.offset;
        io.skip = 0;
    }
}

/// Low bit of the callback slot: the object is a future, not a callable.
/// Object pointers are at least 8-byte aligned, so the bit is free.
const FUTURE_TAG: usize = 1;

#[inline]
fn untag(p: *mut PyObject) -> *mut PyObject {
    (p as usize & !FUTURE_TAG) as *mut PyObject
}

static DONE_NAME: crate::py::Interned = crate::py::Interned::new(c"done");
static SET_RESULT_NAME: crate::py::Interned = crate::py::Interned::new(c"set_result");

/// `fut.set_result(True)` unless the future is already done (cancelled by
/// its awaiter). The common case costs one call: `set_result` is tried first
/// and its `InvalidStateError` is only examined when it fails.
unsafe fn resolve_future(fut: Borrowed<'_>) -> PyResult<()> {
    if crate::py::call_method(fut, SET_RESULT_NAME.get()?, &[Py_True()]).is_ok() {
        return Ok(());
    }
    let (mut t, mut v, mut tb) = (ptr::null_mut(), ptr::null_mut(), ptr::null_mut());
    PyErr_Fetch(&mut t, &mut v, &mut tb);
    let done = crate::py::call_method(fut, DONE_NAME.get()?, &[]);
    match done {
        Ok(d) if d.as_ptr() == Py_True() => {
            // Already done: nothing to resolve, the error is expected.
            for p in [t, v, tb] {
                if !p.is_null() {
                    Py_DECREF(p);
                }
            }
            Ok(())
        }
        _ => {
            PyErr_Clear();
            PyErr_Restore(t, v, tb);
            Err(PyErr::Fetched)
        }
    }
}

thread_local! {
    static DISCARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, [`Delivery::run`] on this thread discards instead of running
/// the callback or resolving the future. For draining a backend whose event
/// loop is closed: its futures must not be resolved (their callbacks would
/// be scheduled on a dead loop) and nobody waits for the callbacks any more.
pub struct Discarding(bool);

impl Discarding {
    pub fn new() -> Discarding {
        Discarding(DISCARD.with(|d| d.replace(true)))
    }
}

impl Default for Discarding {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Discarding {
    fn drop(&mut self) {
        let prev = self.0;
        DISCARD.with(|d| d.set(prev));
    }
}

/// What is left to do after a completion was recorded: call the callback and
/// drop the references. Split from [`finish`] so that a drain can publish a
/// whole batch (and release its locks) before any callback runs.
pub struct Delivery {
    op: *mut Operation,
    callback: *mut PyObject,
    context: *mut PyObject,
    payload: Option<Py_buffer>,
    arg: i64,
}

/// Records the completion of an in-flight op (`raw` = bytes moved or
/// `-errno` for the engine's window) and publishes `DONE`.
///
/// # Safety
/// `op` must be in flight (engine reference held); the caller must be
/// attached to the interpreter and be the only one finishing this op.
pub unsafe fn finish(op: *mut Operation, raw: i64) -> Delivery {
    let o = &*op;
    let mut res = raw;
    if o.kind == OpKind::Read {
        let data = o.read_data();
        let io = o.io();
        if !io.bounce.is_null() {
            // Aligned window: the user's bytes start `skip` bytes in.
            if res >= 0 {
                let avail = (res as u64).saturating_sub(io.skip as u64);
                res = avail.min(o.nbytes) as i64;
                ptr::copy_nonoverlapping(io.bounce.add(io.skip), data, res as usize);
            }
        }
        // Never expose stale heap memory: zero what was not filled.
        let filled = if res >= 0 { res as usize } else { 0 };
        if filled < o.nbytes as usize {
            ptr::write_bytes(data.add(filled), 0, o.nbytes as usize - filled);
        }
    } else if o.kind == OpKind::Write && res > o.nbytes as i64 {
        res = o.nbytes as i64;
    }
    o.free_bounce();
    o.result.store(res, Ordering::Relaxed);
    let drop_payload = o.kind == OpKind::Write && o.flavor().drop_write_payload;
    let (callback, context, payload) = {
        let _g = o.lock.lock();
        let cb = std::mem::replace(&mut *o.callback.get(), ptr::null_mut());
        let ctx = std::mem::replace(&mut *o.context.get(), ptr::null_mut());
        let view = &mut *o.view.get();
        let payload = if drop_payload && !view.obj.is_null() {
            let taken = ptr::read(view);
            ptr::write(view, std::mem::zeroed());
            Some(taken)
        } else {
            None
        };
        // Published under the lock: set_callback_if_pending() either runs
        // before (its callback is taken here) or sees DONE.
        o.state.store(DONE, Ordering::Release);
        (cb, ctx, payload)
    };
    Delivery {
        op,
        callback,
        context,
        payload,
        arg: o.reported_result(res),
    }
}

impl Delivery {
    /// The operation this delivery completes (an identity for bookkeeping;
    /// the reference is owned by the delivery until `run`/`discard`).
    pub fn op_ptr(&self) -> *mut Operation {
        self.op
    }

    /// Runs the callback (exceptions go to `sys.unraisablehook`) and drops the
    /// references held for the flight. Caller must be attached. Inside a
    /// [`Discarding`] scope (on this thread) it discards instead.
    pub fn run(self) {
        if DISCARD.with(|d| d.get()) {
            return self.discard();
        }
        unsafe {
            if !self.callback.is_null() {
                let target = untag(self.callback);
                let r = if self.callback as usize & FUTURE_TAG != 0 {
                    resolve_future(Borrowed::from_ptr(target))
                } else {
                    py_int(self.arg)
                        .and_then(|arg| call1(Borrowed::from_ptr(target), arg.borrow()))
                        .map(drop)
                };
                if let Err(e) = r {
                    e.restore();
                    write_unraisable(target);
                }
                Py_DECREF(target);
            }
            self.release_refs();
        }
    }

    /// Drops the references without calling the callback (used when the
    /// process is shutting down and Python code must not run).
    pub fn discard(self) {
        unsafe {
            if !self.callback.is_null() {
                Py_DECREF(untag(self.callback));
            }
            self.release_refs();
        }
    }

    unsafe fn release_refs(mut self) {
        if let Some(mut view) = self.payload.take() {
            PyBuffer_Release(&mut view);
        }
        if !self.context.is_null() {
            Py_DECREF(self.context);
        }
        Py_DECREF(self.op.cast());
    }
}

// ---------------------------------------------------------------------------
// Python-visible type

unsafe fn new_op(
    cls: *mut PyObject,
    kind: OpKind,
    fd: u32,
    offset: u64,
    priority: u16,
) -> PyResult<Owned> {
    let tp = cls as *mut PyTypeObject;
    let alloc = (*tp).tp_alloc.unwrap_or(PyType_GenericAlloc);
    let obj = Owned::from_new(alloc(tp, 0))?;
    let st = ModState::of_type(tp);
    let op = &mut *(obj.as_ptr() as *mut Operation);
    op.flavor = (*st).flavor;
    op.kind = kind;
    op.fd = fd;
    op.offset = offset;
    op.priority = priority;
    (*op.io.get()).offset = offset;
    Ok(obj)
}

unsafe fn common_args(
    fl: &Flavor,
    fd: Borrowed<'_>,
    offset: Option<Borrowed<'_>>,
    priority: Option<Borrowed<'_>>,
) -> PyResult<(u32, u64, u16)> {
    let fd = fd_arg(fd)?;
    let offset = match offset {
        Some(o) => int_in(o, "offset", fl.offset_min, fl.offset_max)? as u64,
        None => 0,
    };
    let priority = match priority {
        Some(p) => int_in(p, "priority", fl.priority_min, fl.priority_max)? as u16,
        None => 0,
    };
    Ok((fd, offset, priority))
}

fn flavor_of_type(cls: *mut PyObject) -> &'static Flavor {
    unsafe { &*(*ModState::of_type(cls as *mut PyTypeObject)).flavor }
}

static READ_PARAMS: Params = Params {
    fname: "read",
    names: &["nbytes", "fd", "offset", "priority"],
    required: 2,
    keywords: true,
};
static WRITE_PARAMS: Params = Params {
    fname: "write",
    names: &["payload_bytes", "fd", "offset", "priority"],
    required: 2,
    keywords: true,
};
static FSYNC_PARAMS: Params = Params {
    fname: "fsync",
    names: &["fd", "priority"],
    required: 1,
    keywords: true,
};
static FDSYNC_PARAMS: Params = Params {
    fname: "fdsync",
    names: &["fd", "priority"],
    required: 1,
    keywords: true,
};

unsafe extern "C" fn op_read(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let a = READ_PARAMS.parse::<4>(args, nargs, kw)?;
        new_read(
            cls,
            a.get(0).unwrap(),
            a.get(1).unwrap(),
            a.get(2),
            a.get(3),
        )
    })
}

/// `cls.read(nbytes, fd, offset, priority)` for Rust callers (`cls` is a
/// backend's Operation type); `None` = the parameter's default.
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`].
pub unsafe fn new_read(
    cls: *mut PyObject,
    nbytes: Borrowed<'_>,
    fd: Borrowed<'_>,
    offset: Option<Borrowed<'_>>,
    priority: Option<Borrowed<'_>>,
) -> PyResult<Owned> {
    let fl = flavor_of_type(cls);
    let nbytes = crate::args::to_i128(nbytes, "nbytes")?;
    if nbytes < 0 || nbytes > fl.max_read as i128 {
        return Err(PyErr::overflow(fl.max_read_msg));
    }
    let (fd, offset, priority) = common_args(fl, fd, offset, priority)?;
    // Uninitialised on purpose: a full read overwrites it, and `finish`
    // zeroes whatever was not filled, so stale heap bytes are never seen.
    let buf = Owned::from_new(PyBytes_FromStringAndSize(ptr::null(), nbytes as Py_ssize_t))?;
    let obj = new_op(cls, OpKind::Read, fd, offset, priority)?;
    let op = &mut *(obj.as_ptr() as *mut Operation);
    op.nbytes = nbytes as u64;
    op.read_buf = buf.into_ptr();
    op.reset_io();
    Ok(obj)
}

unsafe extern "C" fn op_write(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let a = WRITE_PARAMS.parse::<4>(args, nargs, kw)?;
        new_write(
            cls,
            a.get(0).unwrap(),
            a.get(1).unwrap(),
            a.get(2),
            a.get(3),
        )
    })
}

/// `cls.write(payload_bytes, fd, offset, priority)` for Rust callers.
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`].
pub unsafe fn new_write(
    cls: *mut PyObject,
    payload: Borrowed<'_>,
    fd: Borrowed<'_>,
    offset: Option<Borrowed<'_>>,
    priority: Option<Borrowed<'_>>,
) -> PyResult<Owned> {
    let fl = flavor_of_type(cls);
    // The contract accepts `bytes` (and subclasses) only.
    if PyBytes_Check(payload.as_ptr()) == 0 {
        return Err(PyErr::value_error(fl.payload_type_msg));
    }
    let (fd, offset, priority) = common_args(fl, fd, offset, priority)?;
    let obj = new_op(cls, OpKind::Write, fd, offset, priority)?;
    let op = &mut *(obj.as_ptr() as *mut Operation);
    // A buffer export pins the payload's memory until completion.
    if PyObject_GetBuffer(payload.as_ptr(), op.view.get(), PyBUF_SIMPLE) != 0 {
        *op.view.get() = std::mem::zeroed();
        return Err(PyErr::Fetched);
    }
    op.nbytes = (*op.view.get()).len as u64;
    op.reset_io();
    Ok(obj)
}

/// `cls.fsync(fd)` / `cls.fdsync(fd)` for Rust callers.
///
/// # Safety
/// Attached; `cls` is an Operation type created by [`create_type`].
pub unsafe fn new_sync(
    cls: *mut PyObject,
    kind: OpKind,
    fd: Borrowed<'_>,
    priority: Option<Borrowed<'_>>,
) -> PyResult<Owned> {
    debug_assert!(matches!(kind, OpKind::Fsync | OpKind::Fdsync));
    let fl = flavor_of_type(cls);
    let (fd, _, priority) = common_args(fl, fd, None, priority)?;
    new_op(cls, kind, fd, 0, priority)
}

unsafe fn sync_op(
    cls: *mut PyObject,
    params: &Params,
    kind: OpKind,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> PyResult<Owned> {
    let a = params.parse::<2>(args, nargs, kw)?;
    new_sync(cls, kind, a.get(0).unwrap(), a.get(1))
}

unsafe extern "C" fn op_fsync(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| sync_op(cls, &FSYNC_PARAMS, OpKind::Fsync, args, nargs, kw))
}

unsafe extern "C" fn op_fdsync(
    cls: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| sync_op(cls, &FDSYNC_PARAMS, OpKind::Fdsync, args, nargs, kw))
}

fn in_flight_error(what: &str) -> PyErr {
    PyErr::runtime(format!(
        "{} is not available while the operation is in flight",
        what
    ))
}

/// The error raised by `get_value()` for a failed op: the module's
/// `OperationError`, a subclass of both `OSError` and `SystemError`
/// (API.md §7 Q4: still catchable as upstream's `SystemError`, now also with
/// `errno`/`strerror`).
unsafe fn op_error(op: &Operation, errno: i32) -> PyErr {
    let st = ModState::of_type(Py_TYPE(op.as_ptr()));
    if let Some(hook) = ERROR_HOOK.get() {
        if let Some(msg) = hook(op, errno) {
            return PyErr::ErrnoMsg(Exc::Custom((*st).error_type), errno, msg);
        }
    }
    PyErr::Errno(Exc::Custom((*st).error_type), errno)
}

/// Builds a better message than `strerror` for some failures of a backend's
/// ops (e.g. O_DIRECT alignment), or `None` for the plain text.
pub type ErrorMessageHook = unsafe fn(op: &Operation, errno: i32) -> Option<String>;

// Core is linked into each backend's shared library separately, so this is
// one hook per backend module.
static ERROR_HOOK: std::sync::OnceLock<ErrorMessageHook> = std::sync::OnceLock::new();

/// Installs the backend's [`ErrorMessageHook`] (first call wins).
pub fn set_error_message_hook(hook: ErrorMessageHook) {
    let _ = ERROR_HOOK.set(hook);
}

/// A fresh zero-filled `bytes` of `n` bytes (the value of a read not yet run).
unsafe fn zero_bytes(n: u64) -> PyResult<Owned> {
    let b = Owned::from_new(PyBytes_FromStringAndSize(ptr::null(), n as Py_ssize_t))?;
    ptr::write_bytes(PyBytes_AS_STRING(b.as_ptr()) as *mut u8, 0, n as usize);
    Ok(b)
}

/// `op.get_value()`: the read bytes, the written count or `None`; raises the
/// op's error (or `RuntimeError` while in flight).
///
/// # Safety
/// Attached.
pub unsafe fn get_value(op: &Operation) -> PyResult<Owned> {
    let state = op.state();
    if state == IN_FLIGHT {
        return Err(in_flight_error("get_value()"));
    }
    let res = op.raw_result();
    if res < 0 {
        return Err(op_error(op, (-res) as i32));
    }
    match op.kind {
        OpKind::Read if state == NEW => zero_bytes(op.nbytes),
        OpKind::Read => {
            if res as u64 == op.nbytes {
                Ok(Owned::from_borrowed(op.read_buf))
            } else {
                Owned::from_new(PyBytes_FromStringAndSize(
                    PyBytes_AS_STRING(op.read_buf),
                    res as Py_ssize_t,
                ))
            }
        }
        OpKind::Write => py_int(res),
        OpKind::Fsync | OpKind::Fdsync => Ok(none()),
    }
}

unsafe extern "C" fn op_get_value(
    slf: *mut PyObject,
    _args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        crate::args::no_args("get_value", nargs, kw)?;
        get_value(as_op(slf))
    })
}

static SET_CALLBACK_KW: Params = Params {
    fname: "set_callback",
    names: &["callback"],
    required: 1,
    keywords: true,
};
static SET_CALLBACK_POS: Params = Params {
    fname: "set_callback",
    names: &["callback"],
    required: 1,
    keywords: false,
};

/// Replaces the op's callback; the previous one is released exactly once
/// even when several threads race.
pub unsafe fn set_callback(op: &Operation, callback: Borrowed<'_>) -> PyResult<()> {
    if PyCallable_Check(callback.as_ptr()) == 0 {
        return Err(PyErr::value_error(format!(
            "object {} is not callable",
            callback.repr()
        )));
    }
    replace_callback(op, callback.to_owned().into_ptr());
    Ok(())
}

/// Installs `fut` (a new reference is taken) as what the op's delivery
/// resolves, replacing any callback (`op._set_future(fut)`).
///
/// # Safety
/// Attached; `fut` is an asyncio future.
pub unsafe fn set_future(op: &Operation, fut: *mut PyObject) {
    Py_INCREF(fut);
    replace_callback(op, (fut as usize | FUTURE_TAG) as *mut PyObject);
}

/// Installs `callback` (replacing the current target) unless the op's
/// completion has already been delivered, atomically with delivery: when it
/// returns true the callback WILL be called exactly once by the delivery;
/// when false, nothing was installed (the op is DONE).
///
/// # Safety
/// Caller attached.
pub unsafe fn set_callback_if_pending(op: &Operation, callback: Owned) -> bool {
    let old = {
        let _g = op.lock.lock();
        if op.state.load(Ordering::Acquire) == DONE {
            return false; // `callback` dropped (decref) on return, outside the lock
        }
        std::mem::replace(&mut *op.callback.get(), callback.into_ptr())
    };
    if !old.is_null() {
        Py_DECREF(untag(old));
    }
    true
}

/// The future installed by [`set_future`], if that is what the op's
/// delivery will resolve (a new reference); `None` for a plain callback or
/// nothing.
///
/// # Safety
/// Caller attached.
pub unsafe fn future(op: &Operation) -> Option<Owned> {
    let _g = op.lock.lock();
    let p = *op.callback.get();
    if p as usize & FUTURE_TAG == 0 {
        return None;
    }
    let fut = untag(p);
    Py_INCREF(fut);
    Some(Owned::from_raw(fut))
}

/// Drops the op's callback (or future): its delivery will call nothing.
///
/// # Safety
/// Caller attached.
pub unsafe fn clear_callback(op: &Operation) {
    replace_callback(op, ptr::null_mut());
}

unsafe fn replace_callback(op: &Operation, new: *mut PyObject) {
    let old = {
        let _g = op.lock.lock();
        std::mem::replace(&mut *op.callback.get(), new)
    };
    if !old.is_null() {
        Py_DECREF(untag(old));
    }
}

/// `op._set_future(fut)`: on delivery, resolve `fut` with `True` unless it is
/// already done (instead of calling a callback). Only for backends whose
/// completions are delivered on the event-loop thread (asyncio adapters).
unsafe extern "C" fn op_set_future(slf: *mut PyObject, fut: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        set_future(as_op(slf), fut);
        Ok(none())
    })
}

unsafe extern "C" fn op_set_callback(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargs: Py_ssize_t,
    kw: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let op = as_op(slf);
        let params = if op.flavor().callback_keyword {
            &SET_CALLBACK_KW
        } else {
            &SET_CALLBACK_POS
        };
        let a = params.parse::<1>(args, nargs, kw)?;
        set_callback(op, a.get(0).unwrap())?;
        Ok(py_bool(true))
    })
}

// -- getters ----------------------------------------------------------------

unsafe extern "C" fn get_fileno(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_uint(as_op(slf).fd as u64))
}

unsafe extern "C" fn get_offset(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_uint(as_op(slf).offset))
}

unsafe extern "C" fn get_nbytes(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| {
        let op = as_op(slf);
        let res = op.raw_result();
        let tracks = match op.kind {
            OpKind::Read => true,
            OpKind::Write => op.flavor().nbytes_tracks_write,
            _ => false,
        };
        if op.state() == DONE && res >= 0 && tracks {
            py_uint(res as u64)
        } else {
            py_uint(op.nbytes)
        }
    })
}

unsafe extern "C" fn get_payload(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| {
        let op = as_op(slf);
        let state = op.state();
        if state == IN_FLIGHT {
            return Err(in_flight_error("payload"));
        }
        match op.kind {
            OpKind::Read => {
                let bytes = if state == NEW {
                    zero_bytes(op.nbytes)?
                } else {
                    Owned::from_borrowed(op.read_buf)
                };
                match op.flavor().read_payload {
                    ReadPayload::Bytes => Ok(bytes),
                    ReadPayload::MemoryView => {
                        Owned::from_new(PyMemoryView_FromObject(bytes.as_ptr()))
                    }
                }
            }
            OpKind::Write => {
                let obj = {
                    let _g = op.lock.lock();
                    let p = (*op.view.get()).obj;
                    if !p.is_null() {
                        Py_INCREF(p);
                    }
                    p
                };
                if obj.is_null() {
                    Ok(none())
                } else {
                    Ok(Owned::from_raw(obj))
                }
            }
            _ => Ok(none()),
        }
    })
}

unsafe extern "C" fn get_result(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| {
        let op = as_op(slf);
        py_int(op.reported_result(op.raw_result()))
    })
}

unsafe extern "C" fn get_error(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_int(as_op(slf).errno() as i64))
}

unsafe extern "C" fn get_context(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| {
        let op = as_op(slf);
        let ctx = {
            let _g = op.lock.lock();
            let p = *op.context.get();
            if !p.is_null() {
                Py_INCREF(p);
            }
            p
        };
        if ctx.is_null() {
            Ok(none())
        } else {
            Ok(Owned::from_raw(ctx))
        }
    })
}

unsafe extern "C" fn get_priority(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| py_int(as_op(slf).priority as i64))
}

// -- slots ------------------------------------------------------------------

unsafe extern "C" fn op_repr(slf: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let op = as_op(slf);
        let fl = op.flavor();
        let name = CStr::from_ptr((*Py_TYPE(slf)).tp_name).to_string_lossy();
        let offset = if fl.repr_offset_signed {
            (op.offset as i64).to_string()
        } else {
            op.offset.to_string()
        };
        let buffer = match op.kind {
            OpKind::Read => op.read_data() as usize,
            OpKind::Write => op.payload_ptr() as usize,
            _ => 0,
        };
        let buffer = if buffer == 0 {
            "0x(nil)".to_owned()
        } else {
            format!("{:#x}", buffer)
        };
        let result = if fl.repr_result {
            format!(", result={}", op.reported_result(op.raw_result()))
        } else {
            String::new()
        };
        crate::py::py_str(&format!(
            "<{} at {:#x}: mode=\"{}\", fd={}, offset={}{}, buffer={}>",
            name,
            slf as usize,
            op.kind.mode(),
            op.fd,
            offset,
            result,
            buffer
        ))
    })
}

unsafe extern "C" fn op_traverse(slf: *mut PyObject, visit: visitproc, arg: *mut c_void) -> c_int {
    // Runs with the world stopped (free-threaded) or the GIL held; the spin
    // lock is never held across a point where that can happen.
    let op = as_op(slf);
    for p in [
        untag(*op.callback.get()),
        *op.context.get(),
        (*op.view.get()).obj,
    ] {
        if !p.is_null() {
            let r = visit(p, arg);
            if r != 0 {
                return r;
            }
        }
    }
    visit(Py_TYPE(slf).cast(), arg)
}

unsafe fn clear_slots(op: &Operation) {
    let (cb, ctx) = {
        let _g = op.lock.lock();
        (
            std::mem::replace(&mut *op.callback.get(), ptr::null_mut()),
            std::mem::replace(&mut *op.context.get(), ptr::null_mut()),
        )
    };
    for p in [untag(cb), ctx] {
        if !p.is_null() {
            Py_DECREF(p);
        }
    }
}

unsafe extern "C" fn op_clear(slf: *mut PyObject) -> c_int {
    trampoline_int(|| {
        // Only the callback can close a cycle through the op (its context
        // reference is held on behalf of the engine while in flight).
        clear_slots(as_op(slf));
        Ok(())
    })
}

unsafe extern "C" fn op_dealloc(slf: *mut PyObject) {
    trampoline_void(|| {
        PyObject_GC_UnTrack(slf.cast());
        let op = &mut *(slf as *mut Operation);
        if !op.weakreflist.is_null() {
            PyObject_ClearWeakRefs(slf);
        }
        clear_slots(op);
        if !(*op.view.get()).obj.is_null() {
            PyBuffer_Release(op.view.get());
        }
        if !op.read_buf.is_null() {
            Py_DECREF(op.read_buf);
            op.read_buf = ptr::null_mut();
        }
        op.free_bounce();
        let tp = Py_TYPE(slf);
        if let Some(free) = (*tp).tp_free {
            free(slf.cast());
        }
        Py_DECREF(tp.cast());
    })
}

// -- type spec ----------------------------------------------------------------

struct TypeParts {
    methods: Vec<PyMethodDef>,
    getset: Vec<PyGetSetDef>,
    members: Vec<PyMemberDef>,
    slots: Vec<PyType_Slot>,
    spec: PyType_Spec,
}

fn method(
    name: &'static CStr,
    f: PyCFunctionFastWithKeywords,
    flags: c_int,
    doc: &'static CStr,
) -> PyMethodDef {
    PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunctionFastWithKeywords: f,
        },
        ml_flags: METH_FASTCALL | METH_KEYWORDS | flags,
        ml_doc: doc.as_ptr(),
    }
}

fn getset(name: &'static CStr, get: getter, doc: &'static CStr) -> PyGetSetDef {
    PyGetSetDef {
        name: name.as_ptr(),
        get: Some(get),
        set: None,
        doc: doc.as_ptr(),
        closure: ptr::null_mut(),
    }
}

fn slot(slot: c_int, pfunc: *mut c_void) -> PyType_Slot {
    PyType_Slot { slot, pfunc }
}

/// Builds (once per flavor, leaked for the process lifetime) the type spec of
/// a backend's Operation.
fn type_parts(fl: &'static Flavor) -> &'static mut TypeParts {
    let mut methods = vec![
        method(
            c"read",
            op_read,
            METH_CLASS,
            c"read(nbytes, fd, offset=0, priority=0)\n--\n\nA read of nbytes at offset.",
        ),
        method(
            c"write",
            op_write,
            METH_CLASS,
            c"write(payload_bytes, fd, offset=0, priority=0)\n--\n\nA write of payload_bytes at offset.",
        ),
        method(c"fsync", op_fsync, METH_CLASS, c"fsync(fd, priority=0)\n--\n\nAn fsync of fd."),
        method(
            c"fdsync",
            op_fdsync,
            METH_CLASS,
            c"fdsync(fd, priority=0)\n--\n\nAn fdatasync of fd (fsync where unavailable).",
        ),
        method(
            c"get_value",
            op_get_value,
            0,
            c"get_value()\n--\n\nbytes for a read, bytes written for a write, None for syncs; raises the operation's error.",
        ),
        method(
            c"set_callback",
            op_set_callback,
            0,
            c"set_callback(callback)\n--\n\nCalled once with the result when the completion is delivered.",
        ),
    ];
    methods.push(PyMethodDef {
        ml_name: c"_set_future".as_ptr(),
        ml_meth: PyMethodDefPointer {
            PyCFunction: op_set_future,
        },
        ml_flags: METH_O,
        ml_doc: c"_set_future(future)\n--\n\nResolve future (set_result(True) unless done) on delivery \
instead of calling a callback. For asyncio adapters whose completions are delivered on the loop thread."
            .as_ptr(),
    });
    methods.push(PyMethodDef::zeroed());
    let mut getset_v = vec![
        getset(c"fileno", get_fileno, c"file descriptor"),
        getset(c"offset", get_offset, c"file offset"),
        getset(
            c"nbytes",
            get_nbytes,
            c"requested (or, once done, transferred) byte count",
        ),
        getset(c"payload", get_payload, c"read buffer or write payload"),
    ];
    if fl.has_result_error {
        getset_v.push(getset(c"result", get_result, c"raw result once done"));
        getset_v.push(getset(
            c"error",
            get_error,
            c"errno once done (0 on success)",
        ));
    }
    if fl.has_context {
        getset_v.push(getset(
            c"context",
            get_context,
            c"the Context while in flight",
        ));
    }
    if fl.has_priority {
        getset_v.push(getset(c"priority", get_priority, c"request priority"));
    }
    getset_v.push(PyGetSetDef {
        name: ptr::null(),
        get: None,
        set: None,
        doc: ptr::null(),
        closure: ptr::null_mut(),
    });
    let members = vec![
        PyMemberDef {
            name: c"__weaklistoffset__".as_ptr(),
            type_code: Py_T_PYSSIZET,
            offset: std::mem::offset_of!(Operation, weakreflist) as Py_ssize_t,
            flags: Py_READONLY,
            doc: ptr::null(),
        },
        PyMemberDef {
            name: ptr::null(),
            type_code: 0,
            offset: 0,
            flags: 0,
            doc: ptr::null(),
        },
    ];
    let parts = Box::leak(Box::new(TypeParts {
        methods,
        getset: getset_v,
        members,
        slots: Vec::new(),
        spec: PyType_Spec {
            name: ptr::null(),
            basicsize: 0,
            itemsize: 0,
            flags: 0,
            slots: ptr::null_mut(),
        },
    }));
    parts.slots = vec![
        slot(Py_tp_doc, fl.doc.as_ptr() as *mut c_void),
        slot(Py_tp_dealloc, op_dealloc as *mut c_void),
        slot(Py_tp_traverse, op_traverse as *mut c_void),
        slot(Py_tp_clear, op_clear as *mut c_void),
        slot(Py_tp_repr, op_repr as *mut c_void),
        slot(Py_tp_methods, parts.methods.as_mut_ptr().cast()),
        slot(Py_tp_getset, parts.getset.as_mut_ptr().cast()),
        slot(Py_tp_members, parts.members.as_mut_ptr().cast()),
        slot(0, ptr::null_mut()),
    ];
    parts.spec = PyType_Spec {
        name: fl.type_name.as_ptr() as *const c_char,
        basicsize: std::mem::size_of::<Operation>() as c_int,
        itemsize: 0,
        flags: (Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION) as _,
        slots: parts.slots.as_mut_ptr(),
    };
    parts
}

struct SpecPtr(*mut PyType_Spec);
unsafe impl Send for SpecPtr {}
unsafe impl Sync for SpecPtr {}

/// Creates the Operation heap type of a backend module.
///
/// # Safety
/// Caller attached; `module` is the module being initialised.
pub unsafe fn create_type(module: *mut PyObject, fl: &'static Flavor) -> PyResult<Owned> {
    // One spec per flavor (module re-imports reuse it).
    static SPECS: std::sync::Mutex<Vec<(usize, SpecPtr)>> = std::sync::Mutex::new(Vec::new());
    let spec = {
        let mut specs = SPECS.lock().unwrap_or_else(|e| e.into_inner());
        let key = fl as *const Flavor as usize;
        match specs.iter().find(|(k, _)| *k == key) {
            Some((_, s)) => s.0,
            None => {
                let s: *mut PyType_Spec = &mut type_parts(fl).spec;
                specs.push((key, SpecPtr(s)));
                s
            }
        }
    };
    Owned::from_new(PyType_FromModuleAndSpec(module, spec, ptr::null_mut()))
}

/// Checks that `obj` is an Operation of this module.
#[inline]
pub unsafe fn is_op(obj: *mut PyObject, op_type: *mut PyObject) -> bool {
    Py_TYPE(obj) as *mut PyObject == op_type
}
