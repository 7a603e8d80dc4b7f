//! A registration cache that never hands out a stale registration.
//!
//! RDMA, GPU and io_uring libraries register user buffers with a device (pinning their pages,
//! which is expensive) and cache the registration by virtual address. When the memory behind
//! the address changes (`munmap`, `madvise`, `mremap`, `MAP_FIXED`, `brk`, `shmdt`, a hole
//! punch), the registration still names the *old* pages: a cache hit then makes the device
//! read or write memory the process no longer maps there, silently. Peers miss some of these
//! paths (UCX misses a raw `syscall(SYS_munmap)`; under remap races it keeps stale
//! registrations). This crate closes every path the kernel reports and refuses to cache
//! memory whose changes it cannot see:
//!
//! * [`Cache::get`] returns a [`RegionGuard`] (the registration handle and the page-aligned
//!   range it covers); dropping it is the put. Hits are validated by the interval
//!   collision-retry protocol of [`mmnotify`], fed by the process's userfaultfd watcher
//!   ([`mmnotify_uffd`]) or by any engine `Mm` ([`EventSource`]). A hit after an invalidating
//!   call has returned is impossible; an invalidated region is never handed out again, stays
//!   registered for its holders, and is deregistered at its last put.
//! * Overlapping and adjacent requests merge into one registration (configurable); limits on
//!   regions and bytes evict unused regions in LRU order.
//! * [`Registrar`]s do the registering, never under a lock the invalidation path needs; their
//!   errors and panics reach the caller typed. Two ship: [`UringRegistrar`] (io_uring fixed
//!   buffers: real pinning, with `READ_FIXED`/`WRITE_FIXED` helpers) and [`FrameRegistrar`]
//!   (records page frames: the ground truth of the tests).
//! * Memory the watcher is blind to (SysV shm, file mappings) is recognised at
//!   registration and, by [`BlindSpotPolicy`], not cached or validated on every hit.
//!
//! # Map of the crate
//!
//! | concept | file |
//! |---|---|
//! | the cache: hit and miss paths, limits, flush, drop | `cache.rs` |
//! | a region's state word and its invalidation callback | `region.rs` |
//! | the region guard (the put, invalidation queries) | `guard.rs` |
//! | event sources (watcher or `Mm`) | `source.rs` |
//! | memory the watcher cannot see | `blind.rs` |
//! | which memory is watched already | `watched.rs` |
//! | the registrar trait | `registrar.rs` |
//! | io_uring fixed buffers | `uring.rs` |
//! | page frames | `frames.rs` |
//! | ranges and access rights | `range.rs` |
//! | statistics | `stats.rs` |
//! | errors | `error.rs` |

#![cfg(target_os = "linux")]

mod blind;
mod cache;
pub mod check;
mod error;
mod frames;
mod guard;
mod range;
mod region;
mod registrar;
mod source;
mod stats;
mod sync;
mod uring;
mod watched;

pub use blind::{BlindReason, BlindSpotPolicy};
pub use cache::{Cache, Config};
pub use error::{Error, Refusal, RegistrarError, Result};
pub use frames::{FrameBooks, FrameError, FrameRecord, FrameRegistrar};
pub use guard::RegionGuard;
pub use range::{page_size, Access, PageRange};
pub use registrar::Registrar;
pub use source::EventSource;
pub use stats::Stats;
pub use uring::{FixedBuffer, SlotBooks, UringError, UringRegistrar, MAX_FIXED_BUFFER};
