//! The region guard: a holder's reference to a registration; dropping it is the put.
//!
//! While a guard lives, its registration stays registered, even if the memory is unmapped
//! meanwhile: the device may still be using it (an I/O in flight), so the cache only marks the
//! region invalid, never hands it out again, and deregisters it at the last put. A holder can
//! ask [`RegionGuard::is_invalidated`] before starting more I/O, or be told through
//! [`RegionGuard::on_invalidate`].

use std::sync::Arc;

use crate::blind::BlindReason;
use crate::cache::Cache;
use crate::range::{Access, PageRange};
use crate::region::{OnInvalidate, Region};
use crate::registrar::Registrar;

enum Held<H> {
    Cached(Arc<Region<H>>),
    /// Blind memory registered for this use only.
    Uncached {
        range: PageRange,
        access: Access,
        handle: H,
        reason: BlindReason,
    },
}

/// A registration handed out by [`Cache::get`]; dropping it is the put.
#[must_use = "dropping the guard at once puts the region back: keep it while the device uses the memory"]
pub struct RegionGuard<'c, R: Registrar> {
    cache: &'c Cache<R>,
    held: Held<R::Handle>,
}

impl<R: Registrar> std::fmt::Debug for RegionGuard<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionGuard")
            .field("range", &self.range())
            .field("access", &self.access())
            .field("cached", &self.is_cached())
            .field("invalidated", &self.is_invalidated())
            .finish_non_exhaustive()
    }
}

impl<'c, R: Registrar> RegionGuard<'c, R> {
    pub(crate) fn cached(cache: &'c Cache<R>, region: Arc<Region<R::Handle>>) -> Self {
        RegionGuard {
            cache,
            held: Held::Cached(region),
        }
    }

    pub(crate) fn uncached(
        cache: &'c Cache<R>,
        range: PageRange,
        access: Access,
        handle: R::Handle,
        reason: BlindReason,
    ) -> Self {
        RegionGuard {
            cache,
            held: Held::Uncached {
                range,
                access,
                handle,
                reason,
            },
        }
    }

    /// The registration.
    pub fn handle(&self) -> &R::Handle {
        match &self.held {
            Held::Cached(r) => &r.handle,
            Held::Uncached { handle, .. } => handle,
        }
    }

    /// The page-aligned range the registration covers (it contains the range asked for, and
    /// more when regions were merged).
    pub fn range(&self) -> PageRange {
        match &self.held {
            Held::Cached(r) => r.range,
            Held::Uncached { range, .. } => *range,
        }
    }

    /// The access the registration allows (at least what was asked for).
    pub fn access(&self) -> Access {
        match &self.held {
            Held::Cached(r) => r.access,
            Held::Uncached { access, .. } => *access,
        }
    }

    /// Whether the registration is cached (false for blind memory registered for one use).
    pub fn is_cached(&self) -> bool {
        matches!(self.held, Held::Cached(_))
    }

    /// Why the memory was registered for one use only, if it was.
    pub fn blind_reason(&self) -> Option<&BlindReason> {
        match &self.held {
            Held::Cached(_) => None,
            Held::Uncached { reason, .. } => Some(reason),
        }
    }

    /// Whether the memory behind the registration changed since it was registered (an
    /// unmap, a madvise, a remap...): the registration then refers to pages no longer mapped
    /// at its address; it stays registered until this guard (and any other holder) is dropped.
    /// (A region the cache merged into a larger one is not handed out again either, but its
    /// memory did not change: false.) Always false for an uncached registration, which
    /// nothing watches.
    pub fn is_invalidated(&self) -> bool {
        match &self.held {
            Held::Cached(r) => r.memory_changed(),
            Held::Uncached { .. } => false,
        }
    }

    /// Calls `f` with the region's range when the region is invalidated (at once if it is
    /// already). It runs in the invalidation's context (the watcher's dispatcher thread, or the
    /// thread of a cooperative call): it must not block on I/O or wait for the cache. Never
    /// called for an uncached registration.
    pub fn on_invalidate(&self, f: impl FnOnce(PageRange) + Send + 'static) {
        let Held::Cached(region) = &self.held else {
            return;
        };
        let now: Option<OnInvalidate> = {
            let mut list = region.on_invalidate.lock();
            if region.memory_changed() {
                Some(Box::new(f))
            } else {
                list.push(Box::new(f));
                None
            }
        };
        if let Some(cb) = now {
            region.run_callbacks(vec![cb]);
        }
    }
}

impl<R: Registrar> Drop for RegionGuard<'_, R> {
    fn drop(&mut self) {
        match &self.held {
            Held::Cached(region) => self.cache.shared().put(region),
            Held::Uncached { range, handle, .. } => {
                self.cache.shared().put_uncached(handle, *range)
            }
        }
    }
}
