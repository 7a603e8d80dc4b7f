//! `mmnotify watch`: every row of the operation table, performed on this process's own memory,
//! judged against the page tables.
//!
//! For each path (munmap whole and partial, a raw `syscall(SYS_munmap)`, munmap from another
//! thread, madvise DONTNEED / FREE / REMOVE, mremap move, MAP_FIXED over live memory, brk
//! shrink, `shmdt`, hole punch, `ftruncate`, and the cooperative wrappers for the blind spots)
//! the demo:
//!
//! 1. maps fresh memory, writes a distinct stamp into every page (so that page *contents*
//!    identify a page where page frame numbers are hidden), and asks the process's
//!    [`Watcher`] to watch it;
//! 2. mirrors it with an interval subscriber, [`FrameMirror`], that records for each page the
//!    frame backing it ([`pagemap::frame`]: the PFN from `/proc/self/pagemap` with
//!    `CAP_SYS_ADMIN`, else a fingerprint of the page's contents), filled through the
//!    watcher's `read_begin` / `read_retry` protocol;
//! 3. notes the time, performs the operation, waits until everything the watcher read has been
//!    delivered ([`Watcher::synchronize`]), and
//! 4. prints what the subscriber saw (each invalidation, with the time of its callback), the
//!    latency from the call's entry to the first callback, the mirror's size before and after,
//!    and whether the mirror is *coherent*: every entry it still holds matches what backs that
//!    page now, and it holds nothing for a page the operation changed.
//!
//! Nothing in the table is an expectation: the events are the ones the subscriber recorded,
//! the verdict is the comparison with `/proc/self/pagemap`. A path mmnotify claims to cover
//! (through a userfaultfd event or a wrapper) that comes out incoherent makes the command exit
//! with status 1. Blind spots performed without their wrapper are shown as *documented misses*:
//! the mirror is left stale, which is what userfaultfd gives and what docs/UFFD.md says.
//!
//! `brk` moves the heap's end, which the allocator owns. The demo grows the break by a few
//! pages of its own after giving the allocator spare room, and shrinks it only if the break
//! is still where it left it; otherwise the row says it was skipped, and why.

// std's locks are fine here: this is demo code, not the engine (see clippy.toml).
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use mmnotify::{Event, IntervalCtx, IntervalSubscriber, Invalidate, Invalidation, Range};
use mmnotify_uffd::pagemap::{self, Frame};
use mmnotify_uffd::{maps, WatchedInterval, Watcher};

/// Arguments of `mmnotify watch`.
#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Run only the paths whose name contains this text (e.g. `munmap`, `wrapped`).
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
    /// Also list every invalidation with its absolute range and callback latency.
    #[arg(long, short)]
    verbose: bool,
    /// Test hook: the mirror records invalidations but keeps its entries, so every covered
    /// path must come out incoherent and the exit status must be 1.
    #[arg(long, hide = true)]
    ignore_invalidations: bool,
}

/// How long to wait for the watcher to deliver what it read, or for a fill to begin.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// `MADV_POPULATE_WRITE` (Linux 5.14): faults pages in writable, failing (not crashing) on a
/// hole.
const MADV_POPULATE_WRITE: i32 = 23;

fn ps() -> u64 {
    mmnotify_uffd::page_size()
}

fn os_err(call: &str) -> String {
    format!("{call}: {}", io::Error::last_os_error())
}

// --- the mirror -------------------------------------------------------------------------------

/// One invalidation as the subscriber saw it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    start: u64,
    end: u64,
    event: Event,
    at: Instant,
}

#[derive(Debug, Default)]
struct MirrorState {
    /// Page address → the frame recorded when the page was filled.
    entries: BTreeMap<u64, Frame>,
    /// Every invalidation, in order.
    seen: Vec<Seen>,
}

/// A mirror of page frames, kept coherent by the watcher's invalidations: an interval
/// subscriber that drops the pages of each invalidated range (unless the test hook tells it to
/// keep them).
#[derive(Debug, Default)]
struct FrameMirror {
    state: Mutex<MirrorState>,
    keep_entries: bool,
}

impl FrameMirror {
    fn lock(&self) -> std::sync::MutexGuard<'_, MirrorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl IntervalSubscriber for FrameMirror {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        let at = Instant::now();
        let mut s = self.lock();
        // Under the lock the fill holds around read_retry and its commit.
        ctx.set_seq();
        let r = inv.range();
        if !self.keep_entries {
            let dead: Vec<u64> = s
                .entries
                .range(r.start()..r.end())
                .map(|(k, _)| *k)
                .collect();
            for k in dead {
                s.entries.remove(&k);
            }
        }
        s.seen.push(Seen {
            start: r.start(),
            end: r.end(),
            event: inv.event(),
            at,
        });
        Invalidate::Done
    }
}

/// A watched, mirrored piece of memory.
struct Region {
    base: u64,
    pages: u64,
    mirror: Arc<FrameMirror>,
    iv: WatchedInterval,
}

impl Region {
    fn len(&self) -> u64 {
        self.pages * ps()
    }

    fn page(&self, i: u64) -> u64 {
        self.base + i * ps()
    }

    fn ptr(&self) -> *mut c_void {
        self.base as *mut c_void
    }
}

/// Watches `[base, base + pages)` and fills a mirror of it.
fn mirror_region(w: &Watcher, base: u64, pages: u64, keep: bool) -> Result<Region, Outcome> {
    let len = pages * ps();
    let report = w
        .watch(base, len)
        .map_err(|e| Outcome::Skipped(format!("cannot be watched here: {e}")))?;
    if !report.is_complete() {
        let why: Vec<String> = report.skipped.iter().map(|s| s.to_string()).collect();
        return Err(Outcome::Skipped(format!(
            "only partly watchable: {}",
            why.join("; ")
        )));
    }
    let mirror = Arc::new(FrameMirror {
        keep_entries: keep,
        ..FrameMirror::default()
    });
    let range = Range::from_len(base, len).map_err(|e| Outcome::Failed(format!("range: {e}")))?;
    let iv = w
        .insert_interval(range, mirror.clone())
        .map_err(|e| Outcome::Failed(format!("insert_interval: {e}")))?;
    let region = Region {
        base,
        pages,
        mirror,
        iv,
    };
    fill(&region)?;
    Ok(region)
}

/// Fills the whole mirror through the collision-retry protocol.
fn fill(r: &Region) -> Result<(), Outcome> {
    for _ in 0..1000 {
        let seq =
            r.iv.read_begin_timeout(DELIVERY_TIMEOUT)
                .map_err(|e| Outcome::Failed(format!("read_begin: {e}")))?;
        // SAFETY: populating changes no contents; on a hole it fails instead of faulting.
        if unsafe { libc::madvise(r.ptr(), r.len() as usize, MADV_POPULATE_WRITE) } != 0 {
            return Err(Outcome::Failed(os_err("madvise(POPULATE_WRITE)")));
        }
        let frames = (0..r.pages)
            .map(|i| pagemap::frame(r.page(i)))
            .collect::<io::Result<Vec<Frame>>>()
            .map_err(|e| Outcome::Failed(format!("reading the page map: {e}")))?;
        let mut s = r.mirror.lock();
        if r.iv.read_retry(seq) {
            continue;
        }
        for (i, f) in (0..r.pages).zip(frames) {
            s.entries.insert(r.page(i), f);
        }
        return Ok(());
    }
    Err(Outcome::Failed("the fill never settled".into()))
}

// --- what a path observed ---------------------------------------------------------------------

/// What the subscriber saw and what the page tables say, for one path.
#[derive(Debug)]
struct Observation {
    base: u64,
    seen: Vec<Seen>,
    /// When the operation was entered.
    entry: Instant,
    entries_before: usize,
    entries_after: usize,
    /// Entries that disagree with what backs the page now: (address, recorded, now).
    stale: Vec<(u64, Frame, Frame)>,
    /// Entries still held for pages the operation changed.
    kept_changed: usize,
    /// Entries wrong in either way (stale, or kept for a changed page), each counted once.
    wrong: usize,
}

impl Observation {
    fn coherent(&self) -> bool {
        self.stale.is_empty() && self.kept_changed == 0
    }

    fn first_latency(&self) -> Option<Duration> {
        self.seen
            .iter()
            .map(|s| s.at.saturating_duration_since(self.entry))
            .min()
    }
}

/// Why a path has no observation, or the observation.
#[derive(Debug)]
enum Outcome {
    Observed(Observation),
    /// Could not be run here, and why (not a failure).
    Skipped(String),
    /// Something went wrong (a failure for every path).
    Failed(String),
}

/// Waits for delivery and compares the mirror with the page tables.
/// `changed` is the page-index range of `r` that the operation changed.
fn observe(
    w: &Watcher,
    r: &Region,
    entries_before: usize,
    entry: Instant,
    changed: (u64, u64),
) -> Outcome {
    if let Err(e) = w.synchronize(DELIVERY_TIMEOUT) {
        return Outcome::Failed(format!("the watcher did not deliver: {e}"));
    }
    let (seen, entries) = {
        let s = r.mirror.lock();
        (s.seen.clone(), s.entries.clone())
    };
    let mut stale = Vec::new();
    for (&addr, &recorded) in &entries {
        match pagemap::frame(addr) {
            Ok(now) if now == recorded => {}
            Ok(now) => stale.push((addr, recorded, now)),
            Err(e) => return Outcome::Failed(format!("reading the page map: {e}")),
        }
    }
    let (c0, c1) = (r.page(changed.0), r.page(changed.1));
    let kept_changed = entries.range(c0..c1).count();
    let wrong = entries
        .keys()
        .filter(|a| (c0..c1).contains(*a) || stale.iter().any(|s| s.0 == **a))
        .count();
    Outcome::Observed(Observation {
        base: r.base,
        seen,
        entry,
        entries_before,
        entries_after: entries.len(),
        stale,
        kept_changed,
        wrong,
    })
}

/// Clears what the fill left in the event log, so that only the operation's events count.
fn arm(r: &Region) -> usize {
    let mut s = r.mirror.lock();
    s.seen.clear();
    s.entries.len()
}

/// Removes the subscription and unmaps what is left of `[addr, addr + len)`.
fn release(w: &Watcher, r: &Region, unmap: &[(u64, u64)]) {
    let _ = w.remove_interval(&r.iv);
    for &(addr, len) in unmap {
        // SAFETY: the demo's own memory, no longer referenced.
        unsafe { libc::munmap(addr as *mut c_void, len as usize) };
    }
}

// --- memory ------------------------------------------------------------------------------------

static STAMP: AtomicU64 = AtomicU64::new(0);

/// Writes a distinct 8-byte stamp at the start of each page.
fn stamp(base: u64, pages: u64) {
    if STAMP.load(Ordering::Relaxed) == 0 {
        let seed = u64::from(std::process::id()) << 32 | 1;
        let _ = STAMP.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    for i in 0..pages {
        let s = STAMP.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller mapped these pages read-write for the demo alone.
        unsafe { std::ptr::write_volatile((base + i * ps()) as *mut u64, s) };
    }
}

/// Maps `pages` read-write pages (at `hint` with `MAP_FIXED` in `flags`) and stamps them.
fn map(pages: u64, flags: i32, fd: i32, hint: u64) -> Result<u64, Outcome> {
    // SAFETY: a fresh mapping, or MAP_FIXED over memory this demo owns.
    let p = unsafe {
        libc::mmap(
            hint as *mut c_void,
            (pages * ps()) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Outcome::Failed(os_err("mmap")));
    }
    stamp(p as u64, pages);
    Ok(p as u64)
}

fn map_anon(pages: u64) -> Result<u64, Outcome> {
    map(pages, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
}

/// A memfd of `pages` pages.
fn memfd(pages: u64) -> Result<OwnedFd, Outcome> {
    // SAFETY: creates a descriptor that the OwnedFd below owns.
    let fd = unsafe { libc::memfd_create(c"mmnotify-watch".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Outcome::Skipped(os_err("memfd_create")));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::fs::ftruncate(&fd, pages * ps())
        .map_err(|e| Outcome::Failed(format!("ftruncate: {e}")))?;
    Ok(fd)
}

/// A private SysV segment of `pages` pages, attached and already marked for removal.
fn shm_attach(pages: u64) -> Result<u64, Outcome> {
    // SAFETY: a private segment; the attach is the demo's own memory.
    unsafe {
        let id = libc::shmget(
            libc::IPC_PRIVATE,
            (pages * ps()) as usize,
            libc::IPC_CREAT | 0o600,
        );
        if id < 0 {
            return Err(Outcome::Skipped(format!(
                "SysV shared memory is unavailable ({})",
                os_err("shmget")
            )));
        }
        let p = libc::shmat(id, std::ptr::null(), 0);
        libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        if p as isize == -1 {
            return Err(Outcome::Skipped(os_err("shmat")));
        }
        stamp(p as u64, pages);
        Ok(p as u64)
    }
}

fn check(rc: i32, call: &str) -> Result<(), Outcome> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Outcome::Failed(os_err(call)))
    }
}

// --- the paths ---------------------------------------------------------------------------------

/// What mmnotify says about a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Claim {
    /// A userfaultfd event reaches the subscribers.
    Uffd,
    /// The cooperative wrapper notifies (before the call).
    Wrapper,
    /// A blind spot, performed without its wrapper: no notification, documented.
    BlindSpot,
}

impl Claim {
    fn label(self) -> &'static str {
        match self {
            Claim::Uffd => "uffd-event",
            Claim::Wrapper => "wrapper",
            Claim::BlindSpot => "blind-spot",
        }
    }
}

type Run = fn(&Watcher, bool) -> Outcome;

struct Path {
    name: &'static str,
    claim: Claim,
    what: &'static str,
    run: Run,
}

const PATHS: &[Path] = &[
    Path {
        name: "munmap-whole",
        claim: Claim::Uffd,
        what: "munmap of a whole 8-page mapping",
        run: munmap_whole,
    },
    Path {
        name: "munmap-partial",
        claim: Claim::Uffd,
        what: "munmap of pages 2-4 of an 8-page mapping",
        run: munmap_partial,
    },
    Path {
        name: "munmap-raw-syscall",
        claim: Claim::Uffd,
        what: "syscall(SYS_munmap), which no libc hook sees",
        run: munmap_raw,
    },
    Path {
        name: "munmap-other-thread",
        claim: Claim::Uffd,
        what: "munmap of 4 pages from another thread",
        run: munmap_other_thread,
    },
    Path {
        name: "madv-dontneed",
        claim: Claim::Uffd,
        what: "madvise(DONTNEED) of pages 1-2 of 6",
        run: madv_dontneed,
    },
    Path {
        name: "madv-free",
        claim: Claim::Uffd,
        what: "madvise(FREE) of pages 1-2 of 6",
        run: madv_free,
    },
    Path {
        name: "madv-remove-memfd",
        claim: Claim::Uffd,
        what: "madvise(REMOVE) of pages 0-1 of a 4-page memfd mapping",
        run: madv_remove_memfd,
    },
    Path {
        name: "mremap-move",
        claim: Claim::Uffd,
        what: "mremap(MAYMOVE|FIXED) of 4 pages onto a PROT_NONE reservation elsewhere",
        run: mremap_move,
    },
    Path {
        name: "map-fixed-over",
        claim: Claim::Uffd,
        what: "mmap(MAP_FIXED) of 2 new pages over pages 1-2 of 4",
        run: map_fixed_over,
    },
    Path {
        name: "brk-shrink",
        claim: Claim::Uffd,
        what: "sbrk(+4 pages) owned by the demo, then sbrk(-4 pages)",
        run: brk_shrink,
    },
    Path {
        name: "munmap-wrapped",
        claim: Claim::Wrapper,
        what: "Watcher::munmap of 4 pages (notified before the unmap)",
        run: munmap_wrapped,
    },
    Path {
        name: "shmdt",
        claim: Claim::BlindSpot,
        what: "shmdt of a 2-page SysV attach, without the wrapper",
        run: shmdt_plain,
    },
    Path {
        name: "shmdt-wrapped",
        claim: Claim::Wrapper,
        what: "Watcher::shmdt of a 2-page SysV attach",
        run: shmdt_wrapped,
    },
    Path {
        name: "punch-hole",
        claim: Claim::BlindSpot,
        what: "fallocate(PUNCH_HOLE) of pages 0-1 of a mapped memfd, without the wrapper",
        run: punch_hole_plain,
    },
    Path {
        name: "punch-hole-wrapped",
        claim: Claim::Wrapper,
        what: "Watcher::punch_hole of pages 0-1 of a mapped memfd",
        run: punch_hole_wrapped,
    },
    Path {
        name: "ftruncate",
        claim: Claim::BlindSpot,
        what: "ftruncate of a mapped 4-page memfd to 1 page, without the wrapper",
        run: ftruncate_plain,
    },
    Path {
        name: "ftruncate-wrapped",
        claim: Claim::Wrapper,
        what: "Watcher::ftruncate of a mapped 4-page memfd to 1 page",
        run: ftruncate_wrapped,
    },
];

/// The common shape of a path on anonymous memory: map `pages`, mirror, run `op` (which
/// returns the instant it entered the call), observe `changed`, release.
fn on_anon(
    w: &Watcher,
    keep: bool,
    pages: u64,
    changed: (u64, u64),
    op: impl FnOnce(&Region) -> Result<Instant, Outcome>,
) -> Outcome {
    let base = match map_anon(pages) {
        Ok(b) => b,
        Err(o) => return o,
    };
    let r = match mirror_region(w, base, pages, keep) {
        Ok(r) => r,
        Err(o) => {
            // SAFETY: the demo's own mapping.
            unsafe { libc::munmap(base as *mut c_void, (pages * ps()) as usize) };
            return o;
        }
    };
    let before = arm(&r);
    let outcome = match op(&r) {
        Ok(entry) => observe(w, &r, before, entry, changed),
        Err(o) => o,
    };
    release(w, &r, &[(base, pages * ps())]);
    outcome
}

fn munmap_whole(w: &Watcher, keep: bool) -> Outcome {
    on_anon(w, keep, 8, (0, 8), |r| {
        let entry = Instant::now();
        // SAFETY: the demo's own mapping, not referenced.
        check(unsafe { libc::munmap(r.ptr(), r.len() as usize) }, "munmap")?;
        Ok(entry)
    })
}

fn munmap_partial(w: &Watcher, keep: bool) -> Outcome {
    on_anon(w, keep, 8, (2, 5), |r| {
        let entry = Instant::now();
        // SAFETY: the demo's own mapping, not referenced.
        let rc = unsafe { libc::munmap(r.page(2) as *mut c_void, (3 * ps()) as usize) };
        check(rc, "munmap")?;
        Ok(entry)
    })
}

fn munmap_raw(w: &Watcher, keep: bool) -> Outcome {
    on_anon(w, keep, 4, (0, 4), |r| {
        let entry = Instant::now();
        // SAFETY: the demo's own mapping; a raw system call no libc hook could see.
        let rc = unsafe { libc::syscall(libc::SYS_munmap, r.base, r.len()) };
        if rc != 0 {
            return Err(Outcome::Failed(os_err("syscall(SYS_munmap)")));
        }
        Ok(entry)
    })
}

fn munmap_other_thread(w: &Watcher, keep: bool) -> Outcome {
    on_anon(w, keep, 4, (0, 4), |r| {
        let (addr, len) = (r.base as usize, r.len() as usize);
        let joined = std::thread::spawn(move || {
            let entry = Instant::now();
            // SAFETY: the demo's own mapping, not referenced.
            let rc = unsafe { libc::munmap(addr as *mut c_void, len) };
            (entry, rc, io::Error::last_os_error())
        })
        .join();
        match joined {
            Ok((entry, 0, _)) => Ok(entry),
            Ok((_, _, e)) => Err(Outcome::Failed(format!("munmap: {e}"))),
            Err(_) => Err(Outcome::Failed("the unmapping thread panicked".into())),
        }
    })
}

fn madvise_case(w: &Watcher, keep: bool, advice: i32) -> Outcome {
    on_anon(w, keep, 6, (1, 3), |r| {
        let entry = Instant::now();
        // SAFETY: the demo's own mapping; its contents may become zero, nothing refers to them.
        let rc = unsafe { libc::madvise(r.page(1) as *mut c_void, (2 * ps()) as usize, advice) };
        check(rc, "madvise")?;
        Ok(entry)
    })
}

fn madv_dontneed(w: &Watcher, keep: bool) -> Outcome {
    madvise_case(w, keep, libc::MADV_DONTNEED)
}

fn madv_free(w: &Watcher, keep: bool) -> Outcome {
    madvise_case(w, keep, libc::MADV_FREE)
}

/// The common shape of a path on a 4-page memfd mapped shared.
fn on_memfd(
    w: &Watcher,
    keep: bool,
    changed: (u64, u64),
    op: impl FnOnce(&Region, BorrowedFd<'_>) -> Result<Instant, Outcome>,
) -> Outcome {
    const PAGES: u64 = 4;
    let fd = match memfd(PAGES) {
        Ok(fd) => fd,
        Err(o) => return o,
    };
    let base = match map(PAGES, libc::MAP_SHARED, fd.as_raw_fd(), 0) {
        Ok(b) => b,
        Err(o) => return o,
    };
    let r = match mirror_region(w, base, PAGES, keep) {
        Ok(r) => r,
        Err(o) => {
            // SAFETY: the demo's own mapping.
            unsafe { libc::munmap(base as *mut c_void, (PAGES * ps()) as usize) };
            return o;
        }
    };
    let before = arm(&r);
    let outcome = match op(&r, fd.as_fd()) {
        Ok(entry) => observe(w, &r, before, entry, changed),
        Err(o) => o,
    };
    release(w, &r, &[(base, PAGES * ps())]);
    outcome
}

fn madv_remove_memfd(w: &Watcher, keep: bool) -> Outcome {
    on_memfd(w, keep, (0, 2), |r, _| {
        let entry = Instant::now();
        // SAFETY: the demo's own mapping; the removed pages read zero afterwards.
        let rc = unsafe { libc::madvise(r.ptr(), (2 * ps()) as usize, libc::MADV_REMOVE) };
        check(rc, "madvise(REMOVE)")?;
        Ok(entry)
    })
}

fn punch(fd: BorrowedFd<'_>, pages: u64) -> i32 {
    // SAFETY: punching the demo's own memfd; nothing refers to the mapped contents.
    unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            (pages * ps()) as libc::off_t,
        )
    }
}

fn punch_hole_plain(w: &Watcher, keep: bool) -> Outcome {
    on_memfd(w, keep, (0, 2), |_, fd| {
        let entry = Instant::now();
        check(punch(fd, 2), "fallocate(PUNCH_HOLE)")?;
        Ok(entry)
    })
}

fn punch_hole_wrapped(w: &Watcher, keep: bool) -> Outcome {
    on_memfd(w, keep, (0, 2), |_, fd| {
        let entry = Instant::now();
        // SAFETY: nothing refers to the punched contents.
        unsafe { w.punch_hole(fd, 0, 2 * ps()) }
            .map_err(|e| Outcome::Failed(format!("Watcher::punch_hole: {e}")))?;
        Ok(entry)
    })
}

fn ftruncate_plain(w: &Watcher, keep: bool) -> Outcome {
    on_memfd(w, keep, (1, 4), |_, fd| {
        let entry = Instant::now();
        rustix::fs::ftruncate(fd, ps()).map_err(|e| Outcome::Failed(format!("ftruncate: {e}")))?;
        Ok(entry)
    })
}

fn ftruncate_wrapped(w: &Watcher, keep: bool) -> Outcome {
    on_memfd(w, keep, (1, 4), |_, fd| {
        let entry = Instant::now();
        // SAFETY: nothing refers to the pages past the new end (they are never touched again).
        unsafe { w.ftruncate(fd, ps()) }
            .map_err(|e| Outcome::Failed(format!("Watcher::ftruncate: {e}")))?;
        Ok(entry)
    })
}

fn mremap_move(w: &Watcher, keep: bool) -> Outcome {
    let moved = std::cell::Cell::new(None);
    let outcome = on_anon(w, keep, 4, (0, 4), |r| {
        // The destination: a PROT_NONE reservation of the demo's own, placed by the kernel
        // (so it cannot overlap the source), which the move replaces. It is not watched, so
        // replacing it sends nothing.
        // SAFETY: a fresh, inaccessible mapping.
        let spot = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                r.len() as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if spot == libc::MAP_FAILED {
            return Err(Outcome::Failed(os_err("mmap(PROT_NONE)")));
        }
        let entry = Instant::now();
        // SAFETY: moving the demo's own mapping over its own reservation.
        let p = unsafe {
            libc::mremap(
                r.ptr(),
                r.len() as usize,
                r.len() as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                spot,
            )
        };
        if p == libc::MAP_FAILED {
            let err = os_err("mremap");
            // SAFETY: the reservation is the demo's own.
            unsafe { libc::munmap(spot, r.len() as usize) };
            return Err(Outcome::Failed(err));
        }
        moved.set(Some(p));
        Ok(entry)
    });
    if let Some(p) = moved.get() {
        // SAFETY: the moved copy is the demo's own memory, no longer referenced.
        unsafe { libc::munmap(p, (4 * ps()) as usize) };
    }
    outcome
}

fn map_fixed_over(w: &Watcher, keep: bool) -> Outcome {
    on_anon(w, keep, 4, (1, 3), |r| {
        let entry = Instant::now();
        map(
            2,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            r.page(1),
        )?;
        Ok(entry)
    })
}

fn munmap_wrapped(w: &Watcher, keep: bool) -> Outcome {
    on_anon(w, keep, 4, (0, 4), |r| {
        let entry = Instant::now();
        // SAFETY: the demo's own mapping, not referenced.
        unsafe { w.munmap(r.ptr(), r.len() as usize) }
            .map_err(|e| Outcome::Failed(format!("Watcher::munmap: {e}")))?;
        Ok(entry)
    })
}

fn on_shm(
    w: &Watcher,
    keep: bool,
    op: impl FnOnce(&Region) -> Result<Instant, Outcome>,
) -> Outcome {
    const PAGES: u64 = 2;
    let base = match shm_attach(PAGES) {
        Ok(b) => b,
        Err(o) => return o,
    };
    let r = match mirror_region(w, base, PAGES, keep) {
        Ok(r) => r,
        Err(o) => {
            // SAFETY: detaching the demo's own attach.
            unsafe { libc::shmdt(base as *const c_void) };
            return o;
        }
    };
    let before = arm(&r);
    let outcome = match op(&r) {
        Ok(entry) => observe(w, &r, before, entry, (0, PAGES)),
        Err(o) => o,
    };
    release(w, &r, &[]);
    outcome
}

fn shmdt_plain(w: &Watcher, keep: bool) -> Outcome {
    on_shm(w, keep, |r| {
        let entry = Instant::now();
        // SAFETY: detaching the demo's own attach, not referenced.
        check(unsafe { libc::shmdt(r.ptr()) }, "shmdt")?;
        Ok(entry)
    })
}

fn shmdt_wrapped(w: &Watcher, keep: bool) -> Outcome {
    on_shm(w, keep, |r| {
        let entry = Instant::now();
        // SAFETY: detaching the demo's own attach, not referenced.
        unsafe { w.shmdt(r.ptr()) }.map_err(|e| Outcome::Failed(format!("Watcher::shmdt: {e}")))?;
        Ok(entry)
    })
}

/// brk shrink on pages the demo adds to the top of the heap itself.
fn brk_shrink(w: &Watcher, keep: bool) -> Outcome {
    const PAGES: u64 = 4;
    // Give the allocator spare room at the top of its heap first, so that nothing it does
    // while the demo's pages sit above the heap needs to move the break.
    drop(std::hint::black_box(vec![1u8; 96 << 10]));
    // SAFETY: sbrk(0) only reads the break.
    let cur = unsafe { libc::sbrk(0) } as u64;
    if cur == u64::MAX {
        return Outcome::Skipped("this process has no program break".into());
    }
    let start = cur.div_ceil(ps()) * ps();
    let end = start + PAGES * ps();
    // SAFETY: grows the break by pages nobody else uses; the allocator treats a moved break
    // as foreign memory and never hands it out.
    let old = unsafe { libc::sbrk((end - cur) as libc::intptr_t) } as u64;
    if old == u64::MAX {
        return Outcome::Skipped(os_err("sbrk(+4 pages)"));
    }
    if old != cur {
        return Outcome::Skipped(format!(
            "the break moved from {cur:#x} to {old:#x} while the demo grew it; its pages are left in place"
        ));
    }
    stamp(start, PAGES);
    // Watching registers the whole [heap] VMA (the allocator's heap with the demo's pages).
    let r = match mirror_region(w, start, PAGES, keep) {
        Ok(r) => r,
        Err(o) => return o,
    };
    let before = arm(&r);
    // SAFETY: sbrk(0) only reads the break.
    let now = unsafe { libc::sbrk(0) } as u64;
    let outcome = if now != end {
        Outcome::Skipped(format!(
            "the allocator moved the break to {now:#x} while the demo's pages sat on top; shrinking would free its memory"
        ))
    } else {
        let entry = Instant::now();
        // SAFETY: gives back exactly the pages grown above, which only the demo used.
        let rc = unsafe { libc::sbrk(-((PAGES * ps()) as libc::intptr_t)) } as u64;
        if rc == u64::MAX {
            Outcome::Failed(os_err("sbrk(-4 pages)"))
        } else {
            observe(w, &r, before, entry, (0, PAGES))
        }
    };
    let _ = w.remove_interval(&r.iv);
    // Leave the allocator's heap unwatched, as it was.
    if let Ok(vmas) = maps::read_self_maps() {
        for v in vmas.iter().filter(|v| v.name == "[heap]") {
            let _ = w.unwatch(v.start, v.end - v.start);
        }
    }
    outcome
}

// --- the table ----------------------------------------------------------------------------------

fn event_cell(o: &Observation, s: &Seen) -> String {
    let name = match s.event {
        Event::Unmap => "Unmap".to_owned(),
        Event::Clear => "Clear".to_owned(),
        other => format!("{other:?}"),
    };
    let ps = ps();
    if s.start >= o.base && (s.start - o.base) % ps == 0 && (s.end - o.base) % ps == 0 {
        format!(
            "{name}[{},{})",
            (s.start - o.base) / ps,
            (s.end - o.base) / ps
        )
    } else {
        format!("{name}[{:#x},{:#x})", s.start, s.end)
    }
}

fn events_cell(o: &Observation) -> String {
    if o.seen.is_empty() {
        return "none".to_owned();
    }
    o.seen
        .iter()
        .map(|s| event_cell(o, s))
        .collect::<Vec<_>>()
        .join(" ")
}

fn latency_cell(d: Option<Duration>) -> String {
    match d {
        None => "-".to_owned(),
        Some(d) if d < Duration::from_millis(10) => format!("{:.1} us", d.as_secs_f64() * 1e6),
        Some(d) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
    }
}

/// The verdict of a path, and whether it is a failure.
fn verdict(claim: Claim, outcome: &Outcome) -> (String, bool) {
    match outcome {
        Outcome::Skipped(why) => (format!("skipped: {why}"), false),
        Outcome::Failed(why) => (format!("FAILED: {why}"), true),
        Outcome::Observed(o) => match (claim, o.coherent()) {
            (Claim::Uffd | Claim::Wrapper, true) => ("coherent".to_owned(), false),
            (Claim::Uffd | Claim::Wrapper, false) => {
                (format!("INCOHERENT: {} stale entries", o.wrong), true)
            }
            (Claim::BlindSpot, false) => {
                (format!("documented miss: {} stale entries", o.wrong), false)
            }
            (Claim::BlindSpot, true) => ("coherent (no miss on this kernel)".to_owned(), false),
        },
    }
}

/// One unmapping of a watched page before the table, so that the first row's latency is not
/// the watcher threads' first wake-up (page faults on their stacks, lazy binding).
fn warm_up(w: &Watcher) {
    if let Ok(page) = map_anon(1) {
        if w.watch(page, ps()).is_ok() {
            // SAFETY: the demo's own page, not referenced.
            unsafe { libc::munmap(page as *mut c_void, ps() as usize) };
            let _ = w.synchronize(DELIVERY_TIMEOUT);
        } else {
            // SAFETY: as above.
            unsafe { libc::munmap(page as *mut c_void, ps() as usize) };
        }
    }
}

fn header(w: &Watcher) -> String {
    let mut s = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let f = w.features();
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let _ = writeln!(
        s,
        "mmnotify watch: Linux {kernel}, uid {uid}, userfaultfd features {:#x} (WP_ASYNC {}), page size {} B",
        f.enabled,
        if f.wp_async { "on" } else { "off" },
        ps()
    );
    let _ = writeln!(
        s,
        "coherence judged by {}\n",
        if pagemap::pfns_visible() {
            "page frame numbers from /proc/self/pagemap"
        } else {
            "page-content fingerprints (page frame numbers are hidden without CAP_SYS_ADMIN)"
        }
    );
    s
}

/// Runs every path (or those `--only` selects) and prints the table; the exit status is 1 if
/// a path mmnotify claims to cover came out incoherent or failed.
pub(crate) fn run(args: &WatchArgs) -> Result<ExitCode, String> {
    let w = Watcher::get().map_err(|e| format!("no watcher for this process: {e}"))?;
    warm_up(&w);
    print!("{}", header(&w));
    let selected: Vec<&Path> = PATHS
        .iter()
        .filter(|p| args.only.as_deref().map_or(true, |t| p.name.contains(t)))
        .collect();
    if selected.is_empty() {
        return Err(format!(
            "no path matches {:?}; the paths are: {}",
            args.only.as_deref().unwrap_or(""),
            PATHS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
        ));
    }
    println!(
        "{:<20} {:<11} {:<34} {:>9} {:>7}  verdict",
        "path", "covered by", "events the subscriber saw", "latency", "mirror"
    );
    println!("{}", "-".repeat(110));
    let mut failures = 0;
    let (mut covered, mut misses, mut skipped) = (0, 0, 0);
    let mut details = String::new();
    for p in &selected {
        let outcome = (p.run)(&w, args.ignore_invalidations);
        let (verdict, failed) = verdict(p.claim, &outcome);
        failures += usize::from(failed);
        let (events, latency, mirror) = match &outcome {
            Outcome::Observed(o) => (
                events_cell(o),
                latency_cell(o.first_latency()),
                format!("{}->{}", o.entries_before, o.entries_after),
            ),
            _ => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
        };
        match (&outcome, failed) {
            (Outcome::Skipped(_), _) => skipped += 1,
            (_, true) => {}
            (Outcome::Observed(o), false) if p.claim == Claim::BlindSpot && !o.coherent() => {
                misses += 1
            }
            _ => covered += 1,
        }
        println!(
            "{:<20} {:<11} {:<34} {:>9} {:>7}  {verdict}",
            p.name,
            p.claim.label(),
            events,
            latency,
            mirror
        );
        if args.verbose {
            let _ = writeln!(details, "{}: {}", p.name, p.what);
            if let Outcome::Observed(o) = &outcome {
                for s in &o.seen {
                    let _ = writeln!(
                        details,
                        "    {:?} [{:#x}, {:#x}) after {}",
                        s.event,
                        s.start,
                        s.end,
                        latency_cell(Some(s.at.saturating_duration_since(o.entry)))
                    );
                }
                for (addr, was, now) in &o.stale {
                    let _ = writeln!(
                        details,
                        "    stale: {addr:#x} recorded {was:?}, now {now:?}"
                    );
                }
            }
        }
    }
    println!();
    for p in &selected {
        println!("{:<20} {}", p.name, p.what);
    }
    if args.verbose {
        println!("\n{details}");
    }
    let stats = w.stats();
    println!(
        "\nwatcher: {} UNMAP, {} REMOVE, {} REMAP messages read; {} invalidations delivered",
        stats.unmaps, stats.removes, stats.remaps, stats.invalidations
    );
    println!(
        "events: [a,b) in pages from the start of the path's mapping; latency: from the call's entry \
         to the first subscriber callback; mirror: entries before -> after"
    );
    println!(
        "{covered} paths coherent, {misses} blind spots shown as documented misses, {skipped} skipped, {failures} failures"
    );
    if failures > 0 {
        println!(
            "\na path mmnotify claims to cover was not kept coherent: this is a bug in mmnotify."
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
