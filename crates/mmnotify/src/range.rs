//! What an invalidation is about: an address range, the reason for it, and whether the
//! subscribers may sleep while handling it.
//!
//! A [`Range`] is half-open, `[start, end)`, and never empty. Both bounds are plain `u64`
//! virtual addresses; nothing here assumes a page size, so a backend that works in pages
//! converts at its edge. Empty, inverted and overflowing ranges are rejected when the range is
//! built ([`Range::new`], [`Range::from_len`]), so the dispatcher, the subscribers and the
//! interval index never see one: the kernel once passed an empty range to a secondary-TLB
//! callback by accident and the callee happened to read it as "flush everything".
//!
//! An [`Event`] says *why* the range changes. Events are advisory: a subscriber must invalidate
//! whatever the event, but may use it to skip work it caused itself (a device migrating its own
//! pages recognises its [`Owner`] in [`Event::Migrate`]).
//!
//! [`Blockable`] is never chosen by the caller of a start: the dispatcher sets it from the entry
//! point (`invalidate_start` is blockable, `invalidate_start_nonblock` is not), and the
//! [`Invalidation`] handed to subscribers carries it.

use std::fmt;

use crate::error::{Error, Result};

/// A non-empty, half-open virtual address range `[start, end)`.
///
/// # Invariants
///
/// `start < end`. In particular the range is never empty and `end` never wrapped around.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Range {
    start: u64,
    end: u64,
}

impl Range {
    /// The whole address space that a range can describe, `[0, u64::MAX)`. Used for the
    /// release invalidation at teardown.
    pub const ALL: Range = Range {
        start: 0,
        end: u64::MAX,
    };

    /// Builds `[start, end)`.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyRange`] if `start == end`, [`Error::InvertedRange`] if `start > end`.
    ///
    /// ```
    /// use mmnotify::Range;
    /// let r = Range::new(0x1000, 0x3000)?;
    /// assert_eq!(r.len(), 0x2000);
    /// assert!(Range::new(0x3000, 0x1000).is_err());
    /// # Ok::<(), mmnotify::Error>(())
    /// ```
    pub fn new(start: u64, end: u64) -> Result<Self> {
        if start == end {
            return Err(Error::EmptyRange { start });
        }
        if start > end {
            return Err(Error::InvertedRange { start, end });
        }
        // INVARIANT: start < end was checked just above.
        Ok(Range { start, end })
    }

    /// Builds `[start, start + len)`.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyRange`] if `len == 0`, [`Error::RangeOverflow`] if `start + len` does not
    /// fit in a `u64`.
    pub fn from_len(start: u64, len: u64) -> Result<Self> {
        if len == 0 {
            return Err(Error::EmptyRange { start });
        }
        let end = start
            .checked_add(len)
            .ok_or(Error::RangeOverflow { start, len })?;
        Range::new(start, end)
    }

    /// The first address in the range.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// The first address after the range.
    pub const fn end(&self) -> u64 {
        self.end
    }

    /// The last address in the range (inclusive), `end - 1`.
    pub const fn last(&self) -> u64 {
        self.end - 1
    }

    /// The number of bytes in the range; never zero.
    #[expect(clippy::len_without_is_empty, reason = "a Range is never empty")]
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether `addr` lies in the range.
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Whether the range shares at least one address with the inclusive interval
    /// `[start, last]`, the test the interval index uses.
    pub const fn overlaps_inclusive(&self, start: u64, last: u64) -> bool {
        self.start <= last && start <= self.last()
    }

    /// Whether the two ranges share at least one address.
    pub const fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The identity of a device or driver that moves pages itself; see [`Event::Migrate`] and
/// [`Event::Exclusive`]. Any value the owner chooses, as long as it is unique to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(pub u64);

/// Why a range is being invalidated (Linux's `enum mmu_notifier_event`, with the owner carried
/// only where it means something).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Event {
    /// The range is being unmapped (munmap, exit, mremap's source, the OOM reaper).
    Unmap,
    /// Page-table entries are cleared or replaced for another reason (madvise DONTNEED,
    /// reclaim, migration, a copy-on-write fault, KSM).
    Clear,
    /// A protection change driven by the VMA (mprotect).
    ProtectionVma,
    /// A per-page protection change (fork write-protecting the parent, writeback cleaning);
    /// the subscriber must re-read the primary entries.
    ProtectionPage,
    /// Soft-dirty bits are being cleared.
    SoftDirty,
    /// The address space is being torn down; sent only to interval subscribers, once, over
    /// [`Range::ALL`].
    Release,
    /// A device is migrating pages; `owner` lets that device skip its own migration.
    Migrate {
        /// Who migrates.
        owner: Owner,
    },
    /// Pages are being made exclusive to a device; `owner` is that device.
    Exclusive {
        /// Who takes the pages.
        owner: Owner,
    },
}

impl Event {
    /// The owner carried by [`Event::Migrate`] and [`Event::Exclusive`], `None` otherwise.
    pub const fn owner(&self) -> Option<Owner> {
        match self {
            Event::Migrate { owner } | Event::Exclusive { owner } => Some(*owner),
            _ => None,
        }
    }
}

/// Whether subscribers may sleep while handling an invalidation.
///
/// Set by the dispatcher from the entry point, never by the caller of a start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Blockable {
    /// Subscribers may sleep, and may not refuse.
    Yes,
    /// Subscribers must not sleep; one that would have to may refuse (see
    /// [`Subscriber::invalidate_range_start`](crate::Subscriber::invalidate_range_start)).
    No,
}

/// One invalidation as subscribers see it: the range, the reason, and the context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Invalidation {
    range: Range,
    event: Event,
    blockable: Blockable,
}

impl Invalidation {
    pub(crate) const fn new(range: Range, event: Event, blockable: Blockable) -> Self {
        Invalidation {
            range,
            event,
            blockable,
        }
    }

    /// The range whose primary entries change.
    pub const fn range(&self) -> Range {
        self.range
    }

    /// Why they change.
    pub const fn event(&self) -> Event {
        self.event
    }

    /// Whether the subscriber may sleep (Linux's `mmu_notifier_range_blockable`).
    pub const fn blockable(&self) -> Blockable {
        self.blockable
    }

    /// Shorthand for `self.blockable() == Blockable::Yes`.
    pub const fn is_blockable(&self) -> bool {
        matches!(self.blockable, Blockable::Yes)
    }
}
