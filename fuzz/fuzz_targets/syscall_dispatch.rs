//! Fuzzes `Process::handle_syscall` with sequences of syscalls whose numbers, arguments and
//! argument memory (paths, structs, iovecs in a scratch mapping) come from the input.
//!
//! A syscall must answer anything with a value or `-errno`, or end the sandbox: a panic here
//! would take down the VMM thread. After every call the harness also checks the invariants
//! the rest of forkvm relies on: the address space is well formed and within its limit, pages
//! next to mappings that are not mapped (and not kept for reuse) read as zero, and output
//! stays within its cap.

#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use forkvm_image::{Fs, Image};
use forkvm_kernel::{
    Console, DetachedFpu, Input, Limits, Outcome, Process, SpawnConfig, UserContext,
};
use forkvm_memory::GuestRam;
use libfuzzer_sys::fuzz_target;

// The image tree and builder the kernel's integration tests use.
#[path = "../../crates/kernel/tests/common/mod.rs"]
mod common;

const RAM_SIZE: u64 = 48 << 20;
const USER_START: u64 = 0x10_0000;
const STACK_SIZE: u64 = forkvm_kernel::loader::STACK_SIZE;
const PAGE: u64 = 4096;
const SCRATCH_LEN: u64 = 64 * 1024;
/// Where in the scratch mapping the table of known paths lives (rewritten before each call).
const PATHS_AT: u64 = SCRATCH_LEN - 2048;
const OUTPUT_LIMIT: u64 = 4096;
const OVERLAY_LIMIT: u64 = 1 << 20;
const MAX_CALLS: usize = 64;
const LIMITS: Limits = Limits {
    memory_bytes: STACK_SIZE + (8 << 20),
    open_files: 32,
};

/// Paths worth naming: image files, directories, symlinks, synthetic files, new names.
const PATHS: &[&str] = &[
    "/etc/hello.txt",
    "/etc/link",
    "/etc",
    "/bin/dir",
    "/bin/dir/inner.txt",
    "/bin/tiny",
    "/data/big.bin",
    "/tmp",
    "/tmp/new",
    "/tmp/new/sub",
    "/tmp/link",
    "/tmp/fifo",
    "/tmp/sock",
    "/",
    ".",
    "..",
    "hello.txt",
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/stdout",
    "/dev/stdin",
    "/dev",
    "/dev/fd",
    "/dev/fd/3",
    "/proc",
    "/proc/self",
    "/proc/self/exe",
    "/proc/self/cwd",
    "/proc/self/fd/0",
    "/proc/self/fd/3",
    "/missing",
    "",
];

/// Numbers of common and recent syscalls are drawn far more often than arbitrary ones.
#[derive(Arbitrary, Debug)]
enum Number {
    Classic(u16),
    ClassicAgain(u16),
    Recent(u8),
    Raw(u64),
}

impl Number {
    fn resolve(&self) -> u64 {
        match *self {
            Number::Classic(n) | Number::ClassicAgain(n) => u64::from(n % 335),
            Number::Recent(n) => 424 + u64::from(n % 40),
            Number::Raw(n) => n,
        }
    }
}

/// An argument register (or a word written into memory), biased toward values that reach
/// deep into handlers or sit on the edges of what is valid.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Arg {
    Zero,
    Small(u8),
    Negative(u8),
    Special(u8),
    /// Inside the scratch mapping.
    Scratch(u16),
    /// Just below the end of the scratch mapping (straddles into the unmapped guard).
    ScratchEnd(u8),
    /// One of the known paths in the scratch mapping.
    Path(u8),
    /// Inside the stack, counted down from the top of RAM.
    Stack(u32),
    /// Just below or above the end of guest RAM.
    RamEnd(i16),
    /// A page boundary inside user memory, minus a few bytes.
    Straddle(u16, u8),
    /// A page-aligned user address (for MAP_FIXED, munmap, mprotect …).
    PageAddr(u16),
    /// A length in pages.
    Pages(u16),
    Flags(u32),
    Raw(u64),
}

const SPECIALS: &[u64] = &[
    u64::MAX,
    i64::MAX as u64,
    i64::MIN as u64,
    u32::MAX as u64,
    1 << 31,
    1 << 32,
    (-100i64) as u64, // AT_FDCWD
    PAGE - 1,
    PAGE,
    PAGE + 1,
    0x7fff_ffff_f000,
    0x8000_0000_0000,
    RAM_SIZE,
    USER_START,
    !(PAGE - 1),
    16 << 20,
    // The high window above RAM (`forkvm_kernel::high`), and a reservation that goes there.
    1 << 40,
    (1 << 40) + 16 * PAGE,
    10 << 30,
];

impl Arg {
    fn resolve(self, scratch: u64) -> u64 {
        match self {
            Arg::Zero => 0,
            Arg::Small(n) => u64::from(n),
            Arg::Negative(n) => (-i64::from(n) - 1) as u64,
            Arg::Special(i) => SPECIALS[usize::from(i) % SPECIALS.len()],
            Arg::Scratch(offset) => scratch + u64::from(offset) % SCRATCH_LEN,
            Arg::ScratchEnd(back) => scratch + SCRATCH_LEN - u64::from(back),
            Arg::Path(i) => scratch + PATHS_AT + path_offset(usize::from(i) % PATHS.len()),
            Arg::Stack(offset) => RAM_SIZE - 1 - u64::from(offset) % STACK_SIZE,
            Arg::RamEnd(delta) => RAM_SIZE.wrapping_add_signed(i64::from(delta)),
            Arg::Straddle(page, back) => {
                let pages = (RAM_SIZE - USER_START) / PAGE;
                USER_START + (u64::from(page) % pages + 1) * PAGE - u64::from(back % 16)
            }
            Arg::PageAddr(page) => {
                let pages = (RAM_SIZE - USER_START) / PAGE;
                USER_START + u64::from(page) % pages * PAGE
            }
            Arg::Pages(n) => u64::from(n) * PAGE,
            Arg::Flags(f) => u64::from(f),
            Arg::Raw(v) => v,
        }
    }
}

/// Offset of path `index` inside the path table.
fn path_offset(index: usize) -> u64 {
    PATHS[..index].iter().map(|p| p.len() as u64 + 1).sum()
}

/// Memory the input places in the scratch mapping before a call.
#[derive(Arbitrary, Debug)]
enum Fill {
    Bytes {
        offset: u16,
        data: Vec<u8>,
    },
    /// Little-endian words: iovecs, timespecs, sigactions, pollfds with pointers in them.
    Words {
        offset: u16,
        words: Vec<Arg>,
    },
}

#[derive(Arbitrary, Debug)]
struct Call {
    number: Number,
    args: [Arg; 6],
    fills: Vec<Fill>,
}

#[derive(Arbitrary, Debug)]
struct Program {
    /// Load `/bin/tiny` first (a program mapping and a heap for `brk`) instead of starting
    /// with an empty address space.
    spawn: bool,
    /// Show the first process under a new pid, as a fork does (ids then cross the
    /// syscall boundary translated).
    renumber: bool,
    stdin: Vec<u8>,
    calls: Vec<Call>,
}

/// The test image, built once per fuzzing process. Its files are deleted right away: the
/// open image keeps its data reachable and nothing is left behind in the temp dir.
fn image() -> Arc<Image> {
    static IMAGE: OnceLock<Arc<Image>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            common::build_test_image(dir.path())
        })
        .clone()
}

/// Fresh RAM for `execve`, as the VMM gives it (without its stubs: nothing runs here), so
/// the fuzzer reaches past `execve`'s point of no return.
struct FreshRam;

impl forkvm_kernel::Machine for FreshRam {
    fn fresh_ram(&self, size: u64) -> Result<GuestRam, String> {
        GuestRam::anonymous(size).map_err(|e| e.to_string())
    }
}

fn new_process(spawn: bool, stdin: Vec<u8>) -> (Process, u64) {
    let fs = Fs::with_limit(image(), OVERLAY_LIMIT);
    let ram = GuestRam::anonymous(RAM_SIZE).expect("guest RAM");
    let console = Console::new(
        Input::Bytes {
            data: stdin,
            pos: 0,
        },
        Box::new(std::io::sink()),
        Box::new(std::io::sink()),
        OUTPUT_LIMIT,
    );
    let mut process = if spawn {
        let config = SpawnConfig {
            program: b"/bin/tiny".to_vec(),
            argv: vec![b"tiny".to_vec()],
            envp: vec![b"HOME=/tmp".to_vec()],
            cwd: b"/etc".to_vec(),
            limits: LIMITS,
            user_start: USER_START,
        };
        Process::spawn(ram, fs, console, config).expect("spawn").0
    } else {
        Process::new(ram, fs, console, b"/etc", LIMITS, USER_START).expect("process")
    };
    process.set_machine(Arc::new(FreshRam));
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let mut ctx = context(
        libc::SYS_mmap as u64,
        [0, SCRATCH_LEN, prot, flags, u64::MAX, 0],
    );
    let scratch = match process.handle_syscall(&mut ctx, &mut DetachedFpu::default()) {
        Outcome::Return(addr) if addr.is_multiple_of(PAGE) && addr >= USER_START => addr,
        other => panic!("scratch mmap failed: {other:?}"),
    };
    (process, scratch)
}

/// Writes `data` at `addr` only while that memory is still the program's: after the input
/// unmaps the scratch area, writing there would break the zero-page invariant we check.
fn fill(process: &Process, addr: u64, data: &[u8]) {
    if process.address_space().is_mapped(addr, data.len() as u64) {
        process
            .ram()
            .write(addr, data)
            .expect("mapped memory is inside RAM");
    }
}

fn place(process: &Process, scratch: u64, fills: &[Fill]) {
    let mut table = Vec::new();
    for path in PATHS {
        table.extend_from_slice(path.as_bytes());
        table.push(0);
    }
    fill(process, scratch + PATHS_AT, &table);
    for f in fills {
        let (offset, data) = match f {
            Fill::Bytes { offset, data } => (*offset, data.clone()),
            Fill::Words { offset, words } => {
                let bytes = words
                    .iter()
                    .flat_map(|w| w.resolve(scratch).to_le_bytes())
                    .collect();
                (*offset, bytes)
            }
        };
        let offset = u64::from(offset) % SCRATCH_LEN;
        let room = (SCRATCH_LEN - offset) as usize;
        fill(process, scratch + offset, &data[..data.len().min(room)]);
    }
}

/// The invariants every syscall must preserve.
fn check_consistency(process: &mut Process) {
    let space = process.address_space();
    let layout = space.layout();
    // The limit charges every mapping but reservations (`Vma::reserved`: thread stacks and
    // `MAP_NORESERVE`), whose untouched pages cost nothing.
    assert!(
        space.charged_bytes() <= space.limit_bytes(),
        "over the memory limit"
    );
    let mut total = 0;
    let mut charged = 0;
    let mut previous_end = layout.user_start;
    for vma in space.vmas() {
        assert!(vma.start < vma.end, "empty mapping {vma:?}");
        assert!(
            vma.start.is_multiple_of(PAGE) && vma.end.is_multiple_of(PAGE),
            "unaligned {vma:?}"
        );
        assert!(
            vma.start >= previous_end,
            "overlapping or below user range: {vma:?}"
        );
        assert!(vma.end <= layout.user_end, "beyond RAM: {vma:?}");
        total += vma.end - vma.start;
        if !vma.reserved {
            charged += vma.end - vma.start;
        }
        previous_end = vma.end;
    }
    assert_eq!(
        total,
        space.mapped_bytes(),
        "mapped_bytes disagrees with the mappings"
    );
    assert_eq!(
        charged,
        space.charged_bytes(),
        "charged_bytes disagrees with the mappings"
    );
    // Unmapped pages must read as zero, except those kept for reuse (zeroed when mapped
    // again): check the ones bordering each mapping, where an off-by-one write or a missed
    // discard would land.
    let mut page = vec![0u8; PAGE as usize];
    for vma in space.vmas() {
        for candidate in [vma.start.checked_sub(PAGE), Some(vma.end)] {
            let Some(addr) = candidate else { continue };
            if addr < layout.user_end
                && !space.is_mapped(addr, 1)
                && !process.ram().is_retained(addr)
            {
                process.ram().read(addr, &mut page).expect("inside RAM");
                assert!(
                    page.iter().all(|&b| b == 0),
                    "unmapped page {addr:#x} is dirty"
                );
            }
        }
    }
    let (out, err) = process.console_mut().written();
    assert!(
        out <= OUTPUT_LIMIT && err <= OUTPUT_LIMIT,
        "output cap exceeded"
    );
}

/// A thread's context making syscall `nr` with `args`.
fn context(nr: u64, args: [u64; 6]) -> UserContext {
    let mut ctx = UserContext::default();
    let r = &mut ctx.regs;
    r.rax = nr;
    [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9] = args;
    ctx
}

fuzz_target!(|program: Program| {
    let (mut process, scratch) = new_process(program.spawn, program.stdin);
    if program.renumber {
        process.renumber_for_fork();
    }
    // The "vCPU": whichever thread the syscall layer switched to makes the next call.
    let mut ctx = UserContext::default();
    let mut fpu = DetachedFpu::default();
    for call in program.calls.iter().take(MAX_CALLS) {
        place(&process, scratch, &call.fills);
        let args = call.args.map(|a| a.resolve(scratch));
        let fresh = context(call.number.resolve(), args);
        ctx.regs = fresh.regs;
        let syscall = ctx.syscall();
        let mut outcome = process.handle_syscall(&mut ctx, &mut fpu);
        check_consistency(&mut process);
        // Another process runs next (a fork's child, an exit): as the VMM does, resume it.
        for _ in 0..MAX_CALLS {
            if outcome != Outcome::Reschedule {
                break;
            }
            outcome = process.resume(&mut ctx, &mut fpu);
            check_consistency(&mut process);
        }
        match outcome {
            Outcome::Return(value) => {
                assert!(value as i64 >= -4095, "{syscall:?} returned {value:#x}");
                assert_eq!(ctx.regs.rax, value);
            }
            Outcome::Switched => {}
            // Every thread waits for a deadline: the program would only sleep from here.
            Outcome::Idle(_) | Outcome::Exit(_) | Outcome::AwaitingControl => break,
            Outcome::Reschedule => break,
        }
    }
});
