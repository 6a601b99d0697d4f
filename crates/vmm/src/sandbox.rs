//! A sandbox: one KVM VM with one vCPU running a program in ring 3, and the loop that serves
//! its syscalls until it ends or parks on the control channel.

use std::time::{Duration, Instant};

use forkvm_kernel::memory::GuestRam;
use forkvm_kernel::vdso::GuestTsc;
use forkvm_kernel::{Entry, ExitReason, Outcome, Process, SyscallArgs, TlsBases};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;

use crate::descriptors::SYSCALL_EXIT_RIP;
use crate::exit::{self, SandboxExit};
use crate::layout::{EXCEPTION_PORT_BASE, EXCEPTION_VECTORS, SYSCALL_PORT};
use crate::vcpu::{self, CpuTemplate, USER_RFLAGS, VcpuSetupError, VcpuState};
use crate::watchdog::{CpuBudget, DeadlineGuard};

/// Errors while creating, resuming or capturing a sandbox's VM.
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
    #[error("the sandbox is not parked on its control channel")]
    NotParked,
    #[error("completing the control-channel read: {0}")]
    Deliver(syscalls::Errno),
}

/// What `run_until_request` stopped for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    /// The sandbox ended.
    Ended(SandboxExit),
    /// The program is parked reading its control channel: deliver a request to go on.
    AwaitingRequest,
}

/// The registers at the syscall exit where the program parked.
#[derive(Debug, Clone, Copy)]
pub struct Parked {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

/// One VM, one vCPU, one process. Field order is drop order: the vCPU and VM go before the
/// guest RAM (owned by `process`) they refer to.
pub struct Sandbox {
    vcpu: VcpuFd,
    _vm: VmFd,
    process: Process,
    user_cs: kvm_segment,
    user_ss: kvm_segment,
    parked: Option<Parked>,
    /// CPU time each `run_until_request` may use.
    cpu_limit: Option<Duration>,
    /// The guest TSC, for the vDSO's clock page (None: the page stays disabled).
    tsc: Option<GuestTsc>,
}

/// RFLAGS bits a program may set (as `sysret` restores them): CF PF AF ZF SF TF DF OF AC ID …
/// but never IOPL or NT, which would widen its I/O privileges.
const USER_RFLAGS_MASK: u64 = 0x3c_0dd5;

/// Creates a VM whose only memory slot is `ram`.
pub(crate) fn create_vm(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, SandboxError> {
    let vm = kvm.create_vm().map_err(SandboxError::CreateVm)?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base(),
    };
    // SAFETY: the region is a live host mapping of `ram.size()` bytes; every caller keeps the
    // VM beside the RAM's owner and drops the VM first (Sandbox and PreparedVm field order).
    unsafe { vm.set_user_memory_region(region) }.map_err(SandboxError::SetMemoryRegion)?;
    Ok(vm)
}

impl Sandbox {
    /// Creates the VM over `process`'s RAM and a vCPU ready to start at `entry`. The RAM must
    /// already hold the page tables and descriptors (`Vmm::new_ram`).
    pub fn new(
        kvm: &Kvm,
        cpu: &CpuTemplate,
        process: Process,
        entry: Entry,
    ) -> Result<Self, SandboxError> {
        let vm = create_vm(kvm, process.ram())?;
        let vcpu = vm.create_vcpu(0).map_err(SandboxError::CreateVcpu)?;
        vcpu::configure(&vcpu, cpu, entry.rip, entry.rsp)?;
        let sregs = vcpu.get_sregs().map_err(SandboxError::GetSregs)?;
        let mut sandbox = Self::assemble(vm, vcpu, process, sregs.cs, sregs.ss, None, cpu.tsc);
        sandbox.process.refresh_clock(cpu.tsc);
        Ok(sandbox)
    }

    /// A sandbox from a VM whose vCPU was restored to `state`, parked on the control channel
    /// (a fork of a snapshot).
    /// Its clock page is refreshed when a request is delivered.
    pub fn from_restored(
        vm: VmFd,
        vcpu: VcpuFd,
        process: Process,
        state: &VcpuState,
        cpu: &CpuTemplate,
    ) -> Self {
        let (user_cs, user_ss) = vcpu::user_segments();
        let parked = Parked {
            regs: state.regs,
            sregs: state.sregs,
        };
        Self::assemble(vm, vcpu, process, user_cs, user_ss, Some(parked), cpu.tsc)
    }

    fn assemble(
        vm: VmFd,
        mut vcpu: VcpuFd,
        process: Process,
        user_cs: kvm_segment,
        user_ss: kvm_segment,
        parked: Option<Parked>,
        tsc: Option<GuestTsc>,
    ) -> Self {
        vcpu.set_sync_valid_reg(SyncReg::Register);
        vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        Self {
            vcpu,
            _vm: vm,
            process,
            user_cs,
            user_ss,
            parked,
            cpu_limit: None,
            tsc,
        }
    }

    /// Limits the CPU time of every later run (per `run_until_request` call).
    pub fn set_cpu_limit(&mut self, limit: Option<Duration>) {
        self.cpu_limit = limit;
    }

    pub fn process(&self) -> &Process {
        &self.process
    }

    pub fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Takes the sandbox apart (to reset and reuse its VM).
    pub fn into_parts(self) -> (VmFd, VcpuFd, Process) {
        (self._vm, self.vcpu, self.process)
    }

    /// Where the program is parked, if it is.
    pub fn parked(&self) -> Option<&Parked> {
        self.parked.as_ref()
    }

    /// The full vCPU state, for a snapshot (only meaningful while parked).
    pub fn capture_vcpu(&self) -> Result<VcpuState, SandboxError> {
        if self.parked.is_none() {
            return Err(SandboxError::NotParked);
        }
        Ok(VcpuState::capture(&self.vcpu)?)
    }

    /// Runs a program that has no control channel until it ends or `deadline` passes.
    pub fn run(&mut self, deadline: Option<Instant>) -> SandboxExit {
        match self.run_until_request(deadline) {
            RunResult::Ended(exit) => exit,
            RunResult::AwaitingRequest => {
                SandboxExit::Internal("the program waits on a control channel nobody serves".into())
            }
        }
    }

    /// Runs until the program ends, parks on its control channel, or `deadline` passes.
    pub fn run_until_request(&mut self, deadline: Option<Instant>) -> RunResult {
        if self.parked.is_some() {
            return RunResult::AwaitingRequest;
        }
        let guard = deadline.map(DeadlineGuard::arm);
        let budget = match self.cpu_limit.map(CpuBudget::arm).transpose() {
            Ok(budget) => budget,
            Err(e) => {
                return RunResult::Ended(SandboxExit::Internal(format!(
                    "arming the CPU-time limit: {e}"
                )));
            }
        };
        self.process.set_deadline(deadline);
        let expired = |guard: &Option<DeadlineGuard>| {
            guard.as_ref().is_some_and(DeadlineGuard::expired)
                || deadline.is_some_and(|d| Instant::now() >= d)
        };
        let exhausted =
            |budget: &Option<CpuBudget>| budget.as_ref().is_some_and(CpuBudget::exhausted);
        loop {
            let step = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(SYSCALL_PORT, _)) => self.serve_syscall(),
                Ok(VcpuExit::IoOut(port, _))
                    if (EXCEPTION_PORT_BASE..EXCEPTION_PORT_BASE + EXCEPTION_VECTORS)
                        .contains(&port) =>
                {
                    let vector = (port - EXCEPTION_PORT_BASE) as u8;
                    let sync = self.vcpu.sync_regs();
                    Step::End(exit::exception(self.process.ram(), &sync, vector))
                }
                Ok(VcpuExit::IoOut(port, _)) => Step::End(SandboxExit::Internal(format!(
                    "unexpected I/O to port {port:#x}"
                ))),
                Ok(VcpuExit::Intr) => Step::Continue,
                Ok(VcpuExit::Shutdown) => Step::End(exit::triple_fault(&self.vcpu.sync_regs())),
                Ok(other) => Step::End(SandboxExit::Internal(format!(
                    "unexpected vCPU exit: {other:?}"
                ))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
                Err(e) => Step::End(SandboxExit::Internal(format!("KVM_RUN failed: {e}"))),
            };
            match step {
                Step::Continue if expired(&guard) => {
                    self.process.console_mut().flush();
                    return RunResult::Ended(SandboxExit::Timeout);
                }
                Step::Continue if exhausted(&budget) => {
                    self.process.console_mut().flush();
                    return RunResult::Ended(SandboxExit::CpuTimeout);
                }
                Step::Continue => {}
                Step::Park => return RunResult::AwaitingRequest,
                Step::End(exit) => {
                    self.process.console_mut().flush();
                    return RunResult::Ended(exit);
                }
            }
        }
    }

    /// Completes the parked control-channel read with `request` and lets the program go on.
    pub fn deliver_request(&mut self, request: &[u8]) -> Result<(), SandboxError> {
        let parked = self.parked.take().ok_or(SandboxError::NotParked)?;
        self.process.refresh_clock(self.tsc);
        let value = self
            .process
            .complete_control_read(request)
            .map_err(SandboxError::Deliver)?;
        let sync = self.vcpu.sync_regs_mut();
        sync.regs = parked.regs;
        sync.sregs = parked.sregs;
        let tls = TlsBases {
            fs: parked.sregs.fs.base,
            gs: parked.sregs.gs.base,
        };
        self.return_to_user(value, tls);
        Ok(())
    }

    fn serve_syscall(&mut self) -> Step {
        let sync = self.vcpu.sync_regs_mut();
        // Only the stub writes this port (the TSS bitmap denies the rest). On kvm_pvm the stub
        // itself runs with the user code segment, so a program could also jump to it: that
        // is just another way to make a syscall, with registers it chose either way.
        if sync.regs.rip != SYSCALL_EXIT_RIP {
            return Step::End(exit::forged_port_write(sync.regs.rip));
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
                self.return_to_user(value, tls);
                Step::Continue
            }
            Outcome::AwaitingControl => {
                let sync = self.vcpu.sync_regs();
                self.parked = Some(Parked {
                    regs: sync.regs,
                    sregs: sync.sregs,
                });
                Step::Park
            }
            Outcome::Exit(reason) => Step::End(match reason {
                ExitReason::Exited(code) => SandboxExit::Exited(code),
                ExitReason::Signaled(signal) => SandboxExit::Signaled(signal),
                ExitReason::OutputLimit(limit) => SandboxExit::OutputLimit(limit),
                ExitReason::Deadlock(why) => SandboxExit::Deadlock(why),
            }),
        }
    }

    /// Finishes a syscall as `sysretq` would: `rax` = value, rip from rcx, rflags from r11,
    /// user segments (kvm_pvm cannot run sysretq in its emulated ring 0). The sync area must
    /// hold the full registers of the syscall exit.
    fn return_to_user(&mut self, value: u64, tls: TlsBases) {
        let sync = self.vcpu.sync_regs_mut();
        sync.regs.rax = value;
        sync.regs.rip = sync.regs.rcx;
        sync.regs.rflags = (sync.regs.r11 & USER_RFLAGS_MASK) | USER_RFLAGS;
        // kvm_pvm runs the stub with the user segments already loaded; hardware
        // virtualization is in ring 0 there. Writing system registers is the expensive
        // part of the round trip, so do it only when something differs.
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
    }
}

enum Step {
    Continue,
    Park,
    End(SandboxExit),
}
