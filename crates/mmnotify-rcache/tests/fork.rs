//! A forked child and the parent's cache (SEMANTICS R9): in the child, `get` is refused with
//! the watcher's `Forked` error and dropping the cache returns at once, even while a parent
//! thread was in the middle of a delivery at the fork (its epoch never closes in the child);
//! and the child never touches the parent's io_uring ring, so the parent's fixed buffers still
//! work after the child exited.
//!
//! Its own test binary: it forks, and nothing else should be running in the process then.

#![allow(
    clippy::disallowed_types,
    reason = "test code: std::sync is fine outside the engine (see clippy.toml)"
)]

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmnotify::{IntervalCtx, IntervalSubscriber, Invalidate, Invalidation};
use mmnotify_rcache::{Access, Cache, Config, Error, EventSource, UringRegistrar};
use mmnotify_uffd::Watcher;

fn ps() -> u64 {
    mmnotify_rcache::page_size()
}

fn anon(pages: u64, fill: u8) -> u64 {
    // SAFETY: a fresh private anonymous mapping where the kernel chooses.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (pages * ps()) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: our fresh read-write mapping of that size.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), fill, (pages * ps()) as usize) };
    p as u64
}

/// An interval subscriber whose invalidation blocks (on the watcher's dispatcher) until
/// released: a delivery held open.
#[derive(Default)]
struct Blocker {
    entered: AtomicU32,
    release: AtomicBool,
}

impl IntervalSubscriber for Blocker {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _inv: &Invalidation) -> Invalidate {
        ctx.set_seq();
        self.entered.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.release.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Invalidate::Done
    }
}

/// Forks; the child checks that `get` is refused as forked, drops the cache (under an alarm:
/// a hang kills it with SIGALRM) and exits 0; the parent waits at most 20 s and returns the
/// child's wait status.
fn fork_and_drop_in_child(cache: &Cache<Arc<UringRegistrar>>, addr: u64, len: u64) -> i32 {
    // SAFETY: the child only runs the cache's fork-checked paths (no lock is taken there) and
    // then `_exit`s; the parent owns the child's pid.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: arms SIGALRM's default action (terminate) in this child.
        unsafe { libc::alarm(10) };
        let refused = matches!(
            cache.get(addr, len, Access::READ),
            Err(Error::Watcher(mmnotify_uffd::Error::Forked))
        );
        // SAFETY: a bitwise copy of the cache, dropped in this child only (the code under
        // test); the child's original is never used again: it `_exit`s right after.
        drop(unsafe { std::ptr::read(cache) });
        // SAFETY: ends the child without running the parent's atexit handlers or destructors.
        unsafe { libc::_exit(if refused { 0 } else { 3 }) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child without blocking.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return status;
        }
        if Instant::now() > deadline {
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: reaps it.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            panic!("the forked child did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn write_through(
    cache: &Cache<Arc<UringRegistrar>>,
    registrar: &UringRegistrar,
    sink: &OwnedFd,
    addr: u64,
    len: u64,
    fill: u8,
) {
    let g = cache.get(addr, len, Access::READ).unwrap();
    let n = registrar
        .write_fixed(g.handle(), addr, len as u32, sink.as_raw_fd(), 0)
        .expect("WRITE_FIXED through the parent's registration");
    assert_eq!(n as u64, len);
    drop(g);
    let mut back = vec![0u8; len as usize];
    // SAFETY: reads into our own buffer of `len` bytes.
    let r = unsafe { libc::pread(sink.as_raw_fd(), back.as_mut_ptr().cast(), len as usize, 0) };
    assert_eq!(r as u64, len);
    assert!(
        back.iter().all(|b| *b == fill),
        "the written bytes are the buffer's"
    );
}

#[test]
fn a_forked_child_drops_the_cache_at_once_and_leaves_the_parents_ring_alone() {
    common::bounded(Duration::from_secs(90), || {
        let watcher = Watcher::get().unwrap();
        let registrar = Arc::new(UringRegistrar::new(8).unwrap());
        let cache = Cache::new(
            registrar.clone(),
            EventSource::Watcher(watcher.clone()),
            Config::default(),
        );
        // SAFETY: a new memfd the test owns.
        let sink = unsafe { OwnedFd::from_raw_fd(libc::memfd_create(c"fork".as_ptr(), 0)) };
        let len = 4 * ps();
        let buf = anon(4, 0x5a);
        write_through(&cache, &registrar, &sink, buf, len, 0x5a);
        assert_eq!(cache.stats().regions, 1);

        // 1. No delivery open: the child's drop must not deregister the parent's slots.
        let status = fork_and_drop_in_child(&cache, buf, len);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child failed (wait status {status:#x})"
        );
        write_through(&cache, &registrar, &sink, buf, len, 0x5a);
        assert_eq!(cache.stats().hits, 1, "the second write was a hit");

        // 2. A delivery held open on the dispatcher at the fork: the child's drop must not
        //    wait for its epoch.
        let blocked = anon(1, 1);
        let blocker = Arc::new(Blocker::default());
        let _report = watcher.watch(blocked, ps()).unwrap();
        let interval = watcher
            .insert_interval(
                mmnotify::Range::new(blocked, blocked + ps()).unwrap(),
                blocker.clone(),
            )
            .unwrap();
        // SAFETY: our own page; the watcher reports the unmap to the blocker.
        unsafe { libc::munmap(blocked as *mut libc::c_void, ps() as usize) };
        let until = Instant::now() + Duration::from_secs(20);
        while blocker.entered.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < until, "the unmap was never delivered");
            std::thread::sleep(Duration::from_millis(1));
        }
        let status = fork_and_drop_in_child(&cache, buf, len);
        blocker.release.store(true, Ordering::SeqCst);
        assert!(
            !libc::WIFSIGNALED(status),
            "the child was killed by signal {} (SIGALRM: its drop hung)",
            libc::WTERMSIG(status)
        );
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child failed (wait status {status:#x})"
        );
        // The parent's registration still works, and its cache still tears down normally.
        write_through(&cache, &registrar, &sink, buf, len, 0x5a);
        let _ = watcher.mm().remove_interval(interval.engine());
        drop(cache);
        assert_eq!(
            registrar.books().live,
            0,
            "the parent's drop released its slot"
        );
    });
}
