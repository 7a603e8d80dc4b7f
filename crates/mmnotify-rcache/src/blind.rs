//! Memory the watcher cannot fully see, recognised when a region is registered.
//!
//! userfaultfd sends nothing for `shmdt` (a SysV attachment goes away silently), for a hole
//! punch or `ftruncate` of a file mapped shared (the page cache drops the pages; the mapping
//! stays), nor for such calls made through *another* mapping of the same file, by this or any
//! other process. A cache that trusted the watcher there would hand out a registration whose
//! pinned pages no longer back the address: the stale hit this crate exists to rule out. A
//! user who never heard of the cooperative wrappers must still be safe, so before registering,
//! the cache reads `/proc/self/maps` for the range and classifies it:
//!
//! * a hole anywhere: [`Error::Unmapped`](crate::Error::Unmapped);
//! * a SysV shm attachment (`/SYSV...`), or any shared file mapping (memfd, tmpfs, ext4, and
//!   shared anonymous memory, which is a shmem file another process may hold): *blind*;
//! * a private file mapping: *blind* too (a truncation by anyone unmaps its pages past the new
//!   end, the copied-on-write ones included, without an event);
//! * a part the watcher reported it could not watch: *blind*;
//! * anything else (anonymous private memory: heap, stack, `mmap`ed buffers): *seen*.
//!
//! A blind region is handled by [`BlindSpotPolicy`]: registered for the one use and
//! deregistered at its put (never cached, the default), or cached and validated on every hit
//! by comparing the page frame numbers now mapped with those recorded at registration (UCX's
//! `CHECK_PFN`, possible only with `CAP_SYS_ADMIN`; without it this policy falls back to not
//! caching), or trusted (for users who make every such call through the wrappers). The frames
//! are read before and after the registrar pins them, and the region is cached only if the two
//! readings agree: a frame replaced while the registrar ran (a hole punch and refault) would
//! otherwise be recorded in place of the pinned one, and every later hit would validate.

use mmnotify_uffd::{maps, pagemap};

use crate::error::{Error, Result};
use crate::range::PageRange;

/// What the cache does with memory the watcher cannot fully see.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlindSpotPolicy {
    /// Register for one use, deregister at the put: never a stale hit, never a hit.
    #[default]
    Uncached,
    /// Cache, and compare the page frames on every hit (falls back to `Uncached` where
    /// /proc/self/pagemap hides frame numbers, i.e. without `CAP_SYS_ADMIN`).
    ValidateFrames,
    /// Cache as if the watcher saw everything: only for users who make every `shmdt`, hole
    /// punch and `ftruncate` of such memory through the watcher's wrappers, in every process.
    Trust,
}

/// Why the watcher cannot vouch for a range.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlindReason {
    /// A SysV shared memory attachment (`shmdt` sends no event).
    SysvShm {
        /// The name /proc/self/maps shows.
        name: String,
    },
    /// A shared mapping of a file (hole punch and truncation send no event).
    SharedFile {
        /// The name /proc/self/maps shows.
        name: String,
    },
    /// A private mapping of a file: a truncation by anyone unmaps its pages past the new end,
    /// copied-on-write ones included, and sends no event.
    PrivateFile {
        /// The name /proc/self/maps shows.
        name: String,
    },
    /// The watcher could not register this part.
    Unwatched {
        /// The watcher's reason.
        reason: String,
    },
}

impl std::fmt::Display for BlindReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlindReason::SysvShm { name } => write!(f, "SysV shm attachment {name}"),
            BlindReason::SharedFile { name } => write!(f, "shared file mapping {name}"),
            BlindReason::PrivateFile { name } => write!(f, "private file mapping {name}"),
            BlindReason::Unwatched { reason } => write!(f, "not watched: {reason}"),
        }
    }
}

/// Reads /proc/self/maps and returns the first blind part of `range`, or `None` when the
/// watcher sees all of it; `unwatched` are the parts the watcher reported it skipped.
pub(crate) fn classify(
    range: PageRange,
    unwatched: &[(PageRange, String)],
) -> Result<Option<BlindReason>> {
    let vmas = maps::read_self_maps().map_err(|source| Error::Maps { range, source })?;
    classify_vmas(range, &vmas, unwatched)
}

fn classify_vmas(
    range: PageRange,
    vmas: &[maps::Vma],
    unwatched: &[(PageRange, String)],
) -> Result<Option<BlindReason>> {
    let mut cursor = range.start();
    let mut reason = None;
    for vma in maps::overlapping(vmas, range.start(), range.end()) {
        if vma.start > cursor {
            return Err(hole(range, cursor, vma.start));
        }
        cursor = vma.end;
        if reason.is_none() {
            if vma.is_sysv_shm() {
                reason = Some(BlindReason::SysvShm { name: vma.name });
            } else if vma.is_file() && vma.is_shared() {
                reason = Some(BlindReason::SharedFile { name: vma.name });
            } else if vma.is_file() {
                reason = Some(BlindReason::PrivateFile { name: vma.name });
            }
        }
    }
    if cursor < range.end() {
        return Err(hole(range, cursor, range.end()));
    }
    if reason.is_none() {
        if let Some((_, why)) = unwatched.first() {
            reason = Some(BlindReason::Unwatched {
                reason: why.clone(),
            });
        }
    }
    Ok(reason)
}

fn hole(range: PageRange, start: u64, end: u64) -> Error {
    Error::Unmapped {
        range,
        hole: PageRange::from_bounds(start, end).unwrap_or(range),
    }
}

/// The frame numbers a blind region was registered on, for validation on every hit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FrameSnapshot {
    start: u64,
    pfns: Vec<u64>,
}

impl FrameSnapshot {
    /// Records the frames now backing `range`; `None` if frame numbers are hidden from this
    /// process or a page is not present (a region that cannot be validated is not cached).
    pub(crate) fn take(range: PageRange) -> Option<FrameSnapshot> {
        if !pagemap::pfns_visible() {
            return None;
        }
        let entries = pagemap::entries(range.start(), range.pages() as usize).ok()?;
        let pfns = entries
            .iter()
            .map(|e| e.pfn())
            .collect::<Option<Vec<u64>>>()?;
        Some(FrameSnapshot {
            start: range.start(),
            pfns,
        })
    }

    /// Whether every page still maps the recorded frame.
    pub(crate) fn still_current(&self) -> bool {
        match pagemap::entries(self.start, self.pfns.len()) {
            Ok(now) => now
                .iter()
                .zip(&self.pfns)
                .all(|(e, pfn)| e.pfn() == Some(*pfn)),
            Err(_) => false,
        }
    }
}
