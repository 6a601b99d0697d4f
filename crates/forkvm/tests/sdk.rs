//! The Python SDK (`sdk/python`) against a real `forkvm serve`: its own test suite, run
//! in the venv `scripts/setup.sh` makes, on the working tree's SDK source.

#[path = "support/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::process::Command;

use server::Server;

/// The venv's Python, or `None` (with a message) where the SDK tests cannot run.
fn sdk_python() -> Option<PathBuf> {
    let venv = std::env::var_os("FORKVM_SDK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/forkvm-sdk-venv"));
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import httpx"])
        .status()
        .is_ok_and(|s| s.success());
    let message = format!(
        "the Python SDK's venv is missing ({}): run scripts/setup.sh",
        venv.display()
    );
    ready_or_skip(ready, &message).then_some(python)
}

/// `ready`, or else skipping with `message` (failing instead where CI requires everything).
fn ready_or_skip(ready: bool, message: &str) -> bool {
    if ready {
        return true;
    }
    if std::env::var_os("FORKVM_REQUIRE_KVM").is_some() {
        panic!("{message}");
    }
    eprintln!("skipping: {message}");
    false
}

#[test]
fn the_python_sdk_passes_its_tests_against_a_live_server() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let Some(python) = sdk_python() else { return };
    server::build_node_template();
    // A cache of its own: its sessions pause to a store no other test's server holds.
    let cache = server::private_cache("sdk-python");
    let server = Server::start_in(
        &cache,
        &cache.join("keys.json"),
        &["--rate", "20", "--burst", "40", "--template", "python,node"],
    );
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/python");
    let status = Command::new(python)
        .args(["-m", "unittest", "discover", "-v", "-s", "tests"])
        .current_dir(&sdk)
        .env("PYTHONPATH", &sdk)
        .env("FORKVM_URL", &server.base)
        .env("FORKVM_API_KEY", &server.alice)
        .env("FORKVM_OTHER_KEY", &server.bob)
        .status()
        .unwrap();
    assert!(status.success(), "the SDK's tests failed");
}

/// `npm`, or `None` (with a message) where the TypeScript SDK's tests cannot run.
fn npm_ready(sdk: &Path) -> bool {
    let ready = sdk.join("node_modules/typescript").exists()
        && Command::new("node")
            .arg("--version")
            .status()
            .is_ok_and(|s| s.success());
    ready_or_skip(
        ready,
        "the TypeScript SDK needs node and `npm ci` in sdk/typescript: run scripts/setup.sh",
    )
}

#[test]
fn the_typescript_sdk_builds_and_passes_its_tests_against_a_live_server() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/typescript");
    if !npm_ready(&sdk) {
        return;
    }
    let build = Command::new("npm")
        .args(["run", "build"])
        .current_dir(&sdk)
        .status()
        .unwrap();
    assert!(build.success(), "the TypeScript SDK did not build");
    // The seed project's TypeScript example runs JavaScript: serve the node template too.
    server::build_node_template();
    let cache = server::private_cache("sdk-typescript");
    let server = Server::start_in(
        &cache,
        &cache.join("keys.json"),
        &["--template", "python,node"],
    );
    let status = Command::new("npm")
        .arg("test")
        .current_dir(&sdk)
        .env("FORKVM_URL", &server.base)
        .env("FORKVM_API_KEY", &server.alice)
        .status()
        .unwrap();
    assert!(status.success(), "the TypeScript SDK's tests failed");
}

/// Runs `examples/NAME` with the SDK's venv against `server`; its stdout.
fn run_example(python: &Path, server: &Server, name: &str, workdir: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new(python)
        .arg(root.join("examples").join(name))
        .current_dir(workdir)
        .env("PYTHONPATH", root.join("sdk/python"))
        .env("FORKVM_URL", &server.base)
        .env("FORKVM_API_KEY", &server.alice)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn the_examples_run() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let Some(python) = sdk_python() else { return };
    let workdir = tempfile_dir();
    let server = Server::start(&[]);
    let agent = run_example(&python, &server, "agent_loop.py", &workdir);
    assert!(agent.contains("NameError"), "{agent}");
    assert!(agent.contains("agent finished after 4 turns"), "{agent}");
    let explore = run_example(&python, &server, "fork_and_explore.py", &workdir);
    assert!(explore.contains("best: degree 3"), "{explore}");
    drop(server);
    // The plot needs a template with pandas and matplotlib.
    let build = Command::new(env!("CARGO_BIN_EXE_forkvm"))
        .args([
            "template",
            "build",
            "plots",
            "--packages",
            "pandas,matplotlib",
        ])
        .env("FORKVM_CACHE_DIR", server::cache_dir())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(build.success());
    let server = Server::start(&["--template", "plots"]);
    let plot = run_example(&python, &server, "plot_to_png.py", &workdir);
    assert!(plot.contains("wrote signups.png"), "{plot}");
    let png = std::fs::read(workdir.join("signups.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
}

fn tempfile_dir() -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("examples-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
