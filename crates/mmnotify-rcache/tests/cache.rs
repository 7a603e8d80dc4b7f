//! The cache's behaviour on a plain engine `Mm` (no real memory, no userfaultfd): hits and
//! misses, invalidation while in use, callbacks, merging, limits and LRU eviction, registrar
//! errors and panics, re-entrant deregistration, statistics, and the books at drop.

#![allow(
    clippy::disallowed_types,
    reason = "test code: std::sync is fine outside the engine (see clippy.toml)"
)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{bounded, Ledger, FAIL, PANIC};
use mmnotify::{Event, Mm, Range};
use mmnotify_rcache::{Access, Cache, Config, Error, EventSource, Refusal};

const P: u64 = 4096;
const BASE: u64 = 0x10_0000_0000;

fn cache(config: Config) -> (Mm, Arc<Ledger>, Cache<Arc<Ledger>>) {
    let mm = Mm::new();
    let ledger = Arc::new(Ledger::default());
    let cache = Cache::new(ledger.clone(), EventSource::Mm(mm.clone()), config);
    (mm, ledger, cache)
}

fn unmap(mm: &Mm, start: u64, len: u64) {
    mm.invalidate_start(Range::from_len(start, len).unwrap(), Event::Unmap)
        .unwrap()
        .end();
}

#[test]
fn hit_after_put_miss_after_invalidation() {
    let (mm, ledger, cache) = cache(Config::default());
    let first = cache.get(BASE + 10, 100, Access::READ).unwrap();
    assert_eq!(first.range().start(), BASE);
    assert_eq!(first.range().end(), BASE + P);
    let id = first.handle().id;
    drop(first);
    let hit = cache.get(BASE, P, Access::READ).unwrap();
    assert_eq!(hit.handle().id, id);
    drop(hit);
    unmap(&mm, BASE + P / 2, 1);
    let fresh = cache.get(BASE, P, Access::READ).unwrap();
    assert_ne!(
        fresh.handle().id,
        id,
        "an invalidated region was handed out again"
    );
    drop(fresh);
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.invalidations), (1, 2, 1));
    // The invalidated unused region was queued; the next get flushed it.
    assert_eq!(ledger.live(), 1);
    drop(cache);
    assert_eq!(ledger.live(), 0);
    assert_eq!(ledger.double.load(Ordering::SeqCst), 0);
}

#[test]
fn an_unrelated_invalidation_keeps_the_hit() {
    let (mm, _ledger, cache) = cache(Config::default());
    drop(cache.get(BASE, P, Access::READ).unwrap());
    unmap(&mm, BASE + 4 * P, P);
    drop(cache.get(BASE, P, Access::READ).unwrap());
    assert_eq!(cache.stats().hits, 1);
}

#[test]
fn invalidated_in_use_stays_registered_until_last_put_and_calls_back() {
    let (mm, ledger, cache) = cache(Config::default());
    let a = cache.get(BASE, 2 * P, Access::READ_WRITE).unwrap();
    let b = cache.get(BASE, P, Access::READ).unwrap(); // a hit on the same region
    assert_eq!(a.handle().id, b.handle().id);
    let told = Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = told.clone();
    a.on_invalidate(move |r| t.lock().unwrap().push(r));
    unmap(&mm, BASE, P);
    assert!(a.is_invalidated() && b.is_invalidated());
    assert_eq!(told.lock().unwrap().as_slice(), &[a.range()]);
    // Registered for the holders' bookkeeping, never handed out again.
    let c = cache.get(BASE, P, Access::READ).unwrap();
    assert_ne!(c.handle().id, a.handle().id);
    assert_eq!(ledger.live(), 2);
    drop(a);
    assert_eq!(ledger.live(), 2, "deregistered before the last put");
    drop(b);
    assert_eq!(ledger.live(), 1);
    assert_eq!(cache.stats().deferred_deregistrations, 1);
    // A callback registered after the invalidation runs at once.
    let late = Arc::new(std::sync::atomic::AtomicBool::new(false));
    drop(c);
    unmap(&mm, BASE, P);
    let d = cache.get(BASE, P, Access::READ).unwrap();
    unmap(&mm, BASE, P);
    let l = late.clone();
    d.on_invalidate(move |_| l.store(true, Ordering::SeqCst));
    assert!(late.load(Ordering::SeqCst));
}

#[test]
fn a_get_during_an_open_invalidation_waits_and_gets_a_fresh_registration() {
    let (mm, _ledger, cache) = cache(Config::default());
    let cache = Arc::new(cache);
    let old = cache.get(BASE, P, Access::READ).unwrap().handle().id;
    let guard = mm
        .invalidate_start(Range::from_len(BASE, P).unwrap(), Event::Unmap)
        .unwrap();
    let c2 = cache.clone();
    let getter = std::thread::spawn(move || c2.get(BASE, P, Access::READ).map(|g| g.handle().id));
    std::thread::sleep(Duration::from_millis(50));
    guard.end();
    let new = bounded(Duration::from_secs(10), move || getter.join().unwrap()).unwrap();
    assert_ne!(new, old);
}

#[test]
fn merging_adjacent_and_overlapping_requests() {
    let (_mm, ledger, cache) = cache(Config::default());
    drop(cache.get(BASE, 2 * P, Access::READ).unwrap());
    let merged = cache.get(BASE + 2 * P, P, Access::WRITE).unwrap();
    assert_eq!(
        (merged.range().start(), merged.range().end()),
        (BASE, BASE + 3 * P)
    );
    assert_eq!(merged.access(), Access::READ_WRITE);
    drop(merged);
    drop(cache.get(BASE + P, P, Access::READ).unwrap()); // inside: a hit
    let s = cache.stats();
    assert_eq!((s.merges, s.hits, s.regions), (1, 1, 1));
    cache.flush();
    assert_eq!(ledger.live(), 1, "the absorbed region was not deregistered");
}

#[test]
fn without_merging_regions_overlap_and_a_contained_request_hits() {
    let (_mm, ledger, cache) = cache(Config::default().merge(false));
    drop(cache.get(BASE, 8 * P, Access::READ).unwrap());
    drop(cache.get(BASE + 6 * P, 4 * P, Access::READ).unwrap());
    drop(cache.get(BASE + 2 * P, P, Access::READ).unwrap());
    drop(cache.get(BASE + 7 * P, 3 * P, Access::READ).unwrap());
    let s = cache.stats();
    assert_eq!((s.misses, s.hits, s.merges, s.regions), (2, 2, 0, 2));
    assert_eq!(ledger.live(), 2);
    // More access than the region has: a miss.
    drop(cache.get(BASE, P, Access::WRITE).unwrap());
    assert_eq!(cache.stats().misses, 3);
}

#[test]
fn limits_evict_unused_regions_in_lru_order_and_never_used_ones() {
    let (_mm, ledger, cache) = cache(Config::default().merge(false).max_regions(2));
    drop(cache.get(BASE, P, Access::READ).unwrap()); // A
    drop(cache.get(BASE + 10 * P, P, Access::READ).unwrap()); // B
    drop(cache.get(BASE, P, Access::READ).unwrap()); // touch A: B is now least recent
    drop(cache.get(BASE + 20 * P, P, Access::READ).unwrap()); // C evicts B
    assert_eq!(cache.stats().evictions, 1);
    drop(cache.get(BASE, P, Access::READ).unwrap());
    assert_eq!(cache.stats().hits, 2, "A was evicted instead of B");
    // All in use: the limit cannot be met.
    let a = cache.get(BASE, P, Access::READ).unwrap();
    let c = cache.get(BASE + 20 * P, P, Access::READ).unwrap();
    let err = cache.get(BASE + 30 * P, P, Access::READ).unwrap_err();
    assert!(matches!(err, Error::Full { regions: 2, .. }), "{err}");
    assert!(!a.is_invalidated() && !c.is_invalidated());
    drop((a, c));
    assert_eq!(ledger.live(), 2);
    assert_eq!(cache.purge(), 2);
    assert_eq!(ledger.live(), 0);
}

#[test]
fn byte_limit() {
    let (_mm, _ledger, cache) = cache(Config::default().merge(false).max_bytes(3 * P));
    drop(cache.get(BASE, 2 * P, Access::READ).unwrap());
    drop(cache.get(BASE + 10 * P, P, Access::READ).unwrap());
    drop(cache.get(BASE + 20 * P, 2 * P, Access::READ).unwrap());
    let s = cache.stats();
    assert!(s.cached_bytes <= 3 * P && s.evictions >= 1, "{s:?}");
    let err = cache.get(BASE + 40 * P, 4 * P, Access::READ).unwrap_err();
    assert!(matches!(err, Error::Full { .. }), "{err}");
}

#[test]
fn bad_input_is_a_typed_error() {
    let (_mm, ledger, cache) = cache(Config::default());
    assert!(matches!(
        cache.get(BASE, 0, Access::READ),
        Err(Error::EmptyRange { addr: BASE })
    ));
    assert!(matches!(
        cache.get(u64::MAX - 100, 200, Access::READ),
        Err(Error::RangeOverflow { .. })
    ));
    assert!(matches!(
        cache.get(u64::MAX - 100, 50, Access::READ),
        Err(Error::RangeOverflow { .. })
    ));
    assert_eq!(ledger.live(), 0);
    assert_eq!(cache.stats().misses, 0);
}

#[test]
fn registrar_errors_and_panics_reach_the_caller_and_leave_the_cache_consistent() {
    let (mm, ledger, cache) = cache(Config::default());
    ledger.mode.store(FAIL, Ordering::SeqCst);
    let err = cache.get(BASE, P, Access::READ).unwrap_err();
    match &err {
        Error::Registrar { source, range, .. } => {
            assert!(source.downcast_ref::<Refusal>().is_some());
            assert_eq!(range.start(), BASE);
        }
        e => panic!("{e}"),
    }
    ledger.mode.store(PANIC, Ordering::SeqCst);
    let err = cache.get(BASE, P, Access::READ).unwrap_err();
    assert!(
        matches!(&err, Error::RegistrarPanicked { message, .. } if message.contains("registrar panic")),
        "{err}"
    );
    let s = cache.stats();
    assert_eq!(
        (s.registrar_errors, s.registrar_panics, s.regions),
        (1, 1, 0)
    );
    // No interval was left behind by the failed attempts.
    assert_eq!(mm.interval_state().indexed, 0);
    // Works afterwards; a panic in deregister is contained and counted.
    drop(cache.get(BASE, P, Access::READ).unwrap());
    ledger.panic_in_deregister.store(1, Ordering::SeqCst);
    unmap(&mm, BASE, P);
    cache.flush();
    let s = cache.stats();
    assert_eq!(
        (s.deregistration_panics, s.registrations, s.deregistrations),
        (1, 1, 1)
    );
    assert_eq!(ledger.live(), 0);
}

#[test]
fn a_deregistration_that_unmaps_cached_memory_does_not_deadlock() {
    let (mm, ledger, cache) = cache(Config::default().merge(false));
    let cache = Arc::new(cache);
    // Deregistering frees memory: an unmap of another cached region, through the same Mm.
    let mm2 = mm.clone();
    *ledger.on_deregister.lock().unwrap() = Some(Arc::new(move |r: mmnotify_rcache::PageRange| {
        if r.start() == BASE {
            unmap(&mm2, BASE + 10 * P, P);
        }
    }));
    drop(cache.get(BASE + 10 * P, P, Access::READ).unwrap());
    let c = cache.clone();
    bounded(Duration::from_secs(10), move || {
        let held = c.get(BASE, P, Access::READ).unwrap();
        unmap(&mm, BASE, P);
        drop(held); // the last put deregisters, which unmaps the other region
        drop(c.get(BASE + 10 * P, P, Access::READ).unwrap());
    });
    let s = cache.stats();
    assert_eq!(s.invalidations, 2, "{s:?}");
    assert_eq!(s.misses, 3);
}

#[test]
fn drop_deregisters_everything_exactly_once() {
    let (mm, ledger, cache) = cache(Config::default().merge(false));
    for i in 0..50 {
        drop(cache.get(BASE + i * 3 * P, P + i, Access::READ).unwrap());
    }
    unmap(&mm, BASE, 30 * P);
    drop(cache);
    assert_eq!(ledger.registered.load(Ordering::SeqCst), 50);
    assert_eq!(ledger.deregistered.load(Ordering::SeqCst), 50);
    assert_eq!(ledger.double.load(Ordering::SeqCst), 0);
    assert_eq!(mm.interval_state().indexed, 0);
}

/// An interval subscriber that drops the cache from its invalidation callback.
struct DropsTheCache(std::sync::Mutex<Option<Cache<Arc<Ledger>>>>);

impl mmnotify::IntervalSubscriber for DropsTheCache {
    fn invalidate(
        &self,
        ctx: &mmnotify::IntervalCtx<'_>,
        _inv: &mmnotify::Invalidation,
    ) -> mmnotify::Invalidate {
        ctx.set_seq();
        drop(self.0.lock().unwrap().take());
        mmnotify::Invalidate::Done
    }
}

#[test]
fn a_cache_dropped_inside_an_invalidation_callback_removes_its_intervals_all_the_same() {
    bounded(Duration::from_secs(30), || {
        let (mm, ledger, cache) = cache(Config::default().merge(false));
        for i in 0..3 {
            drop(cache.get(BASE + i * 2 * P, P, Access::READ).unwrap());
        }
        assert_eq!(mm.interval_state().indexed, 3);
        let dropper = Arc::new(DropsTheCache(std::sync::Mutex::new(Some(cache))));
        let elsewhere = Range::from_len(BASE + 100 * P, P).unwrap();
        let handle = mm.insert_interval(elsewhere, dropper.clone()).unwrap();
        unmap(&mm, BASE + 100 * P, P);
        assert!(dropper.0.lock().unwrap().is_none(), "the callback ran");
        assert_eq!(ledger.registered.load(Ordering::SeqCst), 3);
        assert_eq!(ledger.deregistered.load(Ordering::SeqCst), 3);
        assert_eq!(ledger.double.load(Ordering::SeqCst), 0);
        assert_eq!(
            mm.interval_state().indexed,
            1,
            "only the dropper's interval is left: {:?}",
            mm.interval_state()
        );
        mm.remove_interval(&handle).unwrap();
    });
}

#[test]
fn a_miss_that_cannot_fit_evicts_nothing() {
    let (_mm, ledger, cache) = cache(Config::default().merge(false).max_bytes(4 * P));
    drop(cache.get(BASE, P, Access::READ).unwrap()); // A: unused, 1 page
    let b = cache.get(BASE + 10 * P, 2 * P, Access::READ).unwrap(); // B: held, 2 pages
                                                                    // C needs 3 pages: even with A evicted, 2 + 3 > 4. A must stay cached.
    let err = cache.get(BASE + 20 * P, 3 * P, Access::READ).unwrap_err();
    assert!(matches!(err, Error::Full { .. }), "{err}");
    let s = cache.stats();
    assert_eq!((s.evictions, s.regions), (0, 2), "{s}");
    drop(cache.get(BASE, P, Access::READ).unwrap());
    assert_eq!(cache.stats().hits, 1, "A is still a hit");
    drop(b);
    // With B unused, evicting the least recently used region that makes room works.
    drop(cache.get(BASE + 20 * P, 3 * P, Access::READ).unwrap());
    assert!(cache.stats().cached_bytes <= 4 * P);
    drop(cache);
    assert_eq!(ledger.live(), 0);
}
