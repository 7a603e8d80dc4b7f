//! The stale-address matrix on real memory (issue 10, item 7): for each path of the watcher's
//! operation table, plain and through the cooperative wrapper, does a registration cache ever
//! hand out a registration of memory that is no longer mapped at its address?
//!
//! Each cell runs, in this process, on fresh memory:
//!
//! ```text
//!   map memory, fill it with contents A
//!   get → put                      (the registration is cached, unless the memory is blind)
//!   the operation                  (munmap, madvise, mremap, shmdt, hole punch, ...)
//!   new memory at the same address, filled with contents B
//!   get again                      must miss, and the registration must be of the new memory:
//!     io_uring registrar:  WRITE_FIXED the whole registration to a file; the file must hold B
//!     page-frame registrar: the recorded frames must be those mapped now
//! ```
//!
//! A hit in the second `get`, or a registration that writes or records anything but the new
//! memory, is a stale hit. The CLI's `mmnotify rcache-check` prints the matrix and the tests
//! of this crate assert it.

use std::ffi::c_void;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use mmnotify_uffd::Watcher;

use crate::blind::BlindSpotPolicy;
use crate::cache::{Cache, Config};
use crate::frames::FrameRegistrar;
use crate::range::{page_size, Access};
use crate::registrar::Registrar;
use crate::source::EventSource;
use crate::uring::UringRegistrar;
use crate::{RegionGuard, Stats};

/// Pages of memory each cell maps.
const PAGES: usize = 4;

/// A path of the operation table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Path {
    /// `munmap` of the whole region, then a new mapping there.
    MunmapWhole,
    /// `munmap` of one page in the middle, then a new page there.
    MunmapPartial,
    /// `syscall(SYS_munmap)` (what libc hooks miss).
    RawSyscallMunmap,
    /// `munmap` on another thread.
    MunmapOtherThread,
    /// `madvise(MADV_DONTNEED)`, then new contents (new pages).
    DontNeed,
    /// `madvise(MADV_FREE)`, then new contents.
    Free,
    /// `madvise(MADV_REMOVE)` on a memfd mapping, then new contents.
    Remove,
    /// `mremap` moving the region away, then a new mapping at the old address.
    MremapMove,
    /// `mmap(MAP_FIXED)` over the live region.
    MapFixedOver,
    /// `sbrk(-n)` then `sbrk(+n)`: new heap pages at the same address.
    BrkShrink,
    /// `shmdt` of a SysV attachment, then another segment attached there.
    Shmdt,
    /// `fallocate(PUNCH_HOLE)` on a mapped memfd, then new contents.
    PunchHole,
    /// `ftruncate` of a mapped memfd to 0 and back, then new contents.
    Ftruncate,
}

impl Path {
    /// Every path, in table order.
    pub const ALL: [Path; 13] = [
        Path::MunmapWhole,
        Path::MunmapPartial,
        Path::RawSyscallMunmap,
        Path::MunmapOtherThread,
        Path::DontNeed,
        Path::Free,
        Path::Remove,
        Path::MremapMove,
        Path::MapFixedOver,
        Path::BrkShrink,
        Path::Shmdt,
        Path::PunchHole,
        Path::Ftruncate,
    ];

    /// Whether the watcher has a cooperative wrapper for it.
    pub fn has_wrapper(self) -> bool {
        !matches!(self, Path::MapFixedOver | Path::BrkShrink)
    }

    /// Whether userfaultfd sends an event for the plain call.
    pub fn has_event(self) -> bool {
        !matches!(self, Path::Shmdt | Path::PunchHole | Path::Ftruncate)
    }

    fn memory(self) -> Kind {
        match self {
            Path::Remove | Path::PunchHole | Path::Ftruncate => Kind::Memfd,
            Path::Shmdt => Kind::Sysv,
            Path::BrkShrink => Kind::Brk,
            _ => Kind::Anon,
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Path::MunmapWhole => "munmap whole",
            Path::MunmapPartial => "munmap partial",
            Path::RawSyscallMunmap => "syscall(SYS_munmap)",
            Path::MunmapOtherThread => "munmap, other thread",
            Path::DontNeed => "MADV_DONTNEED",
            Path::Free => "MADV_FREE",
            Path::Remove => "MADV_REMOVE (memfd)",
            Path::MremapMove => "mremap move",
            Path::MapFixedOver => "MAP_FIXED over",
            Path::BrkShrink => "brk shrink",
            Path::Shmdt => "shmdt",
            Path::PunchHole => "punch hole (memfd)",
            Path::Ftruncate => "ftruncate (memfd)",
        })
    }
}

/// How the operation is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The plain system call, as a user who never heard of mmnotify makes it.
    Plain,
    /// Through the watcher's cooperative wrapper (the plain call where there is none).
    Wrapper,
}

/// Which registrar judges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Judge {
    /// io_uring fixed buffers: what `WRITE_FIXED` writes.
    Uring,
    /// Page frames: what the registration recorded.
    Frames,
}

/// The result of one cell.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Outcome {
    /// The path.
    pub path: Path,
    /// Plain or wrapper.
    pub mode: Mode,
    /// The cache's blind-spot policy.
    pub policy: BlindSpotPolicy,
    /// The judge.
    pub judge: Judge,
    /// The first registration was cached (false: blind memory registered for one use).
    pub cached: bool,
    /// The second `get` was a hit.
    pub hit: bool,
    /// The second registration refers to the new memory (judged by the registrar).
    pub fresh: bool,
    /// The operation really changed the memory (the old registration no longer matches).
    pub changed: bool,
    /// Why the cell was skipped, if it was.
    pub skipped: Option<String>,
    /// The cell's cache statistics at the end.
    pub stats: Stats,
}

impl Outcome {
    /// A stale hit: the second get hit, or its registration is not of the new memory.
    pub fn stale(&self) -> bool {
        self.skipped.is_none() && (self.hit || !self.fresh)
    }
}

/// Runs one cell.
///
/// # Errors
///
/// A system call the scenario needs failed (the message says which), or the cache refused.
pub fn run(
    path: Path,
    mode: Mode,
    policy: BlindSpotPolicy,
    judge: Judge,
) -> Result<Outcome, String> {
    let watcher = Watcher::get().map_err(|e| e.to_string())?;
    let config = Config::default().blind_spots(policy);
    let mut out = Outcome {
        path,
        mode,
        policy,
        judge,
        cached: false,
        hit: false,
        fresh: false,
        changed: false,
        skipped: None,
        stats: Stats::default(),
    };
    match judge {
        Judge::Uring => {
            let reg = UringRegistrar::new(8).map_err(|e| e.to_string())?;
            let cache = Cache::new(reg, EventSource::Watcher(watcher.clone()), config);
            let sink = Sink::new()?;
            scenario(&cache, &watcher, &mut out, |g, mem| {
                let len = g.range().len() as u32;
                let n = cache
                    .registrar()
                    .write_fixed(g.handle(), g.range().start(), len, sink.raw(), 0)
                    .map_err(|e| e.to_string())?;
                if n != len as usize {
                    return Err(format!("WRITE_FIXED wrote {n} of {len} bytes"));
                }
                let written = sink.read(len as usize)?;
                let off = (mem.addr - g.range().start()) as usize;
                Ok(written[off..off + mem.len()].to_vec())
            })?;
        }
        Judge::Frames => {
            let cache = Cache::new(
                FrameRegistrar::new(),
                EventSource::Watcher(watcher.clone()),
                config,
            );
            scenario(&cache, &watcher, &mut out, |g, mem| {
                // The frames registrar's evidence: if every recorded frame is current, the
                // registration "sees" exactly what is mapped now.
                let current = g.handle().is_current().map_err(|e| e.to_string())?;
                Ok(if current { mem.contents() } else { Vec::new() })
            })?;
        }
    }
    Ok(out)
}

/// Runs every path under `mode` and `policy` with `judge`.
pub fn run_all(
    mode: Mode,
    policy: BlindSpotPolicy,
    judge: Judge,
) -> Vec<(Path, Result<Outcome, String>)> {
    Path::ALL
        .iter()
        .map(|p| (*p, run(*p, mode, policy, judge)))
        .collect()
}

/// The common scenario; `evidence` returns the bytes the registration stands for.
fn scenario<R: Registrar>(
    cache: &Cache<R>,
    watcher: &Watcher,
    out: &mut Outcome,
    evidence: impl Fn(&RegionGuard<'_, R>, &Mem) -> Result<Vec<u8>, String>,
) -> Result<(), String> {
    let Some(mut mem) = Mem::map(out.path.memory())? else {
        out.skipped = Some("could not set up the memory (the allocator moved the break)".into());
        return Ok(());
    };
    let seed_a = next_seed();
    mem.fill(seed_a);
    let old_contents = mem.contents();
    let old_evidence = {
        let g = cache
            .get(mem.addr, mem.len() as u64, Access::READ_WRITE)
            .map_err(|e| format!("first get: {e}"))?;
        out.cached = g.is_cached();
        evidence(&g, &mem)?
    };
    if old_evidence != old_contents {
        return Err("the first registration does not match the memory it was made of".into());
    }
    if let Some(reason) = operate(out.path, out.mode, watcher, &mut mem)? {
        out.skipped = Some(reason);
        return Ok(());
    }
    mem.fill(next_seed());
    let new_contents = mem.contents();
    let hits = cache.stats().hits;
    let g = cache
        .get(mem.addr, mem.len() as u64, Access::READ_WRITE)
        .map_err(|e| format!("second get: {e}"))?;
    out.hit = cache.stats().hits > hits;
    let seen = evidence(&g, &mem)?;
    out.fresh = seen == new_contents;
    out.changed = new_contents != old_contents;
    drop(g);
    out.stats = cache.stats();
    Ok(())
}

fn next_seed() -> u64 {
    static SEED: AtomicU64 = AtomicU64::new(0x5eed_0000);
    SEED.fetch_add(0x1_0001, Ordering::Relaxed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Anon,
    Memfd,
    Sysv,
    Brk,
}

/// Maps with `map` at the first free address of a quiet part of the address space, far below
/// where the kernel places mappings by itself: a range this scenario frees there is not taken
/// by another thread's allocation before the scenario re-maps it.
fn quiet_address(mut map: impl FnMut(u64) -> Result<(), String>) -> Result<u64, String> {
    static NEXT: AtomicU64 = AtomicU64::new(0x2000_0000_0000);
    let mut last = String::new();
    for _ in 0..64 {
        let hint = NEXT.fetch_add(1 << 20, Ordering::Relaxed);
        match map(hint) {
            Ok(()) => return Ok(hint),
            Err(e) => last = e,
        }
    }
    Err(format!(
        "no free address found for the scenario's memory: {last}"
    ))
}

/// The memory of one cell.
struct Mem {
    kind: Kind,
    addr: u64,
    fd: Option<OwnedFd>,
    brk_top: u64,
}

fn ps() -> usize {
    page_size() as usize
}

fn os(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn mmap_at(addr: u64, len: usize, flags: i32, fd: i32) -> Result<(), String> {
    // SAFETY: maps at `addr` only with MAP_FIXED_NOREPLACE (fails instead of replacing) or
    // with MAP_FIXED over memory this scenario owns.
    let p = unsafe {
        libc::mmap(
            addr as *mut c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os("mmap"));
    }
    if p as u64 != addr {
        // SAFETY: the mapping just made at another address belongs to nobody else.
        unsafe { libc::munmap(p, len) };
        return Err(format!("mmap placed the mapping at {p:?}, not {addr:#x}"));
    }
    Ok(())
}

impl Mem {
    fn len(&self) -> usize {
        PAGES * ps()
    }

    fn map(kind: Kind) -> Result<Option<Mem>, String> {
        let len = PAGES * ps();
        let mut mem = Mem {
            kind,
            addr: 0,
            fd: None,
            brk_top: 0,
        };
        match kind {
            Kind::Anon | Kind::Memfd => {
                let (flags, fd) = if kind == Kind::Memfd {
                    // SAFETY: a new memfd; the name is a valid C string.
                    let raw = unsafe { libc::memfd_create(c"rcache-check".as_ptr(), 0) };
                    if raw < 0 {
                        return Err(os("memfd_create"));
                    }
                    // SAFETY: `raw` is a fresh descriptor we own.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    // SAFETY: plain ftruncate of our own memfd.
                    if unsafe { libc::ftruncate(raw, len as libc::off_t) } != 0 {
                        return Err(os("ftruncate"));
                    }
                    mem.fd = Some(fd);
                    (libc::MAP_SHARED, raw)
                } else {
                    (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
                };
                mem.addr = quiet_address(|hint| {
                    mmap_at(hint, len, flags | libc::MAP_FIXED_NOREPLACE, fd)
                })?;
            }
            Kind::Sysv => {
                mem.addr = quiet_address(|hint| Self::attach_new(Some(hint)).map(|_| ()))?;
            }
            Kind::Brk => {
                // SAFETY: grows the break by pages only this scenario uses; shrunk back in
                // `operate` only if nobody moved the break meanwhile.
                unsafe {
                    let old = libc::sbrk(0) as u64;
                    let aligned = old.div_ceil(ps() as u64) * ps() as u64;
                    let grow = (aligned - old) as isize + len as isize;
                    if libc::sbrk(grow) as isize == -1 {
                        return Err(os("sbrk"));
                    }
                    mem.addr = aligned;
                    mem.brk_top = libc::sbrk(0) as u64;
                    if mem.brk_top != aligned + len as u64 {
                        return Ok(None);
                    }
                }
            }
        }
        Ok(Some(mem))
    }

    fn attach_new(at: Option<u64>) -> Result<u64, String> {
        // SAFETY: a private segment attached where the kernel chooses, or over the address
        // this scenario just detached; marked for removal at once (it lives while attached).
        unsafe {
            let id = libc::shmget(libc::IPC_PRIVATE, PAGES * ps(), libc::IPC_CREAT | 0o600);
            if id < 0 {
                return Err(os("shmget"));
            }
            let p = libc::shmat(id, at.map_or(std::ptr::null(), |a| a as *const c_void), 0);
            libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
            if p as isize == -1 {
                return Err(os("shmat"));
            }
            Ok(p as u64)
        }
    }

    /// Writes a pattern derived from `seed` into every byte.
    fn fill(&mut self, seed: u64) {
        let words = self.len() / 8;
        for i in 0..words {
            let v = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64).wrapping_mul(0x2545_f491);
            // SAFETY: the memory is mapped read-write by this scenario for its whole length.
            unsafe { std::ptr::write_volatile((self.addr as *mut u64).add(i), v) };
        }
    }

    fn contents(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len()];
        // SAFETY: mapped and readable for its whole length.
        unsafe { std::ptr::copy_nonoverlapping(self.addr as *const u8, v.as_mut_ptr(), v.len()) };
        v
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        let len = self.len();
        // SAFETY: releases exactly the memory this scenario set up.
        unsafe {
            match self.kind {
                Kind::Anon | Kind::Memfd => {
                    libc::munmap(self.addr as *mut c_void, len);
                }
                Kind::Sysv => {
                    libc::shmdt(self.addr as *const c_void);
                }
                Kind::Brk => {
                    if libc::sbrk(0) as u64 == self.brk_top {
                        libc::sbrk(-(len as isize));
                    }
                }
            }
        }
    }
}

/// Performs the operation and maps new memory at the same address; `Some(reason)` to skip.
fn operate(path: Path, mode: Mode, w: &Watcher, mem: &mut Mem) -> Result<Option<String>, String> {
    let (addr, len, p) = (mem.addr, mem.len(), ps());
    let coop = mode == Mode::Wrapper && path.has_wrapper();
    let wrap = |r: mmnotify_uffd::Result<()>| r.map_err(|e| e.to_string());
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: (the whole block) every call acts on memory this scenario mapped and no Rust
    // reference points into; new memory is mapped at the same address with
    // MAP_FIXED_NOREPLACE, or with MAP_FIXED over the scenario's own live memory.
    unsafe {
        let a = addr as *mut c_void;
        let check = |r: i32, what: &str| if r == 0 { Ok(()) } else { Err(os(what)) };
        match path {
            Path::MunmapWhole | Path::RawSyscallMunmap | Path::MunmapOtherThread => {
                if coop {
                    if path == Path::MunmapOtherThread {
                        let w2 = w.clone();
                        let a2 = addr as usize;
                        std::thread::spawn(move || w2.munmap(a2 as *mut c_void, len))
                            .join()
                            .map_err(|_| "the unmapping thread panicked".to_string())?
                            .map_err(|e| e.to_string())?;
                    } else {
                        wrap(w.munmap(a, len))?;
                    }
                } else {
                    match path {
                        Path::MunmapWhole => check(libc::munmap(a, len), "munmap")?,
                        Path::RawSyscallMunmap => check(
                            libc::syscall(libc::SYS_munmap, addr, len) as i32,
                            "SYS_munmap",
                        )?,
                        _ => {
                            let a2 = addr as usize;
                            std::thread::spawn(move || libc::munmap(a2 as *mut c_void, len))
                                .join()
                                .map_err(|_| "the unmapping thread panicked".to_string())
                                .and_then(|r| check(r, "munmap"))?;
                        }
                    }
                }
                mmap_at(addr, len, anon | libc::MAP_FIXED_NOREPLACE, -1)?;
            }
            Path::MunmapPartial => {
                let mid = (addr + p as u64) as *mut c_void;
                if coop {
                    wrap(w.munmap(mid, p))?;
                } else {
                    check(libc::munmap(mid, p), "munmap")?;
                }
                mmap_at(addr + p as u64, p, anon | libc::MAP_FIXED_NOREPLACE, -1)?;
            }
            Path::DontNeed | Path::Free | Path::Remove => {
                let advice = match path {
                    Path::DontNeed => libc::MADV_DONTNEED,
                    Path::Free => libc::MADV_FREE,
                    _ => libc::MADV_REMOVE,
                };
                if coop {
                    wrap(w.madvise(a, len, advice))?;
                } else {
                    check(libc::madvise(a, len, advice), "madvise")?;
                }
            }
            Path::MremapMove => {
                // A placeholder to move onto, so the target is ours.
                let q = libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, anon, -1, 0);
                if q == libc::MAP_FAILED {
                    return Err(os("mmap"));
                }
                let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
                let moved = if coop {
                    w.mremap(a, len, len, flags, q).map_err(|e| e.to_string())?
                } else {
                    libc::mremap(a, len, len, flags, q)
                };
                if moved == libc::MAP_FAILED {
                    return Err(os("mremap"));
                }
                libc::munmap(moved, len);
                mmap_at(addr, len, anon | libc::MAP_FIXED_NOREPLACE, -1)?;
            }
            Path::MapFixedOver => {
                mmap_at(addr, len, anon | libc::MAP_FIXED, -1)?;
            }
            Path::BrkShrink => {
                if libc::sbrk(0) as u64 != mem.brk_top {
                    return Ok(Some("the allocator moved the break".into()));
                }
                if libc::sbrk(-(len as isize)) as isize == -1 {
                    return Err(os("sbrk"));
                }
                let again = libc::sbrk(len as isize) as u64;
                if again != addr {
                    mem.brk_top = libc::sbrk(0) as u64;
                    return Ok(Some("the allocator moved the break".into()));
                }
            }
            Path::Shmdt => {
                if coop {
                    wrap(w.shmdt(a))?;
                } else {
                    check(libc::shmdt(a), "shmdt")?;
                }
                Mem::attach_new(Some(addr))?;
            }
            Path::PunchHole | Path::Ftruncate => {
                let fd = mem.fd.as_ref().ok_or("no memfd")?;
                if path == Path::PunchHole {
                    if coop {
                        wrap(w.punch_hole(fd.as_fd(), 0, len as u64))?;
                    } else {
                        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                        check(
                            libc::fallocate(fd.as_raw_fd(), mode, 0, len as i64),
                            "fallocate",
                        )?;
                    }
                } else {
                    if coop {
                        wrap(w.ftruncate(fd.as_fd(), 0))?;
                    } else {
                        check(libc::ftruncate(fd.as_raw_fd(), 0), "ftruncate")?;
                    }
                    check(libc::ftruncate(fd.as_raw_fd(), len as i64), "ftruncate")?;
                }
            }
        }
    }
    Ok(None)
}

/// A memfd that `WRITE_FIXED` writes into.
struct Sink {
    fd: OwnedFd,
}

impl Sink {
    fn new() -> Result<Sink, String> {
        // SAFETY: a new memfd; the name is a valid C string.
        let raw = unsafe { libc::memfd_create(c"rcache-sink".as_ptr(), 0) };
        if raw < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Sink { fd })
    }

    fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn read(&self, len: usize) -> Result<Vec<u8>, String> {
        let mut v = vec![0u8; len];
        // SAFETY: reads into our own buffer of `len` bytes.
        let n = unsafe { libc::pread(self.raw(), v.as_mut_ptr().cast(), len, 0) };
        if n != len as isize {
            return Err(os("pread"));
        }
        Ok(v)
    }
}
