//! The `watch` group of `mmnotify bench`: what the process's userfaultfd watcher adds to
//! `munmap`, `madvise(DONTNEED)` and `mremap`, against the same call on unwatched memory and
//! against a bare userfaultfd reader, all in the same run; and the latency from the call's
//! entry to the subscriber's callback.
//!
//! **What is timed.** One system call, with a monotonic clock read right before and right
//! after it. Everything else (mapping, populating, registering, waiting for delivery) happens
//! outside the timed window. A call on watched memory returns only once the kernel's message
//! has been *read*, so its cost includes waking the reading thread; that is exactly what the
//! bare reader pays too.
//!
//! **The variants** of each call, on fresh, populated, anonymous private memory of
//! [`PIECE_PAGES`] pages:
//!
//! * `unwatched`: no userfaultfd knows the memory;
//! * `bare-reader`: the memory is registered (write-protect mode only, the watcher's
//!   registration and features) with a userfaultfd of this module's own, whose only thread does
//!   blocking `read`s of messages and notes the time of each: the least a reader can do;
//! * `bare-poll-reader`: the same, but the thread `poll`s the (non-blocking) descriptor and
//!   then reads, which is the shape of the watcher's reader (it also polls a wake-up eventfd);
//!   the difference between the two bare readers is the price of polling;
//! * `watched-0`, `watched-1`, `watched-1000`: the memory is watched by the process's
//!   [`Watcher`], whose engine `Mm` holds 0 interval subscriptions, 1 (covering the memory), or
//!   1000 (each over its own piece of memory-sized address range, one of which the call hits).
//!
//! A VMA belongs to one userfaultfd, so the bare readers' memory is never the watcher's: each
//! variant maps its own memory. The watcher's `Mm` cannot hold 0 and 1000 subscriptions at
//! once, so each watched variant runs in rounds of its own, *paired* with the three baselines:
//! call by call, in rotating order (unwatched, bare, bare-poll, watched-N, then starting one
//! further), in chunks of [`CHUNK`] calls on fresh memory. A burst of load from another process
//! then falls on all four alike, and a watched figure's ratio is taken against the bare
//! reader's median *from the same rounds*. Each figure is the **median** of its per-call
//! times: a call that blocks until another thread reads cannot use the low-percentile rule of
//! the engine figures (the fastest calls would be those where the reader happened to be on a
//! CPU already). After a watched call the benchmark waits, untimed, until the watcher has
//! delivered it, so that no call starts while the dispatcher is still busy with the previous
//! one.
//!
//! **Latency** is measured on `watched-1` (call entry → the subscriber's callback, which runs
//! on the watcher's dispatching thread) and on the bare reader (call entry → its first `read`
//! of the call's messages returning), median and 99th percentile.

use std::ffi::c_void;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use linux_raw_sys::general as uapi;
use mmnotify::{IntervalCtx, IntervalSubscriber, Invalidate, Invalidation, Range};
use mmnotify_bench::suite::{Baseline, Config, Row, TargetCheck, Unit, Verdict};
use mmnotify_uffd::{WatchedInterval, Watcher};
use rustix::event::{PollFd, PollFlags};
use rustix::ioctl::{ioctl, Updater};
use rustix::mm::UserfaultfdFlags;

/// Pages per call.
pub(crate) const PIECE_PAGES: u64 = 4;
/// Interval subscriptions of the largest variant.
const MANY: usize = 1000;
/// Calls per lane before its memory is replaced.
const CHUNK: usize = 50;
/// The target: watched calls at most this many times the bare reader's.
const TARGET: f64 = 1.1;

fn ps() -> u64 {
    mmnotify_uffd::page_size()
}

fn piece_len() -> u64 {
    PIECE_PAGES * ps()
}

/// Nanoseconds since the first call, on a clock all threads share.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn os_err(call: &str) -> String {
    format!("{call}: {}", std::io::Error::last_os_error())
}

/// Maps `len` bytes of anonymous private read-write memory and populates it.
fn map_populated(len: u64) -> Result<u64, String> {
    // SAFETY: a fresh mapping the benchmark owns.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap"));
    }
    populate(p as u64, len)?;
    Ok(p as u64)
}

/// Faults every page in, writable (MADV_POPULATE_WRITE, Linux 5.14).
fn populate(addr: u64, len: u64) -> Result<(), String> {
    // SAFETY: populating changes no contents; on a hole it fails.
    if unsafe { libc::madvise(addr as *mut c_void, len as usize, 23) } != 0 {
        return Err(os_err("madvise(POPULATE_WRITE)"));
    }
    Ok(())
}

fn unmap(addr: u64, len: u64) {
    // SAFETY: the benchmark's own memory, not referenced.
    unsafe { libc::munmap(addr as *mut c_void, len as usize) };
}

// --- the bare reader ----------------------------------------------------------------------------

/// A userfaultfd of its own with one thread that does nothing but read messages: blocking
/// `read`s, or (`poll_first`) `poll` then a non-blocking `read`, the shape of the watcher's
/// reader.
struct BareReader {
    uffd: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    /// When the first `read` since [`reset`](Self::reset) returned (0: none yet).
    first_read: Arc<AtomicU64>,
    /// A registered page whose unmapping wakes the reader to stop.
    sentinel: u64,
    thread: Option<JoinHandle<()>>,
}

impl BareReader {
    /// Creates the userfaultfd with `features` (the watcher's, without fork events) and starts
    /// the reader.
    fn start(features: u64, poll_first: bool, cpu: Option<usize>) -> Result<BareReader, String> {
        let mut flags = UserfaultfdFlags::CLOEXEC
            | UserfaultfdFlags::from_bits_retain(uapi::UFFD_USER_MODE_ONLY);
        if poll_first {
            // poll(2) on a blocking userfaultfd reports POLLERR.
            flags |= UserfaultfdFlags::NONBLOCK;
        }
        // SAFETY: the descriptor is only used for WP-only registration without ever
        // write-protecting, which traps no fault.
        let uffd =
            unsafe { rustix::mm::userfaultfd(flags) }.map_err(|e| format!("userfaultfd: {e}"))?;
        let mut api = uapi::uffdio_api {
            api: uapi::UFFD_API as u64,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and updates a `struct uffdio_api`; `api` is one, alive
        // across the call.
        unsafe {
            ioctl(
                uffd.as_fd(),
                Updater::<{ linux_raw_sys::ioctl::UFFDIO_API as _ }, _>::new(&mut api),
            )
        }
        .map_err(|e| format!("UFFDIO_API: {e}"))?;
        let mut reader = BareReader {
            uffd: Arc::new(uffd),
            stop: Arc::new(AtomicBool::new(false)),
            first_read: Arc::new(AtomicU64::new(0)),
            sentinel: map_populated(ps())?,
            thread: None,
        };
        reader.register(reader.sentinel, ps())?;
        let (uffd, stop, last) = (
            Arc::clone(&reader.uffd),
            Arc::clone(&reader.stop),
            Arc::clone(&reader.first_read),
        );
        let thread = std::thread::Builder::new()
            .name("bench-bare-uffd-reader".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = pin(0, &[cpu]);
                }
                let mut buf = [0u8; 32 * 64];
                loop {
                    if poll_first {
                        let mut fds = [PollFd::new(&*uffd, PollFlags::IN)];
                        match rustix::event::poll(&mut fds, None) {
                            Ok(_) => {}
                            Err(rustix::io::Errno::INTR) => continue,
                            Err(_) => return,
                        }
                    }
                    match rustix::io::read(uffd.as_fd(), &mut buf) {
                        Ok(_) => {
                            let _ = last.compare_exchange(
                                0,
                                now_ns(),
                                Ordering::Release,
                                Ordering::Relaxed,
                            );
                        }
                        Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
                        Err(_) => return,
                    }
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                }
            })
            .map_err(|e| format!("spawning the bare reader: {e}"))?;
        reader.thread = Some(thread);
        Ok(reader)
    }

    /// Registers `[addr, addr + len)` in write-protect mode only, as the watcher does.
    fn register(&self, addr: u64, len: u64) -> Result<(), String> {
        let mut reg = uapi::uffdio_register {
            range: uapi::uffdio_range { start: addr, len },
            mode: uapi::UFFDIO_REGISTER_MODE_WP as u64,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and updates a `struct uffdio_register`; `reg` is one,
        // alive across the call. WP-only registration traps nothing.
        unsafe {
            ioctl(
                self.uffd.as_fd(),
                Updater::<{ linux_raw_sys::ioctl::UFFDIO_REGISTER as _ }, _>::new(&mut reg),
            )
        }
        .map_err(|e| format!("UFFDIO_REGISTER: {e}"))
    }

    /// Forgets the last call's read.
    fn reset(&self) {
        self.first_read.store(0, Ordering::Relaxed);
    }

    /// The time of the first read since [`reset`](Self::reset), once the reader has stored it
    /// (just after its `read` returned, which may be after the unmapping call returned).
    fn first_read(&self) -> Option<u64> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let t = self.first_read.load(Ordering::Acquire);
            if t != 0 {
                return Some(t);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::hint::spin_loop();
        }
    }
}

impl Drop for BareReader {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            // No reader: unmapping the registered sentinel would wait forever. Its page stays;
            // closing the descriptor (as the fields drop) unregisters it.
            return;
        };
        self.stop.store(true, Ordering::Release);
        // Every earlier call has returned, so its messages were read: the sentinel's UNMAP is
        // the only one left, and the reader stops right after reading it.
        unmap(self.sentinel, ps());
        let _ = thread.join();
    }
}

// --- where the threads run ----------------------------------------------------------------------

/// Restricts thread `tid` (0: the calling thread) to `cpus`; false if the kernel refused.
fn pin(tid: i32, cpus: &[usize]) -> bool {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: setting a bit of a valid set (CPU_SET ignores numbers past its size).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; the call only reads it.
    unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed, written by the call.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: reading a bit of a valid set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// The thread ids of the watcher's threads (named `mmnotify-uffd-*`).
fn watcher_threads() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        let tid = e.file_name().to_str()?.parse().ok()?;
        comm.starts_with("mmnotify-uffd").then_some(tid)
    })
    .collect()
}

/// The calling thread on one CPU, every observing thread (both bare readers, the watcher's
/// reader and dispatcher) on another: with two or more CPUs, each call then wakes its reader
/// across CPUs the same way in every variant. Left to the scheduler, which CPU a reader
/// happens to sleep on (the caller's, or another, which needs an inter-processor interrupt)
/// changes a call's cost by several times, and the choice sticks for long stretches, so the
/// variants would be compared across different placements. Dropping it gives every thread
/// back the CPUs it had.
struct Placement {
    caller: usize,
    observers: usize,
    all: Vec<usize>,
    watcher_tids: Vec<i32>,
}

impl Placement {
    fn split(_watcher: &Watcher) -> Option<Placement> {
        let all = allowed_cpus();
        let (&caller, &observers) = (all.first()?, all.get(1)?);
        if !pin(0, &[caller]) {
            return None;
        }
        let watcher_tids = watcher_threads();
        for &t in &watcher_tids {
            pin(t, &[observers]);
        }
        Some(Placement {
            caller,
            observers,
            all,
            watcher_tids,
        })
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        pin(0, &self.all);
        for &t in &self.watcher_tids {
            pin(t, &self.all);
        }
    }
}

// --- the watcher side ---------------------------------------------------------------------------

/// A subscriber that notes when its first callback since [`reset`](Self::reset) ran.
#[derive(Debug, Default)]
struct FirstCallback {
    at: AtomicU64,
}

impl FirstCallback {
    fn reset(&self) {
        self.at.store(0, Ordering::Relaxed);
    }
}

impl IntervalSubscriber for FirstCallback {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _inv: &Invalidation) -> Invalidate {
        let now = now_ns();
        ctx.set_seq();
        let _ = self
            .at
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        Invalidate::Done
    }
}

// --- the variants and the calls -----------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Unwatched,
    Bare,
    BarePoll,
    Watched(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Munmap,
    Madvise,
    Mremap,
}

const CALLS: [Call; 3] = [Call::Munmap, Call::Madvise, Call::Mremap];

impl Call {
    fn id(self) -> &'static str {
        match self {
            Call::Munmap => "munmap",
            Call::Madvise => "madvise",
            Call::Mremap => "mremap",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Call::Munmap => "munmap",
            Call::Madvise => "madvise(DONTNEED)",
            Call::Mremap => "mremap(MAYMOVE|FIXED) over a fresh mapping",
        }
    }
}

/// Per-call samples of one (call, variant).
#[derive(Debug, Default)]
struct Samples {
    cost: Vec<u64>,
    latency: Vec<u64>,
    /// A baseline's latencies from the rounds it shared with watched-1.
    latency_paired: Vec<u64>,
}

/// What a round needs to reach the memory's observer.
struct Observers<'a> {
    watcher: &'a Watcher,
    bare: &'a BareReader,
    bare_poll: &'a BareReader,
    first: &'a Arc<FirstCallback>,
}

/// Watches or registers `[base, base + len)` for `variant`; returns the interval handles.
fn observe(
    o: &Observers<'_>,
    variant: Variant,
    base: u64,
    len: u64,
) -> Result<Vec<WatchedInterval>, String> {
    match variant {
        Variant::Unwatched => Ok(Vec::new()),
        Variant::Bare => o.bare.register(base, len).map(|()| Vec::new()),
        Variant::BarePoll => o.bare_poll.register(base, len).map(|()| Vec::new()),
        Variant::Watched(n) => {
            let report = o
                .watcher
                .watch(base, len)
                .map_err(|e| format!("watch: {e}"))?;
            if !report.is_complete() {
                return Err(format!("watch left pieces unwatched: {:?}", report.skipped));
            }
            let sub: Arc<dyn IntervalSubscriber> = o.first.clone();
            let mut out = Vec::with_capacity(n);
            if n == 1 {
                out.push(
                    o.watcher
                        .insert_interval(
                            Range::from_len(base, len).map_err(|e| e.to_string())?,
                            Arc::clone(&sub),
                        )
                        .map_err(|e| e.to_string())?,
                );
            } else {
                // One per piece-sized range from `base` on: each call hits exactly one.
                for j in 0..n as u64 {
                    out.push(
                        o.watcher
                            .insert_interval(
                                Range::from_len(base + j * piece_len(), piece_len())
                                    .map_err(|e| e.to_string())?,
                                Arc::clone(&sub),
                            )
                            .map_err(|e| e.to_string())?,
                    );
                }
            }
            Ok(out)
        }
    }
}

/// After a timed call: waits until its invalidation was delivered (watcher) or read (bare
/// reader) and returns the latency from `t0`, if this variant has one.
fn settle(o: &Observers<'_>, variant: Variant, t0: u64) -> Result<Option<u64>, String> {
    match variant {
        Variant::Unwatched => Ok(None),
        Variant::Bare => Ok(o.bare.first_read().map(|t| t.saturating_sub(t0))),
        Variant::BarePoll => Ok(o.bare_poll.first_read().map(|t| t.saturating_sub(t0))),
        Variant::Watched(n) => {
            o.watcher
                .synchronize(Duration::from_secs(10))
                .map_err(|e| format!("synchronize: {e}"))?;
            let at = o.first.at.load(Ordering::Relaxed);
            Ok((n > 0 && at >= t0).then(|| at - t0))
        }
    }
}

/// One variant's memory in a chunk: `pieces` pieces from `base`, observed as the variant says.
struct Lane {
    variant: Variant,
    base: u64,
    pieces: u64,
    intervals: Vec<WatchedInterval>,
}

/// Maps, populates and observes the memory for `calls` calls of `call` under `variant`.
fn lane(o: &Observers<'_>, call: Call, variant: Variant, calls: usize) -> Result<Lane, String> {
    let pl = piece_len();
    // munmap and mremap consume one piece per call; madvise reuses one.
    let pieces = if call == Call::Madvise {
        1
    } else {
        calls as u64
    };
    let base = map_populated(pieces * pl)?;
    match observe(o, variant, base, pieces * pl) {
        Ok(intervals) => Ok(Lane {
            variant,
            base,
            pieces,
            intervals,
        }),
        Err(e) => {
            unmap(base, pieces * pl);
            Err(e)
        }
    }
}

/// Removes the lane's subscriptions and unmaps what is left of its memory (nothing, after
/// every munmap or mremap call ran).
fn close_lane(o: &Observers<'_>, call: Call, lane: &Lane, done: usize) {
    for iv in &lane.intervals {
        let _ = o.watcher.remove_interval(iv);
    }
    let pl = piece_len();
    if call == Call::Madvise {
        unmap(lane.base, pl);
    } else if (done as u64) < lane.pieces {
        unmap(
            lane.base + done as u64 * pl,
            (lane.pieces - done as u64) * pl,
        );
    }
}

/// The `i`-th timed call of `call` on `lane`, appended to `s`.
fn one_call(
    o: &Observers<'_>,
    call: Call,
    lane: &Lane,
    i: usize,
    s: &mut Samples,
) -> Result<(), String> {
    let pl = piece_len();
    let piece = lane.base
        + if call == Call::Madvise {
            0
        } else {
            i as u64 * pl
        };
    let target = match call {
        Call::Mremap => map_populated(pl)?,
        Call::Madvise => {
            populate(piece, pl)?;
            0
        }
        Call::Munmap => 0,
    };
    o.first.reset();
    o.bare.reset();
    o.bare_poll.reset();
    let t0 = now_ns();
    let rc = match call {
        // SAFETY: the benchmark's own piece, not referenced.
        Call::Munmap => unsafe { libc::munmap(piece as *mut c_void, pl as usize) },
        // SAFETY: the benchmark's own piece; its contents become zero, nobody reads them.
        Call::Madvise => unsafe {
            libc::madvise(piece as *mut c_void, pl as usize, libc::MADV_DONTNEED)
        },
        // SAFETY: moves the benchmark's own piece over its own, just mapped target.
        Call::Mremap => unsafe {
            let p = libc::mremap(
                piece as *mut c_void,
                pl as usize,
                pl as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target as *mut c_void,
            );
            if p == libc::MAP_FAILED {
                -1
            } else {
                0
            }
        },
    };
    let t1 = now_ns();
    if rc != 0 {
        return Err(os_err(call.id()));
    }
    s.cost.push(t1 - t0);
    if let Some(l) = settle(o, lane.variant, t0)? {
        s.latency.push(l);
    }
    if call == Call::Mremap {
        unmap(target, pl);
    }
    Ok(())
}

/// The baselines and one watched variant, call by call in rotating order: `calls` calls of
/// each, in chunks of at most [`CHUNK`] (fresh memory per chunk). Returns the samples of
/// unwatched, bare, bare-poll and watched, in that order.
fn paired(
    o: &Observers<'_>,
    call: Call,
    watched: Variant,
    calls: usize,
) -> Result<[Samples; 4], String> {
    let variants = [
        Variant::Unwatched,
        Variant::Bare,
        Variant::BarePoll,
        watched,
    ];
    let mut samples: [Samples; 4] = Default::default();
    let mut left = calls;
    while left > 0 {
        let n = left.min(CHUNK);
        left -= n;
        let mut lanes = Vec::with_capacity(4);
        for v in variants {
            match lane(o, call, v, n) {
                Ok(l) => lanes.push(l),
                Err(e) => {
                    for l in &lanes {
                        close_lane(o, call, l, 0);
                    }
                    return Err(e);
                }
            }
        }
        let mut result = Ok(());
        let mut done = 0;
        'calls: for i in 0..n {
            for k in 0..lanes.len() {
                let j = (i + k) % lanes.len();
                if let Err(e) = one_call(o, call, &lanes[j], i, &mut samples[j]) {
                    result = Err(e);
                    break 'calls;
                }
            }
            done = i + 1;
        }
        for l in &lanes {
            // After a failure some lanes ran call `done`, some did not: unmapping from `done`
            // on frees what is left (a piece already gone is no error).
            close_lane(o, call, l, done);
        }
        result?;
    }
    Ok(samples)
}

fn median(v: &mut [u64]) -> f64 {
    percentile(v, 0.5)
}

fn percentile(v: &mut [u64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i] as f64
}

/// What the group measured: rows for the table, and the 1.1× target.
#[derive(Debug)]
pub(crate) struct WatchGroup {
    /// Rows, in the engine table's format.
    pub(crate) rows: Vec<Row>,
    /// The target and how this run did.
    pub(crate) targets: Vec<TargetCheck>,
}

fn row(id: String, figure: String, value: f64, baseline: Option<(&str, f64)>) -> Row {
    Row {
        id,
        figure,
        value,
        unit: Unit::Ns,
        baseline: baseline.map(|(name, value)| Baseline {
            name: name.to_owned(),
            value,
        }),
    }
}

/// Runs the group; `log` gets one line per step.
///
/// # Errors
///
/// A message when there is no watcher (no userfaultfd) or a call fails.
pub(crate) fn run(config: &Config, log: &mut dyn FnMut(&str)) -> Result<WatchGroup, String> {
    let calls: usize = if config.quick { 100 } else { 1000 };
    now_ns();
    let watcher = Watcher::get().map_err(|e| format!("no watcher for this process: {e}"))?;
    let features = watcher.features().enabled & !u64::from(uapi::UFFD_FEATURE_EVENT_FORK);
    let placement = Placement::split(&watcher);
    if let Some(p) = &placement {
        log(&format!(
            "watch: the calling thread runs on CPU {}, every reader and the dispatcher on CPU {}",
            p.caller, p.observers
        ));
    }
    let observers_cpu = placement.as_ref().map(|p| p.observers);
    let bare = BareReader::start(features, false, observers_cpu)?;
    let bare_poll = BareReader::start(features, true, observers_cpu)?;
    let first = Arc::new(FirstCallback::default());
    let o = Observers {
        watcher: &watcher,
        bare: &bare,
        bare_poll: &bare_poll,
        first: &first,
    };
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for call in CALLS {
        log(&format!(
            "watch: {} of {PIECE_PAGES} pages, {calls} calls per variant",
            call.what()
        ));
        let mut base = [Samples::default(), Samples::default(), Samples::default()];
        let mut watched = Vec::new();
        for n in [0, 1, MANY] {
            let [u, b, p, w] = paired(&o, call, Variant::Watched(n), calls)?;
            // The watched figure's yardstick: the bare reader in the same rounds, call by call.
            let same_rounds = median(&mut b.cost.clone());
            // Call i of each lane ran next to call i of the others: the ratio of each such
            // pair is free of load that came and went between rounds; its median is the
            // verdict's figure.
            let mut pair_ratios: Vec<f64> = w
                .cost
                .iter()
                .zip(&b.cost)
                .filter(|(_, b)| **b > 0)
                .map(|(w, b)| *w as f64 / *b as f64)
                .collect();
            pair_ratios.sort_by(f64::total_cmp);
            let pair_ratio = pair_ratios
                .get(pair_ratios.len() / 2)
                .copied()
                .unwrap_or(f64::NAN);
            for (all, mut one) in base.iter_mut().zip([u, b, p]) {
                if n == 1 {
                    // The latency baseline: the bare reader in the same rounds as watched-1.
                    all.latency_paired = one.latency.clone();
                }
                all.cost.append(&mut one.cost);
                all.latency.append(&mut one.latency);
            }
            watched.push((n, w, same_rounds, pair_ratio));
        }
        let [u, b, p] = &mut base;
        let (unwatched, bare_cost, poll_cost) = (
            median(&mut u.cost),
            median(&mut b.cost),
            median(&mut p.cost),
        );
        rows.push(row(
            format!("w/{}/unwatched", call.id()),
            format!(
                "{} of {PIECE_PAGES} pages, memory no userfaultfd knows",
                call.what()
            ),
            unwatched,
            None,
        ));
        rows.push(row(
            format!("w/{}/bare-reader", call.id()),
            format!(
                "{}, memory registered with a bare uffd reader thread",
                call.what()
            ),
            bare_cost,
            Some(("unwatched", unwatched)),
        ));
        rows.push(row(
            format!("w/{}/bare-poll-reader", call.id()),
            format!(
                "{}, memory registered with a bare uffd reader that polls, then reads",
                call.what()
            ),
            poll_cost,
            Some(("bare uffd reader", bare_cost)),
        ));
        for (n, w, same_rounds, pair_ratio) in &mut watched {
            let c = median(&mut w.cost);
            rows.push(row(
                format!("w/{}/watched-{n}", call.id()),
                format!(
                    "{}, watched memory, {n} interval subscription{}",
                    call.what(),
                    if *n == 1 { "" } else { "s" }
                ),
                c,
                Some(("bare uffd reader, same rounds", *same_rounds)),
            ));
            ratios.push((call, *n, *pair_ratio));
        }
        let bare_lat = &mut b.latency_paired;
        let (bare_med, bare_p99) = (median(bare_lat), percentile(bare_lat, 0.99));
        let lat = &mut watched[1].1.latency;
        let (med, p99) = (median(lat), percentile(lat, 0.99));
        rows.push(row(
            format!("w/{}/latency-median", call.id()),
            format!(
                "{}: call entry -> subscriber callback (watched-1), median of {}",
                call.what(),
                lat.len()
            ),
            med,
            Some(("bare reader: entry -> read", bare_med)),
        ));
        rows.push(row(
            format!("w/{}/latency-p99", call.id()),
            format!(
                "{}: call entry -> subscriber callback (watched-1), p99",
                call.what()
            ),
            p99,
            Some(("bare reader: entry -> read", bare_p99)),
        ));
    }
    drop(bare);
    drop(bare_poll);
    drop(placement);
    let worst = ratios
        .iter()
        .copied()
        .fold(None::<(Call, usize, f64)>, |w, r| match w {
            Some(w) if w.2 >= r.2 => Some(w),
            _ => Some(r),
        });
    let listed: Vec<String> = ratios
        .iter()
        .map(|(c, n, r)| format!("{} {n}: x{r:.2}", c.id()))
        .collect();
    let targets = vec![match worst {
        Some((c, n, r)) => TargetCheck {
            target: format!(
                "(w) a watched call costs at most {TARGET}x the same call with a bare uffd reader"
            ),
            measured: format!(
                "median of per-call-pair ratios, worst x{r:.2} ({} with {n} subscriptions); {}",
                c.id(),
                listed.join(", ")
            ),
            verdict: if r <= TARGET {
                Verdict::Met
            } else {
                Verdict::Missed
            },
        },
        None => TargetCheck {
            target: format!(
                "(w) a watched call costs at most {TARGET}x the same call with a bare uffd reader"
            ),
            measured: "nothing measured".into(),
            verdict: Verdict::NotMeasured,
        },
    }];
    Ok(WatchGroup { rows, targets })
}
