//! Acceptance on real memory: bad input (zero length, overflow, unmapped memory, holes,
//! access the registrar refuses, a full io_uring table, the vdso) gives typed errors and leaves
//! the cache consistent with nothing leaked (regions and io_uring slots accounted for at
//! drop); memory the watcher is blind to (SysV shm, file mappings) is never a stale hit
//! for a user who does not know the wrappers (issue 10 item 6), under both policies.

#![allow(
    clippy::disallowed_types,
    reason = "test code: std::sync is fine outside the engine (see clippy.toml)"
)]

mod common;

use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;

use mmnotify_rcache::{
    Access, BlindReason, BlindSpotPolicy, Cache, Config, Error, EventSource, FrameError,
    FrameRegistrar, UringError, UringRegistrar,
};
use mmnotify_uffd::Watcher;

fn ps() -> u64 {
    mmnotify_rcache::page_size()
}

fn map(pages: u64, prot: i32, flags: i32, fd: i32) -> u64 {
    // SAFETY: a fresh mapping where the kernel chooses.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (pages * ps()) as usize,
            prot,
            flags,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as u64
}

fn anon(pages: u64) -> u64 {
    let a = map(
        pages,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    );
    for i in 0..pages {
        // SAFETY: our fresh read-write mapping.
        unsafe { std::ptr::write_volatile((a + i * ps()) as *mut u64, i + 1) };
    }
    a
}

fn unmap(addr: u64, pages: u64) {
    // SAFETY: memory the test mapped and nothing refers to.
    unsafe { libc::munmap(addr as *mut c_void, (pages * ps()) as usize) };
}

fn uring_cache(slots: u32, config: Config) -> (Arc<UringRegistrar>, Cache<Arc<UringRegistrar>>) {
    let reg = Arc::new(UringRegistrar::new(slots).unwrap());
    let cache = Cache::new(
        reg.clone(),
        EventSource::Watcher(Watcher::get().unwrap()),
        config,
    );
    (reg, cache)
}

#[test]
fn bad_input_and_refusals_are_typed_and_leak_nothing() {
    let _serial = common::serial();
    common::bounded(Duration::from_secs(60), || {
        let (reg, cache) = uring_cache(4, Config::default().merge(false));
        let a = anon(4);
        assert!(matches!(
            cache.get(a, 0, Access::READ),
            Err(Error::EmptyRange { .. })
        ));
        assert!(matches!(
            cache.get(u64::MAX - ps(), 2 * ps(), Access::READ),
            Err(Error::RangeOverflow { .. })
        ));
        // Unmapped memory, and a hole in the middle.
        let gone = anon(2);
        unmap(gone, 2);
        let e = cache.get(gone, 2 * ps(), Access::READ).unwrap_err();
        assert!(matches!(e, Error::Unmapped { .. }), "{e}");
        unmap(a + ps(), 1);
        let e = cache.get(a, 4 * ps(), Access::READ).unwrap_err();
        match &e {
            Error::Unmapped { hole, .. } => assert_eq!(hole.start(), a + ps(), "{e}"),
            e => panic!("{e}"),
        }
        // Read-only memory: io_uring pins for writing and the kernel refuses (EFAULT).
        let ro = map(
            2,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        );
        let e = cache.get(ro, 2 * ps(), Access::READ).unwrap_err();
        match &e {
            Error::Registrar { source, .. } => {
                assert!(
                    matches!(
                        source.downcast_ref::<UringError>(),
                        Some(UringError::Register { .. })
                    ),
                    "{e}"
                );
            }
            e => panic!("{e}"),
        }
        // A full slot table: typed, and the cache still works once a slot is free.
        let b = anon(16);
        let held: Vec<_> = (0..4)
            .map(|i| cache.get(b + i * 2 * ps(), ps(), Access::READ).unwrap())
            .collect();
        let e = cache.get(b + 10 * ps(), ps(), Access::READ).unwrap_err();
        match &e {
            Error::Registrar { source, .. } => assert!(
                matches!(
                    source.downcast_ref::<UringError>(),
                    Some(UringError::TableFull { slots: 4 })
                ),
                "{e}"
            ),
            e => panic!("{e}"),
        }
        drop(held);
        cache.purge();
        drop(cache.get(b + 10 * ps(), ps(), Access::READ).unwrap());
        let s = cache.stats();
        assert_eq!(s.registrar_errors, 2, "{s}");
        assert_eq!(reg.books().live, 1);
        drop(cache);
        let books = reg.books();
        assert_eq!((books.live, books.double_releases), (0, 0), "{books:?}");
        assert_eq!(books.registered, books.released);
        unmap(a, 4);
        unmap(ro, 2);
        unmap(b, 16);
    });
}

#[test]
fn the_frame_registrar_refuses_write_access_to_read_only_memory() {
    let _serial = common::serial();
    common::bounded(Duration::from_secs(30), || {
        let frames = Arc::new(FrameRegistrar::new());
        let cache = Cache::new(
            frames.clone(),
            EventSource::Watcher(Watcher::get().unwrap()),
            Config::default(),
        );
        let ro = map(
            2,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        );
        let e = cache.get(ro, ps(), Access::WRITE).unwrap_err();
        match &e {
            Error::Registrar { source, .. } => assert!(
                matches!(
                    source.downcast_ref::<FrameError>(),
                    Some(FrameError::AccessRefused { .. })
                ),
                "{e}"
            ),
            e => panic!("{e}"),
        }
        // Reading is allowed, and cached.
        drop(cache.get(ro, ps(), Access::READ).unwrap());
        drop(cache.get(ro, ps(), Access::READ).unwrap());
        assert_eq!(cache.stats().hits, 1);
        drop(cache);
        assert_eq!(frames.books().live, 0);
        assert_eq!(frames.books().unknown_deregistrations, 0);
        unmap(ro, 2);
    });
}

#[test]
fn the_vdso_is_refused_or_registered_uncached_never_cached() {
    let _serial = common::serial();
    common::bounded(Duration::from_secs(30), || {
        let vmas = mmnotify_uffd::maps::read_self_maps().unwrap();
        let Some(vdso) = vmas.iter().find(|v| v.name == "[vdso]") else {
            return;
        };
        let (reg, cache) = uring_cache(2, Config::default());
        match cache.get(vdso.start, ps(), Access::READ) {
            Ok(g) => assert!(
                !g.is_cached(),
                "the vdso cannot be watched, so never cached"
            ),
            Err(Error::Registrar { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
        drop(cache);
        assert_eq!(reg.books().live, 0);
    });
}

fn shm_attach(at: Option<u64>, pages: u64) -> u64 {
    // SAFETY: a private segment, attached where the kernel chooses or over an address the
    // test just detached; removed at once (it lives while attached).
    unsafe {
        let id = libc::shmget(
            libc::IPC_PRIVATE,
            (pages * ps()) as usize,
            libc::IPC_CREAT | 0o600,
        );
        assert!(id >= 0);
        let p = libc::shmat(id, at.map_or(std::ptr::null(), |a| a as *const c_void), 0);
        libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        assert_ne!(p as isize, -1, "shmat: {}", std::io::Error::last_os_error());
        std::ptr::write_volatile(p as *mut u64, 0xabc);
        p as u64
    }
}

#[test]
fn blind_memory_is_never_a_stale_hit_without_wrappers() {
    let _serial = common::serial();
    common::bounded(Duration::from_secs(60), || {
        // Uncached (the default): SysV shm and a shared memfd mapping are registered per use.
        let (reg, cache) = uring_cache(8, Config::default());
        let shm = shm_attach(None, 2);
        let g = cache.get(shm, 2 * ps(), Access::READ_WRITE).unwrap();
        assert!(!g.is_cached());
        assert!(
            matches!(g.blind_reason(), Some(BlindReason::SysvShm { .. })),
            "{g:?}"
        );
        drop(g);
        // SAFETY: detaching the test's own attachment (a plain shmdt: no event).
        unsafe { libc::shmdt(shm as *const c_void) };
        let again = shm_attach(Some(shm), 2);
        assert_eq!(again, shm);
        let g = cache.get(shm, 2 * ps(), Access::READ_WRITE).unwrap();
        assert!(!g.is_cached());
        drop(g);
        // SAFETY: a new memfd the test owns.
        let fd = unsafe { libc::memfd_create(c"blind".as_ptr(), 0) };
        // SAFETY: sizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, (2 * ps()) as i64) }, 0);
        let m = map(2, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd);
        let g = cache.get(m, ps(), Access::READ).unwrap();
        assert!(
            matches!(g.blind_reason(), Some(BlindReason::SharedFile { .. })),
            "{g:?}"
        );
        drop(g);
        let s = cache.stats();
        assert_eq!((s.blind_uncached, s.hits, s.regions), (3, 0, 0), "{s}");
        drop(cache);
        assert_eq!(reg.books().live, 0);

        // ValidateFrames (possible with CAP_SYS_ADMIN): cached, validated at every hit, and a
        // plain hole punch makes the next get miss.
        if mmnotify_uffd::pagemap::pfns_visible() {
            let (reg, cache) = uring_cache(
                8,
                Config::default().blind_spots(BlindSpotPolicy::ValidateFrames),
            );
            // SAFETY: populating our own shared mapping.
            unsafe { std::ptr::write_volatile(m as *mut u64, 1) };
            drop(cache.get(m, ps(), Access::READ).unwrap());
            drop(cache.get(m, ps(), Access::READ).unwrap());
            // SAFETY: punching our own memfd, then writing new contents (new pages).
            unsafe {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                assert_eq!(libc::fallocate(fd, mode, 0, (2 * ps()) as i64), 0);
                std::ptr::write_volatile(m as *mut u64, 2);
            }
            let g = cache.get(m, ps(), Access::READ).unwrap();
            assert!(g.is_cached());
            drop(g);
            let s = cache.stats();
            assert_eq!(
                (
                    s.hits,
                    s.misses,
                    s.blind_validated_hits,
                    s.blind_validation_failures
                ),
                (1, 2, 1, 1),
                "{s}"
            );
            drop(cache);
            assert_eq!(reg.books().live, 0);
        }
        unmap(m, 2);
        // SAFETY: closing and detaching the test's own objects.
        unsafe {
            libc::close(fd);
            libc::shmdt(shm as *const c_void);
        }
    });
}

#[test]
fn a_shut_down_watcher_fails_closed_and_the_cache_still_releases_everything() {
    let _serial = common::serial();
    common::bounded(Duration::from_secs(30), || {
        // A watcher of this test's own (the process-wide one is shut down and re-created).
        let watcher = Watcher::get().unwrap();
        let reg = Arc::new(UringRegistrar::new(4).unwrap());
        let cache = Cache::new(
            reg.clone(),
            EventSource::Watcher(watcher.clone()),
            Config::default(),
        );
        let a = anon(2);
        drop(cache.get(a, ps(), Access::READ).unwrap());
        drop(cache.get(a, ps(), Access::READ).unwrap());
        assert_eq!(cache.stats().hits, 1);
        watcher.shutdown();
        // Nobody vouches for the registration any more: no hit, a typed error.
        let e = cache.get(a, ps(), Access::READ).unwrap_err();
        assert!(matches!(e, Error::Watcher(_)), "{e}");
        let e = cache.get(a + ps(), ps(), Access::READ).unwrap_err();
        assert!(matches!(e, Error::Watcher(_)), "{e}");
        drop(cache);
        assert_eq!(reg.books().live, 0);
        unmap(a, 2);
    });
}

#[test]
fn a_private_file_mapping_is_blind_because_truncation_unmaps_even_its_copies() {
    let _serial = common::serial();
    common::bounded(Duration::from_secs(30), || {
        // SAFETY: a new memfd the test owns, sized to two pages.
        let fd = unsafe { libc::memfd_create(c"private".as_ptr(), 0) };
        // SAFETY: sizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, (2 * ps()) as i64) }, 0);
        let m = map(2, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE, fd);
        // SAFETY: our own private mapping: the write copies the page.
        unsafe { std::ptr::write_volatile(m as *mut u64, 1) };
        let (reg, cache) = uring_cache(4, Config::default());
        let g = cache.get(m, ps(), Access::READ_WRITE).unwrap();
        assert!(!g.is_cached());
        assert!(
            matches!(g.blind_reason(), Some(BlindReason::PrivateFile { .. })),
            "{g:?}"
        );
        drop(g);
        drop(cache);
        if mmnotify_uffd::pagemap::pfns_visible() {
            // Frame-validated: truncating the file away and back (no event) makes the next
            // get miss, although the copied page was private.
            let (reg2, cache) = uring_cache(
                4,
                Config::default().blind_spots(BlindSpotPolicy::ValidateFrames),
            );
            drop(cache.get(m, ps(), Access::READ_WRITE).unwrap());
            // SAFETY: truncating and re-growing our own memfd, then writing our own mapping.
            unsafe {
                assert_eq!(libc::ftruncate(fd, 0), 0);
                assert_eq!(libc::ftruncate(fd, (2 * ps()) as i64), 0);
                std::ptr::write_volatile(m as *mut u64, 2);
            }
            drop(cache.get(m, ps(), Access::READ_WRITE).unwrap());
            let s = cache.stats();
            assert_eq!((s.hits, s.blind_validation_failures), (0, 1), "{s}");
            drop(cache);
            assert_eq!(reg2.books().live, 0);
        }
        assert_eq!(reg.books().live, 0);
        unmap(m, 2);
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(fd) };
    });
}

/// A registrar that, once armed, replaces the first page's frame right after the inner
/// registrar pinned it: a hole punch in the backing memfd and a refault (a new frame with new
/// contents), as a concurrent thread could do between registration and the frame snapshot.
struct PunchAfterPinning {
    inner: Arc<UringRegistrar>,
    fd: i32,
    armed: std::sync::atomic::AtomicBool,
}

impl mmnotify_rcache::Registrar for PunchAfterPinning {
    type Handle = <UringRegistrar as mmnotify_rcache::Registrar>::Handle;

    fn register(
        &self,
        range: mmnotify_rcache::PageRange,
        access: Access,
    ) -> Result<Self::Handle, mmnotify_rcache::RegistrarError> {
        let h = self.inner.register(range, access)?;
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: punching our own memfd, then writing our own shared mapping of it (the
            // write faults in a fresh frame).
            unsafe {
                assert_eq!(
                    libc::fallocate(
                        self.fd,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        0,
                        ps() as i64
                    ),
                    0
                );
                std::ptr::write_bytes(range.start() as *mut u8, 0x22, ps() as usize);
            }
        }
        Ok(h)
    }

    fn deregister(&self, handle: &Self::Handle) {
        self.inner.deregister(handle)
    }
}

#[test]
fn validated_frames_are_the_pinned_ones_even_if_replaced_during_registration() {
    let _serial = common::serial();
    if !mmnotify_uffd::pagemap::pfns_visible() {
        println!("skipped: page frame numbers are hidden from this process (no CAP_SYS_ADMIN)");
        return;
    }
    common::bounded(Duration::from_secs(30), || {
        // SAFETY: a new memfd the test owns, sized to one page.
        let fd = unsafe { libc::memfd_create(c"punch".as_ptr(), 0) };
        // SAFETY: sizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, ps() as i64) }, 0);
        let m = map(1, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd);
        // SAFETY: our own shared mapping: faults in frame X with 0x11.
        unsafe { std::ptr::write_bytes(m as *mut u8, 0x11, ps() as usize) };
        let uring = Arc::new(UringRegistrar::new(4).unwrap());
        let cache = Cache::new(
            PunchAfterPinning {
                inner: uring.clone(),
                fd,
                armed: std::sync::atomic::AtomicBool::new(true),
            },
            EventSource::Watcher(Watcher::get().unwrap()),
            Config::default().blind_spots(BlindSpotPolicy::ValidateFrames),
        );
        // The first registration pinned X while Y (0x22) replaced it: it must not be cached
        // under Y's frame number.
        drop(cache.get(m, ps(), Access::READ).unwrap());
        // SAFETY: a new memfd the test owns.
        let sink = unsafe { libc::memfd_create(c"sink".as_ptr(), 0) };
        let g = cache.get(m, ps(), Access::READ).unwrap();
        let n = uring
            .write_fixed(g.handle(), m, ps() as u32, sink, 0)
            .unwrap();
        assert_eq!(n as u64, ps());
        let mut back = vec![0u8; ps() as usize];
        // SAFETY: reads into our own buffer of one page.
        let r = unsafe { libc::pread(sink, back.as_mut_ptr().cast(), back.len(), 0) };
        assert_eq!(r as u64, ps());
        let s = cache.stats();
        assert!(
            back.iter().all(|b| *b == 0x22),
            "the second get ({s}) wrote the replaced frame's bytes {:#x}, not the mapped 0x22",
            back[0]
        );
        drop(g);
        drop(cache);
        assert_eq!(uring.books().live, 0);
        unmap(m, 1);
        // SAFETY: closing our own descriptors.
        unsafe {
            libc::close(sink);
            libc::close(fd);
        }
    });
}
