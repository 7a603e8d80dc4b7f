//! The C API of mmnotify: `libmmnotify.so` / `libmmnotify.a` and `include/mmnotify.h`
//! (generated from this crate by cbindgen; `tests/header.rs` fails when it is out of date).
//!
//! It is shaped like what C libraries with registration caches already call, so that
//! replacing their memory monitor is a small patch (README: "Replacing your memory monitor"):
//!
//! | C API | Rust underneath | UCX / libfabric |
//! |---|---|---|
//! | `mmn_init` / `mmn_fini`, `mmn_features`, `mmn_watch` | `mmnotify_uffd::Watcher` | `ucm` init, `ofi_monitor_start/stop` |
//! | `mmn_munmap`, `mmn_madvise`, `mmn_mremap`, `mmn_shmdt`, `mmn_punch_hole`, `mmn_ftruncate` | the watcher's cooperative wrappers | libc hooks (`ucm_munmap`, memhooks) |
//! | `mmn_subscribe` / `mmn_unsubscribe`, `mmn_read_begin` / `mmn_read_retry` | engine interval subscriptions + `WatchedInterval` | `ucm_set_event_handler`, `ofi_monitor_subscribe` |
//! | `mmn_rcache_*`, `mmn_region_*` | `mmnotify_rcache::Cache` | `ucs_rcache_*`, `ofi_mr_cache_*` |
//!
//! # The boundary's rules (each enforced in one place)
//!
//! * **Nothing unwinds into C**: every entry point runs under `error::ffi` (`catch_unwind`);
//!   a panic becomes `MMN_EPANIC`. The callbacks into C are called from the engine, the
//!   watcher and the cache, which already catch panics around subscriber and registrar code.
//! * **Errors are codes plus a sentence**: negative errno-style codes (`error.rs`), and the
//!   failing values in the thread-local `mmn_last_error()`.
//! * **No raw pointers as handles**: objects live in generation-counted tables
//!   (`handle.rs`); a stale, foreign or zero handle is `MMN_EBADF`.
//! * **Every pointer argument is checked for NULL** (`MMN_EFAULT`).
//! * **Calls that would wait for themselves are refused** (`MMN_EDEADLK`): unsubscribing from
//!   the subscription's own callback, `mmn_read_begin` in a callback, destroying a cache or
//!   finishing the library from a callback.
//!
//! | concept | file |
//! |---|---|
//! | codes, `mmn_strerror`, last error, the `ffi` wrapper | `error.rs` |
//! | handle tables | `handle.rs` |
//! | init / fini, features, watch, cooperative wrappers | `process.rs` |
//! | interval subscriptions and the collision-retry pair | `interval.rs` |
//! | the registration cache | `rcache.rs` |

#![cfg(target_os = "linux")]
// The entry points are `extern "C"` functions for C callers, whose pointer contracts are
// written in the header; the crate builds no rlib, so no Rust caller exists that an `unsafe fn`
// marker would protect. Every dereference sits in an `unsafe` block with its SAFETY comment.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod error;
mod handle;
mod interval;
mod process;
mod rcache;
mod sync;

pub use error::*;
pub use interval::*;
pub use process::*;
pub use rcache::*;
