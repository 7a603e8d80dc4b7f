//! A cached region: one registration, one interval subscription, one state word.
//!
//! The state word packs the holders' reference count (low 32 bits) with an `INVALID` bit.
//! Every decision about *who deregisters* is a single atomic transition of that word, so it is
//! made exactly once:
//!
//! ```text
//!   transition                              by            then the owner of the teardown is
//!   ----------------------------------------------------------------------------------------
//!   refs r → r+1 if !INVALID (CAS)          a hit         -
//!   refs 1 → 0, INVALID already set         the last put  that put (a deferred deregistration)
//!   set INVALID, refs were 0                invalidation  the invalidation (queued for flush)
//!   set INVALID, refs were > 0              invalidation  the last put
//!   0 → INVALID (CAS)                       eviction      the evictor
//!   set INVALID (merge retire, drop)        the cache     as for an invalidation
//! ```
//!
//! Every transition that sets `INVALID` on a *linked* region happens under the index's write
//! lock together with the unlink, so a linked region is never invalid, and a hit that found it
//! under the read lock and then won the CAS holds a region whose teardown is now the business
//! of its last put.
//!
//! The interval callback ([`RegionWatch`]) is the invalidation path. It runs on the watcher's
//! dispatcher thread (or on the thread of a cooperative call), takes only the index's write
//! lock and the small lock of the holders' callbacks, and never calls the registrar: it queues
//! an unused region for deregistration by the next cache call instead. That is what lets a
//! registrar free memory in `deregister` (an unmap, an event, this callback) without deadlock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{OnceLock, Weak};

use crate::sync::Mutex;

use mmnotify::{IntervalCtx, IntervalSubscriber, Invalidate, Invalidation};

use crate::blind::FrameSnapshot;
use crate::cache::Shared;
use crate::range::{Access, PageRange};
use crate::registrar::Registrar;
use crate::source::{SourceInterval, SourceSeq};

pub(crate) const INVALID: u64 = 1 << 63;
pub(crate) const REFS: u64 = (1 << 32) - 1;

/// A holder's invalidation callback.
pub(crate) type OnInvalidate = Box<dyn FnOnce(PageRange) + Send + 'static>;

/// Aligned to two cache lines, so that the reference count and state words a hit writes
/// never share a line with another region's (threads hitting different regions must not
/// contend).
#[repr(align(128))]
pub(crate) struct Region<H> {
    pub(crate) id: u64,
    pub(crate) range: PageRange,
    pub(crate) access: Access,
    pub(crate) handle: H,
    pub(crate) state: AtomicU64,
    /// The cache's clock at the last put (LRU order among unused regions).
    pub(crate) last_used: AtomicU64,
    /// In the index; changed only under the index's write lock.
    pub(crate) linked: AtomicBool,
    pub(crate) interval: SourceInterval,
    /// The sequence of the `read_begin` whose `read_retry` admitted the region.
    pub(crate) created: SourceSeq,
    /// The memory changed (an invalidation reached the region): what holders are told. A
    /// region retired by the cache itself (merged away) is INVALID but not changed.
    pub(crate) changed: AtomicBool,
    /// For blind memory validated on every hit.
    pub(crate) frames: Option<FrameSnapshot>,
    pub(crate) on_invalidate: Mutex<Vec<OnInvalidate>>,
}

impl<H> std::fmt::Debug for Region<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.load(Ordering::Relaxed);
        f.debug_struct("Region")
            .field("id", &self.id)
            .field("range", &self.range)
            .field("access", &self.access)
            .field("refs", &(s & REFS))
            .field("invalid", &(s & INVALID != 0))
            .finish_non_exhaustive()
    }
}

impl<H> Region<H> {
    /// Whether an invalidation reached the region (its memory changed).
    pub(crate) fn memory_changed(&self) -> bool {
        self.changed.load(Ordering::SeqCst)
    }

    pub(crate) fn is_invalid(&self) -> bool {
        self.state.load(Ordering::Acquire) & INVALID != 0
    }

    /// Takes a holder's reference unless the region is invalid.
    #[inline]
    pub(crate) fn try_acquire(&self) -> bool {
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & INVALID != 0 || s & REFS == REFS {
                return false;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }

    /// Sets `INVALID`; returns the previous word.
    pub(crate) fn mark_invalid(&self) -> u64 {
        self.state.fetch_or(INVALID, Ordering::AcqRel)
    }

    /// Runs (outside every cache lock) the callbacks holders registered.
    pub(crate) fn run_callbacks(&self, callbacks: Vec<OnInvalidate>) {
        for cb in callbacks {
            let range = self.range;
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || cb(range)));
        }
    }

    pub(crate) fn take_callbacks(&self) -> Vec<OnInvalidate> {
        std::mem::take(&mut *self.on_invalidate.lock())
    }
}

/// The interval subscriber of one region: the invalidation path.
pub(crate) struct RegionWatch<R: Registrar> {
    /// Set once the region exists; an invalidation before that only bumps the sequence,
    /// which the registering thread's `read_retry` then reports.
    pub(crate) region: OnceLock<Weak<Region<R::Handle>>>,
    pub(crate) cache: Weak<Shared<R>>,
}

impl<R: Registrar> IntervalSubscriber for RegionWatch<R> {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _inv: &Invalidation) -> Invalidate {
        let region = self.region.get().and_then(Weak::upgrade);
        match self.cache.upgrade() {
            Some(cache) => {
                let callbacks = cache.invalidated(ctx, region.as_ref());
                if let (Some(region), Some(callbacks)) = (region, callbacks) {
                    region.run_callbacks(callbacks);
                }
            }
            None => ctx.set_seq(),
        }
        // Once the region exists and is invalid, no later event can matter. Before it exists
        // (a late event for memory unmapped before this registration began, say) the interval
        // must stay: the registering thread's read_begin/read_retry still need it.
        if self.region.get().is_some() {
            ctx.remove_deferred();
        }
        Invalidate::Done
    }
}
