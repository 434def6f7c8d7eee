//! Path jobs as io_uring opcodes (DESIGN.md §14): the engine linux_uring
//! gives core's path runner (`caio_core::pathop::engine`).
//!
//! A small ring of its own, next to the runner's workers: its eventfd is
//! the runner's wake-up fd, so the loop's one drain collects both. Each
//! opcode is used only where `IORING_REGISTER_PROBE` lists it; a job without
//! one (or arguments the opcode cannot take, or a full ring) goes to a
//! worker, with the same result. `read_file` is one linked chain on a
//! direct descriptor (see [`flight`]). Every flight, with its buffers, stays
//! the engine's until its last CQE is consumed; the slots of `read_file`
//! are closed by the ring once their flight is done. [`PathRing::shutdown`]
//! (the runner is closed or deallocated) cancels what runs and waits for
//! every CQE; a forked child never touches the parent's ring.
//!
//! Test hook (builds with the `test-hooks` feature): `CAIO_TEST_URING_PATH_MASK`
//! = comma-separated opcode numbers (or `all`) the probe is to deny.

mod flight;

use std::ffi::c_int;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use caio_core::pathop::engine::Engine;
use caio_core::pathop::job::Job;
use caio_core::test_hooks;
use io_uring::{opcode, squeue, types, IoUring, Probe};

use flight::{Flight, Next};

/// SQ entries of the path ring (a `read_file` takes three).
const ENTRIES: u32 = 256;

/// Direct descriptor slots (one per `read_file` in flight).
const SLOTS: u32 = 256;

/// `user_data` of the close of a `read_file` slot (the slot in the low
/// bits); heap addresses never have the top bit set.
const CLOSE_TAG: u64 = 1 << 63;

/// `user_data` of our cancel SQE.
const CANCEL_TAG: u64 = u64::MAX;

/// [`PathRing::shutdown`] cancels everything in flight this often.
const SHUTDOWN_ROUND_NS: u32 = 20_000_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The opcodes the running kernel has (and the test hook did not mask).
#[derive(Default)]
#[allow(clippy::struct_excessive_bools)]
pub struct Supported {
    open: bool,
    close: bool,
    statx: bool,
    read: bool,
    fallocate: bool,
    fadvise: bool,
    ftruncate: bool,
    unlinkat: bool,
    renameat: bool,
    mkdirat: bool,
    /// A sparse table of direct descriptors could be registered.
    direct: bool,
}

impl Supported {
    fn probe(uring: &IoUring) -> Supported {
        let mut probe = Probe::new();
        if uring.submitter().register_probe(&mut probe).is_err() {
            return Supported::default();
        }
        let mask = test_hooks::env("CAIO_TEST_URING_PATH_MASK").unwrap_or_default();
        let has = |code: u8| {
            let masked = mask.trim() == "all"
                || mask
                    .split(',')
                    .any(|m| m.trim().parse::<u8>().ok() == Some(code));
            probe.is_supported(code) && !masked
        };
        Supported {
            open: has(opcode::OpenAt::CODE),
            close: has(opcode::Close::CODE),
            statx: has(opcode::Statx::CODE),
            read: has(opcode::Read::CODE),
            fallocate: has(opcode::Fallocate::CODE),
            fadvise: has(opcode::Fadvise::CODE),
            ftruncate: has(opcode::Ftruncate::CODE),
            unlinkat: has(opcode::UnlinkAt::CODE),
            renameat: has(opcode::RenameAt::CODE),
            mkdirat: has(opcode::MkDirAt::CODE),
            direct: false,
        }
    }

    fn any(&self) -> bool {
        self.open
            || self.close
            || self.statx
            || self.fallocate
            || self.fadvise
            || self.ftruncate
            || self.unlinkat
            || self.renameat
            || self.mkdirat
    }

    /// The linked open → read → read chain on a direct descriptor.
    pub fn read_file(&self) -> bool {
        self.open && self.read && self.close && self.direct
    }
}

struct State {
    free_slots: Vec<u32>,
    /// Flights whose CQEs are not all in.
    flights: usize,
    /// Slot closes submitted and not completed.
    closes: usize,
    /// Jobs finished by [`PathRing::shutdown`], for the next reap.
    #[allow(clippy::vec_box)]
    finished: Vec<Box<Job>>,
    stopping: bool,
}

pub struct PathRing {
    uring: IoUring,
    pid: u32,
    ops: Supported,
    /// The SQ, the CQ and the flights are only touched under this lock.
    state: Mutex<State>,
    in_flight: AtomicUsize,
    completed: AtomicU64,
}

/// core's engine factory (`caio_core::pathop::engine::set_factory`).
pub fn new_engine(wake_fd: c_int) -> Option<Box<dyn Engine>> {
    PathRing::new(wake_fd).map(|r| Box::new(r) as Box<dyn Engine>)
}

impl PathRing {
    fn new(wake_fd: c_int) -> Option<PathRing> {
        let uring = IoUring::new(ENTRIES).ok()?;
        let mut ops = Supported::probe(&uring);
        if !ops.any() {
            return None;
        }
        ops.direct = uring.submitter().register_files_sparse(SLOTS).is_ok();
        // Every CQE signals the runner's wake-up fd (an eventfd).
        uring.submitter().register_eventfd(wake_fd).ok()?;
        Some(PathRing {
            uring,
            pid: std::process::id(),
            ops,
            state: Mutex::new(State {
                free_slots: (0..SLOTS).rev().collect(),
                flights: 0,
                closes: 0,
                finished: Vec::new(),
                stopping: false,
            }),
            in_flight: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
        })
    }

    /// SQ slots free now (under the state lock).
    fn room(&self) -> usize {
        // SAFETY: under the state lock, which guards the SQ (callers hold it).
        let sq = unsafe { self.uring.submission_shared() };
        let room = sq.capacity() - sq.len();
        std::mem::forget(sq); // peek only
        room
    }

    /// Pushes `entries` (under the state lock), entering the kernel first
    /// when the SQ lacks room. False: no room even then (nothing pushed).
    ///
    /// # Safety
    /// Every entry points into memory that stays valid until its CQE is
    /// consumed.
    unsafe fn push(&self, entries: &[squeue::Entry]) -> bool {
        if self.room() < entries.len() {
            let _ = self.uring.submitter().submit();
            if self.room() < entries.len() {
                return false;
            }
        }
        // SAFETY: under the state lock (callers hold it): the SQ is ours.
        let mut sq = unsafe { self.uring.submission_shared() };
        for e in entries {
            // SAFETY: forwarded contract; room checked above.
            let _ = unsafe { sq.push(e) };
        }
        true
    }

    /// Enters the kernel with what is staged (errors leave the SQEs staged
    /// for the next enter; the kernel runs cached opens and reads inline).
    fn submit(&self) {
        loop {
            match self.uring.submitter().submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                _ => return,
            }
        }
    }

    /// Consumes the CQEs (state lock held): finished jobs into `out`, later
    /// reads of `read_file` and slot closes staged and submitted.
    #[allow(clippy::vec_box)]
    fn reap_locked(&self, st: &mut State, out: &mut Vec<Box<Job>>) {
        // SAFETY: under the state lock (the caller holds it).
        let overflow = unsafe { self.uring.submission_shared() }.cq_overflow();
        if overflow {
            // Flushes the overflowed CQEs into the ring.
            let _ = self.uring.submitter().submit();
        }
        let mut follow: Vec<squeue::Entry> = Vec::new();
        let mut done: Vec<*mut Flight> = Vec::new();
        {
            // SAFETY: under the state lock (the caller holds it).
            let cq = unsafe { self.uring.completion_shared() };
            for cqe in cq {
                let ud = cqe.user_data();
                if ud == CANCEL_TAG {
                    continue;
                }
                if ud & CLOSE_TAG != 0 {
                    #[allow(clippy::cast_possible_truncation)] // a slot number
                    st.free_slots.push((ud & !CLOSE_TAG) as u32);
                    st.closes -= 1;
                    continue;
                }
                let f = (ud & !3) as *mut Flight;
                // SAFETY: a flight this ring started, alive until its last
                // CQE is consumed — here, under the lock.
                if unsafe { (*f).record(ud & 3, cqe.result()) } {
                    done.push(f);
                }
            }
        } // publishes the CQ head
        for f in done {
            // SAFETY: its last CQE was consumed above: the engine's alone.
            let flight = unsafe { &mut *f };
            match flight.complete(st.stopping) {
                Next::Read(e) => follow.push(e),
                Next::Done => {
                    // SAFETY: created by `Box::into_raw` in `start`; no CQE
                    // of it is to come.
                    let flight = unsafe { Box::from_raw(f) };
                    if let Some(slot) = flight.slot {
                        if flight.slot_installed() {
                            let close = opcode::Close::new(types::Fixed(slot))
                                .build()
                                .user_data(CLOSE_TAG | u64::from(slot));
                            follow.push(close);
                            st.closes += 1;
                        } else {
                            st.free_slots.push(slot);
                        }
                    }
                    st.flights -= 1;
                    out.push(flight.job);
                }
            }
        }
        if !follow.is_empty() {
            for e in follow.chunks(ENTRIES as usize / 2) {
                // SAFETY: a later read points into its flight's vector,
                // alive until its CQE; a close carries no memory. Cannot
                // fail: at most half the SQ, submitted first when needed.
                let _ = unsafe { self.push(e) };
            }
            self.submit();
        }
    }
}

impl Engine for PathRing {
    fn start(&self, job: Box<Job>) -> Result<(), Box<Job>> {
        let mut st = lock(&self.state);
        if st.stopping {
            return Err(job);
        }
        let mut flight = Flight::new(job);
        let free = &mut st.free_slots;
        // SAFETY: the flight is boxed and kept (`into_raw` below) until its
        // last CQE.
        let Some(entries) = (unsafe { flight.plan(&self.ops, || free.pop()) }) else {
            return Err(flight.job);
        };
        let slot = flight.slot;
        let raw = Box::into_raw(flight);
        // SAFETY: every SQE points into the flight (its buffers, the job's
        // paths), alive until its last CQE is consumed by a reap.
        if !unsafe { self.push(&entries) } {
            // SAFETY: never handed to the kernel: ours again.
            let flight = unsafe { Box::from_raw(raw) };
            if let Some(s) = slot {
                st.free_slots.push(s);
            }
            return Err(flight.job);
        }
        st.flights += 1;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.submit();
        Ok(())
    }

    fn reap(&self, out: &mut Vec<Box<Job>>) {
        if std::process::id() != self.pid {
            return; // a forked child: the CQ is the parent's
        }
        let before = out.len();
        let mut st = lock(&self.state);
        out.append(&mut st.finished);
        self.reap_locked(&mut st, out);
        drop(st);
        let n = out.len() - before;
        if n > 0 {
            self.in_flight.fetch_sub(n, Ordering::AcqRel);
            self.completed.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    fn shutdown(&self) {
        let mut st = lock(&self.state);
        st.stopping = true;
        if std::process::id() != self.pid {
            return; // a forked child: the ring's requests are the parent's
        }
        let mut out = Vec::new();
        // A chain's later links are issued only after the earlier ones
        // end (cancelled ones included): cancel again every round.
        let ts = types::Timespec::new().nsec(SHUTDOWN_ROUND_NS);
        let args = types::SubmitArgs::new().timespec(&ts);
        while st.flights > 0 || st.closes > 0 {
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(CANCEL_TAG);
            // SAFETY: a cancel SQE carries no memory.
            let _ = unsafe { self.push(&[cancel]) };
            match self.uring.submitter().submit_with_args(1, &args) {
                Err(e) if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::ETIME)) => break,
                _ => {}
            }
            self.reap_locked(&mut st, &mut out);
        }
        st.finished.append(&mut out);
    }
}
