//! Releasing kernel AIO contexts without blocking the caller.
//!
//! `io_destroy` gives the context's share of `fs.aio-nr` back and unmaps its
//! ring right away, but then waits for the kernel to drop its last
//! references — two RCU grace periods, ~30 ms on a typical kernel. Done on
//! the event-loop thread that would be a 30 ms stall per closed context (and
//! 10 000 closes would take five minutes). So `close()`/deallocation hand the
//! context to a helper thread that calls `io_destroy` immediately; the
//! context is dead for the kernel microseconds later, only the wait happens
//! in the background. Grace periods are shared, so several helpers waiting
//! at once finish together: up to [`MAX_THREADS`] run concurrently and an
//! idle helper exits after [`IDLE`]. Contexts not yet picked up by a helper
//! still hold their share of `fs.aio-nr`, so a caller that finds more than
//! [`MAX_BACKLOG`] of them waits ([`wait_backlog`]): a tight create/close
//! loop is throttled instead of exhausting the system-wide limit.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use caio_core::fork::Stamp;
use caio_core::sync::lock;

const MAX_THREADS: usize = 128;
const MAX_BACKLOG: usize = 8;
const IDLE: Duration = Duration::from_secs(1);

struct State {
    queue: Vec<u64>,
    /// Helpers alive / waiting for work.
    live: usize,
    idle: usize,
    /// Contexts handed over whose `io_destroy` has not returned yet.
    pending: usize,
    /// The fork generation these counters belong to (see [`state`]);
    /// `None` until first used.
    born: Option<Stamp>,
}

static STATE: Mutex<State> = Mutex::new(State {
    queue: Vec::new(),
    live: 0,
    idle: 0,
    pending: 0,
    born: None,
});
/// Helpers wait here for work.
static WORK: Condvar = Condvar::new();
/// Signalled when a helper takes a context off the queue.
static TAKEN: Condvar = Condvar::new();

fn state() -> MutexGuard<'static, State> {
    let mut st = lock(&STATE);
    if !st.born.is_some_and(Stamp::is_current) {
        // A child forked from a process that had helpers: they do not exist
        // here, and neither do the contexts queued for them (the kernel does
        // not copy AIO contexts into a child). Counting the parent's helpers
        // as alive would leave this process's contexts queued forever and
        // make `wait_backlog` wait forever once more than MAX_BACKLOG of
        // them are closed.
        st.queue.clear();
        st.live = 0;
        st.idle = 0;
        st.pending = 0;
        st.born = Some(Stamp::now());
    }
    st
}

caio_core::hold_across_fork!(
    /// A helper holding `STATE` at the moment another thread forks would
    /// leave the child's copy locked forever (nobody there to unlock it):
    /// the child's first `close()` would hang. So the forking thread takes
    /// the lock before `fork()` and releases it on both sides afterwards; the
    /// child then resets the counters (see [`state`]). Registered by the
    /// module's exec slot.
    pub(crate) static FORK_HANDLERS: Handlers = STATE as State
);

/// Destroys `ctx` on a helper thread (or, if no thread can be started, on
/// the calling thread). Never touches Python; may be called with or without
/// the GIL.
pub fn destroy(ctx: u64) {
    let mut st = state();
    st.queue.push(ctx);
    st.pending += 1;
    let wake = st.idle > 0;
    let spawn = st.idle < st.queue.len() && st.live < MAX_THREADS;
    if spawn {
        st.live += 1;
    }
    drop(st);
    if wake {
        WORK.notify_one();
    }
    if !spawn {
        return; // a helper (idle or busy) will pick it up
    }
    let spawned = std::thread::Builder::new()
        .name("caio-aio-destroy".into())
        .stack_size(64 * 1024)
        .spawn(helper);
    if spawned.is_ok() {
        return;
    }
    let mut st = state();
    st.live -= 1;
    if st.live > 0 {
        return; // an existing helper will get to it
    }
    // No helper thread at all: do it here rather than leak the context.
    if let Some(pos) = st.queue.iter().position(|&c| c == ctx) {
        st.queue.swap_remove(pos);
        drop(st);
        let _ = crate::abi::io_destroy(ctx);
        finished();
    }
}

fn finished() {
    state().pending -= 1;
}

fn helper() {
    let mut st = state();
    loop {
        if let Some(ctx) = st.queue.pop() {
            drop(st);
            TAKEN.notify_all();
            let _ = crate::abi::io_destroy(ctx);
            finished();
            st = state();
            continue;
        }
        st.idle += 1;
        let (g, timeout) = WORK
            .wait_timeout(st, IDLE)
            .unwrap_or_else(|e| e.into_inner());
        st = g;
        st.idle -= 1;
        if timeout.timed_out() && st.queue.is_empty() {
            st.live -= 1;
            return;
        }
    }
}

/// Contexts handed over whose `io_destroy` has not returned yet.
pub fn pending() -> usize {
    state().pending
}

/// Waits (call it without the GIL) while more than [`MAX_BACKLOG`]
/// contexts wait for a helper.
pub fn wait_backlog() {
    let st = state();
    if st.queue.len() <= MAX_BACKLOG {
        return;
    }
    drop(
        TAKEN
            .wait_while(st, |s| s.queue.len() > MAX_BACKLOG && s.live > 0)
            .unwrap_or_else(|e| e.into_inner()),
    );
}

/// Whether [`wait_backlog`] would wait.
pub fn over_backlog() -> bool {
    state().queue.len() > MAX_BACKLOG
}
