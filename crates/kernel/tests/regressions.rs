//! Hostile-argument cases that once crashed (or still crash) the syscall layer. A syscall
//! must answer every argument with a value or `-errno`; a panic or stack overflow would take
//! the VMM thread down with it.

mod common;

use common::{Harness, Options, err};
use forkvm_kernel::Limits;

const PAGE: u64 = 4096;
const RW: u64 = (libc::PROT_READ | libc::PROT_WRITE) as u64;
const ANON: u64 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;

#[test]
fn mremap_to_a_huge_length_is_enomem() {
    let mut h = Harness::new();
    let addr = h.mmap_anon(PAGE) as u64;
    let maymove = libc::MREMAP_MAYMOVE as u64;
    assert_eq!(
        h.sys(
            libc::SYS_mremap,
            &[addr, PAGE, u64::MAX - 2 * PAGE, maymove]
        ),
        err(libc::ENOMEM)
    );
    assert_eq!(
        h.sys(libc::SYS_mremap, &[addr, PAGE, u64::MAX - 2 * PAGE, 0]),
        err(libc::ENOMEM)
    );
    assert!(h.process.address_space().is_mapped(addr, PAGE));
}

#[test]
fn map_fixed_noreplace_at_the_top_of_the_address_space_is_enomem() {
    let mut h = Harness::new();
    let noreplace = ANON | libc::MAP_FIXED_NOREPLACE as u64;
    let top = !(PAGE - 1);
    assert_eq!(
        h.sys(libc::SYS_mmap, &[top, 2 * PAGE, RW, noreplace, u64::MAX, 0]),
        err(libc::ENOMEM)
    );
    let fixed = ANON | libc::MAP_FIXED as u64;
    assert_eq!(
        h.sys(libc::SYS_mmap, &[top, 2 * PAGE, RW, fixed, u64::MAX, 0]),
        err(libc::ENOMEM)
    );
}

#[test]
fn stat_of_proc_self_cwd_named_like_itself_terminates() {
    let mut h = Harness::new();
    for dir in ["/proc", "/proc/self", "/proc/self/cwd"] {
        let p = h.cstr(0x100, dir);
        // `/proc` is the sandbox's own now: these may already exist.
        let made = h.sys(libc::SYS_mkdir, &[p, 0o755]);
        assert!(
            made == 0 || made == err(libc::EEXIST),
            "mkdir {dir}: {made}"
        );
    }
    let p = h.cstr(0x100, "/proc/self/cwd");
    assert_eq!(h.sys(libc::SYS_chdir, &[p]), 0);
    match h.stat("/proc/self/cwd", 0) {
        Ok(st) => assert_eq!(st.file_type(), libc::S_IFDIR),
        Err(e) => assert_eq!(e, err(libc::ELOOP)),
    }
}

#[test]
fn path_pointer_in_the_last_page_is_efault() {
    let mut h = Harness::new();
    for addr in [u64::MAX - 255, u64::MAX, !(PAGE - 1)] {
        assert_eq!(h.sys(libc::SYS_mkdir, &[addr, 0o755]), err(libc::EFAULT));
        assert_eq!(h.sys(libc::SYS_open, &[addr, 0, 0]), err(libc::EFAULT));
    }
}

/// Found by the fuzzer as a broken harness invariant: a reservation (`MAP_STACK` or
/// `MAP_NORESERVE`) larger than what the limit has left is mapped but not charged, while an
/// ordinary mapping of the same size is refused; either way the charge stays within the limit.
#[test]
fn reservations_past_the_memory_limit_are_mapped_but_not_charged() {
    let limit = forkvm_kernel::loader::STACK_SIZE + (8 << 20);
    let mut h = Harness::with(Options {
        limits: Limits {
            memory_bytes: limit,
            ..Limits::default()
        },
        ..Options::default()
    });
    let len = 2446 * PAGE;
    let charged_before = h.process.address_space().charged_bytes();
    assert!(charged_before + len > limit);
    assert_eq!(
        h.sys(libc::SYS_mmap, &[0, len, RW, ANON, u64::MAX, 0]),
        err(libc::ENOMEM)
    );
    for extra in [libc::MAP_STACK, libc::MAP_NORESERVE] {
        let flags = ANON | extra as u64;
        let addr = h.sys(libc::SYS_mmap, &[0, len, 0, flags, u64::MAX, 0]);
        assert!(addr > 0, "reservation refused: {addr}");
        let space = h.process.address_space();
        assert!(space.is_mapped(addr as u64, len));
        assert_eq!(space.charged_bytes(), charged_before);
        assert!(space.charged_bytes() <= space.limit_bytes());
        assert_eq!(h.sys(libc::SYS_munmap, &[addr as u64, len]), 0);
    }
}
