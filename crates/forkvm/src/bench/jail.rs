//! `forkvm bench jail`: what the worker boundary costs. The same requests run through one
//! jailed worker (as `forkvm serve` runs them, minus HTTP) and, as the floor, by the engine
//! in this process, alternating in rounds so drift hits both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use forkvm_engine::{Engine, ExecLimits, ExecRequest, Streams};
use forkvm_vmm::{PoolConfig, Vmm};
use forkvm_worker::Cancellation;
use serde::Serialize;

use super::{Latency, Machine};

/// Warm VMs on each side.
const POOL: usize = 8;
/// Rounds the samples are split into, alternating sides.
const ROUNDS: usize = 4;
/// The tenant both sides run as (its VMs are recycled, as a server's key's are).
const TENANT: &str = "bench";

/// One workload on both sides.
#[derive(Debug, Serialize)]
pub struct JailWorkload {
    pub workload: &'static str,
    /// Through a jailed worker: a call frame out, the answer back.
    pub jailed: Latency,
    /// The engine in this process (the floor).
    pub in_process: Latency,
    /// jailed p50 / in-process p50.
    pub ratio_p50: f64,
}

#[derive(Debug, Serialize)]
pub struct JailReport {
    pub machine: Machine,
    pub template: String,
    pub workloads: Vec<JailWorkload>,
}

fn timed(samples: usize, mut run: impl FnMut() -> Result<()>) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        run()?;
        times.push(start.elapsed());
    }
    Ok(times)
}

pub fn run(template: &str, samples: usize) -> Result<JailReport> {
    crate::jailed::prepare(template)?;
    let pool = PoolConfig {
        size: POOL,
        refill_threads: 1,
    };
    let engine = Engine::new(Arc::new(Vmm::new()?), crate::template::store(), pool);
    engine.template(template)?;
    let workers = crate::jailed::start(template, 1, pool, ExecLimits::maxima(), None)?;
    let request = ExecRequest::python("print(1+1)");
    let step = ExecRequest::python("x += 1");

    let mut session = engine.create_session(template)?;
    engine.session_exec(&mut session, &ExecRequest::python("x = 0"), Streams::new())?;
    let mut remote = workers.create_session().map_err(|e| anyhow!("{e}"))?;
    remote
        .exec(ExecRequest::python("x = 0"), None, &Cancellation::default())
        .map_err(|e| anyhow!("{e}"))?;

    let per_round = samples.div_ceil(ROUNDS);
    let (mut exec_in, mut exec_jailed, mut session_in, mut session_jailed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        eprintln!("bench: round {} of {ROUNDS}…", round + 1);
        exec_in.extend(timed(per_round, || {
            engine.exec_with(template, &request, Streams::new(), Some(TENANT))?;
            Ok(())
        })?);
        exec_jailed.extend(timed(per_round, || {
            workers
                .exec(
                    request.clone(),
                    None,
                    Some(TENANT),
                    &Cancellation::default(),
                )
                .map_err(|e| anyhow!("{e}"))?;
            Ok(())
        })?);
        session_in.extend(timed(per_round, || {
            engine.session_exec(&mut session, &step, Streams::new())?;
            Ok(())
        })?);
        session_jailed.extend(timed(per_round, || {
            remote
                .exec(step.clone(), None, &Cancellation::default())
                .map_err(|e| anyhow!("{e}"))?;
            Ok(())
        })?);
    }
    workers.stop();
    let workload = |name, jailed: Vec<Duration>, floor: Vec<Duration>| {
        let (jailed, in_process) = (Latency::of(jailed), Latency::of(floor));
        JailWorkload {
            workload: name,
            ratio_p50: jailed.p50_us / in_process.p50_us,
            jailed,
            in_process,
        }
    };
    Ok(JailReport {
        machine: Machine::describe(),
        template: template.to_string(),
        workloads: vec![
            workload("exec print(1+1), recycled VM", exec_jailed, exec_in),
            workload("session exec x += 1", session_jailed, session_in),
        ],
    })
}

pub fn table(report: &JailReport) -> String {
    super::ratio_table(
        format!(
            "forkvm bench jail on {} ({} cores, {}), template {:?}",
            report.machine.cpu, report.machine.cores, report.machine.kvm, report.template
        ),
        ["jailed worker p50 / p99", "in-process p50 / p99"],
        report
            .workloads
            .iter()
            .map(|w| (w.workload, &w.jailed, &w.in_process, w.ratio_p50)),
    )
}
