//! The userfaultfd system interface, and nothing else: create, handshake, register,
//! unregister, read and decode messages.
//!
//! The uapi numbers and structs come from `linux-raw-sys`; the calls go through `rustix`
//! (`userfaultfd(2)` and `ioctl(2)`). Every function here is a thin, typed wrapper: policy
//! (which features to ask for, what to do with a message) lives in `watcher.rs`.
//!
//! A userfaultfd is created with `UFFD_USER_MODE_ONLY` (the flag that lets an unprivileged
//! process have one since Linux 5.11, and that changes nothing for an observer that never
//! resolves faults), `O_CLOEXEC` and `O_NONBLOCK` (without `O_NONBLOCK`, `poll` reports POLLERR
//! and a read could block the reader forever). The handshake (`UFFDIO_API`) may be done once per
//! descriptor and answers with the kernel's *whole* feature set, so support is probed on a
//! throwaway descriptor first.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use linux_raw_sys::general as uapi;
use rustix::ioctl::{ioctl, Updater};
use rustix::mm::UserfaultfdFlags;

/// `UFFD_FEATURE_WP_ASYNC` (bit 15, Linux 6.7): with it, WP-only registration is allowed on
/// every VMA type (file-backed and SysV shm included). Debian's kernel headers lack it, so the
/// value is spelled out here and checked against `linux-raw-sys` at compile time.
pub(crate) const FEATURE_WP_ASYNC: u64 = 1 << 15;
const _: () = assert!(FEATURE_WP_ASYNC == uapi::UFFD_FEATURE_WP_ASYNC as u64);

/// The three non-cooperative events the watcher needs.
pub(crate) const FEATURE_EVENTS: u64 = (uapi::UFFD_FEATURE_EVENT_UNMAP
    | uapi::UFFD_FEATURE_EVENT_REMOVE
    | uapi::UFFD_FEATURE_EVENT_REMAP) as u64;
/// Fork events (needs CAP_SYS_PTRACE).
pub(crate) const FEATURE_FORK: u64 = uapi::UFFD_FEATURE_EVENT_FORK as u64;

/// The size of one message.
pub(crate) const MSG_SIZE: usize = std::mem::size_of::<uapi::uffd_msg>();
const _: () = assert!(MSG_SIZE == 32);

/// Creates a userfaultfd for this process's own memory.
pub(crate) fn create() -> io::Result<OwnedFd> {
    let flags = UserfaultfdFlags::CLOEXEC
        | UserfaultfdFlags::NONBLOCK
        | UserfaultfdFlags::from_bits_retain(uapi::UFFD_USER_MODE_ONLY);
    // SAFETY: creating a userfaultfd has no memory-safety effect by itself; the descriptor is
    // only ever used for WP-only registration without write-protecting, which traps no fault.
    unsafe { rustix::mm::userfaultfd(flags) }.map_err(io::Error::from)
}

/// The `UFFDIO_API` handshake: asks for `features`, returns what the kernel supports.
pub(crate) fn api(fd: BorrowedFd<'_>, features: u64) -> io::Result<u64> {
    let mut arg = uapi::uffdio_api {
        api: uapi::UFFD_API as u64,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a pointer to a `struct uffdio_api` that it reads and updates;
    // `arg` is exactly that struct and lives across the call.
    unsafe {
        ioctl(
            fd,
            Updater::<{ linux_raw_sys::ioctl::UFFDIO_API as _ }, _>::new(&mut arg),
        )
    }
    .map_err(io::Error::from)?;
    Ok(arg.features)
}

/// Registers `[start, start + len)` in write-protect mode only. Nothing is ever
/// write-protected, so no fault is trapped; the registration exists to receive the events.
pub(crate) fn register_wp(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut arg = uapi::uffdio_register {
        range: uapi::uffdio_range { start, len },
        mode: uapi::UFFDIO_REGISTER_MODE_WP as u64,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER takes a pointer to a `struct uffdio_register` that it reads and
    // updates (`ioctls`); `arg` is that struct and lives across the call. WP-only registration
    // changes no mapping and traps nothing while no page is write-protected.
    unsafe {
        ioctl(
            fd,
            Updater::<{ linux_raw_sys::ioctl::UFFDIO_REGISTER as _ }, _>::new(&mut arg),
        )
    }
    .map_err(io::Error::from)
}

/// Unregisters `[start, start + len)`.
pub(crate) fn unregister(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut arg = uapi::uffdio_range { start, len };
    // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`; `arg` is that struct.
    unsafe {
        ioctl(
            fd,
            Updater::<{ linux_raw_sys::ioctl::UFFDIO_UNREGISTER as _ }, _>::new(&mut arg),
        )
    }
    .map_err(io::Error::from)
}

/// One decoded message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Msg {
    /// `[start, end)` was unmapped (munmap, mremap shrink, MAP_FIXED over, brk shrink).
    Unmap { start: u64, end: u64 },
    /// `[start, end)` is about to be zapped or freed (madvise DONTNEED/FREE/REMOVE).
    Remove { start: u64, end: u64 },
    /// `len` bytes moved from `from` to `to` (mremap).
    Remap { from: u64, to: u64, len: u64 },
    /// The process forked; `fd` is a new userfaultfd (in this process's table) for the child.
    Fork { fd: i32 },
    /// Anything else (a page fault, which WP-only registration without write protection never
    /// produces, or a future event).
    Other { event: u8 },
}

fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

/// Decodes one 32-byte message (`struct uffd_msg`: the event in byte 0, the payload from byte
/// 8 on).
pub(crate) fn decode(b: &[u8; MSG_SIZE]) -> Msg {
    let event = b[0];
    match u32::from(event) {
        uapi::UFFD_EVENT_UNMAP => Msg::Unmap {
            start: word(b, 8),
            end: word(b, 16),
        },
        uapi::UFFD_EVENT_REMOVE => Msg::Remove {
            start: word(b, 8),
            end: word(b, 16),
        },
        uapi::UFFD_EVENT_REMAP => Msg::Remap {
            from: word(b, 8),
            to: word(b, 16),
            len: word(b, 24),
        },
        uapi::UFFD_EVENT_FORK => {
            let mut w = [0u8; 4];
            w.copy_from_slice(&b[8..12]);
            Msg::Fork {
                fd: u32::from_ne_bytes(w) as i32,
            }
        }
        _ => Msg::Other { event },
    }
}

/// Reads as many whole messages as fit into `buf` without blocking; returns the number of
/// bytes read (0 when nothing was pending). Allocates nothing.
pub(crate) fn read_msgs(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    match rustix::io::read(fd, buf) {
        Ok(n) => Ok(n),
        Err(rustix::io::Errno::AGAIN) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// The identity of an open file (device and inode), to notice that a descriptor number now
/// names another file.
pub(crate) fn identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// The system page size.
pub(crate) fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// Borrows a raw descriptor number.
///
/// # Safety
///
/// `fd` must stay open for `'a`.
pub(crate) unsafe fn borrow_raw<'a>(fd: i32) -> BorrowedFd<'a> {
    // SAFETY: forwarded to the caller.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// The raw number of a descriptor (for logs and the fault-injection hooks).
pub(crate) fn raw(fd: &OwnedFd) -> i32 {
    fd.as_fd().as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_measured_values() {
        // Measured with a C probe on this machine kind (rust-ecosystem.md, Part B).
        assert_eq!(linux_raw_sys::ioctl::UFFDIO_API, 0xC018_AA3F);
        assert_eq!(linux_raw_sys::ioctl::UFFDIO_REGISTER, 0xC020_AA00);
    }

    #[test]
    fn decode_reads_the_payload_words() {
        let mut b = [0u8; MSG_SIZE];
        b[0] = uapi::UFFD_EVENT_REMAP as u8;
        b[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[16..24].copy_from_slice(&0x9000u64.to_ne_bytes());
        b[24..32].copy_from_slice(&0x2000u64.to_ne_bytes());
        assert_eq!(
            decode(&b),
            Msg::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            }
        );
        b[0] = uapi::UFFD_EVENT_UNMAP as u8;
        assert_eq!(
            decode(&b),
            Msg::Unmap {
                start: 0x1000,
                end: 0x9000
            }
        );
        b[0] = 0x12;
        assert_eq!(decode(&b), Msg::Other { event: 0x12 });
    }
}
