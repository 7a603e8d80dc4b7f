//! Acceptance: a proptest state machine against a model, on a plain engine `Mm`. Random
//! sequences of get / put / invalidate / purge (eviction) / flush, under four configurations
//! (merging on and off, with and without a region limit), check after every step that:
//!
//! * no `get` returns a registration whose range was invalidated before the `get` (judged by
//!   the test's own record of which registrations an invalidation overlapped);
//! * the guard covers the request with at least the access asked for and is not invalidated;
//! * no registration held by a guard is deregistered, and invalidated unused registrations are
//!   gone after a flush; the region count respects the limit;
//! * every registration is deregistered exactly once by the end (after the cache's drop), and
//!   no interval subscription is left on the `Mm`.
//!
//! Without merging and without limits the model also predicts every hit and miss exactly.

#![allow(
    clippy::disallowed_types,
    reason = "test code: std::sync is fine outside the engine (see clippy.toml)"
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::Ledger;
use mmnotify::{Event, Mm, Range};
use mmnotify_rcache::{Access, Cache, Config, Error, EventSource, PageRange, RegionGuard};
use proptest::prelude::*;
use proptest::test_runner::Config as PropConfig;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};

const P: u64 = 4096;
const BASE: u64 = 0x40_0000_0000;
const SPACE: u64 = 24;

#[derive(Clone, Debug)]
struct MRegion {
    start: u64,
    end: u64,
    write: bool,
    valid: bool,
}

#[derive(Clone, Debug)]
struct Model {
    merge: bool,
    max_regions: usize,
    held: usize,
    /// Only maintained when the model is exact (no merging, no limit).
    regions: Vec<MRegion>,
    /// The predicted outcome of the last get (exact model only).
    predicted_hit: Option<bool>,
}

impl Model {
    fn exact(&self) -> bool {
        !self.merge && self.max_regions == usize::MAX
    }
}

#[derive(Clone, Debug)]
enum Transition {
    Get { page: u64, pages: u64, write: bool },
    Put(usize),
    Invalidate { page: u64, pages: u64 },
    Purge,
    Flush,
}

struct CacheModel;

impl ReferenceStateMachine for CacheModel {
    type State = Model;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<Model> {
        (any::<bool>(), prop_oneof![Just(usize::MAX), Just(3usize)])
            .prop_map(|(merge, max_regions)| Model {
                merge,
                max_regions,
                held: 0,
                regions: Vec::new(),
                predicted_hit: None,
            })
            .boxed()
    }

    fn transitions(s: &Model) -> BoxedStrategy<Transition> {
        let get = (0..SPACE, 1..4u64, any::<bool>())
            .prop_map(|(page, pages, write)| Transition::Get { page, pages, write });
        let inv =
            (0..SPACE, 1..3u64).prop_map(|(page, pages)| Transition::Invalidate { page, pages });
        let held = s.held.max(1);
        let put = (0..held).prop_map(Transition::Put);
        let purge_weight = if s.exact() { 0 } else { 1 };
        prop_oneof![
            5 => get,
            4 => put,
            3 => inv,
            purge_weight => Just(Transition::Purge),
            1 => Just(Transition::Flush),
        ]
        .boxed()
    }

    fn preconditions(s: &Model, t: &Transition) -> bool {
        match t {
            Transition::Put(i) => *i < s.held,
            Transition::Purge => !s.exact(),
            _ => true,
        }
    }

    fn apply(mut s: Model, t: &Transition) -> Model {
        s.predicted_hit = None;
        match *t {
            Transition::Get { page, pages, write } => {
                if s.exact() {
                    let (start, end) = (page * P, (page + pages) * P);
                    let hit = s.regions.iter().any(|r| {
                        r.valid && r.start <= start && end <= r.end && (r.write || !write)
                    });
                    if !hit {
                        s.regions.push(MRegion {
                            start,
                            end,
                            write,
                            valid: true,
                        });
                    }
                    s.predicted_hit = Some(hit);
                }
                // A get may fail with Full under a limit when every region is held; the SUT
                // then reports it and the model's held count is corrected in check below.
                s.held += 1;
            }
            Transition::Put(_) => s.held -= 1,
            Transition::Invalidate { page, pages } => {
                let (start, end) = (page * P, (page + pages) * P);
                for r in &mut s.regions {
                    if r.start < end && start < r.end {
                        r.valid = false;
                    }
                }
            }
            Transition::Purge | Transition::Flush => {}
        }
        s
    }
}

struct Sut {
    mm: Mm,
    ledger: Arc<Ledger>,
    cache: &'static Cache<Arc<Ledger>>,
    raw: *mut Cache<Arc<Ledger>>,
    /// Guards, or `None` for a get the limit refused (kept so indices match the model).
    guards: Vec<Option<RegionGuard<'static, Arc<Ledger>>>>,
    ranges: HashMap<u64, PageRange>,
    invalidated: HashSet<u64>,
}

impl Sut {
    fn held_ids(&self) -> HashSet<u64> {
        self.guards
            .iter()
            .flatten()
            .map(|g| g.handle().id)
            .collect()
    }
}

struct CacheTest;

impl StateMachineTest for CacheTest {
    type SystemUnderTest = Sut;
    type Reference = CacheModel;

    fn init_test(s: &Model) -> Sut {
        let mm = Mm::new();
        let ledger = Arc::new(Ledger::default());
        let config = Config::default().merge(s.merge).max_regions(s.max_regions);
        let raw = Box::into_raw(Box::new(Cache::new(
            ledger.clone(),
            EventSource::Mm(mm.clone()),
            config,
        )));
        // SAFETY: `raw` is a live box, freed only in `teardown` after every guard that
        // borrows it has been dropped.
        let cache: &'static Cache<Arc<Ledger>> = unsafe { &*raw };
        Sut {
            mm,
            ledger,
            cache,
            raw,
            guards: Vec::new(),
            ranges: HashMap::new(),
            invalidated: HashSet::new(),
        }
    }

    fn apply(mut sut: Sut, s: &Model, t: Transition) -> Sut {
        match t {
            Transition::Get { page, pages, write } => {
                let access = if write {
                    Access::READ_WRITE
                } else {
                    Access::READ
                };
                let want = PageRange::covering(BASE + page * P, pages * P).unwrap();
                let hits = sut.cache.stats().hits;
                match sut.cache.get(want.start(), want.len(), access) {
                    Ok(g) => {
                        let id = g.handle().id;
                        assert!(
                            g.range().contains(&want),
                            "{:?} does not cover {want}",
                            g.range()
                        );
                        assert!(g.access().includes(access));
                        assert!(!g.is_invalidated());
                        assert!(
                            !sut.invalidated.contains(&id),
                            "registration {id} was invalidated before this get and handed out"
                        );
                        sut.ranges.insert(id, g.range());
                        if let Some(hit) = s.predicted_hit {
                            assert_eq!(sut.cache.stats().hits > hits, hit, "hit/miss mispredicted");
                        }
                        sut.guards.push(Some(g));
                    }
                    Err(Error::Full { .. }) => {
                        assert!(s.max_regions != usize::MAX);
                        assert!(sut.guards.iter().flatten().count() >= s.max_regions);
                        sut.guards.push(None);
                    }
                    Err(e) => panic!("get: {e}"),
                }
            }
            Transition::Put(i) => {
                sut.guards.remove(i);
            }
            Transition::Invalidate { page, pages } => {
                let r = Range::from_len(BASE + page * P, pages * P).unwrap();
                let live: Vec<u64> = sut.ledger.live.lock().unwrap().iter().copied().collect();
                for id in live {
                    let range = sut.ranges[&id];
                    if range.start() < r.end() && r.start() < range.end() {
                        sut.invalidated.insert(id);
                    }
                }
                sut.mm.invalidate_start(r, Event::Unmap).unwrap().end();
                for g in sut.guards.iter().flatten() {
                    assert_eq!(
                        g.is_invalidated(),
                        sut.invalidated.contains(&g.handle().id),
                        "a holder's view of invalidation"
                    );
                }
            }
            Transition::Purge => {
                sut.cache.purge();
            }
            Transition::Flush => {
                sut.cache.flush();
                let held = sut.held_ids();
                for id in sut.ledger.live.lock().unwrap().iter() {
                    assert!(
                        !sut.invalidated.contains(id) || held.contains(id),
                        "invalidated unused registration {id} survived a flush"
                    );
                }
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut, s: &Model) {
        assert_eq!(
            sut.ledger.double.load(Ordering::SeqCst),
            0,
            "double deregistration"
        );
        let live = sut.ledger.live.lock().unwrap().clone();
        for id in sut.held_ids() {
            assert!(
                live.contains(&id),
                "held registration {id} was deregistered"
            );
        }
        assert!(sut.cache.stats().regions <= s.max_regions);
    }

    fn teardown(mut sut: Sut, _s: Model) {
        sut.guards.clear();
        // SAFETY: every guard borrowing the cache is gone; `raw` came from Box::into_raw.
        drop(unsafe { Box::from_raw(sut.raw) });
        let l = &sut.ledger;
        assert_eq!(l.live(), 0, "registrations left after drop");
        assert_eq!(
            l.registered.load(Ordering::SeqCst),
            l.deregistered.load(Ordering::SeqCst)
        );
        assert_eq!(l.double.load(Ordering::SeqCst), 0);
        assert_eq!(
            sut.mm.interval_state().indexed,
            0,
            "interval subscriptions left"
        );
    }
}

prop_state_machine! {
    #![proptest_config(PropConfig {
        cases: 256,
        failure_persistence: None,
        .. PropConfig::default()
    })]

    /// The cache against its model (see the module documentation).
    #[test]
    fn cache_matches_model(sequential 1..60 => CacheTest);
}
