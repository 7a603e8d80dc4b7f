//! The fast path's cost (issue 9, item 6: fork detection must cost at most a load).
//!
//! Measures, on a watched and mirrored page, nanoseconds per call of:
//! * `WatchedInterval::read_retry` (fork probe load + state load + gate counters + the
//!   engine's sequence load),
//! * the engine's `IntervalHandle::read_retry` alone (one load),
//! * `WatchedInterval::read_begin` + `read_retry` (a validated cache hit),
//! * `getpid()` as a raw system call, the alternative fork check the wipe-on-fork word avoids.
//!
//! Run: `cargo bench -p mmnotify-uffd --bench fast_path`.

use mmnotify::Range;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use mmnotify::{IntervalCtx, IntervalSubscriber, Invalidate, Invalidation};
use mmnotify_uffd::Watcher;

struct Nop;
impl IntervalSubscriber for Nop {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _: &Invalidation) -> Invalidate {
        ctx.set_seq();
        Invalidate::Done
    }
}

fn per_call(name: &str, iters: u64, mut f: impl FnMut()) {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    println!("{name:<48} {best:>8.2} ns/call (best of 5 x {iters})");
}

fn main() {
    let w = Watcher::get().expect("userfaultfd");
    let ps = mmnotify_uffd::page_size() as usize;
    let buf = vec![1u8; 4 * ps];
    let addr = (buf.as_ptr() as u64 + ps as u64 - 1) & !(ps as u64 - 1);
    let iv = w
        .insert_interval(Range::from_len(addr, ps as u64).unwrap(), Arc::new(Nop))
        .unwrap();
    let seq = iv.read_begin().unwrap();
    let n = 20_000_000;
    per_call("WatchedInterval::read_retry", n, || {
        black_box(iv.read_retry(black_box(seq)));
    });
    per_call("IntervalHandle::read_retry (engine only)", n, || {
        black_box(iv.engine().read_retry(black_box(seq.engine())));
    });
    per_call("WatchedInterval::read_begin + read_retry", n / 4, || {
        let s = iv.read_begin().unwrap();
        black_box(iv.read_retry(s));
    });
    per_call("getpid() system call", n / 20, || {
        black_box(rustix::process::getpid());
    });
    drop(buf);
}
