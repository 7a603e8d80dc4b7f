//! I8 (no heap allocation on the invalidation fast path) as far as the index is concerned:
//! `AugmentedTree::for_each_overlap` must not allocate, whatever the query and however many
//! entries. A counting global allocator (one per test binary, hence this separate file) counts
//! the allocations made by the current thread while armed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use mmnotify::interval::index::{AugmentedTree, BTreeIndex, IntervalIndex};

/// Forwards to [`System`], counting allocations made by an armed thread.
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    // Const-initialised thread-locals without destructors: touching them never allocates.
    let armed = ARMED.try_with(Cell::get).unwrap_or(false);
    if armed {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: every method forwards its arguments unchanged to `System`, which implements the
// `GlobalAlloc` contract; the added bookkeeping neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: our caller upholds `alloc`'s contract for `layout`, which is all `System` needs.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`; our
        // caller upholds the rest of `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this thread while running `f`.
fn allocations_during(f: impl FnOnce()) -> u64 {
    COUNT.with(|c| c.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    COUNT.with(Cell::get)
}

/// Deterministic pseudo-random numbers (xorshift64*), so the test needs no allocation of its
/// own to draw them and is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// I8: with 100 000 entries (short, long, nested, duplicated, touching `0` and `u64::MAX`), no
/// query of `I` allocates, whether it hits nothing, a few or everything; the hit counts are
/// checked against brute force so the queries demonstrably ran. Returns the index and the
/// bounds of its entries (entry `id` has `bounds[id]`).
fn queries_do_not_allocate<I: IntervalIndex<u64>>() -> (I, Vec<(u64, u64)>) {
    // The counter works: an allocation in an armed region is seen.
    assert!(
        allocations_during(|| drop(black_box(Vec::<u8>::with_capacity(64)))) >= 1,
        "the counting allocator does not count"
    );

    const N: usize = 100_000;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut bounds = Vec::with_capacity(N);
    for k in 0..N {
        let (s, l) = match k % 5 {
            0 => {
                let s = rng.next() % (1 << 40);
                (s, s + rng.next() % 4096)
            }
            1 => {
                let s = rng.next() % (1 << 40);
                (s, s + rng.next() % (1 << 32))
            }
            2 => (0, rng.next() % 1_000_000),
            3 => (u64::MAX - rng.next() % 1_000_000, u64::MAX),
            _ => (4096, 8191), // a heavily duplicated interval
        };
        bounds.push((s, l));
    }
    let mut tree = I::default();
    for (id, &(s, l)) in bounds.iter().enumerate() {
        tree.insert(s, l, id as u64);
    }
    assert_eq!(tree.len(), N);

    let queries = [
        (0, u64::MAX),
        (0, 0),
        (u64::MAX, u64::MAX),
        (5000, 5000),
        (1 << 39, (1 << 39) + 100),
        (1 << 41, 1 << 42), // between the populated regions
        (u64::MAX - 10, u64::MAX),
    ];
    for &(qs, ql) in &queries {
        let expected = bounds.iter().filter(|&&(s, l)| s <= ql && l >= qs).count();
        let mut hits = 0usize;
        let mut last_id_sum = 0u64;
        let allocs = allocations_during(|| {
            tree.for_each_overlap(qs, ql, &mut |&id| {
                hits += 1;
                last_id_sum = last_id_sum.wrapping_add(id);
            });
        });
        assert_eq!(
            hits, expected,
            "query [{qs}, {ql}] visited the wrong number"
        );
        assert_eq!(allocs, 0, "query [{qs}, {ql}] allocated {allocs} times");
        black_box(last_id_sum);
    }
    (tree, bounds)
}

/// I8 for the AVL tree; and removing an entry and inserting one reuses the freed arena slot,
/// so that steady-state churn does not allocate either.
#[test]
fn augmented_tree_queries_do_not_allocate() {
    let (mut tree, bounds) = queries_do_not_allocate::<AugmentedTree<u64>>();
    const N: usize = 100_000;
    // Steady-state churn: remove one entry, insert one; the freed slot is reused.
    let allocs = allocations_during(|| {
        for id in (0..1000u64).step_by(7) {
            let (s, l) = bounds[id as usize];
            let removed = tree.remove(s, l, &mut |&v| v == id);
            assert_eq!(removed, Some(id));
            tree.insert(s, l, id);
        }
    });
    assert_eq!(allocs, 0, "remove + insert allocated {allocs} times");
    assert_eq!(tree.len(), N);
}

/// I8 for the B-tree (the engine's index): no query allocates. (Its inserts and removes may:
/// node splits and merges move entries between vectors; they are not on the fast path.)
#[test]
fn btree_queries_do_not_allocate() {
    let (tree, _) = queries_do_not_allocate::<BTreeIndex<u64>>();
    tree.assert_invariants();
}
