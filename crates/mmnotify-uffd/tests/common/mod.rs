//! Shared helpers for the real-memory tests: mapping memory, a recording mirror that fills
//! through the collision-retry protocol, a coherence judge against /proc/self/pagemap, child
//! processes (re-running this test binary with a role), and timeouts.

#![allow(dead_code, unreachable_pub, clippy::disallowed_types)]

use mmnotify::Range;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mmnotify::{Event, IntervalCtx, IntervalSubscriber, Invalidate, Invalidation};
use mmnotify_uffd::pagemap::{self, Frame};
use mmnotify_uffd::{WatchedInterval, Watcher};

pub const MADV_POPULATE_WRITE: i32 = 23;

/// Serialises the tests of one binary that assert exact event lists. Tests that run at the
/// same time share the process's watcher, and a late UNMAP of one test's freed range can
/// reach another test's mirror of memory mapped at the same address afterwards (the kernel
/// frees the range before it queues the message): an over-invalidation, harmless, but not
/// what an exact assertion expects.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn ps() -> usize {
    mmnotify_uffd::page_size() as usize
}

/// Maps `pages` anonymous private pages, touched and stamped (unique contents per page).
pub fn map_anon(pages: usize) -> *mut u8 {
    map_with(pages, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
}

pub fn map_with(pages: usize, flags: i32, fd: i32, hint: usize) -> *mut u8 {
    // SAFETY: a fresh mapping (or MAP_FIXED at an address the test owns).
    let p = unsafe {
        libc::mmap(
            hint as *mut c_void,
            pages * ps(),
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    let p = p as *mut u8;
    stamp_all(p, pages);
    p
}

static STAMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Writes a fresh, unique stamp into every page (makes content fingerprints unique).
pub fn stamp_all(p: *mut u8, pages: usize) {
    for i in 0..pages {
        let s = STAMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the page is mapped read-write by the caller.
        unsafe { std::ptr::write_volatile(p.add(i * ps()) as *mut u64, s) };
    }
}

/// Makes the page at `addr` present with a real (written) frame, without risking SIGSEGV:
/// MADV_POPULATE_WRITE fails with an error on a hole.
pub fn populate(addr: u64, len: usize) -> bool {
    // SAFETY: populating never changes contents; on an unmapped range it fails.
    unsafe { libc::madvise(addr as *mut c_void, len, MADV_POPULATE_WRITE) == 0 }
}

#[derive(Debug, Default)]
pub struct MirrorState {
    /// page address → frame recorded at fill.
    pub entries: BTreeMap<u64, Frame>,
    /// every invalidation seen, in order.
    pub events: Vec<(u64, u64, Event)>,
}

/// A mirror of page frames: an interval subscriber that records what it is told and drops
/// its entries for the range.
#[derive(Debug, Default)]
pub struct Mirror {
    pub state: Mutex<MirrorState>,
}

impl IntervalSubscriber for Mirror {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        let mut s = self.state.lock().unwrap();
        ctx.set_seq();
        let r = inv.range();
        let dead: Vec<u64> = s
            .entries
            .range(r.start()..r.end())
            .map(|(k, _)| *k)
            .collect();
        for k in dead {
            s.entries.remove(&k);
        }
        s.events.push((r.start(), r.end(), inv.event()));
        Invalidate::Done
    }
}

impl Mirror {
    /// Fills the mirror for `pages` pages from `addr` through the protocol; returns false if
    /// the memory is not mapped.
    pub fn fill(&self, iv: &WatchedInterval, addr: u64, pages: usize) -> bool {
        for _ in 0..1000 {
            let seq = iv.read_begin().expect("read_begin");
            if !populate(addr, pages * ps()) {
                return false;
            }
            let frames: Vec<Frame> = (0..pages)
                .map(|i| pagemap::frame(addr + (i * ps()) as u64).unwrap())
                .collect();
            let mut s = self.state.lock().unwrap();
            if iv.read_retry(seq) {
                continue;
            }
            for (i, f) in frames.into_iter().enumerate() {
                s.entries.insert(addr + (i * ps()) as u64, f);
            }
            return true;
        }
        panic!("fill never settled");
    }

    /// Entries that disagree with the real mapping now: (address, recorded, real).
    pub fn incoherent(&self) -> Vec<(u64, Frame, Frame)> {
        let s = self.state.lock().unwrap();
        s.entries
            .iter()
            .filter_map(|(a, f)| {
                let now = pagemap::frame(*a).unwrap();
                (now != *f).then_some((*a, *f, now))
            })
            .collect()
    }

    pub fn events(&self) -> Vec<(u64, u64, Event)> {
        self.state.lock().unwrap().events.clone()
    }

    pub fn clear_events(&self) {
        self.state.lock().unwrap().events.clear();
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap().entries.len()
    }
}

/// A watched, mirrored region.
pub struct Region {
    pub addr: u64,
    pub pages: usize,
    pub mirror: Arc<Mirror>,
    pub iv: WatchedInterval,
}

impl Region {
    pub fn len(&self) -> usize {
        self.pages * ps()
    }

    pub fn ptr(&self) -> *mut c_void {
        self.addr as *mut c_void
    }

    /// Waits until everything read so far is delivered.
    pub fn sync(&self, w: &Watcher) {
        w.synchronize(Duration::from_secs(10)).expect("synchronize");
    }
}

/// Watches `addr..+pages` and mirrors it fully.
pub fn mirror_region(w: &Watcher, addr: u64, pages: usize) -> Region {
    let report = w.watch(addr, (pages * ps()) as u64).expect("watch");
    assert!(report.is_complete(), "{report:?}");
    let mirror = Arc::new(Mirror::default());
    let iv = w
        .insert_interval(
            Range::from_len(addr, (pages * ps()) as u64).unwrap(),
            mirror.clone(),
        )
        .expect("insert_interval");
    assert!(mirror.fill(&iv, addr, pages));
    assert_eq!(mirror.len(), pages);
    assert!(mirror.incoherent().is_empty());
    Region {
        addr,
        pages,
        mirror,
        iv,
    }
}

/// Runs `f` on a thread and fails the test if it does not finish within `limit`.
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not finish within {limit:?}: deadlock")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// The role this process was started for, if it is a child re-run of the test binary.
pub fn role() -> Option<String> {
    std::env::var("MMNOTIFY_UFFD_ROLE").ok()
}

/// Re-runs this test binary as a child that runs only the (ignored) entry point `test` with
/// `MMNOTIFY_UFFD_ROLE=role`;
/// returns (success, combined output). Fails the test if it runs past `limit`.
pub fn run_child(
    test: &str,
    role: &str,
    limit: Duration,
    pre_exec_drop_to_nobody: bool,
) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let mut exe = std::env::current_exe().unwrap();
    let mut copy_dir = None;
    if pre_exec_drop_to_nobody {
        // The unprivileged child must be able to reach and execute the binary: a clone under a
        // private home directory would not let it. Run a world-readable copy from the temp dir.
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mmnotify-uffd-child-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.join("test-binary");
        std::fs::copy(&exe, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        exe = copy;
        copy_dir = Some(dir);
    }
    let mut cmd = Command::new(&exe);
    cmd.current_dir("/");
    cmd.args([
        test,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("MMNOTIFY_UFFD_ROLE", role)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    if pre_exec_drop_to_nobody {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn child");
    let start = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "child {role} hung past {limit:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    if let Some(dir) = copy_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// fork(); in the child run `f` (which must stick to simple, allocation-light code) and
/// `_exit` with its code; in the parent wait up to `limit` and return the child's exit code.
/// A child that hangs is killed and the test fails.
pub fn fork_and_wait(limit: Duration, f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: fork in a multi-threaded process: the child runs only `f` and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = f();
        // SAFETY: leaving the child without running the parent's destructors or atexit.
        unsafe { libc::_exit(code) };
    }
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
            return libc::WEXITSTATUS(status);
        }
        if start.elapsed() > limit {
            // SAFETY: killing our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut st = 0;
            // SAFETY: reaping it.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            panic!("forked child hung past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
