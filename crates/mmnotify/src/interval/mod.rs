//! Interval subscriptions: one callback per overlapping invalidation, and the collision-retry
//! protocol that lets a mirror populate itself without holding a lock across the slow part.
//!
//! An interval subscriber covers a fixed half-open [`Range`] `[start, end)` of the address space
//! (Linux's `mmu_interval_notifier`, which stores the inclusive `[start, last]`). It has no start/end pair: it gets one
//! [`IntervalSubscriber::invalidate`] call per invalidation that overlaps it, before any
//! classic start, and keeps new mappings out until the invalidation is over through the
//! sequence protocol of [`seq`] rather than through an end callback:
//!
//! ```text
//!   mirror fault path                         invalidate callback
//!   -----------------                         -------------------
//!   loop {
//!     seq = handle.read_begin()?               lock(user_lock)
//!     look up the primary (may sleep)          ctx.set_seq()
//!     lock(user_lock)                          drop the mirror's entries
//!     if handle.read_retry(seq) { unlock;      unlock(user_lock)
//!        continue }                            Invalidate::Done
//!     install the mirror entry
//!     unlock(user_lock); break
//!   }
//! ```
//!
//! # Who owns what
//!
//! ```text
//!   IntervalHandle ──► IntervalNode ──► Itree (the Mm's interval state)
//!                                         │ index / deferred queue entries
//!                                         ▼
//!                  Arc<IntervalEntry { node, subscriber }> ──► the subscriber
//! ```
//!
//! The node (what handles and callbacks' [`IntervalCtx`] point at) does *not* own the
//! subscriber: only the interval state's entries do, for as long as the interval is inserted or
//! queued for insertion. So a subscriber may store its own [`IntervalHandle`] (natural for a
//! device struct whose fault path calls `read_begin`) without forming a cycle: removing the
//! interval drops the entry, hence the subscriber, hence its handle and the node. Dropping the
//! `Mm` empties the state (every interval counts as removed), which drops every interval
//! subscriber even while handles live. An invalidation clones the entry's `Arc` while it
//! collects its hits under the interval lock, so a callback never races with the drop: the fast
//! path costs what it cost when the node owned the subscriber (one reference count per hit, no
//! lock, no allocation up to the inline hit count), plus one pointer hop to reach the node.
//!
//! Module map: [`seq`] holds the per-`Mm` state (sequence, active-range count,
//! deferred queue) and its proofs; [`index`] the overlap index.

pub mod index;
pub mod seq;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::range::{Invalidation, Range};
use crate::sync::atomic::{AtomicU64, AtomicU8, Ordering};

pub(crate) use seq::Itree;

/// The identity of one interval subscription; unique across all address spaces of the
/// process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntervalId(pub(crate) u64);

impl IntervalId {
    /// The raw number, for logs and traces.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for IntervalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "interval #{}", self.0)
    }
}

/// What an interval callback did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Invalidate {
    /// The mirror's entries for the range are gone.
    Done,
    /// The teardown was *issued* but not waited for: call
    /// [`IntervalSubscriber::invalidate_finish`] once every interval callback of this range
    /// has been issued (two-pass invalidation, for several devices that can work in parallel).
    Finish,
    /// Non-blockable range only: the callback would have had to sleep. The walk stops, the
    /// epoch is closed, and the start fails with
    /// [`Error::StartRefused`](crate::Error::StartRefused).
    Refused,
}

/// An interval subscriber (Linux's `mmu_interval_notifier_ops`).
pub trait IntervalSubscriber: Send + Sync + 'static {
    /// An invalidation overlaps this interval.
    ///
    /// # When
    /// Once per invalidation that overlaps the interval, before any classic start of it.
    ///
    /// # Context
    /// May sleep only if `inv.is_blockable()`. Other interval callbacks of the same range run
    /// on the same thread before or after this one.
    ///
    /// # Must
    /// Under the lock that the fault path holds around `read_retry` and its commit: call
    /// [`IntervalCtx::set_seq`], then drop the mirror's entries for the range (or issue the
    /// drop and return [`Invalidate::Finish`]).
    ///
    /// # Must not
    /// Call [`Mm::remove_interval`](crate::Mm::remove_interval) or `read_begin` (they would
    /// wait for this very callback); use [`IntervalCtx::remove_deferred`] instead.
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate;

    /// Completes a teardown that [`invalidate`](Self::invalidate) issued with
    /// [`Invalidate::Finish`].
    ///
    /// # When
    /// After every interval callback of the range was issued (also when a later one refused),
    /// before any classic start, in the order the callbacks ran.
    ///
    /// # Context
    /// As for `invalidate`.
    fn invalidate_finish(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) {
        let _ = (ctx, inv);
    }
}

/// Membership of an interval in its address space's index; changed only under the interval
/// lock.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Membership {
    /// In the index.
    InTree = 0,
    /// Queued for insertion at the end of the current epoch.
    PendingInsert = 1,
    /// In the index, queued for removal at the end of the current epoch.
    PendingRemove = 2,
    /// Gone.
    Removed = 3,
}

impl Membership {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Membership::InTree,
            1 => Membership::PendingInsert,
            2 => Membership::PendingRemove,
            _ => Membership::Removed,
        }
    }
}

/// One interval subscription, as handles and callbacks see it. It does not own the subscriber
/// (see [`IntervalEntry`] and the module docs).
///
/// # Invariants
///
/// * `seq` is always odd (it only ever holds a past or current epoch value, or the value
///   "just before" the sequence at insertion, which is odd because the sequence was even).
/// * `closed_tag` is 0 or the value of an epoch that has closed (or `S_insert - 1`), stored
///   with Release by a thread that had seen the close with Acquire.
/// * `membership` changes only under the owning [`Itree`]'s lock.
pub(crate) struct IntervalNode {
    pub(crate) id: IntervalId,
    pub(crate) range: Range,
    pub(crate) seq: AtomicU64,
    /// A tag whose epoch is known to be closed: a `read_begin` that finds `seq` equal to it
    /// needs to read nothing outside this node (see `interval/seq.rs`, "read_begin without the
    /// lock"). Starts at 0, which is never a tag (tags are odd).
    pub(crate) closed_tag: AtomicU64,
    membership: AtomicU8,
    pub(crate) itree: Arc<Itree>,
}

impl fmt::Debug for IntervalNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntervalNode")
            .field("id", &self.id)
            .field("range", &self.range)
            .field("seq", &self.seq.load(Ordering::Relaxed))
            .field("membership", &self.membership())
            .finish_non_exhaustive()
    }
}

impl IntervalNode {
    pub(crate) fn new(id: IntervalId, range: Range, itree: Arc<Itree>) -> Self {
        IntervalNode {
            id,
            range,
            seq: AtomicU64::new(1),
            closed_tag: AtomicU64::new(0),
            membership: AtomicU8::new(Membership::Removed as u8),
            itree,
        }
    }

    pub(crate) fn membership(&self) -> Membership {
        Membership::from_u8(self.membership.load(Ordering::Relaxed))
    }

    /// Only under the interval lock.
    pub(crate) fn set_membership(&self, m: Membership) {
        self.membership.store(m as u8, Ordering::Relaxed);
    }

    /// The first address of the interval (the index works on inclusive bounds).
    pub(crate) fn start(&self) -> u64 {
        self.range.start()
    }

    /// The last address of the interval, inclusive.
    pub(crate) fn last(&self) -> u64 {
        self.range.last()
    }
}

/// What the interval state stores, behind an `Arc`, for an inserted (or queued) interval: the
/// node and the one engine-owned reference to its subscriber.
///
/// # Invariants
///
/// An entry exists only in the index or the deferred queue of the node's own `Itree`, or,
/// briefly, in an invalidation's hits (which end before a removal that must wait for them
/// returns) or on the way to being dropped outside the interval lock.
pub(crate) struct IntervalEntry {
    pub(crate) node: Arc<IntervalNode>,
    pub(crate) subscriber: Arc<dyn IntervalSubscriber>,
}

impl fmt::Debug for IntervalEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.node, f)
    }
}

/// What an interval callback may do while it runs.
///
/// It offers no blocking operation: the type is the context.
#[derive(Debug)]
pub struct IntervalCtx<'a> {
    pub(crate) node: &'a Arc<IntervalNode>,
    pub(crate) cur_seq: u64,
}

impl IntervalCtx<'_> {
    /// Marks the interval as invalidated by the current epoch, so that a concurrent
    /// `read_retry` reports a collision (Linux's `mmu_interval_set_seq`).
    ///
    /// Call it under the lock the fault path holds around `read_retry` and its commit.
    pub fn set_seq(&self) {
        // Release: pairs with the Acquire loads in read_begin/read_retry/check_retry; the
        // user's lock already orders the interesting cases, this makes lock-free
        // `check_retry` see the teardown that preceded it.
        self.node.seq.store(self.cur_seq, Ordering::Release);
    }

    /// The sequence value of the running epoch (Linux's `cur_seq`).
    pub fn cur_seq(&self) -> u64 {
        self.cur_seq
    }

    /// The interval being invalidated.
    pub fn id(&self) -> IntervalId {
        self.node.id
    }

    /// The interval's range, half-open as everywhere in the API.
    pub fn range(&self) -> Range {
        self.node.range
    }

    /// Removes this interval when the current epoch closes, without waiting (allowed here,
    /// unlike [`Mm::remove_interval`](crate::Mm::remove_interval)). Calling it twice is
    /// harmless.
    pub fn remove_deferred(&self) {
        let _ = self.node.itree.remove_deferred(self.node);
    }
}

/// A sequence snapshot taken by [`IntervalHandle::read_begin`], checked by
/// [`IntervalHandle::read_retry`].
#[must_use = "a read_begin without a read_retry under the user lock protects nothing"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadSeq(pub(crate) u64);

impl ReadSeq {
    /// The raw value.
    pub fn value(&self) -> u64 {
        self.0
    }

    /// A sequence from a raw value given back by [`value`](Self::value), for callers that must
    /// carry it through a foreign interface (the C API). A value that did not come from
    /// `read_begin` only changes what `read_retry` answers for the caller's own fill.
    pub fn from_value(value: u64) -> ReadSeq {
        ReadSeq(value)
    }
}

/// The owner's handle to an interval subscription: the read side of the collision-retry
/// protocol. Removal goes through [`Mm::remove_interval`](crate::Mm::remove_interval).
///
/// Dropping the handle does not remove the interval. The handle does not keep the subscriber
/// alive: the subscriber may store its own handle, and it is dropped when the interval is removed
/// or the `Mm` is dropped, whichever comes first.
#[derive(Debug, Clone)]
pub struct IntervalHandle {
    pub(crate) node: Arc<IntervalNode>,
}

impl IntervalHandle {
    /// The interval's identity.
    pub fn id(&self) -> IntervalId {
        self.node.id
    }

    /// The interval's range, half-open as everywhere in the API.
    pub fn range(&self) -> Range {
        self.node.range
    }

    /// Begins a read: waits while the invalidation epoch that last touched this interval is
    /// open, then returns the sequence to check later (Linux's `mmu_interval_read_begin`).
    ///
    /// It does not loop: an invalidation may already be pending when it returns, which
    /// `read_retry` will report.
    ///
    /// # Errors
    ///
    /// [`Error::WouldDeadlock`](crate::Error::WouldDeadlock) if it would have to wait while the
    /// calling thread is inside a callback of, or holds a guard of, this address space, or is
    /// in non-blocking context.
    #[must_use = "the sequence must be checked with read_retry"]
    pub fn read_begin(&self) -> Result<ReadSeq> {
        self.node.itree.read_begin(&self.node, None)
    }

    /// Like [`read_begin`](Self::read_begin), but waits at most `timeout`.
    ///
    /// A timeout too large to add to the current time waits without limit.
    ///
    /// # Errors
    ///
    /// [`Error::ReadBeginTimeout`](crate::Error::ReadBeginTimeout) when the time is up, and the
    /// errors of `read_begin`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use mmnotify::{Invalidate, Invalidation, IntervalCtx, IntervalSubscriber, Mm, Range};
    ///
    /// struct Mirror;
    /// impl IntervalSubscriber for Mirror {
    ///     fn invalidate(&self, ctx: &IntervalCtx<'_>, _: &Invalidation) -> Invalidate {
    ///         ctx.set_seq();
    ///         Invalidate::Done
    ///     }
    /// }
    ///
    /// let mm = Mm::new();
    /// let handle = mm.insert_interval(Range::new(0x1000, 0x3000)?, Arc::new(Mirror))?;
    /// let seq = handle.read_begin_timeout(Duration::from_millis(100))?;
    /// assert!(!handle.read_retry(seq));
    /// # Ok::<(), mmnotify::Error>(())
    /// ```
    #[must_use = "the sequence must be checked with read_retry"]
    pub fn read_begin_timeout(&self, timeout: Duration) -> Result<ReadSeq> {
        let deadline = Instant::now().checked_add(timeout);
        self.node.itree.read_begin(&self.node, deadline)
    }

    /// Like [`read_begin`](Self::read_begin), but gives up at `deadline`.
    ///
    /// # Errors
    ///
    /// [`Error::ReadBeginTimeout`](crate::Error::ReadBeginTimeout) when the deadline passes,
    /// and the errors of `read_begin`.
    #[must_use = "the sequence must be checked with read_retry"]
    pub fn read_begin_until(&self, deadline: Instant) -> Result<ReadSeq> {
        self.node.itree.read_begin(&self.node, Some(deadline))
    }

    /// Whether an invalidation touched the interval since `seq` was taken. Call it under the
    /// lock that the invalidate callback takes around `set_seq`; if it returns `false`, commit
    /// the mirror entry before releasing that lock (Linux's `mmu_interval_read_retry`).
    pub fn read_retry(&self, seq: ReadSeq) -> bool {
        // Acquire: pairs with the Release in `set_seq`.
        self.node.seq.load(Ordering::Acquire) != seq.0
    }

    /// The same test without the user lock: a `true` is reliable, a `false` may be stale. Only
    /// for giving up early (Linux's `mmu_interval_check_retry`).
    pub fn check_retry(&self, seq: ReadSeq) -> bool {
        self.node.seq.load(Ordering::Acquire) != seq.0
    }
}
