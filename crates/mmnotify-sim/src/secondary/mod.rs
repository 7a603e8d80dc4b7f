//! Reference secondary MMUs: small, readable models of the kernel's notifier users.
//!
//! | model            | kernel original              | subscription                         | how its fault path stays coherent |
//! |------------------|------------------------------|--------------------------------------|-----------------------------------|
//! | [`KvmLike`]      | `virt/kvm/kvm_main.c`        | classic start + end + young          | `in_progress` / `seq` / range; faults return [`FaultOutcome::Retry`] |
//! | [`GruLike`]      | `drivers/misc/sgi-gru`       | classic start + end                  | faults *wait* for `range_active == 0` (bounded here) |
//! | [`NouveauLike`]  | `nouveau_svm.c`              | classic start that refuses non-blockable ranges (no end) + interval mirrors | collision retry |
//! | [`HmmMirror`]    | `mm/hmm.c` users, `test_hmm` | interval                             | collision retry, bounded `read_begin` |
//! | [`SvaLike`]      | IOMMU SVA                    | secondary-TLB callback only          | flushed in step with the primary TLB |
//!
//! Each keeps a shadow table (virtual page → frame) filled by its fault path from the
//! [`SimMm`](crate::SimMm)'s page table, and exposes it through [`SecondaryMmu`] so that the
//! [oracle](crate::oracle) can compare it with the primary. Every wait a model can do is
//! bounded; a wait that runs out is recorded as a [`Hang`] instead of blocking forever.

mod gru;
mod hmm;
mod kvm;
mod nouveau;
mod sva;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use mmnotify::Range;

pub use gru::GruLike;
pub use hmm::HmmMirror;
pub use kvm::{GuestAccess, KvmLike};
pub use nouveau::NouveauLike;
pub use sva::SvaLike;

use crate::frames::FrameId;
use crate::page_table::Pte;
use crate::vma::{vpn_of, PAGE_SIZE};

/// One secondary mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShadowEntry {
    /// The frame the secondary maps.
    pub frame: FrameId,
    /// Whether the secondary allows writes through it.
    pub writable: bool,
}

impl ShadowEntry {
    /// The secondary copy of a primary entry.
    pub fn from_pte(pte: &Pte) -> Self {
        ShadowEntry {
            frame: pte.frame,
            writable: pte.writable,
        }
    }
}

/// A shadow page table: virtual page number → entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShadowTable {
    entries: BTreeMap<u64, ShadowEntry>,
}

/// The virtual pages `[first, end)` that `range` touches.
pub fn vpns_of(range: Range) -> (u64, u64) {
    let end = range.end().saturating_add(PAGE_SIZE - 1);
    (
        vpn_of(range.start()),
        vpn_of(end).max(vpn_of(range.start()) + 1),
    )
}

impl ShadowTable {
    /// Installs the entry of `vpn`.
    pub fn insert(&mut self, vpn: u64, entry: ShadowEntry) {
        self.entries.insert(vpn, entry);
    }

    /// The entry of `vpn`.
    pub fn get(&self, vpn: u64) -> Option<ShadowEntry> {
        self.entries.get(&vpn).copied()
    }

    /// Drops the entry of `vpn`; returns it.
    pub fn remove(&mut self, vpn: u64) -> Option<ShadowEntry> {
        self.entries.remove(&vpn)
    }

    /// Drops every entry that `range` touches; returns how many.
    pub fn zap(&mut self, range: Range) -> usize {
        let (first, end) = vpns_of(range);
        let before = self.entries.len();
        if range == Range::ALL {
            self.entries.clear();
        } else {
            self.entries.retain(|vpn, _| *vpn < first || *vpn >= end);
        }
        before - self.entries.len()
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Every entry, in page order.
    pub fn entries(&self) -> Vec<(u64, ShadowEntry)> {
        self.entries.iter().map(|(v, e)| (*v, *e)).collect()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What a secondary fault did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The page is now mapped in the secondary.
    Mapped(ShadowEntry),
    /// An invalidation raced with the fault; nothing was mapped and the caller must retry
    /// (KVM re-enters the guest).
    Retry,
    /// The fault waited for an invalidation to finish and gave up after `waited`: in the
    /// kernel it would sleep forever.
    Hung {
        /// How long it waited.
        waited: Duration,
    },
}

impl FaultOutcome {
    /// Whether the page got mapped.
    pub fn is_mapped(&self) -> bool {
        matches!(self, FaultOutcome::Mapped(_))
    }

    /// Whether the fault hung.
    pub fn is_hung(&self) -> bool {
        matches!(self, FaultOutcome::Hung { .. })
    }
}

impl fmt::Display for FaultOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultOutcome::Mapped(e) => write!(f, "ok ({})", e.frame),
            FaultOutcome::Retry => f.write_str("retry"),
            FaultOutcome::Hung { waited } => write!(f, "hung (gave up after {waited:?})"),
        }
    }
}

/// The result of a bounded wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The condition held in time.
    Ok,
    /// The bound ran out after `waited`; in the kernel the wait would last forever.
    TimedOut {
        /// How long it waited.
        waited: Duration,
    },
}

impl WaitOutcome {
    /// Whether the wait timed out.
    pub fn timed_out(&self) -> bool {
        matches!(self, WaitOutcome::TimedOut { .. })
    }
}

impl fmt::Display for WaitOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitOutcome::Ok => f.write_str("ok"),
            WaitOutcome::TimedOut { waited } => write!(f, "timed out after {waited:?}"),
        }
    }
}

/// A bounded wait that ran out: in the kernel this thread would never wake up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hang {
    /// Which model.
    pub mirror: String,
    /// What waited (e.g. "fault", "read_begin", "memslot update").
    pub what: &'static str,
    /// The page it was about, if any.
    pub vpn: Option<u64>,
    /// How long it waited before giving up.
    pub waited: Duration,
}

/// What the oracle needs from a secondary MMU.
pub trait SecondaryMmu: Send + Sync + fmt::Debug {
    /// The model's name.
    fn name(&self) -> &str;
    /// Its current secondary mappings.
    fn entries(&self) -> Vec<(u64, ShadowEntry)>;
    /// Counters that must be zero whenever no invalidation is in flight, with their names
    /// (e.g. KVM's `in_progress`, GRU's `range_active`).
    fn quiet_counters(&self) -> Vec<(&'static str, i64)> {
        Vec::new()
    }
    /// Every bounded wait of this model that ran out.
    fn hangs(&self) -> Vec<Hang>;
}

/// How many times a fault path retries after a collision before giving up with
/// [`FaultOutcome::Retry`].
pub const MAX_FAULT_RETRIES: usize = 16;

/// The collision-retry fault path of interval mirrors (§4.3 of the reference): `read_begin`
/// (bounded), fault the primary, take the mirror lock, `read_retry`, commit under the lock.
#[expect(
    clippy::too_many_arguments,
    reason = "the mirror's parts are passed separately so both interval models can share this"
)]
pub(crate) fn collision_retry_fault(
    name: &str,
    handle: &mmnotify::IntervalHandle,
    table: &crate::sync::Mutex<ShadowTable>,
    sim: &crate::SimMm,
    addr: u64,
    access: crate::Access,
    timeout: Duration,
    hangs: &crate::sync::Mutex<Vec<Hang>>,
) -> Result<FaultOutcome, crate::SimError> {
    for _ in 0..MAX_FAULT_RETRIES {
        let seq = match handle.read_begin_timeout(timeout) {
            Ok(seq) => seq,
            Err(mmnotify::Error::ReadBeginTimeout { waited, .. }) => {
                hangs.lock().push(Hang {
                    mirror: name.to_owned(),
                    what: "fault (read_begin)",
                    vpn: Some(vpn_of(addr)),
                    waited,
                });
                return Ok(FaultOutcome::Hung { waited });
            }
            Err(e) => return Err(e.into()),
        };
        let pte = sim.fault(addr, access)?;
        let mut table = table.lock();
        if handle.read_retry(seq) {
            continue;
        }
        let entry = ShadowEntry::from_pte(&pte);
        table.insert(vpn_of(addr), entry);
        return Ok(FaultOutcome::Mapped(entry));
    }
    Ok(FaultOutcome::Retry)
}

/// A bounded `read_begin` on `handle`, recording a hang if it runs out.
pub(crate) fn probe_read_begin(
    name: &str,
    handle: &mmnotify::IntervalHandle,
    timeout: Duration,
    hangs: &crate::sync::Mutex<Vec<Hang>>,
) -> Result<WaitOutcome, crate::SimError> {
    match handle.read_begin_timeout(timeout) {
        Ok(_) => Ok(WaitOutcome::Ok),
        Err(mmnotify::Error::ReadBeginTimeout { waited, .. }) => {
            hangs.lock().push(Hang {
                mirror: name.to_owned(),
                what: "read_begin",
                vpn: None,
                waited,
            });
            Ok(WaitOutcome::TimedOut { waited })
        }
        Err(e) => Err(e.into()),
    }
}
