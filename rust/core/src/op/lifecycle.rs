//! An operation's life as engines see it: [`begin`] (take the engine's
//! references), [`abort`] (roll a claim back), [`finish`] (record the
//! completion) and the [`Delivery`] it returns (call the callback or resolve
//! the future, then drop the references); plus the target slot a delivery
//! calls — a callback, or an asyncio future ([`set_future`]).

use std::ptr::{self, NonNull};
use std::sync::atomic::Ordering;

use pyo3_ffi::*;

use super::{OpKind, OpState, Operation};
use crate::num::{count_usize, len_i64, usize_sat};
use crate::py::{
    call1, py_int, set_result_unless_done, write_unraisable, Borrowed, Owned, PyErr, PyResult,
};

/// What a delivery calls: a callback, or (tagged in the pointer's low bit,
/// free because objects are at least 8-byte aligned) an asyncio future to
/// resolve with `True`. Owns one strong reference to the object.
pub(super) struct Target(NonNull<PyObject>);

const FUTURE_TAG: usize = 1;

impl Target {
    fn callback(o: Owned) -> Target {
        Target(o.into_non_null())
    }

    fn future(o: Owned) -> Target {
        let p = o.into_ptr();
        // Pointer arithmetic (not an integer round trip) keeps provenance.
        let tagged = p.cast::<u8>().wrapping_add(FUTURE_TAG).cast::<PyObject>();
        // SAFETY: an object address + 1 is not NULL.
        Target(unsafe { NonNull::new_unchecked(tagged) })
    }

    #[inline]
    fn is_future(&self) -> bool {
        self.0.as_ptr() as usize & FUTURE_TAG != 0
    }

    /// The object (untagged), borrowed from the target.
    #[inline]
    fn object(&self) -> Borrowed<'_> {
        let p = if self.is_future() {
            self.0
                .as_ptr()
                .cast::<u8>()
                .wrapping_sub(FUTURE_TAG)
                .cast::<PyObject>()
        } else {
            self.0.as_ptr()
        };
        // SAFETY: the target owns a strong reference to this object.
        unsafe { Borrowed::from_ptr(p) }
    }

    /// `Py_VISIT` for the op's `tp_traverse`.
    ///
    /// # Safety
    /// Called from `tp_traverse` with its `visit`/`arg`.
    pub(super) unsafe fn visit(&self, visit: visitproc, arg: *mut std::ffi::c_void) -> i32 {
        // SAFETY: a live object, visited with the collector's callback.
        unsafe { visit(self.object().as_ptr(), arg) }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // SAFETY: releases the target's one strong reference; targets are
        // only dropped attached (outside the op's spin lock).
        unsafe { Py_DECREF(self.object().as_ptr()) };
    }
}

impl Operation {
    /// Replaces the delivery target under the op's lock; the previous one is
    /// returned, to be dropped (decref) after the lock is released.
    fn swap_target(&self, new: Option<Target>) -> Option<Target> {
        let _g = self.lock.lock();
        // SAFETY: `target` is only accessed under `lock` (or by GC/dealloc,
        // which run with no other thread using the op).
        unsafe { std::mem::replace(&mut *self.target.get(), new) }
    }

    /// Replaces the context under the op's lock (previous one returned).
    fn swap_context(&self, new: Option<Owned>) -> Option<Owned> {
        let _g = self.lock.lock();
        // SAFETY: `context` is only accessed under `lock` (or by GC/dealloc).
        unsafe { std::mem::replace(&mut *self.context.get(), new) }
    }

    /// A new reference to the Context, if the op has one (`lock`).
    pub(super) fn context_ref(&self) -> Option<Owned> {
        let _g = self.lock.lock();
        // SAFETY: under `lock`; the incref needs no Python call.
        unsafe { (*self.context.get()).clone() }
    }

    /// Both object slots, emptied (GC clear, dealloc).
    pub(super) fn take_slots(&self) -> (Option<Target>, Option<Owned>) {
        let _g = self.lock.lock();
        // SAFETY: both slots are only accessed under `lock`.
        unsafe { ((*self.target.get()).take(), (*self.context.get()).take()) }
    }
}

/// Takes the engine's reference for a freshly claimed op and records the
/// Context that keeps it company until delivery.
///
/// # Safety
/// `op` must have just been claimed by the caller (attached thread); `ctx`
/// a valid object.
pub unsafe fn begin(op: &Operation, ctx: *mut PyObject) {
    // SAFETY: attached; `op` and `ctx` are live objects (caller's contract).
    // The op's own reference is the engine's, released by the delivery or
    // `abort`.
    let ctx = unsafe {
        Py_INCREF(op.as_ptr());
        Owned::from_borrowed(ctx)
    };
    drop(op.swap_context(Some(ctx)));
}

/// Rolls back a claim the backend did not accept: the op is `New` again,
/// retryable with its original payload, and no reference is leaked.
///
/// # Safety
/// `op` must be in flight through [`begin`] and not handed to any engine;
/// caller attached.
pub unsafe fn abort(op: &Operation) {
    // SAFETY: the caller owns the in-flight op's window (never dispatched).
    unsafe {
        op.free_bounce();
        op.reset_io();
    }
    let ctx = op.swap_context(None);
    op.state.store(OpState::New, Ordering::Release);
    drop(ctx);
    // SAFETY: releases the engine's reference taken by `begin`.
    unsafe { Py_DECREF(op.as_ptr()) };
}

/// Retires an op that borrows the caller's buffer and was never handed to
/// an engine (its awaiter was cancelled first, or a deferred batch dropped
/// it): it becomes `Done` with `-ECANCELED` and its buffer export is
/// released now, not when the op dies — the caller's memory is theirs again
/// when the await ends. False (nothing done) unless the op is `New`.
///
/// # Safety
/// Caller attached.
pub unsafe fn retire_unsent(op: &Operation) -> bool {
    if !op.borrows_buffer || !op.try_claim() {
        return false;
    }
    // Claimed and never begun: the caller owns the window.
    // SAFETY: no engine has the op (it was `New`).
    unsafe { op.free_bounce() };
    op.result
        .store(-i64::from(libc::ECANCELED), Ordering::Relaxed);
    let (mut view, vectored) = {
        let _g = op.lock.lock();
        // SAFETY: `view` and `vectored` are only accessed under `lock`; the
        // export moves out, leaving an empty (all-zero) `Py_buffer`.
        let taken = unsafe {
            (
                ptr::replace(op.view.get(), std::mem::zeroed()),
                (*op.vectored.get()).take(),
            )
        };
        op.state.store(OpState::Done, Ordering::Release);
        taken
    };
    drop(vectored); // releases its exports (attached)
    if !view.obj.is_null() {
        // SAFETY: the export taken at construction, released once; attached.
        unsafe { PyBuffer_Release(&raw mut view) };
    }
    true
}

/// Installs `callback` as what the op's delivery calls; the previous target
/// is released exactly once even when several threads race.
///
/// # Safety
/// Caller attached.
pub unsafe fn set_callback(op: &Operation, callback: Borrowed<'_>) -> PyResult<()> {
    // SAFETY: attached (caller's contract); `callback` is a live object.
    if unsafe { PyCallable_Check(callback.as_ptr()) } == 0 {
        return Err(PyErr::value_error(format!(
            "object {} is not callable",
            callback.repr()
        )));
    }
    drop(op.swap_target(Some(Target::callback(callback.to_owned()))));
    Ok(())
}

/// Installs `fut` (a new reference is taken) as what the op's delivery
/// resolves, replacing any callback (`op._set_future(fut)`).
///
/// # Safety
/// Attached; `fut` is an asyncio future.
pub unsafe fn set_future(op: &Operation, fut: *mut PyObject) {
    // SAFETY: `fut` is a live object (caller's contract); attached.
    let fut = unsafe { Owned::from_borrowed(fut) };
    drop(op.swap_target(Some(Target::future(fut))));
}

/// Installs `callback` (replacing the current target) unless the op's
/// completion has already been delivered, atomically with delivery: when it
/// returns true the callback WILL be called exactly once by the delivery;
/// when false, nothing was installed (the op is `Done`).
///
/// # Safety
/// Caller attached.
pub unsafe fn set_callback_if_pending(op: &Operation, callback: Owned) -> bool {
    let old = {
        let _g = op.lock.lock();
        match op.state.load(Ordering::Acquire) {
            // `callback` is dropped (decref) on return, outside the lock.
            OpState::Done => return false,
            // SAFETY: `target` is only accessed under `lock`.
            OpState::New | OpState::InFlight => unsafe {
                (*op.target.get()).replace(Target::callback(callback))
            },
        }
    };
    drop(old);
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
    // SAFETY: `target` is only accessed under `lock`; the incref needs no
    // Python call.
    match unsafe { &*op.target.get() } {
        Some(t) if t.is_future() => Some(t.object().to_owned()),
        Some(_) | None => None,
    }
}

/// Drops the op's callback (or future): its delivery will call nothing.
///
/// # Safety
/// Caller attached.
pub unsafe fn clear_callback(op: &Operation) {
    drop(op.swap_target(None));
}

// ---------------------------------------------------------------------------
// completion

thread_local! {
    static DISCARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, a [`Delivery`] run on this thread discards instead of
/// running the callback or resolving the future. For draining a backend
/// whose event loop is closed: its futures must not be resolved (their
/// callbacks would be scheduled on a dead loop) and nobody waits for the
/// callbacks any more.
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

/// What a recorded completion still owns: the engine's reference to the op,
/// the target, the Context and (if dropped on completion) the payload export.
struct Parts {
    op: Owned,
    target: Option<Target>,
    context: Option<Owned>,
    payload: Option<Py_buffer>,
    /// A vectored op's exports (released with `payload`).
    vectored: Option<Box<super::vectored::Vectored>>,
    arg: i64,
}

impl Parts {
    /// Releases the payload export moved out by `finish` (attached). Done
    /// before the callback runs or the future is resolved: whoever that
    /// wakes (possibly on another thread) finds the buffer released.
    fn release_payload(&mut self) {
        drop(self.vectored.take());
        if let Some(mut view) = self.payload.take() {
            // SAFETY: an export taken by `PyObject_GetBuffer` and moved out
            // of the op by `finish`, released once; attached.
            unsafe { PyBuffer_Release(&raw mut view) };
        }
    }

    /// Drops the references held for the flight (attached).
    fn release(mut self) {
        self.release_payload();
        let Parts {
            op,
            target,
            context,
            ..
        } = self;
        drop(target);
        drop(context);
        drop(op);
    }
}

/// What is left to do after a completion was recorded: call the callback and
/// drop the references. Split from [`finish`] so that a drain can publish a
/// whole batch (and release its locks) before any callback runs.
///
/// Dropping a `Delivery` without [`Delivery::run`] discards it (references
/// released, nothing called) on an attached thread; on a detached one the
/// references are leaked rather than touched without the interpreter.
#[must_use = "a completion must be delivered (`run`) or dropped (`discard`)"]
pub struct Delivery {
    parts: Option<Parts>,
    /// Identity of the op, for engines' bookkeeping.
    op: *mut Operation,
}

/// Records the completion of an in-flight op (`raw` = bytes moved or
/// `-errno` for the engine's window) and publishes `Done`.
///
/// # Safety
/// `op` must be in flight (engine reference held, which moves into the
/// delivery); the caller must be attached to the interpreter and be the only
/// one finishing this op.
pub unsafe fn finish(op: *mut Operation, raw: i64) -> Delivery {
    // SAFETY: a live op (the engine's reference keeps it alive).
    let o = unsafe { &*op };
    let mut res = raw;
    match o.kind {
        OpKind::Read => {
            let data = o.read_data();
            let nbytes = usize_sat(o.nbytes);
            // SAFETY: the engine owns the in-flight op's window.
            let io = unsafe { o.io() };
            if let Some(b) = &io.bounce {
                // Aligned window: the user's bytes start `skip` bytes in.
                if res >= 0 {
                    let n = count_usize(res).saturating_sub(io.skip).min(nbytes);
                    // SAFETY: the block holds the `res` bytes transferred
                    // (≥ skip + n); `data` holds `nbytes` ≥ n; distinct
                    // allocations.
                    unsafe { ptr::copy_nonoverlapping(b.as_ptr().add(io.skip), data, n) };
                    res = len_i64(n);
                }
            }
            // Never expose stale heap memory: zero what was not filled
            // (the caller's own buffer is left as it is, as `readinto` does).
            let filled = count_usize(res);
            if filled < nbytes && !o.is_readinto() {
                // SAFETY: `data` holds `nbytes` bytes; `filled < nbytes`.
                unsafe { ptr::write_bytes(data.add(filled), 0, nbytes - filled) };
            }
        }
        OpKind::Write | OpKind::WriteV => {
            let n = i64::try_from(o.nbytes).unwrap_or(i64::MAX);
            if res > n {
                res = n;
            }
        }
        OpKind::Fsync | OpKind::Fdsync | OpKind::ReadV => {}
    }
    // SAFETY: the engine is done with the window's memory.
    unsafe { o.free_bounce() };
    o.result.store(res, Ordering::Relaxed);
    // The caller's mutable memory is theirs again once the engine is done.
    let drop_payload =
        o.borrows_buffer || (o.kind == OpKind::Write && o.flavor().drop_write_payload);
    let (target, context, payload, vectored) = {
        let _g = o.lock.lock();
        // SAFETY: the three slots are only accessed under `lock`.
        let (target, context, view) = unsafe {
            (
                (*o.target.get()).take(),
                (*o.context.get()).take(),
                &mut *o.view.get(),
            )
        };
        let payload = if drop_payload && !view.obj.is_null() {
            // SAFETY: moves the export out, leaving an empty (all-zero, a
            // valid value of this C struct) `Py_buffer` behind: the export
            // is released exactly once, by the delivery.
            Some(unsafe {
                let taken = ptr::read(view);
                ptr::write(view, std::mem::zeroed());
                taken
            })
        } else {
            None
        };
        // SAFETY: `vectored` is only accessed under `lock` once shared.
        let vectored = unsafe { (*o.vectored.get()).take() };
        // Published under the lock: set_callback_if_pending() either runs
        // before (its callback is taken here) or sees Done.
        o.state.store(OpState::Done, Ordering::Release);
        (target, context, payload, vectored)
    };
    Delivery {
        parts: Some(Parts {
            // SAFETY: the engine's strong reference moves into the delivery.
            op: unsafe { Owned::from_raw(op.cast()) },
            target,
            context,
            payload,
            vectored,
            arg: o.reported_result(res),
        }),
        op,
    }
}

impl Delivery {
    /// The operation this delivery completes (an identity for bookkeeping;
    /// the reference is owned by the delivery until `run`/`discard`).
    pub fn op_ptr(&self) -> *mut Operation {
        self.op
    }

    /// Runs the callback (exceptions go to `sys.unraisablehook`) or resolves
    /// the future, and drops the references held for the flight. Caller
    /// attached. Inside a [`Discarding`] scope (on this thread) it discards
    /// instead.
    pub fn run(mut self) {
        let Some(mut parts) = self.parts.take() else {
            return;
        };
        parts.release_payload();
        if DISCARD.with(|d| d.get()) {
            return parts.release();
        }
        if let Some(t) = &parts.target {
            let target = t.object();
            let r = if t.is_future() {
                // SAFETY: `True` is a static object.
                let value = unsafe { Borrowed::from_ptr(Py_True()) };
                set_result_unless_done(target, value).map(drop)
            } else {
                py_int(parts.arg)
                    .and_then(|arg| call1(target, arg.borrow()))
                    .map(drop)
            };
            if let Err(e) = r {
                e.restore();
                // SAFETY: attached; `target` is alive (held by `parts`).
                unsafe { write_unraisable(target.as_ptr()) };
            }
        }
        parts.release();
    }

    /// Drops the references without calling the callback (used when the
    /// process is shutting down and Python code must not run). Caller
    /// attached.
    pub fn discard(mut self) {
        if let Some(parts) = self.parts.take() {
            parts.release();
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(parts) = self.parts.take() {
            if crate::py::is_attached() {
                parts.release();
            } else {
                // No interpreter to release them with: leaking is the only
                // safe choice (the op and its Context stay alive).
                std::mem::forget(parts);
            }
        }
    }
}
