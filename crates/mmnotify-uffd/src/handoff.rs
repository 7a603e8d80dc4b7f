//! The hand-off from the reading thread to the dispatching thread: bounded, allocation-free,
//! and never blocking the reader.
//!
//! The reader must never wait for the dispatcher: the dispatcher runs user callbacks, a
//! callback may unmap watched memory, and that unmap only returns once the *reader* has read
//! its message. So the reader pushes into a ring with a fixed capacity, reserved up front
//! (with EVENT_FORK, the thread that forks holds the allocator's locks while it waits for the
//! reader, so the reader must not allocate either). When the ring is full, the reader folds
//! every further message into one *overflow span* (the smallest range covering them all, and
//! the newest batch number): it invalidates more than was asked, never less, and keeps order,
//! because once the span exists every later message joins it until the dispatcher takes it.

use crate::sync::{Condvar, Mutex};
use std::collections::VecDeque;

use crate::sys::Msg;
use crate::zap::ZapProbe;

/// One unit of work for the dispatcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Item {
    /// A message of the batch being read, with the REMOVE's zap probe (U4).
    Msg(Msg, Option<ZapProbe>),
    /// Every message of batch `n` was pushed before this.
    End(u64),
    /// The coalesced messages of an overflow: invalidate `[start, end)` (if non-empty), then
    /// batch `upto` is delivered.
    Overflow { start: u64, end: u64, upto: u64 },
    /// The reader has stopped; nothing follows.
    Stop,
}

#[derive(Debug)]
struct Ring {
    items: VecDeque<Item>,
    capacity: usize,
    overflow: Option<(u64, u64, u64)>,
    overflows: u64,
    stopped: bool,
}

/// The ring plus the dispatcher's wake-up.
#[derive(Debug)]
pub(crate) struct Handoff {
    ring: Mutex<Ring>,
    ready: Condvar,
}

fn span_of(m: &Msg) -> Option<(u64, u64)> {
    match *m {
        Msg::Unmap { start, end } | Msg::Remove { start, end } => Some((start, end)),
        Msg::Remap { from, len, .. } => Some((from, from.saturating_add(len))),
        Msg::Fork { .. } => Some((0, u64::MAX)),
        Msg::Other { .. } => None,
    }
}

impl Handoff {
    pub(crate) fn new(capacity: usize) -> Handoff {
        // Validated in `WatcherOptions::validate`; clamped again so that no value can make
        // the up-front reservation overflow.
        let capacity = capacity.clamp(4, crate::watcher::MAX_QUEUE_CAPACITY);
        Handoff {
            ring: Mutex::new(Ring {
                items: VecDeque::with_capacity(capacity),
                capacity,
                overflow: None,
                overflows: 0,
                stopped: false,
            }),
            ready: Condvar::new(),
        }
    }

    /// The reader's push: never blocks for long (the lock is only held for pushes and pops),
    /// never allocates.
    pub(crate) fn push(&self, item: Item) {
        let mut r = self.ring.lock();
        if matches!(item, Item::Stop) {
            r.stopped = true;
        } else if r.overflow.is_some() || r.items.len() >= r.capacity {
            if r.overflow.is_none() {
                r.overflows += 1;
            }
            let o = r.overflow.get_or_insert((u64::MAX, 0, 0));
            match item {
                Item::Msg(m, _) => {
                    if let Some((s, e)) = span_of(&m) {
                        o.0 = o.0.min(s);
                        o.1 = o.1.max(e);
                    }
                }
                Item::End(n) => o.2 = o.2.max(n),
                Item::Overflow { .. } | Item::Stop => {}
            }
        } else {
            r.items.push_back(item);
        }
        drop(r);
        self.ready.notify_one();
    }

    /// The dispatcher's pop: waits for work; `Item::Stop` once the reader stopped and
    /// everything before it was taken.
    pub(crate) fn pop(&self) -> Item {
        let mut r = self.ring.lock();
        loop {
            if let Some(item) = r.items.pop_front() {
                return item;
            }
            if let Some((start, end, upto)) = r.overflow.take() {
                return Item::Overflow { start, end, upto };
            }
            if r.stopped {
                return Item::Stop;
            }
            r = self.ready.wait(r);
        }
    }

    /// How many times the ring overflowed.
    pub(crate) fn overflows(&self) -> u64 {
        self.ring.lock().overflows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_capacity_is_clamped_not_a_panic() {
        let h = Handoff::new(usize::MAX);
        h.push(Item::End(1));
        assert!(matches!(h.pop(), Item::End(1)));
    }

    #[test]
    fn overflow_folds_in_order_and_keeps_the_newest_batch() {
        let h = Handoff::new(4);
        h.push(Item::Msg(
            Msg::Unmap {
                start: 0x1000,
                end: 0x2000,
            },
            None,
        ));
        h.push(Item::End(1));
        h.push(Item::Msg(
            Msg::Remove {
                start: 0x5000,
                end: 0x6000,
            },
            None,
        ));
        h.push(Item::End(2));
        // Full: these fold.
        h.push(Item::Msg(
            Msg::Unmap {
                start: 0x9000,
                end: 0xa000,
            },
            None,
        ));
        h.push(Item::Msg(
            Msg::Remap {
                from: 0x3000,
                to: 0x7000,
                len: 0x1000,
            },
            None,
        ));
        h.push(Item::End(3));
        h.push(Item::Stop);
        assert!(matches!(h.pop(), Item::Msg(Msg::Unmap { .. }, None)));
        assert_eq!(h.pop(), Item::End(1));
        assert!(matches!(h.pop(), Item::Msg(Msg::Remove { .. }, None)));
        assert_eq!(h.pop(), Item::End(2));
        assert_eq!(
            h.pop(),
            Item::Overflow {
                start: 0x3000,
                end: 0xa000,
                upto: 3
            }
        );
        assert_eq!(h.pop(), Item::Stop);
        assert_eq!(h.overflows(), 1);
    }
}
