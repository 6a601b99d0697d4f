//! Many live sandboxes at once, spread over worker processes.
//!
//! Every KVM VM registers an MMU notifier on its process's address space, and every
//! copy-on-write fault in that process calls all of them: measured here, a CoW fault costs
//! about 0.1 µs more per VM in the process (109 µs with 1000 VMs). Hosts that age pages
//! (DAMON's physical-address reclaim on our machines) call them too, for every mapping of
//! each page they sample: a snapshot page mapped by 1000 sandboxes in 32 processes cost
//! 31,000 notifier calls per check, and the host's `kdamond` took half the CPU while the
//! sandboxes were made (`perf`, docs/benchmarks.md). So density comes from sharding
//! sandboxes over processes, as the server does; this benchmark does the same.
//! Each worker (`forkvm bench live-worker`) loads the template, waits for "go" on stdin,
//! creates its share of sandboxes (each of which ran the request, or, for the seed
//! project's measure, only forked: `Work::ForkOnly`), reports "ready", and holds them until
//! its stdin closes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use forkvm_protocol::Request;
use forkvm_vmm::{Pool, PoolConfig, Sandbox, Vmm};
use serde::Serialize;

use super::fork::{TRIVIAL, console, mem_available_kib, run_trivial};

/// Many live sandboxes that each ran the request.
#[derive(Debug, Serialize)]
pub struct LiveSandboxes {
    pub sandboxes: usize,
    pub worker_processes: usize,
    /// From "go" until every sandbox ran the request and is alive.
    pub wall_ms: f64,
    pub per_sandbox_us: f64,
    /// `MemAvailable` drop per live sandbox (everything: guest pages, KVM, page tables).
    pub mem_available_delta_kib: f64,
}

/// What each worker makes before it says "ready".
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Work {
    /// Sandboxes forked from the snapshot, each of which then ran `print(1+1)`.
    Exec,
    /// Sandboxes forked from the snapshot (VM made, memory mapped, state restored), nothing run.
    ForkOnly,
    /// A warm pool of `count` VMs, from empty, with one refill thread (as a server's worker
    /// has).
    FillPool,
}

/// The worker side: hold `count` live sandboxes (or pooled VMs) of `template`.
pub fn worker(template: &str, count: usize, work: Work) -> Result<()> {
    super::fork::raise_fd_limit();
    let vmm = Arc::new(Vmm::new()?);
    let (_, source) = crate::template::store().load(template, &vmm)?;
    let source = Arc::new(source);
    let fork = || -> Result<Sandbox> {
        let prepared = vmm.prepare_fork(&source)?;
        Ok(vmm.finish_fork(prepared, &source, console())?)
    };
    match work {
        Work::ForkOnly => hold(|| (0..count).map(|_| fork()).collect::<Result<Vec<_>>>()),
        Work::FillPool => hold(|| {
            let warmup = forkvm_protocol::encode(&Request::code(forkvm_engine::WARMUP_CODE))?;
            let pool = Pool::start(
                vmm.clone(),
                source.clone(),
                PoolConfig {
                    size: count,
                    refill_threads: 1,
                },
                Some(warmup),
            );
            let filled = pool.wait_full(Duration::from_secs(300));
            if filled < count {
                bail!("the pool filled {filled} of {count} VMs in 300 s");
            }
            Ok(pool)
        }),
        Work::Exec => {
            let frame = forkvm_protocol::encode(&Request::code(TRIVIAL))?;
            // What the request writes is copied ahead into each new VM (`prepare_fork`).
            vmm.learn_writes(&source, &frame)?;
            // Every VM is made after "go", on this one thread: a pool's refill thread
            // would make them before the clock starts, and two threads of one process
            // running VMs interrupt each other's guests (TLB flushes on copy-on-write).
            hold(|| {
                (0..count)
                    .map(|_| {
                        let mut sandbox = fork()?;
                        run_trivial(&mut sandbox, &frame)?;
                        Ok(sandbox)
                    })
                    .collect::<Result<Vec<_>>>()
            })
        }
    }
}

/// Says "loaded", makes what `make` makes on "go", says "ready", and holds it until stdin
/// closes.
fn hold<T>(make: impl FnOnce() -> Result<T>) -> Result<()> {
    let mut out = std::io::stdout();
    writeln!(out, "loaded")?;
    out.flush()?;
    let mut line = String::new();
    let mut stdin = std::io::stdin().lock();
    stdin.read_line(&mut line)?;
    let held = make()?;
    writeln!(out, "ready")?;
    out.flush()?;
    // Hold them until the parent closes our stdin.
    while stdin.read_line(&mut line)? > 0 {}
    drop(held);
    Ok(())
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Worker {
    fn expect(&mut self, word: &str) -> Result<()> {
        match self.lines.next() {
            Some(Ok(line)) if line == word => Ok(()),
            other => bail!("live worker said {other:?}, expected {word:?}"),
        }
    }
}

/// Creates `total` live sandboxes over `workers` processes and times it.
pub fn measure(template: &str, total: usize, workers: usize, work: Work) -> Result<LiveSandboxes> {
    let workers = workers.clamp(1, total.max(1));
    let exe = std::env::current_exe().context("finding the forkvm binary")?;
    let mut spawned = Vec::with_capacity(workers);
    for i in 0..workers {
        let count = total / workers + usize::from(i < total % workers);
        let mut child = Command::new(&exe)
            .args(["bench", "live-worker", "--template", template, "--count"])
            .arg(count.to_string())
            .arg("--work")
            .arg(match work {
                Work::Exec => "exec",
                Work::ForkOnly => "fork-only",
                Work::FillPool => "fill-pool",
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a live worker")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("worker stdout")?;
        spawned.push(Worker {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        });
    }
    for worker in &mut spawned {
        worker.expect("loaded")?;
    }
    // Settle, then measure from "go".
    std::thread::sleep(Duration::from_millis(200));
    let before = mem_available_kib()?;
    let start = Instant::now();
    for worker in &mut spawned {
        let stdin = worker.stdin.as_mut().context("worker stdin")?;
        writeln!(stdin, "go")?;
        stdin.flush()?;
    }
    for worker in &mut spawned {
        worker.expect("ready")?;
    }
    let wall = start.elapsed();
    let after = mem_available_kib()?;
    for worker in &mut spawned {
        worker.stdin.take();
    }
    for mut worker in spawned {
        let status = worker.child.wait()?;
        if !status.success() {
            bail!("a live worker failed: {status}");
        }
    }
    Ok(LiveSandboxes {
        sandboxes: total,
        worker_processes: workers,
        wall_ms: wall.as_secs_f64() * 1e3,
        per_sandbox_us: wall.as_secs_f64() * 1e6 / total as f64,
        mem_available_delta_kib: before.saturating_sub(after) as f64 / total as f64,
    })
}
