//! The benchmark fixtures measure what they claim: each query range hits exactly the number of
//! intervals it is named after (checked through the engine's own callbacks and against the
//! naive list), the baselines call every subscriber, and the read-side streams overlap (or
//! not) as named.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mmnotify::{IntervalCtx, IntervalSubscriber, Invalidate, Invalidation, Mm, Range};
use mmnotify_bench::baseline::{NaiveDispatcher, NaiveIntervals, NaiveSubscriber};
use mmnotify_bench::fixtures::{self, interval_bounds, queries, ReadFixture, LEN};

#[derive(Default)]
struct Counting(AtomicU64);

impl IntervalSubscriber for Counting {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _: &Invalidation) -> Invalidate {
        ctx.set_seq();
        self.0.fetch_add(1, Ordering::SeqCst);
        Invalidate::Done
    }
}

#[test]
fn queries_hit_exactly_the_named_number_of_intervals() {
    let n = 100;
    let mm = Mm::new();
    let counter = Arc::new(Counting::default());
    let naive = NaiveIntervals::default();
    for i in 0..n {
        let (start, last) = interval_bounds(i);
        mm.insert_interval(Range::from_len(start, LEN).unwrap(), counter.clone())
            .unwrap();
        naive.insert(
            start,
            last,
            Arc::new(mmnotify_bench::baseline::NoopNaiveInterval),
        );
    }
    for hits in [0, 1, 16, n] {
        for range in queries(n, hits) {
            let before = counter.0.load(Ordering::SeqCst);
            fixtures::start_end(&mm, range);
            assert_eq!(counter.0.load(Ordering::SeqCst) - before, hits, "{range:?}");
            assert_eq!(naive.invalidate(range) as u64, hits, "{range:?}");
        }
    }
}

#[derive(Default)]
struct CountingNaive(AtomicU64, AtomicU64);

impl NaiveSubscriber for CountingNaive {
    fn start(&self, _: Range) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn end(&self, _: Range) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn naive_dispatcher_calls_every_start_and_end_and_unregisters() {
    let d = NaiveDispatcher::default();
    let subs: Vec<_> = (0..3).map(|_| Arc::new(CountingNaive::default())).collect();
    let ids: Vec<_> = subs.iter().map(|s| d.register(s.clone())).collect();
    fixtures::naive_start_end(&d, fixtures::fixed_range());
    for s in &subs {
        assert_eq!(
            (s.0.load(Ordering::SeqCst), s.1.load(Ordering::SeqCst)),
            (1, 1)
        );
    }
    assert!(d.unregister(ids[1]));
    assert!(!d.unregister(ids[1]));
    fixtures::naive_start_end(&d, fixtures::fixed_range());
    assert_eq!(subs[1].0.load(Ordering::SeqCst), 1);
    assert_eq!(subs[0].0.load(Ordering::SeqCst), 2);
}

#[test]
fn naive_list_removes_by_id() {
    let list = NaiveIntervals::default();
    let a = list.insert(0, 9, Arc::new(mmnotify_bench::baseline::NoopNaiveInterval));
    let _b = list.insert(5, 20, Arc::new(mmnotify_bench::baseline::NoopNaiveInterval));
    assert_eq!(list.invalidate(Range::new(0, 10).unwrap()), 2);
    assert!(list.remove(a));
    assert!(!list.remove(a));
    assert_eq!(list.invalidate(Range::new(0, 10).unwrap()), 1);
    assert_eq!(list.len(), 1);
}

#[test]
fn churn_bodies_leave_the_address_space_as_they_found_it() {
    let f = fixtures::ClassicFixture::new(1);
    fixtures::register_unregister(&f.mm);
    assert_eq!(f.mm.subscribers(), f.ids);
    let i = fixtures::IntervalFixture::build(10);
    fixtures::insert_remove(&i.mm, 3);
    assert_eq!(i.mm.interval_state().indexed, 10);
}

#[test]
fn read_fixture_streams_overlap_as_named() {
    let f = ReadFixture::new();
    let seq = f.handle.read_begin().unwrap();
    fixtures::start_end(&f.mm, f.disjoint);
    assert!(
        !f.handle.read_retry(seq),
        "the disjoint range must not touch the reader"
    );
    fixtures::start_end(&f.mm, f.overlapping);
    assert!(
        f.handle.read_retry(seq),
        "the overlapping range must touch the reader"
    );
}
