//! Shared helpers of the cache's tests: timeouts and small registrars.

#![allow(dead_code, unreachable_pub)]

use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::Duration;

/// Runs `f` on a thread and fails the test if it does not finish within `limit` (a hang
/// fails instead of stalling the run).
pub fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = t.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("the thread ended without sending"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("timed out after {limit:?}"),
    }
}

/// Serialises the real-memory tests of one binary: they map, unmap and re-map fixed
/// addresses, and a test running beside them could take an address one of them frees.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
