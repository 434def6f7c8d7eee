//! Shared foundation of caio's native backends.
//!
//! * [`py`]: typed object references, the error type, the one panic →
//!   exception path, calls into Python, the type-spec builder;
//! * [`args`]: vectorcall argument parsing and range-checked integers;
//! * [`num`]: integer conversions that keep (or check) raw bits;
//! * [`sync`]: poison-tolerant locking, the per-op spin lock, the atomic
//!   life-cycle state wrapper;
//! * [`op`]: the `Operation` type (constructors, properties, `get_value`,
//!   `set_callback`, repr, GC, one-shot life cycle, I/O window);
//! * [`module`]: module state and multi-phase init ([`backend_module!`]);
//! * [`context`]: the object every backend's `Context` is (header, weak
//!   references, the engine state), its allocation and deallocation;
//! * [`pool`]: the worker pool (thread_aio's engine, linux_aio's fallback)
//!   with direct or event-loop (queued) completion delivery;
//! * [`aio`]: the native asyncio fast path (awaitable operations, admission
//!   gate, subclassable adapter base) for loop-thread delivery backends;
//! * [`fork`]: the fork generation and every at-fork hook;
//! * [`direct`]: the O_DIRECT policy (alignment, aligned retry, bounce
//!   memory);
//! * [`sys`]: errno helpers, positional I/O, wake-up fds, kernel version;
//! * [`test_hooks`]: `CAIO_TEST_*` environment hooks (cargo feature
//!   `test-hooks`).
//!
//! A backend crate adds only its engine and its `Context` type's state,
//! constructor and methods.
//!
//! Unsafe code: every `unsafe` block states, in the comment above it, which
//! invariant it relies on; every `unsafe fn` documents its contract under
//! `# Safety`. The crate-wide invariant the safe Python helpers rely on
//! (code touching Python objects runs attached) is described in [`py`].

pub use pyo3_ffi;

pub mod aio;
pub mod args;
pub mod context;
pub mod direct;
pub mod fork;
pub mod module;
pub mod num;
pub mod op;
#[cfg(target_os = "linux")]
pub mod pathop;
pub mod pool;
pub mod py;
pub mod sync;
pub mod sys;
pub mod test_hooks;

/// Registers (once per process) the `atexit` hook that lets worker pools
/// finish and then keeps them from attaching to a finalising interpreter,
/// and (where `os.register_at_fork` exists) the fork hooks that keep workers
/// from attaching while `os.fork()` runs ([`fork::register_python_hooks`]).
///
/// # Safety
/// Caller attached.
pub unsafe fn register_process_hooks() -> py::PyResult<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    // SAFETY: attached (caller's contract).
    unsafe {
        pool::register_atexit()?;
        fork::register_python_hooks()
    }
}
