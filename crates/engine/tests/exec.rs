//! The exec protocol end to end on real KVM: every byte of output comes back exactly, each
//! way of ending has its exit code and error kind, and limits are enforced by the VMM.

mod common;

use std::time::{Duration, Instant};

use forkvm_engine::{Engine, EngineError, ErrorKind, ExecLimits, ExecRequest, ExecResult, FileIn};

fn engine() -> Option<&'static Engine> {
    common::engine("exec-templates", 4)
}

fn exec(engine: &Engine, request: &ExecRequest) -> ExecResult {
    engine.exec("python", request).unwrap()
}

fn python(engine: &Engine, code: &str) -> ExecResult {
    exec(engine, &ExecRequest::python(code))
}

#[test]
fn output_comes_back_byte_for_byte() {
    let Some(engine) = engine() else { return };
    let code = "import sys\n\
                print('line one')\n\
                print('ZEROBOOT_DONE \\x00 ünïcødé ✓')\n\
                sys.stdout.flush()\n\
                sys.stdout.buffer.write(bytes(range(256)))\n\
                sys.stdout.flush()\n\
                print('to stderr', file=sys.stderr)";
    let out = python(engine, code);
    let mut expected = "line one\nZEROBOOT_DONE \0 ünïcødé ✓\n".as_bytes().to_vec();
    expected.extend(0u8..=255);
    assert_eq!(out.stdout, expected);
    assert_eq!(out.stderr, b"to stderr\n");
    assert_eq!((out.exit_code, out.error.kind), (0, ErrorKind::None));
    assert!(!out.stdout_truncated && !out.stderr_truncated);
}

#[test]
fn code_with_any_bytes_runs() {
    let Some(engine) = engine() else { return };
    // A NUL byte in a string literal, and the seed project's markers as plain text.
    let mut code = b"s = '".to_vec();
    code.extend_from_slice(b"a\\x00b ZEROBOOT_EXIT:0 \xc3\xa9");
    code.extend_from_slice(b"'\nprint(len(s), s[-1])");
    assert_eq!(
        exec(engine, &ExecRequest::python(code)).stdout,
        "21 é\n".as_bytes()
    );
}

#[test]
fn stdin_env_cwd_and_files_reach_the_code() {
    let Some(engine) = engine() else { return };
    let mut request = ExecRequest::python(
        "import os, sys\n\
         print(sys.stdin.read().upper())\n\
         print(os.environ['GREETING'], os.getcwd())\n\
         print(open('data.bin', 'rb').read().hex(), oct(os.stat('/opt/tool.sh').st_mode & 0o777))\n\
         print(open('/opt/tool.sh').read())",
    );
    request.stdin = b"from stdin".to_vec();
    request.env.insert("GREETING".into(), "hello".into());
    request.cwd = Some("/work/area".into());
    request.files = vec![
        FileIn {
            path: "data.bin".into(),
            data: vec![0, 1, 0xfe, 0xff],
            mode: 0o600,
        },
        FileIn {
            path: "/opt/tool.sh".into(),
            data: b"echo hi".to_vec(),
            mode: 0o755,
        },
    ];
    let out = exec(engine, &request);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "FROM STDIN\nhello /work/area\n0001feff 0o755\necho hi\n"
    );
}

#[test]
fn endings_have_their_exit_codes() {
    let Some(engine) = engine() else { return };
    let traceback = python(engine, "def f():\n    return 1/0\nf()");
    assert_eq!(
        (traceback.exit_code, traceback.error.kind),
        (1, ErrorKind::None)
    );
    let stderr = String::from_utf8(traceback.stderr).unwrap();
    assert!(stderr.starts_with("Traceback (most recent call last):\n  File \"<string>\", line 3"));
    assert!(
        stderr.ends_with("ZeroDivisionError: division by zero\n"),
        "{stderr}"
    );
    assert!(!stderr.contains("agent.py"), "{stderr}");

    assert_eq!(python(engine, "raise SystemExit(3)").exit_code, 3);
    assert_eq!(python(engine, "import sys; sys.exit('bye')").exit_code, 1);
    // As `python3 -c` exits: the low 8 bits of an int, 1 for True, 0 for None.
    for (code, status) in [
        ("256", 0),
        ("-1", 255),
        ("True", 1),
        ("None", 0),
        ("2**70", 255),
    ] {
        let out = python(engine, &format!("raise SystemExit({code})"));
        assert_eq!(out.exit_code, status, "SystemExit({code})");
    }
    assert_eq!(python(engine, "import os; os._exit(7)").exit_code, 7);
    assert_eq!(
        python(engine, "import os; os.abort()").error.kind,
        ErrorKind::Fault
    );
}

#[test]
fn code_runs_as_the_main_module_of_python3_c() {
    let Some(engine) = engine() else { return };
    let code = "import pickle, sys, dataclasses, typing, __main__\n\
                @dataclasses.dataclass\nclass Point:\n    x: int\n    y: 'int' = 0\n\
                copy = pickle.loads(pickle.dumps(Point(1, 2)))\n\
                print(copy, typing.get_type_hints(Point)['y'].__name__)\n\
                print(sys.argv, __name__, __main__.Point is Point)";
    let out = python(engine, code);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Point(x=1, y=2) int\n['-c'] __main__ True\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ten_megabytes_of_output_are_capped_and_flagged() {
    let Some(engine) = engine() else { return };
    let out = python(
        engine,
        "import sys\nfor _ in range(10): sys.stdout.write('x' * (1 << 20))",
    );
    assert_eq!(out.stdout.len() as u64, ExecLimits::default().output_bytes);
    assert!(out.stdout_truncated && !out.stderr_truncated);
    assert_eq!(
        (out.exit_code, out.error.kind),
        (125, ErrorKind::OutputLimit)
    );
}

#[test]
fn a_busy_loop_ends_at_its_time_limits() {
    let Some(engine) = engine() else { return };
    let mut request = ExecRequest::python("while True: pass");
    request.limits.timeout = Duration::from_millis(700);
    let started = Instant::now();
    let out = exec(engine, &request);
    let elapsed = started.elapsed();
    assert_eq!((out.exit_code, out.error.kind), (124, ErrorKind::Timeout));
    assert!(elapsed >= Duration::from_millis(700), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(700) + Duration::from_secs(2),
        "{elapsed:?}"
    );

    let mut cpu = ExecRequest::python("while True: pass");
    cpu.limits.cpu_time = Some(Duration::from_millis(300));
    let out = exec(engine, &cpu);
    assert_eq!(out.error.kind, ErrorKind::Timeout);
    assert!(
        out.error.message.contains("CPU-time"),
        "{}",
        out.error.message
    );
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let Some(engine) = engine() else { return };
    let mut request =
        ExecRequest::python("chunks = []\nwhile True: chunks.append(bytearray(8 << 20))");
    request.limits.memory_bytes = 128 << 20;
    let out = exec(engine, &request);
    assert_eq!(out.error.kind, ErrorKind::MemoryLimit);
    assert!(String::from_utf8_lossy(&out.stderr).contains("MemoryError"));
    // The next request is unaffected.
    assert_eq!(python(engine, "print(sum(range(10)))").stdout, b"45\n");
}

#[test]
fn processes_share_one_memory_budget() {
    let Some(engine) = engine() else { return };
    // Each child touches 64 MiB: within the limit alone, not all four together.
    let mut request = ExecRequest::python(
        "import subprocess, sys\n\
         hog = 'b = bytearray(64 << 20)\\nfor i in range(0, len(b), 4096): b[i] = 1\\n\
         import time; time.sleep(2)'\n\
         ps = [subprocess.Popen([sys.executable, '-c', hog]) for _ in range(4)]\n\
         codes = sorted(p.wait() for p in ps)\n\
         print(codes)\n\
         sys.exit(1 if -9 in codes else 0)",
    );
    request.limits.memory_bytes = 128 << 20;
    let out = exec(engine, &request);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The largest are killed until the rest fit; the rest finish.
    assert!(stdout.starts_with("[-9, "), "{stdout}{stderr}");
    assert!(stdout.trim_end().ends_with(", 0]"), "{stdout}{stderr}");
    assert!(
        stderr.contains("forkvm: out of memory: killed process"),
        "{stderr}"
    );
    assert_eq!(
        out.error.kind,
        ErrorKind::MemoryLimit,
        "{}",
        out.error.message
    );
    assert_eq!(python(engine, "print(sum(range(10)))").stdout, b"45\n");
}

#[test]
fn child_processes_run_and_are_waited_for() {
    let Some(engine) = engine() else { return };
    let out = python(
        engine,
        "import os, subprocess\n\
         pid = os.fork()\n\
         if pid == 0:\n    os._exit(5)\n\
         print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n\
         print(subprocess.run(['ls', '/'], capture_output=True, text=True).stdout.split()[0])",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "5\nbin\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!((out.exit_code, out.error.kind), (0, ErrorKind::None));
}

#[test]
fn the_open_file_limit_applies() {
    let Some(engine) = engine() else { return };
    let mut request = ExecRequest::python(
        "files = []\ntry:\n    while True: files.append(open('/etc/hostname'))\n\
         except OSError as e:\n    print(e.errno, 16 < len(files) < 32)",
    );
    request.limits.open_files = 32;
    assert_eq!(exec(engine, &request).stdout, b"24 True\n");
}

#[test]
fn other_languages_are_refused_clearly() {
    let Some(engine) = engine() else { return };
    for language in ["node", "cobol"] {
        let mut request = ExecRequest::python("console.log(1)");
        request.language = language.into();
        let error = engine.exec("python", &request).unwrap_err();
        assert!(matches!(error, EngineError::UnsupportedLanguage { .. }));
        assert!(
            error.to_string().contains("unsupported language"),
            "{error}"
        );
    }
}

#[test]
fn shell_code_runs_with_the_images_shells() {
    let Some(engine) = engine() else { return };
    for language in ["bash", "sh"] {
        let mut request = ExecRequest::python("echo $((6 * 7)) | cat; echo err >&2; exit 3");
        request.language = language.into();
        let result = exec(engine, &request);
        assert_eq!(result.stdout, b"42\n", "{language}");
        assert_eq!(result.stderr, b"err\n", "{language}");
        assert_eq!(result.exit_code, 3, "{language}");
    }
}

#[test]
fn a_tenants_vm_is_reset_between_its_requests() {
    let Some(engine) = engine() else { return };
    let run = |code: &str| {
        let result = engine
            .exec_with(
                "python",
                &ExecRequest::python(code),
                forkvm_engine::Streams::new(),
                Some("tenant-a"),
            )
            .unwrap();
        assert_eq!(
            result.exit_code,
            0,
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        String::from_utf8(result.stdout).unwrap()
    };
    let template = engine.template("python").unwrap();
    run(
        "import builtins, os\nbuiltins.LEFTOVER = 1\nopen('/tmp/leftover', 'w').write('x')\nprint('ok')",
    );
    // The reset runs on a background thread; wait for the VM to be kept.
    let deadline = Instant::now() + Duration::from_secs(10);
    while template.recycler.kept() == 0 {
        assert!(Instant::now() < deadline, "the VM was not recycled");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The next request of the same tenant gets that VM, reset: nothing survived.
    assert_eq!(
        run(
            "import builtins, os\nprint(hasattr(builtins, 'LEFTOVER'), os.path.exists('/tmp/leftover'))"
        ),
        "False False\n"
    );
    assert!(
        template.recycler.take("tenant-b").is_none(),
        "another tenant never gets it"
    );
}

#[test]
fn memory_the_code_never_mapped_cannot_be_touched() {
    let Some(engine) = engine() else { return };
    // Writing a byte into every page of 640 MiB the program never mapped once grew the host
    // by that much, past any memory limit. The page tables refuse the first write.
    let mut request = ExecRequest::python(
        "import ctypes\nfor a in range(0x8000000, 0x30000000, 4096): ctypes.memset(a, 1, 1)",
    );
    request.limits.memory_bytes = 64 << 20;
    let out = exec(engine, &request);
    assert_eq!((out.exit_code, out.error.kind), (139, ErrorKind::Fault));
    assert!(
        out.error.message.contains("write to address 0x8000000"),
        "{}",
        out.error.message
    );
    // And the program's own SIGSEGV handler runs, as on Linux (faulthandler's).
    let caught = python(
        engine,
        "import faulthandler, ctypes
faulthandler.enable()
ctypes.memset(0x8000000, 1, 1)",
    );
    assert_eq!(caught.exit_code, 139);
    let stderr = String::from_utf8_lossy(&caught.stderr);
    assert!(
        stderr.contains("Fatal Python error: Segmentation fault"),
        "{stderr}"
    );
}

/// Maps glibc's gconv cache shared (the snapshot's frozen segment, which every fork of the
/// template shares), writes to the file, and prints what the mapping then shows.
const WRITE_FROZEN: &str = r#"
import mmap, os
path = "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache"
fd = os.open(path, os.O_RDWR)
shared = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
before = shared[:4]
os.pwrite(fd, b"FORK", 0)
print(before != b"FORK", shared[:4])
"#;

#[test]
fn a_write_to_a_frozen_segment_stays_in_its_fork() {
    let Some(engine) = engine() else { return };
    // Each fork sees its own write through its mapping, never another fork's: the write
    // gives the fork a copy of the segment first.
    for _ in 0..3 {
        let out = python(engine, WRITE_FROZEN);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "True b'FORK'\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
