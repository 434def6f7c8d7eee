//! `_AsyncioBase`: the subclassable native base of the backends'
//! `AsyncioContext`. It holds what `_bind` wires up (Context, loop, future
//! factory), the admission gate and the fairness counters, and makes
//! `read`/`write`/`fsync`/`fdsync`/`submit` return awaitables.

use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Mutex;

use pyo3_ffi::*;

use super::awaitable::new_awaitable;
use super::gate::Gate;
use super::Engine;
use crate::args::Params;
use crate::module::ModState;
use crate::op::{self, OpKind};
use crate::py::typespec::{fastcall, noargs};
use crate::py::{
    call1, none, py_bool, py_str, py_tuple, py_usize, trampoline, trampoline_int, trampoline_void,
    Borrowed, Owned, PyErr, PyResult, Slot, TypeSpec,
};

/// The instance struct of `_AsyncioBase` (and of its Python subclasses,
/// whose own fields follow). Allocated zeroed by `tp_alloc`.
///
/// Object slots, by when they are written (see [`Slot`]):
/// * `op_type`, `awaitable_type`, `ctx_type`: by `tp_new`, before the
///   object is visible; released at dealloc;
/// * `context` … `engine_obj`: once, by `_bind`, before `bound` is
///   published (release/acquire); readers check `bound` first. Released by
///   `tp_clear`/dealloc (after `bound` is cleared);
/// * `reader_ref`: replaced by every `_loop_reader()`; never read outside
///   garbage collection.
#[repr(C)]
pub struct Adapter {
    ob_base: PyObject,
    /// Set by `tp_new` to the module's `&'static Engine`; never changes.
    engine: *const Engine,
    pub(super) op_type: Slot,
    pub(super) awaitable_type: Slot,
    pub(super) ctx_type: Slot,
    pub(super) context: Slot,
    pub(super) loop_: Slot,
    pub(super) create_future: Slot,
    /// `asyncio.Future` when the loop's `create_future` is the stock
    /// `BaseEventLoop.create_future` (then `Future(loop=loop)` is called
    /// directly, skipping a Python-level method); empty otherwise.
    pub(super) future_type: Slot,
    pub(super) call_soon: Slot,
    pub(super) engine_obj: Slot,
    /// A weak reference to the reader callback given to the loop
    /// (`_loop_reader()`); its callback notices the loop closing.
    pub(super) reader_ref: Slot,
    pub(super) deferred: AtomicBool,
    /// `_bind` has started (it runs once per adapter).
    pub(super) binding: AtomicBool,
    pub(super) bound: AtomicBool,
    pub(super) closed: AtomicBool,
    /// Close once idle: `_release()` has been called (or is being called).
    pub(super) released: AtomicBool,
    /// A `_release_if_idle` callback is scheduled on the loop.
    pub(super) release_scheduled: AtomicBool,
    /// The loop was closed with the adapter in use ("loop gone"): nothing
    /// is scheduled on the loop or resolved any more.
    pub(super) dead: AtomicBool,
    pub(super) gate: Mutex<Gate>,
    /// Consecutive operations that completed without suspending, and the
    /// limit after which the loop gets one turn (`MAX_SYNC_STREAK`; 0: off).
    pub(super) sync_streak: AtomicU32,
    pub(super) max_sync_streak: AtomicU32,
    /// Per-iteration budget mode (the adapter class defines `SYNC_BUDGET`;
    /// it then replaces the streak): synchronous completions left in this
    /// loop iteration, and the value a `call_soon` callback refills it to at
    /// the start of the next one. `sync_budget_max < 0`: off.
    pub(super) sync_budget: AtomicI64,
    pub(super) sync_budget_max: AtomicI64,
}

/// The adapter behind an object pointer.
///
/// # Safety
/// `p` is a live instance of `_AsyncioBase` (or a subclass), alive for `'a`.
#[inline]
pub(super) unsafe fn adapter<'a>(p: *mut PyObject) -> &'a Adapter {
    // SAFETY: instances start with the `Adapter` struct (`repr(C)`, the
    // object header first); every field is atomic, a `Slot` or a mutex, so
    // shared access from several threads is sound (caller's contract: live
    // for 'a).
    unsafe { &*p.cast::<Adapter>() }
}

impl Adapter {
    /// The adapter itself, as a Python object (borrowed).
    pub fn as_ptr(&self) -> *mut PyObject {
        ptr::from_ref(self).cast_mut().cast()
    }
    /// `_close_native()` was called: new operations are refused.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
    /// `_bind` completed and the adapter was not cleared since.
    pub fn is_bound(&self) -> bool {
        self.bound.load(Ordering::Acquire)
    }
    /// The backend Context given to `_bind` (borrowed; NULL before).
    pub fn context(&self) -> *mut PyObject {
        self.context.as_ptr()
    }
    /// `deferred` as given to `_bind`.
    pub fn deferred(&self) -> bool {
        self.deferred.load(Ordering::Relaxed)
    }
    /// The backend's own object given to `_bind` (borrowed; may be None;
    /// NULL before `_bind`).
    pub fn engine_obj(&self) -> *mut PyObject {
        self.engine_obj.as_ptr()
    }

    /// `loop.call_soon(callback)`.
    ///
    /// # Safety
    /// Attached; `callback` valid.
    pub unsafe fn call_soon(&self, callback: *mut PyObject) -> PyResult<()> {
        let Some(call_soon) = self.bound_slot(&self.call_soon) else {
            return Err(PyErr::runtime("AsyncioContext is not bound to a loop"));
        };
        // SAFETY: `callback` is a live object (caller's contract).
        call1(call_soon, unsafe { Borrowed::from_ptr(callback) }).map(drop)
    }

    /// A `_bind` slot, if bound.
    #[inline]
    pub(super) fn bound_slot<'a>(&'a self, s: &'a Slot) -> Option<Borrowed<'a>> {
        if self.is_bound() {
            s.get()
        } else {
            None
        }
    }

    pub(super) fn engine(&self) -> &'static Engine {
        // SAFETY: set by `tp_new` to the module's `&'static Engine` before
        // the adapter became visible; never changed.
        unsafe { &*self.engine }
    }
}

// ---------------------------------------------------------------------------
// life of the object

/// Finds the module state of the native base in `tp`'s ancestry (`tp` may
/// be a Python subclass, whose own type has no module).
///
/// # Safety
/// Attached; `tp` is a live type.
unsafe fn state_for(tp: *mut PyTypeObject) -> Option<&'static ModState> {
    let mut t = tp;
    while !t.is_null() {
        // SAFETY: `t` is a live type (the chain of `tp_base` of a live type);
        // a heap type is a `PyHeapTypeObject`; its module's state is a
        // `ModState` when it is ours (same `tp_new`), alive as long as the
        // module, which the type (and so the adapter) keeps alive.
        unsafe {
            // Only our native base has this tp_new *and* a module; a Python
            // subclass inherits the slot but has no module.
            let ours = adapter_new as newfunc as *const () as usize;
            let is_ours = (*t).tp_new.map(|f| f as *const () as usize) == Some(ours);
            if PyType_GetFlags(t) & Py_TPFLAGS_HEAPTYPE != 0 && is_ours {
                let m = (*t.cast::<PyHeapTypeObject>()).ht_module;
                if !m.is_null() {
                    if let Some(st) = ModState::of_module(m).as_ref() {
                        if !st.engine.is_null() {
                            return Some(st);
                        }
                    }
                }
            }
            t = (*t).tp_base;
        }
    }
    None
}

/// # Safety
/// CPython's `tp_new` of `_AsyncioBase` or a subclass: attached, `tp` a live
/// type.
unsafe extern "C" fn adapter_new(
    tp: *mut PyTypeObject,
    _args: *mut PyObject,
    _kwargs: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: CPython calls tp_new attached with a live type.
        let st = unsafe { state_for(tp) }
            .ok_or_else(|| PyErr::type_error("_AsyncioBase: module state not found"))?;
        // SAFETY: `tp` derives from `_AsyncioBase`, so `tp_alloc` returns a
        // zeroed instance at least `size_of::<Adapter>()` bytes big, which
        // nothing else references yet: its fields are initialised in place
        // (zero is already right for the slots and atomics).
        unsafe {
            let alloc = (*tp).tp_alloc.unwrap_or(PyType_GenericAlloc);
            let obj = Owned::from_new(alloc(tp, 0))?;
            let a = obj.as_ptr().cast::<Adapter>();
            ptr::addr_of_mut!((*a).engine).write(st.engine);
            ptr::addr_of_mut!((*a).gate).write(Mutex::new(Gate::new()));
            ptr::addr_of_mut!((*a).sync_budget_max).write(AtomicI64::new(-1));
            let a = &*a;
            a.op_type.set(Borrowed::from_ptr_opt(st.op_type));
            a.awaitable_type
                .set(Borrowed::from_ptr_opt(st.awaitable_type));
            a.ctx_type.set(Borrowed::from_ptr_opt(st.ctx_type));
            Ok(obj)
        }
    })
}

/// # Safety
/// CPython's `tp_traverse` of `_AsyncioBase`: `slf` one of our adapters.
unsafe extern "C" fn adapter_traverse(
    slf: *mut PyObject,
    visit: visitproc,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: CPython traverses one of our adapters (attached / world
    // stopped); the slots and waiters hold live objects, visited with the
    // collector's callback.
    unsafe {
        let a = adapter(slf);
        for s in a.slots() {
            let r = s.visit(visit, arg);
            if r != 0 {
                return r;
            }
        }
        // Waiting futures (the lock is never held across a GC point).
        if let Ok(g) = a.gate.try_lock() {
            for (_, f) in &g.waiters {
                let r = visit(f.as_ptr(), arg);
                if r != 0 {
                    return r;
                }
            }
        }
        visit(Py_TYPE(slf).cast(), arg)
    }
}

impl Adapter {
    /// Every object slot (for traverse).
    fn slots(&self) -> [&Slot; 10] {
        [
            &self.reader_ref,
            &self.future_type,
            &self.op_type,
            &self.awaitable_type,
            &self.ctx_type,
            &self.context,
            &self.loop_,
            &self.create_future,
            &self.call_soon,
            &self.engine_obj,
        ]
    }

    /// Drops what `_bind`/`_loop_reader` stored and the waiters; keeps the
    /// types (needed until dealloc).
    ///
    /// # Safety
    /// Attached, from `tp_clear` or dealloc: no other code uses the slots.
    unsafe fn clear_refs(&self) {
        self.bound.store(false, Ordering::Release);
        let mut dropped: Vec<Owned> = Vec::new();
        for s in [
            &self.context,
            &self.loop_,
            &self.create_future,
            &self.future_type,
            &self.call_soon,
            &self.engine_obj,
            &self.reader_ref,
        ] {
            // SAFETY: no reader (caller's contract).
            dropped.extend(unsafe { s.take() });
        }
        dropped.extend(self.gate_take_waiters());
        drop(dropped);
    }
}

/// # Safety
/// CPython's `tp_clear` of `_AsyncioBase`: attached, `slf` one of our
/// (unreachable) adapters.
unsafe extern "C" fn adapter_clear(slf: *mut PyObject) -> c_int {
    trampoline_int(|| {
        // SAFETY: CPython clears one of our (unreachable) adapters.
        unsafe { adapter(slf).clear_refs() };
        Ok(())
    })
}

/// # Safety
/// CPython's `tp_dealloc` of `_AsyncioBase`: attached, the last reference to
/// `slf` is gone.
unsafe extern "C" fn adapter_dealloc(slf: *mut PyObject) {
    trampoline_void(|| {
        // SAFETY: CPython deallocates one of our adapters: nothing else
        // references it; its fields are dropped in place once, then the
        // memory is freed by the type's `tp_free`.
        unsafe {
            PyObject_GC_UnTrack(slf.cast());
            let a = adapter(slf);
            a.clear_refs();
            for s in [&a.op_type, &a.awaitable_type, &a.ctx_type] {
                drop(s.take());
            }
            ptr::drop_in_place(ptr::addr_of_mut!((*slf.cast::<Adapter>()).gate));
            let tp = Py_TYPE(slf);
            if let Some(free) = (*tp).tp_free {
                free(slf.cast());
            }
            Py_DECREF(tp.cast());
        }
    })
}

// ---------------------------------------------------------------------------
// methods

/// `_close_native()`: new operations are refused from now on; the adapter's
/// `_release()` runs now if nothing is in flight, else once the last
/// operation is over (see "close once idle").
///
/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
unsafe extern "C" fn adapter_close_native(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our adapter type.
        let a = unsafe { adapter(slf) };
        a.closed.store(true, Ordering::Release);
        a.release_if_idle()?;
        Ok(none())
    })
}

/// `_released()`: whether `_release()` has been called.
///
/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
unsafe extern "C" fn adapter_released(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our adapter type.
        let a = unsafe { adapter(slf) };
        Ok(py_bool(a.released.load(Ordering::Acquire)))
    })
}

/// `_process_loop_events()`: the loop's reader callback.
///
/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
pub(super) unsafe extern "C" fn adapter_loop_events(
    slf: *mut PyObject,
    _: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our adapter type (or the reader bound to one).
        let a = unsafe { adapter(slf) };
        if !a.is_bound() {
            return py_usize(0);
        }
        // SAFETY: the engine's contract: called attached with its adapter.
        py_usize(unsafe { (a.engine().loop_events)(a) }?)
    })
}

/// `(in_use, max, waiting)` of the admission gate (tests, diagnostics).
///
/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
unsafe extern "C" fn adapter_gate_state(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        let (u, m, w) = {
            // SAFETY: a method of our adapter type.
            let g = unsafe { adapter(slf) }.gate();
            (g.in_use, g.max, g.waiters.len())
        };
        py_tuple(vec![py_usize(u)?, py_usize(m)?, py_usize(w)?])
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
static READINTO_PARAMS: Params = Params {
    fname: "readinto",
    names: &["buffer", "fd", "offset", "priority"],
    required: 2,
    keywords: true,
};
static READV_PARAMS: Params = Params {
    fname: "readv",
    names: &["buffers", "fd", "offset", "priority"],
    required: 2,
    keywords: true,
};
static WRITEV_PARAMS: Params = Params {
    fname: "writev",
    names: &["buffers", "fd", "offset", "priority"],
    required: 2,
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

/// The constructor of `read`, `write` or `readinto`: `(object, fd,
/// offset=…, priority=…)` parsed with `params`, the op built by `ctor` on the
/// module's Operation type, and its awaitable.
///
/// # Safety
/// A method of our adapter type with CPython's vectorcall arguments.
unsafe fn one_buffer_op(
    slf: *mut PyObject,
    params: &Params,
    ctor: op::OneBufferCtor,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> PyResult<Owned> {
    // SAFETY: forwarded contract; `op_type` is the module's Operation type.
    unsafe {
        let a = adapter(slf);
        let op = op::one_buffer(a.op_type.as_ptr(), params, ctor, args, nargsf, kwnames)?;
        new_awaitable(a, op, None)
    }
}

/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
unsafe extern "C" fn adapter_read(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our adapter type with CPython's vectorcall
        // arguments.
        unsafe { one_buffer_op(slf, &READ_PARAMS, op::new_read, args, nargsf, kwnames) }
    })
}

/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
unsafe extern "C" fn adapter_write(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: as for `read`.
        unsafe { one_buffer_op(slf, &WRITE_PARAMS, op::new_write, args, nargsf, kwnames) }
    })
}

/// `readinto(buffer, fd, offset=0, priority=0)`: the bytes read into the
/// caller's buffer. A cancelled awaiter resumes only once the engine is done
/// with the buffer (`awaitable/cancel.rs`, DESIGN.md §5.5).
///
/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
unsafe extern "C" fn adapter_readinto(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: as for `read`.
        unsafe {
            one_buffer_op(
                slf,
                &READINTO_PARAMS,
                op::new_readinto,
                args,
                nargsf,
                kwnames,
            )
        }
    })
}

/// `readv(buffers, ...)` / `writev(buffers, ...)`: one vectored transfer;
/// cancellation waits for the engine as for `readinto`.
///
/// # Safety
/// A method of our adapter type with CPython's vectorcall arguments.
unsafe fn vectored_method(
    slf: *mut PyObject,
    kind: OpKind,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> PyResult<Owned> {
    let params = if kind == OpKind::ReadV {
        &READV_PARAMS
    } else {
        &WRITEV_PARAMS
    };
    // SAFETY: forwarded contract; `op_type` is the module's Operation type.
    unsafe {
        let [b, fd, off, prio] = params.parse::<4>(args, nargsf, kwnames)?.0;
        let a = adapter(slf);
        let op = op::new_vectored(
            a.op_type.as_ptr(),
            kind,
            Params::req(b)?,
            Params::req(fd)?,
            off,
            prio,
        )?;
        new_awaitable(a, op, None)
    }
}

/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
unsafe extern "C" fn adapter_readv(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    // SAFETY: called by CPython as a method of our adapter type.
    trampoline(|| unsafe { vectored_method(slf, OpKind::ReadV, args, nargsf, kwnames) })
}

/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
unsafe extern "C" fn adapter_writev(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    // SAFETY: called by CPython as a method of our adapter type.
    trampoline(|| unsafe { vectored_method(slf, OpKind::WriteV, args, nargsf, kwnames) })
}

/// `fsync(fd)` / `fdsync(fd)`.
///
/// # Safety
/// A method of our adapter type with CPython's vectorcall arguments.
unsafe fn sync_method(
    slf: *mut PyObject,
    params: &Params,
    kind: OpKind,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> PyResult<Owned> {
    // SAFETY: forwarded contract.
    unsafe {
        let [fd] = params.parse::<1>(args, nargsf, kwnames)?.0;
        let a = adapter(slf);
        let op = op::new_sync(a.op_type.as_ptr(), kind, Params::req(fd)?, None)?;
        new_awaitable(a, op, None)
    }
}

/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
unsafe extern "C" fn adapter_fsync(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    // SAFETY: called by CPython as a method of our adapter type.
    trampoline(|| unsafe { sync_method(slf, &FSYNC_PARAMS, OpKind::Fsync, args, nargsf, kwnames) })
}

/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
unsafe extern "C" fn adapter_fdsync(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    // SAFETY: called by CPython as a method of our adapter type.
    trampoline(|| unsafe {
        sync_method(slf, &FDSYNC_PARAMS, OpKind::Fdsync, args, nargsf, kwnames)
    })
}

/// `submit(op)`: like the base class's coroutine, a wrong argument raises
/// `ValueError` when awaited, not at call time.
///
/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
unsafe extern "C" fn adapter_submit(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our adapter type with CPython's vectorcall
        // arguments.
        let (a, [op]) = unsafe {
            (
                adapter(slf),
                SUBMIT_PARAMS.parse::<1>(args, nargsf, kwnames)?.0,
            )
        };
        let op = Params::req(op)?;
        // SAFETY: `op` is a live object.
        if unsafe { op::is_op(op.as_ptr(), a.op_type.as_ptr()) } {
            return new_awaitable(a, op.to_owned(), None);
        }
        // SAFETY: attached; `ValueError` is a class, the message a str.
        let err = unsafe {
            Owned::from_new(PyObject_CallOneArg(
                PyExc_ValueError,
                py_str("Operation object expected")?.as_ptr(),
            ))?
        };
        new_awaitable(a, crate::py::none(), Some(err))
    })
}

// ---------------------------------------------------------------------------
// the type

pub(super) fn type_spec() -> TypeSpec {
    TypeSpec::new(
        c"caio._AsyncioBase",
        std::mem::size_of::<Adapter>(),
        Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    )
    .doc(c"Native base of the io backends' AsyncioContext: read/write/fsync/fdsync/submit \
return awaitables that complete inline when the backend can.")
    .new_fn(adapter_new)
    .dealloc(adapter_dealloc)
    .traverse(adapter_traverse)
    .clear(adapter_clear)
    .method(fastcall(
        c"read",
        adapter_read,
        0,
        c"read($self, nbytes, fd, offset, priority=0)\n--\n\nAwaitable: the bytes read (fewer at EOF).",
    ))
    .method(fastcall(
        c"write",
        adapter_write,
        0,
        c"write($self, payload, fd, offset, priority=0)\n--\n\nAwaitable: the number of bytes written (may be partial). \
payload: any C-contiguous buffer, used in place.",
    ))
    .method(fastcall(
        c"readinto",
        adapter_readinto,
        0,
        c"readinto($self, buffer, fd, offset=0, priority=0)\n--\n\nAwaitable: the number of bytes read \
into buffer (a writable C-contiguous buffer), fewer at EOF. The buffer is the caller's again when the \
await ends, however it ends: a cancelled read is cancelled in the engine and waited for.",
    ))
    .method(fastcall(
        c"readv",
        adapter_readv,
        0,
        c"readv($self, buffers, fd, offset=0, priority=0)\n--\n\nAwaitable: the number of bytes read \
into buffers (a sequence of at most 1024 writable C-contiguous buffers, filled in order) by one \
vectored read. Cancellation waits for the engine, as for readinto.",
    ))
    .method(fastcall(
        c"writev",
        adapter_writev,
        0,
        c"writev($self, buffers, fd, offset=0, priority=0)\n--\n\nAwaitable: the number of bytes \
written from buffers (a sequence of at most 1024 C-contiguous buffers, in order) by one vectored \
write.",
    ))
    .method(fastcall(
        c"fsync",
        adapter_fsync,
        0,
        c"fsync($self, fd)\n--\n\nAwaitable: None once the file is synced.",
    ))
    .method(fastcall(
        c"fdsync",
        adapter_fdsync,
        0,
        c"fdsync($self, fd)\n--\n\nAwaitable: None once the file data is synced.",
    ))
    .method(fastcall(
        c"submit",
        adapter_submit,
        0,
        c"submit($self, op)\n--\n\nAwaitable: submit an Operation of this backend, return op.get_value().",
    ))
    .method(fastcall(
        c"_bind",
        super::bind::adapter_bind,
        0,
        c"_bind($self, context, loop, max_requests, deferred, engine_obj=None)\n--\n\nWire the native fast path (called once, by _create_context).",
    ))
    .method(noargs(
        c"_process_loop_events",
        adapter_loop_events,
        c"_process_loop_events($self)\n--\n\nThe event loop's reader callback: deliver completed operations; returns \
how many.",
    ))
    .method(noargs(
        c"_loop_reader",
        super::lifecycle::adapter_loop_reader,
        c"_loop_reader($self)\n--\n\nThe callback for loop.add_reader (as _process_loop_events); when the loop \
drops it while closed, operations still in flight are drained without touching the loop and _release() \
is called.",
    ))
    .method(noargs(
        c"_close_native",
        adapter_close_native,
        c"_close_native($self)\n--\n\nRefuse new operations (RuntimeError when awaited); call self._release() \
once no operation is in flight (now, or from a loop callback when the last one is over).",
    ))
    .method(noargs(
        c"_released",
        adapter_released,
        c"_released($self)\n--\n\nWhether _release() has been called (close once idle).",
    ))
    .method(noargs(
        c"_gate_state",
        adapter_gate_state,
        c"_gate_state($self)\n--\n\nAdmission gate counters: (in_use, max, waiting).",
    ))
}

impl Adapter {
    /// Stores the reader's weak reference (`_loop_reader()`).
    ///
    /// # Safety
    /// Attached.
    pub(super) unsafe fn set_reader_ref(&self, wr: Owned) {
        // SAFETY: `reader_ref` is never read outside garbage collection.
        unsafe { self.reader_ref.swap_unread(wr) };
    }
}
