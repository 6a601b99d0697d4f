//! `forkvm bench fork`: fork latency from the warm pool, fork + a trivial exec, host memory
//! per live sandbox, 1000 live sandboxes, 1000 concurrent forks that run nothing (the seed
//! project's measure), the pool's refill rate and how fast every core fills it; beside the floors
//! measured in the same run: KVM VM+vCPU creation and teardown, one exit round trip, a host
//! `os.fork()` of a warm numpy Python, and a bubblewrap-sandboxed Python cold start.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use forkvm_engine::run_request;
use forkvm_kernel::{CaptureBuffer, Console, Input};
use forkvm_protocol::Request;
use forkvm_template::Runtime;
use forkvm_vmm::{Pool, PoolConfig, Sandbox, Vmm};
use serde::Serialize;

use super::live::{LiveSandboxes, Work};
use super::{Latency, Machine, Stats};

/// Python code the trivial exec runs.
pub(super) const TRIVIAL: &str = "print(1+1)";
/// Memory a live sandbox costs after running the trivial request.
#[derive(Debug, Serialize)]
pub struct MemoryPerSandbox {
    pub sandboxes: usize,
    /// Mean `Private_Dirty` of a sandbox's guest RAM mappings (`/proc/self/smaps`).
    pub private_dirty_kib: f64,
    /// `MemAvailable` drop divided by the number of live sandboxes: includes KVM's own
    /// kernel memory (shadow page tables, vCPU state), page tables and pool overhead.
    pub mem_available_delta_kib: f64,
}

/// Floors measured in the same run.
#[derive(Debug, Serialize)]
pub struct Floors {
    /// KVM_CREATE_VM + memory slot + KVM_CREATE_VCPU + teardown.
    pub kvm_create_teardown: Latency,
    /// One syscall exit to the VMM and back, measured inside a fork.
    pub exit_round_trip_us: f64,
    /// Host `os.fork()` of a Python that imported numpy: child exits at once.
    pub host_fork_exit: Latency,
    /// Host `os.fork()` of that Python, child runs the trivial code (output through a pipe).
    pub host_fork_exec: Latency,
    /// `bwrap` (namespaces, read-only root) running `python3 -c 'print(1+1)'`, cold.
    pub bwrap_python: Stats,
}

/// The whole `bench fork` report.
#[derive(Debug, Serialize)]
pub struct ForkReport {
    pub machine: Machine,
    pub template: String,
    pub pool_size: usize,
    pub refill_threads: usize,
    /// Whether pooled VMs were warmed before use.
    pub warm_pool: bool,
    /// Taking a prepared VM from the pool and cloning process state: a runnable sandbox.
    pub fork_to_runnable: Latency,
    /// Fork, deliver `print(1+1)`, run to the agent's reply.
    pub fork_exec_trivial: Latency,
    pub memory: MemoryPerSandbox,
    pub live: LiveSandboxes,
    /// VMs the pool prepares per second per refill thread (while the forks above run).
    pub pool_refill_per_sec: f64,
    /// Sandboxes forked from the snapshot and held at once, none running anything.
    pub concurrent_forks: LiveSandboxes,
    /// Empty warm pools filled by one worker process per core, nothing else running.
    pub pool_fill: PoolFill,
    pub floors: Floors,
}

/// How fast an empty pool fills with warmed VMs.
#[derive(Debug, Serialize)]
pub struct PoolFill {
    pub vms: usize,
    /// Worker processes, each with one refill thread.
    pub processes: usize,
    pub wall_ms: f64,
    pub vms_per_sec: f64,
}

pub(super) fn console() -> Console {
    Console::new(
        Input::Empty,
        Box::new(CaptureBuffer::default()),
        Box::new(CaptureBuffer::default()),
        1 << 20,
    )
}

pub(super) fn wait_for_depth(pool: &Pool, depth: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool.stats().depth < depth && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Runs the trivial request in `sandbox`; fails unless the agent replied with exit 0.
pub(super) fn run_trivial(sandbox: &mut Sandbox, frame: &[u8]) -> Result<()> {
    let (reply, ended) = run_request(sandbox, frame, Instant::now() + Duration::from_secs(30))?;
    match reply {
        Some(reply) if reply.exit_code == 0 => Ok(()),
        _ => bail!("trivial request failed: reply {reply:?}, ended {ended:?}"),
    }
}

fn measure_fork(pool: &Pool, samples: usize) -> Result<Latency> {
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        wait_for_depth(pool, 1);
        let start = Instant::now();
        let sandbox = pool.fork(console())?;
        times.push(start.elapsed());
        pool.release(sandbox);
    }
    Ok(Latency::of(times))
}

fn measure_fork_exec(pool: &Pool, frame: &[u8], samples: usize) -> Result<Latency> {
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        wait_for_depth(pool, 1);
        let start = Instant::now();
        let mut sandbox = pool.fork(console())?;
        run_trivial(&mut sandbox, frame)?;
        times.push(start.elapsed());
        pool.release(sandbox);
    }
    Ok(Latency::of(times))
}

pub(super) fn mem_available_kib() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("MemAvailable missing from /proc/meminfo")
}

/// Sum of `Private_Dirty` (KiB) over this process's mappings inside the given ranges.
fn private_dirty_kib(ranges: &[(u64, u64)]) -> Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((start, end)) = range.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            inside = ranges.iter().any(|&(s, e)| start >= s && end <= e);
        } else if inside && let Some(value) = line.strip_prefix("Private_Dirty:") {
            total += value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Forks `count` sandboxes that each run the trivial request and stay alive.
fn live_sandboxes(pool: &Pool, frame: &[u8], count: usize) -> Result<(Vec<Sandbox>, Duration)> {
    let start = Instant::now();
    let mut live = Vec::with_capacity(count);
    for _ in 0..count {
        let mut sandbox = pool.fork(console())?;
        run_trivial(&mut sandbox, frame)?;
        live.push(sandbox);
    }
    Ok((live, start.elapsed()))
}

fn measure_memory(pool: &Pool, frame: &[u8], count: usize) -> Result<MemoryPerSandbox> {
    pool.wait_full(Duration::from_secs(60));
    let before = mem_available_kib()?;
    let (live, _) = live_sandboxes(pool, frame, count)?;
    // Let the pool refill to where it was, so its own VMs do not count against the sandboxes.
    pool.wait_full(Duration::from_secs(60));
    let after = mem_available_kib()?;
    let ranges: Vec<(u64, u64)> = live
        .iter()
        .map(|s| {
            let ram = s.process().ram();
            (ram.host_base(), ram.host_base() + ram.size())
        })
        .collect();
    let dirty = private_dirty_kib(&ranges)?;
    for sandbox in live {
        pool.release(sandbox);
    }
    Ok(MemoryPerSandbox {
        sandboxes: count,
        private_dirty_kib: dirty as f64 / count as f64,
        mem_available_delta_kib: before.saturating_sub(after) as f64 / count as f64,
    })
}

/// Fills empty pools of 64 warmed VMs in all, one worker process per core with one refill
/// thread each (as `forkvm serve` runs them), and times it. Two refill threads in one
/// process fill barely faster than one: each copy-on-write fault of one flushes the other
/// CPU's TLB (an interrupt into its running guest), which separate processes do not need.
fn measure_pool_fill(template: &str) -> Result<PoolFill> {
    const VMS: usize = 64;
    let processes = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("bench: filling empty pools of {VMS} VMs in all over {processes} process(es)…");
    let filled = super::live::measure(template, VMS, processes, Work::FillPool)?;
    Ok(PoolFill {
        vms: VMS,
        processes: filled.worker_processes,
        wall_ms: filled.wall_ms,
        vms_per_sec: VMS as f64 * 1e3 / filled.wall_ms,
    })
}

fn kvm_create_floor(vmm: &Vmm, samples: usize) -> Result<Latency> {
    let ram = vmm.new_ram(64 << 20)?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        let vm = vmm.kvm().create_vm()?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_base(),
        };
        // SAFETY: `ram` is a live mapping that outlives `vm`, which is dropped below.
        unsafe { vm.set_user_memory_region(region) }?;
        let vcpu = vm.create_vcpu(0)?;
        drop(vcpu);
        drop(vm);
        times.push(start.elapsed());
    }
    Ok(Latency::of(times))
}

pub(super) fn exit_round_trip(pool: &Pool) -> Result<f64> {
    exit_round_trip_in(pool, Runtime::Python)
}

/// One exit's round trip: a loop of `getppid` in the pool's runtime, per call.
pub(super) fn exit_round_trip_in(pool: &Pool, runtime: Runtime) -> Result<f64> {
    let (code, language) = match runtime {
        Runtime::Python => (
            "import os, time\nn = 20000\nt = time.perf_counter()\n\
             for _ in range(n): os.getppid()\nprint((time.perf_counter() - t) / n * 1e6)",
            "python",
        ),
        // `process.ppid` asks the kernel each time.
        Runtime::Node => (
            "const n = 20000; const t = process.hrtime.bigint();\n\
             for (let i = 0; i < n; i++) process.ppid;\n\
             console.log(Number(process.hrtime.bigint() - t) / n / 1000)",
            "javascript",
        ),
    };
    let frame = forkvm_protocol::encode(&Request {
        language: language.to_string(),
        ..Request::code(code)
    })?;
    let stdout = CaptureBuffer::default();
    let console = Console::new(
        Input::Empty,
        Box::new(stdout.clone()),
        Box::new(std::io::sink()),
        1 << 20,
    );
    let mut sandbox = pool.fork(console)?;
    run_trivial(&mut sandbox, &frame)?;
    pool.release(sandbox);
    let text = String::from_utf8_lossy(&stdout.contents()).into_owned();
    text.trim()
        .parse()
        .with_context(|| format!("round-trip output {text:?}"))
}

fn bwrap_floor(runs: usize) -> Result<Stats> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let out = Command::new("bwrap")
            .args([
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--tmpfs",
                "/tmp",
                "--unshare-all",
                "--die-with-parent",
                "/usr/bin/python3",
                "-c",
                TRIVIAL,
            ])
            .stdin(Stdio::null())
            .output()
            .context("running bwrap (install bubblewrap: scripts/setup.sh)")?;
        times.push(start.elapsed());
        if !out.status.success() || out.stdout != b"2\n" {
            bail!(
                "bwrap floor failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(Stats::of(times))
}

/// Options for `bench fork`.
pub struct ForkOptions {
    pub template: String,
    pub samples: usize,
    pub live: usize,
    /// Processes the live sandboxes are spread over (see `live`).
    pub live_workers: usize,
    pub memory_sandboxes: usize,
    pub pool: PoolConfig,
    /// Warm pooled VMs with a request of our own first (see `Vmm::warm_up`).
    pub warm: bool,
}

/// Raises the descriptor limit: every live sandbox holds a VM and a vCPU descriptor.
pub(super) fn raise_fd_limit() {
    crate::limits::raise_descriptor_limit(u64::MAX);
}

pub fn run(options: &ForkOptions) -> Result<ForkReport> {
    raise_fd_limit();
    // First, on a quiet machine: tearing down thousands of VMs from the other phases
    // leaves the kernel busy for a while.
    eprintln!(
        "bench: {} live sandboxes over {} worker processes…",
        options.live, options.live_workers
    );
    let live = super::live::measure(
        &options.template,
        options.live,
        options.live_workers,
        Work::Exec,
    )?;
    eprintln!(
        "bench: {} concurrent forks over {} worker processes, nothing run…",
        options.live, options.live_workers
    );
    let concurrent_forks = super::live::measure(
        &options.template,
        options.live,
        options.live_workers,
        Work::ForkOnly,
    )?;
    let vmm = Arc::new(Vmm::new()?);
    let store = crate::template::store();
    let (_, source) = store.load(&options.template, &vmm)?;
    let source = Arc::new(source);
    let warmup = if options.warm {
        Some(forkvm_protocol::encode(&Request::code(
            forkvm_engine::WARMUP_CODE,
        ))?)
    } else {
        None
    };
    let pool_fill = measure_pool_fill(&options.template)?;
    let pool = Pool::start(vmm.clone(), source, options.pool, warmup);
    let frame = forkvm_protocol::encode(&Request::code(TRIVIAL))?;

    eprintln!("bench: filling the pool ({} VMs)…", options.pool.size);
    pool.wait_full(Duration::from_secs(120));
    eprintln!("bench: fork latency ({} forks)…", options.samples);
    let fork_to_runnable = measure_fork(&pool, options.samples)?;
    eprintln!("bench: fork + exec ({} execs)…", options.samples);
    let fork_exec_trivial = measure_fork_exec(&pool, &frame, options.samples)?;
    eprintln!(
        "bench: memory of {} live sandboxes…",
        options.memory_sandboxes
    );
    let memory = measure_memory(&pool, &frame, options.memory_sandboxes)?;
    let exit_round_trip_us = exit_round_trip(&pool)?;
    let stats = pool.stats();
    drop(pool);

    eprintln!("bench: floors…");
    let kvm_create_teardown = kvm_create_floor(&vmm, 200)?;
    let host_fork_exit = super::host::fork_exit(200)?;
    let host_fork_exec = super::host::fork_exec(TRIVIAL, 200)?;
    let bwrap_python = bwrap_floor(10)?;
    Ok(ForkReport {
        machine: Machine::describe(),
        template: options.template.clone(),
        pool_size: options.pool.size,
        refill_threads: options.pool.refill_threads,
        warm_pool: options.warm,
        fork_to_runnable,
        fork_exec_trivial,
        memory,
        live,
        pool_refill_per_sec: stats.refill_rate(),
        concurrent_forks,
        pool_fill,
        floors: Floors {
            kvm_create_teardown,
            exit_round_trip_us,
            host_fork_exit,
            host_fork_exec,
            bwrap_python,
        },
    })
}

/// A human-readable table of the report.
pub fn table(r: &ForkReport) -> String {
    let lat = |l: &Latency| {
        format!(
            "p50 {:>9.1} us  p99 {:>9.1} us  p99.9 {:>9.1} us",
            l.p50_us, l.p99_us, l.p999_us
        )
    };
    let mut out = format!(
        "forkvm bench fork on {} ({} cores, {}), template {:?}, pool {} x {} refill thread(s), {}\n\n",
        r.machine.cpu,
        r.machine.cores,
        r.machine.kvm,
        r.template,
        r.pool_size,
        r.refill_threads,
        if r.warm_pool { "warmed" } else { "cold" }
    );
    out.push_str(&format!(
        "fork to runnable (warm pool)   {}\n",
        lat(&r.fork_to_runnable)
    ));
    out.push_str(&format!(
        "fork + exec print(1+1)         {}\n",
        lat(&r.fork_exec_trivial)
    ));
    out.push_str(&format!(
        "memory per live sandbox        Private_Dirty {:.0} KiB, MemAvailable delta {:.0} KiB (over {})\n",
        r.memory.private_dirty_kib, r.memory.mem_available_delta_kib, r.memory.sandboxes
    ));
    out.push_str(&format!(
        "{} live sandboxes that ran it  {:.0} ms ({:.0} us each) over {} processes; MemAvailable delta {:.0} KiB each\n",
        r.live.sandboxes,
        r.live.wall_ms,
        r.live.per_sandbox_us,
        r.live.worker_processes,
        r.live.mem_available_delta_kib
    ));
    out.push_str(&format!(
        "{} concurrent forks, no exec  {:.0} ms ({:.0} us each) over {} processes; MemAvailable delta {:.0} KiB each\n",
        r.concurrent_forks.sandboxes,
        r.concurrent_forks.wall_ms,
        r.concurrent_forks.per_sandbox_us,
        r.concurrent_forks.worker_processes,
        r.concurrent_forks.mem_available_delta_kib
    ));
    out.push_str(&format!(
        "pool refill rate               {:.0} VMs/s per thread (during the forks above)\n",
        r.pool_refill_per_sec
    ));
    out.push_str(&format!(
        "empty pools filled             {} warmed VMs in {:.0} ms by {} process(es): {:.0} VMs/s\n\n",
        r.pool_fill.vms, r.pool_fill.wall_ms, r.pool_fill.processes, r.pool_fill.vms_per_sec
    ));
    out.push_str("floors (same run)\n");
    out.push_str(&format!(
        "KVM create VM+vCPU+teardown    {}\n",
        lat(&r.floors.kvm_create_teardown)
    ));
    out.push_str(&format!(
        "one exit round trip            {:.1} us\n",
        r.floors.exit_round_trip_us
    ));
    out.push_str(&format!(
        "host os.fork() of numpy python {}\n",
        lat(&r.floors.host_fork_exit)
    ));
    out.push_str(&format!(
        "host fork + print(1+1)         {}\n",
        lat(&r.floors.host_fork_exec)
    ));
    out.push_str(&format!(
        "bwrap python3 -c print(1+1)    p50 {:.1} ms\n",
        r.floors.bwrap_python.p50_ms
    ));
    out
}
