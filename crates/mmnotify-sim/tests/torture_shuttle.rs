//! The torture workload under shuttle: two shuttle threads apply random operations to one
//! world, and shuttle's randomised scheduler picks a different interleaving of their
//! operations on every iteration; the quiet check runs when both are done.
//!
//! The engine and the simulator use `std` locks, which shuttle does not control, so the
//! threads yield to the scheduler only *between* operations (each operation runs without a
//! switch): shuttle explores the orders of whole operations across threads, deterministically
//! and quickly, and the multi-threaded torture run (tests/torture.rs, `mmnotify torture`)
//! covers the interleavings inside them.

#![allow(clippy::disallowed_types)] // a std counter for per-iteration seeds, outside the model

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mmnotify_sim::torture::{install_quiet_panic_hook, Op, Rng, World};
use mmnotify_sim::Policy;

const OPS_PER_THREAD: usize = 20;
const ITERATIONS: usize = 600;

/// Seeds handed out, operations applied and injected panics thrown, over all iterations.
#[derive(Default)]
struct Counters {
    seeds: AtomicU64,
    ops: AtomicU64,
    panics: AtomicU64,
}

fn workload(policy: Policy, counters: &Counters) {
    let seeds = &counters.seeds;
    let seed = seeds.fetch_add(1, Ordering::Relaxed);
    let world = Arc::new(World::new(policy, Duration::from_millis(20), None).expect("setup"));
    let applied = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..2)
        .map(|worker| {
            let world = Arc::clone(&world);
            let applied = Arc::clone(&applied);
            shuttle::thread::spawn(move || {
                let mut rng = Rng::for_worker(seed, worker);
                for _ in 0..OPS_PER_THREAD {
                    let op = Op::generate(&mut rng);
                    if let Err(finding) = world.apply_caught(&op) {
                        panic!("{finding}");
                    }
                    applied.fetch_add(1, Ordering::Relaxed);
                    shuttle::thread::yield_now();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker");
    }
    counters
        .ops
        .fetch_add(applied.load(Ordering::Relaxed), Ordering::Relaxed);
    counters
        .panics
        .fetch_add(world.panics_fired(), Ordering::Relaxed);
    let findings = world.check();
    assert!(
        findings.is_empty(),
        "seed {seed}: {}",
        findings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// P1, I4, I5, I25, I34 over many schedules: under Exact no interleaving of the workload's
/// operations breaks coherence, balance, the epoch, or panic reporting.
#[test]
fn exact_holds_over_many_schedules() {
    install_quiet_panic_hook();
    let counters = Arc::new(Counters::default());
    let c = Arc::clone(&counters);
    shuttle::check_random(move || workload(Policy::Exact, &c), ITERATIONS);
    let ops = counters.ops.load(Ordering::Relaxed);
    assert_eq!(ops, (ITERATIONS * 2 * OPS_PER_THREAD) as u64);
    assert!(counters.panics.load(Ordering::Relaxed) > 0);
}

/// The same shuttle test fails under Legacy (P3: lost ends, leaked epoch), so it can fail.
#[test]
fn legacy_fails_under_shuttle() {
    install_quiet_panic_hook();
    let counters = Arc::new(Counters::default());
    let result = std::panic::catch_unwind(move || {
        shuttle::check_random(move || workload(Policy::Legacy, &counters), ITERATIONS);
    });
    assert!(result.is_err(), "Legacy must fail under some schedule");
}
