//! One error type for the crate; every variant is a sentence a user can act on, and carries
//! the values that made the call fail.
//!
//! Callers branch on a few of these: [`Error::StartRefused`] (try the range again later, as the
//! OOM reaper does), [`Error::WouldDeadlock`] (a programming error: the call was made from a
//! place where it could never return) and [`Error::ReadBeginTimeout`] (the bounded wait of the
//! collision-retry protocol ran out). The others report bad input.

use std::fmt;
use std::time::Duration;

use crate::classic::SubscriberId;
use crate::interval::IntervalId;
use crate::range::Range;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when using an [`Mm`](crate::Mm).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A range of zero bytes was given.
    #[error("the range starting at {start:#x} is empty; a range must cover at least one byte")]
    EmptyRange {
        /// Where the empty range starts.
        start: u64,
    },
    /// A range whose end lies before its start was given.
    #[error("the range [{start:#x}, {end:#x}) is inverted: its end lies before its start")]
    InvertedRange {
        /// The given start.
        start: u64,
        /// The given end.
        end: u64,
    },
    /// `start + len` does not fit in the 64-bit address space.
    #[error(
        "the range of {len:#x} bytes at {start:#x} runs past the end of the 64-bit address space"
    )]
    RangeOverflow {
        /// The given start.
        start: u64,
        /// The given length.
        len: u64,
    },
    /// A subscriber declared both the secondary-TLB callback and start/end.
    #[error(
        "a subscriber may implement the secondary-TLB callback or invalidate_range_start/end, \
         not both; its capabilities declare both"
    )]
    CapabilityConflict,
    /// The very same subscriber object is already registered on this address space.
    #[error("this subscriber object is already registered on this address space as {existing}")]
    AlreadyRegistered {
        /// The registration that already exists.
        existing: SubscriberId,
    },
    /// The subscriber is not (or no longer) registered on this address space.
    #[error(
        "{id} is not registered on this address space (never was, or was already unregistered)"
    )]
    NotRegistered {
        /// The unknown subscriber.
        id: SubscriberId,
    },
    /// The subscriber was registered with `register`, so it is removed with `unregister`, not
    /// `put` (or the other way round).
    #[error("{id} was not registered through get_or_register, so it has no use count to put")]
    NotShared {
        /// The subscriber.
        id: SubscriberId,
    },
    /// The subscriber was registered with `get_or_register`; it is removed with `put`.
    #[error("{id} was registered through get_or_register; drop it with put, not unregister")]
    SharedUsePut {
        /// The subscriber.
        id: SubscriberId,
    },
    /// The use count of a shared subscriber would overflow.
    #[error("the use count of {id} would overflow")]
    UseCountOverflow {
        /// The subscriber.
        id: SubscriberId,
    },
    /// The address space was released (its process exited); nothing can subscribe to it.
    #[error(
        "the address space was released (its process exited); nothing can subscribe to it any more"
    )]
    Released,
    /// The interval is not (or no longer) inserted on this address space.
    #[error("{id} is not inserted on this address space (never was, or was already removed)")]
    IntervalNotInserted {
        /// The unknown interval.
        id: IntervalId,
    },
    /// A non-blocking invalidation start was refused: nothing in the range may change, and no
    /// end is owed by the caller. Retry later. What the subscribers saw depends on the
    /// [`Policy`](crate::Policy): under `Exact` every start that succeeded was ended again.
    #[error(
        "the non-blocking invalidation of {range} was refused by {}",
        Refusers(refusers)
    )]
    StartRefused {
        /// The range that must not change now.
        range: Range,
        /// Who refused, in call order.
        refusers: Vec<Refuser>,
    },
    /// The call would wait for something that can only happen after the caller returns.
    #[error("{op} would deadlock here: {cause}")]
    WouldDeadlock {
        /// The blocking operation that was refused.
        op: BlockingOp,
        /// Why it could never return.
        cause: DeadlockCause,
    },
    /// `read_begin_timeout` gave up: the invalidation that last touched the interval did not
    /// finish in time.
    #[error("read_begin on {id} timed out after {waited:?}: the invalidation that last touched it is still open")]
    ReadBeginTimeout {
        /// The interval.
        id: IntervalId,
        /// How long the call waited.
        waited: Duration,
    },
}

/// Who refused a non-blocking start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refuser {
    /// A classic subscriber's `invalidate_range_start` refused.
    Classic(SubscriberId),
    /// An interval subscriber's `invalidate` refused.
    Interval(IntervalId),
}

impl fmt::Display for Refuser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refuser::Classic(id) => write!(f, "{id}"),
            Refuser::Interval(id) => write!(f, "{id}"),
        }
    }
}

struct Refusers<'a>(&'a [Refuser]);

impl fmt::Display for Refusers<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// The library operations that may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlockingOp {
    /// [`Mm::register`](crate::Mm::register) (waits for in-flight invalidations).
    Register,
    /// [`Mm::unregister`](crate::Mm::unregister) (waits for pending ends).
    Unregister,
    /// [`Mm::get_or_register`](crate::Mm::get_or_register).
    GetOrRegister,
    /// [`Mm::synchronize`](crate::Mm::synchronize).
    Synchronize,
    /// [`Mm::release`](crate::Mm::release).
    Release,
    /// A blocking [`Mm::invalidate_start`](crate::Mm::invalidate_start).
    InvalidateStart,
    /// [`Mm::insert_interval`](crate::Mm::insert_interval).
    Insert,
    /// [`Mm::remove_interval`](crate::Mm::remove_interval).
    Remove,
    /// [`IntervalHandle::read_begin`](crate::IntervalHandle::read_begin).
    ReadBegin,
}

impl fmt::Display for BlockingOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockingOp::Register => "register",
            BlockingOp::Unregister => "unregister",
            BlockingOp::GetOrRegister => "get_or_register",
            BlockingOp::Synchronize => "synchronize",
            BlockingOp::Release => "release",
            BlockingOp::InvalidateStart => "a blocking invalidate_start",
            BlockingOp::Insert => "insert_interval",
            BlockingOp::Remove => "remove_interval",
            BlockingOp::ReadBegin => "read_begin",
        })
    }
}

/// Why a blocking call could never return.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadlockCause {
    /// The calling thread is inside a callback of this address space; the call would wait for
    /// that callback to return.
    InsideCallback,
    /// The calling thread holds an invalidation guard of this address space; the call would
    /// wait for that guard's end.
    HoldsGuard,
    /// The calling thread is handling a non-blockable invalidation and must not sleep.
    NonBlockingContext,
    /// The calling thread is inside a young or secondary-TLB walk of this address space (for
    /// example in a subscriber's `Drop` run when the walk released the last reference); the call
    /// would wait for that walk to end.
    InsideWalk,
}

impl fmt::Display for DeadlockCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeadlockCause::InsideCallback => {
                "the calling thread is inside a callback of this address space, and the call \
                 waits for callbacks to return"
            }
            DeadlockCause::HoldsGuard => {
                "the calling thread holds an invalidation guard of this address space, and the \
                 call waits for that guard to end; end the guard first"
            }
            DeadlockCause::NonBlockingContext => {
                "the calling thread is handling a non-blockable invalidation and must not sleep"
            }
            DeadlockCause::InsideWalk => {
                "the calling thread is inside a young or secondary-TLB walk of this address \
                 space, and the call waits for that walk to end"
            }
        })
    }
}
