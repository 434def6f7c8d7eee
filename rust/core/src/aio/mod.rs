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
//! max_requests, deferred, engine_obj)` (once). From then on `read`,
//! `write`, `fsync`, `fdsync` and `submit` are native: they build the
//! Operation (so argument errors raise at call time, DESIGN.md §5.2) and return
//! an [`awaitable`] that takes an admission slot ([`gate`]), hands the op to
//! the engine and completes inline when it can.
//!
//! `close()` (`_close_native()`) refuses new operations at once and calls
//! the adapter's `_release()` (remove the reader, release the backend) once
//! nothing is in flight any more; if the event loop is closed while
//! operations are still in flight, the adapter notices it through the
//! reader it gave to `add_reader` and drains and releases the backend itself
//! — see [`lifecycle`].
//!
//! Per operation this costs one Operation, one Awaitable and — only for ops
//! that do not complete inline — one future; no Python frame runs.
//!
//! * [`adapter`]: the `_AsyncioBase` type;
//! * [`bind`]: `_bind`, the loop and its futures;
//! * [`awaitable`]: the awaitable and its steps;
//! * [`gate`]: admission control (`max_requests`);
//! * [`fairness`]: when an inline completion yields once to the loop;
//! * [`lifecycle`]: close once idle, loop gone.

use std::ffi::c_int;
use std::time::{Duration, Instant};

use pyo3_ffi::PyObject;

use crate::module::{add_object, ModState};
use crate::py::{PyResult, SpecCache};

pub mod adapter;
pub mod awaitable;
pub mod bind;
pub mod fairness;
pub mod gate;
pub mod lifecycle;

pub use adapter::Adapter;
pub use awaitable::Awaitable;

/// What a backend provides to the fast path.
///
/// Contract of every function: core calls it attached, with the adapter of
/// the module the engine was installed in ([`init`]) and, for `submit` and
/// `cancel`, an Operation of that module.
pub struct Engine {
    /// Claims `op` and hands it to the adapter's context. `Ok(false)`: the
    /// op was not accepted (already claimed — in flight or done). The op may
    /// already be `Done` when this returns (completed inline; its delivery
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
/// deadline. For [`Engine::shutdown`] implementations (caller attached).
pub fn wait_readable_until(fd: c_int, deadline: Instant, slice_ms: c_int) -> bool {
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    let slice = u128::try_from(slice_ms.max(1)).unwrap_or(1);
    let left = c_int::try_from((deadline - now).as_millis().min(slice)).unwrap_or(c_int::MAX);
    #[cfg(unix)]
    if fd >= 0 {
        crate::py::allow_threads(|| {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one live `pollfd` local; no Python involved.
            unsafe { libc::poll(&raw mut p, 1, left) };
        });
        return true;
    }
    // No fd to wait on (or no poll(2): only the Linux engines call this, but
    // the shared crate also builds for Windows): just let the slice pass.
    let _ = fd;
    let ms = u64::try_from(left).unwrap_or(0);
    crate::py::allow_threads(|| std::thread::sleep(Duration::from_millis(ms)));
    true
}

/// Adds the native asyncio fast path to a backend module (after
/// `init_common`): the `_AsyncioBase` type driven by `engine`.
///
/// # Safety
/// Called from a module exec slot, attached, after `module::init_common`.
pub unsafe fn init(module: *mut PyObject, engine: &'static Engine) -> PyResult<()> {
    // Built once per process (module re-execution reuses them).
    static SPECS: SpecCache = SpecCache::new();
    let aw_spec = SPECS.get_or_build(0, awaitable::type_spec);
    let ad_spec = SPECS.get_or_build(1, adapter::type_spec);
    // SAFETY: attached, a module being executed (caller's contract); the
    // specs' functions match their slots.
    let (aw, ad) = unsafe { (aw_spec.create(module)?, ad_spec.create(module)?) };
    // SAFETY: attached, `module` valid.
    unsafe {
        add_object(module, c"_AsyncioBase", ad.clone())?;
        add_object(module, c"OperationAwaitable", aw.clone())?;
    }
    // SAFETY: our module being executed: its state is ours to fill (after
    // `init_common`, so the other fields are set).
    let st = unsafe { &mut *ModState::of_module(module) };
    st.engine = engine;
    st.awaitable_type = aw.into_ptr();
    st.adapter_type = ad.into_ptr();
    Ok(())
}
