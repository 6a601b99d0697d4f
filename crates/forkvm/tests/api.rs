//! The HTTP API against the real `forkvm serve` on loopback.

mod common;
#[path = "support/server.rs"]
mod server;

use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use reqwest::blocking::Response;
use serde_json::{Value, json};
use server::{Server, client};

fn post(server: &Server, key: &str, path: &str, body: Value) -> Response {
    client()
        .post(server.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .unwrap()
}

fn json_of(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().unwrap())
}

fn exec_ok(server: &Server, key: &str, path: &str, code: &str) -> Value {
    let (status, body) = json_of(post(server, key, path, json!({ "code": code })));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["exit_code"], 0, "{body}");
    body
}

#[test]
fn exec_batch_health_metrics_and_openapi() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    let body = exec_ok(
        &server,
        &server.alice,
        "/v1/exec",
        "import numpy\nprint(numpy.arange(3).sum())",
    );
    assert_eq!(body["stdout"], "3\n");
    for field in [
        "id",
        "stderr",
        "fork_time_ms",
        "exec_time_ms",
        "total_time_ms",
        "error",
        "stdout_truncated",
    ] {
        assert!(body.get(field).is_some(), "missing {field}: {body}");
    }
    assert_eq!(body["error"]["kind"], "none");

    let (status, batch) = json_of(post(
        &server,
        &server.alice,
        "/v1/exec/batch",
        json!({"executions": [{"code": "print(1)"}, {"code": "print(2)", "language": "python"}, {"code": "raise SystemExit(4)"}]}),
    ));
    assert_eq!(status, StatusCode::OK);
    let results = batch["results"].as_array().unwrap();
    assert_eq!(results[0]["stdout"], "1\n");
    assert_eq!(results[1]["stdout"], "2\n");
    assert_eq!(results[2]["exit_code"], 4);

    let (status, health) = json_of(client().get(server.url("/v1/health")).send().unwrap());
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["templates"]["python"]["ready"], true);

    let metrics = server.metrics();
    for name in [
        "forkvm_fork_seconds_bucket",
        "forkvm_exec_seconds_bucket",
        "forkvm_total_seconds_bucket",
        "forkvm_executions_total{error_kind=\"none\"}",
        "forkvm_pool_depth{template=\"python\"}",
        "forkvm_sessions_live",
        "forkvm_resident_bytes",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }

    let (status, doc) = json_of(client().get(server.url("/v1/openapi.json")).send().unwrap());
    assert_eq!(status, StatusCode::OK);
    assert!(doc["paths"]["/v1/exec"]["post"].is_object());
    assert!(doc["paths"]["/v1/sandboxes/{id}/fork"]["post"].is_object());
}

#[test]
fn binary_output_and_errors_come_back_precisely() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    let (_, body) = json_of(post(
        &server,
        &server.alice,
        "/v1/exec",
        json!({"code": "import sys\nsys.stdout.buffer.write(bytes([0, 255, 10]))", "stdin": "x"}),
    ));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(body["stdout_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, vec![0, 255, 10]);

    let (_, timeout) = json_of(post(
        &server,
        &server.alice,
        "/v1/exec",
        json!({"code": "while True: pass", "timeout_seconds": 0.5}),
    ));
    assert_eq!(timeout["error"]["kind"], "timeout");
    assert_eq!(timeout["exit_code"], 124);

    let (_, files) = json_of(post(
        &server,
        &server.alice,
        "/v1/exec",
        json!({"code": "print(open('in.txt').read(), open('/b', 'rb').read())", "cwd": "/w",
               "files": [{"path": "in.txt", "content": "text"}, {"path": "/b", "content_base64": "AAE="}]}),
    ));
    assert_eq!(files["stdout"], "text b'\\x00\\x01'\n", "{files}");
}

#[test]
fn bad_requests_get_precise_statuses() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&["--max-body-mb", "1"]);
    let c = client();
    let missing = c
        .post(server.url("/v1/exec"))
        .json(&json!({"code": "1"}))
        .send()
        .unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let wrong = c
        .post(server.url("/v1/exec"))
        .bearer_auth("fvk_not_a_key")
        .json(&json!({"code": "1"}))
        .send()
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(json_of(wrong).1["error"]["kind"], "unauthorized");

    // Malformed requests, field by field: tests/validation.rs.
    let huge = "x".repeat(2 << 20);
    let too_large = post(&server, &server.alice, "/v1/exec", json!({ "code": huge }));
    assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json_of(too_large).1["error"]["kind"], "payload_too_large");
}

#[test]
fn the_rate_limit_answers_429_with_retry_after() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&["--rate", "1", "--burst", "3"]);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = client()
            .get(server.url("/v1/sandboxes"))
            .bearer_auth(&server.alice)
            .send()
            .unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(response.headers().get("retry-after").is_some());
        }
        statuses.push(response.status());
    }
    assert_eq!(&statuses[..3], &[StatusCode::OK; 3]);
    assert_eq!(statuses[4], StatusCode::TOO_MANY_REQUESTS);
    // Another key has its own budget.
    let bob = client()
        .get(server.url("/v1/sandboxes"))
        .bearer_auth(&server.bob)
        .send()
        .unwrap();
    assert_eq!(bob.status(), StatusCode::OK);
}

fn create_session(server: &Server, key: &str, body: Value) -> String {
    let (status, info) = json_of(post(server, key, "/v1/sandboxes", body));
    assert_eq!(status, StatusCode::CREATED, "{info}");
    info["id"].as_str().unwrap().to_string()
}

/// Forks session `id` into `count` new sessions, returning their ids.
fn fork_session(server: &Server, key: &str, id: &str, count: usize) -> Vec<String> {
    let path = format!("/v1/sandboxes/{id}/fork");
    let (status, forked) = json_of(post(server, key, &path, json!({ "count": count })));
    assert_eq!(status, StatusCode::OK, "{forked}");
    forked["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sessions_keep_state_take_files_and_fork_into_diverging_branches() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    let key = &server.alice;
    let id = create_session(&server, key, json!({"metadata": {"owner": "test"}}));
    let exec_path = format!("/v1/sandboxes/{id}/exec");
    exec_ok(
        &server,
        key,
        &exec_path,
        "import numpy as np\nstate = [np.arange(3)]",
    );
    assert_eq!(
        exec_ok(&server, key, &exec_path, "print(state[0].sum())")["stdout"],
        "3\n"
    );

    // Files in and out, binary.
    let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let put = client()
        .put(server.url(&format!("/v1/sandboxes/{id}/files/data/in.bin")))
        .bearer_auth(key)
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    exec_ok(
        &server,
        key,
        &exec_path,
        "d = open('/data/in.bin', 'rb').read()\nopen('/data/out.bin', 'wb').write(d[::-1])",
    );
    let got = client()
        .get(server.url(&format!("/v1/sandboxes/{id}/files/data/out.bin")))
        .bearer_auth(key)
        .send()
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    let mut reversed = data.clone();
    reversed.reverse();
    assert_eq!(got.bytes().unwrap().to_vec(), reversed);
    let missing = client()
        .get(server.url(&format!("/v1/sandboxes/{id}/files/nope")))
        .bearer_auth(key)
        .send()
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    // Three branches start from this state and diverge.
    let branches = fork_session(&server, key, &id, 3);
    assert_eq!(branches.len(), 3);
    exec_ok(&server, key, &exec_path, "state.append('parent')");
    for (i, branch) in branches.iter().enumerate() {
        exec_ok(
            &server,
            key,
            &format!("/v1/sandboxes/{branch}/exec"),
            &format!("state.append('branch{i}')"),
        );
    }
    for (i, branch) in branches.iter().enumerate() {
        let out = exec_ok(
            &server,
            key,
            &format!("/v1/sandboxes/{branch}/exec"),
            "print(len(state), state[-1])",
        );
        assert_eq!(out["stdout"], format!("2 branch{i}\n"));
    }
    assert_eq!(
        exec_ok(&server, key, &exec_path, "print(len(state), state[-1])")["stdout"],
        "2 parent\n"
    );

    let (_, list) = json_of(
        client()
            .get(server.url("/v1/sandboxes"))
            .bearer_auth(key)
            .send()
            .unwrap(),
    );
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 4);
    let (_, info) = json_of(
        client()
            .get(server.url(&format!("/v1/sandboxes/{id}")))
            .bearer_auth(key)
            .send()
            .unwrap(),
    );
    assert_eq!(info["metadata"]["owner"], "test");

    let deleted = client()
        .delete(server.url(&format!("/v1/sandboxes/{id}")))
        .bearer_auth(key)
        .send()
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let gone = post(&server, key, &exec_path, json!({"code": "1"}));
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
}

#[test]
fn a_session_of_one_key_does_not_exist_for_another() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    let id = create_session(&server, &server.alice, json!({}));
    let as_bob = |method: reqwest::Method, path: String| {
        let body = if path.ends_with("/exec") {
            json!({"code": "1"})
        } else {
            json!({})
        };
        client()
            .request(method, server.url(&path))
            .bearer_auth(&server.bob)
            .json(&body)
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(
        as_bob(reqwest::Method::GET, format!("/v1/sandboxes/{id}")),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        as_bob(reqwest::Method::POST, format!("/v1/sandboxes/{id}/exec")),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        as_bob(reqwest::Method::POST, format!("/v1/sandboxes/{id}/fork")),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        as_bob(
            reqwest::Method::GET,
            format!("/v1/sandboxes/{id}/files/etc/hostname")
        ),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        as_bob(reqwest::Method::DELETE, format!("/v1/sandboxes/{id}")),
        StatusCode::NOT_FOUND
    );
    let (_, list) = json_of(
        client()
            .get(server.url("/v1/sandboxes"))
            .bearer_auth(&server.bob)
            .send()
            .unwrap(),
    );
    assert!(list["sandboxes"].as_array().unwrap().is_empty());
    // Still there for Alice.
    exec_ok(
        &server,
        &server.alice,
        &format!("/v1/sandboxes/{id}/exec"),
        "print(1)",
    );
}

#[test]
fn idle_sessions_expire_after_their_ttl() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    let id = create_session(&server, &server.alice, json!({"ttl_seconds": 1}));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client()
            .get(server.url(&format!("/v1/sandboxes/{id}")))
            .bearer_auth(&server.alice)
            .send()
            .unwrap()
            .status();
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert!(Instant::now() < deadline, "session did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = server.metrics();
    assert!(
        metrics.contains("forkvm_sessions_expired_total 1"),
        "{metrics}"
    );
}

/// Reads an SSE response, returning (event, data, arrival time) triples.
fn read_events(mut response: Response) -> Vec<(String, String, Instant)> {
    let mut events = Vec::new();
    let mut pending = String::new();
    let mut buf = [0u8; 4096];
    let (mut event, mut data) = (String::new(), String::new());
    loop {
        let n = response.read(&mut buf).unwrap();
        if n == 0 {
            return events;
        }
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let line = line.trim_end_matches('\n');
            if let Some(name) = line.strip_prefix("event: ") {
                event = name.to_string();
            } else if let Some(value) = line.strip_prefix("data: ") {
                data = value.to_string();
            } else if line.is_empty() && !event.is_empty() {
                events.push((
                    std::mem::take(&mut event),
                    std::mem::take(&mut data),
                    Instant::now(),
                ));
            }
        }
    }
}

#[test]
fn streaming_sends_output_while_the_code_runs() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    let code = "import time, sys\nfor i in range(8):\n    print('tick', i, flush=True)\n    time.sleep(0.25)";
    let response = post(
        &server,
        &server.alice,
        "/v1/exec",
        json!({"code": code, "stream": true}),
    );
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = read_events(response);
    let ticks: Vec<_> = events.iter().filter(|e| e.0 == "stdout").collect();
    let result = events
        .iter()
        .find(|e| e.0 == "result")
        .expect("a result event");
    assert!(ticks.len() >= 4, "{events:?}");
    assert!(
        result.2.duration_since(ticks[0].2) >= Duration::from_millis(1000),
        "the first chunk must arrive well before the end"
    );
    let final_result: Value = serde_json::from_str(&result.1).unwrap();
    assert_eq!(final_result["exit_code"], 0);
    assert!(final_result["stdout"].as_str().unwrap().contains("tick 7"));

    // Session exec streams too (with the Accept header instead of the field).
    let id = create_session(&server, &server.alice, json!({}));
    let streamed = client()
        .post(server.url(&format!("/v1/sandboxes/{id}/exec")))
        .bearer_auth(&server.alice)
        .header("accept", "text/event-stream")
        .json(&json!({"code": "print('hello')"}))
        .send()
        .unwrap();
    let events = read_events(streamed);
    assert!(
        events
            .iter()
            .any(|e| e.0 == "stdout" && e.1.contains("hello")),
        "{events:?}"
    );
    assert!(events.iter().any(|e| e.0 == "result"));
}

/// The server's resident memory, from `/proc`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[test]
fn a_client_that_does_not_read_its_stream_pauses_the_sandbox_not_the_server() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    // 16 MiB as 16,384 writev calls of 1,024 one-byte pieces each.
    let code = "import os\nfor _ in range(16384):\n    os.writev(1, [b'x'] * 1024)";
    let before = rss_bytes(server.pid());
    let response = post(
        &server,
        &server.alice,
        "/v1/exec",
        json!({"code": code, "stream": true, "output_limit_bytes": 32 << 20, "timeout_seconds": 120}),
    );
    // The client reads nothing for a while: the code writes until the queue and the
    // worker's window are full, then waits.
    std::thread::sleep(Duration::from_secs(3));
    let grown = rss_bytes(server.pid()).saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "the server grew {} MiB for a client that does not read",
        grown >> 20
    );
    // Then it reads: every byte arrives, in far fewer events than writes.
    let events = read_events(response);
    let mut bytes = 0;
    let mut outputs = 0;
    for (name, data, _) in &events {
        if name == "stdout" {
            let text: String = serde_json::from_str(data).unwrap();
            assert!(text.bytes().all(|b| b == b'x'));
            bytes += text.len();
            outputs += 1;
        }
    }
    assert_eq!(bytes, 16 << 20);
    assert!(outputs <= (16 << 20) / 1024, "{outputs} events for 16 MiB");
    let result = events.iter().find(|e| e.0 == "result").expect("a result");
    let result: Value = serde_json::from_str(&result.1).unwrap();
    assert_eq!(result["exit_code"], 0, "{}", result["stderr"]);
}

/// Reads a response's body until `text` has come.
fn read_until(response: &mut Response, text: &str) {
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains(text) {
        let n = response.read(&mut buf).unwrap();
        assert!(n > 0, "the body ended before {text:?}: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[test]
fn a_client_that_goes_away_ends_its_execution_and_frees_the_slot() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    // One execution at a time: a spinning one that kept its slot would hold up the next
    // request for its whole two minutes.
    let server = Server::start(&["--exec-slots", "1"]);
    let spin = "print('spinning', flush=True)\nwhile True: pass";
    let answers = |server: &Server| {
        let response = client()
            .post(server.url("/v1/exec"))
            .bearer_auth(&server.alice)
            .timeout(Duration::from_secs(90))
            .json(&json!({ "code": "print(6 * 7)" }))
            .send()
            .expect("the next request is answered before the spinning one's limit");
        assert_eq!(response.json::<Value>().unwrap()["stdout"], "42\n");
    };

    // A stream whose client leaves once it has seen the code start.
    let mut stream = post(
        &server,
        &server.alice,
        "/v1/exec",
        json!({ "code": spin, "stream": true, "timeout_seconds": 120 }),
    );
    read_until(&mut stream, "spinning");
    drop(stream);
    answers(&server);

    // A plain request whose client gives up.
    let gave_up = client()
        .post(server.url("/v1/exec"))
        .bearer_auth(&server.alice)
        .timeout(Duration::from_secs(2))
        .json(&json!({ "code": spin, "timeout_seconds": 120 }))
        .send();
    assert!(gave_up.is_err());
    answers(&server);

    // A session's execution takes the slot like any other: while one spins, a plain
    // request waits (its client gives up); once the session's client leaves, it answers.
    let id = create_session(&server, &server.alice, json!({}));
    let mut stream = post(
        &server,
        &server.alice,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({ "code": spin, "stream": true, "timeout_seconds": 120 }),
    );
    read_until(&mut stream, "spinning");
    let waited = client()
        .post(server.url("/v1/exec"))
        .bearer_auth(&server.alice)
        .timeout(Duration::from_secs(2))
        .json(&json!({ "code": "print(1)" }))
        .send();
    assert!(waited.is_err(), "a plain request ran beside the session's");
    drop(stream);
    answers(&server);
}

#[test]
fn shutdown_finishes_in_flight_executions() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    let url = server.url("/v1/exec");
    let key = server.alice.clone();
    let in_flight = std::thread::spawn(move || {
        client()
            .post(url)
            .bearer_auth(key)
            .json(&json!({"code": "import time\ntime.sleep(1.5)\nprint('finished')"}))
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    let status = server.terminate();
    let body = in_flight.join().unwrap();
    assert_eq!(body["stdout"], "finished\n");
    assert!(status.success(), "{status:?}");
}

#[test]
fn host_memory_of_sessions_counts_against_the_keys_limit() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&["--key-memory-mb", "96"]);
    let key = &server.alice;
    let id = create_session(&server, key, json!({}));
    let fresh = server.session(key, &id)["memory_bytes"].as_u64().unwrap();
    // 64 MiB the program writes are 64 MiB more of the host's memory.
    exec_ok(
        &server,
        key,
        &format!("/v1/sandboxes/{id}/exec"),
        "data = b'\\x01' * (64 << 20)",
    );
    let grown = server.session(key, &id)["memory_bytes"].as_u64().unwrap();
    assert!(grown >= fresh + (64 << 20), "{fresh} -> {grown}");
    assert!(grown < fresh + (80 << 20), "{fresh} -> {grown}");

    // A branch holds its share of the layer its parent's pages were written to.
    let (status, forked) = json_of(post(
        &server,
        key,
        &format!("/v1/sandboxes/{id}/fork"),
        json!({ "count": 1 }),
    ));
    assert_eq!(status, StatusCode::OK, "{forked}");
    let branch = forked["ids"][0].as_str().unwrap().to_string();
    let held = server.session(key, &branch)["memory_bytes"]
        .as_u64()
        .unwrap();
    assert!(held >= 64 << 20, "{held}");

    // Past the key's limit its sessions may not grow; bob's may; deleting makes room.
    let (status, body) = json_of(post(
        &server,
        key,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({ "code": "print(len(data))" }),
    ));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["kind"], "quota_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MiB of host memory"),
        "{body}"
    );
    let (status, _) = json_of(post(&server, key, "/v1/sandboxes", json!({})));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    create_session(&server, &server.bob, json!({}));
    for gone in [&branch, &id] {
        let response = client()
            .delete(server.url(&format!("/v1/sandboxes/{gone}")))
            .bearer_auth(key)
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let id = create_session(&server, key, json!({}));
    exec_ok(
        &server,
        key,
        &format!("/v1/sandboxes/{id}/exec"),
        "print(1)",
    );
}

#[test]
fn commands_run_in_a_sessions_filesystem_and_bash_code_runs_over_http() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    let key = &server.alice;
    let id = create_session(&server, key, json!({}));
    exec_ok(
        &server,
        key,
        &format!("/v1/sandboxes/{id}/exec"),
        "open('/tmp/note.txt', 'w').write('from python\\n')",
    );
    let commands = format!("/v1/sandboxes/{id}/commands");
    let (status, ran) = json_of(post(
        &server,
        key,
        &commands,
        json!({"cmd": "cat note.txt; echo \"$GREETING\"; wc -c; exit 2", "cwd": "/tmp",
               "env": {"GREETING": "hello"}, "stdin": "four"}),
    ));
    assert_eq!(status, StatusCode::OK, "{ran}");
    assert_eq!(ran["stdout"], "from python\nhello\n4\n", "{ran}");
    assert_eq!(ran["exit_code"], 2);
    let (status, bad) = json_of(post(&server, key, &commands, json!({"command": "ls"})));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");

    let (status, bash) = json_of(post(
        &server,
        key,
        "/v1/exec",
        json!({"code": "seq 1 3 | paste -sd+ | tr + \" \" | wc -w", "language": "bash"}),
    ));
    assert_eq!(status, StatusCode::OK, "{bash}");
    assert_eq!(bash["stdout"], "3\n", "{bash}");
    // A fork bomb is stopped at the process limit...
    let (status, bomb) = json_of(post(
        &server,
        key,
        "/v1/exec",
        json!({"code": ":(){ :|:; };:", "language": "bash"}),
    ));
    assert_eq!(status, StatusCode::OK, "{bomb}");
    assert_eq!(bomb["error"]["kind"], "process_limit", "{bomb}");
    assert_eq!(bomb["exit_code"], 71);
    // ...and one in the background ends with the request: its shell returns at once, and
    // what it left behind goes with the sandbox.
    let (status, background) = json_of(post(
        &server,
        key,
        "/v1/exec",
        json!({"code": ":(){ :|:& };:", "language": "bash"}),
    ));
    assert_eq!(status, StatusCode::OK, "{background}");
    assert_eq!(
        exec_ok(&server, key, "/v1/exec", "print('still fine')")["stdout"],
        "still fine\n"
    );
}

#[test]
fn a_sessions_background_job_runs_on_between_requests() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    let key = &server.alice;
    let id = create_session(&server, key, json!({}));
    let (status, body) = json_of(post(
        &server,
        key,
        &format!("/v1/sandboxes/{id}/commands"),
        json!({ "cmd": "(sleep 0.3; seq 1 1000 | tail -1 > /tmp/job.tmp; mv /tmp/job.tmp /tmp/job.out) > /dev/null 2>&1 &" }),
    ));
    assert_eq!(status, StatusCode::OK, "{body}");
    // No request runs from here on: the job finishes on its own, as on any machine.
    let started = std::time::Instant::now();
    let output = loop {
        let got = client()
            .get(server.url(&format!("/v1/sandboxes/{id}/files/tmp/job.out")))
            .bearer_auth(key)
            .send()
            .unwrap();
        if got.status() == StatusCode::OK {
            break got.bytes().unwrap();
        }
        assert_eq!(got.status(), StatusCode::NOT_FOUND);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the job never finished between requests"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(&output[..], b"1000\n");
}

#[test]
fn a_sessions_background_process_outlives_its_request_and_forks_with_it() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    let key = &server.alice;
    let id = create_session(&server, key, json!({}));
    let commands = format!("/v1/sandboxes/{id}/commands");
    let run = |cmd: &str| {
        let (status, body) = json_of(post(&server, key, &commands, json!({ "cmd": cmd })));
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    };
    let put = client()
        .put(server.url(&format!("/v1/sandboxes/{id}/files/tmp/counter.py")))
        .bearer_auth(key)
        .body(common::COUNTER)
        .send()
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    let started = run("python3 /tmp/counter.py > /dev/null 2>&1 & echo $!");
    let pid = started["stdout"].as_str().unwrap().trim().to_string();
    // Still there at the next request.
    let listed = run(&format!("ps -o stat= -p {pid}"));
    assert!(
        !listed["stdout"].as_str().unwrap().trim().is_empty(),
        "{listed}"
    );
    // The helper's answer: its count, its pid, and its parent, which is the session's first
    // process (the agent adopted it), whose pid every session and branch has its own of.
    let ask = |session: &str| {
        let path = format!("/v1/sandboxes/{session}/exec");
        let code = format!("{}\nimport os\nprint(os.getpid())", common::ASK);
        let out = exec_ok(&server, key, &path, &code)["stdout"]
            .as_str()
            .unwrap()
            .to_string();
        let (answer, agent) = out.trim_end().rsplit_once('\n').unwrap();
        let (rest, parent) = answer.rsplit_once(' ').unwrap();
        assert_eq!(parent, agent, "the helper's parent is the agent: {out}");
        rest.to_string()
    };
    assert_eq!(ask(&id), format!("1 {pid}"));
    assert_eq!(ask(&id), format!("2 {pid}"));

    // Each branch gets the helper as it was, with its count, and counts on its own.
    let branches = fork_session(&server, key, &id, 2);
    assert_eq!(ask(&branches[0]), format!("3 {pid}"));
    assert_eq!(ask(&branches[0]), format!("4 {pid}"));
    assert_eq!(ask(&branches[1]), format!("3 {pid}"));
    assert_eq!(ask(&id), format!("3 {pid}"));
}
