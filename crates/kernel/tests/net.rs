//! Sockets without KVM: TCP and UDP over loopback, unix sockets with descriptor passing,
//! and the errors hostile or careless callers get.

mod common;

use common::{HELLO, Harness, err};
use forkvm_kernel::{ExitReason, Outcome};

const AF_UNIX: u64 = 1;
const AF_INET: u64 = 2;
const AF_NETLINK: u64 = 16;
const SOCK_STREAM: u64 = 1;
const SOCK_DGRAM: u64 = 2;
const SOCK_NONBLOCK: u64 = 0o4000;
const MSG_PEEK: u64 = 2;
const MSG_NOSIGNAL: u64 = 0x4000;

/// A `sockaddr_in` for 127.0.0.1:`port`.
fn loopback(port: u16) -> Vec<u8> {
    let mut addr = 2u16.to_le_bytes().to_vec();
    addr.extend_from_slice(&port.to_be_bytes());
    addr.extend_from_slice(&[127, 0, 0, 1]);
    addr.extend_from_slice(&[0; 8]);
    addr
}

fn socket(h: &mut Harness, family: u64, kind: u64) -> i64 {
    let fd = h.sys(libc::SYS_socket, &[family, kind, 0]);
    assert!(fd >= 0, "socket: {fd}");
    fd
}

/// Puts `addr` at scratch 0x200 and makes `call(fd, addr, len)`.
fn with_addr(h: &mut Harness, call: i64, fd: i64, addr: &[u8]) -> i64 {
    let at = h.at(0x200);
    h.poke(at, addr);
    h.sys(call, &[fd as u64, at, addr.len() as u64])
}

/// `getsockname`: the bytes of the name.
fn name_of(h: &mut Harness, fd: i64) -> Vec<u8> {
    let (out, len) = (h.at(0x300), h.at(0x380));
    h.poke(len, &128u32.to_le_bytes());
    assert_eq!(h.sys(libc::SYS_getsockname, &[fd as u64, out, len]), 0);
    let n = u32::from_le_bytes(h.peek(len, 4).try_into().unwrap());
    h.peek(out, n as usize)
}

fn port_of(h: &mut Harness, fd: i64) -> u16 {
    let name = name_of(h, fd);
    u16::from_be_bytes([name[2], name[3]])
}

fn send(h: &mut Harness, fd: i64, data: &[u8], flags: u64) -> i64 {
    let buf = h.at(0x1000);
    h.poke(buf, data);
    h.sys(
        libc::SYS_sendto,
        &[fd as u64, buf, data.len() as u64, flags, 0, 0],
    )
}

fn recv(h: &mut Harness, fd: i64, len: usize, flags: u64) -> Result<Vec<u8>, i64> {
    let buf = h.at(0x2000);
    let n = h.sys(
        libc::SYS_recvfrom,
        &[fd as u64, buf, len as u64, flags, 0, 0],
    );
    if n < 0 {
        return Err(n);
    }
    Ok(h.peek(buf, n as usize))
}

/// A listening TCP socket on loopback, a connected client and the accepted server end.
fn tcp_connection(h: &mut Harness) -> (i64, i64, i64) {
    let listener = socket(h, AF_INET, SOCK_STREAM);
    assert_eq!(with_addr(h, libc::SYS_bind, listener, &loopback(0)), 0);
    assert_eq!(h.sys(libc::SYS_listen, &[listener as u64, 8]), 0);
    let port = port_of(h, listener);
    let client = socket(h, AF_INET, SOCK_STREAM | SOCK_NONBLOCK);
    assert_eq!(
        with_addr(h, libc::SYS_connect, client, &loopback(port)),
        err(libc::EINPROGRESS),
        "as Linux answers a nonblocking TCP connect, though it is made already"
    );
    let server = h.sys(libc::SYS_accept4, &[listener as u64, 0, 0, 0]);
    assert!(server >= 0, "accept: {server}");
    (listener, client, server)
}

#[test]
fn tcp_over_loopback_connects_carries_bytes_and_ends() {
    let mut h = Harness::new();
    let (listener, client, server) = tcp_connection(&mut h);
    // The accepted socket is named by the address the client reached; its peer is the
    // client's ephemeral port.
    assert_eq!(name_of(&mut h, server), loopback(port_of(&mut h, listener)));
    let (out, len) = (h.at(0x300), h.at(0x380));
    h.poke(len, &128u32.to_le_bytes());
    assert_eq!(h.sys(libc::SYS_getpeername, &[server as u64, out, len]), 0);
    assert_eq!(h.peek(out, 16), name_of(&mut h, client));

    assert_eq!(send(&mut h, client, b"ping", 0), 4);
    assert_eq!(recv(&mut h, server, 100, MSG_PEEK).unwrap(), b"ping");
    assert_eq!(recv(&mut h, server, 2, 0).unwrap(), b"pi");
    assert_eq!(h.read_fd(server, 100).unwrap(), b"ng");
    assert_eq!(
        recv(&mut h, client, 10, 0),
        Err(err(libc::EAGAIN)),
        "nothing for the nonblocking client"
    );
    // Half-close: the server reads the end, and can still answer.
    assert_eq!(
        h.sys(libc::SYS_shutdown, &[client as u64, libc::SHUT_WR as u64]),
        0
    );
    assert_eq!(recv(&mut h, server, 10, 0).unwrap(), b"");
    assert_eq!(send(&mut h, server, b"pong", 0), 4);
    assert_eq!(recv(&mut h, client, 10, 0).unwrap(), b"pong");
    // The client goes: as on Linux, one more write goes out (and is lost); the reset that
    // answers it makes the next one EPIPE (without MSG_NOSIGNAL, SIGPIPE ends us).
    assert_eq!(h.sys(libc::SYS_close, &[client as u64]), 0);
    assert_eq!(send(&mut h, server, b"x", MSG_NOSIGNAL), 1);
    assert_eq!(send(&mut h, server, b"x", MSG_NOSIGNAL), err(libc::EPIPE));
    let buf = h.at(0x1000);
    assert_eq!(
        h.call(libc::SYS_write, &[server as u64, buf, 1]),
        Outcome::Exit(ExitReason::Signaled(libc::SIGPIPE))
    );
}

#[test]
fn connections_fail_the_way_linux_fails_them() {
    let mut h = Harness::new();
    let a = socket(&mut h, AF_INET, SOCK_STREAM);
    assert_eq!(
        with_addr(&mut h, libc::SYS_connect, a, &loopback(9)),
        err(libc::ECONNREFUSED)
    );
    let mut far = loopback(80);
    far[4..8].copy_from_slice(&[93, 184, 216, 34]);
    assert_eq!(
        with_addr(&mut h, libc::SYS_connect, a, &far),
        err(libc::ENETUNREACH),
        "nothing beyond this machine"
    );
    assert_eq!(
        with_addr(&mut h, libc::SYS_bind, a, &far),
        err(libc::EADDRNOTAVAIL)
    );
    assert_eq!(with_addr(&mut h, libc::SYS_bind, a, &loopback(8080)), 0);
    let b = socket(&mut h, AF_INET, SOCK_STREAM);
    assert_eq!(
        with_addr(&mut h, libc::SYS_bind, b, &loopback(8080)),
        err(libc::EADDRINUSE)
    );
    assert_eq!(
        h.sys(libc::SYS_socket, &[AF_NETLINK, SOCK_DGRAM, 0]),
        err(libc::EAFNOSUPPORT)
    );
    assert_eq!(
        h.sys(libc::SYS_socket, &[AF_INET, libc::SOCK_RAW as u64, 1]),
        err(libc::EPERM)
    );
    // A unix path nothing listens on does not exist.
    let mut path = 1u16.to_le_bytes().to_vec();
    path.extend_from_slice(b"/tmp/nobody\0");
    let u = socket(&mut h, AF_UNIX, SOCK_STREAM);
    assert_eq!(
        with_addr(&mut h, libc::SYS_connect, u, &path),
        err(libc::ENOENT)
    );
    // Not a socket; a file is not one either.
    let file = h.open("/etc/hello.txt", libc::O_RDONLY, 0);
    assert_eq!(
        h.sys(libc::SYS_listen, &[file as u64, 1]),
        err(libc::ENOTSOCK)
    );
}

#[test]
fn udp_datagrams_carry_their_sender_and_a_closed_port_is_reported() {
    let mut h = Harness::new();
    let server = socket(&mut h, AF_INET, SOCK_DGRAM);
    assert_eq!(with_addr(&mut h, libc::SYS_bind, server, &loopback(0)), 0);
    let port = port_of(&mut h, server);
    let client = socket(&mut h, AF_INET, SOCK_DGRAM | SOCK_NONBLOCK);
    let (buf, addr) = (h.at(0x1000), h.at(0x200));
    h.poke(buf, b"datagram");
    h.poke(addr, &loopback(port));
    assert_eq!(
        h.sys(libc::SYS_sendto, &[client as u64, buf, 8, 0, addr, 16]),
        8
    );
    let (from, from_len) = (h.at(0x300), h.at(0x380));
    h.poke(from_len, &16u32.to_le_bytes());
    let out = h.at(0x2000);
    assert_eq!(
        h.sys(
            libc::SYS_recvfrom,
            &[server as u64, out, 4, 0, from, from_len]
        ),
        4,
        "a short buffer cuts the datagram"
    );
    assert_eq!(h.peek(out, 4), b"data");
    assert_eq!(h.peek(from, 16), name_of(&mut h, client));
    // A connected UDP socket hears that nobody listens (as from ICMP): resolvers stop
    // waiting at once.
    assert_eq!(
        with_addr(&mut h, libc::SYS_connect, client, &loopback(53)),
        0
    );
    assert_eq!(send(&mut h, client, b"query", 0), 5);
    assert_eq!(recv(&mut h, client, 100, 0), Err(err(libc::ECONNREFUSED)));
    assert_eq!(recv(&mut h, client, 100, 0), Err(err(libc::EAGAIN)));
}

/// `sendmsg` with one iovec and, when `fds` is not empty, an `SCM_RIGHTS` message.
fn send_with_fds(h: &mut Harness, sock: i64, data: &[u8], fds: &[i32]) -> i64 {
    let (msg, iov, buf, control) = (h.at(0x400), h.at(0x480), h.at(0x1000), h.at(0x500));
    h.poke(buf, data);
    h.poke(
        iov,
        &[buf, data.len() as u64].map(u64::to_le_bytes).concat(),
    );
    let mut cmsg = ((16 + 4 * fds.len()) as u64).to_le_bytes().to_vec();
    cmsg.extend_from_slice(&1i32.to_le_bytes());
    cmsg.extend_from_slice(&1i32.to_le_bytes());
    for fd in fds {
        cmsg.extend_from_slice(&fd.to_le_bytes());
    }
    cmsg.resize(cmsg.len().next_multiple_of(8), 0);
    h.poke(control, &cmsg);
    let control_len = if fds.is_empty() { 0 } else { cmsg.len() as u64 };
    let header = [0, 0, iov, 1, control, control_len, 0];
    h.poke(msg, &header.map(u64::to_le_bytes).concat());
    h.sys(libc::SYS_sendmsg, &[sock as u64, msg, 0])
}

#[test]
fn descriptors_pass_over_unix_sockets() {
    let mut h = Harness::new();
    let pair = h.at(0x100);
    assert_eq!(
        h.sys(libc::SYS_socketpair, &[AF_UNIX, SOCK_STREAM, 0, pair]),
        0
    );
    let raw = h.peek(pair, 8);
    let (a, b) = (
        i32::from_le_bytes(raw[..4].try_into().unwrap()),
        i32::from_le_bytes(raw[4..].try_into().unwrap()),
    );
    let file = h.open("/etc/hello.txt", libc::O_RDONLY, 0) as i32;
    assert_eq!(send_with_fds(&mut h, i64::from(a), b"f", &[file]), 1);
    // The sender's copy goes; the one in flight keeps the file open.
    assert_eq!(h.sys(libc::SYS_close, &[file as u64]), 0);

    let (msg, iov, buf, control) = (h.at(0x600), h.at(0x680), h.at(0x2000), h.at(0x700));
    h.poke(iov, &[buf, 16u64].map(u64::to_le_bytes).concat());
    let header = [0, 0, iov, 1, control, 64, 0];
    h.poke(msg, &header.map(u64::to_le_bytes).concat());
    assert_eq!(h.sys(libc::SYS_recvmsg, &[b as u64, msg, 0x4000_0000]), 1);
    assert_eq!(h.peek(buf, 1), b"f");
    let cmsg = h.peek(control, 20);
    assert_eq!(u64::from_le_bytes(cmsg[..8].try_into().unwrap()), 20);
    assert_eq!(
        &cmsg[8..16],
        &[1, 0, 0, 0, 1, 0, 0, 0],
        "SOL_SOCKET, SCM_RIGHTS"
    );
    let received = i32::from_le_bytes(cmsg[16..20].try_into().unwrap());
    assert_eq!(h.read_fd(i64::from(received), 100).unwrap(), HELLO);
    let flags = h.sys(libc::SYS_fcntl, &[received as u64, libc::F_GETFD as u64]);
    assert_eq!(flags, libc::FD_CLOEXEC as i64, "MSG_CMSG_CLOEXEC");

    // Hostile control data is refused, not trusted.
    let (msg, control) = (h.at(0x400), h.at(0x500));
    h.poke(control, &1000u64.to_le_bytes());
    h.poke(msg + 40, &24u64.to_le_bytes());
    h.poke(msg + 32, &control.to_le_bytes());
    assert_eq!(
        h.sys(libc::SYS_sendmsg, &[a as u64, msg, 0]),
        err(libc::EINVAL)
    );
    assert_eq!(
        send_with_fds(&mut h, i64::from(a), b"x", &[999]),
        err(libc::EBADF)
    );
}

#[test]
fn hostile_arguments_get_errors() {
    let mut h = Harness::new();
    let s = socket(&mut h, AF_INET, SOCK_STREAM);
    let addr = h.at(0x200);
    assert_eq!(
        h.sys(libc::SYS_bind, &[s as u64, addr, 1 << 20]),
        err(libc::EINVAL),
        "an address longer than any"
    );
    assert_eq!(
        h.sys(libc::SYS_bind, &[s as u64, 0xdead_0000, 16]),
        err(libc::EFAULT)
    );
    let msg = h.at(0x400);
    h.poke(
        msg,
        &[0u64, 0, h.at(0x480), 1 << 40, 0, 0, 0]
            .map(u64::to_le_bytes)
            .concat(),
    );
    assert_eq!(
        h.sys(libc::SYS_sendmsg, &[s as u64, msg, 0]),
        err(libc::EINVAL),
        "more iovecs than IOV_MAX"
    );
    let value = h.at(0x100);
    assert_eq!(
        h.sys(libc::SYS_setsockopt, &[s as u64, 1, 2, value, 1 << 20]),
        err(libc::EINVAL)
    );
    let len = h.at(0x180);
    h.poke(len, &4u32.to_le_bytes());
    assert_eq!(
        h.sys(
            libc::SYS_getsockopt,
            &[s as u64, 1, libc::SO_TYPE as u64, value, len]
        ),
        0
    );
    assert_eq!(h.peek(value, 4), 1i32.to_le_bytes());
    assert_eq!(
        h.sys(libc::SYS_getsockopt, &[s as u64, 1, 9999, value, len]),
        err(libc::ENOPROTOOPT)
    );
    // Stat says socket.
    assert_eq!(h.fstat(s).unwrap().mode & libc::S_IFMT, libc::S_IFSOCK);
}

/// A `sockaddr_un` naming `path`.
fn unix_path(path: &str) -> Vec<u8> {
    let mut addr = 1u16.to_le_bytes().to_vec();
    addr.extend_from_slice(path.as_bytes());
    addr.push(0);
    addr
}

#[test]
fn unix_sockets_bound_to_paths_are_files() {
    let mut h = Harness::new();
    let listener = socket(&mut h, AF_UNIX, SOCK_STREAM);
    let name = unix_path("/tmp/sock");
    assert_eq!(with_addr(&mut h, libc::SYS_bind, listener, &name), 0);
    assert_eq!(h.sys(libc::SYS_listen, &[listener as u64, 4]), 0);
    let stat = h.stat("/tmp/sock", 0).expect("the socket file exists");
    assert_eq!(stat.mode & libc::S_IFMT, libc::S_IFSOCK);
    assert_eq!(h.open("/tmp/sock", libc::O_RDONLY, 0), err(libc::ENXIO));

    let other = socket(&mut h, AF_UNIX, SOCK_STREAM);
    assert_eq!(
        with_addr(&mut h, libc::SYS_bind, other, &name),
        err(libc::EADDRINUSE)
    );
    let client = socket(&mut h, AF_UNIX, SOCK_STREAM);
    assert_eq!(with_addr(&mut h, libc::SYS_connect, client, &name), 0);
    let server = h.sys(libc::SYS_accept, &[listener as u64, 0, 0]);
    assert!(server >= 0, "accept: {server}");
    assert_eq!(send(&mut h, client, b"by path", 0), 7);
    assert_eq!(recv(&mut h, server, 16, 0).unwrap(), b"by path");

    // The file outlives the socket until unlinked; then the name is free again.
    assert_eq!(h.sys(libc::SYS_close, &[listener as u64]), 0);
    let path = h.cstr(0x600, "/tmp/sock");
    assert_eq!(
        h.sys(libc::SYS_unlinkat, &[libc::AT_FDCWD as u64, path, 0]),
        0
    );
    assert_eq!(with_addr(&mut h, libc::SYS_bind, other, &name), 0);

    let late = socket(&mut h, AF_UNIX, SOCK_STREAM);
    assert_eq!(
        with_addr(&mut h, libc::SYS_connect, late, &unix_path("/tmp/none")),
        err(libc::ENOENT)
    );
    assert_eq!(
        with_addr(
            &mut h,
            libc::SYS_connect,
            late,
            &unix_path("/etc/hello.txt")
        ),
        err(libc::ECONNREFUSED),
        "a path that is not a socket"
    );
}

#[test]
fn a_datagram_from_an_unbound_unix_sender_has_no_address() {
    let mut h = Harness::new();
    let receiver = socket(&mut h, AF_UNIX, SOCK_DGRAM);
    let name = unix_path("/tmp/dgram");
    assert_eq!(with_addr(&mut h, libc::SYS_bind, receiver, &name), 0);
    let sender = socket(&mut h, AF_UNIX, SOCK_DGRAM);
    let (buf, to) = (h.at(0x1000), h.at(0x200));
    h.poke(buf, b"x");
    h.poke(to, &name);
    assert_eq!(
        h.sys(
            libc::SYS_sendto,
            &[sender as u64, buf, 1, 0, to, name.len() as u64]
        ),
        1
    );
    let (from, len) = (h.at(0x300), h.at(0x380));
    h.poke(len, &128u32.to_le_bytes());
    assert_eq!(
        h.sys(
            libc::SYS_recvfrom,
            &[receiver as u64, h.at(0x2000), 16, 0, from, len]
        ),
        1
    );
    assert_eq!(h.peek(len, 4), 0u32.to_le_bytes(), "no sender name");
}

#[test]
fn fifos_connect_a_reader_and_a_writer() {
    let mut h = Harness::new();
    let path = h.cstr(0x600, "/tmp/fifo");
    assert_eq!(
        h.sys(
            libc::SYS_mknodat,
            &[
                libc::AT_FDCWD as u64,
                path,
                u64::from(libc::S_IFIFO | 0o600),
                0
            ]
        ),
        0
    );
    assert_eq!(
        h.stat("/tmp/fifo", 0).unwrap().mode & libc::S_IFMT,
        libc::S_IFIFO
    );
    // A nonblocking writer with no reader is refused; a nonblocking reader is not.
    assert_eq!(
        h.open("/tmp/fifo", libc::O_WRONLY | libc::O_NONBLOCK, 0),
        err(libc::ENXIO)
    );
    let reader = h.open("/tmp/fifo", libc::O_RDONLY | libc::O_NONBLOCK, 0);
    assert!(reader >= 0, "reader: {reader}");
    assert_eq!(h.read_fd(reader, 8), Ok(Vec::new()), "no writer yet: EOF");
    let writer = h.open("/tmp/fifo", libc::O_WRONLY, 0);
    assert!(writer >= 0, "writer: {writer}");
    assert_eq!(
        h.read_fd(reader, 8),
        Err(err(libc::EAGAIN)),
        "empty, writer open"
    );
    assert_eq!(h.write_fd(writer, b"piped"), 5);
    assert_eq!(h.read_fd(reader, 8), Ok(b"piped".to_vec()));
    assert_eq!(h.sys(libc::SYS_close, &[writer as u64]), 0);
    assert_eq!(h.read_fd(reader, 8), Ok(Vec::new()), "writer gone: EOF");
}
