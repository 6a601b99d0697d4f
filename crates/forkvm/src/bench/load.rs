//! `forkvm bench load`: many keys drive a real `forkvm serve` with the mix agents and
//! attackers send (plain executions, numpy, sessions with files and forks, streams,
//! batches, busy loops that time out, output and memory bombs), every answer is checked,
//! and the report gives throughput, latency by kind and the server's memory over time.
//!
//! By default it starts its own server (its own keys, the usual template cache) on a free
//! loopback port; `--url` and `--key` drive one already running instead.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::blocking::{Client, Response};
use serde::Serialize;
use serde_json::{Value, json};

use super::Latency;

/// What `forkvm bench load` was asked.
pub struct LoadOptions {
    pub url: Option<String>,
    pub keys: Vec<String>,
    pub key_count: usize,
    pub clients: usize,
    pub duration: Duration,
}

/// The kinds of operation in the mix, with their weights (out of 100).
const MIX: &[(Kind, u32)] = &[
    (Kind::Exec, 30),
    (Kind::Numpy, 8),
    (Kind::Session, 14),
    (Kind::Stream, 14),
    (Kind::Batch, 10),
    (Kind::Timeout, 6),
    (Kind::OutputBomb, 10),
    (Kind::MemoryBomb, 8),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Exec,
    Numpy,
    Session,
    Stream,
    Batch,
    Timeout,
    OutputBomb,
    MemoryBomb,
}

/// How one operation went wrong.
enum Failure {
    /// An answer that is not the right one for its request.
    Wrong(String),
    /// A 5xx.
    Server(u16, String),
    /// 429: the key's rate or quota (not a failure of the server; retried later).
    Throttled,
    /// The connection failed.
    Transport(String),
}

/// Everything `forkvm bench load` reports.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub duration_s: f64,
    pub clients: usize,
    pub keys: usize,
    pub operations: usize,
    pub operations_per_s: f64,
    pub wrong_answers: usize,
    pub server_errors: usize,
    pub transport_errors: usize,
    pub throttled: usize,
    /// The floor: a plain execution on the idle server, one at a time (after warm-up).
    pub idle_exec: Latency,
    /// Latency of whole operations by kind (a session operation is its six requests).
    pub latency: BTreeMap<String, Latency>,
    /// The server's resident memory: after warm-up, its peak and at the end, in MiB.
    pub server_rss_mib: RssReport,
    /// The first failures, to see what went wrong.
    pub failures: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RssReport {
    pub after_warmup: f64,
    pub peak: f64,
    pub end: f64,
    /// Samples each tenth of the run.
    pub by_tenth: Vec<f64>,
}

/// A tiny deterministic generator (xorshift): each client's mix is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn kind(&mut self) -> Kind {
        let total: u32 = MIX.iter().map(|(_, w)| w).sum();
        let mut pick = self.below(total as u64) as u32;
        for (kind, weight) in MIX {
            if pick < *weight {
                return *kind;
            }
            pick -= weight;
        }
        Kind::Exec
    }
}

/// A client's view of the server.
struct Target {
    http: Client,
    base: String,
    key: String,
}

impl Target {
    fn post(&self, path: &str, body: Value) -> Result<Response, Failure> {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .map_err(|e| Failure::Transport(e.to_string()))
    }

    /// POSTs `body` and returns the JSON of a 2xx answer.
    fn call(&self, path: &str, body: Value) -> Result<Value, Failure> {
        let response = self.post(path, body)?;
        json_of(response)
    }
}

fn json_of(response: Response) -> Result<Value, Failure> {
    let status = response.status().as_u16();
    let text = response
        .text()
        .map_err(|e| Failure::Transport(e.to_string()))?;
    match status {
        200..=299 if text.is_empty() => Ok(Value::Null),
        200..=299 => serde_json::from_str(&text)
            .map_err(|e| Failure::Wrong(format!("not JSON ({e}): {text:.200}"))),
        429 => Err(Failure::Throttled),
        500.. => Err(Failure::Server(status, text)),
        _ => Err(Failure::Wrong(format!("status {status}: {text}"))),
    }
}

fn expect(what: &str, got: &Value, want: &str) -> Result<(), Failure> {
    if got.as_str() == Some(want) {
        Ok(())
    } else {
        Err(Failure::Wrong(format!(
            "{what}: wanted {want:?}, got {got}"
        )))
    }
}

fn expect_kind(reply: &Value, kinds: &[&str]) -> Result<(), Failure> {
    let kind = reply["error"]["kind"].as_str().unwrap_or("");
    if kinds.contains(&kind) {
        Ok(())
    } else {
        Err(Failure::Wrong(format!(
            "wanted an error of kind {kinds:?}, got {}",
            reply["error"]
        )))
    }
}

/// Runs one operation of `kind` with numbers from `rng`, checking every answer.
fn operate(target: &Target, kind: Kind, rng: &mut Rng) -> Result<(), Failure> {
    let (a, b) = (rng.below(1 << 30), rng.below(1 << 30));
    match kind {
        Kind::Exec => {
            let reply = target.call("/v1/exec", json!({ "code": format!("print({a} + {b})") }))?;
            expect("stdout", &reply["stdout"], &format!("{}\n", a + b))
        }
        Kind::Numpy => {
            let n = 1 + a % 10_000;
            let reply = target.call(
                "/v1/exec",
                json!({ "code": format!("import numpy as np\nprint(int(np.arange({n}).sum()))") }),
            )?;
            expect(
                "stdout",
                &reply["stdout"],
                &format!("{}\n", n * (n - 1) / 2),
            )
        }
        Kind::Session => session(target, a, b),
        Kind::Stream => stream(target, a % 1000),
        Kind::Batch => {
            let executions: Vec<Value> = (0..4)
                .map(|i| json!({ "code": format!("print({a} * {i})") }))
                .collect();
            let reply = target.call("/v1/exec/batch", json!({ "executions": executions }))?;
            for i in 0..4 {
                expect(
                    "batch stdout",
                    &reply["results"][i as usize]["stdout"],
                    &format!("{}\n", a * i),
                )?;
            }
            Ok(())
        }
        Kind::Timeout => {
            let reply = target.call(
                "/v1/exec",
                json!({ "code": "while True: pass", "timeout_seconds": 1 }),
            )?;
            expect_kind(&reply, &["timeout", "cpu_time_limit"])
        }
        Kind::OutputBomb => {
            let reply = target.call(
                "/v1/exec",
                json!({
                    "code": "import sys\nwhile True: sys.stdout.write('\\x01' * 65536)",
                    "output_limit_bytes": 65536,
                }),
            )?;
            expect_kind(&reply, &["output_limit"])?;
            let len = reply["stdout"].as_str().map_or(0, str::len);
            if len > 65536 {
                return Err(Failure::Wrong(format!(
                    "{len} bytes of output past a 64 KiB limit"
                )));
            }
            Ok(())
        }
        Kind::MemoryBomb => {
            let reply = target.call(
                "/v1/exec",
                json!({
                    "code": "chunks = []\nwhile True: chunks.append(bytearray(16 << 20))",
                    "memory_mb": 128,
                }),
            )?;
            expect_kind(&reply, &["memory_limit"])
        }
    }
}

/// A session's life: state kept between requests, a file written and read back, a fork
/// that carries both, and both deleted.
fn session(target: &Target, a: u64, b: u64) -> Result<(), Failure> {
    let info = target.call("/v1/sandboxes", json!({}))?;
    let Some(id) = info["id"].as_str().map(str::to_string) else {
        return Err(Failure::Wrong(format!("no session id in {info}")));
    };
    let outcome = (|| {
        let exec = format!("/v1/sandboxes/{id}/exec");
        target.call(&exec, json!({ "code": format!("x = {a}") }))?;
        let reply = target.call(&exec, json!({ "code": format!("print(x + {b})") }))?;
        expect("session stdout", &reply["stdout"], &format!("{}\n", a + b))?;
        let content = format!("{a}-{b}");
        let file = format!("{}/v1/sandboxes/{id}/files/tmp/f.txt", target.base);
        let put = target
            .http
            .put(&file)
            .bearer_auth(&target.key)
            .body(content.clone())
            .send()
            .map_err(|e| Failure::Transport(e.to_string()))?;
        json_of(put)?;
        let got = target
            .http
            .get(&file)
            .bearer_auth(&target.key)
            .send()
            .map_err(|e| Failure::Transport(e.to_string()))?;
        if got.status().as_u16() >= 500 {
            return Err(Failure::Server(got.status().as_u16(), String::new()));
        }
        let got = got.text().map_err(|e| Failure::Transport(e.to_string()))?;
        if got != content {
            return Err(Failure::Wrong(format!(
                "file read back {got:?}, wrote {content:?}"
            )));
        }
        let fork = target.call(&format!("/v1/sandboxes/{id}/fork"), json!({ "count": 1 }))?;
        let Some(branch) = fork["ids"][0].as_str().map(str::to_string) else {
            return Err(Failure::Wrong(format!("no branch id in {fork}")));
        };
        let reply = target.call(
            &format!("/v1/sandboxes/{branch}/exec"),
            json!({ "code": "print(x, open('/tmp/f.txt').read())" }),
        );
        delete(target, &branch);
        let reply = reply?;
        expect(
            "branch stdout",
            &reply["stdout"],
            &format!("{a} {content}\n"),
        )
    })();
    delete(target, &id);
    outcome
}

fn delete(target: &Target, id: &str) {
    let _ = target
        .http
        .delete(format!("{}/v1/sandboxes/{id}", target.base))
        .bearer_auth(&target.key)
        .send();
}

/// A streamed execution: its output events, in order, then its result.
fn stream(target: &Target, n: u64) -> Result<(), Failure> {
    let response = target.post(
        "/v1/exec",
        json!({ "code": format!("for i in range(5): print({n} + i, flush=True)"), "stream": true }),
    )?;
    let status = response.status().as_u16();
    if status != 200 {
        return json_of(response).map(|_| ());
    }
    let mut stdout = String::new();
    let mut result = None;
    let mut event = String::new();
    for line in BufReader::new(response).lines() {
        let line = line.map_err(|e| Failure::Transport(e.to_string()))?;
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let value: Value =
                serde_json::from_str(data).map_err(|e| Failure::Wrong(e.to_string()))?;
            match event.as_str() {
                "stdout" => stdout.push_str(value.as_str().unwrap_or("")),
                "result" => result = Some(value),
                "error" => return Err(Failure::Wrong(format!("error event {value}"))),
                _ => {}
            }
        }
    }
    let want: String = (0..5).map(|i| format!("{}\n", n + i)).collect();
    if stdout != want {
        return Err(Failure::Wrong(format!(
            "streamed {stdout:?}, wanted {want:?}"
        )));
    }
    let result = result.ok_or_else(|| Failure::Wrong("no result event".into()))?;
    expect("result stdout", &result["stdout"], &want)
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    latencies: BTreeMap<Kind, Vec<Duration>>,
    wrong: usize,
    server: usize,
    transport: usize,
    throttled: usize,
    /// The first failures, described.
    notes: Vec<String>,
}

impl Tally {
    fn count(&mut self, kind: Kind, took: Duration, outcome: Result<(), Failure>) {
        let (what, detail) = match outcome {
            Ok(()) => {
                self.latencies.entry(kind).or_default().push(took);
                return;
            }
            Err(Failure::Throttled) => {
                self.throttled += 1;
                return;
            }
            Err(Failure::Wrong(e)) => {
                self.wrong += 1;
                ("wrong".to_string(), e)
            }
            Err(Failure::Server(status, e)) => {
                self.server += 1;
                (status.to_string(), e)
            }
            Err(Failure::Transport(e)) => {
                self.transport += 1;
                ("transport".to_string(), e)
            }
        };
        if self.notes.len() < 20 {
            self.notes.push(format!("{kind:?}: {what}: {detail:.300}"));
        }
    }
}

/// A server this command started, stopped when dropped.
pub(super) struct OwnServer {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `forkvm serve` on a free loopback port with `count` new keys, its limits on
/// rate and sandboxes raised so that the load measures the server, not the limits.
pub(super) fn start_server(
    count: usize,
    flags: &[&str],
) -> Result<(OwnServer, String, Vec<String>)> {
    let dir = tempfile::tempdir()?;
    let keys_file: PathBuf = dir.path().join("keys.json");
    let keys = (0..count)
        .map(|i| forkvm_server::auth::add_key(&keys_file, &format!("load-{i}"), false))
        .collect::<Result<Vec<_>, _>>()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", "--listen", "127.0.0.1:0", "--keys"])
        .arg(&keys_file)
        .args(["--rate", "100000", "--burst", "100000"])
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting forkvm serve")?;
    let stdout = child.stdout.take().context("the server's stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let Some(base) = line.trim().strip_prefix("forkvm: listening on ") else {
        let _ = child.kill();
        bail!("the server did not start: {line:?}");
    };
    let base = base.to_string();
    Ok((OwnServer { child, _dir: dir }, base, keys))
}

/// The server's resident memory in MiB, from its metrics.
fn server_rss(http: &Client, base: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/v1/metrics"))
        .send()
        .ok()?
        .text()
        .ok()?;
    let bytes: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("forkvm_resident_bytes "))?
        .parse()
        .ok()?;
    Some(bytes / (1 << 20) as f64)
}

pub fn run(options: &LoadOptions) -> Result<LoadReport> {
    let (own, base, keys) = match &options.url {
        Some(url) => {
            if options.keys.is_empty() {
                bail!("--url needs at least one --key");
            }
            (
                None,
                url.trim_end_matches('/').to_string(),
                options.keys.clone(),
            )
        }
        None => {
            let (server, base, keys) = start_server(options.key_count.max(1), &[])?;
            (Some(server), base, keys)
        }
    };
    let http = Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    // Warm up: every kind once, on the first key.
    eprintln!("bench: warming up {base}…");
    let warm = Target {
        http: http.clone(),
        base: base.clone(),
        key: keys[0].clone(),
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (kind, _) in MIX {
        if let Err(Failure::Wrong(e) | Failure::Server(_, e) | Failure::Transport(e)) =
            operate(&warm, *kind, &mut rng)
        {
            bail!("warm-up {kind:?} failed: {e}");
        }
    }
    let mut idle = Vec::new();
    for _ in 0..30 {
        let begun = Instant::now();
        if operate(&warm, Kind::Exec, &mut rng).is_ok() {
            idle.push(begun.elapsed());
        }
    }
    if idle.is_empty() {
        bail!("no plain execution succeeded on the idle server");
    }
    let idle_exec = Latency::of(idle);
    let after_warmup = server_rss(&http, &base).unwrap_or(0.0);
    eprintln!(
        "bench: {} clients on {} keys for {:?}…",
        options.clients,
        keys.len(),
        options.duration
    );

    let stop = Arc::new(AtomicBool::new(false));
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let started = Instant::now();
    let clients: Vec<_> = (0..options.clients.max(1))
        .map(|c| {
            let target = Target {
                http: http.clone(),
                base: base.clone(),
                key: keys[c % keys.len()].clone(),
            };
            let (stop, tally) = (stop.clone(), tally.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (c as u64 + 1).wrapping_mul(0x9e37));
                while !stop.load(Ordering::Relaxed) {
                    let kind = rng.kind();
                    let begun = Instant::now();
                    let outcome = operate(&target, kind, &mut rng);
                    let took = begun.elapsed();
                    let throttled = matches!(outcome, Err(Failure::Throttled));
                    tally.lock().expect("tally lock").count(kind, took, outcome);
                    if throttled {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
        })
        .collect();
    // Sample the server's memory each tenth of the run.
    let mut by_tenth = Vec::new();
    let mut peak = after_warmup;
    for tenth in 1..=10 {
        let until = started + options.duration.mul_f64(tenth as f64 / 10.0);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(500).min(until - Instant::now()));
            if let Some(rss) = server_rss(&http, &base) {
                peak = peak.max(rss);
            }
        }
        by_tenth.push(server_rss(&http, &base).unwrap_or(0.0));
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.join();
    }
    let elapsed = started.elapsed();
    let end = server_rss(&http, &base).unwrap_or(0.0);
    drop(own);
    let Tally {
        latencies,
        wrong,
        server,
        transport,
        throttled,
        notes,
    } = std::mem::take(&mut *tally.lock().expect("tally lock"));
    let operations: usize = latencies.values().map(Vec::len).sum();
    Ok(LoadReport {
        duration_s: elapsed.as_secs_f64(),
        clients: options.clients.max(1),
        keys: keys.len(),
        operations,
        operations_per_s: operations as f64 / elapsed.as_secs_f64(),
        wrong_answers: wrong,
        server_errors: server,
        transport_errors: transport,
        throttled,
        idle_exec,
        latency: latencies
            .into_iter()
            .map(|(kind, samples)| {
                let name = serde_json::to_value(kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                (name, Latency::of(samples))
            })
            .collect(),
        server_rss_mib: RssReport {
            after_warmup,
            peak,
            end,
            by_tenth,
        },
        failures: notes,
    })
}

/// The report as a table.
pub fn table(report: &LoadReport) -> String {
    let mut out = format!(
        "load: {} operations in {:.0} s from {} clients on {} keys = {:.1} ops/s\n\
         wrong answers {}, 5xx {}, transport errors {}, throttled {}\n",
        report.operations,
        report.duration_s,
        report.clients,
        report.keys,
        report.operations_per_s,
        report.wrong_answers,
        report.server_errors,
        report.transport_errors,
        report.throttled
    );
    let floor = report.idle_exec.p50_us / 1e3;
    out.push_str(&format!(
        "floor: a plain execution on the idle server, p50 {floor:.1} ms\n"
    ));
    out.push_str(&format!(
        "{:<12} {:>7} {:>10} {:>10} {:>10} {:>12}\n",
        "kind", "count", "p50 ms", "p99 ms", "max ms", "p50 / floor"
    ));
    for (kind, latency) in &report.latency {
        out.push_str(&format!(
            "{:<12} {:>7} {:>10.1} {:>10.1} {:>10.1} {:>12.1}\n",
            kind,
            latency.count,
            latency.p50_us / 1e3,
            latency.p99_us / 1e3,
            latency.max_us / 1e3,
            latency.p50_us / 1e3 / floor
        ));
    }
    let rss = &report.server_rss_mib;
    out.push_str(&format!(
        "server RSS: {:.0} MiB after warm-up, {:.0} MiB peak, {:.0} MiB at the end; by tenth: {:?}\n",
        rss.after_warmup,
        rss.peak,
        rss.end,
        rss.by_tenth.iter().map(|m| m.round() as u64).collect::<Vec<_>>()
    ));
    for failure in &report.failures {
        out.push_str(&format!("  {failure}\n"));
    }
    out
}
