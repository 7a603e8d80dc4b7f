//! One test per row of docs/UFFD.md's operation table, on real memory: the operation is
//! performed on a watched, mirrored region; the test checks the invalidations delivered and
//! that the mirror is coherent with the real mapping afterwards (judged by
//! /proc/self/pagemap: PFNs as root, page-content fingerprints otherwise). Blind spots are
//! shown twice: without the wrapper (a documented miss: no event, the mirror is stale) and
//! through it (covered).
//!
//! All tests share the process's one watcher; each works on memory of its own, so they do not
//! interfere.

#![allow(clippy::disallowed_types)]

mod common;

use mmnotify::Range;
use std::ffi::c_void;
use std::time::Duration;

use common::*;
use mmnotify::Event;
use mmnotify_uffd::pagemap::Frame;
use mmnotify_uffd::Watcher;

fn watcher() -> Watcher {
    Watcher::get().expect("a watcher (this machine has userfaultfd)")
}

/// The events of `r`'s mirror that overlap `[s, e)`.
fn events_in(r: &Region, s: u64, e: u64) -> Vec<(u64, u64, Event)> {
    r.mirror
        .events()
        .into_iter()
        .filter(|(a, b, _)| *a < e && s < *b)
        .collect()
}

#[test]
fn munmap_whole_region_delivers_unmap_and_empties_the_mirror() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(8) as u64, 8);
    // SAFETY: the test owns the region.
    assert_eq!(unsafe { libc::munmap(r.ptr(), r.len()) }, 0);
    r.sync(&w);
    let ev = events_in(&r, r.addr, r.addr + r.len() as u64);
    assert!(
        ev.contains(&(r.addr, r.addr + r.len() as u64, Event::Unmap)),
        "{ev:?}"
    );
    assert_eq!(r.mirror.len(), 0);
    assert!(r.mirror.incoherent().is_empty());
}

#[test]
fn munmap_of_a_middle_subrange_invalidates_exactly_it() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(8) as u64, 8);
    let mid = r.addr + 2 * ps() as u64;
    // SAFETY: the test owns the region.
    assert_eq!(unsafe { libc::munmap(mid as *mut c_void, 3 * ps()) }, 0);
    r.sync(&w);
    let ev = r.mirror.events();
    assert!(
        ev.contains(&(mid, mid + 3 * ps() as u64, Event::Unmap)),
        "{ev:?}"
    );
    assert_eq!(r.mirror.len(), 5);
    assert!(r.mirror.incoherent().is_empty());
    // The rest is still watched: a later munmap of the tail is delivered too.
    let tail = r.addr + 5 * ps() as u64;
    // SAFETY: the test owns the region.
    assert_eq!(unsafe { libc::munmap(tail as *mut c_void, 3 * ps()) }, 0);
    r.sync(&w);
    assert_eq!(r.mirror.len(), 2);
    assert!(r.mirror.incoherent().is_empty());
}

/// A page of `r` by index.
fn page(r: &Region, i: usize) -> u64 {
    r.addr + (i * ps()) as u64
}

fn has(r: &Region, s: u64, e: u64, ev: Event) -> bool {
    r.mirror.events().contains(&(s, e, ev))
}

#[test]
fn raw_syscall_munmap_is_seen() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(4) as u64, 4);
    // SAFETY: the test owns the region; a raw system call that no libc hook could see.
    let rc = unsafe { libc::syscall(libc::SYS_munmap, r.addr, r.len()) };
    assert_eq!(rc, 0);
    r.sync(&w);
    assert!(
        has(&r, r.addr, page(&r, 4), Event::Unmap),
        "{:?}",
        r.mirror.events()
    );
    assert_eq!(r.mirror.len(), 0);
}

#[test]
fn munmap_from_another_thread_is_seen() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(4) as u64, 4);
    let (a, l) = (r.addr as usize, r.len());
    // SAFETY: the test owns the region.
    std::thread::spawn(move || assert_eq!(unsafe { libc::munmap(a as *mut c_void, l) }, 0))
        .join()
        .unwrap();
    r.sync(&w);
    assert!(has(&r, r.addr, page(&r, 4), Event::Unmap));
    assert_eq!(r.mirror.len(), 0);
    assert!(r.mirror.incoherent().is_empty());
}

fn madvise_case(advice: i32) {
    let w = watcher();
    let r = mirror_region(&w, map_anon(6) as u64, 6);
    assert_eq!(
        // SAFETY: the test owns the region; its contents may become zero.
        unsafe { libc::madvise(page(&r, 1) as *mut c_void, 2 * ps(), advice) },
        0
    );
    r.sync(&w);
    assert!(
        has(&r, page(&r, 1), page(&r, 3), Event::Clear),
        "advice {advice}: {:?}",
        r.mirror.events()
    );
    assert_eq!(r.mirror.len(), 4);
    assert!(r.mirror.incoherent().is_empty());
    // Refill: the mirror follows the new pages.
    assert!(r.mirror.fill(&r.iv, r.addr, 6));
    assert!(r.mirror.incoherent().is_empty());
}

#[test]
fn madv_dontneed_delivers_clear() {
    let _serial = serial();
    madvise_case(libc::MADV_DONTNEED);
}

#[test]
fn madv_dontneed_locked_delivers_clear() {
    let _serial = serial();
    madvise_case(24); // MADV_DONTNEED_LOCKED
}

#[test]
fn madv_free_delivers_clear() {
    let _serial = serial();
    madvise_case(libc::MADV_FREE);
}

fn memfd(pages: usize) -> i32 {
    // SAFETY: creating a file descriptor.
    let fd = unsafe { libc::memfd_create(c"mmnotify-uffd-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: sizing our own memfd.
    assert_eq!(unsafe { libc::ftruncate(fd, (pages * ps()) as i64) }, 0);
    fd
}

#[test]
fn madv_remove_on_memfd_delivers_clear() {
    let _serial = serial();
    let w = watcher();
    let fd = memfd(4);
    let p = map_with(4, libc::MAP_SHARED, fd, 0);
    let r = mirror_region(&w, p as u64, 4);
    assert_eq!(
        // SAFETY: the test owns the mapping.
        unsafe { libc::madvise(page(&r, 0) as *mut c_void, 2 * ps(), libc::MADV_REMOVE) },
        0
    );
    r.sync(&w);
    assert!(
        has(&r, page(&r, 0), page(&r, 2), Event::Clear),
        "{:?}",
        r.mirror.events()
    );
    assert!(r.mirror.incoherent().is_empty());
    // SAFETY: closing our memfd.
    unsafe { libc::close(fd) };
}

#[test]
fn madv_remove_on_anonymous_private_fails_and_sends_nothing() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    assert_ne!(
        // SAFETY: the call fails (EINVAL) and changes nothing.
        unsafe { libc::madvise(r.ptr(), r.len(), libc::MADV_REMOVE) },
        0
    );
    r.sync(&w);
    assert!(r.mirror.events().is_empty());
    assert!(r.mirror.incoherent().is_empty());
}

#[test]
fn madv_free_on_memfd_delivers_clear_then_fails() {
    let _serial = serial();
    let w = watcher();
    let fd = memfd(2);
    let p = map_with(2, libc::MAP_SHARED, fd, 0);
    let r = mirror_region(&w, p as u64, 2);
    // SAFETY: the test owns the mapping.
    let rc = unsafe { libc::madvise(r.ptr(), r.len(), libc::MADV_FREE) };
    assert_ne!(rc, 0, "MADV_FREE on shmem fails with EINVAL");
    r.sync(&w);
    assert!(
        has(&r, r.addr, page(&r, 2), Event::Clear),
        "{:?}",
        r.mirror.events()
    );
    assert!(r.mirror.incoherent().is_empty());
    // SAFETY: closing our memfd.
    unsafe { libc::close(fd) };
}

#[test]
fn pageout_cold_willneed_send_nothing_and_stay_coherent() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(4) as u64, 4);
    for advice in [libc::MADV_PAGEOUT, libc::MADV_COLD, libc::MADV_WILLNEED] {
        // SAFETY: advice that keeps the data.
        assert_eq!(unsafe { libc::madvise(r.ptr(), r.len(), advice) }, 0);
    }
    r.sync(&w);
    assert!(r.mirror.events().is_empty(), "{:?}", r.mirror.events());
    // No swap on this machine kind: anonymous pages cannot be paged out, so frames stay.
    assert!(
        r.mirror.incoherent().is_empty(),
        "{:?}",
        r.mirror.incoherent()
    );
}

#[test]
fn mremap_shrink_unmaps_the_tail() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(6) as u64, 6);
    // SAFETY: shrinking our own mapping in place.
    let p = unsafe { libc::mremap(r.ptr(), r.len(), 2 * ps(), 0) };
    assert_eq!(p, r.ptr());
    r.sync(&w);
    assert!(
        has(&r, page(&r, 2), page(&r, 6), Event::Unmap),
        "{:?}",
        r.mirror.events()
    );
    assert_eq!(r.mirror.len(), 2);
    assert!(r.mirror.incoherent().is_empty());
}

#[test]
fn mremap_move_remaps_and_the_registration_follows() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(4) as u64, 4);
    let remaps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = remaps.clone();
    w.on_remap(move |m| seen.lock().unwrap().push(m));
    // An unwatched reservation of ours is the target: MREMAP_FIXED replaces it (and never
    // anybody else's mapping, as a freed spot could be taken meanwhile).
    let hole = map_anon(8);
    let target = hole as u64 + 2 * ps() as u64;
    // SAFETY: moving our own mapping over our own reservation.
    let p = unsafe {
        libc::mremap(
            r.ptr(),
            r.len(),
            r.len(),
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target as *mut c_void,
        )
    };
    assert_eq!(p as u64, target);
    r.sync(&w);
    let ev = r.mirror.events();
    assert!(ev.contains(&(r.addr, page(&r, 4), Event::Unmap)), "{ev:?}");
    let moves = remaps.lock().unwrap().clone();
    assert!(
        moves.contains(&mmnotify_uffd::Remap {
            from: r.addr,
            to: target,
            len: r.len() as u64
        }),
        "{moves:?}"
    );
    assert_eq!(r.mirror.len(), 0);
    // The moved memory is still registered: mirror it, then unmap it.
    let before = w.stats().unmaps;
    let moved = {
        let mirror = std::sync::Arc::new(Mirror::default());
        let iv = w
            .insert_interval(
                Range::from_len(target, r.len() as u64).unwrap(),
                mirror.clone(),
            )
            .unwrap();
        assert!(mirror.fill(&iv, target, 4));
        Region {
            addr: target,
            pages: 4,
            mirror,
            iv,
        }
    };
    // SAFETY: the test owns the moved mapping.
    assert_eq!(unsafe { libc::munmap(moved.ptr(), moved.len()) }, 0);
    moved.sync(&w);
    assert!(w.stats().unmaps > before);
    assert!(has(&moved, target, target + r.len() as u64, Event::Unmap));
    assert_eq!(moved.mirror.len(), 0);
}

#[test]
fn mremap_fixed_onto_a_watched_target_invalidates_both() {
    let _serial = serial();
    let w = watcher();
    let src = mirror_region(&w, map_anon(2) as u64, 2);
    let dst = mirror_region(&w, map_anon(2) as u64, 2);
    // SAFETY: moving our own mapping over our own mapping.
    let p = unsafe {
        libc::mremap(
            src.ptr(),
            src.len(),
            src.len(),
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst.ptr(),
        )
    };
    assert_eq!(p, dst.ptr());
    src.sync(&w);
    assert!(
        has(&dst, dst.addr, page(&dst, 2), Event::Unmap),
        "{:?}",
        dst.mirror.events()
    );
    assert!(
        has(&src, src.addr, page(&src, 2), Event::Unmap),
        "{:?}",
        src.mirror.events()
    );
    assert_eq!(src.mirror.len() + dst.mirror.len(), 0);
    // The target now holds the source's pages, registered: refill and check.
    assert!(dst.mirror.fill(&dst.iv, dst.addr, 2));
    assert!(dst.mirror.incoherent().is_empty());
}

#[test]
fn mremap_dontunmap_remaps_and_the_old_range_reads_zero() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    // SAFETY: moving our own mapping; the old range stays mapped, empty.
    let p = unsafe {
        libc::mremap(
            r.ptr(),
            r.len(),
            r.len(),
            libc::MREMAP_MAYMOVE | 4, /* MREMAP_DONTUNMAP */
            std::ptr::null_mut::<c_void>(),
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    r.sync(&w);
    assert!(
        has(&r, r.addr, page(&r, 2), Event::Unmap),
        "{:?}",
        r.mirror.events()
    );
    assert_eq!(r.mirror.len(), 0);
    assert!(r.mirror.fill(&r.iv, r.addr, 2));
    assert!(r.mirror.incoherent().is_empty());
    // SAFETY: releasing the moved copy.
    unsafe { libc::munmap(p, r.len()) };
}

#[test]
fn mremap_growing_in_place_sends_nothing() {
    let _serial = serial();
    let w = watcher();
    let base = map_anon(8);
    // SAFETY: keep the first 4 pages, free the next 4 so the mapping can grow in place.
    unsafe { libc::munmap(base.add(4 * ps()) as *mut c_void, 4 * ps()) };
    let r = mirror_region(&w, base as u64, 4);
    // SAFETY: growing our own mapping in place (no MAYMOVE).
    let p = unsafe { libc::mremap(r.ptr(), r.len(), 8 * ps(), 0) };
    if p == libc::MAP_FAILED {
        eprintln!("another mapping took the space after the region; nothing to test");
        return;
    }
    r.sync(&w);
    assert!(r.mirror.events().is_empty(), "{:?}", r.mirror.events());
    assert!(r.mirror.incoherent().is_empty());
    // SAFETY: releasing it.
    unsafe { libc::munmap(p, 8 * ps()) };
}

#[test]
fn map_fixed_over_live_memory_unmaps_and_the_new_mapping_must_be_rewatched() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(4) as u64, 4);
    let p = map_with(
        2,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
        -1,
        page(&r, 1) as usize,
    );
    assert_eq!(p as u64, page(&r, 1));
    r.sync(&w);
    assert!(
        has(&r, page(&r, 1), page(&r, 3), Event::Unmap),
        "{:?}",
        r.mirror.events()
    );
    assert_eq!(r.mirror.len(), 2);
    assert!(r.mirror.incoherent().is_empty());
    // The new VMA is not registered: an munmap of it now would go unseen. Re-watch it.
    let report = w.watch(page(&r, 1), 2 * ps() as u64).unwrap();
    assert_eq!(report.newly_watched(), 1, "{report:?}");
    assert!(r.mirror.fill(&r.iv, r.addr, 4));
    r.mirror.clear_events();
    assert_eq!(
        // SAFETY: the test owns the region.
        unsafe { libc::munmap(page(&r, 1) as *mut c_void, 2 * ps()) },
        0
    );
    r.sync(&w);
    assert!(has(&r, page(&r, 1), page(&r, 3), Event::Unmap));
    assert!(r.mirror.incoherent().is_empty());
}

#[test]
fn process_madvise_on_self_delivers_clear() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(4) as u64, 4);
    // SAFETY: pidfd of ourselves, then process_madvise(DONTNEED) on our own region.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) as i32;
        assert!(pidfd >= 0);
        let iov = libc::iovec {
            iov_base: r.ptr(),
            iov_len: r.len(),
        };
        let n = libc::syscall(
            libc::SYS_process_madvise,
            pidfd,
            &iov as *const libc::iovec,
            1usize,
            libc::MADV_DONTNEED,
            0u32,
        );
        libc::close(pidfd);
        if n < 0 {
            eprintln!(
                "process_madvise refused: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
    }
    r.sync(&w);
    assert!(
        has(&r, r.addr, page(&r, 4), Event::Clear),
        "{:?}",
        r.mirror.events()
    );
    assert_eq!(r.mirror.len(), 0);
}

#[test]
fn mprotect_sends_nothing_and_split_pieces_stay_watched() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(4) as u64, 4);
    assert_eq!(
        // SAFETY: read-only on the middle pages; the test only reads them afterwards.
        unsafe { libc::mprotect(page(&r, 1) as *mut c_void, 2 * ps(), libc::PROT_READ) },
        0
    );
    r.sync(&w);
    assert!(r.mirror.events().is_empty());
    assert!(r.mirror.incoherent().is_empty());
    // SAFETY: the test owns the region.
    assert_eq!(unsafe { libc::munmap(page(&r, 1) as *mut c_void, ps()) }, 0);
    r.sync(&w);
    assert!(has(&r, page(&r, 1), page(&r, 2), Event::Unmap));
    assert_eq!(r.mirror.len(), 3);
}

// --- cooperative wrappers ---------------------------------------------------------------

/// An interval subscriber that records, at callback time, whether the first page of its
/// range was still present: a pre-notification sees the memory still mapped.
#[derive(Default)]
struct PreCheck {
    seen_present: std::sync::Mutex<Vec<bool>>,
    watch: u64,
}

impl mmnotify::IntervalSubscriber for PreCheck {
    fn invalidate(
        &self,
        ctx: &mmnotify::IntervalCtx<'_>,
        _inv: &mmnotify::Invalidation,
    ) -> mmnotify::Invalidate {
        ctx.set_seq();
        let present = mmnotify_uffd::pagemap::entry(self.watch).unwrap().present();
        self.seen_present.lock().unwrap().push(present);
        mmnotify::Invalidate::Done
    }
}

#[test]
fn wrapper_munmap_notifies_before_the_unmap_and_the_later_event_is_harmless() {
    let _serial = serial();
    let w = watcher();
    let p = map_anon(4) as u64;
    let _ = w.watch(p, 4 * ps() as u64).unwrap();
    let pre = std::sync::Arc::new(PreCheck {
        watch: p,
        ..Default::default()
    });
    let iv = w
        .insert_interval(Range::from_len(p, 4 * ps() as u64).unwrap(), pre.clone())
        .unwrap();
    // An interval inserted while another invalidation is open (other tests share the watcher)
    // joins the index when that epoch closes; read_begin waits for it.
    let _ = iv.read_begin().unwrap();
    let before = w.stats().unmaps;
    // SAFETY: the test owns the region.
    unsafe { w.munmap(p as *mut c_void, 4 * ps()) }.unwrap();
    w.synchronize(Duration::from_secs(10)).unwrap();
    let seen = pre.seen_present.lock().unwrap().clone();
    // First the wrapper's start (memory still there), then the uffd UNMAP (gone).
    assert_eq!(seen, vec![true, false], "{seen:?}");
    assert!(w.stats().unmaps > before);
}

#[test]
fn wrapper_madvise_and_mremap_keep_the_mirror_coherent() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(4) as u64, 4);
    // SAFETY: the test owns the region.
    unsafe { w.madvise(r.ptr(), 2 * ps(), libc::MADV_DONTNEED) }.unwrap();
    r.sync(&w);
    assert_eq!(r.mirror.len(), 2);
    assert!(r.mirror.incoherent().is_empty());
    // SAFETY: moving our own region anywhere.
    let q = unsafe {
        w.mremap(
            r.ptr(),
            r.len(),
            r.len(),
            libc::MREMAP_MAYMOVE,
            std::ptr::null_mut(),
        )
    }
    .unwrap();
    r.sync(&w);
    assert_eq!(r.mirror.len(), 0);
    // SAFETY: releasing the moved mapping.
    unsafe { w.munmap(q, r.len()) }.unwrap();
}

fn shm_attach(pages: usize) -> (i32, *mut c_void) {
    // SAFETY: a private SysV segment, attached and marked for removal at once.
    unsafe {
        let id = libc::shmget(libc::IPC_PRIVATE, pages * ps(), libc::IPC_CREAT | 0o600);
        assert!(id >= 0);
        let p = libc::shmat(id, std::ptr::null(), 0);
        assert_ne!(p as isize, -1);
        libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        stamp_all(p as *mut u8, pages);
        (id, p)
    }
}

#[test]
fn blind_spot_shmdt_without_the_wrapper_is_a_documented_miss() {
    let _serial = serial();
    let w = watcher();
    let (_, p) = shm_attach(2);
    let r = mirror_region(&w, p as u64, 2);
    // SAFETY: detaching our own attach.
    assert_eq!(unsafe { libc::shmdt(p) }, 0);
    r.sync(&w);
    // No event: the mirror still holds two entries for memory that is gone.
    assert!(r.mirror.events().is_empty(), "{:?}", r.mirror.events());
    assert_eq!(r.mirror.len(), 2);
    let stale = r.mirror.incoherent();
    assert_eq!(stale.len(), 2, "the miss is visible: {stale:?}");
    assert!(stale.iter().all(|(_, _, now)| *now == Frame::NotPresent));
}

#[test]
fn blind_spot_shmdt_through_the_wrapper_is_covered() {
    let _serial = serial();
    let w = watcher();
    let (_, p) = shm_attach(2);
    let r = mirror_region(&w, p as u64, 2);
    // SAFETY: detaching our own attach.
    unsafe { w.shmdt(p) }.unwrap();
    r.sync(&w);
    assert!(
        has(&r, r.addr, page(&r, 2), Event::Unmap),
        "{:?}",
        r.mirror.events()
    );
    assert_eq!(r.mirror.len(), 0);
    assert!(r.mirror.incoherent().is_empty());
}

#[test]
fn blind_spot_punch_hole_without_and_with_the_wrapper() {
    let _serial = serial();
    use std::os::fd::BorrowedFd;
    let w = watcher();
    let fd = memfd(4);
    let p = map_with(4, libc::MAP_SHARED, fd, 0);
    let r = mirror_region(&w, p as u64, 4);
    // Without the wrapper: no event, pages 0-1 of the mirror are stale.
    // SAFETY: punching our own memfd.
    let rc = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            2 * ps() as i64,
        )
    };
    assert_eq!(rc, 0);
    r.sync(&w);
    assert!(r.mirror.events().is_empty());
    assert_eq!(r.mirror.incoherent().len(), 2, "the documented miss");
    // Through the wrapper: covered.
    assert!(r.mirror.fill(&r.iv, r.addr, 4));
    // SAFETY: the fd is ours for the call.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    // SAFETY: nothing holds references into the hole.
    unsafe { w.punch_hole(bfd, 2 * ps() as u64, 2 * ps() as u64) }.unwrap();
    r.sync(&w);
    assert!(
        has(&r, page(&r, 2), page(&r, 4), Event::Clear),
        "{:?}",
        r.mirror.events()
    );
    assert!(
        r.mirror.incoherent().is_empty(),
        "{:?}",
        r.mirror.incoherent()
    );
    // SAFETY: closing our memfd and mapping.
    unsafe {
        libc::munmap(r.ptr(), r.len());
        libc::close(fd);
    }
}

#[test]
fn blind_spot_ftruncate_without_and_with_the_wrapper() {
    let _serial = serial();
    use std::os::fd::BorrowedFd;
    let w = watcher();
    let fd = memfd(4);
    let p = map_with(4, libc::MAP_SHARED, fd, 0);
    let r = mirror_region(&w, p as u64, 4);
    // SAFETY: shrinking our own memfd; the test never touches the truncated pages.
    assert_eq!(unsafe { libc::ftruncate(fd, 3 * ps() as i64) }, 0);
    r.sync(&w);
    assert!(r.mirror.events().is_empty());
    assert_eq!(r.mirror.incoherent().len(), 1, "the documented miss");
    // SAFETY: growing it back.
    assert_eq!(unsafe { libc::ftruncate(fd, 4 * ps() as i64) }, 0);
    assert!(r.mirror.fill(&r.iv, r.addr, 4));
    // SAFETY: the fd is ours for the call.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    // SAFETY: nothing holds references past the new end.
    unsafe { w.ftruncate(bfd, ps() as u64) }.unwrap();
    r.sync(&w);
    assert!(
        has(&r, page(&r, 1), page(&r, 4), Event::Unmap),
        "{:?}",
        r.mirror.events()
    );
    assert!(
        r.mirror.incoherent().is_empty(),
        "{:?}",
        r.mirror.incoherent()
    );
    // SAFETY: closing our memfd and mapping.
    unsafe {
        libc::munmap(r.ptr(), r.len());
        libc::close(fd);
    }
}

#[test]
fn blind_spot_madv_remove_through_another_mapping_is_a_documented_miss() {
    let _serial = serial();
    let w = watcher();
    let fd = memfd(2);
    let watched = map_with(2, libc::MAP_SHARED, fd, 0);
    let other = map_with(2, libc::MAP_SHARED, fd, 0);
    let r = mirror_region(&w, watched as u64, 2);
    assert_eq!(
        // SAFETY: punching through the unwatched alias.
        unsafe { libc::madvise(other as *mut c_void, 2 * ps(), libc::MADV_REMOVE) },
        0
    );
    r.sync(&w);
    assert!(r.mirror.events().is_empty());
    assert_eq!(r.mirror.incoherent().len(), 2, "the documented miss");
    // SAFETY: cleanup.
    unsafe {
        libc::munmap(other as *mut c_void, 2 * ps());
        libc::munmap(r.ptr(), r.len());
        libc::close(fd);
    }
}

#[test]
fn blind_spot_guard_pages_without_and_with_the_wrapper() {
    let _serial = serial();
    const MADV_GUARD_INSTALL: i32 = 102;
    let w = watcher();
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    // SAFETY: installing a guard on our own page (its contents are dropped).
    let rc = unsafe { libc::madvise(r.ptr(), ps(), MADV_GUARD_INSTALL) };
    if rc != 0 {
        eprintln!("MADV_GUARD_INSTALL unsupported here");
        return;
    }
    r.sync(&w);
    assert!(r.mirror.events().is_empty());
    assert_eq!(r.mirror.incoherent().len(), 1, "the documented miss");
    // SAFETY: through the wrapper, on the second page.
    unsafe { w.madvise(page(&r, 1) as *mut c_void, ps(), MADV_GUARD_INSTALL) }.unwrap();
    r.sync(&w);
    assert!(has(&r, page(&r, 1), page(&r, 2), Event::Clear));
    assert_eq!(
        r.mirror.len(),
        1,
        "only the page guarded without the wrapper is left"
    );
}

#[test]
fn blind_spot_shm_remap_over_watched_memory_is_a_documented_miss() {
    let _serial = serial();
    let w = watcher();
    let r = mirror_region(&w, map_anon(2) as u64, 2);
    // SAFETY: a private segment attached over our own region with SHM_REMAP.
    let p = unsafe {
        let id = libc::shmget(libc::IPC_PRIVATE, 2 * ps(), libc::IPC_CREAT | 0o600);
        assert!(id >= 0);
        let p = libc::shmat(id, r.ptr(), libc::SHM_REMAP);
        libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        p
    };
    assert_eq!(p, r.ptr(), "{}", std::io::Error::last_os_error());
    stamp_all(p as *mut u8, 2);
    r.sync(&w);
    assert!(r.mirror.events().is_empty(), "{:?}", r.mirror.events());
    assert_eq!(r.mirror.incoherent().len(), 2, "the documented miss");
    // The new attach is not registered: watching it again covers it from now on.
    assert_eq!(w.watch(r.addr, r.len() as u64).unwrap().newly_watched(), 1);
    // SAFETY: detaching through the wrapper.
    unsafe { w.shmdt(p) }.unwrap();
    r.sync(&w);
    assert_eq!(r.mirror.len(), 0);
}

#[test]
fn blind_spot_copy_on_write_after_fork_is_a_documented_miss() {
    let _serial = serial();
    if !mmnotify_uffd::pagemap::pfns_visible() {
        eprintln!("needs visible PFNs (root): a content judge cannot tell a copy from the page");
        return;
    }
    let w = watcher();
    let r = mirror_region(&w, map_anon(1) as u64, 1);
    let mut fds = [0i32; 2];
    // SAFETY: a pipe to hold the child until the parent has written.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only blocks on the pipe and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut b = [0u8; 1];
        // SAFETY: async-signal-safe calls only.
        unsafe {
            libc::close(fds[1]);
            libc::read(fds[0], b.as_mut_ptr() as *mut c_void, 1);
            libc::_exit(0);
        }
    }
    // The parent writes: the page is shared with the child, so the write copies it.
    // SAFETY: the parent's own page.
    unsafe { std::ptr::write_volatile(r.addr as *mut u64, 0xC0FFEE) };
    r.sync(&w);
    let stale = r.mirror.incoherent();
    // SAFETY: releasing and reaping the child.
    unsafe {
        libc::close(fds[1]);
        libc::close(fds[0]);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
    assert!(r.mirror.events().is_empty(), "{:?}", r.mirror.events());
    assert_eq!(
        stale.len(),
        1,
        "the documented miss: the frame changed, no event"
    );
}

/// A classic subscriber that logs starts and ends.
#[derive(Default)]
struct Classic {
    log: std::sync::Mutex<Vec<(&'static str, u64, u64, Event)>>,
    watch: (u64, u64),
}

impl mmnotify::Subscriber for Classic {
    fn capabilities(&self) -> mmnotify::Capabilities {
        mmnotify::Capabilities::new().with_start().with_end()
    }
    fn invalidate_range_start(
        &self,
        inv: &mmnotify::Invalidation,
    ) -> Result<(), mmnotify::Refused> {
        let r = inv.range();
        if r.start() < self.watch.1 && self.watch.0 < r.end() {
            self.log
                .lock()
                .unwrap()
                .push(("start", r.start(), r.end(), inv.event()));
        }
        Ok(())
    }
    fn invalidate_range_end(&self, inv: &mmnotify::Invalidation) {
        let r = inv.range();
        if r.start() < self.watch.1 && self.watch.0 < r.end() {
            self.log
                .lock()
                .unwrap()
                .push(("end", r.start(), r.end(), inv.event()));
        }
    }
}

#[test]
fn classic_subscribers_get_paired_start_and_end() {
    let _serial = serial();
    let w = watcher();
    let p = map_anon(4) as u64;
    let end = p + 4 * ps() as u64;
    let _ = w.watch(p, 4 * ps() as u64).unwrap();
    let sub = std::sync::Arc::new(Classic {
        watch: (p, end),
        ..Default::default()
    });
    let id = w.mm().register(sub.clone()).unwrap();
    // SAFETY: the test owns the region.
    unsafe {
        assert_eq!(
            libc::madvise(p as *mut c_void, ps(), libc::MADV_DONTNEED),
            0
        );
        assert_eq!(libc::munmap(p as *mut c_void, 4 * ps()), 0);
    }
    w.synchronize(Duration::from_secs(10)).unwrap();
    let log = sub.log.lock().unwrap().clone();
    let q = p + ps() as u64;
    assert_eq!(
        log,
        vec![
            ("start", p, q, Event::Clear),
            ("end", p, q, Event::Clear),
            ("start", p, end, Event::Unmap),
            ("end", p, end, Event::Unmap),
        ]
    );
    w.mm().unregister(id).unwrap();
}
