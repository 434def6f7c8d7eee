//! The native asyncio fast path, for backends whose completions are delivered
//! on the event-loop thread.
//!
//! A backend module calls [`init`] with its [`Engine`]. That adds
//! `_AsyncioBase`, a subclassable native type; the Python adapter derives
//! from it *and* from `AsyncioContextBase`:
//!
//! ```python
//! class AsyncioContext(backend._AsyncioBase, AsyncioContextBase): ...
//! ```
//!
//! and, once its Context exists, calls `self._bind(context, loop,
//! max_requests, deferred, engine_obj)`. From then on `read`, `write`,
//! `fsync`, `fdsync` and `submit` are native: they build the Operation (so
//! argument errors raise at call time, API.md §4.1) and return an
//! [`Awaitable`] — a coroutine-like object (`__await__`, `send`, `throw`,
//! `close`; `asyncio.iscoroutine()` accepts it, so do `create_task` and
//! `gather`). Its first step takes an admission slot (the `max_requests`
//! bound, API.md §4.6), hands the op to the engine and — when the op
//! completed inline — returns the value without ever suspending. Otherwise it
//! creates one future, installs it in the op (the backend's drain resolves
//! it, see `op::set_future`) and yields it to the task; the next step returns
//! `op.get_value()`. Cancelling the task cancels the op through the engine;
//! its slot is released once the backend has really finished the op (at
//! once when it never reached the backend), see `hand_slot_to_op`.
//!
//! Fairness for inline completions: by default the loop gets one turn after
//! `MAX_SYNC_STREAK` consecutive ones. An adapter class that defines
//! `SYNC_BUDGET` gets a per-loop-iteration budget instead (see
//! `spend_sync_budget`).
//!
//! `close()` (`_close_native()`) refuses new operations at once and calls
//! the adapter's `_release()` (remove the reader, release the backend) once
//! nothing is in flight any more — see "close once idle" below. If the
//! event loop is closed while operations are still in flight, the adapter
//! notices it through the reader it gave to `add_reader` (`_loop_reader()`)
//! and drains and releases the backend itself — see "loop gone".
//!
//! Per operation this costs one Operation, one Awaitable and — only for ops
//! that do not complete inline — one future; no Python frame runs.

use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3_ffi::*;

use crate::args::Params;
use crate::module::{add_object, ModState};
use crate::op::{self, as_op, OpKind};
use crate::py::{
    trampoline, trampoline_int, trampoline_void, write_unraisable, Borrowed, Interned, Owned,
    PyErr, PyResult,
};

/// What a backend provides to the fast path.
pub struct Engine {
    /// Claims `op` and hands it to the adapter's context. `Ok(false)`: the
    /// op was not accepted (already claimed — in flight or done). The op may
    /// already be `DONE` when this returns (completed inline; its delivery
    /// ran). On `Err` the op must not be in flight.
    pub submit: unsafe fn(a: &Adapter, op: *mut PyObject) -> PyResult<bool>,
    /// Best effort: ask the backend to cancel an in-flight op (its awaiter
    /// is gone). Must not raise; the op completes later either way.
    pub cancel: unsafe fn(a: &Adapter, op: *mut PyObject),
    /// The event loop's reader callback (`_process_loop_events`): deliver
    /// what completed. Returns the number delivered.
    pub loop_events: unsafe fn(a: &Adapter) -> PyResult<usize>,
    /// The event loop is closed while operations may be in flight (see
    /// "loop gone"): cancel what can be cancelled, then deliver every
    /// completion (deliveries run inside an `op::Discarding` scope, so they
    /// only drop their references), blocking with the GIL released, until
    /// nothing is in flight — `true` — or `deadline` passes — `false`: what
    /// is still in flight stays untouched (the kernel may still write into
    /// its memory) and the backend is not released. Must not raise.
    pub shutdown: unsafe fn(a: &Adapter, deadline: Instant) -> bool,
}

/// How long a closed loop's adapter waits for its in-flight operations (see
/// "loop gone"). Only reached when an operation can be neither cancelled nor
/// finished (e.g. a worker thread blocked reading an idle pipe).
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// Waits (GIL released) until `fd` is readable, `slice_ms` passed or
/// `deadline` passed, whichever comes first. Returns false once past the
/// deadline. For [`Engine::shutdown`] implementations.
pub fn wait_readable_until(fd: c_int, deadline: Instant, slice_ms: c_int) -> bool {
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    let left = (deadline - now).as_millis().min(slice_ms.max(1) as u128) as c_int;
    #[cfg(unix)]
    if fd >= 0 {
        crate::py::allow_threads(|| {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            unsafe { libc::poll(&mut p, 1, left) };
        });
        return true;
    }
    // No fd to wait on (or no poll(2): only the Linux engines call this, but
    // the shared crate also builds for Windows): just let the slice pass.
    let _ = fd;
    crate::py::allow_threads(|| std::thread::sleep(Duration::from_millis(left as u64)));
    true
}

// ---------------------------------------------------------------------------
// the adapter base type

/// Admission control: at most `max` operations between submission and
/// completion; later ones wait in FIFO order on a future.
struct Gate {
    in_use: usize,
    max: usize,
    /// Futures of waiting awaitables (strong references). Invariant: the
    /// queue is only non-empty while `in_use == max`.
    waiters: VecDeque<usize>,
}

#[repr(C)]
pub struct Adapter {
    ob_base: PyObject,
    engine: *const Engine,
    op_type: *mut PyObject,
    awaitable_type: *mut PyObject,
    ctx_type: *mut PyObject,
    context: *mut PyObject,
    loop_: *mut PyObject,
    create_future: *mut PyObject,
    /// `asyncio.Future` when the loop's `create_future` is the stock
    /// `BaseEventLoop.create_future` (then `Future(loop=loop)` is called
    /// directly, skipping a Python-level method); null otherwise.
    future_type: *mut PyObject,
    call_soon: *mut PyObject,
    engine_obj: *mut PyObject,
    /// A weak reference to the reader callback given to the loop
    /// (`_loop_reader()`); its callback notices the loop closing.
    reader_ref: *mut PyObject,
    deferred: bool,
    bound: AtomicBool,
    closed: AtomicBool,
    /// Close once idle: `_release()` has been called (or is being called).
    released: AtomicBool,
    /// A `_release_if_idle` callback is scheduled on the loop.
    release_scheduled: AtomicBool,
    /// The loop was closed with the adapter in use ("loop gone"): nothing
    /// is scheduled on the loop or resolved any more.
    dead: AtomicBool,
    gate: Mutex<Gate>,
    /// Consecutive operations that completed without suspending, and the
    /// limit after which the loop gets one turn (`MAX_SYNC_STREAK`; 0: off).
    sync_streak: AtomicU32,
    max_sync_streak: u32,
    /// Per-iteration budget mode (the adapter class defines `SYNC_BUDGET`;
    /// it then replaces the streak): synchronous completions left in this
    /// loop iteration, and the value a `call_soon` callback refills it to at
    /// the start of the next one. `sync_budget_max < 0`: off.
    sync_budget: AtomicI64,
    sync_budget_max: i64,
}

impl Adapter {
    /// The adapter itself, as a Python object (borrowed).
    pub fn as_ptr(&self) -> *mut PyObject {
        self as *const Adapter as *mut PyObject
    }
    /// `_close_native()` was called: new operations are refused.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
    /// The backend Context given to `_bind` (borrowed).
    pub fn context(&self) -> *mut PyObject {
        self.context
    }
    /// `deferred` as given to `_bind`.
    pub fn deferred(&self) -> bool {
        self.deferred
    }
    /// The backend's own object given to `_bind` (borrowed; may be None).
    pub fn engine_obj(&self) -> *mut PyObject {
        self.engine_obj
    }
    /// `loop.call_soon(callback)`.
    ///
    /// # Safety
    /// Attached; `callback` valid.
    pub unsafe fn call_soon(&self, callback: *mut PyObject) -> PyResult<()> {
        Owned::from_new(PyObject_CallOneArg(self.call_soon, callback)).map(drop)
    }

    unsafe fn new_future(&self) -> PyResult<Owned> {
        if !self.bound.load(Ordering::Acquire) || self.create_future.is_null() {
            return Err(PyErr::runtime("AsyncioContext is not bound to a loop"));
        }
        if !self.future_type.is_null() {
            let args = [self.loop_];
            return Owned::from_new(PyObject_Vectorcall(
                self.future_type,
                args.as_ptr(),
                0,
                LOOP_KWNAMES.get()?.as_ptr(),
            ));
        }
        Owned::from_new(PyObject_CallNoArgs(self.create_future))
    }

    fn engine(&self) -> &Engine {
        unsafe { &*self.engine }
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gate_try_acquire(&self) -> bool {
        let mut g = self.gate();
        if g.waiters.is_empty() && g.in_use < g.max {
            g.in_use += 1;
            true
        } else {
            false
        }
    }

    /// Nothing admitted is still in flight: no slot is held (a cancelled
    /// op keeps its slot until the backend has really finished it, see
    /// `hand_slot_to_op`) and nobody waits for one.
    fn gate_idle(&self) -> bool {
        let g = self.gate();
        g.in_use == 0 && g.waiters.is_empty()
    }

    /// Frees a slot, or hands it straight to the first live waiter.
    unsafe fn gate_release(&self) {
        loop {
            let next = {
                let mut g = self.gate();
                if self.dead.load(Ordering::Acquire) {
                    // The loop is closed: its waiters cannot be woken.
                    g.in_use = g.in_use.saturating_sub(1);
                    return;
                }
                match g.waiters.pop_front() {
                    Some(f) => f,
                    None => {
                        g.in_use = g.in_use.saturating_sub(1);
                        let idle = g.in_use == 0;
                        drop(g);
                        if idle && self.is_closed() {
                            // The last op of a closed adapter is over.
                            self.schedule_release();
                        }
                        return;
                    }
                }
            };
            let fut = Owned::from_raw(next as *mut PyObject);
            match set_result_unless_done(fut.borrow(), Py_None()) {
                Ok(true) => return, // slot transferred
                Ok(false) => continue,
                Err(e) => {
                    e.restore();
                    write_unraisable(fut.as_ptr());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// close once idle
//
// `close()` (the adapter's `_close_native()`) refuses new operations at once,
// but the backend resources cannot go while operations are in flight:
// their completions — cancelled ones' included, which still hold their
// admission slot — must be delivered by the loop's reader, or op and Context
// keep each other alive (the op holds its Context; the ring/queue holds the
// op) and the ring, eventfd, AIO context or worker pool leak. So the
// adapter's `_release()` (remove the reader, release the backend) is called
// exactly once, as soon as the closed adapter is idle: by `_close_native()`
// itself when nothing is in flight, otherwise by a loop callback scheduled
// when the last slot is returned. (Never straight from `gate_release`: that
// runs inside a backend's drain, or from a finaliser.) If the loop is closed
// by then, nothing is scheduled: "loop gone" below takes over.

impl Adapter {
    /// Calls `self._release()` once, if closed and idle.
    unsafe fn release_if_idle(&self) -> PyResult<()> {
        if !self.is_closed() || !self.gate_idle() {
            return Ok(());
        }
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let m = PyObject_GetAttrString(self.as_ptr(), c"_release".as_ptr());
        if m.is_null() {
            if PyErr_ExceptionMatches(PyExc_AttributeError) != 0 {
                PyErr_Clear();
                return Ok(()); // nothing to release
            }
            return Err(PyErr::Fetched);
        }
        let m = Owned::from_raw(m);
        Owned::from_new(PyObject_CallNoArgs(m.as_ptr())).map(drop)
    }

    /// Schedules [`Adapter::release_if_idle`] on the loop (thread-safe:
    /// a finaliser may run on any thread).
    unsafe fn schedule_release(&self) {
        if self.released.load(Ordering::Acquire)
            || self.release_scheduled.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let saved = SavedErr::fetch();
        let ok = (|| -> PyResult<()> {
            if !self.bound.load(Ordering::Acquire) || self.loop_.is_null() {
                return Err(PyErr::runtime("not bound"));
            }
            let cb = Owned::from_new(PyCFunction_NewEx(
                ptr::addr_of_mut!(RELEASE_IF_IDLE_DEF),
                self.as_ptr(),
                ptr::null_mut(),
            ))?;
            let cs = Owned::from_new(PyObject_GetAttr(
                self.loop_,
                CALL_SOON_THREADSAFE.get()?.as_ptr(),
            ))?;
            Owned::from_new(PyObject_CallOneArg(cs.as_ptr(), cb.as_ptr())).map(drop)
        })();
        if let Err(e) = ok {
            // No loop to run it (closed): the backend goes at deallocation.
            e.restore();
            PyErr_Clear();
            self.release_scheduled.store(false, Ordering::Release);
        }
        saved.restore();
    }
}

unsafe extern "C" fn release_if_idle_callback(
    adapter_obj: *mut PyObject,
    _: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let a = adapter(adapter_obj);
        a.release_scheduled.store(false, Ordering::Release);
        a.release_if_idle()?;
        Ok(crate::py::none())
    })
}

static mut RELEASE_IF_IDLE_DEF: PyMethodDef = PyMethodDef {
    ml_name: c"_release_if_idle".as_ptr(),
    ml_meth: PyMethodDefPointer {
        PyCFunction: release_if_idle_callback,
    },
    ml_flags: METH_NOARGS,
    ml_doc: ptr::null(),
};

// ---------------------------------------------------------------------------
// loop gone
//
// Operations in flight are delivered only by the loop's reader. When the
// loop is closed before they are over (`asyncio.run()` returning while
// operations of cancelled tasks are still in the kernel, `loop.close()` with
// tasks pending, ...), nobody would ever deliver them: op and Context keep
// each other alive through the backend's native structures, which the
// garbage collector cannot see, and the ring/AIO context/eventfd/worker
// threads leak. Asyncio loops do not tell their readers that they close,
// but they drop them: the reader given to `add_reader` is a native function
// (`_loop_reader()`) under a weak reference whose callback runs when the
// loop lets go of it. If the loop is closed by then, the adapter drains the
// backend synchronously — cancels what it can, waits (GIL released,
// bounded by `SHUTDOWN_WAIT`) for the rest, drops the completions without
// touching the dead loop (no future is resolved, no callback scheduled) —
// and calls `_release()`.

impl Adapter {
    /// The reader went away: if that is because the loop is closed, drain
    /// and release the backend (never raises; errors are dropped).
    unsafe fn on_reader_gone(&self) {
        if is_finalizing() || !self.bound.load(Ordering::Acquire) || self.loop_.is_null() {
            return;
        }
        let saved = SavedErr::fetch();
        let closed = (|| -> PyResult<bool> {
            Ok(is_true(crate::py::call_method(
                Borrowed::from_ptr(self.loop_),
                IS_CLOSED.get()?,
                &[],
            )?))
        })();
        match closed {
            Ok(true) => self.shutdown_dead(),
            Ok(false) => {}
            Err(e) => {
                e.restore();
                PyErr_Clear();
            }
        }
        saved.restore();
    }

    /// The loop is closed: no new operations; drain the backend without
    /// running Python callbacks, then `_release()` it.
    unsafe fn shutdown_dead(&self) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        self.closed.store(true, Ordering::Release);
        if self.released.swap(true, Ordering::AcqRel) {
            return; // released once idle already: nothing in flight
        }
        let _discard = op::Discarding::new();
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        if !(self.engine().shutdown)(self, deadline) {
            // Still in flight: its memory must stay; so does the backend.
            PyErr_Clear();
            return;
        }
        PyErr_Clear();
        let m = PyObject_GetAttrString(self.as_ptr(), c"_release".as_ptr());
        if m.is_null() {
            PyErr_Clear();
            return;
        }
        let m = Owned::from_raw(m);
        if Owned::from_new(PyObject_CallNoArgs(m.as_ptr())).is_err() {
            PyErr_Clear();
        }
    }
}

#[cfg(Py_3_13)]
unsafe fn is_finalizing() -> bool {
    Py_IsFinalizing() != 0
}

#[cfg(not(Py_3_13))]
unsafe fn is_finalizing() -> bool {
    extern "C" {
        fn _Py_IsFinalizing() -> c_int;
    }
    _Py_IsFinalizing() != 0
}

unsafe extern "C" fn reader_gone_callback(
    adapter_obj: *mut PyObject,
    _weakref: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        adapter(adapter_obj).on_reader_gone();
        Ok(crate::py::none())
    })
}

static mut READER_GONE_DEF: PyMethodDef = PyMethodDef {
    ml_name: c"_reader_gone".as_ptr(),
    ml_meth: PyMethodDefPointer {
        PyCFunction: reader_gone_callback,
    },
    ml_flags: METH_O,
    ml_doc: ptr::null(),
};

static mut LOOP_READER_DEF: PyMethodDef = PyMethodDef {
    ml_name: c"_process_loop_events".as_ptr(),
    ml_meth: PyMethodDefPointer {
        PyCFunction: adapter_loop_events,
    },
    ml_flags: METH_NOARGS,
    ml_doc: ptr::null(),
};

/// `_loop_reader()`: the callback to give to `loop.add_reader` (it does what
/// `_process_loop_events` does); the adapter notices when the loop drops it
/// (see "loop gone").
unsafe extern "C" fn adapter_loop_reader(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let reader = Owned::from_new(PyCFunction_NewEx(
            ptr::addr_of_mut!(LOOP_READER_DEF),
            slf,
            ptr::null_mut(),
        ))?;
        let cb = Owned::from_new(PyCFunction_NewEx(
            ptr::addr_of_mut!(READER_GONE_DEF),
            slf,
            ptr::null_mut(),
        ))?;
        let wr = Owned::from_new(PyWeakref_NewRef(reader.as_ptr(), cb.as_ptr()))?;
        let a = slf as *mut Adapter;
        xset(&mut (*a).reader_ref, wr.as_ptr());
        Ok(reader)
    })
}

static IS_CLOSED: Interned = Interned::new(c"is_closed");
static CALL_SOON_THREADSAFE: Interned = Interned::new(c"call_soon_threadsafe");
static CREATE_FUTURE: Interned = Interned::new(c"create_future");

/// `("loop",)`, the keyword names of `Future(loop=...)`.
struct KwNames(std::sync::OnceLock<usize>);

impl KwNames {
    fn get(&self) -> PyResult<Borrowed<'static>> {
        if let Some(&p) = self.0.get() {
            return Ok(unsafe { Borrowed::from_ptr(p as *mut PyObject) });
        }
        let t = crate::py::py_tuple(vec![crate::py::py_str("loop")?])?;
        let kept = *self.0.get_or_init(|| t.into_ptr() as usize);
        Ok(unsafe { Borrowed::from_ptr(kept as *mut PyObject) })
    }
}

static LOOP_KWNAMES: KwNames = KwNames(std::sync::OnceLock::new());

/// `asyncio.Future` if `type(loop).create_future` is the stock
/// `asyncio.BaseEventLoop.create_future`, else `None`.
unsafe fn stock_future_type(lp: *mut PyObject) -> Option<Owned> {
    let r = (|| -> PyResult<Option<Owned>> {
        let asyncio = Owned::from_new(PyImport_ImportModule(c"asyncio".as_ptr()))?;
        let base = Owned::from_new(PyObject_GetAttrString(
            asyncio.as_ptr(),
            c"BaseEventLoop".as_ptr(),
        ))?;
        let stock = Owned::from_new(PyObject_GetAttr(
            base.as_ptr(),
            CREATE_FUTURE.get()?.as_ptr(),
        ))?;
        let mine = Owned::from_new(PyObject_GetAttr(
            Py_TYPE(lp).cast(),
            CREATE_FUTURE.get()?.as_ptr(),
        ))?;
        if mine.as_ptr() != stock.as_ptr() {
            return Ok(None);
        }
        Ok(Some(Owned::from_new(PyObject_GetAttrString(
            asyncio.as_ptr(),
            c"Future".as_ptr(),
        ))?))
    })();
    match r {
        Ok(v) => v,
        Err(e) => {
            e.restore();
            PyErr_Clear();
            None
        }
    }
}
static CALL_SOON: Interned = Interned::new(c"call_soon");
static SET_RESULT: Interned = Interned::new(c"set_result");
static DONE: Interned = Interned::new(c"done");
static CANCELLED: Interned = Interned::new(c"cancelled");
static CANCEL: Interned = Interned::new(c"cancel");
static RESULT: Interned = Interned::new(c"result");
static BLOCKING: Interned = Interned::new(c"_asyncio_future_blocking");

/// `fut.set_result(value)` unless `fut` is done; `Ok(true)` when it was set.
unsafe fn set_result_unless_done(fut: Borrowed<'_>, value: *mut PyObject) -> PyResult<bool> {
    if crate::py::call_method(fut, SET_RESULT.get()?, &[value]).is_ok() {
        return Ok(true);
    }
    let saved = SavedErr::fetch();
    if is_true(crate::py::call_method(fut, DONE.get()?, &[])?) {
        drop(saved); // InvalidStateError: the waiter gave up
        return Ok(false);
    }
    saved.restore();
    Err(PyErr::Fetched)
}

fn is_true(o: Owned) -> bool {
    o.as_ptr() == unsafe { Py_True() }
}

/// The current exception, taken out of the interpreter (restored or
/// dropped later).
struct SavedErr(*mut PyObject, *mut PyObject, *mut PyObject);

impl SavedErr {
    unsafe fn fetch() -> SavedErr {
        let mut s = SavedErr(ptr::null_mut(), ptr::null_mut(), ptr::null_mut());
        PyErr_Fetch(&mut s.0, &mut s.1, &mut s.2);
        s
    }
    unsafe fn restore(self) {
        let s = std::mem::ManuallyDrop::new(self);
        PyErr_Restore(s.0, s.1, s.2);
    }
}

impl Drop for SavedErr {
    fn drop(&mut self) {
        unsafe {
            for p in [self.0, self.1, self.2] {
                if !p.is_null() {
                    Py_DECREF(p);
                }
            }
        }
    }
}

unsafe fn adapter<'a>(p: *mut PyObject) -> &'a Adapter {
    &*(p as *const Adapter)
}

unsafe fn xdecref(p: &mut *mut PyObject) {
    let old = std::mem::replace(p, ptr::null_mut());
    if !old.is_null() {
        Py_DECREF(old);
    }
}

unsafe fn xset(p: &mut *mut PyObject, v: *mut PyObject) {
    if !v.is_null() {
        Py_INCREF(v);
    }
    let old = std::mem::replace(p, v);
    if !old.is_null() {
        Py_DECREF(old);
    }
}

/// Finds the module state of the native base in `tp`'s ancestry (`tp` may
/// be a Python subclass, whose own type has no module).
unsafe fn state_for(tp: *mut PyTypeObject) -> Option<*mut ModState> {
    let mut t = tp;
    while !t.is_null() {
        // Only our native base has this tp_new *and* a module; a Python
        // subclass inherits the slot but has no module.
        let is_ours = (*t).tp_new.map(|f| f as usize) == Some(adapter_new as *const () as usize);
        if PyType_GetFlags(t) & Py_TPFLAGS_HEAPTYPE != 0 && is_ours {
            let m = (*(t as *mut PyHeapTypeObject)).ht_module;
            if !m.is_null() {
                let st = ModState::of_module(m);
                if !st.is_null() && !(*st).engine.is_null() {
                    return Some(st);
                }
            }
        }
        t = (*t).tp_base;
    }
    None
}

unsafe extern "C" fn adapter_new(
    tp: *mut PyTypeObject,
    _args: *mut PyObject,
    _kwargs: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let st = state_for(tp)
            .ok_or_else(|| PyErr::type_error("_AsyncioBase: module state not found"))?;
        let alloc = (*tp).tp_alloc.unwrap_or(PyType_GenericAlloc);
        let obj = Owned::from_new(alloc(tp, 0))?;
        let a = obj.as_ptr() as *mut Adapter;
        (*a).engine = (*st).engine;
        for (slot, v) in [
            (&mut (*a).op_type, (*st).op_type),
            (&mut (*a).awaitable_type, (*st).awaitable_type),
            (&mut (*a).ctx_type, (*st).ctx_type),
        ] {
            xset(slot, v);
        }
        ptr::addr_of_mut!((*a).bound).write(AtomicBool::new(false));
        ptr::addr_of_mut!((*a).sync_streak).write(AtomicU32::new(0));
        (*a).max_sync_streak = 0;
        ptr::addr_of_mut!((*a).sync_budget).write(AtomicI64::new(0));
        (*a).sync_budget_max = -1;
        ptr::addr_of_mut!((*a).closed).write(AtomicBool::new(false));
        ptr::addr_of_mut!((*a).released).write(AtomicBool::new(false));
        ptr::addr_of_mut!((*a).release_scheduled).write(AtomicBool::new(false));
        ptr::addr_of_mut!((*a).dead).write(AtomicBool::new(false));
        ptr::addr_of_mut!((*a).gate).write(Mutex::new(Gate {
            in_use: 0,
            max: 0,
            waiters: VecDeque::new(),
        }));
        Ok(obj)
    })
}

unsafe fn adapter_refs(a: *mut Adapter) -> [*mut *mut PyObject; 10] {
    [
        ptr::addr_of_mut!((*a).reader_ref),
        ptr::addr_of_mut!((*a).future_type),
        ptr::addr_of_mut!((*a).op_type),
        ptr::addr_of_mut!((*a).awaitable_type),
        ptr::addr_of_mut!((*a).ctx_type),
        ptr::addr_of_mut!((*a).context),
        ptr::addr_of_mut!((*a).loop_),
        ptr::addr_of_mut!((*a).create_future),
        ptr::addr_of_mut!((*a).call_soon),
        ptr::addr_of_mut!((*a).engine_obj),
    ]
}

unsafe extern "C" fn adapter_traverse(
    slf: *mut PyObject,
    visit: visitproc,
    arg: *mut c_void,
) -> c_int {
    let a = slf as *mut Adapter;
    for p in adapter_refs(a) {
        if !(*p).is_null() {
            let r = visit(*p, arg);
            if r != 0 {
                return r;
            }
        }
    }
    // Waiting futures (the lock is never held across a GC point).
    if let Ok(g) = (*a).gate.try_lock() {
        for &f in g.waiters.iter() {
            let r = visit(f as *mut PyObject, arg);
            if r != 0 {
                return r;
            }
        }
    }
    visit(Py_TYPE(slf).cast(), arg)
}

unsafe fn adapter_clear_refs(a: *mut Adapter) {
    // Keep the types (needed until dealloc); drop the rest.
    for p in [
        ptr::addr_of_mut!((*a).context),
        ptr::addr_of_mut!((*a).loop_),
        ptr::addr_of_mut!((*a).create_future),
        ptr::addr_of_mut!((*a).future_type),
        ptr::addr_of_mut!((*a).call_soon),
        ptr::addr_of_mut!((*a).engine_obj),
        ptr::addr_of_mut!((*a).reader_ref),
    ] {
        xdecref(&mut *p);
    }
    (*a).bound.store(false, Ordering::Release);
    let waiters: Vec<usize> = {
        let mut g = (*a).gate.lock().unwrap_or_else(|e| e.into_inner());
        g.waiters.drain(..).collect()
    };
    for f in waiters {
        Py_DECREF(f as *mut PyObject);
    }
}

unsafe extern "C" fn adapter_clear(slf: *mut PyObject) -> c_int {
    trampoline_int(|| {
        adapter_clear_refs(slf as *mut Adapter);
        Ok(())
    })
}

unsafe extern "C" fn adapter_dealloc(slf: *mut PyObject) {
    trampoline_void(|| {
        PyObject_GC_UnTrack(slf.cast());
        let a = slf as *mut Adapter;
        adapter_clear_refs(a);
        for p in [
            ptr::addr_of_mut!((*a).op_type),
            ptr::addr_of_mut!((*a).awaitable_type),
            ptr::addr_of_mut!((*a).ctx_type),
        ] {
            xdecref(&mut *p);
        }
        ptr::drop_in_place(ptr::addr_of_mut!((*a).gate));
        let tp = Py_TYPE(slf);
        if let Some(free) = (*tp).tp_free {
            free(slf.cast());
        }
        Py_DECREF(tp.cast());
    })
}

static BIND_PARAMS: Params = Params {
    fname: "_bind",
    names: &["context", "loop", "max_requests", "deferred", "engine_obj"],
    required: 4,
    keywords: true,
};

unsafe extern "C" fn adapter_bind(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let p = BIND_PARAMS.parse::<5>(args, nargsf, kwnames)?;
        let a = slf as *mut Adapter;
        let context = p.get(0).unwrap();
        if Py_TYPE(context.as_ptr()) as *mut PyObject != (*a).ctx_type {
            return Err(PyErr::type_error(format!(
                "_bind: expected this backend's Context, got {}",
                context.type_name()
            )));
        }
        let lp = p.get(1).unwrap();
        let max = crate::args::int_in(p.get(2).unwrap(), "max_requests", 1, isize::MAX as i128)?;
        let deferred = crate::args::truthy(p.get(3).unwrap())?;
        let create_future =
            Owned::from_new(PyObject_GetAttr(lp.as_ptr(), CREATE_FUTURE.get()?.as_ptr()))?;
        let call_soon = Owned::from_new(PyObject_GetAttr(lp.as_ptr(), CALL_SOON.get()?.as_ptr()))?;
        xset(&mut (*a).context, context.as_ptr());
        xset(&mut (*a).loop_, lp.as_ptr());
        xset(&mut (*a).create_future, create_future.as_ptr());
        let ft = stock_future_type(lp.as_ptr());
        xset(
            &mut (*a).future_type,
            ft.as_ref().map_or(ptr::null_mut(), |f| f.as_ptr()),
        );
        xset(&mut (*a).call_soon, call_soon.as_ptr());
        xset(
            &mut (*a).engine_obj,
            p.get(4).map_or(Py_None(), |o| o.as_ptr()),
        );
        (*a).deferred = deferred;
        (*a).gate().max = max as usize;
        // The fairness bound of AsyncioContextBase (class attribute).
        let streak = PyObject_GetAttrString(slf, c"MAX_SYNC_STREAK".as_ptr());
        if streak.is_null() {
            PyErr_Clear();
            (*a).max_sync_streak = 0;
        } else {
            let streak = Owned::from_raw(streak);
            (*a).max_sync_streak =
                crate::args::int_in(streak.borrow(), "MAX_SYNC_STREAK", 0, u32::MAX as i128)?
                    as u32;
        }
        // Optional per-iteration budget (class attribute `SYNC_BUDGET`).
        let budget = PyObject_GetAttrString(slf, c"SYNC_BUDGET".as_ptr());
        if budget.is_null() {
            if PyErr_ExceptionMatches(PyExc_AttributeError) == 0 {
                return Err(PyErr::Fetched);
            }
            PyErr_Clear();
            (*a).sync_budget_max = -1;
        } else {
            let budget = Owned::from_raw(budget);
            (*a).sync_budget_max =
                crate::args::int_in(budget.borrow(), "SYNC_BUDGET", 0, i32::MAX as i128)? as i64;
        }
        (*a).sync_budget
            .store((*a).sync_budget_max, Ordering::Relaxed);
        (*a).closed.store(false, Ordering::Release);
        (*a).released.store(false, Ordering::Release);
        (*a).release_scheduled.store(false, Ordering::Release);
        (*a).dead.store(false, Ordering::Release);
        (*a).bound.store(true, Ordering::Release);
        Ok(crate::py::none())
    })
}

/// `_close_native()`: new operations are refused from now on; the adapter's
/// `_release()` runs now if nothing is in flight, else once the last
/// operation is over (see "close once idle").
unsafe extern "C" fn adapter_close_native(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let a = adapter(slf);
        a.closed.store(true, Ordering::Release);
        a.release_if_idle()?;
        Ok(crate::py::none())
    })
}

/// `_released()`: whether `_release()` has been called.
unsafe extern "C" fn adapter_released(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        Ok(crate::py::py_bool(
            adapter(slf).released.load(Ordering::Acquire),
        ))
    })
}

unsafe extern "C" fn adapter_loop_events(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let a = adapter(slf);
        if !a.bound.load(Ordering::Acquire) {
            return crate::py::py_int(0);
        }
        crate::py::py_int((a.engine().loop_events)(a)? as i64)
    })
}

/// `(in_use, max, waiting)` of the admission gate (tests, diagnostics).
unsafe extern "C" fn adapter_gate_state(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let (u, m, w) = {
            let g = adapter(slf).gate();
            (g.in_use, g.max, g.waiters.len())
        };
        crate::py::py_tuple(vec![
            crate::py::py_int(u as i64)?,
            crate::py::py_int(m as i64)?,
            crate::py::py_int(w as i64)?,
        ])
    })
}

static READ_PARAMS: Params = Params {
    fname: "read",
    names: &["nbytes", "fd", "offset", "priority"],
    required: 3,
    keywords: true,
};
static WRITE_PARAMS: Params = Params {
    fname: "write",
    names: &["payload", "fd", "offset", "priority"],
    required: 3,
    keywords: true,
};
static FSYNC_PARAMS: Params = Params {
    fname: "fsync",
    names: &["fd"],
    required: 1,
    keywords: true,
};
static FDSYNC_PARAMS: Params = Params {
    fname: "fdsync",
    names: &["fd"],
    required: 1,
    keywords: true,
};
static SUBMIT_PARAMS: Params = Params {
    fname: "submit",
    names: &["op"],
    required: 1,
    keywords: true,
};

unsafe extern "C" fn adapter_read(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let p = READ_PARAMS.parse::<4>(args, nargsf, kwnames)?;
        let a = adapter(slf);
        let op = op::new_read(
            a.op_type,
            p.get(0).unwrap(),
            p.get(1).unwrap(),
            p.get(2),
            p.get(3),
        )?;
        new_awaitable(slf, op, ptr::null_mut())
    })
}

unsafe extern "C" fn adapter_write(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let p = WRITE_PARAMS.parse::<4>(args, nargsf, kwnames)?;
        let a = adapter(slf);
        let op = op::new_write(
            a.op_type,
            p.get(0).unwrap(),
            p.get(1).unwrap(),
            p.get(2),
            p.get(3),
        )?;
        new_awaitable(slf, op, ptr::null_mut())
    })
}

unsafe extern "C" fn adapter_fsync(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let p = FSYNC_PARAMS.parse::<1>(args, nargsf, kwnames)?;
        let op = op::new_sync(adapter(slf).op_type, OpKind::Fsync, p.get(0).unwrap(), None)?;
        new_awaitable(slf, op, ptr::null_mut())
    })
}

unsafe extern "C" fn adapter_fdsync(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let p = FDSYNC_PARAMS.parse::<1>(args, nargsf, kwnames)?;
        let op = op::new_sync(
            adapter(slf).op_type,
            OpKind::Fdsync,
            p.get(0).unwrap(),
            None,
        )?;
        new_awaitable(slf, op, ptr::null_mut())
    })
}

/// `submit(op)`: like the base class's coroutine, a wrong argument raises
/// `ValueError` when awaited, not at call time.
unsafe extern "C" fn adapter_submit(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        let p = SUBMIT_PARAMS.parse::<1>(args, nargsf, kwnames)?;
        let op = p.get(0).unwrap();
        if Py_TYPE(op.as_ptr()) as *mut PyObject == adapter(slf).op_type {
            return new_awaitable(slf, op.to_owned(), ptr::null_mut());
        }
        let err = Owned::from_new(PyObject_CallOneArg(
            PyExc_ValueError,
            crate::py::py_str("Operation object expected")?.as_ptr(),
        ))?;
        new_awaitable(slf, Owned::from_borrowed(Py_None()), err.as_ptr())
    })
}

// ---------------------------------------------------------------------------
// the awaitable

const INIT: u8 = 0;
const SLOT_WAIT: u8 = 1;
const OP_WAIT: u8 = 2;
const FINISHED: u8 = 3;
/// Completed synchronously but yielded once to the loop (fairness); the
/// value is returned by the next step.
const YIELDED: u8 = 4;

#[repr(C)]
pub struct Awaitable {
    ob_base: PyObject,
    adapter: *mut PyObject,
    /// The Operation (or None when `error` is set).
    op: *mut PyObject,
    /// The future yielded to the task (admission or completion).
    fut: *mut PyObject,
    /// An exception instance raised by the first step.
    error: *mut PyObject,
    /// The value held back while `YIELDED`.
    value: *mut PyObject,
    state: AtomicU8,
    has_slot: bool,
    /// Guards against two threads stepping it at once.
    running: AtomicBool,
}

unsafe fn new_awaitable(
    adapter_obj: *mut PyObject,
    op: Owned,
    error: *mut PyObject,
) -> PyResult<Owned> {
    let tp = adapter(adapter_obj).awaitable_type as *mut PyTypeObject;
    let obj = Owned::from_new(PyType_GenericAlloc(tp, 0))?;
    let w = obj.as_ptr() as *mut Awaitable;
    Py_INCREF(adapter_obj);
    (*w).adapter = adapter_obj;
    (*w).op = op.into_ptr();
    if !error.is_null() {
        Py_INCREF(error);
        (*w).error = error;
    }
    Ok(obj)
}

enum Step {
    Yield(Owned),
    Return(Owned),
}

/// Marks `fut` as awaited by a task (what `Future.__await__` does) and
/// yields it.
unsafe fn yield_future(w: *mut Awaitable, fut: Owned, state: u8) -> PyResult<Step> {
    if PyObject_SetAttr(fut.as_ptr(), BLOCKING.get()?.as_ptr(), Py_True()) != 0 {
        return Err(PyErr::Fetched);
    }
    xset(&mut (*w).fut, fut.as_ptr());
    set_state(w, state);
    Ok(Step::Yield(fut))
}

unsafe fn set_state(w: *mut Awaitable, state: u8) {
    (*w).state.store(state, Ordering::Relaxed);
}

unsafe fn release_slot(w: *mut Awaitable) {
    if (*w).has_slot {
        (*w).has_slot = false;
        adapter((*w).adapter).gate_release();
    }
}

/// The op is done: free the slot and return its value (or raise its error).
/// `inline`: it completed without the awaitable ever suspending; after
/// `MAX_SYNC_STREAK` of those in a row the loop gets one turn first, so a
/// task looping over page-cache hits cannot starve the others.
unsafe fn finish(w: *mut Awaitable, inline: bool) -> PyResult<Step> {
    release_slot(w);
    xdecref(&mut (*w).fut);
    set_state(w, FINISHED);
    let v = op::get_value(as_op((*w).op))?;
    let a = adapter((*w).adapter);
    let yield_once = if a.sync_budget_max >= 0 {
        inline && spend_sync_budget(w)
    } else if !inline {
        a.sync_streak.store(0, Ordering::Relaxed);
        false
    } else if a.max_sync_streak > 0
        && a.sync_streak.fetch_add(1, Ordering::Relaxed) + 1 >= a.max_sync_streak
    {
        a.sync_streak.store(0, Ordering::Relaxed);
        true
    } else {
        false
    };
    if yield_once {
        (*w).value = v.into_ptr();
        set_state(w, YIELDED);
        // A bare yield: the task reschedules itself with call_soon.
        return Ok(Step::Yield(crate::py::none()));
    }
    Ok(Step::Return(v))
}

/// Budget mode: one synchronous completion spent; true when the awaiting
/// task must yield once. Once this iteration's budget is used up every task
/// yields after each synchronous completion, and the budget is refilled by a
/// `call_soon` callback — at the start of the next iteration, before the
/// tasks that yielded run again. Unlike a streak limit this bounds the whole
/// iteration, however many tasks share the adapter.
unsafe fn spend_sync_budget(w: *mut Awaitable) -> bool {
    let a = adapter((*w).adapter);
    let left = a.sync_budget.fetch_sub(1, Ordering::Relaxed) - 1;
    if left > 0 {
        return false;
    }
    if left == 0 {
        let cb = if !a.bound.load(Ordering::Acquire) {
            ptr::null_mut()
        } else {
            PyCFunction_NewEx(
                ptr::addr_of_mut!(REFILL_BUDGET_DEF),
                (*w).adapter,
                ptr::null_mut(),
            )
        };
        let scheduled = !cb.is_null() && {
            let cb = Owned::from_raw(cb);
            a.call_soon(cb.as_ptr()).is_ok()
        };
        if !scheduled {
            // No loop to run it (closed?): refill now rather than never.
            PyErr_Clear();
            a.sync_budget.store(a.sync_budget_max, Ordering::Relaxed);
        }
    }
    true
}

unsafe extern "C" fn refill_budget_callback(
    adapter_obj: *mut PyObject,
    _: *mut PyObject,
) -> *mut PyObject {
    let a = adapter(adapter_obj);
    a.sync_budget.store(a.sync_budget_max, Ordering::Relaxed);
    crate::py::none().into_ptr()
}

static mut REFILL_BUDGET_DEF: PyMethodDef = PyMethodDef {
    ml_name: c"_refill_sync_budget".as_ptr(),
    ml_meth: PyMethodDefPointer {
        PyCFunction: refill_budget_callback,
    },
    ml_flags: METH_NOARGS,
    ml_doc: ptr::null(),
};

unsafe fn submit_op(w: *mut Awaitable) -> PyResult<Step> {
    let a = adapter((*w).adapter);
    let opp = (*w).op;
    match (a.engine().submit)(a, opp) {
        Ok(true) => {}
        Ok(false) => {
            release_slot(w);
            set_state(w, FINISHED);
            return Err(PyErr::new(
                crate::py::Exc::Custom(PyExc_OSError),
                "Operation was not submitted",
            ));
        }
        Err(e) => {
            release_slot(w);
            set_state(w, FINISHED);
            return Err(e);
        }
    }
    let o = as_op(opp);
    if o.state() == op::DONE {
        return finish(w, true); // completed inline: no future, no suspension
    }
    wait_for_op(w)
}

/// Installs a fresh future in the in-flight op and yields it.
unsafe fn wait_for_op(w: *mut Awaitable) -> PyResult<Step> {
    let a = adapter((*w).adapter);
    let o = as_op((*w).op);
    let fut = match a.new_future() {
        Ok(f) => f,
        Err(e) => {
            if a.bound.load(Ordering::Acquire) {
                (a.engine().cancel)(a, (*w).op);
            }
            release_slot(w);
            set_state(w, FINISHED);
            return Err(e);
        }
    };
    op::set_future(o, fut.as_ptr());
    if o.state() == op::DONE {
        // Delivered by another thread between the check and the install.
        return finish(w, false);
    }
    yield_future(w, fut, OP_WAIT)
}

unsafe fn send_step(w: *mut Awaitable) -> PyResult<Step> {
    let a = adapter((*w).adapter);
    match (*w).state.load(Ordering::Relaxed) {
        INIT => {
            if !(*w).error.is_null() {
                set_state(w, FINISHED);
                let e = std::mem::replace(&mut (*w).error, ptr::null_mut());
                PyErr_SetObject(Py_TYPE(e).cast(), e);
                Py_DECREF(e);
                return Err(PyErr::Fetched);
            }
            if a.closed.load(Ordering::Acquire) || !a.bound.load(Ordering::Acquire) {
                set_state(w, FINISHED);
                return Err(PyErr::runtime(
                    "AsyncioContext is closed: create a new one to submit operations",
                ));
            }
            if a.gate_try_acquire() {
                (*w).has_slot = true;
                return submit_op(w);
            }
            let fut = a.new_future()?;
            {
                let mut g = a.gate();
                Py_INCREF(fut.as_ptr());
                g.waiters.push_back(fut.as_ptr() as usize);
            }
            yield_future(w, fut, SLOT_WAIT)
        }
        SLOT_WAIT => {
            let fut = Owned::from_raw(std::mem::replace(&mut (*w).fut, ptr::null_mut()));
            if !is_true(crate::py::call_method(fut.borrow(), DONE.get()?, &[])?) {
                // Resumed without the future being done: keep waiting.
                return yield_future(w, fut, SLOT_WAIT);
            }
            if is_true(crate::py::call_method(fut.borrow(), CANCELLED.get()?, &[])?) {
                set_state(w, FINISHED);
                // Raises CancelledError.
                crate::py::call_method(fut.borrow(), RESULT.get()?, &[])?;
                return Err(PyErr::runtime("admission future cancelled"));
            }
            (*w).has_slot = true; // handed over by gate_release
            if a.closed.load(Ordering::Acquire) || !a.bound.load(Ordering::Acquire) {
                release_slot(w);
                set_state(w, FINISHED);
                return Err(PyErr::runtime(
                    "AsyncioContext is closed: create a new one to submit operations",
                ));
            }
            submit_op(w)
        }
        OP_WAIT => {
            if as_op((*w).op).state() == op::DONE {
                finish(w, false)
            } else {
                wait_for_op(w)
            }
        }
        YIELDED => {
            set_state(w, FINISHED);
            let v = std::mem::replace(&mut (*w).value, ptr::null_mut());
            Ok(Step::Return(Owned::from_raw(v)))
        }
        _ => Err(PyErr::runtime("cannot reuse already awaited coroutine")),
    }
}

/// Gives up whatever the awaitable waits for (thrown into, closed or
/// finalised): a waiting admission is withdrawn (or a granted slot returned),
/// an in-flight op is cancelled and its slot released. Runs with no
/// exception set.
unsafe fn abandon(w: *mut Awaitable) {
    let a = adapter((*w).adapter);
    match (*w).state.load(Ordering::Relaxed) {
        SLOT_WAIT => {
            let fut = std::mem::replace(&mut (*w).fut, ptr::null_mut());
            if !fut.is_null() {
                let fut = Owned::from_raw(fut);
                let granted = crate::py::call_method(fut.borrow(), DONE.get().unwrap(), &[])
                    .map(is_true)
                    .unwrap_or(false)
                    && !crate::py::call_method(fut.borrow(), CANCELLED.get().unwrap(), &[])
                        .map(is_true)
                        .unwrap_or(true);
                if granted {
                    (*w).has_slot = true;
                } else {
                    // The gate skips cancelled futures.
                    let _ = crate::py::call_method(fut.borrow(), CANCEL.get().unwrap(), &[]);
                }
                PyErr_Clear();
            }
            release_slot(w);
        }
        OP_WAIT => {
            xdecref(&mut (*w).fut);
            // (The adapter may already have been cleared by the GC.)
            if as_op((*w).op).state() != op::DONE && a.bound.load(Ordering::Acquire) {
                (a.engine().cancel)(a, (*w).op);
                PyErr_Clear();
            }
            // The op may still be running in the backend: its slot is
            // returned when the backend really finishes it, not now, or
            // cancelled-but-running ops would pile up beyond max_requests
            // (API.md 4.6: no capacity errors however many are cancelled).
            if (*w).has_slot && hand_slot_to_op(w) {
                (*w).has_slot = false;
            }
            release_slot(w);
        }
        YIELDED => xdecref(&mut (*w).value),
        _ => {}
    }
    set_state(w, FINISHED);
}

unsafe extern "C" fn release_slot_callback(
    adapter_obj: *mut PyObject,
    _result: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        adapter(adapter_obj).gate_release();
        Ok(crate::py::none())
    })
}

static mut RELEASE_SLOT_DEF: PyMethodDef = PyMethodDef {
    ml_name: c"_release_slot".as_ptr(),
    ml_meth: PyMethodDefPointer {
        PyCFunction: release_slot_callback,
    },
    ml_flags: METH_O,
    ml_doc: ptr::null(),
};

/// Makes the op's delivery release the awaitable's admission slot. False if
/// the op is not in flight (the caller releases it now).
unsafe fn hand_slot_to_op(w: *mut Awaitable) -> bool {
    let o = as_op((*w).op);
    // Only an op still claimed by the backend can hold it: a DONE op has
    // finished, and one the backend rolled back to NEW (a deferred batch
    // that never reached the kernel, a refused submission) never will.
    if o.state() != op::IN_FLIGHT {
        return false;
    }
    let cb = PyCFunction_NewEx(
        ptr::addr_of_mut!(RELEASE_SLOT_DEF),
        (*w).adapter,
        ptr::null_mut(),
    );
    if cb.is_null() {
        PyErr_Clear();
        return false; // no memory: release now rather than never
    }
    op::set_callback_if_pending(o, Owned::from_raw(cb))
}

struct Running(*mut Awaitable);

impl Running {
    unsafe fn enter(w: *mut Awaitable) -> PyResult<Running> {
        if (*w)
            .running
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(PyErr::value_error("coroutine already executing"));
        }
        Ok(Running(w))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        unsafe { (*self.0).running.store(false, Ordering::Release) };
    }
}

unsafe extern "C" fn aw_am_send(
    slf: *mut PyObject,
    _arg: *mut PyObject,
    result: *mut *mut PyObject,
) -> PySendResult {
    let w = slf as *mut Awaitable;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _g = Running::enter(w)?;
        send_step(w)
    }));
    match r {
        Ok(Ok(Step::Yield(v))) => {
            *result = v.into_ptr();
            PySendResult::PYGEN_NEXT
        }
        Ok(Ok(Step::Return(v))) => {
            *result = v.into_ptr();
            PySendResult::PYGEN_RETURN
        }
        Ok(Err(e)) => {
            e.restore();
            *result = ptr::null_mut();
            PySendResult::PYGEN_ERROR
        }
        Err(_) => {
            PyErr::runtime("caio internal error (Rust panic) in an awaitable").restore();
            *result = ptr::null_mut();
            PySendResult::PYGEN_ERROR
        }
    }
}

/// `StopIteration(value)` as the way an iterator returns a value.
unsafe fn stop_iteration(v: Owned) -> PyErr {
    if v.as_ptr() != Py_None() {
        // A 1-tuple: exactly `value`, even when it is a tuple/exception itself.
        if let Ok(args) = crate::py::py_tuple(vec![v]) {
            let exc = PyObject_Call(PyExc_StopIteration, args.as_ptr(), ptr::null_mut());
            if !exc.is_null() {
                PyErr_SetObject(PyExc_StopIteration, exc);
                Py_DECREF(exc);
            }
        }
    } else {
        PyErr_SetNone(PyExc_StopIteration);
    }
    PyErr::Fetched
}

unsafe fn step_to_py(r: PyResult<Step>) -> PyResult<Owned> {
    match r? {
        Step::Yield(v) => Ok(v),
        Step::Return(v) => Err(stop_iteration(v)),
    }
}

unsafe extern "C" fn aw_iternext(slf: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let w = slf as *mut Awaitable;
        let _g = Running::enter(w)?;
        step_to_py(send_step(w))
    })
}

unsafe extern "C" fn aw_send(slf: *mut PyObject, value: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let w = slf as *mut Awaitable;
        let _g = Running::enter(w)?;
        if value != Py_None() && (*w).state.load(Ordering::Relaxed) == INIT {
            return Err(PyErr::type_error(
                "can't send non-None value to a just-started coroutine",
            ));
        }
        step_to_py(send_step(w))
    })
}

unsafe extern "C" fn aw_throw(
    slf: *mut PyObject,
    args: *mut *mut PyObject,
    nargsf: Py_ssize_t,
) -> *mut PyObject {
    trampoline(|| {
        let w = slf as *mut Awaitable;
        let nargs = PyVectorcall_NARGS(nargsf as usize) as usize;
        if !(1..=3).contains(&nargs) {
            return Err(PyErr::type_error(format!(
                "throw expected 1 to 3 arguments, got {}",
                nargs
            )));
        }
        let typ = *args;
        let val = if nargs > 1 {
            *args.add(1)
        } else {
            ptr::null_mut()
        };
        let _g = Running::enter(w)?;
        // Normalise like generator.throw(): an instance, or a class (+ value).
        if PyExceptionInstance_Check(typ) != 0 {
            if !val.is_null() && val != Py_None() {
                return Err(PyErr::type_error(
                    "instance exception may not have a separate value",
                ));
            }
        } else if PyExceptionClass_Check(typ) == 0 {
            return Err(PyErr::type_error(format!(
                "exceptions must be classes or instances deriving from BaseException, not {}",
                Borrowed::from_ptr(typ).type_name()
            )));
        }
        abandon(w);
        if PyExceptionInstance_Check(typ) != 0 {
            PyErr_SetObject(Py_TYPE(typ).cast(), typ);
        } else if val.is_null() || val == Py_None() {
            PyErr_SetNone(typ);
        } else {
            PyErr_SetObject(typ, val);
        }
        Err(PyErr::Fetched)
    })
}

unsafe extern "C" fn aw_close(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let w = slf as *mut Awaitable;
        let _g = Running::enter(w)?;
        abandon(w);
        Ok(crate::py::none())
    })
}

unsafe extern "C" fn aw_await(slf: *mut PyObject) -> *mut PyObject {
    Py_INCREF(slf);
    slf
}

unsafe extern "C" fn aw_finalize(slf: *mut PyObject) {
    let w = slf as *mut Awaitable;
    let st = (*w).state.load(Ordering::Relaxed);
    if st != SLOT_WAIT && st != OP_WAIT {
        return;
    }
    let saved = SavedErr::fetch();
    trampoline_void(|| abandon(w));
    saved.restore();
}

unsafe extern "C" fn aw_traverse(slf: *mut PyObject, visit: visitproc, arg: *mut c_void) -> c_int {
    let w = slf as *mut Awaitable;
    for p in [(*w).adapter, (*w).op, (*w).fut, (*w).error, (*w).value] {
        if !p.is_null() {
            let r = visit(p, arg);
            if r != 0 {
                return r;
            }
        }
    }
    visit(Py_TYPE(slf).cast(), arg)
}

unsafe extern "C" fn aw_clear(slf: *mut PyObject) -> c_int {
    let w = slf as *mut Awaitable;
    // `adapter` and `op` stay until dealloc (abandon() may still need them
    // if finalisation runs after clear); they cannot close a cycle alone.
    xdecref(&mut (*w).fut);
    xdecref(&mut (*w).error);
    xdecref(&mut (*w).value);
    0
}

unsafe extern "C" fn aw_dealloc(slf: *mut PyObject) {
    trampoline_void(|| {
        if PyObject_CallFinalizerFromDealloc(slf) != 0 {
            return; // resurrected
        }
        PyObject_GC_UnTrack(slf.cast());
        let w = slf as *mut Awaitable;
        xdecref(&mut (*w).fut);
        xdecref(&mut (*w).error);
        xdecref(&mut (*w).value);
        xdecref(&mut (*w).op);
        xdecref(&mut (*w).adapter);
        let tp = Py_TYPE(slf);
        if let Some(free) = (*tp).tp_free {
            free(slf.cast());
        }
        Py_DECREF(tp.cast());
    })
}

unsafe extern "C" fn aw_repr(slf: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let w = slf as *mut Awaitable;
        let state = match (*w).state.load(Ordering::Relaxed) {
            INIT => "created",
            SLOT_WAIT => "waiting for a slot",
            OP_WAIT => "in flight",
            YIELDED => "done, yielding once",
            _ => "finished",
        };
        let op = if (*w).op.is_null() {
            "None".to_owned()
        } else {
            Borrowed::from_ptr((*w).op).repr()
        };
        crate::py::py_str(&format!(
            "<caio operation awaitable at {:#x} ({}): {}>",
            slf as usize, state, op
        ))
    })
}

fn aw_name(slf: *mut PyObject) -> &'static str {
    unsafe {
        let w = slf as *mut Awaitable;
        if !(*w).error.is_null() || (*w).op.is_null() || (*w).op == Py_None() {
            "submit"
        } else {
            as_op((*w).op).kind.mode()
        }
    }
}

unsafe extern "C" fn aw_get_name(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| crate::py::py_str(aw_name(slf)))
}

unsafe extern "C" fn aw_get_qualname(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    trampoline(|| crate::py::py_str(&format!("AsyncioContext.{}", aw_name(slf))))
}

unsafe extern "C" fn aw_get_op(slf: *mut PyObject, _: *mut c_void) -> *mut PyObject {
    Py_INCREF((*(slf as *mut Awaitable)).op);
    (*(slf as *mut Awaitable)).op
}

// ---------------------------------------------------------------------------
// type specs and registration

const PY_AM_SEND: c_int = 81;

fn meth(
    name: &'static std::ffi::CStr,
    meth: PyMethodDefPointer,
    flags: c_int,
    doc: &'static std::ffi::CStr,
) -> PyMethodDef {
    PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: meth,
        ml_flags: flags,
        ml_doc: doc.as_ptr(),
    }
}

struct Specs {
    adapter: PyType_Spec,
    awaitable: PyType_Spec,
}
unsafe impl Send for Specs {}
unsafe impl Sync for Specs {}

fn specs() -> &'static Specs {
    static SPECS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let p = *SPECS.get_or_init(|| Box::into_raw(Box::new(build_specs())) as usize);
    unsafe { &*(p as *const Specs) }
}

fn build_specs() -> Specs {
    let fastkw = METH_FASTCALL | METH_KEYWORDS;
    let adapter_methods: &'static mut [PyMethodDef] = Box::leak(
        vec![
            meth(
                c"read",
                PyMethodDefPointer { PyCFunctionFastWithKeywords: adapter_read },
                fastkw,
                c"read(nbytes, fd, offset, priority=0)\n--\n\nAwaitable: the bytes read (fewer at EOF).",
            ),
            meth(
                c"write",
                PyMethodDefPointer { PyCFunctionFastWithKeywords: adapter_write },
                fastkw,
                c"write(payload, fd, offset, priority=0)\n--\n\nAwaitable: the number of bytes written (may be partial).",
            ),
            meth(
                c"fsync",
                PyMethodDefPointer { PyCFunctionFastWithKeywords: adapter_fsync },
                fastkw,
                c"fsync(fd)\n--\n\nAwaitable: None once the file is synced.",
            ),
            meth(
                c"fdsync",
                PyMethodDefPointer { PyCFunctionFastWithKeywords: adapter_fdsync },
                fastkw,
                c"fdsync(fd)\n--\n\nAwaitable: None once the file data is synced.",
            ),
            meth(
                c"submit",
                PyMethodDefPointer { PyCFunctionFastWithKeywords: adapter_submit },
                fastkw,
                c"submit(op)\n--\n\nAwaitable: submit an Operation of this backend, return op.get_value().",
            ),
            meth(
                c"_bind",
                PyMethodDefPointer { PyCFunctionFastWithKeywords: adapter_bind },
                fastkw,
                c"_bind(context, loop, max_requests, deferred, engine_obj=None)\n--\n\nWire the native fast path (called by _create_context).",
            ),
            meth(
                c"_process_loop_events",
                PyMethodDefPointer { PyCFunction: adapter_loop_events },
                METH_NOARGS,
                c"_process_loop_events() -> int\n--\n\nThe event loop's reader callback: deliver completed operations.",
            ),
            meth(
                c"_loop_reader",
                PyMethodDefPointer { PyCFunction: adapter_loop_reader },
                METH_NOARGS,
                c"_loop_reader()\n--\n\nThe callback for loop.add_reader (as _process_loop_events); when the loop \
drops it while closed, operations still in flight are drained without touching the loop and _release() \
is called.",
            ),
            meth(
                c"_close_native",
                PyMethodDefPointer { PyCFunction: adapter_close_native },
                METH_NOARGS,
                c"_close_native()\n--\n\nRefuse new operations (RuntimeError when awaited); call self._release() \
once no operation is in flight (now, or from a loop callback when the last one is over).",
            ),
            meth(
                c"_released",
                PyMethodDefPointer { PyCFunction: adapter_released },
                METH_NOARGS,
                c"_released() -> bool\n--\n\nWhether _release() has been called (close once idle).",
            ),
            meth(
                c"_gate_state",
                PyMethodDefPointer { PyCFunction: adapter_gate_state },
                METH_NOARGS,
                c"_gate_state() -> (in_use, max, waiting)\n--\n\nAdmission gate counters.",
            ),
            PyMethodDef::zeroed(),
        ]
        .into_boxed_slice(),
    );
    let adapter_slots: &'static mut [PyType_Slot] = Box::leak(
        vec![
            PyType_Slot {
                slot: Py_tp_doc,
                pfunc: c"Native base of the io backends' AsyncioContext: read/write/fsync/fdsync/submit \
return awaitables that complete inline when the backend can."
                    .as_ptr() as *mut c_void,
            },
            PyType_Slot { slot: Py_tp_new, pfunc: adapter_new as *mut c_void },
            PyType_Slot { slot: Py_tp_dealloc, pfunc: adapter_dealloc as *mut c_void },
            PyType_Slot { slot: Py_tp_traverse, pfunc: adapter_traverse as *mut c_void },
            PyType_Slot { slot: Py_tp_clear, pfunc: adapter_clear as *mut c_void },
            PyType_Slot { slot: Py_tp_methods, pfunc: adapter_methods.as_mut_ptr().cast() },
            PyType_Slot { slot: 0, pfunc: ptr::null_mut() },
        ]
        .into_boxed_slice(),
    );
    let aw_methods: &'static mut [PyMethodDef] = Box::leak(
        vec![
            meth(
                c"send",
                PyMethodDefPointer { PyCFunction: aw_send },
                METH_O,
                c"send(value)\n--\n\nAdvance the operation (coroutine protocol).",
            ),
            meth(
                c"throw",
                PyMethodDefPointer { PyCFunctionFast: aw_throw },
                METH_FASTCALL,
                c"throw(typ[, val[, tb]])\n--\n\nAbandon the operation (cancelling it in the kernel) and raise.",
            ),
            meth(
                c"close",
                PyMethodDefPointer { PyCFunction: aw_close },
                METH_NOARGS,
                c"close()\n--\n\nAbandon the operation (cancelling it in the kernel).",
            ),
            PyMethodDef::zeroed(),
        ]
        .into_boxed_slice(),
    );
    let aw_getset: &'static mut [PyGetSetDef] = Box::leak(
        vec![
            PyGetSetDef {
                name: c"operation".as_ptr(),
                get: Some(aw_get_op),
                set: None,
                doc: c"the Operation being awaited".as_ptr(),
                closure: ptr::null_mut(),
            },
            PyGetSetDef {
                name: c"__name__".as_ptr(),
                get: Some(aw_get_name),
                set: None,
                doc: c"the operation kind (shown in task reprs)".as_ptr(),
                closure: ptr::null_mut(),
            },
            PyGetSetDef {
                name: c"__qualname__".as_ptr(),
                get: Some(aw_get_qualname),
                set: None,
                doc: c"AsyncioContext.<kind> (shown in task reprs)".as_ptr(),
                closure: ptr::null_mut(),
            },
            PyGetSetDef {
                name: ptr::null(),
                get: None,
                set: None,
                doc: ptr::null(),
                closure: ptr::null_mut(),
            },
        ]
        .into_boxed_slice(),
    );
    let aw_slots: &'static mut [PyType_Slot] = Box::leak(
        vec![
            PyType_Slot {
                slot: Py_tp_doc,
                pfunc: c"An I/O operation in progress: await it (or wrap it in a task). Coroutine-like: \
__await__, send, throw, close."
                    .as_ptr() as *mut c_void,
            },
            PyType_Slot { slot: Py_tp_dealloc, pfunc: aw_dealloc as *mut c_void },
            PyType_Slot { slot: Py_tp_traverse, pfunc: aw_traverse as *mut c_void },
            PyType_Slot { slot: Py_tp_clear, pfunc: aw_clear as *mut c_void },
            PyType_Slot { slot: Py_tp_finalize, pfunc: aw_finalize as *mut c_void },
            PyType_Slot { slot: Py_tp_repr, pfunc: aw_repr as *mut c_void },
            PyType_Slot { slot: Py_tp_iter, pfunc: aw_await as *mut c_void },
            PyType_Slot { slot: Py_tp_iternext, pfunc: aw_iternext as *mut c_void },
            PyType_Slot { slot: Py_am_await, pfunc: aw_await as *mut c_void },
            PyType_Slot { slot: PY_AM_SEND, pfunc: aw_am_send as *mut c_void },
            PyType_Slot { slot: Py_tp_methods, pfunc: aw_methods.as_mut_ptr().cast() },
            PyType_Slot { slot: Py_tp_getset, pfunc: aw_getset.as_mut_ptr().cast() },
            PyType_Slot { slot: 0, pfunc: ptr::null_mut() },
        ]
        .into_boxed_slice(),
    );
    Specs {
        adapter: PyType_Spec {
            name: c"caio._AsyncioBase".as_ptr(),
            basicsize: std::mem::size_of::<Adapter>() as c_int,
            itemsize: 0,
            flags: (Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC) as _,
            slots: adapter_slots.as_mut_ptr(),
        },
        awaitable: PyType_Spec {
            name: c"caio.OperationAwaitable".as_ptr(),
            basicsize: std::mem::size_of::<Awaitable>() as c_int,
            itemsize: 0,
            flags: (Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION)
                as _,
            slots: aw_slots.as_mut_ptr(),
        },
    }
}

/// Adds the native asyncio fast path to a backend module (after
/// `init_common`): the `_AsyncioBase` type driven by `engine`.
///
/// # Safety
/// Called from a module exec slot, attached, after `module::init_common`.
pub unsafe fn init(module: *mut PyObject, engine: &'static Engine) -> PyResult<()> {
    let st = ModState::of_module(module);
    let sp = specs() as *const Specs as *mut Specs;
    let aw = Owned::from_new(PyType_FromModuleAndSpec(
        module,
        &mut (*sp).awaitable,
        ptr::null_mut(),
    ))?;
    let ad = Owned::from_new(PyType_FromModuleAndSpec(
        module,
        &mut (*sp).adapter,
        ptr::null_mut(),
    ))?;
    add_object(module, c"_AsyncioBase", ad.clone())?;
    add_object(module, c"OperationAwaitable", aw.clone())?;
    (*st).engine = engine;
    (*st).awaitable_type = aw.into_ptr();
    (*st).adapter_type = ad.into_ptr();
    Ok(())
}
