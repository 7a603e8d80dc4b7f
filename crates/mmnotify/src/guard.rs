//! The invalidation guard: one value that owns everything a start opened, so that no path
//! (success, refusal, panic, early return) can leave an end undelivered or an epoch open.
//!
//! # What a start does
//!
//! ```text
//!  enter the Mm's read section ──► interval phase ──────────────► classic phase ──► guard
//!                                  A += 1 (epoch)                 snapshot the subscribers
//!                                  call every overlapping         call each start, record
//!                                  interval, then the finish      who succeeded in a bitmap
//!                                  steps (two-pass)
//!                                  refused? close the epoch,      refused? ask the policy who
//!                                  fail: no classic start runs    gets an end and whether the
//!                                                                 epoch closes, then fail
//! ```
//!
//! # What the end does
//!
//! Closes the epoch first (`A -= 1`), then delivers `invalidate_range_end` to exactly the
//! subscribers in the started bitmap, in call order (the snapshot's, see `policy.rs`), then leaves
//! the read section.
//! [`InvalidateGuard::end`] and dropping the guard do the same thing; `end` reads better at the
//! call site, and drop makes a forgotten end, an early `?` return or a panic harmless.
//!
//! # Panicking callbacks
//!
//! Every callback runs under `catch_unwind`. A panic is held while the engine finishes what it
//! owes everybody else (the remaining ends, the epoch), then resumed on the caller's thread. A
//! start whose callback panicked counts as refused by that subscriber and is unwound like a
//! refusal under `Exact`, whatever the policy.

use std::any::Any;
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};

use crate::classic::{Refused, Stat};
use crate::context::{Scope, ScopeKind};
use crate::error::{Error, Refuser, Result};
use crate::interval::seq::Hits;
use crate::interval::{IntervalCtx, Invalidate};
use crate::mm::MmInner;
use crate::policy::BlockableRefusal;
use crate::range::{Blockable, Event, Invalidation, Range};
use crate::snapshot::{Snapshot, SnapshotRef, StartedSet};
use crate::srcu::SrcuReadGuard;

/// An open invalidation window: the range may now change; [`end`](Self::end) it when the
/// change is done.
///
/// # Invariants
///
/// * While `epoch` is true, this guard accounts for exactly one unit of the address space's
///   active-range count.
/// * `started` holds exactly the positions in `classic` whose subscriber is owed an end.
/// * The guard is `!Send`: the read section and the deadlock bookkeeping belong to the thread
///   that started it.
///
/// # Panics
///
/// Ending the guard (or dropping it) resumes the panic of an end callback, after every other
/// owed end was delivered and the epoch share was given back.
///
/// # Leaking
///
/// [`std::mem::forget`] on a guard is the one way to break the pairing: the owed ends are never
/// sent, the interval epoch never closes, and the address space's read section never ends, so
/// every later `register`, `unregister`, `synchronize` and `release` on it waits forever. Drop
/// or [`end`](Self::end) every guard.
#[must_use = "dropping the guard ends the invalidation at once; keep it while changing the range"]
pub struct InvalidateGuard<'mm> {
    mm: &'mm MmInner,
    inv: Invalidation,
    epoch: bool,
    classic: Option<SnapshotRef>,
    started: StartedSet,
    // Field order is drop order: the snapshot above is released before the read section below
    // (which carries the thread's guard mark), so a registration freed by this drop is freed
    // inside the read section that `synchronize` waits for, and a blocking call from its
    // subscriber's `Drop` is refused.
    _read: SrcuReadGuard<'mm>,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for InvalidateGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidateGuard")
            .field("invalidation", &self.inv)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// A panic caught in a callback, to be resumed once the engine is consistent again.
type Caught = Option<Box<dyn Any + Send>>;

fn catch<R>(caught: &mut Caught, f: impl FnOnce() -> R) -> Option<R> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => Some(r),
        Err(payload) => {
            tracing::error!(target: "mmnotify", "a notifier callback panicked; finishing the invalidation before resuming the panic");
            if caught.is_none() {
                *caught = Some(payload);
            }
            None
        }
    }
}

fn resume(caught: Caught) {
    if let Some(payload) = caught {
        panic::resume_unwind(payload);
    }
}

impl<'mm> InvalidateGuard<'mm> {
    /// The invalidation this guard covers.
    pub fn invalidation(&self) -> Invalidation {
        self.inv
    }

    /// The range this guard covers.
    pub fn range(&self) -> Range {
        self.inv.range()
    }

    /// Ends the invalidation: closes the interval epoch, then delivers
    /// `invalidate_range_end` to exactly the subscribers whose start succeeded.
    #[inline]
    pub fn end(self) {
        drop(self);
    }

    #[inline]
    pub(crate) fn start(
        mm: &'mm MmInner,
        range: Range,
        event: Event,
        blockable: Blockable,
    ) -> Result<Self> {
        Self::start_with(mm, range, event, blockable, true)
    }

    /// A blockable invalidation that only the interval subscribers see (the release at
    /// teardown).
    pub(crate) fn start_intervals_only(
        mm: &'mm MmInner,
        range: Range,
        event: Event,
    ) -> Result<Self> {
        Self::start_with(mm, range, event, Blockable::Yes, false)
    }

    fn start_with(
        mm: &'mm MmInner,
        range: Range,
        event: Event,
        blockable: Blockable,
        classic: bool,
    ) -> Result<Self> {
        let read = mm.srcu.read_lock(ScopeKind::Guard);
        let mut guard = InvalidateGuard {
            mm,
            inv: Invalidation::new(range, event, blockable),
            epoch: false,
            classic: None,
            started: StartedSet::default(),
            _read: read,
            _not_send: PhantomData,
        };
        tracing::trace!(target: "mmnotify", mm = mm.id, ?range, ?event, ?blockable, "invalidate_start");
        let mut caught: Caught = None;
        if mm.itree.is_present() {
            guard.epoch = true;
            if let Err(refuser) = guard.interval_phase(&mut caught) {
                guard.close_epoch();
                drop(guard);
                resume(caught);
                return Err(refused(range, vec![refuser]));
            }
            // A panic in a non-blockable walk stops the invalidation like a refusal. In a
            // blockable one the primary changes the range whatever happens, so the classic
            // subscribers must still drop their copies: the classic phase runs, then the
            // panic is resumed (I34).
            if caught.is_some() && !guard.inv.is_blockable() {
                drop(guard);
                resume(caught);
                unreachable!("resume panics");
            }
        }
        if let Some(snapshot) = mm.classic_snapshot().filter(|_| classic) {
            guard.started = StartedSet::with_len(snapshot.len());
            guard.classic = Some(snapshot);
            guard.classic_phase(&mut caught)?;
        }
        if caught.is_some() {
            drop(guard);
            resume(caught);
            unreachable!("resume panics");
        }
        Ok(guard)
    }

    /// Calls every overlapping interval, then the finish steps. `Err` names the first refuser
    /// of a non-blockable range; the epoch is still open then, for the caller to close.
    fn interval_phase(&mut self, caught: &mut Caught) -> Result<(), Refuser> {
        let mut hits = Hits::new();
        let cur_seq = self.mm.itree.begin(self.inv.range(), &mut hits);
        if hits.is_empty() {
            return Ok(());
        }
        let nonblocking = !self.inv.is_blockable();
        let mut finish: u64 = 0;
        let mut finish_spill: Vec<usize> = Vec::new();
        let mut refuser = None;
        // One context mark for both passes (see `classic_phase_with`).
        let phase = Scope::enter(self.mm.id, ScopeKind::Callback { nonblocking });
        for (i, hit) in hits.iter().enumerate() {
            let node = &hit.node;
            let ctx = IntervalCtx { node, cur_seq };
            let outcome = catch(caught, || hit.subscriber.invalidate(&ctx, &self.inv));
            match outcome {
                Some(Invalidate::Done) => {}
                Some(Invalidate::Finish) if i < 64 => finish |= 1 << i,
                Some(Invalidate::Finish) => finish_spill.push(i),
                Some(Invalidate::Refused) if nonblocking => {
                    tracing::debug!(target: "mmnotify", mm = self.mm.id, interval = node.id.0, range = ?self.inv.range(), "interval invalidate refused");
                    refuser = Some(Refuser::Interval(node.id));
                    break;
                }
                Some(Invalidate::Refused) => {
                    tracing::warn!(target: "mmnotify", mm = self.mm.id, interval = node.id.0, "interval invalidate refused a blockable range (contract violation); ignored");
                }
                None if nonblocking => {
                    // A panicking callback stops a non-blockable walk like a refusal.
                    refuser = Some(Refuser::Interval(node.id));
                    break;
                }
                None => {
                    // Not a refusal: the range changes anyway, so every other interval must
                    // still be invalidated, and this one's fills must retry, as if its
                    // callback had reached `set_seq` (I34).
                    ctx.set_seq();
                }
            }
        }
        for (i, hit) in hits.iter().enumerate() {
            let node = &hit.node;
            let wants_finish = if i < 64 {
                finish & (1 << i) != 0
            } else {
                finish_spill.contains(&i)
            };
            if wants_finish {
                let ctx = IntervalCtx { node, cur_seq };
                catch(caught, || hit.subscriber.invalidate_finish(&ctx, &self.inv));
            }
        }
        drop(phase);
        match refuser {
            Some(r) if caught.is_none() => Err(r),
            _ => Ok(()),
        }
    }

    /// Calls the classic starts and applies the policy to a refusal.
    fn classic_phase(&mut self, caught: &mut Caught) -> Result<()> {
        // Out of `self` while the phase works on it, so that no reference count is taken;
        // put back afterwards. (On the paths that resume a panic, nothing is owed any more.)
        let snapshot = self.classic.take().expect("classic phase has a snapshot");
        let result = self.classic_phase_with(&snapshot, caught);
        self.classic = Some(snapshot);
        result
    }

    fn classic_phase_with(&mut self, snapshot: &Snapshot, caught: &mut Caught) -> Result<()> {
        let policy = self.mm.policy;
        let blockable = self.inv.is_blockable();
        let thread = self._read.thread();
        let mut refusers: Vec<Refuser> = Vec::new();
        let mut end_now_and_later = false;
        // One context mark for the whole phase: between the callbacks the engine only counts
        // and decides, it never blocks, so the mark covers exactly what the per-callback marks
        // covered as far as the deadlock check can tell.
        let phase = Scope::enter(
            self.mm.id,
            ScopeKind::Callback {
                nonblocking: !blockable,
            },
        );
        for (i, reg) in snapshot.subs.iter().enumerate() {
            if policy.skips_released() && reg.is_released() {
                continue;
            }
            if !reg.caps.has_start() {
                self.started.insert(i);
                continue;
            }
            let result = catch(caught, || reg.subscriber.invalidate_range_start(&self.inv));
            match result {
                Some(Ok(())) => {
                    reg.record(Stat::Starts, thread);
                    self.started.insert(i);
                }
                Some(Err(Refused)) => {
                    reg.record(Stat::Refusals, thread);
                    if !reg.caps.can_refuse() {
                        reg.record(Stat::Violations, thread);
                        tracing::warn!(target: "mmnotify", mm = self.mm.id, subscriber = reg.id.0, "a subscriber that did not declare may_refuse refused a start (contract violation)");
                    }
                    if reg.caps.has_end() && policy.refuser_must_not_have_end() {
                        reg.record(Stat::Violations, thread);
                        tracing::warn!(target: "mmnotify", mm = self.mm.id, subscriber = reg.id.0, "a subscriber with an end refused a start (Linux warns: such a subscriber must not have an end)");
                    }
                    if blockable {
                        reg.record(Stat::Violations, thread);
                        tracing::warn!(target: "mmnotify", mm = self.mm.id, subscriber = reg.id.0, range = ?self.inv.range(), "a blockable start was refused (contract violation)");
                        match policy.blockable_refusal() {
                            BlockableRefusal::NotStarted => {}
                            BlockableRefusal::Ignored => self.started.insert(i),
                            BlockableRefusal::EndNowAndLater => end_now_and_later = true,
                        }
                        continue;
                    }
                    tracing::debug!(target: "mmnotify", mm = self.mm.id, subscriber = reg.id.0, range = ?self.inv.range(), "invalidate_range_start refused");
                    refusers.push(Refuser::Classic(reg.id));
                    if !policy.continue_after_refusal() {
                        break;
                    }
                }
                None if blockable => {
                    // Not started (it is owed no end), but the walk goes on: the range changes
                    // anyway, and every other subscriber must drop its copy first (I34).
                }
                None => {
                    // A panicking non-blockable start: treated as a refusal under Exact,
                    // whatever the policy.
                    refusers.push(Refuser::Classic(reg.id));
                    break;
                }
            }
        }
        drop(phase);

        if caught.is_some() {
            // Unwind exactly: close the epoch, end who started, then resume the panic.
            self.close_epoch();
            self.deliver_ends_of(snapshot, caught);
            self.started.clear();
            resume(caught.take());
        }

        if end_now_and_later {
            // Linux >= 5.12 with a blockable refusal: ends go to everyone with an end now (from
            // inside the start), and again at the caller's end, which ignored the failure.
            self.mark_all_with_end(snapshot);
            self.deliver_ends_of(snapshot, caught);
            if caught.is_some() {
                self.close_epoch();
                resume(caught.take());
            }
            self.mark_all_with_end(snapshot);
        }

        if refusers.is_empty() {
            return Ok(());
        }

        // A refused non-blockable start: the policy decides who gets an end and whether the
        // interval epoch closes; the guard is then disarmed and the start fails.
        let mut owed = StartedSet::with_len(snapshot.len());
        for (i, reg) in snapshot.subs.iter().enumerate() {
            if policy.end_after_refusal(reg.caps, self.started.contains(i)) {
                owed.insert(i);
            }
        }
        self.started = owed;
        if policy.close_epoch_after_classic_refusal() {
            self.close_epoch();
        } else if self.epoch {
            // INVARIANT: the active-range count unit is deliberately leaked, as Linux does.
            tracing::warn!(target: "mmnotify", mm = self.mm.id, ?policy, "the interval epoch of a refused start is left open (reproducing Linux)");
            self.epoch = false;
        }
        self.deliver_ends_of(snapshot, caught);
        self.started.clear();
        resume(caught.take());
        Err(refused(self.inv.range(), refusers))
    }

    fn mark_all_with_end(&mut self, snapshot: &Snapshot) {
        for (i, reg) in snapshot.subs.iter().enumerate() {
            if reg.caps.has_end() {
                self.started.insert(i);
            }
        }
    }

    /// Gives back this guard's unit of the active-range count, once.
    fn close_epoch(&mut self) {
        if std::mem::take(&mut self.epoch) {
            self.mm.itree.end();
        }
    }

    /// Sends `invalidate_range_end` to every started subscriber that declares one, and
    /// empties the started set.
    fn deliver_ends(&mut self, caught: &mut Caught) {
        if let Some(snapshot) = self.classic.take() {
            self.deliver_ends_of(&snapshot, caught);
            self.classic = Some(snapshot);
        }
    }

    /// [`Self::deliver_ends`] with the snapshot out of `self`.
    fn deliver_ends_of(&mut self, snapshot: &Snapshot, caught: &mut Caught) {
        let nonblocking = !self.inv.is_blockable();
        let thread = self._read.thread();
        #[cfg(feature = "fault-injection")]
        let mut counted = false;
        // One context mark for all the ends (see `classic_phase_with`).
        let _phase = Scope::enter(self.mm.id, ScopeKind::Callback { nonblocking });
        for (i, reg) in snapshot.subs.iter().enumerate() {
            if self.started.contains(i) && reg.caps.has_end() {
                // Test-only: drop the first end of every n-th invalidation that delivers ends.
                #[cfg(feature = "fault-injection")]
                if !std::mem::replace(&mut counted, true) && self.mm.lose_this_end() {
                    continue;
                }
                catch(caught, || reg.subscriber.invalidate_range_end(&self.inv));
                reg.record(Stat::Ends, thread);
            }
        }
        self.started.clear();
    }
}

fn refused(range: Range, refusers: Vec<Refuser>) -> Error {
    Error::StartRefused { range, refusers }
}

impl Drop for InvalidateGuard<'_> {
    fn drop(&mut self) {
        if crate::sync::unwinding_under_loom() {
            return;
        }
        let mut caught: Caught = None;
        self.close_epoch();
        self.deliver_ends(&mut caught);
        self.classic = None;
        tracing::trace!(target: "mmnotify", mm = self.mm.id, range = ?self.inv.range(), "invalidate_end");
        if !std::thread::panicking() {
            resume(caught);
        }
    }
}
