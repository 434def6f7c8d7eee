//! The running kernel's version, for import-time feature checks.
//!
//! A backend that lets tests pretend to run on another kernel composes this
//! with [`crate::test_hooks`]:
//!
//! ```ignore
//! let release = test_hooks::env("CAIO_TEST_URING_KERNEL").unwrap_or_else(kernel::release);
//! let too_old = kernel::version_of(&release).is_some_and(|v| v < (5, 1));
//! ```

/// `uname().release`, e.g. `"6.18.44-fc-v657"`; empty when unavailable.
#[cfg(unix)]
pub fn release() -> String {
    // SAFETY: an all-zero `utsname` is a valid value of this C struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the live local it is given.
    if unsafe { libc::uname(&raw mut u) } != 0 {
        return String::new();
    }
    // SAFETY: on success `release` holds a NUL-terminated string within the
    // array.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// No kernel release string here.
#[cfg(not(unix))]
pub fn release() -> String {
    String::new()
}

/// `(major, minor)` of a release string such as `"6.18.44-fc-v657"` or
/// `"4.18.0-553.el8.x86_64"`; `None` if it does not start with two numbers.
pub fn version_of(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// `(major, minor)` of the running kernel.
pub fn version() -> Option<(u32, u32)> {
    version_of(&release())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(version_of("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(version_of("4.18.0-553.el8.x86_64"), Some((4, 18)));
        assert_eq!(version_of("4.9"), Some((4, 9)));
        assert!(version_of("4.9").unwrap() < (4, 18));
        assert_eq!(version_of("5"), None);
        assert_eq!(version_of("garbage"), None);
        assert_eq!(version_of(""), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn running_kernel_has_a_version() {
        assert!(version().is_some(), "{}", release());
    }
}
