//! What the engine's KVM tests share: one engine per test binary, forking a python template
//! built in that binary's own directory, and helpers to run code in its forks.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use forkvm_engine::{Engine, ErrorKind, ExecRequest, ExecResult};
use forkvm_vmm::{PoolConfig, Vmm};

/// The test binary's engine, over a python template built in `CARGO_TARGET_TMPDIR/templates`
/// with a warm pool of `pool` forks; `None` (the tests skip) where KVM is unavailable.
pub fn engine(templates: &str, pool: usize) -> Option<&'static Engine> {
    if !forkvm_testkit::kvm_available() {
        return None;
    }
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    Some(ENGINE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(templates);
        Engine::new(
            Arc::new(Vmm::new().unwrap()),
            forkvm_testkit::python_template(&dir),
            PoolConfig {
                size: pool,
                refill_threads: 1,
            },
        )
    }))
}

/// Runs `code` in a fresh fork.
pub fn run(engine: &Engine, code: &str) -> ExecResult {
    engine.exec("python", &ExecRequest::python(code)).unwrap()
}

/// Runs `code` in a fresh fork, which must succeed; its stdout.
pub fn stdout(engine: &Engine, code: &str) -> String {
    let out = run(engine, code);
    assert_eq!(
        (out.exit_code, out.error.kind),
        (0, ErrorKind::None),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
