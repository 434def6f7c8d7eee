//! The routing heuristic of event-loop mode: does a buffered read (or
//! write) first try the kernel with `RWF_NOWAIT`, or go straight to the
//! worker pool?
//!
//! Only buffered I/O of a Context in event-loop mode (`_set_nowait(True)`)
//! is routed; `O_DIRECT` I/O and fsyncs always go to the kernel. The
//! submission path asks [`Route::straight_to_workers`] (two relaxed atomic
//! loads while the file is warm), the completion path feeds every
//! `RWF_NOWAIT` outcome back with [`Route::record`].

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use caio_core::op::OpKind;

/// In "straight to the workers" mode, one operation per this interval
/// still tries the kernel first, to notice when the data is cached again.
/// Time-based: a probe on a cold file costs the loop thread the readahead
/// submission, up to a millisecond or more on a busy device.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// Where buffered reads (or writes) of an event-loop-mode Context go.
///
/// A refused RWF_NOWAIT read has done part of the work on the loop thread:
/// the kernel allocated page-cache pages and submitted the readahead I/O,
/// and that submission sleeps when the device's request slots are
/// exhausted (perf: blk_mq_get_tag under io_submit, 5-35 ms loop stalls on
/// a busy disk). So when most recent attempts were refused (a cold file),
/// operations go straight to the workers, which do the whole read
/// themselves; one per [`PROBE_INTERVAL`] still tries the kernel, so once
/// the data is cached the loop serves it inline again. Writes use the same
/// logic: on filesystems without non-blocking buffered writes (ext4) every
/// attempt is refused, and skipping it saves a system call and a wake-up.
pub(crate) struct Route {
    /// Moving average of "refused" (0..=1024), updated under the reap lock.
    refused: AtomicU32,
    cold: AtomicBool,
    /// When the last probe was sent (microseconds, [`monotonic_us`]).
    last_probe: AtomicU64,
}

/// Microseconds on a process-wide monotonic clock that starts at one second
/// (so a `last_probe` of 0 is always long enough ago).
fn monotonic_us() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let us = START.get_or_init(Instant::now).elapsed().as_micros();
    // u64 microseconds last 584 000 years.
    u64::try_from(us).unwrap_or(u64::MAX - 1_000_000) + 1_000_000
}

impl Route {
    const ONE: u32 = 1024;

    pub(crate) const fn new() -> Route {
        Route {
            refused: AtomicU32::new(0),
            cold: AtomicBool::new(false),
            last_probe: AtomicU64::new(0),
        }
    }

    pub(crate) fn record(&self, refused: bool) {
        let avg = self.refused.load(Ordering::Relaxed);
        let sample = if refused { Self::ONE } else { 0 };
        let avg = avg - avg / 16 + sample / 16;
        self.refused.store(avg, Ordering::Relaxed);
        // Hysteresis: a mixed workload does not flip on every sample.
        if avg > Self::ONE * 3 / 4 {
            self.cold.store(true, Ordering::Relaxed);
        } else if avg < Self::ONE / 4 {
            self.cold.store(false, Ordering::Relaxed);
        }
    }

    /// Whether the next operation skips the kernel attempt.
    pub(crate) fn straight_to_workers(&self) -> bool {
        if !self.cold.load(Ordering::Relaxed) {
            return false;
        }
        let now = monotonic_us();
        let last = self.last_probe.load(Ordering::Relaxed);
        let probe = u128::from(now.saturating_sub(last)) >= PROBE_INTERVAL.as_micros()
            && self
                .last_probe
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        !probe
    }
}

/// The two routes of a Context: reads and writes learn separately (a
/// filesystem may do non-blocking buffered reads but not writes).
pub(crate) struct Routes {
    reads: Route,
    writes: Route,
}

impl Routes {
    pub(crate) const fn new() -> Routes {
        Routes {
            reads: Route::new(),
            writes: Route::new(),
        }
    }

    /// The route of a buffered read (`OpKind::Read`) or write (any other
    /// kind; only reads and writes are routed).
    pub(crate) fn of(&self, kind: OpKind) -> &Route {
        if kind.is_read() {
            &self.reads
        } else {
            &self.writes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_switches_with_hysteresis() {
        let r = Route::new();
        assert!(!r.straight_to_workers());
        for _ in 0..10 {
            r.record(true);
        }
        assert!(!r.cold.load(Ordering::Relaxed)); // not yet convinced
        for _ in 0..30 {
            r.record(true);
        }
        assert!(r.cold.load(Ordering::Relaxed));
        // Straight to the workers, with one kernel probe per interval.
        let direct = (0..64).filter(|_| r.straight_to_workers()).count();
        assert_eq!(direct, 63);
        std::thread::sleep(PROBE_INTERVAL);
        assert!(!r.straight_to_workers());
        assert!(r.straight_to_workers());
        // A few hits do not flip it back; a run of them does.
        for _ in 0..5 {
            r.record(false);
        }
        assert!(r.cold.load(Ordering::Relaxed));
        for _ in 0..40 {
            r.record(false);
        }
        assert!(!r.cold.load(Ordering::Relaxed));
        assert!(!r.straight_to_workers());
    }
}
