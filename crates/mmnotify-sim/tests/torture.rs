//! Torture: randomised concurrent runs under each policy, replay, shrinking, fault injection.
//!
//! Durations are short (debug builds on two shared cores); the long run is `.ci/run`'s
//! `mmnotify torture --duration 30s` in release.

use std::sync::Arc;
use std::time::Duration;

use mmnotify_sim::torture::{self, Finding, Mirror, Op, TortureConfig, TortureReport};
use mmnotify_sim::{Policy, TraceEvent};

fn config(policy: Policy, threads: usize, secs: u64, seed: u64) -> TortureConfig {
    TortureConfig {
        policy,
        threads,
        duration: Duration::from_secs(secs),
        seed,
        // A hang detector only: a correct run never waits this long; a broken one ends the epoch
        // at its first hang.
        hang_timeout: Duration::from_secs(1),
        ..TortureConfig::default()
    }
}

fn run(cfg: &TortureConfig) -> TortureReport {
    torture::run(cfg, &|_| {}).expect("torture setup")
}

fn kinds(findings: &[Finding]) -> Vec<String> {
    findings.iter().map(Finding::kind).collect()
}

/// P1, I4, I5, I25, I34: under Exact, two workers applying random operations with refusals,
/// delays and panics injected find no violation; refusals and panics did happen, and every
/// injected panic was resumed on the worker whose operation triggered it.
#[test]
fn exact_torture_finds_no_violation() {
    let mut cfg = config(Policy::Exact, 2, 3, 11);
    cfg.hang_timeout = Duration::from_secs(5);
    let report = run(&cfg);
    let s = &report.summary;
    assert!(report.passed(), "{}\n{}", s, report.failure.unwrap());
    assert!(s.total_ops() > 500, "{s}");
    assert!(s.checks > 5, "{s}");
    assert!(
        s.invalidations_blockable > 0 && s.invalidations_nonblockable > 0,
        "{s}"
    );
    assert!(s.refusals > 0, "{s}");
    assert!(s.panics_injected > 0, "{s}");
    assert_eq!(s.panics_injected, s.panics_reported, "{s}");
    assert_eq!(s.violations, 0);
}

/// P3 (the seed bug, and the interval leak of I25 broken): under Legacy an OOM reap with a
/// refusing subscriber loses KVM's and GRU's ends and leaves the epoch open; torture stops,
/// and shrinks the history to the reap.
#[test]
fn legacy_torture_finds_lost_ends_and_interval_leak() {
    let report = run(&config(Policy::Legacy, 2, 10, 1));
    let failure = report.failure.expect("Legacy must fail");
    let found = kinds(&failure.findings);
    assert!(found.iter().any(|k| k == "in_progress raised"), "{found:?}");
    assert!(
        found.iter().any(|k| k == "range_active raised"),
        "{found:?}"
    );
    assert!(
        found.iter().any(|k| k == "interval epoch open"),
        "{found:?}"
    );
    let shrunk = failure.shrunk.expect("reproduces single-threaded");
    assert!(shrunk.ops.len() <= 3, "{:?}", shrunk.ops);
    assert_eq!(shrunk.ops.last(), Some(&Op::OomReap));
    assert!(report.summary.elapsed < Duration::from_secs(60));
}

/// P2: under Kernel the ends go to everyone, but the interval epoch of a refused start leaks:
/// torture finds the open epoch.
#[test]
fn kernel_torture_finds_interval_leak() {
    let report = run(&config(Policy::Kernel, 2, 10, 2));
    let failure = report.failure.expect("Kernel must fail");
    let found = kinds(&failure.findings);
    assert!(
        found.iter().any(|k| k == "interval epoch open"),
        "{found:?}"
    );
    assert!(
        !found.iter().any(|k| k == "in_progress raised"),
        "{found:?}"
    );
    let shrunk = failure.shrunk.expect("reproduces single-threaded");
    assert!(kinds(&shrunk.findings)
        .iter()
        .any(|k| k == "interval epoch open"));
}

/// I4 broken on purpose: an engine built with the test-only `fault-injection` switch that
/// drops one end every 25 invalidations is caught under Exact, and the shrunk history shows
/// nothing on a correct engine.
#[test]
fn broken_engine_is_caught() {
    let mut cfg = config(Policy::Exact, 2, 10, 3);
    cfg.mm_hook = Some(Arc::new(|mm: &mmnotify::Mm| mm.lose_end_every(25)));
    let report = run(&cfg);
    let failure = report.failure.expect("a lost end must be found");
    let found = kinds(&failure.findings);
    assert!(
        found
            .iter()
            .any(|k| k == "unbalanced starts and ends" || k.ends_with(" raised")),
        "{found:?}"
    );
    let shrunk = failure.shrunk.expect("reproduces single-threaded");
    assert!(shrunk.ops.len() < failure.history_len.max(2));
    cfg.mm_hook = None;
    let healthy = torture::replay(&cfg, &shrunk.ops).unwrap();
    assert_eq!(healthy.first, None);
}

fn shape(trace: &[TraceEvent]) -> Vec<(String, mmnotify_sim::TraceKind, mmnotify::Range)> {
    trace
        .iter()
        .map(|e| (e.subscriber.clone(), e.kind, e.range))
        .collect()
}

/// With one worker thread a seed replays the same history: the same operations, the same
/// callbacks in the same order, the same counts.
#[test]
fn one_thread_replays_the_same_history() {
    let mut cfg = config(Policy::Exact, 1, 60, 42);
    cfg.max_ops = Some(1500);
    cfg.keep_trace = true;
    cfg.epochs_per_world = 1000;
    let a = run(&cfg);
    let b = run(&cfg);
    assert!(a.passed() && b.passed());
    assert_eq!(a.summary.total_ops(), 1500);
    assert_eq!(a.summary.ops, b.summary.ops);
    assert_eq!(
        a.summary.invalidations_blockable,
        b.summary.invalidations_blockable
    );
    assert_eq!(a.summary.refusals, b.summary.refusals);
    assert_eq!(a.summary.retries, b.summary.retries);
    assert!(!a.trace.is_empty());
    assert_eq!(shape(&a.trace), shape(&b.trace));
    cfg.seed = 43;
    let c = run(&cfg);
    assert_ne!(shape(&a.trace), shape(&c.trace));
}

/// Shrinking removes every operation that does not matter: a Legacy history with noise
/// around one OOM reap shrinks to the reap alone.
#[test]
fn shrinking_removes_noise() {
    let cfg = config(Policy::Legacy, 1, 1, 0);
    let mut history = Vec::new();
    for page in 0..12u16 {
        history.push(Op::Fault {
            mirror: Mirror::Kvm,
            page,
            write: false,
        });
        history.push(Op::Touch { page, write: true });
    }
    history.push(Op::SetDelay { micros: 2 });
    history.push(Op::OomReap);
    history.push(Op::ReadBegin);
    let shrunk = torture::shrink(&cfg, &history)
        .unwrap()
        .expect("Legacy loses ends on the reap");
    assert_eq!(shrunk.ops, vec![Op::OomReap]);
    assert!(shrunk.complete);
    // The same history under Exact shows nothing.
    let exact = config(Policy::Exact, 1, 1, 0);
    assert_eq!(torture::shrink(&exact, &history).unwrap(), None);
}

/// I34: a callback that panics in its end (or start): the other subscribers still get their
/// ends, the epoch closes (the checker finds nothing), and the panic reaches the caller.
#[test]
fn panicking_callbacks_leave_the_engine_consistent() {
    let cfg = config(Policy::Exact, 1, 1, 0);
    for at_end in [true, false] {
        let history = [
            Op::Fault {
                mirror: Mirror::Kvm,
                page: 9,
                write: false,
            },
            Op::Fault {
                mirror: Mirror::Hmm,
                page: 9,
                write: false,
            },
            Op::ArmPanic { at_end },
            Op::Munmap {
                slot: 1,
                first: 0,
                pages: 8,
            },
            Op::Touch {
                page: 9,
                write: false,
            },
        ];
        let replay = torture::replay(&cfg, &history).unwrap();
        assert_eq!(replay.first, None, "at_end {at_end}");
        assert_eq!(replay.panics, (1, 1), "at_end {at_end}");
    }
}
