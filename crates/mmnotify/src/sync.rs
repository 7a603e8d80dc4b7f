//! The concurrency shim: one API, two backends.
//!
//! Every lock, condition variable and atomic that takes part in a protocol of this crate comes
//! from here, so that `RUSTFLAGS="--cfg loom" cargo test` runs the very same engine code under
//! the [loom] model checker. Under `cfg(loom)` the items are loom's; otherwise they are `std`'s.
//!
//! Locks are *poison-free*: a panic in a user callback must never turn every later call on the
//! same `Mm` into a panic, and the engine never holds one of its own locks across a callback
//! (the single exception, the release-once lock, is documented where it is taken).
//!
//! `Arc` is deliberately not shimmed: subscriber objects are the user's, shared through
//! `std::sync::Arc`, and the engine relies only on what `std` guarantees for it (the last drop
//! happens after every other clone is gone).
//!
//! [loom]: https://docs.rs/loom

// The one place that names the backend lock types.
#![allow(clippy::disallowed_types)]

#[cfg(loom)]
use loom::sync as backend;
#[cfg(not(loom))]
use std::sync as backend;

pub(crate) use backend::atomic;
pub(crate) use backend::{MutexGuard, RwLockReadGuard, RwLockWriteGuard};

#[cfg(loom)]
pub(crate) use loom::thread_local;
#[cfg(not(loom))]
pub(crate) use std::thread_local;

use std::sync::{PoisonError, TryLockError};

/// Whether an engine destructor must leave the concurrency backend alone because the thread is
/// unwinding out of a failed loom execution. Always `false` outside loom.
///
/// When loom finds a deadlock it panics on the thread that blocked last, and from then on the
/// execution has no active thread: every loom operation (an atomic, a lock, a loom
/// thread-local) panics again. A destructor that ran such an operation while that first panic
/// unwinds (a guard ending its read section, a `Scope` removing its mark) would panic inside a
/// destructor during cleanup, which aborts the whole test binary instead of failing the one
/// model. The same unwinding happens after a failed assertion in a model, where a destructor
/// that blocks on a lock can turn it into a deadlock inside a destructor too. The execution
/// is lost either way, so the destructors skip their bookkeeping instead.
///
/// Consequence for loom models: a panic that a model deliberately catches leaves the engine's
/// bookkeeping behind (a read section, a thread mark), so no model relies on catching one.
#[inline]
pub(crate) fn unwinding_under_loom() -> bool {
    cfg!(loom) && std::thread::panicking()
}

use std::time::Duration;

/// A mutex whose `lock` cannot fail: poisoning is ignored (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(backend::Mutex<T>);

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(backend::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the lock if it is free; `None` if another holder (this thread included) has it.
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        match self.0.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

/// A reader-writer lock whose acquisitions cannot fail (poisoning is ignored).
#[derive(Debug, Default)]
pub(crate) struct RwLock<T>(backend::RwLock<T>);

impl<T> RwLock<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(backend::RwLock::new(value))
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A condition variable paired with [`Mutex`]; spurious wake-ups are possible, so every wait
/// sits in a loop that re-checks its condition.
#[derive(Debug, Default)]
pub(crate) struct Condvar(backend::Condvar);

impl Condvar {
    pub(crate) fn new() -> Self {
        Self(backend::Condvar::new())
    }

    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits at most `timeout`. Under loom the timeout is ignored (loom does not model time),
    /// so loom tests only use waits that are eventually notified.
    pub(crate) fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> MutexGuard<'a, T> {
        match self.0.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }
}
