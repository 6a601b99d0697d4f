//! `forkvm bench …`: each command prints JSON on stdout and a table on stderr, and every
//! figure stands beside a floor measured in the same run.

pub mod breakdown;
pub mod compute;
pub mod exec;
pub mod fork;
pub mod host;
pub mod jail;
pub mod keys;
pub mod live;
pub mod load;
pub mod pause;
pub mod startup;

use std::time::Duration;

use serde::Serialize;

/// Percentiles of many short timings, in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let at = |q: f64| {
            let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            us(samples[index])
        };
        let total: Duration = samples.iter().sum();
        Latency {
            count: samples.len(),
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            mean_us: us(total) / samples.len() as f64,
            max_us: us(samples[samples.len() - 1]),
        }
    }
}

/// Summary statistics of repeated timings, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub runs: usize,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    pub fn of(mut samples: Vec<Duration>) -> Stats {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let total: Duration = samples.iter().sum();
        Stats {
            runs: samples.len(),
            min_ms: ms(samples[0]),
            p50_ms: ms(samples[samples.len() / 2]),
            mean_ms: ms(total) / samples.len() as f64,
            max_ms: ms(samples[samples.len() - 1]),
        }
    }
}

/// What the numbers were measured on.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub kvm: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let kvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            "kvm_pvm"
        } else if std::path::Path::new("/sys/module/kvm_intel").exists() {
            "kvm_intel"
        } else if std::path::Path::new("/sys/module/kvm_amd").exists() {
            "kvm_amd"
        } else {
            "unknown"
        };
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel,
            kvm: kvm.to_string(),
        }
    }
}

/// A table of workloads, each measured two ways, with the p50 ratio of the first to the
/// second: `heading` above, then one row per `(workload, first, second, ratio)`.
pub fn ratio_table<'a>(
    heading: String,
    columns: [&str; 2],
    rows: impl IntoIterator<Item = (&'a str, &'a Latency, &'a Latency, f64)>,
) -> String {
    let mut out = format!(
        "{heading}\n\n{:<32} {:>22} {:>22} {:>7}\n",
        "workload", columns[0], columns[1], "ratio"
    );
    for (name, first, second, ratio) in rows {
        out.push_str(&format!(
            "{:<32} {:>9.0} / {:>7.0} us {:>9.0} / {:>7.0} us {:>6.2}x\n",
            name, first.p50_us, first.p99_us, second.p50_us, second.p99_us, ratio
        ));
    }
    out
}
