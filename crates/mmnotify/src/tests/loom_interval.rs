//! Loom models of the interval protocol (issue "Core engine II"): the collision-retry
//! protocol against a concurrent invalidation, inserts during an epoch, removal racing with a
//! running callback, `remove_deferred` from a callback, and a classic refusal after interval
//! success under Exact.
//!
//! The interval subscriber follows the documented protocol: its callback takes the user lock
//! (a loom `Mutex`), calls `ctx.set_seq()` and drops the mirror under it; the fault path
//! commits under the same lock only if `read_retry` says no collision happened.

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::sync::Mutex;
use loom::thread;

use super::loom_util::{model, range, wait_for, Seen};
use crate::{
    Capabilities, Error, Event, IntervalCtx, IntervalHandle, IntervalSubscriber, Invalidate,
    Invalidation, Mm, Range, Refused, Refuser, Subscriber,
};

/// The secondary copy of one primary value.
#[derive(Debug, Default)]
struct Mirror {
    valid: bool,
    version: usize,
}

/// An interval subscriber with a user lock around its mirror.
struct MirrorSub {
    mirror: Mutex<Mirror>,
    /// `invalidate` calls so far.
    calls: AtomicUsize,
    /// `invalidate` calls running right now.
    in_callback: AtomicUsize,
    /// Set by the model once `remove_interval` returned: no callback may run afterwards (I31).
    removed: AtomicBool,
    /// Whether the callback removes its own interval with `remove_deferred`.
    remove_itself: bool,
}

impl MirrorSub {
    fn new(remove_itself: bool) -> Arc<Self> {
        Arc::new(MirrorSub {
            mirror: Mutex::new(Mirror::default()),
            calls: AtomicUsize::new(0),
            in_callback: AtomicUsize::new(0),
            removed: AtomicBool::new(false),
            remove_itself,
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }
}

impl IntervalSubscriber for MirrorSub {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _: &Invalidation) -> Invalidate {
        assert!(
            !self.removed.load(SeqCst),
            "an interval callback started after remove returned (I31)"
        );
        self.in_callback.fetch_add(1, SeqCst);
        self.calls.fetch_add(1, SeqCst);
        {
            let mut mirror = self.mirror.lock().unwrap();
            ctx.set_seq();
            mirror.valid = false;
        }
        if self.remove_itself {
            ctx.remove_deferred();
        }
        self.in_callback.fetch_sub(1, SeqCst);
        Invalidate::Done
    }
}

/// Inserts `[0x1000, 0x1fff]` with `sub` on `mm`.
fn insert(mm: &Mm, sub: &Arc<MirrorSub>) -> IntervalHandle {
    mm.insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), sub.clone())
        .unwrap()
}

/// The fault path: at most two attempts of read_begin, read the primary, lock, read_retry,
/// commit.
fn fault(handle: &IntervalHandle, sub: &MirrorSub, primary: &AtomicUsize) {
    for _ in 0..2 {
        let seq = handle.read_begin().unwrap();
        let version = primary.load(SeqCst);
        let mut mirror = sub.mirror.lock().unwrap();
        if !handle.read_retry(seq) {
            mirror.valid = true;
            mirror.version = version;
            return;
        }
    }
}

/// I29, I30: a fault (read_begin, read the primary, read_retry under the user lock, commit)
/// racing with a blockable invalidation that changes the primary inside its window. The mirror
/// never ends up holding a stale version: if it is valid at the end, it holds the final one.
#[test]
fn loom_read_retry_never_commits_stale() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = MirrorSub::new(false);
        let handle = insert(&mm, &sub);
        let primary = Arc::new(AtomicUsize::new(0));

        let invalidator = {
            let mm = mm.clone();
            let primary = primary.clone();
            thread::spawn(move || {
                let guard = mm
                    .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap();
                primary.fetch_add(1, SeqCst);
                guard.end();
            })
        };

        fault(&handle, &sub, &primary);
        invalidator.join().unwrap();

        assert_eq!(sub.calls(), 1, "I23: one invalidate per overlapping range");
        let mirror = sub.mirror.lock().unwrap();
        if mirror.valid {
            assert_eq!(
                mirror.version,
                primary.load(SeqCst),
                "I30: a stale primary version was committed"
            );
        }
        record.record(if mirror.valid {
            "mirror valid"
        } else {
            "mirror invalidated"
        });
        let state = mm.interval_state();
        assert_eq!((state.seq % 2, state.active), (0, 0), "I26: idle again");
    });
    seen.assert_all(&["mirror valid", "mirror invalidated"]);
}

/// I27, I28: thread A holds a guard over `window` while thread B inserts a new interval over
/// `[0x1800, 0x27ff]` and then calls `read_begin` on it. The existing interval covers
/// `[0x1000, 0x1fff]`.
///
/// * If A's window overlaps the existing interval, an epoch is open: the insert is deferred
///   (the index does not change while S is odd) and applied when the epoch closes.
/// * If it does not, A is in flight without an epoch: the insert goes into the index at once,
///   but makes S odd, because A may cover the new interval without having seen it.
///
/// Either way, B's first `read_begin` returns only after A's invalidation ended, and A's
/// window, which began before the insert, never calls the new interval.
fn insert_while_in_flight(window: Range, epoch_open: bool) {
    model(move || {
        let mm = Mm::new();
        let existing = MirrorSub::new(false);
        let _existing = insert(&mm, &existing);
        // 0: not started; 1: guard held; 2: B inserted; 3: A's end returned.
        let step = Arc::new(AtomicUsize::new(0));

        let holder = {
            let mm = mm.clone();
            let step = step.clone();
            thread::spawn(move || {
                let guard = mm.invalidate_start(window, Event::Unmap).unwrap();
                step.store(1, SeqCst);
                wait_for(&step, 2);
                guard.end();
                step.store(3, SeqCst);
            })
        };

        wait_for(&step, 1);
        let fresh = MirrorSub::new(false);
        let handle = mm
            .insert_interval(Range::from_len(0x1800, 0x1000).unwrap(), fresh.clone())
            .unwrap();
        let during = mm.interval_state();
        assert_eq!(during.active, 1);
        assert_eq!(
            during.seq % 2,
            1,
            "I26/I28: S is odd while the new interval may be missed"
        );
        let expected = if epoch_open { (1, 1) } else { (2, 0) };
        assert_eq!(
            (during.indexed, during.deferred),
            expected,
            "I27: the insert is deferred exactly while an epoch is open"
        );
        step.store(2, SeqCst);

        let _seq = handle.read_begin().unwrap();
        let after = mm.interval_state();
        assert_eq!(
            after.active, 0,
            "I28: read_begin returned before the in-flight end"
        );
        assert_eq!(
            after.seq % 2,
            0,
            "I26/I29: read_begin returned with the epoch open"
        );
        assert_eq!(
            (after.indexed, after.deferred),
            (2, 0),
            "I27: applied at close"
        );

        holder.join().unwrap();
        assert_eq!(step.load(SeqCst), 3);
        assert_eq!(
            fresh.calls(),
            0,
            "I28: the window that was open never calls it"
        );
        assert_eq!(existing.calls(), usize::from(epoch_open));
    });
}

/// I27, I28: insert during an epoch (A's window overlaps an existing interval).
#[test]
fn loom_insert_during_epoch_waits_for_end() {
    insert_while_in_flight(range(0x1000, 0x2000), true);
}

/// I28: insert while a non-overlapping invalidation is in flight (no epoch yet).
#[test]
fn loom_insert_while_in_flight_waits_for_end() {
    insert_while_in_flight(range(0x8000, 0x9000), false);
}

/// I31: `remove_interval` racing with a window whose callback calls the interval. When
/// `remove` returns, no callback of the interval is running (checked right after it returns)
/// and none starts afterwards (checked inside the callback); removing again is
/// `IntervalNotInserted`.
#[test]
fn loom_remove_waits_for_running_callback() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = MirrorSub::new(false);
        let handle = insert(&mm, &sub);

        let window = {
            let mm = mm.clone();
            thread::spawn(move || {
                let guard = mm
                    .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap();
                guard.end();
            })
        };

        mm.remove_interval(&handle).unwrap();
        assert_eq!(
            sub.in_callback.load(SeqCst),
            0,
            "I31: remove returned while a callback ran"
        );
        sub.removed.store(true, SeqCst);

        window.join().unwrap();
        assert!(sub.calls() <= 1);
        record.record(if sub.calls() == 1 {
            "called"
        } else {
            "removed first"
        });
        assert!(matches!(
            mm.remove_interval(&handle),
            Err(Error::IntervalNotInserted { .. })
        ));
        assert_eq!(mm.interval_state().indexed, 0);
    });
    seen.assert_all(&["called", "removed first"]);
}

/// I27, I31: a callback removes its own interval with `remove_deferred` while a second,
/// overlapping window runs concurrently. Once both windows ended the interval is gone from the
/// index, a later invalidation does not call it, and removing it again is
/// `IntervalNotInserted`.
#[test]
fn loom_remove_deferred_from_callback() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = MirrorSub::new(true);
        let handle = insert(&mm, &sub);

        let window = {
            let mm = mm.clone();
            thread::spawn(move || {
                let guard = mm
                    .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap();
                guard.end();
            })
        };
        let guard = mm
            .invalidate_start(range(0x1800, 0x1900), Event::Clear)
            .unwrap();
        guard.end();
        window.join().unwrap();

        let calls = sub.calls();
        assert!((1..=2).contains(&calls), "I23: the first window calls it");
        record.record(if calls == 2 {
            "same epoch"
        } else {
            "separate epochs"
        });
        let state = mm.interval_state();
        assert_eq!(
            (state.seq % 2, state.active, state.indexed, state.deferred),
            (0, 0, 0, 0),
            "I27/I31: the deferred removal was applied when the epoch closed"
        );
        mm.invalidate_start(range(0x1000, 0x2000), Event::Unmap)
            .unwrap()
            .end();
        assert_eq!(sub.calls(), calls, "I31: a removed interval is not called");
        assert!(matches!(
            mm.remove_interval(&handle),
            Err(Error::IntervalNotInserted { .. })
        ));
    });
    seen.assert_all(&["same epoch", "separate epochs"]);
}

/// A classic subscriber that refuses every non-blocking start; it declares `may_refuse` and
/// an end, which Exact allows.
struct ClassicRefuser {
    ends: AtomicUsize,
}

impl Subscriber for ClassicRefuser {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end().may_refuse()
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        if inv.is_blockable() {
            Ok(())
        } else {
            Err(Refused)
        }
    }

    fn invalidate_range_end(&self, _: &Invalidation) {
        self.ends.fetch_add(1, SeqCst);
    }
}

/// I5, I25 (P1): under Exact, a non-blocking start whose interval callback succeeded and whose
/// classic start is then refused closes the epoch: a concurrent fault on the hit interval
/// (`read_begin`, lock, `read_retry`) returns instead of hanging, and at the end the sequence
/// is even and nothing is in flight; the refuser gets no end.
#[test]
fn loom_classic_refusal_after_interval_closes_epoch() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = MirrorSub::new(false);
        let handle = insert(&mm, &sub);
        let refuser = Arc::new(ClassicRefuser {
            ends: AtomicUsize::new(0),
        });
        let refuser_id = mm.register(refuser.clone()).unwrap();

        let oom = {
            let mm = mm.clone();
            thread::spawn(move || {
                match mm.invalidate_start_nonblock(range(0x1000, 0x2000), Event::Unmap) {
                    Err(Error::StartRefused { refusers, .. }) => {
                        assert_eq!(refusers, vec![Refuser::Classic(refuser_id)]);
                    }
                    Err(other) => panic!("unexpected error {other:?}"),
                    Ok(_) => panic!("a refused non-blocking start returned a guard (I5)"),
                }
            })
        };

        // Loom reports a deadlock if this waits for an epoch that never closes.
        let primary = AtomicUsize::new(7);
        fault(&handle, &sub, &primary);
        oom.join().unwrap();

        let state = mm.interval_state();
        assert_eq!(state.seq % 2, 0, "I25/I26: the epoch was closed");
        assert_eq!(state.active, 0, "I25: the active count was given back");
        assert_eq!(sub.calls(), 1);
        assert_eq!(refuser.ends.load(SeqCst), 0, "I5: no end to the refuser");
        record.record(if sub.mirror.lock().unwrap().valid {
            "fault after the refused start"
        } else {
            "fault before the refused start"
        });
    });
    seen.assert_all(&[
        "fault after the refused start",
        "fault before the refused start",
    ]);
}

/// An interval subscriber that refuses every non-blockable range (it would have to sleep).
struct IntervalRefuser {
    calls: AtomicUsize,
}

impl IntervalSubscriber for IntervalRefuser {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        self.calls.fetch_add(1, SeqCst);
        if inv.is_blockable() {
            ctx.set_seq();
            Invalidate::Done
        } else {
            Invalidate::Refused
        }
    }
}

/// I24, I25: a non-blocking start whose first interval callback succeeded (and tagged its
/// interval with the epoch) and whose second interval refuses. The start fails naming the
/// refusing interval, calls no classic start, and closes the epoch: a concurrent fault on the
/// tagged interval returns instead of hanging, and at the end the sequence is even with
/// nothing in flight.
#[test]
fn loom_interval_refusal_closes_epoch() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = MirrorSub::new(false);
        let handle = insert(&mm, &sub);
        let refusing = Arc::new(IntervalRefuser {
            calls: AtomicUsize::new(0),
        });
        let refusing_id = mm
            .insert_interval(Range::from_len(0x1800, 0x1000).unwrap(), refusing.clone())
            .unwrap()
            .id();
        let classic = Arc::new(ClassicRefuser {
            ends: AtomicUsize::new(0),
        });
        let classic_id = mm.register(classic.clone()).unwrap();

        let oom = {
            let mm = mm.clone();
            thread::spawn(move || {
                match mm.invalidate_start_nonblock(range(0x1000, 0x2000), Event::Unmap) {
                    Err(Error::StartRefused { refusers, .. }) => {
                        assert_eq!(refusers, vec![Refuser::Interval(refusing_id)], "I24");
                    }
                    Err(other) => panic!("unexpected error {other:?}"),
                    Ok(_) => panic!("a refused non-blocking start returned a guard (I24)"),
                }
            })
        };

        // Loom reports a deadlock if this waits for an epoch that never closes.
        let primary = AtomicUsize::new(7);
        fault(&handle, &sub, &primary);
        oom.join().unwrap();

        let state = mm.interval_state();
        assert_eq!(state.seq % 2, 0, "I24/I26: the epoch was closed");
        assert_eq!(state.active, 0, "I25: the active count was given back");
        assert_eq!((sub.calls(), refusing.calls.load(SeqCst)), (1, 1));
        let stats = mm.subscriber_stats(classic_id).unwrap();
        assert_eq!(
            (stats.starts, stats.refusals, stats.ends),
            (0, 0, 0),
            "I24: no classic start after an interval refusal"
        );
        record.record(if sub.mirror.lock().unwrap().valid {
            "fault after the refused start"
        } else {
            "fault before the refused start"
        });
    });
    seen.assert_all(&[
        "fault after the refused start",
        "fault before the refused start",
    ]);
}

/// I28, I30: the first inserts on an address space race with an invalidation that began before
/// any interval existed (so it did not count itself in the interval state). Thread W runs that
/// invalidation and changes the primary inside it; thread T inserts an unrelated interval
/// first; the main thread inserts the overlapping one and faults it in. Every inserter that
/// cannot rely on such invalidations having ended waits for them, not only the one that made
/// the state present, so the mirror never commits a stale version.
#[test]
fn loom_concurrent_first_inserts_never_commit_stale() {
    model(move || {
        let mm = Mm::new();
        let primary = Arc::new(AtomicUsize::new(0));
        let invalidator = {
            let mm = mm.clone();
            let primary = primary.clone();
            thread::spawn(move || {
                let guard = mm
                    .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap();
                primary.fetch_add(1, SeqCst);
                guard.end();
            })
        };
        let other_inserter = {
            let mm = mm.clone();
            thread::spawn(move || {
                let unrelated = MirrorSub::new(false);
                mm.insert_interval(Range::from_len(0x8000, 0x1000).unwrap(), unrelated)
                    .unwrap();
            })
        };

        let sub = MirrorSub::new(false);
        let handle = insert(&mm, &sub);
        fault(&handle, &sub, &primary);
        invalidator.join().unwrap();
        other_inserter.join().unwrap();

        let mirror = sub.mirror.lock().unwrap();
        if mirror.valid {
            assert_eq!(
                mirror.version,
                primary.load(SeqCst),
                "I28: a stale primary version was committed"
            );
        }
    });
}

/// Checks the end of a fault-versus-invalidation model: a valid mirror holds the final primary
/// version, and the protocol is idle again. Returns the outcome to record.
fn check_mirror(mm: &Mm, sub: &MirrorSub, primary: &AtomicUsize, what: &str) -> &'static str {
    let mirror = sub.mirror.lock().unwrap();
    if mirror.valid {
        assert_eq!(
            mirror.version,
            primary.load(SeqCst),
            "{what}: a stale primary version was committed"
        );
    }
    let state = mm.interval_state();
    assert_eq!(
        (state.seq % 2, state.active),
        (0, 0),
        "I26: idle again (an epoch left open would also hang read_begin)"
    );
    if mirror.valid {
        "mirror valid"
    } else {
        "mirror invalidated"
    }
}

/// Issue 11 item 5, I29/I30 for the lock-free `read_begin` (two Acquire loads, `s_i` then `S`;
/// the lock only when they are equal). The interval carries the tag of a closed epoch
/// (`s_i = 3`, `S = 4`) when an invalidation that changes the primary races with a fault:
/// the fault's `read_begin` may run before the epoch opens, after it opened but before it
/// tagged the interval, after the tag (it must then wait for the close) or after the close
/// (it must then see the new primary). A commit never survives the invalidation.
///
/// Shown to fail (loom reports the stale commit) against three broken copies of
/// `Itree::read_begin`, each run once: loading `S` before `s_i` (a fresh tag paired with a
/// stale, even S); loading `s_i` with `Relaxed` (no happens-before to the epoch's `S` store);
/// loading `S` with `Relaxed` (a close seen without the primary change it follows).
#[test]
fn loom_lockfree_read_begin_never_commits_stale() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = MirrorSub::new(false);
        let handle = insert(&mm, &sub);
        mm.invalidate_start(range(0x1000, 0x2000), Event::Unmap)
            .unwrap()
            .end();
        assert_eq!(
            handle.read_begin().unwrap().value(),
            3,
            "s_i from a closed epoch"
        );
        let primary = Arc::new(AtomicUsize::new(0));

        let invalidator = {
            let mm = mm.clone();
            let primary = primary.clone();
            thread::spawn(move || {
                let guard = mm
                    .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap();
                primary.fetch_add(1, SeqCst);
                guard.end();
            })
        };

        fault(&handle, &sub, &primary);
        invalidator.join().unwrap();

        assert_eq!(sub.calls(), 2, "I23: one invalidate per overlapping range");
        record.record(check_mirror(&mm, &sub, &primary, "I30"));
    });
    seen.assert_all(&["mirror valid", "mirror invalidated"]);
}

/// Issue 11 item 5, I28 for the begin that skips the interval lock. An interval exists in
/// occupancy bucket 0 (so invalidations count themselves); thread W invalidates a range in
/// bucket 1 (`[1 GiB, 1 GiB + 4 KiB)`) and changes the primary inside it, while the main
/// thread inserts an interval over that very range and faults it in. When W's begin found
/// bucket 1 empty it skipped the lock and never calls the new interval; the insert must then
/// see W in flight and make the interval's first `read_begin` wait for W's end, and W's end,
/// which takes no lock unless it closes an epoch, must close the epoch the insert opened
/// (else `read_begin` sleeps forever and loom reports the deadlock).
///
/// Shown to fail against four broken copies of `Itree`, each run once: an insert that ignores
/// `A` (stale commit); an insert without the fence before its load of `A` (stale commit); a
/// begin without the `SeqCst` order between its increment and its filter load (stale commit);
/// an insert that does not close the epoch it opened after seeing every range end (loom
/// reports the deadlock of the `read_begin` that sleeps forever).
#[test]
fn loom_skipped_begin_never_misses_a_concurrent_insert() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let existing = MirrorSub::new(false);
        let _existing = insert(&mm, &existing);
        let far = range(1 << 30, (1 << 30) + 0x1000);
        let primary = Arc::new(AtomicUsize::new(0));

        let invalidator = {
            let mm = mm.clone();
            let primary = primary.clone();
            thread::spawn(move || {
                let guard = mm.invalidate_start(far, Event::Unmap).unwrap();
                primary.fetch_add(1, SeqCst);
                guard.end();
            })
        };

        let fresh = MirrorSub::new(false);
        let handle = mm.insert_interval(far, fresh.clone()).unwrap();
        fault(&handle, &fresh, &primary);
        invalidator.join().unwrap();

        assert_eq!(existing.calls(), 0, "the far range never overlaps it");
        record.record(if fresh.calls() == 0 {
            "window skipped the new interval"
        } else {
            "window called the new interval"
        });
        record.record(check_mirror(&mm, &fresh, &primary, "I28"));
    });
    seen.assert_all(&[
        "window skipped the new interval",
        "window called the new interval",
        "mirror valid",
    ]);
}

/// Issue 11 item 5, I29/I30 for the node's `closed_tag` (a tag whose epoch a `read_begin` saw
/// closed, so that the next `read_begin` of the same tag reads nothing outside the node).
/// Thread W runs an invalidation of the interval that changes the primary; thread R calls
/// `read_begin` (it may see the epoch closed and record the tag); the main thread faults the
/// interval in concurrently, so its `read_begin` may return through R's record without ever
/// loading S. A commit never survives W's change: R's Release hands the close on.
///
/// Shown to fail (stale commit) against a broken copy of `Itree::read_begin` that stores and
/// loads `closed_tag` with `Relaxed`, run once.
#[test]
fn loom_closed_tag_hands_on_the_close() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = MirrorSub::new(false);
        let handle = insert(&mm, &sub);
        let primary = Arc::new(AtomicUsize::new(0));

        let invalidator = {
            let mm = mm.clone();
            let primary = primary.clone();
            thread::spawn(move || {
                let guard = mm
                    .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap();
                primary.fetch_add(1, SeqCst);
                guard.end();
            })
        };
        let other_reader = {
            let handle = handle.clone();
            thread::spawn(move || {
                let _ = handle.read_begin().unwrap();
            })
        };

        let seq = handle.read_begin().unwrap();
        let version = primary.load(SeqCst);
        {
            let mut mirror = sub.mirror.lock().unwrap();
            if !handle.read_retry(seq) {
                mirror.valid = true;
                mirror.version = version;
            }
        }
        invalidator.join().unwrap();
        other_reader.join().unwrap();
        record.record(check_mirror(&mm, &sub, &primary, "I30"));
    });
    seen.assert_all(&["mirror valid", "mirror invalidated"]);
}
