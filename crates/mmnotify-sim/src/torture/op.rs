//! The workload model: the operations a torture worker performs, as plain data, and the
//! seeded generator that draws them.
//!
//! An [`Op`] names everything by small indices (a slot of the address-space layout, a page in
//! it, a subscriber slot), never by state observed at run time, so that any sub-sequence of a
//! recorded history is itself a valid history: that is what makes replay and shrinking work.

use std::fmt;

use super::world::{SLOTS, SLOT_PAGES};

/// A small, fast, seedable generator (SplitMix64): enough for workload choices, and its
/// sequence is fixed forever, so a seed means the same history on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for worker `worker` of a run seeded with `seed`.
    pub fn for_worker(seed: u64, worker: usize) -> Rng {
        let mut r = Rng(seed ^ 0x6d6d_6e6f_7469_6679);
        for _ in 0..=worker {
            r.next_u64();
        }
        Rng(r.next_u64() ^ (worker as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `true` with probability `1/n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// A secondary MMU (or injected subscriber) that can take a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mirror {
    /// The KVM-like model (fault, retried by the worker, each retry counted).
    Kvm,
    /// The GRU-like model (its fault waits for `range_active == 0`, bounded).
    Gru,
    /// The nouveau-like model, on its mirrored region.
    Nouveau,
    /// The HMM mirror, on its interval.
    Hmm,
    /// The SVA-like model (secondary-TLB flushes only).
    Sva,
    /// The extra classic subscriber in slot `n` (KVM-like in slot 0, GRU-like in slot 1).
    ExtraClassic(u8),
    /// The extra HMM mirror in interval slot `n`.
    ExtraHmm(u8),
}

/// One operation of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A task of the process touches a page (primary fault).
    Touch {
        /// Page index in the layout.
        page: u16,
        /// Store rather than load.
        write: bool,
    },
    /// A secondary MMU faults a page in.
    Fault {
        /// Which one.
        mirror: Mirror,
        /// Page index in the layout (mapped into the mirror's region for interval mirrors).
        page: u16,
        /// Write access.
        write: bool,
    },
    /// The KVM guest loads (even pages) or stores (odd pages) through its SPTE, without
    /// exiting: nothing happens if the SPTE is missing or, for a store, read-only.
    GuestAccess {
        /// Page index.
        page: u16,
    },
    /// `mmap` at a fixed address of pages of a slot: `MAP_FIXED_NOREPLACE`, or `MAP_FIXED`
    /// replacing what is there.
    Mmap {
        /// Slot.
        slot: u8,
        /// First page in the slot.
        first: u8,
        /// Number of pages.
        pages: u8,
        /// 0: anonymous private, 1: shared file, 2: private file, 3: shared anonymous (all
        /// no-replace), 4: anonymous private replacing (`MAP_FIXED`).
        backing: u8,
    },
    /// `munmap` of pages of a slot.
    Munmap {
        /// Slot.
        slot: u8,
        /// First page in the slot.
        first: u8,
        /// Number of pages.
        pages: u8,
    },
    /// `mprotect` of pages of a slot.
    Mprotect {
        /// Slot.
        slot: u8,
        /// First page in the slot.
        first: u8,
        /// Number of pages.
        pages: u8,
        /// 0: none, 1: read, 2: read-write.
        prot: u8,
    },
    /// `madvise(MADV_DONTNEED)` of pages of a slot.
    Madvise {
        /// Slot.
        slot: u8,
        /// First page in the slot.
        first: u8,
        /// Number of pages.
        pages: u8,
    },
    /// Page migration, by the kernel (`Clear`) or by a device (`Migrate`): the nouveau-like
    /// one for even slots, the HMM mirror's own device (which ignores its own `Migrate` and
    /// maps the moved pages itself) for odd slots.
    Migrate {
        /// Slot.
        slot: u8,
        /// First page in the slot.
        first: u8,
        /// Number of pages.
        pages: u8,
        /// Device migration.
        device: bool,
    },
    /// One reclaim pass over pages of a slot.
    Reclaim {
        /// Slot.
        slot: u8,
        /// First page in the slot.
        first: u8,
        /// Number of pages.
        pages: u8,
    },
    /// `mremap` of pages of a slot into the hole after another slot (or back from a hole
    /// into a slot); the destination must be free.
    Mremap {
        /// Source slot (or the hole after it).
        from: u8,
        /// Destination slot (or the hole after it).
        to: u8,
        /// First page.
        first: u8,
        /// Number of pages.
        pages: u8,
        /// From a hole into a slot, rather than from a slot into a hole.
        back: bool,
    },
    /// `fork`, then the child exits.
    Fork,
    /// One OOM-reaper pass (`process_mrelease`): non-blocking starts.
    OomReap,
    /// A KVM memslot update (waits, bounded, for no invalidation in flight).
    MemslotUpdate,
    /// A bare bounded `read_begin` on the HMM mirror's interval.
    ReadBegin,
    /// Registers the extra classic subscriber of a slot (no-op if present).
    Register {
        /// Slot (0: an extra KVM-like, 1: an extra GRU-like, 2: the nouveau-like model's
        /// classic subscription, the one that refuses non-blockable starts).
        slot: u8,
    },
    /// Unregisters the extra classic subscriber of a slot (no-op if absent).
    Unregister {
        /// Slot.
        slot: u8,
    },
    /// Inserts the extra HMM mirror of an interval slot over a layout slot (no-op if present).
    InsertInterval {
        /// Interval slot.
        slot: u8,
        /// Layout slot it covers.
        over: u8,
    },
    /// Removes the extra HMM mirror of an interval slot (no-op if absent).
    RemoveInterval {
        /// Interval slot.
        slot: u8,
    },
    /// Makes the injected refuser refuse (or stop refusing) non-blockable starts.
    SetRefusing {
        /// Refuse from now on.
        on: bool,
    },
    /// Sets the injected slow subscriber's delay per callback.
    SetDelay {
        /// Microseconds.
        micros: u16,
    },
    /// Arms the injected panicking subscriber: its next start (or end) panics.
    ArmPanic {
        /// Panic in the end rather than the start.
        at_end: bool,
    },
}

impl Op {
    /// The kind of operation, for the summary table.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Touch { .. } => "touch",
            Op::Fault { mirror, .. } => match mirror {
                Mirror::Kvm => "fault kvm",
                Mirror::Gru => "fault gru",
                Mirror::Nouveau => "fault nouveau",
                Mirror::Hmm => "fault hmm",
                Mirror::Sva => "fault sva",
                Mirror::ExtraClassic(_) => "fault extra classic",
                Mirror::ExtraHmm(_) => "fault extra hmm",
            },
            Op::GuestAccess { .. } => "guest access",
            Op::Mmap { .. } => "mmap",
            Op::Munmap { .. } => "munmap",
            Op::Mprotect { .. } => "mprotect",
            Op::Madvise { .. } => "madvise",
            Op::Migrate { device: false, .. } => "migrate",
            Op::Migrate {
                device: true, slot, ..
            } if slot % 2 == 0 => "migrate (nouveau)",
            Op::Migrate { device: true, .. } => "migrate (hmm device)",
            Op::Reclaim { .. } => "reclaim",
            Op::Mremap { .. } => "mremap",
            Op::Fork => "fork",
            Op::OomReap => "oom reap",
            Op::MemslotUpdate => "memslot update",
            Op::ReadBegin => "read_begin",
            Op::Register { .. } => "register",
            Op::Unregister { .. } => "unregister",
            Op::InsertInterval { .. } => "insert interval",
            Op::RemoveInterval { .. } => "remove interval",
            Op::SetRefusing { .. } => "inject refusals",
            Op::SetDelay { .. } => "inject delay",
            Op::ArmPanic { .. } => "inject panic",
        }
    }

    /// Draws one operation.
    pub fn generate(rng: &mut Rng) -> Op {
        let slot = |rng: &mut Rng| rng.below(SLOTS as u64) as u8;
        let page = |rng: &mut Rng| rng.below((SLOTS * SLOT_PAGES) as u64) as u16;
        let span = |rng: &mut Rng| {
            let first = rng.below(SLOT_PAGES as u64) as u8;
            let pages = 1 + rng.below(SLOT_PAGES as u64 - u64::from(first)) as u8;
            (first, pages)
        };
        match rng.below(100) {
            0..=7 => Op::Touch {
                page: page(rng),
                write: rng.one_in(2),
            },
            8..=39 => {
                let mirror = match rng.below(9) {
                    0 | 1 => Mirror::Kvm,
                    2 | 3 => Mirror::Gru,
                    4 => Mirror::Nouveau,
                    5 | 6 => Mirror::Hmm,
                    7 => Mirror::Sva,
                    _ if rng.one_in(2) => Mirror::ExtraClassic(rng.below(2) as u8),
                    _ => Mirror::ExtraHmm(rng.below(2) as u8),
                };
                Op::Fault {
                    mirror,
                    page: page(rng),
                    write: rng.one_in(3),
                }
            }
            40..=42 => Op::GuestAccess { page: page(rng) },
            43..=49 => {
                let (first, pages) = span(rng);
                Op::Mmap {
                    slot: slot(rng),
                    first,
                    pages,
                    backing: rng.below(5) as u8,
                }
            }
            50..=51 => {
                let (first, pages) = span(rng);
                Op::Munmap {
                    slot: slot(rng),
                    first,
                    pages,
                }
            }
            52..=55 => {
                let (first, pages) = span(rng);
                Op::Mprotect {
                    slot: slot(rng),
                    first,
                    pages,
                    prot: [0, 1, 2, 2][rng.below(4) as usize],
                }
            }
            56..=58 => {
                let (first, pages) = span(rng);
                Op::Madvise {
                    slot: slot(rng),
                    first,
                    pages,
                }
            }
            59..=62 => {
                let (first, pages) = span(rng);
                Op::Migrate {
                    slot: slot(rng),
                    first,
                    pages,
                    device: rng.one_in(2),
                }
            }
            63..=65 => {
                let (first, pages) = span(rng);
                Op::Reclaim {
                    slot: slot(rng),
                    first,
                    pages,
                }
            }
            66..=67 => {
                let (first, pages) = span(rng);
                Op::Mremap {
                    from: slot(rng),
                    to: slot(rng),
                    first,
                    pages,
                    back: rng.one_in(2),
                }
            }
            68..=69 => Op::Fork,
            70..=71 => Op::OomReap,
            72..=74 => Op::Fault {
                mirror: Mirror::Kvm,
                page: page(rng),
                write: rng.one_in(3),
            },
            75..=76 => Op::MemslotUpdate,
            77..=80 => Op::ReadBegin,
            81..=82 => Op::Register {
                slot: rng.below(3) as u8,
            },
            83..=84 => Op::Unregister {
                slot: rng.below(3) as u8,
            },
            85..=86 => Op::InsertInterval {
                slot: rng.below(2) as u8,
                over: slot(rng),
            },
            87..=88 => Op::RemoveInterval {
                slot: rng.below(2) as u8,
            },
            89..=92 => Op::SetRefusing { on: rng.one_in(2) },
            93..=95 => Op::SetDelay {
                micros: [0, 0, 0, 2, 10, 50, 200][rng.below(7) as usize],
            },
            96 => Op::ArmPanic {
                at_end: rng.one_in(2),
            },
            _ => Op::Touch {
                page: page(rng),
                write: rng.one_in(2),
            },
        }
    }
}

fn classic_slot(slot: u8) -> &'static str {
    [
        "extra KVM-like subscriber",
        "extra GRU-like subscriber",
        "nouveau (refuses non-blockable starts)",
    ][usize::from(slot % 3)]
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let span = |slot: &u8, first: &u8, pages: &u8| {
            format!("slot {slot} pages {first}..{}", first + pages)
        };
        match self {
            Op::Touch { page, write } => {
                write!(
                    f,
                    "touch page {page} ({})",
                    if *write { "write" } else { "read" }
                )
            }
            Op::Fault {
                mirror,
                page,
                write,
            } => write!(
                f,
                "{mirror:?} fault page {page} ({})",
                if *write { "write" } else { "read" }
            ),
            Op::GuestAccess { page } => write!(
                f,
                "kvm guest {} page {page}",
                if page % 2 == 0 { "load" } else { "store" }
            ),
            Op::Mmap {
                slot,
                first,
                pages,
                backing,
            } => write!(
                f,
                "mmap {} {}",
                span(slot, first, pages),
                [
                    "anonymous",
                    "shared file",
                    "private file",
                    "shared anonymous",
                    "anonymous, MAP_FIXED replacing"
                ][usize::from(*backing % 5)]
            ),
            Op::Munmap { slot, first, pages } => write!(f, "munmap {}", span(slot, first, pages)),
            Op::Mprotect {
                slot,
                first,
                pages,
                prot,
            } => write!(
                f,
                "mprotect {} {}",
                span(slot, first, pages),
                ["PROT_NONE", "PROT_READ", "PROT_READ|PROT_WRITE"][usize::from(*prot % 3)]
            ),
            Op::Madvise { slot, first, pages } => {
                write!(f, "madvise(DONTNEED) {}", span(slot, first, pages))
            }
            Op::Migrate {
                slot,
                first,
                pages,
                device,
            } => write!(
                f,
                "migrate {}{}",
                span(slot, first, pages),
                match (*device, slot % 2) {
                    (false, _) => "",
                    (true, 0) => " to the nouveau device",
                    (true, _) => " to the hmm device",
                }
            ),
            Op::Reclaim { slot, first, pages } => write!(f, "reclaim {}", span(slot, first, pages)),
            Op::Mremap {
                from,
                to,
                first,
                pages,
                back,
            } => {
                let (a, b) = if *back {
                    ("hole after slot", "slot")
                } else {
                    ("slot", "hole after slot")
                };
                write!(
                    f,
                    "mremap {a} {from} pages {first}..{} to {b} {to}",
                    first + pages
                )
            }
            Op::Fork => f.write_str("fork, child exits"),
            Op::OomReap => f.write_str("oom reap (process_mrelease)"),
            Op::MemslotUpdate => f.write_str("kvm memslot update"),
            Op::ReadBegin => f.write_str("hmm read_begin"),
            Op::Register { slot } => write!(f, "register {}", classic_slot(*slot)),
            Op::Unregister { slot } => write!(f, "unregister {}", classic_slot(*slot)),
            Op::InsertInterval { slot, over } => {
                write!(f, "insert extra hmm interval {slot} over slot {over}")
            }
            Op::RemoveInterval { slot } => write!(f, "remove extra hmm interval {slot}"),
            Op::SetRefusing { on } => write!(
                f,
                "injected refuser {} non-blockable starts",
                if *on { "refuses" } else { "accepts" }
            ),
            Op::SetDelay { micros } => write!(f, "injected slow subscriber delay {micros} us"),
            Op::ArmPanic { at_end } => write!(
                f,
                "arm injected panic in the next {}",
                if *at_end { "end" } else { "start" }
            ),
        }
    }
}
