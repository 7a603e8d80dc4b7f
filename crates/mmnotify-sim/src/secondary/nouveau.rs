//! A nouveau-SVM-like secondary MMU (`drivers/gpu/drm/nouveau/nouveau_svm.c`, reduced).
//!
//! Two subscriptions, like the driver:
//!
//! * a **classic** one with a start and *no end*, declared `may_refuse`: it refuses every
//!   non-blockable range (the kernel driver returns `-EAGAIN`), skips migrations it owns, and
//!   otherwise drops the GPU mirror's entries of the range. Linux's convention ("a start that
//!   can fail must not have an end") is what this model follows.
//! * **interval** subscriptions over the regions the GPU mirrors ([`NouveauLike::mirror_region`]):
//!   the callback takes the GPU lock (only *tries* it in non-blocking context, refusing if it is
//!   contended), skips exclusive-access conversions it owns, calls `set_seq` and drops the
//!   mirror's entries. Faults use the collision-retry protocol.
//!
//! The real driver inserts a short-lived interval around each GPU fault; the model keeps one
//! per mirrored region, which is what makes the interval leak observable after an OOM reap.

use std::sync::Arc;
use std::time::Duration;

use mmnotify::{
    Capabilities, Event, IntervalCtx, IntervalHandle, IntervalSubscriber, Invalidate, Invalidation,
    Owner, Refused, Subscriber,
};

use super::{
    collision_retry_fault, probe_read_begin, FaultOutcome, Hang, SecondaryMmu, ShadowEntry,
    ShadowTable, WaitOutcome,
};
use crate::error::SimError;
use crate::mm::SimMm;
use crate::sync::Mutex;
use crate::vma::Access;

#[derive(Debug)]
struct Gpu {
    owner: Owner,
    mirror: Mutex<ShadowTable>,
}

#[derive(Debug)]
struct RegionCallback {
    gpu: Arc<Gpu>,
}

impl IntervalSubscriber for RegionCallback {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        let mirror = if inv.is_blockable() {
            Some(self.gpu.mirror.lock())
        } else {
            self.gpu.mirror.try_lock()
        };
        let Some(mut mirror) = mirror else {
            return Invalidate::Refused;
        };
        if inv.event()
            == (Event::Exclusive {
                owner: self.gpu.owner,
            })
        {
            return Invalidate::Done;
        }
        ctx.set_seq();
        mirror.zap(inv.range());
        Invalidate::Done
    }
}

/// A nouveau-like secondary MMU; see the module docs.
#[derive(Debug)]
pub struct NouveauLike {
    name: String,
    gpu: Arc<Gpu>,
    regions: Mutex<Vec<IntervalHandle>>,
    timeout: Duration,
    hangs: Mutex<Vec<Hang>>,
}

impl NouveauLike {
    /// A new model; `owner` identifies its own migrations, `timeout` bounds its faults'
    /// `read_begin`.
    pub fn new(name: &str, owner: Owner, timeout: Duration) -> Arc<Self> {
        Arc::new(NouveauLike {
            name: name.to_owned(),
            gpu: Arc::new(Gpu {
                owner,
                mirror: Mutex::new(ShadowTable::default()),
            }),
            regions: Mutex::new(Vec::new()),
            timeout,
            hangs: Mutex::new(Vec::new()),
        })
    }

    /// A new model whose classic subscription is registered on `sim` under `name`.
    ///
    /// # Errors
    ///
    /// [`SimError::Engine`] if registration fails.
    pub fn attach(
        sim: &SimMm,
        name: &str,
        owner: Owner,
        timeout: Duration,
    ) -> Result<Arc<Self>, SimError> {
        let nouveau = NouveauLike::new(name, owner, timeout);
        sim.register(name, nouveau.clone())?;
        Ok(nouveau)
    }

    /// The owner cookie of this device.
    pub fn owner(&self) -> Owner {
        self.gpu.owner
    }

    /// Mirrors `[start, start + len)` on the GPU: inserts an interval subscription over it
    /// (named `"<name>/interval"`).
    ///
    /// # Errors
    ///
    /// [`SimError::Engine`] if the interval cannot be inserted.
    pub fn mirror_region(
        &self,
        sim: &SimMm,
        start: u64,
        len: u64,
    ) -> Result<IntervalHandle, SimError> {
        let handle = sim.insert_interval(
            &format!("{}/interval", self.name),
            start,
            len,
            Arc::new(RegionCallback {
                gpu: Arc::clone(&self.gpu),
            }),
        )?;
        self.regions.lock().push(handle.clone());
        Ok(handle)
    }

    /// The interval handles of the mirrored regions.
    pub fn regions(&self) -> Vec<IntervalHandle> {
        self.regions.lock().clone()
    }

    fn region_of(&self, addr: u64) -> Option<IntervalHandle> {
        self.regions
            .lock()
            .iter()
            .find(|h| h.range().contains(addr))
            .cloned()
    }

    /// A GPU fault on the page containing `addr`, through the collision-retry protocol.
    ///
    /// # Errors
    ///
    /// [`SimError::NotMirrored`] if no mirrored region covers `addr`, and the primary's
    /// fault errors.
    pub fn fault(&self, sim: &SimMm, addr: u64, access: Access) -> Result<FaultOutcome, SimError> {
        let handle = self.region_of(addr).ok_or(SimError::NotMirrored { addr })?;
        collision_retry_fault(
            &self.name,
            &handle,
            &self.gpu.mirror,
            sim,
            addr,
            access,
            self.timeout,
            &self.hangs,
        )
    }

    /// A bare bounded `read_begin` on the region covering `addr`.
    ///
    /// # Errors
    ///
    /// [`SimError::NotMirrored`], or [`SimError::Engine`] for a misuse.
    pub fn probe_read_begin(&self, addr: u64) -> Result<WaitOutcome, SimError> {
        let handle = self.region_of(addr).ok_or(SimError::NotMirrored { addr })?;
        probe_read_begin(&self.name, &handle, self.timeout, &self.hangs)
    }
}

impl Subscriber for NouveauLike {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().may_refuse()
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        if !inv.is_blockable() {
            return Err(Refused);
        }
        if inv.event()
            == (Event::Migrate {
                owner: self.gpu.owner,
            })
        {
            return Ok(());
        }
        self.gpu.mirror.lock().zap(inv.range());
        Ok(())
    }

    fn release(&self) {
        self.gpu.mirror.lock().clear();
    }
}

impl SecondaryMmu for NouveauLike {
    fn name(&self) -> &str {
        &self.name
    }

    fn entries(&self) -> Vec<(u64, ShadowEntry)> {
        self.gpu.mirror.lock().entries()
    }

    fn hangs(&self) -> Vec<Hang> {
        self.hangs.lock().clone()
    }
}
