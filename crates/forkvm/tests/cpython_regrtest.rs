//! CPython's own regression tests, run inside sandboxes with the real Debian interpreter.
//!
//! Prints a per-module table (passed / failed / errors / skipped) and holds a floor on the
//! total number of passing tests, so it can only go up. `scripts/cpython-table.sh` puts the
//! same runs beside the host's.

mod common;

use std::fmt::Write as _;

/// The modules, each with the extra `python3 -m test` arguments it needs.
const MODULES: &[(&str, &[&str])] = &[
    // The execution core.
    ("test_json", &[]),
    ("test_re", &[]),
    ("test_math", &[]),
    ("test_string", &[]),
    ("test_collections", &[]),
    ("test_itertools", &[]),
    ("test_functools", &[]),
    ("test_datetime", &[]),
    ("test_decimal", &[]),
    ("test_bisect", &[]),
    ("test_heapq", &[]),
    ("test_struct", &[]),
    ("test_base64", &[]),
    ("test_hashlib", &[]),
    ("test_textwrap", &[]),
    ("test_difflib", &[]),
    ("test_statistics", &[]),
    ("test_fractions", &[]),
    ("test_enum", &[]),
    ("test_dataclasses", &[]),
    ("test_csv", &[]),
    ("test_pathlib", &[]),
    ("test_tempfile", &[]),
    ("test_io", &[]),
    // Threads, signals, the event loop and sockets.
    ("test_threading", &[]),
    ("test_thread", &[]),
    ("test_threading_local", &[]),
    ("test_queue", &[]),
    ("test_concurrent_futures", &[]),
    ("test_signal", &[]),
    ("test_asyncio", &[]),
    ("test_socket", &[]),
    ("test_selectors", &[]),
    ("test_epoll", &[]),
    ("test_poll", &[]),
    ("test_select", &[]),
    // Its servers listen on loopback: the "network" resource.
    ("test_socketserver", &["-u", "network"]),
    ("test_sched", &[]),
    ("test_context", &[]),
    ("test_faulthandler", &[]),
    // Processes: fork, exec, wait, shells, and what runs a child python3.
    ("test_subprocess", &[]),
    ("test_os", &[]),
    ("test_posix", &[]),
    ("test_wait3", &[]),
    ("test_wait4", &[]),
    ("test_popen", &[]),
    ("test_shutil", &[]),
    ("test_calendar", &[]),
    ("test_gzip", &[]),
    ("test_tarfile", &[]),
    ("test_cmd_line", &[]),
    ("test_cmd_line_script", &[]),
];

/// Total passing tests across `MODULES` must not fall below this (raise it as it grows).
const PASS_FLOOR: u32 = 10300;

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    ran: u32,
    failures: u32,
    errors: u32,
    skipped: u32,
}

impl Counts {
    fn passed(&self) -> u32 {
        self.ran - self.failures - self.errors - self.skipped
    }
}

/// Parses unittest's summary: `Ran N tests …` then `OK (skipped=S)` or
/// `FAILED (failures=F, errors=E, skipped=S)`.
fn parse(output: &str) -> Option<Counts> {
    let ran_line = output.lines().rev().find(|l| l.starts_with("Ran "))?;
    let ran = ran_line.split_whitespace().nth(1)?.parse().ok()?;
    let verdict = output
        .lines()
        .rev()
        .find(|l| l.starts_with("OK") || l.starts_with("FAILED ("))?;
    let field = |name: &str| -> u32 {
        verdict
            .split(['(', ')', ','])
            .filter_map(|part| part.trim().strip_prefix(name)?.strip_prefix('='))
            .find_map(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(Counts {
        ran,
        failures: field("failures"),
        errors: field("errors"),
        skipped: field("skipped"),
    })
}

#[test]
fn parse_reads_unittest_summaries() {
    let c = parse("x\nRan 168 tests in 0.5s\n\nFAILED (errors=17, skipped=1)\n").unwrap();
    assert_eq!(
        (c.ran, c.failures, c.errors, c.skipped, c.passed()),
        (168, 0, 17, 1, 150)
    );
    let ok = parse("Ran 42 tests in 0.01s\n\nOK (skipped=2)\n").unwrap();
    assert_eq!((ok.ran, ok.skipped, ok.passed()), (42, 2, 40));
    assert!(parse("Traceback (most recent call last):").is_none());
}

#[test]
fn cpython_regression_tests_pass_inside_sandboxes() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let mut table =
        String::from("| module | passed | failed | errors | skipped |\n|---|---|---|---|---|\n");
    let mut total = Counts::default();
    let mut missing = Vec::new();
    for &(module, extra) in MODULES {
        let mut command = vec!["/usr/bin/python3", "-m", "test", "-v", module];
        command.extend(extra);
        let out = common::forkvm_run(&["--timeout", "900"], &command, b"");
        let text = format!("{}{}", common::stdout(&out), common::stderr(&out));
        match parse(&text) {
            Some(c) => {
                let _ = writeln!(
                    table,
                    "| {module} | {} | {} | {} | {} |",
                    c.passed(),
                    c.failures,
                    c.errors,
                    c.skipped
                );
                total.ran += c.ran;
                total.failures += c.failures;
                total.errors += c.errors;
                total.skipped += c.skipped;
            }
            None => {
                missing.push(module);
                let tail: String = text.lines().rev().take(15).collect::<Vec<_>>().join("\n");
                eprintln!("{module}: no unittest summary; last lines (reversed):\n{tail}");
            }
        }
    }
    let _ = writeln!(
        table,
        "| **total** | **{}** | {} | {} | {} |",
        total.passed(),
        total.failures,
        total.errors,
        total.skipped
    );
    println!("{table}");
    assert!(
        missing.is_empty(),
        "modules that did not finish: {missing:?}"
    );
    assert!(
        total.passed() >= PASS_FLOOR,
        "{} tests passed, below the floor of {PASS_FLOOR}",
        total.passed()
    );
}
