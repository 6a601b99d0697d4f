// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

//! Running the real `forkvm` binary against the default image.

use std::io::Write;
use std::process::{Command, Output, Stdio};

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
