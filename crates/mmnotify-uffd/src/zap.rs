//! REMOVE is sent before the zap: how the dispatcher waits for it (U4 in docs/SEMANTICS.md).
//!
//! For UNMAP and REMAP the kernel has changed the mapping before it queues the message. For
//! REMOVE (madvise DONTNEED/FREE/REMOVE) it queues the message first, waits until the watcher
//! has *read* it, then re-takes `mmap_lock` for reading and zaps the range. An invalidation that
//! ended as soon as the message was delivered would let a fill that starts afterwards fault in
//! a page the zap is about to remove, and commit it.
//!
//! So the dispatcher keeps a REMOVE's invalidation open (callbacks done, end not yet sent, so
//! overlapping `read_begin`s wait) until the zap is over:
//!
//! 1. [`ZapWatch::snapshot`]: which pages of the range were present when the message was taken
//!    (with their frames where visible). If none was, the first page is made present by a read
//!    populate, which changes no contents, so that the zap has something to clear.
//! 2. [`ZapWatch::wait_for_zap`]: poll `/proc/self/pagemap` until every such page is gone or
//!    backed by another frame: the madvising thread then holds `mmap_lock` for reading (or has
//!    finished), because it clears pages only under it.
//! 3. [`Scratch::mmap_lock_fence`]: take `mmap_lock` for writing (`mprotect` of a private page,
//!    which changes nothing and sends no event): it waits until that thread released the lock,
//!    i.e. until its zap is complete.
//!
//! Step 2 is bounded by [`ZAP_WAIT`]: MADV_FREE never clears its pages (they stay mapped until
//! reclaim, and nothing can go stale before that), and a madvising thread that is not scheduled
//! for that long leaves a residual window, which docs/SEMANTICS.md U4 states.

use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys;

/// How long the dispatcher waits to see a REMOVE's zap begin (U4).
pub(crate) const ZAP_WAIT: Duration = Duration::from_millis(2);
/// The most pages of a REMOVE range it watches for the zap.
const ZAP_PAGES: u64 = 512;

/// What a REMOVE range looked like when its message was taken from the queue: which pages were
/// present (and their frames, where visible). The zap that follows a REMOVE runs in the
/// madvising thread after it re-takes `mmap_lock` for reading; once a page that was present is
/// seen gone (or backed by another frame), that thread holds the lock or has finished, and a
/// write-lock fence then waits for the zap to complete.
pub(crate) struct ZapWatch {
    start: u64,
    present: Vec<(usize, Option<u64>)>,
}

impl ZapWatch {
    pub(crate) fn snapshot(start: u64, end: u64) -> ZapWatch {
        let ps = sys::page_size();
        let pages = (end.saturating_sub(start) / ps).min(ZAP_PAGES) as usize;
        let read = |pages| {
            crate::pagemap::entries(start, pages)
                .map(|es| {
                    es.iter()
                        .enumerate()
                        .filter(|(_, e)| e.present())
                        .map(|(i, e)| (i, e.pfn()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        let present = read(pages);
        if !present.is_empty() || pages == 0 {
            return ZapWatch { start, present };
        }
        // Nothing present: nothing would show the zap. Make the first page present without
        // changing its contents (a read fault maps the zero page or the file's page); the zap
        // clears it first, and the fence waits for the rest.
        const MADV_POPULATE_READ: i32 = 22;
        // SAFETY: populating for reading changes no contents; on a hole it fails harmlessly.
        unsafe { libc::madvise(start as *mut libc::c_void, ps as usize, MADV_POPULATE_READ) };
        ZapWatch {
            start,
            present: read(1),
        }
    }

    /// Waits (at most [`ZAP_WAIT`]) until every page that was present is gone or re-backed.
    /// Returns whether the zap was seen. MADV_FREE leaves pages mapped, so it runs to the
    /// bound; nothing can go stale there until reclaim (a blind spot of its own).
    pub(crate) fn wait_for_zap(&self) -> bool {
        let Some(&(last, _)) = self.present.last() else {
            return false;
        };
        let deadline = Instant::now() + ZAP_WAIT;
        loop {
            if let Ok(now) = crate::pagemap::entries(self.start, last + 1) {
                let zapped = self.present.iter().all(|&(i, pfn)| {
                    let e = now[i];
                    !e.present() || (pfn.is_some() && e.pfn() != pfn)
                });
                if zapped {
                    return true;
                }
            } else {
                return false;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::yield_now();
        }
    }
}

/// A private anonymous page owned by the watcher, unmapped on drop.
pub(crate) struct Scratch(usize);

impl Scratch {
    pub(crate) fn new() -> Result<Scratch> {
        // SAFETY: a fresh private anonymous page at an address of the kernel's choosing.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                sys::page_size() as usize,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .map_err(|e| Error::syscall("mmap", e))?;
        Ok(Scratch(p as usize))
    }

    /// Waits until every thread that holds this process's `mmap_lock` for reading has released
    /// it, by taking it for writing: `mprotect` of a private scratch page (which changes
    /// nothing and sends no event) takes the write lock first.
    pub(crate) fn mmap_lock_fence(&self) {
        // SAFETY: the scratch page is ours, mapped read-write until this value drops;
        // re-applying the same protection changes nothing.
        unsafe {
            libc::mprotect(
                self.0 as *mut libc::c_void,
                sys::page_size() as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `Scratch::new` and nothing else refers to it.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, sys::page_size() as usize) };
    }
}
