//! Loom models of nested invalidation guards against a writer: one thread opens a window,
//! opens a second one inside it, then ends both (inner first), while the main thread
//! registers or unregisters a subscriber.
//!
//! Each guard is its own read section and takes its own snapshot, so the two nested windows
//! may see different subscriber lists: the inner one may include a subscriber that the outer
//! one missed, or miss one that the outer one started. The pairing must hold per guard, and a
//! writer must wait for both read sections (which may sit on different SRCU counters when a
//! flip falls between them).

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::thread;

use super::loom_util::{model, range, Seen};
use crate::{Capabilities, Event, Invalidation, Mm, Refused, Subscriber};

/// A start/end subscriber that checks the pairing as it goes.
struct Paired {
    starts: AtomicUsize,
    ends: AtomicUsize,
    /// Set once its `unregister` returned: no callback may arrive afterwards (I12).
    gone: AtomicBool,
    /// `(state, n)`: the subscriber's `n`-th end stores 2 into `state`.
    closes: Option<(Arc<AtomicUsize>, usize)>,
}

impl Paired {
    fn new(closes: Option<(Arc<AtomicUsize>, usize)>) -> Arc<Self> {
        Arc::new(Paired {
            starts: AtomicUsize::new(0),
            ends: AtomicUsize::new(0),
            gone: AtomicBool::new(false),
            closes,
        })
    }

    fn counts(&self) -> (usize, usize) {
        (self.starts.load(SeqCst), self.ends.load(SeqCst))
    }
}

impl Subscriber for Paired {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }

    fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
        assert!(
            !self.gone.load(SeqCst),
            "a start reached a subscriber after its unregister returned (I12)"
        );
        self.starts.fetch_add(1, SeqCst);
        Ok(())
    }

    fn invalidate_range_end(&self, _: &Invalidation) {
        assert!(
            !self.gone.load(SeqCst),
            "an end reached a subscriber after its unregister returned (I12)"
        );
        let ends = self.ends.fetch_add(1, SeqCst) + 1;
        assert!(
            ends <= self.starts.load(SeqCst),
            "an end without a start: a nested window ended a subscriber it did not start (I4)"
        );
        if let Some((state, n)) = &self.closes {
            if ends == *n {
                state.store(2, SeqCst);
            }
        }
    }
}

/// Opens a window, a nested one inside it, and ends both, inner first; sets `state` to 1 once
/// the outer window's start returned.
fn nested_windows(mm: &Mm, state: &AtomicUsize) {
    let outer = mm
        .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap();
    state.store(1, SeqCst);
    let inner = mm
        .invalidate_start(range(0x3000, 0x4000), Event::Clear)
        .unwrap();
    inner.end();
    outer.end();
}

/// I10 and I4 with nested guards: `register` racing with a window that has a second window
/// nested inside it. If the outer window was open when `register` began, `register` returns
/// only after both windows delivered their ends (recorded by the outer window's end to the
/// subscriber that was there before, its last end); the new subscriber gets an end exactly for
/// each window that started it, the inner one possibly without the outer one.
///
/// Shown to fail: with the `srcu.synchronize()` in `register_keyed` removed, loom reports
/// "register returned while a nested window that was open before it is still open" (checked
/// 2026-11-30).
#[test]
fn loom_nested_guards_racing_register() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        // 0: not started; 1: outer start returned; 2: outer end delivered to `early`.
        let state = Arc::new(AtomicUsize::new(0));
        let early = Paired::new(Some((state.clone(), 2)));
        mm.register(early.clone()).unwrap();

        let windows = {
            let mm = mm.clone();
            let state = state.clone();
            thread::spawn(move || nested_windows(&mm, &state))
        };

        let late = Paired::new(None);
        let open_before = state.load(SeqCst) == 1;
        mm.register(late.clone()).unwrap();
        if open_before {
            assert_eq!(
                state.load(SeqCst),
                2,
                "I10: register returned while a nested window that was open before it is still \
                 open"
            );
        }

        windows.join().unwrap();
        let (late_starts, late_ends) = late.counts();
        assert_eq!(late_starts, late_ends, "I4: the new subscriber is balanced");
        assert_eq!(early.counts(), (2, 2));
        record.record(match (open_before, late_starts) {
            (true, 0) => "outer window open before register; inner missed it",
            (true, _) => "outer window open before register; inner started it",
            (false, 2) => "register before both windows",
            (false, _) => "other order",
        });
    });
    seen.assert_all(&[
        "outer window open before register; inner missed it",
        "outer window open before register; inner started it",
        "register before both windows",
    ]);
}

/// I12 with nested guards: `unregister` racing with a window that has a second window nested
/// inside it. When `unregister` returns, every start that reached the subscriber (from either
/// window) has been ended, and nothing reaches it afterwards.
///
/// Shown to fail: with the `srcu.synchronize()` in `unregister` removed, loom reports "I12:
/// unregister returned before the ends it owed" (checked 2026-11-30).
#[test]
fn loom_nested_guards_racing_unregister() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let victim = Paired::new(None);
        let id = mm.register(victim.clone()).unwrap();
        let state = Arc::new(AtomicUsize::new(0));

        let windows = {
            let mm = mm.clone();
            let state = state.clone();
            thread::spawn(move || nested_windows(&mm, &state))
        };

        mm.unregister(id).unwrap();
        let (starts, ends) = victim.counts();
        assert_eq!(
            starts, ends,
            "I12: unregister returned before the ends it owed"
        );
        victim.gone.store(true, SeqCst);

        windows.join().unwrap();
        record.record(match starts {
            0 => "neither window reached it",
            1 => "only the outer window reached it",
            _ => "both windows reached it",
        });
    });
    seen.assert_all(&[
        "neither window reached it",
        "only the outer window reached it",
        "both windows reached it",
    ]);
}
