//! A small timing harness for the CLI's short run, plus the multi-threaded helpers both the
//! CLI and criterion use.
//!
//! The machine this runs on is often shared (two cores, other processes compiling), and
//! another process can only ever *add* time to a measurement. So:
//!
//! * single-threaded figures are the **10th percentile of many short batches**: the iteration
//!   count is calibrated so that one batch takes about [`Budget::batch`] (a few milliseconds,
//!   shorter than a scheduler time slice), then [`Budget::batches`] batches are timed; the
//!   batch at the 10th percentile gives the time per call. Batches that lost their core to
//!   another process land in the upper part of the distribution and are ignored (figures
//!   measured against a concurrent thread use the median instead, see [`ns_per_op_median`]);
//! * multi-threaded throughput starts every thread on a barrier; each thread counts its own
//!   operations, its wall time and its CPU time, and a round's figure is the sum of the
//!   per-thread rates. Only rounds in which every thread was on a CPU nearly all the time
//!   count (see [`scaling_pair`]); the **median** of those is reported. One- and two-thread
//!   rounds alternate, so both see the same machine, and a no-sharing control measured the
//!   same way shows what two threads can get here at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use mmnotify::{Event, Mm, Range};

/// How long to measure one single-threaded figure.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Target duration of one batch.
    pub batch: Duration,
    /// Number of timed batches (the 10th percentile is reported).
    pub batches: usize,
    /// Duration of one round of a multi-threaded throughput figure.
    pub round: Duration,
    /// Number of rounds of a multi-threaded figure (the median of the qualifying ones is
    /// reported).
    pub rounds: usize,
}

impl Budget {
    /// `mmnotify bench --quick`.
    pub const QUICK: Budget = Budget {
        batch: Duration::from_millis(2),
        batches: 25,
        round: Duration::from_millis(40),
        rounds: 16,
    };

    /// `mmnotify bench`.
    pub const FULL: Budget = Budget {
        batch: Duration::from_millis(3),
        batches: 81,
        round: Duration::from_millis(50),
        rounds: 40,
    };
}

fn low_percentile(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 10]
}

/// Nanoseconds per call of `body`: 10th percentile of batches (see the module docs).
pub fn ns_per_op(budget: &Budget, body: impl FnMut()) -> f64 {
    low_percentile(batches(budget, body))
}

/// Nanoseconds per call of `body`, median of batches: for figures measured against a
/// concurrent thread, where a batch that ran while the other thread was descheduled would
/// look uncontended and the low percentile would pick exactly those.
pub fn ns_per_op_median(budget: &Budget, body: impl FnMut()) -> f64 {
    let mut v = batches(budget, body);
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn batches(budget: &Budget, mut body: impl FnMut()) -> Vec<f64> {
    // Calibrate: double until a run takes at least a tenth of a batch.
    let mut iters: u64 = 1;
    let per_call = loop {
        let t = Instant::now();
        for _ in 0..iters {
            body();
        }
        let elapsed = t.elapsed();
        if elapsed >= budget.batch / 10 || iters >= 1 << 40 {
            break elapsed.as_secs_f64() / iters as f64;
        }
        iters *= 2;
    };
    let iters = ((budget.batch.as_secs_f64() / per_call.max(1e-12)) as u64).max(1);
    (0..budget.batches.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                body();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect()
}

/// CPU time consumed by the calling thread, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`), or
/// `None` where it cannot be read.
#[cfg(target_os = "linux")]
pub fn thread_cpu_ns() -> Option<u64> {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `clock_gettime` from the C library std already links, with a valid clock id and a
    // pointer to a live, properly laid out `struct timespec` (two 64-bit fields on 64-bit
    // Linux); it writes only through that pointer.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0 && cfg!(target_pointer_width = "64"))
        .then(|| (ts.sec as u64) * 1_000_000_000 + ts.nsec as u64)
}

/// CPU time consumed by the calling thread: not available on this platform.
#[cfg(not(target_os = "linux"))]
pub fn thread_cpu_ns() -> Option<u64> {
    None
}

/// A thread counts as having had its own core in a round when it was on a CPU for at least
/// this fraction of the round's wall time.
pub const ON_CPU_THRESHOLD: f64 = 0.9;

/// The outcome of [`scaling_pair`].
#[derive(Debug, Clone, Copy)]
pub struct Scaling {
    /// Operations per second with one thread (median of the qualifying rounds).
    pub one: f64,
    /// Operations per second with two threads, all threads together (median of the
    /// qualifying rounds).
    pub two: f64,
    /// Rounds run per thread count.
    pub rounds: usize,
    /// Rounds in which every thread had its own core (on a CPU for at least
    /// [`ON_CPU_THRESHOLD`] of the round), for 1 and 2 threads.
    pub qualifying: (usize, usize),
    /// Whether enough rounds qualified (at least 3 of each); if not, `one` and `two` are the
    /// medians of all rounds and say little about scaling.
    pub trustworthy: bool,
}

impl Scaling {
    /// Two threads ÷ one thread.
    pub fn ratio(&self) -> f64 {
        self.two / self.one
    }
}

/// Throughput of one thread and of two threads running `body(thread_index)`, in alternating
/// rounds (1, 2, 1, 2, ...) so that both see the same machine.
///
/// A round only counts if every thread in it was on a CPU for nearly all of it: on a shared
/// machine two threads may otherwise take turns on one core, which hides exactly the
/// cache-line traffic this figure is about (and makes a contended structure look as if it
/// scaled like one thread). The median of the qualifying rounds is reported.
pub fn scaling_pair(budget: &Budget, body: impl Fn(usize) + Sync) -> Scaling {
    let mut one = Vec::new();
    let mut two = Vec::new();
    for _ in 0..budget.rounds.max(1) {
        one.push(one_round(1, budget.round, &body));
        two.push(one_round(2, budget.round, &body));
    }
    let median = |rounds: &[Round], only_qualifying: bool| {
        let mut v: Vec<f64> = rounds
            .iter()
            .filter(|r| !only_qualifying || r.min_on_cpu >= ON_CPU_THRESHOLD)
            .map(|r| r.rate)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let count = |rounds: &[Round]| {
        rounds
            .iter()
            .filter(|r| r.min_on_cpu >= ON_CPU_THRESHOLD)
            .count()
    };
    let qualifying = (count(&one), count(&two));
    let trustworthy = qualifying.0 >= 3 && qualifying.1 >= 3;
    Scaling {
        one: median(&one, trustworthy),
        two: median(&two, trustworthy),
        rounds: one.len(),
        qualifying,
        trustworthy,
    }
}

/// One round of [`scaling_pair`]: the sum of per-thread rates, and the smallest fraction of
/// the round that any thread spent on a CPU (1.0 where that cannot be measured).
#[derive(Debug, Clone, Copy)]
struct Round {
    rate: f64,
    min_on_cpu: f64,
}

fn one_round(threads: usize, round: Duration, body: &(impl Fn(usize) + Sync)) -> Round {
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(threads + 1);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (stop, barrier) = (&stop, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    let began = Instant::now();
                    let cpu_began = thread_cpu_ns();
                    let mut ops: u64 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..32 {
                            body(t);
                        }
                        ops += 32;
                    }
                    let wall = began.elapsed().as_secs_f64();
                    let on_cpu = match (cpu_began, thread_cpu_ns()) {
                        (Some(a), Some(b)) => (b.saturating_sub(a)) as f64 / 1e9 / wall,
                        _ => 1.0,
                    };
                    (ops as f64 / wall, on_cpu)
                })
            })
            .collect();
        barrier.wait();
        thread::sleep(round);
        stop.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .map(|w| w.join().expect("benchmark thread panicked"))
            .fold(
                Round {
                    rate: 0.0,
                    min_on_cpu: f64::INFINITY,
                },
                |acc, (rate, on_cpu)| Round {
                    rate: acc.rate + rate,
                    min_on_cpu: acc.min_on_cpu.min(on_cpu),
                },
            )
    })
}

/// Wall time for `threads` threads to each call `body(thread_index)` `iters_per_thread`
/// times, from the barrier that starts them all to the last one finishing (thread start-up
/// excluded). For criterion's `iter_custom`.
pub fn parallel_iters(
    threads: usize,
    iters_per_thread: u64,
    body: impl Fn(usize) + Sync,
) -> Duration {
    let barrier = Barrier::new(threads);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, body) = (&barrier, &body);
                s.spawn(move || {
                    barrier.wait();
                    let began = Instant::now();
                    for _ in 0..iters_per_thread {
                        body(t);
                    }
                    (began, Instant::now())
                })
            })
            .collect();
        let spans: Vec<(Instant, Instant)> = workers
            .into_iter()
            .map(|w| w.join().expect("benchmark thread panicked"))
            .collect();
        let first = spans
            .iter()
            .map(|s| s.0)
            .min()
            .expect("at least one thread");
        let last = spans
            .iter()
            .map(|s| s.1)
            .max()
            .expect("at least one thread");
        last - first
    })
}

/// A background thread that invalidates one range in a loop until stopped: the concurrent
/// invalidation stream of the read-side figure (c).
#[derive(Debug)]
pub struct Stream {
    stop: Arc<AtomicBool>,
    worker: Option<thread::JoinHandle<u64>>,
}

impl Stream {
    /// Starts invalidating `range` on `mm` (start, end, repeat); returns once the thread runs.
    pub fn start(mm: Mm, range: Range) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(Barrier::new(2));
        let worker = {
            let (stop, running) = (Arc::clone(&stop), Arc::clone(&running));
            thread::spawn(move || {
                running.wait();
                let mut ops = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    mm.invalidate_start(range, Event::Unmap)
                        .expect("a blockable start from a plain thread cannot fail")
                        .end();
                    ops += 1;
                }
                ops
            })
        };
        running.wait();
        Stream {
            stop,
            worker: Some(worker),
        }
    }

    /// Stops the thread and returns how many invalidations it made.
    pub fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.worker
            .take()
            .map(|w| w.join().expect("stream thread panicked"))
            .unwrap_or(0)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A cache-line-padded counter per thread: the control for the scaling figure. Two threads
/// that share nothing should scale by about 2 on two idle cores; what they get in the same run
/// says how many cores the other processes on the machine left us.
#[derive(Debug, Default)]
pub struct PaddedCounters {
    slots: [Padded; 2],
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(std::sync::atomic::AtomicU64);

impl PaddedCounters {
    /// One unit of independent work for thread `t` (0 or 1): an uncontended atomic increment on
    /// the thread's own cache line.
    #[inline]
    pub fn bump(&self, t: usize) {
        self.slots[t & 1].0.fetch_add(1, Ordering::Relaxed);
    }
}
