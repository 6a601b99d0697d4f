//! Connections against the real `forkvm serve`: idle, slow and surplus clients are capped
//! and timed out before authentication, and never keep a fresh client from its answer.

#[path = "support/server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;
use server::Server;

/// A TCP connection to `server` from the loopback address `source` (127/8 is all ours,
/// so each test client can be its own "address").
fn connect_from(source: Ipv4Addr, server: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket.connect(&server.into()).unwrap();
    socket.into()
}

fn address(server: &Server) -> SocketAddr {
    server
        .base
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .unwrap()
}

/// Reads until the server closes the connection or `patience` passes: the bytes read and
/// whether it closed.
fn read_until_closed(stream: &mut TcpStream, patience: Duration) -> (String, bool) {
    let deadline = Instant::now() + patience;
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (String::from_utf8_lossy(&read).into(), false);
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&read).into(), true),
            Ok(n) => read.extend_from_slice(&buf[..n]),
            // A reset is the server closing too (it closes with our bytes unread).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&read).into(), true);
            }
            Err(_) => return (String::from_utf8_lossy(&read).into(), false),
        }
    }
}

/// Lets this test process hold `count` descriptors.
fn allow_descriptors(count: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < count {
            assert!(
                limit.rlim_max >= count,
                "the test needs {count} descriptors; the hard limit is {}",
                limit.rlim_max
            );
            limit.rlim_cur = count;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
}

#[test]
fn two_thousand_idle_connections_do_not_keep_a_fresh_client_waiting() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    allow_descriptors(4096);
    let server = Server::start(&["--max-connections-per-address", "300"]);
    let target = address(&server);
    // 2,000 connections that never send a byte, from eight addresses, all admitted.
    let idle: Vec<TcpStream> = (0..2000)
        .map(|i| connect_from(Ipv4Addr::new(127, 0, 1, 1 + (i % 8) as u8), target))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let open = server.gauge("forkvm_connections_open");
    assert!(open >= 2000, "{open} connections open");
    // A fresh client is answered at once (the bound is generous: the answer takes
    // milliseconds; a server blocked on its descriptors or tasks would never answer).
    let started = Instant::now();
    let health = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .get(server.url("/v1/health"))
        .send()
        .unwrap();
    assert!(health.status().is_success());
    eprintln!(
        "health answered in {:?} with {open} idle connections",
        started.elapsed()
    );
    let reply = server.exec(&server.alice, json!({ "code": "print(6 * 7)" }));
    assert_eq!(reply["stdout"], "42\n", "{reply}");
    drop(idle);
}

#[test]
fn connections_over_an_address_cap_are_refused_and_places_come_back() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&["--max-connections-per-address", "4"]);
    let target = address(&server);
    let crowd = Ipv4Addr::new(127, 0, 2, 1);
    let mut held: Vec<TcpStream> = (0..4).map(|_| connect_from(crowd, target)).collect();
    // The fifth from the same address gets a 503 naming the reason, and is closed.
    let mut surplus = connect_from(crowd, target);
    let (reply, closed) = read_until_closed(&mut surplus, Duration::from_secs(10));
    assert!(closed, "the surplus connection was left open");
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply:?}");
    assert!(reply.contains("too_many_connections"), "{reply:?}");
    // Another address is served.
    let mut other = connect_from(Ipv4Addr::new(127, 0, 2, 2), target);
    other
        .write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let (reply, _) = read_until_closed(&mut other, Duration::from_secs(10));
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    // A connection that closes gives its place back.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = connect_from(crowd, target);
        again
            .write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let (reply, _) = read_until_closed(&mut again, Duration::from_secs(10));
        if reply.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place never came back: {reply:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.gauge("forkvm_connections_refused_total") >= 1);
}

#[test]
fn slow_headers_idle_keep_alive_and_slow_bodies_are_cut_off() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&["--header-timeout", "1", "--body-timeout", "1"]);
    let target = address(&server);
    let from = Ipv4Addr::new(127, 0, 3, 1);
    // Slowloris: half a header, then silence. Closed without an answer.
    let mut slow = connect_from(from, target);
    slow.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(20));
    assert!(closed, "a half-sent header kept its connection");
    // A keep-alive connection is answered, then closed once it idles past the timeout.
    let mut idle = connect_from(from, target);
    idle.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let (reply, closed) = read_until_closed(&mut idle, Duration::from_secs(20));
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    assert!(closed, "an idle keep-alive connection was kept");
    // An authenticated request whose body never finishes gets a 408 in the error shape.
    let mut trickle = connect_from(from, target);
    let head = format!(
        "POST /v1/exec HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"code\":",
        server.alice
    );
    trickle.write_all(head.as_bytes()).unwrap();
    let (reply, _) = read_until_closed(&mut trickle, Duration::from_secs(20));
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(reply.contains("\"kind\":\"body_timeout\""), "{reply:?}");
    // Anonymous clients never get that far: the key is checked before any body is read.
    let mut anonymous = connect_from(from, target);
    anonymous
        .write_all(b"POST /v1/exec HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        .unwrap();
    let (reply, _) = read_until_closed(&mut anonymous, Duration::from_secs(20));
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply:?}");
}
