//! Figures (c, contended) and (e): the read pair while another thread invalidates a range that
//! does not overlap the reader's interval and one that does; and start+end on one `Mm` with one
//! subscriber from one thread vs two threads on disjoint ranges (reported as throughput; the
//! ratio of the two is the scaling figure, which `mmnotify bench` prints). Bodies, baselines
//! and the thread helpers live in `mmnotify-bench`.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mmnotify_bench::fixtures::{self, ReadFixture, ScalingFixture};
use mmnotify_bench::measure::{parallel_iters, PaddedCounters, Stream};

fn read_pair_contended(c: &mut Criterion) {
    let f = ReadFixture::new();
    let mut g = c.benchmark_group("c_read_pair");
    for (name, range) in [
        ("disjoint_stream", f.disjoint),
        ("overlapping_stream", f.overlapping),
    ] {
        let stream = Stream::start(f.mm.clone(), range);
        g.bench_function(name, |b| b.iter(|| fixtures::read_pair(&f.handle)));
        stream.stop();
    }
    g.finish();
}

fn scaling(c: &mut Criterion) {
    let f = ScalingFixture::new();
    let counters = PaddedCounters::default();
    let mut g = c.benchmark_group("e_scaling");
    for threads in [1usize, 2] {
        // Throughput counts operations of all threads: criterion's "elem/s" is aggregate ops/s.
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_with_input(BenchmarkId::new("engine", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                parallel_iters(t, iters, |i| {
                    fixtures::start_end(&f.mm, ScalingFixture::range(i))
                })
            })
        });
        g.bench_with_input(
            BenchmarkId::new("naive_rwlock_vec", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|iters| {
                    parallel_iters(t, iters, |i| {
                        fixtures::naive_start_end(&f.naive, ScalingFixture::range(i))
                    })
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("control_no_sharing", threads),
            &threads,
            |b, &t| b.iter_custom(|iters| parallel_iters(t, iters, |i| counters.bump(i))),
        );
    }
    g.finish();
}

criterion_group!(benches, read_pair_contended, scaling);
criterion_main!(benches);
