//! Positional I/O for worker threads (never called attached): `pread`,
//! `pwrite`, `fsync`, `fdatasync`, and the non-blocking page-cache read
//! `pread_nowait`. Every function returns bytes moved (or 0) or `-errno`.

/// Largest single transfer we ask the kernel for: Linux caps one read/write at
/// 0x7ffff000 bytes anyway, and POSIX allows partial transfers (callers loop).
pub const MAX_TRANSFER: usize = 0x7fff_f000;

/// `-errno` as a result value.
#[inline]
pub fn neg(errno: i32) -> i64 {
    -i64::from(errno)
}

#[cfg(unix)]
mod imp {
    use super::{neg, IoVec, MAX_TRANSFER};
    use crate::sys::last_errno;

    /// A successful `ssize_t` result (never negative here) as `i64`.
    #[inline]
    fn count(r: isize) -> i64 {
        i64::try_from(r).unwrap_or(i64::MAX)
    }

    /// Reads up to `len` bytes at `offset`; returns bytes read or `-errno`.
    ///
    /// # Safety
    /// `buf` must be valid for `len` bytes of writes.
    pub unsafe fn pread(fd: i32, buf: *mut u8, len: usize, offset: i64) -> i64 {
        loop {
            // SAFETY: `buf` is valid for `len` (≥ the clamped length) bytes
            // of writes (caller's contract).
            let r = unsafe {
                libc::pread(fd, buf.cast(), len.min(MAX_TRANSFER), offset as libc::off_t)
            };
            if r >= 0 {
                return count(r);
            }
            let e = last_errno();
            if e != libc::EINTR {
                return neg(e);
            }
        }
    }

    /// Writes up to `len` bytes at `offset`; returns bytes written or `-errno`.
    ///
    /// # Safety
    /// `buf` must be valid for `len` bytes of reads.
    pub unsafe fn pwrite(fd: i32, buf: *const u8, len: usize, offset: i64) -> i64 {
        loop {
            // SAFETY: `buf` is valid for `len` bytes of reads (caller's
            // contract).
            let r = unsafe {
                libc::pwrite(fd, buf.cast(), len.min(MAX_TRANSFER), offset as libc::off_t)
            };
            if r >= 0 {
                return count(r);
            }
            let e = last_errno();
            if e != libc::EINTR {
                return neg(e);
            }
        }
    }

    /// `preadv` (`write == false`) or `pwritev` of `count` iovecs at
    /// `offset`; bytes moved or `-errno`.
    ///
    /// # Safety
    /// `iov` points to `count` iovecs, each valid for its length (writes
    /// for a read, reads for a write).
    pub unsafe fn prwv(fd: i32, iov: *const IoVec, iovcnt: usize, offset: i64, write: bool) -> i64 {
        let n = libc::c_int::try_from(iovcnt).unwrap_or(libc::c_int::MAX);
        loop {
            // SAFETY: `IoVec` has `struct iovec`'s layout; the vector and
            // its buffers are valid (caller's contract).
            let r = unsafe {
                if write {
                    libc::pwritev(fd, iov.cast(), n, offset as libc::off_t)
                } else {
                    libc::preadv(fd, iov.cast(), n, offset as libc::off_t)
                }
            };
            if r >= 0 {
                return count(r);
            }
            let e = last_errno();
            if e != libc::EINTR {
                return neg(e);
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
                return neg(e);
            }
        }
    }

    pub fn fsync(fd: i32) -> i64 {
        // SAFETY: fsync takes any fd value (a bad one fails with EBADF).
        retry(|| unsafe { libc::fsync(fd) })
    }

    /// `fdatasync` where the platform has it, `fsync` elsewhere (macOS).
    pub fn fdatasync(fd: i32) -> i64 {
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
        {
            // SAFETY: fdatasync takes any fd value (a bad one fails with EBADF).
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

    /// # Safety
    /// Called by the CRT with its diagnostic arguments, which are ignored.
    unsafe extern "C" fn ignore_invalid_parameter(
        _: *const u16,
        _: *const u16,
        _: *const u16,
        _: u32,
        _: usize,
    ) {
    }

    fn handle_of(fd: i32) -> Option<Handle> {
        // SAFETY: swaps this thread's CRT invalid-parameter handler for a
        // no-op around `_get_osfhandle` (which accepts any value) and puts
        // the previous one back.
        let h = unsafe {
            let prev = _set_thread_local_invalid_parameter_handler(Some(ignore_invalid_parameter));
            let h = _get_osfhandle(fd);
            _set_thread_local_invalid_parameter_handler(prev);
            h
        };
        if h == -1 || h == -2 {
            None
        } else {
            Some(h as Handle)
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

    /// `offset` is non-negative (checked by the callers).
    fn overlapped(offset: i64) -> Overlapped {
        let offset = u64::try_from(offset).unwrap_or(0);
        Overlapped {
            internal: 0,
            internal_high: 0,
            offset: (offset & 0xffff_ffff) as u32,
            offset_high: (offset >> 32) as u32,
            h_event: std::ptr::null_mut(),
        }
    }

    /// A transfer length (≤ MAX_TRANSFER < 2³¹) as the `u32` Windows takes.
    fn transfer_len(len: usize) -> u32 {
        u32::try_from(len.min(MAX_TRANSFER)).unwrap_or(u32::MAX)
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
        // SAFETY: `buf` valid for `len` bytes (caller's contract); `done`
        // and `ov` are locals that outlive the synchronous call.
        if unsafe { ReadFile(h, buf.cast(), transfer_len(len), &mut done, &mut ov) } != 0 {
            return i64::from(done);
        }
        // SAFETY: reads this thread's last-error value.
        match unsafe { GetLastError() } {
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
        // SAFETY: `buf` valid for `len` bytes (caller's contract); `done`
        // and `ov` are locals that outlive the synchronous call.
        if unsafe { WriteFile(h, buf.cast(), transfer_len(len), &mut done, &mut ov) } != 0 {
            return i64::from(done);
        }
        // SAFETY: reads this thread's last-error value.
        -errno_of(unsafe { GetLastError() })
    }

    pub fn fsync(fd: i32) -> i64 {
        let Some(h) = handle_of(fd) else {
            return -EBADF;
        };
        // SAFETY: `h` is the fd's handle; the calls have no other
        // precondition.
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

    /// No vectored positional I/O on Windows: the buffers in turn, stopping
    /// at a short transfer (not atomic, unlike `preadv`/`pwritev`).
    ///
    /// # Safety
    /// As for the Unix version.
    pub unsafe fn prwv(
        fd: i32,
        iov: *const super::IoVec,
        count: usize,
        offset: i64,
        write: bool,
    ) -> i64 {
        let mut total: i64 = 0;
        for i in 0..count {
            // SAFETY: `i < count` (caller's contract: `count` iovecs).
            let v = unsafe { &*iov.add(i) };
            // SAFETY: each buffer is valid for its length (caller's contract).
            let r = unsafe {
                if write {
                    pwrite(fd, v.base, v.len, offset + total)
                } else {
                    pread(fd, v.base, v.len, offset + total)
                }
            };
            if r < 0 {
                return if total > 0 { total } else { r };
            }
            total += r;
            if usize::try_from(r).unwrap_or(0) < v.len {
                break;
            }
        }
        total
    }
}

/// One buffer of a vectored transfer, laid out as the C `struct iovec`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IoVec {
    pub base: *mut u8,
    pub len: usize,
}

pub use imp::{fdatasync, fsync, pread, prwv, pwrite};

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
    // the whole offset there (the raw bits: the kernel reads them back as
    // the signed loff_t they came from).
    #[allow(clippy::cast_possible_truncation)] // 32-bit targets: the low half, by design
    let lo = offset as libc::c_ulong;
    #[allow(clippy::cast_possible_truncation)] // 0 on 64-bit targets
    let hi = ((offset >> 32) >> 32) as libc::c_ulong;
    // SAFETY: `iov` describes `len` writable bytes at `buf` (caller's
    // contract) and lives for the synchronous call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_preadv2,
            libc::c_long::from(fd),
            std::ptr::from_ref(&iov),
            1 as libc::c_long,
            lo,
            hi,
            RWF_NOWAIT,
        )
    };
    if r >= 0 {
        #[allow(clippy::useless_conversion)] // `c_long` is `i32` on 32-bit targets
        i64::from(r)
    } else {
        neg(crate::sys::last_errno())
    }
}

/// Not available here: always `-EOPNOTSUPP` (the caller uses the pool).
///
/// # Safety
/// None (the signature matches the Linux version's).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub unsafe fn pread_nowait(_fd: i32, _buf: *mut u8, _len: usize, _offset: u64) -> i64 {
    neg(libc::EOPNOTSUPP)
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

    fn rd(fd: i32, buf: &mut [u8], offset: i64) -> i64 {
        // SAFETY: `buf` is a live slice of the length passed.
        unsafe { pread(fd, buf.as_mut_ptr(), buf.len(), offset) }
    }

    fn wr(fd: i32, buf: &[u8], offset: i64) -> i64 {
        // SAFETY: `buf` is a live slice of the length passed.
        unsafe { pwrite(fd, buf.as_ptr(), buf.len(), offset) }
    }

    fn rd_nowait(fd: i32, buf: &mut [u8], offset: u64) -> i64 {
        // SAFETY: `buf` is a live slice of the length passed.
        unsafe { pread_nowait(fd, buf.as_mut_ptr(), buf.len(), offset) }
    }

    #[test]
    fn positional_io_round_trip() {
        let f = temp_file("rw");
        let fd = f.as_raw_fd();
        let data = b"hello positional world";
        let n = i64::try_from(data.len()).unwrap();
        assert_eq!(wr(fd, data, 10), n);
        let mut buf = [0u8; 64];
        assert_eq!(rd(fd, &mut buf, 10), n);
        assert_eq!(&buf[..data.len()], data);
        // Before the data: a hole of zeros; past EOF: 0 bytes.
        assert_eq!(rd(fd, &mut buf[..10], 0), 10);
        assert_eq!(&buf[..10], &[0u8; 10]);
        assert_eq!(rd(fd, &mut buf[..8], 1 << 20), 0);
        assert_eq!(fsync(fd), 0);
        assert_eq!(fdatasync(fd), 0);
    }

    #[test]
    fn failures_are_negative_errno() {
        let mut buf = [0u8; 8];
        assert_eq!(rd(-1, &mut buf, 0), neg(libc::EBADF));
        assert_eq!(wr(-1, &buf, 0), neg(libc::EBADF));
        assert_eq!(fsync(-1), neg(libc::EBADF));
        let f = temp_file("neg");
        assert_eq!(rd(f.as_raw_fd(), &mut buf, -1), neg(libc::EINVAL));
    }

    #[test]
    fn nowait_reads_cached_data() {
        let f = temp_file("nowait");
        let fd = f.as_raw_fd();
        assert_eq!(wr(fd, &[7u8; 8192], 0), 8192);
        let mut buf = [0u8; 4096];
        let r = rd_nowait(fd, &mut buf, 4096);
        // Freshly written pages are cached (or the filesystem says "not
        // supported" / "would block"): never anything else.
        assert!(
            r == 4096 || r == neg(libc::EOPNOTSUPP) || r == neg(libc::EAGAIN),
            "{r}"
        );
        if r == 4096 {
            assert_eq!(buf, [7u8; 4096]);
            assert_eq!(rd_nowait(fd, &mut buf[..10], 1 << 20), 0);
        }
        assert_eq!(rd_nowait(-1, &mut buf[..10], 0), neg(libc::EBADF));
    }
}
