//! The server's side of a worker connection against a worker that turned hostile: its
//! frames are read as hostile input, and one it must not send gets it killed. The "worker"
//! here is this test speaking the protocol from the other end of a real socket, with a
//! real child process standing for the worker's PID (no KVM needed).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use forkvm_protocol::exec::ExecLimits;
use forkvm_protocol::worker::{
    Answer, Call, CallFrame, Event, Hello, PoolCounters, Ready, Start, read_frame, write_frame,
};
use forkvm_worker::spawn::Spawned;
use forkvm_worker::{Connection, WorkerError};

fn hello() -> Hello {
    Hello {
        template: "python".into(),
        cache_dir: "/nonexistent".into(),
        pool_depth: 0,
        pool_threads: 1,
        maxima: ExecLimits::maxima(),
    }
}

/// A connection to a pretend worker: a real process (for its PID) and the far end of the
/// socket, greeted and answered `Ready` already.
fn connect() -> (Arc<Connection>, Child, UnixStream) {
    let child = Command::new("sleep").arg("60").spawn().unwrap();
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let greeter = std::thread::spawn(move || {
        let start: Start = read_frame(&mut theirs).unwrap();
        assert!(matches!(start, Start::Serve(_)));
        write_frame(&mut theirs, &Ready::Serving { ram_bytes: 1 << 30 }).unwrap();
        theirs
    });
    let spawned = Spawned {
        pid: child.id() as i32,
        socket: ours,
    };
    let connection = Connection::open(spawned, &hello(), Duration::from_secs(10)).unwrap();
    let theirs = greeter.join().unwrap();
    (connection, child, theirs)
}

fn killed_by_sigkill(child: &mut Child) -> bool {
    use std::os::unix::process::ExitStatusExt;
    child.wait().unwrap().signal() == Some(libc::SIGKILL)
}

#[test]
fn a_worker_sending_a_malformed_frame_is_killed_and_its_calls_fail() {
    let (connection, mut child, mut theirs) = connect();
    let answering = std::thread::spawn(move || {
        let call: CallFrame = read_frame(&mut theirs).unwrap();
        // An answer for a call never made is ignored...
        write_frame(
            &mut theirs,
            &Event::Done {
                id: call.id + 1000,
                outcome: Ok(Answer::Done),
            },
        )
        .unwrap();
        // ...but a frame no worker sends ends it: an enum variant that does not exist.
        theirs.write_all(&8u32.to_le_bytes()).unwrap();
        theirs.write_all(&[0xff; 8]).unwrap();
        theirs
    });
    let error = connection
        .call(Call::Stats, None, Duration::from_secs(10))
        .unwrap_err();
    let _theirs = answering.join().unwrap();
    match &error {
        WorkerError::Gone(why) => assert!(why.contains("malformed"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(killed_by_sigkill(&mut child));
    assert!(!connection.alive());
    assert!(matches!(
        connection.call(Call::Stats, None, Duration::from_secs(1)),
        Err(WorkerError::Gone(_))
    ));
}

#[test]
fn a_worker_announcing_an_oversized_frame_is_killed_before_anything_is_allocated() {
    let (connection, mut child, mut theirs) = connect();
    let answering = std::thread::spawn(move || {
        let _: CallFrame = read_frame(&mut theirs).unwrap();
        theirs.write_all(&u32::MAX.to_le_bytes()).unwrap();
        theirs
    });
    let error = connection
        .call(Call::Stats, None, Duration::from_secs(10))
        .unwrap_err();
    let _theirs = answering.join().unwrap();
    assert!(
        matches!(&error, WorkerError::Gone(why) if why.contains("exceeds")),
        "{error:?}"
    );
    assert!(killed_by_sigkill(&mut child));
}

#[test]
fn a_worker_that_does_not_answer_in_time_is_killed() {
    let (connection, mut child, mut theirs) = connect();
    let silent = std::thread::spawn(move || {
        let _: CallFrame = read_frame(&mut theirs).unwrap();
        theirs
    });
    let error = connection
        .call(Call::Stats, None, Duration::from_millis(300))
        .unwrap_err();
    let _theirs = silent.join().unwrap();
    assert!(matches!(error, WorkerError::Unresponsive(_)), "{error:?}");
    assert!(killed_by_sigkill(&mut child));
}

#[test]
fn answers_reach_their_calls() {
    let (connection, mut child, mut theirs) = connect();
    let answering = std::thread::spawn(move || {
        let call: CallFrame = read_frame(&mut theirs).unwrap();
        let counters = PoolCounters {
            depth: 3,
            ..PoolCounters::default()
        };
        write_frame(
            &mut theirs,
            &Event::Done {
                id: call.id,
                outcome: Ok(Answer::Stats(counters)),
            },
        )
        .unwrap();
        theirs
    });
    let answer = connection
        .call(Call::Stats, None, Duration::from_secs(10))
        .unwrap();
    let _theirs = answering.join().unwrap();
    assert!(
        matches!(answer, Answer::Stats(c) if c.depth == 3),
        "{answer:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_paused_session_that_does_not_match_its_files_is_refused() {
    use forkvm_protocol::files::write_frame_with_files;
    use forkvm_protocol::worker::{PausedMemory, PausedPart, PausedSession};
    use std::os::fd::AsFd;
    let (connection, _child, theirs) = connect();
    let memory = |size: u64| PausedMemory {
        part: PausedPart::Main,
        size,
        ranges: vec![(0, 4096)],
        over_template: true,
    };
    // One answer per case: the description, and the size of the one file sent with it.
    let cases = [
        (vec![memory(1 << 20), memory(1 << 20)], 1 << 20), // two described, one sent
        (vec![memory(1 << 20)], 2 << 20),                  // not the size described
        (vec![memory(4 << 30)], 4 << 30),                  // larger than guest RAM
    ];
    let answering = std::thread::spawn(move || {
        let mut reader = theirs.try_clone().unwrap();
        for (memories, file_size) in cases {
            let call: CallFrame = read_frame(&mut reader).unwrap();
            assert!(matches!(call.call, Call::PauseSession { session: 7 }));
            let file = tempfile::tempfile().unwrap();
            file.set_len(file_size).unwrap();
            let paused = PausedSession {
                state: Vec::new(),
                mapped_at_start: 0,
                memories,
            };
            let event = Event::Done {
                id: call.id,
                outcome: Ok(Answer::Paused(paused)),
            };
            write_frame_with_files(&theirs, &event, &[file.as_fd()]).unwrap();
        }
    });
    for _ in 0..3 {
        let err = connection.pause_session(7).err().unwrap();
        assert!(
            err.to_string().contains("paused the session wrongly"),
            "{err}"
        );
    }
    answering.join().unwrap();
    assert!(connection.alive());
}
