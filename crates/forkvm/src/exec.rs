//! `forkvm exec`: run code in a fresh fork of a template.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use forkvm_engine::{Engine, ExecLimits};
use forkvm_protocol::Request;
use forkvm_vmm::{PoolConfig, SandboxExit, Vmm};

/// Runs `code` (or stdin when `-`) and returns the exit status to exit with.
pub fn exec(template: &str, code: &str, timeout: Duration) -> Result<i32> {
    let code = if code == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading code from stdin")?;
        buf
    } else {
        code.as_bytes().to_vec()
    };
    let vmm = Arc::new(Vmm::new()?);
    // One exec needs no warm pool: a single inline-prepared VM.
    let engine = Engine::new(
        vmm,
        crate::template::store(),
        PoolConfig {
            size: 0,
            refill_threads: 1,
        },
    );
    let outcome = engine.exec(
        template,
        &Request::code(code),
        ExecLimits {
            timeout,
            ..ExecLimits::default()
        },
    )?;
    std::io::stdout().write_all(&outcome.stdout)?;
    std::io::stderr().write_all(&outcome.stderr)?;
    if let Some(ended) = &outcome.ended {
        match ended {
            SandboxExit::Timeout => eprintln!("forkvm: timeout after {} s", timeout.as_secs_f64()),
            other => eprintln!("forkvm: sandbox ended: {other:?}"),
        }
    }
    tracing::info!(timings = ?outcome.timings, agent_exec_ns = outcome.reply.as_ref().map(|r| r.exec_ns), "exec finished");
    Ok(outcome.exit_code())
}
