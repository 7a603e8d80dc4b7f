//! The simulator's error type: bad input and refused operations, each variant a sentence that
//! carries the values that made the call fail.

use crate::vma::{Access, Prot, PAGE_SIZE};

/// Everything a simulated operation can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// No VMA contains the address.
    #[error("no mapping contains address {addr:#x}")]
    Unmapped {
        /// The address.
        addr: u64,
    },
    /// A fixed mapping would overlap an existing one (the simulator's fixed mmap has
    /// `MAP_FIXED_NOREPLACE` semantics).
    #[error(
        "a fixed mapping of [{start:#x}, {end:#x}) would overlap the existing mapping \
         [{existing_start:#x}, {existing_end:#x})"
    )]
    Overlap {
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
        /// Start of the first overlapped mapping.
        existing_start: u64,
        /// End of the first overlapped mapping.
        existing_end: u64,
    },
    /// The protection combination is not allowed.
    #[error("protection {prot} is invalid: write access requires read access")]
    InvalidProtection {
        /// The rejected protection.
        prot: Prot,
    },
    /// A length of zero was given.
    #[error(
        "the length given at address {addr:#x} is zero; an operation covers at least one page"
    )]
    ZeroLength {
        /// The address the length was given with.
        addr: u64,
    },
    /// An address is not page-aligned.
    #[error("address {addr:#x} is not aligned to the {PAGE_SIZE}-byte page size")]
    Misaligned {
        /// The address.
        addr: u64,
    },
    /// The range runs past the end of the address space.
    #[error("the range of {len:#x} bytes at {addr:#x} runs past the end of the address space")]
    AddressOverflow {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// No free gap is large enough.
    #[error("no free gap of {len:#x} bytes is left in the address space")]
    NoSpace {
        /// Requested length.
        len: u64,
    },
    /// The access is not allowed by the mapping's protection (a SIGSEGV).
    #[error("a {access} access at {addr:#x} is not allowed by the mapping's protection {prot}")]
    AccessViolation {
        /// The faulting address.
        addr: u64,
        /// The access.
        access: Access,
        /// The mapping's protection.
        prot: Prot,
    },
    /// The range is not inside a single mapping (mremap moves one mapping at a time).
    #[error("the range of {len:#x} bytes at {addr:#x} is not inside a single mapping")]
    NotOneMapping {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// No mirrored region of a secondary MMU covers the address.
    #[error("no mirrored region of the secondary MMU covers address {addr:#x}")]
    NotMirrored {
        /// The address.
        addr: u64,
    },
    /// A device migration was asked of a mirror that has no device memory (no owner).
    #[error("{mirror} has no device memory to migrate to; attach it with a device owner")]
    NoDeviceMemory {
        /// The mirror.
        mirror: String,
    },
    /// The process exited; its address space is gone.
    #[error("the process exited; its address space is gone")]
    Exited,
    /// `process_mrelease` could not reap every VMA: a notifier refused the non-blocking start.
    #[error(
        "process_mrelease reaped {reaped} of {eligible} VMAs; {refused} were refused by a \
         notifier; try again"
    )]
    TryAgain {
        /// VMAs reaped.
        reaped: usize,
        /// VMAs refused.
        refused: usize,
        /// VMAs the reaper handles (anonymous or private).
        eligible: usize,
    },
    /// The notifier engine returned an error.
    #[error("the notifier engine failed: {0}")]
    Engine(#[from] mmnotify::Error),
}
