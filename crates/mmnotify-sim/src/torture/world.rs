//! The world a torture run works on: one simulated address space with every reference
//! secondary MMU, the fault-injecting subscribers, and slots for subscribers and intervals
//! that the workload registers and removes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mmnotify::{Owner, Policy, SubscriberId};

use super::inject::{Census, InjectedPanic, Panicker, Refuser, Slow};
use super::op::{Mirror, Op};
use super::Finding;
use crate::error::SimError;
use crate::mm::{SimMm, MMAP_BASE};
use crate::oom_reaper::process_mrelease;
use crate::oracle::{self, Violation};
use crate::secondary::{
    FaultOutcome, GruLike, HmmMirror, KvmLike, NouveauLike, SecondaryMmu, SvaLike, WaitOutcome,
    MAX_FAULT_RETRIES,
};
use crate::sync::Mutex;
use crate::vma::{Access, Backing, FileId, Prot, Sharing, PAGE_SIZE};

/// Slots of the address-space layout.
pub const SLOTS: usize = 6;
/// Pages per slot.
pub const SLOT_PAGES: usize = 8;
/// Distance between slot starts, in pages (leaves a hole after each slot).
const SLOT_STRIDE: u64 = 16;
/// The nouveau-like device's owner.
const DEVICE: Owner = Owner(0x6e76);
/// The HMM mirror's device owner.
const HMM_DEVICE: Owner = Owner(0x686d);
/// Slots the nouveau-like region covers.
const NOUVEAU_SLOTS: (usize, usize) = (0, 3);
/// Slots the HMM mirror covers.
const HMM_SLOTS: (usize, usize) = (1, 3);

/// The start address of a layout slot.
pub fn slot_addr(slot: usize) -> u64 {
    MMAP_BASE + (slot % SLOTS) as u64 * SLOT_STRIDE * PAGE_SIZE
}

/// The address of layout page `page`.
pub fn page_addr(page: u16) -> u64 {
    let page = usize::from(page) % (SLOTS * SLOT_PAGES);
    slot_addr(page / SLOT_PAGES) + (page % SLOT_PAGES) as u64 * PAGE_SIZE
}

/// The address of `page` folded into the `count` slots starting at `first`.
fn page_in(page: u16, first: usize, count: usize) -> u64 {
    let page = usize::from(page);
    slot_addr(first + (page / SLOT_PAGES) % count) + (page % SLOT_PAGES) as u64 * PAGE_SIZE
}

/// A callback run on every new address space's notifier hub (e.g. a test-only fault switch).
pub type MmHook = Arc<dyn Fn(&mmnotify::Mm) + Send + Sync>;

#[derive(Debug)]
enum ExtraClassic {
    Kvm(SubscriberId, Arc<KvmLike>),
    Gru(SubscriberId, Arc<GruLike>),
}

#[derive(Debug)]
struct ExtraInterval {
    over: usize,
    mirror: Arc<HmmMirror>,
}

/// What applying one operation did, beyond its side effects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The simulator or engine rejected it (unmapped, overlap, access violation, try again…):
    /// expected, counted, not a violation.
    pub rejected: bool,
    /// KVM fault retries, and `process_mrelease` answers "try again".
    pub retries: u64,
    /// A bounded wait ran out (a hang).
    pub hung: bool,
    /// How long a `read_begin` waited.
    pub read_begin_wait: Option<Duration>,
}

/// The world of a torture run: one simulated address space with every reference mirror, the
/// fault-injecting subscribers, and the subscriber and interval slots of the workload.
#[derive(Debug)]
pub struct World {
    sim: SimMm,
    /// Injected panics that reached [`World::apply_caught`].
    reported_panics: Mutex<u64>,
    census: Arc<Census>,
    kvm: Arc<KvmLike>,
    gru: Arc<GruLike>,
    nouveau: Arc<NouveauLike>,
    hmm: Arc<HmmMirror>,
    sva: Arc<SvaLike>,
    refuser: Arc<Refuser>,
    slow: Arc<Slow>,
    panicker: Arc<Panicker>,
    extra_classic: [Mutex<Option<ExtraClassic>>; 2],
    /// The nouveau-like model's classic registration, while registered.
    nouveau_id: Mutex<Option<SubscriberId>>,
    extra_interval: [Mutex<Option<ExtraInterval>>; 2],
    hang_timeout: Duration,
}

fn rejected() -> Applied {
    Applied {
        rejected: true,
        ..Applied::default()
    }
}

fn from_result<T>(r: Result<T, SimError>) -> Applied {
    match r {
        Ok(_) => Applied::default(),
        Err(SimError::TryAgain { .. }) => Applied {
            rejected: true,
            retries: 1,
            ..Applied::default()
        },
        Err(_) => rejected(),
    }
}

fn from_fault(r: Result<FaultOutcome, SimError>) -> Applied {
    match r {
        Ok(FaultOutcome::Hung { .. }) => Applied {
            hung: true,
            ..Applied::default()
        },
        Ok(_) => Applied::default(),
        Err(_) => rejected(),
    }
}

fn kvm_fault(kvm: &KvmLike, sim: &SimMm, addr: u64, access: Access) -> Applied {
    let mut out = Applied::default();
    for _ in 0..MAX_FAULT_RETRIES {
        match kvm.fault(sim, addr, access) {
            Ok(FaultOutcome::Retry) => out.retries += 1,
            Ok(_) => return out,
            Err(_) => return rejected(),
        }
    }
    out
}

impl World {
    /// A fresh world under `policy`; `hook` runs on the new hub before anything registers;
    /// every bounded wait of the mirrors gives up after `hang_timeout`.
    ///
    /// # Errors
    ///
    /// A simulator error while setting up (a bug in the layout).
    pub fn new(
        policy: Policy,
        hang_timeout: Duration,
        hook: Option<&MmHook>,
    ) -> Result<World, SimError> {
        let sim = SimMm::new(policy);
        if let Some(hook) = hook {
            hook(sim.mm());
        }
        let t = hang_timeout;
        let census = Arc::new(Census::default());
        sim.register("census", census.clone())?;
        let kvm = KvmLike::attach(&sim, "kvm", t)?;
        let slow = Arc::new(Slow::default());
        sim.register("slow", slow.clone())?;
        let nouveau = NouveauLike::new("nouveau", DEVICE, t);
        let nouveau_id = sim.register("nouveau", nouveau.clone())?;
        // Registered on the engine directly: the recording wrapper would miss the ends that
        // panic; the panicker keeps its own books instead.
        let panicker = Arc::new(Panicker::default());
        sim.mm().register(panicker.clone())?;
        let refuser = Arc::new(Refuser::default());
        sim.register("refuser", refuser.clone())?;
        let gru = GruLike::attach(&sim, "gru", t)?;
        let sva = SvaLike::attach(&sim, "sva")?;
        for slot in 0..SLOTS {
            let (backing, sharing) = match slot {
                4 => (
                    Backing::File {
                        file: FileId(1),
                        offset: 0,
                    },
                    Sharing::Shared,
                ),
                5 => (
                    Backing::File {
                        file: FileId(2),
                        offset: 0,
                    },
                    Sharing::Private,
                ),
                _ => (Backing::Anonymous, Sharing::Private),
            };
            sim.mmap(
                Some(slot_addr(slot)),
                SLOT_PAGES as u64 * PAGE_SIZE,
                Prot::READ_WRITE,
                backing,
                sharing,
            )?;
        }
        let span = |(first, count): (usize, usize)| {
            (
                slot_addr(first),
                slot_addr(first + count - 1) + SLOT_PAGES as u64 * PAGE_SIZE - slot_addr(first),
            )
        };
        let (start, len) = span(NOUVEAU_SLOTS);
        nouveau.mirror_region(&sim, start, len)?;
        let (start, len) = span(HMM_SLOTS);
        let hmm = HmmMirror::attach_device(&sim, "hmm", start, len, HMM_DEVICE, t)?;
        Ok(World {
            sim,
            reported_panics: Mutex::new(0),
            census,
            kvm,
            gru,
            nouveau,
            hmm,
            sva,
            refuser,
            slow,
            panicker,
            extra_classic: [Mutex::new(None), Mutex::new(None)],
            nouveau_id: Mutex::new(Some(nouveau_id)),
            extra_interval: [Mutex::new(None), Mutex::new(None)],
            hang_timeout,
        })
    }

    /// The simulated address space.
    pub fn sim(&self) -> &SimMm {
        &self.sim
    }

    /// Invalidations that reached the classic subscribers: `(blockable, non-blockable)`.
    pub fn invalidations(&self) -> (u64, u64) {
        self.census.counts()
    }

    /// Refusals received by every recorded subscriber (classic and interval).
    pub fn refusals(&self) -> u64 {
        self.sim
            .subscribers()
            .iter()
            .map(|s| s.counts.refusals + s.counts.interval_refusals)
            .sum()
    }

    /// Panics the panicking subscriber threw.
    pub fn panics_fired(&self) -> u64 {
        self.panicker.books().fired
    }

    /// Injected panics resumed on a caller of [`apply_caught`](Self::apply_caught).
    pub fn panics_reported(&self) -> u64 {
        *self.reported_panics.lock()
    }

    /// Applies `op`, catching a panic: `Ok(None)` for an injected panic (counted as
    /// reported), `Err` for any other panic.
    ///
    /// # Errors
    ///
    /// [`Finding::UnexpectedPanic`] if the operation panicked with anything but an injected
    /// panic.
    pub fn apply_caught(&self, op: &Op) -> Result<Option<Applied>, Finding> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply(op))) {
            Ok(applied) => Ok(Some(applied)),
            Err(payload) if payload.is::<InjectedPanic>() => {
                *self.reported_panics.lock() += 1;
                Ok(None)
            }
            Err(payload) => Err(Finding::UnexpectedPanic {
                op: op.to_string(),
                message: super::panic_message(&*payload),
            }),
        }
    }

    fn mirror_fault(&self, mirror: Mirror, page: u16, access: Access) -> Applied {
        let sim = &self.sim;
        match mirror {
            Mirror::Kvm => kvm_fault(&self.kvm, sim, page_addr(page), access),
            Mirror::Gru => from_fault(self.gru.fault(sim, page_addr(page), access)),
            Mirror::Sva => from_result(self.sva.access(sim, page_addr(page), access)),
            Mirror::Nouveau => {
                let addr = page_in(page, NOUVEAU_SLOTS.0, NOUVEAU_SLOTS.1);
                from_fault(self.nouveau.fault(sim, addr, access))
            }
            Mirror::Hmm => {
                let addr = page_in(page, HMM_SLOTS.0, HMM_SLOTS.1);
                from_fault(self.hmm.fault(sim, addr, access))
            }
            Mirror::ExtraClassic(k) => {
                let extra = match &*self.extra_classic[usize::from(k) % 2].lock() {
                    Some(ExtraClassic::Kvm(_, kvm)) => Ok(Arc::clone(kvm)),
                    Some(ExtraClassic::Gru(_, gru)) => Err(Some(Arc::clone(gru))),
                    None => Err(None),
                };
                match extra {
                    Ok(kvm) => kvm_fault(&kvm, sim, page_addr(page), access),
                    Err(Some(gru)) => from_fault(gru.fault(sim, page_addr(page), access)),
                    Err(None) => rejected(),
                }
            }
            Mirror::ExtraHmm(k) => {
                let extra = self.extra_interval[usize::from(k) % 2]
                    .lock()
                    .as_ref()
                    .map(|e| (e.over, Arc::clone(&e.mirror)));
                match extra {
                    Some((over, mirror)) => {
                        let addr = page_in(page, over, 1);
                        from_fault(mirror.fault(sim, addr, access))
                    }
                    None => rejected(),
                }
            }
        }
    }

    /// Applies one operation. May panic with [`InjectedPanic`] (the engine resumes a
    /// callback's panic on the caller's thread); [`apply_caught`](Self::apply_caught)
    /// catches it.
    pub fn apply(&self, op: &Op) -> Applied {
        let sim = &self.sim;
        let len = |pages: u8| u64::from(pages) * PAGE_SIZE;
        let at = |slot: u8, first: u8| slot_addr(usize::from(slot)) + u64::from(first) * PAGE_SIZE;
        let access = |write: bool| if write { Access::Write } else { Access::Read };
        match *op {
            Op::Touch { page, write: false } => {
                from_result(sim.task("torture").load(page_addr(page)))
            }
            Op::Touch { page, write: true } => from_result(
                sim.task("torture")
                    .store(page_addr(page), u64::from(page) + 1),
            ),
            Op::Fault {
                mirror,
                page,
                write,
            } => self.mirror_fault(mirror, page, access(write)),
            Op::GuestAccess { page } => {
                if page % 2 == 0 {
                    self.kvm.guest_read(sim, page_addr(page));
                } else {
                    self.kvm
                        .guest_write(sim, page_addr(page), 0x1000 + u64::from(page));
                }
                Applied::default()
            }
            Op::Mmap {
                slot,
                first,
                pages,
                backing,
            } => {
                let op_backing = backing;
                let (backing, sharing) = match backing % 5 {
                    0 | 4 => (Backing::Anonymous, Sharing::Private),
                    3 => (Backing::Anonymous, Sharing::Shared),
                    b => (
                        Backing::File {
                            file: FileId(1 + u64::from(slot)),
                            offset: u64::from(first) * PAGE_SIZE,
                        },
                        if b == 1 {
                            Sharing::Shared
                        } else {
                            Sharing::Private
                        },
                    ),
                };
                if op_backing % 5 == 4 {
                    from_result(sim.mmap_fixed(
                        at(slot, first),
                        len(pages),
                        Prot::READ_WRITE,
                        backing,
                        sharing,
                    ))
                } else {
                    from_result(sim.mmap(
                        Some(at(slot, first)),
                        len(pages),
                        Prot::READ_WRITE,
                        backing,
                        sharing,
                    ))
                }
            }
            Op::Munmap { slot, first, pages } => {
                from_result(sim.munmap(at(slot, first), len(pages)))
            }
            Op::Mprotect {
                slot,
                first,
                pages,
                prot,
            } => {
                let prot = [Prot::NONE, Prot::READ, Prot::READ_WRITE][usize::from(prot % 3)];
                from_result(sim.mprotect(at(slot, first), len(pages), prot))
            }
            Op::Madvise { slot, first, pages } => {
                from_result(sim.madvise_dontneed(at(slot, first), len(pages)))
            }
            Op::Migrate {
                slot,
                first,
                pages,
                device,
            } => match (device, slot % 2) {
                (false, _) => from_result(sim.migrate(at(slot, first), len(pages), None)),
                (true, 0) => from_result(sim.migrate(at(slot, first), len(pages), Some(DEVICE))),
                (true, _) => {
                    from_result(self.hmm.migrate_to_device(sim, at(slot, first), len(pages)))
                }
            },
            Op::Reclaim { slot, first, pages } => {
                from_result(sim.reclaim(at(slot, first), len(pages)))
            }
            Op::Mremap {
                from,
                to,
                first,
                pages,
                back,
            } => {
                let hole = SLOT_PAGES as u64 * PAGE_SIZE;
                let (src, dst) = if back {
                    (at(from, first) + hole, at(to, first))
                } else {
                    (at(from, first), at(to, first) + hole)
                };
                from_result(sim.mremap(src, len(pages), dst))
            }
            Op::Fork => from_result(sim.fork().and_then(|child| child.exit())),
            Op::OomReap => from_result(process_mrelease(sim)),
            Op::MemslotUpdate => match self.kvm.update_memslots() {
                WaitOutcome::Ok => Applied::default(),
                WaitOutcome::TimedOut { .. } => Applied {
                    hung: true,
                    ..Applied::default()
                },
            },
            Op::ReadBegin => {
                let began = Instant::now();
                let outcome = self.hmm.probe_read_begin();
                let wait = Some(began.elapsed());
                match outcome {
                    Ok(WaitOutcome::Ok) => Applied {
                        read_begin_wait: wait,
                        ..Applied::default()
                    },
                    Ok(WaitOutcome::TimedOut { .. }) => Applied {
                        hung: true,
                        read_begin_wait: wait,
                        ..Applied::default()
                    },
                    Err(_) => rejected(),
                }
            }
            Op::Register { slot } if slot % 3 == 2 => {
                let mut id = self.nouveau_id.lock();
                if id.is_some() {
                    return rejected();
                }
                match sim.register("nouveau", self.nouveau.clone()) {
                    Ok(new) => {
                        *id = Some(new);
                        Applied::default()
                    }
                    Err(_) => rejected(),
                }
            }
            Op::Unregister { slot } if slot % 3 == 2 => {
                let Some(id) = self.nouveau_id.lock().take() else {
                    return rejected();
                };
                from_result(sim.mm().unregister(id).map_err(SimError::from))
            }
            Op::Register { slot } => {
                let k = usize::from(slot) % 2;
                let mut extra = self.extra_classic[k].lock();
                if extra.is_some() {
                    return rejected();
                }
                let name = format!("extra{k}");
                let made = if k == 0 {
                    let kvm = KvmLike::new(&name, self.hang_timeout);
                    sim.register(&name, kvm.clone())
                        .map(|id| ExtraClassic::Kvm(id, kvm))
                } else {
                    let gru = GruLike::new(&name, self.hang_timeout);
                    sim.register(&name, gru.clone())
                        .map(|id| ExtraClassic::Gru(id, gru))
                };
                match made {
                    Ok(e) => {
                        *extra = Some(e);
                        Applied::default()
                    }
                    Err(_) => rejected(),
                }
            }
            Op::Unregister { slot } => {
                let taken = self.extra_classic[usize::from(slot) % 2].lock().take();
                let id = match taken {
                    Some(ExtraClassic::Kvm(id, _) | ExtraClassic::Gru(id, _)) => id,
                    None => return rejected(),
                };
                from_result(sim.mm().unregister(id).map_err(SimError::from))
            }
            Op::InsertInterval { slot, over } => {
                let k = usize::from(slot) % 2;
                let mut extra = self.extra_interval[k].lock();
                if extra.is_some() {
                    return rejected();
                }
                let over = usize::from(over) % SLOTS;
                match HmmMirror::attach(
                    sim,
                    &format!("hmm-extra{k}"),
                    slot_addr(over),
                    SLOT_PAGES as u64 * PAGE_SIZE,
                    self.hang_timeout,
                ) {
                    Ok(mirror) => {
                        *extra = Some(ExtraInterval { over, mirror });
                        Applied::default()
                    }
                    Err(_) => rejected(),
                }
            }
            Op::RemoveInterval { slot } => {
                let Some(extra) = self.extra_interval[usize::from(slot) % 2].lock().take() else {
                    return rejected();
                };
                let handle = extra.mirror.handle();
                // `remove_interval` waits for the epoch to close: forever if it leaked, which
                // only the Linux policies do. Those use the deferred removal.
                let removed = if sim.policy() == Policy::Exact {
                    sim.mm().remove_interval(handle)
                } else {
                    sim.mm().remove_interval_deferred(handle)
                };
                from_result(removed.map_err(SimError::from))
            }
            Op::SetRefusing { on } => {
                self.refuser.set(on);
                Applied::default()
            }
            Op::SetDelay { micros } => {
                self.slow.set(micros);
                Applied::default()
            }
            Op::ArmPanic { at_end } => {
                self.panicker.arm(at_end);
                Applied::default()
            }
        }
    }

    /// Every secondary MMU currently subscribed.
    fn mirrors(&self) -> Vec<Arc<dyn SecondaryMmu>> {
        let mut out: Vec<Arc<dyn SecondaryMmu>> = vec![
            self.kvm.clone(),
            self.gru.clone(),
            self.nouveau.clone(),
            self.hmm.clone(),
            self.sva.clone(),
        ];
        for slot in &self.extra_classic {
            match &*slot.lock() {
                Some(ExtraClassic::Kvm(_, kvm)) => out.push(kvm.clone()),
                Some(ExtraClassic::Gru(_, gru)) => out.push(gru.clone()),
                None => {}
            }
        }
        for slot in &self.extra_interval {
            if let Some(e) = &*slot.lock() {
                out.push(e.mirror.clone());
            }
        }
        out
    }

    /// Checks the world at a quiet moment (no operation in flight): the oracle (coherence,
    /// start/end balance, in-flight counters, the interval epoch, hangs), the panicking
    /// subscriber's own balance, and that every injected panic reached a caller of
    /// [`apply_caught`](Self::apply_caught).
    pub fn check(&self) -> Vec<Finding> {
        let reported_panics = self.panics_reported();
        let mirrors = self.mirrors();
        let refs: Vec<&dyn SecondaryMmu> = mirrors.iter().map(|m| &**m).collect();
        let mut out: Vec<Finding> = oracle::check(&self.sim, &refs)
            .into_iter()
            .map(Finding::Oracle)
            .collect();
        let books = self.panicker.books();
        if books.starts != books.ends {
            out.push(Finding::Oracle(Violation::Unbalanced {
                subscriber: "panicker".to_owned(),
                starts: books.starts,
                ends: books.ends,
            }));
        }
        if books.fired != reported_panics {
            out.push(Finding::PanicNotReported {
                fired: books.fired,
                reported: reported_panics,
            });
        }
        out
    }
}
