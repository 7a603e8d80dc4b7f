//! Unprivileged (issue 9, acceptance): a child process drops to uid/gid 65534 with no
//! supplementary groups (CI runs as root, so the test makes itself unprivileged) and shows the
//! watcher working there: created with `UFFD_USER_MODE_ONLY`, EVENT_FORK refused with a typed
//! error, memory watched, an munmap delivered, the mirror judged coherent (by page contents:
//! an unprivileged reader sees no page frame numbers).

#![allow(clippy::disallowed_types)]

mod common;

use std::time::Duration;

use common::*;
use mmnotify::Event;
use mmnotify_uffd::{pagemap, Error, ForkEvents, Watcher, WatcherOptions};

#[test]
fn the_watcher_works_for_an_unprivileged_user() {
    // SAFETY: reading our own ids.
    if unsafe { libc::geteuid() } != 0 {
        // Already unprivileged: run the role in-process instead of dropping privileges.
        unprivileged_role();
        return;
    }
    let (ok, out) = run_child("child_entry", "unprivileged", Duration::from_secs(30), true);
    assert!(ok && out.contains("ROLE-OK uid=65534"), "{out}");
    println!("{out}");
}

fn unprivileged_role() {
    // EVENT_FORK needs CAP_SYS_PTRACE: refused, typed.
    match Watcher::with_options(WatcherOptions {
        fork_events: ForkEvents::Required,
        ..WatcherOptions::default()
    }) {
        Err(Error::ForkEventsNotPermitted { .. }) => {}
        other => panic!("EVENT_FORK as an unprivileged user: {other:?}"),
    }
    let w = Watcher::get().expect("an unprivileged watcher (Linux >= 5.11)");
    assert!(!w.features().fork_events);
    assert!(
        !pagemap::pfns_visible(),
        "an unprivileged reader must not see PFNs"
    );
    let r = mirror_region(&w, map_anon(4) as u64, 4);
    // SAFETY: the role's own region.
    assert_eq!(unsafe { libc::munmap(r.ptr(), r.len()) }, 0);
    r.sync(&w);
    assert!(r
        .mirror
        .events()
        .contains(&(r.addr, r.addr + r.len() as u64, Event::Unmap)));
    assert_eq!(r.mirror.len(), 0);
    assert!(r.mirror.incoherent().is_empty());
    // A madvise on fresh memory, judged by contents.
    let r2 = mirror_region(&w, map_anon(2) as u64, 2);
    assert_eq!(
        // SAFETY: the role's own region.
        unsafe { libc::madvise(r2.ptr(), r2.len(), libc::MADV_DONTNEED) },
        0
    );
    r2.sync(&w);
    assert_eq!(r2.mirror.len(), 0);
    assert!(r2.mirror.fill(&r2.iv, r2.addr, 2));
    assert!(r2.mirror.incoherent().is_empty());
}

/// The entry point of the child process above (ignored in a normal run).
#[test]
#[ignore = "entry point for the child process started by the test of this file"]
fn child_entry() {
    assert_eq!(role().as_deref(), Some("unprivileged"));
    // SAFETY: reading our own ids.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!((uid, gid), (65534, 65534));
    unprivileged_role();
    println!("ROLE-OK uid={uid}");
}
