//! Fidelity to Linux where the simulator used to differ (issue 13, items 1–5), asserted as a
//! KVM guest (or a device) would observe it: the words it loads, and whether an access exits
//! to the fault path.
//!
//! * Partial ranges: `madvise(MADV_DONTNEED)` over a hole drops every mapped piece and fails
//!   with ENOMEM; `mprotect` over a hole changes the part before the hole and fails; `munmap`
//!   over holes succeeds; `migrate` and `reclaim` do what Linux does before failing.
//! * `MAP_FIXED` replaces live memory in one step; `MAP_FIXED_NOREPLACE` refuses.
//! * The zero page: read faults map it read-only; the first write copies it under `Clear`.
//! * Shared anonymous memory is one object across fork.
//! * Device migrations: a mirror ignores the invalidation of its own migration; migration to
//!   device memory takes anonymous pages only (no page-cache page: file or shmem).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{range, Recorder};
use mmnotify::{Event, Owner, Policy};
use mmnotify_sim::{
    oracle, Access, Backing, FileId, FrameId, GuestAccess, HmmMirror, KvmLike, Prot, SecondaryMmu,
    Sharing, SimError, SimMm, PAGE_SIZE,
};

const P: u64 = PAGE_SIZE;
const T: Duration = Duration::from_millis(200);

/// A simulated process with a recording subscriber and a KVM-like guest.
fn setup() -> (SimMm, Arc<Recorder>, Arc<KvmLike>) {
    let sim = SimMm::new(Policy::Exact);
    let rec = Recorder::new();
    sim.register("rec", rec.clone()).unwrap();
    let kvm = KvmLike::attach(&sim, "kvm", T).unwrap();
    (sim, rec, kvm)
}

/// `[base, base + 2P)` and `[base + 3P, base + 5P)`, private anonymous read-write, with a
/// one-page hole between them; every page holds a distinct word stored by the host and is
/// mapped writable in the guest.
fn two_pieces_with_a_hole(sim: &SimMm, kvm: &KvmLike) -> u64 {
    let base = 0x2000_0000;
    for start in [base, base + 3 * P] {
        sim.mmap(
            Some(start),
            2 * P,
            Prot::READ_WRITE,
            Backing::Anonymous,
            Sharing::Private,
        )
        .unwrap();
    }
    let host = sim.task("host");
    for (i, page) in [0, 1, 3, 4].into_iter().enumerate() {
        host.store(base + page * P, 100 + i as u64).unwrap();
    }
    for page in [0, 1, 3, 4] {
        let seen = kvm.guest_store(sim, base + page * P, 200 + page).unwrap();
        assert_eq!(seen, GuestAccess::Faulted(200 + page), "first access exits");
        assert!(
            kvm.guest_write(sim, base + page * P, 300 + page),
            "now writable without an exit"
        );
    }
    base
}

fn assert_coherent(sim: &SimMm, mirrors: &[&dyn SecondaryMmu]) {
    let violations = oracle::check(sim, mirrors);
    assert!(violations.is_empty(), "{violations:?}");
}

#[test]
fn madvise_dontneed_over_a_hole_drops_every_piece_then_fails() {
    let (sim, rec, kvm) = setup();
    let base = two_pieces_with_a_hole(&sim, &kvm);
    rec.clear();

    assert_eq!(
        sim.madvise_dontneed(base, 5 * P),
        Err(SimError::Unmapped { addr: base + 2 * P }),
        "ENOMEM for the hole"
    );
    // Both pieces were dropped, each under its own Clear (zap_page_range_single per VMA).
    assert_eq!(
        rec.starts(),
        vec![
            (Event::Clear, range(base, base + 2 * P), true),
            (Event::Clear, range(base + 3 * P, base + 5 * P), true)
        ]
    );
    assert_eq!(rec.ends(), 2);
    for page in [0, 1, 3, 4] {
        let addr = base + page * P;
        assert_eq!(kvm.spte(addr), None, "the guest lost page {page}");
        assert_eq!(
            kvm.guest_load(&sim, addr).unwrap(),
            GuestAccess::Faulted(0),
            "page {page} was dropped: the guest reads zero after a fault"
        );
        assert_eq!(sim.lookup(addr).unwrap().frame, FrameId::ZERO);
        assert_eq!(sim.task("host").load(addr).unwrap(), 0);
    }
    assert_coherent(&sim, &[&*kvm]);
}

#[test]
fn mprotect_over_a_hole_changes_the_part_before_it_then_fails() {
    let (sim, rec, kvm) = setup();
    let base = two_pieces_with_a_hole(&sim, &kvm);
    rec.clear();

    assert_eq!(
        sim.mprotect(base, 5 * P, Prot::READ),
        Err(SimError::Unmapped { addr: base + 2 * P }),
        "ENOMEM for the hole"
    );
    assert_eq!(
        rec.starts(),
        vec![(Event::ProtectionVma, range(base, base + 2 * P), true)],
        "only the piece before the hole was changed"
    );
    let vmas = sim.vmas();
    assert_eq!((vmas[0].start, vmas[0].prot), (base, Prot::READ));
    assert_eq!(
        (vmas[1].start, vmas[1].prot),
        (base + 3 * P, Prot::READ_WRITE)
    );

    // Before the hole: write-protected. The guest's store exits, and KVM's write fault finds
    // a read-only mapping (the host would get EFAULT from KVM_RUN).
    for page in [0, 1] {
        let addr = base + page * P;
        assert!(
            !kvm.guest_write(&sim, addr, 7),
            "page {page}: the store exits"
        );
        assert!(matches!(
            kvm.guest_store(&sim, addr, 7),
            Err(SimError::AccessViolation {
                access: Access::Write,
                ..
            })
        ));
        assert_eq!(
            kvm.guest_load(&sim, addr).unwrap(),
            GuestAccess::Faulted(300 + page),
            "loads still see the data, after a fault"
        );
    }
    // After the hole: untouched, still writable without an exit.
    for page in [3, 4] {
        let addr = base + page * P;
        assert!(kvm.guest_write(&sim, addr, 400 + page), "page {page}");
        assert_eq!(sim.task("host").load(addr).unwrap(), 400 + page);
        assert!(sim.lookup(addr).unwrap().writable);
    }
    assert_coherent(&sim, &[&*kvm]);

    // A hole at the start changes nothing at all.
    rec.clear();
    assert_eq!(
        sim.mprotect(base + 2 * P, 3 * P, Prot::READ),
        Err(SimError::Unmapped { addr: base + 2 * P })
    );
    assert!(rec.starts().is_empty());
    assert_eq!(sim.vmas()[1].prot, Prot::READ_WRITE);
}

#[test]
fn munmap_over_a_hole_unmaps_every_piece_under_one_unmap() {
    let (sim, rec, kvm) = setup();
    let base = two_pieces_with_a_hole(&sim, &kvm);
    rec.clear();
    sim.munmap(base + P, 3 * P).unwrap();
    // unmap_vmas covers the requested range, the hole included.
    assert_eq!(
        rec.starts(),
        vec![(Event::Unmap, range(base + P, base + 4 * P), true)]
    );
    assert_eq!(kvm.guest_read(&sim, base), Some(300));
    assert_eq!(kvm.guest_read(&sim, base + P), None);
    assert_eq!(kvm.guest_read(&sim, base + 3 * P), None);
    assert_eq!(kvm.guest_read(&sim, base + 4 * P), Some(304));
    assert_coherent(&sim, &[&*kvm]);
}

#[test]
fn migrate_and_reclaim_over_a_hole_do_what_linux_does_before_failing() {
    let (sim, rec, kvm) = setup();
    let base = two_pieces_with_a_hole(&sim, &kvm);
    let before: Vec<FrameId> = [0, 1, 3, 4]
        .iter()
        .map(|p| sim.lookup(base + p * P).unwrap().frame)
        .collect();
    rec.clear();
    // Migration walks up to the hole: the first piece moves, the second does not.
    assert_eq!(
        sim.migrate(base, 5 * P, None),
        Err(SimError::Unmapped { addr: base + 2 * P })
    );
    assert_eq!(
        rec.starts(),
        vec![
            (Event::Clear, range(base, base + P), true),
            (Event::Clear, range(base + P, base + 2 * P), true)
        ],
        "one Clear per migrated page (try_to_migrate_one)"
    );
    let after: Vec<FrameId> = [0, 1, 3, 4]
        .iter()
        .map(|p| sim.lookup(base + p * P).unwrap().frame)
        .collect();
    assert_ne!(after[0], before[0]);
    assert_ne!(after[1], before[1]);
    assert_eq!(after[2..], before[2..], "after the hole: not migrated");
    // The data moved with the pages.
    assert_eq!(
        kvm.guest_load(&sim, base).unwrap(),
        GuestAccess::Faulted(300)
    );
    assert_eq!(
        kvm.guest_load(&sim, base + 3 * P).unwrap(),
        GuestAccess::Hit(303)
    );

    // Reclaim is a madvise(MADV_PAGEOUT): every mapped page is scanned, then ENOMEM. Two
    // passes without access evict everything (the first clears the accessed bits).
    sim.reclaim(base, 5 * P).unwrap_err();
    assert_eq!(
        sim.reclaim(base, 5 * P),
        Err(SimError::Unmapped { addr: base + 2 * P })
    );
    for page in [0, 1, 3, 4] {
        assert!(sim.lookup(base + page * P).is_none(), "page {page} evicted");
        assert_eq!(kvm.guest_read(&sim, base + page * P), None);
    }
    // Evicted private pages went to swap: they come back with their words.
    for page in [0, 1, 3, 4] {
        assert_eq!(
            kvm.guest_load(&sim, base + page * P).unwrap(),
            GuestAccess::Faulted(300 + page)
        );
    }
    assert_coherent(&sim, &[&*kvm]);
}

#[test]
fn mremap_onto_a_live_mapping_replaces_it() {
    let (sim, rec, kvm) = setup();
    let a = sim.mmap_anon(2 * P).unwrap();
    let b = sim.mmap_anon(2 * P).unwrap();
    let host = sim.task("host");
    host.store(a, 1).unwrap();
    host.store(b, 2).unwrap();
    assert_eq!(kvm.guest_load(&sim, b).unwrap(), GuestAccess::Faulted(2));
    rec.clear();
    assert_eq!(sim.mremap(a, P, b).unwrap(), b);
    assert_eq!(
        rec.starts(),
        vec![
            (Event::Unmap, range(b, b + P), true),
            (Event::Unmap, range(a, a + P), true)
        ],
        "MREMAP_FIXED unmaps the destination first, then moves"
    );
    assert_eq!(kvm.guest_load(&sim, b).unwrap(), GuestAccess::Faulted(1));
    assert!(sim.lookup(a).is_none());
    assert_coherent(&sim, &[&*kvm]);
}

#[test]
fn map_fixed_replaces_live_memory_in_one_step() {
    let (sim, rec, kvm) = setup();
    let a = sim.mmap_anon(4 * P).unwrap();
    let host = sim.task("host");
    for page in 0..4 {
        host.store(a + page * P, 10 + page).unwrap();
        kvm.guest_load(&sim, a + page * P).unwrap();
    }
    let live = sim.live_frames();
    rec.clear();

    // MAP_FIXED_NOREPLACE refuses and changes nothing.
    assert!(matches!(
        sim.mmap(
            Some(a + P),
            2 * P,
            Prot::READ,
            Backing::Anonymous,
            Sharing::Private
        ),
        Err(SimError::Overlap { .. })
    ));
    assert!(rec.starts().is_empty());

    // MAP_FIXED replaces: one Unmap over the new range, old pages zapped, new VMA in place.
    assert_eq!(
        sim.mmap_fixed(
            a + P,
            2 * P,
            Prot::READ,
            Backing::Anonymous,
            Sharing::Private
        )
        .unwrap(),
        a + P
    );
    assert_eq!(
        rec.starts(),
        vec![(Event::Unmap, range(a + P, a + 3 * P), true)]
    );
    assert_eq!(rec.ends(), 1);
    assert_eq!(sim.live_frames(), live - 2, "the old pages were freed");
    let vmas = sim.vmas();
    assert_eq!(vmas.len(), 3);
    assert_eq!(
        (vmas[1].start, vmas[1].end, vmas[1].prot),
        (a + P, a + 3 * P, Prot::READ)
    );
    // The guest: the replaced pages read zero (a fresh mapping) and are read-only; the others
    // keep their data without an exit.
    assert_eq!(kvm.guest_read(&sim, a + P), None);
    assert_eq!(
        kvm.guest_load(&sim, a + P).unwrap(),
        GuestAccess::Faulted(0)
    );
    assert!(!kvm.guest_write(&sim, a + P, 1));
    assert_eq!(kvm.guest_load(&sim, a).unwrap(), GuestAccess::Hit(10));
    assert_eq!(
        kvm.guest_load(&sim, a + 3 * P).unwrap(),
        GuestAccess::Hit(13)
    );
    assert_coherent(&sim, &[&*kvm]);

    // Over free space it fires nothing.
    rec.clear();
    sim.mmap_fixed(
        0x6000_0000,
        P,
        Prot::READ,
        Backing::Anonymous,
        Sharing::Private,
    )
    .unwrap();
    assert!(rec.starts().is_empty());
}

/// No task ever finds the replaced range unmapped: the replacement happens under one hold
/// of the mmap lock.
#[test]
fn map_fixed_never_exposes_a_hole() {
    let sim = Arc::new(SimMm::new(Policy::Exact));
    let a = sim.mmap_anon(2 * P).unwrap();
    let faults = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (sim, faults, stop) = (Arc::clone(&sim), Arc::clone(&faults), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                sim.fault(a + P, Access::Read)
                    .expect("the range is always mapped");
                faults.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Replace until the reader has faulted a few hundred times in between (bounded; the
    // writer yields so that the reader gets the lock on a busy machine).
    let mut replaced = 0u32;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let faults_before = faults.load(Ordering::Relaxed);
    let interleaved =
        |replaced: u32| replaced >= 100 && faults.load(Ordering::Relaxed) - faults_before >= 300;
    while !interleaved(replaced) && std::time::Instant::now() < deadline {
        std::thread::yield_now();
        let prot = if replaced % 2 == 0 {
            Prot::READ
        } else {
            Prot::READ_WRITE
        };
        sim.mmap_fixed(a, 2 * P, prot, Backing::Anonymous, Sharing::Private)
            .unwrap();
        replaced += 1;
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("the reader never saw a hole");
    assert!(
        faults.load(Ordering::Relaxed) > faults_before && replaced > 0,
        "the reader faulted while the range was being replaced"
    );
}

#[test]
fn zero_page_read_then_write() {
    let (sim, rec, kvm) = setup();
    let a = sim.mmap_anon(2 * P).unwrap();
    let hmm = HmmMirror::attach(&sim, "hmm", a, 2 * P, T).unwrap();

    // A guest read of untouched memory maps the shared zero page, read-only, everywhere.
    assert_eq!(kvm.guest_load(&sim, a).unwrap(), GuestAccess::Faulted(0));
    let pte = sim.lookup(a).unwrap();
    assert_eq!((pte.frame, pte.writable), (FrameId::ZERO, false));
    assert!(!kvm.spte(a).unwrap().writable);
    assert_eq!(sim.task("host").load(a + P).unwrap(), 0);
    assert_eq!(
        sim.lookup(a + P).unwrap().frame,
        FrameId::ZERO,
        "one zero page"
    );
    assert_eq!(sim.live_frames(), 0, "no frame allocated for reads");
    assert!(hmm.fault(&sim, a, Access::Read).unwrap().is_mapped());
    let entry = hmm.entry(a).unwrap();
    assert_eq!((entry.frame, entry.writable), (FrameId::ZERO, false));
    assert_coherent(&sim, &[&*kvm, &*hmm]);
    rec.clear();

    // The guest's first write exits; KVM's write fault copies the zero page under a Clear of
    // that one page (wp_page_copy), which also drops the device's read-only mapping.
    assert!(!kvm.guest_write(&sim, a, 5));
    assert_eq!(
        kvm.guest_store(&sim, a, 5).unwrap(),
        GuestAccess::Faulted(5)
    );
    assert_eq!(rec.starts(), vec![(Event::Clear, range(a, a + P), true)]);
    let pte = sim.lookup(a).unwrap();
    assert!(!pte.frame.is_zero_page() && pte.writable);
    assert_eq!(
        hmm.entry(a),
        None,
        "the Clear dropped the device's zero-page entry"
    );
    assert_eq!(sim.task("host").load(a).unwrap(), 5);
    assert_eq!(
        sim.task("host").load(a + P).unwrap(),
        0,
        "the other page is still zero"
    );
    assert!(kvm.guest_write(&sim, a, 6), "writable now: no exit");
    assert!(hmm.fault(&sim, a, Access::Read).unwrap().is_mapped());
    assert_eq!(sim.frame_word(hmm.entry(a).unwrap().frame), 6);
    assert_coherent(&sim, &[&*kvm, &*hmm]);

    // A device that read the zero page must fault to write: its write fault copies it.
    rec.clear();
    assert!(hmm.fault(&sim, a + P, Access::Read).unwrap().is_mapped());
    assert!(!hmm.entry(a + P).unwrap().writable);
    assert!(hmm.fault(&sim, a + P, Access::Write).unwrap().is_mapped());
    assert_eq!(
        rec.starts(),
        vec![(Event::Clear, range(a + P, a + 2 * P), true)]
    );
    let entry = hmm.entry(a + P).unwrap();
    assert!(entry.writable && !entry.frame.is_zero_page());
    assert_coherent(&sim, &[&*kvm, &*hmm]);
}

#[test]
fn shared_anonymous_page_written_by_a_forked_child_is_the_parents() {
    let (sim, _rec, kvm) = setup();
    let shared = sim
        .mmap(
            None,
            2 * P,
            Prot::READ_WRITE,
            Backing::Anonymous,
            Sharing::Shared,
        )
        .unwrap();
    let private = sim.mmap_anon(P).unwrap();
    let child = sim.fork().unwrap();
    // Untouched in the parent; first touched by the child.
    child.task("child").store(shared, 42).unwrap();
    child.task("child").store(private, 43).unwrap();
    assert_eq!(
        sim.task("parent").load(shared).unwrap(),
        42,
        "one shmem object"
    );
    assert_eq!(
        sim.lookup(shared).unwrap().frame,
        child.lookup(shared).unwrap().frame
    );
    assert_eq!(
        kvm.guest_load(&sim, shared).unwrap(),
        GuestAccess::Faulted(42)
    );
    assert_eq!(
        sim.task("parent").load(private).unwrap(),
        0,
        "private memory stays private"
    );
    // The parent's guest writes; the child sees it.
    assert!(kvm.guest_write(&sim, shared, 44));
    assert_eq!(child.task("child").load(shared).unwrap(), 44);
    // A page first touched by the parent after fork is the child's too.
    sim.task("parent").store(shared + P, 45).unwrap();
    assert_eq!(child.task("child").load(shared + P).unwrap(), 45);
    child.exit().unwrap();
    assert_eq!(sim.task("parent").load(shared).unwrap(), 44);
    assert_coherent(&sim, &[&*kvm]);
}

#[test]
fn hmm_mirror_ignores_its_own_migration_only() {
    let sim = SimMm::new(Policy::Exact);
    let rec = Recorder::new();
    sim.register("rec", rec.clone()).unwrap();
    let a = sim.mmap_anon(4 * P).unwrap();
    let own = Owner(7);
    let hmm = HmmMirror::attach_device(&sim, "hmm", a, 4 * P, own, T).unwrap();
    let other = HmmMirror::attach_device(&sim, "other", a, 4 * P, Owner(8), T).unwrap();
    for page in 0..4 {
        sim.task("host").store(a + page * P, 50 + page).unwrap();
        assert!(hmm
            .fault(&sim, a + page * P, Access::Write)
            .unwrap()
            .is_mapped());
        assert!(other
            .fault(&sim, a + page * P, Access::Read)
            .unwrap()
            .is_mapped());
    }
    let calls = |name: &str| {
        sim.subscribers()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap()
            .counts
            .interval_invalidations
    };
    let (hmm_before, other_before) = (calls("hmm"), calls("other"));
    rec.clear();

    let report = hmm.migrate_to_device(&sim, a, 4 * P).unwrap();
    assert_eq!(report.moved.len(), 4);
    assert_eq!(
        rec.starts(),
        vec![(Event::Migrate { owner: own }, range(a, a + 4 * P), true)]
    );
    // Both callbacks ran; the owner's returned without touching its table or sequence, and
    // the driver mapped the device pages itself.
    assert_eq!(calls("hmm"), hmm_before + 1);
    assert_eq!(calls("other"), other_before + 1);
    for (vpn, old, new) in &report.moved {
        let addr = mmnotify_sim::addr_of(*vpn);
        assert_eq!(hmm.entry(addr).unwrap().frame, *new, "mapped on the device");
        assert_eq!(other.entry(addr), None, "another device dropped it");
        assert_ne!(old, new);
        assert_eq!(sim.frame_word(*new), 50 + (addr - a) / P, "data moved");
    }
    assert_coherent(&sim, &[&*hmm, &*other]);

    // Someone else's migration is not ignored.
    let report = other.migrate_to_device(&sim, a, 2 * P).unwrap();
    assert_eq!(report.moved.len(), 2);
    assert_eq!(hmm.entry(a), None);
    assert_eq!(
        hmm.entry(a + 2 * P).map(|e| e.frame),
        sim.lookup(a + 2 * P).map(|p| p.frame)
    );
    assert_coherent(&sim, &[&*hmm, &*other]);

    // A mirror without device memory has nothing to migrate to.
    let plain = HmmMirror::attach(&sim, "plain", a, P, T).unwrap();
    assert!(matches!(
        plain.migrate_to_device(&sim, a, P),
        Err(SimError::NoDeviceMemory { .. })
    ));
}

#[test]
fn device_migration_takes_anonymous_pages_only() {
    let sim = SimMm::new(Policy::Exact);
    let rec = Recorder::new();
    sim.register("rec", rec.clone()).unwrap();
    let base = 0x3000_0000;
    let kinds = [
        (Backing::Anonymous, Sharing::Private),
        (Backing::Anonymous, Sharing::Shared),
        (
            Backing::File {
                file: FileId(1),
                offset: 0,
            },
            Sharing::Shared,
        ),
        (
            Backing::File {
                file: FileId(2),
                offset: 0,
            },
            Sharing::Private,
        ),
    ];
    for (i, (backing, sharing)) in kinds.into_iter().enumerate() {
        let at = base + 2 * i as u64 * P;
        sim.mmap(Some(at), 2 * P, Prot::READ_WRITE, backing, sharing)
            .unwrap();
        sim.task("t").store(at, 1).unwrap();
        sim.task("t").load(at + P).unwrap();
    }
    let before = sim.page_table();
    let report = sim.migrate(base, 8 * P, Some(Owner(3))).unwrap();
    // One Migrate per VMA (migrate_vma_collect), whatever the VMA holds.
    assert_eq!(
        rec.starts(),
        (0..4)
            .map(|i| {
                let s = base + 2 * i * P;
                (
                    Event::Migrate { owner: Owner(3) },
                    range(s, s + 2 * P),
                    true,
                )
            })
            .collect::<Vec<_>>()
    );
    let moved: Vec<u64> = report.moved.iter().map(|(vpn, _, _)| *vpn).collect();
    let private_file = base + 6 * P;
    assert_eq!(
        moved,
        vec![
            mmnotify_sim::vpn_of(base),
            mmnotify_sim::vpn_of(base + P),
            mmnotify_sim::vpn_of(private_file)
        ],
        "the private anonymous page, its zero page, and the private file mapping's \
         copy-on-write copy (an anonymous page)"
    );
    let after = sim.page_table();
    assert_eq!(
        before[2..6],
        after[2..6],
        "shared anonymous (shmem) and shared file pages stay"
    );
    assert_eq!(
        before[7], after[7],
        "the private file mapping's page-cache page stays"
    );
    assert_eq!(report.skipped.len(), 5);
    // The zero page became a device page of its own, writable as the VMA is.
    let zero_moved = sim.lookup(base + P).unwrap();
    assert!(!zero_moved.frame.is_zero_page() && zero_moved.writable);
    assert_eq!(sim.task("t").load(base).unwrap(), 1);

    // The kernel's own migration leaves the zero page alone.
    let z = sim.mmap_anon(P).unwrap();
    sim.task("t").load(z).unwrap();
    let report = sim.migrate(z, P, None).unwrap();
    assert!(report.moved.is_empty());
    assert_eq!(sim.lookup(z).unwrap().frame, FrameId::ZERO);
}
