//! One error type for the crate. Every variant is a sentence a user can act on and carries the
//! values that made the call fail.
//!
//! Three groups: *creation* errors say why this process cannot have a watcher at all
//! ([`Error::NoUserfaultfd`], [`Error::NotPermitted`], [`Error::KernelTooOld`]); *input* errors
//! reject a range before anything happens ([`Error::Unaligned`], [`Error::EmptyRange`],
//! [`Error::RangeOverflow`], [`Error::Unmapped`], [`Error::NothingWatchable`]); *state* errors
//! are the fail-closed answers of a watcher that can no longer vouch for its mirrors
//! ([`Error::ShutDown`], [`Error::Failed`], [`Error::Forked`]) and the deadlock refusal
//! [`Error::InDispatcher`].

use std::fmt;
use std::io;
use std::time::Duration;

use crate::watch::Skipped;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a watcher stopped vouching for its mirrors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailReason {
    /// The reading thread ended unexpectedly (it panicked, or a test killed it).
    ReaderDied,
    /// Polling or reading the userfaultfd reported an error; its errno.
    UffdError {
        /// The errno of the failing `poll`/`read`.
        errno: i32,
    },
    /// The userfaultfd's descriptor was closed or replaced behind the watcher's back (for
    /// example by a `close_range` in library code), so the kernel stopped reporting.
    UffdLost,
    /// The dispatching thread ended unexpectedly.
    DispatcherDied,
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::ReaderDied => f.write_str("the thread reading the userfaultfd died"),
            FailReason::UffdError { errno } => write!(
                f,
                "reading the userfaultfd failed with {}",
                io::Error::from_raw_os_error(*errno)
            ),
            FailReason::UffdLost => f.write_str(
                "the userfaultfd descriptor was closed or replaced by someone else in this process",
            ),
            FailReason::DispatcherDied => f.write_str("the dispatching thread died"),
        }
    }
}

/// Everything that can go wrong with a [`Watcher`](crate::Watcher).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel has no userfaultfd (built without it, or a seccomp filter returns ENOSYS).
    #[error("this kernel offers no userfaultfd (the system call returned ENOSYS)")]
    NoUserfaultfd,
    /// The kernel refused to create or configure a userfaultfd for this process.
    #[error("creating a userfaultfd for {what} is not permitted here: {source}")]
    NotPermitted {
        /// What was asked for (the mode or feature the kernel refused).
        what: &'static str,
        /// The kernel's answer (EPERM or EACCES).
        source: io::Error,
    },
    /// The kernel lacks something the watcher cannot work without.
    #[error(
        "this kernel is too old for the watcher: it lacks {missing} (needs Linux {needs} or newer)"
    )]
    KernelTooOld {
        /// What is missing, e.g. `UFFD_USER_MODE_ONLY` or `UFFD_FEATURE_EVENT_UNMAP`.
        missing: &'static str,
        /// The first Linux version that has it.
        needs: &'static str,
    },
    /// EVENT_FORK was required by the options but the kernel refused it (it needs
    /// CAP_SYS_PTRACE).
    #[error("the options require fork events, which need CAP_SYS_PTRACE here: {source}")]
    ForkEventsNotPermitted {
        /// The kernel's answer.
        source: io::Error,
    },
    /// A watcher with other options already exists in this process; a process has one.
    #[error(
        "this process already has a watcher created with {existing:?}; it cannot also have one \
         with {requested:?} (a VMA belongs to one userfaultfd, so a process shares one watcher)"
    )]
    OptionsConflict {
        /// The options of the existing watcher.
        existing: crate::WatcherOptions,
        /// The options asked for.
        requested: crate::WatcherOptions,
    },
    /// A field of [`WatcherOptions`](crate::WatcherOptions) is out of its range.
    #[error("the watcher option {field} = {value} is out of range: it must be {allowed}")]
    InvalidOptions {
        /// The field, e.g. `remove_settle`.
        field: &'static str,
        /// The value given, as debug-printed.
        value: String,
        /// The values it may take.
        allowed: &'static str,
    },
    /// The memory is already registered with another userfaultfd in this process.
    #[error("[{start:#x}, {end:#x}) is already registered with another userfaultfd (EBUSY)")]
    AlreadyOwned {
        /// First address.
        start: u64,
        /// First address after.
        end: u64,
    },
    /// An address is not a multiple of the page size.
    #[error("{addr:#x} is not aligned to the page size {page_size:#x}")]
    Unaligned {
        /// The address.
        addr: u64,
        /// The page size.
        page_size: u64,
    },
    /// A range of zero bytes.
    #[error("the range at {addr:#x} is empty; a range must cover at least one page")]
    EmptyRange {
        /// Where it starts.
        addr: u64,
    },
    /// `addr + len` does not fit in the address space.
    #[error("the range of {len:#x} bytes at {addr:#x} runs past the end of the address space")]
    RangeOverflow {
        /// The start.
        addr: u64,
        /// The length.
        len: u64,
    },
    /// Nothing is mapped anywhere in the range.
    #[error("nothing is mapped in [{start:#x}, {end:#x})")]
    Unmapped {
        /// First address.
        start: u64,
        /// First address after.
        end: u64,
    },
    /// Memory is mapped in the range, but none of it can be watched; `skipped` says why, per
    /// range.
    #[error(
        "nothing in [{start:#x}, {end:#x}) can be watched: {}",
        SkippedList(skipped)
    )]
    NothingWatchable {
        /// First address.
        start: u64,
        /// First address after.
        end: u64,
        /// Each piece and why it cannot be watched.
        skipped: Vec<Skipped>,
    },
    /// The watcher was shut down ([`Watcher::shutdown`](crate::Watcher::shutdown)); create a
    /// new one with [`Watcher::get`](crate::Watcher::get).
    #[error("the watcher was shut down; get a new one with Watcher::get")]
    ShutDown,
    /// The watcher failed and no longer vouches for mirrors.
    #[error("the watcher failed and no longer vouches for mirrors: {reason}")]
    Failed {
        /// What happened.
        reason: FailReason,
    },
    /// This is a forked child of the process that created the watcher: the child has no
    /// reading thread, and its memory is not registered.
    #[error(
        "this process is a fork of the one that created the watcher; the child's memory is \
         not watched (create nothing here, or exec)"
    )]
    Forked,
    /// A blocking watcher call was made on the dispatching thread (from a subscriber
    /// callback); it would wait for that very callback to return.
    #[error(
        "{op} was called from a subscriber callback (the watcher's dispatching thread), where \
         it would wait for itself"
    )]
    InDispatcher {
        /// The refused call.
        op: &'static str,
    },
    /// `read_begin_timeout` gave up while invalidations read from the userfaultfd were still
    /// being delivered.
    #[error("read_begin gave up after {waited:?}: invalidations read from the userfaultfd are still being delivered")]
    ReadBeginTimeout {
        /// How long it waited.
        waited: Duration,
    },
    /// The engine refused the call.
    #[error(transparent)]
    Engine(#[from] mmnotify::Error),
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Syscall {
        /// The call, e.g. `munmap` or `UFFDIO_REGISTER`.
        call: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
}

struct SkippedList<'a>(&'a [Skipped]);

impl fmt::Display for SkippedList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

impl Error {
    pub(crate) fn syscall(call: &'static str, source: impl Into<io::Error>) -> Error {
        Error::Syscall {
            call,
            source: source.into(),
        }
    }
}
