//! Acceptance: the race. Thread A loops get → WRITE_FIXED of the whole registration to a file
//! → put; thread B replaces the memory at the same address over and over (munmap then
//! MAP_FIXED_NOREPLACE, and MAP_FIXED over live memory), filling each new mapping with its
//! generation number. A stale hit is a registration handed out *after* the call that replaced
//! its memory returned: B publishes "generation g is gone" right after that call returns, A
//! reads that floor before each get, and any word io_uring writes that belongs to a generation
//! at or below the floor was read from pinned pages of gone memory. Zero words are pages of a
//! new mapping B has not filled yet (never stale: old generations are never zero).
//!
//! `RCACHE_RACE_SECS` sets the seconds per mode (default 2; a soak runs minutes).

#![allow(
    clippy::disallowed_types,
    reason = "test code: std::sync is fine outside the engine (see clippy.toml)"
)]

mod common;

use std::ffi::c_void;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmnotify_rcache::{Access, Cache, Config, Error, EventSource, UringRegistrar};
use mmnotify_uffd::Watcher;

const PAGES: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Remap {
    UnmapThenNoReplace,
    FixedOverLive,
}

fn ps() -> usize {
    mmnotify_rcache::page_size() as usize
}

fn fill(addr: usize, len: usize, gen: u64) {
    for i in 0..len / 8 {
        // SAFETY: the test's own mapping, read-write; only thread B writes it.
        unsafe { std::ptr::write_volatile((addr as *mut u64).add(i), gen) };
    }
}

fn map_fixed(addr: usize, len: usize, extra: i32) -> bool {
    // SAFETY: maps over the test's own reserved range (MAP_FIXED over its own memory, or
    // MAP_FIXED_NOREPLACE into the hole it just made).
    let p = unsafe {
        libc::mmap(
            addr as *mut c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
            -1,
            0,
        )
    };
    p as usize == addr
}

#[derive(Debug, Default)]
struct Counts {
    gets: u64,
    stale: u64,
    gone: u64,
    unstable: u64,
    remaps: u64,
}

fn race(mode: Remap, secs: u64) -> (Counts, mmnotify_rcache::Stats) {
    let watcher = Watcher::get().unwrap();
    let len = PAGES * ps();
    // Guard pages around the region keep its VMA apart from its neighbours. The reservation
    // sits far below where the kernel places mappings by itself, so the hole the remapper
    // makes is not taken by another thread's allocation before it re-maps.
    let mut base = 0usize;
    for i in 0..64usize {
        let hint = 0x3000_0000_0000usize + (i << 24);
        // SAFETY: MAP_FIXED_NOREPLACE never replaces anything; a fresh reservation.
        let p = unsafe {
            libc::mmap(
                hint as *mut c_void,
                len + 2 * ps(),
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as usize == hint {
            base = hint;
            break;
        }
    }
    assert_ne!(base, 0, "no quiet address for the race");
    let addr = base + ps();
    assert!(map_fixed(addr, len, libc::MAP_FIXED));
    fill(addr, len, 1);
    let retired = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let remapper = {
        let (retired, stop) = (retired.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut gen = 1u64;
            let mut remaps = 0;
            let mut rng = 0x1234_5678u64;
            while !stop.load(Ordering::Relaxed) {
                let ok = match mode {
                    Remap::UnmapThenNoReplace => {
                        // SAFETY: the test's own memory; no reference points into it.
                        let r = unsafe { libc::munmap(addr as *mut c_void, len) };
                        assert_eq!(r, 0);
                        retired.store(gen, Ordering::SeqCst);
                        map_fixed(addr, len, libc::MAP_FIXED_NOREPLACE)
                    }
                    Remap::FixedOverLive => {
                        let ok = map_fixed(addr, len, libc::MAP_FIXED);
                        retired.store(gen, Ordering::SeqCst);
                        ok
                    }
                };
                assert!(ok, "re-mapping failed: {}", std::io::Error::last_os_error());
                gen += 1;
                fill(addr, len, gen);
                remaps += 1;
                // A random pause of up to ~200 µs lets the other thread hit in between.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let spin = Instant::now() + Duration::from_micros(rng % 200);
                while Instant::now() < spin {
                    std::hint::spin_loop();
                }
            }
            remaps
        })
    };

    let registrar = Arc::new(UringRegistrar::new(16).unwrap());
    let cache = Cache::new(
        registrar.clone(),
        EventSource::Watcher(watcher),
        Config::default(),
    );
    // SAFETY: a new memfd the test owns.
    let sink = unsafe { OwnedFd::from_raw_fd(libc::memfd_create(c"race".as_ptr(), 0)) };
    let mut counts = Counts::default();
    let mut buf = vec![0u64; len / 8];
    // At least `secs`; then on until the run has raced (hits and misses both happened: on a
    // loaded machine the remapper can keep every get colliding for a while), up to a cap.
    let started = Instant::now();
    let (least, cap) = (
        Duration::from_secs(secs),
        Duration::from_secs(secs * 5 + 10),
    );
    loop {
        let elapsed = started.elapsed();
        if elapsed >= cap {
            break;
        }
        if elapsed >= least && counts.gets % 64 == 0 {
            let s = cache.stats();
            if s.hits > 0 && s.misses > 10 {
                break;
            }
        }
        let floor = retired.load(Ordering::SeqCst);
        counts.gets += 1;
        let g = match cache.get(addr as u64, len as u64, Access::READ_WRITE) {
            Ok(g) => g,
            // The memory is between munmap and re-map, or went away during registration.
            Err(Error::Unmapped { .. }) | Err(Error::Registrar { .. }) => {
                counts.gone += 1;
                continue;
            }
            // Every attempt collided with a remap: the memory never held still long enough.
            Err(Error::Unstable { .. }) => {
                counts.unstable += 1;
                continue;
            }
            Err(e) => panic!("get: {e}"),
        };
        let n = registrar
            .write_fixed(g.handle(), addr as u64, len as u32, sink.as_raw_fd(), 0)
            .unwrap();
        assert_eq!(n, len);
        drop(g);
        // SAFETY: reads into our own buffer of `len` bytes.
        let r = unsafe { libc::pread(sink.as_raw_fd(), buf.as_mut_ptr().cast(), len, 0) };
        assert_eq!(r as usize, len);
        if buf.iter().any(|w| *w != 0 && *w <= floor) {
            if counts.stale < 5 {
                println!("stale: floor {floor} words {:?}", &buf[..4]);
            }
            counts.stale += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    counts.remaps = remapper.join().unwrap();
    let stats = cache.stats();
    if let EventSource::Watcher(w) = cache.source() {
        println!("watcher: {:?}", w.stats());
    }
    drop(cache);
    let books = registrar.books();
    assert_eq!(books.live, 0, "io_uring slots leaked: {books:?}");
    assert_eq!(books.double_releases, 0);
    // SAFETY: releases the test's reservation.
    unsafe { libc::munmap(base as *mut c_void, len + 2 * ps()) };
    (counts, stats)
}

fn run(mode: Remap) {
    let secs = std::env::var("RCACHE_RACE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let _serial = common::serial();
    let (c, s) = common::bounded(Duration::from_secs(secs * 10 + 60), move || {
        race(mode, secs)
    });
    println!(
        "{mode:?}: {} gets, {} hits, {} misses, {} collisions, {} while unmapped, {} unstable, \
         {} remaps, {} invalidations, {} STALE",
        c.gets,
        s.hits,
        s.misses,
        s.collisions,
        c.gone,
        c.unstable,
        c.remaps,
        s.invalidations,
        c.stale
    );
    assert_eq!(c.stale, 0, "stale hits");
    // The test raced: both hits and re-registrations after remaps happened.
    assert!(c.remaps > 100 && s.hits > 0 && s.misses > 10, "{c:?} {s:?}");
}

#[test]
fn no_stale_hit_under_munmap_then_map_fixed_noreplace() {
    run(Remap::UnmapThenNoReplace);
}

#[test]
fn no_stale_hit_under_map_fixed_over_live_memory() {
    run(Remap::FixedOverLive);
}
