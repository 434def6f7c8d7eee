//! Everything that happens around `fork()`, in one place.
//!
//! * The **fork generation**: a counter bumped in every child. Contexts
//!   remember it at creation and refuse to work in another generation,
//!   because their kernel objects and worker threads belong to the parent.
//! * **`pthread_atfork` handlers**, registered once per process (per backend
//!   library: core is linked into each one separately). Core's own — the
//!   generation bump, the worker pool's process-wide counters, the O_DIRECT
//!   bounce allocator's lock — and any a backend adds with [`register`].
//! * **`os.register_at_fork` hooks** ([`register_python_hooks`]): Python-level
//!   hooks that run attached around `os.fork()`, keeping worker threads from
//!   attaching to the interpreter while it forks (see `pool`).
//!
//! `pthread_atfork` order: `prepare` handlers run in the forking thread
//! before `fork()`, the most recently registered first (backends' before
//! core's); `parent` and `child` handlers run after it, in registration
//! order (core's first). A `child` handler runs in a process with a single
//! thread whose other threads vanished mid-flight: it may only do
//! async-signal-safe work (atomics, unlocking a lock its own `prepare` took
//! — no allocation, no Python).

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

use crate::py::{MethodDef, Owned, PyErr, PyResult};

/// Functions run around `fork()` (see the module documentation for when and
/// with which restrictions). Handlers must not panic; a panic is caught and
/// ignored.
pub struct Handlers {
    /// In the forking thread, before `fork()`: take the locks the child
    /// will need.
    pub prepare: Option<fn()>,
    /// In the parent, after `fork()`: release them.
    pub parent: Option<fn()>,
    /// In the child (async-signal-safe work only): release them, reset
    /// state that belonged to the parent's threads.
    pub child: Option<fn()>,
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The current fork generation: it changes in a child process after
/// `fork()`. Cheap (one relaxed load once the handlers are installed).
#[inline]
pub fn generation() -> u64 {
    install();
    GENERATION.load(Ordering::Relaxed)
}

/// The fork generation an object was created in: a Context remembers it
/// and refuses to work in a forked child, where its kernel objects and
/// worker threads are the parent's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp(u64);

impl Stamp {
    /// The current generation.
    #[inline]
    pub fn now() -> Stamp {
        Stamp(generation())
    }

    /// Whether this is still the process the stamp was taken in.
    #[inline]
    pub fn is_current(self) -> bool {
        self.0 == generation()
    }

    /// `RuntimeError(msg)` in a forked child (`msg` says what to do).
    pub fn check(self, msg: &'static str) -> PyResult<()> {
        if self.is_current() {
            Ok(())
        } else {
            Err(PyErr::runtime(msg))
        }
    }
}

/// Declares a `static` [`Handlers`] that holds a `static Mutex` across
/// `fork()`: the forking thread takes it before, and releases it in the
/// parent and in the child (which only unlocks: async-signal-safe). Without
/// it, a thread holding the lock at the moment another thread forks would
/// leave the child's copy locked forever. Register the result with
/// [`register`] (core's own are run by this module).
///
/// ```ignore
/// caio_core::hold_across_fork!(static FORK_HANDLERS: Handlers = STATE as State);
/// ```
#[macro_export]
macro_rules! hold_across_fork {
    ($(#[$meta:meta])* $vis:vis static $name:ident: Handlers = $lock:path as $ty:ty) => {
        $(#[$meta])*
        $vis static $name: $crate::fork::Handlers = {
            ::std::thread_local! {
                /// The lock, held by the forking thread across `fork()`.
                static HELD: ::std::cell::RefCell<
                    ::std::option::Option<::std::sync::MutexGuard<'static, $ty>>,
                > = const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }
            fn take() {
                let guard = $crate::sync::lock(&$lock);
                HELD.with(|h| *h.borrow_mut() = ::std::option::Option::Some(guard));
            }
            fn release() {
                HELD.with(|h| ::std::mem::drop(h.borrow_mut().take()));
            }
            $crate::fork::Handlers {
                prepare: ::std::option::Option::Some(take),
                parent: ::std::option::Option::Some(release),
                child: ::std::option::Option::Some(release),
            }
        };
    };
}

fn bump_generation() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Core's own handlers, in registration order.
static CORE: [&Handlers; 3] = [
    &Handlers {
        prepare: None,
        parent: None,
        child: Some(bump_generation),
    },
    &crate::pool::FORK_HANDLERS,
    &crate::direct::bounce::FORK_HANDLERS,
];

/// Room for backend handlers (each backend library has its own registry).
const MAX_REGISTERED: usize = 16;

static REGISTERED: [AtomicPtr<Handlers>; MAX_REGISTERED] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_REGISTERED];
static N_REGISTERED: AtomicUsize = AtomicUsize::new(0);
/// Serialises [`register`] (never taken around `fork()` itself).
static REGISTER_LOCK: Mutex<()> = Mutex::new(());

/// The registry is full ([`register`]).
#[derive(Debug, PartialEq, Eq)]
pub struct RegistryFull;

/// Adds a backend's fork handlers (after core's). Idempotent: registering
/// the same `&'static Handlers` again does nothing, so a backend may call it
/// whenever it creates a context. Handlers registered after a `fork()`
/// started are not run for that fork.
pub fn register(h: &'static Handlers) -> Result<(), RegistryFull> {
    install();
    let _g = crate::sync::lock(&REGISTER_LOCK);
    let n = N_REGISTERED.load(Ordering::Acquire);
    let p = std::ptr::from_ref(h).cast_mut();
    if REGISTERED[..n]
        .iter()
        .any(|r| r.load(Ordering::Acquire) == p)
    {
        return Ok(());
    }
    if n == MAX_REGISTERED {
        return Err(RegistryFull);
    }
    REGISTERED[n].store(p, Ordering::Release);
    N_REGISTERED.store(n + 1, Ordering::Release);
    Ok(())
}

/// The registered backend handlers, in registration order.
fn registered() -> impl DoubleEndedIterator<Item = &'static Handlers> {
    let n = N_REGISTERED.load(Ordering::Acquire);
    REGISTERED[..n].iter().filter_map(|r| {
        let p = r.load(Ordering::Acquire);
        // SAFETY: only `register` stores here, and only pointers made from
        // `&'static Handlers`.
        (!p.is_null()).then(|| unsafe { &*p })
    })
}

fn run(f: Option<fn()>) {
    if let Some(f) = f {
        // Unwinding out of the `extern "C"` dispatchers would abort.
        let _ = std::panic::catch_unwind(f);
    }
}

extern "C" fn prepare() {
    for h in registered().rev() {
        run(h.prepare);
    }
    for h in CORE.iter().rev() {
        run(h.prepare);
    }
}

extern "C" fn parent() {
    for h in CORE.iter().copied().chain(registered()) {
        run(h.parent);
    }
}

extern "C" fn child() {
    for h in CORE.iter().copied().chain(registered()) {
        run(h.child);
    }
}

/// Installs the `pthread_atfork` dispatchers (once per process). Called by
/// module initialisation, [`generation`] and [`register`], so the handlers
/// are in place before any context, pool or bounce buffer exists.
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        #[cfg(unix)]
        // SAFETY: registers plain `extern "C"` functions that live for the
        // process; `pthread_atfork` itself has no other precondition.
        unsafe {
            libc::pthread_atfork(Some(prepare), Some(parent), Some(child));
        }
    });
}

// ---------------------------------------------------------------------------
// os.register_at_fork hooks (attached)

/// # Safety
/// A module-less builtin function called by CPython attached (arguments
/// unused).
unsafe extern "C" fn before_fork_hook(
    _m: *mut pyo3_ffi::PyObject,
    _a: *mut pyo3_ffi::PyObject,
) -> *mut pyo3_ffi::PyObject {
    crate::py::trampoline(|| {
        crate::pool::before_fork();
        Ok(crate::py::none())
    })
}

/// # Safety
/// A module-less builtin function called by CPython attached (arguments
/// unused).
unsafe extern "C" fn after_fork_hook(
    _m: *mut pyo3_ffi::PyObject,
    _a: *mut pyo3_ffi::PyObject,
) -> *mut pyo3_ffi::PyObject {
    crate::py::trampoline(|| {
        crate::pool::after_fork();
        Ok(crate::py::none())
    })
}

static BEFORE_FORK_DEF: MethodDef =
    MethodDef::noargs(c"_caio_native_before_fork", before_fork_hook);
static AFTER_FORK_DEF: MethodDef = MethodDef::noargs(c"_caio_native_after_fork", after_fork_hook);

/// Registers (where `os.register_at_fork` exists) the hooks that keep
/// worker threads from attaching while `os.fork()` runs
/// (`pool::before_fork`/`pool::after_fork`). Call once per process.
///
/// # Safety
/// Caller attached.
pub unsafe fn register_python_hooks() -> PyResult<()> {
    use pyo3_ffi::*;
    // SAFETY: attached (caller's contract) for every call below; the names
    // are static NUL-terminated strings.
    unsafe {
        let os = Owned::from_new(PyImport_ImportModule(c"os".as_ptr()))?;
        if PyObject_HasAttrString(os.as_ptr(), c"register_at_fork".as_ptr()) == 0 {
            return Ok(()); // no fork() here
        }
        let before = BEFORE_FORK_DEF.new_function(std::ptr::null_mut())?;
        let after = AFTER_FORK_DEF.new_function(std::ptr::null_mut())?;
        let register = Owned::from_new(PyObject_GetAttrString(
            os.as_ptr(),
            c"register_at_fork".as_ptr(),
        ))?;
        let args = Owned::from_new(PyTuple_New(0))?;
        let kwargs = Owned::from_new(PyDict_New())?;
        for (key, value) in [
            (c"before", &before),
            (c"after_in_parent", &after),
            (c"after_in_child", &after),
        ] {
            if PyDict_SetItemString(kwargs.as_ptr(), key.as_ptr(), value.as_ptr()) != 0 {
                return Err(PyErr::Fetched);
            }
        }
        Owned::from_new(PyObject_Call(
            register.as_ptr(),
            args.as_ptr(),
            kwargs.as_ptr(),
        ))?;
    }
    Ok(())
}

/// Serialises the tests that fork (each counts what the handlers did).
#[cfg(test)]
pub(crate) static FORK_TEST_LOCK: Mutex<()> = Mutex::new(());

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn generation_is_stable_in_one_process() {
        assert_eq!(generation(), generation());
    }

    static COUNT: AtomicUsize = AtomicUsize::new(0);
    fn count() {
        COUNT.fetch_add(1, Ordering::SeqCst);
    }
    static COUNTING: Handlers = Handlers {
        prepare: Some(count),
        parent: Some(count),
        child: None,
    };

    #[test]
    fn registered_handlers_run_around_fork_once() {
        assert_eq!(register(&COUNTING), Ok(()));
        assert_eq!(register(&COUNTING), Ok(()), "idempotent");
        let _serial = crate::sync::lock(&FORK_TEST_LOCK);
        let before = COUNT.load(Ordering::SeqCst);
        let gen = generation();
        // SAFETY: the child only calls async-signal-safe functions (an
        // atomic load, _exit).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let bumped = GENERATION.load(Ordering::Relaxed) == gen + 1;
            // SAFETY: leaving the forked test process at once.
            unsafe { libc::_exit(if bumped { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &raw mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        // prepare + parent, once each (not twice for the double register).
        assert_eq!(COUNT.load(Ordering::SeqCst), before + 2);
        assert_eq!(generation(), gen, "the parent keeps its generation");
    }
}
