//! What a caller asks a sandbox to run, the limits it may ask for, and what running it
//! produced. The server, the workers and the engine all speak these types.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Languages forkvm runs: Python in Python templates; JavaScript (alias `node`) and
/// TypeScript in Node.js templates; and, in both, shell scripts, which the agent runs with
/// the image's shells (`bash -c CODE`, `sh -c CODE`). Which of them a request may name
/// depends on its template; an empty language means the template's own.
pub const LANGUAGES: &[&str] = &["python", "javascript", "node", "typescript", "bash", "sh"];

/// A file to place in the sandbox before the code runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIn {
    /// Absolute path, or relative to the request's working directory.
    pub path: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Permission bits (default 0o644).
    pub mode: u32,
}

/// Per-request limits. Callers pass what the user asked for; `ExecLimits::within` clamps it
/// to what the operator allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecLimits {
    /// Wall-clock time from the fork to the reply.
    pub timeout: Duration,
    /// CPU time the code may use (`None`: only the wall clock).
    pub cpu_time: Option<Duration>,
    /// Bytes the code may map beyond what the template had mapped (its heap and arrays).
    pub memory_bytes: u64,
    /// Bytes each of stdout and stderr may carry.
    pub output_bytes: u64,
    /// Open descriptors (`RLIMIT_NOFILE`).
    pub open_files: usize,
}

impl Default for ExecLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            cpu_time: None,
            memory_bytes: 512 << 20,
            output_bytes: 1 << 20,
            open_files: 256,
        }
    }
}

impl ExecLimits {
    /// The most an operator allows by default (a server flag can change it).
    pub fn maxima() -> ExecLimits {
        ExecLimits {
            timeout: Duration::from_secs(300),
            cpu_time: Some(Duration::from_secs(300)),
            memory_bytes: 4 << 30,
            output_bytes: 64 << 20,
            open_files: 4096,
        }
    }

    /// These limits, each clamped to `maxima`.
    pub fn within(self, maxima: &ExecLimits) -> ExecLimits {
        ExecLimits {
            timeout: self.timeout.min(maxima.timeout),
            cpu_time: match (self.cpu_time, maxima.cpu_time) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            memory_bytes: self.memory_bytes.min(maxima.memory_bytes),
            output_bytes: self.output_bytes.min(maxima.output_bytes),
            open_files: self.open_files.min(maxima.open_files),
        }
    }
}

/// Code to run and everything it runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    #[serde(with = "serde_bytes")]
    pub code: Vec<u8>,
    pub language: String,
    /// Bytes the code reads from stdin (then end-of-file).
    #[serde(with = "serde_bytes")]
    pub stdin: Vec<u8>,
    pub env: BTreeMap<String, String>,
    /// Working directory (created if missing); default `/root`.
    pub cwd: Option<String>,
    pub files: Vec<FileIn>,
    pub limits: ExecLimits,
}

impl ExecRequest {
    /// Python `code` with default limits and nothing else.
    pub fn python(code: impl Into<Vec<u8>>) -> ExecRequest {
        ExecRequest {
            code: code.into(),
            language: "python".to_string(),
            stdin: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            files: Vec::new(),
            limits: ExecLimits::default(),
        }
    }

    /// Absolute path of a file to place, resolving it against the working directory.
    pub fn absolute(&self, path: &str) -> String {
        if path.starts_with('/') {
            path.to_string()
        } else {
            format!(
                "{}/{path}",
                self.cwd.as_deref().unwrap_or("/root").trim_end_matches('/')
            )
        }
    }
}

/// Exit code for a wall-clock or CPU-time limit (as `timeout(1)` uses).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit code when an output stream hit its cap.
pub const EXIT_OUTPUT_LIMIT: i32 = 125;
/// Exit code when a `fork` passed the process limit (`EX_OSERR`: it could not fork).
pub const EXIT_PROCESS_LIMIT: i32 = 71;
/// Exit code when the sandbox failed for a reason of ours (`EX_SOFTWARE`).
pub const EXIT_INTERNAL: i32 = 70;

/// Why a request did not simply run to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ErrorKind {
    None,
    Timeout,
    MemoryLimit,
    OutputLimit,
    ProcessLimit,
    Fault,
    UnsupportedSyscall,
    Internal,
}

impl ErrorKind {
    /// The stable name used in replies, metrics and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::None => "none",
            ErrorKind::Timeout => "timeout",
            ErrorKind::MemoryLimit => "memory_limit",
            ErrorKind::OutputLimit => "output_limit",
            ErrorKind::ProcessLimit => "process_limit",
            ErrorKind::Fault => "fault",
            ErrorKind::UnsupportedSyscall => "unsupported_syscall",
            ErrorKind::Internal => "internal",
        }
    }
}

/// An error kind with a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ExecError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ExecError {
        ExecError {
            kind,
            message: message.into(),
        }
    }

    pub fn none() -> ExecError {
        ExecError::new(ErrorKind::None, "")
    }
}

/// Where the time of one exec went, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// Taking a prepared VM and cloning the process state (and, for a template loaded on
    /// first use, loading it).
    pub fork_us: u64,
    /// From delivering the request to the agent's reply (or the end of the sandbox).
    pub exec_us: u64,
    pub total_us: u64,
    /// Waiting for an execution slot before the fork (set by the server; not in `total_us`).
    #[serde(default)]
    pub queue_us: u64,
}

/// The complete result of one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecResult {
    #[serde(with = "serde_bytes")]
    pub stdout: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub exit_code: i32,
    pub error: ExecError,
    pub timings: Timings,
    /// Unsupported syscalls the code attempted, by name.
    pub unsupported_syscalls: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_clamped_to_maxima() {
        let asked = ExecLimits {
            timeout: Duration::from_secs(1000),
            cpu_time: None,
            memory_bytes: 1,
            output_bytes: u64::MAX,
            open_files: 10,
        };
        let max = ExecLimits::maxima();
        let got = asked.within(&max);
        assert_eq!(got.timeout, max.timeout);
        assert_eq!(got.cpu_time, max.cpu_time);
        assert_eq!(got.memory_bytes, 1);
        assert_eq!(got.output_bytes, max.output_bytes);
        assert_eq!(got.open_files, 10);
    }

    #[test]
    fn relative_files_land_in_the_working_directory() {
        let mut r = ExecRequest::python("");
        assert_eq!(r.absolute("a.txt"), "/root/a.txt");
        r.cwd = Some("/work/".into());
        assert_eq!(r.absolute("d/a.txt"), "/work/d/a.txt");
        assert_eq!(r.absolute("/etc/x"), "/etc/x");
    }
}
