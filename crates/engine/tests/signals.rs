//! Signals in forks on real KVM: handlers run and can raise, `alarm` and `setitimer`
//! interrupt sleeps and busy loops, a fault reaches `faulthandler`, a signal sent from a
//! worker thread is handled, and `sigwait` and `SIGPIPE` behave as on Linux.

mod common;

use common::{run, stdout};

use forkvm_engine::{Engine, ErrorKind};

fn engine() -> Option<&'static Engine> {
    common::engine("signal-templates", 2)
}

#[test]
fn alarm_interrupts_a_sleep_and_setitimer_a_busy_loop() {
    let Some(engine) = engine() else { return };
    let code = "import signal, time\n\
                class Wake(Exception): pass\n\
                def wake(signum, frame): raise Wake(signum)\n\
                signal.signal(signal.SIGALRM, wake)\n\
                signal.alarm(1)\n\
                started = time.monotonic()\n\
                try:\n    time.sleep(10)\nexcept Wake as e:\n    print('alarm', e.args[0], round(time.monotonic() - started))\n\
                signal.setitimer(signal.ITIMER_REAL, 0.2)\n\
                spins = 0\n\
                try:\n    while True:\n        spins += 1\nexcept Wake:\n    print('itimer', spins > 0)\n\
                signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)\n\
                ticks = []\n\
                signal.signal(signal.SIGALRM, lambda s, f: ticks.append(s))\n\
                while len(ticks) < 3:\n    time.sleep(0.01)\n\
                signal.setitimer(signal.ITIMER_REAL, 0)\n\
                print('periodic', len(ticks) >= 3)";
    assert_eq!(
        stdout(engine, code),
        "alarm 14 1\nitimer True\nperiodic True\n"
    );
}

#[test]
fn a_segfault_reaches_faulthandler_before_it_kills() {
    let Some(engine) = engine() else { return };
    let out = run(
        engine,
        "import faulthandler, ctypes\nfaulthandler.enable()\nctypes.string_at(0)",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Fatal Python error: Segmentation fault"),
        "{stderr}"
    );
    assert!(stderr.contains("in string_at"), "{stderr}");
    assert_eq!((out.exit_code, out.error.kind), (139, ErrorKind::Fault));
}

#[test]
fn a_signal_from_a_thread_is_handled_by_the_main_thread() {
    let Some(engine) = engine() else { return };
    let code = "import os, signal, threading, time\n\
                seen = []\n\
                signal.signal(signal.SIGUSR1, lambda s, f: seen.append(threading.current_thread().name))\n\
                def poke():\n    time.sleep(0.05)\n    os.kill(os.getpid(), signal.SIGUSR1)\n\
                t = threading.Thread(target=poke)\nt.start()\nt.join()\n\
                signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])\n\
                threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR2)).start()\n\
                print(seen, signal.sigwait([signal.SIGUSR2]))";
    assert_eq!(stdout(engine, code), "['MainThread'] 12\n");
}

#[test]
fn a_broken_pipe_raises_sigpipe_or_epipe() {
    let Some(engine) = engine() else { return };
    // Python ignores SIGPIPE: the write fails with EPIPE.
    let code = "import os\nr, w = os.pipe()\nos.close(r)\n\
                try:\n    os.write(w, b'x')\nexcept BrokenPipeError:\n    print('EPIPE')";
    assert_eq!(stdout(engine, code), "EPIPE\n");
    // With the default action restored, the writer dies of it.
    let out = run(
        engine,
        "import os, signal\nsignal.signal(signal.SIGPIPE, signal.SIG_DFL)\n\
         r, w = os.pipe()\nos.close(r)\nos.write(w, b'x')",
    );
    assert_eq!(out.exit_code, 128 + libc::SIGPIPE);
}

#[test]
fn a_blocking_pipe_write_waits_for_all_of_it_unless_a_signal_ends_it() {
    let Some(engine) = engine() else { return };
    // As on Linux: the write returns only when a reader has taken everything past the
    // pipe's capacity; an alarm during the wait ends it with the count written so far.
    let code = "import os, signal, threading, time\n\
                r, w = os.pipe()\n\
                got = []\n\
                def drain(total):\n    time.sleep(0.1)\n    n = 0\n    while n < total:\n        n += len(os.read(r, 65536))\n    got.append(n)\n\
                t = threading.Thread(target=drain, args=(300000,))\nt.start()\n\
                print(os.write(w, b'x' * 300000))\nt.join()\nprint(got)\n\
                signal.signal(signal.SIGALRM, lambda *a: print('alarm'))\n\
                signal.setitimer(signal.ITIMER_REAL, 0.2)\n\
                n = os.write(w, b'y' * 300000)\n\
                print(0 < n < 300000)";
    assert_eq!(stdout(engine, code), "300000\n[300000]\nalarm\nTrue\n");
}
