//! A second engine for path jobs, offered every job before the workers
//! (DESIGN.md §14): linux_uring registers one that runs them as io_uring
//! opcodes. The engine completes jobs on its own (its completions signal the
//! runner's wake-up fd, so one drain of the loop collects both), or hands a
//! job back, which then goes to a worker as before.

use std::ffi::c_int;
use std::sync::OnceLock;

use super::job::Job;

pub trait Engine: Send + Sync {
    /// Starts `job`, or hands it back (no opcode for it, no room): a worker
    /// runs it then.
    fn start(&self, job: Box<Job>) -> Result<(), Box<Job>>;
    /// Moves the jobs finished since the last call into `out` (never
    /// blocks; touches no Python object).
    #[allow(clippy::vec_box)]
    fn reap(&self, out: &mut Vec<Box<Job>>);
    /// Jobs started and not reaped yet.
    fn in_flight(&self) -> usize;
    /// Jobs this engine completed so far (introspection).
    fn completed(&self) -> u64;
    /// Refuses new jobs, cancels what runs and waits until the kernel is
    /// done with every job's memory; the jobs are then reaped. Call it
    /// detached from the interpreter.
    fn shutdown(&self);
}

/// Builds a backend's engine; `wake_fd` is the runner's wake-up eventfd.
/// `None`: no engine (the workers run everything).
pub type Factory = fn(wake_fd: c_int) -> Option<Box<dyn Engine>>;

static FACTORY: OnceLock<Factory> = OnceLock::new();

/// Sets this module's engine factory (once, from its exec slot; each
/// backend module has its own copy of this crate).
pub fn set_factory(f: Factory) {
    let _ = FACTORY.set(f);
}

pub(super) fn factory() -> Option<Factory> {
    FACTORY.get().copied()
}
