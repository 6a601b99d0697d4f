//! `forkvm bench startup`: what a cold sandbox costs, each number beside the same work run
//! natively on this host in the same run (these machines are noisy: compare ratios).
//!
//! The native floor runs Debian's own `/usr/bin/python3` (the package the image holds), so
//! both sides execute the same binaries.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use forkvm_image::Image;
use forkvm_kernel::{CaptureBuffer, Console, Input};
use forkvm_vmm::{SandboxExit, Vmm};
use serde::Serialize;

use super::{Machine, Stats};
use crate::run::{Launch, launch};

/// The host interpreter the floors use: the same Debian package as in the image.
const HOST_PYTHON: &str = "/usr/bin/python3";
/// Python that times 20 000 cheap syscalls and prints microseconds per call.
const ROUND_TRIP_CODE: &str = "import os, time\n\
    n = 20000\n\
    t = time.perf_counter()\n\
    for _ in range(n): os.getppid()\n\
    print((time.perf_counter() - t) / n * 1e6)";

/// One workload in the sandbox and natively.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub workload: String,
    pub sandbox: Stats,
    pub native: Stats,
    /// sandbox p50 / native p50.
    pub ratio_p50: f64,
}

/// One syscall's round trip, sandbox against native.
#[derive(Debug, Serialize)]
pub struct RoundTrip {
    pub syscall: &'static str,
    pub sandbox_us: f64,
    pub native_us: f64,
    pub ratio: f64,
}

/// The whole `bench startup` report.
#[derive(Debug, Serialize)]
pub struct StartupReport {
    pub machine: Machine,
    pub startup: Vec<Comparison>,
    pub syscall_round_trip: RoundTrip,
}

/// Runs Python `code` in a fresh sandbox; returns the wall time (VM creation, loading and
/// the run) and stdout. Fails unless the program exits 0.
fn sandbox_python(vmm: &Vmm, image: &Arc<Image>, code: &str) -> Result<(Duration, String)> {
    let out = CaptureBuffer::default();
    let console = Console::new(
        Input::Empty,
        Box::new(out.clone()),
        Box::new(std::io::sink()),
        1 << 20,
    );
    let start = Instant::now();
    let args = ["-c".to_string(), code.to_string()];
    let mut sandbox = launch(
        vmm,
        image,
        Launch {
            program: "/usr/bin/python3",
            args: &args,
            env: &[],
            cwd: "/root",
            memory_mib: 1024,
            overlay_limit: 64 << 20,
            console,
        },
    )?;
    let exit = sandbox.run(Some(Instant::now() + Duration::from_secs(120)));
    let elapsed = start.elapsed();
    drop(sandbox);
    if exit != SandboxExit::Exited(0) {
        bail!("sandboxed python3 -c {code:?} ended with {exit:?}");
    }
    let stdout = String::from_utf8_lossy(&out.contents()).into_owned();
    Ok((elapsed, stdout))
}

/// Runs `python3 -c code` natively; returns wall time (fork+exec+run) and stdout.
fn native_python(code: &str) -> Result<(Duration, String)> {
    let start = Instant::now();
    let out = Command::new(HOST_PYTHON)
        .args(["-c", code])
        .env_clear()
        .env("OPENBLAS_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("running {HOST_PYTHON} (install python3-numpy with scripts/setup.sh)")
        })?;
    let elapsed = start.elapsed();
    if !out.status.success() {
        bail!(
            "native python3 -c {code:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((elapsed, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn compare(
    vmm: &Vmm,
    image: &Arc<Image>,
    workload: &str,
    code: &str,
    runs: usize,
) -> Result<Comparison> {
    // One warm-up each, so page-cache state is the same for both sides.
    sandbox_python(vmm, image, code)?;
    native_python(code)?;
    let mut sandbox = Vec::with_capacity(runs);
    let mut native = Vec::with_capacity(runs);
    for _ in 0..runs {
        sandbox.push(sandbox_python(vmm, image, code)?.0);
        native.push(native_python(code)?.0);
    }
    let (sandbox, native) = (Stats::of(sandbox), Stats::of(native));
    Ok(Comparison {
        workload: workload.to_string(),
        ratio_p50: sandbox.p50_ms / native.p50_ms,
        sandbox,
        native,
    })
}

fn parse_micros(stdout: &str) -> Result<f64> {
    stdout
        .trim()
        .parse()
        .with_context(|| format!("unexpected round-trip output {stdout:?}"))
}

/// Measures and returns the startup report.
pub fn run(image: &std::path::Path, runs: usize) -> Result<StartupReport> {
    let vmm = Vmm::new().context("starting the VMM")?;
    let image = Arc::new(Image::open(image)?);
    let startup = vec![
        compare(&vmm, &image, "python3 -c pass", "pass", runs)?,
        compare(
            &vmm,
            &image,
            "python3 -c 'import numpy'",
            "import numpy",
            runs,
        )?,
    ];
    let sandbox_us = parse_micros(&sandbox_python(&vmm, &image, ROUND_TRIP_CODE)?.1)?;
    let native_us = parse_micros(&native_python(ROUND_TRIP_CODE)?.1)?;
    Ok(StartupReport {
        machine: Machine::describe(),
        startup,
        syscall_round_trip: RoundTrip {
            syscall: "getppid",
            sandbox_us,
            native_us,
            ratio: sandbox_us / native_us,
        },
    })
}

/// A human-readable table of the report.
pub fn table(report: &StartupReport) -> String {
    let mut out = format!(
        "forkvm bench startup on {} ({} cores, {}, {})\n\n",
        report.machine.cpu, report.machine.cores, report.machine.kvm, report.machine.kernel
    );
    out.push_str(&format!(
        "{:<28} {:>14} {:>14} {:>8}\n",
        "workload", "sandbox p50", "native p50", "ratio"
    ));
    for c in &report.startup {
        out.push_str(&format!(
            "{:<28} {:>11.2} ms {:>11.2} ms {:>7.1}x\n",
            c.workload, c.sandbox.p50_ms, c.native.p50_ms, c.ratio_p50
        ));
    }
    let rt = &report.syscall_round_trip;
    out.push_str(&format!(
        "{:<28} {:>11.2} us {:>11.3} us {:>7.0}x\n",
        format!("syscall round trip ({})", rt.syscall),
        rt.sandbox_us,
        rt.native_us,
        rt.ratio
    ));
    out
}
