//! Fairness for operations that complete inline (without the awaitable ever
//! suspending, e.g. page-cache hits): a task looping over them would never
//! give the event loop a turn. By default the loop gets one turn after
//! `MAX_SYNC_STREAK` consecutive inline completions of an adapter. An
//! adapter class that defines `SYNC_BUDGET` gets a per-loop-iteration budget
//! instead (`spend_sync_budget`).

use std::sync::atomic::Ordering;

use pyo3_ffi::PyObject;

use super::adapter::{adapter, Adapter};
use crate::py::{clear_error, none, trampoline, MethodDef};

/// One more completion of `a`'s operations; `inline`: it completed without
/// suspending. True when the awaiting task must yield once to the loop
/// before returning the value.
pub(super) fn must_yield(a: &Adapter, inline: bool) -> bool {
    if a.sync_budget_max.load(Ordering::Relaxed) >= 0 {
        return inline && spend_sync_budget(a);
    }
    if !inline {
        a.sync_streak.store(0, Ordering::Relaxed);
        return false;
    }
    let max = a.max_sync_streak.load(Ordering::Relaxed);
    if max > 0 && a.sync_streak.fetch_add(1, Ordering::Relaxed) + 1 >= max {
        a.sync_streak.store(0, Ordering::Relaxed);
        return true;
    }
    false
}

/// Budget mode: one synchronous completion spent; true when the awaiting
/// task must yield once. Once this iteration's budget is used up every task
/// yields after each synchronous completion, and the budget is refilled by a
/// `call_soon` callback — at the start of the next iteration, before the
/// tasks that yielded run again. Unlike a streak limit this bounds the whole
/// iteration, however many tasks share the adapter.
fn spend_sync_budget(a: &Adapter) -> bool {
    let left = a.sync_budget.fetch_sub(1, Ordering::Relaxed) - 1;
    if left > 0 {
        return false;
    }
    if left == 0 {
        let scheduled = a.is_bound()
            // SAFETY: attached; the callback is bound to the live adapter.
            && unsafe { REFILL_BUDGET_DEF.new_function(a.as_ptr()) }
                .and_then(|cb| {
                    // SAFETY: attached; `cb` is a live callable.
                    unsafe { a.call_soon(cb.as_ptr()) }
                })
                .is_ok();
        if !scheduled {
            // No loop to run it (closed?): refill now rather than never.
            clear_error();
            refill(a);
        }
    }
    true
}

fn refill(a: &Adapter) {
    a.sync_budget
        .store(a.sync_budget_max.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// # Safety
/// A builtin function bound to one of our adapters (`MethodDef::new_function`),
/// called by CPython attached.
unsafe extern "C" fn refill_budget_callback(
    adapter_obj: *mut PyObject,
    _: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: the function is bound to one of our adapters.
        refill(unsafe { adapter(adapter_obj) });
        Ok(none())
    })
}

static REFILL_BUDGET_DEF: MethodDef =
    MethodDef::noargs(c"_refill_sync_budget", refill_budget_callback);
