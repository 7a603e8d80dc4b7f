//! Model-based tests of the classic-subscriber engine ("Core engine I" acceptance).
//!
//! A [`ReferenceStateMachine`] drives random sequences of `register`, `get_or_register`,
//! `unregister`, `put`, blockable and non-blocking invalidation starts (with per-subscriber
//! refusals chosen by the transition), out-of-order ends of the open guards, `synchronize` and
//! `release` against a plain model, once per policy (P1 `Exact`, P2 `Kernel`, P3 `Legacy`).
//! After every step each subscriber's own record of starts, refusals, ends, releases and frees
//! must equal the model's, and so must the engine's counters (I21). Every call's result,
//! including each typed error, must be the one the model predicts.
//!
//! The guards are held by the test thread itself, so every blocking call made while one is open
//! must fail with `WouldDeadlock { cause: HoldsGuard }` (I13) instead of hanging.
//!
//! An optional interval "canary" covering the whole address space checks the active-range count
//! of the interval protocol: closed on every path under `Exact` (I25), leaked by a refused
//! classic start under `Kernel` and `Legacy` (P2, P3).

#![allow(
    clippy::disallowed_types,
    reason = "test code: std::sync is fine outside the engine (see clippy.toml)"
)]

use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mmnotify::{
    BlockingOp, Capabilities, DeadlockCause, Error, Event, IntervalCtx, IntervalHandle,
    IntervalSubscriber, Invalidate, InvalidateGuard, Invalidation, Mm, Policy, Range, Refused,
    Refuser, Subscriber, SubscriberId,
};
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::Config;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};

const PAGE: u64 = 0x1000;
/// Number of distinct `get_or_register` types.
const KEYS: usize = 2;

// --- subscribers -----------------------------------------------------------------------------

/// What one subscriber object saw, recorded by the subscriber itself.
#[derive(Debug, Default)]
struct Counts {
    /// Successful starts.
    starts: u64,
    /// Refused starts.
    refusals: u64,
    ends: u64,
    releases: u64,
    frees: u64,
    /// Ranges started and not ended yet (only for subscribers with start and end).
    outstanding: Vec<Range>,
    /// Ends that matched no outstanding start of the same range.
    unmatched_ends: u64,
}

/// The shared recorder behind a test subscriber; `refuse_next` is set by the test before a
/// start, as the transition decided.
#[derive(Debug)]
struct Recorder {
    caps: Capabilities,
    refuse_next: AtomicBool,
    counts: Mutex<Counts>,
}

impl Recorder {
    fn new(caps: Capabilities) -> Arc<Self> {
        Arc::new(Recorder {
            caps,
            refuse_next: AtomicBool::new(false),
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Not poisoned by a failed assertion: the guards still end during the unwind.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A classic subscriber; `K` gives `get_or_register` distinct types (keys).
#[derive(Debug)]
struct Sub<const K: u8>(Arc<Recorder>);

impl<const K: u8> Subscriber for Sub<K> {
    fn capabilities(&self) -> Capabilities {
        self.0.caps
    }

    fn invalidate_range_start(&self, inv: &Invalidation) -> Result<(), Refused> {
        let mut c = self.0.counts();
        if self.0.refuse_next.load(Ordering::SeqCst) {
            c.refusals += 1;
            return Err(Refused);
        }
        c.starts += 1;
        if self.0.caps.has_end() {
            c.outstanding.push(inv.range());
        }
        Ok(())
    }

    fn invalidate_range_end(&self, inv: &Invalidation) {
        let mut c = self.0.counts();
        c.ends += 1;
        if self.0.caps.has_start() {
            match c.outstanding.iter().position(|r| *r == inv.range()) {
                Some(i) => {
                    c.outstanding.swap_remove(i);
                }
                None => c.unmatched_ends += 1,
            }
        }
    }

    fn release(&self) {
        self.0.counts().releases += 1;
    }

    fn free(&self) {
        self.0.counts().frees += 1;
    }
}

/// An interval subscriber over the whole address space that only counts its calls.
#[derive(Debug, Default)]
struct Canary(AtomicU64);

impl IntervalSubscriber for Canary {
    fn invalidate(&self, ctx: &IntervalCtx<'_>, _: &Invalidation) -> Invalidate {
        ctx.set_seq();
        self.0.fetch_add(1, Ordering::SeqCst);
        Invalidate::Done
    }
}

/// The capability sets the generator picks from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Start and end, may refuse (allowed under Exact; Kernel reports it when it refuses).
    StartEndRefuse,
    /// Start, may refuse, no end (Linux's convention for refusers).
    StartRefuse,
    /// Start and end, never declared may_refuse (a refusal is a violation, I6).
    StartEnd,
    /// Start only.
    StartOnly,
    /// End only: ended after every successful invalidation (I4).
    EndOnly,
    /// Neither: only release and free.
    Bare,
}

impl Kind {
    fn caps(self) -> Capabilities {
        let c = Capabilities::new();
        match self {
            Kind::StartEndRefuse => c.with_start().with_end().may_refuse(),
            Kind::StartRefuse => c.with_start().may_refuse(),
            Kind::StartEnd => c.with_start().with_end(),
            Kind::StartOnly => c.with_start(),
            Kind::EndOnly => c.with_end(),
            Kind::Bare => c,
        }
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::StartEndRefuse),
        2 => Just(Kind::StartRefuse),
        2 => Just(Kind::StartEnd),
        1 => Just(Kind::StartOnly),
        1 => Just(Kind::EndOnly),
        1 => Just(Kind::Bare),
    ]
}

// --- the model -------------------------------------------------------------------------------

/// One registration as the model sees it.
#[derive(Clone, Debug)]
struct SlotModel {
    caps: Capabilities,
    /// The `get_or_register` key, `None` for `register`.
    key: Option<usize>,
    linked: bool,
    /// A plain registration that `release` unlinked: one more `unregister` succeeds (I16).
    exited: bool,
    starts: u64,
    refusals: u64,
    ends: u64,
    releases: u64,
    violations: u64,
}

/// One open guard as the model sees it.
#[derive(Clone, Debug)]
struct GuardModel {
    range: (u64, u64),
    /// The subscriber snapshot taken at the start, in call order.
    snapshot: Vec<usize>,
    /// The slots owed an end (those without an end capability are skipped at delivery).
    owed: Vec<usize>,
    /// Whether the guard holds a unit of the interval active count.
    epoch: bool,
}

/// Who an expected `NotRegistered` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Slot(usize),
    /// An id registered on another `Mm`.
    Foreign,
}

/// The outcome the model predicts for the last transition.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    Nothing,
    Ok,
    /// Ok with this slot's id.
    Slot(usize),
    NotRegistered(Target),
    NotShared(usize),
    SharedUsePut(usize),
    Released,
    WouldDeadlock(BlockingOp),
    /// `StartRefused` naming these slots, in call order.
    Refused(Vec<usize>),
}

#[derive(Clone, Debug)]
struct Model {
    policy: Policy,
    canary: bool,
    released: bool,
    slots: Vec<SlotModel>,
    /// Linked slots in call order (registration order under Exact, newest first under the
    /// Linux policies): the current snapshot.
    order: Vec<usize>,
    /// `get_or_register` key → (slot, use count).
    shared: [Option<(usize, u64)>; KEYS],
    guards: Vec<GuardModel>,
    /// Interval active-range count (only with the canary).
    active: u64,
    canary_calls: u64,
    expect: Expect,
}

#[derive(Clone, Debug)]
enum Transition {
    Register(Kind),
    GetOrRegister(usize, Kind),
    Unregister(usize),
    UnregisterForeign,
    Put(usize),
    /// A start of `[range.0, range.1)`; `refuse` is a bitmask over slots whose start refuses.
    Start {
        range: (u64, u64),
        blockable: bool,
        refuse: u64,
    },
    /// Ends the open guard at this index (any order).
    End(usize),
    Release,
    Synchronize,
}

impl Model {
    fn holds_guard(&self) -> bool {
        !self.guards.is_empty()
    }

    fn new_slot(&mut self, kind: Kind, key: Option<usize>) -> usize {
        self.slots.push(SlotModel {
            caps: kind.caps(),
            key,
            linked: true,
            exited: false,
            starts: 0,
            refusals: 0,
            ends: 0,
            releases: 0,
            violations: 0,
        });
        let slot = self.slots.len() - 1;
        // I3: Linux's list is built with hlist_add_head_rcu (newest first); Exact calls in
        // registration order.
        if self.policy == Policy::Exact {
            self.order.push(slot);
        } else {
            self.order.insert(0, slot);
        }
        slot
    }

    /// The key of the shared use count that `slot` still holds, if any.
    fn shared_uses(&self, slot: usize) -> Option<usize> {
        let key = self.slots[slot].key?;
        matches!(self.shared[key], Some((owner, _)) if owner == slot).then_some(key)
    }

    fn unlink(&mut self, slot: usize) {
        self.slots[slot].linked = false;
        self.order.retain(|&s| s != slot);
    }

    /// Whether the engine dropped its last reference to the slot's registration: unlinked and
    /// in no open guard's snapshot (I14).
    fn freed(&self, slot: usize) -> bool {
        !self.slots[slot].linked && !self.guards.iter().any(|g| g.snapshot.contains(&slot))
    }

    fn deliver_ends(&mut self, snapshot: &[usize], owed: &[usize]) {
        for &s in snapshot {
            if owed.contains(&s) && self.slots[s].caps.has_end() {
                self.slots[s].ends += 1;
            }
        }
    }

    /// An invalidation start: interval phase (the canary), then the classic phase with the
    /// policy's answer to refusals (I3, I4, I5, I6, P1-P3).
    fn start(&mut self, range: (u64, u64), blockable: bool, refuse: u64) -> Expect {
        let policy = self.policy;
        let epoch = self.canary;
        if self.canary {
            self.active += 1;
            self.canary_calls += 1;
        }
        let snapshot = self.order.clone();
        let mut owed: Vec<usize> = Vec::new();
        let mut refusers: Vec<usize> = Vec::new();
        let mut end_now_and_later = false;
        for &s in &snapshot {
            let caps = self.slots[s].caps;
            if !caps.has_start() {
                owed.push(s);
                continue;
            }
            let refuses = s < 64 && refuse & (1 << s) != 0;
            if !refuses {
                self.slots[s].starts += 1;
                owed.push(s);
                continue;
            }
            self.slots[s].refusals += 1;
            if !caps.can_refuse() {
                self.slots[s].violations += 1;
            }
            // Linux >= 5.12 warns whenever a subscriber with an end refuses, blockable or not.
            if policy == Policy::Kernel && caps.has_end() {
                self.slots[s].violations += 1;
            }
            if blockable {
                self.slots[s].violations += 1;
                match policy {
                    Policy::Exact => {}
                    Policy::Kernel => end_now_and_later = true,
                    Policy::Legacy => owed.push(s),
                    _ => unreachable!("a new policy: extend the model"),
                }
                continue;
            }
            refusers.push(s);
            if policy == Policy::Exact {
                break;
            }
        }
        if end_now_and_later {
            let all_with_end: Vec<usize> = snapshot
                .iter()
                .copied()
                .filter(|&s| self.slots[s].caps.has_end())
                .collect();
            self.deliver_ends(&snapshot, &all_with_end);
            owed = all_with_end;
        }
        if refusers.is_empty() {
            self.guards.push(GuardModel {
                range,
                snapshot,
                owed,
                epoch,
            });
            return Expect::Ok;
        }
        let ended: Vec<usize> = snapshot
            .iter()
            .copied()
            .filter(|&s| {
                let caps = self.slots[s].caps;
                match policy {
                    Policy::Exact => owed.contains(&s) && caps.has_end(),
                    Policy::Kernel => caps.has_end(),
                    _ => false,
                }
            })
            .collect();
        self.deliver_ends(&snapshot, &ended);
        if epoch && policy == Policy::Exact {
            self.active -= 1;
        }
        Expect::Refused(refusers)
    }

    fn end(&mut self, index: usize) {
        let guard = self.guards.remove(index);
        if guard.epoch {
            self.active -= 1;
        }
        self.deliver_ends(&guard.snapshot, &guard.owed);
    }
}

/// The policy a test instance runs under.
trait PolicyKind: 'static + Debug + Clone {
    const POLICY: Policy;
}

#[derive(Clone, Debug)]
struct ExactP;
impl PolicyKind for ExactP {
    const POLICY: Policy = Policy::Exact;
}

#[derive(Clone, Debug)]
struct KernelP;
impl PolicyKind for KernelP {
    const POLICY: Policy = Policy::Kernel;
}

#[derive(Clone, Debug)]
struct LegacyP;
impl PolicyKind for LegacyP {
    const POLICY: Policy = Policy::Legacy;
}

/// The reference state machine, per policy.
#[derive(Debug)]
struct CoreModel<P>(PhantomData<P>);

impl<P: PolicyKind> ReferenceStateMachine for CoreModel<P> {
    type State = Model;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<Model> {
        // Some subscribers registered before the first step, so that refusals meet company.
        (any::<bool>(), prop::collection::vec(kind(), 0..5))
            .prop_map(|(canary, kinds)| {
                let mut model = Model {
                    policy: P::POLICY,
                    canary,
                    released: false,
                    slots: Vec::new(),
                    order: Vec::new(),
                    shared: [None; KEYS],
                    guards: Vec::new(),
                    active: 0,
                    canary_calls: 0,
                    expect: Expect::Nothing,
                };
                for kind in kinds {
                    model.new_slot(kind, None);
                }
                model
            })
            .boxed()
    }

    fn transitions(s: &Model) -> BoxedStrategy<Transition> {
        let n = s.slots.len();
        let g = s.guards.len();
        let range = || (0u64..16, 1u64..4).prop_map(|(p, l)| (p * PAGE, (p + l) * PAGE));
        let mask = move || -> BoxedStrategy<u64> {
            if n == 0 {
                Just(0).boxed()
            } else {
                prop::collection::vec(0..n.min(64), 0..3)
                    .prop_map(|v| v.into_iter().fold(0u64, |m, i| m | 1 << i))
                    .boxed()
            }
        };
        // Registrations mostly when they can succeed; few guards open at once.
        let (reg, starts) = match g {
            0 => (8, 6),
            1 | 2 => (1, 4),
            _ => (1, 1),
        };
        let mut choices: Vec<(u32, BoxedStrategy<Transition>)> = vec![
            (reg * 2, kind().prop_map(Transition::Register).boxed()),
            (
                reg,
                (0..KEYS, kind())
                    .prop_map(|(k, kind)| Transition::GetOrRegister(k, kind))
                    .boxed(),
            ),
            (1, Just(Transition::UnregisterForeign).boxed()),
            (1, Just(Transition::Release).boxed()),
            (1, Just(Transition::Synchronize).boxed()),
            (
                starts,
                (range(), prop_oneof![4 => Just(0u64).boxed(), 1 => mask()])
                    .prop_map(|(range, refuse)| Transition::Start {
                        range,
                        blockable: true,
                        refuse,
                    })
                    .boxed(),
            ),
            (
                starts * 2,
                (range(), mask())
                    .prop_map(|(range, refuse)| Transition::Start {
                        range,
                        blockable: false,
                        refuse,
                    })
                    .boxed(),
            ),
        ];
        if n > 0 {
            choices.push((3, (0..n).prop_map(Transition::Unregister).boxed()));
            choices.push((3, (0..n).prop_map(Transition::Put).boxed()));
        }
        if g > 0 {
            choices.push((10, (0..g).prop_map(Transition::End).boxed()));
        }
        Union::new_weighted(choices).boxed()
    }

    fn preconditions(s: &Model, t: &Transition) -> bool {
        match *t {
            Transition::Unregister(slot) | Transition::Put(slot) => slot < s.slots.len(),
            Transition::End(g) => g < s.guards.len(),
            _ => true,
        }
    }

    fn apply(mut s: Model, t: &Transition) -> Model {
        let holds = s.holds_guard();
        let wd = Expect::WouldDeadlock;
        s.expect = match *t {
            // I11, I13.
            Transition::Register(kind) => {
                if holds {
                    wd(BlockingOp::Register)
                } else if s.released {
                    Expect::Released
                } else {
                    Expect::Slot(s.new_slot(kind, None))
                }
            }
            // I14: one subscriber per type, with a use count.
            Transition::GetOrRegister(key, kind) => {
                if holds {
                    wd(BlockingOp::GetOrRegister)
                } else if s.released {
                    Expect::Released
                } else if let Some((slot, uses)) = &mut s.shared[key] {
                    *uses += 1;
                    Expect::Slot(*slot)
                } else {
                    let slot = s.new_slot(kind, Some(key));
                    s.shared[key] = Some((slot, 1));
                    Expect::Slot(slot)
                }
            }
            // I11, I12, I13, I14.
            Transition::Unregister(slot) => {
                if holds {
                    wd(BlockingOp::Unregister)
                } else if !s.slots[slot].linked {
                    if std::mem::take(&mut s.slots[slot].exited) {
                        Expect::Ok
                    } else if s.shared_uses(slot).is_some() {
                        Expect::SharedUsePut(slot)
                    } else {
                        Expect::NotRegistered(Target::Slot(slot))
                    }
                } else if s.slots[slot].key.is_some() {
                    Expect::SharedUsePut(slot)
                } else {
                    s.slots[slot].releases += 1;
                    s.unlink(slot);
                    Expect::Ok
                }
            }
            Transition::UnregisterForeign => {
                if holds {
                    wd(BlockingOp::Unregister)
                } else {
                    Expect::NotRegistered(Target::Foreign)
                }
            }
            // I14: put never blocks, so it is allowed with a guard open.
            Transition::Put(slot) => {
                if !s.slots[slot].linked {
                    // After release, a shared registration's use count still balances.
                    if let Some(key) = s.shared_uses(slot) {
                        let (_, uses) = s.shared[key].as_mut().expect("shared slot");
                        *uses -= 1;
                        if *uses == 0 {
                            s.shared[key] = None;
                        }
                        Expect::Ok
                    } else if s.slots[slot].exited {
                        Expect::NotShared(slot)
                    } else {
                        Expect::NotRegistered(Target::Slot(slot))
                    }
                } else if let Some(key) = s.slots[slot].key {
                    let (_, uses) = s.shared[key].as_mut().expect("linked shared slot");
                    *uses -= 1;
                    if *uses == 0 {
                        s.shared[key] = None;
                        s.unlink(slot);
                    }
                    Expect::Ok
                } else {
                    Expect::NotShared(slot)
                }
            }
            Transition::Start {
                range,
                blockable,
                refuse,
            } => s.start(range, blockable, refuse),
            Transition::End(g) => {
                s.end(g);
                Expect::Nothing
            }
            // I16.
            Transition::Release => {
                if holds {
                    wd(BlockingOp::Release)
                } else if s.released {
                    Expect::Ok
                } else {
                    s.released = true;
                    if s.canary {
                        s.canary_calls += 1;
                    }
                    for slot in std::mem::take(&mut s.order) {
                        s.slots[slot].releases += 1;
                        s.slots[slot].linked = false;
                        s.slots[slot].exited = s.slots[slot].key.is_none();
                    }
                    Expect::Ok
                }
            }
            Transition::Synchronize => {
                if holds {
                    wd(BlockingOp::Synchronize)
                } else {
                    Expect::Ok
                }
            }
        };
        s
    }
}

// --- the system under test -------------------------------------------------------------------

struct SlotSut {
    id: SubscriberId,
    rec: Arc<Recorder>,
}

/// The engine, its open guards (which borrow the leaked `Mm`), and the test's subscribers.
struct Sut {
    mm: &'static Mm,
    guards: Vec<InvalidateGuard<'static>>,
    slots: Vec<SlotSut>,
    /// Keeps `foreign` registered on another address space.
    _foreign_mm: Mm,
    foreign: SubscriberId,
    canary: Option<(IntervalHandle, Arc<Canary>)>,
}

/// The test driver, per policy.
#[derive(Debug)]
struct CoreTest<P>(PhantomData<P>);

fn expected_error(sut: &Sut, expect: &Expect, range: Option<Range>) -> Option<Error> {
    let id = |slot: usize| sut.slots[slot].id;
    Some(match *expect {
        Expect::Nothing | Expect::Ok | Expect::Slot(_) => return None,
        Expect::NotRegistered(Target::Slot(s)) => Error::NotRegistered { id: id(s) },
        Expect::NotRegistered(Target::Foreign) => Error::NotRegistered { id: sut.foreign },
        Expect::NotShared(s) => Error::NotShared { id: id(s) },
        Expect::SharedUsePut(s) => Error::SharedUsePut { id: id(s) },
        Expect::Released => Error::Released,
        Expect::WouldDeadlock(op) => Error::WouldDeadlock {
            op,
            cause: DeadlockCause::HoldsGuard,
        },
        Expect::Refused(ref slots) => Error::StartRefused {
            range: range.expect("a refusal has a range"),
            refusers: slots.iter().map(|&s| Refuser::Classic(id(s))).collect(),
        },
    })
}

/// Compares a unit result with the prediction.
fn check_unit(sut: &Sut, expect: &Expect, got: Result<(), Error>, what: &str) {
    match expected_error(sut, expect, None) {
        None => assert_eq!(got, Ok(()), "{what}: expected success"),
        Some(e) => assert_eq!(got, Err(e), "{what}: expected the predicted error"),
    }
}

/// Compares a registration result with the prediction; adds the new slot.
fn check_registration(
    sut: &mut Sut,
    expect: &Expect,
    got: Result<SubscriberId, Error>,
    rec: Arc<Recorder>,
    allocated: bool,
    what: &str,
) {
    match *expect {
        Expect::Slot(slot) if slot == sut.slots.len() => {
            let id = got.unwrap_or_else(|e| panic!("{what}: expected a new registration, got {e}"));
            assert!(
                sut.slots.iter().all(|s| s.id != id),
                "{what}: a new registration reused an id"
            );
            sut.slots.push(SlotSut { id, rec });
        }
        Expect::Slot(slot) => {
            assert_eq!(
                got,
                Ok(sut.slots[slot].id),
                "{what}: expected the existing id"
            );
            assert!(
                !allocated,
                "{what}: alloc ran although the type was registered"
            );
        }
        _ => {
            let e = expected_error(sut, expect, None).expect("an error outcome");
            assert_eq!(got, Err(e), "{what}: expected the predicted error");
            assert!(!allocated, "{what}: alloc ran although the call failed");
        }
    }
}

fn get_or_register_key<const K: u8>(
    mm: &Mm,
    caps: Capabilities,
) -> (Result<SubscriberId, Error>, Arc<Recorder>, bool) {
    let rec = Recorder::new(caps);
    let mut allocated = false;
    let got = mm.get_or_register(|| {
        allocated = true;
        Arc::new(Sub::<K>(Arc::clone(&rec)))
    });
    (got, rec, allocated)
}

impl<P: PolicyKind> StateMachineTest for CoreTest<P> {
    type SystemUnderTest = Sut;
    type Reference = CoreModel<P>;

    fn init_test(s: &Model) -> Sut {
        let mm: &'static Mm = Box::leak(Box::new(Mm::with_policy(s.policy)));
        let foreign_mm = Mm::with_policy(s.policy);
        let foreign = foreign_mm
            .register(Arc::new(Sub::<200>(Recorder::new(Kind::Bare.caps()))))
            .expect("register on a fresh Mm");
        let canary = s.canary.then(|| {
            let sub = Arc::new(Canary::default());
            let handle = mm
                .insert_interval(Range::from_len(0, u64::MAX).unwrap(), sub.clone())
                .expect("insert the canary");
            (handle, sub)
        });
        let slots = s
            .slots
            .iter()
            .map(|m| {
                let rec = Recorder::new(m.caps);
                let id = mm
                    .register(Arc::new(Sub::<255>(Arc::clone(&rec))))
                    .expect("register on a fresh Mm");
                SlotSut { id, rec }
            })
            .collect();
        Sut {
            mm,
            guards: Vec::new(),
            slots,
            _foreign_mm: foreign_mm,
            foreign,
            canary,
        }
    }

    fn apply(mut sut: Sut, s: &Model, t: Transition) -> Sut {
        let mm = sut.mm;
        let what = format!("{t:?}");
        match t {
            Transition::Register(kind) => {
                let rec = Recorder::new(kind.caps());
                let got = mm.register(Arc::new(Sub::<255>(Arc::clone(&rec))));
                check_registration(&mut sut, &s.expect, got, rec, false, &what);
            }
            Transition::GetOrRegister(key, kind) => {
                let (got, rec, allocated) = match key {
                    0 => get_or_register_key::<0>(mm, kind.caps()),
                    _ => get_or_register_key::<1>(mm, kind.caps()),
                };
                check_registration(&mut sut, &s.expect, got, rec, allocated, &what);
            }
            Transition::Unregister(slot) => {
                let got = mm.unregister(sut.slots[slot].id).map(|_| ());
                check_unit(&sut, &s.expect, got, &what);
            }
            Transition::UnregisterForeign => {
                let got = mm.unregister(sut.foreign).map(|_| ());
                check_unit(&sut, &s.expect, got, &what);
            }
            Transition::Put(slot) => {
                let got = mm.put(sut.slots[slot].id);
                check_unit(&sut, &s.expect, got, &what);
            }
            Transition::Start {
                range,
                blockable,
                refuse,
            } => {
                let range = Range::new(range.0, range.1).expect("generated ranges are valid");
                for (i, slot) in sut.slots.iter().enumerate() {
                    let flag = i < 64 && refuse & (1 << i) != 0;
                    slot.rec.refuse_next.store(flag, Ordering::SeqCst);
                }
                let got = if blockable {
                    mm.invalidate_start(range, Event::Clear)
                } else {
                    mm.invalidate_start_nonblock(range, Event::Unmap)
                };
                for slot in &sut.slots {
                    slot.rec.refuse_next.store(false, Ordering::SeqCst);
                }
                match expected_error(&sut, &s.expect, Some(range)) {
                    None => {
                        let guard =
                            got.unwrap_or_else(|e| panic!("{what}: expected a guard, got {e}"));
                        assert_eq!(guard.range(), range);
                        assert_eq!(guard.invalidation().is_blockable(), blockable);
                        sut.guards.push(guard);
                    }
                    Some(e) => assert_eq!(got.err(), Some(e), "{what}: expected a refusal"),
                }
            }
            Transition::End(g) => sut.guards.remove(g).end(),
            Transition::Release => {
                let got = mm.release();
                check_unit(&sut, &s.expect, got, &what);
            }
            Transition::Synchronize => {
                let got = mm.synchronize();
                check_unit(&sut, &s.expect, got, &what);
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut, s: &Model) {
        let mm = sut.mm;
        assert_eq!(sut.slots.len(), s.slots.len(), "slot count");
        assert_eq!(sut.guards.len(), s.guards.len(), "open guards");
        // The snapshot, in call order.
        let order: Vec<SubscriberId> = s.order.iter().map(|&i| sut.slots[i].id).collect();
        assert_eq!(mm.subscribers(), order, "registered subscribers, in order");
        assert_eq!(mm.is_released(), s.released);
        for (i, (model, slot)) in s.slots.iter().zip(&sut.slots).enumerate() {
            let c = slot.rec.counts();
            let seen = (c.starts, c.refusals, c.ends, c.releases, c.frees);
            let want = (
                model.starts,
                model.refusals,
                model.ends,
                model.releases,
                u64::from(s.freed(i)),
            );
            assert_eq!(
                seen, want,
                "slot {i} ({:?}): subscriber's own (starts, refusals, ends, releases, frees)",
                model.caps
            );
            // I21: the engine's counters agree while it still knows the registration.
            match mm.subscriber_stats(slot.id) {
                Ok(st) => {
                    assert!(model.linked, "slot {i}: stats of an unlinked registration");
                    assert_eq!(
                        (st.starts, st.refusals, st.ends, st.releases, st.violations),
                        (
                            model.starts,
                            model.refusals,
                            model.ends,
                            model.releases,
                            model.violations
                        ),
                        "slot {i}: engine stats (starts, refusals, ends, releases, violations)"
                    );
                }
                Err(e) => {
                    assert!(
                        !model.linked,
                        "slot {i}: no stats for a linked registration"
                    );
                    assert_eq!(e, Error::NotRegistered { id: slot.id });
                }
            }
            // P1 / I4: under Exact every end matches a successful start of the same range,
            // and what is outstanding is exactly the ranges of the open guards that started
            // the subscriber (so everything balances once no guard is open).
            if s.policy == Policy::Exact && model.caps.has_start() && model.caps.has_end() {
                assert_eq!(c.unmatched_ends, 0, "slot {i}: an end without its start");
                let mut outstanding = c.outstanding.clone();
                outstanding.sort();
                let mut open: Vec<Range> = s
                    .guards
                    .iter()
                    .filter(|g| g.owed.contains(&i))
                    .map(|g| Range::new(g.range.0, g.range.1).unwrap())
                    .collect();
                open.sort();
                assert_eq!(outstanding, open, "slot {i}: outstanding starts");
                if s.guards.is_empty() {
                    assert_eq!(c.starts, c.ends, "slot {i}: unbalanced with no guard open");
                }
            }
        }
        // I25 / P2 / P3: the interval active count is exactly the open guards under Exact;
        // Kernel and Legacy leak one unit per classic refusal.
        if let Some((handle, canary)) = &sut.canary {
            assert_eq!(
                canary.0.load(Ordering::SeqCst),
                s.canary_calls,
                "canary calls"
            );
            let st = mm.interval_state();
            assert_eq!(st.active as u64, s.active, "interval active count");
            assert_eq!(st.seq % 2 == 1, s.active > 0, "epoch open iff active");
            assert_eq!((st.indexed, st.deferred), (1, 0));
            if s.policy == Policy::Exact {
                assert_eq!(s.active, s.guards.len() as u64);
            }
            if s.active == 0 {
                let seq = handle.read_begin().expect("no epoch open");
                assert!(!handle.read_retry(seq));
            }
        }
    }

    fn teardown(mut sut: Sut, _: Model) {
        // End the remaining guards before the (leaked) Mm is abandoned.
        sut.guards.clear();
    }
}

prop_state_machine! {
    #![proptest_config(Config {
        cases: 64,
        failure_persistence: None,
        .. Config::default()
    })]

    /// P1 (I4, I5, I11, I13, I14, I16, I21, I25): Exact pairs every end with a successful
    /// start, stops at the first refusal, closes the epoch; typed errors everywhere.
    #[test]
    fn exact_policy_matches_model(sequential 1..40 => CoreTest<ExactP>);

    /// P2 (I11, I13, I14, I16, I21): Kernel calls every start, ends every subscriber that
    /// declares an end after a refusal (refusers included), leaks the interval epoch, and
    /// ends twice after a blockable refusal.
    #[test]
    fn kernel_policy_matches_model(sequential 1..40 => CoreTest<KernelP>);

    /// P3 (I11, I13, I14, I16, I21): Legacy calls every start and ends nobody after a
    /// refusal; the epoch leaks as under Kernel.
    #[test]
    fn legacy_policy_matches_model(sequential 1..40 => CoreTest<LegacyP>);
}
