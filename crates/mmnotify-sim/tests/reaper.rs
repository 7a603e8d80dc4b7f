//! The OOM reaper and process_mrelease, as Linux runs them (reference §6): non-blocking Unmap
//! per anonymous or private VMA (I2), shared file VMAs skipped, refused VMAs neither unmapped
//! nor ended, ten attempts 100 ms apart on the reaper's clock, then "OOM skip".

// Tests may use std::sync directly (the workspace ban is for crate sources).
#![allow(clippy::disallowed_types)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{range, Recorder, Refuser};
use mmnotify::{Event, Policy};
use mmnotify_sim::{
    process_mrelease, Access, Backing, FileId, HmmMirror, OomReaper, Prot, Sharing, SimClock,
    SimError, SimMm, PAGE_SIZE,
};

const P: u64 = PAGE_SIZE;

struct Victim {
    sim: SimMm,
    anon: u64,
    shared_file: u64,
    private_file: u64,
}

fn victim(policy: Policy) -> Victim {
    let sim = SimMm::new(policy);
    let anon = sim.mmap_anon(4 * P).unwrap();
    let shared_file = sim
        .mmap(
            None,
            2 * P,
            Prot::READ_WRITE,
            Backing::File {
                file: FileId(1),
                offset: 0,
            },
            Sharing::Shared,
        )
        .unwrap();
    let private_file = sim
        .mmap(
            None,
            2 * P,
            Prot::READ_WRITE,
            Backing::File {
                file: FileId(2),
                offset: 0,
            },
            Sharing::Private,
        )
        .unwrap();
    let t = sim.task("victim");
    t.touch(anon, 4 * P, Access::Write).unwrap();
    t.touch(shared_file, 2 * P, Access::Write).unwrap();
    t.touch(private_file, 2 * P, Access::Read).unwrap();
    Victim {
        sim,
        anon,
        shared_file,
        private_file,
    }
}

/// Nobody refuses: one attempt reaps the anonymous and the private file VMA with non-blocking
/// Unmaps; the shared file VMA is left alone; the VMAs stay; the mm is marked OOM skip.
#[test]
fn reap_unmaps_anonymous_and_private_vmas_only() {
    let v = victim(Policy::Exact);
    let rec = Recorder::new();
    v.sim.register("rec", rec.clone()).unwrap();
    let clock = Arc::new(SimClock::new());
    let report = OomReaper::new(clock.clone()).reap(&v.sim);
    assert_eq!(report.attempts.len(), 1);
    assert!(report.succeeded && report.oom_skip && v.sim.oom_skip() && v.sim.is_unstable());
    assert_eq!(
        rec.starts(),
        vec![
            (Event::Unmap, range(v.anon, v.anon + 4 * P), false),
            (
                Event::Unmap,
                range(v.private_file, v.private_file + 2 * P),
                false
            )
        ]
    );
    assert_eq!(rec.ends(), 2);
    assert!(v.sim.lookup(v.anon).is_none());
    assert!(v.sim.lookup(v.private_file).is_none());
    assert!(
        v.sim.lookup(v.shared_file).is_some(),
        "shared file pages are not reaped"
    );
    assert_eq!(v.sim.vmas().len(), 3, "the reaper unmaps pages, not VMAs");
    assert_eq!(
        clock_now(&clock),
        Duration::ZERO,
        "no pause after a successful attempt"
    );
}

fn clock_now(clock: &SimClock) -> Duration {
    mmnotify_sim::Clock::now(clock)
}

/// A refusing subscriber: every attempt is refused; ten attempts 100 ms apart in simulated
/// time; refused VMAs keep their pages; then OOM skip. Under Exact the subscriber started
/// before the refuser is ended each time (I5); under Legacy it never is (P3).
#[test]
fn refused_vmas_are_retried_then_skipped() {
    for policy in [Policy::Exact, Policy::Legacy] {
        let v = victim(policy);
        let rec = Recorder::new();
        v.sim.register("rec", rec.clone()).unwrap();
        v.sim.register("refuser", Arc::new(Refuser)).unwrap();
        let clock = Arc::new(SimClock::new());
        let report = OomReaper::new(clock.clone()).reap(&v.sim);
        assert_eq!(report.attempts.len(), 10);
        let times: Vec<Duration> = report.attempts.iter().map(|a| a.at).collect();
        let expected: Vec<Duration> = (0..10).map(|i| Duration::from_millis(100 * i)).collect();
        assert_eq!(times, expected);
        assert!(!report.succeeded && report.oom_skip);
        assert_eq!(report.refusals(), 20, "two eligible VMAs per attempt");
        assert_eq!(report.reaped(), 0);
        assert!(v.sim.lookup(v.anon).is_some() && v.sim.lookup(v.private_file).is_some());
        assert_eq!(rec.starts().len(), 20);
        let expected_ends = if policy == Policy::Exact { 20 } else { 0 };
        assert_eq!(rec.ends(), expected_ends, "{policy:?}");
    }
}

/// Attempts and pause are configurable; a real clock is not needed for it.
#[test]
fn attempts_and_interval_are_configurable() {
    let v = victim(Policy::Kernel);
    v.sim.register("refuser", Arc::new(Refuser)).unwrap();
    let clock = Arc::new(SimClock::new());
    let report = OomReaper::new(clock.clone())
        .attempts(3)
        .interval(Duration::from_millis(50))
        .reap(&v.sim);
    assert_eq!(report.attempts.len(), 3);
    assert_eq!(report.attempts[2].at, Duration::from_millis(100));
    assert_eq!(clock_now(&clock), Duration::from_millis(100));
    // Marked: a second reap does nothing.
    let again = OomReaper::new(clock).reap(&v.sim);
    assert!(again.attempts.is_empty());
}

/// process_mrelease answers TryAgain when a VMA was refused, and reaps when none is.
#[test]
fn process_mrelease_answers_try_again() {
    let v = victim(Policy::Exact);
    let id = v.sim.register("refuser", Arc::new(Refuser)).unwrap();
    assert_eq!(
        process_mrelease(&v.sim),
        Err(SimError::TryAgain {
            reaped: 0,
            refused: 2,
            eligible: 2
        })
    );
    assert!(v.sim.lookup(v.anon).is_some());
    v.sim.mm().unregister(id).unwrap();
    let pass = process_mrelease(&v.sim).unwrap();
    assert_eq!(pass.reaped.len(), 2);
    assert_eq!(
        pass.skipped,
        vec![range(v.shared_file, v.shared_file + 2 * P)]
    );
    assert!(v.sim.lookup(v.anon).is_none());
}

/// An HMM mirror whose lock is contended refuses the non-blocking interval callback; the
/// reaper skips the VMA (its pages stay); under Exact the epoch is closed again (I24).
#[test]
fn hmm_mirror_refuses_when_its_lock_is_contended() {
    let v = victim(Policy::Exact);
    let hmm = HmmMirror::attach(&v.sim, "hmm", v.anon, 4 * P, Duration::from_millis(100)).unwrap();
    hmm.fault(&v.sim, v.anon, Access::Read).unwrap();
    let held = hmm.lock_mirror();
    let err = process_mrelease(&v.sim).unwrap_err();
    assert!(
        matches!(err, SimError::TryAgain { refused: 1, .. }),
        "{err}"
    );
    drop(held);
    assert!(v.sim.lookup(v.anon).is_some());
    assert!(
        v.sim.lookup(v.private_file).is_none(),
        "the other VMA was reaped"
    );
    let state = v.sim.mm().interval_state();
    assert_eq!((state.active, state.seq % 2), (0, 0));
    let hmm_counts = v
        .sim
        .subscribers()
        .into_iter()
        .find(|s| s.name == "hmm")
        .unwrap()
        .counts;
    assert_eq!(hmm_counts.interval_refusals, 1);
}

/// A classic subscriber whose blockable start waits for a signal (so that the thread that
/// caused it keeps holding the mmap lock).
struct Blocker {
    entered: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    go: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl mmnotify::Subscriber for Blocker {
    fn capabilities(&self) -> mmnotify::Capabilities {
        mmnotify::Capabilities::new().with_start()
    }

    fn invalidate_range_start(
        &self,
        inv: &mmnotify::Invalidation,
    ) -> Result<(), mmnotify::Refused> {
        if inv.is_blockable() {
            if let Some(tx) = self.entered.lock().unwrap().take() {
                tx.send(()).unwrap();
                let rx = self.go.lock().unwrap().take().unwrap();
                rx.recv().unwrap();
            }
        }
        Ok(())
    }
}

/// While another thread holds the mmap lock (a COW fault blocked in a subscriber), the reaper's
/// try-lock fails: each attempt does nothing, and the mm is still marked OOM skip at the end.
#[test]
fn contended_mmap_lock_makes_attempts_fail() {
    let v = victim(Policy::Exact);
    let child = v.sim.fork().unwrap();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    v.sim
        .register(
            "blocker",
            Arc::new(Blocker {
                entered: std::sync::Mutex::new(Some(entered_tx)),
                go: std::sync::Mutex::new(Some(go_rx)),
            }),
        )
        .unwrap();
    let sim = Arc::new(v.sim);
    let faulter = {
        let sim = Arc::clone(&sim);
        let addr = v.anon;
        std::thread::spawn(move || sim.task("writer").write(addr).unwrap())
    };
    entered_rx.recv().unwrap();
    let report = OomReaper::new(Arc::new(SimClock::new()))
        .attempts(2)
        .reap(&sim);
    go_tx.send(()).unwrap();
    faulter.join().unwrap();
    assert_eq!(report.attempts.len(), 2);
    assert!(report.attempts.iter().all(|a| a.pass.is_none()));
    assert!(!report.succeeded && report.oom_skip);
    assert!(sim.lookup(v.anon).is_some(), "nothing was reaped");
    assert!(!sim.is_unstable(), "no pass started");
    child.exit().unwrap();
}
