//! The `Operation` object shared by every native backend.
//!
//! An operation is one-shot: [`OpState::New`] → (claimed by `submit`) →
//! [`OpState::InFlight`] → (completion handed to Python) → [`OpState::Done`].
//! The claim is a compare-and-swap, so two threads or two Contexts can never
//! both dispatch one op; a claim the backend did not accept is rolled back
//! to `New`.
//!
//! Memory ownership while in flight:
//! * the op holds a strong reference to itself on behalf of the engine
//!   (taken by [`begin`], released by [`Delivery`] or [`abort`]);
//! * a read owns the `bytes` object the kernel/worker fills in place (it is
//!   never exposed before `Done`, so handing it out afterwards is sound);
//! * a write holds a buffer-protocol export of its payload until completion;
//! * the op holds a strong reference to its Context until delivery;
//! * the I/O window ([`IoTarget`], possibly aligned bounce memory) belongs
//!   to the engine from the claim until [`finish`].
//!
//! Free-threading: `state` is published with release/acquire; the three
//! object slots that change after construction (callback, context, write
//! payload) sit behind a tiny per-op spin lock that is never held while
//! calling into Python or decref'ing.
//!
//! * [`lifecycle`]: begin/abort/finish, the callback or future a delivery
//!   runs, [`Delivery`] and [`Discarding`];
//! * [`io`]: the engine's I/O window, aligned windows for O_DIRECT;
//! * [`pytype`]: the Python type (constructors, properties, `get_value`,
//!   `set_callback`, repr, GC).

use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicI64, Ordering};

use pyo3_ffi::*;

use crate::py::Owned;
use crate::sync::{AtomicState, SpinLock};

pub mod buffer;
mod construct;
pub mod io;
pub mod lifecycle;
pub mod pytype;
pub mod vectored;

pub use construct::{
    new_read, new_readinto, new_sync, new_vectored, new_write, one_buffer, OneBufferCtor,
};
pub use io::IoTarget;
pub use lifecycle::{
    abort, begin, clear_callback, finish, future, retire_unsent, set_callback,
    set_callback_if_pending, set_future, Delivery, Discarding,
};
pub use pytype::{create_type, get_value, is_op, set_error_message_hook, ErrorMessageHook};

crate::u8_state! {
    /// Where an operation is in its one-shot life.
    pub enum OpState {
        /// Built, not (or no longer) claimed by an engine.
        New = 0,
        /// Claimed: owned by an engine until its completion is recorded.
        InFlight = 1,
        /// Completed; `result` is valid.
        Done = 2,
    }
}

#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OpKind {
    Read = 0,
    Write = 1,
    Fsync = 2,
    Fdsync = 3,
    /// `readv`: one vectored read into the caller's buffers
    /// ([`vectored::Vectored`]); no I/O window of its own.
    ReadV = 4,
    /// `writev`: one vectored write from the caller's buffers.
    WriteV = 5,
}

impl OpKind {
    pub fn mode(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Fsync => "fsync",
            OpKind::Fdsync => "fdsync",
            OpKind::ReadV => "readv",
            OpKind::WriteV => "writev",
        }
    }

    /// `readv`/`writev`: the engine transfers [`Operation::iovecs`].
    #[inline]
    pub fn is_vectored(self) -> bool {
        matches!(self, OpKind::ReadV | OpKind::WriteV)
    }

    /// Data flows from the file into memory (`read`, `readinto`, `readv`).
    #[inline]
    pub fn is_read(self) -> bool {
        matches!(self, OpKind::Read | OpKind::ReadV)
    }
}

/// How a `read` op's `payload` is exposed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ReadPayload {
    /// The `bytes` object itself (linux_uring).
    Bytes,
    /// A read-only `memoryview` over it (linux_aio, thread_aio). The view keeps
    /// the bytes alive, so it can never outlive its memory (DESIGN.md §6.2 view-uaf).
    MemoryView,
}

/// Per-backend differences of the Operation type (DESIGN.md §3.1–§3.4).
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

impl Flavor {
    /// What the flavors have in common unless they say otherwise: upstream's
    /// `aio.AIOOperation` (the type linux_aio and thread_aio keep): memoryview
    /// read payloads, `Py_ssize_t` reads, signed 64-bit offsets, priorities
    /// that fit 16 bits signed or unsigned (DESIGN.md §6.2 wrap: rejected
    /// beyond instead of wrapped), `result`/`error`/`context` attributes,
    /// `-errno` results.
    pub const COMMON: Flavor = Flavor {
        type_name: c"aio.AIOOperation",
        doc: c"",
        read_payload: ReadPayload::MemoryView,
        drop_write_payload: false,
        nbytes_tracks_write: false,
        max_read: isize::MAX as u64,
        max_read_msg: "nbytes does not fit in Py_ssize_t",
        offset_min: i64::MIN as i128,
        offset_max: i64::MAX as i128,
        priority_min: i16::MIN as i128,
        priority_max: u16::MAX as i128,
        failure_as_minus_one: false,
        callback_keyword: true,
        has_result_error: true,
        has_context: true,
        has_priority: false,
        repr_offset_signed: false,
        repr_result: true,
    };
}

/// The instance struct of every backend's Operation type. Allocated zeroed
/// by `tp_alloc` (so every slot starts empty and the state `New`), filled by
/// the constructors in [`pytype`].
#[repr(C)]
pub struct Operation {
    ob_base: PyObject,
    weakreflist: *mut PyObject,
    /// Set by the constructor before the op is visible; never changes.
    flavor: *const Flavor,
    state: AtomicState<OpState>,
    pub kind: OpKind,
    pub priority: u16,
    pub fd: u32,
    /// Raw 64 bits of the requested offset (u64 view of a signed value).
    pub offset: u64,
    /// Requested byte count (read size or payload length).
    pub nbytes: u64,
    /// Raw result: bytes moved (≥ 0) or `-errno`. Valid once `Done`.
    result: AtomicI64,
    /// Read: the `bytes` object filled in place (set at construction, then
    /// immutable until dealloc). `None` for a `readinto`.
    read_buf: Option<Owned>,
    /// The caller's object whose memory the op uses (write payload,
    /// `readinto` target); set at construction, immutable until dealloc.
    /// What `payload` shows.
    caller_obj: Option<Owned>,
    /// The engine moves data to or from memory the caller may mutate or
    /// resize afterwards (any payload but `bytes`, every `readinto`): the
    /// export is released at completion, and an awaiting task that is
    /// cancelled resumes only once the engine is done (DESIGN.md §5.5).
    /// Set at construction, never changes.
    pub borrows_buffer: bool,
    /// A `readinto` whose destination sits at a slow copy distance from its
    /// file offset (`sys::distance::needs_scratch`; where malloc puts every
    /// large buffer): engines whose kernel would copy into it itself may
    /// hand it to the pool, whose reads go through a scratch buffer
    /// (DESIGN.md §11.3). A `read()`'s fresh `bytes` rarely sits there and
    /// is not flagged. Set at construction, never changes.
    pub slow_copy_distance: bool,
    /// Write / `readinto`: the buffer export (guarded by `lock`; released on
    /// completion for `drop_write_payload` flavors and borrowed buffers).
    view: UnsafeCell<Py_buffer>,
    /// `readv`/`writev`: the exports and iovecs (set at construction; taken
    /// out under `lock` at completion).
    vectored: UnsafeCell<Option<Box<vectored::Vectored>>>,
    lock: SpinLock,
    /// What delivery calls: the callback, or a future to resolve (`lock`).
    target: UnsafeCell<Option<lifecycle::Target>>,
    /// The Context while in flight (`lock`).
    context: UnsafeCell<Option<Owned>>,
    /// Owned by the engine between claim and completion.
    io: UnsafeCell<IoTarget>,
    /// Scratch space for an engine (e.g. a kernel AIO control block).
    engine: UnsafeCell<[u64; 8]>,
}

/// The Operation behind an object pointer.
///
/// # Safety
/// `p` must point to a live instance of an Operation type (checked with
/// [`is_op`] or known from the type), alive for `'a`.
#[inline]
pub unsafe fn as_op<'a>(p: *mut PyObject) -> &'a Operation {
    // SAFETY: an Operation instance starts with its `PyObject` header
    // (`repr(C)`), so the object pointer is the struct pointer (caller's
    // contract: live for 'a).
    unsafe { &*p.cast::<Operation>() }
}

impl Operation {
    /// The op as a Python object (borrowed).
    #[inline]
    pub fn as_ptr(&self) -> *mut PyObject {
        std::ptr::from_ref(self).cast_mut().cast()
    }

    #[inline]
    fn flavor(&self) -> &'static Flavor {
        // SAFETY: set by the constructor to a `&'static Flavor` before the
        // op became reachable, never changed.
        unsafe { &*self.flavor }
    }

    #[inline]
    pub fn state(&self) -> OpState {
        self.state.load(Ordering::Acquire)
    }

    /// Claims the op for dispatch (`New` → `InFlight`); false if it was
    /// already claimed or done.
    #[inline]
    pub fn try_claim(&self) -> bool {
        self.state
            .compare_exchange(
                OpState::New,
                OpState::InFlight,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Gives back a claim that was never followed by [`begin`] (the engine
    /// kept the op aside and dropped it before dispatch): `New` again.
    #[inline]
    pub fn unclaim(&self) {
        let _ = self.state.compare_exchange(
            OpState::InFlight,
            OpState::New,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Raw result (bytes or `-errno`); 0 until `Done`.
    #[inline]
    pub fn raw_result(&self) -> i64 {
        match self.state() {
            OpState::Done => self.result.load(Ordering::Relaxed),
            OpState::New | OpState::InFlight => 0,
        }
    }

    /// The fd as the C `int` system calls take (values ≥ 2³¹ were given as
    /// negative numbers and wrap back to them).
    #[inline]
    pub fn fd_i32(&self) -> i32 {
        crate::num::i32_bits(self.fd)
    }

    /// Signed view of the offset (for pread/pwrite and linux_aio).
    #[inline]
    pub fn offset_i64(&self) -> i64 {
        crate::num::i64_bits(self.offset)
    }

    /// Engine scratch space.
    ///
    /// # Safety
    /// Only the engine owning the in-flight op may use it.
    #[inline]
    pub unsafe fn engine_area(&self) -> *mut [u64; 8] {
        self.engine.get()
    }

    /// errno of a failed op (0 otherwise).
    fn errno(&self) -> i32 {
        let r = self.raw_result();
        if r < 0 {
            i32::try_from(-r).unwrap_or(i32::MAX)
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

    /// Data pointer of a read's `bytes` or a `readinto`'s target (NULL for
    /// other kinds, and for a target whose export was released).
    pub(super) fn read_data(&self) -> *mut u8 {
        match &self.read_buf {
            // SAFETY: `read_buf` is a `bytes` object owned by the op.
            Some(b) => unsafe { PyBytes_AS_STRING(b.as_ptr()) }.cast_mut().cast(),
            // SAFETY: the export's pointer is read by the op's owner (the
            // constructor, the engine, finish) while the export is held.
            None if self.kind == OpKind::Read => unsafe { self.payload_ptr() }.cast_mut(),
            None => std::ptr::null_mut(),
        }
    }

    /// The iovecs of a `readv`/`writev` (NULL, 0 for other kinds).
    ///
    /// # Safety
    /// The op is owned by the caller's engine (in flight, not finished).
    pub unsafe fn iovecs(&self) -> (*const crate::sys::IoVec, usize) {
        // SAFETY: only `finish` (the engine, after the transfer) or an
        // unsent op's retirement take the vector out.
        match unsafe { &*self.vectored.get() } {
            Some(v) => v.iovecs(),
            None => (std::ptr::null(), 0),
        }
    }

    /// Whether this is a read into the caller's buffer (`readinto`).
    #[inline]
    pub fn is_readinto(&self) -> bool {
        self.kind == OpKind::Read && self.read_buf.is_none()
    }

    /// The name shown in reprs and task names: the kind, or `readinto`.
    pub fn mode(&self) -> &'static str {
        if self.is_readinto() {
            "readinto"
        } else {
            self.kind.mode()
        }
    }
}
