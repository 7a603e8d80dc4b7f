//! What backs a virtual page right now, from `/proc/self/pagemap`: the judge of coherence.
//!
//! A mirror is coherent when what it recorded for a page is what the page table maps now. The
//! kernel publishes one 64-bit entry per virtual page in `/proc/self/pagemap`: bit 63 *present*,
//! bit 62 *swapped*, bit 61 *file page or shared anonymous*, bit 57 *uffd-wp*, bit 56
//! *exclusively mapped*, bit 55 *soft-dirty*, and in bits 0..=54 the *page frame number*. Since
//! Linux 4.2 the PFN reads as zero unless the reader has `CAP_SYS_ADMIN`; an unprivileged
//! process therefore falls back to a *content fingerprint* of the page (a 64-bit FNV-1a hash of
//! its bytes), read through `/proc/self/mem` so that a page unmapped under our feet yields an
//! error instead of a SIGSEGV. Fingerprints identify a page only if its contents are unique,
//! so tests and demos that judge coherence by content write a distinct stamp into every page
//! they map ([`stamp`]).
//!
//! [`Frame`] is what a mirror records; [`frame`] reads the current one; comparing the two is
//! the coherence check (`recorded == frame(addr)?`). Reading never changes the mapping except
//! that a fingerprint read of a present page touches it (it is present already, so nothing is
//! faulted in).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

/// One pagemap entry, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    raw: u64,
}

impl Entry {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    const UFFD_WP: u64 = 1 << 57;
    const EXCLUSIVE: u64 = 1 << 56;
    const PFN_MASK: u64 = (1 << 55) - 1;

    /// The raw 64-bit entry.
    pub const fn raw(self) -> u64 {
        self.raw
    }

    /// A page is mapped in RAM.
    pub const fn present(self) -> bool {
        self.raw & Self::PRESENT != 0
    }

    /// The page is in swap.
    pub const fn swapped(self) -> bool {
        self.raw & Self::SWAPPED != 0
    }

    /// The page is a file page or shared anonymous memory.
    pub const fn file_or_shared(self) -> bool {
        self.raw & Self::FILE_OR_SHARED != 0
    }

    /// The uffd write-protect bit (never set by the watcher, which never write-protects).
    pub const fn uffd_wp(self) -> bool {
        self.raw & Self::UFFD_WP != 0
    }

    /// The page is mapped only here.
    pub const fn exclusive(self) -> bool {
        self.raw & Self::EXCLUSIVE != 0
    }

    /// The page frame number, if present and visible to this reader (`None` when not present
    /// or hidden, i.e. zero, for lack of `CAP_SYS_ADMIN`).
    pub const fn pfn(self) -> Option<u64> {
        let pfn = self.raw & Self::PFN_MASK;
        if self.present() && pfn != 0 {
            Some(pfn)
        } else {
            None
        }
    }
}

fn pagemap_file() -> io::Result<&'static File> {
    static FILE: OnceLock<File> = OnceLock::new();
    if let Some(f) = FILE.get() {
        return Ok(f);
    }
    let f = File::open("/proc/self/pagemap")?;
    Ok(FILE.get_or_init(|| f))
}

fn mem_file() -> io::Result<&'static File> {
    static FILE: OnceLock<File> = OnceLock::new();
    if let Some(f) = FILE.get() {
        return Ok(f);
    }
    let f = File::open("/proc/self/mem")?;
    Ok(FILE.get_or_init(|| f))
}

/// The system page size.
pub fn page_size() -> u64 {
    crate::sys::page_size()
}

/// Reads the entries of `pages` consecutive pages from the page containing `addr`.
///
/// # Errors
///
/// The I/O error of opening or reading `/proc/self/pagemap`.
pub fn entries(addr: u64, pages: usize) -> io::Result<Vec<Entry>> {
    let ps = page_size();
    let mut buf = vec![0u8; pages * 8];
    pagemap_file()?.read_exact_at(&mut buf, (addr / ps) * 8)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            Entry {
                raw: u64::from_ne_bytes(w),
            }
        })
        .collect())
}

/// The entry of the page containing `addr`.
///
/// # Errors
///
/// As [`entries`].
pub fn entry(addr: u64) -> io::Result<Entry> {
    Ok(entries(addr, 1)?[0])
}

/// Whether this process can see page frame numbers (it has `CAP_SYS_ADMIN`). Probed once, on
/// a page of its own that it makes present.
pub fn pfns_visible() -> bool {
    static VISIBLE: OnceLock<bool> = OnceLock::new();
    *VISIBLE.get_or_init(|| {
        let probe = Box::new([1u8; 64]);
        let addr = std::hint::black_box(probe.as_ptr()) as u64;
        entry(addr).map(|e| e.pfn().is_some()).unwrap_or(false)
    })
}

/// What backs a virtual page, as far as this process can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Frame {
    /// Nothing: not present (never touched, zapped, or swapped out) or not mapped at all.
    NotPresent,
    /// The page frame number (visible with `CAP_SYS_ADMIN`).
    Pfn(u64),
    /// A fingerprint of the page's contents (unprivileged fallback).
    Content(u64),
}

/// FNV-1a over the bytes: a cheap fingerprint, good enough to tell stamped pages apart.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The frame backing the page that contains `addr`: its PFN when visible, else a fingerprint
/// of its contents if present, else [`Frame::NotPresent`]. Safe on any address: an unmapped
/// page reads as [`Frame::NotPresent`].
///
/// # Errors
///
/// The I/O error of reading `/proc/self/pagemap` or `/proc/self/mem` (other than the page
/// vanishing meanwhile, which is [`Frame::NotPresent`]).
pub fn frame(addr: u64) -> io::Result<Frame> {
    let e = entry(addr)?;
    if !e.present() {
        return Ok(Frame::NotPresent);
    }
    if let Some(pfn) = e.pfn() {
        return Ok(Frame::Pfn(pfn));
    }
    let ps = page_size();
    let mut buf = vec![0u8; ps as usize];
    match mem_file()?.read_exact_at(&mut buf, addr / ps * ps) {
        Ok(()) => Ok(Frame::Content(fingerprint(&buf))),
        Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(Frame::NotPresent),
        Err(e) => Err(e),
    }
}

/// Writes a distinct 8-byte `stamp` at the start of the page containing `addr` (through
/// `/proc/self/mem`, so a vanished page is an error, not a crash), making content
/// fingerprints unique.
///
/// # Errors
///
/// The I/O error of the write, e.g. EIO when the page is not mapped.
pub fn stamp(addr: u64, stamp: u64) -> io::Result<()> {
    let ps = page_size();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")?;
    f.write_all_at(&stamp.to_ne_bytes(), addr / ps * ps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_touched_heap_page_is_present_and_has_a_frame() {
        let v = vec![7u8; 3 * page_size() as usize];
        let addr = v.as_ptr() as u64 + page_size();
        assert!(entry(addr).unwrap().present());
        assert_ne!(frame(addr).unwrap(), Frame::NotPresent);
    }

    #[test]
    fn an_unmapped_address_is_not_present() {
        // The zero page is never mapped in a Rust process.
        assert_eq!(frame(0).unwrap(), Frame::NotPresent);
    }
}
