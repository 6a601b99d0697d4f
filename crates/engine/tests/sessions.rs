//! Sessions on real KVM: state persists across requests, files go in and out, and forks of a
//! session branch from exactly its state.

mod common;

use forkvm_engine::{Engine, EngineError, ExecRequest, Session, Streams};

fn engine() -> Option<&'static Engine> {
    common::engine("session-templates", 2)
}

fn run(engine: &Engine, session: &mut Session, code: &str) -> String {
    let result = engine
        .session_exec(session, &ExecRequest::python(code), Streams::new())
        .unwrap();
    assert_eq!(
        result.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    String::from_utf8(result.stdout).unwrap()
}

#[test]
fn variables_persist_between_requests() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("python").unwrap();
    run(
        engine,
        &mut session,
        "import numpy as np\nx = np.arange(4)\ncount = 1",
    );
    run(engine, &mut session, "count += 1");
    assert_eq!(run(engine, &mut session, "print(x.sum(), count)"), "6 2\n");
}

#[test]
fn files_round_trip_byte_for_byte() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("python").unwrap();
    let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    session.put_file("/data/in.bin", &data, 0o644).unwrap();
    run(
        engine,
        &mut session,
        "d = open('/data/in.bin', 'rb').read()\nopen('/data/out.bin', 'wb').write(d[::-1])",
    );
    let back = session.get_file("/data/out.bin", 1 << 20).unwrap();
    assert_eq!(back, data.iter().rev().copied().collect::<Vec<u8>>());
    assert!(session.get_file("/data/out.bin", 10).is_err());
    assert!(session.get_file("/data", 1 << 20).is_err());
}

#[test]
fn forks_of_a_session_start_from_its_state_and_diverge() {
    let Some(engine) = engine() else { return };
    let mut parent = engine.create_session("python").unwrap();
    run(
        engine,
        &mut parent,
        "items = ['root']\nopen('/tmp/log', 'w').write('root')",
    );
    let mut branches = engine.fork_session(&mut parent, 3).unwrap();
    run(engine, &mut parent, "items.append('parent-later')");
    for (i, branch) in branches.iter_mut().enumerate() {
        run(
            engine,
            branch,
            &format!("items.append('branch{i}')\nopen('/tmp/log', 'a').write('+{i}')"),
        );
    }
    for (i, branch) in branches.iter_mut().enumerate() {
        assert_eq!(
            run(engine, branch, "print(items, open('/tmp/log').read())"),
            format!("['root', 'branch{i}'] root+{i}\n")
        );
    }
    assert_eq!(
        run(engine, &mut parent, "print(items, open('/tmp/log').read())"),
        "['root', 'parent-later'] root\n"
    );
}

/// A child that waits on a pipe and bumps a counter in memory it shares with the session
/// (`MAP_SHARED`), so each request sees the child's work through the shared page.
const SHARED_CHILD: &str = r#"
import mmap, os, time
shared = mmap.mmap(-1, 4096)
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(w)
    while os.read(r, 1):
        shared[0] += 1
    os._exit(0)
os.close(r)
def bump():
    before = shared[0]
    os.write(w, b"x")
    while shared[0] == before:
        time.sleep(0.001)
    return shared[0]
"#;

#[test]
fn a_fork_of_a_session_forks_its_children_and_shared_memory() {
    let Some(engine) = engine() else { return };
    let mut parent = engine.create_session("python").unwrap();
    run(engine, &mut parent, SHARED_CHILD);
    assert_eq!(run(engine, &mut parent, "print(bump())"), "1\n");
    let mut branches = engine.fork_session(&mut parent, 2).unwrap();
    // Each branch has its own child and its own copy of the shared page, still shared
    // between the two.
    assert_eq!(
        run(engine, &mut branches[0], "print(bump(), bump())"),
        "2 3\n"
    );
    assert_eq!(run(engine, &mut branches[1], "print(bump())"), "2\n");
    assert_eq!(run(engine, &mut parent, "print(bump())"), "2\n");
    // The child is a real process of the branch: it ends when its pipe closes, and the
    // branch reaps it.
    assert_eq!(
        run(
            engine,
            &mut branches[1],
            "os.close(w)\n_, status = os.waitpid(child, 0)\nprint(os.waitstatus_to_exitcode(status))"
        ),
        "0\n"
    );
    assert_eq!(run(engine, &mut branches[0], "print(bump())"), "4\n");
}

#[test]
fn an_ended_session_refuses_more_work() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("python").unwrap();
    let result = engine
        .session_exec(
            &mut session,
            &ExecRequest::python("import os; os._exit(3)"),
            Streams::new(),
        )
        .unwrap();
    assert_eq!(result.exit_code, 3);
    assert!(!session.alive());
    assert!(matches!(
        engine.session_exec(&mut session, &ExecRequest::python("pass"), Streams::new()),
        Err(EngineError::SessionEnded)
    ));
}

/// Gives `session` its time between requests (as the worker does) until nothing in it has
/// work left, or a minute passes.
fn run_between_requests(session: &mut Session) {
    let started = std::time::Instant::now();
    while let Some(due) = session.work_due() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "work between requests never ends"
        );
        let wait = due.saturating_sub(forkvm_kernel::threads::monotonic_ns());
        std::thread::sleep(std::time::Duration::from_nanos(wait));
        assert!(session.run_between_requests(std::time::Duration::from_millis(10)));
    }
}

#[test]
fn background_processes_and_threads_go_on_between_requests() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("python").unwrap();
    run(
        engine,
        &mut session,
        "import subprocess, threading, time\n\
         subprocess.Popen(['sh', '-c', 'sleep 0.2; echo process > /tmp/process'])\n\
         def later():\n    time.sleep(0.2)\n    open('/tmp/thread', 'w').write('thread')\n\
         threading.Thread(target=later).start()\n\
         print('started')",
    );
    // Neither has finished when the request ends; no request runs while they do.
    assert!(session.get_file("/tmp/process", 64).is_err());
    assert!(session.work_due().is_some());
    run_between_requests(&mut session);
    assert_eq!(session.get_file("/tmp/process", 64).unwrap(), b"process\n");
    assert_eq!(session.get_file("/tmp/thread", 64).unwrap(), b"thread");
    // The agent parked as it was: the session serves requests and forks.
    assert_eq!(
        run(engine, &mut session, "print(open('/tmp/thread').read())"),
        "thread\n"
    );
    let mut branch = engine.fork_session(&mut session, 1).unwrap().pop().unwrap();
    assert_eq!(run(engine, &mut branch, "print(1 + 1)"), "2\n");
}

#[test]
fn a_busy_background_thread_is_sliced_and_the_session_still_answers() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("python").unwrap();
    run(
        engine,
        &mut session,
        "import os, threading\n\
         def spin():\n    spins = 0\n    while True:\n        spins += 1\n\
         \x20       if spins % 10000 == 0:\n\
         \x20           with open('/tmp/spins.new', 'w') as f: f.write(str(spins))\n\
         \x20           os.replace('/tmp/spins.new', '/tmp/spins')\n\
         threading.Thread(target=spin, daemon=True).start()",
    );
    let spins = |session: &Session| -> u64 {
        session
            .get_file("/tmp/spins", 64)
            .map_or(0, |b| String::from_utf8(b).unwrap().parse().unwrap())
    };
    // It always has work: every slice ends by time, with the thread mid-loop, and the
    // agent parks again. Slices of many lengths end at many points of the run loop (a
    // race there once ended a session as timed out).
    let before = spins(&session);
    for round in 0..1000u64 {
        assert!(session.work_due().is_some());
        let slice = std::time::Duration::from_micros(50 + round * 7919 % 3000);
        assert!(
            session.run_between_requests(slice),
            "slice {round} ended the session"
        );
    }
    let after = spins(&session);
    assert!(
        after > before,
        "the thread ran between requests: {before} then {after}"
    );
    assert_eq!(run(engine, &mut session, "print(1 + 1)"), "2\n");
    // A fork takes the spinning thread along, and answers too.
    let mut branch = engine.fork_session(&mut session, 1).unwrap().pop().unwrap();
    assert!(branch.run_between_requests(std::time::Duration::from_millis(10)));
    assert_eq!(run(engine, &mut branch, "print(1 + 1)"), "2\n");
}

#[test]
fn a_seed_the_code_set_holds_for_the_sessions_next_request() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("python").unwrap();
    run(
        engine,
        &mut session,
        "import random, numpy\nrandom.seed(42)\nnumpy.random.seed(0)",
    );
    // As in one Python process: the seeded sequences go on where they were.
    assert_eq!(
        run(
            engine,
            &mut session,
            "print(random.random(), numpy.random.rand())"
        ),
        "0.6394267984578837 0.5488135039273248\n"
    );
}

#[test]
fn forks_of_a_session_draw_fresh_randomness_from_every_generator() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("python").unwrap();
    // Every generator is used before the fork, so each has state a fork would copy:
    // OpenSSL's DRBGs are seeded, random and numpy are seeded by the code.
    run(
        engine,
        &mut session,
        "import os, random, numpy, ssl, uuid, secrets\nssl.RAND_bytes(16)\n\
         random.seed(1)\nnumpy.random.seed(1)",
    );
    let draw = "print(ssl.RAND_bytes(16).hex(), random.random(), numpy.random.rand(), \
                uuid.uuid4(), secrets.token_hex(16), os.urandom(16).hex())";
    let mut seen = std::collections::HashSet::new();
    // 100 forks of the same state, ten live at a time.
    for _ in 0..10 {
        for mut branch in engine.fork_session(&mut session, 10).unwrap() {
            let out = run(engine, &mut branch, draw);
            let fields: Vec<&str> = out.split_whitespace().collect();
            assert_eq!(fields.len(), 6, "{out}");
            for field in fields {
                let repeated = !seen.insert(field.to_string());
                assert!(!repeated, "{field} repeated across forks");
            }
        }
    }
    // The parent's own seeded sequence is untouched by its forks.
    assert_eq!(
        run(engine, &mut session, "print(random.random())"),
        "0.13436424411240122\n"
    );
}

/// A second engine over the same template store: a new template load, pool and VMM, as a
/// restarted server would have.
fn another_engine() -> Engine {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("session-templates");
    Engine::new(
        std::sync::Arc::new(forkvm_vmm::Vmm::new().unwrap()),
        forkvm_testkit::python_template(&dir),
        forkvm_vmm::PoolConfig {
            size: 1,
            refill_threads: 1,
        },
    )
}

#[test]
fn a_paused_session_resumes_elsewhere_with_all_its_state() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("python").unwrap();
    run(
        engine,
        &mut session,
        "import numpy as np, os, time\nx = 41\nbig = np.arange(2_000_000)\n\
         open('/root/note.txt', 'w').write('kept')\nr, w = os.pipe()\nos.write(w, b'piped')\n\
         before = time.monotonic()",
    );
    let paused = engine.pause_session(&mut session).unwrap();
    // The session runs on after a pause (the pause may fail to be stored)...
    assert_eq!(run(engine, &mut session, "x = 0\nprint(x)"), "0\n");
    drop(session);
    // ...and the paused state does not see what it did since.
    let other = another_engine();
    let mut resumed = other.resume_session("python", paused).unwrap();
    assert_eq!(
        run(
            &other,
            &mut resumed,
            "print(x + 1, int(big.sum()), open('/root/note.txt').read(), os.read(r, 64), \
             time.monotonic() >= before)"
        ),
        "42 1999999000000 kept b'piped' True\n"
    );
    // A resumed session forks, and pauses again (its memory stays one layer over the
    // template's, however often it is paused).
    let mut branches = other.fork_session(&mut resumed, 2).unwrap();
    run(&other, &mut branches[0], "x = 100");
    assert_eq!(run(&other, &mut branches[1], "print(x)"), "41\n");
    let again = other.pause_session(&mut branches[0]).unwrap();
    assert!(
        again.0.memories.iter().all(
            |m| m.over_template || !matches!(m.part, forkvm_protocol::worker::PausedPart::Main)
        )
    );
    let mut third = engine.resume_session("python", again).unwrap();
    assert_eq!(
        run(engine, &mut third, "print(x, big[-1])"),
        "100 1999999\n"
    );
}

#[test]
fn a_paused_session_with_a_mismatched_description_is_refused() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("python").unwrap();
    let (mut paused, files) = engine.pause_session(&mut session).unwrap();
    paused.memories[0].ranges = vec![(1, 4096)];
    let err = engine
        .resume_session("python", (paused.clone(), files))
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::Paused(_)), "{err}");
    let err = engine
        .resume_session("python", (paused, Vec::new()))
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::Paused(_)), "{err}");
}
