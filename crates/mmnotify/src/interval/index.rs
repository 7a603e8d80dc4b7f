//! The interval index: which interval subscriptions overlap a range.
//!
//! The engine needs three operations on a multiset of inclusive intervals `[start, last]`:
//! insert, remove one particular entry, and visit every entry that overlaps a query. They sit
//! behind the small [`IntervalIndex`] trait so that the structure can be swapped when a
//! benchmark says so, and so that every implementation is tested against the obvious one,
//! [`LinearIndex`].
//!
//! Queries run on the invalidation fast path, under the per-`Mm` interval lock, so an
//! implementation must not allocate while visiting.
//!
//! Entries are visited in ascending `start` order, entries with equal `start` in insertion
//! order; the engine calls interval callbacks in that order, which keeps runs reproducible.
//!
//! # The four implementations
//!
//! * [`LinearIndex`]: a sorted vector scanned in full. Obviously right, O(n) per query; the
//!   reference every other implementation is tested against.
//! * [`BTreeIndex`]: the index the engine uses (`DefaultIndex`): the same ordering and
//!   augmentation as the AVL tree below, but 8 to 16 entries per leaf and 8 to 16 children per
//!   inner node, each child recorded in its parent with its smallest key and largest `last`.
//!   A query at one level reads one node's contiguous child records (a few adjacent cache
//!   lines, which the prefetcher fetches together) instead of one node per level of a binary
//!   tree, and a million entries fit in 5 to 7 levels instead of about 20. Measured on the
//!   engine's fixture (`mmnotify bench`, rows `b/index/*`), a query among 1e6 intervals at
//!   random positions costs about a fifth of the AVL tree's; see docs/PERFORMANCE.md.
//! * [`AugmentedTree`]: an AVL tree, the engine's index before the B-tree; kept as a second
//!   structure with its own proofs, and as the B-tree's yardstick. Described below.
//! * [`IsetIndex`]: the same contract on top of the third-party `iset` crate. Its queries
//!   allocate (the crate's iterators keep a heap-allocated stack), so it is not fit for the
//!   fast path; it is kept as an independent second opinion in the tests and as a baseline for
//!   benchmarks.
//!
//! # How `AugmentedTree` works
//!
//! **Ordering.** Every entry gets a sequence number when it is inserted, from a counter that
//! only grows. The tree is a binary search tree ordered by the pair `(start, sequence)`. The
//! pair is unique even when the same interval is inserted many times, so duplicates need no
//! special case, and an in-order walk yields exactly the order the trait promises: ascending
//! `start`, and among equal starts, oldest first.
//!
//! **Balance.** The tree is an AVL tree: every node records the height of its subtree, and
//! after each insert or delete the nodes on the way back up are re-balanced by one or two
//! rotations whenever the heights of their two children differ by more than one. That keeps
//! the height below about `1.44 * log2(n + 2)`, which is what makes recursion on the call
//! stack acceptable: a tree of four billion entries is under 50 levels deep.
//!
//! **Augmentation.** Every node also records `max_last`, the largest `last` found anywhere in
//! its subtree. Rotations and deletions only rearrange a node's children, so `max_last` (like
//! `height`) is recomputed from the node's own `last` and its two children whenever a node's
//! children change, bottom-up, at O(1) per node touched.
//!
//! **Queries.** An entry `[s, l]` overlaps the query `[qs, ql]` exactly when `s <= ql` and
//! `l >= qs`. The walk uses one fact per side to skip whole subtrees:
//!
//! * if a subtree's `max_last < qs`, no entry in it reaches the query: skip it entirely;
//! * if a node's `start > ql`, neither it nor anything to its right (all start later) can
//!   overlap: stop after its left subtree.
//!
//! Everything else is walked in order, left subtree, node, right subtree, so the visits come
//! out sorted. The walk recurses into left children and loops down right children; it keeps
//! no state but the call stack and never allocates.
//!
//! **Cost.** Insert and remove are O(log n) (remove adds the number of entries sharing the
//! removed entry's `start`, which it has to offer to `is_target` in order). A query with `k`
//! hits touches the O(log n) nodes along the boundary `start = ql`, plus the nodes on the
//! paths from the root to the hits and their children. When the hits are neighbours in
//! `start` order (for example when the stored intervals do not nest, the usual case for
//! subscriptions) those paths share all but O(k) nodes and a query costs O(log n + k). When
//! hits are scattered among many long-lived non-hits, as with deeply nested intervals, the
//! bound degrades towards O(k * log(n / k)), the usual bound for this kind of augmented tree;
//! it is never worse than O(n).
//!
//! **Storage.** Nodes live in one `Vec` (an arena) and refer to each other by `u32` index,
//! which keeps the code free of `unsafe` and of reference-counted pointers. A removed node's
//! slot goes onto a free list threaded through the vacated slots and is reused by the next
//! insert, so a stable population of subscriptions does not grow the vector. The vector never
//! shrinks; its size is the historical maximum of live entries.
//!
//! **Edges.** Bounds are plain `u64` with `last` inclusive, so `[x, u64::MAX]` needs no `+ 1`
//! anywhere: all comparisons above are between inclusive bounds.

use std::cmp::Ordering;
use std::fmt;

/// A multiset of inclusive intervals `[start, last]`, each carrying a value.
pub trait IntervalIndex<V>: Default + Send {
    /// Adds `[start, last]` with `value`. Duplicates of the same interval are allowed.
    /// Requires `start <= last`.
    fn insert(&mut self, start: u64, last: u64, value: V);

    /// Removes and returns one entry with exactly these bounds whose value `is_target`
    /// accepts, or `None` if there is none.
    fn remove(&mut self, start: u64, last: u64, is_target: &mut dyn FnMut(&V) -> bool)
        -> Option<V>;

    /// Calls `visit` for every entry that shares an address with `[start, last]`, in ascending
    /// `start` order (insertion order among equal starts), without allocating.
    fn for_each_overlap(&self, start: u64, last: u64, visit: &mut dyn FnMut(&V));

    /// The number of entries.
    fn len(&self) -> usize;

    /// Whether there are no entries.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The reference implementation: a vector sorted by `start`, scanned in full by every query.
///
/// O(n) per query; the yardstick the real index is tested and measured against.
#[derive(Debug)]
pub struct LinearIndex<V> {
    entries: Vec<(u64, u64, V)>,
}

impl<V> Default for LinearIndex<V> {
    fn default() -> Self {
        LinearIndex {
            entries: Vec::new(),
        }
    }
}

impl<V: Send> IntervalIndex<V> for LinearIndex<V> {
    fn insert(&mut self, start: u64, last: u64, value: V) {
        debug_assert!(start <= last);
        let at = self.entries.partition_point(|e| e.0 <= start);
        self.entries.insert(at, (start, last, value));
    }

    fn remove(
        &mut self,
        start: u64,
        last: u64,
        is_target: &mut dyn FnMut(&V) -> bool,
    ) -> Option<V> {
        let at = self
            .entries
            .iter()
            .position(|e| e.0 == start && e.1 == last && is_target(&e.2))?;
        Some(self.entries.remove(at).2)
    }

    fn for_each_overlap(&self, start: u64, last: u64, visit: &mut dyn FnMut(&V)) {
        for e in &self.entries {
            if e.0 > last {
                break;
            }
            if e.1 >= start {
                visit(&e.2);
            }
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The index the engine uses (the B-tree measured faster than the AVL tree at every size of
/// figure (b); see docs/PERFORMANCE.md).
pub(crate) type DefaultIndex<V> = BTreeIndex<V>;

/// "No node": the empty child, the empty tree, the end of the free list.
const NIL: u32 = u32::MAX;

/// One live entry of an [`AugmentedTree`].
#[derive(Debug)]
struct Node<V> {
    start: u64,
    last: u64,
    /// Insertion sequence number; `(start, seq)` is the search key.
    seq: u64,
    /// The largest `last` in the subtree rooted here (this node included).
    max_last: u64,
    left: u32,
    right: u32,
    /// Height of the subtree rooted here; a leaf has height 1.
    height: u8,
    value: V,
}

impl<V> Node<V> {
    fn key(&self) -> (u64, u64) {
        (self.start, self.seq)
    }
}

/// An arena slot: a live node, or a link in the free list.
#[derive(Debug)]
enum Slot<V> {
    Used(Node<V>),
    Free { next: u32 },
}

/// A balanced interval tree: an AVL tree keyed by `(start, insertion sequence)`, each node
/// augmented with the largest `last` of its subtree. (The engine's index was this until the
/// [`BTreeIndex`] measured faster.)
///
/// Insert and remove are O(log n); a query visits its hits in the order the trait requires
/// without allocating, in O(log n + k) when the hits are neighbours in `start` order (see the
/// [module documentation](self) for the algorithm and the exact cost).
///
/// Nodes live in an arena `Vec` linked by `u32` indices, so the tree holds at most
/// `u32::MAX - 1` entries at once; inserting past that panics.
///
/// # Invariants
///
/// Checked by [`AugmentedTree::assert_invariants`] after every step of the property tests:
///
/// 1. *Search order.* An in-order walk from `root` yields strictly increasing keys
///    `(start, seq)`.
/// 2. *Unique, growing sequence numbers.* Every live node's `seq` is below `next_seq`; no two
///    live nodes share one. Hence equal starts are ordered oldest first.
/// 3. *AVL balance.* Every node's `height` is one more than the larger of its children's
///    heights (an empty child counts 0), and the two children's heights differ by at most 1.
/// 4. *Augmentation.* Every node's `max_last` is the maximum of its own `last` and its
///    children's `max_last`.
/// 5. *Well-formed entries.* `start <= last` for every node.
/// 6. *Arena accounting.* Every slot is either reachable from `root` exactly once (`Used`)
///    or on the free list exactly once (`Free`); `len` is the number of `Used` slots.
pub struct AugmentedTree<V> {
    slots: Vec<Slot<V>>,
    /// Head of the free list, or `NIL`.
    free: u32,
    root: u32,
    len: usize,
    next_seq: u64,
}

impl<V: fmt::Debug> fmt::Debug for AugmentedTree<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Entries<'a, V>(&'a AugmentedTree<V>);
        impl<V: fmt::Debug> fmt::Debug for Entries<'_, V> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut list = f.debug_list();
                self.0.walk_in_order(self.0.root, &mut |n| {
                    list.entry(&(n.start..=n.last, &n.value));
                });
                list.finish()
            }
        }
        f.debug_struct("AugmentedTree")
            .field("len", &self.len)
            .field("height", &self.height())
            .field("entries", &Entries(self))
            .finish()
    }
}

impl<V> Default for AugmentedTree<V> {
    fn default() -> Self {
        AugmentedTree {
            slots: Vec::new(),
            free: NIL,
            root: NIL,
            len: 0,
            next_seq: 0,
        }
    }
}

impl<V> AugmentedTree<V> {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// The height of the tree: 0 when empty, 1 for a single entry. An AVL tree of `n` entries
    /// is never taller than about `1.44 * log2(n + 2)`.
    pub fn height(&self) -> usize {
        usize::from(self.height_of(self.root))
    }

    /// Checks every invariant listed on the type, panicking with a description of the first
    /// violation. O(n); meant for tests.
    pub fn assert_invariants(&self) {
        let mut prev: Option<(u64, u64)> = None;
        let mut seen = 0usize;
        self.check_subtree(self.root, &mut prev, &mut seen);
        assert_eq!(seen, self.len, "len does not match the reachable nodes");
        let mut free = 0usize;
        let mut at = self.free;
        while at != NIL {
            match &self.slots[at as usize] {
                Slot::Free { next } => at = *next,
                Slot::Used(_) => panic!("slot {at} is on the free list but in use"),
            }
            free += 1;
            assert!(free <= self.slots.len(), "the free list has a cycle");
        }
        assert_eq!(
            seen + free,
            self.slots.len(),
            "some slot is neither reachable nor free"
        );
    }

    /// Returns `(height, max_last)` of the subtree, checking it on the way.
    fn check_subtree(&self, t: u32, prev: &mut Option<(u64, u64)>, seen: &mut usize) -> (u8, u64) {
        if t == NIL {
            return (0, 0);
        }
        let n = self.node(t);
        assert!(n.start <= n.last, "entry {t} has start > last");
        assert!(
            n.seq < self.next_seq,
            "entry {t} has a future sequence number"
        );
        let (lh, lmax) = self.check_subtree(n.left, prev, seen);
        if let Some(p) = *prev {
            assert!(p < n.key(), "keys out of order: {p:?} before {:?}", n.key());
        }
        *prev = Some(n.key());
        *seen += 1;
        assert!(
            *seen <= self.len,
            "more reachable nodes than len (a cycle?)"
        );
        let (rh, rmax) = self.check_subtree(n.right, prev, seen);
        assert!(
            lh.abs_diff(rh) <= 1,
            "node {t} is out of balance: {lh} vs {rh}"
        );
        assert_eq!(n.height, 1 + lh.max(rh), "node {t} has a stale height");
        let mut max = n.last;
        if n.left != NIL {
            max = max.max(lmax);
        }
        if n.right != NIL {
            max = max.max(rmax);
        }
        assert_eq!(n.max_last, max, "node {t} has a stale max_last");
        (n.height, n.max_last)
    }

    fn walk_in_order(&self, t: u32, f: &mut dyn FnMut(&Node<V>)) {
        if t != NIL {
            let n = self.node(t);
            self.walk_in_order(n.left, f);
            f(n);
            self.walk_in_order(n.right, f);
        }
    }

    fn node(&self, t: u32) -> &Node<V> {
        match &self.slots[t as usize] {
            Slot::Used(n) => n,
            Slot::Free { .. } => unreachable!("a free slot is linked into the tree"),
        }
    }

    fn node_mut(&mut self, t: u32) -> &mut Node<V> {
        match &mut self.slots[t as usize] {
            Slot::Used(n) => n,
            Slot::Free { .. } => unreachable!("a free slot is linked into the tree"),
        }
    }

    fn height_of(&self, t: u32) -> u8 {
        if t == NIL {
            0
        } else {
            self.node(t).height
        }
    }

    /// Recomputes `height` and `max_last` of `t` from its children.
    fn update(&mut self, t: u32) {
        let (l, r) = {
            let n = self.node(t);
            (n.left, n.right)
        };
        let mut height = 0;
        let mut max_last = self.node(t).last;
        for c in [l, r] {
            if c != NIL {
                let c = self.node(c);
                height = height.max(c.height);
                max_last = max_last.max(c.max_last);
            }
        }
        let n = self.node_mut(t);
        n.height = height + 1;
        n.max_last = max_last;
    }

    /// Lifts the left child of `t` above it; returns the new subtree root.
    fn rotate_right(&mut self, t: u32) -> u32 {
        let l = self.node(t).left;
        let moved = self.node(l).right;
        self.node_mut(t).left = moved;
        self.update(t);
        self.node_mut(l).right = t;
        self.update(l);
        l
    }

    /// Lifts the right child of `t` above it; returns the new subtree root.
    fn rotate_left(&mut self, t: u32) -> u32 {
        let r = self.node(t).right;
        let moved = self.node(r).left;
        self.node_mut(t).right = moved;
        self.update(t);
        self.node_mut(r).left = t;
        self.update(r);
        r
    }

    /// Restores balance at `t`, whose children are balanced and differ in height by at most
    /// two; refreshes its augmentation either way. Returns the new subtree root.
    fn rebalance(&mut self, t: u32) -> u32 {
        self.update(t);
        let (l, r) = {
            let n = self.node(t);
            (n.left, n.right)
        };
        let (lh, rh) = (self.height_of(l), self.height_of(r));
        if lh > rh + 1 {
            let ll = self.height_of(self.node(l).left);
            let lr = self.height_of(self.node(l).right);
            if lr > ll {
                let new_l = self.rotate_left(l);
                self.node_mut(t).left = new_l;
            }
            self.rotate_right(t)
        } else if rh > lh + 1 {
            let rl = self.height_of(self.node(r).left);
            let rr = self.height_of(self.node(r).right);
            if rl > rr {
                let new_r = self.rotate_right(r);
                self.node_mut(t).right = new_r;
            }
            self.rotate_left(t)
        } else {
            t
        }
    }

    /// Puts `node` into a slot, reusing a free one if there is one.
    fn alloc(&mut self, node: Node<V>) -> u32 {
        if self.free != NIL {
            let at = self.free;
            let slot = std::mem::replace(&mut self.slots[at as usize], Slot::Used(node));
            match slot {
                Slot::Free { next } => self.free = next,
                Slot::Used(_) => unreachable!("the free list points at a used slot"),
            }
            at
        } else {
            let at = u32::try_from(self.slots.len())
                .ok()
                .filter(|&at| at != NIL)
                .expect("AugmentedTree holds at most u32::MAX - 1 entries");
            self.slots.push(Slot::Used(node));
            at
        }
    }

    /// Returns slot `t` to the free list and hands back its value.
    fn release(&mut self, t: u32) -> V {
        let slot = std::mem::replace(&mut self.slots[t as usize], Slot::Free { next: self.free });
        self.free = t;
        match slot {
            Slot::Used(n) => n.value,
            Slot::Free { .. } => unreachable!("released a free slot"),
        }
    }

    /// Inserts the detached node `new` into the subtree `t`; returns the new subtree root.
    fn insert_into(&mut self, t: u32, new: u32) -> u32 {
        if t == NIL {
            return new;
        }
        if self.node(new).key() < self.node(t).key() {
            let l = self.insert_into(self.node(t).left, new);
            self.node_mut(t).left = l;
        } else {
            let r = self.insert_into(self.node(t).right, new);
            self.node_mut(t).right = r;
        }
        self.rebalance(t)
    }

    /// The first node (in key order) of subtree `t` with bounds `[start, last]` whose value
    /// `is_target` accepts; `is_target` sees the candidates in key order.
    fn find_target(
        &self,
        t: u32,
        start: u64,
        last: u64,
        is_target: &mut dyn FnMut(&V) -> bool,
    ) -> Option<u32> {
        if t == NIL {
            return None;
        }
        let n = self.node(t);
        if n.max_last < last {
            return None;
        }
        match start.cmp(&n.start) {
            Ordering::Less => self.find_target(n.left, start, last, is_target),
            Ordering::Greater => self.find_target(n.right, start, last, is_target),
            Ordering::Equal => {
                if let Some(found) = self.find_target(n.left, start, last, is_target) {
                    return Some(found);
                }
                if n.last == last && is_target(&n.value) {
                    return Some(t);
                }
                self.find_target(n.right, start, last, is_target)
            }
        }
    }

    /// Unlinks the node with `key` from subtree `t` (it must be there); returns the new
    /// subtree root. The unlinked node's slot is left as it is.
    fn unlink(&mut self, t: u32, key: (u64, u64)) -> u32 {
        assert!(t != NIL, "unlink: key not in the tree");
        let (l, r) = {
            let n = self.node(t);
            (n.left, n.right)
        };
        match key.cmp(&self.node(t).key()) {
            Ordering::Less => {
                let l = self.unlink(l, key);
                self.node_mut(t).left = l;
                self.rebalance(t)
            }
            Ordering::Greater => {
                let r = self.unlink(r, key);
                self.node_mut(t).right = r;
                self.rebalance(t)
            }
            Ordering::Equal => {
                if l == NIL {
                    return r;
                }
                if r == NIL {
                    return l;
                }
                // Two children: the successor (leftmost of the right subtree) takes t's place.
                let (r, succ) = self.unlink_min(r);
                let s = self.node_mut(succ);
                s.left = l;
                s.right = r;
                self.rebalance(succ)
            }
        }
    }

    /// Unlinks the leftmost node of the non-empty subtree `t`; returns the new subtree root
    /// and the unlinked node.
    fn unlink_min(&mut self, t: u32) -> (u32, u32) {
        let l = self.node(t).left;
        if l == NIL {
            return (self.node(t).right, t);
        }
        let (l, min) = self.unlink_min(l);
        self.node_mut(t).left = l;
        (self.rebalance(t), min)
    }

    /// Visits the overlaps of `[qs, ql]` in subtree `t`, in key order.
    fn visit_overlaps(&self, mut t: u32, qs: u64, ql: u64, visit: &mut dyn FnMut(&V)) {
        while t != NIL {
            let n = self.node(t);
            if n.max_last < qs {
                return;
            }
            self.visit_overlaps(n.left, qs, ql, visit);
            if n.start > ql {
                return;
            }
            if n.last >= qs {
                visit(&n.value);
            }
            t = n.right;
        }
    }
}

impl<V: Send> IntervalIndex<V> for AugmentedTree<V> {
    fn insert(&mut self, start: u64, last: u64, value: V) {
        debug_assert!(start <= last);
        let seq = self.next_seq;
        self.next_seq = seq.checked_add(1).expect("sequence numbers exhausted");
        let new = self.alloc(Node {
            start,
            last,
            seq,
            max_last: last,
            left: NIL,
            right: NIL,
            height: 1,
            value,
        });
        self.root = self.insert_into(self.root, new);
        self.len += 1;
    }

    fn remove(
        &mut self,
        start: u64,
        last: u64,
        is_target: &mut dyn FnMut(&V) -> bool,
    ) -> Option<V> {
        let found = self.find_target(self.root, start, last, is_target)?;
        let key = self.node(found).key();
        self.root = self.unlink(self.root, key);
        self.len -= 1;
        Some(self.release(found))
    }

    fn for_each_overlap(&self, start: u64, last: u64, visit: &mut dyn FnMut(&V)) {
        self.visit_overlaps(self.root, start, last, visit);
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// Bits of an [`IsetIndex`] key below the address: room for the sequence number.
const ISET_SEQ_BITS: u32 = 63;

/// The [`IntervalIndex`] contract on top of the `iset` crate's `IntervalMap`.
///
/// **Not for the fast path: queries allocate.** `iset`'s query iterators keep their traversal
/// stack in a heap-allocated bit vector, so every [`for_each_overlap`](IntervalIndex::for_each_overlap)
/// allocates once, which the engine's no-allocation rule (I8) forbids. The type exists as an
/// independent, third-party implementation that [`AugmentedTree`] is cross-checked against,
/// and as a baseline for benchmarks.
///
/// Apart from that it meets the whole contract, ordering included. `iset` stores half-open
/// ranges and orders equal starts by end, not by age, so the index does not give it the
/// address bounds directly. It maps address `a` and sequence number `s` to the `u128` key
/// `a * 2^63 + s`, and stores `[start, last]` inserted `s`-th as the range
/// `key(start, s) .. key(last + 1, 0)`. Then:
///
/// * `last = u64::MAX` needs no special case (`2^64 * 2^63 = 2^127` fits a `u128`);
/// * two keys compare as `(address, sequence)` pairs, so `iset`'s range order is the
///   contract's order and every range is distinct (no `force_insert` duplicates to break ties
///   arbitrarily);
/// * a stored range meets the query range `key(qs, 0) .. key(ql + 1, 0)` exactly when the
///   address intervals overlap.
///
/// Removal offers the candidates to `is_target` in the same order as the other indexes, but
/// finds them by an overlap query, so it costs O(log n + entries overlapping `[start, last]`).
/// At most `2^63` inserts over the index's lifetime and `u32::MAX - 1` live entries.
pub struct IsetIndex<V> {
    map: iset::IntervalMap<u128, V>,
    next_seq: u64,
}

impl<V: fmt::Debug> fmt::Debug for IsetIndex<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IsetIndex")
            .field("len", &self.map.len())
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl<V> Default for IsetIndex<V> {
    fn default() -> Self {
        IsetIndex {
            map: iset::IntervalMap::default(),
            next_seq: 0,
        }
    }
}

impl<V> IsetIndex<V> {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    fn key(addr: u64, seq: u64) -> u128 {
        (u128::from(addr) << ISET_SEQ_BITS) | u128::from(seq)
    }

    /// The exclusive end key of an interval whose inclusive last address is `last`.
    fn end_key(last: u64) -> u128 {
        (u128::from(last) + 1) << ISET_SEQ_BITS
    }
}

impl<V: Send> IntervalIndex<V> for IsetIndex<V> {
    fn insert(&mut self, start: u64, last: u64, value: V) {
        debug_assert!(start <= last);
        let seq = self.next_seq;
        assert!(seq < 1 << ISET_SEQ_BITS, "sequence numbers exhausted");
        self.next_seq += 1;
        self.map
            .force_insert(Self::key(start, seq)..Self::end_key(last), value);
    }

    fn remove(
        &mut self,
        start: u64,
        last: u64,
        is_target: &mut dyn FnMut(&V) -> bool,
    ) -> Option<V> {
        let lowest = Self::key(start, 0);
        let end = Self::end_key(last);
        let mut found = None;
        for (range, value) in self.map.iter(lowest..end) {
            if range.start >> ISET_SEQ_BITS > u128::from(start) {
                break;
            }
            if range.start >= lowest && range.end == end && is_target(value) {
                found = Some(range);
                break;
            }
        }
        self.map.remove(found?)
    }

    fn for_each_overlap(&self, start: u64, last: u64, visit: &mut dyn FnMut(&V)) {
        if start > last {
            // `iset` panics on an empty query range.
            return;
        }
        for value in self.map.values(Self::key(start, 0)..Self::end_key(last)) {
            visit(value);
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Most items (entries in a leaf, children in an inner node) one [`BTreeIndex`] node holds.
const B_MAX: usize = 16;
/// Fewest items of a node other than the root; a node that drops below is refilled from or
/// merged with a sibling.
const B_MIN: usize = B_MAX / 2;

/// One entry of a [`BTreeIndex`] leaf.
#[derive(Debug)]
struct BEntry<V> {
    start: u64,
    last: u64,
    /// Insertion sequence number; `(start, seq)` is the search key.
    seq: u64,
    value: V,
}

/// What an inner node knows about one child: the child's smallest key and largest `last`.
#[derive(Clone, Copy, Debug)]
struct BChild {
    start: u64,
    seq: u64,
    max_last: u64,
    node: u32,
}

/// An arena slot of a [`BTreeIndex`].
#[derive(Debug)]
enum BNode<V> {
    Leaf(Vec<BEntry<V>>),
    Inner(Vec<BChild>),
    Free { next: u32 },
}

/// A B-tree of intervals: up to 16 entries per leaf and 16 children per inner node, each child
/// summarised in its parent by its smallest key and largest `last`, so a query reads a few
/// contiguous cache lines per level instead of one node per level of a binary tree.
///
/// Ordering, duplicates and visiting order are those of [`AugmentedTree`] (key
/// `(start, insertion sequence)`); the walk skips a child whose `max_last` is below the query
/// and stops at the first child whose smallest `start` is beyond it. Every node but the root
/// holds between 8 and 16 items, so the tree has at most `1 + log8(n)` levels. Insert and
/// remove are O(16 · log n); a query visits its hits in order without allocating.
///
/// # Invariants
///
/// Checked by [`BTreeIndex::assert_invariants`]:
///
/// 1. *Search order.* Walking the leaves left to right yields strictly increasing keys.
/// 2. *Summaries.* Every inner node's record of a child holds the child's smallest key and the
///    largest `last` below it.
/// 3. *Fill.* Every node holds at most 16 items; every node but the root at least 8; the root,
///    if inner, at least 2; an empty tree has no root.
/// 4. *Balance.* All leaves are at the same depth.
/// 5. *Arena accounting.* Every slot is reachable exactly once or on the free list exactly
///    once; `len` is the number of entries.
pub struct BTreeIndex<V> {
    nodes: Vec<BNode<V>>,
    free: u32,
    root: u32,
    len: usize,
    next_seq: u64,
}

impl<V> Default for BTreeIndex<V> {
    fn default() -> Self {
        BTreeIndex {
            nodes: Vec::new(),
            free: NIL,
            root: NIL,
            len: 0,
            next_seq: 0,
        }
    }
}

impl<V: fmt::Debug> fmt::Debug for BTreeIndex<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BTreeIndex")
            .field("len", &self.len)
            .field("height", &self.height())
            .finish_non_exhaustive()
    }
}

impl<V> BTreeIndex<V> {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of levels: 0 when empty, 1 for a single leaf.
    pub fn height(&self) -> usize {
        let mut height = 0;
        let mut at = self.root;
        while at != NIL {
            height += 1;
            at = match &self.nodes[at as usize] {
                BNode::Inner(children) => children[0].node,
                _ => NIL,
            };
        }
        height
    }

    /// Checks every invariant listed on the type, panicking with a description of the first
    /// violation. O(n); meant for tests.
    pub fn assert_invariants(&self) {
        let mut prev = None;
        let mut seen_nodes = 0usize;
        let mut entries = 0usize;
        let mut leaf_depth = None;
        if self.root != NIL {
            if let BNode::Inner(children) = &self.nodes[self.root as usize] {
                assert!(children.len() >= 2, "an inner root with one child");
            }
            self.check_node(
                self.root,
                true,
                0,
                &mut leaf_depth,
                &mut prev,
                &mut seen_nodes,
                &mut entries,
            );
        }
        assert_eq!(entries, self.len, "len does not match the entries");
        let mut free = 0usize;
        let mut at = self.free;
        while at != NIL {
            match &self.nodes[at as usize] {
                BNode::Free { next } => at = *next,
                _ => panic!("slot {at} is on the free list but in use"),
            }
            free += 1;
            assert!(free <= self.nodes.len(), "the free list has a cycle");
        }
        assert_eq!(
            seen_nodes + free,
            self.nodes.len(),
            "some slot is neither reachable nor free"
        );
    }

    /// Returns the summary of the subtree, checking it on the way.
    #[allow(clippy::too_many_arguments)]
    fn check_node(
        &self,
        id: u32,
        is_root: bool,
        depth: usize,
        leaf_depth: &mut Option<usize>,
        prev: &mut Option<(u64, u64)>,
        seen_nodes: &mut usize,
        entries: &mut usize,
    ) -> BChild {
        *seen_nodes += 1;
        assert!(*seen_nodes <= self.nodes.len(), "a node is reachable twice");
        match &self.nodes[id as usize] {
            BNode::Free { .. } => panic!("free slot {id} is linked into the tree"),
            BNode::Leaf(es) => {
                assert!(es.len() <= B_MAX, "leaf {id} overfull");
                assert!(is_root || es.len() >= B_MIN, "leaf {id} underfull");
                assert!(!es.is_empty(), "empty leaf {id}");
                match leaf_depth {
                    None => *leaf_depth = Some(depth),
                    Some(d) => assert_eq!(*d, depth, "leaves at different depths"),
                }
                for e in es {
                    assert!(e.start <= e.last, "entry with start > last");
                    assert!(e.seq < self.next_seq, "future sequence number");
                    let key = (e.start, e.seq);
                    if let Some(p) = *prev {
                        assert!(p < key, "keys out of order: {p:?} before {key:?}");
                    }
                    *prev = Some(key);
                    *entries += 1;
                }
                self.summary(id)
            }
            BNode::Inner(children) => {
                assert!(children.len() <= B_MAX, "inner node {id} overfull");
                assert!(is_root || children.len() >= B_MIN, "inner {id} underfull");
                for c in children {
                    let real = self.check_node(
                        c.node,
                        false,
                        depth + 1,
                        leaf_depth,
                        prev,
                        seen_nodes,
                        entries,
                    );
                    assert_eq!(
                        (c.start, c.seq, c.max_last),
                        (real.start, real.seq, real.max_last),
                        "stale summary of node {} in {id}",
                        c.node
                    );
                }
                self.summary(id)
            }
        }
    }

    /// The record a parent keeps of node `id` (which is not empty).
    fn summary(&self, id: u32) -> BChild {
        match &self.nodes[id as usize] {
            BNode::Leaf(es) => BChild {
                start: es[0].start,
                seq: es[0].seq,
                max_last: es.iter().map(|e| e.last).max().unwrap_or(0),
                node: id,
            },
            BNode::Inner(cs) => BChild {
                start: cs[0].start,
                seq: cs[0].seq,
                max_last: cs.iter().map(|c| c.max_last).max().unwrap_or(0),
                node: id,
            },
            BNode::Free { .. } => unreachable!("a free slot is linked into the tree"),
        }
    }

    fn alloc(&mut self, node: BNode<V>) -> u32 {
        if self.free != NIL {
            let id = self.free;
            let BNode::Free { next } = std::mem::replace(&mut self.nodes[id as usize], node) else {
                unreachable!("the free list holds only free slots")
            };
            self.free = next;
            id
        } else {
            let id = u32::try_from(self.nodes.len())
                .ok()
                .filter(|&id| id != NIL)
                .expect("BTreeIndex arena full");
            self.nodes.push(node);
            id
        }
    }

    fn release(&mut self, id: u32) -> BNode<V> {
        let node = std::mem::replace(
            &mut self.nodes[id as usize],
            BNode::Free { next: self.free },
        );
        self.free = id;
        node
    }

    /// Inserts into the subtree `id`; returns the new right sibling if `id` split.
    fn insert_into(&mut self, id: u32, entry: BEntry<V>) -> Option<u32> {
        let (start, seq, last) = (entry.start, entry.seq, entry.last);
        let child_at = match &mut self.nodes[id as usize] {
            BNode::Leaf(es) => {
                // The new entry has the largest sequence number: it goes after every equal start.
                let at = es.partition_point(|e| e.start <= start);
                es.insert(at, entry);
                if es.len() <= B_MAX {
                    return None;
                }
                let right = es.split_off(es.len() / 2);
                return Some(self.alloc(BNode::Leaf(right)));
            }
            BNode::Inner(cs) => {
                let at = cs.partition_point(|c| c.start <= start).saturating_sub(1);
                let c = &mut cs[at];
                // The entry joins child `at`: keep its summary right on the way down.
                if (start, seq) < (c.start, c.seq) {
                    (c.start, c.seq) = (start, seq);
                }
                c.max_last = c.max_last.max(last);
                at
            }
            BNode::Free { .. } => unreachable!("a free slot is linked into the tree"),
        };
        let child = match &self.nodes[id as usize] {
            BNode::Inner(cs) => cs[child_at].node,
            _ => unreachable!(),
        };
        let split = self.insert_into(child, entry)?;
        let left_summary = self.summary(child);
        let right_summary = self.summary(split);
        let BNode::Inner(cs) = &mut self.nodes[id as usize] else {
            unreachable!()
        };
        cs[child_at] = left_summary;
        cs.insert(child_at + 1, right_summary);
        if cs.len() <= B_MAX {
            return None;
        }
        let right = cs.split_off(cs.len() / 2);
        Some(self.alloc(BNode::Inner(right)))
    }

    /// Removes from the subtree `id` the first entry, in key order, with these bounds that
    /// `is_target` accepts.
    fn remove_from(
        &mut self,
        id: u32,
        start: u64,
        last: u64,
        is_target: &mut dyn FnMut(&V) -> bool,
    ) -> Option<V> {
        let children = match &mut self.nodes[id as usize] {
            BNode::Leaf(es) => {
                let mut found = None;
                for (j, e) in es.iter().enumerate() {
                    if e.start > start {
                        break;
                    }
                    if e.start == start && e.last == last && is_target(&e.value) {
                        found = Some(j);
                        break;
                    }
                }
                return found.map(|j| es.remove(j).value);
            }
            BNode::Inner(cs) => cs.len(),
            BNode::Free { .. } => unreachable!("a free slot is linked into the tree"),
        };
        for i in 0..children {
            let (c, next_start) = match &self.nodes[id as usize] {
                BNode::Inner(cs) => (cs[i], cs.get(i + 1).map(|n| n.start)),
                _ => unreachable!(),
            };
            if c.start > start {
                break;
            }
            // Child `i` holds only keys below its right neighbour's smallest one.
            if next_start.is_some_and(|n| n < start) || c.max_last < last {
                continue;
            }
            if let Some(value) = self.remove_from(c.node, start, last, is_target) {
                self.refill(id, i);
                return Some(value);
            }
        }
        None
    }

    fn items(&self, id: u32) -> usize {
        match &self.nodes[id as usize] {
            BNode::Leaf(es) => es.len(),
            BNode::Inner(cs) => cs.len(),
            BNode::Free { .. } => unreachable!("a free slot is linked into the tree"),
        }
    }

    /// After a removal below child `i` of `parent`: refreshes its summary and, if it fell below
    /// [`B_MIN`], merges it with a sibling or evens the two out.
    fn refill(&mut self, parent: u32, i: usize) {
        let (n, child) = match &self.nodes[parent as usize] {
            BNode::Inner(cs) => (cs.len(), cs[i].node),
            _ => unreachable!(),
        };
        if self.items(child) >= B_MIN || n == 1 {
            let s = self.summary(child);
            if let BNode::Inner(cs) = &mut self.nodes[parent as usize] {
                cs[i] = s;
            }
            return;
        }
        let (li, ri) = if i > 0 { (i - 1, i) } else { (0, 1) };
        let (left, right) = match &self.nodes[parent as usize] {
            BNode::Inner(cs) => (cs[li].node, cs[ri].node),
            _ => unreachable!(),
        };
        let total = self.items(left) + self.items(right);
        let right_node =
            std::mem::replace(&mut self.nodes[right as usize], BNode::Free { next: NIL });
        let merged = match (&mut self.nodes[left as usize], right_node) {
            (BNode::Leaf(l), BNode::Leaf(mut r)) => {
                l.append(&mut r);
                if total <= B_MAX {
                    None
                } else {
                    Some(BNode::Leaf(l.split_off(total / 2)))
                }
            }
            (BNode::Inner(l), BNode::Inner(mut r)) => {
                l.append(&mut r);
                if total <= B_MAX {
                    None
                } else {
                    Some(BNode::Inner(l.split_off(total / 2)))
                }
            }
            _ => unreachable!("siblings are at the same depth"),
        };
        let left_summary = self.summary(left);
        match merged {
            Some(node) => {
                self.nodes[right as usize] = node;
                let right_summary = self.summary(right);
                if let BNode::Inner(cs) = &mut self.nodes[parent as usize] {
                    cs[li] = left_summary;
                    cs[ri] = right_summary;
                }
            }
            None => {
                // The slot already holds a placeholder: put it on the free list.
                self.release(right);
                if let BNode::Inner(cs) = &mut self.nodes[parent as usize] {
                    cs[li] = left_summary;
                    cs.remove(ri);
                }
            }
        }
    }

    fn visit(&self, id: u32, start: u64, last: u64, visit: &mut dyn FnMut(&V)) {
        match &self.nodes[id as usize] {
            BNode::Leaf(es) => {
                for e in es {
                    if e.start > last {
                        break;
                    }
                    if e.last >= start {
                        visit(&e.value);
                    }
                }
            }
            BNode::Inner(cs) => {
                for c in cs {
                    if c.start > last {
                        break;
                    }
                    if c.max_last >= start {
                        self.visit(c.node, start, last, visit);
                    }
                }
            }
            BNode::Free { .. } => unreachable!("a free slot is linked into the tree"),
        }
    }
}

impl<V: Send> IntervalIndex<V> for BTreeIndex<V> {
    fn insert(&mut self, start: u64, last: u64, value: V) {
        debug_assert!(start <= last);
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = BEntry {
            start,
            last,
            seq,
            value,
        };
        self.len += 1;
        if self.root == NIL {
            let mut leaf = Vec::with_capacity(B_MAX + 1);
            leaf.push(entry);
            self.root = self.alloc(BNode::Leaf(leaf));
            return;
        }
        if let Some(right) = self.insert_into(self.root, entry) {
            let mut children = Vec::with_capacity(B_MAX + 1);
            children.push(self.summary(self.root));
            children.push(self.summary(right));
            self.root = self.alloc(BNode::Inner(children));
        }
    }

    fn remove(
        &mut self,
        start: u64,
        last: u64,
        is_target: &mut dyn FnMut(&V) -> bool,
    ) -> Option<V> {
        if self.root == NIL {
            return None;
        }
        let value = self.remove_from(self.root, start, last, is_target)?;
        self.len -= 1;
        match &self.nodes[self.root as usize] {
            BNode::Inner(cs) if cs.len() == 1 => {
                let only = cs[0].node;
                self.release(self.root);
                self.root = only;
            }
            BNode::Leaf(es) if es.is_empty() => {
                self.release(self.root);
                self.root = NIL;
            }
            _ => {}
        }
        Some(value)
    }

    fn for_each_overlap(&self, start: u64, last: u64, visit: &mut dyn FnMut(&V)) {
        if self.root != NIL {
            self.visit(self.root, start, last, visit);
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}
