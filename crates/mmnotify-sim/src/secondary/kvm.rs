//! A KVM-like secondary MMU (`virt/kvm/kvm_main.c`, reduced).
//!
//! * **start**: `active_invalidate_count += 1` (this is what holds off memslot updates), then
//!   under the MMU lock `in_progress += 1`, the tracked range becomes the union of every
//!   invalidation in flight (reset when `in_progress` returns to 0), and the shadow entries
//!   (SPTEs) of the range are zapped.
//! * **end**: under the MMU lock `seq += 1`, `in_progress -= 1` (going negative is counted as
//!   a KVM bug); then `active_invalidate_count -= 1`, waking memslot updaters at 0.
//! * **fault**: snapshot `seq`, resolve the page from the primary (may fault it in; no lock
//!   held), take the MMU lock, and commit only if no invalidation covering the page is in
//!   progress and `seq` did not move; otherwise return [`FaultOutcome::Retry`]: the fault never
//!   waits (the vCPU re-enters the guest).
//! * **young**: each SPTE has an accessed bit, set by faults and guest accesses, tested and
//!   cleared by `clear_flush_young`.
//! * **guest**: loads and stores go through the SPTEs ([`KvmLike::guest_read`],
//!   [`KvmLike::guest_write`]); a missing SPTE, or a store to a read-only one (the zero page,
//!   a write-protected page), is an EPT violation that KVM's fault path must resolve
//!   ([`KvmLike::guest_load`], [`KvmLike::guest_store`]).
//!
//! A start without its end leaves `in_progress` raised: every fault in the range retries
//! forever and [`KvmLike::update_memslots`] waits forever (bounded here, reported as a hang).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use mmnotify::{Capabilities, Invalidation, Range, Refused, Subscriber};

use super::{
    FaultOutcome, Hang, SecondaryMmu, ShadowEntry, ShadowTable, WaitOutcome, MAX_FAULT_RETRIES,
};
use crate::error::SimError;
use crate::mm::SimMm;
use crate::sync::{Condvar, Mutex};
use crate::vma::{vpn_of, Access};

/// What a guest access through [`KvmLike::guest_load`] or [`KvmLike::guest_store`] observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestAccess {
    /// The SPTE allowed the access without an exit; the word read or written.
    Hit(u64),
    /// The access took an EPT violation; KVM's fault path mapped the page and the access
    /// completed with this word.
    Faulted(u64),
    /// The access took an EPT violation that KVM could not resolve (an invalidation kept
    /// its fault retrying).
    Unresolved(FaultOutcome),
}

impl GuestAccess {
    /// The word read or written, if the access completed.
    pub fn word(&self) -> Option<u64> {
        match *self {
            GuestAccess::Hit(w) | GuestAccess::Faulted(w) => Some(w),
            GuestAccess::Unresolved(_) => None,
        }
    }

    /// Whether the access exited to KVM (an EPT violation).
    pub fn faulted(&self) -> bool {
        !matches!(self, GuestAccess::Hit(_))
    }
}

#[derive(Debug, Default)]
struct MmuState {
    in_progress: i64,
    seq: u64,
    range: Option<(u64, u64)>,
    sptes: ShadowTable,
    young: BTreeSet<u64>,
    bugs: u64,
}

/// A KVM-like secondary MMU; see the module docs.
#[derive(Debug)]
pub struct KvmLike {
    name: String,
    mmu: Mutex<MmuState>,
    active_invalidate_count: Mutex<i64>,
    memslot_wake: Condvar,
    timeout: Duration,
    hangs: Mutex<Vec<Hang>>,
}

impl KvmLike {
    /// A new, empty model; `timeout` bounds [`update_memslots`](Self::update_memslots).
    pub fn new(name: &str, timeout: Duration) -> Arc<Self> {
        Arc::new(KvmLike {
            name: name.to_owned(),
            mmu: Mutex::new(MmuState::default()),
            active_invalidate_count: Mutex::new(0),
            memslot_wake: Condvar::new(),
            timeout,
            hangs: Mutex::new(Vec::new()),
        })
    }

    /// A new model registered on `sim` under `name`.
    ///
    /// # Errors
    ///
    /// [`SimError::Engine`] if registration fails.
    pub fn attach(sim: &SimMm, name: &str, timeout: Duration) -> Result<Arc<Self>, SimError> {
        let kvm = KvmLike::new(name, timeout);
        sim.register(name, kvm.clone())?;
        Ok(kvm)
    }

    /// Invalidations in progress (`mmu_invalidate_in_progress`).
    pub fn in_progress(&self) -> i64 {
        self.mmu.lock().in_progress
    }

    /// The invalidation sequence (`mmu_invalidate_seq`).
    pub fn seq(&self) -> u64 {
        self.mmu.lock().seq
    }

    /// The union of the ranges in flight, while `in_progress > 0`.
    pub fn invalidate_range(&self) -> Option<Range> {
        self.mmu
            .lock()
            .range
            .and_then(|(s, e)| Range::new(s, e).ok())
    }

    /// `mn_active_invalidate_count`.
    pub fn active_invalidate_count(&self) -> i64 {
        *self.active_invalidate_count.lock()
    }

    /// Ends delivered while nothing was in progress (`KVM_BUG_ON`).
    pub fn bugs(&self) -> u64 {
        self.mmu.lock().bugs
    }

    /// The shadow entry of the page containing `addr`.
    pub fn spte(&self, addr: u64) -> Option<ShadowEntry> {
        self.mmu.lock().sptes.get(vpn_of(addr))
    }

    /// One fault on the page containing `addr`: [`FaultOutcome::Mapped`] or
    /// [`FaultOutcome::Retry`].
    ///
    /// # Errors
    ///
    /// The primary's fault errors (unmapped, access violation, exited).
    pub fn fault(&self, sim: &SimMm, addr: u64, access: Access) -> Result<FaultOutcome, SimError> {
        let vpn = vpn_of(addr);
        let seq = self.mmu.lock().seq;
        let pte = sim.fault(addr, access)?;
        let mut mmu = self.mmu.lock();
        let covered = mmu.range.is_some_and(|(s, e)| s <= addr && addr < e);
        if (mmu.in_progress > 0 && covered) || mmu.seq != seq {
            return Ok(FaultOutcome::Retry);
        }
        let entry = ShadowEntry::from_pte(&pte);
        mmu.sptes.insert(vpn, entry);
        mmu.young.insert(vpn);
        Ok(FaultOutcome::Mapped(entry))
    }

    /// Faults until mapped, at most [`MAX_FAULT_RETRIES`] times; returns the last outcome.
    ///
    /// # Errors
    ///
    /// As [`fault`](Self::fault).
    pub fn fault_retrying(
        &self,
        sim: &SimMm,
        addr: u64,
        access: Access,
    ) -> Result<FaultOutcome, SimError> {
        let mut outcome = FaultOutcome::Retry;
        for _ in 0..MAX_FAULT_RETRIES {
            outcome = self.fault(sim, addr, access)?;
            if outcome.is_mapped() {
                break;
            }
        }
        Ok(outcome)
    }

    /// The guest touches the page containing `addr` through its SPTE (sets the accessed bit);
    /// returns whether the SPTE was present.
    pub fn guest_access(&self, addr: u64) -> bool {
        let mut mmu = self.mmu.lock();
        let vpn = vpn_of(addr);
        if mmu.sptes.get(vpn).is_some() {
            mmu.young.insert(vpn);
            true
        } else {
            false
        }
    }

    /// A guest load through the SPTE of `addr`: the word it reads, or `None` for an EPT
    /// violation (no SPTE: the vCPU exits and KVM must fault the page in).
    pub fn guest_read(&self, sim: &SimMm, addr: u64) -> Option<u64> {
        let mut mmu = self.mmu.lock();
        let vpn = vpn_of(addr);
        let spte = mmu.sptes.get(vpn)?;
        mmu.young.insert(vpn);
        // Read under the MMU lock: no invalidation can zap the SPTE and free the frame while
        // the guest reads through it.
        Some(sim.frame_word(spte.frame))
    }

    /// A guest store of `word` through the SPTE of `addr`; `false` for an EPT violation (no
    /// SPTE, or a read-only one: the zero page, a write-protected copy-on-write page).
    pub fn guest_write(&self, sim: &SimMm, addr: u64, word: u64) -> bool {
        let mut mmu = self.mmu.lock();
        let vpn = vpn_of(addr);
        match mmu.sptes.get(vpn) {
            Some(spte) if spte.writable => {
                mmu.young.insert(vpn);
                sim.store_frame_word(spte.frame, word);
                true
            }
            _ => false,
        }
    }

    /// A guest load as the vCPU runs it: through the SPTE if there is one, else after KVM's
    /// fault path mapped the page (retried as [`fault_retrying`](Self::fault_retrying) does).
    ///
    /// # Errors
    ///
    /// As [`fault`](Self::fault).
    pub fn guest_load(&self, sim: &SimMm, addr: u64) -> Result<GuestAccess, SimError> {
        if let Some(word) = self.guest_read(sim, addr) {
            return Ok(GuestAccess::Hit(word));
        }
        let outcome = self.fault_retrying(sim, addr, Access::Read)?;
        Ok(match self.guest_read(sim, addr) {
            Some(word) if outcome.is_mapped() => GuestAccess::Faulted(word),
            _ => GuestAccess::Unresolved(outcome),
        })
    }

    /// A guest store as the vCPU runs it: through a writable SPTE if there is one, else after
    /// KVM's write fault mapped the page writable.
    ///
    /// # Errors
    ///
    /// As [`fault`](Self::fault).
    pub fn guest_store(&self, sim: &SimMm, addr: u64, word: u64) -> Result<GuestAccess, SimError> {
        if self.guest_write(sim, addr, word) {
            return Ok(GuestAccess::Hit(word));
        }
        let outcome = self.fault_retrying(sim, addr, Access::Write)?;
        Ok(
            if outcome.is_mapped() && self.guest_write(sim, addr, word) {
                GuestAccess::Faulted(word)
            } else {
                GuestAccess::Unresolved(outcome)
            },
        )
    }

    /// A memslot update: waits (bounded by the model's timeout) until no invalidation is
    /// active, as `kvm_swap_active_memslots` does; a timeout is recorded as a hang.
    pub fn update_memslots(&self) -> WaitOutcome {
        let count = self.active_invalidate_count.lock();
        let (_count, waited) = self
            .memslot_wake
            .wait_until(count, self.timeout, |c| *c == 0);
        match waited {
            Ok(()) => WaitOutcome::Ok,
            Err(waited) => {
                self.hangs.lock().push(Hang {
                    mirror: self.name.clone(),
                    what: "memslot update",
                    vpn: None,
                    waited,
                });
                WaitOutcome::TimedOut { waited }
            }
        }
    }

    fn test_and_clear_young(&self, range: Range, clear: bool) -> bool {
        let (first, end) = super::vpns_of(range);
        let mut mmu = self.mmu.lock();
        let young: Vec<u64> = mmu.young.range(first..end).copied().collect();
        if clear {
            for vpn in &young {
                mmu.young.remove(vpn);
            }
        }
        !young.is_empty()
    }
}

impl Subscriber for KvmLike {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        *self.active_invalidate_count.lock() += 1;
        let mut mmu = self.mmu.lock();
        mmu.in_progress += 1;
        let (s, e) = (inv.range().start(), inv.range().end());
        mmu.range = Some(match mmu.range {
            Some((rs, re)) if mmu.in_progress > 1 => (rs.min(s), re.max(e)),
            _ => (s, e),
        });
        mmu.sptes.zap(inv.range());
        Ok(())
    }

    fn invalidate_range_end(&self, _inv: &Invalidation) {
        {
            let mut mmu = self.mmu.lock();
            mmu.seq += 1;
            mmu.in_progress -= 1;
            if mmu.in_progress < 0 {
                mmu.bugs += 1;
            }
            if mmu.in_progress == 0 {
                mmu.range = None;
            }
        }
        let mut count = self.active_invalidate_count.lock();
        *count -= 1;
        if *count == 0 {
            self.memslot_wake.notify_all();
        }
    }

    fn release(&self) {
        let mut mmu = self.mmu.lock();
        mmu.sptes.clear();
        mmu.young.clear();
    }

    fn clear_flush_young(&self, range: Range) -> bool {
        self.test_and_clear_young(range, true)
    }

    fn clear_young(&self, range: Range) -> bool {
        self.test_and_clear_young(range, true)
    }

    fn test_young(&self, addr: u64) -> bool {
        self.mmu.lock().young.contains(&vpn_of(addr))
    }
}

impl SecondaryMmu for KvmLike {
    fn name(&self) -> &str {
        &self.name
    }

    fn entries(&self) -> Vec<(u64, ShadowEntry)> {
        self.mmu.lock().sptes.entries()
    }

    fn quiet_counters(&self) -> Vec<(&'static str, i64)> {
        vec![
            ("in_progress", self.in_progress()),
            ("active_invalidate_count", self.active_invalidate_count()),
        ]
    }

    fn hangs(&self) -> Vec<Hang> {
        self.hangs.lock().clone()
    }
}
