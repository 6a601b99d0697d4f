//! `/proc/self/maps`, `smaps`, `smaps_rollup` and `statm`: what a program reads about its own
//! memory matches what it mapped.

mod common;

use common::{Harness, Options, SCRATCH_LEN, TINY_BASE, err};

const PAGE: u64 = 4096;
const RW: u64 = (libc::PROT_READ | libc::PROT_WRITE) as u64;

/// Reads the whole of `path` through the process's own syscalls.
fn read_proc(h: &mut Harness, path: &str) -> String {
    let fd = h.open(path, libc::O_RDONLY, 0);
    assert!(fd >= 0, "open {path}: {fd}");
    let mut content = Vec::new();
    loop {
        let chunk = h.read_fd(fd, 0x4000).expect("read");
        if chunk.is_empty() {
            break;
        }
        content.extend_from_slice(&chunk);
    }
    assert_eq!(h.sys(libc::SYS_close, &[fd as u64]), 0);
    String::from_utf8(content).expect("utf-8")
}

/// The `maps` line whose range starts at `start`.
fn line_at(maps: &str, start: u64) -> Option<&str> {
    let prefix = format!("{start:08x}-");
    maps.lines().find(|line| line.starts_with(&prefix))
}

fn tiny() -> Harness {
    Harness::with(Options {
        spawn_tiny: true,
        ..Options::default()
    })
}

#[test]
fn maps_lists_program_heap_stack_files_and_anonymous_memory() {
    let mut h = tiny();
    let brk = h.sys(libc::SYS_brk, &[0]) as u64;
    h.sys(libc::SYS_brk, &[brk + 4 * PAGE]);
    let fd = h.open("/data/big.bin", libc::O_RDONLY, 0) as u64;
    let prot = libc::PROT_READ as u64;
    let file_map = h.sys(
        libc::SYS_mmap,
        &[0, 2 * PAGE, prot, libc::MAP_PRIVATE as u64, fd, PAGE],
    ) as u64;
    let anon = h.mmap_anon(3 * PAGE) as u64;

    let maps = read_proc(&mut h, "/proc/self/maps");
    let program = line_at(&maps, TINY_BASE).expect("program line");
    assert!(program.contains(" r-xp 00000000 00:2a "), "{program}");
    assert!(program.ends_with(" /bin/tiny"), "{program}");
    assert_eq!(
        program.find("/bin/tiny"),
        Some(73),
        "name column: {program}"
    );

    let heap = maps.lines().find(|l| l.ends_with("[heap]")).expect("heap");
    let heap_end = heap[9..17].parse::<String>().unwrap();
    assert_eq!(
        u64::from_str_radix(&heap_end, 16).unwrap(),
        brk.next_multiple_of(PAGE) + 4 * PAGE
    );
    assert!(maps.lines().last().unwrap().ends_with("[stack]"));

    let file = line_at(&maps, file_map).expect("file mapping line");
    assert!(
        file.contains(" r--p 00001000 00:2a "),
        "offset shown: {file}"
    );
    assert!(file.ends_with(" /data/big.bin"), "{file}");

    // An anonymous line ends in a space, as on Linux.
    let anon_line = line_at(&maps, anon).expect("anonymous line");
    let expected = format!("{anon:08x}-{file_map:08x} rw-p 00000000 00:00 0 ");
    assert_eq!(anon_line, expected);

    // After a partial mprotect the pieces are separate lines, file offsets kept.
    assert_eq!(h.sys(libc::SYS_mprotect, &[file_map + PAGE, PAGE, RW]), 0);
    let maps = read_proc(&mut h, "/proc/self/maps");
    let second = line_at(&maps, file_map + PAGE).expect("split line");
    assert!(second.contains(" rw-p 00002000 00:2a "), "{second}");
}

#[test]
fn smaps_reports_size_and_residency_and_rollup_sums_it() {
    let mut h = tiny();
    // The reads below go through the scratch mapping: make all of it resident first, so
    // residency holds still while the files are read.
    for page in 0..SCRATCH_LEN / PAGE {
        h.poke(h.scratch + page * PAGE, b"s");
    }
    let anon = h.mmap_anon(16 * PAGE) as u64;
    for page in 0..5 {
        h.poke(anon + page * PAGE, b"x");
    }
    let smaps = read_proc(&mut h, "/proc/self/smaps");
    let entry: Vec<&str> = smaps
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{anon:08x}-")))
        .take_while(|l| !l.starts_with("VmFlags"))
        .collect();
    let field = |name: &str| -> u64 {
        let line = entry
            .iter()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    // The entry is the mapping merged with the scratch above it.
    assert_eq!(field("Size"), (16 * PAGE + SCRATCH_LEN) / 1024);
    assert!(field("Rss") >= 5 * 4, "written pages are resident");
    assert_eq!(field("Private_Dirty"), field("Anonymous"));
    assert!(smaps.contains("VmFlags: rd wr mr mw me ac"));

    let rollup = read_proc(&mut h, "/proc/self/smaps_rollup");
    assert!(rollup.lines().next().unwrap().ends_with("[rollup]"));
    let total_rss: u64 = smaps
        .lines()
        .filter_map(|l| l.strip_prefix("Rss:"))
        .map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap())
        .sum();
    let rollup_rss: u64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .map(|v| v.trim().trim_end_matches(" kB").parse().unwrap())
        .unwrap();
    assert_eq!(rollup_rss, total_rss);

    let statm = read_proc(&mut h, "/proc/1/statm");
    let numbers: Vec<u64> = statm
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(numbers.len(), 7, "{statm}");
    assert_eq!(numbers[0], h.process.address_space().mapped_bytes() / PAGE);
    assert_eq!(numbers[1], total_rss / 4, "{statm}");
}

#[test]
fn proc_files_are_read_only_regular_files_that_seek() {
    let mut h = tiny();
    assert_eq!(
        h.open("/proc/self/maps", libc::O_WRONLY, 0),
        err(libc::EACCES)
    );
    let stat = h.stat("/proc/self/maps", 0).expect("stat");
    assert_eq!(stat.file_type(), libc::S_IFREG);
    let fd = h.open("/proc/thread-self/maps", libc::O_RDONLY, 0);
    assert_eq!(h.fstat(fd).unwrap().file_type(), libc::S_IFREG);
    let first = h.read_fd(fd, 10).unwrap();
    assert_eq!(
        h.sys(libc::SYS_lseek, &[fd as u64, 0, libc::SEEK_SET as u64]),
        0
    );
    assert_eq!(h.read_fd(fd, 10).unwrap(), first);
    assert_eq!(h.write_fd(fd, b"x"), err(libc::EBADF));
    assert_eq!(h.open("/proc/2/maps", libc::O_RDONLY, 0), err(libc::ENOENT));
}
