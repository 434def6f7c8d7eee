//! `caio.linux_aio`: Linux kernel AIO (`io_setup`/`io_submit`), spoken
//! directly through system calls.
//!
//! What it adds over a plain AIO binding (and over upstream caio):
//!
//! * **The event loop never waits for the disk on buffered files.** Kernel
//!   AIO on a file without `O_DIRECT` runs the whole read inside
//!   `io_submit`. In event-loop mode (`_set_nowait(True)`, which the asyncio
//!   adapter turns on; a raw Context keeps upstream's synchronous semantics)
//!   we submit buffered reads and writes with `RWF_NOWAIT`:
//!   page-cache hits complete inline as before, and what the kernel refuses
//!   (`-EAGAIN`; `-EOPNOTSUPP` for buffered writes on filesystems without
//!   non-blocking writes, e.g. ext4) or transfers only partly is handed to a
//!   small worker pool (`caio_core::pool`, created on first need). Workers
//!   queue their results and signal the same eventfd the kernel signals, and
//!   `process_events()` delivers both kinds on the caller's (loop) thread.
//!   A refused read has still started its readahead inside `io_submit`, and
//!   that can sleep for a free request slot on a busy device, so while most
//!   attempts are refused (a cold file; ext4 writes) operations skip the
//!   kernel attempt and go straight to the workers (see `Route`). `O_DIRECT`
//!   requests get `RWF_NOWAIT` too, so a saturated device (no free request
//!   slot), block allocation or a contended inode lock cannot block the
//!   loop either.
//! * **Every file `pread`/`pwrite` can do works.** Kernel AIO refuses files
//!   without `read_iter`/`write_iter` (directories, `/dev/full`, most `/proc`
//!   files) with `EINVAL` at `io_submit`; such an op goes to the worker pool
//!   too, so it gets the system call's answer (`EISDIR`, `ENOSPC`, the data)
//!   instead of upstream's `ValueError`.
//! * **`O_DIRECT` works.** Reads go through a 4096-byte aligned window
//!   (any offset/length; the caller still gets `bytes`); writes are copied
//!   into aligned memory, and must have offset and length aligned to the
//!   file's O_DIRECT granularity (`statx` `STATX_DIOALIGN`), else they are
//!   refused at submission with `SubmitError` (`OSError` EINVAL, also a
//!   `ValueError`) naming the alignment.
//! * **No kernel context leaks.** `Context.close()` (an extension) and
//!   deallocation release the AIO context deterministically, without
//!   blocking the caller (see `destroyer`).
//! * Completions are read from the kernel's completion ring in user space
//!   (no `io_getevents` system call per drain).
//!
//! Layout:
//!
//! * `lib.rs` — this overview, the Operation flavor, the import-time
//!   availability check and module initialisation.
//! * `context.rs` — the Python `Context` type (methods, properties, docs).
//! * `engine.rs` — the kernel AIO context behind a Context: state, creation,
//!   the worker pool, release.
//! * `submit.rs` — iocbs, `io_submit`, `io_cancel`.
//! * `reap.rs` — completions (ring, worker results) and their delivery.
//! * `route.rs` — event-loop mode's "kernel first or straight to the
//!   workers" heuristic.
//! * `adapter.rs` — the engine of the native asyncio fast path.
//! * `destroyer.rs` — `io_destroy` off the caller's thread.
//! * `abi.rs` — the kernel ABI and system calls.
//!
//! Linux only: on other targets the crate is empty (so `cargo build
//! --workspace` works everywhere; setup.py builds it on Linux only).
#![cfg(target_os = "linux")]

mod abi;
mod adapter;
mod context;
mod destroyer;
mod engine;
mod reap;
mod route;
mod submit;

use caio_core::module::init_common;
use caio_core::op::Flavor;
use caio_core::py::{Exc, PyErr, PyResult};
use caio_core::pyo3_ffi::*;
use caio_core::sys::{self, kernel};
use caio_core::{backend_module, test_hooks};

/// The module's Operation type (`caio_core::op`), as linux_aio has it.
static FLAVOR: Flavor = Flavor {
    doc: c"linux aio operation representation",
    nbytes_tracks_write: true,
    // Sent as the iocb's signed 16-bit aio_reqprio.
    priority_max: i16::MAX as i128,
    // DESIGN.md §6.2 aio-result, fixed: callbacks get the signed kernel result (bytes
    // moved, or -errno), not its unsigned 64-bit reinterpretation (`failure_as_minus_one`
    // stays false).
    has_result_error: false,
    has_priority: true,
    repr_offset_signed: true,
    repr_result: false,
    ..Flavor::COMMON
};

/// Import-time checks: everything that makes kernel AIO unusable becomes an
/// `ImportError` (caio then falls back to the next backend, and
/// `python -m caio` shows the reason).
fn check_available() -> PyResult<()> {
    // Test hook: pretend to run on this kernel.
    let release = test_hooks::env("CAIO_TEST_AIO_KERNEL_RELEASE").unwrap_or_else(kernel::release);
    match kernel::version_of(&release) {
        Some(v) if v >= (4, 18) => {}
        _ => {
            return Err(PyErr::new(
                Exc::ImportError,
                format!(
                    "Linux kernel supported since 4.18 but current kernel is {}. (linux_aio \
needs AIO fsync/fdsync and RWF_NOWAIT.)",
                    release
                ),
            ))
        }
    }
    // Test hook: pretend io_setup failed with this errno.
    let forced = test_hooks::env_parse::<i32>("CAIO_TEST_AIO_PROBE_ERRNO").filter(|&e| e > 0);
    let probe = match forced {
        Some(e) => Err(e), // test hook: pretend io_setup failed this way
        None => abi::io_setup(1),
    };
    let errno = match probe {
        Ok(c) => {
            destroyer::destroy(c);
            return Ok(());
        }
        Err(e) => e,
    };
    let reason = match errno {
        libc::ENOSYS => format!(
            "kernel AIO is unavailable: io_setup() failed with ENOSYS ({}). Either the kernel \
was built without CONFIG_AIO, or a seccomp filter blocks the AIO system calls, as container \
runtimes may do (Docker/Podman: --security-opt seccomp=unconfined or a profile allowing \
io_setup, io_submit, io_getevents, io_cancel, io_destroy; Kubernetes: \
securityContext.seccompProfile.type=Unconfined). Kernel {}.",
            sys::strerror(errno),
            release
        ),
        libc::EAGAIN => {
            let (nr, max) = abi::aio_counters();
            let show = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
            format!(
                "kernel AIO is unavailable: io_setup() failed with EAGAIN ({}): the \
system-wide AIO limit is exhausted (/proc/sys/fs/aio-nr = {} of /proc/sys/fs/aio-max-nr = {}). \
Other processes hold AIO contexts; raise fs.aio-max-nr (sysctl -w fs.aio-max-nr=N).",
                sys::strerror(errno),
                show(nr),
                show(max)
            )
        }
        libc::EPERM | libc::EACCES => format!(
            "kernel AIO is unavailable: io_setup() failed with {} ({}), probably a security \
policy (seccomp, LSM) forbidding it. Kernel {}.",
            if errno == libc::EPERM {
                "EPERM"
            } else {
                "EACCES"
            },
            sys::strerror(errno),
            release
        ),
        _ => format!(
            "kernel AIO is unavailable: io_setup() probe failed with errno {} ({}). Kernel {}.",
            errno,
            sys::strerror(errno),
            release
        ),
    };
    Err(PyErr::new(Exc::ImportError, reason))
}

/// The module's exec slot: availability check, then the types, the
/// exceptions and the asyncio fast path.
///
/// # Safety
/// Called by CPython's multi-phase init (through `backend_module!`),
/// attached, with the new module.
unsafe fn exec(module: *mut PyObject) -> PyResult<()> {
    caio_core::fork::register(&destroyer::FORK_HANDLERS)
        .map_err(|_| PyErr::new(Exc::ImportError, "too many fork handlers registered"))?;
    check_available()?;
    // SAFETY: an exec slot, attached (our contract).
    unsafe {
        init_common(
            module,
            &FLAVOR,
            context::context_spec,
            c"caio.linux_aio.OperationError",
        )
    }?;
    // SAFETY: attached; the builtin exception classes are valid objects
    // (immortal or kept alive by the interpreter), the strings are static
    // and NUL-terminated, and `module` is the module being initialised.
    unsafe {
        caio_core::module::add_exception(
            module,
            c"SubmitError",
            c"caio.linux_aio.SubmitError",
            &[PyExc_OSError, PyExc_ValueError],
            c"io_submit refused an operation (bad fd, invalid for the file, ...). A ValueError, \
as upstream caio raises, and an OSError with the errno.",
        )?;
        caio_core::module::init_capacity_error(
            module,
            c"caio.linux_aio.CapacityError",
            PyExc_OverflowError,
            c"submit() accepted nothing because the kernel completion ring is full (io_submit \
EAGAIN). An OverflowError, as upstream caio raises, and an OSError with errno EAGAIN.",
        )?;
        caio_core::aio::init(module, &adapter::ENGINE)?;
    }
    Ok(())
}

backend_module!(
    PyInit_linux_aio,
    c"linux_aio",
    c"Linux AIO c API bindings.",
    exec
);
