// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

//! Running the real `forkvm` binary against the default image.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A fresh cache directory with every root filesystem image of the default cache linked in
/// (so none is rebuilt; one that is missing gets built here).
pub fn private_cache(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-cache-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let default = forkvm_testkit::default_image();
    for entry in std::fs::read_dir(default.parent().unwrap()).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if file.starts_with("rootfs-") && file.ends_with(".img") {
            std::os::unix::fs::symlink(&path, dir.join(&file)).unwrap();
        }
    }
    dir
}

/// Runs `forkvm ARGS…` with `cache` as its cache directory.
pub fn forkvm_in(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkvm"))
        .args(args)
        .env("FORKVM_CACHE_DIR", cache)
        .output()
        .expect("running forkvm")
}

/// Runs `forkvm run [flags] -- program args…` with `stdin`, returning its output.
pub fn forkvm_run(flags: &[&str], command: &[&str], stdin: &[u8]) -> Output {
    let image = forkvm_testkit::default_image();
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkvm"))
        .arg("run")
        .arg("--image")
        .arg(&image)
        .args(flags)
        .arg("--")
        .args(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting forkvm");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().expect("waiting for forkvm")
}

/// Runs Python code in a sandbox.
pub fn python(code: &str) -> Output {
    forkvm_run(&["--timeout", "60"], &["/usr/bin/python3", "-c", code], b"")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A helper process that counts connections on a Unix socket in its own memory and answers
/// each with the count, its pid and its parent's.
pub const COUNTER: &str = r#"
import os, socket
server = socket.socket(socket.AF_UNIX)
server.bind("/tmp/counter.sock")
server.listen()
count = 0
while True:
    conn, _ = server.accept()
    count += 1
    conn.sendall(f"{count} {os.getpid()} {os.getppid()}".encode())
    conn.close()
"#;

/// Asks the counter for its next number, waiting for it to be listening.
pub const ASK: &str = r#"
import socket, time
for _ in range(400):
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect("/tmp/counter.sock")
        print(c.recv(64).decode())
        break
    except (FileNotFoundError, ConnectionRefusedError):
        time.sleep(0.025)
"#;
