//! `mmnotify demo` end to end: the table, the exit status and the trace file.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn mmnotify() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mmnotify"))
}

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mmnotify-{}-{name}", std::process::id()))
}

/// The full demo: Exact is coherent everywhere (exit 0), and the table shows Legacy losing
/// ends in the seed scenario and Kernel hanging on the interval leak.
#[test]
fn demo_table_shows_each_policy() {
    let out = mmnotify().arg("demo").output().expect("run mmnotify demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}");
    let row = |scenario: &str, policy: &str| -> String {
        stdout
            .lines()
            .find(|l| {
                let mut cols = l.split_whitespace();
                cols.next() == Some(scenario) && cols.next() == Some(policy)
            })
            .unwrap_or_else(|| panic!("no row for {scenario}/{policy}:\n{stdout}"))
            .to_owned()
    };
    assert!(row("seed", "legacy").contains("KVM in-progress stuck"));
    assert!(row("seed", "legacy").contains("GRU fault hung"));
    assert!(row("interval-leak", "kernel").contains("read_begin timed out"));
    for scenario in ["seed", "interval-leak", "coherence"] {
        assert!(
            row(scenario, "exact").ends_with("coherent"),
            "{}",
            row(scenario, "exact")
        );
    }
}

/// Bad arguments are reported, with a non-zero exit.
#[test]
fn demo_rejects_unknown_names() {
    let out = mmnotify()
        .args(["demo", "--policy", "strict"])
        .output()
        .expect("run mmnotify");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown policy"));
    let out = mmnotify()
        .args(["demo", "--scenario", "nope"])
        .output()
        .expect("run mmnotify");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario"));
}

/// The trace file is trace-event JSON whose slices and instants match the callbacks the
/// subscribers received: every start..end window is one slice, every refusal one instant.
#[test]
fn trace_slices_match_callbacks() {
    let path = temp_file("seed-legacy.json");
    let out = mmnotify()
        .args([
            "demo",
            "--scenario",
            "seed",
            "--policy",
            "legacy",
            "--trace",
        ])
        .arg(&path)
        .output()
        .expect("run mmnotify demo --trace");
    assert!(out.status.success());
    let trace: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    std::fs::remove_file(&path).ok();
    let events = trace["traceEvents"].as_array().expect("traceEvents array");

    let mut track_names: HashMap<u64, String> = HashMap::new();
    for e in events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
    {
        track_names.insert(
            e["tid"].as_u64().unwrap(),
            e["args"]["name"].as_str().unwrap().to_owned(),
        );
    }
    // (track, name) -> count
    let mut counts: HashMap<(String, String), u64> = HashMap::new();
    for e in events.iter().filter(|e| e["ph"] == "X" || e["ph"] == "i") {
        for key in ["ph", "pid", "tid", "name", "ts"] {
            assert!(!e[key].is_null(), "event without {key}: {e}");
        }
        if e["ph"] == "X" {
            assert!(e["dur"].as_u64().unwrap() >= 1);
        }
        let track = track_names[&e["tid"].as_u64().unwrap()].clone();
        *counts
            .entry((track, e["name"].as_str().unwrap().to_owned()))
            .or_default() += 1;
    }
    let count = |track: &str, name: &str| {
        counts
            .get(&(track.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or(0)
    };

    // The same scenario, run in-process, gives the callback counts to compare with.
    let report = mmnotify_sim::run(mmnotify_sim::Scenario::Seed, mmnotify::Policy::Legacy);
    assert!(!report.subscribers.is_empty());
    for sub in &report.subscribers {
        let c = sub.counts;
        let name = sub.name.as_str();
        assert_eq!(
            count(name, "invalidate") + count(name, "start (no end)"),
            c.starts,
            "{name}: slices vs starts"
        );
        assert_eq!(
            count(name, "invalidate") + count(name, "end without start"),
            c.ends,
            "{name}: slices vs ends"
        );
        assert_eq!(
            count(name, "refused"),
            c.refusals + c.interval_refusals,
            "{name}: refusals"
        );
        assert_eq!(count(name, "release"), c.releases, "{name}: releases");
    }
    // Legacy loses ends in this scenario: some window must be open-ended in the trace.
    assert!(counts.keys().any(|(_, n)| n == "start (no end)"));
}
