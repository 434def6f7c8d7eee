//! One path job and what a worker does with it: the system calls, on the
//! worker's thread, without the GIL (DESIGN.md §14). Nothing here touches a
//! Python object; the job's Python references ([`PyRefs`]) travel with it
//! and are only used by the thread that drains the runner, attached.

use std::ffi::{c_int, CString};

use pyo3_ffi::PyObject;

/// What a job does (the numbers of `caio/_pathops.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Open = 1,
    Close = 2,
    Stat = 3,
    Fallocate = 4,
    Ftruncate = 5,
    Fadvise = 6,
    Unlink = 7,
    Rename = 8,
    Mkdir = 9,
    ReadFile = 10,
    WriteFile = 11,
}

impl Code {
    pub fn from_i64(v: i64) -> Option<Code> {
        Some(match v {
            1 => Code::Open,
            2 => Code::Close,
            3 => Code::Stat,
            4 => Code::Fallocate,
            5 => Code::Ftruncate,
            6 => Code::Fadvise,
            7 => Code::Unlink,
            8 => Code::Rename,
            9 => Code::Mkdir,
            10 => Code::ReadFile,
            11 => Code::WriteFile,
            _ => return None,
        })
    }
}

/// The result of a job, turned into a Python object by the drain.
pub enum Outcome {
    Pending,
    /// `errno` of the failed step.
    Failed(i32),
    Unit,
    Int(i64),
    Bytes(Vec<u8>),
    Stat(Box<libc::stat>),
}

/// Strong references owned by the job (any may be NULL): the future to
/// resolve, the `filename`/`filename2` objects of an error, and the `bytes`
/// object `write_file` writes from (so its memory outlives the job).
pub struct PyRefs {
    pub future: *mut PyObject,
    pub name1: *mut PyObject,
    pub name2: *mut PyObject,
    pub data: *mut PyObject,
}

pub struct Job {
    pub code: Code,
    pub path1: Option<CString>,
    pub path2: Option<CString>,
    /// fd, or `dir_fd` (`AT_FDCWD` for none).
    pub fd1: c_int,
    pub fd2: c_int,
    pub a: i64,
    pub b: i64,
    pub c: i64,
    /// `write_file`'s payload: the data of the `bytes` object in `py.data`
    /// (immutable, kept alive by that reference).
    pub data: *const u8,
    pub data_len: usize,
    pub py: PyRefs,
    pub outcome: Outcome,
}

// SAFETY: a job is used by one thread at a time (submitter, then one worker,
// then the drain). Workers only read the paths, integers and the immutable
// `bytes` payload, kept alive by the job's reference; the Python references
// are only touched by the submitting and draining threads, attached.
unsafe impl Send for Job {}

fn errno() -> i32 {
    crate::sys::last_errno()
}

/// Retries `f` while it fails with `EINTR`; `Err(errno)` otherwise.
fn retry<T: PartialOrd + Default>(mut f: impl FnMut() -> T) -> Result<T, i32> {
    loop {
        let r = f();
        if r >= T::default() {
            return Ok(r);
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

fn cpath(p: Option<&CString>) -> *const libc::c_char {
    p.map_or(std::ptr::null(), |c| c.as_ptr())
}

fn unit(r: Result<c_int, i32>) -> Outcome {
    match r {
        Ok(_) => Outcome::Unit,
        Err(e) => Outcome::Failed(e),
    }
}

#[allow(clippy::cast_possible_truncation)] // flags and modes are C ints by contract
fn as_int(v: i64) -> c_int {
    v as c_int
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // mode bits
fn as_mode(v: i64) -> libc::mode_t {
    v as libc::mode_t
}

/// Runs the job's system calls and records the outcome.
pub fn run(job: &mut Job) {
    job.outcome = match job.code {
        Code::Open => {
            let p = cpath(job.path1.as_ref());
            // SAFETY: a NUL-terminated path owned by the job; no memory out.
            match retry(|| unsafe {
                libc::openat(
                    job.fd1,
                    p,
                    as_int(job.a),
                    libc::c_uint::from(as_mode(job.b)),
                )
            }) {
                Ok(fd) => Outcome::Int(i64::from(fd)),
                Err(e) => Outcome::Failed(e),
            }
        }
        Code::Close => {
            // SAFETY: closes the caller's fd, as os.close would.
            unit(if unsafe { libc::close(job.fd1) } == 0 {
                Ok(0)
            } else {
                Err(errno())
            })
        }
        Code::Stat => stat(job),
        Code::Fallocate => fallocate(job.fd1, job.a, job.b, job.c),
        Code::Ftruncate => {
            // SAFETY: no memory arguments.
            unit(retry(|| unsafe { libc::ftruncate(job.fd1, job.a) }))
        }
        Code::Fadvise => fadvise(job.fd1, job.a, job.b, job.c),
        Code::Unlink => {
            let p = cpath(job.path1.as_ref());
            // SAFETY: a NUL-terminated path owned by the job.
            unit(retry(|| unsafe { libc::unlinkat(job.fd1, p, 0) }))
        }
        Code::Rename => {
            let (p1, p2) = (cpath(job.path1.as_ref()), cpath(job.path2.as_ref()));
            // SAFETY: NUL-terminated paths owned by the job.
            unit(retry(|| unsafe {
                libc::renameat(job.fd1, p1, job.fd2, p2)
            }))
        }
        Code::Mkdir => {
            let p = cpath(job.path1.as_ref());
            // SAFETY: a NUL-terminated path owned by the job.
            unit(retry(|| unsafe {
                libc::mkdirat(job.fd1, p, as_mode(job.a))
            }))
        }
        Code::ReadFile => read_file(job),
        Code::WriteFile => write_file(job),
    };
}

fn stat(job: &Job) -> Outcome {
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    let mut st: Box<libc::stat> = Box::new(unsafe { std::mem::zeroed() });
    let out: *mut libc::stat = &raw mut *st;
    let r = match job.path1.as_ref() {
        // SAFETY: `out` points to a live `stat` the call fills.
        None => retry(|| unsafe { libc::fstat(job.fd1, out) }),
        Some(p) => {
            let flags = if job.a == 0 {
                libc::AT_SYMLINK_NOFOLLOW
            } else {
                0
            };
            // SAFETY: a NUL-terminated path owned by the job; `out` as above.
            retry(|| unsafe { libc::fstatat(job.fd1, p.as_ptr(), out, flags) })
        }
    };
    match r {
        Ok(_) => Outcome::Stat(st),
        Err(e) => Outcome::Failed(e),
    }
}

#[cfg(target_os = "linux")]
fn fallocate(fd: c_int, offset: i64, length: i64, mode: i64) -> Outcome {
    // SAFETY: no memory arguments.
    unit(retry(|| unsafe {
        libc::fallocate(fd, as_int(mode), offset, length)
    }))
}

#[cfg(not(target_os = "linux"))]
fn fallocate(fd: c_int, offset: i64, length: i64, mode: i64) -> Outcome {
    if mode != 0 {
        return Outcome::Failed(libc::EOPNOTSUPP);
    }
    // SAFETY: no memory arguments; returns an errno value.
    match unsafe { libc::posix_fallocate(fd, offset, length) } {
        0 => Outcome::Unit,
        e => Outcome::Failed(e),
    }
}

#[cfg(target_os = "linux")]
fn fadvise(fd: c_int, offset: i64, length: i64, advice: i64) -> Outcome {
    // SAFETY: no memory arguments; returns an errno value.
    match unsafe { libc::posix_fadvise(fd, offset, length, as_int(advice)) } {
        0 => Outcome::Unit,
        e => Outcome::Failed(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn fadvise(_fd: c_int, _offset: i64, _length: i64, _advice: i64) -> Outcome {
    Outcome::Failed(libc::ENOSYS)
}

/// Closes an fd the job opened itself (its error is of no interest: the
/// data was read, or the first error is the one reported).
fn close_own(fd: c_int) {
    // SAFETY: an fd this job opened and nobody else knows.
    unsafe { libc::close(fd) };
}

fn read_file(job: &Job) -> Outcome {
    let p = cpath(job.path1.as_ref());
    // SAFETY: a NUL-terminated path owned by the job.
    let fd = match retry(|| unsafe {
        libc::openat(libc::AT_FDCWD, p, libc::O_RDONLY | libc::O_CLOEXEC, 0)
    }) {
        Ok(fd) => fd,
        Err(e) => return Outcome::Failed(e),
    };
    let r = read_all(fd);
    close_own(fd);
    match r {
        Ok(v) => Outcome::Bytes(v),
        Err(e) => Outcome::Failed(e),
    }
}

/// Reads `fd` to its end. A regular file is read with one `read` of its
/// size plus one byte: a short read is its end, and a second read happens
/// only when the file outgrew `st_size`. Anything else (pipes, `/proc`
/// files reporting size 0) is read until `read` returns 0.
fn read_all(fd: c_int) -> Result<Vec<u8>, i32> {
    // SAFETY: plain old data, filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live local.
    retry(|| unsafe { libc::fstat(fd, &raw mut st) })?;
    let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
    let size = usize::try_from(st.st_size).unwrap_or(0);
    let mut buf: Vec<u8> = Vec::with_capacity(if regular { size + 1 } else { 64 * 1024 });
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(buf.capacity().max(64 * 1024));
        }
        let room = (buf.capacity() - buf.len()).min(crate::sys::MAX_TRANSFER);
        // SAFETY: writes at most `room` bytes into the vector's spare
        // capacity, then the length covers exactly the bytes read.
        let n = retry(|| unsafe { libc::read(fd, buf.as_mut_ptr().add(buf.len()).cast(), room) })?;
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            return Ok(buf);
        }
        // SAFETY: the kernel initialised `n` more bytes.
        unsafe { buf.set_len(buf.len() + n) };
        if regular && n < room {
            return Ok(buf);
        }
    }
}

fn write_file(job: &Job) -> Outcome {
    let p = cpath(job.path1.as_ref());
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated path owned by the job.
    let fd = match retry(|| unsafe {
        libc::openat(libc::AT_FDCWD, p, flags, libc::c_uint::from(as_mode(job.a)))
    }) {
        Ok(fd) => fd,
        Err(e) => return Outcome::Failed(e),
    };
    let mut done = 0usize;
    let mut r = Ok(());
    while done < job.data_len {
        let len = (job.data_len - done).min(crate::sys::MAX_TRANSFER);
        // SAFETY: `data` is the job's immutable payload of `data_len` bytes,
        // kept alive by the job's reference to its `bytes` object.
        match retry(|| unsafe { libc::write(fd, job.data.add(done).cast(), len) }) {
            Ok(n) => done += usize::try_from(n).unwrap_or(0),
            Err(e) => {
                r = Err(e);
                break;
            }
        }
    }
    if r.is_ok() && job.b != 0 {
        // SAFETY: no memory arguments.
        r = retry(|| unsafe { libc::fsync(fd) }).map(drop);
    }
    // SAFETY: the fd this job opened; its close error counts (data may be
    // lost), as a Python `close()` would report it.
    let c = if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(errno())
    };
    match r.and(c) {
        Ok(()) => Outcome::Int(i64::try_from(done).unwrap_or(i64::MAX)),
        Err(e) => Outcome::Failed(e),
    }
}
