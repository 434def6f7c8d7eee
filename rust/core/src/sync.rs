//! Small synchronisation pieces shared by the crate: a poison-tolerant
//! `Mutex` lock, the per-operation spin lock and [`AtomicState`], the one
//! atomic wrapper behind every life-cycle state enum (an operation's
//! `NEW`/`IN_FLIGHT`/`DONE`, an awaitable's steps).
//!
//! Free-threaded CPython has no GIL to lean on: every piece of mutable state
//! shared between threads is atomic or sits behind one of these locks.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning: our critical sections never leave the
/// protected data half-updated when they unwind (they only push/pop/swap),
/// and a panic must not turn into a second one here.
#[inline]
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A minimal spin lock for an operation's mutable object slots. Critical
/// sections are a few instructions (pointer swap / incref), never a Python
/// call, a decref or a blocking system call, so spinning is cheaper than
/// parking and the lock is safe to take with or without an attached thread.
#[repr(transparent)]
#[derive(Default)]
pub struct SpinLock(AtomicBool);

/// Releases the [`SpinLock`] when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct SpinGuard<'a>(&'a SpinLock);

impl SpinLock {
    /// An unlocked lock (all-zero bytes, so a zeroed allocation is one too).
    pub const fn new() -> SpinLock {
        SpinLock(AtomicBool::new(false))
    }

    #[inline]
    pub fn lock(&self) -> SpinGuard<'_> {
        let mut spins = 0u32;
        while self
            .0
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        SpinGuard(self)
    }
}

impl Drop for SpinGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0 .0.store(false, Ordering::Release);
    }
}

/// A fieldless `#[repr(u8)]` enum that an [`AtomicState`] can hold.
///
/// # Safety
/// `Self` must be `#[repr(u8)]` and fieldless, and `into_u8` must return
/// `self as u8`: [`AtomicState`] turns the stored byte back into `Self`
/// without checking, and it only ever stores what `into_u8` returned.
/// Implement it with [`u8_state!`](crate::u8_state), which guarantees this.
pub unsafe trait U8State: Copy + Eq + std::fmt::Debug {
    fn into_u8(self) -> u8;
}

/// Declares a `#[repr(u8)]` life-cycle state enum usable in an
/// [`AtomicState`].
///
/// ```ignore
/// u8_state! {
///     /// Doc.
///     pub enum OpState { New = 0, InFlight = 1, Done = 2 }
/// }
/// ```
#[macro_export]
macro_rules! u8_state {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $value:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(u8)]
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        $vis enum $name {
            $($(#[$vmeta])* $variant = $value),+
        }

        // SAFETY: the enum above is `#[repr(u8)]` and fieldless, and
        // `into_u8` is exactly `self as u8`.
        unsafe impl $crate::sync::U8State for $name {
            #[inline]
            fn into_u8(self) -> u8 {
                self as u8
            }
        }
    };
}

/// An atomic cell holding a [`U8State`] enum: the same code as a bare
/// `AtomicU8`, but only valid states go in and exhaustive `match`es come out.
#[repr(transparent)]
pub struct AtomicState<T: U8State>(AtomicU8, PhantomData<T>);

impl<T: U8State> AtomicState<T> {
    pub const fn new_raw(initial: u8) -> Self {
        AtomicState(AtomicU8::new(initial), PhantomData)
    }

    pub fn new(initial: T) -> Self {
        Self::new_raw(initial.into_u8())
    }

    #[inline]
    fn decode(v: u8) -> T {
        const { assert!(std::mem::size_of::<T>() == 1) };
        // SAFETY: the cell only ever holds `into_u8()` of a valid `T` (every
        // store goes through this type; a zeroed allocation holds the
        // variant declared `= 0`, which every state enum of this crate has),
        // and `U8State` guarantees `T` is a `#[repr(u8)]` fieldless enum, so
        // the byte is a valid `T`.
        unsafe { std::mem::transmute_copy::<u8, T>(&v) }
    }

    #[inline]
    pub fn load(&self, order: Ordering) -> T {
        Self::decode(self.0.load(order))
    }

    #[inline]
    pub fn store(&self, v: T, order: Ordering) {
        self.0.store(v.into_u8(), order);
    }

    /// `compare_exchange`: `Ok(previous)` if it held `current` and now holds
    /// `new`, `Err(actual)` otherwise.
    #[inline]
    pub fn compare_exchange(
        &self,
        current: T,
        new: T,
        success: Ordering,
        failure: Ordering,
    ) -> Result<T, T> {
        self.0
            .compare_exchange(current.into_u8(), new.into_u8(), success, failure)
            .map(Self::decode)
            .map_err(Self::decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::u8_state! {
        enum Light { Red = 0, Amber = 1, Green = 2 }
    }

    #[test]
    fn atomic_state_round_trips() {
        let s = AtomicState::new(Light::Red);
        assert_eq!(s.load(Ordering::Relaxed), Light::Red);
        s.store(Light::Green, Ordering::Relaxed);
        assert_eq!(s.load(Ordering::Relaxed), Light::Green);
        assert_eq!(
            s.compare_exchange(
                Light::Amber,
                Light::Red,
                Ordering::AcqRel,
                Ordering::Acquire
            ),
            Err(Light::Green)
        );
        assert_eq!(
            s.compare_exchange(
                Light::Green,
                Light::Amber,
                Ordering::AcqRel,
                Ordering::Acquire
            ),
            Ok(Light::Green)
        );
        assert_eq!(s.load(Ordering::Relaxed), Light::Amber);
    }

    #[test]
    fn spin_lock_excludes() {
        let l = SpinLock::new();
        let n = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        let _g = l.lock();
                        let v = n.load(Ordering::Relaxed);
                        n.store(v + 1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(n.load(Ordering::Relaxed), 4000);
    }
}
