//! Physical frames with reference counts and contents, the shared zero page, and a page cache
//! for file and shared anonymous (shmem) pages.
//!
//! A frame is referenced once per page-table entry that maps it, plus once by the page cache
//! for cached pages. Fork shares one allocator between parent and child, so a copy-on-write
//! frame's count says how many address spaces still map it: at 1 a write fault may reuse it
//! without copying (and without a notifier, like Linux's `wp_page_reuse`).
//!
//! Each frame holds one word of data, enough to tell what a reader observes: a fresh frame
//! reads 0, a copy-on-write copy carries the old word, a store changes it.
//!
//! [`FrameId::ZERO`] is the shared zero page: a read fault on untouched private anonymous
//! memory maps it read-only, as Linux's `do_anonymous_page` maps `ZERO_PAGE`. Like Linux's, it
//! is not reference counted (getting and putting it does nothing), always reads 0, is never
//! written, never freed, and neither migrated nor reclaimed.
//!
//! The page cache is keyed by a [`CacheObject`]: a file, or the shmem object that Linux
//! creates for a `MAP_SHARED | MAP_ANONYMOUS` mapping (`shmem_zero_setup`). Cached pages stay
//! until the simulation ends, like the pages of a file that nobody truncates.

use std::collections::HashMap;
use std::fmt;

use crate::vma::FileId;

/// A physical frame number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameId(pub u64);

impl FrameId {
    /// The shared zero page (Linux's `ZERO_PAGE(0)`): always reads 0, mapped read-only.
    pub const ZERO: FrameId = FrameId(0);

    /// Whether this is the shared zero page.
    pub const fn is_zero_page(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for FrameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_zero_page() {
            f.write_str("the zero page")
        } else {
            write!(f, "frame {}", self.0)
        }
    }
}

/// What a page-cache page belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CacheObject {
    /// A file.
    File(FileId),
    /// The shmem object of one `MAP_SHARED | MAP_ANONYMOUS` mapping (shared across fork).
    Shmem(u64),
}

/// The frame allocator.
#[derive(Debug, Default)]
pub struct Frames {
    next: u64,
    refs: HashMap<FrameId, u32>,
    data: HashMap<FrameId, u64>,
    page_cache: HashMap<(CacheObject, u64), FrameId>,
    next_shmem: u64,
    allocated: u64,
    freed: u64,
}

impl Frames {
    /// A fresh, zero-filled frame with one reference.
    pub fn alloc(&mut self) -> FrameId {
        self.next += 1;
        let frame = FrameId(self.next);
        self.refs.insert(frame, 1);
        self.allocated += 1;
        frame
    }

    /// A fresh frame with one reference holding a copy of `from`'s word (a copy-on-write copy
    /// or a migration target).
    pub fn alloc_copy(&mut self, from: FrameId) -> FrameId {
        let word = self.read(from);
        let frame = self.alloc();
        self.write(frame, word);
        frame
    }

    /// One more reference to `frame` (nothing for the zero page).
    pub fn get(&mut self, frame: FrameId) {
        if frame.is_zero_page() {
            return;
        }
        *self.refs.get_mut(&frame).expect("get on a free frame") += 1;
    }

    /// Drops one reference; returns whether the frame was freed (never for the zero page).
    pub fn put(&mut self, frame: FrameId) -> bool {
        if frame.is_zero_page() {
            return false;
        }
        let count = self.refs.get_mut(&frame).expect("put on a free frame");
        *count -= 1;
        if *count == 0 {
            self.refs.remove(&frame);
            self.data.remove(&frame);
            self.freed += 1;
            true
        } else {
            false
        }
    }

    /// The reference count of `frame` (0 if free; the zero page is not counted and reports 0).
    pub fn refcount(&self, frame: FrameId) -> u32 {
        self.refs.get(&frame).copied().unwrap_or(0)
    }

    /// The word stored in `frame` (0 for a fresh frame, the zero page, and a free frame).
    pub fn read(&self, frame: FrameId) -> u64 {
        self.data.get(&frame).copied().unwrap_or(0)
    }

    /// Stores `word` in `frame`. The zero page is never written: a store there is ignored (the
    /// simulator copies the zero page before any store reaches it).
    pub fn write(&mut self, frame: FrameId, word: u64) {
        if frame.is_zero_page() || !self.refs.contains_key(&frame) {
            return;
        }
        if word == 0 {
            self.data.remove(&frame);
        } else {
            self.data.insert(frame, word);
        }
    }

    /// Whether `frame` belongs to the page cache (a file's or a shmem object's page).
    pub fn is_page_cache(&self, frame: FrameId) -> bool {
        self.page_cache.values().any(|f| *f == frame)
    }

    /// The page-cache frame of page `index` of `file`, read in (allocated) on first use; the
    /// cache keeps its own reference. Returns the frame with one extra reference for the caller.
    pub fn file_page(&mut self, file: FileId, index: u64) -> FrameId {
        self.cache_page(CacheObject::File(file), index)
    }

    /// The page-cache frame of page `index` of `object`, allocated on first use; returns it
    /// with one extra reference for the caller.
    pub fn cache_page(&mut self, object: CacheObject, index: u64) -> FrameId {
        let frame = match self.page_cache.get(&(object, index)) {
            Some(f) => *f,
            None => {
                let f = self.alloc();
                self.page_cache.insert((object, index), f);
                f
            }
        };
        self.get(frame);
        frame
    }

    /// A new shmem object, for a new `MAP_SHARED | MAP_ANONYMOUS` mapping.
    pub fn new_shmem(&mut self) -> CacheObject {
        self.next_shmem += 1;
        CacheObject::Shmem(self.next_shmem)
    }

    /// Frames currently referenced (the zero page is not counted).
    pub fn live(&self) -> usize {
        self.refs.len()
    }

    /// Frames ever allocated.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Frames freed.
    pub fn freed(&self) -> u64 {
        self.freed
    }
}
