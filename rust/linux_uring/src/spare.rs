//! Is there a second core for us? The measured half of the copy rule
//! (DESIGN.md §7.2): a mid-size read is copied by a worker only while the
//! process can count on more than the loop thread's core.
//!
//! Every [`INTERVAL`] (at most; sampled lazily by the submitting thread) the
//! CPU time this process used (`getrusage`: loop thread, workers, io-wq
//! threads) and the machine's idle time (`/proc/stat`) over the interval are
//! added up: the CPUs this process has, or could have had. At
//! [`SPARE_ON`] CPUs or more a worker's copy runs in parallel with the
//! loop; at [`SPARE_OFF`] or less other processes hold the other cores and
//! a hand-off only adds its own cost (measured under load, 1 MiB reads at
//! c=64: 200–400 µs CPU per op on the pool against ~105 µs copied by the
//! loop thread, 0.23× the throughput). In between the last answer stands.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the gauge is re-read.
const INTERVAL: Duration = Duration::from_millis(100);
/// CPUs available to the process from which a worker copy pays.
const SPARE_ON: f64 = 1.5;
/// CPUs available at or below which it does not.
const SPARE_OFF: f64 = 1.2;

struct Sample {
    at: Instant,
    /// Idle + iowait time of the machine, in clock ticks.
    idle_ticks: u64,
    /// CPU time of this process, in microseconds.
    self_us: u64,
}

impl Sample {
    fn take() -> Option<Sample> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?;
        let mut fields = line.split_ascii_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let nums: Vec<u64> = fields.take(5).filter_map(|f| f.parse().ok()).collect();
        let idle_ticks = nums.get(3)? + nums.get(4).copied().unwrap_or(0);
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::uninit();
        // SAFETY: getrusage writes one `struct rusage` into `ru`.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: initialised by the successful call above.
        let ru = unsafe { ru.assume_init() };
        let us = |t: libc::timeval| {
            u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
        };
        Some(Sample {
            at: Instant::now(),
            idle_ticks,
            self_us: us(ru.ru_utime) + us(ru.ru_stime),
        })
    }
}

fn ticks_per_second() -> f64 {
    static HZ: OnceLock<f64> = OnceLock::new();
    // SAFETY: sysconf takes no pointer.
    *HZ.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    })
}

/// CPUs the process had or could have had between two samples.
fn available(prev: &Sample, cur: &Sample) -> Option<f64> {
    let secs = cur.at.duration_since(prev.at).as_secs_f64();
    if secs <= 0.0 {
        return None;
    }
    let idle = cur.idle_ticks.saturating_sub(prev.idle_ticks) as f64 / ticks_per_second();
    let ours = cur.self_us.saturating_sub(prev.self_us) as f64 / 1e6;
    Some((idle + ours) / secs)
}

/// The verdict with hysteresis (see the module doc).
fn verdict(before: bool, cpus: f64) -> bool {
    if cpus >= SPARE_ON {
        true
    } else if cpus <= SPARE_OFF {
        false
    } else {
        before
    }
}

/// Whether a second core is available to the process now (re-measured at
/// most every [`INTERVAL`]; until the first measurement: whether the
/// process may use more than one CPU at all).
pub(crate) fn spare_cpu() -> bool {
    // Test hook: the CPUs every measurement finds (read once).
    static FORCED: OnceLock<Option<f64>> = OnceLock::new();
    if let Some(cpus) =
        FORCED.get_or_init(|| caio_core::test_hooks::env_parse::<f64>("CAIO_TEST_URING_SPARE_CPUS"))
    {
        return *cpus >= SPARE_ON;
    }
    static START: OnceLock<Instant> = OnceLock::new();
    static NEXT_US: AtomicU64 = AtomicU64::new(0);
    static LAST: Mutex<Option<Sample>> = Mutex::new(None);
    static SPARE: OnceLock<AtomicBool> = OnceLock::new();
    let spare = SPARE.get_or_init(|| {
        AtomicBool::new(std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
    });
    let now_us =
        u64::try_from(START.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX);
    if now_us >= NEXT_US.load(Ordering::Relaxed) {
        if let Ok(mut last) = LAST.try_lock() {
            NEXT_US.store(
                now_us.saturating_add(INTERVAL.as_micros() as u64),
                Ordering::Relaxed,
            );
            let cur = Sample::take();
            if let (Some(prev), Some(cur)) = (last.as_ref(), cur.as_ref()) {
                if let Some(cpus) = available(prev, cur) {
                    let before = spare.load(Ordering::Relaxed);
                    spare.store(verdict(before, cpus), Ordering::Relaxed);
                }
            }
            *last = cur;
        }
    }
    spare.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_has_hysteresis() {
        assert!(verdict(false, 1.9));
        assert!(!verdict(true, 1.0));
        assert!(verdict(true, 1.3));
        assert!(!verdict(false, 1.3));
    }

    #[test]
    fn a_sample_reads_the_machine() {
        let a = Sample::take().expect("/proc/stat and getrusage");
        std::thread::sleep(Duration::from_millis(30));
        let b = Sample::take().expect("/proc/stat and getrusage");
        let cpus = available(&a, &b).expect("time passed");
        assert!(cpus >= 0.0);
    }
}
