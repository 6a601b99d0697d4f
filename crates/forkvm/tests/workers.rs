//! The jailed workers of a real `forkvm serve`: what confines them, and what happens when
//! one dies.

#[path = "support/server.rs"]
mod server;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use forkvm_protocol::exec::ExecLimits;
use forkvm_protocol::worker::{Call, Hello};
use forkvm_worker::{Connection, WorkerError};
use reqwest::StatusCode;
use serde_json::{Value, json};
use server::{Server, client};

/// PIDs of `parent`'s children that run `forkvm worker`.
fn workers_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent PID is the second field after the parenthesised command name.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == parent && cmdline == b"forkvm\0worker\0" {
            found.push(pid);
        }
    }
    found.sort();
    found
}

/// Waits until `parent` has `count` workers, and returns them.
fn wait_for_workers(parent: u32, count: usize, except: &[u32]) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let workers: Vec<u32> = workers_of(parent)
            .into_iter()
            .filter(|p| !except.contains(p))
            .collect();
        if workers.len() >= count {
            return workers;
        }
        assert!(
            Instant::now() < deadline,
            "workers of {parent}: {workers:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} for {pid}"))
        .trim()
        .to_string()
}

fn namespace(pid: u32, kind: &str) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

fn exec(server: &Server, key: &str, path: &str, code: &str) -> (StatusCode, Value) {
    let response = client()
        .post(server.url(path))
        .bearer_auth(key)
        .json(&json!({ "code": code }))
        .send()
        .unwrap();
    (response.status(), response.json().unwrap())
}

#[test]
fn workers_run_jailed_filtered_and_without_privileges() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&["--workers", "2", "--worker-memory-mb", "3000"]);
    let (status, body) = exec(&server, &server.alice, "/v1/exec", "print(6 * 7)");
    assert_eq!(
        (status, body["stdout"].as_str()),
        (StatusCode::OK, Some("42\n"))
    );

    let workers = wait_for_workers(server.pid(), 2, &[]);
    assert_eq!(workers.len(), 2, "{workers:?}");
    for &pid in &workers {
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            assert!(
                status.contains("\nSeccomp:\t2\n"),
                "a thread of {pid}: {status}"
            );
        }
        assert_eq!(status_field(pid, "Seccomp"), "2", "worker {pid}");
        let uid = status_field(pid, "Uid");
        assert!(
            uid.split_whitespace().all(|id| id == "65534"),
            "worker {pid}: uid {uid}"
        );
        assert_eq!(status_field(pid, "NoNewPrivs"), "1", "worker {pid}");
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        assert_eq!(status_field(pid, "CapBnd"), "0000000000000000");
        for kind in ["mnt", "net", "pid", "ipc", "uts"] {
            assert_ne!(
                namespace(pid, kind),
                namespace(server.pid(), kind),
                "worker {pid} shares the server's {kind} namespace"
            );
        }
        let root = format!("/proc/{pid}/root");
        assert!(!Path::new(&format!("{root}/etc/passwd")).exists());
        assert!(!Path::new(&format!("{root}/usr/bin")).exists());
        assert!(!Path::new(&format!("{root}/proc/sys")).exists());
        assert!(Path::new(&format!("{root}/dev/kvm")).exists());
        // The root holds nothing but /dev/kvm and the template's own files: the
        // template's directory, the image, the sealing key.
        let top = |path: &Path| {
            path.components()
                .nth(1)
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
        };
        let allowed = [
            Some("dev".to_string()),
            top(server::cache_dir()),
            top(&forkvm_testkit::default_image()),
        ];
        for entry in std::fs::read_dir(&root).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(allowed.contains(&Some(name.clone())), "{root}/{name}");
        }
        let cache = format!("{root}{}", server::cache_dir().display());
        let mut cached: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.ends_with(".img") && !name.ends_with(".img.verified"))
            .collect();
        cached.sort();
        assert_eq!(cached, ["seal.key", "templates"], "{cache}");
        assert!(std::fs::write(format!("{cache}/seal.key"), b"x").is_err());

        // Its cgroup, where the host has one to give (see docs/operations.md).
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        if cgroups.contains("forkvm-worker-") {
            let memory_line = cgroups.lines().find(|l| l.contains("memory"));
            if let Some(line) = memory_line {
                assert!(line.contains("forkvm-worker-"), "{cgroups}");
            }
        } else {
            eprintln!("note: this host gives workers no cgroup; its limits were not checked");
        }
    }
}

#[test]
fn a_killed_worker_loses_only_its_own_sandboxes() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&["--workers", "2"]);
    let key = server.alice.clone();
    // Sessions go to the workers in turn: one each.
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let response = client()
            .post(server.url("/v1/sandboxes"))
            .bearer_auth(&key)
            .json(&json!({}))
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().unwrap();
        sessions.push(body["id"].as_str().unwrap().to_string());
    }
    for id in &sessions {
        let (status, _) = exec(&server, &key, &format!("/v1/sandboxes/{id}/exec"), "x = 1");
        assert_eq!(status, StatusCode::OK);
    }
    let workers = wait_for_workers(server.pid(), 2, &[]);

    // Both sessions run something slow; one worker dies under it.
    let runs: Vec<_> = sessions
        .iter()
        .map(|id| {
            let url = server.url(&format!("/v1/sandboxes/{id}/exec"));
            let key = key.clone();
            thread::spawn(move || {
                let response = client()
                    .post(url)
                    .bearer_auth(key)
                    .json(&json!({ "code": "import time\ntime.sleep(3)\nprint(x)" }))
                    .send()
                    .unwrap();
                let status = response.status();
                (status, response.json::<Value>().unwrap())
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(1500));
    let victim = workers[0];
    // SAFETY: SIGKILL to a process of this test's own server.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let outcomes: Vec<(StatusCode, Value)> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(s, _)| *s != StatusCode::OK)
        .collect();
    let succeeded: Vec<_> = outcomes
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .collect();
    assert_eq!(failed.len(), 1, "{outcomes:?}");
    assert_eq!(succeeded.len(), 1, "{outcomes:?}");
    let (status, body) = failed[0];
    assert_eq!(*status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"]["kind"], "internal", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("worker"), "{message}");
    assert_eq!(succeeded[0].1["stdout"], "1\n");

    // The lost session says so; the other keeps its state.
    let lost: Vec<bool> = sessions
        .iter()
        .map(|id| !server.session(&key, id)["alive"].as_bool().unwrap())
        .collect();
    assert_eq!(lost.iter().filter(|l| **l).count(), 1, "{lost:?}");

    // The dead worker is replaced, and the next 100 requests all succeed.
    let replaced = wait_for_workers(server.pid(), 2, &[victim]);
    assert!(!replaced.contains(&victim));
    for i in 0..100 {
        let (status, body) = exec(&server, &key, "/v1/exec", &format!("print({i})"));
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
        assert_eq!(body["stdout"], format!("{i}\n"));
    }
    let metrics = server.metrics();
    assert!(
        metrics.contains("forkvm_worker_restarts_total 1"),
        "{metrics}"
    );
}

#[test]
fn a_call_outside_the_allowlist_kills_the_worker() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let spawned = forkvm_worker::spawn::spawn(Path::new(env!("CARGO_BIN_EXE_forkvm"))).unwrap();
    let pid = spawned.pid;
    let hello = Hello {
        template: "python".into(),
        cache_dir: server::cache_dir().to_string_lossy().into_owned(),
        pool_depth: 1,
        pool_threads: 1,
        maxima: ExecLimits::maxima(),
    };
    let connection = Connection::open(spawned, &hello, Duration::from_secs(120)).unwrap();
    // It serves first...
    let request = forkvm_protocol::exec::ExecRequest::python("print('alive')");
    let call = Call::Exec {
        request,
        tenant: None,
        stream: false,
    };
    match connection
        .call(call, None, Duration::from_secs(60))
        .unwrap()
    {
        forkvm_protocol::worker::Answer::Executed { result, .. } => {
            assert_eq!(result.stdout, b"alive\n")
        }
        other => panic!("{other:?}"),
    }
    // ...then makes a call the filter refuses, and dies of it.
    let error = connection
        .call(Call::ProbeFilter, None, Duration::from_secs(30))
        .unwrap_err();
    assert!(matches!(error, WorkerError::Gone(_)), "{error}");
    let mut status = 0;
    // SAFETY: reaping our own child.
    let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(reaped, pid);
    assert!(libc::WIFSIGNALED(status), "status {status:#x}");
    assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
}

/// The worker's own memory: anonymous pages (guest pages it copied or wrote), not the
/// template's and image's file pages, which the page cache holds once for everyone.
fn anonymous_bytes(pid: u32) -> u64 {
    status_field(pid, "RssAnon")
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap()
        << 10
}

#[test]
fn what_sessions_can_make_a_worker_hold_is_bounded_by_their_limits() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&["--workers", "1"]);
    let key = &server.alice;
    let worker = wait_for_workers(server.pid(), 1, &[])[0];
    let before = anonymous_bytes(worker);
    let post = |path: &str, body: Value| server.post(key, path, body);
    for _ in 0..3 {
        let (status, session) = post("/v1/sandboxes", json!({}));
        assert_eq!(status, StatusCode::CREATED, "{session}");
        let exec = format!("/v1/sandboxes/{}/exec", session["id"].as_str().unwrap());
        // Up to the limit is fine; past it is a MemoryError; writing where nothing is
        // mapped is a fault, however much memory the loop would have touched.
        let (_, body) = post(
            &exec,
            json!({ "code": "kept = b'\\x01' * (48 << 20)", "memory_mb": 64 }),
        );
        assert_eq!(body["exit_code"], 0, "{body}");
        let (_, body) = post(
            &exec,
            json!({ "code": "more = b'\\x01' * (64 << 20)", "memory_mb": 64 }),
        );
        assert_eq!(body["error"]["kind"], "memory_limit", "{body}");
        let (_, body) = post(
            &exec,
            json!({
                "code": "import ctypes\nfor a in range(0x8000000, 0x30000000, 4096): ctypes.memset(a, 1, 1)",
                "memory_mb": 64,
            }),
        );
        assert_eq!(body["error"]["kind"], "fault", "{body}");
    }
    // Three sessions kept 48 MiB each; the worker holds that plus a bounded overhead per
    // session (its interpreter's own pages, page tables, the pages of the failed
    // allocation kept for reuse), nowhere near the 2.6 GiB the memset loops would touch.
    let grown = anonymous_bytes(worker).saturating_sub(before);
    assert!(
        grown < 3 * (64 << 20) + (128 << 20),
        "worker grew {} MiB",
        grown >> 20
    );
}
