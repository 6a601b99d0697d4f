//! Templates built for `POST /v1/templates`: `forkvm template build NAME --spec … --lock …`
//! run as a child process of the server (the build runs a sandbox, which the server process
//! never does), bounded in time and output; the new template is then served with workers of
//! its own.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forkvm_server::builds::{Built, Failed, TemplateBuilder};
use forkvm_server::templates::Served;
use forkvm_template::lock::Lock;
use forkvm_template::spec::SpecFile;

use crate::serve::{WorkerPlan, serve_template};

/// A build (Debian packages make a new image: minutes) is ended after this long.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The most of a build's output read.
const OUTPUT_BYTES: u64 = 1 << 20;

pub struct ChildBuilder {
    plan: WorkerPlan,
}

impl ChildBuilder {
    pub fn new(plan: WorkerPlan) -> ChildBuilder {
        ChildBuilder { plan }
    }
}

impl TemplateBuilder for ChildBuilder {
    fn check(&self, name: &str, spec: &str, lock: Option<&str>) -> Result<(), (String, String)> {
        if !forkvm_template::store::valid_name(name) {
            return Err((
                "name".into(),
                format!(
                    "invalid template name {name:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
                ),
            ));
        }
        SpecFile::parse(spec, name, None).map_err(|e| ("spec".to_string(), e))?;
        if let Some(lock) = lock {
            Lock::parse(lock).map_err(|e| ("lock".to_string(), e))?;
        }
        Ok(())
    }

    fn build(&self, name: &str, spec: &str, lock: Option<&str>) -> Result<Built, Failed> {
        let failed = |error: String| Failed {
            error,
            log: String::new(),
        };
        let dir = tempfile::tempdir().map_err(|e| failed(format!("a build directory: {e}")))?;
        let spec_path = dir.path().join("template.toml");
        let lock_path = dir.path().join("template.lock");
        std::fs::write(&spec_path, spec).map_err(|e| failed(e.to_string()))?;
        if let Some(lock) = lock {
            std::fs::write(&lock_path, lock).map_err(|e| failed(e.to_string()))?;
        }
        let exe = std::env::current_exe().map_err(|e| failed(e.to_string()))?;
        let mut child = Command::new(exe)
            .args(["template", "build", name, "--spec"])
            .arg(&spec_path)
            .arg("--lock")
            .arg(&lock_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("starting the build: {e}")))?;
        // stdout (the summary) is small; stderr carries the progress and any error.
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let read = |stream: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stream.take(OUTPUT_BYTES).read_to_string(&mut text);
                text
            })
        };
        let (out, err) = (read(Box::new(stdout)), read(Box::new(stderr)));
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if started.elapsed() > BUILD_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => return Err(failed(format!("waiting for the build: {e}"))),
            }
        };
        let log = format!(
            "{}{}",
            err.join().unwrap_or_default(),
            out.join().unwrap_or_default()
        );
        match status {
            None => Err(Failed {
                error: format!("the build took longer than {} s", BUILD_TIMEOUT.as_secs()),
                log,
            }),
            Some(status) if !status.success() => Err(Failed {
                error: log
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("Error:") || l.starts_with("forkvm:"))
                    .unwrap_or("the build failed")
                    .to_string(),
                log,
            }),
            Some(_) => match std::fs::read_to_string(&lock_path) {
                Ok(lock) => Ok(Built { log, lock }),
                Err(e) => Err(Failed {
                    error: format!("reading the lock the build wrote: {e}"),
                    log,
                }),
            },
        }
    }

    fn serve(&self, name: &str) -> Result<Served, String> {
        serve_template(name, &self.plan).map_err(|e| format!("{e:#}"))
    }
}
