//! `mmnotify`: see the MMU-notifier engine work, and fail the way Linux did.
//!
//! * `mmnotify demo` runs the simulator's scenarios (the 2021 seed bug, the interval epoch
//!   leak, a coherence run) under each pairing policy and prints what happened, read from the
//!   engine's and the oracle's state.
//! * `mmnotify torture` runs random concurrent operations with injected refusals, delays and
//!   panics, checks the oracle at quiet points, and shrinks any failure to a short history.
//! * `mmnotify bench` measures the fast paths against baselines.
//! * `mmnotify watch` (Linux) performs every row of the userfaultfd operation table on this
//!   process's own memory and shows what the watcher delivered and whether a mirror stayed
//!   coherent with the page tables.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod demo;
#[cfg(target_os = "linux")]
mod rcache_check;
mod torture;
mod trace;
#[cfg(target_os = "linux")]
mod watch;
#[cfg(target_os = "linux")]
mod watch_bench;

/// MMU notifiers for userspace: demos and measurements of the mmnotify engine.
#[derive(Debug, Parser)]
#[command(name = "mmnotify", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the simulator's scenarios under Exact, Kernel and Legacy and print what happened.
    Demo(demo::DemoArgs),
    /// Randomised concurrent stress with fault injection; shrinks and replays failures.
    Torture(torture::TortureArgs),
    /// Measure the notifier fast paths against naive baselines; print a table, write SVG charts.
    Bench(bench::BenchArgs),
    /// Real memory (Linux): every unmap/madvise/remap path on this process's own pages, the
    /// events the watcher delivered, their latency, and whether a mirror stayed coherent.
    #[cfg(target_os = "linux")]
    Watch(watch::WatchArgs),
    /// Print the registration cache's stale-address matrix on real memory (exit 1 on a stale hit).
    #[cfg(target_os = "linux")]
    RcacheCheck(rcache_check::RcacheCheckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Torture(args) => torture::run(&args),
        Command::Bench(args) => bench::run(&args).map(|()| ExitCode::SUCCESS),
        #[cfg(target_os = "linux")]
        Command::Watch(args) => watch::run(&args),
        #[cfg(target_os = "linux")]
        Command::RcacheCheck(args) => rcache_check::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("mmnotify: {message}");
            ExitCode::from(2)
        }
    }
}
