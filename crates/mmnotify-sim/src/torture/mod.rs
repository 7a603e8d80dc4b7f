//! Torture: randomised concurrent stress of the whole system, with replayable failures.
//!
//! N worker threads draw random [`Op`]s from per-worker seeded generators and apply them to
//! one simulated address space (a [`World`] with a KVM-like, a GRU-like, a
//! nouveau-like, an HMM and an SVA-like mirror, subscribers that refuse, sleep and panic on
//! demand, and slots where the workload registers and removes subscribers and intervals):
//! faults from every mirror; munmap, mprotect, madvise, fork, migrate, reclaim, mremap; OOM
//! reaping; register, unregister, insert and remove.
//!
//! # Epochs, quiet checks
//!
//! Workers run epochs of [`TortureConfig::ops_per_epoch`] operations concurrently, then meet
//! at a barrier; there the address space is quiet (no invalidation in flight) and the checker
//! runs the [oracle](crate::oracle) (coherence of every mirror, start/end balance, in-flight
//! counters, the interval epoch, bounded waits that ran out) plus two checks of its own: the
//! panicking subscriber got as many ends as successful starts, and every panic it threw was
//! resumed on (and caught by) the worker whose operation triggered it. A bounded wait that
//! runs out ends the epoch early. Every [`TortureConfig::epochs_per_world`] epochs the world
//! is replaced by a fresh one, which bounds memory and the history to replay.
//!
//! # Replay and shrinking
//!
//! Operations name slots and pages by index, never state seen at run time, so every
//! sub-sequence of a history is a valid history. On a violation the run stops; the history of
//! the failing world is replayed single-threaded with the checker after every operation,
//! which cuts it at the first operation that shows a violation, and then chunks are removed
//! (delta debugging) while the same kind of violation persists. With one worker thread, a
//! seed produces the same history on every run.
//!
//! # Fault injection in the engine
//!
//! [`TortureConfig::mm_hook`] runs on every new hub, so that a test built with mmnotify's
//! `fault-injection` feature can call `Mm::lose_end_every` and check that torture catches
//! the broken engine.

// The workers' stop flags and counters are not part of any protocol under test.
#![allow(clippy::disallowed_types)]

mod inject;
mod op;
mod world;

use std::collections::BTreeMap;
use std::fmt;
use std::panic;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Once};
use std::time::{Duration, Instant};

use mmnotify::Policy;

pub use inject::InjectedPanic;
pub use op::{Mirror, Op, Rng};
pub use world::{page_addr, slot_addr, Applied, MmHook, World, SLOTS, SLOT_PAGES};

use crate::error::SimError;
use crate::oracle::Violation;
use crate::sync::Mutex;
use crate::trace::TraceEvent;

/// What a torture run found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finding {
    /// The oracle's verdict (or the panicking subscriber's own balance).
    Oracle(Violation),
    /// A callback's panic was not resumed on the caller's thread.
    PanicNotReported {
        /// Panics the subscriber threw.
        fired: u64,
        /// Panics the workers caught.
        reported: u64,
    },
    /// An operation panicked with something other than an injected panic.
    UnexpectedPanic {
        /// The operation.
        op: String,
        /// The panic message.
        message: String,
    },
}

impl Finding {
    /// A short name of the kind of finding, used to keep shrinking on the same problem.
    pub fn kind(&self) -> String {
        match self {
            Finding::Oracle(v) => match v {
                Violation::StaleMapping { .. } => "stale mapping".into(),
                Violation::WritableOverReadOnly { .. } => "writable over read-only".into(),
                Violation::MappedOverInaccessible { .. } => "mapped over inaccessible".into(),
                Violation::Unbalanced { .. } => "unbalanced starts and ends".into(),
                Violation::CounterRaised { counter, .. } => format!("{counter} raised"),
                Violation::EpochOpen { .. } => "interval epoch open".into(),
                Violation::Hang { .. } => "hang".into(),
            },
            Finding::PanicNotReported { .. } => "panic not reported".into(),
            Finding::UnexpectedPanic { .. } => "unexpected panic".into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Oracle(v) => write!(f, "{v}"),
            Finding::PanicNotReported { fired, reported } => write!(
                f,
                "the panicking subscriber panicked {fired} times but {reported} panics reached a caller."
            ),
            Finding::UnexpectedPanic { op, message } => {
                write!(f, "`{op}` panicked: {message}")
            }
        }
    }
}

/// How to run.
#[derive(Clone)]
pub struct TortureConfig {
    /// Pairing policy of every address space.
    pub policy: Policy,
    /// Worker threads (at least one).
    pub threads: usize,
    /// Stop after this long (checked at epoch boundaries).
    pub duration: Duration,
    /// Stop after this many operations in all (exact with one thread).
    pub max_ops: Option<u64>,
    /// Seed of the workers' generators.
    pub seed: u64,
    /// Bound of every wait that detects a hang, during the run.
    pub hang_timeout: Duration,
    /// Bound of every wait during single-threaded replays (nothing is in flight then, so
    /// only a leak makes a wait last).
    pub replay_hang_timeout: Duration,
    /// Operations per worker between quiet checks.
    pub ops_per_epoch: usize,
    /// Epochs before the world is replaced by a fresh one.
    pub epochs_per_world: u64,
    /// Wall-clock budget of shrinking.
    pub shrink_budget: Duration,
    /// Runs on every new hub (test-only fault switches).
    pub mm_hook: Option<MmHook>,
    /// Keep the event log of the last world (or of the shrunk replay) for trace export.
    pub keep_trace: bool,
}

impl fmt::Debug for TortureConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TortureConfig")
            .field("policy", &self.policy)
            .field("threads", &self.threads)
            .field("duration", &self.duration)
            .field("max_ops", &self.max_ops)
            .field("seed", &self.seed)
            .field("hang_timeout", &self.hang_timeout)
            .field("ops_per_epoch", &self.ops_per_epoch)
            .field("epochs_per_world", &self.epochs_per_world)
            .field("mm_hook", &self.mm_hook.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for TortureConfig {
    fn default() -> Self {
        TortureConfig {
            policy: Policy::Exact,
            threads: 2,
            duration: Duration::from_secs(5),
            max_ops: None,
            seed: 1,
            hang_timeout: Duration::from_secs(2),
            replay_hang_timeout: Duration::from_millis(20),
            ops_per_epoch: 64,
            epochs_per_world: 200,
            shrink_budget: Duration::from_secs(20),
            mm_hook: None,
            keep_trace: false,
        }
    }
}

/// Counts of one kind of operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindCount {
    /// Applied.
    pub total: u64,
    /// Rejected by the simulator or engine (unmapped, overlap, try again…): expected.
    pub rejected: u64,
    /// Interrupted by an injected panic (resumed on the worker and caught).
    pub panicked: u64,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Policy.
    pub policy: Policy,
    /// Worker threads.
    pub threads: usize,
    /// Seed.
    pub seed: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// Address spaces used (one per [`TortureConfig::epochs_per_world`] epochs).
    pub worlds: u64,
    /// Quiet checks run.
    pub checks: u64,
    /// Operations by kind.
    pub ops: BTreeMap<&'static str, KindCount>,
    /// Invalidations that reached the classic subscribers: blockable.
    pub invalidations_blockable: u64,
    /// … and non-blockable (OOM reaper).
    pub invalidations_nonblockable: u64,
    /// Refusals received from subscribers (classic and interval).
    pub refusals: u64,
    /// KVM fault retries and `process_mrelease` "try again" answers.
    pub retries: u64,
    /// Injected panics thrown by the panicking subscriber.
    pub panics_injected: u64,
    /// Panics resumed on a worker and caught there.
    pub panics_reported: u64,
    /// Bounded waits that ran out.
    pub hangs: u64,
    /// The longest `read_begin` wait.
    pub longest_read_begin: Duration,
    /// Violations found (at the failing check).
    pub violations: usize,
}

impl Summary {
    /// Operations in all.
    pub fn total_ops(&self) -> u64 {
        self.ops.values().map(|k| k.total).sum()
    }

    fn add_op(&mut self, op: &Op, applied: Option<Applied>) {
        let k = self.ops.entry(op.kind()).or_default();
        k.total += 1;
        match applied {
            None => {
                k.panicked += 1;
                self.panics_reported += 1;
            }
            Some(a) => {
                k.rejected += u64::from(a.rejected);
                self.retries += a.retries;
                self.hangs += u64::from(a.hung);
                if let Some(w) = a.read_begin_wait {
                    self.longest_read_begin = self.longest_read_begin.max(w);
                }
            }
        }
    }

    fn merge(&mut self, other: &Summary) {
        for (kind, c) in &other.ops {
            let k = self.ops.entry(kind).or_default();
            k.total += c.total;
            k.rejected += c.rejected;
            k.panicked += c.panicked;
        }
        self.retries += other.retries;
        self.hangs += other.hangs;
        self.panics_reported += other.panics_reported;
        self.longest_read_begin = self.longest_read_begin.max(other.longest_read_begin);
    }

    fn retire(&mut self, world: &World) {
        let (b, nb) = world.invalidations();
        self.invalidations_blockable += b;
        self.invalidations_nonblockable += nb;
        self.refusals += world.refusals();
        self.panics_injected += world.panics_fired();
        self.worlds += 1;
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "torture: policy {:?}, {} thread{}, seed {}, {:.1} s, {} address space{}, {} quiet checks",
            self.policy,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.seed,
            self.elapsed.as_secs_f64(),
            self.worlds,
            if self.worlds == 1 { "" } else { "s" },
            self.checks
        )?;
        writeln!(
            f,
            "  {:<22} {:>10} {:>10} {:>9}",
            "operation", "count", "rejected", "panicked"
        )?;
        for (kind, c) in &self.ops {
            writeln!(
                f,
                "  {kind:<22} {:>10} {:>10} {:>9}",
                c.total, c.rejected, c.panicked
            )?;
        }
        let (rej, pan): (u64, u64) = self
            .ops
            .values()
            .fold((0, 0), |(r, p), c| (r + c.rejected, p + c.panicked));
        writeln!(
            f,
            "  {:<22} {:>10} {:>10} {:>9}",
            "total",
            self.total_ops(),
            rej,
            pan
        )?;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "  operations/s           {:>10.0}",
            self.total_ops() as f64 / secs
        )?;
        writeln!(
            f,
            "  invalidations          {:>10}   ({} blockable, {} non-blockable)",
            self.invalidations_blockable + self.invalidations_nonblockable,
            self.invalidations_blockable,
            self.invalidations_nonblockable
        )?;
        writeln!(f, "  refusals               {:>10}", self.refusals)?;
        writeln!(f, "  retries                {:>10}", self.retries)?;
        writeln!(
            f,
            "  injected panics        {:>10}   ({} reported to the caller)",
            self.panics_injected, self.panics_reported
        )?;
        writeln!(f, "  hangs                  {:>10}", self.hangs)?;
        writeln!(
            f,
            "  longest read_begin     {:>10.3} ms",
            self.longest_read_begin.as_secs_f64() * 1e3
        )?;
        write!(f, "  violations             {:>10}", self.violations)
    }
}

/// The shortest history found that still shows the violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shrunk {
    /// The operations, in order, single-threaded.
    pub ops: Vec<Op>,
    /// What the checker finds right after the last one.
    pub findings: Vec<Finding>,
    /// Replays run while shrinking.
    pub replays: usize,
    /// Whether shrinking ran to its end (false: the budget ran out first).
    pub complete: bool,
}

/// A failed run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Seed.
    pub seed: u64,
    /// Policy.
    pub policy: Policy,
    /// Worker threads.
    pub threads: usize,
    /// What the failing quiet check found.
    pub findings: Vec<Finding>,
    /// Operations in the failing world's history.
    pub history_len: usize,
    /// The shrunk history, if the violation reproduced single-threaded.
    pub shrunk: Option<Shrunk>,
    /// The last operations of the history, when it did not reproduce.
    pub tail: Vec<Op>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "VIOLATION under {:?} (seed {}, {} thread{}): the quiet check after {} operations of this address space found:",
            self.policy,
            self.seed,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.history_len
        )?;
        for finding in &self.findings {
            writeln!(f, "  - {finding}")?;
        }
        match &self.shrunk {
            Some(s) => {
                writeln!(
                    f,
                    "shortest history that shows it ({} of {} operations, replayed single-threaded; {} replays{}):",
                    s.ops.len(),
                    self.history_len,
                    s.replays,
                    if s.complete { "" } else { ", budget ran out" }
                )?;
                for (i, op) in s.ops.iter().enumerate() {
                    writeln!(f, "  {:>4}. {op}", i + 1)?;
                }
                writeln!(f, "after the last operation the checker finds:")?;
                for finding in &s.findings {
                    writeln!(f, "  - {finding}")?;
                }
            }
            None => {
                writeln!(
                    f,
                    "the violation did not reproduce single-threaded (a race); the last {} operations were:",
                    self.tail.len()
                )?;
                for op in &self.tail {
                    writeln!(f, "        {op}")?;
                }
            }
        }
        write!(
            f,
            "seed {} reproduces the run{}",
            self.seed,
            if self.threads == 1 {
                " exactly with --threads 1"
            } else {
                "'s operation streams (the interleaving depends on the scheduler)"
            }
        )
    }
}

/// Progress, reported at every quiet check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Since the start.
    pub elapsed: Duration,
    /// Operations so far.
    pub ops: u64,
    /// Violations so far.
    pub violations: usize,
    /// Quiet checks so far.
    pub checks: u64,
}

/// The result of [`run`].
#[derive(Clone, Debug)]
pub struct TortureReport {
    /// What the run did.
    pub summary: Summary,
    /// What went wrong, if anything.
    pub failure: Option<Failure>,
    /// The event log of the shrunk replay (on failure) or of the last address space, if
    /// [`TortureConfig::keep_trace`] was set.
    pub trace: Vec<TraceEvent>,
}

impl TortureReport {
    /// Whether no violation was found.
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// Hides the default panic message of injected panics (they are expected and counted), and
/// leaves every other panic to the previous hook.
pub fn install_quiet_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<InjectedPanic>().is_none() {
                previous(info);
            }
        }));
    });
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string payload)".to_owned())
}

/// One address space's life: the world, its history, the panics its workers caught.
#[derive(Debug)]
struct Round {
    world: World,
    history: Mutex<Vec<Op>>,
    unexpected: Mutex<Vec<Finding>>,
}

impl Round {
    fn new(cfg: &TortureConfig) -> Result<Round, SimError> {
        Ok(Round {
            world: World::new(cfg.policy, cfg.hang_timeout, cfg.mm_hook.as_ref())?,
            history: Mutex::new(Vec::new()),
            unexpected: Mutex::new(Vec::new()),
        })
    }
}

struct Shared<'a> {
    cfg: &'a TortureConfig,
    round: Mutex<Arc<Round>>,
    barrier: Barrier,
    abort: AtomicBool,
    stop: AtomicBool,
    ops: AtomicU64,
    started: Instant,
    checks: AtomicU64,
    retired: Mutex<Summary>,
    failure: Mutex<Option<(Vec<Finding>, Vec<Op>)>>,
    error: Mutex<Option<SimError>>,
    progress: &'a (dyn Fn(&Progress) + Sync),
}

impl Shared<'_> {
    fn worker(&self, index: usize) -> Summary {
        let cfg = self.cfg;
        let mut rng = Rng::for_worker(cfg.seed, index);
        let mut local = Summary::default();
        loop {
            let round = Arc::clone(&self.round.lock());
            for _ in 0..cfg.ops_per_epoch {
                if self.abort.load(Ordering::SeqCst) {
                    break;
                }
                let n = self.ops.fetch_add(1, Ordering::SeqCst);
                if cfg.max_ops.is_some_and(|max| n >= max) {
                    self.abort.store(true, Ordering::SeqCst);
                    break;
                }
                let op = Op::generate(&mut rng);
                round.history.lock().push(op);
                match round.world.apply_caught(&op) {
                    Ok(applied) => {
                        if applied.is_some_and(|a| a.hung) {
                            // The checker will report it; no need to wait out more hangs.
                            self.abort.store(true, Ordering::SeqCst);
                        }
                        local.add_op(&op, applied);
                    }
                    Err(finding) => {
                        local.add_op(&op, Some(Applied::default()));
                        round.unexpected.lock().push(finding);
                        self.abort.store(true, Ordering::SeqCst);
                    }
                }
            }
            if self.barrier.wait().is_leader() {
                self.quiet_check(&round);
            }
            self.barrier.wait();
            if self.stop.load(Ordering::SeqCst) {
                return local;
            }
        }
    }

    /// Runs on one worker while all others wait at the barrier.
    fn quiet_check(&self, round: &Arc<Round>) {
        let cfg = self.cfg;
        let checks = self.checks.fetch_add(1, Ordering::SeqCst) + 1;
        let mut findings = std::mem::take(&mut *round.unexpected.lock());
        findings.extend(round.world.check());
        let ops = self.ops.load(Ordering::SeqCst);
        let violations = findings.len();
        if !findings.is_empty() {
            let history = round.history.lock().clone();
            *self.failure.lock() = Some((findings, history));
            self.stop.store(true, Ordering::SeqCst);
        } else if self.started.elapsed() >= cfg.duration || cfg.max_ops.is_some_and(|m| ops >= m) {
            self.stop.store(true, Ordering::SeqCst);
        } else if checks % cfg.epochs_per_world.max(1) == 0 {
            match Round::new(cfg) {
                Ok(next) => {
                    self.retired.lock().retire(&round.world);
                    *self.round.lock() = Arc::new(next);
                }
                Err(e) => {
                    *self.error.lock() = Some(e);
                    self.stop.store(true, Ordering::SeqCst);
                }
            }
        }
        self.abort.store(false, Ordering::SeqCst);
        (self.progress)(&Progress {
            elapsed: self.started.elapsed(),
            ops: ops.min(cfg.max_ops.unwrap_or(u64::MAX)),
            violations,
            checks,
        });
    }
}

/// Runs a torture; `progress` is called at every quiet check.
///
/// # Errors
///
/// A simulator error while building an address space (a bug in the workload's setup).
pub fn run(
    cfg: &TortureConfig,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<TortureReport, SimError> {
    install_quiet_panic_hook();
    let threads = cfg.threads.max(1);
    let shared = Shared {
        cfg,
        round: Mutex::new(Arc::new(Round::new(cfg)?)),
        barrier: Barrier::new(threads),
        abort: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        ops: AtomicU64::new(0),
        started: Instant::now(),
        checks: AtomicU64::new(0),
        retired: Mutex::new(Summary::default()),
        failure: Mutex::new(None),
        error: Mutex::new(None),
        progress,
    };
    let locals: Vec<Summary> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let shared = &shared;
                std::thread::Builder::new()
                    .name(format!("torture-{i}"))
                    .spawn_scoped(s, move || shared.worker(i))
                    .expect("spawn a torture worker")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .expect("a torture worker panicked outside an operation")
            })
            .collect()
    });
    if let Some(e) = shared.error.lock().take() {
        return Err(e);
    }
    let last = Arc::clone(&shared.round.lock());
    let mut summary = std::mem::take(&mut *shared.retired.lock());
    summary.retire(&last.world);
    for local in &locals {
        summary.merge(local);
    }
    summary.policy = cfg.policy;
    summary.threads = threads;
    summary.seed = cfg.seed;
    summary.elapsed = shared.started.elapsed();
    summary.checks = shared.checks.load(Ordering::SeqCst);
    let failure = shared.failure.lock().take();
    let (failure, trace) = match failure {
        None => {
            let trace = if cfg.keep_trace {
                last.world.sim().trace()
            } else {
                Vec::new()
            };
            (None, trace)
        }
        Some((findings, history)) => {
            summary.violations = findings.len();
            let shrunk = shrink(cfg, &history)?;
            let trace = match (&shrunk, cfg.keep_trace) {
                (Some(s), true) => replay(cfg, &s.ops)?.trace,
                (None, true) => last.world.sim().trace(),
                _ => Vec::new(),
            };
            let tail = if shrunk.is_none() {
                history[history.len().saturating_sub(40)..].to_vec()
            } else {
                Vec::new()
            };
            (
                Some(Failure {
                    seed: cfg.seed,
                    policy: cfg.policy,
                    threads,
                    findings,
                    history_len: history.len(),
                    shrunk,
                    tail,
                }),
                trace,
            )
        }
    };
    Ok(TortureReport {
        summary,
        failure,
        trace,
    })
}

/// The result of [`replay`].
#[derive(Clone, Debug)]
pub struct Replay {
    /// The index of the first operation after which the checker found something, with what
    /// it found; `None` if it found nothing after any operation.
    pub first: Option<(usize, Vec<Finding>)>,
    /// Injected panics thrown, and reported to the replaying thread.
    pub panics: (u64, u64),
    /// The replayed world's event log.
    pub trace: Vec<TraceEvent>,
}

/// Replays `ops` single-threaded on a fresh world (with [`TortureConfig::replay_hang_timeout`]),
/// running the quiet check after every operation and stopping at the first finding.
///
/// # Errors
///
/// A simulator error while building the world.
pub fn replay(cfg: &TortureConfig, ops: &[Op]) -> Result<Replay, SimError> {
    install_quiet_panic_hook();
    let world = World::new(cfg.policy, cfg.replay_hang_timeout, cfg.mm_hook.as_ref())?;
    let mut first = None;
    for (i, op) in ops.iter().enumerate() {
        let findings = match world.apply_caught(op) {
            Ok(_) => world.check(),
            Err(finding) => vec![finding],
        };
        if !findings.is_empty() {
            first = Some((i, findings));
            break;
        }
    }
    Ok(Replay {
        first,
        panics: (world.panics_fired(), world.panics_reported()),
        trace: world.sim().trace(),
    })
}

/// Shrinks `history` to a short single-threaded history that still shows a violation of the
/// same kind; `None` if the full history shows none single-threaded.
///
/// # Errors
///
/// A simulator error while building a world.
pub fn shrink(cfg: &TortureConfig, history: &[Op]) -> Result<Option<Shrunk>, SimError> {
    let began = Instant::now();
    let mut replays = 1;
    let Some((last, findings)) = replay(cfg, history)?.first else {
        return Ok(None);
    };
    let kinds: Vec<String> = findings.iter().map(Finding::kind).collect();
    let mut best = Shrunk {
        ops: history[..=last].to_vec(),
        findings,
        replays,
        complete: false,
    };
    let mut chunk = best.ops.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        let mut removed = false;
        // The last operation is where the violation shows; try removing everything before it.
        while i + 1 < best.ops.len() {
            if began.elapsed() > cfg.shrink_budget {
                best.replays = replays;
                return Ok(Some(best));
            }
            let end = (i + chunk).min(best.ops.len() - 1);
            let candidate: Vec<Op> = best.ops[..i]
                .iter()
                .chain(&best.ops[end..])
                .copied()
                .collect();
            replays += 1;
            match replay(cfg, &candidate)?.first {
                Some((last, found)) if found.iter().any(|f| kinds.contains(&f.kind())) => {
                    best.ops = candidate[..=last].to_vec();
                    best.findings = found;
                    removed = true;
                }
                _ => i += chunk,
            }
        }
        if chunk == 1 && !removed {
            break;
        }
        if !removed {
            chunk = chunk.div_ceil(2);
        }
    }
    best.replays = replays;
    best.complete = true;
    Ok(Some(best))
}
