//! Loom models of the classic-subscriber lifecycle (issue "Core engine I"): windows racing with
//! `unregister`, refusals racing with `unregister`, `put` to zero racing with a running
//! callback, and `Mm::release` racing with `unregister`, with a window and with `put`.
//!
//! Every model runs the real engine (`Mm`, the guard, the per-`Mm` SRCU, the registry) on
//! loom's locks and atomics; the subscribers record what they receive with loom atomics, so
//! the records are part of the explored state.

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::thread;

use super::loom_util::{model, range, Seen};
use crate::mm::ReleaseAfterPut;
use crate::{Capabilities, Error, Event, Invalidation, Mm, Refused, Refuser, Subscriber};

/// A classic subscriber that counts everything it receives.
struct Tracked {
    caps: Capabilities,
    /// Refuses every start (the models only use this with non-blocking starts).
    refuse: bool,
    starts: AtomicUsize,
    ends: AtomicUsize,
    releases: AtomicUsize,
    frees: AtomicUsize,
    /// Set by the model once an `unregister` of this subscriber returned: from then on no
    /// callback may run (I12).
    gone: AtomicBool,
}

impl Tracked {
    fn new(caps: Capabilities, refuse: bool) -> Arc<Self> {
        Arc::new(Tracked {
            caps,
            refuse,
            starts: AtomicUsize::new(0),
            ends: AtomicUsize::new(0),
            releases: AtomicUsize::new(0),
            frees: AtomicUsize::new(0),
            gone: AtomicBool::new(false),
        })
    }

    fn start_end() -> Arc<Self> {
        Tracked::new(Capabilities::new().with_start().with_end(), false)
    }

    fn starts(&self) -> usize {
        self.starts.load(SeqCst)
    }

    fn ends(&self) -> usize {
        self.ends.load(SeqCst)
    }

    fn releases(&self) -> usize {
        self.releases.load(SeqCst)
    }

    fn frees(&self) -> usize {
        self.frees.load(SeqCst)
    }
}

impl Subscriber for Tracked {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
        assert!(
            !self.gone.load(SeqCst),
            "a start reached a subscriber after its unregister returned (I12)"
        );
        if self.refuse {
            return Err(Refused);
        }
        self.starts.fetch_add(1, SeqCst);
        Ok(())
    }

    fn invalidate_range_end(&self, _: &Invalidation) {
        assert!(
            !self.gone.load(SeqCst),
            "an end was delivered after unregister returned (I12)"
        );
        let ends = self.ends.fetch_add(1, SeqCst) + 1;
        assert!(
            ends <= self.starts(),
            "an end without a matching successful start (I4)"
        );
    }

    fn release(&self) {
        self.releases.fetch_add(1, SeqCst);
    }

    fn free(&self) {
        // That no callback of it is still running needs no check here: every callback is
        // made through the registration whose last reference is being dropped. What the
        // engine itself must get right is the context (`free` must not sleep, and may run at
        // the end of somebody else's window) and that one subscriber has one registration.
        assert!(
            crate::in_nonblocking_context(),
            "free ran outside non-blocking context (I14, I18)"
        );
        let before = self.frees.fetch_add(1, SeqCst);
        assert_eq!(before, 0, "free ran twice for one subscriber (I14)");
    }
}

/// I4, I12: a blockable `start..end` window on a two-subscriber `Mm` racing with the
/// `unregister` of one of them. When `unregister` returns, every start it received has been
/// ended and no callback runs any more; `release` ran exactly once; the other subscriber gets
/// exactly one start and one end.
#[test]
fn loom_start_end_racing_unregister() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let target = Tracked::start_end();
        let other = Tracked::start_end();
        let id = mm.register(target.clone()).unwrap();
        mm.register(other.clone()).unwrap();

        let window = {
            let mm = mm.clone();
            thread::spawn(move || {
                let guard = mm
                    .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap();
                guard.end();
            })
        };

        mm.unregister(id).unwrap();
        // I12: the end owed to a start that reached it was delivered before unregister
        // returned, and release ran exactly once.
        assert_eq!(
            target.starts(),
            target.ends(),
            "unregister returned before the owed end"
        );
        assert_eq!(target.releases(), 1);
        target.gone.store(true, SeqCst);

        window.join().unwrap();
        assert!(target.starts() <= 1);
        assert_eq!(target.starts(), target.ends());
        assert_eq!(target.releases(), 1);
        assert_eq!((other.starts(), other.ends()), (1, 1));
        mm.synchronize().unwrap();
        assert_eq!(
            target.frees(),
            1,
            "the unregistered subscriber is freed exactly once"
        );
        assert_eq!(other.frees(), 0);
        record.record(if target.starts() == 1 {
            "started"
        } else {
            "missed"
        });
    });
    seen.assert_all(&["started", "missed"]);
}

/// I5 (with I4, I12, I21): three subscribers; the one at `refuser_at` declares `may_refuse`
/// and an end and refuses a non-blocking start, while another one (`victim`) is unregistered
/// concurrently. Under Exact: the refuser gets no end, the subscribers before it that started
/// get exactly one end, those after it get no start, and the error names only the refuser.
fn refusal_racing_unregister(refuser_at: usize, victim: usize) {
    assert_ne!(refuser_at, victim);
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let refusing_caps = Capabilities::new().with_start().with_end().may_refuse();
        let subs: Vec<Arc<Tracked>> = (0..3)
            .map(|i| {
                if i == refuser_at {
                    Tracked::new(refusing_caps, true)
                } else {
                    Tracked::start_end()
                }
            })
            .collect();
        let ids: Vec<_> = subs
            .iter()
            .map(|s| mm.register(s.clone()).unwrap())
            .collect();
        let refuser_id = ids[refuser_at];

        let window = {
            let mm = mm.clone();
            thread::spawn(move || {
                match mm.invalidate_start_nonblock(range(0x1000, 0x2000), Event::Unmap) {
                    Err(Error::StartRefused { refusers, .. }) => {
                        assert_eq!(
                            refusers,
                            vec![Refuser::Classic(refuser_id)],
                            "I5: the error names the refuser"
                        );
                    }
                    Err(other) => panic!("unexpected error {other:?}"),
                    Ok(_) => panic!("a refused non-blocking start returned a guard (I5)"),
                }
            })
        };

        mm.unregister(ids[victim]).unwrap();
        let victim_sub = &subs[victim];
        assert_eq!(
            victim_sub.starts(),
            victim_sub.ends(),
            "I12: owed end delivered before unregister returned"
        );
        victim_sub.gone.store(true, SeqCst);

        window.join().unwrap();
        let stats = mm.subscriber_stats(refuser_id).unwrap();
        assert_eq!(
            (stats.refusals, stats.ends, stats.violations),
            (1, 0, 0),
            "I5/I21: refuser counters"
        );
        for (i, sub) in subs.iter().enumerate() {
            if i == refuser_at {
                assert_eq!(
                    (sub.starts(), sub.ends()),
                    (0, 0),
                    "I5: no end to the refuser"
                );
            } else if i > refuser_at {
                assert_eq!(sub.starts(), 0, "I5: no classic start after the refusal");
                assert_eq!(sub.ends(), 0);
            } else {
                assert_eq!(
                    sub.starts(),
                    sub.ends(),
                    "I5: every started subscriber is ended exactly once"
                );
                if i != victim {
                    assert_eq!(sub.starts(), 1);
                }
            }
        }
        record.record(if subs[victim].starts() == 1 {
            "victim started"
        } else {
            "victim not started"
        });
    });
    let mut expected = vec!["victim not started"];
    if victim < refuser_at {
        expected.push("victim started");
    }
    seen.assert_all(&expected);
}

/// I5: the refuser is the first of three subscribers (the unregistered one comes after it).
#[test]
fn loom_refusal_first_racing_unregister() {
    refusal_racing_unregister(0, 1);
}

/// I5: the refuser is in the middle (the unregistered one was started before it).
#[test]
fn loom_refusal_middle_racing_unregister() {
    refusal_racing_unregister(1, 0);
}

/// I5: the refuser is the last of three subscribers.
#[test]
fn loom_refusal_last_racing_unregister() {
    refusal_racing_unregister(2, 1);
}

/// I14, I15: `put` to zero of a `get_or_register` subscriber racing with a window that calls
/// its start and end (and with a read of its counters, which holds a snapshot outside any
/// read section). `free` runs exactly once, by the time `synchronize` returns (called before
/// the window is joined), in non-blocking context on whichever thread dropped the last
/// reference (checked inside `free`); `put` never runs `release`.
///
/// Shown to fail: with the non-blocking mark around `free` removed from `Registration::drop`,
/// the check inside `free` fails (checked 2026-11-30).
#[test]
fn loom_put_to_zero_racing_callback() {
    model(|| {
        let mm = Mm::new();
        let sub = Tracked::start_end();
        let id = {
            let sub = sub.clone();
            mm.get_or_register(move || sub).unwrap()
        };

        let window = {
            let mm = mm.clone();
            thread::spawn(move || {
                // Holds a snapshot outside any read section for a moment: the free it may
                // trigger is one that only the free barrier of `synchronize` waits for.
                // (Loom does not see the std `Arc` that keeps the registration alive; the
                // counters this reads, which the main thread's own window bumps, are what
                // make loom preempt this thread while it holds the snapshot.)
                let _ = mm.subscriber_stats(id);
                let guard = mm
                    .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap();
                guard.end();
            })
        };

        mm.invalidate_start(range(0x3000, 0x4000), Event::Clear)
            .unwrap()
            .end();
        mm.put(id).unwrap();
        // I15: synchronize waits for the window (if it can still reach the subscriber) and
        // for the free that its end then triggers.
        mm.synchronize().unwrap();
        assert_eq!(
            sub.frees(),
            1,
            "I14/I15: free ran exactly once by synchronize"
        );
        window.join().unwrap();
        assert_eq!(sub.frees(), 1, "I14: free runs exactly once");
        assert_eq!(
            sub.starts(),
            sub.ends(),
            "I4: balanced even when put raced the window"
        );
        assert!(sub.starts() >= 1, "the main thread's own window started it");
        assert_eq!(sub.releases(), 0, "I14: put to zero does not call release");
        assert!(matches!(mm.put(id), Err(Error::NotRegistered { .. })));
    });
}

/// I16, I12: `Mm::release` racing with `unregister` of the only subscriber. `release` is
/// called exactly once, whichever wins; `unregister` returns `Ok` either way (after process
/// exit the owner's unregister still succeeds, as in Linux), and `release` has run when it
/// returns; after `Mm::release` returns, registering fails with `Released`.
#[test]
fn loom_release_racing_unregister() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = Tracked::start_end();
        let id = mm.register(sub.clone()).unwrap();

        let releaser = {
            let mm = mm.clone();
            let sub = sub.clone();
            thread::spawn(move || {
                mm.release().unwrap();
                assert_eq!(
                    sub.releases(),
                    1,
                    "I16: release delivered by the time Mm::release returns"
                );
            })
        };

        let released_before = sub.releases() == 1;
        assert_eq!(mm.unregister(id).map(|_| ()), Ok(()));
        record.record(if released_before {
            "unregister after the release callback"
        } else {
            "unregister before the release callback"
        });
        assert_eq!(
            sub.releases(),
            1,
            "I12: release ran by the time unregister returns"
        );

        releaser.join().unwrap();
        assert_eq!(sub.releases(), 1, "I16: exactly one release");
        assert!(mm.subscribers().is_empty());
        assert!(matches!(
            mm.register(Tracked::start_end()),
            Err(Error::Released)
        ));
        mm.synchronize().unwrap();
        assert_eq!(sub.frees(), 1);
    });
    seen.assert_all(&[
        "unregister after the release callback",
        "unregister before the release callback",
    ]);
}

/// I16: `Mm::release` racing with a window. The subscriber stays served while its `release`
/// runs, so the window either starts it (and then its end is delivered before `Mm::release`
/// returns) or skips it entirely (it began after the release returned); `release` runs once
/// and the subscriber is freed once.
#[test]
fn loom_release_racing_window() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = Tracked::start_end();
        mm.register(sub.clone()).unwrap();

        let window = {
            let mm = mm.clone();
            thread::spawn(move || {
                mm.invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap()
                    .end();
            })
        };

        mm.release().unwrap();
        assert_eq!(sub.releases(), 1);
        assert_eq!(
            sub.starts(),
            sub.ends(),
            "I16: owed end delivered before release returned"
        );
        let starts_when_released = sub.starts();

        window.join().unwrap();
        assert!(sub.starts() <= 1);
        assert_eq!(
            sub.starts(),
            starts_when_released,
            "I16: nothing is delivered after Mm::release returned"
        );
        mm.synchronize().unwrap();
        assert_eq!(sub.frees(), 1);
        record.record(if sub.starts() == 1 {
            "window started the subscriber"
        } else {
            "window skipped the released subscriber"
        });
    });
    seen.assert_all(&[
        "window started the subscriber",
        "window skipped the released subscriber",
    ]);
}

/// A KVM-like mirror of one page: an in-progress count and a sequence, and a fault path that
/// commits only if no invalidation ran or is running.
struct KvmPage {
    in_progress: AtomicUsize,
    seq: AtomicUsize,
    mirror: loom::sync::Mutex<Option<usize>>,
}

impl Subscriber for KvmPage {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }

    fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
        self.in_progress.fetch_add(1, SeqCst);
        *self.mirror.lock().unwrap() = None;
        Ok(())
    }

    fn invalidate_range_end(&self, _: &Invalidation) {
        self.seq.fetch_add(1, SeqCst);
        self.in_progress.fetch_sub(1, SeqCst);
    }
}

impl KvmPage {
    fn fault(&self, primary: &AtomicUsize) {
        let seq = self.seq.load(SeqCst);
        let version = primary.load(SeqCst);
        let mut mirror = self.mirror.lock().unwrap();
        if self.in_progress.load(SeqCst) == 0 && self.seq.load(SeqCst) == seq {
            *mirror = Some(version);
        }
    }
}

/// I10, I14: `get_or_register` returns only once the registration excludes the invalidations
/// that were in flight, also when it finds a registration that another thread is still
/// completing. Thread W changes the primary inside a window; thread B registers the shared
/// subscriber; the main thread gets it too and faults the page in: it never commits a stale
/// version.
#[test]
fn loom_get_or_register_waits_for_inflight_windows() {
    model(move || {
        let mm = Mm::new();
        let kvm = Arc::new(KvmPage {
            in_progress: AtomicUsize::new(0),
            seq: AtomicUsize::new(0),
            mirror: loom::sync::Mutex::new(None),
        });
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
        let registrant = {
            let mm = mm.clone();
            let kvm = kvm.clone();
            thread::spawn(move || mm.get_or_register(move || kvm).unwrap())
        };

        let id = mm.get_or_register(|| kvm.clone()).unwrap();
        kvm.fault(&primary);
        invalidator.join().unwrap();
        assert_eq!(
            registrant.join().unwrap(),
            id,
            "I14: one subscriber per type"
        );

        let committed = *kvm.mirror.lock().unwrap();
        if let Some(version) = committed {
            assert_eq!(
                version,
                primary.load(SeqCst),
                "I10: a stale primary version was committed"
            );
        }
    });
}

/// `put` to zero of a `get_or_register` subscriber racing with `Mm::release`; with
/// `release_never_after_put`, also checks that `release` does not run once that `put` returned.
fn put_racing_release(release_never_after_put: bool) {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = Tracked::start_end();
        let id = {
            let sub = sub.clone();
            mm.get_or_register(move || sub).unwrap()
        };

        let releaser = {
            let mm = mm.clone();
            thread::spawn(move || mm.release().unwrap())
        };

        let releases_before_put = sub.releases();
        let after_put = mm.put_reporting(id);
        assert!(after_put.is_ok(), "put succeeds before and after exit");
        let releases_when_put_returned = sub.releases();

        releaser.join().unwrap();
        assert!(sub.releases() <= 1, "I16: release at most once");
        if release_never_after_put && after_put == Ok(ReleaseAfterPut::Impossible) {
            assert_eq!(
                sub.releases(),
                releases_when_put_returned,
                "I14: release ran after put to zero had returned"
            );
        }
        assert!(
            matches!(mm.put(id), Err(Error::NotRegistered { .. })),
            "the use count is balanced whichever unlinked the registration"
        );
        assert!(matches!(
            mm.get_or_register(Tracked::start_end),
            Err(Error::Released)
        ));
        mm.synchronize().unwrap();
        assert_eq!(
            sub.frees(),
            1,
            "I14, I15: freed exactly once by synchronize"
        );
        record.record(if releases_before_put == 1 {
            "put after the release callback"
        } else {
            "put before the release callback"
        });
    });
    seen.assert_all(&[
        "put after the release callback",
        "put before the release callback",
    ]);
}

/// I14, I15, I16: `put` to zero racing with `Mm::release`. Whichever unlinks the registration,
/// `put` succeeds, the use count balances (a second `put` finds nothing), `release` runs at
/// most once, nothing can register afterwards, and the subscriber is freed exactly once by
/// the time `synchronize` returns.
///
/// Shown to fail: with `put` not counting the use down when `Mm::release` had unlinked the
/// registration first (`*uses -= 1` on that path turned into `*uses -= 0`), loom reports "the
/// use count is balanced whichever unlinked the registration" (checked 2026-11-30).
#[test]
fn loom_put_racing_release() {
    put_racing_release(false);
}

/// I14 ("never after `put` to zero"): `Mm::release` must not call `release` on a registration
/// whose last `put` already returned.
///
/// A release that `Mm::release` claimed before the put reached zero may still begin after the
/// put returned (`put` never blocks); any other release would break I14, and the model checks
/// that none runs.
///
/// Shown to fail: on the engine before issue 13 item 7 (`Mm::release` took its snapshot, a
/// `put` to zero then unlinked the registration and returned, and `Mm::release` still called
/// `release` on it from the snapshot), loom reported "I14: release ran after put to zero had
/// returned" (checked 2026-11-30).
#[test]
fn loom_put_racing_release_never_releases_after_put() {
    put_racing_release(true);
}
