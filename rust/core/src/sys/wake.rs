//! The wake-up fd: tells an event loop "completions are waiting".

/// A non-blocking notification fd: an eventfd on Linux, a pipe elsewhere on
/// Unix. `signal()` may be called from any thread; the loop registers
/// `fileno()` with `add_reader` and calls `drain()` when it becomes readable.
#[cfg(unix)]
pub struct WakeFd {
    read_fd: i32,
    write_fd: i32,
}

#[cfg(unix)]
impl WakeFd {
    pub fn new() -> std::io::Result<WakeFd> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            // SAFETY: eventfd has no memory arguments; a failure is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(WakeFd {
                read_fd: fd,
                write_fd: fd,
            })
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let mut fds = [0i32; 2];
            // SAFETY: `fds` is a live array of the two ints pipe() fills.
            if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for fd in fds {
                // SAFETY: fcntl on the descriptors pipe() just created.
                unsafe {
                    libc::fcntl(
                        fd,
                        libc::F_SETFL,
                        libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
                    );
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(WakeFd {
                read_fd: fds[0],
                write_fd: fds[1],
            })
        }
    }

    pub fn fileno(&self) -> i32 {
        self.read_fd
    }

    /// Makes the fd readable (idempotent until drained).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of a live local to our own fd. EAGAIN
        // (counter/pipe full) still leaves the fd readable: ignored.
        unsafe { libc::write(self.write_fd, std::ptr::from_ref(&one).cast(), 8) };
    }

    /// Consumes pending notifications; returns the eventfd counter (Linux) or
    /// the number of bytes drained (pipe). `Ok(0)` when nothing was pending.
    pub fn drain(&self) -> std::io::Result<u64> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let mut v: u64 = 0;
            // SAFETY: reads at most 8 bytes into a live local of 8 bytes.
            let r = unsafe { libc::read(self.read_fd, std::ptr::from_mut(&mut v).cast(), 8) };
            if r == 8 {
                return Ok(v);
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                Ok(0)
            } else {
                Err(e)
            }
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let mut buf = [0u8; 256];
            let mut total = 0u64;
            loop {
                // SAFETY: reads at most `buf.len()` bytes into `buf`.
                let r = unsafe { libc::read(self.read_fd, buf.as_mut_ptr().cast(), buf.len()) };
                if r > 0 {
                    total += r.unsigned_abs() as u64;
                    continue;
                }
                if r < 0 && super::last_errno() != libc::EAGAIN && total == 0 {
                    return Err(std::io::Error::last_os_error());
                }
                return Ok(total);
            }
        }
    }
}

#[cfg(unix)]
impl Drop for WakeFd {
    fn drop(&mut self) {
        // SAFETY: the fds are ours (created by `new`) and closed once, here.
        unsafe {
            libc::close(self.read_fd);
            if self.write_fd != self.read_fd {
                libc::close(self.write_fd);
            }
        }
    }
}

/// Windows: the default (proactor) event loop has no `add_reader`, so there
/// is no wake-up fd; callers fall back to callbacks on worker threads.
#[cfg(windows)]
pub struct WakeFd(());

#[cfg(windows)]
impl WakeFd {
    pub fn new() -> std::io::Result<WakeFd> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
    pub fn fileno(&self) -> i32 {
        -1
    }
    pub fn signal(&self) {}
    pub fn drain(&self) -> std::io::Result<u64> {
        Ok(0)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn wake_fd_signals_until_drained() {
        let w = WakeFd::new().unwrap();
        assert!(w.fileno() >= 0);
        assert_eq!(w.drain().unwrap(), 0);
        w.signal();
        w.signal();
        assert!(w.drain().unwrap() > 0);
        assert_eq!(w.drain().unwrap(), 0);
    }
}
