//! `forkvm bench pause`: what pausing a session to disk and resuming it cost, beside the
//! fork latencies they stand in for, measured in the same run with the same engine.
//!
//! Per workload (a session with a few variables, and one holding a 64 MiB array):
//! * floors: a new session from the template's pool, and a fork of the session (snapshot
//!   plus a VM);
//! * pause: capture the state into memory files and write them to a store (every file
//!   `fsync`ed, the directory renamed into place), as the server does;
//! * resume: read and verify the stored pause, and make it a runnable session; and that
//!   plus the first request (`print(x)`), which faults in what it touches.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use forkvm_engine::{Engine, ExecRequest, Streams};
use forkvm_template::cpu::CpuFeatures;
use forkvm_template::paused::{PausedStore, SessionRecord};
use forkvm_vmm::{PoolConfig, Vmm};
use serde::Serialize;

use super::{Latency, Machine};

struct Workload {
    name: &'static str,
    setup: &'static str,
    samples: usize,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "variables (x = 41)",
        setup: "x = 41\nimport json\nstate = {'k': list(range(100))}",
        samples: 40,
    },
    Workload {
        name: "64 MiB numpy array",
        setup: "x = 41\nimport numpy as np\na = np.random.default_rng(0).random(8 << 20)",
        samples: 12,
    },
];

#[derive(Debug, Serialize)]
pub struct Row {
    pub workload: String,
    /// Bytes one pause stores on disk.
    pub stored_bytes: u64,
    pub create_session: Latency,
    pub fork_session: Latency,
    pub pause: Latency,
    pub resume: Latency,
    pub resume_and_exec: Latency,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub template: String,
    pub rows: Vec<Row>,
}

fn run_code(engine: &Engine, session: &mut forkvm_engine::Session, code: &str) -> Result<()> {
    let result = engine.session_exec(session, &ExecRequest::python(code), Streams::new())?;
    anyhow::ensure!(
        result.exit_code == 0,
        "{code:?} failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    Ok(())
}

pub fn run(template: &str) -> Result<Report> {
    let vmm = Arc::new(Vmm::new()?);
    let cpu = CpuFeatures::of(vmm.cpu());
    let store_dir = tempfile::tempdir().context("a directory for the paused store")?;
    let store = PausedStore::open(store_dir.path())?;
    let engine = Engine::new(
        vmm,
        crate::template::store(),
        PoolConfig {
            size: 8,
            refill_threads: 1,
        },
    );
    let digest = engine.template(template)?.meta.digest();
    let mut rows = Vec::new();
    for workload in WORKLOADS {
        let (mut create, mut fork, mut pause, mut resume, mut resume_exec) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut stored_bytes = 0;
        for n in 0..workload.samples {
            let started = Instant::now();
            let mut session = engine.create_session(template)?;
            create.push(started.elapsed());
            run_code(&engine, &mut session, workload.setup)?;

            let started = Instant::now();
            let branch = engine.fork_session(&mut session, 1)?;
            fork.push(started.elapsed());
            drop(branch);

            let record = SessionRecord {
                id: format!("00000000-0000-0000-0000-{n:012}"),
                owner: "bench".into(),
                template: template.into(),
                metadata: Default::default(),
                ttl_seconds: 60,
                created_unix: 0,
            };
            let started = Instant::now();
            let (paused, files) = engine.pause_session(&mut session)?;
            let manifest = store.write(&record, &digest, cpu.clone(), &paused, &files)?;
            pause.push(started.elapsed());
            stored_bytes = manifest.stored_bytes;
            drop((session, files));

            let started = Instant::now();
            let loaded = store.load(&record.id, &digest, &cpu)?;
            let mut resumed = engine.resume_session(template, (loaded.paused, loaded.files))?;
            resume.push(started.elapsed());
            run_code(&engine, &mut resumed, "print(x)")?;
            resume_exec.push(started.elapsed());
            store.remove(&record.id);
        }
        rows.push(Row {
            workload: workload.name.into(),
            stored_bytes,
            create_session: Latency::of(create),
            fork_session: Latency::of(fork),
            pause: Latency::of(pause),
            resume: Latency::of(resume),
            resume_and_exec: Latency::of(resume_exec),
        });
    }
    Ok(Report {
        machine: Machine::describe(),
        template: template.into(),
        rows,
    })
}

pub fn table(report: &Report) -> String {
    let ms = |l: &Latency| format!("{:>7.2} / {:>7.2}", l.p50_us / 1e3, l.p99_us / 1e3);
    let mut out = format!(
        "pausing and resuming sessions of template {:?} (p50 / p99 ms)\n\n{:<22} {:>10} {:>17} {:>17} {:>17} {:>17} {:>17}\n",
        report.template,
        "workload",
        "stored",
        "new session",
        "fork session",
        "pause",
        "resume",
        "resume + exec"
    );
    for row in &report.rows {
        out.push_str(&format!(
            "{:<22} {:>7} KiB {} {} {} {} {}\n",
            row.workload,
            row.stored_bytes >> 10,
            ms(&row.create_session),
            ms(&row.fork_session),
            ms(&row.pause),
            ms(&row.resume),
            ms(&row.resume_and_exec)
        ));
    }
    out
}
