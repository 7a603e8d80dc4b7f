//! The filler's side of the collision-retry protocol on real memory.
//!
//! A [`WatchedInterval`] wraps the engine's [`IntervalHandle`] and the watcher's gate. Its
//! protocol is the engine's, with the gate in front:
//!
//! ```text
//!   read_begin:  gate.enter()           wait while read-but-undelivered batches exist;
//!                                      remember the batch count as the generation
//!                engine.read_begin()    wait while an invalidation of the interval is open
//!   ...fault in / look up the real pages, without the mirror's lock...
//!   read_retry:  gate.collided(gen)     batches opened since and not all delivered → collision
//!                engine.read_retry()    an invalidation touched the interval → collision
//! ```
//!
//! The order inside `read_retry` matters: the gate is asked first, and when it answers "every
//! batch opened since `read_begin` has been delivered", the engine's sequence is read after
//! that (Acquire) answer, so it includes every `set_seq` those deliveries made. The argument
//! is written out in docs/SEMANTICS.md §9.
//!
//! Both checks fail closed: after a fork (one load of a wipe-on-fork word), a shutdown or a
//! failure, `read_retry` always reports a collision and `read_begin` returns the typed error.

use std::time::{Duration, Instant};

use mmnotify::{IntervalHandle, IntervalId, Range, ReadSeq};

use crate::error::{Error, Result};
use crate::gate::{self, Gate};
use std::sync::Arc;

/// A sequence snapshot of [`WatchedInterval::read_begin`].
#[must_use = "a read_begin without a read_retry under the mirror's lock protects nothing"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchSeq {
    engine: ReadSeq,
    generation: u64,
}

impl WatchSeq {
    /// The engine's part.
    pub fn engine(&self) -> ReadSeq {
        self.engine
    }

    /// The watcher's batch generation at `read_begin`.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The snapshot as two words (engine sequence, generation), for foreign interfaces.
    pub fn to_words(&self) -> [u64; 2] {
        [self.engine.value(), self.generation]
    }

    /// The inverse of [`to_words`](Self::to_words). Words that did not come from a
    /// `read_begin` only change what `read_retry` answers for the caller's own fill.
    pub fn from_words(words: [u64; 2]) -> WatchSeq {
        WatchSeq {
            engine: ReadSeq::from_value(words[0]),
            generation: words[1],
        }
    }
}

/// An interval subscription on the watcher's `Mm`, with the real-memory read side.
#[derive(Clone, Debug)]
pub struct WatchedInterval {
    engine: IntervalHandle,
    gate: Arc<Gate>,
}

impl WatchedInterval {
    pub(crate) fn new(engine: IntervalHandle, gate: Arc<Gate>) -> Self {
        WatchedInterval { engine, gate }
    }

    /// The engine handle (for `Mm::remove_interval` and the engine's own API). Its own
    /// `read_begin`/`read_retry` do not cover the gap between the kernel's read and the
    /// engine's delivery: fill through this type's methods.
    pub fn engine(&self) -> &IntervalHandle {
        &self.engine
    }

    /// The interval's identity.
    pub fn id(&self) -> IntervalId {
        self.engine.id()
    }

    /// The range the interval covers.
    pub fn range(&self) -> Range {
        self.engine.range()
    }

    /// Begins a fill: waits while invalidations read from the userfaultfd are not yet
    /// delivered, then while an invalidation of this interval is open; returns the snapshot to
    /// check with [`read_retry`](Self::read_retry).
    ///
    /// # Errors
    ///
    /// [`Error::InDispatcher`] from a subscriber callback (it would wait for itself);
    /// [`Error::Forked`], [`Error::ShutDown`], [`Error::Failed`] when the watcher cannot
    /// vouch for the mirror; the engine's errors.
    pub fn read_begin(&self) -> Result<WatchSeq> {
        self.begin(None)
    }

    /// Like [`read_begin`](Self::read_begin), giving up after `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::ReadBeginTimeout`], and those of `read_begin`.
    pub fn read_begin_timeout(&self, timeout: Duration) -> Result<WatchSeq> {
        // A timeout too large to add to the current time means no limit, as in the engine.
        self.begin(Instant::now().checked_add(timeout))
    }

    /// Like [`read_begin`](Self::read_begin), giving up at `deadline`.
    ///
    /// # Errors
    ///
    /// [`Error::ReadBeginTimeout`], and those of `read_begin`.
    pub fn read_begin_until(&self, deadline: Instant) -> Result<WatchSeq> {
        self.begin(Some(deadline))
    }

    fn begin(&self, deadline: Option<Instant>) -> Result<WatchSeq> {
        if gate::on_dispatcher_thread() {
            return Err(Error::InDispatcher { op: "read_begin" });
        }
        let generation = self.gate.enter(deadline)?;
        let engine = match deadline {
            Some(d) => self.engine.read_begin_until(d),
            None => self.engine.read_begin(),
        }?;
        Ok(WatchSeq { engine, generation })
    }

    /// Whether the fill begun at `seq` must be retried: an invalidation touched the interval,
    /// or one read from the userfaultfd may not have reached it yet, or the watcher can no
    /// longer vouch (forked, shut down, failed). Call it under the lock the subscriber's
    /// `invalidate` takes around `set_seq`; commit only on `false`, before unlocking.
    pub fn read_retry(&self, seq: WatchSeq) -> bool {
        // The gate first: its `false` orders the engine's load after every delivery since.
        self.gate.collided(seq.generation) || self.engine.read_retry(seq.engine)
    }

    /// The same test without the mirror's lock: a `true` is reliable, a `false` may be stale.
    pub fn check_retry(&self, seq: WatchSeq) -> bool {
        self.gate.collided(seq.generation) || self.engine.check_retry(seq.engine)
    }
}
