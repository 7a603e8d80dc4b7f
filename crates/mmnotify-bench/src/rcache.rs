//! Figures of the registration cache (`mmnotify-rcache`), each next to a cache written like
//! UCX's `ucs_rcache` in the same run.
//!
//! The baseline, [`UcxLike`], is what UCX does on its fast path, written plainly: one lock over
//! an address-keyed map of regions with a reference count each, plus a queue of pending
//! invalidations (filled when the invalidation could not take the lock) that the next `get`
//! drains first. Our cache validates a hit without any lock but the index's read lock, through
//! the region's interval sequence; these figures say what that costs and how it scales.
//!
//! * `rc/hit/N`: get + put of a cached one-page region, N regions registered at scattered
//!   addresses, looked up in a random order (engine `Mm` source, no-op registrar);
//! * `rc/hit_watcher/1`: the same with the userfaultfd watcher as source (real memory);
//! * `rc/scaling/1000`: two threads ÷ one thread, 1 000 regions, each thread its own half;
//! * `rc/miss/noop`, `rc/miss/uring`: a miss (register), the put, and an invalidation of the
//!   range (deregister at the next get), with a no-op registrar and with io_uring fixed buffers.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use mmnotify::{Event, Mm, Range};
use mmnotify_rcache::{
    Access, Cache, Config, EventSource, PageRange, Registrar, RegistrarError, UringRegistrar,
};

use crate::fixtures::Rng;
use crate::measure::{self, Budget};
use crate::suite::{Baseline, Row, TargetCheck, Unit, Verdict};

const P: u64 = 4096;
const BASE: u64 = 0x7000_0000_0000;
/// Region counts of the hit figures.
pub const REGION_COUNTS: [usize; 3] = [1, 1_000, 100_000];

/// A registrar that does nothing (the cost of the cache alone).
#[derive(Debug, Default)]
pub struct NoopRegistrar;

impl Registrar for NoopRegistrar {
    type Handle = ();

    fn register(&self, _: PageRange, _: Access) -> Result<(), RegistrarError> {
        Ok(())
    }

    fn deregister(&self, _: &()) {}
}

struct URegion<H> {
    end: u64,
    refs: u32,
    handle: H,
}

/// A registration cache written like UCX's: one lock over the map, a pending-invalidation
/// queue drained by the next `get`.
pub struct UcxLike<R: Registrar> {
    map: Mutex<BTreeMap<u64, URegion<R::Handle>>>,
    pending: Mutex<Vec<(u64, u64)>>,
    has_pending: AtomicBool,
    registrar: R,
}

impl<R: Registrar> std::fmt::Debug for UcxLike<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxLike").finish_non_exhaustive()
    }
}

impl<R: Registrar> UcxLike<R> {
    /// An empty cache over `registrar`.
    pub fn new(registrar: R) -> Self {
        UcxLike {
            map: Mutex::new(BTreeMap::new()),
            pending: Mutex::new(Vec::new()),
            has_pending: AtomicBool::new(false),
            registrar,
        }
    }

    fn drop_overlapping(
        map: &mut BTreeMap<u64, URegion<R::Handle>>,
        start: u64,
        end: u64,
        dead: &mut Vec<R::Handle>,
    ) {
        let keys: Vec<u64> = map
            .range(..end)
            .filter(|(_, r)| r.end > start && r.refs == 0)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(r) = map.remove(&k) {
                dead.push(r.handle);
            }
        }
    }

    /// Get: returns the region's key (its start); registers on a miss.
    pub fn get(&self, start: u64, end: u64) -> u64 {
        let mut dead = Vec::new();
        {
            let mut map = self.map.lock().expect("lock");
            if self.has_pending.load(Ordering::Acquire) {
                let queued = std::mem::take(&mut *self.pending.lock().expect("lock"));
                self.has_pending.store(false, Ordering::Release);
                for (s, e) in queued {
                    Self::drop_overlapping(&mut map, s, e, &mut dead);
                }
            }
            if let Some((k, r)) = map.range_mut(..=start).next_back() {
                if r.end >= end {
                    r.refs += 1;
                    let k = *k;
                    drop(map);
                    for h in &dead {
                        self.registrar.deregister(h);
                    }
                    return k;
                }
            }
        }
        for h in &dead {
            self.registrar.deregister(h);
        }
        let range = PageRange::from_bounds(start, end).expect("page-aligned");
        let handle = self
            .registrar
            .register(range, Access::READ_WRITE)
            .expect("register");
        self.map.lock().expect("lock").insert(
            start,
            URegion {
                end,
                refs: 1,
                handle,
            },
        );
        start
    }

    /// Put.
    pub fn put(&self, key: u64) {
        if let Some(r) = self.map.lock().expect("lock").get_mut(&key) {
            r.refs -= 1;
        }
    }

    /// The memory event: invalidate now if the lock is free, else queue.
    pub fn invalidate(&self, start: u64, end: u64) {
        let mut dead = Vec::new();
        match self.map.try_lock() {
            Ok(mut map) => Self::drop_overlapping(&mut map, start, end, &mut dead),
            Err(_) => {
                self.pending.lock().expect("lock").push((start, end));
                self.has_pending.store(true, Ordering::Release);
            }
        }
        for h in &dead {
            self.registrar.deregister(h);
        }
    }
}

/// `n` one-page regions at scattered addresses.
fn scattered(n: usize) -> Vec<u64> {
    let mut rng = Rng::new(0x5ca7);
    (0..n as u64)
        .map(|i| BASE + (i * 64 + rng.next_u64() % 32) * P)
        .collect()
}

/// A random visiting order of `n` indices (4096 long, cycled).
fn order(n: usize) -> Vec<usize> {
    let mut rng = Rng::new(0x0dde);
    (0..4096)
        .map(|_| (rng.next_u64() % n as u64) as usize)
        .collect()
}

fn row(id: String, figure: String, value: f64, unit: Unit, baseline: (&str, f64)) -> Row {
    Row {
        id,
        figure,
        value,
        unit,
        baseline: Some(Baseline {
            name: baseline.0.to_string(),
            value: baseline.1,
        }),
    }
}

thread_local! {
    static CURSOR: Cell<usize> = const { Cell::new(0) };
}

fn next(order: &[usize]) -> usize {
    CURSOR.with(|c| {
        let i = c.get();
        c.set(i.wrapping_add(1));
        order[i % order.len()]
    })
}

/// Runs every figure of the registration cache; rows and the targets.
pub fn figures(budget: &Budget, log: &mut dyn FnMut(&str)) -> (Vec<Row>, Vec<TargetCheck>) {
    let mut rows = Vec::new();
    let mut hit_ns = Vec::new();
    let ucx_name = "UCX-like (one lock + pending queue)";
    for n in REGION_COUNTS {
        log(&format!("rcache: get+put hit, {n} regions"));
        let addrs = scattered(n);
        let visit = order(n);
        let mm = Mm::new();
        let cache = Cache::new(
            NoopRegistrar,
            EventSource::Mm(mm.clone()),
            Config::default().merge(false),
        );
        for a in &addrs {
            drop(cache.get(*a, P, Access::READ).expect("get"));
        }
        let ours = measure::ns_per_op(budget, || {
            let a = addrs[next(&visit)];
            drop(std::hint::black_box(cache.get(a, P, Access::READ)));
        });
        let ucx = UcxLike::new(NoopRegistrar);
        for a in &addrs {
            ucx.put(ucx.get(*a, *a + P));
        }
        let base = measure::ns_per_op(budget, || {
            let a = addrs[next(&visit)];
            ucx.put(std::hint::black_box(ucx.get(a, a + P)));
        });
        hit_ns.push(ours);
        rows.push(row(
            format!("rc/hit/{n}"),
            format!("rcache get+put hit, {n} regions (scattered, random order)"),
            ours,
            Unit::Ns,
            (ucx_name, base),
        ));
        if n == 1_000 {
            log("rcache: two threads / one thread, 1000 regions");
            let body = |t: usize| {
                let a = addrs[(next(&visit) / 2) * 2 + t % 2];
                drop(std::hint::black_box(cache.get(a, P, Access::READ)));
            };
            let s = measure::scaling_pair(budget, body);
            let b = measure::scaling_pair(budget, |t: usize| {
                let a = addrs[(next(&visit) / 2) * 2 + t % 2];
                ucx.put(std::hint::black_box(ucx.get(a, a + P)));
            });
            let note = if s.trustworthy {
                ""
            } else {
                " (too few rounds had a core per thread)"
            };
            rows.push(row(
                "rc/scaling/1000".into(),
                format!("rcache hit throughput, 2 threads / 1 thread, 1000 regions{note}"),
                s.ratio(),
                Unit::Speedup,
                (ucx_name, b.ratio()),
            ));
        }
    }

    // The watcher as source: one region of real memory.
    if let Ok(src) = EventSource::watcher() {
        log("rcache: get+put hit with the userfaultfd watcher, 1 region");
        let buf = vec![1u8; 4 * P as usize];
        let a = (buf.as_ptr() as u64).div_ceil(P) * P;
        let cache = Cache::new(NoopRegistrar, src, Config::default());
        if cache.get(a, P, Access::READ).is_ok() {
            let ours = measure::ns_per_op(budget, || {
                drop(std::hint::black_box(cache.get(a, P, Access::READ)));
            });
            rows.push(row(
                "rc/hit_watcher/1".into(),
                "rcache get+put hit, watcher source (real memory), 1 region".into(),
                ours,
                Unit::Ns,
                ("engine Mm source, 1 region", hit_ns[0]),
            ));
        }
        drop(cache);
        drop(buf);
    }

    // Misses: register, put, invalidate (deregistered at the next get).
    log("rcache: miss+register+invalidate, no-op registrar");
    let addrs = scattered(1024);
    let visit: Vec<usize> = (0..1024).collect();
    let mm = Mm::new();
    let cache = Cache::new(
        NoopRegistrar,
        EventSource::Mm(mm.clone()),
        Config::default(),
    );
    let ours = measure::ns_per_op(budget, || {
        let a = addrs[next(&visit)];
        drop(cache.get(a, P, Access::READ).expect("get"));
        let r = Range::from_len(a, P).expect("range");
        mm.invalidate_start(r, Event::Unmap).expect("start").end();
    });
    let ucx = UcxLike::new(NoopRegistrar);
    let base = measure::ns_per_op(budget, || {
        let a = addrs[next(&visit)];
        ucx.put(ucx.get(a, a + P));
        ucx.invalidate(a, a + P);
    });
    rows.push(row(
        "rc/miss/noop".into(),
        "rcache miss (register) + put + invalidation, no-op registrar".into(),
        ours,
        Unit::Ns,
        (ucx_name, base),
    ));
    drop(cache);

    log("rcache: miss+register+invalidate, io_uring fixed buffers");
    let pages = 256usize;
    let mem = vec![7u8; (pages + 1) * P as usize];
    let first = (mem.as_ptr() as u64).div_ceil(P) * P;
    let real: Vec<u64> = (0..pages as u64).map(|i| first + i * P).collect();
    let visit: Vec<usize> = (0..pages).collect();
    match (UringRegistrar::new(64), UringRegistrar::new(64)) {
        (Ok(u1), Ok(u2)) => {
            let mm = Mm::new();
            let cache = Cache::new(u1, EventSource::Mm(mm.clone()), Config::default());
            let ours = measure::ns_per_op(budget, || {
                let a = real[next(&visit)];
                drop(cache.get(a, P, Access::READ_WRITE).expect("get"));
                let r = Range::from_len(a, P).expect("range");
                mm.invalidate_start(r, Event::Unmap).expect("start").end();
            });
            let ucx = UcxLike::new(Arc::new(u2));
            let base = measure::ns_per_op(budget, || {
                let a = real[next(&visit)];
                ucx.put(ucx.get(a, a + P));
                ucx.invalidate(a, a + P);
            });
            rows.push(row(
                "rc/miss/uring".into(),
                "rcache miss (io_uring register) + put + invalidation".into(),
                ours,
                Unit::Ns,
                (ucx_name, base),
            ));
        }
        _ => log("rcache: io_uring unavailable, rc/miss/uring skipped"),
    }
    drop(mem);

    let v = |id: &str| {
        rows.iter()
            .find(|r| r.id == id)
            .map_or(f64::NAN, |r| r.value)
    };
    let (h1k, h100k, sc) = (v("rc/hit/1000"), v("rc/hit/100000"), v("rc/scaling/1000"));
    let targets = vec![
        TargetCheck {
            target: "(rcache) hit <= 20 ns at 1000 regions".into(),
            measured: format!("{h1k:.1} ns"),
            verdict: verdict(h1k <= 20.0),
        },
        TargetCheck {
            target: "(rcache) hit at 100000 regions <= 2x that at 1000".into(),
            measured: format!("{h100k:.1} ns = {:.2}x", h100k / h1k),
            verdict: verdict(h100k <= 2.0 * h1k),
        },
        TargetCheck {
            target: "(rcache) two threads >= 1.8x one".into(),
            measured: format!("{sc:.2}x"),
            verdict: verdict(sc >= 1.8),
        },
    ];
    (rows, targets)
}

fn verdict(met: bool) -> Verdict {
    if met {
        Verdict::Met
    } else {
        Verdict::Missed
    }
}
