//! An HMM mirror (`mm/hmm.c` users: `test_hmm`, amdgpu, RDMA ODP, reduced): one interval
//! subscription over the mirrored range and the collision-retry fault path.
//!
//! * **invalidate**: ignore the `Migrate` of a migration the mirror's own device started (its
//!   [`Owner`]), as `test_hmm` and nouveau do: the driver updates its table itself when the
//!   migration completes. Otherwise take the mirror lock (only *try* it when the range is not
//!   blockable, and answer [`Invalidate::Refused`] if it is contended), `set_seq`, drop the
//!   mirror's entries.
//! * **fault**: `read_begin` (bounded: `read_begin_timeout` with the model's timeout), fault
//!   the page in the primary, take the mirror lock, `read_retry`, and commit under the lock;
//!   on a collision, loop. Faults and the device's own migrations are serialised (a fault
//!   straddling an ignored migration would commit the page it moved away). A read fault on untouched private anonymous memory mirrors the
//!   zero page read-only, so the device's first write faults again and copies it.
//! * **migrate to device** ([`HmmMirror::migrate_to_device`], `dmirror_migrate_to_device`):
//!   `read_begin`, migrate with the device's owner (anonymous pages only), then under
//!   the mirror lock map the moved pages, unless another invalidation collided, in which case
//!   the moved pages' entries are dropped and left to the next fault.
//!
//! If an invalidation epoch is never closed (the interval leak of the reference's §9.8), every
//! `read_begin` waits forever; here it times out and the model records a hang.

use std::sync::Arc;
use std::time::Duration;

use mmnotify::{
    Event, IntervalCtx, IntervalHandle, IntervalSubscriber, Invalidate, Invalidation, Owner,
};

use super::{
    collision_retry_fault, probe_read_begin, FaultOutcome, Hang, SecondaryMmu, ShadowEntry,
    ShadowTable, WaitOutcome,
};
use crate::error::SimError;
use crate::mm::{MigrateReport, SimMm};
use crate::sync::{Mutex, MutexGuard};
use crate::vma::Access;
use crate::vma::{addr_of, vpn_of};

#[derive(Debug, Default)]
struct MirrorState {
    table: Mutex<ShadowTable>,
}

#[derive(Debug)]
struct Callback {
    state: Arc<MirrorState>,
    owner: Option<Owner>,
}

impl IntervalSubscriber for Callback {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        if let (Event::Migrate { owner }, Some(own)) = (inv.event(), self.owner) {
            if owner == own {
                return Invalidate::Done;
            }
        }
        let table = if inv.is_blockable() {
            Some(self.state.table.lock())
        } else {
            self.state.table.try_lock()
        };
        let Some(mut table) = table else {
            return Invalidate::Refused;
        };
        ctx.set_seq();
        table.zap(inv.range());
        Invalidate::Done
    }
}

/// The mirror lock, held: while it is held, the mirror's non-blocking invalidations refuse.
#[derive(Debug)]
pub struct MirrorLock<'a>(#[allow(dead_code)] MutexGuard<'a, ShadowTable>);

/// An HMM mirror; see the module docs.
#[derive(Debug)]
pub struct HmmMirror {
    name: String,
    handle: IntervalHandle,
    state: Arc<MirrorState>,
    owner: Option<Owner>,
    /// The mirrored range `[start, end)`.
    span: (u64, u64),
    /// Serialises the device's own migrations, as the driver's migration path does.
    migrating: Mutex<()>,
    timeout: Duration,
    hangs: Mutex<Vec<Hang>>,
}

impl HmmMirror {
    /// A mirror of `[start, start + len)` on `sim` without device memory (it migrates
    /// nothing, so it ignores no invalidation), whose `read_begin` gives up after `timeout`.
    ///
    /// # Errors
    ///
    /// [`SimError::Engine`] if the interval cannot be inserted.
    pub fn attach(
        sim: &SimMm,
        name: &str,
        start: u64,
        len: u64,
        timeout: Duration,
    ) -> Result<Arc<Self>, SimError> {
        Self::attach_inner(sim, name, start, len, None, timeout)
    }

    /// A mirror of `[start, start + len)` on `sim` for a device with memory of its own,
    /// identified by `owner` (Linux's `pgmap_owner`): it can
    /// [`migrate_to_device`](Self::migrate_to_device) and ignores the invalidations of those
    /// migrations.
    ///
    /// # Errors
    ///
    /// [`SimError::Engine`] if the interval cannot be inserted.
    pub fn attach_device(
        sim: &SimMm,
        name: &str,
        start: u64,
        len: u64,
        owner: Owner,
        timeout: Duration,
    ) -> Result<Arc<Self>, SimError> {
        Self::attach_inner(sim, name, start, len, Some(owner), timeout)
    }

    fn attach_inner(
        sim: &SimMm,
        name: &str,
        start: u64,
        len: u64,
        owner: Option<Owner>,
        timeout: Duration,
    ) -> Result<Arc<Self>, SimError> {
        let state = Arc::new(MirrorState::default());
        let handle = sim.insert_interval(
            name,
            start,
            len,
            Arc::new(Callback {
                state: Arc::clone(&state),
                owner,
            }),
        )?;
        Ok(Arc::new(HmmMirror {
            name: name.to_owned(),
            handle,
            state,
            owner,
            span: (start, start.saturating_add(len)),
            migrating: Mutex::new(()),
            timeout,
            hangs: Mutex::new(Vec::new()),
        }))
    }

    /// The device's owner cookie, if it has device memory.
    pub fn owner(&self) -> Option<Owner> {
        self.owner
    }

    /// The mirror's entry for the page containing `addr`.
    pub fn entry(&self, addr: u64) -> Option<ShadowEntry> {
        self.state.table.lock().get(vpn_of(addr))
    }

    /// Migrates `[addr, addr + len)` to the device's memory (`dmirror_migrate_to_device`):
    /// [`SimMm::migrate`] with the device's owner, whose `Migrate` invalidation this mirror
    /// ignores, then, under the mirror lock, maps the moved pages of the mirrored range (or,
    /// if another invalidation collided since the migration began, drops their entries).
    ///
    /// # Errors
    ///
    /// [`SimError::NoDeviceMemory`] for a mirror attached without an owner; the engine's
    /// `read_begin` timeout (recorded as a hang); [`SimMm::migrate`]'s errors (pages moved
    /// before a hole are mapped first).
    pub fn migrate_to_device(
        &self,
        sim: &SimMm,
        addr: u64,
        len: u64,
    ) -> Result<MigrateReport, SimError> {
        let owner = self.owner.ok_or_else(|| SimError::NoDeviceMemory {
            mirror: self.name.clone(),
        })?;
        let _migrating = self.migrating.lock();
        let seq = match self.handle.read_begin_timeout(self.timeout) {
            Ok(seq) => seq,
            Err(e) => {
                if let mmnotify::Error::ReadBeginTimeout { waited, .. } = e {
                    self.hangs.lock().push(Hang {
                        mirror: self.name.clone(),
                        what: "migrate (read_begin)",
                        vpn: Some(vpn_of(addr)),
                        waited,
                    });
                }
                return Err(e.into());
            }
        };
        // A subscriber's panic resumed on this thread (the engine does that) must not skip
        // the table update: the migration may have moved pages already.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sim.migrate(addr, len, Some(owner))
        }));
        // The pages that may have moved: the report's, or, if the walk stopped at a hole (or
        // panicked), every page of the range the mirror holds (its entries are re-checked).
        let end = addr.saturating_add(len);
        let mut table = self.state.table.lock();
        let collided = self.handle.read_retry(seq);
        let candidates: Vec<u64> = match &outcome {
            Ok(Ok(report)) => report.moved.iter().map(|(vpn, _, _)| *vpn).collect(),
            _ => table
                .entries()
                .into_iter()
                .map(|(vpn, _)| vpn)
                .filter(|vpn| addr <= addr_of(*vpn) && addr_of(*vpn) < end)
                .collect(),
        };
        let (first, last) = self.span;
        for vpn in candidates {
            if addr_of(vpn) < first || addr_of(vpn) >= last {
                continue;
            }
            let primary = sim.lookup_vpn(vpn);
            match primary {
                Some(pte) if !collided && pte.accessible => {
                    table.insert(vpn, ShadowEntry::from_pte(&pte));
                }
                Some(pte) if table.get(vpn).is_some_and(|e| e.frame == pte.frame) => {}
                _ => {
                    table.remove(vpn);
                }
            }
        }
        drop(table);
        match outcome {
            Ok(result) => result,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }

    /// The interval handle (for `read_begin`, or removal through the `Mm`).
    pub fn handle(&self) -> &IntervalHandle {
        &self.handle
    }

    /// Mirrors the page containing `addr`.
    ///
    /// # Errors
    ///
    /// The primary's fault errors.
    pub fn fault(&self, sim: &SimMm, addr: u64, access: Access) -> Result<FaultOutcome, SimError> {
        // The device's own migrations do not bump the sequence (their invalidation is
        // ignored), so a fault must not straddle one: it would commit the page the migration
        // just moved away.
        let _migrating = self.migrating.lock();
        collision_retry_fault(
            &self.name,
            &self.handle,
            &self.state.table,
            sim,
            addr,
            access,
            self.timeout,
            &self.hangs,
        )
    }

    /// A bare bounded `read_begin`, as a later fault would start; a timeout is recorded as a
    /// hang.
    ///
    /// # Errors
    ///
    /// [`SimError::Engine`] for a misuse (e.g. called from inside a callback).
    pub fn probe_read_begin(&self) -> Result<WaitOutcome, SimError> {
        probe_read_begin(&self.name, &self.handle, self.timeout, &self.hangs)
    }

    /// Takes the mirror lock (to show a refused non-blocking invalidation).
    pub fn lock_mirror(&self) -> MirrorLock<'_> {
        MirrorLock(self.state.table.lock())
    }
}

impl SecondaryMmu for HmmMirror {
    fn name(&self) -> &str {
        &self.name
    }

    fn entries(&self) -> Vec<(u64, ShadowEntry)> {
        self.state.table.lock().entries()
    }

    fn hangs(&self) -> Vec<Hang> {
        self.hangs.lock().clone()
    }
}
