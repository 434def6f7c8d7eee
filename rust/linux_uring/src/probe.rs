//! Import-time checks: can this process really use io_uring, and why not.
//!
//! A failure becomes the `ImportError` of `import caio.linux_uring`; the
//! package then falls back to the next backend and `python -m caio` shows the
//! message, so it says what is wrong and what to do about it.
//!
//! Test hooks (environment, read once at import; only in builds with the
//! `test-hooks` cargo feature, see `caio_core::test_hooks`):
//! * `CAIO_TEST_URING_PROBE_ERRNO=<n>`: behave as if `io_uring_setup()`
//!   failed with errno `n` (e.g. 38 = ENOSYS, 1 = EPERM).
//! * `CAIO_TEST_URING_KERNEL=<release>`: pretend to run on that kernel.

use caio_core::sys::kernel;
use caio_core::test_hooks;
use io_uring::{opcode, IoUring, Probe};

use crate::ring::SQPOLL_IDLE_MS;

pub struct ProbeResult {
    pub sqpoll_allowed: bool,
}

/// The running kernel's release, or the test hook's.
fn kernel_release() -> String {
    let release = test_hooks::env("CAIO_TEST_URING_KERNEL").unwrap_or_else(kernel::release);
    if release.is_empty() {
        "unknown".to_owned()
    } else {
        release
    }
}

fn sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Test hook: behave as if `io_uring_setup()` failed with this errno.
fn test_errno() -> Option<i32> {
    test_hooks::env_parse::<i32>("CAIO_TEST_URING_PROBE_ERRNO").filter(|&e| e > 0)
}

const FALLBACK: &str = "caio falls back to its next backend (linux_aio, thread_aio, \
python_aio); `python -m caio` shows which one is in use.";

/// The diagnosis of a failed `io_uring_setup()`.
pub fn explain(errno: i32, release: &str) -> String {
    let err = caio_core::sys::strerror(errno);
    match errno {
        libc::ENOSYS => format!(
            "linux_uring unavailable: io_uring_setup() failed with ENOSYS ({err}) on Linux \
{release}.\nThe kernel is new enough, so a seccomp filter is most likely blocking the \
io_uring system calls (the default profiles of Docker, Podman and containerd do). To allow \
them:\n  * Docker/Podman: run with `--security-opt seccomp=unconfined`, or with a seccomp \
profile that allows io_uring_setup, io_uring_enter and io_uring_register;\n  * Kubernetes: \
set `securityContext.seccompProfile.type: Unconfined` (or a Localhost profile allowing \
them);\n  * OrbStack and similar VMs: use a plain Linux VM.\nOtherwise the kernel was built \
without CONFIG_IO_URING.\n{FALLBACK}"
        ),
        libc::EPERM | libc::EACCES => {
            let disabled = sysctl("kernel.io_uring_disabled");
            let why = match disabled.as_deref() {
                Some("2") => "the sysctl kernel.io_uring_disabled is 2 (io_uring disabled for \
every process)"
                    .to_owned(),
                Some("1") => format!(
                    "the sysctl kernel.io_uring_disabled is 1 (io_uring only for root/\
CAP_SYS_ADMIN and members of the group kernel.io_uring_group = {})",
                    sysctl("kernel.io_uring_group").unwrap_or_else(|| "?".to_owned())
                ),
                _ => "io_uring is not permitted for this process (the sysctl \
kernel.io_uring_disabled, an LSM policy or a seccomp filter returning EPERM)"
                    .to_owned(),
            };
            format!(
                "linux_uring unavailable: io_uring_setup() failed with {} ({err}) on Linux \
{release}: {why}.\nTo enable it: `sysctl -w kernel.io_uring_disabled=0` as root (or add \
this user to the group in kernel.io_uring_group when the value is 1), or allow io_uring in \
the container's seccomp profile.\n{FALLBACK}",
                if errno == libc::EPERM {
                    "EPERM"
                } else {
                    "EACCES"
                }
            )
        }
        libc::ENOMEM => format!(
            "linux_uring unavailable: io_uring_setup() failed with ENOMEM ({err}) on Linux \
{release}: the locked-memory limit (ulimit -l, RLIMIT_MEMLOCK) is probably too low for \
io_uring rings on this kernel; raise it.\n{FALLBACK}"
        ),
        _ => format!(
            "linux_uring unavailable: io_uring_setup probe failed: {err} (errno {errno}) on \
Linux {release}.\n{FALLBACK}"
        ),
    }
}

/// Runs once from the module's exec slot.
pub fn run() -> Result<ProbeResult, String> {
    let release = kernel_release();
    if let Some((major, minor)) = kernel::version_of(&release) {
        if (major, minor) < (5, 6) {
            return Err(format!(
                "linux_uring requires Linux 5.6+ (IORING_OP_READ/WRITE), current kernel is \
{release}.\n{FALLBACK}"
            ));
        }
    }
    if let Some(errno) = test_errno() {
        return Err(explain(errno, &release));
    }
    let ring = match IoUring::new(1) {
        Ok(r) => r,
        Err(e) => return Err(explain(e.raw_os_error().unwrap_or(libc::EIO), &release)),
    };
    // Every opcode we use must be there (backports or restricted kernels).
    let mut probe = Probe::new();
    if ring.submitter().register_probe(&mut probe).is_ok() {
        let needed = [
            ("READ", opcode::Read::CODE),
            ("WRITE", opcode::Write::CODE),
            ("FSYNC", opcode::Fsync::CODE),
            ("ASYNC_CANCEL", opcode::AsyncCancel::CODE),
        ];
        let missing: Vec<&str> = needed
            .iter()
            .filter(|(_, code)| !probe.is_supported(*code))
            .map(|(name, _)| *name)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "linux_uring unavailable: this kernel ({release}) does not support the \
io_uring operations {}.\n{FALLBACK}",
                missing.join(", ")
            ));
        }
    }
    drop(ring);
    let sqpoll_allowed = IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
        .setup_sqpoll(SQPOLL_IDLE_MS)
        .build(1)
        .is_ok();
    Ok(ProbeResult { sqpoll_allowed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_fix() {
        let m = explain(libc::ENOSYS, "6.1.0");
        assert!(m.contains("seccomp=unconfined"));
        assert!(m.contains("seccompProfile"));
        let m = explain(libc::EPERM, "6.1.0");
        assert!(m.contains("io_uring_disabled"));
    }
}
