//! Time for the OOM reaper: real, or simulated so that tests never sleep.
//!
//! Linux's reaper sleeps `HZ/10` between its attempts. [`OomReaper`](crate::OomReaper) asks a
//! [`Clock`] to sleep instead: [`RealClock`] really sleeps, [`SimClock`] only advances a
//! counter, so a ten-attempt reap under simulated time takes microseconds and its report still
//! shows attempts 100 ms apart.
//!
//! The bounded waits that detect hangs (a GRU fault waiting for `range_active == 0`, a mirror's
//! `read_begin_timeout`, a KVM memslot update) are real waits with small timeouts: they wait
//! for other threads, which simulated time cannot speed up.

use std::fmt;
use std::time::{Duration, Instant};

use crate::sync::Mutex;

/// A source of time with a sleep.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time elapsed since the clock's origin.
    fn now(&self) -> Duration;
    /// Lets `duration` pass.
    fn sleep(&self, duration: Duration);
}

/// Wall-clock time; `sleep` blocks the thread.
#[derive(Debug, Clone, Copy)]
pub struct RealClock {
    origin: Instant,
}

impl RealClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        RealClock {
            origin: Instant::now(),
        }
    }
}

impl Default for RealClock {
    fn default() -> Self {
        RealClock::new()
    }
}

impl Clock for RealClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// Simulated time: starts at zero, and `sleep` advances it without blocking.
#[derive(Debug, Default)]
pub struct SimClock {
    now: Mutex<Duration>,
}

impl SimClock {
    /// A simulated clock at time zero.
    pub fn new() -> Self {
        SimClock::default()
    }

    /// Moves simulated time forward by `duration`.
    pub fn advance(&self, duration: Duration) {
        let mut now = self.now.lock();
        *now = now.saturating_add(duration);
    }
}

impl Clock for SimClock {
    fn now(&self) -> Duration {
        *self.now.lock()
    }

    fn sleep(&self, duration: Duration) {
        self.advance(duration);
    }
}
