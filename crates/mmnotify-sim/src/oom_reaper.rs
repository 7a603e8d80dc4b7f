//! The OOM reaper, as Linux runs it (`mm/oom_kill.c`), and `process_mrelease`.
//!
//! One *pass* (`__oom_reap_task_mm`) walks every VMA; it leaves shared mappings (file or
//! shmem) alone and, for each private one, asks for a **non-blocking** `Unmap` start over it.
//! A refused start skips the VMA: no unmap, no end (under [`Policy::Legacy`](mmnotify::Policy)
//! and [`Policy::Kernel`](mmnotify::Policy) whatever the engine did for the others is all
//! that happens; under `Exact` the engine already ended who had started). A successful start
//! unmaps the VMA's pages and ends.
//!
//! The reaper ([`OomReaper::reap`], `oom_reap_task`) makes up to ten attempts 100 ms apart
//! (both configurable); an attempt whose mmap-lock try-lock fails does nothing. Then, whatever
//! happened, the address space is marked "OOM skip" so that the killer can move on; partly
//! reaped VMAs stay reaped. Waiting between attempts goes through a [`Clock`], so tests use
//! simulated time and never sleep.
//!
//! [`process_mrelease`] runs one pass, waiting for the mmap lock, and answers
//! [`SimError::TryAgain`] if any VMA was refused.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SimClock};
use crate::error::SimError;
use crate::mm::{ReapPass, SimMm};

/// Linux's `MAX_OOM_REAP_RETRIES`.
pub const MAX_OOM_REAP_RETRIES: u32 = 10;
/// Linux's `HZ/10` sleep between attempts.
pub const OOM_REAP_INTERVAL: Duration = Duration::from_millis(100);

/// One attempt of the reaper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReapAttempt {
    /// When it ran, on the reaper's clock.
    pub at: Duration,
    /// The pass, or `None` if the mmap lock was contended (Linux's `mmap_read_trylock` failed).
    pub pass: Option<ReapPass>,
}

impl ReapAttempt {
    /// Whether every eligible VMA was reaped.
    pub fn succeeded(&self) -> bool {
        self.pass.as_ref().is_some_and(|p| p.refused.is_empty())
    }
}

/// What a reap did, read from each pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReapReport {
    /// Every attempt, in order.
    pub attempts: Vec<ReapAttempt>,
    /// Whether the last attempt reaped every eligible VMA.
    pub succeeded: bool,
    /// Whether the address space is now marked "OOM skip" (always true after `reap`).
    pub oom_skip: bool,
}

impl ReapReport {
    /// Refused VMA starts over all attempts.
    pub fn refusals(&self) -> usize {
        self.attempts
            .iter()
            .filter_map(|a| a.pass.as_ref())
            .map(|p| p.refused.len())
            .sum()
    }

    /// VMAs reaped over all attempts.
    pub fn reaped(&self) -> usize {
        self.attempts
            .iter()
            .filter_map(|a| a.pass.as_ref())
            .map(|p| p.reaped.len())
            .sum()
    }
}

/// The OOM reaper.
#[derive(Debug, Clone)]
pub struct OomReaper {
    attempts: u32,
    interval: Duration,
    clock: Arc<dyn Clock>,
}

impl Default for OomReaper {
    /// Ten attempts, 100 ms apart, on simulated time.
    fn default() -> Self {
        OomReaper::new(Arc::new(SimClock::new()))
    }
}

impl OomReaper {
    /// Linux's parameters (ten attempts, 100 ms apart) on `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        OomReaper {
            attempts: MAX_OOM_REAP_RETRIES,
            interval: OOM_REAP_INTERVAL,
            clock,
        }
    }

    /// Sets the number of attempts (at least one).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Sets the pause between attempts.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Reaps `sim` (`oom_reap_task`): attempts until one reaps every eligible VMA or the
    /// attempts run out, pausing between them, then marks the address space "OOM skip".
    /// An address space already marked is not touched again.
    pub fn reap(&self, sim: &SimMm) -> ReapReport {
        let mut attempts = Vec::new();
        let mut succeeded = false;
        for i in 0..self.attempts {
            if sim.oom_skip() {
                // Checked under the lock in Linux: exit_mmap finished, nothing left to reap.
                succeeded = true;
                break;
            }
            let at = self.clock.now();
            let pass = sim.try_with_mmap_lock(|| sim.reap_pass());
            let attempt = ReapAttempt { at, pass };
            succeeded = attempt.succeeded();
            attempts.push(attempt);
            if succeeded {
                break;
            }
            if i + 1 < self.attempts {
                self.clock.sleep(self.interval);
            }
        }
        sim.set_oom_skip();
        ReapReport {
            attempts,
            succeeded,
            oom_skip: sim.oom_skip(),
        }
    }
}

/// `process_mrelease(pidfd)`: one reap pass, waiting for the mmap lock.
///
/// # Errors
///
/// [`SimError::TryAgain`] if a notifier refused any VMA (those VMAs were neither unmapped nor
/// ended; the others were reaped); [`SimError::Exited`] if the address space is already gone.
pub fn process_mrelease(sim: &SimMm) -> Result<ReapPass, SimError> {
    if sim.is_exited() {
        return Err(SimError::Exited);
    }
    let pass = sim.with_mmap_lock(|| sim.reap_pass());
    if pass.refused.is_empty() {
        Ok(pass)
    } else {
        Err(SimError::TryAgain {
            reaped: pass.reaped.len(),
            refused: pass.refused.len(),
            eligible: pass.reaped.len() + pass.refused.len(),
        })
    }
}
