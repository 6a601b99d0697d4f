//! Fair sharing against the real `forkvm serve`: one key flooding busy loops does not keep
//! another key's request waiting.

#[path = "support/server.rs"]
mod server;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use server::{Server, client};

/// Sends a busy-loop execution for `key` on a raw connection and leaves it running; the
/// server ends it when the connection is dropped.
fn start_busy_loop(server: &Server, key: &str) -> TcpStream {
    let address = server.base.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(address).unwrap();
    let body = json!({ "code": "while True: pass", "timeout_seconds": 120 }).to_string();
    let request = format!(
        "POST /v1/exec HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream
}

#[test]
fn a_key_flooding_busy_loops_does_not_delay_another_keys_print() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    // Four slots; a key may hold two of them.
    let server = Server::start(&["--exec-slots", "4"]);
    // Alice queues twelve executions that never end on their own.
    let flood: Vec<TcpStream> = (0..12)
        .map(|_| start_busy_loop(&server, &server.alice))
        .collect();
    // Let them reach the server and take what slots they may.
    std::thread::sleep(Duration::from_secs(2));
    // Bob's first request runs at once: it does not wait for any of Alice's.
    let started = Instant::now();
    let reply = server.exec(&server.bob, json!({ "code": "print(1)" }));
    let took = started.elapsed();
    assert_eq!(reply["stdout"], "1\n", "{reply}");
    let queued = reply["queue_time_ms"].as_f64().unwrap();
    eprintln!("bob answered in {took:?} (queued {queued} ms) behind 12 busy loops");
    // None of Alice's has ended: Bob did not wait for one (they run for 120 s).
    for mut stream in &flood {
        stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let read = stream.read(&mut byte);
        assert!(
            matches!(&read, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "one of alice's busy loops answered: {read:?}"
        );
    }
    // Alice runs two, her cap; the other ten wait their turn.
    assert_eq!(server.gauge("forkvm_executions_running"), 2);
    assert_eq!(server.gauge("forkvm_executions_waiting"), 10);
    // Dropping Alice's connections ends her executions and gives the slots back.
    drop(flood);
    let bobs: Vec<_> = (0..4)
        .map(|i| {
            let url = server.url("/v1/exec");
            let key = server.bob.clone();
            std::thread::spawn(move || {
                let reply: Value = client()
                    .post(url)
                    .bearer_auth(key)
                    .json(&json!({ "code": format!("print({i})") }))
                    .send()
                    .unwrap()
                    .json()
                    .unwrap();
                assert_eq!(reply["stdout"], format!("{i}\n"), "{reply}");
            })
        })
        .collect();
    for bob in bobs {
        bob.join().unwrap();
    }
}
