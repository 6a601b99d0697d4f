//! Threads in forks on real KVM: the threaded Python agents write (queues, pools, timers,
//! locks, a spinning thread beside a sleeping one) runs, and the sandbox's limits hold for
//! every thread.

mod common;

use common::stdout;

use std::time::Duration;

use forkvm_engine::{Engine, ErrorKind, ExecLimits, ExecRequest, Streams};

fn engine() -> Option<&'static Engine> {
    common::engine("thread-templates", 2)
}

#[test]
fn eight_threads_fill_a_queue_and_a_pool_maps() {
    let Some(engine) = engine() else { return };
    let code = "import threading, queue\n\
                from concurrent.futures import ThreadPoolExecutor\n\
                q = queue.Queue()\n\
                def worker(n):\n    for i in range(500):\n        q.put((n, i))\n\
                ts = [threading.Thread(target=worker, args=(n,)) for n in range(8)]\n\
                [t.start() for t in ts]\n[t.join() for t in ts]\n\
                items = [q.get() for _ in range(q.qsize())]\n\
                print(len(items), len(set(items)))\n\
                with ThreadPoolExecutor(4) as pool:\n    print(sum(pool.map(lambda x: x * x, range(1000))))\n\
                print(threading.active_count())";
    assert_eq!(stdout(engine, code), "4000 4000\n332833500\n1\n");
}

#[test]
fn a_spinning_thread_and_a_sleeping_thread_both_make_progress() {
    let Some(engine) = engine() else { return };
    let code = "import threading, time\n\
                stop = False\ncount = 0\n\
                def spin():\n    global count\n    while not stop:\n        count += 1\n\
                t = threading.Thread(target=spin)\nt.start()\n\
                started = time.monotonic()\n\
                for _ in range(10):\n    time.sleep(0.02)\n\
                slept = time.monotonic() - started\n\
                stop = True\nt.join()\n\
                print(count > 10000, 0.2 <= slept < 2.0)";
    assert_eq!(stdout(engine, code), "True True\n");
}

#[test]
fn timers_events_conditions_barriers_and_lock_timeouts_work() {
    let Some(engine) = engine() else { return };
    let code = "import threading, time\n\
                fired = threading.Event()\nthreading.Timer(0.05, fired.set).start()\n\
                print(fired.wait(5))\n\
                barrier = threading.Barrier(3)\nreached = []\n\
                def meet(i):\n    barrier.wait()\n    reached.append(i)\n\
                ts = [threading.Thread(target=meet, args=(i,)) for i in range(3)]\n\
                [t.start() for t in ts]\n[t.join() for t in ts]\nprint(sorted(reached))\n\
                lock = threading.Lock()\nlock.acquire()\n\
                t0 = time.monotonic()\nprint(lock.acquire(timeout=0.05), time.monotonic() - t0 >= 0.05)\n\
                cond = threading.Condition()\n\
                def notify():\n    time.sleep(0.01)\n    with cond:\n        cond.notify_all()\n\
                threading.Thread(target=notify).start()\n\
                with cond:\n    print(cond.wait(5))";
    assert_eq!(stdout(engine, code), "True\n[0, 1, 2]\nFalse True\nTrue\n");
}

#[test]
fn starting_a_thousand_threads_ends_in_a_clean_python_error() {
    let Some(engine) = engine() else { return };
    let code = "import threading, time\n\
                started = 0\n\
                try:\n    for _ in range(1000):\n        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n        started += 1\n\
                except RuntimeError as e:\n    print('stopped', started < 1000, e)\n\
                print('still running')";
    let out = stdout(engine, code);
    assert!(
        out.starts_with("stopped True can't start new thread\n"),
        "{out}"
    );
    assert!(out.ends_with("still running\n"));
}

#[test]
fn wall_clock_and_cpu_limits_count_every_thread() {
    let Some(engine) = engine() else { return };
    let spin = "import threading\n\
                def spin():\n    while True:\n        pass\n\
                t = threading.Thread(target=spin)\nt.start()\nt.join()";
    let mut request = ExecRequest::python(spin);
    request.limits = ExecLimits {
        timeout: Duration::from_secs(1),
        ..ExecLimits::default()
    };
    let out = engine.exec("python", &request).unwrap();
    assert_eq!((out.exit_code, out.error.kind), (124, ErrorKind::Timeout));
    request.limits = ExecLimits {
        timeout: Duration::from_secs(30),
        cpu_time: Some(Duration::from_millis(400)),
        ..ExecLimits::default()
    };
    let out = engine.exec("python", &request).unwrap();
    assert_eq!(out.error.kind, ErrorKind::Timeout);
}

#[test]
fn a_session_keeps_its_threads_between_requests() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("python").unwrap();
    let mut exec = |code: &str| {
        let result = engine
            .session_exec(&mut session, &ExecRequest::python(code), Streams::new())
            .unwrap();
        assert_eq!(
            result.exit_code,
            0,
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        String::from_utf8(result.stdout).unwrap()
    };
    exec(
        "import threading, queue\n\
         jobs, results = queue.Queue(), queue.Queue()\n\
         def serve():\n    while True:\n        results.put(jobs.get() * 2)\n\
         threading.Thread(target=serve, daemon=True).start()",
    );
    assert_eq!(exec("jobs.put(21)\nprint(results.get(timeout=5))"), "42\n");
    assert_eq!(exec("jobs.put(50)\nprint(results.get(timeout=5))"), "100\n");

    // A branch of the session resumes the thread too, in its own memory.
    let mut branches = engine.fork_session(&mut session, 2).unwrap();
    for (i, branch) in branches.iter_mut().enumerate() {
        let code = format!("jobs.put({i})\nprint(results.get(timeout=5))");
        let result = engine
            .session_exec(branch, &ExecRequest::python(code), Streams::new())
            .unwrap();
        assert_eq!(result.stdout, format!("{}\n", i * 2).into_bytes());
    }
}
