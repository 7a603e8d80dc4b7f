//! The page-frame registrar: records what each page maps, as ground truth.
//!
//! A real registration pins pages: from then on the device reads and writes *those* physical
//! pages, whatever the process maps at the address later. This registrar does the observable
//! half of that: it faults the pages in as a pin would (`MADV_POPULATE_WRITE` on writable
//! memory, which also breaks copy-on-write sharing like a pin for write; `MADV_POPULATE_READ`
//! on read-only memory), then records, page by page, the frame each maps: the page frame
//! number from /proc/self/pagemap where this process may see it (`CAP_SYS_ADMIN`), else a
//! fingerprint of the page's contents. [`FrameRecord::is_current`] compares the record with
//! what the address maps now: a cache hit whose record is not current is a stale hit.
//!
//! Fingerprints only identify pages whose contents are unique and unchanged since
//! registration; tests that rely on them stamp every page they map and do not write to it.
//!
//! It also keeps the books a leak check needs: registrations live now, and deregistrations of
//! handles that were not live (a double deregistration would be a cache bug).

use crate::sync::Mutex;
use std::collections::HashMap;
use std::io;

use mmnotify_uffd::maps;
use mmnotify_uffd::pagemap::{self, Frame};

use crate::error::RegistrarError;
use crate::range::{Access, PageRange};
use crate::registrar::Registrar;

const MADV_POPULATE_READ: i32 = 22;
const MADV_POPULATE_WRITE: i32 = 23;

/// Why the page-frame registrar refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Part of the range is not mapped.
    #[error("nothing is mapped at {hole} (asked to register {range})")]
    Unmapped {
        /// The range asked for.
        range: PageRange,
        /// The hole.
        hole: PageRange,
    },
    /// The memory does not allow the access asked for.
    #[error("{range} is mapped {perms}, which does not allow {access} access")]
    AccessRefused {
        /// The range asked for.
        range: PageRange,
        /// The access asked for.
        access: Access,
        /// The permissions /proc/self/maps shows for the offending mapping.
        perms: String,
    },
    /// Faulting the pages in, or reading their frames, failed.
    #[error("could not fault in or read the frames of {range}: {source}")]
    Io {
        /// The range asked for.
        range: PageRange,
        /// The I/O error.
        source: io::Error,
    },
}

/// What one registration recorded.
#[derive(Debug, Clone)]
pub struct FrameRecord {
    id: u64,
    range: PageRange,
    access: Access,
    frames: Vec<Frame>,
}

impl FrameRecord {
    /// The registration's number (unique per registrar).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The range registered.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// The access registered.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The frame of each page at registration.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// The addresses of the pages that now map another frame than the one recorded.
    ///
    /// # Errors
    ///
    /// Reading /proc/self/pagemap or /proc/self/mem failed.
    pub fn stale_pages(&self) -> io::Result<Vec<u64>> {
        let ps = crate::range::page_size();
        let mut stale = Vec::new();
        for (i, recorded) in self.frames.iter().enumerate() {
            let addr = self.range.start() + i as u64 * ps;
            if pagemap::frame(addr)? != *recorded {
                stale.push(addr);
            }
        }
        Ok(stale)
    }

    /// Whether every page still maps the frame recorded at registration.
    ///
    /// # Errors
    ///
    /// As [`stale_pages`](Self::stale_pages).
    pub fn is_current(&self) -> io::Result<bool> {
        Ok(self.stale_pages()?.is_empty())
    }
}

#[derive(Debug, Default)]
struct Books {
    next: u64,
    live: HashMap<u64, PageRange>,
    registered: u64,
    deregistered: u64,
    unknown_deregistrations: u64,
}

/// The registrar's books (for leak checks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FrameBooks {
    /// Successful registrations.
    pub registered: u64,
    /// Deregistrations of live registrations.
    pub deregistered: u64,
    /// Registrations live now.
    pub live: usize,
    /// Deregistrations of handles that were not live (double deregistrations).
    pub unknown_deregistrations: u64,
}

/// A registrar that records page frames (see the module documentation).
#[derive(Debug, Default)]
pub struct FrameRegistrar {
    books: Mutex<Books>,
}

impl FrameRegistrar {
    /// A registrar with empty books.
    pub fn new() -> FrameRegistrar {
        FrameRegistrar::default()
    }

    /// The books.
    pub fn books(&self) -> FrameBooks {
        let b = self.books.lock();
        FrameBooks {
            registered: b.registered,
            deregistered: b.deregistered,
            live: b.live.len(),
            unknown_deregistrations: b.unknown_deregistrations,
        }
    }

    fn check_mapping(range: PageRange, access: Access) -> Result<bool, FrameError> {
        let vmas = maps::read_self_maps().map_err(|source| FrameError::Io { range, source })?;
        let mut cursor = range.start();
        let mut all_writable = true;
        for v in maps::overlapping(&vmas, range.start(), range.end()) {
            if v.start > cursor {
                return Err(FrameError::Unmapped {
                    range,
                    hole: PageRange::from_bounds(cursor, v.start).unwrap_or(range),
                });
            }
            cursor = v.end;
            let readable = v.perms[0] == b'r';
            let writable = v.is_writable();
            if (access.read() && !readable) || (access.write() && !writable) {
                return Err(FrameError::AccessRefused {
                    range,
                    access,
                    perms: String::from_utf8_lossy(&v.perms).into_owned(),
                });
            }
            all_writable &= writable;
        }
        if cursor < range.end() {
            return Err(FrameError::Unmapped {
                range,
                hole: PageRange::from_bounds(cursor, range.end()).unwrap_or(range),
            });
        }
        Ok(all_writable)
    }
}

impl Registrar for FrameRegistrar {
    type Handle = FrameRecord;

    fn register(&self, range: PageRange, access: Access) -> Result<FrameRecord, RegistrarError> {
        let writable = Self::check_mapping(range, access)?;
        let advice = if writable {
            MADV_POPULATE_WRITE
        } else {
            MADV_POPULATE_READ
        };
        // SAFETY: populating changes no contents and no mapping; on a range that was unmapped
        // meanwhile it fails with an error (no signal).
        let r = unsafe {
            libc::madvise(
                range.start() as *mut libc::c_void,
                range.len() as usize,
                advice,
            )
        };
        if r != 0 {
            return Err(Box::new(FrameError::Io {
                range,
                source: io::Error::last_os_error(),
            }));
        }
        let ps = crate::range::page_size();
        let frames = (0..range.pages())
            .map(|i| pagemap::frame(range.start() + i * ps))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| FrameError::Io { range, source })?;
        let mut b = self.books.lock();
        b.next += 1;
        let id = b.next;
        b.live.insert(id, range);
        b.registered += 1;
        Ok(FrameRecord {
            id,
            range,
            access,
            frames,
        })
    }

    fn deregister(&self, handle: &FrameRecord) {
        let mut b = self.books.lock();
        if b.live.remove(&handle.id).is_some() {
            b.deregistered += 1;
        } else {
            b.unknown_deregistrations += 1;
        }
    }
}
