//! A small number per live thread, unique among live threads and reused after a thread exits,
//! so that per-thread state can live in plain arrays indexed by it.
//!
//! # Why
//!
//! The read side (`srcu.rs`) and the subscriber statistics (`classic.rs`) keep one cache line
//! per thread, so that a read section or a callback writes only lines its own thread owns (two
//! threads on disjoint ranges then share no written line, and scale). Without `unsafe`, the
//! simplest way to give each thread its line is an array slot chosen by a number the thread
//! owns: slot `n` of every array belongs to the live thread whose number is `n`, and *only* that
//! thread writes it, so it may update it with a plain load and store instead of a locked
//! read-modify-write. Numbers are taken lowest first, so they stay below the arrays' size while
//! fewer threads than that use the engine; threads with a larger number share an overflow slot
//! that is updated with atomic read-modify-writes.
//!
//! # Exclusivity, and threads that exit
//!
//! The number is leased on a thread's first use (a global lock, once per thread) and given back
//! by the thread-local's destructor at thread exit. One case needs care: a read section that is
//! still open when the lease is destroyed (a guard owned by another thread-local whose
//! destructor runs later, or one that was leaked into thread teardown). Its guard still writes
//! slot `n` when it ends, so `n` must not go to a new thread before that. Each lease therefore
//! counts the sections open on its thread; a lease destroyed with sections open is parked in
//! the *orphans* list with that count, and the last of those sections, on ending, gives the
//! number back. So a number is reused only when nothing of its old thread can write its slots
//! any more, and it is never lost (`loom_thread_exits_inside_a_read_section`).
//!
//! After its lease is gone, a thread (still running thread-local destructors) has no number:
//! [`enter_section`] and [`current`] return `None`, and the callers use their shared slot.

use std::cell::{Cell, OnceCell};

use crate::sync::{thread_local, Mutex};

/// The leases handed out, and what came back.
#[derive(Debug, Default)]
struct Registry {
    /// The smallest number never leased.
    next: usize,
    /// Numbers given back, to be leased again (smallest first).
    free: Vec<usize>,
    /// Numbers whose thread exited with read sections open: (number, sections still open).
    orphans: Vec<(usize, usize)>,
}

impl Registry {
    fn lease(&mut self) -> usize {
        match self.free.iter().enumerate().min_by_key(|(_, n)| **n) {
            Some((at, _)) => self.free.swap_remove(at),
            None => {
                self.next += 1;
                self.next - 1
            }
        }
    }
}

/// A handle on the registry. Under loom an `Arc`, because loom drops its statics before the
/// main thread's thread-locals: a lease keeps the registry it came from.
#[cfg(not(loom))]
type RegistryRef = &'static Mutex<Registry>;
#[cfg(loom)]
type RegistryRef = std::sync::Arc<Mutex<Registry>>;

#[cfg(not(loom))]
fn registry() -> RegistryRef {
    static REGISTRY: std::sync::OnceLock<Mutex<Registry>> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Registry::default()))
}

#[cfg(loom)]
fn registry() -> RegistryRef {
    // A fresh registry per loom execution (loom resets its statics between executions).
    loom::lazy_static! {
        static ref REGISTRY: std::sync::Arc<Mutex<Registry>> =
            std::sync::Arc::new(Mutex::new(Registry::default()));
    }
    std::sync::Arc::clone(&REGISTRY)
}

/// `index` when the thread has not leased a number yet.
const UNSET: usize = usize::MAX;
/// `index` once the lease was given back (the thread is exiting).
const GONE: usize = usize::MAX - 1;

/// This thread's lease.
///
/// # Invariants
///
/// While `index` holds a number `n`, no other live lease holds `n`, `n` is neither free nor an
/// orphan, and `open` counts the read sections this thread entered with `n` and has not left.
#[derive(Debug)]
struct Lease {
    index: Cell<usize>,
    open: Cell<usize>,
    /// The registry the number came from (set with the number).
    registry: OnceCell<RegistryRef>,
}

impl Lease {
    fn number(&self) -> Option<usize> {
        match self.index.get() {
            GONE => None,
            UNSET => {
                let registry = self.registry.get_or_init(registry);
                let n = registry.lock().lease();
                self.index.set(n);
                Some(n)
            }
            n => Some(n),
        }
    }

    /// Gives the number back (or parks it as an orphan while sections are open).
    fn retire(&self) {
        let n = self.index.replace(GONE);
        if n == UNSET || n == GONE {
            return;
        }
        let Some(registry) = self.registry.get() else {
            return;
        };
        let mut registry = registry.lock();
        match self.open.get() {
            0 => registry.free.push(n),
            open => registry.orphans.push((n, open)),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if crate::sync::unwinding_under_loom() {
            return;
        }
        self.retire();
    }
}

#[cfg(not(loom))]
thread_local! {
    static LEASE: Lease = const { Lease { index: Cell::new(UNSET), open: Cell::new(0), registry: OnceCell::new() } };
}

#[cfg(loom)]
thread_local! {
    static LEASE: Lease = Lease { index: Cell::new(UNSET), open: Cell::new(0), registry: OnceCell::new() };
}

/// This thread's number, if it has one (it always has, except while its thread-locals are
/// being destroyed).
#[inline]
pub(crate) fn current() -> Option<usize> {
    LEASE.try_with(Lease::number).ok().flatten()
}

/// Counts a read section on this thread and returns the thread's number, which stays this
/// thread's until the matching [`leave_section`], even if the thread's lease is destroyed in
/// between. `None`: the thread has no number (see the module docs); call no `leave_section`.
#[inline]
pub(crate) fn enter_section() -> Option<usize> {
    LEASE
        .try_with(|lease| {
            let n = lease.number()?;
            lease.open.set(lease.open.get() + 1);
            Some(n)
        })
        .ok()
        .flatten()
}

/// Ends a read section entered with [`enter_section`] that returned `Some(n)`.
#[inline]
pub(crate) fn leave_section(n: usize) {
    let counted = LEASE.try_with(|lease| {
        if lease.index.get() == n {
            lease.open.set(lease.open.get() - 1);
            true
        } else {
            false
        }
    });
    if !matches!(counted, Ok(true)) {
        leave_orphaned_section(n);
    }
}

/// The lease of the section's thread is gone: count the section down in the orphans list, and
/// give the number back with the last one.
#[cold]
fn leave_orphaned_section(n: usize) {
    let handle = registry();
    let mut registry = handle.lock();
    let Some(at) = registry.orphans.iter().position(|(o, _)| *o == n) else {
        debug_assert!(
            false,
            "a section ended on number {n}, which is neither leased nor orphaned"
        );
        return;
    };
    registry.orphans[at].1 -= 1;
    if registry.orphans[at].1 == 0 {
        registry.orphans.swap_remove(at);
        registry.free.push(n);
    }
}

/// Test hook: gives this thread's lease back now, exactly as its destructor does at thread exit
/// (loom drops thread-locals in no fixed order, so the models cannot make the lease go first).
/// Afterwards the thread behaves as one whose thread-locals are being destroyed.
#[cfg(all(test, loom))]
pub(crate) fn retire_current_for_test() {
    LEASE.with(Lease::retire);
}

/// Test view of the registry: (numbers free, numbers orphaned, numbers ever leased).
#[cfg(all(test, loom))]
pub(crate) fn registry_for_test() -> (Vec<usize>, Vec<(usize, usize)>, usize) {
    let handle = registry();
    let registry = handle.lock();
    (
        registry.free.clone(),
        registry.orphans.clone(),
        registry.next,
    )
}
