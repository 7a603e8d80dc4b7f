//! Model-based tests of the interval engine ("Core engine II" acceptance).
//!
//! A [`ReferenceStateMachine`] drives random interval inserts and removes, invalidations (a
//! start, then its end later and in any order, several open at once), and `read_begin` /
//! `read_retry` pairs over a small address space (`0..64`, short lengths) so that overlaps are
//! frequent. The model follows the sequence protocol of `interval/seq.rs`: the sequence `S`,
//! the active count `A`, every interval's membership and its own sequence.
//!
//! The guards live on a dedicated "invalidator" thread, which runs closures sent by the test and
//! answers synchronously, so the test thread itself holds no guard: it can call
//! `read_begin_timeout` on an interval tagged by the open epoch and watch it time out (I29),
//! and must use `remove_interval_deferred` while guards are open. The same calls made *on* the
//! invalidator thread must fail with `WouldDeadlock { cause: HoldsGuard }` (I13).
//!
//! Checked after every step: each interval got exactly one callback per overlapping range and
//! none for the others (overlap = inclusive interval vs half-open range, I23); intervals
//! inserted during an open epoch are not called until it closes and removed ones never again
//! (I27, I31); the engine's `S`, `A`, index size and deferred queue equal the model's (I26,
//! I27); `read_retry` is true exactly when a callback ran after `read_begin` (I30).

#![allow(
    clippy::disallowed_types,
    reason = "test code: std::sync is fine outside the engine (see clippy.toml)"
)]

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mmnotify::{
    BlockingOp, DeadlockCause, Error, Event, IntervalCtx, IntervalHandle, IntervalSubscriber,
    Invalidate, InvalidateGuard, Invalidation, Mm, Range, ReadSeq,
};
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::Config;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};

/// The size of the address space the generator uses.
const SPACE: u64 = 64;
/// The hang detector for the invalidator thread's answers.
const HANG: Duration = Duration::from_secs(30);
/// The deadline of a `read_begin_timeout` the model says returns at once (a hang detector that
/// keeps a wrong prediction from stalling the shrinker).
const NO_WAIT: Duration = Duration::from_secs(2);

// --- interval subscribers --------------------------------------------------------------------

/// What an interval subscriber saw, recorded by itself.
#[derive(Debug, Default)]
struct Seen {
    /// The ranges of its `invalidate` calls, in order.
    ranges: Vec<(u64, u64)>,
    finishes: u64,
    /// The `cur_seq` of the last call.
    last_seq: Option<u64>,
    /// Calls for a range that does not overlap the interval.
    strays: u64,
}

/// An interval subscriber that records its calls; `two_pass` ones answer `Finish`.
#[derive(Debug)]
struct Iv {
    start: u64,
    last: u64,
    two_pass: bool,
    seen: Mutex<Seen>,
}

impl Iv {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl IntervalSubscriber for Iv {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, inv: &Invalidation) -> Invalidate {
        let mut seen = self.seen();
        ctx.set_seq();
        let r = inv.range();
        if !r.overlaps_inclusive(self.start, self.last)
            || (ctx.range().start(), ctx.range().last()) != (self.start, self.last)
        {
            seen.strays += 1;
        }
        seen.ranges.push((r.start(), r.end()));
        seen.last_seq = Some(ctx.cur_seq());
        if self.two_pass {
            Invalidate::Finish
        } else {
            Invalidate::Done
        }
    }

    fn invalidate_finish(&self, _: &IntervalCtx<'_>, _: &Invalidation) {
        self.seen().finishes += 1;
    }
}

// --- the model -------------------------------------------------------------------------------

/// An interval's membership, as in `interval/mod.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mem {
    InTree,
    PendingInsert,
    PendingRemove,
    Removed,
}

#[derive(Clone, Debug)]
struct IvModel {
    start: u64,
    last: u64,
    two_pass: bool,
    mem: Mem,
    /// The interval's own sequence `s_i`.
    seq: u64,
    /// The ranges it was invalidated with, in order.
    ranges: Vec<(u64, u64)>,
    /// The last `read_begin`: the sequence it returned and the number of calls at the time.
    read: Option<(u64, usize)>,
}

/// The predicted outcome of the last transition.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    Nothing,
    Ok,
    /// `IntervalNotInserted` for this interval.
    NotInserted(usize),
    WouldDeadlock(BlockingOp),
    /// `read_begin` returns this sequence.
    Seq(u64),
    /// `read_begin_timeout` times out.
    Timeout,
    /// `read_retry` answers this.
    Retry(bool),
}

#[derive(Clone, Debug)]
struct Model {
    /// The address space's sequence `S`.
    seq: u64,
    /// Invalidations in flight, `A` (every guard is open on the invalidator thread).
    guards: Vec<(u64, u64)>,
    ivs: Vec<IvModel>,
    expect: Expect,
}

#[derive(Clone, Debug)]
enum Transition {
    Insert {
        start: u64,
        len: u64,
        two_pass: bool,
    },
    /// From the test thread: `remove_interval` when no guard is open, else the deferred one.
    Remove(usize),
    /// `remove_interval` from the thread holding the guards.
    RemoveOnInvalidator(usize),
    Start {
        range: (u64, u64),
        nonblock: bool,
    },
    End(usize),
    /// From the test thread (times out when the open epoch tagged the interval).
    ReadBegin(usize),
    /// From the thread holding the guards.
    ReadBeginOnInvalidator(usize),
    ReadRetry(usize),
}

impl Model {
    fn epoch_open(&self) -> bool {
        self.seq % 2 == 1
    }

    fn active(&self) -> usize {
        self.guards.len()
    }

    /// `read_begin` would wait: the interval was tagged by the epoch still open (I28, I29).
    /// Whether `read_begin` would wait: the open epoch tagged the interval (a removed interval
    /// is reported as such before any wait).
    fn tagged(&self, iv: usize) -> bool {
        self.ivs[iv].mem != Mem::Removed && self.ivs[iv].seq == self.seq
    }

    /// `remove_deferred`'s effect (I27, I31).
    fn remove(&mut self, iv: usize) -> Expect {
        let open = self.epoch_open();
        let node = &mut self.ivs[iv];
        match node.mem {
            Mem::Removed => return Expect::NotInserted(iv),
            Mem::PendingRemove => {}
            Mem::PendingInsert => node.mem = Mem::Removed,
            Mem::InTree if open => node.mem = Mem::PendingRemove,
            Mem::InTree => node.mem = Mem::Removed,
        }
        Expect::Ok
    }

    fn read_begin(&mut self, iv: usize) -> Expect {
        let node = &mut self.ivs[iv];
        if node.mem == Mem::Removed {
            // I31: a removed interval has nothing left to read.
            return Expect::NotInserted(iv);
        }
        node.read = Some((node.seq, node.ranges.len()));
        Expect::Seq(node.seq)
    }
}

/// An interval to insert: start, length, two-pass.
fn interval() -> impl Strategy<Value = (u64, u64, bool)> {
    (0..SPACE, 1u64..9, prop::bool::weighted(0.25))
}

/// Whether the half-open range overlaps the inclusive interval (I23).
fn overlaps(range: (u64, u64), start: u64, last: u64) -> bool {
    range.0 <= last && start < range.1
}

/// The reference state machine.
#[derive(Debug)]
struct IntervalModel;

impl ReferenceStateMachine for IntervalModel {
    type State = Model;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<Model> {
        // A few intervals inserted before the first step, so that early ranges hit something.
        prop::collection::vec(interval(), 0..6)
            .prop_map(|ivs| Model {
                seq: 2,
                guards: Vec::new(),
                ivs: ivs
                    .into_iter()
                    .map(|(start, len, two_pass)| IvModel {
                        start,
                        last: start + len - 1,
                        two_pass,
                        mem: Mem::InTree,
                        // Inserted while idle: tagged from the past, `S - 1`.
                        seq: 1,
                        ranges: Vec::new(),
                        read: None,
                    })
                    .collect(),
                expect: Expect::Nothing,
            })
            .boxed()
    }

    fn transitions(s: &Model) -> BoxedStrategy<Transition> {
        let n = s.ivs.len();
        let g = s.guards.len();
        let starts = match g {
            0 => 6,
            1 | 2 => 4,
            _ => 2,
        };
        let mut choices: Vec<(u32, BoxedStrategy<Transition>)> = vec![
            (
                5,
                interval()
                    .prop_map(|(start, len, two_pass)| Transition::Insert {
                        start,
                        len,
                        two_pass,
                    })
                    .boxed(),
            ),
            (
                starts,
                (0..SPACE, 1u64..13, any::<bool>())
                    .prop_map(|(start, len, nonblock)| Transition::Start {
                        range: (start, start + len),
                        nonblock,
                    })
                    .boxed(),
            ),
        ];
        if n > 0 {
            choices.push((3, (0..n).prop_map(Transition::Remove).boxed()));
            choices.push((1, (0..n).prop_map(Transition::RemoveOnInvalidator).boxed()));
            choices.push((5, (0..n).prop_map(Transition::ReadBegin).boxed()));
            choices.push((
                1,
                (0..n).prop_map(Transition::ReadBeginOnInvalidator).boxed(),
            ));
        }
        let reads: Vec<usize> = (0..n).filter(|&i| s.ivs[i].read.is_some()).collect();
        if !reads.is_empty() {
            choices.push((
                5,
                prop::sample::select(reads)
                    .prop_map(Transition::ReadRetry)
                    .boxed(),
            ));
        }
        if g > 0 {
            choices.push((7, (0..g).prop_map(Transition::End).boxed()));
        }
        Union::new_weighted(choices).boxed()
    }

    fn preconditions(s: &Model, t: &Transition) -> bool {
        match *t {
            Transition::Remove(i)
            | Transition::RemoveOnInvalidator(i)
            | Transition::ReadBegin(i)
            | Transition::ReadBeginOnInvalidator(i) => i < s.ivs.len(),
            Transition::ReadRetry(i) => i < s.ivs.len() && s.ivs[i].read.is_some(),
            Transition::End(g) => g < s.guards.len(),
            Transition::Insert { .. } | Transition::Start { .. } => true,
        }
    }

    fn apply(mut s: Model, t: &Transition) -> Model {
        s.expect = match *t {
            // I27, I28: during an epoch the insert is deferred and tagged with the epoch; with
            // ranges in flight but no epoch it opens one; idle, it is tagged from the past.
            Transition::Insert {
                start,
                len,
                two_pass,
            } => {
                let (mem, seq) = if s.active() > 0 {
                    if s.epoch_open() {
                        (Mem::PendingInsert, s.seq)
                    } else {
                        s.seq |= 1;
                        (Mem::InTree, s.seq)
                    }
                } else {
                    (Mem::InTree, s.seq - 1)
                };
                s.ivs.push(IvModel {
                    start,
                    last: start + len - 1,
                    two_pass,
                    mem,
                    seq,
                    ranges: Vec::new(),
                    read: None,
                });
                Expect::Ok
            }
            // I31.
            Transition::Remove(i) => s.remove(i),
            // I13: remove_interval checks the calling thread before anything else.
            Transition::RemoveOnInvalidator(i) => {
                if s.active() > 0 {
                    Expect::WouldDeadlock(BlockingOp::Remove)
                } else {
                    s.remove(i)
                }
            }
            // I23, I26: every indexed interval overlapping the range is called once, with the
            // (possibly new) epoch value.
            Transition::Start { range, .. } => {
                s.guards.push(range);
                let hits: Vec<usize> = (0..s.ivs.len())
                    .filter(|&i| {
                        let v = &s.ivs[i];
                        matches!(v.mem, Mem::InTree | Mem::PendingRemove)
                            && overlaps(range, v.start, v.last)
                    })
                    .collect();
                if !hits.is_empty() {
                    s.seq |= 1;
                }
                for i in hits {
                    s.ivs[i].seq = s.seq;
                    s.ivs[i].ranges.push(range);
                }
                Expect::Ok
            }
            // I26, I27: the last end closes the epoch, then applies the deferred changes.
            Transition::End(g) => {
                s.guards.remove(g);
                if s.active() == 0 && s.epoch_open() {
                    s.seq += 1;
                    for v in &mut s.ivs {
                        v.mem = match v.mem {
                            Mem::PendingInsert => Mem::InTree,
                            Mem::PendingRemove => Mem::Removed,
                            m => m,
                        };
                    }
                }
                Expect::Nothing
            }
            // I29.
            Transition::ReadBegin(i) => {
                if s.tagged(i) {
                    Expect::Timeout
                } else {
                    s.read_begin(i)
                }
            }
            // I13: only the wait is refused; the fast path needs no check.
            Transition::ReadBeginOnInvalidator(i) => {
                if s.tagged(i) {
                    Expect::WouldDeadlock(BlockingOp::ReadBegin)
                } else {
                    s.read_begin(i)
                }
            }
            // I30.
            Transition::ReadRetry(i) => {
                let v = &s.ivs[i];
                let (_, calls) = v.read.expect("precondition: a read is pending");
                Expect::Retry(v.ranges.len() > calls)
            }
        };
        s
    }
}

// --- the system under test -------------------------------------------------------------------

/// A closure run on the invalidator thread, with its guards.
type Job = Box<dyn for<'a> FnOnce(&'a Mm, &mut Vec<InvalidateGuard<'a>>) + Send>;

/// The thread that holds every open guard.
struct Invalidator {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Invalidator {
    fn spawn(mm: Mm) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread = thread::spawn(move || {
            let mm = mm;
            let mut guards: Vec<InvalidateGuard<'_>> = Vec::new();
            for job in rx {
                job(&mm, &mut guards);
            }
            drop(guards);
        });
        Invalidator {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    /// Runs `f` on the invalidator thread and returns its result.
    fn run<R: Send + 'static>(
        &self,
        f: impl for<'a> FnOnce(&'a Mm, &mut Vec<InvalidateGuard<'a>>) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .expect("running")
            .send(Box::new(move |mm, guards| {
                let _ = tx.send(f(mm, guards));
            }))
            .expect("the invalidator thread is alive");
        rx.recv_timeout(HANG)
            .expect("the invalidator thread answers (hang detector)")
    }
}

impl Drop for Invalidator {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which ends its guards.
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct IvSut {
    handle: IntervalHandle,
    sub: Arc<Iv>,
    read: Option<ReadSeq>,
}

struct Sut {
    mm: Mm,
    ivs: Vec<IvSut>,
    invalidator: Invalidator,
}

/// The test driver.
#[derive(Debug)]
struct IntervalTest;

fn check_unit(sut: &Sut, expect: &Expect, got: Result<(), Error>, what: &str) {
    let want = match *expect {
        Expect::Ok => Ok(()),
        Expect::NotInserted(i) => Err(Error::IntervalNotInserted {
            id: sut.ivs[i].handle.id(),
        }),
        Expect::WouldDeadlock(op) => Err(Error::WouldDeadlock {
            op,
            cause: DeadlockCause::HoldsGuard,
        }),
        ref other => panic!("{what}: unexpected prediction {other:?}"),
    };
    assert_eq!(got, want, "{what}");
}

fn check_read(sut: &mut Sut, i: usize, expect: &Expect, got: Result<ReadSeq, Error>, what: &str) {
    match *expect {
        Expect::Seq(seq) => {
            let read = got.unwrap_or_else(|e| panic!("{what}: expected a sequence, got {e}"));
            assert_eq!(read.value(), seq, "{what}: read_begin's sequence");
            assert_eq!(
                read.value() % 2,
                1,
                "{what}: interval sequences are odd (I26)"
            );
            sut.ivs[i].read = Some(read);
        }
        Expect::NotInserted(iv) => match got {
            Err(Error::IntervalNotInserted { id }) => assert_eq!(id, sut.ivs[iv].handle.id()),
            other => panic!("{what}: expected IntervalNotInserted, got {other:?}"),
        },
        Expect::Timeout => match got {
            Err(Error::ReadBeginTimeout { id, .. }) => assert_eq!(id, sut.ivs[i].handle.id()),
            other => panic!("{what}: expected ReadBeginTimeout, got {other:?}"),
        },
        Expect::WouldDeadlock(op) => assert_eq!(
            got,
            Err(Error::WouldDeadlock {
                op,
                cause: DeadlockCause::HoldsGuard
            }),
            "{what}"
        ),
        ref other => panic!("{what}: unexpected prediction {other:?}"),
    }
}

impl StateMachineTest for IntervalTest {
    type SystemUnderTest = Sut;
    type Reference = IntervalModel;

    fn init_test(s: &Model) -> Sut {
        let mm = Mm::new();
        // Make the interval state present (the first insert waits for invalidations in
        // flight, which would deadlock against the invalidator), and leave it empty.
        let dummy = Arc::new(Iv {
            start: SPACE * 2,
            last: SPACE * 2,
            two_pass: false,
            seen: Mutex::default(),
        });
        let handle = mm
            .insert_interval(Range::from_len(SPACE * 2, 1).unwrap(), dummy)
            .expect("first insert");
        mm.remove_interval(&handle).expect("remove the dummy");
        let ivs = s
            .ivs
            .iter()
            .map(|m| {
                let sub = Arc::new(Iv {
                    start: m.start,
                    last: m.last,
                    two_pass: m.two_pass,
                    seen: Mutex::default(),
                });
                let handle = mm
                    .insert_interval(
                        Range::from_len(m.start, m.last - m.start + 1).unwrap(),
                        sub.clone(),
                    )
                    .expect("insert while idle");
                IvSut {
                    handle,
                    sub,
                    read: None,
                }
            })
            .collect();
        let invalidator = Invalidator::spawn(mm.clone());
        Sut {
            mm,
            ivs,
            invalidator,
        }
    }

    fn apply(mut sut: Sut, s: &Model, t: Transition) -> Sut {
        let what = format!("{t:?}");
        let guards_open = !s.guards.is_empty();
        match t {
            Transition::Insert {
                start,
                len,
                two_pass,
            } => {
                let sub = Arc::new(Iv {
                    start,
                    last: start + len - 1,
                    two_pass,
                    seen: Mutex::default(),
                });
                let handle = sut
                    .mm
                    .insert_interval(Range::from_len(start, len).unwrap(), sub.clone())
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(handle.range(), Range::from_len(start, len).unwrap());
                sut.ivs.push(IvSut {
                    handle,
                    sub,
                    read: None,
                });
            }
            Transition::Remove(i) => {
                let handle = &sut.ivs[i].handle;
                // The model's guard list is after this step; a remove changes no guard.
                let got = if guards_open {
                    sut.mm.remove_interval_deferred(handle)
                } else {
                    sut.mm.remove_interval(handle)
                };
                check_unit(&sut, &s.expect, got, &what);
            }
            Transition::RemoveOnInvalidator(i) => {
                let handle = sut.ivs[i].handle.clone();
                let got = sut
                    .invalidator
                    .run(move |mm, _| mm.remove_interval(&handle));
                check_unit(&sut, &s.expect, got, &what);
            }
            Transition::Start { range, nonblock } => {
                let range = Range::new(range.0, range.1).expect("valid range");
                let got = sut.invalidator.run(move |mm, guards| {
                    let guard = if nonblock {
                        mm.invalidate_start_nonblock(range, Event::Unmap)
                    } else {
                        mm.invalidate_start(range, Event::Clear)
                    }?;
                    guards.push(guard);
                    Ok::<(), Error>(())
                });
                assert_eq!(got, Ok(()), "{what}: no interval refuses");
            }
            Transition::End(g) => sut.invalidator.run(move |_, guards| guards.remove(g).end()),
            Transition::ReadBegin(i) => {
                let handle = &sut.ivs[i].handle;
                let got = if guards_open {
                    let deadline = if s.expect == Expect::Timeout {
                        Instant::now() + Duration::from_millis(1)
                    } else {
                        Instant::now() + NO_WAIT
                    };
                    handle.read_begin_until(deadline)
                } else {
                    handle.read_begin()
                };
                check_read(&mut sut, i, &s.expect, got, &what);
            }
            Transition::ReadBeginOnInvalidator(i) => {
                let handle = sut.ivs[i].handle.clone();
                let got = sut.invalidator.run(move |_, _| handle.read_begin());
                check_read(&mut sut, i, &s.expect, got, &what);
            }
            Transition::ReadRetry(i) => {
                let v = &sut.ivs[i];
                let read = v.read.expect("a read_begin preceded");
                let want = Expect::Retry(v.handle.read_retry(read));
                assert_eq!(want, s.expect, "{what}: read_retry (I30)");
                assert_eq!(
                    v.handle.check_retry(read),
                    v.handle.read_retry(read),
                    "{what}: check_retry agrees single-threaded"
                );
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut, s: &Model) {
        assert_eq!(sut.ivs.len(), s.ivs.len());
        for (i, (v, m)) in sut.ivs.iter().zip(&s.ivs).enumerate() {
            let seen = v.sub.seen();
            assert_eq!(
                seen.strays, 0,
                "interval {i}: a call for a non-overlapping range"
            );
            assert_eq!(
                seen.ranges, m.ranges,
                "interval {i} [{}, {}] ({:?}): one call per overlapping range while indexed (I23, I27, I31)",
                m.start, m.last, m.mem
            );
            let finishes = if m.two_pass { m.ranges.len() as u64 } else { 0 };
            assert_eq!(seen.finishes, finishes, "interval {i}: finish steps");
            if !m.ranges.is_empty() {
                assert_eq!(
                    seen.last_seq,
                    Some(m.seq),
                    "interval {i}: cur_seq of its last call"
                );
            }
        }
        let st = sut.mm.interval_state();
        let count = |f: &dyn Fn(Mem) -> bool| s.ivs.iter().filter(|v| f(v.mem)).count();
        assert_eq!(st.seq, s.seq, "S (I26)");
        assert_eq!(st.active, s.active(), "A");
        assert!(
            st.active > 0 || st.seq % 2 == 0,
            "S is even when idle (I26)"
        );
        assert_eq!(
            st.indexed,
            count(&|m| matches!(m, Mem::InTree | Mem::PendingRemove)),
            "indexed intervals (I27)"
        );
        assert_eq!(
            st.deferred,
            count(&|m| matches!(m, Mem::PendingInsert | Mem::PendingRemove)),
            "deferred queue (I27)"
        );
    }
}

prop_state_machine! {
    #![proptest_config(Config {
        cases: 64,
        failure_persistence: None,
        .. Config::default()
    })]

    /// I23, I26, I27, I29, I30, I31 (and I13 for the guard-holding thread): the interval
    /// engine follows the model of the sequence protocol step by step.
    #[test]
    fn interval_engine_matches_model(sequential 1..40 => IntervalTest);
}
