//! The primary page table: virtual page number → page-table entry.
//!
//! Each [`Pte`] names the frame it maps and carries the bits the notifier events are about:
//! `writable` (cleared by fork's write-protect and by mprotect), `accessible` (cleared by
//! `PROT_NONE`), `young` (the accessed bit that reclaim ages) and `dirty`.

use std::collections::BTreeMap;

use crate::frames::FrameId;

/// One page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pte {
    /// The mapped frame.
    pub frame: FrameId,
    /// Stores are allowed without a fault.
    pub writable: bool,
    /// Loads are allowed without a fault (false under `PROT_NONE`).
    pub accessible: bool,
    /// Accessed since the bit was last cleared.
    pub young: bool,
    /// Written since mapped.
    pub dirty: bool,
}

/// The page table of one address space.
#[derive(Clone, Debug, Default)]
pub struct PageTable {
    entries: BTreeMap<u64, Pte>,
}

impl PageTable {
    /// The entry of `vpn`.
    pub fn get(&self, vpn: u64) -> Option<Pte> {
        self.entries.get(&vpn).copied()
    }

    /// A mutable reference to the entry of `vpn`.
    pub(crate) fn get_mut(&mut self, vpn: u64) -> Option<&mut Pte> {
        self.entries.get_mut(&vpn)
    }

    /// Installs or replaces the entry of `vpn`; returns the old one.
    pub(crate) fn set(&mut self, vpn: u64, pte: Pte) -> Option<Pte> {
        self.entries.insert(vpn, pte)
    }

    /// Removes the entries of pages `[first, end)`; returns them.
    pub(crate) fn remove_range(&mut self, first: u64, end: u64) -> Vec<(u64, Pte)> {
        let vpns: Vec<u64> = self.entries.range(first..end).map(|(v, _)| *v).collect();
        vpns.into_iter()
            .filter_map(|v| self.entries.remove(&v).map(|p| (v, p)))
            .collect()
    }

    /// The entries of pages `[first, end)`.
    pub fn range(&self, first: u64, end: u64) -> Vec<(u64, Pte)> {
        self.entries
            .range(first..end)
            .map(|(v, p)| (*v, *p))
            .collect()
    }

    /// Whether any page in `[first, end)` is mapped.
    pub fn any_in(&self, first: u64, end: u64) -> bool {
        self.entries.range(first..end).next().is_some()
    }

    /// Applies `f` to every entry of `[first, end)`.
    pub(crate) fn update_range(&mut self, first: u64, end: u64, mut f: impl FnMut(&mut Pte)) {
        for (_, pte) in self.entries.range_mut(first..end) {
            f(pte);
        }
    }

    /// Number of mapped pages.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no page is mapped.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry, in page order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Pte)> + '_ {
        self.entries.iter().map(|(v, p)| (*v, *p))
    }
}
