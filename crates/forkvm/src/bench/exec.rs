//! `forkvm bench exec`: fork + exec of typical small requests from the warm pool (Python,
//! a child process, a shell line), each beside the same work done by a host `os.fork()`
//! of a warm numpy Python; for a Node.js template, JavaScript and TypeScript requests
//! beside a host `node -e` cold start (Node cannot fork a warm process).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use forkvm_protocol::Request;
use forkvm_template::Runtime;
use forkvm_vmm::{Pool, PoolConfig, Vmm};
use serde::Serialize;

use super::fork::{console, run_trivial, wait_for_depth};
use super::{Latency, Machine};

/// A request to time: its name, language and code, and the same work on the host.
struct Workload {
    name: &'static str,
    language: &'static str,
    code: &'static str,
    host: Host,
}

/// The host's way of doing a workload's work in a fresh process.
enum Host {
    /// This Python in an `os.fork()` child of a warm numpy Python.
    PythonFork(&'static str),
    /// This command started cold.
    Spawn(&'static [&'static str]),
}

const fn python(name: &'static str, code: &'static str) -> Workload {
    Workload {
        name,
        language: "python",
        code,
        host: Host::PythonFork(code),
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
        host: Host::PythonFork(
            "import os; os.waitpid(os.posix_spawn('/bin/bash', ['bash', '-c', 'echo hi'], os.environ), 0)",
        ),
    },
];

const NODE_WORKLOADS: &[Workload] = &[
    Workload {
        name: "console.log(1+1)",
        language: "javascript",
        code: "console.log(1+1)",
        host: Host::Spawn(&["node", "-e", "console.log(1+1)"]),
    },
    Workload {
        name: "typescript: console.log(1+1)",
        language: "typescript",
        code: "const n: number = 1 + 1; console.log(n)",
        host: Host::Spawn(&["node", "-e", "console.log(1+1)"]),
    },
    Workload {
        name: "JSON.stringify 1000 numbers",
        language: "javascript",
        code: "JSON.stringify(Array.from({ length: 1000 }, (_, i) => i))",
        host: Host::Spawn(&[
            "node",
            "-e",
            "JSON.stringify(Array.from({ length: 1000 }, (_, i) => i))",
        ]),
    },
    Workload {
        name: "execSync(\"true\")",
        language: "javascript",
        code: "require('child_process').execSync('true')",
        host: Host::Spawn(&["node", "-e", "require('child_process').execSync('true')"]),
    },
];

/// One workload in forks and on the host.
#[derive(Debug, Serialize)]
pub struct ExecWorkload {
    pub workload: &'static str,
    /// Fork from the warm pool, deliver the code, run to the agent's reply.
    pub fork_exec: Latency,
    /// How the host does the same work (`host_fork_exec`).
    pub host: String,
    /// The same work on the host: an `os.fork()` of a warm numpy Python, or (for runtimes
    /// that cannot fork) a cold start.
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
    let (meta, source) = crate::template::store().load(template, &vmm)?;
    let (workloads_to_run, warmup_code) = match meta.runtime {
        Runtime::Python => (WORKLOADS, forkvm_engine::WARMUP_CODE),
        Runtime::Node => (NODE_WORKLOADS, forkvm_engine::NODE_WARMUP_CODE),
    };
    let warmup = forkvm_protocol::encode(&Request::code(warmup_code))?;
    let pool = Pool::start(vmm, Arc::new(source), PoolConfig::default(), Some(warmup));
    pool.wait_full(Duration::from_secs(120));
    let mut workloads = Vec::new();
    for workload in workloads_to_run {
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
        let (host_fork_exec, host) = match workload.host {
            Host::PythonFork(code) => (
                super::host::fork_exec(code, samples)?,
                "os.fork() of a warm numpy python3".to_string(),
            ),
            Host::Spawn(argv) => (
                super::host::spawn(argv, samples)?,
                format!("cold start: {}", argv.join(" ")),
            ),
        };
        workloads.push(ExecWorkload {
            workload: name,
            host,
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
        ["fork+exec p50 / p99", "host p50 / p99"],
        report
            .workloads
            .iter()
            .map(|w| (w.workload, &w.fork_exec, &w.host_fork_exec, w.ratio_p50)),
    )
}
