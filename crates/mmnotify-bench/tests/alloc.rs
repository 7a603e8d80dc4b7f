//! I8, on the benchmark bodies: the fast paths allocate nothing: start+end with 0, 1, 8 and 64
//! classic subscribers, an invalidation that hits up to 8 intervals, and the read pair. Counted
//! per thread by the crate's counting allocator (the one `mmnotify bench` reports with),
//! installed here as the global allocator. Exact counts, no timing.
//!
//! These back the "zero allocations" target of docs/PERFORMANCE.md; they also pin down where
//! the engine does allocate today (more than 8 interval hits), so a change there is noticed.

use mmnotify_bench::alloc::{allocations_per_call, is_installed, CountingAlloc};
use mmnotify_bench::fixtures::{self, ClassicFixture, IntervalFixture, ReadFixture};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[test]
fn counting_allocator_counts() {
    assert!(is_installed());
    // A body that allocates once per call is counted as one.
    let per_call = allocations_per_call(10, || drop(std::hint::black_box(vec![1u8; 16])));
    assert_eq!(per_call, Some(1.0));
}

#[test]
fn start_end_allocates_nothing_up_to_64_subscribers() {
    let range = fixtures::fixed_range();
    for n in [0, 1, 8, 64] {
        let f = ClassicFixture::new(n);
        let per_call = allocations_per_call(100, || fixtures::start_end(&f.mm, range));
        assert_eq!(per_call, Some(0.0), "{n} subscribers");
    }
}

#[test]
fn interval_invalidation_allocates_nothing_whatever_the_hits() {
    let f = IntervalFixture::build(64);
    // Beyond 8 hits the engine uses the thread's spare buffer, allocated by the warm-up call
    // (issue 11 item 7: hits beyond 8 do not allocate).
    for hits in [0, 1, 8, 16, 64] {
        let mut cycle = f.cycle(hits);
        let per_call = allocations_per_call(100, || fixtures::invalidate_next(&f.mm, &mut cycle));
        assert_eq!(per_call, Some(0.0), "{hits} hits");
    }
}

#[test]
fn read_pair_allocates_nothing() {
    let f = ReadFixture::new();
    let per_call = allocations_per_call(100, || {
        fixtures::read_pair(&f.handle);
    });
    assert_eq!(per_call, Some(0.0));
}
