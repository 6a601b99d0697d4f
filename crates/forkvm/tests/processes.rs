//! Processes in the sandbox, end to end with the real binaries: subprocess, os.system,
//! fork and wait, multiprocessing, a venv, pip, git, bash scripts, fork bombs, and the
//! `bash` language of `forkvm exec`.

mod common;

use std::process::Command;

use common::{forkvm_run, python, stderr, stdout};

/// Runs `program` with Python in a sandbox and returns its stdout, failing with its stderr
/// unless it exited 0.
fn python_ok(program: &str) -> String {
    let out = python(program);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    stdout(&out)
}

#[test]
fn subprocess_system_and_fork_behave_as_on_linux() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = python_ok(
        r#"
import os, subprocess
print(subprocess.run(["ls", "/"], capture_output=True, text=True).stdout.split()[:2])
print(subprocess.check_output("seq 1 100 | sort -rn | head -1", shell=True).decode().strip())
print(os.waitstatus_to_exitcode(os.system("exit 3")))
r = subprocess.run(["sh", "-c", "echo err >&2; exit 5"], capture_output=True)
print(r.returncode, r.stderr)
pid = os.fork()
if pid == 0:
    os._exit(7)
print(os.waitpid(pid, 0)[1] >> 8)
p = subprocess.Popen(["sleep", "30"])
p.kill()
print(p.wait())
try:
    subprocess.run(["/no/such/program"])
except FileNotFoundError as e:
    print("FileNotFoundError", e.errno)
print(subprocess.run(["cat"], input=b"through a pipe", capture_output=True).stdout)
"#,
    );
    assert_eq!(
        out,
        "['bin', 'boot']\n100\n3\n5 b'err\\n'\n7\n-9\nFileNotFoundError 2\nb'through a pipe'\n"
    );
}

#[test]
fn multiprocessing_pools_run_in_forked_processes() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = python_ok(
        r#"
import multiprocessing as mp, os
def work(x):
    return x * x, os.getpid()
with mp.get_context("fork").Pool(2) as pool:
    results = pool.map(work, range(8))
print([r[0] for r in results])
print(len({r[1] for r in results}) >= 1, all(pid != os.getpid() for _, pid in results))
ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=q.put, args=("from the child",))
p.start(); print(q.get()); p.join(); print(p.exitcode)
# Shared memory and the locks on it: two children add under a lock.
v = ctx.Value("i", 0)
def add(v):
    for _ in range(200):
        with v.get_lock():
            v.value += 1
ps = [ctx.Process(target=add, args=(v,)) for _ in range(2)]
[p.start() for p in ps]; [p.join() for p in ps]
e = ctx.Event()
p = ctx.Process(target=e.set); p.start(); p.join()
print(v.value, e.is_set())
"#,
    );
    assert_eq!(
        out,
        "[0, 1, 4, 9, 16, 25, 36, 49]\nTrue True\nfrom the child\n0\n400 True\n"
    );
}

#[test]
fn a_venv_pip_and_git_work_in_tmp() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = forkvm_run(
        &["--timeout", "240"],
        &[
            "/bin/bash",
            "-c",
            r#"set -e
cd /tmp
python3 -m venv /tmp/v
/tmp/v/bin/python -c 'print(1)'
# A wheel made here, installed from its file (no network).
python3 - <<'EOF'
import zipfile
with zipfile.ZipFile("/tmp/demo_pkg-1.0-py3-none-any.whl", "w") as w:
    w.writestr("demo_pkg/__init__.py", "ANSWER = 42\n")
    w.writestr("demo_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n")
    w.writestr("demo_pkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    w.writestr("demo_pkg-1.0.dist-info/RECORD", "")
EOF
/tmp/v/bin/python -m pip install --no-index --disable-pip-version-check -q /tmp/demo_pkg-1.0-py3-none-any.whl
/tmp/v/bin/python -c 'import demo_pkg; print(demo_pkg.ANSWER)'
mkdir repo && cd repo && git init -q
echo hello > f && git add f
git -c user.name=agent -c user.email=agent@example.com commit -qm first
git log --format=%s
"#,
        ],
        b"",
    );
    assert_eq!(stdout(&out), "1\n42\nfirst\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
}

const BASH_SCRIPT: &str = r#"
trap 'echo "bye from trap"' EXIT
total=0
for i in $(seq 1 10); do total=$((total + i)); done
echo "total=$total"
printf 'b\na\nc\n' | sort | tr '\n' ' '; echo
echo "to a file" > /tmp/out.txt; cat < /tmp/out.txt
upper=$(echo shout | tr a-z A-Z); echo "$upper"
(sleep 0.1; echo "background done") &
wait
ls /nonexistent 2>/dev/null || echo "ls failed as it should"
echo "pid is a number: $(( $$ > 0 ))"
"#;

#[test]
fn a_bash_script_with_pipes_jobs_and_traps_matches_the_host() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = forkvm_run(&["--timeout", "60"], &["/bin/bash", "-c", BASH_SCRIPT], b"");
    let host = Command::new("/bin/bash")
        .args(["-c", BASH_SCRIPT])
        .output()
        .expect("host bash");
    assert_eq!(
        stdout(&out),
        String::from_utf8_lossy(&host.stdout),
        "{}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn fork_bombs_end_with_the_process_limit() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let python = forkvm_run(
        &["--timeout", "60"],
        &["/usr/bin/python3", "-c", "import os\nwhile True: os.fork()"],
        b"",
    );
    assert_eq!(python.status.code(), Some(71), "{}", stderr(&python));
    assert!(
        stderr(&python).contains("process limit"),
        "{}",
        stderr(&python)
    );
    let bash = forkvm_run(
        &["--timeout", "60"],
        &["/bin/bash", "-c", ":(){ :|:; };:"],
        b"",
    );
    assert_eq!(bash.status.code(), Some(71), "{}", stderr(&bash));
    // In the background, the bomb goes with the sandbox, which ends with its first
    // process (the shell returns at once).
    let background = forkvm_run(
        &["--timeout", "60"],
        &["/bin/bash", "-c", ":(){ :|:& };:; echo started"],
        b"",
    );
    assert!(
        matches!(background.status.code(), Some(0 | 71)),
        "{}",
        stderr(&background)
    );
}

#[test]
fn exec_runs_bash_code_in_a_fork_of_the_template() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let cache = common::private_cache("processes");
    let out = common::forkvm_in(
        &cache,
        &[
            "exec",
            "--language",
            "bash",
            "echo hi; ls / | wc -l; exit 4",
        ],
    );
    let text = stdout(&out);
    assert!(text.starts_with("hi\n"), "{text}{}", stderr(&out));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let bomb = common::forkvm_in(&cache, &["exec", "import os\nwhile True: os.fork()"]);
    assert_eq!(bomb.status.code(), Some(71), "{}", stderr(&bomb));
    let after = common::forkvm_in(&cache, &["exec", "print(6 * 7)"]);
    assert_eq!(stdout(&after), "42\n", "{}", stderr(&after));
}
