//! Figure (d): register + unregister of a classic subscriber (next to one other) and insert +
//! remove of an interval among 1e3, against the naive dispatcher and list. Bodies and
//! baselines live in `mmnotify-bench`.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use mmnotify_bench::fixtures::{self, ClassicFixture, IntervalFixture, Rng};

fn churn(c: &mut Criterion) {
    let mut g = c.benchmark_group("d_churn");
    let cf = ClassicFixture::new(1);
    g.bench_function("register_unregister/engine", |b| {
        b.iter(|| fixtures::register_unregister(&cf.mm))
    });
    g.bench_function("register_unregister/naive_rwlock_vec", |b| {
        b.iter(|| fixtures::naive_register_unregister(&cf.naive))
    });
    let f = IntervalFixture::build(1_000);
    let mut rng = Rng::new(0xd1);
    g.bench_function("insert_remove_among_1000/engine", |b| {
        b.iter(|| fixtures::insert_remove(&f.mm, rng.below(f.n)))
    });
    let mut rng = Rng::new(0xd1);
    g.bench_function("insert_remove_among_1000/naive_linear_list", |b| {
        b.iter(|| fixtures::naive_insert_remove(&f.naive, rng.below(f.n)))
    });
    g.finish();
}

criterion_group!(benches, churn);
criterion_main!(benches);
