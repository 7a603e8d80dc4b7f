//! Loom models of the per-`Mm` read side (SRCU): `register` racing with an open window.

use std::sync::Arc;

use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use loom::thread;

use super::loom_util::{model, range, Seen};
use crate::{Capabilities, Event, Invalidation, Mm, Refused, Subscriber};

/// Counts starts and ends; an end without a start fails the model.
struct Late {
    starts: AtomicUsize,
    ends: AtomicUsize,
}

impl Subscriber for Late {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }

    fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
        self.starts.fetch_add(1, SeqCst);
        Ok(())
    }

    fn invalidate_range_end(&self, _: &Invalidation) {
        let ends = self.ends.fetch_add(1, SeqCst) + 1;
        assert!(
            ends <= self.starts.load(SeqCst),
            "I10/I4: a subscriber registered during a window got its end without a start"
        );
    }
}

/// I10 (with I4): a subscriber registered while a window is (maybe) open on another thread
/// never gets that window's end without its start; and if the window was already open when
/// `register` began, `register` returns only after the window ended.
#[test]
fn loom_register_concurrent_with_window() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        // A subscriber already there, so the window has a classic snapshot to work with.
        let early = Arc::new(Late {
            starts: AtomicUsize::new(0),
            ends: AtomicUsize::new(0),
        });
        mm.register(early.clone()).unwrap();
        // 0: not started; 1: start returned; 2: about to end.
        let window_state = Arc::new(AtomicUsize::new(0));

        let window = {
            let mm = mm.clone();
            let window_state = window_state.clone();
            thread::spawn(move || {
                let guard = mm
                    .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap();
                window_state.store(1, SeqCst);
                window_state.store(2, SeqCst);
                guard.end();
            })
        };

        let late = Arc::new(Late {
            starts: AtomicUsize::new(0),
            ends: AtomicUsize::new(0),
        });
        let open_before = window_state.load(SeqCst) == 1;
        mm.register(late.clone()).unwrap();
        if open_before {
            assert_eq!(
                window_state.load(SeqCst),
                2,
                "I10: register returned while a window that was open before it is still open"
            );
        }

        window.join().unwrap();
        assert_eq!(late.starts.load(SeqCst), late.ends.load(SeqCst));
        assert!(late.starts.load(SeqCst) <= 1);
        record.record(if open_before {
            "window open before register"
        } else {
            "other order"
        });
        if late.starts.load(SeqCst) == 1 {
            record.record("window after register");
        }
        assert_eq!((early.starts.load(SeqCst), early.ends.load(SeqCst)), (1, 1));
    });
    seen.assert_all(&[
        "window open before register",
        "other order",
        "window after register",
    ]);
}

/// A start/end subscriber that must not be called once its `unregister` returned.
struct Watched {
    starts: AtomicUsize,
    ends: AtomicUsize,
    gone: AtomicUsize,
}

impl Subscriber for Watched {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }

    fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
        assert_eq!(
            self.gone.load(SeqCst),
            0,
            "I12: a start after unregister returned"
        );
        self.starts.fetch_add(1, SeqCst);
        Ok(())
    }

    fn invalidate_range_end(&self, _: &Invalidation) {
        assert_eq!(
            self.gone.load(SeqCst),
            0,
            "I12: an end after unregister returned"
        );
        self.ends.fetch_add(1, SeqCst);
    }
}

/// I12 (the SRCU's two-flip case): a window racing with `unregister` while a second writer
/// (`synchronize`) flips the read-side index too. A reader that raced with both flips must
/// still be waited for, or must see the unregistration: either way no callback of the
/// subscriber runs after `unregister` returned, and its starts and ends balance.
#[test]
fn loom_unregister_with_second_writer() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        let sub = Arc::new(Watched {
            starts: AtomicUsize::new(0),
            ends: AtomicUsize::new(0),
            gone: AtomicUsize::new(0),
        });
        let id = mm.register(sub.clone()).unwrap();

        let window = {
            let mm = mm.clone();
            thread::spawn(move || {
                mm.invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap()
                    .end();
            })
        };
        let writer = {
            let mm = mm.clone();
            thread::spawn(move || mm.synchronize().unwrap())
        };

        mm.unregister(id).unwrap();
        assert_eq!(
            sub.starts.load(SeqCst),
            sub.ends.load(SeqCst),
            "I12: owed end delivered"
        );
        sub.gone.store(1, SeqCst);

        window.join().unwrap();
        writer.join().unwrap();
        assert_eq!(sub.starts.load(SeqCst), sub.ends.load(SeqCst));
        record.record(if sub.starts.load(SeqCst) == 1 {
            "started"
        } else {
            "missed"
        });
    });
    seen.assert_all(&["started", "missed"]);
}
