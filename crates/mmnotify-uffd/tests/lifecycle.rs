//! Bad input and the watcher's life cycle (issue 9, acceptance): unaligned, empty,
//! overflowing, unmapped and special ranges, memory owned by another userfaultfd, watching
//! twice, conflicting options, use after shutdown, shutdown without leaking threads or
//! descriptors, shutdown from a callback and during unmaps. Typed errors, nothing lost, never
//! a panic or a hang. Cases that shut the process's watcher down run in child processes.

#![allow(clippy::disallowed_types)]

mod common;

use mmnotify::Range;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mmnotify::{Event, IntervalCtx, IntervalSubscriber, Invalidate, Invalidation};
use mmnotify_uffd::{
    maps, Error, ForkEvents, Health, SkipReason, WatchOutcome, Watcher, WatcherOptions,
};

const LIMIT: Duration = Duration::from_secs(30);

fn watcher() -> Watcher {
    Watcher::get().unwrap()
}

#[test]
fn unaligned_empty_and_overflowing_ranges_are_typed_errors() {
    let _serial = serial();
    let w = watcher();
    let p = map_anon(2) as u64;
    let ps = ps() as u64;
    assert!(matches!(
        w.watch(p + 1, ps),
        Err(Error::Unaligned { addr, page_size }) if addr == p + 1 && page_size == ps
    ));
    assert!(matches!(w.watch(p, ps + 1), Err(Error::Unaligned { .. })));
    assert!(matches!(w.watch(p, 0), Err(Error::EmptyRange { addr }) if addr == p));
    let top = u64::MAX - ps + 1;
    assert!(matches!(
        w.watch(top, 2 * ps),
        Err(Error::RangeOverflow { addr, len }) if addr == top && len == 2 * ps
    ));
    let e = w.watch(p + 1, ps).unwrap_err().to_string();
    assert!(e.contains("not aligned"), "{e}");
    // Nothing was registered by the refused calls.
    let v = maps::read_self().unwrap();
    assert!(maps::overlapping(&v, p, p + 2 * ps)
        .iter()
        .all(|v| !v.uffd_wp));
}

#[test]
fn unmapped_ranges_and_holes_are_reported() {
    let _serial = serial();
    let w = watcher();
    let ps = ps() as u64;
    // Below mmap_min_addr: never mapped.
    assert!(matches!(
        w.watch(ps, ps),
        Err(Error::Unmapped { start, end }) if start == ps && end == 2 * ps
    ));
    // One-page holes inside a region of ours (too small for the other mappings the process
    // makes meanwhile, such as a new thread's signal stack).
    let p = map_anon(6);
    // SAFETY: carving holes into our own region.
    unsafe {
        libc::munmap(p.add(ps as usize) as *mut c_void, ps as usize);
        libc::munmap(p.add(3 * ps as usize) as *mut c_void, ps as usize);
    }
    let p = p as u64;
    let report = w.watch(p, 6 * ps).unwrap();
    let holes: Vec<(u64, u64)> = report
        .skipped
        .iter()
        .filter(|s| s.reason == SkipReason::Hole)
        .map(|s| (s.start, s.end))
        .collect();
    assert_eq!(
        holes,
        vec![(p + ps, p + 2 * ps), (p + 3 * ps, p + 4 * ps)],
        "{report:?}"
    );
    assert_eq!(report.newly_watched(), 3, "{report:?}");
    assert!(!report.is_complete());
}

#[test]
fn special_mappings_are_typed_refusals() {
    let _serial = serial();
    let w = watcher();
    let v = maps::read_self().unwrap();
    let mut seen = 0;
    for special in v.iter().filter(|m| m.is_special()) {
        match w.watch(special.start, special.end - special.start) {
            Err(Error::NothingWatchable { skipped, .. }) => {
                assert!(
                    matches!(&skipped[0].reason, SkipReason::Special { name } if *name == special.name),
                    "{skipped:?}"
                );
                seen += 1;
            }
            other => panic!("watching {}: {other:?}", special.name),
        }
    }
    assert!(seen >= 1, "no [vdso] in this process? {v:?}");
}

fn temp_file(pages: usize) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "mmnotify-uffd-{}-{}",
        std::process::id(),
        STAMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&path, vec![7u8; pages * ps()]).unwrap();
    path
}

static STAMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[test]
fn file_mappings_private_watch_and_read_only_shared_is_refused() {
    let _serial = serial();
    use std::os::fd::AsRawFd;
    let w = watcher();
    let path = temp_file(2);
    let f = std::fs::File::open(&path).unwrap();
    // SAFETY: fresh mappings of our own temp file.
    let (private, shared_ro) = unsafe {
        let a = libc::mmap(
            std::ptr::null_mut(),
            2 * ps(),
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        let b = libc::mmap(
            std::ptr::null_mut(),
            2 * ps(),
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert!(a != libc::MAP_FAILED && b != libc::MAP_FAILED);
        (a as u64, b as u64)
    };
    if w.features().wp_async {
        let report = w.watch(private, 2 * ps() as u64).unwrap();
        assert_eq!(report.newly_watched(), 1, "{report:?}");
    } else {
        assert!(matches!(
            w.watch(private, 2 * ps() as u64),
            Err(Error::NothingWatchable { .. })
        ));
    }
    match w.watch(shared_ro, 2 * ps() as u64) {
        Err(Error::NothingWatchable { skipped, .. }) => assert!(
            matches!(skipped[0].reason, SkipReason::ReadOnlyFile { .. }),
            "{skipped:?}"
        ),
        other => panic!("a shared read-only file mapping: {other:?}"),
    }
    // SAFETY: cleanup of our own mappings.
    unsafe {
        libc::munmap(private as *mut c_void, 2 * ps());
        libc::munmap(shared_ro as *mut c_void, 2 * ps());
    }
    let _ = std::fs::remove_file(path);
}

#[test]
fn memory_owned_by_another_userfaultfd_is_a_typed_error() {
    let _serial = serial();
    let w = watcher();
    let p = map_anon(2) as u64;
    // A second userfaultfd of this process, with no events, registers the region first.
    // SAFETY: raw userfaultfd calls on a region the test owns; the descriptor has no event
    // features, so nothing ever waits for it to be read.
    let other = unsafe {
        let fd = libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | 1,
        ) as i32;
        assert!(fd >= 0);
        let mut api = [0xAAu64, 0, 0];
        assert_eq!(libc::ioctl(fd, 0xC018_AA3F, api.as_mut_ptr()), 0);
        let mut reg = [p, 2 * ps() as u64, 2 /* MODE_WP */, 0];
        assert_eq!(libc::ioctl(fd, 0xC020_AA00, reg.as_mut_ptr()), 0);
        fd
    };
    assert!(matches!(
        w.watch(p, 2 * ps() as u64),
        Err(Error::AlreadyOwned { start, .. }) if start == p
    ));
    // SAFETY: closing the other userfaultfd (unregisters), then the region can be watched.
    unsafe { libc::close(other) };
    let report = w.watch(p, 2 * ps() as u64).unwrap();
    assert_eq!(report.newly_watched(), 1);
}

#[test]
fn watching_twice_is_reported_and_loses_nothing() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(3) as u64, 3);
    let again = w.watch(r.addr, r.len() as u64).unwrap();
    assert_eq!(again.newly_watched(), 0);
    assert!(again
        .watched
        .iter()
        .all(|v| v.outcome == WatchOutcome::AlreadyWatched));
    // SAFETY: the test owns the region.
    assert_eq!(unsafe { libc::munmap(r.ptr(), r.len()) }, 0);
    r.sync(&w);
    let ev = r.mirror.events();
    assert_eq!(
        ev.iter().filter(|e| e.2 == Event::Unmap).count(),
        1,
        "exactly one invalidation: {ev:?}"
    );
    assert_eq!(r.mirror.len(), 0);
}

#[test]
fn conflicting_options_and_bad_intervals_are_typed_errors() {
    let _serial = serial();
    let w = watcher();
    let other = WatcherOptions {
        fork_events: ForkEvents::IfPermitted,
        ..w.options()
    };
    assert!(matches!(
        Watcher::with_options(other),
        Err(Error::OptionsConflict { .. })
    ));
    assert!(Watcher::with_options(w.options()).is_ok());
    // Empty and wrapping intervals cannot be expressed: `Range` refuses them, typed.
    assert!(matches!(
        Range::from_len(0x1000, 0),
        Err(mmnotify::Error::EmptyRange { .. })
    ));
    assert!(matches!(
        Range::from_len(u64::MAX - 10, 100),
        Err(mmnotify::Error::RangeOverflow { .. })
    ));
}

#[test]
fn watching_a_sub_range_splits_no_vma() {
    let _serial = serial();
    let w = watcher();
    let p = map_anon(16) as u64;
    let end = p + 16 * ps() as u64;
    let covering = |vmas: &[maps::Vma]| maps::overlapping(vmas, p, end);
    assert_eq!(covering(&maps::read_self_maps().unwrap()).len(), 1);
    let report = w.watch(p + 4 * ps() as u64, 2 * ps() as u64).unwrap();
    assert_eq!(report.watched.len(), 1);
    assert!(report.watched[0].start <= p && report.watched[0].end >= end);
    // Still one VMA over the region (a sub-range registration would have made three). Other
    // threads' mappings elsewhere do not count.
    let after = covering(&maps::read_self_maps().unwrap());
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(after[0].start <= p && after[0].end >= end);
}

/// Runs on the watching thread between the map read and `UFFDIO_REGISTER`: unmaps the middle
/// page of the three-page VMA, as another thread could.
fn unmap_the_middle_page(start: u64, end: u64) {
    if end - start == 3 * ps() as u64 {
        // SAFETY: the test owns the region (the hook fires only on the test's thread).
        let r = unsafe { libc::munmap((start + ps() as u64) as *mut c_void, ps()) };
        assert_eq!(r, 0);
    }
}

#[test]
fn memory_changed_between_the_map_read_and_the_registration_is_not_reported_watched() {
    let _serial = serial();
    let w = watcher();
    let p = map_anon(3) as u64;
    let ps = ps() as u64;
    mmnotify_uffd::set_before_register_hook(Some(unmap_the_middle_page));
    let report = w.watch(p, 3 * ps);
    mmnotify_uffd::set_before_register_hook(None);
    let report = report.expect("the outer pages are watched");
    // New memory at the hole, mapped after the registration: the kernel did not register it.
    map_with(
        1,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
        -1,
        (p + ps) as usize,
    );
    let now = maps::read_self().unwrap();
    let middle = maps::overlapping(&now, p + ps, p + 2 * ps);
    assert!(middle.iter().all(|v| !v.uffd_wp), "{middle:?}");
    assert!(
        report
            .watched
            .iter()
            .all(|v| v.end <= p + ps || v.start >= p + 2 * ps),
        "the middle page is reported watched: {report:?}"
    );
    assert!(
        report.skipped.iter().any(|s| s.start == p + ps
            && s.end == p + 2 * ps
            && s.reason == SkipReason::ChangedDuringWatch),
        "{report:?}"
    );
    assert!(!report.is_complete());
    // SAFETY: the test owns the region.
    let r = unsafe { libc::munmap(p as *mut c_void, 3 * ps as usize) };
    assert_eq!(r, 0);
    w.synchronize(Duration::from_secs(10)).unwrap();
}

#[test]
fn options_out_of_range_are_typed_errors_naming_the_field() {
    let d = WatcherOptions::default();
    for (bad, field) in [
        (
            WatcherOptions {
                remove_settle: Duration::MAX,
                ..d
            },
            "remove_settle",
        ),
        (
            WatcherOptions {
                queue_capacity: usize::MAX - 1,
                ..d
            },
            "queue_capacity",
        ),
        (
            WatcherOptions {
                queue_capacity: 0,
                ..d
            },
            "queue_capacity",
        ),
        (
            WatcherOptions {
                read_batch: usize::MAX / 2,
                ..d
            },
            "read_batch",
        ),
        (WatcherOptions { read_batch: 0, ..d }, "read_batch"),
    ] {
        match Watcher::with_options(bad) {
            Err(e @ Error::InvalidOptions { field: f, .. }) => {
                assert_eq!(f, field);
                assert!(e.to_string().contains(field), "{e}");
            }
            other => panic!("{field}: expected InvalidOptions, got {other:?}"),
        }
    }
    assert!(d.validate().is_ok());
    let edge = WatcherOptions {
        remove_settle: mmnotify_uffd::MAX_REMOVE_SETTLE,
        queue_capacity: mmnotify_uffd::MAX_QUEUE_CAPACITY,
        read_batch: mmnotify_uffd::MAX_READ_BATCH,
        ..d
    };
    assert!(edge.validate().is_ok());
}

#[test]
fn unwatch_invalidates_every_mirror_of_the_unregistered_vma() {
    let _serial = serial();
    let w = watcher();
    let ps = ps() as u64;
    // One VMA of two pages; `r` mirrors all of it, `other` only its second page.
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    let other = Arc::new(Mirror::default());
    let other_iv = w
        .insert_interval(Range::from_len(r.addr + ps, ps).unwrap(), other.clone())
        .unwrap();
    assert!(other.fill(&other_iv, r.addr + ps, 1));
    r.mirror.clear_events();
    // Unwatching the first page unregisters the whole VMA: the second page is blind now, so
    // its mirror must drop it too.
    assert_eq!(w.unwatch(r.addr, ps).unwrap(), 1);
    // (The VMA may have merged with a neighbouring mapping: the invalidation covers it whole.)
    let covers = |ev: Vec<(u64, u64, Event)>| {
        ev.iter()
            .any(|&(s, e, k)| s <= r.addr && e >= r.addr + 2 * ps && k == Event::Unmap)
    };
    assert!(covers(other.events()), "{:?}", other.events());
    assert!(covers(r.mirror.events()), "{:?}", r.mirror.events());
    assert_eq!((other.len(), r.mirror.len()), (0, 0));
    w.remove_interval(&other_iv).unwrap();
    w.remove_interval(&r.iv).unwrap();
    // SAFETY: the test owns the region.
    let rc = unsafe { libc::munmap(r.ptr(), r.len()) };
    assert_eq!(rc, 0);
}

#[test]
fn unwatch_unregisters_whole_vmas_and_stops_the_events() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    assert_eq!(w.unwatch(r.addr, ps() as u64).unwrap(), 1, "the whole VMA");
    let v = maps::read_self().unwrap();
    assert!(maps::overlapping(&v, r.addr, r.addr + r.len() as u64)
        .iter()
        .all(|m| !m.uffd_wp));
    let before = w.stats().unmaps;
    // SAFETY: the test owns the region.
    assert_eq!(unsafe { libc::munmap(r.ptr(), r.len()) }, 0);
    r.sync(&w);
    assert_eq!(w.stats().unmaps, before, "unwatched memory sends nothing");
    assert!(matches!(
        w.unwatch(r.addr, 0),
        Err(Error::EmptyRange { .. })
    ));
}

#[test]
fn a_full_hand_off_ring_folds_messages_and_loses_nothing() {
    let (ok, out) = run_child("child_entry", "overflow", LIMIT, false);
    assert!(ok && out.contains("ROLE-OK overflows="), "{out}");
    println!("{out}");
}

/// A callback that is slow, so that messages pile up behind it.
struct Slow(Arc<Mirror>);

impl IntervalSubscriber for Slow {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        std::thread::sleep(Duration::from_millis(2));
        self.0.invalidate(ctx, inv)
    }
}

fn role_overflow() {
    let w = Watcher::with_options(WatcherOptions {
        queue_capacity: 4,
        read_batch: 1,
        ..WatcherOptions::default()
    })
    .unwrap();
    const THREADS: usize = 4;
    const EACH: usize = 50;
    let mirror = Arc::new(Mirror::default());
    let mut bases = Vec::new();
    let mut ivs = Vec::new();
    for _ in 0..THREADS {
        let base = map_anon(EACH) as u64;
        let _ = w.watch(base, (EACH * ps()) as u64).unwrap();
        let iv = w
            .insert_interval(
                Range::from_len(base, (EACH * ps()) as u64).unwrap(),
                Arc::new(Slow(mirror.clone())),
            )
            .unwrap();
        assert!(mirror.fill(&iv, base, EACH));
        ivs.push(iv);
        bases.push(base);
    }
    let hs: Vec<_> = bases
        .iter()
        .map(|&base| {
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
    w.synchronize(LIMIT).unwrap();
    let stats = w.stats();
    assert!(stats.overflows > 0, "the ring never filled: {stats:?}");
    assert_eq!(stats.unmaps, (THREADS * EACH) as u64, "{stats:?}");
    // Every page was invalidated (some through a folded, covering invalidation).
    assert_eq!(mirror.len(), 0);
    assert!(mirror.incoherent().is_empty());
    println!("ROLE-OK overflows={} stats={stats:?}", stats.overflows);
}

// --- shutdown, in child processes -----------------------------------------------------------

#[test]
fn shutdown_leaks_no_thread_or_descriptor_and_later_use_is_refused() {
    let (ok, out) = run_child("child_entry", "no_leak", LIMIT, false);
    assert!(ok && out.contains("ROLE-OK"), "{out}");
}

#[test]
fn a_failed_dispatcher_spawn_leaks_no_reader_or_descriptor() {
    let (ok, out) = run_child("child_entry", "dispatcher_spawn_fails", LIMIT, false);
    assert!(ok && out.contains("ROLE-OK"), "{out}");
}

#[test]
fn shutdown_from_a_callback_does_not_deadlock() {
    let (ok, out) = run_child("child_entry", "from_callback", LIMIT, false);
    assert!(ok && out.contains("ROLE-OK"), "{out}");
}

#[test]
fn shutdown_while_threads_unmap_watched_memory_finishes() {
    let (ok, out) = run_child("child_entry", "during_unmaps", LIMIT, false);
    assert!(ok && out.contains("ROLE-OK"), "{out}");
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < LIMIT,
            "{what} did not happen within {LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn role_dispatcher_spawn_fails() {
    let _ = mmnotify_uffd::pagemap::frame(map_anon(1) as u64).unwrap();
    let threads = count("/proc/self/task");
    let fds = count("/proc/self/fd");
    mmnotify_uffd::fail_next_dispatcher_spawn();
    match Watcher::get() {
        Err(Error::Syscall { call, .. }) => assert_eq!(call, "spawning the dispatcher thread"),
        other => panic!("expected the injected spawn failure, got {other:?}"),
    }
    assert_eq!(count("/proc/self/task"), threads, "the reader was joined");
    assert_eq!(
        count("/proc/self/fd"),
        fds,
        "the userfaultfd and eventfd were closed"
    );
    // Nothing half-built stays behind: the next creation works.
    let w = Watcher::get().unwrap();
    assert_eq!(w.health(), Health::Running);
    let r = mirror_region(&w, map_anon(1) as u64, 1);
    // SAFETY: the role's own region.
    assert_eq!(unsafe { libc::munmap(r.ptr(), r.len()) }, 0);
    r.sync(&w);
    assert_eq!(r.mirror.len(), 0);
}

fn role_no_leak() {
    // The pagemap judge keeps /proc/self/pagemap and /proc/self/mem open for the process's
    // life: open them before counting.
    let _ = mmnotify_uffd::pagemap::frame(map_anon(1) as u64).unwrap();
    let threads = count("/proc/self/task");
    let fds = count("/proc/self/fd");
    let w = Watcher::get().unwrap();
    assert_eq!(
        count("/proc/self/task"),
        threads + 2,
        "a reader and a dispatcher"
    );
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    let seq = r.iv.read_begin().unwrap();
    let keep = w.clone();
    drop(w);
    assert_eq!(keep.health(), Health::Running, "a clone keeps it alive");
    keep.shutdown();
    keep.shutdown(); // twice is harmless
    assert_eq!(keep.health(), Health::ShutDown);
    assert_eq!(count("/proc/self/task"), threads, "threads joined");
    // Use after shutdown: typed errors, failed checks.
    assert!(r.iv.read_retry(seq));
    assert!(matches!(r.iv.read_begin(), Err(Error::ShutDown)));
    assert!(matches!(
        keep.watch(r.addr, r.len() as u64),
        Err(Error::ShutDown)
    ));
    assert!(matches!(
        keep.insert_interval(
            Range::from_len(r.addr, r.len() as u64).unwrap(),
            Arc::new(Mirror::default())
        ),
        Err(Error::ShutDown)
    ));
    assert!(matches!(keep.synchronize(LIMIT), Err(Error::ShutDown)));
    // The mirror was released, the memory unregistered: unmapping it needs no reader.
    assert!(r.mirror.events().iter().any(|e| e.2 == Event::Release));
    let v = maps::read_self().unwrap();
    assert!(maps::overlapping(&v, r.addr, r.addr + r.len() as u64)
        .iter()
        .all(|m| !m.uffd_wp));
    // The cooperative wrappers still make the call after shutdown (nobody is told).
    // SAFETY: the role's own region.
    unsafe { keep.munmap(r.ptr(), r.len()) }.unwrap();
    drop(keep);
    drop(r);
    assert_eq!(count("/proc/self/fd"), fds, "descriptors closed");
    // The last drop of a fresh watcher shuts it down the same way.
    let w = Watcher::get().unwrap();
    assert_eq!(w.health(), Health::Running);
    drop(w);
    assert_eq!(count("/proc/self/task"), threads);
    assert_eq!(count("/proc/self/fd"), fds);
}

struct ShutsDown {
    watcher: std::sync::Mutex<Option<Watcher>>,
}

impl IntervalSubscriber for ShutsDown {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _inv: &Invalidation) -> Invalidate {
        ctx.set_seq();
        // Drop the last handle here, on the dispatcher.
        if let Some(w) = self.watcher.lock().unwrap().take() {
            w.shutdown();
        }
        Invalidate::Done
    }
}

fn role_from_callback() {
    let threads = count("/proc/self/task");
    let w = Watcher::get().unwrap();
    let p = map_anon(1) as u64;
    let _ = w.watch(p, ps() as u64).unwrap();
    let sub = Arc::new(ShutsDown {
        watcher: std::sync::Mutex::new(Some(w.clone())),
    });
    let _iv = w
        .insert_interval(Range::from_len(p, ps() as u64).unwrap(), sub)
        .unwrap();
    let probe = w.clone();
    drop(w);
    // SAFETY: the role's own page.
    assert_eq!(unsafe { libc::munmap(p as *mut c_void, ps()) }, 0);
    eventually("shutdown from the callback", || {
        probe.health() == Health::ShutDown
    });
    drop(probe);
    eventually("the watcher's threads to end", || {
        count("/proc/self/task") == threads
    });
}

fn role_during_unmaps() {
    let w = Watcher::get().unwrap();
    let mirror = Arc::new(Mirror::default());
    let mut bases = Vec::new();
    let mut ivs = Vec::new();
    for _ in 0..4 {
        let base = map_anon(200) as u64;
        let _ = w.watch(base, 200 * ps() as u64).unwrap();
        ivs.push(
            w.insert_interval(
                Range::from_len(base, 200 * ps() as u64).unwrap(),
                mirror.clone(),
            )
            .unwrap(),
        );
        bases.push(base);
    }
    let hs: Vec<_> = bases
        .into_iter()
        .map(|base| {
            std::thread::spawn(move || {
                for i in 0..200 {
                    let p = base + (i * ps()) as u64;
                    // SAFETY: each thread owns its region.
                    assert_eq!(unsafe { libc::munmap(p as *mut c_void, ps()) }, 0);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2));
    w.shutdown();
    let start = Instant::now();
    for h in hs {
        h.join().unwrap();
    }
    assert!(start.elapsed() < LIMIT);
    assert_eq!(w.health(), Health::ShutDown);
    for iv in &ivs {
        assert!(matches!(iv.read_begin(), Err(Error::ShutDown)));
    }
}

/// The entry point of the child processes above (ignored in a normal run).
#[test]
#[ignore = "entry point for child processes started by the tests of this file"]
fn child_entry() {
    match role().as_deref() {
        Some("no_leak") => role_no_leak(),
        Some("dispatcher_spawn_fails") => role_dispatcher_spawn_fails(),
        Some("from_callback") => role_from_callback(),
        Some("during_unmaps") => role_during_unmaps(),
        Some("overflow") => role_overflow(),
        other => panic!("child_entry needs MMNOTIFY_UFFD_ROLE, got {other:?}"),
    }
    println!("ROLE-OK");
}
