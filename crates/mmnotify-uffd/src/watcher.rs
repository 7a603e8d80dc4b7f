//! The process's one watcher: the userfaultfd, the engine `Mm` that stands for this address
//! space, the reading thread and the dispatching thread.
//!
//! ```text
//!   any thread:  munmap(watched) ──► kernel queues UNMAP, sleeps until it is read
//!                                          │
//!   reader:      poll ─► gate.open_batch ─► read(uffd) ─► handoff.push(msgs, End(n))
//!                (never runs user code, never allocates, never waits for the dispatcher)
//!                                          │
//!   dispatcher:  handoff.pop ─► mm.invalidate_start(range, event).end() ─► gate.close_batch(n)
//!                (runs every subscriber callback; a callback may unmap watched memory: the
//!                 reader is free to read that message, so the unmap completes)
//! ```
//!
//! **One per process.** A VMA belongs to at most one userfaultfd, so two watchers would fight
//! (EBUSY). [`Watcher::get`] returns the process's watcher, creating it on first use; clones
//! share it; the last handle dropped (or [`Watcher::shutdown`]) stops it: the reader closes the
//! userfaultfd on its way out (which unregisters every range and releases any unmapper still
//! waiting), the dispatcher delivers what was read, then releases the `Mm` (every interval
//! subscriber gets `Event::Release` over `Range::ALL`, every classic one `release`), and both
//! threads are joined — unless the last handle drops on the dispatcher itself (inside a
//! callback), where joining would wait for itself; the threads then finish on their own.
//!
//! **Creation.** The handshake is probed on a throwaway descriptor (it may be done once per
//! descriptor and answers with the kernel's whole feature set): without `UFFD_USER_MODE_ONLY`
//! (Linux < 5.11) or without the UNMAP/REMOVE/REMAP events the kernel is too old; WP_ASYNC is
//! taken where offered (it lets file-backed memory be watched); EVENT_FORK only when the options
//! ask for it and the kernel permits it (it needs CAP_SYS_PTRACE).
//!
//! **Fork events.** With EVENT_FORK, `fork()` in this process blocks until the reader has read
//! the FORK message, which carries a new userfaultfd for the child. The reader closes it at
//! once: the child's copies of the watched VMAs are then unregistered, so a child that unmaps
//! them never waits for a reader it does not have. The parent's subscribers get
//! `Event::ProtectionPage` over `Range::ALL` (fork write-protects the parent's private memory:
//! its next write copies the page). The reader allocates nothing between `poll` and `read`,
//! because the forking thread holds the allocator's locks while it waits.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mmnotify::{Event, IntervalSubscriber, Mm, Range};
use rustix::event::{PollFd, PollFlags};

use crate::error::{Error, FailReason, Result};
use crate::gate::{self, Gate, Health};
use crate::handoff::{Handoff, Item};
use crate::interval::WatchedInterval;
use crate::sync::{Mutex, RwLock};
use crate::sys::{self, Msg};
use crate::watch::{self, WatchReport};

/// Whether the watcher asks for fork events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ForkEvents {
    /// Never (the default): a child's copies of watched memory are simply unregistered, and
    /// the parent hears nothing about the fork.
    #[default]
    Off,
    /// Where the kernel permits it (CAP_SYS_PTRACE), otherwise silently off.
    IfPermitted,
    /// Required: creation fails with [`Error::ForkEventsNotPermitted`] where it is refused.
    Required,
}

/// How the process's watcher is built; see [`Watcher::with_options`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WatcherOptions {
    /// Fork events (default [`ForkEvents::Off`]).
    pub fork_events: ForkEvents,
    /// Capacity of the reader→dispatcher ring, in messages (default 4096). Past it, messages
    /// are folded into one covering invalidation (more than needed, never less).
    pub queue_capacity: usize,
    /// Messages read per `read(2)` (default 64).
    pub read_batch: usize,
}

impl Default for WatcherOptions {
    fn default() -> Self {
        WatcherOptions {
            fork_events: ForkEvents::Off,
            queue_capacity: 4096,
            read_batch: 64,
        }
    }
}

/// What the kernel offered and what the watcher uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Features {
    /// Every `UFFD_FEATURE_*` bit this kernel supports.
    pub supported: u64,
    /// The bits the watcher's userfaultfd was configured with.
    pub enabled: u64,
    /// WP_ASYNC is on: file-backed and SysV shm memory can be watched.
    pub wp_async: bool,
    /// EVENT_FORK is on.
    pub fork_events: bool,
}

/// Counters, for tests, demos and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatcherStats {
    /// Batches the reader opened (one per wake-up with the userfaultfd readable).
    pub batches_opened: u64,
    /// Batches fully delivered to the engine.
    pub batches_delivered: u64,
    /// UNMAP messages read.
    pub unmaps: u64,
    /// REMOVE messages read.
    pub removes: u64,
    /// REMAP messages read.
    pub remaps: u64,
    /// FORK messages read (each child descriptor closed at once).
    pub forks: u64,
    /// Other messages (page faults never happen in WP-only mode without write protection).
    pub others: u64,
    /// Invalidations delivered to the engine (start + end).
    pub invalidations: u64,
    /// Times the hand-off ring overflowed and messages were folded.
    pub overflows: u64,
    /// Subscriber callbacks that panicked on the dispatcher (each caught; the watcher goes on).
    pub callback_panics: u64,
}

#[derive(Default)]
struct Counters {
    unmaps: AtomicU64,
    removes: AtomicU64,
    remaps: AtomicU64,
    forks: AtomicU64,
    others: AtomicU64,
    invalidations: AtomicU64,
    callback_panics: AtomicU64,
}

/// A fault to inject (feature `fault-injection`, tests only).
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The reader panics at its next wake-up, as a bug in it would.
    KillReader,
    /// The userfaultfd's descriptor number is closed behind the watcher's back, as a
    /// `close_range` in library code would.
    CloseUffd,
}

const INJECT_NONE: u8 = 0;
const INJECT_KILL: u8 = 1;

/// How often the reader wakes without events to check that its descriptor is still its own.
const HEARTBEAT: Duration = Duration::from_millis(200);

pub(crate) struct Core {
    pub(crate) gate: Arc<Gate>,
    mm: Mm,
    /// The userfaultfd; `None` once the reader closed it. Registration takes the read lock for
    /// the ioctl; the reader takes the write lock to close.
    uffd: RwLock<Option<OwnedFd>>,
    raw_fd: i32,
    identity: (u64, u64),
    wake_fd: OwnedFd,
    handoff: Handoff,
    features: Features,
    options: WatcherOptions,
    counters: Counters,
    inject: AtomicU8,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// A private page for the mmap_lock fence.
    scratch: Scratch,
    remap_hooks: Mutex<Vec<RemapHook>>,
}

type RemapHook = Arc<dyn Fn(Remap) + Send + Sync>;

/// A move reported by the kernel (mremap): `len` bytes went from `from` to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Remap {
    /// The old start.
    pub from: u64,
    /// The new start.
    pub to: u64,
    /// The length moved.
    pub len: u64,
}

/// How long the dispatcher waits to see a REMOVE's zap begin (U4).
const ZAP_WAIT: Duration = Duration::from_millis(2);
/// The most pages of a REMOVE range it watches for the zap.
const ZAP_PAGES: u64 = 512;

/// What a REMOVE range looked like when its message was taken from the queue: which pages were
/// present (and their frames, where visible). The zap that follows a REMOVE runs in the
/// madvising thread after it re-takes `mmap_lock` for reading; once a page that was present is
/// seen gone (or backed by another frame), that thread holds the lock or has finished, and a
/// write-lock fence then waits for the zap to complete.
struct ZapWatch {
    start: u64,
    present: Vec<(usize, Option<u64>)>,
}

impl ZapWatch {
    fn snapshot(start: u64, end: u64) -> ZapWatch {
        let ps = sys::page_size();
        let pages = (end.saturating_sub(start) / ps).min(ZAP_PAGES) as usize;
        let read = |pages| {
            crate::pagemap::entries(start, pages)
                .map(|es| {
                    es.iter()
                        .enumerate()
                        .filter(|(_, e)| e.present())
                        .map(|(i, e)| (i, e.pfn()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        let present = read(pages);
        if !present.is_empty() || pages == 0 {
            return ZapWatch { start, present };
        }
        // Nothing present: nothing would show the zap. Make the first page present without
        // changing its contents (a read fault maps the zero page or the file's page); the zap
        // clears it first, and the fence waits for the rest.
        const MADV_POPULATE_READ: i32 = 22;
        // SAFETY: populating for reading changes no contents; on a hole it fails harmlessly.
        unsafe { libc::madvise(start as *mut libc::c_void, ps as usize, MADV_POPULATE_READ) };
        ZapWatch {
            start,
            present: read(1),
        }
    }

    /// Waits (at most [`ZAP_WAIT`]) until every page that was present is gone or re-backed.
    /// Returns whether the zap was seen. MADV_FREE leaves pages mapped, so it runs to the
    /// bound; nothing can go stale there until reclaim (a blind spot of its own).
    fn wait_for_zap(&self) -> bool {
        let Some(&(last, _)) = self.present.last() else {
            return false;
        };
        let deadline = Instant::now() + ZAP_WAIT;
        loop {
            if let Ok(now) = crate::pagemap::entries(self.start, last + 1) {
                let zapped = self.present.iter().all(|&(i, pfn)| {
                    let e = now[i];
                    !e.present() || (pfn.is_some() && e.pfn() != pfn)
                });
                if zapped {
                    return true;
                }
            } else {
                return false;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::yield_now();
        }
    }
}

/// A private anonymous page owned by the watcher, unmapped on drop.
struct Scratch(usize);

impl Scratch {
    fn new() -> Result<Scratch> {
        // SAFETY: a fresh private anonymous page at an address of the kernel's choosing.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                sys::page_size() as usize,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .map_err(|e| Error::syscall("mmap", e))?;
        Ok(Scratch(p as usize))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `Scratch::new` and nothing else refers to it.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, sys::page_size() as usize) };
    }
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("gate", &self.gate)
            .field("raw_fd", &self.raw_fd)
            .field("features", &self.features)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The last `Watcher` handle's drop shuts the watcher down.
#[derive(Debug)]
struct Handle {
    core: Arc<Core>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.core.shutdown();
    }
}

/// The process's userfaultfd watcher. Cheap to clone; all clones share one watcher.
///
/// ```no_run
/// use std::sync::Arc;
/// use mmnotify::{IntervalCtx, IntervalSubscriber, Invalidate, Invalidation};
/// use mmnotify_uffd::Watcher;
///
/// struct Mirror;
/// impl IntervalSubscriber for Mirror {
///     fn invalidate(&self, ctx: &IntervalCtx<'_>, _inv: &Invalidation) -> Invalidate {
///         ctx.set_seq(); // under the mirror's lock, then drop its entries
///         Invalidate::Done
///     }
/// }
///
/// let watcher = Watcher::get()?;
/// let buf = vec![0u8; 1 << 20]; // large enough to be its own mmap
/// let (addr, len) = (buf.as_ptr() as u64 & !4095, 1 << 20);
/// let report = watcher.watch(addr, len)?;
/// println!("watched {} VMAs, skipped {:?}", report.watched.len(), report.skipped);
/// let interval = watcher.insert_interval(addr, len, Arc::new(Mirror))?;
/// let seq = interval.read_begin()?;
/// // ... look up the pages (may fault) ...
/// if !interval.read_retry(seq) { /* commit under the mirror's lock */ }
/// # Ok::<(), mmnotify_uffd::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Watcher {
    handle: Arc<Handle>,
}

static PROCESS_WATCHER: Mutex<Option<Weak<Handle>>> = Mutex::new(None);

impl Watcher {
    /// The process's watcher, created with default options on first use (or after the
    /// previous one was shut down or failed). If it exists, it is returned whatever its
    /// options. In a forked child, the parent's watcher is left alone (it fails closed there)
    /// and the child gets a watcher of its own; call this only where no other thread of the
    /// parent could have held the process-wide slot's lock at the fork (for example right
    /// after a fork from a single-threaded point, or after exec).
    ///
    /// # Errors
    ///
    /// The creation errors: [`Error::NoUserfaultfd`], [`Error::NotPermitted`],
    /// [`Error::KernelTooOld`], [`Error::Syscall`].
    pub fn get() -> Result<Watcher> {
        Self::obtain(None)
    }

    /// The process's watcher with these options: created with them if there is none, returned
    /// if the existing one has the same options.
    ///
    /// # Errors
    ///
    /// [`Error::OptionsConflict`] if the existing watcher was created with other options;
    /// [`Error::ForkEventsNotPermitted`]; and the errors of [`Watcher::get`].
    pub fn with_options(options: WatcherOptions) -> Result<Watcher> {
        Self::obtain(Some(options))
    }

    fn obtain(options: Option<WatcherOptions>) -> Result<Watcher> {
        let mut slot = PROCESS_WATCHER.lock();
        if let Some(handle) = slot.as_ref().and_then(Weak::upgrade) {
            match handle.core.gate.health() {
                Health::Running => {
                    if let Some(requested) = options {
                        if requested != handle.core.options {
                            return Err(Error::OptionsConflict {
                                existing: handle.core.options,
                                requested,
                            });
                        }
                    }
                    return Ok(Watcher { handle });
                }
                Health::Forked => {
                    // The parent's watcher, copied into this child: never touch its threads
                    // (they do not exist here) or its descriptors.
                    std::mem::forget(handle);
                }
                Health::ShutDown | Health::Failed(_) => {}
            }
        }
        let core = Core::create(options.unwrap_or_default())?;
        let handle = Arc::new(Handle { core });
        *slot = Some(Arc::downgrade(&handle));
        Ok(Watcher { handle })
    }

    fn core(&self) -> &Arc<Core> {
        &self.handle.core
    }

    /// The engine address space that stands for this process. Register classic subscribers
    /// on it; interval subscribers go through [`Watcher::insert_interval`] so that their
    /// `read_begin`/`read_retry` also cover the read→delivery gap.
    pub fn mm(&self) -> &Mm {
        &self.core().mm
    }

    /// What the kernel offered and what is in use.
    pub fn features(&self) -> Features {
        self.core().features
    }

    /// The options the watcher was created with.
    pub fn options(&self) -> WatcherOptions {
        self.core().options
    }

    /// Running, shut down, failed (and why) or forked.
    pub fn health(&self) -> Health {
        self.core().gate.health()
    }

    /// The counters.
    pub fn stats(&self) -> WatcherStats {
        let c = &self.core().counters;
        let (opened, delivered) = self.core().gate.counters();
        WatcherStats {
            batches_opened: opened,
            batches_delivered: delivered,
            unmaps: c.unmaps.load(Ordering::Relaxed),
            removes: c.removes.load(Ordering::Relaxed),
            remaps: c.remaps.load(Ordering::Relaxed),
            forks: c.forks.load(Ordering::Relaxed),
            others: c.others.load(Ordering::Relaxed),
            invalidations: c.invalidations.load(Ordering::Relaxed),
            overflows: self.core().handoff.overflows(),
            callback_panics: c.callback_panics.load(Ordering::Relaxed),
        }
    }

    /// Watches `[addr, addr + len)`: registers every VMA overlapping it, whole, in
    /// write-protect-only mode (no fault is ever trapped). See the `watch` module for the
    /// algorithm. Watching memory that is already watched is harmless and reported as
    /// [`WatchOutcome::AlreadyWatched`](crate::WatchOutcome::AlreadyWatched).
    ///
    /// Memory mapped later at a watched address with `MAP_FIXED` is not registered by the
    /// kernel: call `watch` again for it. An `mremap` target needs nothing.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyRange`], [`Error::Unaligned`], [`Error::RangeOverflow`],
    /// [`Error::Unmapped`] (nothing mapped in the range), [`Error::NothingWatchable`] (mapped,
    /// but nothing could be registered: the reasons are listed), [`Error::AlreadyOwned`]
    /// (another userfaultfd owns all of it), and the fail-closed errors
    /// ([`Error::ShutDown`], [`Error::Failed`], [`Error::Forked`]).
    pub fn watch(&self, addr: u64, len: u64) -> Result<WatchReport> {
        let end = watch::validate(addr, len)?;
        self.core().gate.check()?;
        let uffd = self.core().uffd.read();
        let fd = uffd.as_ref().ok_or(Error::ShutDown)?;
        watch::register_range(fd.as_fd(), addr, end, self.core().features.wp_async)
    }

    /// Stops watching the VMAs overlapping `[addr, addr + len)` (whole VMAs, as they were
    /// registered); returns how many were unregistered.
    ///
    /// # Errors
    ///
    /// The input errors of [`Watcher::watch`] and the fail-closed errors.
    pub fn unwatch(&self, addr: u64, len: u64) -> Result<usize> {
        let end = watch::validate(addr, len)?;
        self.core().gate.check()?;
        let uffd = self.core().uffd.read();
        let fd = uffd.as_ref().ok_or(Error::ShutDown)?;
        watch::unregister_range(fd.as_fd(), addr, end)
    }

    /// Inserts an interval subscription over `[addr, addr + len)` on the watcher's `Mm`, and
    /// returns the handle whose `read_begin`/`read_retry` also cover the gap between the
    /// kernel's read and the engine's delivery (docs/SEMANTICS.md §8).
    ///
    /// # Errors
    ///
    /// The engine's insert errors, and the fail-closed errors.
    pub fn insert_interval(
        &self,
        addr: u64,
        len: u64,
        subscriber: Arc<dyn IntervalSubscriber>,
    ) -> Result<WatchedInterval> {
        self.core().gate.check()?;
        let handle = self.core().mm.insert_interval(addr, len, subscriber)?;
        Ok(WatchedInterval::new(handle, Arc::clone(&self.core().gate)))
    }

    /// Removes an interval subscription (waits until none of its callbacks runs).
    ///
    /// # Errors
    ///
    /// The engine's remove errors (e.g. `WouldDeadlock` from a callback).
    pub fn remove_interval(&self, interval: &WatchedInterval) -> Result<()> {
        Ok(self.core().mm.remove_interval(interval.engine())?)
    }

    /// Waits until every message read from the userfaultfd so far has been delivered to the
    /// engine (every callback for it has returned), or `timeout` passes. After an unmapping
    /// call returned, `synchronize` returns only once its invalidation was delivered.
    ///
    /// # Errors
    ///
    /// [`Error::InDispatcher`] from a callback, [`Error::ReadBeginTimeout`] on timeout, and
    /// the fail-closed errors.
    pub fn synchronize(&self, timeout: Duration) -> Result<()> {
        if gate::on_dispatcher_thread() {
            return Err(Error::InDispatcher { op: "synchronize" });
        }
        self.core().gate.enter(Some(Instant::now() + timeout))?;
        Ok(())
    }

    /// Stops the watcher now, for every handle: the userfaultfd is closed (every range
    /// unregistered), what was read is delivered, the `Mm` is released, the threads are joined
    /// (unless called from a callback). Afterwards every call on any handle fails with
    /// [`Error::ShutDown`], and [`Watcher::get`] creates a new watcher. Calling it twice is
    /// harmless.
    pub fn shutdown(&self) {
        self.core().shutdown();
    }

    /// Calls `hook` on the dispatcher for every REMAP (mremap move) the kernel reports, before
    /// the old range is invalidated: a subscriber can learn where its memory went (the
    /// engine's invalidation of the old range carries no destination). Hooks run like
    /// callbacks: they may not call blocking watcher operations.
    pub fn on_remap(&self, hook: impl Fn(Remap) + Send + Sync + 'static) {
        self.core().remap_hooks.lock().push(Arc::new(hook));
    }

    /// The raw descriptor number of the userfaultfd (for diagnostics).
    pub fn uffd_raw_fd(&self) -> i32 {
        self.core().raw_fd
    }

    /// Injects a fault (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn inject_fault(&self, fault: Fault) {
        match fault {
            Fault::KillReader => {
                self.core().inject.store(INJECT_KILL, Ordering::SeqCst);
                self.core().poke();
            }
            Fault::CloseUffd => {
                // Replace the descriptor number with /dev/null, as a stray close followed by
                // an unrelated open would: the reader must notice it is no longer its file.
                if let Ok(null) = std::fs::File::open("/dev/null") {
                    use std::os::fd::AsRawFd;
                    // SAFETY: dup2 onto our own descriptor number: the userfaultfd file is
                    // released (registrations dropped), the number now names /dev/null. The
                    // OwnedFd that still holds the number is forgotten by the reader when it
                    // notices, so nothing closes the stranger's descriptor twice.
                    unsafe { libc::dup2(null.as_raw_fd(), self.core().raw_fd) };
                }
            }
        }
    }

    pub(crate) fn core_for_coop(&self) -> &Core {
        self.core()
    }
}

impl Core {
    fn create(options: WatcherOptions) -> Result<Arc<Core>> {
        let probe = sys::create().map_err(creation_error)?;
        let supported = sys::api(probe.as_fd(), 0).map_err(|e| Error::Syscall {
            call: "UFFDIO_API",
            source: e,
        })?;
        drop(probe);
        for (bit, name, needs) in [
            (
                u64::from(linux_raw_sys::general::UFFD_FEATURE_EVENT_UNMAP),
                "UFFD_FEATURE_EVENT_UNMAP",
                "4.11",
            ),
            (
                u64::from(linux_raw_sys::general::UFFD_FEATURE_EVENT_REMOVE),
                "UFFD_FEATURE_EVENT_REMOVE",
                "4.11",
            ),
            (
                u64::from(linux_raw_sys::general::UFFD_FEATURE_EVENT_REMAP),
                "UFFD_FEATURE_EVENT_REMAP",
                "4.11",
            ),
        ] {
            if supported & bit == 0 {
                return Err(Error::KernelTooOld {
                    missing: name,
                    needs,
                });
            }
        }
        let mut base = sys::FEATURE_EVENTS;
        if supported & sys::FEATURE_WP_ASYNC != 0 {
            base |= sys::FEATURE_WP_ASYNC;
        }
        let want_fork =
            options.fork_events != ForkEvents::Off && supported & sys::FEATURE_FORK != 0;
        if options.fork_events == ForkEvents::Required && supported & sys::FEATURE_FORK == 0 {
            return Err(Error::KernelTooOld {
                missing: "UFFD_FEATURE_EVENT_FORK",
                needs: "4.11",
            });
        }
        let (fd, enabled) = if want_fork {
            let fd = sys::create().map_err(creation_error)?;
            match sys::api(fd.as_fd(), base | sys::FEATURE_FORK) {
                Ok(_) => (fd, base | sys::FEATURE_FORK),
                Err(e) if options.fork_events == ForkEvents::Required => {
                    return Err(Error::ForkEventsNotPermitted { source: e })
                }
                Err(_) => {
                    drop(fd);
                    let fd = sys::create().map_err(creation_error)?;
                    sys::api(fd.as_fd(), base).map_err(|e| Error::syscall("UFFDIO_API", e))?;
                    (fd, base)
                }
            }
        } else {
            let fd = sys::create().map_err(creation_error)?;
            sys::api(fd.as_fd(), base).map_err(|e| Error::syscall("UFFDIO_API", e))?;
            (fd, base)
        };
        let wake_fd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| Error::syscall("eventfd", e))?;
        let identity = sys::identity(fd.as_fd()).map_err(|e| Error::syscall("fstat", e))?;
        let raw_fd = sys::raw(&fd);
        let core = Arc::new(Core {
            gate: Arc::new(Gate::new()),
            mm: Mm::new(),
            uffd: RwLock::new(Some(fd)),
            raw_fd,
            identity,
            wake_fd,
            handoff: Handoff::new(options.queue_capacity),
            features: Features {
                supported,
                enabled,
                wp_async: enabled & sys::FEATURE_WP_ASYNC != 0,
                fork_events: enabled & sys::FEATURE_FORK != 0,
            },
            options,
            counters: Counters::default(),
            inject: AtomicU8::new(INJECT_NONE),
            threads: Mutex::new(Vec::new()),
            scratch: Scratch::new()?,
            remap_hooks: Mutex::new(Vec::new()),
        });
        // The reader must be running (its buffer allocated, its thread set up) before anything
        // is registered: with EVENT_FORK a fork would otherwise wait for a reader that is still
        // allocating while the forking thread holds the allocator's locks.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader_core = Arc::clone(&core);
        let reader = thread::Builder::new()
            .name("mmnotify-uffd-reader".into())
            .spawn(move || reader_main(reader_core, ready_tx))
            .map_err(|e| Error::syscall("spawning the reader thread", e))?;
        let dispatcher_core = Arc::clone(&core);
        let dispatcher = thread::Builder::new()
            .name("mmnotify-uffd-dispatch".into())
            .spawn(move || dispatcher_main(dispatcher_core))
            .map_err(|e| Error::syscall("spawning the dispatcher thread", e))?;
        let _ = ready_rx.recv_timeout(Duration::from_secs(10));
        core.threads.lock().extend([reader, dispatcher]);
        tracing::debug!(target: "mmnotify_uffd", fd = raw_fd, supported, enabled, "watcher created");
        Ok(core)
    }

    fn poke(&self) {
        let _ = rustix::io::write(&self.wake_fd, &1u64.to_ne_bytes());
    }

    fn shutdown(&self) {
        if !self.gate.is_original() {
            // A forked child's copy: its threads do not exist here; touch nothing.
            return;
        }
        self.gate.shut_down();
        self.poke();
        if gate::on_dispatcher_thread() {
            // Joining would wait for the callback we are in; the threads end on their own.
            return;
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        let me = thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }

    /// Closes the userfaultfd: unregisters everything and releases every waiting unmapper.
    /// When the number no longer names our file, it is forgotten, not closed.
    fn close_uffd(&self, ours: bool) {
        let mut slot = self.uffd.write();
        if let Some(fd) = slot.take() {
            if ours {
                drop(fd);
            } else {
                std::mem::forget(fd);
            }
        }
    }

    fn deliver(&self, start: u64, end: u64, event: Event) {
        self.deliver_then(start, end, event, || {});
    }

    /// Delivers one invalidation; `before_end` runs between the start (every callback done)
    /// and the end (overlapping `read_begin`s wait until then).
    fn deliver_then(&self, start: u64, end: u64, event: Event, before_end: impl FnOnce()) {
        let Ok(range) = Range::new(start, end) else {
            return;
        };
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            match self.mm.invalidate_start(range, event) {
                Ok(guard) => {
                    before_end();
                    guard.end()
                }
                Err(e) => {
                    tracing::warn!(target: "mmnotify_uffd", %e, "invalidation refused");
                }
            }
        }));
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        if outcome.is_err() {
            self.counters
                .callback_panics
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn deliver_msg(&self, msg: Msg) {
        match msg {
            Msg::Unmap { start, end } => self.deliver(start, end, Event::Unmap),
            // REMOVE is sent before the zap, which madvise performs after re-taking
            // mmap_lock for reading once the message was read. Keep the invalidation open
            // across a write-lock fence so that fills starting after it see the zapped
            // range (U4 in docs/SEMANTICS.md, with its residual window).
            Msg::Remove { start, end } => {
                let before = ZapWatch::snapshot(start, end);
                self.deliver_then(start, end, Event::Clear, || {
                    before.wait_for_zap();
                    self.mmap_lock_fence();
                })
            }
            Msg::Remap { from, to, len } => {
                // Listeners learn the new address first, so that a mirror can re-point its
                // entries at `to` when it drops them from `from` (the engine's events carry
                // no destination).
                let hooks: Vec<RemapHook> = self.remap_hooks.lock().clone();
                let remap = Remap { from, to, len };
                for h in hooks {
                    if panic::catch_unwind(AssertUnwindSafe(|| h(remap))).is_err() {
                        self.counters
                            .callback_panics
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.deliver(from, from.saturating_add(len), Event::Unmap)
            }
            Msg::Fork { .. } => self.deliver(0, u64::MAX, Event::ProtectionPage),
            Msg::Other { .. } => {}
        }
    }

    /// Waits until every thread that holds this process's `mmap_lock` for reading has released
    /// it, by taking it for writing: `mprotect` of a private scratch page (which changes
    /// nothing and sends no event) takes the write lock first.
    fn mmap_lock_fence(&self) {
        // SAFETY: the scratch page is ours, mapped read-write for the life of the Core;
        // re-applying the same protection changes nothing.
        unsafe {
            libc::mprotect(
                self.scratch.0 as *mut libc::c_void,
                sys::page_size() as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
    }

    fn count(&self, msg: &Msg) {
        let c = match msg {
            Msg::Unmap { .. } => &self.counters.unmaps,
            Msg::Remove { .. } => &self.counters.removes,
            Msg::Remap { .. } => &self.counters.remaps,
            Msg::Fork { .. } => &self.counters.forks,
            Msg::Other { .. } => &self.counters.others,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

fn creation_error(e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => Error::NoUserfaultfd,
        Some(libc::EPERM) | Some(libc::EACCES) => Error::NotPermitted {
            what: "this process's own memory in user mode only (UFFD_USER_MODE_ONLY)",
            source: e,
        },
        Some(libc::EINVAL) => Error::KernelTooOld {
            missing: "UFFD_USER_MODE_ONLY",
            needs: "5.11",
        },
        _ => Error::syscall("userfaultfd", e),
    }
}

/// On the reader's way out, whatever the path (return or panic): fail closed if it was not a
/// shutdown, close the userfaultfd (releasing waiting unmappers), and tell the dispatcher.
struct ReaderExit {
    core: Arc<Core>,
    reason: Option<FailReason>,
    ours: bool,
}

impl Drop for ReaderExit {
    fn drop(&mut self) {
        let reason = if thread::panicking() {
            Some(FailReason::ReaderDied)
        } else {
            self.reason
        };
        if let Some(reason) = reason {
            self.core.gate.fail(reason);
        }
        self.core.close_uffd(self.ours);
        self.core.handoff.push(Item::Stop);
    }
}

fn reader_main(core: Arc<Core>, ready: std::sync::mpsc::Sender<()>) {
    let mut exit = ReaderExit {
        core: Arc::clone(&core),
        reason: None,
        ours: true,
    };
    let mut buf = vec![0u8; sys::MSG_SIZE * core.options.read_batch.max(1)];
    let timeout = rustix::event::Timespec {
        tv_sec: HEARTBEAT.as_secs() as _,
        tv_nsec: HEARTBEAT.subsec_nanos() as _,
    };
    let _ = ready.send(());
    drop(ready);
    // SAFETY: the descriptor stays open until this thread closes it in `ReaderExit`, after
    // the loop; nobody else closes it (close_uffd is only called from here).
    let uffd = unsafe { sys::borrow_raw(core.raw_fd) };
    loop {
        let mut fds = [
            PollFd::new(&uffd, PollFlags::IN),
            PollFd::new(&core.wake_fd, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                exit.reason = Some(FailReason::UffdError {
                    errno: e.raw_os_error(),
                });
                return;
            }
        }
        let uffd_ev = fds[0].revents();
        let wake_ev = fds[1].revents();
        if !wake_ev.is_empty() {
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&core.wake_fd, &mut b);
            if core.inject.swap(INJECT_NONE, Ordering::SeqCst) == INJECT_KILL {
                panic!("mmnotify-uffd: reader killed by fault injection");
            }
            if core.gate.health() != Health::Running {
                return;
            }
        }
        if uffd_ev.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL) {
            exit.reason = Some(if uffd_ev.contains(PollFlags::NVAL) {
                exit.ours = false;
                FailReason::UffdLost
            } else {
                FailReason::UffdError { errno: libc::EIO }
            });
            return;
        }
        if uffd_ev.contains(PollFlags::IN) {
            // Open the batch *before* reading: an unmapper released by this read can only
            // return after the increment is visible (U2).
            let batch = core.gate.open_batch();
            let mut first = true;
            loop {
                match sys::read_msgs(uffd, &mut buf) {
                    Ok(0) => {
                        // Readable but nothing to read: a userfaultfd answers EAGAIN (0 here)
                        // only after a race with another reader; a number that now names
                        // another file (end of file at once, e.g. /dev/null) is caught here
                        // rather than spinning.
                        if first && sys::identity(uffd).ok() != Some(core.identity) {
                            core.handoff.push(Item::End(batch));
                            exit.ours = false;
                            exit.reason = Some(FailReason::UffdLost);
                            return;
                        }
                        break;
                    }
                    Ok(n) => {
                        for chunk in buf[..n].chunks_exact(sys::MSG_SIZE) {
                            let mut m = [0u8; sys::MSG_SIZE];
                            m.copy_from_slice(chunk);
                            let msg = sys::decode(&m);
                            if let Msg::Fork { fd } = msg {
                                // Never leave the child's userfaultfd unread: closing it drops
                                // the child's registrations and frees any waiter there.
                                let _ = unsafe_close(fd);
                            }
                            core.count(&msg);
                            core.handoff.push(Item::Msg(msg));
                        }
                        first = false;
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) => {
                        core.handoff.push(Item::End(batch));
                        exit.reason = Some(FailReason::UffdError {
                            errno: e.raw_os_error().unwrap_or(libc::EIO),
                        });
                        return;
                    }
                }
            }
            core.handoff.push(Item::End(batch));
        } else if uffd_ev.is_empty() && wake_ev.is_empty() {
            // Heartbeat: is the number still our userfaultfd?
            if sys::identity(uffd).ok() != Some(core.identity) {
                exit.ours = false;
                exit.reason = Some(FailReason::UffdLost);
                return;
            }
        }
    }
}

fn unsafe_close(fd: i32) -> io::Result<()> {
    // SAFETY: `fd` was just installed in our table by the kernel for the FORK message and is
    // owned by nobody else; closing it once is its only use.
    let r = unsafe { libc::close(fd) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// On the dispatcher's way out by panic (a bug: callbacks' panics are caught), fail closed.
struct DispatcherExit {
    core: Arc<Core>,
}

impl Drop for DispatcherExit {
    fn drop(&mut self) {
        if thread::panicking() {
            self.core.gate.fail(FailReason::DispatcherDied);
        }
    }
}

fn dispatcher_main(core: Arc<Core>) {
    gate::mark_dispatcher_thread();
    let _exit = DispatcherExit {
        core: Arc::clone(&core),
    };
    loop {
        match core.handoff.pop() {
            Item::Msg(m) => core.deliver_msg(m),
            Item::End(n) => core.gate.close_batch(n),
            Item::Overflow { start, end, upto } => {
                if start < end {
                    core.deliver(start, end, Event::Unmap);
                }
                if upto > 0 {
                    core.gate.close_batch(upto);
                }
            }
            Item::Stop => break,
        }
    }
    // The watcher no longer sees this address space: every mirror built on it must go.
    let released = panic::catch_unwind(AssertUnwindSafe(|| core.mm.release()));
    if !matches!(released, Ok(Ok(()))) {
        core.counters
            .callback_panics
            .fetch_add(1, Ordering::Relaxed);
    }
}
