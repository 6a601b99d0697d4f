// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

//! A real `forkvm serve` on loopback for tests: its own cache directory (the Debian image is
//! linked in), its own keys, and the flags each test needs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// The cache directory every test server shares (the python template is built once).
pub fn cache_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("api-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = forkvm_testkit::default_image();
        let link = dir.join(image.file_name().unwrap());
        if !link.exists() {
            std::os::unix::fs::symlink(&image, link).unwrap();
        }
        // Build the template once, before servers start in parallel.
        let status = Command::new(env!("CARGO_BIN_EXE_forkvm"))
            .args(["template", "build", "python"])
            .env("FORKVM_CACHE_DIR", &dir)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        dir
    })
}

/// Builds the `node` template in the shared cache directory (once per test binary), so a
/// server started with `--template python,node` serves both.
pub fn build_node_template() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = cache_dir();
        let image = forkvm_testkit::node_image();
        let link = dir.join(image.file_name().unwrap());
        if !link.exists() {
            std::os::unix::fs::symlink(&image, link).unwrap();
        }
        let status = Command::new(env!("CARGO_BIN_EXE_forkvm"))
            .args(["template", "build", "node", "--runtime", "node"])
            .env("FORKVM_CACHE_DIR", dir)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "building the node template");
    });
}

/// Creates a key in `file` and returns it.
pub fn new_key(file: &Path, name: &str) -> String {
    key_of(file, name, &[])
}

fn key_of(file: &Path, name: &str, flags: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_forkvm"))
        .args(["keys", "add", name, "--file"])
        .arg(file)
        .args(flags)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// An HTTP client for the tests (generous timeout: some requests run slow code).
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap()
}

/// A running server.
pub struct Server {
    child: Child,
    pub base: String,
    /// Keys named `alice` and `bob`, and an operator's key, `ops`.
    pub alice: String,
    pub bob: String,
    pub ops: String,
}

/// A cache directory of its own (for a server whose paused sessions no other test's server
/// may see) sharing the shared cache's built templates, image and sealing key.
pub fn private_cache(name: &str) -> PathBuf {
    let shared = cache_dir();
    let dir = shared.join(format!("private-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(shared).unwrap().flatten() {
        let file_name = entry.file_name();
        let name = file_name.to_string_lossy();
        if name == "templates" || name == "seal.key" || name.ends_with(".img") {
            std::os::unix::fs::symlink(entry.path(), dir.join(&file_name)).unwrap();
        }
    }
    dir
}

impl Server {
    /// Starts `forkvm serve` with extra `flags`.
    pub fn start(flags: &[&str]) -> Server {
        let cache = cache_dir();
        let keys = cache.join(format!("keys-{}.json", uuid_like()));
        Server::start_in(cache, &keys, flags)
    }

    /// Starts `forkvm serve` over cache directory `cache` with the keys of `keys` (made
    /// on first use: a server started again with the same file has the same keys).
    pub fn start_in(cache: &Path, keys: &Path, flags: &[&str]) -> Server {
        let names = keys.with_extension("plain");
        let (alice, bob, ops) = match std::fs::read_to_string(&names) {
            Ok(text) => {
                let mut lines = text.lines().map(str::to_string);
                let mut next = || lines.next().unwrap();
                (next(), next(), next())
            }
            Err(_) => {
                let made = (
                    new_key(keys, "alice"),
                    new_key(keys, "bob"),
                    key_of(keys, "ops", &["--operator"]),
                );
                std::fs::write(&names, format!("{}\n{}\n{}\n", made.0, made.1, made.2)).unwrap();
                made
            }
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_forkvm"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--pool-size",
                "4",
                "--keys",
            ])
            .arg(keys)
            .args(flags)
            .env("FORKVM_CACHE_DIR", cache)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let base = line
            .trim()
            .strip_prefix("forkvm: listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server {
            child,
            base,
            alice,
            bob,
            ops,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The Prometheus text of `/v1/metrics`.
    pub fn metrics(&self) -> String {
        client()
            .get(self.url("/v1/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    /// A gauge or counter of `/v1/metrics` (unlabelled).
    pub fn gauge(&self, name: &str) -> u64 {
        let metrics = self.metrics();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in the metrics"))
            .parse()
            .unwrap()
    }

    /// `POST /v1/exec` of `body` as `key`: the JSON answer.
    pub fn exec(&self, key: &str, body: serde_json::Value) -> serde_json::Value {
        client()
            .post(self.url("/v1/exec"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// `POST path` of `body` as `key`: the status and the JSON answer (null if none).
    pub fn post(
        &self,
        key: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let response = client()
            .post(self.url(path))
            .bearer_auth(key)
            .json(&body)
            .send()
            .unwrap();
        let status = response.status();
        (status, response.json().unwrap_or(serde_json::Value::Null))
    }

    /// `GET /v1/sandboxes/{id}` as `key`.
    pub fn session(&self, key: &str, id: &str) -> serde_json::Value {
        client()
            .get(self.url(&format!("/v1/sandboxes/{id}")))
            .bearer_auth(key)
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill with a valid pid of our own child and a standard signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Field `field` of a `/proc` file in `kB` (`/proc/meminfo`, `/proc/PID/status`), in bytes.
pub fn kib_field(text: &str, field: &str) -> u64 {
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} field"))
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib << 10
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
