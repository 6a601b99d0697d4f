//! Standard streams, exit, identity, clocks, entropy, TLS, refused and unknown syscalls, and
//! the descriptor limit.

mod common;

use common::{Harness, Options, err};
use forkvm_kernel::file::Stream;
use forkvm_kernel::{ExitReason, Limits, Outcome, OutputLimitReached};

#[test]
fn writes_to_stdout_and_stderr_reach_the_host() {
    let mut h = Harness::new();
    assert_eq!(h.write_fd(1, b"to stdout\n"), 10);
    assert_eq!(h.write_fd(2, b"to stderr\n"), 10);
    // writev gathers in order.
    let (a, b) = (h.at(0x100), h.at(0x200));
    h.poke(a, b"gat");
    h.poke(b, b"her\n");
    let iov = h.at(0x300);
    for (i, (base, len)) in [(a, 3u64), (b, 4)].into_iter().enumerate() {
        h.poke(iov + 16 * i as u64, &base.to_le_bytes());
        h.poke(iov + 16 * i as u64 + 8, &len.to_le_bytes());
    }
    assert_eq!(h.sys(libc::SYS_writev, &[1, iov, 2]), 7);
    assert_eq!(h.stdout.bytes(), b"to stdout\ngather\n");
    assert_eq!(h.stderr.bytes(), b"to stderr\n");
    let out = h.cstr(0x400, "/dev/stdout");
    let fd = h.sys(libc::SYS_open, &[out, libc::O_WRONLY as u64, 0]);
    assert_eq!(fd, 3);
    assert_eq!(h.write_fd(fd, b"via /dev/stdout\n"), 16);
    assert_eq!(h.stdout.bytes(), b"to stdout\ngather\nvia /dev/stdout\n");
    assert_eq!(h.process.console_mut().written(), (33, 10));
}

#[test]
fn stdin_bytes_are_read_then_eof() {
    let mut h = Harness::with(Options {
        stdin: b"input line\n".to_vec(),
        ..Options::default()
    });
    assert_eq!(h.read_fd(0, 6).unwrap(), b"input ");
    assert_eq!(h.read_fd(0, 100).unwrap(), b"line\n");
    assert_eq!(h.read_fd(0, 100).unwrap(), b"");
    assert_eq!(h.write_fd(0, b"x"), err(libc::EBADF), "stdin is read-only");
}

#[test]
fn output_cap_ends_the_sandbox() {
    let mut h = Harness::with(Options {
        output_limit: 8,
        ..Options::default()
    });
    assert_eq!(h.write_fd(1, b"12345"), 5);
    assert_eq!(h.write_fd(2, b"abcdefgh"), 8, "each stream has its own cap");
    let buf = h.at(0x4000);
    h.poke(buf, b"67890");
    let outcome = h.call(libc::SYS_write, &[1, buf, 5]);
    assert_eq!(
        outcome,
        Outcome::Exit(ExitReason::OutputLimit(OutputLimitReached {
            stream: Stream::Stdout,
            limit: 8,
        }))
    );
    assert_eq!(
        h.stdout.bytes(),
        b"12345678",
        "the part that fits is written"
    );
    assert_eq!(h.stderr.bytes(), b"abcdefgh");
}

#[test]
fn dev_null_and_zero() {
    let mut h = Harness::new();
    let null = h.open("/dev/null", libc::O_RDWR, 0);
    assert_eq!(h.write_fd(null, b"discarded"), 9);
    assert_eq!(h.read_fd(null, 10).unwrap(), b"");
    let zero = h.open("/dev/zero", libc::O_RDONLY, 0);
    let buf = h.at(0x4000);
    h.poke(buf, &[0xff; 32]);
    assert_eq!(h.sys(libc::SYS_read, &[zero as u64, buf, 32]), 32);
    assert_eq!(h.peek(buf, 32), [0; 32]);
}

#[test]
fn getrandom_fills_and_differs() {
    let mut h = Harness::new();
    let (a, b) = (h.at(0x1000), h.at(0x2000));
    assert_eq!(h.sys(libc::SYS_getrandom, &[a, 64, 0]), 64);
    assert_eq!(h.sys(libc::SYS_getrandom, &[b, 64, 0]), 64);
    let (first, second) = (h.peek(a, 64), h.peek(b, 64));
    assert_ne!(first, vec![0; 64]);
    assert_ne!(first, second);
    assert_eq!(h.peek(a + 64, 8), [0; 8], "nothing written past the length");
    assert_eq!(
        h.sys(libc::SYS_getrandom, &[0x20_0000, 8, 0]),
        err(libc::EFAULT)
    );
    assert_eq!(h.sys(libc::SYS_getrandom, &[a, 0, 0]), 0);
}

#[test]
fn clock_gettime_realtime_matches_the_host() {
    let mut h = Harness::new();
    let ts = h.at(0x1000);
    let realtime = libc::CLOCK_REALTIME as u64;
    assert_eq!(h.sys(libc::SYS_clock_gettime, &[realtime, ts]), 0);
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let sec = h.peek_u64(ts);
    let nsec = h.peek_u64(ts + 8);
    assert!(nsec < 1_000_000_000);
    let guest_ns = u128::from(sec) * 1_000_000_000 + u128::from(nsec);
    let diff = host.as_nanos().abs_diff(guest_ns);
    assert!(diff < 1_000_000_000, "guest clock is {diff} ns off");

    let monotonic = libc::CLOCK_MONOTONIC as u64;
    assert_eq!(h.sys(libc::SYS_clock_gettime, &[monotonic, ts]), 0);
    assert_eq!(
        h.sys(libc::SYS_clock_gettime, &[1234, ts]),
        err(libc::EINVAL)
    );
    assert_eq!(
        h.sys(libc::SYS_clock_gettime, &[realtime, 0x20_0000]),
        err(libc::EFAULT)
    );
    let now = h.sys(libc::SYS_time, &[0]) as u64;
    assert!(now.abs_diff(host.as_secs()) <= 1);
}

#[test]
fn uname_reports_linux_x86_64() {
    let mut h = Harness::new();
    let buf = h.at(0x1000);
    h.poke(buf, &[0xaa; 6 * 65]);
    assert_eq!(h.sys(libc::SYS_uname, &[buf]), 0);
    let raw = h.peek(buf, 6 * 65);
    let field = |i: usize| {
        let f = &raw[i * 65..(i + 1) * 65];
        let len = f.iter().position(|&b| b == 0).expect("NUL-terminated");
        assert!(f[len..].iter().all(|&b| b == 0), "field {i} is zero-padded");
        String::from_utf8(f[..len].to_vec()).unwrap()
    };
    assert_eq!(field(0), "Linux");
    assert_eq!(field(1), "forkvm");
    assert!(field(2).starts_with("6."), "release {}", field(2));
    assert_eq!(field(4), "x86_64");
    assert_eq!(h.sys(libc::SYS_uname, &[0x20_0000]), err(libc::EFAULT));
}

#[test]
fn arch_prctl_sets_and_gets_tls_bases() {
    const ARCH_SET_GS: u64 = 0x1001;
    const ARCH_SET_FS: u64 = 0x1002;
    const ARCH_GET_FS: u64 = 0x1003;
    let mut h = Harness::new();
    assert_eq!(
        h.sys(libc::SYS_arch_prctl, &[ARCH_SET_FS, 0x7f00_1234_5000]),
        0
    );
    assert_eq!(h.ctx.fs_base, 0x7f00_1234_5000);
    assert_eq!(h.ctx.gs_base, 0);
    assert_eq!(h.sys(libc::SYS_arch_prctl, &[ARCH_SET_GS, 0x4000]), 0);
    assert_eq!(h.ctx.gs_base, 0x4000);
    let out = h.at(0x100);
    assert_eq!(h.sys(libc::SYS_arch_prctl, &[ARCH_GET_FS, out]), 0);
    assert_eq!(h.peek_u64(out), 0x7f00_1234_5000);
    assert_eq!(
        h.sys(libc::SYS_arch_prctl, &[ARCH_SET_FS, 0x8000_0000_0000]),
        err(libc::EPERM),
        "non-canonical base"
    );
    assert_eq!(
        h.ctx.fs_base, 0x7f00_1234_5000,
        "unchanged after a refused set"
    );
    assert_eq!(h.sys(libc::SYS_arch_prctl, &[0x9999, 0]), err(libc::EINVAL));
}

#[test]
fn exit_group_and_exit_end_the_process() {
    let mut h = Harness::new();
    assert_eq!(
        h.call(libc::SYS_exit_group, &[7]),
        Outcome::Exit(ExitReason::Exited(7))
    );
    let mut h = Harness::new();
    assert_eq!(
        h.call(libc::SYS_exit, &[256 + 3]),
        Outcome::Exit(ExitReason::Exited(259)),
        "the raw status; the VMM reports status & 0xff"
    );
}

#[test]
fn kill_self_and_futex_deadlock_end_the_process() {
    let mut h = Harness::new();
    assert_eq!(h.sys(libc::SYS_kill, &[1, 0]), 0, "signal 0 probes");
    assert_eq!(
        h.sys(libc::SYS_kill, &[1, libc::SIGCHLD as u64]),
        0,
        "ignored by default"
    );
    assert_eq!(
        h.sys(libc::SYS_kill, &[42, libc::SIGTERM as u64]),
        err(libc::ESRCH)
    );
    assert_eq!(
        h.call(libc::SYS_kill, &[1, libc::SIGTERM as u64]),
        Outcome::Exit(ExitReason::Signaled(libc::SIGTERM))
    );

    let mut h = Harness::new();
    let word = h.at(0x100);
    h.poke(word, &5u32.to_le_bytes());
    let wait = libc::FUTEX_WAIT as u64;
    assert_eq!(
        h.sys(libc::SYS_futex, &[word, wait, 4, 0]),
        err(libc::EAGAIN)
    );
    assert!(matches!(
        h.call(libc::SYS_futex, &[word, wait, 5, 0]),
        Outcome::Exit(ExitReason::Deadlock(_))
    ));
}

#[test]
fn identity_syscalls() {
    let mut h = Harness::new();
    assert_eq!(h.sys(libc::SYS_getpid, &[]), 1);
    assert_eq!(h.sys(libc::SYS_gettid, &[]), 1);
    assert_eq!(h.sys(libc::SYS_getppid, &[]), 0);
    assert_eq!(h.sys(libc::SYS_getuid, &[]), 0);
    assert_eq!(h.sys(libc::SYS_umask, &[0o077]), 0o022);
    assert_eq!(h.sys(libc::SYS_umask, &[0o022]), 0o077);
}

#[test]
fn unknown_syscall_is_enosys_and_counted() {
    let mut h = Harness::new();
    let total_before = h.process.stats().total;
    assert_eq!(h.sys(999, &[1, 2, 3]), err(libc::ENOSYS));
    assert_eq!(h.sys(999, &[]), err(libc::ENOSYS));
    assert_eq!(h.sys(-1, &[]), err(libc::ENOSYS));
    assert_eq!(h.sys(1 << 40, &[]), err(libc::ENOSYS));
    let stats = h.process.stats();
    assert_eq!(stats.unsupported.get("unknown"), Some(&4));
    assert_eq!(stats.total, total_before + 4);
    assert_eq!(stats.by_name.get("unknown"), Some(&4));
}

#[test]
fn descriptor_limit_gives_emfile() {
    let mut h = Harness::with(Options {
        limits: Limits {
            memory_bytes: 1 << 30,
            open_files: 6,
        },
        ..Options::default()
    });
    for expected in 3..6 {
        assert_eq!(h.open("/etc/hello.txt", libc::O_RDONLY, 0), expected);
    }
    assert_eq!(
        h.open("/etc/hello.txt", libc::O_RDONLY, 0),
        err(libc::EMFILE)
    );
    assert_eq!(h.open("/dev/null", libc::O_RDONLY, 0), err(libc::EMFILE));
    assert_eq!(h.sys(libc::SYS_dup, &[3]), err(libc::EMFILE));
    assert_eq!(
        h.sys(libc::SYS_dup2, &[3, 6]),
        err(libc::EBADF),
        "beyond the limit"
    );
    let rlimit = h.at(0x100);
    assert_eq!(
        h.sys(
            libc::SYS_prlimit64,
            &[0, libc::RLIMIT_NOFILE as u64, 0, rlimit]
        ),
        0
    );
    assert_eq!(h.peek_u64(rlimit), 6);
    assert_eq!(h.sys(libc::SYS_close, &[4]), 0);
    assert_eq!(
        h.open("/etc/hello.txt", libc::O_RDONLY, 0),
        4,
        "a freed slot is reused"
    );
}
