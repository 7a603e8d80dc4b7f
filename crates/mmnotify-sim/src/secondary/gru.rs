//! An SGI-GRU-like secondary MMU (`drivers/misc/sgi-gru`, reduced).
//!
//! * **start**: `range_active += 1`, and the GRU TLB entries of the range are flushed.
//! * **end**: `range_active -= 1`; at 0, every waiting fault is woken.
//! * **fault** (the TLB drop-in): *waits* until `range_active == 0` (the kernel's
//!   uninterruptible `wait_event`), resolves the page from the primary, and installs the TLB
//!   entry under the lock. The model adds a sequence check before committing (the real driver
//!   relies on the next TLB miss instead), so that a racing invalidation makes it wait again.
//!
//! A start without its end leaves `range_active` raised, and every later fault sleeps
//! forever. That is how the 2021 bug showed; here the wait is bounded by the model's timeout
//! and reported as [`FaultOutcome::Hung`].

use std::sync::Arc;
use std::time::Duration;

use mmnotify::{Capabilities, Invalidation, Refused, Subscriber};

use super::{FaultOutcome, Hang, SecondaryMmu, ShadowEntry, ShadowTable, MAX_FAULT_RETRIES};
use crate::error::SimError;
use crate::mm::SimMm;
use crate::sync::{Condvar, Mutex};
use crate::vma::{vpn_of, Access};

#[derive(Debug, Default)]
struct GruState {
    range_active: i64,
    seq: u64,
    tlb: ShadowTable,
}

/// A GRU-like secondary MMU; see the module docs.
#[derive(Debug)]
pub struct GruLike {
    name: String,
    state: Mutex<GruState>,
    wake: Condvar,
    timeout: Duration,
    hangs: Mutex<Vec<Hang>>,
}

impl GruLike {
    /// A new model whose faults give up waiting after `timeout`.
    pub fn new(name: &str, timeout: Duration) -> Arc<Self> {
        Arc::new(GruLike {
            name: name.to_owned(),
            state: Mutex::new(GruState::default()),
            wake: Condvar::new(),
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
        let gru = GruLike::new(name, timeout);
        sim.register(name, gru.clone())?;
        Ok(gru)
    }

    /// Invalidations in flight (`ms_range_active`).
    pub fn range_active(&self) -> i64 {
        self.state.lock().range_active
    }

    /// The TLB entry of the page containing `addr`.
    pub fn tlb_entry(&self, addr: u64) -> Option<ShadowEntry> {
        self.state.lock().tlb.get(vpn_of(addr))
    }

    /// A TLB miss on the page containing `addr`: waits (bounded) for `range_active == 0`,
    /// resolves the page, installs it.
    ///
    /// # Errors
    ///
    /// The primary's fault errors.
    pub fn fault(&self, sim: &SimMm, addr: u64, access: Access) -> Result<FaultOutcome, SimError> {
        for _ in 0..MAX_FAULT_RETRIES {
            let seq = {
                let state = self.state.lock();
                let (state, waited) = self
                    .wake
                    .wait_until(state, self.timeout, |s| s.range_active == 0);
                if let Err(waited) = waited {
                    drop(state);
                    self.hangs.lock().push(Hang {
                        mirror: self.name.clone(),
                        what: "fault (wait for range_active == 0)",
                        vpn: Some(vpn_of(addr)),
                        waited,
                    });
                    return Ok(FaultOutcome::Hung { waited });
                }
                state.seq
            };
            let pte = sim.fault(addr, access)?;
            let mut state = self.state.lock();
            if state.range_active == 0 && state.seq == seq {
                let entry = ShadowEntry::from_pte(&pte);
                state.tlb.insert(vpn_of(addr), entry);
                return Ok(FaultOutcome::Mapped(entry));
            }
        }
        Ok(FaultOutcome::Retry)
    }
}

impl Subscriber for GruLike {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        let mut state = self.state.lock();
        state.range_active += 1;
        state.tlb.zap(inv.range());
        Ok(())
    }

    fn invalidate_range_end(&self, _inv: &Invalidation) {
        let mut state = self.state.lock();
        state.range_active -= 1;
        state.seq += 1;
        if state.range_active == 0 {
            self.wake.notify_all();
        }
    }

    fn release(&self) {
        self.state.lock().tlb.clear();
    }
}

impl SecondaryMmu for GruLike {
    fn name(&self) -> &str {
        &self.name
    }

    fn entries(&self) -> Vec<(u64, ShadowEntry)> {
        self.state.lock().tlb.entries()
    }

    fn quiet_counters(&self) -> Vec<(&'static str, i64)> {
        vec![("range_active", self.range_active())]
    }

    fn hangs(&self) -> Vec<Hang> {
        self.hangs.lock().clone()
    }
}
