//! Loom models of the two Linux policies, `Kernel` and `Legacy` (P2, P3): a refused
//! non-blocking start racing with the `unregister` of another subscriber.
//!
//! The `Exact` policy has its own models in `loom_classic.rs` (I5). Here the point is that the
//! Linux pairing rules, which call every start after a refusal and then end everybody
//! (`Kernel`) or nobody (`Legacy`), still keep I12 when a subscriber is unregistered
//! concurrently: `unregister` returns, and once it has, nothing reaches that subscriber.

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::thread;

use super::loom_util::{model, range, Seen};
use crate::{Capabilities, Error, Event, Invalidation, Mm, Policy, Refused, Refuser, Subscriber};

/// A classic subscriber that counts what it receives, and refuses every start if told to.
struct Counted {
    caps: Capabilities,
    refuse: bool,
    starts: AtomicUsize,
    ends: AtomicUsize,
    /// Set once its `unregister` returned: no callback may arrive afterwards (I12).
    gone: AtomicBool,
}

impl Counted {
    fn new(caps: Capabilities, refuse: bool) -> Arc<Self> {
        Arc::new(Counted {
            caps,
            refuse,
            starts: AtomicUsize::new(0),
            ends: AtomicUsize::new(0),
            gone: AtomicBool::new(false),
        })
    }

    fn counts(&self) -> (usize, usize) {
        (self.starts.load(SeqCst), self.ends.load(SeqCst))
    }
}

impl Subscriber for Counted {
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
            "an end reached a subscriber after its unregister returned (I12)"
        );
        self.ends.fetch_add(1, SeqCst);
    }
}

/// Three subscribers in registration order: `victim` (start and end, unregistered
/// concurrently), `refuser` (refuses every non-blocking start; no end, as Linux wants of a
/// refuser) and `other` (start and end). One thread runs a non-blocking start, which fails;
/// the main thread unregisters `victim`.
fn refusal_racing_unregister_under(policy: Policy) {
    let seen = Seen::new();
    let record = seen.clone();
    model(move || {
        let mm = Mm::with_policy(policy);
        let start_end = Capabilities::new().with_start().with_end();
        let victim = Counted::new(start_end, false);
        let refuser = Counted::new(Capabilities::new().with_start().may_refuse(), true);
        let other = Counted::new(start_end, false);
        let victim_id = mm.register(victim.clone()).unwrap();
        let refuser_id = mm.register(refuser.clone()).unwrap();
        mm.register(other.clone()).unwrap();

        let window = {
            let mm = mm.clone();
            thread::spawn(move || {
                match mm.invalidate_start_nonblock(range(0x1000, 0x2000), Event::Unmap) {
                    Err(Error::StartRefused { refusers, .. }) => assert_eq!(
                        refusers,
                        vec![Refuser::Classic(refuser_id)],
                        "the error names the refuser"
                    ),
                    Err(other) => panic!("unexpected error {other:?}"),
                    Ok(_) => panic!("a refused non-blocking start returned a guard"),
                }
            })
        };

        mm.unregister(victim_id).unwrap();
        victim.gone.store(true, SeqCst);

        window.join().unwrap();
        assert_eq!(
            refuser.counts(),
            (0, 0),
            "the refuser has no end to receive"
        );
        let (victim_starts, victim_ends) = victim.counts();
        assert!(victim_starts <= 1 && victim_ends <= 1);
        match policy {
            Policy::Kernel => {
                assert_eq!(
                    other.counts(),
                    (1, 1),
                    "P2: the start after the refuser is called, and every subscriber with an \
                     end is ended"
                );
                assert_eq!(
                    victim_ends, victim_starts,
                    "P2: a started subscriber is ended after a refusal, and nobody is ended \
                     without a start (Linux serves a released subscriber until it is unlinked)"
                );
            }
            Policy::Legacy => {
                assert_eq!(
                    other.counts(),
                    (1, 0),
                    "P3: the start after the refuser is called, and nobody is ended"
                );
                assert_eq!(victim_ends, 0, "P3: nobody is ended after a refusal");
            }
            _ => unreachable!("only the Linux policies are modelled here"),
        }
        record.record(match (victim_starts, victim_ends) {
            (0, 0) => "victim not reached",
            (1, 1) => "victim started and ended",
            (1, 0) => "victim started, never ended",
            // Kernel only: the window's snapshot still had the victim, but its release had
            // returned, so its start was skipped; Kernel then ends everyone with an end.
            _ => "victim ended without a start",
        });
    });
    let expected: &[&str] = match policy {
        Policy::Kernel => &["victim not reached", "victim started and ended"],
        _ => &["victim not reached", "victim started, never ended"],
    };
    seen.assert_all(expected);
}

/// P2 with I12: under `Kernel` a refusal does not stop the start chain, every subscriber with
/// an end is ended (the started victim included, before its `unregister` returns), and
/// nothing reaches the victim after its `unregister` returned.
///
/// When the window reaches the victim after its `release` returned but before it was
/// unlinked, `Kernel` starts it and ends it, as Linux does (issue 13 item 8): an end without a
/// start fails the model.
///
/// Shown to fail: with `continue_after_refusal` false for `Kernel`, loom reports "P2: the start
/// after the refuser is called, and every subscriber with an end is ended"; with the
/// `srcu.synchronize()` in `unregister` removed, "an end reached a subscriber after its
/// unregister returned" (both checked 2026-11-30).
#[test]
fn loom_kernel_refusal_racing_unregister() {
    refusal_racing_unregister_under(Policy::Kernel);
}

/// P3 with I12: under `Legacy` a refusal does not stop the start chain and nobody is ended,
/// so a started victim stays started, yet its `unregister` returns and nothing reaches it
/// afterwards.
///
/// Shown to fail: with `end_after_refusal` answering `caps.has_end()` for `Legacy`, loom
/// reports "P3: the start after the refuser is called, and nobody is ended"; with the
/// `srcu.synchronize()` in `unregister` removed, "a start reached a subscriber after its
/// unregister returned" (both checked 2026-11-30).
#[test]
fn loom_legacy_refusal_racing_unregister() {
    refusal_racing_unregister_under(Policy::Legacy);
}
