//! Shared test helpers: subscribers that record what they receive.
#![allow(dead_code, unreachable_pub, missing_docs)]
// Tests may use std::sync directly (the workspace ban is for crate sources).
#![allow(clippy::disallowed_types)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use mmnotify::{
    Capabilities, Event, IntervalCtx, IntervalSubscriber, Invalidate, Invalidation, Range, Refused,
    Subscriber,
};

/// One callback a recorder received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Start(Invalidation),
    End(Invalidation),
    Release,
    Young(Range),
}

/// A classic subscriber with start and end that records every callback; `young_vpns` are
/// reported young by `clear_flush_young` (and cleared).
#[derive(Default)]
pub struct Recorder {
    pub calls: Mutex<Vec<Call>>,
    pub young_vpns: Mutex<HashSet<u64>>,
    pub refuse_nonblocking: bool,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Recorder::default())
    }

    pub fn refusing() -> Arc<Self> {
        Arc::new(Recorder {
            refuse_nonblocking: true,
            ..Recorder::default()
        })
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.calls.lock().unwrap().clear();
    }

    /// `(event, range, blockable)` of every start, in order.
    pub fn starts(&self) -> Vec<(Event, Range, bool)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Start(i) => Some((i.event(), i.range(), i.is_blockable())),
                _ => None,
            })
            .collect()
    }

    pub fn ends(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| matches!(c, Call::End(_)))
            .count()
    }

    pub fn young_calls(&self) -> Vec<Range> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Young(r) => Some(r),
                _ => None,
            })
            .collect()
    }
}

impl Subscriber for Recorder {
    fn capabilities(&self) -> Capabilities {
        let caps = Capabilities::new().with_start().with_end();
        if self.refuse_nonblocking {
            caps.may_refuse()
        } else {
            caps
        }
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        if self.refuse_nonblocking && !inv.is_blockable() {
            return Err(Refused);
        }
        self.calls.lock().unwrap().push(Call::Start(*inv));
        Ok(())
    }

    fn invalidate_range_end(&self, inv: &Invalidation) {
        self.calls.lock().unwrap().push(Call::End(*inv));
    }

    fn release(&self) {
        self.calls.lock().unwrap().push(Call::Release);
    }

    fn clear_flush_young(&self, range: Range) -> bool {
        self.calls.lock().unwrap().push(Call::Young(range));
        let vpn = range.start() >> 12;
        self.young_vpns.lock().unwrap().remove(&vpn)
    }
}

/// A classic subscriber with only a start that refuses every non-blockable range (like
/// nouveau and i915).
#[derive(Default)]
pub struct Refuser;

impl Subscriber for Refuser {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().may_refuse()
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        if inv.is_blockable() {
            Ok(())
        } else {
            Err(Refused)
        }
    }
}

/// An interval subscriber that records `(event, range)` of every callback.
#[derive(Default)]
pub struct IntervalRecorder {
    pub calls: Mutex<Vec<(Event, Range)>>,
}

impl IntervalRecorder {
    pub fn calls(&self) -> Vec<(Event, Range)> {
        self.calls.lock().unwrap().clone()
    }
}

impl IntervalSubscriber for IntervalRecorder {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        ctx.set_seq();
        self.calls.lock().unwrap().push((inv.event(), inv.range()));
        Invalidate::Done
    }
}

pub fn range(start: u64, end: u64) -> Range {
    Range::new(start, end).unwrap()
}
