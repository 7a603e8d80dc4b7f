//! Bad input to the simulator is a typed error whose message carries the values (the
//! simulator's counterpart of I1), and nothing changes, except where Linux applies a call
//! piecewise before failing on a hole (madvise, mprotect, migrate, reclaim: see
//! tests/fidelity.rs).

use mmnotify::Policy;
use mmnotify_sim::{Access, Backing, FileId, Prot, Sharing, SimError, SimMm, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

fn sim() -> SimMm {
    SimMm::new(Policy::Exact)
}

#[test]
fn misaligned_addresses_are_rejected() {
    let s = sim();
    let e = s
        .mmap(
            Some(0x1000_0001),
            P,
            Prot::READ,
            Backing::Anonymous,
            Sharing::Private,
        )
        .unwrap_err();
    assert_eq!(e, SimError::Misaligned { addr: 0x1000_0001 });
    assert!(e.to_string().contains("0x10000001"), "{e}");
    let a = s.mmap_anon(2 * P).unwrap();
    assert_eq!(
        s.munmap(a + 1, P),
        Err(SimError::Misaligned { addr: a + 1 })
    );
    assert_eq!(
        s.mprotect(a + 8, P, Prot::READ),
        Err(SimError::Misaligned { addr: a + 8 })
    );
    let file = Backing::File {
        file: FileId(1),
        offset: 100,
    };
    assert_eq!(
        s.mmap(None, P, Prot::READ, file, Sharing::Shared),
        Err(SimError::Misaligned { addr: 100 })
    );
    assert_eq!(s.vmas().len(), 1);
}

#[test]
fn zero_lengths_are_rejected() {
    let s = sim();
    assert_eq!(
        s.mmap_anon(0),
        Err(SimError::ZeroLength {
            addr: mmnotify_sim::MMAP_BASE
        })
    );
    let a = s.mmap_anon(P).unwrap();
    let e = s.munmap(a, 0).unwrap_err();
    assert_eq!(e, SimError::ZeroLength { addr: a });
    assert!(e.to_string().contains(&format!("{a:#x}")), "{e}");
    assert_eq!(
        s.madvise_dontneed(a, 0),
        Err(SimError::ZeroLength { addr: a })
    );
}

#[test]
fn invalid_protections_are_rejected() {
    let s = sim();
    let e = s
        .mmap(
            None,
            P,
            Prot::WRITE_ONLY,
            Backing::Anonymous,
            Sharing::Private,
        )
        .unwrap_err();
    assert_eq!(
        e,
        SimError::InvalidProtection {
            prot: Prot::WRITE_ONLY
        }
    );
    assert!(e.to_string().contains("-w-"), "{e}");
    let a = s.mmap_anon(P).unwrap();
    assert_eq!(
        s.mprotect(a, P, Prot::WRITE_ONLY),
        Err(SimError::InvalidProtection {
            prot: Prot::WRITE_ONLY
        })
    );
    assert_eq!(s.vmas()[0].prot, Prot::READ_WRITE);
}

#[test]
fn overlapping_fixed_mmap_is_rejected() {
    let s = sim();
    s.mmap(
        Some(0x2000_0000),
        4 * P,
        Prot::READ,
        Backing::Anonymous,
        Sharing::Private,
    )
    .unwrap();
    let e = s
        .mmap(
            Some(0x2000_2000),
            4 * P,
            Prot::READ,
            Backing::Anonymous,
            Sharing::Private,
        )
        .unwrap_err();
    assert_eq!(
        e,
        SimError::Overlap {
            start: 0x2000_2000,
            end: 0x2000_6000,
            existing_start: 0x2000_0000,
            existing_end: 0x2000_4000
        }
    );
    assert!(
        e.to_string().contains("0x20002000") && e.to_string().contains("0x20004000"),
        "{e}"
    );
    assert_eq!(s.vmas().len(), 1);
}

#[test]
fn unmapped_addresses_are_rejected() {
    let s = sim();
    let e = s.fault(0x7777_0000, Access::Read).unwrap_err();
    assert_eq!(e, SimError::Unmapped { addr: 0x7777_0000 });
    assert!(e.to_string().contains("0x77770000"), "{e}");
    let a = s
        .mmap(
            Some(0x3000_0000),
            P,
            Prot::READ_WRITE,
            Backing::Anonymous,
            Sharing::Private,
        )
        .unwrap();
    // A hole right after the mapping: the call fails with the hole (Linux's ENOMEM), after
    // doing what Linux does before it.
    assert_eq!(
        s.mprotect(a, 2 * P, Prot::READ),
        Err(SimError::Unmapped { addr: a + P })
    );
    assert_eq!(
        s.madvise_dontneed(a, 2 * P),
        Err(SimError::Unmapped { addr: a + P })
    );
    assert_eq!(
        s.migrate(a + P, P, None),
        Err(SimError::Unmapped { addr: a + P })
    );
    assert_eq!(
        s.mremap(0x3100_0000, P, 0x3200_0000),
        Err(SimError::Unmapped { addr: 0x3100_0000 })
    );
}

#[test]
fn access_violations_and_bad_mremaps_are_rejected() {
    let s = sim();
    let ro = s
        .mmap(None, P, Prot::READ, Backing::Anonymous, Sharing::Private)
        .unwrap();
    let e = s.fault(ro, Access::Write).unwrap_err();
    assert_eq!(
        e,
        SimError::AccessViolation {
            addr: ro,
            access: Access::Write,
            prot: Prot::READ
        }
    );
    assert!(
        e.to_string().contains("write") && e.to_string().contains("r--"),
        "{e}"
    );
    let none = s
        .mmap(None, P, Prot::NONE, Backing::Anonymous, Sharing::Private)
        .unwrap();
    assert!(matches!(
        s.fault(none, Access::Read),
        Err(SimError::AccessViolation { .. })
    ));
    // ro and none are adjacent: a range over both is not one mapping.
    assert_eq!(
        s.mremap(ro, 2 * P, 0x5000_0000),
        Err(SimError::NotOneMapping {
            addr: ro,
            len: 2 * P
        })
    );
    // Source and destination overlap (Linux's EINVAL); nothing moves.
    let three = s.mmap_anon(3 * P).unwrap();
    assert_eq!(
        s.mremap(three, 2 * P, three + P),
        Err(SimError::Overlap {
            start: three + P,
            end: three + 3 * P,
            existing_start: three,
            existing_end: three + 2 * P
        })
    );
    assert_eq!(s.vmas().len(), 3);
    assert!(matches!(
        s.munmap(u64::MAX - P + 1, 2 * P),
        Err(SimError::AddressOverflow { .. })
    ));
}

#[test]
fn operations_after_exit_are_rejected() {
    let s = sim();
    let a = s.mmap_anon(P).unwrap();
    s.exit().unwrap();
    assert_eq!(s.fault(a, Access::Read), Err(SimError::Exited));
    assert_eq!(s.mmap_anon(P), Err(SimError::Exited));
    assert!(matches!(s.fork(), Err(SimError::Exited)));
    assert!(matches!(
        mmnotify_sim::process_mrelease(&s),
        Err(SimError::Exited)
    ));
}
