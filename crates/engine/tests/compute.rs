//! Compute in forks on real KVM: the template's BLAS is OpenBLAS with the kernel the host's
//! CPU gets, linear algebra gives the host's numbers, and large arrays (on huge pages) keep
//! the memory limit and fork semantics.

mod common;

use std::process::Command;

use forkvm_engine::{Engine, ErrorKind, ExecLimits, ExecRequest, ExecResult, Streams};

fn engine() -> Option<&'static Engine> {
    common::engine("compute-templates", 2)
}

fn in_fork(engine: &Engine, code: &str) -> String {
    let result = engine.exec("python", &ExecRequest::python(code)).unwrap();
    assert_eq!(
        (result.exit_code, result.error.kind),
        (0, ErrorKind::None),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    String::from_utf8(result.stdout).unwrap()
}

/// Runs `code` in Debian's Python on the host, as the sandbox's programs run (one OpenBLAS
/// thread). scripts/setup.sh installs numpy and OpenBLAS there.
fn on_host(code: &str) -> String {
    let out = Command::new("/usr/bin/python3")
        .args(["-c", code])
        .env("OPENBLAS_NUM_THREADS", "1")
        .output()
        .expect("running /usr/bin/python3 (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "host python3 failed (run scripts/setup.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Prints the file the loaded BLAS comes from (from `/proc/self/maps`) and OpenBLAS's
/// kernel choice for this CPU.
const BLAS_IDENTITY: &str = "import ctypes, numpy
paths = {line.split()[-1] for line in open('/proc/self/maps') if 'libblas' in line or 'openblas' in line}
blas = ctypes.CDLL('libblas.so.3')
blas.openblas_get_corename.restype = ctypes.c_char_p
print(sorted(p for p in paths if 'libblas' in p))
print(blas.openblas_get_corename().decode())";

#[test]
fn the_blas_is_openblas_with_the_kernel_the_host_cpu_gets() {
    let Some(engine) = engine() else { return };
    let fork = in_fork(engine, BLAS_IDENTITY);
    let mut lines = fork.lines();
    let mapped = lines.next().unwrap();
    assert!(
        mapped.contains("/openblas-pthread/libblas.so.3"),
        "numpy's BLAS is not OpenBLAS: {mapped}"
    );
    let fork_core = lines.next().unwrap();
    let host_core = on_host(BLAS_IDENTITY).lines().nth(1).unwrap().to_string();
    assert_eq!(
        fork_core, host_core,
        "OpenBLAS picks another kernel in a fork: the CPU features differ"
    );
}

/// Deterministic inputs, then the raw bytes of a product, the singular values and a solve.
const LINALG: &str = "import numpy as np
rng = np.random.default_rng(1234)
a = rng.standard_normal((300, 300))
b = rng.standard_normal((300, 40))
for result in (a @ b, np.linalg.svd(a, compute_uv=False), np.linalg.solve(a, b)):
    print(result.astype('<f8').tobytes().hex())";

fn decode(line: &str) -> Vec<f64> {
    (0..line.len())
        .step_by(16)
        .map(|i| {
            let bytes: Vec<u8> = (i..i + 16)
                .step_by(2)
                .map(|j| u8::from_str_radix(&line[j..j + 2], 16).unwrap())
                .collect();
            f64::from_le_bytes(bytes.try_into().unwrap())
        })
        .collect()
}

#[test]
fn linear_algebra_gives_the_hosts_results() {
    let Some(engine) = engine() else { return };
    let fork = in_fork(engine, LINALG);
    let host = on_host(LINALG);
    let names = ["a @ b", "svd", "solve"];
    for ((name, fork), host) in names.iter().zip(fork.lines()).zip(host.lines()) {
        let (fork, host) = (decode(fork), decode(host));
        assert_eq!(fork.len(), host.len(), "{name}");
        let scale = host.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = fork
            .iter()
            .zip(&host)
            .map(|(f, h)| (f - h).abs() / scale)
            .fold(0f64, f64::max);
        assert!(worst <= 1e-12, "{name}: relative difference {worst:e}");
    }
}

fn with_memory(code: &str, memory_bytes: u64) -> ExecRequest {
    let mut request = ExecRequest::python(code);
    request.limits = ExecLimits {
        memory_bytes,
        ..ExecLimits::default()
    };
    request
}

#[test]
fn large_arrays_are_exact_and_the_memory_limit_holds() {
    let Some(engine) = engine() else { return };
    // 96 MiB of arrays, written and read back through every page.
    let code = "import numpy as np
a = np.ones((4000, 3000))
a[::7, ::11] = 3.0
b = np.arange(12 << 20, dtype=np.int64)
print(a.sum(), int(b.sum()), int(b[::4097].sum()))";
    let out = engine
        .exec("python", &with_memory(code, 256 << 20))
        .unwrap();
    let expected_a = 12_000_000.0 + 572.0 * 273.0 * 2.0;
    let n: i64 = 12 << 20;
    let strided: i64 = (0..n).step_by(4097).sum();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{expected_a:?} {} {strided}\n", n * (n - 1) / 2)
    );
    // The limit counts what is mapped, huge pages or not.
    let out: ExecResult = engine
        .exec(
            "python",
            &with_memory("import numpy as np\nx = np.ones((8000, 4000))", 128 << 20),
        )
        .unwrap();
    assert_eq!(out.error.kind, ErrorKind::MemoryLimit);
    assert!(String::from_utf8_lossy(&out.stderr).contains("MemoryError"));
}

#[test]
fn forks_of_a_session_holding_large_arrays_branch_exactly() {
    let Some(engine) = engine() else { return };
    let run = |session: &mut forkvm_engine::Session, code: &str| -> String {
        let result = engine
            .session_exec(session, &with_memory(code, 512 << 20), Streams::new())
            .unwrap();
        assert_eq!(
            result.exit_code,
            0,
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        String::from_utf8(result.stdout).unwrap()
    };
    let mut parent = engine.create_session("python").unwrap();
    run(
        &mut parent,
        "import numpy as np\nbig = np.arange(16 << 20, dtype=np.int64)",
    );
    let mut branches = engine.fork_session(&mut parent, 2).unwrap();
    run(&mut branches[0], "big[::1000] = -1");
    run(&mut branches[1], "big += 1\nextra = np.ones(8 << 20)");
    let total = "print(int(big.sum()), int(big[::1000].sum()))";
    let n: i64 = 16 << 20;
    let base = n * (n - 1) / 2;
    let strided: i64 = (0..n).step_by(1000).sum();
    let count = (0..n).step_by(1000).count() as i64;
    assert_eq!(run(&mut parent, total), format!("{base} {strided}\n"));
    assert_eq!(
        run(&mut branches[0], total),
        format!("{} {}\n", base - strided - count, -count)
    );
    assert_eq!(
        run(&mut branches[1], total),
        format!("{} {}\n", base + n, strided + count)
    );
}
