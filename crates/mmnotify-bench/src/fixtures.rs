//! What is measured: no-op subscribers, prepared address spaces, query ranges, and one
//! function per measured operation (the *bodies*), used unchanged by criterion and the CLI.
//!
//! # Interval layout
//!
//! Interval `i` covers `[i * STRIDE, i * STRIDE + LEN - 1]` with [`STRIDE`] `= 0x2000` and
//! [`LEN`] `= 0x1000`: disjoint, sorted, with a gap after each. A query that hits `k >= 1`
//! intervals covers exactly intervals `b..b+k`; a query that hits none lies in the gap after
//! interval `b`. The positions `b` are pseudo-random (fixed seed) and cycled through, so that
//! a large index is walked along different paths instead of one hot path that stays in cache.

use std::hint::black_box;
use std::sync::Arc;

use mmnotify::{
    Capabilities, Event, IntervalCtx, IntervalHandle, IntervalSubscriber, Invalidate, Invalidation,
    Mm, Range, Refused, Subscriber, SubscriberId,
};

use crate::baseline::{NaiveDispatcher, NaiveIntervals, NoopNaive, NoopNaiveInterval};

/// Distance between the starts of two neighbouring intervals.
pub const STRIDE: u64 = 0x2000;
/// Length of every interval.
pub const LEN: u64 = 0x1000;
/// How many distinct query positions are cycled through.
pub const QUERY_POSITIONS: usize = 256;

/// A classic subscriber that declares start and end and does nothing in them.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopSubscriber;

impl Subscriber for NoopSubscriber {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }
    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        black_box(inv);
        Ok(())
    }
    fn invalidate_range_end(&self, inv: &Invalidation) {
        black_box(inv);
    }
}

/// An interval subscriber that does what the contract asks and nothing else: `set_seq`, done.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopInterval;

impl IntervalSubscriber for NoopInterval {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        black_box(inv);
        ctx.set_seq();
        Invalidate::Done
    }
}

/// The range every single-range benchmark invalidates.
pub fn fixed_range() -> Range {
    Range::from_len(0x1000, 0x1000).expect("a valid constant range")
}

/// **Body (a)**: one blockable start and its end.
#[inline]
pub fn start_end(mm: &Mm, range: Range) {
    mm.invalidate_start(range, Event::Unmap)
        .expect("a blockable start from a plain thread cannot fail")
        .end();
}

/// **Baseline body (a)**: the naive dispatcher's start and end.
#[inline]
pub fn naive_start_end(d: &NaiveDispatcher, range: Range) {
    d.start(range);
    d.end(range);
}

/// An address space with `n` [`NoopSubscriber`]s and the naive dispatcher with `n` no-ops.
#[derive(Debug)]
pub struct ClassicFixture {
    /// The engine's address space.
    pub mm: Mm,
    /// The registered ids, in order.
    pub ids: Vec<SubscriberId>,
    /// The baseline with as many subscribers.
    pub naive: NaiveDispatcher,
}

impl ClassicFixture {
    /// Registers `n` no-op subscribers on a fresh `Mm` (and on a fresh naive dispatcher).
    pub fn new(n: usize) -> Self {
        Self::with_mm(Mm::new(), n)
    }

    /// The same on an `Mm` whose read side uses the fallback fences (a `SeqCst` fence on each
    /// side, as on a system without `membarrier`).
    pub fn with_fallback_fences(n: usize) -> Self {
        Self::with_mm(Mm::builder().symmetric_fences(true).build(), n)
    }

    fn with_mm(mm: Mm, n: usize) -> Self {
        let ids = (0..n)
            .map(|_| mm.register(Arc::new(NoopSubscriber)).expect("register"))
            .collect();
        ClassicFixture {
            mm,
            ids,
            naive: NaiveDispatcher::with_noops(n),
        }
    }
}

/// Bounds of interval `i` in the standard layout, inclusive.
pub const fn interval_bounds(i: u64) -> (u64, u64) {
    (i * STRIDE, i * STRIDE + LEN - 1)
}

/// A small deterministic generator (xorshift64*), so that runs are reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator with a fixed, non-zero seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..bound` (`bound > 0`).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// [`QUERY_POSITIONS`] ranges that each hit exactly `hits` of the `n` standard intervals
/// (`hits <= n`).
pub fn queries(n: u64, hits: u64) -> Vec<Range> {
    assert!(hits <= n && n > 0, "cannot hit {hits} of {n} intervals");
    let mut rng = Rng::new(0x6d6d_6e6f_7469_6679 ^ (n << 8) ^ hits);
    (0..QUERY_POSITIONS)
        .map(|_| {
            if hits == 0 {
                let b = rng.below(n);
                let (_, last) = interval_bounds(b);
                Range::new(last + 1, b * STRIDE + STRIDE).expect("the gap after an interval")
            } else {
                let b = rng.below(n - hits + 1);
                let (start, _) = interval_bounds(b);
                let (_, last) = interval_bounds(b + hits - 1);
                Range::new(start, last + 1).expect("a span of intervals")
            }
        })
        .collect()
}

/// A cursor over a list of ranges, for bodies that take the next query each call.
#[derive(Debug, Clone)]
pub struct Cycle {
    ranges: Vec<Range>,
    next: usize,
}

impl Cycle {
    /// Cycles through `ranges` (non-empty).
    pub fn new(ranges: Vec<Range>) -> Self {
        assert!(!ranges.is_empty());
        Cycle { ranges, next: 0 }
    }

    /// The next range.
    #[inline]
    pub fn next_range(&mut self) -> Range {
        let r = self.ranges[self.next];
        self.next = (self.next + 1) % self.ranges.len();
        r
    }
}

/// `n` standard intervals on one `Mm` (with [`NoopInterval`] callbacks) and in a naive list.
///
/// Building a million takes seconds: build once per size and reuse it for every hit count.
#[derive(Debug)]
pub struct IntervalFixture {
    /// The engine's address space holding the intervals.
    pub mm: Mm,
    /// Handles of the inserted intervals, in layout order.
    pub handles: Vec<IntervalHandle>,
    /// The baseline holding the same bounds.
    pub naive: NaiveIntervals,
    /// The number of intervals.
    pub n: u64,
}

impl IntervalFixture {
    /// Inserts `n` standard intervals into a fresh `Mm` and a fresh naive list.
    pub fn build(n: u64) -> Self {
        let mm = Mm::new();
        let naive = NaiveIntervals::default();
        let sub: Arc<dyn IntervalSubscriber> = Arc::new(NoopInterval);
        let naive_sub = Arc::new(NoopNaiveInterval);
        let mut handles = Vec::with_capacity(n as usize);
        for i in 0..n {
            let (start, last) = interval_bounds(i);
            handles.push(
                mm.insert_interval(
                    Range::from_len(start, LEN).expect("range"),
                    Arc::clone(&sub),
                )
                .expect("insert_interval"),
            );
            naive.insert(start, last, naive_sub.clone());
        }
        IntervalFixture {
            mm,
            handles,
            naive,
            n,
        }
    }

    /// The query cycle for `hits`, checked on its first few ranges against the naive list
    /// (which scans every interval, so it is the reference for the hit count).
    pub fn cycle(&self, hits: u64) -> Cycle {
        let ranges = queries(self.n, hits);
        for r in ranges.iter().take(4) {
            assert_eq!(self.naive.invalidate(*r) as u64, hits, "query {r:?}");
        }
        Cycle::new(ranges)
    }

    /// A "cycle" of one range hitting `hits` intervals, invalidated again and again: the walk
    /// stays in cache, so its cost shows the index's structure without the memory latency that
    /// random positions in a large index add.
    pub fn hot_cycle(&self, hits: u64) -> Cycle {
        let mut c = self.cycle(hits);
        Cycle::new(vec![c.next_range()])
    }
}

/// **Body (b)**: one invalidation (start and end) of the next query range.
#[inline]
pub fn invalidate_next(mm: &Mm, cycle: &mut Cycle) {
    start_end(mm, cycle.next_range());
}

/// **Baseline body (b)**: one scan of the naive list for the next query range.
#[inline]
pub fn naive_invalidate_next(list: &NaiveIntervals, cycle: &mut Cycle) {
    black_box(list.invalidate(cycle.next_range()));
}

/// One interval for the read-side benchmarks, and the ranges a concurrent invalidation stream
/// uses: one that does not overlap it and one that does.
#[derive(Debug)]
pub struct ReadFixture {
    /// The address space.
    pub mm: Mm,
    /// The interval the reader works on.
    pub handle: IntervalHandle,
    /// A range that does not overlap the interval (another interval lives there, so a stream
    /// on it opens real epochs, as in a process with several mirrors).
    pub disjoint: Range,
    /// A range that overlaps the interval.
    pub overlapping: Range,
}

impl ReadFixture {
    /// Two intervals far apart; the reader's is the first.
    pub fn new() -> Self {
        let mm = Mm::new();
        let handle = mm
            .insert_interval(
                Range::from_len(0x10_0000, LEN).expect("range"),
                Arc::new(NoopInterval),
            )
            .expect("insert_interval");
        let _other = mm
            .insert_interval(
                Range::from_len(0x4000_0000, LEN).expect("range"),
                Arc::new(NoopInterval),
            )
            .expect("insert_interval");
        ReadFixture {
            mm,
            handle,
            disjoint: Range::from_len(0x4000_0000, LEN).expect("range"),
            overlapping: Range::from_len(0x10_0000, LEN).expect("range"),
        }
    }
}

impl Default for ReadFixture {
    fn default() -> Self {
        Self::new()
    }
}

/// **Body (c)**: `read_begin` then `read_retry`; returns whether a retry was needed.
#[inline]
pub fn read_pair(handle: &IntervalHandle) -> bool {
    let seq = handle.read_begin().expect("read_begin from a plain thread");
    black_box(handle.read_retry(seq))
}

/// **Body (d)**: register a classic subscriber and unregister it.
#[inline]
pub fn register_unregister(mm: &Mm) {
    let id = mm.register(Arc::new(NoopSubscriber)).expect("register");
    mm.unregister(id).expect("unregister");
}

/// **Baseline body (d)**: the naive dispatcher's register and unregister.
#[inline]
pub fn naive_register_unregister(d: &NaiveDispatcher) {
    let id = d.register(Arc::new(NoopNaive));
    black_box(d.unregister(id));
}

/// **Body (d)**: insert an interval in the gap after standard interval `i` and remove it.
#[inline]
pub fn insert_remove(mm: &Mm, i: u64) {
    let (_, last) = interval_bounds(i);
    let h = mm
        .insert_interval(
            Range::from_len(last + 1, LEN).expect("range"),
            Arc::new(NoopInterval),
        )
        .expect("insert_interval");
    mm.remove_interval(&h).expect("remove_interval");
}

/// **Baseline body (d)**: the naive list's insert and remove.
#[inline]
pub fn naive_insert_remove(list: &NaiveIntervals, i: u64) {
    let (_, last) = interval_bounds(i);
    let id = list.insert(last + 1, last + LEN, Arc::new(NoopNaiveInterval));
    black_box(list.remove(id));
}

/// One `Mm` with one [`NoopSubscriber`] and one naive dispatcher with one no-op, for the
/// scaling figure (e): thread `t` invalidates [`ScalingFixture::range`]`(t)`, and the ranges of
/// different threads are disjoint.
#[derive(Debug)]
pub struct ScalingFixture {
    /// The shared address space.
    pub mm: Mm,
    /// The shared baseline dispatcher.
    pub naive: NaiveDispatcher,
}

impl ScalingFixture {
    /// The fixture.
    pub fn new() -> Self {
        let c = ClassicFixture::new(1);
        ScalingFixture {
            mm: c.mm,
            naive: c.naive,
        }
    }

    /// Thread `t`'s range: one page, 1 GiB apart from the next thread's.
    pub fn range(t: usize) -> Range {
        Range::from_len((t as u64 + 1) << 30, 0x1000).expect("range")
    }
}

impl Default for ScalingFixture {
    fn default() -> Self {
        Self::new()
    }
}
