//! The read side: a small sleepable-RCU of our own, one per address space.
//!
//! # Why
//!
//! Every invalidation window (`start` .. `end`), every young/secondary-TLB walk and every
//! release call runs inside a *read section* of its `Mm`'s `Srcu`. A writer (register,
//! unregister, release, synchronize) first publishes its change (a new subscriber snapshot),
//! then calls [`Srcu::synchronize`], which returns once every read section that began before
//! the call has ended. That one primitive gives the engine four guarantees:
//!
//! * **register excludes in-flight windows**: after `register` returns, no window that could
//!   have missed the new subscriber is still open (Linux gets this from `mm_take_all_locks`);
//! * **unregister waits for pending ends**: a window that started the subscriber ends it before
//!   `unregister` returns (Linux drops that end);
//! * **after unregister, nothing runs**: no callback of the subscriber is running or can start;
//! * **no global domain**: readers of one `Mm` never delay a writer of another (Linux shares one
//!   SRCU domain between every process).
//!
//! Memory safety does not depend on it: snapshots are reference counted. The read side is about
//! *time*, not lifetime.
//!
//! # The algorithm
//!
//! Two reader counters and an index that selects the current one. A reader increments the
//! counter the index names, then re-reads the index; if it moved, the writer may already have
//! looked at that counter, so the reader backs off and tries again with the new index. A writer
//! (serialised with other writers) flips the index and waits for the counter it flipped away
//! from to drain.
//!
//! ```text
//!   reader                                  writer (synchronize)
//!   ------                                  ------
//!   i = index                               publish the change
//!   readers[i] += 1                         old = index; index = 1 - old
//!   ---- fence(SeqCst) ----                 ---- fence(SeqCst) ----
//!   if index != i { readers[i] -= 1; retry } wait until readers[old] == 0
//!   ... read section ...
//!   readers[i] -= 1  (wake the writer at 0)
//! ```
//!
//! The two `SeqCst` fences are ordered one way or the other. If the reader's fence comes
//! first, the writer's wait sees the increment and waits for this reader. If the writer's fence
//! comes first, the reader's re-read sees the flipped index and backs off, and the reader that
//! eventually proceeds does so after the flip, hence after the publication: it sees the
//! change. A reader that raced with *two* flips (by two writers) and ends up on the original
//! index again has re-read the index from the second flip; that writer drains the other
//! counter and does not wait for it, so the reader must see what it published through the
//! re-read itself: the re-read is an `Acquire` load that synchronises with the `Release` flip.
//! Either way no reader that could have missed the change is left unwaited-for. (The first
//! read of the index only chooses a counter and may be `Relaxed`; see `read_lock`.)
//!
//! The drain wait sleeps on a condition variable. A reader that takes a counter to zero wakes
//! the writer if one announced itself in `waiters`; the announcement and the decrement are
//! ordered by the same fence argument, so a wake-up cannot be lost.

use std::marker::PhantomData;

use crate::context::{Scope, ScopeKind};
use crate::sync::atomic::{fence, AtomicUsize, Ordering};
use crate::sync::{Condvar, Mutex};

/// A per-`Mm` sleepable read-copy-update domain.
///
/// # Invariants
///
/// `readers[i]` counts the live [`SrcuReadGuard`]s created with index `i`. `index` is 0 or 1
/// and changes only under `gp`.
#[derive(Debug)]
pub(crate) struct Srcu {
    /// The owning `Mm`'s id, under which read sections are marked in the thread's context
    /// record.
    mm_id: u64,
    index: AtomicUsize,
    readers: [AtomicUsize; 2],
    waiters: AtomicUsize,
    gp: Mutex<()>,
    drain: Mutex<()>,
    drained: Condvar,
}

impl Srcu {
    pub(crate) fn new(mm_id: u64) -> Self {
        Srcu {
            mm_id,
            index: AtomicUsize::new(0),
            readers: [AtomicUsize::new(0), AtomicUsize::new(0)],
            waiters: AtomicUsize::new(0),
            gp: Mutex::new(()),
            drain: Mutex::new(()),
            drained: Condvar::new(),
        }
    }

    /// Enters a read section of the given kind (a guard or a walk). Never blocks.
    ///
    /// The thread is marked in its context record first, so that the deadlock check sees
    /// every read section, for as long as it lasts (see `context.rs`).
    pub(crate) fn read_lock(&self, kind: ScopeKind) -> SrcuReadGuard<'_> {
        debug_assert!(!matches!(kind, ScopeKind::Callback { .. }));
        let scope = Scope::enter(self.mm_id, kind);
        loop {
            // Relaxed: this load only picks the counter to increment; nothing is read on the
            // strength of it. The section is entered only through the re-load below, which
            // comes later in program order and so reads this same flip or a later one
            // (read-read coherence); its Acquire synchronises with the flip it reads, and
            // every earlier flip happens before that one (writers are serialised by `gp`). An
            // Acquire here would add no visibility. (`loom_srcu_reader_straddles_flips_of_two_writers`
            // passes with it Relaxed.)
            let i = self.index.load(Ordering::Relaxed);
            self.readers[i].fetch_add(1, Ordering::Relaxed);
            // Pairs with the fence in `synchronize`: see the module docs.
            fence(Ordering::SeqCst);
            // Acquire, and it must be: pairs with the Release flip in `synchronize`. The case
            // that needs it is a reader whose fence comes *before* the fence of the writer whose
            // flip this load reads. That writer drains the other counter (the index it read
            // equals `i` only because two flips, by two different writers, happened since the
            // first load), so it never waits for this reader; the only edge from its
            // publication to this read section is this load synchronising with its flip.
            // Relaxed here fails `loom_srcu_reader_straddles_flips_of_two_writers`.
            if self.index.load(Ordering::Acquire) == i {
                // INVARIANT: readers[i] was incremented for exactly this guard.
                return SrcuReadGuard {
                    srcu: self,
                    index: i,
                    _scope: scope,
                    _not_send: PhantomData,
                };
            }
            self.read_unlock(i);
        }
    }

    fn read_unlock(&self, i: usize) {
        // Release: everything the read section did happens before the writer's Acquire load
        // that sees the counter drained.
        let previous = self.readers[i].fetch_sub(1, Ordering::Release);
        if previous == 1 {
            // Pairs with the fence after `waiters.fetch_add` in `synchronize`.
            fence(Ordering::SeqCst);
            if self.waiters.load(Ordering::Relaxed) > 0 {
                let _lock = self.drain.lock();
                self.drained.notify_all();
            }
        }
    }

    /// Waits until every read section that began before this call has ended.
    ///
    /// The caller must not itself be inside a read section of this `Srcu` (that would wait for
    /// itself); the engine checks this with the `context` module before calling.
    pub(crate) fn synchronize(&self) {
        let _gp = self.gp.lock();
        let old = self.index.load(Ordering::Relaxed);
        // Release: pairs with the Acquire re-load of the index in `read_lock`.
        self.index.store(1 - old, Ordering::Release);
        self.waiters.fetch_add(1, Ordering::Relaxed);
        // Pairs with the fence in `read_lock` (flip vs. increment) and with the one in
        // `read_unlock` (announcement vs. last decrement).
        fence(Ordering::SeqCst);
        let mut lock = self.drain.lock();
        // Acquire: pairs with the Release decrement of every reader that left.
        while self.readers[old].load(Ordering::Acquire) != 0 {
            lock = self.drained.wait(lock);
        }
        drop(lock);
        self.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A read section of an [`Srcu`]; ends when dropped.
///
/// # Invariants
///
/// The guard accounts for one unit of `srcu.readers[index]`, and its `_scope` marks the
/// thread for the whole section: entered before the section began, left (as a field, after
/// `drop` ran) after it ended. It is `!Send`: read sections are recorded per thread by the
/// deadlock checks.
#[must_use = "the read section ends as soon as the guard is dropped"]
#[derive(Debug)]
pub(crate) struct SrcuReadGuard<'a> {
    srcu: &'a Srcu,
    index: usize,
    _scope: Scope,
    _not_send: PhantomData<*const ()>,
}

impl Drop for SrcuReadGuard<'_> {
    fn drop(&mut self) {
        if crate::sync::unwinding_under_loom() {
            return;
        }
        self.srcu.read_unlock(self.index);
    }
}
