//! What the engine does at its edges: panicking `release` and `free`, user `Drop` code that
//! calls back into the `Mm`, teardown after process exit, removed intervals, and address
//! spaces dropped with intervals still inserted.
//!
//! Each test names the invariants of `docs/SEMANTICS.md` it checks; each was written against
//! a concrete failure (a hang, a leak or a corrupted registry) that it would show again.
#![allow(clippy::disallowed_types)] // std::sync is fine in tests: they are not loom-checked.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use mmnotify::{
    BlockingOp, Capabilities, DeadlockCause, Error, Event, IntervalCtx, IntervalSubscriber,
    Invalidate, Invalidation, Mm, Policy, Range, Refused, Subscriber,
};

/// Turns a hang into a failure.
const HANG: Duration = Duration::from_secs(10);

fn range(start: u64, end: u64) -> Range {
    Range::new(start, end).unwrap()
}

/// Runs `f` on another thread and fails if it does not finish within [`HANG`].
fn within_bound<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| panic!("{what} did not return: it hangs"))
}

/// A classic subscriber with optional panics in `release` and `free`.
#[derive(Default)]
struct Fragile {
    panic_in_release: bool,
    panic_in_free: bool,
    starts: AtomicU64,
    ends: AtomicU64,
    releases: AtomicU64,
    frees: AtomicU64,
}

impl Subscriber for Fragile {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }

    fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
        self.starts.fetch_add(1, SeqCst);
        Ok(())
    }

    fn invalidate_range_end(&self, _: &Invalidation) {
        self.ends.fetch_add(1, SeqCst);
    }

    fn release(&self) {
        self.releases.fetch_add(1, SeqCst);
        if self.panic_in_release {
            panic!("release panics");
        }
    }

    fn free(&self) {
        self.frees.fetch_add(1, SeqCst);
        if self.panic_in_free {
            panic!("free panics");
        }
    }
}

/// I12, I34: a `release` that panics during `unregister` still leaves the subscriber
/// unregistered (unlinked, never released again, no more callbacks), and the panic reaches
/// the caller.
#[test]
fn unregister_survives_a_panicking_release() {
    let mm = Mm::new();
    let sub = Arc::new(Fragile {
        panic_in_release: true,
        ..Fragile::default()
    });
    let id = mm.register(sub.clone()).unwrap();
    let result = catch_unwind(AssertUnwindSafe(|| mm.unregister(id)));
    assert!(result.is_err(), "the release's panic reaches the caller");
    assert!(mm.subscribers().is_empty(), "unlinked all the same");
    assert_eq!(mm.unregister(id), Err(Error::NotRegistered { id }));
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!(sub.starts.load(SeqCst), 0, "no callback after unregister");
    mm.release().unwrap();
    assert_eq!(sub.releases.load(SeqCst), 1, "release ran exactly once");
}

/// I16, I34: a `release` that panics during `Mm::release` does not stop the teardown: every
/// other subscriber is released, everything is unlinked, and the panic reaches the caller.
#[test]
fn process_exit_survives_a_panicking_release() {
    let mm = Mm::new();
    let first = Arc::new(Fragile {
        panic_in_release: true,
        ..Fragile::default()
    });
    let second = Arc::new(Fragile::default());
    mm.register(first.clone()).unwrap();
    mm.register(second.clone()).unwrap();
    let result = catch_unwind(AssertUnwindSafe(|| mm.release()));
    assert!(result.is_err(), "the release's panic reaches the caller");
    assert_eq!(
        second.releases.load(SeqCst),
        1,
        "the next subscriber is released"
    );
    assert!(mm.subscribers().is_empty(), "everything is unlinked");
    assert!(mm.is_released());
    mm.release().unwrap();
    assert_eq!(first.releases.load(SeqCst), 1, "never released twice");
}

/// I15, I34: a `free` that panics does not wedge `synchronize`.
#[test]
fn synchronize_survives_a_panicking_free() {
    let mm = Mm::new();
    let sub = Arc::new(Fragile {
        panic_in_free: true,
        ..Fragile::default()
    });
    let id = mm.get_or_register(|| sub.clone()).unwrap();
    // The last reference goes inside `put`, so the panic surfaces there.
    let put = catch_unwind(AssertUnwindSafe(|| mm.put(id)));
    assert!(put.is_err());
    assert_eq!(sub.frees.load(SeqCst), 1);
    let mm2 = mm.clone();
    within_bound("synchronize after a panicking free", move || {
        mm2.synchronize().unwrap()
    });
}

/// I14, I18: `free` runs in non-blocking context, so a blocking call from it is refused
/// instead of hanging on the read section it runs in.
#[test]
fn blocking_from_free_is_refused() {
    struct SelfSyncing {
        mm: Mm,
        outcome: Mutex<Option<Result<(), Error>>>,
    }
    impl Subscriber for SelfSyncing {
        fn capabilities(&self) -> Capabilities {
            Capabilities::new()
        }
        fn test_young(&self, _: u64) -> bool {
            // Drop our own last use from inside a callback: `free` then runs when the walk
            // drops its snapshot, inside the walk's read section.
            let id = self.mm.subscribers()[0];
            self.mm.put(id).unwrap();
            false
        }
        fn free(&self) {
            *self.outcome.lock().unwrap() = Some(self.mm.synchronize());
        }
    }
    let mm = Mm::new();
    let sub = Arc::new(SelfSyncing {
        mm: mm.clone(),
        outcome: Mutex::new(None),
    });
    mm.get_or_register(|| sub.clone()).unwrap();
    let walker = mm.clone();
    within_bound("a young walk whose free calls synchronize", move || {
        walker.test_young(0x1000)
    });
    let outcome = sub.outcome.lock().unwrap().take();
    assert_eq!(
        outcome,
        Some(Err(Error::WouldDeadlock {
            op: BlockingOp::Synchronize,
            cause: DeadlockCause::NonBlockingContext,
        }))
    );
}

/// I16, I11: after process exit, the owners' own teardown still works as in Linux: one
/// `unregister` of a plain subscriber succeeds (a second one is `NotRegistered`), and `put`s
/// of a shared subscriber balance its use count.
#[test]
fn teardown_after_process_exit() {
    #[derive(Default)]
    struct Shared;
    impl Subscriber for Shared {
        fn capabilities(&self) -> Capabilities {
            Capabilities::new()
        }
    }
    let mm = Mm::new();
    let plain = Arc::new(Fragile::default());
    let plain_id = mm.register(plain.clone()).unwrap();
    let shared_id = mm.get_or_register(|| Arc::new(Shared)).unwrap();
    assert_eq!(mm.get_or_register(|| Arc::new(Shared)), Ok(shared_id));
    mm.release().unwrap();

    assert_eq!(mm.unregister(plain_id).map(|s| s.releases), Ok(1));
    assert_eq!(
        mm.unregister(plain_id),
        Err(Error::NotRegistered { id: plain_id })
    );
    assert_eq!(plain.releases.load(SeqCst), 1);
    assert_eq!(mm.put(shared_id), Ok(()));
    assert_eq!(mm.put(shared_id), Ok(()));
    assert_eq!(
        mm.put(shared_id),
        Err(Error::NotRegistered { id: shared_id })
    );
    assert_eq!(
        mm.unregister(shared_id),
        Err(Error::NotRegistered { id: shared_id })
    );
}

/// An interval subscriber that records its drop, optionally calling into its `Mm` from `Drop`.
struct Mirror {
    dropped: Arc<AtomicBool>,
    mm_on_drop: Option<Mm>,
}

impl IntervalSubscriber for Mirror {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _: &Invalidation) -> Invalidate {
        ctx.set_seq();
        Invalidate::Done
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        if let Some(mm) = &self.mm_on_drop {
            // Takes the interval lock: must not run under it.
            let _ = mm.interval_state();
        }
        self.dropped.store(true, SeqCst);
    }
}

/// I27, I31: applying a deferred removal at the close of an epoch may drop the last reference
/// to the subscriber; its `Drop` runs after the interval lock is released, so it may call into
/// the `Mm`.
#[test]
fn subscriber_drop_at_epoch_close_may_call_the_mm() {
    let mm = Mm::new();
    let dropped = Arc::new(AtomicBool::new(false));
    let handle = mm
        .insert_interval(
            Range::from_len(0x1000, 0x1000).unwrap(),
            Arc::new(Mirror {
                dropped: dropped.clone(),
                mm_on_drop: Some(mm.clone()),
            }),
        )
        .unwrap();
    let worker = mm.clone();
    within_bound("an epoch close that drops a subscriber", move || {
        let guard = worker
            .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
            .unwrap();
        worker.remove_interval_deferred(&handle).unwrap();
        drop(handle);
        guard.end();
    });
    assert!(dropped.load(SeqCst));
}

/// I31: a removed interval has nothing left to read.
#[test]
fn read_begin_on_a_removed_interval_is_an_error() {
    let mm = Mm::new();
    let handle = mm
        .insert_interval(
            Range::from_len(0x1000, 0x1000).unwrap(),
            Arc::new(Mirror {
                dropped: Arc::new(AtomicBool::new(false)),
                mm_on_drop: None,
            }),
        )
        .unwrap();
    mm.remove_interval(&handle).unwrap();
    assert_eq!(
        handle.read_begin(),
        Err(Error::IntervalNotInserted { id: handle.id() })
    );
}

/// An address space dropped with intervals still inserted drops their subscribers too (no
/// reference cycle through the interval state).
#[test]
fn dropping_the_mm_drops_inserted_intervals() {
    let dropped = Arc::new(AtomicBool::new(false));
    let mm = Mm::new();
    let handle = mm
        .insert_interval(
            Range::from_len(0x1000, 0x1000).unwrap(),
            Arc::new(Mirror {
                dropped: dropped.clone(),
                mm_on_drop: None,
            }),
        )
        .unwrap();
    drop(handle);
    assert!(!dropped.load(SeqCst));
    drop(mm);
    assert!(dropped.load(SeqCst));
}

/// P2, I34: under Kernel, an end that panics while the ends are sent from inside a refused
/// blockable start is not swallowed: the start's caller sees the panic.
#[test]
fn kernel_end_now_panic_reaches_the_caller() {
    struct RefusesBlockable;
    impl Subscriber for RefusesBlockable {
        fn capabilities(&self) -> Capabilities {
            Capabilities::new().with_start().may_refuse()
        }
        fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
            Err(Refused)
        }
    }
    struct PanicsInEnd;
    impl Subscriber for PanicsInEnd {
        fn capabilities(&self) -> Capabilities {
            Capabilities::new().with_start().with_end()
        }
        fn invalidate_range_end(&self, _: &Invalidation) {
            panic!("end panics");
        }
    }
    let mm = Mm::with_policy(Policy::Kernel);
    mm.register(Arc::new(PanicsInEnd)).unwrap();
    mm.register(Arc::new(RefusesBlockable)).unwrap();
    let start = catch_unwind(AssertUnwindSafe(|| {
        mm.invalidate_start(range(0, 0x1000), Event::Clear)
            .map(std::mem::forget)
    }));
    assert!(start.is_err(), "the end's panic reaches the caller");
    let state = mm.interval_state();
    assert_eq!(state.active, 0);
    let mm2 = mm.clone();
    within_bound("synchronize after the panic", move || {
        mm2.synchronize().unwrap()
    });
}
