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
//! Memory safety does not depend on it: snapshots are reference counted (through `arc-swap`'s
//! deferred counts, see `snapshot.rs`). The read side is about *time*, not lifetime.
//!
//! # The algorithm
//!
//! Two generations of reader counters and an index that selects the current one. A reader
//! increments the counter the index names, then re-reads the index; if it moved, the writer may
//! already have looked at that counter, so the reader backs off and tries again with the new
//! index. A writer (serialised with other writers) flips the index and waits for the counters
//! it flipped away from to drain.
//!
//! ```text
//!   reader                                  writer (synchronize)
//!   ------                                  ------
//!   i = index                               publish the change
//!   mine[i] += 1   (own line, plain store)  old = index; index = 1 - old
//!   ---- light fence ----                   ---- heavy fence ----
//!   if index != i { mine[i] -= 1; retry }   for every slot: wait until slot[old] == 0
//!   ... read section ...
//!   mine[i] -= 1; light fence; wake the writer if one waits
//! ```
//!
//! # Per-thread counters: a read section writes only its own cache line
//!
//! The counters are not one pair per `Srcu` but one pair per *thread*: slot `n` (a cache line
//! of its own) belongs to the live thread whose number is `n` (`thread_index.rs`), and only
//! that thread writes it, with a plain load and store, not a locked read-modify-write. Two
//! threads in read sections of one `Mm` therefore write no common line. A thread without an
//! own slot (numbers beyond [`SLOTS`], or a thread whose thread-locals are being destroyed)
//! uses the shared last slot with atomic read-modify-writes; the argument below is the same
//! for it. A slot's counter never goes below zero (a guard is `!Send`, so it ends on the thread
//! that began it), so "every slot is zero" is the same as "the sum is zero", and the writer may
//! read the slots one after the other: a reader that the writer must wait for has made its
//! increment visible before the writer's fence (see below), and keeps it until it ends.
//!
//! # Asymmetric fences
//!
//! The reader's and the writer's fences are ordered one way or the other (they are a
//! [`Fences`] pair: a compiler fence against `membarrier` where the kernel has it, two `SeqCst`
//! fences where it does not). If the reader's fence comes first, the writer's wait sees the
//! increment and waits for this reader. If the writer's fence comes first, the reader's re-read
//! sees the flipped index and backs off, and the reader that eventually proceeds does so after
//! the flip, hence after the publication: it sees the change. A reader that raced with *two*
//! flips (by two writers) and ends up on the original index again has re-read the index from
//! the second flip; that writer drains the other counters and does not wait for it, so the
//! reader must see what it published through the re-read itself: the re-read is an `Acquire`
//! load that synchronises with the `Release` flip. Either way no reader that could have missed
//! the change is left unwaited-for. (The first read of the index only chooses a counter and
//! may be `Relaxed`; see `read_lock`.) The cost moves to the rare writer: with membarrier a
//! read section costs two plain stores, four loads and no serialising instruction.
//!
//! The drain wait sleeps on a condition variable. A reader that takes its counter to zero wakes
//! the writer if one announced itself in `waiters` (read-mostly: only writers write it); the
//! announcement comes before the writer's heavy fence and the reader's load of it after its
//! light fence, so by the same argument either the writer's check sees the decrement or the
//! reader sees the announcement: a wake-up cannot be lost, and a reader makes no system call
//! when nobody waits.
//!
//! [`SLOTS`]: SLOTS

use std::marker::PhantomData;

use crate::context::{self, ScopeKind};
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{Condvar, Fences, Mutex};
use crate::thread_index;

/// How many threads get a slot of their own in every `Srcu` (the rest share one). Under loom
/// two, so that the models run both the own-slot and the shared-slot paths.
pub(crate) const SLOTS: usize = if cfg!(loom) { 2 } else { 32 };

/// One thread's reader counters, on a cache line of their own (128 bytes: adjacent-line
/// prefetchers pair 64-byte lines).
#[derive(Debug)]
#[repr(align(128))]
struct ReaderSlot {
    readers: [AtomicUsize; 2],
}

impl ReaderSlot {
    fn new() -> Self {
        ReaderSlot {
            readers: [AtomicUsize::new(0), AtomicUsize::new(0)],
        }
    }

    /// Counts one more reader of generation `i`.
    #[inline]
    fn add(&self, i: usize, own: bool) {
        if own {
            // Only this thread writes its slot (`thread_index.rs`): a plain load and store.
            let now = self.readers[i].load(Ordering::Relaxed);
            self.readers[i].store(now + 1, Ordering::Relaxed);
        } else {
            self.readers[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one reader of generation `i` less; returns whether none is left.
    #[inline]
    fn sub(&self, i: usize, own: bool) -> bool {
        // Release: everything the read section did happens before the writer's Acquire load
        // that sees the counter drained.
        if own {
            let now = self.readers[i].load(Ordering::Relaxed) - 1;
            self.readers[i].store(now, Ordering::Release);
            now == 0
        } else {
            self.readers[i].fetch_sub(1, Ordering::Release) == 1
        }
    }
}

/// A per-`Mm` sleepable read-copy-update domain.
///
/// # Invariants
///
/// `slots[n].readers[i]` counts the live read sections of generation `i` entered by the thread
/// whose number is `n` (for `n < SLOTS`; `slots[SLOTS]` counts those of every other thread).
/// `index` is 0 or 1 and changes only under `gp`.
#[derive(Debug)]
pub(crate) struct Srcu {
    /// The owning `Mm`'s id, under which read sections are marked in the thread's context
    /// record.
    mm_id: u64,
    fences: Fences,
    index: AtomicUsize,
    waiters: AtomicUsize,
    slots: Box<[ReaderSlot]>,
    gp: Mutex<()>,
    drain: Mutex<()>,
    drained: Condvar,
}

/// One read section's accounting: which generation and which slot it counted itself in.
#[must_use = "a read section must be ended with read_unlock"]
#[derive(Debug)]
pub(crate) struct ReadTicket {
    index: usize,
    thread: Option<usize>,
}

/// A [`ReadTicket`] packed in one word, for the guard (which invalidation guards carry around
/// by value): generation in bit 0, the thread's number + 1 above it, 0 for none.
#[derive(Clone, Copy, Debug)]
struct PackedTicket(usize);

impl PackedTicket {
    #[inline]
    fn pack(ticket: ReadTicket) -> Self {
        PackedTicket(ticket.index | ticket.thread.map_or(0, |n| (n + 1) << 1))
    }

    #[inline]
    fn unpack(self) -> ReadTicket {
        ReadTicket {
            index: self.0 & 1,
            thread: (self.0 >> 1).checked_sub(1),
        }
    }
}

impl Srcu {
    /// A domain whose fences are [`Fences::detect`]'s choice.
    #[cfg(all(test, loom))]
    pub(crate) fn new(mm_id: u64) -> Self {
        Self::with_fences(mm_id, Fences::detect())
    }

    /// A domain with the given fence pair (tests and benchmarks force the fallback with it).
    pub(crate) fn with_fences(mm_id: u64, fences: Fences) -> Self {
        Srcu {
            mm_id,
            fences,
            index: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            slots: (0..=SLOTS).map(|_| ReaderSlot::new()).collect(),
            gp: Mutex::new(()),
            drain: Mutex::new(()),
            drained: Condvar::new(),
        }
    }

    /// The slot of thread `thread`, and whether the thread owns it.
    #[inline]
    fn slot(&self, thread: Option<usize>) -> (&ReaderSlot, bool) {
        match thread {
            Some(n) if n < SLOTS => (&self.slots[n], true),
            _ => (&self.slots[SLOTS], false),
        }
    }

    /// Enters a read section of the given kind (a guard or a walk). Never blocks.
    ///
    /// The thread is marked in its context record first, so that the deadlock check sees
    /// every read section, for as long as it lasts (see `context.rs`).
    #[inline]
    pub(crate) fn read_lock(&self, kind: ScopeKind) -> SrcuReadGuard<'_> {
        debug_assert!(!matches!(kind, ScopeKind::Callback { .. }));
        context::mark(self.mm_id, kind);
        let ticket = self.read_lock_raw();
        SrcuReadGuard {
            srcu: self,
            ticket: PackedTicket::pack(ticket),
            kind,
            _not_send: PhantomData,
        }
    }

    /// Enters a read section without a context mark; end it with [`Self::read_unlock_raw`] on
    /// the same thread.
    #[inline]
    pub(crate) fn read_lock_raw(&self) -> ReadTicket {
        let thread = thread_index::enter_section();
        let (slot, own) = self.slot(thread);
        loop {
            // Relaxed: this load only picks the counter to increment; nothing is read on the
            // strength of it. The section is entered only through the re-load below, which
            // comes later in program order and so reads this same flip or a later one
            // (read-read coherence); its Acquire synchronises with the flip it reads, and
            // every earlier flip happens before that one (writers are serialised by `gp`). An
            // Acquire here would add no visibility. (`loom_srcu_reader_straddles_flips_of_two_writers`
            // passes with it Relaxed.)
            let i = self.index.load(Ordering::Relaxed);
            slot.add(i, own);
            // Pairs with the heavy fence in `synchronize`: see the module docs.
            self.fences.light();
            // Acquire, and it must be: pairs with the Release flip in `synchronize`. The case
            // that needs it is a reader whose fence comes *before* the fence of the writer whose
            // flip this load reads. That writer drains the other counter (the index it read
            // equals `i` only because two flips, by two different writers, happened since the
            // first load), so it never waits for this reader; the only edge from its
            // publication to this read section is this load synchronising with its flip.
            // Relaxed here fails `loom_srcu_reader_straddles_flips_of_two_writers`.
            if self.index.load(Ordering::Acquire) == i {
                // INVARIANT: the slot's counter i was incremented for exactly this ticket.
                return ReadTicket { index: i, thread };
            }
            self.leave(slot, own, i);
        }
    }

    /// Ends a read section entered with [`Self::read_lock_raw`].
    #[inline]
    pub(crate) fn read_unlock_raw(&self, ticket: ReadTicket) {
        let (slot, own) = self.slot(ticket.thread);
        self.leave(slot, own, ticket.index);
        // Only now may the thread's number go to another thread (if its lease is gone).
        if let Some(n) = ticket.thread {
            thread_index::leave_section(n);
        }
    }

    #[inline]
    fn leave(&self, slot: &ReaderSlot, own: bool, i: usize) {
        if slot.sub(i, own) {
            // Pairs with the heavy fence after `waiters.fetch_add` in `synchronize`.
            self.fences.light();
            if self.waiters.load(Ordering::Relaxed) > 0 {
                self.wake_writer();
            }
        }
    }

    #[cold]
    fn wake_writer(&self) {
        let _lock = self.drain.lock();
        self.drained.notify_all();
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
        // Pairs with the light fence in `read_lock` (flip vs. increment) and with the one in
        // `leave` (announcement vs. last decrement).
        self.fences.heavy();
        let mut lock = self.drain.lock();
        for slot in self.slots.iter() {
            // Acquire: pairs with the Release decrement of every reader that left.
            while slot.readers[old].load(Ordering::Acquire) != 0 {
                lock = self.drained.wait(lock);
            }
        }
        drop(lock);
        self.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A read section of an [`Srcu`]; ends when dropped.
///
/// # Invariants
///
/// The guard accounts for its ticket's unit of one slot counter, and marks the thread (a
/// context mark of `kind` for the `Srcu`'s `Mm`) for the whole section: marked before the
/// section began, unmarked after it ended. It is `!Send`: read sections are counted per thread.
/// It is small (three words) because invalidation guards carry it by value.
#[must_use = "the read section ends as soon as the guard is dropped"]
#[derive(Debug)]
pub(crate) struct SrcuReadGuard<'a> {
    srcu: &'a Srcu,
    ticket: PackedTicket,
    kind: ScopeKind,
    _not_send: PhantomData<*const ()>,
}

impl SrcuReadGuard<'_> {
    /// The number of the thread in the section (`None` if it has none, see `thread_index.rs`);
    /// it stays this thread's until the section ends.
    #[inline]
    pub(crate) fn thread(&self) -> Option<usize> {
        self.ticket.unpack().thread
    }
}

impl Drop for SrcuReadGuard<'_> {
    fn drop(&mut self) {
        if crate::sync::unwinding_under_loom() {
            return;
        }
        self.srcu.read_unlock_raw(self.ticket.unpack());
        context::unmark(self.srcu.mm_id, self.kind);
    }
}
