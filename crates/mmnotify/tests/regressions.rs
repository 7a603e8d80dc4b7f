//! Regression tests for the engine items of issue 13 (items 6 to 10): each test failed (or hung,
//! or did not compile) against the engine before the fix, as its doc comment says, and names the
//! invariants of `docs/SEMANTICS.md` it checks.
//!
//! Tests that could hang on a regressed engine run on another thread, joined with a deadline, so
//! that a hang fails the one test instead of stalling the run.
#![allow(clippy::disallowed_types)] // std::sync is fine in tests: they are not loom-checked.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};
use std::thread;
use std::time::Duration;

use mmnotify::{
    BlockingOp, Capabilities, DeadlockCause, Error, Event, IntervalCtx, IntervalHandle,
    IntervalSubscriber, Invalidate, Invalidation, Mm, Policy, Range, Refused, Subscriber,
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

// --- item 10: interval ownership -------------------------------------------------------------

/// A device-like interval subscriber that keeps its own handle, for its fault path.
struct SelfOwning {
    handle: OnceLock<IntervalHandle>,
    drops: Arc<AtomicU64>,
}

impl SelfOwning {
    fn insert(mm: &Mm, at: Range, drops: &Arc<AtomicU64>) -> Weak<SelfOwning> {
        let sub = Arc::new(SelfOwning {
            handle: OnceLock::new(),
            drops: Arc::clone(drops),
        });
        let handle = mm.insert_interval(at, sub.clone()).unwrap();
        assert!(sub.handle.set(handle).is_ok());
        Arc::downgrade(&sub)
    }

    /// The fault path: uses its own handle.
    fn fault(&self) -> bool {
        let handle = self.handle.get().expect("handle stored at insert");
        let seq = handle.read_begin().unwrap();
        !handle.read_retry(seq)
    }
}

impl IntervalSubscriber for SelfOwning {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _: &Invalidation) -> Invalidate {
        ctx.set_seq();
        Invalidate::Done
    }
}

impl Drop for SelfOwning {
    fn drop(&mut self) {
        self.drops.fetch_add(1, SeqCst);
    }
}

/// I31, issue 13 item 10: an interval subscriber that stores its own `IntervalHandle` (handle →
/// node → subscriber → handle) is dropped, exactly once, when its interval is removed.
///
/// Regression: the node owned the subscriber, so the cycle was never freed; on the old engine
/// `weak.upgrade()` still succeeded after `remove_interval` (and the test did not compile
/// against the old `insert_interval(start, len, ..)`).
#[test]
fn self_owning_interval_subscriber_is_freed_by_remove() {
    let mm = Mm::new();
    let drops = Arc::new(AtomicU64::new(0));
    let weak = SelfOwning::insert(&mm, range(0x1000, 0x2000), &drops);
    {
        let sub = weak
            .upgrade()
            .expect("the engine keeps the subscriber while inserted");
        assert!(sub.fault());
        let handle = sub.handle.get().unwrap().clone();
        drop(sub);
        mm.remove_interval(&handle).unwrap();
        // The subscriber (and with it the handle it stored) is gone; ours still answers.
        assert_eq!(
            handle.read_begin(),
            Err(Error::IntervalNotInserted { id: handle.id() })
        );
    }
    assert!(
        weak.upgrade().is_none(),
        "the self-owning subscriber leaked"
    );
    assert_eq!(drops.load(SeqCst), 1);
}

/// I31, I27: the same cycle freed by a deferred removal applied at the epoch's close.
#[test]
fn self_owning_interval_subscriber_is_freed_by_a_deferred_remove() {
    let mm = Mm::new();
    let drops = Arc::new(AtomicU64::new(0));
    let weak = SelfOwning::insert(&mm, range(0x1000, 0x2000), &drops);
    let guard = mm
        .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap();
    let handle = weak.upgrade().unwrap().handle.get().unwrap().clone();
    mm.remove_interval_deferred(&handle).unwrap();
    drop(handle);
    assert_eq!(drops.load(SeqCst), 0, "removal is deferred to the close");
    guard.end();
    assert!(
        weak.upgrade().is_none(),
        "the self-owning subscriber leaked"
    );
    assert_eq!(drops.load(SeqCst), 1);
}

/// Dropping the `Mm` drops every interval subscriber, even the self-owning kind and even while
/// the owner holds a handle; the handle then reports the interval as not inserted.
///
/// Regression: the node owned the subscriber and the handle owned the node, so while a handle
/// lived (including one stored in the subscriber itself) the subscriber survived its `Mm`,
/// against what `Mm`'s docs promise.
#[test]
fn dropping_the_mm_drops_interval_subscribers_while_handles_live() {
    let mm = Mm::new();
    let drops = Arc::new(AtomicU64::new(0));
    let self_owning = SelfOwning::insert(&mm, range(0x1000, 0x2000), &drops);
    let plain_drops = Arc::new(AtomicU64::new(0));
    let plain = Arc::new(SelfOwning {
        handle: OnceLock::new(),
        drops: Arc::clone(&plain_drops),
    });
    let kept = mm
        .insert_interval(range(0x4000, 0x5000), plain.clone())
        .unwrap();
    let plain_weak = Arc::downgrade(&plain);
    drop(plain);
    // Queued for insertion during an epoch: dropped too.
    let guard_mm = mm.clone();
    let guard = guard_mm
        .invalidate_start(range(0x4000, 0x5000), Event::Unmap)
        .unwrap();
    let queued_drops = Arc::new(AtomicU64::new(0));
    let queued = SelfOwning::insert(&mm, range(0x8000, 0x9000), &queued_drops);
    assert_eq!(mm.interval_state().deferred, 1);
    guard.end();
    drop(guard_mm);

    drop(mm);
    assert!(
        self_owning.upgrade().is_none(),
        "self-owning subscriber outlived its Mm"
    );
    assert!(
        plain_weak.upgrade().is_none(),
        "subscriber outlived its Mm while a handle lives"
    );
    assert!(queued.upgrade().is_none());
    assert_eq!(
        (
            drops.load(SeqCst),
            plain_drops.load(SeqCst),
            queued_drops.load(SeqCst)
        ),
        (1, 1, 1)
    );
    assert_eq!(
        kept.read_begin(),
        Err(Error::IntervalNotInserted { id: kept.id() })
    );
    assert_eq!(kept.range(), range(0x4000, 0x5000));
}

/// I29, issue 13 item 10: `read_begin_timeout` takes a `Duration`, `read_begin_until` an
/// `Instant`; both give up with `ReadBeginTimeout`, and a `Duration` too large to add to now
/// means no limit rather than a panic. `check_retry` takes the sequence by value.
///
/// Regression: `read_begin_timeout` took an `Instant` (this test did not compile).
#[test]
fn read_begin_timeout_takes_a_duration() {
    let mm = Mm::new();
    let drops = Arc::new(AtomicU64::new(0));
    let weak = SelfOwning::insert(&mm, range(0x1000, 0x2000), &drops);
    let handle = weak.upgrade().unwrap().handle.get().unwrap().clone();
    let before = handle.read_begin_timeout(Duration::MAX).unwrap();
    let guard = mm
        .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap();
    assert!(handle.check_retry(before));
    let h2 = handle.clone();
    let e = within_bound("read_begin_timeout", move || {
        let a = h2.read_begin_timeout(Duration::from_millis(20));
        let b = h2.read_begin_until(std::time::Instant::now() + Duration::from_millis(20));
        (a, b)
    });
    assert!(matches!(e.0, Err(Error::ReadBeginTimeout { .. })), "{e:?}");
    assert!(matches!(e.1, Err(Error::ReadBeginTimeout { .. })), "{e:?}");
    guard.end();
    let seq = handle
        .read_begin_timeout(Duration::from_millis(20))
        .unwrap();
    assert!(!handle.check_retry(seq) && !handle.read_retry(seq));
    mm.remove_interval(&handle).unwrap();
}

// --- item 10: final statistics ---------------------------------------------------------------

/// Counts windows in progress, as KVM does; goes negative on an end without a start.
#[derive(Default)]
struct KvmLike {
    in_progress: AtomicI64,
    min_seen: AtomicI64,
    starts: AtomicU64,
    ends: AtomicU64,
    released: AtomicBool,
}

impl KvmLike {
    fn in_progress(&self) -> i64 {
        self.in_progress.load(SeqCst)
    }
}

impl Subscriber for KvmLike {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }
    fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
        self.starts.fetch_add(1, SeqCst);
        self.in_progress.fetch_add(1, SeqCst);
        Ok(())
    }
    fn invalidate_range_end(&self, _: &Invalidation) {
        self.ends.fetch_add(1, SeqCst);
        let now = self.in_progress.fetch_sub(1, SeqCst) - 1;
        self.min_seen.fetch_min(now, SeqCst);
    }
    fn release(&self) {
        self.released.store(true, SeqCst);
    }
}

/// I12, I21, issue 13 item 10: `unregister` returns the registration's final counters,
/// including the end of the window it waited for.
///
/// Regression: `unregister` returned `()` and the counters vanished with the registration, so
/// the end delivered during the wait could not be read (this test did not compile).
#[test]
fn unregister_returns_the_final_stats_with_the_awaited_end() {
    let mm = Mm::new();
    let kvm = Arc::new(KvmLike::default());
    let id = mm.register(kvm.clone()).unwrap();
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    let (opened_tx, opened_rx) = mpsc::channel();
    let (end_tx, end_rx) = mpsc::channel::<()>();
    let window_mm = mm.clone();
    let window = thread::spawn(move || {
        let guard = window_mm
            .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
            .unwrap();
        opened_tx.send(()).unwrap();
        end_rx.recv().unwrap();
        thread::sleep(Duration::from_millis(20));
        guard.end();
    });
    opened_rx.recv().unwrap();
    end_tx.send(()).unwrap();
    let unregister_mm = mm.clone();
    let stats = within_bound("unregister", move || unregister_mm.unregister(id)).unwrap();
    window.join().unwrap();
    assert_eq!((stats.starts, stats.ends, stats.releases), (2, 2, 1));
    assert_eq!(kvm.in_progress(), 0);
    assert_eq!(mm.subscriber_stats(id), Err(Error::NotRegistered { id }));
}

/// I11, I21: after process exit, the owner's `unregister` still returns the final counters.
#[test]
fn unregister_after_exit_returns_the_final_stats() {
    let mm = Mm::new();
    let kvm = Arc::new(KvmLike::default());
    let id = mm.register(kvm.clone()).unwrap();
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    mm.release().unwrap();
    let stats = mm.unregister(id).unwrap();
    assert_eq!((stats.starts, stats.ends, stats.releases), (1, 1, 1));
    assert_eq!(mm.unregister(id), Err(Error::NotRegistered { id }));
}

// --- item 7: release after put to zero --------------------------------------------------------

/// Puts the *other* subscriber of a pair from its own `release`, and counts its releases.
struct PutsOther {
    mm: Mutex<Option<Mm>>,
    other: Arc<OnceLock<mmnotify::SubscriberId>>,
    releases: Arc<AtomicU64>,
    put_result: Arc<Mutex<Option<Result<(), Error>>>>,
}

impl Subscriber for PutsOther {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
    }
    fn release(&self) {
        self.releases.fetch_add(1, SeqCst);
        // Only the first of the pair to be released puts the other.
        if let Some(mm) = self.mm.lock().unwrap().take() {
            if let Some(&other) = self.other.get() {
                if self.put_result.lock().unwrap().is_none() {
                    *self.put_result.lock().unwrap() = Some(mm.put(other));
                }
            }
        }
    }
}

/// Two distinct types, so that `get_or_register` keeps one registration of each.
struct First(PutsOther);
struct Second(PutsOther);
impl Subscriber for First {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn release(&self) {
        self.0.release();
    }
}
impl Subscriber for Second {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn release(&self) {
        self.0.release();
    }
}

/// I14, I16, issue 13 item 7: `Mm::release` never calls `release` on a registration whose
/// last `put` already returned. Here the first subscriber that process exit releases puts the
/// other one to zero from its `release`; the other must get no `release` (whatever the call
/// order, which differs between policies).
///
/// Regression: `Mm::release` walked the snapshot it took before the first `release` and called
/// the put-to-zero registration too: 2 releases instead of 1 (checked against the old engine).
#[test]
fn process_exit_skips_a_registration_put_to_zero_during_it() {
    for policy in Policy::ALL {
        let mm = Mm::with_policy(policy);
        let releases = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
        let ids = [Arc::new(OnceLock::new()), Arc::new(OnceLock::new())];
        let put_result = Arc::new(Mutex::new(None));
        let make = |me: usize| PutsOther {
            mm: Mutex::new(Some(mm.clone())),
            other: Arc::clone(&ids[1 - me]),
            releases: Arc::clone(&releases[me]),
            put_result: Arc::clone(&put_result),
        };
        let first = mm.get_or_register(|| Arc::new(First(make(0)))).unwrap();
        let second = mm.get_or_register(|| Arc::new(Second(make(1)))).unwrap();
        ids[0].set(first).unwrap();
        ids[1].set(second).unwrap();
        mm.release().unwrap();
        let got = [releases[0].load(SeqCst), releases[1].load(SeqCst)];
        assert_eq!(
            *put_result.lock().unwrap(),
            Some(Ok(())),
            "{policy}: the put from release worked"
        );
        assert_eq!(
            got.iter().sum::<u64>(),
            1,
            "{policy}: release reached a registration whose last put had returned: {got:?}"
        );
        // The survivor's owner still balances its own use count after exit.
        let survivor = if got[0] == 1 { first } else { second };
        assert_eq!(mm.put(survivor), Ok(()), "{policy}");
        mm.synchronize().unwrap();
    }
}

// --- item 6: blocking from a subscriber's Drop at the end of a walk ----------------------------

/// A blocking call made from a subscriber's `Drop`, and what it returned.
type DropCall = (&'static str, Result<(), Error>);

/// A get/put subscriber that puts itself from a young or TLB callback, so that the walk's
/// snapshot holds the last reference; its `Drop` then calls a blocking method of the `Mm`.
struct DropsAtWalkEnd {
    mm: Mutex<Option<Mm>>,
    id: Arc<OnceLock<mmnotify::SubscriberId>>,
    tlb: bool,
    on_drop: Arc<Mutex<Vec<DropCall>>>,
}

impl DropsAtWalkEnd {
    fn put_self(&self) {
        let mm = self.mm.lock().unwrap().clone();
        if let (Some(mm), Some(&id)) = (mm, self.id.get()) {
            mm.put(id).unwrap();
        }
    }
}

impl Subscriber for DropsAtWalkEnd {
    fn capabilities(&self) -> Capabilities {
        if self.tlb {
            Capabilities::new().with_secondary_tlb()
        } else {
            Capabilities::new()
        }
    }
    fn clear_young(&self, _: Range) -> bool {
        self.put_self();
        true
    }
    fn arch_invalidate_secondary_tlbs(&self, _: Range) {
        self.put_self();
    }
}

impl Drop for DropsAtWalkEnd {
    fn drop(&mut self) {
        let Some(mm) = self.mm.get_mut().unwrap().take() else {
            return;
        };
        let mut log = self.on_drop.lock().unwrap();
        log.push(("synchronize", mm.synchronize()));
        log.push(("register", mm.register(Arc::new(Plain)).map(|_| ())));
    }
}

struct Plain;
impl Subscriber for Plain {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
    }
}

/// I13, I18, issue 13 item 6: a subscriber whose last reference goes at the end of a young or
/// secondary-TLB walk (it put itself from the walk's callback) and whose `Drop` calls blocking
/// methods of its `Mm` gets `WouldDeadlock(InsideWalk)`, as it gets `WouldDeadlock` from a
/// guard's end, instead of waiting for its own thread's read section.
///
/// Regression: the walks entered a read section without marking the thread, so `synchronize`
/// in the `Drop` waited forever for the walk it was called from (checked against the old
/// engine: this test failed with "did not return: it hangs").
#[test]
fn blocking_from_a_drop_at_the_end_of_a_walk_would_deadlock() {
    for (walk, tlb) in [("clear_young", false), ("secondary TLB", true)] {
        let mm = Mm::new();
        let on_drop = Arc::new(Mutex::new(Vec::new()));
        let id = Arc::new(OnceLock::new());
        let sub = DropsAtWalkEnd {
            mm: Mutex::new(Some(mm.clone())),
            id: Arc::clone(&id),
            tlb,
            on_drop: Arc::clone(&on_drop),
        };
        id.set(mm.get_or_register(move || Arc::new(sub)).unwrap())
            .unwrap();
        let walker = mm.clone();
        within_bound(walk, move || {
            if tlb {
                walker.arch_invalidate_secondary_tlbs(range(0, 0x1000));
            } else {
                assert!(walker.clear_young(range(0, 0x1000)));
            }
        });
        let expected = |op| {
            Err(Error::WouldDeadlock {
                op,
                cause: DeadlockCause::InsideWalk,
            })
        };
        assert_eq!(
            *on_drop.lock().unwrap(),
            vec![
                ("synchronize", expected(BlockingOp::Synchronize)),
                ("register", expected(BlockingOp::Register)),
            ],
            "{walk}"
        );
        assert!(mm.subscribers().is_empty());
        // Outside the walk the same calls work.
        mm.synchronize().unwrap();
    }
}

// --- item 8: Linux policies during process exit ---------------------------------------------

/// Shared by the two [`SlowRelease`] subscribers: the first one whose `release` runs after the
/// KVM-like one's returned holds `Mm::release` there until the test lets it go.
struct ExitGate {
    kvm: Arc<KvmLike>,
    blocked: Mutex<Option<mpsc::Sender<()>>>,
    resume: Mutex<Option<mpsc::Receiver<()>>>,
}

struct SlowRelease(Arc<ExitGate>);
struct SlowRelease2(Arc<ExitGate>);

impl ExitGate {
    fn release(&self) {
        if !self.kvm.released.load(SeqCst) {
            return;
        }
        let Some(blocked) = self.blocked.lock().unwrap().take() else {
            return;
        };
        let resume = self.resume.lock().unwrap().take().unwrap();
        blocked.send(()).unwrap();
        resume.recv_timeout(HANG).unwrap();
    }
}

impl Subscriber for SlowRelease {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
    }
    fn release(&self) {
        self.0.release();
    }
}

impl Subscriber for SlowRelease2 {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
    }
    fn release(&self) {
        self.0.release();
    }
}

/// Refuses every non-blocking start (Linux's convention: no end).
struct Refuser;
impl Subscriber for Refuser {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().may_refuse()
    }
    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        if inv.is_blockable() {
            Ok(())
        } else {
            Err(Refused)
        }
    }
}

/// P2, P3, I16, issue 13 item 8: during process exit, after a KVM-like subscriber's `release`
/// returned but while `Mm::release` is still running (another subscriber's `release` is slow),
/// an OOM-reaper-like non-blocking start is refused by a third subscriber. Linux keeps the
/// KVM-like one on its list until everyone is unlinked, so under `Kernel` it gets its start and
/// the refusal's end (balanced), under `Legacy` its start and no end (stuck at 1, Linux 4.19's
/// bug); `Exact` skips it (no start, no end). Its counter is never negative.
///
/// Regression: `Kernel` skipped the released subscriber's start but still sent it the refusal's
/// end, so the counter went to -1 (checked against the old engine: `min_seen` was -1 and
/// `starts` 0).
#[test]
fn linux_policies_serve_a_released_subscriber_until_exit_unlinks_it() {
    for policy in Policy::ALL {
        let mm = Mm::with_policy(policy);
        let kvm = Arc::new(KvmLike::default());
        let (blocked_tx, blocked_rx) = mpsc::channel();
        let (resume_tx, resume_rx) = mpsc::channel();
        let gate = Arc::new(ExitGate {
            kvm: Arc::clone(&kvm),
            blocked: Mutex::new(Some(blocked_tx)),
            resume: Mutex::new(Some(resume_rx)),
        });
        // A slow release on each side of the KVM-like subscriber: whatever the call order,
        // one of them runs after the KVM-like release returned.
        mm.register(Arc::new(SlowRelease(Arc::clone(&gate))))
            .unwrap();
        let kvm_id = mm.register(kvm.clone()).unwrap();
        mm.register(Arc::new(SlowRelease2(Arc::clone(&gate))))
            .unwrap();
        mm.register(Arc::new(Refuser)).unwrap();

        let exiting = mm.clone();
        let exit = thread::spawn(move || exiting.release());
        blocked_rx
            .recv_timeout(HANG)
            .expect("Mm::release reached the slow release after the KVM-like one");
        assert!(kvm.released.load(SeqCst));

        let reaper = mm.clone();
        let refused = within_bound("a non-blocking start during exit", move || {
            reaper
                .invalidate_start_nonblock(range(0x1000, 0x2000), Event::Unmap)
                .map(|_| ())
        });
        assert!(
            matches!(refused, Err(Error::StartRefused { .. })),
            "{policy}: {refused:?}"
        );
        let seen = (kvm.starts.load(SeqCst), kvm.ends.load(SeqCst));
        let want = match policy {
            Policy::Exact => (0, 0),
            Policy::Kernel => (1, 1),
            Policy::Legacy => (1, 0),
            _ => unreachable!(),
        };
        assert_eq!(seen, want, "{policy}: the KVM-like (starts, ends)");
        assert!(
            kvm.min_seen.load(SeqCst) >= 0,
            "{policy}: an end without a start drove the KVM-like counter negative"
        );

        resume_tx.send(()).unwrap();
        exit.join().unwrap().unwrap();
        let stats = mm.unregister(kvm_id).unwrap();
        assert_eq!((stats.starts, stats.ends), want, "{policy}");
    }
}

// --- item 9: dispatch order ------------------------------------------------------------------

/// Logs its name at every callback, and refuses non-blocking starts if asked to.
struct Named {
    name: &'static str,
    refuse: bool,
    young: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl Named {
    fn arc(name: &'static str, refuse: bool, log: &Arc<Mutex<Vec<String>>>) -> Arc<Named> {
        Arc::new(Named {
            name,
            refuse,
            young: false,
            log: Arc::clone(log),
        })
    }
    fn note(&self, what: &str) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{what} {}", self.name));
    }
}

impl Subscriber for Named {
    fn capabilities(&self) -> Capabilities {
        let caps = Capabilities::new().with_start();
        if self.refuse {
            caps.may_refuse()
        } else {
            caps.with_end()
        }
    }
    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        self.note("start");
        if self.refuse && !inv.is_blockable() {
            Err(Refused)
        } else {
            Ok(())
        }
    }
    fn invalidate_range_end(&self, _: &Invalidation) {
        self.note("end");
    }
    fn test_young(&self, _: u64) -> bool {
        self.note("young");
        self.young
    }
    fn release(&self) {
        self.note("release");
    }
}

fn take(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap())
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// I3, P2, P3, issue 13 item 9: Linux adds subscribers with `hlist_add_head_rcu`, so it calls
/// the newest first; `Kernel` and `Legacy` do the same for starts, ends, young walks and
/// release, and list refusers in that order. `Exact` keeps registration order (documented in
/// SEMANTICS I3).
///
/// Regression: every policy called in registration order (checked against the old engine:
/// under `Kernel`, `subscribers()` and every walk came out oldest first).
#[test]
fn linux_policies_call_the_newest_subscriber_first() {
    for policy in Policy::ALL {
        let mm = Mm::with_policy(policy);
        let log = Arc::new(Mutex::new(Vec::new()));
        let a = mm.register(Named::arc("a", false, &log)).unwrap();
        let b = mm.register(Named::arc("b", false, &log)).unwrap();
        let young = Arc::new(Named {
            name: "c",
            refuse: false,
            young: true,
            log: Arc::clone(&log),
        });
        let c = mm.register(young).unwrap();
        let (order, names) = if policy == Policy::Exact {
            (vec![a, b, c], ["a", "b", "c"])
        } else {
            (vec![c, b, a], ["c", "b", "a"])
        };
        assert_eq!(mm.subscribers(), order, "{policy}");
        mm.invalidate_start(range(0, 0x1000), Event::Unmap)
            .unwrap()
            .end();
        let want: Vec<String> = names
            .iter()
            .map(|n| format!("start {n}"))
            .chain(names.iter().map(|n| format!("end {n}")))
            .collect();
        assert_eq!(take(&log), want, "{policy}");
        // test_young stops at the first young answer: c is young, so under the Linux
        // policies it is the only one asked.
        assert!(mm.test_young(0));
        let want = if policy == Policy::Exact {
            strs(&["young a", "young b", "young c"])
        } else {
            strs(&["young c"])
        };
        assert_eq!(take(&log), want, "{policy}");
        mm.release().unwrap();
        let want: Vec<String> = names.iter().map(|n| format!("release {n}")).collect();
        assert_eq!(take(&log), want, "{policy}");
    }
}

/// I3, I5, P2: the order decides what a refusal looks like. Under `Exact` (registration order)
/// a subscriber registered before the refuser is started, then ended, and one registered after
/// it is never called; under `Kernel` the refusers are named newest first.
///
/// Regression: `Kernel` named the refusers oldest first (checked against the old engine:
/// `[r1, r2]`).
#[test]
fn call_order_decides_who_is_started_before_a_refuser() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mm = Mm::new();
    mm.register(Named::arc("old", false, &log)).unwrap();
    let r = mm.register(Named::arc("refuser", true, &log)).unwrap();
    mm.register(Named::arc("new", false, &log)).unwrap();
    let e = mm
        .invalidate_start_nonblock(range(0, 0x1000), Event::Unmap)
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        e,
        Error::StartRefused {
            range: range(0, 0x1000),
            refusers: vec![mmnotify::Refuser::Classic(r)],
        }
    );
    assert_eq!(take(&log), strs(&["start old", "start refuser", "end old"]));

    let mm = Mm::with_policy(Policy::Kernel);
    let r1 = mm.register(Named::arc("r1", true, &log)).unwrap();
    let r2 = mm.register(Named::arc("r2", true, &log)).unwrap();
    let e = mm
        .invalidate_start_nonblock(range(0, 0x1000), Event::Unmap)
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        e,
        Error::StartRefused {
            range: range(0, 0x1000),
            refusers: vec![
                mmnotify::Refuser::Classic(r2),
                mmnotify::Refuser::Classic(r1)
            ],
        }
    );
    assert_eq!(take(&log), strs(&["start r2", "start r1"]));
}
