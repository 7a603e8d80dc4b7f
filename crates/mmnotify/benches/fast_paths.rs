//! Figures (a) and (c, uncontended): the invalidation fast path with 0, 1, 8 and 64 classic
//! subscribers, the read pair of the interval protocol, and their baselines (the atomic-load
//! floor and the naive `RwLock<Vec<Arc<dyn Trait>>>` dispatcher). Bodies and baselines live in
//! `mmnotify-bench`, shared with `mmnotify bench`; docs/PERFORMANCE.md has the method.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::sync::atomic::AtomicU64;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mmnotify_bench::baseline::atomic_load_floor;
use mmnotify_bench::fixtures::{self, ClassicFixture, ReadFixture};
use mmnotify_bench::suite::SUBSCRIBER_COUNTS;

fn start_end(c: &mut Criterion) {
    let range = fixtures::fixed_range();
    let mut g = c.benchmark_group("a_start_end");
    let word = AtomicU64::new(7);
    g.bench_function("floor_atomic_load", |b| b.iter(|| atomic_load_floor(&word)));
    for n in SUBSCRIBER_COUNTS {
        let f = ClassicFixture::new(n);
        g.bench_with_input(BenchmarkId::new("engine", n), &n, |b, _| {
            b.iter(|| fixtures::start_end(&f.mm, range))
        });
        g.bench_with_input(BenchmarkId::new("naive_rwlock_vec", n), &n, |b, _| {
            b.iter(|| fixtures::naive_start_end(&f.naive, range))
        });
    }
    g.finish();
}

fn read_pair(c: &mut Criterion) {
    let f = ReadFixture::new();
    let mut g = c.benchmark_group("c_read_pair");
    g.bench_function("uncontended", |b| b.iter(|| fixtures::read_pair(&f.handle)));
    g.finish();
}

criterion_group!(benches, start_end, read_pair);
criterion_main!(benches);
