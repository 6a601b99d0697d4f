//! The pipe family without KVM: `splice` into and out of pipes, `tee`, `vmsplice`, and the
//! errors Linux gives for the combinations it refuses.

mod common;

use common::{HELLO, Harness, err};

const SPLICE_F_NONBLOCK: u64 = 2;

fn pipe(h: &mut Harness) -> (i64, i64) {
    let fds = h.at(0x100);
    assert_eq!(h.sys(libc::SYS_pipe2, &[fds, libc::O_NONBLOCK as u64]), 0);
    let raw = h.peek(fds, 8);
    (
        i64::from(i32::from_le_bytes(raw[..4].try_into().unwrap())),
        i64::from(i32::from_le_bytes(raw[4..].try_into().unwrap())),
    )
}

fn splice(h: &mut Harness, from: i64, from_off: u64, to: i64, to_off: u64, len: u64) -> i64 {
    h.sys(
        libc::SYS_splice,
        &[from as u64, from_off, to as u64, to_off, len, 0],
    )
}

#[test]
fn splice_moves_a_file_through_a_pipe_into_another_file() {
    let mut h = Harness::new();
    let (r, w) = pipe(&mut h);
    let src = h.open("/etc/hello.txt", libc::O_RDONLY, 0);
    let offset = h.at(0x400);
    h.poke(offset, &1u64.to_le_bytes());
    // From the file at offset 1 (the offset advances, the file's cursor does not).
    assert_eq!(splice(&mut h, src, offset, w, 0, 4), 4);
    assert_eq!(h.peek_u64(offset), 5);
    assert_eq!(splice(&mut h, src, 0, w, 0, 2), 2, "then at its cursor");

    let dst = h.open("/tmp/out", libc::O_RDWR | libc::O_CREAT, 0o600);
    assert_eq!(splice(&mut h, r, 0, dst, 0, 100), 6);
    let mut expected = HELLO[1..5].to_vec();
    expected.extend_from_slice(&HELLO[..2]);
    assert_eq!(h.sys(libc::SYS_lseek, &[dst as u64, 0, 0]), 0);
    assert_eq!(h.read_fd(dst, 100), Ok(expected));
    assert_eq!(
        h.read_fd(r, 8),
        Err(err(libc::EAGAIN)),
        "the pipe gave it all up"
    );
}

#[test]
fn tee_copies_and_vmsplice_writes_and_reads() {
    let mut h = Harness::new();
    let (r1, w1) = pipe(&mut h);
    let (r2, w2) = pipe(&mut h);
    let iov = h.at(0x300);
    let data = h.at(0x1000);
    h.poke(data, b"spliced");
    h.poke(iov, &[data, 7].map(u64::to_le_bytes).concat());
    assert_eq!(h.sys(libc::SYS_vmsplice, &[w1 as u64, iov, 1, 0]), 7);
    assert_eq!(h.sys(libc::SYS_tee, &[r1 as u64, w2 as u64, 100, 0]), 7);
    assert_eq!(h.read_fd(r2, 100), Ok(b"spliced".to_vec()));
    // vmsplice from the read end fills memory, as readv does.
    let out = h.at(0x2000);
    h.poke(iov, &[out, 3].map(u64::to_le_bytes).concat());
    assert_eq!(h.sys(libc::SYS_vmsplice, &[r1 as u64, iov, 1, 0]), 3);
    assert_eq!(h.peek(out, 3), b"spl");
    assert_eq!(h.read_fd(r1, 100), Ok(b"iced".to_vec()));
    assert_eq!(
        h.sys(
            libc::SYS_tee,
            &[r1 as u64, w2 as u64, 100, SPLICE_F_NONBLOCK]
        ),
        err(libc::EAGAIN),
        "nothing to copy"
    );
}

#[test]
fn splice_refuses_what_linux_refuses() {
    let mut h = Harness::new();
    let (r, w) = pipe(&mut h);
    let file = h.open("/etc/hello.txt", libc::O_RDONLY, 0);
    let other = h.open("/tmp/other", libc::O_WRONLY | libc::O_CREAT, 0o600);
    let offset = h.at(0x400);
    h.poke(offset, &0u64.to_le_bytes());
    assert_eq!(
        splice(&mut h, file, 0, other, 0, 4),
        err(libc::EINVAL),
        "no pipe on either side"
    );
    assert_eq!(
        splice(&mut h, r, offset, w, 0, 4),
        err(libc::ESPIPE),
        "an offset on a pipe"
    );
    assert_eq!(splice(&mut h, r, 0, w, 0, 4), err(libc::EINVAL), "one pipe");
    assert_eq!(
        splice(&mut h, w, 0, file, 0, 4),
        err(libc::EBADF),
        "wrong ends"
    );
    assert_eq!(splice(&mut h, 99, 0, w, 0, 4), err(libc::EBADF));
    assert_eq!(
        h.sys(libc::SYS_splice, &[file as u64, 0, w as u64, 0, 4, 0x100]),
        err(libc::EINVAL),
        "unknown flags"
    );
    assert_eq!(
        h.sys(libc::SYS_tee, &[file as u64, w as u64, 4, 0]),
        err(libc::EINVAL)
    );
    assert_eq!(
        h.sys(libc::SYS_vmsplice, &[file as u64, offset, 1, 0]),
        err(libc::EBADF)
    );
    // An empty pipe with its writer open waits; nonblocking, EAGAIN.
    let dst = h.open("/tmp/sink", libc::O_WRONLY | libc::O_CREAT, 0o600);
    assert_eq!(splice(&mut h, r, 0, dst, 0, 4), err(libc::EAGAIN));
    // No writer left: the end.
    assert_eq!(h.sys(libc::SYS_close, &[w as u64]), 0);
    assert_eq!(splice(&mut h, r, 0, dst, 0, 4), 0);
}
