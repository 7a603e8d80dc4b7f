//! The registration cache: `get` → a region guard; dropping the guard is the put.
//!
//! # The hit path (no lock but the index's read lock, no system call)
//!
//! 1. Under the index's read lock, find a linked region that contains the request with at
//!    least the access asked for; take a holder's reference with a CAS that fails if the
//!    region is invalid.
//! 2. Ask the region's interval, lock-free, whether anything may have invalidated it since it
//!    was admitted (`check_retry` against the sequence of its admission). For the watcher this
//!    also answers `true` while a message read from the userfaultfd is not yet delivered: a
//!    `munmap` that has returned has had its message read, so either the region's sequence
//!    already moved, or a delivery is in flight. In the second case the hit waits for the
//!    delivery (`settle`) and the region's invalid bit decides. Either way a hit after an
//!    invalidating call returned is impossible.
//! 3. Blind memory cached under [`BlindSpotPolicy::ValidateFrames`] compares its page frames.
//!
//! # The miss path (UCX's slow path, with the interval collision protocol)
//!
//! 1. In merge mode, grow the request to cover the valid cached regions it overlaps or
//!    touches (UCX merges; the absorbed regions are retired when the new one is linked).
//! 2. Prepare: with the watcher, `watch` the range (a `MAP_FIXED` mapping at a watched address
//!    is not registered with the kernel, so every miss watches) and classify the memory from
//!    /proc/self/maps; blind memory follows the [`BlindSpotPolicy`].
//! 3. Insert the region's interval subscription, `read_begin`, then call the registrar with
//!    no lock held.
//! 4. Take the index's write lock (the lock the invalidation callback takes around `set_seq`)
//!    and `read_retry`: on a collision the fresh registration may pin pages that are no longer
//!    mapped there; it is deregistered (after unlocking) and the miss starts over. Otherwise
//!    evict unused regions in LRU order until the limits hold, retire absorbed regions, link.
//!
//! Deregistrations happen after the lock is released: at the last put of an invalidated
//! region, after eviction and retirement, for collided registrations, and for regions the
//! invalidation callback queued (flushed at the start of the next `get`, by [`Cache::flush`],
//! and at drop).

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::sync::{BigReaderLock, BrReadGuard, BrWriteGuard, Mutex};

use mmnotify::{IntervalCtx, SubscriberId};

use crate::blind::{self, BlindReason, BlindSpotPolicy, FrameSnapshot};
use crate::error::{panic_message, Error, Result};
use crate::guard::RegionGuard;
use crate::range::{Access, PageRange};
use crate::region::{Region, RegionWatch, INVALID, REFS};
use crate::registrar::Registrar;
use crate::source::EventSource;
use crate::stats::{Counters, Stats};
use crate::watched::{Forget, WatchedSet};

/// How the cache behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Merge a miss with the cached regions it overlaps or touches into one registration
    /// (UCX's behaviour; default `true`).
    pub merge: bool,
    /// At most this many cached regions (unused ones are evicted in LRU order to make room).
    pub max_regions: usize,
    /// At most this many cached bytes.
    pub max_bytes: u64,
    /// What to do with memory the watcher cannot fully see.
    pub blind_spots: BlindSpotPolicy,
    /// Registration attempts before a miss gives up with [`Error::Unstable`] (each attempt
    /// that collides with an invalidation is thrown away).
    pub max_attempts: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            merge: true,
            max_regions: usize::MAX,
            max_bytes: u64::MAX,
            blind_spots: BlindSpotPolicy::Uncached,
            max_attempts: 64,
        }
    }
}

impl Config {
    /// Sets [`Config::merge`].
    pub fn merge(mut self, merge: bool) -> Self {
        self.merge = merge;
        self
    }

    /// Sets [`Config::max_regions`].
    pub fn max_regions(mut self, n: usize) -> Self {
        self.max_regions = n;
        self
    }

    /// Sets [`Config::max_bytes`].
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n;
        self
    }

    /// Sets [`Config::blind_spots`].
    pub fn blind_spots(mut self, policy: BlindSpotPolicy) -> Self {
        self.blind_spots = policy;
        self
    }

    /// Sets [`Config::max_attempts`] (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
}

type RegionRef<R> = Arc<Region<<R as Registrar>::Handle>>;

/// A multiplicative hash for page-aligned addresses (the default SipHash costs more than the
/// rest of a hit).
#[derive(Clone, Copy, Default)]
struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (x >> 12)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

type AddrMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<AddrHasher>>;

/// The linked regions, by (start, id); plus, for the common hit whose request starts where a
/// region starts, one region per start address in a hash map (a B-tree range query costs
/// about half of a hit otherwise).
pub(crate) struct Index<H> {
    map: BTreeMap<(u64, u64), Arc<Region<H>>>,
    by_start: AddrMap<Arc<Region<H>>>,
    bytes: u64,
    /// The longest region ever linked: a region containing `addr` starts at most this far
    /// below it.
    max_len: u64,
}

impl<H> Index<H> {
    fn link(&mut self, r: &Arc<Region<H>>) {
        r.linked.store(true, Ordering::Relaxed);
        self.bytes += r.range.len();
        self.max_len = self.max_len.max(r.range.len());
        self.map.insert((r.range.start(), r.id), Arc::clone(r));
        self.by_start.insert(r.range.start(), Arc::clone(r));
    }

    pub(crate) fn unlink(&mut self, r: &Region<H>) {
        if r.linked.swap(false, Ordering::Relaxed) {
            let start = r.range.start();
            self.bytes -= r.range.len();
            self.map.remove(&(start, r.id));
            if self.by_start.get(&start).is_some_and(|x| x.id == r.id) {
                // Another region may start at the same address (without merging).
                match self.map.range((start, 0)..=(start, u64::MAX)).next() {
                    Some((_, other)) => {
                        self.by_start.insert(start, Arc::clone(other));
                    }
                    None => {
                        self.by_start.remove(&start);
                    }
                }
            }
        }
    }

    /// A linked region containing `want` with `access`, with a holder's reference taken.
    fn acquire(&self, want: PageRange, access: Access) -> Option<Arc<Region<H>>> {
        let fits = |r: &Arc<Region<H>>| {
            r.range.contains(&want) && r.access.includes(access) && r.try_acquire()
        };
        if let Some(r) = self.by_start.get(&want.start()) {
            if fits(r) {
                return Some(Arc::clone(r));
            }
        }
        self.around(want, false).find(|r| fits(r)).cloned()
    }

    /// Linked regions that overlap `range` (or touch it, with `touching`).
    fn around(&self, range: PageRange, touching: bool) -> impl Iterator<Item = &Arc<Region<H>>> {
        let lo = range.start().saturating_sub(self.max_len);
        self.map
            .range((lo, 0)..=(range.end(), u64::MAX))
            .map(|(_, r)| r)
            .filter(move |r| {
                if touching {
                    r.range.touches(&range)
                } else {
                    r.range.overlaps(&range)
                }
            })
    }
}

/// The state shared between the cache's users and its regions' invalidation callbacks.
pub(crate) struct Shared<R: Registrar> {
    registrar: R,
    source: EventSource,
    config: Config,
    index: BigReaderLock<Index<R::Handle>>,
    /// Invalidated unused regions awaiting deregistration (pushed under the index lock).
    garbage: Mutex<Vec<RegionRef<R>>>,
    garbage_hint: AtomicBool,
    /// The LRU clock: ticks at every put when `limited`.
    clock: AtomicU64,
    /// A region or byte limit is set (eviction may happen).
    limited: bool,
    /// With the watcher as source: the VMAs known to be watched, and the subscriber that
    /// forgets them.
    watched: Option<(Arc<WatchedSet>, SubscriberId)>,
    next_id: AtomicU64,
    pub(crate) counters: Counters,
}

impl<R: Registrar> Shared<R> {
    /// Whether this process is a fork of the one that built the cache's watcher (the
    /// watcher's fork probe: one load, no lock). A forked child must not take the cache's
    /// locks (a parent thread may have held one at the fork, and nobody will release it), wait
    /// for an epoch or a reader (the parent thread in it does not exist here), nor call the
    /// registrar (an inherited io_uring is the *parent's* ring: deregistering in the child
    /// would empty the parent's fixed-buffer slots). A plain `Mm` source has no fork notion:
    /// `false` (see SEMANTICS R9).
    #[inline]
    pub(crate) fn forked(&self) -> bool {
        match &self.source {
            EventSource::Watcher(w) => w.health() == mmnotify_uffd::Health::Forked,
            EventSource::Mm(_) => false,
        }
    }

    fn read(&self) -> BrReadGuard<'_, Index<R::Handle>> {
        self.index.read()
    }

    fn write(&self) -> BrWriteGuard<'_, Index<R::Handle>> {
        self.index.write()
    }

    /// The invalidation callback's work, under the index's write lock: bump the interval's
    /// sequence, mark the region invalid, unlink it, and queue it if nobody holds it. Returns
    /// the holders' callbacks to run once the lock is released.
    pub(crate) fn invalidated(
        &self,
        ctx: &IntervalCtx<'_>,
        region: Option<&RegionRef<R>>,
    ) -> Option<Vec<crate::region::OnInvalidate>> {
        let mut index = self.write();
        ctx.set_seq();
        let region = region?;
        let first_change = !region.changed.swap(true, Ordering::SeqCst);
        let prev = region.mark_invalid();
        if prev & INVALID == 0 {
            Counters::bump(&self.counters.invalidations);
            index.unlink(region);
            if prev & REFS == 0 {
                self.queue_garbage(Arc::clone(region));
            }
        }
        drop(index);
        first_change.then(|| region.take_callbacks())
    }

    fn queue_garbage(&self, region: RegionRef<R>) {
        self.garbage.lock().push(region);
        self.garbage_hint.store(true, Ordering::Release);
    }

    /// Deregisters, with no lock held; a panic is caught and counted.
    fn deregister(&self, region: &Region<R::Handle>) {
        region.interval.remove_deferred();
        self.release_registration(&region.handle, region.range);
    }

    fn release_registration(&self, handle: &R::Handle, range: PageRange) {
        let r = catch_unwind(AssertUnwindSafe(|| self.registrar.deregister(handle)));
        if r.is_err() {
            Counters::bump(&self.counters.deregistration_panics);
        }
        Counters::bump(&self.counters.deregistrations);
        self.counters
            .registered_bytes
            .fetch_sub(range.len(), Ordering::Relaxed);
    }

    fn register(&self, range: PageRange, access: Access) -> Result<R::Handle> {
        match catch_unwind(AssertUnwindSafe(|| self.registrar.register(range, access))) {
            Ok(Ok(h)) => {
                Counters::bump(&self.counters.registrations);
                self.counters
                    .registered_bytes
                    .fetch_add(range.len(), Ordering::Relaxed);
                Ok(h)
            }
            Ok(Err(source)) => {
                Counters::bump(&self.counters.registrar_errors);
                Err(Error::Registrar {
                    range,
                    access,
                    source,
                })
            }
            Err(payload) => {
                Counters::bump(&self.counters.registrar_panics);
                Err(Error::RegistrarPanicked {
                    range,
                    message: panic_message(&*payload),
                })
            }
        }
    }

    fn flush(&self) {
        if self.forked() {
            return;
        }
        if !self.garbage_hint.swap(false, Ordering::Acquire) {
            return;
        }
        let taken = std::mem::take(&mut *self.garbage.lock());
        for region in taken {
            self.deregister(&region);
        }
    }

    /// A holder's put.
    pub(crate) fn put(&self, region: &Region<R::Handle>) {
        if self.forked() {
            // Leaked: the registration belongs to the parent's registrar.
            return;
        }
        if self.limited {
            // Exact LRU order costs one shared increment per put: paid only when a limit can
            // make the cache evict.
            let now = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
            region.last_used.store(now, Ordering::Relaxed);
        }
        let prev = region.state.fetch_sub(1, Ordering::AcqRel);
        if prev & REFS == 1 && prev & INVALID != 0 {
            Counters::bump(&self.counters.deferred_deregistrations);
            self.deregister(region);
        }
    }

    /// The put of an uncached registration.
    pub(crate) fn put_uncached(&self, handle: &R::Handle, range: PageRange) {
        if self.forked() {
            return;
        }
        self.release_registration(handle, range);
    }

    /// Drops a holder's reference taken internally (not a user's put: no statistics).
    fn release_internal(&self, region: &Region<R::Handle>) {
        let prev = region.state.fetch_sub(1, Ordering::AcqRel);
        if prev & REFS == 1 && prev & INVALID != 0 {
            self.deregister(region);
        }
    }
}

/// A registration cache over the registrar `R`, kept coherent by an [`EventSource`].
///
/// ```no_run
/// use mmnotify_rcache::{Access, Cache, Config, FrameRegistrar};
///
/// let cache = Cache::with_watcher(FrameRegistrar::new(), Config::default())?;
/// let buf = vec![1u8; 1 << 16];
/// {
///     let region = cache.get(buf.as_ptr() as u64, buf.len() as u64, Access::READ)?;
///     println!("registered {} as {:?}", region.range(), region.handle());
/// } // the put
/// let again = cache.get(buf.as_ptr() as u64, buf.len() as u64, Access::READ)?; // a hit
/// assert_eq!(cache.stats().hits, 1);
/// # drop(again);
/// # Ok::<(), mmnotify_rcache::Error>(())
/// ```
pub struct Cache<R: Registrar> {
    shared: Arc<Shared<R>>,
}

impl<R: Registrar> std::fmt::Debug for Cache<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The result of looking for a cached region.
enum Lookup<R: Registrar> {
    Hit(RegionRef<R>),
    Miss,
}

impl<R: Registrar> Cache<R> {
    /// A cache over `registrar`, invalidated by `source`.
    pub fn new(registrar: R, source: EventSource, config: Config) -> Cache<R> {
        let watched = match &source {
            EventSource::Watcher(w) => {
                let set = Arc::new(WatchedSet::default());
                // Registration fails only on a released Mm (a shut-down watcher); the cache
                // then has no set and watches on every miss, whose `watch` fails closed.
                w.mm()
                    .register(Arc::new(Forget(set.clone())))
                    .ok()
                    .map(|id| (set, id))
            }
            EventSource::Mm(_) => None,
        };
        Cache {
            shared: Arc::new(Shared {
                registrar,
                source,
                config,
                index: BigReaderLock::new(Index {
                    map: BTreeMap::new(),
                    by_start: AddrMap::default(),
                    bytes: 0,
                    max_len: 0,
                }),
                garbage: Mutex::new(Vec::new()),
                garbage_hint: AtomicBool::new(false),
                clock: AtomicU64::new(1),
                limited: config.max_regions != usize::MAX || config.max_bytes != u64::MAX,
                watched,
                next_id: AtomicU64::new(1),
                counters: Counters::default(),
            }),
        }
    }

    /// A cache invalidated by the process's userfaultfd watcher (the default source).
    ///
    /// # Errors
    ///
    /// The watcher's creation errors, as [`Error::Watcher`].
    pub fn with_watcher(registrar: R, config: Config) -> Result<Cache<R>> {
        Ok(Cache::new(registrar, EventSource::watcher()?, config))
    }

    /// The registrar.
    pub fn registrar(&self) -> &R {
        &self.shared.registrar
    }

    /// The event source.
    pub fn source(&self) -> &EventSource {
        &self.shared.source
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// A registration covering `[addr, addr + len)` with at least `access`: a cached one when
    /// a valid region contains it, else a new one. Dropping the guard is the put.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyRange`], [`Error::RangeOverflow`], [`Error::Unmapped`] (with the watcher
    /// as source), [`Error::Registrar`] / [`Error::RegistrarPanicked`], [`Error::Full`],
    /// [`Error::Unstable`], and the source's errors ([`Error::Watcher`] when the watcher cannot
    /// vouch for the memory any more: shut down, failed, forked).
    pub fn get(&self, addr: u64, len: u64, access: Access) -> Result<RegionGuard<'_, R>> {
        if self.shared.forked() {
            // Before any lock, registrar or engine call (see `Shared::forked`).
            return Err(Error::Watcher(mmnotify_uffd::Error::Forked));
        }
        let want = PageRange::covering(addr, len)?;
        if self.shared.garbage_hint.load(Ordering::Relaxed) {
            self.shared.flush();
        }
        if let Lookup::Hit(region) = self.lookup(want, access)? {
            self.shared.counters.hits.add(1);
            return Ok(RegionGuard::cached(self, region));
        }
        self.miss(want, access)
    }

    fn lookup(&self, want: PageRange, access: Access) -> Result<Lookup<R>> {
        let found = {
            let index = self.shared.read();
            index.acquire(want, access)
        };
        let Some(region) = found else {
            return Ok(Lookup::Miss);
        };
        if region.interval.check_retry(&region.created) && !region.is_invalid() {
            // A delivery may be in flight: wait for it, then the invalid bit is exact for
            // every call that has returned.
            if let Err(e) = region.interval.settle() {
                let invalid = region.is_invalid();
                self.shared.release_internal(&region);
                return if invalid { Ok(Lookup::Miss) } else { Err(e) };
            }
        }
        if region.is_invalid() {
            self.shared.release_internal(&region);
            return Ok(Lookup::Miss);
        }
        if let Some(frames) = &region.frames {
            if !frames.still_current() {
                Counters::bump(&self.shared.counters.blind_validation_failures);
                self.retire(&region);
                self.shared.release_internal(&region);
                return Ok(Lookup::Miss);
            }
            Counters::bump(&self.shared.counters.blind_validated_hits);
        }
        Ok(Lookup::Hit(region))
    }

    /// Marks a linked region invalid and unlinks it (the cache's own decision).
    fn retire(&self, region: &RegionRef<R>) {
        let mut index = self.shared.write();
        let prev = region.mark_invalid();
        if prev & INVALID == 0 {
            index.unlink(region);
            if prev & REFS == 0 {
                self.shared.queue_garbage(Arc::clone(region));
            }
        }
    }

    fn miss(&self, want: PageRange, access: Access) -> Result<RegionGuard<'_, R>> {
        let shared = &self.shared;
        let config = shared.config;
        let mut unmerged = false;
        for _attempt in 0..config.max_attempts {
            // 1. The range to register.
            let (mut target, mut target_access, mut absorbed) = (want, access, 0u64);
            if config.merge && !unmerged {
                let index = shared.read();
                for r in index.around(want, true) {
                    if !r.is_invalid() {
                        target = target.union(&r.range);
                        target_access = target_access | r.access;
                        absorbed += 1;
                    }
                }
            }
            // 2. Subscribe and read_begin *before* the watcher registers the memory: a
            //    replacement after this point either happens before `watch` (and the new
            //    memory is what gets watched and pinned) or after it (and its event reaches
            //    this interval, so read_retry reports it). Watching first would leave a gap
            //    where a replaced, unwatched mapping gets pinned without any event.
            let watch = Arc::new(RegionWatch::<R> {
                region: OnceLock::new(),
                cache: Arc::downgrade(shared),
            });
            let interval = shared.source.subscribe(target, watch.clone())?;
            let seq = match interval.read_begin() {
                Ok(s) => s,
                Err(e) => {
                    interval.remove_deferred();
                    return Err(e);
                }
            };
            // 3. Watch and classify (falling back to the request alone if the merged range is
            //    no longer all mapped).
            let blind = match self.prepare(target) {
                Ok(b) => b,
                Err(Error::Unmapped { .. }) if target != want => {
                    interval.remove_deferred();
                    unmerged = true;
                    continue;
                }
                Err(e) => {
                    interval.remove_deferred();
                    return Err(e);
                }
            };
            let mut validate = false;
            if let Some(reason) = blind.clone() {
                match config.blind_spots {
                    BlindSpotPolicy::Trust => {}
                    BlindSpotPolicy::ValidateFrames if mmnotify_uffd::pagemap::pfns_visible() => {
                        validate = true;
                    }
                    _ => {
                        interval.remove_deferred();
                        return self.uncached(want, access, reason);
                    }
                }
            }
            // 4. Register with no lock held; under ValidateFrames, between two snapshots of
            //    the frames. Recording them only after registering would let a hole punch and
            //    refault in between pin frame X and record frame Y: every later hit would
            //    validate, and be stale. Equal snapshots mean the frames stayed put while the
            //    registrar pinned them (see R8 for the one interleaving this cannot exclude).
            let before = if validate {
                FrameSnapshot::take(target)
            } else {
                None
            };
            let handle = match shared.register(target, target_access) {
                Ok(h) => h,
                Err(e) => {
                    interval.remove_deferred();
                    return Err(e);
                }
            };
            let frames = if validate {
                let after = FrameSnapshot::take(target);
                match (before, blind.clone()) {
                    (Some(before), _) if after.as_ref() == Some(&before) => Some(before),
                    (_, Some(reason)) => {
                        // A page was not present before registering (first touch), or the
                        // frames moved while registering: which ones are pinned is unknown, so
                        // the registration cannot be validated later. It serves this use only.
                        interval.remove_deferred();
                        Counters::bump(&shared.counters.misses);
                        Counters::bump(&shared.counters.blind_uncached);
                        return Ok(RegionGuard::uncached(
                            self,
                            target,
                            target_access,
                            handle,
                            reason,
                        ));
                    }
                    // INVARIANT: `validate` is only set for blind memory.
                    (_, None) => None,
                }
            } else {
                None
            };
            let region = Arc::new(Region {
                id: shared.next_id.fetch_add(1, Ordering::Relaxed),
                range: target,
                access: target_access,
                handle,
                state: AtomicU64::new(1),
                last_used: AtomicU64::new(0),
                linked: AtomicBool::new(false),
                changed: AtomicBool::new(false),
                interval,
                created: seq,
                frames,
                on_invalidate: Mutex::new(Vec::new()),
            });
            let _ = watch.region.set(Arc::downgrade(&region));
            // 5. Commit under the lock the invalidation callback takes around set_seq.
            let mut victims = Vec::new();
            let outcome = {
                let mut index = shared.write();
                if region.interval.read_retry(seq) {
                    Commit::Collided
                } else {
                    match self.make_room(&mut index, &region, &mut victims) {
                        Err(e) => Commit::Refused(e),
                        Ok(()) => {
                            if config.merge {
                                let inside: Vec<_> = index
                                    .around(target, false)
                                    .filter(|r| target.contains(&r.range))
                                    .cloned()
                                    .collect();
                                for r in inside {
                                    let prev = r.mark_invalid();
                                    if prev & INVALID == 0 {
                                        index.unlink(&r);
                                        if prev & REFS == 0 {
                                            victims.push(r);
                                        }
                                    }
                                }
                            }
                            index.link(&region);
                            Commit::Linked
                        }
                    }
                }
            };
            for v in &victims {
                shared.deregister(v);
            }
            match outcome {
                Commit::Linked => {
                    Counters::bump(&shared.counters.misses);
                    if absorbed > 0 {
                        Counters::bump(&shared.counters.merges);
                    }
                    return Ok(RegionGuard::cached(self, region));
                }
                Commit::Collided => {
                    Counters::bump(&shared.counters.collisions);
                    region.mark_invalid();
                    shared.release_internal(&region);
                }
                Commit::Refused(e) => {
                    region.mark_invalid();
                    shared.release_internal(&region);
                    return Err(e);
                }
            }
        }
        Err(Error::Unstable {
            range: want,
            attempts: config.max_attempts,
        })
    }

    /// Makes sure the watcher sees `range` (skipping `watch` when remembered VMAs cover it,
    /// see `watched.rs`) and classifies it from /proc/self/maps. Called after `read_begin`.
    fn prepare(&self, range: PageRange) -> Result<Option<BlindReason>> {
        let Some((set, _)) = &self.shared.watched else {
            return if self.shared.source.is_real_memory() {
                let w = self.shared.source.watch(range)?;
                blind::classify(range, &w.unwatched)
            } else {
                Ok(None)
            };
        };
        let unwatched = if set.covers(range) {
            Vec::new()
        } else {
            let epoch = set.epoch();
            let watched = self.shared.source.watch(range)?;
            set.remember(epoch, watched.vmas);
            watched.unwatched
        };
        blind::classify(range, &unwatched)
    }

    /// Registers blind memory for one use.
    fn uncached(
        &self,
        want: PageRange,
        access: Access,
        reason: BlindReason,
    ) -> Result<RegionGuard<'_, R>> {
        let handle = self.shared.register(want, access)?;
        Counters::bump(&self.shared.counters.misses);
        Counters::bump(&self.shared.counters.blind_uncached);
        Ok(RegionGuard::uncached(self, want, access, handle, reason))
    }

    /// Evicts unused regions, least recently used first, until `region` fits; under the
    /// index's write lock. Nothing is evicted unless evicting makes room: the victims are
    /// chosen first, and if every unused region together cannot free enough, the result is
    /// [`Error::Full`] with the cache untouched.
    fn make_room(
        &self,
        index: &mut Index<R::Handle>,
        region: &RegionRef<R>,
        victims: &mut Vec<RegionRef<R>>,
    ) -> Result<()> {
        let config = &self.shared.config;
        let len = region.range.len();
        let fits_with = |regions: usize, bytes: u64| {
            regions < config.max_regions && bytes.saturating_add(len) <= config.max_bytes
        };
        let fits = |i: &Index<R::Handle>| fits_with(i.map.len(), i.bytes);
        if fits(index) {
            return Ok(());
        }
        let full = |i: &Index<R::Handle>| Error::Full {
            range: region.range,
            regions: i.map.len(),
            bytes: i.bytes,
            max_regions: config.max_regions,
            max_bytes: config.max_bytes,
        };
        if len > config.max_bytes || config.max_regions == 0 {
            return Err(full(index));
        }
        let mut candidates: Vec<(u64, RegionRef<R>)> = index
            .map
            .values()
            .filter(|r| r.state.load(Ordering::Relaxed) == 0)
            .map(|r| (r.last_used.load(Ordering::Relaxed), Arc::clone(r)))
            .collect();
        candidates.sort_by_key(|(t, r)| (*t, r.id));
        // Plan: the shortest LRU prefix of the candidates whose eviction makes room.
        let (mut regions, mut bytes) = (index.map.len(), index.bytes);
        let mut needed = 0;
        while !fits_with(regions, bytes) {
            let Some((_, r)) = candidates.get(needed) else {
                return Err(full(index));
            };
            regions -= 1;
            bytes -= r.range.len();
            needed += 1;
        }
        // Evict. Under the write lock no hit can take a candidate (hits acquire under the read
        // lock) and puts only make more regions unused, so the planned prefix is evicted
        // whole; the loop still checks each CAS and goes on down the list if one fails.
        for (_, victim) in candidates {
            if fits(index) {
                break;
            }
            if victim
                .state
                .compare_exchange(0, INVALID, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                index.unlink(&victim);
                Counters::bump(&self.shared.counters.evictions);
                victims.push(victim);
            }
        }
        if fits(index) {
            Ok(())
        } else {
            Err(full(index))
        }
    }

    /// Deregisters the regions invalidated while unused (normally done by the next `get`).
    /// In a forked child (watcher source), does nothing: the registrations are the parent's.
    pub fn flush(&self) {
        self.shared.flush();
    }

    /// Evicts every unused region (and flushes); returns how many were evicted. In a forked
    /// child (watcher source), evicts nothing and returns 0: the registrations are the
    /// parent's.
    pub fn purge(&self) -> usize {
        if self.shared.forked() {
            return 0;
        }
        let mut victims = Vec::new();
        {
            let mut index = self.shared.write();
            let unused: Vec<_> = index.map.values().cloned().collect();
            for r in unused {
                if r.state
                    .compare_exchange(0, INVALID, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    index.unlink(&r);
                    Counters::bump(&self.shared.counters.evictions);
                    victims.push(r);
                }
            }
        }
        for v in &victims {
            self.shared.deregister(v);
        }
        self.shared.flush();
        victims.len()
    }

    /// The counters and gauges.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let (regions, cached_bytes) = {
            let index = self.shared.read();
            (index.map.len(), index.bytes)
        };
        let pending = self.shared.garbage.lock().len();
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            hits: c.hits.sum(),
            misses: l(&c.misses),
            merges: l(&c.merges),
            invalidations: l(&c.invalidations),
            evictions: l(&c.evictions),
            deferred_deregistrations: l(&c.deferred_deregistrations),
            registrations: l(&c.registrations),
            deregistrations: l(&c.deregistrations),
            collisions: l(&c.collisions),
            registrar_errors: l(&c.registrar_errors),
            registrar_panics: l(&c.registrar_panics),
            deregistration_panics: l(&c.deregistration_panics),
            blind_uncached: l(&c.blind_uncached),
            blind_validated_hits: l(&c.blind_validated_hits),
            blind_validation_failures: l(&c.blind_validation_failures),
            regions,
            cached_bytes,
            registered_bytes: l(&c.registered_bytes),
            pending_deregistrations: pending,
        }
    }

    pub(crate) fn shared(&self) -> &Shared<R> {
        &self.shared
    }
}

enum Commit {
    Linked,
    Collided,
    Refused(Error),
}

impl<R: Registrar> Drop for Cache<R> {
    /// Deregisters every registration: no guard can outlive the cache (they borrow it), so
    /// every region is unused; its interval is removed and waited for first, so no
    /// invalidation callback can still be queueing it. Dropped inside an invalidation callback
    /// (where waiting would deadlock), the intervals are removed at the end of the current
    /// epoch instead, and with the watcher as source the subscriber that forgets watched VMAs
    /// stays registered (the engine has no deferred unregister; it holds only that set).
    ///
    /// In a forked child (watcher source) everything is leaked instead: no lock, no wait, no
    /// registrar or engine call (see `Shared::forked`); the parent's registrations stay intact.
    fn drop(&mut self) {
        if self.shared.forked() {
            // Keep `Shared` alive forever, so neither the registrar (the parent's ring), nor
            // the regions' intervals, nor the watcher handle run their own drops here.
            std::mem::forget(Arc::clone(&self.shared));
            return;
        }
        let linked: Vec<RegionRef<R>> = {
            let mut index = self.shared.write();
            let all: Vec<_> = index.map.values().cloned().collect();
            for r in &all {
                index.unlink(r);
            }
            all
        };
        let mine: Vec<_> = linked
            .into_iter()
            .filter(|r| r.mark_invalid() & INVALID == 0)
            .collect();
        for r in &mine {
            // From an invalidation callback (a subscriber that drops the cache) waiting would
            // deadlock: the interval is then removed at the end of the epoch. Releasing the
            // registration at once is still safe: a callback of it that runs later in this
            // epoch finds the cache gone (its weak reference fails) and only sets the sequence.
            let _waited = r.interval.remove_and_wait();
        }
        for r in &mine {
            self.shared.release_registration(&r.handle, r.range);
        }
        self.shared.garbage_hint.store(true, Ordering::Relaxed);
        self.shared.flush();
        if let Some((_, id)) = &self.shared.watched {
            let _ = self.shared.source.mm().unregister(*id);
        }
    }
}
