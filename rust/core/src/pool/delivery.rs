//! Process-wide coordination of *direct* delivery (a worker attaches to the
//! interpreter and runs the callback itself) with the two moments it must
//! not happen: while `os.fork()` runs, and once the interpreter exits.
//!
//! * [`before_fork`]/[`after_fork`]: the `os.register_at_fork` hooks (see
//!   [`crate::fork`]) hold workers back while the interpreter forks;
//! * [`interpreter_exiting`]: the `atexit` hook lets queued work finish for a
//!   bounded time, then stops workers from ever attaching again;
//! * `FORK_HANDLERS`: resets the counters in a forked child.
//!
//! A worker keeps **one thread state** for its whole life instead of
//! creating and destroying one per operation (`PyGILState_Ensure`/`Release`
//! take CPython's runtime locks and allocate): made by its first direct
//! delivery, attached (`PyEval_RestoreThread`) for each delivery and
//! detached (`PyEval_SaveThread`) right after, so the worker never holds the
//! GIL while it waits or runs I/O. It is deleted when the worker ends
//! ([`worker_exit`]), while the interpreter is alive; once the interpreter
//! is exiting (`STOPPING`, `Py_IsFinalizing`) it is never touched again —
//! like a daemon thread's, finalisation owns it. A forked child deletes the
//! parent's worker thread states itself (`PyOS_AfterFork_Child`); its copy
//! of the pool has no workers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use pyo3_ffi::*;

use super::Job;
use crate::op::finish;
use crate::py::MethodDef;

/// Set when the interpreter starts shutting down; from then on workers never
/// attach to it (callbacks of later completions are not run).
static STOPPING: AtomicBool = AtomicBool::new(false);
/// Workers currently between "decided to attach" and "detached again".
static ATTACHING: AtomicUsize = AtomicUsize::new(0);
/// Jobs accepted by any pool and not yet delivered/discarded.
pub(super) static OUTSTANDING: AtomicUsize = AtomicUsize::new(0);

/// Set from `os.fork()`'s "before" hook until its "after" hooks: workers with
/// a completion to deliver wait *before* attaching. `PyGILState_Ensure` and
/// `Release` create and destroy a thread state under CPython's runtime locks;
/// a fork landing in the middle of that leaves such a lock held in the child,
/// whose interpreter then hangs at exit (seen on free-threaded 3.13: the
/// child's final GC blocked in stop-the-world).
static FORKING: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread is running a direct delivery (a callback may fork).
    static DELIVERING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// This worker's own thread state (made by its first direct delivery,
    /// detached between deliveries), or NULL.
    static WORKER_TSTATE: std::cell::Cell<*mut PyThreadState> =
        const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// In a child process after `fork()` (async-signal-safe): the parent's
/// workers do not exist here, so neither the jobs they had outstanding nor
/// the ones about to attach can ever finish. Left as they were, the counters
/// make [`interpreter_exiting`] wait 5 s for `OUTSTANDING`, then forever for
/// `ATTACHING` (a worker waiting for the GIL at the moment of the fork).
fn reset_in_child() {
    OUTSTANDING.store(0, Ordering::SeqCst);
    ATTACHING.store(0, Ordering::SeqCst);
    FORKING.store(false, Ordering::SeqCst);
}

/// The pool's `pthread_atfork` handlers (run by [`crate::fork`]).
pub(crate) static FORK_HANDLERS: crate::fork::Handlers = crate::fork::Handlers {
    prepare: None,
    parent: None,
    child: Some(reset_in_child),
};

/// `os.fork()` "before" hook (attached): stops workers from attaching and
/// waits (GIL released, so a worker already waiting for the GIL can finish)
/// until none is attached — bounded, because a callback running in a worker
/// may itself wait for the forking thread.
pub fn before_fork() {
    FORKING.store(true, Ordering::SeqCst);
    let own = usize::from(DELIVERING.with(std::cell::Cell::get));
    crate::py::allow_threads(|| {
        wait_while(
            Some(Duration::from_secs(2)),
            Duration::from_micros(200),
            || ATTACHING.load(Ordering::SeqCst) > own,
        );
    });
}

/// `os.fork()` "after" hook, in the parent and in the child.
pub fn after_fork() {
    FORKING.store(false, Ordering::SeqCst);
}

/// Called from an `atexit` hook (attached, Python still fully alive): lets
/// queued work finish and deliver for a bounded time, then stops workers from
/// ever attaching again, waiting for the ones already attaching.
pub fn interpreter_exiting() {
    crate::py::allow_threads(|| {
        let step = Duration::from_millis(1);
        wait_while(Some(exit_wait()), step, || {
            OUTSTANDING.load(Ordering::SeqCst) > 0
        });
        STOPPING.store(true, Ordering::SeqCst);
        wait_while(None, step, || ATTACHING.load(Ordering::SeqCst) > 0);
    });
}

/// How long the interpreter's exit waits for pool work (the `atexit` hook,
/// a pool closed while the interpreter exits): 5 s (test hook
/// `CAIO_TEST_SHUTDOWN_WAIT_MS`).
pub fn exit_wait() -> Duration {
    crate::test_hooks::env_parse::<u64>("CAIO_TEST_SHUTDOWN_WAIT_MS")
        .map_or(Duration::from_secs(5), Duration::from_millis)
}

/// While the interpreter exits (the `atexit` hook ran, or finalisation
/// started): the deadline for joining a pool's workers, so a stuck worker
/// cannot hang the exit. `None` otherwise (joins wait as long as it takes).
pub fn exit_deadline() -> Option<std::time::Instant> {
    if STOPPING.load(Ordering::SeqCst) || crate::py::is_finalizing() {
        Some(std::time::Instant::now() + exit_wait())
    } else {
        None
    }
}

/// Sleeps in `step`s while `busy()` holds, at most `limit` (if given). For
/// the process-wide counters above; the caller has released the GIL.
fn wait_while(limit: Option<Duration>, step: Duration, busy: impl Fn() -> bool) {
    let deadline = limit.map(|l| std::time::Instant::now() + l);
    while busy() && deadline.is_none_or(|d| std::time::Instant::now() < d) {
        std::thread::sleep(step);
    }
}

/// Delivers `job` from a worker thread (not attached): attaches, finishes
/// the op and runs its callback — unless the interpreter is going away, in
/// which case the op is leaked on purpose (running Python is no longer
/// possible; the I/O itself has completed).
///
/// # Safety
/// `job` is an in-flight op whose engine reference the job carries, and the
/// calling thread is not attached.
pub(super) unsafe fn deliver_direct(job: Job, result: i64) {
    if !enter_attaching() {
        return;
    }
    let ts = WORKER_TSTATE.with(std::cell::Cell::get);
    if ts.is_null() {
        // First delivery of this worker: make its thread state. The
        // GILState counter stays at 1 until `worker_exit`, so it lives on
        // while detached.
        // SAFETY: a detached thread without a thread state may attach with
        // `PyGILState_Ensure` while the interpreter is alive (checked by
        // `enter_attaching`; the atexit hook waits for `ATTACHING` before
        // finalisation proceeds).
        unsafe { PyGILState_Ensure() };
        // SAFETY: attached now, so there is a current thread state.
        WORKER_TSTATE.with(|t| t.set(unsafe { PyThreadState_Get() }));
    } else {
        // SAFETY: this thread's own thread state, detached by the previous
        // delivery; the interpreter is alive (as above).
        unsafe { PyEval_RestoreThread(ts) };
    }
    // SAFETY: attached now; the job's in-flight op is finished only here.
    let d = unsafe { finish(job.0, result) };
    DELIVERING.with(|f| f.set(true));
    d.run();
    DELIVERING.with(|f| f.set(false));
    // SAFETY: attached with this thread's state (a callback that switched
    // thread states has switched back before returning); detaching keeps
    // it for the next delivery.
    unsafe { PyEval_SaveThread() };
    ATTACHING.fetch_sub(1, Ordering::SeqCst);
}

/// Counts the calling worker into `ATTACHING`, after any fork in progress.
/// False (not counted) once the interpreter is exiting: then it must not
/// attach any more.
fn enter_attaching() -> bool {
    // Count ourselves in, then look at FORKING (both SeqCst): either the
    // forking thread sees us in ATTACHING and waits, or we see its flag and
    // step back until the fork is done.
    loop {
        ATTACHING.fetch_add(1, Ordering::SeqCst);
        if !FORKING.load(Ordering::SeqCst) {
            break;
        }
        ATTACHING.fetch_sub(1, Ordering::SeqCst);
        while FORKING.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    if STOPPING.load(Ordering::SeqCst) || crate::py::is_finalizing() {
        ATTACHING.fetch_sub(1, Ordering::SeqCst);
        return false;
    }
    true
}

/// A worker ends (not attached): deletes the thread state its deliveries
/// used, while the interpreter is alive. Once it is exiting the state is
/// left alone (finalisation deletes it; touching it could hang or end the
/// thread).
pub(super) fn worker_exit() {
    let ts = WORKER_TSTATE.with(|t| t.replace(std::ptr::null_mut()));
    if ts.is_null() || !enter_attaching() {
        return;
    }
    // SAFETY: this thread's own detached thread state; the interpreter is
    // alive (checked by `enter_attaching`). Releasing the GILState count
    // taken by the first delivery (to 0) clears and deletes it and detaches.
    unsafe {
        PyEval_RestoreThread(ts);
        PyGILState_Release(PyGILState_STATE::PyGILState_UNLOCKED);
    }
    ATTACHING.fetch_sub(1, Ordering::SeqCst);
}

/// # Safety
/// A module-less builtin function called by CPython attached (arguments
/// unused).
unsafe extern "C" fn atexit_hook(_m: *mut PyObject, _a: *mut PyObject) -> *mut PyObject {
    crate::py::trampoline(|| {
        interpreter_exiting();
        Ok(crate::py::none())
    })
}

static ATEXIT_DEF: MethodDef = MethodDef::noargs(c"_caio_native_atexit", atexit_hook);

/// Registers the `atexit` hook ([`interpreter_exiting`]). Call once per
/// process.
///
/// # Safety
/// Caller attached.
pub(crate) unsafe fn register_atexit() -> crate::py::PyResult<()> {
    use crate::py::Owned;
    // SAFETY: attached (caller's contract); static NUL-terminated names.
    unsafe {
        let atexit = Owned::from_new(PyImport_ImportModule(c"atexit".as_ptr()))?;
        let func = ATEXIT_DEF.new_function(std::ptr::null_mut())?;
        let register = Owned::from_new(PyObject_GetAttrString(
            atexit.as_ptr(),
            c"register".as_ptr(),
        ))?;
        crate::py::call1(register.borrow(), func.borrow())?;
    }
    Ok(())
}
