//! The coherence oracle: checks, at a quiet moment (no invalidation in flight), that the
//! secondary MMUs agree with the primary and that nothing was left half-done.
//!
//! It checks, reading only state:
//!
//! 1. **Mappings.** Every secondary entry maps the frame the primary maps at the same page; an
//!    entry for a page the primary does not map is stale; a writable secondary entry over a
//!    primary entry that is not writable (after fork's write-protect or mprotect, or over the
//!    zero page) and an entry over an inaccessible primary entry (`PROT_NONE`) are violations
//!    too. The shared zero page is a frame like any other here: a mirror may map it where the
//!    primary does (read-only), and a mirror still mapping it after the first write copied it
//!    is stale.
//! 2. **Balance.** Every classic subscriber that declares an end received as many ends as
//!    successful starts (from the recording wrapper's counters, which outlive `Mm::release`);
//!    every model's in-flight counter (KVM's `in_progress` and `active_invalidate_count`, GRU's
//!    `range_active`) is zero; the interval sequence is even with no invalidation active.
//! 3. **Progress.** No bounded wait of any model ran out (a fault, a `read_begin`, a memslot
//!    update): each would have been a permanent hang in the kernel.
//!
//! The oracle never waits and never changes anything.

use std::fmt;
use std::time::Duration;

use crate::frames::FrameId;
use crate::mm::{SimMm, SubscriberKind};
use crate::secondary::{Hang, SecondaryMmu};
use crate::vma::addr_of;

/// One broken property, found by [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// A secondary maps a page to another frame than the primary does, or maps a page the
    /// primary does not map.
    StaleMapping {
        /// The secondary.
        mirror: String,
        /// The virtual page.
        vpn: u64,
        /// The frame the secondary maps.
        secondary: FrameId,
        /// The frame the primary maps, if any.
        primary: Option<FrameId>,
    },
    /// A secondary allows writes to a page the primary has write-protected.
    WritableOverReadOnly {
        /// The secondary.
        mirror: String,
        /// The virtual page.
        vpn: u64,
    },
    /// A secondary maps a page the primary made inaccessible.
    MappedOverInaccessible {
        /// The secondary.
        mirror: String,
        /// The virtual page.
        vpn: u64,
    },
    /// A classic subscriber with an end got a different number of ends than starts.
    Unbalanced {
        /// The subscriber.
        subscriber: String,
        /// Successful starts.
        starts: u64,
        /// Ends.
        ends: u64,
    },
    /// A model's in-flight counter is not zero although nothing is in flight.
    CounterRaised {
        /// The model.
        mirror: String,
        /// The counter.
        counter: &'static str,
        /// Its value.
        value: i64,
    },
    /// The interval epoch is open although nothing is in flight.
    EpochOpen {
        /// The interval sequence.
        seq: u64,
        /// Invalidations counted in flight.
        active: usize,
    },
    /// A bounded wait ran out: in the kernel it would never return.
    Hang {
        /// The model.
        mirror: String,
        /// What waited.
        what: &'static str,
        /// The page, if any.
        vpn: Option<u64>,
        /// How long it waited.
        waited: Duration,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::StaleMapping {
                mirror,
                vpn,
                secondary,
                primary: Some(primary),
            } => write!(
                f,
                "{mirror} maps the page at {:#x} to {secondary}, but the primary maps it to {primary}.",
                addr_of(*vpn)
            ),
            Violation::StaleMapping {
                mirror,
                vpn,
                secondary,
                primary: None,
            } => write!(
                f,
                "{mirror} maps the page at {:#x} to {secondary}, but the primary does not map that page.",
                addr_of(*vpn)
            ),
            Violation::WritableOverReadOnly { mirror, vpn } => write!(
                f,
                "{mirror} allows writes to the page at {:#x}, which the primary has write-protected.",
                addr_of(*vpn)
            ),
            Violation::MappedOverInaccessible { mirror, vpn } => write!(
                f,
                "{mirror} maps the page at {:#x}, which the primary has made inaccessible.",
                addr_of(*vpn)
            ),
            Violation::Unbalanced {
                subscriber,
                starts,
                ends,
            } => write!(
                f,
                "{subscriber} received {starts} successful starts but {ends} ends."
            ),
            Violation::CounterRaised {
                mirror,
                counter,
                value,
            } => write!(
                f,
                "{mirror}'s {counter} is {value} although no invalidation is in flight."
            ),
            Violation::EpochOpen { seq, active } => write!(
                f,
                "the interval epoch is open (sequence {seq}, {active} invalidations counted active) although none is in flight."
            ),
            Violation::Hang {
                mirror,
                what,
                vpn: Some(vpn),
                waited,
            } => write!(
                f,
                "{mirror}'s {what} on the page at {:#x} gave up after {waited:?}; in the kernel it would wait forever.",
                addr_of(*vpn)
            ),
            Violation::Hang {
                mirror,
                what,
                vpn: None,
                waited,
            } => write!(
                f,
                "{mirror}'s {what} gave up after {waited:?}; in the kernel it would wait forever."
            ),
        }
    }
}

impl From<Hang> for Violation {
    fn from(h: Hang) -> Self {
        Violation::Hang {
            mirror: h.mirror,
            what: h.what,
            vpn: h.vpn,
            waited: h.waited,
        }
    }
}

/// Checks `sim` and `mirrors` at a quiet moment; returns every violation found (empty:
/// coherent). See the module docs for what is checked.
pub fn check(sim: &SimMm, mirrors: &[&dyn SecondaryMmu]) -> Vec<Violation> {
    let mut out = Vec::new();
    for mirror in mirrors {
        for (vpn, entry) in mirror.entries() {
            let name = mirror.name().to_owned();
            match sim.lookup_vpn(vpn) {
                Some(pte) if pte.frame != entry.frame => out.push(Violation::StaleMapping {
                    mirror: name,
                    vpn,
                    secondary: entry.frame,
                    primary: Some(pte.frame),
                }),
                None => out.push(Violation::StaleMapping {
                    mirror: name,
                    vpn,
                    secondary: entry.frame,
                    primary: None,
                }),
                Some(pte) if !pte.accessible => {
                    out.push(Violation::MappedOverInaccessible { mirror: name, vpn })
                }
                Some(pte) if entry.writable && !pte.writable => {
                    out.push(Violation::WritableOverReadOnly { mirror: name, vpn })
                }
                Some(_) => {}
            }
        }
    }
    for sub in sim.subscribers() {
        if let SubscriberKind::Classic { caps, .. } = sub.kind {
            if caps.has_end() && sub.counts.starts != sub.counts.ends {
                out.push(Violation::Unbalanced {
                    subscriber: sub.name,
                    starts: sub.counts.starts,
                    ends: sub.counts.ends,
                });
            }
        }
    }
    for mirror in mirrors {
        for (counter, value) in mirror.quiet_counters() {
            if value != 0 {
                out.push(Violation::CounterRaised {
                    mirror: mirror.name().to_owned(),
                    counter,
                    value,
                });
            }
        }
    }
    let state = sim.mm().interval_state();
    if state.active != 0 || state.seq % 2 == 1 {
        out.push(Violation::EpochOpen {
            seq: state.seq,
            active: state.active,
        });
    }
    for mirror in mirrors {
        out.extend(mirror.hangs().into_iter().map(Violation::from));
    }
    out
}
