//! `mmnotify rcache-check`: the stale-address matrix of the registration cache, on real memory.
//!
//! For every path of the watcher's operation table, plain and through the cooperative wrapper,
//! a cache maps memory, registers it (get → put), performs the operation, maps new memory with
//! other contents at the same address, and gets again (`mmnotify_rcache::check` has the
//! scenario). A cell passes when the second get missed and its registration is of the new
//! memory: with io_uring, `WRITE_FIXED` of the registration wrote the new contents; with the
//! page-frame registrar, the recorded frames are those mapped now. Exit status 1 on any stale
//! hit, 2 when a cell could not run.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use mmnotify_rcache::check::{self, Judge, Mode, Outcome, Path};
use mmnotify_rcache::BlindSpotPolicy;

/// Options of `mmnotify rcache-check`.
#[derive(Debug, Args)]
pub(crate) struct RcacheCheckArgs {
    /// Which registrar judges the registrations.
    #[arg(long, value_enum, default_value_t = Registrars::Both)]
    registrar: Registrars,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Registrars {
    /// io_uring fixed buffers (what WRITE_FIXED writes).
    Uring,
    /// Page frames from /proc/self/pagemap (or content fingerprints).
    Frames,
    /// Both.
    Both,
}

const COLUMNS: [(Mode, BlindSpotPolicy, &str); 3] = [
    (Mode::Plain, BlindSpotPolicy::Uncached, "plain call"),
    (
        Mode::Plain,
        BlindSpotPolicy::ValidateFrames,
        "plain, validate frames",
    ),
    (Mode::Wrapper, BlindSpotPolicy::Trust, "wrapper"),
];

fn cell(r: &Result<Outcome, String>) -> (String, bool, bool) {
    match r {
        Err(e) => (format!("ERROR {e}"), false, true),
        Ok(o) if o.skipped.is_some() => ("skipped".to_string(), false, false),
        Ok(o) if o.stale() => (
            format!("STALE ({})", if o.hit { "hit" } else { "old pages" }),
            true,
            false,
        ),
        Ok(o) => {
            let how = if o.cached { "miss" } else { "uncached" };
            (format!("ok: {how}, new data"), false, false)
        }
    }
}

#[derive(Debug, Default)]
struct Totals {
    hits: u64,
    misses: u64,
    invalidations: u64,
    deferred: u64,
    registrations: u64,
    deregistrations: u64,
    blind_uncached: u64,
    validated: u64,
    validation_failures: u64,
}

impl Totals {
    fn add(&mut self, s: &mmnotify_rcache::Stats) {
        self.hits += s.hits;
        self.misses += s.misses;
        self.invalidations += s.invalidations;
        self.deferred += s.deferred_deregistrations;
        self.registrations += s.registrations;
        self.deregistrations += s.deregistrations;
        self.blind_uncached += s.blind_uncached;
        self.validated += s.blind_validated_hits;
        self.validation_failures += s.blind_validation_failures;
    }
}

/// Runs the matrix and prints it.
pub(crate) fn run(args: &RcacheCheckArgs) -> Result<ExitCode, String> {
    let judges: &[Judge] = match args.registrar {
        Registrars::Uring => &[Judge::Uring],
        Registrars::Frames => &[Judge::Frames],
        Registrars::Both => &[Judge::Uring, Judge::Frames],
    };
    let frames = if mmnotify_uffd::pagemap::pfns_visible() {
        "page frame numbers"
    } else {
        "content fingerprints (no CAP_SYS_ADMIN)"
    };
    let (mut stale, mut errors) = (0, 0);
    let mut total = Totals::default();
    for judge in judges {
        match judge {
            Judge::Uring => println!(
                "registrar: io_uring fixed buffers — pass = the second get misses and WRITE_FIXED \
                 writes the new contents"
            ),
            Judge::Frames => println!(
                "registrar: page frames ({frames}) — pass = the second get misses and records the \
                 frames mapped now"
            ),
        }
        print!("{:<22}", "path");
        for (_, _, title) in COLUMNS {
            print!(" | {title:<26}");
        }
        println!();
        for path in Path::ALL {
            let label = if path.has_event() {
                path.to_string()
            } else {
                format!("{path} *")
            };
            print!("{label:<22}");
            for (mode, policy, _) in COLUMNS {
                let r = check::run(path, mode, policy, *judge);
                if let Ok(o) = &r {
                    total.add(&o.stats);
                }
                let (text, is_stale, is_error) = cell(&r);
                let text = if mode == Mode::Wrapper && !path.has_wrapper() {
                    format!("{text} (no wrapper)")
                } else {
                    text
                };
                stale += usize::from(is_stale);
                errors += usize::from(is_error);
                print!(" | {text:<26}");
            }
            println!();
        }
        println!();
    }
    println!(
        "* userfaultfd sends no event: the plain call is safe only because the cache recognises \
         such memory (SysV shm, file mappings) and does not cache it (or validates its \
         frames on every hit); the wrapper notifies."
    );
    println!(
        "cache statistics over all cells: {} hits, {} misses, {} invalidations, {} deferred \
         deregistrations, {} registrations, {} deregistrations, {} blind registered per use, \
         {} frame-validated hits, {} frame validations failed",
        total.hits,
        total.misses,
        total.invalidations,
        total.deferred,
        total.registrations,
        total.deregistrations,
        total.blind_uncached,
        total.validated,
        total.validation_failures
    );
    println!("stale hits: {stale}, cells that could not run: {errors}");
    Ok(if stale > 0 {
        ExitCode::from(1)
    } else if errors > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
