//! [`SimMm`]: a simulated address space on top of [`mmnotify::Mm`].
//!
//! Every operation changes the simulated page table the way Linux changes the real one, and
//! brackets the change with the notifier event Linux fires for it:
//!
//! | operation                         | event (range)                                        | Linux producer                    |
//! |-----------------------------------|------------------------------------------------------|-----------------------------------|
//! | [`mmap`](SimMm::mmap)             | none (nothing mapped yet)                            |                                   |
//! | [`mmap_fixed`](SimMm::mmap_fixed) | `Unmap` (the new range) if it replaces live memory   | `mmap_region` → `unmap_vmas`      |
//! | [`munmap`](SimMm::munmap)         | `Unmap` (the requested range, holes included)        | `unmap_vmas`                      |
//! | [`madvise_dontneed`](SimMm::madvise_dontneed) | `Clear` (per VMA piece)                  | `zap_page_range_single`           |
//! | [`mprotect`](SimMm::mprotect)     | `ProtectionVma` (per VMA piece with a populated page)| `change_pmd_range` (lazy start)   |
//! | [`fork`](SimMm::fork)             | `ProtectionPage` on each parent COW VMA with pages   | `copy_page_range`                 |
//! | a write fault on a COW or zero page | `Clear` (one page)                                 | `wp_page_copy`                    |
//! | [`mremap`](SimMm::mremap)         | `Unmap` (a live destination), `Unmap` (the old range) | `do_munmap`, `move_page_tables`  |
//! | [`migrate`](SimMm::migrate)       | `Clear` per page, or `Migrate { owner }` per VMA piece for a device | `try_to_migrate_one`, `migrate_vma_collect` |
//! | [`reclaim`](SimMm::reclaim)       | `clear_flush_young` per page; `Clear` per evicted page | `folio_referenced`, `try_to_unmap_one` |
//! | [`exit`](SimMm::exit)             | `Mm::release`, then `Unmap` per VMA                  | `exit_mmap`                       |
//! | the OOM reaper                    | non-blocking `Unmap` per private VMA                 | `__oom_reap_task_mm`              |
//!
//! Calls over a range with a hole behave as Linux's: `munmap` does not care; `madvise`
//! (DONTNEED, and `reclaim` like PAGEOUT) handles every mapped piece, then fails with the hole
//! (ENOMEM); `mprotect` and `migrate` handle the pieces before the hole, then fail; `mremap`
//! refuses before changing anything.
//!
//! Pages hold one word each ([`Task::load`], [`Task::store`]). A read fault on untouched
//! private anonymous memory maps the shared zero page ([`FrameId::ZERO`]) read-only; shared
//! anonymous memory is one shmem object, shared across fork; reclaimed private pages go to
//! swap and come back with their word.
//!
//! Wherever the primary TLB of a range is flushed (after the entries changed, inside the
//! window), the simulator also calls [`Mm::arch_invalidate_secondary_tlbs`].
//!
//! # Locking
//!
//! `mmap_lock` serialises the operations (and faults) of the simulated process; the OOM
//! reaper only try-locks it, as Linux's `mmap_read_trylock`. `state` (VMAs, page table, flags)
//! is held only for short critical sections and never across a call into the engine, so the
//! secondary MMUs' fault paths may read the page table at any time. Lock order: `mmap_lock`,
//! then `state`, then the frame allocator.
//!
//! As in Linux, where notifier callbacks run under the mmap lock, a subscriber callback must
//! not call an operation of the same `SimMm` (it would wait for the mmap lock its own caller
//! holds); reading the page table ([`SimMm::lookup`]) is fine.

use std::collections::BTreeMap;
use std::sync::Arc;

use mmnotify::{
    Capabilities, Event, IntervalHandle, IntervalId, IntervalSubscriber, Mm, Owner, Policy, Range,
    Refuser, Subscriber, SubscriberId, SubscriberStats,
};

use crate::error::SimError;
use crate::frames::{FrameId, Frames};
use crate::page_table::{PageTable, Pte};
use crate::sync::{Mutex, MutexGuard};
use crate::trace::{
    CountsHandle, RecordedCounts, RecordingInterval, RecordingSubscriber, TraceEvent, TraceKind,
    TraceLog,
};
use crate::vma::{addr_of, vpn_of, Access, Backing, Prot, Sharing, Vma, VmaSet, PAGE_SIZE};

/// Where mappings without a fixed address are placed (bottom-up from here).
pub const MMAP_BASE: u64 = 0x1000_0000;

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) vmas: VmaSet,
    pub(crate) pt: PageTable,
    /// Swap entries: the word of each private page that reclaim evicted, by virtual page,
    /// until a fault swaps it back in or the page is zapped.
    swap: BTreeMap<u64, u64>,
    exited: bool,
    oom_skip: bool,
    unstable: bool,
}

impl State {
    fn check_alive(&self) -> Result<(), SimError> {
        if self.exited {
            Err(SimError::Exited)
        } else {
            Ok(())
        }
    }
}

/// What kind of subscription a registered subscriber is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriberKind {
    /// A classic subscriber.
    Classic {
        /// Its engine id.
        id: SubscriberId,
        /// What it declared.
        caps: Capabilities,
    },
    /// An interval subscriber over the inclusive `[start, last]`.
    Interval {
        /// Its engine id.
        id: IntervalId,
        /// First covered address.
        start: u64,
        /// Last covered address.
        last: u64,
    },
}

#[derive(Debug)]
struct Registered {
    name: String,
    kind: SubscriberKind,
    counts: CountsHandle,
}

/// What one registered subscriber received, read from the recording wrapper's counters and,
/// while the registration exists, from the engine's statistics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriberReport {
    /// The name it was registered under.
    pub name: String,
    /// Classic or interval, with its id.
    pub kind: SubscriberKind,
    /// The wrapper's counters (kept after release).
    pub counts: RecordedCounts,
    /// The engine's counters; `None` once the registration is gone (after exit).
    pub engine: Option<SubscriberStats>,
}

impl SubscriberReport {
    /// Whether the subscriber is classic and declares an end.
    pub fn has_end(&self) -> bool {
        matches!(self.kind, SubscriberKind::Classic { caps, .. } if caps.has_end())
    }
}

/// Result of [`SimMm::migrate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrateReport {
    /// `(vpn, old frame, new frame)` for every moved page.
    pub moved: Vec<(u64, FrameId, FrameId)>,
    /// Populated pages left in place: page-cache pages (file or shmem), pages another mapping
    /// also references, and the zero page (the kernel's migration).
    pub skipped: Vec<u64>,
}

/// Result of [`SimMm::reclaim`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Pages scanned.
    pub scanned: usize,
    /// Pages kept because the primary accessed bit was set.
    pub referenced_primary: Vec<u64>,
    /// Pages kept because a secondary MMU reported them young (`clear_flush_young`).
    pub referenced_secondary: Vec<u64>,
    /// Pages evicted (each with its own `Clear`).
    pub evicted: Vec<u64>,
}

/// One pass of the OOM reaper over the VMAs (`__oom_reap_task_mm`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReapPass {
    /// VMAs whose pages were unmapped (start succeeded, pages zapped, end delivered).
    pub reaped: Vec<Range>,
    /// VMAs whose non-blocking start was refused: neither unmapped nor ended.
    pub refused: Vec<(Range, Vec<Refuser>)>,
    /// Shared VMAs (file or shmem) the reaper leaves alone.
    pub skipped: Vec<Range>,
    /// Pages unmapped.
    pub pages_unmapped: usize,
}

/// A simulated process address space; see the module docs for the events each operation fires.
#[derive(Debug)]
pub struct SimMm {
    mm: Mm,
    mmap_lock: Mutex<()>,
    state: Mutex<State>,
    frames: Arc<Mutex<Frames>>,
    log: Arc<TraceLog>,
    registry: Mutex<Vec<Registered>>,
}

/// Where [`SimMm::map`] places a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// The lowest free gap at or above [`MMAP_BASE`].
    Anywhere,
    /// At this address, refusing to overlap (`MAP_FIXED_NOREPLACE`).
    FixedNoReplace(u64),
    /// At this address, replacing what is there (`MAP_FIXED`).
    FixedReplace(u64),
}

fn page_range(first_vpn: u64, end_vpn: u64) -> Range {
    Range::new(addr_of(first_vpn), addr_of(end_vpn)).expect("a non-empty page range")
}

impl SimMm {
    /// A new, empty address space whose notifier hub uses `policy`.
    pub fn new(policy: Policy) -> SimMm {
        SimMm::with_parts(
            Mm::with_policy(policy),
            Arc::new(Mutex::new(Frames::default())),
            Arc::new(TraceLog::new()),
        )
    }

    fn with_parts(mm: Mm, frames: Arc<Mutex<Frames>>, log: Arc<TraceLog>) -> SimMm {
        SimMm {
            mm,
            mmap_lock: Mutex::new(()),
            state: Mutex::new(State::default()),
            frames,
            log,
            registry: Mutex::new(Vec::new()),
        }
    }

    /// The notifier hub of this address space.
    pub fn mm(&self) -> &Mm {
        &self.mm
    }

    /// The notifier policy.
    pub fn policy(&self) -> Policy {
        self.mm.policy()
    }

    /// A named task of this process, to fault pages in.
    pub fn task(&self, name: &str) -> Task<'_> {
        Task {
            sim: self,
            name: name.to_owned(),
        }
    }

    // --- subscribers ----------------------------------------------------------------------

    /// Registers a classic subscriber under `name`, through a recording wrapper that logs
    /// every callback to this address space's trace.
    ///
    /// # Errors
    ///
    /// The engine's registration errors, as [`SimError::Engine`].
    pub fn register(
        &self,
        name: &str,
        subscriber: Arc<dyn Subscriber>,
    ) -> Result<SubscriberId, SimError> {
        let caps = subscriber.capabilities();
        let wrapper = Arc::new(RecordingSubscriber::new(
            name,
            subscriber,
            Arc::clone(&self.log),
        ));
        let counts = wrapper.counts();
        let id = self.mm.register(wrapper)?;
        self.registry.lock().push(Registered {
            name: name.to_owned(),
            kind: SubscriberKind::Classic { id, caps },
            counts,
        });
        Ok(id)
    }

    /// Inserts an interval subscriber under `name` over `[start, start + len)`, through a
    /// recording wrapper.
    ///
    /// # Errors
    ///
    /// The engine's insertion errors, as [`SimError::Engine`].
    pub fn insert_interval(
        &self,
        name: &str,
        start: u64,
        len: u64,
        subscriber: Arc<dyn IntervalSubscriber>,
    ) -> Result<IntervalHandle, SimError> {
        let wrapper = Arc::new(RecordingInterval::new(
            name,
            subscriber,
            Arc::clone(&self.log),
        ));
        let counts = wrapper.counts();
        let handle = self
            .mm
            .insert_interval(Range::from_len(start, len)?, wrapper)?;
        let (start, last) = (handle.range().start(), handle.range().last());
        self.registry.lock().push(Registered {
            name: name.to_owned(),
            kind: SubscriberKind::Interval {
                id: handle.id(),
                start,
                last,
            },
            counts,
        });
        Ok(handle)
    }

    /// Every subscriber registered through this address space, in registration order.
    pub fn subscribers(&self) -> Vec<SubscriberReport> {
        self.registry
            .lock()
            .iter()
            .map(|r| SubscriberReport {
                name: r.name.clone(),
                kind: r.kind,
                counts: r.counts.get(),
                engine: match r.kind {
                    SubscriberKind::Classic { id, .. } => self.mm.subscriber_stats(id).ok(),
                    SubscriberKind::Interval { .. } => None,
                },
            })
            .collect()
    }

    /// The event log shared by this address space and its subscribers.
    pub fn log(&self) -> Arc<TraceLog> {
        Arc::clone(&self.log)
    }

    /// A copy of the event log.
    pub fn trace(&self) -> Vec<TraceEvent> {
        self.log.events()
    }

    // --- inspection -----------------------------------------------------------------------

    /// The page-table entry of the page containing `addr`, without faulting.
    pub fn lookup(&self, addr: u64) -> Option<Pte> {
        self.state.lock().pt.get(vpn_of(addr))
    }

    /// The entry of virtual page `vpn`, without faulting.
    pub fn lookup_vpn(&self, vpn: u64) -> Option<Pte> {
        self.state.lock().pt.get(vpn)
    }

    /// Every mapped page, in page order.
    pub fn page_table(&self) -> Vec<(u64, Pte)> {
        self.state.lock().pt.iter().collect()
    }

    /// Every VMA, in address order.
    pub fn vmas(&self) -> Vec<Vma> {
        self.state.lock().vmas.iter().copied().collect()
    }

    /// The reference count of `frame` (0 if free).
    pub fn frame_refcount(&self, frame: FrameId) -> u32 {
        self.frames.lock().refcount(frame)
    }

    /// Frames referenced by any address space sharing this allocator (parent and children).
    pub fn live_frames(&self) -> usize {
        self.frames.lock().live()
    }

    /// Whether the process exited.
    pub fn is_exited(&self) -> bool {
        self.state.lock().exited
    }

    /// Whether the OOM killer should skip this address space (`MMF_OOM_SKIP`).
    pub fn oom_skip(&self) -> bool {
        self.state.lock().oom_skip
    }

    /// Whether the OOM reaper has started on it (`MMF_UNSTABLE`).
    pub fn is_unstable(&self) -> bool {
        self.state.lock().unstable
    }

    // --- helpers --------------------------------------------------------------------------

    fn op(&self, name: &str, start: u64, end: u64) {
        if let Ok(range) = Range::new(start, end) {
            self.log.record(name, TraceKind::Operation, range, None);
        }
    }

    /// Validates and page-aligns `[addr, addr + len)`; returns `(start, end)`.
    fn check_range(addr: u64, len: u64) -> Result<(u64, u64), SimError> {
        if addr % PAGE_SIZE != 0 {
            return Err(SimError::Misaligned { addr });
        }
        if len == 0 {
            return Err(SimError::ZeroLength { addr });
        }
        let rounded = len
            .checked_add(PAGE_SIZE - 1)
            .map(|l| l & !(PAGE_SIZE - 1))
            .ok_or(SimError::AddressOverflow { addr, len })?;
        let end = addr
            .checked_add(rounded)
            .ok_or(SimError::AddressOverflow { addr, len })?;
        Ok((addr, end))
    }

    fn locked_state(&self) -> Result<MutexGuard<'_, State>, SimError> {
        let state = self.state.lock();
        state.check_alive()?;
        Ok(state)
    }

    /// Brackets `change` with a blockable invalidation of `range`, flushing the secondary TLBs
    /// after the change, inside the window.
    fn invalidate<R>(
        &self,
        range: Range,
        event: Event,
        change: impl FnOnce(&mut State, &mut Frames) -> R,
    ) -> Result<R, SimError> {
        let guard = self.mm.invalidate_start(range, event)?;
        let result = {
            let mut state = self.state.lock();
            let mut frames = self.frames.lock();
            change(&mut state, &mut frames)
        };
        self.mm.arch_invalidate_secondary_tlbs(range);
        guard.end();
        Ok(result)
    }

    /// Removes the entries (and swap entries) of pages `[first, end)` and drops their frame
    /// references.
    fn zap(state: &mut State, frames: &mut Frames, first: u64, end: u64) -> usize {
        state.swap.retain(|vpn, _| *vpn < first || *vpn >= end);
        let removed = state.pt.remove_range(first, end);
        for (_, pte) in &removed {
            frames.put(pte.frame);
        }
        removed.len()
    }

    // --- operations -----------------------------------------------------------------------

    /// Maps `len` bytes (rounded up to pages). With `addr`, the mapping is fixed and must not
    /// overlap an existing one (`MAP_FIXED_NOREPLACE`; [`mmap_fixed`](Self::mmap_fixed)
    /// replaces instead); without, the lowest free gap at or above [`MMAP_BASE`] is used. Fires
    /// no event. A shared anonymous mapping gets a new shmem object. Returns the start address.
    ///
    /// # Errors
    ///
    /// [`SimError::InvalidProtection`], [`SimError::Misaligned`] (address or file offset),
    /// [`SimError::ZeroLength`], [`SimError::AddressOverflow`], [`SimError::Overlap`],
    /// [`SimError::NoSpace`], [`SimError::Exited`].
    pub fn mmap(
        &self,
        addr: Option<u64>,
        len: u64,
        prot: Prot,
        backing: Backing,
        sharing: Sharing,
    ) -> Result<u64, SimError> {
        let placement = addr.map_or(Placement::Anywhere, Placement::FixedNoReplace);
        self.map(placement, len, prot, backing, sharing)
    }

    /// `mmap(addr, len, prot, MAP_FIXED | ...)`: maps `[addr, addr + len)`, replacing whatever
    /// is mapped there in one step, as Linux does: if any VMA overlaps the range, one `Unmap`
    /// over the whole range brackets the zap of the old pages, the removal of the old VMAs and
    /// the insertion of the new one, all under one hold of the mmap lock (no other task sees
    /// the range empty). Over free space it fires nothing. Returns `addr`.
    ///
    /// # Errors
    ///
    /// As [`mmap`](Self::mmap), except [`SimError::Overlap`] and [`SimError::NoSpace`];
    /// [`SimError::Engine`].
    pub fn mmap_fixed(
        &self,
        addr: u64,
        len: u64,
        prot: Prot,
        backing: Backing,
        sharing: Sharing,
    ) -> Result<u64, SimError> {
        self.map(Placement::FixedReplace(addr), len, prot, backing, sharing)
    }

    fn map(
        &self,
        placement: Placement,
        len: u64,
        prot: Prot,
        backing: Backing,
        sharing: Sharing,
    ) -> Result<u64, SimError> {
        let prot = prot.validate()?;
        if let Backing::File { offset, .. } = backing {
            if offset % PAGE_SIZE != 0 {
                return Err(SimError::Misaligned { addr: offset });
            }
        }
        let _mmap = self.mmap_lock.lock();
        let mut state = self.locked_state()?;
        let (start, end) = match placement {
            Placement::FixedNoReplace(a) | Placement::FixedReplace(a) => {
                let (start, end) = Self::check_range(a, len)?;
                if let (Placement::FixedNoReplace(_), Some(v)) =
                    (placement, state.vmas.overlapping(start, end).first())
                {
                    return Err(SimError::Overlap {
                        start,
                        end,
                        existing_start: v.start,
                        existing_end: v.end,
                    });
                }
                (start, end)
            }
            Placement::Anywhere => {
                let (_, end) = Self::check_range(MMAP_BASE, len)?;
                let rounded = end - MMAP_BASE;
                let start = state
                    .vmas
                    .find_gap(MMAP_BASE, rounded)
                    .ok_or(SimError::NoSpace { len })?;
                (start, start + rounded)
            }
        };
        let shmem = (backing == Backing::Anonymous && sharing == Sharing::Shared)
            .then(|| (self.frames.lock().new_shmem(), 0));
        let vma = Vma {
            start,
            end,
            prot,
            backing,
            sharing,
            shmem,
        };
        let replaces = !state.vmas.overlapping(start, end).is_empty();
        if !replaces {
            state.vmas.insert(vma);
            drop(state);
            self.op("mmap", start, end);
            return Ok(start);
        }
        drop(state);
        self.op("mmap_fixed", start, end);
        self.invalidate(Range::new(start, end)?, Event::Unmap, |state, frames| {
            state.vmas.remove_range(start, end);
            Self::zap(state, frames, vpn_of(start), vpn_of(end));
            state.vmas.insert(vma);
        })?;
        Ok(start)
    }

    /// Anonymous private read-write memory: `mmap(NULL, len, PROT_READ|PROT_WRITE,
    /// MAP_PRIVATE|MAP_ANONYMOUS)`.
    ///
    /// # Errors
    ///
    /// As [`mmap`](Self::mmap).
    pub fn mmap_anon(&self, len: u64) -> Result<u64, SimError> {
        self.mmap(
            None,
            len,
            Prot::READ_WRITE,
            Backing::Anonymous,
            Sharing::Private,
        )
    }

    /// Unmaps `[addr, addr + len)`: if any VMA overlaps it, one `Unmap` over the whole range
    /// (Linux's `unmap_vmas` covers the requested range, holes included); unmapping only holes
    /// succeeds and fires nothing, as in Linux.
    ///
    /// # Errors
    ///
    /// [`SimError::Misaligned`], [`SimError::ZeroLength`], [`SimError::AddressOverflow`],
    /// [`SimError::Exited`], [`SimError::Engine`].
    pub fn munmap(&self, addr: u64, len: u64) -> Result<(), SimError> {
        let (start, end) = Self::check_range(addr, len)?;
        let _mmap = self.mmap_lock.lock();
        if self.locked_state()?.vmas.overlapping(start, end).is_empty() {
            return Ok(());
        }
        self.op("munmap", start, end);
        self.invalidate(Range::new(start, end)?, Event::Unmap, |state, frames| {
            state.vmas.remove_range(start, end);
            Self::zap(state, frames, vpn_of(start), vpn_of(end));
        })
    }

    /// `madvise(MADV_DONTNEED)`: drops the pages of `[addr, addr + len)`, one `Clear` per VMA
    /// piece (`zap_page_range_single`). As Linux's `madvise_walk_vmas`, a hole does not stop
    /// the walk: every mapped piece is dropped, and then the call fails.
    ///
    /// # Errors
    ///
    /// [`SimError::Unmapped`] with the first hole (Linux's `ENOMEM`), after every mapped piece
    /// was dropped; the range errors.
    pub fn madvise_dontneed(&self, addr: u64, len: u64) -> Result<(), SimError> {
        let (start, end) = Self::check_range(addr, len)?;
        let _mmap = self.mmap_lock.lock();
        let (pieces, hole) = {
            let state = self.locked_state()?;
            (
                state.vmas.overlapping(start, end),
                state.vmas.first_hole(start, end),
            )
        };
        self.op("madvise_dontneed", start, end);
        for piece in pieces {
            let (s, e) = (piece.start.max(start), piece.end.min(end));
            self.invalidate(Range::new(s, e)?, Event::Clear, |state, frames| {
                Self::zap(state, frames, vpn_of(s), vpn_of(e));
            })?;
        }
        hole.map_or(Ok(()), |addr| Err(SimError::Unmapped { addr }))
    }

    /// `mprotect`: sets the protection of `[addr, addr + len)`, VMA piece by VMA piece, as
    /// Linux's `do_mprotect_pkey`: the pieces before the first hole are changed, then the call
    /// fails (a hole at `addr` changes nothing). Each changed piece with a populated page fires
    /// one `ProtectionVma` over the piece (Linux starts lazily, at the first populated page
    /// table of each VMA). Removing write clears the entries' writable bit; `PROT_NONE` makes
    /// them inaccessible; adding write leaves them to the next write fault.
    ///
    /// # Errors
    ///
    /// [`SimError::InvalidProtection`] (nothing changed); [`SimError::Unmapped`] with the first
    /// hole (Linux's `ENOMEM`), after the pieces before it were changed; the range errors.
    pub fn mprotect(&self, addr: u64, len: u64, prot: Prot) -> Result<(), SimError> {
        let prot = prot.validate()?;
        let (start, end) = Self::check_range(addr, len)?;
        let _mmap = self.mmap_lock.lock();
        let (pieces, hole) = {
            let state = self.locked_state()?;
            let hole = state.vmas.first_hole(start, end);
            let before_hole = hole.unwrap_or(end);
            let pieces: Vec<(u64, u64, bool)> = state
                .vmas
                .overlapping(start, before_hole)
                .into_iter()
                .map(|v| {
                    let (s, e) = (v.start.max(start), v.end.min(before_hole));
                    (s, e, state.pt.any_in(vpn_of(s), vpn_of(e)))
                })
                .collect();
            (pieces, hole)
        };
        self.op("mprotect", start, end);
        for (s, e, populated) in pieces {
            let change = |state: &mut State| {
                state.vmas.protect(s, e, prot);
                state.pt.update_range(vpn_of(s), vpn_of(e), |pte| {
                    pte.writable &= prot.write;
                    pte.accessible = prot.read || prot.exec;
                });
            };
            if populated {
                self.invalidate(Range::new(s, e)?, Event::ProtectionVma, |state, _| {
                    change(state);
                })?;
            } else {
                change(&mut self.state.lock());
            }
        }
        hole.map_or(Ok(()), |addr| Err(SimError::Unmapped { addr }))
    }

    /// `fork`: a child address space (new hub, same policy, no subscribers, same frame
    /// allocator and trace log). Shared VMAs are shared as they are; for each private
    /// (copy-on-write) VMA with populated pages, the parent fires `ProtectionPage` over the VMA
    /// and write-protects its entries, and the child maps the same frames read-only.
    ///
    /// # Errors
    ///
    /// [`SimError::Exited`], [`SimError::Engine`].
    pub fn fork(&self) -> Result<SimMm, SimError> {
        let _mmap = self.mmap_lock.lock();
        let vmas: Vec<Vma> = self.locked_state()?.vmas.iter().copied().collect();
        let child = SimMm::with_parts(
            Mm::with_policy(self.policy()),
            Arc::clone(&self.frames),
            Arc::clone(&self.log),
        );
        let mut child_state = State::default();
        for vma in vmas {
            child_state.vmas.insert(vma);
            let (first, end) = (vpn_of(vma.start), vpn_of(vma.end));
            let copy = |state: &mut State, frames: &mut Frames, child: &mut State| {
                child
                    .swap
                    .extend(state.swap.range(first..end).map(|(v, w)| (*v, *w)));
                for (vpn, pte) in state.pt.range(first, end) {
                    frames.get(pte.frame);
                    let writable = pte.writable && !vma.is_cow_mapping();
                    child.pt.set(
                        vpn,
                        Pte {
                            writable,
                            young: false,
                            ..pte
                        },
                    );
                }
                if vma.is_cow_mapping() {
                    state
                        .pt
                        .update_range(first, end, |pte| pte.writable = false);
                }
            };
            // Only pages of their own need the write-protect: the zero page is mapped
            // read-only already.
            let populated = self
                .state
                .lock()
                .pt
                .range(first, end)
                .iter()
                .any(|(_, pte)| !pte.frame.is_zero_page());
            if vma.is_cow_mapping() && populated {
                self.op("fork", vma.start, vma.end);
                let range = Range::new(vma.start, vma.end)?;
                self.invalidate(range, Event::ProtectionPage, |state, frames| {
                    copy(state, frames, &mut child_state);
                })?;
            } else {
                let mut state = self.state.lock();
                let mut frames = self.frames.lock();
                copy(&mut state, &mut frames, &mut child_state);
            }
        }
        *child.state.lock() = child_state;
        Ok(child)
    }

    /// `mremap(old_addr, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr)` without growth:
    /// moves `[old_addr, old_addr + len)`, which must lie inside one VMA, to `new_addr`, with
    /// its pages. As Linux's `MREMAP_FIXED`, whatever is mapped at the destination is unmapped
    /// first (one `Unmap` over the destination, as `munmap` fires it); then the move fires
    /// `Unmap` over the old range (`move_page_tables`). Returns `new_addr`.
    ///
    /// # Errors
    ///
    /// Checked before anything changes: [`SimError::Unmapped`] (nothing at `old_addr`; Linux's
    /// `EFAULT`), [`SimError::NotOneMapping`] (the source runs past its VMA, over a hole or
    /// into another VMA; `EFAULT`), [`SimError::Overlap`] (source and destination overlap;
    /// `EINVAL`), and the range errors.
    pub fn mremap(&self, old_addr: u64, len: u64, new_addr: u64) -> Result<u64, SimError> {
        let (old_start, old_end) = Self::check_range(old_addr, len)?;
        let (new_start, new_end) = Self::check_range(new_addr, len)?;
        let _mmap = self.mmap_lock.lock();
        let destination_in_use = {
            let state = self.locked_state()?;
            let source = *state
                .vmas
                .find(old_start)
                .ok_or(SimError::Unmapped { addr: old_start })?;
            if source.end < old_end {
                return Err(SimError::NotOneMapping {
                    addr: old_addr,
                    len,
                });
            }
            if new_start < old_end && old_start < new_end {
                return Err(SimError::Overlap {
                    start: new_start,
                    end: new_end,
                    existing_start: old_start,
                    existing_end: old_end,
                });
            }
            !state.vmas.overlapping(new_start, new_end).is_empty()
        };
        if destination_in_use {
            self.op("munmap", new_start, new_end);
            self.invalidate(
                Range::new(new_start, new_end)?,
                Event::Unmap,
                |state, frames| {
                    state.vmas.remove_range(new_start, new_end);
                    Self::zap(state, frames, vpn_of(new_start), vpn_of(new_end));
                },
            )?;
        }
        self.op("mremap", old_start, old_end);
        self.invalidate(Range::new(old_start, old_end)?, Event::Unmap, |state, _| {
            let moved = state.vmas.remove_range(old_start, old_end);
            let piece = moved[0];
            state.vmas.insert(Vma {
                start: new_start,
                end: new_end,
                ..piece
            });
            let delta = vpn_of(new_start).wrapping_sub(vpn_of(old_start));
            for (vpn, pte) in state.pt.remove_range(vpn_of(old_start), vpn_of(old_end)) {
                state.pt.set(vpn.wrapping_add(delta), pte);
            }
            let swapped: Vec<(u64, u64)> = state
                .swap
                .range(vpn_of(old_start)..vpn_of(old_end))
                .map(|(v, w)| (*v, *w))
                .collect();
            for (vpn, word) in swapped {
                state.swap.remove(&vpn);
                state.swap.insert(vpn.wrapping_add(delta), word);
            }
        })?;
        Ok(new_start)
    }

    /// Migrates the populated pages of `[addr, addr + len)` to new frames (each new frame
    /// holds the old one's word), VMA piece by VMA piece up to the first hole:
    ///
    /// * the kernel's own migration (`owner` is `None`: compaction, NUMA balancing,
    ///   `move_pages`) fires one `Clear` per moved page, as `try_to_migrate_one` does; the zero
    ///   page is not migrated;
    /// * a device's migration (`Some(owner)`: `migrate_vma_setup`) fires one
    ///   `Migrate { owner }` over each VMA piece, as `migrate_vma_collect` does, and moves only
    ///   anonymous pages: private anonymous memory and the copy-on-write copies in private
    ///   file mappings (a zero page becomes a fresh zeroed frame, writable if the VMA is);
    ///   page-cache pages (shared or private file, shmem) stay where they are, as Linux's
    ///   `migrate_vma_pages` leaves them.
    ///
    /// Pages of the page cache, or that another mapping also references, are skipped (the
    /// simulator has no reverse map). Unpopulated pages stay unpopulated.
    ///
    /// # Errors
    ///
    /// [`SimError::Unmapped`] with the first hole, after the pieces before it were migrated
    /// (the walk stops there, as a driver's loop over VMAs and `mbind`'s page walk stop);
    /// the range errors.
    pub fn migrate(
        &self,
        addr: u64,
        len: u64,
        owner: Option<Owner>,
    ) -> Result<MigrateReport, SimError> {
        let (start, end) = Self::check_range(addr, len)?;
        let _mmap = self.mmap_lock.lock();
        let (pieces, hole) = {
            let state = self.locked_state()?;
            let hole = state.vmas.first_hole(start, end);
            let pieces: Vec<Vma> = state
                .vmas
                .overlapping(start, hole.unwrap_or(end))
                .into_iter()
                .filter_map(|v| v.clip(start, hole.unwrap_or(end)))
                .collect();
            (pieces, hole)
        };
        self.op("migrate", start, end);
        let mut report = MigrateReport::default();
        for piece in pieces {
            let (movable, skipped): (Vec<_>, Vec<_>) = {
                let state = self.state.lock();
                let frames = self.frames.lock();
                state
                    .pt
                    .range(vpn_of(piece.start), vpn_of(piece.end))
                    .into_iter()
                    .partition(|(_, pte)| {
                        // Only anonymous pages move: page-cache (file and shmem) pages stay, as
                        // in Linux's `migrate_vma_pages`; the kernel's own migration does not
                        // move the zero page, a device's replaces it with a zeroed page.
                        if pte.frame.is_zero_page() {
                            owner.is_some()
                        } else {
                            frames.refcount(pte.frame) == 1 && !frames.is_page_cache(pte.frame)
                        }
                    })
            };
            report
                .skipped
                .extend(skipped.into_iter().map(|(vpn, _)| vpn));
            let move_page = |state: &mut State, frames: &mut Frames, vpn: u64| {
                let pte = state.pt.get_mut(vpn)?;
                let new = frames.alloc_copy(pte.frame);
                if pte.frame.is_zero_page() {
                    pte.writable = piece.prot.write;
                }
                let old = std::mem::replace(&mut pte.frame, new);
                frames.put(old);
                Some((vpn, old, new))
            };
            match owner {
                None => {
                    for (vpn, _) in movable {
                        let moved = self.invalidate(
                            page_range(vpn, vpn + 1),
                            Event::Clear,
                            |state, frames| move_page(state, frames, vpn),
                        )?;
                        report.moved.extend(moved);
                    }
                }
                Some(owner) => {
                    let range = Range::new(piece.start, piece.end)?;
                    let moved =
                        self.invalidate(range, Event::Migrate { owner }, |state, frames| {
                            movable
                                .iter()
                                .filter_map(|(vpn, _)| move_page(state, frames, *vpn))
                                .collect::<Vec<_>>()
                        })?;
                    report.moved.extend(moved);
                }
            }
        }
        hole.map_or(Ok(report), |addr| Err(SimError::Unmapped { addr }))
    }

    /// One reclaim pass over `[addr, addr + len)`, like `madvise(MADV_PAGEOUT)`: for each
    /// populated page, the primary accessed bit is tested and cleared and the secondary MMUs
    /// are asked through [`Mm::clear_flush_young`]; a page that neither found young is evicted
    /// with its own `Clear` (a private page goes to swap and comes back with its word on the
    /// next fault; a page-cache page stays cached). Two passes with an access in between show page aging. The zero
    /// page is not on any LRU list and is never scanned. As every `madvise`, a hole does not
    /// stop the pass: every mapped page is scanned, then the call fails.
    ///
    /// # Errors
    ///
    /// [`SimError::Unmapped`] with the first hole (Linux's `ENOMEM`), after the pass over the
    /// mapped pages; the range errors.
    pub fn reclaim(&self, addr: u64, len: u64) -> Result<ReclaimReport, SimError> {
        let (start, end) = Self::check_range(addr, len)?;
        let _mmap = self.mmap_lock.lock();
        let (pages, hole) = {
            let state = self.locked_state()?;
            let pages: Vec<(u64, Pte)> = state
                .pt
                .range(vpn_of(start), vpn_of(end))
                .into_iter()
                .filter(|(_, pte)| !pte.frame.is_zero_page())
                .collect();
            (pages, state.vmas.first_hole(start, end))
        };
        self.op("reclaim", start, end);
        let mut report = ReclaimReport {
            scanned: pages.len(),
            ..ReclaimReport::default()
        };
        for (vpn, _) in pages {
            let range = page_range(vpn, vpn + 1);
            let primary_young = {
                let mut state = self.state.lock();
                match state.pt.get_mut(vpn) {
                    Some(pte) => std::mem::replace(&mut pte.young, false),
                    None => continue,
                }
            };
            let secondary_young = self.mm.clear_flush_young(range);
            if primary_young {
                report.referenced_primary.push(vpn);
            } else if secondary_young {
                report.referenced_secondary.push(vpn);
            } else {
                self.invalidate(range, Event::Clear, |state, frames| {
                    // A private page goes to swap with its word; a page-cache page stays in
                    // the cache.
                    let swapped = state
                        .pt
                        .get(vpn)
                        .filter(|pte| !frames.is_page_cache(pte.frame))
                        .map(|pte| frames.read(pte.frame));
                    Self::zap(state, frames, vpn, vpn + 1);
                    if let Some(word) = swapped {
                        state.swap.insert(vpn, word);
                    }
                })?;
                report.evicted.push(vpn);
            }
        }
        hole.map_or(Ok(report), |addr| Err(SimError::Unmapped { addr }))
    }

    /// Process exit (`exit_mmap`): [`Mm::release`] first, then one blockable `Unmap` per VMA
    /// while its pages are unmapped; then the address space is empty, marked exited and
    /// "OOM skip". A second call does nothing.
    ///
    /// # Errors
    ///
    /// [`SimError::Engine`] (e.g. called from inside a callback).
    pub fn exit(&self) -> Result<(), SimError> {
        let _mmap = self.mmap_lock.lock();
        let vmas: Vec<Vma> = {
            let state = self.state.lock();
            if state.exited {
                return Ok(());
            }
            state.vmas.iter().copied().collect()
        };
        self.log
            .record("exit", TraceKind::Operation, Range::ALL, None);
        self.mm.release()?;
        for vma in vmas {
            self.invalidate(
                Range::new(vma.start, vma.end)?,
                Event::Unmap,
                |state, frames| {
                    state.vmas.remove_range(vma.start, vma.end);
                    Self::zap(state, frames, vpn_of(vma.start), vpn_of(vma.end));
                },
            )?;
        }
        let mut state = self.state.lock();
        state.exited = true;
        state.oom_skip = true;
        Ok(())
    }

    /// A page fault by the process (or `get_user_pages` on its behalf): maps the page of
    /// `addr` if needed, breaks copy-on-write on a write, sets the accessed (and dirty) bits,
    /// and returns the entry.
    ///
    /// * A read of untouched private anonymous memory maps the shared zero page read-only
    ///   (`do_anonymous_page`); a write allocates a zeroed frame.
    /// * Shared mappings (file or shmem) map the page-cache page, so every process mapping the
    ///   same object sees the same frame; a private file mapping maps it read-only until the
    ///   first write copies it.
    /// * A write to a shared page, or to a private page nobody else references, only makes the
    ///   entry writable (no event); a write to the zero page or to a copy-on-write page shared
    ///   with another process or the page cache copies it under a `Clear` of that one page
    ///   (`wp_page_copy`).
    ///
    /// # Errors
    ///
    /// [`SimError::Unmapped`], [`SimError::AccessViolation`], [`SimError::Exited`],
    /// [`SimError::Engine`].
    pub fn fault(&self, addr: u64, access: Access) -> Result<Pte, SimError> {
        let _mmap = self.mmap_lock.lock();
        self.fault_locked(addr, access)
    }

    fn fault_locked(&self, addr: u64, access: Access) -> Result<Pte, SimError> {
        let vpn = vpn_of(addr);
        let (vma, pte) = {
            let state = self.locked_state()?;
            let vma = *state.vmas.find(addr).ok_or(SimError::Unmapped { addr })?;
            (vma, state.pt.get(vpn))
        };
        if !vma.prot.allows(access) {
            return Err(SimError::AccessViolation {
                addr,
                access,
                prot: vma.prot,
            });
        }
        let write = access == Access::Write;
        match pte {
            None => {
                let mut state = self.state.lock();
                let mut frames = self.frames.lock();
                let swapped = state.swap.remove(&vpn);
                let (frame, writable) = match (vma.cache_page(addr), vma.sharing, write) {
                    // A private page reclaim swapped out: swapped back in with its word.
                    _ if swapped.is_some() => {
                        let frame = frames.alloc();
                        frames.write(frame, swapped.unwrap_or_default());
                        (frame, vma.prot.write)
                    }
                    (None, _, false) => (FrameId::ZERO, false),
                    (None, _, true) => (frames.alloc(), vma.prot.write),
                    (Some((object, index)), Sharing::Shared, _) => {
                        (frames.cache_page(object, index), vma.prot.write)
                    }
                    (Some((object, index)), Sharing::Private, false) => {
                        (frames.cache_page(object, index), false)
                    }
                    // A private write to a file page nobody mapped yet: copy at once.
                    (Some((object, index)), Sharing::Private, true) => {
                        let cached = frames.cache_page(object, index);
                        let copy = frames.alloc_copy(cached);
                        frames.put(cached);
                        (copy, true)
                    }
                };
                let pte = Pte {
                    frame,
                    writable,
                    accessible: true,
                    young: true,
                    dirty: write,
                };
                state.pt.set(vpn, pte);
                Ok(pte)
            }
            Some(old) if write && !old.writable => {
                let reuse = {
                    let frames = self.frames.lock();
                    vma.is_shared()
                        || (!old.frame.is_zero_page()
                            && frames.refcount(old.frame) == 1
                            && !frames.is_page_cache(old.frame))
                };
                if reuse {
                    return Ok(self.touch_pte(vpn, |pte| pte.writable = true));
                }
                self.op("cow_fault", addr_of(vpn), addr_of(vpn + 1));
                self.invalidate(page_range(vpn, vpn + 1), Event::Clear, |state, frames| {
                    if let Some(pte) = state.pt.get_mut(vpn) {
                        let new = frames.alloc_copy(pte.frame);
                        let old = std::mem::replace(&mut pte.frame, new);
                        frames.put(old);
                        pte.writable = true;
                    }
                })?;
                Ok(self.touch_pte(vpn, |pte| pte.dirty = true))
            }
            Some(_) => Ok(self.touch_pte(vpn, |pte| pte.dirty |= write)),
        }
    }

    /// Faults the page of `addr` for `access` and reads (or, with `store`, writes) its word,
    /// under the mmap lock so that no operation changes the entry in between.
    fn access_word(&self, addr: u64, store: Option<u64>) -> Result<u64, SimError> {
        let _mmap = self.mmap_lock.lock();
        let access = if store.is_some() {
            Access::Write
        } else {
            Access::Read
        };
        let pte = self.fault_locked(addr, access)?;
        let mut frames = self.frames.lock();
        match store {
            Some(word) => {
                frames.write(pte.frame, word);
                Ok(word)
            }
            None => Ok(frames.read(pte.frame)),
        }
    }

    /// The word stored in `frame` (0 for the zero page and for a fresh or free frame).
    pub fn frame_word(&self, frame: FrameId) -> u64 {
        self.frames.lock().read(frame)
    }

    /// Stores `word` in `frame` directly, as a device with a writable mapping of it does. A
    /// store to the zero page or to a free frame is ignored.
    pub fn store_frame_word(&self, frame: FrameId, word: u64) {
        self.frames.lock().write(frame, word);
    }

    /// Marks the entry accessed (and applies `f`); returns it.
    fn touch_pte(&self, vpn: u64, f: impl FnOnce(&mut Pte)) -> Pte {
        let mut state = self.state.lock();
        let pte = state.pt.get_mut(vpn).expect("the faulted entry is present");
        pte.young = true;
        pte.accessible = true;
        f(pte);
        *pte
    }

    // --- for the OOM reaper ---------------------------------------------------------------

    /// Runs `pass` with the mmap lock held, if it can be taken without waiting.
    pub(crate) fn try_with_mmap_lock<R>(&self, pass: impl FnOnce() -> R) -> Option<R> {
        let _mmap = self.mmap_lock.try_lock()?;
        Some(pass())
    }

    /// Runs `pass` with the mmap lock held, waiting for it.
    pub(crate) fn with_mmap_lock<R>(&self, pass: impl FnOnce() -> R) -> R {
        let _mmap = self.mmap_lock.lock();
        pass()
    }

    pub(crate) fn set_oom_skip(&self) {
        self.state.lock().oom_skip = true;
    }

    /// One `__oom_reap_task_mm` pass; the caller holds the mmap lock.
    pub(crate) fn reap_pass(&self) -> ReapPass {
        let vmas: Vec<Vma> = {
            let mut state = self.state.lock();
            state.unstable = true;
            state.vmas.iter().copied().collect()
        };
        let mut pass = ReapPass::default();
        for vma in vmas {
            let range = Range::new(vma.start, vma.end).expect("a VMA is never empty");
            // Linux reaps only anonymous (`vma_is_anonymous`) or private (`!VM_SHARED`) VMAs;
            // a shared anonymous VMA is a shmem mapping, which is neither.
            if vma.is_shared() {
                pass.skipped.push(range);
                continue;
            }
            self.op("oom_reap", vma.start, vma.end);
            match self.mm.invalidate_start_nonblock(range, Event::Unmap) {
                Ok(guard) => {
                    pass.pages_unmapped += {
                        let mut state = self.state.lock();
                        let mut frames = self.frames.lock();
                        Self::zap(&mut state, &mut frames, vpn_of(vma.start), vpn_of(vma.end))
                    };
                    self.mm.arch_invalidate_secondary_tlbs(range);
                    guard.end();
                    pass.reaped.push(range);
                }
                Err(mmnotify::Error::StartRefused { refusers, .. }) => {
                    pass.refused.push((range, refusers));
                }
                Err(_) => pass.refused.push((range, Vec::new())),
            }
        }
        pass
    }
}

/// A task (thread) of the simulated process, touching memory.
#[derive(Debug)]
pub struct Task<'a> {
    sim: &'a SimMm,
    name: String,
}

impl Task<'_> {
    /// The task's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Loads from `addr`; returns the frame read.
    ///
    /// # Errors
    ///
    /// As [`SimMm::fault`].
    pub fn read(&self, addr: u64) -> Result<FrameId, SimError> {
        self.sim.fault(addr, Access::Read).map(|p| p.frame)
    }

    /// Stores to `addr`; returns the frame written.
    ///
    /// # Errors
    ///
    /// As [`SimMm::fault`].
    pub fn write(&self, addr: u64) -> Result<FrameId, SimError> {
        self.sim.fault(addr, Access::Write).map(|p| p.frame)
    }

    /// Loads the word at the page of `addr` (faulting it in for reading).
    ///
    /// # Errors
    ///
    /// As [`SimMm::fault`].
    pub fn load(&self, addr: u64) -> Result<u64, SimError> {
        self.sim.access_word(addr, None)
    }

    /// Stores `word` at the page of `addr` (faulting it in for writing, which breaks
    /// copy-on-write and copies the zero page).
    ///
    /// # Errors
    ///
    /// As [`SimMm::fault`].
    pub fn store(&self, addr: u64, word: u64) -> Result<(), SimError> {
        self.sim.access_word(addr, Some(word)).map(|_| ())
    }

    /// Touches every page of `[addr, addr + len)`; returns the number of pages.
    ///
    /// # Errors
    ///
    /// As [`SimMm::fault`], for the first page that fails.
    pub fn touch(&self, addr: u64, len: u64, access: Access) -> Result<usize, SimError> {
        let (start, end) = SimMm::check_range(addr, len)?;
        let mut pages = 0;
        for vpn in vpn_of(start)..vpn_of(end) {
            self.sim.fault(addr_of(vpn), access)?;
            pages += 1;
        }
        Ok(pages)
    }
}
