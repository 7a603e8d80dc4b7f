//! The registrar: what the cache caches.
//!
//! A registrar turns a page range into a *registration* (an RDMA memory region, an io_uring
//! fixed-buffer slot, a GPU mapping: pinned pages a device can use) and back. It is the
//! expensive part, which is why the cache exists. The cache promises a registrar three things:
//!
//! 1. **No lock the invalidation path needs is held** while `register` or `deregister` runs.
//!    Deregistration may free memory, which unmaps, which sends an event, which runs the
//!    cache's invalidation callback; registration may fault pages in. Either may therefore
//!    re-enter the cache's invalidation path, and neither can deadlock on it.
//! 2. **Every successful `register` is matched by exactly one `deregister`**, on some thread
//!    that is not the watcher's dispatcher holding cache state: at the last put of a region,
//!    at eviction, at a flush of invalidated regions, when a registration collided with an
//!    invalidation and is thrown away, or when the cache is dropped.
//! 3. **Errors and panics are contained**: a `register` error reaches the caller of `get` as
//!    [`Error::Registrar`](crate::Error::Registrar) with the error inside, a panic as
//!    [`Error::RegistrarPanicked`](crate::Error::RegistrarPanicked); a panic in `deregister`
//!    is counted in the statistics. The cache is consistent afterwards in each case.

use crate::error::RegistrarError;
use crate::range::{Access, PageRange};

/// Registers and deregisters memory for a device (UCX's `mem_reg`/`mem_dereg`).
pub trait Registrar: Send + Sync + 'static {
    /// What a registration is (a key, a slot, a handle); handed to holders of a region.
    type Handle: Send + Sync + 'static;

    /// Registers `range` (page-aligned, mapped at the time the cache checked) for `access`.
    ///
    /// # Errors
    ///
    /// Whatever the device reports (access refused, out of resources, memory gone): it reaches
    /// the caller of `get` unchanged inside [`Error::Registrar`](crate::Error::Registrar).
    fn register(&self, range: PageRange, access: Access) -> Result<Self::Handle, RegistrarError>;

    /// Releases a registration. Called exactly once per handle `register` returned.
    fn deregister(&self, handle: &Self::Handle);
}

/// A shared registrar (so that the I/O helpers of a registrar stay reachable while a cache
/// owns it) registers through the registrar it points to.
impl<R: Registrar> Registrar for std::sync::Arc<R> {
    type Handle = R::Handle;

    fn register(&self, range: PageRange, access: Access) -> Result<Self::Handle, RegistrarError> {
        (**self).register(range, access)
    }

    fn deregister(&self, handle: &Self::Handle) {
        (**self).deregister(handle)
    }
}
