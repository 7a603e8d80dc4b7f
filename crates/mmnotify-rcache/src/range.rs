//! Page-aligned ranges and access rights: what a registration covers and allows.
//!
//! A caller asks for `[addr, addr + len)` at byte granularity; registrations, like the pins
//! behind them, cover whole pages. [`PageRange::covering`] rounds outwards and rejects what no
//! registration could cover (empty, wrapping past the end of the address space), so every
//! later step works on a valid, non-empty, page-aligned range.

use std::fmt;
use std::ops::BitOr;

use crate::error::{Error, Result};

/// The system page size, in bytes.
pub fn page_size() -> u64 {
    mmnotify_uffd::page_size()
}

/// A non-empty, page-aligned range `[start, end)` of this process's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRange {
    start: u64,
    end: u64,
}

impl PageRange {
    /// The page-aligned range covering the bytes `[addr, addr + len)`.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyRange`] for `len == 0`; [`Error::RangeOverflow`] when the range, rounded
    /// to pages, would wrap past the end of the address space.
    pub fn covering(addr: u64, len: u64) -> Result<PageRange> {
        if len == 0 {
            return Err(Error::EmptyRange { addr });
        }
        // The page size is a power of two: masks, not divisions (a 64-bit division costs
        // tens of cycles, on the hit path).
        let mask = page_size() - 1;
        let end = addr
            .checked_add(len - 1)
            .and_then(|last| (last | mask).checked_add(1))
            .ok_or(Error::RangeOverflow { addr, len })?;
        Ok(PageRange {
            start: addr & !mask,
            end,
        })
    }

    /// A range from page-aligned bounds; `None` unless `start < end` and both are aligned.
    pub fn from_bounds(start: u64, end: u64) -> Option<PageRange> {
        let ps = page_size();
        (start < end && start % ps == 0 && end % ps == 0).then_some(PageRange { start, end })
    }

    /// First byte.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// One past the last byte.
    pub const fn end(&self) -> u64 {
        self.end
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Never true (a `PageRange` is never empty); present for the usual `len`/`is_empty` pair.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len() / page_size()
    }

    /// The same range as the engine's type.
    pub fn engine(&self) -> mmnotify::Range {
        // INVARIANT: start < end, so the engine accepts it; the fallback is never taken.
        mmnotify::Range::new(self.start, self.end).unwrap_or(mmnotify::Range::ALL)
    }

    /// Whether `other` lies within this range.
    pub const fn contains(&self, other: &PageRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether the two ranges share a byte.
    pub const fn overlaps(&self, other: &PageRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether the two ranges share a byte or touch.
    pub const fn touches(&self, other: &PageRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// The smallest range covering both.
    pub fn union(&self, other: &PageRange) -> PageRange {
        PageRange {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }
}

impl fmt::Display for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

/// What a registration lets the device do with the memory (UCX's `prot`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Access(u8);

impl Access {
    /// The device reads the memory (it is the source of a transfer, e.g. `WRITE_FIXED`).
    pub const READ: Access = Access(1);
    /// The device writes the memory (it is the target of a transfer, e.g. `READ_FIXED`).
    pub const WRITE: Access = Access(2);
    /// Both.
    pub const READ_WRITE: Access = Access(3);

    /// Whether every right in `other` is also in `self`.
    pub const fn includes(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the device may read.
    pub const fn read(self) -> bool {
        self.0 & 1 != 0
    }

    /// Whether the device may write.
    pub const fn write(self) -> bool {
        self.0 & 2 != 0
    }
}

impl BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = if self.read() { "r" } else { "-" };
        let w = if self.write() { "w" } else { "-" };
        write!(f, "{r}{w}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_rounds_outwards_and_rejects_bad_input() {
        let ps = page_size();
        let r = PageRange::covering(ps + 1, ps).unwrap();
        assert_eq!((r.start(), r.end()), (ps, 3 * ps));
        assert!(matches!(
            PageRange::covering(5, 0),
            Err(Error::EmptyRange { addr: 5 })
        ));
        assert!(matches!(
            PageRange::covering(u64::MAX - 10, 100),
            Err(Error::RangeOverflow { .. })
        ));
        // The last page of the address space cannot be covered: its end would be 2^64.
        assert!(matches!(
            PageRange::covering(u64::MAX - 1, 1),
            Err(Error::RangeOverflow { .. })
        ));
    }

    #[test]
    fn access_inclusion() {
        assert!(Access::READ_WRITE.includes(Access::READ));
        assert!(!Access::READ.includes(Access::WRITE));
        assert_eq!(Access::READ | Access::WRITE, Access::READ_WRITE);
        assert_eq!(Access::READ_WRITE.to_string(), "rw");
    }
}
