//! `mmnotify watch` end to end, on this process's real memory: the binary runs under a
//! timeout, and its table is parsed. Every path mmnotify claims to cover must be reported
//! coherent with the event it is known to deliver; every blind spot without its wrapper must
//! be reported as a documented miss; and a mirror that ignores its invalidations must make the
//! command fail.

#![cfg(target_os = "linux")]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `mmnotify watch <args>`; fails the test if it runs longer than a minute (a hang in an
/// unmapping call would otherwise stall the suite).
fn watch(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mmnotify"))
        .arg("watch")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mmnotify watch");
    let limit = Duration::from_secs(60);
    let began = Instant::now();
    while child.try_wait().expect("wait for mmnotify").is_none() {
        if began.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "mmnotify watch hung past {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

/// One row of the table.
#[derive(Debug)]
struct Row {
    path: String,
    claim: String,
    events: String,
    verdict: String,
}

/// The table's rows: the lines between the dashed rule and the first blank line.
fn rows(stdout: &str) -> Vec<Row> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("-----"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let mut cols = l.split_whitespace();
            let path = cols.next().unwrap_or_default().to_owned();
            let claim = cols.next().unwrap_or_default().to_owned();
            // The verdict follows the last double space; the events fill the middle.
            let verdict = l.rsplit("  ").next().unwrap_or_default().trim().to_owned();
            Row {
                path,
                claim,
                events: l.to_owned(),
                verdict,
            }
        })
        .collect()
}

/// Every path of the table, how mmnotify covers it, and the event kind its subscriber must see.
const EXPECTED: &[(&str, &str, Option<&str>)] = &[
    ("munmap-whole", "uffd-event", Some("Unmap[0,8)")),
    ("munmap-partial", "uffd-event", Some("Unmap[2,5)")),
    ("munmap-raw-syscall", "uffd-event", Some("Unmap[0,4)")),
    ("munmap-other-thread", "uffd-event", Some("Unmap[0,4)")),
    ("madv-dontneed", "uffd-event", Some("Clear[1,3)")),
    ("madv-free", "uffd-event", Some("Clear[1,3)")),
    ("madv-remove-memfd", "uffd-event", Some("Clear[0,2)")),
    ("mremap-move", "uffd-event", Some("Unmap[0,4)")),
    ("map-fixed-over", "uffd-event", Some("Unmap[1,3)")),
    ("brk-shrink", "uffd-event", Some("Unmap[0,4)")),
    ("munmap-wrapped", "wrapper", Some("Unmap[0,4)")),
    ("shmdt", "blind-spot", None),
    ("shmdt-wrapped", "wrapper", Some("Unmap[0,2)")),
    ("punch-hole", "blind-spot", None),
    ("punch-hole-wrapped", "wrapper", Some("Clear[0,2)")),
    ("ftruncate", "blind-spot", None),
    ("ftruncate-wrapped", "wrapper", Some("Unmap[1,4)")),
];

/// Paths that may be skipped with a printed reason on a machine without them (brk moved by
/// the allocator, no SysV shared memory); every other path must run.
const MAY_SKIP: &[&str] = &["brk-shrink", "shmdt", "shmdt-wrapped"];

#[test]
fn every_claimed_path_is_reported_coherent_and_blind_spots_as_misses() {
    let out = watch(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "mmnotify watch failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    let rows = rows(&stdout);
    assert_eq!(rows.len(), EXPECTED.len(), "{stdout}");
    for (path, claim, event) in EXPECTED {
        let row = rows
            .iter()
            .find(|r| r.path == *path)
            .unwrap_or_else(|| panic!("no row for {path}:\n{stdout}"));
        assert_eq!(row.claim, *claim, "{row:?}");
        if row.verdict.starts_with("skipped") {
            assert!(MAY_SKIP.contains(path), "{path} was skipped: {row:?}");
            continue;
        }
        match event {
            Some(event) => {
                assert_eq!(row.verdict, "coherent", "{row:?}\n{stdout}");
                assert!(
                    row.events.contains(event),
                    "{path}: the subscriber should have seen {event}: {row:?}"
                );
            }
            None => {
                assert!(
                    row.verdict.starts_with("documented miss"),
                    "{path}: a blind spot without its wrapper must show the miss: {row:?}"
                );
                assert!(row.events.contains(" none "), "{row:?}");
            }
        }
    }
    assert!(stdout.contains(" 0 failures"), "{stdout}");
}

/// The check can fail: with a mirror that records invalidations but keeps its entries, every
/// covered path is reported incoherent and the exit status is 1.
#[test]
fn a_mirror_that_ignores_invalidations_fails_the_run() {
    let out = watch(&["--ignore-invalidations"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let rows = rows(&stdout);
    let covered: Vec<&Row> = rows
        .iter()
        .filter(|r| r.claim != "blind-spot" && !r.verdict.starts_with("skipped"))
        .collect();
    assert!(covered.len() >= 10, "{stdout}");
    for row in covered {
        assert!(row.verdict.starts_with("INCOHERENT"), "{row:?}");
    }
    assert!(stdout.contains("this is a bug in mmnotify"), "{stdout}");
}

/// `--only` selects paths by name; a name that matches nothing is an error that lists them.
#[test]
fn only_selects_paths_and_rejects_unknown_names() {
    let out = watch(&["--only", "madv"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let names: Vec<String> = rows(&stdout).into_iter().map(|r| r.path).collect();
    assert_eq!(
        names,
        ["madv-dontneed", "madv-free", "madv-remove-memfd"],
        "{stdout}"
    );
    let out = watch(&["--only", "no-such-path"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no path matches"), "{stderr}");
    assert!(stderr.contains("munmap-whole"), "{stderr}");
}

/// `mmnotify bench --quick --group watch` measures every figure of the watcher group (no speed
/// is asserted: that is the benchmark's job, not a test's), writes its markdown table, and
/// states the 1.1x target with a verdict.
#[test]
fn bench_watch_group_reports_every_figure() {
    let out_dir = std::env::temp_dir().join(format!("mmnotify-watch-bench-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_mmnotify"))
        .args(["bench", "--quick", "--group", "watch", "--out"])
        .arg(&out_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mmnotify bench");
    let began = Instant::now();
    while child.try_wait().expect("wait for mmnotify").is_none() {
        if began.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("mmnotify bench --quick --group watch hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for call in ["munmap", "madvise", "mremap"] {
        for variant in [
            "unwatched",
            "bare-reader",
            "bare-poll-reader",
            "watched-0",
            "watched-1",
            "watched-1000",
            "latency-median",
            "latency-p99",
        ] {
            let id = format!("w/{call}/{variant}");
            let line = stdout
                .lines()
                .find(|l| l.split_whitespace().next() == Some(id.as_str()))
                .unwrap_or_else(|| panic!("no row {id}:\n{stdout}"));
            let value: f64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no value in {line}"));
            assert!(value > 0.0, "{line}");
        }
    }
    let target = stdout
        .lines()
        .find(|l| l.contains("(w) a watched call costs at most 1.1x"))
        .unwrap_or_else(|| panic!("no target line:\n{stdout}"));
    let verdict = target
        .split(['[', ']'])
        .nth(1)
        .map(str::trim)
        .unwrap_or_default();
    assert!(
        verdict == "met" || verdict == "MISSED",
        "the target must be judged: {target}"
    );
    let md = std::fs::read_to_string(out_dir.join("watch.md")).expect("watch.md written");
    assert!(md.contains("`w/munmap/watched-1000`"), "{md}");
    std::fs::remove_dir_all(&out_dir).ok();
}
