//! The short run behind `mmnotify bench`: every figure, its baseline measured in the same
//! run, the ratio, and the targets with met / missed.
//!
//! Ratios are always *figure ÷ baseline*. For costs (ns) lower is better and a ratio of 3
//! means "three times what the quick implementation costs"; for speed-ups (×) higher is
//! better.

use std::hint::black_box;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use crate::alloc;
use crate::fixtures::{self, ClassicFixture, IntervalFixture, ReadFixture, Rng, ScalingFixture};
use crate::measure::{self, Budget, PaddedCounters, Scaling, Stream};

/// What to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Config {
    /// The quick variant: shorter batches, interval sizes 1e3/1e4/1e5 instead of 1e3/1e5/1e6.
    pub quick: bool,
}

impl Config {
    /// The timing budget.
    pub fn budget(&self) -> Budget {
        if self.quick {
            Budget::QUICK
        } else {
            Budget::FULL
        }
    }

    /// The interval counts of figure (b).
    pub fn interval_sizes(&self) -> [u64; 3] {
        if self.quick {
            [1_000, 10_000, 100_000]
        } else {
            [1_000, 100_000, 1_000_000]
        }
    }
}

/// Classic subscriber counts of figure (a).
pub const SUBSCRIBER_COUNTS: [usize; 4] = [0, 1, 8, 64];
/// Hit counts of figure (b).
pub const HIT_COUNTS: [u64; 3] = [0, 1, 16];

/// The unit of a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds per operation (lower is better).
    Ns,
    /// A speed-up factor (higher is better).
    Speedup,
    /// Heap allocations per operation.
    Allocs,
}

impl Unit {
    /// The unit's symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            Unit::Ns => "ns",
            Unit::Speedup => "x",
            Unit::Allocs => "allocs",
        }
    }
}

/// The yardstick of a figure.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// What it is.
    pub name: String,
    /// Its value, in the figure's unit.
    pub value: f64,
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Short identifier, e.g. `a/start_end/8`.
    pub id: String,
    /// What was measured.
    pub figure: String,
    /// The engine's value.
    pub value: f64,
    /// Its unit.
    pub unit: Unit,
    /// The baseline measured in the same run, if the figure has one.
    pub baseline: Option<Baseline>,
}

impl Row {
    /// `value ÷ baseline`.
    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .filter(|b| b.value > 0.0)
            .map(|b| self.value / b.value)
    }
}

/// One point of chart (b).
#[derive(Debug, Clone, Copy)]
pub struct IntervalPoint {
    /// Intervals in the index.
    pub n: u64,
    /// Intervals each invalidation hits.
    pub hits: u64,
    /// Engine: ns per invalidation (start and end).
    pub engine_ns: f64,
    /// Naive list: ns per scan.
    pub naive_ns: f64,
    /// Engine, the same range every time (cache-hot walk); measured for 1 hit only.
    pub engine_hot_ns: Option<f64>,
}

/// One series of chart (e).
#[derive(Debug, Clone)]
pub struct ScalingSeries {
    /// What ran.
    pub name: String,
    /// Operations per second with one thread.
    pub one: f64,
    /// Operations per second with two threads.
    pub two: f64,
    /// Rounds in which every thread had a core, with 1 and with 2 threads.
    pub qualifying: (usize, usize),
    /// Rounds run per thread count.
    pub rounds: usize,
    /// Whether enough rounds qualified for the figure to mean something.
    pub trustworthy: bool,
}

impl ScalingSeries {
    /// Two threads ÷ one thread.
    pub fn ratio(&self) -> f64 {
        self.two / self.one
    }
}

/// Whether a target was met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Met.
    Met,
    /// Missed.
    Missed,
    /// Not measured in this run.
    NotMeasured,
}

impl Verdict {
    fn from_bool(met: bool) -> Self {
        if met {
            Verdict::Met
        } else {
            Verdict::Missed
        }
    }

    /// `met`, `MISSED` or `n/a`.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::NotMeasured => "n/a",
        }
    }
}

/// One target of the issue and how this run did.
#[derive(Debug, Clone)]
pub struct TargetCheck {
    /// The target, as the issue states it.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Met or missed.
    pub verdict: Verdict,
}

/// The machine the run happened on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Logical CPUs available to the process.
    pub nproc: usize,
    /// The CPU model from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// `/proc/loadavg` when the run began.
    pub load_before: String,
    /// `/proc/loadavg` when the run ended.
    pub load_after: String,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

impl Machine {
    /// This machine now (`load_after` left empty, for the caller to fill when the run ends).
    pub fn current() -> Machine {
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpu_model(),
            load_before: loadavg(),
            load_after: String::new(),
        }
    }

    /// `/proc/loadavg` now.
    pub fn loadavg() -> String {
        loadavg()
    }
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Whether it was the quick variant.
    pub quick: bool,
    /// The machine.
    pub machine: Machine,
    /// The table.
    pub rows: Vec<Row>,
    /// Chart (b): cost vs number of intervals.
    pub intervals: Vec<IntervalPoint>,
    /// Chart (e): one vs two threads.
    pub scaling: Vec<ScalingSeries>,
    /// The targets.
    pub targets: Vec<TargetCheck>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Report {
    /// The row with this id.
    pub fn row(&self, id: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.id == id)
    }

    fn value(&self, id: &str) -> Option<f64> {
        self.row(id).map(|r| r.value)
    }
}

fn ns_row(id: String, figure: String, value: f64, baseline: Option<(&str, f64)>) -> Row {
    Row {
        id,
        figure,
        value,
        unit: Unit::Ns,
        baseline: baseline.map(|(name, value)| Baseline {
            name: name.to_string(),
            value,
        }),
    }
}

/// Runs every figure; `log` receives one line per step, for progress output.
pub fn run(config: &Config, log: &mut dyn FnMut(&str)) -> Report {
    let began = Instant::now();
    let budget = config.budget();
    let machine = Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: cpu_model(),
        load_before: loadavg(),
        load_after: String::new(),
    };
    let mut rows = Vec::new();

    // --- the floor -----------------------------------------------------------------------
    log("floor: one AtomicU64 load");
    let word = AtomicU64::new(7);
    let floor = measure::ns_per_op(&budget, || {
        crate::baseline::atomic_load_floor(&word);
    });
    rows.push(ns_row(
        "floor/atomic_load".into(),
        "one AtomicU64 load (black_box)".into(),
        floor,
        None,
    ));

    // --- the building blocks --------------------------------------------------------------
    let prim = crate::baseline::Primitives::default();
    let blocks: [(&str, &str, &dyn Fn()); 6] = [
        ("p/rmw", "one uncontended fetch_add (locked RMW)", &|| {
            prim.rmw()
        }),
        ("p/fence", "one fence(SeqCst)", &|| prim.fence()),
        ("p/mutex", "std Mutex lock+unlock, uncontended", &|| {
            prim.mutex_pair()
        }),
        (
            "p/rwlock_read",
            "std RwLock read lock+unlock, uncontended",
            &|| prim.rwlock_read_pair(),
        ),
        ("p/arc", "Arc clone+drop", &|| prim.arc_clone_drop()),
        (
            "p/notify_all",
            "std Condvar::notify_all, nobody waiting",
            &|| prim.notify_all_nobody_waits(),
        ),
    ];
    for (id, what, body) in blocks {
        log(&format!("building block: {what}"));
        let ns = measure::ns_per_op(&budget, body);
        rows.push(ns_row(
            id.into(),
            what.into(),
            ns,
            Some(("atomic-load floor", floor)),
        ));
    }

    // --- (a) start + end -------------------------------------------------------------------
    let range = fixtures::fixed_range();
    for n in SUBSCRIBER_COUNTS {
        log(&format!("(a) start+end, {n} classic subscribers"));
        let f = ClassicFixture::new(n);
        let engine = measure::ns_per_op(&budget, || fixtures::start_end(&f.mm, range));
        let naive = measure::ns_per_op(&budget, || fixtures::naive_start_end(&f.naive, range));
        let baseline = if n == 0 {
            ("atomic-load floor", floor)
        } else {
            ("RwLock<Vec<Arc<dyn>>> dispatcher", naive)
        };
        rows.push(ns_row(
            format!("a/start_end/{n}"),
            format!("start+end, {n} no-op subscribers"),
            engine,
            Some(baseline),
        ));
        if n == 0 {
            rows.push(ns_row(
                "a/start_end/0/vs_naive".into(),
                "start+end, 0 subscribers (vs naive dispatcher)".into(),
                engine,
                Some(("RwLock<Vec<Arc<dyn>>> dispatcher", naive)),
            ));
        }
        let allocs = alloc::allocations_per_call(1_000, || fixtures::start_end(&f.mm, range));
        if let Some(allocs) = allocs {
            rows.push(Row {
                id: format!("a/allocs/{n}"),
                figure: format!("heap allocations per start+end, {n} subscribers"),
                value: allocs,
                unit: Unit::Allocs,
                baseline: None,
            });
        }
    }

    // --- (b) interval invalidation -----------------------------------------------------------
    let mut intervals = Vec::new();
    let sizes = config.interval_sizes();
    let mut smallest: Option<IntervalFixture> = None;
    for n in sizes {
        log(&format!("(b) building {n} intervals"));
        let f = IntervalFixture::build(n);
        for hits in HIT_COUNTS {
            log(&format!("(b) invalidate, {n} intervals, {hits} hit"));
            let mut cycle = f.cycle(hits);
            let engine =
                measure::ns_per_op(&budget, || fixtures::invalidate_next(&f.mm, &mut cycle));
            let mut cycle = f.cycle(hits);
            let naive = measure::ns_per_op(&budget, || {
                fixtures::naive_invalidate_next(&f.naive, &mut cycle)
            });
            rows.push(ns_row(
                format!("b/invalidate/{n}/{hits}"),
                format!("invalidation, {n} intervals, {hits} hit"),
                engine,
                Some(("linear-scan Vec<(start,last)>", naive)),
            ));
            let engine_hot_ns = (hits == 1).then(|| {
                let mut hot = f.hot_cycle(hits);
                let ns = measure::ns_per_op(&budget, || fixtures::invalidate_next(&f.mm, &mut hot));
                rows.push(ns_row(
                    format!("b/invalidate_hot/{n}/{hits}"),
                    format!("invalidation, {n} intervals, {hits} hit, same range every time (cache-hot)"),
                    ns,
                    Some(("engine, random positions", engine)),
                ));
                ns
            });
            intervals.push(IntervalPoint {
                n,
                hits,
                engine_ns: engine,
                naive_ns: naive,
                engine_hot_ns,
            });
        }
        if n == sizes[0] {
            let mut cycle = f.cycle(16);
            if let Some(allocs) =
                alloc::allocations_per_call(1_000, || fixtures::invalidate_next(&f.mm, &mut cycle))
            {
                rows.push(Row {
                    id: format!("b/allocs/{n}/16"),
                    figure: format!("heap allocations per invalidation, {n} intervals, 16 hit"),
                    value: allocs,
                    unit: Unit::Allocs,
                    baseline: None,
                });
            }
            smallest = Some(f);
        } else {
            log(&format!("(b) dropping {n} intervals"));
            drop(f);
        }
    }

    // --- (c) read side -------------------------------------------------------------------------
    log("(c) read_begin + read_retry, uncontended");
    let rf = ReadFixture::new();
    let uncontended = measure::ns_per_op(&budget, || {
        fixtures::read_pair(&rf.handle);
    });
    rows.push(ns_row(
        "c/read_pair/uncontended".into(),
        "read_begin+read_retry, uncontended".into(),
        uncontended,
        Some(("atomic-load floor", floor)),
    ));
    if let Some(allocs) = alloc::allocations_per_call(1_000, || {
        fixtures::read_pair(&rf.handle);
    }) {
        rows.push(Row {
            id: "c/allocs".into(),
            figure: "heap allocations per read_begin+read_retry".into(),
            value: allocs,
            unit: Unit::Allocs,
            baseline: None,
        });
    }
    for (name, stream_range) in [("disjoint", rf.disjoint), ("overlapping", rf.overlapping)] {
        log(&format!(
            "(c) read_begin + read_retry, {name} invalidation stream"
        ));
        let stream = Stream::start(rf.mm.clone(), stream_range);
        let (mut calls, mut retries) = (0u64, 0u64);
        let ns = measure::ns_per_op_median(&budget, || {
            calls += 1;
            retries += u64::from(fixtures::read_pair(&rf.handle));
        });
        let invalidations = stream.stop();
        let retry_pct = 100.0 * retries as f64 / calls.max(1) as f64;
        rows.push(ns_row(
            format!("c/read_pair/{name}"),
            format!(
                "read_begin+read_retry, {name} stream, median ({retry_pct:.1}% retried; stream made {invalidations} invalidations)"
            ),
            ns,
            Some(("uncontended read pair", uncontended)),
        ));
    }
    drop(rf);

    // --- (d) churn -----------------------------------------------------------------------------
    log("(d) register + unregister");
    let cf = ClassicFixture::new(1);
    let engine = measure::ns_per_op(&budget, || fixtures::register_unregister(&cf.mm));
    let naive = measure::ns_per_op(&budget, || fixtures::naive_register_unregister(&cf.naive));
    rows.push(ns_row(
        "d/register_unregister".into(),
        format!(
            "register+unregister, 1 other subscriber ({:.0} k pairs/s)",
            1e6 / engine
        ),
        engine,
        Some(("RwLock<Vec<Arc<dyn>>> dispatcher", naive)),
    ));
    drop(cf);
    if let Some(f) = smallest.take() {
        log(&format!("(d) insert + remove among {} intervals", f.n));
        let mut rng = Rng::new(0xd1);
        let engine = measure::ns_per_op(&budget, || fixtures::insert_remove(&f.mm, rng.below(f.n)));
        let mut rng = Rng::new(0xd1);
        let naive = measure::ns_per_op(&budget, || {
            fixtures::naive_insert_remove(&f.naive, rng.below(f.n))
        });
        rows.push(ns_row(
            format!("d/insert_remove/{}", f.n),
            format!(
                "insert+remove interval among {} ({:.0} k pairs/s)",
                f.n,
                1e6 / engine
            ),
            engine,
            Some(("linear-scan Vec<(start,last)>", naive)),
        ));
    }

    // --- (e) scaling ---------------------------------------------------------------------------
    log("(e) one vs two threads, disjoint ranges, 1 subscriber");
    let sf = ScalingFixture::new();
    let engine = measure::scaling_pair(&budget, |t| {
        fixtures::start_end(&sf.mm, ScalingFixture::range(t))
    });
    log("(e) the same with the naive dispatcher");
    let naive = measure::scaling_pair(&budget, |t| {
        fixtures::naive_start_end(&sf.naive, ScalingFixture::range(t))
    });
    log("(e) control: independent per-thread counters");
    let counters = PaddedCounters::default();
    let control = measure::scaling_pair(&budget, |t| counters.bump(black_box(t)));
    let series = |name: &str, s: &Scaling| ScalingSeries {
        name: name.into(),
        one: s.one,
        two: s.two,
        qualifying: s.qualifying,
        rounds: s.rounds,
        trustworthy: s.trustworthy,
    };
    let scaling = vec![
        series("engine start+end", &engine),
        series("naive dispatcher", &naive),
        series("control (no sharing)", &control),
    ];
    let rounds_note = |s: &Scaling| {
        format!(
            "{}/{} rounds with a core per thread{}",
            s.qualifying.1,
            s.rounds,
            if s.trustworthy {
                ""
            } else {
                "; too few: all rounds used"
            }
        )
    };
    rows.push(ns_row(
        "e/start_end/1thread".into(),
        format!("start+end, 1 thread ({:.2} M ops/s)", engine.one / 1e6),
        1e9 / engine.one,
        Some(("naive dispatcher, 1 thread", 1e9 / naive.one)),
    ));
    rows.push(ns_row(
        "e/start_end/2threads".into(),
        format!(
            "start+end, 2 threads, per op of the pair ({:.2} M ops/s)",
            engine.two / 1e6
        ),
        1e9 / engine.two,
        Some(("naive dispatcher, 2 threads", 1e9 / naive.two)),
    ));
    rows.push(Row {
        id: "e/scaling".into(),
        figure: format!("2 threads / 1 thread, engine ({})", rounds_note(&engine)),
        value: engine.ratio(),
        unit: Unit::Speedup,
        baseline: Some(Baseline {
            name: "naive dispatcher's scaling".into(),
            value: naive.ratio(),
        }),
    });
    rows.push(Row {
        id: "e/scaling/control".into(),
        figure: format!(
            "2 threads / 1 thread, control: no sharing ({})",
            rounds_note(&control)
        ),
        value: control.ratio(),
        unit: Unit::Speedup,
        baseline: Some(Baseline {
            name: "ideal".into(),
            value: 2.0,
        }),
    });
    drop(sf);

    let mut report = Report {
        quick: config.quick,
        machine: Machine {
            load_after: loadavg(),
            ..machine
        },
        rows,
        intervals,
        scaling,
        targets: Vec::new(),
        elapsed: Duration::ZERO,
    };
    report.targets = targets(&report, sizes);
    report.elapsed = began.elapsed();
    report
}

fn targets(r: &Report, sizes: [u64; 3]) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    let v = |id: &str| r.value(id).unwrap_or(f64::NAN);
    let floor = v("floor/atomic_load");

    let a0 = v("a/start_end/0");
    out.push(TargetCheck {
        target: "(a) no subscriber: within 2x the atomic-load floor".into(),
        measured: format!("{a0:.1} ns = {:.1}x the {floor:.2} ns floor", a0 / floor),
        verdict: Verdict::from_bool(a0 <= 2.0 * floor),
    });
    let a1 = v("a/start_end/1");
    out.push(TargetCheck {
        target: "(a) one subscriber: under 50 ns".into(),
        measured: format!("{a1:.1} ns"),
        verdict: Verdict::from_bool(a1 < 50.0),
    });
    let a8 = v("a/start_end/8");
    let a64 = v("a/start_end/64");
    let per_extra = (a64 - a1) / 63.0;
    out.push(TargetCheck {
        target: "(a) at most 5 ns per extra subscriber".into(),
        measured: format!(
            "{per_extra:.2} ns (1 -> 64 subscribers); {:.2} ns (1 -> 8)",
            (a8 - a1) / 7.0
        ),
        verdict: Verdict::from_bool(per_extra <= 5.0),
    });
    let allocs: Vec<f64> = SUBSCRIBER_COUNTS
        .iter()
        .filter_map(|n| r.value(&format!("a/allocs/{n}")))
        .collect();
    out.push(if allocs.len() == SUBSCRIBER_COUNTS.len() {
        let worst = allocs.iter().copied().fold(0.0, f64::max);
        TargetCheck {
            target: "(a) zero allocations (0, 1, 8, 64 subscribers)".into(),
            measured: format!("at most {worst} allocations per start+end"),
            verdict: Verdict::from_bool(worst == 0.0),
        }
    } else {
        TargetCheck {
            target: "(a) zero allocations (0, 1, 8, 64 subscribers)".into(),
            measured: "counting allocator not installed in this binary".into(),
            verdict: Verdict::NotMeasured,
        }
    });

    let largest = sizes[2];
    let b1 = v(&format!("b/invalidate/{largest}/1"));
    out.push(if largest >= 1_000_000 {
        TargetCheck {
            target: "(b) 1e6 intervals, 1 hit: under 1 us".into(),
            measured: format!("{b1:.0} ns"),
            verdict: Verdict::from_bool(b1 < 1_000.0),
        }
    } else {
        TargetCheck {
            target: "(b) 1e6 intervals, 1 hit: under 1 us".into(),
            measured: format!("--quick stops at {largest} intervals: {b1:.0} ns there"),
            verdict: Verdict::NotMeasured,
        }
    });
    let small = sizes[0];
    let growth = b1 / v(&format!("b/invalidate/{small}/1"));
    let naive_growth = r
        .row(&format!("b/invalidate/{largest}/1"))
        .and_then(|row| row.baseline.as_ref())
        .map(|b| b.value)
        .unwrap_or(f64::NAN)
        / r.row(&format!("b/invalidate/{small}/1"))
            .and_then(|row| row.baseline.as_ref())
            .map(|b| b.value)
            .unwrap_or(f64::NAN);
    let log_ratio = (largest as f64).log2() / (small as f64).log2();
    let hot_growth =
        v(&format!("b/invalidate_hot/{largest}/1")) / v(&format!("b/invalidate_hot/{small}/1"));
    out.push(TargetCheck {
        target: "(b) cost grows with log n (1 hit), cache-hot: the same range every time".into(),
        measured: format!(
            "x{hot_growth:.2} from {small} to {largest} intervals (log n grows x{log_ratio:.2}, n x{})",
            largest / small
        ),
        verdict: Verdict::from_bool(hot_growth <= log_ratio),
    });
    out.push(TargetCheck {
        target: "(b) cost grows with log n (1 hit), random positions".into(),
        measured: format!(
            "x{growth:.2} from {small} to {largest} intervals (log n grows x{log_ratio:.2}; the linear scan grew x{naive_growth:.0})"
        ),
        verdict: Verdict::from_bool(growth <= log_ratio),
    });

    let c = v("c/read_pair/uncontended");
    out.push(TargetCheck {
        target: "(c) read_begin+read_retry under 10 ns uncontended".into(),
        measured: format!("{c:.1} ns"),
        verdict: Verdict::from_bool(c < 10.0),
    });

    let e = v("e/scaling");
    let control = v("e/scaling/control");
    let trustworthy = r.scaling.iter().all(|s| s.trustworthy);
    out.push(TargetCheck {
        target: "(e) two threads at least 1.6x one thread (disjoint ranges)".into(),
        measured: format!(
            "x{e:.2} (the no-sharing control got x{control:.2} on this machine in the same run)"
        ),
        verdict: if !trustworthy {
            // Too few rounds in which every thread had its own core.
            Verdict::NotMeasured
        } else if e >= 1.6 {
            Verdict::Met
        } else if control < 1.6 {
            // The machine did not give two free cores even to threads that share nothing.
            Verdict::NotMeasured
        } else {
            Verdict::Missed
        },
    });
    out
}
