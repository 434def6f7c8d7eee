//! `read_file` and `stat` on the submitting (event-loop) thread when they
//! cannot wait for the disk — the path-operation counterpart of the inline page-cache reads
//! of DESIGN.md §11.3: `openat2(RESOLVE_CACHED)` resolves the path from the
//! dentry cache only (`EAGAIN` otherwise, Linux ≥ 5.12), `preadv2(RWF_NOWAIT)`
//! reads from the page cache only. Anything short of a complete answer —
//! a miss, an error, a file that is not regular, a short read — closes what
//! was opened and leaves the whole job to a worker, which gives the real
//! result (errors included). Kernels without `openat2`/`RESOLVE_CACHED`
//! disable the attempt for good.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};

use super::job::{Job, Outcome};

/// Set once the kernel turned out not to know `openat2` or `RESOLVE_CACHED`.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Largest file read inline (bigger ones go to a worker: the loop thread
/// should not copy megabytes).
pub const INLINE_MAX: usize = 256 * 1024;

fn open_cached(dir_fd: c_int, path: &std::ffi::CStr, flags: c_int) -> Option<c_int> {
    // SAFETY: plain old data; all-zero is valid (and the kernel wants any
    // padding zeroed).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::try_from(flags | libc::O_CLOEXEC).unwrap_or(0);
    how.resolve = libc::RESOLVE_CACHED;
    // SAFETY: a NUL-terminated path and a live `open_how` of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir_fd,
            path.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        return c_int::try_from(fd).ok();
    }
    let e = crate::sys::last_errno();
    if e == libc::ENOSYS || e == libc::EINVAL || e == libc::E2BIG {
        UNSUPPORTED.store(true, Ordering::Relaxed);
    }
    None
}

/// Tries to complete a `read_file` job here; `true` when its outcome is set.
pub fn try_read_file(job: &mut Job) -> bool {
    if UNSUPPORTED.load(Ordering::Relaxed) {
        return false;
    }
    let Some(path) = job.path1.as_deref() else {
        return false;
    };
    let Some(fd) = open_cached(libc::AT_FDCWD, path, libc::O_RDONLY) else {
        return false;
    };
    let data = read_cached(fd);
    // SAFETY: the fd opened above, known to nobody else.
    unsafe { libc::close(fd) };
    match data {
        Some(v) => {
            job.outcome = Outcome::Bytes(v);
            true
        }
        None => false,
    }
}

/// Tries to complete a `stat` of a path here: `openat2(O_PATH,
/// RESOLVE_CACHED)` (no I/O for the lookup; with `O_NOFOLLOW` for
/// `follow_symlinks=False`, the link itself), then `fstatat(fd, "",
/// AT_EMPTY_PATH)` of the in-memory inode. `true` when its outcome is set.
pub fn try_stat(job: &mut Job) -> bool {
    if UNSUPPORTED.load(Ordering::Relaxed) {
        return false;
    }
    let Some(path) = job.path1.as_deref() else {
        return false;
    };
    let nofollow = if job.a == 0 { libc::O_NOFOLLOW } else { 0 };
    let Some(fd) = open_cached(job.fd1, path, libc::O_PATH | nofollow) else {
        return false;
    };
    // SAFETY: plain old data; all-zero is valid.
    let mut st: Box<libc::stat> = Box::new(unsafe { std::mem::zeroed() });
    // SAFETY: the fd opened above; an empty NUL-terminated path; `st` live.
    let r = unsafe { libc::fstatat(fd, c"".as_ptr(), &raw mut *st, libc::AT_EMPTY_PATH) };
    // SAFETY: the fd opened above, known to nobody else.
    unsafe { libc::close(fd) };
    if r != 0 {
        return false;
    }
    job.outcome = Outcome::Stat(st);
    true
}

fn read_cached(fd: c_int) -> Option<Vec<u8>> {
    // SAFETY: plain old data, filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live local.
    if unsafe { libc::fstat(fd, &raw mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return None;
    }
    let size = usize::try_from(st.st_size).ok()?;
    if size > INLINE_MAX {
        return None;
    }
    let mut buf: Vec<u8> = Vec::with_capacity(size + 1);
    // One byte more than the size: a result of exactly `size` bytes means
    // the end of the file was reached (a short answer from the page cache
    // stops before it, and goes to a worker).
    // SAFETY: reads at most `size + 1` bytes into the spare capacity.
    let n = unsafe { crate::sys::pread_nowait(fd, buf.as_mut_ptr(), size + 1, 0) };
    let n = usize::try_from(n).ok()?;
    if n != size {
        return None;
    }
    // SAFETY: the kernel initialised `n` bytes.
    unsafe { buf.set_len(n) };
    Some(buf)
}
