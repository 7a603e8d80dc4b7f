//! An HMM-style device mirror on top of an `mmnotify` interval subscription.
//!
//! A device keeps its own page table for one interval of the address space. It fills entries
//! with the collision-retry protocol (`read_begin` -> read the primary -> take the device
//! lock -> `read_retry` -> commit), and its interval callback tears entries down under the same
//! lock after `set_seq`. Meanwhile another thread migrates pages of the primary (changing their
//! frames inside an invalidation window). At the end, every device entry is compared with the
//! primary.
//!
//! Run with `cargo run --release -p mmnotify --example hmm_mirror`.
#![allow(clippy::disallowed_types)] // std::sync is fine outside the engine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use mmnotify::{
    Error, Event, IntervalCtx, IntervalHandle, IntervalSubscriber, Invalidate, Invalidation, Mm,
    Range,
};

const PAGE: u64 = 0x1000;
const BASE: u64 = 0x7f00_0000_0000;
const PAGES: u64 = 128;

/// The primary page table: page address -> frame.
#[derive(Default)]
struct Primary {
    table: Mutex<HashMap<u64, u64>>,
    next_frame: AtomicU64,
}

impl Primary {
    fn new_frame(&self) -> u64 {
        self.next_frame.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Like `hmm_range_fault`: the frame of `addr`, faulting one in if there is none.
    fn fault(&self, addr: u64) -> u64 {
        let mut table = self.table.lock().unwrap();
        let frame = *table.entry(addr).or_insert_with(|| self.new_frame());
        frame
    }
}

/// The device's page table; its mutex is the "user lock" of the retry protocol.
#[derive(Default)]
struct Device {
    table: Mutex<HashMap<u64, u64>>,
    invalidations: AtomicU64,
    torn_down: AtomicU64,
}

impl IntervalSubscriber for Device {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        let range = inv.range();
        let mut table = self.table.lock().unwrap();
        ctx.set_seq();
        let before = table.len();
        table.retain(|addr, _| !range.contains(*addr));
        self.torn_down
            .fetch_add((before - table.len()) as u64, Ordering::Relaxed);
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        Invalidate::Done
    }
}

/// The device driver's fill path for one page; returns how many times it had to retry.
fn fill(
    device: &Device,
    handle: &IntervalHandle,
    primary: &Primary,
    addr: u64,
) -> Result<u64, Error> {
    let mut retries = 0;
    loop {
        let seq = handle.read_begin()?;
        let frame = primary.fault(addr); // may sleep; races with invalidations
        thread::yield_now();
        let mut table = device.table.lock().unwrap();
        if handle.read_retry(seq) {
            retries += 1;
            continue;
        }
        table.insert(addr, frame);
        return Ok(retries);
    }
}

fn main() -> Result<(), Error> {
    let mm = Mm::new();
    let primary = Primary::default();
    let device = Arc::new(Device::default());
    let handle = mm.insert_interval(Range::from_len(BASE, PAGES * PAGE)?, device.clone())?;
    let done = AtomicBool::new(false);
    let migrations = AtomicU64::new(0);
    let mut fills = 0u64;
    let mut retries = 0u64;

    thread::scope(|s| {
        // The migrating thread: moves 4-page chunks to new frames inside a window.
        s.spawn(|| {
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                let first = BASE + ((i * 4 * 5) % PAGES) * PAGE;
                let range = Range::from_len(first, 4 * PAGE).unwrap();
                let guard = mm.invalidate_start(range, Event::Clear).unwrap();
                {
                    let mut table = primary.table.lock().unwrap();
                    for addr in (first..first + 4 * PAGE).step_by(PAGE as usize) {
                        if table.contains_key(&addr) {
                            table.insert(addr, primary.new_frame());
                        }
                    }
                }
                thread::yield_now();
                guard.end();
                migrations.fetch_add(1, Ordering::Relaxed);
                // Pace the changes so that the other side makes progress between them.
                thread::sleep(Duration::from_micros(20));
                i += 1;
            }
        });
        // The device: fills its table, page after page, round after round.
        for round in 0..100 {
            for page in 0..PAGES {
                let addr = BASE + ((page * 3 + round) % PAGES) * PAGE;
                retries += fill(&device, &handle, &primary, addr).unwrap();
                fills += 1;
            }
        }
        done.store(true, Ordering::Relaxed);
    });

    let device_table = device.table.lock().unwrap();
    let primary_table = primary.table.lock().unwrap();
    let coherent = device_table
        .iter()
        .filter(|(addr, frame)| primary_table.get(addr) == Some(frame))
        .count();
    let state = mm.interval_state();
    println!("HMM mirror of {PAGES} pages at {BASE:#x}, filled while another thread migrates");
    println!(
        "  fills {fills}, retries {retries}, migrations {}, invalidate callbacks {}, entries torn down {}",
        migrations.load(Ordering::Relaxed),
        device.invalidations.load(Ordering::Relaxed),
        device.torn_down.load(Ordering::Relaxed)
    );
    println!(
        "  coherence: {coherent} of {} device entries match the primary ({} stale)",
        device_table.len(),
        device_table.len() - coherent
    );
    println!(
        "  interval state: seq {} (even: idle), active {}",
        state.seq, state.active
    );
    drop((device_table, primary_table));
    mm.remove_interval(&handle)?;
    Ok(())
}
