//! Processes without KVM: fork with its own memory, vfork borrowing it, wait statuses,
//! signals between processes, groups and sessions, pipes across processes, execve's errors
//! and `#!` lines, and the process limit.

mod common;

use std::sync::Arc;

use common::{Harness, err};
use forkvm_kernel::{ExitReason, Machine, Outcome};
use forkvm_memory::ram::GuestRam;

const WNOHANG: u64 = 1;
const ANY: u64 = u64::MAX; // pid -1

/// Fresh RAM without a VMM's system area: enough for the loader.
struct AnonymousRam;

impl Machine for AnonymousRam {
    fn fresh_ram(&self, size: u64) -> Result<GuestRam, String> {
        GuestRam::anonymous(size).map_err(|e| e.to_string())
    }
}

/// Runs the next thread after a switch (`Outcome::Reschedule`): what the VMM does.
fn run_next(h: &mut Harness) -> Outcome {
    h.process.resume(&mut h.ctx, &mut h.fpu)
}

fn status_at(h: &Harness, addr: u64) -> i32 {
    i32::from_le_bytes(h.peek(addr, 4).try_into().unwrap())
}

#[test]
fn a_forked_child_has_its_own_memory_and_its_parent_reaps_its_status() {
    let mut h = Harness::new();
    let marker = h.at(0x300);
    h.poke(marker, b"before");
    let child = h.sys(libc::SYS_fork, &[]);
    assert_eq!(child, 2);
    h.poke(marker, b"parent");
    let status = h.at(0x200);
    assert_eq!(
        h.sys(libc::SYS_wait4, &[child as u64, status, WNOHANG, 0]),
        0
    );
    assert_eq!(
        h.call(libc::SYS_wait4, &[ANY, status, 0, 0]),
        Outcome::Reschedule
    );
    assert_eq!(h.process.pid(), 2);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.ctx.regs.rax, 0, "fork returns 0 in the child");
    assert_eq!(h.peek(marker, 6), b"before", "the child's copy is its own");
    h.poke(marker, b"child!");
    assert_eq!(h.sys(libc::SYS_getpid, &[]), 2);
    assert_eq!(h.sys(libc::SYS_getppid, &[]), 1);
    assert_eq!(h.call(libc::SYS_exit_group, &[3]), Outcome::Reschedule);
    assert_eq!(h.process.pid(), 1);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.peek(marker, 6), b"parent");
    // The wait is made again (the VMM resumes at the `syscall` instruction).
    assert_eq!(h.sys(libc::SYS_wait4, &[ANY, status, 0, 0]), child);
    assert_eq!(status_at(&h, status), 3 << 8);
    assert_eq!(
        h.sys(libc::SYS_wait4, &[ANY, status, 0, 0]),
        err(libc::ECHILD)
    );
    assert_eq!(h.process.process_count(), 1);
    assert_eq!(
        h.process.take_retired_ram().len(),
        1,
        "the child's RAM goes"
    );
}

#[test]
fn a_vfork_child_borrows_its_parents_memory_and_the_parent_waits() {
    let mut h = Harness::new();
    let marker = h.at(0x300);
    assert_eq!(h.call(libc::SYS_vfork, &[]), Outcome::Reschedule);
    assert_eq!(h.process.pid(), 2);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.ctx.regs.rax, 0);
    h.poke(marker, b"shared");
    assert_eq!(h.call(libc::SYS_exit_group, &[0]), Outcome::Reschedule);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.process.pid(), 1);
    assert_eq!(h.ctx.regs.rax, 2, "vfork returns the child's pid");
    assert_eq!(h.peek(marker, 6), b"shared", "one memory for both");
    assert!(
        h.process.take_retired_ram().is_empty(),
        "the memory was lent"
    );
}

#[test]
fn a_signal_to_another_process_ends_it_and_its_parent_sees_how() {
    let mut h = Harness::new();
    let child = h.sys(libc::SYS_fork, &[]) as u64;
    assert_eq!(h.sys(libc::SYS_kill, &[999, 0]), err(libc::ESRCH));
    // Its default action ends the child at once: it would run none of its code first.
    assert_eq!(h.sys(libc::SYS_kill, &[child, libc::SIGTERM as u64]), 0);
    let status = h.at(0x200);
    assert_eq!(
        h.sys(libc::SYS_wait4, &[ANY, status, WNOHANG, 0]),
        child as i64
    );
    assert_eq!(status_at(&h, status), libc::SIGTERM);
    // One it handles is delivered when it runs.
    let handled = h.sys(libc::SYS_fork, &[]) as u64;
    assert_eq!(
        h.call(libc::SYS_wait4, &[ANY, status, 0, 0]),
        Outcome::Reschedule
    );
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.process.pid(), handled as u32);
    let action = h.at(0x600);
    h.poke(
        action,
        &[1u64.to_le_bytes(), [0; 8], [0; 8], [0; 8]].concat(),
    ); // SIG_IGN
    let usr1 = libc::SIGUSR1 as u64;
    assert_eq!(h.sys(libc::SYS_rt_sigaction, &[usr1, action, 0, 8]), 0);
    assert_eq!(h.sys(libc::SYS_kill, &[1, 0]), 0);
    assert_eq!(h.call(libc::SYS_exit_group, &[4]), Outcome::Reschedule);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.sys(libc::SYS_wait4, &[ANY, status, 0, 0]), handled as i64);
    assert_eq!(status_at(&h, status), 4 << 8);
}

#[test]
fn groups_and_sessions() {
    let mut h = Harness::new();
    assert_eq!(h.sys(libc::SYS_getpgid, &[0]), 1);
    assert_eq!(h.sys(libc::SYS_getsid, &[0]), 1);
    assert_eq!(
        h.sys(libc::SYS_setsid, &[]),
        err(libc::EPERM),
        "a group leader"
    );
    let child = h.sys(libc::SYS_fork, &[]) as u64;
    assert_eq!(h.sys(libc::SYS_getpgid, &[child]), 1);
    assert_eq!(h.sys(libc::SYS_setpgid, &[child, child]), 0);
    assert_eq!(h.sys(libc::SYS_getpgid, &[child]), child as i64);
    assert_eq!(h.sys(libc::SYS_setpgid, &[child, 77]), err(libc::EPERM));
    assert_eq!(h.sys(libc::SYS_getpgid, &[4242]), err(libc::ESRCH));
    // kill(-pgid) reaches the group; kill(0) the caller's own.
    assert_eq!(h.sys(libc::SYS_kill, &[(-(child as i64)) as u64, 0]), 0);
    assert_eq!(
        h.sys(libc::SYS_kill, &[(-4242i64) as u64, 0]),
        err(libc::ESRCH)
    );
}

#[test]
fn a_pipe_joins_two_processes_with_blocking_and_end_of_file() {
    let mut h = Harness::new();
    let fds = h.at(0x100);
    assert_eq!(h.sys(libc::SYS_pipe2, &[fds, 0]), 0);
    let bytes = h.peek(fds, 8);
    let (r, w) = (
        u64::from(u32::from_le_bytes(bytes[..4].try_into().unwrap())),
        u64::from(u32::from_le_bytes(bytes[4..].try_into().unwrap())),
    );
    let child = h.sys(libc::SYS_fork, &[]);
    assert!(child > 0);
    assert_eq!(h.sys(libc::SYS_close, &[w]), 0);
    let buf = h.at(0x400);
    // Nothing written yet and the child still holds the write end: the read waits.
    assert_eq!(h.call(libc::SYS_read, &[r, buf, 16]), Outcome::Reschedule);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.process.pid(), child as u32);
    let data = h.at(0x500);
    h.poke(data, b"hi");
    assert_eq!(h.sys(libc::SYS_write, &[w, data, 2]), 2);
    assert_eq!(h.call(libc::SYS_exit_group, &[0]), Outcome::Reschedule);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.sys(libc::SYS_read, &[r, buf, 16]), 2);
    assert_eq!(h.peek(buf, 2), b"hi");
    assert_eq!(
        h.sys(libc::SYS_read, &[r, buf, 16]),
        0,
        "every writer is gone"
    );
}

#[test]
fn a_child_does_not_inherit_signal_handlers_pending_signals_or_timers() {
    let mut h = Harness::new();
    assert_eq!(h.sys(libc::SYS_alarm, &[100]), 0);
    let child = h.sys(libc::SYS_fork, &[]);
    assert!(child > 0);
    let status = h.at(0x200);
    assert_eq!(
        h.call(libc::SYS_wait4, &[ANY, status, 0, 0]),
        Outcome::Reschedule
    );
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.sys(libc::SYS_alarm, &[0]), 0, "no alarm in the child");
    assert_eq!(h.call(libc::SYS_exit_group, &[0]), Outcome::Reschedule);
}

/// Creates `path` with `data` and `mode` through the syscalls.
fn create(h: &mut Harness, path: &str, data: &[u8], mode: u32) {
    let p = h.cstr(0x600, path);
    let flags = (libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC) as u64;
    let fd = h.sys(libc::SYS_open, &[p, flags, u64::from(mode)]);
    assert!(fd >= 0, "create {path}: {fd}");
    assert_eq!(h.write_fd(fd, data), data.len() as i64);
    assert_eq!(h.sys(libc::SYS_close, &[fd as u64]), 0);
}

#[test]
fn execve_reports_what_linux_does_for_bad_targets() {
    let mut h = Harness::new();
    h.process.set_machine(Arc::new(AnonymousRam));
    create(&mut h, "/tmp/plain", b"data", 0o644);
    create(&mut h, "/tmp/junk", b"not a program", 0o755);
    create(&mut h, "/tmp/lost", b"#!/no/such/interpreter\n", 0o755);
    create(&mut h, "/tmp/empty", b"#!   \n", 0o755);
    for (path, errno) in [
        ("/no/such/file", libc::ENOENT),
        ("/bin", libc::EACCES),
        ("/tmp/plain", libc::EACCES),
        ("/tmp/junk", libc::ENOEXEC),
        ("/tmp/lost", libc::ENOENT),
        ("/tmp/empty", libc::ENOEXEC),
    ] {
        let p = h.cstr(0x700, path);
        assert_eq!(h.sys(libc::SYS_execve, &[p, 0, 0]), err(errno), "{path}");
    }
    // Arguments past the 2 MiB Linux allows are E2BIG, before anything changes.
    let long = h.at(0x2000);
    h.poke(long, &[b'x'; 20_000]);
    h.poke(long + 20_000, &[0]);
    let argv = h.at(0x8000);
    for i in 0..120u64 {
        h.poke(argv + 8 * i, &long.to_le_bytes());
    }
    h.poke(argv + 8 * 120, &0u64.to_le_bytes());
    let tiny = h.cstr(0x700, "/bin/tiny");
    assert_eq!(h.sys(libc::SYS_execve, &[tiny, argv, 0]), err(libc::E2BIG));
}

#[test]
fn execve_loads_a_program_and_follows_a_shebang_line() {
    let mut h = Harness::new();
    h.process.set_machine(Arc::new(AnonymousRam));
    create(&mut h, "/tmp/script", b"#!/bin/tiny -x\necho\n", 0o755);
    let before = h.process.ram().host_base();
    let path = h.cstr(0x700, "/tmp/script");
    assert_eq!(h.call(libc::SYS_execve, &[path, 0, 0]), Outcome::Reschedule);
    assert_ne!(
        h.process.ram().host_base(),
        before,
        "a new image, in new RAM"
    );
    assert_eq!(h.process.take_retired_ram().len(), 1);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    // tiny's entry point: just past its headers.
    assert_eq!(h.ctx.regs.rip, common::TINY_BASE + 64 + 56);
    assert_eq!(h.sys(libc::SYS_getpid, &[]), 1, "the pid stays");
}

#[test]
fn a_fork_bomb_ends_the_sandbox_at_the_process_limit() {
    let mut h = Harness::new();
    let mut forks = 0;
    let reason = loop {
        match h.call(libc::SYS_fork, &[]) {
            Outcome::Return(_) => forks += 1,
            Outcome::Exit(reason) => break reason,
            other => panic!("fork: {other:?}"),
        }
    };
    assert_eq!(reason, ExitReason::ProcessLimit(128));
    assert_eq!(forks, 127);
}

/// Reads a whole (small) file through the syscalls.
fn read_file(h: &mut Harness, path: &str) -> String {
    let fd = h.open(path, libc::O_RDONLY, 0);
    assert!(fd >= 0, "open {path}: {fd}");
    let bytes = h.read_fd(fd, 8192).expect("read");
    assert_eq!(h.sys(libc::SYS_close, &[fd as u64]), 0);
    String::from_utf8(bytes).expect("text")
}

#[test]
fn proc_lists_each_process_with_the_files_ps_reads() {
    let mut h = Harness::new();
    let child = h.sys(libc::SYS_fork, &[]);
    let stat = read_file(&mut h, &format!("/proc/{child}/stat"));
    let fields: Vec<&str> = stat.split_whitespace().collect();
    assert_eq!(fields[0], child.to_string());
    assert_eq!(fields[3], "1", "its parent: {stat}");
    assert_eq!(fields.len(), 52, "{stat}");
    let status = read_file(&mut h, "/proc/self/status");
    assert!(
        status.contains("Pid:\t1\n") && status.contains("PPid:\t0\n"),
        "{status}"
    );
    assert!(read_file(&mut h, "/proc/meminfo").starts_with("MemTotal:"));
    assert!(read_file(&mut h, "/proc/uptime").contains('.'));
    let fd = h.open("/proc", libc::O_RDONLY | libc::O_DIRECTORY, 0);
    let buf = h.at(0x1000);
    let n = h.sys(libc::SYS_getdents64, &[fd as u64, buf, 4096]);
    let names: Vec<String> = common::parse_dirents(&h.peek(buf, n as usize))
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert!(
        names.contains(&"1".to_string()) && names.contains(&child.to_string()),
        "{names:?}"
    );
    // Reaped, the child's directory goes.
    assert_eq!(
        h.sys(libc::SYS_kill, &[child as u64, libc::SIGKILL as u64]),
        0
    );
    let status = h.at(0x200);
    assert_eq!(h.sys(libc::SYS_wait4, &[ANY, status, 0, 0]), child);
    assert!(h.stat(&format!("/proc/{child}"), 0).is_err());
}

#[test]
fn shared_memory_is_shared_with_children_and_so_are_its_futexes() {
    let mut h = Harness::new();
    let shared = h.sys(
        libc::SYS_mmap,
        &[
            0,
            8192,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    ) as u64;
    let private = h.at(0x300);
    h.poke(shared, &0u32.to_le_bytes());
    let child = h.sys(libc::SYS_fork, &[]);
    // The parent waits on a futex in the shared page; the child writes and wakes it.
    let wait = libc::FUTEX_WAIT as u64; // not PRIVATE: a process-shared futex
    assert_eq!(
        h.call(libc::SYS_futex, &[shared, wait, 0, 0]),
        Outcome::Reschedule
    );
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.process.pid(), child as u32);
    h.poke(shared, &7u32.to_le_bytes());
    h.poke(private, b"child");
    let wake = libc::FUTEX_WAKE as u64;
    assert_eq!(
        h.sys(libc::SYS_futex, &[shared, wake, 1, 0]),
        1,
        "the parent woke"
    );
    assert_eq!(h.call(libc::SYS_exit_group, &[0]), Outcome::Reschedule);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.process.pid(), 1);
    assert_eq!(h.ctx.regs.rax, 0, "FUTEX_WAIT returned 0");
    assert_eq!(
        h.peek(shared, 4),
        7u32.to_le_bytes(),
        "shared memory is shared"
    );
    assert_ne!(h.peek(private, 5), b"child", "private memory is not");
}

#[test]
fn an_orphan_is_adopted_by_init_and_reaped_when_it_ends() {
    let mut h = Harness::new();
    let child = h.sys(libc::SYS_fork, &[]);
    let status = h.at(0x200);
    assert_eq!(
        h.call(libc::SYS_wait4, &[ANY, status, 0, 0]),
        Outcome::Reschedule
    );
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.process.pid(), child as u32);
    let grandchild = h.sys(libc::SYS_fork, &[]);
    assert_eq!(h.call(libc::SYS_exit_group, &[0]), Outcome::Reschedule);
    // The grandchild runs next (round robin), now a child of 1.
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.process.pid(), grandchild as u32);
    assert_eq!(h.sys(libc::SYS_getppid, &[]), 1);
    assert_eq!(h.call(libc::SYS_exit_group, &[0]), Outcome::Reschedule);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.sys(libc::SYS_wait4, &[ANY, status, 0, 0]), child);
    assert_eq!(h.process.process_count(), 1, "no zombie is left for init");
}

#[test]
fn limits_are_per_process_and_may_only_go_down() {
    let mut h = Harness::new();
    let child = h.sys(libc::SYS_fork, &[]) as u64;
    let limit = h.at(0x400);
    assert_eq!(
        h.sys(
            libc::SYS_prlimit64,
            &[child, libc::RLIMIT_NOFILE as u64, 0, limit]
        ),
        0
    );
    let before = h.peek_u64(limit);
    h.poke(limit, &[16u64.to_le_bytes(), 16u64.to_le_bytes()].concat());
    assert_eq!(
        h.sys(
            libc::SYS_prlimit64,
            &[child, libc::RLIMIT_NOFILE as u64, limit, 0]
        ),
        0
    );
    let out = h.at(0x500);
    assert_eq!(
        h.sys(
            libc::SYS_prlimit64,
            &[child, libc::RLIMIT_NOFILE as u64, 0, out]
        ),
        0
    );
    assert_eq!(h.peek_u64(out), 16, "the child's limit");
    assert_eq!(
        h.sys(
            libc::SYS_prlimit64,
            &[0, libc::RLIMIT_NOFILE as u64, 0, out]
        ),
        0
    );
    assert_eq!(h.peek_u64(out), before, "ours is as it was");
    h.poke(
        limit,
        &[u64::MAX.to_le_bytes(), u64::MAX.to_le_bytes()].concat(),
    );
    assert_eq!(
        h.sys(
            libc::SYS_prlimit64,
            &[0, libc::RLIMIT_NOFILE as u64, limit, 0]
        ),
        err(libc::EPERM)
    );
    assert_eq!(
        h.sys(
            libc::SYS_prlimit64,
            &[4242, libc::RLIMIT_NOFILE as u64, 0, out]
        ),
        err(libc::ESRCH)
    );
}

#[test]
fn a_wait_no_process_can_end_is_a_deadlock_naming_each_process() {
    let mut h = Harness::new();
    let fds = h.at(0x100);
    assert_eq!(h.sys(libc::SYS_pipe2, &[fds, 0]), 0);
    let r = u64::from(u32::from_le_bytes(h.peek(fds, 4).try_into().unwrap()));
    let child = h.sys(libc::SYS_fork, &[]);
    let buf = h.at(0x400);
    // Both read the pipe, and both hold its write end: nothing can ever arrive.
    assert_eq!(h.call(libc::SYS_read, &[r, buf, 1]), Outcome::Reschedule);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.process.pid(), child as u32);
    let Outcome::Exit(ExitReason::Deadlock(why)) = h.call(libc::SYS_read, &[r, buf, 1]) else {
        panic!("a deadlock")
    };
    assert!(
        why.contains("process 1") && why.contains(&format!("process {child}")),
        "{why}"
    );
}

#[test]
fn a_renumbered_first_process_answers_to_its_new_id_and_its_old_one() {
    let mut h = Harness::new();
    assert_eq!(
        h.sys(libc::SYS_getpid, &[]),
        1,
        "a template's first process is 1"
    );
    h.process.renumber_for_fork();
    let pid = h.sys(libc::SYS_getpid, &[]);
    assert!((1 << 16..1 << 22).contains(&pid), "{pid}");
    assert_eq!(
        h.sys(libc::SYS_gettid, &[]),
        pid,
        "its first thread is the process"
    );
    for target in [pid as u64, 1] {
        assert_eq!(h.sys(libc::SYS_kill, &[target, 0]), 0);
        assert_eq!(h.sys(libc::SYS_tgkill, &[target, target, 0]), 0);
        assert_eq!(h.sys(libc::SYS_getpgid, &[target]), pid);
    }
    assert_eq!(h.sys(libc::SYS_getsid, &[0]), pid);
    assert_eq!(h.sys(libc::SYS_kill, &[(-pid) as u64, 0]), 0, "its group");
    assert_eq!(h.sys(libc::SYS_prlimit64, &[pid as u64, 7, 0, 0]), 0);

    // Its child sees it as its parent, and it waits for the child by the child's id.
    let child = h.sys(libc::SYS_fork, &[]);
    assert!(child >= 2 && child != pid, "{child}");
    let status = h.at(0x200);
    assert_eq!(
        h.call(libc::SYS_wait4, &[child as u64, status, 0, 0]),
        Outcome::Reschedule
    );
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.sys(libc::SYS_getppid, &[]), pid);
    assert_eq!(
        h.sys(libc::SYS_getpgid, &[0]),
        pid,
        "it inherited the group"
    );
    assert_eq!(h.call(libc::SYS_exit_group, &[0]), Outcome::Reschedule);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.sys(libc::SYS_wait4, &[child as u64, status, 0, 0]), child);

    // /proc shows it under its new id, and /proc/self points there.
    let link = h.cstr(0x400, "/proc/self");
    let buf = h.at(0x500);
    let n = h.sys(libc::SYS_readlink, &[link, buf, 64]);
    assert_eq!(h.peek(buf, n as usize), pid.to_string().as_bytes());
    let stat = h.stat(&format!("/proc/{pid}/stat"), 0);
    assert!(stat.is_ok(), "/proc/{pid}/stat: {stat:?}");
}

#[test]
fn a_child_gets_wipeonfork_memory_zeroed_and_no_dontfork_memory() {
    let mut h = Harness::new();
    const PAGE: u64 = 4096;
    let wiped = h.mmap_anon(2 * PAGE) as u64;
    let skipped = h.mmap_anon(PAGE) as u64;
    let kept = h.mmap_anon(PAGE) as u64;
    for addr in [wiped, wiped + PAGE, skipped, kept] {
        h.poke(addr, b"secret");
    }
    let madvise = |h: &mut Harness, addr: u64, len: u64, advice: i32| {
        h.sys(libc::SYS_madvise, &[addr, len, advice as u64])
    };
    // Only the first page of `wiped` is advised: the mapping splits.
    assert_eq!(madvise(&mut h, wiped, PAGE, libc::MADV_WIPEONFORK), 0);
    assert_eq!(madvise(&mut h, skipped, PAGE, libc::MADV_DONTFORK), 0);
    assert_eq!(madvise(&mut h, kept, PAGE, libc::MADV_DONTFORK), 0);
    assert_eq!(madvise(&mut h, kept, PAGE, libc::MADV_DOFORK), 0);
    // Linux refuses WIPEONFORK on anything but private anonymous memory, and unmapped
    // ranges.
    let fd = h.open("/etc/hello.txt", libc::O_RDONLY, 0) as u64;
    let file = h.sys(
        libc::SYS_mmap,
        &[
            0,
            PAGE,
            libc::PROT_READ as u64,
            libc::MAP_PRIVATE as u64,
            fd,
            0,
        ],
    ) as u64;
    assert_eq!(
        madvise(&mut h, file, PAGE, libc::MADV_WIPEONFORK),
        err(libc::EINVAL)
    );
    assert_eq!(h.sys(libc::SYS_munmap, &[file, PAGE]), 0);
    assert_eq!(
        madvise(&mut h, file, PAGE, libc::MADV_WIPEONFORK),
        err(libc::ENOMEM)
    );

    let child = h.sys(libc::SYS_fork, &[]);
    assert!(child > 1);
    let status = h.at(0x200);
    assert_eq!(
        h.call(libc::SYS_wait4, &[ANY, status, 0, 0]),
        Outcome::Reschedule
    );
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(h.peek(wiped, 6), vec![0; 6], "wiped in the child");
    assert_eq!(
        h.peek(wiped + PAGE, 6),
        b"secret",
        "the unadvised half is copied"
    );
    assert_eq!(h.peek(kept, 6), b"secret", "DOFORK undid DONTFORK");
    let space = h.process.address_space();
    assert!(
        !space.is_mapped(skipped, 1),
        "the child has no DONTFORK mapping"
    );
    assert!(space.is_mapped(wiped, 2 * PAGE));
    // The advice is inherited: a grandchild would be wiped too.
    assert!(space.vma_at(wiped).unwrap().on_fork.wipe);
    assert_eq!(h.call(libc::SYS_exit_group, &[0]), Outcome::Reschedule);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    assert_eq!(
        h.peek(wiped, 6),
        b"secret",
        "the parent's memory is untouched"
    );
    assert_eq!(h.peek(skipped, 6), b"secret");
    assert_eq!(h.sys(libc::SYS_wait4, &[ANY, status, 0, 0]), child);
}

#[test]
fn a_forked_child_has_its_own_copy_of_memory_above_ram() {
    let mut h = Harness::new();
    const PAGE: u64 = 4096;
    let none = libc::PROT_NONE as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE) as u64;
    let high = h.sys(libc::SYS_mmap, &[0, 10 << 30, none, flags, u64::MAX, 0]) as u64;
    assert!(high >= forkvm_kernel::high::HIGH_START);
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    assert_eq!(h.sys(libc::SYS_mprotect, &[high, PAGE, rw]), 0);
    let fd = h.open("/etc/hello.txt", libc::O_RDONLY, 0) as u64;
    assert_eq!(h.sys(libc::SYS_read, &[fd, high, 5]), 5);
    let fds = h.at(0x100);
    assert_eq!(h.sys(libc::SYS_pipe2, &[fds, 0]), 0);
    let ends = h.peek(fds, 8);
    let r = u64::from(u32::from_le_bytes(ends[..4].try_into().unwrap()));
    let w = u64::from(u32::from_le_bytes(ends[4..].try_into().unwrap()));

    let child = h.sys(libc::SYS_fork, &[]);
    assert!(child > 1);
    // The parent overwrites its copy, then waits.
    assert_eq!(h.sys(libc::SYS_lseek, &[fd, 0, 0]), 0);
    assert_eq!(h.sys(libc::SYS_read, &[fd, high + 1, 1]), 1);
    let status = h.at(0x200);
    assert_eq!(
        h.call(libc::SYS_wait4, &[ANY, status, 0, 0]),
        Outcome::Reschedule
    );
    assert_eq!(run_next(&mut h), Outcome::Switched);
    // The child sends what its copy holds.
    assert_eq!(h.sys(libc::SYS_write, &[w, high, 5]), 5);
    assert_eq!(h.call(libc::SYS_exit_group, &[0]), Outcome::Reschedule);
    assert_eq!(run_next(&mut h), Outcome::Switched);
    let out = h.at(0x300);
    assert_eq!(h.sys(libc::SYS_read, &[r, out, 5]), 5);
    assert_eq!(
        h.peek(out, 5),
        &common::HELLO[..5],
        "the child's copy is its own"
    );
    assert_eq!(h.sys(libc::SYS_write, &[w, high, 2]), 2);
    assert_eq!(h.sys(libc::SYS_read, &[r, out, 2]), 2);
    assert_eq!(h.peek(out, 2), [common::HELLO[0], common::HELLO[0]]);
    assert_eq!(h.sys(libc::SYS_wait4, &[ANY, status, 0, 0]), child);
}
