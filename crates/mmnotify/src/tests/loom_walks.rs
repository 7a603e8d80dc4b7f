//! Loom models of the young and secondary-TLB walks (`clear_flush_young`, `clear_young`,
//! `test_young`, `arch_invalidate_secondary_tlbs`) against the writers: `register`,
//! `unregister` and `Mm::release`.
//!
//! A walk enters the `Mm`'s read section, takes the current snapshot and calls every
//! registration in it whose `release` has not returned. So a walk that begins after `register`
//! returned reaches the new subscriber (I10 for walks), nothing reaches a subscriber once its
//! `unregister` or `Mm::release` returned (I12, I16), and a walk that begins after a
//! subscriber's `release` returned skips it even while it is still linked (I16).

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::thread;

use super::loom_util::{model, range, wait_for, Seen};
use crate::{Capabilities, Mm, Range, Subscriber};

/// A walked subscriber: counts the walk callbacks it receives and fails the model when one
/// arrives where the contract forbids it.
struct Walked {
    caps: Capabilities,
    /// Walk callbacks received.
    calls: AtomicUsize,
    /// Set once `unregister` or `Mm::release` returned: no callback may arrive afterwards.
    gone: AtomicBool,
    releases: AtomicUsize,
    /// Shared by the subscribers of one model: how many `release` callbacks have begun.
    releases_begun: Arc<AtomicUsize>,
    /// Whether this subscriber's `release` was the first to begin.
    released_first: AtomicBool,
    /// Set by the walker before a walk that begins after the first `release` returned; such a
    /// walk must skip the first-released subscriber.
    late_walk: Arc<AtomicBool>,
    /// Calls received during such a late walk.
    late_calls: AtomicUsize,
}

impl Walked {
    fn new(
        caps: Capabilities,
        releases_begun: &Arc<AtomicUsize>,
        late_walk: &Arc<AtomicBool>,
    ) -> Arc<Self> {
        Arc::new(Walked {
            caps,
            calls: AtomicUsize::new(0),
            gone: AtomicBool::new(false),
            releases: AtomicUsize::new(0),
            releases_begun: releases_begun.clone(),
            released_first: AtomicBool::new(false),
            late_walk: late_walk.clone(),
            late_calls: AtomicUsize::new(0),
        })
    }

    /// A subscriber whose walks are lone: nothing is shared with other subscribers.
    fn lone(caps: Capabilities) -> Arc<Self> {
        Walked::new(
            caps,
            &Arc::new(AtomicUsize::new(0)),
            &Arc::new(AtomicBool::new(false)),
        )
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    fn called(&self) {
        assert!(
            !self.gone.load(SeqCst),
            "a walk reached a subscriber after its unregister or Mm::release returned (I12, I16)"
        );
        if self.late_walk.load(SeqCst) {
            assert!(
                !self.released_first.load(SeqCst),
                "a walk that began after a subscriber's release returned still called it (I16)"
            );
            self.late_calls.fetch_add(1, SeqCst);
        }
        self.calls.fetch_add(1, SeqCst);
    }
}

impl Subscriber for Walked {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn release(&self) {
        if self.releases_begun.fetch_add(1, SeqCst) == 0 {
            self.released_first.store(true, SeqCst);
        }
        self.releases.fetch_add(1, SeqCst);
    }

    fn clear_flush_young(&self, _: Range) -> bool {
        self.called();
        true
    }

    fn clear_young(&self, _: Range) -> bool {
        self.called();
        true
    }

    fn test_young(&self, _: u64) -> bool {
        self.called();
        true
    }

    fn arch_invalidate_secondary_tlbs(&self, _: Range) {
        self.called();
    }
}

const TLB: Capabilities = Capabilities::new().with_secondary_tlb();

/// I12 for walks: a secondary-TLB walk and a young walk on one thread race with the
/// `unregister` of their subscriber. Once `unregister` returned, neither walk calls it any
/// more (a walk that had already begun was waited for); `release` ran exactly once.
///
/// Shown to fail: with the read section of `arch_invalidate_secondary_tlbs` ended at once
/// (`let _ = self.inner.srcu.read_lock();`), `unregister` no longer waits for the walk and loom
/// reports "a walk reached a subscriber after its unregister or Mm::release returned"
/// (checked 2026-11-30).
#[test]
fn loom_walks_racing_unregister() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = Walked::lone(TLB);
        let id = mm.register(sub.clone()).unwrap();

        let walker = {
            let mm = mm.clone();
            thread::spawn(move || {
                mm.arch_invalidate_secondary_tlbs(range(0x1000, 0x2000));
                mm.clear_young(range(0x1000, 0x2000));
            })
        };

        mm.unregister(id).unwrap();
        sub.gone.store(true, SeqCst);
        assert_eq!(sub.releases.load(SeqCst), 1, "I12: release ran once");

        walker.join().unwrap();
        record.record(match sub.calls() {
            0 => "no walk reached it",
            1 => "one walk reached it",
            _ => "both walks reached it",
        });
    });
    seen.assert_all(&[
        "no walk reached it",
        "one walk reached it",
        "both walks reached it",
    ]);
}

/// I16 for walks: two subscribers, `Mm::release` on the main thread. A walker waits until the
/// second `release` callback has begun, which means the first one has returned (the releases
/// run one after the other), then walks: that walk must skip the first-released subscriber,
/// though it is still linked, and may still reach the one whose `release` is running (it is
/// served until its `release` returns). Once `Mm::release` returned, no walk reaches either.
///
/// Shown to fail: with the `!r.is_released()` filter removed from
/// `arch_invalidate_secondary_tlbs`, loom reports "a walk that began after a subscriber's
/// release returned still called it" (checked 2026-11-30).
#[test]
fn loom_walk_skips_a_subscriber_whose_release_returned() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let releases_begun = Arc::new(AtomicUsize::new(0));
        let late_walk = Arc::new(AtomicBool::new(false));
        let subs = [
            Walked::new(TLB, &releases_begun, &late_walk),
            Walked::new(TLB, &releases_begun, &late_walk),
        ];
        for sub in &subs {
            mm.register(sub.clone()).unwrap();
        }

        let walker = {
            let mm = mm.clone();
            let releases_begun = releases_begun.clone();
            let late_walk = late_walk.clone();
            thread::spawn(move || {
                wait_for(&releases_begun, 2);
                late_walk.store(true, SeqCst);
                mm.arch_invalidate_secondary_tlbs(range(0x1000, 0x2000));
            })
        };

        mm.release().unwrap();
        for sub in &subs {
            sub.gone.store(true, SeqCst);
            assert_eq!(sub.releases.load(SeqCst), 1, "I16: release ran once");
        }

        walker.join().unwrap();
        let late_calls: usize = subs.iter().map(|s| s.late_calls.load(SeqCst)).sum();
        record.record(if late_calls == 1 {
            "the late walk reached the subscriber still releasing"
        } else {
            "the late walk found nobody"
        });
    });
    seen.assert_all(&[
        "the late walk reached the subscriber still releasing",
        "the late walk found nobody",
    ]);
}

/// I10 for walks: a young walk racing with `register`. A walk that begins after `register`
/// returned (the walker saw the flag the main thread sets then) reaches the new subscriber;
/// one that raced with it may or may not.
///
/// Shown to fail: with `publish` announcing a snapshot of one registration as empty
/// (`has_classic` stored as `next.len() > 1`), loom reports "a walk that began after register
/// returned missed the subscriber" (checked 2026-11-30).
#[test]
fn loom_walk_racing_register() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = Walked::lone(Capabilities::new());
        let registered = Arc::new(AtomicUsize::new(0));

        let walker = {
            let mm = mm.clone();
            let sub = sub.clone();
            let registered = registered.clone();
            thread::spawn(move || {
                let after_register = registered.load(SeqCst) == 1;
                let young = mm.test_young(0x1000);
                if after_register {
                    assert!(
                        young && sub.calls() == 1,
                        "a walk that began after register returned missed the subscriber (I10)"
                    );
                }
                after_register
            })
        };

        mm.register(sub.clone()).unwrap();
        registered.store(1, SeqCst);

        let after_register = walker.join().unwrap();
        record.record(match (after_register, sub.calls()) {
            (true, _) => "walk after register",
            (false, 1) => "racing walk reached it",
            _ => "racing walk missed it",
        });
    });
    seen.assert_all(&[
        "walk after register",
        "racing walk reached it",
        "racing walk missed it",
    ]);
}
