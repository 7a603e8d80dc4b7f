//! I8: the invalidation fast path (start + end) allocates nothing with up to 64 classic
//! subscribers and any number of overlapping intervals (beyond 8, after a thread's first such
//! invalidation), measured with a counting global allocator.
//!
//! The allocator counts only on the measuring thread (a thread-local flag), so the test
//! harness and other tests running in parallel do not disturb the count. Control tests show
//! that the counter does see allocations: a plain `Vec`, a 65th subscriber (the started set
//! spills to the heap) and a thread's first invalidation with 9 hits (its spare hit buffer).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use mmnotify::{
    Capabilities, Event, IntervalCtx, IntervalSubscriber, Invalidate, Invalidation, Mm, Range,
    Refused, Subscriber,
};

/// The system allocator, counting the allocations of threads that asked for it.
struct Counting;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn note_alloc() {
    // `try_with`: the thread-locals have no destructor, but be safe during thread teardown.
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the bookkeeping touches only const-initialised
// thread-local `Cell`s, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// How many allocations `f` made on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    ALLOCS.with(|a| a.set(0));
    MEASURING.with(|m| m.set(true));
    f();
    MEASURING.with(|m| m.set(false));
    ALLOCS.with(|a| a.get())
}

struct Noop;

impl Subscriber for Noop {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }
    fn invalidate_range_start(&self, _inv: &Invalidation) -> Result<(), Refused> {
        Ok(())
    }
    fn invalidate_range_end(&self, _inv: &Invalidation) {}
}

struct NoopInterval;

impl IntervalSubscriber for NoopInterval {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _inv: &Invalidation) -> Invalidate {
        ctx.set_seq();
        Invalidate::Done
    }
}

const ROUNDS: usize = 100;

/// An address space with `classic` no-op subscribers and `intervals` intervals that all
/// overlap `hit()`.
fn setup(classic: usize, intervals: usize) -> Mm {
    let mm = Mm::new();
    for _ in 0..classic {
        mm.register(Arc::new(Noop)).unwrap();
    }
    for _ in 0..intervals {
        let _handle = mm
            .insert_interval(
                Range::from_len(0x1000, 0x1000).unwrap(),
                Arc::new(NoopInterval),
            )
            .unwrap();
    }
    // Warm up once: thread-locals, lazily initialised state.
    mm.invalidate_start(hit(), Event::Unmap).unwrap().end();
    mm.invalidate_start_nonblock(hit(), Event::Unmap)
        .unwrap()
        .end();
    mm
}

fn hit() -> Range {
    Range::new(0x1000, 0x2000).unwrap()
}

/// Allocations made by `ROUNDS` blockable and `ROUNDS` non-blockable start + end pairs.
fn fast_path_allocations(mm: &Mm) -> u64 {
    let r = hit();
    allocations(|| {
        for _ in 0..ROUNDS {
            mm.invalidate_start(r, Event::Unmap).unwrap().end();
            mm.invalidate_start_nonblock(r, Event::Clear).unwrap().end();
        }
    })
}

/// The counter works: a heap allocation on this thread is seen.
#[test]
fn the_counter_sees_allocations() {
    let n = allocations(|| {
        let v: Vec<u8> = Vec::with_capacity(16);
        std::hint::black_box(v);
    });
    assert_eq!(n, 1);
    assert_eq!(allocations(|| {}), 0);
}

/// I8: no allocation in start + end with no subscriber at all.
#[test]
fn no_subscriber_allocates_nothing() {
    let mm = setup(0, 0);
    assert_eq!(fast_path_allocations(&mm), 0);
}

/// I8: no allocation in start + end with 64 classic no-op subscribers.
#[test]
fn sixty_four_classic_allocate_nothing() {
    let mm = setup(64, 0);
    assert_eq!(mm.subscribers().len(), 64);
    assert_eq!(fast_path_allocations(&mm), 0);
}

/// I8 (and the performance issue's interval bar): no allocation with 64 classic subscribers and
/// 8 overlapping intervals hit by every range.
#[test]
fn sixty_four_classic_and_eight_intervals_allocate_nothing() {
    let mm = setup(64, 8);
    let st = mm.interval_state();
    assert_eq!(st.indexed, 8);
    let seq_before = st.seq;
    assert_eq!(fast_path_allocations(&mm), 0);
    // Every round really opened an epoch (the intervals were hit).
    assert_eq!(mm.interval_state().seq, seq_before + 4 * ROUNDS as u64);
}

/// Control: a 65th subscriber makes the started set spill to the heap, which the counter sees
/// (so the zero above is not a blind counter).
#[test]
fn sixty_five_classic_do_allocate() {
    let mm = setup(65, 0);
    assert!(fast_path_allocations(&mm) >= ROUNDS as u64);
}

/// I8 beyond the inline hit list (issue 11 item 7): with 9 and with 40 overlapping intervals
/// the hits beyond the 8 inline ones go to the thread's spare buffer, which the warm-up
/// allocated, so the fast path allocates nothing.
#[test]
fn more_than_eight_intervals_allocate_nothing_after_the_first() {
    for intervals in [9, 40] {
        let mm = setup(0, intervals);
        let seq_before = mm.interval_state().seq;
        assert_eq!(fast_path_allocations(&mm), 0, "{intervals} intervals");
        assert_eq!(mm.interval_state().seq, seq_before + 4 * ROUNDS as u64);
    }
}

/// Control: the first invalidation with 9 hits on a fresh thread does allocate (the spare
/// buffer), so the zero above comes from reusing it, not from a blind counter.
#[test]
fn the_first_spill_on_a_thread_allocates() {
    let mm = setup(0, 9);
    let first = std::thread::spawn(move || {
        allocations(|| mm.invalidate_start(hit(), Event::Unmap).unwrap().end())
    })
    .join()
    .unwrap();
    assert!(first >= 1, "the first spill allocated nothing");
}
