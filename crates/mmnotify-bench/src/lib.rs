//! Benchmark bodies, fixtures and naive baselines for `mmnotify`.
//!
//! One crate holds everything a measurement needs, so that `cargo bench -p mmnotify` (criterion,
//! in `crates/mmnotify/benches/`) and `mmnotify bench` (the CLI's short run with a table and
//! SVG charts) time *the same code*:
//!
//! * [`fixtures`]: no-op subscribers, address spaces with `n` subscribers or `n` intervals, the
//!   query ranges that hit exactly 0, 1 or 16 intervals, and one function per measured
//!   operation (the *bodies*);
//! * [`baseline`]: what a quick implementation would do: an atomic-load floor, a
//!   `RwLock<Vec<Arc<dyn Trait>>>` dispatcher and a linearly scanned interval list. They are
//!   written plainly on purpose, as the yardstick every engine figure is divided by;
//! * [`measure`]: a small timing harness (low percentile of short batches; threads started on a barrier)
//!   and background invalidation streams for the contended figures;
//! * [`alloc`]: a counting global allocator, to check that the fast paths allocate nothing;
//! * [`rcache`]: the registration cache's figures next to a UCX-like cache;
//! * [`suite`]: the whole short run behind `mmnotify bench`, returning figures, baselines,
//!   ratios and the targets with met/missed.
//!
//! The method and the latest results are in `docs/PERFORMANCE.md`.

// The baselines are deliberately written with std's locks (that is what they measure); the
// loom shim that `clippy.toml` points to is the engine's, not ours.
#![allow(clippy::disallowed_types)]

pub mod alloc;
pub mod baseline;
pub mod fixtures;
pub mod measure;
pub mod rcache;
pub mod suite;
