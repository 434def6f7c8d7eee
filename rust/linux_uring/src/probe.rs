//! Import-time checks: can this process really use io_uring, and why not.
//!
//! A failure becomes the `ImportError` of `import caio.linux_uring`; the
//! package then falls back to the next backend and `python -m caio` shows the
//! message, so it says what is wrong and what to do about it.
//!
//! Test hooks (environment, read once at import):
//! * `CAIO_TEST_URING_PROBE_ERRNO=<n>`: behave as if `io_uring_setup()`
//!   failed with errno `n` (e.g. 38 = ENOSYS, 1 = EPERM).
//! * `CAIO_TEST_URING_KERNEL=<release>`: pretend to run on that kernel.

use io_uring::{opcode, IoUring, Probe};

use crate::ring::SQPOLL_IDLE_MS;

pub struct ProbeResult {
    pub sqpoll_allowed: bool,
}

// TODO(core): core is getting one kernel-version helper; switch
// kernel_release() and version_of() to it.
fn kernel_release() -> String {
    // TODO(core): behind core's `test-hooks` cargo feature.
    if let Ok(r) = std::env::var("CAIO_TEST_URING_KERNEL") {
        return r;
    }
    // SAFETY: `utsname` is plain C data, valid all zeroes; uname(2) fills
    // the live struct it is given and NUL-terminates `release`.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&raw mut u) != 0 {
            return "unknown".to_owned();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// `(major, minor)` of a release string such as `6.18.44-fc-v657`.
fn version_of(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
        .ok()
        .map(|s| s.trim().to_owned())
}

// TODO(core): behind core's `test-hooks` cargo feature.
fn test_errno() -> Option<i32> {
    std::env::var("CAIO_TEST_URING_PROBE_ERRNO")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&e: &i32| e > 0)
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
    if let Some((major, minor)) = version_of(&release) {
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
    fn versions() {
        assert_eq!(version_of("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(version_of("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(version_of("garbage"), None);
    }

    #[test]
    fn messages_name_the_fix() {
        let m = explain(libc::ENOSYS, "6.1.0");
        assert!(m.contains("seccomp=unconfined"));
        assert!(m.contains("seccompProfile"));
        let m = explain(libc::EPERM, "6.1.0");
        assert!(m.contains("io_uring_disabled"));
    }
}
