//! Physical frames with reference counts, and a page cache for file pages.
//!
//! A frame is referenced once per page-table entry that maps it, plus once by the page cache
//! for file pages. Fork shares one allocator between parent and child, so a copy-on-write
//! frame's count says how many address spaces still map it: at 1 a write fault may reuse it
//! without copying (and without a notifier, like Linux's `wp_page_reuse`).

use std::collections::HashMap;
use std::fmt;

use crate::vma::FileId;

/// A physical frame number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameId(pub u64);

impl fmt::Display for FrameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "frame {}", self.0)
    }
}

/// The frame allocator.
#[derive(Debug, Default)]
pub struct Frames {
    next: u64,
    refs: HashMap<FrameId, u32>,
    page_cache: HashMap<(FileId, u64), FrameId>,
    allocated: u64,
    freed: u64,
}

impl Frames {
    /// A fresh frame with one reference.
    pub fn alloc(&mut self) -> FrameId {
        self.next += 1;
        let frame = FrameId(self.next);
        self.refs.insert(frame, 1);
        self.allocated += 1;
        frame
    }

    /// One more reference to `frame`.
    pub fn get(&mut self, frame: FrameId) {
        *self.refs.get_mut(&frame).expect("get on a free frame") += 1;
    }

    /// Drops one reference; returns whether the frame was freed.
    pub fn put(&mut self, frame: FrameId) -> bool {
        let count = self.refs.get_mut(&frame).expect("put on a free frame");
        *count -= 1;
        if *count == 0 {
            self.refs.remove(&frame);
            self.freed += 1;
            true
        } else {
            false
        }
    }

    /// The reference count of `frame` (0 if free).
    pub fn refcount(&self, frame: FrameId) -> u32 {
        self.refs.get(&frame).copied().unwrap_or(0)
    }

    /// Whether `frame` belongs to the page cache.
    pub fn is_page_cache(&self, frame: FrameId) -> bool {
        self.page_cache.values().any(|f| *f == frame)
    }

    /// The page-cache frame of page `index` of `file`, read in (allocated) on first use; the
    /// cache keeps its own reference. Returns the frame with one extra reference for the caller.
    pub fn file_page(&mut self, file: FileId, index: u64) -> FrameId {
        let frame = match self.page_cache.get(&(file, index)) {
            Some(f) => *f,
            None => {
                let f = self.alloc();
                self.page_cache.insert((file, index), f);
                f
            }
        };
        self.get(frame);
        frame
    }

    /// Frames currently referenced.
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
