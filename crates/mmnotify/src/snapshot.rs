//! The immutable list of classic subscribers that one invalidation works with, and the set of
//! those whose start succeeded.
//!
//! Writers (register, unregister, put, release) never change a published snapshot: they build
//! a new one and swap it in. An invalidation loads the current snapshot at its start and
//! keeps it until its end (see below for how), so "who was started" is a bitmap over a list that cannot
//! change under it. That answers the objection raised in the 2021 thread (computing the subset
//! of subscribers that succeeded is hard while the list changes): here the list does not
//! change. A subscriber registered after the start is not in the snapshot, so it can never get
//! an end without a start.
//!
//! # Reading the current snapshot without a lock or a shared write
//!
//! The current snapshot sits in a [`SnapshotCell`]. Outside loom that is an
//! [`arc_swap::ArcSwap`]: a start loads it with a few loads and an atomic swap on a slot its
//! own thread owns (arc-swap's per-thread debt list), no lock and no reference count on a line that
//! other threads write, and the window keeps the loaded [`SnapshotRef`] until its end. A writer
//! that replaces the snapshot pays the readers' debts (turns them into real references) before
//! it drops the old one, so the old list lives exactly as long as a window still uses it, as
//! with the `Arc` clone it replaces (and a registration is still freed by its last reference,
//! see `classic.rs`). Under loom, whose checker cannot see inside arc-swap, the cell is the
//! previous `RwLock<Arc<Snapshot>>` with an `Arc` clone per load: the same contract, visible
//! to the model.
//!
//! The started set is one inline `u64` for up to 64 subscribers and spills to the heap only
//! beyond that, so the common path allocates nothing.

use std::sync::Arc;

use crate::classic::Registration;

/// A loaded snapshot, kept for as long as it is used (see the module docs).
#[cfg(not(loom))]
pub(crate) type SnapshotRef = arc_swap::Guard<Arc<Snapshot>>;
/// A loaded snapshot, kept for as long as it is used (see the module docs).
#[cfg(loom)]
pub(crate) type SnapshotRef = Arc<Snapshot>;

/// The current snapshot of an `Mm`; replaced, never mutated.
#[derive(Debug)]
pub(crate) struct SnapshotCell {
    #[cfg(not(loom))]
    current: arc_swap::ArcSwap<Snapshot>,
    #[cfg(loom)]
    current: crate::sync::RwLock<Arc<Snapshot>>,
}

impl SnapshotCell {
    pub(crate) fn new(snapshot: Snapshot) -> Self {
        SnapshotCell {
            #[cfg(not(loom))]
            current: arc_swap::ArcSwap::from_pointee(snapshot),
            #[cfg(loom)]
            current: crate::sync::RwLock::new(Arc::new(snapshot)),
        }
    }

    /// The current snapshot, for a short use or for the length of one window.
    #[inline]
    pub(crate) fn load(&self) -> SnapshotRef {
        #[cfg(not(loom))]
        return self.current.load();
        #[cfg(loom)]
        return Arc::clone(&self.current.read());
    }

    /// The current snapshot as an owned reference (writers, which keep it across user code).
    pub(crate) fn load_full(&self) -> Arc<Snapshot> {
        #[cfg(not(loom))]
        return self.current.load_full();
        #[cfg(loom)]
        return Arc::clone(&self.current.read());
    }

    /// Installs `next` and returns the snapshot it replaces.
    pub(crate) fn replace(&self, next: Snapshot) -> Arc<Snapshot> {
        #[cfg(not(loom))]
        return self.current.swap(Arc::new(next));
        #[cfg(loom)]
        return std::mem::replace(&mut *self.current.write(), Arc::new(next));
    }
}

/// An immutable list of registrations, in call order: registration order under `Exact`,
/// newest first under the Linux policies.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) subs: Box<[Arc<Registration>]>,
}

impl Snapshot {
    pub(crate) fn len(&self) -> usize {
        self.subs.len()
    }

    pub(crate) fn position(&self, id: crate::SubscriberId) -> Option<usize> {
        self.subs.iter().position(|r| r.id == id)
    }

    /// A new snapshot with `reg` added last, or first when `newest_first` (the snapshot's order
    /// is the order in which every walk calls the subscribers).
    pub(crate) fn with(&self, reg: Arc<Registration>, newest_first: bool) -> Snapshot {
        let mut subs = Vec::with_capacity(self.subs.len() + 1);
        if newest_first {
            subs.push(reg);
            subs.extend(self.subs.iter().cloned());
        } else {
            subs.extend(self.subs.iter().cloned());
            subs.push(reg);
        }
        Snapshot {
            subs: subs.into_boxed_slice(),
        }
    }

    /// A new snapshot without the entry at `index`.
    pub(crate) fn without(&self, index: usize) -> Snapshot {
        let mut subs = self.subs.to_vec();
        subs.remove(index);
        Snapshot {
            subs: subs.into_boxed_slice(),
        }
    }
}

/// A set of positions in a snapshot.
///
/// # Invariants
///
/// `spill` is empty unless the snapshot has more than 64 entries; bit `i` of the set is bit
/// `i % 64` of word `i / 64`, word 0 being `inline`.
#[derive(Debug, Default, Clone)]
pub(crate) struct StartedSet {
    inline: u64,
    spill: Option<Box<[u64]>>,
}

impl StartedSet {
    /// An empty set able to hold positions `0..len` (allocates only if `len > 64`).
    pub(crate) fn with_len(len: usize) -> Self {
        let extra_words = len.saturating_sub(1) / 64;
        StartedSet {
            inline: 0,
            spill: (extra_words > 0).then(|| vec![0; extra_words].into_boxed_slice()),
        }
    }

    fn word(&mut self, i: usize) -> &mut u64 {
        match i / 64 {
            0 => &mut self.inline,
            w => &mut self.spill.as_mut().expect("a position within the snapshot")[w - 1],
        }
    }

    pub(crate) fn insert(&mut self, i: usize) {
        *self.word(i) |= 1 << (i % 64);
    }

    pub(crate) fn contains(&self, i: usize) -> bool {
        let word = match i / 64 {
            0 => self.inline,
            w => self
                .spill
                .as_ref()
                .and_then(|spill| spill.get(w - 1))
                .copied()
                .unwrap_or(0),
        };
        word & (1 << (i % 64)) != 0
    }

    pub(crate) fn clear(&mut self) {
        self.inline = 0;
        self.spill.iter_mut().flatten().for_each(|w| *w = 0);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn started_set_spills_past_64() {
        let mut set = StartedSet::with_len(130);
        for i in [0, 63, 64, 127, 129] {
            assert!(!set.contains(i));
            set.insert(i);
            assert!(set.contains(i));
        }
        assert!(!set.contains(65));
        assert!(set.contains(63) && set.contains(127));
        set.clear();
        assert!(!set.contains(129));
    }

    #[test]
    fn started_set_for_64_does_not_spill() {
        assert!(StartedSet::with_len(64).spill.is_none());
        assert_eq!(StartedSet::with_len(65).spill.map(|s| s.len()), Some(1));
        assert!(StartedSet::with_len(0).spill.is_none());
    }
}
