//! Loom models of the per-thread read side (issue 11): the two-writer straddle on the fallback
//! fences and on the shared slot, threads that exit inside and outside a read section, and
//! `register` racing an invalidation of an address space nobody listens to.
//!
//! Under loom [`SLOTS`](crate::srcu::SLOTS) is 2, the light and the heavy fence are both
//! `SeqCst` fences (what membarrier guarantees the pair), and a thread's lease is given back
//! with `thread_index::retire_current_for_test`, the very code its destructor runs at exit
//! (loom destroys thread-locals in no fixed order, so a model cannot make the lease go first).

use std::sync::Arc;

use loom::sync::atomic::{
    AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};
use loom::thread;

use super::loom_util::{model, range, Seen};
use crate::srcu::Srcu;
use crate::sync::Fences;
use crate::thread_index;
use crate::{Capabilities, Event, Invalidation, Mm, Refused, Subscriber};

/// The two-writer litmus test of `loom_srcu_reader_straddles_flips_of_two_writers`, with the
/// reader set up by `prepare` first: each of two writers publishes, synchronizes, says it
/// returned; a reader inside one section that sees "returned" must see "published".
fn straddle(fences: Fences, prepare: fn()) {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let srcu = Arc::new(Srcu::with_fences(1, fences));
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

        prepare();
        let mut returned_inside = 0;
        let ticket = srcu.read_lock_raw();
        for k in 0..2 {
            if returned[k].load(Relaxed) == 1 {
                returned_inside += 1;
                assert_eq!(
                    published[k].load(Relaxed),
                    1,
                    "reader inside a read section saw writer {}'s synchronize return but not \
                     what it published",
                    k + 1
                );
            }
        }
        srcu.read_unlock_raw(ticket);
        for writer in writers {
            writer.join().unwrap();
        }
        record.record(match returned_inside {
            0 => "none inside",
            1 => "one inside",
            _ => "both inside",
        });
    });
    seen.assert_all(&["none inside", "one inside", "both inside"]);
}

/// The membarrier fallback: with [`Fences::Symmetric`] (a `SeqCst` fence on each side, what a
/// system without membarrier gets) a reader straddling the flips of two writers is still
/// waited for or sees both publications.
///
/// Shown to fail: with the fallback's reader fence (`Fences::light` for `Symmetric`) removed
/// (under loom a compiler fence is nothing), as a build that took membarrier for granted would
/// have it, loom reports a deadlock: a reader's last decrement and a writer's announcement in
/// `waiters` miss each other, so the writer sleeps with nobody left to wake it (checked
/// 2026-11-30, in a copy of the tree).
#[test]
fn loom_fallback_fences_reader_straddles_two_writers() {
    straddle(Fences::Symmetric, || {});
}

/// The shared slot: a thread without a number of its own (here, because its lease was given
/// back, as during thread teardown) counts itself in the shared last slot with atomic
/// read-modify-writes; the straddle guarantee holds there too.
///
/// Shown to fail: with `synchronize` draining only the per-thread slots (`slots[..SLOTS]`),
/// loom reports "reader inside a read section saw writer 2's synchronize return but not what
/// it published" (checked 2026-11-30, in a copy of the tree).
#[test]
fn loom_shared_slot_reader_straddles_two_writers() {
    straddle(Fences::Asymmetric, || {
        thread_index::retire_current_for_test();
        assert_eq!(thread_index::current(), None);
    });
}

/// A thread exits (its lease is destroyed) *inside* a read section, which its guard ends
/// later (as a guard owned by a later thread-local destructor would), while a writer
/// synchronizes and a new thread takes a number and reads.
///
/// Checked: the writer still waits for the section (a `synchronize` that returned inside it
/// implies the publication is seen); the exiting thread's number goes to no other thread while
/// its section is open (the new thread would write the same slot with plain stores: lost
/// updates); and once everything ended no number is leaked (every number ever leased is free
/// again, none is left orphaned).
///
/// Shown to fail: with `Lease::retire` giving the number back at once even with sections open,
/// loom reports "the number of a thread that exited inside a read section went to another
/// thread before the section ended" (checked 2026-11-30, in a copy of the tree).
#[test]
fn loom_thread_exits_inside_a_read_section() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let srcu = Arc::new(Srcu::with_fences(1, Fences::Asymmetric));
        let published = Arc::new(AtomicUsize::new(0));
        let returned = Arc::new(AtomicUsize::new(0));
        // The exiting thread's number + 1 while its section is open, else 0.
        let open_number = Arc::new(AtomicUsize::new(0));

        let exiting = {
            let srcu = srcu.clone();
            let (published, returned, open_number) =
                (published.clone(), returned.clone(), open_number.clone());
            thread::spawn(move || {
                let ticket = srcu.read_lock_raw();
                let number = thread_index::current().expect("a live thread has a number");
                open_number.store(number + 1, SeqCst);
                thread_index::retire_current_for_test();
                if returned.load(SeqCst) == 1 {
                    assert_eq!(published.load(SeqCst), 1, "grace period broken by the exit");
                }
                open_number.store(0, SeqCst);
                srcu.read_unlock_raw(ticket);
            })
        };
        let newcomer = {
            let srcu = srcu.clone();
            thread::spawn(move || {
                let ticket = srcu.read_lock_raw();
                let mine = thread_index::current().expect("a live thread has a number");
                let theirs = open_number.load(SeqCst);
                assert!(
                    theirs != mine + 1,
                    "the number of a thread that exited inside a read section went to another \
                     thread before the section ended"
                );
                srcu.read_unlock_raw(ticket);
                // The thread exits (loom runs thread-local destructors after `join` returns).
                thread_index::retire_current_for_test();
                theirs != 0
            })
        };
        published.store(1, SeqCst);
        srcu.synchronize();
        returned.store(1, SeqCst);
        exiting.join().unwrap();
        let overlapped = newcomer.join().unwrap();

        let (free, orphans, leased) = thread_index::registry_for_test();
        assert!(orphans.is_empty(), "a number is left orphaned: {orphans:?}");
        assert_eq!(
            free.len(),
            leased,
            "a number leaked: free {free:?} of {leased}"
        );
        record.record(if overlapped {
            "newcomer read while the exited thread's section was open"
        } else {
            "no overlap"
        });
    });
    seen.assert_all(&[
        "newcomer read while the exited thread's section was open",
        "no overlap",
    ]);
}

/// A thread exits *outside* a read section: its number is given back at once and reused by a
/// thread that reads while a writer synchronizes; the reuser's sections are waited for like any
/// other (it starts from counters the exited thread left at zero), and nothing leaks.
///
/// Shown to fail: with `Lease::retire` not giving the number back when no section is open,
/// loom reports "the freed number is leased again (lowest first)": the next thread gets a new
/// number and the old one is lost (checked 2026-11-30, in a copy of the tree).
#[test]
fn loom_thread_exits_outside_a_read_section() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let srcu = Arc::new(Srcu::with_fences(1, Fences::Asymmetric));
        let published = Arc::new(AtomicUsize::new(0));
        let returned = Arc::new(AtomicUsize::new(0));

        let exiting = {
            let srcu = srcu.clone();
            thread::spawn(move || {
                srcu.read_unlock_raw(srcu.read_lock_raw());
                let number = thread_index::current().expect("a live thread has a number");
                thread_index::retire_current_for_test();
                number
            })
        };
        let first = exiting.join().unwrap();
        let reuser = {
            let srcu = srcu.clone();
            let (published, returned) = (published.clone(), returned.clone());
            thread::spawn(move || {
                let ticket = srcu.read_lock_raw();
                let number = thread_index::current().expect("a live thread has a number");
                if returned.load(SeqCst) == 1 {
                    assert_eq!(published.load(SeqCst), 1, "grace period broken after reuse");
                }
                srcu.read_unlock_raw(ticket);
                thread_index::retire_current_for_test();
                number
            })
        };
        published.store(1, SeqCst);
        srcu.synchronize();
        returned.store(1, SeqCst);
        let second = reuser.join().unwrap();
        assert_eq!(
            second, first,
            "the freed number is leased again (lowest first)"
        );

        let (free, orphans, leased) = thread_index::registry_for_test();
        assert!(orphans.is_empty(), "a number is left orphaned: {orphans:?}");
        assert_eq!(
            free.len(),
            leased,
            "a number leaked: free {free:?} of {leased}"
        );
        record.record("ran");
    });
    seen.assert_all(&["ran"]);
}

/// Counts starts and ends; an end without a start fails the model (I4).
#[derive(Default)]
struct Counting {
    starts: AtomicUsize,
    ends: AtomicUsize,
}

impl Subscriber for Counting {
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
            "I4: an end without a start"
        );
    }
}

/// I10 on the no-subscriber fast path: an invalidation of an address space with no subscriber
/// at all (nothing to call, the cheapest start and end there are) races with the first
/// `register`. A window that began before the subscriber was in and so missed it must have
/// ended before `register` returns, and it never delivers an end to it (I4).
///
/// Shown to fail: with `InvalidateGuard::start_with` skipping the read section when nobody
/// listens (no classic subscriber, no interval), loom reports "I10: register returned while a
/// window that missed the new subscriber is still open" (checked 2026-11-30, in a copy of the
/// tree).
#[test]
fn loom_register_racing_the_no_subscriber_fast_path() {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::new();
        // 0: no window open; 1: a window that missed the subscriber is open; 2: a window that
        // started it is open.
        let window = Arc::new(AtomicUsize::new(0));
        let sub = Arc::new(Counting::default());

        let invalidator = {
            let (mm, window, sub) = (mm.clone(), window.clone(), sub.clone());
            thread::spawn(move || {
                let guard = mm
                    .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
                    .unwrap();
                let started = sub.starts.load(SeqCst) == 1;
                window.store(if started { 2 } else { 1 }, SeqCst);
                window.store(0, SeqCst);
                guard.end();
                started
            })
        };

        mm.register(sub.clone()).unwrap();
        assert_ne!(
            window.load(SeqCst),
            1,
            "I10: register returned while a window that missed the new subscriber is still open"
        );
        let started = invalidator.join().unwrap();
        assert_eq!(sub.starts.load(SeqCst), sub.ends.load(SeqCst));
        record.record(if started {
            "window included the subscriber"
        } else {
            "window missed the subscriber"
        });
    });
    seen.assert_all(&[
        "window included the subscriber",
        "window missed the subscriber",
    ]);
}
