//! The fork engine's front door: templates loaded once and kept warm in pools, and
//! `exec`: fork a template, hand the agent a request, collect output and reply, tear the
//! fork down off the request path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkvm_kernel::{CaptureBuffer, Console, Input};
use forkvm_protocol::{FrameError, Reply, Request};
use forkvm_template::{SnapshotMeta, StoreError, TemplateStore};
use forkvm_vmm::{Pool, PoolConfig, PoolStats, RunResult, Sandbox, SandboxExit, Vmm, VmmError};

/// The request every pooled VM runs before it serves a user's (see `Vmm::warm_up`): it walks
/// the agent's request path and the common first steps of user code, so KVM's shadow page
/// tables already cover them.
pub const WARMUP_CODE: &str = "print(1+1)\nimport json\njson.dumps({'a': [1, 2.5]})\n";

/// Why an exec could not even be attempted (a result that merely failed is an `ExecOutcome`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("encoding the request: {0}")]
    Frame(#[from] FrameError),
    #[error("delivering the request: {0}")]
    Deliver(#[from] forkvm_vmm::SandboxError),
}

/// Limits for one exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecLimits {
    pub timeout: Duration,
    /// Bytes each of stdout and stderr may carry.
    pub output_bytes: u64,
}

impl Default for ExecLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            output_bytes: 1 << 20,
        }
    }
}

/// Where the time of one exec went, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Taking a prepared VM and cloning the process state.
    pub fork_us: u64,
    /// From delivering the request to the agent's reply (or the end of the sandbox).
    pub exec_us: u64,
    pub total_us: u64,
}

/// What running one request produced.
#[derive(Debug, Clone)]
pub struct ExecOutcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The agent's reply, when the code ran to completion.
    pub reply: Option<Reply>,
    /// How the sandbox ended, when it did not come back to the agent (timeout, fault, …).
    pub ended: Option<SandboxExit>,
    pub timings: Timings,
}

impl ExecOutcome {
    /// The exit code the code's process would have had.
    pub fn exit_code(&self) -> i32 {
        match (&self.reply, &self.ended) {
            (Some(reply), _) => reply.exit_code,
            (None, Some(SandboxExit::Exited(code))) => *code,
            (None, Some(SandboxExit::Signaled(signal))) => 128 + signal,
            (None, Some(SandboxExit::Fault(fault))) => 128 + fault.signal,
            _ => -1,
        }
    }
}

/// A template loaded from the store, with its warm pool.
pub struct LoadedTemplate {
    pub meta: SnapshotMeta,
    pub pool: Pool,
}

/// Templates by name, loaded on first use.
pub struct Engine {
    vmm: Arc<Vmm>,
    store: TemplateStore,
    pool_config: PoolConfig,
    loaded: Mutex<HashMap<String, Arc<LoadedTemplate>>>,
}

impl Engine {
    pub fn new(vmm: Arc<Vmm>, store: TemplateStore, pool_config: PoolConfig) -> Engine {
        Engine {
            vmm,
            store,
            pool_config,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    pub fn vmm(&self) -> &Arc<Vmm> {
        &self.vmm
    }

    /// The template `name`, loading (and verifying) it and starting its pool on first use.
    pub fn template(&self, name: &str) -> Result<Arc<LoadedTemplate>, EngineError> {
        let mut loaded = self.loaded.lock().expect("engine lock");
        if let Some(template) = loaded.get(name) {
            return Ok(template.clone());
        }
        let (meta, source) = self.store.load(name, &self.vmm)?;
        let warmup = forkvm_protocol::encode(&Request::code(WARMUP_CODE))?;
        let pool = Pool::start(
            self.vmm.clone(),
            Arc::new(source),
            self.pool_config,
            Some(warmup),
        );
        let template = Arc::new(LoadedTemplate { meta, pool });
        loaded.insert(name.to_string(), template.clone());
        Ok(template)
    }

    /// Pool counters of every loaded template.
    pub fn pool_stats(&self) -> Vec<(String, PoolStats)> {
        let loaded = self.loaded.lock().expect("engine lock");
        let mut stats: Vec<_> = loaded
            .iter()
            .map(|(name, t)| (name.clone(), t.pool.stats()))
            .collect();
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        stats
    }

    /// Runs `request` in a fresh fork of `template`.
    pub fn exec(
        &self,
        template: &str,
        request: &Request,
        limits: ExecLimits,
    ) -> Result<ExecOutcome, EngineError> {
        let started = Instant::now();
        let template = self.template(template)?;
        let frame = forkvm_protocol::encode(request)?;
        let stdout = CaptureBuffer::default();
        let stderr = CaptureBuffer::default();
        let console = Console::new(
            Input::Empty,
            Box::new(stdout.clone()),
            Box::new(stderr.clone()),
            limits.output_bytes,
        );
        let mut sandbox = template.pool.fork(console)?;
        let forked = Instant::now();
        let result = run_request(&mut sandbox, &frame, started + limits.timeout);
        let finished = Instant::now();
        template.pool.release(sandbox);
        let (reply, ended) = result?;
        Ok(ExecOutcome {
            stdout: stdout.take(),
            stderr: stderr.take(),
            reply,
            ended,
            timings: Timings {
                fork_us: micros(forked - started),
                exec_us: micros(finished - forked),
                total_us: micros(finished - started),
            },
        })
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// Delivers one request frame to a parked sandbox and runs it until the agent parks again
/// (its reply is then in the control channel) or the sandbox ends.
pub fn run_request(
    sandbox: &mut Sandbox,
    frame: &[u8],
    deadline: Instant,
) -> Result<(Option<Reply>, Option<SandboxExit>), EngineError> {
    sandbox.deliver_request(frame)?;
    match sandbox.run_until_request(Some(deadline)) {
        RunResult::AwaitingRequest => {
            let bytes = sandbox.process_mut().take_control_output();
            match forkvm_protocol::decode_reply(&bytes) {
                Ok(reply) => Ok((Some(reply), None)),
                Err(e) => Ok((
                    None,
                    Some(SandboxExit::Internal(format!(
                        "unreadable reply from the agent: {e}"
                    ))),
                )),
            }
        }
        RunResult::Ended(exit) => Ok((None, Some(exit))),
    }
}
