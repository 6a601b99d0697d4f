//! End-to-end tests of `forkvm run` with the real Debian python3 and numpy.

mod common;

use common::{forkvm_run, python, stderr, stdout};

#[test]
fn numpy_one_liner() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = python("import numpy; print(numpy.arange(6).reshape(2,3) @ numpy.ones(3))");
    assert_eq!(stdout(&out), "[ 3. 12.]\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
}

const STDLIB_PROGRAM: &str = r#"
import json, re, hashlib, decimal, sqlite3, datetime, zlib
print(json.dumps({"b": [1, 2.5, None], "a": "\u00e9"}, sort_keys=True))
print(re.findall(r"(\w+)@(\w+)\.com", "x alice@example.com, bob@test.com"))
print(hashlib.sha256(b"forkvm").hexdigest(), hashlib.md5(b"forkvm").hexdigest())
decimal.getcontext().prec = 40
print(decimal.Decimal(1) / decimal.Decimal(7))
db = sqlite3.connect(":memory:")
db.execute("create table t (k text, v integer)")
db.executemany("insert into t values (?, ?)", [("x", 1), ("y", 2), ("x", 3)])
print(db.execute("select k, sum(v) from t group by k order by k").fetchall())
print(datetime.date(2024, 2, 28) + datetime.timedelta(days=2), datetime.datetime(2020, 1, 1).isoformat())
data = b"forkvm " * 1000
print(len(zlib.compress(data)), zlib.crc32(data), zlib.decompress(zlib.compress(data)) == data)
"#;

#[test]
fn stdlib_matches_host_python() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let host = std::process::Command::new("/usr/bin/python3")
        .args(["-c", STDLIB_PROGRAM])
        .output()
        .expect("host python3");
    let sandbox = python(STDLIB_PROGRAM);
    assert_eq!(
        stdout(&sandbox),
        String::from_utf8_lossy(&host.stdout),
        "{}",
        stderr(&sandbox)
    );
    assert!(stdout(&sandbox).lines().count() == 7);
}

#[test]
fn files_in_the_image_and_tmp() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = python(
        "import os\n\
         print(open('/etc/os-release').read().split('\\n')[0])\n\
         open('/tmp/x', 'w').write('round trip')\n\
         print(open('/tmp/x').read())\n\
         os.remove('/tmp/x')\n\
         print(os.path.exists('/tmp/x'))",
    );
    assert_eq!(
        stdout(&out),
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nround trip\nFalse\n",
        "{}",
        stderr(&out)
    );
}

#[test]
fn threads_run_beside_child_processes() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = python(
        "import threading, subprocess\n\
         t = threading.Thread(target=print, args=('thread ran',), kwargs={'flush': True})\n\
         t.start()\n\
         t.join()\n\
         print(subprocess.run(['echo', 'child ran'], capture_output=True, text=True).stdout, end='')",
    );
    assert_eq!(stdout(&out), "thread ran\nchild ran\n", "{}", stderr(&out));
}

#[test]
fn exit_status_and_stdin_pass_through() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = forkvm_run(
        &[],
        &[
            "/usr/bin/python3",
            "-c",
            "import sys; print(sys.stdin.read().upper()); sys.exit(3)",
        ],
        b"piped in",
    );
    assert_eq!(stdout(&out), "PIPED IN\n");
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn wild_pointer_write_crashes_with_sigsegv() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = python("import ctypes; ctypes.memset(0x700000000, 1, 8)");
    assert_eq!(out.status.code(), Some(128 + 11));
    assert!(
        stderr(&out).contains("page fault (#PF)")
            && stderr(&out).contains("write to address 0x700000000"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn out_of_range_buffers_get_efault() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = python(
        "import ctypes, os\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         print(libc.write(1, ctypes.c_void_p(0x700000000), 10), ctypes.get_errno())\n\
         print(libc.read(0, ctypes.c_void_p(0x700000000), 10), ctypes.get_errno())",
    );
    assert_eq!(stdout(&out), "-1 14\n-1 14\n", "{}", stderr(&out));
}

#[test]
fn infinite_loop_times_out() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let start = std::time::Instant::now();
    let out = forkvm_run(
        &["--timeout", "1"],
        &["/usr/bin/python3", "-c", "while True: pass"],
        b"",
    );
    assert_eq!(out.status.code(), Some(124));
    assert!(stderr(&out).contains("timeout"), "{}", stderr(&out));
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn memory_exhaustion_raises_memory_error() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = forkvm_run(
        &["--memory", "256"],
        &[
            "/usr/bin/python3",
            "-c",
            "a = []\ntry:\n    while True: a.append(bytearray(8 << 20))\nexcept MemoryError:\n    print('MemoryError', len(a) > 5)",
        ],
        b"",
    );
    assert_eq!(stdout(&out), "MemoryError True\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn output_flood_is_capped_and_flagged() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = forkvm_run(
        &["--output-limit", "1048576"],
        &[
            "/usr/bin/python3",
            "-c",
            "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024): sys.stdout.write(chunk)",
        ],
        b"",
    );
    assert_eq!(out.stdout.len(), 1 << 20);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("output truncated"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn strace_names_syscalls() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let out = forkvm_run(&["--strace"], &["/usr/bin/python3", "-c", "pass"], b"");
    let trace = stderr(&out);
    assert!(
        trace.contains("openat(") && trace.contains("exit_group(0,"),
        "{trace}"
    );
    assert!(trace.contains("\"/usr/lib/python3.11"), "{trace}");
}
