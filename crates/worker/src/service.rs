//! The worker process: `forkvm worker`. It reads its `Hello`, jails itself, loads its
//! template, installs its seccomp filter, and then serves the server's calls on its socket
//! until the server closes it. Each call runs on a thread of its own; a session's calls are
//! serialized by the session's lock.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use forkvm_engine::{Engine, EngineError, Session, Streams};
use forkvm_kernel::host_ops::ReadError;
use forkvm_protocol::files::{FileReader, write_frame_with_files};
use forkvm_protocol::worker::{
    Answer, Call, CallFrame, Event, Failure, FailureKind, Hello, PoolCounters, Ready, RunProgram,
    SessionHandle, Start, WireError, read_frame, write_frame,
};
use forkvm_template::TemplateStore;
use forkvm_vmm::{Cancel, SandboxError, VmmError};
use forkvm_vmm::{PoolConfig, Vmm};

use crate::between::{self, Wakeup};
use crate::jail;
use crate::output::Windows;

/// The socket end shared by every thread that answers.
pub(crate) type Writer = Arc<Mutex<UnixStream>>;

/// The worker's life: reads what it is for on `socket`, then serves calls until the server
/// closes the socket, or runs one program with `run_program` (which jails itself first).
/// Returns the process exit status.
pub fn run(socket: UnixStream, run_program: impl FnOnce(RunProgram) -> i32) -> i32 {
    let mut reader = match socket.try_clone() {
        Ok(reader) => reader,
        Err(e) => {
            eprintln!("forkvm worker: cloning the socket: {e}");
            return 1;
        }
    };
    let hello = match read_frame(&mut reader) {
        Ok(Start::Serve(hello)) => hello,
        Ok(Start::Run(program)) => return run_program(program),
        Err(e) => {
            eprintln!("forkvm worker: reading what to do: {e}");
            return 1;
        }
    };
    let writer: Writer = Arc::new(Mutex::new(socket));
    let (engine, ram_bytes) = match start(&hello) {
        Ok(started) => started,
        Err(message) => {
            let _ = write_frame(
                &mut *writer.lock().expect("writer lock"),
                &Ready::Failed { message },
            );
            return 1;
        }
    };
    if write_frame(
        &mut *writer.lock().expect("writer lock"),
        &Ready::Serving { ram_bytes },
    )
    .is_err()
    {
        return 1;
    }
    let worker = Arc::new(Worker {
        engine,
        template: hello.template,
        sessions: Mutex::new(HashMap::new()),
        next_session: AtomicU64::new(1),
        writer,
        wakeup: Arc::new(Wakeup::default()),
        windows: Windows::default(),
        running: Mutex::new(HashMap::new()),
    });
    let driver = worker.clone();
    let started = std::thread::Builder::new()
        .name("forkvm-between".into())
        .spawn(move || between::drive(|| driver.live_sessions(), &driver.wakeup));
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start the thread that runs sessions between requests");
        return 1;
    }
    serve_calls(
        &worker,
        &Arc::new(Readers {
            socket: Mutex::new(FileReader::new(reader)),
            free: AtomicUsize::new(1),
        }),
    )
}

/// The socket, read by one thread at a time (leader/follower): the thread that reads a call
/// hands reading on to a free thread, starting one when none is free, and runs the call
/// itself. A call so starts on the thread that read it, with no hand-off on its path, and
/// no call ever waits for another to end.
struct Readers {
    socket: Mutex<FileReader>,
    /// Threads not running a call (reading, or waiting to read).
    free: AtomicUsize,
}

/// One reading thread's life; returns the exit status when the server closes the socket.
fn serve_calls(worker: &Arc<Worker>, readers: &Arc<Readers>) -> i32 {
    loop {
        let (frame, files) = {
            let mut socket = readers.socket.lock().expect("socket lock");
            (read_frame::<CallFrame>(&mut *socket), socket.take_files())
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(WireError::Closed) => std::process::exit(0),
            Err(e) => {
                tracing::error!(error = %e, "unreadable call from the server; stopping");
                std::process::exit(1);
            }
        };
        // Flow control is served here, at once: it never waits, and the call it paces may
        // be waiting for it.
        match frame.call {
            Call::OutputTaken { call } => {
                worker.windows.taken(call);
                continue;
            }
            Call::Cancel { call } => {
                worker.cancel(call);
                continue;
            }
            _ => {}
        }
        if readers.free.fetch_sub(1, Ordering::SeqCst) == 1 {
            readers.free.fetch_add(1, Ordering::SeqCst);
            let (worker, next) = (worker.clone(), readers.clone());
            let started = std::thread::Builder::new()
                .name("forkvm-call".into())
                .spawn(move || serve_calls(&worker, &next));
            if let Err(e) = started {
                readers.free.fetch_sub(1, Ordering::SeqCst);
                tracing::error!(error = %e, "cannot start a call thread");
            }
        }
        worker.run_call(frame, files);
        readers.free.fetch_add(1, Ordering::SeqCst);
    }
}

/// Jails the process, opens KVM, drops privileges, installs the filter, and loads the
/// template (whose pool then starts warming VMs under the filter).
fn start(hello: &Hello) -> Result<(Arc<Engine>, u64), String> {
    let cache_dir = Path::new(&hello.cache_dir);
    let store = TemplateStore::new(cache_dir);
    jail::enter(&jail::Paths::for_template(&store, &hello.template)?)
        .map_err(|e| format!("entering the jail: {e}"))?;
    let vmm = Arc::new(Vmm::new().map_err(|e| format!("opening KVM: {e}"))?);
    let pool = PoolConfig {
        size: hello.pool_depth,
        refill_threads: hello.pool_threads.max(1),
    };
    let engine = Arc::new(Engine::new(vmm, store, pool).with_maxima(hello.maxima));
    // Opened (and its image locked in memory) while the worker still may; started (its
    // pool warming VMs on threads of its own) only under the filter.
    let opened = engine
        .open_template(&hello.template)
        .map_err(|e| format!("loading template {:?}: {e}", hello.template))?;
    jail::drop_privileges().map_err(|e| format!("dropping privileges: {e}"))?;
    crate::seccomp::install().map_err(|e| format!("installing the seccomp filter: {e}"))?;
    let loaded = engine
        .start_template(&hello.template, opened)
        .map_err(|e| format!("starting template {:?}: {e}", hello.template))?;
    Ok((engine.clone(), loaded.meta.ram_bytes))
}

/// A call's answer and the files that go with it.
struct Reply {
    answer: Answer,
    files: Vec<File>,
}

struct Worker {
    engine: Arc<Engine>,
    template: String,
    sessions: Mutex<HashMap<SessionHandle, Arc<Mutex<Session>>>>,
    next_session: AtomicU64,
    writer: Writer,
    /// Tells the thread that runs sessions between requests to look again.
    wakeup: Arc<Wakeup>,
    /// The output windows of the calls streaming now.
    windows: Windows,
    /// How to end each execution running now, by call id.
    running: Mutex<HashMap<u64, Cancel>>,
}

/// How long past its own deadline a request's output may wait for the server.
const OUTPUT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

fn failure(kind: FailureKind, message: impl Into<String>) -> Failure {
    Failure {
        kind,
        message: message.into(),
    }
}

fn engine_failure(error: EngineError) -> Failure {
    let kind = match &error {
        EngineError::UnsupportedLanguage { .. } => FailureKind::UnsupportedLanguage,
        EngineError::SessionEnded => FailureKind::SessionEnded,
        EngineError::Store(_) => FailureKind::TemplateUnavailable,
        EngineError::PlaceFile(_) => FailureKind::BadFile,
        EngineError::BadCwd(_) => FailureKind::BadCwd,
        EngineError::Paused(_) => FailureKind::BadPausedState,
        EngineError::Vmm(VmmError::Sandbox(SandboxError::Busy(_)))
        | EngineError::Deliver(SandboxError::Busy(_)) => FailureKind::ProcessesRunning,
        _ => FailureKind::Internal,
    };
    failure(kind, error.to_string())
}

impl Worker {
    /// Runs one call (with the files that came with it) and answers it.
    fn run_call(&self, frame: CallFrame, files: Vec<OwnedFd>) {
        match frame.call {
            Call::ProbeFilter => {
                crate::seccomp::probe();
                self.answer(
                    frame.id,
                    Err(failure(
                        FailureKind::Internal,
                        "the seccomp filter let a refused call through",
                    )),
                );
            }
            call => {
                // A panic is a bug of ours that this call's input found: it fails this call
                // (and leaves its session unusable), not the worker's others.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let touches_session = matches!(
                        call,
                        Call::CreateSession
                            | Call::ResumeSession { .. }
                            | Call::SessionExec { .. }
                            | Call::ForkSession { .. }
                            | Call::PutFile { .. }
                    );
                    let outcome = self.handle(frame.id, call, files);
                    if touches_session {
                        // It may have started work that goes on between requests.
                        self.wakeup.notify();
                    }
                    outcome
                }))
                .unwrap_or_else(|panic| {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(failure(
                        FailureKind::Internal,
                        format!("the sandbox failed inside forkvm: {why}"),
                    ))
                });
                self.windows.remove(frame.id);
                self.running.lock().expect("running lock").remove(&frame.id);
                match outcome {
                    Ok(Reply { answer, files }) => self.answer_with(frame.id, Ok(answer), &files),
                    Err(failure) => self.answer(frame.id, Err(failure)),
                }
            }
        }
    }

    fn answer(&self, id: u64, outcome: Result<Answer, Failure>) {
        self.answer_with(id, outcome, &[]);
    }

    /// Answers call `id`, sending `files` with the answer.
    fn answer_with(&self, id: u64, outcome: Result<Answer, Failure>, files: &[File]) {
        let event = Event::Done { id, outcome };
        let fds: Vec<_> = files.iter().map(AsFd::as_fd).collect();
        let socket = self.writer.lock().expect("writer lock");
        if let Err(e) = write_frame_with_files(&socket, &event, &fds) {
            tracing::warn!(error = %e, "cannot answer the server");
        }
    }

    /// Streams for execution `id`: captured only, or, when asked, also sent to the server
    /// as they are written, paced by it (`output`), until `timeout` from now; and ended
    /// early by a `Call::Cancel` for it.
    fn streams(&self, id: u64, stream: bool, timeout: std::time::Duration) -> Streams {
        let streams = if stream {
            let deadline = std::time::Instant::now() + timeout + OUTPUT_GRACE;
            self.windows.streams(id, self.writer.clone(), deadline)
        } else {
            Streams::new()
        };
        let cancel = Cancel::default();
        self.running
            .lock()
            .expect("running lock")
            .insert(id, cancel.clone());
        streams.with_cancel(cancel)
    }

    /// Ends execution `call` now (its client went away).
    fn cancel(&self, call: u64) {
        let cancel = self
            .running
            .lock()
            .expect("running lock")
            .get(&call)
            .cloned();
        if let Some(cancel) = cancel {
            cancel.cancel();
        }
    }

    fn session(&self, handle: SessionHandle) -> Result<Arc<Mutex<Session>>, Failure> {
        self.sessions
            .lock()
            .expect("sessions lock")
            .get(&handle)
            .cloned()
            .ok_or_else(|| failure(FailureKind::NoSuchSession, "no such session"))
    }

    fn live_sessions(&self) -> Vec<Arc<Mutex<Session>>> {
        let sessions = self.sessions.lock().expect("sessions lock");
        sessions.values().cloned().collect()
    }

    fn keep(&self, session: Session) -> SessionHandle {
        let handle = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.sessions
            .lock()
            .expect("sessions lock")
            .insert(handle, Arc::new(Mutex::new(session)));
        handle
    }

    fn stats(&self) -> PoolCounters {
        let mut counters = PoolCounters::default();
        for (_, stats) in self.engine.pool_stats() {
            counters.depth += stats.depth;
            counters.forks += stats.forks;
            counters.misses += stats.misses;
            counters.prepared += stats.prepared;
        }
        counters
    }

    fn handle(&self, id: u64, call: Call, files: Vec<OwnedFd>) -> Result<Reply, Failure> {
        let answer = match call {
            Call::PauseSession { session } => {
                let session = self.session(session)?;
                let (paused, files) = self
                    .engine
                    .pause_session(&mut session.lock().expect("session lock"))
                    .map_err(engine_failure)?;
                return Ok(Reply {
                    answer: Answer::Paused(paused),
                    files,
                });
            }
            Call::ResumeSession { paused } => {
                let files = files.into_iter().map(File::from).collect();
                let mut session = self
                    .engine
                    .resume_session(&self.template, (paused, files))
                    .map_err(engine_failure)?;
                let host_bytes = session.recent_host_bytes();
                Answer::Session {
                    handle: self.keep(session),
                    host_bytes,
                }
            }
            call => self.handle_plain(id, call)?,
        };
        Ok(Reply {
            answer,
            files: Vec::new(),
        })
    }

    /// The calls that carry no files either way.
    fn handle_plain(&self, id: u64, call: Call) -> Result<Answer, Failure> {
        match call {
            Call::Exec {
                request,
                tenant,
                stream,
            } => self
                .engine
                .exec_with(
                    &self.template,
                    &request,
                    self.streams(id, stream, request.limits.timeout),
                    tenant.as_deref(),
                )
                .map(|result| Answer::Executed {
                    result: Box::new(result),
                    session_alive: false,
                    host_bytes: 0,
                })
                .map_err(engine_failure),
            Call::CreateSession => {
                let mut session = self
                    .engine
                    .create_session(&self.template)
                    .map_err(engine_failure)?;
                let host_bytes = session.recent_host_bytes();
                Ok(Answer::Session {
                    handle: self.keep(session),
                    host_bytes,
                })
            }
            Call::SessionExec {
                session,
                request,
                stream,
            } => {
                let session = self.session(session)?;
                let mut session = session.lock().expect("session lock");
                let result = self
                    .engine
                    .session_exec(
                        &mut session,
                        &request,
                        self.streams(id, stream, request.limits.timeout),
                    )
                    .map_err(engine_failure)?;
                Ok(Answer::Executed {
                    result: Box::new(result),
                    session_alive: session.alive(),
                    host_bytes: session.recent_host_bytes(),
                })
            }
            Call::ForkSession { session, count } => {
                let session = self.session(session)?;
                let branches = self
                    .engine
                    .fork_session(&mut session.lock().expect("session lock"), count)
                    .map_err(engine_failure)?;
                Ok(Answer::Sessions(
                    branches
                        .into_iter()
                        .map(|mut b| {
                            let bytes = b.recent_host_bytes();
                            (self.keep(b), bytes)
                        })
                        .collect(),
                ))
            }
            Call::PutFile {
                session,
                path,
                data,
                mode,
            } => {
                let session = self.session(session)?;
                let mut session = session.lock().expect("session lock");
                session
                    .put_file(&path, &data, mode)
                    .map_err(|e| failure(FailureKind::BadFile, e.to_string()))?;
                Ok(Answer::Done)
            }
            Call::GetFile { session, path, max } => {
                let session = self.session(session)?;
                let session = session.lock().expect("session lock");
                match session.get_file(&path, max) {
                    Ok(data) => Ok(Answer::File(data)),
                    Err(e @ ReadError::TooLarge { .. }) => {
                        Err(failure(FailureKind::FileTooLarge, e.to_string()))
                    }
                    Err(e) => Err(failure(FailureKind::FileNotFound, e.to_string())),
                }
            }
            Call::DropSession { session } => {
                let removed = self
                    .sessions
                    .lock()
                    .expect("sessions lock")
                    .remove(&session);
                // Tearing the VM down happens here, on this call's thread.
                drop(removed);
                Ok(Answer::Done)
            }
            Call::Stats => Ok(Answer::Stats(self.stats())),
            Call::PauseSession { .. } | Call::ResumeSession { .. } => {
                Err(failure(FailureKind::Internal, "files out of place"))
            }
            Call::ProbeFilter => Err(failure(FailureKind::Internal, "probe out of place")),
            Call::OutputTaken { .. } | Call::Cancel { .. } => {
                Err(failure(FailureKind::Internal, "flow control out of place"))
            }
        }
    }
}
