//! Path operations and whole files off the event-loop thread (DESIGN.md
//! §14): `open`, `stat`, `close`, `fallocate`, `ftruncate`, `fadvise`,
//! `unlink`, `rename`, `mkdir`, `read_file`, `write_file`.
//!
//! * [`job`]: a job and the system calls a worker runs for it;
//! * [`engine`]: a backend's own engine offered every job first (io_uring);
//! * [`inline`]: `read_file` on the loop thread when it cannot wait for the disk;
//! * [`runner`]: the worker threads, the finished list, the wake-up fd;
//! * [`pytype`]: `_PathOps`, which `caio/_pathops.py` drives.
//!
//! Linux only (the `os.stat_result` layout is Linux's); elsewhere the
//! Python runner of `caio/_pathops.py` does the same with `os` calls.

use pyo3_ffi::PyObject;

use crate::module::add_object;
use crate::py::{PyResult, SpecCache};

pub mod engine;
pub mod inline;
pub mod job;
pub mod pytype;
pub mod runner;

/// Adds `_PathOps` to a backend module.
///
/// # Safety
/// Called from a module exec slot, attached.
pub unsafe fn init(module: *mut PyObject) -> PyResult<()> {
    static SPECS: SpecCache = SpecCache::new();
    let spec = SPECS.get_or_build(0, pytype::type_spec);
    // SAFETY: attached, a module being executed (caller's contract).
    unsafe {
        let tp = spec.create(module)?;
        add_object(module, c"_PathOps", tp)
    }
}
