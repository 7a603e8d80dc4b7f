//! The visibility gate: covering the gap between *read* and *delivered*.
//!
//! The kernel lets an unmapping system call return as soon as the watcher has *read* its
//! message, not when the watcher has acted on it. Between the two, a filler could begin a
//! read, look up the dying mapping, and commit it: its `read_retry` would see no collision,
//! because the engine has not been told yet. The gate closes that gap with two counters:
//!
//! * `opened`: batches the reader has begun. The reader bumps it *before* each `read(2)` of the
//!   userfaultfd, so any message it will read is counted before the unmapper can return.
//! * `delivered`: the highest batch whose invalidations have all been delivered to the engine
//!   (every `invalidate_start` of the batch has run its callbacks and ended). The dispatcher
//!   stores it after the last message of the batch, in batch order.
//!
//! While `delivered < opened`, the gate is *open*: something read from the userfaultfd may not
//! have reached the engine yet. A filler's `read_begin` waits until the gate is closed and
//! records `opened` as its generation; its `read_retry` reports a collision when the engine
//! does, or when batches were opened since and are not all delivered yet (then the engine's
//! answer cannot be trusted). docs/SEMANTICS.md (§9, U1-U6) has the argument.
//!
//! The gate also carries the watcher's health: running, shut down or failed, and whether this
//! process is a fork of the one that built the watcher. Fork detection costs one load: the
//! watcher keeps a word in a page advised `MADV_WIPEONFORK`, which the kernel hands to a child
//! as zeros. Every check on the fast path reads that word before anything else, so a child
//! never touches a lock a parent thread may have held at fork time.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;

use crate::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, FailReason, Result};

/// The watcher's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Health {
    /// Reading and delivering.
    Running,
    /// Shut down by [`Watcher::shutdown`](crate::Watcher::shutdown) or the last drop.
    ShutDown,
    /// Failed closed; see the reason.
    Failed(FailReason),
    /// This process is a fork of the one that built the watcher.
    Forked,
}

const RUNNING: u8 = 0;
const SHUT_DOWN: u8 = 1;
const FAILED: u8 = 2;

/// A word in a `MADV_WIPEONFORK` page: the *process mark*, which the kernel hands to any child
/// forked from this process as zero.
///
/// Each [`Gate`] records the mark it was created under and compares it with the word on every
/// check (one load). A child sees zero, so every gate it inherited reports a fork. A child that
/// builds a watcher of its own re-arms the word with a fresh nonzero mark, which the inherited
/// gates (holding the parent's mark) still do not match.
///
/// Where WIPEONFORK is missing (Linux < 4.14) the word lives on the heap and the mark is the
/// pid with the top bit set; a check then costs a `getpid` system call.
pub(crate) struct ForkProbe {
    word: &'static AtomicU64,
    wiped: bool,
}

const PID_MARK: u64 = 1 << 63;

impl ForkProbe {
    /// The process-wide probe, created on first use.
    pub(crate) fn get() -> &'static ForkProbe {
        static PROBE: OnceLock<ForkProbe> = OnceLock::new();
        PROBE.get_or_init(ForkProbe::create)
    }

    fn create() -> ForkProbe {
        let ps = crate::sys::page_size() as usize;
        // SAFETY: a fresh anonymous private mapping of one page at an address the kernel
        // chooses: it aliases nothing. It is never unmapped, so the `'static` reference below
        // stays valid for the life of the process.
        let page = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                ps,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        };
        let (word, wiped): (&'static AtomicU64, bool) = match page {
            Ok(p) => {
                // SAFETY: `p` is the page just mapped, `ps` bytes long; WIPEONFORK only
                // changes what a child sees.
                let advised = unsafe { libc::madvise(p, ps, libc::MADV_WIPEONFORK) } == 0;
                if advised {
                    // SAFETY: the page is mapped read-write for the life of the process,
                    // page-aligned (so aligned for u64) and zero-filled (a valid AtomicU64);
                    // nothing else refers to it.
                    (unsafe { &*(p as *const AtomicU64) }, true)
                } else {
                    (Box::leak(Box::new(AtomicU64::new(0))), false)
                }
            }
            Err(_) => (Box::leak(Box::new(AtomicU64::new(0))), false),
        };
        ForkProbe { word, wiped }
    }

    fn pid_mark() -> u64 {
        u64::from(rustix::process::getpid().as_raw_nonzero().get() as u32) | PID_MARK
    }

    /// The mark of this process, arming the word first if this process has none yet (first
    /// use, or a forked child building its own watcher).
    pub(crate) fn arm(&self) -> u64 {
        if !self.wiped {
            return Self::pid_mark();
        }
        // A counter copied into a child keeps counting from the parent's value, so a child's
        // mark always differs from the one its inherited gates hold.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        loop {
            let cur = self.word.load(Ordering::Acquire);
            if cur != 0 {
                return cur;
            }
            let mark = NEXT.fetch_add(1, Ordering::Relaxed);
            if self
                .word
                .compare_exchange(0, mark, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return mark;
            }
        }
    }

    /// Whether this is still the process that got `mark`. One load when WIPEONFORK works.
    #[inline]
    pub(crate) fn is_original(&self, mark: u64) -> bool {
        if self.wiped {
            self.word.load(Ordering::Relaxed) == mark
        } else {
            Self::pid_mark() == mark
        }
    }
}

thread_local! {
    static IN_DISPATCHER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the current thread as the dispatcher (for the deadlock check of `read_begin`).
pub(crate) fn mark_dispatcher_thread() {
    IN_DISPATCHER.with(|d| d.set(true));
}

/// Whether the current thread is a watcher's dispatcher.
pub(crate) fn on_dispatcher_thread() -> bool {
    IN_DISPATCHER.with(|d| d.get())
}

/// The shared state between the reader, the dispatcher and the fillers.
pub(crate) struct Gate {
    opened: AtomicU64,
    delivered: AtomicU64,
    state: AtomicU8,
    reason: Mutex<Option<FailReason>>,
    waiters: AtomicU32,
    lock: Mutex<()>,
    changed: Condvar,
    probe: &'static ForkProbe,
    mark: u64,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("opened", &self.opened.load(Ordering::Relaxed))
            .field("delivered", &self.delivered.load(Ordering::Relaxed))
            .field("health", &self.health())
            .finish()
    }
}

impl Gate {
    pub(crate) fn new() -> Gate {
        Gate {
            opened: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            state: AtomicU8::new(RUNNING),
            reason: Mutex::new(None),
            waiters: AtomicU32::new(0),
            lock: Mutex::new(()),
            changed: Condvar::new(),
            probe: ForkProbe::get(),
            mark: ForkProbe::get().arm(),
        }
    }

    // --- the reader and the dispatcher ----------------------------------------------------

    /// The reader, before each `read(2)`: opens batch `n` and returns `n`. Allocation-free.
    pub(crate) fn open_batch(&self) -> u64 {
        // SeqCst: the increment must be visible to any thread that later learns (through the
        // kernel's own synchronisation on the unmapper's wake-up) that the read happened.
        self.opened.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The dispatcher, after delivering every invalidation of batch `n` (in order).
    pub(crate) fn close_batch(&self, n: u64) {
        // Release: a filler that loads `delivered >= n` (Acquire) sees every `set_seq` the
        // batch's callbacks made.
        self.delivered.store(n, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        // SeqCst pairs with the waiter's increment of `waiters` before it re-checks: either it
        // sees the new value or we see it waiting.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _l = self.lock.lock();
            self.changed.notify_all();
        }
    }

    /// (opened, delivered), for stats.
    pub(crate) fn counters(&self) -> (u64, u64) {
        (
            self.opened.load(Ordering::SeqCst),
            self.delivered.load(Ordering::SeqCst),
        )
    }

    /// Marks the watcher failed (the first reason wins) and wakes every waiter.
    pub(crate) fn fail(&self, reason: FailReason) {
        {
            let mut r = self.reason.lock();
            if r.is_none() {
                *r = Some(reason);
            }
        }
        let _ = self
            .state
            .compare_exchange(RUNNING, FAILED, Ordering::SeqCst, Ordering::SeqCst);
        let _l = self.lock.lock();
        self.changed.notify_all();
    }

    /// Marks the watcher shut down and wakes every waiter.
    pub(crate) fn shut_down(&self) {
        let _ = self
            .state
            .compare_exchange(RUNNING, SHUT_DOWN, Ordering::SeqCst, Ordering::SeqCst);
        let _l = self.lock.lock();
        self.changed.notify_all();
    }

    // --- health -----------------------------------------------------------------------------

    /// The current health.
    pub(crate) fn health(&self) -> Health {
        if !self.probe.is_original(self.mark) {
            return Health::Forked;
        }
        match self.state.load(Ordering::SeqCst) {
            RUNNING => Health::Running,
            SHUT_DOWN => Health::ShutDown,
            _ => Health::Failed(self.reason.lock().unwrap_or(FailReason::ReaderDied)),
        }
    }

    /// `Ok` while running; the fail-closed error otherwise. The fork check comes first and
    /// touches no lock.
    pub(crate) fn check(&self) -> Result<()> {
        match self.health() {
            Health::Running => Ok(()),
            Health::ShutDown => Err(Error::ShutDown),
            Health::Failed(reason) => Err(Error::Failed { reason }),
            Health::Forked => Err(Error::Forked),
        }
    }

    /// Whether the fast path may trust the engine: running, not forked. One load for the
    /// fork probe, one for the state.
    #[inline]
    pub(crate) fn trusted(&self) -> bool {
        self.probe.is_original(self.mark) && self.state.load(Ordering::SeqCst) == RUNNING
    }

    /// Whether this is still the process that built the gate (one load).
    #[inline]
    pub(crate) fn is_original(&self) -> bool {
        self.probe.is_original(self.mark)
    }

    // --- the fillers --------------------------------------------------------------------------

    /// Waits until the gate is closed (or `deadline`), then returns the generation to check
    /// in [`Gate::collided`].
    pub(crate) fn enter(&self, deadline: Option<Instant>) -> Result<u64> {
        self.check()?;
        let opened = self.opened.load(Ordering::SeqCst);
        if self.delivered.load(Ordering::SeqCst) == opened {
            return Ok(opened);
        }
        if on_dispatcher_thread() {
            return Err(Error::InDispatcher { op: "read_begin" });
        }
        let begun = Instant::now();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _unwait = Unwait(&self.waiters);
        let mut l = self.lock.lock();
        loop {
            self.check()?;
            let opened = self.opened.load(Ordering::SeqCst);
            if self.delivered.load(Ordering::SeqCst) == opened {
                return Ok(opened);
            }
            // A bounded wait even without a deadline: wake-ups are exact, the bound only keeps
            // a missed one (which the SeqCst handshake rules out) from being fatal.
            let slice = Duration::from_millis(50);
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(Error::ReadBeginTimeout {
                            waited: now - begun,
                        });
                    }
                    (d - now).min(slice)
                }
                None => slice,
            };
            l = self.changed.wait_timeout(l, wait);
        }
    }

    /// Whether a fill that entered at `generation` may have missed an invalidation that the
    /// gate has not handed to the engine yet. Call it *before* asking the engine: when it says
    /// `false`, every batch opened since `generation` has been delivered, and the engine's
    /// answer (read after this Acquire) covers them.
    #[inline]
    pub(crate) fn collided(&self, generation: u64) -> bool {
        if !self.trusted() {
            return true;
        }
        let opened = self.opened.load(Ordering::SeqCst);
        if opened == generation {
            return false;
        }
        self.delivered.load(Ordering::SeqCst) != opened
    }
}

struct Unwait<'a>(&'a AtomicU32);

impl Drop for Unwait<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
