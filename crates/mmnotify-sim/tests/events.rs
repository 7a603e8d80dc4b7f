//! Each simulated operation fires the event Linux fires for it (reference §2.3), with the
//! blockability the dispatcher sets (I2), paired with exactly one end (I4), and flushes the
//! secondary TLBs of the range (I20).

mod common;

use std::sync::Arc;

use common::{range, Call, IntervalRecorder, Recorder};
use mmnotify::{Event, Owner, Policy};
use mmnotify_sim::{Access, Backing, FileId, Prot, Sharing, SimMm, SvaLike, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

fn sim_with_recorder() -> (SimMm, Arc<Recorder>) {
    let sim = SimMm::new(Policy::Exact);
    let rec = Recorder::new();
    sim.register("rec", rec.clone()).unwrap();
    (sim, rec)
}

/// mmap maps nothing yet, so Linux fires no notifier.
#[test]
fn mmap_fires_nothing() {
    let (sim, rec) = sim_with_recorder();
    let a = sim.mmap_anon(4 * P).unwrap();
    sim.mmap(
        Some(0x7000_0000),
        P,
        Prot::READ,
        Backing::Anonymous,
        Sharing::Shared,
    )
    .unwrap();
    assert!(rec.calls().is_empty());
    assert_eq!(sim.vmas().len(), 2);
    assert_eq!(sim.vmas()[0].start, a);
}

/// munmap: one blockable Unmap over the unmapped span, one end (I2, I4); the VMA is split and
/// the pages' frames are freed.
#[test]
fn munmap_fires_unmap_over_the_span() {
    let (sim, rec) = sim_with_recorder();
    let a = sim.mmap_anon(8 * P).unwrap();
    sim.task("t").touch(a, 8 * P, Access::Write).unwrap();
    assert_eq!(sim.live_frames(), 8);
    sim.munmap(a + 2 * P, 3 * P).unwrap();
    assert_eq!(
        rec.starts(),
        vec![(Event::Unmap, range(a + 2 * P, a + 5 * P), true)]
    );
    assert_eq!(rec.ends(), 1);
    assert_eq!(sim.vmas().len(), 2, "the VMA was split in two");
    assert_eq!(sim.live_frames(), 5);
    assert!(sim.lookup(a + 2 * P).is_none());
    assert!(sim.lookup(a + 5 * P).is_some());
    // Unmapping a hole fires nothing.
    rec.clear();
    sim.munmap(a + 2 * P, P).unwrap();
    assert!(rec.calls().is_empty());
}

/// madvise(DONTNEED): Clear per VMA piece (zap_page_range_single).
#[test]
fn madvise_dontneed_fires_clear_per_vma() {
    let (sim, rec) = sim_with_recorder();
    let a = sim
        .mmap(
            Some(0x1000_0000),
            2 * P,
            Prot::READ_WRITE,
            Backing::Anonymous,
            Sharing::Private,
        )
        .unwrap();
    let b = sim
        .mmap(
            Some(0x1000_2000),
            2 * P,
            Prot::READ,
            Backing::Anonymous,
            Sharing::Private,
        )
        .unwrap();
    sim.task("t").touch(a, 2 * P, Access::Write).unwrap();
    sim.madvise_dontneed(a + P, 2 * P).unwrap();
    assert_eq!(
        rec.starts(),
        vec![
            (Event::Clear, range(a + P, a + 2 * P), true),
            (Event::Clear, range(b, b + P), true)
        ]
    );
    assert_eq!(rec.ends(), 2);
    assert!(sim.lookup(a).is_some());
    assert!(sim.lookup(a + P).is_none());
}

/// mprotect: ProtectionVma over the range when a page is populated (Linux starts lazily);
/// entries lose their write permission.
#[test]
fn mprotect_fires_protection_vma() {
    let (sim, rec) = sim_with_recorder();
    let a = sim.mmap_anon(4 * P).unwrap();
    sim.mprotect(a, 4 * P, Prot::READ).unwrap();
    assert!(rec.calls().is_empty(), "nothing populated: no event");
    sim.mprotect(a, 4 * P, Prot::READ_WRITE).unwrap();
    sim.task("t").touch(a, 2 * P, Access::Write).unwrap();
    sim.mprotect(a, 4 * P, Prot::READ).unwrap();
    assert_eq!(
        rec.starts(),
        vec![(Event::ProtectionVma, range(a, a + 4 * P), true)]
    );
    assert_eq!(rec.ends(), 1);
    assert!(!sim.lookup(a).unwrap().writable);
}

/// fork: ProtectionPage on each of the parent's populated COW (private) VMAs, none on shared
/// ones; parent and child then share the frames read-only.
#[test]
fn fork_fires_protection_page_on_cow_vmas() {
    let (sim, rec) = sim_with_recorder();
    let private = sim.mmap_anon(2 * P).unwrap();
    let shared = sim
        .mmap(
            None,
            2 * P,
            Prot::READ_WRITE,
            Backing::File {
                file: FileId(7),
                offset: 0,
            },
            Sharing::Shared,
        )
        .unwrap();
    let empty = sim.mmap_anon(P).unwrap();
    let t = sim.task("t");
    t.touch(private, 2 * P, Access::Write).unwrap();
    t.touch(shared, 2 * P, Access::Write).unwrap();
    let child = sim.fork().unwrap();
    assert_eq!(
        rec.starts(),
        vec![(Event::ProtectionPage, range(private, private + 2 * P), true)]
    );
    assert_eq!(rec.ends(), 1);
    let parent_pte = sim.lookup(private).unwrap();
    let child_pte = child.lookup(private).unwrap();
    assert!(!parent_pte.writable && !child_pte.writable);
    assert_eq!(parent_pte.frame, child_pte.frame);
    assert_eq!(sim.frame_refcount(parent_pte.frame), 2);
    assert!(
        sim.lookup(shared).unwrap().writable,
        "shared pages stay writable"
    );
    assert!(child.lookup(empty).is_none());
}

/// The COW fault: a write to a write-protected shared page copies it under a Clear of that one
/// page (wp_page_copy); once nobody else maps the frame, a write reuses it without an event.
#[test]
fn cow_fault_fires_clear_on_one_page() {
    let (sim, rec) = sim_with_recorder();
    let a = sim.mmap_anon(4 * P).unwrap();
    let t = sim.task("t");
    t.touch(a, 4 * P, Access::Write).unwrap();
    let child = sim.fork().unwrap();
    let old = sim.lookup(a + P).unwrap().frame;
    rec.clear();
    let new = t.write(a + P).unwrap();
    assert_eq!(
        rec.starts(),
        vec![(Event::Clear, range(a + P, a + 2 * P), true)]
    );
    assert_eq!(rec.ends(), 1);
    assert_ne!(new, old);
    assert_eq!(
        sim.frame_refcount(old),
        1,
        "only the child maps the old frame"
    );
    assert_eq!(child.lookup(a + P).unwrap().frame, old);
    // The child exits: the parent's remaining COW pages are exclusive, a write reuses them.
    child.exit().unwrap();
    rec.clear();
    let frame = sim.lookup(a + 2 * P).unwrap().frame;
    assert_eq!(t.write(a + 2 * P).unwrap(), frame);
    assert!(rec.calls().is_empty(), "wp_page_reuse fires nothing");
}

/// mremap: Unmap of the old range; the pages move with their frames.
#[test]
fn mremap_fires_unmap_of_the_old_range() {
    let (sim, rec) = sim_with_recorder();
    let a = sim.mmap_anon(4 * P).unwrap();
    sim.task("t").touch(a, 4 * P, Access::Write).unwrap();
    let frame = sim.lookup(a + P).unwrap().frame;
    let new = sim.mremap(a + P, 2 * P, 0x5000_0000).unwrap();
    assert_eq!(
        rec.starts(),
        vec![(Event::Unmap, range(a + P, a + 3 * P), true)]
    );
    assert_eq!(rec.ends(), 1);
    assert_eq!(new, 0x5000_0000);
    assert_eq!(sim.lookup(new).unwrap().frame, frame);
    assert!(sim.lookup(a + P).is_none());
    assert_eq!(sim.vmas().len(), 3);
}

/// Migration: one Clear per page for the kernel's own (try_to_migrate_one), one
/// Migrate { owner } over the VMA for a device's (migrate_vma_collect); new frames.
#[test]
fn migrate_fires_clear_or_migrate_with_owner() {
    let (sim, rec) = sim_with_recorder();
    let a = sim.mmap_anon(2 * P).unwrap();
    sim.task("t").touch(a, 2 * P, Access::Write).unwrap();
    let before = sim.lookup(a).unwrap().frame;
    let report = sim.migrate(a, 2 * P, None).unwrap();
    assert_eq!(report.moved.len(), 2);
    assert_ne!(sim.lookup(a).unwrap().frame, before);
    sim.migrate(a, 2 * P, Some(Owner(9))).unwrap();
    assert_eq!(
        rec.starts(),
        vec![
            (Event::Clear, range(a, a + P), true),
            (Event::Clear, range(a + P, a + 2 * P), true),
            (
                Event::Migrate { owner: Owner(9) },
                range(a, a + 2 * P),
                true
            )
        ]
    );
    assert_eq!(rec.ends(), 3);
}

/// Reclaim: every page is aged through clear_flush_young (I19); a page young in neither the
/// primary nor a secondary is evicted with its own Clear; a page a secondary reports young
/// survives.
#[test]
fn reclaim_ages_through_young_callbacks_and_clears_evicted_pages() {
    let (sim, rec) = sim_with_recorder();
    let a = sim.mmap_anon(3 * P).unwrap();
    sim.task("t").touch(a, 3 * P, Access::Write).unwrap();
    let first = sim.reclaim(a, 3 * P).unwrap();
    assert_eq!(
        first.referenced_primary.len(),
        3,
        "freshly touched pages are young"
    );
    assert!(first.evicted.is_empty());
    assert_eq!(rec.young_calls().len(), 3);
    assert!(rec.starts().is_empty());
    rec.young_vpns.lock().unwrap().insert((a + P) >> 12);
    rec.clear();
    let second = sim.reclaim(a, 3 * P).unwrap();
    assert_eq!(second.referenced_secondary, vec![(a + P) >> 12]);
    assert_eq!(second.evicted, vec![a >> 12, (a + 2 * P) >> 12]);
    assert_eq!(
        rec.starts(),
        vec![
            (Event::Clear, range(a, a + P), true),
            (Event::Clear, range(a + 2 * P, a + 3 * P), true)
        ]
    );
    assert_eq!(
        rec.young_calls(),
        vec![
            range(a, a + P),
            range(a + P, a + 2 * P),
            range(a + 2 * P, a + 3 * P)
        ]
    );
    assert!(sim.lookup(a + P).is_some());
    assert!(sim.lookup(a).is_none());
}

/// Exit: Mm::release first (classic release; the interval Release over everything, I33), then
/// one Unmap per VMA, which only the interval subscribers still see.
#[test]
fn exit_releases_then_unmaps_every_vma() {
    let (sim, rec) = sim_with_recorder();
    let a = sim.mmap_anon(2 * P).unwrap();
    let b = sim.mmap_anon(P).unwrap();
    let itv = Arc::new(IntervalRecorder::default());
    sim.insert_interval("itv", 0, 1 << 40, itv.clone()).unwrap();
    sim.task("t").touch(a, 2 * P, Access::Write).unwrap();
    sim.exit().unwrap();
    assert_eq!(rec.calls(), vec![Call::Release]);
    assert_eq!(
        itv.calls(),
        vec![
            (Event::Release, mmnotify::Range::ALL),
            (Event::Unmap, range(a, a + 2 * P)),
            (Event::Unmap, range(b, b + P))
        ]
    );
    assert!(sim.is_exited() && sim.oom_skip());
    assert!(sim.page_table().is_empty() && sim.vmas().is_empty());
    assert_eq!(sim.live_frames(), 0);
}

/// The secondary TLB is flushed wherever the primary's is: after munmap, mprotect, madvise,
/// a COW fault, mremap, migration and reclaim, the SVA TLB holds nothing for the range (I20).
#[test]
fn secondary_tlb_is_flushed_with_the_primary() {
    let sim = SimMm::new(Policy::Exact);
    let sva = SvaLike::attach(&sim, "sva").unwrap();
    let a = sim.mmap_anon(8 * P).unwrap();
    let t = sim.task("t");
    t.touch(a, 8 * P, Access::Write).unwrap();
    let fill = |n: u64| {
        for i in 0..n {
            if sim.lookup(a + i * P).is_some() {
                sva.access(&sim, a + i * P, Access::Read).unwrap();
            }
        }
    };
    fill(8);
    assert!(sva.cached(a + 7 * P).is_some());
    sim.munmap(a + 7 * P, P).unwrap();
    assert!(sva.cached(a + 7 * P).is_none());
    assert_eq!(sva.flushes().last(), Some(&range(a + 7 * P, a + 8 * P)));

    sim.mprotect(a + 6 * P, P, Prot::READ).unwrap();
    assert!(sva.cached(a + 6 * P).is_none());

    fill(7);
    sim.madvise_dontneed(a + 5 * P, P).unwrap();
    assert!(sva.cached(a + 5 * P).is_none());

    fill(7);
    let child = sim.fork().unwrap();
    assert!(
        sva.cached(a).is_none(),
        "fork's write-protect flushed the COW VMA"
    );
    fill(7);
    let old = sva.cached(a).unwrap().frame;
    t.write(a).unwrap();
    assert!(sva.cached(a).is_none(), "the COW fault flushed the page");
    let now = sva.access(&sim, a, Access::Read).unwrap();
    assert_ne!(now.frame, old);
    child.exit().unwrap();

    fill(7);
    sim.migrate(a + P, P, None).unwrap();
    assert!(sva.cached(a + P).is_none());

    fill(7);
    sim.mremap(a + 2 * P, P, 0x6000_0000).unwrap();
    assert!(sva.cached(a + 2 * P).is_none());

    fill(7);
    sim.reclaim(a + 3 * P, P).unwrap();
    sim.reclaim(a + 3 * P, P).unwrap();
    assert!(
        sim.lookup(a + 3 * P).is_none(),
        "evicted on the second pass"
    );
    assert!(sva.cached(a + 3 * P).is_none());
}
