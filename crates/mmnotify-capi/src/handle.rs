//! Handle tables: what a C caller holds instead of a pointer.
//!
//! A C API that hands out raw pointers cannot tell a live object from a freed one, or a
//! subscription from a cache: every misuse is undefined behaviour. Each kind of object here
//! lives in a table instead, and the caller holds a 64-bit handle:
//!
//! ```text
//!   63      56 55            32 31             0
//!   +--------+----------------+----------------+
//!   |  kind  |   generation   |     index      |
//!   +--------+----------------+----------------+
//! ```
//!
//! * `index` names a slot of the kind's table;
//! * `generation` is the slot's generation when the object was stored; freeing the object
//!   bumps it (never to 0), so a stale handle to a reused slot no longer matches;
//! * `kind` differs per table, so a subscription handle passed where a cache is expected is
//!   refused instead of being looked up in the wrong table.
//!
//! The all-zero handle is never valid (generations start at 1), so zero-initialised C structs
//! hold a recognisably invalid handle. A lookup clones the object's `Arc` under the table's
//! lock and releases the lock at once: no lock of this module is held while the object is
//! used, so a callback may use handles of any table.

use std::sync::Arc;

use crate::error::{CError, Code};
use crate::sync::Mutex;

const INDEX_BITS: u32 = 32;
const GEN_BITS: u32 = 24;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
const KIND_SHIFT: u32 = INDEX_BITS + GEN_BITS;

/// The kinds of handle, one per table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Interval = 0x11,
    Cache = 0x22,
    Region = 0x33,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Interval => "an interval subscription",
            Kind::Cache => "a registration cache",
            Kind::Region => "a cache region",
        }
    }
}

struct Slot<T> {
    generation: u64,
    value: Option<Arc<T>>,
}

struct Inner<T> {
    slots: Vec<Slot<T>>,
    free: Vec<usize>,
    live: usize,
}

/// One table of objects of one kind.
pub(crate) struct Table<T> {
    kind: Kind,
    inner: Mutex<Inner<T>>,
}

impl<T> Table<T> {
    pub(crate) const fn new(kind: Kind) -> Self {
        Table {
            kind,
            inner: Mutex::new(Inner {
                slots: Vec::new(),
                free: Vec::new(),
                live: 0,
            }),
        }
    }

    /// Stores `value`; returns its handle.
    pub(crate) fn insert(&self, value: Arc<T>) -> Result<u64, CError> {
        let mut inner = self.inner.lock();
        let index = match inner.free.pop() {
            Some(i) => i,
            None => {
                if inner.slots.len() >= u32::MAX as usize {
                    return Err(CError::new(
                        Code::NoSpace,
                        format!("the table for {} is full", self.kind.name()),
                    ));
                }
                inner.slots.push(Slot {
                    generation: 1,
                    value: None,
                });
                inner.slots.len() - 1
            }
        };
        let slot = &mut inner.slots[index];
        slot.value = Some(value);
        let generation = slot.generation;
        inner.live += 1;
        Ok(((self.kind as u64) << KIND_SHIFT) | (generation << INDEX_BITS) | index as u64)
    }

    fn decode(&self, handle: u64) -> Result<(usize, u64), CError> {
        let kind = handle >> KIND_SHIFT;
        if kind != self.kind as u64 {
            let what = [Kind::Interval, Kind::Cache, Kind::Region]
                .into_iter()
                .find(|k| *k as u64 == kind)
                .map_or("not a handle of this library", Kind::name);
            return Err(CError::new(
                Code::BadHandle,
                format!(
                    "handle {handle:#x} is not {} (it is: {what})",
                    self.kind.name()
                ),
            ));
        }
        Ok((
            (handle & ((1 << INDEX_BITS) - 1)) as usize,
            (handle >> INDEX_BITS) & GEN_MASK,
        ))
    }

    fn stale(&self, handle: u64) -> CError {
        CError::new(
            Code::BadHandle,
            format!(
                "handle {handle:#x} does not name {} that is alive (already released, or never issued)",
                self.kind.name()
            ),
        )
    }

    /// The object behind `handle`.
    pub(crate) fn get(&self, handle: u64) -> Result<Arc<T>, CError> {
        let (index, generation) = self.decode(handle)?;
        let inner = self.inner.lock();
        match inner.slots.get(index) {
            Some(Slot {
                generation: g,
                value: Some(v),
            }) if *g == generation => Ok(Arc::clone(v)),
            _ => Err(self.stale(handle)),
        }
    }

    /// Removes the object behind `handle` (the handle, and every copy of it, goes stale).
    pub(crate) fn remove(&self, handle: u64) -> Result<Arc<T>, CError> {
        let (index, generation) = self.decode(handle)?;
        let mut inner = self.inner.lock();
        let value = match inner.slots.get_mut(index) {
            Some(slot) if slot.generation == generation && slot.value.is_some() => {
                let v = slot.value.take();
                slot.generation = match (slot.generation + 1) & GEN_MASK {
                    0 => 1,
                    g => g,
                };
                v
            }
            _ => None,
        };
        match value {
            Some(v) => {
                inner.free.push(index);
                inner.live -= 1;
                Ok(v)
            }
            None => Err(self.stale(handle)),
        }
    }

    /// How many objects are stored.
    pub(crate) fn live(&self) -> usize {
        self.inner.lock().live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_foreign_and_zero_handles_are_refused() {
        let a: Table<u32> = Table::new(Kind::Interval);
        let b: Table<u32> = Table::new(Kind::Cache);
        let h = a.insert(Arc::new(7)).unwrap();
        assert_eq!(*a.get(h).unwrap(), 7);
        assert_eq!(b.get(h).unwrap_err().code, Code::BadHandle);
        assert_eq!(a.get(0).unwrap_err().code, Code::BadHandle);
        a.remove(h).unwrap();
        assert_eq!(a.get(h).unwrap_err().code, Code::BadHandle);
        assert_eq!(a.remove(h).unwrap_err().code, Code::BadHandle);
        // The slot is reused with a new generation: the old handle stays stale.
        let h2 = a.insert(Arc::new(8)).unwrap();
        assert_ne!(h, h2);
        assert_eq!(h & 0xffff_ffff, h2 & 0xffff_ffff);
        assert_eq!(a.get(h).unwrap_err().code, Code::BadHandle);
        assert_eq!(*a.get(h2).unwrap(), 8);
        assert_eq!(a.live(), 1);
    }
}
