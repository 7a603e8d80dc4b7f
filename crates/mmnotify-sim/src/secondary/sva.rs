//! An IOMMU-SVA-like secondary MMU (Intel `svm.c`, arm-smmu-v3-sva, reduced).
//!
//! The device walks the CPU page table itself and caches translations in its own TLB, so it
//! declares only the secondary-TLB callback (no start, no end): whenever the primary flushes
//! its TLB for a range, [`arch_invalidate_secondary_tlbs`](Subscriber::arch_invalidate_secondary_tlbs)
//! drops the cached translations of that range, without sleeping. The
//! [`SimMm`](crate::SimMm) calls it after each change of primary entries, inside the
//! invalidation window.

use std::sync::Arc;

use mmnotify::{Capabilities, Range, Subscriber};

use super::{Hang, SecondaryMmu, ShadowEntry, ShadowTable, MAX_FAULT_RETRIES};
use crate::error::SimError;
use crate::mm::SimMm;
use crate::sync::Mutex;
use crate::vma::{vpn_of, Access};

/// An SVA-like device TLB; see the module docs.
#[derive(Debug)]
pub struct SvaLike {
    name: String,
    tlb: Mutex<ShadowTable>,
    flushes: Mutex<Vec<Range>>,
}

impl SvaLike {
    /// A new device with an empty TLB.
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(SvaLike {
            name: name.to_owned(),
            tlb: Mutex::new(ShadowTable::default()),
            flushes: Mutex::new(Vec::new()),
        })
    }

    /// A new device registered on `sim` under `name`.
    ///
    /// # Errors
    ///
    /// [`SimError::Engine`] if registration fails.
    pub fn attach(sim: &SimMm, name: &str) -> Result<Arc<Self>, SimError> {
        let sva = SvaLike::new(name);
        sim.register(name, sva.clone())?;
        Ok(sva)
    }

    /// A device access to `addr`: a TLB hit, or a walk of the primary page table (with a page
    /// request, i.e. a primary fault, if the entry is missing or read-only for a write).
    /// Returns the translation used.
    ///
    /// # Errors
    ///
    /// The primary's fault errors.
    pub fn access(&self, sim: &SimMm, addr: u64, access: Access) -> Result<ShadowEntry, SimError> {
        let vpn = vpn_of(addr);
        let usable = |e: &ShadowEntry| access == Access::Read || e.writable;
        for _ in 0..MAX_FAULT_RETRIES {
            {
                // The walk and the fill happen under the TLB lock, so a flush (which takes it)
                // is ordered before or after the whole walk.
                let mut tlb = self.tlb.lock();
                if let Some(e) = tlb.get(vpn).filter(usable) {
                    return Ok(e);
                }
                if let Some(pte) = sim.lookup(addr).filter(|p| p.accessible) {
                    let e = ShadowEntry::from_pte(&pte);
                    if usable(&e) {
                        tlb.insert(vpn, e);
                        return Ok(e);
                    }
                }
            }
            sim.fault(addr, access)?;
        }
        Err(SimError::Unmapped { addr })
    }

    /// The cached translation of the page containing `addr`.
    pub fn cached(&self, addr: u64) -> Option<ShadowEntry> {
        self.tlb.lock().get(vpn_of(addr))
    }

    /// Every flush received, in order.
    pub fn flushes(&self) -> Vec<Range> {
        self.flushes.lock().clone()
    }
}

impl Subscriber for SvaLike {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_secondary_tlb()
    }

    fn arch_invalidate_secondary_tlbs(&self, range: Range) {
        self.tlb.lock().zap(range);
        self.flushes.lock().push(range);
    }

    fn release(&self) {
        self.tlb.lock().clear();
    }
}

impl SecondaryMmu for SvaLike {
    fn name(&self) -> &str {
        &self.name
    }

    fn entries(&self) -> Vec<(u64, ShadowEntry)> {
        self.tlb.lock().entries()
    }

    fn hangs(&self) -> Vec<Hang> {
        Vec::new()
    }
}
