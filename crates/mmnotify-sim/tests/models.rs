//! The reference secondary MMUs behave like their kernel originals, and the oracle catches a
//! mirror that does not (so that "coherent" in the scenarios means something).

// Tests may use std::sync directly (the workspace ban is for crate sources).
#![allow(clippy::disallowed_types)]

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mmnotify::{Event, Owner, Policy, Range};
use mmnotify_sim::{
    oracle, Access, FaultOutcome, GruLike, KvmLike, NouveauLike, SecondaryMmu, ShadowEntry, SimMm,
    Violation, WaitOutcome, PAGE_SIZE,
};

const P: u64 = PAGE_SIZE;
const SHORT: Duration = Duration::from_millis(50);
const GENEROUS: Duration = Duration::from_secs(10);

fn range(start: u64, end: u64) -> Range {
    Range::new(start, end).unwrap()
}

/// A mirror that copies the primary once and never listens to invalidations.
#[derive(Debug, Default)]
struct Deaf(Mutex<Vec<(u64, ShadowEntry)>>);

impl Deaf {
    fn snapshot(&self, sim: &SimMm) {
        *self.0.lock().unwrap() = sim
            .page_table()
            .iter()
            .map(|(vpn, pte)| (*vpn, ShadowEntry::from_pte(pte)))
            .collect();
    }
}

impl SecondaryMmu for Deaf {
    fn name(&self) -> &str {
        "deaf"
    }
    fn entries(&self) -> Vec<(u64, ShadowEntry)> {
        self.0.lock().unwrap().clone()
    }
    fn hangs(&self) -> Vec<mmnotify_sim::Hang> {
        Vec::new()
    }
}

/// The oracle reports a stale entry for an unmapped page, a wrong frame after a COW copy and a
/// writable entry over a write-protected page; each violation is one sentence.
#[test]
fn oracle_catches_a_mirror_that_ignores_invalidations() {
    let sim = SimMm::new(Policy::Exact);
    let a = sim.mmap_anon(4 * P).unwrap();
    sim.task("t").touch(a, 4 * P, Access::Write).unwrap();
    let deaf = Deaf::default();
    deaf.snapshot(&sim);
    assert!(oracle::check(&sim, &[&deaf]).is_empty());

    sim.munmap(a + 3 * P, P).unwrap();
    let v = oracle::check(&sim, &[&deaf]);
    assert!(
        matches!(
            v.as_slice(),
            [Violation::StaleMapping { primary: None, .. }]
        ),
        "{v:?}"
    );
    assert!(
        v[0].to_string().ends_with("does not map that page."),
        "{}",
        v[0]
    );

    deaf.snapshot(&sim);
    let child = sim.fork().unwrap();
    let v = oracle::check(&sim, &[&deaf]);
    assert_eq!(
        v.len(),
        3,
        "three writable entries over write-protected pages: {v:?}"
    );
    assert!(v
        .iter()
        .all(|v| matches!(v, Violation::WritableOverReadOnly { .. })));

    sim.task("t").write(a).unwrap();
    let v = oracle::check(&sim, &[&deaf]);
    assert!(
        v.iter().any(|v| matches!(
            v,
            Violation::StaleMapping {
                primary: Some(_),
                ..
            }
        )),
        "{v:?}"
    );
    child.exit().unwrap();
}

/// KVM: concurrent invalidations track the union of their ranges, reset when in_progress
/// returns to 0 (I7); a fault on a covered page inside a window retries, and maps after it.
#[test]
fn kvm_tracks_the_union_and_faults_retry_inside_a_window() {
    let sim = SimMm::new(Policy::Exact);
    let kvm = KvmLike::attach(&sim, "kvm", SHORT).unwrap();
    let a = sim.mmap_anon(8 * P).unwrap();
    sim.task("t").touch(a, 8 * P, Access::Write).unwrap();
    assert!(kvm
        .fault(&sim, a + 5 * P, Access::Read)
        .unwrap()
        .is_mapped());

    let g1 = sim
        .mm()
        .invalidate_start(range(a, a + P), Event::Clear)
        .unwrap();
    let g2 = sim
        .mm()
        .invalidate_start(range(a + 4 * P, a + 6 * P), Event::Clear)
        .unwrap();
    assert_eq!(kvm.in_progress(), 2);
    assert_eq!(kvm.invalidate_range(), Some(range(a, a + 6 * P)));
    assert!(kvm.spte(a + 5 * P).is_none(), "zapped at start");
    assert_eq!(
        kvm.fault(&sim, a + 2 * P, Access::Read).unwrap(),
        FaultOutcome::Retry,
        "inside the union"
    );
    assert!(
        kvm.update_memslots().timed_out(),
        "a memslot update waits for the window"
    );
    g1.end();
    g2.end();
    assert_eq!(kvm.in_progress(), 0);
    assert_eq!(kvm.invalidate_range(), None);
    assert_eq!(kvm.seq(), 2);
    assert!(kvm
        .fault(&sim, a + 2 * P, Access::Read)
        .unwrap()
        .is_mapped());
    assert_eq!(kvm.update_memslots(), WaitOutcome::Ok);
    assert_eq!(
        kvm.hangs().len(),
        1,
        "the bounded memslot wait inside the window ran out"
    );
}

/// KVM's young callback reports and clears the accessed bits of its SPTEs (I19).
#[test]
fn kvm_young_bits_are_tested_and_cleared() {
    let sim = SimMm::new(Policy::Exact);
    let kvm = KvmLike::attach(&sim, "kvm", SHORT).unwrap();
    let a = sim.mmap_anon(P).unwrap();
    kvm.fault_retrying(&sim, a, Access::Read).unwrap();
    assert!(sim.mm().test_young(a));
    assert!(sim.mm().clear_flush_young(range(a, a + P)));
    assert!(!sim.mm().clear_flush_young(range(a, a + P)));
    assert!(kvm.guest_access(a));
    assert!(sim.mm().clear_flush_young(range(a, a + P)));
}

/// GRU: a fault inside a window waits; bounded, it reports a hang; a fault that waits while
/// another thread ends the window is woken and maps the page.
#[test]
fn gru_faults_wait_for_range_active_zero() {
    let sim = Arc::new(SimMm::new(Policy::Exact));
    let gru = GruLike::attach(&sim, "gru", SHORT).unwrap();
    let patient = GruLike::attach(&sim, "patient-gru", GENEROUS).unwrap();
    let a = sim.mmap_anon(P).unwrap();
    sim.task("t").touch(a, P, Access::Write).unwrap();

    let guard = sim
        .mm()
        .invalidate_start(range(a, a + P), Event::Clear)
        .unwrap();
    assert_eq!(gru.range_active(), 1);
    assert!(gru.fault(&sim, a, Access::Read).unwrap().is_hung());
    assert_eq!(gru.hangs().len(), 1);
    guard.end();
    assert!(gru.fault(&sim, a, Access::Read).unwrap().is_mapped());

    // A window held by another thread, ended only after the fault has started waiting.
    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let holder = {
        let sim = Arc::clone(&sim);
        std::thread::spawn(move || {
            let guard = sim
                .mm()
                .invalidate_start(range(a, a + P), Event::Clear)
                .unwrap();
            started_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            guard.end();
        })
    };
    started_rx.recv().unwrap();
    assert_eq!(patient.range_active(), 1);
    let faulter = {
        let sim = Arc::clone(&sim);
        let patient = Arc::clone(&patient);
        std::thread::spawn(move || patient.fault(&sim, a, Access::Read).unwrap())
    };
    go_tx.send(()).unwrap();
    holder.join().unwrap();
    assert!(faulter.join().unwrap().is_mapped());
    assert!(patient.hangs().is_empty());
    assert_eq!(patient.range_active(), 0);
}

/// nouveau: the classic start refuses non-blockable ranges and has no end; a device migration
/// it owns is skipped by the classic start, while the interval mirror still drops the pages.
#[test]
fn nouveau_refuses_nonblocking_and_skips_its_own_migrations() {
    let sim = SimMm::new(Policy::Exact);
    let nouveau = NouveauLike::attach(&sim, "nouveau", Owner(3), SHORT).unwrap();
    let a = sim.mmap_anon(4 * P).unwrap();
    nouveau.mirror_region(&sim, a, 4 * P).unwrap();
    sim.task("t").touch(a, 4 * P, Access::Write).unwrap();
    for i in 0..4 {
        assert!(nouveau
            .fault(&sim, a + i * P, Access::Read)
            .unwrap()
            .is_mapped());
    }
    assert!(matches!(
        nouveau.fault(&sim, a + 8 * P, Access::Read),
        Err(mmnotify_sim::SimError::NotMirrored { .. })
    ));
    let refused = sim
        .mm()
        .invalidate_start_nonblock(range(a, a + P), Event::Unmap);
    assert!(refused.is_err());
    sim.migrate(a, 2 * P, Some(Owner(3))).unwrap();
    let counts = sim
        .subscribers()
        .into_iter()
        .find(|s| s.name == "nouveau")
        .unwrap()
        .counts;
    assert_eq!((counts.refusals, counts.starts, counts.ends), (1, 1, 0));
    assert_eq!(
        nouveau.entries().len(),
        2,
        "the interval mirror dropped the migrated pages"
    );
    assert!(oracle::check(&sim, &[&*nouveau]).is_empty());
}
