//! The io_uring fixed-buffer registrar: real pinning, like an RDMA memory registration.
//!
//! The ring keeps a *sparse* table of registered buffers (`IORING_RSRC_REGISTER_SPARSE`): all
//! slots start empty, and each registration fills one slot in place with
//! `IORING_REGISTER_BUFFERS_UPDATE` (the kernel pins the pages, `FOLL_WRITE | FOLL_LONGTERM`,
//! exactly as `ibv_reg_mr` does); a deregistration empties it again with an update to a null
//! buffer and the slot returns to the free list. `READ_FIXED` and `WRITE_FIXED` then move data
//! between a file and the *pinned pages*, whatever the process maps at that address by then:
//! which is why a stale registration silently reads or writes the wrong memory, and why the
//! acceptance tests judge staleness by what `WRITE_FIXED` actually wrote.
//!
//! The table's books (slots live, registrations, double releases) are kept for leak checks;
//! dropping the registrar closes the ring, which unpins whatever is still registered.

use crate::sync::Mutex;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use io_uring::{opcode, types, IoUring};

use crate::error::RegistrarError;
use crate::range::{Access, PageRange};
use crate::registrar::Registrar;

/// The largest buffer the kernel registers (1 GiB).
pub const MAX_FIXED_BUFFER: u64 = 1 << 30;

/// Why the io_uring registrar or one of its I/O helpers failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UringError {
    /// Creating the ring or its sparse buffer table failed.
    #[error("could not set up an io_uring with {slots} sparse buffer slots: {source}")]
    Setup {
        /// Slots asked for.
        slots: u32,
        /// The error.
        source: io::Error,
    },
    /// Every slot of the table holds a registration.
    #[error("all {slots} registered-buffer slots are in use")]
    TableFull {
        /// The table's size.
        slots: u32,
    },
    /// The range is larger than a fixed buffer may be.
    #[error("{range} is larger than the 1 GiB a registered buffer may be")]
    TooLarge {
        /// The range.
        range: PageRange,
    },
    /// The kernel refused to register (and pin) the range.
    #[error("the kernel refused to register {range} in slot {slot}: {source}")]
    Register {
        /// The range.
        range: PageRange,
        /// The slot tried.
        slot: u16,
        /// The kernel's error (EFAULT: not all mapped or not writable; EOPNOTSUPP: a file
        /// mapping the kernel does not pin long-term; ENOMEM: over RLIMIT_MEMLOCK).
        source: io::Error,
    },
    /// An I/O helper was asked to use bytes outside the registration.
    #[error("[{addr:#x}, +{len}) is not inside the registered buffer {range}")]
    OutsideBuffer {
        /// First byte asked for.
        addr: u64,
        /// Length asked for.
        len: u32,
        /// The registration.
        range: PageRange,
    },
    /// The kernel would not take a queued request, so it stays in the submission queue where
    /// a later submission would run it; the ring refuses every further I/O instead.
    #[error(
        "the io_uring would not take {op} on slot {slot} ({source}); the ring refuses further I/O"
    )]
    RingBroken {
        /// READ_FIXED or WRITE_FIXED.
        op: &'static str,
        /// The slot.
        slot: u16,
        /// The kernel's error (the one that broke it, or EIO for a later request).
        source: io::Error,
    },
    /// The I/O itself failed.
    #[error("{op} on slot {slot} failed: {source}")]
    Io {
        /// READ_FIXED or WRITE_FIXED.
        op: &'static str,
        /// The slot.
        slot: u16,
        /// The error.
        source: io::Error,
    },
}

/// A registration: one slot of the ring's buffer table.
#[derive(Debug)]
pub struct FixedBuffer {
    slot: u16,
    range: PageRange,
}

impl FixedBuffer {
    /// The slot (`buf_index` of `READ_FIXED`/`WRITE_FIXED`).
    pub fn slot(&self) -> u16 {
        self.slot
    }

    /// The registered range.
    pub fn range(&self) -> PageRange {
        self.range
    }
}

#[derive(Debug)]
struct Table {
    free: Vec<u16>,
    used: Vec<bool>,
    registered: u64,
    released: u64,
    double_releases: u64,
}

/// The table's books (for leak checks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotBooks {
    /// Slots in the table.
    pub slots: u32,
    /// Slots holding a registration now.
    pub live: u32,
    /// Registrations made.
    pub registered: u64,
    /// Registrations released.
    pub released: u64,
    /// Releases of a slot that was already free (a cache bug if ever nonzero).
    pub double_releases: u64,
}

/// A registrar over one io_uring's sparse registered-buffer table.
pub struct UringRegistrar {
    ring: Mutex<IoUring>,
    /// Set (under the ring's lock) when a queued request could not be submitted.
    broken: AtomicBool,
    table: Mutex<Table>,
    slots: u32,
}

impl std::fmt::Debug for UringRegistrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringRegistrar")
            .field("books", &self.books())
            .finish_non_exhaustive()
    }
}

impl UringRegistrar {
    /// A ring with a sparse table of `slots` buffer slots (at most 16 384, the kernel's limit).
    ///
    /// # Errors
    ///
    /// [`UringError::Setup`] when io_uring is unavailable or disabled, or refuses the table.
    pub fn new(slots: u32) -> Result<UringRegistrar, UringError> {
        let setup = |source| UringError::Setup { slots, source };
        let slots16 =
            u16::try_from(slots).map_err(|_| setup(io::Error::from_raw_os_error(libc::EINVAL)))?;
        let ring = IoUring::new(8).map_err(setup)?;
        ring.submitter()
            .register_buffers_sparse(slots)
            .map_err(setup)?;
        Ok(UringRegistrar {
            ring: Mutex::new(ring),
            broken: AtomicBool::new(false),
            table: Mutex::new(Table {
                free: (0..slots16).rev().collect(),
                used: vec![false; slots as usize],
                registered: 0,
                released: 0,
                double_releases: 0,
            }),
            slots,
        })
    }

    /// The table's books.
    pub fn books(&self) -> SlotBooks {
        let t = self.table.lock();
        SlotBooks {
            slots: self.slots,
            live: t.used.iter().filter(|u| **u).count() as u32,
            registered: t.registered,
            released: t.released,
            double_releases: t.double_releases,
        }
    }

    fn check_inside(buf: &FixedBuffer, addr: u64, len: u32) -> Result<(), UringError> {
        let inside = addr >= buf.range.start()
            && addr
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= buf.range.end());
        if inside {
            Ok(())
        } else {
            Err(UringError::OutsideBuffer {
                addr,
                len,
                range: buf.range,
            })
        }
    }

    /// Submits one request and returns its result, once its completion was reaped.
    ///
    /// INVARIANT: once the entry is queued this returns only after its completion was reaped
    /// (a request the kernel accepted runs to completion, so waiting ends), or after the kernel
    /// refused to take it at all, in which case the ring is marked broken so that nothing
    /// submits the left-over entry later. Returning while the I/O is in flight would let the
    /// caller release the buffer or descriptor under it, and the next call read its completion.
    fn submit(
        &self,
        op: &'static str,
        slot: u16,
        entry: io_uring::squeue::Entry,
    ) -> Result<usize, UringError> {
        let io = |source| UringError::Io { op, slot, source };
        let broken = |source| UringError::RingBroken { op, slot, source };
        let mut ring = self.ring.lock();
        if self.broken.load(Ordering::Relaxed) {
            return Err(broken(io::Error::from_raw_os_error(libc::EIO)));
        }
        // SAFETY: the entry refers to a registered buffer (pinned by the kernel, valid for the
        // I/O whatever happens to the mapping) and a file descriptor the caller owns; by the
        // INVARIANT above we return only after its completion (or with it never submitted and
        // the ring refusing further submissions), so nothing it refers to is released early.
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| io(io::Error::from_raw_os_error(libc::EBUSY)))?;
        let mut refusals = 0u32;
        loop {
            if let Some(cqe) = ring.completion().next() {
                let res = cqe.result();
                return if res < 0 {
                    Err(io(io::Error::from_raw_os_error(-res)))
                } else {
                    Ok(res as usize)
                };
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    let taken = ring.submission().is_empty();
                    let transient = matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY));
                    let retry = taken || (transient && refusals < 1000);
                    if !retry {
                        // Never taken, and not going to be: leave it unsubmitted for good.
                        self.broken.store(true, Ordering::Relaxed);
                        return Err(broken(e));
                    }
                    // Either in flight (keep waiting for its completion) or refused for now
                    // (the kernel is short of resources): try again shortly.
                    refusals = refusals.saturating_add(1);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// `WRITE_FIXED`: writes `len` bytes of the registered pages, from the bytes registered
    /// at `addr`, to `fd` at `offset`. The kernel reads the *pinned* pages, not whatever is
    /// mapped at `addr` now. Returns the bytes written.
    ///
    /// # Errors
    ///
    /// [`UringError::OutsideBuffer`], [`UringError::Io`].
    pub fn write_fixed(
        &self,
        buf: &FixedBuffer,
        addr: u64,
        len: u32,
        fd: RawFd,
        offset: u64,
    ) -> Result<usize, UringError> {
        Self::check_inside(buf, addr, len)?;
        let e = opcode::WriteFixed::new(types::Fd(fd), addr as *const u8, len, buf.slot)
            .offset(offset)
            .build();
        self.submit("WRITE_FIXED", buf.slot, e)
    }

    /// `READ_FIXED`: reads `len` bytes from `fd` at `offset` into the registered pages, at the
    /// bytes registered at `addr`. Returns the bytes read.
    ///
    /// # Safety
    ///
    /// The kernel writes the pinned pages: while the registration is valid these are the
    /// memory at `addr`, so the caller must ensure nothing else reads or writes those bytes
    /// during the call (as for any buffer handed to a device).
    ///
    /// # Errors
    ///
    /// [`UringError::OutsideBuffer`], [`UringError::Io`].
    pub unsafe fn read_fixed(
        &self,
        buf: &FixedBuffer,
        addr: u64,
        len: u32,
        fd: RawFd,
        offset: u64,
    ) -> Result<usize, UringError> {
        Self::check_inside(buf, addr, len)?;
        let e = opcode::ReadFixed::new(types::Fd(fd), addr as *mut u8, len, buf.slot)
            .offset(offset)
            .build();
        self.submit("READ_FIXED", buf.slot, e)
    }

    fn update(&self, slot: u16, iov: libc::iovec) -> io::Result<()> {
        let ring = self.ring.lock();
        // SAFETY: registering asks the kernel to pin the pages behind `iov` (it checks the
        // range is mapped and fails otherwise); the pinned pages stay valid for the kernel
        // until the slot is updated again or the ring closes, independently of our mapping.
        // The null iovec empties the slot.
        unsafe {
            ring.submitter()
                .register_buffers_update(u32::from(slot), &[iov], None)
        }
    }
}

impl Registrar for UringRegistrar {
    type Handle = FixedBuffer;

    fn register(&self, range: PageRange, _access: Access) -> Result<FixedBuffer, RegistrarError> {
        if range.len() > MAX_FIXED_BUFFER {
            return Err(Box::new(UringError::TooLarge { range }));
        }
        let slot = {
            let mut t = self.table.lock();
            let slot = t
                .free
                .pop()
                .ok_or(UringError::TableFull { slots: self.slots })?;
            t.used[usize::from(slot)] = true;
            slot
        };
        let iov = libc::iovec {
            iov_base: range.start() as *mut libc::c_void,
            iov_len: range.len() as usize,
        };
        let result = self.update(slot, iov);
        let mut t = self.table.lock();
        match result {
            Ok(()) => {
                t.registered += 1;
                Ok(FixedBuffer { slot, range })
            }
            Err(source) => {
                t.used[usize::from(slot)] = false;
                t.free.push(slot);
                Err(Box::new(UringError::Register {
                    range,
                    slot,
                    source,
                }))
            }
        }
    }

    fn deregister(&self, handle: &FixedBuffer) {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // An update to an empty buffer cannot fail on a valid slot of a live ring; if it did,
        // the pages stay pinned until the ring closes (at drop), never longer.
        let _ = self.update(handle.slot, empty);
        let mut t = self.table.lock();
        let used = &mut t.used[usize::from(handle.slot)];
        if *used {
            *used = false;
            t.free.push(handle.slot);
            t.released += 1;
        } else {
            t.double_releases += 1;
        }
    }
}
