//! The event log: what every subscriber received, with a timestamp, for traces.
//!
//! The [`SimMm`](crate::SimMm) registers every subscriber through a recording wrapper
//! ([`RecordingSubscriber`], [`RecordingInterval`]) that appends one [`TraceEvent`] per
//! callback to the address space's [`TraceLog`] and keeps its own counters (which survive
//! `Mm::release`, unlike the engine's per-registration statistics). Timestamps are microseconds
//! of wall-clock time since the log was created, monotonic, so that a Chrome trace-event file
//! can be written from the list as is: a `Start` opens a slice that the matching `End` closes.

use std::sync::Arc;
use std::time::Instant;

use mmnotify::{
    Capabilities, Event, IntervalCtx, IntervalSubscriber, Invalidate, Invalidation, Range, Refused,
    Subscriber,
};

use crate::sync::Mutex;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TraceKind {
    /// A classic `invalidate_range_start` succeeded.
    Start,
    /// A classic `invalidate_range_end` was delivered.
    End,
    /// A start (classic) or an interval callback refused a non-blockable range.
    Refused,
    /// An interval callback ran and did its work.
    IntervalInvalidate,
    /// A classic `release` was delivered.
    Release,
    /// A secondary-TLB flush (`arch_invalidate_secondary_tlbs`) was delivered.
    SecondaryTlb,
    /// The simulated primary began an operation (the subscriber field names it).
    Operation,
}

/// One logged event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// Microseconds since the log was created.
    pub ts_us: u64,
    /// The subscriber's name (for [`TraceKind::Operation`], the operation's name).
    pub subscriber: String,
    /// What happened.
    pub kind: TraceKind,
    /// The range concerned ([`Range::ALL`] for a release).
    pub range: Range,
    /// The event of the invalidation, where there is one.
    pub event: Option<Event>,
    /// Whether the invalidation was blockable (false also where it does not apply).
    pub blockable: bool,
}

/// An append-only, timestamped event log shared by an address space and its subscribers.
#[derive(Debug)]
pub struct TraceLog {
    origin: Instant,
    events: Mutex<Vec<TraceEvent>>,
}

impl Default for TraceLog {
    fn default() -> Self {
        TraceLog::new()
    }
}

impl TraceLog {
    /// An empty log whose time origin is now.
    pub fn new() -> Self {
        TraceLog {
            origin: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    /// Microseconds since the log was created.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Appends an event stamped now.
    pub fn record(
        &self,
        subscriber: &str,
        kind: TraceKind,
        range: Range,
        inv: Option<&Invalidation>,
    ) {
        let ts_us = self.now_us();
        self.push(TraceEvent {
            ts_us,
            subscriber: subscriber.to_owned(),
            kind,
            range,
            event: inv.map(Invalidation::event),
            blockable: inv.is_some_and(Invalidation::is_blockable),
        });
    }

    fn push(&self, event: TraceEvent) {
        self.events.lock().push(event);
    }

    /// A copy of every event so far, in the order they were appended.
    pub fn events(&self) -> Vec<TraceEvent> {
        self.events.lock().clone()
    }
}

/// Counters a recording wrapper keeps for its subscriber.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RecordedCounts {
    /// Successful starts.
    pub starts: u64,
    /// Refused starts.
    pub refusals: u64,
    /// Ends.
    pub ends: u64,
    /// Releases.
    pub releases: u64,
    /// Interval callbacks that did their work.
    pub interval_invalidations: u64,
    /// Interval callbacks that refused.
    pub interval_refusals: u64,
}

/// A shared handle to the counters of a recording wrapper.
#[derive(Clone, Debug, Default)]
pub struct CountsHandle(Arc<Mutex<RecordedCounts>>);

impl CountsHandle {
    /// The counters now.
    pub fn get(&self) -> RecordedCounts {
        *self.0.lock()
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, RecordedCounts> {
        self.0.lock()
    }
}

/// A classic subscriber wrapped so that each callback is logged and counted.
pub struct RecordingSubscriber {
    name: String,
    inner: Arc<dyn Subscriber>,
    log: Arc<TraceLog>,
    counts: CountsHandle,
}

impl RecordingSubscriber {
    /// Wraps `inner` under `name`, logging to `log`.
    pub fn new(name: &str, inner: Arc<dyn Subscriber>, log: Arc<TraceLog>) -> Self {
        RecordingSubscriber {
            name: name.to_owned(),
            inner,
            log,
            counts: CountsHandle::default(),
        }
    }

    /// The wrapper's counters.
    pub fn counts(&self) -> CountsHandle {
        self.counts.clone()
    }
}

impl std::fmt::Debug for RecordingSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingSubscriber")
            .field("name", &self.name)
            .field("counts", &self.counts.get())
            .finish_non_exhaustive()
    }
}

impl Subscriber for RecordingSubscriber {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn release(&self) {
        self.inner.release();
        self.counts.lock().releases += 1;
        self.log
            .record(&self.name, TraceKind::Release, Range::ALL, None);
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        let result = self.inner.invalidate_range_start(inv);
        let kind = match result {
            Ok(()) => {
                self.counts.lock().starts += 1;
                TraceKind::Start
            }
            Err(Refused) => {
                self.counts.lock().refusals += 1;
                TraceKind::Refused
            }
        };
        self.log.record(&self.name, kind, inv.range(), Some(inv));
        result
    }

    fn invalidate_range_end(&self, inv: &Invalidation) {
        self.inner.invalidate_range_end(inv);
        self.counts.lock().ends += 1;
        self.log
            .record(&self.name, TraceKind::End, inv.range(), Some(inv));
    }

    fn clear_flush_young(&self, range: Range) -> bool {
        self.inner.clear_flush_young(range)
    }

    fn clear_young(&self, range: Range) -> bool {
        self.inner.clear_young(range)
    }

    fn test_young(&self, addr: u64) -> bool {
        self.inner.test_young(addr)
    }

    fn arch_invalidate_secondary_tlbs(&self, range: Range) {
        self.inner.arch_invalidate_secondary_tlbs(range);
        self.log
            .record(&self.name, TraceKind::SecondaryTlb, range, None);
    }

    fn free(&self) {
        self.inner.free();
    }
}

/// An interval subscriber wrapped so that each callback is logged and counted.
pub struct RecordingInterval {
    name: String,
    inner: Arc<dyn IntervalSubscriber>,
    log: Arc<TraceLog>,
    counts: CountsHandle,
}

impl std::fmt::Debug for RecordingInterval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingInterval")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RecordingInterval {
    /// Wraps `inner` under `name`, logging to `log`.
    pub fn new(name: &str, inner: Arc<dyn IntervalSubscriber>, log: Arc<TraceLog>) -> Self {
        RecordingInterval {
            name: name.to_owned(),
            inner,
            log,
            counts: CountsHandle::default(),
        }
    }

    /// The wrapper's counters.
    pub fn counts(&self) -> CountsHandle {
        self.counts.clone()
    }
}

impl IntervalSubscriber for RecordingInterval {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        let outcome = self.inner.invalidate(ctx, inv);
        let kind = if outcome == Invalidate::Refused {
            self.counts.lock().interval_refusals += 1;
            TraceKind::Refused
        } else {
            self.counts.lock().interval_invalidations += 1;
            TraceKind::IntervalInvalidate
        };
        self.log.record(&self.name, kind, inv.range(), Some(inv));
        outcome
    }

    fn invalidate_finish(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) {
        self.inner.invalidate_finish(ctx, inv);
    }
}
