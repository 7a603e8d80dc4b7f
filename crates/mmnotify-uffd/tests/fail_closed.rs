//! Fail closed (issue 9, item 6): after a fork, a reader death or a lost userfaultfd, every
//! check of a mirror fails — `read_retry` reports a collision, `read_begin` returns a typed
//! error — and nothing hangs. Cases that break or configure the process's one watcher run in
//! a child process (this test binary re-run with a role); every wait is bounded.

#![allow(clippy::disallowed_types)]

mod common;

use std::ffi::c_void;
use std::time::{Duration, Instant};

use common::*;
use mmnotify::Event;
use mmnotify_uffd::{Error, FailReason, ForkEvents, Health, Watcher, WatcherOptions};

const LIMIT: Duration = Duration::from_secs(30);

/// The parent's side of the fork checks, shared by the in-process test (no EVENT_FORK) and
/// the EVENT_FORK role: fork; the child checks that its copy fails closed and unmaps the
/// watched memory (which must not hang); the parent's watcher goes on.
fn fork_child_fails_closed_and_may_unmap(w: &Watcher) {
    let r = mirror_region(w, map_anon(4) as u64, 4);
    let seq = r.iv.read_begin().unwrap();
    let (addr, len) = (r.addr, r.len());
    let iv = r.iv.clone();
    let wc = w.clone();
    let code = fork_and_wait(LIMIT, move || {
        // In the child: only atomics, plain system calls and _exit.
        if !iv.read_retry(seq) {
            return 10; // a stale check passed
        }
        if !matches!(iv.read_begin(), Err(Error::Forked)) {
            return 11;
        }
        if wc.health() != Health::Forked {
            return 12;
        }
        if !matches!(wc.watch(addr, len as u64), Err(Error::Forked)) {
            return 13;
        }
        // SAFETY: the child's own copy of the region.
        if unsafe { libc::munmap(addr as *mut c_void, len) } != 0 {
            return 14;
        }
        0
    });
    assert_eq!(code, 0, "child check {code} failed");
    // The parent is unaffected: still running, its region intact and coherent.
    assert_eq!(w.health(), Health::Running);
    w.synchronize(LIMIT).unwrap();
    assert!(r.mirror.fill(&r.iv, r.addr, 4));
    assert!(r.mirror.incoherent().is_empty());
    // SAFETY: the parent's region.
    assert_eq!(unsafe { libc::munmap(r.ptr(), r.len()) }, 0);
    w.synchronize(LIMIT).unwrap();
    assert_eq!(r.mirror.len(), 0);
}

#[test]
fn a_forked_child_fails_closed_and_unmaps_without_hanging() {
    let w = Watcher::get().unwrap();
    assert!(!w.features().fork_events);
    fork_child_fails_closed_and_may_unmap(&w);
}

#[test]
fn with_fork_events_a_forked_child_fails_closed_and_unmaps_without_hanging() {
    let (ok, out) = run_child("child_entry", "fork_events", LIMIT, false);
    assert!(ok && out.contains("ROLE-OK"), "{out}");
}

#[test]
fn a_killed_reader_fails_closed() {
    let (ok, out) = run_child("child_entry", "kill_reader", LIMIT, false);
    assert!(ok && out.contains("ROLE-OK"), "{out}");
}

#[test]
fn a_closed_userfaultfd_fails_closed() {
    let (ok, out) = run_child("child_entry", "close_uffd", LIMIT, false);
    assert!(ok && out.contains("ROLE-OK"), "{out}");
}

#[test]
fn a_userfaultfd_replaced_by_a_stranger_is_never_read_and_fails_closed() {
    let (ok, out) = run_child("child_entry", "replaced_uffd", LIMIT, false);
    assert!(ok && out.contains("ROLE-OK"), "{out}");
}

#[test]
fn a_forked_child_can_build_a_watcher_of_its_own() {
    let (ok, out) = run_child("child_entry", "child_watcher", LIMIT, false);
    assert!(ok && out.contains("ROLE-OK"), "{out}");
}

fn role_child_watcher() {
    let w = Watcher::get().unwrap();
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    let seq = r.iv.read_begin().unwrap();
    let iv = r.iv.clone();
    let code = fork_and_wait(LIMIT, move || {
        // The inherited watcher fails closed...
        if !iv.read_retry(seq) || !matches!(iv.read_begin(), Err(Error::Forked)) {
            return 20;
        }
        // ...and the child builds its own, which works and is not mistaken for a fork.
        let Ok(mine) = Watcher::get() else { return 21 };
        if mine.health() != Health::Running {
            return 22;
        }
        let region = mirror_region(&mine, map_anon(2) as u64, 2);
        // SAFETY: the child's own region.
        if unsafe { libc::munmap(region.ptr(), region.len()) } != 0 {
            return 23;
        }
        if mine.synchronize(LIMIT).is_err() || region.mirror.len() != 0 {
            return 24;
        }
        // The parent's gates still say "forked" here.
        if !matches!(iv.read_begin(), Err(Error::Forked)) {
            return 25;
        }
        0
    });
    assert_eq!(code, 0, "child check {code} failed");
    assert_eq!(w.health(), Health::Running);
}

fn wait_health(w: &Watcher, want: Health) {
    let start = Instant::now();
    while w.health() != want {
        assert!(
            start.elapsed() < LIMIT,
            "health stayed {:?}, wanted {want:?}",
            w.health()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// After a failure: checks fail closed, unmapping watched memory does not hang, the mirror got
/// the release, and a new watcher can be had.
fn failed_watcher_checks(w: &Watcher, r: &Region, seq: mmnotify_uffd::WatchSeq, why: FailReason) {
    assert!(r.iv.read_retry(seq), "a stale check passed");
    match r.iv.read_begin() {
        Err(Error::Failed { reason }) => assert_eq!(reason, why),
        other => panic!("read_begin after failure: {other:?}"),
    }
    assert!(matches!(
        w.watch(r.addr, r.len() as u64),
        Err(Error::Failed { .. })
    ));
    // Unmapping watched memory returns: the reader closed the userfaultfd on its way out.
    let (a, l) = (r.addr as usize, r.len());
    within(LIMIT, "munmap after the watcher failed", move || {
        // SAFETY: the role's own region.
        assert_eq!(unsafe { libc::munmap(a as *mut c_void, l) }, 0);
    });
    // The dispatcher released the Mm: every mirror was told to drop everything.
    let start = Instant::now();
    while !r.mirror.events().iter().any(|e| e.2 == Event::Release) {
        assert!(start.elapsed() < LIMIT, "{:?}", r.mirror.events());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(r.mirror.len(), 0);
    // A new watcher replaces the failed one and works.
    let fresh = Watcher::get().unwrap();
    assert_eq!(fresh.health(), Health::Running);
    let r2 = mirror_region(&fresh, map_anon(2) as u64, 2);
    // SAFETY: the role's own region.
    assert_eq!(unsafe { libc::munmap(r2.ptr(), r2.len()) }, 0);
    fresh.synchronize(LIMIT).unwrap();
    assert_eq!(r2.mirror.len(), 0);
}

fn role_kill_reader() {
    let w = Watcher::get().unwrap();
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    let seq = r.iv.read_begin().unwrap();
    w.inject_fault(mmnotify_uffd::Fault::KillReader);
    wait_health(&w, Health::Failed(FailReason::ReaderDied));
    failed_watcher_checks(&w, &r, seq, FailReason::ReaderDied);
}

fn role_close_uffd() {
    let w = Watcher::get().unwrap();
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    let seq = r.iv.read_begin().unwrap();
    w.inject_fault(mmnotify_uffd::Fault::CloseUffd);
    wait_health(&w, Health::Failed(FailReason::UffdLost));
    failed_watcher_checks(&w, &r, seq, FailReason::UffdLost);
}

fn role_replaced_uffd() {
    use std::os::fd::IntoRawFd;
    let w = Watcher::get().unwrap();
    assert!(!w.features().fork_events);
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    let seq = r.iv.read_begin().unwrap();
    // A descriptor of ours that a misread "FORK" message would name.
    let victim = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
    // A pipe holding one userfaultfd-message-sized record that decodes as FORK of `victim`
    // (UFFD_EVENT_FORK is 0x13; the child descriptor is the u32 at offset 8).
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let mut msg = [0u8; 32];
    msg[0] = 0x13;
    msg[8..12].copy_from_slice(&(victim as u32).to_ne_bytes());
    // SAFETY: writing our buffer to the pipe we just made.
    let n = unsafe { libc::write(fds[1], msg.as_ptr().cast(), msg.len()) };
    assert_eq!(n, 32);
    w.inject_fault(mmnotify_uffd::Fault::ReplaceUffd { with: fds[0] });
    // No ioctl goes to the stranger's file, even before the reader noticed.
    assert!(matches!(
        w.watch(r.addr, ps() as u64),
        Err(Error::Failed {
            reason: FailReason::UffdLost
        })
    ));
    wait_health(&w, Health::Failed(FailReason::UffdLost));
    // The stranger's data was not taken for a message: nothing of ours was closed.
    // SAFETY: F_GETFD only asks whether the number is open.
    let flags = unsafe { libc::fcntl(victim, libc::F_GETFD) };
    assert_ne!(
        flags, -1,
        "the reader closed a descriptor named by a stranger's data"
    );
    assert_eq!(w.stats().forks, 0, "{:?}", w.stats());
    failed_watcher_checks(&w, &r, seq, FailReason::UffdLost);
}

fn role_fork_events() {
    let w = Watcher::with_options(WatcherOptions {
        fork_events: ForkEvents::Required,
        ..WatcherOptions::default()
    })
    .expect("EVENT_FORK (this role runs as root)");
    assert!(w.features().fork_events);
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    fork_child_fails_closed_and_may_unmap(&w);
    w.synchronize(LIMIT).unwrap();
    assert!(w.stats().forks >= 1, "{:?}", w.stats());
    // The parent's mirrors heard of the fork (its private memory became copy-on-write).
    assert!(
        r.mirror
            .events()
            .iter()
            .any(|e| e.2 == Event::ProtectionPage && e.0 == 0),
        "{:?}",
        r.mirror.events()
    );
}

/// The entry point of the child processes above (ignored in a normal run).
#[test]
#[ignore = "entry point for child processes started by the tests of this file"]
fn child_entry() {
    match role().as_deref() {
        Some("kill_reader") => role_kill_reader(),
        Some("close_uffd") => role_close_uffd(),
        Some("replaced_uffd") => role_replaced_uffd(),
        Some("fork_events") => role_fork_events(),
        Some("child_watcher") => role_child_watcher(),
        other => panic!("child_entry needs MMNOTIFY_UFFD_ROLE, got {other:?}"),
    }
    println!("ROLE-OK");
}
