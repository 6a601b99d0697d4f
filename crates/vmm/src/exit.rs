//! How a sandbox ends, and turning CPU exceptions into the signals Linux would deliver.

use forkvm_kernel::OutputLimitReached;
use forkvm_kernel::UserContext;
use forkvm_memory::ram::GuestRam;
use kvm_bindings::kvm_sync_regs;

use crate::descriptors;
use crate::layout::{EXCEPTION_STUB_STRIDE, EXCEPTION_STUBS};

/// A CPU exception in the program, reported like the signal Linux would deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub signal: i32,
    /// Instruction that faulted.
    pub rip: u64,
    /// Faulting address for page faults (CR2), else 0.
    pub address: u64,
    pub error_code: Option<u64>,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at rip {:#x}",
            descriptors::vector_name(self.vector),
            self.rip
        )?;
        if self.vector == 14 {
            let access = match self.error_code {
                Some(code) if code & 2 != 0 => "write to",
                Some(code) if code & 16 != 0 => "execute at",
                _ => "read of",
            };
            write!(f, " ({access} address {:#x})", self.address)?;
        }
        Ok(())
    }
}

/// How a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxExit {
    /// The program called `exit_group(code)`.
    Exited(i32),
    /// The program killed itself with a signal (`abort()`, `kill(getpid(), …)`).
    Signaled(i32),
    /// A CPU exception.
    Fault(Fault),
    /// The wall-clock limit passed.
    Timeout,
    /// The CPU-time limit was used up.
    CpuTimeout,
    /// A stream reached its output cap.
    OutputLimit(OutputLimitReached),
    /// The program blocked forever (e.g. a futex wait with no other thread).
    Deadlock(String),
    /// A `fork` would have passed the sandbox's process limit (a fork bomb).
    ProcessLimit(usize),
    /// Something the VMM did not expect (an exit it cannot explain, a failed ioctl).
    Internal(String),
}

/// Port I/O the program did itself instead of through a stub (`in`/`out` on the stub
/// ports, a jump into an exception stub): on Linux, port I/O in user mode is a #GP, i.e.
/// `SIGSEGV`, at the instruction that did it. `rip` is where the vCPU stopped; the
/// instruction is found by its encoding just before (or at) it.
pub(crate) fn forged_io(ram: &GuestRam, rip: u64) -> Fault {
    Fault {
        vector: 13,
        signal: libc::SIGSEGV,
        rip: io_instruction_start(ram, rip),
        address: 0,
        error_code: Some(0),
    }
}

/// The start of the `in`/`out` instruction that made an I/O exit stopped at `rip`: KVM
/// reports a completed `out` with `rip` after it, an `in` (still waiting for its data) at
/// it.
fn io_instruction_start(ram: &GuestRam, rip: u64) -> u64 {
    let byte = |at: u64| {
        let mut b = [0u8; 1];
        ram.read(at, &mut b).ok().map(|()| b[0])
    };
    // `in`/`out` with the port in dx (one byte) or as an immediate (two).
    let dx_form = |b: u8| (0xEC..=0xEF).contains(&b);
    let imm_form = |b: u8| (0xE4..=0xE7).contains(&b);
    let with_prefix = |start: u64| match start.checked_sub(1).and_then(byte) {
        Some(0x66) => start - 1,
        _ => start,
    };
    match (
        byte(rip),
        rip.checked_sub(1).and_then(byte),
        rip.checked_sub(2).and_then(byte),
    ) {
        (Some(b), _, _) if dx_form(b) || imm_form(b) => with_prefix(rip),
        (_, Some(b), _) if dx_form(b) => with_prefix(rip - 1),
        (_, _, Some(b)) if imm_form(b) => with_prefix(rip - 2),
        _ => rip,
    }
}

/// Whether an exit on exception `vector`'s port came from a real exception: it enters the
/// stub in ring 0, through its IDT gate. The program can reach the port, or jump to the
/// stub, only from ring 3, with a frame of its own making.
pub(crate) fn is_real_exception(sync: &kvm_sync_regs, vector: u8) -> bool {
    let stub_exit = EXCEPTION_STUBS + u64::from(vector) * EXCEPTION_STUB_STRIDE + 2;
    sync.regs.rip == stub_exit && sync.sregs.cs.dpl == 0
}

/// Decodes the (real) exception `vector` from the frame the CPU pushed on the ring-0 stack: the
/// fault, and the user context it interrupted (general registers as they were, rip, rsp
/// and rflags from the frame), for a handler to run on.
pub(crate) fn exception(
    ram: &GuestRam,
    sync: &kvm_sync_regs,
    vector: u8,
) -> Result<(Fault, UserContext), SandboxExit> {
    let has_code = descriptors::has_error_code(vector);
    let words = if has_code { 6 } else { 5 };
    let mut frame = vec![0u8; words * 8];
    if ram.read(sync.regs.rsp, &mut frame).is_err() {
        return Err(SandboxExit::Internal(format!(
            "{} with an unreadable exception frame",
            descriptors::vector_name(vector)
        )));
    }
    let word = |i: usize| u64::from_le_bytes(frame[i * 8..i * 8 + 8].try_into().expect("8"));
    let (error_code, base) = if has_code {
        (Some(word(0)), 1)
    } else {
        (None, 0)
    };
    // The frame: rip, cs, rflags, rsp, ss.
    let rip = word(base);
    let mut ctx = crate::sandbox::live_context(sync);
    ctx.regs.rip = rip;
    ctx.regs.rflags = word(base + 2);
    ctx.regs.rsp = word(base + 3);
    let fault = Fault {
        vector,
        signal: descriptors::vector_signal(vector),
        rip,
        address: if vector == 14 { sync.sregs.cr2 } else { 0 },
        error_code,
    };
    Ok((fault, ctx))
}

impl Fault {
    /// The `si_code` and `si_addr` Linux gives this fault's signal.
    pub fn siginfo(&self) -> (i32, u64) {
        use forkvm_kernel::signals::code;
        match self.vector {
            14 if self.error_code.is_some_and(|c| c & 1 != 0) => (code::SEGV_ACCERR, self.address),
            14 => (code::SEGV_MAPERR, self.address),
            0 => (code::FPE_INTDIV, self.rip),
            6 => (code::ILL_ILLOPN, self.rip),
            1 => (code::TRAP_BRKPT, self.rip),
            17 => (code::BUS_ADRALN, self.rip),
            _ => (code::SI_KERNEL, 0),
        }
    }
}

/// A triple fault (`KVM_EXIT_SHUTDOWN`): an exception while delivering an exception.
pub(crate) fn triple_fault(sync: &kvm_sync_regs) -> SandboxExit {
    SandboxExit::Fault(Fault {
        vector: 8,
        signal: libc::SIGSEGV,
        rip: sync.regs.rip,
        address: sync.sregs.cr2,
        error_code: None,
    })
}
