//! `forkvm exec`: run code in a fresh fork of a template.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use forkvm_protocol::exec::{ErrorKind, ExecLimits, ExecRequest, ExecResult};
use forkvm_protocol::worker::OutputStream;
use forkvm_vmm::PoolConfig;
use forkvm_worker::{Cancellation, Tap};
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
    crate::jailed::prepare(&options.template)?;
    // One jailed worker, with no warm pool: a single inline-prepared VM. Its output is
    // written as it comes unless the whole result is printed as JSON.
    let maxima = request.limits.within(&ExecLimits::maxima());
    let workers = crate::jailed::start(
        &options.template,
        1,
        PoolConfig {
            size: 0,
            refill_threads: 1,
        },
        maxima,
        None,
    )?;
    let tap: Option<Tap> = (!options.json).then(|| {
        Arc::new(|stream, data: &[u8]| {
            let _ = match stream {
                OutputStream::Stdout => std::io::stdout().write_all(data),
                OutputStream::Stderr => std::io::stderr().write_all(data),
            };
        }) as Tap
    });
    let streamed = tap.is_some();
    let result = workers
        .exec(request, tap, None, &Cancellation::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    workers.stop();
    if options.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&result))?);
    } else {
        if !streamed {
            std::io::stdout().write_all(&result.stdout)?;
            std::io::stderr().write_all(&result.stderr)?;
        }
        std::io::stdout().flush()?;
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
