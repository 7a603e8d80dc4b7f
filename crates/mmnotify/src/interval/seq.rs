//! The interval sequence protocol: one address space's sequence, active-range count, deferred
//! queue and wait queue (Linux's `mmu_notifier_subscriptions` itree part).
//!
//! # State
//!
//! * `S`, the address space's sequence (`seq`), starts at 2.
//! * `A`, the number of invalidations in flight (`active`), counted for *every* range while
//!   interval subscriptions exist, overlapping or not.
//! * `s_i`, each interval's own sequence (`IntervalNode::seq`), always odd.
//!
//! | state            | condition        | the index may change? | meaning                                             |
//! |------------------|------------------|-----------------------|-----------------------------------------------------|
//! | idle             | `A == 0`, S even | yes                   | nothing in flight                                   |
//! | in flight        | `A > 0`, S even  | yes                   | ranges in flight, none of them overlapped anything  |
//! | epoch            | `A > 0`, S odd   | no: changes queue     | some range overlapped intervals; callbacks may run  |
//!
//! Moves, all under `state`'s lock:
//!
//! * a start: `A += 1`; if it overlaps an interval, `S |= 1` (opens an epoch or joins the open
//!   one); the callbacks then get `cur_seq = S`;
//! * an end: `A -= 1`; if that makes `A == 0` while S is odd, `S += 1` (the epoch closes), the
//!   deferred inserts and removes are applied, and every waiter is woken, in that order;
//! * an insert while `A > 0`: `S |= 1` as well, because ranges already in flight may cover the
//!   new interval without having seen it; the new interval gets `s_i = S`, so its first
//!   `read_begin` waits for them. An insert while idle gets `s_i = S - 1`: odd, and from the
//!   past.
//!
//! Each epoch therefore has its own odd value, and those values only grow. A 64-bit counter
//! that grows by 2 per epoch does not wrap in the life of any process.
//!
//! # Why `read_retry` never lets a stale mapping be committed
//!
//! Claim: if `read_retry(seq)` returns `false` under the user lock, no invalidation that
//! overlaps the interval changed primary entries between the mirror's `read_begin` and its
//! commit, and every later one will tear the committed entry down.
//!
//! 1. *Tags are unique.* `read_begin` returns a value that is either a closed epoch's value or
//!    `S_insert - 1`; both are smaller than any epoch value still to come. So any callback on
//!    this interval after `read_begin` stores a value different from `seq`.
//! 2. *An epoch that already reached the interval.* Then `s_i == S` and `read_begin` waits
//!    until the epoch closes, i.e. until every range in flight has finished changing entries
//!    (`A == 0`). The same holds for an interval inserted while ranges were in flight.
//! 3. *An epoch that has not reached it yet.* `read_begin` returns at once and the mirror may
//!    read entries that are changing. But the epoch will call this interval's callback (the
//!    index does not change during an epoch, so it cannot be skipped), which stores a new
//!    `s_i`: `read_retry` reports it, and the retry's `read_begin` is in case 2.
//! 4. *An invalidation that starts after `read_begin`.* Its callback either runs entirely
//!    before the mirror takes the user lock for `read_retry` (then `s_i` changed, and the
//!    check fails) or entirely after the commit (then it tears the new entry down): the
//!    callback holds the user lock across `set_seq` and its teardown, and the mirror holds it
//!    across the check and the commit.
//! 5. *No end callback is needed*: keeping new entries out until the primary change is over
//!    comes from 2, the wait for the epoch to close.
//!
//! The index is read only under the lock: the start collects the overlapping intervals while
//! holding it, then calls them without it. Those callbacks cannot race with a removal, because
//! a removal during an epoch is deferred to the epoch's close, which waits for `A == 0`, which
//! needs this very start to have ended.

use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use super::index::{DefaultIndex, IntervalIndex};
use super::{IntervalEntry, IntervalId, IntervalNode, Membership, ReadSeq};
use crate::context;
use crate::error::{BlockingOp, Error, Result};
use crate::range::Range;
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{Condvar, Mutex};

/// How many overlapping intervals one invalidation collects without allocating.
pub(crate) const INLINE_HITS: usize = 8;

/// The intervals one start must call (their entries, cloned under the lock: one reference
/// count per hit, as for a bare node).
pub(crate) type Hits = SmallVec<[Arc<IntervalEntry>; INLINE_HITS]>;

/// The per-address-space interval state.
#[derive(Debug)]
pub(crate) struct Itree {
    mm_id: u64,
    /// Set (under `state`) by the first insert and never cleared (Linux's `has_itree`): from
    /// then on every invalidation counts itself in `active`.
    present: AtomicBool,
    /// Set once the invalidations that began before `present` (and so did not count
    /// themselves) have all ended. Until then every insert must wait for them itself.
    ready: AtomicBool,
    state: Mutex<ItreeState>,
    closed: Condvar,
}

#[derive(Debug)]
struct ItreeState {
    seq: u64,
    active: usize,
    /// The inserted intervals; the only owner of their subscribers besides `pending_inserts`.
    index: DefaultIndex<Arc<IntervalEntry>>,
    /// Inserts queued during an epoch (`PendingInsert`).
    pending_inserts: Vec<Arc<IntervalEntry>>,
    /// Indexed intervals whose removal is queued during an epoch (`PendingRemove`).
    pending_removes: Vec<Arc<IntervalNode>>,
}

impl ItreeState {
    fn epoch_open(&self) -> bool {
        self.seq & 1 == 1
    }
}

/// A snapshot of the protocol state, for tests, the simulator's oracle and the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct IntervalState {
    /// The address space's sequence `S` (odd while an epoch is open).
    pub seq: u64,
    /// Invalidations in flight, `A`.
    pub active: usize,
    /// Intervals in the index.
    pub indexed: usize,
    /// Inserts and removes queued for the end of the epoch.
    pub deferred: usize,
}

impl Itree {
    pub(crate) fn new(mm_id: u64, initial_seq: u64) -> Self {
        debug_assert!(initial_seq % 2 == 0 && initial_seq >= 2);
        Itree {
            mm_id,
            present: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            state: Mutex::new(ItreeState {
                seq: initial_seq,
                active: 0,
                index: DefaultIndex::default(),
                pending_inserts: Vec::new(),
                pending_removes: Vec::new(),
            }),
            closed: Condvar::new(),
        }
    }

    /// Whether any interval was ever inserted. Read inside an SRCU read section by starts; the
    /// first insert sets it and then waits for the read sections that may have missed it.
    pub(crate) fn is_present(&self) -> bool {
        // Acquire: pairs with the Release in `mark_present`.
        self.present.load(Ordering::Acquire)
    }

    /// Makes every invalidation that starts from now on count itself in the interval state.
    pub(crate) fn mark_present(&self) {
        let _state = self.state.lock();
        self.present.store(true, Ordering::Release);
    }

    /// Whether the invalidations that began before the state was present have all ended (an
    /// inserter that saw them end sets it with [`mark_ready`](Self::mark_ready)).
    pub(crate) fn is_ready(&self) -> bool {
        // Acquire: pairs with the Release in `mark_ready`; the inserter's wait happens before.
        self.ready.load(Ordering::Acquire)
    }

    /// Records that no uncounted invalidation is left.
    pub(crate) fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub(crate) fn state(&self) -> IntervalState {
        let state = self.state.lock();
        IntervalState {
            seq: state.seq,
            active: state.active,
            indexed: state.index.len(),
            deferred: state.pending_inserts.len() + state.pending_removes.len(),
        }
    }

    /// An invalidation of `range` begins: counts it in flight, and returns the overlapping
    /// intervals with the epoch value to call them with.
    pub(crate) fn begin(&self, range: Range, hits: &mut Hits) -> u64 {
        let mut state = self.state.lock();
        state.active += 1;
        state
            .index
            .for_each_overlap(range.start(), range.last(), &mut |entry| {
                hits.push(Arc::clone(entry))
            });
        if !hits.is_empty() {
            state.seq |= 1;
        }
        state.seq
    }

    /// An invalidation ends: the matching decrement of [`begin`](Self::begin). Closes the
    /// epoch when it was the last one in flight.
    pub(crate) fn end(&self) {
        let mut state = self.state.lock();
        debug_assert!(state.active > 0, "interval epoch end without a begin");
        state.active -= 1;
        if state.active > 0 || !state.epoch_open() {
            return;
        }
        // Wrapping: the sequence is compared only for equality and parity, and
        // `MmBuilder::initial_interval_seq` lets tests start it just below the wrap.
        state.seq = state.seq.wrapping_add(1);
        // The queue and the removed entries are dropped only after the lock is released: the
        // last reference to an interval may go with them, and its subscriber's `Drop` is user
        // code that may call back into this `Mm`.
        let inserts = std::mem::take(&mut state.pending_inserts);
        let removes = std::mem::take(&mut state.pending_removes);
        let mut removed = Vec::with_capacity(removes.len());
        for entry in inserts {
            debug_assert_eq!(entry.node.membership(), Membership::PendingInsert);
            entry.node.set_membership(Membership::InTree);
            state
                .index
                .insert(entry.node.start(), entry.node.last(), entry);
        }
        for node in &removes {
            debug_assert_eq!(node.membership(), Membership::PendingRemove);
            let entry = state.index.remove(node.start(), node.last(), &mut |e| {
                Arc::ptr_eq(&e.node, node)
            });
            debug_assert!(entry.is_some(), "a pending removal must be in the index");
            removed.extend(entry);
            node.set_membership(Membership::Removed);
        }
        drop(state);
        self.closed.notify_all();
        drop(removes);
        drop(removed);
    }

    /// Adds an interval (the caller already made the state present). The entry is the
    /// engine's reference to the subscriber, owned by the state from now on.
    pub(crate) fn insert(&self, entry: Arc<IntervalEntry>) {
        let node = Arc::clone(&entry.node);
        let (start, last) = (node.start(), node.last());
        let mut state = self.state.lock();
        if state.active > 0 {
            if state.epoch_open() {
                node.set_membership(Membership::PendingInsert);
                state.pending_inserts.push(entry);
            } else {
                state.seq |= 1;
                state.index.insert(start, last, entry);
                node.set_membership(Membership::InTree);
            }
            node.seq.store(state.seq, Ordering::Relaxed);
        } else {
            state.index.insert(start, last, entry);
            node.set_membership(Membership::InTree);
            node.seq.store(state.seq.wrapping_sub(1), Ordering::Relaxed);
        }
    }

    /// Removes an interval now if no epoch is open, else queues the removal. Returns whether
    /// the caller must wait for the epoch to close.
    pub(crate) fn remove_deferred(&self, node: &Arc<IntervalNode>) -> Result<bool> {
        // Entries taken out of the index or the queue are dropped after the lock is released
        // (see `end`).
        let mut taken = None;
        let mut state = self.state.lock();
        let result = match node.membership() {
            Membership::Removed => Err(Error::IntervalNotInserted { id: node.id }),
            Membership::PendingRemove => Ok(true),
            Membership::PendingInsert => {
                if let Some(at) = state
                    .pending_inserts
                    .iter()
                    .position(|e| Arc::ptr_eq(&e.node, node))
                {
                    taken = Some(state.pending_inserts.remove(at));
                }
                node.set_membership(Membership::Removed);
                Ok(false)
            }
            Membership::InTree if state.epoch_open() => {
                node.set_membership(Membership::PendingRemove);
                state.pending_removes.push(Arc::clone(node));
                Ok(true)
            }
            Membership::InTree => {
                taken = state.index.remove(node.start(), node.last(), &mut |e| {
                    Arc::ptr_eq(&e.node, node)
                });
                debug_assert!(taken.is_some());
                node.set_membership(Membership::Removed);
                Ok(false)
            }
        };
        drop(state);
        drop(taken);
        result
    }

    /// Removes every interval at once (the address space is going away): each counts as
    /// removed, and the state's entries, the only engine references to the subscribers, are
    /// dropped (outside the lock). So subscribers of intervals that were never removed are
    /// dropped with their `Mm` even while handles to them live, and a cycle subscriber →
    /// handle → node → `Itree` → entry → subscriber is broken.
    pub(crate) fn clear(&self) {
        let mut state = self.state.lock();
        state.index.for_each_overlap(0, u64::MAX, &mut |e| {
            e.node.set_membership(Membership::Removed)
        });
        let index = std::mem::take(&mut state.index);
        let inserts = std::mem::take(&mut state.pending_inserts);
        let removes = std::mem::take(&mut state.pending_removes);
        for entry in &inserts {
            entry.node.set_membership(Membership::Removed);
        }
        drop(state);
        // Waiters in `remove` or `read_begin` see the intervals removed.
        self.closed.notify_all();
        drop(index);
        drop(inserts);
        drop(removes);
    }

    /// Removes an interval and returns once no callback of it runs or can start.
    pub(crate) fn remove(&self, node: &Arc<IntervalNode>) -> Result<()> {
        context::may_block(self.mm_id, BlockingOp::Remove)?;
        if !self.remove_deferred(node)? {
            return Ok(());
        }
        let mut state = self.state.lock();
        while node.membership() != Membership::Removed {
            state = self.closed.wait(state);
        }
        Ok(())
    }

    /// `read_begin` and `read_begin_timeout`.
    pub(crate) fn read_begin(
        &self,
        node: &Arc<IntervalNode>,
        deadline: Option<Instant>,
    ) -> Result<ReadSeq> {
        let state = self.state.lock();
        if node.membership() == Membership::Removed {
            return Err(Error::IntervalNotInserted { id: node.id });
        }
        // Acquire: pairs with the Release in `set_seq`.
        let seq = node.seq.load(Ordering::Acquire);
        if seq != state.seq {
            return Ok(ReadSeq(seq));
        }
        drop(state);
        self.read_begin_slow(node, seq, deadline)
    }

    #[cold]
    fn read_begin_slow(
        &self,
        node: &IntervalNode,
        seq: u64,
        deadline: Option<Instant>,
    ) -> Result<ReadSeq> {
        context::may_block(self.mm_id, BlockingOp::ReadBegin)?;
        let id: IntervalId = node.id;
        let began = Instant::now();
        let mut state = self.state.lock();
        while state.seq == seq {
            if node.membership() == Membership::Removed {
                // The address space was dropped while the epoch was open (a leaked epoch).
                return Err(Error::IntervalNotInserted { id });
            }
            match deadline {
                None => state = self.closed.wait(state),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::ReadBeginTimeout {
                            id,
                            waited: now - began,
                        });
                    }
                    state = self.closed.wait_timeout(state, deadline - now);
                }
            }
        }
        Ok(ReadSeq(seq))
    }
}
