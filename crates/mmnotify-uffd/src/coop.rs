//! Cooperative calls: the caller's own `munmap`, `madvise`, `mremap`, `shmdt`, hole punch and
//! `ftruncate`, bracketed by a real invalidation start and end on the exact range.
//!
//! userfaultfd gives *post*-events (UNMAP arrives after the pages are gone; REMOVE after the
//! call released its lock, before the zap) and nothing at all for several operations (see
//! docs/UFFD.md). A caller that makes the call itself can do better: each wrapper here
//!
//! 1. computes the exact virtual ranges the call will change (for a file operation, every
//!    place the file's affected pages are mapped in this process, from `/proc/self/maps`);
//! 2. opens `Mm::invalidate_start(range, event)` on each, on the calling thread: every
//!    subscriber drops its mirror *before* the memory changes (a registration cache can
//!    deregister before free, which post-events cannot give), and `read_retry` reports a
//!    collision to any fill in flight;
//! 3. makes the real system call;
//! 4. ends the invalidations (`read_begin` of an overlapping interval waits until then).
//!
//! The uffd event that follows for the same range (the call blocks until the reader has read
//! it, so it is read before the wrapper returns) is delivered again by the dispatcher: a
//! second invalidation of a range the subscribers have already dropped, which costs a callback
//! and changes nothing.
//!
//! The wrappers are `unsafe` where the call can invalidate Rust references (unmapped, moved,
//! zeroed or truncated memory); the caller promises no reference into the range outlives it.
//! They may be called from subscriber callbacks (the engine allows an invalidation to nest in
//! a callback), but not while holding a lock that those callbacks take — as in the kernel,
//! whose notifiers run in the caller's context too.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use mmnotify::{Event, InvalidateGuard, Mm, Range};

use crate::error::{Error, Result};
use crate::maps;
use crate::sys;
use crate::watcher::Watcher;

fn last_err(call: &'static str) -> Error {
    Error::syscall(call, io::Error::last_os_error())
}

fn page_floor(x: u64) -> u64 {
    x & !(sys::page_size() - 1)
}

fn page_ceil(x: u64) -> u64 {
    let ps = sys::page_size();
    x.saturating_add(ps - 1) & !(ps - 1)
}

/// Whether a `madvise` advice can change which page backs an address (or its contents), so
/// that the wrapper must invalidate around it.
pub fn advice_invalidates(advice: i32) -> bool {
    const MADV_GUARD_INSTALL: i32 = 102;
    const MADV_GUARD_REMOVE: i32 = 103;
    const MADV_DONTNEED_LOCKED: i32 = 24;
    matches!(
        advice,
        libc::MADV_DONTNEED
            | libc::MADV_FREE
            | libc::MADV_REMOVE
            | libc::MADV_PAGEOUT
            | MADV_DONTNEED_LOCKED
            | MADV_GUARD_INSTALL
            | MADV_GUARD_REMOVE
    )
}

/// Opens one blocking invalidation per range (when the watcher may speak for this process).
fn open<'mm>(
    mm: Option<&'mm Mm>,
    ranges: &[Range],
    event: Event,
) -> Result<Vec<InvalidateGuard<'mm>>> {
    let mut guards = Vec::with_capacity(ranges.len());
    if let Some(mm) = mm {
        for r in ranges {
            guards.push(mm.invalidate_start(*r, event)?);
        }
    }
    Ok(guards)
}

fn close(guards: Vec<InvalidateGuard<'_>>) {
    for g in guards {
        g.end();
    }
}

/// The virtual ranges where bytes `[file_start, file_end)` of the open file `fd` are mapped
/// in this process (whole pages).
pub fn file_mappings(fd: BorrowedFd<'_>, file_start: u64, file_end: u64) -> Result<Vec<Range>> {
    let st = rustix::fs::fstat(fd).map_err(|e| Error::syscall("fstat", e))?;
    let dev = st.st_dev;
    let dev_str = format!(
        "{:02x}:{:02x}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    let vmas = maps::read_self_maps().map_err(|e| Error::syscall("reading /proc/self/maps", e))?;
    let fs = page_floor(file_start);
    let fe = page_ceil(file_end);
    let mut out = Vec::new();
    for v in vmas {
        if v.inode != st.st_ino || v.dev != dev_str {
            continue;
        }
        let vlen = v.end - v.start;
        let (vs, ve) = (v.offset, v.offset.saturating_add(vlen));
        let (s, e) = (vs.max(fs), ve.min(fe));
        if s < e {
            if let Ok(r) = Range::new(v.start + (s - vs), v.start + (e - vs)) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

impl Watcher {
    fn coop_mm(&self) -> Option<&Mm> {
        // In a forked child the Mm is the parent's: the call is made, nobody is told.
        if self.core_for_coop().gate.trusted() {
            Some(self.mm())
        } else {
            None
        }
    }

    /// `munmap(addr, len)`, with subscribers invalidated (`Event::Unmap`) before and ended
    /// after.
    ///
    /// # Safety
    ///
    /// As `munmap(2)`: no Rust reference into the range may be used afterwards.
    ///
    /// # Errors
    ///
    /// The input errors for an empty or wrapping range, the engine's errors, and
    /// [`Error::Syscall`] with munmap's errno.
    pub unsafe fn munmap(&self, addr: *mut c_void, len: usize) -> Result<()> {
        let range = Range::from_len(addr as u64, page_ceil(len as u64).max(1))
            .map_err(|_| Error::EmptyRange { addr: addr as u64 })?;
        let guards = open(self.coop_mm(), &[range], Event::Unmap)?;
        // SAFETY: forwarded to the caller.
        let r = unsafe { libc::munmap(addr, len) };
        let err = (r != 0).then(|| last_err("munmap"));
        close(guards);
        err.map_or(Ok(()), Err)
    }

    /// `madvise(addr, len, advice)`, bracketed by an `Event::Clear` invalidation when the
    /// advice can change what backs the range ([`advice_invalidates`]); other advice is passed
    /// through.
    ///
    /// # Safety
    ///
    /// As `madvise(2)`: with DONTNEED/FREE/REMOVE the contents may become zero under any
    /// reference into the range.
    ///
    /// # Errors
    ///
    /// As [`Watcher::munmap`].
    pub unsafe fn madvise(&self, addr: *mut c_void, len: usize, advice: i32) -> Result<()> {
        let ranges = if advice_invalidates(advice) && len > 0 {
            vec![Range::from_len(addr as u64, page_ceil(len as u64))?]
        } else {
            Vec::new()
        };
        let guards = open(self.coop_mm(), &ranges, Event::Clear)?;
        // SAFETY: forwarded to the caller.
        let r = unsafe { libc::madvise(addr, len, advice) };
        let err = (r != 0).then(|| last_err("madvise"));
        close(guards);
        err.map_or(Ok(()), Err)
    }

    /// `mremap(old, old_len, new_len, flags, new_addr)`, with the old range (and, with
    /// `MREMAP_FIXED`, the target range) invalidated as `Event::Unmap` before and ended after.
    /// Returns the new address. The moved memory stays registered (the registration follows
    /// the VMA).
    ///
    /// # Safety
    ///
    /// As `mremap(2)`: no reference into the old range (or the target) may be used afterwards.
    ///
    /// # Errors
    ///
    /// As [`Watcher::munmap`].
    pub unsafe fn mremap(
        &self,
        old: *mut c_void,
        old_len: usize,
        new_len: usize,
        flags: i32,
        new_addr: *mut c_void,
    ) -> Result<*mut c_void> {
        let mut ranges = vec![Range::from_len(
            old as u64,
            page_ceil(old_len as u64).max(1),
        )?];
        if flags & libc::MREMAP_FIXED != 0 && new_len > 0 {
            ranges.push(Range::from_len(new_addr as u64, page_ceil(new_len as u64))?);
        }
        let guards = open(self.coop_mm(), &ranges, Event::Unmap)?;
        // SAFETY: forwarded to the caller.
        let r = unsafe { libc::mremap(old, old_len, new_len, flags, new_addr) };
        let err = (r == libc::MAP_FAILED).then(|| last_err("mremap"));
        close(guards);
        err.map_or(Ok(r), Err)
    }

    /// `shmdt(addr)`, which userfaultfd never reports, with the attach's whole range (every
    /// VMA of the same segment from `addr` on) invalidated as `Event::Unmap` around it.
    ///
    /// # Safety
    ///
    /// As `shmdt(2)`: no reference into the attach may be used afterwards.
    ///
    /// # Errors
    ///
    /// [`Error::Unmapped`] when nothing is attached at `addr`; as [`Watcher::munmap`].
    pub unsafe fn shmdt(&self, addr: *const c_void) -> Result<()> {
        let a = addr as u64;
        let vmas =
            maps::read_self_maps().map_err(|e| Error::syscall("reading /proc/self/maps", e))?;
        let first = vmas.iter().position(|v| v.start == a && v.is_sysv_shm());
        let Some(first) = first else {
            return Err(Error::Unmapped {
                start: a,
                end: a.saturating_add(sys::page_size()),
            });
        };
        let inode = vmas[first].inode;
        let mut end = vmas[first].end;
        for v in &vmas[first + 1..] {
            if v.start != end || v.inode != inode || !v.is_sysv_shm() {
                break;
            }
            end = v.end;
        }
        let range = Range::new(a, end)?;
        let guards = open(self.coop_mm(), &[range], Event::Unmap)?;
        // SAFETY: forwarded to the caller.
        let r = unsafe { libc::shmdt(addr) };
        let err = (r != 0).then(|| last_err("shmdt"));
        close(guards);
        err.map_or(Ok(()), Err)
    }

    /// `fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, len)`, which userfaultfd never reports,
    /// with every mapping of the punched pages in this process invalidated (`Event::Clear`)
    /// around it.
    ///
    /// # Safety
    ///
    /// Mapped contents of the hole become zero under any reference into them.
    ///
    /// # Errors
    ///
    /// As [`Watcher::munmap`] (errno of fallocate).
    pub unsafe fn punch_hole(&self, fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or(Error::RangeOverflow { addr: offset, len })?;
        let ranges = file_mappings(fd, offset, end)?;
        let guards = open(self.coop_mm(), &ranges, Event::Clear)?;
        // SAFETY: fallocate on a descriptor the caller lent us; the memory effects are the
        // caller's promise above.
        let r = unsafe {
            libc::fallocate(
                fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        let err = (r != 0).then(|| last_err("fallocate"));
        close(guards);
        err.map_or(Ok(()), Err)
    }

    /// `ftruncate(fd, len)`, which userfaultfd never reports. When it shrinks the file, every
    /// mapping of the pages from the one holding the new end on is invalidated
    /// (`Event::Unmap`: past the end, accesses fault with SIGBUS) around it.
    ///
    /// # Safety
    ///
    /// No reference into mapped pages past the new end may be used afterwards.
    ///
    /// # Errors
    ///
    /// As [`Watcher::munmap`] (errno of ftruncate).
    pub unsafe fn ftruncate(&self, fd: BorrowedFd<'_>, len: u64) -> Result<()> {
        let old = rustix::fs::fstat(fd)
            .map_err(|e| Error::syscall("fstat", e))?
            .st_size as u64;
        let ranges = if len < old {
            file_mappings(fd, page_floor(len), u64::MAX)?
        } else {
            Vec::new()
        };
        let guards = open(self.coop_mm(), &ranges, Event::Unmap)?;
        let r = rustix::fs::ftruncate(fd, len);
        close(guards);
        r.map_err(|e| Error::syscall("ftruncate", e))
    }
}
