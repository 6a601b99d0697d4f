//! The host-side floor: Debian's own `/usr/bin/python3` with numpy imported, forking a child
//! per run with `os.fork()`, the fastest way a host can give code a fresh process.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::Latency;

/// argv: mode ("exit" or "exec"), runs, code. Prints microsecond samples as JSON.
const SCRIPT: &str = r#"
import json, os, sys, time
import numpy
mode, n, code = sys.argv[1], int(sys.argv[2]), sys.argv[3]
samples = []
for _ in range(n):
    r, w = os.pipe()
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        if mode == "exec":
            os.close(r)
            os.dup2(w, 1)
            exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
            sys.stdout.flush()
        os._exit(0)
    os.close(w)
    while os.read(r, 65536):
        pass
    os.close(r)
    os.waitpid(pid, 0)
    samples.append((time.perf_counter() - t) * 1e6)
print(json.dumps(samples))
"#;

fn run(mode: &str, code: &str, samples: usize) -> Result<Latency> {
    let out = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT, mode, &samples.to_string(), code])
        .env("OPENBLAS_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .output()
        .context("running the host fork floor (needs python3-numpy: scripts/setup.sh)")?;
    if !out.status.success() {
        bail!(
            "host fork floor failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let micros: Vec<f64> = serde_json::from_slice(&out.stdout)?;
    Ok(Latency::of(
        micros
            .into_iter()
            .map(|us| Duration::from_secs_f64(us / 1e6))
            .collect(),
    ))
}

/// A cold start of `argv` on the host (spawn, run, wait; stdout through a pipe): the floor
/// for runtimes that cannot fork a warm process, such as Node.js.
pub fn spawn(argv: &[&str], samples: usize) -> Result<Latency> {
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = std::time::Instant::now();
        let out = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} on the host", argv[0]))?;
        times.push(start.elapsed());
        if !out.status.success() {
            bail!(
                "host {argv:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(Latency::of(times))
}

/// `os.fork()` of a warm numpy Python whose child exits at once, plus the wait.
pub fn fork_exit(samples: usize) -> Result<Latency> {
    run("exit", "", samples)
}

/// `os.fork()` of a warm numpy Python whose child runs `code` (stdout through a pipe).
pub fn fork_exec(code: &str, samples: usize) -> Result<Latency> {
    run("exec", code, samples)
}
