//! Poison-free lock wrappers for the simulator.
//!
//! The workspace bans naming `std::sync::{Mutex, Condvar}` in crate sources (the engine routes
//! them through its loom shim, which is private to it). The simulator is not model-checked, so
//! this one file names the std types and hands out small wrappers whose `lock` cannot fail: a
//! panic in one scenario step must not turn every later read of the simulated state into a
//! second panic.

// The one place in this crate that names the std lock types.
#![allow(clippy::disallowed_types)]

use std::sync::PoisonError;
use std::time::{Duration, Instant};

pub(crate) use std::sync::MutexGuard;

/// A mutex whose `lock` ignores poisoning.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    pub(crate) const fn new(value: T) -> Self {
        Mutex(std::sync::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `None` if another thread holds the lock (never blocks).
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        match self.0.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// A condition variable paired with [`Mutex`].
#[derive(Debug, Default)]
pub(crate) struct Condvar(std::sync::Condvar);

impl Condvar {
    pub(crate) const fn new() -> Self {
        Condvar(std::sync::Condvar::new())
    }

    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }

    /// Waits until `done(&mut state)` holds or `timeout` has passed since the call. Returns the
    /// guard and `Err(waited)` on timeout.
    pub(crate) fn wait_until<'a, T>(
        &self,
        mut guard: MutexGuard<'a, T>,
        timeout: Duration,
        mut done: impl FnMut(&mut T) -> bool,
    ) -> (MutexGuard<'a, T>, Result<(), Duration>) {
        let began = Instant::now();
        let deadline = began + timeout;
        while !done(&mut guard) {
            let now = Instant::now();
            if now >= deadline {
                return (guard, Err(now - began));
            }
            guard = self
                .0
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        (guard, Ok(()))
    }
}
