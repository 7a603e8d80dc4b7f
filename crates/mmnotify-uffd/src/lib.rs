//! A userfaultfd event source that drives an [`mmnotify::Mm`] from this process's own
//! address space (Linux ≥ 5.11, unprivileged).
//!
//! The engine crate is exact about invalidations, but only hears what its caller tells it.
//! This crate makes the kernel tell it: the process's one [`Watcher`] owns a userfaultfd,
//! registers the memory it is asked to [`watch`](Watcher::watch) in write-protect-only mode
//! (never write-protecting anything, so no fault is ever trapped: a pure observer), and turns
//! the kernel's UNMAP, REMOVE and REMAP messages into invalidations of its engine `Mm`:
//!
//! | userfaultfd message | engine invalidation |
//! |---|---|
//! | UNMAP `[start, end)` (munmap, mremap shrink, MAP_FIXED over, brk shrink) | `Event::Unmap` on `[start, end)` |
//! | REMOVE `[start, end)` (madvise DONTNEED/FREE/REMOVE) | `Event::Clear` on `[start, end)` |
//! | REMAP `from → to`, `len` (mremap move) | `Event::Unmap` on `[from, from + len)` |
//! | FORK (only with [`ForkEvents`] on) | `Event::ProtectionPage` on `Range::ALL` |
//!
//! Interval subscribers inserted through [`Watcher::insert_interval`] get a
//! [`WatchedInterval`] whose `read_begin`/`read_retry` add the one guarantee the kernel's
//! ordering does not give by itself: **once a call that unmaps, removes or remaps watched
//! memory has returned, a fill that began before it cannot be committed** (docs/SEMANTICS.md
//! §9). The reading thread never runs user code (a callback that frees memory would otherwise
//! wait for itself); a dispatching thread does. The watcher *fails closed*: after a fork,
//! a reader death or a lost descriptor, `read_retry` always reports a collision and
//! `read_begin` returns a typed error.
//!
//! userfaultfd is blind to some changes (`shmdt`, hole punches, `ftruncate`, guard pages,
//! migration, COW, swap); the [cooperative wrappers](Watcher::munmap) bracket the caller's
//! own calls with a real start and end, which also gives a *pre*-notification. docs/UFFD.md
//! has the full table of operation → event → what mmnotify does.
//!
//! # Map of the crate
//!
//! | concept | file |
//! |---|---|
//! | the watcher: creation, API, shutdown | `watcher.rs` |
//! | the reader and dispatcher threads, message → invalidation | `threads.rs` |
//! | REMOVE: holding the invalidation across the zap | `zap.rs` |
//! | `watch`: whole-VMA registration and its typed results | `watch.rs` |
//! | the read→delivery gate, health and fork detection | `gate.rs` |
//! | the filler's handle | `interval.rs` |
//! | reader → dispatcher hand-off | `handoff.rs` |
//! | cooperative wrappers | `coop.rs` |
//! | the userfaultfd system interface | `sys.rs` |
//! | `/proc/self/smaps` | `maps.rs` |
//! | `/proc/self/pagemap`: what backs a page | `pagemap.rs` |
//! | errors | `error.rs` |

#![cfg(target_os = "linux")]

mod coop;
mod error;
mod gate;
mod handoff;
mod interval;
pub mod maps;
pub mod pagemap;
mod sync;
mod sys;
mod threads;
mod watch;
mod watcher;
mod zap;

pub use coop::{advice_invalidates, file_mappings};
pub use error::{Error, FailReason, Result};
pub use gate::Health;
pub use interval::{WatchSeq, WatchedInterval};
#[cfg(feature = "fault-injection")]
pub use watch::set_before_register_hook;
pub use watch::{SkipReason, Skipped, WatchOutcome, WatchReport, WatchedVma};
#[cfg(feature = "fault-injection")]
pub use watcher::{fail_next_dispatcher_spawn, Fault};
pub use watcher::{
    Features, ForkEvents, Remap, Watcher, WatcherOptions, WatcherStats, MAX_QUEUE_CAPACITY,
    MAX_READ_BATCH, MAX_REMOVE_SETTLE,
};

/// The system page size, in bytes.
pub fn page_size() -> u64 {
    sys::page_size()
}
