//! Templates built through the API (`POST /v1/templates`, operator keys only): one build at
//! a time, run off the request path by whoever started the server (`TemplateBuilder`:
//! `forkvm serve` runs `forkvm template build` as a child process), then served beside the
//! others. The server keeps the last builds' outcomes for `GET /v1/templates/builds/{id}`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::error::ApiError;
use crate::templates::Served;
use crate::wire::{BuildInfo, BuildStatus};

/// What the server needs to build and serve a template; `forkvm serve` provides it.
pub trait TemplateBuilder: Send + Sync {
    /// Checks a build request before it is accepted: `Err((field, message))` refuses it.
    fn check(&self, name: &str, spec: &str, lock: Option<&str>) -> Result<(), (String, String)>;
    /// Builds template `name` (blocking, minutes at most). Returns its output and the
    /// lock it was built to.
    fn build(&self, name: &str, spec: &str, lock: Option<&str>) -> Result<Built, Failed>;
    /// Starts serving a template that was built.
    fn serve(&self, name: &str) -> Result<Served, String>;
}

/// A finished build.
pub struct Built {
    pub log: String,
    pub lock: String,
}

/// A failed build: why, and its output.
pub struct Failed {
    pub error: String,
    pub log: String,
}

/// How many finished builds the server remembers.
const KEPT: usize = 32;
/// The most of a build's output kept (its end).
const LOG_BYTES: usize = 64 << 10;

/// The builds of this server.
#[derive(Default)]
pub struct Builds {
    builder: std::sync::OnceLock<Arc<dyn TemplateBuilder>>,
    history: Mutex<VecDeque<BuildInfo>>,
}

impl Builds {
    /// Lets the server build templates with `builder` (once).
    pub fn enable(&self, builder: Arc<dyn TemplateBuilder>) {
        let _ = self.builder.set(builder);
    }

    fn history(&self) -> std::sync::MutexGuard<'_, VecDeque<BuildInfo>> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A build by id.
    pub fn get(&self, id: &str) -> Option<BuildInfo> {
        self.history().iter().find(|b| b.id == id).cloned()
    }

    /// Accepts a build of `name` and returns it, running (the caller runs `run`). Refused
    /// while another build runs, or for a name being served or built.
    pub fn start(
        &self,
        name: &str,
        spec: &str,
        lock: Option<&str>,
        serving: bool,
    ) -> Result<(BuildInfo, Arc<dyn TemplateBuilder>), ApiError> {
        let builder = self
            .builder
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("this server does not build templates"))?;
        if serving {
            return Err(ApiError::conflict(
                "template_exists",
                format!(
                    "template {name:?} is served already: build under a new name (a served template is never replaced while the server runs)"
                ),
            ));
        }
        builder
            .check(name, spec, lock)
            .map_err(|(field, message)| ApiError::invalid(&field, message))?;
        let mut history = self.history();
        if let Some(running) = history.iter().find(|b| b.status == BuildStatus::Building) {
            return Err(ApiError::conflict(
                "build_running",
                format!(
                    "build {} of template {:?} is running: one build at a time",
                    running.id, running.name
                ),
            ));
        }
        let mut id = [0u8; 8];
        forkvm_kernel::entropy::host_random(&mut id);
        let info = BuildInfo {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            name: name.to_string(),
            status: BuildStatus::Building,
            error: None,
            log: String::new(),
            lock: None,
        };
        history.push_back(info.clone());
        while history.len() > KEPT {
            history.pop_front();
        }
        Ok((info, builder))
    }

    /// Records how build `id` ended.
    pub fn finish(&self, id: &str, outcome: Result<Built, Failed>) {
        let mut history = self.history();
        let Some(info) = history.iter_mut().find(|b| b.id == id) else {
            return;
        };
        match outcome {
            Ok(built) => {
                info.status = BuildStatus::Ready;
                info.log = tail(built.log);
                info.lock = Some(built.lock);
            }
            Err(failed) => {
                info.status = BuildStatus::Failed;
                info.error = Some(failed.error);
                info.log = tail(failed.log);
            }
        }
    }
}

/// The last `LOG_BYTES` of `log`, cut at a character boundary.
fn tail(log: String) -> String {
    if log.len() <= LOG_BYTES {
        return log;
    }
    let mut from = log.len() - LOG_BYTES;
    while !log.is_char_boundary(from) {
        from += 1;
    }
    log[from..].to_string()
}
