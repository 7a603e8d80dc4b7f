//! The embedded primary: a simulated memory manager on top of [`mmnotify::Mm`], the kernel's
//! notifier users as small readable models, the OOM reaper, a coherence oracle, and scenarios.
//!
//! # Why a simulator
//!
//! The notifier contract is about a *primary* MMU changing mappings while *secondary* MMUs
//! mirror them. To show what the contract guarantees, and where Linux's versions of it break,
//! one needs both sides: something that changes mappings the way Linux does, firing the event
//! Linux fires for each operation, and mirrors that behave like the kernel's drivers. Real
//! page tables cannot be driven like that from userspace; a simulated one can, deterministically.
//!
//! # The pieces
//!
//! * [`SimMm`] (`mm.rs`): VMAs (`vma.rs`), a page table with young and dirty bits
//!   (`page_table.rs`), a frame allocator with reference counts, one word of contents per
//!   frame, the shared zero page and a page cache for files and shmem (`frames.rs`), and tasks
//!   that load and store. `mmap` (also `MAP_FIXED`), `munmap`, `madvise(DONTNEED)`,
//!   `mprotect`, `fork` with copy-on-write, `mremap`, migration, reclaim with page aging and
//!   swap, and `exit` each bracket their change with the event Linux fires, piece by piece
//!   over ranges with holes as Linux does (the table is in [`SimMm`]'s module docs), and
//!   flush the secondary TLBs where the primary TLB is flushed.
//! * The OOM reaper (`oom_reaper.rs`): [`OomReaper`] walks the VMAs with non-blocking starts,
//!   skips refused VMAs with neither unmap nor end, retries ten times 100 ms apart on a
//!   [`Clock`] (`clock.rs`, simulated in tests), then marks the address space "OOM skip";
//!   [`process_mrelease`] answers [`SimError::TryAgain`].
//! * Secondary MMUs (`secondary/`): [`KvmLike`], [`GruLike`], [`NouveauLike`], [`HmmMirror`]
//!   and [`SvaLike`], each a page or two of code with a shadow table filled from the
//!   [`SimMm`]'s page table by its own fault path. Every wait is bounded; one that runs out is
//!   recorded as a hang.
//! * The oracle (`oracle.rs`): [`oracle::check`] compares every mirror with the primary and
//!   checks start/end balance, in-flight counters, the interval epoch and hangs, returning
//!   typed [`Violation`]s.
//! * Torture (`torture/`): [`torture::run`] drives random concurrent operations against one
//!   address space with fault-injecting subscribers, checks the oracle at quiet points, and
//!   shrinks a failing history to a short single-threaded replay.
//! * Scenarios (`scenario.rs`): [`run`] runs a [`Scenario`] under a [`Policy`] and returns a
//!   [`ScenarioReport`] of facts read from state at the end, with the event log (`trace.rs`)
//!   for trace export.
//!
//! # Example: the seed bug, under each policy
//!
//! ```
//! use mmnotify::Policy;
//! use mmnotify_sim::{run, FaultOutcome, Scenario};
//!
//! let legacy = run(Scenario::Seed, Policy::Legacy);
//! assert!(legacy.kvm.unwrap().in_progress > 0);          // ends were lost
//! assert!(legacy.gru.unwrap().fault.is_hung());           // GRU's fault would sleep forever
//!
//! let exact = run(Scenario::Seed, Policy::Exact);
//! assert_eq!(exact.kvm.unwrap().in_progress, 0);
//! assert!(matches!(exact.gru.unwrap().fault, FaultOutcome::Mapped(_)));
//! assert!(exact.is_coherent());
//! ```
//!
//! # Time
//!
//! The reaper's pauses go through a [`Clock`]; the bounded waits that detect hangs are real
//! waits of [`ScenarioConfig::hang_timeout`] (150 ms by default), so a scenario under all three
//! policies takes well under a second.

#![forbid(unsafe_code)]

mod clock;
mod error;
mod frames;
mod mm;
mod oom_reaper;
pub mod oracle;
mod page_table;
mod scenario;
pub mod secondary;
mod sync;
pub mod torture;
mod trace;
mod vma;

pub use clock::{Clock, RealClock, SimClock};
pub use error::SimError;
pub use frames::{CacheObject, FrameId, Frames};
pub use mm::{
    MigrateReport, ReapPass, ReclaimReport, SimMm, SubscriberKind, SubscriberReport, Task,
    MMAP_BASE,
};
pub use mmnotify::Policy;
pub use oom_reaper::{
    process_mrelease, OomReaper, ReapAttempt, ReapReport, MAX_OOM_REAP_RETRIES, OOM_REAP_INTERVAL,
};
pub use oracle::Violation;
pub use page_table::{PageTable, Pte};
pub use scenario::{
    run, run_with, GruFacts, KvmFacts, MirrorFacts, Scenario, ScenarioConfig, ScenarioReport,
    StepReport, UnknownScenario,
};
pub use secondary::{
    FaultOutcome, GruLike, GuestAccess, Hang, HmmMirror, KvmLike, NouveauLike, SecondaryMmu,
    ShadowEntry, ShadowTable, SvaLike, WaitOutcome,
};
pub use trace::{
    CountsHandle, RecordedCounts, RecordingInterval, RecordingSubscriber, TraceEvent, TraceKind,
    TraceLog,
};
pub use vma::{
    addr_of, vpn_of, Access, Backing, FileId, Prot, Sharing, Vma, VmaSet, PAGE_SHIFT, PAGE_SIZE,
};
