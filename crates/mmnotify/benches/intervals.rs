//! Figure (b): one invalidation among 1e3, 1e5 and 1e6 intervals, hitting 0, 1 and 16 of them,
//! against the naive linearly scanned `Vec<(start, last)>`. Each size is built once and reused
//! for every hit count. Bodies and baselines live in `mmnotify-bench`.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mmnotify_bench::fixtures::{self, IntervalFixture};
use mmnotify_bench::suite::HIT_COUNTS;

fn invalidate(c: &mut Criterion) {
    let mut g = c.benchmark_group("b_interval_invalidate");
    for n in [1_000u64, 100_000, 1_000_000] {
        let f = IntervalFixture::build(n);
        for hits in HIT_COUNTS {
            let id = format!("{n}/{hits}hit");
            let mut cycle = f.cycle(hits);
            g.bench_function(BenchmarkId::new("engine", &id), |b| {
                b.iter(|| fixtures::invalidate_next(&f.mm, &mut cycle))
            });
            if hits == 1 {
                // The same range every time: the walk stays in cache (structure, not latency).
                let mut hot = f.hot_cycle(hits);
                g.bench_function(BenchmarkId::new("engine_cache_hot", &id), |b| {
                    b.iter(|| fixtures::invalidate_next(&f.mm, &mut hot))
                });
            }
            let mut cycle = f.cycle(hits);
            if n >= 100_000 {
                // A full scan of 1e5..1e6 entries takes 0.1..2 ms: fewer samples suffice.
                g.sample_size(10);
            }
            g.bench_function(BenchmarkId::new("naive_linear_scan", &id), |b| {
                b.iter(|| fixtures::naive_invalidate_next(&f.naive, &mut cycle))
            });
            g.sample_size(100);
        }
    }
    g.finish();
}

criterion_group!(benches, invalidate);
criterion_main!(benches);
