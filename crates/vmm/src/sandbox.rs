//! A sandbox: one KVM VM with one vCPU running a program in ring 3, and the loop that serves
//! its syscalls until it ends.

use std::time::Instant;

use forkvm_kernel::{
    Entry, ExitReason, Outcome, OutputLimitReached, Process, SyscallArgs, TlsBases,
};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;

use crate::descriptors::{self, SYSCALL_EXIT_RIP};
use crate::layout::{
    EXCEPTION_PORT_BASE, EXCEPTION_STUB_STRIDE, EXCEPTION_STUBS, EXCEPTION_VECTORS, SYSCALL_PORT,
};
use crate::vcpu::{self, CpuTemplate, USER_RFLAGS, VcpuSetupError};
use crate::watchdog::DeadlineGuard;

/// Errors while creating a sandbox's VM.
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION: {0}")]
    SetMemoryRegion(kvm_ioctls::Error),
    #[error("KVM_CREATE_VCPU: {0}")]
    CreateVcpu(kvm_ioctls::Error),
    #[error("KVM_GET_SREGS: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("configuring the vCPU: {0}")]
    Vcpu(#[from] VcpuSetupError),
}

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
    /// A stream reached its output cap.
    OutputLimit(OutputLimitReached),
    /// The program blocked forever (e.g. a futex wait with no other thread).
    Deadlock(String),
    /// Something the VMM did not expect (an exit it cannot explain, a failed ioctl).
    Internal(String),
}

/// One VM, one vCPU, one process. Field order is drop order: the vCPU and VM go before the
/// guest RAM (owned by `process`) they refer to.
pub struct Sandbox {
    vcpu: VcpuFd,
    _vm: VmFd,
    process: Process,
    user_cs: kvm_segment,
    user_ss: kvm_segment,
}

/// RFLAGS bits a program may set (as `sysret` restores them): CF PF AF ZF SF TF DF OF AC ID …
/// but never IOPL or NT, which would widen its I/O privileges.
const USER_RFLAGS_MASK: u64 = 0x3c_0dd5;

impl Sandbox {
    /// Creates the VM over `process`'s RAM and a vCPU ready to start at `entry`. The RAM must
    /// already hold the page tables and descriptors (`crate::prepare_ram`).
    pub fn new(
        kvm: &Kvm,
        cpu: &CpuTemplate,
        process: Process,
        entry: Entry,
    ) -> Result<Self, SandboxError> {
        let vm = kvm.create_vm().map_err(SandboxError::CreateVm)?;
        let ram = process.ram();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_base(),
        };
        // SAFETY: the region is a live host mapping of `ram.size()` bytes owned by `process`,
        // which this Sandbox owns and drops only after the VM (field order).
        unsafe { vm.set_user_memory_region(region) }.map_err(SandboxError::SetMemoryRegion)?;
        let mut vcpu = vm.create_vcpu(0).map_err(SandboxError::CreateVcpu)?;
        vcpu::configure(&vcpu, cpu, entry.rip, entry.rsp)?;
        vcpu.set_sync_valid_reg(SyncReg::Register);
        vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        let sregs = vcpu.get_sregs().map_err(SandboxError::GetSregs)?;
        Ok(Self {
            vcpu,
            _vm: vm,
            process,
            user_cs: sregs.cs,
            user_ss: sregs.ss,
        })
    }

    pub fn process(&self) -> &Process {
        &self.process
    }

    pub fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Runs the program until it ends or `deadline` passes.
    pub fn run(&mut self, deadline: Option<Instant>) -> SandboxExit {
        let guard = deadline.map(DeadlineGuard::arm);
        self.process.set_deadline(deadline);
        let expired = |guard: &Option<DeadlineGuard>| {
            guard.as_ref().is_some_and(DeadlineGuard::expired)
                || deadline.is_some_and(|d| Instant::now() >= d)
        };
        loop {
            let exit = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, _)) => Exit::Port(port),
                Ok(VcpuExit::Intr) => Exit::Interrupted,
                Ok(VcpuExit::Shutdown) => Exit::Shutdown,
                Ok(VcpuExit::Hlt) => Exit::Other("hlt".into()),
                Ok(other) => Exit::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Exit::Interrupted
                }
                Err(e) => Exit::Other(format!("KVM_RUN failed: {e}")),
            };
            let result = match exit {
                Exit::Port(SYSCALL_PORT) => self.serve_syscall(),
                Exit::Port(port)
                    if (EXCEPTION_PORT_BASE..EXCEPTION_PORT_BASE + EXCEPTION_VECTORS)
                        .contains(&port) =>
                {
                    Some(self.exception((port - EXCEPTION_PORT_BASE) as u8))
                }
                Exit::Port(port) => Some(SandboxExit::Internal(format!(
                    "unexpected I/O to port {port:#x}"
                ))),
                Exit::Interrupted => None,
                Exit::Shutdown => Some(self.triple_fault()),
                Exit::Other(what) => Some(SandboxExit::Internal(format!(
                    "unexpected vCPU exit: {what}"
                ))),
            };
            if let Some(end) = result {
                self.process.console_mut().flush();
                return end;
            }
            if expired(&guard) {
                self.process.console_mut().flush();
                return SandboxExit::Timeout;
            }
        }
    }

    fn serve_syscall(&mut self) -> Option<SandboxExit> {
        let sync = self.vcpu.sync_regs_mut();
        // Only the stub writes this port (the TSS bitmap denies the rest). On kvm_pvm the stub
        // itself runs with the user code segment, so a program could also jump to it: that
        // is just another way to make a syscall, with registers it chose either way.
        if sync.regs.rip != SYSCALL_EXIT_RIP {
            // The program executed `out` itself: on Linux that is a #GP, i.e. SIGSEGV.
            return Some(SandboxExit::Fault(Fault {
                vector: 13,
                signal: libc::SIGSEGV,
                rip: sync.regs.rip.wrapping_sub(2),
                address: 0,
                error_code: Some(0),
            }));
        }
        let r = &sync.regs;
        let call = SyscallArgs {
            nr: r.rax,
            args: [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9],
        };
        let mut tls = TlsBases {
            fs: sync.sregs.fs.base,
            gs: sync.sregs.gs.base,
        };
        match self.process.handle_syscall(call, &mut tls) {
            Outcome::Return(value) => {
                // Return to ring 3 as `sysretq` would: rip from rcx, rflags from r11, user
                // segments (kvm_pvm cannot run sysretq in its emulated ring 0).
                let sync = self.vcpu.sync_regs_mut();
                sync.regs.rax = value;
                sync.regs.rip = sync.regs.rcx;
                sync.regs.rflags = (sync.regs.r11 & USER_RFLAGS_MASK) | USER_RFLAGS;
                // kvm_pvm runs the stub with the user segments already loaded; hardware
                // virtualization is in ring 0 here. Write system registers only when needed:
                // it is the expensive part of the round trip.
                let sregs = &mut sync.sregs;
                let needs_sregs = sregs.cs.selector != self.user_cs.selector
                    || sregs.ss.selector != self.user_ss.selector
                    || sregs.fs.base != tls.fs
                    || sregs.gs.base != tls.gs;
                if needs_sregs {
                    sregs.cs = self.user_cs;
                    sregs.ss = self.user_ss;
                    sregs.fs.base = tls.fs;
                    sregs.gs.base = tls.gs;
                }
                self.vcpu.set_sync_dirty_reg(SyncReg::Register);
                if needs_sregs {
                    self.vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
                }
                None
            }
            Outcome::Exit(reason) => Some(match reason {
                ExitReason::Exited(code) => SandboxExit::Exited(code),
                ExitReason::Signaled(signal) => SandboxExit::Signaled(signal),
                ExitReason::OutputLimit(limit) => SandboxExit::OutputLimit(limit),
                ExitReason::Deadlock(why) => SandboxExit::Deadlock(why),
            }),
        }
    }

    /// Reads the exception frame the CPU pushed on the ring-0 stack.
    fn exception(&mut self, vector: u8) -> SandboxExit {
        let sync = self.vcpu.sync_regs_mut();
        let expected_rip = EXCEPTION_STUBS + u64::from(vector) * EXCEPTION_STUB_STRIDE + 2;
        if sync.regs.rip != expected_rip {
            return SandboxExit::Internal(format!(
                "exception exit from unexpected rip {:#x}",
                sync.regs.rip
            ));
        }
        let has_code = descriptors::has_error_code(vector);
        let words = if has_code { 6 } else { 5 };
        let mut frame = vec![0u8; words * 8];
        if self.process.ram().read(sync.regs.rsp, &mut frame).is_err() {
            return SandboxExit::Internal(format!(
                "{} with an unreadable exception frame",
                descriptors::vector_name(vector)
            ));
        }
        let word = |i: usize| u64::from_le_bytes(frame[i * 8..i * 8 + 8].try_into().expect("8"));
        let (error_code, rip) = if has_code {
            (Some(word(0)), word(1))
        } else {
            (None, word(0))
        };
        let fault = Fault {
            vector,
            signal: descriptors::vector_signal(vector),
            rip,
            address: if vector == 14 { sync.sregs.cr2 } else { 0 },
            error_code,
        };
        SandboxExit::Fault(fault)
    }

    fn triple_fault(&mut self) -> SandboxExit {
        let sync = self.vcpu.sync_regs_mut();
        SandboxExit::Fault(Fault {
            vector: 8,
            signal: libc::SIGSEGV,
            rip: sync.regs.rip,
            address: sync.sregs.cr2,
            error_code: None,
        })
    }
}

enum Exit {
    Port(u16),
    Interrupted,
    Shutdown,
    Other(String),
}
