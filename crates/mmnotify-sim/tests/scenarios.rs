//! The scenarios' outcomes under each policy, asserted from the state each run reports
//! (P1 Exact, P2 Kernel, P3 Legacy).

use mmnotify::Policy;
use mmnotify_sim::{
    run, FaultOutcome, Scenario, ScenarioReport, SubscriberReport, TraceKind, Violation,
};

const POLICIES: [Policy; 3] = [Policy::Exact, Policy::Kernel, Policy::Legacy];

fn sub<'a>(report: &'a ScenarioReport, name: &str) -> &'a SubscriberReport {
    report
        .subscribers
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no subscriber {name}"))
}

/// Seed under Legacy (P3): nobody gets an end after a refusal, so KVM's in_progress stays
/// raised (its faults in the range retry forever, memslot updates hang) and GRU's fault hangs.
#[test]
fn seed_legacy_loses_ends() {
    let r = run(Scenario::Seed, Policy::Legacy);
    let kvm = r.kvm.unwrap();
    let gru = r.gru.unwrap();
    let reap = r.reap.as_ref().unwrap();
    assert!(reap.refusals() >= 1 && !reap.succeeded && reap.oom_skip);
    assert!(
        kvm.in_progress >= 1,
        "KVM in_progress stuck at {}",
        kvm.in_progress
    );
    assert_eq!(
        kvm.in_progress,
        reap.refusals() as i64,
        "one lost end per refused attempt"
    );
    assert_eq!(kvm.fault, FaultOutcome::Retry);
    assert!(kvm.memslot_update.timed_out());
    assert!(gru.range_active >= 1);
    assert!(gru.fault.is_hung());
    assert_eq!(sub(&r, "kvm").counts.ends, 0);
    assert!(r
        .violations
        .iter()
        .any(|v| matches!(v, Violation::Unbalanced { subscriber, .. } if subscriber == "kvm")));
    assert!(r
        .violations
        .iter()
        .any(|v| matches!(v, Violation::Unbalanced { subscriber, .. } if subscriber == "gru")));
    assert!(r
        .violations
        .iter()
        .any(|v| matches!(v, Violation::Hang { mirror, .. } if mirror == "gru")));
    assert!(!r.is_coherent());
}

/// Seed under Kernel (P2): every start is called, every subscriber with an end gets one; the
/// refuser has no end. Balanced, no hang.
#[test]
fn seed_kernel_is_balanced() {
    let r = run(Scenario::Seed, Policy::Kernel);
    let kvm = r.kvm.unwrap();
    assert_eq!(kvm.in_progress, 0);
    assert_eq!(kvm.active_invalidate_count, 0);
    assert!(kvm.fault.is_mapped());
    assert!(!kvm.memslot_update.timed_out());
    let gru = r.gru.unwrap();
    assert_eq!(gru.range_active, 0);
    assert!(gru.fault.is_mapped());
    let (k, g, n) = (sub(&r, "kvm"), sub(&r, "gru"), sub(&r, "nouveau"));
    assert!(k.counts.starts > 0 && k.counts.starts == k.counts.ends);
    assert!(
        g.counts.starts > 0 && g.counts.starts == g.counts.ends,
        "GRU was called after the refusal"
    );
    assert!(n.counts.refusals > 0 && n.counts.ends == 0);
    assert!(r.is_coherent(), "{:?}", r.violations);
}

/// Seed under Exact (P1, I5): the refusal stops the walk, the started subscriber (KVM) is
/// ended, GRU after the refuser is never started; coherent.
#[test]
fn seed_exact_is_coherent() {
    let r = run(Scenario::Seed, Policy::Exact);
    assert_eq!(r.kvm.unwrap().in_progress, 0);
    assert!(matches!(r.gru.unwrap().fault, FaultOutcome::Mapped(_)));
    let (k, g) = (sub(&r, "kvm"), sub(&r, "gru"));
    assert!(k.counts.starts > 0 && k.counts.starts == k.counts.ends);
    assert_eq!(g.counts.starts, 0, "no start after the refusal under Exact");
    assert!(r.is_coherent(), "{:?}", r.violations);
}

/// Interval leak under Kernel and Legacy (P2, P3): the interval callbacks succeed, the
/// classic start refuses, the epoch stays open: read_begin times out, a later fault hangs,
/// remove would wait.
#[test]
fn interval_leak_kernel_and_legacy_leave_the_epoch_open() {
    for policy in [Policy::Kernel, Policy::Legacy] {
        let r = run(Scenario::IntervalLeak, policy);
        let m = r.mirror.unwrap();
        assert!(r.interval_state.active > 0, "{policy:?}");
        assert_eq!(r.interval_state.seq % 2, 1, "{policy:?}: sequence odd");
        assert!(m.read_begin.timed_out(), "{policy:?}");
        assert!(m.fault.is_hung(), "{policy:?}");
        assert!(m.remove_would_wait, "{policy:?}");
        assert!(r
            .violations
            .iter()
            .any(|v| matches!(v, Violation::EpochOpen { .. })));
    }
}

/// Interval leak under Exact (I5, I25): the refused start closes the epoch; read_begin and the
/// fault complete; the sequence is even and nothing is active.
#[test]
fn interval_leak_exact_closes_the_epoch() {
    let r = run(Scenario::IntervalLeak, Policy::Exact);
    let m = r.mirror.unwrap();
    assert_eq!(r.interval_state.active, 0);
    assert_eq!(r.interval_state.seq % 2, 0);
    assert!(!m.read_begin.timed_out());
    assert!(m.fault.is_mapped());
    assert!(!m.remove_would_wait);
    assert!(
        sub(&r, "hmm").counts.interval_invalidations > 0,
        "the mirror was invalidated"
    );
    assert!(r.is_coherent(), "{:?}", r.violations);
}

/// Coherence: every step leaves every mirror in agreement with the primary, under every
/// policy; and before each step (but exit's aftermath) the mirrors really held entries.
#[test]
fn coherence_holds_under_every_policy() {
    for policy in POLICIES {
        let r = run(Scenario::Coherence, policy);
        let names: Vec<&str> = r.steps.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "munmap",
                "mprotect",
                "fork",
                "cow-fault",
                "child-exit",
                "mremap",
                "migrate",
                "migrate-device",
                "reclaim",
                "madvise",
                "map-fixed",
                "zero-page-write",
                "madvise-hole",
                "mprotect-hole",
                "exit"
            ]
        );
        for step in &r.steps {
            assert!(
                step.violations.is_empty(),
                "{policy:?} {}: {:?}",
                step.name,
                step.violations
            );
            for (mirror, entries) in &step.mirrored_before {
                assert!(
                    *entries > 0,
                    "{policy:?} {}: {mirror} mirrored nothing",
                    step.name
                );
            }
        }
        assert!(r.is_coherent());
        for s in &r.subscribers {
            assert_eq!(s.counts.refusals, 0, "{}", s.name);
        }
    }
}

/// The trace records starts, refusals and ends with monotonic timestamps; under Legacy the
/// seed's KVM starts have no End, under Exact every Start has one.
#[test]
fn trace_records_the_pairing() {
    let count = |r: &ScenarioReport, name: &str, kind: TraceKind| {
        r.trace
            .iter()
            .filter(|e| e.subscriber == name && e.kind == kind)
            .count()
    };
    let legacy = run(Scenario::Seed, Policy::Legacy);
    assert!(count(&legacy, "kvm", TraceKind::Start) > 0);
    assert_eq!(count(&legacy, "kvm", TraceKind::End), 0);
    assert!(count(&legacy, "nouveau", TraceKind::Refused) > 0);
    let exact = run(Scenario::Seed, Policy::Exact);
    assert_eq!(
        count(&exact, "kvm", TraceKind::Start),
        count(&exact, "kvm", TraceKind::End)
    );
    for r in [&legacy, &exact] {
        assert!(r.trace.windows(2).all(|w| w[0].ts_us <= w[1].ts_us));
        // The seed's only starts come from the OOM reaper: non-blockable Unmaps.
        let kvm_starts: Vec<_> = r
            .trace
            .iter()
            .filter(|e| e.subscriber == "kvm" && e.kind == TraceKind::Start)
            .collect();
        assert!(kvm_starts
            .iter()
            .all(|e| !e.blockable && e.event == Some(mmnotify::Event::Unmap)));
    }
    let leak = run(Scenario::IntervalLeak, Policy::Kernel);
    assert!(count(&leak, "hmm", TraceKind::IntervalInvalidate) > 0);
}

/// Scenario names round-trip; ALL lists each once.
#[test]
fn scenario_names_round_trip() {
    for s in Scenario::ALL {
        assert_eq!(s.name().parse::<Scenario>().unwrap(), s);
    }
    assert!("nope".parse::<Scenario>().is_err());
}
