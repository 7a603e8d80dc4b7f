//! A model of the loom harness itself: a deadlock found by loom fails its own test, and only
//! that one.
//!
//! When loom finds a deadlock it panics, and the engine's destructors run while that panic
//! unwinds, with no loom thread active any more. They used to call into loom again (a read
//! section ending, a thread mark being removed), panic inside a destructor during cleanup, and
//! so abort the whole test binary: every other model's result was lost with it. They now skip
//! their bookkeeping in that situation (`sync::unwinding_under_loom`).

use std::sync::Arc;

use loom::thread;

use super::loom_util::{model, range};
use crate::{Capabilities, Event, Invalidation, Mm, Refused, Subscriber};

/// A start/end subscriber whose callbacks do nothing.
struct Quiet;

impl Subscriber for Quiet {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }

    fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
        Ok(())
    }
}

/// A deliberately deadlocking model: the main thread holds an invalidation guard (an open
/// read section, a thread mark, a snapshot holding the last reference to a registration that
/// `put` unlinked) and joins a thread whose `synchronize` waits for that very read section.
/// Loom reports the deadlock on the main thread, and the panic unwinds through the guard.
///
/// Shown to matter: without the `unwinding_under_loom` checks in the engine's destructors this
/// test aborted the test binary ("panic in a destructor during cleanup", from `Scope::drop`
/// asking loom for its thread-local with no active thread) instead of passing as
/// `should_panic`.
#[test]
#[should_panic(expected = "deadlock")]
fn loom_deadlock_fails_only_its_own_test() {
    model(|| {
        let mm = Mm::new();
        let id = mm.get_or_register(|| Arc::new(Quiet)).unwrap();
        let writer = {
            let mm = mm.clone();
            thread::spawn(move || mm.synchronize().unwrap())
        };
        let guard = mm
            .invalidate_start(range(0x1000, 0x2000), Event::Unmap)
            .unwrap();
        // The guard's snapshot now holds the last reference to the registration.
        mm.put(id).unwrap();
        // Lets the writer block first, so that loom reports the deadlock on this thread.
        thread::yield_now();
        writer.join().unwrap();
        guard.end();
    });
}
