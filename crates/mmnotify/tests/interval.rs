//! Integration tests of interval subscriptions: ordering against classic subscribers, overlap,
//! refusal, the epoch/sequence protocol, deferred index changes, two-pass invalidation,
//! release, removal, bounded `read_begin`, and the Linux itree/classic leak reproduced under
//! `Policy::Kernel` and `Policy::Legacy` (and fixed under `Policy::Exact`).
//!
//! Each test names the invariants of `docs/SEMANTICS.md` it checks.
#![allow(clippy::disallowed_types)] // std::sync is fine in tests: they are not loom-checked.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use mmnotify::{
    BlockingOp, Capabilities, DeadlockCause, Error, Event, IntervalCtx, IntervalHandle,
    IntervalState, IntervalSubscriber, Invalidate, Invalidation, Mm, Policy, Range, Refused,
    Refuser, Subscriber,
};

/// Generous bound used only to turn a hang into a failure.
const HANG: Duration = Duration::from_secs(10);

type Log = Arc<Mutex<Vec<String>>>;
type IvHook = Box<dyn Fn(&IntervalCtx<'_>, &Invalidation) + Send + Sync>;
type Hook = Box<dyn Fn(&Invalidation) + Send + Sync>;

fn new_log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

fn entries(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

fn range(start: u64, end: u64) -> Range {
    Range::new(start, end).unwrap()
}

fn idle(state: IntervalState) -> bool {
    state.active == 0 && state.seq % 2 == 0
}

/// What an interval probe answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Done,
    Finish,
    RefuseNonBlocking,
    Panic,
}

/// An interval subscriber that follows the protocol (set_seq under its lock) and logs.
struct Iv {
    name: String,
    log: Log,
    mode: Mutex<Mode>,
    user_lock: Mutex<()>,
    calls: AtomicU64,
    seen: Mutex<Vec<(Event, Range, bool, u64)>>,
    hook: Mutex<Option<IvHook>>,
}

impl Iv {
    fn arc(name: &str, mode: Mode, log: &Log) -> Arc<Iv> {
        Arc::new(Iv {
            name: name.to_string(),
            log: Arc::clone(log),
            mode: Mutex::new(mode),
            user_lock: Mutex::new(()),
            calls: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
            hook: Mutex::new(None),
        })
    }

    fn on_invalidate(&self, f: impl Fn(&IntervalCtx<'_>, &Invalidation) + Send + Sync + 'static) {
        *self.hook.lock().unwrap() = Some(Box::new(f));
    }

    fn clear_hook(&self) {
        *self.hook.lock().unwrap() = None;
    }

    fn calls(&self) -> u64 {
        self.calls.load(SeqCst)
    }

    fn push(&self, what: &str) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:{what}", self.name));
    }
}

impl IntervalSubscriber for Iv {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        self.calls.fetch_add(1, SeqCst);
        self.seen.lock().unwrap().push((
            inv.event(),
            inv.range(),
            inv.is_blockable(),
            ctx.cur_seq(),
        ));
        if let Some(hook) = self.hook.lock().unwrap().as_ref() {
            hook(ctx, inv);
        }
        let mode = *self.mode.lock().unwrap();
        if mode == Mode::RefuseNonBlocking && !inv.is_blockable() {
            self.push("refuse");
            return Invalidate::Refused;
        }
        if mode == Mode::Panic {
            self.push("panic");
            panic!("{} panics", self.name);
        }
        {
            let _l = self.user_lock.lock().unwrap();
            ctx.set_seq();
        }
        self.push("inv");
        if mode == Mode::Finish {
            Invalidate::Finish
        } else {
            Invalidate::Done
        }
    }

    fn invalidate_finish(&self, _ctx: &IntervalCtx<'_>, _inv: &Invalidation) {
        self.push("finish");
    }
}

/// A classic subscriber that logs, may refuse non-blocking starts, and runs hooks.
struct Classic {
    name: String,
    caps: Capabilities,
    log: Log,
    refuse_nonblocking: bool,
    starts: AtomicU64,
    ends: AtomicU64,
    start_hook: Mutex<Option<Hook>>,
    end_hook: Mutex<Option<Hook>>,
}

impl Classic {
    fn arc(name: &str, caps: Capabilities, refuse_nonblocking: bool, log: &Log) -> Arc<Classic> {
        Arc::new(Classic {
            name: name.to_string(),
            caps,
            log: Arc::clone(log),
            refuse_nonblocking,
            starts: AtomicU64::new(0),
            ends: AtomicU64::new(0),
            start_hook: Mutex::new(None),
            end_hook: Mutex::new(None),
        })
    }

    fn push(&self, what: &str) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:{what}", self.name));
    }
}

impl Subscriber for Classic {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn release(&self) {
        self.push("release");
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        if let Some(hook) = self.start_hook.lock().unwrap().as_ref() {
            hook(inv);
        }
        if self.refuse_nonblocking && !inv.is_blockable() {
            self.push("refuse");
            return Err(Refused);
        }
        self.starts.fetch_add(1, SeqCst);
        self.push("start");
        Ok(())
    }

    fn invalidate_range_end(&self, inv: &Invalidation) {
        self.ends.fetch_add(1, SeqCst);
        self.push("end");
        if let Some(hook) = self.end_hook.lock().unwrap().as_ref() {
            hook(inv);
        }
    }
}

const KVM: Capabilities = Capabilities::new().with_start().with_end();
/// Linux's convention for a subscriber that may refuse: start, no end (nouveau, GRU).
const NOUVEAU: Capabilities = Capabilities::new().with_start().may_refuse();

fn assert_deadlock<T: std::fmt::Debug>(r: Result<T, Error>, op: BlockingOp, cause: DeadlockCause) {
    match r {
        Err(Error::WouldDeadlock { op: o, cause: c }) => assert_eq!((o, c), (op, cause)),
        other => panic!("expected WouldDeadlock({op:?}, {cause:?}), got {other:?}"),
    }
}

// --- ordering and overlap ---------------------------------------------------------------------

/// I22: interval callbacks run before any classic start (inside the open epoch), and the epoch
/// is closed (S even, nothing active) before the classic ends run.
#[test]
fn intervals_before_classic_and_epoch_closed_before_ends() {
    let mm = Mm::new();
    let log = new_log();
    let iv = Iv::arc("iv", Mode::Done, &log);
    let _h = mm
        .insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), iv.clone())
        .unwrap();
    let c = Classic::arc("c", KVM, false, &log);
    let states = Arc::new(Mutex::new(Vec::new()));
    {
        let (mm2, st) = (mm.clone(), states.clone());
        *c.start_hook.lock().unwrap() = Some(Box::new(move |_| {
            st.lock().unwrap().push(("start", mm2.interval_state()))
        }));
        let (mm2, st) = (mm.clone(), states.clone());
        *c.end_hook.lock().unwrap() = Some(Box::new(move |_| {
            st.lock().unwrap().push(("end", mm2.interval_state()))
        }));
    }
    mm.register(c.clone()).unwrap();

    for nonblock in [false, true] {
        let r = range(0x1800, 0x2800);
        let g = if nonblock {
            mm.invalidate_start_nonblock(r, Event::Unmap).unwrap()
        } else {
            mm.invalidate_start(r, Event::Unmap).unwrap()
        };
        g.end();
    }
    *c.start_hook.lock().unwrap() = None;
    *c.end_hook.lock().unwrap() = None;

    assert_eq!(
        entries(&log),
        ["iv:inv", "c:start", "c:end", "iv:inv", "c:start", "c:end"]
    );
    let states = states.lock().unwrap().clone();
    assert_eq!(states.len(), 4);
    for (what, st) in states {
        match what {
            "start" => assert!(
                st.seq % 2 == 1 && st.active == 1,
                "start inside the epoch: {st:?}"
            ),
            _ => assert!(idle(st), "epoch closed before the end: {st:?}"),
        }
    }
}

/// I23: each overlapping interval gets exactly one callback per range, others none; bounds are
/// inclusive for intervals and half-open for ranges.
#[test]
fn one_callback_per_overlapping_interval() {
    let mm = Mm::new();
    let log = new_log();
    let a = Iv::arc("a", Mode::Done, &log); // [0x1000, 0x1fff]
    let b = Iv::arc("b", Mode::Done, &log); // [0x2000, 0x2fff]
    let c = Iv::arc("c", Mode::Done, &log); // [0x3000, 0x3fff]
    let big = Iv::arc("big", Mode::Done, &log); // [0x0, 0xffff]
    mm.insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), a.clone())
        .unwrap();
    mm.insert_interval(Range::from_len(0x2000, 0x1000).unwrap(), b.clone())
        .unwrap();
    mm.insert_interval(Range::from_len(0x3000, 0x1000).unwrap(), c.clone())
        .unwrap();
    mm.insert_interval(Range::from_len(0, 0x10000).unwrap(), big.clone())
        .unwrap();

    let check = |r: Range, expect: [u64; 4]| {
        let before = [a.calls(), b.calls(), c.calls(), big.calls()];
        mm.invalidate_start(r, Event::Clear).unwrap().end();
        let after = [a.calls(), b.calls(), c.calls(), big.calls()];
        let delta: Vec<u64> = after.iter().zip(before).map(|(x, y)| x - y).collect();
        assert_eq!(delta, expect, "range {r}");
    };
    check(range(0x1fff, 0x2000), [1, 0, 0, 1]); // last byte of a only
    check(range(0x1000, 0x2000), [1, 0, 0, 1]); // exclusive end: not b
    check(range(0x1fff, 0x2001), [1, 1, 0, 1]); // straddles a/b
    check(range(0x2fff, 0x3001), [0, 1, 1, 1]);
    check(range(0x0, 0x4000), [1, 1, 1, 1]);
    check(range(0x4000, 0x5000), [0, 0, 0, 1]);
    check(range(0x10000, 0x20000), [0, 0, 0, 0]); // just after big's last byte
    assert!(idle(mm.interval_state()));
}

/// I24, I32, I25: a non-blocking interval refusal stops the walk, runs the finish steps already
/// due, closes the epoch, calls no classic start, and names the interval.
#[test]
fn nonblocking_interval_refusal_stops_the_walk() {
    let mm = Mm::new();
    let log = new_log();
    let a = Iv::arc("a", Mode::Finish, &log);
    let b = Iv::arc("b", Mode::RefuseNonBlocking, &log);
    let c = Iv::arc("c", Mode::Done, &log);
    mm.insert_interval(Range::from_len(0x0000, 0x1000).unwrap(), a.clone())
        .unwrap();
    let hb = mm
        .insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), b.clone())
        .unwrap();
    mm.insert_interval(Range::from_len(0x2000, 0x1000).unwrap(), c.clone())
        .unwrap();
    let k = Classic::arc("k", KVM, false, &log);
    mm.register(k.clone()).unwrap();

    let r = range(0, 0x3000);
    let e = mm.invalidate_start_nonblock(r, Event::Unmap).unwrap_err();
    assert_eq!(
        e,
        Error::StartRefused {
            range: r,
            refusers: vec![Refuser::Interval(hb.id())]
        }
    );
    assert!(e.to_string().contains(&hb.id().to_string()), "{e}");
    assert!(hb.id().to_string().starts_with("interval #"));
    assert_eq!(entries(&log), ["a:inv", "b:refuse", "a:finish"]);
    assert_eq!(c.calls(), 0, "the walk stopped");
    assert_eq!(k.starts.load(SeqCst) + k.ends.load(SeqCst), 0);
    assert!(idle(mm.interval_state()), "{:?}", mm.interval_state());
    // The interval can be read again at once.
    let seq = hb.read_begin_until(Instant::now() + HANG).unwrap();
    assert!(!hb.read_retry(seq));
}

// --- the Linux leak ---------------------------------------------------------------------------

struct LeakScenario {
    mm: Mm,
    iv: Arc<Iv>,
    handle: IntervalHandle,
    err: Error,
}

/// An interval subscriber that succeeds, then a nouveau-like classic subscriber that refuses
/// the non-blocking start (the OOM reaper's).
fn leak_scenario(policy: Policy) -> LeakScenario {
    let mm = Mm::with_policy(policy);
    let log = new_log();
    let iv = Iv::arc("hmm", Mode::Done, &log);
    let handle = mm
        .insert_interval(Range::from_len(0x10000, 0x10000).unwrap(), iv.clone())
        .unwrap();
    let nouveau = Classic::arc("nouveau", NOUVEAU, true, &log);
    let nid = mm.register(nouveau).unwrap();
    let err = mm
        .invalidate_start_nonblock(range(0x18000, 0x19000), Event::Unmap)
        .unwrap_err();
    assert!(
        matches!(&err, Error::StartRefused { refusers, .. } if refusers == &[Refuser::Classic(nid)]),
        "{err:?}"
    );
    assert_eq!(
        iv.calls(),
        1,
        "{policy:?}: the interval callback succeeded first"
    );
    LeakScenario {
        mm,
        iv,
        handle,
        err,
    }
}

/// I25, P2: under Kernel, a classic refusal after interval success leaks the epoch: S stays
/// odd, one invalidation stays active forever, and `read_begin` on the hit interval can never
/// return (bounded here by `read_begin_timeout`).
#[test]
fn kernel_leaks_the_epoch_after_a_classic_refusal() {
    let s = leak_scenario(Policy::Kernel);
    let st = s.mm.interval_state();
    assert_eq!(st.active, 1, "leaked active count: {st:?}");
    assert_eq!(st.seq % 2, 1, "epoch still open: {st:?}");
    let e = s
        .handle
        .read_begin_timeout(Duration::from_millis(200))
        .unwrap_err();
    assert!(
        matches!(e, Error::ReadBeginTimeout { id, .. } if id == s.handle.id()),
        "{e:?}"
    );
    assert!(e.to_string().contains("still open"), "{e}");
    assert_eq!(s.mm.interval_state().active, 1, "still leaked");
    assert!(matches!(s.err, Error::StartRefused { .. }));
    assert_eq!(s.iv.calls(), 1);
}

/// I25, P3: Legacy has the same code shape as Kernel here, so it leaks the epoch too.
#[test]
fn legacy_leaks_the_epoch_too() {
    let s = leak_scenario(Policy::Legacy);
    let st = s.mm.interval_state();
    assert_eq!((st.active, st.seq % 2), (1, 1), "{st:?}");
    let e = s
        .handle
        .read_begin_timeout(Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(e, Error::ReadBeginTimeout { .. }), "{e:?}");
}

/// I25, I5, P1: the same scenario under Exact closes the epoch: `read_begin` returns at once,
/// S is even, nothing is active, and the next invalidation works.
#[test]
fn exact_closes_the_epoch_after_a_classic_refusal() {
    let s = leak_scenario(Policy::Exact);
    assert!(idle(s.mm.interval_state()), "{:?}", s.mm.interval_state());
    let seq = s
        .handle
        .read_begin_timeout(Duration::from_millis(200))
        .expect("read_begin returns");
    assert_eq!(seq.value() % 2, 1);
    assert!(!s.handle.read_retry(seq));
    s.mm.remove_interval(&s.handle).unwrap();
    assert_eq!(s.mm.interval_state().indexed, 0);
}

// --- the sequence ---------------------------------------------------------------------------

/// I26: S is even when idle, odd only during an epoch; each epoch has a fresh, strictly greater
/// odd value; interval sequences are always odd. A range that overlaps nothing opens no epoch.
#[test]
fn sequence_parity_and_freshness() {
    let mm = Mm::new();
    let log = new_log();
    let iv = Iv::arc("iv", Mode::Done, &log);
    let h = mm
        .insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), iv.clone())
        .unwrap();
    let s0 = mm.interval_state();
    assert!(idle(s0));
    let first = h.read_begin().unwrap();
    assert_eq!(
        first.value() % 2,
        1,
        "an idle insert gets an odd value from the past"
    );
    assert!(first.value() < s0.seq);

    // A range in flight that overlaps no interval: counted, but no epoch.
    let g = mm
        .invalidate_start(range(0x8000, 0x9000), Event::Clear)
        .unwrap();
    let st = mm.interval_state();
    assert_eq!((st.active, st.seq), (1, s0.seq));
    g.end();

    let mut epochs = Vec::new();
    for _ in 0..4 {
        let g = mm
            .invalidate_start(range(0x1000, 0x1001), Event::Clear)
            .unwrap();
        let st = mm.interval_state();
        assert_eq!(st.seq % 2, 1, "odd during an epoch");
        assert_eq!(st.active, 1);
        epochs.push(st.seq);
        g.end();
        let st = mm.interval_state();
        assert!(idle(st));
        assert_eq!(st.seq, epochs.last().unwrap() + 1);
        let seq = h.read_begin().unwrap();
        assert_eq!(
            seq.value(),
            *epochs.last().unwrap(),
            "tagged by the epoch, odd"
        );
    }
    assert!(epochs.windows(2).all(|w| w[1] > w[0]), "{epochs:?}");
    let cur_seqs: Vec<u64> = iv.seen.lock().unwrap().iter().map(|s| s.3).collect();
    assert_eq!(cur_seqs, epochs, "callbacks get the epoch's value");

    // Two overlapping windows share one epoch, which closes with the last.
    let g1 = mm
        .invalidate_start(range(0x1000, 0x1800), Event::Clear)
        .unwrap();
    let g2 = mm
        .invalidate_start(range(0x1400, 0x2000), Event::Clear)
        .unwrap();
    let st = mm.interval_state();
    assert_eq!((st.active, st.seq), (2, epochs[3] + 2));
    g1.end();
    assert_eq!(
        mm.interval_state().seq % 2,
        1,
        "still open while one is active"
    );
    g2.end();
    assert!(idle(mm.interval_state()));
}

/// I27: while S is odd the index does not change: an insert is deferred, is not called by
/// ranges of the open epoch, and is applied when the epoch closes; a deferred removal likewise.
#[test]
fn inserts_and_removes_during_an_epoch_are_deferred() {
    let mm = Mm::new();
    let log = new_log();
    let a = Iv::arc("a", Mode::Done, &log);
    let ha = mm
        .insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), a.clone())
        .unwrap();
    let g = mm
        .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap();
    let b = Iv::arc("b", Mode::Done, &log);
    let hb = mm
        .insert_interval(Range::from_len(0x4000, 0x1000).unwrap(), b.clone())
        .unwrap();
    let st = mm.interval_state();
    assert_eq!((st.indexed, st.deferred), (1, 1), "{st:?}");
    // A nested range of the same epoch over b's interval does not see it yet.
    mm.invalidate_start(range(0x4000, 0x5000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!(b.calls(), 0);
    // A deferred removal of a: still indexed (and still called) until the close.
    mm.remove_interval_deferred(&ha).unwrap();
    let st = mm.interval_state();
    assert_eq!((st.indexed, st.deferred), (1, 2), "{st:?}");
    mm.invalidate_start(range(0x1000, 0x1001), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!(a.calls(), 2);
    g.end();
    let st = mm.interval_state();
    assert!(idle(st));
    assert_eq!(
        (st.indexed, st.deferred),
        (1, 0),
        "applied at the close: {st:?}"
    );
    mm.invalidate_start(range(0, 0x10000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!((a.calls(), b.calls()), (2, 1));
    assert_eq!(
        mm.remove_interval(&ha).unwrap_err(),
        Error::IntervalNotInserted { id: ha.id() }
    );
    mm.remove_interval(&hb).unwrap();
}

/// I28: an interval inserted while a range is in flight (no epoch yet) opens one; its first
/// `read_begin` waits until that range ended.
#[test]
fn insert_while_in_flight_waits_for_the_ranges() {
    let mm = Mm::new();
    let log = new_log();
    let _first = mm
        .insert_interval(
            Range::from_len(0x100000, 0x1000).unwrap(),
            Iv::arc("x", Mode::Done, &log),
        )
        .unwrap();
    let g = mm
        .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap();
    assert_eq!(mm.interval_state().seq % 2, 0, "nothing overlapped yet");
    let h = mm
        .insert_interval(
            Range::from_len(0x1000, 0x1000).unwrap(),
            Iv::arc("late", Mode::Done, &log),
        )
        .unwrap();
    let st = mm.interval_state();
    assert_eq!((st.seq % 2, st.indexed, st.deferred), (1, 2, 0), "{st:?}");
    let (tx, rx) = mpsc::channel();
    {
        let h2 = h.clone();
        thread::spawn(move || tx.send(h2.read_begin()).unwrap());
        thread::sleep(Duration::from_millis(50));
        assert!(
            rx.try_recv().is_err(),
            "read_begin returned during the in-flight range"
        );
        g.end();
        let seq = rx.recv_timeout(HANG).unwrap().unwrap();
        assert_eq!(seq.value() % 2, 1);
    }
    assert!(idle(mm.interval_state()));
}

/// I29, I13, I30: `read_begin` does not return while the epoch that tagged the interval is
/// open; `read_begin_timeout` fails at its deadline on another thread; on the guard's own thread
/// a colliding `read_begin` is `WouldDeadlock(HoldsGuard)`; `read_retry` reports the collision.
#[test]
fn read_begin_waits_for_the_tagging_epoch() {
    let mm = Mm::new();
    let log = new_log();
    let h = mm
        .insert_interval(
            Range::from_len(0x1000, 0x1000).unwrap(),
            Iv::arc("iv", Mode::Done, &log),
        )
        .unwrap();
    let before = h.read_begin().unwrap();
    let g = mm
        .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap();
    assert!(h.read_retry(before), "the callback ran after read_begin");
    assert!(h.check_retry(before));
    assert_deadlock(
        h.read_begin(),
        BlockingOp::ReadBegin,
        DeadlockCause::HoldsGuard,
    );

    let (tx, rx) = mpsc::channel();
    {
        let h2 = h.clone();
        let timed = thread::spawn(move || h2.read_begin_timeout(Duration::from_millis(100)));
        let e = timed.join().unwrap().unwrap_err();
        match e {
            Error::ReadBeginTimeout { id, waited } => {
                assert_eq!(id, h.id());
                assert!(waited < HANG);
            }
            other => panic!("expected ReadBeginTimeout, got {other:?}"),
        }
        let h3 = h.clone();
        thread::spawn(move || tx.send(h3.read_begin()).unwrap());
        thread::sleep(Duration::from_millis(50));
        assert!(
            rx.try_recv().is_err(),
            "read_begin returned inside the epoch"
        );
        g.end();
        let seq = rx.recv_timeout(HANG).unwrap().unwrap();
        assert!(!h.read_retry(seq));
        assert_ne!(seq, before);
    }
}

/// I13, I18: `read_begin` inside the interval's own callback (blockable: InsideCallback;
/// non-blockable: NonBlockingContext), and `remove_interval` inside a callback, are
/// `WouldDeadlock`; `remove_deferred` inside the callback works and takes effect at the close.
#[test]
fn blocking_interval_calls_inside_callbacks() {
    let mm = Mm::new();
    let log = new_log();
    let iv = Iv::arc("iv", Mode::Done, &log);
    let h = mm
        .insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), iv.clone())
        .unwrap();
    let results = Arc::new(Mutex::new(Vec::new()));
    let cell = Arc::new(OnceLock::<IntervalHandle>::new());
    cell.set(h.clone()).unwrap();
    {
        let (mm2, res, cell) = (mm.clone(), results.clone(), cell.clone());
        iv.on_invalidate(move |ctx, inv| {
            let h = cell.get().unwrap();
            ctx.set_seq(); // collide with ourselves
            let cause = if inv.is_blockable() {
                DeadlockCause::InsideCallback
            } else {
                DeadlockCause::NonBlockingContext
            };
            res.lock()
                .unwrap()
                .push((BlockingOp::ReadBegin, cause, h.read_begin().map(|_| ())));
            res.lock()
                .unwrap()
                .push((BlockingOp::Remove, cause, mm2.remove_interval(h)));
        });
    }
    mm.invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap()
        .end();
    mm.invalidate_start_nonblock(range(0x1000, 0x2000), Event::Unmap)
        .unwrap()
        .end();
    let rs = std::mem::take(&mut *results.lock().unwrap());
    assert_eq!(rs.len(), 4);
    for (op, cause, r) in rs {
        assert_deadlock(r, op, cause);
    }
    assert_eq!(mm.interval_state().indexed, 1, "nothing was removed");

    // remove_deferred from inside the callback works.
    iv.on_invalidate(|ctx, _| ctx.remove_deferred());
    let g = mm
        .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap();
    assert_eq!(mm.interval_state().deferred, 1);
    g.end();
    iv.clear_hook();
    assert_eq!(mm.interval_state().indexed, 0);
    let calls = iv.calls();
    mm.invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!(iv.calls(), calls, "removed: no more callbacks");
    assert_eq!(
        mm.remove_interval(&h).unwrap_err(),
        Error::IntervalNotInserted { id: h.id() }
    );
}

/// I31: `remove` twice is `IntervalNotInserted`; `remove` waits for the epoch that may still
/// call the interval; removing a deferred insert does not wait; a handle of another `Mm` is
/// rejected.
#[test]
fn remove_semantics() {
    let mm = Mm::new();
    let log = new_log();
    let a = Iv::arc("a", Mode::Done, &log);
    let ha = mm
        .insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), a.clone())
        .unwrap();
    let other = Mm::new();
    let ho = other
        .insert_interval(
            Range::from_len(0x1000, 0x1000).unwrap(),
            Iv::arc("o", Mode::Done, &log),
        )
        .unwrap();
    assert_eq!(
        mm.remove_interval(&ho).unwrap_err(),
        Error::IntervalNotInserted { id: ho.id() }
    );

    let g = mm
        .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap();
    assert_deadlock(
        mm.remove_interval(&ha),
        BlockingOp::Remove,
        DeadlockCause::HoldsGuard,
    );
    let (done_tx, done_rx) = mpsc::channel();
    {
        // A deferred insert removed from another thread: no wait although the epoch is open.
        let mm2 = mm.clone();
        let log2 = log.clone();
        let (qtx, qrx) = mpsc::channel();
        thread::spawn(move || {
            let hb = mm2
                .insert_interval(
                    Range::from_len(0x1800, 0x1000).unwrap(),
                    Iv::arc("b", Mode::Done, &log2),
                )
                .unwrap();
            assert_eq!(mm2.interval_state().deferred, 1);
            qtx.send(mm2.remove_interval(&hb)).unwrap();
        });
        assert_eq!(
            qrx.recv_timeout(HANG)
                .expect("removing a deferred insert waited"),
            Ok(())
        );
        assert_eq!(mm.interval_state().deferred, 0);

        // Removing the tagged interval waits for the epoch.
        let mm3 = mm.clone();
        let ha2 = ha.clone();
        thread::spawn(move || done_tx.send(mm3.remove_interval(&ha2)).unwrap());
        let deadline = Instant::now() + HANG;
        while mm.interval_state().deferred == 0 {
            assert!(Instant::now() < deadline, "remove never queued");
            thread::yield_now();
        }
        thread::sleep(Duration::from_millis(50));
        assert!(
            done_rx.try_recv().is_err(),
            "remove returned inside the epoch"
        );
        g.end();
        assert_eq!(done_rx.recv_timeout(HANG).unwrap(), Ok(()));
    }
    let st = mm.interval_state();
    assert_eq!((st.indexed, st.deferred), (0, 0));
    let e = mm.remove_interval(&ha).unwrap_err();
    assert_eq!(e, Error::IntervalNotInserted { id: ha.id() });
    assert!(e.to_string().contains("is not inserted"), "{e}");
    assert_eq!(
        mm.remove_interval_deferred(&ha).unwrap_err(),
        Error::IntervalNotInserted { id: ha.id() }
    );
    assert_eq!(
        log.lock()
            .unwrap()
            .iter()
            .filter(|e| e.starts_with("b:"))
            .count(),
        0
    );
}

// --- two-pass, release, panics --------------------------------------------------------------------

/// I32: finish steps run after every interval callback was issued, before classic starts, in
/// callback order; also when a later interval refuses (then no classic start at all).
#[test]
fn two_pass_finish_order() {
    let mm = Mm::new();
    let log = new_log();
    let a = Iv::arc("a", Mode::Finish, &log);
    let b = Iv::arc("b", Mode::Done, &log);
    let c = Iv::arc("c", Mode::Finish, &log);
    mm.insert_interval(Range::from_len(0x0000, 0x1000).unwrap(), a.clone())
        .unwrap();
    mm.insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), b.clone())
        .unwrap();
    mm.insert_interval(Range::from_len(0x2000, 0x1000).unwrap(), c.clone())
        .unwrap();
    let k = Classic::arc("k", KVM, false, &log);
    mm.register(k).unwrap();
    mm.invalidate_start(range(0, 0x3000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!(
        entries(&log),
        ["a:inv", "b:inv", "c:inv", "a:finish", "c:finish", "k:start", "k:end"]
    );

    log.lock().unwrap().clear();
    *b.mode.lock().unwrap() = Mode::Finish;
    *c.mode.lock().unwrap() = Mode::RefuseNonBlocking;
    assert!(mm
        .invalidate_start_nonblock(range(0, 0x3000), Event::Unmap)
        .is_err());
    assert_eq!(
        entries(&log),
        ["a:inv", "b:inv", "c:refuse", "a:finish", "b:finish"]
    );
    assert!(idle(mm.interval_state()));
}

/// I33, I16: `Mm::release` sends intervals exactly one blockable `Release` over the whole
/// address space; classic subscribers get `release`, not a start; intervals stay inserted and
/// keep receiving invalidations.
#[test]
fn release_sends_one_release_invalidation() {
    let mm = Mm::new();
    let log = new_log();
    let iv = Iv::arc("iv", Mode::Done, &log);
    let h = mm
        .insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), iv.clone())
        .unwrap();
    let k = Classic::arc("k", KVM, false, &log);
    mm.register(k.clone()).unwrap();
    mm.release().unwrap();
    mm.release().unwrap();
    let seen = iv.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, Event::Release);
    assert_eq!(seen[0].1, Range::ALL);
    assert!(seen[0].2, "blockable");
    assert_eq!(entries(&log), ["iv:inv", "k:release"]);
    assert_eq!(k.starts.load(SeqCst), 0);
    let st = mm.interval_state();
    assert!(idle(st));
    assert_eq!(st.indexed, 1, "intervals stay inserted");

    mm.invalidate_start(range(0x1000, 0x2000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!(iv.calls(), 2);
    assert_eq!(iv.seen.lock().unwrap()[1].0, Event::Unmap);
    let seq = h.read_begin().unwrap();
    assert!(!h.read_retry(seq));
    mm.remove_interval(&h).unwrap();
}

/// I34, I25: a panicking interval callback of a blockable invalidation: the classic starts
/// still run (and are ended), the epoch closes, the panic is resumed on the caller, and the
/// `Mm` stays usable.
#[test]
fn panicking_interval_callback_closes_the_epoch() {
    let mm = Mm::new();
    let log = new_log();
    let a = Iv::arc("a", Mode::Finish, &log);
    let p = Iv::arc("p", Mode::Panic, &log);
    mm.insert_interval(Range::from_len(0x0000, 0x1000).unwrap(), a.clone())
        .unwrap();
    let hp = mm
        .insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), p.clone())
        .unwrap();
    let k = Classic::arc("k", KVM, false, &log);
    mm.register(k.clone()).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let _g = mm.invalidate_start(range(0, 0x2000), Event::Unmap);
    }));
    assert!(r.is_err(), "the panic propagates");
    // Blockable: the panic does not stop the invalidation (the classic subscriber still
    // drops its copy), then it is resumed.
    assert_eq!(
        entries(&log),
        ["a:inv", "p:panic", "a:finish", "k:start", "k:end"]
    );
    assert!(idle(mm.interval_state()), "{:?}", mm.interval_state());
    *p.mode.lock().unwrap() = Mode::Done;
    mm.invalidate_start(range(0, 0x2000), Event::Unmap)
        .unwrap()
        .end();
    assert_eq!((k.starts.load(SeqCst), k.ends.load(SeqCst)), (2, 2));
    mm.remove_interval(&hp).unwrap();
}

/// I34: a panicking interval callback of a blockable invalidation does not stop the walk: the
/// intervals after it are still invalidated, and its own fills must retry (the engine marks
/// it as `set_seq` would have). Before this rule the walk stopped at the panic and `b` kept a
/// stale mapping, with its `read_retry` reporting no collision.
#[test]
fn panicking_interval_callback_does_not_stop_a_blockable_walk() {
    let mm = Mm::new();
    let log = new_log();
    let p = Iv::arc("p", Mode::Panic, &log);
    let b = Iv::arc("b", Mode::Done, &log);
    let hp = mm
        .insert_interval(Range::from_len(0x0000, 0x1000).unwrap(), p.clone())
        .unwrap();
    let hb = mm
        .insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), b.clone())
        .unwrap();
    let seq_p = hp.read_begin().unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let _g = mm.invalidate_start(range(0, 0x2000), Event::Unmap);
    }));
    assert!(r.is_err(), "the panic propagates");
    assert_eq!(entries(&log), ["p:panic", "b:inv"]);
    assert!(
        hp.read_retry(seq_p),
        "the panicking interval's fill must retry"
    );
    assert!(idle(mm.interval_state()), "{:?}", mm.interval_state());
    mm.remove_interval(&hp).unwrap();
    mm.remove_interval(&hb).unwrap();
}

/// I26 at the wrap: starting the sequence at `u64::MAX - 5`, epochs keep working across the
/// 64-bit wrap. What happens at the wrap: the epoch opened at `u64::MAX` closes to `0`, so S
/// restarts from 0 (even, idle) and the next epochs are 1, 3, ...; "strictly greater" holds
/// modulo 2^64 only, which the protocol does not need (it compares for equality, and a tag
/// repeats only after 2^63 epochs). Parity, collision detection and idle inserts (whose tag
/// is `S - 1`, which wraps to `u64::MAX` when S is 0) keep working.
#[test]
fn sequence_wraps_around() {
    let mm = Mm::builder().initial_interval_seq(u64::MAX - 5).build();
    let log = new_log();
    let iv = Iv::arc("iv", Mode::Done, &log);
    let h = mm
        .insert_interval(Range::from_len(0x1000, 0x1000).unwrap(), iv.clone())
        .unwrap();
    assert_eq!(mm.interval_state().seq, u64::MAX - 5);
    let mut seqs = Vec::new();
    let mut late = None;
    for epoch in 0..6 {
        let before = h.read_begin().unwrap();
        let g = mm
            .invalidate_start(range(0x1000, 0x2000), Event::Clear)
            .unwrap();
        let open = mm.interval_state().seq;
        assert_eq!(open % 2, 1, "epoch {epoch}: odd while open");
        assert!(h.read_retry(before), "epoch {epoch}: collision detected");
        g.end();
        let st = mm.interval_state();
        assert!(idle(st), "epoch {epoch}: {st:?}");
        assert_eq!(st.seq, open.wrapping_add(1));
        let after = h.read_begin().unwrap();
        assert_eq!(after.value(), open);
        assert!(!h.read_retry(after));
        seqs.push(open);
        if st.seq == 0 {
            // Idle insert right at the wrap: its tag is S - 1 = u64::MAX, odd and not current.
            let hl = mm
                .insert_interval(
                    Range::from_len(0x8000, 0x1000).unwrap(),
                    Iv::arc("late", Mode::Done, &log),
                )
                .unwrap();
            let t = hl.read_begin().unwrap();
            assert_eq!(t.value(), u64::MAX);
            late = Some(hl);
        }
    }
    assert_eq!(
        seqs,
        [u64::MAX - 4, u64::MAX - 2, u64::MAX, 1, 3, 5],
        "the epoch values across the wrap"
    );
    let hl = late.expect("the sequence passed through 0");
    let t = hl.read_begin().unwrap();
    mm.invalidate_start(range(0x8000, 0x9000), Event::Clear)
        .unwrap()
        .end();
    assert!(hl.read_retry(t), "collision detected after the wrap");
}
