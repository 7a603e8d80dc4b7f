//! Real threads that exit inside and outside read sections (issue 11's per-thread read side),
//! next to the loom models of `src/tests/loom_fastread.rs`: grace periods must still complete,
//! and pairing must hold, when a guard ends during its thread's thread-local teardown and when
//! threads come and go while writers run. Every wait is bounded, so a hang fails the test.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use mmnotify::{
    Capabilities, Event, InvalidateGuard, Invalidation, Mm, Range, Refused, Subscriber,
};

#[derive(Default)]
struct Counting {
    starts: AtomicU64,
    ends: AtomicU64,
}

impl Subscriber for Counting {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_start().with_end()
    }
    fn invalidate_range_start(&self, _: &Invalidation) -> Result<(), Refused> {
        self.starts.fetch_add(1, SeqCst);
        Ok(())
    }
    fn invalidate_range_end(&self, _: &Invalidation) {
        self.ends.fetch_add(1, SeqCst);
    }
}

/// Runs `f` on its own thread and fails if it does not finish within 20 s.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} did not finish within 20 s (a grace period hung?)"))
}

thread_local! {
    /// A guard kept until the thread's thread-locals are destroyed.
    static HELD: RefCell<Option<InvalidateGuard<'static>>> = const { RefCell::new(None) };
}

/// A guard that ends during thread teardown: the thread touches `HELD` before its first read
/// section, so `HELD`'s destructor is registered before the engine's lease and (thread-local
/// destructors run in reverse order of registration with glibc) runs after it: the guard ends
/// after its thread gave its number up, through the orphan path (checked once with a print in
/// `leave_orphaned_section`, 2026-11-30). Its owed end is delivered,
/// and a later `register` (a grace period) and later threads' windows work normally.
#[test]
fn a_guard_ending_in_thread_teardown_is_waited_for_and_ended() {
    let mm: &'static Mm = Box::leak(Box::new(Mm::new()));
    let sub = Arc::new(Counting::default());
    mm.register(sub.clone()).unwrap();
    let range = Range::new(0x1000, 0x2000).unwrap();

    bounded("the exiting thread", move || {
        thread::spawn(move || {
            HELD.with(|_| {});
            let guard = mm.invalidate_start(range, Event::Unmap).unwrap();
            HELD.with(|held| *held.borrow_mut() = Some(guard));
        })
        .join()
        .unwrap();
    });
    assert_eq!(sub.starts.load(SeqCst), 1);
    assert_eq!(
        sub.ends.load(SeqCst),
        1,
        "the end owed by the guard ended in teardown"
    );

    let late = Arc::new(Counting::default());
    let late_in = late.clone();
    let id = bounded("register after the teardown", move || {
        mm.register(late_in).unwrap()
    });
    for _ in 0..4 {
        bounded("a later thread's window", move || {
            thread::spawn(move || mm.invalidate_start(range, Event::Unmap).unwrap().end())
                .join()
                .unwrap();
        });
    }
    assert_eq!(late.starts.load(SeqCst), 4);
    assert_eq!(late.ends.load(SeqCst), 4);
    bounded("unregister", move || mm.unregister(id).unwrap());
}

/// Threads keep starting, ending and exiting (so thread numbers are given back and reused,
/// more threads than the engine has own slots for at times) while writers register and
/// unregister: every start is ended, no grace period hangs, and the final statistics that
/// `unregister` returns match what the subscriber saw.
#[test]
fn threads_coming_and_going_while_writers_run() {
    let mm = Mm::new();
    let range = Range::new(0x1000, 0x2000).unwrap();
    let subs: Vec<_> = (0..3).map(|_| Arc::new(Counting::default())).collect();
    let ids: Vec<_> = subs
        .iter()
        .map(|s| mm.register(s.clone()).unwrap())
        .collect();

    let stop = Arc::new(AtomicU64::new(0));
    let writer = {
        let (mm, stop) = (mm.clone(), stop.clone());
        thread::spawn(move || {
            let mut rounds = 0u64;
            while stop.load(SeqCst) == 0 {
                let extra = Arc::new(Counting::default());
                let id = mm.register(extra.clone()).unwrap();
                let stats = mm.unregister(id).unwrap();
                assert_eq!(stats.starts, extra.starts.load(SeqCst));
                assert_eq!(stats.ends, extra.ends.load(SeqCst));
                assert_eq!(stats.starts, stats.ends);
                rounds += 1;
            }
            rounds
        })
    };
    let mm_for_waves = mm.clone();
    bounded("waves of short-lived threads", move || {
        for _wave in 0..20 {
            let threads: Vec<_> = (0..40)
                .map(|_| {
                    let mm = mm_for_waves.clone();
                    thread::spawn(move || {
                        for _ in 0..50 {
                            mm.invalidate_start(range, Event::Unmap).unwrap().end();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        }
    });
    stop.store(1, SeqCst);
    let rounds = bounded("the writer", move || writer.join().unwrap());
    assert!(rounds > 0, "the writer made no round");
    for (sub, id) in subs.iter().zip(ids) {
        let stats = mm.unregister(id).unwrap();
        assert_eq!(stats.starts, 20 * 40 * 50);
        assert_eq!(stats.ends, 20 * 40 * 50);
        assert_eq!(sub.starts.load(SeqCst), stats.starts);
        assert_eq!(sub.ends.load(SeqCst), stats.ends);
    }
}
