//! An HMM mirror (`mm/hmm.c` users: `test_hmm`, amdgpu, RDMA ODP, reduced): one interval
//! subscription over the mirrored range and the collision-retry fault path.
//!
//! * **invalidate**: take the mirror lock (only *try* it when the range is not blockable, and
//!   answer [`Invalidate::Refused`] if it is contended), `set_seq`, drop the mirror's entries.
//! * **fault**: `read_begin` (bounded: `read_begin_timeout` with the model's timeout), fault
//!   the page in the primary, take the mirror lock, `read_retry`, and commit under the lock;
//!   on a collision, loop.
//!
//! If an invalidation epoch is never closed (the interval leak of the reference's §9.8), every
//! `read_begin` waits forever; here it times out and the model records a hang.

use std::sync::Arc;
use std::time::Duration;

use mmnotify::{IntervalCtx, IntervalHandle, IntervalSubscriber, Invalidate, Invalidation};

use super::{
    collision_retry_fault, probe_read_begin, FaultOutcome, Hang, SecondaryMmu, ShadowEntry,
    ShadowTable, WaitOutcome,
};
use crate::error::SimError;
use crate::mm::SimMm;
use crate::sync::{Mutex, MutexGuard};
use crate::vma::Access;

#[derive(Debug, Default)]
struct MirrorState {
    table: Mutex<ShadowTable>,
}

#[derive(Debug)]
struct Callback {
    state: Arc<MirrorState>,
}

impl IntervalSubscriber for Callback {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
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
    timeout: Duration,
    hangs: Mutex<Vec<Hang>>,
}

impl HmmMirror {
    /// A mirror of `[start, start + len)` on `sim`, whose `read_begin` gives up after
    /// `timeout`.
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
        let state = Arc::new(MirrorState::default());
        let handle = sim.insert_interval(
            name,
            start,
            len,
            Arc::new(Callback {
                state: Arc::clone(&state),
            }),
        )?;
        Ok(Arc::new(HmmMirror {
            name: name.to_owned(),
            handle,
            state,
            timeout,
            hangs: Mutex::new(Vec::new()),
        }))
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
