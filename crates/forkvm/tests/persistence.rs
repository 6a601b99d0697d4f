//! Sessions that outlive the server, against a real `forkvm serve`: paused to disk,
//! resumed byte for byte after `kill -9` and a restart, pauses cut short at random
//! points, and idle sessions paused on their own.

#[path = "support/server.rs"]
mod server;

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use server::{Server, client, private_cache};

/// `POST /v1/sandboxes/{id}/pause` as alice: the status and the session.
fn pause(server: &Server, id: &str) -> (StatusCode, Value) {
    server.post(
        &server.alice,
        &format!("/v1/sandboxes/{id}/pause"),
        json!({}),
    )
}

fn create(server: &Server) -> String {
    let (status, body) = server.post(&server.alice, "/v1/sandboxes", json!({}));
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_str().unwrap().to_string()
}

/// Runs `code` in session `id`: its stdout (the run must succeed).
fn run(server: &Server, id: &str, code: &str) -> String {
    let (status, body) = server.post(
        &server.alice,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({ "code": code }),
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["exit_code"], 0, "{body}");
    body["stdout"].as_str().unwrap().to_string()
}

/// Kills the server with SIGKILL (no chance to pause anything) and waits for it.
fn kill(server: Server) {
    drop(server);
}

#[test]
fn a_paused_session_survives_sigkill_and_restart() {
    let cache = private_cache("survives");
    let keys = cache.join("keys.json");
    let flags = ["--pause-idle-after", "0"];
    let server = Server::start_in(&cache, &keys, &flags);
    let id = create(&server);
    run(
        &server,
        &id,
        "x = 41\nimport numpy as np\na = np.arange(1000)\nopen('/root/notes.txt', 'w').write('kept')",
    );
    let (status, info) = pause(&server, &id);
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["state"], "paused");
    assert!(info["stored_bytes"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(info["memory_bytes"], 0);
    // Another session left running when the server dies: lost, and counted.
    let running = create(&server);
    run(&server, &running, "y = 1");
    kill(server);

    let server = Server::start_in(&cache, &keys, &flags);
    assert_eq!(server.gauge("forkvm_sessions_lost_total"), 1);
    assert_eq!(server.gauge("forkvm_sessions_paused"), 1);
    assert_eq!(server.session(&server.alice, &id)["state"], "paused");
    let gone = client()
        .get(server.url(&format!("/v1/sandboxes/{running}")))
        .bearer_auth(&server.alice)
        .send()
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    // Not another key's.
    assert_eq!(
        server.session(&server.bob, &id)["error"]["kind"],
        "not_found"
    );
    // Any request resumes it, as it was.
    assert_eq!(run(&server, &id, "print(x + 1, a.sum())"), "42 499500\n");
    assert_eq!(server.session(&server.alice, &id)["state"], "running");
    let file = client()
        .get(server.url(&format!("/v1/sandboxes/{id}/files/root/notes.txt")))
        .bearer_auth(&server.alice)
        .send()
        .unwrap();
    assert_eq!(file.text().unwrap(), "kept");
    // A fork of the resumed session starts from its state.
    let (status, forked) = server.post(
        &server.alice,
        &format!("/v1/sandboxes/{id}/fork"),
        json!({}),
    );
    assert_eq!(status, StatusCode::OK, "{forked}");
    let branch = forked["ids"][0].as_str().unwrap();
    assert_eq!(run(&server, branch, "x += 1\nprint(x)"), "42\n");
    assert_eq!(run(&server, &id, "print(x)"), "41\n");
    // Paused again, then deleted: its files go with it.
    let (status, _) = pause(&server, &id);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored_pauses(&cache), 1);
    let deleted = client()
        .delete(server.url(&format!("/v1/sandboxes/{id}")))
        .bearer_auth(&server.alice)
        .send()
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    wait_for(|| stored_pauses(&cache) == 0);
    // The template the paused sessions were layered over cannot be rebuilt under them.
    let (status, _) = pause(&server, branch);
    assert_eq!(status, StatusCode::OK);
    let rebuild = std::process::Command::new(env!("CARGO_BIN_EXE_forkvm"))
        .args(["template", "rm", "python"])
        .env("FORKVM_CACHE_DIR", &cache)
        .output()
        .unwrap();
    assert!(!rebuild.status.success());
    let message = String::from_utf8_lossy(&rebuild.stderr);
    assert!(message.contains("paused session"), "{message}");
    // The CLI makes the same calls.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_forkvm"))
            .arg("sessions")
            .args(["--url", &server.base, "--key", &server.alice])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(cli(&["resume", branch]).contains("running"));
    assert!(cli(&["pause", branch]).contains("paused"));
    assert!(cli(&["list"]).contains(&format!("{branch}  paused")));
    // A server stopped cleanly pauses what runs, and the next one serves it.
    run(&server, branch, "z = 7");
    assert!(server.terminate().success());
    let server = Server::start_in(&cache, &keys, &flags);
    assert_eq!(server.gauge("forkvm_sessions_lost_total"), 0);
    assert_eq!(run(&server, branch, "print(x, z)"), "42 7\n");
}

/// Complete pauses stored in `cache`.
fn stored_pauses(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("sessions"))
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            !name.starts_with('.') && name != "running"
        })
        .count()
}

fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A small deterministic generator (the kill points need no more).
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn a_pause_cut_short_by_sigkill_never_resumes_wrong() {
    let cache = private_cache("cut-short");
    let keys = cache.join("keys.json");
    let flags = ["--pause-idle-after", "0"];
    // 24 MiB of random data makes a pause long enough to cut at many points.
    let fill = "import os, hashlib\nbig = os.urandom(24 << 20)\nx = 5\n\
                print(hashlib.sha256(big).hexdigest())";
    let check = "import hashlib\nprint(hashlib.sha256(big).hexdigest())";
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    // How long one pause takes here, to spread the kills over it.
    let span = {
        let server = Server::start_in(&cache, &keys, &flags);
        let id = create(&server);
        run(&server, &id, fill);
        let started = Instant::now();
        let (status, _) = pause(&server, &id);
        assert_eq!(status, StatusCode::OK);
        started.elapsed()
    };
    let (mut committed, mut lost) = (0, 0);
    for round in 0..20 {
        let server = Server::start_in(&cache, &keys, &flags);
        // Sessions from earlier rounds: gone, so each round's count is its own.
        for old in list(&server) {
            client()
                .delete(server.url(&format!("/v1/sandboxes/{old}")))
                .bearer_auth(&server.alice)
                .send()
                .unwrap();
        }
        let id = create(&server);
        let digest = run(&server, &id, fill);
        let delay = span.mul_f64((next_random(&mut seed) % 1200) as f64 / 1000.0);
        let pid = server.pid();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: kill with our own child's pid and a standard signal.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        let url = server.url(&format!("/v1/sandboxes/{id}/pause"));
        let _ = client().post(url).bearer_auth(&server.alice).send();
        killer.join().unwrap();
        kill(server);

        let server = Server::start_in(&cache, &keys, &flags);
        assert!(
            std::fs::read_dir(cache.join("sessions"))
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with(".writing-")),
            "round {round}: an unfinished pause was left behind"
        );
        if list(&server).contains(&id) {
            // The pause completed before the kill: the session is exactly as it was.
            assert_eq!(run(&server, &id, check), digest, "round {round}");
            assert_eq!(run(&server, &id, "print(x)"), "5\n", "round {round}");
            committed += 1;
        } else {
            // It did not: the session was running, so it is lost, and said so.
            assert_eq!(
                server.gauge("forkvm_sessions_lost_total"),
                1,
                "round {round}"
            );
            lost += 1;
        }
        kill(server);
    }
    eprintln!("20 pauses killed at random points: {committed} completed, {lost} lost");
}

/// The ids of alice's sessions.
fn list(server: &Server) -> Vec<String> {
    let body: Value = client()
        .get(server.url("/v1/sandboxes"))
        .bearer_auth(&server.alice)
        .send()
        .unwrap()
        .json()
        .unwrap();
    body["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

/// `MemAvailable` in bytes.
fn mem_available() -> u64 {
    server::kib_field(
        &std::fs::read_to_string("/proc/meminfo").unwrap(),
        "MemAvailable",
    )
}

#[test]
fn idle_sessions_pause_on_their_own_and_resume_on_demand() {
    const SESSIONS: usize = 200;
    let cache = private_cache("idle");
    let keys = cache.join("keys.json");
    let server = Server::start_in(
        &cache,
        &keys,
        &[
            "--pause-idle-after",
            "2",
            "--max-sandboxes",
            "256",
            "--session-ttl",
            "3600",
        ],
    );
    let before = mem_available();
    let ids: Vec<String> = (0..SESSIONS)
        .map(|i| {
            let id = create(&server);
            run(
                &server,
                &id,
                &format!("n = {i}\nblock = bytearray(256 << 10)"),
            );
            id
        })
        .collect();
    let running = mem_available();
    let since = Instant::now();
    wait_for_long(|| server.gauge("forkvm_sessions_paused") == SESSIONS as u64);
    let pausing_took = since.elapsed();
    // Their VMs are torn down by their workers after the pauses are stored.
    let held = before.saturating_sub(running);
    let freed_enough = || mem_available().saturating_sub(running) >= held / 2;
    wait_for_long(freed_enough);
    let freed = mem_available().saturating_sub(running);
    eprintln!(
        "{SESSIONS} sessions held {} MiB running; paused in {pausing_took:?}, which freed {} MiB",
        held >> 20,
        freed >> 20
    );
    for (i, id) in ids.iter().enumerate().step_by(40) {
        assert_eq!(
            run(&server, id, "print(n, len(block))"),
            format!("{i} 262144\n")
        );
    }
}

fn wait_for_long(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn checkpoints_bring_running_sessions_back_after_a_crash() {
    let cache = private_cache("checkpoints");
    let keys = cache.join("keys.json");
    let flags = ["--pause-idle-after", "0", "--checkpoint-every", "1"];
    let server = Server::start_in(&cache, &keys, &flags);
    let id = create(&server);
    run(&server, &id, "x = 1");
    wait_for(|| server.gauge("forkvm_sessions_checkpointed_total") >= 1);
    // Still running: the checkpoint did not stop it, and its later work is checkpointed too.
    assert_eq!(server.session(&server.alice, &id)["state"], "running");
    let before = server.gauge("forkvm_sessions_checkpointed_total");
    run(&server, &id, "x += 1");
    wait_for(|| server.gauge("forkvm_sessions_checkpointed_total") > before);
    kill(server);

    let server = Server::start_in(&cache, &keys, &flags);
    assert_eq!(server.gauge("forkvm_sessions_lost_total"), 0);
    assert_eq!(run(&server, &id, "print(x)"), "2\n");
}
