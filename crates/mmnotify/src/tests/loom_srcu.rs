//! Loom models of the per-`Mm` read side (SRCU): a direct litmus model of `Srcu` with two
//! writers, `register` racing with an open window, and `unregister` racing with a window and a
//! second writer.

use std::sync::Arc;

use loom::sync::atomic::{
    AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};
use loom::thread;

use super::loom_util::{model, range, Seen};
use crate::srcu::Srcu;
use crate::{Capabilities, Event, Invalidation, Mm, Refused, Subscriber};

/// The grace-period guarantee of `Srcu` itself, as a litmus test: each of two writers (on two
/// threads) publishes a value, calls `synchronize`, then says it returned; a reader on a third
/// thread, inside one read section, reads "returned" then "published" for each writer. If it
/// sees that writer `k`'s `synchronize` returned while it was still inside the section, that
/// `synchronize` did not wait for it, so the section must have begun late enough to see what
/// writer `k` published. Forbidden outcome: `returned[k] == 1 && published[k] == 0`.
///
/// The interleaving this is about (it needs a preemption bound of 3): the reader loads index
/// 0; writer 1 flips 0 -> 1 and, finding no reader on 0, returns; writer 2 flips 1 -> 0; the
/// reader increments counter 0, passes its fence *before* writer 2's fence, and re-loads the
/// index: 0 again, but written by writer 2, not by whoever wrote the 0 it first saw. Writer 2
/// waits on counter 1, so it does not wait for this reader, and nothing but the `Acquire` of
/// that re-load makes writer 2's publication visible to it. The engine's own models miss this,
/// because the engine publishes snapshots under a lock, which carries the publication anyway.
///
/// Shown to fail: with the index re-load after the fence in `Srcu::read_lock` weakened to
/// `Relaxed`, loom reports "reader inside a read section saw writer 2's synchronize return but
/// not what it published" at preemption bound 3; at bound 2 the broken copy passes, so 3 is
/// the least bound that catches it (both checked 2026-11-30). With the first index load
/// `Relaxed` (as it is now) and the re-load `Acquire`, it passes. Every other loom model
/// passes with the broken re-load.
#[test]
fn loom_srcu_reader_straddles_flips_of_two_writers() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let srcu = Arc::new(Srcu::new(1));
        let published = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let returned = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let writers: Vec<_> = (0..2)
            .map(|k| {
                let srcu = srcu.clone();
                let published = published.clone();
                let returned = returned.clone();
                thread::spawn(move || {
                    published[k].store(1, Relaxed);
                    srcu.synchronize();
                    returned[k].store(1, Relaxed);
                })
            })
            .collect();

        let mut returned_inside = 0;
        {
            let _section = srcu.read_lock(crate::context::ScopeKind::Guard);
            for k in 0..2 {
                if returned[k].load(Relaxed) == 1 {
                    returned_inside += 1;
                    assert_eq!(
                        published[k].load(Relaxed),
                        1,
                        "reader inside a read section saw writer {}'s synchronize return but \
                         not what it published",
                        k + 1
                    );
                }
            }
        }
        for writer in writers {
            writer.join().unwrap();
        }
        record.record(match returned_inside {
            0 => "no writer returned inside the section",
            1 => "one writer returned inside the section",
            _ => "both writers returned inside the section",
        });
    });
    seen.assert_all(&[
        "no writer returned inside the section",
        "one writer returned inside the section",
        "both writers returned inside the section",
    ]);
}

/// Counts starts and ends; an end without a start fails the model.
struct Late {
    starts: AtomicUsize,
    ends: AtomicUsize,
    /// Set to 2 by this subscriber's end: the moment the window it belongs to has delivered
    /// its ends (it is the last subscriber of that window's snapshot).
    closes: Option<Arc<AtomicUsize>>,
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
        if let Some(closes) = &self.closes {
            closes.store(2, SeqCst);
        }
    }
}

/// I10 (with I4): a subscriber registered while a window is (maybe) open on another thread
/// never gets that window's end without its start; and if the window was already open when
/// `register` began, `register` returns only after the window delivered its ends.
///
/// "Window closed" is recorded by the end callback of the window's last subscriber, from
/// inside the window's end, so the check fails if `register` returns while that end is still
/// to come. (It used to be recorded just before `guard.end()`, which let a `register` that
/// returned before the end pass.) Shown to fail: with the `srcu.synchronize()` in
/// `register_keyed` removed, loom reports "register returned while a window that was open
/// before it is still open" (checked 2026-11-30).
#[test]
fn loom_register_concurrent_with_window() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        // 0: not started; 1: start returned; 2: ends delivered.
        let window_state = Arc::new(AtomicUsize::new(0));
        // A subscriber already there, so the window has a classic snapshot to work with. It
        // is the last one in any snapshot that the window can take while `late` is not
        // registered yet, so its end is the last thing the window delivers in the case the
        // check is about.
        let early = Arc::new(Late {
            starts: AtomicUsize::new(0),
            ends: AtomicUsize::new(0),
            closes: Some(window_state.clone()),
        });
        mm.register(early.clone()).unwrap();

        let window = {
            let mm = mm.clone();
            let window_state = window_state.clone();
            thread::spawn(move || {
                let guard = mm
                    .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap();
                window_state.store(1, SeqCst);
                guard.end();
            })
        };

        let late = Arc::new(Late {
            starts: AtomicUsize::new(0),
            ends: AtomicUsize::new(0),
            closes: None,
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
