//! Classic subscribers: the `mmu_notifier_ops` of Linux, as a trait with its contract written
//! next to each method, plus the bookkeeping the engine keeps for each registration.
//!
//! A classic subscriber mirrors some of an address space and must drop its copy of a range
//! between [`Subscriber::invalidate_range_start`] and [`Subscriber::invalidate_range_end`]. It
//! *declares* what it implements ([`Capabilities`]): Rust cannot tell whether a default method
//! was overridden, and the engine needs to know who expects an end, who may refuse, and who
//! uses the secondary-TLB callback instead of start/end.
//!
//! # Lifecycle of a registration
//!
//! ```text
//!  register / get_or_register          unregister / put-to-zero / Mm::release
//!  ─────────────► Linked ─── release once ──► Released ── unlink ──► Unlinked ── last ref ──► freed
//!                   │ receives starts,          invalidations that      no callback can     `free` runs
//!                   │ ends, young, tlb          begin now skip it       start any more      exactly once
//!                   │ (also while release runs) (Exact; Linux policies:
//!                   │                           served until unlinked);
//!                   │                           ones under way finish
//! ```
//!
//! The subscriber stays linked and fully served *while* its `release` runs, as in Linux: a
//! change that happens during the release is still announced, so the mirror is never stale.
//! The price is that an invalidation that began before the release returned may deliver its
//! start (and end) after it; `unregister` and `Mm::release` wait for those before returning.
//!
//! `put` to zero skips the release step (as in Linux: the user drops its mirror itself before
//! putting). `free` runs when the engine drops its last reference to the registration, which
//! is after every callback that was running has returned.

use std::any::{Any, TypeId};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use crate::context::{Scope, ScopeKind};

use crate::range::{Invalidation, Range};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::Mutex;

/// The identity of one registration of a classic subscriber; unique across all address spaces
/// of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriberId(pub(crate) u64);

impl SubscriberId {
    /// The raw number, for logs and traces.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SubscriberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "subscriber #{}", self.0)
    }
}

/// A classic subscriber refused a non-blocking start because it would have had to sleep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Refused;

/// What a classic subscriber implements. Built with `const` methods:
///
/// ```
/// use mmnotify::Capabilities;
/// // A KVM-like subscriber: start and end, never refuses.
/// const KVM: Capabilities = Capabilities::new().with_start().with_end();
/// assert!(KVM.has_end() && !KVM.can_refuse());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capabilities {
    start: bool,
    end: bool,
    refuse: bool,
    secondary_tlb: bool,
}

impl Capabilities {
    /// Nothing but `release` and the young callbacks.
    pub const fn new() -> Self {
        Capabilities {
            start: false,
            end: false,
            refuse: false,
            secondary_tlb: false,
        }
    }

    /// Implements [`Subscriber::invalidate_range_start`].
    pub const fn with_start(mut self) -> Self {
        self.start = true;
        self
    }

    /// Implements [`Subscriber::invalidate_range_end`].
    pub const fn with_end(mut self) -> Self {
        self.end = true;
        self
    }

    /// May refuse a non-blocking start. Under [`Policy::Exact`](crate::Policy::Exact) such a
    /// subscriber may also have an end (it will never get one for a refused start); under
    /// Linux's convention it may not, and `Kernel` reports the combination when it refuses.
    pub const fn may_refuse(mut self) -> Self {
        self.refuse = true;
        self
    }

    /// Implements [`Subscriber::arch_invalidate_secondary_tlbs`]; excludes start and end.
    pub const fn with_secondary_tlb(mut self) -> Self {
        self.secondary_tlb = true;
        self
    }

    /// Whether start is declared.
    pub const fn has_start(&self) -> bool {
        self.start
    }

    /// Whether end is declared.
    pub const fn has_end(&self) -> bool {
        self.end
    }

    /// Whether refusing a non-blocking start is declared.
    pub const fn can_refuse(&self) -> bool {
        self.refuse
    }

    /// Whether the secondary-TLB callback is declared.
    pub const fn has_secondary_tlb(&self) -> bool {
        self.secondary_tlb
    }

    /// Whether the declaration contradicts itself (secondary-TLB together with start or end).
    pub(crate) const fn is_contradictory(&self) -> bool {
        self.secondary_tlb && (self.start || self.end)
    }
}

/// A classic subscriber (Linux's `struct mmu_notifier_ops`).
///
/// Every method has a default that does nothing, so a subscriber implements only what it
/// declares in [`Subscriber::capabilities`]. Callbacks run on the thread that caused them, may
/// run concurrently with each other (for different ranges, on different threads), and must not
/// call the blocking methods of the same [`Mm`](crate::Mm) (they get
/// [`Error::WouldDeadlock`](crate::Error::WouldDeadlock) if they do).
pub trait Subscriber: Send + Sync + 'static {
    /// What this subscriber implements. Called once, at registration.
    fn capabilities(&self) -> Capabilities;

    /// The address space is going away, or this subscriber is being unregistered.
    ///
    /// # When
    /// Exactly once per registration, from [`Mm::release`](crate::Mm::release) (process exit)
    /// or [`Mm::unregister`], whichever comes first; never if the last `put` came first (a
    /// release already under way when that `put` ran still completes, since `put` never
    /// blocks: drop your mirror in `release` and before the last `put` alike). The
    /// subscriber stays fully subscribed while `release` runs, so no invalidation is missed
    /// before its mirror is gone. Under [`Policy::Exact`](crate::Policy::Exact), invalidations
    /// that begin after `release` returned skip it; one that was already under way may still
    /// deliver its start and end afterwards (Linux gives no stronger promise). Under the Linux
    /// policies it is served, as in Linux, until process exit unlinks every subscriber. When
    /// `Mm::release` or `Mm::unregister` returns, nothing more is delivered.
    ///
    /// # Context
    /// May sleep. May run concurrently with other callbacks of this subscriber.
    ///
    /// # Must
    /// Drop every secondary mapping and create no new one.
    ///
    /// [`Mm::unregister`]: crate::Mm::unregister
    fn release(&self) {}

    /// The primary entries of `inv.range()` are about to change; the pages are still mapped.
    ///
    /// # When
    /// Before every change to the range, if [`Capabilities::has_start`]. All interval
    /// callbacks for the same range have already run.
    ///
    /// # Context
    /// May sleep only if `inv.is_blockable()`.
    ///
    /// # Must
    /// Until the matching [`invalidate_range_end`](Self::invalidate_range_end): use no
    /// secondary mapping of the range and create none. Starts nest and overlap, so count them.
    ///
    /// # May
    /// Return [`Refused`] only when the range is not blockable and handling it would need to
    /// sleep, and only if [`Capabilities::can_refuse`] is declared. Under
    /// [`Policy::Exact`](crate::Policy::Exact) a refuser never gets an end for this start. A
    /// refusal of a blockable range is a contract violation: it is counted
    /// ([`SubscriberStats::violations`]) and logged.
    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        let _ = inv;
        Ok(())
    }

    /// The primary entries of `inv.range()` have changed (the old pages may already be freed).
    ///
    /// # When
    /// Under [`Policy::Exact`](crate::Policy::Exact): exactly once for every start of this
    /// subscriber that succeeded, never for one it refused, never for a range that started
    /// before it was registered. Subscribers that declare an end but no start get one end per
    /// invalidation.
    ///
    /// # Context
    /// The blockability of the start. This invalidation has already given back its share of
    /// the interval epoch (the epoch itself closes when the last invalidation in flight ends).
    fn invalidate_range_end(&self, inv: &Invalidation) {
        let _ = inv;
    }

    /// Test and clear the accessed bit of the secondary mapping of `range`, flushing the
    /// secondary TLB. Results of all subscribers are OR-ed; every subscriber is called.
    ///
    /// # Context
    /// Must not sleep.
    fn clear_flush_young(&self, range: Range) -> bool {
        let _ = range;
        false
    }

    /// Like [`clear_flush_young`](Self::clear_flush_young), but the flush may be skipped.
    fn clear_young(&self, range: Range) -> bool {
        let _ = range;
        false
    }

    /// Whether the secondary mapping of `addr` was accessed, without clearing anything. The
    /// walk stops at the first subscriber that answers yes.
    fn test_young(&self, addr: u64) -> bool {
        let _ = addr;
        false
    }

    /// The primary TLB entries of `range` are being flushed; flush the secondary TLB in step.
    /// For devices that walk the primary page tables themselves (IOMMU SVA).
    ///
    /// # When
    /// Only if [`Capabilities::has_secondary_tlb`], which excludes start and end.
    ///
    /// # Context
    /// Must not sleep.
    fn arch_invalidate_secondary_tlbs(&self, range: Range) {
        let _ = range;
    }

    /// The engine dropped its last reference to this registration.
    ///
    /// # When
    /// Exactly once, after the registration was unlinked and every callback of it that was
    /// running has returned.
    ///
    /// # Context
    /// Must not sleep: it runs on whichever thread dropped the last reference, possibly at the
    /// end of somebody else's invalidation.
    fn free(&self) {}
}

/// Counters of what one registration received, readable while it is registered through
/// [`Mm::subscriber_stats`](crate::Mm::subscriber_stats), and returned, final, by
/// [`Mm::unregister`](crate::Mm::unregister).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct SubscriberStats {
    /// Successful `invalidate_range_start` calls.
    pub starts: u64,
    /// Refused `invalidate_range_start` calls.
    pub refusals: u64,
    /// `invalidate_range_end` calls.
    pub ends: u64,
    /// `release` calls (0 or 1).
    pub releases: u64,
    /// Contract violations: refusing a blockable start, or refusing without declaring
    /// [`Capabilities::may_refuse`].
    pub violations: u64,
}

/// How many threads get a statistics shard of their own per registration (the rest share one).
/// Under loom two, so that the models run both paths.
const STAT_SHARDS: usize = if cfg!(loom) { 2 } else { 16 };

/// One thread's counters for one registration, on a cache line pair of their own.
#[derive(Debug)]
#[repr(align(128))]
struct StatShard([AtomicU64; Stat::COUNT]);

/// What a counter counts; the index of its place in a [`StatShard`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stat {
    Starts,
    Refusals,
    Ends,
    Releases,
    Violations,
}

impl Stat {
    const COUNT: usize = 5;
}

/// A registration's counters, sharded per thread so that counting a callback writes only a
/// line the calling thread owns (a shared counter would be a cache line that every
/// invalidating thread writes, twice per window).
///
/// # Invariants
///
/// Shard `n < STAT_SHARDS` is written only by the thread whose number is `n`
/// (`thread_index.rs`), with a plain load and store; the last shard by every other thread, with
/// atomic increments. A counter's value is the sum over the shards. The sum is exact once the
/// writes are ordered before the read: `unregister` reads after a grace period, which orders
/// every read section that counted (the section's end is a `Release` store the writer's drain
/// reads with `Acquire`). A read while invalidations run may miss counts still in flight, as
/// a single counter read a moment earlier would.
#[derive(Debug)]
pub(crate) struct StatCounters {
    shards: Box<[StatShard]>,
}

impl Default for StatCounters {
    fn default() -> Self {
        StatCounters {
            shards: (0..=STAT_SHARDS)
                .map(|_| StatShard(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }
}

impl StatCounters {
    /// Counts one `stat` on behalf of the thread numbered `thread` (the caller's own number,
    /// see `thread_index.rs`).
    #[inline]
    pub(crate) fn bump(&self, stat: Stat, thread: Option<usize>) {
        match thread {
            Some(n) if n < STAT_SHARDS => {
                let counter = &self.shards[n].0[stat as usize];
                counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            }
            _ => {
                self.shards[STAT_SHARDS].0[stat as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn total(&self, stat: Stat) -> u64 {
        self.shards
            .iter()
            .map(|shard| shard.0[stat as usize].load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn snapshot(&self) -> SubscriberStats {
        SubscriberStats {
            starts: self.total(Stat::Starts),
            refusals: self.total(Stat::Refusals),
            ends: self.total(Stat::Ends),
            releases: self.total(Stat::Releases),
            violations: self.total(Stat::Violations),
        }
    }
}

/// Something that must be told when a registration is freed (the `Mm`'s barrier for
/// `synchronize`).
pub(crate) trait FreeNotify: Send + Sync + fmt::Debug {
    fn freed(&self);
}

/// The engine's record of one registration.
///
/// # Invariants
///
/// * `caps` is not contradictory (checked before construction).
/// * `released_flag` is set, under `release_once`, exactly when `release` has returned, and is
///   never cleared.
/// * `release_once` holds `true` once `release` must not be called any more: it returned, or
///   a `put` to zero claimed the registration first (then `release` is never called).
pub(crate) struct Registration {
    pub(crate) id: SubscriberId,
    /// The owning `Mm`'s id, for the context marks around `free`.
    mm_id: u64,
    pub(crate) subscriber: Arc<dyn Subscriber>,
    pub(crate) caps: Capabilities,
    /// `Some` for registrations made by `get_or_register`.
    pub(crate) key: Option<TypeId>,
    released_flag: AtomicBool,
    /// Set once `register` returned: every invalidation in flight at registration has ended.
    ready: AtomicBool,
    release_once: Mutex<bool>,
    /// Shared so that the counters outlive the registration: `unregister` after process exit
    /// still reports them.
    pub(crate) stats: Arc<StatCounters>,
    /// Set when unlinked; the `Mm` then counts this registration as a pending free.
    on_free: Mutex<Option<Arc<dyn FreeNotify>>>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .field("caps", &self.caps)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Registration {
    pub(crate) fn new(
        id: SubscriberId,
        mm_id: u64,
        subscriber: Arc<dyn Subscriber>,
        caps: Capabilities,
        key: Option<TypeId>,
    ) -> Self {
        Registration {
            id,
            mm_id,
            subscriber,
            caps,
            key,
            released_flag: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            release_once: Mutex::new(false),
            stats: Arc::default(),
            on_free: Mutex::new(None),
        }
    }

    /// Whether this registration's `release` has returned (under `Exact`, new starts and
    /// young/tlb walks then skip it).
    pub(crate) fn is_released(&self) -> bool {
        // Acquire: pairs with the Release store in `release`; a start that sees the flag also
        // sees everything the release callback did.
        self.released_flag.load(Ordering::Acquire)
    }

    /// Calls `release` unless it already ran or a `put` to zero came first; returns after it
    /// has run, by us or by a concurrent caller.
    ///
    /// The `release_once` lock is held across the callback: that is what makes a second caller
    /// wait for the first one's release to *finish*. A release callback that calls back into
    /// the blocking API of its `Mm` is refused by the context check before reaching this lock.
    pub(crate) fn release(&self) -> Option<Box<dyn Any + Send>> {
        let mut released = self.release_once.lock();
        if *released {
            return None;
        }
        // The flag is raised only after the callback: until the mirror is gone, every change
        // must still reach it. A panicking release counts as done: it is never called again,
        // and the caller finishes its own work before resuming the panic.
        let panicked = panic::catch_unwind(AssertUnwindSafe(|| self.subscriber.release())).err();
        self.released_flag.store(true, Ordering::Release);
        self.stats
            .bump(Stat::Releases, crate::thread_index::current());
        *released = true;
        panicked
    }

    /// Whether the registration's `register` call has returned (it waited for the
    /// invalidations that were in flight).
    pub(crate) fn is_ready(&self) -> bool {
        // Acquire: pairs with the Release in `mark_ready`.
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Counts `stat` for this registration; `thread` is the calling thread's number (the read
    /// section's, see [`SrcuReadGuard::thread`](crate::srcu::SrcuReadGuard::thread)).
    #[inline]
    pub(crate) fn record(&self, stat: Stat, thread: Option<usize>) {
        self.stats.bump(stat, thread);
    }

    /// Marks the registration unlinked: from now on its drop counts as a pending free of `mm`.
    pub(crate) fn set_unlinked(&self, notify: Arc<dyn FreeNotify>) {
        *self.on_free.lock() = Some(notify);
    }

    /// A `put` to zero: from now on `release` is never called for this registration (Linux's
    /// users drop their mirror themselves before the last put). Never blocks: if a `release`
    /// is running right now (by `Mm::release` on another thread, or this very thread's
    /// `release` callback calling `put`), it simply finishes: it was claimed before the put,
    /// although its callback may only begin after the put returned. Returns whether the
    /// release was forgone (or had already run), i.e. no callback can begin any more.
    pub(crate) fn forgo_release(&self) -> bool {
        match self.release_once.try_lock() {
            Some(mut released) => {
                *released = true;
                true
            }
            None => false,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if crate::sync::unwinding_under_loom() {
            return;
        }
        /// Tells the `Mm` about the free even if `free` panics, so `synchronize` cannot hang.
        struct Freed(Option<Arc<dyn FreeNotify>>);
        impl Drop for Freed {
            fn drop(&mut self) {
                if let Some(notify) = self.0.take() {
                    notify.freed();
                }
            }
        }
        let _freed = Freed(self.on_free.lock().take());
        // `free` must not sleep: mark the context so that a blocking call from it is refused
        // instead of hanging.
        let _cb = Scope::enter(self.mm_id, ScopeKind::Callback { nonblocking: true });
        self.subscriber.free();
    }
}
