//! Never deadlock (issue 9, item 5): every case is bounded by a timeout, so a hang fails the
//! test instead of stalling it.
//!
//! * a subscriber callback that munmaps, madvises (and munmaps through the cooperative
//!   wrapper) other watched memory: the callback runs on the dispatcher, the reader is free to
//!   read the message its unmap waits for;
//! * an unmapper holding a lock that the callback takes: the unmapper only waits for the
//!   *read*, not for the callback;
//! * many threads unmapping watched memory at once;
//! * blocking watcher calls from a callback are refused with a typed error, not a hang.

#![allow(clippy::disallowed_types)]

mod common;

use mmnotify::Range;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mmnotify::{IntervalCtx, IntervalSubscriber, Invalidate, Invalidation};
use mmnotify_uffd::{Error, Watcher};

const LIMIT: Duration = Duration::from_secs(20);

fn watcher() -> Watcher {
    Watcher::get().unwrap()
}

/// What a callback does to other watched memory when its own range is invalidated.
#[derive(Clone, Copy, Debug)]
enum Then {
    Munmap,
    DontNeed,
    WrapperMunmap,
}

struct Freer {
    watcher: Watcher,
    victim: Mutex<Option<(usize, usize)>>,
    then: Then,
    done: AtomicUsize,
}

impl IntervalSubscriber for Freer {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _inv: &Invalidation) -> Invalidate {
        ctx.set_seq();
        if let Some((addr, len)) = self.victim.lock().unwrap().take() {
            let p = addr as *mut c_void;
            // SAFETY: the victim region belongs to this test and nothing else refers to it.
            unsafe {
                match self.then {
                    Then::Munmap => assert_eq!(libc::munmap(p, len), 0),
                    Then::DontNeed => assert_eq!(libc::madvise(p, len, libc::MADV_DONTNEED), 0),
                    Then::WrapperMunmap => self.watcher.munmap(p, len).unwrap(),
                }
            }
            self.done.fetch_add(1, Ordering::SeqCst);
        }
        Invalidate::Done
    }
}

fn callback_frees_watched_memory(then: Then) {
    let w = watcher();
    let trigger = map_anon(2) as u64;
    let victim = map_anon(2) as u64;
    let _ = w.watch(trigger, 2 * ps() as u64).unwrap();
    let _ = w.watch(victim, 2 * ps() as u64).unwrap();
    let victim_mirror = Arc::new(Mirror::default());
    let _viv = w
        .insert_interval(
            Range::from_len(victim, 2 * ps() as u64).unwrap(),
            victim_mirror.clone(),
        )
        .unwrap();
    let freer = Arc::new(Freer {
        watcher: w.clone(),
        victim: Mutex::new(Some((victim as usize, 2 * ps()))),
        then,
        done: AtomicUsize::new(0),
    });
    let _tiv = w
        .insert_interval(
            Range::from_len(trigger, 2 * ps() as u64).unwrap(),
            freer.clone(),
        )
        .unwrap();
    within(
        LIMIT,
        &format!("a callback doing {then:?} on watched memory"),
        {
            let w = w.clone();
            move || {
                // SAFETY: the test owns the trigger region.
                assert_eq!(unsafe { libc::munmap(trigger as *mut c_void, 2 * ps()) }, 0);
                w.synchronize(LIMIT).unwrap();
            }
        },
    );
    assert_eq!(freer.done.load(Ordering::SeqCst), 1);
    // The victim's own event was delivered too.
    let ev = victim_mirror.events();
    assert!(!ev.is_empty(), "{ev:?}");
}

#[test]
fn a_callback_that_munmaps_watched_memory_completes() {
    callback_frees_watched_memory(Then::Munmap);
}

#[test]
fn a_callback_that_madvises_watched_memory_completes() {
    callback_frees_watched_memory(Then::DontNeed);
}

#[test]
fn a_callback_that_munmaps_through_the_wrapper_completes() {
    callback_frees_watched_memory(Then::WrapperMunmap);
}

struct LockTaker {
    lock: Arc<Mutex<u64>>,
}

impl IntervalSubscriber for LockTaker {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _inv: &Invalidation) -> Invalidate {
        ctx.set_seq();
        *self.lock.lock().unwrap() += 1;
        Invalidate::Done
    }
}

#[test]
fn an_unmapper_holding_a_lock_the_callback_takes_completes() {
    let w = watcher();
    let lock = Arc::new(Mutex::new(0u64));
    let mut regions = Vec::new();
    for _ in 0..20 {
        let p = map_anon(1) as u64;
        let _ = w.watch(p, ps() as u64).unwrap();
        let iv = w
            .insert_interval(
                Range::from_len(p, ps() as u64).unwrap(),
                Arc::new(LockTaker { lock: lock.clone() }),
            )
            .unwrap();
        regions.push((p, iv));
    }
    let addrs: Vec<u64> = regions.iter().map(|r| r.0).collect();
    let l2 = lock.clone();
    within(LIMIT, "munmap under a lock the callback takes", move || {
        for a in addrs {
            let _held = l2.lock().unwrap();
            // SAFETY: the test owns the page.
            assert_eq!(unsafe { libc::munmap(a as *mut c_void, ps()) }, 0);
        }
    });
    w.synchronize(LIMIT).unwrap();
    // At least one callback per page (other tests of this binary may later map and unmap
    // memory at the freed addresses, which the intervals still cover).
    assert!(*lock.lock().unwrap() >= 20);
    for (_, iv) in &regions {
        w.remove_interval(iv).unwrap();
    }
}

#[test]
fn many_threads_unmapping_at_once_all_finish() {
    let w = watcher();
    const THREADS: usize = 8;
    const EACH: usize = 100;
    let mirror = Arc::new(Mirror::default());
    let mut per_thread = Vec::new();
    let mut ivs = Vec::new();
    for _ in 0..THREADS {
        let base = map_anon(EACH) as u64;
        let _ = w.watch(base, (EACH * ps()) as u64).unwrap();
        ivs.push(
            w.insert_interval(
                Range::from_len(base, (EACH * ps()) as u64).unwrap(),
                mirror.clone(),
            )
            .unwrap(),
        );
        per_thread.push(base);
    }
    let before = w.stats().unmaps;
    let bases = per_thread.clone();
    within(LIMIT, "8 threads x 100 munmaps", move || {
        let hs: Vec<_> = per_thread
            .into_iter()
            .map(|base| {
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        let p = base + (i * ps()) as u64;
                        // SAFETY: each thread owns its region.
                        assert_eq!(unsafe { libc::munmap(p as *mut c_void, ps()) }, 0);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
    w.synchronize(LIMIT).unwrap();
    assert!(w.stats().unmaps - before >= (THREADS * EACH) as u64);
    // Every page's own UNMAP reached the mirror.
    let ev = mirror.events();
    for base in &bases {
        for i in 0..EACH {
            let p = base + (i * ps()) as u64;
            assert!(ev.iter().any(|(s, e, _)| *s == p && *e == p + ps() as u64));
        }
    }
    for iv in &ivs {
        w.remove_interval(iv).unwrap();
    }
}

struct Misuser {
    watcher: Watcher,
    results: Mutex<Vec<String>>,
    iv: Mutex<Option<mmnotify_uffd::WatchedInterval>>,
}

impl IntervalSubscriber for Misuser {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        ctx.set_seq();
        let mut r = self.results.lock().unwrap();
        // `unwatch` invalidates what it unregistered: from a callback that would run
        // callbacks inside one.
        let page = inv.range().start() & !(ps() as u64 - 1);
        r.push(match self.watcher.unwatch(page, ps() as u64) {
            Err(Error::InDispatcher { op }) => format!("refused {op}"),
            other => format!("unexpected {other:?}"),
        });
        if let Some(iv) = self.iv.lock().unwrap().as_ref() {
            r.push(match iv.read_begin() {
                Err(Error::InDispatcher { op }) => format!("refused {op}"),
                other => format!("unexpected {other:?}"),
            });
        }
        r.push(match self.watcher.synchronize(Duration::from_secs(1)) {
            Err(Error::InDispatcher { op }) => format!("refused {op}"),
            other => format!("unexpected {other:?}"),
        });
        Invalidate::Done
    }
}

#[test]
fn blocking_calls_from_a_callback_are_refused_not_hung() {
    let w = watcher();
    let p = map_anon(1) as u64;
    let _ = w.watch(p, ps() as u64).unwrap();
    let sub = Arc::new(Misuser {
        watcher: w.clone(),
        results: Mutex::new(Vec::new()),
        iv: Mutex::new(None),
    });
    let iv = w
        .insert_interval(Range::from_len(p, ps() as u64).unwrap(), sub.clone())
        .unwrap();
    *sub.iv.lock().unwrap() = Some(iv);
    within(
        LIMIT,
        "munmap whose callback misuses the watcher",
        move || {
            // SAFETY: the test owns the page.
            assert_eq!(unsafe { libc::munmap(p as *mut c_void, ps()) }, 0);
        },
    );
    w.synchronize(LIMIT).unwrap();
    let r = sub.results.lock().unwrap().clone();
    assert!(r.len() >= 3, "{r:?}");
    assert!(
        r.chunks(3).all(|c| c
            == [
                "refused unwatch",
                "refused read_begin",
                "refused synchronize"
            ]),
        "{r:?}"
    );
    // Break the cycle subscriber -> interval handle.
    let iv = sub.iv.lock().unwrap().take().unwrap();
    w.remove_interval(&iv).unwrap();
}

/// Holds its first callback until told to go, so the gate stays open. (Later callbacks, e.g.
/// from another test unmapping memory it mapped at the freed address, pass.)
struct Holder {
    go: Arc<std::sync::Barrier>,
    armed: std::sync::atomic::AtomicBool,
}

impl IntervalSubscriber for Holder {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _inv: &Invalidation) -> Invalidate {
        ctx.set_seq();
        if self.armed.swap(false, Ordering::SeqCst) {
            self.go.wait();
        }
        Invalidate::Done
    }
}

#[test]
fn read_begin_timeout_gives_up_while_a_delivery_is_stuck() {
    let w = watcher();
    let p = map_anon(1) as u64;
    let q = map_anon(1) as u64;
    let _ = w.watch(p, ps() as u64).unwrap();
    let go = Arc::new(std::sync::Barrier::new(2));
    let held = w
        .insert_interval(
            Range::from_len(p, ps() as u64).unwrap(),
            Arc::new(Holder {
                go: go.clone(),
                armed: std::sync::atomic::AtomicBool::new(true),
            }),
        )
        .unwrap();
    let other = w
        .insert_interval(
            Range::from_len(q, ps() as u64).unwrap(),
            Arc::new(Mirror::default()),
        )
        .unwrap();
    // SAFETY: the test owns the page; the munmap returns once read, the callback then waits.
    assert_eq!(unsafe { libc::munmap(p as *mut c_void, ps()) }, 0);
    let r = other.read_begin_timeout(Duration::from_millis(50));
    assert!(
        matches!(r, Err(Error::ReadBeginTimeout { waited }) if waited >= Duration::from_millis(50)),
        "{r:?}"
    );
    go.wait();
    w.synchronize(LIMIT).unwrap();
    assert!(other.read_begin_timeout(Duration::from_secs(5)).is_ok());
    w.remove_interval(&held).unwrap();
    w.remove_interval(&other).unwrap();
}
