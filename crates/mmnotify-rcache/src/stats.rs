//! The cache's counters.
//!
//! Hits happen on many threads at once; one shared counter would be a cache line every hit
//! bounces between cores. Hits and puts therefore count in *stripes*: a small array of
//! cache-line-padded counters, each thread adding to the stripe it was assigned on first use,
//! summed when the statistics are read. Everything else happens on the slow path and counts
//! in plain atomics.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const STRIPES: usize = 16;

#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(AtomicU64);

/// A counter that many threads bump without sharing a cache line.
#[derive(Debug, Default)]
pub(crate) struct Striped([Padded; STRIPES]);

/// The calling thread's stripe number (assigned round-robin at its first use).
#[inline]
pub(crate) fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

impl Striped {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sum(&self) -> u64 {
        self.0.iter().map(|p| p.0.load(Ordering::Relaxed)).sum()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: Striped,
    pub(crate) misses: AtomicU64,
    pub(crate) merges: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) deferred_deregistrations: AtomicU64,
    pub(crate) registrations: AtomicU64,
    pub(crate) deregistrations: AtomicU64,
    pub(crate) collisions: AtomicU64,
    pub(crate) registrar_errors: AtomicU64,
    pub(crate) registrar_panics: AtomicU64,
    pub(crate) deregistration_panics: AtomicU64,
    pub(crate) blind_uncached: AtomicU64,
    pub(crate) blind_validated_hits: AtomicU64,
    pub(crate) blind_validation_failures: AtomicU64,
    pub(crate) registered_bytes: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of the cache's counters ([`Cache::stats`](crate::Cache::stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// `get`s served by a cached registration.
    pub hits: u64,
    /// `get`s that registered (including blind memory registered for one use).
    pub misses: u64,
    /// Misses whose registration absorbed overlapping or adjacent cached regions.
    pub merges: u64,
    /// Regions invalidated by an event (unmap, madvise, remap, cooperative call).
    pub invalidations: u64,
    /// Unused regions evicted to respect the limits.
    pub evictions: u64,
    /// Regions invalidated while in use, deregistered at their last put.
    pub deferred_deregistrations: u64,
    /// Successful registrar `register` calls.
    pub registrations: u64,
    /// Registrar `deregister` calls.
    pub deregistrations: u64,
    /// Registrations thrown away because an invalidation hit the range meanwhile.
    pub collisions: u64,
    /// `register` errors passed to the caller.
    pub registrar_errors: u64,
    /// `register` panics caught and passed to the caller.
    pub registrar_panics: u64,
    /// `deregister` panics caught (the registration counts as released).
    pub deregistration_panics: u64,
    /// Registrations of memory the watcher cannot fully see, made for one use only.
    pub blind_uncached: u64,
    /// Hits on such memory that were validated against the page frames.
    pub blind_validated_hits: u64,
    /// Validations that found other frames (the region was dropped; the get missed).
    pub blind_validation_failures: u64,
    /// Regions in the cache now.
    pub regions: usize,
    /// Bytes of the regions in the cache now.
    pub cached_bytes: u64,
    /// Bytes registered now (cached, in use after invalidation, or awaiting deregistration).
    pub registered_bytes: u64,
    /// Invalidated regions whose deregistration waits for the next cache call or `flush`.
    pub pending_deregistrations: usize,
}

impl Stats {
    /// Hits over hits plus misses (0 when there was no `get`).
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hits {} misses {} (hit rate {:.1}%) merges {} invalidations {} evictions {} \
             deferred deregistrations {} collisions {} registrations {} deregistrations {} \
             blind: uncached {} validated hits {} validation failures {}; regions {} \
             registered {} B",
            self.hits,
            self.misses,
            100.0 * self.hit_rate(),
            self.merges,
            self.invalidations,
            self.evictions,
            self.deferred_deregistrations,
            self.collisions,
            self.registrations,
            self.deregistrations,
            self.blind_uncached,
            self.blind_validated_hits,
            self.blind_validation_failures,
            self.regions,
            self.registered_bytes,
        )
    }
}
