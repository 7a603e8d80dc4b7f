//! The interval index: which interval subscriptions overlap a range.
//!
//! The engine needs three operations on a multiset of inclusive intervals `[start, last]`:
//! insert, remove one particular entry, and visit every entry that overlaps a query. They sit
//! behind the small [`IntervalIndex`] trait so that the structure can be swapped when a
//! benchmark says so, and so that every implementation is tested against the obvious one,
//! [`LinearIndex`].
//!
//! Queries run on the invalidation fast path, under the per-`Mm` interval lock, so an
//! implementation must not allocate while visiting.
//!
//! Entries are visited in ascending `start` order, entries with equal `start` in insertion
//! order; the engine calls interval callbacks in that order, which keeps runs reproducible.

/// A multiset of inclusive intervals `[start, last]`, each carrying a value.
pub trait IntervalIndex<V>: Default + Send {
    /// Adds `[start, last]` with `value`. Duplicates of the same interval are allowed.
    /// Requires `start <= last`.
    fn insert(&mut self, start: u64, last: u64, value: V);

    /// Removes and returns one entry with exactly these bounds whose value `is_target`
    /// accepts, or `None` if there is none.
    fn remove(&mut self, start: u64, last: u64, is_target: &mut dyn FnMut(&V) -> bool)
        -> Option<V>;

    /// Calls `visit` for every entry that shares an address with `[start, last]`, in ascending
    /// `start` order (insertion order among equal starts), without allocating.
    fn for_each_overlap(&self, start: u64, last: u64, visit: &mut dyn FnMut(&V));

    /// The number of entries.
    fn len(&self) -> usize;

    /// Whether there are no entries.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The reference implementation: a vector sorted by `start`, scanned in full by every query.
///
/// O(n) per query; the yardstick the real index is tested and measured against.
#[derive(Debug)]
pub struct LinearIndex<V> {
    entries: Vec<(u64, u64, V)>,
}

impl<V> Default for LinearIndex<V> {
    fn default() -> Self {
        LinearIndex {
            entries: Vec::new(),
        }
    }
}

impl<V: Send> IntervalIndex<V> for LinearIndex<V> {
    fn insert(&mut self, start: u64, last: u64, value: V) {
        debug_assert!(start <= last);
        let at = self.entries.partition_point(|e| e.0 <= start);
        self.entries.insert(at, (start, last, value));
    }

    fn remove(
        &mut self,
        start: u64,
        last: u64,
        is_target: &mut dyn FnMut(&V) -> bool,
    ) -> Option<V> {
        let at = self
            .entries
            .iter()
            .position(|e| e.0 == start && e.1 == last && is_target(&e.2))?;
        Some(self.entries.remove(at).2)
    }

    fn for_each_overlap(&self, start: u64, last: u64, visit: &mut dyn FnMut(&V)) {
        for e in &self.entries {
            if e.0 > last {
                break;
            }
            if e.1 >= start {
                visit(&e.2);
            }
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The index the engine uses.
pub(crate) type DefaultIndex<V> = LinearIndex<V>;
