//! Prometheus metrics: latency histograms, outcomes by error kind, unsupported syscalls by
//! name, pool and session gauges, and the server's memory.

use crate::templates::Templates;
use forkvm_protocol::exec::ExecResult;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    fork_seconds: Histogram,
    exec_seconds: Histogram,
    total_seconds: Histogram,
    queue_seconds: Histogram,
    executions: IntCounterVec,
    unsupported_syscalls: IntCounterVec,
    http_responses: IntCounterVec,
    pub sessions_live: IntGauge,
    pub sessions_expired: IntCounter,
    /// Sessions paused, sessions resumed, sessions paused now.
    pub sessions_paused: IntCounter,
    pub sessions_resumed: IntCounter,
    pub sessions_paused_now: IntGauge,
    pub sessions_checkpointed: IntCounter,
    /// Sessions a crash lost (running when the server last stopped without pausing them).
    pub sessions_lost: IntCounter,
    pub connections_open: IntGauge,
    pub executions_running: IntGauge,
    pub executions_waiting: IntGauge,
    pub results_reserved_bytes: IntGauge,
    pub connections_refused: IntCounter,
    pool_depth: IntGaugeVec,
    pool_forks: IntGaugeVec,
    pool_misses: IntGaugeVec,
    pool_prepared: IntGaugeVec,
    resident_bytes: IntGauge,
    workers_resident_bytes: IntGauge,
    workers_live: IntGauge,
    worker_restarts: IntGauge,
}

fn latency(name: &str, help: &str) -> Histogram {
    let buckets = vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 60.0,
    ];
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
        };
        let gauge_vec = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["template"]).expect("valid gauge")
        };
        let metrics = Metrics {
            fork_seconds: latency("forkvm_fork_seconds", "Time to a runnable fork."),
            exec_seconds: latency(
                "forkvm_exec_seconds",
                "Time from delivering the code to its reply.",
            ),
            total_seconds: latency("forkvm_total_seconds", "Time of a whole execution."),
            queue_seconds: latency(
                "forkvm_queue_seconds",
                "Time an execution waited for a slot.",
            ),
            executions: counter_vec(
                "forkvm_executions_total",
                "Executions by how they ended.",
                &["error_kind"],
            ),
            unsupported_syscalls: counter_vec(
                "forkvm_unsupported_syscalls_total",
                "Calls of syscalls the sandbox does not provide, by name.",
                &["syscall"],
            ),
            http_responses: counter_vec(
                "forkvm_http_responses_total",
                "HTTP responses by status code.",
                &["status"],
            ),
            sessions_live: IntGauge::new("forkvm_sessions_live", "Live sessions.")
                .expect("valid gauge"),
            sessions_expired: IntCounter::new(
                "forkvm_sessions_expired_total",
                "Sessions deleted after their idle TTL.",
            )
            .expect("valid counter"),
            sessions_paused: IntCounter::new(
                "forkvm_sessions_paused_total",
                "Sessions paused (their state stored, their VM freed).",
            )
            .expect("valid counter"),
            sessions_resumed: IntCounter::new(
                "forkvm_sessions_resumed_total",
                "Paused sessions resumed.",
            )
            .expect("valid counter"),
            sessions_checkpointed: IntCounter::new(
                "forkvm_sessions_checkpointed_total",
                "Checkpoints of running sessions (`--checkpoint-every`).",
            )
            .expect("valid counter"),
            sessions_paused_now: IntGauge::new(
                "forkvm_sessions_paused",
                "Sessions paused now (stored on disk, no VM).",
            )
            .expect("valid gauge"),
            sessions_lost: IntCounter::new(
                "forkvm_sessions_lost_total",
                "Sessions found lost at startup: running when the server stopped without pausing them.",
            )
            .expect("valid counter"),
            executions_running: IntGauge::new(
                "forkvm_executions_running",
                "Executions holding a slot.",
            )
            .expect("valid gauge"),
            executions_waiting: IntGauge::new(
                "forkvm_executions_waiting",
                "Executions waiting for a slot.",
            )
            .expect("valid gauge"),
            results_reserved_bytes: IntGauge::new(
                "forkvm_results_reserved_bytes",
                "Output reserved for responses in flight (of --results-memory-mb).",
            )
            .expect("valid gauge"),
            connections_open: IntGauge::new(
                "forkvm_connections_open",
                "Client connections open (admitted under the caps).",
            )
            .expect("valid gauge"),
            connections_refused: IntCounter::new(
                "forkvm_connections_refused_total",
                "Client connections closed at once: over the total or per-address cap.",
            )
            .expect("valid counter"),
            pool_depth: gauge_vec("forkvm_pool_depth", "Warm VMs ready to fork."),
            pool_forks: gauge_vec("forkvm_pool_forks_total", "Forks served by the pool."),
            pool_misses: gauge_vec(
                "forkvm_pool_misses_total",
                "Forks that found the pool empty and prepared a VM inline.",
            ),
            pool_prepared: gauge_vec("forkvm_pool_prepared_total", "VMs the pool prepared."),
            resident_bytes: IntGauge::new(
                "forkvm_resident_bytes",
                "Resident memory of the server process.",
            )
            .expect("valid gauge"),
            workers_resident_bytes: IntGauge::new(
                "forkvm_workers_resident_bytes",
                "Resident memory of the worker processes (guest pages included).",
            )
            .expect("valid gauge"),
            workers_live: IntGauge::new("forkvm_workers_live", "Worker processes serving.")
                .expect("valid gauge"),
            worker_restarts: IntGauge::new(
                "forkvm_worker_restarts_total",
                "Workers that died and were replaced.",
            )
            .expect("valid gauge"),
            registry,
        };
        for collector in [
            Box::new(metrics.fork_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.exec_seconds.clone()),
            Box::new(metrics.total_seconds.clone()),
            Box::new(metrics.queue_seconds.clone()),
            Box::new(metrics.executions.clone()),
            Box::new(metrics.unsupported_syscalls.clone()),
            Box::new(metrics.http_responses.clone()),
            Box::new(metrics.sessions_live.clone()),
            Box::new(metrics.sessions_expired.clone()),
            Box::new(metrics.sessions_paused.clone()),
            Box::new(metrics.sessions_resumed.clone()),
            Box::new(metrics.sessions_paused_now.clone()),
            Box::new(metrics.sessions_checkpointed.clone()),
            Box::new(metrics.sessions_lost.clone()),
            Box::new(metrics.executions_running.clone()),
            Box::new(metrics.executions_waiting.clone()),
            Box::new(metrics.results_reserved_bytes.clone()),
            Box::new(metrics.connections_open.clone()),
            Box::new(metrics.connections_refused.clone()),
            Box::new(metrics.pool_depth.clone()),
            Box::new(metrics.pool_forks.clone()),
            Box::new(metrics.pool_misses.clone()),
            Box::new(metrics.pool_prepared.clone()),
            Box::new(metrics.resident_bytes.clone()),
            Box::new(metrics.workers_resident_bytes.clone()),
            Box::new(metrics.workers_live.clone()),
            Box::new(metrics.worker_restarts.clone()),
        ] {
            metrics.registry.register(collector).expect("unique metric");
        }
        metrics
    }

    /// Records how long an execution waited for its slot.
    pub fn record_queued(&self, waited: std::time::Duration) {
        self.queue_seconds.observe(waited.as_secs_f64());
    }

    /// Records one finished execution.
    pub fn record(&self, result: &ExecResult) {
        let seconds = |us: u64| us as f64 / 1e6;
        self.fork_seconds.observe(seconds(result.timings.fork_us));
        self.exec_seconds.observe(seconds(result.timings.exec_us));
        self.total_seconds.observe(seconds(result.timings.total_us));
        self.executions
            .with_label_values(&[result.error.kind.as_str()])
            .inc();
        for (name, count) in &result.unsupported_syscalls {
            self.unsupported_syscalls
                .with_label_values(&[name])
                .inc_by(*count);
        }
    }

    pub fn record_status(&self, status: u16) {
        self.http_responses
            .with_label_values(&[&status.to_string()])
            .inc();
    }

    /// The text exposition, refreshing the gauges read from the workers (blocking: a
    /// round trip to each).
    pub fn render(&self, templates: &Templates) -> String {
        let (mut live, mut restarts, mut workers_rss) = (0, 0, 0);
        for served in templates.all() {
            let workers = &served.workers;
            let stats = workers.pool();
            let name = [served.name.as_str()];
            for (gauge, value) in [
                (&self.pool_depth, stats.depth),
                (&self.pool_forks, stats.forks as usize),
                (&self.pool_misses, stats.misses as usize),
                (&self.pool_prepared, stats.prepared as usize),
            ] {
                gauge.with_label_values(&name).set(value as i64);
            }
            let pids = workers.pids();
            live += pids.len();
            restarts += workers.restarts();
            workers_rss += pids
                .iter()
                .map(|pid| resident_bytes(&pid.to_string()))
                .sum::<u64>();
        }
        self.workers_live.set(live as i64);
        self.worker_restarts.set(restarts as i64);
        self.resident_bytes.set(resident_bytes("self") as i64);
        self.workers_resident_bytes.set(workers_rss as i64);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails");
        String::from_utf8(out).expect("metrics are UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Resident set size of this process, from `/proc/self/status`.
/// VmRSS of process `pid` ("self" for this one), in bytes.
pub fn resident_bytes(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}
