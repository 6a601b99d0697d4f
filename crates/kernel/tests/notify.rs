//! The event loop's syscalls without KVM: `poll`/`select` readiness, `epoll` (level,
//! edge, one-shot, interests that follow descriptions), `eventfd`, `timerfd`, `signalfd`.

mod common;

use common::{Harness, err};
use forkvm_kernel::Outcome;

const EPOLLIN: u32 = 0x1;
const EPOLLOUT: u32 = 0x4;
const EPOLLONESHOT: u32 = 1 << 30;
const EPOLLET: u32 = 1 << 31;
const EPOLL_CTL_ADD: u64 = 1;
const EPOLL_CTL_DEL: u64 = 2;
const EPOLL_CTL_MOD: u64 = 3;
const EFD_SEMAPHORE: u64 = 1;

fn pipe(h: &mut Harness) -> (i64, i64) {
    let fds = h.at(0x100);
    assert_eq!(h.sys(libc::SYS_pipe2, &[fds, libc::O_NONBLOCK as u64]), 0);
    let raw = h.peek(fds, 8);
    (
        i64::from(i32::from_le_bytes(raw[..4].try_into().unwrap())),
        i64::from(i32::from_le_bytes(raw[4..].try_into().unwrap())),
    )
}

fn write_bytes(h: &mut Harness, fd: i64, data: &[u8]) -> i64 {
    let buf = h.at(0x1000);
    h.poke(buf, data);
    h.sys(libc::SYS_write, &[fd as u64, buf, data.len() as u64])
}

fn epoll_ctl(h: &mut Harness, epfd: i64, op: u64, fd: i64, events: u32, data: u64) -> i64 {
    let event = h.at(0x200);
    let mut raw = events.to_le_bytes().to_vec();
    raw.extend_from_slice(&data.to_le_bytes());
    h.poke(event, &raw);
    h.sys(libc::SYS_epoll_ctl, &[epfd as u64, op, fd as u64, event])
}

/// `epoll_wait` with a zero timeout: the (events, data) pairs reported.
fn epoll_poll(h: &mut Harness, epfd: i64, max: usize) -> Vec<(u32, u64)> {
    let out = h.at(0x3000);
    let n = h.sys(libc::SYS_epoll_wait, &[epfd as u64, out, max as u64, 0]);
    assert!(n >= 0, "epoll_wait: {n}");
    (0..n as u64)
        .map(|i| {
            let raw = h.peek(out + i * 12, 12);
            (
                u32::from_le_bytes(raw[..4].try_into().unwrap()),
                u64::from_le_bytes(raw[4..].try_into().unwrap()),
            )
        })
        .collect()
}

/// `poll` on one descriptor with a zero timeout: its `revents`.
fn poll_one(h: &mut Harness, fd: i64, events: i16) -> i16 {
    let fds = h.at(0x180);
    let mut raw = (fd as i32).to_le_bytes().to_vec();
    raw.extend_from_slice(&events.to_le_bytes());
    raw.extend_from_slice(&0i16.to_le_bytes());
    h.poke(fds, &raw);
    h.sys(libc::SYS_poll, &[fds, 1, 0]);
    i16::from_le_bytes(h.peek(fds + 6, 2).try_into().unwrap())
}

#[test]
fn poll_and_select_report_pipe_readiness() {
    let mut h = Harness::new();
    let (r, w) = pipe(&mut h);
    assert_eq!(poll_one(&mut h, r, libc::POLLIN), 0);
    assert_eq!(poll_one(&mut h, w, libc::POLLOUT), libc::POLLOUT);
    write_bytes(&mut h, w, b"x");
    assert_eq!(poll_one(&mut h, r, libc::POLLIN), libc::POLLIN);
    assert_eq!(poll_one(&mut h, 77, libc::POLLIN), libc::POLLNVAL);
    h.sys(libc::SYS_close, &[w as u64]);
    let _ = h.read_fd(r, 10);
    assert_eq!(
        poll_one(&mut h, r, libc::POLLIN),
        libc::POLLHUP,
        "end of file reports HUP though not asked for"
    );

    let (r, w) = pipe(&mut h);
    let (read_set, write_set, timeout) = (h.at(0x400), h.at(0x480), h.at(0x500));
    let nfds = (r.max(w) + 1) as u64;
    h.poke(read_set, &(1u64 << r).to_le_bytes());
    h.poke(write_set, &(1u64 << w).to_le_bytes());
    h.poke(timeout, &[0u8; 16]);
    assert_eq!(
        h.sys(libc::SYS_select, &[nfds, read_set, write_set, 0, timeout]),
        1
    );
    assert_eq!(h.peek_u64(read_set), 0);
    assert_eq!(h.peek_u64(write_set), 1 << w);
    h.poke(read_set, &(1u64 << 60).to_le_bytes());
    assert_eq!(
        h.sys(libc::SYS_select, &[61, read_set, 0, 0, timeout]),
        err(libc::EBADF)
    );
}

#[test]
fn epoll_is_level_edge_and_one_shot_triggered() {
    let mut h = Harness::new();
    let ep = h.sys(libc::SYS_epoll_create1, &[libc::EPOLL_CLOEXEC as u64]);
    assert!(ep >= 0);
    let (r, w) = pipe(&mut h);
    assert_eq!(epoll_ctl(&mut h, ep, EPOLL_CTL_ADD, r, EPOLLIN, 7), 0);
    assert_eq!(
        epoll_ctl(&mut h, ep, EPOLL_CTL_ADD, r, EPOLLIN, 7),
        err(libc::EEXIST)
    );
    assert!(epoll_poll(&mut h, ep, 8).is_empty());
    write_bytes(&mut h, w, b"ab");
    assert_eq!(epoll_poll(&mut h, ep, 8), vec![(EPOLLIN, 7)]);
    assert_eq!(
        epoll_poll(&mut h, ep, 8),
        vec![(EPOLLIN, 7)],
        "level: again"
    );

    assert_eq!(
        epoll_ctl(&mut h, ep, EPOLL_CTL_MOD, r, EPOLLIN | EPOLLET, 8),
        0
    );
    assert_eq!(epoll_poll(&mut h, ep, 8), vec![(EPOLLIN, 8)]);
    assert!(
        epoll_poll(&mut h, ep, 8).is_empty(),
        "edge: once per change"
    );
    write_bytes(&mut h, w, b"c");
    assert_eq!(epoll_poll(&mut h, ep, 8), vec![(EPOLLIN, 8)]);

    assert_eq!(
        epoll_ctl(&mut h, ep, EPOLL_CTL_MOD, r, EPOLLIN | EPOLLONESHOT, 9),
        0
    );
    assert_eq!(epoll_poll(&mut h, ep, 8), vec![(EPOLLIN, 9)]);
    assert!(epoll_poll(&mut h, ep, 8).is_empty(), "one-shot: disarmed");
    assert_eq!(epoll_ctl(&mut h, ep, EPOLL_CTL_DEL, r, 0, 0), 0);
    assert_eq!(
        epoll_ctl(&mut h, ep, EPOLL_CTL_DEL, r, 0, 0),
        err(libc::ENOENT)
    );

    // The epoll descriptor itself polls readable when it has events.
    assert_eq!(epoll_ctl(&mut h, ep, EPOLL_CTL_ADD, w, EPOLLOUT, 1), 0);
    assert_eq!(poll_one(&mut h, ep, libc::POLLIN), libc::POLLIN);
    // Regular files cannot be watched; an epoll cannot watch itself or a loop.
    let file = h.open("/etc/hello.txt", libc::O_RDONLY, 0);
    assert_eq!(
        epoll_ctl(&mut h, ep, EPOLL_CTL_ADD, file, EPOLLIN, 0),
        err(libc::EPERM)
    );
    assert_eq!(
        epoll_ctl(&mut h, ep, EPOLL_CTL_ADD, ep, EPOLLIN, 0),
        err(libc::EINVAL)
    );
    let inner = h.sys(libc::SYS_epoll_create1, &[0]);
    assert_eq!(epoll_ctl(&mut h, ep, EPOLL_CTL_ADD, inner, EPOLLIN, 0), 0);
    assert_eq!(
        epoll_ctl(&mut h, inner, EPOLL_CTL_ADD, ep, EPOLLIN, 0),
        err(libc::ELOOP)
    );
}

#[test]
fn an_interest_lasts_as_long_as_its_description() {
    let mut h = Harness::new();
    let ep = h.sys(libc::SYS_epoll_create1, &[0]);
    let (r, w) = pipe(&mut h);
    write_bytes(&mut h, w, b"x");
    assert_eq!(epoll_ctl(&mut h, ep, EPOLL_CTL_ADD, r, EPOLLIN, 1), 0);
    let dup = h.sys(libc::SYS_dup, &[r as u64]);
    h.sys(libc::SYS_close, &[r as u64]);
    assert_eq!(
        epoll_poll(&mut h, ep, 8),
        vec![(EPOLLIN, 1)],
        "a duplicate keeps the description, and the interest"
    );
    h.sys(libc::SYS_close, &[dup as u64]);
    assert!(epoll_poll(&mut h, ep, 8).is_empty());
    // The number is free again: a new description there is a new interest.
    let (r2, _w2) = pipe(&mut h);
    assert_eq!(r2, r);
    assert_eq!(epoll_ctl(&mut h, ep, EPOLL_CTL_ADD, r2, EPOLLIN, 2), 0);
}

#[test]
fn eventfd_counts_and_semaphores() {
    let mut h = Harness::new();
    let fd = h.sys(
        libc::SYS_eventfd2,
        &[3, (libc::O_NONBLOCK as u64) | EFD_SEMAPHORE],
    );
    assert!(fd >= 0);
    for _ in 0..3 {
        assert_eq!(h.read_fd(fd, 8).unwrap(), 1u64.to_le_bytes());
    }
    assert_eq!(h.read_fd(fd, 8), Err(err(libc::EAGAIN)));
    assert_eq!(poll_one(&mut h, fd, libc::POLLIN), 0);
    assert_eq!(write_bytes(&mut h, fd, &5u64.to_le_bytes()), 8);
    assert_eq!(poll_one(&mut h, fd, libc::POLLIN), libc::POLLIN);
    assert_eq!(
        write_bytes(&mut h, fd, &u64::MAX.to_le_bytes()),
        err(libc::EINVAL)
    );
    assert_eq!(write_bytes(&mut h, fd, b"abc"), err(libc::EINVAL));

    let counter = h.sys(libc::SYS_eventfd2, &[0, libc::O_NONBLOCK as u64]);
    write_bytes(&mut h, counter, &2u64.to_le_bytes());
    write_bytes(&mut h, counter, &3u64.to_le_bytes());
    assert_eq!(h.read_fd(counter, 8).unwrap(), 5u64.to_le_bytes());
    assert_eq!(
        write_bytes(&mut h, counter, &(u64::MAX - 1).to_le_bytes()),
        8
    );
    assert_eq!(
        write_bytes(&mut h, counter, &1u64.to_le_bytes()),
        err(libc::EAGAIN),
        "the counter is full"
    );
}

#[test]
fn timerfd_counts_expirations() {
    let mut h = Harness::new();
    let fd = h.sys(
        libc::SYS_timerfd_create,
        &[libc::CLOCK_MONOTONIC as u64, libc::O_NONBLOCK as u64],
    );
    assert!(fd >= 0);
    assert_eq!(h.read_fd(fd, 8), Err(err(libc::EAGAIN)), "disarmed");
    // Every 1 ms from 1 ms on.
    let spec = h.at(0x200);
    h.poke(
        spec,
        &[0u64, 1_000_000, 0, 1_000_000]
            .map(u64::to_le_bytes)
            .concat(),
    );
    assert_eq!(
        h.sys(libc::SYS_timerfd_settime, &[fd as u64, 0, spec, 0]),
        0
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    let count = u64::from_le_bytes(h.read_fd(fd, 8).unwrap().try_into().unwrap());
    assert!(count >= 4, "{count} expirations in 5 ms");
    let out = h.at(0x300);
    assert_eq!(h.sys(libc::SYS_timerfd_gettime, &[fd as u64, out]), 0);
    assert_eq!(h.peek_u64(out + 8), 1_000_000, "the interval");

    // A blocking read with nothing expired waits, and the VMM is told until when.
    let blocking = h.sys(libc::SYS_timerfd_create, &[libc::CLOCK_MONOTONIC as u64, 0]);
    h.poke(
        spec,
        &[0u64, 0, 0, 50_000_000].map(u64::to_le_bytes).concat(),
    );
    h.sys(libc::SYS_timerfd_settime, &[blocking as u64, 0, spec, 0]);
    let buf = h.at(0x1000);
    assert!(matches!(
        h.call(libc::SYS_read, &[blocking as u64, buf, 8]),
        Outcome::Idle(_)
    ));
}

#[test]
fn signalfd_reads_blocked_signals() {
    let mut h = Harness::new();
    let set = h.at(0x100);
    let usr1 = 1u64 << (libc::SIGUSR1 - 1);
    h.poke(set, &usr1.to_le_bytes());
    assert_eq!(
        h.sys(
            libc::SYS_rt_sigprocmask,
            &[libc::SIG_BLOCK as u64, set, 0, 8]
        ),
        0
    );
    let fd = h.sys(
        libc::SYS_signalfd4,
        &[u64::MAX, set, 8, libc::O_NONBLOCK as u64],
    );
    assert!(fd >= 0);
    assert_eq!(h.read_fd(fd, 128), Err(err(libc::EAGAIN)));
    assert_eq!(h.sys(libc::SYS_kill, &[1, libc::SIGUSR1 as u64]), 0);
    assert_eq!(poll_one(&mut h, fd, libc::POLLIN), libc::POLLIN);
    let record = h.read_fd(fd, 128).unwrap();
    assert_eq!(record.len(), 128);
    assert_eq!(
        u32::from_le_bytes(record[..4].try_into().unwrap()),
        libc::SIGUSR1 as u32
    );
    assert_eq!(h.read_fd(fd, 128), Err(err(libc::EAGAIN)), "taken");
    assert_eq!(h.read_fd(fd, 64), Err(err(libc::EINVAL)));
}

#[test]
fn signalfd_records_carry_sender_and_value_at_their_offsets() {
    let mut h = Harness::new();
    let set = h.at(0x100);
    h.poke(set, &(1u64 << (libc::SIGUSR1 - 1)).to_le_bytes());
    let block = [libc::SIG_BLOCK as u64, set, 0, 8];
    assert_eq!(h.sys(libc::SYS_rt_sigprocmask, &block), 0);
    let fd = h.sys(
        libc::SYS_signalfd4,
        &[u64::MAX, set, 8, libc::O_NONBLOCK as u64],
    );
    assert!(fd >= 0);
    // A queued siginfo: SI_QUEUE, the sender's pid at 16, the value at 24.
    let mut info = [0u8; 128];
    info[8..12].copy_from_slice(&(-1i32).to_le_bytes());
    info[16..20].copy_from_slice(&7u32.to_le_bytes());
    info[24..32].copy_from_slice(&0x1234_5678_9abc_u64.to_le_bytes());
    let at = h.at(0x200);
    h.poke(at, &info);
    let queue = [1, libc::SIGUSR1 as u64, at];
    assert_eq!(h.sys(libc::SYS_rt_sigqueueinfo, &queue), 0);
    let record = h.read_fd(fd, 128).unwrap();
    let word = |at: usize| u64::from_le_bytes(record[at..at + 8].try_into().unwrap());
    assert_eq!(
        i32::from_le_bytes(record[8..12].try_into().unwrap()),
        -1,
        "ssi_code"
    );
    assert_eq!(
        u32::from_le_bytes(record[12..16].try_into().unwrap()),
        7,
        "ssi_pid"
    );
    assert_eq!(word(48), 0x1234_5678_9abc, "ssi_ptr");
    assert_eq!(word(56), 0, "ssi_utime");
}
