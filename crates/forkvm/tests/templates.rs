//! End-to-end tests of `forkvm template …` and `forkvm exec` in a private cache directory
//! (the Debian image is linked in, so nothing is rebuilt).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cache_dir(name: &str) -> PathBuf {
    common::private_cache(name)
}

fn forkvm(cache: &Path, args: &[&str]) -> Output {
    common::forkvm_in(cache, args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn build_list_show_exec_remove() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let cache = cache_dir("lifecycle");
    let built = forkvm(&cache, &["template", "build", "py"]);
    assert!(built.status.success(), "{}", text(&built.stderr));
    assert!(text(&built.stdout).contains("python3 /opt/forkvm/agent.py numpy"));

    let listed = forkvm(&cache, &["template", "list"]);
    assert!(
        text(&listed.stdout).starts_with("py "),
        "{}",
        text(&listed.stdout)
    );
    let shown = forkvm(&cache, &["template", "show", "py"]);
    assert!(
        text(&shown.stdout).contains(&format!(
            "format:      {}",
            forkvm_template::snapshot::SNAPSHOT_FORMAT
        )),
        "{}",
        text(&shown.stdout)
    );

    let exec = forkvm(
        &cache,
        &[
            "exec",
            "--template",
            "py",
            "import numpy, sys\nprint(numpy.eye(2).sum())\nsys.exit(4)",
        ],
    );
    assert_eq!(text(&exec.stdout), "2.0\n");
    assert_eq!(exec.status.code(), Some(4));

    std::fs::write(cache.join("stdin.txt"), b"piped").unwrap();
    let stdin_arg = cache.join("stdin.txt");
    let json = forkvm(
        &cache,
        &[
            "exec",
            "--template",
            "py",
            "--json",
            "--stdin",
            stdin_arg.to_str().unwrap(),
            "-e",
            "K=V",
            "import os, sys; print(sys.stdin.read(), os.environ['K']); sys.exit(2)",
        ],
    );
    assert_eq!(json.status.code(), Some(2));
    let reply: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(reply["stdout"], "piped V\n");
    assert_eq!(reply["exit_code"], 2);
    assert_eq!(reply["error"]["kind"], "none");
    assert!(reply["timings"]["total_us"].as_u64().unwrap() > 0);

    let limited = forkvm(
        &cache,
        &[
            "exec",
            "--template",
            "py",
            "--timeout",
            "0.5",
            "while True: pass",
        ],
    );
    assert_eq!(limited.status.code(), Some(124));
    assert!(
        text(&limited.stderr).contains("timeout"),
        "{}",
        text(&limited.stderr)
    );

    let failing = forkvm(&cache, &["exec", "--template", "py", "print(1/0)"]);
    assert_eq!(failing.status.code(), Some(1));
    assert!(
        text(&failing.stderr).contains("ZeroDivisionError"),
        "{}",
        text(&failing.stderr)
    );

    let removed = forkvm(&cache, &["template", "rm", "py"]);
    assert!(removed.status.success());
    let missing = forkvm(&cache, &["exec", "--template", "py", "pass"]);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("no template named \"py\""),
        "{}",
        text(&missing.stderr)
    );
}

#[test]
fn bad_names_and_failing_entries_are_reported() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let cache = cache_dir("errors");
    let bad = forkvm(&cache, &["template", "build", "../escape"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("invalid template name"),
        "{}",
        text(&bad.stderr)
    );

    let ended = forkvm(
        &cache,
        &[
            "template",
            "build",
            "broken",
            "--entry",
            "/usr/bin/python3",
            "-c",
            "print('no channel read')",
        ],
    );
    assert!(!ended.status.success());
    let stderr = text(&ended.stderr);
    assert!(
        stderr.contains("ended") && stderr.contains("no channel read"),
        "{stderr}"
    );
    assert!(!cache.join("templates/broken").exists());
}

/// Plots with seaborn and prints the PNG's size and SHA-256, then two fitted numbers.
const PLOT: &str = r#"
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt, seaborn as sns, numpy as np, pandas as pd, io, hashlib
rng = np.random.default_rng(0)
df = pd.DataFrame({"x": rng.normal(size=200), "y": rng.normal(size=200), "g": rng.integers(0, 3, 200)})
fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
sns.scatterplot(data=df, x="x", y="y", hue="g", ax=ax)
ax.set_title("forkvm")
png = io.BytesIO()
fig.savefig(png, format="png", metadata={"Software": None})
print(len(png.getvalue()), hashlib.sha256(png.getvalue()).hexdigest())
from sklearn.linear_model import LinearRegression
import scipy.stats
print(round(LinearRegression().fit(df[["x"]], df["y"]).coef_[0], 6), round(scipy.stats.pearsonr(df.x, df.y)[0], 6))
"#;

#[test]
fn a_data_science_template_plots_byte_for_byte_what_the_host_plots() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    // Importing matplotlib.pyplot during the warm-up starts a thread (a timer that warns
    // when building the font cache is slow); the build used to fail on it.
    let cache = cache_dir("data-science");
    let packages = "pandas,matplotlib,seaborn,sklearn,scipy";
    let built = forkvm(&cache, &["template", "build", "ds", "--packages", packages]);
    assert!(built.status.success(), "{}", text(&built.stderr));
    let sandbox = forkvm(&cache, &["exec", "--template", "ds", PLOT]);
    assert!(sandbox.status.success(), "{}", text(&sandbox.stderr));

    let host = Command::new("/usr/bin/python3")
        .args(["-c", PLOT])
        .output()
        .expect("running the host's python3");
    if !host.status.success() {
        // scripts/setup.sh installs the same Debian packages on the host.
        assert!(
            std::env::var_os("FORKVM_REQUIRE_KVM").is_none(),
            "the host cannot run the plot (run scripts/setup.sh): {}",
            text(&host.stderr)
        );
        eprintln!("skipping the host comparison: {}", text(&host.stderr));
        return;
    }
    assert_eq!(text(&sandbox.stdout), text(&host.stdout));
}

#[test]
fn a_template_whose_entry_starts_a_helper_holds_it_in_every_fork() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let cache = cache_dir("helpers");
    assert!(!common::COUNTER.contains('\''));
    let script = format!(
        "python3 -c '{}' & exec python3 /opt/forkvm/agent.py",
        common::COUNTER
    );
    let built = forkvm(
        &cache,
        &[
            "template",
            "build",
            "helper",
            "--entry",
            "/bin/bash",
            "-c",
            &script,
        ],
    );
    assert!(built.status.success(), "{}", text(&built.stderr));
    let shown = forkvm(&cache, &["template", "show", "helper"]);
    assert!(shown.status.success(), "{}", text(&shown.stderr));

    // Every fork starts from the snapshot: the helper there, its count at zero, its parent
    // the agent (which replaced the shell as the first process, whose pid each fork
    // renumbers).
    let ask_and_tell = format!("{}\nimport os\nprint(os.getpid())", common::ASK);
    let mut answers = Vec::new();
    for _ in 0..3 {
        let exec = forkvm(&cache, &["exec", "--template", "helper", &ask_and_tell]);
        assert!(exec.status.success(), "{}", text(&exec.stderr));
        let out = text(&exec.stdout);
        let fields: Vec<String> = out.split_whitespace().map(str::to_string).collect();
        assert_eq!(fields.len(), 4, "{out}");
        assert_eq!(fields[0], "1", "{out}");
        assert_eq!(
            fields[2], fields[3],
            "the helper's parent is the agent: {out}"
        );
        answers.push(fields[1].clone());
    }
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "one helper pid: {answers:?}"
    );

    // Two questions in one request: one helper, counting on.
    let twice = forkvm(
        &cache,
        &[
            "exec",
            "--template",
            "helper",
            &format!("{}\n{}", common::ASK, common::ASK),
        ],
    );
    let out = text(&twice.stdout);
    let counts: Vec<&str> = out
        .lines()
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(counts, ["1", "2"], "{}", text(&twice.stderr));
}

#[test]
fn templates_from_specs_carry_pypi_and_npm_packages_files_and_warm_up() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    forkvm_testkit::node_image();
    let cache = cache_dir("specs");
    let specs = cache.join("specs");
    std::fs::create_dir_all(specs.join("data/nested")).unwrap();
    std::fs::write(
        specs.join("data/nested/greeting.txt"),
        "hello from the spec\n",
    )
    .unwrap();
    std::fs::write(
        specs.join("py.toml"),
        "runtime = \"python\"\npypi = [\"faker\", \"httpx\"]\nmodules = [\"httpx\"]\n\
         warmup = \"\"\"\nimport faker\nfaker.Faker().name()\n\"\"\"\n\
         [env]\nGREETING = \"hej\"\n[[files]]\nfrom = \"data\"\nto = \"/srv/data\"\n",
    )
    .unwrap();
    let py_spec = specs.join("py.toml");
    let built = forkvm(
        &cache,
        &[
            "template",
            "build",
            "py",
            "--spec",
            py_spec.to_str().unwrap(),
        ],
    );
    assert!(built.status.success(), "{}", text(&built.stderr));
    let shown = text(&forkvm(&cache, &["template", "show", "py"]).stdout);
    assert!(
        shown.contains("Faker=="),
        "the resolved versions are recorded: {shown}"
    );
    assert!(shown.contains("httpx=="), "{shown}");
    assert!(
        shown.contains("pypi = [\"faker\", \"httpx\"]"),
        "the spec is recorded: {shown}"
    );
    let ran = forkvm(
        &cache,
        &[
            "exec",
            "--template",
            "py",
            "import sys, os, faker, httpx\n\
             print('faker' in sys.modules, bool(faker.Faker().name()), httpx.__name__,\n\
                   os.environ['GREETING'], open('/srv/data/nested/greeting.txt').read().strip())",
        ],
    );
    assert!(ran.status.success(), "{}", text(&ran.stderr));
    assert_eq!(
        text(&ran.stdout),
        "True True httpx hej hello from the spec\n"
    );

    std::fs::write(
        specs.join("node.toml"),
        "runtime = \"node\"\nnpm = [\"lodash\"]\n\
         warmup = \"const _ = require('lodash'); globalThis.pairs = _.chunk([1, 2, 3, 4], 2);\"\n",
    )
    .unwrap();
    let node_spec = specs.join("node.toml");
    let built = forkvm(
        &cache,
        &[
            "template",
            "build",
            "js",
            "--spec",
            node_spec.to_str().unwrap(),
        ],
    );
    assert!(built.status.success(), "{}", text(&built.stderr));
    assert!(text(&forkvm(&cache, &["template", "show", "js"]).stdout).contains("lodash@"));
    let ran = forkvm(
        &cache,
        &[
            "exec",
            "--template",
            "js",
            "import _ from 'lodash'; const fp = require('lodash/fp');\n\
             console.log(JSON.stringify(pairs), _.sum([1, 2, 3]), typeof fp.map)",
        ],
    );
    assert!(ran.status.success(), "{}", text(&ran.stderr));
    assert_eq!(text(&ran.stdout), "[[1,2],[3,4]] 6 function\n");

    // A package that does not exist fails the build, naming it.
    std::fs::write(
        specs.join("bad.toml"),
        "pypi = [\"forkvm-no-such-package-x7\"]\n",
    )
    .unwrap();
    let bad = specs.join("bad.toml");
    let failed = forkvm(
        &cache,
        &["template", "build", "bad", "--spec", bad.to_str().unwrap()],
    );
    assert!(!failed.status.success());
    assert!(
        text(&failed.stderr).contains("forkvm-no-such-package-x7"),
        "{}",
        text(&failed.stderr)
    );
}

/// The content digest of a template, from `template show`.
fn content_digest(cache: &Path, name: &str) -> String {
    let shown = text(&forkvm(cache, &["template", "show", name]).stdout);
    let line = shown
        .lines()
        .find_map(|l| l.strip_prefix("content:"))
        .unwrap_or_else(|| panic!("no content digest: {shown}"));
    line.trim().to_string()
}

#[test]
fn a_lock_rebuilds_the_same_template_and_refuses_what_differs() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    forkvm_testkit::node_image();
    let cache = cache_dir("locks");
    let dir = cache.join("specs");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("t.toml");
    let lock = dir.join("t.lock");
    std::fs::write(
        &spec,
        "runtime = \"node\"\nnpm = [\"is-odd\"]\npypi = [\"six\"]\n\
         warmup = \"globalThis.isOdd = require('is-odd')\"\n",
    )
    .unwrap();
    let build = |name: &str| {
        forkvm(
            &cache,
            &[
                "template",
                "build",
                name,
                "--spec",
                spec.to_str().unwrap(),
                "--lock",
                lock.to_str().unwrap(),
            ],
        )
    };
    let first = build("a");
    assert!(first.status.success(), "{}", text(&first.stderr));
    let written = std::fs::read_to_string(&lock).unwrap();
    assert!(
        written.contains("six==") && written.contains("--hash=sha256:"),
        "PyPI wheels are pinned by hash: {written}"
    );
    assert!(
        written.contains("is-number"),
        "npm's lock holds the dependencies too: {written}"
    );
    assert_eq!(
        text(&forkvm(&cache, &["template", "lock", "a"]).stdout),
        written,
        "`template lock` prints the same lock"
    );

    // Built again from the lock (another name, same spec): the same bytes.
    let second = build("b");
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(text(&second.stderr).contains("pins it"));
    assert_eq!(content_digest(&cache, "a"), content_digest(&cache, "b"));
    let ran = forkvm(
        &cache,
        &[
            "exec",
            "--template",
            "b",
            "console.log(isOdd(3), require('is-number')(5))",
        ],
    );
    assert!(ran.status.success(), "{}", text(&ran.stderr));
    assert_eq!(text(&ran.stdout), "true true\n");

    // A wheel whose hash is not the pinned one is refused, naming it.
    let pinned = written.lines().find(|l| l.contains("six==")).unwrap();
    let hash = pinned.split("sha256:").nth(1).unwrap();
    let hash = &hash[..64];
    std::fs::write(&lock, written.replace(hash, &"0".repeat(64))).unwrap();
    let tampered = build("c");
    assert!(!tampered.status.success());
    assert!(
        text(&tampered.stderr).contains("six"),
        "{}",
        text(&tampered.stderr)
    );

    // A spec changed since the lock was made is refused before anything is installed.
    std::fs::write(&lock, &written).unwrap();
    std::fs::write(
        &spec,
        "runtime = \"node\"\nnpm = [\"is-odd\", \"is-even\"]\npypi = [\"six\"]\n",
    )
    .unwrap();
    let changed = build("d");
    assert!(!changed.status.success());
    assert!(
        text(&changed.stderr).contains("the spec"),
        "{}",
        text(&changed.stderr)
    );
}
