//! `watch(range)`: register whole VMAs in write-protect-only mode, and say what could not be
//! watched.
//!
//! The algorithm, for a page-aligned `[start, end)`:
//!
//! 1. Read `/proc/self/smaps` and take the VMAs that overlap the range. No VMA at all: the
//!    range is [`Error::Unmapped`].
//! 2. Every gap between them inside the range is reported as a [`SkipReason::Hole`].
//! 3. Each VMA is registered *whole* — `[vma.start, vma.end)`, possibly more than was asked —
//!    with one `UFFDIO_REGISTER` of mode WP and no write protection ever applied. Registering
//!    a sub-range would split the VMA in two or three (each split uses one of
//!    `vm.max_map_count` entries, 65530 by default) and leave the rest unwatched; registering
//!    VMA by VMA keeps one refusal from sinking the others (the kernel checks a multi-VMA
//!    range as a whole).
//! 4. The kernel's refusals become typed reasons: the special mappings are skipped without
//!    asking; EPERM on a shared mapping of a read-only file; EINVAL on a file mapping when the
//!    kernel has no WP_ASYNC; EBUSY when another userfaultfd owns the VMA. A VMA that already
//!    carried the `uw` flag and registers again without complaint was ours:
//!    [`WatchOutcome::AlreadyWatched`] (watching twice is harmless and says so).
//! 5. **Confirm.** `UFFDIO_REGISTER` accepts holes: if another thread unmapped part of a VMA
//!    between step 1 and the ioctl, the ioctl succeeds over what is left, and memory mapped
//!    there afterwards is not registered. So the map is read again *after* the registrations,
//!    and only the parts of each registered VMA that now lie in a VMA carrying the `uw` flag
//!    are reported as watched; the rest of it (inside the asked range) is reported as
//!    [`SkipReason::ChangedDuringWatch`]. Anything unmapped after the ioctl was registered when
//!    it went, so its UNMAP is delivered; anything mapped after the confirmation is the
//!    `MAP_FIXED` case below. A report therefore never calls memory watched that no event
//!    would cover.
//! 6. If nothing could be watched, the call fails with [`Error::NothingWatchable`] listing
//!    the reasons; otherwise it returns the [`WatchReport`].
//!
//! The memory map is a snapshot, so a concurrent `mmap`/`munmap` by another thread can make a
//! registration land on a changed layout: registering a range that is no longer mapped is a
//! reported failure (or, for a partial unmap, a [`SkipReason::ChangedDuringWatch`] piece after
//! the confirmation), and a registration that covers only part of a newly merged VMA splits
//! it, which is harmless. Memory mapped later at a watched address with `MAP_FIXED` (or
//! `shmat(SHM_REMAP)`) is a new VMA that the kernel does not register: the UNMAP of the old
//! memory is delivered, and the owner calls `watch` again for the new one. An `mremap`
//! target needs nothing: the registration moves with the VMA.

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;

use crate::error::{Error, Result};
use crate::maps::{self, Vma};
use crate::sys;

/// Why a piece of a range could not be watched.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SkipReason {
    /// Nothing is mapped there.
    Hole,
    /// A special kernel mapping (`[vdso]`, `[vvar]`, `[vsyscall]`), which userfaultfd never
    /// registers.
    Special {
        /// Its name in `/proc/self/maps`.
        name: String,
    },
    /// A shared mapping of a file opened read-only (the kernel answers EPERM).
    ReadOnlyFile {
        /// The file's path as `/proc/self/maps` shows it.
        path: String,
    },
    /// A file-backed or SysV shm mapping on a kernel without WP_ASYNC (Linux < 6.7): only
    /// anonymous and shmem memory can be registered there.
    FileBackedNeedsWpAsync {
        /// The file's path.
        path: String,
    },
    /// Another userfaultfd in this process already owns the VMA (EBUSY).
    OwnedByAnotherUffd,
    /// The kernel refused for another reason.
    Refused {
        /// Its errno.
        errno: i32,
    },
    /// The mapping changed while `watch` ran (another thread unmapped or replaced it between
    /// the read of the memory map and the registration): after registering, the piece is not
    /// carried by a registered VMA, so it is not watched. Call `watch` again for it.
    ChangedDuringWatch,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Hole => f.write_str("nothing is mapped there"),
            SkipReason::Special { name } => {
                write!(
                    f,
                    "{name} is a special kernel mapping that userfaultfd cannot watch"
                )
            }
            SkipReason::ReadOnlyFile { path } => {
                write!(f, "{path} is a shared mapping of a read-only file (EPERM)")
            }
            SkipReason::FileBackedNeedsWpAsync { path } => write!(
                f,
                "{path} is file-backed, which needs UFFD_FEATURE_WP_ASYNC (Linux 6.7)"
            ),
            SkipReason::OwnedByAnotherUffd => {
                f.write_str("another userfaultfd in this process owns it (EBUSY)")
            }
            SkipReason::Refused { errno } => write!(
                f,
                "the kernel refused to register it: {}",
                io::Error::from_raw_os_error(*errno)
            ),
            SkipReason::ChangedDuringWatch => f.write_str(
                "the mapping changed while it was being registered, and what is there now is \
                 not registered (watch it again)",
            ),
        }
    }
}

/// A piece of the asked range that is not watched, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// First address of the piece (clipped to the asked range).
    pub start: u64,
    /// First address after it.
    pub end: u64,
    /// Why.
    pub reason: SkipReason,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x}): {}", self.start, self.end, self.reason)
    }
}

/// What happened to one VMA that overlaps the asked range.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchOutcome {
    /// Registered now (the whole VMA).
    Watched,
    /// It was already registered with this watcher.
    AlreadyWatched,
}

/// One VMA that is watched after the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchedVma {
    /// First address of the whole VMA (may lie before the asked range).
    pub start: u64,
    /// First address after the whole VMA (may lie after the asked range).
    pub end: u64,
    /// Registered now, or already.
    pub outcome: WatchOutcome,
}

/// The per-range result of [`Watcher::watch`](crate::Watcher::watch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use = "a report may list pieces of the range that are not watched"]
pub struct WatchReport {
    /// The VMAs that are watched now, whole, in address order.
    pub watched: Vec<WatchedVma>,
    /// The pieces of the asked range that are not watched, in address order.
    pub skipped: Vec<Skipped>,
}

impl WatchReport {
    /// Whether every byte of the asked range is watched.
    pub fn is_complete(&self) -> bool {
        self.skipped.is_empty()
    }

    /// How many VMAs this call registered (not counting those already watched).
    pub fn newly_watched(&self) -> usize {
        self.watched
            .iter()
            .filter(|w| w.outcome == WatchOutcome::Watched)
            .count()
    }
}

/// Validates `[addr, addr + len)` as a page-aligned, non-empty, non-wrapping range; returns
/// its end.
pub(crate) fn validate(addr: u64, len: u64) -> Result<u64> {
    let ps = sys::page_size();
    if len == 0 {
        return Err(Error::EmptyRange { addr });
    }
    if addr % ps != 0 {
        return Err(Error::Unaligned {
            addr,
            page_size: ps,
        });
    }
    let end = addr
        .checked_add(len)
        .ok_or(Error::RangeOverflow { addr, len })?;
    if len % ps != 0 {
        return Err(Error::Unaligned {
            addr: end,
            page_size: ps,
        });
    }
    Ok(end)
}

fn classify(vma: &Vma, err: &io::Error, wp_async: bool) -> SkipReason {
    match err.raw_os_error() {
        Some(libc::EBUSY) => SkipReason::OwnedByAnotherUffd,
        Some(libc::EPERM) if vma.is_file() => SkipReason::ReadOnlyFile {
            path: vma.name.clone(),
        },
        Some(libc::EINVAL) if vma.is_file() && !wp_async => SkipReason::FileBackedNeedsWpAsync {
            path: vma.name.clone(),
        },
        Some(errno) => SkipReason::Refused { errno },
        None => SkipReason::Refused { errno: 0 },
    }
}

/// Registers the VMAs overlapping `[start, end)` on `fd` (see the module essay).
pub(crate) fn register_range(
    fd: BorrowedFd<'_>,
    start: u64,
    end: u64,
    wp_async: bool,
) -> Result<WatchReport> {
    let vmas = maps::read_self().map_err(|e| Error::syscall("reading /proc/self/smaps", e))?;
    let overlapping = maps::overlapping(&vmas, start, end);
    if overlapping.is_empty() {
        return Err(Error::Unmapped { start, end });
    }
    let mut report = WatchReport::default();
    let mut cursor = start;
    for vma in &overlapping {
        if vma.start > cursor {
            report.skipped.push(Skipped {
                start: cursor,
                end: vma.start,
                reason: SkipReason::Hole,
            });
        }
        cursor = vma.end;
        let clipped = (vma.start.max(start), vma.end.min(end));
        if vma.is_special() {
            report.skipped.push(Skipped {
                start: clipped.0,
                end: clipped.1,
                reason: SkipReason::Special {
                    name: vma.name.clone(),
                },
            });
            continue;
        }
        #[cfg(feature = "fault-injection")]
        BEFORE_REGISTER.with(|h| {
            if let Some(hook) = h.get() {
                hook(vma.start, vma.end);
            }
        });
        match sys::register_wp(fd, vma.start, vma.end - vma.start) {
            Ok(()) => report.watched.push(WatchedVma {
                start: vma.start,
                end: vma.end,
                outcome: if vma.uffd_wp {
                    WatchOutcome::AlreadyWatched
                } else {
                    WatchOutcome::Watched
                },
            }),
            Err(e) => report.skipped.push(Skipped {
                start: clipped.0,
                end: clipped.1,
                reason: classify(vma, &e, wp_async),
            }),
        }
    }
    if cursor < end {
        report.skipped.push(Skipped {
            start: cursor,
            end,
            reason: SkipReason::Hole,
        });
    }
    if !report.watched.is_empty() {
        let after = maps::read_self().map_err(|e| Error::syscall("reading /proc/self/smaps", e))?;
        confirm(&mut report, &after, start, end);
    }
    if report.watched.is_empty() {
        if report
            .skipped
            .iter()
            .all(|s| s.reason == SkipReason::OwnedByAnotherUffd)
        {
            return Err(Error::AlreadyOwned { start, end });
        }
        return Err(Error::NothingWatchable {
            start,
            end,
            skipped: report.skipped,
        });
    }
    Ok(report)
}

/// Step 5 of the module essay: keeps as watched only what `after` (the map read after the
/// registrations) shows in `uw` VMAs; the rest of each registered VMA, clipped to the asked
/// `[start, end)`, becomes a [`SkipReason::ChangedDuringWatch`] piece.
pub(crate) fn confirm(report: &mut WatchReport, after: &[Vma], start: u64, end: u64) {
    let registered = std::mem::take(&mut report.watched);
    for w in &registered {
        let mut cursor = w.start;
        for v in maps::overlapping(after, w.start, w.end)
            .iter()
            .filter(|v| v.uffd_wp)
        {
            let lo = v.start.max(w.start);
            if lo > cursor {
                push_changed(&mut report.skipped, cursor, lo, start, end);
            }
            cursor = cursor.max(v.end.min(w.end));
            // A VMA merged with a neighbour is reported once, with its current bounds.
            if report.watched.last().map(|last| last.start) != Some(v.start) {
                report.watched.push(WatchedVma {
                    start: v.start,
                    end: v.end,
                    outcome: w.outcome.clone(),
                });
            }
        }
        if cursor < w.end {
            push_changed(&mut report.skipped, cursor, w.end, start, end);
        }
    }
    report.skipped.sort_by_key(|s| s.start);
}

fn push_changed(skipped: &mut Vec<Skipped>, lo: u64, hi: u64, start: u64, end: u64) {
    let (lo, hi) = (lo.max(start), hi.min(end));
    if lo < hi {
        skipped.push(Skipped {
            start: lo,
            end: hi,
            reason: SkipReason::ChangedDuringWatch,
        });
    }
}

/// The test hook's type: called with a VMA's bounds.
#[cfg(feature = "fault-injection")]
type RegisterHook = fn(u64, u64);

#[cfg(feature = "fault-injection")]
thread_local! {
    static BEFORE_REGISTER: std::cell::Cell<Option<RegisterHook>> =
        const { std::cell::Cell::new(None) };
}

/// Test-only (feature `fault-injection`): on this thread, `watch` calls `hook(vma.start,
/// vma.end)` right before each `UFFDIO_REGISTER`, so that a test can change the mapping in
/// the window between the map read and the registration. `None` removes it.
#[cfg(feature = "fault-injection")]
pub fn set_before_register_hook(hook: Option<RegisterHook>) {
    BEFORE_REGISTER.with(|h| h.set(hook));
}

/// Unregisters the VMAs overlapping `[start, end)` (whole, as they were registered); returns
/// the `[start, end)` of each VMA unregistered, for the caller's invalidation.
pub(crate) fn unregister_range(
    fd: BorrowedFd<'_>,
    start: u64,
    end: u64,
) -> Result<Vec<(u64, u64)>> {
    let vmas = maps::read_self().map_err(|e| Error::syscall("reading /proc/self/smaps", e))?;
    let mut gone = Vec::new();
    for vma in maps::overlapping(&vmas, start, end) {
        if vma.uffd_wp && sys::unregister(fd, vma.start, vma.end - vma.start).is_ok() {
            gone.push((vma.start, vma.end));
        }
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(start: u64, end: u64, uw: bool) -> Vma {
        Vma {
            start,
            end,
            perms: *b"rw-p",
            offset: 0,
            dev: "00:00".into(),
            inode: 0,
            name: String::new(),
            uffd_wp: uw,
        }
    }

    fn registered(start: u64, end: u64) -> WatchReport {
        WatchReport {
            watched: vec![WatchedVma {
                start,
                end,
                outcome: WatchOutcome::Watched,
            }],
            skipped: Vec::new(),
        }
    }

    #[test]
    fn a_piece_that_lost_its_registration_is_reported_changed() {
        // Registered [0x1000, 0x4000); afterwards the middle page is a new, unregistered VMA.
        let mut r = registered(0x1000, 0x4000);
        let after = [
            vma(0x1000, 0x2000, true),
            vma(0x2000, 0x3000, false),
            vma(0x3000, 0x4000, true),
        ];
        confirm(&mut r, &after, 0x1000, 0x4000);
        assert_eq!(
            r.watched
                .iter()
                .map(|w| (w.start, w.end))
                .collect::<Vec<_>>(),
            [(0x1000, 0x2000), (0x3000, 0x4000)]
        );
        assert_eq!(
            r.skipped,
            [Skipped {
                start: 0x2000,
                end: 0x3000,
                reason: SkipReason::ChangedDuringWatch
            }]
        );
        assert!(!r.is_complete());
    }

    #[test]
    fn a_hole_after_registration_is_clipped_to_the_asked_range() {
        // The VMA extended past the asked range; all of it is gone now.
        let mut r = registered(0x1000, 0x8000);
        confirm(&mut r, &[], 0x2000, 0x3000);
        assert!(r.watched.is_empty());
        assert_eq!(
            r.skipped,
            [Skipped {
                start: 0x2000,
                end: 0x3000,
                reason: SkipReason::ChangedDuringWatch
            }]
        );
    }

    #[test]
    fn an_unchanged_or_merged_registration_stays_watched() {
        let mut r = registered(0x1000, 0x3000);
        confirm(&mut r, &[vma(0x0, 0x5000, true)], 0x1000, 0x3000);
        assert!(r.is_complete());
        assert_eq!(
            r.watched,
            [WatchedVma {
                start: 0,
                end: 0x5000,
                outcome: WatchOutcome::Watched
            }]
        );
    }
}
