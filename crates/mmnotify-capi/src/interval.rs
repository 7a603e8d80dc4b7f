//! Interval subscriptions with a C callback, and the collision-retry pair.
//!
//! `mmn_subscribe` inserts an engine interval subscription on the watcher's address space
//! (after `watch`ing the range, so the kernel reports its changes) whose subscriber is a
//! trampoline: on each overlapping invalidation it marks the interval invalidated
//! (`set_seq`) and then calls the C callback with the range, the event and whether it may
//! block. Marking *before* the callback lets C users skip the kernel's `set_seq` ritual: a
//! fill that commits under the lock the callback takes is either seen by `mmn_read_retry` (the
//! mark happened first) or dropped by the callback (the commit happened first):
//!
//! ```text
//!   filler                                  dispatcher
//!   seq = mmn_read_begin()                  set_seq (release)      <- the library
//!   look up pages (may fault, sleep)        cb: lock; drop entries in range; unlock
//!   lock
//!   if mmn_read_retry(seq) != 0: unlock, retry
//!   commit; unlock
//! ```
//!
//! The C sequence `mmn_seq_t` carries the interval's handle (so a sequence checked against
//! another interval is refused) and the watcher's sequence snapshot, copied as opaque words.
//!
//! The callback's return value: `0` = done; `MMN_EAGAIN` = refused, allowed only when
//! `may_block` is 0 (the invalidation then fails, as Linux's non-blockable start does). Any
//! other value is a misbehaving callback: it is counted in the subscription's statistics and
//! its last message recorded (`mmn_interval_stats`), and treated as done, since the marking
//! already happened.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::{Event, IntervalCtx, IntervalSubscriber, Invalidate, Invalidation, Range};
use mmnotify_uffd::{WatchSeq, WatchedInterval, Watcher};

use crate::error::{ffi, non_null, CError, Code, MMN_EAGAIN};
use crate::handle::{Kind, Table};
use crate::process::{in_callback, inside_callback, watcher};

/// The memory was unmapped (munmap, mremap away, MAP_FIXED over, brk shrink, shmdt,
/// ftruncate).
pub const MMN_EVENT_UNMAP: u32 = 1;
/// The pages were dropped but the mapping stays (madvise DONTNEED/FREE/REMOVE, hole punch).
pub const MMN_EVENT_CLEAR: u32 = 2;
/// Protection changed on whole VMAs.
pub const MMN_EVENT_PROTECTION_VMA: u32 = 3;
/// Protection changed on pages (a fork with fork events: the parent's next write copies).
pub const MMN_EVENT_PROTECTION_PAGE: u32 = 4;
/// The watcher is going away (`mmn_fini` of the last reference, or a failure): the range
/// will not be reported on any more.
pub const MMN_EVENT_RELEASE: u32 = 5;
/// Any other change.
pub const MMN_EVENT_OTHER: u32 = 6;

/// Subscribe without `watch`ing the range first (the caller watches, or drives the
/// invalidations only through the cooperative wrappers).
pub const MMN_SUBSCRIBE_NO_WATCH: u32 = 1;

/// An interval subscription. The all-zero value is never a valid handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub struct mmn_interval_t {
    /// Opaque.
    pub bits: u64,
}

/// One invalidation, as the callback sees it. Valid only during the callback.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct mmn_invalidation_t {
    /// First byte of the invalidated range (not clipped to the subscription).
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// `MMN_EVENT_*`.
    pub event: u32,
    /// 1 if the callback may sleep (take a mutex, wait for a device); 0 if it must not,
    /// in which case it may return `MMN_EAGAIN` to refuse.
    pub may_block: u8,
    /// The subscription being invalidated (all-zero for an invalidation that arrives before
    /// `mmn_subscribe` has returned the handle).
    pub interval: mmn_interval_t,
}

/// The callback of an interval subscription: called once per invalidation that overlaps
/// the subscription, with the `ctx` given to `mmn_subscribe`.
///
/// It runs on the watcher's dispatching thread (kernel events) or on the thread of a
/// cooperative call (`mmn_munmap`, ...). The interval is already marked invalidated when it
/// runs: under the lock the filler holds around `mmn_read_retry` and its commit, drop the
/// mirror's entries for `[inv->start, inv->end)`, then return 0. It may block when
/// `inv->may_block` is 1; it may unmap memory (also watched memory) and call `mmn_watch`,
/// `mmn_read_retry`, `mmn_munmap` and friends; it must not call `mmn_read_begin`,
/// `mmn_unsubscribe` of its own subscription, `mmn_rcache_destroy` or `mmn_fini`
/// (`MMN_EDEADLK`), and must not unwind (C++ exceptions, longjmp) out of it.
#[allow(non_camel_case_types)]
pub type mmn_invalidate_fn =
    Option<unsafe extern "C" fn(ctx: *mut c_void, inv: *const mmn_invalidation_t) -> c_int>;

/// A sequence snapshot from `mmn_read_begin`, checked by `mmn_read_retry`. Opaque.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(non_camel_case_types)]
pub struct mmn_seq_t {
    /// The interval it was taken on.
    pub interval: mmn_interval_t,
    /// Opaque.
    pub words: [u64; 2],
}

/// A subscription's counters (`mmn_interval_stats`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(non_camel_case_types)]
pub struct mmn_interval_stats_t {
    /// Callbacks made.
    pub invalidations: u64,
    /// Callbacks that returned `MMN_EAGAIN` on a non-blockable invalidation (allowed).
    pub refusals: u64,
    /// Callbacks that misbehaved: returned a value other than 0 (or `MMN_EAGAIN` when
    /// `may_block` was 0). Each is treated as done.
    pub callback_errors: u64,
    /// The last misbehaving callback's return value (0 if none).
    pub last_callback_error: c_int,
}

/// `ctx` is the C caller's: the header's contract says it must stay valid and be usable from
/// any thread until `mmn_unsubscribe` returns.
#[derive(Clone, Copy)]
struct UserCtx(*mut c_void);
// SAFETY: the pointer is only handed back to the C callback; the caller promised (header)
// that it may be used from any thread, for as long as the subscription lives.
unsafe impl Send for UserCtx {}
// SAFETY: as above.
unsafe impl Sync for UserCtx {}

struct Trampoline {
    callback: unsafe extern "C" fn(*mut c_void, *const mmn_invalidation_t) -> c_int,
    ctx: UserCtx,
    handle: AtomicU64,
    invalidations: AtomicU64,
    refusals: AtomicU64,
    callback_errors: AtomicU64,
    last_callback_error: AtomicU64,
}

fn event_code(e: Event) -> u32 {
    match e {
        Event::Unmap => MMN_EVENT_UNMAP,
        Event::Clear => MMN_EVENT_CLEAR,
        Event::ProtectionVma => MMN_EVENT_PROTECTION_VMA,
        Event::ProtectionPage => MMN_EVENT_PROTECTION_PAGE,
        Event::Release => MMN_EVENT_RELEASE,
        _ => MMN_EVENT_OTHER,
    }
}

thread_local! {
    /// The subscriptions whose callbacks run on this thread now (innermost last).
    static RUNNING: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl IntervalSubscriber for Trampoline {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        ctx.set_seq();
        let handle = self.handle.load(Ordering::Acquire);
        let c = mmn_invalidation_t {
            start: inv.range().start(),
            end: inv.range().end(),
            event: event_code(inv.event()),
            may_block: u8::from(inv.is_blockable()),
            interval: mmn_interval_t { bits: handle },
        };
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        let _ = RUNNING.try_with(|r| r.borrow_mut().push(handle));
        // SAFETY: the C function pointer and ctx given to mmn_subscribe, valid until
        // unsubscribe returns (which waits for this call); `c` lives across the call.
        let r = in_callback(|| unsafe { (self.callback)(self.ctx.0, &c) });
        let _ = RUNNING.try_with(|r| r.borrow_mut().pop());
        match r {
            0 => Invalidate::Done,
            MMN_EAGAIN if !inv.is_blockable() => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                Invalidate::Refused
            }
            other => {
                self.callback_errors.fetch_add(1, Ordering::Relaxed);
                self.last_callback_error
                    .store(other as u32 as u64, Ordering::Relaxed);
                Invalidate::Done
            }
        }
    }
}

struct Subscription {
    interval: WatchedInterval,
    watcher: Watcher,
    trampoline: Arc<Trampoline>,
}

static TABLE: Table<Subscription> = Table::new(Kind::Interval);

/// How many subscriptions are alive.
pub(crate) fn live() -> usize {
    TABLE.live()
}

/// Subscribes to invalidations of `[addr, addr + len)` (any byte range; non-empty, not
/// wrapping). Unless `flags` has `MMN_SUBSCRIBE_NO_WATCH`, the page-aligned range covering it
/// is watched first (`mmn_watch`), which fails with `MMN_ENOMEM` if nothing there is mapped.
/// On success `*out` holds the subscription.
///
/// `callback` (not NULL) is called with `ctx` for every invalidation overlapping the range,
/// from the moment this call returns until `mmn_unsubscribe` returns; see
/// `mmn_invalidate_fn` for what it may do. `ctx` is not touched by the library; it must stay
/// valid, and be safe to use from the dispatching thread, until then.
///
/// Threads: any (also from a callback). Errors: `MMN_EFAULT` (NULL `callback` or `out`),
/// `MMN_EINVAL` (empty, wrapping range, unknown flags), `MMN_ESHUTDOWN`, and `mmn_watch`'s.
#[no_mangle]
pub extern "C" fn mmn_subscribe(
    addr: u64,
    len: u64,
    callback: mmn_invalidate_fn,
    ctx: *mut c_void,
    flags: u32,
    out: *mut mmn_interval_t,
) -> c_int {
    ffi("mmn_subscribe", || {
        non_null(out, "out")?;
        let callback = callback.ok_or_else(|| CError::null("callback"))?;
        if flags & !MMN_SUBSCRIBE_NO_WATCH != 0 {
            return Err(CError::invalid(format!(
                "unknown flags {flags:#x} (only MMN_SUBSCRIBE_NO_WATCH = 1 is defined)"
            )));
        }
        let range = Range::from_len(addr, len)?;
        let w = watcher()?;
        if flags & MMN_SUBSCRIBE_NO_WATCH == 0 {
            let ps = mmnotify_uffd::page_size();
            let start = range.start() & !(ps - 1);
            let end = range.end().checked_add(ps - 1).ok_or_else(|| {
                CError::invalid(format!(
                    "the range of {len:#x} bytes at {addr:#x}, rounded to pages, wraps past the \
                     end of the address space"
                ))
            })? & !(ps - 1);
            let _ = w.watch(start, end - start)?;
        }
        let trampoline = Arc::new(Trampoline {
            callback,
            ctx: UserCtx(ctx),
            handle: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            callback_errors: AtomicU64::new(0),
            last_callback_error: AtomicU64::new(0),
        });
        let interval = w.insert_interval(range, trampoline.clone())?;
        let sub = Arc::new(Subscription {
            interval,
            watcher: w,
            trampoline: trampoline.clone(),
        });
        let handle = match TABLE.insert(sub.clone()) {
            Ok(h) => h,
            Err(e) => {
                let _ = sub.watcher.remove_interval(&sub.interval);
                return Err(e);
            }
        };
        trampoline.handle.store(handle, Ordering::Release);
        // SAFETY: non-NULL; writable by the header's contract.
        unsafe { out.write(mmn_interval_t { bits: handle }) };
        Ok(0)
    })
}

/// Ends a subscription. When it returns, the callback is not running and will not be called
/// again, and the handle is stale (`MMN_EBADF` everywhere); `ctx` may be freed.
///
/// Threads: any, but from inside the subscription's own callback it is refused with
/// `MMN_EDEADLK` (it would wait for that callback to return); the subscription stays.
/// Errors: `MMN_EBADF`, `MMN_EDEADLK`.
#[no_mangle]
pub extern "C" fn mmn_unsubscribe(interval: mmn_interval_t) -> c_int {
    ffi("mmn_unsubscribe", || {
        let sub = TABLE.get(interval.bits)?;
        let own = RUNNING
            .try_with(|r| r.borrow().contains(&interval.bits))
            .unwrap_or(false);
        if own {
            return Err(CError::new(
                Code::Deadlock,
                format!(
                    "subscription {:#x} was asked to unsubscribe from inside its own callback, \
                     which would wait for itself; unsubscribe after the callback returns",
                    interval.bits
                ),
            ));
        }
        sub.watcher.remove_interval(&sub.interval)?;
        TABLE.remove(interval.bits)?;
        Ok(0)
    })
}

fn begin(
    function: &'static str,
    interval: mmn_interval_t,
    out: *mut mmn_seq_t,
    timeout: Option<Duration>,
) -> c_int {
    ffi(function, || {
        non_null(out, "out")?;
        let sub = TABLE.get(interval.bits)?;
        if inside_callback() {
            return Err(CError::new(
                Code::Deadlock,
                format!(
                    "called from a callback of this library, where it would wait for the                      invalidation that runs the callback (interval {:#x})",
                    interval.bits
                ),
            ));
        }
        let seq = match timeout {
            Some(t) => sub.interval.read_begin_timeout(t),
            None => sub.interval.read_begin(),
        }?;
        // SAFETY: non-NULL; writable by the header's contract.
        unsafe {
            out.write(mmn_seq_t {
                interval,
                words: seq.to_words(),
            })
        };
        Ok(0)
    })
}

/// Begins a fill of the mirror of `interval`: waits while an invalidation of it is running or
/// while invalidations read from the kernel are not yet delivered, then stores the snapshot in
/// `*out`. Look up the memory (fault it in, pin it, may sleep) without the mirror's lock, then
/// check `mmn_read_retry` under it.
///
/// Threads: any but a callback's (`MMN_EDEADLK`: it would wait for itself). Errors:
/// `MMN_EFAULT`, `MMN_EBADF`, `MMN_EDEADLK`, and the fail-closed codes `MMN_ECHILD` (a
/// forked child), `MMN_EIO` (the watcher failed), `MMN_ESHUTDOWN`.
#[no_mangle]
pub extern "C" fn mmn_read_begin(interval: mmn_interval_t, out: *mut mmn_seq_t) -> c_int {
    begin("mmn_read_begin", interval, out, None)
}

/// `mmn_read_begin`, giving up after `timeout_us` microseconds with `MMN_ETIMEDOUT`.
#[no_mangle]
pub extern "C" fn mmn_read_begin_timeout(
    interval: mmn_interval_t,
    timeout_us: u64,
    out: *mut mmn_seq_t,
) -> c_int {
    begin(
        "mmn_read_begin_timeout",
        interval,
        out,
        Some(Duration::from_micros(timeout_us)),
    )
}

/// Whether the fill begun with `*seq` must be retried: returns 0 when it may be committed,
/// 1 when an invalidation touched the interval since (or one read from the kernel may not have
/// reached it yet, or the watcher can no longer vouch: forked, failed, shut down), and a
/// negative code for bad arguments, which also means "do not commit". So `!= 0` means retry.
///
/// Call it under the lock the callback takes to drop entries, and commit before unlocking.
/// Never blocks; callable from any thread, callbacks included. Errors: `MMN_EFAULT`,
/// `MMN_EBADF`, `MMN_EINVAL` (a sequence taken on another interval).
#[no_mangle]
pub extern "C" fn mmn_read_retry(interval: mmn_interval_t, seq: *const mmn_seq_t) -> c_int {
    ffi("mmn_read_retry", || {
        non_null(seq, "seq")?;
        // SAFETY: non-NULL; the caller promises an initialised mmn_seq_t.
        let seq = unsafe { seq.read() };
        if seq.interval != interval {
            return Err(CError::invalid(format!(
                "the sequence was taken on interval {:#x}, not on {:#x}",
                seq.interval.bits, interval.bits
            )));
        }
        let sub = TABLE.get(interval.bits)?;
        Ok(c_int::from(
            sub.interval.read_retry(WatchSeq::from_words(seq.words)),
        ))
    })
}

/// Fills `*out` with the subscription's counters, including how often its callback
/// misbehaved. Threads: any. Errors: `MMN_EFAULT`, `MMN_EBADF`.
#[no_mangle]
pub extern "C" fn mmn_interval_stats(
    interval: mmn_interval_t,
    out: *mut mmn_interval_stats_t,
) -> c_int {
    ffi("mmn_interval_stats", || {
        non_null(out, "out")?;
        let sub = TABLE.get(interval.bits)?;
        let t = &sub.trampoline;
        // SAFETY: non-NULL; writable by the header's contract.
        unsafe {
            out.write(mmn_interval_stats_t {
                invalidations: t.invalidations.load(Ordering::Relaxed),
                refusals: t.refusals.load(Ordering::Relaxed),
                callback_errors: t.callback_errors.load(Ordering::Relaxed),
                last_callback_error: t.last_callback_error.load(Ordering::Relaxed) as u32 as c_int,
            })
        };
        Ok(0)
    })
}

/// The range of a subscription, for diagnostics: stores it in `*start` and `*end`.
/// Threads: any. Errors: `MMN_EFAULT`, `MMN_EBADF`.
#[no_mangle]
pub extern "C" fn mmn_interval_range(
    interval: mmn_interval_t,
    start: *mut u64,
    end: *mut u64,
) -> c_int {
    ffi("mmn_interval_range", || {
        non_null(start, "start")?;
        non_null(end, "end")?;
        let r = TABLE.get(interval.bits)?.interval.range();
        // SAFETY: both non-NULL; writable by the header's contract.
        unsafe {
            start.write(r.start());
            end.write(r.end());
        }
        Ok(0)
    })
}
