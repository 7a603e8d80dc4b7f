//! Where invalidations come from: the process's userfaultfd watcher, or any engine `Mm`.
//!
//! Each cached region holds one interval subscription on the source's `Mm`, over exactly its
//! range. The source gives the region three things:
//!
//! * `prepare` before a registration: with the watcher, `watch` the range (memory mapped
//!   later at a watched address, e.g. by `MAP_FIXED`, is *not* registered with the kernel, so
//!   every miss watches again) and learn which parts it cannot see; with a plain `Mm`, nothing
//!   (the caller's own cooperative calls are the events);
//! * the collision-retry pair around the registration (`read_begin`, then `read_retry` under
//!   the cache's index lock), which for the watcher also covers the gap between the kernel's
//!   *read* of an unmap message and its *delivery* to the engine;
//! * a lock-free `check_retry` against the sequence the region was created with: `false`
//!   proves that no invalidation of the region was delivered and nothing read from the
//!   userfaultfd is still undelivered, which is what makes a hit after a returned `munmap`
//!   impossible without taking a lock on the hit path. When it says `true` because a delivery
//!   is merely in flight, `settle` waits for it and the region's own invalid bit decides.

use std::sync::Arc;

use mmnotify::{IntervalHandle, IntervalSubscriber, Mm, ReadSeq};
use mmnotify_uffd::{WatchSeq, WatchedInterval, Watcher};

use crate::error::{Error, Result};
use crate::range::PageRange;

/// The event source of a cache.
#[derive(Clone, Debug)]
pub enum EventSource {
    /// The process's userfaultfd watcher (the default): the kernel's own unmap, remove and
    /// remap events, plus the watcher's cooperative wrappers.
    Watcher(Watcher),
    /// Any engine address space: the simulator's, or one a user drives with its own
    /// cooperative calls. No real memory is examined.
    Mm(Mm),
}

impl EventSource {
    /// The process's watcher (created on first use).
    ///
    /// # Errors
    ///
    /// The watcher's creation errors (no userfaultfd, not permitted, kernel too old, forked).
    pub fn watcher() -> Result<EventSource> {
        Ok(EventSource::Watcher(Watcher::get()?))
    }

    /// The engine `Mm` invalidations are delivered on.
    pub fn mm(&self) -> &Mm {
        match self {
            EventSource::Watcher(w) => w.mm(),
            EventSource::Mm(mm) => mm,
        }
    }

    /// Whether the source observes this process's real memory (then registration classifies
    /// the memory from /proc/self/maps).
    pub fn is_real_memory(&self) -> bool {
        matches!(self, EventSource::Watcher(_))
    }

    /// Makes the watcher watch `range` before it is registered; returns the parts it cannot
    /// see, and the VMAs it registered (whole, possibly larger than the range).
    pub(crate) fn watch(&self, range: PageRange) -> Result<Watched> {
        let EventSource::Watcher(w) = self else {
            return Ok(Watched::default());
        };
        let skipped = |list: &[mmnotify_uffd::Skipped]| -> Vec<(PageRange, String)> {
            list.iter()
                .filter_map(|s| {
                    PageRange::from_bounds(s.start, s.end).map(|r| (r, s.reason.to_string()))
                })
                .collect()
        };
        match w.watch(range.start(), range.len()) {
            Ok(report) => Ok(Watched {
                unwatched: skipped(&report.skipped),
                vmas: report.watched.iter().map(|v| (v.start, v.end)).collect(),
            }),
            Err(mmnotify_uffd::Error::Unmapped { .. }) => {
                Err(Error::Unmapped { range, hole: range })
            }
            // Mapped but nothing watchable (vdso-like, another uffd owns it): blind.
            Err(mmnotify_uffd::Error::NothingWatchable { skipped: s, .. }) => Ok(Watched {
                unwatched: skipped(&s),
                vmas: Vec::new(),
            }),
            Err(mmnotify_uffd::Error::AlreadyOwned { .. }) => Ok(Watched {
                unwatched: vec![(range, "another userfaultfd owns it".to_string())],
                vmas: Vec::new(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn subscribe(
        &self,
        range: PageRange,
        subscriber: Arc<dyn IntervalSubscriber>,
    ) -> Result<SourceInterval> {
        Ok(match self {
            EventSource::Watcher(w) => {
                SourceInterval::Watched(w.insert_interval(range.engine(), subscriber)?, w.clone())
            }
            EventSource::Mm(mm) => {
                SourceInterval::Plain(mm.insert_interval(range.engine(), subscriber)?, mm.clone())
            }
        })
    }
}

/// What `watch` reported.
#[derive(Debug, Default)]
pub(crate) struct Watched {
    /// Parts the watcher cannot see, with its reason.
    pub(crate) unwatched: Vec<(PageRange, String)>,
    /// Whole VMAs registered (now or before).
    pub(crate) vmas: Vec<(u64, u64)>,
}

/// A region's interval subscription.
#[derive(Debug)]
pub(crate) enum SourceInterval {
    Watched(WatchedInterval, Watcher),
    Plain(IntervalHandle, Mm),
}

/// A sequence snapshot of either kind.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SourceSeq {
    Watched(WatchSeq),
    Plain(ReadSeq),
}

impl SourceInterval {
    pub(crate) fn read_begin(&self) -> Result<SourceSeq> {
        Ok(match self {
            SourceInterval::Watched(i, _) => SourceSeq::Watched(i.read_begin()?),
            SourceInterval::Plain(h, _) => SourceSeq::Plain(h.read_begin()?),
        })
    }

    /// Under the index lock (which the invalidation callback takes around `set_seq`).
    pub(crate) fn read_retry(&self, seq: SourceSeq) -> bool {
        match (self, seq) {
            (SourceInterval::Watched(i, _), SourceSeq::Watched(s)) => i.read_retry(s),
            (SourceInterval::Plain(h, _), SourceSeq::Plain(s)) => h.read_retry(s),
            // INVARIANT: a sequence is only checked against the interval that produced it;
            // a mismatch would be a bug, and the safe answer is "collided".
            _ => true,
        }
    }

    /// Lock-free: `false` proves no delivered invalidation since `seq` and nothing read from
    /// the userfaultfd still undelivered; `true` may be a delivery in flight.
    #[inline]
    pub(crate) fn check_retry(&self, seq: &SourceSeq) -> bool {
        match (self, seq) {
            (SourceInterval::Watched(i, _), SourceSeq::Watched(s)) => i.check_retry(*s),
            (SourceInterval::Plain(h, _), SourceSeq::Plain(s)) => h.check_retry(*s),
            _ => true,
        }
    }

    /// Waits until everything read from the userfaultfd so far has been delivered and no
    /// invalidation of this interval is open; afterwards the region's invalid bit is exact
    /// for every call that has returned.
    pub(crate) fn settle(&self) -> Result<()> {
        self.read_begin().map(|_| ())
    }

    /// Removes the subscription without waiting (allowed anywhere, callbacks included).
    pub(crate) fn remove_deferred(&self) {
        let _ = match self {
            SourceInterval::Watched(i, w) => w.mm().remove_interval_deferred(i.engine()),
            SourceInterval::Plain(h, mm) => mm.remove_interval_deferred(h),
        };
    }

    /// Removes the subscription and waits until none of its callbacks runs. Where waiting
    /// would deadlock (called from an invalidation callback or while holding a guard of the
    /// `Mm`: the engine refuses with `WouldDeadlock`), removes it at the end of the current
    /// epoch instead, without waiting; returns whether it waited.
    pub(crate) fn remove_and_wait(&self) -> bool {
        let waited = match self {
            SourceInterval::Watched(i, w) => w.mm().remove_interval(i.engine()),
            SourceInterval::Plain(h, mm) => mm.remove_interval(h),
        };
        match waited {
            Ok(()) => true,
            Err(mmnotify::Error::IntervalNotInserted { .. }) => true,
            Err(_) => {
                self.remove_deferred();
                false
            }
        }
    }
}
