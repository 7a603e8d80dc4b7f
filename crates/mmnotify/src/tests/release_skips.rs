//! I16, deterministically: once a subscriber's `release` has returned, starts (blockable and
//! not), young walks and secondary-TLB walks skip it, although it stays linked until
//! `Mm::release` unlinks everybody; a subscriber whose `release` is still running is served.
//!
//! `Mm::release` calls the `release` callbacks one after the other on its own thread, so while
//! one of them runs, every subscriber whose `release` already ran has returned from it. Each
//! subscriber here probes the address space from inside its own `release`: it opens windows and
//! runs every walk, and checks that the subscribers already released received nothing while
//! it received everything it declares. The check does not depend on the order in which
//! `Mm::release` goes through the subscribers.
//!
//! Shown to fail: with the `reg.is_released()` skip removed from the classic start phase in
//! `guard.rs`, or the `!r.is_released()` filter removed from `Mm::young_walk`,
//! `a_start_or_walk_skips_a_subscriber_whose_release_returned` fails with "a start, an end or
//! a walk reached a subscriber whose release had returned" (both checked 2026-11-30).

#![allow(
    clippy::disallowed_types,
    reason = "a test: plain std locks are fine here"
)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::{Capabilities, Event, Invalidation, Mm, Range, Refused, Subscriber};

/// A subscriber that probes the address space from inside its own `release`.
struct Prober {
    caps: Capabilities,
    /// Its handle to the address space, taken by its `release` (which breaks the cycle
    /// address space → registration → subscriber → address space).
    mm: Mutex<Option<Mm>>,
    /// The other subscribers of the address space.
    peers: OnceLock<Vec<Weak<Prober>>>,
    /// Set as the last step of its `release` callback.
    release_done: AtomicBool,
    releases: AtomicUsize,
    /// Every callback received: starts, ends, young and secondary-TLB calls.
    callbacks: AtomicUsize,
    /// How many peers had finished their `release` when this one's ran.
    released_peers_seen: AtomicUsize,
}

impl Prober {
    fn new(caps: Capabilities, mm: &Mm) -> Arc<Self> {
        Arc::new(Prober {
            caps,
            mm: Mutex::new(Some(mm.clone())),
            peers: OnceLock::new(),
            release_done: AtomicBool::new(false),
            releases: AtomicUsize::new(0),
            callbacks: AtomicUsize::new(0),
            released_peers_seen: AtomicUsize::new(0),
        })
    }

    fn callbacks(&self) -> usize {
        self.callbacks.load(SeqCst)
    }

    /// The callbacks one probe delivers to a subscriber that is still served: a start and an
    /// end per window (two windows), three young calls, and the TLB call if declared.
    fn expected_per_probe(&self) -> usize {
        let windows = if self.caps.has_start() { 2 * 2 } else { 0 };
        let tlb = usize::from(self.caps.has_secondary_tlb());
        windows + 3 + tlb
    }

    fn count(&self) {
        self.callbacks.fetch_add(1, SeqCst);
    }
}

fn probe_range() -> Range {
    Range::new(0x1000, 0x2000).expect("valid range")
}

impl Subscriber for Prober {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn release(&self) {
        self.releases.fetch_add(1, SeqCst);
        let mm = self
            .mm
            .lock()
            .unwrap()
            .take()
            .expect("release runs once and the handle is set");
        let released_peers: Vec<Arc<Prober>> = self
            .peers
            .get()
            .expect("peers are set before Mm::release")
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|peer| peer.release_done.load(SeqCst))
            .collect();
        let peers_before: Vec<usize> = released_peers.iter().map(|p| p.callbacks()).collect();
        let own_before = self.callbacks();

        mm.invalidate_start(probe_range(), Event::Unmap)
            .expect("a blockable start from release")
            .end();
        mm.invalidate_start_nonblock(probe_range(), Event::Clear)
            .expect("nobody refuses")
            .end();
        // Every subscriber answers "not young", so `test_young` asks them all.
        assert!(!mm.clear_flush_young(probe_range()));
        assert!(!mm.clear_young(probe_range()));
        assert!(!mm.test_young(0x1000));
        mm.arch_invalidate_secondary_tlbs(probe_range());

        for (peer, before) in released_peers.iter().zip(peers_before) {
            assert_eq!(
                peer.callbacks(),
                before,
                "a start, an end or a walk reached a subscriber whose release had returned (I16)"
            );
        }
        assert_eq!(
            self.callbacks() - own_before,
            self.expected_per_probe(),
            "a subscriber whose release is running is still served (I16)"
        );
        self.released_peers_seen.store(released_peers.len(), SeqCst);
        self.release_done.store(true, SeqCst);
    }

    fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
        self.count();
        Ok(())
    }

    fn invalidate_range_end(&self, _: &Invalidation) {
        self.count();
    }

    fn clear_flush_young(&self, _: Range) -> bool {
        self.count();
        false
    }

    fn clear_young(&self, _: Range) -> bool {
        self.count();
        false
    }

    fn test_young(&self, _: u64) -> bool {
        self.count();
        false
    }

    fn arch_invalidate_secondary_tlbs(&self, _: Range) {
        self.count();
    }
}

/// I16: starts, young walks and TLB walks skip a subscriber whose `release` returned, and
/// serve the one whose `release` is running, for start/end and secondary-TLB subscribers.
#[test]
fn a_start_or_walk_skips_a_subscriber_whose_release_returned() {
    let mm = Mm::new();
    let start_end = Capabilities::new().with_start().with_end();
    let tlb = Capabilities::new().with_secondary_tlb();
    let probers = [
        Prober::new(start_end, &mm),
        Prober::new(tlb, &mm),
        Prober::new(start_end, &mm),
    ];
    for prober in &probers {
        let peers = probers
            .iter()
            .filter(|p| !Arc::ptr_eq(p, prober))
            .map(Arc::downgrade)
            .collect();
        assert!(prober.peers.set(peers).is_ok(), "peers are set once");
        mm.register(prober.clone()).unwrap();
    }

    mm.release().unwrap();

    for prober in &probers {
        assert_eq!(prober.releases.load(SeqCst), 1);
    }
    // Not vacuous: the last one released probed with both others already released.
    let most_seen = probers
        .iter()
        .map(|p| p.released_peers_seen.load(SeqCst))
        .max();
    assert_eq!(most_seen, Some(2));
}
