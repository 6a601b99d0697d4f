//! `forkvm bench keys`: cross-tenant load. `print(1+1)` through a real `forkvm serve` from
//! many keys in turn (each request from the next key, so no key's sandboxes are warm for
//! its next request), beside the same load from one key, in the same run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use reqwest::blocking::Client;
use serde::Serialize;
use serde_json::json;

use super::Latency;
use super::load::start_server;

#[derive(Debug, Serialize)]
pub struct KeysRun {
    pub keys: usize,
    pub requests: usize,
    pub per_second: f64,
    pub latency: Latency,
}

#[derive(Debug, Serialize)]
pub struct KeysReport {
    pub machine: super::Machine,
    pub clients: usize,
    pub seconds: f64,
    pub many_keys: KeysRun,
    /// The floor: the same load from one key.
    pub one_key: KeysRun,
}

/// `clients` threads send `print(1+1)` for `duration`, round robin over the first `keys`
/// of `all`.
fn drive(
    base: &str,
    all: &[String],
    keys: usize,
    clients: usize,
    duration: Duration,
) -> Result<KeysRun> {
    let next = Arc::new(AtomicUsize::new(0));
    let times = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(AtomicUsize::new(0));
    let keys: Arc<Vec<String>> = Arc::new(all[..keys].to_vec());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..clients {
            let (next, times, failures, keys) =
                (next.clone(), times.clone(), failures.clone(), keys.clone());
            scope.spawn(move || {
                let http = Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .expect("client");
                while started.elapsed() < duration {
                    let key = &keys[next.fetch_add(1, Ordering::Relaxed) % keys.len()];
                    let sent = Instant::now();
                    let ok = http
                        .post(format!("{base}/v1/exec"))
                        .bearer_auth(key)
                        .json(&json!({"code": "print(1+1)"}))
                        .send()
                        .ok()
                        .filter(|r| r.status().is_success())
                        .and_then(|r| r.json::<serde_json::Value>().ok())
                        .is_some_and(|v| v["stdout"] == "2\n");
                    if ok {
                        times.lock().expect("times").push(sent.elapsed());
                    } else {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    if failures.load(Ordering::Relaxed) > 0 {
        bail!("{} requests failed", failures.load(Ordering::Relaxed));
    }
    let times = std::mem::take(&mut *times.lock().expect("times"));
    Ok(KeysRun {
        keys: keys.len(),
        requests: times.len(),
        per_second: times.len() as f64 / elapsed,
        latency: Latency::of(times),
    })
}

pub fn run(keys: usize, clients: usize, duration: Duration) -> Result<KeysReport> {
    let keys = keys.max(1);
    // One key may use every slot: the floor measures the server, not the fair share.
    let slots = (2 * std::thread::available_parallelism().map_or(2, |n| n.get())).to_string();
    let (_server, base, all) = start_server(keys, &["--exec-slots-per-key", &slots])?;
    eprintln!("bench: warming up…");
    drive(&base, &all, keys, clients, Duration::from_secs(2))?;
    eprintln!(
        "bench: {keys} keys in turn, {clients} clients, {} s…",
        duration.as_secs()
    );
    let many_keys = drive(&base, &all, keys, clients, duration)?;
    eprintln!(
        "bench: one key, {clients} clients, {} s…",
        duration.as_secs()
    );
    let one_key = drive(&base, &all, 1, clients, duration)?;
    Ok(KeysReport {
        machine: super::Machine::describe(),
        clients,
        seconds: duration.as_secs_f64(),
        many_keys,
        one_key,
    })
}

pub fn table(r: &KeysReport) -> String {
    let row = |name: &str, run: &KeysRun| {
        format!(
            "{name:<22} {:>8.0} req/s   p50 {:>7.2} ms   p99 {:>7.2} ms   ({} requests)\n",
            run.per_second,
            run.latency.p50_us / 1000.0,
            run.latency.p99_us / 1000.0,
            run.requests
        )
    };
    let mut out = format!(
        "forkvm bench keys on {} ({} cores, {}), {} clients, {:.0} s each\n\n",
        r.machine.cpu, r.machine.cores, r.machine.kvm, r.clients, r.seconds
    );
    out.push_str(&row(
        &format!("{} keys in turn", r.many_keys.keys),
        &r.many_keys,
    ));
    out.push_str(&row("one key (floor)", &r.one_key));
    out.push_str(&format!(
        "\nratio (many / one): throughput {:.2}x, p50 {:.2}x, p99 {:.2}x\n",
        r.many_keys.per_second / r.one_key.per_second.max(f64::MIN_POSITIVE),
        r.many_keys.latency.p50_us / r.one_key.latency.p50_us.max(f64::MIN_POSITIVE),
        r.many_keys.latency.p99_us / r.one_key.latency.p99_us.max(f64::MIN_POSITIVE),
    ));
    out
}
