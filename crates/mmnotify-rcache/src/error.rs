//! One error type for the cache: each variant a sentence that names the failing values.
//!
//! Input errors ([`Error::EmptyRange`], [`Error::RangeOverflow`], [`Error::Unmapped`]) are
//! found before anything is registered. Registrar errors and panics reach the caller of
//! [`Cache::get`](crate::Cache::get) typed, after the cache has undone what it started (the
//! interval subscription of the failed region is removed, nothing is linked), so the cache
//! stays consistent. The source's errors (the watcher shut down, failed, or this process is a
//! fork) make `get` fail closed instead of trusting a registration nobody vouches for.

use std::fmt;

use crate::range::{Access, PageRange};

/// What a registrar reports when it cannot register: boxed, so any registrar's own error type
/// travels through the cache unchanged (downcast it to inspect).
pub type RegistrarError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The cache's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything [`Cache::get`](crate::Cache::get) and friends can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Length zero.
    #[error("cannot register an empty range (length 0 at {addr:#x})")]
    EmptyRange {
        /// The address asked for.
        addr: u64,
    },
    /// `addr + len`, rounded up to a page, wraps past the end of the address space.
    #[error("the range of {len} bytes at {addr:#x} wraps past the end of the address space")]
    RangeOverflow {
        /// The address asked for.
        addr: u64,
        /// The length asked for.
        len: u64,
    },
    /// Part of the range is not mapped.
    #[error("{range} is not fully mapped: nothing is mapped at {hole}")]
    Unmapped {
        /// The page-aligned range asked for.
        range: PageRange,
        /// The first hole found in it.
        hole: PageRange,
    },
    /// The registrar refused (its own error is the source).
    #[error("the registrar could not register {range} for {access} access: {source}")]
    Registrar {
        /// The range the cache asked the registrar for.
        range: PageRange,
        /// The access asked for.
        access: Access,
        /// The registrar's error.
        source: RegistrarError,
    },
    /// The registrar panicked; the panic was caught.
    #[error("the registrar panicked while registering {range}: {message}")]
    RegistrarPanicked {
        /// The range the cache asked the registrar for.
        range: PageRange,
        /// The panic's message, when it was a string.
        message: String,
    },
    /// The limits cannot be met: every region that could be evicted is in use, or the request
    /// alone is larger than the byte limit.
    #[error(
        "the cache is full: {range} would exceed the limits ({regions} of at most {max_regions} \
         regions, {bytes} of at most {max_bytes} bytes in use) and no unused region is left to evict"
    )]
    Full {
        /// The range that did not fit.
        range: PageRange,
        /// Regions cached at the time.
        regions: usize,
        /// Bytes cached at the time.
        bytes: u64,
        /// The configured region limit.
        max_regions: usize,
        /// The configured byte limit.
        max_bytes: u64,
    },
    /// The memory kept changing while it was being registered: every attempt collided with
    /// an invalidation.
    #[error(
        "{range} was invalidated during each of {attempts} attempts to register it; giving up"
    )]
    Unstable {
        /// The range.
        range: PageRange,
        /// Attempts made.
        attempts: u32,
    },
    /// The userfaultfd watcher refused (shut down, failed, forked, ...): the cache fails closed.
    #[error("the userfaultfd watcher cannot vouch for the memory: {0}")]
    Watcher(#[from] mmnotify_uffd::Error),
    /// The engine refused (e.g. an `Mm` that was released).
    #[error("the mmnotify engine refused: {0}")]
    Engine(#[from] mmnotify::Error),
    /// Reading `/proc/self/maps` failed.
    #[error("could not read /proc/self/maps to classify {range}: {source}")]
    Maps {
        /// The range being classified.
        range: PageRange,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

/// A registrar error made of a message, for registrars without an error type of their own.
#[derive(Debug)]
pub struct Refusal(pub String);

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}
