//! The hub: one [`Mm`] per address space, owning both kinds of subscription, the read side
//! and the policy.
//!
//! Writers (register, unregister, get/put, release, interval insert/remove) serialise on the
//! registry lock and publish new subscriber snapshots; invalidations never take that lock.
//! See `srcu.rs` for how writers wait for invalidations, `guard.rs` for what an invalidation
//! does, `interval/seq.rs` for the interval protocol.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use crate::classic::{
    FreeNotify, Registration, StatCounters, Subscriber, SubscriberId, SubscriberStats,
};
use crate::context::{self, Scope, ScopeKind};
use crate::error::{BlockingOp, Error, Result};
use crate::guard::InvalidateGuard;
use crate::interval::seq::IntervalState;
use crate::interval::{
    IntervalEntry, IntervalHandle, IntervalId, IntervalNode, IntervalSubscriber, Itree,
};
use crate::policy::Policy;
use crate::range::{Blockable, Event, Range};
use crate::snapshot::{Snapshot, SnapshotCell, SnapshotRef};
use crate::srcu::Srcu;
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{Condvar, Fences, Mutex};

/// Process-wide unique numbers for address spaces, subscribers and intervals. Not part of any
/// protocol, so a plain `std` atomic even under loom.
fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// An address space that secondary MMUs subscribe to (Linux's `mm_struct`, notifier side).
///
/// Cloning an `Mm` gives another handle to the same address space. When the last handle is
/// dropped without [`release`](Mm::release), subscribers get no `release` call (there is no
/// process exit to report), but every registration is freed and every interval subscriber is
/// dropped.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicI64, Ordering};
/// use mmnotify::{Capabilities, Event, Invalidation, Mm, Range, Refused, Subscriber};
///
/// #[derive(Default)]
/// struct Counting(AtomicI64);
/// impl Subscriber for Counting {
///     fn capabilities(&self) -> Capabilities { Capabilities::new().with_start().with_end() }
///     fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
///         self.0.fetch_add(1, Ordering::SeqCst);
///         Ok(())
///     }
///     fn invalidate_range_end(&self, _: &Invalidation) { self.0.fetch_sub(1, Ordering::SeqCst); }
/// }
///
/// let mm = Mm::new();
/// let sub = Arc::new(Counting::default());
/// let id = mm.register(sub.clone())?;
/// let guard = mm.invalidate_start(Range::new(0x1000, 0x2000)?, Event::Unmap)?;
/// assert_eq!(sub.0.load(Ordering::SeqCst), 1); // inside the window
/// guard.end();
/// assert_eq!(sub.0.load(Ordering::SeqCst), 0);
/// mm.unregister(id)?;
/// # Ok::<(), mmnotify::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Mm {
    inner: Arc<MmInner>,
}

/// Options for [`Mm::builder`].
#[derive(Clone, Copy, Debug)]
pub struct MmBuilder {
    policy: Policy,
    initial_interval_seq: u64,
    symmetric_fences: bool,
}

impl MmBuilder {
    /// The pairing policy (default [`Policy::Exact`]).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The interval sequence's first value (default 2, as in Linux). Tests use values near
    /// `u64::MAX` to exercise wrap-around; an odd value is rounded down to even, and values
    /// below 2 become 2.
    pub fn initial_interval_seq(mut self, seq: u64) -> Self {
        self.initial_interval_seq = (seq & !1).max(2);
        self
    }

    /// Test and benchmark knob: use the read side's fallback fences (a `SeqCst` fence on both
    /// sides) even where `membarrier` is available, as on a system without it.
    #[doc(hidden)]
    pub fn symmetric_fences(mut self, symmetric: bool) -> Self {
        self.symmetric_fences = symmetric;
        self
    }

    /// Creates the address space.
    pub fn build(self) -> Mm {
        let id = next_id();
        let fences = if self.symmetric_fences {
            Fences::Symmetric
        } else {
            Fences::detect()
        };
        Mm {
            inner: Arc::new(MmInner {
                id,
                policy: self.policy,
                srcu: Srcu::with_fences(id, fences),
                snapshot: SnapshotCell::new(Snapshot::default()),
                has_classic: AtomicBool::new(false),
                registry: Mutex::new(Registry::default()),
                exit: Mutex::new(()),
                frees: Arc::new(FreeBarrier::default()),
                itree: Arc::new(Itree::new(id, self.initial_interval_seq)),
                #[cfg(feature = "fault-injection")]
                lose_end: LoseEnd::default(),
            }),
        }
    }
}

#[derive(Debug, Default)]
struct Registry {
    released: bool,
    /// `get_or_register` registrations: key → (id, use count). Kept across `release`, so that
    /// the owners' later `put`s still balance.
    shared: HashMap<TypeId, (SubscriberId, u64)>,
    /// Registrations claimed by an unregister in progress.
    unregistering: Vec<SubscriberId>,
    /// Plain registrations that `release` unlinked and that were not unregistered yet: their
    /// owner's `unregister` still succeeds, as in Linux (KVM unregisters after exit).
    /// Their counters stay here for that final `unregister` to return.
    exited: Vec<(SubscriberId, Arc<StatCounters>)>,
}

impl Registry {
    fn shared_entry(&mut self, id: SubscriberId) -> Option<(TypeId, &mut u64)> {
        self.shared
            .iter_mut()
            .find(|(_, (shared_id, _))| *shared_id == id)
            .map(|(key, (_, uses))| (*key, uses))
    }
}

/// Counts unlinked registrations that were not freed yet; `synchronize` waits for zero.
#[derive(Debug, Default)]
struct FreeBarrier {
    pending: Mutex<usize>,
    all_freed: Condvar,
}

impl FreeBarrier {
    fn add(&self) {
        *self.pending.lock() += 1;
    }

    fn wait(&self) {
        let mut pending = self.pending.lock();
        while *pending > 0 {
            pending = self.all_freed.wait(pending);
        }
    }
}

impl FreeNotify for FreeBarrier {
    fn freed(&self) {
        let mut pending = self.pending.lock();
        *pending -= 1;
        if *pending == 0 {
            self.all_freed.notify_all();
        }
    }
}

pub(crate) struct MmInner {
    pub(crate) id: u64,
    pub(crate) policy: Policy,
    pub(crate) srcu: Srcu,
    /// The current classic snapshot; replaced, never mutated.
    snapshot: SnapshotCell,
    /// Whether `snapshot` is non-empty: lets an invalidation with no classic subscriber skip
    /// the snapshot lock. Written under `registry`, read inside a read section.
    has_classic: AtomicBool,
    registry: Mutex<Registry>,
    /// Held for the whole of `Mm::release`, so that a second caller returns only once the
    /// first one is done.
    exit: Mutex<()>,
    frees: Arc<FreeBarrier>,
    pub(crate) itree: Arc<Itree>,
    #[cfg(feature = "fault-injection")]
    lose_end: LoseEnd,
}

/// Test-only fault injection (feature `fault-injection`): drop one classic end every n-th
/// invalidation that delivers ends. Exists so that torture tests can prove they catch a
/// broken engine; never compiled into normal builds.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Default)]
struct LoseEnd {
    every: crate::sync::atomic::AtomicU64,
    count: crate::sync::atomic::AtomicU64,
}

#[cfg(feature = "fault-injection")]
impl MmInner {
    /// Whether the end about to be delivered is to be skipped (every n-th call, if armed).
    pub(crate) fn lose_this_end(&self) -> bool {
        let every = self.lose_end.every.load(Ordering::Relaxed);
        every != 0 && (self.lose_end.count.fetch_add(1, Ordering::Relaxed) + 1) % every == 0
    }
}

impl std::fmt::Debug for MmInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mm")
            .field("id", &self.id)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl MmInner {
    /// The current snapshot, or `None` when there is no classic subscriber. Called inside a
    /// read section.
    #[inline]
    pub(crate) fn classic_snapshot(&self) -> Option<SnapshotRef> {
        // Acquire: pairs with the Release in `publish`.
        if !self.has_classic.load(Ordering::Acquire) {
            return None;
        }
        Some(self.snapshot.load())
    }

    fn current(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Installs `next` as the current snapshot, handing the old one to `retired`. Called
    /// with the registry lock held.
    fn publish(&self, next: Snapshot, retired: &mut Retired) {
        let non_empty = next.len() > 0;
        retired.0.push(self.snapshot.replace(next));
        self.has_classic.store(non_empty, Ordering::Release);
    }

    /// Removes `id` from the current snapshot, if present. Called with the registry lock held.
    fn unlink(&self, id: SubscriberId, retired: &mut Retired) -> bool {
        let current = self.current();
        let Some(index) = current.position(id) else {
            return false;
        };
        self.frees.add();
        current.subs[index].set_unlinked(Arc::clone(&self.frees) as Arc<dyn FreeNotify>);
        self.publish(current.without(index), retired);
        true
    }
}

/// Snapshots replaced under the registry lock, dropped only after it is released: dropping one
/// may free a registration, and `free` is user code that may call `put`.
///
/// Declare it *before* taking the registry lock, so that it drops after the lock guard.
#[derive(Default)]
struct Retired(Vec<Arc<Snapshot>>);

impl Drop for MmInner {
    fn drop(&mut self) {
        if crate::sync::unwinding_under_loom() {
            return;
        }
        // Intervals that were never removed point back at the interval state; empty it so
        // that they, and their subscribers, are dropped with the address space.
        self.itree.clear();
    }
}

impl Default for Mm {
    fn default() -> Self {
        Mm::new()
    }
}

impl Mm {
    /// A new address space with the default policy, [`Policy::Exact`].
    pub fn new() -> Mm {
        Mm::builder().build()
    }

    /// A new address space with the given policy.
    pub fn with_policy(policy: Policy) -> Mm {
        Mm::builder().policy(policy).build()
    }

    /// Options for a new address space.
    pub fn builder() -> MmBuilder {
        MmBuilder {
            policy: Policy::Exact,
            initial_interval_seq: 2,
            symmetric_fences: false,
        }
    }

    /// This address space's process-wide unique number.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The pairing policy.
    pub fn policy(&self) -> Policy {
        self.inner.policy
    }

    /// Test-only (feature `fault-injection`): deliberately breaks the engine by skipping one
    /// classic end every `n`-th invalidation that delivers ends (`0` turns it off).
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn lose_end_every(&self, n: u64) {
        self.inner.lose_end.every.store(n, Ordering::Relaxed);
        self.inner.lose_end.count.store(0, Ordering::Relaxed);
    }

    // --- classic subscribers -------------------------------------------------------------

    /// Registers a classic subscriber and returns its id.
    ///
    /// Waits until every invalidation that was in flight has ended, so that the new subscriber
    /// cannot have missed the start of a window that is still open (Linux gets this from
    /// `mm_take_all_locks`). Every invalidation that starts after this call began includes it.
    ///
    /// # Errors
    ///
    /// [`Error::CapabilityConflict`], [`Error::AlreadyRegistered`] (the same object twice),
    /// [`Error::Released`], [`Error::WouldDeadlock`].
    pub fn register(&self, subscriber: Arc<dyn Subscriber>) -> Result<SubscriberId> {
        self.register_keyed(subscriber, None, BlockingOp::Register)
    }

    fn register_keyed(
        &self,
        subscriber: Arc<dyn Subscriber>,
        key: Option<TypeId>,
        op: BlockingOp,
    ) -> Result<SubscriberId> {
        let caps = subscriber.capabilities();
        if caps.is_contradictory() {
            return Err(Error::CapabilityConflict);
        }
        context::may_block(self.inner.id, op)?;
        let mut retired = Retired::default();
        let id = {
            let mut registry = self.inner.registry.lock();
            if registry.released {
                return Err(Error::Released);
            }
            let current = self.inner.current();
            if let Some((existing, uses)) = key.and_then(|k| registry.shared.get_mut(&k)) {
                // Lost a race with another get_or_register: use theirs; ours is dropped unused.
                *uses = uses
                    .checked_add(1)
                    .ok_or(Error::UseCountOverflow { id: *existing })?;
                let existing = *existing;
                drop(registry);
                self.wait_until_ready(existing);
                return Ok(existing);
            }
            let thin = |s: &Arc<dyn Subscriber>| Arc::as_ptr(s).cast::<()>();
            if let Some(existing) = current
                .subs
                .iter()
                .find(|r| thin(&r.subscriber) == thin(&subscriber))
            {
                return Err(Error::AlreadyRegistered {
                    existing: existing.id,
                });
            }
            let id = SubscriberId(next_id());
            if let Some(key) = key {
                registry.shared.insert(key, (id, 1));
            }
            let reg = Arc::new(Registration::new(id, self.inner.id, subscriber, caps, key));
            self.inner.publish(
                current.with(Arc::clone(&reg), self.inner.policy.newest_first()),
                &mut retired,
            );
            (id, reg)
        };
        drop(retired);
        let (id, reg) = id;
        tracing::debug!(target: "mmnotify", mm = self.inner.id, subscriber = id.0, ?caps, "registered");
        self.inner.srcu.synchronize();
        reg.mark_ready();
        Ok(id)
    }

    /// Unregisters a classic subscriber registered with [`register`](Self::register).
    ///
    /// Calls its `release` (unless process exit already did), unlinks it, and waits until
    /// every invalidation that had started it has delivered its end. When this returns, no
    /// callback of the subscriber runs or will run, and `release` has run exactly once.
    ///
    /// Returns the registration's final counters, including the ends this call waited for
    /// (they can no longer be read with [`subscriber_stats`](Self::subscriber_stats)).
    ///
    /// # Errors
    ///
    /// [`Error::NotRegistered`] for an unknown id (or one being unregistered concurrently);
    /// [`Error::SharedUsePut`] for an id from [`get_or_register`](Self::get_or_register), which
    /// must be [`put`](Self::put); [`Error::WouldDeadlock`] from inside a callback of this
    /// address space or while holding one of its guards.
    pub fn unregister(&self, id: SubscriberId) -> Result<SubscriberStats> {
        context::may_block(self.inner.id, BlockingOp::Unregister)?;
        let reg = {
            let mut registry = self.inner.registry.lock();
            let current = self.inner.current();
            let Some(reg) = current
                .position(id)
                .map(|i| Arc::clone(&current.subs[i]))
                .filter(|_| !registry.unregistering.contains(&id))
            else {
                if let Some(at) = registry.exited.iter().position(|(e, _)| *e == id) {
                    // Released by process exit already: nothing left but to wait for the
                    // callbacks that may still run.
                    let (_, stats) = registry.exited.swap_remove(at);
                    drop(registry);
                    self.inner.srcu.synchronize();
                    return Ok(stats.snapshot());
                }
                if registry.shared_entry(id).is_some() {
                    return Err(Error::SharedUsePut { id });
                }
                return Err(Error::NotRegistered { id });
            };
            if reg.key.is_some() {
                return Err(Error::SharedUsePut { id });
            }
            registry.unregistering.push(id);
            reg
        };
        let panicked = {
            let _cb = Scope::enter(self.inner.id, ScopeKind::Callback { nonblocking: false });
            reg.release()
        };
        let mut retired = Retired::default();
        {
            let mut registry = self.inner.registry.lock();
            self.inner.unlink(id, &mut retired);
            registry.unregistering.retain(|&u| u != id);
        }
        drop(retired);
        let stats = Arc::clone(&reg.stats);
        drop(reg);
        self.inner.srcu.synchronize();
        tracing::debug!(target: "mmnotify", mm = self.inner.id, subscriber = id.0, "unregistered");
        if let Some(payload) = panicked {
            // The subscriber is unregistered all the same; its release's panic goes on.
            panic::resume_unwind(payload);
        }
        Ok(stats.snapshot())
    }

    /// Returns the single subscriber of type `S` on this address space, registering the one
    /// `alloc` makes if there is none, and counts one more use (Linux's `mmu_notifier_get`,
    /// keyed by type instead of by ops pointer).
    ///
    /// `alloc` runs without any engine lock held; if two threads race, one allocation is
    /// dropped unused (its `free` is not called: it was never registered).
    ///
    /// # Errors
    ///
    /// As [`register`](Self::register), plus [`Error::UseCountOverflow`].
    pub fn get_or_register<S: Subscriber>(
        &self,
        alloc: impl FnOnce() -> Arc<S>,
    ) -> Result<SubscriberId> {
        let key = TypeId::of::<S>();
        context::may_block(self.inner.id, BlockingOp::GetOrRegister)?;
        if let Some(id) = self.get_existing(key)? {
            self.wait_until_ready(id);
            return Ok(id);
        }
        let fresh: Arc<dyn Subscriber> = alloc();
        self.register_keyed(fresh, Some(key), BlockingOp::GetOrRegister)
    }

    /// Returns once the registration `id` excludes every invalidation that was in flight when
    /// it was published: a `get_or_register` that finds a registration whose own `register` is
    /// still waiting must not return before it.
    fn wait_until_ready(&self, id: SubscriberId) {
        let current = self.inner.current();
        let ready = current
            .position(id)
            .map_or(true, |i| current.subs[i].is_ready());
        drop(current);
        if !ready {
            self.inner.srcu.synchronize();
        }
    }

    fn get_existing(&self, key: TypeId) -> Result<Option<SubscriberId>> {
        let mut registry = self.inner.registry.lock();
        if registry.released {
            return Err(Error::Released);
        }
        match registry.shared.get_mut(&key) {
            Some((id, uses)) => {
                *uses = uses
                    .checked_add(1)
                    .ok_or(Error::UseCountOverflow { id: *id })?;
                Ok(Some(*id))
            }
            None => Ok(None),
        }
    }

    /// Drops one use of a subscriber from [`get_or_register`](Self::get_or_register). At zero
    /// it is unlinked at once, without `release` (drop the mirror before the last put), and its
    /// `free` runs after every callback that was running has returned. Never blocks, so it may
    /// be called from a callback, `release` included.
    ///
    /// # Errors
    ///
    /// [`Error::NotRegistered`], or [`Error::NotShared`] for an id from
    /// [`register`](Self::register).
    pub fn put(&self, id: SubscriberId) -> Result<()> {
        self.put_reporting(id).map(|_| ())
    }

    /// [`put`](Self::put), telling whether a `release` may still *begin* after it returns: only
    /// when `Mm::release` or `unregister` had claimed this registration's release before the
    /// put reached zero (`put` never blocks, so it does not wait for that claimed callback to
    /// start or finish). The loom models check I14 with it.
    pub(crate) fn put_reporting(&self, id: SubscriberId) -> Result<ReleaseAfterPut> {
        let mut retired = Retired::default();
        let mut registry = self.inner.registry.lock();
        let current = self.inner.current();
        let Some(index) = current.position(id) else {
            // Unlinked by `release` already: only the use count is left to balance.
            if let Some((key, uses)) = registry.shared_entry(id) {
                *uses -= 1;
                if *uses == 0 {
                    registry.shared.remove(&key);
                }
                // `Mm::release` unlinks a registration only after its release returned.
                return Ok(ReleaseAfterPut::Impossible);
            }
            if registry.exited.iter().any(|(e, _)| *e == id) {
                return Err(Error::NotShared { id });
            }
            return Err(Error::NotRegistered { id });
        };
        let Some(key) = current.subs[index].key else {
            return Err(Error::NotShared { id });
        };
        let entry = registry
            .shared
            .get_mut(&key)
            .expect("a keyed registration has a use count");
        entry.1 -= 1;
        let mut outcome = ReleaseAfterPut::Impossible;
        if entry.1 == 0 {
            registry.shared.remove(&key);
            if !current.subs[index].forgo_release() {
                outcome = ReleaseAfterPut::AlreadyClaimed;
            }
            self.inner.unlink(id, &mut retired);
            tracing::debug!(target: "mmnotify", mm = self.inner.id, subscriber = id.0, "put to zero; unlinked");
        }
        Ok(outcome)
    }

    /// Waits until every subscriber that was unlinked (by `put`, `unregister` or `release`)
    /// has been freed, i.e. its `free` ran (Linux's `mmu_notifier_synchronize`, but a barrier,
    /// not only a grace period).
    ///
    /// # Errors
    ///
    /// [`Error::WouldDeadlock`] from inside a callback or while holding a guard of this
    /// address space.
    pub fn synchronize(&self) -> Result<()> {
        context::may_block(self.inner.id, BlockingOp::Synchronize)?;
        self.inner.srcu.synchronize();
        self.inner.frees.wait();
        Ok(())
    }

    /// The counters of a registered classic subscriber.
    ///
    /// # Errors
    ///
    /// [`Error::NotRegistered`].
    pub fn subscriber_stats(&self, id: SubscriberId) -> Result<SubscriberStats> {
        let current = self.inner.current();
        current
            .position(id)
            .map(|i| current.subs[i].stats.snapshot())
            .ok_or(Error::NotRegistered { id })
    }

    /// The ids of the registered classic subscribers, in call order: registration order under
    /// [`Policy::Exact`], newest first under the Linux policies (as Linux's list is).
    pub fn subscribers(&self) -> Vec<SubscriberId> {
        self.inner.current().subs.iter().map(|r| r.id).collect()
    }

    /// Process exit (Linux's `mmu_notifier_release`, run first in `exit_mmap`).
    ///
    /// Runs one blockable [`Event::Release`] invalidation of [`Range::ALL`] for the interval
    /// subscribers (which stay inserted and keep receiving invalidations), then calls every
    /// classic subscriber's `release` exactly once (racing unregisters included), unlinks them
    /// all and waits for their owed ends. Afterwards nothing can subscribe. A second call does
    /// nothing.
    ///
    /// # Errors
    ///
    /// [`Error::WouldDeadlock`] from inside a callback or while holding a guard.
    pub fn release(&self) -> Result<()> {
        context::may_block(self.inner.id, BlockingOp::Release)?;
        let _exit = self.inner.exit.lock();
        {
            let mut registry = self.inner.registry.lock();
            if registry.released {
                return Ok(());
            }
            registry.released = true;
        }
        // A panicking callback does not stop the teardown: everything below still happens,
        // then the first panic is resumed.
        let mut panicked: Option<Box<dyn Any + Send>> = None;
        if self.inner.itree.is_present() {
            let release_intervals = panic::catch_unwind(AssertUnwindSafe(|| {
                // Blockable, so it cannot be refused.
                if let Ok(guard) =
                    InvalidateGuard::start_intervals_only(&self.inner, Range::ALL, Event::Release)
                {
                    guard.end();
                }
            }));
            panicked = release_intervals.err();
        }
        let snapshot = self.inner.current();
        for reg in snapshot.subs.iter() {
            let _cb = Scope::enter(self.inner.id, ScopeKind::Callback { nonblocking: false });
            if let Some(payload) = reg.release() {
                panicked.get_or_insert(payload);
            }
        }
        let mut retired = Retired::default();
        {
            let mut registry = self.inner.registry.lock();
            for reg in snapshot.subs.iter() {
                let plain = reg.key.is_none() && !registry.unregistering.contains(&reg.id);
                if self.inner.unlink(reg.id, &mut retired) && plain {
                    registry.exited.push((reg.id, Arc::clone(&reg.stats)));
                }
            }
        }
        drop(retired);
        drop(snapshot);
        self.inner.srcu.synchronize();
        tracing::debug!(target: "mmnotify", mm = self.inner.id, "released");
        if let Some(payload) = panicked {
            panic::resume_unwind(payload);
        }
        Ok(())
    }

    /// Whether [`release`](Self::release) was called.
    pub fn is_released(&self) -> bool {
        self.inner.registry.lock().released
    }

    // --- invalidations -------------------------------------------------------------------

    /// Announces that the primary entries of `range` are about to change, and returns the
    /// guard to end it with. Subscribers may sleep; none may refuse.
    ///
    /// # Errors
    ///
    /// [`Error::WouldDeadlock`] with [`DeadlockCause::NonBlockingContext`](crate::DeadlockCause)
    /// when called from a callback of a non-blockable invalidation.
    #[inline]
    pub fn invalidate_start(&self, range: Range, event: Event) -> Result<InvalidateGuard<'_>> {
        if context::in_nonblocking_context() {
            context::may_block(self.inner.id, BlockingOp::InvalidateStart)?;
        }
        InvalidateGuard::start(&self.inner, range, event, Blockable::Yes)
    }

    /// The non-blocking start used by the OOM reaper: subscribers must not sleep and may
    /// refuse.
    ///
    /// # Errors
    ///
    /// [`Error::StartRefused`] naming the refusers: nothing in the range may change now.
    /// Under [`Policy::Exact`] every subscriber that was started has been ended again and the
    /// interval epoch is closed; under the other policies, what Linux did (see [`Policy`]).
    #[must_use = "a refused start means the range must not change"]
    pub fn invalidate_start_nonblock(
        &self,
        range: Range,
        event: Event,
    ) -> Result<InvalidateGuard<'_>> {
        InvalidateGuard::start(&self.inner, range, event, Blockable::No)
    }

    /// Calls every classic subscriber's `clear_flush_young` and ORs the answers.
    pub fn clear_flush_young(&self, range: Range) -> bool {
        self.young_walk(|s| s.clear_flush_young(range), false)
    }

    /// Calls every classic subscriber's `clear_young` and ORs the answers.
    pub fn clear_young(&self, range: Range) -> bool {
        self.young_walk(|s| s.clear_young(range), false)
    }

    /// Asks classic subscribers, in order, whether `addr` is young; stops at the first yes.
    pub fn test_young(&self, addr: u64) -> bool {
        self.young_walk(|s| s.test_young(addr), true)
    }

    fn young_walk(
        &self,
        mut call: impl FnMut(&dyn Subscriber) -> bool,
        stop_at_first: bool,
    ) -> bool {
        let _read = self.inner.srcu.read_lock(ScopeKind::Walk);
        let Some(snapshot) = self.inner.classic_snapshot() else {
            return false;
        };
        let mut young = false;
        let skip_released = self.inner.policy.skips_released();
        // One mark for the whole walk (callbacks only, between them nothing blocks).
        let _cb = Scope::enter(self.inner.id, ScopeKind::Callback { nonblocking: true });
        for reg in snapshot
            .subs
            .iter()
            .filter(|r| !(skip_released && r.is_released()))
        {
            young |= call(reg.subscriber.as_ref());
            if young && stop_at_first {
                break;
            }
        }
        young
    }

    /// Flushes the secondary TLBs of `range` on every subscriber that declared the
    /// secondary-TLB callback (called in step with the primary TLB flush; never sleeps).
    pub fn arch_invalidate_secondary_tlbs(&self, range: Range) {
        let _read = self.inner.srcu.read_lock(ScopeKind::Walk);
        let Some(snapshot) = self.inner.classic_snapshot() else {
            return;
        };
        // One mark for the whole walk (callbacks only, between them nothing blocks).
        let _cb = Scope::enter(self.inner.id, ScopeKind::Callback { nonblocking: true });
        for reg in snapshot.subs.iter().filter(|r| {
            r.caps.has_secondary_tlb() && !(self.inner.policy.skips_released() && r.is_released())
        }) {
            reg.subscriber.arch_invalidate_secondary_tlbs(range);
        }
    }

    // --- interval subscribers ------------------------------------------------------------

    /// Inserts an interval subscription over `range` (half-open, like every range of the
    /// API; so an interval never contains byte `u64::MAX`, and [`Range::ALL`] covers every
    /// interval).
    ///
    /// During an invalidation epoch the insertion is deferred to the epoch's end; the first
    /// `read_begin` on the new interval waits for every invalidation in flight to end. The
    /// very first insert on an address space waits for invalidations in flight (they did not
    /// look for intervals).
    ///
    /// The engine keeps the subscriber until the interval is removed or the `Mm` is dropped;
    /// the returned handle does not keep it alive, so the subscriber may store the handle.
    ///
    /// # Errors
    ///
    /// [`Error::Released`], and [`Error::WouldDeadlock`] for a first insert from a callback or
    /// with a guard held.
    pub fn insert_interval(
        &self,
        range: Range,
        subscriber: Arc<dyn IntervalSubscriber>,
    ) -> Result<IntervalHandle> {
        if self.inner.registry.lock().released {
            return Err(Error::Released);
        }
        if !self.inner.itree.is_ready() {
            // The first inserts: invalidations that began before the interval state existed
            // did not count themselves in it, so every inserter that cannot yet rely on them
            // having ended waits for them (not only the one that made the state present).
            context::may_block(self.inner.id, BlockingOp::Insert)?;
            self.inner.itree.mark_present();
            self.inner.srcu.synchronize();
            self.inner.itree.mark_ready();
        }
        let node = Arc::new(IntervalNode::new(
            IntervalId(next_id()),
            range,
            Arc::clone(&self.inner.itree),
        ));
        let entry = Arc::new(IntervalEntry {
            node: Arc::clone(&node),
            subscriber,
        });
        {
            // Under the registry lock, so that an insert cannot slip in after `release` sent
            // its Release invalidation.
            let registry = self.inner.registry.lock();
            if registry.released {
                return Err(Error::Released);
            }
            self.inner.itree.insert(entry);
        }
        tracing::debug!(target: "mmnotify", mm = self.inner.id, interval = node.id.0, ?range, "interval inserted");
        Ok(IntervalHandle { node })
    }

    /// Removes an interval subscription; returns once no callback of it runs or can start
    /// (it may wait for the current epoch to close).
    ///
    /// # Errors
    ///
    /// [`Error::IntervalNotInserted`] if it was already removed, [`Error::WouldDeadlock`]
    /// from a callback (use [`IntervalCtx::remove_deferred`](crate::IntervalCtx::remove_deferred)
    /// there) or while holding a guard.
    pub fn remove_interval(&self, handle: &IntervalHandle) -> Result<()> {
        self.check_owner(handle)?;
        self.inner.itree.remove(&handle.node)
    }

    /// Removes an interval subscription when the current epoch closes, without waiting; allowed
    /// anywhere, callbacks included.
    ///
    /// # Errors
    ///
    /// [`Error::IntervalNotInserted`] if it was already removed.
    pub fn remove_interval_deferred(&self, handle: &IntervalHandle) -> Result<()> {
        self.check_owner(handle)?;
        self.inner.itree.remove_deferred(&handle.node).map(|_| ())
    }

    fn check_owner(&self, handle: &IntervalHandle) -> Result<()> {
        if Arc::ptr_eq(&handle.node.itree, &self.inner.itree) {
            Ok(())
        } else {
            Err(Error::IntervalNotInserted { id: handle.id() })
        }
    }

    /// The interval protocol's state: sequence, invalidations in flight, index size.
    pub fn interval_state(&self) -> IntervalState {
        self.inner.itree.state()
    }
}

/// Whether a `release` callback may still begin after a [`Mm::put`] returned (I14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReleaseAfterPut {
    /// No `release` of this registration begins after the put returned: it was forgone, or
    /// it had already run.
    Impossible,
    /// `Mm::release` or `unregister` had claimed the release before the put reached zero; the
    /// callback runs (or is running) and may begin after the put returned.
    AlreadyClaimed,
}
