//! Which memory the watcher has registered, known without reading /proc/self/smaps.
//!
//! Memory mapped at a watched address later (`MAP_FIXED`, a fresh `mmap` reusing a freed
//! range) is not registered with the kernel, so a miss must make sure the watcher sees the
//! range before it pins it. Asking the watcher to `watch` every time costs a reading of
//! /proc/self/smaps, which walks the page tables (about a millisecond with 50 MiB resident
//! here): far more than an io_uring registration. The cache therefore remembers the VMAs its
//! `watch` calls registered, and forgets every one an event overlaps (a classic subscriber on
//! the watcher's `Mm` does the forgetting, in the same delivery as the regions' invalidations).
//! A miss whose range is covered by remembered VMAs skips `watch`.
//!
//! Why that is safe: the miss consults the set *after* its region's `read_begin`, which waits
//! until every message read from the userfaultfd has been delivered. A remembered VMA replaced
//! before that point sent an event (it was registered) that has been delivered and made the set
//! forget it; one replaced after it sends an event that the region's own interval receives, so
//! the registration collides or is invalidated. An entry is only added when no event at all
//! was delivered while `watch` ran (an epoch counter), so a VMA replaced between its
//! registration and its addition is never remembered.
//!
//! Caveat: the watcher is shared by the whole process, and `Watcher::unwatch` unregisters
//! memory for every user of it. The cache assumes that nobody unwatches memory it caches (an
//! unwatched VMA sends no event, whether the cache remembers it or not).

use crate::sync::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use mmnotify::{Capabilities, Invalidation, Refused, Subscriber};

use crate::range::PageRange;

#[derive(Debug, Default)]
pub(crate) struct WatchedSet {
    /// start → end of VMAs registered by this cache's `watch` calls.
    vmas: Mutex<BTreeMap<u64, u64>>,
    /// Bumped by every event.
    epoch: AtomicU64,
}

impl WatchedSet {
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether remembered VMAs cover all of `range`.
    pub(crate) fn covers(&self, range: PageRange) -> bool {
        let vmas = self.vmas.lock();
        let mut cursor = range.start();
        // The VMA containing `cursor` starts at or below it.
        while cursor < range.end() {
            match vmas.range(..=cursor).next_back() {
                Some((_, &end)) if end > cursor => cursor = end,
                _ => return false,
            }
        }
        true
    }

    /// Remembers VMAs a `watch` registered, unless an event was delivered since `epoch`.
    pub(crate) fn remember(&self, epoch: u64, watched: impl IntoIterator<Item = (u64, u64)>) {
        let mut vmas = self.vmas.lock();
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        for (start, end) in watched {
            vmas.insert(start, end);
        }
    }

    fn forget(&self, start: u64, end: u64) {
        let mut vmas = self.vmas.lock();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let hit: Vec<u64> = vmas
            .range(..end)
            .filter(|(_, &e)| e > start)
            .map(|(s, _)| *s)
            .collect();
        for s in hit {
            vmas.remove(&s);
        }
    }
}

/// The classic subscriber that makes the set forget.
pub(crate) struct Forget(pub(crate) std::sync::Arc<WatchedSet>);

impl Subscriber for Forget {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start()
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        let r = inv.range();
        self.0.forget(r.start(), r.end());
        Ok(())
    }
}
