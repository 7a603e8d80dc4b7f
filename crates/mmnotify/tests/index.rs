//! The interval indexes against the reference [`LinearIndex`].
//!
//! The engine relies on the index for I23 (each interval overlapping a range gets exactly one
//! `invalidate`, non-overlapping ones none: the visited multiset must be exact) and for the
//! reproducible callback order that I32 ("in callback order") builds on: ascending `start`,
//! insertion order among equal starts. Both are checked here by driving random operation
//! sequences through [`AugmentedTree`], [`BTreeIndex`] and [`IsetIndex`] in lockstep with [`LinearIndex`] and
//! demanding identical answers, order included. The no-allocation half of the contract (I8)
//! lives in `tests/index_alloc.rs`, which needs its own global allocator.

use mmnotify::interval::index::{AugmentedTree, BTreeIndex, IntervalIndex, IsetIndex, LinearIndex};
use proptest::prelude::*;

/// Which entry a removal is after, as a predicate on the value (the entry's id).
#[derive(Debug, Clone)]
enum Pick {
    /// Accept the first candidate.
    Any,
    /// Accept nothing: every candidate is offered and refused.
    Nothing,
    /// Accept ids with `id % m == r`.
    Modulo(u64, u64),
    /// Accept exactly the id of the `i`-th live entry (mod the number of live entries), the way
    /// the engine removes one particular subscription among duplicates.
    LiveId(usize),
}

#[derive(Debug, Clone)]
enum Op {
    /// Insert fresh bounds.
    Insert(u64, u64),
    /// Insert the bounds of the `i`-th live entry again: a duplicate.
    InsertDup(usize),
    /// Remove with the bounds of the `i`-th live entry.
    RemoveExisting(usize, Pick),
    /// Remove with arbitrary bounds, usually matching no entry.
    Remove(u64, u64, Pick),
    /// Query arbitrary bounds.
    Query(u64, u64),
}

/// Addresses that collide often and hit both ends of the address space.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..48,
        1 => Just(0u64),
        1 => Just(u64::MAX),
        2 => (u64::MAX - 16)..=u64::MAX,
        1 => any::<u64>(),
    ]
}

fn bounds() -> impl Strategy<Value = (u64, u64)> {
    (addr(), addr()).prop_map(|(a, b)| (a.min(b), a.max(b)))
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        3 => Just(Pick::Any),
        1 => Just(Pick::Nothing),
        2 => (2u64..4, 0u64..4).prop_map(|(m, r)| Pick::Modulo(m, r % m)),
        4 => any::<usize>().prop_map(Pick::LiveId),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => bounds().prop_map(|(s, l)| Op::Insert(s, l)),
        3 => any::<usize>().prop_map(Op::InsertDup),
        3 => (any::<usize>(), pick()).prop_map(|(i, p)| Op::RemoveExisting(i, p)),
        1 => (bounds(), pick()).prop_map(|((s, l), p)| Op::Remove(s, l, p)),
        4 => bounds().prop_map(|(s, l)| Op::Query(s, l)),
    ]
}

fn visited<I: IntervalIndex<u64>>(index: &I, start: u64, last: u64) -> Vec<u64> {
    let mut out = Vec::new();
    index.for_each_overlap(start, last, &mut |&v| out.push(v));
    out
}

/// Runs `ops` on `index` and on a [`LinearIndex`] side by side; after every step the two must
/// agree on the visit sequence of the step's query and of the full-range query, on the value
/// removed, on the candidates offered to `is_target` (in order), and on `len`. `check` sees the
/// index after every step.
fn run_against_reference<I: IntervalIndex<u64>>(
    ops: &[Op],
    check: &dyn Fn(&I),
) -> Result<(), TestCaseError> {
    let mut reference = LinearIndex::<u64>::default();
    let mut index = I::default();
    // bounds[id] = the bounds the entry with value `id` was inserted with.
    let mut bounds: Vec<(u64, u64)> = Vec::new();
    for op in ops {
        let live = visited(&reference, 0, u64::MAX);
        match *op {
            Op::Insert(..) | Op::InsertDup(_) => {
                let (s, l) = match *op {
                    Op::Insert(s, l) => (s, l),
                    Op::InsertDup(i) if !live.is_empty() => bounds[live[i % live.len()] as usize],
                    _ => (7, 9),
                };
                let id = bounds.len() as u64;
                bounds.push((s, l));
                reference.insert(s, l, id);
                index.insert(s, l, id);
            }
            Op::RemoveExisting(_, ref p) | Op::Remove(_, _, ref p) => {
                let (s, l) = match *op {
                    Op::Remove(s, l, _) => (s, l),
                    Op::RemoveExisting(i, _) if !live.is_empty() => {
                        bounds[live[i % live.len()] as usize]
                    }
                    _ => (3, 5),
                };
                let accept = |v: u64| match *p {
                    Pick::Any => true,
                    Pick::Nothing => false,
                    Pick::Modulo(m, r) => v % m == r,
                    Pick::LiveId(i) => !live.is_empty() && v == live[i % live.len()],
                };
                let mut offered_ref = Vec::new();
                let removed_ref = reference.remove(s, l, &mut |&v| {
                    offered_ref.push(v);
                    accept(v)
                });
                let mut offered = Vec::new();
                let removed = index.remove(s, l, &mut |&v| {
                    offered.push(v);
                    accept(v)
                });
                prop_assert_eq!(removed, removed_ref, "removed value for {:?}", op);
                prop_assert_eq!(&offered, &offered_ref, "is_target candidates for {:?}", op);
                for &v in &offered_ref {
                    prop_assert_eq!(bounds[v as usize], (s, l), "offered a wrong-bounds entry");
                }
            }
            Op::Query(s, l) => {
                prop_assert_eq!(
                    visited(&index, s, l),
                    visited(&reference, s, l),
                    "query [{}, {}]",
                    s,
                    l
                );
            }
        }
        prop_assert_eq!(index.len(), reference.len());
        prop_assert_eq!(index.is_empty(), reference.is_empty());
        prop_assert_eq!(
            visited(&index, 0, u64::MAX),
            visited(&reference, 0, u64::MAX),
            "full-range order after {:?}",
            op
        );
        check(&index);
    }
    // Finally probe every boundary the run used, plus both ends of the address space.
    let mut probes: Vec<u64> = bounds.iter().flat_map(|&(s, l)| [s, l]).collect();
    probes.extend([0, 1, u64::MAX - 1, u64::MAX]);
    for &p in &probes {
        prop_assert_eq!(
            visited(&index, p, p),
            visited(&reference, p, p),
            "point {}",
            p
        );
        prop_assert_eq!(
            visited(&index, p, u64::MAX),
            visited(&reference, p, u64::MAX),
            "suffix from {}",
            p
        );
        prop_assert_eq!(
            visited(&index, 0, p),
            visited(&reference, 0, p),
            "prefix to {}",
            p
        );
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 192,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// I23 / callback order: `AugmentedTree` visits exactly what `LinearIndex` visits, in the
    /// same order, removes the same entry after offering the same candidates, and keeps every
    /// structural invariant (order, AVL balance, `max_last`, arena accounting) after each step.
    #[test]
    fn augmented_tree_matches_linear(ops in prop::collection::vec(op(), 1..160)) {
        run_against_reference::<AugmentedTree<u64>>(&ops, &|t| t.assert_invariants())?;
    }

    /// I23 / callback order: `BTreeIndex` visits exactly what `LinearIndex` visits, in the
    /// same order, removes the same entry after offering the same candidates, and keeps every
    /// structural invariant (order, summaries, fill, equal leaf depth, arena accounting).
    #[test]
    fn btree_matches_linear(ops in prop::collection::vec(op(), 1..160)) {
        run_against_reference::<BTreeIndex<u64>>(&ops, &|t| t.assert_invariants())?;
    }

    /// I23 / callback order: the `iset`-backed index gives the same answers as `LinearIndex`,
    /// order included (its keys carry the insertion sequence, see `IsetIndex`).
    #[test]
    fn iset_index_matches_linear(ops in prop::collection::vec(op(), 1..160)) {
        run_against_reference::<IsetIndex<u64>>(&ops, &|_| ())?;
    }
}

proptest! {
    // Each case runs up to ~1000 steps with full-range checks: fewer cases keep the binary fast.
    #![proptest_config(ProptestConfig { cases: 32, ..config() })]

    /// The same on trees of three and four levels: a few hundred inserts first (so that leaves
    /// and inner nodes split), then a removal-heavy mix (so that they merge and even out).
    #[test]
    fn btree_matches_linear_deep(
        fill in prop::collection::vec((addr(), 0u64..5000), 200..600),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let mut all: Vec<Op> = fill
            .into_iter()
            .map(|(s, len)| Op::Insert(s, s.saturating_add(len)))
            .collect();
        for (k, op) in ops.into_iter().enumerate() {
            all.push(op);
            all.push(Op::RemoveExisting(k * 7, Pick::Any));
        }
        run_against_reference::<BTreeIndex<u64>>(&all, &|t| t.assert_invariants())?;
    }
}

/// Both ends of the address space, with inclusive bounds: `[x, u64::MAX]` entries and queries,
/// single-address intervals at 0 and at `u64::MAX` (I23 at the edges).
fn edge_values<I: IntervalIndex<u64>>() {
    let mut i = I::default();
    i.insert(u64::MAX, u64::MAX, 0);
    i.insert(0, u64::MAX, 1);
    i.insert(0, 0, 2);
    i.insert(u64::MAX - 1, u64::MAX, 3);
    i.insert(5, 10, 4);
    assert_eq!(visited(&i, u64::MAX, u64::MAX), vec![1, 3, 0]);
    assert_eq!(visited(&i, 0, 0), vec![1, 2]);
    assert_eq!(visited(&i, 0, u64::MAX), vec![1, 2, 4, 3, 0]);
    assert_eq!(visited(&i, 11, u64::MAX - 2), vec![1]);
    assert_eq!(visited(&i, 10, 10), vec![1, 4]);
    assert_eq!(i.remove(0, u64::MAX, &mut |_| true), Some(1));
    assert_eq!(visited(&i, 11, u64::MAX - 2), Vec::<u64>::new());
    assert_eq!(i.remove(u64::MAX, u64::MAX, &mut |_| true), Some(0));
    assert_eq!(visited(&i, u64::MAX, u64::MAX), vec![3]);
    assert_eq!(i.len(), 3);
}

#[test]
fn edge_values_tree() {
    edge_values::<AugmentedTree<u64>>();
}

#[test]
fn edge_values_btree() {
    edge_values::<BTreeIndex<u64>>();
}

#[test]
fn edge_values_iset() {
    edge_values::<IsetIndex<u64>>();
}

#[test]
fn edge_values_linear() {
    edge_values::<LinearIndex<u64>>();
}

/// Duplicates: the same interval many times is visited oldest first, removal by identity takes
/// exactly the chosen copy and leaves the others in order, and a removal whose bounds match no
/// entry returns `None` without offering anything to `is_target`.
fn duplicates_and_absent<I: IntervalIndex<u64>>() {
    let mut i = I::default();
    for id in 0..6 {
        i.insert(100, 200, id);
    }
    i.insert(100, 150, 6);
    i.insert(50, 300, 7);
    assert_eq!(visited(&i, 120, 120), vec![7, 0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(i.remove(100, 200, &mut |&v| v == 3), Some(3));
    assert_eq!(i.remove(100, 200, &mut |&v| v == 3), None);
    assert_eq!(visited(&i, 160, 160), vec![7, 0, 1, 2, 4, 5]);
    let mut offered = 0;
    assert_eq!(
        i.remove(100, 199, &mut |_| {
            offered += 1;
            true
        }),
        None
    );
    assert_eq!(
        i.remove(101, 200, &mut |_| {
            offered += 1;
            true
        }),
        None
    );
    assert_eq!(
        offered, 0,
        "entries with other bounds were offered to is_target"
    );
    assert_eq!(i.len(), 7);
    // Re-inserting after removals still lands after the older duplicates.
    i.insert(100, 200, 8);
    assert_eq!(visited(&i, 100, 100), vec![7, 0, 1, 2, 4, 5, 6, 8]);
}

#[test]
fn duplicates_and_absent_tree() {
    duplicates_and_absent::<AugmentedTree<u64>>();
}

#[test]
fn duplicates_and_absent_btree() {
    duplicates_and_absent::<BTreeIndex<u64>>();
}

#[test]
fn duplicates_and_absent_iset() {
    duplicates_and_absent::<IsetIndex<u64>>();
}

fn assert_balanced(t: &AugmentedTree<u64>, what: &str) {
    let n = t.len() as f64;
    let bound = 1.45 * n.log2() + 2.0;
    assert!(
        t.height() as f64 <= bound,
        "{what}: height {} exceeds 1.45*log2({n})+2 = {bound:.1}",
        t.height()
    );
}

/// The AVL bound holds for the inputs that degenerate an unbalanced tree: ascending starts,
/// descending starts, and one interval duplicated (keys ascend by insertion sequence). It
/// still holds after removing every other entry, and the structure checks out.
#[test]
fn avl_height_after_sequential_inserts() {
    const N: u64 = 10_000;
    let mut asc = AugmentedTree::new();
    let mut desc = AugmentedTree::new();
    let mut dup = AugmentedTree::new();
    for k in 0..N {
        asc.insert(k, k + 1, k);
        desc.insert(N - k, N - k + 3, k);
        dup.insert(42, 43, k);
    }
    assert_eq!(asc.len(), N as usize);
    assert!(asc.height() > 1, "the tree does not report its height");
    for (t, what) in [
        (&asc, "ascending"),
        (&desc, "descending"),
        (&dup, "duplicates"),
    ] {
        assert_balanced(t, what);
        t.assert_invariants();
    }
    for k in (0..N).step_by(2) {
        assert_eq!(asc.remove(k, k + 1, &mut |_| true), Some(k));
        assert_eq!(dup.remove(42, 43, &mut |&v| v == k), Some(k));
    }
    for (t, what) in [(&asc, "ascending, halved"), (&dup, "duplicates, halved")] {
        assert_eq!(t.len(), (N / 2) as usize);
        assert_balanced(t, what);
        t.assert_invariants();
    }
    let odd: Vec<u64> = (1..N).step_by(2).collect();
    assert_eq!(visited(&dup, 0, u64::MAX), odd);
}

/// A drained tree is empty and reusable: slots come back from the free list, order restarts
/// correctly, and the invariants hold.
#[test]
fn drain_and_reuse() {
    let mut t = AugmentedTree::new();
    for k in 0..100u64 {
        t.insert(k % 10, k % 10 + 5, k);
    }
    for k in 0..100u64 {
        assert_eq!(t.remove(k % 10, k % 10 + 5, &mut |&v| v == k), Some(k));
        t.assert_invariants();
    }
    assert!(t.is_empty());
    assert_eq!(t.height(), 0);
    assert_eq!(visited(&t, 0, u64::MAX), Vec::<u64>::new());
    t.insert(3, 4, 1);
    t.insert(3, 4, 0);
    assert_eq!(visited(&t, 0, u64::MAX), vec![1, 0]);
    t.assert_invariants();
}
