//! Frames between `forkvm serve` and its jailed worker processes, over one Unix stream
//! socket per worker.
//!
//! Each frame is a 4-byte little-endian length, then a bincode body. The server sends
//! `CallFrame`s, each with an id it chose; the worker answers each call with exactly one
//! `Event::Done` carrying that id, preceded by any `Event::Output` chunks of a streaming
//! execution. Calls run concurrently in the worker, so answers come in any order.
//!
//! The worker runs guest-facing code, so the server treats every frame it receives as
//! hostile: the length is checked before anything is allocated, and decoding is bounded by
//! it.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::exec::{ExecLimits, ExecRequest, ExecResult};

/// Largest frame either side accepts: a request's files or a result's two output
/// streams (each at most 64 MiB by the operator's maxima) with room to spare.
pub const MAX_WORKER_FRAME: usize = 160 << 20;

/// A session's handle inside the worker that holds it.
pub type SessionHandle = u64;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_WORKER_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("the peer closed the connection")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Malformed(#[from] bincode::Error),
}

/// The first frame a worker reads: what it is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Start {
    /// Serve calls for a template (`forkvm serve`, `forkvm exec`).
    Serve(Hello),
    /// Run one program from an image and exit with its status (`forkvm run`): its
    /// standard streams are the worker's own, inherited from the command.
    Run(RunProgram),
}

/// A program for `forkvm run`, and its limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunProgram {
    pub image: String,
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub timeout: Option<std::time::Duration>,
    pub cpu_time: Option<std::time::Duration>,
    pub memory_mib: u64,
    pub output_limit: u64,
    pub overlay_limit: u64,
    /// Every system call, with its arguments and result, on standard error.
    pub strace: bool,
}

/// What the server tells a worker it starts serving: which template it serves and within
/// which limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub template: String,
    /// The cache directory the template store lives in (mounted read-only in the jail).
    pub cache_dir: String,
    /// Warm VMs the worker keeps ready.
    pub pool_depth: usize,
    /// Threads refilling the pool.
    pub pool_threads: usize,
    /// The largest limits a request may ask for.
    pub maxima: ExecLimits,
}

/// What the worker answers a `Hello` with once its template is loaded (or why not).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Ready {
    Serving { ram_bytes: u64 },
    Failed { message: String },
}

/// One call from the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallFrame {
    pub id: u64,
    pub call: Call,
}

/// Most output events of one call the worker sends before the server has taken them
/// (`Call::OutputTaken`): a slow client pauses its sandbox instead of filling the server.
pub const OUTPUT_WINDOW: u32 = 32;
/// Most bytes one output event carries (a larger write is sent in pieces).
pub const OUTPUT_CHUNK: usize = 64 << 10;

/// What the server asks a worker to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Call {
    /// Run a request in a fresh fork (or `tenant`'s recycled VM). With `stream`, output is
    /// sent as `Event::Output` while it runs.
    Exec {
        request: ExecRequest,
        tenant: Option<String>,
        stream: bool,
    },
    /// A new session; answered with `Answer::Session`.
    CreateSession,
    /// Run a request in a session's persistent namespace.
    SessionExec {
        session: SessionHandle,
        request: ExecRequest,
        stream: bool,
    },
    /// `count` new sessions from a session's current state; answered with
    /// `Answer::Sessions`.
    ForkSession {
        session: SessionHandle,
        count: usize,
    },
    PutFile {
        session: SessionHandle,
        path: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        mode: u32,
    },
    GetFile {
        session: SessionHandle,
        path: String,
        max: u64,
    },
    /// Writes a session's complete state into memory files sent with the answer
    /// (`Answer::Paused`); the session itself runs on until it is dropped.
    PauseSession { session: SessionHandle },
    /// A session from a paused state; its memory files come with the call, one per
    /// `PausedSession::memories` entry, in order. Answered with `Answer::Session`.
    ResumeSession { paused: PausedSession },
    /// Tears a session down.
    DropSession { session: SessionHandle },
    /// The server took one `Event::Output` of call `call`: the worker may send another
    /// (flow control, never answered; see `OUTPUT_WINDOW`).
    OutputTaken { call: u64 },
    /// The client of execution `call` went away: end it now (never answered; the call
    /// itself answers, as at a timeout).
    Cancel { call: u64 },
    /// Pool counters; `Answer::Stats`.
    Stats,
    /// Makes the worker issue a system call its seccomp filter refuses, which must kill
    /// it: the proof that the filter is live. Only the server (never a client or a guest)
    /// can send it; tests do.
    ProbeFilter,
}

/// What a finished call produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Answer {
    /// An execution's result; for a session's, whether the session can run again and the
    /// host memory it holds afterwards (`Session::host_bytes`).
    Executed {
        result: Box<ExecResult>,
        session_alive: bool,
        host_bytes: u64,
    },
    Session {
        handle: SessionHandle,
        host_bytes: u64,
    },
    /// New branches, with the host memory each holds.
    Sessions(Vec<(SessionHandle, u64)>),
    Done,
    File(#[serde(with = "serde_bytes")] Vec<u8>),
    Stats(PoolCounters),
    /// A paused session's description; its memory files come with the answer, one per
    /// `memories` entry, in order.
    Paused(PausedSession),
}

/// A session's complete state, apart from its memory files (which travel beside it as
/// descriptors, and are stored beside it on disk).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PausedSession {
    /// The vCPU and syscall-layer state (bincode; the engine's to read).
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
    /// What the session had mapped when created (its requests' memory limits count from
    /// there).
    pub mapped_at_start: u64,
    pub memories: Vec<PausedMemory>,
}

/// One memory file of a paused session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PausedMemory {
    pub part: PausedPart,
    /// The file's size.
    pub size: u64,
    /// Ranges (sorted, disjoint) the file defines; the rest is the template's memory
    /// (`over_template`) or zero.
    pub ranges: Vec<(u64, u64)>,
    pub over_template: bool,
}

impl PausedMemory {
    /// Bytes the ranges cover (what storing the file may take, at most).
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e.saturating_sub(*s)).sum()
    }
}

/// Whose memory a paused file holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum PausedPart {
    /// The session's first process (the agent's).
    Main,
    Process(u32),
    Segment(u64),
}

/// Why a call failed, in the kinds the API distinguishes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FailureKind {
    UnsupportedLanguage,
    SessionEnded,
    NoSuchSession,
    TemplateUnavailable,
    /// A file could not be placed (bad path, not a directory...).
    BadFile,
    /// The request's working directory cannot be made (a file is in the way).
    BadCwd,
    FileNotFound,
    FileTooLarge,
    /// A session with other processes running cannot be snapshotted (forked) yet.
    ProcessesRunning,
    /// A paused session's state does not fit its template (or is not one).
    BadPausedState,
    Internal,
}

/// A failed call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// The warm pool's counters, summed over a worker's templates.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolCounters {
    pub depth: usize,
    pub forks: u64,
    pub misses: u64,
    pub prepared: u64,
}

/// One stream of a running execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// What a worker sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Event {
    Output {
        id: u64,
        stream: OutputStream,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Done {
        id: u64,
        outcome: Result<Answer, Failure>,
    },
}

fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(MAX_WORKER_FRAME as u64)
}

/// Writes `message` as one frame (a single `write_all`, so frames from threads that hold
/// the writer's lock in turn never interleave).
pub fn write_frame<T: Serialize>(out: &mut impl Write, message: &T) -> Result<(), WireError> {
    out.write_all(&encode_frame(message)?)?;
    Ok(())
}

/// `message` as one frame's bytes: its length, then its body.
pub(crate) fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    use bincode::Options;
    let len = codec().serialized_size(message)? as usize;
    if len > MAX_WORKER_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_le_bytes());
    codec().serialize_into(&mut frame, message)?;
    Ok(frame)
}

/// Reads one frame. The length is checked before the body is allocated, and the body
/// must decode exactly.
pub fn read_frame<T: for<'de> Deserialize<'de>>(input: &mut impl Read) -> Result<T, WireError> {
    use bincode::Options;
    let mut header = [0u8; 4];
    match input.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_WORKER_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    Ok(codec()
        .with_limit(len as u64)
        .reject_trailing_bytes()
        .deserialize(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut wire = Vec::new();
        let call = CallFrame {
            id: 7,
            call: Call::Exec {
                request: ExecRequest::python(b"print(1)\xff".to_vec()),
                tenant: Some("k".into()),
                stream: true,
            },
        };
        write_frame(&mut wire, &call).unwrap();
        let back: CallFrame = read_frame(&mut wire.as_slice()).unwrap();
        assert_eq!(back.id, 7);
        match back.call {
            Call::Exec { request, .. } => assert_eq!(request.code, b"print(1)\xff"),
            other => panic!("{other:?}"),
        }
        let mut huge = wire.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame::<CallFrame>(&mut huge.as_slice()),
            Err(WireError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame::<CallFrame>(&mut &wire[..wire.len() - 1]),
            Err(WireError::Io(_))
        ));
        assert!(matches!(
            read_frame::<CallFrame>(&mut &[][..]),
            Err(WireError::Closed)
        ));
        // A length prefix inside the body that claims more than the frame holds.
        let mut lying = Vec::new();
        write_frame(
            &mut lying,
            &Event::Output {
                id: 1,
                stream: OutputStream::Stdout,
                data: vec![1, 2, 3],
            },
        )
        .unwrap();
        let at = lying.len() - 3 - 8;
        lying[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            read_frame::<Event>(&mut lying.as_slice()),
            Err(WireError::Malformed(_))
        ));
    }
}
