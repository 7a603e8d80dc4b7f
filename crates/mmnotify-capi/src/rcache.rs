//! The registration cache as C sees it, shaped like UCX's `ucs_rcache`: parameters with
//! `reg` / `dereg` callbacks, `get` / `put`, an invalidated-region callback, statistics.
//!
//! The cache is `mmnotify_rcache::Cache` over a registrar whose `register` / `deregister`
//! call the C callbacks, invalidated by the process watcher. A C region handle owns a
//! `RegionGuard`; `mmn_rcache_put` drops it. The guard borrows the cache; the region entry
//! keeps the cache alive (an `Arc`) and drops the guard first, so the borrow never dangles
//! (see `CRegion`).
//!
//! Which thread runs which callback:
//!
//! * `reg`: the thread of the `mmn_rcache_get` that missed; no lock of the cache is held, it
//!   may block, allocate, free and unmap memory.
//! * `dereg`: the thread of the last `mmn_rcache_put` of an invalidated region, of the next
//!   `mmn_rcache_get` / `mmn_rcache_flush` after an invalidation of an unused region, of an
//!   eviction, or of `mmn_rcache_destroy`; no lock of the cache is held, it may block.
//! * `invalidated`: in the invalidation's context (the watcher's dispatching thread, or the
//!   thread of a cooperative call such as `mmn_munmap`); it must not block on I/O or call into
//!   this cache except `mmn_region_invalidated`.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use mmnotify_rcache::{
    Access, BlindSpotPolicy, Cache, Config, EventSource, PageRange, Refusal, RegionGuard,
    Registrar, RegistrarError,
};

use crate::error::{ffi, non_null, CError, Code};
use crate::handle::{Kind, Table};
use crate::process::{in_callback, inside_callback, watcher};
use crate::sync::Mutex;

/// The device reads the memory.
pub const MMN_ACCESS_READ: u32 = 1;
/// The device writes the memory.
pub const MMN_ACCESS_WRITE: u32 = 2;

/// Do not merge a miss with the cached regions it overlaps or touches (UCX merges; so does
/// this cache by default).
pub const MMN_RCACHE_NO_MERGE: u32 = 1;

/// Memory the watcher cannot fully see (SysV shm, file mappings) is registered for one
/// use and deregistered at the put (the default: never a stale hit, never a hit).
pub const MMN_BLIND_UNCACHED: u32 = 0;
/// Such memory is cached and its page frames compared on every hit (needs CAP_SYS_ADMIN to
/// read frame numbers; without it, as `MMN_BLIND_UNCACHED`).
pub const MMN_BLIND_VALIDATE_FRAMES: u32 = 1;
/// Such memory is cached as if the watcher saw everything: only for callers that make every
/// `shmdt`, hole punch and `ftruncate` through the cooperative wrappers, in every process.
pub const MMN_BLIND_TRUST: u32 = 2;

/// A registration cache. The all-zero value is never a valid handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub struct mmn_rcache_t {
    /// Opaque.
    pub bits: u64,
}

/// A region handed out by `mmn_rcache_get`. The all-zero value is never a valid handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub struct mmn_region_t {
    /// Opaque.
    pub bits: u64,
}

/// What a region covers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(non_camel_case_types)]
pub struct mmn_region_info_t {
    /// First byte (page-aligned; at or below the address asked for).
    pub start: u64,
    /// Length in bytes (whole pages; covers the range asked for, more when merged).
    pub len: u64,
    /// What the `reg` callback stored for this registration.
    pub reg_handle: u64,
    /// `MMN_ACCESS_*` the registration allows (at least what was asked for).
    pub access: u32,
    /// 1 if the registration is cached; 0 for memory registered for this use only.
    pub cached: u8,
}

/// Registers `[start, start + len)` (page-aligned) for `access` (`MMN_ACCESS_*`): pin it, make
/// the device key, and store what identifies the registration in `*reg_handle`. Return 0 on
/// success; any other value is an error that `mmn_rcache_get` reports as `MMN_ECALLBACK`
/// (with the value in the message). Runs on the getting thread, with no lock of the cache held:
/// it may block, allocate and free memory.
#[allow(non_camel_case_types)]
pub type mmn_reg_fn = Option<
    unsafe extern "C" fn(
        ctx: *mut c_void,
        start: u64,
        len: u64,
        access: u32,
        reg_handle: *mut u64,
    ) -> c_int,
>;

/// Releases a registration `reg` made. Called exactly once per successful `reg`. Return 0;
/// any other value is counted in `mmn_rcache_stats_t::dereg_errors` (the registration counts
/// as released). No lock of the cache is held: it may block and free memory.
#[allow(non_camel_case_types)]
pub type mmn_dereg_fn =
    Option<unsafe extern "C" fn(ctx: *mut c_void, start: u64, len: u64, reg_handle: u64) -> c_int>;

/// The memory behind a region changed (unmapped, madvised, remapped...): the registration
/// names pages no longer mapped at its address. The region is never handed out again; it
/// stays registered until its holders put it. Called once per region that was handed out, in
/// the invalidation's context: it must not block on I/O or call into the cache.
#[allow(non_camel_case_types)]
pub type mmn_region_invalidated_fn =
    Option<unsafe extern "C" fn(ctx: *mut c_void, region: *const mmn_region_info_t)>;

/// Parameters of `mmn_rcache_create` (like UCX's `ucs_rcache_params_t`). Zero-initialise,
/// then set at least `reg` and `dereg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(non_camel_case_types)]
pub struct mmn_rcache_params_t {
    /// Registers memory (required).
    pub reg: mmn_reg_fn,
    /// Deregisters memory (required).
    pub dereg: mmn_dereg_fn,
    /// Told when a region that was handed out is invalidated (optional, may be NULL).
    pub invalidated: mmn_region_invalidated_fn,
    /// Passed to the callbacks; must stay valid and usable from any thread until
    /// `mmn_rcache_destroy` returns.
    pub ctx: *mut c_void,
    /// `MMN_RCACHE_*` flags.
    pub flags: u32,
    /// `MMN_BLIND_*` (default `MMN_BLIND_UNCACHED`).
    pub blind_policy: u32,
    /// At most this many cached regions; unused ones are evicted in LRU order (0: no limit).
    pub max_regions: u64,
    /// At most this many cached bytes (0: no limit).
    pub max_bytes: u64,
    /// Registration attempts before a miss that keeps colliding with invalidations gives up
    /// with `MMN_EAGAIN` (0: the default, 64).
    pub max_attempts: u32,
}

/// A cache's counters (`mmn_rcache_stats`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(non_camel_case_types)]
pub struct mmn_rcache_stats_t {
    /// Gets served by a cached registration.
    pub hits: u64,
    /// Gets that registered.
    pub misses: u64,
    /// Misses whose registration absorbed overlapping or adjacent regions.
    pub merges: u64,
    /// Regions invalidated by an event.
    pub invalidations: u64,
    /// Unused regions evicted to respect the limits.
    pub evictions: u64,
    /// Regions invalidated while in use, deregistered at their last put.
    pub deferred_deregistrations: u64,
    /// Successful `reg` calls.
    pub registrations: u64,
    /// `dereg` calls.
    pub deregistrations: u64,
    /// Registrations thrown away because an invalidation hit the range meanwhile.
    pub collisions: u64,
    /// `reg` calls that returned an error.
    pub reg_errors: u64,
    /// `dereg` calls that returned an error.
    pub dereg_errors: u64,
    /// Registrations of blind memory made for one use only.
    pub blind_uncached: u64,
    /// Regions in the cache now.
    pub regions: u64,
    /// Bytes registered now.
    pub registered_bytes: u64,
    /// Regions handed out and not yet put.
    pub held: u64,
}

#[derive(Clone, Copy)]
struct UserCtx(*mut c_void);
// SAFETY: only handed back to the caller's callbacks, which the caller promised (header) may
// run on any thread for as long as the cache lives.
unsafe impl Send for UserCtx {}
// SAFETY: as above.
unsafe impl Sync for UserCtx {}

type RegFn = unsafe extern "C" fn(*mut c_void, u64, u64, u32, *mut u64) -> c_int;
type DeregFn = unsafe extern "C" fn(*mut c_void, u64, u64, u64) -> c_int;
type InvalidatedFn = unsafe extern "C" fn(*mut c_void, *const mmn_region_info_t);

struct CRegistrar {
    reg: RegFn,
    dereg: DeregFn,
    ctx: UserCtx,
    dereg_errors: AtomicU64,
}

/// The registrar's handle: the C caller's word, the range (for `dereg`), and whether the
/// invalidated callback was attached to the region already.
struct CReg {
    user: u64,
    range: PageRange,
    access: u32,
    hooked: AtomicBool,
}

fn access_bits(a: Access) -> u32 {
    (u32::from(a.read()) * MMN_ACCESS_READ) | (u32::from(a.write()) * MMN_ACCESS_WRITE)
}

impl Registrar for CRegistrar {
    type Handle = CReg;

    fn register(&self, range: PageRange, access: Access) -> Result<CReg, RegistrarError> {
        let mut user = 0u64;
        let bits = access_bits(access);
        // SAFETY: the caller's callback and ctx (valid until destroy, header contract); `user`
        // is a live local for the call.
        let r = in_callback(|| unsafe {
            (self.reg)(self.ctx.0, range.start(), range.len(), bits, &mut user)
        });
        if r != 0 {
            return Err(Box::new(Refusal(format!(
                "the reg callback returned {r} for {range}"
            ))));
        }
        Ok(CReg {
            user,
            range,
            access: bits,
            hooked: AtomicBool::new(false),
        })
    }

    fn deregister(&self, handle: &CReg) {
        // SAFETY: as in `register`.
        let r = in_callback(|| unsafe {
            (self.dereg)(
                self.ctx.0,
                handle.range.start(),
                handle.range.len(),
                handle.user,
            )
        });
        if r != 0 {
            self.dereg_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct CCache {
    cache: Cache<Arc<CRegistrar>>,
    registrar: Arc<CRegistrar>,
    invalidated: Option<InvalidatedFn>,
    ctx: UserCtx,
    held: AtomicUsize,
}

/// A handed-out region. INVARIANT: `guard` borrows `cache.cache`; it is declared first, so it
/// is dropped before `cache` (and `put` drops it explicitly before the entry goes).
struct CRegion {
    guard: Mutex<Option<RegionGuard<'static, Arc<CRegistrar>>>>,
    cache: Arc<CCache>,
    info: mmn_region_info_t,
}

/// Cache operations that may wait for an invalidation or a registration in progress are
/// refused inside any callback of this library: from an interval callback or an `invalidated`
/// callback they would wait for the invalidation that runs them, from `reg` / `dereg` for the
/// miss or flush that runs them.
fn refuse_in_callback(what: &str) -> Result<(), CError> {
    if inside_callback() {
        return Err(CError::new(
            Code::Deadlock,
            format!(
                "{what} was called from a callback of this library, where it could wait for                  the very invalidation or registration that runs the callback"
            ),
        ));
    }
    Ok(())
}

static CACHES: Table<CCache> = Table::new(Kind::Cache);
static REGIONS: Table<CRegion> = Table::new(Kind::Region);

/// How many caches are alive.
pub(crate) fn live() -> usize {
    CACHES.live()
}

/// Creates a registration cache invalidated by the process watcher; stores it in `*out`.
///
/// `params` (not NULL) is copied; `reg` and `dereg` are required. Threads: any, not from a
/// callback of this library's caches (`MMN_EDEADLK`). Errors: `MMN_EFAULT` (NULL `params`,
/// `out`, `reg` or `dereg`), `MMN_EINVAL` (unknown flags or policy), `MMN_ESHUTDOWN`.
#[no_mangle]
pub extern "C" fn mmn_rcache_create(
    params: *const mmn_rcache_params_t,
    out: *mut mmn_rcache_t,
) -> c_int {
    ffi("mmn_rcache_create", || {
        non_null(params, "params")?;
        non_null(out, "out")?;
        // SAFETY: non-NULL; the caller promises an initialised mmn_rcache_params_t.
        let p = unsafe { params.read() };
        let reg = p.reg.ok_or_else(|| CError::null("params->reg"))?;
        let dereg = p.dereg.ok_or_else(|| CError::null("params->dereg"))?;
        if p.flags & !MMN_RCACHE_NO_MERGE != 0 {
            return Err(CError::invalid(format!(
                "unknown flags {:#x} (only MMN_RCACHE_NO_MERGE = 1 is defined)",
                p.flags
            )));
        }
        let policy = match p.blind_policy {
            MMN_BLIND_UNCACHED => BlindSpotPolicy::Uncached,
            MMN_BLIND_VALIDATE_FRAMES => BlindSpotPolicy::ValidateFrames,
            MMN_BLIND_TRUST => BlindSpotPolicy::Trust,
            other => {
                return Err(CError::invalid(format!(
                    "blind_policy = {other} is not one of MMN_BLIND_UNCACHED (0), \
                     MMN_BLIND_VALIDATE_FRAMES (1), MMN_BLIND_TRUST (2)"
                )))
            }
        };
        let mut config = Config::default()
            .merge(p.flags & MMN_RCACHE_NO_MERGE == 0)
            .blind_spots(policy);
        if p.max_regions != 0 {
            config = config.max_regions(usize::try_from(p.max_regions).unwrap_or(usize::MAX));
        }
        if p.max_bytes != 0 {
            config = config.max_bytes(p.max_bytes);
        }
        if p.max_attempts != 0 {
            config = config.max_attempts(p.max_attempts);
        }
        let w = watcher()?;
        let registrar = Arc::new(CRegistrar {
            reg,
            dereg,
            ctx: UserCtx(p.ctx),
            dereg_errors: AtomicU64::new(0),
        });
        let cache = Cache::new(registrar.clone(), EventSource::Watcher(w), config);
        let handle = CACHES.insert(Arc::new(CCache {
            cache,
            registrar,
            invalidated: p.invalidated,
            ctx: UserCtx(p.ctx),
            held: AtomicUsize::new(0),
        }))?;
        // SAFETY: non-NULL; writable by the header's contract.
        unsafe { out.write(mmn_rcache_t { bits: handle }) };
        Ok(0)
    })
}

/// Destroys a cache: every registration is deregistered (`dereg` runs on this thread), the
/// handle goes stale. Refused with `MMN_EBUSY` while regions of it are held (put them first),
/// and with `MMN_EDEADLK` from a callback of this library.
///
/// Threads: any. Errors: `MMN_EBADF`, `MMN_EBUSY`, `MMN_EDEADLK`.
#[no_mangle]
pub extern "C" fn mmn_rcache_destroy(cache: mmn_rcache_t) -> c_int {
    ffi("mmn_rcache_destroy", || {
        refuse_in_callback("mmn_rcache_destroy")?;
        let c = CACHES.get(cache.bits)?;
        let held = c.held.load(Ordering::Acquire);
        if held > 0 {
            return Err(CError::new(
                Code::Busy,
                format!(
                    "cache {:#x} still has {held} region(s) handed out; mmn_rcache_put them first",
                    cache.bits
                ),
            ));
        }
        drop(c);
        // The last Arc (ours, unless a get is in flight) drops the cache here.
        drop(CACHES.remove(cache.bits)?);
        Ok(0)
    })
}

fn access_from(bits: u32) -> Result<Access, CError> {
    match bits {
        MMN_ACCESS_READ => Ok(Access::READ),
        MMN_ACCESS_WRITE => Ok(Access::WRITE),
        b if b == MMN_ACCESS_READ | MMN_ACCESS_WRITE => Ok(Access::READ_WRITE),
        other => Err(CError::invalid(format!(
            "access = {other:#x} is not a non-empty combination of MMN_ACCESS_READ (1) and \
             MMN_ACCESS_WRITE (2)"
        ))),
    }
}

/// A registration covering `[addr, addr + len)` with at least `access` (`MMN_ACCESS_*`):
/// a cached one when a valid region contains it, else a new one from `reg`. On success
/// `*out` holds the region (put it with `mmn_rcache_put`), and `*info` (if not NULL) what it
/// covers. A hit after a call that unmapped, madvised or remapped the memory returned is
/// impossible.
///
/// Threads: any, concurrently; not from a callback of this library (`MMN_EDEADLK`: it could
/// wait for the invalidation or registration that runs the callback). Errors: `MMN_EFAULT` (NULL `out`), `MMN_EBADF`, `MMN_EINVAL` (zero
/// length, wrapping, bad access), `MMN_ENOMEM` (not mapped), `MMN_ECALLBACK` (`reg` failed),
/// `MMN_ENOSPC` (limits), `MMN_EAGAIN` (the memory kept changing), and the fail-closed codes.
#[no_mangle]
pub extern "C" fn mmn_rcache_get(
    cache: mmn_rcache_t,
    addr: u64,
    len: u64,
    access: u32,
    out: *mut mmn_region_t,
    info: *mut mmn_region_info_t,
) -> c_int {
    ffi("mmn_rcache_get", || {
        non_null(out, "out")?;
        let access = access_from(access)?;
        let c = CACHES.get(cache.bits)?;
        refuse_in_callback("mmn_rcache_get")?;
        let guard = c.cache.get(addr, len, access)?;
        let handle = guard.handle();
        let region_info = mmn_region_info_t {
            start: guard.range().start(),
            len: guard.range().len(),
            reg_handle: handle.user,
            access: handle.access,
            cached: u8::from(guard.is_cached()),
        };
        if let Some(cb) = c.invalidated {
            if guard.is_cached() && !handle.hooked.swap(true, Ordering::AcqRel) {
                let ctx = c.ctx;
                let report = region_info;
                guard.on_invalidate(move |_| {
                    let ctx = ctx;
                    // SAFETY: the caller's callback and ctx, valid until destroy (header);
                    // `report` lives across the call.
                    in_callback(|| unsafe { cb(ctx.0, &report) });
                });
            }
        }
        // SAFETY: INVARIANT of CRegion: the guard borrows `c.cache`, which lives in the Arc
        // the region entry holds (its address never moves), and the guard is dropped before
        // that Arc is (field order, and `put` drops it first). Only the lifetime changes.
        let guard: RegionGuard<'static, Arc<CRegistrar>> = unsafe { std::mem::transmute(guard) };
        c.held.fetch_add(1, Ordering::AcqRel);
        let entry = Arc::new(CRegion {
            guard: Mutex::new(Some(guard)),
            cache: Arc::clone(&c),
            info: region_info,
        });
        let h = match REGIONS.insert(entry.clone()) {
            Ok(h) => h,
            Err(e) => {
                put_entry(&entry);
                return Err(e);
            }
        };
        // SAFETY: non-NULL; writable by the header's contract.
        unsafe { out.write(mmn_region_t { bits: h }) };
        if !info.is_null() {
            // SAFETY: non-NULL; writable by the header's contract.
            unsafe { info.write(region_info) };
        }
        Ok(0)
    })
}

fn put_entry(entry: &CRegion) {
    let guard = entry.guard.lock().take();
    if guard.is_some() {
        drop(guard);
        entry.cache.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Puts a region back (UCX's `ucs_rcache_region_put`): the handle goes stale. The last put of
/// an invalidated region deregisters it, calling `dereg` on this thread.
///
/// Threads: any, callbacks included. Errors: `MMN_EBADF` (also for a second put of the same region).
#[no_mangle]
pub extern "C" fn mmn_rcache_put(region: mmn_region_t) -> c_int {
    ffi("mmn_rcache_put", || {
        let entry = REGIONS.remove(region.bits)?;
        put_entry(&entry);
        Ok(0)
    })
}

/// Stores what a held region covers in `*info`. Threads: any. Errors: `MMN_EFAULT`,
/// `MMN_EBADF`.
#[no_mangle]
pub extern "C" fn mmn_region_info(region: mmn_region_t, info: *mut mmn_region_info_t) -> c_int {
    ffi("mmn_region_info", || {
        non_null(info, "info")?;
        let entry = REGIONS.get(region.bits)?;
        // SAFETY: non-NULL; writable by the header's contract.
        unsafe { info.write(entry.info) };
        Ok(0)
    })
}

/// Whether the memory behind a held region changed since it was registered: 1 if so (stop
/// starting I/O on it; it stays registered until put), 0 if not. Threads: any, callbacks
/// included. Errors: `MMN_EBADF`.
#[no_mangle]
pub extern "C" fn mmn_region_invalidated(region: mmn_region_t) -> c_int {
    ffi("mmn_region_invalidated", || {
        let entry = REGIONS.get(region.bits)?;
        let guard = entry.guard.lock();
        Ok(guard
            .as_ref()
            .map_or(1, |g| c_int::from(g.is_invalidated())))
    })
}

/// Deregisters the regions invalidated while unused now (normally done by the next get).
/// Threads: any, not from a callback (`MMN_EDEADLK`). Errors: `MMN_EBADF`, `MMN_EDEADLK`.
#[no_mangle]
pub extern "C" fn mmn_rcache_flush(cache: mmn_rcache_t) -> c_int {
    ffi("mmn_rcache_flush", || {
        let c = CACHES.get(cache.bits)?;
        refuse_in_callback("mmn_rcache_flush")?;
        c.cache.flush();
        Ok(0)
    })
}

/// Evicts every unused region (and flushes); returns how many were evicted.
/// Threads: any, not from a callback (`MMN_EDEADLK`). Errors: `MMN_EBADF`, `MMN_EDEADLK`.
#[no_mangle]
pub extern "C" fn mmn_rcache_purge(cache: mmn_rcache_t) -> c_int {
    ffi("mmn_rcache_purge", || {
        let c = CACHES.get(cache.bits)?;
        refuse_in_callback("mmn_rcache_purge")?;
        let n = c.cache.purge();
        Ok(c_int::try_from(n).unwrap_or(c_int::MAX))
    })
}

/// Fills `*out` with the cache's counters. Threads: any. Errors: `MMN_EFAULT`, `MMN_EBADF`.
#[no_mangle]
pub extern "C" fn mmn_rcache_stats(cache: mmn_rcache_t, out: *mut mmn_rcache_stats_t) -> c_int {
    ffi("mmn_rcache_stats", || {
        non_null(out, "out")?;
        let c = CACHES.get(cache.bits)?;
        let s = c.cache.stats();
        // SAFETY: non-NULL; writable by the header's contract.
        unsafe {
            out.write(mmn_rcache_stats_t {
                hits: s.hits,
                misses: s.misses,
                merges: s.merges,
                invalidations: s.invalidations,
                evictions: s.evictions,
                deferred_deregistrations: s.deferred_deregistrations,
                registrations: s.registrations,
                deregistrations: s.deregistrations,
                collisions: s.collisions,
                reg_errors: s.registrar_errors,
                dereg_errors: c.registrar.dereg_errors.load(Ordering::Relaxed),
                blind_uncached: s.blind_uncached,
                regions: s.regions as u64,
                registered_bytes: s.registered_bytes,
                held: c.held.load(Ordering::Relaxed) as u64,
            })
        };
        Ok(0)
    })
}
