//! A sandbox: one KVM VM with one vCPU running a program in ring 3, and the loop that serves
//! its syscalls until it ends or parks on the control channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_kernel::vdso::GuestTsc;
use forkvm_kernel::{
    Entry, ExitReason, Fpu, FpuError, FpuState, Outcome, Process, UserContext, UserRegs,
};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_sync_regs, kvm_xsave};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd};
use thiserror::Error;

use crate::descriptors::SYSCALL_EXIT_RIP;
use crate::exit::{self, Fault, SandboxExit};
use crate::layout::{EXCEPTION_PORT_BASE, EXCEPTION_VECTORS, SYSCALL_PORT, USER_START};
use crate::vcpu::{self, CpuTemplate, USER_RFLAGS, VcpuSetupError, VcpuState};
use crate::vm::Vm;
use crate::watchdog::{Cancel, CpuBudget, DeadlineGuard, SchedulerAlarm};

/// Errors while creating, resuming or capturing a sandbox's VM.
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION: {0}")]
    SetMemoryRegion(kvm_ioctls::Error),
    #[error("guest RAM chunk {0} has no memory slot number")]
    TooManySlots(u64),
    #[error("KVM_CREATE_VCPU: {0}")]
    CreateVcpu(kvm_ioctls::Error),
    #[error("KVM_GET_SREGS: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("configuring the vCPU: {0}")]
    Vcpu(#[from] VcpuSetupError),
    #[error("the sandbox is not parked on its control channel")]
    NotParked,
    #[error("the sandbox cannot be snapshotted now: {0}")]
    Busy(#[from] forkvm_kernel::CaptureError),
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

/// The sandbox's processes, each with guest RAM and a VM of its own; the one current in
/// the syscall layer runs on `vcpu`. Field order is drop order: the vCPUs and VMs go before
/// the guest RAM (owned by `process`) they refer to.
pub struct Sandbox {
    vcpu: VcpuFd,
    vm: Vm,
    /// The VMs of the other processes' memory, by the host address of their RAM.
    others: HashMap<u64, (VcpuFd, Vm)>,
    /// The host address of the RAM `vcpu`'s VM maps.
    space: u64,
    process: Process,
    kvm: Arc<Kvm>,
    cpu: CpuTemplate,
    user_cs: kvm_segment,
    user_ss: kvm_segment,
    parked: Option<Parked>,
    /// CPU time each `run_until_request` may use.
    cpu_limit: Option<Duration>,
    /// The guest TSC, for the vDSO's clock page (None: the page stays disabled).
    tsc: Option<GuestTsc>,
    /// Ends the next request runs early when cancelled (their client went away).
    cancel: Option<Cancel>,
}

/// RFLAGS bits a program may set (as `sysret` restores them): CF PF AF ZF SF TF DF OF AC ID …
/// but never IOPL or NT, which would widen its I/O privileges.
const USER_RFLAGS_MASK: u64 = 0x3c_0dd5;

/// Calls `op` until a timer signal does not interrupt it.
pub(crate) fn retry_interrupted<T>(
    mut op: impl FnMut() -> Result<T, kvm_ioctls::Error>,
) -> Result<T, kvm_ioctls::Error> {
    loop {
        match op() {
            Err(e) if e.errno() == libc::EINTR => continue,
            other => return other,
        }
    }
}

/// A VM over `ram` with a vCPU configured for ring 3, starting at `rip` with stack `rsp`.
fn new_vm(
    kvm: &Kvm,
    cpu: &CpuTemplate,
    process: &Process,
    rip: u64,
    rsp: u64,
) -> Result<(Vm, VcpuFd), SandboxError> {
    let vm = Vm::create(kvm, process.ram(), &process.populated_ranges())?;
    let mut vcpu =
        retry_interrupted(|| vm.fd().create_vcpu(0)).map_err(SandboxError::CreateVcpu)?;
    vcpu::configure(&vcpu, cpu, rip, rsp)?;
    vcpu.set_sync_valid_reg(SyncReg::Register);
    vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
    // KVM fills the shared register area only on an exit; `load_context` edits it in place
    // before the first run, so it must start as the vCPU's real registers.
    let sregs = vcpu.get_sregs().map_err(SandboxError::GetSregs)?;
    let regs = vcpu.get_regs().map_err(SandboxError::GetSregs)?;
    let sync = vcpu.sync_regs_mut();
    sync.sregs = sregs;
    sync.regs = regs;
    Ok((vm, vcpu))
}

impl Sandbox {
    /// Creates the VM over `process`'s RAM and a vCPU ready to start at `entry`. The RAM must
    /// already hold the page tables and descriptors (`Vmm::new_ram`).
    pub fn new(
        kvm: &Arc<Kvm>,
        cpu: &CpuTemplate,
        process: Process,
        entry: Entry,
    ) -> Result<Self, SandboxError> {
        let (vm, vcpu) = new_vm(kvm, cpu, &process, entry.rip, entry.rsp)?;
        let sregs = vcpu.get_sregs().map_err(SandboxError::GetSregs)?;
        let mut sandbox = Self::assemble(kvm, cpu, vm, vcpu, process, (sregs.cs, sregs.ss), None);
        sandbox.process.refresh_clock(cpu.tsc);
        Ok(sandbox)
    }

    /// A sandbox from a VM whose vCPU was restored to `state`, parked on the control channel
    /// (a fork of a snapshot).
    /// Its clock page is refreshed when a request is delivered.
    pub(crate) fn from_restored(
        kvm: &Arc<Kvm>,
        vm: Vm,
        vcpu: VcpuFd,
        process: Process,
        state: &VcpuState,
        cpu: &CpuTemplate,
    ) -> Self {
        let parked = Parked {
            regs: state.regs,
            sregs: state.sregs,
        };
        let segments = vcpu::user_segments();
        Self::assemble(kvm, cpu, vm, vcpu, process, segments, Some(parked))
    }

    fn assemble(
        kvm: &Arc<Kvm>,
        cpu: &CpuTemplate,
        vm: Vm,
        mut vcpu: VcpuFd,
        mut process: Process,
        (user_cs, user_ss): (kvm_segment, kvm_segment),
        parked: Option<Parked>,
    ) -> Self {
        vcpu.set_sync_valid_reg(SyncReg::Register);
        vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        process.set_machine(Arc::new(crate::SystemArea));
        Self {
            vcpu,
            vm,
            others: HashMap::new(),
            space: process.ram().host_base(),
            process,
            kvm: kvm.clone(),
            cpu: cpu.clone(),
            user_cs,
            user_ss,
            parked,
            cpu_limit: None,
            tsc: cpu.tsc,
            cancel: None,
        }
    }

    /// Makes `vcpu` the one over the current process's memory (creating its VM the first
    /// time), and drops the VMs of memory the syscall layer retired, then that memory.
    fn select_vcpu(&mut self) -> Result<(), SandboxError> {
        let retired = self.process.take_retired_ram();
        let want = self.process.ram().host_base();
        if want != self.space {
            let (vcpu, vm) = match self.others.remove(&want) {
                Some(pair) => pair,
                None => {
                    let (vm, vcpu) = new_vm(&self.kvm, &self.cpu, &self.process, 0, 0)?;
                    (vcpu, vm)
                }
            };
            let old_vcpu = std::mem::replace(&mut self.vcpu, vcpu);
            let old_vm = std::mem::replace(&mut self.vm, vm);
            let old_space = std::mem::replace(&mut self.space, want);
            if !retired.iter().any(|ram| ram.host_base() == old_space) {
                self.others.insert(old_space, (old_vcpu, old_vm));
            }
        }
        for ram in &retired {
            self.others.remove(&ram.host_base());
        }
        // Only now, with no VM over it left, may the memory go.
        drop(retired);
        // What the syscall layer mapped since the vCPU last ran gets its memory slots.
        self.vm.cover(self.process.ram())
    }

    /// Limits the CPU time of every later run (per `run_until_request` call).
    pub fn set_cpu_limit(&mut self, limit: Option<Duration>) {
        self.cpu_limit = limit;
    }

    /// Lets `cancel` end later runs (`run_until_request`) early, as their deadline would.
    pub fn set_cancel(&mut self, cancel: Option<Cancel>) {
        self.cancel = cancel;
    }

    /// KVM's counters for this sandbox's current VM and vCPU (`stats`), named `vm.*` and
    /// `vcpu.*`.
    pub fn kvm_counters(&self) -> std::io::Result<crate::stats::Counters> {
        let mut all = crate::stats::Counters::new();
        for (prefix, counters) in [
            ("vm", crate::stats::read(self.vm.fd())?),
            ("vcpu", crate::stats::read(&self.vcpu)?),
        ] {
            all.extend(
                counters
                    .into_iter()
                    .map(|(k, v)| (format!("{prefix}.{k}"), v)),
            );
        }
        Ok(all)
    }

    pub fn process(&self) -> &Process {
        &self.process
    }

    pub fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Takes the sandbox apart (to reset and reuse its VM): the first process's VM, vCPU and
    /// state; every other process is dropped.
    pub(crate) fn into_parts(mut self) -> (Vm, VcpuFd, Process) {
        self.process.make_init_current();
        if let Err(e) = self.select_vcpu() {
            tracing::error!(error = %e, "restoring the first process's VM");
        }
        self.others.clear();
        (self.vm, self.vcpu, self.process)
    }

    /// Where the program is parked, if it is.
    pub fn parked(&self) -> Option<&Parked> {
        self.parked.as_ref()
    }

    /// Readies the sandbox for a snapshot and returns the first process's full vCPU state
    /// (only while parked): every other process's vector state moves from its vCPU into
    /// its thread records, where a fork (which makes new VMs) finds it.
    pub fn capture(&mut self) -> Result<VcpuState, SandboxError> {
        if self.parked.is_none() {
            return Err(SandboxError::NotParked);
        }
        let others = &self.others;
        self.process
            .save_parked_fpu(|host_base| others.get(&host_base).map(|(vcpu, _)| xsave(vcpu)))?;
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
        let result = self.run_loop(Step::Continue, deadline, Mode::Request);
        if let Some(cancel) = &self.cancel {
            cancel.detach();
        }
        result
    }

    /// While parked between a session's requests: runs the sandbox's other threads and
    /// processes (the agent's read becomes a wait like theirs) until `until`, or until
    /// none has anything left to do. The program is parked again afterwards, as it was,
    /// unless the sandbox ended (a background process killed the first one).
    pub fn run_between_requests(&mut self, until: Instant) -> Result<RunResult, SandboxError> {
        let parked = self.parked.take().ok_or(SandboxError::NotParked)?;
        self.process.refresh_clock(self.tsc);
        let sync = self.vcpu.sync_regs_mut();
        sync.regs = parked.regs;
        sync.sregs = parked.sregs;
        let mut ctx = syscall_context(sync);
        let mut fpu = VcpuFpu(&self.vcpu);
        let outcome = self.process.start_between_requests(&mut ctx, &mut fpu);
        let step = self.finish(outcome, ctx);
        Ok(self.run_loop(step, Some(until), Mode::BetweenRequests))
    }

    /// The run loop: serves exits from `first` on until the program parks or ends; what
    /// the deadline means depends on `mode`.
    fn run_loop(&mut self, first: Step, deadline: Option<Instant>, mode: Mode) -> RunResult {
        let mut guard = deadline.map(DeadlineGuard::arm);
        if let (Mode::Request, Some(cancel), Some(guard)) = (mode, &self.cancel, &guard) {
            cancel.attach(guard);
        }
        let budget = match mode {
            Mode::Request => match self.cpu_limit.map(CpuBudget::arm).transpose() {
                Ok(budget) => budget,
                Err(e) => {
                    return RunResult::Ended(SandboxExit::Internal(format!(
                        "arming the CPU-time limit: {e}"
                    )));
                }
            },
            Mode::BetweenRequests => None,
        };
        // Created when the program first has something for the scheduler to time.
        let mut alarm: Option<SchedulerAlarm> = None;
        let mut deadline = deadline;
        // Between requests: whether the slice is ending (the agent on its way to park).
        let mut returning = false;
        let expired = |guard: &Option<DeadlineGuard>, deadline: Option<Instant>| {
            guard.as_ref().is_some_and(DeadlineGuard::expired)
                || deadline.is_some_and(|d| Instant::now() >= d)
        };
        let exhausted =
            |budget: &Option<CpuBudget>| budget.as_ref().is_some_and(CpuBudget::exhausted);
        let mut step = first;
        loop {
            // Every thread waits: sleep until the first of them is due (or the sandbox's
            // own deadline), then let the scheduler pick.
            while let Step::Idle(until, mut ctx) = step {
                if !idle_until(until, deadline) {
                    step = Step::Continue;
                    break;
                }
                if let Err(e) = self.select_vcpu() {
                    step = Step::End(SandboxExit::Internal(format!("a process's VM: {e}")));
                    break;
                }
                let mut fpu = VcpuFpu(&self.vcpu);
                let outcome = self.process.resume(&mut ctx, &mut fpu);
                step = self.finish(outcome, ctx);
            }
            // Read the clock once: each arm must see the same answer.
            let expired = expired(&guard, deadline);
            match step {
                Step::Continue if mode == Mode::BetweenRequests && expired => {
                    if returning {
                        self.process.console_mut().flush();
                        return RunResult::Ended(SandboxExit::Internal(
                            "the agent did not come back to its control channel".into(),
                        ));
                    }
                    if let Some(next) = self.end_slice() {
                        // The agent gets a grace period to park (a signal handler may run).
                        returning = true;
                        let grace = Instant::now() + PARK_GRACE;
                        guard = Some(DeadlineGuard::arm(grace));
                        deadline = Some(grace);
                        step = next;
                        continue;
                    }
                }
                Step::Continue if expired => {
                    self.process.console_mut().flush();
                    return RunResult::Ended(SandboxExit::Timeout);
                }
                Step::Continue if exhausted(&budget) => {
                    self.process.console_mut().flush();
                    return RunResult::Ended(SandboxExit::CpuTimeout);
                }
                Step::Continue | Step::Idle(..) => {}
                Step::Park => return RunResult::AwaitingRequest,
                Step::End(exit) => {
                    self.process.console_mut().flush();
                    return RunResult::Ended(exit);
                }
            }
            if let Err(e) = self.set_alarm(&mut alarm) {
                return RunResult::Ended(SandboxExit::Internal(format!(
                    "arming the scheduler's timer: {e}"
                )));
            }
            step = self.run_vcpu();
        }
    }

    /// Enters the guest once and serves the exit.
    fn run_vcpu(&mut self) -> Step {
        match self.vcpu.run() {
            Ok(VcpuExit::IoOut(SYSCALL_PORT, _)) => self.serve_syscall(),
            Ok(VcpuExit::IoOut(port, _))
                if (EXCEPTION_PORT_BASE..EXCEPTION_PORT_BASE + EXCEPTION_VECTORS)
                    .contains(&port) =>
            {
                let vector = (port - EXCEPTION_PORT_BASE) as u8;
                self.take_fault(vector)
            }
            // Only the stubs' ports are open to the program; using them itself is a fault
            // of its own making.
            Ok(VcpuExit::IoOut(..) | VcpuExit::IoIn(..)) => self.take_forged_io(),
            Ok(VcpuExit::Intr) => self.maybe_preempt(),
            Ok(VcpuExit::Shutdown) => Step::End(exit::triple_fault(&self.vcpu.sync_regs())),
            // The page tables map only what the program mapped, and `Vm::cover` gives all of
            // that a memory slot: an access outside every slot is the VMM's mistake.
            Ok(VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _)) => {
                Step::End(SandboxExit::Internal(format!(
                    "guest-physical {addr:#x} is mapped but has no memory slot"
                )))
            }
            Ok(other) => Step::End(SandboxExit::Internal(format!(
                "unexpected vCPU exit: {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => self.maybe_preempt(),
            Err(e) => Step::End(SandboxExit::Internal(format!("KVM_RUN failed: {e}"))),
        }
    }

    /// Ends a slice between requests: the running thread is taken off the vCPU (unless it
    /// is inside the system area, finishing a syscall: then `None`, and the loop asks
    /// again at the next exit) and the agent is sent back to park.
    fn end_slice(&mut self) -> Option<Step> {
        let sync = self.vcpu.sync_regs();
        let running = self.process.thread_running();
        if running && sync.regs.rip < USER_START {
            return None;
        }
        let mut ctx = live_context(&sync);
        let mut fpu = VcpuFpu(&self.vcpu);
        let outcome = self.process.end_between_requests(&mut ctx, &mut fpu)?;
        Some(self.finish(outcome, ctx))
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
        let mut ctx = syscall_context(sync);
        ctx.regs.rax = value;
        self.load_context(&ctx);
        Ok(())
    }

    fn serve_syscall(&mut self) -> Step {
        let sync = self.vcpu.sync_regs();
        // Only the stub writes this port (the TSS bitmap denies the rest). On kvm_pvm the stub
        // itself runs with the user code segment, so a program could also jump to it: that
        // is just another way to make a syscall, with registers it chose either way.
        if sync.regs.rip != SYSCALL_EXIT_RIP {
            return self.take_forged_io();
        }
        let mut ctx = syscall_context(&sync);
        let mut fpu = VcpuFpu(&self.vcpu);
        let outcome = self.process.handle_syscall(&mut ctx, &mut fpu);
        if outcome == Outcome::AwaitingControl {
            let sync = self.vcpu.sync_regs();
            self.parked = Some(Parked {
                regs: sync.regs,
                sregs: sync.sregs,
            });
            return Step::Park;
        }
        self.finish(outcome, ctx)
    }

    /// Applies what the syscall layer decided: the (possibly other) thread's context goes
    /// into the vCPU, or the sandbox idles or ends.
    fn finish(&mut self, outcome: Outcome, ctx: UserContext) -> Step {
        match outcome {
            Outcome::Return(_) | Outcome::Switched => {
                if let Err(e) = self.select_vcpu() {
                    return Step::End(SandboxExit::Internal(format!("a process's VM: {e}")));
                }
                self.load_context(&ctx);
                Step::Continue
            }
            Outcome::Idle(until) => Step::Idle(until, ctx),
            // Another process runs next: resume it at once on its own vCPU.
            Outcome::Reschedule => Step::Idle(0, ctx),
            Outcome::AwaitingControl => Step::End(SandboxExit::Internal(
                "a thread parked on the control channel while switching".into(),
            )),
            Outcome::Exit(reason) => Step::End(match reason {
                ExitReason::Exited(code) => SandboxExit::Exited(code),
                ExitReason::Signaled(signal) => SandboxExit::Signaled(signal),
                ExitReason::OutputLimit(limit) => SandboxExit::OutputLimit(limit),
                ExitReason::Deadlock(why) => SandboxExit::Deadlock(why),
                ExitReason::ProcessLimit(limit) => SandboxExit::ProcessLimit(limit),
            }),
        }
    }

    /// A CPU exception in the running thread: its handler for the signal runs if it has one
    /// (`faulthandler`, a SIGSEGV catcher); otherwise the sandbox ends with the fault.
    fn take_fault(&mut self, vector: u8) -> Step {
        let sync = self.vcpu.sync_regs();
        if !exit::is_real_exception(&sync, vector) {
            return self.take_forged_io();
        }
        let (fault, ctx) = match exit::exception(self.process.ram(), &sync, vector) {
            Ok(decoded) => decoded,
            Err(end) => return Step::End(end),
        };
        self.deliver_fault(fault, ctx)
    }

    /// The program did port I/O itself: a #GP at that instruction, delivered like any fault.
    fn take_forged_io(&mut self) -> Step {
        let sync = self.vcpu.sync_regs();
        let fault = exit::forged_io(self.process.ram(), sync.regs.rip);
        let mut ctx = live_context(&sync);
        ctx.regs.rip = fault.rip;
        self.deliver_fault(fault, ctx)
    }

    /// Runs the program's handler for `fault`'s signal, or ends the sandbox with the fault.
    fn deliver_fault(&mut self, fault: Fault, mut ctx: UserContext) -> Step {
        let (code, addr) = fault.siginfo();
        let mut fpu = VcpuFpu(&self.vcpu);
        match self
            .process
            .deliver_fault(&mut ctx, &mut fpu, fault.signal, code, addr)
        {
            Outcome::Exit(ExitReason::Signaled(signal)) if signal == fault.signal => {
                Step::End(SandboxExit::Fault(fault))
            }
            outcome => self.finish(outcome, ctx),
        }
    }

    /// `KVM_RUN` was interrupted: if the scheduler wants the vCPU for another thread, or the
    /// running thread has a signal to take, its live context is saved (mid-instruction
    /// stream) and the thread to run loaded.
    fn maybe_preempt(&mut self) -> Step {
        if !self.process.wants_interrupt() {
            return Step::Continue;
        }
        let sync = self.vcpu.sync_regs();
        // Between its `syscall` and the stub's exit the thread is in the system area: let
        // it finish the syscall first.
        if sync.regs.rip < USER_START {
            return Step::Continue;
        }
        let mut ctx = live_context(&sync);
        let mut fpu = VcpuFpu(&self.vcpu);
        let outcome = self.process.interrupt(&mut ctx, &mut fpu);
        self.finish(outcome, ctx)
    }

    /// Arms (or disarms) the alarm that interrupts `KVM_RUN` when the scheduler next has
    /// something to do; creates it the first time it is needed.
    fn set_alarm(&self, alarm: &mut Option<SchedulerAlarm>) -> std::io::Result<()> {
        let at = self.process.next_interrupt();
        match alarm {
            Some(alarm) => alarm.set(at),
            None if at.is_some() => {
                let mut new = SchedulerAlarm::new()?;
                new.set(at)?;
                *alarm = Some(new);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Puts a thread's user context into the vCPU, as `sysretq` would for a syscall's
    /// return: rip and rflags from the context (rflags masked so IOPL stays 0), user code and
    /// stack segments, FS and GS bases. The system registers are written only when they
    /// differ, which is the expensive part of the round trip.
    fn load_context(&mut self, ctx: &UserContext) {
        let user_cs = self.user_cs;
        let user_ss = self.user_ss;
        let sync = self.vcpu.sync_regs_mut();
        let r = &ctx.regs;
        sync.regs = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: (r.rflags & USER_RFLAGS_MASK) | USER_RFLAGS,
        };
        // kvm_pvm runs the stub with the user segments already loaded; hardware
        // virtualization is in ring 0 there.
        let sregs = &mut sync.sregs;
        let needs_sregs = sregs.cs.selector != user_cs.selector
            || sregs.ss.selector != user_ss.selector
            || sregs.fs.base != ctx.fs_base
            || sregs.gs.base != ctx.gs_base;
        if needs_sregs {
            sregs.cs = user_cs;
            sregs.ss = user_ss;
            sregs.fs.base = ctx.fs_base;
            sregs.gs.base = ctx.gs_base;
        }
        self.vcpu.set_sync_dirty_reg(SyncReg::Register);
        if needs_sregs {
            self.vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
        }
    }
}

/// The registers of a thread at a syscall exit, as user mode sees them after `syscall`:
/// the return address (which the CPU put in rcx) as rip, the saved flags (r11) as rflags.
fn syscall_context(sync: &kvm_sync_regs) -> UserContext {
    let mut ctx = live_context(sync);
    ctx.regs.rip = sync.regs.rcx;
    ctx.regs.rflags = sync.regs.r11;
    ctx
}

/// The registers of a thread stopped in user mode, as they are.
pub(crate) fn live_context(sync: &kvm_sync_regs) -> UserContext {
    let r = &sync.regs;
    UserContext {
        regs: UserRegs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        },
        fs_base: sync.sregs.fs.base,
        gs_base: sync.sregs.gs.base,
    }
}

/// Waits until `until` (`CLOCK_MONOTONIC` ns), or returns false at once if `deadline` comes
/// first (the caller's loop then sees the deadline and ends the sandbox).
fn idle_until(until: u64, deadline: Option<Instant>) -> bool {
    let now = forkvm_kernel::threads::monotonic_ns();
    if until <= now {
        return true;
    }
    let wait = Duration::from_nanos(until.saturating_sub(now));
    match deadline {
        Some(deadline) if Instant::now() + wait > deadline => {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            false
        }
        _ => {
            std::thread::sleep(wait);
            true
        }
    }
}

/// The vCPU's vector state (XSAVE), which the syscall layer saves and loads when it
/// switches threads.
struct VcpuFpu<'a>(&'a VcpuFd);

/// A vCPU's vector state.
fn xsave(vcpu: &VcpuFd) -> FpuState {
    match vcpu.get_xsave() {
        Ok(xsave) => FpuState(xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect()),
        Err(e) => {
            tracing::error!(error = %e, "KVM_GET_XSAVE failed");
            FpuState::default()
        }
    }
}

impl Fpu for VcpuFpu<'_> {
    fn save(&mut self) -> FpuState {
        xsave(self.0)
    }

    fn load(&mut self, state: &FpuState) -> Result<(), FpuError> {
        let mut xsave = kvm_xsave::default();
        if state.0.len() != xsave.region.len() * 4 {
            return Err(FpuError);
        }
        for (word, bytes) in xsave.region.iter_mut().zip(state.0.chunks_exact(4)) {
            *word = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
        }
        // SAFETY: `xsave` is a fully initialized legacy-size `kvm_xsave` (4 KiB region, no
        // trailing extension), which is exactly what KVM_SET_XSAVE reads.
        unsafe { self.0.set_xsave(&xsave) }.map_err(|_| FpuError)
    }
}

/// What a run loop is for: a request (its deadline is a timeout), or the time between
/// requests (its deadline ends a slice, and the agent parks again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Request,
    BetweenRequests,
}

/// How long the agent has to park again once a slice between requests ends.
const PARK_GRACE: Duration = Duration::from_secs(1);

enum Step {
    Continue,
    Park,
    /// Every thread waits until this `CLOCK_MONOTONIC` time; the context to resume with.
    Idle(u64, UserContext),
    End(SandboxExit),
}
