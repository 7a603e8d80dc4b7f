//! Acceptance: the stale-address matrix of issue 10 item 7 on real memory, with the io_uring
//! registrar (judged by what WRITE_FIXED writes) and with the page-frame registrar (judged by
//! the recorded frames), for plain calls and for the cooperative wrappers; and the negative
//! control: blind memory cached on trust, with plain calls, does go stale (so the judge can
//! see a stale hit when there is one).

#![allow(
    clippy::disallowed_types,
    reason = "test code: std::sync is fine outside the engine (see clippy.toml)"
)]

mod common;

use std::time::Duration;

use mmnotify_rcache::check::{run_all, Judge, Mode, Outcome, Path};
use mmnotify_rcache::BlindSpotPolicy;

fn print(o: &Outcome) {
    println!(
        "{:<22} {:?}/{:?} {:?}: cached {} hit {} fresh {} changed {} {}",
        o.path.to_string(),
        o.mode,
        o.policy,
        o.judge,
        o.cached,
        o.hit,
        o.fresh,
        o.changed,
        o.skipped.as_deref().unwrap_or("")
    );
}

fn matrix(judge: Judge) {
    let mut stale = Vec::new();
    for (mode, policy) in [
        (Mode::Plain, BlindSpotPolicy::Uncached),
        (Mode::Plain, BlindSpotPolicy::ValidateFrames),
        (Mode::Wrapper, BlindSpotPolicy::Trust),
    ] {
        for (path, r) in run_all(mode, policy, judge) {
            let o = r.unwrap_or_else(|e| panic!("{path} {mode:?} {policy:?}: {e}"));
            print(&o);
            if o.stale() {
                stale.push(o.clone());
            }
            // Memory the watcher sees is cached; under Trust everything is.
            if path.has_event() && path != Path::Remove || policy == BlindSpotPolicy::Trust {
                assert!(
                    o.cached || o.skipped.is_some(),
                    "{path} was not cached: {o:?}"
                );
            }
        }
    }
    assert!(stale.is_empty(), "stale hits: {stale:#?}");
}

#[test]
fn matrix_io_uring_writes_the_new_contents() {
    let _serial = common::serial();
    common::bounded(Duration::from_secs(60), || matrix(Judge::Uring));
}

#[test]
fn matrix_page_frames_are_current() {
    let _serial = common::serial();
    common::bounded(Duration::from_secs(60), || matrix(Judge::Frames));
}

#[test]
fn negative_control_blind_memory_trusted_with_plain_calls_goes_stale() {
    let _serial = common::serial();
    common::bounded(Duration::from_secs(60), || {
        for path in [Path::Shmdt, Path::PunchHole, Path::Ftruncate] {
            let o = mmnotify_rcache::check::run(
                path,
                Mode::Plain,
                BlindSpotPolicy::Trust,
                Judge::Uring,
            )
            .unwrap();
            print(&o);
            assert!(
                o.cached && o.hit && !o.fresh,
                "{path}: expected the documented stale hit: {o:?}"
            );
        }
    });
}
