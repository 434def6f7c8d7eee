//! One path job on the ring (DESIGN.md §14): its SQEs, the memory they
//! point into, and the job's outcome once every CQE is in.
//!
//! A flight is boxed and its address is the `user_data` of its SQEs (the
//! step in the low two bits): the path strings (owned by the job), the read
//! buffer and the `statx` buffer stay where the kernel writes them until the
//! last CQE of the flight is consumed, whatever happens to the awaiting task
//! (DESIGN.md §8).

use caio_core::pathop::job::{Code, Job, Outcome};
use caio_core::sys::MAX_TRANSFER;
use io_uring::{opcode, squeue, types};

use super::Supported;

/// First read of `read_file`: this many bytes plus one (a 64 KiB file is
/// read whole by it).
pub const FIRST_READ: usize = 64 * 1024;

/// Later reads of a file that outgrew the first one grow the buffer by at
/// least this much.
const MORE_READ: usize = 64 * 1024;

/// `user_data` step of the open of `read_file`, of its first read (and
/// every later one), of the one-byte probe read behind it.
const STEP_OPEN: u64 = 0;
const STEP_READ: u64 = 1;
const STEP_PROBE: u64 = 2;

pub struct Flight {
    pub job: Box<Job>,
    /// CQEs still to come.
    pending: u32,
    /// Results of the steps (indexed by step).
    res: [i32; 3],
    /// `read_file`'s direct descriptor slot.
    pub slot: Option<u32>,
    /// `read_file`: the bytes read so far (the kernel writes into the spare
    /// capacity).
    buf: Vec<u8>,
    /// `read_file`: the target of the probe read behind the first read.
    probe: [u8; 1],
    /// `read_file`: later reads (the file outgrew the first read).
    more: bool,
    /// `stat`.
    statx: libc::statx,
}

/// What a flight wants after its last CQE.
pub enum Next {
    /// Finished: the job's outcome is set.
    Done,
    /// Another read of `read_file` (this SQE).
    Read(squeue::Entry),
}

#[allow(clippy::cast_possible_truncation)] // flags and modes are C ints by contract (as job.rs)
fn as_int(v: i64) -> i32 {
    v as i32
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // mode bits (as job.rs)
fn as_mode(v: i64) -> libc::mode_t {
    v as libc::mode_t
}

#[allow(clippy::cast_sign_loss)] // the kernel reads these fields as signed (loff_t)
fn as_u64(v: i64) -> u64 {
    v as u64
}

impl Flight {
    pub fn new(job: Box<Job>) -> Box<Flight> {
        Box::new(Flight {
            job,
            pending: 0,
            res: [0; 3],
            slot: None,
            buf: Vec::new(),
            probe: [0],
            more: false,
            // SAFETY: plain old data; all-zero is a valid value.
            statx: unsafe { std::mem::zeroed() },
        })
    }

    fn ud(&self, step: u64) -> u64 {
        std::ptr::from_ref(self) as u64 | step
    }

    /// The SQEs of the job, or `None` when the ring has no opcode for it (or
    /// for these arguments): a worker runs it then. `slot` is a free direct
    /// descriptor slot for `read_file` (taken only if used).
    ///
    /// # Safety
    /// `self` is boxed and stays where it is until its last CQE is consumed.
    pub unsafe fn plan(
        &mut self,
        ops: &Supported,
        slot: impl FnOnce() -> Option<u32>,
    ) -> Option<Vec<squeue::Entry>> {
        let j = &*self.job;
        let fd1 = types::Fd(j.fd1);
        let path = j.path1.as_ref().map(|p| p.as_ptr());
        let entry = match j.code {
            Code::Open if ops.open => opcode::OpenAt::new(fd1, path?)
                .flags(as_int(j.a))
                .mode(as_mode(j.b))
                .build(),
            Code::Close if ops.close => opcode::Close::new(fd1).build(),
            Code::Stat if ops.statx => {
                let buf = (&raw mut self.statx).cast::<types::statx>();
                // os.stat is fstatat, which never triggers an automount.
                let (p, flags) = match path {
                    Some(p) if j.a == 0 => (p, libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT),
                    Some(p) => (p, libc::AT_NO_AUTOMOUNT),
                    // os.stat(fd) is fstat: AT_FDCWD (or any negative) is
                    // EBADF there, the cwd for statx: a worker does those.
                    None if j.fd1 >= 0 => (c"".as_ptr(), libc::AT_EMPTY_PATH),
                    None => return None,
                };
                opcode::Statx::new(fd1, p, buf)
                    .flags(flags)
                    .mask(libc::STATX_BASIC_STATS)
                    .build()
            }
            Code::Fallocate if ops.fallocate => opcode::Fallocate::new(fd1, as_u64(j.b))
                .offset(as_u64(j.a))
                .mode(as_int(j.c))
                .build(),
            // The opcode takes a 32-bit length; the kernel checks the rest
            // as posix_fadvise does.
            Code::Fadvise
                if ops.fadvise && j.a >= 0 && (0..=i64::from(u32::MAX)).contains(&j.b) =>
            {
                opcode::Fadvise::new(fd1, j.b, as_int(j.c))
                    .offset(as_u64(j.a))
                    .build()
            }
            Code::Ftruncate if ops.ftruncate && j.a >= 0 => {
                opcode::Ftruncate::new(fd1, as_u64(j.a)).build()
            }
            Code::Unlink if ops.unlinkat => opcode::UnlinkAt::new(fd1, path?).build(),
            Code::Rename if ops.renameat => {
                let p2 = j.path2.as_ref()?.as_ptr();
                opcode::RenameAt::new(fd1, path?, types::Fd(j.fd2), p2).build()
            }
            Code::Mkdir if ops.mkdirat => {
                opcode::MkDirAt::new(fd1, path?).mode(as_mode(j.a)).build()
            }
            Code::ReadFile if ops.read_file() => {
                let p = path?;
                let slot = slot()?;
                // SAFETY: forwarded contract.
                return Some(unsafe { self.plan_read_file(p, slot) });
            }
            _ => return None,
        };
        self.pending = 1;
        Some(vec![entry.user_data(self.ud(STEP_READ))])
    }

    /// `read_file` as one linked chain on a direct descriptor: OPENAT into
    /// `slot` → READ of [`FIRST_READ`] + 1 bytes (runs only if the open
    /// succeeded) → READ of one byte (hard link: runs whatever the first
    /// read returned). A probe read of 0 bytes is the end of the file, for
    /// every kind of file; otherwise later reads follow (see
    /// [`Flight::complete`]). The slot is closed by the ring once the flight
    /// is done.
    ///
    /// # Safety
    /// As for [`Flight::plan`]; `path` is the job's.
    unsafe fn plan_read_file(
        &mut self,
        path: *const libc::c_char,
        slot: u32,
    ) -> Vec<squeue::Entry> {
        self.slot = Some(slot);
        self.buf = Vec::with_capacity(FIRST_READ + 1);
        self.pending = 3;
        let fixed = types::Fixed(slot);
        let dest = types::DestinationSlot::try_from_slot_target(slot).ok();
        // O_CLOEXEC does not apply to a direct descriptor (the kernel
        // refuses it there).
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path)
            .flags(libc::O_RDONLY)
            .file_index(dest)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(self.ud(STEP_OPEN));
        // `u64::MAX`: at the file position, as read(2) (pipes have none).
        #[allow(clippy::cast_possible_truncation)] // FIRST_READ + 1 fits u32
        let read = opcode::Read::new(fixed, self.buf.as_mut_ptr(), (FIRST_READ + 1) as u32)
            .offset(u64::MAX)
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data(self.ud(STEP_READ));
        let probe = opcode::Read::new(fixed, self.probe.as_mut_ptr(), 1)
            .offset(u64::MAX)
            .build()
            .user_data(self.ud(STEP_PROBE));
        vec![open, read, probe]
    }

    /// Records one CQE (`step` from its `user_data`); `true` when it was
    /// the flight's last.
    pub fn record(&mut self, step: u64, res: i32) -> bool {
        #[allow(clippy::cast_possible_truncation)] // two bits
        let i = (step & 3) as usize;
        if let Some(r) = self.res.get_mut(i) {
            *r = res;
        }
        self.pending = self.pending.saturating_sub(1);
        self.pending == 0
    }

    /// The job's outcome after its last CQE, or the next read of
    /// `read_file` (never when `stopping`: then the job fails with
    /// `ECANCELED`).
    pub fn complete(&mut self, stopping: bool) -> Next {
        let res = self.res[STEP_READ as usize];
        self.job.outcome = match self.job.code {
            Code::ReadFile => return self.complete_read_file(stopping),
            _ if res < 0 => Outcome::Failed(-res),
            Code::Open => Outcome::Int(i64::from(res)),
            Code::Stat => Outcome::Stat(Box::new(stat_of(&self.statx))),
            _ => Outcome::Unit,
        };
        Next::Done
    }

    fn fail(&mut self, res: i32) -> Next {
        self.job.outcome = Outcome::Failed(-res);
        Next::Done
    }

    fn complete_read_file(&mut self, stopping: bool) -> Next {
        let [open, read, probe] = self.res;
        if !self.more {
            if open < 0 {
                // Nothing was installed in the slot.
                return self.fail(open);
            }
            if read < 0 {
                return self.fail(read);
            }
            // SAFETY: the kernel initialised `read` bytes of the spare
            // capacity (at most FIRST_READ + 1, the capacity).
            unsafe { self.buf.set_len(usize::try_from(read).unwrap_or(0)) };
            if probe < 0 {
                return self.fail(probe);
            }
            if probe == 0 {
                return self.done();
            }
            self.buf.push(self.probe[0]);
            self.more = true;
        } else {
            if read < 0 {
                return self.fail(read);
            }
            if read == 0 {
                return self.done();
            }
            let n = usize::try_from(read).unwrap_or(0);
            // SAFETY: the kernel initialised `n` more bytes of the spare
            // capacity (at most the room the read was given).
            unsafe { self.buf.set_len(self.buf.len() + n) };
        }
        if stopping {
            return self.fail(-libc::ECANCELED);
        }
        self.next_read()
    }

    fn done(&mut self) -> Next {
        self.job.outcome = Outcome::Bytes(std::mem::take(&mut self.buf));
        Next::Done
    }

    /// The next read of a file that outgrew what was read (until a read
    /// returns 0, as the worker reads a file that is not regular).
    fn next_read(&mut self) -> Next {
        let want = self.buf.capacity().max(MORE_READ);
        if self.buf.capacity() - self.buf.len() < MORE_READ {
            self.buf.reserve(want);
        }
        let room = (self.buf.capacity() - self.buf.len()).min(MAX_TRANSFER);
        self.pending = 1;
        let Some(slot) = self.slot else {
            return self.fail(-libc::EBADF);
        };
        // SAFETY: points at the vector's spare capacity, `room` bytes.
        let ptr = unsafe { self.buf.as_mut_ptr().add(self.buf.len()) };
        #[allow(clippy::cast_possible_truncation)] // at most MAX_TRANSFER
        let e = opcode::Read::new(types::Fixed(slot), ptr, room as u32)
            .offset(u64::MAX)
            .build()
            .user_data(self.ud(STEP_READ));
        Next::Read(e)
    }

    /// Whether the open of `read_file` installed its slot (so the slot is
    /// to be closed).
    pub fn slot_installed(&self) -> bool {
        self.job.code == Code::ReadFile && self.res[STEP_OPEN as usize] >= 0
    }
}

/// `statx` as the `stat` that `fstatat` fills (the fields `os.stat_result`
/// shows), for the same builder as the workers' results.
// Field types vary by target; the kernel's `stat` holds these values as
// the same (signed) types.
#[allow(
    clippy::useless_conversion,
    clippy::unnecessary_cast,
    clippy::cast_lossless,
    clippy::cast_possible_wrap
)]
fn stat_of(x: &libc::statx) -> libc::stat {
    // SAFETY: plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    st.st_dev = libc::makedev(x.stx_dev_major, x.stx_dev_minor);
    st.st_ino = x.stx_ino as _;
    st.st_mode = libc::mode_t::from(x.stx_mode);
    st.st_nlink = x.stx_nlink as _;
    st.st_uid = x.stx_uid;
    st.st_gid = x.stx_gid;
    st.st_rdev = libc::makedev(x.stx_rdev_major, x.stx_rdev_minor);
    st.st_size = x.stx_size as _;
    st.st_blksize = x.stx_blksize as _;
    st.st_blocks = x.stx_blocks as _;
    st.st_atime = x.stx_atime.tv_sec as _;
    st.st_atime_nsec = x.stx_atime.tv_nsec as _;
    st.st_mtime = x.stx_mtime.tv_sec as _;
    st.st_mtime_nsec = x.stx_mtime.tv_nsec as _;
    st.st_ctime = x.stx_ctime.tv_sec as _;
    st.st_ctime_nsec = x.stx_ctime.tv_nsec as _;
    st
}
