//! Fork correctness on real KVM: every fork starts from the snapshot, keeps its own state,
//! never leaks into the template or its siblings, and gets fresh time and randomness.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_engine::{Engine, ErrorKind, ExecLimits, ExecRequest, WARMUP_CODE, run_request};
use forkvm_kernel::{CaptureBuffer, Console, Input};
use forkvm_protocol::Request;
use forkvm_template::TemplateStore;
use forkvm_vmm::{Pool, PoolConfig, Sandbox, Vmm};

fn store() -> Option<TemplateStore> {
    if !forkvm_testkit::kvm_available() {
        return None;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("engine-templates");
    Some(forkvm_testkit::python_template(&dir))
}

fn engine(store: TemplateStore) -> Engine {
    Engine::new(
        Arc::new(Vmm::new().unwrap()),
        store,
        PoolConfig {
            size: 8,
            refill_threads: 1,
        },
    )
}

fn run(engine: &Engine, code: &str) -> String {
    let out = engine.exec("python", &ExecRequest::python(code)).unwrap();
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_thousand_sequential_forks_each_return_their_own_result() {
    let Some(store) = store() else { return };
    let engine = engine(store);
    for i in 0..1000 {
        assert_eq!(
            run(&engine, &format!("print({i} * 3)")),
            format!("{}\n", i * 3)
        );
    }
}

/// A sandbox from `pool` that ran `code` and is parked again; returns its stdout.
fn exec_in(sandbox: &mut Sandbox, stdout: &CaptureBuffer, code: &str) -> String {
    let frame = forkvm_protocol::encode(&Request::code(code)).unwrap();
    let (reply, ended) =
        run_request(sandbox, &frame, Instant::now() + Duration::from_secs(30)).unwrap();
    assert_eq!(reply.map(|r| r.exit_code), Some(0), "ended: {ended:?}");
    String::from_utf8(stdout.take()).unwrap()
}

/// A console whose stdout is captured.
fn captured() -> (Console, CaptureBuffer) {
    let stdout = CaptureBuffer::default();
    let console = Console::new(
        Input::Empty,
        Box::new(stdout.clone()),
        Box::new(std::io::sink()),
        1 << 20,
    );
    (console, stdout)
}

fn live_fork(pool: &Pool) -> (Sandbox, CaptureBuffer) {
    let (console, stdout) = captured();
    (pool.fork(console).unwrap(), stdout)
}

fn pool(store: &TemplateStore, warm: bool) -> Pool {
    let vmm = Arc::new(Vmm::new().unwrap());
    let (_, source) = store.load("python", &vmm).unwrap();
    let warmup = warm.then(|| forkvm_protocol::encode(&Request::code(WARMUP_CODE)).unwrap());
    Pool::start(
        vmm,
        Arc::new(source),
        PoolConfig {
            size: 4,
            refill_threads: 1,
        },
        warmup,
    )
}

#[test]
fn two_hundred_live_forks_see_only_their_own_writes() {
    let Some(store) = store() else { return };
    let pool = pool(&store, true);
    let mut live = Vec::new();
    for i in 0..200 {
        let (mut sandbox, stdout) = live_fork(&pool);
        let code = format!(
            "import builtins\nbuiltins.VALUE = {i}\nopen('/tmp/value', 'w').write('{i}')\nprint('ok')"
        );
        assert_eq!(exec_in(&mut sandbox, &stdout, &code), "ok\n");
        live.push((sandbox, stdout));
    }
    for (i, (sandbox, stdout)) in live.iter_mut().enumerate() {
        let out = exec_in(
            sandbox,
            stdout,
            "import builtins\nprint(builtins.VALUE, open('/tmp/value').read())",
        );
        assert_eq!(out, format!("{i} {i}\n"));
    }
    // Nothing of theirs reached the template: a new fork sees neither value.
    let (mut fresh, stdout) = live_fork(&pool);
    let out = exec_in(
        &mut fresh,
        &stdout,
        "import builtins, os\nprint(hasattr(builtins, 'VALUE'), os.path.exists('/tmp/value'))",
    );
    assert_eq!(out, "False False\n");
}

#[test]
fn forks_never_write_the_snapshot_file() {
    let Some(store) = store() else { return };
    let memory = store.dir("python").unwrap().join("memory");
    let digest = || forkvm_testkit::sha256_file(&memory);
    let before = digest();
    let engine = engine(store);
    run(
        &engine,
        "x = bytearray(50 << 20)\nx[::4096] = b'\\xff' * len(x[::4096])\nprint(sum(x) > 0)",
    );
    run(&engine, "import numpy\nprint(numpy.ones((300, 300)).sum())");
    assert_eq!(digest(), before);
}

#[test]
fn every_fork_draws_fresh_randomness() {
    let Some(store) = store() else { return };
    let engine = engine(store);
    let mut seen = HashSet::new();
    for _ in 0..100 {
        let out = run(
            &engine,
            "import os, random, numpy, ssl, uuid, secrets, ctypes\n\
             arc4random = ctypes.CDLL(None).arc4random  # glibc's\n\
             arc4random.restype = ctypes.c_uint32\n\
             print(os.urandom(16).hex(), random.random(), numpy.random.rand(), ssl.RAND_bytes(16).hex(),\n\
                   uuid.uuid4(), secrets.token_hex(16), (arc4random() << 32) | arc4random())",
        );
        let fields: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(fields.len(), 7);
        for field in fields {
            assert!(seen.insert(field.to_string()), "{field} repeated");
        }
    }
}

#[test]
fn forks_read_the_current_time_not_the_snapshots() {
    let Some(store) = store() else { return };
    let created = store.show("python").unwrap().created_unix as f64;
    std::thread::sleep(Duration::from_millis(1500));
    let engine = engine(store);
    let out = run(&engine, "import time\nprint(time.time())");
    let guest: f64 = out.trim().parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((guest - host).abs() < 1.0, "guest {guest} host {host}");
    assert!(guest > created + 1.0, "guest {guest} snapshot {created}");
}

#[test]
fn warm_reset_leaves_memory_identical_to_the_snapshot() {
    let Some(store) = store() else { return };
    let vmm = Vmm::new().unwrap();
    let (meta, source) = store.load("python", &vmm).unwrap();
    let frame = forkvm_protocol::encode(&Request::code(
        "import numpy, json\nx = [bytearray(4096) for _ in range(500)]\nprint(json.dumps(numpy.arange(5).tolist()))",
    ))
    .unwrap();
    let prepared = vmm.prepare_fork(&source).unwrap();
    let warmed = vmm.warm_up(prepared, &source, &frame).unwrap();
    let ram = warmed.ram();
    let mut expected = vec![0u8; 4096];
    let mut actual = vec![0u8; 4096];
    let mut differing = Vec::new();
    for page in (0..meta.ram_bytes).step_by(4096) {
        source.backing.read_page(page, &mut expected).unwrap();
        ram.read(page, &mut actual).unwrap();
        if expected != actual {
            differing.push(page);
        }
    }
    assert!(
        differing.is_empty(),
        "pages differ after reset: {:x?}",
        &differing[..differing.len().min(10)]
    );
}

#[test]
fn a_runaway_fork_ends_alone() {
    let Some(store) = store() else { return };
    let engine = engine(store);
    let mut request = ExecRequest::python("while True: pass");
    request.limits = ExecLimits {
        timeout: Duration::from_millis(500),
        ..ExecLimits::default()
    };
    let out = engine.exec("python", &request).unwrap();
    assert_eq!(out.error.kind, ErrorKind::Timeout);
    assert_eq!(run(&engine, "print('still fine')"), "still fine\n");
}

/// A fork of `source` prepared inline (no pool), with captured stdout.
fn fork_of(vmm: &Vmm, source: &forkvm_vmm::ForkSource) -> (Sandbox, CaptureBuffer) {
    let (console, stdout) = captured();
    let prepared = vmm.prepare_fork(source).unwrap();
    (vmm.finish_fork(prepared, source, console).unwrap(), stdout)
}

#[test]
fn a_fork_of_a_fork_sees_its_parent_at_the_snapshot_and_nothing_later() {
    let Some(store) = store() else { return };
    let vmm = Vmm::new().unwrap();
    let (_, template) = store.load("python", &vmm).unwrap();
    let (mut parent, out) = fork_of(&vmm, &template);
    let set = |value: &str| {
        format!(
            "import builtins\nbuiltins.V = '{value}'\nopen('/tmp/f', 'w').write('{value}')\nprint('set')"
        )
    };
    let show = "import builtins\nprint(builtins.V, open('/tmp/f').read())";
    assert_eq!(exec_in(&mut parent, &out, &set("one")), "set\n");
    let child_source = vmm.snapshot_fork(&mut parent, &template).unwrap();
    assert_eq!(exec_in(&mut parent, &out, &set("two")), "set\n");

    let (mut child, child_out) = fork_of(&vmm, &child_source);
    assert_eq!(exec_in(&mut child, &child_out, show), "one one\n");
    assert_eq!(exec_in(&mut parent, &out, show), "two two\n");

    // Branches diverge independently, and their own forks see each branch's state.
    let (mut sibling, sibling_out) = fork_of(&vmm, &child_source);
    assert_eq!(exec_in(&mut child, &child_out, &set("three")), "set\n");
    assert_eq!(exec_in(&mut sibling, &sibling_out, show), "one one\n");
    let grandchild_source = vmm.snapshot_fork(&mut child, &child_source).unwrap();
    let (mut grandchild, grandchild_out) = fork_of(&vmm, &grandchild_source);
    assert_eq!(
        exec_in(&mut grandchild, &grandchild_out, show),
        "three three\n"
    );
}

#[test]
fn long_fork_chains_are_flattened_and_stay_correct() {
    let Some(store) = store() else { return };
    let vmm = Vmm::new().unwrap();
    let (_, template) = store.load("python", &vmm).unwrap();
    let mut source = template;
    let generations = forkvm_vmm::layer::MAX_LAYERS + 3;
    for generation in 0..generations {
        let (mut sandbox, out) = fork_of(&vmm, &source);
        let code = format!(
            "import builtins\nbuiltins.G = getattr(builtins, 'G', []) + [{generation}]\n\
             x = bytearray({generation} * 100000)\nprint(builtins.G[-1])"
        );
        assert_eq!(
            exec_in(&mut sandbox, &out, &code),
            format!("{generation}\n")
        );
        source = vmm.snapshot_fork(&mut sandbox, &source).unwrap();
        assert!(source.backing.layers.len() <= forkvm_vmm::layer::MAX_LAYERS);
    }
    let (mut last, out) = fork_of(&vmm, &source);
    let expected: Vec<String> = (0..generations).map(|g| g.to_string()).collect();
    assert_eq!(
        exec_in(
            &mut last,
            &out,
            "import builtins\nprint(','.join(map(str, builtins.G)))"
        ),
        format!("{}\n", expected.join(","))
    );
}

#[test]
fn reset_after_hostile_writes_restores_every_page() {
    let Some(store) = store() else { return };
    let vmm = Vmm::new().unwrap();
    let (meta, source) = store.load("python", &vmm).unwrap();
    let (mut sandbox, out) = fork_of(&vmm, &source);
    // Writes through the program's own memory, into memory it then unmaps, and a big
    // array. (RAM it never mapped it cannot write: the page tables refuse.)
    let code = "import ctypes, mmap\n\
                m = mmap.mmap(-1, 3 * 4096)\n\
                m.write(b'A' * 3 * 4096)\n\
                m.close()\n\
                x = bytearray(40 << 20)\n\
                x[::4096] = b'\\x01' * len(x[::4096])\n\
                import os\nos.close(os.open('/tmp/f', os.O_CREAT | os.O_WRONLY))\n\
                print('dirty')";
    assert_eq!(exec_in(&mut sandbox, &out, code), "dirty\n");
    let reset = vmm.reset_fork(sandbox, &source, u64::MAX).unwrap().unwrap();
    let ram = reset.ram();
    let mut expected = vec![0u8; 4096];
    let mut actual = vec![0u8; 4096];
    let mut differing = Vec::new();
    for page in (0..meta.ram_bytes).step_by(4096) {
        source.backing.read_page(page, &mut expected).unwrap();
        ram.read(page, &mut actual).unwrap();
        if expected != actual {
            differing.push(page);
        }
    }
    assert!(
        differing.is_empty(),
        "pages differ after reset: {:x?}",
        &differing[..differing.len().min(10)]
    );
    // And a fork that made too much memory its own is not kept.
    let (mut big, out) = fork_of(&vmm, &source);
    let keep_alive = "import builtins\nbuiltins.X = bytearray(64 << 20)\n\
                      builtins.X[::4096] = b'\\x01' * len(builtins.X[::4096])";
    exec_in(&mut big, &out, keep_alive);
    assert!(vmm.reset_fork(big, &source, 16 << 20).unwrap().is_none());
}

/// `MADV_WIPEONFORK` memory (where libraries such as BoringSSL keep fork-detection state)
/// reads as zero in every fork of a snapshot and in an `os.fork()` child, and stays as it
/// was in the process that advised it; `MADV_DONTFORK` memory is missing in the child only.
#[test]
fn wipeonfork_memory_is_zero_in_every_kind_of_fork() {
    let Some(store) = store() else { return };
    let vmm = Vmm::new().unwrap();
    let (_, template) = store.load("python", &vmm).unwrap();
    let (mut parent, out) = fork_of(&vmm, &template);
    let setup = "import builtins, mmap\n\
                 flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS\n\
                 builtins.W = mmap.mmap(-1, 8192, flags=flags)\n\
                 builtins.W[:6] = builtins.W[4096:4102] = b'secret'\n\
                 builtins.W.madvise(18, 0, 4096)  # MADV_WIPEONFORK (not in Debian's mmap)\n\
                 builtins.D = mmap.mmap(-1, 4096, flags=flags)\n\
                 builtins.D.write(b'parent')\n\
                 builtins.D.madvise(mmap.MADV_DONTFORK)\n\
                 print('set')";
    assert_eq!(exec_in(&mut parent, &out, setup), "set\n");
    let show = "import builtins\nprint(builtins.W[:6], builtins.W[4096:4102], builtins.D[:6])";
    let source = vmm.snapshot_fork(&mut parent, &template).unwrap();
    for _ in 0..3 {
        let (mut child, child_out) = fork_of(&vmm, &source);
        assert_eq!(
            exec_in(&mut child, &child_out, show),
            "b'\\x00\\x00\\x00\\x00\\x00\\x00' b'secret' b'parent'\n",
            "a snapshot's fork wipes and keeps DONTFORK memory (it continues the process)"
        );
    }
    assert_eq!(
        exec_in(&mut parent, &out, show),
        "b'secret' b'secret' b'parent'\n"
    );
    let child = "import builtins, os\n\
                 r, w = os.pipe()\n\
                 pid = os.fork()\n\
                 if pid == 0:\n\
                 \x20   os.write(w, bytes(builtins.W[:6]) + bytes(builtins.W[4096:4102]))\n\
                 \x20   try:\n\
                 \x20       builtins.D[0]\n\
                 \x20   except Exception:\n\
                 \x20       pass\n\
                 \x20   os._exit(0)\n\
                 os.waitpid(pid, 0)\n\
                 print(os.read(r, 12))";
    assert_eq!(
        exec_in(&mut parent, &out, child),
        "b'\\x00\\x00\\x00\\x00\\x00\\x00secret'\n"
    );
}

#[test]
fn memory_mapped_later_anywhere_in_ram_gets_its_memory_slot() {
    // A fork's VM starts with KVM memory slots over what the snapshot maps; whatever the
    // program maps later, far from that and in any process, gets a slot before it runs.
    let Some(store) = store() else { return };
    let vmm = Vmm::new().unwrap();
    let (_, source) = store.load("python", &vmm).unwrap();
    let prepared = vmm.prepare_fork(&source).unwrap();
    assert!(
        prepared.slot_bytes() <= source.ram_size() / 4,
        "a fresh fork's slots cover {} of {} bytes",
        prepared.slot_bytes(),
        source.ram_size()
    );
    let (console, stdout) = captured();
    let mut sandbox = vmm.finish_fork(prepared, &source, console).unwrap();
    let code = "import mmap, os, numpy\n\
        m = mmap.mmap(-1, 600 << 20)\n\
        for at in range(0, len(m), 4096): m[at] = 1\n\
        a = numpy.ones(50_000_000, dtype=numpy.uint8)\n\
        pid = os.fork()\n\
        if pid == 0:\n\
        \x20   c = mmap.mmap(-1, 100 << 20)\n\
        \x20   c[len(c) // 2] = 7\n\
        \x20   os._exit(c[len(c) // 2] + m[4096])\n\
        print(sum(m[::4096]), int(a.sum()), os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))";
    assert_eq!(exec_in(&mut sandbox, &stdout, code), "153600 50000000 8\n");
}

#[test]
fn pages_copied_ahead_hold_the_snapshot_and_the_request_still_runs() {
    // A fork copies ahead the pages its first request writes (learned once); copying
    // must change no byte, and the fork must answer as any other.
    let Some(store) = store() else { return };
    let vmm = Vmm::new().unwrap();
    let (meta, source) = store.load("python", &vmm).unwrap();
    let frame = forkvm_protocol::encode(&Request::code("print(6 * 7)")).unwrap();
    vmm.learn_writes(&source, &frame).unwrap();
    let learned = source.first_writes.get().expect("learned");
    let pages: u64 = learned.iter().map(|(s, e)| (e - s) / 4096).sum();
    assert!(pages > 50, "a request writes more than {pages} pages");

    let prepared = vmm.prepare_fork(&source).unwrap();
    let ram = prepared.ram();
    let private = ram.private_pages().unwrap();
    for &(start, end) in learned {
        for page in (start..end).step_by(4096) {
            assert!(
                private.binary_search(&page).is_ok(),
                "{page:#x} not copied ahead"
            );
        }
    }
    let mut expected = vec![0u8; 4096];
    let mut actual = vec![0u8; 4096];
    for page in (0..meta.ram_bytes).step_by(4096) {
        source.backing.read_page(page, &mut expected).unwrap();
        ram.read(page, &mut actual).unwrap();
        assert!(
            expected == actual,
            "page {page:#x} differs from the snapshot"
        );
    }
    let (console, stdout) = captured();
    let mut sandbox = vmm.finish_fork(prepared, &source, console).unwrap();
    assert_eq!(exec_in(&mut sandbox, &stdout, "print(6 * 7)"), "42\n");
}
