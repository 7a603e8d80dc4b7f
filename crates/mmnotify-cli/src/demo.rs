//! `mmnotify demo`: every scenario under every policy, as a table of facts.
//!
//! Each cell is derived from a [`ScenarioReport`], which the simulator fills from the engine's
//! and the oracle's state at the end of the run (counters, the interval sequence, bounded
//! waits that timed out). Nothing printed here is an expectation: if the engine changed its
//! behaviour, the table would change with it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use mmnotify::Policy;
use mmnotify_sim::{FaultOutcome, Scenario, ScenarioReport};

/// Arguments of `mmnotify demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Run only this scenario: seed, interval-leak or coherence.
    #[arg(long)]
    scenario: Option<Scenario>,
    /// Run only under this policy: exact, kernel or legacy.
    #[arg(long)]
    policy: Option<Policy>,
    /// Write a Chrome trace-event JSON file (opens in ui.perfetto.dev).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Also print each run's full report.
    #[arg(long, short)]
    verbose: bool,
}

const POLICIES: [Policy; 3] = [Policy::Legacy, Policy::Kernel, Policy::Exact];

/// Runs the demo; the exit code is 1 if any run under Exact found a problem.
pub(crate) fn run(args: &DemoArgs) -> Result<ExitCode, String> {
    let scenarios: Vec<Scenario> = match args.scenario {
        Some(s) => vec![s],
        None => Scenario::ALL.to_vec(),
    };
    let policies: Vec<Policy> = match args.policy {
        Some(p) => vec![p],
        None => POLICIES.to_vec(),
    };
    let mut reports = Vec::new();
    for &scenario in &scenarios {
        for &policy in &policies {
            reports.push(mmnotify_sim::run(scenario, policy));
        }
    }

    println!(
        "{:<14} {:<7} {:<34} outcome",
        "scenario", "policy", "OOM reaper"
    );
    println!("{}", "-".repeat(100));
    let mut exact_failed = false;
    for report in &reports {
        let findings = findings(report);
        if report.policy == Policy::Exact && !findings.is_empty() {
            exact_failed = true;
        }
        let outcome = if findings.is_empty() {
            "coherent".to_owned()
        } else {
            findings.join("; ")
        };
        println!(
            "{:<14} {:<7} {:<34} {}",
            report.scenario.name(),
            report.policy.name(),
            reaper_cell(report),
            outcome
        );
    }
    println!();
    for scenario in &scenarios {
        println!("{:<14} {}", scenario.name(), scenario.description());
    }
    if args.verbose {
        for report in &reports {
            println!("\n{report}");
        }
    }
    if let Some(path) = &args.trace {
        let json = crate::trace::chrome_trace(&reports);
        std::fs::write(path, json.to_string())
            .map_err(|e| format!("cannot write the trace to {}: {e}", path.display()))?;
        println!(
            "\ntrace written to {} (open it in ui.perfetto.dev)",
            path.display()
        );
    }
    if exact_failed {
        println!("\nExact showed a violation: this is a bug in mmnotify.");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn reaper_cell(report: &ScenarioReport) -> String {
    match &report.reap {
        None => "-".to_owned(),
        Some(reap) => format!(
            "{} attempts, {} reaped, {} refused",
            reap.attempts.len(),
            reap.reaped(),
            reap.refusals()
        ),
    }
}

/// Every problem the report shows, in words; empty when the run was coherent.
pub(crate) fn findings(report: &ScenarioReport) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(kvm) = &report.kvm {
        if kvm.in_progress != 0 {
            out.push(format!("KVM in-progress stuck at {}", kvm.in_progress));
        }
        if kvm.memslot_update.timed_out() {
            out.push("KVM memslot update hung".to_owned());
        }
    }
    if let Some(gru) = &report.gru {
        if let FaultOutcome::Hung { .. } = gru.fault {
            out.push(format!(
                "GRU fault hung (range_active {})",
                gru.range_active
            ));
        }
    }
    if let Some(mirror) = &report.mirror {
        if mirror.read_begin.timed_out() {
            out.push("read_begin timed out".to_owned());
        }
        if mirror.remove_would_wait {
            out.push("interval remove would hang".to_owned());
        }
    }
    if report.interval_state.active != 0 {
        out.push(format!(
            "interval epoch leaked (seq {}, active {})",
            report.interval_state.seq, report.interval_state.active
        ));
    }
    let violations = report.violations.len()
        + report
            .steps
            .iter()
            .map(|s| s.violations.len())
            .sum::<usize>();
    if violations > 0 {
        out.push(format!("{violations} oracle violations"));
    }
    out
}
