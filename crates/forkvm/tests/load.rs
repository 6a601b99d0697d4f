//! A bounded load test against the real server: concurrent clients send a few thousand
//! requests; every response must be the right one for its request, none may be a 5xx, and
//! the server's memory must come back to its baseline once the sessions are gone. It
//! prints requests/s and latency percentiles (for docs/benchmarks.md) but asserts no timing.

#[path = "support/server.rs"]
mod server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{Value, json};
use server::Server;

const CLIENTS: usize = 16;
const EXECS_PER_CLIENT: usize = 150;
const SESSION_CLIENTS: usize = 8;
const SESSION_STEPS: usize = 20;

fn resident_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

fn post(client: &Client, server: &Server, path: &str, body: Value) -> (u16, Value) {
    let response = client
        .post(server.url(path))
        .bearer_auth(&server.alice)
        .json(&body)
        .send()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

#[test]
fn thousands_of_requests_each_get_their_own_answer() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Arc::new(Server::start(&[
        "--rate",
        "100000",
        "--burst",
        "100000",
        "--max-sandboxes",
        "1000",
    ]));
    let client = Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    // Warm up, let the pool fill, then take the memory baseline.
    for i in 0..20 {
        let (status, body) = post(
            &client,
            &server,
            "/v1/exec",
            json!({"code": format!("print({i})")}),
        );
        assert_eq!(status, 200, "{body}");
    }
    std::thread::sleep(Duration::from_secs(3));
    let baseline = resident_kib(server.pid());

    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let server = server.clone();
            std::thread::spawn(move || {
                let client = Client::builder()
                    .timeout(Duration::from_secs(300))
                    .build()
                    .unwrap();
                let mut latencies = Vec::with_capacity(EXECS_PER_CLIENT);
                for i in 0..EXECS_PER_CLIENT {
                    let n = c * 1_000_000 + i;
                    let sent = Instant::now();
                    let (status, body) = post(
                        &client,
                        &server,
                        "/v1/exec",
                        json!({"code": format!("print({n} * 7)")}),
                    );
                    latencies.push(sent.elapsed());
                    assert!(status < 500, "5xx: {status} {body}");
                    assert_eq!(status, 200, "{body}");
                    assert_eq!(
                        body["stdout"],
                        format!("{}\n", n * 7),
                        "a response for another request"
                    );
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let elapsed = started.elapsed();
    latencies.sort();
    let requests = latencies.len();
    println!(
        "load: {requests} execs from {CLIENTS} clients in {:.1} s = {:.0} req/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );

    // Sessions: each client keeps state across requests, then deletes its session.
    let started = Instant::now();
    let session_workers: Vec<_> = (0..SESSION_CLIENTS)
        .map(|c| {
            let server = server.clone();
            std::thread::spawn(move || {
                let client = Client::builder()
                    .timeout(Duration::from_secs(300))
                    .build()
                    .unwrap();
                let (status, info) = post(&client, &server, "/v1/sandboxes", json!({}));
                assert_eq!(status, 201, "{info}");
                let id = info["id"].as_str().unwrap().to_string();
                let path = format!("/v1/sandboxes/{id}/exec");
                post(
                    &client,
                    &server,
                    &path,
                    json!({"code": format!("total = {c}")}),
                );
                for step in 1..=SESSION_STEPS {
                    let (status, body) = post(
                        &client,
                        &server,
                        &path,
                        json!({"code": format!("total += {step}\nprint(total)")}),
                    );
                    assert_eq!(status, 200, "{body}");
                    assert_eq!(body["stdout"], format!("{}\n", c + step * (step + 1) / 2));
                }
                let deleted = client
                    .delete(server.url(&format!("/v1/sandboxes/{id}")))
                    .bearer_auth(&server.alice)
                    .send()
                    .unwrap();
                assert_eq!(deleted.status().as_u16(), 204);
            })
        })
        .collect();
    for worker in session_workers {
        worker.join().unwrap();
    }
    println!(
        "load: {} session requests from {SESSION_CLIENTS} clients in {:.1} s",
        SESSION_CLIENTS * (SESSION_STEPS + 3),
        started.elapsed().as_secs_f64()
    );

    // Memory returns to the baseline once the sandboxes are torn down and the pool refilled.
    let deadline = Instant::now() + Duration::from_secs(60);
    let limit = baseline + baseline / 5 + 64 * 1024;
    let mut after = resident_kib(server.pid());
    while after > limit && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        after = resident_kib(server.pid());
    }
    println!("load: server resident memory {baseline} KiB before, {after} KiB after");
    assert!(
        after <= limit,
        "memory did not return: {baseline} KiB -> {after} KiB"
    );
}

/// `forkvm bench load`, CI-sized: its own server, four keys, the whole hostile mix; every
/// answer right, no 5xx, no dropped connection.
#[test]
fn the_mixed_hostile_load_gets_only_right_answers() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_forkvm"))
        .args(["bench", "load", "--duration", "15", "--clients", "6"])
        .env("FORKVM_CACHE_DIR", server::cache_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stderr);
    eprintln!("{table}");
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no report ({e}): {table}"));
    assert_eq!(report["wrong_answers"], 0, "{report}");
    assert_eq!(report["server_errors"], 0, "{report}");
    assert_eq!(report["transport_errors"], 0, "{report}");
    assert!(output.status.success(), "{table}");
    // Every kind of the mix ran.
    let kinds = report["latency"].as_object().unwrap();
    assert_eq!(kinds.len(), 8, "{report}");
}
