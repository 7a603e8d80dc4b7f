//! Shared helpers of the cache's tests: timeouts and small registrars.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::disallowed_types,
    clippy::type_complexity
)]

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

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use mmnotify_rcache::{Access, PageRange, Refusal, Registrar, RegistrarError};

/// What [`Ledger`] does at the next register.
pub const OK: u32 = 0;
/// Fail the next register.
pub const FAIL: u32 = 1;
/// Panic in the next register.
pub const PANIC: u32 = 2;

/// A registrar for an `Mm` source (no real memory): keeps the books of every registration
/// and can fail or panic on demand.
#[derive(Default)]
pub struct Ledger {
    pub next: AtomicU64,
    pub live: Mutex<HashSet<u64>>,
    pub registered: AtomicU64,
    pub deregistered: AtomicU64,
    pub double: AtomicU64,
    pub mode: AtomicU32,
    pub panic_in_deregister: AtomicU32,
    /// Runs inside `deregister` (e.g. an unmap that re-enters the invalidation path).
    pub on_deregister: Mutex<Option<Arc<dyn Fn(PageRange) + Send + Sync>>>,
}

/// A [`Ledger`] registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
    pub range: PageRange,
    pub access: Access,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("live", &self.live())
            .finish()
    }
}

impl Ledger {
    pub fn live(&self) -> usize {
        self.live.lock().unwrap().len()
    }
}

impl Registrar for Ledger {
    type Handle = Entry;

    fn register(&self, range: PageRange, access: Access) -> Result<Entry, RegistrarError> {
        match self.mode.swap(OK, Ordering::SeqCst) {
            FAIL => return Err(Box::new(Refusal(format!("refused {range}")))),
            PANIC => panic!("registrar panic for {range}"),
            _ => {}
        }
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        self.live.lock().unwrap().insert(id);
        self.registered.fetch_add(1, Ordering::SeqCst);
        Ok(Entry { id, range, access })
    }

    fn deregister(&self, e: &Entry) {
        if self.live.lock().unwrap().remove(&e.id) {
            self.deregistered.fetch_add(1, Ordering::SeqCst);
        } else {
            self.double.fetch_add(1, Ordering::SeqCst);
        }
        let hook = self.on_deregister.lock().unwrap().clone();
        if let Some(h) = hook {
            h(e.range);
        }
        if self.panic_in_deregister.swap(0, Ordering::SeqCst) != 0 {
            panic!("deregister panic");
        }
    }
}
