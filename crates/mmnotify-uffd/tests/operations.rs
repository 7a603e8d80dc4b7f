//! One test per row of docs/UFFD.md's operation table, on real memory: the operation is
//! performed on a watched, mirrored region; the test checks the invalidations delivered and
//! that the mirror is coherent with the real mapping afterwards (judged by
//! /proc/self/pagemap: PFNs as root, page-content fingerprints otherwise). Blind spots are
//! shown twice: without the wrapper (a documented miss: no event, the mirror is stale) and
//! through it (covered).
//!
//! All tests share the process's one watcher; each works on memory of its own, so they do not
//! interfere.

mod common;

use std::ffi::c_void;
use std::time::Duration;

use common::*;
use mmnotify::Event;
use mmnotify_uffd::pagemap::Frame;
use mmnotify_uffd::Watcher;

fn watcher() -> Watcher {
    Watcher::get().expect("a watcher (this machine has userfaultfd)")
}

/// The events of `r`'s mirror that overlap `[s, e)`.
fn events_in(r: &Region, s: u64, e: u64) -> Vec<(u64, u64, Event)> {
    r.mirror
        .events()
        .into_iter()
        .filter(|(a, b, _)| *a < e && s < *b)
        .collect()
}

#[test]
fn munmap_whole_region_delivers_unmap_and_empties_the_mirror() {
    let w = watcher();
    let r = mirror_region(&w, map_anon(8) as u64, 8);
    // SAFETY: the test owns the region.
    assert_eq!(unsafe { libc::munmap(r.ptr(), r.len()) }, 0);
    r.sync(&w);
    let ev = events_in(&r, r.addr, r.addr + r.len() as u64);
    assert!(
        ev.contains(&(r.addr, r.addr + r.len() as u64, Event::Unmap)),
        "{ev:?}"
    );
    assert_eq!(r.mirror.len(), 0);
    assert!(r.mirror.incoherent().is_empty());
}

#[test]
fn munmap_of_a_middle_subrange_invalidates_exactly_it() {
    let w = watcher();
    let r = mirror_region(&w, map_anon(8) as u64, 8);
    let mid = r.addr + 2 * ps() as u64;
    // SAFETY: the test owns the region.
    assert_eq!(unsafe { libc::munmap(mid as *mut c_void, 3 * ps()) }, 0);
    r.sync(&w);
    let ev = r.mirror.events();
    assert!(
        ev.contains(&(mid, mid + 3 * ps() as u64, Event::Unmap)),
        "{ev:?}"
    );
    assert_eq!(r.mirror.len(), 5);
    assert!(r.mirror.incoherent().is_empty());
    // The rest is still watched: a later munmap of the tail is delivered too.
    let tail = r.addr + 5 * ps() as u64;
    // SAFETY: the test owns the region.
    assert_eq!(unsafe { libc::munmap(tail as *mut c_void, 3 * ps()) }, 0);
    r.sync(&w);
    assert_eq!(r.mirror.len(), 2);
    assert!(r.mirror.incoherent().is_empty());
}
