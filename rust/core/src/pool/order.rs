//! fsync after the writes before it (DESIGN.md §4.1): an `fsync`/`fdsync`
//! handed to a pool does not start before every write to the same fd handed
//! to the same pool before it has finished. Workers run jobs in parallel, so
//! without this an fsync could run — and report the data durable — while an
//! earlier write to its file is still queued or running.
//!
//! The pool keeps one for its jobs; linux_aio keeps one per Context as well,
//! for the writes the kernel runs (a held sync then goes to its pool).
//!
//! Per fd: the writes not finished yet, numbered in submission order, and the
//! syncs held back with the number of writes submitted before them. When a
//! write finishes (or is cancelled), the syncs whose earlier writes are all
//! done are released to the queue. Unrelated fds never wait for each other,
//! and a steady stream of later writes cannot hold a sync back.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use super::Job;
use crate::op::{OpKind, Operation};
use crate::sync::lock;

#[derive(Default)]
struct FdWrites {
    /// Writes submitted so far (the next write's number).
    next: u64,
    /// Numbers of the writes not finished yet.
    running: BTreeSet<u64>,
    /// Syncs waiting, each with the number of writes submitted before it.
    held: Vec<(u64, Job)>,
}

impl FdWrites {
    /// Every write numbered below `before` has finished.
    #[inline]
    fn done_before(&self, before: u64) -> bool {
        self.running.first().is_none_or(|&first| first >= before)
    }
}

#[derive(Default)]
pub struct Order {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    fds: HashMap<i32, FdWrites>,
    /// The fd and number of each write in flight, by op address.
    writes: HashMap<usize, (i32, u64)>,
}

/// What [`Order::submitted`] decided.
pub enum Admit {
    /// Queue it now.
    Run(Job),
    /// A sync held back until the writes before it are done.
    Held,
}

/// The kind and fd of a job's op.
///
/// # Safety
/// `op` is a live in-flight op (its job carries the engine's reference).
unsafe fn kind_fd(op: *mut Operation) -> (OpKind, i32) {
    // SAFETY: caller's contract; `kind` and `fd` never change.
    let o: &Operation = unsafe { &*op };
    (o.kind, o.fd_i32())
}

impl Order {
    /// A job accepted (before it is started): a write is recorded, a sync
    /// behind unfinished writes to its fd is held.
    ///
    /// # Safety
    /// `job` is a live in-flight op.
    pub unsafe fn submitted(&self, job: Job) -> Admit {
        // SAFETY: caller's contract.
        let (kind, fd) = unsafe { kind_fd(job.0) };
        match kind {
            OpKind::Read | OpKind::ReadV => Admit::Run(job),
            OpKind::Write | OpKind::WriteV => {
                let mut g = lock(&self.inner);
                let w = g.fds.entry(fd).or_default();
                let n = w.next;
                w.next += 1;
                w.running.insert(n);
                g.writes.insert(job.0 as usize, (fd, n));
                Admit::Run(job)
            }
            OpKind::Fsync | OpKind::Fdsync => {
                let mut g = lock(&self.inner);
                match g.fds.get_mut(&fd) {
                    Some(w) if !w.done_before(w.next) => {
                        let before = w.next;
                        w.held.push((before, job));
                        Admit::Held
                    }
                    _ => Admit::Run(job),
                }
            }
        }
    }

    /// A job finished (run, or taken back unstarted): if it was a write,
    /// returns the syncs it was the last to hold back (to be started).
    ///
    /// # Safety
    /// `op` is a live op.
    pub unsafe fn finished(&self, op: *mut Operation) -> Vec<Job> {
        // SAFETY: caller's contract.
        if !matches!(unsafe { kind_fd(op) }.0, OpKind::Write | OpKind::WriteV) {
            return Vec::new();
        }
        let mut g = lock(&self.inner);
        let Some((fd, n)) = g.writes.remove(&(op as usize)) else {
            return Vec::new();
        };
        let Some(w) = g.fds.get_mut(&fd) else {
            return Vec::new();
        };
        w.running.remove(&n);
        let mut ready = Vec::new();
        let mut i = 0;
        while i < w.held.len() {
            if w.done_before(w.held[i].0) {
                ready.push(w.held.remove(i).1);
            } else {
                i += 1;
            }
        }
        if w.running.is_empty() && w.held.is_empty() {
            g.fds.remove(&fd);
        }
        ready
    }

    /// Whether writes to `fd` recorded here are not finished yet.
    pub fn writes_pending(&self, fd: i32) -> bool {
        lock(&self.inner)
            .fds
            .get(&fd)
            .is_some_and(|w| !w.running.is_empty())
    }

    /// Takes back a held sync (a cancel): `None` if `op` is not held.
    pub fn take_held(&self, op: *mut Operation) -> Option<Job> {
        let mut g = lock(&self.inner);
        g.fds.values_mut().find_map(|w| {
            let pos = w.held.iter().position(|(_, j)| j.0 == op)?;
            Some(w.held.remove(pos).1)
        })
    }
}
