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
//! 1. [`Prober::probe`], in the reader right after `read(2)` returned the message (the
//!    madvising thread was only just woken by that read): one page of the range that is
//!    present, with its frame where visible. If none is, the reader notes the first page as
//!    *unprobed* and goes on: making it present (a read populate, which changes no contents,
//!    so that the zap has something to clear) can do I/O on file or shmem memory, and the
//!    reader never waits (U2). The dispatcher does it, [`complete_probe`], first thing when it
//!    takes the message, before the invalidation starts. If the zap was already over by then,
//!    the populated page stays, the wait below runs to its bound and is counted unconfirmed:
//!    slower, never less safe.
//! 2. [`wait_for_zap`], in the dispatcher with the invalidation started: poll
//!    `/proc/self/pagemap` until that page is gone or backed by another frame: the madvising
//!    thread then holds `mmap_lock` for reading (or has finished), because it clears pages only
//!    under it.
//!    (Since Linux 6.16 madvise DONTNEED/FREE may run under a per-VMA read lock instead, which
//!    a write-lock of `mmap_lock` would not wait for; but it falls back to `mmap_lock` for a
//!    VMA that is `userfaultfd_armed()`, which every watched VMA is.)
//! 3. [`Scratch::mmap_lock_fence`]: take `mmap_lock` for writing (`mprotect` of a private page,
//!    which changes nothing and sends no event): it waits until that thread released the lock,
//!    i.e. until its zap is complete.
//!
//! Step 2 is bounded by `WatcherOptions::remove_settle` (10 ms by default): MADV_FREE never
//! clears its pages (they stay mapped until reclaim, and nothing can go stale before that), so
//! each MADV_FREE of present pages holds the dispatcher that long; and a madvising thread that
//! is not scheduled for that long after being woken leaves a residual window, which
//! docs/SEMANTICS.md U4 states. The first 100 µs are spent yielding, the rest in 20 µs sleeps,
//! so that a madvising thread that shares the dispatcher's CPU gets it.

use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys;

/// The default of `WatcherOptions::remove_settle`.
pub(crate) const DEFAULT_SETTLE: Duration = Duration::from_millis(10);
/// How long the wait spins (yielding) before it sleeps between looks.
const SPIN: Duration = Duration::from_micros(100);
/// The sleep between looks after that.
const NAP: Duration = Duration::from_micros(20);
/// The most pages of a REMOVE range the reader looks at for a present one.
const PROBE_PAGES: usize = 512;
const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

/// One page of a REMOVE range that was present when the reader read the message, and its
/// frame (0 when hidden from this process). Once it is seen gone or re-backed, the madvising
/// thread is inside its zap (it clears pages only under `mmap_lock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ZapProbe {
    page: u64,
    pfn: u64,
    /// `false`: no page of the range was present when the reader looked; the dispatcher
    /// populates `page` ([`complete_probe`]) before waiting on it.
    present: bool,
}

/// The reader's tool for taking a [`ZapProbe`] right after `read(2)` returned a REMOVE, before
/// the madvising thread (only just woken by that read) can have reached its zap in most cases.
/// Allocation-free after creation: the reader must not allocate (EVENT_FORK).
pub(crate) struct Prober {
    pagemap: Option<std::fs::File>,
    buf: Box<[u8; PROBE_PAGES * 8]>,
}

impl Prober {
    /// Opens `/proc/self/pagemap` (or gives up probing if it cannot).
    pub(crate) fn new() -> Prober {
        Prober {
            pagemap: std::fs::File::open("/proc/self/pagemap").ok(),
            buf: Box::new([0u8; PROBE_PAGES * 8]),
        }
    }

    fn first_present(&mut self, start: u64, pages: usize) -> Option<ZapProbe> {
        use std::os::unix::fs::FileExt;
        let ps = sys::page_size();
        let f = self.pagemap.as_ref()?;
        let bytes = &mut self.buf[..pages * 8];
        f.read_exact_at(bytes, start / ps * 8).ok()?;
        bytes.chunks_exact(8).enumerate().find_map(|(i, c)| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            let e = u64::from_ne_bytes(w);
            (e & PRESENT != 0).then_some(ZapProbe {
                page: start + i as u64 * ps,
                pfn: e & PFN_MASK,
                present: true,
            })
        })
    }

    /// A present page of `[start, end)`; if none is, the first page, unprobed (the dispatcher
    /// makes it present: [`complete_probe`]). Reads `/proc/self/pagemap` only, which never
    /// blocks on I/O; the reader must not populate (file or shmem memory may need I/O).
    pub(crate) fn probe(&mut self, start: u64, end: u64) -> Option<ZapProbe> {
        let ps = sys::page_size();
        let pages = (end.saturating_sub(start) / ps).min(PROBE_PAGES as u64) as usize;
        if pages == 0 {
            return None;
        }
        // Without pagemap there is nothing to probe with.
        self.pagemap.as_ref()?;
        Some(self.first_present(start, pages).unwrap_or(ZapProbe {
            page: start,
            pfn: 0,
            present: false,
        }))
    }
}

/// On the dispatcher, before a REMOVE's invalidation starts: an unprobed page is made present
/// without changing its contents (a read populate maps the zero page or the file's page; it may
/// do I/O, which the dispatcher may wait for), so that the zap has something to clear. `None`
/// if it cannot be made present (a hole, a guard page, a mapping without read access).
pub(crate) fn complete_probe(probe: Option<ZapProbe>) -> Option<ZapProbe> {
    let probe = probe?;
    if probe.present {
        return Some(probe);
    }
    const MADV_POPULATE_READ: i32 = 22;
    // SAFETY: populating for reading changes no contents; on a hole it fails harmlessly.
    unsafe {
        libc::madvise(
            probe.page as *mut libc::c_void,
            sys::page_size() as usize,
            MADV_POPULATE_READ,
        )
    };
    let e = crate::pagemap::entry(probe.page).ok()?;
    e.present().then(|| ZapProbe {
        page: probe.page,
        pfn: e.pfn().unwrap_or(0),
        present: true,
    })
}

/// Waits (at most `bound`) until the probed page is gone or backed by another frame; returns
/// whether it was seen. MADV_FREE leaves pages mapped, so it runs to the bound; nothing can
/// go stale there until reclaim (a blind spot of its own).
pub(crate) fn wait_for_zap(probe: Option<ZapProbe>, bound: Duration) -> bool {
    let Some(probe) = probe.filter(|p| p.present) else {
        return false;
    };
    let begun = Instant::now();
    // `bound` was validated (at most MAX_REMOVE_SETTLE); checked anyway, never a panic.
    let deadline = begun
        .checked_add(bound.min(crate::watcher::MAX_REMOVE_SETTLE))
        .unwrap_or(begun);
    loop {
        match crate::pagemap::entry(probe.page) {
            Ok(e) => {
                let gone = !e.present();
                let rebacked = probe.pfn != 0 && e.pfn().is_some_and(|p| p != probe.pfn);
                if gone || rebacked {
                    return true;
                }
            }
            Err(_) => return false,
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        if now - begun < SPIN {
            thread::yield_now();
        } else {
            thread::sleep(NAP);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unbounded_settle_is_clamped_not_a_panic() {
        // Page 1 is never mapped: the probe is gone at the first look, after the deadline was
        // computed from `Duration::MAX`.
        let probe = ZapProbe {
            page: sys::page_size(),
            pfn: 0,
            present: true,
        };
        assert!(wait_for_zap(Some(probe), Duration::MAX));
    }

    /// A fresh private anonymous mapping of one page, never touched.
    fn untouched_page() -> u64 {
        // SAFETY: a fresh mapping at an address of the kernel's choosing.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                sys::page_size() as usize,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .unwrap();
        p as u64
    }

    #[test]
    fn the_reader_never_populates_and_the_dispatcher_does() {
        let page = untouched_page();
        let mut prober = Prober::new();
        let probe = prober.probe(page, page + sys::page_size()).unwrap();
        assert!(!probe.present);
        // The reader's probe left the page as it was (a populate could block on I/O).
        assert!(!crate::pagemap::entry(page).unwrap().present());
        let done = complete_probe(Some(probe)).expect("a mapped page can be populated");
        assert!(done.present && done.page == page);
        assert!(crate::pagemap::entry(page).unwrap().present());
        // SAFETY: the test's own page.
        unsafe { libc::munmap(page as *mut libc::c_void, sys::page_size() as usize) };
    }
}
