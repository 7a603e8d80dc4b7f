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

/// The fence pair of the read side (`srcu.rs`): a *light* one on every read-side entry and
/// exit, a *heavy* one in the rare writer.
///
/// The pair must give what two `SeqCst` fences give: for a reader's light fence and a writer's
/// heavy fence, either everything the reader stored before its fence is visible to the writer's
/// loads after its fence, or everything the writer stored before its fence is visible to the
/// reader's loads after its fence.
///
/// * [`Fences::Asymmetric`]: the light fence is a compiler fence only (it keeps the compiler from
///   moving the reader's accesses across it, and costs nothing at run time); the heavy fence is
///   a `SeqCst` fence followed by `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes
///   every other running thread of the process execute a full memory barrier (a thread that is
///   not running gets one from the context switch). The reader's fence point therefore lies
///   either before that barrier on its thread or after it, which is the alternative above.
///   Available only once the process registered with
///   `MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED` (done once, by [`Fences::detect`]).
/// * [`Fences::Symmetric`], the fallback where membarrier is unavailable (not Linux, an old
///   kernel, a seccomp filter): a `SeqCst` fence on both sides.
///
/// Under loom both fences of both kinds are `SeqCst` fences (loom does not model membarrier;
/// a `SeqCst` fence on each side is the guarantee membarrier gives the pair).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fences {
    /// Compiler fence for readers, `membarrier` for writers.
    Asymmetric,
    /// `SeqCst` fences on both sides.
    Symmetric,
}

impl Fences {
    /// [`Fences::Asymmetric`] if this process could register for private expedited
    /// membarrier (tried once per process), else [`Fences::Symmetric`].
    pub(crate) fn detect() -> Fences {
        #[cfg(all(not(loom), any(target_os = "linux", target_os = "android")))]
        {
            static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let registered = *REGISTERED.get_or_init(|| {
                use rustix::thread::{membarrier, membarrier_query, MembarrierCommand};
                let query = membarrier_query();
                query.contains_command(MembarrierCommand::PrivateExpedited)
                    && query.contains_command(MembarrierCommand::RegisterPrivateExpedited)
                    && membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok()
                    // One real barrier, so that a kernel that accepts the registration but
                    // refuses the command (a filter) is caught here, not in a writer.
                    && membarrier(MembarrierCommand::PrivateExpedited).is_ok()
            });
            if registered {
                Fences::Asymmetric
            } else {
                Fences::Symmetric
            }
        }
        // Under loom both fences are SeqCst fences whatever the variant (see `light`).
        #[cfg(loom)]
        {
            Fences::Asymmetric
        }
        // Without membarrier a compiler fence orders nothing between threads: both sides
        // take the full fence.
        #[cfg(all(not(loom), not(any(target_os = "linux", target_os = "android"))))]
        {
            Fences::Symmetric
        }
    }

    /// The reader's fence.
    #[inline]
    pub(crate) fn light(self) {
        match self {
            #[cfg(not(loom))]
            Fences::Asymmetric => atomic::compiler_fence(atomic::Ordering::SeqCst),
            // Under loom: stands for the full barrier that membarrier imposes on this thread.
            #[cfg(loom)]
            Fences::Asymmetric => atomic::fence(atomic::Ordering::SeqCst),
            Fences::Symmetric => atomic::fence(atomic::Ordering::SeqCst),
        }
    }

    /// The writer's fence.
    pub(crate) fn heavy(self) {
        atomic::fence(atomic::Ordering::SeqCst);
        #[cfg(all(not(loom), any(target_os = "linux", target_os = "android")))]
        if self == Fences::Asymmetric {
            use rustix::thread::{membarrier, MembarrierCommand};
            // INVARIANT: `detect` returned Asymmetric only after this very command succeeded
            // once. Readers have run with compiler fences only since then, so there is no
            // sound way on without a barrier on every thread of the process: on a failure
            // (e.g. a seccomp filter installed later) register again and retry, then try the
            // global command (refused under nohz_full); if nothing works, abort rather than
            // let a grace period miss a reader.
            if membarrier(MembarrierCommand::PrivateExpedited).is_err()
                && !(membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok()
                    && membarrier(MembarrierCommand::PrivateExpedited).is_ok())
                && membarrier(MembarrierCommand::Global).is_err()
            {
                eprintln!(
                    "mmnotify: membarrier failed after it had been chosen for this process's \
                     read side (a seccomp filter?); aborting rather than risk a missed reader"
                );
                std::process::abort();
            }
        }
    }
}

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

/// A reader-writer lock whose acquisitions cannot fail (poisoning is ignored). (Only the
/// loom build's snapshot cell uses one now, see `snapshot.rs`.)
#[cfg_attr(not(loom), allow(dead_code))]
#[derive(Debug, Default)]
pub(crate) struct RwLock<T>(backend::RwLock<T>);

#[cfg_attr(not(loom), allow(dead_code))]
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
