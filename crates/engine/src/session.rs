//! Sessions: forks that are kept. The agent runs each request in the session's persistent
//! namespace, files go in and out between requests, and a session can be forked: it is
//! snapshotted where it is parked, and each branch starts from exactly that state.

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_kernel::ProcessState;
use forkvm_kernel::console::Console;
use forkvm_kernel::host_ops::{PlaceError, ReadError};
use forkvm_protocol::worker::{PausedMemory, PausedPart, PausedSession};
use forkvm_template::Runtime;
use forkvm_vmm::suspend::{Part, Suspended, SuspendedMemory};
use forkvm_vmm::{ForkSource, RunResult, Sandbox, VcpuState};

use crate::{Engine, EngineError, ExecRequest, ExecResult, Streams};

/// A live sandbox kept between requests.
pub struct Session {
    sandbox: Sandbox,
    /// What this session's memory is a copy-on-write view of (to fork it).
    source: Arc<ForkSource>,
    /// False once the sandbox ended (the code exited or crashed): it cannot run again.
    alive: bool,
    /// This session's share of the memory layer it was forked from (held for it on the
    /// host, shared with its sibling branches).
    layer_share: u64,
    /// The last measure of `host_bytes`: its value, when, and the mapped bytes then.
    measured: Option<Measure>,
    /// What the session had mapped when it was created (its template's mappings): each
    /// request's memory limit counts from here, so requests cannot add up past it.
    mapped_at_start: u64,
    /// No request has run since the session was created or forked: the next one reseeds
    /// the runtime's random generators.
    fresh_fork: bool,
    /// Its template's runtime (which languages it runs).
    runtime: Runtime,
    /// Its template's source: what pausing stores the session's memory as a layer over.
    template: Arc<ForkSource>,
}

/// A request's place in its session (`Engine::run_in`).
#[derive(Debug, Clone, Copy)]
pub struct InSession {
    /// What the session had mapped when created: its memory limit counts from here.
    pub base: u64,
    /// The session's first request since it was created or forked.
    pub fresh_fork: bool,
}

#[derive(Debug, Clone, Copy)]
struct Measure {
    ram: u64,
    at: Instant,
    mapped: u64,
}

/// A measure of a session's host memory is reused for this long unless its mappings
/// change by more than `REMEASURE_MAPPED`.
const REMEASURE_AFTER: Duration = Duration::from_millis(250);
const REMEASURE_MAPPED: u64 = 1 << 20;

impl Session {
    /// Whether the session can still run code.
    pub fn alive(&self) -> bool {
        self.alive
    }

    /// Writes a file into the session's filesystem.
    pub fn put_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), PlaceError> {
        self.sandbox.process_mut().place_file(path, data, mode)
    }

    /// Reads a file from the session's filesystem (at most `max` bytes).
    pub fn get_file(&self, path: &str, max: u64) -> Result<Vec<u8>, ReadError> {
        self.sandbox.process().read_file(path, max)
    }

    /// Host memory the session holds: its own pages and files (`Process::host_bytes`) and
    /// its share of the layer it was forked from.
    pub fn host_bytes(&self) -> u64 {
        self.sandbox.process().host_bytes() + self.layer_share
    }

    /// `host_bytes`, with its costly part (private guest pages, found by walking the
    /// host's page map of everything mapped: about 0.25 ms for a python session) measured
    /// again only when the last measure is older than 250 ms or the mappings changed by
    /// more than a MiB since, so a busy session's requests do not all pay for it. Memory
    /// written inside unchanged mappings shows within 250 ms; files at once.
    pub fn recent_host_bytes(&mut self) -> u64 {
        let process = self.sandbox.process();
        let mapped = process.mapped_bytes();
        let ram = match self.measured {
            Some(m)
                if m.at.elapsed() < REMEASURE_AFTER
                    && m.mapped.abs_diff(mapped) <= REMEASURE_MAPPED =>
            {
                m.ram
            }
            _ => {
                let ram = process.private_ram_bytes();
                self.measured = Some(Measure {
                    ram,
                    at: Instant::now(),
                    mapped,
                });
                ram
            }
        };
        ram + process.kept_and_file_bytes() + self.layer_share
    }

    /// Takes the sandbox (to tear it down off the request path).
    pub fn into_sandbox(self) -> Sandbox {
        self.sandbox
    }

    /// When (`CLOCK_MONOTONIC` ns) the session next has work between requests: a thread
    /// or process other than the parked agent can run (a past time) or one waits with a
    /// deadline. `None` when nothing can happen before the next request.
    pub fn work_due(&self) -> Option<u64> {
        if !self.alive {
            return None;
        }
        self.sandbox.process().work_between_requests()
    }

    /// Runs the session's other threads and processes for at most `slice` (until none has
    /// anything left to do, if sooner); the agent is parked again afterwards. Output
    /// written meanwhile goes nowhere (nobody is reading it), nor does anything written to
    /// the control channel, so the next request's reply starts clean. Returns false if the
    /// sandbox ended (a background process killed the agent).
    pub fn run_between_requests(&mut self, slice: Duration) -> bool {
        if !self.alive {
            return false;
        }
        match self.sandbox.run_between_requests(Instant::now() + slice) {
            Ok(RunResult::AwaitingRequest) => {
                self.sandbox.process_mut().take_control_output();
            }
            Ok(RunResult::Ended(exit)) => {
                tracing::info!(?exit, "a session ended between requests");
                self.alive = false;
            }
            Err(e) => {
                tracing::error!(error = %e, "running a session between requests");
                self.alive = false;
            }
        }
        self.alive
    }

    /// From now until its next request, the session's output goes nowhere.
    fn detach_console(&mut self) {
        self.sandbox
            .process_mut()
            .replace_console(Console::discarding());
    }
}

impl Engine {
    /// A new session: a fork of `template` kept parked for requests.
    pub fn create_session(&self, template: &str) -> Result<Session, EngineError> {
        let loaded = self.template(template)?;
        let sandbox = loaded.pool.fork(Console::discarding())?;
        let mapped_at_start = sandbox.process().mapped_bytes();
        Ok(Session {
            mapped_at_start,
            sandbox,
            source: loaded.pool.source().clone(),
            alive: true,
            layer_share: 0,
            measured: None,
            fresh_fork: true,
            runtime: loaded.meta.runtime,
            template: loaded.pool.source().clone(),
        })
    }

    /// Runs `request` in the session's namespace. `streams` receive the output (with an
    /// optional tap for streaming); the session keeps its state for the next request.
    pub fn session_exec(
        &self,
        session: &mut Session,
        request: &ExecRequest,
        streams: Streams,
    ) -> Result<ExecResult, EngineError> {
        if !session.alive {
            return Err(EngineError::SessionEnded);
        }
        let limits = request.limits.within(&self.maxima);
        session
            .sandbox
            .process_mut()
            .replace_console(streams.console(request, &limits));
        let started = Instant::now();
        let place = InSession {
            base: session.mapped_at_start,
            fresh_fork: session.fresh_fork,
        };
        let result = self.run_in(
            &mut session.sandbox,
            session.runtime,
            request,
            &streams,
            Some(place),
        );
        session.fresh_fork = false;
        session.detach_console();
        let result = result?;
        session.alive = session.sandbox.parked().is_some();
        let mut result = result;
        result.timings.total_us = started.elapsed().as_micros() as u64;
        Ok(result)
    }

    /// `count` new sessions, each starting from exactly the state `session` has now.
    pub fn fork_session(
        &self,
        session: &mut Session,
        count: usize,
    ) -> Result<Vec<Session>, EngineError> {
        if !session.alive {
            return Err(EngineError::SessionEnded);
        }
        let vmm = self.vmm();
        let source = Arc::new(vmm.snapshot_fork(&mut session.sandbox, &session.source)?);
        let layer_share = source.added_bytes() / count.max(1) as u64;
        let mut branches = Vec::with_capacity(count);
        for _ in 0..count {
            let prepared = vmm.prepare_fork(&source)?;
            let sandbox = vmm.finish_fork(prepared, &source, Console::discarding())?;
            branches.push(Session {
                mapped_at_start: session.mapped_at_start,
                sandbox,
                source: source.clone(),
                alive: true,
                layer_share,
                measured: None,
                fresh_fork: true,
                runtime: session.runtime,
                template: session.template.clone(),
            });
        }
        Ok(branches)
    }
}

/// A paused session's description and its memory files (one per description entry, in
/// order).
pub type Paused = (PausedSession, Vec<File>);

/// The state bytes of `PausedSession`.
#[derive(serde::Serialize, serde::Deserialize)]
struct PausedState {
    vcpu: VcpuState,
    process: ProcessState,
}

fn part_of(part: Part) -> PausedPart {
    match part {
        Part::Main => PausedPart::Main,
        Part::Process(pid) => PausedPart::Process(pid),
        Part::Segment(id) => PausedPart::Segment(id),
    }
}

impl Engine {
    /// The complete state of `session` (parked between requests), as files that hold it
    /// without this process: its memory as layers over its template's. The session is
    /// unchanged; the caller drops it once the state is stored.
    pub fn pause_session(&self, session: &mut Session) -> Result<Paused, EngineError> {
        if !session.alive {
            return Err(EngineError::SessionEnded);
        }
        let suspended = self
            .vmm()
            .suspend(&mut session.sandbox, &session.template)?;
        let state = bincode::serialize(&PausedState {
            vcpu: suspended.vcpu,
            process: suspended.process,
        })
        .map_err(|e| EngineError::Paused(format!("encoding the state: {e}")))?;
        let mut memories = Vec::with_capacity(suspended.memories.len());
        let mut files = Vec::with_capacity(suspended.memories.len());
        for memory in suspended.memories {
            memories.push(PausedMemory {
                part: part_of(memory.part),
                size: memory.size,
                ranges: memory.ranges,
                over_template: memory.over_template,
            });
            files.push(memory.file);
        }
        let paused = PausedSession {
            state,
            mapped_at_start: session.mapped_at_start,
            memories,
        };
        Ok((paused, files))
    }

    /// The session `paused` (from `pause_session`, over template `template`) describes,
    /// running again: every process, file and descriptor as it was, its clock advanced
    /// (guest time follows the host's) and its random generators as they were.
    pub fn resume_session(&self, template: &str, paused: Paused) -> Result<Session, EngineError> {
        let (paused, files) = paused;
        if paused.memories.len() != files.len() {
            return Err(EngineError::Paused(format!(
                "{} memory files for {} described",
                files.len(),
                paused.memories.len()
            )));
        }
        let state: PausedState = bincode::deserialize(&paused.state)
            .map_err(|e| EngineError::Paused(format!("decoding the state: {e}")))?;
        let memories = paused
            .memories
            .into_iter()
            .zip(files)
            .map(|(memory, file)| SuspendedMemory {
                part: match memory.part {
                    PausedPart::Main => Part::Main,
                    PausedPart::Process(pid) => Part::Process(pid),
                    PausedPart::Segment(id) => Part::Segment(id),
                },
                size: memory.size,
                ranges: memory.ranges,
                over_template: memory.over_template,
                file,
            })
            .collect();
        let loaded = self.template(template)?;
        let vmm = self.vmm();
        let suspended = Suspended {
            vcpu: state.vcpu,
            process: state.process,
            memories,
        };
        let source = vmm
            .revive(suspended, loaded.pool.source())
            .map_err(|e| EngineError::Paused(e.to_string()))?;
        let source = Arc::new(source);
        let prepared = vmm.prepare_fork(&source)?;
        let sandbox = vmm.finish_fork(prepared, &source, Console::discarding())?;
        Ok(Session {
            mapped_at_start: paused.mapped_at_start,
            sandbox,
            source,
            alive: true,
            layer_share: 0,
            measured: None,
            fresh_fork: false,
            runtime: loaded.meta.runtime,
            template: loaded.pool.source().clone(),
        })
    }
}
