//! Scenarios: the seed thread's bug, the interval leak, and a coherence tour, each runnable
//! under every [`Policy`], each returning a [`ScenarioReport`] of facts read from the engine's,
//! the models' and the oracle's state at the end. Nothing here states what *should* happen;
//! the tests and the CLI compare the facts with the expectations.
//!
//! * [`Scenario::Seed`]: an OOM reap of a process mirrored by a KVM-like and a GRU-like MMU,
//!   with a nouveau-like subscriber that refuses non-blockable starts registered between them
//!   (so KVM's start succeeds before the refusal). Under `Legacy` the ends are lost.
//! * [`Scenario::IntervalLeak`]: an OOM reap of a process with a nouveau-like subscriber
//!   (classic refuser + interval mirror) and an HMM mirror over the reaped range. Under
//!   `Kernel` and `Legacy` the interval epoch stays open.
//! * [`Scenario::Coherence`]: munmap, mprotect, fork, a COW fault, mremap, kernel and device
//!   migration, reclaim with aging, madvise, a `MAP_FIXED` replace, the first write to the
//!   zero page, madvise and mprotect over a hole, and exit, with five mirrors faulting pages
//!   in before each step and the oracle checking after it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use mmnotify::{IntervalState, Owner, Policy};

use crate::clock::{Clock, SimClock};
use crate::error::SimError;
use crate::mm::{SimMm, SubscriberReport};
use crate::oom_reaper::{OomReaper, ReapReport, MAX_OOM_REAP_RETRIES, OOM_REAP_INTERVAL};
use crate::oracle::{self, Violation};
use crate::secondary::{
    FaultOutcome, GruLike, HmmMirror, KvmLike, NouveauLike, SecondaryMmu, SvaLike, WaitOutcome,
};
use crate::trace::TraceEvent;
use crate::vma::{addr_of, vpn_of, Access, Backing, FileId, Prot, Sharing, PAGE_SIZE};

/// The scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// The seed thread: lost ends after a refused non-blocking start.
    Seed,
    /// The interval epoch left open by a classic refusal.
    IntervalLeak,
    /// Every operation, with every mirror, checked by the oracle.
    Coherence,
}

impl Scenario {
    /// Every scenario, in presentation order.
    pub const ALL: [Scenario; 3] = [Scenario::Seed, Scenario::IntervalLeak, Scenario::Coherence];

    /// The command-line name.
    pub const fn name(self) -> &'static str {
        match self {
            Scenario::Seed => "seed",
            Scenario::IntervalLeak => "interval-leak",
            Scenario::Coherence => "coherence",
        }
    }

    /// One sentence on what it does.
    pub const fn description(self) -> &'static str {
        match self {
            Scenario::Seed => {
                "OOM-reap a process mirrored by KVM-like and GRU-like MMUs while a nouveau-like \
                 subscriber refuses non-blocking starts"
            }
            Scenario::IntervalLeak => {
                "OOM-reap a process with a nouveau-like subscriber (classic refuser + interval \
                 mirror) and an HMM mirror over the reaped range"
            }
            Scenario::Coherence => {
                "munmap, mprotect, fork, COW fault, mremap, migration, reclaim, madvise, \
                 MAP_FIXED, zero-page write, madvise and mprotect over a hole, and exit with five \
                 mirrors, checked by the coherence oracle after each step"
            }
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown scenario name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown scenario {0:?}; expected one of: seed, interval-leak, coherence")]
pub struct UnknownScenario(pub String);

impl FromStr for Scenario {
    type Err = UnknownScenario;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.name() == s)
            .ok_or_else(|| UnknownScenario(s.to_owned()))
    }
}

/// Knobs of a scenario run.
#[derive(Clone, Debug)]
pub struct ScenarioConfig {
    /// Bound of every wait that detects a hang (GRU fault, `read_begin`, memslot update).
    pub hang_timeout: Duration,
    /// Reaper attempts.
    pub reaper_attempts: u32,
    /// Pause between reaper attempts.
    pub reaper_interval: Duration,
    /// The reaper's clock (simulated by default, so runs never sleep for it).
    pub clock: Arc<dyn Clock>,
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        ScenarioConfig {
            hang_timeout: Duration::from_millis(150),
            reaper_attempts: MAX_OOM_REAP_RETRIES,
            reaper_interval: OOM_REAP_INTERVAL,
            clock: Arc::new(SimClock::new()),
        }
    }
}

/// Facts about the KVM-like model at the end of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmFacts {
    /// `in_progress`.
    pub in_progress: i64,
    /// `seq`.
    pub seq: u64,
    /// `active_invalidate_count`.
    pub active_invalidate_count: i64,
    /// A fault on the reaped range after the reap (retried a few times).
    pub fault: FaultOutcome,
    /// A memslot update after the reap.
    pub memslot_update: WaitOutcome,
}

/// Facts about the GRU-like model at the end of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GruFacts {
    /// `range_active`.
    pub range_active: i64,
    /// A fault on the reaped range after the reap.
    pub fault: FaultOutcome,
}

/// Facts about the HMM mirror at the end of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorFacts {
    /// A bounded `read_begin` after the reap.
    pub read_begin: WaitOutcome,
    /// A fault after the reap.
    pub fault: FaultOutcome,
    /// Whether removing the interval would wait (an epoch is open: `remove` waits for it to
    /// close, forever if it leaked). Read from the interval state, not tried.
    pub remove_would_wait: bool,
}

/// One step of the coherence scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepReport {
    /// The operation.
    pub name: &'static str,
    /// The event Linux fires for it.
    pub event: &'static str,
    /// Secondary entries per mirror just before the operation.
    pub mirrored_before: Vec<(String, usize)>,
    /// What the oracle found just after it.
    pub violations: Vec<Violation>,
}

/// What a scenario run left behind, read from state.
#[derive(Clone, Debug)]
pub struct ScenarioReport {
    /// The scenario.
    pub scenario: Scenario,
    /// The policy it ran under.
    pub policy: Policy,
    /// The OOM reap, for the reaping scenarios.
    pub reap: Option<ReapReport>,
    /// The KVM-like model, if the scenario has one.
    pub kvm: Option<KvmFacts>,
    /// The GRU-like model, if the scenario has one.
    pub gru: Option<GruFacts>,
    /// The HMM mirror, if the scenario has one.
    pub mirror: Option<MirrorFacts>,
    /// The steps of the coherence scenario.
    pub steps: Vec<StepReport>,
    /// The interval protocol's state at the end.
    pub interval_state: IntervalState,
    /// Every subscriber, with its counters.
    pub subscribers: Vec<SubscriberReport>,
    /// What the oracle found at the end.
    pub violations: Vec<Violation>,
    /// The event log.
    pub trace: Vec<TraceEvent>,
}

impl ScenarioReport {
    /// Whether the oracle found nothing, at the end and after every step.
    pub fn is_coherent(&self) -> bool {
        self.violations.is_empty() && self.steps.iter().all(|s| s.violations.is_empty())
    }
}

impl fmt::Display for ScenarioReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "scenario {} under {:?}", self.scenario, self.policy)?;
        if let Some(reap) = &self.reap {
            writeln!(
                f,
                "  oom reaper: {} attempts, {} VMAs reaped, {} refused starts, succeeded: {}, oom skip: {}",
                reap.attempts.len(),
                reap.reaped(),
                reap.refusals(),
                reap.succeeded,
                reap.oom_skip
            )?;
        }
        if let Some(k) = &self.kvm {
            writeln!(
                f,
                "  kvm: in_progress {}, seq {}, active_invalidate_count {}, fault {}, memslot update {}",
                k.in_progress, k.seq, k.active_invalidate_count, k.fault, k.memslot_update
            )?;
        }
        if let Some(g) = &self.gru {
            writeln!(
                f,
                "  gru: range_active {}, fault {}",
                g.range_active, g.fault
            )?;
        }
        if let Some(m) = &self.mirror {
            writeln!(
                f,
                "  hmm mirror: read_begin {}, fault {}, remove would wait: {}",
                m.read_begin, m.fault, m.remove_would_wait
            )?;
        }
        writeln!(
            f,
            "  interval state: seq {}, active {}",
            self.interval_state.seq, self.interval_state.active
        )?;
        for s in &self.subscribers {
            let c = s.counts;
            writeln!(
                f,
                "  {}: starts {}, refusals {}, ends {}, releases {}, interval callbacks {} (+{} refused)",
                s.name, c.starts, c.refusals, c.ends, c.releases, c.interval_invalidations, c.interval_refusals
            )?;
        }
        for step in &self.steps {
            writeln!(
                f,
                "  step {:<16} ({}): {}",
                step.name,
                step.event,
                if step.violations.is_empty() {
                    "coherent".to_owned()
                } else {
                    format!("{} violations", step.violations.len())
                }
            )?;
        }
        if self.is_coherent() {
            writeln!(f, "  oracle: coherent")?;
        } else {
            for v in self
                .violations
                .iter()
                .chain(self.steps.iter().flat_map(|s| &s.violations))
            {
                writeln!(f, "  violation: {v}")?;
            }
        }
        Ok(())
    }
}

/// Runs `scenario` under `policy` with the default configuration.
///
/// # Panics
///
/// If the simulator rejects one of the scenario's own operations (a bug in the scenario).
pub fn run(scenario: Scenario, policy: Policy) -> ScenarioReport {
    run_with(scenario, policy, &ScenarioConfig::default())
        .unwrap_or_else(|e| panic!("scenario {scenario} under {policy:?} failed: {e}"))
}

/// Runs `scenario` under `policy` with `config`.
///
/// # Errors
///
/// A simulator error from one of the scenario's operations (a bug in the scenario).
pub fn run_with(
    scenario: Scenario,
    policy: Policy,
    config: &ScenarioConfig,
) -> Result<ScenarioReport, SimError> {
    match scenario {
        Scenario::Seed => seed(policy, config),
        Scenario::IntervalLeak => interval_leak(policy, config),
        Scenario::Coherence => coherence(policy, config),
    }
}

const NOUVEAU_OWNER: Owner = Owner(0x6e76);

fn reaper(config: &ScenarioConfig) -> OomReaper {
    OomReaper::new(Arc::clone(&config.clock))
        .attempts(config.reaper_attempts)
        .interval(config.reaper_interval)
}

fn pages(start: u64, count: u64) -> impl Iterator<Item = u64> {
    (0..count).map(move |i| start + i * PAGE_SIZE)
}

fn report(sim: &SimMm, scenario: Scenario, mirrors: &[&dyn SecondaryMmu]) -> ScenarioReport {
    ScenarioReport {
        scenario,
        policy: sim.policy(),
        reap: None,
        kvm: None,
        gru: None,
        mirror: None,
        steps: Vec::new(),
        interval_state: sim.mm().interval_state(),
        subscribers: sim.subscribers(),
        violations: oracle::check(sim, mirrors),
        trace: sim.trace(),
    }
}

fn seed(policy: Policy, config: &ScenarioConfig) -> Result<ScenarioReport, SimError> {
    let t = config.hang_timeout;
    let sim = SimMm::new(policy);
    // Order matters: KVM's start succeeds before the refusal, GRU's comes after it.
    let kvm = KvmLike::attach(&sim, "kvm", t)?;
    let nouveau = NouveauLike::attach(&sim, "nouveau", NOUVEAU_OWNER, t)?;
    let gru = GruLike::attach(&sim, "gru", t)?;

    let heap = sim.mmap_anon(8 * PAGE_SIZE)?;
    let file = sim.mmap(
        None,
        4 * PAGE_SIZE,
        Prot::READ_WRITE,
        Backing::File {
            file: FileId(1),
            offset: 0,
        },
        Sharing::Shared,
    )?;
    let task = sim.task("victim");
    task.touch(heap, 8 * PAGE_SIZE, Access::Write)?;
    task.touch(file, 4 * PAGE_SIZE, Access::Write)?;
    for addr in pages(heap, 8) {
        kvm.fault_retrying(&sim, addr, Access::Read)?;
        gru.fault(&sim, addr, Access::Read)?;
    }

    let reap = reaper(config).reap(&sim);

    let kvm_fault = kvm.fault_retrying(&sim, heap, Access::Read)?;
    let memslot_update = kvm.update_memslots();
    let gru_fault = gru.fault(&sim, heap, Access::Read)?;

    let mirrors: [&dyn SecondaryMmu; 3] = [&*kvm, &*gru, &*nouveau];
    let mut out = report(&sim, Scenario::Seed, &mirrors);
    out.reap = Some(reap);
    out.kvm = Some(KvmFacts {
        in_progress: kvm.in_progress(),
        seq: kvm.seq(),
        active_invalidate_count: kvm.active_invalidate_count(),
        fault: kvm_fault,
        memslot_update,
    });
    out.gru = Some(GruFacts {
        range_active: gru.range_active(),
        fault: gru_fault,
    });
    Ok(out)
}

fn interval_leak(policy: Policy, config: &ScenarioConfig) -> Result<ScenarioReport, SimError> {
    let t = config.hang_timeout;
    let sim = SimMm::new(policy);
    let nouveau = NouveauLike::attach(&sim, "nouveau", NOUVEAU_OWNER, t)?;
    let heap = sim.mmap_anon(8 * PAGE_SIZE)?;
    nouveau.mirror_region(&sim, heap, 8 * PAGE_SIZE)?;
    let hmm = HmmMirror::attach(&sim, "hmm", heap, 8 * PAGE_SIZE, t)?;
    sim.task("victim")
        .touch(heap, 8 * PAGE_SIZE, Access::Write)?;
    for addr in pages(heap, 8) {
        nouveau.fault(&sim, addr, Access::Read)?;
        hmm.fault(&sim, addr, Access::Read)?;
    }

    let reap = reaper(config).reap(&sim);

    let state = sim.mm().interval_state();
    let read_begin = hmm.probe_read_begin()?;
    let fault = hmm.fault(&sim, heap, Access::Read)?;

    let mirrors: [&dyn SecondaryMmu; 2] = [&*nouveau, &*hmm];
    let mut out = report(&sim, Scenario::IntervalLeak, &mirrors);
    out.reap = Some(reap);
    out.mirror = Some(MirrorFacts {
        read_begin,
        fault,
        remove_would_wait: state.seq % 2 == 1,
    });
    Ok(out)
}

struct Mirrors {
    kvm: Arc<KvmLike>,
    gru: Arc<GruLike>,
    nouveau: Arc<NouveauLike>,
    hmm: Arc<HmmMirror>,
    sva: Arc<SvaLike>,
    /// The region the interval mirrors cover, `[start, end)`.
    region: (u64, u64),
}

impl Mirrors {
    fn all(&self) -> [&dyn SecondaryMmu; 5] {
        [
            &*self.kvm,
            &*self.gru,
            &*self.nouveau,
            &*self.hmm,
            &*self.sva,
        ]
    }

    /// Every mirror faults in every readable page it covers.
    fn fault_everything(&self, sim: &SimMm) -> Result<Vec<(String, usize)>, SimError> {
        for vma in sim.vmas() {
            if !vma.prot.allows(Access::Read) {
                continue;
            }
            for vpn in vpn_of(vma.start)..vpn_of(vma.end) {
                let addr = addr_of(vpn);
                self.kvm.fault_retrying(sim, addr, Access::Read)?;
                self.gru.fault(sim, addr, Access::Read)?;
                self.sva.access(sim, addr, Access::Read)?;
                if self.region.0 <= addr && addr < self.region.1 {
                    self.nouveau.fault(sim, addr, Access::Read)?;
                    self.hmm.fault(sim, addr, Access::Read)?;
                }
            }
        }
        Ok(self
            .all()
            .iter()
            .map(|m| (m.name().to_owned(), m.entries().len()))
            .collect())
    }
}

fn coherence(policy: Policy, config: &ScenarioConfig) -> Result<ScenarioReport, SimError> {
    let t = config.hang_timeout;
    let sim = SimMm::new(policy);
    let a = sim.mmap_anon(16 * PAGE_SIZE)?;
    let b = sim.mmap(
        None,
        4 * PAGE_SIZE,
        Prot::READ_WRITE,
        Backing::File {
            file: FileId(1),
            offset: 0,
        },
        Sharing::Shared,
    )?;
    let c = sim.mmap(
        None,
        4 * PAGE_SIZE,
        Prot::READ_WRITE,
        Backing::File {
            file: FileId(2),
            offset: 0,
        },
        Sharing::Private,
    )?;
    let nouveau = NouveauLike::attach(&sim, "nouveau", NOUVEAU_OWNER, t)?;
    nouveau.mirror_region(&sim, a, 16 * PAGE_SIZE)?;
    let m = Mirrors {
        kvm: KvmLike::attach(&sim, "kvm", t)?,
        gru: GruLike::attach(&sim, "gru", t)?,
        hmm: HmmMirror::attach(&sim, "hmm", a, 16 * PAGE_SIZE, t)?,
        sva: SvaLike::attach(&sim, "sva")?,
        nouveau,
        region: (a, a + 16 * PAGE_SIZE),
    };
    let task = sim.task("main");
    task.touch(a, 16 * PAGE_SIZE, Access::Write)?;
    task.touch(b, 4 * PAGE_SIZE, Access::Write)?;
    task.touch(c, 4 * PAGE_SIZE, Access::Read)?;

    let mut steps = Vec::new();
    let mut step = |name: &'static str,
                    event: &'static str,
                    op: &mut dyn FnMut() -> Result<(), SimError>|
     -> Result<(), SimError> {
        let mirrored_before = m.fault_everything(&sim)?;
        op()?;
        steps.push(StepReport {
            name,
            event,
            mirrored_before,
            violations: oracle::check(&sim, &m.all()),
        });
        Ok(())
    };

    step("munmap", "Unmap", &mut || {
        sim.munmap(a + 12 * PAGE_SIZE, 4 * PAGE_SIZE)
    })?;
    step("mprotect", "ProtectionVma", &mut || {
        sim.mprotect(a + 8 * PAGE_SIZE, 4 * PAGE_SIZE, Prot::READ)
    })?;
    let mut child = None;
    step("fork", "ProtectionPage", &mut || {
        child = Some(sim.fork()?);
        Ok(())
    })?;
    step("cow-fault", "Clear (one page)", &mut || {
        task.write(a).map(|_| ())
    })?;
    step(
        "child-exit",
        "none on the parent",
        &mut || match child.take() {
            Some(child) => child.exit(),
            None => Ok(()),
        },
    )?;
    step("mremap", "Unmap (old range)", &mut || {
        sim.mremap(a + 4 * PAGE_SIZE, 4 * PAGE_SIZE, 0x4000_0000)
            .map(|_| ())
    })?;
    step("migrate", "Clear", &mut || {
        sim.migrate(a, 4 * PAGE_SIZE, None).map(|_| ())
    })?;
    step("migrate-device", "Migrate { owner }", &mut || {
        sim.migrate(a, 4 * PAGE_SIZE, Some(NOUVEAU_OWNER))
            .map(|_| ())
    })?;
    step(
        "reclaim",
        "clear_flush_young; Clear per evicted page",
        &mut || {
            sim.reclaim(a, 4 * PAGE_SIZE)?;
            m.kvm.guest_access(a + PAGE_SIZE);
            sim.reclaim(a, 4 * PAGE_SIZE).map(|_| ())
        },
    )?;
    step("madvise", "Clear", &mut || {
        sim.madvise_dontneed(c, 4 * PAGE_SIZE)
    })?;
    step("map-fixed", "Unmap (the replaced range)", &mut || {
        sim.mmap_fixed(
            a + 8 * PAGE_SIZE,
            4 * PAGE_SIZE,
            Prot::READ_WRITE,
            Backing::Anonymous,
            Sharing::Private,
        )
        .map(|_| ())
    })?;
    // The mirrors read the new mapping in: every one of them maps the zero page.
    step("zero-page-write", "Clear (one page)", &mut || {
        task.write(a + 8 * PAGE_SIZE).map(|_| ())
    })?;
    // `[a + 4, a + 8)` pages moved away with mremap: a hole, which Linux's madvise and
    // mprotect report (ENOMEM) after doing their part.
    let hole = |r: Result<(), SimError>| match r {
        Err(SimError::Unmapped { addr }) if addr == a + 4 * PAGE_SIZE => Ok(()),
        Ok(()) => Err(SimError::Unmapped { addr: a }),
        other => other,
    };
    step("madvise-hole", "Clear per piece, then ENOMEM", &mut || {
        hole(sim.madvise_dontneed(a, 12 * PAGE_SIZE))
    })?;
    step(
        "mprotect-hole",
        "ProtectionVma before the hole, then ENOMEM",
        &mut || hole(sim.mprotect(a, 12 * PAGE_SIZE, Prot::READ)),
    )?;
    step("exit", "release, then Unmap per VMA", &mut || sim.exit())?;

    let mut out = report(&sim, Scenario::Coherence, &m.all());
    out.steps = steps;
    Ok(out)
}
