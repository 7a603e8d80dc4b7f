//! `brk` shrink (`sbrk(-n)`) delivers UNMAP: the operation-table row that touches the heap,
//! run in a child process of its own so that no other test's allocations move the break.

#![allow(clippy::disallowed_types)]

mod common;

use std::time::Duration;

use common::*;
use mmnotify::Event;
use mmnotify_uffd::Watcher;

#[test]
fn brk_shrink_delivers_unmap() {
    let (ok, out) = run_child("child_entry", "brk", Duration::from_secs(30), false);
    assert!(ok && out.contains("ROLE-OK events"), "{out}");
    println!("{out}");
}

fn role_brk() {
    let w = Watcher::get().unwrap();
    let ps = ps() as isize;
    // else in this single-test child moves the break meanwhile (checked below).
    // SAFETY: growing the break by pages this role owns, then shrinking it back; nothing
    unsafe {
        let old = libc::sbrk(0) as isize;
        let aligned = (old + ps - 1) / ps * ps;
        let grow = (aligned - old) + 16 * ps;
        assert_ne!(libc::sbrk(grow) as isize, -1);
        let top = libc::sbrk(0) as isize;
        assert_eq!(top, old + grow);
        let r = mirror_region(&w, aligned as u64, 16);
        if libc::sbrk(0) as isize != top {
            println!("ROLE-SKIPPED: the allocator moved the break");
            return;
        }
        assert_ne!(libc::sbrk(-(16 * ps)) as isize, -1);
        r.sync(&w);
        let ev = r.mirror.events();
        assert!(
            ev.iter().any(|(s, e, k)| *k == Event::Unmap
                && *s <= aligned as u64
                && *e >= top as u64 - 16 * ps as u64),
            "{ev:?}"
        );
        assert!(r.mirror.incoherent().is_empty());
        println!("ROLE-OK events {ev:x?}");
    }
}

/// The entry point of the child process above (ignored in a normal run).
#[test]
#[ignore = "entry point for the child process started by the test of this file"]
fn child_entry() {
    assert_eq!(role().as_deref(), Some("brk"));
    role_brk();
}
