//! Shared helpers of the loom models: the model builder, a range constructor and a spin-wait.

use loom::sync::atomic::{AtomicUsize, Ordering};

use crate::Range;

/// The preemption bound every model runs with unless `LOOM_MAX_PREEMPTIONS` sets another one.
///
/// The single source of truth: `.ci/run` and the module docs defer to it. Three is what the
/// SRCU two-writer litmus model (`loom_srcu.rs`) needs to reach the interleaving it is about.
pub(super) const DEFAULT_PREEMPTION_BOUND: usize = 3;

/// Runs `f` under loom with a preemption bound of [`DEFAULT_PREEMPTION_BOUND`], unless
/// `LOOM_MAX_PREEMPTIONS` sets one (every other `LOOM_*` variable is honoured too), and
/// prints how many executions loom explored (visible with `--nocapture`).
pub(super) fn model<F>(f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    // Counts executions across loom's iterations, so it must not be a loom object.
    #[allow(clippy::disallowed_types, reason = "a counter outside the model")]
    type Counter = std::sync::atomic::AtomicUsize;

    // `Builder::new` reads the LOOM_* environment variables.
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(DEFAULT_PREEMPTION_BOUND);
    }
    let bound = builder.preemption_bound;
    let executions = std::sync::Arc::new(Counter::new(0));
    let counter = executions.clone();
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    eprintln!(
        "loom: {} executions explored (preemption bound {bound:?})",
        executions.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// `[start, end)`, which the models always build from valid bounds.
pub(super) fn range(start: u64, end: u64) -> Range {
    Range::new(start, end).expect("valid range")
}

/// Spins (yielding to loom's scheduler) until `flag` holds at least `value`.
pub(super) fn wait_for(flag: &AtomicUsize, value: usize) {
    while flag.load(Ordering::Acquire) < value {
        loom::thread::yield_now();
    }
}

/// Outcomes observed across all of a model's executions, so that a model can check that loom
/// really explored each side of its race (and is not passing because it never got there).
#[derive(Debug, Default)]
pub(super) struct Seen(SeenSet);

// A plain std lock: it records facts about executions, outside the model, and is never held
// across a loom operation.
#[allow(clippy::disallowed_types, reason = "bookkeeping outside the model")]
type SeenSet = std::sync::Mutex<std::collections::BTreeSet<&'static str>>;

impl Seen {
    /// A shared, empty record.
    pub(super) fn new() -> std::sync::Arc<Seen> {
        std::sync::Arc::default()
    }

    /// Records that an execution ended with `outcome`.
    pub(super) fn record(&self, outcome: &'static str) {
        self.0.lock().unwrap().insert(outcome);
    }

    /// Asserts that every one of `expected` was observed in some execution.
    pub(super) fn assert_all(&self, expected: &[&'static str]) {
        let seen = self.0.lock().unwrap();
        for outcome in expected {
            assert!(
                seen.contains(outcome),
                "loom never explored the outcome {outcome:?} (saw {seen:?})"
            );
        }
    }
}
