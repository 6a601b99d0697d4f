//! `forkvm bench exec`: fork + exec of typical small requests from the warm pool (Python,
//! a child process, a shell line), each beside the same work done by a host `os.fork()`
//! of a warm numpy Python.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use forkvm_protocol::Request;
use forkvm_vmm::{Pool, PoolConfig, Vmm};
use serde::Serialize;

use super::fork::{console, run_trivial, wait_for_depth};
use super::{Latency, Machine};

/// A request to time: its name, language and code, and the Python the host's forked child
/// runs for the same work.
struct Workload {
    name: &'static str,
    language: &'static str,
    code: &'static str,
    host_code: &'static str,
}

const fn python(name: &'static str, code: &'static str) -> Workload {
    Workload {
        name,
        language: "python",
        code,
        host_code: code,
    }
}

const WORKLOADS: &[Workload] = &[
    python("print(1+1)", "print(1+1)"),
    python(
        "json.dumps(list(range(1000)))",
        "import json; json.dumps(list(range(1000)))",
    ),
    python(
        "200x200 numpy matmul",
        "import numpy as np; a = np.random.rand(200, 200); (a @ a).sum()",
    ),
    // A child process: vfork, execve of a new image in a new VM, wait.
    python(
        "subprocess.run([\"true\"])",
        "import subprocess; subprocess.run([\"true\"])",
    ),
    // A shell request: the agent spawns bash, which runs the line.
    Workload {
        name: "bash: echo hi",
        language: "bash",
        code: "echo hi",
        host_code: "import os; os.waitpid(os.posix_spawn('/bin/bash', ['bash', '-c', 'echo hi'], os.environ), 0)",
    },
];

/// One workload in forks and on the host.
#[derive(Debug, Serialize)]
pub struct ExecWorkload {
    pub workload: &'static str,
    /// Fork from the warm pool, deliver the code, run to the agent's reply.
    pub fork_exec: Latency,
    /// Host `os.fork()` of a warm numpy Python running the same code.
    pub host_fork_exec: Latency,
    /// fork_exec p50 / host p50.
    pub ratio_p50: f64,
}

#[derive(Debug, Serialize)]
pub struct ExecReport {
    pub machine: Machine,
    pub template: String,
    pub workloads: Vec<ExecWorkload>,
}

pub fn run(template: &str, samples: usize) -> Result<ExecReport> {
    let vmm = Arc::new(Vmm::new()?);
    let (_, source) = crate::template::store().load(template, &vmm)?;
    let warmup = forkvm_protocol::encode(&Request::code(forkvm_engine::WARMUP_CODE))?;
    let pool = Pool::start(vmm, Arc::new(source), PoolConfig::default(), Some(warmup));
    pool.wait_full(Duration::from_secs(120));
    let mut workloads = Vec::new();
    for workload in WORKLOADS {
        let name = workload.name;
        eprintln!("bench: {name} ({samples} forks)…");
        let frame = forkvm_protocol::encode(&Request {
            language: workload.language.to_string(),
            ..Request::code(workload.code)
        })?;
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples {
            wait_for_depth(&pool, 1);
            let start = Instant::now();
            let mut sandbox = pool.fork(console())?;
            run_trivial(&mut sandbox, &frame)?;
            times.push(start.elapsed());
            pool.release(sandbox);
        }
        let fork_exec = Latency::of(times);
        let host_fork_exec = super::host::fork_exec(workload.host_code, samples)?;
        workloads.push(ExecWorkload {
            workload: name,
            ratio_p50: fork_exec.p50_us / host_fork_exec.p50_us,
            fork_exec,
            host_fork_exec,
        });
    }
    Ok(ExecReport {
        machine: Machine::describe(),
        template: template.to_string(),
        workloads,
    })
}

pub fn table(report: &ExecReport) -> String {
    super::ratio_table(
        format!(
            "forkvm bench exec on {} ({} cores, {}), template {:?}",
            report.machine.cpu, report.machine.cores, report.machine.kvm, report.template
        ),
        ["fork+exec p50 / p99", "host os.fork p50 / p99"],
        report
            .workloads
            .iter()
            .map(|w| (w.workload, &w.fork_exec, &w.host_fork_exec, w.ratio_p50)),
    )
}
