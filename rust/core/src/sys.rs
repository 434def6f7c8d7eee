//! Operating-system primitives shared by the backends: errno helpers,
//! positional I/O for the worker pool, the fork generation counter and the
//! wake-up fd used to signal completions to an event loop.

use std::sync::atomic::{AtomicU64, Ordering};

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

// ---------------------------------------------------------------------------
// fork detection

static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

#[cfg(unix)]
extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
    crate::pool::after_fork_in_child();
}

/// The current fork generation: it changes in a child process after `fork()`.
/// Contexts remember it at creation and refuse to work in another generation,
/// because their kernel objects and worker threads belong to the parent.
pub fn fork_generation() -> u64 {
    #[cfg(unix)]
    {
        static REGISTER: std::sync::Once = std::sync::Once::new();
        REGISTER.call_once(|| unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        });
    }
    FORK_GENERATION.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// positional I/O (used by worker threads, never with the GIL held)

/// Largest single transfer we ask the kernel for: Linux caps one read/write at
/// 0x7ffff000 bytes anyway, and POSIX allows partial transfers (callers loop).
pub const MAX_TRANSFER: usize = 0x7fff_f000;

#[cfg(unix)]
mod imp {
    use super::{last_errno, MAX_TRANSFER};

    /// Reads up to `len` bytes at `offset`; returns bytes read or `-errno`.
    ///
    /// # Safety
    /// `buf` must be valid for `len` bytes of writes.
    pub unsafe fn pread(fd: i32, buf: *mut u8, len: usize, offset: i64) -> i64 {
        loop {
            let r = libc::pread(fd, buf.cast(), len.min(MAX_TRANSFER), offset as libc::off_t);
            if r >= 0 {
                return r as i64;
            }
            let e = last_errno();
            if e != libc::EINTR {
                return -(e as i64);
            }
        }
    }

    /// # Safety
    /// `buf` must be valid for `len` bytes of reads.
    pub unsafe fn pwrite(fd: i32, buf: *const u8, len: usize, offset: i64) -> i64 {
        loop {
            let r = libc::pwrite(fd, buf.cast(), len.min(MAX_TRANSFER), offset as libc::off_t);
            if r >= 0 {
                return r as i64;
            }
            let e = last_errno();
            if e != libc::EINTR {
                return -(e as i64);
            }
        }
    }

    fn retry(f: impl Fn() -> libc::c_int) -> i64 {
        loop {
            if f() == 0 {
                return 0;
            }
            let e = last_errno();
            if e != libc::EINTR {
                return -(e as i64);
            }
        }
    }

    pub fn fsync(fd: i32) -> i64 {
        retry(|| unsafe { libc::fsync(fd) })
    }

    /// `fdatasync` where the platform has it, `fsync` elsewhere (macOS).
    pub fn fdatasync(fd: i32) -> i64 {
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
        {
            retry(|| unsafe { libc::fdatasync(fd) })
        }
        #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
        {
            fsync(fd)
        }
    }
}

#[cfg(windows)]
mod imp {
    //! Windows: positional I/O on the fd's HANDLE with an OVERLAPPED offset
    //! (binary-safe, does not move the CRT file position), FlushFileBuffers for
    //! both syncs. `_get_osfhandle` on a bad fd would invoke the CRT's
    //! invalid-parameter handler (abort by default); we install a no-op handler
    //! for the calling thread only and restore the previous one immediately.
    use super::MAX_TRANSFER;
    use std::ffi::c_void;

    type Handle = *mut c_void;
    type InvalidParameterHandler =
        Option<unsafe extern "C" fn(*const u16, *const u16, *const u16, u32, usize)>;

    #[repr(C)]
    struct Overlapped {
        internal: usize,
        internal_high: usize,
        offset: u32,
        offset_high: u32,
        h_event: Handle,
    }

    extern "C" {
        fn _get_osfhandle(fd: i32) -> isize;
        fn _set_thread_local_invalid_parameter_handler(
            h: InvalidParameterHandler,
        ) -> InvalidParameterHandler;
    }

    #[link(name = "kernel32")]
    extern "system" {
        fn ReadFile(
            h: Handle,
            buf: *mut c_void,
            n: u32,
            read: *mut u32,
            ov: *mut Overlapped,
        ) -> i32;
        fn WriteFile(
            h: Handle,
            buf: *const c_void,
            n: u32,
            w: *mut u32,
            ov: *mut Overlapped,
        ) -> i32;
        fn FlushFileBuffers(h: Handle) -> i32;
        fn GetLastError() -> u32;
    }

    const ERROR_ACCESS_DENIED: u32 = 5;
    const ERROR_INVALID_HANDLE: u32 = 6;
    const ERROR_NOT_ENOUGH_MEMORY: u32 = 8;
    const ERROR_OUTOFMEMORY: u32 = 14;
    const ERROR_HANDLE_EOF: u32 = 38;
    const ERROR_BROKEN_PIPE: u32 = 109;
    const ERROR_DISK_FULL: u32 = 112;
    const ERROR_INVALID_PARAMETER: u32 = 87;
    const ERROR_INVALID_FUNCTION: u32 = 1;
    const ERROR_IO_PENDING: u32 = 997;

    const EBADF: i64 = 9;
    const EACCES: i64 = 13;
    const ENOMEM: i64 = 12;
    const ENOSPC: i64 = 28;
    const EINVAL: i64 = 22;
    const EIO: i64 = 5;

    unsafe extern "C" fn ignore_invalid_parameter(
        _: *const u16,
        _: *const u16,
        _: *const u16,
        _: u32,
        _: usize,
    ) {
    }

    fn handle_of(fd: i32) -> Option<Handle> {
        unsafe {
            let prev = _set_thread_local_invalid_parameter_handler(Some(ignore_invalid_parameter));
            let h = _get_osfhandle(fd);
            _set_thread_local_invalid_parameter_handler(prev);
            if h == -1 || h == -2 {
                None
            } else {
                Some(h as Handle)
            }
        }
    }

    fn errno_of(code: u32) -> i64 {
        match code {
            ERROR_INVALID_HANDLE => EBADF,
            ERROR_ACCESS_DENIED => EBADF,
            ERROR_NOT_ENOUGH_MEMORY | ERROR_OUTOFMEMORY => ENOMEM,
            ERROR_DISK_FULL => ENOSPC,
            ERROR_INVALID_PARAMETER | ERROR_INVALID_FUNCTION => EINVAL,
            _ => EIO,
        }
    }

    fn overlapped(offset: i64) -> Overlapped {
        Overlapped {
            internal: 0,
            internal_high: 0,
            offset: offset as u64 as u32,
            offset_high: ((offset as u64) >> 32) as u32,
            h_event: std::ptr::null_mut(),
        }
    }

    /// # Safety
    /// `buf` must be valid for `len` bytes of writes.
    pub unsafe fn pread(fd: i32, buf: *mut u8, len: usize, offset: i64) -> i64 {
        let Some(h) = handle_of(fd) else {
            return -EBADF;
        };
        if offset < 0 {
            return -EINVAL;
        }
        let mut ov = overlapped(offset);
        let mut done: u32 = 0;
        let n = len.min(MAX_TRANSFER) as u32;
        if ReadFile(h, buf.cast(), n, &mut done, &mut ov) != 0 {
            return done as i64;
        }
        match GetLastError() {
            ERROR_HANDLE_EOF | ERROR_BROKEN_PIPE => 0,
            ERROR_IO_PENDING => -EIO,
            code => -errno_of(code),
        }
    }

    /// # Safety
    /// `buf` must be valid for `len` bytes of reads.
    pub unsafe fn pwrite(fd: i32, buf: *const u8, len: usize, offset: i64) -> i64 {
        let Some(h) = handle_of(fd) else {
            return -EBADF;
        };
        if offset < 0 {
            return -EINVAL;
        }
        let mut ov = overlapped(offset);
        let mut done: u32 = 0;
        let n = len.min(MAX_TRANSFER) as u32;
        if WriteFile(h, buf.cast(), n, &mut done, &mut ov) != 0 {
            return done as i64;
        }
        -errno_of(GetLastError())
    }

    pub fn fsync(fd: i32) -> i64 {
        let Some(h) = handle_of(fd) else {
            return -EBADF;
        };
        unsafe {
            if FlushFileBuffers(h) != 0 {
                0
            } else {
                match GetLastError() {
                    ERROR_ACCESS_DENIED => -EACCES,
                    code => -errno_of(code),
                }
            }
        }
    }

    pub fn fdatasync(fd: i32) -> i64 {
        fsync(fd)
    }
}

pub use imp::{fdatasync, fsync, pread, pwrite};

/// `preadv2(fd, [buf, len], offset, RWF_NOWAIT)`: reads only what the page
/// cache can give without blocking. Returns bytes read (possibly short), or
/// `-errno` (`-EAGAIN`: data not cached; `-EOPNOTSUPP`/`-ENOSYS`: not
/// supported here). Issued as a raw syscall: glibc 2.17 (manylinux2014) has
/// no wrapper.
///
/// # Safety
/// `buf` must be valid for `len` bytes of writes.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub unsafe fn pread_nowait(fd: i32, buf: *mut u8, len: usize, offset: u64) -> i64 {
    const RWF_NOWAIT: libc::c_long = 0x0000_0008;
    let iov = libc::iovec {
        iov_base: buf.cast(),
        iov_len: len.min(MAX_TRANSFER),
    };
    // The kernel joins (pos_h << 64) | pos_l on 64-bit targets: pos_l is
    // the whole offset there.
    let lo = offset as libc::c_ulong;
    let hi = ((offset >> 32) >> 32) as libc::c_ulong;
    let r = libc::syscall(
        libc::SYS_preadv2,
        fd as libc::c_long,
        &iov as *const libc::iovec,
        1 as libc::c_long,
        lo,
        hi,
        RWF_NOWAIT,
    );
    if r >= 0 {
        r as i64
    } else {
        -(last_errno() as i64)
    }
}

/// `statx(fd, STATX_DIOALIGN)`: `(memory alignment, offset/length
/// alignment)` for O_DIRECT I/O on `fd`, when the kernel and filesystem report
/// it (Linux >= 6.1). Raw system call, not libc's `statx()` wrapper: that
/// appeared in glibc 2.28 and musl 1.2.5, so linking it would make the
/// modules unloadable on the C libraries manylinux2014/musllinux_1_2 promise.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn dio_alignment(fd: i32) -> Option<(u32, u32)> {
    unsafe {
        let mut st: libc::statx = std::mem::zeroed();
        let r = libc::syscall(
            libc::SYS_statx,
            fd as libc::c_long,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_long,
            libc::STATX_DIOALIGN as libc::c_long,
            &mut st as *mut libc::statx,
        );
        if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
            return None;
        }
        Some((st.stx_dio_mem_align, st.stx_dio_offset_align))
    }
}

/// One alignment that satisfies memory, offsets and lengths for O_DIRECT on
/// `fd`: what [`dio_alignment`] reports, else 4096 (a multiple of every
/// common logical block size).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn direct_alignment(fd: i32) -> usize {
    match dio_alignment(fd) {
        Some((mem, off)) => (mem.max(off) as usize).next_power_of_two().max(512),
        None => 4096,
    }
}

/// If `fd` is open with `O_DIRECT`, the alignment its I/O needs
/// ([`direct_alignment`]); `None` for a buffered fd.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn direct_io_alignment(fd: i32) -> Option<usize> {
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags == -1 || flags & libc::O_DIRECT == 0 {
        return None;
    }
    Some(direct_alignment(fd))
}

/// No `O_DIRECT` on this platform.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn direct_io_alignment(_fd: i32) -> Option<usize> {
    None
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub unsafe fn pread_nowait(_fd: i32, _buf: *mut u8, _len: usize, _offset: u64) -> i64 {
    -(libc::EOPNOTSUPP as i64)
}

// ---------------------------------------------------------------------------
// wake-up fd: tells an event loop "completions are waiting"

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
        unsafe {
            let fd = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(WakeFd {
                read_fd: fd,
                write_fd: fd,
            })
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        unsafe {
            let mut fds = [0i32; 2];
            if libc::pipe(fds.as_mut_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for fd in fds {
                libc::fcntl(
                    fd,
                    libc::F_SETFL,
                    libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
                );
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
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
        unsafe {
            // EAGAIN (counter/pipe full) still leaves the fd readable: fine.
            libc::write(self.write_fd, (&one as *const u64).cast(), 8);
        }
    }

    /// Consumes pending notifications; returns the eventfd counter (Linux) or
    /// the number of bytes drained (pipe). `Ok(0)` when nothing was pending.
    pub fn drain(&self) -> std::io::Result<u64> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        unsafe {
            let mut v: u64 = 0;
            let r = libc::read(self.read_fd, (&mut v as *mut u64).cast(), 8);
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
        unsafe {
            let mut buf = [0u8; 256];
            let mut total = 0u64;
            loop {
                let r = libc::read(self.read_fd, buf.as_mut_ptr().cast(), buf.len());
                if r > 0 {
                    total += r as u64;
                    continue;
                }
                if r < 0 && last_errno() != libc::EAGAIN && total == 0 {
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
    use std::os::fd::AsRawFd;

    fn temp_file(name: &str) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("caio-core-{}-{}", name, std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn strerror_is_the_bare_c_text() {
        assert_eq!(strerror(libc::EBADF), "Bad file descriptor");
        assert_eq!(strerror(libc::ENOENT), "No such file or directory");
    }

    #[test]
    fn positional_io_round_trip() {
        let f = temp_file("rw");
        let fd = f.as_raw_fd();
        let data = b"hello positional world";
        assert_eq!(
            unsafe { pwrite(fd, data.as_ptr(), data.len(), 10) },
            data.len() as i64
        );
        let mut buf = [0u8; 64];
        let n = unsafe { pread(fd, buf.as_mut_ptr(), buf.len(), 10) };
        assert_eq!(n, data.len() as i64);
        assert_eq!(&buf[..data.len()], data);
        // Before the data: a hole of zeros; past EOF: 0 bytes.
        assert_eq!(unsafe { pread(fd, buf.as_mut_ptr(), 10, 0) }, 10);
        assert_eq!(&buf[..10], &[0u8; 10]);
        assert_eq!(unsafe { pread(fd, buf.as_mut_ptr(), 8, 1 << 20) }, 0);
        assert_eq!(fsync(fd), 0);
        assert_eq!(fdatasync(fd), 0);
    }

    #[test]
    fn failures_are_negative_errno() {
        let mut buf = [0u8; 8];
        assert_eq!(
            unsafe { pread(-1, buf.as_mut_ptr(), 8, 0) },
            -(libc::EBADF as i64)
        );
        assert_eq!(
            unsafe { pwrite(-1, buf.as_ptr(), 8, 0) },
            -(libc::EBADF as i64)
        );
        assert_eq!(fsync(-1), -(libc::EBADF as i64));
        let f = temp_file("neg");
        let r = unsafe { pread(f.as_raw_fd(), buf.as_mut_ptr(), 8, -1) };
        assert_eq!(r, -(libc::EINVAL as i64));
    }

    #[test]
    fn nowait_reads_cached_data() {
        let f = temp_file("nowait");
        let fd = f.as_raw_fd();
        let data = [7u8; 8192];
        assert_eq!(unsafe { pwrite(fd, data.as_ptr(), data.len(), 0) }, 8192);
        let mut buf = [0u8; 4096];
        let r = unsafe { pread_nowait(fd, buf.as_mut_ptr(), buf.len(), 4096) };
        // Freshly written pages are cached (or the filesystem says "not
        // supported" / "would block"): never anything else.
        assert!(
            r == 4096 || r == -(libc::EOPNOTSUPP as i64) || r == -(libc::EAGAIN as i64),
            "{r}"
        );
        if r == 4096 {
            assert_eq!(buf, [7u8; 4096]);
            assert_eq!(
                unsafe { pread_nowait(fd, buf.as_mut_ptr(), 10, 1 << 20) },
                0
            );
        }
        assert_eq!(
            unsafe { pread_nowait(-1, buf.as_mut_ptr(), 10, 0) },
            -(libc::EBADF as i64)
        );
    }

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

    #[test]
    fn fork_generation_is_stable_in_one_process() {
        assert_eq!(fork_generation(), fork_generation());
    }
}
