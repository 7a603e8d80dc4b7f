//! What the current thread is doing, so that blocking calls made from the wrong place fail
//! with [`Error::WouldDeadlock`] instead of hanging.
//!
//! The kernel has lockdep and `might_sleep()` for this; we have a small per-thread record.
//! Each thread remembers, per address space (keyed by the `Mm`'s unique id):
//!
//! * how many invalidation guards it holds (an open `start..end` window),
//! * how many young or secondary-TLB walks it is inside, and
//! * how many callbacks of that address space it is running (callbacks nest: a callback may
//!   start an invalidation of another range, whose callbacks run on the same thread);
//!
//! and, for the whole thread, how deep it is in non-blockable callback context.
//!
//! Every blocking operation of the library (register, get_or_register, unregister,
//! synchronize, release, a blocking start, a first interval insert, interval remove, a
//! read_begin that must wait) calls [`may_block`] first. The rows are checked in this order:
//!
//! | the thread is…                                     | the call waits for…          | verdict                |
//! |----------------------------------------------------|------------------------------|------------------------|
//! | handling a non-blockable invalidation (any `Mm`), or running `free` | anything | [`DeadlockCause::NonBlockingContext`] |
//! | running a callback of the same `Mm`                | callbacks to return          | [`DeadlockCause::InsideCallback`] |
//! | holding a guard of the same `Mm`                   | guards to end                | [`DeadlockCause::HoldsGuard`]     |
//! | inside a young or TLB walk of the same `Mm`        | the walk to end              | [`DeadlockCause::InsideWalk`]     |
//!
//! # Every read section is marked
//!
//! Guards and walks are exactly the read sections of the `Mm`'s SRCU (`srcu.rs`), and the
//! blocking calls are the ones that wait for read sections (or for what only their end
//! brings). So the mark is not left to each caller: [`Srcu::read_lock`](crate::srcu::Srcu)
//! takes the kind of section and enters the [`Scope`] itself, before the section begins, and the
//! read guard leaves it after the section ended. Code that runs while the section is open but
//! outside any callback (a subscriber's `Drop` when the walk's snapshot releases the last
//! reference, say) is therefore seen by the check and gets `WouldDeadlock` instead of waiting
//! for its own thread.
//!
//! The record costs two thread-local accesses per read section and per phase of callbacks (the
//! engine marks a phase once: all starts, all ends, one interval pass, one walk); it allocates
//! nothing for up to [`INLINE_ENTRIES`] address spaces open at once on one thread.

use std::cell::RefCell;
use std::marker::PhantomData;

use crate::error::{BlockingOp, DeadlockCause, Error, Result};
use crate::sync::thread_local;

/// How many address spaces one thread can be inside at once before the record spills to the
/// heap.
pub(crate) const INLINE_ENTRIES: usize = 8;

/// One address space's counts on this thread. An entry whose counts are all zero is free; it
/// keeps its `mm` until reused, so that the next mark of the same address space finds it again
/// with one compare. At most one entry holds a given `mm` (a mark looks for one before taking
/// a free entry), so a lookup compares one word per entry.
#[derive(Clone, Copy, Default)]
struct Entry {
    mm: u64,
    guards: u32,
    walks: u32,
    callbacks: u32,
}

impl Entry {
    fn is_free(&self) -> bool {
        self.guards == 0 && self.walks == 0 && self.callbacks == 0
    }

    fn counter(&mut self, kind: ScopeKind) -> &mut u32 {
        match kind {
            ScopeKind::Guard => &mut self.guards,
            ScopeKind::Walk => &mut self.walks,
            ScopeKind::Callback { .. } => &mut self.callbacks,
        }
    }
}

#[derive(Default)]
struct ThreadRecord {
    inline: [Entry; INLINE_ENTRIES],
    spill: Vec<Entry>,
    nonblocking_depth: u32,
    /// The inline entry used last: a thread usually works on one address space at a time, so
    /// it is checked before the search (a hint only; any value is safe).
    last: usize,
}

impl ThreadRecord {
    fn find(&mut self, mm: u64) -> Option<&mut Entry> {
        let last = self.last % INLINE_ENTRIES;
        if self.inline[last].mm == mm {
            return Some(&mut self.inline[last]);
        }
        self.inline
            .iter_mut()
            .chain(self.spill.iter_mut())
            .find(|e| e.mm == mm)
    }

    fn find_or_insert(&mut self, mm: u64) -> &mut Entry {
        let last = self.last % INLINE_ENTRIES;
        if self.inline[last].mm == mm {
            return &mut self.inline[last];
        }
        let position = self
            .inline
            .iter()
            .chain(self.spill.iter())
            .position(|e| e.mm == mm)
            .or_else(|| self.inline.iter().position(Entry::is_free));
        match position {
            Some(i) if i < INLINE_ENTRIES => {
                self.last = i;
                let entry = &mut self.inline[i];
                entry.mm = mm;
                entry
            }
            Some(i) => &mut self.spill[i - INLINE_ENTRIES],
            None => {
                self.spill.retain(|e| !e.is_free());
                self.spill.push(Entry {
                    mm,
                    ..Entry::default()
                });
                self.spill.last_mut().expect("just pushed")
            }
        }
    }
}

thread_local! {
    static RECORD: RefCell<ThreadRecord> = RefCell::new(ThreadRecord::default());
}

/// What a [`Scope`] marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScopeKind {
    /// The thread holds an invalidation guard of the `Mm` (a read section).
    Guard,
    /// The thread is inside a young or secondary-TLB walk of the `Mm` (a read section).
    Walk,
    /// The thread runs a callback of the `Mm`; `nonblocking` if the callback handles a
    /// non-blockable invalidation.
    Callback {
        /// Whether the callback must not sleep.
        nonblocking: bool,
    },
}

/// Marks the current thread as being inside an `Mm` until dropped.
///
/// # Invariants
///
/// While the value exists, the thread's record counts it once, under its `Mm` and kind. It is
/// `!Send`: the mark belongs to the thread that made it.
#[must_use = "the mark is removed when the scope is dropped"]
#[derive(Debug)]
pub(crate) struct Scope {
    mm: u64,
    kind: ScopeKind,
    _not_send: PhantomData<*const ()>,
}

impl Scope {
    pub(crate) fn enter(mm: u64, kind: ScopeKind) -> Scope {
        mark(mm, kind);
        Scope {
            mm,
            kind,
            _not_send: PhantomData,
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if crate::sync::unwinding_under_loom() {
            return;
        }
        unmark(self.mm, self.kind);
    }
}

/// Marks the thread as inside `mm` (what [`Scope::enter`] does, for owners that keep the
/// `mm` and `kind` themselves and call [`unmark`] exactly once, on the same thread).
#[inline]
pub(crate) fn mark(mm: u64, kind: ScopeKind) {
    // `try_with`: during thread teardown (a thread-local destructor that uses an `Mm`) the
    // record may be gone; then nothing is marked, and nothing is checked either.
    let _ = RECORD.try_with(|record| {
        let mut record = record.borrow_mut();
        if let ScopeKind::Callback { nonblocking: true } = kind {
            record.nonblocking_depth += 1;
        }
        *record.find_or_insert(mm).counter(kind) += 1;
    });
}

/// Removes one [`mark`].
#[inline]
pub(crate) fn unmark(mm: u64, kind: ScopeKind) {
    // `try_with`: during thread teardown the record may already be gone, and then there is
    // nobody left to ask about it.
    let _ = RECORD.try_with(|record| {
        let mut record = record.borrow_mut();
        if let ScopeKind::Callback { nonblocking: true } = kind {
            record.nonblocking_depth -= 1;
        }
        if let Some(entry) = record.find(mm) {
            *entry.counter(kind) -= 1;
        }
    });
}

/// Checks that the current thread may block in `op` on the `Mm` with id `mm`.
///
/// # Errors
///
/// [`Error::WouldDeadlock`] with the cause from the table in the module docs.
pub(crate) fn may_block(mm: u64, op: BlockingOp) -> Result<()> {
    let cause = RECORD.try_with(|record| {
        let mut record = record.borrow_mut();
        if record.nonblocking_depth > 0 {
            return Some(DeadlockCause::NonBlockingContext);
        }
        match record.find(mm) {
            Some(entry) if entry.callbacks > 0 => Some(DeadlockCause::InsideCallback),
            Some(entry) if entry.guards > 0 => Some(DeadlockCause::HoldsGuard),
            Some(entry) if entry.walks > 0 => Some(DeadlockCause::InsideWalk),
            _ => None,
        }
    });
    match cause.ok().flatten() {
        Some(cause) => Err(Error::WouldDeadlock { op, cause }),
        None => Ok(()),
    }
}

/// Whether the current thread runs a callback for a non-blockable invalidation (of any `Mm`).
pub fn in_nonblocking_context() -> bool {
    RECORD
        .try_with(|record| record.borrow().nonblocking_depth > 0)
        .unwrap_or(false)
}
