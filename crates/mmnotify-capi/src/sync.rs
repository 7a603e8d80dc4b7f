//! Poison-free lock wrappers: the one place this crate names the std lock types.
//!
//! The workspace bans std locks outside the engine's loom shim. This crate's state (the handle
//! tables, the process watcher's reference count) is plain bookkeeping around calls into the
//! engine, the watcher and the cache, never held across a C callback or a blocking call, so
//! loom has nothing to check here; the wrappers ignore poisoning so that a panic caught at the
//! boundary never turns every later call into a second panic.

#![allow(clippy::disallowed_types)]

pub(crate) use std::sync::MutexGuard;

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
