//! Poison-free lock wrappers: the one place this crate names the std lock types.
//!
//! The workspace bans std locks outside the engine's loom shim, so that loom checks the
//! engine's real code. This crate's concurrency sits on system calls (poll, read, the kernel's
//! own wait queues), which loom cannot model; its protocol is checked on real memory by the
//! race, deadlock and fail-closed tests instead. The wrappers also ignore poisoning: a panicking
//! subscriber callback is caught on the dispatcher and must not turn every later lock of the
//! watcher's state into a second panic.

#![allow(clippy::disallowed_types)]

use std::time::Duration;

pub(crate) use std::sync::{MutexGuard, RwLockReadGuard, RwLockWriteGuard};

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

/// A condition variable for [`Mutex`].
#[derive(Debug, Default)]
pub(crate) struct Condvar(std::sync::Condvar);

impl Condvar {
    pub(crate) const fn new() -> Self {
        Condvar(std::sync::Condvar::new())
    }

    pub(crate) fn wait<'a, T>(&self, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn wait_timeout<'a, T>(
        &self,
        g: MutexGuard<'a, T>,
        d: Duration,
    ) -> MutexGuard<'a, T> {
        self.0
            .wait_timeout(g, d)
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }

    pub(crate) fn notify_one(&self) {
        self.0.notify_one();
    }
}

/// A reader-writer lock whose `read`/`write` ignore poisoning.
#[derive(Debug, Default)]
pub(crate) struct RwLock<T>(std::sync::RwLock<T>);

impl<T> RwLock<T> {
    pub(crate) const fn new(v: T) -> Self {
        RwLock(std::sync::RwLock::new(v))
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}
