//! The fork engine's front door: templates loaded once and kept warm in pools, and `exec`:
//! fork a template, place the request's files, set its limits, hand the agent the code,
//! collect output and reply, classify how it ended, and tear the fork down off the
//! request path.

pub mod recycle;
pub mod result;
pub mod session;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkvm_kernel::file::Stream;
use forkvm_kernel::host_ops::PlaceError;
use forkvm_kernel::{CaptureBuffer, Console, Input};
use forkvm_protocol::{FrameError, Reply, Request};
use forkvm_template::{Runtime, SnapshotMeta, StoreError, TemplateStore};
use forkvm_vmm::{
    Cancel, ForkSource, Pool, PoolConfig, PoolStats, RunResult, Sandbox, SandboxExit, Vmm, VmmError,
};

pub use forkvm_protocol::exec::{
    ErrorKind, ExecError, ExecLimits, ExecRequest, ExecResult, FileIn, LANGUAGES, Timings,
};
pub use recycle::{RecycleConfig, Recycler};
pub use session::{InSession, Paused, Session};

/// `WARMUP_CODE` for Node.js templates.
pub const NODE_WARMUP_CODE: &str = "\
console.log(1+1);
JSON.stringify({ a: [1, 2.5], b: Array.from({ length: 1000 }, (_, i) => i) });
const fs = require('fs');
fs.writeFileSync('/tmp/.forkvm-warmup', 'x'.repeat(4096));
fs.readFileSync('/tmp/.forkvm-warmup', 'utf8').split('').sort().join('');
fs.unlinkSync('/tmp/.forkvm-warmup');
require('typescript').transpileModule('const n: number = 1;', {});
";

/// The request every pooled VM runs before it serves a user's (see `Vmm::warm_up`): it walks
/// the agent's request path and the common first steps of user code, so KVM's shadow page
/// tables already cover them.
pub const WARMUP_CODE: &str = "\
print(1+1)
import json
json.dumps({'a': [1, 2.5], 'b': list(range(1000))})
import sys
if 'numpy' in sys.modules:
    import numpy
    a = numpy.random.rand(64, 64)
    (a @ a).sum()
";

/// Why a request could not be run at all (one that ran and failed is an `ExecResult`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unsupported language {language:?} in this template (it runs: {})", runs.join(", "))]
    UnsupportedLanguage {
        language: String,
        runs: &'static [&'static str],
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("encoding the request: {0}")]
    Frame(#[from] FrameError),
    #[error("delivering the request: {0}")]
    Deliver(#[from] forkvm_vmm::SandboxError),
    #[error("placing a file: {0}")]
    PlaceFile(#[from] PlaceError),
    #[error("the working directory cannot be made: {0}")]
    BadCwd(PlaceError),
    #[error("the session has ended (its code exited or crashed); create a new one")]
    SessionEnded,
    #[error("the paused session cannot be resumed: {0}")]
    Paused(String),
}

/// A template loaded from the store, with its warm pool and its per-tenant recycled VMs.
pub struct LoadedTemplate {
    pub meta: SnapshotMeta,
    pub pool: Pool,
    pub recycler: Recycler,
}

/// Templates by name, loaded on first use, and the limits operators allow.
pub struct Engine {
    vmm: Arc<Vmm>,
    store: TemplateStore,
    pool_config: PoolConfig,
    maxima: ExecLimits,
    loaded: Mutex<HashMap<String, Arc<LoadedTemplate>>>,
}

impl Engine {
    pub fn new(vmm: Arc<Vmm>, store: TemplateStore, pool_config: PoolConfig) -> Engine {
        Engine {
            vmm,
            store,
            pool_config,
            maxima: ExecLimits::maxima(),
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// Sets the largest limits a request may ask for.
    pub fn with_maxima(mut self, maxima: ExecLimits) -> Engine {
        self.maxima = maxima;
        self
    }

    pub fn vmm(&self) -> &Arc<Vmm> {
        &self.vmm
    }

    pub fn maxima(&self) -> &ExecLimits {
        &self.maxima
    }

    /// The template `name`, loading (and verifying) it and starting its pool on first use.
    pub fn template(&self, name: &str) -> Result<Arc<LoadedTemplate>, EngineError> {
        if let Some(template) = self.loaded.lock().expect("engine lock").get(name) {
            return Ok(template.clone());
        }
        let opened = self.open_template(name)?;
        self.start_template(name, opened)
    }

    /// Loads and verifies template `name` and locks its image in memory, without starting
    /// anything (a worker does this while it may still lock memory).
    pub fn open_template(&self, name: &str) -> Result<(SnapshotMeta, ForkSource), EngineError> {
        let (meta, source) = self.store.load(name, &self.vmm)?;
        if let Err(e) = source.image.lock_in_memory() {
            tracing::warn!(error = %e, "could not lock the image in memory; imports may wait for the disk");
        }
        Ok((meta, source))
    }

    /// Starts the pool of an opened template and makes it the one `name` serves (unless
    /// another thread got there first).
    pub fn start_template(
        &self,
        name: &str,
        (meta, source): (SnapshotMeta, ForkSource),
    ) -> Result<Arc<LoadedTemplate>, EngineError> {
        let mut loaded = self.loaded.lock().expect("engine lock");
        if let Some(template) = loaded.get(name) {
            return Ok(template.clone());
        }
        let warmup = forkvm_protocol::encode(&Request::code(match meta.runtime {
            Runtime::Python => WARMUP_CODE,
            Runtime::Node => NODE_WARMUP_CODE,
        }))?;
        let source = Arc::new(source);
        let pool = Pool::start(
            self.vmm.clone(),
            source.clone(),
            self.pool_config,
            Some(warmup),
        );
        let recycler = Recycler::start(self.vmm.clone(), source, RecycleConfig::default());
        let template = Arc::new(LoadedTemplate {
            meta,
            pool,
            recycler,
        });
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

    /// Runs `request` in a fresh fork of `template`; the fork is torn down afterwards.
    pub fn exec(&self, template: &str, request: &ExecRequest) -> Result<ExecResult, EngineError> {
        self.exec_with(template, request, Streams::new(), None)
    }

    /// `exec`, with output captured by `streams` (which may tap it for streaming). With a
    /// `tenant`, the VM may be one this tenant's earlier request used (reset exactly to the
    /// snapshot), and it is kept for the tenant's next request if it ended cleanly.
    pub fn exec_with(
        &self,
        template: &str,
        request: &ExecRequest,
        streams: Streams,
        tenant: Option<&str>,
    ) -> Result<ExecResult, EngineError> {
        let started = Instant::now();
        let template = self.template(template)?;
        let runtime = template.meta.runtime;
        resolve_language(runtime, &request.language)?;
        let console = streams.console(request, &request.limits.within(&self.maxima));
        let recycled = tenant.and_then(|t| template.recycler.take(t));
        let mut sandbox = match recycled {
            Some(vm) => self.vmm.finish_fork(vm, template.pool.source(), console)?,
            None => template.pool.fork(console)?,
        };
        let fork_time = started.elapsed();
        let result = self.run_in(&mut sandbox, runtime, request, &streams, None);
        match tenant {
            // Only a sandbox parked cleanly at its next request is worth resetting.
            Some(tenant) if sandbox.parked().is_some() => {
                if let Some(sandbox) = template.recycler.give_back(tenant, sandbox) {
                    template.pool.release(sandbox);
                }
            }
            _ => template.pool.release(sandbox),
        }
        let mut result = result?;
        result.timings.fork_us = micros(fork_time);
        result.timings.total_us = micros(started.elapsed());
        Ok(result)
    }

    /// Runs `request` in `sandbox` (parked on its control channel), whose console writes to
    /// `streams`. With `session`, the code runs in the agent's persistent namespace and its
    /// memory limit counts from what the session had mapped when created; without, the
    /// sandbox is a fresh fork. The sandbox is parked again afterwards unless it ended.
    pub fn run_in(
        &self,
        sandbox: &mut Sandbox,
        runtime: Runtime,
        request: &ExecRequest,
        streams: &Streams,
        session: Option<InSession>,
    ) -> Result<ExecResult, EngineError> {
        let keep_namespace = session.is_some();
        let session_base = session.map(|s| s.base);
        let fresh_fork = session.is_none_or(|s| s.fresh_fork);
        let language = resolve_language(runtime, &request.language)?;
        let limits = request.limits.within(&self.maxima);
        let started = Instant::now();
        let process = sandbox.process_mut();
        if let Some(cwd) = &request.cwd {
            // Made here, where a file in the way is a clear error, not an agent traceback.
            process.make_dirs(cwd).map_err(EngineError::BadCwd)?;
        }
        for file in &request.files {
            process.place_file(&request.absolute(&file.path), &file.data, file.mode)?;
        }
        if fresh_fork {
            // A new pid, as a fork gets: libraries that detect forks by it reseed.
            process.renumber_for_fork();
        }
        let base = session_base.unwrap_or_else(|| process.mapped_bytes());
        process.limit_memory(base, limits.memory_bytes);
        process.limit_open_files(limits.open_files);
        sandbox.set_cpu_limit(limits.cpu_time);
        let frame = forkvm_protocol::encode(&Request {
            v: forkvm_protocol::VERSION,
            code: request.code.clone(),
            env: request.env.clone(),
            cwd: request.cwd.clone(),
            keep_namespace,
            language,
            fresh_fork,
        })?;
        sandbox.set_cancel(streams.cancel.clone());
        let ran = run_request(sandbox, &frame, started + limits.timeout);
        sandbox.set_cancel(None);
        let (reply, ended) = ran?;
        let process = sandbox.process();
        let unsupported = process.stats().unsupported.clone();
        let (exit_code, error, truncated) = result::classify(&result::Ending {
            reply,
            ended,
            memory_refusals: process.memory_limit_refusals(),
            unsupported: &unsupported,
            limits: &limits,
        });
        let exec_us = micros(started.elapsed());
        Ok(ExecResult {
            stdout: streams.stdout.take(),
            stderr: streams.stderr.take(),
            stdout_truncated: truncated == Some(Stream::Stdout),
            stderr_truncated: truncated == Some(Stream::Stderr),
            exit_code,
            error,
            timings: Timings {
                fork_us: 0,
                exec_us,
                total_us: exec_us,
                queue_us: 0,
            },
            unsupported_syscalls: unsupported
                .iter()
                .map(|(name, n)| (name.to_string(), *n))
                .collect(),
        })
    }
}

/// The language the agent of a `runtime` template is told to run for `requested`: the
/// runtime's own when empty, `javascript` for its alias `node`.
fn resolve_language(runtime: Runtime, requested: &str) -> Result<String, EngineError> {
    let runs = runtime.languages();
    match requested {
        "" => Ok(runs[0].to_string()),
        "node" if runs.contains(&"javascript") => Ok("javascript".to_string()),
        language if runs.contains(&language) => Ok(language.to_string()),
        language => Err(EngineError::UnsupportedLanguage {
            language: language.to_string(),
            runs,
        }),
    }
}

/// Called with every chunk of output as the sandbox writes it (for streaming).
pub type Tap = Arc<dyn Fn(Stream, &[u8]) + Send + Sync>;

/// The buffers a sandbox's stdout and stderr are captured into, an optional tap, and an
/// optional cancellation (the client waiting for them went away).
#[derive(Clone, Default)]
pub struct Streams {
    pub stdout: CaptureBuffer,
    pub stderr: CaptureBuffer,
    tap: Option<Tap>,
    cancel: Option<Cancel>,
}

impl Streams {
    pub fn new() -> Streams {
        Streams::default()
    }

    /// Streams that also hand every chunk to `tap` as it is written.
    pub fn with_tap(tap: Tap) -> Streams {
        Streams {
            tap: Some(tap),
            ..Streams::default()
        }
    }

    /// The same streams, whose run `cancel` can end early.
    pub fn with_cancel(mut self, cancel: Cancel) -> Streams {
        self.cancel = Some(cancel);
        self
    }

    /// A console writing to these buffers, reading the request's stdin, capped by `limits`.
    pub fn console(&self, request: &ExecRequest, limits: &ExecLimits) -> Console {
        let writer = |buffer: &CaptureBuffer, stream| -> Box<dyn Write + Send> {
            Box::new(TapWriter {
                buffer: buffer.clone(),
                stream,
                tap: self.tap.clone(),
            })
        };
        Console::new(
            Input::Bytes {
                data: request.stdin.clone(),
                pos: 0,
            },
            writer(&self.stdout, Stream::Stdout),
            writer(&self.stderr, Stream::Stderr),
            limits.output_bytes,
        )
    }
}

/// Captures a stream and hands each chunk to the tap.
struct TapWriter {
    buffer: CaptureBuffer,
    stream: Stream,
    tap: Option<Tap>,
}

impl Write for TapWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Some(tap) = &self.tap {
            tap(self.stream, data);
        }
        self.buffer.write(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
