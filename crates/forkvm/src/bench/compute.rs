//! `forkvm bench compute`: the same Python programs in a fork and in a host process of the
//! same Debian binaries, one after the other in one run, and the ratio of their medians.
//!
//! Each workload has untimed setup (imports, data) and a timed body, timed inside the
//! program with `time.perf_counter()` on both sides, so process start and fork cost are
//! out of the picture: what is compared is compute, BLAS and first-touch memory. Every
//! workload runs in a fresh fork and a fresh host process; "first" workloads repeat that
//! to get a median of first runs.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use forkvm_engine::{Engine, ExecLimits, ExecRequest};
use forkvm_template::TemplateSpec;
use forkvm_vmm::{PoolConfig, Vmm};
use serde::Serialize;

use super::{Machine, Stats};

/// The template the benchmark builds when it does not exist: the data-science stack
/// imported, and RAM for the 1 GiB first-touch row.
pub const TEMPLATE: &str = "bench-compute";
const TEMPLATE_PACKAGES: &[&str] = &["numpy", "pandas", "sklearn"];
const TEMPLATE_MEMORY_MIB: u64 = 4096;

/// Memory each workload may allocate (the 1 GiB row needs more than the default).
const MEMORY_LIMIT: u64 = 2 << 30;

/// One program: untimed `setup`, then `warmup` untimed and `reps` timed runs of `body`, in
/// each of `processes` fresh processes (forks on one side, host processes on the other).
struct Workload {
    name: &'static str,
    setup: &'static str,
    body: &'static str,
    warmup: usize,
    reps: usize,
    processes: usize,
    /// A module the workload needs; without it on either side the row is skipped.
    needs: Option<&'static str>,
}

const NUMPY_SETUP: &str = "import numpy as np
rng = np.random.default_rng(0)
a = rng.random((1000, 1000))
b = rng.random((1000, 1000))";

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "pure-Python loop (3M iterations)",
        setup: "",
        body: "s = 0\nfor i in range(3_000_000):\n    s += i",
        warmup: 1,
        reps: 5,
        processes: 1,
        needs: None,
    },
    Workload {
        name: "json dumps+loads (50k records)",
        setup: "import json\ndata = [{'id': i, 'name': f'item{i}', 'tags': ['a', 'b'], 'score': i * 0.5} for i in range(50_000)]",
        body: "json.loads(json.dumps(data))",
        warmup: 1,
        reps: 5,
        processes: 1,
        needs: None,
    },
    Workload {
        name: "regex scan (7 MB of text)",
        setup: "import random, re\nrandom.seed(1)\nwords = ['alpha', 'beta', 'gamma', 'x@y.com', 'user42@example.org']\ntext = ' '.join(random.choice(words) for _ in range(1_000_000))\npattern = re.compile(r'\\b[\\w.]+@[\\w.]+\\.(?:com|org)\\b')",
        body: "len(pattern.findall(text))",
        warmup: 1,
        reps: 5,
        processes: 1,
        needs: None,
    },
    Workload {
        name: "1000x1000 matmul, first",
        setup: NUMPY_SETUP,
        body: "a @ b",
        warmup: 0,
        reps: 1,
        processes: 5,
        needs: None,
    },
    Workload {
        name: "1000x1000 matmul, steady",
        setup: NUMPY_SETUP,
        body: "a @ b",
        warmup: 2,
        reps: 10,
        processes: 1,
        needs: None,
    },
    Workload {
        name: "numpy.linalg.svd 500x500",
        setup: "import numpy as np\na = np.random.default_rng(0).random((500, 500))",
        body: "np.linalg.svd(a)",
        warmup: 1,
        reps: 5,
        processes: 1,
        needs: None,
    },
    Workload {
        name: "pandas group-by (1M rows)",
        setup: "import numpy as np, pandas as pd\nrng = np.random.default_rng(0)\ndf = pd.DataFrame({'key': rng.integers(0, 1000, 1_000_000), 'value': rng.random(1_000_000)})",
        body: "df.groupby('key')['value'].agg(['mean', 'sum', 'count'])",
        warmup: 1,
        reps: 5,
        processes: 1,
        needs: Some("pandas"),
    },
    Workload {
        name: "scikit-learn random forest fit",
        setup: "from sklearn.datasets import make_classification\nfrom sklearn.ensemble import RandomForestClassifier\nX, y = make_classification(n_samples=2000, n_features=20, random_state=0)",
        body: "RandomForestClassifier(n_estimators=50, random_state=0, n_jobs=1).fit(X, y)",
        warmup: 1,
        reps: 3,
        processes: 1,
        needs: Some("sklearn"),
    },
    Workload {
        name: "first touch of 100 MiB",
        setup: "",
        body: "block = b'\\x01' * (100 << 20)\ndel block",
        warmup: 0,
        reps: 5,
        processes: 1,
        needs: None,
    },
    Workload {
        name: "first touch of 1 GiB",
        setup: "",
        body: "block = b'\\x01' * (1 << 30)\ndel block",
        warmup: 0,
        reps: 3,
        processes: 1,
        needs: None,
    },
];

/// Prints the BLAS implementation's kernel choice (OpenBLAS's `openblas_get_corename`).
const CORENAME: &str = "import ctypes, numpy
try:
    blas = ctypes.CDLL('libblas.so.3')
    blas.openblas_get_corename.restype = ctypes.c_char_p
    print(blas.openblas_get_corename().decode())
except (OSError, AttributeError):
    print('not OpenBLAS')";

/// The program both sides run for one workload: prints its timed samples (seconds) as JSON.
fn program(workload: &Workload) -> String {
    let indented: String = workload
        .body
        .lines()
        .map(|line| format!("    {line}\n"))
        .collect();
    format!(
        "import json, time\n{setup}\nfor _ in range({warmup}):\n{indented}samples = []\nfor _ in range({reps}):\n    started = time.perf_counter()\n{indented}    samples.append(time.perf_counter() - started)\nprint(json.dumps(samples))\n",
        setup = workload.setup,
        warmup = workload.warmup,
        reps = workload.reps,
    )
}

/// One workload on both sides.
#[derive(Debug, Serialize)]
pub struct ComputeRow {
    pub workload: &'static str,
    pub fork: Stats,
    pub host: Stats,
    /// fork p50 / host p50.
    pub ratio_p50: f64,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub workload: &'static str,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct ComputeReport {
    pub machine: Machine,
    pub template: String,
    /// OpenBLAS's kernel choice in a fork and on the host (equal when the CPU features
    /// the guest sees are the host's).
    pub blas_core_fork: String,
    pub blas_core_host: String,
    pub workloads: Vec<ComputeRow>,
    pub skipped: Vec<Skipped>,
}

/// Runs every workload in forks of `template` (building [`TEMPLATE`] first if that is the
/// one asked for and it does not exist) and on the host.
pub fn run(template: &str) -> Result<ComputeReport> {
    let store = crate::template::store();
    if template == TEMPLATE && store.show(TEMPLATE).is_err() {
        eprintln!("bench: building template {TEMPLATE:?} (first run only)…");
        let mut spec = TemplateSpec::python(TEMPLATE);
        spec.modules = TEMPLATE_PACKAGES.iter().map(|m| m.to_string()).collect();
        spec.extra_packages = TEMPLATE_PACKAGES
            .iter()
            .filter(|&&m| m != "numpy")
            .map(|m| format!("python3-{m}"))
            .collect();
        spec.memory_mib = TEMPLATE_MEMORY_MIB;
        crate::template::build(&spec)?;
    }
    let engine = Engine::new(
        Arc::new(Vmm::new()?),
        store,
        PoolConfig {
            size: 0,
            refill_threads: 1,
        },
    );
    let in_fork = |code: &str| -> Result<String> {
        let mut request = ExecRequest::python(code.as_bytes().to_vec());
        request.limits = ExecLimits {
            timeout: Duration::from_secs(300),
            memory_bytes: MEMORY_LIMIT,
            ..ExecLimits::default()
        };
        let result = engine.exec(template, &request)?;
        if result.exit_code != 0 {
            bail!(
                "exit {}: {}",
                result.exit_code,
                String::from_utf8_lossy(&result.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&result.stdout).into_owned())
    };

    let mut report = ComputeReport {
        machine: Machine::describe(),
        template: template.to_string(),
        blas_core_fork: in_fork(CORENAME)?.trim().to_string(),
        blas_core_host: on_host(CORENAME)?.trim().to_string(),
        workloads: Vec::new(),
        skipped: Vec::new(),
    };
    for workload in WORKLOADS {
        if let Some(module) = workload.needs {
            let check = format!("import {module}");
            let missing = [
                ("the template", in_fork(&check)),
                ("the host", on_host(&check)),
            ]
            .into_iter()
            .find_map(|(side, result)| result.err().map(|_| side));
            if let Some(side) = missing {
                report.skipped.push(Skipped {
                    workload: workload.name,
                    reason: format!("{module} is not installed in {side}"),
                });
                continue;
            }
        }
        eprintln!("bench: {}…", workload.name);
        let code = program(workload);
        let mut fork = Vec::new();
        let mut host = Vec::new();
        for _ in 0..workload.processes {
            fork.extend(samples(&in_fork(&code).context(workload.name)?)?);
            host.extend(samples(&on_host(&code).context(workload.name)?)?);
        }
        let (fork, host) = (Stats::of(fork), Stats::of(host));
        report.workloads.push(ComputeRow {
            workload: workload.name,
            ratio_p50: fork.p50_ms / host.p50_ms,
            fork,
            host,
        });
    }
    Ok(report)
}

/// Runs `code` in a fresh host process of Debian's Python, with the environment templates
/// give their programs (one OpenBLAS thread, as a sandbox has one CPU).
fn on_host(code: &str) -> Result<String> {
    let mut command = Command::new("/usr/bin/python3");
    command.arg("-c").arg(code).env_clear().stdin(Stdio::null());
    for pair in forkvm_template::build::TEMPLATE_ENV {
        if let Some((key, value)) = pair.split_once('=') {
            command.env(key, value);
        }
    }
    let out = command
        .output()
        .context("running /usr/bin/python3 on the host (scripts/setup.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "host python3 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn samples(output: &str) -> Result<Vec<Duration>> {
    let seconds: Vec<f64> = serde_json::from_str(output.trim())
        .with_context(|| format!("unexpected workload output {output:?}"))?;
    Ok(seconds.into_iter().map(Duration::from_secs_f64).collect())
}

pub fn table(report: &ComputeReport) -> String {
    let mut out = format!(
        "forkvm bench compute on {} ({} cores, {}), template {:?}\nOpenBLAS kernel: fork {}, host {}\n\n{:<36} {:>12} {:>12} {:>7}\n",
        report.machine.cpu,
        report.machine.cores,
        report.machine.kvm,
        report.template,
        report.blas_core_fork,
        report.blas_core_host,
        "workload",
        "fork p50",
        "host p50",
        "ratio"
    );
    for row in &report.workloads {
        out.push_str(&format!(
            "{:<36} {:>9.1} ms {:>9.1} ms {:>6.2}x\n",
            row.workload, row.fork.p50_ms, row.host.p50_ms, row.ratio_p50
        ));
    }
    for skipped in &report.skipped {
        out.push_str(&format!(
            "{:<36} skipped: {}\n",
            skipped.workload, skipped.reason
        ));
    }
    out
}
