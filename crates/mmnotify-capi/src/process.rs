//! The process watcher as C sees it: `mmn_init` / `mmn_fini`, what the kernel offered, `watch`,
//! and the cooperative wrappers.
//!
//! A VMA belongs to at most one userfaultfd, so a process has one watcher, and every library
//! in the process that links `libmmnotify.so` shares it. `mmn_init` is therefore idempotent
//! and reference counted: the first call creates the watcher, later calls (from any library,
//! any thread) take another reference; each `mmn_fini` drops one. The last `mmn_fini` releases
//! the library's watcher, unless subscriptions or caches are still alive: it then refuses
//! with `MMN_EBUSY`, keeps the reference, and says how many objects are alive, because tearing
//! the watcher from under them would silently blind them.
//!
//! Two libraries that each link the *static* archive get two copies of this state in one
//! process, hence two watchers fighting over the same VMAs (the second one's `watch` fails
//! with `MMN_EBUSY`); link the shared library when more than one component of a process uses
//! mmnotify.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::os::fd::BorrowedFd;
use std::time::Duration;

use mmnotify_uffd::{ForkEvents, Watcher, WatcherOptions};

use crate::error::{ffi, non_null, CError, Code};
use crate::sync::Mutex;

/// The ABI version of this header; pass it to `mmn_init`.
pub const MMN_ABI_VERSION: u32 = 1;

/// Fork events off (the default): a forked child's copies of watched memory are simply not
/// watched, and every check in the child fails closed.
pub const MMN_FORK_EVENTS_OFF: u32 = 0;
/// Fork events where the kernel permits them (CAP_SYS_PTRACE), else off.
pub const MMN_FORK_EVENTS_IF_PERMITTED: u32 = 1;
/// Fork events required: `mmn_init` fails with `MMN_EPERM` where they are refused.
pub const MMN_FORK_EVENTS_REQUIRED: u32 = 2;

/// Options for the process watcher (`mmn_init`). Zero-initialise it, then set what you need:
/// a zero field means the default.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(non_camel_case_types)]
pub struct mmn_init_options_t {
    /// `MMN_FORK_EVENTS_*` (default off).
    pub fork_events: u32,
    /// Capacity of the reader-to-dispatcher queue in messages (default 4096); past it,
    /// messages fold into one covering invalidation (more invalidation, never less).
    pub queue_capacity: u32,
    /// Messages read per `read(2)` of the userfaultfd (default 64).
    pub read_batch: u32,
    /// How long, in microseconds, the dispatcher holds a REMOVE (madvise) invalidation open
    /// waiting to see its zap (default 10000).
    pub remove_settle_us: u32,
}

/// What the kernel offered and what the watcher uses (`mmn_features`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(non_camel_case_types)]
pub struct mmn_features_t {
    /// Every `UFFD_FEATURE_*` bit this kernel supports.
    pub supported: u64,
    /// The bits the watcher's userfaultfd was configured with.
    pub enabled: u64,
    /// 1 if WP_ASYNC is on: file-backed and SysV shm memory can be watched.
    pub wp_async: u8,
    /// 1 if fork events are on.
    pub fork_events: u8,
}

struct Global {
    watcher: Watcher,
    refs: u64,
    options: WatcherOptions,
}

static GLOBAL: Mutex<Option<Global>> = Mutex::new(None);

/// Serialises `mmn_init` and `mmn_fini` as a whole, including the watcher's creation and the
/// release of the last reference (which joins the watcher's threads outside `GLOBAL`): an
/// init racing with the last fini must not pick up the watcher that is shutting down.
static LIFECYCLE: Mutex<()> = Mutex::new(());

thread_local! {
    /// How deep this thread is inside callbacks this library invoked (interval callbacks,
    /// a cache's reg/dereg/invalidated callbacks).
    static IN_CALLBACK: Cell<u32> = const { Cell::new(0) };
}

/// Marks the current thread as running a user callback while `f` runs.
pub(crate) fn in_callback<T>(f: impl FnOnce() -> T) -> T {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            let _ = IN_CALLBACK.try_with(|c| c.set(c.get().saturating_sub(1)));
        }
    }
    let _ = IN_CALLBACK.try_with(|c| c.set(c.get() + 1));
    let _leave = Leave;
    f()
}

/// Whether the current thread is inside a user callback this library invoked.
pub(crate) fn inside_callback() -> bool {
    IN_CALLBACK.try_with(|c| c.get() > 0).unwrap_or(false)
}

/// The process watcher, or `MMN_ESHUTDOWN` before `mmn_init`.
pub(crate) fn watcher() -> Result<Watcher, CError> {
    GLOBAL
        .lock()
        .as_ref()
        .map(|g| g.watcher.clone())
        .ok_or_else(|| {
            CError::new(
                Code::ShutDown,
                "mmnotify is not initialised in this process: call mmn_init first",
            )
        })
}

fn options_from(o: &mmn_init_options_t) -> Result<WatcherOptions, CError> {
    let fork_events = match o.fork_events {
        MMN_FORK_EVENTS_OFF => ForkEvents::Off,
        MMN_FORK_EVENTS_IF_PERMITTED => ForkEvents::IfPermitted,
        MMN_FORK_EVENTS_REQUIRED => ForkEvents::Required,
        other => {
            return Err(CError::invalid(format!(
                "fork_events = {other} is not one of MMN_FORK_EVENTS_OFF (0), \
                 MMN_FORK_EVENTS_IF_PERMITTED (1), MMN_FORK_EVENTS_REQUIRED (2)"
            )))
        }
    };
    let mut options = WatcherOptions {
        fork_events,
        ..WatcherOptions::default()
    };
    if o.queue_capacity != 0 {
        options.queue_capacity = o.queue_capacity as usize;
    }
    if o.read_batch != 0 {
        options.read_batch = o.read_batch as usize;
    }
    if o.remove_settle_us != 0 {
        options.remove_settle = Duration::from_micros(u64::from(o.remove_settle_us));
    }
    Ok(options)
}

/// Initialises mmnotify in this process, or takes another reference to it.
///
/// `abi_version` must be `MMN_ABI_VERSION` from the header the caller was compiled with.
/// `options` may be NULL (defaults). The first call creates the process watcher (a
/// userfaultfd and two threads: a reader that never runs user code, and a dispatcher that runs
/// every invalidation callback). Later calls, from any library in the process, return
/// `MMN_OK` and count a reference, provided their options are NULL or equal to the first
/// call's; otherwise `MMN_EEXIST`. Returns the reference count after the call (>= 1) on
/// success.
///
/// Threads: any thread; concurrent calls are serialised. Not from a callback of this library
/// (`MMN_EDEADLK`).
///
/// Errors: `MMN_EINVAL` (ABI version, bad option), `MMN_EEXIST`, and the watcher's creation
/// errors: `MMN_ENOSYS` (no userfaultfd), `MMN_EPERM` (refused), `MMN_ENOTSUP` (kernel too
/// old), or a negated errno.
#[no_mangle]
pub extern "C" fn mmn_init(abi_version: u32, options: *const mmn_init_options_t) -> c_int {
    ffi("mmn_init", || {
        if abi_version != MMN_ABI_VERSION {
            return Err(CError::invalid(format!(
                "the caller was compiled against ABI version {abi_version}, this library speaks \
                 version {MMN_ABI_VERSION}: rebuild against this library's mmnotify.h"
            )));
        }
        if inside_callback() {
            return Err(CError::new(
                Code::Deadlock,
                "called from a callback of this library",
            ));
        }
        let _lifecycle = LIFECYCLE.lock();
        let requested = if options.is_null() {
            None
        } else {
            // SAFETY: non-NULL, and the caller promises it points to an initialised
            // mmn_init_options_t (the header's contract); we only read it.
            Some(options_from(unsafe { &*options })?)
        };
        let mut global = GLOBAL.lock();
        if let Some(g) = global.as_mut() {
            if let Some(r) = requested {
                if r != g.options {
                    return Err(CError::new(
                        Code::Exists,
                        format!(
                            "mmnotify is already initialised with {:?}; this call asks for {:?} \
                             (a process has one watcher: pass NULL to share it)",
                            g.options, r
                        ),
                    ));
                }
            }
            g.refs += 1;
            return Ok(i32::try_from(g.refs).unwrap_or(i32::MAX));
        }
        let options = requested.unwrap_or_default();
        let watcher = Watcher::with_options(options)?;
        *global = Some(Global {
            watcher,
            refs: 1,
            options,
        });
        Ok(1)
    })
}

/// Drops one reference taken by `mmn_init`. Returns the references left (>= 0).
///
/// The last reference releases the library's watcher (its threads stop once nothing else in
/// the process holds it), and a later `mmn_init` creates a new one. If subscriptions or caches
/// are still alive at that point the call refuses with `MMN_EBUSY`, keeps the reference, and
/// names how many are alive: unsubscribe and destroy them first.
///
/// Threads: any thread; not from a callback of this library (`MMN_EDEADLK`).
/// Errors: `MMN_ESHUTDOWN` (not initialised), `MMN_EBUSY`, `MMN_EDEADLK`.
#[no_mangle]
pub extern "C" fn mmn_fini() -> c_int {
    ffi("mmn_fini", || {
        if inside_callback() {
            return Err(CError::new(
                Code::Deadlock,
                "called from a callback of this library (releasing the watcher would wait for it)",
            ));
        }
        let _lifecycle = LIFECYCLE.lock();
        let mut global = GLOBAL.lock();
        let Some(g) = global.as_mut() else {
            return Err(CError::new(
                Code::ShutDown,
                "mmnotify is not initialised (more mmn_fini calls than mmn_init calls)",
            ));
        };
        if g.refs > 1 {
            g.refs -= 1;
            return Ok(i32::try_from(g.refs).unwrap_or(i32::MAX));
        }
        let intervals = crate::interval::live();
        let caches = crate::rcache::live();
        if intervals + caches > 0 {
            return Err(CError::new(
                Code::Busy,
                format!(
                    "the last reference cannot be dropped while {intervals} interval \
                     subscription(s) and {caches} registration cache(s) are alive"
                ),
            ));
        }
        let g = global.take();
        drop(global);
        // Dropping our handle outside the lock: the watcher's shutdown joins its threads.
        drop(g);
        Ok(0)
    })
}

/// Fills `*out` with the features the kernel offered and the watcher uses.
///
/// Threads: any. Errors: `MMN_EFAULT` (NULL `out`), `MMN_ESHUTDOWN`.
#[no_mangle]
pub extern "C" fn mmn_features(out: *mut mmn_features_t) -> c_int {
    ffi("mmn_features", || {
        non_null(out, "out")?;
        let f = watcher()?.features();
        // SAFETY: non-NULL; the caller promises it points to writable storage for the struct.
        unsafe {
            out.write(mmn_features_t {
                supported: f.supported,
                enabled: f.enabled,
                wp_async: u8::from(f.wp_async),
                fork_events: u8::from(f.fork_events),
            })
        };
        Ok(0)
    })
}

/// Watches `[addr, addr + len)` (page-aligned): registers every VMA overlapping it, whole,
/// with the process's userfaultfd in write-protect-only mode (no fault is ever trapped).
/// Returns the number of VMAs registered by this call (0 if all were already watched).
///
/// `mmn_subscribe` and the cache watch on their own; call this again for memory mapped later
/// at a watched address with `MAP_FIXED` or `shmat(SHM_REMAP)`, which the kernel does not
/// register (an `mremap` target needs nothing). Pieces that cannot be watched (holes, vdso,
/// read-only shared files) are skipped; the message of `mmn_last_error` is not set for them.
///
/// Threads: any, including callbacks. Errors: `MMN_EINVAL` (empty, unaligned, overflowing),
/// `MMN_ENOMEM` (nothing watchable mapped), `MMN_EBUSY` (another userfaultfd owns it), the
/// fail-closed codes (`MMN_ESHUTDOWN`, `MMN_EIO`, `MMN_ECHILD`).
#[no_mangle]
pub extern "C" fn mmn_watch(addr: u64, len: u64) -> c_int {
    ffi("mmn_watch", || {
        let report = watcher()?.watch(addr, len)?;
        Ok(i32::try_from(report.newly_watched()).unwrap_or(i32::MAX))
    })
}

fn errno_result(r: Result<(), mmnotify_uffd::Error>) -> Result<c_int, CError> {
    r.map(|()| 0).map_err(CError::from)
}

/// `munmap(addr, len)` with every overlapping subscription invalidated (`MMN_EVENT_UNMAP`)
/// *before* the memory goes (a pre-notification: deregister before free) and ended after.
///
/// Callbacks run on the calling thread, inside this call, and may block. Threads: any,
/// including a callback, but not while holding a lock that callbacks take. Errors: the
/// negated errno of `munmap`, `MMN_EINVAL` (empty or wrapping range), `MMN_ESHUTDOWN`.
#[no_mangle]
pub extern "C" fn mmn_munmap(addr: *mut c_void, len: usize) -> c_int {
    ffi("mmn_munmap", || {
        let w = watcher()?;
        // SAFETY: munmap's contract is the caller's (the header says: as munmap(2)).
        errno_result(unsafe { w.munmap(addr, len) })
    })
}

/// `madvise(addr, len, advice)`; for advice that can change what backs the range
/// (DONTNEED, DONTNEED_LOCKED, FREE, REMOVE, PAGEOUT, guard pages) every overlapping
/// subscription is invalidated (`MMN_EVENT_CLEAR`) before and ended after; other advice passes
/// through. As `mmn_munmap` otherwise.
#[no_mangle]
pub extern "C" fn mmn_madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    ffi("mmn_madvise", || {
        let w = watcher()?;
        // SAFETY: madvise's contract is the caller's.
        errno_result(unsafe { w.madvise(addr, len, advice) })
    })
}

/// `mremap(old, old_len, new_len, flags, new_addr)` with the old range (and with
/// `MREMAP_FIXED` the target) invalidated (`MMN_EVENT_UNMAP`) before and ended after. The new
/// address is stored in `*out` (which must not be NULL). The moved memory stays watched.
/// As `mmn_munmap` otherwise; `MMN_EFAULT` for a NULL `out`.
#[no_mangle]
pub extern "C" fn mmn_mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
    out: *mut *mut c_void,
) -> c_int {
    ffi("mmn_mremap", || {
        non_null(out, "out")?;
        let w = watcher()?;
        // SAFETY: mremap's contract is the caller's.
        let p = unsafe { w.mremap(old, old_len, new_len, flags, new_addr) }?;
        // SAFETY: non-NULL, writable by the header's contract.
        unsafe { out.write(p) };
        Ok(0)
    })
}

/// `shmdt(addr)`, which userfaultfd never reports, with the attachment's whole range
/// invalidated (`MMN_EVENT_UNMAP`) around it. `MMN_ENOMEM` if nothing is attached at `addr`.
/// As `mmn_munmap` otherwise.
#[no_mangle]
pub extern "C" fn mmn_shmdt(addr: *const c_void) -> c_int {
    ffi("mmn_shmdt", || {
        let w = watcher()?;
        // SAFETY: shmdt's contract is the caller's.
        errno_result(unsafe { w.shmdt(addr) })
    })
}

fn borrowed_fd<'a>(fd: c_int, function: &str) -> Result<BorrowedFd<'a>, CError> {
    if fd < 0 {
        return Err(CError::new(
            Code::Errno(libc::EBADF),
            format!("{function}: {fd} is not a file descriptor"),
        ));
    }
    // SAFETY: a non-negative descriptor number the caller lent for the duration of the call;
    // a closed number makes the system calls fail with EBADF, which is reported.
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// `fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len)`, which
/// userfaultfd never reports, with every mapping of the punched pages in this process
/// invalidated (`MMN_EVENT_CLEAR`) around it. As `mmn_munmap` otherwise.
#[no_mangle]
pub extern "C" fn mmn_punch_hole(fd: c_int, offset: u64, len: u64) -> c_int {
    ffi("mmn_punch_hole", || {
        let w = watcher()?;
        let fd = borrowed_fd(fd, "mmn_punch_hole")?;
        // SAFETY: the caller's promise about references into the hole (header contract).
        errno_result(unsafe { w.punch_hole(fd, offset, len) })
    })
}

/// `ftruncate(fd, len)`, which userfaultfd never reports; when it shrinks the file, every
/// mapping of the pages from the one holding the new end on is invalidated
/// (`MMN_EVENT_UNMAP`) around it. As `mmn_munmap` otherwise.
#[no_mangle]
pub extern "C" fn mmn_ftruncate(fd: c_int, len: u64) -> c_int {
    ffi("mmn_ftruncate", || {
        let w = watcher()?;
        let fd = borrowed_fd(fd, "mmn_ftruncate")?;
        // SAFETY: the caller's promise about references past the new end (header contract).
        errno_result(unsafe { w.ftruncate(fd, len) })
    })
}

/// Panics inside the library on purpose and returns what the boundary made of it: always
/// `MMN_EPANIC`, with the panic's message in `mmn_last_error`. It exists so that a binding's
/// tests can check that a bug in this library surfaces as an error code, not an abort.
#[no_mangle]
pub extern "C" fn mmn_selftest_panic() -> c_int {
    ffi("mmn_selftest_panic", || {
        panic!("mmn_selftest_panic: a deliberate panic to test the boundary")
    })
}
