//! Fault-injecting subscribers: one that refuses, one that is slow, one that panics, and a
//! census that counts invalidations.
//!
//! Their behaviour is switched by operations of the workload ([`Op::SetRefusing`],
//! [`Op::SetDelay`], [`Op::ArmPanic`]), never by a random draw inside a callback, so that a
//! recorded history replays the same injections.
//!
//! [`Op::SetRefusing`]: super::Op::SetRefusing
//! [`Op::SetDelay`]: super::Op::SetDelay
//! [`Op::ArmPanic`]: super::Op::ArmPanic

use std::time::Duration;

use mmnotify::{Capabilities, Invalidation, Refused, Subscriber};

use crate::sync::Mutex;

/// The payload of an injected panic; workers recognise it, and the quiet panic hook hides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedPanic;

/// Counts every start it sees (it is registered first and never refuses, so it sees every
/// invalidation that reaches the classic subscribers).
#[derive(Debug, Default)]
pub(crate) struct Census {
    counts: Mutex<(u64, u64)>,
}

impl Census {
    /// `(blockable, non-blockable)` starts seen.
    pub(crate) fn counts(&self) -> (u64, u64) {
        *self.counts.lock()
    }
}

impl Subscriber for Census {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start()
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        let mut c = self.counts.lock();
        if inv.is_blockable() {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
        Ok(())
    }
}

/// Has a start and an end, declares `may_refuse`, and refuses non-blockable starts while
/// switched on.
#[derive(Debug, Default)]
pub(crate) struct Refuser {
    refusing: Mutex<bool>,
}

impl Refuser {
    pub(crate) fn set(&self, on: bool) {
        *self.refusing.lock() = on;
    }
}

impl Subscriber for Refuser {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end().may_refuse()
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        if !inv.is_blockable() && *self.refusing.lock() {
            Err(Refused)
        } else {
            Ok(())
        }
    }

    fn invalidate_range_end(&self, _inv: &Invalidation) {}
}

/// Sleeps in every start and end (0 by default), widening every race window.
#[derive(Debug, Default)]
pub(crate) struct Slow {
    delay_us: Mutex<u16>,
}

impl Slow {
    pub(crate) fn set(&self, micros: u16) {
        *self.delay_us.lock() = micros;
    }

    fn nap(&self) {
        let us = *self.delay_us.lock();
        let delay = Duration::from_micros(u64::from(us));
        if us >= 50 {
            std::thread::sleep(delay);
        } else if us > 0 {
            // Short delays spin: a sleep would last tens of microseconds at least.
            let began = std::time::Instant::now();
            while began.elapsed() < delay {
                std::hint::spin_loop();
            }
        }
    }
}

impl Subscriber for Slow {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }

    fn invalidate_range_start(&self, _inv: &Invalidation) -> Result<(), Refused> {
        self.nap();
        Ok(())
    }

    fn invalidate_range_end(&self, _inv: &Invalidation) {
        self.nap();
    }
}

/// What the panicking subscriber saw: it keeps its own books because it is registered on the
/// engine directly (the simulator's recording wrapper counts an end only after it returns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PanickerBooks {
    /// Starts that returned `Ok`.
    pub(crate) starts: u64,
    /// Ends called (including those that panicked).
    pub(crate) ends: u64,
    /// Panics thrown.
    pub(crate) fired: u64,
    armed_start: bool,
    armed_end: bool,
}

/// Has a start and an end; panics in the next start or end once armed.
#[derive(Debug, Default)]
pub(crate) struct Panicker {
    books: Mutex<PanickerBooks>,
}

impl Panicker {
    pub(crate) fn arm(&self, at_end: bool) {
        let mut b = self.books.lock();
        if at_end {
            b.armed_end = true;
        } else {
            b.armed_start = true;
        }
    }

    pub(crate) fn books(&self) -> PanickerBooks {
        *self.books.lock()
    }
}

impl Subscriber for Panicker {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }

    fn invalidate_range_start(&self, _inv: &Invalidation) -> Result<(), Refused> {
        let fire = {
            let mut b = self.books.lock();
            if std::mem::take(&mut b.armed_start) {
                b.fired += 1;
                true
            } else {
                b.starts += 1;
                false
            }
        };
        if fire {
            std::panic::panic_any(InjectedPanic);
        }
        Ok(())
    }

    fn invalidate_range_end(&self, _inv: &Invalidation) {
        let fire = {
            let mut b = self.books.lock();
            b.ends += 1;
            if std::mem::take(&mut b.armed_end) {
                b.fired += 1;
                true
            } else {
                false
            }
        };
        if fire {
            std::panic::panic_any(InjectedPanic);
        }
    }
}
