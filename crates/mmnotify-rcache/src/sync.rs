//! Poison-free locks, and the big-reader lock of the index: the one place this crate names the
//! std lock types.
//!
//! The workspace bans std locks outside the engine's loom shim, so that loom checks the
//! engine's real code. This crate's protocol sits on the engine's interval sequence and on
//! system calls (userfaultfd, io_uring, /proc), which loom cannot model; it is checked by the
//! model-based test, the race test and the real-memory matrix instead. The wrappers ignore
//! poisoning: a panic caught around a registrar or a holder's callback must not turn every later
//! lock of the cache into a second panic (no lock is held across user code).

#![allow(clippy::disallowed_types)]

use std::sync::{MutexGuard, RwLockReadGuard, RwLockWriteGuard};

/// A mutex whose `lock` ignores poisoning.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    pub(crate) const fn new(v: T) -> Self {
        Mutex(std::sync::Mutex::new(v))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reader stripes of a [`BigReaderLock`].
const STRIPES: usize = 8;

#[repr(align(128))]
#[derive(Debug, Default)]
struct Stripe(std::sync::RwLock<()>);

/// A reader-writer lock whose readers do not share a cache line (a "big-reader" lock).
///
/// A std `RwLock` keeps one reader count: every reader on every core writes it, and that one
/// line bouncing between cores is what keeps a read-mostly structure from scaling. Here each
/// reader takes the read side of *its* stripe (threads are spread over the stripes), and a
/// writer takes the write side of every stripe, in order. Reads stay as cheap as one
/// uncontended `RwLock` read; writes cost one lock per stripe, which suits the cache: hits read,
/// only misses, invalidations and evictions write.
///
/// INVARIANT: `data` is read only through a [`BrReadGuard`] (which holds a read lock of some
/// stripe) and written only through a [`BrWriteGuard`] (which holds the write lock of every
/// stripe), so a writer excludes every reader and every other writer.
pub(crate) struct BigReaderLock<T> {
    stripes: [Stripe; STRIPES],
    data: std::cell::UnsafeCell<T>,
}

// SAFETY: the lock hands out `&T` to several threads at once (needs `T: Sync`) and `&mut T`
// to one thread at a time, which may then move values in and out (needs `T: Send`); the
// INVARIANT above makes those accesses exclusive as a `RwLock<T>`'s are.
unsafe impl<T: Send + Sync> Sync for BigReaderLock<T> {}
// SAFETY: moving the lock moves the `T` it owns.
unsafe impl<T: Send> Send for BigReaderLock<T> {}

impl<T: std::fmt::Debug> std::fmt::Debug for BigReaderLock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BigReaderLock")
            .field("data", &*self.read())
            .finish()
    }
}

/// A reader's hold on a [`BigReaderLock`].
pub(crate) struct BrReadGuard<'a, T> {
    _stripe: RwLockReadGuard<'a, ()>,
    data: &'a T,
}

/// A writer's hold on a [`BigReaderLock`].
pub(crate) struct BrWriteGuard<'a, T> {
    _stripes: [RwLockWriteGuard<'a, ()>; STRIPES],
    data: &'a mut T,
}

impl<T> std::ops::Deref for BrReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.data
    }
}

impl<T> std::ops::Deref for BrWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.data
    }
}

impl<T> std::ops::DerefMut for BrWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.data
    }
}

impl<T> BigReaderLock<T> {
    pub(crate) fn new(v: T) -> Self {
        BigReaderLock {
            stripes: Default::default(),
            data: std::cell::UnsafeCell::new(v),
        }
    }

    /// Shared access, through the calling thread's stripe.
    #[inline]
    pub(crate) fn read(&self) -> BrReadGuard<'_, T> {
        let stripe = self.stripes[crate::stats::stripe() % STRIPES]
            .0
            .read()
            .unwrap_or_else(|p| p.into_inner());
        // SAFETY: we hold a read lock of a stripe; a writer needs the write lock of every
        // stripe, so no `&mut T` exists while this `&T` lives (INVARIANT).
        let data = unsafe { &*self.data.get() };
        BrReadGuard {
            _stripe: stripe,
            data,
        }
    }

    /// Exclusive access: every stripe's write lock, in order.
    pub(crate) fn write(&self) -> BrWriteGuard<'_, T> {
        let stripes: [RwLockWriteGuard<'_, ()>; STRIPES] =
            std::array::from_fn(|i| self.stripes[i].0.write().unwrap_or_else(|p| p.into_inner()));
        // SAFETY: we hold the write lock of every stripe: no reader holds a `&T` and no other
        // writer a `&mut T` while this guard lives (INVARIANT).
        let data = unsafe { &mut *self.data.get() };
        BrWriteGuard {
            _stripes: stripes,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BigReaderLock;

    /// Writers keep two words equal; readers on every stripe must never see them differ, and
    /// no increment may be lost.
    #[test]
    fn writers_exclude_readers_on_every_stripe() {
        let lock = BigReaderLock::new((0u64, 0u64));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..20_000u64 {
                        if i % 4 == 0 {
                            let mut w = lock.write();
                            w.0 += 1;
                            std::hint::spin_loop();
                            w.1 += 1;
                        } else {
                            let r = lock.read();
                            assert_eq!(r.0, r.1, "a reader saw a half-done write");
                        }
                    }
                });
            }
        });
        assert_eq!(*lock.read(), (20_000, 20_000));
    }
}
