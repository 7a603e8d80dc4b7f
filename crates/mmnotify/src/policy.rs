//! Who gets an `invalidate_range_end` when a start is refused: ours, and Linux's two historic
//! answers, so that the same scenario can be run under each and compared.
//!
//! The dispatcher (in `guard.rs`) is mechanism: it calls the starts, and records facts (who was
//! called, who refused, whether the range was blockable). This module is policy: a handful of
//! pure functions that turn those facts into decisions. Nothing here touches shared state.
//!
//! | after a refusal…                              | `Exact` (default) | `Kernel` (Linux ≥ 5.12) | `Legacy` (Linux 4.19–5.11) |
//! |-----------------------------------------------|-------------------|-------------------------|----------------------------|
//! | later classic starts are still called          | no                | yes                     | yes                        |
//! | `end` goes to                                  | exactly the subscribers whose start succeeded | every subscriber that declares an end (refusers included) | nobody |
//! | the interval epoch opened by this start closes | yes               | no (the leak of the reference's §9.8) | no (same code shape) |
//! | a refusal on a *blockable* range               | reported; the refuser gets no end, the others proceed | reported; ends are sent at once *and* again at the real end | reported; ignored, the refuser is ended like everyone else |
//!
//! Two rules do not depend on a refusal:
//!
//! | | `Exact` | `Kernel` | `Legacy` |
//! |---|---|---|---|
//! | classic call order (starts, ends, young, TLB, release) | oldest registration first | newest first (Linux adds with `hlist_add_head_rcu`) | newest first |
//! | a subscriber whose `release` returned, still linked (process exit under way) | skipped by starts and walks | served like any other until unlinked, as in Linux | same as `Kernel` |
//!
//! On success the three agree: every subscriber whose start ran (or that has no start) and
//! that declares an end gets exactly one end.

use std::fmt;
use std::str::FromStr;

use crate::classic::Capabilities;

/// How an [`Mm`](crate::Mm) pairs ends with starts when a start is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Policy {
    /// mmnotify's own: a refused non-blocking start ends exactly the subscribers whose start
    /// succeeded, closes the interval epoch, and reports the refusers. Nothing is ever lost or
    /// sent twice.
    #[default]
    Exact,
    /// Linux since v5.12 (commit c2655835fd8c): every classic start is called even after a
    /// refusal; then every subscriber that declares an end gets one, refusers included; the
    /// interval epoch is *not* closed when a classic start refuses after interval callbacks
    /// succeeded, so later `read_begin` and `remove` calls on a touched interval wait forever.
    Kernel,
    /// Linux 4.19 to 5.11: every classic start is called; on a refusal nobody gets an end
    /// (the caller skips it), so subscribers whose start succeeded stay raised forever; the
    /// interval epoch leaks as under `Kernel`.
    Legacy,
}

impl Policy {
    /// Every policy, ours first.
    pub const ALL: [Policy; 3] = [Policy::Exact, Policy::Kernel, Policy::Legacy];

    /// The lower-case name used on command lines and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Policy::Exact => "exact",
            Policy::Kernel => "kernel",
            Policy::Legacy => "legacy",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A policy name that is not `exact`, `kernel` or `legacy`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?}; expected exact, kernel or legacy")]
pub struct ParsePolicyError(pub String);

impl FromStr for Policy {
    type Err = ParsePolicyError;

    /// Parses a policy name, ignoring case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParsePolicyError(s.to_owned()))
    }
}

/// What a policy does with a start refused on a *blockable* range (a contract violation: a
/// blockable start must not refuse).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockableRefusal {
    /// The refuser is treated as not started (no end); the others proceed.
    NotStarted,
    /// Linux ≥ 5.12: ends go at once to every subscriber with an end, and the caller, which
    /// ignores a blockable start's result, sends them all again at its end.
    EndNowAndLater,
    /// Linux 4.19–5.11: the result is ignored and the refuser is ended like everyone else.
    Ignored,
}

impl Policy {
    /// Whether the classic start chain continues after a refusal.
    pub(crate) const fn continue_after_refusal(self) -> bool {
        !matches!(self, Policy::Exact)
    }

    /// Whether, after a non-blocking refusal, a subscriber with these capabilities, whose
    /// start did (`started`) or did not succeed, is sent an end.
    pub(crate) const fn end_after_refusal(self, caps: Capabilities, started: bool) -> bool {
        match self {
            Policy::Exact => started && caps.has_end(),
            Policy::Kernel => caps.has_end(),
            Policy::Legacy => false,
        }
    }

    /// Whether a classic refusal closes the interval epoch that the same start opened.
    pub(crate) const fn close_epoch_after_classic_refusal(self) -> bool {
        matches!(self, Policy::Exact)
    }

    /// Whether classic subscribers are called newest first, as Linux does (its list is built
    /// with `hlist_add_head_rcu`); otherwise in registration order.
    pub(crate) const fn newest_first(self) -> bool {
        !matches!(self, Policy::Exact)
    }

    /// Whether starts and young/TLB walks skip a subscriber whose `release` has returned but
    /// that is still linked (during process exit). Linux serves it until it is unlinked, so a
    /// Linux policy must too: skipping its start while `Kernel` still sends it the refusal's
    /// end would hand it an end without a start.
    pub(crate) const fn skips_released(self) -> bool {
        matches!(self, Policy::Exact)
    }

    /// Whether a refusal by a subscriber that declares an end breaks the policy's rules (Linux
    /// since v5.12 warns: "a notifier whose start can fail must not have an end").
    pub(crate) const fn refuser_must_not_have_end(self) -> bool {
        matches!(self, Policy::Kernel)
    }

    /// What happens when a start refuses although the range was blockable.
    pub(crate) const fn blockable_refusal(self) -> BlockableRefusal {
        match self {
            Policy::Exact => BlockableRefusal::NotStarted,
            Policy::Kernel => BlockableRefusal::EndNowAndLater,
            Policy::Legacy => BlockableRefusal::Ignored,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const WITH_END: Capabilities = Capabilities::new().with_start().with_end();
    const NO_END: Capabilities = Capabilities::new().with_start().may_refuse();

    /// I5: under Exact an end after a refusal goes exactly to started subscribers with an end.
    #[test]
    fn exact_ends_only_started_subscribers() {
        assert!(Policy::Exact.end_after_refusal(WITH_END, true));
        assert!(!Policy::Exact.end_after_refusal(WITH_END, false));
        assert!(!Policy::Exact.end_after_refusal(NO_END, true));
        assert!(!Policy::Exact.continue_after_refusal());
        assert!(Policy::Exact.close_epoch_after_classic_refusal());
    }

    /// P2: Kernel ends everyone with an end, started or not, and leaks the epoch.
    #[test]
    fn kernel_ends_everyone_with_an_end() {
        assert!(Policy::Kernel.end_after_refusal(WITH_END, false));
        assert!(!Policy::Kernel.end_after_refusal(NO_END, true));
        assert!(Policy::Kernel.continue_after_refusal());
        assert!(!Policy::Kernel.close_epoch_after_classic_refusal());
    }

    #[test]
    fn names_round_trip() {
        for p in Policy::ALL {
            assert_eq!(p.name().parse::<Policy>(), Ok(p));
            assert_eq!(p.to_string().to_uppercase().parse::<Policy>(), Ok(p));
        }
        let err = "strict".parse::<Policy>().unwrap_err();
        assert!(err.to_string().contains("unknown policy \"strict\""));
    }

    /// P3: Legacy ends nobody after a refusal.
    #[test]
    fn legacy_ends_nobody() {
        assert!(!Policy::Legacy.end_after_refusal(WITH_END, true));
        assert!(Policy::Legacy.continue_after_refusal());
        assert_eq!(
            Policy::Legacy.blockable_refusal(),
            BlockableRefusal::Ignored
        );
    }
}
