//! Memory syscalls (mmap, munmap, mremap, mprotect, brk, madvise), the memory limit, and
//! pointer checking on user buffers.

mod common;

use common::{BIG_LEN, HELLO, Harness, Options, RAM_SIZE, SCRATCH_LEN, err};
use forkvm_kernel::Limits;
use forkvm_kernel::loader::STACK_SIZE;

const PAGE: u64 = 4096;
const RW: u64 = (libc::PROT_READ | libc::PROT_WRITE) as u64;
const PRIVATE: u64 = libc::MAP_PRIVATE as u64;
const ANON: u64 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;

fn map_file(h: &mut Harness, fd: i64, len: u64, offset: u64) -> i64 {
    let prot = libc::PROT_READ as u64;
    h.sys(libc::SYS_mmap, &[0, len, prot, PRIVATE, fd as u64, offset])
}

/// True when the host mapping starting at `host_addr` is the test image file (from
/// `/proc/self/maps`): the zero-copy path for page-aligned image files was taken.
fn image_mapped_at(host_addr: u64) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines().any(|line| {
        let start = line.split('-').next().expect("range");
        u64::from_str_radix(start, 16) == Ok(host_addr) && line.ends_with("test.img")
    })
}

#[test]
fn anonymous_mmap_is_zeroed_and_munmap_makes_it_efault() {
    let mut h = Harness::new();
    let addr = h.mmap_anon(3 * PAGE);
    assert!(addr > 0);
    let addr = addr as u64;
    assert!(addr.is_multiple_of(PAGE));
    assert_eq!(
        addr + 3 * PAGE,
        h.scratch,
        "placed top-down, right below the scratch"
    );
    assert_eq!(h.peek(addr, 3 * PAGE as usize), vec![0; 3 * PAGE as usize]);
    h.poke(addr + 100, b"dirty");

    let fd = h.open("/etc/hello.txt", libc::O_RDONLY, 0) as u64;
    assert_eq!(
        h.sys(libc::SYS_read, &[fd, addr, 5]),
        5,
        "mapped: read works"
    );
    assert_eq!(h.sys(libc::SYS_munmap, &[addr, 3 * PAGE]), 0);
    assert!(!h.process.address_space().is_mapped(addr, 1));
    assert_eq!(h.sys(libc::SYS_read, &[fd, addr, 5]), err(libc::EFAULT));
    assert_eq!(
        h.sys(libc::SYS_read, &[fd, addr + 2 * PAGE, 5]),
        err(libc::EFAULT)
    );

    // The same range handed out again reads as zero.
    let again = h.mmap_anon(3 * PAGE) as u64;
    assert_eq!(again, addr);
    assert_eq!(h.peek(addr, 3 * PAGE as usize), vec![0; 3 * PAGE as usize]);

    assert_eq!(
        h.sys(libc::SYS_munmap, &[addr + 1, PAGE]),
        err(libc::EINVAL)
    );
    assert_eq!(h.sys(libc::SYS_munmap, &[addr, 0]), err(libc::EINVAL));
}

#[test]
fn a_huge_unmap_notes_only_ram_as_reachable() {
    // The fuzzer's case: munmap from the scratch's end with a length near 2^63. What the
    // guest can reach is noted per 32 MiB chunk of RAM: a range beyond RAM must not be
    // walked chunk by chunk (it would take years), only clipped.
    let mut h = Harness::new();
    let len = 0x7800_0000_0000_0000u64 - 1;
    let answer = h.sys(libc::SYS_munmap, &[h.scratch + SCRATCH_LEN, len]);
    assert!(answer == 0 || answer == err(libc::EINVAL), "{answer}");
    let ram = h.process.ram();
    let reach_end = ram.reach().ranges(ram.size()).last().map(|r| r.1);
    assert!(reach_end <= Some(ram.size()));
    assert!(h.mmap_anon(PAGE) > 0, "the process goes on");
}

#[test]
fn partial_munmap_splits_a_mapping() {
    let mut h = Harness::new();
    let addr = h.mmap_anon(4 * PAGE) as u64;
    h.poke(addr, b"keep");
    h.poke(addr + PAGE, b"drop");
    assert_eq!(h.sys(libc::SYS_munmap, &[addr + PAGE, PAGE]), 0);
    let space = h.process.address_space();
    assert!(space.is_mapped(addr, PAGE));
    assert!(!space.is_mapped(addr + PAGE, 1));
    assert!(space.is_mapped(addr + 2 * PAGE, 2 * PAGE));
    assert_eq!(h.peek(addr, 4), b"keep");
    // Mapped again, the page reads as zero.
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    assert_eq!(
        h.sys(
            libc::SYS_mmap,
            &[addr + PAGE, PAGE, prot as u64, flags as u64, u64::MAX, 0]
        ),
        (addr + PAGE) as i64
    );
    assert_eq!(h.peek(addr + PAGE, 4), [0; 4]);
}

#[test]
fn mmap_argument_errors() {
    let mut h = Harness::new();
    let fd = h.open("/etc/hello.txt", libc::O_RDONLY, 0);
    assert_eq!(h.mmap_anon(0), err(libc::EINVAL));
    assert_eq!(
        map_file(&mut h, fd, PAGE, 100),
        err(libc::EINVAL),
        "unaligned offset"
    );
    assert_eq!(map_file(&mut h, 55, PAGE, 0), err(libc::EBADF));
    assert_eq!(map_file(&mut h, 1, PAGE, 0), err(libc::ENODEV), "stdout");
    let wronly = h.open("/tmp/w", libc::O_CREAT | libc::O_WRONLY, 0o644);
    assert_eq!(map_file(&mut h, wronly, PAGE, 0), err(libc::EACCES));
    let shared_write = (libc::MAP_SHARED) as u64;
    assert_eq!(
        h.sys(libc::SYS_mmap, &[0, PAGE, RW, shared_write, fd as u64, 0]),
        err(libc::EACCES),
        "a writable shared mapping of a file open read-only"
    );
    let no_type = libc::MAP_ANONYMOUS as u64;
    assert_eq!(
        h.sys(libc::SYS_mmap, &[0, PAGE, RW, no_type, u64::MAX, 0]),
        err(libc::EINVAL)
    );
    let fixed = ANON | libc::MAP_FIXED as u64;
    assert_eq!(
        h.sys(libc::SYS_mmap, &[0x20_0123, PAGE, RW, fixed, u64::MAX, 0]),
        err(libc::EINVAL),
        "unaligned MAP_FIXED"
    );
    assert_eq!(
        h.sys(libc::SYS_mmap, &[0x1000, PAGE, RW, fixed, u64::MAX, 0]),
        err(libc::ENOMEM),
        "below the user range"
    );
    assert_eq!(
        h.sys(libc::SYS_mmap, &[RAM_SIZE, PAGE, RW, fixed, u64::MAX, 0]),
        err(libc::ENOMEM),
        "beyond guest RAM"
    );
    assert_eq!(
        h.mmap_anon(u64::MAX),
        err(libc::ENOMEM),
        "length overflows when page-aligned"
    );
}

#[test]
fn map_fixed_replaces_and_noreplace_refuses() {
    let mut h = Harness::new();
    let fixed = ANON | libc::MAP_FIXED as u64;
    let at = 0x20_0000;
    assert_eq!(
        h.sys(libc::SYS_mmap, &[at, 2 * PAGE, RW, fixed, u64::MAX, 0]),
        at as i64
    );
    h.poke(at + PAGE, b"old");
    assert_eq!(
        h.sys(libc::SYS_mmap, &[at + PAGE, PAGE, RW, fixed, u64::MAX, 0]),
        (at + PAGE) as i64
    );
    assert_eq!(
        h.peek(at + PAGE, 3),
        [0; 3],
        "MAP_FIXED replaces with zero pages"
    );
    let noreplace = ANON | libc::MAP_FIXED_NOREPLACE as u64;
    assert_eq!(
        h.sys(libc::SYS_mmap, &[at, PAGE, RW, noreplace, u64::MAX, 0]),
        err(libc::EEXIST)
    );
    assert_eq!(
        h.sys(
            libc::SYS_mmap,
            &[at + 2 * PAGE, PAGE, RW, noreplace, u64::MAX, 0]
        ),
        (at + 2 * PAGE) as i64
    );
    // A non-fixed hint is honoured when free.
    assert_eq!(
        h.sys(libc::SYS_mmap, &[0x30_0000, PAGE, RW, ANON, u64::MAX, 0]),
        0x30_0000
    );
}

#[test]
fn mmap_of_page_aligned_big_file_maps_its_content() {
    let mut h = Harness::new();
    let fd = h.open("/data/big.bin", libc::O_RDONLY, 0);
    let addr = map_file(&mut h, fd, BIG_LEN as u64, 0);
    assert!(addr > 0, "mmap: {addr}");
    let addr = addr as u64;
    let mapped_len = 5 * PAGE as usize;
    assert!(h.process.address_space().is_mapped(addr, mapped_len as u64));
    let bytes = h.peek(addr, mapped_len);
    let expected: Vec<u8> = (0..BIG_LEN).map(common::big_byte).collect();
    assert_eq!(&bytes[..BIG_LEN], &expected[..]);
    assert_eq!(
        &bytes[BIG_LEN..],
        &vec![0; mapped_len - BIG_LEN][..],
        "past EOF is zero"
    );

    // At an offset, and longer than the file: pages wholly past EOF are zero too.
    let at = map_file(&mut h, fd, 6 * PAGE, 2 * PAGE) as u64;
    let bytes = h.peek(at, 6 * PAGE as usize);
    let tail = BIG_LEN - 2 * PAGE as usize;
    assert_eq!(&bytes[..tail], &expected[2 * PAGE as usize..]);
    assert!(bytes[tail..].iter().all(|&b| b == 0));

    // The whole pages are the image file's own pages (no copy), at the file's data offset.
    let host = h.process.ram().host_base();
    assert!(
        image_mapped_at(host + addr),
        "big.bin pages are not mapped from the image"
    );
    assert!(
        image_mapped_at(host + at),
        "offset mapping is not mapped from the image"
    );

    // Writing the private mapping does not change the file, and unmapping discards it.
    h.poke(addr, b"XXXX");
    let buf = h.at(0);
    assert_eq!(h.sys(libc::SYS_pread64, &[fd as u64, buf, 4, 0]), 4);
    assert_eq!(h.peek(buf, 4), &expected[..4]);
    assert_eq!(h.sys(libc::SYS_munmap, &[addr, BIG_LEN as u64]), 0);
    let fixed = ANON | libc::MAP_FIXED as u64;
    assert_eq!(
        h.sys(libc::SYS_mmap, &[addr, 5 * PAGE, RW, fixed, u64::MAX, 0]),
        addr as i64
    );
    assert_eq!(
        h.peek(addr, mapped_len),
        vec![0; mapped_len],
        "old file pages are gone"
    );
}

#[test]
fn mmap_of_small_file_zero_fills_the_page() {
    let mut h = Harness::new();
    let fd = h.open("/etc/hello.txt", libc::O_RDONLY, 0);
    let addr = map_file(&mut h, fd, HELLO.len() as u64, 0) as u64;
    let page = h.peek(addr, PAGE as usize);
    assert_eq!(&page[..HELLO.len()], HELLO);
    assert!(page[HELLO.len()..].iter().all(|&b| b == 0));
    let host = h.process.ram().host_base();
    assert!(
        !image_mapped_at(host + addr),
        "a small file is copied, not mapped"
    );
    // An offset past the end maps only zeros.
    let past = map_file(&mut h, fd, PAGE, PAGE) as u64;
    assert_eq!(h.peek(past, PAGE as usize), vec![0; PAGE as usize]);
}

#[test]
fn mmap_of_an_overlay_file_maps_written_content() {
    let mut h = Harness::new();
    let fd = h.open("/tmp/data", libc::O_CREAT | libc::O_RDWR, 0o644);
    assert_eq!(h.write_fd(fd, b"overlay bytes"), 13);
    let addr = map_file(&mut h, fd, PAGE, 0) as u64;
    assert_eq!(h.peek(addr, 14), b"overlay bytes\0");
}

#[test]
fn brk_grows_and_shrinks() {
    let mut h = Harness::with(Options {
        spawn_tiny: true,
        ..Options::default()
    });
    let start = h.sys(libc::SYS_brk, &[0]) as u64;
    assert_eq!(
        start,
        common::TINY_BASE + 0x3000,
        "break starts after the loaded program"
    );
    assert_eq!(
        h.sys(libc::SYS_brk, &[start + 0x4800]) as u64,
        start + 0x4800
    );
    assert!(h.process.address_space().is_mapped(start, 0x5000));
    assert!(!h.process.address_space().is_mapped(start + 0x5000, 1));
    h.poke(start + 0x3000, b"heap");
    assert_eq!(
        h.sys(libc::SYS_brk, &[start + 0x1000]) as u64,
        start + 0x1000
    );
    assert!(!h.process.address_space().is_mapped(start + 0x1000, 1));
    assert_eq!(
        h.sys(libc::SYS_brk, &[start + 0x4000]) as u64,
        start + 0x4000
    );
    assert_eq!(
        h.peek(start + 0x3000, 4),
        [0; 4],
        "shrunk heap pages come back zeroed"
    );
    assert_eq!(
        h.sys(libc::SYS_brk, &[start - 1]) as u64,
        start + 0x4000,
        "below start"
    );
    assert_eq!(
        h.sys(libc::SYS_brk, &[RAM_SIZE]) as u64,
        start + 0x4000,
        "into the stack"
    );
    assert_eq!(h.sys(libc::SYS_brk, &[u64::MAX]) as u64, start + 0x4000);
}

#[test]
fn mremap_grows_in_place_or_moves() {
    let mut h = Harness::new();
    // Room above: map four pages, free the top two, then grow back without moving.
    let addr = h.mmap_anon(4 * PAGE) as u64;
    assert_eq!(h.sys(libc::SYS_munmap, &[addr + 2 * PAGE, 2 * PAGE]), 0);
    assert_eq!(
        h.sys(libc::SYS_mremap, &[addr, 2 * PAGE, 4 * PAGE, 0]),
        addr as i64
    );
    assert!(h.process.address_space().is_mapped(addr, 4 * PAGE));

    // No room above (the first mapping sits right there): must move.
    let low = h.mmap_anon(2 * PAGE) as u64;
    assert_eq!(low + 2 * PAGE, addr);
    h.poke(low + 10, b"moved data");
    h.poke(low + PAGE + 10, b"second page");
    assert_eq!(
        h.sys(libc::SYS_mremap, &[low, 2 * PAGE, 8 * PAGE, 0]),
        err(libc::ENOMEM),
        "no MREMAP_MAYMOVE"
    );
    let maymove = libc::MREMAP_MAYMOVE as u64;
    let moved = h.sys(libc::SYS_mremap, &[low, 2 * PAGE, 8 * PAGE, maymove]);
    assert!(moved > 0, "mremap: {moved}");
    let moved = moved as u64;
    assert_ne!(moved, low);
    assert_eq!(h.peek(moved + 10, 10), b"moved data");
    assert_eq!(h.peek(moved + PAGE + 10, 11), b"second page");
    assert_eq!(
        h.peek(moved + 2 * PAGE, 6 * PAGE as usize),
        vec![0; 6 * PAGE as usize]
    );
    let space = h.process.address_space();
    assert!(space.is_mapped(moved, 8 * PAGE));
    assert!(!space.is_mapped(low, 1), "the old range is unmapped");

    // Shrinking keeps the start and unmaps the tail.
    assert_eq!(
        h.sys(libc::SYS_mremap, &[moved, 8 * PAGE, PAGE, 0]),
        moved as i64
    );
    assert!(!h.process.address_space().is_mapped(moved + PAGE, 1));
    assert_eq!(
        h.sys(libc::SYS_mremap, &[moved + PAGE, PAGE, 2 * PAGE, maymove]),
        err(libc::EFAULT),
        "old range not mapped"
    );
}

#[test]
fn mprotect_needs_a_mapping() {
    let mut h = Harness::new();
    let addr = h.mmap_anon(2 * PAGE) as u64;
    assert_eq!(
        h.sys(libc::SYS_mprotect, &[addr, PAGE, libc::PROT_READ as u64]),
        0
    );
    let space = h.process.address_space();
    assert_eq!(space.vma_at(addr).unwrap().prot, libc::PROT_READ as u32);
    assert_eq!(space.vma_at(addr + PAGE).unwrap().prot, RW as u32);
    assert_eq!(
        h.sys(libc::SYS_mprotect, &[0x20_0000, PAGE, RW]),
        err(libc::ENOMEM)
    );
    assert_eq!(
        h.sys(libc::SYS_mprotect, &[addr, 64 * PAGE, RW]),
        err(libc::ENOMEM),
        "runs past the mapping"
    );
    assert_eq!(
        h.sys(libc::SYS_mprotect, &[addr + 1, PAGE, RW]),
        err(libc::EINVAL)
    );
}

#[test]
fn madvise_dontneed_zeroes() {
    let mut h = Harness::new();
    let addr = h.mmap_anon(2 * PAGE) as u64;
    h.poke(addr, b"gone");
    h.poke(addr + PAGE, b"kept");
    let dontneed = libc::MADV_DONTNEED as u64;
    assert_eq!(h.sys(libc::SYS_madvise, &[addr, PAGE, dontneed]), 0);
    assert_eq!(h.peek(addr, 4), [0; 4]);
    assert_eq!(h.peek(addr + PAGE, 4), b"kept");
    assert_eq!(
        h.sys(libc::SYS_madvise, &[0x20_0000, PAGE, dontneed]),
        err(libc::ENOMEM)
    );
}

#[test]
fn the_kernel_writes_only_where_the_program_may() {
    let mut h = Harness::new();
    let addr = h.mmap_anon(PAGE) as u64;
    let fd = h.open("/etc/hello.txt", libc::O_RDONLY, 0) as u64;
    let read_only = libc::PROT_READ as u64;
    assert_eq!(h.sys(libc::SYS_mprotect, &[addr, PAGE, read_only]), 0);
    // As Linux's copy_to_user: a read-only buffer is a bad address, and stays untouched.
    assert_eq!(h.sys(libc::SYS_read, &[fd, addr, 5]), err(libc::EFAULT));
    assert_eq!(h.peek(addr, 5), vec![0; 5]);
    assert_eq!(h.sys(libc::SYS_mprotect, &[addr, PAGE, RW]), 0);
    assert_eq!(h.sys(libc::SYS_read, &[fd, addr, 5]), 5);
}

#[test]
fn bad_user_pointers_are_efault() {
    let mut h = Harness::new();
    let fd = h.open("/etc/hello.txt", libc::O_RDONLY, 0) as u64;
    let unmapped = 0x20_0000;
    assert_eq!(h.sys(libc::SYS_read, &[fd, unmapped, 4]), err(libc::EFAULT));
    assert_eq!(
        h.sys(libc::SYS_read, &[fd, 0, 4]),
        err(libc::EFAULT),
        "NULL"
    );
    assert_eq!(
        h.sys(libc::SYS_read, &[fd, RAM_SIZE - 4, 8]),
        err(libc::EFAULT),
        "past RAM"
    );
    assert_eq!(
        h.sys(libc::SYS_read, &[fd, RAM_SIZE + PAGE, 8]),
        err(libc::EFAULT)
    );
    assert_eq!(
        h.sys(libc::SYS_read, &[fd, u64::MAX - 3, 8]),
        err(libc::EFAULT),
        "wraps"
    );
    let end = h.scratch + SCRATCH_LEN;
    assert_eq!(
        h.sys(libc::SYS_read, &[fd, end - 4, 8]),
        err(libc::EFAULT),
        "straddles"
    );
    assert_eq!(
        h.sys(libc::SYS_read, &[fd, end - 4, u64::MAX]),
        err(libc::EFAULT)
    );
    assert_eq!(
        h.sys(libc::SYS_lseek, &[fd, 0, libc::SEEK_CUR as u64]),
        0,
        "failed reads consume nothing"
    );
    // The top of the stack is mapped right up to the page-table pool at the end of RAM,
    // which no program can touch.
    let top = forkvm_kernel::pagetable::PageTables::for_ram(RAM_SIZE).user_end();
    assert_eq!(h.sys(libc::SYS_read, &[fd, top - 5, 5]), 5);
    assert_eq!(h.peek(top - 5, 5), b"hello");
    assert_eq!(h.sys(libc::SYS_read, &[fd, top, 5]), err(libc::EFAULT));

    assert_eq!(h.sys(libc::SYS_write, &[1, unmapped, 4]), err(libc::EFAULT));
    assert_eq!(h.sys(libc::SYS_write, &[1, u64::MAX, 2]), err(libc::EFAULT));
    assert!(h.stdout.bytes().is_empty());
    let path = h.cstr(0, "/etc/hello.txt");
    assert_eq!(
        h.sys(
            libc::SYS_newfstatat,
            &[libc::AT_FDCWD as u64, path, unmapped, 0]
        ),
        err(libc::EFAULT)
    );
    assert_eq!(h.sys(libc::SYS_open, &[unmapped, 0, 0]), err(libc::EFAULT));
    // An iovec array that is fine but points at unmapped memory.
    let iov = h.at(0x100);
    h.poke(iov, &unmapped.to_le_bytes());
    h.poke(iov + 8, &4u64.to_le_bytes());
    assert_eq!(h.sys(libc::SYS_readv, &[fd, iov, 1]), err(libc::EFAULT));
    assert_eq!(
        h.sys(libc::SYS_readv, &[fd, unmapped, 1]),
        err(libc::EFAULT)
    );
    assert_eq!(h.sys(libc::SYS_readv, &[fd, iov, 5000]), err(libc::EINVAL));
}

#[test]
fn memory_limit_refuses_big_mappings() {
    let limit = STACK_SIZE + (1 << 20);
    let mut h = Harness::with(Options {
        limits: Limits {
            memory_bytes: limit,
            open_files: 64,
        },
        ..Options::default()
    });
    assert_eq!(
        h.process.address_space().mapped_bytes(),
        STACK_SIZE + SCRATCH_LEN
    );
    assert_eq!(h.mmap_anon(2 << 20), err(libc::ENOMEM));
    let half = h.mmap_anon(512 << 10);
    assert!(half > 0);
    let rest = limit - STACK_SIZE - SCRATCH_LEN - (512 << 10);
    assert_eq!(h.mmap_anon(rest + PAGE), err(libc::ENOMEM));
    let last = h.mmap_anon(rest);
    assert!(last > 0);
    assert_eq!(h.process.address_space().mapped_bytes(), limit);
    assert_eq!(h.mmap_anon(PAGE), err(libc::ENOMEM));
    assert_eq!(
        h.sys(
            libc::SYS_mremap,
            &[half as u64, 512 << 10, 1 << 20, libc::MREMAP_MAYMOVE as u64]
        ),
        err(libc::ENOMEM)
    );
    // Freeing makes room again.
    assert_eq!(h.sys(libc::SYS_munmap, &[half as u64, 512 << 10]), 0);
    assert!(h.mmap_anon(256 << 10) > 0);
}

const HUGE: u64 = 2 << 20;

/// The host's view of the host mapping that contains `host_addr` (from this test process's
/// own `/proc/self/smaps`): its `VmFlags` line and its `AnonHugePages` in KiB.
fn host_smaps_at(host_addr: u64) -> (String, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
    let mut inside = false;
    let (mut flags, mut huge_kib) = (String::new(), 0);
    for line in smaps.lines() {
        let range = line.split(' ').next().unwrap_or("");
        if let Some((start, end)) = range.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            inside = (start..end).contains(&host_addr);
            continue;
        }
        if !inside {
            continue;
        }
        if let Some(rest) = line.strip_prefix("VmFlags:") {
            flags = rest.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("AnonHugePages:") {
            huge_kib = rest.trim().trim_end_matches(" kB").parse().unwrap_or(0);
        }
    }
    (flags, huge_kib)
}

/// Whether this host gives transparent huge pages to `MADV_HUGEPAGE` ranges.
fn host_has_thp() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|mode| mode.contains("[always]") || mode.contains("[madvise]"))
}

#[test]
fn large_anonymous_mappings_get_huge_page_backing() {
    let mut h = Harness::new();
    let len = 9 * HUGE + 5 * PAGE;
    let addr = h.mmap_anon(len) as u64;
    let host = h.process.ram().host_base();
    // Every 2 MiB block that lies inside the mapping is advised for huge pages on the host
    // ("hg"); the mapping's top block is shared with the scratch mapping above it, so it
    // keeps its 4 KiB pages.
    let first_block = addr.next_multiple_of(HUGE);
    let (flags, _) = host_smaps_at(host + first_block);
    assert!(flags.contains("hg"), "interior block not advised: {flags}");
    let top_block = (addr + len - 1) & !(HUGE - 1);
    if top_block + HUGE > h.scratch {
        let (flags, _) = host_smaps_at(host + top_block);
        assert!(
            !flags.contains("hg"),
            "block shared with the scratch: {flags}"
        );
    }
    // Reads as zero; written pages keep their bytes; the guest sees ordinary memory.
    assert_eq!(h.peek(addr, 64), vec![0; 64]);
    for offset in (0..len).step_by(PAGE as usize) {
        h.poke(addr + offset, &[0xa5]);
    }
    assert_eq!(h.peek(addr + len - PAGE, 1), vec![0xa5]);
    if host_has_thp() {
        let (_, huge_kib) = host_smaps_at(host + first_block);
        assert!(huge_kib >= 2048, "no huge page behind a touched block");
    }
    // Unmapping discards the contents: mapped again, the range reads as zero.
    assert_eq!(h.sys(libc::SYS_munmap, &[addr, len]), 0);
    assert_eq!(h.mmap_anon(len) as u64, addr);
    assert_eq!(h.peek(addr + len - PAGE, 1), vec![0]);
    assert_eq!(h.peek(first_block + HUGE, 1), vec![0]);
    // And its blocks are on huge pages again (the part of the lowest huge page that lay
    // below the mapping stays resident, but does not stop the others).
    let (flags, _) = host_smaps_at(host + first_block + HUGE);
    assert!(flags.contains("hg"), "not advised after a remap: {flags}");
}

#[test]
fn small_mappings_and_thread_stacks_stay_on_small_pages() {
    let mut h = Harness::new();
    let host = h.process.ram().host_base();
    let small = h.mmap_anon(64 * 1024) as u64;
    let (flags, _) = host_smaps_at(host + small);
    assert!(
        !flags.contains("hg"),
        "a 64 KiB mapping was advised: {flags}"
    );
    let stack_flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK) as u64;
    let stack = h.sys(libc::SYS_mmap, &[0, 8 << 20, RW, stack_flags, u64::MAX, 0]) as u64;
    let (flags, _) = host_smaps_at(host + stack.next_multiple_of(HUGE));
    assert!(!flags.contains("hg"), "a thread stack was advised: {flags}");
}

#[test]
fn the_heap_gets_huge_page_backing_as_it_grows_into_new_blocks() {
    let mut h = Harness::with(Options {
        spawn_tiny: true,
        ..Options::default()
    });
    let host = h.process.ram().host_base();
    let start = h.sys(libc::SYS_brk, &[0]) as u64;
    // The heap's first block holds the program's data too: never swapped.
    h.poke(start, b"heap data");
    let top = h.sys(libc::SYS_brk, &[start + 3 * HUGE]) as u64;
    assert_eq!(top, start + 3 * HUGE);
    assert_eq!(h.peek(start, 9), b"heap data");
    let (flags, _) = host_smaps_at(host + (start & !(HUGE - 1)));
    assert!(
        !flags.contains("hg"),
        "the program's block was swapped: {flags}"
    );
    let next_block = start.next_multiple_of(HUGE);
    let (flags, _) = host_smaps_at(host + next_block);
    assert!(
        flags.contains("hg"),
        "the heap's new block is not advised: {flags}"
    );
    // Growing by a page into a block already backed does nothing visible.
    h.poke(top - 1, &[7]);
    let top = h.sys(libc::SYS_brk, &[top + PAGE]) as u64;
    assert_eq!(h.peek(top - PAGE - 1, 1), vec![7]);
}

#[test]
fn small_fresh_mappings_are_populated_on_the_host_and_reservations_are_not() {
    let mut h = Harness::new();
    let resident = |h: &Harness, addr: u64, len: u64| {
        h.process
            .ram()
            .residency(addr, addr + len)
            .unwrap()
            .resident_pages
    };
    let small = h.mmap_anon(320 << 10) as u64;
    assert_eq!(
        resident(&h, small, 320 << 10),
        80,
        "a malloc-sized block is populated"
    );
    assert_eq!(h.peek(small, 4096), vec![0; 4096]);
    let reserve = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE) as u64;
    let sparse = h.sys(libc::SYS_mmap, &[0, 256 << 10, RW, reserve, u64::MAX, 0]) as u64;
    assert_eq!(
        resident(&h, sparse, 256 << 10),
        0,
        "MAP_NORESERVE is left alone"
    );
    let none = h.sys(libc::SYS_mmap, &[0, 256 << 10, 0, ANON, u64::MAX, 0]) as u64;
    assert_eq!(resident(&h, none, 256 << 10), 0, "PROT_NONE is left alone");
}

#[test]
fn shared_file_mappings_and_the_file_see_each_others_writes() {
    let mut h = Harness::new();
    let fd = h.open("/tmp/shared", libc::O_CREAT | libc::O_RDWR, 0o644);
    let zeros = h.at(0x4000);
    h.poke(zeros, &[0u8; 8192]);
    assert_eq!(h.sys(libc::SYS_write, &[fd as u64, zeros, 8192]), 8192);
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let map = |h: &mut Harness, fd: i64| {
        h.sys(
            libc::SYS_mmap,
            &[0, 8192, rw, libc::MAP_SHARED as u64, fd as u64, 0],
        )
    };
    let addr = map(&mut h, fd) as u64;
    // The program writes through the mapping; a read of the file sees it at once.
    h.poke(addr + 10, b"mapped");
    let buf = h.at(0x100);
    assert_eq!(h.sys(libc::SYS_pread64, &[fd as u64, buf, 6, 10]), 6);
    assert_eq!(h.peek(buf, 6), b"mapped");
    // A write to the file shows in the mapping.
    h.poke(buf, b"written");
    assert_eq!(h.sys(libc::SYS_pwrite64, &[fd as u64, buf, 7, 4096]), 7);
    assert_eq!(h.peek(addr + 4096, 7), b"written");
    // msync and munmap keep what was written last.
    h.poke(addr + 8000, b"tail");
    assert_eq!(
        h.sys(libc::SYS_msync, &[addr, 8192, libc::MS_SYNC as u64]),
        0
    );
    assert_eq!(h.sys(libc::SYS_munmap, &[addr, 8192]), 0);
    assert_eq!(h.sys(libc::SYS_pread64, &[fd as u64, buf, 4, 8000]), 4);
    assert_eq!(h.peek(buf, 4), b"tail");
    assert_eq!(h.fstat(fd).unwrap().size, 8192, "the file did not grow");
    // Writing through a shared mapping needs a file open for writing.
    let read_only = h.open("/tmp/shared", libc::O_RDONLY, 0);
    assert_eq!(map(&mut h, read_only), err(libc::EACCES));
    assert_eq!(
        h.sys(libc::SYS_msync, &[addr + 1, 4096, libc::MS_SYNC as u64]),
        err(libc::EINVAL)
    );
}

/// A reservation larger than RAM (V8's 10 GiB per WebAssembly memory) goes above RAM;
/// the part made accessible is real memory the kernel reads and writes through, charged to
/// the limit; the rest faults; unmapping gives the memory back.
#[test]
fn reservations_larger_than_ram_live_above_it_and_their_accessible_part_is_memory() {
    use forkvm_kernel::high::{HIGH_END, HIGH_START};
    let mut h = Harness::new();
    let none = libc::PROT_NONE as u64;
    let noreserve = ANON | libc::MAP_NORESERVE as u64;
    let reserve =
        |h: &mut Harness, len: u64| h.sys(libc::SYS_mmap, &[0, len, none, noreserve, u64::MAX, 0]);
    let big = 10 << 30;
    let base = reserve(&mut h, big) as u64;
    assert!((HIGH_START..HIGH_END).contains(&base), "{base:#x}");
    let charged = h.process.address_space().charged_bytes();
    // Inaccessible until made accessible.
    let fd = h.open("/etc/hello.txt", libc::O_RDONLY, 0) as u64;
    assert_eq!(h.sys(libc::SYS_read, &[fd, base, 5]), err(libc::EFAULT));
    assert_eq!(h.sys(libc::SYS_mprotect, &[base, 16 * PAGE, RW]), 0);
    assert_eq!(
        h.process.address_space().charged_bytes(),
        charged + 16 * PAGE + 3 * PAGE,
        "the backing and three levels of tables (pointers, directory, table) and no more"
    );
    assert_eq!(
        h.sys(libc::SYS_read, &[fd, base + PAGE - 2, 5]),
        5,
        "across a page"
    );
    let (r, w) = {
        let fds = h.at(0x100);
        assert_eq!(h.sys(libc::SYS_pipe2, &[fds, 0]), 0);
        let bytes = h.peek(fds, 8);
        (
            i32::from_le_bytes(bytes[..4].try_into().unwrap()) as u64,
            i32::from_le_bytes(bytes[4..].try_into().unwrap()) as u64,
        )
    };
    assert_eq!(h.sys(libc::SYS_write, &[w, base + PAGE - 2, 5]), 5);
    let out = h.at(0x200);
    assert_eq!(h.sys(libc::SYS_read, &[r, out, 5]), 5);
    assert_eq!(h.peek(out, 5), &HELLO[..5]);
    // Past the accessible part: the guard.
    assert_eq!(
        h.sys(libc::SYS_read, &[fd, base + 16 * PAGE - 2, 5]),
        err(libc::EFAULT)
    );
    // Read-only now: the kernel may not write there, but may read.
    assert_eq!(
        h.sys(libc::SYS_mprotect, &[base, PAGE, libc::PROT_READ as u64]),
        0
    );
    assert_eq!(h.sys(libc::SYS_read, &[fd, base, 5]), err(libc::EFAULT));
    assert_eq!(h.sys(libc::SYS_write, &[w, base + PAGE - 2, 2]), 2);
    // DONTNEED zeroes it; the contents were kept across the protection change.
    assert_eq!(h.sys(libc::SYS_read, &[r, out, 2]), 2);
    assert_eq!(h.peek(out, 2), &HELLO[..2]);
    assert_eq!(
        h.sys(libc::SYS_madvise, &[base, PAGE, libc::MADV_DONTNEED as u64]),
        0
    );
    assert_eq!(h.sys(libc::SYS_write, &[w, base + PAGE - 2, 2]), 2);
    assert_eq!(h.sys(libc::SYS_read, &[r, out, 2]), 2);
    assert_eq!(h.peek(out, 2), [0, 0]);
    // Decommitted with MAP_FIXED, as V8 does: inaccessible, backing given back.
    let fixed = ANON | libc::MAP_FIXED as u64;
    assert_eq!(
        h.sys(libc::SYS_mmap, &[base, 16 * PAGE, none, fixed, u64::MAX, 0]),
        base as i64
    );
    assert_eq!(h.sys(libc::SYS_write, &[w, base, 1]), err(libc::EFAULT));
    assert_eq!(
        h.process.address_space().charged_bytes(),
        charged + 3 * PAGE,
        "only the tables stay"
    );
    // Hidden memory is the kernel's: the program cannot map over or unmap it.
    let hidden = h
        .process
        .address_space()
        .vmas()
        .find(|v| v.kind == forkvm_kernel::mm::VmaKind::Hidden)
        .map(|v| v.start)
        .unwrap();
    assert_eq!(
        h.sys(libc::SYS_mmap, &[hidden, PAGE, RW, fixed, u64::MAX, 0]),
        err(libc::ENOMEM)
    );
    assert_eq!(h.sys(libc::SYS_munmap, &[hidden, PAGE]), 0);
    assert!(h.process.address_space().vmas().any(|v| v.start == hidden));
    assert_eq!(h.sys(libc::SYS_read, &[fd, hidden, 1]), err(libc::EFAULT));
    // /proc/self/maps shows the reservation, not the hidden pages.
    let maps =
        String::from_utf8(h.process.proc_file(forkvm_kernel::procfs::ProcFile::Maps)).unwrap();
    assert!(
        maps.contains(&format!("{base:x}-{:x} ---p", base + big)),
        "{maps}"
    );
    assert_eq!(h.sys(libc::SYS_munmap, &[base, big]), 0);
    assert_eq!(
        h.sys(libc::SYS_mprotect, &[base, PAGE, RW]),
        err(libc::ENOMEM)
    );
    // Reservations the window cannot hold fail as on a full address space.
    for _ in 0..50 {
        assert!(reserve(&mut h, big) > 0);
    }
    assert_eq!(reserve(&mut h, big), err(libc::ENOMEM));
    // Small reservations stay in RAM.
    assert!((reserve(&mut h, 4 * PAGE) as u64) < HIGH_START);
}
