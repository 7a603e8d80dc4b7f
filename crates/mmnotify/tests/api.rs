//! Integration tests of the public API for classic subscribers: bad input, ordering, pairing,
//! policies, lifetime, deadlock checks, shared subscribers, release, young/TLB callbacks,
//! statistics and panicking callbacks.
//!
//! Each test names the invariants of `docs/SEMANTICS.md` it checks.
#![allow(clippy::disallowed_types)] // std::sync is fine in tests: they are not loom-checked.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use mmnotify::{
    in_nonblocking_context, BlockingOp, Capabilities, DeadlockCause, Error, Event, IntervalCtx,
    IntervalSubscriber, Invalidate, Invalidation, Mm, Policy, Range, Refused, Refuser, Subscriber,
    SubscriberId,
};

/// Generous bound used only to turn a hang into a failure.
const HANG: Duration = Duration::from_secs(10);

type Log = Arc<Mutex<Vec<String>>>;
type Hook = Box<dyn Fn(&Invalidation) + Send + Sync>;
type ReleaseHook = Box<dyn Fn() + Send + Sync>;

fn new_log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

fn entries(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

fn range(start: u64, end: u64) -> Range {
    Range::new(start, end).unwrap()
}

const START_END: Capabilities = Capabilities::new().with_start().with_end();
const REFUSER: Capabilities = Capabilities::new().with_start().with_end().may_refuse();

/// When a probe refuses its start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refuse {
    Never,
    NonBlocking,
    Always,
}

/// A configurable classic subscriber that counts and logs everything it receives.
struct Probe {
    name: String,
    caps: Capabilities,
    log: Log,
    refuse: Mutex<Refuse>,
    young: bool,
    panic_start: AtomicBool,
    panic_end: AtomicBool,
    starts: AtomicU64,
    refusals: AtomicU64,
    ends: AtomicU64,
    releases: AtomicU64,
    frees: AtomicU64,
    young_calls: AtomicU64,
    tlb_calls: AtomicU64,
    blockable_seen: Mutex<Vec<bool>>,
    nonblocking_ctx_seen: Mutex<Vec<bool>>,
    end_ranges: Mutex<Vec<Range>>,
    start_hook: Mutex<Option<Hook>>,
    end_hook: Mutex<Option<Hook>>,
    release_hook: Mutex<Option<ReleaseHook>>,
}

impl Probe {
    fn new(name: &str, caps: Capabilities, log: &Log) -> Probe {
        Probe {
            name: name.to_string(),
            caps,
            log: Arc::clone(log),
            refuse: Mutex::new(Refuse::Never),
            young: false,
            panic_start: AtomicBool::new(false),
            panic_end: AtomicBool::new(false),
            starts: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            ends: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            young_calls: AtomicU64::new(0),
            tlb_calls: AtomicU64::new(0),
            blockable_seen: Mutex::new(Vec::new()),
            nonblocking_ctx_seen: Mutex::new(Vec::new()),
            end_ranges: Mutex::new(Vec::new()),
            start_hook: Mutex::new(None),
            end_hook: Mutex::new(None),
            release_hook: Mutex::new(None),
        }
    }

    fn arc(name: &str, caps: Capabilities, log: &Log) -> Arc<Probe> {
        Arc::new(Probe::new(name, caps, log))
    }

    fn refusing(self, refuse: Refuse) -> Probe {
        *self.refuse.lock().unwrap() = refuse;
        self
    }

    fn young(mut self, young: bool) -> Probe {
        self.young = young;
        self
    }

    fn on_start(&self, f: impl Fn(&Invalidation) + Send + Sync + 'static) {
        *self.start_hook.lock().unwrap() = Some(Box::new(f));
    }

    fn on_end(&self, f: impl Fn(&Invalidation) + Send + Sync + 'static) {
        *self.end_hook.lock().unwrap() = Some(Box::new(f));
    }

    fn on_release(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.release_hook.lock().unwrap() = Some(Box::new(f));
    }

    /// Drops the hooks (they may hold an `Mm`, which holds this probe).
    fn clear_hooks(&self) {
        *self.start_hook.lock().unwrap() = None;
        *self.end_hook.lock().unwrap() = None;
        *self.release_hook.lock().unwrap() = None;
    }

    fn push(&self, what: &str) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:{what}", self.name));
    }

    fn n(counter: &AtomicU64) -> u64 {
        counter.load(SeqCst)
    }
}

impl Subscriber for Probe {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn release(&self) {
        self.releases.fetch_add(1, SeqCst);
        self.push("release");
        if let Some(hook) = self.release_hook.lock().unwrap().as_ref() {
            hook();
        }
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        self.blockable_seen.lock().unwrap().push(inv.is_blockable());
        self.nonblocking_ctx_seen
            .lock()
            .unwrap()
            .push(in_nonblocking_context());
        if let Some(hook) = self.start_hook.lock().unwrap().as_ref() {
            hook(inv);
        }
        if self.panic_start.load(SeqCst) {
            self.push("panic-start");
            panic!("{} panics in start", self.name);
        }
        let refuse = match *self.refuse.lock().unwrap() {
            Refuse::Never => false,
            Refuse::NonBlocking => !inv.is_blockable(),
            Refuse::Always => true,
        };
        if refuse {
            self.refusals.fetch_add(1, SeqCst);
            self.push("refuse");
            return Err(Refused);
        }
        self.starts.fetch_add(1, SeqCst);
        self.push("start");
        Ok(())
    }

    fn invalidate_range_end(&self, inv: &Invalidation) {
        self.ends.fetch_add(1, SeqCst);
        self.end_ranges.lock().unwrap().push(inv.range());
        self.push("end");
        if let Some(hook) = self.end_hook.lock().unwrap().as_ref() {
            hook(inv);
        }
        if self.panic_end.load(SeqCst) {
            panic!("{} panics in end", self.name);
        }
    }

    fn clear_flush_young(&self, _range: Range) -> bool {
        self.young_calls.fetch_add(1, SeqCst);
        self.push("cfy");
        self.young
    }

    fn clear_young(&self, _range: Range) -> bool {
        self.young_calls.fetch_add(1, SeqCst);
        self.push("cy");
        self.young
    }

    fn test_young(&self, _addr: u64) -> bool {
        self.young_calls.fetch_add(1, SeqCst);
        self.push("ty");
        self.young
    }

    fn arch_invalidate_secondary_tlbs(&self, _range: Range) {
        self.tlb_calls.fetch_add(1, SeqCst);
        self.nonblocking_ctx_seen
            .lock()
            .unwrap()
            .push(in_nonblocking_context());
        self.push("tlb");
    }

    fn free(&self) {
        self.frees.fetch_add(1, SeqCst);
        self.push("free");
    }
}

/// Asserts that `err` is a `WouldDeadlock` for `op` with `cause`.
fn assert_deadlock(result: Result<(), Error>, op: BlockingOp, cause: DeadlockCause) {
    match result {
        Err(Error::WouldDeadlock { op: o, cause: c }) => {
            assert_eq!((o, c), (op, cause));
        }
        other => panic!("expected WouldDeadlock({op:?}, {cause:?}), got {other:?}"),
    }
}

// --- bad input -------------------------------------------------------------------------------

/// I1: empty, inverted and overflowing ranges are typed errors with a helpful message.
#[test]
fn bad_ranges_are_typed_errors() {
    let e = Range::new(0x1000, 0x1000).unwrap_err();
    assert_eq!(e, Error::EmptyRange { start: 0x1000 });
    assert!(e.to_string().contains("is empty"), "{e}");

    let e = Range::new(0x2000, 0x1000).unwrap_err();
    assert_eq!(
        e,
        Error::InvertedRange {
            start: 0x2000,
            end: 0x1000
        }
    );
    assert!(e.to_string().contains("inverted"), "{e}");

    let e = Range::from_len(u64::MAX - 0xfff, 0x1000).unwrap_err();
    assert!(
        matches!(e, Error::RangeOverflow { len: 0x1000, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("runs past the end"), "{e}");

    let e = Range::from_len(0x1000, 0).unwrap_err();
    assert_eq!(e, Error::EmptyRange { start: 0x1000 });

    // The largest range that fits is accepted.
    assert_eq!(
        Range::from_len(u64::MAX - 1, 1).unwrap().last(),
        u64::MAX - 1
    );
}

struct NoopInterval;

impl IntervalSubscriber for NoopInterval {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _inv: &Invalidation) -> Invalidate {
        ctx.set_seq();
        Invalidate::Done
    }
}

/// I1: an interval is a `Range`, so an empty or wrapping interval cannot even be built (typed
/// errors from `Range`), and no interval can reach past `[.., u64::MAX)`: the top interval is
/// covered by `Range::ALL`.
///
/// Regression (issue 13, item 10): the old `insert_interval(start, len, ..)` accepted
/// `(u64::MAX, 1)`, an interval that no `Range`, not even the release invalidation's, could
/// reach; this test did not compile against it.
#[test]
fn bad_interval_inserts_are_typed_errors() {
    let e = Range::from_len(0x1000, 0).unwrap_err();
    assert_eq!(e, Error::EmptyRange { start: 0x1000 });
    assert!(e.to_string().contains("is empty"), "{e}");

    // One byte past the representable end is refused with the failing values.
    let e = Range::from_len(u64::MAX - 0x10, 0x11).unwrap_err();
    assert_eq!(
        e,
        Error::RangeOverflow {
            start: u64::MAX - 0x10,
            len: 0x11
        }
    );
    assert!(e.to_string().contains("runs past the end"), "{e}");
    let e = Range::from_len(u64::MAX, 1).unwrap_err();
    assert_eq!(
        e,
        Error::RangeOverflow {
            start: u64::MAX,
            len: 1
        }
    );

    // The highest interval there is ends at u64::MAX (exclusive) and is inside Range::ALL.
    let mm = Mm::new();
    let top = Range::from_len(u64::MAX - 0x10, 0x10).unwrap();
    assert_eq!(top.end(), u64::MAX);
    let h = mm.insert_interval(top, Arc::new(NoopInterval)).unwrap();
    assert_eq!(h.range(), top);
    assert!(Range::ALL.overlaps(&h.range()));
    assert_eq!(Range::ALL, Range::new(0, u64::MAX).unwrap());
}

/// I33, item 10 of issue 13: an interval ending at `u64::MAX` (exclusive), the highest one can
/// insert, receives the release invalidation over `Range::ALL`, and its callback sees its own
/// range back through `IntervalCtx::range`.
///
/// Regression: the old API let an interval contain byte `u64::MAX`, which the release
/// invalidation `[0, u64::MAX)` never reached; the old API also had no `range()`.
#[test]
fn top_interval_receives_the_release_invalidation() {
    struct Recorder {
        seen: Mutex<Vec<(Range, Range, Event)>>,
    }
    impl IntervalSubscriber for Recorder {
        fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
            ctx.set_seq();
            self.seen
                .lock()
                .unwrap()
                .push((ctx.range(), inv.range(), inv.event()));
            Invalidate::Done
        }
    }
    let mm = Mm::new();
    let rec = Arc::new(Recorder {
        seen: Mutex::default(),
    });
    let top = Range::new(u64::MAX - 0x1000, u64::MAX).unwrap();
    let _h = mm.insert_interval(top, rec.clone()).unwrap();
    mm.release().unwrap();
    assert_eq!(
        *rec.seen.lock().unwrap(),
        vec![(top, Range::ALL, Event::Release)]
    );
}

/// I11: registering the very same object twice is `AlreadyRegistered`, naming the existing id.
#[test]
fn same_object_twice_is_already_registered() {
    let mm = Mm::new();
    let log = new_log();
    let p = Probe::arc("a", START_END, &log);
    let id = mm.register(p.clone()).unwrap();
    let e = mm.register(p.clone()).unwrap_err();
    assert_eq!(e, Error::AlreadyRegistered { existing: id });
    assert!(e.to_string().contains("already registered"), "{e}");
    assert_eq!(mm.subscribers(), vec![id]);
    // A different object of the same type is fine.
    mm.register(Probe::arc("b", START_END, &log)).unwrap();
    assert_eq!(mm.subscribers().len(), 2);
}

/// I11: unregistering an unknown id, or the same id twice, is `NotRegistered`.
#[test]
fn unknown_and_double_unregister_are_not_registered() {
    let mm = Mm::new();
    let other = Mm::new();
    let log = new_log();
    let foreign = other.register(Probe::arc("f", START_END, &log)).unwrap();
    let e = mm.unregister(foreign).unwrap_err();
    assert_eq!(e, Error::NotRegistered { id: foreign });
    assert!(e.to_string().contains("is not registered"), "{e}");

    let p = Probe::arc("a", START_END, &log);
    let id = mm.register(p.clone()).unwrap();
    mm.unregister(id).unwrap();
    let e = mm.unregister(id).unwrap_err();
    assert_eq!(e, Error::NotRegistered { id });
    assert_eq!(Probe::n(&p.releases), 1, "release ran once, not twice");
}

/// I11: after `Mm::release`, register, get_or_register and insert_interval are `Released`.
#[test]
fn subscribing_after_release_is_released() {
    let mm = Mm::new();
    let log = new_log();
    mm.release().unwrap();
    assert!(mm.is_released());
    let e = mm.register(Probe::arc("a", START_END, &log)).unwrap_err();
    assert_eq!(e, Error::Released);
    assert!(e.to_string().contains("was released"), "{e}");
    let e = mm
        .get_or_register(|| Arc::new(Probe::new("g", START_END, &log)))
        .unwrap_err();
    assert_eq!(e, Error::Released);
    let e = mm
        .insert_interval(
            Range::from_len(0x1000, 0x1000).unwrap(),
            Arc::new(NoopInterval),
        )
        .unwrap_err();
    assert_eq!(e, Error::Released);
    assert!(mm.subscribers().is_empty());
}

/// I9: the secondary-TLB callback together with start (or end) is `CapabilityConflict`.
#[test]
fn secondary_tlb_with_start_or_end_is_capability_conflict() {
    let mm = Mm::new();
    let log = new_log();
    for caps in [
        Capabilities::new().with_secondary_tlb().with_start(),
        Capabilities::new().with_secondary_tlb().with_end(),
    ] {
        let e = mm.register(Probe::arc("x", caps, &log)).unwrap_err();
        assert_eq!(e, Error::CapabilityConflict);
        assert!(e.to_string().contains("not both"), "{e}");
    }
    assert!(mm.subscribers().is_empty());
    mm.register(Probe::arc(
        "tlb",
        Capabilities::new().with_secondary_tlb(),
        &log,
    ))
    .unwrap();
}

/// Marker type for `get_or_register` tests: one shared subscriber per type.
struct Shared(Probe);

impl Subscriber for Shared {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn release(&self) {
        self.0.release()
    }
    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        self.0.invalidate_range_start(inv)
    }
    fn invalidate_range_end(&self, inv: &Invalidation) {
        self.0.invalidate_range_end(inv)
    }
    fn free(&self) {
        self.0.free()
    }
}

/// I11, I14: `put` on a `register`ed id is `NotShared`; `unregister` on a shared id is
/// `SharedUsePut`.
#[test]
fn put_and_unregister_are_not_interchangeable() {
    let mm = Mm::new();
    let log = new_log();
    let plain = mm.register(Probe::arc("p", START_END, &log)).unwrap();
    let e = mm.put(plain).unwrap_err();
    assert_eq!(e, Error::NotShared { id: plain });
    assert!(
        e.to_string()
            .contains("not registered through get_or_register"),
        "{e}"
    );

    let shared = mm
        .get_or_register(|| Arc::new(Shared(Probe::new("s", START_END, &log))))
        .unwrap();
    let e = mm.unregister(shared).unwrap_err();
    assert_eq!(e, Error::SharedUsePut { id: shared });
    assert!(e.to_string().contains("drop it with put"), "{e}");
    // Both are still registered after the refused calls.
    assert_eq!(mm.subscribers(), vec![plain, shared]);
}

// --- dispatch --------------------------------------------------------------------------------

/// I2: blockability comes from the entry point, for classic starts, ends and interval callbacks.
#[test]
fn blockability_is_set_by_the_dispatcher() {
    struct SeeInterval(Mutex<Vec<bool>>);
    impl IntervalSubscriber for SeeInterval {
        fn invalidate(&self, _ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
            self.0.lock().unwrap().push(inv.is_blockable());
            Invalidate::Done
        }
    }
    let mm = Mm::new();
    let log = new_log();
    let p = Probe::arc("a", START_END, &log);
    let ends_blockable = Arc::new(Mutex::new(Vec::new()));
    let eb = ends_blockable.clone();
    p.on_end(move |inv| eb.lock().unwrap().push(inv.is_blockable()));
    mm.register(p.clone()).unwrap();
    let iv = Arc::new(SeeInterval(Mutex::new(Vec::new())));
    let _h = mm
        .insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), iv.clone())
        .unwrap();

    let g = mm
        .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap();
    assert!(g.invalidation().is_blockable());
    g.end();
    let g = mm
        .invalidate_start_nonblock(range(0x1000, 0x2000), Event::Unmap)
        .unwrap();
    assert!(!g.invalidation().is_blockable());
    g.end();

    assert_eq!(*p.blockable_seen.lock().unwrap(), vec![true, false]);
    assert_eq!(*ends_blockable.lock().unwrap(), vec![true, false]);
    assert_eq!(*iv.0.lock().unwrap(), vec![true, false]);
    p.clear_hooks();
}

/// I3, I4: every subscriber declaring start is called once, in registration order; ends go in
/// the same order, including to a subscriber that declares end without start.
#[test]
fn call_order_is_registration_order() {
    let mm = Mm::new();
    let log = new_log();
    let names = ["s0", "s1", "s2", "s3", "s4"];
    let mut probes = Vec::new();
    for n in names {
        let p = Probe::arc(n, START_END, &log);
        mm.register(p.clone()).unwrap();
        probes.push(p);
    }
    let end_only = Probe::arc("e", Capabilities::new().with_end(), &log);
    mm.register(end_only.clone()).unwrap();
    let none = Probe::arc("n", Capabilities::new(), &log);
    mm.register(none.clone()).unwrap();

    mm.invalidate_start(range(0, 0x1000), Event::Clear)
        .unwrap()
        .end();
    let expected: Vec<String> = names
        .iter()
        .map(|n| format!("{n}:start"))
        .chain(names.iter().map(|n| format!("{n}:end")))
        .chain(["e:end".to_string()])
        .collect();
    assert_eq!(entries(&log), expected);
    for p in &probes {
        assert_eq!((Probe::n(&p.starts), Probe::n(&p.ends)), (1, 1));
    }
    assert_eq!(Probe::n(&end_only.ends), 1);
    assert_eq!(Probe::n(&none.ends) + Probe::n(&none.starts), 0);
}

/// I7: guards nest and overlap on one thread; each one ends its own window, in any order.
#[test]
fn nested_overlapping_guards_are_independent() {
    let mm = Mm::new();
    let log = new_log();
    let p = Probe::arc("a", START_END, &log);
    mm.register(p.clone()).unwrap();
    let r1 = range(0x1000, 0x3000);
    let r2 = range(0x2000, 0x4000);
    let r3 = range(0x2800, 0x2900);
    let g1 = mm.invalidate_start(r1, Event::Unmap).unwrap();
    let g2 = mm.invalidate_start(r2, Event::Clear).unwrap();
    let g3 = mm.invalidate_start(r3, Event::SoftDirty).unwrap();
    assert_eq!((Probe::n(&p.starts), Probe::n(&p.ends)), (3, 0));
    // End the outer one first: only its own end is delivered.
    g1.end();
    assert_eq!(*p.end_ranges.lock().unwrap(), vec![r1]);
    drop(g3);
    g2.end();
    assert_eq!(*p.end_ranges.lock().unwrap(), vec![r1, r3, r2]);
    assert_eq!((Probe::n(&p.starts), Probe::n(&p.ends)), (3, 3));
}

/// I4: dropping a guard is the same as `end`: exactly one end per started subscriber.
#[test]
fn guard_drop_is_end() {
    let mm = Mm::new();
    let log = new_log();
    let p = Probe::arc("a", START_END, &log);
    mm.register(p.clone()).unwrap();
    {
        let _g = mm.invalidate_start(range(0, 0x1000), Event::Unmap).unwrap();
        assert_eq!(Probe::n(&p.ends), 0);
    }
    assert_eq!(Probe::n(&p.ends), 1);
    // An early return through `?` ends the window too.
    let early = || -> Result<(), Error> {
        let _g = mm.invalidate_start(range(0, 0x1000), Event::Unmap)?;
        Range::new(1, 1)?; // fails
        Ok(())
    };
    assert!(early().is_err());
    assert_eq!((Probe::n(&p.starts), Probe::n(&p.ends)), (2, 2));
}

/// I10, I4 (and I13's HoldsGuard for register): a `register` on another thread while a guard
/// is open publishes the subscriber but returns only after that guard ended; the new
/// subscriber never gets the open window's end. On the guard's own thread register is
/// refused instead of hanging.
#[test]
fn register_waits_for_open_windows_and_misses_their_end() {
    let mm = Mm::new();
    let log = new_log();
    let old = Probe::arc("old", START_END, &log);
    mm.register(old.clone()).unwrap();
    let late = Probe::arc("late", START_END, &log);

    let g = mm.invalidate_start(range(0, 0x1000), Event::Unmap).unwrap();
    assert_deadlock(
        mm.register(late.clone()).map(|_| ()),
        BlockingOp::Register,
        DeadlockCause::HoldsGuard,
    );

    let (tx, rx) = mpsc::channel();
    {
        let mm2 = mm.clone();
        let late2 = late.clone();
        thread::spawn(move || {
            let id = mm2.register(late2).unwrap();
            tx.send(id).unwrap();
        });
        // Wait until the registration is published: from then on only the open guard keeps
        // `register` from returning.
        let deadline = Instant::now() + HANG;
        while mm.subscribers().len() < 2 {
            assert!(Instant::now() < deadline, "register never published");
            thread::yield_now();
        }
        thread::sleep(Duration::from_millis(50));
        assert!(
            rx.try_recv().is_err(),
            "register returned while a window it may have missed was open"
        );
        g.end();
        let id = rx
            .recv_timeout(HANG)
            .expect("register returned after the end");
        assert_eq!(mm.subscribers()[1], id);
    }
    assert_eq!(Probe::n(&old.ends), 1);
    assert_eq!(Probe::n(&late.ends), 0, "never an end without its start");
    assert_eq!(Probe::n(&late.starts), 0);
    // The next window includes it.
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!((Probe::n(&late.starts), Probe::n(&late.ends)), (1, 1));
}

// --- refusal and policies --------------------------------------------------------------------

struct Trio {
    mm: Mm,
    a: Arc<Probe>,
    b: Arc<Probe>,
    c: Arc<Probe>,
    b_id: SubscriberId,
}

/// `a` and `c` accept; `b` (declares end and may_refuse) refuses per `refuse`.
fn trio(policy: Policy, refuse: Refuse) -> Trio {
    let mm = Mm::with_policy(policy);
    let log = new_log();
    let a = Probe::arc("a", START_END, &log);
    let b = Arc::new(Probe::new("b", REFUSER, &log).refusing(refuse));
    let c = Probe::arc("c", START_END, &log);
    mm.register(a.clone()).unwrap();
    let b_id = mm.register(b.clone()).unwrap();
    mm.register(c.clone()).unwrap();
    Trio { mm, a, b, c, b_id }
}

fn counts(p: &Probe) -> (u64, u64, u64) {
    (
        Probe::n(&p.starts),
        Probe::n(&p.refusals),
        Probe::n(&p.ends),
    )
}

/// I5, P1, I21: under Exact a refused non-blocking start ends exactly the started subscribers,
/// calls no later start, and names the refuser; the caller owes nothing.
#[test]
fn exact_refusal_ends_exactly_the_started() {
    let t = trio(Policy::Exact, Refuse::NonBlocking);
    let r = range(0x1000, 0x2000);
    let e = t.mm.invalidate_start_nonblock(r, Event::Unmap).unwrap_err();
    assert_eq!(
        e,
        Error::StartRefused {
            range: r,
            refusers: vec![Refuser::Classic(t.b_id)]
        }
    );
    assert!(
        e.to_string().contains(&format!("refused by {}", t.b_id)),
        "{e}"
    );
    assert_eq!(counts(&t.a), (1, 0, 1), "started: exactly one end");
    assert_eq!(counts(&t.b), (0, 1, 0), "refuser: no end");
    assert_eq!(counts(&t.c), (0, 0, 0), "later start not called");
    let stats = t.mm.subscriber_stats(t.b_id).unwrap();
    assert_eq!((stats.refusals, stats.ends, stats.violations), (1, 0, 0));
    // A blockable start afterwards works normally.
    t.mm.invalidate_start(r, Event::Unmap).unwrap().end();
    assert_eq!(counts(&t.a), (2, 0, 2));
    assert_eq!(counts(&t.b), (1, 1, 1));
    assert_eq!(counts(&t.c), (1, 0, 1));
}

/// P2, I6, I21: Kernel calls every start after a refusal and sends an end to every subscriber
/// that declares one, the refuser included; a refuser with an end is a counted violation.
#[test]
fn kernel_refusal_ends_everyone_with_an_end() {
    let t = trio(Policy::Kernel, Refuse::NonBlocking);
    let e =
        t.mm.invalidate_start_nonblock(range(0x1000, 0x2000), Event::Unmap)
            .unwrap_err();
    assert!(
        matches!(&e, Error::StartRefused { refusers, .. } if refusers == &[Refuser::Classic(t.b_id)])
    );
    assert_eq!(counts(&t.a), (1, 0, 1));
    assert_eq!(counts(&t.b), (0, 1, 1), "Kernel ends the refuser too");
    assert_eq!(counts(&t.c), (1, 0, 1), "Kernel still calls later starts");
    let stats = t.mm.subscriber_stats(t.b_id).unwrap();
    assert_eq!((stats.refusals, stats.ends, stats.violations), (1, 1, 1));
}

/// P3, I21: Legacy calls every start and sends no end at all: the started ones stay raised.
#[test]
fn legacy_refusal_ends_nobody() {
    let t = trio(Policy::Legacy, Refuse::NonBlocking);
    let e =
        t.mm.invalidate_start_nonblock(range(0x1000, 0x2000), Event::Unmap)
            .unwrap_err();
    assert!(matches!(e, Error::StartRefused { .. }));
    assert_eq!(counts(&t.a), (1, 0, 0), "an end is lost");
    assert_eq!(counts(&t.b), (0, 1, 0));
    assert_eq!(counts(&t.c), (1, 0, 0), "an end is lost");
    let stats = t.mm.subscriber_stats(t.b_id).unwrap();
    assert_eq!((stats.refusals, stats.ends, stats.violations), (1, 0, 0));
}

/// I6, P2, P3, I21: a refusal of a *blockable* start is a counted violation under every policy;
/// the start still returns a guard. Exact: the refuser gets no end. Kernel: ends at once and
/// again at the end. Legacy: the refusal is ignored.
#[test]
fn blockable_refusal_under_each_policy() {
    // (policy, ends of a/c, ends of b)
    for (policy, ac_ends, b_ends) in [
        (Policy::Exact, 1, 0),
        (Policy::Kernel, 2, 2),
        (Policy::Legacy, 1, 1),
    ] {
        let t = trio(policy, Refuse::Always);
        let g =
            t.mm.invalidate_start(range(0, 0x1000), Event::Clear)
                .expect("a blockable start always returns a guard");
        let ends_inside = (
            Probe::n(&t.a.ends),
            Probe::n(&t.b.ends),
            Probe::n(&t.c.ends),
        );
        g.end();
        assert_eq!(
            Probe::n(&t.c.starts),
            1,
            "{policy:?}: later starts are called"
        );
        assert_eq!(Probe::n(&t.a.ends), ac_ends, "{policy:?}");
        assert_eq!(Probe::n(&t.c.ends), ac_ends, "{policy:?}");
        assert_eq!(Probe::n(&t.b.ends), b_ends, "{policy:?}");
        let expected_inside = if policy == Policy::Kernel {
            (1, 1, 1)
        } else {
            (0, 0, 0)
        };
        assert_eq!(
            ends_inside, expected_inside,
            "{policy:?}: ends sent from inside the start"
        );
        let stats = t.mm.subscriber_stats(t.b_id).unwrap();
        // Kernel also counts Linux's warning for a refuser that has an end.
        let violations = if policy == Policy::Kernel { 2 } else { 1 };
        assert_eq!(stats.violations, violations, "{policy:?}");
        assert_eq!(stats.refusals, 1, "{policy:?}");
        assert_eq!(stats.ends, b_ends, "{policy:?}");
    }
}

/// I6: a refusal by a subscriber that did not declare `may_refuse` is counted as a violation.
#[test]
fn undeclared_refusal_is_a_violation() {
    let mm = Mm::new();
    let log = new_log();
    let p = Arc::new(Probe::new("p", START_END, &log).refusing(Refuse::NonBlocking));
    let id = mm.register(p.clone()).unwrap();
    assert!(mm
        .invalidate_start_nonblock(range(0, 0x1000), Event::Unmap)
        .is_err());
    let s = mm.subscriber_stats(id).unwrap();
    assert_eq!((s.refusals, s.violations, s.ends), (1, 1, 0));
}

// --- lifetime and deadlock checks --------------------------------------------------------------

/// I12: unregister while another thread holds a guard that started the subscriber runs
/// `release`, then waits for that guard's end; afterwards nothing of it runs.
#[test]
fn unregister_waits_for_the_pending_end() {
    let mm = Mm::new();
    let log = new_log();
    let p = Probe::arc("p", START_END, &log);
    let id = mm.register(p.clone()).unwrap();
    let g = mm.invalidate_start(range(0, 0x1000), Event::Unmap).unwrap();
    let (tx, rx) = mpsc::channel();
    {
        let mm2 = mm.clone();
        let log2 = log.clone();
        thread::spawn(move || {
            mm2.unregister(id).unwrap();
            log2.lock().unwrap().push("unregister returned".into());
            tx.send(()).unwrap();
        });
        let deadline = Instant::now() + HANG;
        while !mm.subscribers().is_empty() {
            assert!(Instant::now() < deadline, "unregister never unlinked");
            thread::yield_now();
        }
        thread::sleep(Duration::from_millis(50));
        assert!(
            rx.try_recv().is_err(),
            "unregister returned before the owed end"
        );
        assert_eq!(Probe::n(&p.ends), 0);
        g.end();
        rx.recv_timeout(HANG)
            .expect("unregister returned after the end");
    }
    assert_eq!(
        entries(&log),
        [
            "p:start",
            "p:release",
            "p:end",
            "p:free",
            "unregister returned"
        ]
    );
    // Nothing reaches it any more.
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!(
        (
            Probe::n(&p.starts),
            Probe::n(&p.ends),
            Probe::n(&p.releases)
        ),
        (1, 1, 1)
    );
    mm.synchronize().unwrap();
    assert_eq!(Probe::n(&p.frees), 1);
}

/// I13: blocking calls from inside a callback of the same `Mm` are `WouldDeadlock(InsideCallback)`.
#[test]
fn blocking_calls_inside_a_callback_would_deadlock() {
    let mm = Mm::new();
    let log = new_log();
    let p = Probe::arc("p", START_END, &log);
    let id = mm.register(p.clone()).unwrap();
    let results = Arc::new(Mutex::new(Vec::new()));
    let (mm2, res2, log2) = (mm.clone(), results.clone(), log.clone());
    p.on_start(move |_| {
        let mut r = res2.lock().unwrap();
        r.push((BlockingOp::Unregister, mm2.unregister(id).map(|_| ())));
        r.push((BlockingOp::Synchronize, mm2.synchronize()));
        r.push((BlockingOp::Release, mm2.release()));
        r.push((
            BlockingOp::Register,
            mm2.register(Probe::arc("x", START_END, &log2)).map(|_| ()),
        ));
    });
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    p.clear_hooks();
    let results = std::mem::take(&mut *results.lock().unwrap());
    assert_eq!(results.len(), 4);
    for (op, r) in results {
        assert_deadlock(r, op, DeadlockCause::InsideCallback);
    }
    // Nothing happened: still registered, not released.
    assert_eq!(mm.subscribers(), vec![id]);
    assert!(!mm.is_released());
    assert_eq!(Probe::n(&p.releases), 0);
}

/// I13: blocking calls from a thread holding a guard of the same `Mm` are
/// `WouldDeadlock(HoldsGuard)`; after the end they work.
#[test]
fn blocking_calls_holding_a_guard_would_deadlock() {
    let mm = Mm::new();
    let log = new_log();
    let p = Probe::arc("p", START_END, &log);
    let id = mm.register(p.clone()).unwrap();
    let g = mm.invalidate_start(range(0, 0x1000), Event::Unmap).unwrap();
    let e = mm.unregister(id).map(|_| ());
    assert_deadlock(e.clone(), BlockingOp::Unregister, DeadlockCause::HoldsGuard);
    assert!(e.unwrap_err().to_string().contains("end the guard first"));
    assert_deadlock(
        mm.synchronize(),
        BlockingOp::Synchronize,
        DeadlockCause::HoldsGuard,
    );
    assert_deadlock(mm.release(), BlockingOp::Release, DeadlockCause::HoldsGuard);
    g.end();
    mm.unregister(id).unwrap();
    mm.release().unwrap();
}

/// I18, I13, I20: callbacks of a non-blockable range (and the young and TLB walks) run in
/// non-blocking context, where a blocking start or an unregister is
/// `WouldDeadlock(NonBlockingContext)`; blockable callbacks are not in that context.
#[test]
fn nonblocking_context_is_tracked_and_enforced() {
    let mm = Mm::new();
    let log = new_log();
    let p = Probe::arc("p", START_END, &log);
    let id = mm.register(p.clone()).unwrap();
    let tlb = Probe::arc("t", Capabilities::new().with_secondary_tlb(), &log);
    mm.register(tlb.clone()).unwrap();
    let results = Arc::new(Mutex::new(Vec::new()));
    let (mm2, res2) = (mm.clone(), results.clone());
    p.on_start(move |inv| {
        if !inv.is_blockable() {
            let blocking_start = mm2
                .invalidate_start(range(0x8000, 0x9000), Event::Clear)
                .map(|g| g.end());
            res2.lock()
                .unwrap()
                .push((BlockingOp::InvalidateStart, blocking_start));
            res2.lock()
                .unwrap()
                .push((BlockingOp::Unregister, mm2.unregister(id).map(|_| ())));
        }
    });
    assert!(!in_nonblocking_context());
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    mm.invalidate_start_nonblock(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    assert!(
        !in_nonblocking_context(),
        "the mark does not outlive the callback"
    );
    p.clear_hooks();
    let results = std::mem::take(&mut *results.lock().unwrap());
    assert_eq!(results.len(), 2);
    for (op, r) in results {
        assert_deadlock(r, op, DeadlockCause::NonBlockingContext);
    }
    assert_eq!(*p.nonblocking_ctx_seen.lock().unwrap(), vec![false, true]);
    mm.arch_invalidate_secondary_tlbs(range(0, 0x1000));
    assert_eq!(*tlb.nonblocking_ctx_seen.lock().unwrap(), vec![true]);
    assert_eq!(
        mm.subscribers().len(),
        2,
        "the refused unregister did nothing"
    );
}

// --- shared subscribers ------------------------------------------------------------------------

/// I14, I15: get_or_register gives one subscriber per type with a use count; put to zero
/// unlinks at once without release; free runs exactly once; synchronize waits for it.
#[test]
fn get_or_register_and_put() {
    let mm = Mm::new();
    let log = new_log();
    let allocs = AtomicU64::new(0);
    let alloc = || {
        allocs.fetch_add(1, SeqCst);
        Arc::new(Shared(Probe::new("s", START_END, &log)))
    };
    let id1 = mm.get_or_register(alloc).unwrap();
    let id2 = mm.get_or_register(alloc).unwrap();
    let id3 = mm.get_or_register(alloc).unwrap();
    assert_eq!((id1, id2), (id2, id3));
    assert_eq!(allocs.load(SeqCst), 1, "alloc runs only when none exists");
    assert_eq!(mm.subscribers(), vec![id1]);

    mm.put(id1).unwrap();
    mm.put(id1).unwrap();
    assert_eq!(mm.subscribers(), vec![id1], "one use left");
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!(entries(&log), ["s:start", "s:end"]);

    // Open a window that started it, on another thread, then put the last use.
    let (started_tx, started_rx) = mpsc::channel();
    let (end_tx, end_rx) = mpsc::channel::<()>();
    {
        let mm2 = mm.clone();
        thread::spawn(move || {
            let g = mm2
                .invalidate_start(range(0, 0x1000), Event::Unmap)
                .unwrap();
            started_tx.send(()).unwrap();
            // Bounded, so that a failing assertion on the main thread cannot hang the scope.
            let _ = end_rx.recv_timeout(HANG);
            g.end();
        });
        started_rx.recv_timeout(HANG).unwrap();
        mm.put(id1).unwrap();
        assert!(mm.subscribers().is_empty(), "put to zero unlinks at once");
        assert_eq!(mm.put(id1).unwrap_err(), Error::NotRegistered { id: id1 });

        let (sync_tx, sync_rx) = mpsc::channel();
        let mm3 = mm.clone();
        thread::spawn(move || {
            mm3.synchronize().unwrap();
            sync_tx.send(()).unwrap();
        });
        thread::sleep(Duration::from_millis(50));
        assert!(
            sync_rx.try_recv().is_err(),
            "synchronize returned before the free"
        );
        assert!(
            !entries(&log).contains(&"s:free".to_string()),
            "freed too early"
        );
        end_tx.send(()).unwrap();
        sync_rx
            .recv_timeout(HANG)
            .expect("synchronize returned after the free");
    }
    let l = entries(&log);
    assert_eq!(
        &l[2..],
        ["s:start", "s:end", "s:free"],
        "the owed end was delivered, then the free, exactly once"
    );
    assert!(
        !l.iter().any(|e| e.ends_with("release")),
        "put never releases"
    );

    // A new get after the last put registers a fresh subscriber.
    let id4 = mm.get_or_register(alloc).unwrap();
    assert_ne!(id4, id1);
    assert_eq!(allocs.load(SeqCst), 2);
}

/// Frees are counted outside the probe, which the engine drops on free.
struct FreeCounted(Arc<AtomicU64>, Probe);

impl Subscriber for FreeCounted {
    fn capabilities(&self) -> Capabilities {
        self.1.caps
    }
    fn release(&self) {
        self.1.release()
    }
    fn free(&self) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// I14, I15: free runs exactly once, and synchronize returns only after it ran; `put` from
/// inside `release` is allowed.
#[test]
fn put_from_release_and_free_once() {
    let mm = Mm::new();
    let log = new_log();
    let frees = Arc::new(AtomicU64::new(0));
    let id_cell = Arc::new(OnceLock::<SubscriberId>::new());
    let put_result = Arc::new(Mutex::new(None));
    let sub = Arc::new(FreeCounted(
        frees.clone(),
        Probe::new("s", Capabilities::new(), &log),
    ));
    {
        let (mm2, cell, pr) = (mm.clone(), id_cell.clone(), put_result.clone());
        sub.1.on_release(move || {
            *pr.lock().unwrap() = Some(mm2.put(*cell.get().unwrap()));
        });
    }
    let s2 = sub.clone();
    let id = mm.get_or_register(move || s2).unwrap();
    id_cell.set(id).unwrap();
    drop(sub); // the engine holds the only reference now (and the hook closure).

    mm.release().unwrap();
    assert_eq!(
        *put_result.lock().unwrap(),
        Some(Ok(())),
        "put inside release"
    );
    mm.synchronize().unwrap();
    assert_eq!(frees.load(SeqCst), 1, "freed exactly once");
    mm.synchronize().unwrap();
    assert_eq!(frees.load(SeqCst), 1);
    assert_eq!(entries(&log), ["s:release"]);
}

// --- release -----------------------------------------------------------------------------------

/// I16: Mm::release releases every subscriber exactly once (also one unregistered before),
/// delivers owed ends before returning, reaches nobody afterwards, and a second call is a no-op.
#[test]
fn release_once_and_nothing_after() {
    let mm = Mm::new();
    let log = new_log();
    let a = Probe::arc("a", START_END, &log);
    let b = Probe::arc("b", START_END, &log);
    let gone = Probe::arc("gone", START_END, &log);
    mm.register(a.clone()).unwrap();
    mm.register(b.clone()).unwrap();
    let gone_id = mm.register(gone.clone()).unwrap();
    mm.unregister(gone_id).unwrap();

    // A window open on another thread: release must deliver its ends before returning.
    let (started_tx, started_rx) = mpsc::channel();
    let (end_tx, end_rx) = mpsc::channel::<()>();
    let (rel_tx, rel_rx) = mpsc::channel();
    {
        let mm2 = mm.clone();
        thread::spawn(move || {
            let g = mm2
                .invalidate_start(range(0, 0x1000), Event::Unmap)
                .unwrap();
            started_tx.send(()).unwrap();
            // Bounded, so that a failing assertion on the main thread cannot hang the scope.
            let _ = end_rx.recv_timeout(HANG);
            g.end();
        });
        started_rx.recv_timeout(HANG).unwrap();
        let (mm3, log3) = (mm.clone(), log.clone());
        thread::spawn(move || {
            mm3.release().unwrap();
            log3.lock().unwrap().push("release returned".into());
            rel_tx.send(()).unwrap();
        });
        let deadline = Instant::now() + HANG;
        while Probe::n(&a.releases) + Probe::n(&b.releases) < 2 {
            assert!(Instant::now() < deadline, "release callbacks never ran");
            thread::yield_now();
        }
        thread::sleep(Duration::from_millis(50));
        assert!(
            rel_rx.try_recv().is_err(),
            "release returned before the owed ends"
        );
        end_tx.send(()).unwrap();
        rel_rx
            .recv_timeout(HANG)
            .expect("release returned after the ends");
    }
    assert_eq!(
        entries(&log)[4..],
        [
            "a:release",
            "b:release",
            "a:end",
            "b:end",
            "a:free",
            "b:free",
            "release returned"
        ]
    );

    // Nothing new reaches them.
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    assert!(mm
        .invalidate_start_nonblock(range(0, 0x1000), Event::Unmap)
        .is_ok());
    assert!(!mm.clear_flush_young(range(0, 0x1000)));
    mm.release().unwrap(); // no-op
    for p in [&a, &b] {
        assert_eq!(counts(p), (1, 0, 1));
        assert_eq!(Probe::n(&p.releases), 1);
        assert_eq!(Probe::n(&p.young_calls), 0);
    }
    assert_eq!(
        Probe::n(&gone.releases),
        1,
        "released by its unregister only"
    );
}

/// I17: the read side is per `Mm`: a guard held on one address space does not delay
/// unregister on another.
#[test]
fn unregister_on_one_mm_ignores_readers_of_another() {
    let mm_a = Mm::new();
    let mm_b = Mm::new();
    let log = new_log();
    mm_a.register(Probe::arc("a", START_END, &log)).unwrap();
    let b_id = mm_b.register(Probe::arc("b", START_END, &log)).unwrap();
    let g = mm_a
        .invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap();
    // On the same thread: the guard of A does not count against B.
    let b_id2 = mm_b.register(Probe::arc("b2", START_END, &log)).unwrap();
    mm_b.unregister(b_id2).unwrap();
    // On another thread, with a hang detector.
    let (tx, rx) = mpsc::channel();
    {
        let mm_b2 = mm_b.clone();
        thread::spawn(move || {
            mm_b2.unregister(b_id).unwrap();
            mm_b2.synchronize().unwrap();
            tx.send(()).unwrap();
        });
        rx.recv_timeout(HANG)
            .expect("unregister on B waited for a reader of A");
    }
    g.end();
}

// --- young, TLB, stats -------------------------------------------------------------------------

/// I19: clear_flush_young / clear_young call every subscriber and OR the answers; test_young
/// stops at the first yes.
#[test]
fn young_callbacks_or_and_short_circuit() {
    let mm = Mm::new();
    let log = new_log();
    let caps = Capabilities::new();
    let p0 = Arc::new(Probe::new("p0", caps, &log).young(false));
    let p1 = Arc::new(Probe::new("p1", caps, &log).young(true));
    let p2 = Arc::new(Probe::new("p2", caps, &log).young(true));
    for p in [&p0, &p1, &p2] {
        mm.register(p.clone()).unwrap();
    }
    let r = range(0, 0x1000);
    assert!(mm.clear_flush_young(r));
    assert_eq!(entries(&log), ["p0:cfy", "p1:cfy", "p2:cfy"]);
    log.lock().unwrap().clear();
    assert!(mm.clear_young(r));
    assert_eq!(entries(&log), ["p0:cy", "p1:cy", "p2:cy"]);
    log.lock().unwrap().clear();
    assert!(mm.test_young(0x10));
    assert_eq!(
        entries(&log),
        ["p0:ty", "p1:ty"],
        "stops at the first young"
    );

    // All false: false, and everyone was asked.
    let mm = Mm::new();
    let log = new_log();
    let q: Vec<_> = (0..3)
        .map(|i| Arc::new(Probe::new(&format!("q{i}"), caps, &log)))
        .collect();
    for p in &q {
        mm.register(p.clone()).unwrap();
    }
    assert!(!mm.clear_flush_young(r));
    assert!(!mm.clear_young(r));
    assert!(!mm.test_young(0));
    assert!(q.iter().all(|p| Probe::n(&p.young_calls) == 3));
}

/// I20: the secondary-TLB callback reaches only subscribers that declared it, and start/end
/// never reach them.
#[test]
fn secondary_tlb_only_to_declarers() {
    let mm = Mm::new();
    let log = new_log();
    let tlb = Probe::arc("t", Capabilities::new().with_secondary_tlb(), &log);
    let kvm = Probe::arc("k", START_END, &log);
    mm.register(kvm.clone()).unwrap();
    mm.register(tlb.clone()).unwrap();
    mm.arch_invalidate_secondary_tlbs(range(0, 0x1000));
    mm.arch_invalidate_secondary_tlbs(range(0x1000, 0x2000));
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!(Probe::n(&tlb.tlb_calls), 2);
    assert_eq!(Probe::n(&kvm.tlb_calls), 0);
    assert_eq!(counts(&tlb), (0, 0, 0));
    assert_eq!(counts(&kvm), (1, 0, 1));
}

/// I21: per-subscriber counters match what was delivered, including `releases`, read while the
/// subscriber is still linked (from a later subscriber's release during `Mm::release`).
#[test]
fn stats_match_delivered_callbacks() {
    let mm = Mm::new();
    let log = new_log();
    let a = Arc::new(Probe::new("a", REFUSER, &log).refusing(Refuse::NonBlocking));
    let b = Probe::arc("b", START_END, &log);
    let a_id = mm.register(a.clone()).unwrap();
    let b_id = mm.register(b.clone()).unwrap();
    for _ in 0..3 {
        mm.invalidate_start(range(0, 0x1000), Event::Clear)
            .unwrap()
            .end();
    }
    for _ in 0..2 {
        assert!(mm
            .invalidate_start_nonblock(range(0, 0x1000), Event::Unmap)
            .is_err());
    }
    let sa = mm.subscriber_stats(a_id).unwrap();
    assert_eq!(
        (sa.starts, sa.refusals, sa.ends, sa.releases, sa.violations),
        (
            Probe::n(&a.starts),
            Probe::n(&a.refusals),
            Probe::n(&a.ends),
            0,
            0
        )
    );
    assert_eq!((sa.starts, sa.refusals, sa.ends), (3, 2, 3));
    let sb = mm.subscriber_stats(b_id).unwrap();
    assert_eq!((sb.starts, sb.refusals, sb.ends), (3, 0, 3));

    let seen = Arc::new(Mutex::new(None));
    let (mm2, seen2) = (mm.clone(), seen.clone());
    b.on_release(move || *seen2.lock().unwrap() = Some(mm2.subscriber_stats(a_id)));
    mm.release().unwrap();
    b.clear_hooks();
    let sa = seen.lock().unwrap().take().unwrap().unwrap();
    assert_eq!(sa.releases, 1);
    assert_eq!(Probe::n(&a.releases), 1);
    assert_eq!(
        mm.subscriber_stats(a_id).unwrap_err(),
        Error::NotRegistered { id: a_id }
    );
}

// --- panics ------------------------------------------------------------------------------------

/// I34: a panicking start of a blockable invalidation: the walk goes on (the range changes
/// anyway, so `c` must still drop its copy), the started subscribers get their end, the
/// panicking one does not, the epoch closes, the panic is resumed on the caller, and the `Mm`
/// stays usable. Before this rule a panic stopped the walk, and `c` silently kept a stale
/// mapping (found by review through the userfaultfd watcher: one library's panicking
/// subscriber left another library's registration cache stale).
#[test]
fn panicking_start_ends_the_others_and_propagates() {
    let mm = Mm::new();
    let log = new_log();
    let a = Probe::arc("a", START_END, &log);
    let b = Probe::arc("b", START_END, &log);
    let c = Probe::arc("c", START_END, &log);
    for p in [&a, &b, &c] {
        mm.register(p.clone()).unwrap();
    }
    let _iv = mm
        .insert_interval(Range::from_len(0, 0x1000).unwrap(), Arc::new(NoopInterval))
        .unwrap();
    b.panic_start.store(true, SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| {
        let _g = mm.invalidate_start(range(0, 0x1000), Event::Unmap);
    }));
    let payload = r.expect_err("the panic propagates");
    assert_eq!(
        payload.downcast_ref::<String>().map(String::as_str),
        Some("b panics in start")
    );
    assert_eq!(
        entries(&log),
        ["a:start", "b:panic-start", "c:start", "a:end", "c:end"]
    );
    let st = mm.interval_state();
    assert_eq!((st.active, st.seq % 2), (0, 0), "the epoch closed");

    b.panic_start.store(false, SeqCst);
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!(counts(&a), (2, 0, 2));
    assert_eq!(counts(&b), (1, 0, 1));
    assert_eq!(counts(&c), (2, 0, 2));
}

/// I34: a panicking start of a *non-blockable* invalidation stops the walk like a refusal (the
/// caller, e.g. the OOM reaper, will not change the range): `c` is not started, `a` is ended.
#[test]
fn panicking_nonblocking_start_stops_the_walk() {
    let mm = Mm::new();
    let log = new_log();
    let a = Probe::arc("a", START_END, &log);
    let b = Probe::arc("b", START_END, &log);
    let c = Probe::arc("c", START_END, &log);
    for p in [&a, &b, &c] {
        mm.register(p.clone()).unwrap();
    }
    b.panic_start.store(true, SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| {
        let _g = mm.invalidate_start_nonblock(range(0, 0x1000), Event::Unmap);
    }));
    assert!(r.is_err(), "the panic propagates");
    assert_eq!(entries(&log), ["a:start", "b:panic-start", "a:end"]);
    assert_eq!(counts(&c), (0, 0, 0));
}

/// I34: a panicking end: the other subscribers still get their ends, the panic is resumed on
/// the caller, and the `Mm` stays usable (unregister included).
#[test]
fn panicking_end_still_ends_the_others() {
    let mm = Mm::new();
    let log = new_log();
    let a = Probe::arc("a", START_END, &log);
    let b = Probe::arc("b", START_END, &log);
    let c = Probe::arc("c", START_END, &log);
    let ids: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|p| mm.register((*p).clone()).unwrap())
        .collect();
    b.panic_end.store(true, SeqCst);
    let g = mm.invalidate_start(range(0, 0x1000), Event::Unmap).unwrap();
    let r = catch_unwind(AssertUnwindSafe(move || g.end()));
    assert!(r.is_err(), "the panic propagates");
    assert_eq!(counts(&a), (1, 0, 1));
    assert_eq!(counts(&b), (1, 0, 1));
    assert_eq!(
        counts(&c),
        (1, 0, 1),
        "ends after the panicking one are delivered"
    );

    b.panic_end.store(false, SeqCst);
    mm.invalidate_start(range(0, 0x1000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!(counts(&c), (2, 0, 2));
    for id in ids {
        mm.unregister(id).unwrap();
    }
    mm.synchronize().unwrap();
}
