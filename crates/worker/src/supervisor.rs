//! The server's workers: a fixed number of slots, each kept filled by a supervisor thread
//! that starts a jailed worker, waits for it to die, and starts another. Requests go to a
//! live worker (a tenant's to the same one while it lives, where its recycled VMs are);
//! a session stays in the worker that created it, and is lost with it.

use std::collections::hash_map::DefaultHasher;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use forkvm_protocol::exec::{ExecRequest, ExecResult};
use forkvm_protocol::worker::{
    Answer, Call, Failure, FailureKind, Hello, PausedSession, PoolCounters, SessionHandle,
};

use crate::cgroup::{self, Cgroup};
use crate::client::{Cancellation, Connection, Tap, WorkerError};
use crate::spawn;

/// How the server runs its workers.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The forkvm binary (it runs as `forkvm worker`).
    pub exe: PathBuf,
    pub hello: Hello,
    /// Workers kept running.
    pub count: usize,
    /// Each worker's cgroup limits (`None`: no cgroup).
    pub cgroup: Option<cgroup::Limits>,
}

/// Time a worker may take from start to serving (loading and verifying its template).
const START_PATIENCE: Duration = Duration::from_secs(120);
/// Time a non-execution call (session creation, fork, files) may take.
const CALL_PATIENCE: Duration = Duration::from_secs(120);
/// Added to an execution's own time limit before its worker counts as stuck.
const EXEC_GRACE: Duration = Duration::from_secs(30);

struct Slot {
    current: Mutex<Option<Arc<Connection>>>,
    /// Signalled when `current` changes.
    changed: Condvar,
    /// Set once the slot's first start has succeeded or failed.
    started: Mutex<Option<Result<(), String>>>,
}

/// The server's workers.
pub struct Workers {
    slots: Vec<Arc<Slot>>,
    restarts: Arc<AtomicU64>,
    shutdown: Arc<AtomicBool>,
    next_session: AtomicUsize,
}

fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        let why = match signal {
            libc::SIGSYS => " (a system call outside its seccomp allowlist)",
            libc::SIGKILL => " (killed: out of memory in its cgroup, or by an operator)",
            _ => "",
        };
        format!("killed by signal {signal}{why}")
    } else {
        format!("ended with wait status {status:#x}")
    }
}

/// Waits for `pid` to end and returns its wait status.
fn reap(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid
            || (r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
        {
            return status;
        }
    }
}

/// Starts one worker: spawned in its namespaces, placed in its cgroup, greeted.
fn launch(config: &WorkerConfig, name: &str) -> Result<(Arc<Connection>, Option<Cgroup>), String> {
    let spawned = spawn::spawn(&config.exe).map_err(|e| format!("starting a worker: {e}"))?;
    let pid = spawned.pid;
    let cgroup = config.cgroup.as_ref().and_then(|limits| {
        match Cgroup::create(name, limits).and_then(|c| {
            c.add(pid).map_err(|e| e.to_string())?;
            Ok(c)
        }) {
            Ok(cgroup) => {
                tracing::debug!(pid, cgroup = %cgroup.describe(), "worker cgroup");
                Some(cgroup)
            }
            Err(e) => {
                static WARNED: AtomicBool = AtomicBool::new(false);
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "workers run without a cgroup");
                    eprintln!("forkvm: warning: workers run without a cgroup: {e}");
                }
                None
            }
        }
    });
    match Connection::open(spawned, &config.hello, START_PATIENCE) {
        Ok(connection) => Ok((connection, cgroup)),
        Err(message) => {
            // SAFETY: kill and reap our own child, which failed to start.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap(pid);
            Err(message)
        }
    }
}

impl Workers {
    /// Starts `config.count` workers and waits until each serves; fails if the first start
    /// of any fails (its template cannot load, say), stopping the others.
    pub fn start(config: WorkerConfig) -> Result<Arc<Workers>, String> {
        let config = Arc::new(config);
        let workers = Arc::new(Workers {
            slots: (0..config.count.max(1))
                .map(|_| {
                    Arc::new(Slot {
                        current: Mutex::new(None),
                        changed: Condvar::new(),
                        started: Mutex::new(None),
                    })
                })
                .collect(),
            restarts: Arc::new(AtomicU64::new(0)),
            shutdown: Arc::new(AtomicBool::new(false)),
            next_session: AtomicUsize::new(0),
        });
        for (index, slot) in workers.slots.iter().enumerate() {
            let slot = slot.clone();
            let config = config.clone();
            let restarts = workers.restarts.clone();
            let shutdown = workers.shutdown.clone();
            std::thread::Builder::new()
                .name(format!("forkvm-supervise-{index}"))
                .spawn(move || supervise(index, &slot, &config, &restarts, &shutdown))
                .map_err(|e| e.to_string())?;
        }
        for slot in &workers.slots {
            let mut started = slot.started.lock().expect("slot lock");
            while started.is_none() {
                started = slot.changed.wait(started).expect("slot lock");
            }
            if let Some(Err(message)) = started.as_ref() {
                let message = message.clone();
                drop(started);
                workers.stop();
                return Err(message);
            }
        }
        Ok(workers)
    }

    /// Stops every worker and their supervisors.
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for pid in self.pids() {
            // SAFETY: kill our own children; their supervisors reap them.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Host PIDs of the live workers.
    pub fn pids(&self) -> Vec<libc::pid_t> {
        self.live().iter().map(|c| c.pid()).collect()
    }

    fn live(&self) -> Vec<Arc<Connection>> {
        self.slots
            .iter()
            .filter_map(|s| s.current.lock().expect("slot lock").clone())
            .filter(|c| c.alive())
            .collect()
    }

    /// Workers replaced since the start.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Guest RAM of the template served (once a worker runs).
    pub fn ram_bytes(&self) -> Option<u64> {
        self.live().first().map(|c| c.ram_bytes())
    }

    /// A live worker, preferring slot `preferred`; waits a little for a replacement if
    /// none is live.
    fn pick(&self, preferred: usize) -> Result<Arc<Connection>, WorkerError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for offset in 0..self.slots.len() {
                let slot = &self.slots[(preferred + offset) % self.slots.len()];
                if let Some(c) = slot.current.lock().expect("slot lock").as_ref()
                    && c.alive()
                {
                    return Ok(c.clone());
                }
            }
            if self.shutdown.load(Ordering::Relaxed) || Instant::now() >= deadline {
                return Err(WorkerError::Unavailable(
                    "every worker is down or restarting".into(),
                ));
            }
            let slot = &self.slots[preferred % self.slots.len()];
            let guard = slot.current.lock().expect("slot lock");
            let _ = slot
                .changed
                .wait_timeout(guard, Duration::from_millis(100))
                .expect("slot lock");
        }
    }

    /// Pool counters summed over the live workers.
    pub fn pool(&self) -> PoolCounters {
        let mut total = PoolCounters::default();
        for connection in self.live() {
            if let Ok(Answer::Stats(c)) = connection.call(Call::Stats, None, Duration::from_secs(5))
            {
                total.depth += c.depth;
                total.forks += c.forks;
                total.misses += c.misses;
                total.prepared += c.prepared;
            }
        }
        total
    }

    /// Runs `request` in a fresh sandbox (`tenant`'s recycled VM where there is one),
    /// handing output to `tap` as it comes when one is given; `cancel` ends it early.
    pub fn exec(
        &self,
        request: ExecRequest,
        tap: Option<Tap>,
        tenant: Option<&str>,
        cancel: &Cancellation,
    ) -> Result<ExecResult, WorkerError> {
        let preferred = tenant.map_or(0, |t| {
            let mut hasher = DefaultHasher::new();
            t.hash(&mut hasher);
            hasher.finish() as usize
        });
        let connection = self.pick(preferred)?;
        let patience = request.limits.timeout + EXEC_GRACE;
        let call = Call::Exec {
            request,
            tenant: tenant.map(String::from),
            stream: tap.is_some(),
        };
        match connection.call_cancellable(call, tap.as_ref(), patience, cancel)? {
            Answer::Executed { result, .. } => Ok(*result),
            other => Err(unexpected(&other)),
        }
    }

    /// A new session, in the next worker in turn.
    pub fn create_session(&self) -> Result<RemoteSession, WorkerError> {
        let connection = self.pick(self.next_session.fetch_add(1, Ordering::Relaxed))?;
        match connection.call(Call::CreateSession, None, CALL_PATIENCE)? {
            Answer::Session { handle, host_bytes } => {
                Ok(RemoteSession::new(connection, handle, host_bytes))
            }
            other => Err(unexpected(&other)),
        }
    }
}

impl Workers {
    /// A session from a paused state (its memory files opened read-only), in the next
    /// worker in turn.
    pub fn resume_session(
        &self,
        paused: PausedSession,
        files: &[File],
    ) -> Result<RemoteSession, WorkerError> {
        let connection = self.pick(self.next_session.fetch_add(1, Ordering::Relaxed))?;
        let fds: Vec<_> = files.iter().map(AsFd::as_fd).collect();
        let call = Call::ResumeSession { paused };
        match connection.call_with_files(call, &fds, CALL_PATIENCE)? {
            (Answer::Session { handle, host_bytes }, _) => {
                Ok(RemoteSession::new(connection, handle, host_bytes))
            }
            (other, _) => Err(unexpected(&other)),
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn unexpected(answer: &Answer) -> WorkerError {
    let kind = match answer {
        Answer::Executed { .. } => "an execution",
        Answer::Session { .. } => "a session",
        Answer::Sessions(_) => "sessions",
        Answer::Done => "done",
        Answer::File(_) => "a file",
        Answer::Stats(_) => "stats",
        Answer::Paused(_) => "a paused session",
    };
    WorkerError::Failed(Failure {
        kind: FailureKind::Internal,
        message: format!("the worker answered with {kind} where it should not"),
    })
}

fn supervise(
    index: usize,
    slot: &Slot,
    config: &WorkerConfig,
    restarts: &AtomicU64,
    shutdown: &AtomicBool,
) {
    let mut backoff = Duration::from_millis(100);
    for generation in 0u64.. {
        if shutdown.load(Ordering::SeqCst) {
            return;
        }
        // Unique in this process: every template's workers are numbered from 0, and a
        // shared name made the second template's workers run without a cgroup.
        static LAUNCHES: AtomicU64 = AtomicU64::new(0);
        let launch_number = LAUNCHES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{launch_number}", std::process::id());
        tracing::debug!(index, generation, name, "launching a worker");
        let began = Instant::now();
        let launched = launch(config, &name);
        {
            let mut started = slot.started.lock().expect("slot lock");
            if started.is_none() {
                *started = Some(launched.as_ref().map(|_| ()).map_err(Clone::clone));
            }
        }
        let (connection, cgroup) = match launched {
            Ok(launched) => launched,
            Err(message) => {
                tracing::error!(slot = index, error = %message, "worker failed to start");
                slot.changed.notify_all();
                if generation == 0 {
                    return;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let pid = connection.pid();
        tracing::info!(slot = index, pid, "worker serving");
        *slot.current.lock().expect("slot lock") = Some(connection.clone());
        slot.changed.notify_all();

        let status = reap(pid);
        let why = describe_status(status);
        connection.fail(why.clone());
        *slot.current.lock().expect("slot lock") = None;
        drop(cgroup);
        if shutdown.load(Ordering::SeqCst) {
            return;
        }
        restarts.fetch_add(1, Ordering::Relaxed);
        tracing::error!(slot = index, pid, status = %why, "worker died; starting another");
        eprintln!("forkvm: worker {pid} {why}; starting another");
        if began.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        } else {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

/// A session living in one worker.
pub struct RemoteSession {
    connection: Arc<Connection>,
    handle: SessionHandle,
    alive: bool,
    /// Host memory it held when last measured, plus files put since.
    host_bytes: u64,
}

impl RemoteSession {
    fn new(connection: Arc<Connection>, handle: SessionHandle, host_bytes: u64) -> RemoteSession {
        RemoteSession {
            connection,
            handle,
            alive: true,
            host_bytes,
        }
    }

    /// Host memory the session holds (as of its last call).
    pub fn host_bytes(&self) -> u64 {
        self.host_bytes
    }

    /// Whether the session can still run code (its code has not ended, its worker lives).
    pub fn alive(&self) -> bool {
        self.alive && self.connection.alive()
    }

    fn call(&mut self, call: Call, patience: Duration) -> Result<Answer, WorkerError> {
        self.connection.call(call, None, patience).inspect_err(|e| {
            if matches!(e, WorkerError::Gone(_) | WorkerError::Unresponsive(_)) {
                self.alive = false;
            }
        })
    }

    /// Runs `request` in the session's namespace; `cancel` ends it early.
    pub fn exec(
        &mut self,
        request: ExecRequest,
        tap: Option<Tap>,
        cancel: &Cancellation,
    ) -> Result<ExecResult, WorkerError> {
        let patience = request.limits.timeout + EXEC_GRACE;
        let call = Call::SessionExec {
            session: self.handle,
            request,
            stream: tap.is_some(),
        };
        let answer = self
            .connection
            .call_cancellable(call, tap.as_ref(), patience, cancel);
        match answer {
            Ok(Answer::Executed {
                result,
                session_alive,
                host_bytes,
            }) => {
                self.alive = session_alive;
                self.host_bytes = host_bytes;
                Ok(*result)
            }
            Ok(other) => Err(unexpected(&other)),
            Err(e) => {
                if matches!(e, WorkerError::Gone(_) | WorkerError::Unresponsive(_)) {
                    self.alive = false;
                }
                Err(e)
            }
        }
    }

    /// `count` new sessions (in the same worker) from this one's current state.
    pub fn fork(&mut self, count: usize) -> Result<Vec<RemoteSession>, WorkerError> {
        let call = Call::ForkSession {
            session: self.handle,
            count,
        };
        match self.call(call, CALL_PATIENCE)? {
            Answer::Sessions(handles) => Ok(handles
                .into_iter()
                .map(|(h, bytes)| RemoteSession::new(self.connection.clone(), h, bytes))
                .collect()),
            other => Err(unexpected(&other)),
        }
    }

    pub fn put_file(&mut self, path: &str, data: Vec<u8>, mode: u32) -> Result<(), WorkerError> {
        self.host_bytes += data.len() as u64;
        let call = Call::PutFile {
            session: self.handle,
            path: path.to_string(),
            data,
            mode,
        };
        match self.call(call, CALL_PATIENCE)? {
            Answer::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// The session's complete state and its memory files (see `Engine::pause_session`); the
    /// session runs on (drop it once the state is stored).
    pub fn pause(&mut self) -> Result<(PausedSession, Vec<File>), WorkerError> {
        self.connection.pause_session(self.handle).inspect_err(|e| {
            if matches!(e, WorkerError::Gone(_) | WorkerError::Unresponsive(_)) {
                self.alive = false;
            }
        })
    }

    pub fn get_file(&mut self, path: &str, max: u64) -> Result<Vec<u8>, WorkerError> {
        let call = Call::GetFile {
            session: self.handle,
            path: path.to_string(),
            max,
        };
        match self.call(call, CALL_PATIENCE)? {
            Answer::File(data) if data.len() as u64 <= max => Ok(data),
            other => Err(unexpected(&other)),
        }
    }
}

impl Drop for RemoteSession {
    /// The worker tears the sandbox down; nobody waits for it.
    fn drop(&mut self) {
        if self.connection.alive() {
            self.connection.send_only(Call::DropSession {
                session: self.handle,
            });
        }
    }
}
