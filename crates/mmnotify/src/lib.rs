//! MMU notifiers for userspace.
//!
//! A *primary* address space (a process's page tables, or a simulated one) changes its
//! mappings; *secondary* MMUs (a hypervisor's shadow tables, a device's page tables, a cache of
//! pinned registrations) mirror parts of it and must drop their copy before each change. This
//! crate is the hub between the two, re-built from the Linux MMU-notifier contract:
//!
//! * an [`Mm`] per address space owns every subscription to it;
//! * **classic subscribers** ([`Subscriber`]) get [`invalidate_range_start`] before a range
//!   changes and [`invalidate_range_end`] after, plus `release`, the young callbacks and the
//!   secondary-TLB callback;
//! * **interval subscribers** ([`IntervalSubscriber`]) cover a fixed range and get one
//!   [`invalidate`](IntervalSubscriber::invalidate) call per overlapping change, with the
//!   sequence-count collision-retry protocol ([`IntervalHandle::read_begin`] /
//!   [`IntervalHandle::read_retry`]) to fill their mirror without holding locks across faults;
//! * the primary brackets every change with [`Mm::invalidate_start`] (or
//!   [`Mm::invalidate_start_nonblock`] where it must not sleep) and the returned
//!   [`InvalidateGuard`].
//!
//! # Pairing is exact, by construction
//!
//! In Linux, a non-blocking start may be refused, and for years the matching ends were lost
//! (the OOM reaper left KVM's counter raised and GRU's faults asleep). Linux fixed it with a
//! convention: a subscriber whose start can fail must not have an end. Here the guard records,
//! over an immutable snapshot of the subscribers, exactly whose start succeeded; the end (or a
//! refusal, or a panic) reaches exactly those, and the interval epoch the start opened is
//! closed on every path. [`Policy::Kernel`] and [`Policy::Legacy`] reproduce Linux's behaviours
//! for comparison. `docs/SEMANTICS.md` in the repository lists every guarantee, numbered.
//!
//! # Example: a KVM-like mirror
//!
//! The subscriber counts invalidations in progress and bumps a sequence at each end; the
//! fault path snapshots the sequence, resolves the page (the slow part, without the lock),
//! then commits under the lock only if no invalidation is in progress or finished meanwhile,
//! and otherwise retries, as KVM's `mmu_invalidate_retry` does.
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::{Arc, Mutex};
//! use mmnotify::{Capabilities, Event, Invalidation, Mm, Range, Refused, Subscriber};
//!
//! #[derive(Default)]
//! struct Shadow { in_progress: u32, seq: u64, sptes: HashMap<u64, u64> }
//!
//! #[derive(Default)]
//! struct KvmLike(Mutex<Shadow>);
//!
//! impl Subscriber for KvmLike {
//!     fn capabilities(&self) -> Capabilities { Capabilities::new().with_start().with_end() }
//!     fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
//!         let mut s = self.0.lock().unwrap();
//!         s.in_progress += 1;
//!         s.sptes.retain(|gfn, _| !inv.range().contains(*gfn));
//!         Ok(())
//!     }
//!     fn invalidate_range_end(&self, _: &Invalidation) {
//!         let mut s = self.0.lock().unwrap();
//!         s.seq += 1;
//!         s.in_progress -= 1;
//!     }
//! }
//!
//! impl KvmLike {
//!     /// Maps `gfn`; returns false if the caller must retry (re-enter the guest).
//!     fn fault(&self, gfn: u64, resolve: impl FnOnce() -> u64) -> bool {
//!         let seq = self.0.lock().unwrap().seq;
//!         let pfn = resolve(); // may sleep, may race with an invalidation
//!         let mut s = self.0.lock().unwrap();
//!         if s.in_progress > 0 || s.seq != seq {
//!             return false;
//!         }
//!         s.sptes.insert(gfn, pfn);
//!         true
//!     }
//! }
//!
//! let mm = Mm::new();
//! let kvm = Arc::new(KvmLike::default());
//! mm.register(kvm.clone())?;
//!
//! assert!(kvm.fault(0x1000, || 42));
//! // A fault that races with an invalidation of its page must retry.
//! let range = Range::new(0x1000, 0x2000)?;
//! assert!(!kvm.fault(0x1000, || {
//!     mm.invalidate_start(range, Event::Unmap).unwrap().end();
//!     43
//! }));
//! assert!(kvm.0.lock().unwrap().sptes.is_empty());
//! assert!(kvm.fault(0x1000, || 44));
//! mm.release()?;
//! # Ok::<(), mmnotify::Error>(())
//! ```
//!
//! # Map of the crate
//!
//! | concept                                    | file |
//! |--------------------------------------------|------|
//! | ranges, events, blockability               | `range.rs` |
//! | the hub                                    | `mm.rs` |
//! | classic subscribers and their lifecycle    | `classic.rs` |
//! | interval subscriptions, the sequence protocol, the index | `interval/` |
//! | the invalidation guard (pairing)           | `guard.rs` |
//! | subscriber snapshots and the started set   | `snapshot.rs` |
//! | Exact / Kernel / Legacy                    | `policy.rs` |
//! | the per-`Mm` read side                     | `srcu.rs` |
//! | a number per live thread (per-thread slots) | `thread_index.rs` |
//! | deadlock and non-blocking context checks   | `context.rs` |
//! | the std / loom shim                        | `sync.rs` |
//! | errors                                     | `error.rs` |
//!
//! [`invalidate_range_start`]: Subscriber::invalidate_range_start
//! [`invalidate_range_end`]: Subscriber::invalidate_range_end

#![forbid(unsafe_code)]

mod classic;
mod context;
mod error;
mod guard;
pub mod interval;
mod mm;
mod policy;
mod range;
mod snapshot;
mod srcu;
mod sync;
mod thread_index;

#[cfg(test)]
mod tests;

pub use classic::{Capabilities, Refused, Subscriber, SubscriberId, SubscriberStats};
pub use context::in_nonblocking_context;
pub use error::{BlockingOp, DeadlockCause, Error, Refuser, Result};
pub use guard::InvalidateGuard;
pub use interval::seq::IntervalState;
pub use interval::{
    IntervalCtx, IntervalHandle, IntervalId, IntervalSubscriber, Invalidate, ReadSeq,
};
pub use mm::{Mm, MmBuilder};
pub use policy::{ParsePolicyError, Policy};
pub use range::{Blockable, Event, Invalidation, Owner, Range};

/// The README's example, compiled and run as a doctest so that it cannot rot.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
