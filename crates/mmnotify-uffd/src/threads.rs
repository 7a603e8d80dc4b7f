//! The watcher's two threads and what they do with each message.
//!
//! The **reader** polls the userfaultfd and a wake-up eventfd. When the userfaultfd is readable
//! it opens a batch in the gate *before* `read(2)` (U2), reads whole messages into a buffer
//! allocated at start-up, closes any child userfaultfd a FORK message carries, and pushes the
//! messages and the batch's end marker to the hand-off ring. It never runs user code, never
//! allocates, never waits for the dispatcher. Before every `read(2)`, and every 200 ms without
//! events, it checks (`fstat`) that its descriptor number still names its own file: the number
//! may be closed or replaced by other code in the process, and a stranger's data must never be
//! taken for messages (nor a descriptor it names closed as a FORK's). On its way out, by any path, it fails the gate
//! closed (unless this is a shutdown) and closes the userfaultfd, which unregisters every range
//! and releases every unmapper still waiting.
//!
//! The **dispatcher** pops the ring and turns each message into one blockable invalidation of
//! the watcher's `Mm` (UNMAP → `Event::Unmap`, REMOVE → `Event::Clear` held open across the
//! zap, REMAP → the remap hooks then `Event::Unmap` of the old range, FORK → `Event::ProtectionPage`
//! over `Range::ALL`), closes each batch after its last message, catches panicking callbacks,
//! and releases the `Mm` when the reader has stopped.

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use mmnotify::{Event, Range};
use rustix::event::{PollFd, PollFlags};

use crate::error::FailReason;
use crate::gate::{self, Health};
use crate::handoff::Item;
use crate::sys::{self, Msg};
use crate::watcher::{Core, Remap, RemapHook};
use crate::zap::{self, Prober, ZapProbe};

pub(crate) const INJECT_NONE: u8 = 0;
pub(crate) const INJECT_KILL: u8 = 1;

/// How often the reader wakes without events to check that its descriptor is still its own.
const HEARTBEAT: Duration = Duration::from_millis(200);

impl Core {
    pub(crate) fn deliver(&self, start: u64, end: u64, event: Event) {
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

    pub(crate) fn deliver_msg(&self, msg: Msg, probe: Option<ZapProbe>) {
        match msg {
            Msg::Unmap { start, end } => self.deliver(start, end, Event::Unmap),
            // REMOVE is sent before the zap, which madvise performs after re-taking
            // mmap_lock for reading once the message was read. Keep the invalidation open
            // until the probed page is seen cleared, then across a write-lock fence, so that
            // fills starting after it see the zapped range (zap.rs; U4 in docs/SEMANTICS.md,
            // with its residual window).
            Msg::Remove { start, end } => {
                // Populating an unprobed page may do I/O: here, never in the reader (U2).
                let probe = zap::complete_probe(probe);
                self.deliver_then(start, end, Event::Clear, || {
                    if !zap::wait_for_zap(probe, self.options.remove_settle) {
                        self.counters
                            .removes_unconfirmed
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    self.scratch.mmap_lock_fence();
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

    pub(crate) fn count(&self, msg: &Msg) {
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

pub(crate) fn reader_main(core: Arc<Core>, ready: std::sync::mpsc::Sender<()>) {
    let mut exit = ReaderExit {
        core: Arc::clone(&core),
        reason: None,
        ours: true,
    };
    // `read_batch` was validated (1..=MAX_READ_BATCH); the clamp keeps the product in range
    // whatever happens to the options.
    let batch = core
        .options
        .read_batch
        .clamp(1, crate::watcher::MAX_READ_BATCH);
    let mut buf = vec![0u8; sys::MSG_SIZE.saturating_mul(batch)];
    let mut prober = Prober::new();
    let timeout = rustix::event::Timespec {
        tv_sec: HEARTBEAT.as_secs() as _,
        tv_nsec: HEARTBEAT.subsec_nanos() as _,
    };
    let _ = ready.send(());
    drop(ready);
    // SAFETY: the number is the userfaultfd's, which only this thread closes (in
    // `ReaderExit`, after the loop; `close_uffd` is called from nowhere else). Other code in
    // the process may still close or replace the number behind our back (a stray `close`,
    // `close_range`, `dup2`): then the number names no file or a stranger's. It is therefore
    // only ever passed to calls that are harmless on any number (`poll`, `fstat`), and to
    // `read(2)` only right after `fstat` showed it still names our file (one check per
    // read); on a mismatch the reader fails closed (`UffdLost`) and forgets the number
    // without closing it. What remains is the window between that `fstat` and the `read`:
    // a replacement exactly there is read once, its data decoded as messages, which can only
    // cause invalidations (more, never less) — never a close, since FORK descriptors are
    // closed only with fork events on.
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
                // Is the number still our userfaultfd? A stranger's data must never be read as
                // messages (see the SAFETY comment above).
                if sys::identity(uffd).ok() != Some(core.identity) {
                    core.handoff.push(Item::End(batch));
                    exit.ours = false;
                    exit.reason = Some(FailReason::UffdLost);
                    return;
                }
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
                                // the child's registrations and frees any waiter there. Only
                                // with fork events on can the kernel have installed one.
                                if core.features.fork_events && fd >= 0 {
                                    let _ = close_fork_fd(fd);
                                }
                            }
                            let probe = match msg {
                                Msg::Remove { start, end } => prober.probe(start, end),
                                _ => None,
                            };
                            core.count(&msg);
                            core.handoff.push(Item::Msg(msg, probe));
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

/// Closes the child userfaultfd a FORK message carried.
fn close_fork_fd(fd: i32) -> io::Result<()> {
    // SAFETY: called only with fork events enabled, for a FORK message read from our own
    // userfaultfd (its identity was checked just before the read): the kernel installed `fd`
    // in our table for this message, and nobody else knows the number; closing it once is its
    // only use.
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

pub(crate) fn dispatcher_main(core: Arc<Core>) {
    gate::mark_dispatcher_thread();
    let _exit = DispatcherExit {
        core: Arc::clone(&core),
    };
    loop {
        match core.handoff.pop() {
            Item::Msg(m, probe) => core.deliver_msg(m, probe),
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
