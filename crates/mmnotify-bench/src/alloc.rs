//! A counting global allocator: how many allocations the *current thread* made.
//!
//! Counting per thread keeps background threads (the contended benchmarks, the test harness)
//! out of the figure. A binary opts in with
//!
//! ```
//! #[global_allocator]
//! static ALLOC: mmnotify_bench::alloc::CountingAlloc = mmnotify_bench::alloc::CountingAlloc;
//!
//! fn main() {
//!     assert!(mmnotify_bench::alloc::is_installed());
//! }
//! ```
//!
//! and [`is_installed`] tells whether it did, so that a "0 allocations" figure is never
//! reported from an allocator that counts nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// The system allocator, counting `alloc`, `alloc_zeroed` and `realloc` calls per thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAlloc;

fn count_one() {
    // `try_with`: during thread teardown the slot may be gone; such allocations are not ours.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; counting touches only a const-initialised thread-local
// `Cell` without a destructor, which never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator, with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: `ptr` came from `System` through this allocator, with this `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations made so far by the current thread (0 forever if [`CountingAlloc`] is not the
/// global allocator).
pub fn allocations_on_this_thread() -> u64 {
    ALLOCATIONS.try_with(Cell::get).unwrap_or(0)
}

/// Whether [`CountingAlloc`] is the global allocator of this process (checked by allocating).
pub fn is_installed() -> bool {
    let before = allocations_on_this_thread();
    let probe = std::hint::black_box(Box::new(0u64));
    drop(probe);
    allocations_on_this_thread() > before
}

/// Allocations per call of `body`, averaged over `iters` calls, or `None` when the counting
/// allocator is not installed.
pub fn allocations_per_call(iters: u64, mut body: impl FnMut()) -> Option<f64> {
    if !is_installed() {
        return None;
    }
    body(); // warm-up: lazily created thread-locals are not the fast path's cost.
    let before = allocations_on_this_thread();
    for _ in 0..iters {
        body();
    }
    let made = allocations_on_this_thread() - before;
    Some(made as f64 / iters.max(1) as f64)
}
