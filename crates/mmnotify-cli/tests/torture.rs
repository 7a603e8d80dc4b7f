//! `mmnotify torture` end to end: exit status, summary table, failure report, replay, trace.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn torture(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmnotify"))
        .arg("torture")
        .arg("--quiet")
        .args(args)
        .output()
        .expect("run mmnotify torture")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mmnotify-{}-{name}", std::process::id()))
}

/// P1: a short Exact run passes (exit 0) and prints the summary table.
#[test]
fn exact_run_passes_with_a_summary() {
    let out = torture(&[
        "--threads",
        "2",
        "--duration",
        "2s",
        "--seed",
        "1",
        "--policy",
        "exact",
        "--hang-timeout",
        "5s",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for needle in [
        "operation",
        "fault kvm",
        "oom reap",
        "invalidations",
        "refusals",
        "retries",
        "longest read_begin",
        "injected panics",
    ] {
        assert!(text.contains(needle), "missing {needle:?}:\n{text}");
    }
    let violations = text
        .lines()
        .find(|l| l.trim_start().starts_with("violations"))
        .expect("a violations line");
    assert_eq!(violations.split_whitespace().last(), Some("0"), "{text}");
    assert!(text.contains("no violation"), "{text}");
}

/// P3: under Legacy the run stops on the seed bug, prints the seed and the shrunk history,
/// the replay command, exits 1, and the trace shows starts that never got their end.
#[test]
fn legacy_run_fails_with_a_shrunk_history_and_trace() {
    let trace = temp_file("torture-legacy.json");
    let out = torture(&[
        "--threads",
        "2",
        "--duration",
        "10s",
        "--seed",
        "1",
        "--policy",
        "legacy",
        "--hang-timeout",
        "200ms",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("VIOLATION under Legacy (seed 1"), "{text}");
    assert!(text.contains("kvm's in_progress is"), "{text}");
    assert!(text.contains("the interval epoch is open"), "{text}");
    assert!(text.contains("shortest history that shows it"), "{text}");
    assert!(text.contains("1. oom reap (process_mrelease)"), "{text}");
    assert!(text.contains("replay: mmnotify torture --threads 1 --seed 1 --policy legacy"));
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = json["traceEvents"].as_array().expect("traceEvents");
    assert!(
        events.iter().any(|e| e["name"] == "start (no end)"),
        "no unpaired start in the trace"
    );
    let _ = std::fs::remove_file(trace);
}

/// With one thread and an operation budget, a seed gives the same run twice.
#[test]
fn one_thread_seed_is_reproducible() {
    let table = |out: &Output| -> Vec<String> {
        stdout(out)
            .lines()
            .filter(|l| {
                !l.contains("operations/s")
                    && !l.contains("read_begin ")
                    && !l.starts_with("torture:")
            })
            .map(str::to_owned)
            .collect()
    };
    let args = [
        "--threads",
        "1",
        "--duration",
        "60s",
        "--max-ops",
        "800",
        "--seed",
        "5",
    ];
    let a = torture(&args);
    let b = torture(&args);
    assert_eq!(a.status.code(), Some(0), "{}", stdout(&a));
    assert!(stdout(&a).contains("800"), "{}", stdout(&a));
    assert_eq!(table(&a), table(&b));
}

/// Bad arguments are usage errors (exit 2).
#[test]
fn bad_arguments_exit_2() {
    assert_eq!(torture(&["--duration", "5x"]).status.code(), Some(2));
    assert_eq!(torture(&["--policy", "linux"]).status.code(), Some(2));
    assert_eq!(
        torture(&["--threads", "0", "--duration", "1s"])
            .status
            .code(),
        Some(2)
    );
}
