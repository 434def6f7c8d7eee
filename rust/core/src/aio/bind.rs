//! Wiring an adapter to its event loop: `_bind` (run once, by the Python
//! adapter's `_create_context`) stores the Context, the loop and its
//! future factory, and the fairness settings; `Adapter::new_future` makes
//! the futures operations wait on.

use std::sync::atomic::Ordering;

use pyo3_ffi::*;

use super::adapter::{adapter, Adapter};
use crate::args::{int_in, truthy, Params};
use crate::py::{
    call0, none, py_str, py_tuple, trampoline, Borrowed, Interned, LazyObject, Owned, PyErr,
    PyResult,
};

impl Adapter {
    /// A fresh future of the adapter's loop.
    pub(super) fn new_future(&self) -> PyResult<Owned> {
        let (Some(lp), Some(create_future)) = (
            self.bound_slot(&self.loop_),
            self.bound_slot(&self.create_future),
        ) else {
            return Err(PyErr::runtime("AsyncioContext is not bound to a loop"));
        };
        if let Some(ft) = self.future_type.get() {
            let args = [lp.as_ptr()];
            // SAFETY: attached (crate invariant); `Future(loop=lp)`: one
            // keyword argument named by the `("loop",)` tuple.
            return unsafe {
                Owned::from_new(PyObject_Vectorcall(
                    ft.as_ptr(),
                    args.as_ptr(),
                    0,
                    LOOP_KWNAMES.get()?.as_ptr(),
                ))
            };
        }
        call0(create_future)
    }
}

/// `("loop",)`, the keyword names of `Future(loop=...)`.
static LOOP_KWNAMES: LazyObject = LazyObject::new(|| py_tuple(vec![py_str("loop")?]));
static CREATE_FUTURE: Interned = Interned::new(c"create_future");
static CALL_SOON: Interned = Interned::new(c"call_soon");

/// `asyncio.Future` if `type(loop).create_future` is the stock
/// `asyncio.BaseEventLoop.create_future`, else `None`.
fn stock_future_type(lp: Borrowed<'_>) -> Option<Owned> {
    let r = (|| -> PyResult<Option<Owned>> {
        // SAFETY: attached (crate invariant); static NUL-terminated names;
        // `lp` is a live object.
        unsafe {
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
                Py_TYPE(lp.as_ptr()).cast(),
                CREATE_FUTURE.get()?.as_ptr(),
            ))?;
            if mine.as_ptr() != stock.as_ptr() {
                return Ok(None);
            }
            Ok(Some(Owned::from_new(PyObject_GetAttrString(
                asyncio.as_ptr(),
                c"Future".as_ptr(),
            ))?))
        }
    })();
    r.unwrap_or_else(|e| {
        e.restore();
        crate::py::clear_error();
        None
    })
}

static BIND_PARAMS: Params = Params {
    fname: "_bind",
    names: &["context", "loop", "max_requests", "deferred", "engine_obj"],
    required: 4,
    keywords: true,
};

/// An optional integer class attribute in `0..=max`: `Ok(None)` when
/// absent (or, unless `strict`, when looking it up fails in any way).
fn class_int(
    slf: Borrowed<'_>,
    name: &'static std::ffi::CStr,
    max: i128,
    strict: bool,
) -> PyResult<Option<i128>> {
    // SAFETY: attached (crate invariant); static NUL-terminated name.
    let v = unsafe { PyObject_GetAttrString(slf.as_ptr(), name.as_ptr()) };
    if v.is_null() {
        // SAFETY: attached, an exception is set.
        if strict && unsafe { PyErr_ExceptionMatches(PyExc_AttributeError) } == 0 {
            return Err(PyErr::Fetched);
        }
        crate::py::clear_error();
        return Ok(None);
    }
    // SAFETY: a new reference.
    let v = unsafe { Owned::from_raw(v) };
    int_in(v.borrow(), crate::args::cstr_name(name), 0, max).map(Some)
}

/// `_bind(context, loop, max_requests, deferred, engine_obj=None)`: wires
/// the fast path. Runs once per adapter (a second call raises
/// `RuntimeError`): what it stores is read without locks afterwards.
///
/// # Safety
/// A method of `_AsyncioBase` called by CPython: attached, `slf` one of our
/// adapters, the arguments CPython's.
pub(super) unsafe extern "C" fn adapter_bind(
    slf: *mut PyObject,
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
    kwnames: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our adapter type: `slf` is one, the arguments
        // come from CPython's vectorcall.
        let (a, [context, lp, max, deferred, engine_obj]) = unsafe {
            (
                adapter(slf),
                BIND_PARAMS.parse::<5>(args, nargsf, kwnames)?.0,
            )
        };
        let (context, lp) = (Params::req(context)?, Params::req(lp)?);
        // SAFETY: `context` is a live object.
        if unsafe { Py_TYPE(context.as_ptr()) }.cast::<PyObject>() != a.ctx_type.as_ptr() {
            return Err(PyErr::type_error(format!(
                "_bind: expected this backend's Context, got {}",
                context.type_name()
            )));
        }
        let max = int_in(Params::req(max)?, "max_requests", 1, isize::MAX as i128)?;
        let deferred = truthy(Params::req(deferred)?)?;
        // SAFETY: attached; `lp` is a live object, the names interned.
        let (create_future, call_soon) = unsafe {
            (
                Owned::from_new(PyObject_GetAttr(lp.as_ptr(), CREATE_FUTURE.get()?.as_ptr()))?,
                Owned::from_new(PyObject_GetAttr(lp.as_ptr(), CALL_SOON.get()?.as_ptr()))?,
            )
        };
        let future_type = stock_future_type(lp);
        // SAFETY: `slf` is a live object.
        let me = unsafe { Borrowed::from_ptr(slf) };
        // The fairness bound of AsyncioContextBase (class attribute).
        let streak = class_int(me, c"MAX_SYNC_STREAK", i128::from(u32::MAX), false)?.unwrap_or(0);
        // Optional per-iteration budget (class attribute `SYNC_BUDGET`).
        let budget = class_int(me, c"SYNC_BUDGET", i128::from(i32::MAX), true)?;

        // Everything is computed: store it, once, before publishing `bound`.
        if a.binding.swap(true, Ordering::AcqRel) {
            return Err(PyErr::runtime(
                "_bind: this AsyncioContext is already bound",
            ));
        }
        // SAFETY: `binding` makes this the only writer ever, and nothing
        // reads these slots before `bound` is published below.
        unsafe {
            a.context.set(Some(context));
            a.loop_.set(Some(lp));
            a.create_future.set(Some(create_future.borrow()));
            a.future_type.set(future_type.as_ref().map(Owned::borrow));
            a.call_soon.set(Some(call_soon.borrow()));
            a.engine_obj
                .set(Some(engine_obj.unwrap_or_else(none_borrowed)));
        }
        a.deferred.store(deferred, Ordering::Relaxed);
        // In range 1..=isize::MAX.
        a.gate().max = usize::try_from(max).unwrap_or(usize::MAX);
        a.max_sync_streak
            .store(u32::try_from(streak).unwrap_or(u32::MAX), Ordering::Relaxed);
        let budget_max = budget.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
        a.sync_budget_max.store(budget_max, Ordering::Relaxed);
        a.sync_budget.store(budget_max, Ordering::Relaxed);
        a.bound.store(true, Ordering::Release);
        Ok(none())
    })
}

fn none_borrowed() -> Borrowed<'static> {
    // SAFETY: `None` is an immortal static object.
    unsafe { Borrowed::from_ptr(Py_None()) }
}
