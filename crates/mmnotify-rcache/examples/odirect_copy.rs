//! Copy a file with O_DIRECT through io_uring READ_FIXED / WRITE_FIXED, on buffers from
//! ordinary allocations, with the registration cache deciding what to register.
//!
//! ```text
//! cargo run --release -p mmnotify-rcache --example odirect_copy -- [DIR] [MIB]
//! ```
//!
//! The buffers come from `posix_memalign` and churn as an application's would: every few I/Os
//! one is freed and another allocated, often at the same address (large blocks are `mmap`ed by
//! the allocator, so `free` is an `munmap` the watcher sees, and the next allocation reuses the
//! hole). The same copy runs three ways, each verified byte for byte: through the cache, with a
//! registration per I/O, and with plain (unregistered) io_uring reads and writes.

use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use mmnotify_rcache::{Access, Cache, Config, Registrar, UringRegistrar};

const SIZES: [usize; 3] = [64 << 10, 256 << 10, 1 << 20];
const POOL: usize = 8;

/// A tiny deterministic generator (no dependency needed for an example).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Buffers from the C allocator, freed and re-allocated as the copy goes.
struct Pool {
    bufs: Vec<(*mut u8, usize)>,
    rng: Rng,
    reused_addresses: u64,
    frees: u64,
}

impl Pool {
    fn new() -> Pool {
        let mut p = Pool {
            bufs: Vec::new(),
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            reused_addresses: 0,
            frees: 0,
        };
        for _ in 0..POOL {
            let b = p.alloc();
            p.bufs.push(b);
        }
        p
    }

    fn alloc(&mut self) -> (*mut u8, usize) {
        let size = SIZES[(self.rng.next() % SIZES.len() as u64) as usize];
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: posix_memalign writes a pointer to a fresh block of `size` bytes (or fails).
        let r = unsafe { libc::posix_memalign(&mut p, 4096, size) };
        assert_eq!(r, 0, "posix_memalign failed");
        (p.cast(), size)
    }

    /// Frees a random buffer and allocates another in its place.
    fn churn(&mut self) {
        let i = (self.rng.next() % POOL as u64) as usize;
        let (old, _) = self.bufs[i];
        // SAFETY: a block from posix_memalign that no I/O uses any more.
        unsafe { libc::free(old.cast()) };
        self.frees += 1;
        let new = self.alloc();
        if new.0 == old {
            self.reused_addresses += 1;
        }
        self.bufs[i] = new;
    }

    fn pick(&mut self) -> (*mut u8, usize) {
        self.bufs[(self.rng.next() % POOL as u64) as usize]
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (p, _) in self.bufs.drain(..) {
            // SAFETY: blocks from posix_memalign, freed once.
            unsafe { libc::free(p.cast()) };
        }
    }
}

fn open_pair(src: &Path, dst: &Path, direct: bool) -> std::io::Result<(File, File)> {
    let flags = if direct { libc::O_DIRECT } else { 0 };
    let s = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(src)?;
    let d = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(flags)
        .open(dst)?;
    Ok((s, d))
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    File::open(a)
        .and_then(|mut f| f.read_to_end(&mut x))
        .expect("read source");
    File::open(b)
        .and_then(|mut f| f.read_to_end(&mut y))
        .expect("read copy");
    x == y
}

/// One plain io_uring operation, waited for.
fn submit(ring: &mut IoUring, e: io_uring::squeue::Entry) -> usize {
    // SAFETY: the entry's buffer stays valid until the completion is reaped below.
    unsafe { ring.submission().push(&e) }.expect("submission queue full");
    ring.submit_and_wait(1).expect("io_uring_enter");
    let cqe = ring.completion().next().expect("a completion");
    assert!(
        cqe.result() >= 0,
        "I/O failed: {}",
        std::io::Error::from_raw_os_error(-cqe.result())
    );
    cqe.result() as usize
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Way {
    Cached,
    RegisterPerIo,
    Unregistered,
}

fn copy(way: Way, src: &Path, dst: &Path, len: u64, direct: bool) -> (Duration, String) {
    let (s, d) = open_pair(src, dst, direct).expect("open");
    let registrar = Arc::new(UringRegistrar::new(64).expect("an io_uring with 64 buffer slots"));
    let cache = Cache::with_watcher(registrar.clone(), Config::default()).expect("the watcher");
    let mut plain = IoUring::new(8).expect("io_uring");
    let mut pool = Pool::new();
    let began = Instant::now();
    let mut off = 0u64;
    let mut n = 0u64;
    let mut get_time = Duration::ZERO;
    while off < len {
        if n % 4 == 3 {
            pool.churn();
        }
        n += 1;
        let (buf, size) = pool.pick();
        let chunk = size.min((len - off) as usize) as u32;
        let addr = buf as u64;
        match way {
            Way::Cached => {
                let t0 = Instant::now();
                let region = cache
                    .get(addr, u64::from(chunk), Access::READ_WRITE)
                    .expect("get");
                get_time += t0.elapsed();
                // SAFETY: the buffer is our own allocation; nothing else touches it during
                // the I/O.
                let r = unsafe {
                    registrar.read_fixed(region.handle(), addr, chunk, s.as_raw_fd(), off)
                };
                assert_eq!(r.expect("READ_FIXED"), chunk as usize);
                let w = registrar.write_fixed(region.handle(), addr, chunk, d.as_raw_fd(), off);
                assert_eq!(w.expect("WRITE_FIXED"), chunk as usize);
            }
            Way::RegisterPerIo => {
                let range = mmnotify_rcache::PageRange::covering(addr, u64::from(chunk)).unwrap();
                let h = registrar
                    .register(range, Access::READ_WRITE)
                    .expect("register");
                // SAFETY: as above.
                let r = unsafe { registrar.read_fixed(&h, addr, chunk, s.as_raw_fd(), off) };
                assert_eq!(r.expect("READ_FIXED"), chunk as usize);
                let w = registrar.write_fixed(&h, addr, chunk, d.as_raw_fd(), off);
                assert_eq!(w.expect("WRITE_FIXED"), chunk as usize);
                registrar.deregister(&h);
            }
            Way::Unregistered => {
                let r = opcode::Read::new(types::Fd(s.as_raw_fd()), buf, chunk)
                    .offset(off)
                    .build();
                assert_eq!(submit(&mut plain, r), chunk as usize);
                let w = opcode::Write::new(types::Fd(d.as_raw_fd()), buf, chunk)
                    .offset(off)
                    .build();
                assert_eq!(submit(&mut plain, w), chunk as usize);
            }
        }
        off += u64::from(chunk);
    }
    let took = began.elapsed();
    if way == Way::Cached {
        println!("  (of which in cache.get: {get_time:.1?} of {took:.1?})");
    }
    let stats = cache.stats();
    let note = match way {
        Way::Cached => format!(
            "hit rate {:.1}% ({} hits, {} misses, {} invalidations), {} frees of which {} re-allocated at the same address",
            100.0 * stats.hit_rate(),
            stats.hits,
            stats.misses,
            stats.invalidations,
            pool.frees,
            pool.reused_addresses
        ),
        Way::RegisterPerIo => format!("{} registrations", registrar.books().registered),
        Way::Unregistered => "no registration".to_string(),
    };
    drop(cache);
    assert_eq!(registrar.books().live, 0, "io_uring slots leaked");
    (took, note)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map_or_else(std::env::temp_dir, PathBuf::from);
    let mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let len = mib << 20;
    let src = dir.join(format!("rcache-src-{}", std::process::id()));
    let dst = dir.join(format!("rcache-dst-{}", std::process::id()));
    {
        let mut f = File::create(&src).expect("create the source file");
        let mut rng = Rng(42);
        let block: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
        for i in 0..mib {
            let mut b = block.clone();
            b[..8].copy_from_slice(&i.to_le_bytes());
            f.write_all(&b).expect("write the source file");
        }
        f.sync_all().expect("sync");
    }
    let direct = match open_pair(&src, &dst, true) {
        Ok(_) => true,
        Err(e) => {
            println!(
                "note: O_DIRECT is not supported in {} ({e}); copying with buffered I/O",
                dir.display()
            );
            false
        }
    };
    println!(
        "copying {mib} MiB in {} with {} through io_uring, buffers of 64 KiB-1 MiB from posix_memalign, churned",
        dir.display(),
        if direct { "O_DIRECT" } else { "buffered I/O" }
    );
    let mut failed = false;
    for way in [Way::Cached, Way::RegisterPerIo, Way::Unregistered] {
        let (took, note) = copy(way, &src, &dst, len, direct);
        let ok = same_bytes(&src, &dst);
        failed |= !ok;
        println!(
            "{:<16} {:>8.1} MiB/s  copy {}  {}",
            format!("{way:?}"),
            mib as f64 / took.as_secs_f64(),
            if ok { "identical" } else { "DIFFERS" },
            note
        );
    }
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    if failed {
        std::process::exit(1);
    }
}
