//! KVM integration tests: small static programs run in real sandboxes, checking how each
//! kind of ending is reported and that the host is untouched.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_image::{Fs, Image};
use forkvm_kernel::{CaptureBuffer, Console, Input};
use forkvm_vmm::{SandboxExit, Vmm};

struct Fixture {
    _dir: tempfile::TempDir,
    image: Arc<Image>,
    vmm: Vmm,
}

fn fixture() -> Option<Fixture> {
    if !forkvm_testkit::kvm_available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    forkvm_testkit::compile_static(&root, &[("probe", include_str!("programs/probe.c"))]);
    let image = Arc::new(Image::open(forkvm_testkit::pack(&root, dir.path())).unwrap());
    Some(Fixture {
        _dir: dir,
        image,
        vmm: Vmm::new().unwrap(),
    })
}

struct Run {
    exit: SandboxExit,
    stdout: String,
    elapsed: Duration,
}

fn run(f: &Fixture, args: &[&str], memory: u64, timeout: Option<Duration>) -> Run {
    let stdout = CaptureBuffer::default();
    let console = Console::new(
        Input::Empty,
        Box::new(stdout.clone()),
        Box::new(std::io::sink()),
        1 << 20,
    );
    let mut argv = vec![b"/probe".to_vec()];
    argv.extend(args.iter().map(|a| a.as_bytes().to_vec()));
    let mut sandbox = f
        .vmm
        .spawn(forkvm_vmm::Program {
            path: b"/probe".to_vec(),
            argv,
            envp: vec![b"PATH=/".to_vec()],
            cwd: b"/".to_vec(),
            ram_bytes: memory,
            fs: Fs::with_limit(f.image.clone(), 1 << 20),
            console,
            control_channel: false,
        })
        .unwrap();
    let start = Instant::now();
    let exit = sandbox.run(timeout.map(|t| Instant::now() + t));
    Run {
        exit,
        stdout: String::from_utf8_lossy(&stdout.contents()).into_owned(),
        elapsed: start.elapsed(),
    }
}

const MIB: u64 = 1 << 20;

fn fault(run: &Run) -> &forkvm_vmm::Fault {
    match &run.exit {
        SandboxExit::Fault(fault) => fault,
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[test]
fn exit_status_and_output() {
    let Some(f) = fixture() else { return };
    let hello = run(&f, &["hello"], 64 * MIB, None);
    assert_eq!(hello.exit, SandboxExit::Exited(0));
    assert_eq!(hello.stdout, "hello from ring 3\n");
    assert_eq!(
        run(&f, &["exit", "42"], 64 * MIB, None).exit,
        SandboxExit::Exited(42)
    );
}

#[test]
fn wild_pointer_write_is_a_page_fault() {
    let Some(f) = fixture() else { return };
    let r = run(&f, &["wild"], 64 * MIB, None);
    let fault = fault(&r);
    assert_eq!((fault.vector, fault.signal), (14, libc::SIGSEGV));
    assert_eq!(fault.address, 0x7_0000_0000);
    assert!(
        fault.to_string().contains("write to address 0x700000000"),
        "{fault}"
    );
}

#[test]
fn null_dereference_faults() {
    let Some(f) = fixture() else { return };
    let r = run(&f, &["null"], 64 * MIB, None);
    assert_eq!(fault(&r).address, 8);
}

#[test]
fn cpu_exceptions_map_to_signals() {
    let Some(f) = fixture() else { return };
    for (mode, signal) in [
        ("ud2", libc::SIGILL),
        ("int3", libc::SIGTRAP),
        ("div0", libc::SIGFPE),
        ("port", libc::SIGSEGV),
        ("forge", libc::SIGSEGV),
    ] {
        let r = run(&f, &[mode], 64 * MIB, None);
        assert_eq!(fault(&r).signal, signal, "{mode}: {:?}", r.exit);
    }
}

#[test]
fn bad_buffers_get_efault() {
    let Some(f) = fixture() else { return };
    let r = run(&f, &["efault"], 64 * MIB, None);
    assert_eq!(r.exit, SandboxExit::Exited(0));
    assert_eq!(r.stdout, "write=-1/14 read=-1/14 overflow=-1/14\n");
}

#[test]
fn infinite_loop_times_out() {
    let Some(f) = fixture() else { return };
    let r = run(&f, &["loop"], 64 * MIB, Some(Duration::from_millis(300)));
    assert_eq!(r.exit, SandboxExit::Timeout);
    assert!(r.elapsed >= Duration::from_millis(300));
}

#[test]
fn allocation_ends_in_enomem_not_a_crash() {
    let Some(f) = fixture() else { return };
    let r = run(&f, &["malloc"], 128 * MIB, None);
    assert_eq!(r.exit, SandboxExit::Exited(0));
    let mib: u64 = r
        .stdout
        .trim_start_matches("allocated ")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((64..128).contains(&mib), "{}", r.stdout);
}

#[test]
fn clocks_sleep_and_simd_work() {
    let Some(f) = fixture() else { return };
    assert_eq!(run(&f, &["sleep"], 64 * MIB, None).stdout, "slept ok\n");
    assert_eq!(run(&f, &["avx"], 64 * MIB, None).stdout, "avx -2\n");
    assert_eq!(run(&f, &["mmap"], 64 * MIB, None).stdout, "mmap zeroed\n");
}

#[test]
fn forged_endings_are_faults_at_the_real_address() {
    let Some(f) = fixture() else { return };
    // The program's text is mapped from 0x400000 (a static non-PIE binary).
    let in_program = 0x40_0000..0x50_0000;
    for mode in ["in-syscall-port", "out-exception-port", "forge"] {
        let r = run(&f, &[mode], 64 * MIB, None);
        let fault = fault(&r);
        assert_eq!((fault.vector, fault.signal), (13, libc::SIGSEGV), "{mode}");
        assert!(in_program.contains(&fault.rip), "{mode}: {fault}");
    }
    // A jump into the page-fault stub with a frame claiming rip 0xdeadbeef: the fault is
    // the port write in the stub, not the frame's story.
    let r = run(&f, &["jump-to-exception-stub"], 64 * MIB, None);
    let fault = fault(&r);
    assert_eq!((fault.vector, fault.signal), (13, libc::SIGSEGV));
    assert_eq!(fault.rip, forkvm_vmm::layout::EXCEPTION_STUBS + 14 * 8);
}

#[test]
fn the_page_tables_enforce_mappings_and_protections() {
    let Some(f) = fixture() else { return };
    // (mode, page-fault error code bits that must be set: 1 present, 2 write, 16 fetch)
    for (mode, must) in [
        ("write-read-only", 1 | 2),
        ("execute-data", 1 | 16),
        ("unmapped", 2),
        ("read-page-tables", 0),
        ("stack-overflow", 2),
    ] {
        let r = run(&f, &[mode], 64 * MIB, Some(Duration::from_secs(20)));
        let fault = fault(&r);
        assert_eq!((fault.vector, fault.signal), (14, libc::SIGSEGV), "{mode}");
        let code = fault.error_code.unwrap();
        assert_eq!(code & must, must, "{mode}: {fault}");
        if mode == "write-read-only" {
            assert_eq!(r.stdout, "1\n", "the other page stayed writable");
        }
    }
    // A page the program touched and then unmapped is kept for reuse, still mapped by KVM
    // (a refault costs more than keeping it): reachable until mapped again, with what the
    // program left in it, never with anyone else's data.
    let r = run(&f, &["after-munmap"], 64 * MIB, None);
    assert_eq!(r.exit, SandboxExit::Exited(1));
    let r = run(&f, &["execute-after-mprotect"], 64 * MIB, None);
    assert_eq!(
        r.exit,
        SandboxExit::Exited(0),
        "PROT_EXEC added by mprotect"
    );
    assert_eq!(r.stdout, "ran\n");
}
