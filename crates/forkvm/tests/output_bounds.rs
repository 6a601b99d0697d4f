//! What results cost the real `forkvm serve`: output bombs in a batch and clients that
//! read nothing keep the server's memory bounded.

#[path = "support/server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use server::{Server, client};

/// A `/proc/<pid>/status` field in bytes (`VmRSS`, `VmHWM`).
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    server::kib_field(&status, field)
}

/// The server's peak resident memory may grow this much for the batch below: its
/// response cap is 128 MiB of output, held as bytes (and once more while a result is
/// decoded), plus pieces of JSON in flight.
const BATCH_BOUND: u64 = 384 << 20;

#[test]
fn a_batch_of_64_output_bombs_keeps_the_server_within_its_bound() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    // Warm up (the first request loads what every later one shares).
    let warm = server.exec(&server.alice, json!({ "code": "print(1)" }));
    assert_eq!(warm["stdout"], "1\n");
    let before = memory(server.pid(), "VmRSS");
    // Each writes 64 MiB of control bytes (six bytes each as JSON text) to stdout and
    // stderr, and asks for all of it.
    let bomb = json!({
        "code": "import sys\nb = b'\\x01' * (1 << 20)\nfor _ in range(64):\n    sys.stdout.buffer.write(b); sys.stdout.flush()\n    sys.stderr.buffer.write(b); sys.stderr.flush()",
        "output_limit_bytes": 64 << 20,
    });
    let executions: Vec<Value> = (0..64).map(|_| bomb.clone()).collect();
    let reply: Value = client()
        .post(server.url("/v1/exec/batch"))
        .bearer_auth(&server.alice)
        .json(&json!({ "executions": executions }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let results = reply["results"].as_array().unwrap();
    assert_eq!(results.len(), 64);
    for result in results {
        // The batch's 128 MiB cap, shared by its 128 streams: 1 MiB each.
        let stdout = result["stdout"].as_str().unwrap();
        assert!(stdout.len() <= 1 << 20, "{}", stdout.len());
        assert!(stdout.bytes().all(|b| b == 1));
        assert_eq!(
            result["error"]["kind"], "output_limit",
            "{}",
            result["error"]
        );
    }
    let peak = memory(server.pid(), "VmHWM");
    eprintln!(
        "server: {} MiB resident before, {} MiB peak after",
        before >> 20,
        peak >> 20
    );
    assert!(
        peak < before + BATCH_BOUND,
        "the server grew from {} MiB to a peak of {} MiB",
        before >> 20,
        peak >> 20
    );
    assert_eq!(server.gauge("forkvm_results_reserved_bytes"), 0);
}

#[test]
fn a_client_that_reads_none_of_a_large_response_is_cut_off_and_its_share_freed() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&["--send-timeout", "1"]);
    let address = server.base.strip_prefix("http://").unwrap();
    let mut stuck = TcpStream::connect(address).unwrap();
    let body = json!({
        "code": "import sys\nsys.stdout.write('x' * (32 << 20))",
        "output_limit_bytes": 32 << 20,
    })
    .to_string();
    let request = format!(
        "POST /v1/exec HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        server.alice,
        body.len()
    );
    stuck.write_all(request.as_bytes()).unwrap();
    // Its result is reserved while it runs and is sent...
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.gauge("forkvm_results_reserved_bytes") == 0 {
        assert!(Instant::now() < deadline, "nothing was ever reserved");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...and freed once the server gives up on a client that takes nothing.
    while server.gauge("forkvm_results_reserved_bytes") != 0 {
        assert!(
            Instant::now() < deadline,
            "the stuck response kept its share"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The connection was closed: what the sockets held, then the end.
    stuck
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let closed = loop {
        match stuck.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => received += n,
            Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    assert!(closed, "the stuck connection was left open");
    assert!(
        received < 32 << 20,
        "the whole response arrived ({received} bytes)"
    );
    // The server serves on.
    let reply = server.exec(&server.alice, json!({ "code": "print(2)" }));
    assert_eq!(reply["stdout"], "2\n");
}

#[test]
fn a_large_body_never_waits_on_its_own_results_share() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    // A results budget smaller than body + result: a request holding its 14 MiB body
    // must still get its result's share (bodies have a budget of their own).
    let server = Server::start(&["--results-memory-mb", "16"]);
    let code = format!("# {}\nprint('ok')", "a".repeat(14 << 20));
    let reply = server.exec(&server.alice, json!({ "code": code }));
    assert_eq!(reply["stdout"], "ok\n", "{}", reply["error"]);
}
