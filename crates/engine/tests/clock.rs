//! Clocks in forks on real KVM: the vDSO answers clock reads without leaving the guest, they
//! agree with the host's clocks, and monotonic time never runs backwards across requests,
//! a warm pool's resets, or forks of a session.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_engine::{Engine, ExecRequest, Session, Streams, run_request};
use forkvm_kernel::{CaptureBuffer, Console, Input};
use forkvm_protocol::Request;
use forkvm_template::TemplateStore;
use forkvm_vmm::{PoolConfig, Sandbox, Vmm};

fn store() -> Option<TemplateStore> {
    if !forkvm_testkit::kvm_available() {
        return None;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("clock-templates");
    Some(forkvm_testkit::python_template(&dir))
}

fn fork_of(vmm: &Vmm, store: &TemplateStore) -> (Sandbox, CaptureBuffer) {
    let (_, source) = store.load("python", vmm).unwrap();
    let stdout = CaptureBuffer::default();
    let console = Console::new(
        Input::Empty,
        Box::new(stdout.clone()),
        Box::new(std::io::sink()),
        1 << 20,
    );
    let prepared = vmm.prepare_fork(&source).unwrap();
    (vmm.finish_fork(prepared, &source, console).unwrap(), stdout)
}

fn exec_in(sandbox: &mut Sandbox, stdout: &CaptureBuffer, code: &str) -> String {
    let frame = forkvm_protocol::encode(&Request::code(code)).unwrap();
    let (reply, ended) =
        run_request(sandbox, &frame, Instant::now() + Duration::from_secs(30)).unwrap();
    assert_eq!(reply.map(|r| r.exit_code), Some(0), "ended: {ended:?}");
    String::from_utf8(stdout.take()).unwrap()
}

fn host_clock(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec on this frame.
    assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[test]
fn clock_reads_stay_in_the_guest_and_agree_with_the_host() {
    let Some(store) = store() else { return };
    let vmm = Vmm::new().unwrap();
    let (mut sandbox, out) = fork_of(&vmm, &store);
    let code = "import time, datetime\n\
                for _ in range(20000):\n    time.time(); time.monotonic(); time.perf_counter()\n\
                datetime.datetime.now()\n\
                spent = time.process_time()\n\
                print(time.time(), time.monotonic(), time.clock_gettime(time.CLOCK_MONOTONIC_RAW),\n\
                      time.clock_gettime(time.CLOCK_BOOTTIME), spent)";
    let printed = exec_in(&mut sandbox, &out, code);
    let host = [
        libc::CLOCK_REALTIME,
        libc::CLOCK_MONOTONIC,
        libc::CLOCK_MONOTONIC_RAW,
        libc::CLOCK_BOOTTIME,
    ]
    .map(host_clock);
    let guest: Vec<f64> = printed
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    for (i, name) in ["realtime", "monotonic", "monotonic raw", "boottime"]
        .iter()
        .enumerate()
    {
        let behind = host[i] - guest[i];
        assert!(
            (0.0..2.0).contains(&behind),
            "{name}: guest {} host {} (read after it)",
            guest[i],
            host[i]
        );
    }
    // CPU-time clocks are not on the clock page: they still come from the VMM.
    assert!(guest[4] > 0.0, "process_time {}", guest[4]);
    let clock_syscalls = sandbox
        .process()
        .stats()
        .by_name
        .get("clock_gettime")
        .copied()
        .unwrap_or(0);
    if vmm.cpu().tsc.is_some() {
        assert!(
            clock_syscalls < 100,
            "60,000 clock reads made {clock_syscalls} clock_gettime syscalls"
        );
    } else {
        eprintln!("this KVM cannot give guests the host TSC: clock reads are syscalls here");
    }
}

fn session_exec(engine: &Engine, session: &mut Session, code: &str) -> f64 {
    let result = engine
        .session_exec(session, &ExecRequest::python(code), Streams::new())
        .unwrap();
    assert_eq!(
        result.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    String::from_utf8(result.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn monotonic_time_never_runs_backwards_across_requests_and_forks() {
    let Some(store) = store() else { return };
    let engine = Engine::new(
        Arc::new(Vmm::new().unwrap()),
        store,
        PoolConfig {
            size: 2,
            refill_threads: 1,
        },
    );
    let read = "import time\nprint(repr(time.monotonic()))";
    let mut session = engine.create_session("python").unwrap();
    let mut last = session_exec(&engine, &mut session, read);
    for _ in 0..5 {
        let now = session_exec(&engine, &mut session, read);
        assert!(now >= last, "{now} after {last}");
        last = now;
    }
    let mut branches = engine.fork_session(&mut session, 2).unwrap();
    for branch in &mut branches {
        let now = session_exec(&engine, branch, read);
        assert!(
            now >= last,
            "a fork read {now} after its parent read {last}"
        );
    }
    // Warm pool forks (reset between uses) agree with the host.
    for _ in 0..4 {
        let out = engine.exec("python", &ExecRequest::python(read)).unwrap();
        let guest: f64 = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let host = host_clock(libc::CLOCK_MONOTONIC);
        assert!(
            (0.0..2.0).contains(&(host - guest)),
            "guest {guest} host {host}"
        );
    }
}
