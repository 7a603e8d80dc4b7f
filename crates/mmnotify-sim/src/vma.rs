//! Virtual memory areas: contiguous, page-aligned ranges with one protection and one backing.
//!
//! A [`Vma`] is anonymous or file-backed, private (copy-on-write) or shared, like Linux's
//! `vm_area_struct` reduced to what the notifier events depend on. [`VmaSet`] keeps them sorted
//! and non-overlapping, and splits them at the edges of a partial `munmap`, `mprotect` or
//! `mremap`, as Linux does.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::SimError;
use crate::frames::CacheObject;

/// The page size of the simulated machine.
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;

/// The virtual page number of `addr`.
pub const fn vpn_of(addr: u64) -> u64 {
    addr >> PAGE_SHIFT
}

/// The first address of virtual page `vpn`.
pub const fn addr_of(vpn: u64) -> u64 {
    vpn << PAGE_SHIFT
}

/// Page protections (`PROT_READ | PROT_WRITE | PROT_EXEC`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Prot {
    /// Readable.
    pub read: bool,
    /// Writable (requires `read`).
    pub write: bool,
    /// Executable.
    pub exec: bool,
}

impl Prot {
    /// `PROT_NONE`.
    pub const NONE: Prot = Prot {
        read: false,
        write: false,
        exec: false,
    };
    /// `PROT_READ`.
    pub const READ: Prot = Prot {
        read: true,
        write: false,
        exec: false,
    };
    /// `PROT_READ | PROT_WRITE`.
    pub const READ_WRITE: Prot = Prot {
        read: true,
        write: true,
        exec: false,
    };
    /// `PROT_WRITE` alone: rejected by the simulator (write access requires read access).
    pub const WRITE_ONLY: Prot = Prot {
        read: false,
        write: true,
        exec: false,
    };

    /// Checks the combination.
    ///
    /// # Errors
    ///
    /// [`SimError::InvalidProtection`] for write without read.
    pub fn validate(self) -> Result<Prot, SimError> {
        if self.write && !self.read {
            return Err(SimError::InvalidProtection { prot: self });
        }
        Ok(self)
    }

    /// Whether an access of this kind is allowed.
    pub const fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => self.read || self.exec,
            Access::Write => self.write,
        }
    }
}

impl fmt::Display for Prot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = if self.read { 'r' } else { '-' };
        let w = if self.write { 'w' } else { '-' };
        let x = if self.exec { 'x' } else { '-' };
        write!(f, "{r}{w}{x}")
    }
}

/// The kind of a memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// A load.
    Read,
    /// A store.
    Write,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// A simulated file, identified by a number the caller chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u64);

/// What backs a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backing {
    /// Anonymous memory (zero-filled on first touch). A private anonymous page that is only
    /// read maps the shared zero page until its first write. A `MAP_SHARED | MAP_ANONYMOUS`
    /// mapping is backed by one shmem object created at `mmap` (Linux's `shmem_zero_setup`), so
    /// every process that inherits the mapping sees the same pages.
    Anonymous,
    /// A file; `offset` (in bytes, page-aligned) is the file position of the VMA's start.
    File {
        /// The file.
        file: FileId,
        /// The file offset of the first page.
        offset: u64,
    },
}

/// Whether writes are private to the process (copy-on-write) or shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sharing {
    /// `MAP_PRIVATE`: copy-on-write.
    Private,
    /// `MAP_SHARED`.
    Shared,
}

/// One virtual memory area `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Vma {
    /// First address (page-aligned).
    pub start: u64,
    /// First address after the area (page-aligned, `> start`).
    pub end: u64,
    /// Protections.
    pub prot: Prot,
    /// What backs it.
    pub backing: Backing,
    /// Private or shared.
    pub sharing: Sharing,
    /// For a shared anonymous VMA: its shmem object and the object page of `start`.
    pub(crate) shmem: Option<(CacheObject, u64)>,
}

impl Vma {
    /// Whether the VMA is anonymous.
    pub const fn is_anonymous(&self) -> bool {
        matches!(self.backing, Backing::Anonymous)
    }

    /// Whether the VMA is shared.
    pub const fn is_shared(&self) -> bool {
        matches!(self.sharing, Sharing::Shared)
    }

    /// Whether fork makes its pages copy-on-write (Linux's `is_cow_mapping`: private; every
    /// private mapping of the simulator may become writable).
    pub const fn is_cow_mapping(&self) -> bool {
        matches!(self.sharing, Sharing::Private)
    }

    /// Whether `addr` lies in the VMA.
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Never true (a VMA covers at least one page); for symmetry with `len`.
    pub const fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The page index in the backing file of the page at `addr`, for file VMAs.
    pub fn file_page(&self, addr: u64) -> Option<(FileId, u64)> {
        match self.backing {
            Backing::File { file, offset } => {
                Some((file, (offset + (addr - self.start)) >> PAGE_SHIFT))
            }
            Backing::Anonymous => None,
        }
    }

    /// The page-cache page behind the page at `addr`: the file page of a file VMA, the shmem
    /// page of a shared anonymous VMA; `None` for private anonymous memory.
    pub(crate) fn cache_page(&self, addr: u64) -> Option<(CacheObject, u64)> {
        match (self.backing, self.shmem) {
            (Backing::File { file, .. }, _) => self
                .file_page(addr)
                .map(|(_, index)| (CacheObject::File(file), index)),
            (Backing::Anonymous, Some((object, first))) => {
                Some((object, first + ((addr - self.start) >> PAGE_SHIFT)))
            }
            (Backing::Anonymous, None) => None,
        }
    }

    /// The part of the VMA in `[start, end)`, or `None` if they do not overlap.
    pub fn clip(&self, start: u64, end: u64) -> Option<Vma> {
        let s = self.start.max(start);
        let e = self.end.min(end);
        if s >= e {
            return None;
        }
        let mut piece = *self;
        if let Backing::File { file, offset } = self.backing {
            piece.backing = Backing::File {
                file,
                offset: offset + (s - self.start),
            };
        }
        if let Some((object, first)) = self.shmem {
            piece.shmem = Some((object, first + ((s - self.start) >> PAGE_SHIFT)));
        }
        piece.start = s;
        piece.end = e;
        Some(piece)
    }
}

impl fmt::Display for Vma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match (self.backing, self.sharing) {
            (Backing::Anonymous, Sharing::Private) => "anon private".to_string(),
            (Backing::Anonymous, Sharing::Shared) => "anon shared".to_string(),
            (Backing::File { file, .. }, Sharing::Private) => format!("file {} private", file.0),
            (Backing::File { file, .. }, Sharing::Shared) => format!("file {} shared", file.0),
        };
        write!(
            f,
            "[{:#x}, {:#x}) {} {}",
            self.start, self.end, self.prot, kind
        )
    }
}

/// The VMAs of one address space, sorted and non-overlapping.
#[derive(Clone, Debug, Default)]
pub struct VmaSet {
    by_start: BTreeMap<u64, Vma>,
}

impl VmaSet {
    /// All VMAs in address order.
    pub fn iter(&self) -> impl Iterator<Item = &Vma> {
        self.by_start.values()
    }

    /// Number of VMAs.
    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// Whether there is no VMA.
    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// The VMA containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Vma> {
        self.by_start
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| v.contains(addr))
    }

    /// The VMAs overlapping `[start, end)`, in address order.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<Vma> {
        let first = self.find(start).map_or(start, |v| v.start);
        self.by_start
            .range(first..end)
            .map(|(_, v)| *v)
            .filter(|v| v.end > start)
            .collect()
    }

    /// The first hole in `[start, end)` not covered by any VMA, if any.
    pub fn first_hole(&self, start: u64, end: u64) -> Option<u64> {
        let mut cursor = start;
        for v in self.overlapping(start, end) {
            if v.start > cursor {
                return Some(cursor);
            }
            cursor = v.end;
        }
        (cursor < end).then_some(cursor)
    }

    /// The lowest free gap of `len` bytes at or above `base`.
    pub fn find_gap(&self, base: u64, len: u64) -> Option<u64> {
        let mut cursor = base;
        for v in self.by_start.values() {
            if v.end <= cursor {
                continue;
            }
            if v.start >= cursor.checked_add(len)? {
                return Some(cursor);
            }
            cursor = cursor.max(v.end);
        }
        cursor.checked_add(len).map(|_| cursor)
    }

    /// Inserts a VMA; the caller checked that it overlaps nothing.
    pub(crate) fn insert(&mut self, vma: Vma) {
        debug_assert!(self.overlapping(vma.start, vma.end).is_empty());
        self.by_start.insert(vma.start, vma);
    }

    /// Splits VMAs so that `addr` is a boundary.
    fn split_at(&mut self, addr: u64) {
        let Some(v) = self.find(addr).copied() else {
            return;
        };
        if v.start == addr {
            return;
        }
        let low = v.clip(v.start, addr).expect("addr inside v");
        let high = v.clip(addr, v.end).expect("addr inside v");
        self.by_start.insert(low.start, low);
        self.by_start.insert(high.start, high);
    }

    /// Removes `[start, end)`, splitting VMAs at its edges; returns the removed pieces.
    pub(crate) fn remove_range(&mut self, start: u64, end: u64) -> Vec<Vma> {
        self.split_at(start);
        self.split_at(end);
        let pieces = self.overlapping(start, end);
        for p in &pieces {
            self.by_start.remove(&p.start);
        }
        pieces
    }

    /// Sets the protection of `[start, end)` (which must be fully mapped), splitting at edges.
    pub(crate) fn protect(&mut self, start: u64, end: u64, prot: Prot) {
        self.split_at(start);
        self.split_at(end);
        for p in self.overlapping(start, end) {
            if let Some(v) = self.by_start.get_mut(&p.start) {
                v.prot = prot;
            }
        }
    }
}
