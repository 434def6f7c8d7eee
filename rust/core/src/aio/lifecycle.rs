//! How an adapter lets go of its backend: "close once idle" and "loop gone".
//!
//! # Close once idle
//! `close()` (the adapter's `_close_native()`) refuses new operations at
//! once, but the backend resources cannot go while operations are in
//! flight: their completions — cancelled ones' included, which still hold
//! their admission slot — must be delivered by the loop's reader, or op and
//! Context keep each other alive (the op holds its Context; the ring/queue
//! holds the op) and the ring, eventfd, AIO context or worker pool leak. So
//! the adapter's `_release()` (remove the reader, release the backend) is
//! called exactly once, as soon as the closed adapter is idle: by
//! `_close_native()` itself when nothing is in flight, otherwise by a loop
//! callback scheduled when the last slot is returned. (Never straight from
//! `gate_release`: that runs inside a backend's drain, or from a
//! finaliser.) If the loop is closed by then, nothing is scheduled: "loop
//! gone" takes over.
//!
//! # Loop gone
//! Operations in flight are delivered only by the loop's reader. When the
//! loop is closed before they are over (`asyncio.run()` returning while
//! operations of cancelled tasks are still in the kernel, `loop.close()`
//! with tasks pending, ...), nobody would ever deliver them: op and Context
//! keep each other alive through the backend's native structures, which the
//! garbage collector cannot see, and the ring/AIO context/eventfd/worker
//! threads leak. Asyncio loops do not tell their readers that they close,
//! but they drop them: the reader given to `add_reader` is a native
//! function (`_loop_reader()`) under a weak reference whose callback runs
//! when the loop lets go of it. If the loop is closed by then, the adapter
//! drains the backend synchronously — cancels what it can, waits (GIL
//! released, bounded by [`SHUTDOWN_WAIT`]) for the rest, drops the
//! completions without touching the dead loop (no future is resolved, no
//! callback scheduled) — and calls `_release()`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use pyo3_ffi::*;

use super::adapter::{adapter, adapter_loop_events, Adapter};
use super::SHUTDOWN_WAIT;
use crate::op;
use crate::py::{
    call0, call_method, clear_error, is_finalizing, none, trampoline, Interned, MethodDef, Owned,
    PyErr, PyResult, SavedErr,
};

static IS_CLOSED: Interned = Interned::new(c"is_closed");
static CALL_SOON_THREADSAFE: Interned = Interned::new(c"call_soon_threadsafe");

/// `self._release`, if the (Python) adapter class defines it.
fn release_method(a: &Adapter) -> PyResult<Option<Owned>> {
    // SAFETY: attached (crate invariant); the adapter is a live object and
    // the name a static NUL-terminated string.
    let m = unsafe { PyObject_GetAttrString(a.as_ptr(), c"_release".as_ptr()) };
    if m.is_null() {
        // SAFETY: attached; an exception is set.
        if unsafe { PyErr_ExceptionMatches(PyExc_AttributeError) } != 0 {
            clear_error();
            return Ok(None); // nothing to release
        }
        return Err(PyErr::Fetched);
    }
    // SAFETY: a new reference.
    Ok(Some(unsafe { Owned::from_raw(m) }))
}

impl Adapter {
    /// Calls `self._release()` once, if closed and idle.
    pub(super) fn release_if_idle(&self) -> PyResult<()> {
        if !self.is_closed() || !self.gate_idle() {
            return Ok(());
        }
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        match release_method(self)? {
            Some(m) => call0(m.borrow()).map(drop),
            None => Ok(()),
        }
    }

    /// Schedules [`Adapter::release_if_idle`] on the loop (thread-safe:
    /// a finaliser may run on any thread). Caller attached.
    pub(super) fn schedule_release(&self) {
        if self.released.load(Ordering::Acquire)
            || self.release_scheduled.swap(true, Ordering::AcqRel)
        {
            return;
        }
        // SAFETY: attached (caller); the guard is restored below.
        let saved = unsafe { SavedErr::fetch() };
        let ok = (|| -> PyResult<()> {
            let lp = self
                .bound_slot(&self.loop_)
                .ok_or_else(|| PyErr::runtime("not bound"))?;
            // SAFETY: attached; the callback is bound to this live adapter.
            let cb = unsafe { RELEASE_IF_IDLE_DEF.new_function(self.as_ptr())? };
            // SAFETY: attached; `lp` is a live object, the name interned.
            let cs = unsafe {
                Owned::from_new(PyObject_GetAttr(
                    lp.as_ptr(),
                    CALL_SOON_THREADSAFE.get()?.as_ptr(),
                ))?
            };
            crate::py::call1(cs.borrow(), cb.borrow()).map(drop)
        })();
        if let Err(e) = ok {
            // No loop to run it (closed): the backend goes at deallocation.
            e.restore();
            clear_error();
            self.release_scheduled.store(false, Ordering::Release);
        }
        saved.restore();
    }

    /// The reader went away: if that is because the loop is closed, drain
    /// and release the backend (never raises; errors are dropped).
    fn on_reader_gone(&self) {
        if is_finalizing() {
            return;
        }
        let Some(lp) = self.bound_slot(&self.loop_) else {
            return;
        };
        // SAFETY: attached (a loop callback); restored below.
        let saved = unsafe { SavedErr::fetch() };
        let closed = IS_CLOSED
            .get()
            .and_then(|name| call_method(lp, name, &[]))
            .map(|r| r.borrow().is_true_singleton());
        match closed {
            Ok(true) => self.shutdown_dead(),
            Ok(false) => {}
            Err(e) => {
                e.restore();
                clear_error();
            }
        }
        saved.restore();
    }

    /// The loop is closed: no new operations; drain the backend without
    /// running Python callbacks, then `_release()` it.
    fn shutdown_dead(&self) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        self.closed.store(true, Ordering::Release);
        if self.released.swap(true, Ordering::AcqRel) {
            return; // released once idle already: nothing in flight
        }
        let _discard = op::Discarding::new();
        let wait = crate::test_hooks::env_parse::<u64>("CAIO_TEST_SHUTDOWN_WAIT_MS")
            .map_or(SHUTDOWN_WAIT, std::time::Duration::from_millis);
        let deadline = Instant::now() + wait;
        // SAFETY: the engine's contract: called attached with its adapter.
        let drained = unsafe { (self.engine().shutdown)(self, deadline) };
        clear_error();
        if !drained {
            // Still in flight: its memory must stay; so does the backend.
            return;
        }
        if let Ok(Some(m)) = release_method(self) {
            let _ = call0(m.borrow());
        }
        clear_error();
    }
}

/// # Safety
/// A builtin function bound to one of our adapters (`MethodDef::new_function`),
/// called by CPython attached.
unsafe extern "C" fn release_if_idle_callback(
    adapter_obj: *mut PyObject,
    _: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: the function is bound to one of our adapters.
        let a = unsafe { adapter(adapter_obj) };
        a.release_scheduled.store(false, Ordering::Release);
        a.release_if_idle()?;
        Ok(none())
    })
}

static RELEASE_IF_IDLE_DEF: MethodDef =
    MethodDef::noargs(c"_release_if_idle", release_if_idle_callback);

/// # Safety
/// A builtin function bound to one of our adapters (`MethodDef::new_function`),
/// called by CPython attached.
unsafe extern "C" fn reader_gone_callback(
    adapter_obj: *mut PyObject,
    _weakref: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: the function is bound to one of our adapters.
        unsafe { adapter(adapter_obj) }.on_reader_gone();
        Ok(none())
    })
}

static READER_GONE_DEF: MethodDef = MethodDef::onearg(c"_reader_gone", reader_gone_callback);
static LOOP_READER_DEF: MethodDef = MethodDef::noargs(c"_process_loop_events", adapter_loop_events);

/// `_loop_reader()`: the callback to give to `loop.add_reader` (it does what
/// `_process_loop_events` does); the adapter notices when the loop drops it
/// (see "loop gone").
///
/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
pub(super) unsafe extern "C" fn adapter_loop_reader(
    slf: *mut PyObject,
    _: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our adapter type: both functions are bound to
        // this live adapter (and keep it alive); the weak reference's
        // callback is a live callable.
        unsafe {
            let reader = LOOP_READER_DEF.new_function(slf)?;
            let cb = READER_GONE_DEF.new_function(slf)?;
            let wr = Owned::from_new(PyWeakref_NewRef(reader.as_ptr(), cb.as_ptr()))?;
            adapter(slf).set_reader_ref(wr);
            Ok(reader)
        }
    })
}
