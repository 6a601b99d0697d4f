//! The server's connection to one worker: calls with ids, answered in any order, routed
//! back to the waiting caller by a reader thread. Everything the worker sends is read as
//! hostile (bounded frames, answers matched to calls the server made).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkvm_protocol::files::{FileReader, write_frame_with_files};
use forkvm_protocol::worker::{
    Answer, Call, CallFrame, Event, Failure, FailureKind, Hello, OutputStream, PausedSession,
    Ready, SessionHandle, Start, WireError, read_frame, write_frame,
};

use crate::spawn::Spawned;

/// Called with each chunk of a streaming execution's output.
pub type Tap = Arc<dyn Fn(OutputStream, &[u8]) + Send + Sync>;

/// Why a call to a worker did not produce an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    /// The worker answered with a failure.
    #[error("{}", .0.message)]
    Failed(Failure),
    #[error("the worker holding this sandbox stopped ({0}); its sandboxes are lost")]
    Gone(String),
    #[error(
        "the worker did not answer within {} s; it was stopped and is being replaced",
        .0.as_secs()
    )]
    Unresponsive(Duration),
    #[error("no worker is running ({0})")]
    Unavailable(String),
}

/// Ends an execution early from the server's side: its client went away. Cancelling
/// before the call is made ends it as soon as it is.
#[derive(Clone, Default)]
pub struct Cancellation(Arc<Mutex<Target>>);

#[derive(Default)]
struct Target {
    cancelled: bool,
    call: Option<(Arc<Connection>, u64)>,
}

impl Cancellation {
    /// Tells the worker running the execution to end it (it answers as at a timeout).
    pub fn cancel(&self) {
        let mut target = self.0.lock().expect("cancellation lock");
        target.cancelled = true;
        if let Some((connection, id)) = target.call.take() {
            connection.send_only(Call::Cancel { call: id });
        }
    }

    fn attach(&self, connection: &Arc<Connection>, id: u64) {
        let mut target = self.0.lock().expect("cancellation lock");
        if target.cancelled {
            connection.send_only(Call::Cancel { call: id });
        } else {
            target.call = Some((connection.clone(), id));
        }
    }

    fn detach(&self) {
        self.0.lock().expect("cancellation lock").call = None;
    }
}

/// Events waiting for a call's thread: more than a well-behaved worker sends unanswered
/// (`OUTPUT_WINDOW` outputs and the answer), so the reading thread never waits on one; a
/// worker ignoring its window only stalls its own connection.
const EVENTS_IN_FLIGHT: usize = 2 * forkvm_protocol::worker::OUTPUT_WINDOW as usize;

/// How long a pause may take (it copies up to a guest's RAM into memory files).
const PAUSE_PATIENCE: Duration = Duration::from_secs(300);

/// An event and the files that came with it.
type Received = (Event, Vec<OwnedFd>);

/// Calls waiting for answers, with whether each streams output.
type Pending = HashMap<u64, (mpsc::SyncSender<Received>, bool)>;

/// One live worker.
pub struct Connection {
    pid: libc::pid_t,
    ram_bytes: u64,
    writer: Mutex<UnixStream>,
    /// Calls waiting for their answer; `None` once the worker is gone.
    pending: Mutex<Option<Pending>>,
    next_id: AtomicU64,
    /// Why the worker is gone, once it is.
    gone: Mutex<Option<String>>,
}

impl Connection {
    /// Greets a freshly spawned worker and waits (up to `timeout`) until it serves.
    pub fn open(
        spawned: Spawned,
        hello: &Hello,
        timeout: Duration,
    ) -> Result<Arc<Connection>, String> {
        let Spawned { pid, socket } = spawned;
        let mut reader = socket.try_clone().map_err(|e| e.to_string())?;
        let mut writer = socket;
        write_frame(&mut writer, &Start::Serve(hello.clone()))
            .map_err(|e| format!("greeting the worker: {e}"))?;
        reader
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let ram_bytes = match read_frame::<Ready>(&mut reader) {
            Ok(Ready::Serving { ram_bytes }) => ram_bytes,
            Ok(Ready::Failed { message }) => return Err(message),
            Err(e) => return Err(format!("the worker did not start: {e}")),
        };
        reader.set_read_timeout(None).map_err(|e| e.to_string())?;
        let connection = Arc::new(Connection {
            pid,
            ram_bytes,
            writer: Mutex::new(writer),
            pending: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
            gone: Mutex::new(None),
        });
        let routed = connection.clone();
        std::thread::Builder::new()
            .name(format!("forkvm-worker-{pid}"))
            .spawn(move || routed.route(reader))
            .map_err(|e| e.to_string())?;
        Ok(connection)
    }

    /// The worker's host PID.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Guest RAM of the template the worker serves.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    pub fn alive(&self) -> bool {
        self.pending.lock().expect("pending lock").is_some()
    }

    /// Hands every event (and the files sent with it) to its call until the worker closes
    /// or sends garbage.
    fn route(&self, reader: UnixStream) {
        let mut reader = FileReader::new(reader);
        let why = loop {
            let event = read_frame::<Event>(&mut reader);
            let files = reader.take_files();
            let event = match event {
                Ok(event) => event,
                Err(WireError::Closed) => {
                    // The worker died: its supervisor reaps it and says how (which makes a
                    // better message than "connection closed").
                    for _ in 0..40 {
                        if self.gone.lock().expect("gone lock").is_some() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    break "its connection closed".to_string();
                }
                Err(e) => {
                    // SAFETY: kill our own child (reaped by its supervisor), which sent a
                    // frame no worker sends.
                    unsafe { libc::kill(self.pid, libc::SIGKILL) };
                    break format!("it sent a malformed frame ({e}) and was killed");
                }
            };
            let (id, done) = match &event {
                Event::Output { id, .. } => (*id, false),
                Event::Done { id, .. } => (*id, true),
            };
            let mut pending = self.pending.lock().expect("pending lock");
            let Some(calls) = pending.as_mut() else {
                return;
            };
            // Events for calls nobody waits for (fire-and-forget, or timed out), and output
            // for calls that did not ask for it, are dropped.
            let sender = if done {
                calls.remove(&id).map(|(sender, _)| sender)
            } else {
                calls
                    .get(&id)
                    .filter(|(_, streams)| *streams)
                    .map(|(sender, _)| sender.clone())
            };
            drop(pending);
            if let Some(sender) = sender {
                let _ = sender.send((event, files));
            }
        };
        self.fail(why);
    }

    /// Marks the worker gone: every waiting call ends with `WorkerError::Gone`.
    pub fn fail(&self, why: String) {
        let mut gone = self.gone.lock().expect("gone lock");
        if gone.is_none() {
            *gone = Some(why);
        }
        drop(gone);
        // Dropping the senders wakes every waiting call.
        self.pending.lock().expect("pending lock").take();
        let _ = self
            .writer
            .lock()
            .expect("writer lock")
            .shutdown(std::net::Shutdown::Both);
    }

    fn gone(&self) -> WorkerError {
        WorkerError::Gone(
            self.gone
                .lock()
                .expect("gone lock")
                .clone()
                .unwrap_or_else(|| "its connection closed".into()),
        )
    }

    fn send(&self, id: u64, call: Call, files: &[BorrowedFd<'_>]) -> Result<(), WorkerError> {
        let frame = CallFrame { id, call };
        let writer = self.writer.lock().expect("writer lock");
        write_frame_with_files(&writer, &frame, files).map_err(|e| {
            drop(writer);
            self.fail(format!("writing to it failed: {e}"));
            self.gone()
        })
    }

    /// Sends `call` without waiting for its answer.
    pub fn send_only(&self, call: Call) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let _ = self.send(id, call, &[]);
    }

    /// Makes `call` and waits up to `patience` for its answer, handing output chunks to
    /// `tap`. A worker that does not answer in time is killed: it is stuck, and the
    /// supervisor replaces it.
    pub fn call(
        &self,
        call: Call,
        tap: Option<&Tap>,
        patience: Duration,
    ) -> Result<Answer, WorkerError> {
        Ok(self.call_with(call, &[], tap, patience, |_| {})?.0)
    }

    /// `call` with `files` sent along; the answer comes with the files the worker sent.
    pub fn call_with_files(
        &self,
        call: Call,
        files: &[BorrowedFd<'_>],
        patience: Duration,
    ) -> Result<(Answer, Vec<OwnedFd>), WorkerError> {
        self.call_with(call, files, None, patience, |_| {})
    }

    /// `call` for an execution that `cancel` can end early (its client went away).
    pub fn call_cancellable(
        self: &Arc<Self>,
        call: Call,
        tap: Option<&Tap>,
        patience: Duration,
        cancel: &Cancellation,
    ) -> Result<Answer, WorkerError> {
        let answer = self.call_with(call, &[], tap, patience, |id| cancel.attach(self, id));
        cancel.detach();
        Ok(answer?.0)
    }

    /// Pauses session `handle`: its state and memory files. What the worker sends is
    /// checked: one regular file per memory described, each as large as described and no
    /// larger than the worker's guest RAM (nothing a sandbox holds is larger: a larger file
    /// would only make the server read and store what the worker made up).
    pub fn pause_session(
        &self,
        handle: SessionHandle,
    ) -> Result<(PausedSession, Vec<File>), WorkerError> {
        let call = Call::PauseSession { session: handle };
        let (answer, fds) = self.call_with_files(call, &[], PAUSE_PATIENCE)?;
        let Answer::Paused(paused) = answer else {
            return Err(WorkerError::Failed(Failure {
                kind: FailureKind::Internal,
                message: "the worker answered a pause with something else".into(),
            }));
        };
        let bad = |why: String| {
            WorkerError::Failed(Failure {
                kind: FailureKind::Internal,
                message: format!("the worker paused the session wrongly: {why}"),
            })
        };
        if fds.len() != paused.memories.len() {
            return Err(bad(format!(
                "{} files for {} memories",
                fds.len(),
                paused.memories.len()
            )));
        }
        let files: Vec<File> = fds.into_iter().map(File::from).collect();
        for (file, memory) in files.iter().zip(&paused.memories) {
            let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
            let end = memory.ranges.iter().map(|r| r.1).max().unwrap_or(0);
            let fits = memory.size <= self.ram_bytes && end <= memory.size;
            if !meta.is_file() || meta.len() != memory.size || !fits {
                return Err(bad(format!(
                    "a file of {} bytes for {memory:?}",
                    meta.len()
                )));
            }
        }
        Ok((paused, files))
    }

    fn call_with(
        &self,
        call: Call,
        files: &[BorrowedFd<'_>],
        tap: Option<&Tap>,
        patience: Duration,
        sent: impl FnOnce(u64),
    ) -> Result<(Answer, Vec<OwnedFd>), WorkerError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(EVENTS_IN_FLIGHT);
        match self.pending.lock().expect("pending lock").as_mut() {
            Some(calls) => calls.insert(id, (tx, tap.is_some())),
            None => return Err(self.gone()),
        };
        self.send(id, call, files)?;
        sent(id);
        let mut deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((Event::Output { stream, data, .. }, _)) => {
                    if let Some(tap) = tap {
                        // A tap waits while its client is slow, and the worker (its window
                        // full) with it: that time is ours, not the worker's.
                        let started = Instant::now();
                        tap(stream, &data);
                        deadline += started.elapsed();
                    }
                    self.send_only(Call::OutputTaken { call: id });
                }
                Ok((Event::Done { outcome, .. }, files)) => {
                    return outcome.map(|a| (a, files)).map_err(WorkerError::Failed);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(self.gone()),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    tracing::error!(pid = self.pid, "worker unresponsive; killing it");
                    // SAFETY: kill with a PID this server started and has not reaped (the
                    // supervisor reaps it only after it dies).
                    unsafe { libc::kill(self.pid, libc::SIGKILL) };
                    self.fail("it stopped answering and was killed".into());
                    return Err(WorkerError::Unresponsive(patience));
                }
            }
        }
    }
}
