//! The asyncio adapter's second engine: core's worker pool
//! (`caio_core::pool`) for what a ring does badly.
//!
//! Buffered writes through io_uring cannot be issued without blocking on
//! ext4 (and tmpfs): the kernel refuses `IOCB_NOWAIT` for them, so every
//! such write is punted to io-wq, whose workers serialise writes to one
//! inode (hashed work). Measured on Linux 6.18/ext4, 4 KiB random writes at
//! concurrency 64: ~130k op/s through the ring against ~270k on the pool
//! (thread_aio). So the adapter sends buffered writes — and, to keep an
//! fsync behind the writes it must cover, fsyncs and fdatasyncs — of fds
//! not known to be `O_DIRECT` to the pool. `O_DIRECT` I/O (truly
//! asynchronous in the ring) and everything of a raw Context stay on the
//! ring. Mid-size reads (above 64 KiB, up to 1 MiB) go there too while a
//! second core is available (`spare`): a worker copies them on another core
//! instead of the loop thread inside `io_uring_enter` (the copy rule,
//! DESIGN.md §7.2).
//!
//! Completions come back through a [`CompletionQueue`] whose wake-up fd
//! **is** the ring's registered eventfd (`CompletionQueue::new_shared`): one
//! fd wakes the loop for CQEs and worker results alike, and the loop's
//! reader delivers both. The pool is created on first use, with
//! `POOL_SIZE` threads that never touch the GIL (queued delivery).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use caio_core::op::{self, OpKind, Operation};
use caio_core::pool::{CompletionQueue, Job, Pool};
use caio_core::py::{PyErr, PyResult};

/// Worker threads of the pool (thread_aio's default `pool_size`).
const POOL_SIZE: usize = 8;

/// The copy rule for reads (DESIGN.md §7.2): up to this size a read is
/// copied on the loop thread (a page-cache hit is served inline, else the
/// ring); the hand-off to another core costs more than the copy.
pub(crate) const COPY_ON_LOOP_MAX: u64 = 64 * 1024;

/// Above [`COPY_ON_LOOP_MAX`] and up to this size a read is copied by a
/// worker while a second core is available to the process
/// (`spare::spare_cpu`). Larger reads stay on the
/// ring (entered with the GIL released): a fresh multi-megabyte `bytes`
/// object filled by several worker threads pays page faults and unmap TLB
/// shootdowns across them (4 MiB: 0.3k op/s on the pool against 1.3k on the
/// ring in the full run of issue 16).
const COPY_ON_WORKER_MAX: u64 = 1024 * 1024;

/// Whether `fd` is a regular file (one `fstat`, about half a microsecond:
/// fd numbers are reused, so the answer is not cached). Only regular files
/// go to the pool: `pread`/`pwrite` on a pipe, socket or FIFO fail with
/// `ESPIPE` where the ring reads and writes the stream, and an fsync must
/// run where the writes it covers ran (block devices stay on the ring).
fn is_regular_file(fd: i32) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes at most one `struct stat` into `st`.
    let r = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    // SAFETY: initialised by a successful fstat.
    r == 0 && (unsafe { st.assume_init() }.st_mode & libc::S_IFMT) == libc::S_IFREG
}

pub(crate) struct Workers {
    /// Shares its fd with the ring (the ring's eventfd, owned here).
    queue: Arc<CompletionQueue>,
    pool: OnceLock<Result<Arc<Pool>, ()>>,
    /// Ops handed to the pool and not delivered yet.
    in_flight: AtomicUsize,
}

impl Workers {
    pub(crate) fn new() -> std::io::Result<Workers> {
        Ok(Workers {
            queue: Arc::new(CompletionQueue::new_shared()?),
            pool: OnceLock::new(),
            in_flight: AtomicUsize::new(0),
        })
    }

    /// The eventfd the ring registers (see the module doc).
    pub(crate) fn eventfd(&self) -> i32 {
        self.queue.fileno()
    }

    fn pool(&self) -> Option<&Arc<Pool>> {
        self.pool.get().and_then(|p| p.as_ref().ok())
    }

    /// Whether the adapter sends `o` to the pool rather than the ring: a
    /// write or writev at an explicit offset (offset −1, "the current position",
    /// stays on the ring), an fsync or an fdatasync, or — on a plain ring
    /// while a second core is available — a read of more than
    /// [`COPY_ON_LOOP_MAX`] and at most [`COPY_ON_WORKER_MAX`] bytes at an
    /// explicit offset (of any size and whatever the cores, when its
    /// destination sits at a slow copy distance); always on a regular file neither the ring nor the
    /// pool found to be `O_DIRECT`.
    pub(crate) fn takes(
        &self,
        o: &Operation,
        sqpoll: bool,
        ring_knows_direct: impl Fn(i32) -> bool,
    ) -> bool {
        let routed = match o.kind {
            OpKind::Write | OpKind::WriteV => o.offset_i64() >= 0,
            // One vectored read: left to the ring.
            OpKind::ReadV => false,
            OpKind::Fsync | OpKind::Fdsync => true,
            OpKind::Read => {
                o.offset_i64() >= 0
                    && o.nbytes > COPY_ON_LOOP_MAX
                    && !sqpoll
                    // Into memory at a slow copy distance the ring's copy
                    // is ~3.5x slower; a worker's is not (DESIGN.md §11.3).
                    && (o.slow_copy_distance
                        || o.nbytes <= COPY_ON_WORKER_MAX && crate::spare::spare_cpu())
            }
        };
        if !routed {
            return false;
        }
        let fd = o.fd_i32();
        !ring_knows_direct(fd)
            && !self.pool().is_some_and(|p| p.knows_direct(fd))
            && is_regular_file(fd)
    }

    /// Hands a claimed and begun op to the pool (started on first use).
    /// On error the op is still the caller's (roll it back).
    pub(crate) fn submit(&self, op: *mut Operation) -> PyResult<()> {
        let pool = self.pool.get_or_init(|| {
            let p = Pool::new(POOL_SIZE, usize::MAX).map_err(drop)?;
            if p.install_completion_queue(self.queue.clone()).is_err()
                || p.enable_queued_delivery().is_err()
            {
                p.shutdown(false);
                return Err(());
            }
            Ok(Arc::new(p))
        });
        let Ok(pool) = pool else {
            return Err(PyErr::runtime("could not start the worker threads"));
        };
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if pool.submit(Job(op)).is_err() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(PyErr::runtime("the worker pool is closed"));
        }
        Ok(())
    }

    /// Takes back `op` if no worker has started it and completes it as
    /// cancelled. False: not queued here (running, done, or on the ring).
    ///
    /// # Safety
    /// Attached (the delivery runs here).
    pub(crate) unsafe fn cancel(&self, op: *mut Operation) -> bool {
        let Some(job) = self.pool().and_then(|p| p.try_cancel(op)) else {
            return false;
        };
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        // SAFETY: the pool handed the job back, so it is in flight and ours
        // alone; attached (contract above).
        unsafe { op::finish(job.0, -i64::from(libc::ECANCELED)) }.run();
        true
    }

    /// Delivers every queued worker result (the ring's eventfd reader
    /// consumed the shared fd). Returns how many.
    ///
    /// # Safety
    /// Attached (callbacks and futures run here).
    pub(crate) unsafe fn deliver(&self) -> usize {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            return 0;
        }
        // SAFETY: attached (contract above).
        let n = unsafe { self.queue.deliver_all() };
        self.in_flight.fetch_sub(n, Ordering::AcqRel);
        n
    }

    /// Ops handed to the pool and not delivered yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Stops the pool's idle threads (nothing is in flight: every op holds
    /// its Context). In a forked child the threads do not exist and the
    /// copied pool is left alone.
    pub(crate) fn release(&self, forked: bool) {
        if let Some(pool) = self.pool() {
            if forked {
                // Never dropped: its lock may have been held by a parent
                // thread at fork().
                std::mem::forget(pool.clone());
            } else {
                caio_core::py::allow_threads(|| pool.shutdown(true));
            }
        }
    }
}
