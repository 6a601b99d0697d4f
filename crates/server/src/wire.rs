//! The JSON the API speaks. Field names of `/v1/exec`, `/v1/exec/batch` and `/v1/health`
//! match the seed project's API, so its SDKs and curl examples work unchanged; everything
//! forkvm adds is an additional field.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use forkvm_protocol::exec::{ExecLimits, ExecRequest, ExecResult, FileIn, LANGUAGES};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;

/// A file to place before the code runs.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileBody {
    /// Absolute, or relative to `cwd`.
    pub path: String,
    /// Contents as text…
    #[serde(default)]
    pub content: Option<String>,
    /// …or as base64 (for binary data).
    #[serde(default)]
    pub content_base64: Option<String>,
    /// Permission bits, e.g. 493 (0o755). Default 420 (0o644).
    #[serde(default)]
    pub mode: Option<u32>,
}

/// Code to run.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub code: String,
    /// `python`, `javascript` (alias `node`), `typescript`, or `bash` / `sh` to run the
    /// code as a shell script; default: the template's own. A language its template does
    /// not run is refused with 422.
    #[serde(default)]
    pub language: Option<String>,
    /// Template to fork (`GET /v1/health` lists them). Default: the server's default
    /// template if it runs `language`, else the first served template that does.
    #[serde(default)]
    pub template: Option<String>,
    /// Wall-clock limit (default 30, at most the server's maximum).
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    /// CPU-time limit.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    /// MiB the code may allocate.
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Bytes each of stdout and stderr may carry.
    #[serde(default)]
    pub output_limit_bytes: Option<u64>,
    /// Text the code reads on stdin.
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory, absolute (created if missing).
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub files: Vec<FileBody>,
    /// Send output as Server-Sent Events while the code runs (also: `Accept:
    /// text/event-stream`).
    #[serde(default)]
    pub stream: bool,
}

/// A command line to run in a session's filesystem with `bash -c`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// The command line, e.g. `ls -la | head`.
    pub cmd: String,
    /// Working directory, absolute (created if missing).
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit (default 30, at most the server's maximum).
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    /// Text the command reads on stdin.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Send output as Server-Sent Events while the command runs (also: `Accept:
    /// text/event-stream`).
    #[serde(default)]
    pub stream: bool,
}

impl CommandBody {
    /// The same run as an exec of the command line as a bash script.
    pub fn into_exec(self) -> ExecBody {
        ExecBody {
            code: self.cmd,
            language: Some("bash".to_string()),
            template: None,
            timeout_seconds: self.timeout_seconds,
            cpu_seconds: None,
            memory_mb: None,
            output_limit_bytes: None,
            stdin: self.stdin,
            env: self.env,
            cwd: self.cwd,
            files: Vec::new(),
            stream: self.stream,
        }
    }
}

impl ExecBody {
    /// The engine request, validated against the server's maxima (422 naming the field).
    pub fn to_request(
        &self,
        maxima: &ExecLimits,
        default_timeout: Duration,
    ) -> Result<ExecRequest, ApiError> {
        let language = self.language.clone().unwrap_or_default();
        // Which of them the template runs, its worker checks.
        if !language.is_empty() && !LANGUAGES.contains(&language.as_str()) {
            return Err(ApiError::invalid(
                "language",
                format!(
                    "unsupported language {language:?} (forkvm runs: {})",
                    LANGUAGES.join(", ")
                ),
            ));
        }
        let seconds = |field: &str, value: f64, max: Duration| -> Result<Duration, ApiError> {
            if !(value.is_finite() && value > 0.0) {
                return Err(ApiError::invalid(
                    field,
                    format!("{field} must be a positive number"),
                ));
            }
            if value > max.as_secs_f64() {
                return Err(ApiError::invalid(
                    field,
                    format!("{field} may be at most {}", max.as_secs_f64()),
                ));
            }
            Ok(Duration::from_secs_f64(value))
        };
        let mut limits = ExecLimits {
            timeout: default_timeout.min(maxima.timeout),
            ..ExecLimits::default()
        }
        .within(maxima);
        if let Some(t) = self.timeout_seconds {
            limits.timeout = seconds("timeout_seconds", t, maxima.timeout)?;
        }
        // Every execution has a CPU-time limit: the one asked for, or its wall-clock time.
        let max_cpu = maxima.cpu_time.unwrap_or(maxima.timeout);
        limits.cpu_time = Some(match self.cpu_seconds {
            Some(t) => seconds("cpu_seconds", t, max_cpu)?,
            None => limits.timeout.min(max_cpu),
        });
        if let Some(mb) = self.memory_mb {
            limits.memory_bytes = mb
                .checked_mul(1 << 20)
                .filter(|&bytes| bytes > 0 && bytes <= maxima.memory_bytes)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "memory_mb",
                        format!(
                            "memory_mb must be between 1 and {}",
                            maxima.memory_bytes >> 20
                        ),
                    )
                })?;
        }
        crate::validate::env(&self.env)?;
        if let Some(cwd) = &self.cwd {
            crate::validate::path("cwd", cwd, true)?;
            if !cwd.starts_with('/') {
                return Err(ApiError::invalid("cwd", "cwd must be an absolute path"));
            }
        }
        if let Some(bytes) = self.output_limit_bytes {
            if bytes == 0 || bytes > maxima.output_bytes {
                return Err(ApiError::invalid(
                    "output_limit_bytes",
                    format!(
                        "output_limit_bytes must be between 1 and {}",
                        maxima.output_bytes
                    ),
                ));
            }
            limits.output_bytes = bytes;
        }
        let mut files = Vec::with_capacity(self.files.len());
        for (i, file) in self.files.iter().enumerate() {
            let data = match (&file.content, &file.content_base64) {
                (Some(text), None) => text.as_bytes().to_vec(),
                (None, Some(b64)) => BASE64.decode(b64).map_err(|e| {
                    ApiError::invalid(
                        &format!("files[{i}].content_base64"),
                        format!("not base64: {e}"),
                    )
                })?,
                (None, None) => Vec::new(),
                (Some(_), Some(_)) => {
                    return Err(ApiError::invalid(
                        &format!("files[{i}]"),
                        "give content or content_base64, not both",
                    ));
                }
            };
            let field = format!("files[{i}].path");
            crate::validate::path(&field, &file.path, false)?;
            if file.path.ends_with('/') {
                return Err(ApiError::invalid(
                    &field,
                    "must name a file, not a directory",
                ));
            }
            let mode = file.mode.unwrap_or(0o644);
            if mode > 0o7777 {
                return Err(ApiError::invalid(
                    &format!("files[{i}].mode"),
                    "mode holds permission bits only (at most 0o7777, 4095)",
                ));
            }
            files.push(FileIn {
                path: file.path.clone(),
                data,
                mode,
            });
        }
        Ok(ExecRequest {
            code: self.code.as_bytes().to_vec(),
            language,
            stdin: self.stdin.clone().unwrap_or_default().into_bytes(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            files,
            limits,
        })
    }
}

/// How a request ended, when it did not simply finish.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorInfo {
    /// `none`, `timeout`, `memory_limit`, `output_limit`, `fault`, `unsupported_syscall`,
    /// `internal`.
    pub kind: String,
    pub message: String,
}

/// The result of one execution.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    pub id: Uuid,
    /// Output as UTF-8 (invalid bytes replaced; see `stdout_base64`).
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    pub fork_time_ms: f64,
    pub exec_time_ms: f64,
    pub total_time_ms: f64,
    /// Time spent waiting for an execution slot, before the fork (not in `total_time_ms`).
    #[serde(default)]
    pub queue_time_ms: f64,
    pub error: ErrorInfo,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The exact stdout bytes, present only when they are not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_base64: Option<String>,
}

fn text_and_raw(bytes: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_string(), None),
        Err(_) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(BASE64.encode(bytes)),
        ),
    }
}

impl ExecResponse {
    pub fn from_result(id: Uuid, result: &ExecResult) -> ExecResponse {
        let (stdout, stdout_base64) = text_and_raw(&result.stdout);
        let (stderr, stderr_base64) = text_and_raw(&result.stderr);
        let ms = |us: u64| us as f64 / 1000.0;
        ExecResponse {
            id,
            stdout,
            stderr,
            exit_code: result.exit_code,
            fork_time_ms: ms(result.timings.fork_us),
            exec_time_ms: ms(result.timings.exec_us),
            total_time_ms: ms(result.timings.total_us),
            queue_time_ms: ms(result.timings.queue_us),
            error: ErrorInfo {
                kind: result.error.kind.as_str().to_string(),
                message: result.error.message.clone(),
            },
            stdout_truncated: result.stdout_truncated,
            stderr_truncated: result.stderr_truncated,
            stdout_base64,
            stderr_base64,
        }
    }
}

/// Several executions at once.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    pub executions: Vec<ExecBody>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    pub results: Vec<ExecResponse>,
}

/// A template this server serves (`GET /v1/templates`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateInfo {
    pub name: String,
    /// `python` or `node`.
    pub runtime: String,
    /// The languages its forks run, its own first.
    pub languages: Vec<String>,
    /// Guest RAM of each fork.
    pub memory_mb: u64,
    /// Packages from PyPI and npm it was built with, as resolved (`name==version`,
    /// `name@version`).
    pub packages: Vec<String>,
    /// When it was built (Unix seconds).
    pub created_at: u64,
    /// Requests that name no template (and whose language it runs) go here.
    pub default: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    pub templates: Vec<TemplateInfo>,
}

/// A template to build (`POST /v1/templates`, operator keys only).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBuildBody {
    /// The new template's name (1-64 letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// A template spec, TOML, as `forkvm template build --spec` reads it, without
    /// `[[files]]` (which name host paths).
    pub spec: String,
    /// A lock from an earlier build (`forkvm template lock`, or a build's `lock`): build
    /// exactly what it pins.
    #[serde(default)]
    pub lock: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Building,
    /// Built, and served.
    Ready,
    Failed,
}

/// A template build.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BuildInfo {
    pub id: String,
    /// The template it builds.
    pub name: String,
    pub status: BuildStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// The end of the build's output.
    pub log: String,
    /// Once ready: the lock it was built to (send it back as `lock` to build the same again).
    pub lock: Option<String>,
}

/// One template's readiness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateHealth {
    pub ready: bool,
    pub memory_mb: u64,
    /// Warm VMs ready to fork.
    pub pool_depth: usize,
    /// The languages its forks run, its own first.
    #[serde(default)]
    pub languages: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok` when every template is ready.
    pub status: String,
    pub templates: BTreeMap<String, TemplateHealth>,
}

/// A new session.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionBody {
    /// Template to fork (default: the server's default template).
    #[serde(default)]
    pub template: Option<String>,
    /// Idle time after which the session is deleted (default 300).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Free-form labels, returned with the session.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionInfo {
    pub id: Uuid,
    pub template: String,
    /// Unix seconds.
    pub created_at: u64,
    pub last_used_at: u64,
    pub expires_at: u64,
    pub ttl_seconds: u64,
    pub metadata: BTreeMap<String, String>,
    /// False once the code in it exited or crashed.
    pub alive: bool,
    /// Host memory the session holds, as of its last request: its private pages, its
    /// files, and its share of the layer it was forked from. Counts against the key's
    /// `--key-memory-mb`. Zero while paused.
    pub memory_bytes: u64,
    /// `running` (it has a VM) or `paused` (its state is on disk; any request resumes it).
    pub state: String,
    /// Bytes its pause (or, running, its last checkpoint) takes on disk. Counts against
    /// the key's `--key-storage-mb`.
    pub stored_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionList {
    pub sandboxes: Vec<SessionInfo>,
}

/// Fork a session.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    /// Number of branches (1 to 16, default 1).
    #[serde(default)]
    pub count: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ForkResponse {
    pub ids: Vec<Uuid>,
}

/// A file written into a session.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FileWritten {
    pub path: String,
    pub size: u64,
}
