//! The yardsticks: what a quick implementation would do.
//!
//! None of this is a strawman tuned to lose, nor a competitor: it is the code one would write
//! in an afternoon without the engine's guarantees (exact pairing under refusal, removal that
//! waits for owed ends, deadlock checks, the interval epoch protocol, panic safety). Every
//! engine figure is reported as a ratio to the matching yardstick measured in the same run, so
//! the ratio says what those guarantees cost on this machine, today.
//!
//! * [`atomic_load_floor`]: one `AtomicU64` load through `black_box`, the least an
//!   invalidation with no subscriber could cost (someone must look whether anybody listens).
//! * [`NaiveDispatcher`]: a `RwLock<Vec<Arc<dyn NaiveSubscriber>>>`; `start` read-locks and
//!   calls every subscriber's start, `end` read-locks again and calls every end. It pairs
//!   nothing: a subscriber registered between the two gets an end without a start.
//! * [`NaiveIntervals`]: a `RwLock<Vec<(start, last, subscriber)>>` scanned in full on every
//!   invalidation; no sequence protocol, no epoch.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use mmnotify::Range;

/// One `AtomicU64` load that the optimiser cannot remove: the floor for an invalidation with
/// no subscriber.
#[inline]
pub fn atomic_load_floor(word: &AtomicU64) -> u64 {
    black_box(black_box(word).load(Ordering::Acquire))
}

/// A classic subscriber of the naive dispatcher.
pub trait NaiveSubscriber: Send + Sync {
    /// Before `range` changes.
    fn start(&self, range: Range);
    /// After `range` changed.
    fn end(&self, range: Range);
}

/// A subscriber whose callbacks do nothing (the counterpart of
/// [`NoopSubscriber`](crate::fixtures::NoopSubscriber)).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopNaive;

impl NaiveSubscriber for NoopNaive {
    fn start(&self, range: Range) {
        black_box(range);
    }
    fn end(&self, range: Range) {
        black_box(range);
    }
}

/// The quick dispatcher: a read-write-locked vector of trait objects.
#[derive(Default)]
pub struct NaiveDispatcher {
    subs: RwLock<Vec<(u64, Arc<dyn NaiveSubscriber>)>>,
    next: AtomicU64,
}

impl std::fmt::Debug for NaiveDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NaiveDispatcher")
            .field("subscribers", &self.len())
            .finish()
    }
}

impl NaiveDispatcher {
    /// A dispatcher with `n` [`NoopNaive`] subscribers.
    pub fn with_noops(n: usize) -> Self {
        let d = NaiveDispatcher::default();
        for _ in 0..n {
            d.register(Arc::new(NoopNaive));
        }
        d
    }

    /// Adds a subscriber; returns its id.
    pub fn register(&self, sub: Arc<dyn NaiveSubscriber>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.subs.write().unwrap().push((id, sub));
        id
    }

    /// Removes a subscriber; returns whether it was there.
    pub fn unregister(&self, id: u64) -> bool {
        let mut subs = self.subs.write().unwrap();
        let before = subs.len();
        subs.retain(|(i, _)| *i != id);
        subs.len() != before
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.subs.read().unwrap().len()
    }

    /// Whether nobody subscribes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls every subscriber's start.
    pub fn start(&self, range: Range) {
        for (_, s) in self.subs.read().unwrap().iter() {
            s.start(range);
        }
    }

    /// Calls every subscriber's end.
    pub fn end(&self, range: Range) {
        for (_, s) in self.subs.read().unwrap().iter() {
            s.end(range);
        }
    }
}

/// An interval subscriber of the naive list.
pub trait NaiveInterval: Send + Sync {
    /// An invalidation overlaps the interval.
    fn invalidate(&self, range: Range);
}

/// An interval callback that does nothing (the counterpart of
/// [`NoopInterval`](crate::fixtures::NoopInterval)).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopNaiveInterval;

impl NaiveInterval for NoopNaiveInterval {
    fn invalidate(&self, range: Range) {
        black_box(range);
    }
}

/// One entry of the naive list: inclusive bounds, id, callback.
type Entry = (u64, u64, u64, Arc<dyn NaiveInterval>);

/// The quick interval list: a vector of `(start, last)` scanned in full per invalidation.
#[derive(Default)]
pub struct NaiveIntervals {
    list: RwLock<Vec<Entry>>,
    next: AtomicU64,
}

impl std::fmt::Debug for NaiveIntervals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NaiveIntervals")
            .field("intervals", &self.len())
            .finish()
    }
}

impl NaiveIntervals {
    /// Adds `[start, last]`; returns its id.
    pub fn insert(&self, start: u64, last: u64, sub: Arc<dyn NaiveInterval>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.list.write().unwrap().push((start, last, id, sub));
        id
    }

    /// Removes an interval by id; returns whether it was there.
    pub fn remove(&self, id: u64) -> bool {
        let mut list = self.list.write().unwrap();
        match list.iter().position(|e| e.2 == id) {
            Some(i) => {
                list.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Number of intervals.
    pub fn len(&self) -> usize {
        self.list.read().unwrap().len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls every interval that overlaps `range`; returns how many.
    pub fn invalidate(&self, range: Range) -> usize {
        let (qs, ql) = (range.start(), range.last());
        let mut hits = 0;
        for (start, last, _, sub) in self.list.read().unwrap().iter() {
            if *start <= ql && *last >= qs {
                sub.invalidate(range);
                hits += 1;
            }
        }
        hits
    }
}

/// The building blocks the engine's fast path is made of, timed one by one so that the
/// engine's figures can be explained as a sum of them (docs/PERFORMANCE.md, "Why").
#[derive(Debug, Default)]
pub struct Primitives {
    counter: AtomicU64,
    mutex: std::sync::Mutex<u64>,
    rwlock: RwLock<u64>,
    condvar: std::sync::Condvar,
    arc: Arc<u64>,
}

impl Primitives {
    /// One uncontended `fetch_add` (a locked read-modify-write on x86).
    #[inline]
    pub fn rmw(&self) {
        black_box(black_box(&self.counter).fetch_add(1, Ordering::Relaxed));
    }

    /// One `fence(SeqCst)` (a full barrier).
    #[inline]
    pub fn fence(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        black_box(&self.counter);
    }

    /// An uncontended `Mutex` lock and unlock.
    #[inline]
    pub fn mutex_pair(&self) {
        black_box(*black_box(&self.mutex).lock().unwrap());
    }

    /// An uncontended `RwLock` read lock and unlock.
    #[inline]
    pub fn rwlock_read_pair(&self) {
        black_box(*black_box(&self.rwlock).read().unwrap());
    }

    /// An `Arc` clone and drop (two locked read-modify-writes on the count).
    #[inline]
    pub fn arc_clone_drop(&self) {
        drop(black_box(Arc::clone(black_box(&self.arc))));
    }

    /// `Condvar::notify_all` with nobody waiting (std's futex condvar still makes a
    /// `FUTEX_WAKE` system call).
    #[inline]
    pub fn notify_all_nobody_waits(&self) {
        black_box(&self.condvar).notify_all();
    }
}
