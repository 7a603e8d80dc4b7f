//! `mmnotify torture`: randomised concurrent stress of the simulator and the engine, with
//! replayable, shrunk failure reports (see `mmnotify_sim::torture`).
//!
//! Exit status: 0 when no violation was found, 1 on a violation (after printing the seed and
//! the shortest single-threaded history that shows it), 2 on a usage or setup error.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use mmnotify::Policy;
use mmnotify_sim::torture::{self, Progress, TortureConfig};

/// Options of `mmnotify torture`.
#[derive(clap::Args, Debug)]
pub(crate) struct TortureArgs {
    /// Worker threads applying random operations concurrently.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// How long to run: `30s`, `500ms`, `2m`, or plain seconds.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the workers' generators (default: from the clock, printed). With
    /// `--threads 1`, a seed replays the same history exactly.
    #[arg(long)]
    seed: Option<u64>,
    /// Pairing policy: exact, kernel or legacy.
    #[arg(long, default_value = "exact")]
    policy: Policy,
    /// Stop after this many operations (exactly reproducible with `--threads 1`).
    #[arg(long)]
    max_ops: Option<u64>,
    /// Bound of every wait that detects a hang (a GRU fault, a `read_begin`, a memslot update).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    hang_timeout: Duration,
    /// Operations per worker between two quiet checks.
    #[arg(long, default_value_t = 64)]
    ops_per_check: usize,
    /// Write a Chrome trace-event file (ui.perfetto.dev) of the shrunk failing history, or of
    /// the last address space of a passing run.
    #[arg(long, value_name = "FILE")]
    trace: Option<std::path::PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Parses `30s`, `500ms`, `2m`, `1h` or a plain number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 30s, 500ms, 2m"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("invalid duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Runs the torture; see the module docs for the exit status.
pub(crate) fn run(args: &TortureArgs) -> Result<ExitCode, String> {
    if args.threads == 0 {
        return Err("--threads must be at least 1".to_owned());
    }
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let cfg = TortureConfig {
        policy: args.policy,
        threads: args.threads,
        duration: args.duration,
        max_ops: args.max_ops,
        seed,
        hang_timeout: args.hang_timeout,
        ops_per_epoch: args.ops_per_check.max(1),
        keep_trace: args.trace.is_some(),
        ..TortureConfig::default()
    };
    println!(
        "mmnotify torture: policy {}, {} thread{}, seed {seed}, duration {:?}{}",
        cfg.policy.name(),
        cfg.threads,
        if cfg.threads == 1 { "" } else { "s" },
        cfg.duration,
        cfg.max_ops
            .map(|m| format!(", at most {m} operations"))
            .unwrap_or_default()
    );
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        // Draws only on a terminal (indicatif hides itself otherwise, e.g. in CI logs).
        let bar = ProgressBar::new(cfg.duration.as_millis().max(1) as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
                .map_err(|e| e.to_string())?,
        );
        bar
    };
    let on_progress = |p: &Progress| {
        let secs = p.elapsed.as_secs_f64().max(1e-9);
        bar.set_position((p.elapsed.as_millis() as u64).min(bar.length().unwrap_or(0)));
        bar.set_message(format!(
            "{} ops, {:.0} ops/s, {} checks, {} violations",
            p.ops,
            p.ops as f64 / secs,
            p.checks,
            p.violations
        ));
    };
    let report = torture::run(&cfg, &on_progress).map_err(|e| format!("torture setup: {e}"))?;
    bar.finish_and_clear();
    println!("{}", report.summary);
    if let Some(path) = &args.trace {
        let name = format!("torture / {} / seed {seed}", cfg.policy.name());
        let json = crate::trace::chrome_trace_events(&name, &report.trace);
        std::fs::write(path, json.to_string())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("trace: {} ({} events)", path.display(), report.trace.len());
    }
    match &report.failure {
        None => {
            println!("no violation");
            Ok(ExitCode::SUCCESS)
        }
        Some(failure) => {
            println!();
            println!("{failure}");
            println!(
                "replay: mmnotify torture --threads 1 --seed {seed} --policy {}",
                cfg.policy.name()
            );
            Ok(ExitCode::from(1))
        }
    }
}
