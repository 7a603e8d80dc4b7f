//! Poison-free lock wrappers: the one place this crate names the std lock types.
//!
//! The workspace bans std locks outside the engine's loom shim, so that loom checks the
//! engine's real code. This crate's protocol sits on the engine's interval sequence and on
//! system calls (userfaultfd, io_uring, /proc), which loom cannot model; it is checked by the
//! model-based test, the race test and the real-memory matrix instead. The wrappers ignore
//! poisoning: a panic caught around a registrar or a holder's callback must not turn every later
//! lock of the cache into a second panic (no lock is held across user code).

#![allow(clippy::disallowed_types)]

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

/// A reader-writer lock whose `read` and `write` ignore poisoning.
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
