//! Operating-system primitives shared by the backends: errno helpers,
//! positional I/O for the worker pool ([`pio`]) at a good copy distance
//! ([`distance`]), the wake-up fd used to
//! signal completions to an event loop ([`wake`]) and the kernel version
//! ([`kernel`]). Fork handling lives in [`crate::fork`], the O_DIRECT
//! policy in [`crate::direct`].

pub mod distance;
pub mod kernel;
pub mod pio;
pub mod wake;

pub use distance::read_at_good_distance;
pub use pio::{fdatasync, fsync, neg, pread, pread_nowait, prwv, pwrite, IoVec, MAX_TRANSFER};
pub use wake::WakeFd;

/// errno of the last failed libc call on this thread.
#[inline]
pub fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `strerror(errno)`, thread-safe.
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    // Rust appends " (os error N)"; Python users expect the bare C text.
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn strerror_is_the_bare_c_text() {
        assert_eq!(strerror(libc::EBADF), "Bad file descriptor");
        assert_eq!(strerror(libc::ENOENT), "No such file or directory");
    }
}
