//! `forkvm exec`: run code in a fresh fork of a template.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use forkvm_engine::{Engine, ErrorKind, ExecLimits, ExecRequest, ExecResult};
use forkvm_vmm::{PoolConfig, Vmm};
use serde::Serialize;

/// What `forkvm exec` was asked.
pub struct ExecOptions {
    pub template: String,
    pub code: String,
    pub language: String,
    pub timeout: Duration,
    pub cpu_time: Option<Duration>,
    pub memory_mib: Option<u64>,
    pub stdin: Option<PathBuf>,
    pub env: Vec<String>,
    pub json: bool,
}

/// The `--json` form of a result (bytes as UTF-8 with replacement, plus base64-free raw
/// lengths; the HTTP API carries the same fields).
#[derive(Serialize)]
struct JsonResult<'a> {
    stdout: String,
    stderr: String,
    stdout_truncated: bool,
    stderr_truncated: bool,
    exit_code: i32,
    error: JsonError<'a>,
    timings: JsonTimings,
}

#[derive(Serialize)]
struct JsonError<'a> {
    kind: &'static str,
    message: &'a str,
}

#[derive(Serialize)]
struct JsonTimings {
    fork_us: u64,
    exec_us: u64,
    total_us: u64,
}

fn to_json(result: &ExecResult) -> JsonResult<'_> {
    JsonResult {
        stdout: String::from_utf8_lossy(&result.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&result.stderr).into_owned(),
        stdout_truncated: result.stdout_truncated,
        stderr_truncated: result.stderr_truncated,
        exit_code: result.exit_code,
        error: JsonError {
            kind: result.error.kind.as_str(),
            message: &result.error.message,
        },
        timings: JsonTimings {
            fork_us: result.timings.fork_us,
            exec_us: result.timings.exec_us,
            total_us: result.timings.total_us,
        },
    }
}

/// Runs the code and returns the exit status to exit with.
pub fn exec(options: ExecOptions) -> Result<i32> {
    let code = if options.code == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading code from stdin")?;
        buf
    } else {
        options.code.into_bytes()
    };
    let mut request = ExecRequest::python(code);
    request.language = options.language;
    if let Some(path) = &options.stdin {
        request.stdin = std::fs::read(path)
            .with_context(|| format!("reading stdin from {}", path.display()))?;
    }
    for pair in &options.env {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--env {pair:?} is not KEY=VALUE"))?;
        request.env.insert(key.to_string(), value.to_string());
    }
    request.limits = ExecLimits {
        timeout: options.timeout,
        cpu_time: options.cpu_time,
        memory_bytes: options
            .memory_mib
            .map_or(ExecLimits::default().memory_bytes, |m| m << 20),
        ..ExecLimits::default()
    };
    let vmm = Arc::new(Vmm::new()?);
    crate::template::ensure(&options.template, &vmm)?;
    // One exec needs no warm pool: a single inline-prepared VM.
    let engine = Engine::new(
        vmm,
        crate::template::store(),
        PoolConfig {
            size: 0,
            refill_threads: 1,
        },
    );
    let result = engine.exec(&options.template, &request)?;
    if options.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&result))?);
    } else {
        std::io::stdout().write_all(&result.stdout)?;
        std::io::stderr().write_all(&result.stderr)?;
        if result.error.kind != ErrorKind::None {
            eprintln!(
                "forkvm: {}: {}",
                result.error.kind.as_str(),
                result.error.message
            );
        }
    }
    tracing::info!(timings = ?result.timings, "exec finished");
    Ok(result.exit_code)
}
