//! The interval sequence protocol: one address space's sequence, active-range count, deferred
//! queue and wait queue (Linux's `mmu_notifier_subscriptions` itree part).
//!
//! # State
//!
//! * `S`, the address space's sequence (`seq`), starts at 2. An atomic written only under the
//!   interval lock (`state`), read without it by `read_begin` and `end`.
//! * `A`, the number of invalidations in flight (`active`), counted for *every* range while
//!   interval subscriptions exist, overlapping or not. An atomic changed by `begin` and `end`
//!   without the lock.
//! * `s_i`, each interval's own sequence (`IntervalNode::seq`), always odd.
//! * The occupancy filter (`occupied`): one bit per bucket of 1 GiB chunks of the address space
//!   (chunk number modulo 64), set while any interval of the index or the insert queue touches
//!   the bucket. Maintained under the lock by inserts and removals.
//!
//! | state            | condition        | the index may change? | meaning                                             |
//! |------------------|------------------|-----------------------|-----------------------------------------------------|
//! | idle             | `A == 0`, S even | yes                   | nothing in flight                                   |
//! | in flight        | `A > 0`, S even  | yes                   | ranges in flight, none of them overlapped anything  |
//! | epoch            | S odd            | no: changes queue     | some range overlapped intervals; callbacks may run  |
//!
//! (`A == 0` with S odd lasts only from the last end's decrement until it, or an insert, takes
//! the lock and closes the epoch.)
//!
//! Moves:
//!
//! * a start: `A += 1` (no lock); if the filter says an interval may overlap, under the lock:
//!   collect the overlapping intervals, and if there are any, `S |= 1` (opens an epoch or joins
//!   the open one); the callbacks then get `cur_seq = S`;
//! * an end: `A -= 1` (no lock); if that made `A == 0` and S is odd, under the lock: if still
//!   `A == 0` and S odd, the epoch closes: the deferred inserts and removes are applied, then
//!   `S += 1`, then the waiters are woken (only if there are any);
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
//!
//! # `read_begin` without the lock
//!
//! Linux compares `s_i` with `S` under its spinlock. Here `read_begin` loads `s_i` (Acquire),
//! then `S` (Acquire), and returns `s_i` at once when they differ; only when they are equal
//! (case 2) does it take the lock, re-compare and sleep. Why the two loads decide case 2
//! correctly without the lock:
//!
//! * *Equal means an open epoch tagged the interval*: `s_i` only ever holds epoch values and
//!   `S_insert - 1`, S only grows, and S holds an epoch value only while that epoch is open.
//! * *Different never hides an open tagging epoch.* Suppose epoch `E` tagged the interval and
//!   the load of `s_i` returned `E`. The tag was stored by a callback (Release) or by an insert
//!   under the lock, in both cases after `S = E` was stored; the Acquire load makes that store
//!   happen before the load of S, which therefore returns `E` or a later value. A later value
//!   is a closed `E` (S moved on only through the close). That is why `s_i` is loaded first: the
//!   other order could pair a fresh tag with a stale S.
//! * *A closed epoch is really over.* The close stores `S = E + 1` with Release after reading
//!   `A == 0`, which every end wrote with a `SeqCst` decrement after its primary change; the
//!   Acquire load of S makes all of them happen before the mirror's primary read.
//! * If `s_i` is older than the open epoch, the epoch has not tagged the interval yet: case 3,
//!   whatever S the second load returned.
//!
//! A stream of epochs on *other* intervals writes S twice per epoch, and a reader that loads S
//! would fetch its line from the writer's core each time. So each node also remembers one tag
//! whose epoch is known to be closed (`closed_tag`): a `read_begin` that saw the tag's epoch
//! closed (S moved on, or it waited for the close) stores the tag there with Release, and the
//! next `read_begin` that loads the same tag loads `closed_tag` (Acquire) instead of S and
//! returns at once. That is sound because a tag names one epoch for good (step 1) and a closed
//! epoch never reopens, and the Release/Acquire pair hands on the close's happens-before, so the
//! later reader sees the epoch's primary changes as if it had loaded S itself. An idle insert
//! stores `S - 1` there (no epoch to wait for). The common fast path then reads only the node's
//! own line: the tag, the membership and `closed_tag`.
//!
//! The membership test (a removed interval is an error) is a relaxed load of the same line as
//! `s_i`. `read_begin` takes no lock, so a stream of invalidations on other ranges no longer
//! bounces the interval lock's line against it.
//!
//! # Skipping the lock
//!
//! A begin whose range touches no occupied bucket skips the lock: no interval of the index or
//! the queue can overlap it. It is still counted in `A`, which is what keeps an interval
//! inserted meanwhile safe (I28). The race is a store-buffering pair:
//!
//! ```text
//!   begin                                  insert (under the lock)
//!   A.fetch_add(1)            SeqCst       occupied.store(with the bucket)  SeqCst
//!                                          fence(SeqCst)
//!   occupied.load()           SeqCst       A.load()                         SeqCst
//! ```
//!
//! In the single total order of `SeqCst` operations one of the two loads comes after the other
//! side's write: either the begin sees the bucket (and collects under the lock, after the
//! insert), or the insert sees `A > 0` and makes S odd with `s_i = S`, so the new interval's
//! `read_begin` waits for the begin's end. A removal takes the interval out of the index before
//! it clears its bucket, so a begin that no longer sees the bucket could not have hit it.
//!
//! # Closing without the lock
//!
//! An end takes the lock only if its decrement made `A == 0` while S is odd. The epoch's opener
//! must not be missed: every epoch must be closed by whoever brings `A` to 0 after it opened.
//!
//! * Opened by a begin with hits: it stored `S` odd before its own decrement, and every later
//!   decrement follows that one in `A`'s modification order, so the one that brings `A` to 0
//!   reads S odd (or already closed).
//! * Opened by an insert that saw `A > 0`: another store-buffering pair, `S` odd, then
//!   `fence(SeqCst)`, then a load of `A`, against the end's `SeqCst` decrement then `SeqCst`
//!   load of S. If the last end missed the odd S, the insert's load sees `A == 0` and the insert
//!   closes the epoch itself.
//! * An end that reaches the lock and finds `A > 0` again (a begin slipped in without the lock)
//!   leaves the close to that begin's end, which by the same argument reads S odd.
//!
//! Whoever closes re-checks `A == 0` and S odd under the lock, so two closers close once. An
//! insert that finds `A == 0` with S odd (a last end on its way to the lock) closes the epoch
//! itself before inserting. A begin that slips in during a close (after its `A == 0` test) is
//! not part of the epoch: it collects under the lock after the close, or skips the lock and
//! overlaps nothing, deferred inserts included (they are in the filter from the moment they
//! are queued).
//!
//! On real targets the `SeqCst` read-modify-write followed by a `SeqCst` load costs no fence
//! (on x86 the locked instruction is one); under loom, which models `SeqCst` accesses as
//! acquire/release only, `loom_sees_seqcst_order` adds the fence the model needs to see the same
//! order. The loom models `loom_lockfree_read_begin_never_commits_stale`,
//! `loom_closed_tag_hands_on_the_close` and `loom_skipped_begin_never_misses_a_concurrent_insert`
//! check these arguments, and fail against copies with the bugs their doc comments describe.
//!
//! # Waking only waiters
//!
//! Waiters (`read_begin` in case 2, `remove` of an interval during an epoch) count themselves in
//! `waiters` under the lock before sleeping; a close reads the count under the same lock and
//! calls `notify_all` only if it is non-zero. std's condition variable makes a `futex` system
//! call on every `notify_all`, waiter or not; without waiters the close now makes none. No
//! wake-up is lost: a waiter tests its condition and registers under the lock, and the close
//! changes S and reads the count under it.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use super::index::{DefaultIndex, IntervalIndex};
use super::{IntervalEntry, IntervalId, IntervalNode, Membership, ReadSeq};
use crate::context;
use crate::error::{BlockingOp, Error, Result};
use crate::range::Range;
use crate::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use crate::sync::{Condvar, Mutex, MutexGuard};

/// How many overlapping intervals one invalidation collects without allocating.
pub(crate) const INLINE_HITS: usize = 8;

/// The intervals one start must call (their entries, cloned under the lock: one reference
/// count per hit, as for a bare node), in index order.
///
/// The first [`INLINE_HITS`] live inline; the rest go to a buffer that each thread keeps
/// between invalidations (taken on the first hit beyond the inline ones, given back, emptied,
/// on drop), so that only a thread's first invalidation with more hits than it ever had
/// allocates. A nested invalidation on the same thread while the buffer is out gets a fresh one.
#[derive(Debug, Default)]
pub(crate) struct Hits {
    inline: SmallVec<[Arc<IntervalEntry>; INLINE_HITS]>,
    more: Vec<Arc<IntervalEntry>>,
}

/// The largest spill buffer a thread keeps between invalidations (entries).
const MAX_SPARE_HITS: usize = 4096;

#[cfg(not(loom))]
std::thread_local! {
    /// The calling thread's spare buffer for [`Hits`] beyond the inline ones. Not part of any
    /// protocol (no other thread sees it), hence std's thread-local even under the shim.
    static SPARE_HITS: std::cell::Cell<Vec<Arc<IntervalEntry>>> =
        const { std::cell::Cell::new(Vec::new()) };
}

impl Hits {
    pub(crate) fn new() -> Self {
        Hits::default()
    }

    fn push(&mut self, entry: Arc<IntervalEntry>) {
        if self.inline.len() < INLINE_HITS {
            self.inline.push(entry);
            return;
        }
        if self.more.capacity() == 0 {
            #[cfg(not(loom))]
            {
                self.more = SPARE_HITS
                    .try_with(std::cell::Cell::take)
                    .unwrap_or_default();
            }
        }
        self.more.push(entry);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.inline.is_empty()
    }

    /// The hits in index order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<IntervalEntry>> {
        self.inline.iter().chain(self.more.iter())
    }
}

impl Drop for Hits {
    fn drop(&mut self) {
        if self.more.capacity() == 0 {
            return;
        }
        // The entries go first (a last reference may run a subscriber's `Drop`, which may
        // invalidate and so use the spare buffer itself).
        self.more.clear();
        let spare = std::mem::take(&mut self.more);
        // A thread keeps a buffer for the common spill, not the largest one it ever needed
        // (an invalidation of a million intervals would otherwise pin megabytes per thread).
        if spare.capacity() > MAX_SPARE_HITS {
            return;
        }
        #[cfg(not(loom))]
        let _ = SPARE_HITS.try_with(move |slot| {
            let kept = slot.take();
            slot.set(if kept.capacity() >= spare.capacity() {
                kept
            } else {
                spare
            });
        });
        #[cfg(loom)]
        drop(spare);
    }
}

/// The occupancy filter's chunk size: addresses `a` and `b` share a bucket when
/// `(a >> CHUNK_SHIFT) % 64 == (b >> CHUNK_SHIFT) % 64` (1 GiB chunks, 64 buckets).
const CHUNK_SHIFT: u32 = 30;

/// The occupancy buckets that the inclusive range `[start, last]` touches, as a bit mask.
fn bucket_mask(start: u64, last: u64) -> u64 {
    let first = start >> CHUNK_SHIFT;
    let extra_chunks = (last >> CHUNK_SHIFT) - first;
    if extra_chunks >= 63 {
        return u64::MAX;
    }
    let run = (1u64 << (extra_chunks + 1)) - 1;
    // The cast keeps the low six bits, which is the bucket of the first chunk.
    run.rotate_left((first % 64) as u32)
}

/// A value alone on its cache line(s): what one thread writes often must not share a line with
/// what other threads only read (128 bytes: adjacent-line prefetching pairs lines).
#[repr(align(128))]
#[derive(Debug)]
struct OwnLine<T>(T);

impl<T> Deref for OwnLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Makes loom see the order that a `SeqCst` read-modify-write gives a later `SeqCst` load of
/// another location. On real targets the two `SeqCst` accesses already take part in the single
/// total order (the C++ model guarantees the store-buffering outcome cannot happen); loom
/// models `SeqCst` accesses as acquire/release only (a documented limitation), so without this
/// fence it would report executions that cannot happen. The fast paths therefore pay for no
/// fence, and loom checks the same protocol.
#[inline(always)]
fn loom_sees_seqcst_order() {
    #[cfg(loom)]
    fence(Ordering::SeqCst);
}

/// Read-mostly flags: written by inserts and removals, read by every invalidation.
#[derive(Debug)]
struct ReadMostly {
    /// Set (under `state`) by the first insert and never cleared (Linux's `has_itree`): from
    /// then on every invalidation counts itself in `active`.
    present: AtomicBool,
    /// Set once the invalidations that began before `present` (and so did not count
    /// themselves) have all ended. Until then every insert must wait for them itself.
    ready: AtomicBool,
    /// Bit `b` is set iff some interval in the index or the insert queue touches bucket `b`
    /// (see [`bucket_mask`]); a copy of `ItreeState::occupied`, stored under the lock.
    occupied: AtomicU64,
}

/// The per-address-space interval state.
#[derive(Debug)]
pub(crate) struct Itree {
    mm_id: u64,
    flags: OwnLine<ReadMostly>,
    /// `S`. Written only under `state`'s lock (Release), read by `read_begin` without it.
    seq: OwnLine<AtomicU64>,
    /// `A`, the invalidations in flight. Changed without the lock by every begin and end.
    active: OwnLine<AtomicUsize>,
    state: OwnLine<Mutex<ItreeState>>,
    closed: Condvar,
}

#[derive(Debug)]
struct ItreeState {
    /// The inserted intervals; the only owner of their subscribers besides `pending_inserts`.
    index: DefaultIndex<Arc<IntervalEntry>>,
    /// Inserts queued during an epoch (`PendingInsert`).
    pending_inserts: Vec<Arc<IntervalEntry>>,
    /// Indexed intervals whose removal is queued during an epoch (`PendingRemove`).
    pending_removes: Vec<Arc<IntervalNode>>,
    /// How many intervals of the index and the insert queue touch each occupancy bucket.
    bucket_counts: [usize; 64],
    /// Bit `b` set iff `bucket_counts[b] > 0`.
    occupied: u64,
    /// Threads sleeping on `closed` (in `read_begin` or `remove`).
    waiters: usize,
}

/// What closing an epoch took out of the state, to be dropped (and the waiters woken) after
/// the lock is released: the last reference to an interval may go with it, and its
/// subscriber's `Drop` is user code that may call back into this `Mm`.
#[must_use = "drop it after releasing the interval lock, and wake the waiters if it says so"]
struct Closed {
    removes: Vec<Arc<IntervalNode>>,
    removed: Vec<Arc<IntervalEntry>>,
    wake: bool,
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
            flags: OwnLine(ReadMostly {
                present: AtomicBool::new(false),
                ready: AtomicBool::new(false),
                occupied: AtomicU64::new(0),
            }),
            seq: OwnLine(AtomicU64::new(initial_seq)),
            active: OwnLine(AtomicUsize::new(0)),
            state: OwnLine(Mutex::new(ItreeState {
                index: DefaultIndex::default(),
                pending_inserts: Vec::new(),
                pending_removes: Vec::new(),
                bucket_counts: [0; 64],
                occupied: 0,
                waiters: 0,
            })),
            closed: Condvar::new(),
        }
    }

    /// Whether any interval was ever inserted. Read inside an SRCU read section by starts; the
    /// first insert sets it and then waits for the read sections that may have missed it.
    pub(crate) fn is_present(&self) -> bool {
        // Acquire: pairs with the Release in `mark_present`.
        self.flags.present.load(Ordering::Acquire)
    }

    /// Makes every invalidation that starts from now on count itself in the interval state.
    pub(crate) fn mark_present(&self) {
        let _state = self.state.lock();
        self.flags.present.store(true, Ordering::Release);
    }

    /// Whether the invalidations that began before the state was present have all ended (an
    /// inserter that saw them end sets it with [`mark_ready`](Self::mark_ready)).
    pub(crate) fn is_ready(&self) -> bool {
        // Acquire: pairs with the Release in `mark_ready`; the inserter's wait happens before.
        self.flags.ready.load(Ordering::Acquire)
    }

    /// Records that no uncounted invalidation is left.
    pub(crate) fn mark_ready(&self) {
        self.flags.ready.store(true, Ordering::Release);
    }

    pub(crate) fn state(&self) -> IntervalState {
        let state = self.state.lock();
        IntervalState {
            // S changes only under the lock we hold.
            seq: self.seq.load(Ordering::Relaxed),
            active: self.active.load(Ordering::SeqCst),
            indexed: state.index.len(),
            deferred: state.pending_inserts.len() + state.pending_removes.len(),
        }
    }

    /// Counts `[start, last]` in the occupancy filter and publishes it. Under the lock.
    fn occupy(&self, state: &mut ItreeState, start: u64, last: u64) {
        let mut mask = bucket_mask(start, last);
        while mask != 0 {
            let bucket = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            state.bucket_counts[bucket] += 1;
            state.occupied |= 1 << bucket;
        }
        // SeqCst: the insert's half of the store-buffering pair with `begin` (module docs).
        self.flags.occupied.store(state.occupied, Ordering::SeqCst);
    }

    /// Takes `[start, last]` out of the occupancy filter. Under the lock, after the interval
    /// left the index (or the queue): a begin that no longer sees it could not have hit it.
    fn vacate(&self, state: &mut ItreeState, start: u64, last: u64) {
        let mut mask = bucket_mask(start, last);
        while mask != 0 {
            let bucket = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            state.bucket_counts[bucket] -= 1;
            if state.bucket_counts[bucket] == 0 {
                state.occupied &= !(1 << bucket);
            }
        }
        self.flags.occupied.store(state.occupied, Ordering::SeqCst);
    }

    /// An invalidation of `range` begins: counts it in flight, and returns the overlapping
    /// intervals with the epoch value to call them with (any value when there is none).
    ///
    /// Takes the interval lock only when the occupancy filter says an interval may overlap.
    pub(crate) fn begin(&self, range: Range, hits: &mut Hits) -> u64 {
        // SeqCst, then the SeqCst filter load: the begin's half of the store-buffering pair
        // with `insert` (module docs, "Skipping the lock").
        self.active.fetch_add(1, Ordering::SeqCst);
        loom_sees_seqcst_order();
        let occupied = self.flags.occupied.load(Ordering::SeqCst);
        if occupied & bucket_mask(range.start(), range.last()) == 0 {
            return self.seq.load(Ordering::Relaxed);
        }
        let state = self.state.lock();
        state
            .index
            .for_each_overlap(range.start(), range.last(), &mut |entry| {
                hits.push(Arc::clone(entry))
            });
        let mut seq = self.seq.load(Ordering::Relaxed);
        if !hits.is_empty() && seq & 1 == 0 {
            seq |= 1;
            // Release: `read_begin` reads S without the lock.
            self.seq.store(seq, Ordering::Release);
        }
        seq
    }

    /// An invalidation ends: the matching decrement of [`begin`](Self::begin). Closes the
    /// epoch when it was the last one in flight; takes the lock only then.
    pub(crate) fn end(&self) {
        // SeqCst, then the SeqCst load of S: the end's half of the store-buffering pair with
        // whoever opened the epoch (module docs, "Closing without the lock").
        let before = self.active.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "interval epoch end without a begin");
        if before != 1 {
            return;
        }
        loom_sees_seqcst_order();
        if self.seq.load(Ordering::SeqCst) & 1 == 0 {
            return;
        }
        let mut state = self.state.lock();
        let closed = self.close_if_idle(&mut state);
        drop(state);
        self.finish_close(closed);
    }

    /// Closes the open epoch if nothing is in flight: S becomes even, the deferred inserts and
    /// removes are applied. Under the lock; the caller passes the result to
    /// [`finish_close`](Self::finish_close) after releasing it.
    fn close_if_idle(&self, state: &mut MutexGuard<'_, ItreeState>) -> Option<Closed> {
        let seq = self.seq.load(Ordering::Relaxed);
        if seq & 1 == 0 || self.active.load(Ordering::SeqCst) != 0 {
            return None;
        }
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
            if entry.is_some() {
                self.vacate(state, node.start(), node.last());
            }
            removed.extend(entry);
            node.set_membership(Membership::Removed);
        }
        // Wrapping: the sequence is compared only for equality and parity, and
        // `MmBuilder::initial_interval_seq` lets tests start it just below the wrap.
        // Release: a `read_begin` that sees the epoch closed sees every change made in it.
        self.seq.store(seq.wrapping_add(1), Ordering::Release);
        Some(Closed {
            removes,
            removed,
            wake: state.waiters > 0,
        })
    }

    /// Wakes the waiters of a closed epoch (only if there are any: a wake-up is a system call)
    /// and drops what the close took out. Without the lock.
    fn finish_close(&self, closed: Option<Closed>) {
        if let Some(closed) = closed {
            if closed.wake {
                self.closed.notify_all();
            }
            drop(closed.removes);
            drop(closed.removed);
        }
    }

    /// Adds an interval (the caller already made the state present). The entry is the
    /// engine's reference to the subscriber, owned by the state from now on.
    pub(crate) fn insert(&self, entry: Arc<IntervalEntry>) {
        let node = Arc::clone(&entry.node);
        let (start, last) = (node.start(), node.last());
        let mut state = self.state.lock();
        self.occupy(&mut state, start, last);
        // The insert's half of the store-buffering pair with `begin`: a begin whose filter load
        // missed the new bucket counted itself in `active` before this load (module docs).
        fence(Ordering::SeqCst);
        let mut closed = None;
        let in_flight = self.active.load(Ordering::SeqCst) > 0;
        if !in_flight {
            // An epoch whose last end has not taken the lock yet: close it here.
            closed = self.close_if_idle(&mut state);
        }
        let seq = self.seq.load(Ordering::Relaxed);
        if seq & 1 == 1 {
            node.set_membership(Membership::PendingInsert);
            state.pending_inserts.push(entry);
            node.seq.store(seq, Ordering::Relaxed);
        } else if in_flight {
            let seq = seq | 1;
            // Release: `read_begin` reads S without the lock.
            self.seq.store(seq, Ordering::Release);
            state.index.insert(start, last, entry);
            node.set_membership(Membership::InTree);
            node.seq.store(seq, Ordering::Relaxed);
            // This epoch's opener is the insert, not a begin: if every range in flight ended
            // before seeing S odd, nobody else will close it (module docs).
            fence(Ordering::SeqCst);
            closed = self.close_if_idle(&mut state);
        } else {
            state.index.insert(start, last, entry);
            node.set_membership(Membership::InTree);
            node.seq.store(seq.wrapping_sub(1), Ordering::Relaxed);
            // `S - 1` is no open epoch's value (S is even, nothing in flight): nothing to wait
            // for, and the handle is published only after this insert returns.
            node.closed_tag
                .store(seq.wrapping_sub(1), Ordering::Relaxed);
        }
        drop(state);
        self.finish_close(closed);
    }

    /// Removes an interval now if no epoch is open, else queues the removal. Returns whether
    /// the caller must wait for the epoch to close.
    pub(crate) fn remove_deferred(&self, node: &Arc<IntervalNode>) -> Result<bool> {
        // Entries taken out of the index or the queue are dropped after the lock is released
        // (see `Closed`).
        let mut taken = None;
        let mut state = self.state.lock();
        let epoch_open = self.seq.load(Ordering::Relaxed) & 1 == 1;
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
                    self.vacate(&mut state, node.start(), node.last());
                }
                node.set_membership(Membership::Removed);
                Ok(false)
            }
            Membership::InTree if epoch_open => {
                node.set_membership(Membership::PendingRemove);
                state.pending_removes.push(Arc::clone(node));
                Ok(true)
            }
            Membership::InTree => {
                taken = state.index.remove(node.start(), node.last(), &mut |e| {
                    Arc::ptr_eq(&e.node, node)
                });
                debug_assert!(taken.is_some());
                if taken.is_some() {
                    self.vacate(&mut state, node.start(), node.last());
                }
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
        state.bucket_counts = [0; 64];
        state.occupied = 0;
        self.flags.occupied.store(0, Ordering::SeqCst);
        let wake = state.waiters > 0;
        drop(state);
        // Waiters in `remove` or `read_begin` see the intervals removed.
        if wake {
            self.closed.notify_all();
        }
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
            state.waiters += 1;
            state = self.closed.wait(state);
            state.waiters -= 1;
        }
        Ok(())
    }

    /// `read_begin` and `read_begin_timeout`: two Acquire loads when no open epoch has tagged
    /// the interval, the lock only when one has (module docs, "read_begin without the lock").
    pub(crate) fn read_begin(
        &self,
        node: &Arc<IntervalNode>,
        deadline: Option<Instant>,
    ) -> Result<ReadSeq> {
        // Acquire: pairs with the Release in `set_seq`, so the load of S below returns the
        // epoch that wrote this tag or a later value.
        let seq = node.seq.load(Ordering::Acquire);
        if node.membership() == Membership::Removed {
            return Err(Error::IntervalNotInserted { id: node.id });
        }
        // Acquire: pairs with the Release below, made by a thread that saw the close.
        if node.closed_tag.load(Ordering::Acquire) == seq {
            return Ok(ReadSeq(seq));
        }
        // Acquire: pairs with the Release of a close, so an epoch seen closed has finished
        // changing the primary before the mirror reads it.
        let now = self.seq.load(Ordering::Acquire);
        if seq != now {
            // Release: hands the close on to the next `read_begin` of this tag.
            node.closed_tag.store(seq, Ordering::Release);
            return Ok(ReadSeq(seq));
        }
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
        // S changes only under the lock we hold.
        while self.seq.load(Ordering::Relaxed) == seq {
            if node.membership() == Membership::Removed {
                // The address space was dropped while the epoch was open (a leaked epoch).
                return Err(Error::IntervalNotInserted { id });
            }
            state.waiters += 1;
            match deadline {
                None => state = self.closed.wait(state),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        state.waiters -= 1;
                        return Err(Error::ReadBeginTimeout {
                            id,
                            waited: now - began,
                        });
                    }
                    state = self.closed.wait_timeout(state, deadline - now);
                }
            }
            state.waiters -= 1;
        }
        // The close happened before this (the lock orders it); Release as in the fast path.
        node.closed_tag.store(seq, Ordering::Release);
        Ok(ReadSeq(seq))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{bucket_mask, CHUNK_SHIFT};

    /// The occupancy filter never misses an overlap (a begin that skips the lock could
    /// otherwise miss an interval): whenever two inclusive ranges share an address, their
    /// bucket masks share a bit. Checked on ranges of every scale, including both ends of the
    /// address space, single addresses, and ranges of 63, 64 and 65 chunks. Shown to fail
    /// against a copy that shifts the run of bits instead of rotating it (run once).
    #[test]
    fn overlapping_ranges_share_a_bucket() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let chunk = 1u64 << CHUNK_SHIFT;
        let mut ranges = vec![
            (0, 0),
            (u64::MAX, u64::MAX),
            (0, u64::MAX),
            (0, 63 * chunk - 1),
            (0, 64 * chunk - 1),
            (0, 65 * chunk - 1),
            (5 * chunk - 1, 5 * chunk),
            (u64::MAX - chunk, u64::MAX),
        ];
        for _ in 0..4000 {
            let start = next() >> (next() % 64);
            let len = next() >> (next() % 64);
            ranges.push((start, start.saturating_add(len)));
        }
        let mut checked = 0;
        for (i, &(s1, l1)) in ranges.iter().enumerate() {
            for &(s2, l2) in &ranges[i..] {
                if s1 <= l2 && s2 <= l1 {
                    checked += 1;
                    assert_ne!(
                        bucket_mask(s1, l1) & bucket_mask(s2, l2),
                        0,
                        "[{s1:#x}, {l1:#x}] and [{s2:#x}, {l2:#x}] overlap in no bucket"
                    );
                }
            }
        }
        assert!(checked > 4000, "too few overlapping pairs ({checked})");
        // And the filter does separate: ranges in different chunks (mod 64) share no bucket.
        assert_eq!(
            bucket_mask(0, 0x1fff) & bucket_mask(40 * chunk, 40 * chunk),
            0
        );
    }
}
