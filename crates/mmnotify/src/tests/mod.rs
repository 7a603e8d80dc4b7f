//! In-crate model tests: loom (`RUSTFLAGS="--cfg loom"`) runs the real engine code.
//!
//! Run them with
//! `RUSTFLAGS="--cfg loom" cargo test -p mmnotify --lib --release loom`
//! (release makes loom much faster). Each model uses the preemption bound
//! `LOOM_MAX_PREEMPTIONS` names, or `loom_util::DEFAULT_PREEMPTION_BOUND` (3) when it is unset;
//! `.ci/run` leaves the variable to the caller. Without `--cfg loom` the `loom_*` modules are
//! not compiled; `release_skips` is a plain test, compiled only without `--cfg loom`.
//!
//! Two things loom cannot see, which the models work around:
//!
//! * `std::sync::Arc` is deliberately not shimmed, so the moment the last reference to a
//!   registration drops (and `free` runs) is invisible to loom's partial-order reduction: loom
//!   only preempts a thread at an operation that conflicts with another thread's. A model that
//!   needs a thread preempted *while holding* a snapshot gives it a loom-visible conflicting
//!   operation there (see `loom_put_to_zero_racing_callback`).
//! * Time: `Condvar::wait_timeout` ignores its timeout under loom, so no model uses
//!   `read_begin_timeout`.
//!
//! Most models also record which side of their race each execution took (`loom_util::Seen`)
//! and check afterwards that loom explored every side, so a model cannot pass by never
//! reaching the interleaving it is about.

#[cfg(loom)]
mod loom_util;

// A plain (non-loom) test that belongs with the models it complements.
#[cfg(not(loom))]
mod release_skips;

#[cfg(loom)]
mod loom_classic;

#[cfg(loom)]
mod loom_fastread;

#[cfg(loom)]
mod loom_harness;

#[cfg(loom)]
mod loom_interval;

#[cfg(loom)]
mod loom_nested;

#[cfg(loom)]
mod loom_policies;

#[cfg(loom)]
mod loom_srcu;

#[cfg(loom)]
mod loom_walks;
