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
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mmnotify::{IntervalSubscriber, Mm, Range};

use crate::error::{Error, Result};
use crate::gate::{self, Gate, Health};
use crate::handoff::Handoff;
use crate::interval::WatchedInterval;
use crate::sync::{Mutex, RwLock};
use crate::sys;
#[cfg(feature = "fault-injection")]
use crate::threads::INJECT_KILL;
use crate::threads::{dispatcher_main, reader_main, INJECT_NONE};
use crate::watch::{self, WatchReport};
use crate::zap::Scratch;

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
    /// How long the dispatcher holds a REMOVE's invalidation open waiting to see its zap
    /// (default 10 ms; docs/SEMANTICS.md U4). Longer narrows the residual window of a
    /// madvising thread that is not scheduled in time; each MADV_FREE of present pages (which
    /// never zaps) holds the dispatcher this long.
    pub remove_settle: Duration,
}

/// The largest `WatcherOptions::queue_capacity` (about 40 MiB of ring reserved up front).
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;
/// The largest `WatcherOptions::read_batch` (a 128 KiB read buffer).
pub const MAX_READ_BATCH: usize = 4096;
/// The longest `WatcherOptions::remove_settle`: each MADV_FREE of present pages holds the
/// dispatcher this long.
pub const MAX_REMOVE_SETTLE: Duration = Duration::from_secs(10);

impl WatcherOptions {
    /// Checks every field against its range.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOptions`] naming the first field out of range and its value:
    /// `queue_capacity` must be 1..=[`MAX_QUEUE_CAPACITY`], `read_batch`
    /// 1..=[`MAX_READ_BATCH`], `remove_settle` at most [`MAX_REMOVE_SETTLE`].
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_QUEUE_CAPACITY).contains(&self.queue_capacity) {
            return Err(Error::InvalidOptions {
                field: "queue_capacity",
                value: self.queue_capacity.to_string(),
                allowed: "between 1 and 1048576 messages",
            });
        }
        if !(1..=MAX_READ_BATCH).contains(&self.read_batch) {
            return Err(Error::InvalidOptions {
                field: "read_batch",
                value: self.read_batch.to_string(),
                allowed: "between 1 and 4096 messages",
            });
        }
        if self.remove_settle > MAX_REMOVE_SETTLE {
            return Err(Error::InvalidOptions {
                field: "remove_settle",
                value: format!("{:?}", self.remove_settle),
                allowed: "at most 10 s",
            });
        }
        Ok(())
    }
}

impl Default for WatcherOptions {
    fn default() -> Self {
        WatcherOptions {
            fork_events: ForkEvents::Off,
            queue_capacity: 4096,
            read_batch: 64,
            remove_settle: crate::zap::DEFAULT_SETTLE,
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
    /// REMOVE invalidations ended without the zap having been seen, at the
    /// `remove_settle` bound (or with no page to probe): the residual window of U4
    /// (docs/SEMANTICS.md §9). Every MADV_FREE of present pages counts here. Not every stale
    /// entry is counted: when two threads madvise the same pages at once, one's zap can
    /// confirm the other's REMOVE early (U4).
    pub removes_unconfirmed: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) unmaps: AtomicU64,
    pub(crate) removes: AtomicU64,
    pub(crate) remaps: AtomicU64,
    pub(crate) forks: AtomicU64,
    pub(crate) others: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) callback_panics: AtomicU64,
    pub(crate) removes_unconfirmed: AtomicU64,
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
    /// The userfaultfd's descriptor number is made to name another open file (a `dup2` of
    /// `with` onto it), as a stray close followed by an unrelated open (a pipe with data in
    /// it, say) would.
    ReplaceUffd {
        /// The descriptor whose file the number names afterwards.
        with: i32,
    },
}

#[cfg(feature = "fault-injection")]
static FAIL_NEXT_DISPATCHER_SPAWN: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only (feature `fault-injection`): the next watcher creation in this process fails as
/// if the dispatcher thread could not be spawned (after the reader was started).
#[cfg(feature = "fault-injection")]
pub fn fail_next_dispatcher_spawn() {
    FAIL_NEXT_DISPATCHER_SPAWN.store(true, Ordering::SeqCst);
}

pub(crate) struct Core {
    pub(crate) gate: Arc<Gate>,
    pub(crate) mm: Mm,
    /// The userfaultfd; `None` once the reader closed it. Registration takes the read lock for
    /// the ioctl; the reader takes the write lock to close.
    pub(crate) uffd: RwLock<Option<OwnedFd>>,
    pub(crate) raw_fd: i32,
    pub(crate) identity: (u64, u64),
    pub(crate) wake_fd: OwnedFd,
    pub(crate) handoff: Handoff,
    pub(crate) features: Features,
    pub(crate) options: WatcherOptions,
    pub(crate) counters: Counters,
    pub(crate) inject: AtomicU8,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    /// A private page for the mmap_lock fence.
    pub(crate) scratch: Scratch,
    pub(crate) remap_hooks: Mutex<Vec<RemapHook>>,
}

pub(crate) type RemapHook = Arc<dyn Fn(Remap) + Send + Sync>;

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
/// let interval = watcher.insert_interval(mmnotify::Range::from_len(addr, len)?, Arc::new(Mirror))?;
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
    /// [`Error::InvalidOptions`] if a field is out of range (see
    /// [`WatcherOptions::validate`]); [`Error::OptionsConflict`] if the existing watcher was
    /// created with other options;
    /// [`Error::ForkEventsNotPermitted`]; and the errors of [`Watcher::get`].
    pub fn with_options(options: WatcherOptions) -> Result<Watcher> {
        Self::obtain(Some(options))
    }

    fn obtain(options: Option<WatcherOptions>) -> Result<Watcher> {
        if let Some(o) = &options {
            o.validate()?;
        }
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
            removes_unconfirmed: c.removes_unconfirmed.load(Ordering::Relaxed),
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
        let fd = self.core().own_uffd(&uffd)?;
        watch::register_range(fd, addr, end, self.core().features.wp_async)
    }

    /// Stops watching the VMAs overlapping `[addr, addr + len)` (whole VMAs, as they were
    /// registered); returns how many were unregistered.
    ///
    /// A VMA may be shared by several users (mirrors of other ranges in it), and after the
    /// unregistration the kernel reports nothing more about any of it. So every unregistered
    /// VMA is then invalidated, whole, on the watcher's `Mm` (`Event::Unmap`, from the calling
    /// thread, every callback done before this returns): every mirror of that memory drops it
    /// (more invalidation than needed, never less; docs/SEMANTICS.md U9).
    ///
    /// # Errors
    ///
    /// The input errors of [`Watcher::watch`]; [`Error::InDispatcher`] from a subscriber
    /// callback (the invalidation would run callbacks from inside one); the engine's refusal
    /// of the invalidation; and the fail-closed errors.
    pub fn unwatch(&self, addr: u64, len: u64) -> Result<usize> {
        let end = watch::validate(addr, len)?;
        if gate::on_dispatcher_thread() {
            return Err(Error::InDispatcher { op: "unwatch" });
        }
        self.core().gate.check()?;
        let gone = {
            let uffd = self.core().uffd.read();
            let fd = self.core().own_uffd(&uffd)?;
            watch::unregister_range(fd, addr, end)?
        };
        for &(start, end) in &gone {
            let range = Range::new(start, end)?;
            self.core()
                .mm
                .invalidate_start(range, mmnotify::Event::Unmap)?
                .end();
        }
        Ok(gone.len())
    }

    /// Inserts an interval subscription over `range` on the watcher's `Mm`, and
    /// returns the handle whose `read_begin`/`read_retry` also cover the gap between the
    /// kernel's read and the engine's delivery (docs/SEMANTICS.md §9).
    ///
    /// # Errors
    ///
    /// The engine's insert errors, and the fail-closed errors.
    pub fn insert_interval(
        &self,
        range: Range,
        subscriber: Arc<dyn IntervalSubscriber>,
    ) -> Result<WatchedInterval> {
        self.core().gate.check()?;
        let handle = self.core().mm.insert_interval(range, subscriber)?;
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
    /// harmless. Like `Mm::release`, it waits for the subscribers' release callbacks: do not
    /// call it (or drop the last handle) while holding a lock those callbacks take.
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
            Fault::ReplaceUffd { with } => {
                // SAFETY: as for `CloseUffd`: the number is ours, and the reader forgets
                // (never closes) it once it notices the file is not its own. `with` stays
                // the caller's.
                unsafe { libc::dup2(with, self.core().raw_fd) };
            }
        }
    }

    pub(crate) fn core_for_coop(&self) -> &Core {
        self.core()
    }
}

impl Core {
    fn create(options: WatcherOptions) -> Result<Arc<Core>> {
        options.validate()?;
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
        #[cfg(feature = "fault-injection")]
        let injected = FAIL_NEXT_DISPATCHER_SPAWN.swap(false, Ordering::SeqCst);
        #[cfg(not(feature = "fault-injection"))]
        let injected = false;
        let spawned = if injected {
            drop(dispatcher_core);
            Err(io::Error::other("fault injection: no dispatcher thread"))
        } else {
            thread::Builder::new()
                .name("mmnotify-uffd-dispatch".into())
                .spawn(move || dispatcher_main(dispatcher_core))
        };
        let dispatcher = match spawned {
            Ok(handle) => handle,
            Err(e) => {
                // The reader is running with the gate open for business: stop it as a shutdown
                // would (it closes the userfaultfd on its way out) and join it, so that neither
                // the thread nor the descriptors outlive this failed creation.
                core.gate.shut_down();
                core.poke();
                let _ = reader.join();
                return Err(Error::syscall("spawning the dispatcher thread", e));
            }
        };
        let _ = ready_rx.recv_timeout(Duration::from_secs(10));
        core.threads.lock().extend([reader, dispatcher]);
        tracing::debug!(target: "mmnotify_uffd", fd = raw_fd, supported, enabled, "watcher created");
        Ok(core)
    }

    pub(crate) fn poke(&self) {
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

    /// The userfaultfd, for an ioctl, if its number still names our file: registering on a
    /// number someone replaced behind our back would send our ioctl to a stranger's file.
    fn own_uffd<'a>(&self, slot: &'a Option<OwnedFd>) -> Result<std::os::fd::BorrowedFd<'a>> {
        let Some(fd) = slot.as_ref().map(AsFd::as_fd) else {
            // The reader closed it: say why (failed or shut down).
            self.gate.check()?;
            return Err(Error::ShutDown);
        };
        if sys::identity(fd).ok() != Some(self.identity) {
            return Err(Error::Failed {
                reason: crate::error::FailReason::UffdLost,
            });
        }
        Ok(fd)
    }

    /// Closes the userfaultfd: unregisters everything and releases every waiting unmapper.
    /// When the number no longer names our file (the caller noticed, or the identity checked
    /// here under the write lock differs), it is forgotten, not closed: it is someone else's.
    pub(crate) fn close_uffd(&self, ours: bool) {
        let mut slot = self.uffd.write();
        if let Some(fd) = slot.take() {
            if ours && sys::identity(fd.as_fd()).ok() == Some(self.identity) {
                drop(fd);
            } else {
                std::mem::forget(fd);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_errors_say_which() {
        let e = |n| creation_error(io::Error::from_raw_os_error(n));
        assert!(matches!(e(libc::ENOSYS), Error::NoUserfaultfd));
        assert!(matches!(e(libc::EPERM), Error::NotPermitted { .. }));
        assert!(matches!(e(libc::EACCES), Error::NotPermitted { .. }));
        assert!(matches!(
            e(libc::EINVAL),
            Error::KernelTooOld {
                missing: "UFFD_USER_MODE_ONLY",
                ..
            }
        ));
        assert!(matches!(e(libc::EMFILE), Error::Syscall { .. }));
        assert!(e(libc::ENOSYS).to_string().contains("no userfaultfd"));
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Watcher>();
        check::<WatchedInterval>();
        check::<crate::WatchSeq>();
    }
}
