//! `forkvm bench breakdown`: where a fresh VM's time goes. For VMs made afresh from the
//! template and for VMs from a warmed pool, each step timed (making the VM, restoring the
//! process into it, the first request, a second request in the same VM) with what KVM
//! counted meanwhile (exits, guest page faults its shadow MMU handled, shadow pages) and
//! the host page faults of the running thread; beside one exit's round trip, measured in
//! the same run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use forkvm_protocol::Request;
use forkvm_vmm::stats::{Counters, delta};
use forkvm_vmm::{ForkSource, Pool, PoolConfig, Sandbox, Vmm};
use serde::Serialize;

use super::fork::{TRIVIAL, console, exit_round_trip_in, run_trivial, wait_for_depth};
use super::{Latency, Machine};
use forkvm_template::Runtime;

/// KVM counters reported (summed over vCPU and VM), by the name shown.
const SHOWN: &[(&str, &str)] = &[
    ("exits", "vcpu.exits"),
    ("io_exits", "vcpu.io_exits"),
    ("shadow_faults", "vcpu.pf_taken"),
    ("shadow_faults_fixed", "vcpu.pf_fixed"),
    ("guest_faults", "vcpu.pf_guest"),
    ("shadow_pages_zapped", "vm.mmu_shadow_zapped"),
    ("shadow_page_cache_misses", "vm.mmu_cache_miss"),
    ("host_interrupts", "vcpu.irq_exits"),
];

/// One step, over the samples.
#[derive(Debug, Serialize)]
pub struct Step {
    pub time: Latency,
    /// Mean per sample.
    pub kvm: BTreeMap<String, f64>,
    pub host_minor_faults: f64,
    /// Syscalls the program made, by name (mean per sample): what the exits were.
    pub syscalls: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
pub struct BreakdownReport {
    pub machine: Machine,
    pub template: String,
    pub samples: usize,
    /// A VM made afresh: KVM VM and vCPU, memory slot, registers (`Vmm::prepare_fork`).
    pub fresh_prepare: Step,
    /// The process restored into it (`Vmm::finish_fork`).
    pub fresh_finish: Step,
    /// `print(1+1)` (`console.log(1+1)` for Node.js) in it: the first request of a
    /// never-used VM.
    pub fresh_first_request: Step,
    /// The same again in the same VM.
    pub fresh_second_request: Step,
    /// Making a fresh VM that copies ahead the pages the first request writes (learned
    /// once per template: `Vmm::learn_writes`).
    pub fresh_prepare_copied: Step,
    /// The first request in such a VM.
    pub fresh_first_request_copied: Step,
    /// The pool's warm-up request in a fresh VM (`WARMUP_CODE`), whose writes were copied
    /// ahead as the pool does: with making the VM and the reset after it, what one VM of
    /// the pool's refill costs.
    pub fresh_warmup_request: Step,
    /// Putting that VM back to the snapshot for the pool (`Vmm::reset_fork`).
    pub warmup_reset: Latency,
    /// Fork from a warmed pool and `print(1+1)`.
    pub warm_pool_request: Step,
    pub floors: BreakdownFloors,
}

#[derive(Debug, Serialize)]
pub struct BreakdownFloors {
    pub exit_round_trip_us: f64,
}

fn minor_faults() -> u64 {
    // SAFETY: getrusage fills the struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_THREAD covers the calling thread, which runs the vCPU.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    usage.ru_minflt as u64
}

/// Samples of one step: its time, KVM counters and host faults.
#[derive(Default)]
struct Samples {
    times: Vec<Duration>,
    kvm: Vec<Counters>,
    faults: Vec<u64>,
    syscalls: BTreeMap<String, u64>,
}

impl Samples {
    /// Times `step` on `sandbox`'s counters.
    fn measure<T>(
        &mut self,
        sandbox: &mut Sandbox,
        step: impl FnOnce(&mut Sandbox) -> Result<T>,
    ) -> Result<T> {
        let before = sandbox.kvm_counters()?;
        let calls = sandbox.process().stats().by_name.clone();
        let faults = minor_faults();
        let start = Instant::now();
        let out = step(sandbox)?;
        self.times.push(start.elapsed());
        self.faults.push(minor_faults() - faults);
        self.kvm.push(delta(&before, &sandbox.kvm_counters()?));
        for (&name, &count) in &sandbox.process().stats().by_name {
            let made = count.saturating_sub(calls.get(name).copied().unwrap_or(0));
            if made > 0 {
                *self.syscalls.entry(name.to_string()).or_default() += made;
            }
        }
        Ok(out)
    }

    fn step(self) -> Step {
        let n = self.kvm.len().max(1) as f64;
        let kvm = SHOWN
            .iter()
            .map(|&(shown, name)| {
                let total: u64 = self
                    .kvm
                    .iter()
                    .map(|c| c.get(name).copied().unwrap_or(0))
                    .sum();
                (shown.to_string(), total as f64 / n)
            })
            .collect();
        // Every other counter that moved, under KVM's own name.
        let mut raw: BTreeMap<String, u64> = BTreeMap::new();
        for counters in &self.kvm {
            for (name, &value) in counters {
                *raw.entry(name.clone()).or_default() += value;
            }
        }
        let mut kvm: BTreeMap<String, f64> = kvm;
        kvm.extend(
            raw.into_iter()
                .filter(|&(_, total)| total > 0)
                .map(|(name, total)| (name, total as f64 / n)),
        );
        let syscalls = self
            .syscalls
            .iter()
            .map(|(name, &total)| (name.clone(), total as f64 / n))
            .collect();
        Step {
            syscalls,
            host_minor_faults: self.faults.iter().sum::<u64>() as f64
                / self.faults.len().max(1) as f64,
            time: Latency::of(self.times),
            kvm,
        }
    }
}

/// The steps of VMs made afresh from `source`, each running `frame` twice.
struct FreshVms {
    prepare: Samples,
    finish: Samples,
    first: Samples,
    second: Samples,
}

fn fresh_vms(vmm: &Vmm, source: &ForkSource, frame: &[u8], samples: usize) -> Result<FreshVms> {
    let mut steps = FreshVms {
        prepare: Samples::default(),
        finish: Samples::default(),
        first: Samples::default(),
        second: Samples::default(),
    };
    for _ in 0..samples {
        let start = Instant::now();
        let prepared = vmm.prepare_fork(source)?;
        steps.prepare.times.push(start.elapsed());
        let start = Instant::now();
        let mut sandbox = vmm.finish_fork(prepared, source, console())?;
        steps.finish.times.push(start.elapsed());
        steps
            .first
            .measure(&mut sandbox, |s| run_trivial(s, frame))?;
        steps
            .second
            .measure(&mut sandbox, |s| run_trivial(s, frame))?;
    }
    Ok(steps)
}

pub fn run(template: &str, samples: usize) -> Result<BreakdownReport> {
    let vmm = Arc::new(Vmm::new()?);
    crate::template::ensure(template, &vmm)?;
    let (meta, source) = crate::template::store().load(template, &vmm)?;
    let source = Arc::new(source);
    let (code, language, warmup_code) = match meta.runtime {
        Runtime::Python => (TRIVIAL, "python", forkvm_engine::WARMUP_CODE),
        Runtime::Node => (
            "console.log(1+1)",
            "javascript",
            forkvm_engine::NODE_WARMUP_CODE,
        ),
    };
    let frame = forkvm_protocol::encode(&Request {
        language: language.to_string(),
        ..Request::code(code)
    })?;

    eprintln!("bench: {samples} VMs made afresh…");
    let fresh = fresh_vms(&vmm, &source, &frame, samples)?;
    eprintln!("bench: {samples} VMs made afresh, first writes copied ahead…");
    vmm.learn_writes(&source, &frame)?;
    let copied = fresh_vms(&vmm, &source, &frame, samples)?;

    eprintln!("bench: {samples} warm-ups as the pool runs them…");
    let warmup = forkvm_protocol::encode(&Request::code(warmup_code))?;
    // A source of its own, which learns what the warm-up writes (as a pool's does).
    let (_, source) = crate::template::store().load(template, &vmm)?;
    let source = Arc::new(source);
    vmm.learn_writes(&source, &warmup)?;
    let mut warmups = Samples::default();
    let mut resets = Vec::with_capacity(samples);
    for _ in 0..samples {
        let prepared = vmm.prepare_fork(&source)?;
        let mut sandbox = vmm.finish_fork(prepared, &source, console())?;
        warmups.measure(&mut sandbox, |s| run_trivial(s, &warmup))?;
        let start = Instant::now();
        let reset = vmm.reset_fork(sandbox, &source, u64::MAX)?;
        resets.push(start.elapsed());
        drop(reset);
    }

    eprintln!("bench: {samples} forks from a warmed pool…");
    let pool = Pool::start(
        vmm.clone(),
        source.clone(),
        PoolConfig {
            size: 8,
            refill_threads: 1,
        },
        Some(warmup),
    );
    pool.wait_full(Duration::from_secs(120));
    let mut warm = Samples::default();
    for _ in 0..samples {
        wait_for_depth(&pool, 1);
        let mut sandbox = pool.fork(console())?;
        warm.measure(&mut sandbox, |s| run_trivial(s, &frame))?;
        pool.release(sandbox);
    }
    let exit_round_trip_us = exit_round_trip_in(&pool, meta.runtime)?;
    Ok(BreakdownReport {
        machine: Machine::describe(),
        template: template.to_string(),
        samples,
        fresh_prepare: fresh.prepare.step(),
        fresh_finish: fresh.finish.step(),
        fresh_first_request: fresh.first.step(),
        fresh_second_request: fresh.second.step(),
        fresh_prepare_copied: copied.prepare.step(),
        fresh_first_request_copied: copied.first.step(),
        fresh_warmup_request: warmups.step(),
        warmup_reset: Latency::of(resets),
        warm_pool_request: warm.step(),
        floors: BreakdownFloors { exit_round_trip_us },
    })
}

/// The report as a table. KVM counts as exits the guest page faults its shadow MMU handles
/// and the host's interrupts, neither of which leaves the kernel; the rest come back to the
/// VMM (syscalls, exceptions), each at about the measured round trip. What remains of a
/// step's time is the faults' and the program's own work.
pub fn table(r: &BreakdownReport) -> String {
    let mut out = format!(
        "forkvm bench breakdown on {} ({} cores, {}), template {:?}, {} samples; one exit to the VMM and back {:.1} us\n\n",
        r.machine.cpu,
        r.machine.cores,
        r.machine.kvm,
        r.template,
        r.samples,
        r.floors.exit_round_trip_us
    );
    out.push_str(&format!(
        "{:<27} {:>8} {:>8} {:>10} {:>9} {:>8} {:>10} {:>9}\n",
        "step", "p50 ms", "mean ms", "VMM exits", "their ms", "shadow", "rest/flt", "host flt"
    ));
    for (name, step) in [
        ("fresh VM: make VM + vCPU", &r.fresh_prepare),
        ("fresh VM: restore process", &r.fresh_finish),
        ("fresh VM: first request", &r.fresh_first_request),
        ("fresh VM: second request", &r.fresh_second_request),
        ("copied ahead: make VM", &r.fresh_prepare_copied),
        ("copied ahead: 1st request", &r.fresh_first_request_copied),
        ("fresh VM: pool's warm-up", &r.fresh_warmup_request),
        ("warm pool: fork + request", &r.warm_pool_request),
    ] {
        let kvm = |k: &str| step.kvm.get(k).copied().unwrap_or(0.0);
        let shadow = kvm("shadow_faults");
        let vmm_exits = (kvm("exits") - shadow - kvm("host_interrupts")).max(0.0);
        let exits_ms = vmm_exits * r.floors.exit_round_trip_us / 1000.0;
        let rest = match shadow >= 1.0 {
            true => format!(
                "{:.1} us",
                (step.time.mean_us - exits_ms * 1000.0).max(0.0) / shadow
            ),
            false => "-".to_string(),
        };
        out.push_str(&format!(
            "{:<27} {:>8.2} {:>8.2} {:>10.0} {:>9.2} {:>8.0} {:>10} {:>9.0}\n",
            name,
            step.time.p50_us / 1000.0,
            step.time.mean_us / 1000.0,
            vmm_exits,
            exits_ms,
            shadow,
            rest,
            step.host_minor_faults,
        ));
    }
    let mut calls: Vec<(&String, &f64)> = r.warm_pool_request.syscalls.iter().collect();
    calls.sort_by(|a, b| b.1.total_cmp(a.1));
    let top: Vec<String> = calls
        .iter()
        .take(8)
        .map(|(name, n)| format!("{name} {n:.0}"))
        .collect();
    out.push_str(&format!(
        "\nreset after the warm-up (back to the snapshot, for the pool): p50 {:.2} ms\n",
        r.warmup_reset.p50_us / 1000.0
    ));
    out.push_str(&format!(
        "syscalls of a warmed-pool request: {}\n",
        top.join(", ")
    ));
    out
}
