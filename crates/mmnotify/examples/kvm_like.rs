//! A KVM-like secondary MMU on top of `mmnotify`.
//!
//! Part 1: one thread faults guest pages into a shadow table while another unmaps ranges of
//! the (simulated) primary page table. The subscriber follows KVM's protocol: an in-progress
//! count and the union of the ranges being invalidated, a sequence bumped at every end, and a
//! fault path that re-checks both under its lock and retries on a collision. At the end every
//! shadow entry is compared with the primary.
//!
//! Part 2: the OOM reaper's non-blocking start is refused by a second subscriber (GRU-like),
//! under each policy; the KVM in-progress count left behind is read from the subscriber.
//!
//! Run with `cargo run --release -p mmnotify --example kvm_like`.
#![allow(clippy::disallowed_types)] // std::sync is fine outside the engine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use mmnotify::{Capabilities, Error, Event, Invalidation, Mm, Policy, Range, Refused, Subscriber};

const PAGE: u64 = 0x1000;
const PAGES: u64 = 64;

/// The primary page table: guest frame number -> host frame number.
#[derive(Default)]
struct Primary {
    table: Mutex<HashMap<u64, u64>>,
    next_pfn: AtomicU64,
}

impl Primary {
    /// The primary fault handler: returns the frame mapped at `gfn`, mapping a fresh one if
    /// there is none (populating an empty entry needs no invalidation).
    fn fault_in(&self, gfn: u64) -> u64 {
        *self
            .table
            .lock()
            .unwrap()
            .entry(gfn)
            .or_insert_with(|| self.next_pfn.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// KVM's per-VM MMU state, under one lock (KVM's `mmu_lock`).
#[derive(Default)]
struct Shadow {
    /// Invalidations between start and end (`mmu_invalidate_in_progress`).
    in_progress: u32,
    /// The union of their ranges, valid while `in_progress > 0`.
    union: Option<(u64, u64)>,
    /// Bumped at every end (`mmu_invalidate_seq`).
    seq: u64,
    /// Shadow page-table entries: gfn -> pfn.
    sptes: HashMap<u64, u64>,
}

/// A KVM-like classic subscriber.
#[derive(Default)]
struct KvmLike {
    mmu: Mutex<Shadow>,
    starts: AtomicU64,
    ends: AtomicU64,
    retries: AtomicU64,
    faults: AtomicU64,
}

impl Subscriber for KvmLike {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        let r = inv.range();
        let mut s = self.mmu.lock().unwrap();
        s.in_progress += 1;
        s.union = Some(match s.union {
            Some((a, b)) if s.in_progress > 1 => (a.min(r.start()), b.max(r.end())),
            _ => (r.start(), r.end()),
        });
        s.sptes.retain(|gfn, _| !r.contains(*gfn * PAGE));
        self.starts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn invalidate_range_end(&self, _inv: &Invalidation) {
        let mut s = self.mmu.lock().unwrap();
        s.seq += 1;
        s.in_progress -= 1;
        if s.in_progress == 0 {
            s.union = None;
        }
        self.ends.fetch_add(1, Ordering::Relaxed);
    }
}

impl KvmLike {
    /// Whether a fault on `gfn` that snapshotted `seq` must retry (`mmu_invalidate_retry_gfn`).
    fn must_retry(s: &Shadow, seq: u64, gfn: u64) -> bool {
        let addr = gfn * PAGE;
        let in_window = s.in_progress > 0
            && s.union
                .is_some_and(|(start, end)| start <= addr && addr < end);
        in_window || s.seq != seq
    }

    /// The guest touched `gfn`: resolve it through the primary and map it, retrying on a
    /// collision with an invalidation.
    fn fault(&self, gfn: u64, primary: &Primary) {
        let mapped = self.try_fault(gfn, primary, u64::MAX);
        debug_assert!(mapped);
    }

    /// Like [`fault`](Self::fault), but gives up after `max_attempts` tries.
    fn try_fault(&self, gfn: u64, primary: &Primary, max_attempts: u64) -> bool {
        self.faults.fetch_add(1, Ordering::Relaxed);
        for _ in 0..max_attempts {
            let seq = self.mmu.lock().unwrap().seq;
            let pfn = primary.fault_in(gfn); // the slow part, without mmu_lock
            thread::yield_now();
            let mut s = self.mmu.lock().unwrap();
            if Self::must_retry(&s, seq, gfn) {
                drop(s);
                self.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            s.sptes.insert(gfn, pfn);
            return true;
        }
        false
    }
}

fn part1() -> Result<(), Error> {
    let mm = Mm::new();
    let primary = Arc::new(Primary::default());
    let kvm = Arc::new(KvmLike::default());
    let id = mm.register(kvm.clone())?;
    let done = AtomicBool::new(false);
    let munmaps = AtomicU64::new(0);

    thread::scope(|s| {
        // The vCPU: faults every page, round after round.
        s.spawn(|| {
            for round in 0..200 {
                for gfn in 0..PAGES {
                    kvm.fault((gfn * 7 + round) % PAGES, &primary);
                }
            }
            done.store(true, Ordering::Relaxed);
        });
        // munmap: invalidates an 8-page range, drops its primary entries, ends.
        s.spawn(|| {
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                let first = (i * 8) % PAGES;
                let range = Range::from_len(first * PAGE, 8 * PAGE).unwrap();
                let guard = mm.invalidate_start(range, Event::Unmap).unwrap();
                {
                    let mut table = primary.table.lock().unwrap();
                    for gfn in first..first + 8 {
                        table.remove(&gfn);
                    }
                }
                thread::yield_now();
                guard.end();
                munmaps.fetch_add(1, Ordering::Relaxed);
                // Pace the changes so that the other side makes progress between them.
                thread::sleep(Duration::from_micros(20));
                i += 1;
            }
        });
    });

    let shadow = kvm.mmu.lock().unwrap();
    let table = primary.table.lock().unwrap();
    let stale = shadow
        .sptes
        .iter()
        .filter(|(gfn, pfn)| table.get(gfn) != Some(pfn))
        .count();
    let stats = mm.subscriber_stats(id)?;
    println!("part 1: a vCPU faulting while another thread munmaps");
    println!(
        "  faults {}, retries {}, munmaps {}",
        kvm.faults.load(Ordering::Relaxed),
        kvm.retries.load(Ordering::Relaxed),
        munmaps.load(Ordering::Relaxed)
    );
    println!(
        "  subscriber saw starts {} / ends {}; engine stats starts {} / ends {}; in-progress now {}",
        kvm.starts.load(Ordering::Relaxed),
        kvm.ends.load(Ordering::Relaxed),
        stats.starts,
        stats.ends,
        shadow.in_progress
    );
    println!(
        "  coherence: {} shadow entries, {} stale",
        shadow.sptes.len(),
        stale
    );
    Ok(())
}

/// A GRU-like subscriber: its start needs a lock it cannot take without sleeping, so it
/// refuses non-blocking starts. It has an end (legal under Exact; Linux's convention forbids
/// it, which `Kernel` reports as a violation).
#[derive(Default)]
struct GruLike {
    ends: AtomicU64,
}

impl Subscriber for GruLike {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end().may_refuse()
    }
    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        if inv.is_blockable() {
            Ok(())
        } else {
            Err(Refused)
        }
    }
    fn invalidate_range_end(&self, _inv: &Invalidation) {
        self.ends.fetch_add(1, Ordering::Relaxed);
    }
}

fn part2() -> Result<(), Error> {
    println!("part 2: the OOM reaper's non-blocking start, refused by a GRU-like subscriber");
    for policy in [Policy::Exact, Policy::Kernel, Policy::Legacy] {
        let mm = Mm::with_policy(policy);
        let kvm = Arc::new(KvmLike::default());
        let gru = Arc::new(GruLike::default());
        let kvm_id = mm.register(kvm.clone())?;
        let gru_id = mm.register(gru.clone())?;
        let range = Range::from_len(0, 16 * PAGE)?;
        let outcome = match mm.invalidate_start_nonblock(range, Event::Unmap) {
            Ok(guard) => {
                guard.end();
                "started".to_string()
            }
            Err(e) => e.to_string(),
        };
        let in_progress = kvm.mmu.lock().unwrap().in_progress;
        let ks = mm.subscriber_stats(kvm_id)?;
        let gs = mm.subscriber_stats(gru_id)?;
        // The vCPU faults a page of the range again, with a budget of attempts.
        let primary = Primary::default();
        let fault = if kvm.try_fault(0, &primary, 1000) {
            "mapped".to_string()
        } else {
            format!(
                "gave up after {} retries",
                kvm.retries.load(Ordering::Relaxed)
            )
        };
        println!("  {policy:?}: {outcome}");
        println!(
            "    KVM in-progress {in_progress} (starts {}, ends {}), next fault on gfn 0: {fault}; \
             GRU ends {} (violations {})",
            ks.starts, ks.ends, gs.ends, gs.violations
        );
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    part1()?;
    part2()
}
